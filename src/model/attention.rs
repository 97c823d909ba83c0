//! Attention that never stores the (tokens × tokens) scores: per attention block (a packed
//! pair, or a padded row) and key/value head, queries are processed in tiles against tiles of
//! the keys they may see, with an online softmax, keeping only the output and each row's
//! log-sum-exp; the backward recomputes each tile's probabilities (FlashAttention-2's scheme).
//! It serves every layout (causal prefix, branches blind to each other, padding), sliding
//! windows, grouped-query attention (the query heads of a key/value head share its tiles) and
//! logit soft-capping (Gemma 2: s = c·tanh(r/c) of the scaled score r).
//!
//! Two implementations with the same semantics: a fused CPU kernel (f32/f64, [`FusedAttention`])
//! and a device-generic one from candle ops on any device and dtype ([`RecomputeAttention`]),
//! which runs the forward detached in query chunks and recomputes each chunk in the backward;
//! neither keeps a graph of scores. [`attention_composite`] is the plain reference (scores,
//! mask, softmax, all kept), for tests.
use super::fused::{contiguous, Real};
use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor, D};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Tokens that attend only among themselves (see `decoder::Block`): a causal prefix, then
/// branches that see the prefix and themselves, then padding that sees only itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub start: usize,
    pub len: usize,
    pub prefix: usize,
    /// (start, len) of each branch, relative to the span.
    pub branches: Vec<(usize, usize)>,
}

impl Span {
    /// The key ranges (half-open, span-relative) query `i` may see before windows: the prefix
    /// up to itself, or the prefix and its branch up to itself, or (padding) itself.
    fn key_ranges(&self, i: usize) -> [(usize, usize); 2] {
        if i < self.prefix {
            return [(0, i + 1), (0, 0)];
        }
        for &(s, n) in &self.branches {
            if (s..s + n).contains(&i) {
                return [(0, self.prefix), (s, i + 1)];
            }
        }
        [(i, i + 1), (0, 0)]
    }

    /// Segments of queries that share key ranges: the prefix, each branch, each padding token.
    fn segments(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        if self.prefix > 0 {
            out.push((0, self.prefix));
        }
        let mut end = self.prefix;
        for &(s, n) in &self.branches {
            if n > 0 {
                out.push((s, s + n));
            }
            end = end.max(s + n);
        }
        out.extend((end..self.len).map(|i| (i, i + 1)));
        out
    }
}

/// Where every token of a forward attends: its spans and rope positions (shared by all layers).
#[derive(Debug, Clone, Default)]
pub struct AttnLayout {
    pub spans: Vec<Span>,
    pub positions: Vec<u32>,
}

impl AttnLayout {
    pub fn tokens(&self) -> usize {
        self.positions.len()
    }

    /// Whether query `i` may see key `j` (indices into the forward's tokens).
    pub fn visible(&self, i: usize, j: usize, window: Option<usize>) -> bool {
        let Some(sp) = self.spans.iter().find(|s| (s.start..s.start + s.len).contains(&i)) else { return false };
        if !(sp.start..sp.start + sp.len).contains(&j) {
            return false;
        }
        let (li, lj) = (i - sp.start, j - sp.start);
        let in_range = sp.key_ranges(li).iter().any(|&(a, b)| (a..b).contains(&lj));
        in_range && window.is_none_or(|w| (self.positions[i] as i64 - self.positions[j] as i64) < w as i64)
    }
}

/// Per-layer settings: the factor on q·k, soft-capping of the scaled scores, a sliding window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnOptions {
    pub scale: f64,
    pub softcap: Option<f64>,
    pub window: Option<usize>,
}

/// Attention of q [n, nh, hd] over k, v [n, nkv, hd] under `layout`: [n, nh, hd]. The fused
/// CPU kernel for f32/f64 on the CPU (bf16 there too: widened into it, the output rounded back,
/// as transformers' bf16 attention computes its softmax in f32), else the device-generic
/// recomputing version.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, layout: &Arc<AttnLayout>, opts: AttnOptions) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    if q.device().is_cpu() && q.dtype() == DType::BF16 {
        let wide = |t: &Tensor| t.to_dtype(DType::F32);
        return Ok(attention(&wide(&q)?, &wide(&k)?, &wide(&v)?, layout, opts)?.to_dtype(DType::BF16)?);
    }
    if super::fused::applies(&q) {
        return Ok(q.apply_op3(&k, &v, FusedAttention { layout: layout.clone(), opts, lse: Mutex::new(Vec::new()) })?);
    }
    attention_recompute(&q, &k, &v, layout, opts)
}

/// Query rows per tile (per head) and keys per tile: a tile's scores are g·128 × 256 values
/// (64 × 128 tiles measured ~10% slower on 2,800-token pairs with AVX-512 GEMM).
const Q_TILE: usize = 128;
const K_TILE: usize = 256;

