//! The formats of `sample` and `label`, beside the prepared and cache formats: samples.parquet
//! (what `sample` writes and `label` reads), scores.parquet and prefs.parquet (what `label` writes
//! and `prepare` or the iterative rounds read), and the skipped.parquet both write (prepare's
//! rejected.parquet schema).
use super::input::{field_at, kind_of, str_at, uint_at, Field, Kind, Skip};
use super::prepared::rejected_schema;
use crate::store::ParquetOut;
use anyhow::{bail, Context, Result};
use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{DataType, Field as ArrowField, Schema, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const SAMPLES: &str = "samples.parquet";
pub const SCORES: &str = "scores.parquet";
pub const PREFS: &str = "prefs.parquet";
/// The inputs that gave no output: source_file, source_row, reason, detail.
pub const SKIPPED: &str = "skipped.parquet";

/// samples.parquet's columns; `prompt` and `completion` are strings, or message lists for
/// conversations (the completion is one assistant message), as `prepare` reads them.
pub fn samples_schema(kind: Kind) -> SchemaRef {
    let mut fields = sample_fields(kind);
    fields.extend([
        ArrowField::new("completion_ids", DataType::List(Arc::new(ArrowField::new("item", DataType::UInt32, true))), false),
        ArrowField::new("finish_reason", DataType::Utf8, false),
        ArrowField::new("logp", DataType::Float64, false),
    ]);
    Arc::new(Schema::new(fields))
}

/// The columns samples.parquet and scores.parquet both start with: which prompt (file, row),
/// which of its samples, and the texts.
fn sample_fields(kind: Kind) -> Vec<ArrowField> {
    vec![
        ArrowField::new("source_file", DataType::Utf8, false),
        ArrowField::new("source_row", DataType::UInt64, false),
        ArrowField::new("sample_index", DataType::UInt32, false),
        ArrowField::new("prompt", kind.data_type(), false),
        ArrowField::new("completion", kind.data_type(), false),
    ]
}

/// One row of samples.parquet.
#[derive(Clone)]
pub struct Sample {
    pub source_file: String,
    pub source_row: u64,
    pub sample_index: u32,
    pub prompt: Field,
    pub completion: Field,
}

/// `--samples`: a sample directory or its samples.parquet.
pub fn samples_file(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.join(SAMPLES)
    } else {
        p.to_path_buf()
    }
}

/// Reads samples.parquet (the columns `sample` writes; prompt and completion strings or
/// message lists) a batch of rows at a time.
pub struct SampleReader {
    path: PathBuf,
    pub kind: Kind,
    pub total: u64,
    batches: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    at: u64,
}

impl SampleReader {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).with_context(|| format!("{}: not a readable parquet file", path.display()))?;
        let schema = builder.schema().clone();
        let column = |name: &str| {
            schema
                .field_with_name(name)
                .map_err(|_| anyhow::anyhow!("{}: no column `{name}`: is it the samples.parquet of `pipeline sample`?", path.display()))
        };
        let kind = kind_of(path, "prompt", column("prompt")?.data_type())?;
        let ckind = kind_of(path, "completion", column("completion")?.data_type())?;
        if kind != ckind {
            bail!("{}: `prompt` and `completion` must both be strings or both be message lists", path.display());
        }
        for name in ["source_file", "source_row", "sample_index"] {
            column(name)?;
        }
        let total = builder.metadata().file_metadata().num_rows() as u64;
        Ok(Self { path: path.to_path_buf(), kind, total, batches: builder.with_batch_size(1024).build()?, at: 0 })
    }

    pub fn next_batch(&mut self) -> Result<Option<Vec<Sample>>> {
        let path = &self.path;
        let Some(batch) = self.batches.next() else { return Ok(None) };
        let batch = batch.with_context(|| format!("{}: cannot decode row group", path.display()))?;
        let col = |n: &str| batch.column_by_name(n).expect("checked").clone();
        let (file, row, index, prompt, completion) = (col("source_file"), col("source_row"), col("sample_index"), col("prompt"), col("completion"));
        let mut out = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            let at = self.at + i as u64;
            let field =
                |a: &ArrayRef, name: &str| field_at(a, self.kind, i, name).map_err(|s| anyhow::anyhow!("{}: row {at}: {}", path.display(), s.detail));
            let bad = |name: &str, what: &str| anyhow::anyhow!("{}: row {at}: column `{name}` is not {what}", path.display());
            out.push(Sample {
                source_file: str_at(file.as_ref(), i).ok_or_else(|| bad("source_file", "a string"))?.to_string(),
                source_row: uint_at(row.as_ref(), i).ok_or_else(|| bad("source_row", "a non-negative integer"))?,
                sample_index: uint_at(index.as_ref(), i).ok_or_else(|| bad("sample_index", "a non-negative integer"))? as u32,
                prompt: field(&prompt, "prompt")?,
                completion: field(&completion, "completion")?,
            });
        }
        self.at += out.len() as u64;
        Ok(Some(out))
    }

    /// The samples from row `from` on, one at a time.
    pub fn into_rows_from(mut self, from: u64) -> impl Iterator<Item = Result<Sample>> {
        let mut buf = std::collections::VecDeque::new();
        let mut skip = from;
        std::iter::from_fn(move || loop {
            if let Some(s) = buf.pop_front() {
                return Some(Ok(s));
            }
            match self.next_batch() {
                Err(e) => return Some(Err(e)),
                Ok(None) => return None,
                Ok(Some(b)) => {
                    let drop = (skip as usize).min(b.len());
                    skip -= drop as u64;
                    buf.extend(b.into_iter().skip(drop));
                }
            }
        })
    }
}

