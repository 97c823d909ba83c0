//! bitsandbytes 4-bit bases (QLoRA) against transformers + bitsandbytes + PEFT + TRL
//! (tests/golden/bnb4.json and tests/fixtures/bnb4/, from scripts/make_bnb_golden.py): the
//! checkpoints transformers saves load as they are and dequantize bit for bit as bitsandbytes
//! does; quantizing on load gives bitsandbytes' bytes; log-probs of two families; a 16-step
//! QLoRA trajectory against TRL's DPOTrainer; merging; refusals.
mod common;
use candle_core::{DType, Device};
use common::*;
use dpo_pipeline::model::quant::{QuantSpec, QuantType};
use dpo_pipeline::model::{weights, Decoder, ModelConfig};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn golden_json() -> Value {
    serde_json::from_str(&std::fs::read_to_string(golden("bnb4.json")).unwrap()).unwrap()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bnb4").join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn spec_of(name: &str) -> QuantSpec {
    let qt = if name.contains("fp4") { QuantType::Fp4 } else { QuantType::Nf4 };
    QuantSpec::new(qt, name.ends_with("-dq"), DType::F32)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn published_4bit_checkpoints_dequantize_bit_for_bit_and_give_transformers_log_probs() {
    let g = golden_json();
    for (name, want) in g["fixtures"].as_object().unwrap() {
        let dir = fixture(name);
        let cfg = ModelConfig::load(&dir).unwrap();
        let w = weights::load_model(&dir, &cfg, DType::F32, &Device::Cpu, None).unwrap();
        let quant = w.quant.clone().expect("a 4-bit checkpoint has 4-bit weights");
        let deq = want["dequantized"].as_object().unwrap();
        assert_eq!(quant.len(), deq.len(), "{name}: which weights are 4-bit");
        assert_eq!(w.spec.as_ref().unwrap().quant_type, spec_of(name).quant_type);
        for (wname, d) in deq {
            let q = quant.get(wname).unwrap_or_else(|| panic!("{name}: {wname} is not 4-bit here"));
            let values = q.dequantize();
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let first: Vec<f32> = d["first"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            assert_eq!(&values[..4], &first[..], "{name}: {wname}: first values");
            assert_eq!(blake3::hash(&bytes).to_hex().to_string(), d["blake3"].as_str().unwrap(), "{name}: {wname}: dequantized bytes");
        }
        let opts = dpo_pipeline::model::decoder::DecoderOptions { quantized: w.quant.clone(), ..Default::default() };
        let dec = Decoder::with_options(&cfg, &w.tensors, &opts).unwrap();
        for seq in want["logps"].as_array().unwrap() {
            let wanted: Vec<f64> = seq["token_logps"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            for (t, (a, b)) in seq_logps(&dec, &ids(&seq["ids"])).iter().zip(&wanted).enumerate() {
                assert!((*a as f64 - b).abs() < 5e-4, "{name}: token {t}: ours {a}, transformers {b}");
            }
        }
    }
}

#[test]
fn quantizing_on_load_gives_the_bytes_bitsandbytes_saves() {
    let g = golden_json();
    let d = tmp();
    for (name, _) in g["fixtures"].as_object().unwrap() {
        let family = name.split('-').next().unwrap();
        let model = tiny_model(d.path(), family);
        assert_eq!(
            g[format!("{family}_weights_blake3")].as_str().unwrap(),
            dpo_pipeline::store::file_hash(&model.join("model.safetensors")).unwrap().blake3,
            "the generated model changed: rerun scripts/make_bnb_golden.py"
        );
        let cfg = ModelConfig::load(&model).unwrap();
        let ours = weights::load_model(&model, &cfg, DType::F32, &Device::Cpu, Some(&spec_of(name))).unwrap().quant.unwrap();
        let dir = fixture(name);
        let theirs = weights::load_model(&dir, &ModelConfig::load(&dir).unwrap(), DType::F32, &Device::Cpu, None).unwrap().quant.unwrap();
        assert_eq!(ours.keys().collect::<std::collections::BTreeSet<_>>(), theirs.keys().collect(), "{name}: the quantized modules");
        for (wname, t) in theirs.iter() {
            let o = &ours[wname];
            assert_eq!(o.packed, t.packed, "{name}: {wname}: packed 4-bit codes");
            assert_eq!((o.rows, o.cols, o.blocksize), (t.rows, t.cols, t.blocksize));
            match (&o.nested, &t.nested) {
                (Some(a), Some(b)) => {
                    assert_eq!(a.codes, b.codes, "{name}: {wname}: 8-bit absmax codes");
                    assert_eq!(a.code, b.code, "{name}: {wname}: the 8-bit code book");
                    // The offset is the scales' mean: torch sums in float32 in its own order, we in
                    // f64, so it (and the scales of absmax − offset) may differ in the last bit.
                    let close = |x: f32, y: f32| (x - y).abs() <= 2.0 * f32::EPSILON * y.abs();
                    assert!(close(a.offset, b.offset), "{name}: {wname}: offset {} vs {}", a.offset, b.offset);
                    assert!(
                        a.absmax.iter().zip(&b.absmax).all(|(x, y)| (x - y).abs() <= 4.0 * f32::EPSILON * b.offset.abs().max(y.abs())),
                        "{name}: {wname}: nested scales"
                    );
                    assert!(o.scales().iter().zip(&t.scales()).all(|(x, y)| (x - y).abs() <= 1e-6 * y.abs()), "{name}: {wname}: block scales");
                }
                (None, None) => assert_eq!(o.absmax, t.absmax, "{name}: {wname}: absmax"),
                _ => panic!("{name}: {wname}: double quantization differs"),
            }
        }
    }
}

#[test]
fn qlora_over_a_4bit_base_follows_trl_and_peft_and_merges() {
    let g = golden_json();
    let d = tmp();
    let p = d.path();
    copy_dir(&fixture("llama-nf4-dq"), &p.join("base4"));
    copy_dir(&fixture("qlora_adapter"), &p.join("adapter"));
    ok(p, &["synth-prefs", "--out", "traj.parquet", "--rows", "64", "--seed", "0"]);
    assert_eq!(g["data_blake3"].as_str().unwrap(), dpo_pipeline::store::file_hash(&p.join("traj.parquet")).unwrap().blake3);
    let st = &g["settings"];
    let arg = |k: &str| st[k].to_string();
    ok(p, &["prepare", "--input", "traj.parquet", "--model", "base4", "--out", "prep", "--max-length", &arg("max_length")]);
    // TRL's reference for an adapter whose B is 0: the 4-bit base with the adapter off.
    ok(p, &["cache-ref", "--prepared", "prep", "--model", "base4", "--out", "cache"]);
    let train = |out: &str, extra: &[&str]| {
        let mut a = vec![
            "train", "--prepared", "prep", "--ref-cache", "cache", "--model", "base4", "--out", out, "--beta", "0.1", "--lr", "1e-3", "--batch-size",
            "4", "--max-steps", "16", "--max-grad-norm", "0", "--shuffle", "false", "--eval-every", "0", "--save-every", "0",
        ];
        a.extend_from_slice(extra);
        ok(p, &a)
    };
    train("t", &["--adapter", "adapter"]);
    let ours = read_rows(p, "t/metrics.parquet");
    let steps = g["steps"].as_array().unwrap();
    assert_eq!(ours.len(), steps.len());
    for (o, t) in ours.iter().zip(steps) {
        for k in ["loss", "grad_norm", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected"] {
            let (a, b) = (o[k].as_f64().unwrap(), t[k].as_f64().unwrap());
            assert!((a - b).abs() <= 5e-3 * b.abs().max(0.1), "step {} {k}: ours {a}, TRL {b}", t["step"]);
        }
    }
    // The adapter is PEFT's files; merging writes a plain full-precision HF model.
    let fin = p.join("t/final");
    assert!(fin.join("adapter_model.safetensors").exists() && fin.join("adapter_config.json").exists());
    ok(p, &["merge-lora", "--model", "base4", "--adapter", "t/final", "--out", "merged"]);
    let merged_cfg: Value = serde_json::from_str(&std::fs::read_to_string(p.join("merged/config.json")).unwrap()).unwrap();
    assert!(merged_cfg.get("quantization_config").is_none(), "a merged model is full precision");
    let merged = dpo_pipeline::model::load_decoder(&p.join("merged"), DType::F32, None, &Device::Cpu).unwrap();
    let policy = dpo_pipeline::train::policy::Policy::load_with(
        &p.join("base4"),
        DType::F32,
        &dpo_pipeline::train::policy::Trainable::Adapter(fin),
        &Device::Cpu,
    )
    .unwrap();
    let seq: Vec<u32> = (5..40).collect();
    for (t, (a, b)) in seq_logps(&merged, &seq).iter().zip(seq_logps(&policy.eval_decoder, &seq)).enumerate() {
        assert!((a - b).abs() < 1e-4, "token {t}: merged {a}, adapter over the 4-bit base {b}");
    }
    // Quantizing the full-precision model on load computes the same cache as the checkpoint.
    let full = tiny_model(p, "llama");
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
        std::fs::copy(p.join("base4").join(f), full.join(f)).unwrap(); // transformers re-saved them
    }
    ok(p, &["cache-ref", "--prepared", "prep", "--model", s(&full), "--out", "cache_q", "--load-in-4bit", "--bnb-4bit-use-double-quant"]);
    let (a, b) = (read_rows(p, "cache/ref_logps.parquet"), read_rows(p, "cache_q/ref_logps.parquet"));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        // (equal 4-bit codes; the scales may differ in their last bit, see above)
        let (x, y) = (x["ref_chosen_logps"].as_f64().unwrap(), y["ref_chosen_logps"].as_f64().unwrap());
        assert!((x - y).abs() < 1e-4, "quantized on load {y}, the published checkpoint {x}");
    }
    // A new adapter over the 4-bit base, with gradient checkpointing, trains.
    train("t_new", &["--lora-r", "4", "--lora-targets", "all-linear", "--gradient-checkpointing"]);
    let first = &read_rows(p, "t_new/metrics.parquet")[0];
    assert!((first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-5, "a new adapter starts at the reference: {first}");
}

#[test]
fn refusals_name_the_fix() {
    let d = tmp();
    let p = d.path();
    copy_dir(&fixture("llama-nf4-dq"), &p.join("base4"));
    prepare_synth(p, &p.join("base4"), "16", "4");
    ok(p, &["cache-ref", "--prepared", "prep", "--model", "base4", "--out", "cache"]);
    let e = fails(p, &["train", "--prepared", "prep", "--ref-cache", "cache", "--model", "base4", "--out", "t", "--max-steps", "1"]);
    assert!(e.contains("full fine-tuning") && e.contains("--lora-r"), "{e}");
    let e = fails(p, &["train", "--prepared", "prep", "--ref-cache", "cache", "--out", "t", "--load-in-4bit", "--max-steps", "1"]);
    assert!(e.contains("--load-in-4bit") && e.contains("--lora-r"), "{e}");
    let e = fails(p, &["cache-ref", "--prepared", "prep", "--model", "base4", "--out", "c2", "--load-in-4bit", "--bnb-4bit-quant-type", "fp4"]);
    assert!(e.contains("already quantized") && e.contains("nf4") && e.contains("fp4"), "{e}");
    // Other quantization methods: one clear error naming the method.
    let cfg_path = p.join("base4/config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["quantization_config"] = serde_json::json!({"quant_method": "gptq", "bits": 4});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = fails(p, &["cache-ref", "--prepared", "prep", "--model", "base4", "--out", "c3"]);
    assert!(e.contains("`gptq`") && e.contains("config.json"), "{e}");
}

#[test]
fn init_model_writes_bf16_weights_a_tensor_at_a_time() {
    let d = tmp();
    let p = d.path();
    ok(p, &["init-model", "--arch", "llama", "--size", "tiny", "--dtype", "bf16", "--out", "m"]);
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(p.join("m/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "bfloat16");
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(p.join("m/model.safetensors")).unwrap() };
    let c = ModelConfig::load(&p.join("m")).unwrap();
    assert_eq!(st.tensors().len(), weights::tensor_names(&c).len());
    for (name, v) in st.tensors() {
        assert_eq!(v.dtype(), safetensors::Dtype::BF16, "{name}");
    }
    let q = st
        .load("model.layers.0.self_attn.q_proj.weight", &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let sd = (q.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / q.len() as f64).sqrt();
    assert!((sd - 0.02).abs() < 0.002, "weights N(0, 0.02): std {sd}");
    // It loads, and 4-bit quantization of it runs.
    let dec =
        dpo_pipeline::model::load_decoder(&p.join("m"), DType::F32, Some(&QuantSpec::new(QuantType::Nf4, true, DType::F32)), &Device::Cpu).unwrap();
    assert!(seq_logps(&dec, &[1, 5, 9, 30]).iter().all(|x| x.is_finite() && *x < 0.0));
}
