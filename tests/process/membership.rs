//! Membership changes with real processes (issue #11): replacing a dead machine, growing and
//! shrinking, removing the leader, and moving the leader under write load.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use raftkv::client::Client;
use raftkv::raft::NodeId;

use crate::harness::{TestCluster, run_cli};
use crate::snapshots::{SMALL_SNAPSHOTS, write_many};
use crate::{CATCH_UP, ELECTION};

/// Voters and learners as the leader reports them.
async fn members(c: &TestCluster) -> (Vec<NodeId>, Vec<NodeId>) {
    let st = c.statuses().await;
    let Some(l) = st.values().find(|s| s.role == "leader") else {
        return (Vec::new(), Vec::new());
    };
    let ids = |voter: bool| {
        l.members
            .iter()
            .filter(|m| m.voter == voter)
            .map(|m| m.id)
            .collect()
    };
    (ids(true), ids(false))
}

async fn wait_members(c: &TestCluster, voters: &[NodeId], learners: &[NodeId], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (v, l) = members(c).await;
        if v == voters && l == learners {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "members never became voters {voters:?}, learners {learners:?}: now {v:?}, {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn cli(c: &TestCluster, args: &[&str]) -> (i32, String, String) {
    let cfg = c.config.to_str().expect("utf-8 path").to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--config", &cfg]);
    run_cli(&all, "", c.dir.path())
}

// Kill -9 node 5 for good, remove it, add node 6 on a new port: it catches up by snapshot (the
// log is compacted), is promoted, and the cluster then survives two more failures. The client
// uses config.json, which lists only nodes 1-5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_machine_is_replaced_by_a_new_node() {
    let mut c = TestCluster::started_with(5, SMALL_SNAPSHOTS);
    c.wait_leader(ELECTION).await;
    let client = c.client();
    write_many(&client, 12_000, 3000, 16).await;
    c.kill9(5);
    let (code, out, err) = cli(&c, &["member", "remove", "5"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("node 5 removed"), "{out}");
    c.join(6, true);
    wait_members(&c, &[1, 2, 3, 4, 6], &[], CATCH_UP).await;
    let st = c.statuses().await;
    let six = &st[&6];
    assert!(
        six.snapshots_installed >= 1,
        "node 6 caught up by snapshot: {six:?}"
    );
    let (code, out, err) = cli(&c, &["member", "list"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("6 ") && l.contains("voter")),
        "{out}"
    );
    assert!(!out.lines().any(|l| l.starts_with("5 ")), "{out}");
    // Two more failures, the leader among them: 3 of the 5 voters remain, node 6 one of them.
    let leader = c.wait_leader(ELECTION).await;
    let other = [1, 2, 3, 4]
        .into_iter()
        .find(|&id| id != leader)
        .expect("another");
    c.kill9(leader);
    c.kill9(other);
    c.wait_leader(ELECTION).await;
    let mut cl = Client::discover(c.addrs()).await;
    cl.put("after", "replaced")
        .await
        .expect("a write after the replacement");
    assert_eq!(
        cl.get("key7", false).await.expect("read").map(|v| v.len()),
        Some(16),
        "old writes are there"
    );
    // The shell, started from config.json (nodes 1-5 only), finds the members too.
    let cfg = c.config.to_str().expect("utf-8").to_string();
    let (code, out, err) = run_cli(&["shell", "--config", &cfg], "get after\n", c.dir.path());
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("replaced"), "{out}");
}

// Grow 3 -> 5 (one with `member add`, one that asks by itself with --voter), then shrink
// back to 3: the removed nodes stop by themselves, and their ids are never reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_grows_from_three_to_five_and_shrinks_back() {
    let mut c = TestCluster::started(3);
    c.wait_leader(ELECTION).await;
    let mut client = c.client();
    client.put("k", "v").await.expect("write");
    let addr4 = c.join(4, false);
    let (code, out, err) = cli(&c, &["member", "add", "4", &addr4]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("node 4 promoted to voter"), "{out}");
    c.join(5, true);
    wait_members(&c, &[1, 2, 3, 4, 5], &[], CATCH_UP).await;
    c.wait_leader(ELECTION).await;
    // Five voters: two may fail.
    c.kill9(1);
    c.kill9(2);
    let mut cl = Client::discover(c.addrs()).await;
    cl.put("five", "5").await.expect("a write with 3 of 5");
    c.start(1);
    c.start(2);
    c.wait_leader(ELECTION).await;
    for id in [4, 5] {
        let (code, out, err) = cli(&c, &["member", "remove", &id.to_string()]);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(c.wait_exit(id, ELECTION), 0, "a removed node stops cleanly");
    }
    wait_members(&c, &[1, 2, 3], &[], ELECTION).await;
    let (code, out, err) = cli(&c, &["member", "add", "4", &addr4, "--learner"]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("never reused"), "{err}");
    c.wait_leader(ELECTION).await;
    assert_eq!(
        c.client().get("five", false).await.expect("read"),
        Some("5".into())
    );
}

