//! Stage 2: the frozen reference model runs once over every pair; its sequence log-probs are
//! stored as memory-mapped columns (one value per row_id) plus a parquet view (the format is
//! owned by `data::ref_cache`).
//!
//! Resumable: columns are filled in place under `.partial` names; after each batch they are
//! flushed and `progress.json` records how many batches of the (deterministic) plan are done.
//! The same command after a crash continues from there; files end identical to an
//! uninterrupted run. Nothing gets its final name until the whole cache is written.
use super::{begin, progress, Begin};
use crate::data::prepared::{PreparedDataset, Split};
use crate::data::ref_cache::{
    self, write_parquet, CHOSEN_LOGPS, CHOSEN_TOKENS, FORMAT_VERSION, PARQUET, PROGRESS, REJECTED_LOGPS, REJECTED_TOKENS, STAGE,
};
use crate::data::tokenize::check_same_tokenizer;
use crate::model::{self, weights};
use crate::score::layout::{self as batch, LayoutKind};
use crate::score::pair_logps;
use crate::settings::CacheRefSettings;
use crate::store::{write_atomic, ColumnFill, ColumnWriter, InputRef, Manifest};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
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

pub fn run(cfg: &CacheRefSettings) -> Result<Manifest> {
    cfg.validate()?;
    let prepared = PreparedDataset::open(&cfg.prepared)?;
    let dtype = weights::parse_dtype(&cfg.dtype)?;
    let model_cfg = crate::model::ModelConfig::load(&cfg.model)?;
    check_same_tokenizer(&prepared.manifest, &prepared.dir, &cfg.model)?;
    // Absolute, so `train` finds the reference model whatever directory it runs from.
    let model_path = std::fs::canonicalize(&cfg.model).unwrap_or_else(|_| cfg.model.clone());
    let inputs = vec![
        InputRef::new("prepared", &cfg.prepared, prepared.fingerprint()),
        InputRef::new("model", &model_path, &weights::weights_hash(&cfg.model)?),
    ];
    // What changes the values; batching and layout do not (equal within float rounding).
    let settings = serde_json::json!({
        "dtype": cfg.dtype,
        "truncation": prepared.truncation,
        "config": model_cfg.raw,
    });
    let out = &cfg.out;
    let sd = match begin(STAGE, FORMAT_VERSION, out, inputs, settings, cfg.force)? {
        Begin::UpToDate(m) => return Ok(m),
        Begin::Run(sd) => sd,
    };
    let fp = sd.fingerprint.clone();

    let n = prepared.len();
    let items: Vec<(u32, usize)> = (0..n).map(|i| (i as u32, batch::row_len(cfg.layout, &prepared.pair(i)))).collect();
    let plan = batch::plan_batches(cfg.layout, items, cfg.batch_tokens);
    let (mut chosen, c_reused) = ColumnFill::<f32>::open_or_create(&out.join(CHOSEN_LOGPS), n, &fp, f32::NAN)?;
    let (mut rejected, r_reused) = ColumnFill::<f32>::open_or_create(&out.join(REJECTED_LOGPS), n, &fp, f32::NAN)?;
    let mut prog = Progress { fingerprint: fp.clone(), batch_tokens: cfg.batch_tokens, layout: cfg.layout, batches_done: 0, rows_done: 0 };
    let progress_path = out.join(PROGRESS);
    if let Ok(text) = std::fs::read_to_string(&progress_path) {
        match serde_json::from_str::<Progress>(&text) {
            Ok(old)
                if c_reused
                    && r_reused
                    && old.fingerprint == fp
                    && old.batch_tokens == cfg.batch_tokens
                    && old.layout == cfg.layout
                    && !cfg.force =>
            {
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
            return Ok(Manifest::unfinished(STAGE, FORMAT_VERSION, &fp));
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
    let run_s = t_run.elapsed().as_secs_f64();
    let train = prepared.rows_of(Split::Train).len() as u64;
    let counts = [
        ("pairs".to_string(), n as u64),
        ("pairs_train".to_string(), train),
        ("pairs_eval".to_string(), n as u64 - train),
        ("batches".to_string(), plan.len() as u64),
    ]
    .into();
    let stats = serde_json::json!({
        "tokens_this_run": tokens,
        "tokens_per_s": tokens as f64 / run_s.max(1e-9),
        "pairs_per_s": rows_run as f64 / run_s.max(1e-9),
        "padding_fraction": if padded > 0 { 1.0 - tokens as f64 / padded as f64 } else { 0.0 },
        "layout": cfg.layout,
        "batch_tokens": cfg.batch_tokens,
        "parameters": decoder.cfg.num_parameters(),
    });
    let manifest = sd.manifest(counts, stats);
    let wall = manifest.timings["wall_s"];
    let manifest = sd.finish(manifest, &ref_cache::FILES)?;
    let _ = std::fs::remove_file(&progress_path);
    eprintln!(
        "cache-ref: {n} pairs in {wall:.2}s ({:.0} tokens/s, padding {:.1}%) -> {}",
        tokens as f64 / run_s.max(1e-9),
        100.0 * manifest.stats["padding_fraction"].as_f64().unwrap_or(0.0),
        out.display()
    );
    Ok(manifest)
}
