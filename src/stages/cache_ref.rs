//! Stage 2: the frozen reference model runs once over every pair; its sequence log-probs are
//! stored as memory-mapped columns (one value per row_id) plus a parquet view (the format is
//! owned by `data::ref_cache`).
//!
//! Resumable: columns are filled in place under `.partial` names; after each batch they are
//! flushed and `progress.json` records how many batches of the (deterministic) plan are done.
//! The same command after a crash continues from there; files end identical to an
//! uninterrupted run. Nothing gets its final name until the whole cache is written.
//!
//! Shardable: `--shard K/N` computes only shard K's batches of the same global plan into a
//! shard directory; `merge` joins the N shards into files identical to an unsharded run's.
use super::{begin, progress, Begin, StageDir};
use crate::data::prepared::{PreparedDataset, Split};
use crate::data::ref_cache::{
    self, shard_of_batches, write_parquet, CHOSEN_TOKENS, FORMAT_VERSION, LOGP_COLUMNS, PARQUET, PROGRESS, REJECTED_TOKENS, SHARD_FILES, SHARD_ROWS,
    SHARD_STAGE, STAGE,
};
use crate::data::tokenize::check_same_tokenizer;
use crate::model::{self, weights};
use crate::score::layout::{self as batch, LayoutKind};
use crate::score::pair_logps;
use crate::settings::CacheRefSettings;
use crate::store::{short, write_atomic, Column, ColumnFill, ColumnWriter, InputRef, Manifest};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

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

/// The global batch plan: every pair, length-sorted, in batches of at most `batch_tokens`.
fn plan(prepared: &PreparedDataset, layout: LayoutKind, batch_tokens: usize) -> Vec<Vec<u32>> {
    let items: Vec<(u32, usize)> = (0..prepared.len()).map(|i| (i as u32, batch::row_len(layout, &prepared.pair(i)))).collect();
    batch::plan_batches(layout, items, batch_tokens)
}

/// Computed tokens of each batch of a plan (what shards are balanced by).
fn plan_tokens(prepared: &PreparedDataset, layout: LayoutKind, plan: &[Vec<u32>]) -> Vec<usize> {
    plan.iter().map(|rows| rows.iter().map(|&i| batch::computed_tokens(layout, &prepared.pair(i as usize))).sum()).collect()
}

/// Unpaired data: fixes the KL completions (blocks of `--kl-batch-size`, default 8) and
/// returns the block size; paired data takes no KL blocks.
pub fn kl_blocks(prepared: &mut PreparedDataset, asked: Option<usize>) -> Result<Option<usize>> {
    match (prepared.is_unpaired(), asked) {
        (true, b) => {
            let b = b.unwrap_or(DEFAULT_KL_BATCH_SIZE);
            prepared.set_kl_blocks(b);
            Ok(Some(b))
        }
        (false, Some(_)) => bail!("--kl-batch-size is for unpaired data (KTO); {} holds pairs", prepared.dir.display()),
        (false, None) => Ok(None),
    }
}

/// TRL's `per_device_train_batch_size` default, which its KL blocks follow.
pub const DEFAULT_KL_BATCH_SIZE: usize = 8;

/// Settings of a shard directory: the whole cache's settings and how it was cut.
fn shard_settings(cache: &serde_json::Value, k: usize, n: usize, batch_tokens: usize, layout: LayoutKind) -> serde_json::Value {
    serde_json::json!({"cache": cache, "shard": {"index": k, "count": n}, "batch_tokens": batch_tokens, "layout": layout})
}

