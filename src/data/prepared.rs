//! The prepared dataset directory, written only by the `prepare` stage and read by the others.
//!
//! - `pairs.parquet`: one row per kept pair (the polars view, see schemas/pairs.parquet.json);
//!   for unpaired data (manifest setting `kind: "unpaired"`) `unpaired.parquet` instead, one
//!   row per labelled completion, and the columns below hold it as a pair with an empty
//!   rejected side, plus `label.u32` (1 desirable, 0 undesirable).
//! - `rejected.parquet`: every input row not kept, with its reason.
//! - memory-mapped columns, one value per `row_id`, for the later stages' random access:
//!   `token_ids.u32` (prompt ‖ chosen ‖ rejected of each pair, untruncated, concatenated),
//!   `row_offsets.u64` (n+1 offsets into it), `prompt_len.u32`, `chosen_len.u32`,
//!   `rejected_len.u32`, `chosen_scored.u32`, `rejected_scored.u32`, `split.u32` (0 train, 1 eval).
//! - `manifest.json`.
use super::tokenize::{EncodedPair, Truncation};
use crate::store::{Column, ColumnWriter, Manifest, ParquetOut};
use anyhow::{bail, Context, Result};
use arrow_array::builder::{BooleanBuilder, ListBuilder, StringBuilder, UInt32Builder, UInt64Builder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const STAGE: &str = "prepare";
/// 2: manifest inputs are typed, with the tokenizer's parts; empty completions are rejected.
/// 3: tokenizers built as transformers 5 builds them (format 2 ran tokenizer.json as it is,
/// which gives other ids for rebuilt classes such as LlamaTokenizer), templates with tools,
/// kwargs and the date.
pub const FORMAT_VERSION: u32 = 3;
pub const PAIRS_FILE: &str = "pairs.parquet";
pub const UNPAIRED_FILE: &str = "unpaired.parquet";
pub const LABEL_COLUMN: &str = "label.u32";
pub const REJECTED_FILE: &str = "rejected.parquet";
const COLUMNS: [&str; 8] = [
    "token_ids.u32", "row_offsets.u64", "prompt_len.u32", "chosen_len.u32", "rejected_len.u32", "chosen_scored.u32", "rejected_scored.u32",
    "split.u32",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train = 0,
    Eval = 1,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Eval => "eval",
        }
    }
}

fn ids_field(name: &str) -> Field {
    Field::new(name, DataType::List(Arc::new(Field::new("item", DataType::UInt32, true))), false)
}

pub fn pairs_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("row_id", DataType::UInt64, false),
        Field::new("split", DataType::Utf8, false),
        Field::new("source_file", DataType::Utf8, false),
        Field::new("source_row", DataType::UInt64, false),
        ids_field("prompt_ids"),
        ids_field("chosen_ids"),
        ids_field("rejected_ids"),
        Field::new("prompt_tokens", DataType::UInt32, false),
        Field::new("chosen_tokens", DataType::UInt32, false),
        Field::new("rejected_tokens", DataType::UInt32, false),
        Field::new("chosen_scored_tokens", DataType::UInt32, false),
        Field::new("rejected_scored_tokens", DataType::UInt32, false),
    ]))
}

pub fn unpaired_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("row_id", DataType::UInt64, false),
        Field::new("split", DataType::Utf8, false),
        Field::new("source_file", DataType::Utf8, false),
        Field::new("source_row", DataType::UInt64, false),
        ids_field("prompt_ids"),
        ids_field("completion_ids"),
        Field::new("label", DataType::Boolean, false),
        Field::new("prompt_tokens", DataType::UInt32, false),
        Field::new("completion_tokens", DataType::UInt32, false),
        Field::new("completion_scored_tokens", DataType::UInt32, false),
    ]))
}

pub fn rejected_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("source_file", DataType::Utf8, false),
        Field::new("source_row", DataType::UInt64, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, false),
    ]))
}

