//! Mutual TLS between the consul-smi services, and the plaintext policy without it.
//!
//! Servers present a certificate that is re-read whenever its files change (cert-manager
//! renews the Secret and the kubelet swaps the mounted files; a server that kept the first
//! certificate would start failing every handshake once it expired) and accept only clients
//! presenting a certificate signed by the configured CA. Without certificates, a server
//! accepts plaintext only from loopback peers unless plaintext is explicitly allowed: the
//! writer's `Apply` changes who may talk to whom in the mesh, so an unauthenticated network
//! peer must not reach it by default.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, info, warn};

/// A client that opens a connection and never finishes the handshake must not hold a task.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("--tls-cert, --tls-key and --tls-ca must be given together (missing {missing})")]
    Incomplete { missing: &'static str },
    #[error("TLS configuration: {0}")]
    Config(String),
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

/// The three files of a complete mTLS configuration.
#[derive(Clone, Debug)]
pub struct TlsFiles<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub ca: &'a Path,
}

impl TlsArgs {
    /// The configured files; `None` when no TLS flag is set, an error when only some are.
    pub fn files(&self) -> Result<Option<TlsFiles<'_>>, TlsError> {
        match (&self.cert, &self.key, &self.ca) {
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

    /// The rustls server configuration (client certificates required), if TLS is configured.
    pub fn server_config(&self) -> Result<Option<rustls::ServerConfig>, TlsError> {
        self.files()?.map(|files| server_config(&files)).transpose()
    }

    /// The tonic client configuration (CA + client identity), if TLS is configured.
    pub fn client_config(&self) -> Result<Option<tonic::transport::ClientTlsConfig>, TlsError> {
        let Some(files) = self.files()? else {
            return Ok(None);
        };
        let ca = read(files.ca)?;
        let cert = read(files.cert)?;
        let key = read(files.key)?;
        Ok(Some(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .identity(tonic::transport::Identity::from_pem(cert, key)),
        ))
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

/// Whether a plaintext connection from `peer` may be served: loopback always (the local
/// e2e/demo setup and sidecars), anything else only when explicitly allowed.
pub fn plaintext_allowed(peer: SocketAddr, allow_plaintext: bool) -> bool {
    allow_plaintext || peer.ip().to_canonical().is_loopback()
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// A server configuration presenting the (reloading) certificate at `files.cert`/`files.key`
/// and requiring a client certificate signed by `files.ca`.
pub fn server_config(files: &TlsFiles<'_>) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in load_chain(files.ca)? {
        roots.add(ca).map_err(|e| TlsError::File {
            path: files.ca.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let resolver = ReloadingCertificate::load(files.cert, files.key, provider.clone())?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec()];
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
    tokio::spawn(async move {
        loop {
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
                None => warn!(
                    %peer,
                    "refused a plaintext gRPC connection from a non-loopback peer \
                     (configure --tls-cert/--tls-key/--tls-ca, or --allow-plaintext)"
                ),
                Some(acceptor) => {
                    let acceptor = acceptor.clone();
                    let sender = sender.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                        {
                            Ok(Ok(tls)) => {
                                let _ = sender.send(Ok(ServerIo::Tls(Box::new(tls)))).await;
                            }
                            Ok(Err(e)) => warn!(%peer, error = %e, "gRPC TLS handshake failed"),
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

type Stamp = (Option<SystemTime>, Option<SystemTime>);

/// A certificate/key pair re-read on the first handshake after either file's mtime changes.
#[derive(Debug)]
pub struct ReloadingCertificate {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<(Stamp, Arc<CertifiedKey>)>,
}

impl ReloadingCertificate {
    pub fn load(
        cert: &Path,
        key: &Path,
        provider: Arc<CryptoProvider>,
    ) -> Result<ReloadingCertificate, TlsError> {
        let stamp = stamp(cert, key);
        let certified = Arc::new(load_certified_key(cert, key, &provider)?);
        Ok(ReloadingCertificate {
            cert_path: cert.to_path_buf(),
            key_path: key.to_path_buf(),
            provider,
            current: RwLock::new((stamp, certified)),
        })
    }
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let stamp = stamp(&self.cert_path, &self.key_path);
        {
            let current = self.current.read().unwrap_or_else(|p| p.into_inner());
            if current.0 == stamp {
                return Some(current.1.clone());
            }
        }
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        match load_certified_key(&self.cert_path, &self.key_path, &self.provider) {
            Ok(certified) => {
                info!(cert = %self.cert_path.display(), "reloaded the TLS certificate");
                *current = (stamp, Arc::new(certified));
            }
            // Mid-rotation (new certificate, old key) or a partial write: keep serving the
            // previous pair and try again on the next handshake.
            Err(e) => {
                warn!(error = %e, "cannot reload the TLS certificate; keeping the previous one")
            }
        }
        Some(current.1.clone())
    }
}

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (modified(cert), modified(key))
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
}
