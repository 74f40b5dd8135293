//! Who may call which task: bearer API keys checked against a file of key hashes, or the
//! client certificate (mTLS), in front of `ClinicalTasks`; health and reflection stay open.
//!
//! The keys file (`--api-keys`, JSON, re-read when it changes) never holds a key, only its
//! SHA-256 (keys are 32 random bytes, so a plain hash is enough; `medgemma gen-api-key` makes
//! one):
//!
//! ```json
//! {"keys": [{"name": "ehr-prod", "sha256": "<64 hex>", "tasks": ["Ask", "SummarizeClinicalNote"]},
//!           {"name": "admin", "sha256": "<64 hex>", "tasks": ["*"]}]}
//! ```
//!
//! A missing or unknown key is UNAUTHENTICATED, a known key calling a task it is not listed
//! for PERMISSION_DENIED. The presented key's hash is compared with every entry in constant
//! time. Every request, refused or not, gets an audit line ([`crate::audit`]).

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body::Frame;
use medgemma_rpc::tls::PeerCertificate;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tower_service::Service;

use crate::audit::{AuditLog, AuditNote, Pending};

/// The tasks a key may be listed for (the RPC names without `Stream`).
pub const TASKS: &[&str] = &[
    "Ask",
    "SummarizeClinicalNote",
    "AnswerMultipleChoice",
    "DraftRadiologyReport",
    "Deidentify",
];

/// How callers authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Bearer API keys from `--api-keys`.
    ApiKey,
    /// The client certificate (requires `--tls-client-ca`); any certificate the CA signed may
    /// call every task.
    ClientCert,
    /// Nobody is checked. Implicit only on a loopback address; elsewhere it must be explicit.
    None,
}

/// Authentication, authorization and audit flags of the gateway.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// How callers authenticate (default: `api-key` with --api-keys, else `none`, which is
    /// refused on a non-loopback address unless given explicitly).
    #[arg(long, env = "MEDGEMMA_AUTH", value_enum)]
    pub auth: Option<AuthMode>,
    /// The API keys file (JSON: name, SHA-256 of the key, tasks); re-read when it changes.
    #[arg(long, env = "MEDGEMMA_API_KEYS")]
    pub api_keys: Option<PathBuf>,
    /// Audit log: one JSON line per request, to this file (appended) or `-` for stdout.
    #[arg(long, env = "MEDGEMMA_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Serve gRPC server reflection (turn off in production).
    #[arg(long, env = "MEDGEMMA_REFLECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub reflection: bool,
}

impl Default for AuthArgs {
    fn default() -> Self {
        Self {
            auth: None,
            api_keys: None,
            audit_log: None,
            reflection: true,
        }
    }
}

/// One key of the keys file.
#[derive(Debug, Clone)]
struct KeyEntry {
    name: String,
    sha256: [u8; 32],
    all_tasks: bool,
    tasks: Vec<String>,
    override_system: bool,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    keys: Vec<KeyFileEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFileEntry {
    name: String,
    sha256: String,
    tasks: Vec<String>,
    /// May the key replace a task's system prompt (`AskRequest.system`)? Default: no.
    #[serde(default)]
    override_system: bool,
}

/// Parses a keys file; the error says what is wrong (never a hash or key).
fn parse_keys(json: &[u8]) -> Result<Vec<KeyEntry>, String> {
    let file: KeysFile =
        serde_json::from_slice(json).map_err(|e| format!("not a keys file: {e}"))?;
    let mut keys: Vec<KeyEntry> = Vec::new();
    for (i, k) in file.keys.into_iter().enumerate() {
        if k.name.trim().is_empty() {
            return Err(format!("keys[{i}]: empty name"));
        }
        if keys.iter().any(|e| e.name == k.name) {
            return Err(format!("keys[{i}]: name {:?} appears twice", k.name));
        }
        let mut sha256 = [0u8; 32];
        hex::decode_to_slice(k.sha256.trim(), &mut sha256).map_err(|_| {
            format!(
                "keys[{i}] ({}): sha256 must be 64 hex digits (the SHA-256 of the key)",
                k.name
            )
        })?;
        for t in &k.tasks {
            if t != "*" && !TASKS.contains(&t.as_str()) {
                return Err(format!(
                    "keys[{i}] ({}): unknown task {t:?} (one of {} or \"*\")",
                    k.name,
                    TASKS.join(", ")
                ));
            }
        }
        keys.push(KeyEntry {
            all_tasks: k.tasks.iter().any(|t| t == "*"),
            name: k.name,
            sha256,
            tasks: k.tasks,
            override_system: k.override_system,
        });
    }
    Ok(keys)
}

/// The SHA-256 of an API key, hex: what the keys file holds.
pub fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new API key: 32 random bytes, hex, with a recognisable prefix.
pub fn new_key() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("mgk_{}", hex::encode(bytes))
}

