//! Per-token log-probs of the next token, only at the positions that are scored, with the
//! vocabulary log-softmax done in row chunks so no (tokens × vocab) tensor exists whole.
pub use super::fused::TokenStats;
use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::cuda::CudaStorage;
use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};

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

/// log π(target | context) for each scored position, f32 [M] (f64 for f64 models);
/// `softcap`: Gemma 2's final-logit soft-capping.
pub fn token_logps(hidden: &Tensor, lm_head: &Tensor, sc: &Scored, softcap: Option<f64>) -> Result<Tensor> {
    Ok(logps_maybe_stats(hidden, lm_head, sc, softcap, false)?.0)
}

/// `token_logps` and each scored token's statistics (entropy, log Σ p², mean logit, top-1),
/// from the same pass over the vocabulary.
pub fn token_logps_stats(hidden: &Tensor, lm_head: &Tensor, sc: &Scored, softcap: Option<f64>, stats: bool) -> Result<(Tensor, TokenStats)> {
    logps_maybe_stats(hidden, lm_head, sc, softcap, stats)
}

fn logps_maybe_stats(hidden: &Tensor, lm_head: &Tensor, sc: &Scored, softcap: Option<f64>, stats: bool) -> Result<(Tensor, TokenStats)> {
    let m = sc.rows.len();
    if m == 0 {
        return Ok((Tensor::zeros(0, super::ops::accum_dtype(hidden.dtype()), hidden.device())?, TokenStats::default()));
    }
    let h = hidden.index_select(&Tensor::from_slice(&sc.rows, m, hidden.device())?, 0)?;
    if super::fused::applies_with_bf16(&h) {
        // bf16 hidden rows multiply a bf16 head; the kernel rounds an f32 master head itself.
        let w = if h.dtype() == DType::BF16 && lm_head.dtype() != DType::F32 { lm_head.to_dtype(DType::BF16)? } else { lm_head.clone() };
        return if stats {
            super::fused::token_logps_stats(&h, &w, &sc.targets, softcap)
        } else {
            Ok((super::fused::token_logps(&h, &w, &sc.targets, softcap)?, TokenStats::default()))
        };
    }
    let w = lm_head.to_dtype(h.dtype())?;
    let (logp, lse, s) = logps_lse(&h.detach(), &w.detach(), &sc.targets, softcap, stats)?;
    let op = RecomputeLogProbs { targets: sc.targets.clone(), lse, softcap, weight_grad: w.track_op() };
    Ok((h.contiguous()?.apply_op3(&w.contiguous()?, &logp, op)?, s))
}

/// The same on any device and dtype (GPUs, bf16), holding one chunk of logits at a time in the
/// forward and in the backward: the forward runs detached (keeping each row's log-sum-exp), and
/// `RecomputeLogProbs` attaches its gradient, recomputing the logits block by block of the
/// vocabulary when the backward reaches it.
pub fn token_logps_recompute(h: &Tensor, lm_head: &Tensor, targets: &[u32], softcap: Option<f64>) -> Result<Tensor> {
    let w = lm_head.to_dtype(h.dtype())?;
    let (logp, lse, _) = logps_lse(&h.detach(), &w.detach(), targets, softcap, false)?;
    let op = RecomputeLogProbs { targets: targets.to_vec(), lse, softcap, weight_grad: w.track_op() };
    Ok(h.contiguous()?.apply_op3(&w.contiguous()?, &logp, op)?)
}

/// Returns its third argument (the detached log-probs); its backward is that of
/// log_softmax(h Wᵀ)[target] with respect to h and W.
struct RecomputeLogProbs {
    targets: Vec<u32>,
    /// log Σ_v exp(h_i·W_v) per row, from the forward [m], f32 (f64 for f64).
    lse: Tensor,
    /// W takes part in autograd (a trained head); else its gradient is skipped.
    weight_grad: bool,
    softcap: Option<f64>,
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

