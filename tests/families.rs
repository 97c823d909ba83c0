//! Every model family against transformers 5.23 on tiny random models of the family
//! (tests/golden/families, scripts/make_family_golden.py): per-token log-probs, every layout
//! against each sequence alone, greedy generation with the key-value cache, reward-model scores,
//! a DPO step's loss and every parameter's gradient (PyTorch autograd, MoE aux loss included),
//! gradient checkpointing, and the stages end to end (full, LoRA, bf16) with checkpoints that keep
//! the checkpoint's own tensor names.
mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use dpo_pipeline::data::prepared::PairView;
use dpo_pipeline::generate::{generate, Request, Sampling};
use dpo_pipeline::model::reward::RewardModel;
use dpo_pipeline::model::{load_decoder, weights, ModelConfig};
use dpo_pipeline::score::layout::LayoutKind;
use dpo_pipeline::score::pair_logps;
use dpo_pipeline::store::file_hash;
use dpo_pipeline::train::loss::LossConfig;
use dpo_pipeline::train::policy::{Policy, Trainable};
use dpo_pipeline::train::step::{batch_loss, gradients, Refs, Whole};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

const FAMILIES: [&str; 8] = ["qwen3", "qwen3_moe", "mixtral", "gemma2", "gemma3", "phi3", "olmo2", "smollm3"];

fn golden_family(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(golden(&format!("families/{name}.json"))).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The family's tiny model (the one the golden values came from).
fn model(dir: &Path, fam: &str) -> std::path::PathBuf {
    let m = tiny_model(dir, fam);
    let g = golden_family(fam);
    assert_eq!(g["weights_blake3"].as_str().unwrap(), file_hash(&m.join("model.safetensors")).unwrap().blake3, "{fam}: regenerate the golden values");
    m
}

#[test]
fn every_family_computes_transformers_log_probs_in_every_layout() {
    let d = tmp();
    for fam in FAMILIES {
        let m = model(d.path(), fam);
        let g = golden_family(fam);
        let dec = load_decoder(&m, DType::F32, None, &Device::Cpu).unwrap();
        for seq in g["sequences"].as_array().unwrap() {
            let ids = ids(&seq["ids"]);
            let want: Vec<f64> = seq["token_logps"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let got = seq_logps(&dec, &ids);
            for (t, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((*a as f64 - b).abs() < 2e-5, "{fam}: sequence of {} tokens, token {t}: ours {a}, transformers {b}", ids.len());
            }
        }
        // Packed, shared-prompt and padded batches give each pair what it gets alone.
        let pairs: Vec<(Vec<u32>, Vec<u32>, Vec<u32>)> =
            g["pairs"].as_array().unwrap().iter().map(|p| (ids(&p["prompt"]), ids(&p["chosen"]), ids(&p["rejected"]))).collect();
        let views: Vec<PairView> = pairs.iter().map(|(p, c, r)| PairView::whole(0, p, c, r)).collect();
        let alone = |p: &[u32], c: &[u32]| -> f32 {
            let s: Vec<u32> = p.iter().chain(c).copied().collect();
            seq_logps(&dec, &s)[p.len() - 1..].iter().sum()
        };
        let seq = &g["step"]["seq_logps"];
        // Long-rope picks its factors by the longest position of the whole forward (as
        // transformers does for a batch), so a pair's values depend on its batch there.
        let batch_dependent = dec.cfg.ropes.iter().any(|r| matches!(r.kind, dpo_pipeline::model::config::RopeType::LongRope { .. }));
        for kind in [LayoutKind::Packed, LayoutKind::SharedPrompt, LayoutKind::Padded] {
            let lp = pair_logps(&dec, kind, &views).unwrap();
            let (c, r): (Vec<f32>, Vec<f32>) = (lp.chosen.to_vec1().unwrap(), lp.rejected.to_vec1().unwrap());
            for (i, (p, ch, rj)) in pairs.iter().enumerate() {
                if !batch_dependent {
                    assert!((c[i] - alone(p, ch)).abs() < 2e-5, "{fam} {kind:?} pair {i}: chosen");
                    assert!((r[i] - alone(p, rj)).abs() < 2e-5, "{fam} {kind:?} pair {i}: rejected");
                }
                // and what transformers computed for the DPO step's sequences
                assert!((c[i] as f64 - seq[2 * i].as_f64().unwrap()).abs() < 1e-4, "{fam} {kind:?} pair {i}: chosen vs transformers");
                assert!((r[i] as f64 - seq[2 * i + 1].as_f64().unwrap()).abs() < 1e-4, "{fam} {kind:?} pair {i}: rejected vs transformers");
            }
        }
    }
}

#[test]
fn every_family_generates_greedily_as_transformers_and_scores_as_its_reward_model() {
    let d = tmp();
    for fam in FAMILIES {
        let m = model(d.path(), fam);
        let g = golden_family(fam);
        let dec = load_decoder(&m, DType::F32, None, &Device::Cpu).unwrap();
        let cases = g["generate"].as_array().unwrap();
        let requests: Vec<Request> = cases.iter().map(|c| Request { prompt: ids(&c["prompt"]), seeds: vec![0] }).collect();
        let greedy = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0 };
        let out = generate(&dec, &requests, 8, &[], &greedy, &mut |_| {}).unwrap();
        for (c, got) in cases.iter().zip(&out) {
            assert_eq!(got[0].ids, ids(&c["completion"]), "{fam}: greedy continuation of {:?}", c["prompt"]);
        }
        // The family's *ForSequenceClassification.
        let rm_dir = d.path().join(format!("rm_{fam}"));
        ok(d.path(), &["init-model", "--arch", fam, "--seed", "0", "--reward", "--out", s(&rm_dir)]);
        let rm = RewardModel::load(&rm_dir, DType::F32, None, &Device::Cpu).unwrap();
        for r in g["rewards"].as_array().unwrap() {
            let got = rm.scores(&[&ids(&r["ids"])]).unwrap()[0] as f64;
            let want = r["score"].as_f64().unwrap();
            assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "{fam}: reward {got} vs transformers {want}");
        }
    }
}

