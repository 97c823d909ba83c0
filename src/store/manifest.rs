//! `manifest.json`: what a stage built, from what, with which settings. The fingerprint is the
//! hash of the inputs' content hashes and every setting that changes the output.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

pub type Fingerprint = String;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub stage: String,
    pub format_version: u32,
    pub fingerprint: Fingerprint,
    pub tool_version: String,
    /// Everything the stage read: a role, a path (for people) and a content hash (blake3 of
    /// the file, or the fingerprint of an upstream stage's output).
    pub inputs: Vec<InputRef>,
    /// Every setting that changes the output.
    pub settings: serde_json::Value,
    pub counts: BTreeMap<String, u64>,
    #[serde(default)]
    pub stats: serde_json::Value,
    #[serde(default)]
    pub timings: BTreeMap<String, f64>,
    /// Output files with their size and blake3 hash, so a reader can check it got what was written.
    #[serde(default)]
    pub files: BTreeMap<String, FileEntry>,
}

/// One input of a stage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InputRef {
    /// What the input is to the stage: `input`, `eval_input`, `tokenizer/...`, `prepared`, `model`, ...
    pub role: String,
    pub path: String,
    pub blake3: String,
}

impl InputRef {
    pub fn new(role: &str, path: &Path, blake3: &str) -> Self {
        Self { role: role.into(), path: path.display().to_string(), blake3: blake3.into() }
    }
}

/// The first 16 characters of a hash, for messages (whole if shorter: a damaged manifest
/// must give an error, not a panic).
pub fn short(hash: &str) -> &str {
    match hash.char_indices().nth(16) {
        Some((i, _)) => &hash[..i],
        None => hash,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    pub bytes: u64,
    pub blake3: String,
}

/// JSON text with every object's keys sorted, so a value's hash does not depend on key order
/// (objects keep their insertion order in memory: chat templates see keys as the data has them).
pub fn canonical_json(v: &serde_json::Value) -> String {
    fn sorted(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(o) => {
                let mut keys: Vec<&String> = o.keys().collect();
                keys.sort();
                serde_json::Value::Object(keys.into_iter().map(|k| (k.clone(), sorted(&o[k]))).collect())
            }
            serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(v).to_string()
}

/// Fingerprint of a stage's output: blake3 of canonical JSON of the stage, its format version,
/// the inputs' roles and content hashes (never their paths) and the settings.
pub fn fingerprint(stage: &str, format_version: u32, inputs: &[InputRef], settings: &serde_json::Value) -> Fingerprint {
    let hashes: Vec<(&str, &str)> = inputs.iter().map(|i| (i.role.as_str(), i.blake3.as_str())).collect();
    let canonical = serde_json::json!({"stage": stage, "format_version": format_version, "inputs": hashes, "settings": settings});
    blake3::hash(canonical_json(&canonical).as_bytes()).to_hex().to_string()
}

pub fn file_hash(path: &Path) -> Result<FileEntry> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        h.update(&buf[..n]);
    }
    Ok(FileEntry { bytes, blake3: h.finalize().to_hex().to_string() })
}

impl Manifest {
    /// An empty manifest for a run that stopped early on purpose (nothing is finished yet).
    pub fn unfinished(stage: &str, format_version: u32, fingerprint: &str) -> Self {
        Manifest {
            stage: stage.into(),
            format_version,
            fingerprint: fingerprint.into(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
            inputs: vec![],
            settings: serde_json::Value::Null,
            counts: Default::default(),
            stats: serde_json::Value::Null,
            timings: Default::default(),
            files: Default::default(),
        }
    }

    /// The input with this role.
    pub fn input(&self, role: &str) -> Result<&InputRef> {
        self.inputs.iter().find(|i| i.role == role).with_context(|| format!("manifest of `{}` lists no `{role}` input", self.stage))
    }

    pub fn path(dir: &Path) -> std::path::PathBuf {
        dir.join("manifest.json")
    }

    /// Reads `DIR/manifest.json`, checking it was written by `stage`.
    pub fn load(dir: &Path, stage: &str) -> Result<Self> {
        let path = Self::path(dir);
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("{} has no manifest.json: is it a finished `{stage}` output?", dir.display()))?;
        let m: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a valid manifest (damaged, or from an older version); rebuild it with --force", path.display()))?;
        if m.stage != stage {
            bail!("{}: manifest is from stage `{}`, expected `{stage}`", path.display(), m.stage);
        }
        Ok(m)
    }

    /// Loads the manifest only if one exists (for "already done?" checks).
    pub fn load_if_exists(dir: &Path, stage: &str) -> Result<Option<Self>> {
        if Self::path(dir).exists() {
            Self::load(dir, stage).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Records size and hash of each listed file in `dir`.
    pub fn record_files(&mut self, dir: &Path, names: &[&str]) -> Result<()> {
        for name in names {
            self.files.insert(name.to_string(), file_hash(&dir.join(name))?);
        }
        Ok(())
    }

    /// Checks every file the manifest lists is present and unchanged.
    pub fn verify_files(&self, dir: &Path) -> Result<()> {
        for (name, want) in &self.files {
            let path = dir.join(name);
            if !path.exists() {
                bail!("{}: missing, but listed in {}", path.display(), Self::path(dir).display());
            }
            let got = file_hash(&path)?;
            if &got != want {
                bail!(
                    "{}: does not match its manifest ({} bytes, blake3 {}; manifest says {} bytes, blake3 {}). \
                     The directory was modified or is incomplete; rebuild it with --force",
                    path.display(),
                    got.bytes,
                    short(&got.blake3),
                    want.bytes,
                    short(&want.blake3)
                );
            }
        }
        Ok(())
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)? + "\n";
        super::write_atomic(&Self::path(dir), text.as_bytes())
    }
}
