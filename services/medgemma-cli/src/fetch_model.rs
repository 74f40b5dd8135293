//! `medgemma fetch-model`: download a Hugging Face model repository (e.g.
//! `google/medgemma-4b-it`) into a directory, as the chart's init container does.
//!
//! - The file list comes from the Hub API, `GET {endpoint}/api/models/{repo}/revision/{rev}
//!   ?blobs=true`: every sibling's path and size, the LFS files' sha256 (`lfs.sha256`) and the
//!   other files' git blob id (sha1 of `blob <len>\0<bytes>`). All files are then taken from the
//!   commit that call returned (`{endpoint}/{repo}/resolve/{commit}/{path}`), so a branch that
//!   moves during the download cannot mix two commits.
//! - Each file is written to `<dir>/.medgemma-fetch/<path>.incomplete`, continued with an HTTP
//!   `Range` request after a dropped connection or a restart, checked (size, then sha256 or git
//!   blob id) and only then renamed into place: a file at its final path is always complete.
//!   A verified file records a `<file>.sha256` stamp (medgemma-assets' convention), so a
//!   second run skips it without re-hashing.
//! - `HF_TOKEN`, or the file `HF_TOKEN_PATH` names (never a flag, never logged), is sent as a bearer token to the endpoint's host
//!   only; the Hub's redirects to its CDN carry signed URLs instead.

use std::fs::{self, File, OpenOptions};
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;
use sha1::Sha1;
use sha2::Digest;

/// Where partial downloads live, inside the target directory (same file system, so the final
/// rename is atomic).
const STATE_DIR: &str = ".medgemma-fetch";

/// Attempts per file when the connection drops (each continues where the last one stopped).
const ATTEMPTS: u32 = 5;

/// Flags of `medgemma fetch-model`.
#[derive(Debug, clap::Args)]
pub struct FetchModelArgs {
    /// The model repository, `owner/name` (e.g. google/medgemma-27b-text-it).
    pub repo: String,
    /// The directory to fill (created if missing); files keep their paths in the repository.
    #[arg(long, env = "MEDGEMMA_MODEL_DIR")]
    pub dir: PathBuf,
    /// Branch, tag or commit to download (a commit id pins the exact files).
    #[arg(long, env = "MEDGEMMA_MODEL_REVISION", default_value = "main")]
    pub revision: String,
    /// The Hub (or a mirror speaking its file API).
    #[arg(long, env = "HF_ENDPOINT", default_value = "https://huggingface.co")]
    pub endpoint: String,
    /// Only files whose path matches one of these globs (`*` any characters, `?` one).
    #[arg(long)]
    pub include: Vec<String>,
    /// Skip files whose path matches one of these globs.
    #[arg(long)]
    pub exclude: Vec<String>,
}

