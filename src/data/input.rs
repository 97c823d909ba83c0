//! Reads preference data in the shapes and files people publish: standard (strings),
//! conversational (lists of messages) and implicit prompt (no prompt column); from parquet,
//! JSON Lines (`.jsonl`, also gzip- or zstd-compressed), JSON arrays and Hugging Face `datasets`
//! directories written by `save_to_disk` (Arrow IPC). Rows stream a batch at a time (a JSON
//! array is read whole). Every cell becomes a JSON value, so one path turns any format into
//! rows; per-row `tools` and `chat_template_kwargs` columns are read when present.
use anyhow::{bail, Context, Result};
use arrow_array::builder::{ListBuilder, StringBuilder, StructBuilder};
use arrow_array::{cast::AsArray, types::*, Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Fields, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A chat message as the dataset holds it: `role`, `content` and whatever other keys it has
/// (`tool_calls`, `name`, `reasoning_content`, ...), in their order, passed to the template as
/// transformers passes them.
#[derive(Debug, Clone, PartialEq)]
pub struct Message(pub Map<String, Json>);

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        let mut m = Map::new();
        m.insert("role".into(), Json::from(role));
        m.insert("content".into(), Json::from(content));
        Self(m)
    }

    pub fn role(&self) -> &str {
        self.0.get("role").and_then(Json::as_str).unwrap_or("")
    }

    /// The text content (None when absent, null or not a string).
    pub fn content(&self) -> Option<&str> {
        self.0.get("content").and_then(Json::as_str)
    }

    /// Nothing to train on: no content and no other non-null key beside the role.
    pub fn is_empty(&self) -> bool {
        let empty_content = match self.0.get("content") {
            None | Some(Json::Null) => true,
            Some(Json::String(s)) => s.is_empty(),
            Some(Json::Array(a)) => a.is_empty(),
            Some(_) => false,
        };
        empty_content && self.0.iter().all(|(k, v)| k == "role" || k == "content" || v.is_null())
    }
}

impl Serialize for Message {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

#[derive(Debug, Clone, PartialEq)]
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
    /// The row's `tools` (a list of JSON schemas), for the chat template.
    pub tools: Option<Json>,
    /// The row's `chat_template_kwargs` (e.g. `{"enable_thinking": false}`).
    pub template_kwargs: Option<Map<String, Json>>,
}

/// One unpaired input row (TRL's unpaired preference type: `prompt`, `completion`, `label`).
#[derive(Debug, Clone)]
pub struct UnpairedRow {
    pub source_row: u64,
    pub prompt: Field,
    pub completion: Field,
    /// True: desirable (thumbs up).
    pub label: bool,
    pub tools: Option<Json>,
    pub template_kwargs: Option<Map<String, Json>>,
}

/// A row as the input holds it: a pair, or one labelled completion.
#[derive(Debug, Clone)]
pub enum InputRow {
    Paired(RawRow),
    Unpaired(UnpairedRow),
}

impl InputRow {
    pub fn is_conversational(&self) -> bool {
        matches!(
            self,
            InputRow::Paired(RawRow { chosen: Field::Messages(_), .. }) | InputRow::Unpaired(UnpairedRow { completion: Field::Messages(_), .. })
        )
    }
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

/// Which input columns hold the prompt, chosen and rejected values (paired rows), or the
/// completion and its label (unpaired rows).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ColumnNames {
    /// `None`: use a `prompt` column when present, else extract the implicit prompt.
    pub prompt: Option<String>,
    pub chosen: String,
    pub rejected: String,
    pub completion: String,
    pub label: String,
}

impl Default for ColumnNames {
    fn default() -> Self {
        Self { prompt: None, chosen: "chosen".into(), rejected: "rejected".into(), completion: "completion".into(), label: "label".into() }
    }
}

/// What a column holds: strings, or lists of messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Messages,
}

/// The columns TRL 1.16 passes to the chat template when a dataset has them.
pub const TOOLS: &str = "tools";
pub const TEMPLATE_KWARGS: &str = "chat_template_kwargs";

