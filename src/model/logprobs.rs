//! Per-token log-probs of the next token, only at the positions that are scored, with the
//! vocabulary log-softmax done in row chunks so no (tokens × vocab) tensor exists whole.
use anyhow::Result;
use candle_core::Tensor;

/// Logits elements per chunk (f32: 16 MiB).
const CHUNK_ELEMS: usize = 4 << 20;

/// Scored positions of a batch: hidden row `rows[m]` predicts token `targets[m]`, which
/// belongs to sequence `seq[m]` (0..num_seqs).
#[derive(Debug, Clone, Default)]
pub struct Scored {
    pub rows: Vec<u32>,
    pub targets: Vec<u32>,
    pub seq: Vec<u32>,
    pub num_seqs: usize,
}

/// log π(target | context) for each scored position, f32 [M] (f64 for f64 models).
pub fn token_logps(hidden: &Tensor, lm_head: &Tensor, sc: &Scored) -> Result<Tensor> {
    let m = sc.rows.len();
    if m == 0 {
        return Ok(Tensor::zeros(0, super::decoder::accum_dtype(hidden.dtype()), hidden.device())?);
    }
    let h = hidden.index_select(&Tensor::from_slice(&sc.rows, m, hidden.device())?, 0)?;
    if super::fused::applies(&h) {
        return super::fused::token_logps(&h, lm_head, &sc.targets);
    }
    token_logps_composite(&h, lm_head, &sc.targets)
}

/// The same from candle's differentiable ops, chunked over rows (bf16/f16, GPUs): autograd keeps
/// each chunk's logits for the backward.
pub fn token_logps_composite(h: &Tensor, lm_head: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let dev = h.device();
    let m = targets.len();
    let vocab = lm_head.dim(0)?;
    let chunk = (CHUNK_ELEMS / vocab).clamp(1, m);
    let w_t = lm_head.to_dtype(h.dtype())?.t()?;
    let mut parts = Vec::with_capacity(m.div_ceil(chunk));
    for start in (0..m).step_by(chunk) {
        let n = chunk.min(m - start);
        let logits = h.narrow(0, start, n)?.matmul(&w_t)?.to_dtype(super::decoder::accum_dtype(h.dtype()))?;
        // log_softmax(x)[y] = (x_y - max) - log Σ exp(x - max); the max is a constant for autograd.
        let shifted = logits.broadcast_sub(&logits.max_keepdim(1)?.detach())?;
        let lse = shifted.exp()?.sum_keepdim(1)?.log()?;
        let tgt = Tensor::from_slice(&targets[start..start + n], (n, 1), dev)?;
        parts.push((shifted.gather(&tgt, 1)? - lse)?.squeeze(1)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Sums token log-probs per sequence: f32 [num_seqs].
pub fn sequence_logps(token_logps: &Tensor, sc: &Scored) -> Result<Tensor> {
    let m = sc.seq.len();
    let dev = token_logps.device();
    if m == 0 {
        return Ok(Tensor::zeros(sc.num_seqs, token_logps.dtype(), dev)?);
    }
    let mut a = vec![0f32; sc.num_seqs * m];
    for (i, &s) in sc.seq.iter().enumerate() {
        a[s as usize * m + i] = 1.0;
    }
    let a = Tensor::from_vec(a, (sc.num_seqs, m), dev)?.to_dtype(token_logps.dtype())?;
    Ok(a.matmul(&token_logps.unsqueeze(1)?)?.squeeze(1)?)
}
