//! Per-token log-probs of the next token, only at the positions that are scored, with the
//! vocabulary log-softmax done in row chunks so no (tokens × vocab) tensor exists whole.
use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::cuda::CudaStorage;
use candle_core::{CpuStorage, Layout, Shape, Tensor};

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
    token_logps_recompute(&h, lm_head, &sc.targets)
}

/// The same on any device and dtype (GPUs, bf16), holding one chunk of logits at a time in the
/// forward and in the backward: the forward runs detached, and `RecomputeLogProbs` attaches its
/// gradient, recomputing each chunk's logits from h and W when the backward reaches it.
pub fn token_logps_recompute(h: &Tensor, lm_head: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let w = lm_head.to_dtype(h.dtype())?;
    let logp = token_logps_composite(&h.detach(), &w.detach(), targets)?;
    let op = RecomputeLogProbs { targets: targets.to_vec(), weight_grad: w.track_op() };
    Ok(h.contiguous()?.apply_op3(&w.contiguous()?, &logp, op)?)
}

/// Returns its third argument (the detached log-probs); its backward is that of
/// log_softmax(h Wᵀ)[target] with respect to h and W, chunk by chunk.
struct RecomputeLogProbs {
    targets: Vec<u32>,
    /// W takes part in autograd (a trained head); else its gradient is skipped.
    weight_grad: bool,
}

impl candle_core::CustomOp3 for RecomputeLogProbs {
    fn name(&self) -> &'static str {
        "recompute-logprobs"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        logp: &CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((logp.try_clone(l)?, l.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        logp: &CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        Ok((logp.try_clone(l)?, l.shape().clone()))
    }

    /// d logp_i / d h_i = W[t_i] − Σ_v p_iv W_v;  d logp_i / d W = (onehot(t_i) − p_i) ⊗ h_i.
    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, vocab) = (self.targets.len(), w.dim(0)?);
        let (dtype, acc) = (h.dtype(), super::decoder::accum_dtype(h.dtype()));
        let chunk = (CHUNK_ELEMS / vocab).clamp(1, m.max(1));
        let w_t = w.t()?;
        let mut dh = Vec::with_capacity(m.div_ceil(chunk));
        let mut dw = if self.weight_grad { Some(Tensor::zeros(w.shape(), acc, w.device())?) } else { None };
        for start in (0..m).step_by(chunk) {
            let n = chunk.min(m - start);
            let hc = h.narrow(0, start, n)?;
            let logits = hc.matmul(&w_t)?.to_dtype(acc)?;
            let e = logits.broadcast_sub(&logits.max_keepdim(1)?)?.exp()?;
            let p = e.broadcast_div(&e.sum_keepdim(1)?)?; // [n, vocab]
            let g = grad.narrow(0, start, n)?.to_dtype(acc)?.unsqueeze(1)?; // [n, 1]
            let gp = p.broadcast_mul(&g)?.to_dtype(dtype)?; // g·p, in the compute dtype like the forward's matmul
            let tgt = Tensor::from_slice(&self.targets[start..start + n], n, h.device())?;
            let w_tgt = w.index_select(&tgt, 0)?.to_dtype(acc)?;
            dh.push((w_tgt.broadcast_mul(&g)? - gp.matmul(w)?.to_dtype(acc)?)?.to_dtype(dtype)?);
            if let Some(d) = dw.as_mut() {
                let hg = hc.to_dtype(acc)?.broadcast_mul(&g)?;
                *d = (d.index_add(&tgt, &hg, 0)? - gp.t()?.matmul(&hc)?.to_dtype(acc)?)?;
            }
        }
        let dh = if dh.len() == 1 { dh.pop().expect("one chunk") } else { Tensor::cat(&dh, 0)? };
        Ok((Some(dh), dw.map(|d| d.to_dtype(w.dtype())).transpose()?, None))
    }
}

/// The same from candle's differentiable ops, chunked over rows: autograd keeps each chunk's
/// logits for the backward (the forward of `token_logps_recompute`, and a reference in tests).
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
