//! etcd beside raftkv, for `RAFTKV_BENCH_ETCD=1 cargo bench --bench table` (`just bench-etcd`).
//!
//! The machine's speed drifts from hour to hour (its fsync cost doubled between two sessions),
//! so a ratio to etcd means something only when both ran in the same minutes. This starts a
//! fresh etcd cluster of the same size on free loopback ports, in a temporary directory, with
//! etcd's default settings (fsync on), and drives it with a closed loop of the same shape as
//! `raftkv bench`: `clients` tasks with one request in flight each, spread over 4 connections
//! that go round-robin to all members; 1000 keys, 256-byte values, 1 s of warm-up. It speaks
//! etcd's own gRPC API (`etcdserverpb.KV/Put` and `/Range`, linearizable by default) through
//! tonic; the messages below carry only the fields we send or read, which protobuf allows.
//!
//! The etcd binary is `etcd` on the PATH (Debian: `apt install etcd-server`), or the path in
//! `RAFTKV_BENCH_ETCD`. Nothing else in the project depends on etcd.

#![allow(dead_code)] // each user (table, recovery) needs a different part

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PutResponse {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "5")]
    pub value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeResponse {
    #[prost(message, repeated, tag = "2")]
    pub kvs: Vec<KeyValue>,
}

/// The etcd binary to run, or why there is none.
pub fn binary() -> Result<String, String> {
    let named = std::env::var("RAFTKV_BENCH_ETCD").unwrap_or_default();
    let bin = if named.is_empty() || named == "1" {
        "etcd".to_string()
    } else {
        named
    };
    match Command::new(&bin).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(bin),
        _ => Err(format!(
            "cannot run {bin:?} --version: install etcd (Debian: apt install etcd-server) or set \
             RAFTKV_BENCH_ETCD to the etcd binary"
        )),
    }
}

/// A running etcd cluster; dropping it kills the members and removes their data.
pub struct EtcdCluster {
    _dir: tempfile::TempDir,
    members: Vec<Child>,
    /// How to start each member again (after `kill`).
    commands: Vec<Command>,
    pub client_urls: Vec<String>,
}

