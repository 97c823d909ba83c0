//! Fused output projection + log-softmax + target pick, with its own backward (softmax −
//! one-hot), computed in row chunks: neither the (tokens × vocab) logits nor their gradient
//! ever exist whole, in the forward or in the backward. CPU, f32 and f64.
use anyhow::Result;
use candle_core::{backend::BackendStorage, CpuStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Logits elements per chunk.
const CHUNK_ELEMS: usize = 1 << 20;

pub trait Real: Copy + Send + Sync + 'static + PartialOrd + candle_core::WithDType {
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn from(v: f64) -> Self;
    fn to(self) -> f64;
}
macro_rules! real {
    ($t:ty) => {
        impl Real for $t {
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn from(v: f64) -> Self {
                v as $t
            }
            fn to(self) -> f64 {
                self as f64
            }
        }
    };
}
real!(f32);
real!(f64);

/// `out[c, V] = a[c, K] · bᵀ` for row-major `a` [c, K] and `b` [V, K].
unsafe fn matmul_abt<T: Real>(c: usize, v: usize, k: usize, a: *const T, b: *const T, out: *mut T) {
    gemm::gemm(c, v, k, out, 1, v as isize, false, a, 1, k as isize, b, k as isize, 1, T::from(0.0), T::from(1.0), false, false, false, par());
}

fn par() -> Parallelism {
    match rayon::current_num_threads() {
        1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// Turns each row of logits into log-softmax in place; returns log p(target) per row.
fn log_softmax_pick<T: Real>(logits: &mut [T], v: usize, targets: &[u32]) -> Vec<T> {
    logits
        .par_chunks_mut(v)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let max = row.iter().fold(row[0], |m, &x| if x > m { x } else { m });
            let sum: f64 = row.iter().map(|&x| (x.to() - max.to()).exp()).sum();
            let lse = max.to() + sum.ln();
            for x in row.iter_mut() {
                *x = T::from(x.to() - lse);
            }
            row[t as usize]
        })
        .collect()
}

pub struct LogProbs {
    pub targets: Vec<u32>,
    /// Whether the projection is trained (a frozen one, e.g. under LoRA, gets no gradient:
    /// it would be a (vocab × hidden) buffer and a full GEMM per step for nothing).
    pub weight_grad: bool,
}

fn contiguous<'a, T: Real>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => Err(candle_core::Error::Msg("fused log-probs need contiguous inputs".into())),
    }
}

impl LogProbs {
    fn fwd<T: Real>(&self, h: &[T], w: &[T], m: usize, k: usize, v: usize) -> Vec<T> {
        let chunk = (CHUNK_ELEMS / v).clamp(1, m.max(1));
        let mut out = Vec::with_capacity(m);
        let mut logits = vec![T::from(0.0); chunk * v];
        for start in (0..m).step_by(chunk) {
            let c = chunk.min(m - start);
            // SAFETY: the slices hold c×k, v×k and c×v elements, row-major.
            unsafe { matmul_abt(c, v, k, h[start * k..].as_ptr(), w.as_ptr(), logits.as_mut_ptr()) };
            out.extend(log_softmax_pick(&mut logits[..c * v], v, &self.targets[start..start + c]));
        }
        out
    }

