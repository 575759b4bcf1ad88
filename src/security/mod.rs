//! TLS and who may do what: the one place that builds every gRPC endpoint a node or a command
//! dials ([`Dialer`]) and the TLS every server accepts ([`ServerTls`], [`listener`]).
//!
//! - Plaintext (no `tls` section): the seed's behaviour; a node refuses a non-loopback address
//!   without `--insecure`.
//! - TLS: one cluster CA. Nodes present `raftkv-node-<id>` certificates to each other (mutual
//!   TLS) and to clients; clients verify the node against the CA and present a user certificate
//!   or a token (see [`auth`]).
//! - Certificates are checked when loaded (a certificate that has expired, is not valid yet or
//!   is not signed by the CA is refused, saying so) and reloaded on SIGHUP ([`ServerTls::reload`]).

pub mod auth;
pub mod listener;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Once, RwLock};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::client::danger::ServerCertVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::config::{Config, TlsConfig};
use crate::raft::NodeId;

/// The common name of node `id`'s certificate.
pub fn node_common_name(id: NodeId) -> String {
    format!("raftkv-node-{id}")
}

/// The node id a certificate's common name names, if it is a node's.
pub fn node_of_common_name(cn: &str) -> Option<NodeId> {
    // Exactly the canonical spelling: "raftkv-node-01" or "raftkv-node-+1" is nobody's.
    let id: NodeId = cn.strip_prefix("raftkv-node-")?.parse().ok()?;
    (node_common_name(id) == cn).then_some(id)
}

/// Installs rustls' crypto provider (ring) for the whole process, once. rustls panics at
/// first use when it cannot choose one (two providers in the dependency tree), so every entry
/// point calls this before any TLS is built.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err: a provider is installed already (an embedding program chose one).
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// What an endpoint is for: each has its own timeouts and windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A node's long-lived message stream to a peer.
    PeerStream,
    /// A snapshot sent to a peer.
    Snapshot,
    /// A node asking a peer's status (start-up) or health (round-trip probe).
    Probe,
    /// A client (commands, and a node acting as one: joining).
    Client,
}

