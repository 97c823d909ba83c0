//! Shared test helpers: run the real `pipeline` binary, generate tiny models, read outputs
//! with Python polars exactly as users do.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pipeline")
}

pub fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name)
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Runs `pipeline ARGS` in `dir`, returning its output whatever the exit status. Offline for the
/// Hub, with an empty cache of its own: a path that does not exist and looks like `ORG/NAME` is
/// a Hub id, and tests neither touch the network nor see a developer's Hugging Face cache.
pub fn run_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(dir)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", dir.join("hf-hub-cache"))
        .output()
        .expect("spawn pipeline")
}

/// Runs `pipeline ARGS` and fails the test (showing stderr) unless it succeeds.
pub fn ok(dir: &Path, args: &[&str]) -> String {
    let out = run_in(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "pipeline {args:?} failed:\n{stderr}");
    stderr
}

/// Runs `pipeline ARGS`, expects failure, returns stderr.
pub fn fails(dir: &Path, args: &[&str]) -> String {
    let out = run_in(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "pipeline {args:?} should have failed; stderr:\n{stderr}");
    stderr
}

/// Models generated once per test binary (under cargo's target tmp dir), copied into tests.
fn shared_model(arch: &str, seed: u64) -> PathBuf {
    static ROOT: OnceLock<tempfile::TempDir> = OnceLock::new();
    static GENERATE: Mutex<()> = Mutex::new(());
    let root = ROOT.get_or_init(|| tempfile::Builder::new().prefix("models-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir"));
    let out = root.path().join(format!("{arch}-{seed}"));
    let _g = GENERATE.lock().unwrap_or_else(|e| e.into_inner());
    if !out.join("config.json").exists() {
        ok(root.path(), &["init-model", "--arch", arch, "--size", "tiny", "--seed", &seed.to_string(), "--out", out.to_str().unwrap()]);
    }
    out
}

/// A copy in `dir` of the tiny model `pipeline init-model` makes with `seed`.
pub fn tiny_model_seed(dir: &Path, arch: &str, seed: u64) -> PathBuf {
    let out = dir.join(if seed == 0 { format!("model_{arch}") } else { format!("model_{arch}_{seed}") });
    if !out.join("config.json").exists() {
        let src = shared_model(arch, seed);
        std::fs::create_dir_all(&out).unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), out.join(e.file_name())).unwrap();
        }
    }
    out
}

/// The tiny model `pipeline init-model` makes (seed 0): the one the golden values came from.
pub fn tiny_model(dir: &Path, arch: &str) -> PathBuf {
    tiny_model_seed(dir, arch, 0)
}

/// The Python the tests read outputs with: the project's `.venv` (scripts/test.sh makes it),
/// else `python3`.
pub fn python_bin() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// Runs a Python snippet (with polars and numpy imported) in `dir` and returns its stdout.
pub fn python(dir: &Path, code: &str) -> String {
    let prelude = "import json, sys\nimport numpy as np\nimport polars as pl\n";
    let out = Command::new(python_bin()).arg("-c").arg(format!("{prelude}{code}")).current_dir(dir).output().expect("python3");
    assert!(out.status.success(), "python failed:\n{}\n{}", String::from_utf8_lossy(&out.stderr), code);
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Reads a parquet file with polars and returns its rows as JSON values.
pub fn read_rows(dir: &Path, file: &str) -> Vec<serde_json::Value> {
    let s = python(dir, &format!("print(pl.read_parquet({file:?}).write_json())"));
    serde_json::from_str::<serde_json::Value>(&s).expect("json").as_array().cloned().unwrap_or_default()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Files in `dir` whose names end in `.partial` (there must be none after any run).
pub fn partial_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().to_string()).filter(|n| n.contains(".partial")).collect())
        .unwrap_or_default()
}

/// `rows` synthetic pairs plus `eval_rows` held out, prepared with `model` into `dir/prep`
/// (max_length 64).
pub fn prepare_synth(dir: &Path, model: &Path, rows: &str, eval_rows: &str) {
    ok(dir, &["synth-prefs", "--out", "in.parquet", "--rows", rows, "--eval-rows", eval_rows]);
    ok(dir, &["prepare", "--input", "in.parquet", "--eval-input", "in.eval.parquet", "--model", s(model), "--out", "prep", "--max-length", "64"]);
}

/// Per-token log-probs of one unpadded causal sequence.
pub fn seq_logps(dec: &dpo_pipeline::model::Decoder, ids: &[u32]) -> Vec<f32> {
    let n = ids.len();
    let layout = dpo_pipeline::model::decoder::SeqLayout::causal(ids);
    let sc =
        dpo_pipeline::model::logprobs::Scored { rows: (0..n as u32 - 1).collect(), targets: ids[1..].to_vec(), seq: vec![0; n - 1], num_seqs: 1 };
    let h = dec.hidden(&layout).unwrap();
    dpo_pipeline::model::logprobs::token_logps(&h, dec.lm_head(), &sc, dec.cfg.final_softcap).unwrap().to_vec1().unwrap()
}

/// Checks that `file`'s columns and polars dtypes are what `schemas/<schema>` says.
pub fn check_schema(dir: &Path, schema: &str, file: &str) {
    let spec_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas").join(schema);
    let spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(spec_path).unwrap()).unwrap();
    let want: Vec<(String, String)> = spec["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap().to_string(), c["polars_dtype"].as_str().unwrap().to_string()))
        .collect();
    let got = python(dir, &format!("print(json.dumps([[k, str(v)] for k, v in pl.read_parquet_schema({file:?}).items()]))"));
    let got: Vec<(String, String)> = serde_json::from_str(&got).unwrap();
    assert_eq!(got, want, "{schema} and {file} drifted apart");
}

/// A JSON number.
pub fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap()
}

/// A JSON list of lists of numbers.
pub fn grid(v: &serde_json::Value) -> Vec<Vec<f64>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(f).collect()).collect()
}