fn is_str(dt: &DataType) -> bool {
    matches!(dt, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

/// The kind of an arrow column of `path`, or an error naming the file and column.
pub fn kind_of(path: &Path, column: &str, dt: &DataType) -> Result<Kind> {
    match dt {
        dt if is_str(dt) => Ok(Kind::Text),
        DataType::List(f) | DataType::LargeList(f) => match f.data_type() {
            DataType::Struct(fields) => {
                match fields.iter().find(|f| f.name() == "role") {
                    Some(f) if is_str(f.data_type()) => {}
                    Some(f) => bail!("{}: column `{column}`: message field `role` has type {}, expected a string", path.display(), f.data_type()),
                    None => bail!("{}: column `{column}`: messages have no `role` field", path.display()),
                }
                if !fields.iter().any(|f| f.name() == "content") {
                    bail!("{}: column `{column}`: messages have no `content` field", path.display());
                }
                check_json_type(path, column, dt)?;
                Ok(Kind::Messages)
            }
            other => bail!("{}: column `{column}` is a list of {other}; expected a list of {{role, content}} messages", path.display()),
        },
        other => bail!("{}: column `{column}` has type {other}; expected a string or a list of {{role, content}} messages", path.display()),
    }
}

/// Arrow types [`arrow_json`] converts; anything else is an error naming the column.
fn check_json_type(path: &Path, column: &str, dt: &DataType) -> Result<()> {
    match dt {
        DataType::Null | DataType::Boolean | DataType::Float16 | DataType::Float32 | DataType::Float64 => Ok(()),
        dt if dt.is_integer() || is_str(dt) => Ok(()),
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => check_json_type(path, column, f.data_type()),
        DataType::Struct(fields) => fields.iter().try_for_each(|f| check_json_type(path, column, f.data_type())),
        other => bail!("{}: column `{column}` holds {other}, which has no JSON form here", path.display()),
    }
}

/// Row `i` of an arrow array as a JSON value (lists, structs, strings, numbers, booleans).
pub fn arrow_json(arr: &dyn Array, i: usize) -> Json {
    if arr.is_null(i) {
        return Json::Null;
    }
    macro_rules! prim {
        ($t:ty) => {
            Json::from(arr.as_primitive::<$t>().value(i))
        };
    }
    match arr.data_type() {
        DataType::Utf8 => Json::from(arr.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Json::from(arr.as_string::<i64>().value(i)),
        DataType::Utf8View => Json::from(arr.as_string_view().value(i)),
        DataType::Boolean => Json::from(arr.as_boolean().value(i)),
        DataType::Int8 => prim!(Int8Type),
        DataType::Int16 => prim!(Int16Type),
        DataType::Int32 => prim!(Int32Type),
        DataType::Int64 => prim!(Int64Type),
        DataType::UInt8 => prim!(UInt8Type),
        DataType::UInt16 => prim!(UInt16Type),
        DataType::UInt32 => prim!(UInt32Type),
        DataType::UInt64 => prim!(UInt64Type),
        DataType::Float16 => Json::from(arr.as_primitive::<Float16Type>().value(i).to_f64()),
        DataType::Float32 => Json::from(arr.as_primitive::<Float32Type>().value(i) as f64),
        DataType::Float64 => prim!(Float64Type),
        DataType::List(_) => list_json(&arr.as_list::<i32>().value(i)),
        DataType::LargeList(_) => list_json(&arr.as_list::<i64>().value(i)),
        DataType::FixedSizeList(_, _) => list_json(&arr.as_fixed_size_list().value(i)),
        DataType::Struct(fields) => {
            let st = arr.as_struct();
            Json::Object(fields.iter().zip(st.columns()).map(|(f, c)| (f.name().clone(), arrow_json(c.as_ref(), i))).collect())
        }
        _ => Json::Null,
    }
}

fn list_json(items: &ArrayRef) -> Json {
    Json::Array((0..items.len()).map(|j| arrow_json(items.as_ref(), j)).collect())
}

/// A cell as a prompt/completion: a string, or a list of messages (objects with a string `role`).
pub fn field_from_json(v: &Json, column: &str) -> Result<Field, Skip> {
    match v {
        Json::Null => Err(Skip::new("null_field", format!("column `{column}` is null"))),
        Json::String(s) => Ok(Field::Text(s.clone())),
        Json::Array(items) => {
            if items.is_empty() {
                return Err(Skip::new("malformed_messages", format!("column `{column}` is an empty message list")));
            }
            let msgs = items
                .iter()
                .enumerate()
                .map(|(j, m)| match m {
                    Json::Object(o) if o.get("role").is_some_and(Json::is_string) => Ok(Message(o.clone())),
                    Json::Null => Err(Skip::new("malformed_messages", format!("column `{column}`: message {j} is null"))),
                    _ => Err(Skip::new("malformed_messages", format!("column `{column}`: message {j} has no string `role`"))),
                })
                .collect::<Result<Vec<_>, Skip>>()?;
            Ok(Field::Messages(msgs))
        }
        other => Err(Skip::new("malformed_field", format!("column `{column}` holds {other}, not a string or a message list"))),
    }
}

/// Row `i` of a string or message-list arrow column.
pub fn field_at(arr: &ArrayRef, kind: Kind, i: usize, column: &str) -> Result<Field, Skip> {
    let f = field_from_json(&arrow_json(arr.as_ref(), i), column)?;
    debug_assert_eq!(Kind::of(&f), kind, "checked by kind_of");
    Ok(f)
}

/// The formats `prepare --input` and `sample --prompts` read, by file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Parquet,
    /// One JSON object per line, optionally gzip- or zstd-compressed.
    JsonLines,
    /// A JSON array of objects (or JSON Lines in a `.json` file, as `datasets` accepts).
    Json,
    /// Arrow IPC files: a `save_to_disk` directory, or one `.arrow` file.
    Arrow,
}

fn format_of(path: &Path) -> Option<Format> {
    if path.is_dir() {
        return path.join("state.json").exists().then_some(Format::Arrow);
    }
    let name = path.file_name()?.to_string_lossy().to_lowercase();
    let name = name.strip_suffix(".gz").or(name.strip_suffix(".zst")).unwrap_or(&name).to_string();
    if name.ends_with(".parquet") {
        Some(Format::Parquet)
    } else if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
        Some(Format::JsonLines)
    } else if name.ends_with(".json") {
        Some(Format::Json)
    } else if name.ends_with(".arrow") {
        Some(Format::Arrow)
    } else {
        None
    }
}

/// Expands files, directories and globs into the inputs to read, in a stable order: a
/// `save_to_disk` directory is one input; another directory gives its parquet, JSON Lines and
/// JSON files, sorted. A pattern that matches nothing is an error.
pub fn expand_inputs(patterns: &[String]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in patterns {
        let path = Path::new(p);
        if path.is_dir() {
            if path.join("dataset_dict.json").exists() {
                let splits: Vec<String> = std::fs::read_dir(path)?
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().join("state.json").exists())
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect();
                bail!(
                    "input {p}: a `datasets` DatasetDict with splits {}; pass one split's directory, e.g. {p}/{}",
                    splits.join(", "),
                    splits.first().map_or("train", |s| s)
                );
            }
            if format_of(path).is_some() {
                out.push(path.to_path_buf());
                continue;
            }
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("cannot list {p}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && format_of(f).is_some_and(|k| k != Format::Arrow))
                .collect();
            if files.is_empty() {
                bail!("input {p}: a directory with no .parquet, .jsonl or .json files");
            }
            files.sort();
            out.extend(files);
            continue;
        }
        if path.exists() {
            if format_of(path).is_none() {
                bail!("input {p}: unknown format (expected .parquet, .jsonl[.gz|.zst], .json, .arrow or a `datasets` save_to_disk directory)");
            }
            out.push(PathBuf::from(p));
            continue;
        }
        let mut matched: Vec<PathBuf> = glob::glob(p).with_context(|| format!("bad glob `{p}`"))?.filter_map(|r| r.ok()).collect();
        if matched.is_empty() {
            bail!("input {p}: no such file (and no file matches it as a glob)");
        }
        matched.sort();
        out.extend(matched);
    }
    Ok(out)
}

/// The data files of a `save_to_disk` directory, in order (state.json's `_data_files`).
fn dataset_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let state_path = dir.join("state.json");
    let state: Json = serde_json::from_str(&std::fs::read_to_string(&state_path).with_context(|| format!("cannot read {}", state_path.display()))?)
        .with_context(|| format!("{}: invalid JSON", state_path.display()))?;
    let files = state["_data_files"].as_array().with_context(|| format!("{}: no `_data_files`", state_path.display()))?;
    files
        .iter()
        .map(|f| Ok(dir.join(f["filename"].as_str().with_context(|| format!("{}: a data file without `filename`", state_path.display()))?)))
        .collect()
}