    /// Gradients wrt h [m, k] and w [v, k] for upstream gradient `g` [m]:
    /// d logp_i / d logits_i = onehot(t_i) − softmax(logits_i).
    fn bwd_impl<T: Real>(&self, h: &[T], w: &[T], g: &[T], m: usize, k: usize, v: usize) -> (Vec<T>, Option<Vec<T>>) {
        let chunk = (CHUNK_ELEMS / v).clamp(1, m.max(1));
        let mut gh = vec![T::from(0.0); m * k];
        let mut gw = if self.weight_grad { vec![T::from(0.0); v * k] } else { Vec::new() };
        let mut d = vec![T::from(0.0); chunk * v];
        for start in (0..m).step_by(chunk) {
            let c = chunk.min(m - start);
            // SAFETY: as in fwd.
            unsafe { matmul_abt(c, v, k, h[start * k..].as_ptr(), w.as_ptr(), d.as_mut_ptr()) };
            let targets = &self.targets[start..start + c];
            log_softmax_pick(&mut d[..c * v], v, targets);
            d[..c * v].par_chunks_mut(v).zip(targets.par_iter()).zip(g[start..start + c].par_iter()).for_each(|((row, &t), &gi)| {
                for x in row.iter_mut() {
                    *x = T::from(-gi.to() * x.to().exp());
                }
                row[t as usize] = T::from(row[t as usize].to() + gi.to());
            });
            // SAFETY: gh rows [start, start+c) are c×k; d is c×v; w is v×k; gw is v×k.
            unsafe {
                // gh[c, k] = d[c, v] · w[v, k]
                gemm::gemm(
                    c,
                    k,
                    v,
                    gh[start * k..].as_mut_ptr(),
                    1,
                    k as isize,
                    false,
                    d.as_ptr(),
                    1,
                    v as isize,
                    w.as_ptr(),
                    1,
                    k as isize,
                    T::from(0.0),
                    T::from(1.0),
                    false,
                    false,
                    false,
                    par(),
                );
                // gw[v, k] += dᵀ[v, c] · h[c, k]
                if !self.weight_grad {
                    continue;
                }
                gemm::gemm(
                    v,
                    k,
                    c,
                    gw.as_mut_ptr(),
                    1,
                    k as isize,
                    true,
                    d.as_ptr(),
                    v as isize,
                    1,
                    h[start * k..].as_ptr(),
                    1,
                    k as isize,
                    T::from(1.0),
                    T::from(1.0),
                    false,
                    false,
                    false,
                    par(),
                );
            }
        }
        (gh, self.weight_grad.then_some(gw))
    }
}

impl CustomOp2 for LogProbs {
    fn name(&self) -> &'static str {
        "fused-log-probs"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (v, k2) = l2.shape().dims2()?;
        if k != k2 || m != self.targets.len() {
            return Err(candle_core::Error::Msg(format!("fused log-probs: hidden {m}x{k}, weight {v}x{k2}, {} targets", self.targets.len())));
        }
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(self.fwd(contiguous::<f32>(s1, l1)?, &widened::<f32>(s2, l2)?, m, k, v)),
            DType::F64 => CpuStorage::F64(self.fwd(contiguous::<f64>(s1, l1)?, &widened::<f64>(s2, l2)?, m, k, v)),
            dt => return Err(candle_core::Error::Msg(format!("fused log-probs: unsupported dtype {dt:?}"))),
        };
        Ok((out, Shape::from(m)))
    }

    fn bwd(&self, h: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (m, k) = h.dims2()?;
        let v = w.dim(0)?;
        let grad = grad.contiguous()?;
        let (hs, hl) = h.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (Storage::Cpu(hs), Storage::Cpu(ws), Storage::Cpu(gs)) = (&*hs, &*ws, &*gs) else {
            return Err(candle_core::Error::Msg("fused log-probs: CPU only".into()));
        };
        let dev = h.device();
        Ok(match h.dtype() {
            DType::F32 => {
                let (gh, gw) = self.bwd_impl(contiguous::<f32>(hs, hl)?, &widened::<f32>(ws, wl)?, contiguous::<f32>(gs, gl)?, m, k, v);
                (Some(Tensor::from_vec(gh, (m, k), dev)?), gw.map(|gw| Tensor::from_vec(gw, (v, k), dev)).transpose()?)
            }
            _ => {
                let (gh, gw) = self.bwd_impl(contiguous::<f64>(hs, hl)?, &widened::<f64>(ws, wl)?, contiguous::<f64>(gs, gl)?, m, k, v);
                (Some(Tensor::from_vec(gh, (m, k), dev)?), gw.map(|gw| Tensor::from_vec(gw, (v, k), dev)).transpose()?)
            }
        })
    }
}

/// Whether the fused kernel serves these tensors (else the composite path does).
pub fn applies(h: &Tensor) -> bool {
    h.device().is_cpu() && matches!(h.dtype(), DType::F32 | DType::F64)
}

/// log p(target) per row of `h` [m, k] under output projection `w` [v, k] (in h's dtype, or a
/// frozen bf16/f16 one, widened for each call instead of held widened for the backward).
pub fn token_logps(h: &Tensor, w: &Tensor, targets: &[u32]) -> Result<Tensor> {
    Ok(h.contiguous()?.apply_op2(&w.contiguous()?, LogProbs { targets: targets.to_vec(), weight_grad: w.track_op() })?)
}