/// The keys file, re-read when it changes.
#[derive(Debug)]
struct KeyStore {
    path: PathBuf,
    state: RwLock<(Vec<u8>, Arc<Vec<KeyEntry>>)>,
}

impl KeyStore {
    fn load(path: &Path) -> Result<Arc<Self>, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let keys = parse_keys(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        tracing::info!(path = %path.display(), keys = keys.len(), "api keys loaded");
        Ok(Arc::new(Self {
            path: path.to_owned(),
            state: RwLock::new((bytes, Arc::new(keys))),
        }))
    }

    fn keys(&self) -> Arc<Vec<KeyEntry>> {
        match self.state.read() {
            Ok(s) => s.1.clone(),
            Err(p) => p.into_inner().1.clone(),
        }
    }

    /// Re-reads the file; a file that does not parse keeps the current keys.
    fn reload(&self) {
        let Ok(bytes) = std::fs::read(&self.path) else {
            tracing::warn!(path = %self.path.display(), "api keys file unreadable; keeping the current keys");
            return;
        };
        let Ok(mut state) = self.state.write() else {
            return;
        };
        if state.0 == bytes {
            return;
        }
        match parse_keys(&bytes) {
            Ok(keys) => {
                tracing::info!(path = %self.path.display(), keys = keys.len(), "api keys reloaded");
                *state = (bytes, Arc::new(keys));
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "api keys file does not load; keeping the current keys");
            }
        }
    }

    fn watch(self: &Arc<Self>, interval: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(store) = weak.upgrade() else { break };
                let _ = tokio::task::spawn_blocking(move || store.reload()).await;
            }
        });
    }
}

/// Who a request authenticated as.
#[derive(Debug, Clone, Default)]
struct Principal {
    key: Option<String>,
    client_cert: Option<String>,
    override_system: bool,
}

/// Whether the caller may replace a task's system prompt, in the request's extensions: an API
/// key listed with `"override_system": true`, or any caller under `--auth none`. Absent (the
/// service run without the guard, as embedded in tests): allowed.
#[derive(Debug, Clone, Copy)]
pub struct SystemOverride(pub bool);

impl SystemOverride {
    /// PERMISSION_DENIED when `request` sets a system prompt its caller may not set.
    pub fn check<T>(request: &tonic::Request<T>, sets_system: bool) -> Result<(), Status> {
        let allowed = request
            .extensions()
            .get::<Self>()
            .is_none_or(|SystemOverride(allowed)| *allowed);
        if sets_system && !allowed {
            return Err(Status::permission_denied(
                "this caller may not set `system`: the server fixes each task's system prompt \
                 (an API key may be allowed with \"override_system\": true)",
            ));
        }
        Ok(())
    }
}

/// The checks in front of `ClinicalTasks`.
#[derive(Debug)]
pub struct Guard {
    mode: AuthMode,
    keys: Option<Arc<KeyStore>>,
    audit: Option<Arc<AuditLog>>,
}

impl Guard {
    /// From the flags; `loopback` says whether the gateway listens on loopback only and
    /// `client_ca` whether it requires client certificates. Errors name the flag.
    pub fn from_args(args: &AuthArgs, loopback: bool, client_ca: bool) -> Result<Self, String> {
        let mode = match (args.auth, &args.api_keys) {
            (Some(m), _) => m,
            (None, Some(_)) => AuthMode::ApiKey,
            (None, None) if loopback => AuthMode::None,
            (None, None) => {
                return Err("the gateway listens on a non-loopback address without \
                            authentication: set --api-keys FILE (or --auth client-cert with \
                            --tls-client-ca), or --auth none to run open on purpose"
                    .into());
            }
        };
        let keys = match (mode, &args.api_keys) {
            (AuthMode::ApiKey, Some(path)) => {
                let store = KeyStore::load(path)?;
                store.watch(Duration::from_secs(5));
                Some(store)
            }
            (AuthMode::ApiKey, None) => return Err("--auth api-key needs --api-keys FILE".into()),
            (_, Some(_)) => {
                return Err("--api-keys is only used with --auth api-key".into());
            }
            (_, None) => None,
        };
        if mode == AuthMode::ClientCert && !client_ca {
            return Err(
                "--auth client-cert needs --tls-client-ca (and --tls-cert/--tls-key)".into(),
            );
        }
        if mode == AuthMode::None {
            tracing::warn!(
                "authentication is off (--auth none): anyone who reaches the gateway may call every task"
            );
        }
        let audit = match &args.audit_log {
            Some(path) => {
                Some(Arc::new(AuditLog::open(path).map_err(|e| {
                    format!("--audit-log {}: {e}", path.display())
                })?))
            }
            None => None,
        };
        Ok(Self { mode, keys, audit })
    }

