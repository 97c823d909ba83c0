//! `pipeline sample` and `pipeline label`: greedy decoding and reward scores against HF
//! transformers (tests/golden/hf_generate.json, from scripts/make_golden.sh), the
//! sampling distribution and its filters, reproducibility, judge commands and pairing.
mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use dpo_pipeline::generate::{generate, sampling_probs, Request, Sampling};
use dpo_pipeline::model::decoder::SeqLayout;
use dpo_pipeline::model::load_decoder;
use serde_json::Value;
use std::path::Path;

fn golden_json() -> Value {
    serde_json::from_str(&std::fs::read_to_string(golden("hf_generate.json")).unwrap()).unwrap()
}

fn blake3_file(p: &Path) -> String {
    blake3::hash(&std::fs::read(p).unwrap()).to_hex().to_string()
}

/// Writes a parquet file of `rows` (JSON records) with polars, as a user would.
fn write_parquet(dir: &Path, file: &str, rows: &Value, casts: &str) {
    std::fs::write(dir.join("rows.json"), rows.to_string()).unwrap();
    python(dir, &format!("pl.DataFrame(json.load(open('rows.json'))){casts}.write_parquet({file:?})"));
}

#[test]
fn greedy_completions_equal_transformers_generate() {
    let g = golden_json();
    for arch in ["llama", "qwen2"] {
        let d = tmp();
        let model = tiny_model(d.path(), arch);
        let case = &g["generate"][arch];
        assert_eq!(case["weights"].as_str().unwrap(), blake3_file(&model.join("model.safetensors")), "stale golden: rerun scripts/make_golden.sh");
        std::fs::write(model.join("generation_config.json"), serde_json::json!({"eos_token_id": case["eos_token_id"]}).to_string()).unwrap();
        let rows = case["rows"].as_array().unwrap();
        let prompts: Vec<Value> = rows.iter().map(|r| serde_json::json!({"prompt": r["prompt"]})).collect();
        write_parquet(d.path(), "prompts.parquet", &Value::Array(prompts), "");
        // A small token budget: several waves of prompts, each with both samples.
        ok(
            d.path(),
            &[
                "sample",
                "--model",
                s(&model),
                "--prompts",
                "prompts.parquet",
                "--out",
                "out",
                "--temperature",
                "0",
                "--num-samples",
                "2",
                "--max-new-tokens",
                "12",
                "--batch-tokens",
                "80",
            ],
        );
        let got = read_rows(d.path(), "out/samples.parquet");
        assert_eq!(got.len(), rows.len() * 2);
        for (i, r) in got.iter().enumerate() {
            let want = &rows[i / 2];
            assert_eq!(r["source_row"].as_u64().unwrap(), (i / 2) as u64);
            assert_eq!(r["sample_index"].as_u64().unwrap(), (i % 2) as u64);
            assert_eq!(r["prompt"], want["prompt"], "{arch}: prompt kept as given");
            assert_eq!(r["completion_ids"], want["completion_ids"], "{arch} prompt {}: greedy ids differ from transformers", i / 2);
            assert_eq!(r["finish_reason"], want["finish_reason"], "{arch} prompt {}", i / 2);
            let (a, b) = (r["logp"].as_f64().unwrap(), want["logp"].as_f64().unwrap());
            assert!((a - b).abs() < 1e-3, "{arch} prompt {}: logp {a} vs transformers {b}", i / 2);
            if arch == "qwen2" {
                assert_eq!(r["completion"][0]["role"], "assistant", "conversations get an assistant message");
            }
        }
        let m: Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("out/manifest.json")).unwrap()).unwrap();
        assert_eq!(m["counts"]["samples"].as_u64().unwrap(), (rows.len() * 2) as u64);
    }
}