/// Content hash of an input: the file's blake3, or for a `save_to_disk` directory the hash of
/// its state.json and data files.
pub fn input_hash(path: &Path) -> Result<String> {
    if !path.is_dir() {
        return Ok(crate::store::file_hash(path)?.blake3);
    }
    let mut h = blake3::Hasher::new();
    for f in std::iter::once(path.join("state.json")).chain(dataset_files(path)?) {
        h.update(crate::store::file_hash(&f)?.blake3.as_bytes());
    }
    Ok(h.finalize().to_hex().to_string())
}

type Batches = Box<dyn Iterator<Item = Result<RecordBatch>> + Send>;

/// Record batches of a parquet file whose footer has been checked, its schema and row count.
fn parquet_batches(path: &Path, batch_rows: usize, columns: &[String]) -> Result<(Batches, u64)> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open input {}", path.display()))?;
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).with_context(|| format!("{}: not a readable parquet file", path.display()))?;
    // Column chunks must lie inside the file: the parquet crate panics on negative offsets or
    // sizes in a damaged footer, so they are checked before any page is read.
    for (g, rg) in builder.metadata().row_groups().iter().enumerate() {
        for c in rg.columns() {
            let start = c.dictionary_page_offset().unwrap_or(c.data_page_offset());
            let len = c.compressed_size();
            if start < 0 || len < 0 || start as u64 + len as u64 > file_len {
                bail!("{}: corrupt parquet metadata (row group {g}, column `{}` lies outside the file)", path.display(), c.column_path());
            }
        }
    }
    let total = builder.metadata().file_metadata().num_rows() as u64;
    let mask = parquet::arrow::ProjectionMask::columns(builder.parquet_schema(), columns.iter().map(String::as_str));
    let mut reader = builder.with_projection(mask).with_batch_size(batch_rows).build()?;
    let path = path.to_path_buf();
    let iter = std::iter::from_fn(move || {
        // The decoder asserts on some corrupt pages instead of returning an error; a damaged
        // file must still be an error naming it, not a crash.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader.next())) {
            Err(_) => Some(Err(anyhow::anyhow!("{}: corrupt parquet data (the decoder failed)", path.display()))),
            Ok(next) => next.map(|b| b.with_context(|| format!("{}: cannot decode row group", path.display()))),
        }
    });
    Ok((Box::new(iter), total))
}

