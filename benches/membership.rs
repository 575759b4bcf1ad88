//! Membership changes, measured on real processes (`cargo bench --bench membership`, or
//! `just bench-membership`).
//!
//! 1. Adding a member: 3 nodes are loaded with `RAFTKV_MEMBER_MIB` MiB of state (default
//!    1024: 32 KiB values under distinct keys), then node 4 is started with
//!    `--join --voter`. Reports the time until it is a learner, and until it is a voter (it
//!    catches up by snapshot, then the leader promotes it), with the snapshots it installed.
//! 2. Unavailability: 16 clients write small values in a closed loop; the longest gap between
//!    two successful writes is measured around each of `RAFTKV_MEMBER_ROUNDS` (default 5)
//!    leadership transfers, then around as many kill -9s of the leader (restarted afterwards).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftkv::client::Client;
use raftkv::raft::NodeId;

#[path = "../tests/common/cluster_config.rs"]
mod cluster_config;

const BIN: &str = env!("CARGO_BIN_EXE_raftkv");
const VALUE: usize = 32 << 10;

struct Nodes {
    dir: tempfile::TempDir,
    config: PathBuf,
    procs: BTreeMap<NodeId, Child>,
    addrs: BTreeMap<NodeId, String>,
}

impl Nodes {
    fn start(n: usize) -> Nodes {
        let dir = tempfile::tempdir_in(std::env::var("RAFTKV_BENCH_DIR").unwrap_or(".".into()))
            .expect("tempdir");
        let hosts = cluster_config::free_loopback(n);
        let config = cluster_config::write(dir.path(), &hosts, r#""max_value_bytes": 65536"#);
        let addrs = hosts
            .iter()
            .enumerate()
            .map(|(i, (h, p))| (i as NodeId + 1, format!("{h}:{p}")))
            .collect();
        let mut nodes = Nodes {
            dir,
            config,
            procs: BTreeMap::new(),
            addrs,
        };
        for id in 1..=n as NodeId {
            nodes.spawn(id);
        }
        nodes
    }

    fn spawn(&mut self, id: NodeId) {
        let c = cluster_config::spawn_node(&self.config, id);
        self.procs.insert(id, c);
    }

    fn join(&mut self, id: NodeId) {
        let port = cluster_config::free_loopback(1)[0].1;
        let addr = format!("127.0.0.1:{port}");
        let via: Vec<String> = self.addrs.values().cloned().collect();
        let child = Command::new(BIN)
            .args(["node", "--id", &id.to_string(), "--quiet", "--config"])
            .arg(&self.config)
            .args(["--join", &via.join(","), "--listen", &addr, "--voter"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the new node");
        self.procs.insert(id, child);
        self.addrs.insert(id, addr);
    }

    fn kill(&mut self, id: NodeId) {
        if let Some(mut c) = self.procs.remove(&id) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn client(&self) -> Client {
        Client::new(self.addrs.clone()).with_timeout(Duration::from_secs(30))
    }

    async fn leader(&self) -> Option<raftkv::proto::StatusResponse> {
        self.client()
            .status_all(Duration::from_millis(500))
            .await
            .into_iter()
            .filter_map(|r| r.result.ok())
            .filter(|s| s.role == "leader")
            .max_by_key(|s| s.term)
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

fn dir_mib(p: &std::path::Path) -> f64 {
    fn walk(p: &std::path::Path) -> u64 {
        std::fs::read_dir(p).map_or(0, |rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
    }
    walk(p) as f64 / (1 << 20) as f64
}

async fn add_member(mib: u64) {
    let mut nodes = Nodes::start(3);
    while nodes.leader().await.is_none() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let writes = (mib << 20) / VALUE as u64;
    let started = Instant::now();
    let client = nodes.client();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let mut c = client.fork();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let value = vec![b'v'; VALUE];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= writes {
                    break;
                }
                c.put(format!("key{i:08}"), value.clone())
                    .await
                    .expect("load write");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let load_secs = started.elapsed().as_secs_f64();
    let leader_dir = nodes.dir.path().join("data/node-1");
    println!(
        "loaded {writes} values of {} KiB ({mib} MiB) in {load_secs:.1} s; node 1's data directory: {:.0} MiB",
        VALUE >> 10,
        dir_mib(&leader_dir)
    );
    let started = Instant::now();
    nodes.join(4);
    let (mut learner_at, mut voter_at) = (None, None);
    while voter_at.is_none() && started.elapsed() < Duration::from_secs(900) {
        if let Some(l) = nodes.leader().await {
            let m = l.members.iter().find(|m| m.id == 4);
            if m.is_some() && learner_at.is_none() {
                learner_at = Some(started.elapsed());
            }
            if m.is_some_and(|m| m.voter) {
                voter_at = Some(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let st = nodes
        .client()
        .status_all(Duration::from_secs(1))
        .await
        .into_iter()
        .find(|r| r.id == 4)
        .and_then(|r| r.result.ok());
    let secs = |d: Option<Duration>| {
        d.map_or("not within 900 s".into(), |d| {
            format!("{:.1} s", d.as_secs_f64())
        })
    };
    println!(
        "node 4 with {mib} MiB of state: a learner after {}, a voter after {}; snapshots installed {}, data directory {:.0} MiB",
        secs(learner_at),
        secs(voter_at),
        st.as_ref().map_or(0, |s| s.snapshots_installed),
        dir_mib(&nodes.dir.path().join("data/node-4"))
    );
}

/// The longest gap between two successful writes of 16 closed-loop clients during `fault`.
async fn longest_gap(nodes: &mut Nodes, fault: &str) -> Vec<f64> {
    let rounds: usize = std::env::var("RAFTKV_MEMBER_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let mut gaps = Vec::new();
    for _ in 0..rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let done: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let client = Client::discover(nodes.addrs.clone())
            .await
            .with_timeout(Duration::from_secs(10));
        let mut tasks = Vec::new();
        for w in 0..16 {
            let mut c = client.fork();
            let (stop, done) = (stop.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if c.put(format!("gap{w}-{}", i % 100), "x").await.is_ok() {
                        done.lock().expect("lock").push(Instant::now());
                    }
                    i += 1;
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let at = Instant::now();
        let leader = nodes.leader().await.map(|s| s.id);
        match (fault, leader) {
            ("transfer", Some(_)) => {
                let _ = client.transfer_leader(0).await;
            }
            ("kill", Some(l)) => nodes.kill(l),
            _ => {}
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        if fault == "kill"
            && let Some(l) = leader
        {
            nodes.spawn(l);
        }
        let mut times = done.lock().expect("lock").clone();
        times.sort();
        let window: Vec<&Instant> = times
            .iter()
            .filter(|t| **t + Duration::from_millis(500) >= at)
            .collect();
        let gap = window
            .windows(2)
            .map(|w| w[1].duration_since(*w[0]))
            .max()
            .unwrap_or_default();
        gaps.push(gap.as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_secs(2)).await;
        while nodes.leader().await.is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    gaps
}

async fn unavailability() {
    let mut nodes = Nodes::start(3);
    while nodes.leader().await.is_none() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for fault in ["transfer", "kill"] {
        let mut gaps = longest_gap(&mut nodes, fault).await;
        gaps.sort_by(f64::total_cmp);
        let list: Vec<String> = gaps.iter().map(|g| format!("{g:.0}")).collect();
        println!(
            "longest gap between successful writes (16 clients), {}: median {:.0} ms, max {:.0} ms (runs: {} ms)",
            if fault == "transfer" {
                "leadership transfer"
            } else {
                "kill -9 of the leader"
            },
            gaps[gaps.len() / 2],
            gaps[gaps.len() - 1],
            list.join(", ")
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mib: u64 = std::env::var("RAFTKV_MEMBER_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    rt.block_on(async {
        unavailability().await;
        add_member(mib).await;
    });
}