pub fn run(cfg: &CacheRefSettings) -> Result<Manifest> {
    cfg.validate()?;
    let model = crate::hub::model_dir(&cfg.model)?;
    let hub: Vec<serde_json::Value> = model.record().into_iter().collect();
    let cfg = &CacheRefSettings { model: model.path, ..cfg.clone() };
    let mut prepared = PreparedDataset::open(&cfg.prepared)?;
    let kl_batch_size = kl_blocks(&mut prepared, cfg.kl_batch_size)?;
    let dtype = cfg.compute_dtype().dtype();
    let model_cfg = crate::model::ModelConfig::load(&cfg.model)?;
    check_same_tokenizer(&prepared.manifest, &prepared.dir, &cfg.model)?;
    // Absolute, so `train` finds the reference model whatever directory it runs from.
    let model_path = std::fs::canonicalize(&cfg.model).unwrap_or_else(|_| cfg.model.clone());
    let inputs = vec![
        InputRef::new("prepared", &cfg.prepared, prepared.fingerprint()),
        InputRef::new("model", &model_path, &weights::weights_hash(&cfg.model)?),
    ];
    // What changes the values; batching and layout do not (equal within float rounding).
    let mut settings = serde_json::json!({
        "dtype": cfg.dtype,
        "truncation": prepared.truncation,
        "config": model_cfg.raw,
    });
    if let Some(b) = kl_batch_size {
        settings["kl_batch_size"] = b.into();
    }
    if !hub.is_empty() {
        settings["hub"] = hub.into();
    }
    let shard = cfg.shard()?;
    let (stage, dir_settings) = match shard {
        None => (STAGE, settings),
        Some((k, n)) => (SHARD_STAGE, shard_settings(&settings, k, n, cfg.batch_tokens, cfg.layout)),
    };
    let out = &cfg.out;
    let sd = match begin(stage, FORMAT_VERSION, out, inputs, dir_settings, cfg.force)? {
        Begin::UpToDate(m) => return Ok(m),
        Begin::Run(sd) => sd,
    };
    let fp = sd.fingerprint.clone();

    let n = prepared.len();
    let plan = plan(&prepared, cfg.layout, cfg.batch_tokens);
    // This run's batches, in plan order: all of them, or this shard's.
    let mine: Vec<usize> = match shard {
        None => (0..plan.len()).collect(),
        Some((k, count)) => {
            let of = shard_of_batches(&plan_tokens(&prepared, cfg.layout, &plan), count);
            (0..plan.len()).filter(|&b| of[b] == k).collect()
        }
    };
    let my_rows: usize = mine.iter().map(|&b| plan[b].len()).sum();
    check_space(out, n, shard.map(|_| my_rows), "cache-ref")?;
    let (mut columns, reused) = open_columns(out, n, &fp)?;
    let mut prog = Progress { fingerprint: fp.clone(), batch_tokens: cfg.batch_tokens, layout: cfg.layout, batches_done: 0, rows_done: 0 };
    let progress_path = out.join(PROGRESS);
    if let Ok(text) = std::fs::read_to_string(&progress_path) {
        match serde_json::from_str::<Progress>(&text) {
            Ok(old) if reused && old.fingerprint == fp && old.batch_tokens == cfg.batch_tokens && old.layout == cfg.layout && !cfg.force => {
                eprintln!("cache-ref: resuming: {} of {} batches done, skipping {} rows already cached", old.batches_done, mine.len(), old.rows_done);
                prog = old;
            }
            _ => eprintln!("cache-ref: found an interrupted run with other inputs or batching; starting over"),
        }
    }

    let device = model::device()?;
    let decoder = model::load_decoder(&cfg.model, dtype, cfg.quant().as_ref(), &device)?;
    let pb = progress(my_rows as u64, "cache-ref", if prepared.is_unpaired() { "rows" } else { "pairs" });
    pb.set_position(prog.rows_done as u64);
    // Tokens the forward really computes, and the padded slots it ran over.
    let (mut tokens, mut padded) = (0usize, 0usize);
    let t_run = Instant::now();
    let (mut batches_run, mut rows_run) = (0, 0usize);
    for (bi, &b) in mine.iter().enumerate().skip(prog.batches_done) {
        if cfg.stop_after_batches > 0 && batches_run == cfg.stop_after_batches {
            pb.abandon();
            eprintln!("cache-ref: stopping after {batches_run} batches as asked; rerun to resume");
            return Ok(Manifest::unfinished(stage, FORMAT_VERSION, &fp));
        }
        let rows = &plan[b];
        let pairs: Vec<_> = rows.iter().map(|&i| prepared.pair(i as usize)).collect();
        let lp = pair_logps(&decoder, cfg.layout, &pairs)?;
        let (cs, rs) = lp.shared_sums(&pairs)?;
        for (col, t) in columns.iter_mut().zip([&lp.chosen, &lp.rejected, &cs, &rs]) {
            let v = t.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
            for (k, &i) in rows.iter().enumerate() {
                col.values_mut()[i as usize] = v[k];
            }
            col.flush()?;
        }
        prog.batches_done = bi + 1;
        prog.rows_done += rows.len();
        write_atomic(&progress_path, serde_json::to_string(&prog)?.as_bytes())?;
        batches_run += 1;
        rows_run += rows.len();
        padded += batch::slots(cfg.layout, &pairs);
        tokens += pairs.iter().map(|p| batch::computed_tokens(cfg.layout, p)).sum::<usize>();
        pb.inc(rows.len() as u64);
        pb.set_message(format!("{:.0} tokens/s", tokens as f64 / t_run.elapsed().as_secs_f64().max(1e-9)));
    }
    pb.finish_and_clear();
    let mut row_ids: Vec<u32> = mine.iter().flat_map(|&b| plan[b].iter().copied()).collect();
    row_ids.sort_unstable();
    if let Some(&i) = row_ids.iter().find(|&&i| columns.iter().any(|c| !c.values()[i as usize].is_finite())) {
        bail!("cache-ref: row {i} got a non-finite log-prob; check the model's weights and dtype");
    }
    let run_s = t_run.elapsed().as_secs_f64();
    let stats = serde_json::json!({
        "tokens_this_run": tokens,
        "tokens_per_s": tokens as f64 / run_s.max(1e-9),
        "pairs_per_s": rows_run as f64 / run_s.max(1e-9),
        "padding_fraction": if padded > 0 { 1.0 - tokens as f64 / padded as f64 } else { 0.0 },
        "layout": cfg.layout,
        "batch_tokens": cfg.batch_tokens,
        "parameters": decoder.cfg.num_parameters(),
    });
    let manifest = match shard {
        Some((k, count)) => {
            let mut w = ColumnWriter::<u64>::create(&out.join(SHARD_ROWS))?;
            w.push(&row_ids.iter().map(|&i| i as u64).collect::<Vec<_>>())?;
            w.finish(&fp)?;
            for c in columns {
                c.finish()?;
            }
            let counts =
                [("pairs".to_string(), n as u64), ("pairs_in_shard".to_string(), my_rows as u64), ("batches".to_string(), mine.len() as u64)];
            let manifest = sd.manifest(counts.into(), stats);
            eprintln!("cache-ref: shard {k}/{count}: {my_rows} of {n} pairs -> {}", out.display());
            sd.finish(manifest, &SHARD_FILES)?
        }
        None => finish_cache(sd, &prepared, columns, stats, plan.len())?,
    };
    let _ = std::fs::remove_file(&progress_path);
    Ok(manifest)
}

