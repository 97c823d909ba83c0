//! bf16 matrix multiplication on the CPU: C [m, n] (f32) = A [m, k] · B [k, n] for bf16 A and
//! B given by element strides (as the `gemm` crate takes them, so every transpose is one call),
//! products summed in f32. Where the CPU has AVX-512 BF16, a packed-panel kernel on
//! `vdpbf16ps` (each instruction multiplies 16 pairs of bf16 and adds them into 16 f32 lanes)
//! runs on every rayon thread; elsewhere the operands are widened to f32 and multiplied by
//! `gemm`. Both give each dot product summed in f32 over exact bf16 products.
use half::bf16;
use rayon::prelude::*;

/// The `gemm` crate's parallelism for the current rayon pool (every GEMM of the model's kernels).
pub(crate) fn par() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// A bf16 matrix operand: element (i, j) is at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub struct Operand {
    pub ptr: *const bf16,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: an operand is only read, and the caller keeps its storage alive for the call.
unsafe impl Send for Operand {}
unsafe impl Sync for Operand {}

impl Operand {
    /// SAFETY: (i, j) must lie inside the caller's storage.
    #[inline(always)]
    unsafe fn at(&self, i: usize, j: usize) -> u16 {
        (*self.ptr.offset(i as isize * self.rs + j as isize * self.cs)).to_bits()
    }

    /// The element bits' address (a method, so closures capture the whole `Sync` operand).
    fn bits(&self) -> *const u16 {
        self.ptr as *const u16
    }
}

/// Whether the fast kernel runs on this CPU.
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// C = A·B (`accumulate`: C += A·B) with C row-major [m, n] f32.
///
/// # Safety
/// `a` must address m×k elements and `b` k×n elements inside live storage; `c` holds m·n.
pub unsafe fn matmul(m: usize, n: usize, k: usize, a: Operand, b: Operand, c: &mut [f32], accumulate: bool) {
    assert!(c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        return avx512::matmul(m, n, k, a, b, c, accumulate);
    }
    widened(m, n, k, a, b, c, accumulate)
}

