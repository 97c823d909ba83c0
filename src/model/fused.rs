//! The CPU kernels (f32 and f64) under `ops` and `logprobs`, each a candle custom op with its
//! own backward: the fused output projection + log-softmax + target pick (softmax − one-hot),
//! computed in (rows × vocabulary) blocks with a running log-sum-exp so neither the (tokens ×
//! vocab) logits nor their gradient ever exist whole; a frozen linear layer (no weight
//! gradient); softmax; RMSNorm; gated activations (SwiGLU, GeGLU); RoPE; and the vectorised
//! `exp` the softmaxes share.
use anyhow::Result;
use candle_core::{backend::BackendStorage, CpuStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Rows per chunk and vocabulary entries per block: the logits exist one [ROWS, VOCAB_BLOCK]
/// block at a time (8 MiB in f32). Each block's GEMM reads its slice of the projection once
/// for 256 rows, so packing the (vocab × hidden) weight stays a small share of the work.
const ROWS: usize = 256;
const VOCAB_BLOCK: usize = 8192;

pub trait Real: Copy + Send + Sync + 'static + PartialOrd + candle_core::WithDType {
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn from(v: f64) -> Self;
    fn to(self) -> f64;
    /// Replaces each x of `row` (all ≤ m, or −∞) by e^(x − m) and returns their sum: the
    /// softmax's inner loop, vectorized for f32.
    fn exp_shifted(row: &mut [Self], m: Self) -> f64;
    /// A gated MLP's activation and its derivative at self (see [`act`]); f32 and bf16 storage
    /// compute it in f32 with the vectorisable exp.
    fn act(self, gelu_tanh: bool) -> (f64, f64) {
        act(self.to(), gelu_tanh)
    }
}

impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn from(v: f64) -> Self {
        v
    }
    fn to(self) -> f64 {
        self
    }
    fn exp_shifted(row: &mut [f64], m: f64) -> f64 {
        let mut sum = 0.0;
        for x in row.iter_mut() {
            *x = (*x - m).exp();
            sum += *x;
        }
        sum
    }
}

impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    fn from(v: f64) -> Self {
        v as f32
    }
    fn to(self) -> f64 {
        self as f64
    }
    fn exp_shifted(row: &mut [f32], m: f32) -> f64 {
        exp_shifted_f32(row, m) as f64
    }
    #[inline(always)]
    fn act(self, gelu_tanh: bool) -> (f64, f64) {
        let (a, d) = act32(self, gelu_tanh);
        (a as f64, d as f64)
    }
}

/// bf16 storage with the kernels' math in f64 per element (as the f32 kernels): the
/// elementwise ops on a bf16 model round once, at their outputs.
impl Real for half::bf16 {
    fn exp(self) -> Self {
        Self::from_f32(self.to_f32().exp())
    }
    fn ln(self) -> Self {
        Self::from_f32(self.to_f32().ln())
    }
    fn from(v: f64) -> Self {
        Self::from_f64(v)
    }
    fn to(self) -> f64 {
        self.to_f64()
    }
    fn exp_shifted(row: &mut [Self], m: Self) -> f64 {
        let mut sum = 0.0;
        for x in row.iter_mut() {
            let e = (x.to_f64() - m.to_f64()).exp();
            *x = Self::from_f64(e);
            sum += e;
        }
        sum
    }
    #[inline(always)]
    fn act(self, gelu_tanh: bool) -> (f64, f64) {
        let (a, d) = act32(self.to_f32(), gelu_tanh);
        (a as f64, d as f64)
    }
}

/// `$body` with `$T` the [`Real`] type of dtype `$dt` (f32, f64, bf16), else an error naming `$what`.
macro_rules! by_real {
    ($dt:expr, $what:expr, $T:ident => $body:expr) => {
        match $dt {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            dt => return Err(candle_core::Error::Msg(format!("{}: unsupported dtype {dt:?}", $what))),
        }
    };
}

