//! AdamW with PyTorch's semantics, HF learning-rate schedules, global-norm clipping.
use crate::model::fused::Real;
use anyhow::{bail, Result};
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Storage, Tensor, Var};
use rayon::prelude::*;
use std::sync::Mutex;

/// Learning-rate schedules after warm-up, as transformers defines them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// A moment buffer in the parameter's dtype: host memory for CPU parameters, a tensor on the
/// parameter's device otherwise.
enum Moment {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Tensor(Tensor),
    /// ZeRO-1: another rank keeps this parameter's moments and updates it.
    Elsewhere,
}

/// First and second moments per parameter, and the step count for bias correction. On CPU the
/// update is one pass over raw slices per parameter (candle ops would allocate a dozen
/// parameter-sized temporaries per step); on other devices it is candle ops on the device,
/// with no host round trip.
pub struct AdamW {
    pub cfg: AdamWConfig,
    m: Vec<Moment>,
    v: Vec<Moment>,
    pub t: usize,
}

fn zeros_like(p: &Var, on_device: bool) -> Result<Moment> {
    let n = p.elem_count();
    Ok(match p.dtype() {
        DType::F32 | DType::F64 if on_device => Moment::Tensor(p.as_tensor().zeros_like()?),
        DType::F32 => Moment::F32(vec![0.0; n]),
        DType::F64 => Moment::F64(vec![0.0; n]),
        dt => bail!("AdamW keeps f32 or f64 parameters, not {dt:?}"),
    })
}

/// The same update as [`update`] from candle ops, in the parameter's dtype (as torch's foreach
/// AdamW): returns (new p, new m, new v).
#[allow(clippy::too_many_arguments)]
fn update_tensors(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, lr: f64, c: &AdamWConfig, bc1: f64, bc2: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let m = ((m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
    let v = ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
    let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
    let p = ((p * (1.0 - lr * c.weight_decay))? - ((&m / denom)? * (lr / bc1))?)?;
    Ok((p, m, v))
}

/// One AdamW update of `p` in place with gradient `g` × `scale` (clipping's factor, applied
/// in `T` as torch scales the gradient), in f64 arithmetic: one pass over p, g, m and v, no
/// temporaries (a fresh parameter-sized buffer per step cost its page faults on top).
#[allow(clippy::too_many_arguments)]
fn update<T: Real>(p: &mut [T], g: &[T], m: &mut [T], v: &mut [T], scale: f64, lr: f64, c: &AdamWConfig, bc1: f64, bc2: f64) {
    let bc2_sqrt = bc2.sqrt();
    let scale = T::from(scale).to(); // torch multiplies by the factor in the gradient's dtype
    p.par_iter_mut().zip(g.par_iter()).zip(m.par_iter_mut().zip(v.par_iter_mut())).with_min_len(4096).for_each(|((p, &g), (m, v))| {
        let g = if scale == 1.0 { g.to() } else { T::from(g.to() * scale).to() };
        let md = c.beta1 * m.to() + (1.0 - c.beta1) * g;
        let vd = c.beta2 * v.to() + (1.0 - c.beta2) * g * g;
        *m = T::from(md);
        *v = T::from(vd);
        let denom = vd.sqrt() / bc2_sqrt + c.eps;
        *p = T::from(p.to() * (1.0 - lr * c.weight_decay) - (lr / bc1) * md / denom);
    });
}

/// AdamW's per-step constants in f32 (see [`update_f32`]).
#[derive(Clone, Copy)]
struct AdamF32 {
    decay: f32,
    scale: f32,
    beta2: f32,
    one_minus_beta2: f32,
    one_minus_beta1: f32,
    bc2_sqrt: f32,
    eps: f32,
    step: f32,
}

/// [`update`] for f32 parameters in f32 arithmetic, op by op as torch's single-tensor AdamW
/// rounds them (decay, lerp of m, v·β2 + (1−β2)·g², √v / √bc2 + ε, p − step·m/denom), in wide
/// vectors: the f64 version ran two lanes at a time and was 11% of a bf16 step.
#[allow(clippy::too_many_arguments)]
fn update_f32(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], scale: f64, lr: f64, c: &AdamWConfig, bc1: f64, bc2: f64) {
    let k = AdamF32 {
        decay: (1.0 - lr * c.weight_decay) as f32,
        scale: scale as f32,
        beta2: c.beta2 as f32,
        one_minus_beta1: (1.0 - c.beta1) as f32,
        one_minus_beta2: (1.0 - c.beta2) as f32,
        bc2_sqrt: bc2.sqrt() as f32,
        eps: c.eps as f32,
        step: (lr / bc1) as f32,
    };
    const CHUNK: usize = 1 << 14;
    p.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK))).for_each(|((p, g), (m, v))| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                return unsafe { adam_f32_avx512(p, g, m, v, k) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2.
                return unsafe { adam_f32_avx2(p, g, m, v, k) };
            }
        }
        adam_f32(p, g, m, v, k)
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn adam_f32_avx512(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: AdamF32) {
    adam_f32(p, g, m, v, k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn adam_f32_avx2(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: AdamF32) {
    adam_f32(p, g, m, v, k)
}

#[inline(always)]
fn adam_f32(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: AdamF32) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g * k.scale;
        *m += k.one_minus_beta1 * (g - *m);
        *v = *v * k.beta2 + k.one_minus_beta2 * g * g;
        let denom = v.sqrt() / k.bc2_sqrt + k.eps;
        *p = *p * k.decay - k.step * (*m / denom);
    }
}

