//! Tokenizers and chat templates as transformers 5.23 / TRL 1.16 build and render them, on
//! tokenizers of every rebuilt class and on Phi-3-mini's real files under five real templates
//! (tests/golden/tokenizers, written by scripts/make_tokenizer_golden.py), and the input
//! formats people publish.
mod common;
use common::*;
use dpo_pipeline::data::hf_tokenizer::{build, TokenizerFiles};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn golden_json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(golden(&format!("tokenizers/{name}"))).unwrap()).unwrap()
}

/// Phi-3-mini's published tokenizer files and the real templates, carried by the repository
/// (tests/fixtures/real-tokenizers/SOURCES.md says where each comes from).
fn real(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real-tokenizers").join(path)
}

#[test]
fn every_tokenizer_class_builds_what_transformers_builds() {
    let g = golden_json("classes.json");
    let cases = g.as_object().unwrap();
    assert!(cases.len() >= 17);
    for (name, want) in cases {
        let dir = golden(&format!("tokenizers/classes/{name}"));
        let built = build(&TokenizerFiles::read(&dir).unwrap()).unwrap();
        let class = want["class"].as_str().unwrap();
        if class == "TokenizersBackend" {
            assert!(
                built.construction.starts_with("tokenizer.json as is"),
                "{name}: transformers runs the file as is; we built {}",
                built.construction
            );
        } else {
            assert!(built.construction.starts_with(class), "{name}: transformers builds {class}; we built {}", built.construction);
        }
        // The pipeline transformers built, section by section.
        let ours: Value = serde_json::from_str(&built.tokenizer.to_string(false).unwrap()).unwrap();
        for section in ["normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens"] {
            assert_eq!(ours[section], want["pipeline"][section], "{name}: {section}");
        }
        for (k, v) in want["model_options"].as_object().unwrap() {
            assert_eq!(&ours["model"][k], v, "{name}: model option {k}");
        }
        let specials: Value = serde_json::to_value(&built.special_tokens).unwrap();
        assert_eq!(specials, want["special_tokens"], "{name}: named special tokens");
        for case in want["ids"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            for (add, key) in [(true, "with_special"), (false, "without_special")] {
                let ids: Vec<u64> = built.tokenizer.encode(text, add).unwrap().get_ids().iter().map(|&i| i as u64).collect();
                let want: Vec<u64> = case[key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
                assert_eq!(ids, want, "{name}: {text:?} ({key})");
            }
        }
    }
}

/// A model directory for `prepare`: Phi-3-mini's files, config.json's model_type, a template.
fn phi3_dir(root: &Path, model_type: &str, template: Option<&str>) -> PathBuf {
    let d = root.join(format!("{model_type}-{}", template.unwrap_or("own")));
    std::fs::create_dir_all(&d).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(real(&format!("phi-3-mini-4k-instruct/{f}")), d.join(f)).unwrap();
    }
    std::fs::write(d.join("config.json"), format!("{{\"model_type\": \"{model_type}\"}}")).unwrap();
    if let Some(t) = template {
        std::fs::copy(real(&format!("templates/{t}")), d.join("chat_template.jinja")).unwrap();
    }
    d
}

