//! Snapshots and log compaction with real processes: small thresholds, so that a follower that
//! misses a few thousand writes needs a snapshot.

use std::time::{Duration, Instant};

use raftkv::client::Client;
use raftkv::raft::NodeId;

use crate::harness::TestCluster;
use crate::{CATCH_UP, ELECTION};

/// Compaction after 5,000 entries or 32 MiB, keeping 1,000 or 8 MiB (and so a 64 MiB journal).
pub(crate) const SMALL_SNAPSHOTS: &str = r#""max_value_bytes": 65536, "snapshot": {"log_entries_max": 5000, "keep_entries": 1000, "log_bytes_max": 33554432, "keep_bytes": 8388608}"#;

/// `n` writes from 32 concurrent clients over `keys` keys, value `v<i>` (`width` bytes at
/// least); returns the highest index acknowledged.
pub(crate) async fn write_many(client: &Client, n: usize, keys: usize, width: usize) -> u64 {
    let mut tasks = Vec::new();
    let per = n / 32;
    for t in 0..32 {
        let mut cl = client.fork();
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            for i in 0..per {
                let k = (t * per + i) % keys;
                let v = format!("{:<width$}", format!("v{}", t * per + i));
                last = last.max(cl.put(format!("key{k}"), v).await.expect("write"));
            }
            last
        }));
    }
    let mut last = 0;
    for t in tasks {
        last = last.max(t.await.expect("task"));
    }
    last
}

/// Bytes of every file under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            total += if md.is_dir() {
                dir_bytes(&e.path())
            } else {
                md.len()
            };
        }
    }
    total
}

async fn assert_same_values(c: &TestCluster, a: NodeId, b: NodeId, keys: usize) {
    let client = c.client();
    for k in (0..keys).step_by(97) {
        let key = format!("key{k}");
        let va = client.get_from(a, key.clone()).await.expect("read");
        let vb = client.get_from(b, key.clone()).await.expect("read");
        assert_eq!(va, vb, "{key} differs between nodes {a} and {b}");
        assert!(va.is_some(), "{key} is missing");
    }
}

/// A follower down for 100,000 writes catches up by snapshot (its status says it installed
/// one), without a leader change, and has every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_down_for_100k_writes_catches_up_by_snapshot_without_an_election() {
    let mut c = TestCluster::started_with(3, SMALL_SNAPSHOTS);
    let leader = c.wait_leader(ELECTION).await;
    let victim = c.follower_other_than(leader);
    c.stop(victim);
    let last = write_many(&c.client(), 100_000, 5000, 16).await;
    let before = c.statuses().await;
    let leader_status = &before[&leader];
    assert!(
        leader_status.snapshot_index > 0 && leader_status.first_log_index > 90_000,
        "the leader compacted its log: {leader_status:?}"
    );
    c.start(victim);
    c.wait_applied(victim, last, CATCH_UP).await;
    let after = c.statuses().await;
    let v = &after[&victim];
    assert!(v.snapshots_installed >= 1, "caught up by snapshot: {v:?}");
    assert!(v.snapshot_index > 0 && v.first_log_index == v.snapshot_index + 1);
    assert!(after[&leader].snapshots_sent >= 1);
    assert_eq!(
        (after[&leader].role.as_str(), after[&leader].term),
        ("leader", leader_status.term),
        "no election while the follower caught up"
    );
    assert_same_values(&c, leader, victim, 5000).await;
    // Replication goes on from the log after the snapshot.
    let mut cl = c.client();
    let index = cl.put("after", "snapshot").await.expect("write");
    c.wait_applied(victim, index, CATCH_UP).await;
    assert_eq!(
        cl.get_from(victim, "after").await.expect("read").as_deref(),
        Some(&b"snapshot"[..])
    );
}

/// kill -9 of a follower while a snapshot is being streamed to it: after its restart it
/// recovers (a staged snapshot is dropped at start; a new transfer follows) and has every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_killed_during_a_snapshot_install_recovers() {
    let mut c = TestCluster::started_with(3, SMALL_SNAPSHOTS);
    let leader = c.wait_leader(ELECTION).await;
    let victim = c.follower_other_than(leader);
    c.stop(victim);
    // About 40 MiB of state: the transfer takes a while.
    let last = write_many(&c.client(), 20_000, 20_000, 2048).await;
    c.start(victim);
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let st = c.statuses().await;
        if st.get(&leader).is_some_and(|s| s.snapshots_sent >= 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no snapshot transfer started: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.kill9(victim);
    c.start(victim);
    c.wait_applied(victim, last, CATCH_UP).await;
    let st = c.statuses().await;
    assert!(st[&victim].snapshots_installed >= 1, "{:?}", st[&victim]);
    assert_same_values(&c, leader, victim, 20_000).await;
}