fn parquet_schema(path: &Path) -> Result<SchemaRef> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open input {}", path.display()))?;
    Ok(ParquetRecordBatchReaderBuilder::try_new(file).with_context(|| format!("{}: not a readable parquet file", path.display()))?.schema().clone())
}

/// Record batches of Arrow IPC files (stream format, as `datasets` writes them, or file format).
fn arrow_batches(files: Vec<PathBuf>) -> Result<(Batches, SchemaRef)> {
    let open = |f: &Path| -> Result<(Batches, SchemaRef)> {
        let mut file = std::fs::File::open(f).with_context(|| format!("cannot open input {}", f.display()))?;
        let mut magic = [0u8; 6];
        let is_file_format = file.read_exact(&mut magic).is_ok() && &magic == b"ARROW1";
        let file = std::fs::File::open(f)?;
        let name = f.display().to_string();
        let wrap = move |r: std::result::Result<RecordBatch, arrow_schema::ArrowError>| r.with_context(|| format!("{name}: cannot decode Arrow IPC"));
        Ok(if is_file_format {
            let r = arrow_ipc::reader::FileReader::try_new(file, None).with_context(|| format!("{}: not an Arrow IPC file", f.display()))?;
            let schema = r.schema();
            (Box::new(r.map(wrap)), schema)
        } else {
            let r = arrow_ipc::reader::StreamReader::try_new(BufReader::new(file), None)
                .with_context(|| format!("{}: not an Arrow IPC stream", f.display()))?;
            let schema = r.schema();
            (Box::new(r.map(wrap)), schema)
        })
    };
    let first = files.first().context("no data files")?;
    let (_, schema) = open(first)?;
    let iter = files.into_iter().flat_map(move |f| match open(&f) {
        Ok((b, _)) => b,
        Err(e) => Box::new(std::iter::once(Err(e))),
    });
    Ok((Box::new(iter), schema))
}

