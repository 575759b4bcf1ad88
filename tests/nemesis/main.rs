//! Linearizability under faults, Jepsen-style, against real `raftkv` processes.
//!
//! Concurrent clients run puts, gets and deletes over a few keys (each put with a unique value)
//! and record what they asked and what they were told. Meanwhile a nemesis, driven by a printed
//! seed, kills nodes with SIGKILL and restarts them, pauses them with SIGSTOP/SIGCONT, asks the
//! leader to transfer its leadership now and then, replaces a node now and then (removes it
//! from the membership, then starts a node with a new id in its place that joins with
//! `--join --voter` and is promoted once caught up), and cuts
//! the network between groups of nodes (majority/minority splits with the leader on the minority
//! side, one-way cuts). At the end everything is healed; the cluster must recover and converge,
//! and the checker must find a linear order that explains every answer.
//!
//! - `cargo test --release --test nemesis`: the quick run (about a minute).
//! - `RAFTKV_NEMESIS_SECS=600 cargo test --release --test nemesis -- --nocapture`: a long run
//!   (`just nemesis 600`). `RAFTKV_NEMESIS_SEED=<n>` repeats a fault schedule.
//! - `RAFTKV_NEMESIS_STALE_READS=1`: reads from any node's local state (the client's stale-read
//!   option) instead of linearizable reads; the checker should then report a violation.
//!
//! Partitions need root (network namespaces); without root the run uses loopback and only
//! kills and pauses, and says so.

mod checker;
#[path = "../common/cluster_config.rs"]
mod cluster_config;
mod net;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use checker::{Input, Op, Output, Verdict};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use raftkv::client::{Client, ClientError};
use raftkv::raft::NodeId;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_raftkv");
const NODES: usize = 5;
const CLIENTS: usize = 10;
const KEYS: usize = 6;
const PORT: u16 = 7379;
const SNAPSHOTS: &str = r#""snapshot": {"log_entries_max": 2000, "keep_entries": 200}"#;

struct Cluster {
    _dir: tempfile::TempDir,
    config: PathBuf,
    net: Option<net::Net>,
    /// Where each slot (a machine: a namespace and address) listens.
    hosts: BTreeMap<usize, String>,
    /// The node id each slot runs now (a replaced node's slot gets a new id).
    ids: BTreeMap<usize, NodeId>,
    next_id: NodeId,
    procs: BTreeMap<usize, Child>,
    paused: BTreeSet<usize>,
    /// TLS (`raftkv certs init`) or plaintext (`--insecure` off loopback).
    tls: bool,
    dialer: raftkv::security::Dialer,
}