/// A follower whose data directory was wiped comes back empty: it rejects the heartbeats at its
/// old match index, and the leader catches it up by snapshot instead of probing that index
/// forever (both busy at about 40% CPU before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_follower_catches_up_by_snapshot() {
    let mut c = TestCluster::started_with(3, SMALL_SNAPSHOTS);
    let leader = c.wait_leader(ELECTION).await;
    let victim = c.follower_other_than(leader);
    let last = write_many(&c.client(), 10_000, 1000, 16).await;
    c.wait_applied(victim, last, CATCH_UP).await;
    c.kill9(victim);
    std::fs::remove_dir_all(c.dir.path().join(format!("data/node-{victim}"))).expect("wipe");
    c.start(victim);
    c.wait_applied(victim, last, CATCH_UP).await;
    let st = c.statuses().await;
    assert!(st[&victim].snapshots_installed >= 1, "{:?}", st[&victim]);
    assert_same_values(&c, leader, victim, 1000).await;
}

/// With small thresholds the data directory stays bounded while far more log than that is
/// written: compaction really frees disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_directory_stays_bounded_while_the_log_is_compacted() {
    let c = TestCluster::started_with(3, SMALL_SNAPSHOTS);
    c.wait_leader(ELECTION).await;
    let client = c.client();
    // 300,000 writes of 1 KiB over 1,000 keys: about 300 MiB of log per node.
    let mut peak = 0;
    for _ in 0..6 {
        write_many(&client, 50_000, 1000, 1024).await;
        for id in c.ids() {
            peak = peak.max(dir_bytes(&c.dir.path().join(format!("data/node-{id}"))));
        }
    }
    let st = c.statuses().await;
    for s in st.values() {
        assert!(s.last_log_index > 299_000, "{s:?}");
        assert!(
            s.last_log_index - s.snapshot_index <= 5000 + 2000,
            "the log is compacted: {s:?}"
        );
    }
    assert!(
        peak < 200 << 20,
        "a node's data directory reached {} MiB for 300 MiB of log",
        peak >> 20
    );
    println!("peak data directory: {} MiB", peak >> 20);
}