/// A prompt that gave no output: its file, row and why.
pub type SkippedRow = (Arc<str>, u64, Skip);

/// skipped.parquet: source_file, source_row, reason, detail (the schema of prepare's rejected.parquet).
pub fn write_skipped(path: &Path, rows: &[SkippedRow]) -> Result<()> {
    let mut out = ParquetOut::create(path, rejected_schema())?;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(rows.iter().map(|r| r.0.to_string()).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
        Arc::new(StringArray::from(rows.iter().map(|r| r.2.reason).collect::<Vec<_>>())),
        Arc::new(StringArray::from(rows.iter().map(|r| r.2.detail.clone()).collect::<Vec<_>>())),
    ];
    out.write(&RecordBatch::try_new(rejected_schema(), columns)?)?;
    out.finish()
}

/// The `score` column of a scores.parquet.
pub fn read_scores(path: &Path) -> Result<Vec<f64>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).with_context(|| format!("{}: not a readable parquet file", path.display()))?;
    let mask = parquet::arrow::ProjectionMask::columns(builder.parquet_schema(), ["score"]);
    let mut out = Vec::new();
    for batch in builder.with_projection(mask).build()? {
        let batch = batch?;
        let col = batch.column_by_name("score").with_context(|| format!("{}: no `score` column", path.display()))?;
        let col = col.as_any().downcast_ref::<Float64Array>().with_context(|| format!("{}: `score` is not f64", path.display()))?;
        out.extend(col.values().iter().copied());
    }
    Ok(out)
}

/// scores.parquet: the samples' columns and each one's score.
pub fn scores_schema(kind: Kind) -> SchemaRef {
    let mut fields = sample_fields(kind);
    fields.push(ArrowField::new("score", DataType::Float64, false));
    Arc::new(Schema::new(fields))
}

/// prefs.parquet: preference rows `prepare` reads, with their scores and where they came from.
/// `label --pairs unpaired`'s prefs.parquet: TRL's unpaired preference type, which `prepare`
/// reads as it is.
pub fn unpaired_prefs_schema(kind: Kind) -> SchemaRef {
    Arc::new(Schema::new(vec![
        ArrowField::new("prompt", kind.data_type(), false),
        ArrowField::new("completion", kind.data_type(), false),
        ArrowField::new("label", DataType::Boolean, false),
        ArrowField::new("score", DataType::Float64, false),
        ArrowField::new("source_file", DataType::Utf8, false),
        ArrowField::new("source_row", DataType::UInt64, false),
        ArrowField::new("sample_index", DataType::UInt32, false),
    ]))
}

pub fn prefs_schema(kind: Kind) -> SchemaRef {
    Arc::new(Schema::new(vec![
        ArrowField::new("prompt", kind.data_type(), false),
        ArrowField::new("chosen", kind.data_type(), false),
        ArrowField::new("rejected", kind.data_type(), false),
        ArrowField::new("chosen_score", DataType::Float64, false),
        ArrowField::new("rejected_score", DataType::Float64, false),
        ArrowField::new("source_file", DataType::Utf8, false),
        ArrowField::new("source_row", DataType::UInt64, false),
        ArrowField::new("chosen_sample_index", DataType::UInt32, false),
        ArrowField::new("rejected_sample_index", DataType::UInt32, false),
    ]))
}
