//! A node's Prometheus metrics (prometheus-client), served at `/metrics` when the node's
//! config entry has an `http_port`.
//!
//! 1. Names follow etcd's where etcd has one, with `raftkv_` for `etcd_`
//!    (`raftkv_server_has_leader`, `raftkv_disk_wal_fsync_duration_seconds`, ...), so that
//!    dashboards and alerts written for etcd carry over.
//! 2. One registry per node, no global: nodes started in one process keep their own.
//! 3. Recording is cheap on the hot path: counters and gauges are atomics, a request's counter
//!    and histogram are looked up once at start (no label hashing per request), and the
//!    core's gauges are set once per round of the core loop, not per entry.
//! 4. Without an `http_port` nothing is recorded at all (`Option<Arc<Metrics>>` is `None`).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// The client operations counted and timed, as the `op` label spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Put,
    Get,
    GetStale,
    Delete,
    Status,
    TransferLeader,
    ChangeMembership,
    Snapshot,
}

impl Op {
    const ALL: [Op; 8] = [
        Op::Put,
        Op::Get,
        Op::GetStale,
        Op::Delete,
        Op::Status,
        Op::TransferLeader,
        Op::ChangeMembership,
        Op::Snapshot,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
            Op::GetStale => "get_stale",
            Op::Delete => "delete",
            Op::Status => "status",
            Op::TransferLeader => "transfer_leader",
            Op::ChangeMembership => "change_membership",
            Op::Snapshot => "snapshot",
        }
    }
}

/// A request's outcome, as the `result` label spells it: `ok`, or the gRPC code of the error
/// in snake case (`not_leader` for FAILED_PRECONDITION, the redirect to the leader).
fn result_of(code: tonic::Code) -> usize {
    use tonic::Code::*;
    match code {
        Ok => 0,
        FailedPrecondition => 1,
        InvalidArgument => 2,
        ResourceExhausted => 3,
        Aborted => 4,
        Unavailable => 5,
        DeadlineExceeded => 6,
        Internal => 7,
        _ => 8,
    }
}

const RESULTS: [&str; 9] = [
    "ok",
    "not_leader",
    "invalid_argument",
    "resource_exhausted",
    "aborted",
    "unavailable",
    "deadline_exceeded",
    "internal",
    "other",
];

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    pub has_leader: Gauge,
    pub is_leader: Gauge,
    pub leader_changes: Counter,
    pub proposals_committed: Gauge,
    pub proposals_applied: Gauge,
    pub proposals_pending: Gauge,
    pub proposals_failed: Counter,
    pub term: Gauge,
    pub wal_fsync: Histogram,
    pub backend_commit: Histogram,
    pub log_bytes: Gauge,
    pub log_entries: Gauge,
    pub data_bytes: Gauge,
    pub snapshot_index: Gauge,
    pub snapshot_send_success: Counter,
    pub snapshot_send_failures: Counter,
    pub snapshot_receive_success: Counter,
    pub snapshot_receive_failures: Counter,
    pub snapshot_send_duration: Histogram,
    peer_rtt: Family<Labels, Histogram, fn() -> Histogram>,
    requests_family: Family<Labels, Counter>,
    duration_family: Family<Labels, Histogram, fn() -> Histogram>,
    /// Handles into the families, by `Op as usize * RESULTS.len() + result` and by `Op as
    /// usize`: made on first use (a series appears once it has happened), then no label
    /// hashing per request.
    requests: Vec<OnceLock<Counter>>,
    request_duration: Vec<OnceLock<Histogram>>,
    /// When the data directory's size was last read (it is not free: once a second).
    disk_size_read: std::sync::Mutex<Option<std::time::Instant>>,
}

/// 0.5 ms to 8 s, doubling (etcd's disk histograms: 0.001 to 4 s).
fn disk_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

/// 0.1 ms to 0.8 s, doubling (etcd's peer round trip: 0.0001 to 0.8 s).
fn rtt_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 14))
}