/// The fused CPU kernel (f32/f64); `lse` is filled by the forward for the backward.
pub struct FusedAttention {
    layout: Arc<AttnLayout>,
    opts: AttnOptions,
    /// log Σ exp of each (query head, token) row's scores, [nh][n] flattened, from the forward.
    lse: Mutex<Vec<f64>>,
}

/// Sizes of one call: tokens, query heads, key/value heads, head dim.
#[derive(Clone, Copy)]
struct Dims {
    n: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
}

impl Dims {
    fn g(&self) -> usize {
        self.nh / self.nkv
    }
}

/// `dst[m, n] (=|+=) a[m, k] · b[k, n]` with explicit row/column strides (in elements).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_strided<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: isize,
    acc: bool,
    a: *const T,
    a_rs: isize,
    a_cs: isize,
    b: *const T,
    b_rs: isize,
    b_cs: isize,
) {
    gemm::gemm(m, n, k, dst, 1, dst_rs, acc, a, a_cs, a_rs, b, b_cs, b_rs, T::from(1.0), T::from(1.0), false, false, false, gemm::Parallelism::None);
}

/// One query tile: span-relative rows `r0..r1` (one segment) and its key ranges.
struct QueryTile {
    r0: usize,
    r1: usize,
    keys: Vec<(usize, usize)>,
}

fn query_tiles(sp: &Span) -> Vec<QueryTile> {
    let mut out = Vec::new();
    for (a, b) in sp.segments() {
        for r0 in (a..b).step_by(Q_TILE) {
            let r1 = (r0 + Q_TILE).min(b);
            // Key ranges of the tile's last row cover every row's (rows only grow causally).
            let keys = sp.key_ranges(r1 - 1).into_iter().filter(|(x, y)| y > x).collect();
            out.push(QueryTile { r0, r1, keys });
        }
    }
    out
}

/// What one (span, key/value head) task needs to know about visibility inside a tile.
struct TileMask<'a> {
    pos: &'a [u32],
    window: Option<usize>,
}

impl TileMask<'_> {
    /// Whether span-relative query row `i` sees key `j` (`j` within the row's key ranges, where
    /// only causality and the window remain to check).
    fn sees(&self, i: usize, j: usize) -> bool {
        j <= i && self.window.is_none_or(|w| (self.pos[i] as i64 - self.pos[j] as i64) < w as i64)
    }

    /// Whether every (row, key) of the tile is visible (no per-element mask needed).
    fn all(&self, rows: (usize, usize), keys: (usize, usize)) -> bool {
        let causal = keys.1 <= rows.0 + 1;
        let in_window = || {
            let w = self.window.expect("checked") as i64;
            let max_q = self.pos[rows.0..rows.1].iter().max().copied().unwrap_or(0) as i64;
            let min_k = self.pos[keys.0..keys.1].iter().min().copied().unwrap_or(0) as i64;
            max_q - min_k < w
        };
        causal && (self.window.is_none() || in_window())
    }

    /// Whether no (row, key) of the tile is visible under the window (the tile is skipped).
    fn none(&self, rows: (usize, usize), keys: (usize, usize)) -> bool {
        let Some(w) = self.window else { return false };
        let min_q = self.pos[rows.0..rows.1].iter().min().copied().unwrap_or(0) as i64;
        let max_k = self.pos[keys.0..keys.1].iter().max().copied().unwrap_or(0) as i64;
        min_q - max_k >= w as i64
    }
}

/// Scores of a tile, in place: soft-capped, masked (−∞) where a key is hidden. Returns the
/// tanh values when soft-capping (the backward's derivative needs them).
fn finish_scores<T: Real>(s: &mut [T], rows: (usize, usize), keys: (usize, usize), g: usize, mask: &TileMask, softcap: Option<f64>) {
    let (tq, tk) = (rows.1 - rows.0, keys.1 - keys.0);
    if let Some(c) = softcap {
        for x in s.iter_mut() {
            *x = T::from(c * (x.to() / c).tanh());
        }
    }
    if !mask.all(rows, keys) {
        for h in 0..g {
            for r in 0..tq {
                let row = &mut s[(h * tq + r) * tk..(h * tq + r + 1) * tk];
                for (c, x) in row.iter_mut().enumerate() {
                    if !mask.sees(rows.0 + r, keys.0 + c) {
                        *x = T::from(f64::NEG_INFINITY);
                    }
                }
            }
        }
    }
}