/// Adds the client's token (if any) to every request.
#[derive(Clone, Default)]
pub struct Credentials(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

/// A connection to a node, with the dialer's credentials.
pub type Conn =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Credentials>;

/// A client's TLS material, read from files and checked.
pub struct ClientMaterial {
    ca_pem: Vec<u8>,
    roots: Arc<RootCertStore>,
    /// The certificate and key presented, if any (PEM).
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Builds every endpoint: the scheme, TLS and the tunings of each [`Purpose`]. Cheap to clone;
/// a node's dialer follows its certificate reloads.
#[derive(Clone, Default)]
pub struct Dialer {
    tls: Option<Arc<RwLock<Arc<ClientMaterial>>>>,
    token: Option<Arc<str>>,
}

impl Dialer {
    /// No TLS (the seed's localhost cluster).
    pub fn plaintext() -> Dialer {
        Dialer::default()
    }

    /// TLS with `material`.
    pub fn tls(material: ClientMaterial) -> Dialer {
        Dialer {
            tls: Some(Arc::new(RwLock::new(Arc::new(material)))),
            token: None,
        }
    }

    /// Sends `token` with every request.
    ///
    /// # Errors
    /// A token without TLS (it would cross the network in the clear), or one that cannot be a
    /// header value.
    pub fn with_token(mut self, token: Option<String>) -> Result<Dialer, String> {
        if let Some(t) = token {
            if !self.is_tls() {
                return Err(
                    "a token is sent only over TLS, and this cluster's config has no tls section"
                        .into(),
                );
            }
            let t = t.trim().to_string();
            tonic::metadata::MetadataValue::try_from(format!("Bearer {t}"))
                .map_err(|_| "the token holds characters a header cannot carry".to_string())?;
            self.token = Some(t.into());
        }
        Ok(self)
    }

    fn credentials(&self) -> Credentials {
        Credentials(
            self.token
                .as_ref()
                .and_then(|t| tonic::metadata::MetadataValue::try_from(format!("Bearer {t}")).ok()),
        )
    }

    /// A connection to `addr`, made at first use.
    ///
    /// # Errors
    /// See [`Dialer::endpoint`].
    pub fn lazy(&self, addr: &str, purpose: Purpose) -> Result<Conn, String> {
        let ch = self.endpoint(addr, purpose)?.connect_lazy();
        Ok(tonic::service::interceptor::InterceptedService::new(
            ch,
            self.credentials(),
        ))
    }

    /// A connection to `addr`, made now.
    ///
    /// # Errors
    /// The address is invalid or the connection failed (saying why: TLS failures in words).
    pub async fn connect(&self, addr: &str, purpose: Purpose) -> Result<Conn, String> {
        let ch = self.endpoint(addr, purpose)?.connect().await.map_err(|e| {
            describe_tls_failure(&e).unwrap_or_else(|| {
                let mut text = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    text.push_str(": ");
                    text.push_str(&s.to_string());
                    src = s.source();
                }
                text
            })
        })?;
        Ok(tonic::service::interceptor::InterceptedService::new(
            ch,
            self.credentials(),
        ))
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Replaces the material (a node's certificate reload): new connections use it.
    fn replace(&self, material: ClientMaterial) {
        if let Some(t) = &self.tls {
            *t.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(material);
        }
    }

    fn material(&self) -> Option<Arc<ClientMaterial>> {
        self.tls
            .as_ref()
            .map(|t| t.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// The endpoint for `addr` (`host:port`).
    ///
    /// # Errors
    /// An address that is not a valid URI authority.
    pub fn endpoint(&self, addr: &str, purpose: Purpose) -> Result<Endpoint, String> {
        use crate::transport::peer::{CONNECTION_WINDOW_BYTES, STREAM_WINDOW_BYTES};
        let material = self.material();
        let scheme = if material.is_some() { "https" } else { "http" };
        let mut e = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| format!("invalid address {addr}: {e}"))?
            .tcp_nodelay(true);
        if let Some(m) = material {
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&m.ca_pem))
                .timeout(Duration::from_secs(5));
            if let Some((cert, key)) = &m.identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            e = e
                .tls_config(tls)
                .map_err(|e| format!("TLS for {addr}: {e}"))?;
        }
        Ok(match purpose {
            Purpose::PeerStream => e
                .connect_timeout(Duration::from_millis(500))
                .initial_stream_window_size(STREAM_WINDOW_BYTES)
                .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5)),
            Purpose::Snapshot => e
                .connect_timeout(Duration::from_secs(2))
                .initial_stream_window_size(STREAM_WINDOW_BYTES)
                .initial_connection_window_size(CONNECTION_WINDOW_BYTES),
            Purpose::Probe => e.connect_timeout(Duration::from_secs(1)),
            Purpose::Client => e
                .connect_timeout(Duration::from_millis(500))
                // A node that stops answering (paused, partitioned away) would otherwise hold
                // every request on its long-lived connection until the deadline: pings find it
                // dead in about two seconds, its requests fail as "outcome unknown", and the
                // client goes on to the other nodes.
                .http2_keep_alive_interval(crate::client::KEEPALIVE_INTERVAL)
                .keep_alive_timeout(crate::client::KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .initial_stream_window_size(STREAM_WINDOW_BYTES)
                .initial_connection_window_size(CONNECTION_WINDOW_BYTES),
        })
    }

    /// A rustls client config for plain HTTP/1.1 over TLS (the monitor's scrape of /metrics).
    pub fn https_config(&self) -> Option<Arc<rustls::ClientConfig>> {
        let m = self.material()?;
        let mut c = rustls::ClientConfig::builder()
            .with_root_certificates(m.roots.clone())
            .with_no_client_auth();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Some(Arc::new(c))
    }
}

/// The files of one identity.
#[derive(Clone, Debug)]
pub struct Files {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl Files {
    /// Node `id`'s files from config.json.
    pub fn node(cfg: &Config, tls: &TlsConfig, id: NodeId) -> Files {
        let sub = |s: &str| cfg.resolve(Path::new(&s.replace("{id}", &id.to_string())));
        Files {
            ca: cfg.resolve(&tls.ca_file),
            cert: Some(sub(&tls.node_cert_file)),
            key: Some(sub(&tls.node_key_file)),
        }
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
}

fn certs_of(pem: &[u8], path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the {what} {} is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "the {what} {} holds no certificate (expected PEM: -----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

fn key_of(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        format!(
            "the private key {} is not a PEM private key: {e}",
            path.display()
        )
    })
}

fn roots_of(ca: &[CertificateDer<'static>], path: &Path) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots.add(c.clone()).map_err(|e| {
            format!(
                "the CA file {} is not a CA certificate: {e}",
                path.display()
            )
        })?;
    }
    Ok(Arc::new(roots))
}

