//! `medgemma fetch-model` against a mock of the Hugging Face Hub's file API on loopback: the
//! listing (`/api/models/{repo}/revision/{rev}?blobs=true`), `resolve` downloads with LFS
//! redirects and HTTP ranges, gating (401 without or with a bad token, 403 without access),
//! a connection dropped mid-file, a partial file left by an earlier run, a corrupted file.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use sha1::Sha1;
use sha2::{Digest, Sha256};

const REPO: &str = "google/medgemma-test-it";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const GOOD_TOKEN: &str = "hf_GoodTokenThatMustNeverBeLogged";
const NO_ACCESS_TOKEN: &str = "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";

#[derive(Clone)]
struct MockFile {
    path: String,
    content: Vec<u8>,
    lfs: bool,
}

#[derive(Debug, Clone)]
struct Seen {
    path: String,
    range: Option<String>,
    auth: Option<String>,
}

#[derive(Default)]
struct Behaviour {
    /// The listing itself needs a token (a private repository); otherwise only downloads do
    /// (a gated one, as on the Hub).
    api_needs_token: bool,
    /// Serve this file with one byte flipped (the listing keeps the true checksums).
    corrupt: Option<String>,
    /// On the first request for this file, send this many bytes of the body, then hang up.
    drop_after: Option<(String, usize)>,
    /// Extra siblings listed (e.g. hostile paths), with a fake sha256.
    extra_listed: Vec<String>,
}

struct MockHub {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl MockHub {
    fn start(files: Vec<MockFile>, behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(Mutex::new((files, behaviour)));
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (seen, state) = (seen2.clone(), state.clone());
                std::thread::spawn(move || handle(stream, &seen, &state));
            }
        });
        Self { port, seen }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests for one file's content (resolve or CDN).
    fn file_requests(&self, file: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.path.ends_with(&format!("/{file}")) && !s.path.starts_with("/api/"))
            .collect()
    }
}

type State = Mutex<(Vec<MockFile>, Behaviour)>;

fn respond(mut s: &TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
    let _ = s.flush();
}

