//! File helpers: streaming hashes, `<file>.sha256` stamps, atomic replacement.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;

use crate::AssetError;

/// A writer that hashes (sha256) and counts everything written through it.
pub(crate) struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// Flush and return (inner, bytes written, lowercase hex sha256).
    pub(crate) fn finish(mut self) -> io::Result<(W, u64, String)> {
        self.inner.flush()?;
        Ok((self.inner, self.len, hex::encode(self.hasher.finalize())))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        let done = buf.get(..n).unwrap_or(buf);
        self.hasher.update(done);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// sha256 of a whole file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, AssetError> {
    let mut f = File::open(path).map_err(|e| AssetError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| AssetError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(buf.get(..n).unwrap_or(&[]));
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Error unless `actual == expected` (hex, case-insensitive).
pub fn check_sha256(file: &str, expected: &str, actual: &str) -> Result<(), AssetError> {
    if expected.eq_ignore_ascii_case(actual) {
        Ok(())
    } else {
        Err(AssetError::Checksum {
            file: file.to_owned(),
            expected: expected.to_owned(),
            actual: actual.to_owned(),
        })
    }
}

/// Path of the stamp that records a verified hash: `<file>.sha256`.
pub(crate) fn stamp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".sha256");
    path.with_file_name(name)
}

/// `"<sha256> <size> <mtime ns>"` for the file as it is now, if its mtime is readable.
fn stamp_line(meta: &fs::Metadata, sha256: &str) -> Option<String> {
    let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some(format!("{sha256} {} {}", meta.len(), mtime.as_nanos()))
}

/// Record that `path` (as it is now) hashes to `sha256`. Best effort: a stamp only saves time.
pub fn write_stamp(path: &Path, sha256: &str) {
    let Ok(meta) = fs::metadata(path) else { return };
    let Some(line) = stamp_line(&meta, sha256) else {
        return;
    };
    if let Err(e) = fs::write(stamp_path(path), format!("{line}\n")) {
        tracing::debug!(path = %path.display(), error = %e, "could not write hash stamp");
    }
}

/// Is the existing file at `path` good to keep?
///
/// Missing or wrong size: no. Right size and `!verify`: yes. Otherwise its sha256 must match,
/// taken from a fresh `<file>.sha256` stamp (same size and mtime) or by hashing it.
pub fn existing_ok(path: &Path, size: u64, sha256: &str, verify: bool) -> Result<bool, AssetError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(AssetError::io(path, e)),
    };
    if !meta.is_file() {
        return Ok(false);
    }
    if meta.len() != size {
        tracing::warn!(
            path = %path.display(),
            expected = size,
            actual = meta.len(),
            "cached file has the wrong size; fetching it again"
        );
        return Ok(false);
    }
    if !verify {
        return Ok(true);
    }
    if let Some(want) = stamp_line(&meta, &sha256.to_ascii_lowercase())
        && fs::read_to_string(stamp_path(path)).is_ok_and(|s| s.trim() == want)
    {
        return Ok(true);
    }
    let actual = sha256_file(path)?;
    if actual.eq_ignore_ascii_case(sha256) {
        write_stamp(path, &actual);
        Ok(true)
    } else {
        tracing::warn!(
            path = %path.display(),
            expected = sha256,
            actual = %actual,
            "cached file has the wrong sha256; fetching it again"
        );
        Ok(false)
    }
}

/// A temp file next to `dest` (same directory, so the final rename is atomic).
pub(crate) fn temp_next_to(dest: &Path) -> Result<NamedTempFile, AssetError> {
    let dir = dest.parent().unwrap_or_else(|| Path::new("."));
    fs::create_dir_all(dir).map_err(|e| AssetError::io(dir, e))?;
    let prefix = format!(
        ".{}.",
        dest.file_name().unwrap_or_default().to_string_lossy()
    );
    tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| AssetError::io(dir, e))
}

/// fsync `tmp` and rename it over `dest` atomically; drops any stale stamp of `dest`.
pub(crate) fn persist(tmp: NamedTempFile, dest: &Path) -> Result<(), AssetError> {
    tmp.as_file()
        .sync_all()
        .map_err(|e| AssetError::io(tmp.path(), e))?;
    match fs::remove_file(stamp_path(dest)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(AssetError::io(stamp_path(dest), e)),
    }
    tmp.persist(dest)
        .map_err(|e| AssetError::io(dest, e.error))?;
    Ok(())
}

/// Standard base64 (with padding), for npm `sha512-…` integrity strings.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sym = |i: u32| char::from(ABC[(i & 63) as usize]);
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (b(0) << 16) | (b(1) << 8) | b(2);
        out.push(sym(n >> 18));
        out.push(sym(n >> 12));
        out.push(if chunk.len() > 1 { sym(n >> 6) } else { '=' });
        out.push(if chunk.len() > 2 { sym(n) } else { '=' });
    }
    out
}