/// One kept pair as the writer receives it.
pub struct PairRecord<'a> {
    pub split: Split,
    pub source_file: &'a str,
    pub source_row: u64,
    pub pair: &'a EncodedPair,
    /// Unpaired rows: the label (the pair's rejected side is empty).
    pub label: Option<bool>,
}

/// One input row not kept, as the writer receives it (a row of `rejected.parquet`).
pub struct SkippedRecord<'a> {
    pub source_file: &'a str,
    pub source_row: u64,
    pub reason: &'a str,
    pub detail: &'a str,
}

pub struct PreparedWriter {
    unpaired: bool,
    pairs: ParquetOut,
    rejected: ParquetOut,
    cols: PreparedColumns,
    rows: u64,
}

struct PreparedColumns {
    token_ids: ColumnWriter<u32>,
    row_offsets: ColumnWriter<u64>,
    lens: [ColumnWriter<u32>; 6],
    labels: Option<ColumnWriter<u32>>,
}

impl PreparedWriter {
    /// `unpaired`: rows are labelled completions (`unpaired.parquet`, `label.u32`).
    pub fn create(dir: &Path, unpaired: bool) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let col = |name: &str| ColumnWriter::<u32>::create(&dir.join(name));
        let mut row_offsets = ColumnWriter::<u64>::create(&dir.join(COLUMNS[1]))?;
        row_offsets.push(&[0])?;
        let (name, schema) = if unpaired { (UNPAIRED_FILE, unpaired_schema()) } else { (PAIRS_FILE, pairs_schema()) };
        Ok(Self {
            unpaired,
            pairs: ParquetOut::create(&dir.join(name), schema)?,
            rejected: ParquetOut::create(&dir.join(REJECTED_FILE), rejected_schema())?,
            cols: PreparedColumns {
                token_ids: col(COLUMNS[0])?,
                row_offsets,
                lens: [col(COLUMNS[2])?, col(COLUMNS[3])?, col(COLUMNS[4])?, col(COLUMNS[5])?, col(COLUMNS[6])?, col(COLUMNS[7])?],
                labels: if unpaired { Some(col(LABEL_COLUMN)?) } else { None },
            },
            rows: 0,
        })
    }

    /// Appends kept pairs (assigned the next row_ids, in order) and skipped rows.
    pub fn write(&mut self, pairs: &[PairRecord], skipped: &[SkippedRecord]) -> Result<()> {
        if !pairs.is_empty() {
            let mut row_id = UInt64Builder::new();
            let mut split = StringBuilder::new();
            let mut file = StringBuilder::new();
            let mut src = UInt64Builder::new();
            let mut ids: [ListBuilder<UInt32Builder>; 3] = std::array::from_fn(|_| ListBuilder::new(UInt32Builder::new()));
            let mut counts: [UInt32Builder; 5] = std::array::from_fn(|_| UInt32Builder::new());
            let mut labels = BooleanBuilder::new();
            for r in pairs {
                let p = r.pair;
                row_id.append_value(self.rows);
                self.rows += 1;
                split.append_value(r.split.as_str());
                file.append_value(r.source_file);
                src.append_value(r.source_row);
                for (b, v) in ids.iter_mut().zip([&p.prompt_ids, &p.chosen_ids, &p.rejected_ids]) {
                    b.values().append_slice(v);
                    b.append(true);
                }
                let lens = [p.prompt_ids.len() as u32, p.chosen_ids.len() as u32, p.rejected_ids.len() as u32, p.chosen_scored, p.rejected_scored];
                for (b, v) in counts.iter_mut().zip(lens) {
                    b.append_value(v);
                }
                let c = &mut self.cols;
                c.token_ids.push(&p.prompt_ids)?;
                c.token_ids.push(&p.chosen_ids)?;
                c.token_ids.push(&p.rejected_ids)?;
                c.row_offsets.push(&[c.token_ids.count()])?;
                for (w, v) in c.lens.iter_mut().zip(lens.iter().copied().chain([r.split as u32])) {
                    w.push(&[v])?;
                }
                match (&mut c.labels, r.label) {
                    (Some(w), Some(l)) => {
                        w.push(&[u32::from(l)])?;
                        labels.append_value(l);
                    }
                    (None, None) => {}
                    _ => bail!("prepared writer: a {} row in {} data", if r.label.is_some() { "labelled" } else { "paired" }, self.kind_name()),
                }
            }
            let mut arrays: Vec<ArrayRef> =
                vec![Arc::new(row_id.finish()), Arc::new(split.finish()), Arc::new(file.finish()), Arc::new(src.finish())];
            if self.unpaired {
                // prompt_ids, completion_ids, label, prompt_tokens, completion_tokens, completion_scored_tokens.
                let [p, c, _] = &mut ids;
                arrays.extend([Arc::new(p.finish()) as ArrayRef, Arc::new(c.finish()), Arc::new(labels.finish())]);
                let [pt, ct, _, cs, _] = &mut counts;
                arrays.extend([Arc::new(pt.finish()) as ArrayRef, Arc::new(ct.finish()), Arc::new(cs.finish())]);
                self.pairs.write(&RecordBatch::try_new(unpaired_schema(), arrays)?)?;
            } else {
                arrays.extend(ids.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
                arrays.extend(counts.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
                self.pairs.write(&RecordBatch::try_new(pairs_schema(), arrays)?)?;
            }
        }
        if !skipped.is_empty() {
            let mut file = StringBuilder::new();
            let mut src = UInt64Builder::new();
            let mut reason = StringBuilder::new();
            let mut detail = StringBuilder::new();
            for r in skipped {
                file.append_value(r.source_file);
                src.append_value(r.source_row);
                reason.append_value(r.reason);
                detail.append_value(r.detail);
            }
            let arrays: Vec<ArrayRef> = vec![Arc::new(file.finish()), Arc::new(src.finish()), Arc::new(reason.finish()), Arc::new(detail.finish())];
            self.rejected.write(&RecordBatch::try_new(rejected_schema(), arrays)?)?;
        }
        Ok(())
    }

    fn kind_name(&self) -> &'static str {
        if self.unpaired {
            "unpaired"
        } else {
            "paired"
        }
    }

    /// Commits every file under its final name; returns their names, for the manifest (which
    /// the stage writes last, so its presence means the directory is whole).
    pub fn finish(self, fingerprint: &str) -> Result<Vec<&'static str>> {
        self.pairs.finish()?;
        self.rejected.finish()?;
        self.cols.token_ids.finish(fingerprint)?;
        self.cols.row_offsets.finish(fingerprint)?;
        for w in self.cols.lens {
            w.finish(fingerprint)?;
        }
        let mut names = vec![if self.unpaired { UNPAIRED_FILE } else { PAIRS_FILE }, REJECTED_FILE];
        names.extend(COLUMNS);
        if let Some(w) = self.cols.labels {
            w.finish(fingerprint)?;
            names.push(LABEL_COLUMN);
        }
        Ok(names)
    }
}