/// A certificate's validity period, as text ("2026-12-01 10:00:00 UTC to ...").
fn validity(cert: &CertificateDer<'_>) -> Option<(String, String)> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some((
        c.validity().not_before.to_string(),
        c.validity().not_after.to_string(),
    ))
}

/// The subject's common name.
/// The subject's common name; None without exactly one (a certificate naming two subjects
/// names nobody).
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let mut names = c.subject().iter_common_name();
    let first = names.next()?.as_str().ok()?.to_string();
    names.next().is_none().then_some(first)
}

/// What a rustls certificate error means, in words.
pub fn describe_cert_error(e: &rustls::Error, cert: Option<&CertificateDer<'_>>) -> String {
    use rustls::CertificateError as C;
    let period = cert.and_then(validity);
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::Expired | C::ExpiredContext { .. } => match period {
                Some((_, after)) => format!("it has expired (not valid after {after})"),
                None => "it has expired".into(),
            },
            C::NotValidYet | C::NotValidYetContext { .. } => match period {
                Some((before, _)) => format!("it is not valid yet (not valid before {before})"),
                None => "it is not valid yet".into(),
            },
            C::UnknownIssuer => "it is signed by an unknown authority (not the cluster CA)".into(),
            C::BadSignature => "it is signed by an unknown authority (its signature does not verify against the cluster CA)".into(),
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "it is not valid for this host name".into()
            }
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                "it is not valid for this purpose (extended key usage)".into()
            }
            other => format!("it is invalid: {other:?}"),
        },
        other => other.to_string(),
    }
}

