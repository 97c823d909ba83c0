//! Stage 1: TRL's tokenization conventions (against values TRL itself produced), rejections,
//! errors, determinism, atomicity, schemas.
mod common;
use common::*;
use dpo_pipeline::store::file_hash;
use serde_json::Value;
use std::path::Path;

fn check_golden(case: &str, arch: &str) {
    let d = tmp();
    let model = tiny_model(d.path(), arch);
    let g: Value = serde_json::from_str(&std::fs::read_to_string(golden(&format!("trl_{case}_{arch}.json"))).unwrap()).unwrap();
    assert_eq!(
        g["tokenizer_blake3"].as_str().unwrap(),
        file_hash(&model.join("tokenizer.json")).unwrap().blake3,
        "the generated tokenizer changed: regenerate tests/golden with scripts/make_golden.sh"
    );
    let input = golden(&format!("{case}_{arch}.parquet"));
    let max_length = g["max_length"].to_string();
    ok(d.path(), &["prepare", "--input", s(&input), "--model", s(&model), "--out", "prep", "--max-length", &max_length]);
    let rows = read_rows(d.path(), "prep/pairs.parquet");
    let want = g["rows"].as_array().unwrap();
    assert_eq!(rows.len(), want.len(), "{case}/{arch}: kept rows");
    for (i, (got, want)) in rows.iter().zip(want).enumerate() {
        for k in ["prompt_ids", "chosen_ids", "rejected_ids"] {
            assert_eq!(got[k], want[k], "{case}/{arch} row {i}: {k}");
        }
        assert_eq!(got["chosen_scored_tokens"], want["chosen_scored"], "{case}/{arch} row {i}: chosen scored tokens");
        assert_eq!(got["rejected_scored_tokens"], want["rejected_scored"], "{case}/{arch} row {i}: rejected scored tokens");
    }
    // Rows TRL drops are kept, with a reason, in rejected.parquet.
    let rejected = read_rows(d.path(), "prep/rejected.parquet");
    assert_eq!(rejected.len() + rows.len(), g["rows_in"].as_u64().unwrap() as usize);
    for r in &rejected {
        assert_eq!(r["reason"], "prompt_too_long");
    }
}

#[test]
fn matches_trl_standard_with_and_without_bos() {
    // llama's tokenizer adds a BOS, qwen2's does not; the cases cover a trailing-space prompt,
    // an EOS already present, unicode, truncation and a prompt longer than max_length.
    check_golden("standard", "llama");
    check_golden("standard", "qwen2");
}

#[test]
fn matches_trl_implicit_prompt() {
    check_golden("implicit", "llama");
    check_golden("implicit", "qwen2");
}

#[test]
fn matches_trl_conversational_with_system_turns() {
    check_golden("conversational", "llama");
    check_golden("conversational", "qwen2");
    check_golden("conversational_implicit", "llama");
    check_golden("conversational_implicit", "qwen2");
}

/// Writes a parquet file with polars from a Python expression building a DataFrame `df`.
fn write_df(dir: &Path, file: &str, df_code: &str) {
    python(dir, &format!("{df_code}\ndf.write_parquet({file:?})"));
}

