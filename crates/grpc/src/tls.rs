//! Mutual TLS between the consul-smi services, and the plaintext policy without it.
//!
//! Every certificate, key and CA file is re-read on the first handshake after it changed
//! (cert-manager renews the Secret and the kubelet swaps the mounted files; a service that
//! kept the first certificate would start failing every handshake once it expired, and one
//! that kept the first CA could never move to a new one). Servers present their certificate
//! and accept only clients presenting a certificate signed by the configured CA; clients
//! (the translator, `consul-smi diagnostics`) present theirs and verify the server against
//! the same CA file. Without certificates, a server accepts plaintext only from loopback
//! peers unless plaintext is explicitly allowed: the writer's `Apply` changes who may talk to
//! whom in the mesh, so an unauthenticated network peer must not reach it by default.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::{debug, info, warn};

/// A client that opens a connection and never finishes the handshake must not hold a task.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress per listener; further connections wait in the kernel's accept
/// queue. Anyone who can reach the port can start one, before any certificate is checked.
const MAX_PENDING_HANDSHAKES: usize = 64;
/// At most one WARN per this interval for each kind of refused connection.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Folds repeated warnings into one per interval: each refused connection would otherwise
/// log a line, and anyone who can reach the port can cause hundreds a second.
#[derive(Debug)]
pub struct WarnThrottle {
    every: Duration,
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl WarnThrottle {
    pub fn new(every: Duration) -> WarnThrottle {
        WarnThrottle {
            every,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// `Some(n)` when an event at `now` should be warned about, `n` being how many were
    /// folded since the last warning; `None` when it should not (it is counted).
    pub fn admit(&self, now: std::time::Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (last, folded) = &mut *state;
        match last {
            Some(at) if now.duration_since(*at) < self.every => {
                *folded += 1;
                None
            }
            _ => {
                *last = Some(now);
                Some(std::mem::take(folded))
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("--tls-cert, --tls-key and --tls-ca must be given together (missing {missing})")]
    Incomplete { missing: &'static str },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("invalid gRPC address {address:?}: {reason}")]
    Address { address: String, reason: String },
}

/// Certificate paths (PEM) shared by the three services' command lines.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct TlsArgs {
    /// This service's certificate chain (PEM). With --tls-key and --tls-ca, gRPC (server and
    /// client) uses mutual TLS; the files are re-read when they change.
    #[arg(long = "tls-cert", env = "CONSUL_SMI_TLS_CERT")]
    pub cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long = "tls-key", env = "CONSUL_SMI_TLS_KEY")]
    pub key: Option<PathBuf>,
    /// The CA (PEM) that signs every peer's certificate; clients without one are refused.
    /// Every certificate in the file is trusted (old and new CA during a rotation).
    #[arg(long = "tls-ca", env = "CONSUL_SMI_TLS_CA")]
    pub ca: Option<PathBuf>,
    /// Without TLS, also accept plaintext gRPC from non-loopback peers.
    #[arg(
        long = "allow-plaintext",
        env = "CONSUL_SMI_ALLOW_PLAINTEXT",
        default_value_t = false
    )]
    pub allow_plaintext: bool,
}

/// The certificate paths of a gRPC client that serves nothing (`consul-smi diagnostics`):
/// the same flags and environment variables as [`TlsArgs`], without the server policy.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ClientTlsArgs {
    /// Client certificate chain (PEM). With --tls-key and --tls-ca, connect with mutual TLS
    /// (`http://` addresses are then dialled with TLS too).
    #[arg(long = "tls-cert", env = "CONSUL_SMI_TLS_CERT")]
    pub cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long = "tls-key", env = "CONSUL_SMI_TLS_KEY")]
    pub key: Option<PathBuf>,
    /// The CA (PEM) that signs the server's certificate.
    #[arg(long = "tls-ca", env = "CONSUL_SMI_TLS_CA")]
    pub ca: Option<PathBuf>,
}

/// The three files of a complete mTLS configuration.
#[derive(Clone, Debug)]
pub struct TlsFiles<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub ca: &'a Path,
}

