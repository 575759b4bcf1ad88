//! Runs real `raftkv` processes on free loopback ports in a temporary directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use raftkv::client::Client;
use raftkv::proto::StatusResponse;
use raftkv::raft::NodeId;

#[path = "../common/cluster_config.rs"]
mod cluster_config;
pub use cluster_config::{add_http_ports, spawn_node};

pub const BIN: &str = env!("CARGO_BIN_EXE_raftkv");

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub ports: Vec<u16>,
    pub procs: BTreeMap<NodeId, Child>,
    /// Nodes started with --join (not in config.json): their ports.
    pub joined: BTreeMap<NodeId, u16>,
    /// How the test's own client connects (TLS and credentials for a secure cluster).
    pub dialer: raftkv::security::Dialer,
}

impl TestCluster {
    /// Writes a config for `n` nodes (values up to 64 KiB); starts none.
    pub fn new(n: usize) -> TestCluster {
        TestCluster::with_config(n, r#""max_value_bytes": 65536"#)
    }

    /// Writes a config for `n` nodes with `extra` config fields; starts none.
    pub fn with_config(n: usize, extra: &str) -> TestCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let hosts = cluster_config::free_loopback(n);
        let ports = hosts.iter().map(|h| h.1).collect();
        let config = cluster_config::write(dir.path(), &hosts, extra);
        TestCluster {
            dir,
            config,
            ports,
            procs: BTreeMap::new(),
            joined: BTreeMap::new(),
            dialer: raftkv::security::Dialer::plaintext(),
        }
    }

    pub fn started(n: usize) -> TestCluster {
        TestCluster::started_with(n, r#""max_value_bytes": 65536"#)
    }

    /// A config for `n` nodes with `extra` config fields, every node started.
    pub fn started_with(n: usize, extra: &str) -> TestCluster {
        let mut c = TestCluster::with_config(n, extra);
        for id in 1..=n as NodeId {
            c.start(id);
        }
        c
    }

    /// Some node other than `leader`.
    pub fn follower_other_than(&self, leader: NodeId) -> NodeId {
        self.ids()
            .into_iter()
            .find(|&id| id != leader)
            .expect("a cluster of more than one node")
    }

    pub fn ids(&self) -> Vec<NodeId> {
        (1..=self.ports.len() as NodeId).collect()
    }

    pub fn start(&mut self, id: NodeId) {
        assert!(!self.procs.contains_key(&id), "node {id} already running");
        let child = cluster_config::spawn_node(&self.config, id);
        self.procs.insert(id, child);
    }

    /// Starts node `id` with `extra` arguments and waits up to `within` for it to exit, as a
    /// node that refuses to start does. Returns its exit code and stderr, or `None` (the node
    /// is then left running, as a started node).
    pub fn start_expecting_exit(
        &mut self,
        id: NodeId,
        extra: &[&str],
        within: Duration,
    ) -> Option<(i32, String)> {
        let mut child = Command::new(BIN)
            .args(["node", "--id", &id.to_string(), "--quiet", "--config"])
            .arg(&self.config)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn raftkv node");
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return Some((st.code().unwrap_or(-1), err));
            }
            if Instant::now() > deadline {
                self.procs.insert(id, child);
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The newest fjall journal file of node `id`.
    pub fn journal(&self, id: NodeId) -> PathBuf {
        let dir = self.dir.path().join(format!("data/node-{id}"));
        std::fs::read_dir(&dir)
            .expect("data directory")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "jnl"))
            .max_by_key(|p| {
                p.file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .expect("a journal file")
    }

    pub fn kill9(&mut self, id: NodeId) {
        if let Some(mut c) = self.procs.remove(&id) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` to node `id` (e.g. SIGSTOP / SIGCONT to pause and resume it).
    pub fn signal(&self, id: NodeId, signal: Signal) {
        let c = self.procs.get(&id).expect("node is running");
        kill(Pid::from_raw(c.id() as i32), signal).expect("signal the node");
    }

    /// SIGTERM and wait: a clean stop. Returns the exit code.
    pub fn stop(&mut self, id: NodeId) -> Option<i32> {
        let mut c = self.procs.remove(&id)?;
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("node {id} did not stop within 10s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every node's address: config.json's and those that joined.
    pub fn addrs(&self) -> BTreeMap<NodeId, String> {
        self.ports
            .iter()
            .enumerate()
            .map(|(i, p)| (i as NodeId + 1, *p))
            .chain(self.joined.iter().map(|(&id, &p)| (id, p)))
            .map(|(id, p)| (id, format!("127.0.0.1:{p}")))
            .collect()
    }

    /// Starts node `id`, not in config.json, on a free port with `--join` (the addresses of
    /// the running nodes) and, if `voter`, `--voter`. Returns its address.
    pub fn join(&mut self, id: NodeId, voter: bool) -> String {
        let port = cluster_config::free_loopback(1)[0].1;
        let addr = format!("127.0.0.1:{port}");
        let via: Vec<String> = self
            .procs
            .keys()
            .filter_map(|i| self.addrs().get(i).cloned())
            .collect();
        let mut cmd = Command::new(BIN);
        cmd.args(["node", "--id", &id.to_string(), "--quiet", "--config"])
            .arg(&self.config)
            .args(["--join", &via.join(","), "--listen", &addr]);
        if voter {
            cmd.arg("--voter");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn a joining node");
        self.procs.insert(id, child);
        self.joined.insert(id, port);
        addr
    }

    /// Waits up to `within` for node `id` to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self, id: NodeId, within: Duration) -> i32 {
        let mut c = self.procs.remove(&id).expect("node is running");
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                let log =
                    std::fs::read_to_string(self.dir.path().join(format!("logs/node-{id}.log")))
                        .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!(
                    "node {id} did not exit within {within:?}; its log ends:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn client(&self) -> Client {
        Client::with_dialer(self.addrs(), self.dialer.clone()).with_timeout(Duration::from_secs(10))
    }

    pub async fn statuses(&self) -> BTreeMap<NodeId, StatusResponse> {
        self.client()
            .status_all(Duration::from_millis(500))
            .await
            .into_iter()
            .filter_map(|r| r.result.ok().map(|s| (r.id, s)))
            .collect()
    }

    /// Waits until one running node leads and every running node follows it.
    pub async fn wait_leader(&self, within: Duration) -> NodeId {
        let deadline = Instant::now() + within;
        loop {
            let st = self.statuses().await;
            let running: Vec<NodeId> = self.procs.keys().copied().collect();
            if let Some(l) = st.values().find(|s| s.role == "leader") {
                let all = running.iter().all(|id| {
                    st.get(id)
                        .is_some_and(|s| s.leader_id == l.id && s.term == l.term)
                });
                if all {
                    return l.id;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no stable leader within {within:?}: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until node `id` has applied at least `index`.
    pub async fn wait_applied(&self, id: NodeId, index: u64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let st = self.statuses().await;
            if st.get(&id).is_some_and(|s| s.applied_index >= index) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} did not apply {index} within {within:?}: {:?}",
                st.get(&id)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for (_, mut c) in std::mem::take(&mut self.procs) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `raftkv` with arguments and stdin; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], stdin: &str, cwd: &Path) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn raftkv");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