    /// d logp_i / d h_i = W[t_i] − Σ_v p_iv W_v;  d logp_i / d W = (onehot(t_i) − p_i) ⊗ h_i,
    /// with p_iv = exp(h_i·W_v − lse_i), one vocabulary block at a time: each block of dW is
    /// written once (row chunks would rewrite all of dW per chunk).
    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: ops on a tracked W here would build a graph that keeps every block's
        // intermediates alive until the backward ends.
        let (h, w) = (&h.detach(), &w.detach());
        let (m, vocab) = (self.targets.len(), w.dim(0)?);
        let (dtype, acc, dev) = (h.dtype(), super::ops::accum_dtype(h.dtype()), h.device());
        let block = (CHUNK_ELEMS / m.max(1)).max(1024).min(vocab.max(1));
        let g = grad.to_dtype(acc)?.unsqueeze(1)?; // [m, 1]
        let lse = self.lse.unsqueeze(1)?;
        let tgt = Tensor::from_slice(&self.targets, m, dev)?;
        // The one-hot term of dh: g_i · W[t_i].
        let dh = w.index_select(&tgt, 0)?.to_dtype(acc)?.broadcast_mul(&g)?;
        let hg = h.to_dtype(acc)?.broadcast_mul(&g)?; // [m, k], the one-hot term of dW's rows
        let mut dw_blocks = Vec::new();
        // With soft-capping z = c·tanh(x/c), the one-hot term carries dz/dx at the target's logit.
        let (mut dh, hg) = match self.softcap {
            Some(cap) => {
                let xt = (h.to_dtype(acc)? * w.index_select(&tgt, 0)?.to_dtype(acc)?)?.sum_keepdim(1)?;
                let dzdx_t = (1.0 - (xt / cap)?.tanh()?.sqr()?)?; // [m, 1]
                (dh.broadcast_mul(&dzdx_t)?, hg.broadcast_mul(&dzdx_t)?)
            }
            None => (dh, hg),
        };
        for v0 in (0..vocab).step_by(block) {
            let b = block.min(vocab - v0);
            let wb = w.narrow(0, v0, b)?;
            let x = super::bf16_gemm::mm(h, &wb.t()?)?.to_dtype(acc)?;
            let (z, dzdx) = match self.softcap {
                Some(cap) => {
                    let th = (&x / cap)?.tanh()?;
                    ((&th * cap)?, Some((1.0 - th.sqr()?)?))
                }
                None => (x, None),
            };
            let p = z.broadcast_sub(&lse)?.exp()?; // [m, b]
            let mut gp = p.broadcast_mul(&g)?;
            if let Some(d) = dzdx {
                gp = (gp * d)?;
            }
            let gp = gp.to_dtype(dtype)?; // in the compute dtype like the forward's matmul
            dh = (dh - super::bf16_gemm::mm(&gp, &wb)?.to_dtype(acc)?)?;
            if self.weight_grad {
                let mut dwb = super::bf16_gemm::mm(&gp.t()?, h)?.to_dtype(acc)?.neg()?; // [b, k]
                let (rows, local): (Vec<u32>, Vec<u32>) = (self.targets.iter().enumerate())
                    .filter(|&(_, &t)| (v0..v0 + b).contains(&(t as usize)))
                    .map(|(i, &t)| (i as u32, t - v0 as u32))
                    .unzip();
                if !rows.is_empty() {
                    let n = rows.len();
                    let rows = Tensor::from_vec(rows, n, dev)?;
                    dwb = dwb.index_add(&Tensor::from_vec(local, n, dev)?, &hg.index_select(&rows, 0)?, 0)?;
                }
                dw_blocks.push(dwb.to_dtype(w.dtype())?);
            }
        }
        let dw = if self.weight_grad { Some(Tensor::cat(&dw_blocks, 0)?) } else { None };
        Ok((Some(dh.to_dtype(dtype)?), dw, None))
    }
}

/// The same from candle's differentiable ops, chunked over rows: autograd keeps each chunk's
/// logits for the backward (a reference in tests and benchmarks).
pub fn token_logps_composite(h: &Tensor, lm_head: &Tensor, targets: &[u32], softcap: Option<f64>) -> Result<Tensor> {
    Ok(logps_lse(h, &lm_head.to_dtype(h.dtype())?, targets, softcap, false)?.0)
}

