//! Faults, load and rollouts against the suite as separate processes (the `medgemma-tokenizer`,
//! `medgemma-generator` and `medgemma-gateway` binaries, built by `cargo build --bins`), each
//! step bounded in time:
//!
//! - load: 64 concurrent streams through the gateway, each answered or refused with
//!   RESOURCE_EXHAUSTED, none lost; then a soak of mixed tasks for `MEDGEMMA_SOAK_SECS`
//!   (default 120; `scripts/soak.sh` runs longer) with RSS, file descriptors and threads of
//!   every process flat after warm-up;
//! - a rolling restart: SIGTERM one of two generator replicas while streams run: every stream
//!   finishes, new requests go to the other replica;
//! - a replica killed (SIGKILL) during decode: the caller gets an error status within a second
//!   (never OK with partial text); one killed during prefill: a clear answer, retried or not;
//!   the other replica keeps serving;
//! - the tokenizer killed: UNAVAILABLE, the gateway's health NOT_SERVING; restarted on its
//!   port: SERVING and answering again;
//! - a replica that accepts connections and never answers: the deadline holds.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use medgemma_proto::gateway::v1 as pb;
use medgemma_proto::generation::v1 as gen_pb;
use medgemma_rpc::client::ServingStatus;
use pb::clinical_tasks_client::ClinicalTasksClient;
use procs::Proc;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

mod procs;

/// The demo assets' paths as strings, or `None` (the test is skipped) without them.
struct Assets {
    gguf: String,
    tokenizer: String,
}

fn assets() -> Option<Assets> {
    let p = medgemma_test_support::demo_assets()?;
    Some(Assets {
        gguf: p.gguf.to_str()?.to_owned(),
        tokenizer: p.tokenizer_json.to_str()?.to_owned(),
    })
}

fn tokenizer(a: &Assets, listen: &str) -> Proc {
    procs::spawn(
        "medgemma-tokenizer",
        &["--listen", listen, "--tokenizer", &a.tokenizer],
        &[],
    )
}

fn generator(a: &Assets, listen: &str) -> Proc {
    procs::spawn(
        "medgemma-generator",
        &[
            "--listen",
            listen,
            "--model",
            &a.gguf,
            "--tokenizer",
            &a.tokenizer,
            "--max-running",
            "16",
            "--queue-capacity",
            "16",
            "--drain-timeout-s",
            "60",
            // A bounded KV cache (~2,700 tokens of the demo model): the prefix cache fills it
            // during the soak's warm-up, and memory then stays flat.
            "--kv-cache-bytes",
            "100663296",
        ],
        &[],
    )
}

fn gateway(tokenizer: SocketAddr, text_pool: &str, extra: &[&str]) -> Proc {
    let tok = tokenizer.to_string();
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--tokenizer-addr",
        &tok,
        "--text-pool",
        text_pool,
    ];
    args.extend_from_slice(extra);
    procs::spawn("medgemma-gateway", &args, &[])
}

async fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("reachable")
}

async fn client(addr: SocketAddr) -> ClinicalTasksClient<Channel> {
    ClinicalTasksClient::new(channel(addr).await)
}

fn ask(question: &str, max_new_tokens: u32, timeout: Duration) -> tonic::Request<pb::AskRequest> {
    let mut r = tonic::Request::new(pb::AskRequest {
        question: question.into(),
        system: None,
        sampling: Some(pb::Sampling {
            temperature: Some(0.0),
            max_new_tokens: Some(max_new_tokens),
            ..Default::default()
        }),
    });
    r.set_timeout(timeout);
    r
}

async fn health(addr: SocketAddr) -> Option<ServingStatus> {
    let ch = Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()?;
    medgemma_rpc::client::health_status(ch, "").await.ok()
}