/// `exp_shifted` for f32 with the widest vectors the CPU has (the build targets baseline
/// x86-64, so the wide versions are compiled per feature and picked at run time).
pub fn exp_shifted_f32(row: &mut [f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { exp_shifted_avx512(row, m) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { exp_shifted_avx2(row, m) };
        }
    }
    exp_shifted_lanes(row, m)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_shifted_avx512(row: &mut [f32], m: f32) -> f32 {
    exp_shifted_lanes(row, m)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(row: &mut [f32], m: f32) -> f32 {
    exp_shifted_lanes(row, m)
}

/// 16 independent lanes (one sum each), so the compiler vectorizes the loop without
/// reassociating a single sum.
#[inline(always)]
fn exp_shifted_lanes(row: &mut [f32], m: f32) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let mut chunks = row.chunks_exact_mut(L);
    for c in &mut chunks {
        for (x, a) in c.iter_mut().zip(acc.iter_mut()) {
            let e = exp_nonpos(*x - m);
            *x = e;
            *a += e;
        }
    }
    let mut sum = 0f32;
    for x in chunks.into_remainder() {
        *x = exp_nonpos(*x - m);
        sum += *x;
    }
    sum + acc.iter().sum::<f32>()
}

/// e^x for x ≤ 0 in f32, branch-free so loops of it vectorize: x = n·ln 2 + f with n the
/// nearest integer to x·log₂e (by the 1.5·2²³ rounding trick) and |f| ≤ ½ ln 2 (ln 2 split
/// in two, Cody-Waite, so f is exact to f32); e^f by its degree-7 Taylor polynomial (error
/// below 5e-9 relative, so a few ulps in all); 2ⁿ built in the exponent bits. Below −87
/// (including −∞, a masked score) it is 0.
#[inline(always)]
pub fn exp_nonpos(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.max(-87.0);
    let r = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = r - MAGIC;
    let f = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 + f * (1.0 + f * (0.5 + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((r.to_bits() as i32 - MAGIC.to_bits() as i32 + 127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// `out[c, V] = a[c, K] · bᵀ` for row-major `a` [c, K] and `b` [V, K].
unsafe fn matmul_abt<T: Real>(c: usize, v: usize, k: usize, a: *const T, b: *const T, out: *mut T) {
    gemm::gemm(c, v, k, out, 1, v as isize, false, a, 1, k as isize, b, k as isize, 1, T::from(0.0), T::from(1.0), false, false, false, par());
}

/// out[m, n] += A[m, k] · B[k, n] for a row-major B; A's entry (i, j) is at a + i·a_rs + j·a_cs
/// (a transposed A is the same memory with the strides swapped).
///
/// # Safety
/// out, a and b must hold the m×n, m×k (as strided) and k×n entries.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_acc<T: Real>(m: usize, n: usize, k: usize, out: *mut T, a: *const T, a_cs: isize, a_rs: isize, b: *const T) {
    gemm::gemm(m, n, k, out, 1, n as isize, true, a, a_cs, a_rs, b, 1, n as isize, T::from(1.0), T::from(1.0), false, false, false, par());
}

pub(crate) use super::bf16_gemm::par;

/// Running log-sum-exp of one row over vocabulary blocks (f64), and its target's logit; with
/// `stats`, also what TRL logs per token: Σ e^(z−m)·z (entropy), Σ e^(2(z−m)) (log Σ p², WPO),
/// Σ z (the mean logit) and the first argmax.
#[derive(Clone, Copy)]
struct RowLse {
    max: f64,
    sum: f64,
    target_logit: f64,
    ez: f64,
    e2: f64,
    zsum: f64,
    /// The first vocabulary index holding the row's maximum.
    argmax: usize,
}

/// What TRL 1.16 logs per scored token, computed in the lm-head pass (no logits kept).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenStats {
    /// H = log Σ e^z − Σ p·z.
    pub entropy: Vec<f32>,
    /// log Σ_v p_v² (WPO's weights).
    pub log_sum_sq: Vec<f32>,
    /// The mean logit over the vocabulary.
    pub mean_logit: Vec<f32>,
    /// Whether the target is the first argmax.
    pub top1: Vec<bool>,
}

impl TokenStats {
    pub fn extend(&mut self, o: TokenStats) {
        self.entropy.extend(o.entropy);
        self.log_sum_sq.extend(o.log_sum_sq);
        self.mean_logit.extend(o.mean_logit);
        self.top1.extend(o.top1);
    }
}

impl RowLse {
    const EMPTY: Self = Self { max: f64::NEG_INFINITY, sum: 0.0, target_logit: f64::NAN, ez: 0.0, e2: 0.0, zsum: 0.0, argmax: 0 };

    /// Folds in `row`, the logits of vocabulary entries `v0..v0 + row.len()`.
    fn add<T: Real>(&mut self, row: &[T], v0: usize, target: usize, stats: bool) {
        let (bi, bmax) = row.iter().enumerate().fold((0, f64::NEG_INFINITY), |(i, m), (j, &x)| if x.to() > m { (j, x.to()) } else { (i, m) });
        let max = self.max.max(bmax);
        // exp in the logits' own precision (f32's is several times cheaper), summed in f64.
        let m = T::from(max);
        let scale = (self.max - max).exp();
        if stats {
            if bmax > self.max {
                self.argmax = v0 + bi;
            }
            let (mut sum, mut ez, mut e2, mut zsum) = (0f64, 0f64, 0f64, 0f64);
            for &x in row {
                let e = (x - m).exp().to();
                sum += e;
                ez += e * x.to();
                e2 += e * e;
                zsum += x.to();
            }
            self.sum = self.sum * scale + sum;
            self.ez = self.ez * scale + ez;
            self.e2 = self.e2 * scale * scale + e2;
            self.zsum += zsum;
        } else {
            self.sum = self.sum * scale + row.iter().map(|&x| (x - m).exp().to()).sum::<f64>();
        }
        self.max = max;
        if (v0..v0 + row.len()).contains(&target) {
            self.target_logit = row[target - v0].to();
        }
    }

    fn lse(&self) -> f64 {
        self.max + self.sum.ln()
    }
}

pub struct LogProbs {
    pub targets: Vec<u32>,
    /// Gemma 2's final-logit soft-capping: logits → c·tanh(logits/c).
    pub softcap: Option<f64>,
    /// Whether the projection is trained (a frozen one, e.g. under LoRA, gets no gradient:
    /// it would be a (vocab × hidden) buffer and a full GEMM per step for nothing).
    pub weight_grad: bool,
    /// Where the forward leaves each token's statistics, when asked for.
    pub stats: Option<std::sync::Arc<std::sync::Mutex<TokenStats>>>,
}

pub(crate) fn contiguous<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => Err(candle_core::Error::Msg("fused log-probs need contiguous inputs".into())),
    }
}

/// The two operands of the log-prob kernel's GEMMs, hidden rows h [m, k] and head w [v, k]:
/// in T (a narrow frozen head widened block by block), or both bf16 through the bf16 GEMM with
/// f32 sums (T = f32).
trait HeadOperands<T: Real>: Sync {
    /// out[c, vb] = h[r0..r0+c] · w[v0..v0+vb]ᵀ.
    fn logits(&self, r0: usize, c: usize, v0: usize, vb: usize, scratch: &mut Widened<T>, out: &mut [T]);
    /// gh[c, k] += d[c, vb] · w[v0..v0+vb], and gw[vb, k] += dᵀ · h[r0..r0+c] when given.
    #[allow(clippy::too_many_arguments)]
    fn back(&self, r0: usize, c: usize, v0: usize, vb: usize, d: &[T], scratch: &mut Widened<T>, gh: &mut [T], gw: Option<&mut [T]>);
    /// h_i · w_t, summed in f64.
    fn dot(&self, i: usize, t: usize) -> f64;
    /// Rows per chunk and vocabulary entries per block.
    fn blocks(&self) -> (usize, usize) {
        (ROWS, VOCAB_BLOCK)
    }
}

/// h and w in T (w possibly a narrow frozen head, see [`HeadRows`]).
struct WideHead<'a, T> {
    h: &'a [T],
    w: HeadRows<'a, T>,
    k: usize,
}

impl<T: Real> HeadOperands<T> for WideHead<'_, T> {
    fn logits(&self, r0: usize, c: usize, v0: usize, vb: usize, scratch: &mut Widened<T>, out: &mut [T]) {
        let (k, wb) = (self.k, self.w.block(v0, vb, self.k, scratch));
        // SAFETY: h rows [r0, r0+c) are c×k, wb is vb×k, out holds c×vb.
        unsafe { matmul_abt(c, vb, k, self.h[r0 * k..].as_ptr(), wb.as_ptr(), out.as_mut_ptr()) };
    }

    fn back(&self, r0: usize, c: usize, v0: usize, vb: usize, d: &[T], scratch: &mut Widened<T>, gh: &mut [T], gw: Option<&mut [T]>) {
        let (k, wb) = (self.k, self.w.block(v0, vb, self.k, scratch));
        // SAFETY: gh holds c×k, d c×vb, wb and gw vb×k, h rows [r0, r0+c) c×k.
        unsafe {
            matmul_acc(c, k, vb, gh.as_mut_ptr(), d.as_ptr(), 1, vb as isize, wb.as_ptr());
            if let Some(gw) = gw {
                matmul_acc(vb, k, c, gw.as_mut_ptr(), d.as_ptr(), vb as isize, 1, self.h[r0 * self.k..].as_ptr());
            }
        }
    }

    fn dot(&self, i: usize, t: usize) -> f64 {
        let k = self.k;
        self.h[i * k..(i + 1) * k].iter().zip(self.w.row(t, k).iter()).map(|(&a, &b)| a.to() * b.to()).sum()
    }
}