/// A CPU parameter's moments, lent to [`InPlace`] for one update.
enum MomentSlices<'a> {
    F32(&'a mut [f32], &'a mut [f32]),
    F64(&'a mut [f64], &'a mut [f64]),
}

/// [`update`] as a candle in-place op on the parameter's own storage.
struct InPlace<'a> {
    moments: Mutex<MomentSlices<'a>>,
    scale: f64,
    lr: f64,
    cfg: AdamWConfig,
    bc1: f64,
    bc2: f64,
}

impl InplaceOp2 for InPlace<'_> {
    fn name(&self) -> &'static str {
        "adamw-in-place"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let ((a, b), (ga, gb)) = match (l1.contiguous_offsets(), l2.contiguous_offsets()) {
            (Some(p), Some(g)) => (p, g),
            _ => candle_core::bail!("adamw: parameter and gradient must be contiguous"),
        };
        let (sc, lr, c, bc1, bc2) = (self.scale, self.lr, &self.cfg, self.bc1, self.bc2);
        match (s1, s2, &mut *self.moments.lock().expect("one update at a time")) {
            (CpuStorage::F32(p), CpuStorage::F32(g), MomentSlices::F32(m, v)) => update_f32(&mut p[a..b], &g[ga..gb], m, v, sc, lr, c, bc1, bc2),
            (CpuStorage::F64(p), CpuStorage::F64(g), MomentSlices::F64(m, v)) => update(&mut p[a..b], &g[ga..gb], m, v, sc, lr, c, bc1, bc2),
            _ => candle_core::bail!("adamw: parameter, gradient and moments differ in dtype"),
        }
        Ok(())
    }
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, params: &[Var]) -> Result<Self> {
        let on_device = params.first().is_some_and(|p| !p.device().is_cpu());
        Self::with_tensor_moments(cfg, params, on_device)
    }

    /// `tensor_ops`: keep the moments as tensors and update with candle ops (what non-CPU
    /// devices use; on CPU for testing that path against the slice one).
    pub fn with_tensor_moments(cfg: AdamWConfig, params: &[Var], tensor_ops: bool) -> Result<Self> {
        let zeros = || params.iter().map(|p| zeros_like(p, tensor_ops)).collect::<Result<Vec<_>>>();
        Ok(Self { cfg, m: zeros()?, v: zeros()?, t: 0 })
    }

    /// ZeRO-1: moments (and updates) only for the parameters this rank owns; `step` leaves the
    /// others as they are, for their owners to broadcast.
    pub fn sharded(cfg: AdamWConfig, params: &[Var], owned: &[bool]) -> Result<Self> {
        let mut me = Self::new(cfg, params)?;
        for (i, &mine) in owned.iter().enumerate() {
            if !mine {
                (me.m[i], me.v[i]) = (Moment::Elsewhere, Moment::Elsewhere);
            }
        }
        Ok(me)
    }

    /// Bytes of the moments this rank keeps.
    pub fn state_bytes(&self) -> u64 {
        let bytes = |m: &Moment| match m {
            Moment::F32(v) => v.len() * 4,
            Moment::F64(v) => v.len() * 8,
            Moment::Tensor(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Moment::Elsewhere => 0,
        };
        self.m.iter().chain(&self.v).map(|m| bytes(m) as u64).sum()
    }

    /// Whether this optimizer keeps parameter `i`'s moments.
    pub fn owns(&self, i: usize) -> bool {
        !matches!(self.m[i], Moment::Elsewhere)
    }

    /// One update at learning rate `lr` (torch.optim.AdamW, amsgrad off, maximize off).
    pub fn step(&mut self, params: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.step_scaled(params, grads, lr, 1.0)
    }

    /// One update with every gradient multiplied by `scale` first (clipping: [`clip_scale`]).
    pub fn step_scaled(&mut self, params: &[Var], grads: &[Tensor], lr: f64, scale: f64) -> Result<()> {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let g = g.to_dtype(p.dtype())?.contiguous()?;
            let moments = match (&mut self.m[i], &mut self.v[i]) {
                (Moment::F32(m), Moment::F32(v)) => MomentSlices::F32(m, v),
                (Moment::F64(m), Moment::F64(v)) => MomentSlices::F64(m, v),
                (Moment::Tensor(m), Moment::Tensor(v)) => {
                    // Detached: the update is not part of any graph.
                    let g = if scale == 1.0 { g } else { (g * scale)? };
                    let (new, m2, v2) = update_tensors(&p.as_tensor().detach(), &g, m, v, lr, &c, bc1, bc2)?;
                    (*m, *v) = (m2, v2);
                    p.set(&new)?;
                    continue;
                }
                (Moment::Elsewhere, _) => continue,
                _ => unreachable!("moments are made in the parameter's dtype"),
            };
            let op = InPlace { moments: Mutex::new(moments), scale, lr, cfg: c, bc1, bc2 };
            p.as_tensor().inplace_op2(&g, &op)?;
        }
        Ok(())
    }

    /// The moments of parameter `i` as tensors shaped like it (for checkpoints).
    pub fn moments(&self, i: usize, like: &Var) -> Result<(Tensor, Tensor)> {
        let t = |b: &Moment| -> Result<Tensor> {
            Ok(match b {
                Moment::F32(x) => Tensor::from_slice(x, like.shape(), like.device())?,
                Moment::F64(x) => Tensor::from_slice(x, like.shape(), like.device())?,
                Moment::Tensor(x) => x.clone(),
                Moment::Elsewhere => bail!("parameter {i}'s moments are kept by another rank"),
            })
        };
        Ok((t(&self.m[i])?, t(&self.v[i])?))
    }

    /// Restores the moments of parameter `i` from a checkpoint.
    pub fn set_moments(&mut self, i: usize, m: &Tensor, v: &Tensor) -> Result<()> {
        let load = |dst: &mut Moment, src: &Tensor| -> Result<()> {
            let src = src.flatten_all()?;
            match dst {
                Moment::F32(x) => *x = src.to_dtype(DType::F32)?.to_vec1()?,
                Moment::F64(x) => *x = src.to_dtype(DType::F64)?.to_vec1()?,
                Moment::Tensor(x) => *x = src.to_device(x.device())?.to_dtype(x.dtype())?.reshape(x.shape())?,
                Moment::Elsewhere => {}
            }
            Ok(())
        };
        load(&mut self.m[i], m)?;
        load(&mut self.v[i], v)
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

/// Global L2 norm of the gradients (what PyTorch's clip_grad_norm_ returns, before clipping).
/// CPU gradients' squares are summed in f64 in one pass each; others on their device, read
/// back once.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut device = Vec::new();
    let mut total = 0f64;
    for g in grads {
        let g = g.contiguous()?;
        let (storage, layout) = g.storage_and_layout();
        let (a, b) = layout.contiguous_offsets().expect("made contiguous");
        let sq = |x: &[f64]| x.par_iter().with_min_len(4096).map(|v| v * v).sum::<f64>();
        match &*storage {
            Storage::Cpu(CpuStorage::F32(x)) => total += x[a..b].par_iter().with_min_len(4096).map(|&v| (v as f64) * (v as f64)).sum::<f64>(),
            Storage::Cpu(CpuStorage::F64(x)) => total += sq(&x[a..b]),
            _ => {
                drop(storage);
                device.push(g.sqr()?.sum_all()?.to_dtype(DType::F64)?);
            }
        }
    }
    if !device.is_empty() {
        total += Tensor::stack(&device, 0)?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// What clipping to `max_norm` multiplies the gradients by (torch: max_norm / (norm + 1e-6)
/// when the norm is above it; 0 turns clipping off).
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// [`global_norm`] and the gradients scaled by [`clip_scale`] (for callers that want them
/// materialized; the trainer passes the scale to [`AdamW::step_scaled`] instead).
pub fn clip_by_global_norm(grads: &[Tensor], max_norm: f64) -> Result<(f64, Vec<Tensor>)> {
    let norm = global_norm(grads)?;
    let coef = clip_scale(norm, max_norm);
    if coef == 1.0 {
        return Ok((norm, grads.to_vec()));
    }
    Ok((norm, grads.iter().map(|g| g * coef).collect::<candle_core::Result<_>>()?))
}
