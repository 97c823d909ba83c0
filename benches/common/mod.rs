//! Helpers for the benchmarks: run the release `pipeline` binary and measure its peak RSS.
#![allow(dead_code)]
use std::path::Path;
use std::process::Command;
use std::time::Instant;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pipeline")
}

/// Runs `pipeline ARGS` in `dir`; returns (wall seconds, peak RSS in MiB).
pub fn run(dir: &Path, args: &[&str]) -> (f64, f64) {
    let t = Instant::now();
    // Reaped by wait4 below, which also reports the peak RSS.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(bin()).args(args).current_dir(dir).stderr(std::process::Stdio::inherit()).spawn().expect("spawn");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: plain wait4 on our own child; rusage is a POD out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert!(r == pid && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "pipeline {args:?} failed");
    (t.elapsed().as_secs_f64(), usage.ru_maxrss as f64 / 1024.0)
}

pub fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

pub fn threads() -> String {
    std::env::var("BENCH_THREADS").unwrap_or_else(|_| "2".into())
}