#[test]
fn every_rejection_reason_is_kept_with_its_row() {
    let d = tmp();
    let model = tiny_model(d.path(), "qwen2");
    write_df(
        d.path(),
        "text.parquet",
        r#"
df = pl.DataFrame({
  "prompt":   ["Q: a?\nA:", None,   "Q: b?\nA:", "",      "Q: " + "x y " * 300, "Q: ok?\nA:", "Q: c?\nA:", "Q: d?\nA:"],
  "chosen":   [" yes",      " yes", " same",     " yes",  " yes",               " fine",      "",          " yes"],
  "rejected": [" no",       " no",  " same",     " no",   " no",                " bad",       " no",       ""],
})"#,
    );
    ok(d.path(), &["prepare", "--input", "text.parquet", "--model", s(&model), "--out", "p1", "--max-length", "64"]);
    let rej = read_rows(d.path(), "p1/rejected.parquet");
    let reasons: Vec<(u64, &str)> = rej.iter().map(|r| (r["source_row"].as_u64().unwrap(), r["reason"].as_str().unwrap())).collect();
    assert_eq!(
        reasons,
        vec![
            (1, "null_field"),
            (2, "chosen_equals_rejected"),
            (3, "empty_prompt"),
            (4, "prompt_too_long"),
            (6, "empty_completion"),
            (7, "empty_completion")
        ]
    );
    assert!(rej[4]["detail"].as_str().unwrap().contains("chosen") && rej[5]["detail"].as_str().unwrap().contains("rejected"));
    assert!(rej[0]["detail"].as_str().unwrap().contains("prompt"), "detail names the column: {}", rej[0]["detail"]);
    let kept = read_rows(d.path(), "p1/pairs.parquet");
    assert_eq!(kept.iter().map(|r| r["source_row"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 5]);
    assert_eq!(kept.iter().map(|r| r["row_id"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1], "row_id is dense");
    let m: Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("p1/manifest.json")).unwrap()).unwrap();
    assert_eq!(m["counts"]["rejected"], 6);
    assert_eq!(m["counts"]["rejected_empty_completion"], 2);
    assert_eq!(m["counts"]["rejected_prompt_too_long"], 1);

    // Conversational: malformed messages, a template that raises, no common prompt, mixed formats.
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(model.join("tokenizer_config.json")).unwrap()).unwrap();
    let t = cfg["chat_template"].as_str().unwrap().to_string();
    cfg["chat_template"] = Value::from(format!(
        "{{% for m in messages %}}{{% if m['role'] == 'tool' %}}{{{{ raise_exception('tool role not supported') }}}}{{% endif %}}{{% endfor %}}{t}"
    ));
    std::fs::write(model.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    write_df(
        d.path(),
        "conv.parquet",
        r#"
m = lambda r, c: {"role": r, "content": c}
df = pl.DataFrame({
  "chosen": [
     [m("user", "hi"), m("assistant", "hello")],
     [m("user", "hi"), m(None, "no role")],
     [m("tool", "x"), m("assistant", "a")],
     [m("user", "one"), m("assistant", "a")],
     [m("user", "hey"), m("assistant", "")],
  ],
  "rejected": [
     [m("user", "hi"), m("assistant", "go away")],
     [m("user", "hi"), m("assistant", "b")],
     [m("tool", "x"), m("assistant", "b")],
     [m("user", "two"), m("assistant", "b")],
     [m("user", "hey"), m("assistant", "b")],
  ],
})"#,
    );
    ok(d.path(), &["prepare", "--input", "conv.parquet", "--model", s(&model), "--out", "p2"]);
    let rej = read_rows(d.path(), "p2/rejected.parquet");
    let reasons: Vec<(u64, &str)> = rej.iter().map(|r| (r["source_row"].as_u64().unwrap(), r["reason"].as_str().unwrap())).collect();
    assert_eq!(reasons, vec![(1, "malformed_messages"), (2, "template_error"), (3, "no_common_prompt"), (4, "empty_completion")]);
    assert!(rej[1]["detail"].as_str().unwrap().contains("tool role not supported"), "{}", rej[1]["detail"]);
    assert_eq!(read_rows(d.path(), "p2/pairs.parquet").len(), 1);

    write_df(
        d.path(),
        "mixed.parquet",
        r#"
df = pl.DataFrame({"prompt": [[{"role": "user", "content": "hi"}]], "chosen": [" a"], "rejected": [" b"]})"#,
    );
    ok(d.path(), &["prepare", "--input", "mixed.parquet", "--model", s(&model), "--out", "p3"]);
    assert_eq!(read_rows(d.path(), "p3/rejected.parquet")[0]["reason"], "mixed_formats");
}