/// The fallback: both operands widened to f32 (exactly), one f32 GEMM.
unsafe fn widened(m: usize, n: usize, k: usize, a: Operand, b: Operand, c: &mut [f32], accumulate: bool) {
    let wa: Vec<f32> = (0..m * k).map(|x| bf16::from_bits(a.at(x / k, x % k)).to_f32()).collect();
    let wb: Vec<f32> = (0..k * n).map(|x| bf16::from_bits(b.at(x / n, x % n)).to_f32()).collect();
    gemm::gemm(
        m,
        n,
        k,
        c.as_mut_ptr(),
        1,
        n as isize,
        accumulate,
        wa.as_ptr(),
        1,
        k as isize,
        wb.as_ptr(),
        1,
        n as isize,
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        par(),
    );
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Operand;
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    /// Rows per micro-tile, and columns (two registers of 16 f32).
    const MR: usize = 8;
    const NR: usize = 32;
    /// k per packed block (pairs of k are one 32-bit lane), and columns per task (one task
    /// packs its B panel once per k block and sweeps every row group of the shared packed A).
    const KC: usize = 512;
    const NC: usize = 256;

    /// Lanes l0..l0+count of `x` (lane l, depth kk at `x + l·ls + kk·ks`: rows of A or columns
    /// of B), k in k0..k0+kc, packed in groups of `width` lanes: for each group and pair p of k,
    /// `width` 32-bit lanes x(l, k0+2p) | x(l, k0+2p+1) << 16 (the pair `vdpbf16ps` multiplies);
    /// lanes and k past the edge are zero. The two layouts the decoder gives (pairs adjacent in
    /// memory, or lanes adjacent) copy whole words or interleave two rows; others go element by
    /// element.
    #[allow(clippy::too_many_arguments)]
    unsafe fn pack(width: usize, l0: usize, count: usize, k0: usize, kc: usize, x: *const u16, ls: isize, ks: isize, out: &mut [u32]) {
        let kp = kc.div_ceil(2);
        for g in 0..count.div_ceil(width) {
            let lanes = width.min(count - g * width);
            let dst = &mut out[g * kp * width..(g + 1) * kp * width];
            if lanes < width {
                dst.fill(0);
            }
            let base = x.offset((l0 + g * width) as isize * ls + k0 as isize * ks);
            if ks == 1 {
                for lane in 0..lanes {
                    let row = base.offset(lane as isize * ls);
                    for p in 0..kc / 2 {
                        dst[p * width + lane] = (row.add(2 * p) as *const u32).read_unaligned();
                    }
                    if kc % 2 == 1 {
                        dst[(kp - 1) * width + lane] = *row.add(kc - 1) as u32;
                    }
                }
            } else if ls == 1 {
                for p in 0..kp {
                    let r0 = std::slice::from_raw_parts(base.offset(2 * p as isize * ks), lanes);
                    let d = &mut dst[p * width..p * width + lanes];
                    if 2 * p + 1 < kc {
                        let r1 = std::slice::from_raw_parts(base.offset((2 * p + 1) as isize * ks), lanes);
                        for ((d, &lo), &hi) in d.iter_mut().zip(r0).zip(r1) {
                            *d = lo as u32 | (hi as u32) << 16;
                        }
                    } else {
                        for (d, &lo) in d.iter_mut().zip(r0) {
                            *d = lo as u32;
                        }
                    }
                }
            } else {
                for lane in 0..lanes {
                    for p in 0..kp {
                        let at = |kk: usize| *base.offset(lane as isize * ls + kk as isize * ks) as u32;
                        dst[p * width + lane] = at(2 * p) | if 2 * p + 1 < kc { at(2 * p + 1) << 16 } else { 0 };
                    }
                }
            }
        }
    }

    /// One MR×NR tile: acc = (C or 0) + Σ_p a_pair · b_pair, stored back into C's valid part.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile(kp: usize, a: *const u32, b: *const u32, c: *mut f32, ldc: usize, rows: usize, cols: usize, load: bool) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let (m0, m1) = (
            if cols >= 16 { 0xFFFFu16 } else { ((1u32 << cols) - 1) as u16 },
            if cols >= 32 {
                0xFFFFu16
            } else if cols > 16 {
                ((1u32 << (cols - 16)) - 1) as u16
            } else {
                0
            },
        );
        if load {
            for (r, row) in acc.iter_mut().enumerate().take(rows) {
                row[0] = _mm512_maskz_loadu_ps(m0, c.add(r * ldc));
                row[1] = _mm512_maskz_loadu_ps(m1, c.add(r * ldc + 16));
            }
        }
        for p in 0..kp {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR) as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16) as *const _));
            let ap = a.add(p * MR);
            for (r, row) in acc.iter_mut().enumerate() {
                let ar: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], ar, b0);
                row[1] = _mm512_dpbf16_ps(row[1], ar, b1);
            }
        }
        for (r, row) in acc.iter().enumerate().take(rows) {
            _mm512_mask_storeu_ps(c.add(r * ldc), m0, row[0]);
            _mm512_mask_storeu_ps(c.add(r * ldc + 16), m1, row[1]);
        }
    }

    /// The R×4 block of dot products x_r · y_c over k contiguous bf16 of each row (R rows of A,
    /// four rows of a weight stored row by row), summed in f32: for few rows of A, where packing
    /// the weight would cost more than the products (decoding steps). Each weight row is loaded
    /// once per k step for all R rows.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dots<const R: usize>(k: usize, x: [*const u16; R], y: [*const u16; 4]) -> [[f32; 4]; R] {
        // 32 bf16 of a row as one register of pairs.
        let load = |p: *const u16| -> __m512bh { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const _)) };
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        let mut kk = 0;
        while kk + 32 <= k {
            let yv = [load(y[0].add(kk)), load(y[1].add(kk)), load(y[2].add(kk)), load(y[3].add(kk))];
            for (row, &xr) in acc.iter_mut().zip(&x) {
                let xv = load(xr.add(kk));
                for (a, &yc) in row.iter_mut().zip(&yv) {
                    *a = _mm512_dpbf16_ps(*a, xv, yc);
                }
            }
            kk += 32;
        }
        let bf = |p: *const u16, t: usize| half::bf16::from_bits(*p.add(t)).to_f32();
        let mut out = [[0f32; 4]; R];
        for r in 0..R {
            for c in 0..4 {
                out[r][c] = _mm512_reduce_add_ps(acc[r][c]) + (kk..k).map(|t| bf(x[r], t) * bf(y[c], t)).sum::<f32>();
            }
        }
        out
    }

    /// C rows i0..i0+R, columns j0..j0+cols (cols ≤ 4) from [`dots`]; past the last column the
    /// weight row is repeated and its products dropped.
    #[allow(clippy::too_many_arguments)]
    unsafe fn dots_into<const R: usize>(
        k: usize,
        a: &Operand,
        b: &Operand,
        i0: usize,
        j0: usize,
        cols: usize,
        c: *mut f32,
        n: usize,
        accumulate: bool,
    ) {
        let x: [*const u16; R] = std::array::from_fn(|r| a.bits().offset((i0 + r) as isize * a.rs));
        let y: [*const u16; 4] = std::array::from_fn(|q| b.bits().offset((j0 + q.min(cols - 1)) as isize * b.cs));
        for (r, row) in dots::<R>(k, x, y).iter().enumerate() {
            for (q, &v) in row.iter().enumerate().take(cols) {
                let o = c.add((i0 + r) * n + j0 + q);
                *o = if accumulate { *o + v } else { v };
            }
        }
    }

    struct Out(*mut f32);
    // SAFETY: each task writes only its own columns of C.
    unsafe impl Send for Out {}
    unsafe impl Sync for Out {}

    /// Rows of A at most this many, with k contiguous in both operands, take the [`dots`] path:
    /// below about 2·(packing cost per element)·(GEMM rate) rows, packing B costs more than its
    /// products.
    const FEW_ROWS: usize = 32;

    pub unsafe fn matmul(m: usize, n: usize, k: usize, a: Operand, b: Operand, c: &mut [f32], accumulate: bool) {
        if k == 0 {
            if !accumulate {
                c[..m * n].fill(0.0);
            }
            return;
        }
        let out = Out(c.as_mut_ptr());
        if m <= FEW_ROWS && a.cs == 1 && b.rs == 1 {
            // Each task: blocks of 4 weight rows, every row of A against each block (A stays in cache).
            let cols = 64.max(n.div_ceil(rayon::current_num_threads().max(1) * 4).next_multiple_of(4));
            (0..n).into_par_iter().step_by(cols).for_each(|j0| {
                let out = &out;
                for jb in (j0..n.min(j0 + cols)).step_by(4) {
                    let w = 4.min(n - jb);
                    let mut i0 = 0;
                    while i0 < m {
                        match m - i0 {
                            1 => dots_into::<1>(k, &a, &b, i0, jb, w, out.0, n, accumulate),
                            2 => dots_into::<2>(k, &a, &b, i0, jb, w, out.0, n, accumulate),
                            3 => dots_into::<3>(k, &a, &b, i0, jb, w, out.0, n, accumulate),
                            _ => dots_into::<4>(k, &a, &b, i0, jb, w, out.0, n, accumulate),
                        }
                        i0 += 4;
                    }
                }
            });
            return;
        }
        // Column chunks small enough that every thread has work.
        let threads = rayon::current_num_threads().max(1);
        let nc = NC.min(n.div_ceil(threads).div_ceil(NR) * NR).max(NR);
        let chunks: Vec<usize> = (0..n).step_by(nc).collect();
        let groups = m.div_ceil(MR);
        let mut pa: Vec<u32> = Vec::new();
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let kp = kc.div_ceil(2);
            // A is packed once per k block for every row, and shared by the column tasks.
            pa.resize(groups * kp * MR, 0);
            let per_task = groups.div_ceil(threads * 4).max(1);
            pa.par_chunks_mut(per_task * kp * MR).enumerate().for_each(|(t, dst)| {
                let i0 = t * per_task * MR;
                pack(MR, i0, (per_task * MR).min(m - i0), k0, kc, a.bits(), a.rs, a.cs, dst)
            });
            let pa = &pa;
            let task = |&j0: &usize| {
                let out = &out;
                let nc = nc.min(n - j0);
                let mut pb = vec![0u32; nc.div_ceil(NR) * kp * NR];
                pack(NR, j0, nc, k0, kc, b.bits(), b.cs, b.rs, &mut pb);
                for g in 0..groups {
                    let rows = MR.min(m - g * MR);
                    for q in 0..nc.div_ceil(NR) {
                        let cols = NR.min(nc - q * NR);
                        let cp = out.0.add(g * MR * n + j0 + q * NR);
                        tile(kp, pa.as_ptr().add(g * kp * MR), pb.as_ptr().add(q * kp * NR), cp, n, rows, cols, accumulate || k0 > 0);
                    }
                }
            };
            if chunks.len() > 1 {
                chunks.par_iter().for_each(task);
            } else {
                chunks.iter().for_each(task);
            }
        }
    }
}