/// The head for bf16 hidden rows: bf16 as stored, or an f32 master head rounded to bf16 here
/// (for each pass, not kept), so its gradient comes back in f32 without a cast node in the graph
/// (whose backward would widen a bf16 gradient into a second head-sized f32 buffer).
fn bf16_head<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<std::borrow::Cow<'a, [half::bf16]>> {
    Ok(match s {
        CpuStorage::F32(_) => std::borrow::Cow::Owned(contiguous::<f32>(s, l)?.par_iter().map(|&x| half::bf16::from_f32(x)).collect()),
        _ => std::borrow::Cow::Borrowed(contiguous::<half::bf16>(s, l)?),
    })
}

/// h and w in bf16: the products through the bf16 GEMM, summed in f32; the backward's
/// d(logits) rounded to bf16 as the forward's operands are (as torch's bf16 autograd does).
struct Bf16Head<'a> {
    h: &'a [half::bf16],
    w: &'a [half::bf16],
    k: usize,
}

impl Bf16Head<'_> {
    fn op(x: &[half::bf16], rs: usize, cs: usize) -> super::bf16_gemm::Operand {
        super::bf16_gemm::Operand { ptr: x.as_ptr(), rs: rs as isize, cs: cs as isize }
    }
}

impl HeadOperands<f32> for Bf16Head<'_> {
    fn logits(&self, r0: usize, c: usize, v0: usize, vb: usize, _: &mut Widened<f32>, out: &mut [f32]) {
        let k = self.k;
        // SAFETY: h rows [r0, r0+c) are c×k; w rows [v0, v0+vb) are vb×k (Bᵀ: rs 1, cs k); out holds c×vb.
        unsafe { super::bf16_gemm::matmul(c, vb, k, Self::op(&self.h[r0 * k..], k, 1), Self::op(&self.w[v0 * k..], 1, k), out, false) };
    }

    fn back(&self, r0: usize, c: usize, v0: usize, vb: usize, d: &[f32], _: &mut Widened<f32>, gh: &mut [f32], gw: Option<&mut [f32]>) {
        let k = self.k;
        let db: Vec<half::bf16> = d[..c * vb].par_iter().map(|&x| half::bf16::from_f32(x)).collect();
        // SAFETY: db is c×vb; w rows [v0, v0+vb) and gw are vb×k; h rows [r0, r0+c) and gh are c×k.
        unsafe {
            super::bf16_gemm::matmul(c, k, vb, Self::op(&db, vb, 1), Self::op(&self.w[v0 * k..], k, 1), gh, true);
            if let Some(gw) = gw {
                super::bf16_gemm::matmul(vb, k, c, Self::op(&db, 1, vb), Self::op(&self.h[r0 * k..], k, 1), gw, true);
            }
        }
    }

    fn dot(&self, i: usize, t: usize) -> f64 {
        let k = self.k;
        self.h[i * k..(i + 1) * k].iter().zip(&self.w[t * k..(t + 1) * k]).map(|(a, b)| a.to_f64() * b.to_f64()).sum()
    }

    /// The same 8 MiB of f32 logits in taller, narrower blocks: the bf16 GEMM packs the head
    /// for each row chunk, so fewer chunks pack it fewer times.
    fn blocks(&self) -> (usize, usize) {
        (4 * ROWS, VOCAB_BLOCK / 4)
    }
}

