//! Stage 2: the frozen reference model runs once over every pair; its sequence log-probs are
//! stored as memory-mapped columns (one value per row_id) plus a parquet view.
//!
//! Resumable: columns are filled in place under `.partial` names; after each batch they are
//! flushed and `progress.json` records how many batches of the (deterministic) plan are done.
//! The same command after a crash continues from there; files end identical to an
//! uninterrupted run. Nothing gets its final name until the whole cache is written.
use super::{progress, secs};
use crate::config::CacheRefConfig;
use crate::data::batch::{self, LayoutKind};
use crate::data::prepared::{PreparedDataset, Split};
use crate::model::{self, logprobs::pair_logps, weights};
use crate::store::manifest::fingerprint;
use crate::store::{write_atomic, Column, ColumnFill, ColumnWriter, Manifest};
use anyhow::{bail, Context, Result};
use arrow_array::builder::{Float32Builder, StringBuilder, UInt32Builder, UInt64Builder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

pub const STAGE: &str = "cache-ref";
pub const FORMAT_VERSION: u32 = 1;
pub const CHOSEN_LOGPS: &str = "chosen_logps.f32";
pub const REJECTED_LOGPS: &str = "rejected_logps.f32";
pub const CHOSEN_TOKENS: &str = "chosen_tokens.u32";
pub const REJECTED_TOKENS: &str = "rejected_tokens.u32";
pub const PARQUET: &str = "ref_logps.parquet";
const PROGRESS: &str = "progress.json";

pub fn parquet_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("row_id", DataType::UInt64, false),
        Field::new("split", DataType::Utf8, false),
        Field::new("ref_chosen_logps", DataType::Float32, false),
        Field::new("ref_rejected_logps", DataType::Float32, false),
        Field::new("chosen_scored_tokens", DataType::UInt32, false),
        Field::new("rejected_scored_tokens", DataType::UInt32, false),
    ]))
}

/// Where an interrupted run stopped. The plan is valid only for the same fingerprint and
/// batching settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Progress {
    fingerprint: String,
    batch_tokens: usize,
    layout: LayoutKind,
    batches_done: usize,
    rows_done: usize,
}

