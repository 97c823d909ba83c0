//! The reference cache directory, written only by the `cache-ref` stage and read by `train`:
//! - `chosen_logps.f32`, `rejected_logps.f32`: log π_ref(y|x) per `row_id` (memory-mapped columns);
//! - `chosen_shared_logps.f32`, `rejected_shared_logps.f32`: the same over each completion's
//!   first min(chosen, rejected) scored tokens (LD-DPO's shared part);
//! - `chosen_tokens.u32`, `rejected_tokens.u32`: how many completion tokens were scored;
//! - `ref_logps.parquet`: the same, with `row_id` and `split`, for polars;
//! - unpaired data (KTO): the chosen columns hold each row's completion, the rejected ones its
//!   KL completion (another row's, see `prepared::kl_partners`; the manifest's settings say
//!   `kl_batch_size`), and the parquet view has TRL's names: `label`, `kl_row_id`, `ref_logps`,
//!   `ref_KL_logps`, `completion_scored_tokens`, `KL_scored_tokens`;
//! - `manifest.json` (and `progress.json` while unfinished).
//!
//! A shard (`cache-ref --shard K/N`) is a directory of its own, stage `cache-ref-shard`: the
//! four log-prob columns at full length (NaN outside the shard), `shard_rows.u64` (its row ids,
//! ascending) and a manifest whose settings hold the whole cache's settings under `cache`.
//! `merge-ref` joins shards into a cache identical to an unsharded run's.
use super::prepared::PreparedDataset;
use crate::store::{short, Column, Manifest, ParquetOut};
use anyhow::{bail, Context, Result};
use arrow_array::builder::{BooleanBuilder, Float32Builder, StringBuilder, UInt32Builder, UInt64Builder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const STAGE: &str = "cache-ref";
/// 2: manifest inputs are typed. 3: the shared-part columns (a version-2 cache still serves
/// every loss but LD-DPO).
pub const FORMAT_VERSION: u32 = 3;
pub const CHOSEN_LOGPS: &str = "chosen_logps.f32";
pub const REJECTED_LOGPS: &str = "rejected_logps.f32";
pub const CHOSEN_SHARED_LOGPS: &str = "chosen_shared_logps.f32";
pub const REJECTED_SHARED_LOGPS: &str = "rejected_shared_logps.f32";
/// The log-prob columns, in the order cache-ref fills them.
pub const LOGP_COLUMNS: [&str; 4] = [CHOSEN_LOGPS, REJECTED_LOGPS, CHOSEN_SHARED_LOGPS, REJECTED_SHARED_LOGPS];
pub const CHOSEN_TOKENS: &str = "chosen_tokens.u32";
pub const REJECTED_TOKENS: &str = "rejected_tokens.u32";
pub const PARQUET: &str = "ref_logps.parquet";
pub const PROGRESS: &str = "progress.json";
pub const FILES: [&str; 7] = [CHOSEN_LOGPS, REJECTED_LOGPS, CHOSEN_SHARED_LOGPS, REJECTED_SHARED_LOGPS, CHOSEN_TOKENS, REJECTED_TOKENS, PARQUET];
pub const SHARD_STAGE: &str = "cache-ref-shard";
pub const SHARD_ROWS: &str = "shard_rows.u64";
pub const SHARD_FILES: [&str; 5] = [CHOSEN_LOGPS, REJECTED_LOGPS, CHOSEN_SHARED_LOGPS, REJECTED_SHARED_LOGPS, SHARD_ROWS];

/// Which batches of the global plan shard k of n computes: each batch goes to the shard with
/// the fewest computed tokens so far, largest batches first (ties: lower index). The same
/// plan gives the same split on every machine.
pub fn shard_of_batches(batch_tokens: &[usize], n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..batch_tokens.len()).collect();
    order.sort_by_key(|&b| (std::cmp::Reverse(batch_tokens[b]), b));
    let mut load = vec![0usize; n];
    let mut shard = vec![0; batch_tokens.len()];
    for b in order {
        let k = (0..n).min_by_key(|&k| (load[k], k)).expect("n >= 1");
        shard[b] = k;
        load[k] += batch_tokens[b];
    }
    shard
}