/// Waits until every running node of `c` knows its cluster id; returns it.
async fn wait_cluster_id(c: &TestCluster) -> u64 {
    let deadline = Instant::now() + ELECTION;
    loop {
        let st = c.statuses().await;
        let ids: Vec<u64> = st.values().map(|s| s.cluster_id).collect();
        if ids.len() == c.procs.len() && ids.iter().all(|&i| i != 0 && i == ids[0]) {
            return ids[0];
        }
        assert!(Instant::now() < deadline, "no common cluster id: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Node 3's data directory replaced by node 3's directory of another cluster: with the rest
/// of its cluster up, the node refuses to start and names both clusters; with the rest down it
/// starts, but its messages are ignored: it cannot win an election, and the other cluster's
/// keys never appear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_of_another_cluster_is_refused() {
    let (mut a, mut b) = (TestCluster::new(3), TestCluster::new(3));
    for id in 1..=3 {
        a.start(id);
        b.start(id);
    }
    a.wait_leader(ELECTION).await;
    b.wait_leader(ELECTION).await;
    a.client().put("a", "A").await.expect("write");
    let index = b.client().put("b", "B").await.expect("write");
    b.wait_applied(3, index, CATCH_UP).await;
    let (a_id, b_id) = (wait_cluster_id(&a).await, wait_cluster_id(&b).await);
    assert_ne!(a_id, b_id, "two clusters, two ids");
    a.kill9(3);
    b.stop(3);
    let a3 = a.dir.path().join("data/node-3");
    std::fs::remove_dir_all(&a3).expect("remove");
    std::fs::rename(b.dir.path().join("data/node-3"), &a3).expect("move");
    let mut node = std::process::Command::new(crate::harness::BIN)
        .args(["node", "--id", "3", "--quiet", "--config"])
        .arg(&a.config)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = node.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = node.kill();
            panic!("the node started on another cluster's data directory");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut node.stderr.take().expect("stderr"), &mut err)
        .expect("read");
    assert!(!status.success());
    assert!(
        err.contains(&format!("belongs to cluster {b_id:016x}"))
            && err.contains(&format!("belong to cluster {a_id:016x}")),
        "{err}"
    );
    // With the rest of its cluster down, it starts, but cannot join.
    a.stop(1);
    a.stop(2);
    a.start(3);
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.start(1);
    a.start(2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let st = a.statuses().await;
    assert_eq!(st[&3].cluster_id, b_id);
    assert_ne!(st[&3].role, "leader");
    let leader = st
        .values()
        .find(|s| s.role == "leader")
        .map(|s| s.id)
        .expect("nodes 1 and 2 elect a leader");
    assert!(leader == 1 || leader == 2);
    let mut cl = a.client();
    assert_eq!(
        cl.get("a", false).await.expect("read").as_deref(),
        Some(&b"A"[..])
    );
    assert_eq!(
        cl.get("b", false).await.expect("read"),
        None,
        "the other cluster's key"
    );
}

/// Backup and restore: `snapshot save` from a running cluster, `snapshot status` of the file,
/// `snapshot restore` into the empty directories of a fresh 3-node cluster, which then has
/// every key under a new cluster id. A damaged or truncated file is refused, and nothing is
/// written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_and_restore_into_a_fresh_cluster() {
    use crate::harness::run_cli;
    let a = TestCluster::started_with(3, SMALL_SNAPSHOTS);
    a.wait_leader(ELECTION).await;
    write_many(&a.client(), 8000, 2000, 16).await;
    let mut cl = a.client();
    cl.delete("key7").await.expect("delete");
    let a_id = wait_cluster_id(&a).await;
    let dir = a.dir.path();
    let cfg = a.config.to_string_lossy().into_owned();
    let (code, out, err) = run_cli(
        &["snapshot", "save", "backup.snap", "--config", &cfg],
        "",
        dir,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("saved backup.snap"), "{out}");
    let (code, out, err) = run_cli(&["snapshot", "status", "backup.snap"], "", dir);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("keys:     1999"), "{out}");
    assert!(out.contains(&format!("cluster:  {a_id:016x}")), "{out}");

    // Damaged copies are refused before anything is written.
    let good = std::fs::read(dir.join("backup.snap")).expect("read");
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    std::fs::write(dir.join("flipped.snap"), &flipped).expect("write");
    std::fs::write(dir.join("short.snap"), &good[..good.len() - 100]).expect("write");
    let b = TestCluster::new(3);
    let b_cfg = b.config.to_string_lossy().into_owned();
    for bad in ["flipped.snap", "short.snap"] {
        let (code, out, err) = run_cli(&["snapshot", "status", bad], "", dir);
        assert_ne!(code, 0, "{out}");
        assert!(
            err.contains("is not a usable raftkv snapshot"),
            "{bad}: {err}"
        );
        let (code, _, err) = run_cli(&["snapshot", "restore", bad, "--config", &b_cfg], "", dir);
        assert_ne!(code, 0);
        assert!(
            err.contains("is not a usable raftkv snapshot"),
            "{bad}: {err}"
        );
        assert!(
            !b.dir.path().join("data").join("node-1").exists(),
            "nothing written"
        );
    }

    let (code, out, err) = run_cli(
        &["snapshot", "restore", "backup.snap", "--config", &b_cfg],
        "",
        dir,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("into 3 data directories"), "{out}");
    // A second restore over them is refused.
    let (code, _, err) = run_cli(
        &["snapshot", "restore", "backup.snap", "--config", &b_cfg],
        "",
        dir,
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("already exists") && err.contains("Nothing was written"),
        "{err}"
    );
    let mut b = b;
    for id in b.ids() {
        b.start(id);
    }
    b.wait_leader(ELECTION).await;
    let b_id = wait_cluster_id(&b).await;
    assert_ne!(a_id, b_id, "a restored cluster has a new id");
    let mut bc = b.client();
    let mut ac = a.client();
    for k in (0..2000).step_by(13) {
        let key = format!("key{k}");
        assert_eq!(
            bc.get(key.clone(), false).await.expect("read"),
            ac.get(key.clone(), false).await.expect("read"),
            "{key}"
        );
    }
    assert_eq!(bc.get("key7", false).await.expect("read"), None);
    bc.put("new", "cluster")
        .await
        .expect("the restored cluster takes writes");
}
