//! `cargo bench --bench train`: seconds per optimizer step on the `small` generated model with
//! the cached reference log-probs, and with the reference computed in the loop (--ref-in-loop).
mod common;
use common::*;

fn step_seconds(dir: &std::path::Path) -> (f64, f64) {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let mut secs: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step_seconds"].as_f64()?, v["tokens_per_s"].as_f64()?)))
        .skip(1) // the first step warms up allocators and caches
        .collect();
    secs.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    secs[secs.len() / 2]
}

fn main() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let threads = threads();
    run(p, &["init-model", "--arch", "qwen2", "--size", "small", "--out", "m"]);
    run(p, &["synth-prefs", "--out", "in.parquet", "--rows", "400", "--conversational"]);
    run(p, &["prepare", "--input", "in.parquet", "--model", "m", "--out", "prep"]);
    run(p, &["--threads", &threads, "cache-ref", "--prepared", "prep", "--model", "m", "--out", "cache"]);
    let steps = std::env::var("BENCH_STEPS").unwrap_or_else(|_| "6".into());
    let base = [
        "--threads",
        threads.as_str(),
        "train",
        "--prepared",
        "prep",
        "--ref-cache",
        "cache",
        "--max-steps",
        steps.as_str(),
        "--batch-size",
        "8",
        "--eval-every",
        "0",
        "--save-every",
        "0",
        "--lr",
        "1e-5",
    ];
    println!("train benchmark (small Qwen2, batch 8 pairs, {threads} threads, median step after the first)");
    let mut results = Vec::new();
    for (name, extra) in [("cached reference", vec!["--out", "t_cache"]), ("--ref-in-loop", vec!["--out", "t_loop", "--ref-in-loop"])] {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        let (_, rss) = run(p, &args);
        let (s, tps) = step_seconds(&p.join(extra[1]));
        println!("  {name:>16}: {s:.3} s/step, {tps:.0} tokens/s through the policy, peak RSS {rss:.0} MiB");
        results.push(s);
    }
    println!("  ratio cached / in-loop: {:.2}", results[0] / results[1]);

    // Peak memory must not grow with the number of pairs: the dataset and the cache are mapped.
    run(p, &["init-model", "--arch", "qwen2", "--size", "tiny", "--out", "tiny"]);
    let mut rss = Vec::new();
    for rows in ["2000", "20000"] {
        let (data, prep, cache, out) = (format!("d{rows}.parquet"), format!("p{rows}"), format!("c{rows}"), format!("t{rows}"));
        run(p, &["synth-prefs", "--out", &data, "--rows", rows]);
        run(p, &["prepare", "--input", &data, "--model", "tiny", "--out", &prep]);
        run(p, &["--threads", &threads, "cache-ref", "--prepared", &prep, "--model", "tiny", "--out", &cache]);
        let (_, r) = run(
            p,
            &[
                "--threads", &threads, "train", "--prepared", &prep, "--ref-cache", &cache, "--out", &out, "--max-steps", "20", "--batch-size", "8",
                "--eval-every", "0", "--save-every", "0",
            ],
        );
        rss.push(r);
    }
    println!(
        "  peak RSS of train (tiny model, 20 steps): 2,000 pairs {:.0} MiB, 20,000 pairs {:.0} MiB (ratio {:.2})",
        rss[0],
        rss[1],
        rss[1] / rss[0]
    );
}
