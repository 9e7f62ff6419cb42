//! TLS and mutual TLS for the KEDA gRPC listener, with certificates re-read when their files
//! change (cert-manager rotates them in place).
//!
//! The files are polled every [`TlsSettings::reload_interval`]: when their bytes differ from
//! the ones last loaded, a new rustls [`ServerConfig`] is built and used for every connection
//! accepted from then on; connections already open keep the certificate they were made with.
//! A change that does not load (say the certificate was written before its key) keeps the
//! previous configuration and is logged once; the next poll tries again. Polling the bytes
//! rather than watching inotify events also works for Kubernetes Secret volumes, whose files
//! are swapped through a symlink.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// How often the certificate files are compared with the loaded ones, by default.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// Limit of one TLS handshake; a client that stalls longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; connections beyond it are closed at once.
const MAX_PENDING_HANDSHAKES: usize = 256;

/// Where the gRPC listener's certificate, key and (for mTLS) client CA are.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first (`--tls-cert`).
    pub cert: PathBuf,
    /// PEM private key, PKCS#8, PKCS#1 or SEC1 (`--tls-key`).
    pub key: PathBuf,
    /// PEM CA bundle; when set, clients must present a certificate it signed (`--tls-client-ca`).
    pub client_ca: Option<PathBuf>,
    /// How often the files are checked for changes.
    pub reload_interval: Duration,
}

/// One of the TLS files, named by its flag in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    /// `--tls-cert`.
    Cert,
    /// `--tls-key`.
    Key,
    /// `--tls-client-ca`.
    ClientCa,
}

impl TlsFile {
    /// The flag that names this file.
    pub fn flag(self) -> &'static str {
        match self {
            TlsFile::Cert => "--tls-cert",
            TlsFile::Key => "--tls-key",
            TlsFile::ClientCa => "--tls-client-ca",
        }
    }
}

/// The TLS files cannot be turned into a server configuration.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct TlsError {
    /// Which file is at fault.
    pub file: TlsFile,
    /// Its path, for the message.
    pub path: String,
    /// What is wrong with it.
    pub reason: String,
}

impl TlsError {
    fn new(file: TlsFile, path: &Path, reason: impl fmt::Display) -> Self {
        TlsError {
            file,
            path: path.display().to_string(),
            reason: reason.to_string(),
        }
    }
}

/// The bytes of the files as read, to notice changes.
#[derive(Clone, PartialEq, Eq)]
struct Material {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl TlsSettings {
    fn read(&self) -> Result<Material, TlsError> {
        let read = |file, path: &Path| {
            std::fs::read(path).map_err(|error| TlsError::new(file, path, error))
        };
        Ok(Material {
            cert: read(TlsFile::Cert, &self.cert)?,
            key: read(TlsFile::Key, &self.key)?,
            client_ca: match &self.client_ca {
                Some(path) => Some(read(TlsFile::ClientCa, path)?),
                None => None,
            },
        })
    }

    fn build(&self, material: &Material) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let chain = CertificateDer::pem_slice_iter(&material.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| TlsError::new(TlsFile::Cert, &self.cert, error))?;
        if chain.is_empty() {
            return Err(TlsError::new(
                TlsFile::Cert,
                &self.cert,
                "no PEM certificate in the file",
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(&material.key)
            .map_err(|error| TlsError::new(TlsFile::Key, &self.key, error))?;

        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsError::new(TlsFile::Cert, &self.cert, error))?;
        let builder = match (&self.client_ca, &material.client_ca) {
            (Some(path), Some(pem)) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert =
                        cert.map_err(|error| TlsError::new(TlsFile::ClientCa, path, error))?;
                    roots
                        .add(cert)
                        .map_err(|error| TlsError::new(TlsFile::ClientCa, path, error))?;
                }
                if roots.is_empty() {
                    return Err(TlsError::new(
                        TlsFile::ClientCa,
                        path,
                        "no PEM certificate in the file",
                    ));
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|error| TlsError::new(TlsFile::ClientCa, path, error))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        // Checks that the key belongs to the leaf certificate.
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|error| TlsError::new(TlsFile::Key, &self.key, error))?;
        // gRPC clients (grpc-go in KEDA among them) require HTTP/2 chosen by ALPN.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// Reads and checks the files: the certificate chain and key parse and match, the client
    /// CA bundle parses.
    pub fn load(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.build(&self.read()?)
    }
}

/// The TLS configuration in force for new connections, replaced when the files change.
pub struct ReloadingTls {
    settings: TlsSettings,
    loaded: Material,
    current: watch::Sender<Arc<ServerConfig>>,
}

impl ReloadingTls {
    /// Loads the files once; an error names the file at fault.
    pub fn load(settings: TlsSettings) -> Result<Self, TlsError> {
        let loaded = settings.read()?;
        let config = settings.build(&loaded)?;
        Ok(ReloadingTls {
            settings,
            loaded,
            current: watch::Sender::new(config),
        })
    }