#[test]
fn reward_scores_equal_transformers_sequence_classification() {
    let g = golden_json();
    for arch in ["llama", "qwen2"] {
        let d = tmp();
        ok(d.path(), &["init-model", "--arch", arch, "--reward", "--out", "rm"]);
        let case = &g["reward"][arch];
        assert_eq!(
            case["weights"].as_str().unwrap(),
            blake3_file(&d.path().join("rm/model.safetensors")),
            "stale golden: rerun scripts/make_golden.sh"
        );
        let rows = case["rows"].as_array().unwrap();
        let samples: Vec<Value> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| serde_json::json!({"source_file": "p.parquet", "source_row": i, "sample_index": 0, "prompt": r["prompt"], "completion": r["completion"]}))
            .collect();
        write_parquet(d.path(), "samples.parquet", &Value::Array(samples), "");
        ok(d.path(), &["label", "--samples", "samples.parquet", "--reward-model", "rm", "--out", "labels", "--batch-tokens", "40"]);
        let got = read_rows(d.path(), "labels/scores.parquet");
        for (r, want) in got.iter().zip(rows) {
            let (a, b) = (r["score"].as_f64().unwrap(), want["score"].as_f64().unwrap());
            assert!((a - b).abs() < 1e-4, "{arch}: score {a} vs transformers {b}");
        }
        // One sample per prompt: no pairs, every prompt counted and listed with its reason.
        let m: Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("labels/manifest.json")).unwrap()).unwrap();
        assert_eq!(m["counts"]["skipped_too_few_samples"].as_u64().unwrap(), rows.len() as u64);
        assert_eq!(read_rows(d.path(), "labels/skipped.parquet").len(), rows.len());
    }
}

/// The tiny model's next-token logits after `prompt`.
fn next_logits(model: &Path, prompt: &[u32]) -> Vec<f32> {
    let dec = load_decoder(model, DType::F32, None, &Device::Cpu).unwrap();
    let h = dec.hidden(&SeqLayout::causal(prompt)).unwrap();
    let last = h.index_select(&Tensor::from_slice(&[prompt.len() as u32 - 1], 1, &Device::Cpu).unwrap(), 0).unwrap();
    dec.logits(&last).unwrap().to_vec2::<f32>().unwrap().remove(0)
}

#[test]
fn first_sampled_token_follows_the_softmax_and_filters_keep_only_their_set() {
    let d = tmp();
    let model = tiny_model(d.path(), "llama");
    let dec = load_decoder(&model, DType::F32, None, &Device::Cpu).unwrap();
    let prompt = vec![1u32, 40, 41, 42, 43];
    let logits = next_logits(&model, &prompt);
    // Softmax of the logits in f64, independently of the sampler's code.
    let max = logits.iter().copied().fold(f32::MIN, f32::max) as f64;
    let e: Vec<f64> = logits.iter().map(|&x| (x as f64 - max).exp()).collect();
    let p: Vec<f64> = e.iter().map(|x| x / e.iter().sum::<f64>()).collect();
    let n = 20_000;
    let draw = |s: Sampling| -> Vec<usize> {
        let req = Request { prompt: prompt.clone(), seeds: (0..n as u64).collect() };
        let out = generate(&dec, &[req], 1, &[], &s, &mut |_| {}).unwrap();
        let mut counts = vec![0usize; logits.len()];
        for c in &out[0] {
            counts[c.ids[0] as usize] += 1;
        }
        counts
    };
    let counts = draw(Sampling { temperature: 1.0, top_k: 0, top_p: 1.0 });
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    for &t in &order[..20] {
        let f = counts[t] as f64 / n as f64;
        let sd = (p[t] * (1.0 - p[t]) / n as f64).sqrt();
        assert!((f - p[t]).abs() < 5.0 * sd + 1e-4, "token {t}: frequency {f} vs softmax {}", p[t]);
    }
    // Temperature 2 flattens: frequencies follow softmax(logits / 2).
    let counts = draw(Sampling { temperature: 2.0, top_k: 0, top_p: 1.0 });
    let e2: Vec<f64> = logits.iter().map(|&x| ((x as f64 - max) / 2.0).exp()).collect();
    let z2: f64 = e2.iter().sum();
    for &t in &order[..10] {
        let (f, q) = (counts[t] as f64 / n as f64, e2[t] / z2);
        assert!((f - q).abs() < 5.0 * (q * (1.0 - q) / n as f64).sqrt() + 1e-4, "T=2 token {t}: {f} vs {q}");
    }
    // top-k 5: only the 5 most likely tokens, each in proportion to its probability.
    let counts = draw(Sampling { temperature: 1.0, top_k: 5, top_p: 1.0 });
    let top5: f64 = order[..5].iter().map(|&t| p[t]).sum();
    for (t, &c) in counts.iter().enumerate() {
        if !order[..5].contains(&t) {
            assert_eq!(c, 0, "top-k 5 drew token {t}, outside the 5 most likely");
        }
    }
    let f0 = counts[order[0]] as f64 / n as f64;
    assert!((f0 - p[order[0]] / top5).abs() < 0.02, "renormalised within the top 5");
    // top-p: the smallest set of most likely tokens whose mass reaches p.
    for top_p in [0.05, 0.3, 0.9] {
        let mut kept = vec![];
        let mut mass = 0.0;
        for &t in &order {
            kept.push(t);
            mass += p[t];
            if mass >= top_p {
                break;
            }
        }
        let counts = draw(Sampling { temperature: 1.0, top_k: 0, top_p });
        for (t, &c) in counts.iter().enumerate() {
            assert!(c == 0 || kept.contains(&t), "top-p {top_p} drew token {t}, outside its {} kept tokens", kept.len());
        }
        let probs = sampling_probs(&logits, &Sampling { temperature: 1.0, top_k: 0, top_p });
        assert_eq!(probs.iter().filter(|&&x| x > 0.0).count(), kept.len(), "top-p {top_p}: kept set size");
    }
}