/// Refuses before any work when `out`'s filesystem cannot hold the column files of a cache of
/// `n` pairs (or of a shard holding `shard_rows` of them); the parquet view comes on top.
fn check_space(out: &Path, n: usize, shard_rows: Option<usize>, what: &str) -> Result<()> {
    let col = |bytes_per_value: usize, count: usize| (crate::store::column::HEADER_BYTES + bytes_per_value * count) as u64;
    let mut files: Vec<(PathBuf, u64)> = LOGP_COLUMNS.iter().map(|c| (out.join(c), col(4, n))).collect();
    match shard_rows {
        Some(rows) => files.push((out.join(SHARD_ROWS), col(8, rows))),
        None => files.extend([CHOSEN_TOKENS, REJECTED_TOKENS].map(|c| (out.join(c), col(4, n)))),
    }
    crate::store::ensure_free(&files, what)
}

/// The log-prob columns being filled (NaN until computed), in [`LOGP_COLUMNS`] order, and
/// whether all of them were reused from an interrupted run.
fn open_columns(out: &Path, n: usize, fp: &str) -> Result<([ColumnFill<f32>; 4], bool)> {
    let mut reused = true;
    let mut cols = Vec::new();
    for name in LOGP_COLUMNS {
        let (c, r) = ColumnFill::<f32>::open_or_create(&out.join(name), n, fp, f32::NAN)?;
        reused &= r;
        cols.push(c);
    }
    Ok((cols.try_into().map_err(|_| anyhow::anyhow!("four columns"))?, reused))
}