/// One pair as later stages see it: slices into the mapped token column.
#[derive(Debug, Clone, Copy)]
pub struct PairView<'a> {
    pub row_id: usize,
    pub prompt: &'a [u32],
    pub chosen: &'a [u32],
    pub rejected: &'a [u32],
    pub chosen_scored: usize,
    pub rejected_scored: usize,
    pub split: Split,
    /// An unpaired row (`chosen` its completion, `rejected` its KL completion): its label.
    pub label: Option<bool>,
}

impl<'a> PairView<'a> {
    /// A train pair scored whole (no truncation), for tools and tests that build pairs by hand.
    pub fn whole(row_id: usize, prompt: &'a [u32], chosen: &'a [u32], rejected: &'a [u32]) -> Self {
        PairView { row_id, prompt, chosen, rejected, chosen_scored: chosen.len(), rejected_scored: rejected.len(), split: Split::Train, label: None }
    }
}

/// TRL 1.16 KTOTrainer's KL completions: within each block of `block` consecutive rows (in
/// order), row j takes row j−1's completion and the first row the block's last one. Returns
/// each position's partner position.
pub fn kl_partners(n: usize, block: usize) -> Vec<usize> {
    (0..n)
        .map(|i| {
            let start = i - i % block;
            let end = (start + block).min(n);
            if i == start {
                end - 1
            } else {
                i - 1
            }
        })
        .collect()
}