/// y = x Wᵀ for a frozen W: the backward gives x its gradient and W none. (candle's matmul
/// always computes both, which under LoRA is a weight-sized GEMM and buffer per layer for
/// nothing.) CPU f32/f64 x; W in x's dtype, or bf16/f16, widened for each call.
pub struct FrozenLinear;

fn widened<'a, T: Real>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<std::borrow::Cow<'a, [T]>> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("frozen linear needs a contiguous weight".into()))?;
    Ok(match s {
        CpuStorage::BF16(v) => std::borrow::Cow::Owned(v[a..b].iter().map(|x| T::from(x.to_f64())).collect()),
        CpuStorage::F16(v) => std::borrow::Cow::Owned(v[a..b].iter().map(|x| T::from(x.to_f64())).collect()),
        _ => std::borrow::Cow::Borrowed(contiguous::<T>(s, l)?),
    })
}

impl FrozenLinear {
    fn fwd<T: Real>(x: &[T], w: &[T], n: usize, k: usize, o: usize) -> Vec<T> {
        let mut y = vec![T::from(0.0); n * o];
        // SAFETY: x is n×k, w is o×k, y is n×o, all row-major.
        unsafe { matmul_abt(n, o, k, x.as_ptr(), w.as_ptr(), y.as_mut_ptr()) };
        y
    }
}

impl CustomOp2 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = l1.shape().dims2()?;
        let (o, k2) = l2.shape().dims2()?;
        if k != k2 {
            return Err(candle_core::Error::Msg(format!("frozen linear: input {n}x{k}, weight {o}x{k2}")));
        }
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(Self::fwd(contiguous::<f32>(s1, l1)?, &widened::<f32>(s2, l2)?, n, k, o)),
            DType::F64 => CpuStorage::F64(Self::fwd(contiguous::<f64>(s1, l1)?, &widened::<f64>(s2, l2)?, n, k, o)),
            dt => return Err(candle_core::Error::Msg(format!("frozen linear: unsupported dtype {dt:?}"))),
        };
        Ok((out, Shape::from((n, o))))
    }

    fn bwd(&self, _x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // dx [n, k] = grad [n, o] · W [o, k]
        Ok((Some(grad.matmul(&w.to_dtype(grad.dtype())?)?), None))
    }
}

/// x [n, k] · Wᵀ for a weight that gets no gradient (CPU f32/f64 x; else a plain matmul).
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if applies(x) {
        return Ok(x.contiguous()?.apply_op2(&w.contiguous()?, FrozenLinear)?);
    }
    Ok(x.matmul(&w.to_dtype(x.dtype())?.t()?)?)
}

/// Softmax over the last dimension with its own backward (dx = y ⊙ (dy − Σ dy ⊙ y)): one pass
/// each way instead of candle's chain of composite ops. CPU, f32 and f64.
pub struct SoftmaxLast;

fn softmax_rows<T: Real>(x: &[T], n: usize) -> Vec<T> {
    let mut out = x.to_vec();
    out.par_chunks_mut(n).for_each(|row| {
        let max = row.iter().fold(row[0], |m, &v| if v > m { v } else { m }).to();
        let mut sum = 0.0;
        for v in row.iter_mut() {
            let e = (v.to() - max).exp();
            sum += e;
            *v = T::from(e);
        }
        for v in row.iter_mut() {
            *v = T::from(v.to() / sum);
        }
    });
    out
}

fn softmax_rows_bwd<T: Real>(y: &[T], dy: &[T], n: usize) -> Vec<T> {
    let mut out = vec![T::from(0.0); y.len()];
    out.par_chunks_mut(n).zip(y.par_chunks(n).zip(dy.par_chunks(n))).for_each(|(o, (y, dy))| {
        let dot: f64 = y.iter().zip(dy).map(|(a, b)| a.to() * b.to()).sum();
        for ((o, a), b) in o.iter_mut().zip(y).zip(dy) {
            *o = T::from(a.to() * (b.to() - dot));
        }
    });
    out
}