pub fn parquet_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("row_id", DataType::UInt64, false),
        Field::new("split", DataType::Utf8, false),
        Field::new("ref_chosen_logps", DataType::Float32, false),
        Field::new("ref_rejected_logps", DataType::Float32, false),
        Field::new("ref_chosen_shared_logps", DataType::Float32, false),
        Field::new("ref_rejected_shared_logps", DataType::Float32, false),
        Field::new("chosen_scored_tokens", DataType::UInt32, false),
        Field::new("rejected_scored_tokens", DataType::UInt32, false),
    ]))
}

pub fn unpaired_parquet_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("row_id", DataType::UInt64, false),
        Field::new("split", DataType::Utf8, false),
        Field::new("label", DataType::Boolean, false),
        Field::new("kl_row_id", DataType::UInt64, false),
        Field::new("ref_logps", DataType::Float32, false),
        Field::new("ref_KL_logps", DataType::Float32, false),
        Field::new("completion_scored_tokens", DataType::UInt32, false),
        Field::new("KL_scored_tokens", DataType::UInt32, false),
    ]))
}

fn write_unpaired_parquet(path: &Path, prepared: &PreparedDataset, logps: [&[f32]; 4]) -> Result<()> {
    let mut out = ParquetOut::create(path, unpaired_parquet_schema())?;
    let n = prepared.len();
    for start in (0..n).step_by(16384) {
        let rows = start..(start + 16384).min(n);
        let (mut id, mut split, mut label, mut kl) = (UInt64Builder::new(), StringBuilder::new(), BooleanBuilder::new(), UInt64Builder::new());
        let (mut lp, mut klp, mut ct, mut kt) = (Float32Builder::new(), Float32Builder::new(), UInt32Builder::new(), UInt32Builder::new());
        for i in rows {
            let p = prepared.pair(i);
            id.append_value(i as u64);
            split.append_value(p.split.as_str());
            label.append_value(p.label.expect("unpaired rows are labelled"));
            kl.append_value(prepared.kl_partner(i) as u64);
            lp.append_value(logps[0][i]);
            klp.append_value(logps[1][i]);
            ct.append_value(p.chosen_scored as u32);
            kt.append_value(p.rejected_scored as u32);
        }
        let arrays: Vec<ArrayRef> = vec![
            Arc::new(id.finish()),
            Arc::new(split.finish()),
            Arc::new(label.finish()),
            Arc::new(kl.finish()),
            Arc::new(lp.finish()),
            Arc::new(klp.finish()),
            Arc::new(ct.finish()),
            Arc::new(kt.finish()),
        ];
        out.write(&RecordBatch::try_new(unpaired_parquet_schema(), arrays)?)?;
    }
    out.finish()
}