impl LogProbs {
    /// log p(target) per row: logit_t − logsumexp(logits), accumulated over vocabulary blocks.
    fn fwd<T: Real>(&self, ops: &impl HeadOperands<T>, m: usize, v: usize) -> Vec<T> {
        let (rows_max, vb_max) = ops.blocks();
        let vb_max = vb_max.min(v);
        let mut out = Vec::with_capacity(m);
        let mut logits = vec![T::from(0.0); rows_max.min(m) * vb_max];
        let mut scratch = Widened::new();
        for r0 in (0..m).step_by(rows_max) {
            let c = rows_max.min(m - r0);
            let targets = &self.targets[r0..r0 + c];
            let mut rows = vec![RowLse::EMPTY; c];
            for v0 in (0..v).step_by(vb_max) {
                let vb = vb_max.min(v - v0);
                ops.logits(r0, c, v0, vb, &mut scratch, &mut logits[..c * vb]);
                if let Some(cap) = self.softcap {
                    logits[..c * vb].par_iter_mut().for_each(|x| *x = T::from(cap * (x.to() / cap).tanh()));
                }
                let stats = self.stats.is_some();
                logits[..c * vb]
                    .par_chunks(vb)
                    .zip(rows.par_iter_mut())
                    .zip(targets.par_iter())
                    .for_each(|((row, st), &t)| st.add(row, v0, t as usize, stats));
            }
            out.extend(rows.iter().map(|st| T::from(st.target_logit - st.lse())));
            if let Some(s) = &self.stats {
                let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
                for (st, &t) in rows.iter().zip(targets) {
                    s.entropy.push((st.lse() - st.ez / st.sum) as f32);
                    s.log_sum_sq.push((st.e2.ln() - 2.0 * st.sum.ln()) as f32);
                    s.mean_logit.push((st.zsum / v as f64) as f32);
                    s.top1.push(st.argmax == t as usize);
                }
            }
        }
        out
    }

    /// Gradients wrt h [m, k] and w [v, k] (in T) for upstream gradient `g` [m], given the
    /// forward's output `logp` [m]: d logp_i / d logits_i = onehot(t_i) − softmax(logits_i), with
    /// softmax = exp(logits − lse) and lse_i = h_i · w_{t_i} − logp_i (no second reduction pass).
    fn bwd_impl<T: Real>(&self, ops: &impl HeadOperands<T>, g: &[T], logp: &[T], m: usize, k: usize, v: usize) -> (Vec<T>, Option<Vec<T>>) {
        let (rows_max, vb_max) = ops.blocks();
        let vb_max = vb_max.min(v);
        let mut scratch = Widened::new();
        let mut gh = vec![T::from(0.0); m * k];
        let mut gw = if self.weight_grad { vec![T::from(0.0); v * k] } else { Vec::new() };
        let mut d = vec![T::from(0.0); rows_max.min(m) * vb_max];
        let lse: Vec<f64> = (0..m)
            .into_par_iter()
            .map(|i| {
                // The target's logit in the logits' precision, as the forward saw it.
                let raw = T::from(ops.dot(i, self.targets[i] as usize)).to();
                self.softcap.map_or(raw, |cap| T::from(cap * (raw / cap).tanh()).to()) - logp[i].to()
            })
            .collect();
        for r0 in (0..m).step_by(rows_max) {
            let c = rows_max.min(m - r0);
            for v0 in (0..v).step_by(vb_max) {
                let vb = vb_max.min(v - v0);
                ops.logits(r0, c, v0, vb, &mut scratch, &mut d[..c * vb]);
                let softcap = self.softcap;
                d[..c * vb].par_chunks_mut(vb).enumerate().for_each(|(i, row)| {
                    let (gi, l, t) = (g[r0 + i].to(), lse[r0 + i], self.targets[r0 + i] as usize);
                    for (j, x) in row.iter_mut().enumerate() {
                        // d logp / d z = onehot − softmax(z); with soft-capping z = c·tanh(x/c) and
                        // dz/dx = 1 − tanh².
                        let (z, dzdx) = match softcap {
                            Some(cap) => {
                                let th = (x.to() / cap).tanh();
                                (T::from(cap * th), 1.0 - th * th)
                            }
                            None => (*x, 1.0),
                        };
                        let onehot = if v0 + j == t { gi } else { 0.0 };
                        *x = T::from((onehot - gi * (z - T::from(l)).exp().to()) * dzdx);
                    }
                });
                let gw = self.weight_grad.then(|| &mut gw[v0 * k..(v0 + vb) * k]);
                ops.back(r0, c, v0, vb, &d[..c * vb], &mut scratch, &mut gh[r0 * k..(r0 + c) * k], gw);
            }
        }
        (gh, self.weight_grad.then_some(gw))
    }
}