/// Checks `chain` against the CA as a client certificate and (with `server_name`) as a server's,
/// now. `Err` says what is wrong with it.
fn check_certificate(
    chain: &[CertificateDer<'static>],
    roots: &Arc<RootCertStore>,
    server_name: Option<&str>,
) -> Result<(), String> {
    let now = UnixTime::now();
    let (leaf, rest) = chain.split_first().ok_or("no certificate")?;
    let client = WebPkiClientVerifier::builder(roots.clone())
        .build()
        .map_err(|e| e.to_string())?;
    client
        .verify_client_cert(leaf, rest, now)
        .map_err(|e| describe_cert_error(&e, Some(leaf)))?;
    if let Some(host) = server_name {
        let server = rustls::client::WebPkiServerVerifier::builder(roots.clone())
            .build()
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
        match server.verify_server_cert(leaf, rest, &name, &[], now) {
            Ok(_) => {}
            // Checked when a peer dials it; other host names may be intended (--listen).
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => {
                tracing::warn!(
                    "the certificate is not valid for host {host}: peers and clients that dial {host} will refuse it"
                );
            }
            Err(e) => return Err(describe_cert_error(&e, Some(leaf))),
        }
    }
    Ok(())
}

/// Loads a client's material: the CA and, if given, a certificate and key, all checked.
///
/// # Errors
/// A file that cannot be read or parsed, or a certificate that is not valid now or not signed
/// by the CA (saying which and why).
pub fn load_client(files: &Files) -> Result<ClientMaterial, String> {
    install_crypto_provider();
    let ca_pem = read(&files.ca, "CA file")?;
    let ca = certs_of(&ca_pem, &files.ca, "CA file")?;
    let roots = roots_of(&ca, &files.ca)?;
    let identity = match (&files.cert, &files.key) {
        (Some(c), Some(k)) => {
            let cert_pem = read(c, "certificate")?;
            let key_pem = read(k, "private key")?;
            let chain = certs_of(&cert_pem, c, "certificate")?;
            let key = key_of(&key_pem, k)?;
            rustls::ClientConfig::builder()
                .with_root_certificates(roots.clone())
                .with_client_auth_cert(chain.clone(), key)
                .map_err(|e| {
                    format!(
                        "the key {} does not go with the certificate {} ({e})",
                        k.display(),
                        c.display()
                    )
                })?;
            check_certificate(&chain, &roots, None)
                .map_err(|why| format!("the certificate {} is refused: {why}", c.display()))?;
            Some((cert_pem, key_pem))
        }
        (Some(c), None) => return Err(format!("the certificate {} has no key file", c.display())),
        (None, Some(k)) => {
            return Err(format!("the key {} has no certificate file", k.display()));
        }
        (None, None) => None,
    };
    Ok(ClientMaterial {
        ca_pem,
        roots,
        identity,
    })
}

/// A node's TLS: the server config every listener uses and the dialer its connections to peers
/// use, both replaced by [`ServerTls::reload`].
pub struct ServerTls {
    files: Files,
    id: NodeId,
    host: String,
    grpc: RwLock<Arc<ServerConfig>>,
    http: RwLock<Arc<ServerConfig>>,
    dialer: Dialer,
    /// The certificate's validity period, for the log.
    pub valid: (String, String),
}

struct Loaded {
    grpc: ServerConfig,
    http: ServerConfig,
    client: ClientMaterial,
    valid: (String, String),
}

impl ServerTls {
    /// Loads node `id`'s certificate (for `host`) and the CA, checking both.
    ///
    /// # Errors
    /// See [`load_client`]; also a certificate whose common name is not this node's.
    pub fn load(files: Files, id: NodeId, host: &str) -> Result<ServerTls, String> {
        let l = Self::load_files(&files, id, host)?;
        Ok(ServerTls {
            files,
            id,
            host: host.to_string(),
            grpc: RwLock::new(Arc::new(l.grpc)),
            http: RwLock::new(Arc::new(l.http)),
            dialer: Dialer::tls(l.client),
            valid: l.valid,
        })
    }

    fn load_files(files: &Files, id: NodeId, host: &str) -> Result<Loaded, String> {
        install_crypto_provider();
        let (Some(cert_path), Some(key_path)) = (&files.cert, &files.key) else {
            return Err("a node needs a certificate and a key".into());
        };
        let ca_pem = read(&files.ca, "CA file")?;
        let ca = certs_of(&ca_pem, &files.ca, "CA file")?;
        let roots = roots_of(&ca, &files.ca)?;
        let cert_pem = read(cert_path, "certificate")?;
        let key_pem = read(key_path, "private key")?;
        let chain = certs_of(&cert_pem, cert_path, "certificate")?;
        let key = key_of(&key_pem, key_path)?;
        let refused = |why: String| {
            format!(
                "node {id}'s certificate {} is refused: {why}",
                cert_path.display()
            )
        };
        check_certificate(&chain, &roots, Some(host)).map_err(refused)?;
        let cn = common_name(&chain[0]).unwrap_or_default();
        if node_of_common_name(&cn) != Some(id) {
            return Err(refused(format!(
                "its common name is {cn:?}, not {:?}: peers would not accept it as node {id}",
                node_common_name(id)
            )));
        }
        let valid = validity(&chain[0]).unwrap_or_default();
        let server = |alpn: &[u8], verifier: Arc<dyn ClientCertVerifier>| {
            let mut c = ServerConfig::builder()
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain.clone(), key.clone_key())
                .map_err(|e| refused(e.to_string()))?;
            c.alpn_protocols = vec![alpn.to_vec()];
            Ok::<_, String>(c)
        };
        // A client certificate is optional at the TLS layer (a client may present a token
        // instead), but one that is presented must be the CA's and valid: each service then
        // requires the identity it accepts (see `auth`).
        let verifier = WebPkiClientVerifier::builder(roots.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| e.to_string())?;
        let grpc = server(b"h2", verifier.clone())?;
        let http = server(b"http/1.1", verifier)?;
        Ok(Loaded {
            grpc,
            http,
            client: ClientMaterial {
                ca_pem,
                roots,
                identity: Some((cert_pem, key_pem)),
            },
            valid,
        })
    }

    /// Reads the files again; on success new connections (in and out) use them, and
    /// connections already open keep theirs. On failure nothing changes.
    ///
    /// # Errors
    /// What [`ServerTls::load`] would say.
    pub fn reload(&self) -> Result<(String, String), String> {
        let l = Self::load_files(&self.files, self.id, &self.host)?;
        *self.grpc.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(l.grpc);
        *self.http.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(l.http);
        self.dialer.replace(l.client);
        Ok(l.valid)
    }

    pub fn grpc_config(&self) -> Arc<ServerConfig> {
        self.grpc.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn http_config(&self) -> Arc<ServerConfig> {
        self.http.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The dialer for this node's connections to its peers.
    pub fn dialer(&self) -> Dialer {
        self.dialer.clone()
    }
}

/// A one-line account of why a TLS connection failed, from an error's chain of sources: the
/// words a user can act on ("the server requires TLS", "signed by an unknown authority"), or
/// None when the chain holds no TLS failure.
pub fn describe_tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    // A status the server sent is its own words (a permission denial may name a key such as
    // "expired"): only a transport failure is read for TLS.
    if let Some(s) = e.downcast_ref::<tonic::Status>() {
        if !matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) {
            return None;
        }
        return std::error::Error::source(s).and_then(describe_tls_failure);
    }
    let mut text = String::new();
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(e) = src {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(describe_rustls(r));
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(describe_rustls(r));
        }
        text.push(' ');
        text.push_str(&e.to_string());
        src = e.source();
    }
    let t = text.to_lowercase();
    // tonic's errors carry rustls' error as text only.
    for (needle, what) in [
        (
            "unknownissuer",
            "the server's certificate is refused: it is signed by an unknown authority (not the cluster CA)",
        ),
        (
            "badsignature",
            "the server's certificate is refused: it is signed by an unknown authority (its signature does not verify against the cluster CA)",
        ),
        (
            "certificate expired",
            "the server's certificate is refused: it has expired",
        ),
        (
            "expired",
            "the server's certificate is refused: it has expired",
        ),
        (
            "notvalidyet",
            "the server's certificate is refused: it is not valid yet",
        ),
        (
            "notvalidforname",
            "the server's certificate is refused: it is not valid for the address dialled",
        ),
        (
            "received fatal alert: certificateexpired",
            "the server refused this client's certificate: it has expired",
        ),
        (
            "received fatal alert: unknownca",
            "the server refused this client's certificate: it is signed by an unknown authority (not the cluster CA)",
        ),
        (
            "received fatal alert: badcertificate",
            "the server refused this client's certificate (not valid now, or not the cluster CA's)",
        ),
        (
            "received corrupt message",
            "the server does not use TLS (a plaintext node: drop the tls section from the client's config, or give the node one)",
        ),
        (
            "invalidcontenttype",
            "the server does not use TLS (a plaintext node: drop the tls section from the client's config, or give the node one)",
        ),
    ] {
        if t.contains(needle) {
            return Some(what.to_string());
        }
    }
    if t.contains("http/2 was not negotiated") {
        return Some("the server does not speak TLS with HTTP/2 (is it a raftkv node?)".into());
    }
    None
}