/// Writes the polars view of the finished log-prob columns (in [`LOGP_COLUMNS`] order).
pub fn write_parquet(path: &Path, prepared: &PreparedDataset, logps: [&[f32]; 4]) -> Result<()> {
    if prepared.is_unpaired() {
        return write_unpaired_parquet(path, prepared, logps);
    }
    let mut out = ParquetOut::create(path, parquet_schema())?;
    let n = prepared.len();
    for start in (0..n).step_by(16384) {
        let end = (start + 16384).min(n);
        let (mut id, mut split, mut ct, mut rt) = (UInt64Builder::new(), StringBuilder::new(), UInt32Builder::new(), UInt32Builder::new());
        let mut lp: [Float32Builder; 4] = std::array::from_fn(|_| Float32Builder::new());
        for i in start..end {
            let p = prepared.pair(i);
            id.append_value(i as u64);
            split.append_value(p.split.as_str());
            for (b, col) in lp.iter_mut().zip(logps) {
                b.append_value(col[i]);
            }
            ct.append_value(p.chosen_scored as u32);
            rt.append_value(p.rejected_scored as u32);
        }
        let mut arrays: Vec<ArrayRef> = vec![Arc::new(id.finish()), Arc::new(split.finish())];
        arrays.extend(lp.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        arrays.extend([Arc::new(ct.finish()) as ArrayRef, Arc::new(rt.finish())]);
        out.write(&RecordBatch::try_new(parquet_schema(), arrays)?)?;
    }
    out.finish()
}

/// Read side of a finished cache, for the trainer.
pub struct RefCache {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub chosen: Column<f32>,
    pub rejected: Column<f32>,
    /// LD-DPO's shared-part sums (None in a version-2 cache).
    pub chosen_shared: Option<Column<f32>>,
    pub rejected_shared: Option<Column<f32>>,
}

impl RefCache {
    /// Opens a finished cache and checks it was built from `prepared`.
    pub fn open(dir: &Path, prepared: &PreparedDataset) -> Result<Self> {
        let manifest = Manifest::load(dir, STAGE).with_context(|| {
            if dir.join(PROGRESS).exists() {
                format!("{} is an unfinished cache: rerun the same `pipeline cache-ref` command to complete it", dir.display())
            } else {
                format!("{} is not a reference cache", dir.display())
            }
        })?;
        if manifest.format_version != FORMAT_VERSION && manifest.format_version != 2 {
            bail!(
                "{}: cache format version {}, this build reads {FORMAT_VERSION}; rebuild it with cache-ref --force",
                dir.display(),
                manifest.format_version
            );
        }
        let built_from = &manifest.input("prepared").with_context(|| format!("{}", Manifest::path(dir).display()))?.blake3;
        if built_from != prepared.fingerprint() {
            bail!(
                "reference cache {} was built from prepared data with fingerprint {}, but {} has fingerprint {}; rerun cache-ref on it",
                dir.display(),
                short(built_from),
                prepared.dir.display(),
                short(prepared.fingerprint())
            );
        }
        manifest.verify_files(dir)?;
        let fp = Some(manifest.fingerprint.as_str());
        let chosen: Column<f32> = Column::open(&dir.join(CHOSEN_LOGPS), fp)?;
        let rejected: Column<f32> = Column::open(&dir.join(REJECTED_LOGPS), fp)?;
        if chosen.len() != prepared.len() || rejected.len() != prepared.len() {
            bail!("reference cache {} has {} rows, the prepared data {}: missing rows", dir.display(), chosen.len(), prepared.len());
        }
        if let Some(i) = chosen.as_slice().iter().zip(rejected.as_slice()).position(|(c, r)| !c.is_finite() || !r.is_finite()) {
            bail!("reference cache {}: row {i} has no finite value; rebuild with --force", dir.display());
        }
        let (chosen_shared, rejected_shared) = if manifest.format_version >= 3 {
            let c: Column<f32> = Column::open(&dir.join(CHOSEN_SHARED_LOGPS), fp)?;
            let r: Column<f32> = Column::open(&dir.join(REJECTED_SHARED_LOGPS), fp)?;
            if c.len() != prepared.len() || r.len() != prepared.len() {
                bail!("reference cache {}: the shared-part columns have {} rows, the prepared data {}", dir.display(), c.len(), prepared.len());
            }
            (Some(c), Some(r))
        } else {
            (None, None)
        };
        Ok(Self { dir: dir.to_path_buf(), manifest, chosen, rejected, chosen_shared, rejected_shared })
    }

    /// LD-DPO needs the shared-part columns, which caches before format 3 lack.
    pub fn check_ld(&self) -> Result<()> {
        if self.chosen_shared.is_none() {
            bail!(
                "reference cache {} (format {}) has no shared-part log-probs, which --ld-alpha needs; rebuild it with cache-ref --force",
                self.dir.display(),
                self.manifest.format_version
            );
        }
        Ok(())
    }

    /// Unpaired data: the KL block size the cache's KL completions were built with.
    pub fn kl_batch_size(&self) -> Option<usize> {
        self.manifest.settings.get("kl_batch_size").and_then(|v| v.as_u64()).map(|b| b as usize)
    }

    /// The reference model the cache was computed with (an absolute path).
    pub fn model_dir(&self) -> Result<PathBuf> {
        Ok(PathBuf::from(&self.manifest.input("model")?.path))
    }
}