impl CustomOp2 for LogProbs {
    fn name(&self) -> &'static str {
        "fused-log-probs"
    }

    /// f32 / f64 hidden rows give log-probs in their dtype; bf16 rows (with a bf16 or f32 head) give f32.
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (v, k2) = l2.shape().dims2()?;
        if k != k2 || m != self.targets.len() {
            return Err(candle_core::Error::Msg(format!("fused log-probs: hidden {m}x{k}, weight {v}x{k2}, {} targets", self.targets.len())));
        }
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(self.fwd(&WideHead { h: contiguous::<f32>(s1, l1)?, w: HeadRows::of(s2, l2)?, k }, m, v)),
            DType::F64 => CpuStorage::F64(self.fwd(&WideHead { h: contiguous::<f64>(s1, l1)?, w: HeadRows::of(s2, l2)?, k }, m, v)),
            DType::BF16 => CpuStorage::F32(self.fwd(&Bf16Head { h: contiguous(s1, l1)?, w: &bf16_head(s2, l2)?, k }, m, v)),
            dt => return Err(candle_core::Error::Msg(format!("fused log-probs: unsupported dtype {dt:?}"))),
        };
        Ok((out, Shape::from(m)))
    }

    fn bwd(&self, h: &Tensor, w: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (m, k) = h.dims2()?;
        let v = w.dim(0)?;
        let grad = grad.contiguous()?;
        let res = res.contiguous()?;
        let (hs, hl) = h.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (rs, rl) = res.storage_and_layout();
        let (Storage::Cpu(hs), Storage::Cpu(ws), Storage::Cpu(gs), Storage::Cpu(rs)) = (&*hs, &*ws, &*gs, &*rs) else {
            return Err(candle_core::Error::Msg("fused log-probs: CPU only".into()));
        };
        let dev = h.device();
        let tensors = |(gh, gw): (Vec<_>, Option<Vec<_>>)| -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
            let gh = Tensor::from_vec(gh, (m, k), dev)?.to_dtype(h.dtype())?;
            Ok((Some(gh), gw.map(|gw| Tensor::from_vec(gw, (v, k), dev)?.to_dtype(w.dtype())).transpose()?))
        };
        let (g32, r32) = (contiguous::<f32>, contiguous::<f32>);
        match h.dtype() {
            DType::F32 => {
                tensors(self.bwd_impl(&WideHead { h: contiguous(hs, hl)?, w: HeadRows::of(ws, wl)?, k }, g32(gs, gl)?, r32(rs, rl)?, m, k, v))
            }
            DType::BF16 => {
                tensors(self.bwd_impl(&Bf16Head { h: contiguous(hs, hl)?, w: &bf16_head(ws, wl)?, k }, g32(gs, gl)?, r32(rs, rl)?, m, k, v))
            }
            _ => {
                let (gh, gw) = self.bwd_impl(
                    &WideHead { h: contiguous::<f64>(hs, hl)?, w: HeadRows::of(ws, wl)?, k },
                    contiguous(gs, gl)?,
                    contiguous(rs, rl)?,
                    m,
                    k,
                    v,
                );
                Ok((Some(Tensor::from_vec(gh, (m, k), dev)?), gw.map(|gw| Tensor::from_vec(gw, (v, k), dev)).transpose()?))
            }
        }
    }
}

/// A narrow head's block widened to T, with the rows it holds (first row, count).
struct Widened<T> {
    rows: Option<(usize, usize)>,
    buf: Vec<T>,
}

impl<T> Widened<T> {
    fn new() -> Self {
        Self { rows: None, buf: Vec::new() }
    }
}