/// The tile's query rows for the g heads of key/value head `kv`, scaled: [g·tq, hd].
fn gather_q<T: Real>(q: &[T], d: Dims, start: usize, kv: usize, rows: (usize, usize), scale: f64) -> Vec<T> {
    let (tq, g, hd) = (rows.1 - rows.0, d.g(), d.hd);
    let mut out = vec![T::from(0.0); g * tq * hd];
    for h in 0..g {
        for r in 0..tq {
            let src = ((start + rows.0 + r) * d.nh + kv * g + h) * hd;
            for (o, x) in out[(h * tq + r) * hd..][..hd].iter_mut().zip(&q[src..src + hd]) {
                *o = T::from(x.to() * scale);
            }
        }
    }
    out
}

/// Forward of one (span, kv head): the outputs [g][len][hd] and row log-sum-exps [g][len].
#[allow(clippy::too_many_arguments)]
fn span_forward<T: Real>(q: &[T], k: &[T], v: &[T], d: Dims, sp: &Span, kv: usize, pos: &[u32], opts: AttnOptions) -> (Vec<T>, Vec<f64>) {
    let (g, hd, len) = (d.g(), d.hd, sp.len);
    let kv_rs = (d.nkv * hd) as isize;
    let mask = TileMask { pos, window: opts.window };
    let mut out = vec![T::from(0.0); g * len * hd];
    let mut lse = vec![0f64; g * len];
    for t in query_tiles(sp) {
        let (rows, tq) = ((t.r0, t.r1), t.r1 - t.r0);
        let qt = gather_q(q, d, sp.start, kv, rows, opts.scale);
        let mut o = vec![T::from(0.0); g * tq * hd];
        let (mut m, mut l) = (vec![f64::NEG_INFINITY; g * tq], vec![0f64; g * tq]);
        let mut s = vec![T::from(0.0); g * tq * K_TILE];
        for &(ka, kb) in &t.keys {
            for k0 in (ka..kb).step_by(K_TILE) {
                let keys = (k0, (k0 + K_TILE).min(kb));
                if mask.none(rows, keys) {
                    continue;
                }
                let tk = keys.1 - keys.0;
                let kp = k[((sp.start + k0) * d.nkv + kv) * hd..].as_ptr();
                // SAFETY: qt is (g·tq)×hd; K rows k0..k0+tk of head kv are tk×hd at row stride nkv·hd; s holds (g·tq)×tk.
                unsafe { gemm_strided(g * tq, tk, hd, s.as_mut_ptr(), tk as isize, false, qt.as_ptr(), hd as isize, 1, kp, 1, kv_rs) };
                let s = &mut s[..g * tq * tk];
                finish_scores(s, rows, keys, g, &mask, opts.softcap);
                for (r, row) in s.chunks_mut(tk).enumerate() {
                    let bmax = row.iter().fold(T::from(f64::NEG_INFINITY), |a, &x| if x > a { x } else { a }).to();
                    if bmax == f64::NEG_INFINITY {
                        row.iter_mut().for_each(|x| *x = T::from(0.0));
                        continue;
                    }
                    let new_m = m[r].max(bmax);
                    let corr = (m[r] - new_m).exp();
                    let sum = T::exp_shifted(row, T::from(new_m));
                    l[r] = l[r] * corr + sum;
                    m[r] = new_m;
                    if corr != 1.0 {
                        o[r * hd..(r + 1) * hd].iter_mut().for_each(|x| *x = T::from(x.to() * corr));
                    }
                }
                let vp = v[((sp.start + k0) * d.nkv + kv) * hd..].as_ptr();
                // SAFETY: s is (g·tq)×tk, V rows are tk×hd at row stride nkv·hd, o is (g·tq)×hd.
                unsafe { gemm_strided(g * tq, hd, tk, o.as_mut_ptr(), hd as isize, true, s.as_ptr(), tk as isize, 1, vp, kv_rs, 1) };
            }
        }
        for h in 0..g {
            for r in 0..tq {
                let row = h * tq + r;
                let inv = 1.0 / l[row];
                let dst = (h * len + t.r0 + r) * hd;
                for (x, y) in out[dst..dst + hd].iter_mut().zip(&o[row * hd..(row + 1) * hd]) {
                    *x = T::from(y.to() * inv);
                }
                lse[h * len + t.r0 + r] = m[row] + l[row].ln();
            }
        }
    }
    (out, lse)
}

