//! The reference pass spread over shards: the cluster launch scripts run as a scheduler would
//! run them (several processes at once, the shard taken from Slurm's or Kubernetes' variables),
//! and `merge-ref` gives files identical to one unsharded run, or a clear refusal.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

const CACHE_FILES: [&str; 5] = ["chosen_logps.f32", "rejected_logps.f32", "chosen_tokens.u32", "rejected_tokens.u32", "ref_logps.parquet"];

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster").join(name)
}

/// Starts `scripts/cluster/cache-ref-shard.sh` with a scheduler's environment.
fn shard_job(dir: &Path, env: &[(&str, &str)], shards_dir: &str, extra: &[&str]) -> Child {
    let mut c = Command::new("bash");
    c.arg(script("cache-ref-shard.sh")).args(["prep", "model_llama", shards_dir, "--batch-tokens", "256", "--threads", "1"]).args(extra);
    c.env("PIPELINE", bin()).current_dir(dir).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    for v in ["SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "JOB_COMPLETION_INDEX", "SHARDS", "SHARD"] {
        c.env_remove(v);
    }
    c.envs(env.iter().copied()).spawn().expect("bash")
}

fn wait_ok(c: Child) {
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success(), "shard job failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

fn merge(dir: &Path, shards_dir: &str, out: &str) -> std::process::Output {
    Command::new("bash").arg(script("merge-ref.sh")).args([shards_dir, out]).env("PIPELINE", bin()).current_dir(dir).output().unwrap()
}

#[test]
fn three_concurrent_shards_merge_into_the_files_of_one_run() {
    let d = tmp();
    let p = d.path();
    let model = tiny_model(p, "llama");
    prepare_synth(p, &model, "300", "30");
    ok(p, &["cache-ref", "--prepared", "prep", "--model", "model_llama", "--out", "single", "--batch-tokens", "256"]);
    // Shards 0 and 2 as Slurm array tasks, shard 1 as a Kubernetes Indexed Job pod, all at once.
    let jobs = [
        shard_job(p, &[("SLURM_ARRAY_TASK_ID", "0"), ("SLURM_ARRAY_TASK_COUNT", "3")], "shards", &[]),
        shard_job(p, &[("JOB_COMPLETION_INDEX", "1"), ("SHARDS", "3")], "shards", &[]),
        shard_job(p, &[("SLURM_ARRAY_TASK_ID", "2"), ("SLURM_ARRAY_TASK_COUNT", "3")], "shards", &[]),
    ];
    jobs.into_iter().for_each(wait_ok);
    // Balanced by computed tokens: no shard is empty or holds most of the work.
    let rows: Vec<u64> = (0..3)
        .map(|k| {
            serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(p.join(format!("shards/shard-{k}-of-3/manifest.json"))).unwrap())
                .unwrap()["counts"]["pairs_in_shard"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(rows.iter().sum::<u64>(), 330);
    assert!(rows.iter().all(|&r| r > 60), "unbalanced shards: {rows:?}");
    // A shard is not a cache: train refuses it.
    let e = fails(p, &["train", "--prepared", "prep", "--ref-cache", "shards/shard-0-of-3", "--out", "t0", "--max-steps", "1"]);
    assert!(e.contains("cache-ref-shard"), "{e}");

    // Incomplete: shard 1 missing.
    std::fs::create_dir_all(p.join("partial")).unwrap();
    for k in [0, 2] {
        std::fs::rename(p.join(format!("shards/shard-{k}-of-3")), p.join(format!("partial/shard-{k}-of-3"))).unwrap();
    }
    let out = merge(p, "partial", "merged");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("shards 1 of 3 are missing"), "{e}");
    for k in [0, 2] {
        std::fs::rename(p.join(format!("partial/shard-{k}-of-3")), p.join(format!("shards/shard-{k}-of-3"))).unwrap();
    }

    let out = merge(p, "shards", "merged");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in CACHE_FILES {
        assert_eq!(
            std::fs::read(p.join("single").join(f)).unwrap(),
            std::fs::read(p.join("merged").join(f)).unwrap(),
            "{f} differs from the unsharded run"
        );
    }
    let fp = |dir: &str| {
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(p.join(dir).join("manifest.json")).unwrap()).unwrap()["fingerprint"]
            .clone()
    };
    assert_eq!(fp("single"), fp("merged"));
    ok(p, &["train", "--prepared", "prep", "--ref-cache", "merged", "--out", "t", "--max-steps", "2", "--batch-size", "4"]);

    // A shard computed with other settings (here the dtype) is refused, naming it.
    std::fs::create_dir_all(p.join("mixed")).unwrap();
    for k in [0, 2] {
        std::fs::rename(p.join(format!("shards/shard-{k}-of-3")), p.join(format!("mixed/shard-{k}-of-3"))).unwrap();
    }
    wait_ok(shard_job(p, &[("SHARD", "1"), ("SHARDS", "3")], "mixed", &["--dtype", "bf16"]));
    let out = merge(p, "mixed", "merged2");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("shard-") && e.contains("other prepared data, model, dtype"), "{e}");
    // The same shard twice.
    let out =
        Command::new(bin()).args(["merge-ref", "--out", "merged3", "mixed/shard-0-of-3", "mixed/shard-0-of-3"]).current_dir(p).output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("are both shard 0 of 3"), "{e}");
    // Bad --shard values are refused before any work.
    for bad in ["3/3", "1", "a/b", "0/0"] {
        let e = fails(p, &["cache-ref", "--prepared", "prep", "--model", "model_llama", "--out", "x", "--shard", bad]);
        assert!(e.contains("--shard"), "{bad}: {e}");
    }
}

#[test]
fn an_interrupted_shard_resumes_to_the_same_files() {
    let d = tmp();
    let p = d.path();
    let model = tiny_model(p, "llama");
    prepare_synth(p, &model, "200", "10");
    let args = ["cache-ref", "--prepared", "prep", "--model", "model_llama", "--batch-tokens", "256", "--shard", "1/2"];
    ok(p, &args.iter().copied().chain(["--out", "whole"]).collect::<Vec<_>>());
    ok(p, &args.iter().copied().chain(["--out", "cut", "--stop-after-batches", "2"]).collect::<Vec<_>>());
    let e = fails(p, &["merge-ref", "--out", "m", "cut"]);
    assert!(e.contains("unfinished"), "{e}");
    let e = ok(p, &args.iter().copied().chain(["--out", "cut"]).collect::<Vec<_>>());
    assert!(e.contains("resuming"), "{e}");
    for f in ["chosen_logps.f32", "rejected_logps.f32", "shard_rows.u64"] {
        assert_eq!(std::fs::read(p.join("whole").join(f)).unwrap(), std::fs::read(p.join("cut").join(f)).unwrap(), "{f}");
    }
}