/// The output projection's rows as the log-prob kernel reads them: in the hidden states' dtype,
/// or a frozen bf16/f16 head widened one vocabulary block at a time (never the whole
/// vocab × hidden matrix: 2 GB in f32 at Llama 3's vocabulary).
enum HeadRows<'a, T> {
    Wide(&'a [T]),
    Bf16(&'a [half::bf16]),
    F16(&'a [half::f16]),
}

impl<'a, T: Real> HeadRows<'a, T> {
    fn of(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<Self> {
        let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("fused log-probs need a contiguous head".into()))?;
        Ok(match s {
            CpuStorage::BF16(v) => Self::Bf16(&v[a..b]),
            CpuStorage::F16(v) => Self::F16(&v[a..b]),
            _ => Self::Wide(contiguous::<T>(s, l)?),
        })
    }

    /// Rows [v0, v0 + vb) of k values: borrowed, or widened into `buf` (once per block: the
    /// backward asks for each block twice, for its logits and for its GEMMs).
    fn block<'b>(&'b self, v0: usize, vb: usize, k: usize, buf: &'b mut Widened<T>) -> &'b [T] {
        fn widen<'b, T: Real, S: Copy + Sync>(src: &[S], buf: &'b mut Vec<T>, k: usize, f: impl Fn(S) -> f64 + Sync) -> &'b [T] {
            buf.resize(src.len(), T::from(0.0));
            buf.par_chunks_mut(k).zip(src.par_chunks(k)).for_each(|(row, s)| row.iter_mut().zip(s).for_each(|(x, &y)| *x = T::from(f(y))));
            &buf[..]
        }
        let r = v0 * k..(v0 + vb) * k;
        if let Self::Wide(w) = self {
            return &w[r];
        }
        if buf.rows == Some((v0, vb)) {
            return &buf.buf;
        }
        buf.rows = Some((v0, vb));
        match self {
            Self::Bf16(w) => widen(&w[r], &mut buf.buf, k, |x| x.to_f64()),
            Self::F16(w) => widen(&w[r], &mut buf.buf, k, |x| x.to_f64()),
            Self::Wide(_) => unreachable!("returned above"),
        }
    }

    /// Row i, widened when the head is narrow.
    fn row(&self, i: usize, k: usize) -> std::borrow::Cow<'_, [T]> {
        let r = i * k..(i + 1) * k;
        match self {
            Self::Wide(w) => std::borrow::Cow::Borrowed(&w[r]),
            Self::Bf16(w) => std::borrow::Cow::Owned(w[r].iter().map(|x| T::from(x.to_f64())).collect()),
            Self::F16(w) => std::borrow::Cow::Owned(w[r].iter().map(|x| T::from(x.to_f64())).collect()),
        }
    }
}

/// Whether the fused kernel serves these tensors (else the composite path does).
pub fn applies(h: &Tensor) -> bool {
    h.device().is_cpu() && matches!(h.dtype(), DType::F32 | DType::F64)
}

/// Whether the kernels that also take bf16 serve `x`: f32, f64 and bf16 on the CPU. These are
/// the elementwise ops (RMSNorm, softmax, RoPE, gated activations: bf16 stored, computed wider)
/// and the log-prob head (bf16 through the bf16 GEMM; log-probs, log-sum-exp and the softmax's
/// gradient in f32).
pub fn applies_with_bf16(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64 | DType::BF16)
}

/// log p(target) per row of `h` [m, k] under output projection `w` [v, k] (in h's dtype, or a
/// frozen bf16/f16 one, widened for each call instead of held widened for the backward).
pub fn token_logps(h: &Tensor, w: &Tensor, targets: &[u32], softcap: Option<f64>) -> Result<Tensor> {
    Ok(h.contiguous()?.apply_op2(&w.contiguous()?, LogProbs { targets: targets.to_vec(), softcap, weight_grad: w.track_op(), stats: None })?)
}

/// `token_logps` and each token's statistics (see [`TokenStats`]) from the same pass.
pub fn token_logps_stats(h: &Tensor, w: &Tensor, targets: &[u32], softcap: Option<f64>) -> Result<(Tensor, TokenStats)> {
    let stats = std::sync::Arc::new(std::sync::Mutex::new(TokenStats::default()));
    let op = LogProbs { targets: targets.to_vec(), softcap, weight_grad: w.track_op(), stats: Some(stats.clone()) };
    let lp = h.contiguous()?.apply_op2(&w.contiguous()?, op)?;
    let s = std::mem::take(&mut *stats.lock().unwrap_or_else(|e| e.into_inner()));
    Ok((lp, s))
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
    Ok(super::bf16_gemm::mm(x, &w.to_dtype(x.dtype())?.t()?)?)
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
        let out = by_real!(s.dtype(), "softmax", T => <T as candle_core::WithDType>::to_cpu_storage_owned(softmax_rows(contiguous::<T>(s, l)?, n)));
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
        let dx = by_real!(y.dtype(), "softmax", T => Tensor::from_vec(softmax_rows_bwd(contiguous::<T>(ys, yl)?, contiguous::<T>(gs, gl)?, n), y.shape(), y.device())?);
        Ok(Some(dx))
    }
}

/// RMSNorm y = x · w / sqrt(mean(x²) + eps) over the last dimension (Gemma: × (1 + w)), with
/// its own backward: dx = r·(dy⊙w) − x·r³/H·Σ(dy⊙w⊙x), dw = Σ_rows dy⊙x·r. CPU, f32 and f64.
pub struct RmsNorm {
    pub eps: f64,
    /// Scale by 1 + w (Gemma's norms store offsets from 1).
    pub plus_one: bool,
    /// Round the normalised value to the storage dtype before scaling (Llama's style; Gemma
    /// and OLMo 2 scale in f32 and round once). Only bf16 tells the two apart.
    pub round_first: bool,
}