/// Waits up to `within` for the health of `addr` to be `want`.
async fn health_becomes(addr: SocketAddr, want: ServingStatus, within: Duration) {
    let t = Instant::now();
    loop {
        let got = health(addr).await;
        if got == Some(want) {
            return;
        }
        assert!(
            t.elapsed() < within,
            "{addr}: health {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sequences running plus waiting on a generator replica.
async fn busy(addr: SocketAddr) -> u32 {
    let Ok(ch) = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
    else {
        return 0;
    };
    let mut c = gen_pb::generator_client::GeneratorClient::new(ch);
    c.stats(gen_pb::StatsRequest {})
        .await
        .map(|r| {
            let s = r.into_inner();
            s.active_sequences + s.queue_depth
        })
        .unwrap_or(0)
}

/// One AskStream to the end: the deltas' text, and the final status.
async fn stream_to_end(
    mut c: ClinicalTasksClient<Channel>,
    req: tonic::Request<pb::AskRequest>,
    first_delta: Option<tokio::sync::mpsc::Sender<()>>,
) -> Result<(String, pb::AskResponse), tonic::Status> {
    let mut stream = c.ask_stream(req).await?.into_inner();
    let mut text = String::new();
    let mut first_delta = first_delta;
    while let Some(m) = stream.next().await {
        match m?.event {
            Some(pb::ask_stream_response::Event::TextDelta(d)) => {
                text.push_str(&d);
                if let Some(tx) = first_delta.take() {
                    let _ = tx.send(()).await;
                }
            }
            Some(pb::ask_stream_response::Event::Response(r)) => return Ok((text, r)),
            None => {}
        }
    }
    Err(tonic::Status::internal(
        "the stream ended OK without its final response",
    ))
}

/// RSS (kB), open file descriptors and threads of `pid`, from /proc.
fn footprint(pid: u32) -> (u64, usize, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (field("VmRSS:"), fds, field("Threads:"))
}

/// The tests here run one at a time: each starts several model processes and measures bounds.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Load, soak and a rolling restart on two generator replicas.
#[test]
fn load_soak_and_a_rolling_restart_lose_nothing() {
    let Some(a) = assets() else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tok = tokenizer(&a, "127.0.0.1:0");
    let mut g1 = generator(&a, "127.0.0.1:0");
    let g2 = generator(&a, "127.0.0.1:0");
    let pool = format!("{},{}", g1.addr, g2.addr);
    let gw = gateway(tok.addr, &pool, &[]);
    let rt = runtime();
    rt.block_on(async {
        health_becomes(gw.addr, ServingStatus::Serving, Duration::from_secs(30)).await;

        // 64 concurrent streams: each answered, or refused with RESOURCE_EXHAUSTED (the two
        // replicas hold 2 x (16 running + 16 waiting)); none lost, none ended OK early.
        let c = client(gw.addr).await;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..64u32 {
            let c = c.clone();
            tasks.spawn(async move {
                let q = format!("Name one symptom of condition number {i}.");
                stream_to_end(c, ask(&q, 12, Duration::from_secs(300)), None).await
            });
        }
        let (mut ok, mut refused) = (0, 0);
        while let Some(r) = tasks.join_next().await {
            match r.unwrap() {
                Ok((text, resp)) => {
                    assert_eq!(text, resp.answer, "the deltas add up to the answer");
                    assert!(resp.usage.unwrap().completion_tokens >= 1);
                    ok += 1;
                }
                Err(s) if s.code() == Code::ResourceExhausted => refused += 1,
                Err(s) => panic!("a stream failed: {s:?}"),
            }
        }
        println!("64 concurrent streams: {ok} answered, {refused} refused (RESOURCE_EXHAUSTED)");
        assert_eq!(ok + refused, 64);
        assert!(ok >= 32, "the replicas' capacity is 64; {ok} answered");

        soak(&c, &[&tok, &g1, &g2, &gw]).await;

        // Rolling restart: streams run on both replicas; SIGTERM g1 once they have output.
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let mut streams = tokio::task::JoinSet::new();
        for i in 0..8u32 {
            let (c, tx) = (c.clone(), tx.clone());
            streams.spawn(async move {
                let q = format!("Describe the treatment of condition number {i}.");
                stream_to_end(c, ask(&q, 48, Duration::from_secs(300)), Some(tx)).await
            });
        }
        for _ in 0..8 {
            rx.recv().await.expect("every stream sends a delta");
        }
        assert!(
            busy(g1.addr).await > 0,
            "streams run on the replica to stop"
        );
        g1.signal("TERM");
        // New requests go to the other replica while g1 drains.
        let mut c2 = c.clone();
        let r = c2
            .ask(ask("What is a fever?", 4, Duration::from_secs(120)))
            .await;
        assert!(r.is_ok(), "a new request during the drain: {r:?}");
        while let Some(r) = streams.join_next().await {
            let (text, resp) = r.unwrap().expect("no stream is cut by the drain");
            assert_eq!(text, resp.answer);
        }
        let exit = tokio::task::block_in_place(|| g1.wait_exit(Duration::from_secs(60)));
        assert!(
            exit.is_some_and(|s| s.success()),
            "g1 drained and exited: {exit:?}"
        );
        let r = c2
            .ask(ask("What is a cough?", 4, Duration::from_secs(120)))
            .await;
        assert!(r.is_ok(), "served by the remaining replica: {r:?}");
    });
}

/// Mixed tasks at 8 in flight for `MEDGEMMA_SOAK_SECS` (default 120): every request answered
/// or refused with RESOURCE_EXHAUSTED; RSS within 5% of its level at half time (the warm-up),
/// file descriptors and threads not growing.
async fn soak(c: &ClinicalTasksClient<Channel>, procs: &[&Proc]) {
    let secs: u64 = std::env::var("MEDGEMMA_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let warm = start + Duration::from_secs(secs / 2);
    let mut baseline = None;
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..8u32 {
        let mut c = c.clone();
        workers.spawn(async move {
            let (mut ok, mut refused, mut n) = (0u32, 0u32, 0u32);
            while Instant::now() < end {
                n += 1;
                let sampling = Some(pb::Sampling {
                    temperature: Some(0.0),
                    max_new_tokens: Some(8),
                    ..Default::default()
                });
                let r = match (w + n) % 3 {
                    0 => c
                        .ask(ask(
                            &format!("Define term {w}-{n}."),
                            8,
                            Duration::from_secs(120),
                        ))
                        .await
                        .map(|_| ()),
                    1 => c
                        .summarize_clinical_note(pb::SummarizeClinicalNoteRequest {
                            note: format!("Patient {n} reports chest pain for {w} days."),
                            output_language: None,
                            sampling,
                        })
                        .await
                        .map(|_| ()),
                    _ => c
                        .answer_multiple_choice(pb::AnswerMultipleChoiceRequest {
                            question: format!("Which organ pumps blood? ({w}-{n})"),
                            options: vec!["Heart".into(), "Liver".into(), "Kidney".into()],
                            sampling,
                        })
                        .await
                        .map(|_| ()),
                };
                match r {
                    Ok(()) => ok += 1,
                    Err(s) if s.code() == Code::ResourceExhausted => refused += 1,
                    Err(s) => panic!("soak request failed: {s:?}"),
                }
            }
            (ok, refused)
        });
    }
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if baseline.is_none() && Instant::now() >= warm {
            baseline = Some(
                procs
                    .iter()
                    .map(|p| footprint(p.child.id()))
                    .collect::<Vec<_>>(),
            );
        }
    }
    let (mut ok, mut refused) = (0, 0);
    while let Some(r) = workers.join_next().await {
        let (o, f) = r.unwrap();
        ok += o;
        refused += f;
    }
    let after: Vec<_> = procs.iter().map(|p| footprint(p.child.id())).collect();
    let baseline = baseline.unwrap_or_else(|| after.clone());
    println!("soak {secs}s: {ok} answered, {refused} refused");
    for ((p, b), a) in procs.iter().zip(&baseline).zip(&after) {
        let growth = a.0 as f64 / b.0.max(1) as f64 - 1.0;
        println!(
            "  {}: RSS {} -> {} kB ({:+.1}%), fds {} -> {}, threads {} -> {}",
            p.name,
            b.0,
            a.0,
            growth * 100.0,
            b.1,
            a.1,
            b.2,
            a.2
        );
        assert!(
            growth < 0.05,
            "{}: RSS grew {:.1}% after warm-up",
            p.name,
            growth * 100.0
        );
        assert!(a.1 <= b.1 + 4, "{}: file descriptors leak", p.name);
        assert!(a.2 <= b.2 + 4, "{}: threads leak", p.name);
    }
    assert!(ok > 0, "the soak answered nothing");
}

/// Killed replicas, a killed tokenizer, and a replica that never answers.
#[test]
fn killed_and_silent_replicas_get_clear_statuses_and_the_rest_keeps_serving() {
    let Some(a) = assets() else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut tok = tokenizer(&a, "127.0.0.1:0");
    let g1 = generator(&a, "127.0.0.1:0");
    let g2 = generator(&a, "127.0.0.1:0");
    let pool = format!("{},{}", g1.addr, g2.addr);
    let gw = gateway(tok.addr, &pool, &[]);
    let mut gens = [g1, g2];
    let rt = runtime();
    rt.block_on(async {
        health_becomes(gw.addr, ServingStatus::Serving, Duration::from_secs(30)).await;
        let c = client(gw.addr).await;

        // SIGKILL the replica that serves a stream, once it has sent output: an error status
        // within a second, never OK with partial text, never a retry elsewhere.
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let stream = tokio::spawn(stream_to_end(
            c.clone(),
            ask(
                "Explain heart failure in detail.",
                400,
                Duration::from_secs(300),
            ),
            Some(tx),
        ));
        rx.recv().await.expect("the stream sends a delta");
        let mut victim = None;
        for (i, g) in gens.iter().enumerate() {
            if busy(g.addr).await > 0 {
                victim = Some(i);
            }
        }
        let victim = victim.expect("one replica runs the stream");
        gens[victim].kill();
        let t = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(5), stream)
            .await
            .expect("the caller hears within the bound")
            .unwrap();
        let waited = t.elapsed();
        let s = r.expect_err("a killed replica's stream never ends OK");
        println!("killed during decode: {:?} after {waited:?}", s.code());
        assert!(waited < Duration::from_secs(1), "{waited:?}");
        assert!(
            matches!(s.code(), Code::Unavailable | Code::Internal | Code::Unknown),
            "{s:?}"
        );
        let mut c1 = c.clone();
        let r = c1
            .ask(ask("What is anemia?", 4, Duration::from_secs(120)))
            .await;
        assert!(r.is_ok(), "the other replica serves: {r:?}");

        // Restart the killed replica on its port; then kill one during a long prefill.
        let port = gens[victim].addr.to_string();
        gens[victim] = generator(&a, &port);
        health_becomes(
            gens[victim].addr,
            ServingStatus::Serving,
            Duration::from_secs(60),
        )
        .await;
        let long = "The patient reports fatigue and dyspnea. ".repeat(120);
        let t = Instant::now();
        let stream = tokio::spawn(stream_to_end(
            c.clone(),
            ask(&long, 4, Duration::from_secs(300)),
            None,
        ));
        let mut killed = false;
        while !killed && t.elapsed() < Duration::from_secs(30) && !stream.is_finished() {
            for g in gens.iter_mut() {
                if busy(g.addr).await > 0 {
                    g.kill();
                    killed = true;
                    break;
                }
            }
        }
        let r = tokio::time::timeout(Duration::from_secs(120), stream)
            .await
            .expect("the caller hears")
            .unwrap();
        println!(
            "killed during prefill ({killed}): {:?}",
            r.as_ref().map(|_| Code::Ok).unwrap_or_else(|s| s.code())
        );
        if let Err(s) = &r {
            assert!(
                matches!(s.code(), Code::Unavailable | Code::Internal | Code::Unknown),
                "{s:?}"
            );
        }
        let mut live = 0;
        for g in &gens {
            if health(g.addr).await == Some(ServingStatus::Serving) {
                live += 1;
            }
        }
        assert!(live >= 1, "one replica is still up");
        let r = c1
            .ask(ask("What is sepsis?", 4, Duration::from_secs(120)))
            .await;
        assert!(r.is_ok(), "still served: {r:?}");

        // The tokenizer killed: UNAVAILABLE, gateway NOT_SERVING; back on its port: SERVING.
        let tok_port = tok.addr.to_string();
        tok.kill();
        let r = c1
            .ask(ask("What is asthma?", 4, Duration::from_secs(30)))
            .await;
        assert_eq!(r.unwrap_err().code(), Code::Unavailable);
        health_becomes(gw.addr, ServingStatus::NotServing, Duration::from_secs(10)).await;
        tok = tokenizer(&a, &tok_port);
        health_becomes(gw.addr, ServingStatus::Serving, Duration::from_secs(20)).await;
        let r = c1
            .ask(ask("What is asthma?", 4, Duration::from_secs(120)))
            .await;
        assert!(r.is_ok(), "answering again: {r:?}");

        // A replica that accepts connections and never answers: the deadline holds.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = silent.accept().await {
                held.push(sock);
            }
        });
        let gw2 = gateway(tok.addr, &silent_addr.to_string(), &[]);
        let mut c3 = client(gw2.addr).await;
        let t = Instant::now();
        let r = c3
            .ask(ask("What is a stroke?", 4, Duration::from_secs(2)))
            .await;
        let waited = t.elapsed();
        // tonic's client enforces the deadline too (as CANCELLED): either side's expiry is
        // DEADLINE_EXCEEDED to the caller.
        let code = medgemma_rpc::client::deadline_status(r.unwrap_err()).code();
        println!("silent replica: {code:?} after {waited:?}");
        assert!(
            matches!(code, Code::DeadlineExceeded | Code::Unavailable),
            "{code:?}"
        );
        assert!(waited < Duration::from_secs(4), "{waited:?}");
    });
}
