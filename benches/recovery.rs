//! Recovery, measured end to end on real processes (`cargo bench --bench recovery`, or
//! `just bench-catchup` and `just bench-restart`).
//!
//! - `RAFTKV_RECOVERY=catchup` (the default): 3 nodes, 64 clients writing 256-byte values over
//!   10,000 keys. After 20 s a follower is killed with SIGKILL; 60 s later it is started again.
//!   Reports the entries it missed, the time from its restart until it lags the leader by fewer
//!   than 5,000 entries, every node's peak RSS during the catch-up beside its steady RSS (the
//!   peak of the 10 s before the kill), and the terms and leaders seen. With
//!   `RAFTKV_BENCH_ETCD=1` (or an etcd binary's path) the same is then done to a fresh etcd
//!   cluster of three members with its default settings (`support/etcd.rs`).
//! - `RAFTKV_RECOVERY=restart`: `RAFTKV_RESTART_WRITES` writes (default 1,000,000) by 64
//!   clients, then every node is killed with SIGKILL and started again: the time to the first
//!   acknowledged write, and until every node has applied what was committed before.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicU8;
use std::time::{Duration, Instant};

#[path = "../tests/common/cluster_config.rs"]
mod cluster_config;
#[path = "support/etcd.rs"]
mod etcd;

const BIN: &str = env!("CARGO_BIN_EXE_raftkv");
const DOWN: Duration = Duration::from_secs(60);
const WARM: Duration = Duration::from_secs(20);
const CAUGHT_UP_LAG: u64 = 5_000;

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// A cluster of `raftkv node` processes in a temporary directory.
struct Nodes {
    _dir: tempfile::TempDir,
    config: PathBuf,
    procs: BTreeMap<u64, Child>,
    client: raftkv::client::Client,
}

impl Nodes {
    fn start(n: usize) -> Nodes {
        let dir = tempfile::tempdir_in(std::env::var("RAFTKV_BENCH_DIR").unwrap_or(".".into()))
            .expect("tempdir");
        let config = cluster_config::write(dir.path(), &cluster_config::free_loopback(n), "");
        let cfg = raftkv::config::Config::load(&config).expect("config");
        let mut nodes = Nodes {
            _dir: dir,
            config,
            procs: BTreeMap::new(),
            client: raftkv::client::Client::new(cfg.addrs()),
        };
        for id in 1..=n as u64 {
            nodes.spawn(id);
        }
        nodes
    }

    fn spawn(&mut self, id: u64) {
        let c = cluster_config::spawn_node(&self.config, id);
        self.procs.insert(id, c);
    }

    fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.procs.remove(&id) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn pids(&self) -> Vec<(u64, u32)> {
        self.procs.iter().map(|(&id, c)| (id, c.id())).collect()
    }

    /// (id, role, term, leader, commit, applied, snapshots installed) of every node answering.
    async fn status(&self) -> Vec<(u64, String, u64, u64, u64, u64, u64)> {
        self.client
            .status_all(Duration::from_millis(300))
            .await
            .into_iter()
            .filter_map(|r| {
                let s = r.result.ok()?;
                Some((
                    r.id,
                    s.role,
                    s.term,
                    s.leader_id,
                    s.commit_index,
                    s.applied_index,
                    s.snapshots_installed,
                ))
            })
            .collect()
    }