// The leader removes itself: it commits its removal, hands over and stops; writes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_can_be_removed() {
    let mut c = TestCluster::started(3);
    let leader = c.wait_leader(ELECTION).await;
    c.client().put("before", "1").await.expect("write");
    let (code, out, err) = cli(&c, &["member", "remove", &leader.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(c.wait_exit(leader, ELECTION), 0);
    let now = c.wait_leader(ELECTION).await;
    assert_ne!(now, leader);
    let rest: Vec<NodeId> = c.ids().into_iter().filter(|&i| i != leader).collect();
    wait_members(&c, &rest, &[], ELECTION).await;
    let mut cl = c.client();
    cl.put("after", "2")
        .await
        .expect("a write without the old leader");
    assert_eq!(
        cl.get("before", false).await.expect("read"),
        Some("1".into())
    );
    // Restarted, the removed node refuses to run and says why.
    let (code, err) = c
        .start_expecting_exit(leader, &[], ELECTION)
        .expect("a removed node refuses to start");
    assert_ne!(code, 0);
    assert!(err.contains("was removed from the cluster"), "{err}");
}

// Leadership moves five times while 8 clients write: every acknowledged write is there after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_moves_under_write_load_without_losing_an_acknowledged_write() {
    let c = TestCluster::started(3);
    c.wait_leader(ELECTION).await;
    let client = c.client();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8 {
        let mut cl = client.fork();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let (mut acked, mut failed) = (Vec::new(), 0u64);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("w{w}-{i}");
                match cl.put(key.clone(), "x").await {
                    Ok(_) => acked.push(key),
                    Err(_) => failed += 1,
                }
                i += 1;
            }
            (acked, failed)
        }));
    }
    let mut moved = BTreeSet::new();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (from, to, _) = client.transfer_leader(0).await.expect("transfer");
        assert_ne!(from, to);
        moved.insert(to);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    let mut failed = 0;
    for w in writers {
        let (a, f) = w.await.expect("writer");
        acked.extend(a);
        failed += f;
    }
    assert!(acked.len() > 100, "writes went on: {}", acked.len());
    let mut cl = c.client();
    for key in &acked {
        assert_eq!(
            cl.get(key.clone(), false).await.expect("read"),
            Some("x".into()),
            "acknowledged write {key} is there"
        );
    }
    eprintln!(
        "{} writes acknowledged, {failed} failed (retried by the client within its timeout), leaders {moved:?}",
        acked.len()
    );
}

// A node that was down while a member was added, and has never applied a membership change,
// restarts knowing only config.json's nodes; the leader is the new member. It learns where
// the new member is from the others and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_missed_a_change_finds_a_leader_it_did_not_know() {
    let mut c = TestCluster::started(3);
    c.wait_leader(ELECTION).await;
    c.stop(3);
    c.join(4, true);
    wait_members(&c, &[1, 2, 3, 4], &[], CATCH_UP).await;
    let client = c.client();
    let (_, to, _) = client.transfer_leader(4).await.expect("transfer to 4");
    assert_eq!(to, 4);
    let mut cl = Client::discover(c.addrs()).await;
    let index = cl.put("while-3-was-down", "x").await.expect("write");
    c.start(3);
    c.wait_applied(3, index, CATCH_UP).await;
    let st = c.statuses().await;
    assert!(
        st[&3].members.iter().any(|m| m.id == 4),
        "node 3 now knows node 4: {:?}",
        st[&3].members
    );
}

// A removed node that missed its removal (paused meanwhile, and the leaders that could have
// told it restarted) learns it from the leader it asks, and stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_that_missed_its_removal_stops_once_it_asks() {
    use nix::sys::signal::Signal;
    let mut c = TestCluster::started(3);
    let leader = c.wait_leader(ELECTION).await;
    let victim = c.follower_other_than(leader);
    c.signal(victim, Signal::SIGSTOP);
    // Its removal commits on the other two (it has not answered for an election timeout).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (code, out, err) = cli(&c, &["member", "remove", &victim.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    for id in c.ids().into_iter().filter(|&id| id != victim) {
        c.kill9(id);
        c.start(id);
    }
    c.signal(victim, Signal::SIGCONT);
    assert_eq!(c.wait_exit(victim, CATCH_UP), 0, "it stopped cleanly");
    let log = std::fs::read_to_string(c.dir.path().join(format!("logs/node-{victim}.log")))
        .expect("the node's log");
    assert!(
        log.contains("the leader reports this node removed"),
        "it learned from the leader it asked: {log}"
    );
    c.wait_leader(ELECTION).await;
    c.client().put("after", "1").await.expect("write");
}