fn handle(stream: TcpStream, seen: &Mutex<Vec<Seen>>, state: &State) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let target = line.split_whitespace().nth(1).unwrap_or("").to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let auth = headers.get("authorization").cloned();
    let range = headers.get("range").cloned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    seen.lock().unwrap().push(Seen {
        path: path.to_owned(),
        range: range.clone(),
        auth: auth.clone(),
    });
    let mut st = state.lock().unwrap();
    let (files, behaviour) = &mut *st;

    // Gating, as the Hub answers it.
    let gate = |needed: bool| -> Option<(&'static str, String)> {
        if !needed {
            return None;
        }
        match auth.as_deref() {
            None => Some((
                "401 Unauthorized",
                format!(
                    "Access to model {REPO} is restricted. You must have access to it and be authenticated to access it. Please log in."
                ),
            )),
            Some(a) if a == format!("Bearer {GOOD_TOKEN}") => None,
            Some(a) if a == format!("Bearer {NO_ACCESS_TOKEN}") => Some((
                "403 Forbidden",
                format!(
                    "Access to model {REPO} is restricted and you are not in the authorized list. Visit https://huggingface.co/{REPO} to ask for access."
                ),
            )),
            Some(_) => Some((
                "401 Unauthorized",
                "Invalid credentials in Authorization header".into(),
            )),
        }
    };

    let api_prefix = format!("/api/models/{REPO}/revision/");
    let resolve_prefix = format!("/{REPO}/resolve/");
    if let Some(rev) = path.strip_prefix(&api_prefix) {
        if let Some((status, msg)) = gate(behaviour.api_needs_token) {
            return respond(&stream, status, &[("X-Error-Message", msg)], b"{}");
        }
        assert_eq!(
            rev, "main",
            "the listing is asked for the requested revision"
        );
        assert_eq!(
            query, "blobs=true",
            "the listing must ask for blobs (LFS sha256)"
        );
        let mut siblings: Vec<serde_json::Value> = files
            .iter()
            .map(|f| {
                if f.lfs {
                    serde_json::json!({
                        "rfilename": f.path,
                        "size": f.content.len(),
                        "blobId": "00".repeat(20),
                        "lfs": {"sha256": hex::encode(Sha256::digest(&f.content)),
                                "size": f.content.len(), "pointerSize": 134}
                    })
                } else {
                    let mut h = Sha1::new();
                    h.update(format!("blob {}\0", f.content.len()).as_bytes());
                    h.update(&f.content);
                    serde_json::json!({
                        "rfilename": f.path,
                        "size": f.content.len(),
                        "blobId": hex::encode(h.finalize()),
                    })
                }
            })
            .collect();
        for p in &behaviour.extra_listed {
            siblings.push(serde_json::json!({
                "rfilename": p, "size": 3, "blobId": "00".repeat(20),
                "lfs": {"sha256": "11".repeat(32), "size": 3, "pointerSize": 134}
            }));
        }
        let body = serde_json::json!({
            "id": REPO, "sha": COMMIT, "gated": "manual", "private": false,
            "siblings": siblings,
        });
        return respond(
            &stream,
            "200 OK",
            &[("Content-Type", "application/json".into())],
            body.to_string().as_bytes(),
        );
    }

    // `/{repo}/resolve/{commit}/{path}`: gated; LFS files redirect to the "CDN".
    let (file_path, via_resolve) = if let Some(rest) = path.strip_prefix(&resolve_prefix) {
        let Some((rev, file)) = rest.split_once('/') else {
            return respond(&stream, "404 Not Found", &[], b"");
        };
        assert_eq!(rev, COMMIT, "files are fetched from the listed commit");
        (file.to_owned(), true)
    } else if let Some(file) = path.strip_prefix("/cdn/") {
        (file.to_owned(), false)
    } else {
        return respond(&stream, "404 Not Found", &[], b"");
    };
    if via_resolve && let Some((status, msg)) = gate(true) {
        return respond(
            &stream,
            status,
            &[
                ("X-Error-Code", "GatedRepo".into()),
                ("X-Error-Message", msg),
            ],
            b"",
        );
    }
    let Some(f) = files.iter().find(|f| f.path == file_path).cloned() else {
        return respond(
            &stream,
            "404 Not Found",
            &[("X-Error-Code", "EntryNotFound".into())],
            b"",
        );
    };
    if via_resolve && f.lfs {
        return respond(
            &stream,
            "302 Found",
            &[("Location", format!("/cdn/{file_path}"))],
            b"",
        );
    }
    let mut content = f.content.clone();
    if behaviour.corrupt.as_deref() == Some(f.path.as_str()) {
        let mid = content.len() / 2;
        content[mid] ^= 0xff;
    }
    let from = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<usize>().ok());
    if let Some((p, n)) = behaviour.drop_after.clone()
        && p == f.path
    {
        behaviour.drop_after = None;
        let mut s = &stream;
        let head = format!(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            content.len()
        );
        let _ = s.write_all(head.as_bytes());
        let _ = s.write_all(&content[..n]);
        let _ = s.flush();
        let _ = stream.shutdown(std::net::Shutdown::Both);
        return;
    }
    match from {
        Some(from) if from < content.len() => {
            let total = content.len();
            respond(
                &stream,
                "206 Partial Content",
                &[(
                    "Content-Range",
                    format!("bytes {from}-{}/{total}", total - 1),
                )],
                &content[from..],
            )
        }
        Some(_) => respond(&stream, "416 Range Not Satisfiable", &[], b""),
        None => respond(&stream, "200 OK", &[], &content),
    }
}

