//! Nothing appears under a final name until it is whole: every output file is written as
//! `NAME.partial` and renamed when done. [`PartialFile`] owns those steps (create or resume,
//! fsync, rename, cleanup) for every writer in the project, and [`ensure_free`] checks the space
//! they still need, counting what resumed partial files already hold.
use super::space::{allocate, amount, free_bytes, write_error};
use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Suffix of files that are still being written; a killed job leaves only these behind.
pub const PARTIAL_SUFFIX: &str = ".partial";

fn partial_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(PARTIAL_SUFFIX);
    PathBuf::from(s)
}

/// A file written under `NAME.partial` and renamed to `NAME` by [`PartialFile::commit`].
/// Dropped without commit, a file from [`PartialFile::create`] is removed; a resumable one
/// ([`PartialFile::resume_or_allocate`]) stays for the next run to continue.
pub struct PartialFile {
    file: Option<File>,
    partial: PathBuf,
    path: PathBuf,
    resumable: bool,
}

impl PartialFile {
    pub fn create(path: &Path) -> Result<Self> {
        let partial = partial_path(path);
        let file = File::create(&partial).with_context(|| format!("cannot create {}", partial.display()))?;
        Ok(Self { file: Some(file), partial, path: path.to_path_buf(), resumable: false })
    }

    /// The partial file an earlier run left, opened read-write if `reuse` accepts it (true), else
    /// a new one of `len` bytes allocated whole (false): a file written through a memory map must
    /// have its storage before the map is written, or a full disk is SIGBUS instead of an error.
    pub fn resume_or_allocate(path: &Path, len: u64, reuse: impl FnOnce(&File) -> Result<bool>) -> Result<(Self, bool)> {
        let partial = partial_path(path);
        let me = |file| Self { file: Some(file), partial: partial.clone(), path: path.to_path_buf(), resumable: true };
        if partial.exists() {
            let file = OpenOptions::new().read(true).write(true).open(&partial).with_context(|| format!("cannot open {}", partial.display()))?;
            if reuse(&file).unwrap_or(false) {
                // A partial file from an older build may be sparse.
                allocate(&file, &partial, len)?;
                return Ok((me(file), true));
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .with_context(|| format!("cannot create {}", partial.display()))?;
        if let Err(e) = allocate(&file, &partial, len) {
            drop(file);
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        Ok((me(file), false))
    }

    /// Where the bytes are while they are written (for writers that open the path themselves,
    /// and for error messages).
    pub fn partial(&self) -> &Path {
        &self.partial
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("file is open until commit")
    }

    /// Hands the open file to a writer that needs to own it (parquet's ArrowWriter, a BufWriter).
    pub fn try_clone_file(&self) -> Result<File> {
        Ok(self.file.as_ref().expect("open").try_clone()?)
    }

    /// fsync, then rename to the final name.
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("open");
        if let Err(e) = file.sync_all() {
            self.file = Some(file);
            return Err(write_error(&self.partial, e));
        }
        drop(file);
        rename_durable(&self.partial, &self.path)
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if self.file.is_some() && !self.resumable {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// Renames and fsyncs the directory so the new name survives a crash.
pub fn rename_durable(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).with_context(|| format!("cannot rename {} to {}", from.display(), to.display()))?;
    if let Some(dir) = to.parent() {
        if let Ok(d) = File::open(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = PartialFile::create(path)?;
    let partial = f.partial().to_path_buf();
    f.file().write_all(bytes).map_err(|e| write_error(&partial, e))?;
    f.commit()
}

/// Files a stage is about to write, with their sizes: refuses before any work when their
/// filesystem has less free space than they still need (what a resumed partial file already
/// holds is not needed again).
pub fn ensure_free(files: &[(PathBuf, u64)], what: &str) -> Result<()> {
    let Some(first) = files.first() else { return Ok(()) };
    let have = |p: &Path| std::fs::metadata(partial_path(p)).or_else(|_| std::fs::metadata(p)).map(|m| m.len()).unwrap_or(0);
    let need: u64 = files.iter().map(|(p, size)| size.saturating_sub(have(p))).sum();
    let Some(free) = free_bytes(&first.0) else { return Ok(()) };
    if need > free {
        let dir = first.0.parent().unwrap_or(Path::new("."));
        anyhow::bail!(
            "{what}: not enough disk space in {}: {} more needed, {} free; \
             nothing was written: free space or raise the quota, then rerun the same command",
            dir.display(),
            amount(need),
            amount(free)
        );
    }
    Ok(())
}