#[test]
fn samples_are_reproducible_across_threads_and_batching_and_skipped_prompts_are_kept() {
    let d = tmp();
    let model = tiny_model(d.path(), "qwen2");
    ok(d.path(), &["synth-prefs", "--out", "p.parquet", "--rows", "6"]);
    // A null prompt and an empty one among real ones.
    python(d.path(), "df = pl.read_parquet('p.parquet'); df = df.with_columns(pl.when(pl.int_range(pl.len()) == 2).then(None).when(pl.int_range(pl.len()) == 4).then(pl.lit('')).otherwise(pl.col('prompt')).alias('prompt')); df.write_parquet('p.parquet')");
    let args = |out: &str, threads: &str, batch: &str, seed: &str| -> Vec<String> {
        [
            "--threads",
            threads,
            "sample",
            "--model",
            s(&model),
            "--prompts",
            "p.parquet",
            "--out",
            out,
            "--num-samples",
            "3",
            "--max-new-tokens",
            "10",
            "--top-p",
            "0.9",
            "--top-k",
            "50",
            "--temperature",
            "0.8",
            "--batch-tokens",
            batch,
            "--seed",
            seed,
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let run = |a: Vec<String>| ok(d.path(), &a.iter().map(String::as_str).collect::<Vec<_>>());
    run(args("a", "1", "100000", "7"));
    run(args("b", "2", "30", "7"));
    run(args("c", "2", "100000", "8"));
    let ids = |dir: &str| read_rows(d.path(), &format!("{dir}/samples.parquet")).iter().map(|r| r["completion_ids"].clone()).collect::<Vec<_>>();
    assert_eq!(ids("a"), ids("b"), "the same seed gives the same samples for any thread count and batch size");
    assert_ne!(ids("a"), ids("c"), "another seed gives other samples");
    assert_eq!(ids("a").len(), 4 * 3);
    let skipped = read_rows(d.path(), "a/skipped.parquet");
    let reasons: Vec<(u64, String)> =
        skipped.iter().map(|r| (r["source_row"].as_u64().unwrap(), r["reason"].as_str().unwrap().to_string())).collect();
    assert_eq!(reasons, vec![(2, "null_field".to_string()), (4, "empty_prompt".to_string())]);
    // The same prompts as JSON Lines sample the same completions.
    python(d.path(), "pl.read_parquet('p.parquet').write_ndjson('p.jsonl')");
    let mut jsonl = args("j", "2", "100000", "7");
    jsonl[6] = "p.jsonl".into();
    run(jsonl);
    assert_eq!(ids("j"), ids("a"), "JSON Lines prompts sample as their parquet does");
    assert_eq!(read_rows(d.path(), "j/skipped.parquet").len(), 2);
    // Unchanged inputs and settings: nothing to do.
    let again = run(args("a", "2", "100000", "7"));
    assert!(again.contains("up to date"), "{again}");
}

#[test]
fn judge_command_scores_pairs_and_prepare_reads_the_prefs() {
    let d = tmp();
    let model = tiny_model(d.path(), "llama");
    let rows: Vec<Value> = [(0, 0, "aa"), (0, 1, "a"), (0, 2, "aaaa"), (1, 0, "bb"), (1, 1, "cc"), (2, 0, "z"), (3, 0, "x"), (3, 1, "xyz"), (3, 2, "")]
        .iter()
        .map(|(r, k, c)| serde_json::json!({"source_file": "p.parquet", "source_row": r, "sample_index": k, "prompt": format!("Question {r}?"), "completion": c}))
        .collect();
    write_parquet(d.path(), "samples.parquet", &Value::Array(rows), "");
    // The judge: a completion's length.
    let judge = "python3 -c 'import sys, json\nfor l in sys.stdin: print(len(json.loads(l)[\"completion\"]))'";
    ok(d.path(), &["label", "--samples", "samples.parquet", "--judge-cmd", judge, "--out", "bw"]);
    let prefs = read_rows(d.path(), "bw/prefs.parquet");
    let got: Vec<(u64, &str, &str, f64, f64)> = prefs
        .iter()
        .map(|r| {
            (
                r["source_row"].as_u64().unwrap(),
                r["chosen"].as_str().unwrap(),
                r["rejected"].as_str().unwrap(),
                r["chosen_score"].as_f64().unwrap(),
                r["rejected_score"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, vec![(0, "aaaa", "a", 4.0, 1.0), (3, "xyz", "", 3.0, 0.0)]);
    let skipped: Vec<(u64, String)> = read_rows(d.path(), "bw/skipped.parquet")
        .iter()
        .map(|r| (r["source_row"].as_u64().unwrap(), r["reason"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(skipped, vec![(1, "tie".into()), (2, "too_few_samples".into())]);
    let m: Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("bw/manifest.json")).unwrap()).unwrap();
    assert_eq!(
        (m["counts"]["pairs"].as_u64(), m["counts"]["skipped_tie"].as_u64(), m["counts"]["skipped_too_few_samples"].as_u64()),
        (Some(2), Some(1), Some(1))
    );
    // All pairs with a margin over 1.5, in sample order: prompt 0 (4,2) and (4,1) but not (2,1);
    // prompt 3 (3,1) and (3,0) but not (1,0).
    ok(d.path(), &["label", "--samples", "samples.parquet", "--judge-cmd", judge, "--out", "all", "--pairs", "all-pairs", "--min-margin", "1.5"]);
    let all: Vec<(u64, f64, f64)> = read_rows(d.path(), "all/prefs.parquet")
        .iter()
        .map(|r| (r["source_row"].as_u64().unwrap(), r["chosen_score"].as_f64().unwrap(), r["rejected_score"].as_f64().unwrap()))
        .collect();
    assert_eq!(all, vec![(0, 4.0, 2.0), (0, 4.0, 1.0), (3, 3.0, 1.0), (3, 3.0, 0.0)]);
    // prepare takes prefs.parquet as it is (the empty rejected completion is its own data error).
    ok(d.path(), &["prepare", "--input", "bw/prefs.parquet", "--model", s(&model), "--out", "prep"]);
    let m: Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("prep/manifest.json")).unwrap()).unwrap();
    assert_eq!((m["counts"]["pairs"].as_u64(), m["counts"]["rejected_empty_completion"].as_u64()), (Some(1), Some(1)));
    // Unpaired rows for KTO: every sample, labelled by --threshold; prepare reads them as they are.
    ok(d.path(), &["label", "--samples", "samples.parquet", "--judge-cmd", judge, "--out", "un", "--pairs", "unpaired", "--threshold", "1.5"]);
    let un: Vec<(u64, String, bool, f64)> = read_rows(d.path(), "un/prefs.parquet")
        .iter()
        .map(|r| {
            (r["source_row"].as_u64().unwrap(), r["completion"].as_str().unwrap().into(), r["label"].as_bool().unwrap(), r["score"].as_f64().unwrap())
        })
        .collect();
    let want: Vec<(u64, String, bool, f64)> = [(0, "aa"), (0, "a"), (0, "aaaa"), (1, "bb"), (1, "cc"), (2, "z"), (3, "x"), (3, "xyz"), (3, "")]
        .iter()
        .map(|&(r, c)| (r, c.to_string(), c.len() as f64 > 1.5, c.len() as f64))
        .collect();
    assert_eq!(un, want);
    let m: Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("un/manifest.json")).unwrap()).unwrap();
    assert_eq!((m["counts"]["rows"].as_u64(), m["counts"]["desirable"].as_u64(), m["counts"]["undesirable"].as_u64()), (Some(9), Some(5), Some(4)));
    check_schema(d.path(), "prefs.unpaired.parquet.json", "un/prefs.parquet");
    ok(d.path(), &["prepare", "--input", "un/prefs.parquet", "--model", s(&model), "--out", "unprep"]);
    let m: Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("unprep/manifest.json")).unwrap()).unwrap();
    assert_eq!(
        (m["settings"]["kind"].as_str(), m["counts"]["rows"].as_u64(), m["counts"]["rejected_empty_completion"].as_u64()),
        (Some("unpaired"), Some(8), Some(1))
    );
    // A judge that prints something else, or too few lines, or fails: a clear error, no output.
    let e = fails(d.path(), &["label", "--samples", "samples.parquet", "--judge-cmd", "echo 1; echo oops", "--out", "bad"]);
    assert!(e.contains("output line 2 is `oops`, not a number"), "{e}");
    let e = fails(d.path(), &["label", "--samples", "samples.parquet", "--judge-cmd", "cat >/dev/null; echo 1", "--out", "bad"]);
    assert!(e.contains("wrote 1 scores for 9 samples"), "{e}");
    let e = fails(d.path(), &["label", "--samples", "samples.parquet", "--judge-cmd", "cat >/dev/null; echo broken >&2; exit 3", "--out", "bad"]);
    assert!(e.contains("broken"), "{e}");
    assert!(!d.path().join("bad/prefs.parquet").exists() && !d.path().join("bad/manifest.json").exists());
}