fn describe_rustls(e: &rustls::Error) -> String {
    use rustls::AlertDescription as A;
    match e {
        rustls::Error::InvalidCertificate(_) => {
            format!(
                "the server's certificate is refused: {}",
                describe_cert_error(e, None)
            )
        }
        rustls::Error::AlertReceived(a) => match a {
            A::CertificateExpired => {
                "the server refused this client's certificate: it has expired".into()
            }
            A::UnknownCA => "the server refused this client's certificate: it is signed by an unknown authority (not the cluster CA)".into(),
            A::BadCertificate | A::CertificateUnknown | A::UnsupportedCertificate => {
                "the server refused this client's certificate (not valid now, or not the cluster CA's)".into()
            }
            A::CertificateRequired => "the server requires a client certificate".into(),
            A::NoApplicationProtocol => "the server does not speak gRPC over TLS here".into(),
            other => format!("the server ended the TLS handshake: {other:?}"),
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "the server does not use TLS (a plaintext node: drop the tls section from the client's config, or give the node one)".into()
        }
        other => format!("TLS failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_round_trip() {
        assert_eq!(node_of_common_name(&node_common_name(7)), Some(7));
        assert_eq!(node_of_common_name("raftkv-node-x"), None);
        assert_eq!(node_of_common_name("admin"), None);
        assert_eq!(node_of_common_name("raftkv-node-01"), None);
        assert_eq!(node_of_common_name("raftkv-node-+1"), None);
        assert_eq!(node_of_common_name("raftkv-node-"), None);
    }
}
