//! Accepting TLS connections with a config that can change (certificate reload), and telling
//! plaintext clients that TLS is required.
//!
//! Each accepted connection is handshaken in its own task (a slow or silent client does not
//! hold up the others), within [`HANDSHAKE_TIMEOUT`]. The first byte tells a TLS client
//! (a handshake record, 0x16) from a plaintext one; a plaintext gRPC client is answered with an
//! UNAUTHENTICATED status that says "requires TLS" instead of a reset connection, and a
//! plaintext HTTP client with a 400 that says to use https.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use super::ServerTls;
use crate::raft::NodeId;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const QUEUE: usize = 64;

/// What a connection's client certificate says it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerIdentity {
    /// No certificate (a client with a token, or none).
    None,
    /// A node's certificate (common name `raftkv-node-<id>`).
    Node(NodeId),
    /// A user's certificate (its common name).
    User(String),
}

/// What a request's connection is: tonic puts it in every request's extensions.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub peer: PeerIdentity,
}

/// A handshaken TLS connection and who is on the other end.
pub struct Conn {
    stream: TlsStream<TcpStream>,
    info: ConnInfo,
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Which server a listener feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// The gRPC port (HTTP/2).
    Grpc,
    /// The HTTP endpoint (/metrics, /livez, /readyz).
    Http,
}

/// Accepts on `listener` until the receiver is dropped; yields handshaken connections.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    protocol: Protocol,
    node: NodeId,
) -> mpsc::Receiver<Conn> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => return,
            };
            let (stream, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, typically: wait rather than spin.
                    tracing::warn!(node, "accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let config = match protocol {
                Protocol::Grpc => tls.grpc_config(),
                Protocol::Http => tls.http_config(),
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Some(conn) = tokio::time::timeout(
                    HANDSHAKE_TIMEOUT,
                    accept(stream, remote, config, protocol, node),
                )
                .await
                .ok()
                .flatten()
                {
                    let _ = tx.send(conn).await;
                }
            });
        }
    });
    rx
}

async fn accept(
    stream: TcpStream,
    remote: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    protocol: Protocol,
    node: NodeId,
) -> Option<Conn> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(1) if first[0] == 0x16 => {}
        Ok(1) => {
            tracing::debug!(node, %remote, "a plaintext client connected; answering that TLS is required");
            refuse_plaintext(stream, protocol).await;
            return None;
        }
        _ => return None,
    }
    let tls = match tokio_rustls::TlsAcceptor::from(config).accept(stream).await {
        Ok(t) => t,
        Err(e) => {
            let why = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<rustls::Error>())
                .map_or_else(
                    || e.to_string(),
                    |r| match r {
                        rustls::Error::InvalidCertificate(_) => format!(
                            "its client certificate is refused: {}",
                            super::describe_cert_error(r, None)
                        ),
                        other => other.to_string(),
                    },
                );
            tracing::warn!(node, %remote, "refused a TLS connection: {why}");
            return None;
        }
    };
    let peer = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        None => PeerIdentity::None,
        Some(c) => match super::common_name(c) {
            Some(cn) => match super::node_of_common_name(&cn) {
                Some(id) => PeerIdentity::Node(id),
                None => PeerIdentity::User(cn),
            },
            // The CA signed it, but it names nobody: treated as no certificate.
            None => PeerIdentity::None,
        },
    };
    Some(Conn {
        stream: tls,
        info: ConnInfo { remote, peer },
    })
}

const PLAINTEXT_REFUSED: &str = "this node requires TLS: give the client the cluster CA (config.json's tls section, or --ca-file)";

/// Answers a plaintext client on a TLS port with why it is refused.
async fn refuse_plaintext(stream: TcpStream, protocol: Protocol) {
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let io = TokioIo::new(stream);
    match protocol {
        Protocol::Grpc => {
            let svc = service_fn(|_req| async {
                hyper::Response::builder()
                    .status(200)
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "16")
                    .header("grpc-message", PLAINTEXT_REFUSED)
                    .body(Full::new(bytes::Bytes::new()))
            });
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, svc),
            )
            .await;
        }
        Protocol::Http => {
            let svc = service_fn(|_req| async {
                hyper::Response::builder()
                    .status(400)
                    .header("content-type", "text/plain")
                    .body(Full::new(bytes::Bytes::from(
                        "this endpoint requires TLS: use https:// and the cluster CA\n",
                    )))
            });
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                hyper::server::conn::http1::Builder::new()
                    .keep_alive(false)
                    .serve_connection(io, svc),
            )
            .await;
        }
    }
}

/// The HTTP endpoint's listener over TLS, for axum.
pub struct HttpsListener {
    pub rx: mpsc::Receiver<Conn>,
    pub local: SocketAddr,
}

impl axum::serve::Listener for HttpsListener {
    type Io = Conn;
    type Addr = SocketAddr;
    async fn accept(&mut self) -> (Conn, SocketAddr) {
        match self.rx.recv().await {
            Some(c) => {
                let a = c.info.remote;
                (c, a)
            }
            None => std::future::pending().await,
        }
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