/// Backward of one (span, kv head): dq [g][len][hd], dk [len][hd], dv [len][hd].
#[allow(clippy::too_many_arguments)]
fn span_backward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    y: &[T],
    dy: &[T],
    lse: &[f64],
    d: Dims,
    sp: &Span,
    kv: usize,
    pos: &[u32],
    opts: AttnOptions,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (g, hd, len) = (d.g(), d.hd, sp.len);
    let kv_rs = (d.nkv * hd) as isize;
    let mask = TileMask { pos, window: opts.window };
    let (mut dq, mut dk, mut dv) = (vec![T::from(0.0); g * len * hd], vec![T::from(0.0); len * hd], vec![T::from(0.0); len * hd]);
    for t in query_tiles(sp) {
        let (rows, tq) = ((t.r0, t.r1), t.r1 - t.r0);
        let qt = gather_q(q, d, sp.start, kv, rows, opts.scale);
        let dyt = gather_q(dy, d, sp.start, kv, rows, 1.0);
        // D_r = dO_r · O_r, and each row's log-sum-exp.
        let mut dsum = vec![0f64; g * tq];
        let mut rl = vec![0f64; g * tq];
        for h in 0..g {
            for r in 0..tq {
                let at = ((sp.start + t.r0 + r) * d.nh + kv * g + h) * hd;
                dsum[h * tq + r] = (0..hd).map(|c| dy[at + c].to() * y[at + c].to()).sum();
                rl[h * tq + r] = lse[(kv * g + h) * d.n + sp.start + t.r0 + r];
            }
        }
        let mut dqt = vec![T::from(0.0); g * tq * hd];
        let mut p = vec![T::from(0.0); g * tq * K_TILE];
        let mut dp = vec![T::from(0.0); g * tq * K_TILE];
        for &(ka, kb) in &t.keys {
            for k0 in (ka..kb).step_by(K_TILE) {
                let keys = (k0, (k0 + K_TILE).min(kb));
                if mask.none(rows, keys) {
                    continue;
                }
                let tk = keys.1 - keys.0;
                let (p, dp) = (&mut p[..g * tq * tk], &mut dp[..g * tq * tk]);
                let kp = k[((sp.start + k0) * d.nkv + kv) * hd..].as_ptr();
                let vp = v[((sp.start + k0) * d.nkv + kv) * hd..].as_ptr();
                // SAFETY (all four products): tiles as in span_forward; dk, dv are len×hd, dqt is (g·tq)×hd.
                unsafe {
                    gemm_strided(g * tq, tk, hd, p.as_mut_ptr(), tk as isize, false, qt.as_ptr(), hd as isize, 1, kp, 1, kv_rs);
                    gemm_strided(g * tq, tk, hd, dp.as_mut_ptr(), tk as isize, false, dyt.as_ptr(), hd as isize, 1, vp, 1, kv_rs);
                }
                // p holds the raw scaled scores r; the soft-capping derivative needs tanh(r/c).
                let raw: Option<Vec<T>> = opts.softcap.map(|_| p.to_vec());
                finish_scores(p, rows, keys, g, &mask, opts.softcap);
                let scale = T::from(opts.scale);
                for (ri, (prow, dprow)) in p.chunks_mut(tk).zip(dp.chunks_mut(tk)).enumerate() {
                    // P = exp(S − lse); dS = P ∘ (dP − D), times the soft-capping derivative.
                    T::exp_shifted(prow, T::from(rl[ri]));
                    let dsm = T::from(dsum[ri]);
                    for (x, dx) in prow.iter().zip(dprow.iter_mut()) {
                        *dx = *x * (*dx - dsm) * scale;
                    }
                    if let (Some(cap), Some(raw)) = (opts.softcap, &raw) {
                        for (dx, r) in dprow.iter_mut().zip(&raw[ri * tk..(ri + 1) * tk]) {
                            let th = (r.to() / cap).tanh();
                            *dx = T::from(dx.to() * (1.0 - th * th));
                        }
                    }
                }
                unsafe {
                    // dv[keys] += pᵀ · dO
                    gemm_strided(
                        tk,
                        hd,
                        g * tq,
                        dv[k0 * hd..].as_mut_ptr(),
                        hd as isize,
                        true,
                        p.as_ptr(),
                        1,
                        tk as isize,
                        dyt.as_ptr(),
                        hd as isize,
                        1,
                    );
                    // dq += dS · K (dS already carries the scale)
                    gemm_strided(g * tq, hd, tk, dqt.as_mut_ptr(), hd as isize, true, dp.as_ptr(), tk as isize, 1, kp, kv_rs, 1);
                }
                // dk[keys] += dSᵀ · q (qt is scaled; dS carries the scale once: undo one).
                let inv = T::from(1.0 / opts.scale);
                dp.iter_mut().for_each(|x| *x *= inv);
                unsafe {
                    gemm_strided(
                        tk,
                        hd,
                        g * tq,
                        dk[k0 * hd..].as_mut_ptr(),
                        hd as isize,
                        true,
                        dp.as_ptr(),
                        1,
                        tk as isize,
                        qt.as_ptr(),
                        hd as isize,
                        1,
                    )
                };
            }
        }
        for h in 0..g {
            for r in 0..tq {
                let dst = (h * len + t.r0 + r) * hd;
                dq[dst..dst + hd].copy_from_slice(&dqt[(h * tq + r) * hd..(h * tq + r + 1) * hd]);
            }
        }
    }
    (dq, dk, dv)
}

