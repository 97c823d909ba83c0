//! Reads preference parquet in the shapes people publish: standard (strings), conversational
//! (lists of {role, content}) and implicit prompt (no prompt column). Streams row groups.
use anyhow::{bail, Context, Result};
use arrow_array::builder::{ListBuilder, StringBuilder, StructBuilder};
use arrow_array::{
    cast::AsArray, Array, ArrayRef, GenericListArray, LargeStringArray, OffsetSizeTrait, RecordBatch, StringArray, StringViewArray, StructArray,
};
use arrow_schema::{DataType, Fields, Schema};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Text(String),
    Messages(Vec<Message>),
}

/// One input row, before tokenization.
#[derive(Debug, Clone)]
pub struct RawRow {
    pub source_row: u64,
    pub prompt: Option<Field>,
    pub chosen: Field,
    pub rejected: Field,
}

/// A row we cannot use, with a short machine-readable `reason` and a human `detail`.
#[derive(Debug, Clone, PartialEq)]
pub struct Skip {
    pub reason: &'static str,
    pub detail: String,
}

impl Skip {
    pub fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Self { reason, detail: detail.into() }
    }
}

/// Which input columns hold the prompt, chosen and rejected values.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ColumnNames {
    /// `None`: use a `prompt` column when present, else extract the implicit prompt.
    pub prompt: Option<String>,
    pub chosen: String,
    pub rejected: String,
}

impl Default for ColumnNames {
    fn default() -> Self {
        Self { prompt: None, chosen: "chosen".into(), rejected: "rejected".into() }
    }
}

/// What a column holds: strings, or lists of {role, content} messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Messages,
}

/// The kind of a column of `path`, or an error naming the file and column.
pub fn kind_of(path: &Path, column: &str, dt: &DataType) -> Result<Kind> {
    let is_str = |dt: &DataType| matches!(dt, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View);
    match dt {
        dt if is_str(dt) => Ok(Kind::Text),
        DataType::List(f) | DataType::LargeList(f) => match f.data_type() {
            DataType::Struct(fields) => {
                for want in ["role", "content"] {
                    match fields.iter().find(|f| f.name() == want) {
                        Some(f) if is_str(f.data_type()) => {}
                        Some(f) => {
                            bail!("{}: column `{column}`: message field `{want}` has type {}, expected a string", path.display(), f.data_type())
                        }
                        None => bail!("{}: column `{column}`: messages have no `{want}` field", path.display()),
                    }
                }
                Ok(Kind::Messages)
            }
            other => bail!("{}: column `{column}` is a list of {other}; expected a list of {{role, content}} messages", path.display()),
        },
        other => bail!("{}: column `{column}` has type {other}; expected a string or a list of {{role, content}} messages", path.display()),
    }
}

/// Row `i` of a string column of any arrow string type (None: null or not a string).
pub fn str_at(arr: &dyn Array, i: usize) -> Option<&str> {
    if arr.is_null(i) {
        return None;
    }
    match arr.data_type() {
        DataType::Utf8 => Some(arr.as_any().downcast_ref::<StringArray>()?.value(i)),
        DataType::LargeUtf8 => Some(arr.as_any().downcast_ref::<LargeStringArray>()?.value(i)),
        DataType::Utf8View => Some(arr.as_any().downcast_ref::<StringViewArray>()?.value(i)),
        _ => None,
    }
}

fn messages_at<O: OffsetSizeTrait>(list: &GenericListArray<O>, i: usize, column: &str) -> Result<Vec<Message>, Skip> {
    let items = list.value(i);
    let st: &StructArray = items.as_struct();
    let role = st.column_by_name("role").expect("checked in kind_of");
    let content = st.column_by_name("content").expect("checked in kind_of");
    (0..st.len())
        .map(|j| {
            let (Some(role), Some(content)) = (str_at(role.as_ref(), j), str_at(content.as_ref(), j)) else {
                return Err(Skip::new("malformed_messages", format!("column `{column}`: message {j} has a null role or content")));
            };
            if st.is_null(j) {
                return Err(Skip::new("malformed_messages", format!("column `{column}`: message {j} is null")));
            }
            Ok(Message { role: role.to_string(), content: content.to_string() })
        })
        .collect()
}

/// Row `i` of a string or message-list column.
pub fn field_at(arr: &ArrayRef, kind: Kind, i: usize, column: &str) -> Result<Field, Skip> {
    if arr.is_null(i) {
        return Err(Skip::new("null_field", format!("column `{column}` is null")));
    }
    match kind {
        Kind::Text => Ok(Field::Text(str_at(arr.as_ref(), i).expect("checked type").to_string())),
        Kind::Messages => {
            let msgs = match arr.data_type() {
                DataType::List(_) => messages_at(arr.as_list::<i32>(), i, column)?,
                _ => messages_at(arr.as_list::<i64>(), i, column)?,
            };
            if msgs.is_empty() {
                return Err(Skip::new("malformed_messages", format!("column `{column}` is an empty message list")));
            }
            Ok(Field::Messages(msgs))
        }
    }
}

