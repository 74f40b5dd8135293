//! The demo-asset gating, each case in a child process with its own environment.

use std::fs::File;

use medgemma_assets::DemoPaths;
use medgemma_test_support::{child, demo_assets};

/// The child's part: ask for the demo assets and report.
fn ask() {
    println!("\nRESULT {:?}", demo_assets().map(|p| p.gguf));
}

#[test]
fn demo_assets_skip_or_panic_when_missing() {
    const NAME: &str = "demo_assets_skip_or_panic_when_missing";
    if child::role(NAME, ask) {
        return;
    }
    let empty = tempfile::tempdir().unwrap();
    let dir = empty.path().to_str().unwrap();

    let out = child::run(NAME, &[("MEDGEMMA_CACHE_DIR", dir)]);
    let all = child::text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("RESULT None"), "{all}");
    assert!(
        all.contains("skipping") && all.contains("medgemma fetch-demo"),
        "{all}"
    );

    let out = child::run(
        NAME,
        &[
            ("MEDGEMMA_CACHE_DIR", dir),
            ("MEDGEMMA_REQUIRE_ASSETS", "1"),
        ],
    );
    let all = child::text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("MEDGEMMA_REQUIRE_ASSETS=1"), "{all}");
    assert!(all.contains("medgemma fetch-demo"), "{all}");

    // Present (zero-length stand-ins are enough: no checksum here).
    let p = DemoPaths::under(empty.path());
    std::fs::create_dir_all(&p.tokenizer_dir).unwrap();
    for f in [&p.gguf, &p.tokenizer_json, &p.tokenizer_config] {
        File::create(f).unwrap();
    }
    let out = child::run(
        NAME,
        &[
            ("MEDGEMMA_CACHE_DIR", dir),
            ("MEDGEMMA_REQUIRE_ASSETS", "1"),
        ],
    );
    let all = child::text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains(&format!("RESULT Some({:?})", p.gguf)), "{all}");
}