fn pseudo_random(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

fn repo_files() -> Vec<MockFile> {
    vec![
        MockFile {
            path: "config.json".into(),
            content: br#"{"architectures": ["Gemma3ForConditionalGeneration"]}"#.to_vec(),
            lfs: false,
        },
        MockFile {
            path: "model-00001-of-00002.safetensors".into(),
            content: pseudo_random(300_000, 1),
            lfs: true,
        },
        MockFile {
            path: "model-00002-of-00002.safetensors".into(),
            content: pseudo_random(70_001, 2),
            lfs: true,
        },
        MockFile {
            path: "tokenizer/tokenizer.json".into(),
            content: pseudo_random(5_000, 3),
            lfs: true,
        },
        MockFile {
            path: "empty.txt".into(),
            content: Vec::new(),
            lfs: false,
        },
    ]
}

fn fetch(hub: &MockHub, dir: &Path, token: Option<&str>, extra: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_medgemma"));
    cmd.arg("fetch-model")
        .arg(REPO)
        .arg("--dir")
        .arg(dir)
        .arg("--endpoint")
        .arg(hub.endpoint())
        .args(extra)
        .env_remove("HF_TOKEN")
        .env_remove("HF_TOKEN_PATH")
        .env_remove("HF_ENDPOINT")
        .env_remove("MEDGEMMA_MODEL_DIR")
        .env_remove("MEDGEMMA_MODEL_REVISION")
        // Loopback must not go through a proxy from the environment.
        .env("NO_PROXY", "*")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy");
    if let Some(t) = token {
        cmd.env("HF_TOKEN", t);
    }
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_no_token_logged(o: &Output) {
    for t in [GOOD_TOKEN, NO_ACCESS_TOKEN, "hf_Bogus"] {
        assert!(!stderr(o).contains(t), "token in stderr: {}", stderr(o));
        assert!(!String::from_utf8_lossy(&o.stdout).contains(t));
    }
}

fn assert_files_match(dir: &Path) {
    for f in repo_files() {
        let got = std::fs::read(dir.join(&f.path)).unwrap_or_else(|e| panic!("{}: {e}", f.path));
        assert!(got == f.content, "{} differs from the Hub's", f.path);
    }
}

#[test]
fn downloads_everything_verified_then_skips_what_is_there() {
    let hub = MockHub::start(repo_files(), Behaviour::default());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("medgemma-4b-it");
    let out = fetch(&hub, &dir, Some(GOOD_TOKEN), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        dir.display().to_string()
    );
    assert_files_match(&dir);
    assert_no_token_logged(&out);
    assert!(stderr(&out).contains("5 files"), "{}", stderr(&out));
    // No partial files or state left; a stamp records each verified LFS file.
    assert!(!dir.join(".medgemma-fetch").exists());
    assert!(dir.join("model-00001-of-00002.safetensors.sha256").exists());
    // The token went to the endpoint (listing, resolve), and the LFS files came through the
    // redirect.
    let seen = hub.seen();
    assert!(
        seen.iter()
            .filter(|s| !s.path.starts_with("/cdn/"))
            .all(|s| s.auth.as_deref() == Some(&format!("Bearer {GOOD_TOKEN}")))
    );
    assert_eq!(
        seen.iter().filter(|s| s.path.starts_with("/cdn/")).count(),
        3
    );

    // A second run lists the repository and downloads nothing.
    let before = hub.seen().len();
    let out = fetch(&hub, &dir, Some(GOOD_TOKEN), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let again: Vec<_> = hub.seen().into_iter().skip(before).collect();
    assert_eq!(again.len(), 1, "{again:?}");
    assert!(again[0].path.starts_with("/api/models/"));
    assert_files_match(&dir);

    // A file changed on disk is detected (size kept, stamp stale) and fetched again.
    let p = dir.join("model-00002-of-00002.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[0] ^= 1;
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&p, &bytes).unwrap();
    let out = fetch(&hub, &dir, Some(GOOD_TOKEN), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not the Hub's file"),
        "{}",
        stderr(&out)
    );
    assert_files_match(&dir);
}

#[test]
fn continues_a_partial_file_with_a_range_request() {
    let files = repo_files();
    let hub = MockHub::start(files.clone(), Behaviour::default());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let name = "model-00001-of-00002.safetensors";
    let content = &files.iter().find(|f| f.path == name).unwrap().content;
    let part = dir
        .join(".medgemma-fetch")
        .join(format!("{name}.incomplete"));
    std::fs::create_dir_all(part.parent().unwrap()).unwrap();
    std::fs::write(&part, &content[..123_456]).unwrap();

    // HF_ENDPOINT instead of --endpoint.
    let out = Command::new(env!("CARGO_BIN_EXE_medgemma"))
        .args(["fetch-model", REPO, "--dir"])
        .arg(&dir)
        .env("HF_ENDPOINT", hub.endpoint())
        .env("HF_TOKEN", GOOD_TOKEN)
        .env("NO_PROXY", "*")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("resuming"), "{}", stderr(&out));
    assert_files_match(&dir);
    let reqs: Vec<_> = hub
        .file_requests(name)
        .into_iter()
        .filter(|s| s.path.starts_with("/cdn/"))
        .collect();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].range.as_deref(), Some("bytes=123456-"));
    // The files that had no partial file were asked for whole.
    for other in ["model-00002-of-00002.safetensors", "config.json"] {
        assert!(hub.file_requests(other).iter().all(|s| s.range.is_none()));
    }
}