/// Column chunks must lie inside the file: the parquet crate panics on negative offsets or
/// sizes in a damaged footer, so they are checked before any page is read.
fn check_chunks(path: &Path, meta: &parquet::file::metadata::ParquetMetaData, file_len: u64) -> Result<()> {
    for (g, rg) in meta.row_groups().iter().enumerate() {
        for c in rg.columns() {
            let start = c.dictionary_page_offset().unwrap_or(c.data_page_offset());
            let len = c.compressed_size();
            if start < 0 || len < 0 || start as u64 + len as u64 > file_len {
                bail!("{}: corrupt parquet metadata (row group {g}, column `{}` lies outside the file)", path.display(), c.column_path());
            }
        }
    }
    Ok(())
}

/// A reader of a user's parquet file whose footer has been checked, and its row count.
fn open_parquet(path: &Path) -> Result<(ParquetRecordBatchReaderBuilder<std::fs::File>, u64)> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open input {}", path.display()))?;
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).with_context(|| format!("{}: not a readable parquet file", path.display()))?;
    check_chunks(path, builder.metadata(), file_len)?;
    let total_rows = builder.metadata().file_metadata().num_rows() as u64;
    Ok((builder, total_rows))
}

/// An input row by its index in its file: readable, or skipped with the reason.
pub type SourceRow = (u64, Result<RawRow, Skip>);

/// Streams the rows of one preference parquet file, a record batch at a time.
pub struct PreferenceReader {
    pub path: PathBuf,
    pub total_rows: u64,
    reader: ParquetRecordBatchReader,
    prompt: Option<(String, Kind)>,
    chosen: (String, Kind),
    rejected: (String, Kind),
    next_row: u64,
}

impl PreferenceReader {
    pub fn open(path: &Path, names: &ColumnNames, batch_rows: usize) -> Result<Self> {
        let (builder, total_rows) = open_parquet(path)?;
        let schema: Schema = builder.schema().as_ref().clone();
        let find = |name: &str| -> Result<(String, Kind)> {
            let f = schema.field_with_name(name).map_err(|_| {
                let have: Vec<_> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                anyhow::anyhow!("{}: no column `{name}` (columns: {})", path.display(), have.join(", "))
            })?;
            Ok((name.to_string(), kind_of(path, name, f.data_type())?))
        };
        let prompt = match &names.prompt {
            Some(p) => Some(find(p)?),
            None if schema.field_with_name("prompt").is_ok() => Some(find("prompt")?),
            None => None,
        };
        let chosen = find(&names.chosen)?;
        let rejected = find(&names.rejected)?;
        if chosen.1 != rejected.1 {
            bail!("{}: `{}` and `{}` must both be strings or both be message lists", path.display(), chosen.0, rejected.0);
        }
        // Read only the columns we use.
        let wanted: Vec<&str> = [prompt.as_ref().map(|p| p.0.as_str()), Some(&chosen.0), Some(&rejected.0)].into_iter().flatten().collect();
        let mask = parquet::arrow::ProjectionMask::columns(builder.parquet_schema(), wanted.iter().copied());
        let reader = builder.with_projection(mask).with_batch_size(batch_rows).build()?;
        Ok(Self { path: path.to_path_buf(), total_rows, reader, prompt, chosen, rejected, next_row: 0 })
    }

    /// The next batch of rows; rows that cannot be read come back as `Err(Skip)` with their row.
    pub fn next_batch(&mut self) -> Result<Option<Vec<SourceRow>>> {
        // The parquet decoder asserts on some corrupt pages instead of returning an error; a
        // damaged file must still be an error naming it, not a crash.
        let next = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.reader.next()))
            .map_err(|_| anyhow::anyhow!("{}: corrupt parquet data (the decoder failed)", self.path.display()))?;
        let Some(batch) = next else { return Ok(None) };
        let batch: RecordBatch = batch.with_context(|| format!("{}: cannot decode row group", self.path.display()))?;
        let col = |name: &str| batch.column_by_name(name).expect("projected").clone();
        let prompt = self.prompt.as_ref().map(|(n, k)| (n.clone(), col(n), *k));
        let (cn, ck) = (&self.chosen.0, self.chosen.1);
        let (rn, rk) = (&self.rejected.0, self.rejected.1);
        let (chosen, rejected) = (col(cn), col(rn));
        let mut out = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            let source_row = self.next_row + i as u64;
            let row = (|| {
                let prompt = match &prompt {
                    Some((n, a, k)) => Some(field_at(a, *k, i, n)?),
                    None => None,
                };
                Ok(RawRow { source_row, prompt, chosen: field_at(&chosen, ck, i, cn)?, rejected: field_at(&rejected, rk, i, rn)? })
            })();
            out.push((source_row, row));
        }
        self.next_row += batch.num_rows() as u64;
        Ok(Some(out))
    }
}

/// Arrow type of a message-list column: list<struct<role: str, content: str>>.
pub fn messages_type() -> DataType {
    let fields =
        Fields::from(vec![arrow_schema::Field::new("role", DataType::Utf8, true), arrow_schema::Field::new("content", DataType::Utf8, true)]);
    DataType::List(Arc::new(arrow_schema::Field::new("item", DataType::Struct(fields), true)))
}