impl<'a> TlsFiles<'a> {
    /// The configured files; `None` when no path is set, an error when only some are.
    pub fn from_options(
        cert: Option<&'a Path>,
        key: Option<&'a Path>,
        ca: Option<&'a Path>,
    ) -> Result<Option<TlsFiles<'a>>, TlsError> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles { cert, key, ca })),
            (cert, key, _) => Err(TlsError::Incomplete {
                missing: if cert.is_none() {
                    "--tls-cert"
                } else if key.is_none() {
                    "--tls-key"
                } else {
                    "--tls-ca"
                },
            }),
        }
    }
}

impl TlsArgs {
    /// The configured files; `None` when no TLS flag is set, an error when only some are.
    pub fn files(&self) -> Result<Option<TlsFiles<'_>>, TlsError> {
        TlsFiles::from_options(
            self.cert.as_deref(),
            self.key.as_deref(),
            self.ca.as_deref(),
        )
    }

    /// The rustls server configuration (client certificates required), if TLS is configured.
    pub fn server_config(&self) -> Result<Option<rustls::ServerConfig>, TlsError> {
        self.files()?.map(|files| server_config(&files)).transpose()
    }

    /// The connector for this service's gRPC clients, if TLS is configured. Clone it for
    /// every endpoint: the clones share one view of the files.
    pub fn connector(&self) -> Result<Option<TlsConnector>, TlsError> {
        self.files()?
            .map(|files| TlsConnector::new(&files))
            .transpose()
    }

    /// The accepted connections of `listener` for `tonic::transport::Server::serve_with_incoming*`:
    /// TLS handshakes when configured, otherwise plaintext filtered by [`plaintext_allowed`].
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> Result<tokio_stream::wrappers::ReceiverStream<io::Result<ServerIo>>, TlsError> {
        let tls = self.server_config()?;
        Ok(incoming(listener, tls, self.allow_plaintext))
    }
}

impl ClientTlsArgs {
    /// The configured files; `None` when no TLS flag is set, an error when only some are.
    pub fn files(&self) -> Result<Option<TlsFiles<'_>>, TlsError> {
        TlsFiles::from_options(
            self.cert.as_deref(),
            self.key.as_deref(),
            self.ca.as_deref(),
        )
    }

    /// The client connector, if TLS is configured.
    pub fn connector(&self) -> Result<Option<TlsConnector>, TlsError> {
        self.files()?
            .map(|files| TlsConnector::new(&files))
            .transpose()
    }
}

/// Whether a plaintext connection from `peer` may be served: loopback always (the local
/// e2e/demo setup and sidecars), anything else only when explicitly allowed.
pub fn plaintext_allowed(peer: SocketAddr, allow_plaintext: bool) -> bool {
    allow_plaintext || peer.ip().to_canonical().is_loopback()
}

/// A server configuration presenting the (reloading) certificate at `files.cert`/`files.key`
/// and requiring a client certificate signed by a CA in (the current) `files.ca`.
pub fn server_config(files: &TlsFiles<'_>) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = ReloadingClientCertVerifier::load(files.ca, provider.clone())?;
    let resolver = ReloadingCertificate::load(files.cert, files.key, provider.clone())?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec()];
    // A resumed session skips client certificate verification: without resumption, a client
    // whose CA was removed from --tls-ca is refused on its next connection, not only once
    // its session expires. gRPC connections are long-lived, so the saved handshakes are few.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A client configuration presenting the (reloading) certificate at `files.cert`/`files.key`
/// and verifying the server against (the current) `files.ca`.
pub fn client_config(files: &TlsFiles<'_>) -> Result<rustls::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = ReloadingServerCertVerifier::load(files.ca, provider.clone())?;
    let resolver = ReloadingCertificate::load(files.cert, files.key, provider.clone())?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        // Still WebPKI verification, only with roots that follow the CA file.
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec()];
    // Every connection verifies the server against the current CA file.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Spawns the accept loop; the stream ends (and the loop stops) when the server drops it.