impl FusedAttention {
    fn dims(&self, ql: &Layout, kl: &Layout) -> candle_core::Result<Dims> {
        let (n, nh, hd) = ql.shape().dims3()?;
        let (n2, nkv, hd2) = kl.shape().dims3()?;
        if n != n2 || hd != hd2 || nkv == 0 || nh % nkv != 0 || n != self.layout.tokens() {
            return Err(candle_core::Error::Msg(format!(
                "attention: q {:?}, k {:?}, layout of {} tokens",
                ql.shape(),
                kl.shape(),
                self.layout.tokens()
            )));
        }
        Ok(Dims { n, nh, nkv, hd })
    }

    fn fwd<T: Real>(&self, q: &[T], k: &[T], v: &[T], d: Dims) -> Vec<T> {
        let tasks: Vec<(usize, usize)> = (0..self.layout.spans.len()).flat_map(|s| (0..d.nkv).map(move |h| (s, h))).collect();
        let pos = &self.layout.positions;
        let results: Vec<(Vec<T>, Vec<f64>)> = tasks
            .par_iter()
            .map(|&(s, kv)| {
                let sp = &self.layout.spans[s];
                span_forward(q, k, v, d, sp, kv, &pos[sp.start..sp.start + sp.len], self.opts)
            })
            .collect();
        let g = d.g();
        let mut y = vec![T::from(0.0); d.n * d.nh * d.hd];
        let mut lse = vec![0f64; d.nh * d.n];
        for (&(s, kv), (out, l)) in tasks.iter().zip(results) {
            let sp = &self.layout.spans[s];
            for h in 0..g {
                let head = kv * g + h;
                for r in 0..sp.len {
                    let dst = ((sp.start + r) * d.nh + head) * d.hd;
                    y[dst..dst + d.hd].copy_from_slice(&out[(h * sp.len + r) * d.hd..][..d.hd]);
                    lse[head * d.n + sp.start + r] = l[h * sp.len + r];
                }
            }
        }
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        y
    }

    #[allow(clippy::type_complexity)]
    fn bwd_impl<T: Real>(&self, q: &[T], k: &[T], v: &[T], y: &[T], dy: &[T], d: Dims) -> (Vec<T>, Vec<T>, Vec<T>) {
        let lse = self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let tasks: Vec<(usize, usize)> = (0..self.layout.spans.len()).flat_map(|s| (0..d.nkv).map(move |h| (s, h))).collect();
        let pos = &self.layout.positions;
        let results: Vec<_> = tasks
            .par_iter()
            .map(|&(s, kv)| {
                let sp = &self.layout.spans[s];
                span_backward(q, k, v, y, dy, &lse, d, sp, kv, &pos[sp.start..sp.start + sp.len], self.opts)
            })
            .collect();
        let g = d.g();
        let (mut dq, mut dk, mut dv) = (vec![T::from(0.0); q.len()], vec![T::from(0.0); k.len()], vec![T::from(0.0); v.len()]);
        for (&(s, kv), (gq, gk, gv)) in tasks.iter().zip(results) {
            let sp = &self.layout.spans[s];
            for r in 0..sp.len {
                let dst = ((sp.start + r) * d.nkv + kv) * d.hd;
                dk[dst..dst + d.hd].copy_from_slice(&gk[r * d.hd..][..d.hd]);
                dv[dst..dst + d.hd].copy_from_slice(&gv[r * d.hd..][..d.hd]);
                for h in 0..g {
                    let dst = ((sp.start + r) * d.nh + kv * g + h) * d.hd;
                    dq[dst..dst + d.hd].copy_from_slice(&gq[(h * sp.len + r) * d.hd..][..d.hd]);
                }
            }
        }
        (dq, dk, dv)
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
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
        let d = self.dims(l1, l2)?;
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(self.fwd(contiguous::<f32>(s1, l1)?, contiguous::<f32>(s2, l2)?, contiguous::<f32>(s3, l3)?, d)),
            DType::F64 => CpuStorage::F64(self.fwd(contiguous::<f64>(s1, l1)?, contiguous::<f64>(s2, l2)?, contiguous::<f64>(s3, l3)?, d)),
            dt => return Err(candle_core::Error::Msg(format!("fused attention: unsupported dtype {dt:?}"))),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(q.layout(), k.layout())?;
        let dy = dy.contiguous()?;
        let all = [q, k, v, y, &dy];
        let guards: Vec<_> = all.iter().map(|t| t.storage_and_layout()).collect();
        let cpu: Vec<(&CpuStorage, &Layout)> = guards
            .iter()
            .map(|(s, l)| match &**s {
                Storage::Cpu(c) => Ok((c, *l)),
                _ => Err(candle_core::Error::Msg("fused attention: CPU only".into())),
            })
            .collect::<candle_core::Result<_>>()?;
        let dev = q.device();
        macro_rules! run {
            ($t:ty) => {{
                let s = |i: usize| contiguous::<$t>(cpu[i].0, cpu[i].1);
                let (gq, gk, gv) = self.bwd_impl(s(0)?, s(1)?, s(2)?, s(3)?, s(4)?, d);
                (Tensor::from_vec(gq, q.shape(), dev)?, Tensor::from_vec(gk, k.shape(), dev)?, Tensor::from_vec(gv, v.shape(), dev)?)
            }};
        }
        let (gq, gk, gv) = match q.dtype() {
            DType::F32 => run!(f32),
            _ => run!(f64),
        };
        Ok((Some(gq), Some(gk), Some(gv)))
    }
}

