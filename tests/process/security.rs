//! A secure cluster (`raftkv certs init`), attacked as an outsider and as an insider would:
//! after etcd's TestTLSGRPCRejectInsecureClient, TestTLSGRPCRejectSecureClient, TestTLSReload*
//! and TestEtcdPeerCNAuth.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use raftkv::client::Client;
use raftkv::proto;
use raftkv::raft::NodeId;
use raftkv::security::{Dialer, Files, load_client};

use super::ELECTION;
use super::harness::{TestCluster, run_cli};

/// A cluster of `n` nodes made secure by `raftkv certs init` (every node started), whose test
/// client connects as admin.
async fn secure(n: usize) -> TestCluster {
    let mut c = TestCluster::new(n);
    let config = c.config.to_str().expect("utf-8 path").to_string();
    let (code, out, err) = run_cli(
        &["certs", "init", "--config", &config, "--out", "certs"],
        "",
        c.dir.path(),
    );
    assert_eq!(code, 0, "certs init: {out}{err}");
    c.dialer = dialer(&c, Some("admin"), None);
    for id in c.ids() {
        c.start(id);
    }
    c.wait_leader(ELECTION).await;
    c
}

fn certs(c: &TestCluster) -> PathBuf {
    c.dir.path().join("certs")
}

/// A dialer with the cluster's CA, `user`'s certificate (if any) and `token` (if any).
fn dialer(c: &TestCluster, user: Option<&str>, token: Option<&str>) -> Dialer {
    let d = certs(c);
    let files = Files {
        ca: d.join("ca.crt"),
        cert: user.map(|u| d.join(format!("{u}.crt"))),
        key: user.map(|u| d.join(format!("{u}.key"))),
    };
    Dialer::tls(load_client(&files).expect("client material"))
        .with_token(token.map(str::to_string))
        .expect("token over TLS")
}

fn client(c: &TestCluster, d: Dialer) -> Client {
    Client::with_dialer(c.addrs(), d)
        .with_timeout(Duration::from_secs(5))
        .fail_fast()
}

async fn terms(c: &TestCluster) -> Vec<(NodeId, u64, u64)> {
    c.statuses()
        .await
        .into_iter()
        .map(|(id, s)| (id, s.term, s.last_log_index))
        .collect()
}

