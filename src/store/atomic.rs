//! Nothing appears under a final name until it is whole: write `NAME.partial`, fsync, rename.
use super::space::write_error;
use anyhow::{Context, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Suffix of files that are still being written; a killed job leaves only these behind.
pub const PARTIAL_SUFFIX: &str = ".partial";

pub fn partial_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(PARTIAL_SUFFIX);
    PathBuf::from(s)
}

/// A file written under `NAME.partial` and renamed to `NAME` by [`PartialFile::commit`].
/// Dropped without commit, the partial file is removed.
pub struct PartialFile {
    file: Option<File>,
    partial: PathBuf,
    path: PathBuf,
}

impl PartialFile {
    pub fn create(path: &Path) -> Result<Self> {
        let partial = partial_path(path);
        let file = File::create(&partial).with_context(|| format!("cannot create {}", partial.display()))?;
        Ok(Self { file: Some(file), partial, path: path.to_path_buf() })
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("file is open until commit")
    }

    /// Hands the open file to a writer that needs to own it (parquet's ArrowWriter).
    pub fn try_clone_file(&self) -> Result<File> {
        Ok(self.file.as_ref().expect("open").try_clone()?)
    }

    pub fn commit(mut self) -> Result<()> {
        let file = self.file.as_ref().expect("open");
        file.sync_all().map_err(|e| write_error(&self.partial, e))?;
        drop(self.file.take());
        rename_durable(&self.partial, &self.path)
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if self.file.is_some() {
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
    f.file().write_all(bytes).map_err(|e| write_error(&partial_path(path), e))?;
    f.commit()
}