/// One entry of the Hub API's `siblings`.
#[derive(Debug, Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default, rename = "blobId")]
    blob_id: Option<String>,
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(Debug, Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

#[derive(Debug, Deserialize)]
struct RepoInfo {
    /// The commit the revision resolved to.
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

/// What a file must hash to.
#[derive(Debug, Clone)]
enum Expected {
    /// LFS: sha256 of the content.
    Sha256(String),
    /// Plain git file: sha1 of `blob <len>\0<content>`.
    GitBlob(String),
}

#[derive(Debug)]
struct Entry {
    path: String,
    size: u64,
    expected: Expected,
}

/// `medgemma fetch-model`.
pub fn run(a: FetchModelArgs) -> anyhow::Result<()> {
    let token = hf_token()?;
    check_repo_id(&a.repo)?;
    let hub = Hub::new(&a.endpoint, &a.repo, token)?;
    if a.revision.is_empty() || a.revision.contains("..") {
        bail!("--revision {:?} is not a branch, tag or commit", a.revision);
    }

    let info = hub.repo_info(&a.revision)?;
    let commit = info.sha.clone().unwrap_or_else(|| a.revision.clone());
    let mut entries = Vec::new();
    for s in info.siblings {
        let path = check_repo_path(&s.rfilename)?;
        if !a.include.is_empty() && !a.include.iter().any(|g| glob_match(g, &path)) {
            continue;
        }
        if a.exclude.iter().any(|g| glob_match(g, &path)) {
            continue;
        }
        let (size, expected) = match (s.lfs, s.blob_id, s.size) {
            (Some(lfs), _, _) => (lfs.size, Expected::Sha256(lfs.sha256.to_ascii_lowercase())),
            (None, Some(blob), Some(size)) => (size, Expected::GitBlob(blob.to_ascii_lowercase())),
            _ => bail!(
                "the Hub's file list for {} has no checksum for {path} (is {} a Hugging Face \
                 Hub endpoint? the listing must come from /api/models/.../revision/...?blobs=true)",
                a.repo,
                hub.endpoint
            ),
        };
        let (hex, len) = match &expected {
            Expected::Sha256(h) => (h, 64),
            Expected::GitBlob(h) => (h, 40),
        };
        if hex.len() != len || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("the Hub lists a malformed checksum for {path}: {hex:?}");
        }
        entries.push(Entry {
            path,
            size,
            expected,
        });
    }
    if entries.is_empty() {
        bail!(
            "nothing to download: {} at {} lists no file{}",
            a.repo,
            a.revision,
            if a.include.is_empty() && a.exclude.is_empty() {
                ""
            } else {
                " matching --include/--exclude"
            }
        );
    }

    fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    // Replicas sharing one volume (a ReadWriteMany PVC) take turns: the first downloads, the
    // others then find every file present and verified.
    let lock_path = a.dir.join(format!("{STATE_DIR}.lock"));
    let lock = File::create(&lock_path)
        .with_context(|| format!("creating the lock file {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        eprintln!(
            "fetch-model: another fetch-model is filling {}; waiting for it",
            a.dir.display()
        );
        lock.lock()
            .with_context(|| format!("locking {}", lock_path.display()))?;
    }
    let total: u64 = entries.iter().map(|e| e.size).sum();
    eprintln!(
        "fetch-model: {} at {} (commit {commit}): {} files, {} into {}",
        a.repo,
        a.revision,
        entries.len(),
        human_bytes(total),
        a.dir.display()
    );
    let started = Instant::now();
    let mut fetched = 0u64;
    for e in &entries {
        fetched += fetch_file(&hub, &commit, &a.dir, e)?;
    }
    let state = a.dir.join(STATE_DIR);
    // Only empty directories go: a partial file of another revision is kept for its next run.
    remove_empty_dirs(&state);
    eprintln!(
        "fetch-model: done: {} files verified, {} downloaded in {:.1} s",
        entries.len(),
        human_bytes(fetched),
        started.elapsed().as_secs_f64()
    );
    println!("{}", a.dir.display());
    Ok(())
}

/// The token: `HF_TOKEN`, else the file named by `HF_TOKEN_PATH` (a mounted Secret; the
/// Hugging Face client's own variable). Never printed.
fn hf_token() -> anyhow::Result<Option<String>> {
    if let Some(t) = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
    {
        return Ok(Some(t.trim().to_owned()));
    }
    match std::env::var_os("HF_TOKEN_PATH").filter(|p| !p.is_empty()) {
        Some(p) => {
            let t = fs::read_to_string(&p).with_context(|| {
                format!(
                    "reading the token file HF_TOKEN_PATH={}",
                    Path::new(&p).display()
                )
            })?;
            let t = t.trim();
            Ok((!t.is_empty()).then(|| t.to_owned()))
        }
        None => Ok(None),
    }
}

/// Downloads (or keeps) one file; returns the bytes transferred.
fn fetch_file(hub: &Hub, commit: &str, dir: &Path, e: &Entry) -> anyhow::Result<u64> {
    let dest = dir.join(&e.path);
    if already_there(&dest, e)? {
        eprintln!("  {}: present, verified", e.path);
        return Ok(0);
    }
    let part = dir.join(STATE_DIR).join(format!("{}.incomplete", e.path));
    if let Some(parent) = part.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let url = format!(
        "{}/{}/resolve/{}/{}",
        hub.endpoint,
        hub.repo,
        encode_path(commit, true),
        encode_path(&e.path, false)
    );
    // A partial file from an earlier run is continued; if the result does not verify, that
    // partial file may be what was wrong, so the file is fetched once more from the start. A
    // fresh download that does not verify is an error at once.
    let mut resumed = fs::metadata(&part).is_ok_and(|m| m.len() > 0);
    let mut transferred = 0u64;
    loop {
        transferred += download_resumable(hub, &url, &part, e)?;
        match verify(&part, e) {
            Ok(()) => break,
            Err(err) => {
                let _ = fs::remove_file(&part);
                if !resumed {
                    return Err(err);
                }
                eprintln!(
                    "  {}: {err:#}; the partial file from an earlier run was bad, downloading \
                     it again from the start",
                    e.path
                );
                resumed = false;
            }
        }
    }
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    File::open(&part)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", part.display()))?;
    fs::rename(&part, &dest)
        .with_context(|| format!("renaming {} to {}", part.display(), dest.display()))?;
    if let Expected::Sha256(sha) = &e.expected {
        medgemma_assets::files::write_stamp(&dest, sha);
    }
    Ok(transferred)
}

/// Is the final file there, complete and verified? (A wrong one is replaced by the download.)
fn already_there(dest: &Path, e: &Entry) -> anyhow::Result<bool> {
    let ok = match &e.expected {
        // The stamp (same size and mtime as when it was verified) spares hashing 50 GB again.
        Expected::Sha256(sha) => medgemma_assets::files::existing_ok(dest, e.size, sha, true)?,
        Expected::GitBlob(_) => match fs::metadata(dest) {
            Ok(m) if m.is_file() && m.len() == e.size => verify(dest, e).is_ok(),
            Ok(_) => false,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(err) => return Err(err).with_context(|| format!("reading {}", dest.display())),
        },
    };
    if !ok && fs::symlink_metadata(dest).is_ok_and(|m| m.is_file()) {
        eprintln!("  {}: present but not the Hub's file; replacing it", e.path);
    }
    Ok(ok)
}

/// The size, then the hash, of a downloaded file.
fn verify(path: &Path, e: &Entry) -> anyhow::Result<()> {
    let len = fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len != e.size {
        bail!(
            "size mismatch for {}: the Hub lists {} bytes, got {len}",
            e.path,
            e.size
        );
    }
    match &e.expected {
        Expected::Sha256(want) => {
            let got = medgemma_assets::files::sha256_file(path)?;
            medgemma_assets::files::check_sha256(&e.path, want, &got)?;
        }
        Expected::GitBlob(want) => {
            let mut h = Sha1::new();
            h.update(format!("blob {len}\0").as_bytes());
            let mut f = File::open(path).with_context(|| format!("reading {}", path.display()))?;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            let got = hex::encode(h.finalize());
            if &got != want {
                bail!(
                    "checksum mismatch for {}: the Hub lists git blob {want}, got {got}",
                    e.path
                );
            }
        }
    }
    Ok(())
}

/// Brings `part` to `e.size` bytes, continuing from its current length with `Range` requests;
/// retries dropped connections. Returns the bytes received.
fn download_resumable(hub: &Hub, url: &str, part: &Path, e: &Entry) -> anyhow::Result<u64> {
    let mut received = 0u64;
    let mut attempt = 1;
    if e.size == 0 {
        File::create(part).with_context(|| format!("creating {}", part.display()))?;
        return Ok(0);
    }
    loop {
        let have = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        if have > e.size {
            // Not a prefix of this file (another revision's partial?): start over.
            fs::remove_file(part).with_context(|| format!("removing {}", part.display()))?;
            continue;
        }
        if have == e.size {
            return Ok(received);
        }
        match hub.get_range(url, have, e.size, part, &e.path) {
            Ok(n) => {
                received += n;
                let now = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
                if now == e.size {
                    return Ok(received);
                }
                if n == 0 {
                    attempt += 1;
                }
                if attempt > ATTEMPTS {
                    bail!(
                        "{}: the server stopped sending at {now} of {} bytes, {ATTEMPTS} times",
                        e.path,
                        e.size
                    );
                }
            }
            Err(Failure::Fatal(err)) => return Err(err),
            Err(Failure::Retry(err)) if attempt >= ATTEMPTS => return Err(err),
            Err(Failure::Retry(err)) => {
                eprintln!("  {}: {err:#}; continuing (attempt {attempt})", e.path);
                std::thread::sleep(Duration::from_millis(500 * u64::from(attempt)));
                attempt += 1;
            }
        }
    }
}

enum Failure {
    /// The network or a 5xx/429: another attempt may help.
    Retry(anyhow::Error),
    /// Anything else.
    Fatal(anyhow::Error),
}

struct Hub {
    agent: ureq::Agent,
    endpoint: String,
    /// `owner/name`, checked by [`check_repo_id`].
    repo: String,
    token: Option<String>,
    progress: Progress,
}

impl Hub {
    fn new(endpoint: &str, repo: &str, token: Option<String>) -> anyhow::Result<Self> {
        let endpoint = endpoint.trim_end_matches('/').to_owned();
        if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
            bail!("--endpoint / HF_ENDPOINT must be an http(s):// URL, got {endpoint:?}");
        }
        Ok(Self {
            agent: medgemma_assets::http_agent(concat!(
                "medgemma-fetch-model/",
                env!("CARGO_PKG_VERSION")
            )),
            endpoint,
            repo: repo.to_owned(),
            token,
            progress: Progress::new(),
        })
    }

    /// A GET with the token (kept on same-host redirects only) and optional extra header.
    fn get(
        &self,
        url: &str,
        range: Option<String>,
    ) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let mut req = self.agent.get(url);
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        if let Some(r) = range {
            req = req.header("Range", r);
        }
        req.config()
            .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
            .build()
            .call()
    }

    fn repo_info(&self, revision: &str) -> anyhow::Result<RepoInfo> {
        let url = format!(
            "{}/api/models/{}/revision/{}?blobs=true",
            self.endpoint,
            self.repo,
            encode_path(revision, true)
        );
        let mut last = None;
        for attempt in 1..=ATTEMPTS {
            match self.get(&url, None) {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    if status == 200 {
                        let body = resp
                            .into_body()
                            .with_config()
                            .limit(64 << 20)
                            .read_to_string()
                            .with_context(|| format!("reading the file list from {url}"))?;
                        return serde_json::from_str(&body).with_context(|| {
                            format!("the file list from {url} is not the Hub's JSON")
                        });
                    }
                    let err = self.status_error(status, &resp, &url);
                    if status >= 500 || status == 429 {
                        last = Some(err);
                    } else {
                        return Err(err);
                    }
                }
                Err(e) => last = Some(network_error(&url, e)),
            }
            if attempt < ATTEMPTS {
                std::thread::sleep(Duration::from_millis(500 * u64::from(attempt)));
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no answer from {url}")))
    }

    /// Appends bytes `from..` of `url` to `part`. Returns how many arrived.
    fn get_range(
        &self,
        url: &str,
        from: u64,
        size: u64,
        part: &Path,
        name: &str,
    ) -> Result<u64, Failure> {
        let range = (from > 0).then(|| format!("bytes={from}-"));
        let resp = self
            .get(url, range)
            .map_err(|e| Failure::Retry(network_error(url, e)))?;
        let status = resp.status().as_u16();
        let append = match status {
            206 => {
                let start = resp
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if start != Some(from) {
                    return Err(Failure::Fatal(anyhow::anyhow!(
                        "{url}: asked for bytes from {from}, the server sent a range starting at \
                         {start:?}"
                    )));
                }
                true
            }
            // The server ignored the range (or none was asked): start from zero.
            200 => false,
            416 => {
                // Our partial file is not a prefix the server knows: start over.
                let _ = fs::remove_file(part);
                return Ok(0);
            }
            s => {
                let err = self.status_error(s, &resp, url);
                return Err(if s >= 500 || s == 429 {
                    Failure::Retry(err)
                } else {
                    Failure::Fatal(err)
                });
            }
        };
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(part)
            .map_err(|e| {
                Failure::Fatal(anyhow::Error::new(e).context(format!("opening {}", part.display())))
            })?;
        let start = if append { from } else { 0 };
        let bar = self.progress.start(name, start, size);
        let mut reader = resp.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 20];
        let mut n_total = 0u64;
        let result = loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    break Err(Failure::Retry(
                        anyhow::Error::new(e).context(format!("reading {url}")),
                    ));
                }
            };
            if let Err(e) = file.write_all(&buf[..n]) {
                break Err(Failure::Fatal(
                    anyhow::Error::new(e).context(format!("writing {}", part.display())),
                ));
            }
            n_total += n as u64;
            if start + n_total > size {
                break Err(Failure::Fatal(anyhow::anyhow!(
                    "{url}: the server sent more than the {size} bytes the Hub lists"
                )));
            }
            bar.set(start + n_total);
        };
        bar.finish(start + n_total);
        file.flush().map_err(|e| {
            Failure::Fatal(anyhow::Error::new(e).context(format!("writing {}", part.display())))
        })?;
        result.map(|()| n_total)
    }

    /// A clear error for an HTTP status, with the Hub's own reason when it sent one. Never
    /// includes the token.
    fn status_error(
        &self,
        status: u16,
        resp: &ureq::http::Response<ureq::Body>,
        url: &str,
    ) -> anyhow::Error {
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|s| {
                    s.chars()
                        .filter(|c| !c.is_control())
                        .take(300)
                        .collect::<String>()
                })
        };
        let hub_says = header("x-error-message")
            .map(|m| format!(" (the Hub says: {m})"))
            .unwrap_or_default();
        let code = header("x-error-code").unwrap_or_default();
        let what = &self.repo;
        match status {
            401 if self.token.is_none() => anyhow::anyhow!(
                "HTTP 401 Unauthorized from {url}: HF_TOKEN is not set, and {what} is gated or \
                 private (or does not exist). Set HF_TOKEN (or HF_TOKEN_PATH, a file holding \
                 it) to a Hugging Face access token (read scope) of an account that has \
                 accepted the model's terms{hub_says}"
            ),
            401 => anyhow::anyhow!(
                "HTTP 401 Unauthorized from {url}: the Hub rejected HF_TOKEN (invalid, expired \
                 or revoked token), or {what} does not exist. Check the token at \
                 https://huggingface.co/settings/tokens{hub_says}"
            ),
            403 => anyhow::anyhow!(
                "HTTP 403 Forbidden from {url}: HF_TOKEN is valid but has no access to {what}{}. \
                 Open the model page on the Hub with the token's account and accept its terms \
                 (MedGemma models are gated: access is granted per account), or use a \
                 fine-grained token allowed to read gated repositories{hub_says}",
                if code == "GatedRepo" {
                    " (a gated repository)"
                } else {
                    ""
                }
            ),
            404 => anyhow::anyhow!(
                "HTTP 404 Not Found from {url}: no such repository, revision or file{hub_says}"
            ),
            s => anyhow::anyhow!("HTTP {s} from {url}{hub_says}"),
        }
    }
}