impl candle_core::CustomOp1 for SoftmaxLast {
    fn name(&self) -> &'static str {
        "softmax-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = *l.shape().dims().last().unwrap_or(&1);
        let out = match s.dtype() {
            DType::F32 => CpuStorage::F32(softmax_rows(contiguous::<f32>(s, l)?, n)),
            DType::F64 => CpuStorage::F64(softmax_rows(contiguous::<f64>(s, l)?, n)),
            dt => return Err(candle_core::Error::Msg(format!("softmax: unsupported dtype {dt:?}"))),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let n = y.dim(candle_core::D::Minus1)?;
        let dy = dy.contiguous()?;
        let (ys, yl) = y.storage_and_layout();
        let (gs, gl) = dy.storage_and_layout();
        let (Storage::Cpu(ys), Storage::Cpu(gs)) = (&*ys, &*gs) else {
            return Err(candle_core::Error::Msg("softmax: CPU only".into()));
        };
        let dx = match y.dtype() {
            DType::F32 => Tensor::from_vec(softmax_rows_bwd(contiguous::<f32>(ys, yl)?, contiguous::<f32>(gs, gl)?, n), y.shape(), y.device())?,
            _ => Tensor::from_vec(softmax_rows_bwd(contiguous::<f64>(ys, yl)?, contiguous::<f64>(gs, gl)?, n), y.shape(), y.device())?,
        };
        Ok(Some(dx))
    }
}

/// RMSNorm y = x · w / sqrt(mean(x²) + eps) over the last dimension, with its own backward:
/// dx = r·(dy⊙w) − x·r³/H·Σ(dy⊙w⊙x), dw = Σ_rows dy⊙x·r. CPU, f32 and f64.
pub struct RmsNorm {
    pub eps: f64,
}

fn rms_fwd<T: Real>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let h = w.len();
    let mut out = vec![T::from(0.0); x.len()];
    out.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(|(o, x)| {
        let r = 1.0 / (x.iter().map(|v| v.to() * v.to()).sum::<f64>() / h as f64 + eps).sqrt();
        for ((o, xv), wv) in o.iter_mut().zip(x).zip(w) {
            // transformers rounds the normalised value to the input dtype before scaling by w.
            *o = T::from(T::from(xv.to() * r).to() * wv.to());
        }
    });
    out
}

fn rms_bwd<T: Real>(x: &[T], w: &[T], dy: &[T], eps: f64) -> (Vec<T>, Vec<T>) {
    let h = w.len();
    let mut dx = vec![T::from(0.0); x.len()];
    let dw = dx
        .par_chunks_mut(h)
        .zip(x.par_chunks(h).zip(dy.par_chunks(h)))
        .fold(
            || vec![0f64; h],
            |mut dw, (dx, (x, dy))| {
                let r = 1.0 / (x.iter().map(|v| v.to() * v.to()).sum::<f64>() / h as f64 + eps).sqrt();
                let dot: f64 = (0..h).map(|j| dy[j].to() * w[j].to() * x[j].to()).sum();
                let c = r * r * r * dot / h as f64;
                for j in 0..h {
                    dx[j] = T::from(r * dy[j].to() * w[j].to() - x[j].to() * c);
                    dw[j] += dy[j].to() * x[j].to() * r;
                }
                dw
            },
        )
        .reduce(
            || vec![0f64; h],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                a
            },
        );
    (dx, dw.into_iter().map(T::from).collect())
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(rms_fwd(contiguous::<f32>(s1, l1)?, contiguous::<f32>(s2, l2)?, self.eps)),
            DType::F64 => CpuStorage::F64(rms_fwd(contiguous::<f64>(s1, l1)?, contiguous::<f64>(s2, l2)?, self.eps)),
            dt => return Err(candle_core::Error::Msg(format!("rms_norm: unsupported dtype {dt:?}"))),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = dy.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(gs)) = (&*xs, &*ws, &*gs) else {
            return Err(candle_core::Error::Msg("rms_norm: CPU only".into()));
        };
        let (dev, xshape, wshape) = (x.device(), x.shape(), w.shape());
        Ok(match x.dtype() {
            DType::F32 => {
                let (dx, dw) = rms_bwd(contiguous::<f32>(xs, xl)?, contiguous::<f32>(ws, wl)?, contiguous::<f32>(gs, gl)?, self.eps);
                (Some(Tensor::from_vec(dx, xshape, dev)?), Some(Tensor::from_vec(dw, wshape, dev)?))
            }
            _ => {
                let (dx, dw) = rms_bwd(contiguous::<f64>(xs, xl)?, contiguous::<f64>(ws, wl)?, contiguous::<f64>(gs, gl)?, self.eps);
                (Some(Tensor::from_vec(dx, xshape, dev)?), Some(Tensor::from_vec(dw, wshape, dev)?))
            }
        })
    }
}