    /// A guard with these parts (tests).
    pub fn new(
        mode: AuthMode,
        keys_file: Option<&Path>,
        audit: Option<Arc<AuditLog>>,
    ) -> Result<Self, String> {
        let keys = keys_file.map(KeyStore::load).transpose()?;
        Ok(Self { mode, keys, audit })
    }

    /// Authenticates and authorizes one call of `task`.
    fn check(
        &self,
        headers: &http::HeaderMap,
        peer: Option<&PeerCertificate>,
        task: &str,
    ) -> Result<Principal, (Principal, Status)> {
        let mut principal = Principal {
            key: None,
            client_cert: peer.map(|p| p.subject.clone()),
            override_system: false,
        };
        match self.mode {
            AuthMode::None => {
                principal.override_system = true;
                Ok(principal)
            }
            AuthMode::ClientCert if principal.client_cert.is_some() => Ok(principal),
            AuthMode::ClientCert => Err((
                principal,
                Status::unauthenticated("a client certificate is required"),
            )),
            AuthMode::ApiKey => {
                let Some(token) = bearer(headers) else {
                    return Err((
                        principal,
                        Status::unauthenticated(
                            "missing API key: send the metadata `authorization: Bearer <key>`",
                        ),
                    ));
                };
                let keys = self.keys.as_ref().map(|k| k.keys()).unwrap_or_default();
                let Some(entry) = find_key(&keys, token) else {
                    return Err((principal, Status::unauthenticated("invalid API key")));
                };
                principal.key = Some(entry.name.clone());
                principal.override_system = entry.override_system;
                if entry.all_tasks || entry.tasks.iter().any(|t| t == task) {
                    Ok(principal)
                } else {
                    let msg = format!("the key {:?} may not call {task}", entry.name);
                    Err((principal, Status::permission_denied(msg)))
                }
            }
        }
    }
}

/// The key of `authorization: Bearer <key>`, if well formed.
fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The entry whose hash is the SHA-256 of `token`. Every entry is compared, each in constant
/// time, so the time taken says nothing about which bytes matched.
fn find_key<'k>(keys: &'k [KeyEntry], token: &str) -> Option<&'k KeyEntry> {
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let mut found = None;
    for k in keys {
        if bool::from(k.sha256.ct_eq(&digest)) {
            found = Some(k);
        }
    }
    found
}

/// `ClinicalTasks` behind the [`Guard`]: the same service name, so it routes as the service
/// itself.
#[derive(Debug, Clone)]
pub struct Guarded<S> {
    inner: S,
    guard: Arc<Guard>,
}

impl<S> Guarded<S> {
    /// `inner` behind `guard`.
    pub fn new(inner: S, guard: Arc<Guard>) -> Self {
        Self { inner, guard }
    }
}

impl<S: NamedService> NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = Result<T, Infallible>> + Send>>;

impl<S> Service<http::Request<Body>> for Guarded<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let started = Instant::now();
        let method = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let task = method.strip_suffix("Stream").unwrap_or(&method).to_owned();
        let trace_id = req
            .extensions()
            .get::<medgemma_rpc::trace::TraceContext>()
            .map(|t| t.trace_id());
        let checked = self.guard.check(
            req.headers(),
            req.extensions().get::<PeerCertificate>(),
            &task,
        );
        let note = AuditNote::default();
        let pending = |principal: Principal| {
            self.guard.audit.clone().map(|log| Pending {
                log,
                started,
                key: principal.key,
                client_cert: principal.client_cert,
                method: method.clone(),
                trace_id: trace_id.clone(),
                note: note.clone(),
                code: None,
                ended: false,
            })
        };
        match checked {
            Err((principal, status)) => {
                tracing::info!(code = ?status.code(), %task, "request refused");
                if let Some(mut p) = pending(principal) {
                    p.code = Some(status.code());
                    p.ended = true;
                }
                Box::pin(async move { Ok(status.into_http()) })
            }
            Ok(principal) => {
                req.extensions_mut()
                    .insert(SystemOverride(principal.override_system));
                let audit = pending(principal);
                req.extensions_mut().insert(note.clone());
                let fut = self.inner.call(req);
                Box::pin(async move {
                    let response = fut.await?;
                    let Some(mut audit) = audit else {
                        return Ok(response);
                    };
                    audit.code = grpc_status(response.headers());
                    let (parts, body) = response.into_parts();
                    Ok(http::Response::from_parts(
                        parts,
                        Body::new(AuditedBody { inner: body, audit }),
                    ))
                })
            }
        }
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let v = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(tonic::Code::from_i32(v))
}

