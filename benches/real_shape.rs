//! `cargo bench --bench real_shape`: the stages at a real model's dimensions (Qwen2.5-0.5B's
//! shape, random weights, the generated tokenizer) on UltraFeedback-like length spreads
//! (`synth-prefs --long`). Prints, per layout: cache-ref pairs/s, tokens/s, padding, useful
//! GFLOP/s (2 × parameters × computed tokens / s) beside a plain candle matmul's GFLOP/s measured
//! in the same run; train seconds per step split into forward / backward / optimizer; peak RSS.
//! BENCH_SIZE (qwen2.5-0.5b | llama-1b | qwen3-0.6b | moe-small | small), BENCH_ARCH (default:
//! the size's family), BENCH_PAIRS (default 32), BENCH_STEPS (3), BENCH_BATCH (4 pairs),
//! BENCH_LAYOUTS (packed,padded), BENCH_TOKENS=N: long pairs of ~N tokens (`synth-prefs --tokens`)
//! instead of UltraFeedback-like ones, BENCH_GC=1: each train run also with
//! `--gradient-checkpointing`. Side by side with transformers / TRL: scripts/bench_vs_torch.py on
//! the same model and prepared pairs.
mod common;
use candle_core::{Device, Tensor};
use common::*;
use std::time::Instant;

/// A plain candle f32 matmul at the MLP's shape (1024 tokens × hidden → intermediate).
fn matmul_gflops(hidden: usize, inter: usize) -> f64 {
    let a = Tensor::randn(0f32, 1.0, (1024, hidden), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 1.0, (inter, hidden), &Device::Cpu).unwrap();
    let _ = a.matmul(&b.t().unwrap()).unwrap();
    let n = 10;
    let t = Instant::now();
    for _ in 0..n {
        let _ = a.matmul(&b.t().unwrap()).unwrap();
    }
    2.0 * (1024 * hidden * inter) as f64 * n as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

fn main() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let threads = threads();
    let (size, pairs, steps) = (env("BENCH_SIZE", "qwen2.5-0.5b"), env("BENCH_PAIRS", "32"), env("BENCH_STEPS", "3"));
    let layouts = env("BENCH_LAYOUTS", "packed,padded");
    let default_arch = match size.as_str() {
        "llama-1b" | "small" => "llama",
        "qwen3-0.6b" => "qwen3",
        "moe-small" => "qwen3_moe",
        _ => "qwen2",
    };
    let (arch, batch, tokens) = (env("BENCH_ARCH", default_arch), env("BENCH_BATCH", "4"), std::env::var("BENCH_TOKENS").ok());
    let gc = std::env::var("BENCH_GC").is_ok_and(|v| v == "1");
    run(p, &["init-model", "--arch", &arch, "--size", &size, "--out", "m"]);
    let length: Vec<&str> = match &tokens {
        Some(n) => vec!["--tokens", n],
        None => vec!["--long"],
    };
    let mut synth = vec!["synth-prefs", "--out", "in.parquet", "--rows", &pairs, "--conversational"];
    synth.extend(&length);
    run(p, &synth);
    let max_len = tokens.as_ref().map_or(1024, |n| 2 * n.parse::<usize>().unwrap()).to_string();
    run(p, &["prepare", "--input", "in.parquet", "--model", "m", "--out", "prep", "--max-length", &max_len]);
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p.join("m/config.json")).unwrap()).unwrap();
    let (hidden, inter) = (cfg["hidden_size"].as_u64().unwrap() as usize, cfg["intermediate_size"].as_u64().unwrap() as usize);
    std::env::set_var("RAYON_NUM_THREADS", &threads);
    let gflops = matmul_gflops(hidden, inter);
    let what = tokens.as_ref().map_or("--long".to_string(), |n| format!("~{n}-token"));
    println!("real-shape benchmark ({arch} {size}, {pairs} conversational {what} pairs, {threads} threads)");
    println!("  plain candle matmul 1024x{hidden} · {hidden}x{inter}: {gflops:.1} GFLOP/s");
    for layout in layouts.split(',') {
        let out = format!("cache-{layout}");
        let (wall, rss) = run(p, &["--threads", &threads, "cache-ref", "--prepared", "prep", "--model", "m", "--out", &out, "--layout", layout]);
        let s = &manifest(&p.join(&out))["stats"];
        let (tps, params) = (s["tokens_per_s"].as_f64().unwrap(), s["parameters"].as_f64().unwrap());
        let useful = 2.0 * params * tps / 1e9;
        println!(
            "  cache-ref {layout:>13}: {:.2} pairs/s, {tps:.1} tokens/s, padding {:.1}%, useful {useful:.1} GFLOP/s = {:.0}% of matmul, wall {wall:.1} s, peak RSS {:.2} GB",
            s["pairs_per_s"].as_f64().unwrap(),
            100.0 * s["padding_fraction"].as_f64().unwrap(),
            100.0 * useful / gflops,
            rss / 1024.0
        );
    }
    let max_steps = (steps.parse::<usize>().unwrap() + 1).to_string();
    let cache = format!("cache-{}", layouts.split(',').next().unwrap());
    let runs: Vec<(&str, bool)> = layouts.split(',').flat_map(|l| if gc { vec![(l, false), (l, true)] } else { vec![(l, false)] }).collect();
    for (layout, gc) in runs {
        let out = format!("train-{layout}-{gc}");
        let args = [
            "--threads",
            &threads,
            "train",
            "--prepared",
            "prep",
            "--ref-cache",
            &cache,
            "--out",
            &out,
            "--max-steps",
            &max_steps,
            "--batch-size",
            &batch,
            "--eval-every",
            "0",
            "--save-every",
            "0",
            "--lr",
            "1e-5",
            "--shuffle",
            "false",
            "--layout",
            layout,
            "--gradient-checkpointing",
            if gc { "true" } else { "false" },
        ];
        let (_, rss) = run(p, &args);
        let layout = if gc { format!("{layout}+ckpt") } else { layout.to_string() };
        let text = std::fs::read_to_string(p.join(&out).join("metrics.jsonl")).unwrap();
        // Steps after the first (it faults the weights in), averaged.
        let rows: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).skip(1).collect();
        let mean = |k: &str| rows.iter().map(|r| r[k].as_f64().unwrap()).sum::<f64>() / rows.len() as f64;
        println!(
            "  train {layout:>13} (batch {batch} pairs): {:.2} s/step (forward {:.2}, backward {:.2}, optimizer {:.2}), {:.1} tokens/s, peak RSS {:.2} GB",
            mean("step_seconds"),
            mean("forward_seconds"),
            mean("backward_seconds"),
            mean("optimizer_seconds"),
            mean("tokens_per_s"),
            rss / 1024.0
        );
    }
}
