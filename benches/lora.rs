//! `cargo bench --bench lora`: peak RSS and seconds per step of LoRA (r 16 on all linear
//! layers, base in f32 or bf16) against full fine-tuning, at Qwen2.5-0.5B's exact shape
//! (`init-model --size qwen2.5-0.5b`, random weights), batch 4 pairs. Takes a few minutes.
mod common;
use common::*;

/// Median seconds per step, skipping the first (allocator and cache warm-up).
fn step_seconds(dir: &std::path::Path) -> f64 {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let mut s: Vec<f64> = text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step_seconds"].as_f64()).skip(1).collect();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[s.len() / 2]
}

fn main() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let threads = threads();
    run(p, &["init-model", "--arch", "qwen2", "--size", "qwen2.5-0.5b", "--out", "m"]);
    run(p, &["synth-prefs", "--out", "in.parquet", "--rows", "32"]);
    run(p, &["prepare", "--input", "in.parquet", "--model", "m", "--out", "prep", "--max-length", "128"]);
    run(p, &["--threads", &threads, "cache-ref", "--prepared", "prep", "--model", "m", "--out", "cache"]);
    let steps = std::env::var("BENCH_STEPS").unwrap_or_else(|_| "3".into());
    let base = [
        "--threads", &threads, "train", "--prepared", "prep", "--ref-cache", "cache", "--max-steps", &steps, "--batch-size", "4", "--eval-every",
        "0", "--save-every", "0", "--lr", "1e-4",
    ];
    println!("LoRA vs full fine-tuning at Qwen2.5-0.5B's shape (494M parameters), batch 4 pairs, {threads} threads");
    let lora = ["--lora-r", "16", "--lora-alpha", "32", "--lora-targets", "all-linear"];
    let runs: [(&str, Vec<&str>); 3] = [
        ("LoRA r16 all-linear, f32 base", lora.iter().copied().chain(["--out", "lora"]).collect()),
        ("LoRA r16 all-linear, bf16 base", lora.iter().copied().chain(["--out", "lora_bf16", "--base-dtype", "bf16"]).collect()),
        ("full fine-tuning", vec!["--out", "full"]),
    ];
    for (name, extra) in runs {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        let (_, rss) = run(p, &args);
        let out = p.join(extra[extra.iter().position(|a| *a == "--out").unwrap() + 1]);
        println!("  {name:>32}: {:.2} s/step, peak RSS {:.2} GB", step_seconds(&out), rss / 1024.0);
    }
}