impl Cluster {
    fn new(tls: bool) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let net = match net::Net::create(NODES) {
            Ok(n) => Some(n),
            Err(e) => {
                println!("network namespaces unavailable ({e}); running without partitions");
                None
            }
        };
        let hosts: Vec<(String, u16)> = match &net {
            Some(n) => (1..=NODES).map(|i| (n.addr(i), PORT)).collect(),
            None => cluster_config::free_loopback(NODES),
        };
        // Small compaction thresholds, so that log compaction and snapshot installs happen
        // under the faults (a node down for a second or two needs a snapshot).
        let config = cluster_config::write(dir.path(), &hosts, SNAPSHOTS);
        let dialer = if tls {
            cluster_config::certs_init(&config);
            let d = dir.path().join("certs");
            raftkv::security::Dialer::tls(
                raftkv::security::load_client(&raftkv::security::Files {
                    ca: d.join("ca.crt"),
                    cert: Some(d.join("admin.crt")),
                    key: Some(d.join("admin.key")),
                })
                .expect("client certificate"),
            )
        } else {
            raftkv::security::Dialer::plaintext()
        };
        let hosts: BTreeMap<usize, String> = hosts
            .iter()
            .enumerate()
            .map(|(i, (h, p))| (i + 1, format!("{h}:{p}")))
            .collect();
        let mut c = Cluster {
            _dir: dir,
            config,
            net,
            ids: hosts.keys().map(|&i| (i, i as NodeId)).collect(),
            hosts,
            next_id: NODES as NodeId + 1,
            procs: BTreeMap::new(),
            paused: BTreeSet::new(),
            tls,
            dialer,
        };
        for i in 1..=NODES {
            c.start(i);
        }
        c
    }

    fn start(&mut self, i: usize) {
        let mut cmd = match &self.net {
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &n.ns(i), BIN]);
                c
            }
            None => Command::new(BIN),
        };
        let id = self.ids[&i];
        cmd.args(["node", "--id", &id.to_string(), "--config"])
            .arg(&self.config)
            .arg("--quiet");
        if !self.tls && self.net.is_some() {
            // Plaintext on the namespaces' 198.18.0.0/15 addresses.
            cmd.arg("--insecure");
        }
        if self.tls && id > NODES as NodeId {
            // A replacement machine gets its certificate from the cluster CA.
            let host = self.hosts[&i]
                .rsplit_once(':')
                .map_or("", |(h, _)| h)
                .to_string();
            let out = Command::new(BIN)
                .args([
                    "certs",
                    "node",
                    &id.to_string(),
                    "--hosts",
                    &host,
                    "--config",
                ])
                .arg(&self.config)
                .output()
                .expect("certs node");
            assert!(out.status.success(), "certs node: {out:?}");
        }
        if id > NODES as NodeId {
            // A replacement, not in config.json: it joins (again, after a restart: harmless).
            let others: Vec<&str> = self
                .hosts
                .iter()
                .filter(|(s, _)| **s != i)
                .map(|(_, a)| a.as_str())
                .collect();
            cmd.args([
                "--listen",
                &self.hosts[&i],
                "--join",
                &others.join(","),
                "--voter",
            ]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.procs.insert(i, cmd.spawn().expect("spawn node"));
    }

    fn pid(&self, i: usize) -> Option<Pid> {
        self.procs.get(&i).map(|c| Pid::from_raw(c.id() as i32))
    }

    fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.procs.remove(&i) {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.paused.remove(&i);
    }

    fn pause(&mut self, i: usize) {
        if let Some(p) = self.pid(i) {
            let _ = kill(p, Signal::SIGSTOP);
            self.paused.insert(i);
        }
    }

    fn resume_all(&mut self) {
        for i in std::mem::take(&mut self.paused) {
            if let Some(p) = self.pid(i) {
                let _ = kill(p, Signal::SIGCONT);
            }
        }
    }

    fn addrs(&self) -> BTreeMap<NodeId, String> {
        self.ids
            .iter()
            .map(|(s, &id)| (id, self.hosts[s].clone()))
            .collect()
    }

    fn client(&self) -> Client {
        Client::with_dialer(self.addrs(), self.dialer.clone())
    }

    /// The slot of the leader.
    async fn leader(&self) -> Option<usize> {
        let reports = self.client().status_all(Duration::from_millis(300)).await;
        let id = reports
            .iter()
            .filter_map(|r| r.result.as_ref().ok())
            .filter(|s| s.role == "leader")
            .max_by_key(|s| s.term)
            .map(|s| s.id)?;
        self.ids.iter().find(|(_, i)| **i == id).map(|(s, _)| *s)
    }

    /// Waits up to `within` for slot `i`'s process to exit by itself, then kills it.
    fn reap(&mut self, i: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let exited = loop {
            match self.procs.get_mut(&i).map(|c| c.try_wait()) {
                None | Some(Ok(Some(_))) => break true,
                _ if Instant::now() > deadline => break false,
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        self.kill9(i);
        exited
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.resume_all();
        for (_, mut c) in std::mem::take(&mut self.procs) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Recorder {
    started: Instant,
    ops: Mutex<Vec<Op>>,
}

impl Recorder {
    fn now(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    fn record(
        &self,
        client: usize,
        key: &str,
        input: Input,
        output: Output,
        call: u64,
        ret: Option<u64>,
    ) {
        let mut ops = self.ops.lock().expect("lock");
        let id = ops.len();
        ops.push(Op {
            id,
            client,
            key: key.to_string(),
            input,
            output,
            call,
            ret,
        });
    }
}

#[derive(Default, Debug)]
struct Counts {
    ok: u64,
    failed: u64,
    unknown: u64,
}

/// Runs one client until `until`.
async fn client_loop(
    id: usize,
    mut client: Client,
    rec: Arc<Recorder>,
    until: Instant,
    stale: bool,
    seed: u64,
) -> Counts {
    let mut rng = SmallRng::seed_from_u64(seed ^ (id as u64) << 20);
    let mut counts = Counts::default();
    let mut n = 0u64;
    while Instant::now() < until {
        let key = format!("k{}", rng.random_range(0..KEYS));
        let call = rec.now();
        let roll = rng.random_range(0..100);
        let (input, result): (Input, Result<Output, ClientError>) = if roll < 45 {
            n += 1;
            let v = format!("c{id}-{n}");
            let r = client.put(key.clone(), v.clone()).await.map(|_| Output::Ok);
            (Input::Put(v), r)
        } else if roll < 90 {
            let r = client
                .get(key.clone(), stale)
                .await
                .map(|v| Output::Value(v.map(|b| String::from_utf8_lossy(&b).into_owned())));
            (Input::Get, r)
        } else {
            let r = client.delete(key.clone()).await.map(Output::Existed);
            (Input::Delete, r)
        };
        let ret = rec.now();
        match result {
            Ok(out) => {
                counts.ok += 1;
                rec.record(id, &key, input, out, call, Some(ret));
            }
            Err(e) if e.outcome_unknown() && input != Input::Get => {
                // Like Jepsen's info: it may take effect at any time from now on, or never.
                counts.unknown += 1;
                rec.record(id, &key, input, Output::Unknown, call, None);
            }
            Err(_) => counts.failed += 1, // definitely not applied (or a read): no effect
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..8))).await;
    }
    counts
}

/// Injects faults until `until`; returns what it did.
async fn nemesis(
    cluster: Arc<tokio::sync::Mutex<Cluster>>,
    until: Instant,
    seed: u64,
    t0: Instant,
) -> Vec<String> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut log = Vec::new();
    let stamp = |t0: Instant| format!("{:6.2}s", t0.elapsed().as_secs_f64());
    loop {
        let wait = Duration::from_millis(rng.random_range(500..2000));
        if Instant::now() + wait + Duration::from_secs(4) >= until {
            break;
        }
        tokio::time::sleep(wait).await;
        let mut c = cluster.lock().await;
        let leader = c.leader().await;
        let pick_leader = rng.random_bool(0.5);
        let victim = match leader {
            Some(l) if pick_leader => l,
            _ => rng.random_range(1..=NODES),
        };
        if rng.random_bool(0.15) {
            // Not a fault: the leader is asked to hand over (to a random node, or 0: the most
            // caught up), while the clients go on.
            let target = rng.random_range(0..=NODES) as NodeId;
            let client = c.client();
            drop(c);
            let outcome =
                match tokio::time::timeout(Duration::from_secs(10), client.transfer_leader(target))
                    .await
                {
                    Ok(Ok((from, to, _))) => format!("node {from} -> node {to}"),
                    Ok(Err(e)) => format!("refused: {e}"),
                    Err(_) => "no answer within 10 s".to_string(),
                };
            log.push(format!(
                "{} leader transfer to {}: {outcome}",
                stamp(t0),
                if target == 0 {
                    "the most caught-up node".to_string()
                } else {
                    format!("node {target}")
                }
            ));
            continue;
        }
        if rng.random_bool(0.15) {
            // A machine replaced: its node removed from the membership (it stops by itself),
            // and a node with a new id started in its place that joins and is promoted.
            let slot = rng.random_range(1..=NODES);
            let old = c.ids[&slot];
            let client = raftkv::client::Client::discover_with(c.addrs(), c.dialer.clone()).await;
            drop(c);
            let removed = tokio::time::timeout(
                Duration::from_secs(10),
                client.change_membership(raftkv::proto::MembershipOp::Remove, old, ""),
            )
            .await;
            let outcome = match removed {
                Ok(Ok(_)) => {
                    let mut c = cluster.lock().await;
                    let stopped = c.reap(slot, Duration::from_secs(3));
                    let new = c.next_id;
                    c.next_id += 1;
                    c.ids.insert(slot, new);
                    c.start(slot);
                    format!(
                        "removed{}; node {new} joins in its place",
                        if stopped {
                            " (it stopped by itself)"
                        } else {
                            " (killed: it had not stopped)"
                        }
                    )
                }
                Ok(Err(e)) => format!("refused: {e}"),
                Err(_) => "no answer within 10 s".to_string(),
            };
            log.push(format!("{} replace node {old}: {outcome}", stamp(t0)));
            continue;
        }
        let has_net = c.net.is_some();
        let fault = rng.random_range(0..if has_net { 5 } else { 2 });
        let hold = Duration::from_millis(rng.random_range(600..3000));
        let what = match fault {
            0 => {
                c.kill9(victim);
                format!(
                    "kill -9 node {victim}{}",
                    if Some(victim) == leader {
                        " (leader)"
                    } else {
                        ""
                    }
                )
            }
            1 => {
                c.pause(victim);
                format!(
                    "SIGSTOP node {victim}{}",
                    if Some(victim) == leader {
                        " (leader)"
                    } else {
                        ""
                    }
                )
            }
            2 | 3 => {
                // Majority/minority split; the leader (if known) on the minority side half the time.
                let mut ids: Vec<usize> = (1..=NODES).collect();
                for i in (1..ids.len()).rev() {
                    let j = rng.random_range(0..=i);
                    ids.swap(i, j);
                }
                if let (Some(l), true) = (leader, pick_leader) {
                    let pos = ids.iter().position(|&x| x == l).unwrap_or(0);
                    ids.swap(0, pos);
                }
                let minority = rng.random_range(1..=NODES / 2);
                let (a, b) = ids.split_at(minority);
                let net = c.net.as_mut().expect("net");
                for &x in a {
                    for &y in b {
                        net.cut(x, y);
                        net.cut(y, x);
                    }
                }
                format!(
                    "partition {a:?} | {b:?}{}",
                    if leader.is_some_and(|l| a.contains(&l)) {
                        " (leader in minority)"
                    } else {
                        ""
                    }
                )
            }
            _ => {
                // One-way: the victim can hear everyone but nobody hears it (or the reverse).
                let outbound = rng.random_bool(0.5);
                let net = c.net.as_mut().expect("net");
                for other in (1..=NODES).filter(|&o| o != victim) {
                    if outbound {
                        net.cut(victim, other);
                    } else {
                        net.cut(other, victim);
                    }
                }
                format!(
                    "one-way cut: node {victim} {}{}",
                    if outbound {
                        "cannot send"
                    } else {
                        "cannot receive"
                    },
                    if Some(victim) == leader {
                        " (leader)"
                    } else {
                        ""
                    }
                )
            }
        };
        log.push(format!("{} {what} for {} ms", stamp(t0), hold.as_millis()));
        drop(c);
        tokio::time::sleep(hold).await;
        let mut c = cluster.lock().await;
        match fault {
            0 => c.start(victim),
            1 => c.resume_all(),
            _ => {
                if let Some(n) = c.net.as_mut() {
                    n.heal();
                }
            }
        }
    }
    log
}

fn save_history(ops: &[Op], seed: u64) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nemesis");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("history-{seed}.jsonl"));
    let text: String = ops
        .iter()
        .map(|o| serde_json::to_string(o).expect("json") + "\n")
        .collect();
    std::fs::write(&path, text).expect("write history");
    path
}

/// One nemesis run at a time: they share the machine's two cores and the namespaces' names.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_under_crashes_pauses_and_partitions() {
    let _one = ONE_AT_A_TIME.lock().await;
    run(false).await;
}

