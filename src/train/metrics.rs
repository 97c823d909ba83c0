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

/// The pair metrics, logged for train steps and (prefixed `eval/`) for evaluations.
pub const PAIR_KEYS: &[&str] =
    &["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"];
/// Pair metrics only some models have (null elsewhere): MoE's router load-balancing loss.
pub const OPTIONAL_PAIR_KEYS: &[&str] = &["aux_loss"];
/// Train-only metrics.
pub const STEP_KEYS: &[&str] = &[
    "grad_norm", "learning_rate", "tokens_per_s", "step_seconds", "forward_seconds", "backward_seconds", "optimizer_seconds", "peak_memory_gb",
    "epoch",
];

pub fn columns() -> Vec<String> {
    let pair = PAIR_KEYS.iter().chain(OPTIONAL_PAIR_KEYS);
    let mut c: Vec<String> = pair.clone().chain(STEP_KEYS).map(|s| s.to_string()).collect();
    c.extend(pair.map(|k| format!("eval/{k}")));
    c
}

pub fn schema() -> SchemaRef {
    let mut fields = vec![Field::new("step", DataType::UInt64, false)];
    fields.extend(columns().into_iter().map(|c| Field::new(c, DataType::Float64, true)));
    Arc::new(Schema::new(fields))
}

pub type Row = BTreeMap<String, f64>;

/// Running sums of pair metrics over micro-batches and pairs.
#[derive(Default)]
pub struct PairStats {
    pub pairs: usize,
    pub loss_sum: f64,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
    pub correct: f64,
    pub chosen_logps: f64,
    pub rejected_logps: f64,
    /// Σ of the micro-batches' aux losses, and how many there were.
    pub aux_loss: f64,
    pub aux_batches: usize,
}

impl PairStats {
    /// `loss_mean` is the batch's mean loss; the rest are per-pair values.
    pub fn add(&mut self, loss_mean: f64, chosen_r: &[f32], rejected_r: &[f32], chosen_lp: &[f32], rejected_lp: &[f32]) {
        let n = chosen_r.len();
        self.pairs += n;
        self.loss_sum += loss_mean * n as f64;
        for i in 0..n {
            self.chosen_reward += chosen_r[i] as f64;
            self.rejected_reward += rejected_r[i] as f64;
            self.correct += f64::from(u8::from(chosen_r[i] > rejected_r[i]));
            self.chosen_logps += chosen_lp[i] as f64;
            self.rejected_logps += rejected_lp[i] as f64;
        }
    }

    pub fn into_row(self, prefix: &str, row: &mut Row) {
        let n = self.pairs.max(1) as f64;
        let vals = [
            self.loss_sum / n,
            self.chosen_reward / n,
            self.rejected_reward / n,
            self.correct / n,
            (self.chosen_reward - self.rejected_reward) / n,
            self.chosen_logps / n,
            self.rejected_logps / n,
        ];
        for (k, v) in PAIR_KEYS.iter().zip(vals) {
            row.insert(format!("{prefix}{k}"), v);
        }
        if self.aux_batches > 0 {
            row.insert(format!("{prefix}aux_loss"), self.aux_loss / self.aux_batches as f64);
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
    writeln!(f, "{}", json_line(step, row))?;
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