/// JSON objects of a JSON Lines or JSON file, one at a time (a JSON array is read whole).
fn json_rows(path: &Path, format: Format) -> Result<Box<dyn Iterator<Item = Result<Json>> + Send>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open input {}", path.display()))?;
    let name = path.to_string_lossy().to_lowercase();
    let raw: Box<dyn Read + Send> = if name.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else if name.ends_with(".zst") {
        Box::new(zstd::stream::read::Decoder::new(file).with_context(|| format!("{}: not zstd data", path.display()))?)
    } else {
        Box::new(file)
    };
    let mut reader = BufReader::new(raw);
    if format == Format::Json {
        // A JSON array, or JSON Lines under a .json name.
        let first = loop {
            let buf = reader.fill_buf().with_context(|| format!("cannot read {}", path.display()))?;
            match buf.iter().position(|b| !b.is_ascii_whitespace()) {
                Some(i) => break Some(buf[i]),
                None if buf.is_empty() => break None,
                None => {
                    let n = buf.len();
                    reader.consume(n);
                }
            }
        };
        if first == Some(b'[') {
            let rows: Vec<Json> = serde_json::from_reader(reader).with_context(|| format!("{}: not a JSON array of rows", path.display()))?;
            return Ok(Box::new(rows.into_iter().map(Ok)));
        }
    }
    let path = path.to_path_buf();
    let mut line_no = 0usize;
    let lines = reader.lines().filter_map(move |l| {
        line_no += 1;
        match l {
            Err(e) => Some(Err(anyhow::anyhow!("{}: line {line_no}: cannot read: {e}", path.display()))),
            Ok(l) if l.trim().is_empty() => None,
            Ok(l) => Some(serde_json::from_str::<Json>(&l).with_context(|| format!("{}: line {line_no}: invalid JSON", path.display()))),
        }
    });
    Ok(Box::new(lines))
}

/// Streams rows of chosen columns from any supported input, each cell as a JSON value.
pub struct TableReader {
    pub path: PathBuf,
    /// Rows in the input when the format says so up front (parquet).
    pub total_rows: Option<u64>,
    /// Column names, and their arrow types when the format has a schema.
    pub columns: Vec<(String, Option<DataType>)>,
    source: Source,
    batch_rows: usize,
    next_row: u64,
}

enum Source {
    /// A parquet file, until `select` (its reader reads only the selected columns).
    Unread,
    Arrow {
        batches: Batches,
        selected: Vec<String>,
    },
    Json {
        rows: std::iter::Peekable<Box<dyn Iterator<Item = Result<Json>> + Send>>,
        selected: Vec<String>,
    },
}

/// A row by its index in its input: its selected cells, or why it cannot be read.
pub type Cells = (u64, Result<Vec<Json>, Skip>);

impl TableReader {
    /// Opens an input and reads its column names (a JSON input: those of its first row).
    pub fn open(path: &Path, batch_rows: usize) -> Result<Self> {
        let format = format_of(path).with_context(|| format!("{}: unknown input format", path.display()))?;
        let (columns, source, total_rows) = match format {
            Format::Parquet => {
                (parquet_schema(path)?.fields().iter().map(|f| (f.name().clone(), Some(f.data_type().clone()))).collect(), Source::Unread, None)
            }
            Format::Arrow => {
                let files = if path.is_dir() { dataset_files(path)? } else { vec![path.to_path_buf()] };
                let (batches, schema) = arrow_batches(files)?;
                let cols = schema.fields().iter().map(|f| (f.name().clone(), Some(f.data_type().clone()))).collect();
                (cols, Source::Arrow { batches, selected: vec![] }, None)
            }
            Format::JsonLines | Format::Json => {
                let mut rows = json_rows(path, format)?.peekable();
                let cols = match rows.peek() {
                    Some(Ok(Json::Object(o))) => o.keys().map(|k| (k.clone(), None)).collect(),
                    Some(Ok(other)) => bail!("{}: row 0 is {}, not an object of columns", path.display(), short_json(other)),
                    Some(Err(e)) => bail!("{e:#}"),
                    None => vec![],
                };
                (cols, Source::Json { rows, selected: vec![] }, None)
            }
        };
        Ok(Self { path: path.to_path_buf(), total_rows, columns, source, batch_rows, next_row: 0 })
    }

