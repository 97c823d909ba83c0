//! Hub ids (`--model ORG/NAME[@REVISION]`, `--input ORG/NAME`) through the Hugging Face cache as
//! `huggingface_hub` lays it out, so files Python tools fetched are shared: `$HF_HUB_CACHE`, else
//! `$HF_HOME/hub`, else `~/.cache/huggingface/hub`; `models--ORG--NAME/refs/REVISION` holds a
//! commit sha and `snapshots/SHA/` the files (links into `blobs/`); datasets the same under
//! `datasets--ORG--NAME`. A path that exists is always a path. An id missing from the cache is
//! downloaded with Hugging Face's own client (the `hf-hub` crate, with progress bars) unless
//! `HF_HUB_OFFLINE=1`; offline it is an error naming the id, the cache searched and the command
//! that fetches it.
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// A model or dataset on the Hub, as the command line named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: String,
}

/// Where a model or a dataset's files are, and the Hub snapshot they came from (None: a local path).
#[derive(Debug, Clone)]
pub struct Resolved {
    pub path: PathBuf,
    pub hub: Option<(HubId, String)>,
}

impl Resolved {
    /// What the manifests record: the id and the resolved commit, so the fingerprint pins it.
    pub fn record(&self) -> Option<serde_json::Value> {
        self.hub.as_ref().map(|(id, sha)| serde_json::json!({"id": id.repo, "revision": id.revision, "commit": sha}))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Model,
    Dataset,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Model => "models",
            Kind::Dataset => "datasets",
        }
    }
}

/// `ORG/NAME` or `ORG/NAME@REVISION` (letters, digits, `-`, `_`, `.`), for a path that does not exist.
pub fn parse_id(s: &str) -> Option<HubId> {
    let (repo, revision) = s.split_once('@').unwrap_or((s, "main"));
    let (org, name) = repo.split_once('/')?;
    let ok = |p: &str| !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    (ok(org) && ok(name) && !revision.is_empty() && !Path::new(s).exists()).then(|| HubId { repo: repo.to_string(), revision: revision.to_string() })
}

/// The hub cache directory, as huggingface_hub finds it.
pub fn cache_dir() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("HF_HUB_CACHE")
        .or_else(|| env("HF_HOME").map(|h| h.join("hub")))
        .unwrap_or_else(|| env("HOME").unwrap_or_else(|| PathBuf::from(".")).join(".cache/huggingface/hub"))
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "True" | "yes" | "on"))
}

fn repo_dir(kind: Kind, id: &HubId) -> PathBuf {
    cache_dir().join(format!("{}--{}", kind.prefix(), id.repo.replace('/', "--")))
}

/// The snapshot of `id` in the cache, if the revision (a ref name or a commit sha) is there.
fn cached_snapshot(kind: Kind, id: &HubId) -> Option<(PathBuf, String)> {
    let dir = repo_dir(kind, id);
    let sha = match std::fs::read_to_string(dir.join("refs").join(&id.revision)) {
        Ok(s) => s.trim().to_string(),
        Err(_) => id.revision.clone(),
    };
    let snap = dir.join("snapshots").join(&sha);
    snap.is_dir().then_some((snap, sha))
}

fn fetch_hint(kind: Kind, id: &HubId) -> String {
    let t = if kind == Kind::Dataset { " --repo-type dataset" } else { "" };
    let r = if id.revision == "main" { String::new() } else { format!(" --revision {}", id.revision) };
    format!("hf download {}{t}{r}", id.repo)
}

/// A model directory: the path as it is, or a hub id's snapshot (downloaded when missing and online).
pub fn model_dir(spec: &Path) -> Result<Resolved> {
    let Some(id) = spec.to_str().and_then(parse_id) else { return Ok(Resolved { path: spec.to_path_buf(), hub: None }) };
    let (path, sha) = match cached_snapshot(Kind::Model, &id) {
        Some(s) if s.0.join("config.json").exists() || s.0.join("adapter_config.json").exists() => s,
        _ => download(Kind::Model, &id, model_file)?,
    };
    Ok(Resolved { path, hub: Some((id, sha)) })
}

