//! Data-parallel `train` under `mpirun` (the `mpi` feature; CI installs Open MPI): 2 ranks of
//! one thread against one process with the same global batch (metrics and final weights within
//! 1e-6: only the summation order differs), LoRA likewise, ZeRO-1 equal to the replicated
//! optimizer, resume across world sizes, a killed rank ending the job. Without the feature: a
//! clear error under a launcher instead of N processes writing one directory.
mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Output};

/// Starts `pipeline` under a launcher's environment without a launcher: what a build without
/// an engine meets under `mpirun`.
fn as_rank(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(dir)
        .env("OMPI_COMM_WORLD_RANK", "0")
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .expect("spawn pipeline")
}

/// Only `train` runs data-parallel; the other stages say so rather than run once per rank.
#[test]
fn other_stages_under_a_launcher_say_only_train_is_data_parallel() {
    let d = tmp();
    let model = tiny_model(d.path(), "llama");
    ok(d.path(), &["synth-prefs", "--out", "in.parquet", "--rows", "8"]);
    let out = as_rank(d.path(), &["prepare", "--input", "in.parquet", "--model", s(&model), "--out", "prep"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("only `train` runs data-parallel") && e.contains("rank 0 of 2"), "{e}");
    assert!(!d.path().join("prep").exists());
}

#[cfg(not(feature = "mpi"))]
#[test]
fn a_build_without_mpi_refuses_to_train_as_one_of_several_ranks() {
    let d = tmp();
    let model = tiny_model(d.path(), "llama");
    prepare_synth(d.path(), &model, "16", "4");
    ok(d.path(), &["cache-ref", "--prepared", "prep", "--model", s(&model), "--out", "cache"]);
    let out = as_rank(d.path(), &["train", "--prepared", "prep", "--ref-cache", "cache", "--out", "t", "--max-steps", "1"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("--features mpi") && e.contains("rank 0 of 2"), "{e}");
    assert!(!d.path().join("t").exists(), "nothing written under --out");
}

#[cfg(feature = "mpi")]
mod mpi {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    /// One MPI job at a time: two ranks already take both cores.
    static ONE_JOB: Mutex<()> = Mutex::new(());

    fn mpirun_cmd(dir: &Path, ranks: usize, args: &[&str]) -> Command {
        let mut c = Command::new("mpirun");
        c.args(["-n", &ranks.to_string(), "--oversubscribe", "--allow-run-as-root", "--bind-to", "none", bin(), "--threads", "1"])
            .args(args)
            .current_dir(dir);
        c
    }

    fn mpirun(dir: &Path, ranks: usize, args: &[&str]) -> String {
        let out = mpirun_cmd(dir, ranks, args).output().expect("mpirun (Open MPI: apt-get install openmpi-bin)");
        let e = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "mpirun -n {ranks} pipeline {args:?} failed:\n{e}");
        e
    }

    /// Prepared pairs (with eval rows) and their reference cache.
    fn setup(dir: &Path) -> std::path::PathBuf {
        let model = tiny_model(dir, "llama");
        prepare_synth(dir, &model, "48", "12");
        ok(dir, &["cache-ref", "--prepared", "prep", "--model", s(&model), "--out", "cache"]);
        model
    }

    /// Columns of how a run went, not what it computed.
    const TIMING: [&str; 9] = [
        "tokens_per_s", "step_seconds", "forward_seconds", "backward_seconds", "optimizer_seconds", "collective_seconds", "gathers_prefetched",
        "peak_memory_gb", "epoch",
    ];

    fn assert_same_metrics(dir: &Path, a: &str, b: &str, tol: f64) {
        let (ra, rb) = (read_rows(dir, &format!("{a}/metrics.parquet")), read_rows(dir, &format!("{b}/metrics.parquet")));
        assert_eq!(ra.len(), rb.len(), "{a} vs {b}: rows");
        for (x, y) in ra.iter().zip(&rb) {
            for (k, v) in x.as_object().unwrap() {
                if TIMING.contains(&k.as_str()) {
                    continue;
                }
                match (v.as_f64(), y[k].as_f64()) {
                    // Rewards are β × differences of log-prob sums of ~40: their rounding is relative to
                    // that, not to the (small) difference; hence the floor. KTO's KL estimate is
                    // such a difference unscaled by β, so its floor is ten times higher.
                    (Some(p), Some(q)) => {
                        let floor = if k.ends_with("kl") { 1.0 } else { 0.1 };
                        assert!((p - q).abs() <= tol * q.abs().max(floor), "{a} vs {b}: step {} {k}: {p} vs {q}", x["step"])
                    }
                    (p, q) => assert_eq!(p, q, "{a} vs {b}: step {} {k}", x["step"]),
                }
            }
        }
    }

    fn tensors(file: &Path) -> BTreeMap<String, Vec<f32>> {
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(file) }.unwrap();
        st.tensors()
            .into_iter()
            .map(|(k, _)| {
                let t = st.load(&k, &candle_core::Device::Cpu).unwrap().to_dtype(candle_core::DType::F32).unwrap();
                (k, t.flatten_all().unwrap().to_vec1().unwrap())
            })
            .collect()
    }

    /// Every tensor within `tol` of the other's: ‖a − b‖ ≤ tol·‖b‖.
    fn assert_close_weights(a: &Path, b: &Path, tol: f64) {
        let (ta, tb) = (tensors(a), tensors(b));
        assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
        for (k, x) in &ta {
            let y = &tb[k];
            let diff = x.iter().zip(y).map(|(p, q)| ((p - q) as f64).powi(2)).sum::<f64>().sqrt();
            let norm = y.iter().map(|q| (*q as f64).powi(2)).sum::<f64>().sqrt().max(1e-12);
            assert!(diff <= tol * norm, "{}: {k} differs by {diff} (norm {norm})", a.display());
        }
    }

    fn train_args<'a>(out: &'a str, batch: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec![
            "train", "--prepared", "prep", "--ref-cache", "cache", "--out", out, "--batch-size", batch, "--grad-accum", "2", "--max-steps", "4",
            "--eval-every", "2", "--lr", "1e-3", "--loss", "sigmoid,sft", "--loss-weights", "1,0.5", "--adam-eps", "1e-3",
        ];
        if !extra.contains(&"--save-every") {
            a.extend(["--save-every", "0"]);
        }
        a.extend_from_slice(extra);
        a
    }

    /// 2 ranks × 2 pairs × 2 micro-batches against one process × 4 pairs × 2: the same global
    /// batch, so the same metrics (the SFT term's token mean is over the global micro-batch)
    /// and weights; full fine-tuning, LoRA, and ZeRO-1's sharded optimizer (bit-equal to the
    /// replicated one: the same arithmetic, only where it runs differs).
    ///
    /// AdamW's eps is 1e-3 here, above the gradients' scale, so each update is linear in the
    /// gradient and the weights show the reduction's rounding as it is: at the default 1e-8,
    /// AdamW turns a gradient entry that is mostly cancellation (1e-8, rounded differently by a
    /// different summation order) into a step of ~lr·g/(|g| + eps) whose size that rounding
    /// changes by a percent (measured: 1.3e-6 of the tensor's norm after one step, all of it in
    /// 25 of 11,264 entries of one matrix, with metrics still within 2e-7).
    #[test]
    fn two_ranks_train_as_one_process_with_the_global_batch() {
        let _one = ONE_JOB.lock().unwrap_or_else(|e| e.into_inner());
        let d = tmp();
        let p = d.path();
        setup(p);
        let lora = ["--lora-r", "4", "--lora-targets", "all-linear"];
        ok(p, &train_args("one", "4", &["--threads", "1"]));
        let e = mpirun(p, 2, &train_args("two", "2", &[]));
        assert!(e.contains("2 ranks") && e.contains("global batch 8 pairs"), "{e}");
        assert_same_metrics(p, "one", "two", 1e-6);
        assert_close_weights(&p.join("one/final/model.safetensors"), &p.join("two/final/model.safetensors"), 1e-6);
        // Only rank 0 wrote --out: one manifest, one metrics file, and it records the world.
        let man: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p.join("two/manifest.json")).unwrap()).unwrap();
        assert_eq!(man["stats"]["world_size"], 2);
        // ZeRO-1: the same run with each rank keeping half the moments.
        mpirun(p, 2, &train_args("zero", "2", &["--shard-optimizer", "--save-every", "2"]));
        assert_same_metrics(p, "two", "zero", 0.0);
        assert_eq!(tensors(&p.join("two/final/model.safetensors")), tensors(&p.join("zero/final/model.safetensors")));
        assert_eq!(tensors(&p.join("two/final/optimizer.safetensors")), tensors(&p.join("zero/final/optimizer.safetensors")), "gathered moments");
        // LoRA.
        ok(p, &train_args("lora1", "4", &[&lora[..], &["--threads", "1"]].concat()));
        mpirun(p, 2, &train_args("lora2", "2", &lora));
        assert_same_metrics(p, "lora1", "lora2", 1e-6);
        assert_close_weights(&p.join("lora1/final/adapter_model.safetensors"), &p.join("lora2/final/adapter_model.safetensors"), 1e-6);
    }

    /// Every tensor's moments in a checkpoint, whole, whichever layout wrote them.
    fn moments(dir: &Path, names: &[String]) -> BTreeMap<String, Vec<f32>> {
        let m = dpo_pipeline::train::shard::Moments::open(dir).unwrap();
        let sizes = tensors(&dir.join("model.safetensors"));
        let mut out = BTreeMap::new();
        for n in names {
            let numel = sizes[n].len();
            for w in ["m", "v"] {
                out.insert(format!("{w}.{n}"), m.range(w, n, numel, 0..numel, &candle_core::Device::Cpu).unwrap().to_vec1().unwrap());
            }
        }
        out
    }

    /// ZeRO-3 (`--shard-params`): 2 ranks each holding half of every weight, gradient and moment
    /// train as one process with the global batch: the same metrics and final weights (1e-6 of
    /// each tensor's norm), full fine-tuning and LoRA; the checkpoint has the usual names and
    /// layout (what transformers / PEFT load) and the moments as one file per rank with an index,
    /// together equal to the one process's. KTO's short last micro-batch leaves a rank without
    /// rows (it runs empty passes so the layers' collectives still meet), and token-budget
    /// pieces give the ranks different numbers of passes.
    #[test]
    fn full_sharding_trains_as_one_process_with_the_global_batch() {
        let _one = ONE_JOB.lock().unwrap_or_else(|e| e.into_inner());
        let d = tmp();
        let p = d.path();
        let model = setup(p);
        ok(p, &train_args("one", "4", &["--threads", "1", "--save-every", "2"]));
        let e = mpirun(p, 2, &train_args("z3", "2", &["--shard-params", "--save-every", "2"]));
        assert!(e.contains("weights, gradients and optimizer state sharded (ZeRO-3)"), "{e}");
        let man: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p.join("z3/manifest.json")).unwrap()).unwrap();
        assert_eq!(man["stats"]["shard_params"], true);
        assert!(man["stats"]["memory_plan"]["gathered_gb"].is_number(), "{man}");
        let rows = read_rows(p, "z3/metrics.parquet");
        assert!(
            rows[1..].iter().all(|r| r["collective_seconds"].as_f64().is_some_and(|c| c > 0.0 && c < r["step_seconds"].as_f64().unwrap())),
            "{rows:?}"
        );
        assert!(read_rows(p, "one/metrics.parquet").iter().all(|r| r["collective_seconds"].is_null()));
        assert_same_metrics(p, "one", "z3", 1e-6);
        assert_close_weights(&p.join("one/final/model.safetensors"), &p.join("z3/final/model.safetensors"), 1e-6);
        // Each layer's gather but the forward's first was started while the layer before it ran
        // (the backward's first at the end of the forward): 2L - 1 of 2L per pass. Without the
        // prefetch the same bits arrive, only later.
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
        let layers = config["num_hidden_layers"].as_f64().unwrap();
        let share: Vec<_> = rows[1..].iter().map(|r| r["gathers_prefetched"].as_f64()).collect();
        assert!(share.iter().all(|&s| s == Some((2.0 * layers - 1.0) / (2.0 * layers))), "{share:?}");
        let mut c = mpirun_cmd(p, 2, &train_args("z3-late", "2", &["--shard-params", "--save-every", "2"]));
        assert!(c.env("DPO_SHARD_PREFETCH", "0").status().unwrap().success());
        assert!(read_rows(p, "z3-late/metrics.parquet")[1..].iter().all(|r| r["gathers_prefetched"].as_f64() == Some(0.0)));
        assert_same_metrics(p, "z3", "z3-late", 0.0);
        assert_eq!(std::fs::read(p.join("z3/final/model.safetensors")).unwrap(), std::fs::read(p.join("z3-late/final/model.safetensors")).unwrap());
        for dir in ["z3/final", "z3/checkpoints/step-2"] {
            let dir = p.join(dir);
            for f in [
                "optimizer.index.json",
                "optimizer-00001-of-00002.safetensors",
                "optimizer-00002-of-00002.safetensors",
                "config.json",
                "tokenizer.json",
            ] {
                assert!(dir.join(f).exists(), "{}: {f}", dir.display());
            }
            assert!(!dir.join("optimizer.safetensors").exists());
        }
        // The model file is the one process's in all but rounding: names, shapes, f32, "pt".
        let names: Vec<String> = tensors(&p.join("one/final/model.safetensors")).into_keys().collect();
        let meta = |f: &Path| {
            let b = std::fs::read(f).unwrap();
            let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            let mut h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
            for (_, v) in h.as_object_mut().unwrap().iter_mut() {
                v.as_object_mut().map(|o| o.remove("data_offsets"));
            }
            h
        };
        assert_eq!(meta(&p.join("one/final/model.safetensors")), meta(&p.join("z3/final/model.safetensors")));
        assert_eq!(std::fs::read(p.join("one/final/config.json")).unwrap(), std::fs::read(p.join("z3/final/config.json")).unwrap());
        // The per-rank moments, read whole, are the one process's.
        let (a, b) = (moments(&p.join("one/final"), &names), moments(&p.join("z3/final"), &names));
        for (k, x) in &a {
            let diff = x.iter().zip(&b[k]).map(|(p, q)| ((p - q) as f64).powi(2)).sum::<f64>().sqrt();
            let norm = x.iter().map(|q| (*q as f64).powi(2)).sum::<f64>().sqrt().max(1e-12);
            assert!(diff <= 1e-5 * norm, "{k}: {diff} of {norm}");
        }
        // Pieces of at most 40 tokens: the ranks run different numbers of passes.
        mpirun(p, 2, &train_args("pieces", "2", &["--shard-params", "--batch-tokens", "40"]));
        assert_same_metrics(p, "one", "pieces", 1e-6);
        // LoRA: the frozen base sharded too.
        let lora = ["--lora-r", "4", "--lora-targets", "all-linear"];
        ok(p, &train_args("lora1", "4", &[&lora[..], &["--threads", "1"]].concat()));
        mpirun(p, 2, &train_args("lora3", "2", &[&lora[..], &["--shard-params"]].concat()));
        assert_same_metrics(p, "lora1", "lora3", 1e-6);
        assert_close_weights(&p.join("lora1/final/adapter_model.safetensors"), &p.join("lora3/final/adapter_model.safetensors"), 1e-6);
        assert_eq!(
            std::fs::read(p.join("lora1/final/adapter_config.json")).unwrap(),
            std::fs::read(p.join("lora3/final/adapter_config.json")).unwrap()
        );
        // KTO over two epochs of 76 rows in global micro-batches of 8: each epoch ends with 4
        // rows, all on rank 0.
        let data = golden("kto/imbalanced.parquet");
        ok(p, &["prepare", "--input", s(&data), "--model", s(&model), "--out", "un", "--max-length", "64", "--eval-fraction", "0.2"]);
        ok(p, &["cache-ref", "--prepared", "un", "--model", s(&model), "--out", "uc", "--kl-batch-size", "4"]);
        let kto = |out: &'static str, batch: &'static str| {
            vec![
                "train", "--prepared", "un", "--ref-cache", "uc", "--out", out, "--loss", "kto", "--batch-size", batch, "--epochs", "2",
                "--eval-every", "5", "--lr", "1e-3", "--adam-eps", "1e-3", "--save-every", "0", "--shuffle", "false",
            ]
        };
        ok(p, &[kto("k1", "8"), vec!["--threads", "1"]].concat());
        mpirun(p, 2, &[kto("k3", "4"), vec!["--shard-params"]].concat());
        let rows = read_rows(p, "k1/metrics.parquet");
        assert_eq!(rows.iter().filter(|r| r["loss"].is_number()).count(), 20, "10 micro-batches an epoch, the last of 4 rows");
        assert_same_metrics(p, "k1", "k3", 3e-6);
        assert_close_weights(&p.join("k1/final/model.safetensors"), &p.join("k3/final/model.safetensors"), 1e-6);
        // Tied embeddings (Qwen2): one sharded tensor gathered for the lookup and for the head,
        // its gradient reduced from both.
        let qwen = tiny_model(p, "qwen2");
        ok(p, &["prepare", "--input", "in.parquet", "--model", s(&qwen), "--out", "prepq", "--max-length", "64"]);
        ok(p, &["cache-ref", "--prepared", "prepq", "--model", s(&qwen), "--out", "cacheq"]);
        let tied = |out: &'static str, batch: &'static str| {
            let mut a = train_args(out, batch, &[]);
            a.iter_mut().for_each(|x| {
                *x = match *x {
                    "prep" => "prepq",
                    "cache" => "cacheq",
                    other => other,
                }
            });
            a
        };
        ok(p, &[tied("q1", "4"), vec!["--threads", "1"]].concat());
        mpirun(p, 2, &[tied("q3", "2"), vec!["--shard-params"]].concat());
        assert_same_metrics(p, "q1", "q3", 1e-6);
        assert_close_weights(&p.join("q1/final/model.safetensors"), &p.join("q3/final/model.safetensors"), 1e-6);
        // QLoRA: each packed 4-bit weight (double-quantized) held by one rank and broadcast when
        // its layer runs.
        let q = ["--lora-r", "4", "--lora-targets", "all-linear", "--load-in-4bit", "--bnb-4bit-use-double-quant"];
        ok(p, &train_args("ql1", "4", &[&q[..], &["--threads", "1"]].concat()));
        mpirun(p, 2, &train_args("ql3", "2", &[&q[..], &["--shard-params"]].concat()));
        assert_same_metrics(p, "ql1", "ql3", 1e-6);
        assert_close_weights(&p.join("ql1/final/adapter_model.safetensors"), &p.join("ql3/final/adapter_model.safetensors"), 1e-6);
        // Full fine-tuning of a 4-bit base is refused, naming the way out.
        let e = fails(p, &train_args("q", "4", &["--shard-params", "--load-in-4bit"]));
        assert!(e.contains("--lora-r") && e.contains("4-bit"), "{e}");
    }

    /// A fully sharded checkpoint resumes at another world size: 2 ranks → 1 process and 1 → 2,
    /// each to the uninterrupted run's weights (the moments re-cut from the per-rank files).
    #[test]
    fn a_fully_sharded_run_resumes_at_any_world_size() {
        let _one = ONE_JOB.lock().unwrap_or_else(|e| e.into_inner());
        let d = tmp();
        let p = d.path();
        setup(p);
        let args = |out: &'static str, batch: &'static str, extra: &[&'static str]| {
            let mut a = train_args(out, batch, &["--save-every", "2", "--shard-params"]);
            a.extend_from_slice(extra);
            a
        };
        ok(p, &train_args("whole", "4", &["--save-every", "2", "--threads", "1"]));
        mpirun(p, 2, &args("a", "2", &["--stop-after-steps", "2"]));
        ok(p, &args("a", "4", &["--resume", "--threads", "1"]));
        assert!(p.join("a/final/optimizer-00001-of-00001.safetensors").exists());
        assert_close_weights(&p.join("whole/final/model.safetensors"), &p.join("a/final/model.safetensors"), 1e-6);
        assert_same_metrics(p, "whole", "a", 1e-6);
        ok(p, &args("b", "4", &["--stop-after-steps", "2", "--threads", "1"]));
        mpirun(p, 2, &args("b", "2", &["--resume"]));
        assert_close_weights(&p.join("whole/final/model.safetensors"), &p.join("b/final/model.safetensors"), 1e-6);
        assert_same_metrics(p, "whole", "b", 1e-6);
        // And a ZeRO-3 checkpoint continues without sharding (the moments read whole).
        ok(p, &train_args("c", "4", &["--save-every", "2", "--shard-params", "--stop-after-steps", "2", "--threads", "1"]));
        mpirun(p, 2, &train_args("c", "2", &["--save-every", "2", "--resume"]));
        assert_close_weights(&p.join("whole/final/model.safetensors"), &p.join("c/final/model.safetensors"), 1e-6);
    }

    /// The cursor is global and the fingerprint holds the global batch, so a run checkpointed by
    /// 2 ranks continues in 1 process (and the reverse) to the uninterrupted run's weights.
    #[test]
    fn a_run_resumes_on_another_number_of_ranks() {
        let _one = ONE_JOB.lock().unwrap_or_else(|e| e.into_inner());
        let d = tmp();
        let p = d.path();
        setup(p);
        let args = |out: &'static str, batch: &'static str, extra: &[&'static str]| {
            let mut a = train_args(out, batch, &["--save-every", "2"]);
            a.extend_from_slice(extra);
            a
        };
        ok(p, &args("whole", "4", &["--threads", "1"]));
        // 2 ranks to step 2, then one process.
        mpirun(p, 2, &args("a", "2", &["--stop-after-steps", "2"]));
        assert!(p.join("a/checkpoints/step-2").exists() && !p.join("a/final").exists());
        let e = fails(p, &args("a", "2", &["--resume"]));
        assert!(e.contains("fingerprint"), "another global batch is another run: {e}");
        ok(p, &args("a", "4", &["--resume", "--threads", "1"]));
        assert_close_weights(&p.join("whole/final/model.safetensors"), &p.join("a/final/model.safetensors"), 1e-6);
        assert_same_metrics(p, "whole", "a", 1e-6);
        // One process to step 2, then 2 ranks.
        ok(p, &args("b", "4", &["--stop-after-steps", "2", "--threads", "1"]));
        mpirun(p, 2, &args("b", "2", &["--resume", "--shard-optimizer"]));
        assert_close_weights(&p.join("whole/final/model.safetensors"), &p.join("b/final/model.safetensors"), 1e-6);
    }

    /// A rank killed mid-run ends the job within a bounded time, non-zero, naming the rank, and
    /// leaves no final output.
    #[test]
    fn a_killed_rank_ends_the_job_naming_it() {
        let _one = ONE_JOB.lock().unwrap_or_else(|e| e.into_inner());
        for sharding in [None, Some("--shard-params")] {
            a_killed_rank_ends_the_job(sharding);
        }
    }

    fn a_killed_rank_ends_the_job(extra: Option<&str>) {
        let d = tmp();
        let p = d.path();
        setup(p);
        let mut args = vec![
            "train", "--prepared", "prep", "--ref-cache", "cache", "--out", "k", "--batch-size", "2", "--max-steps", "100000", "--save-every", "5",
        ];
        args.extend(extra);
        let mut child = mpirun_cmd(p, 2, &args).stderr(std::process::Stdio::piped()).spawn().unwrap();
        // Wait until the ranks are training (the first metrics line), then kill one of them.
        let started = Instant::now();
        while std::fs::read_to_string(p.join("k/metrics.jsonl")).map_or(true, |t| t.lines().count() < 2) {
            assert!(started.elapsed() < Duration::from_secs(120), "training never started");
            std::thread::sleep(Duration::from_millis(200));
        }
        let ranks = String::from_utf8(Command::new("pgrep").args(["-P", &child.id().to_string()]).output().unwrap().stdout).unwrap();
        let victim = ranks.lines().last().expect("rank processes").trim().to_string();
        assert!(Command::new("kill").args(["-9", &victim]).status().unwrap().success());
        let killed = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(killed.elapsed() < Duration::from_secs(60), "the job outlived a killed rank by 60 s");
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "{err}");
        assert!(err.contains("rank") && (err.contains("signal 9") || err.contains("Killed")), "{err}");
        assert!(!p.join("k/final").exists() && !p.join("k/manifest.json").exists());
        assert!(std::fs::read_dir(p.join("k/checkpoints")).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".partial")));
    }

    /// KTO on 2 ranks × one KL block of 4 rows against one process × 8 rows (two blocks): the
    /// KL estimate is reduced over the ranks before the loss (TRL's gather), so the metrics,
    /// the eval split's and the weights agree as for the pair losses.
    #[test]
    fn kto_on_two_ranks_reduces_its_kl_estimate_as_one_process() {
        let _one = ONE_JOB.lock().unwrap_or_else(|e| e.into_inner());
        let d = tmp();
        let p = d.path();
        let model = tiny_model(p, "llama");
        let data = golden("kto/imbalanced.parquet");
        ok(p, &["prepare", "--input", s(&data), "--model", s(&model), "--out", "un", "--max-length", "64", "--eval-fraction", "0.2"]);
        ok(p, &["cache-ref", "--prepared", "un", "--model", s(&model), "--out", "uc", "--kl-batch-size", "4"]);
        let args = |out: &'static str, batch: &'static str| {
            vec![
                "train", "--prepared", "un", "--ref-cache", "uc", "--out", out, "--loss", "kto", "--batch-size", batch, "--max-steps", "4",
                "--eval-every", "2", "--lr", "1e-3", "--adam-eps", "1e-3", "--save-every", "0", "--shuffle", "false", "--undesirable-weight", "2.5",
            ]
        };
        ok(p, &[args("one", "8"), vec!["--threads", "1"]].concat());
        mpirun(p, 2, &args("two", "4"));
        let rows = read_rows(p, "one/metrics.parquet");
        assert!(rows.iter().any(|r| r["kl"].as_f64().is_some_and(|k| k > 0.0)), "some step has a positive KL estimate: {rows:?}");
        assert!(rows.iter().any(|r| r["eval/kl"].is_number()), "the eval split is scored");
        // Each side's rewards average over that side's few rows of a micro-batch (2 to 6 here),
        // so one row's rounding (~2e-7 on a sum of ~40 in f32, times β) weighs more than in a
        // mean over every pair: 3e-6 of the floor.
        assert_same_metrics(p, "one", "two", 3e-6);
        assert_close_weights(&p.join("one/final/model.safetensors"), &p.join("two/final/model.safetensors"), 1e-6);
    }
}