#[test]
fn the_synthetic_judge_knows_the_answers() {
    use dpo_pipeline::synth::judge::score;
    let q = "Question: What color is the sky?\nAnswer:";
    assert_eq!(score(q, " The sky is blue."), Some(1.0));
    assert_eq!(score(q, " blue green"), Some(0.9 * 0.0), "naming a wrong color too is not right");
    assert!(score(q, " The sky is green.").unwrap() > 0.5 && score(q, " The sky is green.").unwrap() < 1.0);
    assert_eq!(score("Some background. What is 3 plus 4?", "3 plus 4 is 7."), Some(1.0));
    assert!(score("What is 3 plus 4?", "3 plus 4 is 8.").unwrap() < 1.0);
    assert_eq!(score("What sound does a cow make?", "A cow says moo."), Some(1.0));
    assert_eq!(score("How are you?", "fine"), None);
}

#[test]
fn an_iterative_kto_round_labels_samples_unpaired_and_trains_on_them() {
    let d = tmp();
    let model = tiny_model(d.path(), "llama");
    ok(d.path(), &["synth-prefs", "--out", "prompts.parquet", "--rows", "16", "--seed", "5"]);
    let toml = format!(
        r#"[iterative]
rounds = 1
base_model = "{}"
prompts = ["prompts.parquet"]
dir = "it"
judge_cmd = "'{}' synth-judge"

[sample]
num_samples = 2
max_new_tokens = 6

[label]
pairs = "unpaired"
threshold = 0.5

[cache_ref]
kl_batch_size = 4

[train]
lr = 1e-3
loss = "kto"
batch_size = 4
max_steps = 2
eval_every = 0
"#,
        s(&model),
        bin()
    );
    std::fs::write(d.path().join("it.toml"), toml).unwrap();
    ok(d.path(), &["run", "it.toml"]);
    let manifest = |p: &str| -> Value { serde_json::from_str(&std::fs::read_to_string(d.path().join(p).join("manifest.json")).unwrap()).unwrap() };
    assert_eq!(manifest("it/round1/labels")["counts"]["rows"], 32);
    assert_eq!(manifest("it/round1/prepared")["settings"]["kind"], "unpaired");
    assert_eq!(manifest("it/round1/ref_cache")["settings"]["kl_batch_size"], 4);
    let rows = read_rows(d.path(), "it/round1/train/metrics.parquet");
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["kl"].is_number() && r["loss"].as_f64().unwrap().is_finite()), "{rows:?}");
}