#[test]
fn phi3_under_real_templates_gives_trl_ids_on_every_row() {
    let g = golden_json("phi3/trl.json");
    let date = g["template_date"].as_str().unwrap();
    let d = tmp();
    let mut checked = 0;
    for (name, want) in g["datasets"].as_object().unwrap() {
        let model = phi3_dir(d.path(), want["model_type"].as_str().unwrap(), want["template"].as_str());
        let out = format!("prep-{name}");
        let input = golden(&format!("tokenizers/phi3/{name}.parquet"));
        ok(d.path(), &["prepare", "--input", s(&input), "--model", s(&model), "--out", &out, "--template-date", date]);
        let rows = read_rows(d.path(), &format!("{out}/pairs.parquet"));
        let trl = want["rows"].as_array().unwrap();
        assert_eq!(rows.len(), trl.len(), "{name}: kept rows");
        let kept: Vec<u64> = want["kept_source_rows"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        for (i, (got, w)) in rows.iter().zip(trl).enumerate() {
            assert_eq!(got["source_row"].as_u64().unwrap(), kept[i], "{name} row {i}: source row");
            for k in ["prompt_ids", "chosen_ids", "rejected_ids"] {
                assert_eq!(got[k], w[k], "{name} row {i}: {k}");
            }
            checked += 1;
        }
        // Rows the template raises on are kept aside with transformers' message.
        let rejected = read_rows(d.path(), &format!("{out}/rejected.parquet"));
        let errors = want["template_errors"].as_object().unwrap();
        assert_eq!(rejected.len(), errors.len(), "{name}: rejected rows");
        for r in &rejected {
            assert_eq!(r["reason"], "template_error");
            assert_eq!(r["detail"], errors[&r["source_row"].to_string()], "{name}: the template's message");
        }
        let manifest: Value = serde_json::from_str(&std::fs::read_to_string(d.path().join(&out).join("manifest.json")).unwrap()).unwrap();
        let construction = manifest["settings"]["tokenizer_construction"].as_str().unwrap();
        let class = want["class"].as_str().unwrap();
        assert!(construction.starts_with(if class == "TokenizersBackend" { "tokenizer.json as is" } else { class }), "{name}: {construction}");
        // The date is part of the settings exactly when the template prints it.
        let uses_date = want["template"].as_str().is_some_and(|t| t.contains("Llama-3.2"));
        assert_eq!(manifest["settings"]["template_date"].as_str(), uses_date.then_some(date), "{name}: template_date in the manifest");
    }
    assert!(checked >= 48, "{checked} rows compared");
}

#[test]
fn the_template_date_changes_only_templates_that_print_it() {
    let d = tmp();
    let input = golden("tokenizers/phi3/conv_llama3.2.parquet");
    let with_date = phi3_dir(d.path(), "llama", Some("meta-llama-Llama-3.2-3B-Instruct.jinja"));
    let without = phi3_dir(d.path(), "llama", Some("Qwen-Qwen2.5-7B-Instruct.jinja"));
    let run = |model: &Path, out: &str, date: &str| {
        ok(d.path(), &["prepare", "--input", s(&input), "--model", s(model), "--out", out, "--template-date", date]);
        let m: Value = serde_json::from_str(&std::fs::read_to_string(d.path().join(out).join("manifest.json")).unwrap()).unwrap();
        (m["fingerprint"].as_str().unwrap().to_string(), read_rows(d.path(), &format!("{out}/pairs.parquet")))
    };
    let (fa, ra) = run(&with_date, "a", "2026-03-15");
    let (fb, rb) = run(&with_date, "b", "2025-12-01");
    assert_ne!(fa, fb, "another date is another fingerprint");
    assert_ne!(ra[0]["prompt_ids"], rb[0]["prompt_ids"], "the date is in the rendered system turn");
    // Rerunning with the recorded date is up to date (same fingerprint, same ids).
    let again = ok(d.path(), &["prepare", "--input", s(&input), "--model", s(&with_date), "--out", "a", "--template-date", "2026-03-15"]);
    assert!(again.contains("up to date"), "{again}");
    let (fc, _) = run(&without, "c", "2026-03-15");
    let (fd, _) = run(&without, "d", "2025-12-01");
    assert_eq!(fc, fd, "a template without strftime_now does not depend on the date");
    let err = fails(d.path(), &["prepare", "--input", s(&input), "--model", s(&with_date), "--out", "e", "--template-date", "2026-02-30"]);
    assert!(err.contains("--template-date") && err.contains("2026-02-30"), "{err}");
}

/// Each prepared column's name and values (the header carries the fingerprint, which names the input).
type Payloads = Vec<(String, Vec<u8>)>;

fn column_payloads(dir: &Path) -> Payloads {
    let mut out = Vec::new();
    for name in [
        "token_ids.u32", "row_offsets.u64", "prompt_len.u32", "chosen_len.u32", "rejected_len.u32", "chosen_scored.u32", "rejected_scored.u32",
        "split.u32",
    ] {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        out.push((name.to_string(), bytes[dpo_pipeline::store::column::HEADER_BYTES..].to_vec()));
    }
    out
}

#[test]
fn jsonl_json_and_save_to_disk_inputs_prepare_like_the_parquet_of_the_same_rows() {
    let d = tmp();
    let model = phi3_dir(d.path(), "llama", Some("Qwen-Qwen3.jinja"));
    let formats = golden("tokenizers/formats");
    // zstd-compressed JSON Lines, made here.
    let zst = d.path().join("rows.jsonl.zst");
    std::fs::write(&zst, zstd::encode_all(std::fs::read(formats.join("rows.jsonl")).unwrap().as_slice(), 3).unwrap()).unwrap();
    let inputs = [
        formats.join("rows.parquet"),
        formats.join("rows.jsonl"),
        formats.join("rows.jsonl.gz"),
        zst,
        formats.join("rows.json"),
        formats.join("rows_dataset"),
    ];
    let mut reference: Option<(String, Payloads)> = None;
    for (i, input) in inputs.iter().enumerate() {
        let out = format!("p{i}");
        ok(d.path(), &["prepare", "--input", s(input), "--model", s(&model), "--out", &out, "--template-date", "2026-03-15"]);
        let pairs = python(d.path(), &format!("print(pl.read_parquet('{out}/pairs.parquet').drop('source_file').write_json())"));
        let cols = column_payloads(&d.path().join(&out));
        let rejected = read_rows(d.path(), &format!("{out}/rejected.parquet"));
        assert!(rejected.is_empty(), "{}: {rejected:?}", input.display());
        match &reference {
            None => {
                assert!(pairs.matches("row_id").count() == 6, "six pairs: {pairs}");
                reference = Some((pairs, cols));
            }
            Some((p, c)) => {
                assert_eq!(&pairs, p, "{}: pairs.parquet differs from the parquet input's", input.display());
                assert!(&cols == c, "{}: the token columns differ from the parquet input's", input.display());
            }
        }
    }
}

#[test]
fn unusable_tokenizer_directories_and_old_prepared_data_are_clear_errors() {
    let d = tmp();
    let sp = d.path().join("sp_only");
    std::fs::create_dir_all(&sp).unwrap();
    std::fs::write(sp.join("tokenizer.model"), b"\x0a\x03abc").unwrap();
    python(d.path(), "pl.DataFrame({'prompt': ['a'], 'chosen': [' b'], 'rejected': [' c']}).write_parquet('in.parquet')");
    let err = fails(d.path(), &["prepare", "--input", "in.parquet", "--model", s(&sp), "--out", "p"]);
    assert!(err.contains("tokenizer.model") && err.contains("save_pretrained"), "{err}");
    assert!(!d.path().join("p").join("manifest.json").exists());
    // A prepared directory of format 2 (tokenizer.json run as it is) is refused downstream.
    let model = tiny_model(d.path(), "llama");
    prepare_synth(d.path(), &model, "8", "2");
    let mpath = d.path().join("prep/manifest.json");
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    m["format_version"] = 2.into();
    std::fs::write(&mpath, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    let err = fails(d.path(), &["cache-ref", "--prepared", "prep", "--model", s(&model), "--out", "cache"]);
    assert!(err.contains("prepare --force") && err.contains("format version 2"), "{err}");
}

#[test]
fn ultrafeedback_rows_take_the_prompt_from_the_conversations() {
    // UltraFeedback-binarized's shape: a string prompt beside whole conversations; the prompt is
    // the shared leading messages (TRL's maybe_extract_prompt), as if written out explicitly.
    let d = tmp();
    let model = phi3_dir(d.path(), "llama", Some("Qwen-Qwen2.5-7B-Instruct.jinja"));
    python(
        d.path(),
        r#"
m = lambda r, c: {"role": r, "content": c}
q = "What is 2+2?"
pl.DataFrame({"prompt": [q], "chosen": [[m("user", q), m("assistant", "4")]], "rejected": [[m("user", q), m("assistant", "5")]]}).write_parquet("uf.parquet")
pl.DataFrame({"prompt": [[m("user", q)]], "chosen": [[m("assistant", "4")]], "rejected": [[m("assistant", "5")]]}).write_parquet("explicit.parquet")
"#,
    );
    for (input, out) in [("uf.parquet", "a"), ("explicit.parquet", "b")] {
        ok(d.path(), &["prepare", "--input", input, "--model", s(&model), "--out", out]);
    }
    let (a, b) = (read_rows(d.path(), "a/pairs.parquet"), read_rows(d.path(), "b/pairs.parquet"));
    assert_eq!(a.len(), 1);
    for k in ["prompt_ids", "chosen_ids", "rejected_ids"] {
        assert_eq!(a[0][k], b[0][k], "{k}");
    }
}
