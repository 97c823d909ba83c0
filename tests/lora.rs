//! LoRA: PEFT's semantics and files, continuing a PEFT adapter against TRL + PEFT and a plain
//! PyTorch autograd loop (tests/golden/trl_lora_trajectory_llama.json, from
//! scripts/make_lora_golden.py), new adapters, resume, merge, refusals.
mod common;
use candle_core::{DType, Device};
use common::*;
use dpo_pipeline::model::load_decoder;
use dpo_pipeline::train::policy::{Policy, Trainable};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;

fn golden_json() -> Value {
    serde_json::from_str(&std::fs::read_to_string(golden("trl_lora_trajectory_llama.json")).unwrap()).unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Safetensors keys and shapes of a file.
fn keys(path: &Path) -> BTreeSet<(String, Vec<usize>)> {
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path).unwrap() };
    st.tensors().into_iter().map(|(k, v)| (k, v.shape().to_vec())).collect()
}

#[test]
fn continuing_a_peft_adapter_matches_pytorch_autograd_and_trl() {
    let g = golden_json();
    let d = tmp();
    let p = d.path();
    let model = tiny_model(p, "llama");
    assert_eq!(g["weights_blake3"].as_str().unwrap(), dpo_pipeline::store::file_hash(&model.join("model.safetensors")).unwrap().blake3);
    copy_dir(&golden("lora_adapter"), &p.join("adapter"));
    // PEFT's model with the starting adapter, three ways: ours with the adapter, ours merged.
    let policy = Policy::load_with(&model, DType::F32, &Trainable::Adapter(p.join("adapter")), &Device::Cpu).unwrap();
    ok(p, &["merge-lora", "--model", "model_llama", "--adapter", "adapter", "--out", "merged"]);
    let merged = load_decoder(&p.join("merged"), DType::F32, None, &Device::Cpu).unwrap();
    for seq in g["start_logps"].as_array().unwrap() {
        let ids: Vec<u32> = seq["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let want: Vec<f64> = seq["token_logps"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        for (name, dec) in [("adapter", &policy.eval_decoder), ("merged", &merged)] {
            for (t, (a, b)) in seq_logps(dec, &ids).iter().zip(&want).enumerate() {
                assert!((*a as f64 - b).abs() < 1e-4, "{name}: token {t}: ours {a}, PEFT {b}");
            }
        }
    }
    // TRL trains a pretrained adapter against a frozen copy of it: the merged model is the reference.
    ok(p, &["synth-prefs", "--out", "traj.parquet", "--rows", "64", "--seed", "0"]);
    assert_eq!(g["data_blake3"].as_str().unwrap(), dpo_pipeline::store::file_hash(&p.join("traj.parquet")).unwrap().blake3);
    let st = &g["settings"];
    let arg = |k: &str| st[k].to_string();
    ok(p, &["prepare", "--input", "traj.parquet", "--model", "model_llama", "--out", "prep", "--max-length", &arg("max_length")]);
    ok(p, &["cache-ref", "--prepared", "prep", "--model", "merged", "--out", "cache"]);
    ok(
        p,
        &[
            "train",
            "--prepared",
            "prep",
            "--ref-cache",
            "cache",
            "--model",
            "model_llama",
            "--adapter",
            "adapter",
            "--out",
            "t",
            "--beta",
            &arg("beta"),
            "--lr",
            &arg("lr"),
            "--batch-size",
            &arg("batch_size"),
            "--max-steps",
            &arg("max_steps"),
            "--max-grad-norm",
            "0",
            "--shuffle",
            "false",
            "--eval-every",
            "0",
            "--save-every",
            "0",
        ],
    );
    let ours = read_rows(p, "t/metrics.parquet");
    // TRL's fused lm-head gradients are 0.2-0.3% off exact autograd: looser, with a floor for the
    // rewards near 0.
    for (golden, tol, floor) in [("autograd_steps", 1e-4, 1e-2), ("steps", 5e-3, 0.1)] {
        for (o, t) in ours.iter().zip(g[golden].as_array().unwrap()) {
            for k in ["loss", "grad_norm", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected"] {
                let (a, b) = (o[k].as_f64().unwrap(), t[k].as_f64().unwrap());
                assert!((a - b).abs() <= tol * b.abs().max(floor), "{golden}: step {} {k}: ours {a}, reference {b}", t["step"]);
            }
        }
    }
    // The trained adapter: PEFT's files, keys and shapes; tensors as the autograd run's.
    let fin = p.join("t/final");
    assert_eq!(keys(&fin.join("adapter_model.safetensors")), keys(&golden("lora_adapter/adapter_model.safetensors")));
    assert!(!fin.join("model.safetensors").exists());
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(fin.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        (cfg["peft_type"].as_str(), cfg["r"].as_u64(), cfg["lora_alpha"].as_f64(), cfg["bias"].as_str()),
        (Some("LORA"), Some(4), Some(8.0), Some("none"))
    );
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(fin.join("adapter_model.safetensors")).unwrap() };
    for (k, want) in g["final_adapter"].as_object().unwrap() {
        let got: Vec<f32> = st.load(k, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f64> = want.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let worst = got.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(worst <= 1e-3 * scale, "{k}: max diff {worst} (scale {scale})");
    }
}