#[test]
fn iterative_rounds_sample_from_the_last_policy_against_pi0_and_rerun_as_up_to_date() {
    let d = tmp();
    let model = tiny_model(d.path(), "qwen2");
    ok(d.path(), &["synth-prefs", "--out", "prompts.parquet", "--rows", "24", "--seed", "3", "--eval-rows", "8"]);
    let toml = format!(
        r#"[iterative]
rounds = 2
base_model = "{}"
prompts = ["prompts.parquet"]
eval_prompts = ["prompts.eval.parquet"]
dir = "it"
judge_cmd = "'{}' synth-judge"

[sample]
num_samples = 3
max_new_tokens = 6

[train]
lr = 1e-3
loss = "sigmoid,sft"
batch_size = 8
max_steps = 3
eval_every = 0
"#,
        s(&model),
        bin()
    );
    std::fs::write(d.path().join("it.toml"), toml).unwrap();
    ok(d.path(), &["run", "it.toml"]);
    let lines: Vec<Value> =
        std::fs::read_to_string(d.path().join("it/rounds.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.iter().map(|l| l["round"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1, 2]);
    for l in &lines[1..] {
        assert!(l["pairs"].as_u64().unwrap() > 0 && l["eval_accuracy"].is_number(), "{l}");
    }
    assert!(d.path().join("it/rounds.png").exists());
    let manifest = |p: &str| -> Value { serde_json::from_str(&std::fs::read_to_string(d.path().join(p).join("manifest.json")).unwrap()).unwrap() };
    let input = |m: &Value, role: &str| -> String {
        m["inputs"].as_array().unwrap().iter().find(|i| i["role"] == role).unwrap()["path"].as_str().unwrap().to_string()
    };
    // Round 2 samples from round 1's policy; every round's reference is π0.
    assert_eq!(input(&manifest("it/round1/samples"), "model"), s(&model));
    assert!(input(&manifest("it/round2/samples"), "model").ends_with("it/round1/train/final"));
    for r in ["it/round1/ref_cache", "it/round2/ref_cache"] {
        assert_eq!(std::fs::canonicalize(input(&manifest(r), "model")).unwrap(), std::fs::canonicalize(&model).unwrap());
    }
    // The labelled pairs are what round 2 trained on, through prepare.
    assert_eq!(manifest("it/round2/prepared")["counts"]["rows_read"], manifest("it/round2/labels")["counts"]["pairs"]);
    // Every output as schemas/ describes it.
    for (schema, file) in [
        ("samples.parquet.json", "it/round1/samples/samples.parquet"),
        ("skipped.parquet.json", "it/round1/samples/skipped.parquet"),
        ("skipped.parquet.json", "it/round1/labels/skipped.parquet"),
        ("scores.parquet.json", "it/round1/labels/scores.parquet"),
        ("prefs.parquet.json", "it/round1/labels/prefs.parquet"),
    ] {
        check_schema(d.path(), schema, file);
    }
    // A second run finds every stage up to date.
    let again = ok(d.path(), &["run", "it.toml"]);
    assert!(!again.contains("samples of") && !again.contains("pairs ->") && again.contains("is up to date"), "{again}");
    assert_eq!(std::fs::read_to_string(d.path().join("it/rounds.jsonl")).unwrap().lines().count(), 3);
}

#[test]
fn the_iterative_pipeline_file_has_the_demo_s_settings() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/iterative.toml");
    let file = dpo_pipeline::settings::PipelineFile::load(&path).unwrap();
    let demo: dpo_pipeline::settings::PipelineFile = toml::from_str(dpo_pipeline::demo::ITERATIVE_SETTINGS).unwrap();
    let mut train = file.train.clone();
    (train.prepared, train.ref_cache) = (None, None); // filled in by PipelineFile::load
    assert_eq!(format!("{train:?}"), format!("{:?}", demo.train));
    assert_eq!(format!("{:?}", file.sample), format!("{:?}", demo.sample));
    assert_eq!(format!("{:?}", file.label), format!("{:?}", demo.label));
    assert_eq!(format!("{:?}", file.prepare), format!("{:?}", demo.prepare));
    assert_eq!(file.iterative.expect("[iterative] section").rounds, 3);
}

#[test]
fn cached_decoding_equals_recomputing_every_step_with_a_sliding_window() {
    // Independent of the cache: each greedy token from a full forward over prompt + tokens so far.
    let d = tmp();
    let llama = tiny_model(d.path(), "llama");
    let model = d.path().join("mistral");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "model.safetensors"] {
        std::fs::copy(llama.join(f), model.join(f)).unwrap();
    }
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(llama.join("config.json")).unwrap()).unwrap();
    cfg["model_type"] = "mistral".into();
    cfg["sliding_window"] = 5.into();
    std::fs::write(model.join("config.json"), cfg.to_string()).unwrap();
    let dec = load_decoder(&model, DType::F32, None, &Device::Cpu).unwrap();
    let prompts: Vec<Vec<u32>> = vec![vec![1, 50, 60, 70, 80, 90, 100, 110], vec![1, 7], vec![1, 300, 301, 302]];
    let greedy = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0 };
    let reqs: Vec<Request> = prompts.iter().map(|p| Request { prompt: p.clone(), seeds: vec![0, 1] }).collect();
    let out = generate(&dec, &reqs, 10, &[], &greedy, &mut |_| {}).unwrap();
    for (p, samples) in prompts.iter().zip(&out) {
        let mut seq = p.clone();
        for _ in 0..10 {
            let logits = next_logits(&model, &seq);
            let best = (0..logits.len()).fold(0, |b, i| if logits[i] > logits[b] { i } else { b });
            seq.push(best as u32);
        }
        for c in samples {
            assert_eq!(c.ids, seq[p.len()..], "prompt {p:?}");
        }
    }
}

