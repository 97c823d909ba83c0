//! Stage 1: preference data (parquet, JSON Lines, JSON, `datasets` directories) -> token ids +
//! manifest (see data::prepared for the format).
use super::{begin, progress, Begin};
use crate::data::input::{expand_inputs, input_hash, Field, InputRow, PreferenceReader, Skip, SourceRow};
use crate::data::prepared::{PairRecord, PreparedWriter, SkippedRecord, Split, FORMAT_VERSION, STAGE};
use crate::data::tokenize::{unpair, EncodedPair, Encoder, ModelTokenizer, Truncation};
use crate::settings::PrepareSettings;
use crate::store::{InputRef, Manifest};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

const BATCH_ROWS: usize = 2048;
/// Pairs per block of TRL's `unpair_preference_dataset` (its `map` batch size): a block gives
/// its chosen completions, then its rejected ones.
const UNPAIR_BLOCK: usize = 1000;

/// The row's content, hashed for the train/eval split: adding rows never moves the others.
/// (A pair unpaired by --unpair is split as the pair, so its halves stay together.)
fn content_hash(row: &InputRow) -> u64 {
    let mut h = blake3::Hasher::new();
    let (fields, tools, kwargs) = match row {
        InputRow::Paired(r) => ([r.prompt.as_ref(), Some(&r.chosen), Some(&r.rejected)], &r.tools, &r.template_kwargs),
        InputRow::Unpaired(r) => ([Some(&r.prompt), Some(&r.completion), None], &r.tools, &r.template_kwargs),
    };
    if let InputRow::Unpaired(r) = row {
        h.update(if r.label { b"+" } else { b"-" });
    }
    for f in fields {
        match f {
            None => h.update(b"N"),
            Some(Field::Text(s)) => h.update(b"T").update(&(s.len() as u64).to_le_bytes()).update(s.as_bytes()),
            Some(Field::Messages(ms)) => {
                h.update(b"M");
                for m in ms {
                    let (role, content) = (m.role(), m.content().unwrap_or(""));
                    h.update(&(role.len() as u64).to_le_bytes()).update(role.as_bytes());
                    h.update(&(content.len() as u64).to_le_bytes()).update(content.as_bytes());
                    // Keys beyond {role, content: string} (tool calls, reasoning, ...) count too.
                    if m.0.len() > 2 || m.content().is_none() {
                        h.update(crate::store::manifest::canonical_json(&serde_json::Value::Object(m.0.clone())).as_bytes());
                    }
                }
                &mut h
            }
        };
    }
    for extra in [tools.clone(), kwargs.clone().map(serde_json::Value::Object)].into_iter().flatten() {
        h.update(crate::store::manifest::canonical_json(&extra).as_bytes());
    }
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().unwrap())
}

fn is_eval(row: &InputRow, fraction: f64) -> bool {
    fraction > 0.0 && (content_hash(row) as f64 / u64::MAX as f64) < fraction
}

/// One tokenized batch on its way to the writer: the source file and each row's outcome.
type Batch = (Arc<str>, Vec<RowOutcome>);

/// An input row by its index in its file: a kept pair (or labelled completion) with its
/// split, or skipped.
type RowOutcome = (u64, Result<(EncodedPair, Split, Option<bool>), Skip>);

/// A read row with its split, before tokenization.
type SplitRow = (u64, Result<(InputRow, Split), Skip>);

/// TRL's `unpair_preference_dataset` on one block of pairs: every chosen half in order, then
/// every rejected half (a row that cannot be unpaired is skipped once, in the first half).
fn unpair_block(rows: Vec<SplitRow>) -> Vec<SplitRow> {
    let (mut chosen, mut rejected) = (Vec::with_capacity(rows.len()), Vec::with_capacity(rows.len()));
    for (src, r) in rows {
        match r.and_then(|(row, split)| match row {
            InputRow::Paired(p) => unpair(p).map(|halves| (halves, split)),
            InputRow::Unpaired(_) => unreachable!("only paired readers are unpaired"),
        }) {
            Ok(([c, r], split)) => {
                chosen.push((src, Ok((InputRow::Unpaired(c), split))));
                rejected.push((src, Ok((InputRow::Unpaired(r), split))));
            }
            Err(skip) => chosen.push((src, Err(skip))),
        }
    }
    chosen.extend(rejected);
    chosen
}

