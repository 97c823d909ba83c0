//! AdamW with PyTorch's semantics, HF learning-rate schedules, global-norm clipping.
use crate::config::SchedulerKind;
use anyhow::Result;
use candle_core::{Tensor, Var};

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// First and second moments per parameter, and the step count for bias correction.
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub t: usize,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, params: &[Var]) -> Result<Self> {
        let zeros = |p: &Var| p.as_tensor().zeros_like();
        Ok(Self { cfg, m: params.iter().map(zeros).collect::<candle_core::Result<_>>()?, v: params.iter().map(zeros).collect::<candle_core::Result<_>>()?, t: 0 })
    }

    /// One update at learning rate `lr` (torch.optim.AdamW, amsgrad off, maximize off).
    pub fn step(&mut self, params: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let decayed = (p.as_tensor() * (1.0 - lr * c.weight_decay))?;
            self.m[i] = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            self.v[i] = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((self.v[i].sqrt()? / bc2.sqrt())? + c.eps)?;
            let update = ((&self.m[i] / denom)? * (lr / bc1))?;
            p.set(&(decayed - update)?)?;
        }
        Ok(())
    }
}

/// The multiplier on the base learning rate at optimizer step `step` (0-based), as
/// transformers' get_{constant,linear,cosine}_schedule_with_warmup define it.
pub fn lr_factor(kind: SchedulerKind, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match kind {
        SchedulerKind::Constant => 1.0,
        SchedulerKind::Linear => ((total as f64 - step as f64) / (total.saturating_sub(warmup)).max(1) as f64).max(0.0),
        SchedulerKind::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

/// Global L2 norm of the gradients (what PyTorch's clip_grad_norm_ returns, before clipping),
/// and the gradients scaled so their norm is at most `max_norm` (torch: max_norm / (norm + 1e-6)).
pub fn clip_by_global_norm(grads: &[Tensor], max_norm: f64) -> Result<(f64, Vec<Tensor>)> {
    let mut sq = 0f64;
    for g in grads {
        sq += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let coef = max_norm / (norm + 1e-6);
        return Ok((norm, grads.iter().map(|g| g * coef).collect::<candle_core::Result<_>>()?));
    }
    Ok((norm, grads.to_vec()))
}
