//! The benchmark table of issue 4, end to end: for each row a fresh cluster of real `raftkv`
//! processes (free loopback ports, temporary directories), `raftkv bench` against it, and one
//! line of the table. Run with `cargo bench --bench table` (or `just bench`).
//!
//! - `RAFTKV_BENCH_RUNS=2`: runs per row; the table shows the median by throughput.
//! - `RAFTKV_BENCH_SECS=8`: measured seconds per run (after 1 s of warm-up).
//! - `RAFTKV_BENCH_ROWS=3:put:64,5:get:256`: only these rows.
//! - `RAFTKV_BENCH_SOAK=600`: instead of the table, a write run of that many seconds at 64
//!   clients on 3 nodes, reporting every node's resident memory and the data size at the start
//!   and ten times during the run.
//! - `RAFTKV_BENCH_ETCD=1` (or the path of an etcd binary): every run of a row is followed by
//!   the same run against a fresh etcd cluster of the same size, and the table shows both and
//!   the ratio (`support/etcd.rs`; Debian: `apt install etcd-server`).
//! - `RAFTKV_BENCH_METRICS=1`: every run of a row is followed by the same run against a
//!   cluster whose nodes record metrics and serve them (`http_port`), and the table shows both
//!   and the ratio: what recording costs on the hot path.
//! - `RAFTKV_BENCH_TLS=1`: likewise against a cluster made secure by `raftkv certs init`
//!   (mutual TLS between the nodes, clients over TLS with a certificate): what TLS costs.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../tests/common/cluster_config.rs"]
mod cluster_config;
#[path = "support/etcd.rs"]
mod etcd;

const BIN: &str = env!("CARGO_BIN_EXE_raftkv");

struct Cluster {
    _dir: tempfile::TempDir,
    config: String,
    nodes: Vec<Child>,
}

impl Cluster {
    /// `n` nodes; with `metrics`, each serves /metrics (and so records metrics); with `tls`,
    /// the config gets a CA and certificates from `raftkv certs init`.
    fn start(n: usize, metrics: bool, tls: bool) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = cluster_config::write(dir.path(), &cluster_config::free_loopback(n), "");
        if metrics {
            cluster_config::add_http_ports(&config);
        }
        if tls {
            cluster_config::certs_init(&config);
        }
        let nodes = (1..=n as u64)
            .map(|id| cluster_config::spawn_node(&config, id))
            .collect();
        let config = config.to_str().expect("utf-8").to_string();
        let c = Cluster {
            _dir: dir,
            config,
            nodes,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = Command::new(BIN)
                .args([
                    "monitor",
                    "--config",
                    &c.config,
                    "--once",
                    "--interval",
                    "100ms",
                ])
                .output();
            if out.is_ok_and(|o| o.status.success()) {
                break;
            }
            assert!(Instant::now() < deadline, "no leader within 20 s");
        }
        c
    }

    fn rss_kib(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|c| {
                std::fs::read_to_string(format!("/proc/{}/status", c.id()))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find(|l| l.starts_with("VmRSS:"))
                            .map(str::to_string)
                    })
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
                    .unwrap_or(0)
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn bench(config: &str, workload: &str, clients: usize, secs: u64) -> serde_json::Value {
    let out = Command::new(BIN)
        .args([
            "bench",
            "--config",
            config,
            "--workload",
            workload,
            "--clients",
            &clients.to_string(),
        ])
        .args([
            "--duration",
            &format!("{secs}s"),
            "--warmup",
            "1s",
            "--keys",
            "1000",
            "--value-size",
            "256",
            "--json",
        ])
        .stderr(Stdio::null())
        .output()
        .expect("run raftkv bench");
    assert!(out.status.success(), "raftkv bench failed");
    serde_json::from_slice(&out.stdout).expect("bench JSON")
}