/// Counts and length statistics for the manifest, kept by the writer thread.
#[derive(Default)]
struct Tally {
    rows: u64,
    counts: BTreeMap<String, u64>,
    skipped_by_reason: BTreeMap<String, u64>,
    plen: LenStats,
    clen: LenStats,
    rlen: LenStats,
    truncated_chosen: u64,
    truncated_rejected: u64,
    tokens: u64,
}

impl Tally {
    /// Counts one batch and splits it into what the writer takes: kept pairs and skipped rows.
    fn record<'a>(&mut self, file: &'a str, results: &'a [RowOutcome]) -> (Vec<PairRecord<'a>>, Vec<SkippedRecord<'a>>) {
        let (mut kept, mut skipped) = (Vec::new(), Vec::new());
        self.rows += results.len() as u64;
        for (src, r) in results {
            match r {
                Ok((pair, split, label)) => {
                    self.plen.add(pair.prompt_ids.len());
                    self.clen.add(pair.chosen_ids.len());
                    self.rlen.add(pair.rejected_ids.len());
                    self.truncated_chosen += u64::from((pair.chosen_scored as usize) < pair.chosen_ids.len());
                    self.truncated_rejected += u64::from((pair.rejected_scored as usize) < pair.rejected_ids.len());
                    self.tokens += (pair.prompt_ids.len() + pair.chosen_ids.len() + pair.rejected_ids.len()) as u64;
                    *self.counts.entry(format!("{}_{}", if label.is_some() { "rows" } else { "pairs" }, split.as_str())).or_default() += 1;
                    if let Some(l) = label {
                        *self.counts.entry(format!("{}_{}", if *l { "desirable" } else { "undesirable" }, split.as_str())).or_default() += 1;
                    }
                    kept.push(PairRecord { split: *split, source_file: file, source_row: *src, pair, label: *label });
                }
                Err(skip) => {
                    *self.skipped_by_reason.entry(skip.reason.to_string()).or_default() += 1;
                    skipped.push(SkippedRecord { source_file: file, source_row: *src, reason: skip.reason, detail: &skip.detail });
                }
            }
        }
        (kept, skipped)
    }
}

#[derive(Default)]
struct LenStats {
    n: u64,
    sum: u64,
    max: u64,
}

impl LenStats {
    fn add(&mut self, v: usize) {
        self.n += 1;
        self.sum += v as u64;
        self.max = self.max.max(v as u64);
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({"mean": if self.n > 0 { self.sum as f64 / self.n as f64 } else { 0.0 }, "max": self.max, "total": self.sum})
    }
}

/// One kind of output: inputs all paired or all unpaired, unless --unpair turns pairs into
/// unpaired rows; the settings TRL's KTOTrainer lacks refused for unpaired data.
fn check_kind(cfg: &PrepareSettings, unpaired: bool, readers: &[(PreferenceReader, Option<Split>)]) -> Result<()> {
    if unpaired && !cfg.unpair {
        if let Some((r, _)) = readers.iter().find(|(r, _)| !r.unpaired) {
            bail!(
                "{}: paired rows (`{}`/`{}`) beside unpaired inputs; pass --unpair to turn pairs into labelled completions, or prepare them apart",
                r.path().display(),
                cfg.chosen_column,
                cfg.rejected_column
            );
        }
    }
    if unpaired && cfg.max_prompt_length.is_some() {
        bail!("--max-prompt-length: unpaired rows are cut as TRL's KTOTrainer cuts them, prompt and completion together at --max-length keeping the start; unset it");
    }
    Ok(())
}

