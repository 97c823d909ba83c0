//! Shared test helpers: run the real `pipeline` binary, generate tiny models, read outputs
//! with Python polars exactly as users do.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pipeline")
}

pub fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name)
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Runs `pipeline ARGS` in `dir`, returning its output whatever the exit status.
pub fn run_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin()).args(args).current_dir(dir).output().expect("spawn pipeline")
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

/// The tiny model `pipeline init-model` makes (seed 0): the one the golden values came from.
pub fn tiny_model(dir: &Path, arch: &str) -> PathBuf {
    let out = dir.join(format!("model_{arch}"));
    if !out.join("config.json").exists() {
        ok(dir, &["init-model", "--arch", arch, "--size", "tiny", "--seed", "0", "--out", out.to_str().unwrap()]);
    }
    out
}

/// Runs a Python snippet (with polars and numpy imported) in `dir` and returns its stdout.
pub fn python(dir: &Path, code: &str) -> String {
    let prelude = "import json, sys\nimport numpy as np\nimport polars as pl\n";
    let out = Command::new("python3").arg("-c").arg(format!("{prelude}{code}")).current_dir(dir).output().expect("python3");
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