/// A response body that writes its request's audit line when it ends or is dropped.
struct AuditedBody {
    inner: Body,
    audit: Pending,
}

impl http_body::Body for AuditedBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    self.audit.code = Some(code);
                }
            }
            Poll::Ready(None) => self.audit.ended = true,
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Vec<KeyEntry> {
        let json = format!(
            r#"{{"keys":[{{"name":"ehr","sha256":"{}","tasks":["Ask"]}},{{"name":"admin","sha256":"{}","tasks":["*"],"override_system":true}}]}}"#,
            key_hash("mgk_ehr"),
            key_hash("mgk_admin")
        );
        parse_keys(json.as_bytes()).unwrap()
    }

    #[test]
    fn keys_are_found_by_hash_only() {
        let keys = keys();
        assert_eq!(find_key(&keys, "mgk_ehr").unwrap().name, "ehr");
        assert_eq!(find_key(&keys, "mgk_admin").unwrap().name, "admin");
        assert!(find_key(&keys, "mgk_eh").is_none());
        assert!(
            find_key(&keys, &key_hash("mgk_ehr")).is_none(),
            "the hash is not the key"
        );
    }

    #[test]
    fn bad_keys_files_are_refused_with_the_reason() {
        let e = parse_keys(br#"{"keys":[{"name":"a","sha256":"00","tasks":[]}]}"#).unwrap_err();
        assert!(e.contains("64 hex"), "{e}");
        let h = key_hash("k");
        let e = parse_keys(
            format!(r#"{{"keys":[{{"name":"a","sha256":"{h}","tasks":["Gen"]}}]}}"#).as_bytes(),
        )
        .unwrap_err();
        assert!(e.contains("unknown task"), "{e}");
        let e = parse_keys(format!(r#"{{"keys":[{{"name":"a","sha256":"{h}","tasks":[]}},{{"name":"a","sha256":"{h}","tasks":[]}}]}}"#).as_bytes()).unwrap_err();
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn statuses_for_missing_wrong_and_unpermitted_keys() {
        let guard = Guard {
            mode: AuthMode::ApiKey,
            keys: Some(Arc::new(KeyStore {
                path: PathBuf::new(),
                state: RwLock::new((Vec::new(), Arc::new(keys()))),
            })),
            audit: None,
        };
        let mut h = http::HeaderMap::new();
        let code = |h: &http::HeaderMap, task| guard.check(h, None, task).err().map(|e| e.1.code());
        assert_eq!(code(&h, "Ask"), Some(tonic::Code::Unauthenticated));
        h.insert("authorization", "Bearer mgk_nope".parse().unwrap());
        assert_eq!(code(&h, "Ask"), Some(tonic::Code::Unauthenticated));
        h.insert("authorization", "Basic mgk_ehr".parse().unwrap());
        assert_eq!(code(&h, "Ask"), Some(tonic::Code::Unauthenticated));
        h.insert("authorization", "Bearer mgk_ehr".parse().unwrap());
        assert_eq!(code(&h, "Ask"), None);
        assert_eq!(code(&h, "Deidentify"), Some(tonic::Code::PermissionDenied));
        let may_override =
            |h: &http::HeaderMap| guard.check(h, None, "Ask").unwrap().override_system;
        assert!(
            !may_override(&h),
            "a key without override_system keeps the server's prompt"
        );
        h.insert("authorization", "bearer mgk_admin".parse().unwrap());
        assert_eq!(code(&h, "Deidentify"), None);
        assert!(may_override(&h));
    }

    #[test]
    fn open_gateways_must_be_explicit_off_loopback() {
        let args = AuthArgs::default();
        assert!(Guard::from_args(&args, true, false).is_ok());
        let e = Guard::from_args(&args, false, false).unwrap_err();
        assert!(e.contains("--auth none"), "{e}");
        let explicit = AuthArgs {
            auth: Some(AuthMode::None),
            ..AuthArgs::default()
        };
        assert!(Guard::from_args(&explicit, false, false).is_ok());
        let cert = AuthArgs {
            auth: Some(AuthMode::ClientCert),
            ..AuthArgs::default()
        };
        assert!(Guard::from_args(&cert, false, false).is_err());
    }
}