/// Our parameters' gradients by transformers' parameter names (MoE experts as transformers 5
/// holds them: one [E, 2I, H] gate_up_proj, gate rows first, and one [E, H, I] down_proj).
fn by_hf_names(names: &[String], grads: &[Tensor], cfg: &ModelConfig) -> BTreeMap<String, Vec<f64>> {
    let flat = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut experts: BTreeMap<(String, usize), BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for (n, g) in names.iter().zip(grads) {
        let n = n.replace(".block_sparse_moe.", ".mlp.");
        match n.split_once(".experts.") {
            Some((layer, rest)) => {
                let (e, part) = rest.split_once('.').unwrap();
                experts.entry((layer.to_string(), e.parse().unwrap())).or_default().insert(part.to_string(), flat(g));
            }
            None => {
                out.insert(n, flat(g));
            }
        }
    }
    let e_count = cfg.moe.as_ref().map_or(0, |m| m.num_experts);
    let layers: Vec<String> = experts.keys().map(|(l, _)| l.clone()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    for l in layers {
        let (mut gate_up, mut down) = (Vec::new(), Vec::new());
        for e in 0..e_count {
            let p = &experts[&(l.clone(), e)];
            let get = |a: &str, b: &str| p.get(a).or(p.get(b)).unwrap().clone();
            gate_up.extend(get("gate_proj.weight", "w1.weight"));
            gate_up.extend(get("up_proj.weight", "w3.weight"));
            down.extend(get("down_proj.weight", "w2.weight"));
        }
        out.insert(format!("{l}.experts.gate_up_proj"), gate_up);
        out.insert(format!("{l}.experts.down_proj"), down);
    }
    out
}

#[test]
fn every_family_s_dpo_gradients_match_pytorch_autograd() {
    let d = tmp();
    for fam in FAMILIES {
        let m = model(d.path(), fam);
        let g = golden_family(fam);
        for checkpointing in [false, true] {
            let policy = Policy::load_mixed(&m, DType::F32, None, &Trainable::Full, checkpointing, None, &Device::Cpu).unwrap();
            let gp = g["pairs"].as_array().unwrap();
            let data: Vec<(Vec<u32>, Vec<u32>, Vec<u32>)> = gp.iter().map(|p| (ids(&p["prompt"]), ids(&p["chosen"]), ids(&p["rejected"]))).collect();
            let pairs: Vec<PairView> = data.iter().map(|(p, c, r)| PairView::whole(0, p, c, r)).collect();
            let rc: Vec<f32> = gp.iter().map(|p| p["ref_chosen"].as_f64().unwrap() as f32).collect();
            let rr: Vec<f32> = gp.iter().map(|p| p["ref_rejected"].as_f64().unwrap() as f32).collect();
            let coef = policy.cfg.moe.as_ref().map_or(0.0, |m| m.router_aux_loss_coef);
            let mut settings = LossConfig::sigmoid(g["beta"].as_f64().unwrap());
            settings.router_aux_loss_coef = coef;
            let refs = Refs { chosen: &rc, rejected: &rr, chosen_shared: None, rejected_shared: None };
            let b = batch_loss(&policy.decoder, LayoutKind::Packed, &settings, &pairs, Some(refs), Whole::of(&pairs), &mut |_| {}).unwrap();
            let loss = b.loss.to_scalar::<f32>().unwrap() as f64;
            let want_loss = g["step"]["loss"].as_f64().unwrap();
            assert!((loss - want_loss).abs() < 1e-5, "{fam}: loss {loss} vs PyTorch {want_loss}");
            if let Some(a) = g["step"]["aux_loss"].as_f64() {
                assert!((b.aux_loss.unwrap() - a).abs() < 1e-5, "{fam}: aux loss {:?} vs {a}", b.aux_loss);
            }
            let grads = gradients(&b.loss, &policy).unwrap();
            let ours = by_hf_names(&policy.names, &grads, &policy.cfg);
            let want = g["step"]["grads"].as_object().unwrap();
            assert_eq!(
                ours.keys().collect::<Vec<_>>(),
                want.keys().collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>(),
                "{fam}: parameters"
            );
            for (name, w) in want {
                let v = &ours[name];
                let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
                let dot: f64 = v.iter().enumerate().map(|(i, x)| x * (0.7 * i as f64).cos()).sum();
                let (wn, wd) = (w["norm"].as_f64().unwrap(), w["dot"].as_f64().unwrap());
                let tol = 1e-4 * wn.max(1e-6);
                assert!((norm - wn).abs() <= tol, "{fam} (checkpointing {checkpointing}): {name}: gradient norm {norm} vs PyTorch {wn}");
                assert!(
                    (dot - wd).abs() <= tol * (v.len() as f64).sqrt(),
                    "{fam} (checkpointing {checkpointing}): {name}: gradient·r {dot} vs PyTorch {wd}"
                );
            }
        }
    }
}

#[test]
fn every_family_runs_every_stage_and_saves_what_it_loaded() {
    let d = tmp();
    ok(d.path(), &["synth-prefs", "--out", "in.parquet", "--rows", "24", "--eval-rows", "8"]);
    for fam in FAMILIES {
        let m = model(d.path(), fam);
        let p = format!("prep_{fam}");
        ok(d.path(), &["prepare", "--input", "in.parquet", "--eval-input", "in.eval.parquet", "--model", s(&m), "--out", &p, "--max-length", "48"]);
        let c = format!("cache_{fam}");
        ok(d.path(), &["cache-ref", "--prepared", &p, "--model", s(&m), "--out", &c]);
        let common = ["--prepared", &p, "--ref-cache", &c, "--batch-size", "4", "--max-steps", "2", "--eval-every", "2", "--lr", "1e-3"];
        let run = |out: &str, extra: &[&str]| {
            let mut a = vec!["train", "--out", out];
            a.extend(common);
            a.extend(extra);
            ok(d.path(), &a);
        };
        let full = format!("full_{fam}");
        run(&full, &["--gradient-checkpointing"]);
        run(&format!("bf16_{fam}"), &["--dtype", "bf16"]);
        let targets = if fam.ends_with("moe") || fam == "mixtral" { "q_proj,k_proj,v_proj,o_proj" } else { "all-linear" };
        run(&format!("lora_{fam}"), &["--lora-r", "4", "--lora-targets", targets]);
        // The final checkpoint holds exactly the tensors the model came with (the names
        // transformers loads, verified by the golden script), under the same config.
        let cfg = ModelConfig::load(&m).unwrap();
        let saved = d.path().join(&full).join("final");
        let names = |dir: &Path| -> Vec<String> {
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&weights::weight_files(dir).unwrap()) }.unwrap();
            let mut n: Vec<String> = st.tensors().into_iter().map(|(k, _)| k).collect();
            n.sort();
            n
        };
        let mut want = weights::tensor_names(&cfg);
        want.sort();
        assert_eq!(names(&saved), want, "{fam}: saved tensors");
        assert_eq!(names(&m), want, "{fam}: the generated model");
        let sc = ModelConfig::load(&saved).unwrap();
        assert_eq!((sc.model_type, sc.num_hidden_layers), (cfg.model_type.clone(), cfg.num_hidden_layers));
        let metrics = read_rows(d.path(), &format!("{full}/metrics.parquet"));
        let last = metrics.iter().rev().find(|r| r["loss"].is_number()).unwrap();
        assert!(last["peak_memory_gb"].as_f64().unwrap() > 0.0);
        assert_eq!(last["aux_loss"].is_number(), cfg.moe.is_some(), "{fam}: aux_loss logged exactly for MoE models");
        // Greedy sampling from the trained policy.
        ok(
            d.path(),
            &[
                "sample",
                "--model",
                s(&saved),
                "--prompts",
                "in.eval.parquet",
                "--out",
                &format!("samples_{fam}"),
                "--num-samples",
                "1",
                "--max-new-tokens",
                "4",
                "--temperature",
                "0",
            ],
        );
    }
}