/// Σ over each row of `t` [n, v] as [n, 1] in `t`'s dtype, accumulated in f64: a float32
/// running sum over a vocabulary drops the many terms far below the largest (e^−20 beside 1),
/// so it runs low, the log-sum-exp with it, and every log-prob high: +5e-6 nats a token at
/// 151,936 entries and a logit spread of 5 (PyTorch's float32 CPU log_softmax has the same bias).
fn row_sums(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F64)?.sum_keepdim(1)?.to_dtype(t.dtype())?)
}

/// log of [`row_sums`], taken in f64.
fn log_row_sums(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F64)?.sum_keepdim(1)?.log()?.to_dtype(t.dtype())?)
}

/// log π(target) and log Σ exp(logits) per row, f32 [m] each (f64 for f64), in row chunks;
/// with `stats`, each row's statistics too.
fn logps_lse(h: &Tensor, w: &Tensor, targets: &[u32], softcap: Option<f64>, stats: bool) -> Result<(Tensor, Tensor, TokenStats)> {
    let mut st = TokenStats::default();
    let dev = h.device();
    let m = targets.len();
    let chunk = (CHUNK_ELEMS / w.dim(0)?).clamp(1, m.max(1));
    let w_t = w.t()?;
    let (mut logps, mut lses) = (Vec::with_capacity(m.div_ceil(chunk)), Vec::with_capacity(m.div_ceil(chunk)));
    for start in (0..m).step_by(chunk) {
        let n = chunk.min(m - start);
        let mut logits = super::bf16_gemm::mm(&h.narrow(0, start, n)?, &w_t)?.to_dtype(super::ops::accum_dtype(h.dtype()))?;
        if let Some(cap) = softcap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        // log_softmax(x)[y] = (x_y - max) - log Σ exp(x - max); the max is a constant for autograd.
        let max = logits.max_keepdim(1)?.detach();
        let shifted = logits.broadcast_sub(&max)?;
        let lse = log_row_sums(&shifted.exp()?)?;
        let tgt = Tensor::from_slice(&targets[start..start + n], (n, 1), dev)?;
        logps.push((shifted.gather(&tgt, 1)? - &lse)?.squeeze(1)?);
        if stats {
            let f = |t: Tensor| -> Result<Vec<f32>> { Ok(t.squeeze(1)?.to_dtype(DType::F32)?.to_vec1()?) };
            let p = shifted.broadcast_sub(&lse)?.exp()?;
            let full_lse = (&lse + &max)?;
            st.entropy.extend(f((&full_lse - row_sums(&(&p * &logits)?)?)?)?);
            st.log_sum_sq.extend(f(log_row_sums(&p.sqr()?)?)?);
            st.mean_logit.extend(f(logits.mean_keepdim(1)?)?);
            let arg: Vec<u32> = logits.argmax(1)?.to_vec1()?;
            st.top1.extend(arg.iter().zip(&targets[start..start + n]).map(|(a, t)| a == t));
        }
        lses.push((lse + max)?.squeeze(1)?);
    }
    Ok((Tensor::cat(&logps, 0)?, Tensor::cat(&lses, 0)?, st))
}

/// Sums token log-probs per sequence (each times its weight, when given): f32 [num_seqs].
pub fn sequence_logps(token_logps: &Tensor, sc: &Scored, weights: Option<&[f32]>) -> Result<Tensor> {
    let m = sc.seq.len();
    let dev = token_logps.device();
    if m == 0 {
        return Ok(Tensor::zeros(sc.num_seqs, token_logps.dtype(), dev)?);
    }
    let mut a = vec![0f32; sc.num_seqs * m];
    for (i, &s) in sc.seq.iter().enumerate() {
        a[s as usize * m + i] = weights.map_or(1.0, |w| w[i]);
    }
    let a = Tensor::from_vec(a, (sc.num_seqs, m), dev)?.to_dtype(token_logps.dtype())?;
    Ok(a.matmul(&token_logps.unsqueeze(1)?)?.squeeze(1)?)
}
