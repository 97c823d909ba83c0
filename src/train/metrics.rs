//! Training metrics with TRL's names, one row per optimizer step (eval rows carry `eval/...`),
//! appended to `metrics.jsonl` as they happen and written whole to `metrics.parquet`.
use crate::store::ParquetOut;
use anyhow::{bail, Context, Result};
use arrow_array::builder::{Float64Builder, UInt64Builder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

/// The metrics of a batch, logged for train steps and (prefixed `eval/`) for evaluations, with
/// TRL 1.16's names: always the first seven and the lm-head statistics; `nll_loss`,
/// `log_odds_*` (ORPO), `aux_loss` (MoE) and `kl` (KTO) where they apply (null elsewhere).
/// For unpaired data "chosen" means desirable and "rejected" undesirable, as TRL logs them.
pub const PAIR_KEYS: &[&str] = &[
    "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen",
    "logits/rejected", "entropy", "mean_token_accuracy", "nll_loss", "log_odds_ratio", "log_odds_chosen", "aux_loss", "kl",
];
/// Train-only metrics.
pub const STEP_KEYS: &[&str] = &[
    "grad_norm", "learning_rate", "num_tokens", "tokens_per_s", "step_seconds", "forward_seconds", "backward_seconds", "optimizer_seconds",
    "collective_seconds", "gathers_prefetched", "peak_memory_gb", "epoch",
];

pub fn columns() -> Vec<String> {
    let mut c: Vec<String> = PAIR_KEYS.iter().chain(STEP_KEYS).map(|s| s.to_string()).collect();
    c.extend(PAIR_KEYS.iter().map(|k| format!("eval/{k}")));
    c
}

pub fn schema() -> SchemaRef {
    let mut fields = vec![Field::new("step", DataType::UInt64, false)];
    fields.extend(columns().into_iter().map(|c| Field::new(c, DataType::Float64, true)));
    Arc::new(Schema::new(fields))
}

pub type Row = BTreeMap<String, f64>;

/// Metrics as TRL 1.16 reduces them: each micro-batch's value (a mean over its pairs or tokens,
/// or a sum of its pieces), then the unweighted mean over the micro-batches of a step (or of
/// an evaluation).
#[derive(Default)]
pub struct Stats {
    /// The micro-batch in progress: key → (Σ value, Σ weight); weight 0 marks a plain sum.
    micro: BTreeMap<&'static str, (f64, f64)>,
    /// Finished micro-batches: key → (Σ of their values, how many).
    done: BTreeMap<&'static str, (f64, usize)>,
}

impl Stats {
    /// Adds to a micro-batch mean: Σ value / Σ weight over the micro-batch's pieces.
    pub fn mean(&mut self, key: &'static str, value: f64, weight: f64) {
        let e = self.micro.entry(key).or_default();
        e.0 += value;
        e.1 += weight;
    }

    /// Adds to a micro-batch total (a loss whose pieces add up).
    pub fn sum(&mut self, key: &'static str, value: f64) {
        self.micro.entry(key).or_default().0 += value;
    }

    /// Data-parallel: the micro-batch's sums over every rank's share, so each rank holds what
    /// one process computing the whole micro-batch would (every key is one of PAIR_KEYS).
    pub fn reduce_micro(&mut self, world: &crate::train::dist::World) {
        if world.size == 1 {
            return;
        }
        debug_assert!(self.micro.keys().all(|k| PAIR_KEYS.contains(k)), "{:?}", self.micro.keys());
        let mut buf: Vec<f64> = PAIR_KEYS
            .iter()
            .flat_map(|k| match self.micro.get(k) {
                Some(&(v, w)) => [v, w, 1.0],
                None => [0.0, 0.0, 0.0],
            })
            .collect();
        world.sum_f64(&mut buf);
        self.micro = PAIR_KEYS.iter().zip(buf.chunks(3)).filter(|(_, c)| c[2] > 0.0).map(|(k, c)| (*k, (c[0], c[1]))).collect();
    }

    /// Closes the micro-batch: each key's value joins the step's mean.
    pub fn end_micro(&mut self) {
        for (k, (v, w)) in std::mem::take(&mut self.micro) {
            let value = if w == 0.0 { v } else { v / w };
            let e = self.done.entry(k).or_default();
            e.0 += value;
            e.1 += 1;
        }
    }

    pub fn into_row(mut self, prefix: &str, row: &mut Row) {
        self.end_micro();
        for (k, (v, n)) in self.done {
            row.insert(format!("{prefix}{k}"), v / n.max(1) as f64);
        }
    }
}

fn json_line(step: usize, row: &Row) -> String {
    let mut obj = serde_json::Map::new();
    obj.insert("step".into(), step.into());
    for (k, v) in row {
        obj.insert(k.clone(), serde_json::json!(v));
    }
    serde_json::Value::Object(obj).to_string()
}

pub fn append_jsonl(path: &Path, step: usize, row: &Row) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{}", json_line(step, row)).map_err(|e| crate::store::space::write_error(path, e))?;
    Ok(())
}

/// Replaces `metrics.jsonl` with `rows` (a resumed run drops what followed its checkpoint).
pub fn write_jsonl(path: &Path, rows: &[(usize, Row)]) -> Result<()> {
    let text: String = rows.iter().map(|(s, r)| json_line(*s, r) + "\n").collect();
    crate::store::write_atomic(path, text.as_bytes())
}

/// Reads `metrics.jsonl`, keeping rows up to `max_step` (a resumed run drops what came after
/// its checkpoint). A last line without its newline was torn by a killed run and is dropped;
/// any other unreadable line is an error naming the file and line.
pub fn read_jsonl(path: &Path, max_step: usize) -> Result<Vec<(usize, Row)>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    let mut out = Vec::new();
    for (no, line) in complete.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = || format!("{} line {}: not a metrics row", path.display(), no + 1);
        let v: serde_json::Value = serde_json::from_str(line).with_context(bad)?;
        let (Some(obj), Some(step)) = (v.as_object(), v.get("step").and_then(|s| s.as_u64())) else {
            bail!("{}", bad());
        };
        let step = step as usize;
        if step > max_step {
            continue;
        }
        let row = obj.iter().filter(|(k, _)| *k != "step").filter_map(|(k, x)| Some((k.clone(), x.as_f64()?))).collect();
        out.push((step, row));
    }
    Ok(out)
}

/// Writes rows to parquet, merging rows of the same step (a train row and an eval row).
pub fn write_parquet(path: &Path, rows: &[(usize, Row)]) -> Result<()> {
    let mut merged: BTreeMap<usize, Row> = BTreeMap::new();
    for (s, r) in rows {
        merged.entry(*s).or_default().extend(r.iter().map(|(k, v)| (k.clone(), *v)));
    }
    let mut step = UInt64Builder::new();
    let cols = columns();
    let mut b: Vec<Float64Builder> = cols.iter().map(|_| Float64Builder::new()).collect();
    for (s, r) in &merged {
        step.append_value(*s as u64);
        for (c, builder) in cols.iter().zip(b.iter_mut()) {
            builder.append_option(r.get(c).copied());
        }
    }
    let mut arrays: Vec<ArrayRef> = vec![Arc::new(step.finish())];
    arrays.extend(b.iter_mut().map(|x| Arc::new(x.finish()) as ArrayRef));
    let mut out = ParquetOut::create(path, schema())?;
    out.write(&RecordBatch::try_new(schema(), arrays)?)?;
    out.finish()
}