/// Read side of a finished cache, for the trainer.
pub struct RefCache {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub chosen: Column<f32>,
    pub rejected: Column<f32>,
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
        let built_from = manifest.inputs["prepared_fingerprint"].as_str().unwrap_or("");
        if built_from != prepared.fingerprint() {
            bail!(
                "reference cache {} was built from prepared data with fingerprint {}, but {} has fingerprint {}; rerun cache-ref on it",
                dir.display(), built_from, prepared.dir.display(), prepared.fingerprint()
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
        Ok(Self { dir: dir.to_path_buf(), manifest, chosen, rejected })
    }
}

fn write_parquet(path: &Path, prepared: &PreparedDataset, chosen: &[f32], rejected: &[f32]) -> Result<()> {
    let mut out = crate::data::prepared::ParquetOut::create(path, parquet_schema())?;
    let n = prepared.len();
    for start in (0..n).step_by(16384) {
        let end = (start + 16384).min(n);
        let (mut id, mut split, mut c, mut r, mut ct, mut rt) =
            (UInt64Builder::new(), StringBuilder::new(), Float32Builder::new(), Float32Builder::new(), UInt32Builder::new(), UInt32Builder::new());
        for i in start..end {
            let p = prepared.pair(i);
            id.append_value(i as u64);
            split.append_value(p.split.as_str());
            c.append_value(chosen[i]);
            r.append_value(rejected[i]);
            ct.append_value(p.chosen_scored as u32);
            rt.append_value(p.rejected_scored as u32);
        }
        let arrays: Vec<ArrayRef> = vec![
            Arc::new(id.finish()), Arc::new(split.finish()), Arc::new(c.finish()), Arc::new(r.finish()), Arc::new(ct.finish()), Arc::new(rt.finish()),
        ];
        out.write(&RecordBatch::try_new(parquet_schema(), arrays)?)?;
    }
    out.finish()
}

pub fn run(cfg: &CacheRefConfig) -> Result<Manifest> {
    let t0 = Instant::now();
    let prepared = PreparedDataset::open(&cfg.prepared)?;
    let dtype = weights::parse_dtype(&cfg.dtype)?;
    let model_cfg = crate::model::ModelConfig::load(&cfg.model)?;
    let weights_hash = weights::weights_hash(&cfg.model)?;
    let inputs = serde_json::json!({
        "prepared": cfg.prepared.display().to_string(),
        "prepared_fingerprint": prepared.fingerprint(),
        // Absolute, so `train` finds the reference model whatever directory it runs from.
        "model": std::fs::canonicalize(&cfg.model).unwrap_or_else(|_| cfg.model.clone()).display().to_string(),
        "weights_blake3": weights_hash,
    });
    let settings = serde_json::json!({
        "dtype": cfg.dtype,
        "truncation": prepared.truncation,
        "config": model_cfg.raw,
    });
    let fp_inputs = serde_json::json!({"prepared": prepared.fingerprint(), "weights": weights_hash});
    let fp = fingerprint(STAGE, FORMAT_VERSION, &fp_inputs, &settings);
    let out = &cfg.out;
    if let Some(old) = Manifest::load_if_exists(out, STAGE)? {
        if old.fingerprint == fp && !cfg.force {
            old.verify_files(out)?;
            eprintln!("cache-ref: {} is up to date (fingerprint {}), nothing to do", out.display(), &fp[..16]);
            return Ok(old);
        }
        if old.fingerprint != fp && !cfg.force {
            bail!(
                "{} holds a reference cache with fingerprint {}, but these inputs and settings give {}; \
                 pass --force to replace it, or choose another --out",
                out.display(), old.fingerprint, fp
            );
        }
        std::fs::remove_file(Manifest::path(out))?;
    }
    std::fs::create_dir_all(out)?;

    let n = prepared.len();
    let items: Vec<(u32, usize)> = (0..n).map(|i| (i as u32, batch::row_len(cfg.layout, &prepared.pair(i)))).collect();
    let plan = batch::plan_batches(cfg.layout, items, cfg.batch_tokens);
    let (mut chosen, c_reused) = ColumnFill::<f32>::open_or_create(&out.join(CHOSEN_LOGPS), n, &fp, f32::NAN)?;
    let (mut rejected, r_reused) = ColumnFill::<f32>::open_or_create(&out.join(REJECTED_LOGPS), n, &fp, f32::NAN)?;
    let mut prog = Progress { fingerprint: fp.clone(), batch_tokens: cfg.batch_tokens, layout: cfg.layout, batches_done: 0, rows_done: 0 };
    let progress_path = out.join(PROGRESS);
    if let Ok(text) = std::fs::read_to_string(&progress_path) {
        match serde_json::from_str::<Progress>(&text) {
            Ok(old) if c_reused && r_reused && old.fingerprint == fp && old.batch_tokens == cfg.batch_tokens && old.layout == cfg.layout && !cfg.force => {
                eprintln!("cache-ref: resuming: {} of {} batches done, skipping {} rows already cached", old.batches_done, plan.len(), old.rows_done);
                prog = old;
            }
            _ => eprintln!("cache-ref: found an interrupted run with other inputs or batching; starting over"),
        }
    }

    let device = model::device()?;
    let decoder = model::load_decoder(&cfg.model, dtype, &device)?;
    let pb = progress(n as u64, "cache-ref", "pairs");
    pb.set_position(prog.rows_done as u64);
    // Tokens the forward really computes, and the padded slots it ran over.
    let (mut tokens, mut padded) = (0usize, 0usize);
    let t_run = Instant::now();
    let (mut batches_run, mut rows_run) = (0, 0usize);
    for (bi, rows) in plan.iter().enumerate().skip(prog.batches_done) {
        if cfg.stop_after_batches > 0 && batches_run == cfg.stop_after_batches {
            pb.abandon();
            eprintln!("cache-ref: stopping after {batches_run} batches as asked; rerun to resume");
            return Ok(Manifest::load_if_exists(out, STAGE)?.unwrap_or_else(|| Manifest::unfinished(STAGE, FORMAT_VERSION, &fp)));
        }
        let pairs: Vec<_> = rows.iter().map(|&i| prepared.pair(i as usize)).collect();
        let lp = pair_logps(&decoder, cfg.layout, &pairs)?;
        let (c, r) = (lp.chosen.to_vec1::<f32>()?, lp.rejected.to_vec1::<f32>()?);
        for (k, &i) in rows.iter().enumerate() {
            chosen.values_mut()[i as usize] = c[k];
            rejected.values_mut()[i as usize] = r[k];
        }
        chosen.flush()?;
        rejected.flush()?;
        prog.batches_done = bi + 1;
        prog.rows_done += rows.len();
        write_atomic(&progress_path, serde_json::to_string(&prog)?.as_bytes())?;
        batches_run += 1;
        rows_run += rows.len();
        let longest = pairs.iter().map(|p| batch::row_len(cfg.layout, p)).max().unwrap_or(0);
        let rows_in = pairs.len() * batch::rows_per_pair(cfg.layout);
        padded += rows_in * longest;
        tokens += pairs.iter().map(|p| batch::computed_tokens(cfg.layout, p)).sum::<usize>();
        pb.inc(rows.len() as u64);
        pb.set_message(format!("{:.0} tokens/s", tokens as f64 / t_run.elapsed().as_secs_f64().max(1e-9)));
    }
    pb.finish_and_clear();
    if let Some(i) = chosen.values().iter().zip(rejected.values()).position(|(c, r)| !c.is_finite() || !r.is_finite()) {
        bail!("cache-ref: row {i} got a non-finite log-prob; check the model's weights and dtype");
    }
    write_parquet(&out.join(PARQUET), &prepared, chosen.values(), rejected.values())?;
    let mut ct = ColumnWriter::<u32>::create(&out.join(CHOSEN_TOKENS))?;
    let mut rt = ColumnWriter::<u32>::create(&out.join(REJECTED_TOKENS))?;
    for i in 0..n {
        let p = prepared.pair(i);
        ct.push(&[p.chosen_scored as u32])?;
        rt.push(&[p.rejected_scored as u32])?;
    }
    ct.finish(&fp)?;
    rt.finish(&fp)?;
    chosen.finish()?;
    rejected.finish()?;
    let wall = secs(t0);
    let run_s = t_run.elapsed().as_secs_f64();
    let train = prepared.rows_of(Split::Train).len() as u64;
    let mut manifest = Manifest {
        stage: STAGE.into(),
        format_version: FORMAT_VERSION,
        fingerprint: fp,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        inputs,
        settings,
        counts: [("pairs".to_string(), n as u64), ("pairs_train".to_string(), train), ("pairs_eval".to_string(), n as u64 - train),
            ("batches".to_string(), plan.len() as u64)].into(),
        stats: serde_json::json!({
            "tokens_this_run": tokens,
            "tokens_per_s": tokens as f64 / run_s.max(1e-9),
            "pairs_per_s": rows_run as f64 / run_s.max(1e-9),
            "padding_fraction": if padded > 0 { 1.0 - tokens as f64 / padded as f64 } else { 0.0 },
            "layout": cfg.layout,
            "batch_tokens": cfg.batch_tokens,
            "parameters": decoder.cfg.num_parameters(),
        }),
        timings: [("wall_s".to_string(), wall)].into(),
        files: Default::default(),
    };
    manifest.record_files(out, &[CHOSEN_LOGPS, REJECTED_LOGPS, CHOSEN_TOKENS, REJECTED_TOKENS, PARQUET])?;
    manifest.save(out)?;
    let _ = std::fs::remove_file(&progress_path);
    eprintln!(
        "cache-ref: {n} pairs in {wall:.2}s ({:.0} tokens/s, padding {:.1}%) -> {}",
        tokens as f64 / run_s.max(1e-9), 100.0 * manifest.stats["padding_fraction"].as_f64().unwrap_or(0.0), out.display()
    );
    Ok(manifest)
}