pub fn incoming(
    listener: TcpListener,
    tls: Option<rustls::ServerConfig>,
    allow_plaintext: bool,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<ServerIo>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    let acceptor = tls.map(|tls| TlsAcceptor::from(Arc::new(tls)));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    let refused_plaintext = WarnThrottle::new(WARN_EVERY);
    let failed_handshakes = Arc::new(WarnThrottle::new(WARN_EVERY));
    tokio::spawn(async move {
        loop {
            let handshake = match &acceptor {
                Some(_) => tokio::select! {
                    slot = handshakes.clone().acquire_owned() => slot.ok(),
                    _ = sender.closed() => return,
                },
                None => None,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and similar: back off instead of spinning.
                        warn!(error = %e, "accepting a gRPC connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = sender.closed() => return,
            };
            // Small messages (deltas, acks) should leave at once, not wait for Nagle.
            let _ = stream.set_nodelay(true);
            match &acceptor {
                None if plaintext_allowed(peer, allow_plaintext) => {
                    if sender.send(Ok(ServerIo::Plain(stream))).await.is_err() {
                        return;
                    }
                }
                None => match refused_plaintext.admit(std::time::Instant::now()) {
                    Some(folded) => warn!(
                        %peer,
                        more_since_last_warning = folded,
                        "refused a plaintext gRPC connection from a non-loopback peer \
                         (configure --tls-cert/--tls-key/--tls-ca, or --allow-plaintext)"
                    ),
                    None => debug!(%peer, "refused a plaintext gRPC connection"),
                },
                Some(acceptor) => {
                    let acceptor = acceptor.clone();
                    let sender = sender.clone();
                    let failed_handshakes = failed_handshakes.clone();
                    tokio::spawn(async move {
                        let accepted =
                            tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                        drop(handshake);
                        match accepted {
                            Ok(Ok(tls)) => {
                                let _ = sender.send(Ok(ServerIo::Tls(Box::new(tls)))).await;
                            }
                            Ok(Err(e)) => {
                                match failed_handshakes.admit(std::time::Instant::now()) {
                                    Some(folded) => warn!(
                                        %peer,
                                        error = %e,
                                        more_since_last_warning = folded,
                                        "gRPC TLS handshake failed"
                                    ),
                                    None => debug!(%peer, error = %e, "gRPC TLS handshake failed"),
                                }
                            }
                            Err(_) => debug!(%peer, "gRPC TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

/// An accepted connection, plaintext or TLS.
pub enum ServerIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connected for ServerIo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            ServerIo::Plain(stream) => stream.connect_info(),
            ServerIo::Tls(stream) => stream.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerIo::Plain(s) => s.is_write_vectored(),
            ServerIo::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// What identifies a version of a file: a rewrite in place changes the mtime and usually the
/// length, the kubelet's symlink swap and a rename-over change the inode even within one
/// mtime tick of a coarse filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn file_stamp(path: &Path) -> Option<FileStamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some(FileStamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode,
    })
}

type Loader<T> = Box<dyn Fn() -> Result<T, TlsError> + Send + Sync>;

/// A value built from files, rebuilt on the first use after any of them changed. A failed
/// rebuild (mid-rotation: new certificate, old key; a partial write; a CA file being
/// replaced) keeps the previous value and is retried once the files change again, so a file
/// that stays broken costs neither a reload nor a warning per handshake.
struct Reloading<T> {
    what: &'static str,
    paths: Vec<PathBuf>,
    load: Loader<T>,
    current: RwLock<LoadedFrom<T>>,
}

struct LoadedFrom<T> {
    /// The files' stamps when `value` was built.
    stamps: Vec<Option<FileStamp>>,
    value: Arc<T>,
    /// The stamps of the last version that failed to load, if any.
    failed: Option<Vec<Option<FileStamp>>>,
}

impl<T> LoadedFrom<T> {
    fn is_current(&self, stamps: &[Option<FileStamp>]) -> bool {
        self.stamps == stamps || self.failed.as_deref() == Some(stamps)
    }
}

impl<T> Reloading<T> {
    fn new(what: &'static str, paths: Vec<PathBuf>, load: Loader<T>) -> Result<Self, TlsError> {
        let stamps = paths.iter().map(|p| file_stamp(p)).collect();
        let value = Arc::new(load()?);
        Ok(Reloading {
            what,
            paths,
            load,
            current: RwLock::new(LoadedFrom {
                stamps,
                value,
                failed: None,
            }),
        })
    }

    fn get(&self) -> Arc<T> {
        // Stamped before reading: a change during the read is seen again next time.
        let stamps: Vec<_> = self.paths.iter().map(|p| file_stamp(p)).collect();
        {
            let current = self.current.read().unwrap_or_else(|p| p.into_inner());
            if current.is_current(&stamps) {
                return current.value.clone();
            }
        }
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.is_current(&stamps) {
            return current.value.clone();
        }
        match (self.load)() {
            Ok(value) => {
                info!(file = %self.paths[0].display(), "reloaded the TLS {}", self.what);
                *current = LoadedFrom {
                    stamps,
                    value: Arc::new(value),
                    failed: None,
                };
            }
            Err(e) => {
                warn!(
                    error = %e,
                    "cannot reload the TLS {}; keeping the previous one until the files change",
                    self.what
                );
                current.failed = Some(stamps);
            }
        }
        current.value.clone()
    }
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("what", &self.what)
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

/// A certificate/key pair re-read on the first handshake after either file changes; serves
/// as a server's certificate and as a client's certificate.
#[derive(Debug)]
pub struct ReloadingCertificate {
    current: Reloading<CertifiedKey>,
}

impl ReloadingCertificate {
    pub fn load(
        cert: &Path,
        key: &Path,
        provider: Arc<CryptoProvider>,
    ) -> Result<ReloadingCertificate, TlsError> {
        let (cert, key) = (cert.to_path_buf(), key.to_path_buf());
        let paths = vec![cert.clone(), key.clone()];
        let load = move || load_certified_key(&cert, &key, &provider);
        Ok(ReloadingCertificate {
            current: Reloading::new("certificate", paths, Box::new(load))?,
        })
    }
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.get())
    }
}

impl ResolvesClientCert for ReloadingCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let certified = self.current.get();
        // Without a usable scheme, sending no certificate makes the server's refusal say so.
        certified
            .key
            .choose_scheme(sigschemes)
            .is_some()
            .then_some(certified)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The roots of a CA file: every certificate in it (during a CA rotation it holds the old and
/// the new CA).
fn load_roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_chain(ca)? {
        roots.add(cert).map_err(|e| TlsError::File {
            path: ca.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

/// A server's verification of client certificates against the CA file, rebuilt on the first
/// handshake after the file changes.
#[derive(Debug)]
pub struct ReloadingClientCertVerifier {
    current: Reloading<Arc<dyn ClientCertVerifier>>,
}

impl ReloadingClientCertVerifier {
    pub fn load(
        ca: &Path,
        provider: Arc<CryptoProvider>,
    ) -> Result<ReloadingClientCertVerifier, TlsError> {
        let path = ca.to_path_buf();
        let load = move || -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
            WebPkiClientVerifier::builder_with_provider(load_roots(&path)?, provider.clone())
                .build()
                .map_err(|e| TlsError::File {
                    path: path.clone(),
                    reason: e.to_string(),
                })
        };
        Ok(ReloadingClientCertVerifier {
            current: Reloading::new("CA", vec![ca.to_path_buf()], Box::new(load))?,
        })
    }
}

impl ClientCertVerifier for ReloadingClientCertVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    // The hints would borrow from a verifier that a reload may replace. No hint is valid TLS:
    // the client then sends the certificate it has, and every consul-smi client has one.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current
            .get()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .get()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .get()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current.get().supported_verify_schemes()
    }
}

/// A client's verification of the server certificate (chain and name) against the CA file,
/// rebuilt on the first handshake after the file changes.
#[derive(Debug)]
pub struct ReloadingServerCertVerifier {
    current: Reloading<Arc<WebPkiServerVerifier>>,
}

impl ReloadingServerCertVerifier {
    pub fn load(
        ca: &Path,
        provider: Arc<CryptoProvider>,
    ) -> Result<ReloadingServerCertVerifier, TlsError> {
        let path = ca.to_path_buf();
        let load = move || {
            WebPkiServerVerifier::builder_with_provider(load_roots(&path)?, provider.clone())
                .build()
                .map_err(|e| TlsError::File {
                    path: path.clone(),
                    reason: e.to_string(),
                })
        };
        Ok(ReloadingServerCertVerifier {
            current: Reloading::new("CA", vec![ca.to_path_buf()], Box::new(load))?,
        })
    }
}

impl ServerCertVerifier for ReloadingServerCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.current.get().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .get()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .get()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current.get().supported_verify_schemes()
    }
}

/// Dials a gRPC server and runs the TLS client handshake with the current certificate and CA
/// (a tower `Service<Uri>` for `Endpoint::connect_with_connector`; tonic calls it for every
/// connection, reconnects included). The server name is the URI's host, DNS name or IP.
#[derive(Clone)]
pub struct TlsConnector {
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector").finish_non_exhaustive()
    }
}

impl TlsConnector {
    pub fn new(files: &TlsFiles<'_>) -> Result<TlsConnector, TlsError> {
        Ok(TlsConnector {
            tls: tokio_rustls::TlsConnector::from(Arc::new(client_config(files)?)),
        })
    }
}

type ClientStream = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower::Service<Uri> for TlsConnector {
    type Response = ClientStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<ClientStream>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let invalid = |reason: String| io::Error::new(io::ErrorKind::InvalidInput, reason);
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("no host in {uri}")))?;
            // The authority form of an IPv6 address is bracketed; names and sockets are not.
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let server_name = ServerName::try_from(host.clone())
                .map_err(|e| invalid(format!("server name {host:?}: {e}")))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            // Small messages (deltas, acks) should leave at once, not wait for Nagle.
            tcp.set_nodelay(true)?;
            Ok(TokioIo::new(tls.connect(server_name, tcp).await?))
        })
    }
}