fn rms_fwd<T: Real>(x: &[T], w: &[T], eps: f64, plus_one: bool, round_first: bool) -> Vec<T> {
    let h = w.len();
    let off = if plus_one { 1.0 } else { 0.0 };
    let mut out = vec![T::from(0.0); x.len()];
    out.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(|(o, x)| {
        let r = 1.0 / (x.iter().map(|v| v.to() * v.to()).sum::<f64>() / h as f64 + eps).sqrt();
        for ((o, xv), wv) in o.iter_mut().zip(x).zip(w) {
            // transformers' Llama rounds the normalised value to the input dtype before scaling by w.
            let normed = if round_first { T::from(xv.to() * r).to() } else { xv.to() * r };
            *o = T::from(normed * (wv.to() + off));
        }
    });
    out
}

fn rms_bwd<T: Real>(x: &[T], w: &[T], dy: &[T], eps: f64, plus_one: bool) -> (Vec<T>, Vec<T>) {
    let h = w.len();
    let off = if plus_one { 1.0 } else { 0.0 };
    let mut dx = vec![T::from(0.0); x.len()];
    let dw = dx
        .par_chunks_mut(h)
        .zip(x.par_chunks(h).zip(dy.par_chunks(h)))
        .fold(
            || vec![0f64; h],
            |mut dw, (dx, (x, dy))| {
                let r = 1.0 / (x.iter().map(|v| v.to() * v.to()).sum::<f64>() / h as f64 + eps).sqrt();
                let dot: f64 = (0..h).map(|j| dy[j].to() * (w[j].to() + off) * x[j].to()).sum();
                let c = r * r * r * dot / h as f64;
                for j in 0..h {
                    dx[j] = T::from(r * dy[j].to() * (w[j].to() + off) - x[j].to() * c);
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
        let out = by_real!(s1.dtype(), "rms_norm", T => {
            <T as candle_core::WithDType>::to_cpu_storage_owned(rms_fwd(contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?, self.eps, self.plus_one, self.round_first))
        });
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
        Ok(by_real!(x.dtype(), "rms_norm", T => {
            let (dx, dw) = rms_bwd(contiguous::<T>(xs, xl)?, contiguous::<T>(ws, wl)?, contiguous::<T>(gs, gl)?, self.eps, self.plus_one);
            (Some(Tensor::from_vec(dx, xshape, dev)?), Some(Tensor::from_vec(dw, wshape, dev)?))
        }))
    }
}

/// The three contiguous CPU slices of a custom op's backward inputs, as `T`.
fn cpu3<T: Real, R>(a: &Tensor, b: &Tensor, c: &Tensor, f: impl FnOnce(&[T], &[T], &[T]) -> R) -> candle_core::Result<R> {
    let (c_, a_, b_) = (c.contiguous()?, a.contiguous()?, b.contiguous()?);
    let (sa, la) = a_.storage_and_layout();
    let (sb, lb) = b_.storage_and_layout();
    let (sc, lc) = c_.storage_and_layout();
    let (Storage::Cpu(sa), Storage::Cpu(sb), Storage::Cpu(sc)) = (&*sa, &*sb, &*sc) else {
        return Err(candle_core::Error::Msg("fused op: CPU only".into()));
    };
    Ok(f(contiguous::<T>(sa, la)?, contiguous::<T>(sb, lb)?, contiguous::<T>(sc, lc)?))
}

/// Elements per parallel task of the element-wise ops.
const ELEMS_PER_TASK: usize = 1 << 14;

/// A gated MLP's activation: act(gate) ⊙ up in one pass, with its own backward
/// (d gate = dy·up·act′(g), d up = dy·act(g)): one output kept instead of candle's three (the
/// activation, its input, the product). SwiGLU's silu or GeGLU's tanh-approximated gelu
/// (`gelu_pytorch_tanh`). CPU, f32 and f64.
pub struct GatedAct {
    pub gelu_tanh: bool,
}

/// [`act`] in f32 through [`exp_nonpos`] (every argument ≤ 0: e^−|g| for silu, e^−2|y| for
/// tanh y), so the loops over it vectorise.
#[inline(always)]
fn act32(g: f32, gelu_tanh: bool) -> (f32, f32) {
    if gelu_tanh {
        const C: f32 = 0.797_884_6; // √(2/π)
        let y = C * (g + 0.044715 * g * g * g);
        let e = exp_nonpos(-2.0 * y.abs());
        let t = ((1.0 - e) / (1.0 + e)).copysign(y);
        (0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * C * (1.0 + 3.0 * 0.044715 * g * g))
    } else {
        let e = exp_nonpos(-g.abs());
        let s = if g >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
        (g * s, s * (1.0 + g * (1.0 - s)))
    }
}

/// act(g) and act′(g).
fn act(g: f64, gelu_tanh: bool) -> (f64, f64) {
    if gelu_tanh {
        const C: f64 = 0.797_884_560_802_865_4; // √(2/π)
        let t = (C * (g + 0.044715 * g * g * g)).tanh();
        (0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * C * (1.0 + 3.0 * 0.044715 * g * g))
    } else {
        let s = 1.0 / (1.0 + (-g).exp());
        (g * s, s * (1.0 + g * (1.0 - s)))
    }
}

fn gated_fwd<T: Real>(g: &[T], u: &[T], gelu_tanh: bool) -> Vec<T> {
    let mut out = vec![T::from(0.0); g.len()];
    out.par_chunks_mut(ELEMS_PER_TASK).zip(g.par_chunks(ELEMS_PER_TASK).zip(u.par_chunks(ELEMS_PER_TASK))).for_each(|(o, (g, u))| {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = T::from(g.act(gelu_tanh).0 * u.to());
        }
    });
    out
}

fn gated_bwd<T: Real>(g: &[T], u: &[T], dy: &[T], gelu_tanh: bool) -> (Vec<T>, Vec<T>) {
    let (mut dg, mut du) = (vec![T::from(0.0); g.len()], vec![T::from(0.0); g.len()]);
    dg.par_chunks_mut(ELEMS_PER_TASK)
        .zip(du.par_chunks_mut(ELEMS_PER_TASK))
        .zip(g.par_chunks(ELEMS_PER_TASK).zip(u.par_chunks(ELEMS_PER_TASK)).zip(dy.par_chunks(ELEMS_PER_TASK)))
        .for_each(|((dg, du), ((g, u), dy))| {
            for i in 0..g.len() {
                let (a, da) = g[i].act(gelu_tanh);
                let d = dy[i].to();
                dg[i] = T::from(d * u[i].to() * da);
                du[i] = T::from(d * a);
            }
        });
    (dg, du)
}

impl CustomOp2 for GatedAct {
    fn name(&self) -> &'static str {
        "gated-act"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            return Err(candle_core::Error::Msg(format!("gated-act: shapes {:?} and {:?}", l1.shape(), l2.shape())));
        }
        let out = by_real!(s1.dtype(), "gated-act", T => <T as candle_core::WithDType>::to_cpu_storage_owned(gated_fwd(contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?, self.gelu_tanh)));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dev, shape) = (g.device(), g.shape());
        let (dg, du) = by_real!(g.dtype(), "gated-act", T => {
            let (a, b) = cpu3::<T, _>(g, u, dy, |g, u, dy| gated_bwd(g, u, dy, self.gelu_tanh))?;
            (Tensor::from_vec(a, shape, dev)?, Tensor::from_vec(b, shape, dev)?)
        });
        Ok((Some(dg), Some(du)))
    }
}