#[test]
fn bad_input_is_a_clear_error_with_no_partial_output() {
    let d = tmp();
    let model = tiny_model(d.path(), "qwen2");
    let m = s(&model);
    ok(d.path(), &["synth-prefs", "--out", "good.parquet", "--rows", "50"]);
    let e = fails(d.path(), &["prepare", "--input", "missing.parquet", "--model", m, "--out", "o"]);
    assert!(e.contains("missing.parquet") && e.contains("no such file"), "{e}");
    std::fs::write(d.path().join("notparquet.parquet"), "prompt,chosen,rejected\n").unwrap();
    let e = fails(d.path(), &["prepare", "--input", "notparquet.parquet", "--model", m, "--out", "o"]);
    assert!(e.contains("notparquet.parquet") && e.contains("not a readable parquet file"), "{e}");
    write_df(d.path(), "nocol.parquet", r#"df = pl.DataFrame({"prompt": ["a"], "chosen": ["b"], "reject": ["c"]})"#);
    let e = fails(d.path(), &["prepare", "--input", "good.parquet", "nocol.parquet", "--model", m, "--out", "o"]);
    assert!(e.contains("nocol.parquet") && e.contains("no column `rejected`"), "{e}");
    write_df(d.path(), "badtype.parquet", r#"df = pl.DataFrame({"prompt": ["a"], "chosen": [1], "rejected": ["c"]})"#);
    let e = fails(d.path(), &["prepare", "--input", "badtype.parquet", "--model", m, "--out", "o"]);
    assert!(e.contains("badtype.parquet") && e.contains("column `chosen` has type Int64"), "{e}");
    // A tokenizer without EOS cannot serve plain text; a model without a template, conversations.
    let noeos = d.path().join("noeos");
    std::fs::create_dir_all(&noeos).unwrap();
    // (No config.json: under model_type qwen2 transformers' Qwen2Tokenizer would supply its
    // default EOS, `<|endoftext|>`.)
    std::fs::copy(model.join("tokenizer.json"), noeos.join("tokenizer.json")).unwrap();
    std::fs::write(noeos.join("tokenizer_config.json"), r#"{"bos_token": null}"#).unwrap();
    let e = fails(d.path(), &["prepare", "--input", "good.parquet", "--model", s(&noeos), "--out", "o"]);
    assert!(e.contains("no eos_token") && e.contains("good.parquet"), "{e}");
    ok(d.path(), &["synth-prefs", "--out", "conv.parquet", "--rows", "20", "--conversational"]);
    let e = fails(d.path(), &["prepare", "--input", "conv.parquet", "--model", s(&noeos), "--out", "o"]);
    assert!(e.contains("chat template"), "{e}");
    // Nothing under a final name, no partial files left behind.
    let o = d.path().join("o");
    for f in ["pairs.parquet", "rejected.parquet", "manifest.json", "token_ids.u32"] {
        assert!(!o.join(f).exists(), "{f} must not exist after a failed run");
    }
    assert!(partial_files(&o).is_empty(), "left behind: {:?}", partial_files(&o));
}

#[test]
fn output_is_identical_whatever_the_thread_count_and_reruns_are_no_ops() {
    let d = tmp();
    let model = tiny_model(d.path(), "llama");
    ok(d.path(), &["synth-prefs", "--out", "in.parquet", "--rows", "5000"]);
    let m = s(&model);
    ok(d.path(), &["--threads", "1", "prepare", "--input", "in.parquet", "--model", m, "--out", "t1", "--eval-fraction", "0.1"]);
    ok(d.path(), &["--threads", "2", "prepare", "--input", "in.parquet", "--model", m, "--out", "t2", "--eval-fraction", "0.1"]);
    for f in ["pairs.parquet", "rejected.parquet", "token_ids.u32", "row_offsets.u64", "split.u32", "chosen_scored.u32"] {
        assert_eq!(std::fs::read(d.path().join("t1").join(f)).unwrap(), std::fs::read(d.path().join("t2").join(f)).unwrap(), "{f} differs");
    }
    let e = ok(d.path(), &["prepare", "--input", "in.parquet", "--model", m, "--out", "t1", "--eval-fraction", "0.1"]);
    assert!(e.contains("up to date"), "{e}");
    let e = ok(d.path(), &["prepare", "--input", "in.parquet", "--model", m, "--out", "t1", "--eval-fraction", "0.1", "--force"]);
    assert!(e.contains("5000 pairs"), "{e}");
}

#[test]
fn eval_split_is_stable_when_rows_are_added() {
    let d = tmp();
    let model = tiny_model(d.path(), "qwen2");
    ok(d.path(), &["synth-prefs", "--out", "a.parquet", "--rows", "400", "--seed", "3"]);
    ok(d.path(), &["synth-prefs", "--out", "b.parquet", "--rows", "300", "--seed", "4"]);
    let m = s(&model);
    ok(d.path(), &["prepare", "--input", "a.parquet", "--model", m, "--out", "pa", "--eval-fraction", "0.2"]);
    ok(d.path(), &["prepare", "--input", "a.parquet", "b.parquet", "--model", m, "--out", "pab", "--eval-fraction", "0.2"]);
    let out = python(
        d.path(),
        r#"
a = pl.read_parquet("pa/pairs.parquet").select("source_row", "split")
ab = pl.read_parquet("pab/pairs.parquet").filter(pl.col("source_file") == "a.parquet").select("source_row", "split")
j = a.join(ab, on="source_row")
print(len(j), (j["split"] == j["split_right"]).all(), (a["split"] == "eval").mean())"#,
    );
    let parts: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(parts[0], "400");
    assert_eq!(parts[1], "True", "rows of a.parquet kept their split");
    let frac: f64 = parts[2].parse().unwrap();
    assert!((0.1..0.3).contains(&frac), "eval fraction {frac}");
}

#[test]
fn max_prompt_length_keeps_the_end_of_the_prompt() {
    let d = tmp();
    let model = tiny_model(d.path(), "qwen2");
    write_df(
        d.path(),
        "in.parquet",
        r#"df = pl.DataFrame({"prompt": ["one two three four five six seven eight nine ten?"], "chosen": [" yes"], "rejected": [" no"]})"#,
    );
    ok(d.path(), &["prepare", "--input", "in.parquet", "--model", s(&model), "--out", "full"]);
    ok(d.path(), &["prepare", "--input", "in.parquet", "--model", s(&model), "--out", "cut", "--max-prompt-length", "4"]);
    let full = read_rows(d.path(), "full/pairs.parquet");
    let cut = read_rows(d.path(), "cut/pairs.parquet");
    let f = full[0]["prompt_ids"].as_array().unwrap();
    assert!(f.len() > 4);
    assert_eq!(cut[0]["prompt_ids"].as_array().unwrap()[..], f[f.len() - 4..]);
    assert_eq!(cut[0]["chosen_ids"], full[0]["chosen_ids"]);
}

#[test]
fn schema_files_describe_the_outputs() {
    let d = tmp();
    let model = tiny_model(d.path(), "llama");
    ok(d.path(), &["synth-prefs", "--out", "in.parquet", "--rows", "30"]);
    ok(d.path(), &["prepare", "--input", "in.parquet", "--model", s(&model), "--out", "prep"]);
    ok(d.path(), &["cache-ref", "--prepared", "prep", "--model", s(&model), "--out", "cache"]);
    for (schema, file) in [
        ("pairs.parquet.json", "prep/pairs.parquet"),
        ("rejected.parquet.json", "prep/rejected.parquet"),
        ("ref_logps.parquet.json", "cache/ref_logps.parquet"),
    ] {
        check_schema(d.path(), schema, file);
    }
}

#[test]
fn generated_models_and_data_are_byte_identical_for_the_same_arguments() {
    let d = tmp();
    for out in ["a", "b"] {
        ok(d.path(), &["init-model", "--arch", "llama", "--seed", "7", "--out", out]);
        ok(d.path(), &["synth-prefs", "--out", &format!("{out}.parquet"), "--rows", "300", "--seed", "7", "--conversational"]);
    }
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(std::fs::read(d.path().join("a").join(f)).unwrap(), std::fs::read(d.path().join("b").join(f)).unwrap(), "{f}");
    }
    assert_eq!(std::fs::read(d.path().join("a.parquet")).unwrap(), std::fs::read(d.path().join("b.parquet")).unwrap());
    ok(d.path(), &["init-model", "--arch", "llama", "--seed", "8", "--out", "c"]);
    assert_ne!(std::fs::read(d.path().join("a/model.safetensors")).unwrap(), std::fs::read(d.path().join("c/model.safetensors")).unwrap());
}

#[test]
fn mapped_column_names_and_large_arrow_types_are_read() {
    let d = tmp();
    let model = tiny_model(d.path(), "qwen2");
    // The same rows as large_string / large_list columns under other names (pyarrow), and as
    // plain string / list columns with the standard names.
    python(
        d.path(),
        r#"
import pyarrow as pa, pyarrow.parquet as pq
msgs = pa.large_list(pa.struct([("role", pa.large_string()), ("content", pa.large_string())]))
rows = [([{"role": "user", "content": f"What is {i} plus 1?"}], [{"role": "assistant", "content": f"{i} plus 1 is {i+1}."}],
         [{"role": "assistant", "content": "idk"}]) for i in range(5)]
t = pa.table({"question": pa.array([r[0] for r in rows], msgs), "good": pa.array([r[1] for r in rows], msgs),
              "bad": pa.array([r[2] for r in rows], msgs), "extra": pa.array(list(range(5)))})
pq.write_table(t, "large.parquet")
plain = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
pq.write_table(pa.table({"prompt": pa.array([r[0] for r in rows], plain), "chosen": pa.array([r[1] for r in rows], plain),
                         "rejected": pa.array([r[2] for r in rows], plain)}), "plain.parquet")
"#,
    );
    let m = s(&model);
    ok(
        d.path(),
        &[
            "prepare", "--input", "large.parquet", "--model", m, "--out", "a", "--prompt-column", "question", "--chosen-column", "good",
            "--rejected-column", "bad",
        ],
    );
    ok(d.path(), &["prepare", "--input", "plain.parquet", "--model", m, "--out", "b"]);
    let (a, b) = (read_rows(d.path(), "a/pairs.parquet"), read_rows(d.path(), "b/pairs.parquet"));
    assert_eq!(a.len(), 5);
    for (x, y) in a.iter().zip(&b) {
        for k in ["prompt_ids", "chosen_ids", "rejected_ids"] {
            assert_eq!(x[k], y[k]);
        }
    }
    let e = fails(d.path(), &["prepare", "--input", "large.parquet", "--model", m, "--out", "c", "--prompt-column", "nope"]);
    assert!(e.contains("large.parquet") && e.contains("no column `nope`") && e.contains("question"), "{e}");
}