/// Writes what a whole cache has beyond its filled log-prob columns (the parquet view and
/// the token counts), commits everything and writes the manifest.
fn finish_cache(
    sd: StageDir,
    prepared: &PreparedDataset,
    columns: [ColumnFill<f32>; 4],
    stats: serde_json::Value,
    batches: usize,
) -> Result<Manifest> {
    let (out, fp, n) = (sd.dir.clone(), sd.fingerprint.clone(), prepared.len());
    write_parquet(&out.join(PARQUET), prepared, [columns[0].values(), columns[1].values(), columns[2].values(), columns[3].values()])?;
    let mut ct = ColumnWriter::<u32>::create(&out.join(CHOSEN_TOKENS))?;
    let mut rt = ColumnWriter::<u32>::create(&out.join(REJECTED_TOKENS))?;
    for i in 0..n {
        let p = prepared.pair(i);
        ct.push(&[p.chosen_scored as u32])?;
        rt.push(&[p.rejected_scored as u32])?;
    }
    ct.finish(&fp)?;
    rt.finish(&fp)?;
    for c in columns {
        c.finish()?;
    }
    let train = prepared.rows_of(Split::Train).len() as u64;
    let counts: BTreeMap<String, u64> = [
        ("pairs".to_string(), n as u64),
        ("pairs_train".to_string(), train),
        ("pairs_eval".to_string(), n as u64 - train),
        ("batches".to_string(), batches as u64),
    ]
    .into();
    let manifest = sd.manifest(counts, stats);
    let wall = manifest.timings["wall_s"];
    let manifest = sd.finish(manifest, &ref_cache::FILES)?;
    eprintln!(
        "cache-ref: {n} {} in {wall:.2}s -> {}",
        if prepared.is_unpaired() { "unpaired rows (and their KL completions)" } else { "pairs" },
        out.display()
    );
    Ok(manifest)
}

/// One shard directory, read for merging.
struct ShardIn {
    dir: PathBuf,
    manifest: Manifest,
    index: usize,
    count: usize,
}