/// A gRPC server address with the way to reach it: plaintext, or mutual TLS through a
/// [`TlsConnector`] (every connection and reconnection of its channels reads the current
/// certificate and CA).
#[derive(Clone, Debug)]
pub struct ClientEndpoint {
    endpoint: Endpoint,
    tls: Option<TlsConnector>,
}

impl ClientEndpoint {
    /// `address` is `http://host:port` or `https://host:port`. With `tls`, both are dialled
    /// with TLS (the defaults and existing manifests say `http://`) and the server's
    /// certificate must name `host`; without, `https://` cannot connect.
    pub fn new(address: &str, tls: Option<TlsConnector>) -> Result<ClientEndpoint, TlsError> {
        let error = |reason: &dyn std::fmt::Display| TlsError::Address {
            address: address.to_string(),
            reason: reason.to_string(),
        };
        let endpoint = match &tls {
            None => Endpoint::from_shared(address.to_string()).map_err(|e| error(&e))?,
            Some(_) => {
                let uri: Uri = address.parse().map_err(|e| error(&e))?;
                let default_port = match uri.scheme_str() {
                    Some("http") => 80,
                    Some("https") => 443,
                    _ => return Err(error(&"expected http://host:port or https://host:port")),
                };
                let authority = uri.authority().ok_or_else(|| error(&"no host"))?;
                let host_port = match authority.port_u16() {
                    Some(_) => authority.to_string(),
                    None => format!("{authority}:{default_port}"),
                };
                // tonic refuses `https://` with a connector of our own (it would add its own
                // TLS): it dials the `http://` form through the connector, which does TLS,
                // and requests name the `https://` origin.
                let origin: Uri = format!("https://{host_port}")
                    .parse()
                    .map_err(|e| error(&e))?;
                Endpoint::from_shared(format!("http://{host_port}"))
                    .map_err(|e| error(&e))?
                    .origin(origin)
            }
        };
        Ok(ClientEndpoint { endpoint, tls })
    }