#[test]
fn a_new_adapter_starts_at_the_reference_resumes_identically_and_merges() {
    let d = tmp();
    let p = d.path();
    let model = tiny_model(p, "qwen2");
    prepare_synth(p, &model, "48", "16");
    ok(p, &["cache-ref", "--prepared", "prep", "--model", "model_qwen2", "--out", "cache"]);
    let args = [
        "train", "--prepared", "prep", "--ref-cache", "cache", "--lora-r", "4", "--lora-alpha", "16", "--lora-targets", "all-linear",
        "--lora-dropout", "0.1", "--batch-size", "4", "--lr", "5e-3", "--save-every", "2", "--eval-every", "3",
    ];
    let with = |extra: &[&'static str]| -> Vec<&'static str> { args.iter().copied().chain(extra.iter().copied()).collect() };
    ok(p, &with(&["--out", "full", "--max-steps", "6"]));
    // B = 0: the adapted policy is the reference at step 0.
    let rows = read_rows(p, "full/metrics.parquet");
    assert!((rows[0]["eval/loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6, "{}", rows[0]["eval/loss"]);
    assert!(rows[0]["eval/rewards/margins"].as_f64().unwrap().abs() < 1e-6);
    assert!(rows.last().unwrap()["eval/rewards/margins"].as_f64().unwrap() > 0.0, "the adapter learned nothing");
    let fin = p.join("full/final");
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(fin.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7, "all-linear is every linear layer but the head");
    // 2 layers × 7 modules × (A, B); nothing else is trained or saved.
    let k = keys(&fin.join("adapter_model.safetensors"));
    assert_eq!(k.len(), 28);
    assert!(k
        .iter()
        .all(|(n, _)| n.starts_with("base_model.model.model.layers.") && (n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))));
    // Stopped and resumed (dropout masks included): the same adapter, byte for byte.
    ok(p, &with(&["--out", "part", "--max-steps", "6", "--stop-after-steps", "3"]));
    ok(p, &with(&["--out", "part", "--max-steps", "6", "--resume"]));
    assert_eq!(std::fs::read(fin.join("adapter_model.safetensors")).unwrap(), std::fs::read(p.join("part/final/adapter_model.safetensors")).unwrap());
    // Merged, the model gives the adapter's log-probs.
    ok(p, &["merge-lora", "--model", "model_qwen2", "--adapter", "full/final", "--out", "merged"]);
    let policy = Policy::load_with(&model, DType::F32, &Trainable::Adapter(fin.clone()), &Device::Cpu).unwrap();
    let merged = load_decoder(&p.join("merged"), DType::F32, None, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (3..40).collect();
    for (a, b) in seq_logps(&policy.eval_decoder, &ids).iter().zip(seq_logps(&merged, &ids)) {
        assert!((a - b).abs() < 1e-4, "adapter {a} vs merged {b}");
    }
    // A frozen base in bf16 trains too (adapter math in f32).
    ok(p, &with(&["--out", "bf16", "--base-dtype", "bf16", "--max-steps", "2"]));
    // An adapter whose tensors do not fit the model is refused, naming the tensor and both shapes.
    copy_dir(&golden("lora_adapter"), &p.join("bad"));
    let c = std::fs::read_to_string(p.join("bad/adapter_config.json")).unwrap().replace("\"r\": 4", "\"r\": 8");
    std::fs::write(p.join("bad/adapter_config.json"), c).unwrap();
    let e = fails(p, &["train", "--prepared", "prep", "--ref-cache", "cache", "--adapter", "bad", "--out", "x"]);
    assert!(e.contains("lora_A.weight") && e.contains("another base") && e.contains("[4, 64]"), "{e}");
    for (bad, flag) in [
        (&["--lora-r", "0"][..], "--lora-r"),
        (&["--lora-r", "4", "--lora-targets", "lm_head"], "lm_head"),
        (&["--base-dtype", "bf16"], "--base-dtype"),
    ] {
        let e = fails(
            p,
            &["train", "--prepared", "prep", "--ref-cache", "cache", "--out", "y"].iter().copied().chain(bad.iter().copied()).collect::<Vec<_>>(),
        );
        assert!(e.contains(flag), "{bad:?}: {e}");
    }
}