/// `pipeline merge-ref`: joins the N shards of one cache (`cache-ref --shard K/N`) into `out`,
/// whose files are identical to an unsharded run's. Refuses shards that are unfinished, from
/// other inputs or settings, overlapping, or that leave rows uncovered, naming them.
pub fn merge(shard_dirs: &[PathBuf], out: &Path, prepared_dir: Option<&Path>, force: bool) -> Result<Manifest> {
    if shard_dirs.is_empty() {
        bail!("merge-ref: no shard directories given");
    }
    let mut shards = Vec::new();
    for dir in shard_dirs {
        let manifest = Manifest::load(dir, SHARD_STAGE).with_context(|| {
            if dir.join(PROGRESS).exists() {
                format!("shard {} is unfinished: rerun its `pipeline cache-ref --shard` command", dir.display())
            } else {
                format!("{} is not a finished cache-ref shard", dir.display())
            }
        })?;
        manifest.verify_files(dir)?;
        let s = &manifest.settings["shard"];
        let (Some(index), Some(count)) = (s["index"].as_u64(), s["count"].as_u64()) else {
            bail!("{}: manifest has no shard index and count", Manifest::path(dir).display());
        };
        shards.push(ShardIn { dir: dir.clone(), manifest, index: index as usize, count: count as usize });
    }
    // Every shard must come from the same inputs and settings: compare with the first.
    let first = &shards[0];
    let hashes = |m: &Manifest| m.inputs.iter().map(|i| (i.role.clone(), i.blake3.clone())).collect::<Vec<_>>();
    let same = |m: &Manifest| {
        let (a, b) = (&m.settings, &first.manifest.settings);
        hashes(m) == hashes(&first.manifest)
            && a["cache"] == b["cache"]
            && a["batch_tokens"] == b["batch_tokens"]
            && a["layout"] == b["layout"]
            && a["shard"]["count"] == b["shard"]["count"]
    };
    for s in &shards[1..] {
        if !same(&s.manifest) {
            bail!(
                "shard {} was computed from other prepared data, model, dtype, truncation or batching than shard {} \
                 (compare the `inputs` and `settings` of their manifest.json)",
                s.dir.display(),
                first.dir.display()
            );
        }
    }
    let count = first.count;
    let mut by_index: BTreeMap<usize, &ShardIn> = BTreeMap::new();
    for s in &shards {
        if let Some(other) = by_index.insert(s.index, s) {
            bail!("shards {} and {} are both shard {} of {count}", other.dir.display(), s.dir.display(), s.index);
        }
    }
    let missing: Vec<String> = (0..count).filter(|k| !by_index.contains_key(k)).map(|k| k.to_string()).collect();
    if !missing.is_empty() {
        bail!(
            "merge-ref: shards {} of {count} are missing (given: {})",
            missing.join(", "),
            by_index.keys().map(|k| k.to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    let prepared_ref = first.manifest.input("prepared")?;
    let prepared_path = prepared_dir.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(&prepared_ref.path));
    let mut prepared = PreparedDataset::open(&prepared_path)?;
    let kl = first.manifest.settings["cache"].get("kl_batch_size").and_then(|v| v.as_u64()).map(|b| b as usize);
    kl_blocks(&mut prepared, kl)?;
    if prepared.fingerprint() != prepared_ref.blake3 {
        bail!(
            "{} has fingerprint {}, but the shards were computed from prepared data with fingerprint {}",
            prepared_path.display(),
            short(prepared.fingerprint()),
            short(&prepared_ref.blake3)
        );
    }
    let n = prepared.len();
    // Each shard must hold exactly the rows the plan gives it; together, every row once.
    let layout: LayoutKind = serde_json::from_value(first.manifest.settings["layout"].clone())?;
    let batch_tokens = first.manifest.settings["batch_tokens"].as_u64().context("shard manifest has no batch_tokens")? as usize;
    let plan = plan(&prepared, layout, batch_tokens);
    let of = shard_of_batches(&plan_tokens(&prepared, layout, &plan), count);
    let settings = first.manifest.settings["cache"].clone();
    let sd = match begin(STAGE, FORMAT_VERSION, out, first.manifest.inputs.clone(), settings, force)? {
        Begin::UpToDate(m) => return Ok(m),
        Begin::Run(sd) => sd,
    };
    let fp = sd.fingerprint.clone();
    check_space(out, n, None, "merge-ref")?;
    let (mut columns, _) = open_columns(out, n, &fp)?;
    let mut owner: Vec<Option<usize>> = vec![None; n];
    for (&k, s) in &by_index {
        let sfp = Some(s.manifest.fingerprint.as_str());
        let rows: Column<u64> = Column::open(&s.dir.join(SHARD_ROWS), sfp)?;
        let mut want: Vec<u64> = (0..plan.len()).filter(|&b| of[b] == k).flat_map(|b| plan[b].iter().map(|&i| i as u64)).collect();
        want.sort_unstable();
        if rows.as_slice() != want.as_slice() {
            bail!(
                "shard {} ({k} of {count}) holds {} rows, but the plan gives it {}: it was cut differently",
                s.dir.display(),
                rows.len(),
                want.len()
            );
        }
        let mut inputs = Vec::new();
        for name in LOGP_COLUMNS {
            let c: Column<f32> = Column::open(&s.dir.join(name), sfp)?;
            if c.len() != n {
                bail!("shard {}: {name} has {} rows, the prepared data {n}", s.dir.display(), c.len());
            }
            inputs.push(c);
        }
        for &i in rows.as_slice() {
            let i = i as usize;
            if let Some(other) = owner[i] {
                bail!("row {i} is in shard {other} and shard {k}");
            }
            owner[i] = Some(k);
            for (col, c) in columns.iter_mut().zip(&inputs) {
                let v = c.as_slice()[i];
                if !v.is_finite() {
                    bail!("shard {}: row {i} has no finite value; recompute that shard", s.dir.display());
                }
                col.values_mut()[i] = v;
            }
        }
    }
    let uncovered: Vec<usize> = (0..n).filter(|&i| owner[i].is_none()).collect();
    if !uncovered.is_empty() {
        bail!("merge-ref: {} rows are in no shard (first: {:?})", uncovered.len(), &uncovered[..uncovered.len().min(5)]);
    }
    let stats = serde_json::json!({
        "merged_from": by_index.values().map(|s| s.dir.display().to_string()).collect::<Vec<_>>(),
        "layout": layout,
        "batch_tokens": batch_tokens,
    });
    finish_cache(sd, &prepared, columns, stats, plan.len())
}
