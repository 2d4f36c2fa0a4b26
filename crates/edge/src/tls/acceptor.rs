//! Our own TLS front door, in front of tonic's HTTP/2 server:
//! - TLS 1.3 only unless `tls.allow_tls12`; client certificates required and
//!   verified against the client CA;
//! - the server certificate, key and client CA re-read when their files
//!   change: new handshakes use the new material, open connections (and
//!   their streams) are not touched;
//! - at most `max_connections` connections (beyond: closed at once, not
//!   queued), and a handshake deadline, so peers that connect and never send
//!   a ClientHello cannot hold descriptors;
//! - an accept error (EMFILE when descriptors run out) backs off instead of
//!   spinning.

use std::{
    io,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use rustls::{
    ServerConfig,
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use super::TlsConfig;

/// What a handler can learn about the connection (a request extension).
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// The verified client certificate chain, leaf first; the same `Arc`
    /// for every request of the connection.
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// Admission limits of the front door.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Time a peer has to finish the TLS handshake.
    pub handshake_timeout: Duration,
}

/// The server TLS configuration, rebuilt when its files change.
pub struct ReloadingTls {
    files: TlsConfig,
    current: ArcSwap<ServerConfig>,
    stamps: std::sync::Mutex<Vec<Option<SystemTime>>>,
}

fn stamps(files: &TlsConfig) -> Vec<Option<SystemTime>> {
    [&files.cert, &files.key, &files.client_ca]
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

fn read(key: &str, path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{key}: cannot read {}", path.display()))
}

/// Builds a rustls server configuration from the files.
///
/// # Errors
/// A message naming the `tls.*` key whose file is missing or unusable.
pub fn build(files: &TlsConfig) -> anyhow::Result<ServerConfig> {
    let certs = CertificateDer::pem_slice_iter(&read("tls.cert", &files.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .context("tls.cert: not a PEM certificate chain")?;
    anyhow::ensure!(!certs.is_empty(), "tls.cert: no certificate in the file");
    let key = PrivateKeyDer::from_pem_slice(&read("tls.key", &files.key)?)
        .context("tls.key: not a PEM private key")?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read("tls.client_ca", &files.client_ca)?) {
        roots
            .add(ca.context("tls.client_ca: not a PEM certificate")?)
            .context("tls.client_ca: not a usable CA certificate")?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "tls.client_ca: no certificate in the file"
    );
    let verifier: Arc<dyn ClientCertVerifier> = WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .context("tls.client_ca: cannot verify clients with it")?;
    let versions: &[&rustls::SupportedProtocolVersion] = if files.allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut cfg = ServerConfig::builder_with_protocol_versions(versions)
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .context("tls.cert/tls.key: the key does not match the certificate")?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

impl ReloadingTls {
    /// Loads the files once.
    ///
    /// # Errors
    /// See [`build`].
    pub fn load(files: &TlsConfig) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(build(files)?),
            stamps: std::sync::Mutex::new(stamps(files)),
            files: files.clone(),
        }))
    }

    /// Rebuilds the configuration if a file changed; a broken new file
    /// keeps the last good configuration (and says so).
    pub fn reload_if_changed(&self) {
        let now = stamps(&self.files);
        let mut seen = self
            .stamps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *seen == now {
            return;
        }
        match build(&self.files) {
            Ok(cfg) => {
                self.current.store(Arc::new(cfg));
                *seen = now;
                tracing::info!("TLS certificate, key or client CA changed: reloaded");
            }
            Err(e) => tracing::warn!(
                "TLS files changed but cannot be used, keeping the previous ones: {e:#}"
            ),
        }
    }

    /// Polls the files every `every` until cancelled.
    pub async fn task_main(self: Arc<Self>, every: Duration, cancel: CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(every) => self.reload_if_changed(),
            }
        }
    }
}

/// One accepted, handshaken connection; its slot is freed when it closes.
pub struct Conn {
    tls: TlsStream<TcpStream>,
    info: PeerInfo,
    _slot: OwnedSemaphorePermit,
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// Accepts on `listener` until cancelled, yielding handshaken connections.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
    limits: ConnLimits,
    cancel: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    tokio::spawn(async move {
        let mut refused_logged = false;
        loop {
            let accepted = tokio::select! {
                () = cancel.cancelled() => return,
                a = listener.accept() => a,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: wait for descriptors to come
                    // back instead of spinning on the error.
                    tracing::warn!("accept failed, pausing: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                if !refused_logged {
                    tracing::warn!(
                        max = limits.max_connections,
                        "connection limit reached; closing new connections until some end"
                    );
                    refused_logged = true;
                }
                drop(tcp);
                continue;
            };
            refused_logged = false;
            let _ = tcp.set_nodelay(true);
            let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(
                &socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)),
            );
            let acceptor = TlsAcceptor::from(tls.current.load_full());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let certs =
                            stream.get_ref().1.peer_certificates().map(|c| {
                                Arc::new(c.iter().map(|d| d.clone().into_owned()).collect())
                            });
                        let conn = Conn {
                            tls: stream,
                            info: PeerInfo {
                                remote: Some(remote),
                                certs,
                            },
                            _slot: slot,
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, "TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
