//! One writer per output directory: an advisory lock on `DIR/.lock`, held until the stage
//! ends (the OS releases it when the process dies, so a `kill -9` never leaves it stuck).
use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::Path;

pub const LOCK_FILE: &str = ".lock";

/// Held while a stage writes its directory; dropping it releases the lock.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Creates `dir` if needed and locks it, or fails naming the process that holds it.
    pub fn acquire(dir: &Path, what: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() { "another process".to_string() } else { format!("another process ({holder})") };
                bail!(
                    "{} is being written by {who}; wait for it to finish, or choose another --out \
                     (two {what} runs on one directory would corrupt it)",
                    dir.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e).with_context(|| format!("cannot lock {}", path.display())),
        }
        // Who holds it, for the message another process gets.
        file.set_len(0)?;
        file.rewind()?;
        let _ = write!(file, "pid {}, pipeline {what}", std::process::id());
        Ok(Self { _file: file })
    }
}
