//! `cargo bench --bench cache_ref`: reference-model throughput of cache-ref on the `small`
//! generated model, the FLOP rate it implies beside a plain candle matmul, padding by layout (packed, shared-prompt, padded).
mod common;
use candle_core::{Device, Tensor};
use common::*;
use std::time::Instant;

fn matmul_gflops() -> f64 {
    let a = Tensor::randn(0f32, 1.0, (1024, 1024), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 1.0, (1024, 1024), &Device::Cpu).unwrap();
    let _ = a.matmul(&b).unwrap();
    let n = 10;
    let t = Instant::now();
    for _ in 0..n {
        let _ = a.matmul(&b).unwrap();
    }
    2.0 * 1024f64.powi(3) * n as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let threads = threads();
    run(p, &["init-model", "--arch", "qwen2", "--size", "small", "--out", "m"]);
    run(p, &["synth-prefs", "--out", "in.parquet", "--rows", "1500", "--conversational"]);
    run(p, &["prepare", "--input", "in.parquet", "--model", "m", "--out", "prep"]);
    std::env::set_var("RAYON_NUM_THREADS", &threads);
    let gflops = matmul_gflops();
    println!("cache-ref benchmark (small Qwen2, 1,500 conversational pairs, {threads} threads)");
    println!("  plain candle matmul 1024^3: {gflops:.1} GFLOP/s");
    for layout in ["packed", "shared-prompt", "padded"] {
        let out = format!("cache-{layout}");
        let (wall, rss) = run(p, &["--threads", &threads, "cache-ref", "--prepared", "prep", "--model", "m", "--out", &out, "--layout", layout]);
        let m = manifest(&p.join(&out));
        let s = &m["stats"];
        let tps = s["tokens_per_s"].as_f64().unwrap();
        let params = s["parameters"].as_f64().unwrap();
        println!(
            "  {layout:>13}: {tps:>8.0} tokens/s, {:>6.1} pairs/s, implied {:>5.1} GFLOP/s (2 x {:.1}M params x tokens/s) = {:.0}% of matmul, padding {:.1}%, wall {wall:.1}s, peak RSS {rss:.0} MiB",
            s["pairs_per_s"].as_f64().unwrap(), 2.0 * params * tps / 1e9, params / 1e6, 100.0 * 2.0 * params * tps / 1e9 / gflops,
            100.0 * s["padding_fraction"].as_f64().unwrap()
        );
    }
}
