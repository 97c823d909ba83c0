//! The stages. Each owns its output directory; `begin` is what every stage does around
//! its work: lock the directory, fingerprint the inputs and settings, decide whether the work
//! is already done, and hand back what the manifest needs.
pub mod cache_ref;
pub mod label;
pub mod prepare;
pub mod sample;
pub mod train;

use crate::store::manifest::fingerprint;
use crate::store::{short, DirLock, InputRef, Manifest};
use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A stage's claim on its output directory while it works. Holding it holds the lock.
pub struct StageDir {
    pub dir: PathBuf,
    pub stage: &'static str,
    pub format_version: u32,
    pub fingerprint: String,
    pub inputs: Vec<InputRef>,
    pub settings: serde_json::Value,
    pub started: Instant,
    _lock: DirLock,
}

pub enum Begin {
    /// The directory already holds this exact output.
    UpToDate(Manifest),
    /// Work to do; the old manifest (if any) is gone, so a killed run never leaves a manifest
    /// over files it does not describe.
    Run(StageDir),
}

/// The one "already done?" policy of every stage: same fingerprint and intact files: nothing
/// to do; another fingerprint or damaged files: an error unless `force`.
pub fn begin(stage: &'static str, format_version: u32, dir: &Path, inputs: Vec<InputRef>, settings: serde_json::Value, force: bool) -> Result<Begin> {
    let started = Instant::now();
    let fp = fingerprint(stage, format_version, &inputs, &settings);
    let lock = DirLock::acquire(dir, stage)?;
    let old = match Manifest::load_if_exists(dir, stage) {
        Ok(old) => old,
        Err(_) if force => None,
        Err(e) => return Err(e),
    };
    if let Some(old) = old {
        if !force {
            if old.fingerprint != fp {
                bail!(
                    "{} holds `{stage}` output with fingerprint {}, but these inputs and settings give {}; \
                     pass --force to replace it, or choose another --out",
                    dir.display(),
                    short(&old.fingerprint),
                    short(&fp)
                );
            }
            if let Err(e) = old.verify_files(dir) {
                bail!("{e:#}");
            }
            eprintln!("{stage}: {} is up to date (fingerprint {}), nothing to do; --force redoes it", dir.display(), short(&fp));
            return Ok(Begin::UpToDate(old));
        }
    }
    let manifest = Manifest::path(dir);
    if manifest.exists() {
        std::fs::remove_file(&manifest)?;
    }
    Ok(Begin::Run(StageDir { dir: dir.to_path_buf(), stage, format_version, fingerprint: fp, inputs, settings, started, _lock: lock }))
}

impl StageDir {
    /// The manifest of the finished work (files are recorded by the caller).
    pub fn manifest(&self, counts: BTreeMap<String, u64>, stats: serde_json::Value) -> Manifest {
        Manifest {
            stage: self.stage.into(),
            format_version: self.format_version,
            fingerprint: self.fingerprint.clone(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
            inputs: self.inputs.clone(),
            settings: self.settings.clone(),
            counts,
            stats,
            timings: [("wall_s".to_string(), secs(self.started))].into(),
            files: Default::default(),
        }
    }

    /// Records the files' hashes and writes the manifest, last: its presence means the
    /// directory is whole.
    pub fn finish(self, mut manifest: Manifest, files: &[&str]) -> Result<Manifest> {
        manifest.record_files(&self.dir, files)?;
        manifest.save(&self.dir)?;
        Ok(manifest)
    }
}

/// A progress bar on stderr (hidden when stderr is not a terminal); a counter with its rate
/// when the total is not known up front (JSON inputs).
pub fn progress(len: impl Into<Option<u64>>, what: &str, unit: &str) -> ProgressBar {
    let Some(len) = len.into() else {
        let pb = ProgressBar::no_length();
        pb.set_style(
            ProgressStyle::with_template(&format!("{what} [{{elapsed_precise}}] {{pos}} {unit} ({{per_sec}}) {{msg}}")).expect("static template"),
        );
        return pb;
    };
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} [{{elapsed_precise}}] {{bar:30.cyan/blue}} {{pos}}/{{len}} {unit} ({{per_sec}}, eta {{eta}}) {{msg}}"
        ))
        .expect("static template")
        .progress_chars("=> "),
    );
    pb
}

/// Seconds since `t`, for manifests.
pub fn secs(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 1000.0).round() / 1000.0
}