// ---- the device-generic version: candle ops, chunk by chunk, recomputed in the backward ----

/// Score elements per chunk of the device-generic path (f32: 32 MiB).
const CHUNK_SCORES: usize = 8 << 20;

/// Additive mask [spans, 1, 1, rows, len] for query rows `r0..r0 + rows` of equal-length spans.
fn mask_rows(layout: &AttnLayout, spans: &[Span], r0: usize, rows: usize, window: Option<usize>, dev: &candle_core::Device) -> Result<Tensor> {
    let len = spans[0].len;
    let mut m = vec![f32::NEG_INFINITY; spans.len() * rows * len];
    for (b, sp) in spans.iter().enumerate() {
        for r in 0..rows {
            for j in 0..len {
                if layout.visible(sp.start + r0 + r, sp.start + j, window) {
                    m[(b * rows + r) * len + j] = 0.0;
                }
            }
        }
    }
    Ok(Tensor::from_vec(m, (spans.len(), 1, 1, rows, len), dev)?)
}

/// Scores, softmax and log-sum-exps run in f32 for f32/bf16/f16 (as transformers' eager
/// attention upcasts), in f64 for f64.
fn acc(dt: DType) -> DType {
    super::ops::accum_dtype(dt)
}

/// Runs of consecutive equal-length spans (computed as one batched attention each).
fn groups(layout: &AttnLayout) -> Vec<&[Span]> {
    let mut out: Vec<&[Span]> = Vec::new();
    let mut i = 0;
    while i < layout.spans.len() {
        let j = (i..layout.spans.len()).find(|&j| layout.spans[j].len != layout.spans[i].len).unwrap_or(layout.spans.len());
        out.push(&layout.spans[i..j]);
        i = j;
    }
    out
}

/// One chunk of one group: q [b, nkv, g·c, hd], k and v [b, nkv, len, hd], scores in f32.
struct Chunk {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// The scaled scores before soft-capping (f32 [b, nkv, g, c, len]).
    raw: Tensor,
    /// After soft-capping and masking.
    s: Tensor,
}

/// Rows per chunk for a group of b spans of length len.
fn chunk_rows(b: usize, nh: usize, len: usize) -> usize {
    (CHUNK_SCORES / (b * nh * len).max(1)).clamp(1, len)
}

/// The tokens of a group's spans, rows r0..r0+c, heads as [b, nkv, g·c, hd] (or [b, nkv, len, hd] for k/v).
fn group_rows(x: &Tensor, spans: &[Span], r0: usize, c: usize, nkv: usize) -> Result<Tensor> {
    let (b, len) = (spans.len(), spans[0].len);
    let (_, h, hd) = x.dims3()?;
    let x = x.narrow(0, spans[0].start, b * len)?.reshape((b, len, h, hd))?.narrow(1, r0, c)?;
    let g = h / nkv;
    Ok(x.reshape((b, c, nkv, g, hd))?.permute((0, 2, 3, 1, 4))?.contiguous()?.reshape((b, nkv, g * c, hd))?)
}

#[allow(clippy::too_many_arguments)]
fn chunk(q: &Tensor, k: &Tensor, v: &Tensor, layout: &AttnLayout, spans: &[Span], r0: usize, c: usize, opts: AttnOptions) -> Result<Chunk> {
    let (b, len) = (spans.len(), spans[0].len);
    let nkv = k.dim(1)?;
    let g = q.dim(1)? / nkv;
    let qc = group_rows(q, spans, r0, c, nkv)?;
    let (kc, vc) = (group_rows(k, spans, 0, len, nkv)?, group_rows(v, spans, 0, len, nkv)?);
    let raw = (super::bf16_gemm::mm(&qc, &kc.t()?)?.to_dtype(acc(q.dtype()))? * opts.scale)?.reshape((b, nkv, g, c, len))?;
    let capped = match opts.softcap {
        Some(cap) => ((&raw / cap)?.tanh()? * cap)?,
        None => raw.clone(),
    };
    let s = capped.broadcast_add(&mask_rows(layout, spans, r0, c, opts.window, q.device())?.to_dtype(acc(q.dtype()))?)?;
    Ok(Chunk { q: qc, k: kc, v: vc, raw, s })
}