/// Files a model directory needs: configs, tokenizer files, templates and weights.
fn model_file(name: &str) -> bool {
    !name.contains('/')
        && (name.ends_with(".json")
            || name.ends_with(".safetensors")
            || name.ends_with(".jinja")
            || name.ends_with(".model")
            || name.ends_with(".txt"))
}

/// Extensions `prepare` and `sample` read.
const DATA_EXTS: &[&str] = &[".parquet", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".arrow"];

/// Whether a dataset file (its path in the repository) belongs to `split` (and `subset`): a
/// directory named like the split, or a file name starting with it and a separator
/// (`train-00000-of-00001.parquet`, `test.jsonl`), as the `datasets` library's default patterns
/// decide (without reading a README's `configs:`).
fn split_file(rel: &str, split: &str, subset: Option<&str>) -> bool {
    if !DATA_EXTS.iter().any(|e| rel.ends_with(e)) || rel.split('/').any(|p| p.starts_with('.')) {
        return false;
    }
    let parts: Vec<&str> = rel.split('/').collect();
    let (dirs, file) = parts.split_at(parts.len() - 1);
    if subset.is_some_and(|s| !dirs.contains(&s)) {
        return false;
    }
    let named = |n: &str| ["-", ".", "_"].iter().any(|sep| n.starts_with(&format!("{split}{sep}")));
    dirs.contains(&split) || named(file[0])
}