/// C = A·B for row-major contiguous bf16 A [m, k] and B given as Bᵀ [n, k] row-major (a
/// linear layer's weight): the common case, as a convenience.
pub fn matmul_abt(m: usize, n: usize, k: usize, a: &[bf16], bt: &[bf16]) -> Vec<f32> {
    assert!(a.len() >= m * k && bt.len() >= n * k);
    let mut c = vec![0f32; m * n];
    // SAFETY: a is m×k row-major; bt is n×k row-major, so B(kk, j) = bt[j·k + kk].
    unsafe {
        matmul(m, n, k, Operand { ptr: a.as_ptr(), rs: k as isize, cs: 1 }, Operand { ptr: bt.as_ptr(), rs: 1, cs: k as isize }, &mut c, false)
    };
    c
}

/// `a.matmul(b)` for bf16 tensors on an AVX-512 BF16 CPU through [`matmul`] (f32 sums, the
/// product rounded to bf16 as torch's bf16 matmul), with its backward; any other tensors go to
/// candle's matmul. Operands of rank 2 to 4 with equal batch dimensions, any strides.
pub fn mm(a: &candle_core::Tensor, b: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::DType;
    let fast = a.device().is_cpu() && a.dtype() == DType::BF16 && b.dtype() == DType::BF16 && has_avx512_bf16();
    let (ra, rb) = (a.rank(), b.rank());
    if !fast || ra != rb || !(2..=4).contains(&ra) || a.dims()[..ra - 2] != b.dims()[..rb - 2] {
        return a.matmul(b);
    }
    a.apply_op2(b, Bf16Matmul)
}