/// LoRA is PEFT's on every family: an adapter PEFT 0.21 wrote (`all-linear`, or the attention
/// projections on MoE models; r 2 with random B) loads into ours and gives the log-probs PEFT's
/// model gives; and a new adapter of ours with the same targets holds exactly PEFT's tensors
/// (names and shapes) and target modules, so PEFT loads what we write. (PEFT writes Phi-3's
/// `all-linear` as every layer's module path, which ours reads as PEFT matches it.)
#[test]
fn every_family_s_lora_adapters_are_peft_s() {
    use dpo_pipeline::model::lora::LoraConfig;
    let d = tmp();
    let tensors = |file: &Path| -> BTreeMap<String, Vec<usize>> {
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(file) }.unwrap();
        st.tensors().into_iter().map(|(k, v)| (k, v.shape().to_vec())).collect()
    };
    let targets_of = |dir: &Path| -> std::collections::BTreeSet<String> {
        let c: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
        match &c["target_modules"] {
            Value::String(s) => [s.clone()].into(),
            // PEFT writes whole paths for some families (phi3): compare the module names.
            v => v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().rsplit('.').next().unwrap().to_string()).collect(),
        }
    };
    for fam in FAMILIES {
        let m = model(d.path(), fam);
        let g = golden_family(fam);
        let lg = &g["lora"];
        let peft_dir = golden(&format!("families/{}", lg["adapter"].as_str().unwrap()));
        let policy = Policy::load_mixed(&m, DType::F32, None, &Trainable::Adapter(peft_dir.clone()), false, None, &Device::Cpu).unwrap();
        let mut moved = 0f64;
        for (seq, want) in g["sequences"].as_array().unwrap().iter().zip(lg["token_logps"].as_array().unwrap()) {
            let ours = seq_logps(&policy.eval_decoder, &ids(&seq["ids"]));
            let (want, base): (Vec<f64>, Vec<f64>) = (
                want.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect(),
                seq["token_logps"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect(),
            );
            for (t, (a, b)) in ours.iter().zip(&want).enumerate() {
                assert!((*a as f64 - b).abs() < 1e-4, "{fam}: token {t}: ours with PEFT's adapter {a}, PEFT {b}");
            }
            moved = want.iter().zip(&base).map(|(a, b)| (a - b).abs()).fold(moved, f64::max);
        }
        assert!(moved > 1e-3, "{fam}: the adapter changes the log-probs ({moved})");
        let targets = match &lg["targets"] {
            Value::String(s) => s.clone(),
            v => v.as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect::<Vec<_>>().join(","),
        };
        let new = Trainable::NewLora { config: LoraConfig::new(2, 4.0, &targets, 0.0).unwrap(), seed: 1 };
        let ours = Policy::load_mixed(&m, DType::F32, None, &new, false, None, &Device::Cpu).unwrap();
        let out = d.path().join(format!("ours_{fam}"));
        ours.save(&out, &m).unwrap();
        assert_eq!(tensors(&out.join("adapter_model.safetensors")), tensors(&peft_dir.join("adapter_model.safetensors")), "{fam}: adapter tensors");
        assert_eq!(targets_of(&out), targets_of(&peft_dir), "{fam}: target_modules");
    }
}