#[test]
fn a_dropped_connection_is_continued_where_it_stopped() {
    let name = "model-00001-of-00002.safetensors";
    let hub = MockHub::start(
        repo_files(),
        Behaviour {
            drop_after: Some((name.into(), 100_000)),
            ..Behaviour::default()
        },
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = fetch(&hub, tmp.path(), Some(GOOD_TOKEN), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_files_match(tmp.path());
    let reqs: Vec<_> = hub
        .file_requests(name)
        .into_iter()
        .filter(|s| s.path.starts_with("/cdn/"))
        .collect();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0].range, None);
    assert_eq!(reqs[1].range.as_deref(), Some("bytes=100000-"));
}

#[test]
fn a_checksum_mismatch_fails_and_leaves_no_file() {
    let name = "model-00002-of-00002.safetensors";
    let hub = MockHub::start(
        repo_files(),
        Behaviour {
            corrupt: Some(name.into()),
            ..Behaviour::default()
        },
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = fetch(&hub, tmp.path(), Some(GOOD_TOKEN), &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("checksum mismatch") && err.contains(name),
        "{err}"
    );
    assert!(!tmp.path().join(name).exists());
    assert!(
        !tmp.path()
            .join(".medgemma-fetch")
            .join(format!("{name}.incomplete"))
            .exists()
    );
    // Fetched once: a fresh download that does not verify is an error at once.
    assert_eq!(
        hub.file_requests(name)
            .iter()
            .filter(|s| s.path.starts_with("/cdn/"))
            .count(),
        1
    );

    // A corrupted small (non-LFS) file is caught by its git blob id.
    let hub = MockHub::start(
        repo_files(),
        Behaviour {
            corrupt: Some("config.json".into()),
            ..Behaviour::default()
        },
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = fetch(&hub, tmp.path(), Some(GOOD_TOKEN), &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("git blob"), "{}", stderr(&out));
    assert!(!tmp.path().join("config.json").exists());
}

#[test]
fn a_bad_partial_file_is_downloaded_again_from_the_start() {
    let files = repo_files();
    let hub = MockHub::start(files.clone(), Behaviour::default());
    let tmp = tempfile::tempdir().unwrap();
    let name = "tokenizer/tokenizer.json";
    let part = tmp
        .path()
        .join(".medgemma-fetch")
        .join(format!("{name}.incomplete"));
    std::fs::create_dir_all(part.parent().unwrap()).unwrap();
    std::fs::write(&part, vec![0u8; 1000]).unwrap();
    let out = fetch(&hub, tmp.path(), Some(GOOD_TOKEN), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("from the start"), "{}", stderr(&out));
    assert_files_match(tmp.path());
}

#[test]
fn a_missing_token_is_a_clear_401() {
    let hub = MockHub::start(repo_files(), Behaviour::default());
    let tmp = tempfile::tempdir().unwrap();
    let out = fetch(&hub, tmp.path(), None, &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("401") && err.contains("HF_TOKEN is not set"),
        "{err}"
    );
    assert!(err.contains(REPO), "{err}");
    assert!(!tmp.path().join("config.json").exists());

    // A private repository answers the listing itself with 401.
    let hub = MockHub::start(
        repo_files(),
        Behaviour {
            api_needs_token: true,
            ..Behaviour::default()
        },
    );
    let out = fetch(&hub, tmp.path(), None, &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("HF_TOKEN is not set"),
        "{}",
        stderr(&out)
    );
    assert!(hub.seen().iter().all(|s| s.path.starts_with("/api/")));
}

#[test]
fn the_token_can_come_from_a_file() {
    let hub = MockHub::start(repo_files(), Behaviour::default());
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, format!("{GOOD_TOKEN}\n")).unwrap();
    let dir = tmp.path().join("model");
    let out = Command::new(env!("CARGO_BIN_EXE_medgemma"))
        .args(["fetch-model", REPO, "--endpoint"])
        .arg(hub.endpoint())
        .arg("--dir")
        .arg(&dir)
        .env_remove("HF_TOKEN")
        .env("HF_TOKEN_PATH", &token_file)
        .env("NO_PROXY", "*")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_files_match(&dir);
    assert_no_token_logged(&out);
    assert!(
        hub.seen()
            .iter()
            .any(|s| s.auth.as_deref() == Some(&format!("Bearer {GOOD_TOKEN}")))
    );
}

#[test]
fn a_wrong_token_is_a_clear_401() {
    let hub = MockHub::start(repo_files(), Behaviour::default());
    let tmp = tempfile::tempdir().unwrap();
    let out = fetch(&hub, tmp.path(), Some("hf_BogusToken"), &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("401") && err.contains("rejected HF_TOKEN"),
        "{err}"
    );
    assert_no_token_logged(&out);
}

#[test]
fn a_gated_repository_without_access_is_a_clear_403() {
    let hub = MockHub::start(repo_files(), Behaviour::default());
    let tmp = tempfile::tempdir().unwrap();
    let out = fetch(&hub, tmp.path(), Some(NO_ACCESS_TOKEN), &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("403") && err.contains("no access") && err.contains("gated"),
        "{err}"
    );
    assert!(err.contains("not in the authorized list"), "{err}");
    assert_no_token_logged(&out);
    assert!(!tmp.path().join("config.json").exists());
}

#[test]
fn include_and_exclude_select_files() {
    let hub = MockHub::start(repo_files(), Behaviour::default());
    let tmp = tempfile::tempdir().unwrap();
    let out = fetch(
        &hub,
        tmp.path(),
        Some(GOOD_TOKEN),
        &["--include", "*.json", "--exclude", "tokenizer/*"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(tmp.path().join("config.json").exists());
    assert!(!tmp.path().join("tokenizer/tokenizer.json").exists());
    assert!(!tmp.path().join("model-00001-of-00002.safetensors").exists());
}

#[test]
fn paths_outside_the_directory_are_refused() {
    for bad in [
        "../escape.bin",
        "/etc/escape.bin",
        ".medgemma-fetch/x.incomplete",
    ] {
        let hub = MockHub::start(
            repo_files(),
            Behaviour {
                extra_listed: vec![bad.into()],
                ..Behaviour::default()
            },
        );
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("model");
        let out = fetch(&hub, &dir, Some(GOOD_TOKEN), &[]);
        assert!(!out.status.success(), "{bad}");
        assert!(stderr(&out).contains("unsafe path"), "{}", stderr(&out));
        assert!(!tmp.path().join("escape.bin").exists());
        // Refused before anything was downloaded.
        assert!(hub.seen().iter().all(|s| s.path.starts_with("/api/")));
    }
}

#[test]
fn a_bad_repository_id_is_refused_before_any_request() {
    let hub = MockHub::start(repo_files(), Behaviour::default());
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_medgemma"))
        .args(["fetch-model", "../../etc", "--endpoint"])
        .arg(hub.endpoint())
        .arg("--dir")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not a model repository id"));
    assert!(hub.seen().is_empty());
}
