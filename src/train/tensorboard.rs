//! TensorBoard event files (`--report-to tensorboard`): what `metrics.parquet` holds, as the
//! scalars `train/<metric>` and `eval/<metric>` at the same steps, and the run's settings as a
//! text summary. The format is TensorFlow's record file: each record a little-endian u64 length,
//! its masked CRC-32C, the bytes (an `Event` protobuf) and their masked CRC-32C; the few
//! protobuf messages needed are encoded here by hand (tags from tensorflow/core/util/event.proto
//! and summary.proto).
use anyhow::{Context, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// An open `events.out.tfevents.*` file.
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    varint(out, ((field << 3) | 2) as u64);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time = 1 (double), step = 2 (int64), <what> }`.
fn event(wall_time: f64, step: i64, what: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = vec![(1 << 3) | 1];
    e.extend_from_slice(&wall_time.to_le_bytes());
    varint(&mut e, 2 << 3);
    varint(&mut e, step as u64);
    what(&mut e);
    e
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl EventWriter {
    /// A new event file in `dir` (created), named as TensorFlow names them.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into());
        let t = now();
        let path = dir.join(format!("events.out.tfevents.{}.{host}.{}", t as u64, std::process::id()));
        let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = Self { out: BufWriter::new(file), path };
        // `file_version = 3`: the first record of every event file.
        w.record(&event(t, 0, |e| bytes_field(e, 3, b"brain.Event:2")))?;
        Ok(w)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.out.write_all(&rec).map_err(|e| crate::store::space::write_error(&self.path, e))
    }

    /// Scalars at `step`: one `Summary { value = 1: Value { tag = 1, simple_value = 2 } }` each.
    pub fn scalars(&mut self, step: usize, values: &[(String, f64)]) -> Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut value = Vec::new();
            bytes_field(&mut value, 1, tag.as_bytes());
            value.push((2 << 3) | 5);
            value.extend_from_slice(&(*v as f32).to_le_bytes());
            bytes_field(&mut summary, 1, &value);
        }
        self.record(&event(now(), step as i64, |e| bytes_field(e, 5, &summary)))
    }

    /// A text summary (TensorBoard's text plugin: a scalar string tensor under plugin `text`).
    pub fn text(&mut self, step: usize, tag: &str, text: &str) -> Result<()> {
        let mut plugin = Vec::new();
        bytes_field(&mut plugin, 1, b"text");
        let mut metadata = Vec::new();
        bytes_field(&mut metadata, 1, &plugin);
        // TensorProto { dtype = 1: DT_STRING (7), tensor_shape = 2: scalar, string_val = 8 }.
        let mut tensor = vec![1 << 3, 7];
        bytes_field(&mut tensor, 2, &[]);
        bytes_field(&mut tensor, 8, text.as_bytes());
        let mut value = Vec::new();
        bytes_field(&mut value, 1, tag.as_bytes());
        bytes_field(&mut value, 8, &tensor);
        bytes_field(&mut value, 9, &metadata);
        let mut summary = Vec::new();
        bytes_field(&mut summary, 1, &value);
        self.record(&event(now(), step as i64, |e| bytes_field(e, 5, &summary)))
    }

    /// Makes what was written durable (after each step, so a killed run keeps its curves).
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| crate::store::space::write_error(&self.path, e))
    }
}
