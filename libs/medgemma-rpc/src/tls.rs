//! TLS and mutual TLS for every hop: rustls on ring (TLS 1.3 and 1.2, AEAD cipher suites with
//! forward secrecy only; no OpenSSL anywhere).
//!
//! - [`ServerTls`]: a server's certificate and key, and optionally the CA its clients'
//!   certificates must chain to (mTLS: a client without such a certificate is refused during
//!   the handshake, before any request is read). [`ServerTlsArgs`] are the flags.
//! - [`ClientTls`]: the CA a client trusts and optionally its own certificate, used through
//!   [`channel_lazy`] / [`connect`] (a tonic channel over our own rustls connector).
//! - Both re-read their files every few seconds and switch to the new certificates when the
//!   files change (cert-manager rotates them in place): new connections use the new ones,
//!   connections already open keep theirs, so streams in flight are not dropped. Files that do
//!   not load (a rotation half written) keep the old configuration and are tried again.
//! - [`DevCa`]: a throwaway certificate authority (rcgen) for `medgemma up --tls` and tests.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CA file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file holds no usable PEM item of the kind needed.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// rustls refused the configuration (e.g. the key does not match the certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// Flags that do not go together.
    #[error("{0}")]
    Config(String),
    /// Generating a certificate failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            what: format!("not PEM certificates ({e})"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            what: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

fn key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    // Never echo key material: the error says only what kind of problem it is.
    PrivateKeyDer::from_pem_slice(pem).map_err(|_| TlsError::Pem {
        path: path.to_owned(),
        what: "no PEM private key (PKCS#8, PKCS#1 or SEC1) in the file".into(),
    })
}

fn roots(path: &Path, pem: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs(path, pem)? {
        store.add(cert).map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            what: format!("not a usable CA certificate ({e})"),
        })?;
    }
    Ok(Arc::new(store))
}

/// A set of files that builds one rustls configuration.
trait TlsFiles: Send + Sync + 'static {
    type Config: Send + Sync + 'static;
    fn paths(&self) -> Vec<&Path>;
    /// Builds the configuration from the files' contents, in [`paths`](Self::paths) order.
    fn build(&self, contents: &[Vec<u8>]) -> Result<Self::Config, TlsError>;
}

/// A configuration rebuilt when its files change.
struct Reloading<F: TlsFiles> {
    files: F,
    current: RwLock<Arc<F::Config>>,
    /// The file contents the current configuration was built from.
    loaded_from: Mutex<Vec<Vec<u8>>>,
}

impl<F: TlsFiles> Reloading<F> {
    fn load(files: F) -> Result<Arc<Self>, TlsError> {
        let contents = files
            .paths()
            .into_iter()
            .map(read)
            .collect::<Result<Vec<_>, _>>()?;
        let config = files.build(&contents)?;
        Ok(Arc::new(Self {
            files,
            current: RwLock::new(Arc::new(config)),
            loaded_from: Mutex::new(contents),
        }))
    }

    fn current(&self) -> Arc<F::Config> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Re-reads the files; when they changed and build, switches to the new configuration.
    /// Returns whether it switched.
    fn reload_if_changed(&self) -> bool {
        let contents = match self
            .files
            .paths()
            .into_iter()
            .map(read)
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "tls: cannot re-read; keeping the current certificates");
                return false;
            }
        };
        let Ok(mut loaded_from) = self.loaded_from.lock() else {
            return false;
        };
        if *loaded_from == contents {
            return false;
        }
        match self.files.build(&contents) {
            Ok(config) => {
                match self.current.write() {
                    Ok(mut c) => *c = Arc::new(config),
                    Err(p) => *p.into_inner() = Arc::new(config),
                }
                *loaded_from = contents;
                tracing::info!(files = ?self.files.paths(), "tls: certificates reloaded; new connections use them");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "tls: changed files do not load (yet); keeping the current certificates");
                false
            }
        }
    }

    /// Checks the files every `interval` for as long as `self` lives.
    fn watch(self: &Arc<Self>, interval: Duration) {
        let weak: Weak<Self> = Arc::downgrade(self);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("tls: no async runtime; certificates will not be reloaded");
            return;
        };
        rt.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(this) = weak.upgrade() else { break };
                let _ = tokio::task::spawn_blocking(move || this.reload_if_changed()).await;
            }
        });
    }
}