/// Rotary embedding x·cos + rotate_half(x)·sin (as transformers) for x [n, heads, hd] and
/// cos, sin [n, 1, hd], in one pass, with its own backward (dx = dy·cos + rotate_halfᵀ(dy·sin)):
/// no narrow/neg/cat temporaries. cos and sin are constants (no gradient). CPU, f32 and f64.
pub struct Rope;

/// `out[i] = x[i]·cos + sign·x[partner]·sin` per token and head; `transpose` applies the
/// adjoint of rotate_half (the backward), which swaps which half carries the minus sign.
fn rope_apply<T: Real>(x: &[T], cos: &[T], sin: &[T], hd: usize, transpose: bool) -> Vec<T> {
    let half = hd / 2;
    let heads = x.len() / (cos.len() / hd) / hd;
    let mut out = vec![T::from(0.0); x.len()];
    out.par_chunks_mut(heads * hd).zip(x.par_chunks(heads * hd)).enumerate().for_each(|(t, (o, x))| {
        let (c, s) = (&cos[t * hd..(t + 1) * hd], &sin[t * hd..(t + 1) * hd]);
        for (o, x) in o.chunks_mut(hd).zip(x.chunks(hd)) {
            for d in 0..half {
                let (x1, x2) = (x[d].to(), x[d + half].to());
                if transpose {
                    // d x1 = g1·c1 + g2·s2, d x2 = g2·c2 − g1·s1
                    o[d] = T::from(x1 * c[d].to() + x2 * s[d + half].to());
                    o[d + half] = T::from(x2 * c[d + half].to() - x1 * s[d].to());
                } else {
                    o[d] = T::from(x1 * c[d].to() - x2 * s[d].to());
                    o[d + half] = T::from(x2 * c[d + half].to() + x1 * s[d + half].to());
                }
            }
        }
    });
    out
}

impl candle_core::CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, _, hd) = l1.shape().dims3()?;
        if l2.shape().dims() != [n, 1, hd] || l3.shape().dims() != [n, 1, hd] || hd % 2 != 0 {
            return Err(candle_core::Error::Msg(format!("rope: x {:?}, cos {:?}, sin {:?}", l1.shape(), l2.shape(), l3.shape())));
        }
        let out = by_real!(s1.dtype(), "rope", T => {
            <T as candle_core::WithDType>::to_cpu_storage_owned(rope_apply(contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?, contiguous::<T>(s3, l3)?, hd, false))
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let hd = dy.dim(2)?;
        let dx = by_real!(dy.dtype(), "rope", T => Tensor::from_vec(cpu3::<T, _>(dy, cos, sin, |g, c, s| rope_apply(g, c, s, hd, true))?, dy.shape(), dy.device())?);
        Ok((Some(dx), None, None))
    }
}
