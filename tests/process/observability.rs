//! Metrics, health endpoints and JSON logs of real nodes.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use raftkv::raft::NodeId;

use super::harness::{TestCluster, add_http_ports, run_cli};
use super::{CATCH_UP, ELECTION};

/// A cluster of `n` nodes whose config entries have an `http_port`; returns the HTTP ports.
fn with_http_ports(n: usize) -> (TestCluster, BTreeMap<NodeId, u16>) {
    let c = TestCluster::new(n);
    let ports = add_http_ports(&c.config)
        .into_iter()
        .zip(1..)
        .map(|(port, id)| (id, port))
        .collect();
    (c, ports)
}

/// One HTTP/1.1 GET; the status code and the body.
fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    (code, body.to_string())
}

/// Parses Prometheus' text exposition (OpenMetrics 1.0) strictly: every line is a `# HELP`,
/// `# TYPE` or `# UNIT` comment, a sample `name{labels} value`, or the final `# EOF`. Returns
/// the samples by `name{labels}` as written.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    let mut saw_eof = false;
    for line in text.lines() {
        assert!(!saw_eof, "a line after # EOF: {line:?}");
        if line == "# EOF" {
            saw_eof = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.splitn(3, ' ');
            let kind = words.next().unwrap_or_default();
            assert!(
                matches!(kind, "HELP" | "TYPE" | "UNIT"),
                "unknown comment {line:?}"
            );
            let name = words.next().unwrap_or_default();
            assert!(valid_name(name), "bad metric name in {line:?}");
            if kind == "TYPE" {
                let t = words.next().unwrap_or_default();
                assert!(
                    matches!(
                        t,
                        "counter" | "gauge" | "histogram" | "summary" | "unknown" | "info"
                    ),
                    "bad type in {line:?}"
                );
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        let name = series.split('{').next().unwrap_or_default();
        assert!(valid_name(name), "bad sample name in {line:?}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("bad labels in {line:?}"));
            for pair in inner.split(',') {
                let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("{line:?}"));
                assert!(valid_name(k), "bad label name in {line:?}");
                assert!(
                    v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                    "unquoted label value in {line:?}"
                );
            }
        }
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        assert!(
            samples.insert(series.to_string(), v).is_none(),
            "duplicate series {series}"
        );
    }
    assert!(saw_eof, "no # EOF at the end");
    samples
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn metric(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no {series} among {:?}", m.keys().collect::<Vec<_>>()))
}

fn scrape(port: u16) -> BTreeMap<String, f64> {
    let (code, body) = http_get(port, "/metrics");
    assert_eq!(code, 200, "{body}");
    parse_metrics(&body)
}

/// Polls `/readyz` of `port` until its status is `want`; returns the body.
fn wait_readyz(port: u16, want: u16, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (code, body) = http_get(port, "/readyz");
        if code == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still {code} after {within:?}: {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn grpc_health(addr: &str, service: &str) -> i32 {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
    h.check(tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    })
    .await
    .expect("health check")
    .into_inner()
    .status
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_readyz_follows_the_leader() {
    let (mut c, http) = with_http_ports(3);
    for id in c.ids() {
        c.start(id);
    }
    let leader = c.wait_leader(ELECTION).await;
    let mut client = c.client();
    for i in 0..200 {
        client.put(format!("k{i}"), "v").await.expect("put");
    }
    assert!(client.get("k1", false).await.expect("get").is_some());
    // A write sent to a follower is refused there (and counted as such).
    let follower = c.follower_other_than(leader);
    let mut raw = raftkv::proto::data_service_client::DataServiceClient::connect(format!(
        "http://{}",
        c.addrs()[&follower]
    ))
    .await
    .expect("connect");
    let refused = raw
        .put(raftkv::proto::PutRequest {
            key: "x".into(),
            value: "y".into(),
            id: None,
        })
        .await;
    assert!(refused.is_err());
    // The round-trip prober checks every peer once a second (its first check is not counted).
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let mut leaders = 0.0;
    for id in c.ids() {
        let m = scrape(http[&id]);
        assert_eq!(metric(&m, "raftkv_server_has_leader"), 1.0, "node {id}");
        leaders += metric(&m, "raftkv_server_is_leader");
        assert!(metric(&m, "raftkv_server_proposals_committed_total") >= 200.0);
        assert!(metric(&m, "raftkv_server_proposals_applied_total") >= 200.0);
        assert!(metric(&m, "raftkv_server_leader_changes_seen_total") >= 1.0);
        assert!(metric(&m, "raftkv_disk_wal_fsync_duration_seconds_count") > 0.0);
        assert!(metric(&m, "raftkv_disk_backend_commit_duration_seconds_count") > 0.0);
        assert!(metric(&m, "raftkv_log_size_bytes") > 0.0);
        assert!(metric(&m, "raftkv_log_entries") >= 200.0);
        assert_eq!(metric(&m, "raftkv_server_id"), id as f64);
        for peer in c.ids().into_iter().filter(|p| *p != id) {
            assert!(
                metric(
                    &m,
                    &format!("raftkv_network_peer_round_trip_time_seconds_count{{to=\"{peer}\"}}")
                ) >= 1.0,
                "node {id} to {peer}"
            );
        }
        if id == leader {
            assert!(
                metric(&m, "raftkv_requests_total{op=\"put\",result=\"ok\"}") >= 200.0,
                "{m:?}"
            );
            assert!(metric(&m, "raftkv_request_duration_seconds_count{op=\"put\"}") >= 200.0);
            assert!(metric(&m, "raftkv_requests_total{op=\"get\",result=\"ok\"}") >= 1.0);
        }
        if id == follower {
            assert!(
                metric(
                    &m,
                    "raftkv_requests_total{op=\"put\",result=\"not_leader\"}"
                ) >= 1.0
            );
        }
        assert_eq!(http_get(http[&id], "/livez"), (200, "ok\n".to_string()));
        assert_eq!(http_get(http[&id], "/readyz"), (200, "ok\n".to_string()));
        let (_, verbose) = http_get(http[&id], "/readyz?verbose");
        assert!(verbose.contains("[+]leader ok"), "{verbose}");
        assert_eq!(grpc_health(&c.addrs()[&id], "").await, SERVING);
        assert_eq!(
            grpc_health(&c.addrs()[&id], "raftkv.DataService").await,
            SERVING
        );
    }
    assert_eq!(leaders, 1.0);
    // The monitor shows the key metrics of nodes that serve them.
    let (code, out, err) = run_cli(
        &["monitor", "--once", "--config", "config.json"],
        "",
        c.dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    let head = out.lines().nth(1).unwrap_or_default();
    assert!(
        head.contains("FSYNC P99") && head.contains("RTT P99"),
        "{out}"
    );
    assert!(out.lines().skip(2).all(|l| l.contains("ms")), "{out}");

    // Cut off from the leader and the other follower: not ready, and says why.
    let others: Vec<NodeId> = c.ids().into_iter().filter(|i| *i != follower).collect();
    for &o in &others {
        c.signal(o, Signal::SIGSTOP);
    }
    let body = wait_readyz(http[&follower], 503, ELECTION);
    assert!(body.contains("[-]leader failed"), "{body}");
    assert!(body.contains("readyz check failed"), "{body}");
    assert_eq!(http_get(http[&follower], "/livez").0, 200, "still live");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_ne!(
        grpc_health(&c.addrs()[&follower], "raftkv.DataService").await,
        SERVING
    );
    for &o in &others {
        c.signal(o, Signal::SIGCONT);
    }
    wait_readyz(http[&follower], 200, CATCH_UP);

    // Behind: once ready again it has applied what the leader had committed.
    let leader = c.wait_leader(ELECTION).await;
    let lagging = c.follower_other_than(leader);
    c.signal(lagging, Signal::SIGSTOP);
    let mut client = c.client();
    let mut last = 0;
    for i in 0..500 {
        last = client.put(format!("lag{i}"), "v").await.expect("put");
    }
    c.signal(lagging, Signal::SIGCONT);
    wait_readyz(http[&lagging], 200, CATCH_UP);
    let m = scrape(http[&lagging]);
    assert!(
        metric(&m, "raftkv_server_proposals_applied_total") >= last as f64,
        "ready at applied {} before the leader's commit {last}",
        metric(&m, "raftkv_server_proposals_applied_total")
    );
}

#[test]
fn http_port_errors_name_the_port() {
    let (c, http) = with_http_ports(1);
    // The HTTP port taken by another program: the node says which port, and stops.
    let taken = std::net::TcpListener::bind(("127.0.0.1", http[&1])).expect("bind");
    let (code, _, err) = run_cli(
        &["node", "--id", "1", "--config", "config.json"],
        "",
        c.dir.path(),
    );
    drop(taken);
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("port {} is already in use", http[&1])) && err.contains("http_port"),
        "{err}"
    );
    assert_eq!(err.matches("already in use").count(), 1, "said once: {err}");
    // --http-port is checked like the config's http_port.
    let own = c.ports[0].to_string();
    let (code, _, err) = run_cli(
        &[
            "node",
            "--id",
            "1",
            "--config",
            "config.json",
            "--http-port",
            &own,
        ],
        "",
        c.dir.path(),
    );
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("HTTP port {own} is this node's gRPC port too")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let c = TestCluster::new(1);
    let mut child = std::process::Command::new(super::harness::BIN)
        .args([
            "node",
            "--id",
            "1",
            "--quiet",
            "--log-format",
            "json",
            "--config",
        ])
        .arg(&c.config)
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    c.wait_leader(ELECTION).await;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    );
    let _ = child.wait();
    let log = std::fs::read_to_string(c.dir.path().join("logs/node-1.log")).expect("log");
    let mut n = 0;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        n += 1;
    }
    assert!(log.contains("\"message\":\"listening\""), "{log}");
    assert!(n >= 3, "{log}");
}