impl EtcdCluster {
    /// Starts `n` members and waits until a linearizable read succeeds on every one of them.
    pub fn start(
        bin: &str,
        n: usize,
        ports: &[(String, u16)],
        rt: &tokio::runtime::Runtime,
    ) -> Self {
        assert_eq!(ports.len(), 2 * n, "a client and a peer port per member");
        let dir = tempfile::tempdir().expect("tempdir");
        let peer_url = |i: usize| format!("http://127.0.0.1:{}", ports[2 * i + 1].1);
        let client_urls: Vec<String> = (0..n)
            .map(|i| format!("http://127.0.0.1:{}", ports[2 * i].1))
            .collect();
        let initial = (0..n)
            .map(|i| format!("m{i}={}", peer_url(i)))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("raftkv-bench-{}", std::process::id());
        let mut commands: Vec<Command> = (0..n)
            .map(|i| {
                let mut c = Command::new(bin);
                c.args(["--name", &format!("m{i}")])
                    .arg("--data-dir")
                    .arg(dir.path().join(format!("m{i}")))
                    .args(["--listen-client-urls", &client_urls[i]])
                    .args(["--advertise-client-urls", &client_urls[i]])
                    .args(["--listen-peer-urls", &peer_url(i)])
                    .args(["--initial-advertise-peer-urls", &peer_url(i)])
                    .args(["--initial-cluster", &initial])
                    .args(["--initial-cluster-state", "new"])
                    .args(["--initial-cluster-token", &token])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                c
            })
            .collect();
        let members = commands
            .iter_mut()
            .map(|c| c.spawn().expect("spawn etcd"))
            .collect();
        let c = EtcdCluster {
            _dir: dir,
            members,
            commands,
            client_urls,
        };
        rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(30);
            for url in &c.client_urls {
                loop {
                    let ok = match connect(url).await {
                        Some(ch) => get(&ch, b"probe".to_vec()).await.is_ok(),
                        None => false,
                    };
                    if ok {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "etcd at {url} not serving within 30 s"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        c
    }
}

impl EtcdCluster {
    /// Kills member `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        let _ = self.members[i].kill();
        let _ = self.members[i].wait();
    }

    /// Starts member `i` again on its data directory.
    pub fn restart(&mut self, i: usize) {
        self.members[i] = self.commands[i].spawn().expect("respawn etcd");
    }

    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().map(Child::id).collect()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for c in &mut self.members {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseHeader {
    #[prost(uint64, tag = "2")]
    pub member_id: u64,
}

/// `etcdserverpb.StatusResponse`, the fields read here.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(uint64, tag = "4")]
    pub leader: u64,
    #[prost(uint64, tag = "5")]
    pub raft_index: u64,
    #[prost(uint64, tag = "6")]
    pub raft_term: u64,
    #[prost(uint64, tag = "7")]
    pub raft_applied_index: u64,
}

/// One member's `Maintenance/Status`, or `None` if it does not answer within 500 ms.
pub async fn status(url: &str) -> Option<StatusResponse> {
    let ask = async {
        let ch = connect(url).await?;
        unary(&ch, "/etcdserverpb.Maintenance/Status", StatusRequest {})
            .await
            .ok()
    };
    tokio::time::timeout(Duration::from_millis(500), ask)
        .await
        .ok()
        .flatten()
}

/// A closed-loop put load of `clients` tasks over 4 connections to `urls` (10,000 keys,
/// 256-byte values) until `stop` is set; returns the puts that succeeded.
pub async fn put_load(urls: Vec<String>, clients: usize, stop: Arc<AtomicU8>) -> u64 {
    let mut conns = Vec::new();
    for i in 0..CONNS.min(clients) {
        conns.push(
            connect(&urls[i % urls.len()])
                .await
                .expect("connect to etcd"),
        );
    }
    let value: Vec<u8> = (0..256u32).map(|i| b'a' + (i % 26) as u8).collect();
    let tasks: Vec<_> = (0..clients)
        .map(|w| {
            let (ch, stop, value) = (conns[w % conns.len()].clone(), stop.clone(), value.clone());
            tokio::spawn(async move {
                let mut ok = 0;
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (w as u64 + 1);
                while stop.load(Ordering::Relaxed) != STOP {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if put(&ch, key(x % 10_000), value.clone()).await.is_ok() {
                        ok += 1;
                    } else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                ok
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    total
}

async fn connect(url: &str) -> Option<Channel> {
    Endpoint::from_shared(url.to_string())
        .ok()?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()
}

/// One unary call of etcd's KV service.
async fn unary<Req, Resp>(ch: &Channel, path: &'static str, req: Req) -> Result<Resp, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    let r = grpc
        .unary(
            tonic::Request::new(req),
            PathAndQuery::from_static(path),
            codec,
        )
        .await?;
    Ok(r.into_inner())
}

async fn put(ch: &Channel, key: Vec<u8>, value: Vec<u8>) -> Result<(), tonic::Status> {
    unary::<_, PutResponse>(ch, "/etcdserverpb.KV/Put", PutRequest { key, value })
        .await
        .map(|_| ())
}

/// A linearizable read (etcd's default); the value if the key exists.
async fn get(ch: &Channel, key: Vec<u8>) -> Result<Option<Vec<u8>>, tonic::Status> {
    let r: RangeResponse = unary(ch, "/etcdserverpb.KV/Range", RangeRequest { key }).await?;
    Ok(r.kvs.into_iter().next().map(|kv| kv.value))
}

/// Throughput and latency of one closed-loop run, like `raftkv bench --json`'s fields.
pub struct Run {
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
}

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
pub const STOP: u8 = 2;
const KEYS: u64 = 1000;
const CONNS: usize = 4;

fn key(i: u64) -> Vec<u8> {
    format!("bench-{i:08}").into_bytes()
}

/// Runs `workload` ("put" or "get") with `clients` closed-loop clients for `secs` seconds.
pub fn run(
    c: &EtcdCluster,
    workload: &str,
    clients: usize,
    secs: u64,
    rt: &tokio::runtime::Runtime,
) -> Run {
    let read = workload == "get";
    rt.block_on(async {
        let mut conns = Vec::new();
        for i in 0..CONNS.min(clients) {
            let url = &c.client_urls[i % c.client_urls.len()];
            conns.push(connect(url).await.expect("connect to etcd"));
        }
        let value: Vec<u8> = (0..256u32).map(|i| b'a' + (i % 26) as u8).collect();
        if read {
            for k in 0..KEYS {
                put(&conns[0], key(k), value.clone())
                    .await
                    .expect("preload etcd");
            }
            let v = get(&conns[0], key(0)).await.expect("read back");
            assert_eq!(v.as_deref(), Some(&value[..]), "etcd read back the preload");
        }
        let phase = Arc::new(AtomicU8::new(WARMUP));
        let tasks: Vec<_> = (0..clients)
            .map(|w| {
                let ch = conns[w % conns.len()].clone();
                let phase = phase.clone();
                let value = value.clone();
                tokio::spawn(async move {
                    let mut hist = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)
                        .expect("histogram bounds");
                    let mut errors = 0u64;
                    // xorshift: a different key sequence per client, no shared state.
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (w as u64 + 1);
                    loop {
                        let p = phase.load(Ordering::Relaxed);
                        if p == STOP {
                            break;
                        }
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let k = key(x % KEYS);
                        let started = Instant::now();
                        let ok = if read {
                            get(&ch, k).await.is_ok()
                        } else {
                            put(&ch, k, value.clone()).await.is_ok()
                        };
                        let micros = started.elapsed().as_micros() as u64;
                        if p != MEASURE || phase.load(Ordering::Relaxed) != MEASURE {
                            continue;
                        }
                        if ok {
                            let _ = hist.record(micros.max(1));
                        } else {
                            errors += 1;
                        }
                    }
                    (hist, errors)
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        phase.store(MEASURE, Ordering::Relaxed);
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        phase.store(STOP, Ordering::Relaxed);
        let seconds = started.elapsed().as_secs_f64();
        let mut hist =
            Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds");
        let mut errors = 0;
        for t in tasks {
            let (h, e) = t.await.expect("etcd client task");
            hist.add(&h).expect("same histogram bounds");
            errors += e;
        }
        Run {
            ops_per_sec: hist.len() as f64 / seconds,
            p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
            p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
            errors,
        }
    })
}