    /// The same address with tonic's endpoint settings changed (timeouts, keepalive...).
    pub fn configure(self, configure: impl FnOnce(Endpoint) -> Endpoint) -> ClientEndpoint {
        ClientEndpoint {
            endpoint: configure(self.endpoint),
            tls: self.tls,
        }
    }

    /// The URI that is dialled.
    pub fn uri(&self) -> &Uri {
        self.endpoint.uri()
    }

    /// A channel connected now. tonic reconnects a failed channel through the same connector.
    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        match &self.tls {
            Some(tls) => self.endpoint.connect_with_connector(tls.clone()).await,
            None => self.endpoint.connect().await,
        }
    }

    /// A channel that connects on first use.
    pub fn connect_lazy(&self) -> Channel {
        match &self.tls {
            Some(tls) => self.endpoint.connect_with_connector_lazy(tls.clone()),
            None => self.endpoint.connect_lazy(),
        }
    }
}

fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = |e: &dyn std::fmt::Display| TlsError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(&e))?;
    if chain.is_empty() {
        return Err(error(&"no certificate in file"));
    }
    Ok(chain)
}

fn load_certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = load_chain(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
        path: key.to_path_buf(),
        reason: e.to_string(),
    })?;
    CertifiedKey::from_der(chain, key_der, provider).map_err(|e| TlsError::File {
        path: key.to_path_buf(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    /// Issue 24, finding 12: one WARN per refused handshake let anyone who can reach the
    /// port write 500 lines a second.
    #[test]
    fn repeated_warnings_are_folded_into_one_per_interval() {
        let throttle = super::WarnThrottle::new(std::time::Duration::from_secs(10));
        let start = std::time::Instant::now();
        assert_eq!(throttle.admit(start), Some(0));
        let admitted = (1..1000)
            .filter(|i| {
                throttle
                    .admit(start + std::time::Duration::from_millis(*i))
                    .is_some()
            })
            .count();
        assert_eq!(admitted, 0);
        assert_eq!(
            throttle.admit(start + std::time::Duration::from_secs(10)),
            Some(999),
            "the next warning says how many were folded"
        );
    }

    use super::*;

    #[test]
    fn plaintext_only_from_loopback_unless_allowed() {
        let peer = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(plaintext_allowed(peer("127.0.0.1:5000"), false));
        assert!(plaintext_allowed(peer("127.0.0.2:5000"), false));
        assert!(plaintext_allowed(peer("[::1]:5000"), false));
        assert!(plaintext_allowed(peer("[::ffff:127.0.0.1]:5000"), false));
        assert!(!plaintext_allowed(peer("10.0.0.7:5000"), false));
        assert!(!plaintext_allowed(peer("[::ffff:10.0.0.7]:5000"), false));
        assert!(!plaintext_allowed(peer("[fd00::1]:5000"), false));
        assert!(plaintext_allowed(peer("10.0.0.7:5000"), true));
    }

    #[test]
    fn partial_configuration_is_an_error() {
        let args = TlsArgs {
            cert: Some("c.pem".into()),
            key: Some("k.pem".into()),
            ..TlsArgs::default()
        };
        assert!(matches!(
            args.files(),
            Err(TlsError::Incomplete {
                missing: "--tls-ca"
            })
        ));
        assert!(TlsArgs::default().files().unwrap().is_none());
    }

    #[test]
    fn a_file_that_stays_broken_is_loaded_once_and_the_previous_value_kept() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "good").unwrap();
        let loads = Arc::new(AtomicU32::new(0));
        let load = {
            let (path, loads) = (path.clone(), loads.clone());
            Box::new(move || {
                loads.fetch_add(1, Ordering::Relaxed);
                let text = std::fs::read_to_string(&path).unwrap();
                match text.starts_with("good") {
                    true => Ok(text),
                    false => Err(TlsError::Config(format!("unusable: {text}"))),
                }
            })
        };
        let reloading = Reloading::new("test", vec![path.clone()], load).unwrap();
        assert_eq!(*reloading.get(), "good");

        // Same length as before: the inode (a new file renamed over, as the kubelet does)
        // or the mtime must give the change away.
        let replace = |text: &str| {
            let next = dir.path().join("next.pem");
            std::fs::write(&next, text).unwrap();
            std::fs::rename(&next, &path).unwrap();
        };
        replace("bad!");
        assert_eq!(*reloading.get(), "good");
        assert_eq!(*reloading.get(), "good");
        assert_eq!(
            loads.load(Ordering::Relaxed),
            2,
            "the broken version is tried once"
        );

        replace("good, rotated");
        assert_eq!(*reloading.get(), "good, rotated");
        assert_eq!(loads.load(Ordering::Relaxed), 3);
    }
}