/// a·b as f32 (not rounded to bf16) for 2-D bf16 CPU tensors of any strides: a trained
/// weight's gradient straight into its f32 master's dtype. None for other tensors.
pub fn mm_f32(a: &candle_core::Tensor, b: &candle_core::Tensor) -> candle_core::Result<Option<candle_core::Tensor>> {
    use candle_core::{CpuStorage, Storage};
    let ((m, k), (k2, n)) = match (a.dims2(), b.dims2()) {
        (Ok(da), Ok(db)) => (da, db),
        _ => return Ok(None),
    };
    if k != k2 {
        return Err(candle_core::Error::Msg(format!("bf16 matmul: {m}x{k} x {k2}x{n}")));
    }
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Storage::Cpu(CpuStorage::BF16(va)), Storage::Cpu(CpuStorage::BF16(vb))) = (&*sa, &*sb) else { return Ok(None) };
    let (ta, tb) = (la.stride(), lb.stride());
    let oa = Operand { ptr: va[la.start_offset()..].as_ptr(), rs: ta[0] as isize, cs: ta[1] as isize };
    let ob = Operand { ptr: vb[lb.start_offset()..].as_ptr(), rs: tb[0] as isize, cs: tb[1] as isize };
    let mut c = vec![0f32; m * n];
    // SAFETY: the layouts address m×k and k×n elements of the storages from these offsets.
    unsafe { matmul(m, n, k, oa, ob, &mut c, false) };
    Ok(Some(candle_core::Tensor::from_vec(c, (m, n), a.device())?))
}

/// The custom op under [`mm`].
struct Bf16Matmul;