/// A group chunk [b, nkv, g·c, hd] back in token-major order: [b, c, nh, hd].
fn ungroup(x: &Tensor, c: usize) -> Result<Tensor> {
    let (b, nkv, gc, hd) = x.dims4()?;
    let g = gc / c;
    Ok(x.reshape((b, nkv, g, c, hd))?.permute((0, 3, 1, 2, 4))?.contiguous()?.reshape((b, c, nkv * g, hd))?)
}

/// Forward without a graph: the output [n, nh, hd] and each row's log-sum-exp (f32 [n, nh]).
fn recompute_forward(q: &Tensor, k: &Tensor, v: &Tensor, layout: &AttnLayout, opts: AttnOptions) -> Result<(Tensor, Tensor)> {
    let (n, nh, hd) = q.dims3()?;
    let mut ys = Vec::new();
    let mut lses = Vec::new();
    for spans in groups(layout) {
        let (b, len) = (spans.len(), spans[0].len);
        let c_max = chunk_rows(b, nh, len);
        let (mut yg, mut lg) = (Vec::new(), Vec::new());
        for r0 in (0..len).step_by(c_max) {
            let c = c_max.min(len - r0);
            let ch = chunk(q, k, v, layout, spans, r0, c, opts)?;
            let max = ch.s.max_keepdim(D::Minus1)?;
            let e = ch.s.broadcast_sub(&max)?.exp()?;
            let sum = e.sum_keepdim(D::Minus1)?;
            let p = e.broadcast_div(&sum)?.to_dtype(q.dtype())?;
            let nkv = ch.k.dim(1)?;
            let y = super::bf16_gemm::mm(&p.reshape((b, nkv, nh / nkv * c, len))?, &ch.v)?; // [b, nkv, g·c, hd]
            yg.push(ungroup(&y, c)?); // [b, c, nh, hd]
            let lse = (max + sum.log()?)?.squeeze(D::Minus1)?; // [b, nkv, g, c]
            lg.push(lse.permute((0, 3, 1, 2))?.contiguous()?.reshape((b, c, nh))?);
        }
        ys.push(Tensor::cat(&yg, 1)?.reshape((b * len, nh, hd))?);
        lses.push(Tensor::cat(&lg, 1)?.reshape((b * len, nh))?);
    }
    let y = Tensor::cat(&ys, 0)?;
    let lse = Tensor::cat(&lses, 0)?;
    anyhow::ensure!(y.dim(0)? == n, "attention layout does not cover its tokens");
    Ok((y, lse))
}

pub fn attention_recompute(q: &Tensor, k: &Tensor, v: &Tensor, layout: &Arc<AttnLayout>, opts: AttnOptions) -> Result<Tensor> {
    let (y, lse) = recompute_forward(&q.detach(), &k.detach(), &v.detach(), layout, opts)?;
    let op = RecomputeAttention { layout: layout.clone(), opts, y: y.clone(), lse };
    Ok(q.apply_op3(k, v, op)?)
}

/// Returns the detached forward's output; its backward recomputes each chunk's probabilities
/// from q, k and the saved log-sum-exps with candle ops on detached tensors (no graph).
struct RecomputeAttention {
    layout: Arc<AttnLayout>,
    opts: AttnOptions,
    y: Tensor,
    lse: Tensor,
}

impl RecomputeAttention {
    fn stored<S>(&self, f: impl FnOnce(&Storage, &Layout) -> candle_core::Result<S>) -> candle_core::Result<(S, Shape)> {
        let (s, l) = self.y.storage_and_layout();
        Ok((f(&s, l)?, self.y.shape().clone()))
    }
}

impl CustomOp3 for RecomputeAttention {
    fn name(&self) -> &'static str {
        "recompute-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.stored(|s, l| match s {
            Storage::Cpu(c) => c.try_clone(l),
            _ => Err(candle_core::Error::Msg("attention output on another device".into())),
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.stored(|s, l| match s {
            Storage::Cuda(c) => c.try_clone(l),
            _ => Err(candle_core::Error::Msg("attention output on another device".into())),
        })
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(&q.detach(), &k.detach(), &v.detach(), &dy.detach()).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
    }
}