    pub fn has(&self, name: &str) -> bool {
        self.columns.iter().any(|c| c.0 == name)
    }

    /// The arrow type of a column, when the input has a schema.
    pub fn arrow_type(&self, name: &str) -> Option<&DataType> {
        self.columns.iter().find(|c| c.0 == name).and_then(|c| c.1.as_ref())
    }

    /// An error naming a missing column and the ones there are.
    pub fn missing(&self, name: &str, hint: &str) -> anyhow::Error {
        let have: Vec<&str> = self.columns.iter().map(|c| c.0.as_str()).collect();
        anyhow::anyhow!("{}: no column `{name}` (columns: {}){hint}", self.path.display(), have.join(", "))
    }

    /// Reads these columns from now on (each must exist, except in JSON rows that lack it).
    pub fn select(&mut self, columns: Vec<String>) -> Result<()> {
        self.source = match std::mem::replace(&mut self.source, Source::Unread) {
            Source::Unread => {
                let (batches, total) = parquet_batches(&self.path, self.batch_rows, &columns)?;
                self.total_rows = Some(total);
                Source::Arrow { batches, selected: columns }
            }
            Source::Arrow { batches, .. } => Source::Arrow { batches, selected: columns },
            Source::Json { rows, .. } => Source::Json { rows, selected: columns },
        };
        Ok(())
    }

    /// The next batch of rows (None at the end).
    pub fn next_batch(&mut self) -> Result<Option<Vec<Cells>>> {
        let start = self.next_row;
        let out: Vec<Cells> = match &mut self.source {
            Source::Unread => bail!("TableReader: select columns first"),
            Source::Arrow { batches, selected } => {
                let Some(batch) = batches.next() else { return Ok(None) };
                let batch = batch?;
                let cols: Vec<Option<&ArrayRef>> = selected.iter().map(|n| batch.column_by_name(n)).collect();
                (0..batch.num_rows())
                    .map(|i| (start + i as u64, Ok(cols.iter().map(|c| c.map_or(Json::Null, |a| arrow_json(a.as_ref(), i))).collect())))
                    .collect()
            }
            Source::Json { rows, selected } => {
                let mut out = Vec::new();
                for row in rows.by_ref().take(self.batch_rows) {
                    let at = start + out.len() as u64;
                    out.push((
                        at,
                        match row? {
                            Json::Object(mut o) => Ok(selected.iter().map(|n| o.remove(n).unwrap_or(Json::Null)).collect()),
                            other => Err(Skip::new("malformed_row", format!("row is {}, not an object of columns", short_json(&other)))),
                        },
                    ));
                }
                if out.is_empty() {
                    return Ok(None);
                }
                out
            }
        };
        self.next_row += out.len() as u64;
        Ok(Some(out))
    }
}

fn short_json(v: &Json) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

/// A row's `tools` as TRL reads them: a list, or a JSON string of one.
fn tools_of(v: Json) -> Result<Option<Json>, Skip> {
    match v {
        Json::Null => Ok(None),
        Json::String(s) => match serde_json::from_str::<Json>(&s) {
            Ok(Json::Null) => Ok(None),
            Ok(t) => Ok(Some(t)),
            Err(e) => Err(Skip::new("malformed_tools", format!("column `{TOOLS}` is a string but not JSON: {e}"))),
        },
        t => Ok(Some(t)),
    }
}

/// A row's `chat_template_kwargs`: an object (or a JSON string of one); null is none.
fn kwargs_of(v: Json) -> Result<Option<Map<String, Json>>, Skip> {
    let parsed = match v {
        Json::String(s) => {
            serde_json::from_str(&s).map_err(|e| Skip::new("malformed_template_kwargs", format!("column `{TEMPLATE_KWARGS}`: {e}")))?
        }
        other => other,
    };
    match parsed {
        Json::Null => Ok(None),
        Json::Object(o) => Ok(Some(o)),
        other => Err(Skip::new("malformed_template_kwargs", format!("column `{TEMPLATE_KWARGS}` is {}, not an object", short_json(&other)))),
    }
}

