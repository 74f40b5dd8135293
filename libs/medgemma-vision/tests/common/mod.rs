//! Shared helpers: the reference values of tools/fixtures/vision_reference.py and the test
//! files, committed under tests/data or read from pydicom-data's directory.

#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;
use sha2::{Digest, Sha256};

/// One 8-bit level after normalisation to [-1, 1]: 1 / 127.5 (plus float slack).
pub const ONE_LEVEL: f32 = 1.0 / 127.5 + 1e-6;

pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("data")
}

pub fn reference() -> Value {
    let text = std::fs::read_to_string(data_dir().join("reference.json"))
        .expect("tests/data/reference.json (run tools/fixtures/vision_reference.py)");
    serde_json::from_str(&text).expect("reference.json is JSON")
}

/// The reference entries of one kind ("png", "jpeg", "dicom").
pub fn entries(kind: &str) -> Vec<Value> {
    reference()["images"]
        .as_array()
        .expect("images")
        .iter()
        .filter(|e| e["kind"] == kind)
        .cloned()
        .collect()
}

pub fn entry(key: &str) -> Value {
    reference()["images"]
        .as_array()
        .expect("images")
        .iter()
        .find(|e| e["key"] == key)
        .cloned()
        .unwrap_or_else(|| panic!("no reference entry {key}"))
}

pub fn str_of<'a>(e: &'a Value, field: &str) -> &'a str {
    e[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {}", e["key"]))
}

pub fn u32_of(e: &Value, field: &str) -> u32 {
    e[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {}", e["key"])) as u32
}

/// A committed file of the references: in tests/data, or in the repository's fixtures/images
/// for the ones other crates use too (the `medgemma up` demo DICOM).
pub fn blob(name: &str) -> Vec<u8> {
    let shared = medgemma_test_support::fixture("images").join(name);
    let path = if shared.exists() {
        shared
    } else {
        data_dir().join(name)
    };
    medgemma_test_support::read(path)
}

pub fn blob_f32(name: &str) -> Vec<f32> {
    blob(name)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Directories that may hold pydicom-data's files: $MEDGEMMA_PYDICOM_DATA; the demo asset
/// cache (`$MEDGEMMA_CACHE_DIR` or `~/.cache/medgemma`, then `demo/pydicom-data`); else
/// `data_store/data` in the site-packages of $VIRTUAL_ENV, ~/.local, /usr/local and /usr.
pub fn pydicom_data_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("MEDGEMMA_PYDICOM_DATA").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(dir));
    }
    let cache = std::env::var_os("MEDGEMMA_CACHE_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("medgemma"))
        });
    if let Some(cache) = cache {
        dirs.push(cache.join("demo").join("pydicom-data"));
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        roots.push(PathBuf::from(venv));
    }
    if let Some(home) = std::env::var_os("HOME") {
        roots.push(PathBuf::from(home).join(".local"));
    }
    roots.push("/usr/local".into());
    roots.push("/usr".into());
    for root in roots {
        let Ok(libs) = std::fs::read_dir(root.join("lib")) else {
            continue;
        };
        for lib in libs.flatten() {
            for packages in ["site-packages", "dist-packages"] {
                let dir = lib.path().join(packages).join("data_store").join("data");
                if dir.is_dir() {
                    dirs.push(dir);
                }
            }
        }
    }
    dirs
}

pub fn require_assets() -> bool {
    std::env::var("MEDGEMMA_REQUIRE_ASSETS").is_ok_and(|v| v == "1")
}

/// The bytes of a DICOM test file: committed under tests/data, else from pydicom-data. `None`
/// (with a note) when it is not installed, unless MEDGEMMA_REQUIRE_ASSETS=1.
pub fn dicom_bytes(e: &Value) -> Option<Vec<u8>> {
    let file = str_of(e, "file");
    if e["committed"].as_bool() == Some(true) {
        return Some(blob(file));
    }
    for dir in pydicom_data_dirs() {
        if let Ok(bytes) = std::fs::read(dir.join(file)) {
            assert_eq!(
                sha256_hex(&bytes),
                str_of(e, "file_sha256"),
                "{} is not the file the references were made from",
                dir.join(file).display()
            );
            return Some(bytes);
        }
    }
    assert!(
        !require_assets(),
        "{file} not found: pip install pydicom-data and set MEDGEMMA_PYDICOM_DATA to its \
         data_store/data directory"
    );
    eprintln!(
        "SKIP {file}: not committed and pydicom-data not found (pip install pydicom-data; \
         set MEDGEMMA_PYDICOM_DATA)"
    );
    None
}

/// Largest absolute difference and the number of differing elements.
pub fn diff_u8(a: &[u8], b: &[u8]) -> (u8, usize) {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).fold((0, 0), |(max, n), (&x, &y)| {
        let d = x.abs_diff(y);
        (max.max(d), n + usize::from(d != 0))
    })
}

#[allow(unused_imports)] // each test binary uses some of them
pub use medgemma_test_support::max_abs_diff_f32 as max_diff_f32;

#[allow(unused_imports)] // each test binary uses some of them
pub use medgemma_test_support::max_abs_diff;