/// The files of a TLS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the leaf.
    pub key: PathBuf,
    /// PEM CA certificate(s) that must have signed every client's certificate (mTLS); `None`:
    /// clients need no certificate.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles for ServerTlsFiles {
    type Config = rustls::ServerConfig;

    fn paths(&self) -> Vec<&Path> {
        let mut p = vec![self.cert.as_path(), self.key.as_path()];
        p.extend(self.client_ca.as_deref());
        p
    }

    fn build(&self, contents: &[Vec<u8>]) -> Result<rustls::ServerConfig, TlsError> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)?;
        let builder = match &self.client_ca {
            Some(path) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    roots(path, &contents[2])?,
                    provider(),
                )
                .build()
                .map_err(|e| TlsError::Config(format!("{}: {e}", path.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(
            certs(&self.cert, &contents[0])?,
            key(&self.key, &contents[1])?,
        )?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// A TLS server configuration that follows its files. Cheap to clone.
#[derive(Clone)]
pub struct ServerTls {
    inner: Arc<Reloading<ServerTlsFiles>>,
    reload_interval: Duration,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.inner.files)
            .finish()
    }
}

/// The identity a client proved with its certificate (mTLS), put in every request's
/// extensions by the server (`request.extensions().get::<PeerCertificate>()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    /// The certificate's subject, e.g. `CN=gateway, O=hospital`.
    pub subject: String,
}

impl ServerTls {
    /// Loads the files now (an error names the file) and checks them again every
    /// `reload_interval` once serving.
    pub fn load(files: ServerTlsFiles, reload_interval: Duration) -> Result<Self, TlsError> {
        Ok(Self {
            inner: Reloading::load(files)?,
            reload_interval,
        })
    }

    /// The files.
    pub fn files(&self) -> &ServerTlsFiles {
        &self.inner.files
    }

    /// Whether clients must present a certificate signed by the configured CA.
    pub fn requires_client_cert(&self) -> bool {
        self.inner.files.client_ca.is_some()
    }

    /// Starts re-reading the files (on the current runtime) for as long as this configuration
    /// lives.
    pub(crate) fn watch(&self) {
        self.inner.watch(self.reload_interval);
    }

    /// Re-reads the files now; true when the certificates changed.
    pub fn reload_now(&self) -> bool {
        self.inner.reload_if_changed()
    }

    /// The handshake of one accepted connection, with the current certificates.
    pub(crate) async fn accept(
        &self,
        stream: TcpStream,
    ) -> io::Result<(
        tokio_rustls::server::TlsStream<TcpStream>,
        Option<PeerCertificate>,
    )> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.inner.current());
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|der| PeerCertificate {
                subject: subject_of(der).unwrap_or_else(|| "<unparsable subject>".into()),
            });
        Ok((tls, peer))
    }
}

/// The subject of a DER certificate, RFC 4514 style (`CN=..., O=...`).
pub fn subject_of(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    Some(cert.subject().to_string())
}

/// The TLS flags of every server binary (each also a `MEDGEMMA_TLS_*` variable). Without
/// `--tls-cert` the server speaks plaintext HTTP/2 (fine on loopback; it warns otherwise).
#[derive(Debug, Clone, clap::Args)]
pub struct ServerTlsArgs {
    /// PEM certificate chain to serve TLS with (with --tls-key); re-read when it changes.
    #[arg(long, env = "MEDGEMMA_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "MEDGEMMA_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): require every client to present a certificate this CA signed
    /// (mTLS); others are refused during the handshake.
    #[arg(long, env = "MEDGEMMA_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// How often the certificate, key and CA files are checked for changes, in seconds.
    #[arg(long, env = "MEDGEMMA_TLS_RELOAD_SECS", default_value_t = 10.0)]
    pub tls_reload_secs: f64,
    /// Also listen here in plaintext for `grpc.health.v1` only (Kubernetes gRPC probes speak
    /// no TLS), e.g. `0.0.0.0:8081`.
    #[arg(long, env = "MEDGEMMA_HEALTH_LISTEN")]
    pub health_listen: Option<String>,
}