/// Streams the rows of one preference input: paired (chosen and rejected columns) or
/// unpaired (completion and label columns, no chosen column).
pub struct PreferenceReader {
    pub table: TableReader,
    prompt: Option<String>,
    /// Chosen and rejected, or completion and label.
    first: String,
    second: String,
    pub unpaired: bool,
    tools: bool,
    kwargs: bool,
}

impl PreferenceReader {
    pub fn open(path: &Path, names: &ColumnNames, batch_rows: usize) -> Result<Self> {
        let mut table = TableReader::open(path, batch_rows)?;
        let unpaired = !table.has(&names.chosen) && table.has(&names.completion);
        let find = |name: &str, hint: &str| -> Result<String> {
            if !table.has(name) {
                return Err(table.missing(name, hint));
            }
            Ok(name.to_string())
        };
        let prompt = match &names.prompt {
            Some(p) => Some(find(p, "")?),
            None if table.has("prompt") => Some("prompt".to_string()),
            None if unpaired => {
                bail!("{}: unpaired rows (`{}`, `{}`) need a `prompt` column (or --prompt-column)", path.display(), names.completion, names.label)
            }
            None => None,
        };
        let (first, second) = if unpaired {
            (names.completion.clone(), find(&names.label, " (unpaired rows need a boolean label: true for desirable)")?)
        } else {
            let hint = format!(
                " (paired rows need `{}` and `{}`; unpaired rows `prompt`, `{}` and `{}`)",
                names.chosen, names.rejected, names.completion, names.label
            );
            (find(&names.chosen, &hint)?, find(&names.rejected, &hint)?)
        };
        let texts: Vec<&String> = if unpaired { vec![&first] } else { vec![&first, &second] };
        let typed: Vec<Kind> =
            texts.into_iter().chain(prompt.as_ref()).filter_map(|c| table.arrow_type(c).map(|t| kind_of(path, c, t))).collect::<Result<_>>()?;
        if !unpaired && typed.len() >= 2 && typed[0] != typed[1] {
            bail!("{}: `{first}` and `{second}` must both be strings or both be message lists", path.display());
        }
        if unpaired {
            if let Some(t) = table.arrow_type(&second) {
                if *t != DataType::Boolean {
                    bail!("{}: column `{second}` has type {t}; the label must be a boolean (true: desirable)", path.display());
                }
            }
        }
        let (tools, kwargs) = (table.has(TOOLS), table.has(TEMPLATE_KWARGS));
        for (on, c) in [(tools, TOOLS), (kwargs, TEMPLATE_KWARGS)] {
            if let (true, Some(t)) = (on, table.arrow_type(c)) {
                check_json_type(path, c, t)?;
            }
        }
        let mut cols = vec![first.clone(), second.clone()];
        cols.extend(prompt.clone());
        cols.extend(tools.then(|| TOOLS.to_string()));
        cols.extend(kwargs.then(|| TEMPLATE_KWARGS.to_string()));
        table.select(cols)?;
        Ok(Self { table, prompt, first, second, unpaired, tools, kwargs })
    }

    pub fn path(&self) -> &Path {
        &self.table.path
    }

    /// The next batch of rows; rows that cannot be read come back as `Err(Skip)` with their row.
    pub fn next_batch(&mut self) -> Result<Option<Vec<SourceRow>>> {
        let Some(batch) = self.table.next_batch()? else { return Ok(None) };
        Ok(Some(batch.into_iter().map(|(at, cells)| (at, cells.and_then(|c| self.row(at, c)))).collect()))
    }

    fn row(&self, source_row: u64, cells: Vec<Json>) -> Result<InputRow, Skip> {
        let mut it = cells.into_iter();
        let mut next = || it.next().unwrap_or(Json::Null);
        let (a, b) = (next(), next());
        let prompt = match &self.prompt {
            Some(p) => Some(field_from_json(&next(), p)?),
            None => None,
        };
        let tools = if self.tools { tools_of(next())? } else { None };
        let template_kwargs = if self.kwargs { kwargs_of(next())? } else { None };
        if self.unpaired {
            let completion = field_from_json(&a, &self.first)?;
            let label = match b {
                Json::Bool(l) => l,
                Json::Null => return Err(Skip::new("null_field", format!("column `{}` is null", self.second))),
                other => {
                    return Err(Skip::new("malformed_label", format!("column `{}` holds {}, not true or false", self.second, short_json(&other))))
                }
            };
            let prompt = prompt.expect("open requires a prompt column for unpaired rows");
            return Ok(InputRow::Unpaired(UnpairedRow { source_row, prompt, completion, label, tools, template_kwargs }));
        }
        let chosen = field_from_json(&a, &self.first)?;
        let rejected = field_from_json(&b, &self.second)?;
        if Kind::of(&chosen) != Kind::of(&rejected) {
            return Err(Skip::new("mixed_formats", format!("`{}` and `{}` are not both strings or both message lists", self.first, self.second)));
        }
        Ok(InputRow::Paired(RawRow { source_row, prompt, chosen, rejected, tools, template_kwargs }))
    }
}