    /// The configuration new connections use.
    pub fn current(&self) -> watch::Receiver<Arc<ServerConfig>> {
        self.current.subscribe()
    }

    /// Polls the files until `shutdown` and swaps in a new configuration when they change.
    pub async fn watch_files(mut self, shutdown: CancellationToken) {
        let mut failed: Option<Material> = None;
        let mut ticks = tokio::time::interval(self.settings.reload_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let settings = self.settings.clone();
            let read = tokio::task::spawn_blocking(move || settings.read()).await;
            let material = match read {
                Ok(Ok(material)) => material,
                Ok(Err(error)) => {
                    tracing::warn!(flag = error.file.flag(), %error, "Cannot read a TLS file; keeping the loaded certificate.");
                    continue;
                }
                Err(_) => continue,
            };
            if material == self.loaded || failed.as_ref() == Some(&material) {
                continue;
            }
            match self.settings.build(&material) {
                Ok(config) => {
                    self.current.send_replace(config);
                    self.loaded = material;
                    failed = None;
                    tracing::info!("Reloaded the gRPC TLS certificate; new connections use it.");
                }
                Err(error) => {
                    tracing::warn!(flag = error.file.flag(), %error, "Changed TLS files do not load; keeping the previous certificate.");
                    failed = Some(material);
                }
            }
        }
    }
}

/// Accepts TCP connections on `listener`, runs their TLS handshakes concurrently with the
/// configuration current at accept time, and hands the established streams to the gRPC
/// server through the returned stream. The returned future is the accept loop: it ends on
/// `shutdown` or when the gRPC server drops the stream. A failed handshake (no client
/// certificate when one is required, say) closes that connection only.
pub fn accept_loop(
    listener: TcpListener,
    config: watch::Receiver<Arc<ServerConfig>>,
    shutdown: CancellationToken,
) -> (
    ReceiverStream<TlsStream<TcpStream>>,
    impl Future<Output = ()> + Send + 'static,
) {
    let (established, incoming) = mpsc::channel(64);
    let run = async move {
        let mut handshakes = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        if handshakes.len() >= MAX_PENDING_HANDSHAKES {
                            tracing::warn!(%peer, "Too many TLS handshakes in progress; closing the connection.");
                            continue;
                        }
                        // Small stream messages must not wait for a delayed ACK (Nagle).
                        let _ = tcp.set_nodelay(true);
                        let acceptor = TlsAcceptor::from(Arc::clone(&config.borrow()));
                        handshakes.spawn(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                                Ok(Ok(stream)) => Some(stream),
                                Ok(Err(error)) => {
                                    tracing::debug!(%peer, %error, "TLS handshake failed.");
                                    None
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "TLS handshake timed out.");
                                    None
                                }
                            }
                        });
                    }
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(%error, "Cannot accept a gRPC connection.");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(done) = handshakes.join_next() => {
                    if let Ok(Some(stream)) = done
                        && established.send(stream).await.is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    (ReceiverStream::new(incoming), run)
}