fn network_error(url: &str, e: ureq::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot reach {url}: {e} (offline? behind a proxy? set HTTPS_PROXY, or HF_ENDPOINT / \
         --endpoint to a reachable mirror)"
    )
}

/// Progress on stderr: a bar on a terminal, else a line per file every few seconds (container
/// logs).
struct Progress {
    tty: bool,
}

struct FileProgress {
    bar: Option<ProgressBar>,
    name: String,
    size: u64,
    last_line: std::cell::Cell<Instant>,
}

impl Progress {
    fn new() -> Self {
        Self {
            tty: io::stderr().is_terminal(),
        }
    }

    fn start(&self, name: &str, at: u64, size: u64) -> FileProgress {
        let bar = self.tty.then(|| {
            let bar = ProgressBar::with_draw_target(Some(size), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "  {msg:40!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(name.to_owned());
            bar.set_position(at);
            bar
        });
        if bar.is_none() {
            if at > 0 {
                eprintln!(
                    "  {name}: resuming at {} of {}",
                    human_bytes(at),
                    human_bytes(size)
                );
            } else {
                eprintln!("  {name}: downloading {}", human_bytes(size));
            }
        }
        FileProgress {
            bar,
            name: name.to_owned(),
            size,
            last_line: std::cell::Cell::new(Instant::now()),
        }
    }
}

impl FileProgress {
    fn set(&self, pos: u64) {
        match &self.bar {
            Some(b) => b.set_position(pos),
            None if self.last_line.get().elapsed() >= Duration::from_secs(5) => {
                self.last_line.set(Instant::now());
                eprintln!(
                    "  {}: {} of {} ({:.0}%)",
                    self.name,
                    human_bytes(pos),
                    human_bytes(self.size),
                    100.0 * pos as f64 / self.size.max(1) as f64
                );
            }
            None => {}
        }
    }