/// An input row by its index in its file: readable, or skipped with the reason.
pub type SourceRow = (u64, Result<InputRow, Skip>);

/// A prompt to sample from, with the row's template inputs.
#[derive(Debug, Clone)]
pub struct PromptRow {
    pub prompt: Field,
    pub tools: Option<Json>,
    pub template_kwargs: Option<Map<String, Json>>,
}

/// A prompt by its row in its file: readable, or skipped with the reason.
pub type SourcePrompt = (u64, Result<PromptRow, Skip>);

/// Streams one column of strings or message lists (prompts for `sample`), a batch at a time.
pub struct PromptReader {
    table: TableReader,
    column: String,
    tools: bool,
    kwargs: bool,
}

impl PromptReader {
    pub fn open(path: &Path, column: &str, batch_rows: usize) -> Result<Self> {
        let mut table = TableReader::open(path, batch_rows)?;
        if !table.has(column) {
            return Err(table.missing(column, "; --prompt-column names it"));
        }
        if let Some(t) = table.arrow_type(column) {
            kind_of(path, column, t)?;
        }
        let (tools, kwargs) = (table.has(TOOLS), table.has(TEMPLATE_KWARGS));
        let mut cols = vec![column.to_string()];
        cols.extend(tools.then(|| TOOLS.to_string()));
        cols.extend(kwargs.then(|| TEMPLATE_KWARGS.to_string()));
        table.select(cols)?;
        Ok(Self { table, column: column.to_string(), tools, kwargs })
    }

    /// Rows in the input when its format says so up front (parquet).
    pub fn total_rows(&self) -> Option<u64> {
        self.table.total_rows
    }

    /// The next batch of (row, prompt or why it cannot be used).
    pub fn next_batch(&mut self) -> Result<Option<Vec<SourcePrompt>>> {
        let Some(batch) = self.table.next_batch()? else { return Ok(None) };
        let row = |cells: Vec<Json>| -> Result<PromptRow, Skip> {
            let mut it = cells.into_iter();
            let prompt = field_from_json(&it.next().unwrap_or(Json::Null), &self.column)?;
            let tools = if self.tools { tools_of(it.next().unwrap_or(Json::Null))? } else { None };
            let template_kwargs = if self.kwargs { kwargs_of(it.next().unwrap_or(Json::Null))? } else { None };
            Ok(PromptRow { prompt, tools, template_kwargs })
        };
        Ok(Some(batch.into_iter().map(|(at, cells)| (at, cells.and_then(row))).collect()))
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

/// Appends a message list as {role, content} structs (other keys are not written).
pub fn append_messages(b: &mut ListBuilder<StructBuilder>, msgs: &[Message]) {
    let s = b.values();
    for m in msgs {
        s.field_builder::<StringBuilder>(0).unwrap().append_value(m.role());
        s.field_builder::<StringBuilder>(1).unwrap().append_option(m.content());
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

/// Row `i` of a string column of any arrow string type (None: null or not a string).
pub fn str_at(arr: &dyn Array, i: usize) -> Option<&str> {
    if arr.is_null(i) {
        return None;
    }
    match arr.data_type() {
        DataType::Utf8 => Some(arr.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Some(arr.as_string::<i64>().value(i)),
        DataType::Utf8View => Some(arr.as_string_view().value(i)),
        _ => None,
    }
}

/// Row `i` of an integer column of any arrow integer type, if non-negative and not null.
pub fn uint_at(arr: &dyn Array, i: usize) -> Option<u64> {
    match arrow_json(arr, i) {
        Json::Number(n) if arr.data_type().is_integer() => n.as_u64(),
        _ => None,
    }
}