    fn load(&self, clients: usize, args: &[&str]) -> Child {
        Command::new(BIN)
            .args(["bench", "--config"])
            .arg(&self.config)
            .args(["--clients", &clients.to_string(), "--workload", "put"])
            .args(["--keys", "10000", "--value-size", "256", "--warmup", "0s"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn raftkv bench")
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in self.procs.values_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What one catch-up run saw.
#[derive(Default)]
struct CatchUp {
    missed: u64,
    catch_up_secs: Option<f64>,
    steady_rss: BTreeMap<u64, f64>,
    peak_rss: BTreeMap<u64, f64>,
    terms: BTreeSet<u64>,
    leaders: BTreeSet<u64>,
    snapshots: u64,
}

impl CatchUp {
    fn print(&self, who: &str, victim: u64) {
        let rss = |m: &BTreeMap<u64, f64>| {
            m.iter()
                .map(|(id, r)| format!("{id}:{r:.0}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "{who}: follower {victim} missed {} entries; caught up (lag < {CAUGHT_UP_LAG}) {} after its restart{}",
            self.missed,
            self.catch_up_secs
                .map_or("not within 300 s".into(), |s| format!("{s:.1} s")),
            if self.snapshots > 0 {
                format!(" ({} snapshot installed)", self.snapshots)
            } else {
                String::new()
            }
        );
        println!(
            "{who}: RSS MiB steady {} | peak during catch-up {}",
            rss(&self.steady_rss),
            rss(&self.peak_rss)
        );
        println!(
            "{who}: terms seen {:?}, leaders seen {:?}",
            self.terms, self.leaders
        );
    }
}

fn sample_rss(into: &mut BTreeMap<u64, f64>, pids: &[(u64, u32)]) {
    for &(id, pid) in pids {
        let r = rss_mib(pid);
        let e = into.entry(id).or_insert(0.0);
        *e = e.max(r);
    }
}

fn raftkv_catchup(rt: &tokio::runtime::Runtime) {
    let mut nodes = Nodes::start(3);
    // Two loads of 64 clients one after the other: until the restart, and for 15 s from it
    // (the snapshot's transfer and install fall in the second).
    let before_secs = format!("{}s", (WARM + DOWN).as_secs());
    let load = nodes.load(64, &["--duration", &before_secs, "--json"]);
    let mut during = None;
    let mut seen = CatchUp::default();
    rt.block_on(async {
        let started = Instant::now();
        let mut steady = BTreeMap::new();
        while started.elapsed() < WARM {
            if started.elapsed() > WARM - Duration::from_secs(10) {
                sample_rss(&mut steady, &nodes.pids());
            }
            for s in nodes.status().await {
                seen.terms.extend((s.2 > 0).then_some(s.2));
                if s.1 == "leader" {
                    seen.leaders.insert(s.0);
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        seen.steady_rss = steady;
        let st = nodes.status().await;
        let victim = st
            .iter()
            .find(|s| s.1 == "follower")
            .map(|s| s.0)
            .expect("a follower");
        let before = st.iter().find(|s| s.0 == victim).map_or(0, |s| s.5);
        nodes.kill(victim);
        let down = Instant::now();
        let mut peak = BTreeMap::new();
        while down.elapsed() < DOWN {
            sample_rss(&mut peak, &nodes.pids());
            for s in nodes.status().await {
                seen.terms.extend((s.2 > 0).then_some(s.2));
                if s.1 == "leader" {
                    seen.leaders.insert(s.0);
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let commit_then = nodes.status().await.iter().map(|s| s.4).max().unwrap_or(0);
        seen.missed = commit_then.saturating_sub(before);
        nodes.spawn(victim);
        during = Some(nodes.load(64, &["--duration", "15s", "--json"]));
        let restarted = Instant::now();
        let mut done_at = None;
        while restarted.elapsed() < Duration::from_secs(300) {
            sample_rss(&mut peak, &nodes.pids());
            let st = nodes.status().await;
            for s in &st {
                seen.terms.extend((s.2 > 0).then_some(s.2));
                if s.1 == "leader" {
                    seen.leaders.insert(s.0);
                }
            }
            let leader_commit = st.iter().filter(|s| s.1 == "leader").map(|s| s.4).max();
            let mine = st.iter().find(|s| s.0 == victim);
            if let (Some(c), Some(m)) = (leader_commit, mine) {
                seen.snapshots = m.6;
                if done_at.is_none() && c.saturating_sub(m.5) < CAUGHT_UP_LAG {
                    done_at = Some(restarted.elapsed());
                }
            }
            // Keep sampling RSS for 10 s after the catch-up.
            if done_at.is_some_and(|d| restarted.elapsed() > d + Duration::from_secs(10)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        seen.catch_up_secs = done_at.map(|d| d.as_secs_f64());
        seen.peak_rss = peak;
        seen.print("raftkv", victim);
    });
    let latency = |c: Child| {
        let out = c.wait_with_output().expect("bench");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        format!(
            "{:.0} writes/s, p50 {:.2} ms, p99 {:.2} ms",
            v["ops_per_sec"].as_f64().unwrap_or(0.0),
            v["p50_ms"].as_f64().unwrap_or(0.0),
            v["p99_ms"].as_f64().unwrap_or(0.0)
        )
    };
    println!("raftkv: load until the restart: {}", latency(load));
    if let Some(d) = during {
        println!(
            "raftkv: load in the 15 s from the restart (snapshot sent): {}",
            latency(d)
        );
    }
}

fn etcd_catchup(bin: &str, rt: &tokio::runtime::Runtime) {
    let ports = cluster_config::free_loopback(6);
    let mut c = etcd::EtcdCluster::start(bin, 3, &ports, rt);
    let urls = c.client_urls.clone();
    let status_all = |urls: Vec<String>| async move {
        let mut out = Vec::new();
        for (i, u) in urls.iter().enumerate() {
            if let Some(s) = etcd::status(u).await {
                out.push((i, s));
            }
        }
        out
    };
    let mut seen = CatchUp::default();
    rt.block_on(async {
        let st = status_all(urls.clone()).await;
        let leader = st
            .first()
            .map(|s| s.1.leader)
            .expect("an etcd member answers");
        let victim = st
            .iter()
            .find(|s| s.1.header.as_ref().map(|h| h.member_id) != Some(leader))
            .map(|s| s.0)
            .expect("an etcd follower");
        // The load goes to the other members only, so that no connection of it dies.
        let load_urls: Vec<String> = urls
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != victim)
            .map(|(_, u)| u.clone())
            .collect();
        let stop = Arc::new(AtomicU8::new(0));
        let load = tokio::spawn(etcd::put_load(load_urls, 64, stop.clone()));
        let pids = |c: &etcd::EtcdCluster| -> Vec<(u64, u32)> {
            c.pids()
                .into_iter()
                .enumerate()
                .map(|(i, p)| (i as u64 + 1, p))
                .collect()
        };
        let observe = |seen: &mut CatchUp, st: &[(usize, etcd::StatusResponse)]| {
            for (_, s) in st {
                seen.terms.insert(s.raft_term);
                seen.leaders.insert(s.leader);
            }
        };
        let started = Instant::now();
        let mut steady = BTreeMap::new();
        while started.elapsed() < WARM {
            if started.elapsed() > WARM - Duration::from_secs(10) {
                sample_rss(&mut steady, &pids(&c));
            }
            observe(&mut seen, &status_all(urls.clone()).await);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        seen.steady_rss = steady;
        let before = status_all(urls.clone())
            .await
            .iter()
            .find(|s| s.0 == victim)
            .map_or(0, |s| s.1.raft_applied_index);
        c.kill(victim);
        let down = Instant::now();
        let mut peak = BTreeMap::new();
        while down.elapsed() < DOWN {
            sample_rss(&mut peak, &pids(&c));
            observe(&mut seen, &status_all(urls.clone()).await);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let applied_then = status_all(urls.clone())
            .await
            .iter()
            .map(|s| s.1.raft_applied_index)
            .max()
            .unwrap_or(0);
        seen.missed = applied_then.saturating_sub(before);
        c.restart(victim);
        let restarted = Instant::now();
        let mut done_at = None;
        while restarted.elapsed() < Duration::from_secs(300) {
            sample_rss(&mut peak, &pids(&c));
            let st = status_all(urls.clone()).await;
            observe(&mut seen, &st);
            let top = st
                .iter()
                .filter(|s| s.0 != victim)
                .map(|s| s.1.raft_applied_index)
                .max();
            let mine = st.iter().find(|s| s.0 == victim);
            if let (Some(top), Some(m)) = (top, mine)
                && done_at.is_none()
                && top.saturating_sub(m.1.raft_applied_index) < CAUGHT_UP_LAG
            {
                done_at = Some(restarted.elapsed());
            }
            if done_at.is_some_and(|d| restarted.elapsed() > d + Duration::from_secs(10)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        seen.catch_up_secs = done_at.map(|d| d.as_secs_f64());
        seen.peak_rss = peak;
        stop.store(etcd::STOP, std::sync::atomic::Ordering::Relaxed);
        let _ = load.await;
        seen.print("etcd", victim as u64 + 1);
    });
}

fn raftkv_restart(writes: u64, rt: &tokio::runtime::Runtime) {
    let mut nodes = Nodes::start(3);
    let load = nodes.load(64, &["--ops", &writes.to_string(), "--json"]);
    let out = load.wait_with_output().expect("bench");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    rt.block_on(async {
        let commit = nodes
            .status()
            .await
            .iter()
            .map(|s| s.4)
            .max()
            .unwrap_or(0);
        let data_mib = raftkv_dir_mib(&nodes);
        for id in 1..=3 {
            nodes.kill(id);
        }
        let started = Instant::now();
        for id in 1..=3 {
            nodes.spawn(id);
        }
        let mut client = nodes.client.clone().with_timeout(Duration::from_secs(60));
        client.put("after-restart", "1").await.expect("a write after the restart");
        let first_write = started.elapsed();
        let all_applied = loop {
            let st = nodes.status().await;
            if st.len() == 3 && st.iter().all(|s| s.5 >= commit) {
                break started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        println!(
            "raftkv restart after {writes} writes ({:.0} writes/s; log up to {commit}; data {data_mib:.0} MiB): first write {:.2} s, every node applied {:.2} s after the start",
            report["ops_per_sec"].as_f64().unwrap_or(0.0),
            first_write.as_secs_f64(),
            all_applied.as_secs_f64()
        );
    });
}

fn raftkv_dir_mib(nodes: &Nodes) -> f64 {
    fn bytes(p: &std::path::Path) -> u64 {
        std::fs::read_dir(p).map_or(0, |d| {
            d.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => bytes(&e.path()),
                    _ => e.metadata().map_or(0, |m| m.len()),
                })
                .sum()
        })
    }
    bytes(&nodes.config.with_file_name("data")) as f64 / (1 << 20) as f64
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run only on request.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // The client connects lazily, inside the runtime.
    let _guard = rt.enter();
    match std::env::var("RAFTKV_RECOVERY").as_deref() {
        Ok("restart") => {
            let writes = std::env::var("RAFTKV_RESTART_WRITES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1_000_000);
            raftkv_restart(writes, &rt);
        }
        _ => {
            raftkv_catchup(&rt);
            if std::env::var("RAFTKV_BENCH_ETCD").is_ok() {
                let bin = etcd::binary().unwrap_or_else(|e| panic!("RAFTKV_BENCH_ETCD: {e}"));
                etcd_catchup(&bin, &rt);
            }
        }
    }
}
