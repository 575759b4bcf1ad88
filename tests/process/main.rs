//! End-to-end tests of the real `raftkv` binary: separate processes on free loopback ports,
//! state in temporary directories.

mod damage;
mod harness;
mod membership;
mod observability;
mod powerloss;
mod security;
mod shell;
mod snapshots;

use std::time::{Duration, Instant};

use harness::{TestCluster, run_cli};
use raftkv::proto::data_service_client::DataServiceClient;
use raftkv::transport::LEADER_ID_HEADER;

const ELECTION: Duration = Duration::from_secs(10);
const CATCH_UP: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_elect_one_leader_redirect_writes_and_serve_reads() {
    let c = TestCluster::started(5);
    let leader = c.wait_leader(ELECTION).await;
    let follower = c.follower_other_than(leader);

    // A write sent straight to a follower is refused with the leader's id...
    let addr = c.addrs()[&follower].clone();
    let mut raw = DataServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let err = raw
        .put(raftkv::proto::PutRequest {
            key: "color".into(),
            value: "blue".into(),
            id: None,
        })
        .await
        .expect_err("a follower does not accept writes");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let hint = err
        .metadata()
        .get(LEADER_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    assert_eq!(hint, Some(leader.to_string()));

    // ...which the client follows.
    let mut only_follower = raftkv::client::Client::new(c.addrs());
    let index = only_follower
        .put("color", "blue")
        .await
        .expect("redirected write");
    assert_eq!(only_follower.leader(), Some(leader));

    // The leader's linearizable read sees it at once; every node's stale read once applied.
    let mut client = c.client();
    assert_eq!(
        client.get("color", false).await.expect("read").as_deref(),
        Some(&b"blue"[..])
    );
    for id in c.ids() {
        c.wait_applied(id, index, CATCH_UP).await;
        let v = client.get_from(id, "color").await.expect("stale read");
        assert_eq!(v.as_deref(), Some(&b"blue"[..]), "node {id}");
    }
    assert!(!client.delete("missing").await.expect("delete"));
    assert!(client.delete("color").await.expect("delete"));
    assert_eq!(client.get("color", false).await.expect("read"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_acknowledged_write_and_it_catches_up() {
    let mut c = TestCluster::started(5);
    let old = c.wait_leader(ELECTION).await;
    let mut client = c.client();
    for i in 0..50 {
        client
            .put(format!("k{i}"), format!("v{i}"))
            .await
            .expect("write before the kill");
    }
    c.kill9(old);
    let new = c.wait_leader(ELECTION).await;
    assert_ne!(new, old);
    for i in 0..50 {
        let v = client
            .get(format!("k{i}"), false)
            .await
            .expect("read after failover");
        assert_eq!(
            v,
            Some(format!("v{i}").into()),
            "acknowledged write k{i} lost"
        );
    }
    let index = client
        .put("after", "failover")
        .await
        .expect("write to the new leader");
    c.start(old);
    c.wait_applied(old, index, CATCH_UP).await;
    assert_eq!(
        client
            .get_from(old, "after")
            .await
            .expect("stale read")
            .as_deref(),
        Some(&b"failover"[..])
    );
    assert_eq!(
        client
            .get_from(old, "k49")
            .await
            .expect("stale read")
            .as_deref(),
        Some(&b"v49"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_writes_fail_clearly_and_resume_when_it_returns() {
    let mut c = TestCluster::started(5);
    let leader = c.wait_leader(ELECTION).await;
    let mut client = c.client().with_timeout(Duration::from_secs(3));
    client.put("before", "1").await.expect("write with quorum");
    // Stop three nodes, the leader among them.
    let mut stopped = vec![leader];
    stopped.extend(c.ids().into_iter().filter(|&id| id != leader).take(2));
    for &id in &stopped {
        c.stop(id);
    }
    let started = Instant::now();
    let err = client
        .put("during", "x")
        .await
        .expect_err("no quorum, no write");
    let elapsed = started.elapsed();
    let msg = err.to_string();
    assert!(msg.contains("no quorum"), "{msg}");
    assert!(
        msg.contains("outcome is unknown") || msg.contains("was not applied"),
        "{msg}"
    );
    assert!(
        elapsed < Duration::from_secs(6),
        "failed only after {elapsed:?}"
    );
    // Nothing is applied meanwhile.
    let alive: Vec<_> = c
        .ids()
        .into_iter()
        .filter(|id| !stopped.contains(id))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for &id in &alive {
        assert_eq!(
            client.get_from(id, "during").await.expect("stale read"),
            None,
            "node {id}"
        );
    }
    let err = client
        .get("before", false)
        .await
        .expect_err("no linearizable read without quorum");
    assert!(err.to_string().contains("no quorum"), "{err}");
    for &id in &stopped {
        c.start(id);
    }
    c.wait_leader(ELECTION).await;
    let mut client = c.client();
    client
        .put("after", "2")
        .await
        .expect("write after the quorum returned");
    assert_eq!(
        client.get("before", false).await.expect("read").as_deref(),
        Some(&b"1"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_restart_recovers_every_write_from_disk_without_reapplying() {
    let mut c = TestCluster::started(5);
    c.wait_leader(ELECTION).await;
    let mut client = c.client();
    let mut last = 0;
    for i in 0..100 {
        last = client
            .put(format!("k{i}"), format!("v{i}"))
            .await
            .expect("write");
    }
    client.delete("k0").await.expect("delete");
    for id in c.ids() {
        c.wait_applied(id, last + 1, CATCH_UP).await;
    }
    let before = c.statuses().await;
    for id in c.ids() {
        assert_eq!(c.stop(id), Some(0), "node {id} stops cleanly on SIGTERM");
    }
    for id in c.ids() {
        c.start(id);
    }
    // Each node resumes from its durable applied index (nothing re-applied from scratch).
    let st = loop {
        let st = c.statuses().await;
        if st.len() == 5 {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for (id, s) in &st {
        assert!(
            s.applied_index >= before[id].applied_index,
            "node {id} recovered applied {} < {}",
            s.applied_index,
            before[id].applied_index
        );
        assert!(
            s.last_log_index >= before[id].last_log_index,
            "node {id} lost log entries"
        );
    }
    c.wait_leader(ELECTION).await;
    let mut client = c.client();
    assert_eq!(client.get("k0", false).await.expect("read"), None);
    for i in 1..100 {
        assert_eq!(
            client.get(format!("k{i}"), false).await.expect("read"),
            Some(format!("v{i}").into())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_stopped_during_2000_writes_catches_up() {
    let mut c = TestCluster::started(5);
    let leader = c.wait_leader(ELECTION).await;
    let victim = c.follower_other_than(leader);
    let client = c.client();
    let mut tasks = Vec::new();
    for t in 0..16 {
        let mut cl = client.fork();
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            for i in 0..125 {
                last = last.max(
                    cl.put(format!("t{t}-{i}"), format!("{i}"))
                        .await
                        .expect("write"),
                );
            }
            last
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.stop(victim);
    let mut last = 0;
    for t in tasks {
        last = last.max(t.await.expect("task"));
    }
    c.start(victim);
    c.wait_applied(victim, last, CATCH_UP).await;
    let reader = c.client();
    for t in [0, 7, 15] {
        assert_eq!(
            reader
                .get_from(victim, format!("t{t}-124"))
                .await
                .expect("read")
                .as_deref(),
            Some(&b"124"[..])
        );
    }
}

/// A stale read that carries the index of the client's last write waits until the node has
/// applied it, on every node: followers learn the commit index only with the next append or
/// heartbeat (up to 50 ms later), and without the wait they answered "not found".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_read_with_the_last_write_index_sees_that_write_on_every_node() {
    use raftkv::proto::GetRequest;
    use raftkv::proto::data_service_client::DataServiceClient;
    let c = TestCluster::started(3);
    c.wait_leader(ELECTION).await;
    let mut client = c.client();
    for round in 0..5 {
        let value = format!("v{round}");
        let index = client.put("k", value.clone()).await.expect("write");
        for (id, addr) in c.addrs() {
            let mut raw = DataServiceClient::connect(format!("http://{addr}"))
                .await
                .expect("connect");
            let r = raw
                .get(GetRequest {
                    key: "k".into(),
                    stale: true,
                    min_index: index,
                })
                .await
                .expect("stale read")
                .into_inner();
            assert!(r.found, "node {id} round {round}: not found");
            assert_eq!(r.value, value.as_bytes(), "node {id} round {round}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_reads_commands_from_stdin() {
    let c = TestCluster::started(3);
    c.wait_leader(ELECTION).await;
    let cfg = c.config.to_str().expect("utf-8 path");
    let (code, out, err) = run_cli(
        &["shell", "--config", cfg],
        "set color blue sky\nget color\nget --stale color\ndel color\nget color\nstatus\nleader\n",
        c.dir.path(),
    );
    assert_eq!(code, 0, "stderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[..5],
        ["OK", "blue sky", "blue sky", "deleted", "(not found)"],
        "{out}"
    );
    assert!(
        lines[5].starts_with("ID") && lines[5].contains("ROLE"),
        "{out}"
    );
    assert_eq!(
        out.matches(" leader ").count(),
        1,
        "one leader in the status table: {out}"
    );
    assert!(
        lines.last().is_some_and(|l| l.starts_with("node ")),
        "{out}"
    );

    let (code, _, err) = run_cli(
        &["shell", "--config", cfg],
        "frobnicate x\nset onlykey\n",
        c.dir.path(),
    );
    assert_eq!(code, 1);
    assert!(err.contains("unknown command \"frobnicate\""), "{err}");
    assert!(err.contains("usage: set KEY VALUE"), "{err}");
}

#[test]
fn shell_against_an_unreachable_cluster_names_the_nodes_tried() {
    let c = TestCluster::new(3);
    let cfg = c.config.to_str().expect("utf-8 path");
    let (code, _, err) = run_cli(
        &["shell", "--config", cfg, "--timeout", "1s"],
        "get x\n",
        c.dir.path(),
    );
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach the cluster"), "{err}");
    for p in &c.ports {
        assert!(err.contains(&format!("127.0.0.1:{p}")), "{err}");
    }
}

/// With no node running, the shell and bench say so as soon as every node has refused the
/// connection, not after their timeout (30 s here).
#[test]
fn with_no_node_running_shell_and_bench_fail_at_once() {
    let c = TestCluster::new(3);
    let cfg = c.config.to_str().expect("utf-8 path");
    for (args, stdin) in [
        (
            vec!["shell", "--config", cfg, "--timeout", "30s"],
            "get x\n",
        ),
        (
            vec!["bench", "--config", cfg, "--timeout", "30s", "--ops", "10"],
            "",
        ),
    ] {
        let started = Instant::now();
        let (code, _, err) = run_cli(&args, stdin, c.dir.path());
        let took = started.elapsed();
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("cannot reach the cluster"), "{err}");
        assert_eq!(err.matches("cannot reach").count(), 1, "said once: {err}");
        for p in &c.ports {
            assert!(err.contains(&format!("127.0.0.1:{p}")), "{err}");
        }
        // Well under the 30 s timeout (the bound is loose: a loaded machine is slow).
        assert!(took < Duration::from_secs(15), "{args:?} took {took:?}");
    }
}

/// A config file that does not exist is said once, with what to do.
#[test]
fn a_missing_config_file_is_said_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    for cmd in ["shell", "node", "bench", "cluster", "monitor"] {
        let mut args = vec![cmd, "--config", "nope.json"];
        if cmd == "node" {
            args.extend(["--id", "1"]);
        }
        let (code, _, err) = run_cli(&args, "", dir.path());
        assert_eq!(code, 1, "{cmd}: {err}");
        assert!(
            err.contains("config file nope.json not found"),
            "{cmd}: {err}"
        );
        assert!(
            !err.contains("os error"),
            "{cmd}: the cause said twice: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{cmd}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_keys_and_values_are_refused_with_the_limit() {
    let c = TestCluster::started(3);
    c.wait_leader(ELECTION).await;
    let mut client = c.client();
    let err = client
        .put("big", vec![b'x'; 65537])
        .await
        .expect_err("over max_value_bytes");
    assert!(
        err.to_string().contains("exceeds the limit of 65536 bytes"),
        "{err}"
    );
    let err = client
        .put(vec![b'k'; 4097], "v")
        .await
        .expect_err("over max_key_bytes");
    assert!(err.to_string().contains("limit of 4096 bytes"), "{err}");
    assert_eq!(
        client.get("big", false).await.expect("read"),
        None,
        "nothing half-written"
    );
    assert!(err.to_string().contains("nothing was written"), "{err}");
    // Over the gRPC message limit: refused before it is sent, naming the limit (a node would
    // close the connection, and the client would report an unknown outcome after its timeout).
    let started = Instant::now();
    let err = client
        .put("huge", vec![b'x'; 70 << 20])
        .await
        .expect_err("over the gRPC limit");
    assert!(
        err.to_string()
            .contains("exceeds the largest value a node accepts (8388608 bytes")
            && err.to_string().contains("nothing was written"),
        "{err}"
    );
    assert!(!err.outcome_unknown());
    assert!(started.elapsed() < Duration::from_secs(5));
    let err = client
        .put(vec![b'k'; 70 << 20], "v")
        .await
        .expect_err("a key over the gRPC limit");
    assert!(
        err.to_string().contains("gRPC message limit")
            && err.to_string().contains("nothing was written"),
        "{err}"
    );
    client
        .put("big", vec![b'x'; 65536])
        .await
        .expect("at the limit");
}

#[test]
fn bad_configs_and_arguments_fail_with_specific_errors() {
    let c = TestCluster::new(3);
    let dir = c.dir.path();
    let cfg = c.config.to_str().expect("utf-8 path");

    std::fs::write(
        dir.join("broken.json"),
        "{\n  \"nodes\": [\n    {\"id\": 1,, }\n]}",
    )
    .expect("write");
    let (code, _, err) = run_cli(&["node", "--id", "1", "--config", "broken.json"], "", dir);
    assert_eq!(code, 1);
    assert!(err.contains("line 3, column"), "{err}");

    let text = std::fs::read_to_string(&c.config).expect("read");
    let dup = text.replace(&c.ports[1].to_string(), &c.ports[0].to_string());
    std::fs::write(dir.join("dup.json"), dup).expect("write");
    let (code, _, err) = run_cli(&["node", "--id", "1", "--config", "dup.json"], "", dir);
    assert_eq!(code, 1);
    assert!(
        err.contains("nodes[1].port") && err.contains("duplicate"),
        "{err}"
    );

    let (code, _, err) = run_cli(&["node", "--id", "9", "--config", cfg], "", dir);
    assert_eq!(code, 1);
    assert!(err.contains("node id 9 is not in"), "{err}");

    let (code, _, err) = run_cli(&["cluster", "--config", cfg, "--nodes", "1,7"], "", dir);
    assert_eq!(code, 1);
    assert!(err.contains("node 7 is not in the config"), "{err}");

    // A port that is already taken is named.
    let squatter = std::net::TcpListener::bind(format!("127.0.0.1:{}", c.ports[0])).expect("bind");
    let (code, _, err) = run_cli(&["node", "--id", "1", "--config", cfg], "", dir);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("port {} is already in use", c.ports[0])),
        "{err}"
    );
    drop(squatter);

    // A data directory that belongs to another node is refused.
    let node2 = dir.join("data/node-2");
    std::fs::create_dir_all(dir.join("data")).expect("mkdir");
    drop(raftkv::storage::open(&node2, 3).ok());
    let (code, _, err) = run_cli(&["node", "--id", "2", "--config", cfg], "", dir);
    assert_eq!(code, 1);
    assert!(err.contains("belongs to node 3, not node 2"), "{err}");
}

/// Reads the supervisor's stdout line by line on a thread, so that tests can wait for a line.
struct Lines {
    rx: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    fn new(out: std::process::ChildStdout) -> Lines {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `needle`; returns it.
    fn wait_for(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with {needle:?} within {within:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }
}

fn pid_alive(pid: i32) -> bool {
    // Signal 0 checks existence; a zombie still counts, so also look at /proc state.
    if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
        return false;
    }
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

fn start_supervisor(
    c: &TestCluster,
    extra: &[&str],
) -> (std::process::Child, Lines, Vec<(u64, i32)>) {
    let mut child = std::process::Command::new(harness::BIN)
        .args(["cluster", "--config"])
        .arg(&c.config)
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn raftkv cluster");
    let mut lines = Lines::new(child.stdout.take().expect("stdout"));
    lines.wait_for("leader: node", Duration::from_secs(20));
    let pids = lines
        .seen
        .iter()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect::<Vec<(u64, i32)>>();
    assert_eq!(
        pids.len(),
        c.ports.len(),
        "a table row per node: {:?}",
        lines.seen
    );
    (child, lines, pids)
}

fn interrupt_and_check_all_stopped(mut sup: std::process::Child, lines: &mut Lines, pids: &[i32]) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sup.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    lines.wait_for("stopping", Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Ok(Some(st)) = sup.try_wait() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "supervisor did not exit after SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "supervisor exit {status:?}");
    for &pid in pids {
        assert!(!pid_alive(pid), "node pid {pid} still running after Ctrl-C");
    }
}

#[test]
fn cluster_restarts_a_killed_node_and_stops_all_on_ctrl_c() {
    let c = TestCluster::new(3);
    let (sup, mut lines, pids) = start_supervisor(&c, &[]);
    let (victim, victim_pid) = pids[1];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let exited = lines.wait_for(
        &format!("node {victim} (pid {victim_pid}) exited"),
        Duration::from_secs(5),
    );
    assert!(exited.contains("SIGKILL"), "{exited}");
    lines.wait_for(
        &format!("restarting node {victim} in"),
        Duration::from_secs(5),
    );
    let restarted = lines.wait_for(
        &format!("node {victim} restarted (pid"),
        Duration::from_secs(10),
    );
    let new_pid: i32 = restarted
        .rsplit("pid ")
        .next()
        .and_then(|s| s.trim_end_matches(')').parse().ok())
        .expect("new pid");
    assert!(pid_alive(new_pid));
    let mut all: Vec<i32> = pids.iter().map(|p| p.1).collect();
    all.push(new_pid);
    interrupt_and_check_all_stopped(sup, &mut lines, &all);
}

#[test]
fn cluster_without_auto_restart_leaves_a_killed_node_down() {
    let c = TestCluster::new(3);
    let (sup, mut lines, pids) = start_supervisor(&c, &["--no-auto-restart", "--nodes", "all"]);
    let (victim, victim_pid) = pids[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    lines.wait_for(
        &format!("not restarting node {victim} (--no-auto-restart)"),
        Duration::from_secs(5),
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !lines.seen.iter().any(|l| l.contains("restarted")),
        "{:?}",
        lines.seen
    );
    let all: Vec<i32> = pids.iter().map(|p| p.1).collect();
    interrupt_and_check_all_stopped(sup, &mut lines, &all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_once_and_json_report_the_cluster() {
    let mut c = TestCluster::started(3);
    let leader = c.wait_leader(ELECTION).await;
    c.client().put("m", "1").await.expect("write");
    let cfg = c.config.to_str().expect("utf-8 path").to_string();
    let dir = c.dir.path().to_path_buf();

    let (code, out, err) = run_cli(
        &["monitor", "--config", &cfg, "--once", "--interval", "200ms"],
        "",
        &dir,
    );
    assert_eq!(code, 0, "quorum is up: {err}");
    assert!(out.contains(&format!("leader: node {leader}")), "{out}");
    assert!(out.contains("3/3 voters up, quorum ok"), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.contains(" up ")).count(),
        3,
        "{out}"
    );

    let (code, out, _) = run_cli(
        &["monitor", "--config", &cfg, "--json", "--interval", "200ms"],
        "",
        &dir,
    );
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(v["leader"], leader);
    assert_eq!(v["quorum"], true);
    assert_eq!(v["nodes"].as_array().map(Vec::len), Some(3));

    // Two of three down: no quorum, exit code 1, the dead nodes reported with their error;
    // the one stopped by a signal also with what its log says.
    let others: Vec<_> = c.ids().into_iter().filter(|&id| id != leader).collect();
    c.kill9(others[0]);
    c.stop(others[1]);
    let (code, out, err) = run_cli(
        &["monitor", "--config", &cfg, "--json", "--interval", "200ms"],
        "",
        &dir,
    );
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("no quorum"), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(v["up"], 1);
    let down: Vec<_> = v["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| n["up"] == false)
        .collect();
    assert_eq!(down.len(), 2);
    assert!(
        down.iter()
            .all(|n| n["error"].as_str().is_some_and(|e| !e.is_empty()))
    );
    let error_of = |id: u64| {
        down.iter()
            .find(|n| n["id"] == id)
            .and_then(|n| n["error"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        error_of(others[1]).contains("stopped cleanly at"),
        "{}",
        error_of(others[1])
    );
    assert!(
        !error_of(others[0]).contains("stopped"),
        "{}",
        error_of(others[0])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_json_with_percentiles() {
    let c = TestCluster::started(3);
    c.wait_leader(ELECTION).await;
    let cfg = c.config.to_str().expect("utf-8 path").to_string();
    let (code, out, err) = run_cli(
        &[
            "bench",
            "--config",
            &cfg,
            "--clients",
            "4",
            "--ops",
            "300",
            "--keys",
            "50",
            "--workload",
            "mixed",
            "--warmup",
            "100ms",
            "--json",
        ],
        "",
        c.dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert!(v["ops"].as_u64().is_some_and(|n| n >= 300), "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    let p50 = v["p50_ms"].as_f64().expect("p50");
    let p99 = v["p99_ms"].as_f64().expect("p99");
    let max = v["max_ms"].as_f64().expect("max");
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= max, "{v}");
}

/// The raw `Pipeline` call: one batch mixing writes, reads and invalid requests is answered
/// request by request under the client's tags, errors as the unary calls give them; a follower
/// answers with the leader hint; the call ends once the client is done and all is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_answers_every_tagged_request_like_the_unary_calls() {
    use raftkv::proto::tagged_reply::Reply as Out;
    use raftkv::proto::tagged_request::Request as In;
    use raftkv::proto::{GetRequest, PutRequest, RequestBatch, RequestId, TaggedRequest};

    let c = TestCluster::started(3);
    let leader = c.wait_leader(ELECTION).await;
    let follower = c.follower_other_than(leader);
    let put = |tag, key: &str, value: Vec<u8>| TaggedRequest {
        tag,
        request: Some(In::Put(PutRequest {
            key: key.to_string().into(),
            value: value.into(),
            id: Some(RequestId {
                client_id: 77,
                seq: tag,
            }),
        })),
    };
    let get = |tag, key: &str| TaggedRequest {
        tag,
        request: Some(In::Get(GetRequest {
            key: key.to_string().into(),
            stale: false,
            min_index: 0,
        })),
    };
    let call = |id: u64, batches: Vec<RequestBatch>| {
        let addr = c.addrs()[&id].clone();
        async move {
            let mut raw = DataServiceClient::connect(format!("http://{addr}"))
                .await
                .expect("connect");
            let mut replies = raw
                .pipeline(tokio_stream::iter(batches))
                .await
                .expect("pipeline call")
                .into_inner();
            let mut got = std::collections::BTreeMap::new();
            // The node ends the call after the last answer, since our side is done.
            while let Some(batch) = tokio::time::timeout(Duration::from_secs(10), replies.message())
                .await
                .expect("answers within 10 s")
                .expect("a healthy stream")
            {
                for r in batch.replies {
                    assert!(got.insert(r.tag, r.reply).is_none(), "tag {} twice", r.tag);
                }
            }
            got
        }
    };

    let mut batch = vec![put(1, "a", b"1".to_vec()), put(2, "b", b"2".to_vec())];
    batch.push(put(3, "big", vec![b'x'; 65537]));
    batch.push(put(4, "", b"v".to_vec()));
    batch.push(TaggedRequest {
        tag: 5,
        request: None,
    });
    let got = call(
        leader,
        vec![
            RequestBatch { requests: batch },
            RequestBatch {
                requests: vec![get(6, "a"), get(7, "missing")],
            },
        ],
    )
    .await;
    assert_eq!(got.len(), 7, "{got:?}");
    let index = |tag| match &got[&tag] {
        Some(Out::Put(p)) => p.index,
        other => panic!("tag {tag}: {other:?}"),
    };
    assert!(index(1) > 0 && index(2) > index(1), "{got:?}");
    let error = |tag: u64| match &got[&tag] {
        Some(Out::Error(e)) => e.clone(),
        other => panic!("tag {tag}: {other:?}"),
    };
    assert_eq!(error(3).code, tonic::Code::InvalidArgument as i32);
    assert!(
        error(3).message.contains("limit of 65536 bytes"),
        "{:?}",
        error(3)
    );
    assert!(
        error(4).message.contains("must not be empty"),
        "{:?}",
        error(4)
    );
    assert_eq!(error(5).code, tonic::Code::InvalidArgument as i32);
    // The unary call refuses the oversized value with the same status.
    let addr = c.addrs()[&leader].clone();
    let mut unary = DataServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let status = unary
        .put(PutRequest {
            key: "big".into(),
            value: vec![b'x'; 65537].into(),
            id: None,
        })
        .await
        .expect_err("over the limit");
    assert_eq!(status.code() as i32, error(3).code);
    assert_eq!(status.message(), error(3).message);
    match &got[&6] {
        Some(Out::Get(g)) => assert!(g.found && g.value.as_ref() == b"1", "{g:?}"),
        other => panic!("tag 6: {other:?}"),
    }
    match &got[&7] {
        Some(Out::Get(g)) => assert!(!g.found, "{g:?}"),
        other => panic!("tag 7: {other:?}"),
    }

    // A retried write (same client id and seq) is acknowledged again; its entry changes
    // nothing, since the first one was applied.
    let again = call(
        leader,
        vec![RequestBatch {
            requests: vec![put(2, "b", b"2".to_vec())],
        }],
    )
    .await;
    match &again[&2] {
        Some(Out::Put(p)) => assert!(p.index > index(2), "{p:?}"),
        other => panic!("retry: {other:?}"),
    }

    // A follower refuses writes and linearizable reads, naming the leader.
    let got = call(
        follower,
        vec![RequestBatch {
            requests: vec![put(10, "c", b"3".to_vec()), get(11, "a")],
        }],
    )
    .await;
    for tag in [10, 11] {
        let e = match &got[&tag] {
            Some(Out::Error(e)) => e.clone(),
            other => panic!("tag {tag}: {other:?}"),
        };
        assert_eq!(e.code, tonic::Code::FailedPrecondition as i32, "{e:?}");
        assert_eq!(e.leader_id, leader, "{e:?}");
        assert_eq!(e.leader_addr, c.addrs()[&leader], "{e:?}");
    }
}

/// A leader that stops answering without closing its connections (SIGSTOP): the client's pings
/// find its connection dead, and the write goes through the new leader. Without them the write
/// would wait on the dead connection until the client's deadline and fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_goes_through_the_new_leader_while_the_old_one_is_paused() {
    use nix::sys::signal::Signal;
    let c = TestCluster::started(3);
    let leader = c.wait_leader(ELECTION).await;
    let mut client = c.client();
    client.put("k", "before").await.expect("write");
    assert_eq!(client.leader(), Some(leader));

    c.signal(leader, Signal::SIGSTOP);
    let during = client.put("k", "during").await;
    let new_leader = client.leader();
    c.signal(leader, Signal::SIGCONT);
    during.expect("the write goes through the new leader within the deadline");
    assert!(
        new_leader.is_some_and(|l| l != leader),
        "new leader {new_leader:?}, old {leader}"
    );
    assert_eq!(
        client.get("k", false).await.expect("read").as_deref(),
        Some(&b"during"[..])
    );
}

/// A follower that missed more data than one gRPC message may carry (64 MiB) catches up. The
/// leader's catch-up round goes out in batches under the limit (`split_by_encoded_len`); before
/// that, the oversized batch failed the stream and catch-up fell back to one append per
/// heartbeat, about 50% slower here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_catches_up_on_more_than_a_grpc_message_of_log() {
    let mut c = TestCluster::started(3);
    let leader = c.wait_leader(ELECTION).await;
    let victim = c.follower_other_than(leader);
    c.stop(victim);
    let client = c.client();
    let mut tasks = Vec::new();
    // 16 x 75 writes of 64 KiB: about 79 MiB the victim lacks.
    for t in 0..16 {
        let mut cl = client.fork();
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            for i in 0..75u32 {
                let value = vec![b'a' + (i % 26) as u8; 65536];
                last = last.max(cl.put(format!("t{t}-{i}"), value).await.expect("write"));
            }
            last
        }));
    }
    let mut last = 0;
    for t in tasks {
        last = last.max(t.await.expect("task"));
    }
    c.start(victim);
    c.wait_applied(victim, last, CATCH_UP).await;
    let v = client
        .get_from(victim, "t15-74")
        .await
        .expect("read")
        .expect("present");
    assert_eq!(v.len(), 65536);
    assert!(v.iter().all(|&b| b == b'a' + 74 % 26));
}

/// Many large values in flight at once (24 writes of 4 MiB, then 24 reads of them: 96 MiB each
/// way, more than one gRPC message may carry) go through the pipelined client: requests and
/// answers travel in several batches, each under the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_large_values_at_once_travel_in_batches_under_the_grpc_limit() {
    let mut c = TestCluster::with_config(3, r#""max_value_bytes": 4194304"#);
    for id in c.ids() {
        c.start(id);
    }
    c.wait_leader(ELECTION).await;
    let client = c.client();
    let value = |i: u8| vec![b'a' + i; 4 << 20];
    let mut writes = Vec::new();
    for i in 0..24u8 {
        let mut cl = client.fork();
        writes.push(tokio::spawn(async move {
            cl.put(format!("big{i}"), value(i)).await
        }));
    }
    for w in writes {
        w.await.expect("task").expect("large write");
    }
    let mut reads = Vec::new();
    for i in 0..24u8 {
        let mut cl = client.fork();
        reads.push(tokio::spawn(async move {
            (i, cl.get(format!("big{i}"), false).await)
        }));
    }
    for r in reads {
        let (i, v) = r.await.expect("task");
        let v = v.expect("large read").expect("present");
        assert!(
            v.len() == 4 << 20 && v.iter().all(|&b| b == b'a' + i),
            "big{i}"
        );
    }
}

/// `raftkv leader transfer ID`, without an ID, to a node not in the configuration, and from the
/// shell; writes go on at the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_is_transferred_on_request() {
    let c = TestCluster::started(3);
    let leader = c.wait_leader(ELECTION).await;
    c.client().put("before", "1").await.expect("write");
    let cfg = c.config.to_str().expect("utf-8 path").to_string();
    let dir = c.dir.path().to_path_buf();
    let target = c.follower_other_than(leader);

    let (code, out, err) = run_cli(
        &["leader", "transfer", &target.to_string(), "--config", &cfg],
        "",
        &dir,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "leadership moved from node {leader} to node {target}"
        )),
        "{out}"
    );
    assert_eq!(c.wait_leader(ELECTION).await, target);
    c.client()
        .put("after", "2")
        .await
        .expect("a write at the new leader");

    // Without an ID: to another node.
    let (code, out, err) = run_cli(&["leader", "transfer", "--config", &cfg], "", &dir);
    assert_eq!(code, 0, "{out}{err}");
    let now = c.wait_leader(ELECTION).await;
    assert_ne!(now, target, "{out}");

    let (code, _, err) = run_cli(&["leader", "transfer", "9", "--config", &cfg], "", &dir);
    assert_ne!(code, 0);
    assert!(err.contains("node 9 is not a member"), "{err}");

    // The shell has the same command.
    let back = c.follower_other_than(now);
    let (code, out, err) = run_cli(
        &["shell", "--config", &cfg],
        &format!("leader transfer {back}\nget after\n"),
        &dir,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("to node {back}")), "{out}");
    assert!(out.contains('2'), "the write survived the transfers: {out}");
    assert_eq!(c.wait_leader(ELECTION).await, back);
}

// #12: a command whose output goes into a pipe that closes early (`| head`) neither panics nor
// fails: what nobody reads is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_survive_a_closed_pipe() {
    let c = TestCluster::started(3);
    c.wait_leader(ELECTION).await;
    let cfg = c.config.to_str().expect("utf-8 path");
    let bin = harness::BIN;
    for cmd in [
        format!("{bin} monitor --json --config {cfg} | head -c 20"),
        format!("{bin} monitor --once --config {cfg} | head -1"),
        format!("{bin} bench --config {cfg} --ops 500 --clients 4 | head -1"),
        format!("{bin} member list --config {cfg} | head -1"),
    ] {
        let out = std::process::Command::new("bash")
            .args(["-c", &format!("set -o pipefail; {cmd}")])
            .current_dir(c.dir.path())
            .output()
            .expect("bash");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{cmd}: {:?} {err}", out.status);
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{cmd}: {err}"
        );
    }
}

// #12: bench arguments without a meaning are refused with what to give instead, before anything
// is sent; the shell's flags are whole words.
#[test]
fn bench_and_shell_arguments_are_checked() {
    let c = TestCluster::new(3);
    let cfg = c.config.to_str().expect("utf-8 path");
    for (args, want) in [
        (vec!["--ops", "0"], "--ops must be at least 1"),
        (vec!["--conns", "0"], "--conns must be at least 1"),
        (vec!["--timeout", "0s"], "--timeout must be longer than 0s"),
        (
            vec!["--duration", "0s"],
            "--duration must be longer than 0s",
        ),
        (vec!["--clients", "-3"], "unexpected argument '-3'"),
    ] {
        let mut all = vec!["bench", "--config", cfg];
        all.extend(&args);
        let (code, _, err) = run_cli(&all, "", c.dir.path());
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let (code, out, err) = run_cli(
        &["shell", "--config", cfg],
        "get --staleUpper\n",
        c.dir.path(),
    );
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("unknown flag \"--staleUpper\""), "{err}");
}

// #12: the shell in script mode runs each line as it arrives (stdin still open), and a line
// that is not UTF-8 fails alone, with its number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_scripts_run_line_by_line() {
    use std::io::{BufRead, Write};
    let c = TestCluster::started(3);
    c.wait_leader(ELECTION).await;
    let mut child = std::process::Command::new(harness::BIN)
        .args(["shell", "--config"])
        .arg(&c.config)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn shell");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"set k first\nget k\n").expect("write");
    stdin.flush().expect("flush");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    // The answer comes while the shell's input is still open.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l == "first") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("no answer before end of input: {seen:?}"),
        }
    }
    stdin.write_all(b"\xff\xfe\nget k\n").expect("write");
    drop(stdin);
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "one line failed: {err}");
    assert!(err.contains("line 3 is not UTF-8"), "{err}");
    let second = rx.recv_timeout(Duration::from_secs(5));
    assert_eq!(second.as_deref(), Ok("first"), "the line after it ran");
}