/// Bytes of all files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => dir_bytes(&e.path()),
                Ok(_) => e.metadata().map_or(0, |m| m.len()),
                Err(_) => 0,
            })
            .sum()
    })
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run only on request.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    assert!(Path::new(BIN).exists(), "build raftkv first");
    if let Some(secs) = std::env::var("RAFTKV_BENCH_SOAK")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        let c = Cluster::start(3, false, false);
        let warm = bench(&c.config, "put", 64, 5);
        let before = c.rss_kib();
        // The measured run goes on in a thread; every tenth of it, each node's RSS and the size
        // of the data directories (the log is never compacted yet, so it grows with every write).
        let config = c.config.clone();
        let run = std::thread::spawn(move || bench(&config, "put", 64, secs));
        let step = Duration::from_secs((secs / 10).max(1));
        let started = Instant::now();
        println!("soak: {secs} s of writes at 64 clients on 3 nodes (RSS per node, data on disk)");
        println!(
            "  {:>5} s  RSS MiB {:?}",
            0,
            before.iter().map(|k| k / 1024).collect::<Vec<_>>()
        );
        let mut next = step;
        while !run.is_finished() {
            std::thread::sleep(Duration::from_millis(200));
            if started.elapsed() >= next && !run.is_finished() {
                next += step;
                println!(
                    "  {:>5} s  RSS MiB {:?}  data {} MiB",
                    started.elapsed().as_secs(),
                    c.rss_kib().iter().map(|k| k / 1024).collect::<Vec<_>>(),
                    dir_bytes(c._dir.path()) >> 20
                );
            }
        }
        let after = c.rss_kib();
        let r = run.join().expect("bench thread");
        println!(
            "  {:>5} s  RSS MiB {:?}  data {} MiB",
            started.elapsed().as_secs(),
            after.iter().map(|k| k / 1024).collect::<Vec<_>>(),
            dir_bytes(c._dir.path()) >> 20
        );
        println!(
            "soak: {:.0} ops/s over {secs} s (warm-up {:.0} ops/s), p50 {:.2} ms, p99 {:.2} ms",
            r["ops_per_sec"].as_f64().unwrap_or(0.0),
            warm["ops_per_sec"].as_f64().unwrap_or(0.0),
            r["p50_ms"].as_f64().unwrap_or(0.0),
            r["p99_ms"].as_f64().unwrap_or(0.0),
        );
        return;
    }
    let runs = env_u64("RAFTKV_BENCH_RUNS", 1).max(1);
    let secs = env_u64("RAFTKV_BENCH_SECS", 8);
    let all: Vec<(usize, &str, usize)> = vec![
        (3, "put", 1),
        (3, "put", 64),
        (3, "put", 256),
        (3, "get", 1),
        (3, "get", 64),
        (3, "get", 256),
        (5, "put", 1),
        (5, "put", 64),
        (5, "put", 256),
        (5, "get", 64),
        (5, "get", 256),
    ];
    let wanted: Option<Vec<String>> = std::env::var("RAFTKV_BENCH_ROWS")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    let etcd_bin = std::env::var_os("RAFTKV_BENCH_ETCD")
        .map(|_| etcd::binary().unwrap_or_else(|e| panic!("RAFTKV_BENCH_ETCD: {e}")));
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let with_metrics = std::env::var_os("RAFTKV_BENCH_METRICS").is_some();
    let with_tls = std::env::var_os("RAFTKV_BENCH_TLS").is_some();
    if with_metrics || with_tls {
        println!(
            "| cluster | workload | clients | ops/s | p50 ms | p99 ms | {} on: ops/s | p50 ms | p99 ms | on/off | errors off/on |",
            if with_tls { "TLS" } else { "metrics" }
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    } else if etcd_bin.is_some() {
        println!(
            "| cluster | workload | clients | raftkv ops/s | p50 ms | p99 ms | etcd ops/s | p50 ms | p99 ms | x etcd | errors raftkv/etcd |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    } else {
        println!("| cluster | workload | clients | ops/s | p50 ms | p99 ms | errors |");
        println!("|---|---|---:|---:|---:|---:|---:|");
    }
    for (nodes, workload, clients) in all {
        if wanted
            .as_ref()
            .is_some_and(|w| !w.contains(&format!("{nodes}:{workload}:{clients}")))
        {
            continue;
        }
        // Interleaved, so that both systems see the same machine.
        let mut samples = Vec::new();
        let mut etcd_samples = Vec::new();
        let mut metric_samples = Vec::new();
        for _ in 0..runs {
            let c = Cluster::start(nodes, false, false);
            samples.push(bench(&c.config, workload, clients, secs));
            drop(c);
            if with_metrics || with_tls {
                let c = Cluster::start(nodes, with_metrics, with_tls);
                metric_samples.push(bench(&c.config, workload, clients, secs));
                drop(c);
            }
            if let Some(bin) = &etcd_bin {
                let e = etcd::EtcdCluster::start(
                    bin,
                    nodes,
                    &cluster_config::free_loopback(2 * nodes),
                    &rt,
                );
                etcd_samples.push(etcd::run(&e, workload, clients, secs, &rt));
            }
        }
        let by_ops = |a: &serde_json::Value, b: &serde_json::Value| {
            a["ops_per_sec"]
                .as_f64()
                .partial_cmp(&b["ops_per_sec"].as_f64())
                .unwrap_or(std::cmp::Ordering::Equal)
        };
        samples.sort_by(by_ops);
        metric_samples.sort_by(by_ops);
        let m = &samples[samples.len() / 2];
        let name = if workload == "get" {
            "linearizable get"
        } else {
            workload
        };
        let ops = m["ops_per_sec"].as_f64().unwrap_or(0.0);
        let (p50, p99) = (
            m["p50_ms"].as_f64().unwrap_or(0.0),
            m["p99_ms"].as_f64().unwrap_or(0.0),
        );
        if let Some(on) = metric_samples.get(metric_samples.len() / 2) {
            let on_ops = on["ops_per_sec"].as_f64().unwrap_or(0.0);
            println!(
                "| {nodes} nodes | {name} | {clients} | {ops:.0} | {p50:.2} | {p99:.2} | {on_ops:.0} | {:.2} | {:.2} | {:.2} | {}/{} |",
                on["p50_ms"].as_f64().unwrap_or(0.0),
                on["p99_ms"].as_f64().unwrap_or(0.0),
                on_ops / ops.max(1.0),
                m["errors"],
                on["errors"]
            );
        } else if etcd_samples.is_empty() {
            println!(
                "| {nodes} nodes | {name} | {clients} | {ops:.0} | {p50:.2} | {p99:.2} | {} |",
                m["errors"]
            );
        } else {
            etcd_samples.sort_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec));
            let e = &etcd_samples[etcd_samples.len() / 2];
            println!(
                "| {nodes} nodes | {name} | {clients} | {ops:.0} | {p50:.2} | {p99:.2} | {:.0} | {:.2} | {:.2} | {:.1} | {}/{} |",
                e.ops_per_sec,
                e.p50_ms,
                e.p99_ms,
                ops / e.ops_per_sec.max(1.0),
                m["errors"],
                e.errors
            );
        }
    }
}
