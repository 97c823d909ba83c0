//! Unpaired feedback (KTO, APO-zero-unpaired) against TRL 1.16's KTOTrainer
//! (tests/golden/trl_kto.json and tests/golden/kto/*.parquet, from scripts/make_kto_golden.py):
//! the loss on fixed log-probs (value, gradient, metrics, from TRL's own loss code); prepare's
//! token ids and labels, cache-ref's completion and KL log-probs and 8-step trajectories against
//! the trainer itself; `prepare --unpair` against KTOTrainer unpairing pairs itself; refusals.
mod common;
use candle_core::{Device, Var};
use common::*;
use dpo_pipeline::data::prepared::{PairView, PreparedDataset, Split};
use dpo_pipeline::data::ref_cache::RefCache;
use dpo_pipeline::model::fused::TokenStats;
use dpo_pipeline::model::logprobs::Scored;
use dpo_pipeline::score::PairLogps;
use dpo_pipeline::train::loss::{LossConfig, LossType};
use dpo_pipeline::train::metrics::{Row, Stats};
use dpo_pipeline::train::step::{logps_options, unpaired_loss_of, Refs, Whole};
use serde_json::Value;
use std::path::Path;

fn load() -> Value {
    serde_json::from_str(&std::fs::read_to_string(golden("trl_kto.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

#[test]
fn kto_and_apo_zero_unpaired_match_trl_in_value_gradient_and_metrics() {
    let g = load();
    let inp = &g["loss_cases"]["inputs"];
    let lens = |k: &str| inp[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect::<Vec<_>>();
    let (prompt_lens, comp_lens, kl_lens) = (lens("prompt_lens"), lens("completion_lens"), lens("kl_completion_lens"));
    let (mask, kl_mask) = (grid(&inp["completion_mask"]), grid(&inp["kl_completion_mask"]));
    let (pol, kl_pol) = (grid(&inp["policy_per_token_logps"]), grid(&inp["kl_policy_per_token_logps"]));
    let (ent, ml) = (grid(&inp["entropy"]), grid(&inp["mean_logits"]));
    let n = prompt_lens.len();
    // TRL's row r scores shifted position t when its mask has t + 1; ours: sequence 2r is the
    // row's completion, 2r + 1 its KL completion.
    let positions = |m: &[Vec<f64>], r: usize| (0..m[r].len() - 1).filter(|&t| m[r][t + 1] == 1.0).collect::<Vec<_>>();
    let mut scored = Scored { rows: vec![], targets: vec![], seq: vec![], num_seqs: 2 * n };
    let (mut logps, mut at, mut stats) = (vec![], vec![], TokenStats::default());
    for r in 0..n {
        for (s, m, lp) in [(2 * r, &mask, &pol), (2 * r + 1, &kl_mask, &kl_pol)] {
            for t in positions(m, r) {
                scored.seq.push(s as u32);
                scored.rows.push(0);
                scored.targets.push(0);
                logps.push(lp[r][t]);
                at.push((s, r, t));
                let main = s % 2 == 0;
                stats.entropy.push(if main { ent[r][t] as f32 } else { 0.0 });
                stats.mean_logit.push(if main { ml[r][t] as f32 } else { 0.0 });
                stats.log_sum_sq.push(0.0);
                stats.top1.push(false);
            }
        }
    }
    let ref_c: Vec<f32> = inp["ref_logps"].as_array().unwrap().iter().map(|x| f(x) as f32).collect();
    let zeros = [0u32; 16];
    let mut checked = 0;
    for case in g["loss_cases"]["cases"].as_array().unwrap() {
        let label: Vec<bool> = case["label"].as_array().unwrap().iter().map(|x| x.as_bool().unwrap()).collect();
        let pairs: Vec<PairView> = (0..n)
            .map(|i| PairView { label: Some(label[i]), ..PairView::whole(i, &zeros[..prompt_lens[i]], &zeros[..comp_lens[i]], &zeros[..kl_lens[i]]) })
            .collect();
        let mut c = LossConfig::sigmoid(f(&case["beta"]));
        c.terms = vec![(LossType::parse(case["loss_type"].as_str().unwrap()).unwrap(), 1.0)];
        c.desirable_weight = f(&case["desirable_weight"]);
        c.undesirable_weight = f(&case["undesirable_weight"]);
        c.validate().unwrap();
        let key = if case["kl_above"].as_bool().unwrap() { "ref_kl_logps_above" } else { "ref_kl_logps_below" };
        let ref_kl: Vec<f32> = inp[key].as_array().unwrap().iter().map(|x| f(x) as f32).collect();
        let refs = Refs { chosen: &ref_c, rejected: &ref_kl, chosen_shared: None, rejected_shared: None };
        let name = format!("{} labels {:?} weights {} {} β {}", case["loss_type"], label, c.desirable_weight, c.undesirable_weight, c.beta);
        let var = Var::from_vec(logps.clone(), logps.len(), &Device::Cpu).unwrap();
        let lp = PairLogps::from_tokens(&pairs, var.as_tensor().clone(), scored.clone(), stats.clone(), logps_options(&c), None).unwrap();
        let mut reduced = 0;
        let b = unpaired_loss_of(&c, &pairs, &lp, Some(refs), Whole::of(&pairs), &mut |_| reduced += 1).unwrap();
        assert_eq!(reduced, 1, "one reduction per micro-batch");
        let loss = b.loss.to_scalar::<f64>().unwrap();
        assert!(close(loss, f(&case["loss"]), 2e-6), "{name}: loss {loss}, TRL {}", case["loss"]);
        let grads = b.loss.backward().unwrap();
        let got = grads.get(var.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        let want = grid(&case["grad_wrt_policy_token_logps"]);
        for (k, &(s, r, t)) in at.iter().enumerate() {
            // The KL completions carry no gradient (TRL scores them under no_grad).
            let w = if s % 2 == 0 { want[r][t] } else { 0.0 };
            assert!((got[k] - w).abs() <= 2e-6 * w.abs().max(1e-2), "{name}: dloss/dlogp seq {s} position {t}: {} vs TRL {w}", got[k]);
        }
        let mut st = Stats::default();
        b.record(&mut st);
        let mut row = Row::new();
        st.into_row("", &mut row);
        let want = case["metrics"].as_object().unwrap();
        for (k, v) in want {
            if k == "num_tokens" {
                assert_eq!(b.trl_tokens as f64, f(v), "{name}: num_tokens");
                continue;
            }
            let ours = row.get(k).unwrap_or_else(|| panic!("{name}: no metric {k} (ours: {:?})", row.keys()));
            assert!(close(*ours, f(v), 2e-6), "{name}: {k} {ours}, TRL {v}");
        }
        // What TRL leaves out (margins without both sides, a side with no rows) we leave out too.
        for k in row.keys().filter(|k| *k != "loss") {
            assert!(want.contains_key(k), "{name}: {k} logged, TRL has no such value for this batch");
        }
        checked += 1;
    }
    assert_eq!(checked, 8);
}

/// Prepared rows (their own completion and their KL completion) and labels, as TRL tokenized them.
fn assert_rows_match(prep: &mut PreparedDataset, rows: &Value, what: &str) {
    prep.set_kl_blocks(4);
    let n = rows["label"].as_array().unwrap().len();
    assert_eq!(prep.len(), n, "{what}: rows");
    for i in 0..n {
        let p = prep.pair(i);
        assert_eq!(p.prompt, ids(&rows["prompt_ids"][i]), "{what}: row {i} prompt ids");
        assert_eq!(p.chosen, ids(&rows["completion_ids"][i]), "{what}: row {i} completion ids");
        assert_eq!(p.label, rows["label"][i].as_bool(), "{what}: row {i} label");
        if let Some(kl) = rows.get("KL_completion_ids") {
            assert_eq!(p.rejected, ids(&kl[i]), "{what}: row {i} KL completion ids");
        }
    }
}

/// The golden's model and its inputs, rebuilt here and checked against the recorded hashes.
fn setup(p: &Path, g: &Value) -> std::path::PathBuf {
    let model = tiny_model(p, "llama");
    let hash = |f: &Path| dpo_pipeline::store::file_hash(f).unwrap().blake3;
    assert_eq!(g["weights_blake3"].as_str().unwrap(), hash(&model.join("model.safetensors")), "regenerate golden values");
    model
}

fn trajectory(run: &Value, g: &Value) {
    let d = tmp();
    let p = d.path();
    let model = setup(p, g);
    let name = run["name"].as_str().unwrap();
    let data = golden(&format!("kto/{}", run["data"].as_str().unwrap()));
    assert_eq!(run["data_blake3"].as_str().unwrap(), dpo_pipeline::store::file_hash(&data).unwrap().blake3);
    let st = &g["settings"];
    let arg = |k: &str| st[k].to_string();
    let (ml, lr, bs, steps) = (arg("max_length"), arg("lr"), arg("batch_size"), arg("max_steps"));
    ok(p, &["prepare", "--input", s(&data), "--model", s(&model), "--out", "prep", "--max-length", &ml]);
    let e = ok(p, &["cache-ref", "--prepared", "prep", "--model", s(&model), "--out", "cache", "--kl-batch-size", &bs]);
    assert!(e.contains("KL completions"), "{e}");
    let mut prep = PreparedDataset::open(&p.join("prep")).unwrap();
    let trl_rows = &run["trl_rows"];
    assert_rows_match(&mut prep, trl_rows, name);
    // cache-ref's log-probs of each completion and of its KL completion, against the reference
    // TRL precomputed (transformers' forward in f32).
    let cache = RefCache::open(&p.join("cache"), &prep).unwrap();
    check_schema(p, "ref_logps.unpaired.parquet.json", "cache/ref_logps.parquet");
    for (col, key) in [(&cache.chosen, "ref_logps"), (&cache.rejected, "ref_KL_logps")] {
        // (apo_zero_unpaired has no KL term, and TRL computes no KL log-probs for it.)
        for (i, want) in trl_rows.get(key).and_then(Value::as_array).into_iter().flatten().enumerate() {
            let (a, b) = (col.as_slice()[i] as f64, f(want));
            assert!((a - b).abs() <= 2e-4 * b.abs().max(1.0), "{name}: row {i} {key}: ours {a}, TRL {b}");
        }
    }
    let mut args = vec!["train", "--prepared", "prep", "--ref-cache", "cache", "--out", "t", "--lr", &lr, "--batch-size", &bs, "--max-steps", &steps];
    args.extend(["--max-grad-norm", "0", "--shuffle", "false", "--scheduler", "linear", "--eval-every", "0", "--save-every", "0"]);
    let flags: Vec<&str> = run["flags"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    if !flags.contains(&"--loss") {
        args.extend(["--loss", "kto"]);
    }
    args.extend(&flags);
    let e = ok(p, &args);
    assert!(!e.contains("warning"), "{name}: the weights are in TRL's range: {e}");
    let ours = read_rows(p, "t/metrics.parquet");
    let want = run["trl_steps"].as_array().unwrap();
    assert_eq!(ours.len(), want.len(), "{name}");
    let keys = [
        "loss", "kl", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "entropy", "num_tokens",
    ];
    for (o, t) in ours.iter().zip(want) {
        assert_eq!(o["step"], t["step"]);
        for k in keys {
            let Some(b) = t.get(k).and_then(Value::as_f64) else {
                assert!(o[k].is_null(), "{name}: step {} {k}: ours {}, TRL logged none", t["step"], o[k]);
                continue;
            };
            let a = o[k].as_f64().unwrap_or_else(|| panic!("{name}: step {}: no {k} in our metrics", t["step"]));
            // TRL's fused lm-head gradients sit 0.15-0.3% below exact autograd's; the rewards and
            // KL are β × differences of sums of ~40, rounded relative to those sums.
            let floor = if k.starts_with("rewards/") || k == "kl" { 0.1 } else { 1e-2 };
            assert!((a - b).abs() <= 5e-3 * b.abs().max(floor), "{name}: step {} {k}: ours {a}, TRL {b}", t["step"]);
        }
    }
}

#[test]
fn kto_on_balanced_standard_data_matches_trl_kto_trainer() {
    let g = load();
    trajectory(&g["runs"][0], &g);
}

#[test]
fn kto_on_unbalanced_weighted_data_with_grad_accum_matches_trl() {
    let g = load();
    trajectory(&g["runs"][1], &g);
}

#[test]
fn kto_on_conversational_data_matches_trl() {
    let g = load();
    trajectory(&g["runs"][2], &g);
}

#[test]
fn apo_zero_unpaired_matches_trl() {
    let g = load();
    trajectory(&g["runs"][3], &g);
}

/// `prepare --unpair` gives the rows KTOTrainer makes of pairs (its unpair_preference_dataset,
/// chosen halves then rejected halves per block of 1,000), with the same ids.
#[test]
fn prepare_unpair_gives_the_rows_trl_kto_makes_of_pairs() {
    let g = load();
    let d = tmp();
    let p = d.path();
    let model = setup(p, &g);
    ok(p, &["synth-prefs", "--out", "pairs.parquet", "--rows", "64", "--seed", "0"]);
    assert_eq!(g["pairs_blake3"].as_str().unwrap(), dpo_pipeline::store::file_hash(&p.join("pairs.parquet")).unwrap().blake3);
    let e = ok(p, &["prepare", "--input", "pairs.parquet", "--model", s(&model), "--out", "prep", "--max-length", "64", "--unpair"]);
    assert!(e.contains("128 unpaired rows (64 desirable, 64 undesirable)"), "{e}");
    let mut prep = PreparedDataset::open(&p.join("prep")).unwrap();
    assert_rows_match(&mut prep, &g["unpaired_from_pairs"], "--unpair");
    // The polars view: one row per labelled completion.
    let rows = read_rows(p, "prep/unpaired.parquet");
    assert_eq!(rows.len(), 128);
    assert_eq!(rows[0]["source_row"], 0);
    assert_eq!(rows[64]["source_row"], 0, "row 64 is pair 0's rejected half");
    assert_eq!((rows[0]["label"].as_bool(), rows[64]["label"].as_bool()), (Some(true), Some(false)));
    check_schema(&p.join("prep"), "unpaired.parquet.json", "unpaired.parquet");
    // Pairs and their halves stay in one split.
    let e = ok(p, &["prepare", "--input", "pairs.parquet", "--model", s(&model), "--out", "prep2", "--unpair", "--eval-fraction", "0.3"]);
    assert!(e.contains("unpaired rows"), "{e}");
    let prep = PreparedDataset::open(&p.join("prep2")).unwrap();
    let split: Vec<Split> = (0..prep.len()).map(|i| prep.split_of(i)).collect();
    assert_eq!(split[..64], split[64..], "a pair's halves share its split");
    assert!(split.contains(&Split::Eval) && split.contains(&Split::Train));
}

/// Each stage refuses the wrong kind of data, and bad unpaired input, naming what to do.
#[test]
fn unpaired_refusals_name_the_way_out() {
    let d = tmp();
    let p = d.path();
    let model = tiny_model(p, "llama");
    let m = s(&model);
    prepare_synth(p, &model, "16", "4");
    ok(p, &["cache-ref", "--prepared", "prep", "--model", m, "--out", "cache"]);
    let e = fails(p, &["train", "--prepared", "prep", "--ref-cache", "cache", "--out", "t", "--loss", "kto", "--max-steps", "1"]);
    assert!(e.contains("holds pairs") && e.contains("--unpair"), "{e}");
    let e = fails(p, &["cache-ref", "--prepared", "prep", "--model", m, "--out", "cache2", "--kl-batch-size", "4"]);
    assert!(e.contains("--kl-batch-size is for unpaired data"), "{e}");
    let data = golden("kto/standard.parquet");
    ok(p, &["prepare", "--input", s(&data), "--model", m, "--out", "un", "--max-length", "64"]);
    let e = fails(p, &["cache-ref", "--prepared", "un", "--model", m, "--out", "uc", "--kl-batch-size", "1"]);
    assert!(e.contains("at least 2"), "{e}");
    ok(p, &["cache-ref", "--prepared", "un", "--model", m, "--out", "uc", "--kl-batch-size", "4"]);
    fn train<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["train", "--prepared", "un", "--ref-cache", "uc", "--out", "ut", "--max-steps", "1", "--eval-every", "0", "--force"];
        a.extend_from_slice(extra);
        a
    }
    let e = fails(p, &train(&["--loss", "sigmoid"]));
    assert!(e.contains("unpaired rows") && e.contains("--loss kto"), "{e}");
    let e = fails(p, &train(&["--loss", "kto", "--batch-size", "6"]));
    assert!(e.contains("--batch-size 6") && e.contains("blocks of 4") && e.contains("--kl-batch-size 6"), "{e}");
    let e = fails(p, &train(&["--loss", "kto,sft", "--batch-size", "4"]));
    assert!(e.contains("alone"), "{e}");
    let e = fails(p, &train(&["--loss", "kto", "--batch-size", "4", "--use-weighting"]));
    assert!(e.contains("use_weighting"), "{e}");
    // TRL's advice on unbalanced weights (balanced data: none; 64 vs 64 rows here).
    let e = ok(p, &train(&["--loss", "kto", "--batch-size", "8"]));
    assert!(!e.contains("warning"), "{e}");
    let imb = golden("kto/imbalanced.parquet");
    ok(p, &["prepare", "--input", s(&imb), "--model", m, "--out", "imb", "--max-length", "64"]);
    ok(p, &["cache-ref", "--prepared", "imb", "--model", m, "--out", "ic", "--kl-batch-size", "4"]);
    let e = ok(p, &["train", "--prepared", "imb", "--ref-cache", "ic", "--out", "it", "--loss", "kto", "--batch-size", "4", "--max-steps", "1"]);
    assert!(e.contains("warning") && e.contains("--undesirable-weight in [2.19, 2.91]"), "{e}");
    // prepare: mixed kinds, a missing prompt, a label that is not boolean, --max-prompt-length.
    let e = fails(p, &["prepare", "--input", s(&data), "--input", "in.parquet", "--model", m, "--out", "mixed"]);
    assert!(e.contains("in.parquet") && e.contains("--unpair"), "{e}");
    ok(p, &["prepare", "--input", s(&data), "--input", "in.parquet", "--model", m, "--out", "mixed", "--unpair"]);
    let mixed = PreparedDataset::open(&p.join("mixed")).unwrap();
    assert_eq!(mixed.len(), 128 + 32);
    let e = fails(p, &["prepare", "--input", s(&data), "--model", m, "--out", "mp", "--max-prompt-length", "8"]);
    assert!(e.contains("--max-prompt-length"), "{e}");
    std::fs::write(p.join("noprompt.jsonl"), "{\"completion\": \"blue\", \"label\": true}\n").unwrap();
    let e = fails(p, &["prepare", "--input", "noprompt.jsonl", "--model", m, "--out", "np"]);
    assert!(e.contains("noprompt.jsonl") && e.contains("prompt"), "{e}");
    std::fs::write(
        p.join("badlabel.jsonl"),
        "{\"prompt\": \"sky?\", \"completion\": \"blue\", \"label\": true}\n{\"prompt\": \"sky?\", \"completion\": \"red\", \"label\": \"no\"}\n",
    )
    .unwrap();
    ok(p, &["prepare", "--input", "badlabel.jsonl", "--model", m, "--out", "bl"]);
    let rej = read_rows(p, "bl/rejected.parquet");
    assert_eq!(rej.len(), 1, "{rej:?}");
    assert_eq!((rej[0]["source_row"].as_u64(), rej[0]["reason"].as_str()), (Some(1), Some("malformed_label")));
    assert!(rej[0]["detail"].as_str().unwrap().contains("`label`"), "{rej:?}");
}

/// KTO through the trainer's other paths: every attention layout gives the packed layout's
/// metrics (one computation, three batch shapes), the eval split is scored with its own KL
/// blocks, LoRA in bf16 stays within 2% of LoRA in f32, and shuffling whole blocks trains.
#[test]
fn kto_runs_on_every_layout_lora_bf16_eval_and_shuffled_blocks() {
    let d = tmp();
    let p = d.path();
    let model = tiny_model(p, "llama");
    let data = golden("kto/standard.parquet");
    ok(p, &["prepare", "--input", s(&data), "--model", s(&model), "--out", "prep", "--max-length", "64", "--eval-fraction", "0.25"]);
    ok(p, &["cache-ref", "--prepared", "prep", "--model", s(&model), "--out", "cache", "--kl-batch-size", "4"]);
    let run = |out: &str, extra: &[&str]| -> Vec<Value> {
        let mut a =
            vec!["train", "--prepared", "prep", "--ref-cache", "cache", "--out", out, "--loss", "kto", "--batch-size", "4", "--max-steps", "4"];
        a.extend(["--lr", "1e-3", "--eval-every", "2", "--save-every", "0"]);
        if !extra.contains(&"--shuffle") {
            a.extend(["--shuffle", "false"]);
        }
        a.extend_from_slice(extra);
        ok(p, &a);
        read_rows(p, &format!("{out}/metrics.parquet"))
    };
    let steps = |rows: &[Value]| rows.iter().filter(|r| r["loss"].is_number()).cloned().collect::<Vec<_>>();
    let packed = run("packed", &[]);
    assert!(packed.iter().any(|r| r["eval/kl"].is_number() && r["eval/loss"].is_number()), "{packed:?}");
    for layout in ["padded", "shared-prompt"] {
        let other = run(layout, &["--layout", layout]);
        for (a, b) in packed.iter().zip(&other) {
            for k in ["loss", "kl", "rewards/chosen", "logps/rejected", "grad_norm", "eval/loss", "eval/kl"] {
                if let (Some(x), Some(y)) = (a[k].as_f64(), b[k].as_f64()) {
                    assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{layout}: step {} {k}: packed {x}, {layout} {y}", a["step"]);
                } else {
                    assert_eq!(a[k].is_null(), b[k].is_null(), "{layout}: step {} {k}", a["step"]);
                }
            }
        }
    }
    let lora = ["--lora-r", "4", "--lora-targets", "all-linear"];
    let f32_rows = steps(&run("lora", &lora));
    let bf16 = steps(&run("lora_bf16", &[&lora[..], &["--dtype", "bf16"]].concat()));
    assert_eq!(bf16.len(), 4);
    for (a, b) in f32_rows.iter().zip(&bf16) {
        let (x, y) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!((x - y).abs() <= 0.02 * x.abs(), "step {}: bf16 loss {y}, f32 {x}", a["step"]);
    }
    assert!(p.join("lora/final/adapter_model.safetensors").exists());
    let shuffled = steps(&run("shuffled", &["--shuffle", "true"]));
    assert_eq!(shuffled.len(), 4);
    let in_order = steps(&packed);
    assert!(shuffled.iter().zip(&in_order).any(|(a, b)| a["loss"] != b["loss"]), "another order of blocks");
}

/// pipelines/kto.toml runs as written (fewer steps): prepare --unpair, the KL cache, KTO.
#[test]
fn the_kto_pipeline_file_runs_prepare_unpair_cache_and_kto() {
    let d = tmp();
    let p = d.path();
    std::fs::create_dir_all(p.join("demo")).unwrap();
    ok(p, &["init-model", "--arch", "qwen2", "--size", "tiny", "--seed", "0", "--out", "demo/model"]);
    ok(p, &["synth-prefs", "--out", "demo/prefs.parquet", "--rows", "64", "--eval-rows", "16", "--seed", "1"]);
    let toml = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/kto.toml")).unwrap();
    assert!(toml.contains("max_steps = 150"));
    std::fs::write(p.join("kto.toml"), toml.replace("max_steps = 150", "max_steps = 4").replace("eval_every = 30", "eval_every = 2")).unwrap();
    ok(p, &["run", "kto.toml"]);
    let m: Value = serde_json::from_str(&std::fs::read_to_string(p.join("kto/prepared/manifest.json")).unwrap()).unwrap();
    assert_eq!((m["counts"]["rows_train"].as_u64(), m["counts"]["rows_eval"].as_u64()), (Some(128), Some(32)));
    let rows = read_rows(p, "kto/train/metrics.parquet");
    assert!(rows.iter().any(|r| r["eval/kl"].is_number()) && rows.iter().filter(|r| r["kl"].is_number()).count() == 4, "{rows:?}");
}

/// A KTO run stopped after a checkpoint and resumed logs what the uninterrupted run logs and
/// ends with the same weights, across an epoch's end (short last micro-batch) with shuffled
/// blocks.
#[test]
fn a_resumed_kto_run_equals_the_uninterrupted_one_across_an_epoch() {
    let d = tmp();
    let p = d.path();
    let model = tiny_model(p, "llama");
    let data = golden("kto/imbalanced.parquet"); // 86 rows: 10 micro-batches of 8, then 6
    ok(p, &["prepare", "--input", s(&data), "--model", s(&model), "--out", "prep", "--max-length", "64"]);
    ok(p, &["cache-ref", "--prepared", "prep", "--model", s(&model), "--out", "cache", "--kl-batch-size", "4"]);
    let args = |out: &'static str, extra: &[&'static str]| -> Vec<&'static str> {
        let mut a = vec!["train", "--prepared", "prep", "--ref-cache", "cache", "--out", out, "--loss", "kto", "--batch-size", "8"];
        a.extend(["--max-steps", "14", "--save-every", "4", "--eval-every", "0", "--lr", "1e-3", "--undesirable-weight", "2.5"]);
        a.extend_from_slice(extra);
        a
    };
    ok(p, &args("full", &[]));
    ok(p, &args("part", &["--stop-after-steps", "9"]));
    let e = ok(p, &args("part", &["--resume"]));
    assert!(e.contains("resuming from") && e.contains("step 8"), "{e}");
    let (a, b) = (read_rows(p, "full/metrics.parquet"), read_rows(p, "part/metrics.parquet"));
    assert_eq!((a.len(), b.len()), (14, 14));
    let skip = |k: &str| k == "tokens_per_s" || k.ends_with("_seconds") || k == "peak_memory_gb";
    for (x, y) in a.iter().zip(&b) {
        for (k, v) in x.as_object().unwrap().iter().filter(|(k, _)| !skip(k)) {
            assert_eq!(v, &y[k], "step {} {k}", x["step"]);
        }
    }
    // Step 11 is the epoch's short micro-batch: 6 rows, so its token count is below its neighbours'.
    let tokens: Vec<f64> = a.iter().map(|r| r["num_tokens"].as_f64().unwrap()).collect();
    let per_step: Vec<f64> = tokens.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(per_step[9] < per_step[8].min(per_step[10]) * 0.9, "{per_step:?}");
    let bytes = |d: &str| std::fs::read(p.join(d).join("final/model.safetensors")).unwrap();
    assert!(bytes("full") == bytes("part"), "final weights differ after resume");
}