impl candle_core::CustomOp2 for Bf16Matmul {
    fn name(&self) -> &'static str {
        "bf16-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::{CpuStorage, Error};
        let (CpuStorage::BF16(va), CpuStorage::BF16(vb)) = (s1, s2) else { return Err(Error::Msg("bf16 matmul: bf16 operands only".into())) };
        let (da, db) = (l1.dims(), l2.dims());
        let r = da.len();
        let (m, k, k2, n) = (da[r - 2], da[r - 1], db[r - 2], db[r - 1]);
        if k != k2 || da[..r - 2] != db[..r - 2] {
            return Err(Error::Msg(format!("bf16 matmul: {da:?} x {db:?}")));
        }
        let (sa, sb) = (l1.stride(), l2.stride());
        let batch: Vec<usize> = da[..r - 2].to_vec();
        let count: usize = batch.iter().product();
        let mut out = vec![bf16::ZERO; count * m * n];
        let mut c = vec![0f32; m * n];
        for bi in 0..count {
            // The batch index's element offsets in each operand.
            let (mut rest, mut oa, mut ob) = (bi, l1.start_offset(), l2.start_offset());
            for d in (0..batch.len()).rev() {
                let i = rest % batch[d];
                rest /= batch[d];
                (oa, ob) = (oa + i * sa[d], ob + i * sb[d]);
            }
            let a = Operand { ptr: va[oa..].as_ptr(), rs: sa[r - 2] as isize, cs: sa[r - 1] as isize };
            let b = Operand { ptr: vb[ob..].as_ptr(), rs: sb[r - 2] as isize, cs: sb[r - 1] as isize };
            // SAFETY: the layouts address m×k and k×n elements of the storages from these offsets.
            unsafe { matmul(m, n, k, a, b, &mut c, false) };
            out[bi * m * n..(bi + 1) * m * n].par_iter_mut().zip(c.par_iter()).for_each(|(o, &x)| *o = bf16::from_f32(x));
        }
        let mut shape = batch;
        shape.extend([m, n]);
        Ok((CpuStorage::BF16(out), candle_core::Shape::from(shape)))
    }

    fn bwd(
        &self,
        a: &candle_core::Tensor,
        b: &candle_core::Tensor,
        _res: &candle_core::Tensor,
        g: &candle_core::Tensor,
    ) -> candle_core::Result<(Option<candle_core::Tensor>, Option<candle_core::Tensor>)> {
        let r = a.rank();
        // da = g · bᵀ, db = aᵀ · g (transposes are stride swaps, no copies).
        let da = if a.track_op() { Some(g.apply_op2_no_bwd(&b.transpose(r - 2, r - 1)?, &Bf16Matmul)?) } else { None };
        let db = if b.track_op() { Some(a.transpose(r - 2, r - 1)?.apply_op2_no_bwd(g, &Bf16Matmul)?) } else { None };
        Ok((da, db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random(n: usize, seed: u64) -> Vec<bf16> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| bf16::from_f64(r.normal())).collect()
    }

    /// Every layout (A and B each row- or column-major), odd sizes, both kernels: within f32
    /// summation error of the f64 sum of the exact bf16 products.
    #[test]
    fn bf16_gemm_matches_an_f64_reference_for_every_layout() {
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (2, 37, 200), (17, 33, 65), (31, 70, 97), (130, 70, 300), (9, 300, 513), (70, 40, 1100)] {
            let (a, b) = (random(m * k, 1), random(k * n, 2));
            let (ra, rb) = (&a, &b);
            let terms = |x: usize| (0..k).map(move |kk| ra[x / n * k + kk].to_f64() * rb[kk * n + x % n].to_f64());
            let reference: Vec<f64> = (0..m * n).map(|x| terms(x).sum()).collect();
            let magnitude: Vec<f64> = (0..m * n).map(|x| terms(x).map(f64::abs).sum()).collect();
            // The same values stored either way: row-major, or transposed (column-major).
            let at: Vec<bf16> = (0..m * k).map(|x| a[(x % m) * k + x / m]).collect();
            let bt: Vec<bf16> = (0..k * n).map(|x| b[(x % k) * n + x / k]).collect();
            for (a_op, b_op, name) in [
                (Operand { ptr: a.as_ptr(), rs: k as isize, cs: 1 }, Operand { ptr: b.as_ptr(), rs: n as isize, cs: 1 }, "A B"),
                (Operand { ptr: at.as_ptr(), rs: 1, cs: m as isize }, Operand { ptr: b.as_ptr(), rs: n as isize, cs: 1 }, "Aᵀ B"),
                (Operand { ptr: a.as_ptr(), rs: k as isize, cs: 1 }, Operand { ptr: bt.as_ptr(), rs: 1, cs: k as isize }, "A Bᵀ"),
                (Operand { ptr: at.as_ptr(), rs: 1, cs: m as isize }, Operand { ptr: bt.as_ptr(), rs: 1, cs: k as isize }, "Aᵀ Bᵀ"),
            ] {
                for fast in [true, false] {
                    if fast && !has_avx512_bf16() {
                        continue;
                    }
                    let mut c = vec![1f32; m * n];
                    // SAFETY: the operands address the vectors above, C holds m·n.
                    unsafe {
                        if fast {
                            matmul(m, n, k, a_op, b_op, &mut c, true);
                        } else {
                            widened(m, n, k, a_op, b_op, &mut c, true);
                        }
                    }
                    for (x, (&got, &want)) in c.iter().zip(&reference).enumerate() {
                        // The worst case of k f32 roundings of partial sums; a wrong element or
                        // layout is off by the terms' size instead.
                        let bound = f32::EPSILON as f64 * k as f64 * (1.0 + magnitude[x]);
                        assert!((got as f64 - (want + 1.0)).abs() <= bound, "{name} {m}x{n}x{k} fast={fast}: C[{x}] = {got}, want {}", want + 1.0);
                    }
                }
            }
        }
        let c = matmul_abt(2, 3, 4, &random(8, 3), &random(12, 4));
        assert_eq!(c.len(), 6);
    }
}