/// Gemma 3 as published multimodal (`Gemma3ForConditionalGeneration`: `model_type` gemma3, the
/// text tower's settings under `text_config`, its tensors under `language_model.model.`): the
/// text tower computes what the same weights compute as a text model, trains, and a saved
/// checkpoint keeps the towers this tool does not train (vision, projector) as they came.
#[test]
fn gemma3_multimodal_checkpoints_train_their_text_tower_and_keep_the_rest() {
    let d = tmp();
    let text = model(d.path(), "gemma3");
    let mm = d.path().join("gemma3_mm");
    std::fs::create_dir_all(&mm).unwrap();
    let text_cfg: Value = serde_json::from_str(&std::fs::read_to_string(text.join("config.json")).unwrap()).unwrap();
    let cfg = serde_json::json!({
        "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text_cfg,
        "vision_config": {"model_type": "siglip_vision_model"}, "tie_word_embeddings": true
    });
    std::fs::write(mm.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(text.join(f), mm.join(f)).unwrap();
    }
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(text.join("model.safetensors")) }.unwrap();
    let mut tensors: std::collections::HashMap<String, Tensor> =
        st.tensors().into_iter().map(|(k, _)| (k.replacen("model.", "language_model.model.", 1), st.load(&k, &Device::Cpu).unwrap())).collect();
    let vision = Tensor::arange(0f32, 48.0, &Device::Cpu).unwrap().reshape((4, 3, 2, 2)).unwrap();
    tensors.insert("vision_tower.vision_model.embeddings.patch_embedding.weight".into(), vision.clone());
    candle_core::safetensors::save(&tensors, mm.join("model.safetensors")).unwrap();
    // The text tower computes the text model's log-probs.
    let g = golden_family("gemma3");
    let ids0 = ids(&g["sequences"][0]["ids"]);
    let (a, b) = (
        seq_logps(&load_decoder(&text, DType::F32, None, &Device::Cpu).unwrap(), &ids0),
        seq_logps(&load_decoder(&mm, DType::F32, None, &Device::Cpu).unwrap(), &ids0),
    );
    assert_eq!(a, b);
    // One training step, saved: the text tower under its names (moved), the vision tower as it was.
    let policy = Policy::load_mixed(&mm, DType::F32, None, &Trainable::Full, false, None, &Device::Cpu).unwrap();
    let gp = &g["pairs"][0];
    let (p, c, r) = (ids(&gp["prompt"]), ids(&gp["chosen"]), ids(&gp["rejected"]));
    let pairs = [PairView::whole(0, &p, &c, &r)];
    let refs = Refs { chosen: &[-30.0], rejected: &[-20.0], chosen_shared: None, rejected_shared: None };
    let b = batch_loss(&policy.decoder, LayoutKind::Packed, &LossConfig::sigmoid(0.1), &pairs, Some(refs), Whole::of(&pairs), &mut |_| {}).unwrap();
    let grads = gradients(&b.loss, &policy).unwrap();
    for (v, g) in policy.vars.iter().zip(&grads) {
        v.set(&(v.as_tensor() - (g * 1.0).unwrap()).unwrap()).unwrap();
    }
    let out = d.path().join("saved");
    policy.save(&out, &mm).unwrap();
    let saved = unsafe { candle_core::safetensors::MmapedSafetensors::new(out.join("model.safetensors")) }.unwrap();
    let names: std::collections::BTreeSet<String> = saved.tensors().into_iter().map(|(k, _)| k).collect();
    assert_eq!(names, tensors.keys().cloned().collect(), "the saved checkpoint has the published tensors");
    let v = saved.load("vision_tower.vision_model.embeddings.patch_embedding.weight", &Device::Cpu).unwrap();
    assert_eq!(v.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vision.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let k = "language_model.model.layers.0.self_attn.q_proj.weight";
    let moved = (saved.load(k, &Device::Cpu).unwrap() - tensors[k].to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
    assert!(moved.to_scalar::<f32>().unwrap() > 0.0, "the text tower trained");
    let saved_cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(saved_cfg["model_type"], "gemma3");
}