pub fn run(cfg: &PrepareSettings) -> Result<Manifest> {
    cfg.validate()?;
    let (inputs, mut hub) = crate::hub::dataset_inputs(&cfg.inputs, &cfg.split, cfg.subset.as_deref())?;
    let (eval_inputs, eval_hub) = crate::hub::dataset_inputs(&cfg.eval_inputs, &cfg.eval_split, cfg.subset.as_deref())?;
    hub.extend(eval_hub);
    let (inputs, eval_inputs) = (expand_inputs(&inputs)?, expand_inputs(&eval_inputs)?);
    let model = crate::hub::model_dir(&cfg.model)?;
    hub.extend(model.record());
    let date = cfg.template_date()?;
    let tok = ModelTokenizer::load(&model.path, date)?;
    let truncation = Truncation { max_length: cfg.max_length, max_prompt_length: cfg.max_prompt_length };
    let mut input_refs = Vec::new();
    for (role, files) in [("input", &inputs), ("eval_input", &eval_inputs)] {
        for f in files {
            input_refs.push(InputRef::new(role, f, &input_hash(f)?));
        }
    }
    input_refs.extend(tok.identity.iter().cloned());
    let mut readers = Vec::new();
    for (files, split) in [(&inputs, None), (&eval_inputs, Some(Split::Eval))] {
        for f in files.iter() {
            let r = PreferenceReader::open(f, &cfg.columns(), BATCH_ROWS)?;
            readers.push((r, split));
        }
    }
    let unpaired = cfg.unpair || readers.iter().any(|(r, _)| r.unpaired);
    check_kind(cfg, unpaired, &readers)?;
    let mut settings = serde_json::json!({
        "kind": if unpaired { "unpaired" } else { "paired" },
        "columns": cfg.columns(),
        "truncation": truncation,
        "eval_fraction": cfg.eval_fraction,
        "tokenizer_construction": tok.construction,
    });
    if cfg.unpair {
        settings["unpair"] = true.into();
    }
    // The date changes the ids only when the template prints it.
    if tok.template_uses_date {
        settings["template_date"] = date.to_string().into();
    }
    // Hub ids with their resolved commits (local paths record nothing more than their content).
    if !hub.is_empty() {
        settings["hub"] = hub.into();
    }
    let sd = match begin(STAGE, FORMAT_VERSION, &cfg.out, input_refs, settings, cfg.force)? {
        Begin::UpToDate(m) => return Ok(m),
        Begin::Run(sd) => sd,
    };
    let t0 = Instant::now();

    let encoder = Encoder { tok: &tok, truncation };
    let known: Option<u64> = readers.iter().map(|(r, _)| r.table.total_rows).sum();
    let pb = progress(known, "prepare", "rows");
    let mut writer = PreparedWriter::create(&cfg.out, unpaired)?;
    // Tokenization (rayon, this thread) overlaps with encoding and writing the previous
    // batch (the writer thread); a small bounded queue keeps memory flat.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(2);
    let (tally, writer) = std::thread::scope(|scope| -> Result<(Tally, PreparedWriter)> {
        let pb = &pb;
        let handle = scope.spawn(move || -> Result<(Tally, PreparedWriter)> {
            let mut tally = Tally::default();
            for (file_name, results) in rx {
                let (kept, skipped) = tally.record(&file_name, &results);
                writer.write(&kept, &skipped)?;
                pb.inc(results.len() as u64);
                pb.set_message(format!("{:.0} tokens/s", tally.tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9)));
            }
            Ok((tally, writer))
        });
        let produced = (|| -> Result<()> {
            for (mut reader, fixed_split) in readers {
                let file_name: Arc<str> = reader.path().display().to_string().into();
                // Pairs turned into unpaired rows go in TRL's blocks of 1,000 source rows.
                let block = if cfg.unpair && !reader.unpaired { UNPAIR_BLOCK } else { 1 };
                let mut pending: Vec<SourceRow> = Vec::new();
                let mut checked = false;
                loop {
                    let batch = reader.next_batch()?;
                    let done = batch.is_none();
                    pending.extend(batch.into_iter().flatten());
                    let take = if done { pending.len() } else { pending.len() / block * block };
                    if take > 0 {
                        let rows: Vec<SourceRow> = pending.drain(..take).collect();
                        if !checked {
                            // Fail early on a tokenizer that cannot serve this file's format.
                            if let Some((_, Ok(row))) = rows.iter().find(|(_, r)| r.is_ok()) {
                                encoder.check_ready(row.is_conversational()).with_context(|| file_name.to_string())?;
                                checked = true;
                            }
                        }
                        let split_rows: Vec<SplitRow> = rows
                            .into_par_iter()
                            .map(|(src, row)| {
                                let r = row.map(|row| {
                                    let split = fixed_split.unwrap_or(if is_eval(&row, cfg.eval_fraction) { Split::Eval } else { Split::Train });
                                    (row, split)
                                });
                                (src, r)
                            })
                            .collect();
                        let split_rows =
                            if block > 1 { split_rows.chunks(block).flat_map(|c| unpair_block(c.to_vec())).collect() } else { split_rows };
                        let results: Vec<RowOutcome> = split_rows
                            .into_par_iter()
                            .map(|(src, r)| {
                                let r = r.and_then(|(row, split)| match row {
                                    InputRow::Paired(p) => encoder.encode(&p).map(|e| (e, split, None)),
                                    InputRow::Unpaired(u) => encoder.encode_unpaired(&u).map(|e| (e, split, Some(u.label))),
                                });
                                (src, r)
                            })
                            .collect();
                        if tx.send((file_name.clone(), results)).is_err() {
                            break; // the writer failed; its error is reported below
                        }
                    }
                    if done {
                        break;
                    }
                }
            }
            Ok(())
        })();
        drop(tx);
        let written = handle.join().expect("writer thread panicked");
        produced?;
        written
    })?;
    let Tally { rows: total_rows, mut counts, skipped_by_reason, plen, clen, rlen, truncated_chosen, truncated_rejected, tokens } = tally;
    pb.finish_and_clear();
    let unit = if unpaired { "rows" } else { "pairs" };
    let pairs = counts.get(&format!("{unit}_train")).copied().unwrap_or(0) + counts.get(&format!("{unit}_eval")).copied().unwrap_or(0);
    let rejected: u64 = skipped_by_reason.values().sum();
    counts.insert("rows_read".into(), total_rows);
    counts.insert(unit.into(), pairs);
    counts.insert("rejected".into(), rejected);
    counts.insert("tokens".into(), tokens);
    counts.insert("truncated_chosen".into(), truncated_chosen);
    counts.insert("truncated_rejected".into(), truncated_rejected);
    for (k, v) in &skipped_by_reason {
        counts.insert(format!("rejected_{k}"), *v);
    }
    let wall = t0.elapsed().as_secs_f64();
    let stats = serde_json::json!({
        "prompt_tokens": plen.json(), "chosen_tokens": clen.json(), "rejected_tokens": rlen.json(),
        "rows_per_s": total_rows as f64 / wall.max(1e-9), "tokens_per_s": tokens as f64 / wall.max(1e-9),
    });
    let files = writer.finish(&sd.fingerprint)?;
    let manifest = sd.manifest(counts, stats);
    let manifest = sd.finish(manifest, &files)?;
    let what = if unpaired {
        let c = |k: &str| manifest.counts.get(k).copied().unwrap_or(0);
        format!(
            "unpaired rows ({} desirable, {} undesirable)",
            c("desirable_train") + c("desirable_eval"),
            c("undesirable_train") + c("undesirable_eval")
        )
    } else {
        "pairs".to_string()
    };
    eprintln!(
        "prepare: {pairs} {what}, {} train, {} eval, from {total_rows} rows in {wall:.2}s ({:.0} rows/s, {:.0} tokens/s) -> {}",
        manifest.counts.get(&format!("{unit}_train")).unwrap_or(&0),
        manifest.counts.get(&format!("{unit}_eval")).unwrap_or(&0),
        total_rows as f64 / wall.max(1e-9),
        tokens as f64 / wall.max(1e-9),
        cfg.out.display()
    );
    if rejected > 0 {
        let by: Vec<String> = skipped_by_reason.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        eprintln!("prepare: {rejected} rows not kept ({}); see {}", by.join(", "), cfg.out.join("rejected.parquet").display());
    }
    Ok(manifest)
}