impl Default for ServerTlsArgs {
    fn default() -> Self {
        Self {
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_reload_secs: 10.0,
            health_listen: None,
        }
    }
}

impl ServerTlsArgs {
    /// The reload interval these flags ask for (for a client side that follows the same
    /// cadence).
    pub fn reload_interval(&self) -> Result<Duration, TlsError> {
        reload_interval(self.tls_reload_secs)
    }

    /// Sets `options`' TLS and health-only listener from these flags.
    pub fn apply(&self, options: &mut crate::ServeOptions) -> Result<(), TlsError> {
        options.tls = self.load()?;
        options.health_listen.clone_from(&self.health_listen);
        Ok(())
    }

    /// The server TLS these flags ask for (`None`: plaintext), files loaded and checked.
    pub fn load(&self) -> Result<Option<ServerTls>, TlsError> {
        let interval = reload_interval(self.tls_reload_secs)?;
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => ServerTls::load(
                ServerTlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: self.tls_client_ca.clone(),
                },
                interval,
            )
            .map(Some),
            (None, None) if self.tls_client_ca.is_none() => Ok(None),
            _ => Err(TlsError::Config(
                "--tls-cert and --tls-key go together (and --tls-client-ca needs them)".into(),
            )),
        }
    }
}

fn reload_interval(secs: f64) -> Result<Duration, TlsError> {
    if !(0.1..=86_400.0).contains(&secs) {
        return Err(TlsError::Config(format!(
            "--tls-reload-secs must be in 0.1..=86400, got {secs}"
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The files of a TLS client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// PEM CA certificate(s) the server's certificate must chain to.
    pub ca: PathBuf,
    /// The client's own PEM certificate chain and key (for servers that require mTLS).
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl TlsFiles for ClientTlsFiles {
    type Config = rustls::ClientConfig;

    fn paths(&self) -> Vec<&Path> {
        let mut p = vec![self.ca.as_path()];
        if let Some((cert, key)) = &self.identity {
            p.push(cert);
            p.push(key);
        }
        p
    }

    fn build(&self, contents: &[Vec<u8>]) -> Result<rustls::ClientConfig, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)?
            .with_root_certificates(roots(&self.ca, &contents[0])?);
        let mut config = match &self.identity {
            Some((cert, k)) => {
                builder.with_client_auth_cert(certs(cert, &contents[1])?, key(k, &contents[2])?)?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// A TLS client configuration that follows its files. Cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    inner: Arc<Reloading<ClientTlsFiles>>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("files", &self.inner.files)
            .finish()
    }
}

impl ClientTls {
    /// Loads the files now; when called on an async runtime, they are checked again every
    /// `reload_interval` for as long as this configuration lives.
    pub fn load(files: ClientTlsFiles, reload_interval: Duration) -> Result<Self, TlsError> {
        let inner = Reloading::load(files)?;
        if tokio::runtime::Handle::try_current().is_ok() {
            inner.watch(reload_interval);
        }
        Ok(Self { inner })
    }

    /// `--ca`/`--cert`/`--key` style options: `None` without a CA (plaintext); a certificate
    /// without its key (or the reverse) is an error.
    pub fn from_options(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
        reload_interval: Duration,
    ) -> Result<Option<Self>, TlsError> {
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((c.to_owned(), k.to_owned())),
            (None, None) => None,
            _ => {
                return Err(TlsError::Config(
                    "a client certificate needs its key (and the key its certificate)".into(),
                ));
            }
        };
        match ca {
            Some(ca) => Self::load(
                ClientTlsFiles {
                    ca: ca.to_owned(),
                    identity,
                },
                reload_interval,
            )
            .map(Some),
            None if identity.is_some() => Err(TlsError::Config(
                "a client certificate needs the CA of the server's certificate too".into(),
            )),
            None => Ok(None),
        }
    }

    /// A connector that checks the server's certificate against `server_name` (`None`: the
    /// host of each URI it connects to). An invalid name fails each connection attempt.
    pub fn connector(&self, server_name: Option<&str>) -> TlsConnector {
        TlsConnector {
            tls: self.clone(),
            server_name: server_name.map(str::to_owned),
        }
    }
}

/// The TLS flags of the gateway's pools (its client side towards the backends; each also a
/// `MEDGEMMA_TLS_*` variable).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTlsArgs {
    /// PEM CA certificate(s) the backends' certificates must chain to: turns on TLS towards
    /// the tokenizer, vision and generator pools (each checked against its pool's host name).
    #[arg(long, env = "MEDGEMMA_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate the gateway presents to the backends (mTLS), with
    /// --tls-client-key.
    #[arg(long, env = "MEDGEMMA_TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of --tls-client-cert.
    #[arg(long, env = "MEDGEMMA_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// The client TLS these flags ask for (`None`: plaintext), files loaded and checked.
    pub fn load(&self, reload_interval: Duration) -> Result<Option<ClientTls>, TlsError> {
        ClientTls::from_options(
            self.tls_ca.as_deref(),
            self.tls_client_cert.as_deref(),
            self.tls_client_key.as_deref(),
            reload_interval,
        )
    }
}

/// Connects TCP, then TLS with the client configuration current at that moment; a tonic
/// connector (`Endpoint::connect_with_connector`).
#[derive(Clone)]
pub struct TlsConnector {
    tls: ClientTls,
    server_name: Option<String>,
}

impl fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConnector")
            .field("server_name", &self.server_name)
            .finish()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.tls.inner.current();
        let fixed_name = self.server_name.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or("the address has no host")?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().ok_or("the address has no port")?;
            let name = fixed_name.unwrap_or_else(|| host.clone());
            let name = match name.parse::<IpAddr>() {
                Ok(ip) => ServerName::IpAddress(ip.into()),
                Err(_) => ServerName::try_from(name)
                    .map_err(|_| "the server name is not a valid TLS name")?,
            };
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            // Small messages (stream deltas) should not wait for Nagle.
            let _ = tcp.set_nodelay(true);
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// A lazily connected channel on `endpoint`: over TLS when `tls` is set (the server's
/// certificate checked against `server_name`, else against the endpoint's host), plaintext
/// otherwise.
pub fn channel_lazy(
    endpoint: Endpoint,
    tls: Option<&ClientTls>,
    server_name: Option<&str>,
) -> Channel {
    match tls {
        Some(tls) => endpoint.connect_with_connector_lazy(tls.connector(server_name)),
        None => endpoint.connect_lazy(),
    }
}

/// [`channel_lazy`], connected now.
pub async fn connect(
    endpoint: Endpoint,
    tls: Option<&ClientTls>,
    server_name: Option<&str>,
) -> Result<Channel, BoxError> {
    Ok(match tls {
        Some(tls) => {
            endpoint
                .connect_with_connector(tls.connector(server_name))
                .await?
        }
        None => endpoint.connect().await?,
    })
}

/// A certificate and its key, PEM encoded.
#[derive(Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (secret).
    pub key_pem: String,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

/// A throwaway certificate authority (ECDSA P-256), for `medgemma up --tls` and tests. Never
/// for production: its key lives only in this process and the files it writes.
pub struct DevCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl fmt::Debug for DevCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

impl DevCa {
    /// A new CA named `name`, valid from a day ago for a year.
    pub fn new(name: &str) -> Result<Self, TlsError> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(365);
        let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate()?)?;
        Ok(Self { issuer })
    }

    /// The CA certificate (what servers and clients trust).
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `common_name` with `sans` (DNS names or IP addresses), usable by a
    /// server and as a client, valid from an hour ago for 30 days.
    pub fn issue(&self, common_name: &str, sans: &[&str]) -> Result<Issued, TlsError> {
        let now = time::OffsetDateTime::now_utc();
        self.issue_valid(
            common_name,
            sans,
            now - time::Duration::hours(1),
            now + time::Duration::days(30),
        )
    }

    /// [`issue`](Self::issue) with an explicit validity (tests issue expired certificates).
    pub fn issue_valid(
        &self,
        common_name: &str,
        sans: &[&str],
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Result<Issued, TlsError> {
        let mut params = rcgen::CertificateParams::new(
            sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
        )?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes `ca.pem`, and `server.pem`/`server.key` (CN `medgemma`, SANs `localhost`,
    /// `127.0.0.1`, `::1`, server and client use) into `dir`, keys readable by the owner only.
    /// Returns the paths as (server files with the CA as client CA, client files).
    pub fn write_loopback_set(
        &self,
        dir: &Path,
    ) -> Result<(ServerTlsFiles, ClientTlsFiles), TlsError> {
        std::fs::create_dir_all(dir).map_err(|source| TlsError::Read {
            path: dir.to_owned(),
            source,
        })?;
        let leaf = self.issue("medgemma", &["localhost", "127.0.0.1", "::1"])?;
        let ca = dir.join("ca.pem");
        let cert = dir.join("server.pem");
        let key = dir.join("server.key");
        write_file(&ca, self.cert_pem().as_bytes(), false)?;
        write_file(&cert, leaf.cert_pem.as_bytes(), false)?;
        write_file(&key, leaf.key_pem.as_bytes(), true)?;
        Ok((
            ServerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: Some(ca.clone()),
            },
            ClientTlsFiles {
                ca,
                identity: Some((cert, key)),
            },
        ))
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename (a reader never sees half a
/// file), owner-only when `secret`.
pub fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), TlsError> {
    let err = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp-write");
    {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if secret {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        #[cfg(not(unix))]
        let _ = secret;
        let mut f = options.open(&tmp).map_err(err)?;
        f.write_all(bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(err)
}

/// Puts the client's [`PeerCertificate`] into every request of one connection.
#[derive(Clone)]
pub(crate) struct WithPeer<S> {
    inner: S,
    peer: Option<Arc<PeerCertificate>>,
}

impl<S, B> tower_service::Service<http::Request<B>> for WithPeer<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> S::Future {
        if let Some(peer) = &self.peer {
            req.extensions_mut().insert(PeerCertificate::clone(peer));
        }
        self.inner.call(req)
    }
}

/// Handshakes one accepted connection on its own task, then serves HTTP/2 on it under the
/// graceful-shutdown `watcher`. A refused handshake (no client certificate, one from another
/// CA, an expired one, a plaintext client) is logged with the peer's address and the reason,
/// and nothing is served.
pub(crate) fn serve_tls_connection(
    tls: ServerTls,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    http2: hyper::server::conn::http2::Builder<hyper_util::rt::TokioExecutor>,
    service: crate::layer::RpcService<tonic::service::Routes>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    tokio::spawn(async move {
        let (stream, cert) = match tls.accept(stream).await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "tls handshake refused; nothing served");
                return;
            }
        };
        let service = WithPeer {
            inner: service,
            peer: cert.map(Arc::new),
        };
        let connection = http2.serve_connection(
            TokioIo::new(stream),
            hyper_util::service::TowerToHyperService::new(service),
        );
        if let Err(e) = watcher.watch(connection).await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    });
}

/// The start-up warning of a server that anyone on the network can reach in plaintext, or
/// call without a client certificate.
pub(crate) fn warn_if_exposed(addr: std::net::SocketAddr, tls: Option<&ServerTls>) {
    match tls {
        None if !addr.ip().is_loopback() => tracing::warn!(
            %addr,
            "WARNING: PLAINTEXT on a non-loopback address: anyone on the network can read and \
             send patient data; set --tls-cert and --tls-key (and --tls-client-ca on backends)"
        ),
        None => tracing::info!(%addr, "plaintext on loopback"),
        Some(t) if t.requires_client_cert() => {
            tracing::info!(%addr, files = ?t.files(), "mTLS: clients need a certificate the CA signed")
        }
        Some(t) => tracing::info!(%addr, files = ?t.files(), "TLS; clients need no certificate"),
    }
}

/// The subject of the certificate the server at `addr` presents on a new connection, checked
/// against `tls`'s CA and `server_name` (which certificate is being served after a rotation).
pub async fn probe_subject(
    addr: std::net::SocketAddr,
    tls: &ClientTls,
    server_name: &str,
) -> Result<String, BoxError> {
    let name = match server_name.parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(server_name.to_owned())?,
    };
    let tcp = TcpStream::connect(addr).await?;
    let stream = tokio_rustls::TlsConnector::from(tls.inner.current())
        .connect(name, tcp)
        .await?;
    let der = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("the server presented no certificate")?;
    Ok(subject_of(der).ok_or("unparsable certificate")?)
}