impl RecomputeAttention {
    #[allow(clippy::type_complexity)]
    fn backward(&self, q: &Tensor, k: &Tensor, v: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, nh, hd) = q.dims3()?;
        let nkv = k.dim(1)?;
        let g = nh / nkv;
        let (dt, opts) = (q.dtype(), self.opts);
        let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
        for spans in groups(&self.layout) {
            let (b, len, start) = (spans.len(), spans[0].len, spans[0].start);
            let c_max = chunk_rows(b, nh, len);
            let mut dk = Tensor::zeros((b, nkv, len, hd), acc(dt), q.device())?;
            let mut dv = dk.clone();
            let mut dq_rows = Vec::new();
            for r0 in (0..len).step_by(c_max) {
                let c = c_max.min(len - r0);
                let ch = chunk(q, k, v, &self.layout, spans, r0, c, opts)?;
                // Saved log-sum-exps of these rows, as [b, nkv, g, c, 1].
                let lse = self.lse.narrow(0, start, b * len)?.reshape((b, len, nkv, g))?.narrow(1, r0, c)?.permute((0, 2, 3, 1))?.unsqueeze(4)?;
                let p = ch.s.broadcast_sub(&lse)?.exp()?; // f32 [b, nkv, g, c, len]
                let dyc = group_rows(dy, spans, r0, c, nkv)?; // [b, nkv, g·c, hd]
                let yc = group_rows(&self.y, spans, r0, c, nkv)?;
                let dsum = (dyc.to_dtype(acc(dt))? * yc.to_dtype(acc(dt))?)?.sum_keepdim(D::Minus1)?.reshape((b, nkv, g, c, 1))?;
                let dp = super::bf16_gemm::mm(&dyc, &ch.v.t()?)?.to_dtype(acc(dt))?.reshape((b, nkv, g, c, len))?;
                let mut ds = (&p * dp.broadcast_sub(&dsum)?)?;
                if let Some(cap) = opts.softcap {
                    let th = (&ch.raw / cap)?.tanh()?;
                    ds = (ds * (1.0 - th.sqr()?)?)?;
                }
                let ds = (ds * opts.scale)?.reshape((b, nkv, g * c, len))?;
                let p = p.reshape((b, nkv, g * c, len))?;
                dv = (dv + super::bf16_gemm::mm(&p.to_dtype(dt)?.t()?, &dyc)?.to_dtype(acc(dt))?)?;
                dk = (dk + ds.to_dtype(dt)?.t()?.matmul(&ch.q)?.to_dtype(acc(dt))?)?;
                let dq = ds.to_dtype(dt)?.matmul(&ch.k)?; // [b, nkv, g·c, hd]
                dq_rows.push(ungroup(&dq, c)?);
            }
            dqs.push(Tensor::cat(&dq_rows, 1)?.reshape((b * len, nh, hd))?);
            let tokens = |x: Tensor| -> Result<Tensor> { Ok(x.permute((0, 2, 1, 3))?.contiguous()?.reshape((b * len, nkv, hd))?.to_dtype(dt)?) };
            dks.push(tokens(dk)?);
            dvs.push(tokens(dv)?);
        }
        Ok((Some(Tensor::cat(&dqs, 0)?), Some(Tensor::cat(&dks, 0)?), Some(Tensor::cat(&dvs, 0)?)))
    }
}

/// Attention from candle's differentiable ops with the whole (tokens × tokens) scores and mask
/// per span (autograd keeps them): the reference the other two are tested against.
pub fn attention_composite(q: &Tensor, k: &Tensor, v: &Tensor, layout: &AttnLayout, opts: AttnOptions) -> Result<Tensor> {
    let (_, nh, hd) = q.dims3()?;
    let nkv = k.dim(1)?;
    let g = nh / nkv;
    let mut ys = Vec::new();
    for spans in groups(layout) {
        let (b, len) = (spans.len(), spans[0].len);
        let (qc, kc, vc) = (group_rows(q, spans, 0, len, nkv)?, group_rows(k, spans, 0, len, nkv)?, group_rows(v, spans, 0, len, nkv)?);
        let mut s = (qc.matmul(&kc.t()?)?.to_dtype(acc(q.dtype()))? * opts.scale)?.reshape((b, nkv, g, len, len))?;
        if let Some(cap) = opts.softcap {
            s = ((s / cap)?.tanh()? * cap)?;
        }
        let s = s.broadcast_add(&mask_rows(layout, spans, 0, len, opts.window, q.device())?.to_dtype(acc(q.dtype()))?)?;
        let p = super::ops::softmax_last_composite(&s)?.to_dtype(q.dtype())?.reshape((b, nkv, g * len, len))?;
        ys.push(ungroup(&p.matmul(&vc)?, len)?.reshape((b * len, nh, hd))?);
    }
    Ok(Tensor::cat(&ys, 0)?)
}