/// bf16 decoding end to end: the cached path in bf16 (decoding's few-row GEMM, a bf16 KV cache)
/// against a full bf16 forward recomputed at every step (the packed GEMM, no cache). Each
/// greedy token is the recompute's best up to bf16 rounding, and the completion's log-prob is
/// the recompute's log-softmax summed.
#[test]
fn bf16_cached_decoding_follows_full_bf16_forwards() {
    let d = tmp();
    let model = tiny_model(d.path(), "qwen2");
    let dec = load_decoder(&model, DType::BF16, None, &Device::Cpu).unwrap();
    let logits_of = |seq: &[u32]| -> Vec<f32> {
        let h = dec.hidden(&SeqLayout::causal(seq)).unwrap();
        assert_eq!(h.dtype(), DType::BF16, "the decoder computes in bf16");
        let last = h.index_select(&Tensor::from_slice(&[seq.len() as u32 - 1], 1, &Device::Cpu).unwrap(), 0).unwrap();
        dec.logits(&last).unwrap().to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap().remove(0)
    };
    let prompts: Vec<Vec<u32>> = vec![vec![1, 50, 60, 70, 80, 90, 100, 110], vec![1, 7], vec![1, 300, 301, 302, 303, 304]];
    let greedy = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0 };
    let reqs: Vec<Request> = prompts.iter().map(|p| Request { prompt: p.clone(), seeds: vec![0] }).collect();
    let out = generate(&dec, &reqs, 12, &[], &greedy, &mut |_| {}).unwrap();
    let mut worst: f32 = 0.0;
    for (p, samples) in prompts.iter().zip(&out) {
        let c = &samples[0];
        assert!(!c.ids.is_empty(), "prompt {p:?}");
        let mut seq = p.clone();
        let mut logp = 0f64;
        for &t in &c.ids {
            let logits = logits_of(&seq);
            let best = logits.iter().cloned().fold(f32::MIN, f32::max);
            let scale = logits.iter().map(|x| x.abs()).fold(0f32, f32::max);
            worst = worst.max((best - logits[t as usize]) / scale);
            let lse = logits.iter().map(|&x| ((x - best) as f64).exp()).sum::<f64>().ln() + best as f64;
            logp += logits[t as usize] as f64 - lse;
            seq.push(t);
        }
        assert!((c.logp - logp).abs() <= 2e-2 * logp.abs().max(1.0), "prompt {p:?}: logp {} vs recomputed {logp}", c.logp);
    }
    // bf16 keeps 8 bits of mantissa: a token may lose to a near tie by a few of the logits'
    // last bits, never by more.
    assert!(worst <= 2e-2, "a greedy token is {worst} of the logits' scale below the recompute's best");
}