impl Metrics {
    pub fn new(node: u64) -> Arc<Metrics> {
        let mut root = Registry::with_prefix("raftkv");
        let reg = &mut root;
        let gauge = |reg: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            reg.register(name, help, g.clone());
            g
        };
        let counter = |reg: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            reg.register(name, help, c.clone());
            c
        };
        let id = gauge(reg, "server_id", "This node's id");
        set(&id, node);
        let has_leader = gauge(
            reg,
            "server_has_leader",
            "Whether a leader exists: 1 if one does, 0 if not",
        );
        let is_leader = gauge(
            reg,
            "server_is_leader",
            "Whether this node is the leader: 1 if it is, 0 if not",
        );
        let leader_changes = counter(
            reg,
            "server_leader_changes_seen",
            "The number of leader changes seen",
        );
        let proposals_committed = gauge(
            reg,
            "server_proposals_committed_total",
            "The total number of consensus proposals committed (the commit index)",
        );
        let proposals_applied = gauge(
            reg,
            "server_proposals_applied_total",
            "The total number of consensus proposals applied (the applied index)",
        );
        let proposals_pending = gauge(
            reg,
            "server_proposals_pending",
            "The number of writes this leader proposed that are not yet applied",
        );
        let proposals_failed = counter(
            reg,
            "server_proposals_failed",
            "The number of writes this node proposed that failed (leadership lost, not committed, refused)",
        );
        let term = gauge(reg, "server_term", "The node's current Raft term");
        let wal_fsync = disk_buckets();
        reg.register_with_unit(
            "disk_wal_fsync_duration",
            "The latency of the Raft log's fsyncs (one per batch of entries)",
            Unit::Seconds,
            wal_fsync.clone(),
        );
        let backend_commit = disk_buckets();
        reg.register_with_unit(
            "disk_backend_commit_duration",
            "The latency of applying a batch of committed entries to the state machine (one write batch)",
            Unit::Seconds,
            backend_commit.clone(),
        );
        let log_bytes = gauge(
            reg,
            "log_size_bytes",
            "The Raft log's size on disk, as encoded (after compaction)",
        );
        let log_entries = gauge(
            reg,
            "log_entries",
            "The number of entries in the Raft log (after compaction)",
        );
        let data_bytes = gauge(
            reg,
            "disk_data_size_bytes",
            "The data directory's size on disk (log and state machine)",
        );
        let snapshot_index = gauge(
            reg,
            "snapshot_index",
            "The index the log was last compacted to (the latest snapshot's)",
        );
        let snapshot_send_success = counter(
            reg,
            "network_snapshot_send_success",
            "Snapshots sent to a follower that installed them",
        );
        let snapshot_send_failures = counter(
            reg,
            "network_snapshot_send_failures",
            "Snapshot transfers to a follower that failed",
        );
        let snapshot_receive_success = counter(
            reg,
            "network_snapshot_receive_success",
            "Snapshots received from a leader, verified and installed",
        );
        let snapshot_receive_failures = counter(
            reg,
            "network_snapshot_receive_failures",
            "Snapshots received from a leader that were not installed (refused, superseded, damaged)",
        );
        let snapshot_send_duration = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        reg.register_with_unit(
            "network_snapshot_send_total_duration",
            "How long a snapshot transfer to a follower took, to its end",
            Unit::Seconds,
            snapshot_send_duration.clone(),
        );
        let peer_rtt: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(rtt_buckets);
        reg.register_with_unit(
            "network_peer_round_trip_time",
            "Round trip time of a gRPC health check to each peer (probed every second)",
            Unit::Seconds,
            peer_rtt.clone(),
        );
        let request_family: Family<Labels, Counter> = Family::default();
        reg.register(
            "requests",
            "Client requests handled, by operation and result (ok, or the error's gRPC code)",
            request_family.clone(),
        );
        let duration_family: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(rtt_buckets);
        reg.register_with_unit(
            "request_duration",
            "How long client requests took from arrival to answer, by operation",
            Unit::Seconds,
            duration_family.clone(),
        );
        let requests = (0..Op::ALL.len() * RESULTS.len())
            .map(|_| OnceLock::new())
            .collect();
        let request_duration = Op::ALL.iter().map(|_| OnceLock::new()).collect();
        Arc::new(Metrics {
            registry: root,
            has_leader,
            is_leader,
            leader_changes,
            proposals_committed,
            proposals_applied,
            proposals_pending,
            proposals_failed,
            term,
            wal_fsync,
            backend_commit,
            log_bytes,
            log_entries,
            data_bytes,
            snapshot_index,
            snapshot_send_success,
            snapshot_send_failures,
            snapshot_receive_success,
            snapshot_receive_failures,
            snapshot_send_duration,
            peer_rtt,
            requests_family: request_family,
            duration_family,
            requests,
            request_duration,
            disk_size_read: std::sync::Mutex::new(None),
        })
    }

    /// Counts one client request and its latency.
    pub fn request(&self, op: Op, code: tonic::Code, took: Duration) {
        let (i, r) = (op as usize, result_of(code));
        if let Some(c) = self.requests.get(i * RESULTS.len() + r) {
            c.get_or_init(|| {
                self.requests_family.get_or_create_owned(&vec![
                    ("op", op.as_str().to_string()),
                    ("result", RESULTS[r].to_string()),
                ])
            })
            .inc();
        }
        if let Some(h) = self.request_duration.get(i) {
            h.get_or_init(|| {
                self.duration_family
                    .get_or_create_owned(&vec![("op", op.as_str().to_string())])
            })
            .observe(took.as_secs_f64());
        }
    }

    /// Whether the data directory's size is due to be read again (once a second).
    pub fn disk_size_due(&self) -> bool {
        let mut last = self
            .disk_size_read
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return false;
        }
        *last = Some(std::time::Instant::now());
        true
    }

    /// One round trip to peer `to`.
    pub fn peer_round_trip(&self, to: u64, took: Duration) {
        self.peer_rtt
            .get_or_create(&vec![("to", to.to_string())])
            .observe(took.as_secs_f64());
    }

    /// The registry in Prometheus' text format (OpenMetrics 1.0, which Prometheus reads).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Sets a gauge from an unsigned value (saturating: gauges are i64).
pub fn set(g: &Gauge, v: u64) {
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
}

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
