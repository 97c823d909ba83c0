//! `cargo bench --bench gemm`: GFLOP/s of matrix products on this CPU, side by side in one run
//! and on the same threads (BENCH_THREADS, default 2): our bf16 GEMM (AVX-512 BF16 where the CPU
//! has it), the f32 `gemm` crate candle uses, candle's bf16 matmul, and torch's bf16 and f32
//! (from BENCH_PYTHON, default the project's .venv, when it has torch). Shapes: square 1024, and
//! a linear layer of Qwen2.5-0.5B (512 tokens × 896 → 4864), Llama-3.2-1B (512 × 2048 → 8192)
//! and Llama-3-8B (512 × 4096 → 14336), each also in
//! its backward's two layouts for ours (dx = g·W, dW = gᵀ·x), and decoding steps (32 rows, 1 row).
use candle_core::{DType, Device, Tensor};
use dpo_pipeline::model::bf16_gemm;
use half::bf16;
use std::time::Instant;

/// Best of a few runs, seconds (after one warm-up).
fn best(mut f: impl FnMut()) -> f64 {
    f();
    (0..4)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let threads: usize = std::env::var("BENCH_THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(2);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().unwrap();
    let dev = Device::Cpu;
    println!("GEMM GFLOP/s, {threads} threads (AVX-512 BF16: {}); C = A·Bᵀ with B a row-major [n, k] weight", bf16_gemm::has_avx512_bf16());
    println!(
        "{:>22} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10}",
        "m x k -> n", "ours bf16", "ours g·W", "ours gᵀ·x", "f32 gemm", "candle bf16", "torch bf16", "torch f32"
    );
    for (m, k, n) in [(1024, 1024, 1024), (512, 896, 4864), (512, 2048, 8192), (512, 4096, 14336), (32, 896, 4864), (1, 896, 4864), (1, 4096, 14336)]
    {
        let flop = 2.0 * (m * n * k) as f64 / 1e9;
        let a32 = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let b32 = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let (a16, b16) = (a32.to_dtype(DType::BF16).unwrap(), b32.to_dtype(DType::BF16).unwrap());
        let (va, vb) = (a16.flatten_all().unwrap().to_vec1::<bf16>().unwrap(), b16.flatten_all().unwrap().to_vec1::<bf16>().unwrap());
        let ours = best(|| drop(bf16_gemm::matmul_abt(m, n, k, &va, &vb)));
        // The backward's layouts: g [m, n] row-major, W = vb [n, k], x = va [m, k].
        let vg: Vec<bf16> = (0..m * n).map(|i| va[i % va.len()]).collect();
        let mut c = vec![0f32; m.max(n) * k];
        let op = |ptr: &[bf16], rs: usize, cs: usize| bf16_gemm::Operand { ptr: ptr.as_ptr(), rs: rs as isize, cs: cs as isize };
        // SAFETY: each operand addresses its vector; C holds m·k and n·k.
        let dx = best(|| unsafe { bf16_gemm::matmul(m, k, n, op(&vg, n, 1), op(&vb, k, 1), &mut c, false) });
        let dw = best(|| unsafe { bf16_gemm::matmul(n, k, m, op(&vg, 1, n), op(&va, k, 1), &mut c, false) });
        let f32s = best(|| drop(a32.matmul(&b32.t().unwrap()).unwrap()));
        let candle16 = best(|| drop(a16.matmul(&b16.t().unwrap()).unwrap()));
        let torch = torch_gflops(m, k, n, threads);
        let t = |x: Option<f64>| x.map_or("-".into(), |g| format!("{g:.0}"));
        // A decoding step has no backward.
        let (dx, dw) = if m == 1 { ("-".into(), "-".into()) } else { (format!("{:.0}", flop / dx), format!("{:.0}", flop / dw)) };
        println!(
            "{:>22} {:>10.0} {:>10} {:>10} {:>10.0} {:>12.0} {:>10} {:>10}",
            format!("{m} x {k} -> {n}"),
            flop / ours,
            dx,
            dw,
            flop / f32s,
            flop / candle16,
            t(torch.map(|x| x.0)),
            t(torch.map(|x| x.1))
        );
    }
}

/// torch's bf16 and f32 GFLOP/s for x [m, k] @ w [n, k]ᵀ, when the .venv has torch.
fn torch_gflops(m: usize, k: usize, n: usize, threads: usize) -> Option<(f64, f64)> {
    let py = std::env::var_os("BENCH_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    let code = format!(
        "import torch, time\ntorch.set_num_threads({threads})\nr=[]\nfor dt in (torch.bfloat16, torch.float32):\n  \
         a=torch.randn({m},{k}).to(dt); w=torch.randn({n},{k}).to(dt); b=[]\n  a@w.T\n  \
         for _ in range(4):\n    t=time.perf_counter(); a@w.T; b.append(time.perf_counter()-t)\n  r.append(2*{m}*{n}*{k}/min(b)/1e9)\nprint(*r)"
    );
    let out = std::process::Command::new(py).args(["-c", &code]).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?;
    let v: Vec<f64> = s.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    (v.len() == 2).then(|| (v[0], v[1]))
}