pub fn messages_builder() -> ListBuilder<StructBuilder> {
    let fields = vec![arrow_schema::Field::new("role", DataType::Utf8, true), arrow_schema::Field::new("content", DataType::Utf8, true)];
    ListBuilder::new(StructBuilder::from_fields(fields, 0))
}

pub fn append_messages(b: &mut ListBuilder<StructBuilder>, msgs: &[Message]) {
    let s = b.values();
    for m in msgs {
        s.field_builder::<StringBuilder>(0).unwrap().append_value(&m.role);
        s.field_builder::<StringBuilder>(1).unwrap().append_value(&m.content);
        s.append(true);
    }
    b.append(true);
}

impl Kind {
    pub fn of(field: &Field) -> Self {
        match field {
            Field::Text(_) => Kind::Text,
            Field::Messages(_) => Kind::Messages,
        }
    }

    pub fn data_type(self) -> DataType {
        match self {
            Kind::Text => DataType::Utf8,
            Kind::Messages => messages_type(),
        }
    }
}

/// A column of `kind` from fields of that kind (strings or message lists), as `prepare` reads it.
pub fn fields_array<'a>(kind: Kind, fields: impl IntoIterator<Item = &'a Field>) -> Result<ArrayRef> {
    match kind {
        Kind::Text => {
            let mut b = StringBuilder::new();
            for f in fields {
                let Field::Text(t) = f else { bail!("a message list in a column of strings") };
                b.append_value(t);
            }
            Ok(Arc::new(b.finish()))
        }
        Kind::Messages => {
            let mut b = messages_builder();
            for f in fields {
                let Field::Messages(m) = f else { bail!("a string in a column of message lists") };
                append_messages(&mut b, m);
            }
            Ok(Arc::new(b.finish()))
        }
    }
}

/// A value by its row in its file: readable, or skipped with the reason.
pub type SourceField = (u64, Result<Field, Skip>);

/// Streams one column of strings or message lists (prompts for `sample`), a record batch at a time.
pub struct PromptReader {
    pub path: PathBuf,
    pub total_rows: u64,
    pub kind: Kind,
    column: String,
    reader: ParquetRecordBatchReader,
    next_row: u64,
}

impl PromptReader {
    pub fn open(path: &Path, column: &str, batch_rows: usize) -> Result<Self> {
        let (builder, total_rows) = open_parquet(path)?;
        let schema = builder.schema().clone();
        let f = schema.field_with_name(column).map_err(|_| {
            let have: Vec<_> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            anyhow::anyhow!("{}: no column `{column}` (columns: {}); --prompt-column names it", path.display(), have.join(", "))
        })?;
        let kind = kind_of(path, column, f.data_type())?;
        let mask = parquet::arrow::ProjectionMask::columns(builder.parquet_schema(), [column]);
        let reader = builder.with_projection(mask).with_batch_size(batch_rows).build()?;
        Ok(Self { path: path.to_path_buf(), total_rows, kind, column: column.to_string(), reader, next_row: 0 })
    }

    /// The next batch of (row, prompt or why it cannot be used).
    pub fn next_batch(&mut self) -> Result<Option<Vec<SourceField>>> {
        let next = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.reader.next()))
            .map_err(|_| anyhow::anyhow!("{}: corrupt parquet data (the decoder failed)", self.path.display()))?;
        let Some(batch) = next else { return Ok(None) };
        let batch: RecordBatch = batch.with_context(|| format!("{}: cannot decode row group", self.path.display()))?;
        let col = batch.column_by_name(&self.column).expect("projected").clone();
        let out = (0..batch.num_rows()).map(|i| (self.next_row + i as u64, field_at(&col, self.kind, i, &self.column))).collect();
        self.next_row += batch.num_rows() as u64;
        Ok(Some(out))
    }
}

/// Row `i` of an integer column of any arrow integer type, if non-negative and not null.
pub fn uint_at(arr: &dyn Array, i: usize) -> Option<u64> {
    use arrow_array::types::*;
    if arr.is_null(i) {
        return None;
    }
    match arr.data_type() {
        DataType::UInt64 => Some(arr.as_primitive::<UInt64Type>().value(i)),
        DataType::UInt32 => Some(arr.as_primitive::<UInt32Type>().value(i) as u64),
        DataType::UInt16 => Some(arr.as_primitive::<UInt16Type>().value(i) as u64),
        DataType::UInt8 => Some(arr.as_primitive::<UInt8Type>().value(i) as u64),
        DataType::Int64 => u64::try_from(arr.as_primitive::<Int64Type>().value(i)).ok(),
        DataType::Int32 => u64::try_from(arr.as_primitive::<Int32Type>().value(i)).ok(),
        DataType::Int16 => u64::try_from(arr.as_primitive::<Int16Type>().value(i)).ok(),
        DataType::Int8 => u64::try_from(arr.as_primitive::<Int8Type>().value(i)).ok(),
        _ => None,
    }
}