/// A dataset's data files for `split` (and `subset`): local paths as they are, or a hub id's
/// files in the cache (downloaded when missing and online), sorted.
pub fn dataset_files(spec: &str, split: &str, subset: Option<&str>) -> Result<(Vec<String>, Option<serde_json::Value>)> {
    let Some(id) = parse_id(spec) else { return Ok((vec![spec.to_string()], None)) };
    let pick = |f: &str| split_file(f, split, subset);
    // A cached snapshot without the split's files: fetch them, or (offline) say what it has.
    let snapshot = match cached_snapshot(Kind::Dataset, &id) {
        Some(s) if offline() || !files_under(&s.0, &pick).is_empty() => s,
        _ => download(Kind::Dataset, &id, pick)?,
    };
    let mut files = files_under(&snapshot.0, &pick);
    // No subset named: the default configuration's files, under `data/` when there are any (the
    // layout `push_to_hub` writes; other top-level directories are other subsets).
    if subset.is_none() && files.iter().any(|f| f.strip_prefix(&snapshot.0).is_ok_and(|r| r.starts_with("data"))) {
        files.retain(|f| f.strip_prefix(&snapshot.0).is_ok_and(|r| r.starts_with("data")));
    }
    if files.is_empty() {
        let all = files_under(&snapshot.0, &|f: &str| DATA_EXTS.iter().any(|e| f.ends_with(e)));
        bail!(
            "{spec}: no data files for split `{split}`{} in {} (it has: {})",
            subset.map(|s| format!(" and subset `{s}`")).unwrap_or_default(),
            snapshot.0.display(),
            all.iter().map(|p| p.strip_prefix(&snapshot.0).unwrap_or(p).display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    let resolved = Resolved { path: snapshot.0, hub: Some((id, snapshot.1)) };
    let mut record = resolved.record().expect("a hub id");
    record["split"] = split.into();
    record["subset"] = subset.into();
    Ok((files.iter().map(|p| p.display().to_string()).collect(), Some(record)))
}

/// The files under `dir` (following the snapshot's links) whose relative paths `pick` keeps, sorted.
fn files_under(dir: &Path, pick: &dyn Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.strip_prefix(dir).ok().and_then(|r| r.to_str()).is_some_and(pick) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Fetches the files of `id` that `want` keeps into the cache, as huggingface_hub would, and
/// returns the snapshot; offline, the error that says how to fetch it.
fn download(kind: Kind, id: &HubId, want: impl Fn(&str) -> bool) -> Result<(PathBuf, String)> {
    let what = if kind == Kind::Model { "model" } else { "dataset" };
    if offline() {
        bail!(
            "{what} `{}`{}: not a local path (no such file or directory) and not in the Hugging Face cache (searched {}; HF_HUB_OFFLINE=1 forbids downloading); fetch it with `{}`",
            id.repo,
            if id.revision == "main" { String::new() } else { format!(" at revision {}", id.revision) },
            repo_dir(kind, id).display(),
            fetch_hint(kind, id)
        );
    }
    use hf_hub::{api::sync::ApiBuilder, Cache, Repo, RepoType};
    // As huggingface_hub: the token beside the cache (or HF_TOKEN), a mirror from HF_ENDPOINT.
    let mut builder = ApiBuilder::from_cache(Cache::new(cache_dir())).with_progress(true);
    if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
        builder = builder.with_token(Some(token));
    }
    if let Some(endpoint) = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()) {
        builder = builder.with_endpoint(endpoint);
    }
    let api = builder.build().context("cannot start the Hugging Face client")?;
    let repo_type = if kind == Kind::Model { RepoType::Model } else { RepoType::Dataset };
    let repo = api.repo(Repo::with_revision(id.repo.clone(), repo_type, id.revision.clone()));
    let fail = |e: hf_hub::api::sync::ApiError| {
        anyhow::anyhow!(
            "{what} `{}`: not a local path (no such file or directory), not in the Hugging Face cache ({}), and the download failed: {e}; fetch it with `{}`, or set HF_HUB_OFFLINE=1 to work from the cache only",
            id.repo,
            repo_dir(kind, id).display(),
            fetch_hint(kind, id)
        )
    };
    let info = repo.info().map_err(fail)?;
    let mut files: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).filter(|f| want(f)).collect();
    // Repositories that ship the transformers checkpoint beside another format's weights
    // (Mistral's `consolidated.safetensors`): only transformers' files.
    let hf_weights = |f: &String| f.starts_with("model") || f.starts_with("adapter_model");
    if kind == Kind::Model && files.iter().any(|f| f.ends_with(".safetensors") && hf_weights(f)) {
        files.retain(|f| !f.ends_with(".safetensors") || hf_weights(f));
    }
    if files.is_empty() {
        bail!("{what} `{}` at {}: no files to fetch", id.repo, info.sha);
    }
    eprintln!("hub: fetching {} file(s) of {what} {} into {}", files.len(), id.repo, cache_dir().display());
    for f in &files {
        repo.get(f).map_err(fail)?;
    }
    cached_snapshot(kind, &HubId { repo: id.repo.clone(), revision: info.sha.clone() })
        .map(|(p, _)| (p, info.sha.clone()))
        .with_context(|| format!("{what} `{}`: downloaded, but no snapshot {} in the cache", id.repo, info.sha))
}

/// `dataset_files` over every `--input`: the data files' paths (local specs as they are, for
/// globbing and directories) and a record of each hub id resolved.
pub fn dataset_inputs(specs: &[String], split: &str, subset: Option<&str>) -> Result<(Vec<String>, Vec<serde_json::Value>)> {
    let (mut files, mut records) = (Vec::new(), Vec::new());
    for s in specs {
        let (f, r) = dataset_files(s, split, subset)?;
        files.extend(f);
        records.extend(r);
    }
    Ok((files, records))
}

/// `model_dir` of an optional setting, and its record pushed onto `records`.
pub fn optional_model(spec: Option<&Path>, records: &mut Vec<serde_json::Value>) -> Result<Option<PathBuf>> {
    let Some(spec) = spec else { return Ok(None) };
    let r = model_dir(spec)?;
    records.extend(r.record());
    Ok(Some(r.path))
}