/// The same, with TLS everywhere: mutual TLS between the nodes (replacements get certificates
/// from the cluster CA), and clients that verify the nodes and present a certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_with_tls_everywhere() {
    let _one = ONE_AT_A_TIME.lock().await;
    run(true).await;
}

async fn run(tls: bool) {
    let secs: u64 = std::env::var("RAFTKV_NEMESIS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let seed: u64 = std::env::var("RAFTKV_NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_secs())
        });
    let stale = std::env::var("RAFTKV_NEMESIS_STALE_READS").is_ok_and(|v| v == "1");
    println!(
        "nemesis: seed={seed} ({secs}s, {CLIENTS} clients, {KEYS} keys, {NODES} nodes{}{}); replay with RAFTKV_NEMESIS_SEED={seed}",
        if stale { ", STALE reads" } else { "" },
        if tls { ", TLS" } else { "" }
    );

    let cluster = Cluster::new(tls);
    let partitions = cluster.net.is_some();
    // Wait for the first leader.
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.leader().await.is_none() {
        assert!(
            Instant::now() < deadline,
            "no leader within 20s of starting"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A short deadline, so that faults leave some writes with an unknown outcome.
    let base = cluster.client().with_timeout(Duration::from_secs(1));
    let cluster = Arc::new(tokio::sync::Mutex::new(cluster));
    let rec = Arc::new(Recorder {
        started: Instant::now(),
        ops: Mutex::new(Vec::new()),
    });
    let until = Instant::now() + Duration::from_secs(secs);

    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(client_loop(i, base.fork(), rec.clone(), until, stale, seed)))
        .collect();
    let faults = nemesis(cluster.clone(), until, seed, rec.started).await;
    let mut counts = Counts::default();
    for c in clients {
        let r = c.await.expect("client task");
        counts.ok += r.ok;
        counts.failed += r.failed;
        counts.unknown += r.unknown;
    }

    // Heal everything; the cluster must recover and converge.
    let mut c = cluster.lock().await;
    c.resume_all();
    if let Some(n) = c.net.as_mut() {
        n.heal();
    }
    for i in 1..=NODES {
        if !c.procs.contains_key(&i) {
            c.start(i);
        }
    }
    let recover_started = Instant::now();
    let mut final_client = c.client().with_timeout(Duration::from_secs(10));
    let mut final_reads = BTreeMap::new();
    for k in 0..KEYS {
        let key = format!("k{k}");
        let call = rec.now();
        let v = final_client
            .get(key.clone(), false)
            .await
            .expect("the healed cluster serves reads");
        let v = v.map(|b| String::from_utf8_lossy(&b).into_owned());
        rec.record(
            usize::MAX,
            &key,
            Input::Get,
            Output::Value(v.clone()),
            call,
            Some(rec.now()),
        );
        final_reads.insert(key, v);
    }
    // Every node converges to the same applied state.
    let converge_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reports = final_client.status_all(Duration::from_millis(500)).await;
        let st: Vec<_> = reports
            .iter()
            .filter_map(|r| r.result.as_ref().ok())
            .collect();
        let commit = st
            .iter()
            .filter(|s| s.role == "leader")
            .map(|s| s.commit_index)
            .max();
        if st.len() == NODES && commit.is_some_and(|c| st.iter().all(|s| s.applied_index >= c)) {
            break;
        }
        assert!(
            Instant::now() < converge_deadline,
            "nodes did not converge within 30s: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ids: Vec<NodeId> = c.ids.values().copied().collect();
    for id in ids {
        for (key, want) in &final_reads {
            let got = final_client
                .get_from(id, key.clone())
                .await
                .expect("stale read");
            let got = got.map(|b| String::from_utf8_lossy(&b).into_owned());
            assert_eq!(&got, want, "node {id} diverged on {key}");
        }
    }
    let recovered_in = recover_started.elapsed();
    let snapshots: Vec<String> = final_client
        .status_all(Duration::from_millis(500))
        .await
        .iter()
        .filter_map(|r| r.result.as_ref().ok())
        .map(|s| {
            format!(
                "node {}: log from {}, {} installed, {} sent",
                s.id, s.first_log_index, s.snapshots_installed, s.snapshots_sent
            )
        })
        .collect();
    drop(c);

    let ops = rec.ops.lock().expect("lock").clone();
    let check_started = Instant::now();
    let verdict = checker::check(&ops, 20_000_000);
    let check_time = check_started.elapsed();
    println!(
        "snapshots (since each node's last start): {}",
        snapshots.join("; ")
    );
    println!("faults injected ({}):", faults.len());
    for f in &faults {
        println!("  {f}");
    }
    if !partitions {
        println!("  (partitions skipped: network namespaces need root and iproute2)");
    }
    println!(
        "operations: {} ok, {} failed (not applied), {} indeterminate; recovered and converged in {:.1}s; checker: {} ops in {:.2}s",
        counts.ok,
        counts.failed,
        counts.unknown,
        recovered_in.as_secs_f64(),
        ops.len(),
        check_time.as_secs_f64()
    );
    assert!(
        counts.ok > 100,
        "too few operations succeeded ({counts:?}) to say anything"
    );
    match verdict {
        Verdict::Ok => println!("verdict: linearizable"),
        Verdict::Unknown(why) => {
            let path = save_history(&ops, seed);
            panic!(
                "checker gave up: {why}; history saved to {}",
                path.display()
            )
        }
        Verdict::Violation(v) => {
            let path = save_history(&ops, seed);
            let stuck: String = ops
                .iter()
                .filter(|o| v.stuck.contains(&o.id))
                .take(10)
                .map(|o| format!("\n  {}", serde_json::to_string(o).expect("json")))
                .collect();
            panic!(
                "NOT linearizable: key {:?}; {} operations linearized, then none of these fits (first 10):{stuck}\nhistory saved to {}\nreplay: RAFTKV_NEMESIS_SEED={seed}",
                v.key,
                v.linearized.len(),
                path.display()
            );
        }
    }
}