/// Read side of the prepared directory: every column mapped, nothing loaded whole.
pub struct PreparedDataset {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub truncation: Truncation,
    token_ids: Column<u32>,
    row_offsets: Column<u64>,
    lens: Vec<Column<u32>>,
    /// Unpaired data: `label.u32`, and each row's KL partner once [`Self::set_kl_blocks`] ran.
    labels: Option<Column<u32>>,
    kl_partner: Vec<u32>,
    kl_block: Option<usize>,
}

impl PreparedDataset {
    /// Opens a finished prepared directory, checking its files against the manifest.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = Manifest::load(dir, STAGE)?;
        if manifest.format_version != FORMAT_VERSION {
            bail!(
                "{}: prepared format version {}, this build reads {FORMAT_VERSION}{}; rerun `pipeline prepare --force` on it",
                dir.display(),
                manifest.format_version,
                if manifest.format_version == 2 {
                    " (format 2 ran tokenizer.json as it is, and transformers rebuilds some tokenizers, e.g. LlamaTokenizer's: the ids may differ)"
                } else {
                    ""
                }
            );
        }
        let unpaired = match manifest.settings.get("kind").and_then(|k| k.as_str()) {
            None | Some("paired") => false,
            Some("unpaired") => true,
            Some(other) => bail!("{}: unknown data kind `{other}` in the manifest", dir.display()),
        };
        let table = if unpaired { UNPAIRED_FILE } else { PAIRS_FILE };
        let extra: &[&str] = if unpaired { &[LABEL_COLUMN] } else { &[] };
        for name in COLUMNS.iter().chain([table, REJECTED_FILE].iter()).chain(extra) {
            if !manifest.files.contains_key(*name) {
                bail!("{}: manifest does not list {name}; the directory is incomplete, rerun prepare", dir.display());
            }
        }
        manifest.verify_files(dir)?;
        let fp = Some(manifest.fingerprint.as_str());
        let truncation: Truncation =
            serde_json::from_value(manifest.settings["truncation"].clone()).context("prepared manifest has no truncation settings")?;
        let lens = COLUMNS[2..].iter().map(|n| Column::open(&dir.join(n), fp)).collect::<Result<Vec<_>>>()?;
        let labels = if unpaired { Some(Column::open(&dir.join(LABEL_COLUMN), fp)?) } else { None };
        let me = Self {
            labels,
            kl_partner: Vec::new(),
            kl_block: None,
            dir: dir.to_path_buf(),
            token_ids: Column::open(&dir.join(COLUMNS[0]), fp)?,
            row_offsets: Column::open(&dir.join(COLUMNS[1]), fp)?,
            lens,
            truncation,
            manifest,
        };
        let n = me.len();
        if me.row_offsets.len() != n + 1 || me.lens.iter().any(|c| c.len() != n) || me.labels.as_ref().is_some_and(|c| c.len() != n) {
            bail!("{}: column lengths disagree; the directory is corrupt, rerun prepare --force", dir.display());
        }
        // What later stages rely on, checked once so a bad directory is an error, not a panic.
        let offsets = me.row_offsets.as_slice();
        let total = me.token_ids.len() as u64;
        let l = |c: usize, i: usize| me.lens[c].as_slice()[i] as u64;
        for i in 0..n {
            let (p, c, r, cs, rs) = (l(0, i), l(1, i), l(2, i), l(3, i), l(4, i));
            let rejected_ok = match &me.labels {
                Some(lab) => r == 0 && rs == 0 && lab.as_slice()[i] <= 1 && p < me.truncation.max_length as u64,
                None => (1..=r).contains(&rs),
            };
            let ok = offsets[i] <= offsets[i + 1]
                && offsets[i + 1] - offsets[i] == p + c + r
                && offsets[i + 1] <= total
                && p >= 1
                && (1..=c).contains(&cs)
                && rejected_ok
                && l(5, i) <= 1;
            if !ok {
                bail!(
                    "{}: row {i} is inconsistent (prompt {p}, chosen {c}/{cs} scored, rejected {r}/{rs} scored); rerun prepare --force",
                    dir.display()
                );
            }
        }
        Ok(me)
    }

    pub fn len(&self) -> usize {
        self.lens[0].len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn fingerprint(&self) -> &str {
        &self.manifest.fingerprint
    }

    /// Labelled completions rather than pairs (KTO's data).
    pub fn is_unpaired(&self) -> bool {
        self.labels.is_some()
    }

    /// The data kind as stages name it in their errors.
    pub fn kind(&self) -> &'static str {
        if self.is_unpaired() {
            "unpaired"
        } else {
            "paired"
        }
    }

    /// Unpaired data: fixes every row's KL completion, rotating completions within blocks of
    /// `block` consecutive rows of each split (TRL's per-device batch).
    pub fn set_kl_blocks(&mut self, block: usize) {
        let mut partner = vec![0u32; self.len()];
        for split in [Split::Train, Split::Eval] {
            let rows = self.rows_of(split);
            for (i, j) in kl_partners(rows.len(), block).into_iter().enumerate() {
                partner[rows[i] as usize] = rows[j];
            }
        }
        self.kl_partner = partner;
        self.kl_block = Some(block);
    }

    /// The KL block size set by [`Self::set_kl_blocks`].
    pub fn kl_block(&self) -> Option<usize> {
        self.kl_block
    }

    /// An unpaired row's KL partner (whose completion it is scored with).
    pub fn kl_partner(&self, row_id: usize) -> usize {
        self.kl_partner[row_id] as usize
    }

    fn parts(&self, row_id: usize) -> (&[u32], &[u32], &[u32]) {
        let start = self.row_offsets.as_slice()[row_id] as usize;
        let l = |c: usize| self.lens[c].as_slice()[row_id] as usize;
        let (p, c, r) = (l(0), l(1), l(2));
        let ids = &self.token_ids.as_slice()[start..start + p + c + r];
        (&ids[..p], &ids[p..p + c], &ids[p + c..])
    }

    /// A pair, or an unpaired row as (completion, KL completion) with its label; the KL
    /// completion is cut where its prompt leaves it `max_length`.
    pub fn pair(&self, row_id: usize) -> PairView<'_> {
        let l = |c: usize| self.lens[c].as_slice()[row_id] as usize;
        let (prompt, chosen, mut rejected) = self.parts(row_id);
        let mut rejected_scored = l(4);
        let label = self.labels.as_ref().map(|lab| lab.as_slice()[row_id] == 1);
        if label.is_some() {
            assert!(self.kl_block.is_some(), "unpaired rows are scored once set_kl_blocks has fixed their KL completions");
            rejected = self.parts(self.kl_partner(row_id)).1;
            rejected_scored = rejected.len().min(self.truncation.max_length - prompt.len());
        }
        PairView {
            row_id,
            prompt,
            chosen,
            rejected,
            chosen_scored: l(3),
            rejected_scored,
            split: if l(5) == 1 { Split::Eval } else { Split::Train },
            label,
        }
    }

    pub fn split_of(&self, row_id: usize) -> Split {
        if self.lens[5].as_slice()[row_id] == 1 {
            Split::Eval
        } else {
            Split::Train
        }
    }

    /// Row ids of one split, in order.
    pub fn rows_of(&self, split: Split) -> Vec<u32> {
        (0..self.len() as u32).filter(|&i| self.split_of(i as usize) == split).collect()
    }
}