    fn finish(&self, pos: u64) {
        match &self.bar {
            Some(b) => b.finish_and_clear(),
            None if pos == self.size => {
                eprintln!("  {}: {} received", self.name, human_bytes(pos));
            }
            None => {}
        }
    }
}

fn human_bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} kB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

/// `owner/name` with the Hub's characters only (it goes into URLs as is).
fn check_repo_id(repo: &str) -> anyhow::Result<()> {
    let ok_part = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    match repo.split_once('/') {
        Some((owner, name)) if ok_part(owner) && ok_part(name) => Ok(()),
        _ => bail!("{repo:?} is not a model repository id like google/medgemma-4b-it"),
    }
}

/// A repository path that stays inside the target directory (a hostile or broken endpoint
/// must not write elsewhere) and does not reach into our state directory.
fn check_repo_path(p: &str) -> anyhow::Result<String> {
    let path = Path::new(p);
    let normal = !p.is_empty()
        && !p.contains('\\')
        && !p.contains('\0')
        && path.components().all(|c| matches!(c, Component::Normal(_)));
    let first = path.components().next().and_then(|c| match c {
        Component::Normal(s) => s.to_str(),
        _ => None,
    });
    if !normal || first == Some(STATE_DIR) {
        bail!("the Hub's file list holds an unsafe path {p:?}; refusing to write it");
    }
    Ok(p.to_owned())
}

/// Percent-encodes a path for a URL; `/` too when `all` (a revision like `refs/pr/1` is one
/// segment to the Hub).
fn encode_path(s: &str, all: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (!all && b == b'/')
        {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Glob match: `*` any run of characters (`/` included), `?` one character.
fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Removes `dir` and the directories below it that are empty (best effort).
fn remove_empty_dirs(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}
