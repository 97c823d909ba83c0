//! Memory-mapped columns: one file per column, a 64-byte header then little-endian values,
//! readable with `numpy.memmap(path, dtype, mode="r", offset=64)`.
//!
//! Header: magic `DPOCOLMN` (8 bytes), format version u32, dtype code u32, value count u64,
//! fingerprint (32 bytes: the owning stage's fingerprint, hex-decoded), 8 reserved zero bytes.
use super::atomic::PartialFile;
use super::space::write_error;
use anyhow::{bail, Context, Result};
use memmap2::{Mmap, MmapMut};
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::marker::PhantomData;
use std::path::Path;

#[cfg(not(target_endian = "little"))]
compile_error!("column files are little-endian and mapped directly");

pub const MAGIC: &[u8; 8] = b"DPOCOLMN";
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32 = 1,
    U32 = 2,
    U64 = 3,
}

impl Dtype {
    fn size(self) -> u64 {
        match self {
            Dtype::F32 | Dtype::U32 => 4,
            Dtype::U64 => 8,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::U32 => "u32",
            Dtype::U64 => "u64",
        }
    }
}

/// Plain values a column can hold.
pub trait Pod: bytemuck::Pod {
    const DTYPE: Dtype;
}
impl Pod for f32 {
    const DTYPE: Dtype = Dtype::F32;
}
impl Pod for u32 {
    const DTYPE: Dtype = Dtype::U32;
}
impl Pod for u64 {
    const DTYPE: Dtype = Dtype::U64;
}

fn fingerprint_bytes(fp: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = fp.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()).unwrap_or(0);
    }
    out
}

fn header(dtype: Dtype, count: u64, fingerprint: &str) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(dtype as u32).to_le_bytes());
    h[16..24].copy_from_slice(&count.to_le_bytes());
    h[24..56].copy_from_slice(&fingerprint_bytes(fingerprint));
    h
}

/// Checks a header against what the reader expects; returns the value count.
fn check_header(path: &Path, bytes: &[u8], dtype: Dtype, fingerprint: Option<&str>) -> Result<u64> {
    let p = path.display();
    if bytes.len() < HEADER_BYTES || &bytes[..8] != MAGIC {
        bail!("{p}: not a dpo-pipeline column file (bad magic or shorter than its header)");
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    if version != FORMAT_VERSION {
        bail!("{p}: column format version {version}, this build reads {FORMAT_VERSION}");
    }
    let code = u32::from_le_bytes(bytes[12..16].try_into().unwrap());
    if code != dtype as u32 {
        bail!("{p}: dtype code {code}, expected {} ({})", dtype as u32, dtype.name());
    }
    let count = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    let want_len = HEADER_BYTES as u64 + count * dtype.size();
    if bytes.len() as u64 != want_len {
        bail!("{p}: truncated or corrupt: header says {count} values ({want_len} bytes), file has {} bytes", bytes.len());
    }
    if let Some(fp) = fingerprint {
        if bytes[24..56] != fingerprint_bytes(fp) {
            let got: String = bytes[24..56].iter().map(|b| format!("{b:02x}")).collect();
            bail!("{p}: fingerprint {} does not match the manifest's {}", super::short(&got), super::short(fp));
        }
    }
    Ok(count)
}

/// A read-only mapped column.
pub struct Column<T: Pod> {
    map: Mmap,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Pod> Column<T> {
    /// Maps `path`, checking header, length and (if given) the owning stage's fingerprint.
    pub fn open(path: &Path, fingerprint: Option<&str>) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open column {}", path.display()))?;
        // SAFETY: the file is only ever written under a `.partial` name and renamed when whole,
        // so a mapped final file does not change under us.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let len = check_header(path, &map, T::DTYPE, fingerprint)? as usize;
        Ok(Self { map, len, _t: PhantomData })
    }

    pub fn as_slice(&self) -> &[T] {
        bytemuck::cast_slice(&self.map[HEADER_BYTES..])
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Streams values to `NAME.partial`; `finish` writes the final header and renames.
/// Dropped unfinished (an error on the way), the partial file is removed.
pub struct ColumnWriter<T: Pod> {
    out: BufWriter<File>,
    file: PartialFile,
    count: u64,
    _t: PhantomData<T>,
}

impl<T: Pod> ColumnWriter<T> {
    pub fn create(path: &Path) -> Result<Self> {
        let file = PartialFile::create(path)?;
        let mut out = BufWriter::with_capacity(1 << 20, file.try_clone_file()?);
        out.write_all(&[0u8; HEADER_BYTES]).map_err(|e| write_error(file.partial(), e))?;
        Ok(Self { out, file, count: 0, _t: PhantomData })
    }

    pub fn push(&mut self, values: &[T]) -> Result<()> {
        self.out.write_all(bytemuck::cast_slice(values)).map_err(|e| write_error(self.file.partial(), e))?;
        self.count += values.len() as u64;
        Ok(())
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn finish(self, fingerprint: &str) -> Result<()> {
        let Self { out, mut file, count, .. } = self;
        let header = header(T::DTYPE, count, fingerprint);
        let done = (|| -> std::io::Result<()> {
            out.into_inner().map_err(|e| e.into_error())?;
            let f = file.file();
            f.seek(SeekFrom::Start(0))?;
            f.write_all(&header)
        })();
        done.map_err(|e| write_error(file.partial(), e))?;
        file.commit()
    }
}

/// A column of known length filled in any order (results arrive in batch order, not row order).
/// Lives under `NAME.partial` until `finish`; reopening an existing partial file resumes it.
pub struct ColumnFill<T: Pod> {
    map: MmapMut,
    file: PartialFile,
    _t: PhantomData<T>,
}

impl<T: Pod> ColumnFill<T> {
    /// Opens `NAME.partial` if it exists with the same length and fingerprint, else creates it
    /// filled with `fill`. Returns whether an existing partial file was reused.
    pub fn open_or_create(path: &Path, len: usize, fingerprint: &str, fill: T) -> Result<(Self, bool)> {
        let bytes = (HEADER_BYTES + len * std::mem::size_of::<T>()) as u64;
        let same = |f: &File| -> Result<bool> {
            // SAFETY: a read-only map of our own partial file, dropped before it is written.
            let map = unsafe { Mmap::map(f) }?;
            Ok(check_header(path, &map, T::DTYPE, Some(fingerprint)).ok() == Some(len as u64))
        };
        let (file, resumed) = PartialFile::resume_or_allocate(path, bytes, same)?;
        // SAFETY: we own the partial file; no one else maps it while this job runs.
        let map = unsafe { MmapMut::map_mut(&file.try_clone_file()?) }?;
        let mut me = Self { map, file, _t: PhantomData };
        if !resumed {
            me.map[..HEADER_BYTES].copy_from_slice(&header(T::DTYPE, len as u64, fingerprint));
            me.values_mut().fill(fill);
        }
        Ok((me, resumed))
    }

    pub fn values(&self) -> &[T] {
        bytemuck::cast_slice(&self.map[HEADER_BYTES..])
    }

    pub fn values_mut(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(&mut self.map[HEADER_BYTES..])
    }

    /// Makes written values durable (call before recording progress).
    pub fn flush(&self) -> Result<()> {
        self.map.flush().map_err(|e| write_error(self.file.partial(), e))
    }

    pub fn finish(self) -> Result<()> {
        self.flush()?;
        drop(self.map);
        self.file.commit()
    }
}