/// Signs a certificate for `cn` with the CA in `dir`, valid from `from` to `until` (seconds
/// from now, negative in the past), for client use (and server use for a node).
fn sign(dir: &Path, cn: &str, from: i64, until: i64, node: bool) -> (String, String) {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
    let ca = std::fs::read_to_string(dir.join("ca.crt")).expect("ca");
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca.key")).expect("ca key"))
        .expect("ca key");
    let issuer = Issuer::from_ca_cert_pem(&ca, ca_key).expect("issuer");
    let key = KeyPair::generate().expect("key");
    let hosts = if node {
        vec!["127.0.0.1".to_string(), "localhost".to_string()]
    } else {
        vec![]
    };
    let mut p = CertificateParams::new(hosts).expect("params");
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now + time::Duration::seconds(from);
    p.not_after = now + time::Duration::seconds(until);
    let cert = p.signed_by(&key, &issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}

/// A raw TLS gRPC channel to `addr` with the CA in `ca_dir` and the PEM `identity`, with none
/// of raftkv's own checks of the client's certificate.
async fn raw_channel(
    addr: &str,
    ca_dir: &Path,
    identity: Option<(&str, &str)>,
) -> Result<tonic::transport::Channel, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    raftkv::security::install_crypto_provider();
    let ca = std::fs::read(ca_dir.join("ca.crt")).expect("ca");
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some((c, k)) = identity {
        tls = tls.identity(Identity::from_pem(c, k));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| raftkv::security::describe_tls_failure(&e).unwrap_or_else(|| format!("{e:?}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_foreign_and_anonymous_clients_are_refused() {
    let c = secure(3).await;
    let mut admin = client(&c, c.dialer.clone());
    admin.put("k", "v").await.expect("admin writes over TLS");

    // A plaintext client: told that the node requires TLS, by every node.
    let mut plain = Client::new(c.addrs())
        .with_timeout(Duration::from_secs(3))
        .fail_fast();
    let e = plain.get("k", false).await.expect_err("plaintext refused");
    assert!(e.to_string().contains("requires TLS"), "{e}");
    let addr = c.addrs()[&1].clone();
    let mut raw = proto::data_service_client::DataServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("TCP connects");
    let s = raw
        .get(proto::GetRequest {
            key: "k".into(),
            stale: true,
            min_index: 0,
        })
        .await
        .expect_err("plaintext gRPC refused");
    assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
    assert!(s.message().contains("requires TLS"), "{s:?}");

    // A client of another cluster's CA: the node's certificate is not one it trusts...
    let other = tempfile::tempdir().expect("tempdir");
    std::fs::copy(&c.config, other.path().join("config.json")).expect("copy config");
    let text = std::fs::read_to_string(other.path().join("config.json")).expect("config");
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v.as_object_mut().expect("object").remove("tls");
    std::fs::write(other.path().join("config.json"), v.to_string()).expect("write");
    let (code, out, err) = run_cli(
        &["certs", "init", "--config", "config.json", "--out", "certs"],
        "",
        other.path(),
    );
    assert_eq!(code, 0, "{out}{err}");
    let foreign = other.path().join("certs");
    let e = raw_channel(&addr, &foreign, None)
        .await
        .expect_err("a foreign CA does not trust the node");
    assert!(e.contains("unknown authority"), "{e}");
    // ...and a foreign client certificate with the right CA is refused by the node.
    let fc = std::fs::read_to_string(foreign.join("admin.crt")).expect("cert");
    let fk = std::fs::read_to_string(foreign.join("admin.key")).expect("key");
    let refused = status_refused(&addr, &certs(&c), (&fc, &fk)).await;
    assert!(!refused.is_empty());
    wait_log(
        &c,
        1,
        "its client certificate is refused: it is signed by an unknown authority",
    )
    .await;

    // No certificate and no token: TLS, but nobody.
    let mut anon = client(&c, dialer(&c, None, None));
    let e = anon.get("k", false).await.expect_err("anonymous refused");
    assert!(e.to_string().contains("requires authentication"), "{e}");
    let e = anon.put("k", "x").await.expect_err("anonymous refused");
    assert!(e.to_string().contains("nothing was written"), "{e}");
    assert_eq!(
        admin.get("k", false).await.expect("read").as_deref(),
        Some(&b"v"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_is_refused_by_a_plaintext_node_and_a_plaintext_node_stays_on_loopback() {
    // The seed's cluster: plaintext on loopback, as before.
    let mut c = TestCluster::started(1);
    c.wait_leader(ELECTION).await;
    let secured = TestCluster::new(1);
    let config = secured.config.to_str().expect("path").to_string();
    let (code, out, err) = run_cli(
        &["certs", "init", "--config", &config, "--out", "certs"],
        "",
        secured.dir.path(),
    );
    assert_eq!(code, 0, "{out}{err}");
    let mut tls = Client::with_dialer(c.addrs(), dialer(&secured, Some("admin"), None))
        .with_timeout(Duration::from_secs(3))
        .fail_fast();
    let e = tls
        .get("k", false)
        .await
        .expect_err("a plaintext node refuses TLS");
    assert!(e.to_string().contains("does not use TLS"), "{e}");

    // A plaintext node on a non-loopback address refuses to start without --insecure.
    let (code, err) = c
        .start_expecting_exit(
            9,
            &["--join", "127.0.0.1:1", "--listen", "198.18.0.1:7000"],
            Duration::from_secs(10),
        )
        .expect("refuses to start");
    assert_ne!(code, 0);
    assert!(
        err.contains("without TLS") && err.contains("--insecure"),
        "{err}"
    );
    // A token is never sent in the clear.
    let e = Dialer::plaintext()
        .with_token(Some("rkv_x".into()))
        .err()
        .expect("refused");
    assert!(e.contains("only over TLS"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_not_yet_valid_certificates_are_refused_saying_so() {
    let mut c = secure(3).await;
    let dir = certs(&c);
    let addr = c.addrs()[&1].clone();
    // A client certificate that expired an hour ago: refused by the client itself...
    let (ec, ek) = sign(&dir, "admin", -7200, -3600, false);
    std::fs::write(dir.join("old.crt"), &ec).expect("write");
    std::fs::write(dir.join("old.key"), &ek).expect("write");
    let e = load_client(&Files {
        ca: dir.join("ca.crt"),
        cert: Some(dir.join("old.crt")),
        key: Some(dir.join("old.key")),
    })
    .err()
    .expect("an expired certificate is refused");
    assert!(e.contains("has expired"), "{e}");
    // ...and by the node, when a client presents it anyway.
    let refused = status_refused(&addr, &dir, (&ec, &ek)).await;
    // In TLS 1.3 the node judges the client's certificate after the client has finished its
    // side of the handshake: the client sees the alert ("expired"), or, when its first request
    // raced the alert, a closed connection. The node's log always says why.
    assert!(!refused.is_empty());
    wait_log(
        &c,
        1,
        "refused a TLS connection: its client certificate is refused: it has expired",
    )
    .await;

    // A node whose certificate is not valid yet, or has expired, does not start.
    c.stop(3);
    for (from, until, says) in [(3600, 7200, "not valid yet"), (-7200, -3600, "has expired")] {
        let (nc, nk) = sign(&dir, "raftkv-node-3", from, until, true);
        std::fs::write(dir.join("node-3.crt"), nc).expect("write");
        std::fs::write(dir.join("node-3.key"), nk).expect("write");
        let (code, err) = c
            .start_expecting_exit(3, &[], Duration::from_secs(10))
            .expect("the node refuses to start");
        assert_ne!(code, 0);
        assert!(err.contains(says) && err.contains("node-3.crt"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_bound_every_operation() {
    let c = secure(3).await;
    let config = c.config.to_str().expect("path").to_string();
    for args in [
        &["certs", "user", "reader", "--role", "read-only", "--token"][..],
        &[
            "certs",
            "user",
            "app",
            "--role",
            "read-write",
            "--key-prefix",
            "app/",
            "--token",
        ],
    ] {
        let mut a = args.to_vec();
        a.extend(["--config", &config]);
        let (code, out, err) = run_cli(&a, "", c.dir.path());
        assert_eq!(code, 0, "{out}{err}");
    }
    for id in c.ids() {
        c.signal(id, Signal::SIGHUP);
    }
    let token = |u: &str| {
        std::fs::read_to_string(certs(&c).join(format!("{u}.token")))
            .expect("token")
            .trim()
            .to_string()
    };
    let mut admin = client(&c, c.dialer.clone());
    admin.put("secret", "s3").await.expect("admin writes");
    admin.put("app/one", "1").await.expect("admin writes");

    // The reload takes a moment: wait until the reader's token is known.
    let mut reader = client(&c, dialer(&c, None, Some(&token("reader"))));
    let deadline = Instant::now() + Duration::from_secs(10);
    while reader.get("secret", false).await.is_err() {
        assert!(Instant::now() < deadline, "the users file was not reloaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        reader.get("secret", false).await.expect("read").as_deref(),
        Some(&b"s3"[..])
    );
    let e = reader.put("secret", "x").await.expect_err("read-only");
    assert!(
        e.to_string()
            .contains("permission denied: user reader may not write"),
        "{e}"
    );
    assert!(e.to_string().contains("nothing was written"), "{e}");
    assert!(reader.delete("secret").await.is_err(), "read-only deletes");
    let e = reader
        .change_membership(proto::MembershipOp::Remove, 3, "")
        .await
        .expect_err("read-only changes membership");
    assert!(e.to_string().contains("permission denied"), "{e}");
    assert!(
        reader.save_snapshot().await.is_err(),
        "read-only saves a snapshot"
    );
    let e = reader
        .transfer_leader(0)
        .await
        .expect_err("read-only transfers leadership");
    assert!(e.to_string().contains("permission denied"), "{e}");

    // A unary call with the reader's token, past the client library.
    let addr = c.addrs()[&1].clone();
    let ch = raw_channel(&addr, &certs(&c), None).await.expect("channel");
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {}", token("reader"))
        .parse()
        .expect("header");
    let mut dc = proto::data_service_client::DataServiceClient::with_interceptor(
        ch.clone(),
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", bearer.clone());
            Ok(r)
        },
    );
    for s in [
        dc.put(proto::PutRequest {
            key: "secret".into(),
            value: "x".into(),
            id: None,
        })
        .await
        .map(|_| ())
        .expect_err("unary put"),
        dc.delete(proto::DeleteRequest {
            key: "secret".into(),
            id: None,
        })
        .await
        .map(|_| ())
        .expect_err("unary delete"),
    ] {
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    }

    // The prefix-bound writer: its keys only, for reads as for writes.
    let mut app = client(&c, dialer(&c, None, Some(&token("app"))));
    app.put("app/two", "2").await.expect("own prefix");
    let e = app.put("secret", "x").await.expect_err("other keys");
    assert!(
        e.to_string().contains("its keys start with \"app/\""),
        "{e}"
    );
    assert!(app.get("secret", false).await.is_err(), "reads other keys");
    assert!(
        app.get("ap", false).await.is_err(),
        "a shorter key is not inside app/"
    );

    // No token, a wrong token.
    let mut wrong = client(&c, dialer(&c, None, Some("rkv_0000")));
    let e = wrong.get("app/one", false).await.expect_err("wrong token");
    assert!(e.to_string().contains("token is not valid"), "{e}");
    assert_eq!(
        admin.get("secret", false).await.expect("read").as_deref(),
        Some(&b"s3"[..]),
        "nothing the refused requests asked was written"
    );

    // Revoked: the reader's entry taken out of the users file and SIGHUP. The reader's client
    // keeps its connections (and its open pipeline call); its next request is refused.
    let path = certs(&c).join("users.json");
    let mut users: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("users")).expect("json");
    users["users"]
        .as_array_mut()
        .expect("array")
        .retain(|u| u["name"] != "reader");
    std::fs::write(&path, users.to_string()).expect("write users");
    for id in c.ids() {
        c.signal(id, Signal::SIGHUP);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match reader.get("secret", false).await {
            Err(e) => {
                assert!(e.to_string().contains("token is not valid"), "{e}");
                break;
            }
            Ok(_) => {
                assert!(Instant::now() < deadline, "the revoked reader still reads");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_certificates_are_not_users_and_fake_peers_move_nothing() {
    let c = secure(3).await;
    let mut admin = client(&c, c.dialer.clone());
    admin.put("k", "v").await.expect("write");
    let leader = c.wait_leader(ELECTION).await;
    // A node's certificate used as a client: status yes, keys and admin no.
    let mut node2 = client(&c, dialer(&c, Some("node-2"), None));
    assert!(!node2.status_all(Duration::from_secs(2)).await.is_empty());
    let e = node2.put("k", "x").await.expect_err("a node is not a user");
    assert!(e.to_string().contains("node certificate"), "{e}");
    assert!(node2.get("k", false).await.is_err());
    let e = node2
        .change_membership(proto::MembershipOp::Remove, 3, "")
        .await
        .expect_err("a node removes another");
    assert!(e.to_string().contains("permission denied"), "{e}");

    let before = terms(&c).await;
    let target = c.follower_other_than(leader);
    let addr = c.addrs()[&target].clone();
    let fake = |from: NodeId| proto::MessageBatch {
        messages: vec![proto::RaftMessage {
            from,
            to: target,
            term: before.iter().map(|t| t.1).max().unwrap_or(0) + 100,
            cluster_id: 0,
            body: Some(proto::raft_message::Body::TimeoutNow(proto::TimeoutNow {})),
        }],
    };
    let dir = certs(&c);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("cert");
    // A real peer's certificate speaking as another node.
    let claimed = c
        .ids()
        .into_iter()
        .find(|&i| i != target && i != 2)
        .expect("id");
    let sender = if target == 2 { 1 } else { 2 };
    let claimed = if claimed == sender {
        c.ids()
            .into_iter()
            .find(|&i| i != target && i != sender)
            .expect("id")
    } else {
        claimed
    };
    let (sc, sk) = (
        read(&format!("node-{sender}.crt")),
        read(&format!("node-{sender}.key")),
    );
    let ch = raw_channel(&addr, &dir, Some((&sc, &sk)))
        .await
        .expect("a real node's certificate connects");
    let mut peer = proto::node_communication_client::NodeCommunicationClient::new(ch);
    let s = peer
        .stream(tokio_stream::iter(vec![fake(claimed)]))
        .await
        .expect_err("a node speaking as another");
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    // A user's certificate on the peer service.
    let ch = raw_channel(&addr, &dir, Some((&read("admin.crt"), &read("admin.key"))))
        .await
        .expect("connects");
    let mut peer = proto::node_communication_client::NodeCommunicationClient::new(ch);
    let s = peer
        .stream(tokio_stream::iter(vec![fake(sender)]))
        .await
        .expect_err("a client certificate on the peer service");
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    // A node certificate of another CA: no TLS connection at all.
    let other = tempfile::tempdir().expect("tempdir");
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "raftkv cluster CA evil");
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let ca = p.self_signed(&ca_key).expect("ca");
    std::fs::write(other.path().join("ca.crt"), ca.pem()).expect("write");
    std::fs::write(other.path().join("ca.key"), ca_key.serialize_pem()).expect("write");
    let (fc, fk) = sign(
        other.path(),
        &format!("raftkv-node-{sender}"),
        -60,
        3600,
        true,
    );
    let refused = match raw_channel(&addr, &dir, Some((&fc, &fk))).await {
        Err(e) => e,
        Ok(ch) => {
            let mut peer = proto::node_communication_client::NodeCommunicationClient::new(ch);
            let s = peer
                .stream(tokio_stream::iter(vec![fake(sender)]))
                .await
                .expect_err("a foreign node certificate");
            raftkv::client::describe(&s)
        }
    };
    assert!(!refused.is_empty());

    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        terms(&c).await,
        before,
        "no fake peer changed any node's term or log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_on_sighup_while_a_bench_runs_without_a_failed_request() {
    let c = secure(3).await;
    let config = c.config.to_str().expect("path").to_string();
    let bench = std::process::Command::new(super::harness::BIN)
        .args([
            "bench",
            "--config",
            &config,
            "--duration",
            "8s",
            "--warmup",
            "0s",
            "--clients",
            "8",
            "--json",
        ])
        .current_dir(c.dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("bench");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let old = std::fs::read(certs(&c).join("node-1.crt")).expect("cert");
    for id in c.ids() {
        let (code, out, err) = run_cli(
            &[
                "certs",
                "node",
                &id.to_string(),
                "--hosts",
                "127.0.0.1",
                "--config",
                &config,
            ],
            "",
            c.dir.path(),
        );
        assert_eq!(code, 0, "{out}{err}");
        c.signal(id, Signal::SIGHUP);
    }
    let out = bench.wait_with_output().expect("bench ends");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json report");
    assert!(report["ops"].as_u64().unwrap_or(0) > 0, "{report}");
    assert_eq!(report["errors"].as_u64(), Some(0), "{report}");

    // New connections get the new certificate.
    let new = std::fs::read(certs(&c).join("node-1.crt")).expect("cert");
    assert_ne!(old, new);
    let served = served_certificate(&c.addrs()[&1], &certs(&c)).await;
    let new_der = rustls_pki_types::pem::PemObject::from_pem_slice(&new)
        .map(|d: rustls_pki_types::CertificateDer<'static>| d.to_vec())
        .expect("pem");
    assert_eq!(served, new_der, "node 1 serves the reloaded certificate");
    // And the cluster still works with peers reconnecting on the new ones.
    let mut admin = client(&c, c.dialer.clone());
    admin.put("after", "rotation").await.expect("write");
}

/// Why a status call with the PEM `identity` fails: at the handshake, or on the call (in TLS 1.3
/// the node judges a client's certificate after the client has finished its side).
async fn status_refused(addr: &str, ca_dir: &Path, identity: (&str, &str)) -> String {
    match raw_channel(addr, ca_dir, Some(identity)).await {
        Err(e) => e,
        Ok(ch) => {
            let mut dc = proto::data_service_client::DataServiceClient::new(ch);
            let s = dc
                .status(proto::StatusRequest {})
                .await
                .expect_err("the client's certificate is refused");
            raftkv::client::describe(&s)
        }
    }
}

/// Waits until node `id`'s log file (written asynchronously) holds `needle`.
async fn wait_log(c: &TestCluster, id: NodeId, needle: &str) {
    let path = c.dir.path().join(format!("logs/node-{id}.log"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        if log.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {id}'s log never said {needle:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The certificate a node presents to a new TLS connection (DER).
async fn served_certificate(addr: &str, dir: &Path) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    raftkv::security::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_file(dir.join("ca.crt")).expect("ca"))
        .expect("root");
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("handshake");
    tls.get_ref().1.peer_certificates().expect("certs")[0].to_vec()
}
