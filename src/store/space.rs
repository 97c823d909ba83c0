//! Disk space, below every writer: free bytes, allocation before mapping (a write through a
//! memory map to pages the filesystem cannot back kills the process with SIGBUS, so mapped files
//! are allocated whole first and a full disk is an error at allocation), and the message every
//! write error from a full disk or quota carries: the file, the bytes needed and the bytes free.
use anyhow::{anyhow, Result};
use std::fs::File;
use std::io;
use std::path::Path;

/// Bytes an unprivileged writer may still use on the filesystem holding `path` (or its nearest
/// existing ancestor); None where the system cannot say.
pub(super) fn free_bytes(path: &Path) -> Option<u64> {
    let mut p = path;
    while !p.exists() {
        p = p.parent()?;
    }
    let p = if p.as_os_str().is_empty() { Path::new(".") } else { p };
    statvfs_free(p)
}

#[cfg(unix)]
fn statvfs_free(p: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and an out-parameter of the right type.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

#[cfg(not(unix))]
fn statvfs_free(_: &Path) -> Option<u64> {
    None
}

/// `1.5 MB`-style sizes for messages.
fn human(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..=9_999 => format!("{bytes} bytes"),
        10_000..=999_999 => format!("{:.1} kB", b / 1e3),
        1_000_000..=999_999_999 => format!("{:.1} MB", b / 1e6),
        _ => format!("{:.2} GB", b / 1e9),
    }
}

/// `48.4 kB (48384 bytes)`; small amounts once.
pub(super) fn amount(bytes: u64) -> String {
    if bytes < 10_000 {
        human(bytes)
    } else {
        format!("{} ({bytes} bytes)", human(bytes))
    }
}

fn free_text(path: &Path) -> String {
    free_bytes(path).map(|f| format!("{} free", amount(f))).unwrap_or_else(|| "free space unknown".into())
}

/// The error for `path` not getting `need` more bytes.
fn no_space(path: &Path, need: Option<u64>, cause: &str) -> anyhow::Error {
    let need = need.map(|n| format!("needs {}, ", amount(n))).unwrap_or_default();
    anyhow!(
        "no space for {}: {need}{} on its filesystem ({cause}); free space or raise the quota, then rerun the same command",
        path.display(),
        free_text(path)
    )
}

/// Whether an error chain holds a full-disk or exceeded-quota failure.
fn is_no_space(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>().and_then(io::Error::raw_os_error).is_some_and(|code| code == libc::ENOSPC || code == libc::EDQUOT) || {
            // Writers that wrap the io::Error without exposing it as a source (parquet's).
            let s = c.to_string();
            s.contains("No space left on device") || s.contains("Disk quota exceeded")
        }
    })
}

/// A write error on `path`: a full disk or quota becomes [`no_space`]; others get the path.
pub fn write_error(path: &Path, e: impl Into<anyhow::Error>) -> anyhow::Error {
    let e = e.into();
    if is_no_space(&e) {
        no_space(path, None, &e.to_string())
    } else {
        e.context(format!("cannot write {}", path.display()))
    }
}

/// Gives `file` (at `path`) `len` bytes of real storage, so writes through a map of it cannot
/// fault: posix_fallocate, or zeros written where the filesystem lacks it.
pub fn allocate(file: &File, path: &Path, len: u64) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: a valid open descriptor.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
        match rc {
            0 => return Ok(()),
            libc::ENOSPC | libc::EDQUOT => {
                let _ = file.set_len(0);
                return Err(no_space(path, Some(len), &io::Error::from_raw_os_error(rc).to_string()));
            }
            libc::EOPNOTSUPP | libc::EINVAL => {}
            _ => return Err(anyhow!("cannot allocate {} bytes for {}: {}", len, path.display(), io::Error::from_raw_os_error(rc))),
        }
    }
    write_zeros(file, path, len)
}

fn write_zeros(file: &File, path: &Path, len: u64) -> Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = file;
    let start = f.metadata()?.len().min(len);
    f.seek(SeekFrom::Start(start))?;
    let zeros = vec![0u8; 1 << 20];
    let mut at = start;
    while at < len {
        let n = (len - at).min(zeros.len() as u64) as usize;
        if let Err(e) = f.write_all(&zeros[..n]) {
            let _ = file.set_len(0);
            let e = anyhow::Error::from(e);
            return Err(if is_no_space(&e) { no_space(path, Some(len), &e.to_string()) } else { e });
        }
        at += n as u64;
    }
    f.sync_data().map_err(|e| write_error(path, e))?;
    Ok(())
}
