//! gRPC: the `NodeCommunication` (peers) and `DataService` (clients) servers, outgoing peer
//! streams, and the requests they hand to the node runtime. Wire (prost) types stop here.

pub mod convert;
pub mod peer;
pub mod server;
pub mod snapshot;

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::proto;

/// The cluster id a node knows (0: not yet), shared by the core (which learns it) and the
/// transport (which stamps and checks it on every peer message).
pub type ClusterId = Arc<std::sync::atomic::AtomicU64>;

/// Whether a message from `id` may reach the core: any id but 0. The core decides what a
/// message from outside its configuration may do (a node must take the appends of a leader
/// added after its own last configuration entry, and a leader the answers of a member it is
/// removing, which must learn of its removal; nobody takes a vote request from a non-member).
pub fn is_peer(id: crate::raft::NodeId) -> bool {
    id != 0
}

/// A new random cluster id (never 0). `salt` tells apart ids made in one process at once.
pub fn new_cluster_id(salt: &str) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seed = format!("{salt}/{nanos}/{}", std::process::id());
    xxhash_rust::xxh3::xxh3_64(seed.as_bytes()).max(1)
}

/// Hex, as the node's log and errors show it.
pub fn cluster_id_str(id: u64) -> String {
    if id == 0 {
        "unknown".into()
    } else {
        format!("{id:016x}")
    }
}

use crate::raft::{LogIndex, Message, NodeId};
use crate::storage::command::RequestId;

/// Metadata keys of a `not leader` answer.
pub const LEADER_ID_HEADER: &str = "raftkv-leader-id";
pub const LEADER_ADDR_HEADER: &str = "raftkv-leader-addr";

/// Everything the node runtime receives.
pub enum Inbound {
    /// The messages of one batch from a peer, in order.
    Peers(Vec<Message>),
    Client(ClientRequest),
    /// Requests that arrived together on one pipeline call.
    Clients(Vec<ClientRequest>),
    /// A snapshot from the leader, received, verified and staged; `message` is its
    /// InstallSnapshot for the core. `reply` gets whether it was installed, and why not.
    Snapshot {
        message: Message,
        staged: crate::storage::StagedState,
        reply: oneshot::Sender<(bool, String)>,
    },
    /// Where members are, as a node that joins learned it from the cluster: until its own
    /// configuration names them, it needs these to answer the leader.
    PeerHints(std::collections::BTreeMap<NodeId, String>),
    /// The current leader reports this node's removal as committed (a removed node that
    /// missed the entry learns it this way, and stops).
    RemovedByLeader,
    /// A snapshot transfer this node started to `to` ended.
    SnapshotSent {
        to: NodeId,
        result: Result<snapshot::SendOutcome, String>,
    },
}

/// Where the answer to one client request goes: a unary call's waiting task, or a tagged
/// answer in its pipeline's next reply batch.
pub enum Reply<T> {
    Once(oneshot::Sender<Result<T, ServiceError>>),
    Tagged(Tagged<T>),
}

pub struct Tagged<T> {
    tag: u64,
    sink: ReplySink,
    encode: fn(T) -> proto::tagged_reply::Reply,
    /// For the request metrics: the operation and when it arrived (when they are recorded).
    op: crate::metrics::Op,
    started: Option<std::time::Instant>,
}

impl<T> Reply<T> {
    /// An answer for request `tag` of a pipeline call, encoded by `encode` when it succeeds.
    pub fn tagged(
        tag: u64,
        sink: &ReplySink,
        op: crate::metrics::Op,
        encode: fn(T) -> proto::tagged_reply::Reply,
    ) -> Self {
        Reply::Tagged(Tagged {
            tag,
            sink: sink.clone(),
            encode,
            op,
            started: sink.0.metrics.as_ref().map(|_| std::time::Instant::now()),
        })
    }

    /// Answers the request; false if nobody waits for the answer any more.
    pub fn send(self, result: Result<T, ServiceError>) -> bool {
        match self {
            Reply::Once(tx) => tx.send(result).is_ok(),
            Reply::Tagged(t) => {
                let (reply, code) = match result {
                    Ok(v) => ((t.encode)(v), tonic::Code::Ok),
                    Err(e) => {
                        let status = server::status_from(e);
                        (
                            proto::tagged_reply::Reply::Error(server::request_error(&status)),
                            status.code(),
                        )
                    }
                };
                if let (Some(m), Some(started)) = (&t.sink.0.metrics, t.started) {
                    m.request(t.op, code, started.elapsed());
                }
                t.sink.push(proto::TaggedReply {
                    tag: t.tag,
                    reply: Some(reply),
                })
            }
        }
    }
}

/// The answers of one pipeline call. Answers given during a round of the core collect here
/// and go out as one batch when the core calls [`flush_replies`], straight to the call's
/// response stream (no task in between).
#[derive(Clone)]
pub struct ReplySink(Arc<SinkInner>);

struct SinkInner {
    buffered: Mutex<Vec<proto::TaggedReply>>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    out: mpsc::UnboundedSender<Result<proto::ReplyBatch, tonic::Status>>,
    /// Requests the call may still have in flight; returned as answers go out.
    credit: Arc<Semaphore>,
}

thread_local! {
    /// Sinks with buffered answers, on the thread that answered (the core's).
    static DIRTY: RefCell<Vec<ReplySink>> = const { RefCell::new(Vec::new()) };
}

impl ReplySink {
    pub fn new(
        out: mpsc::UnboundedSender<Result<proto::ReplyBatch, tonic::Status>>,
        credit: Arc<Semaphore>,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> ReplySink {
        ReplySink(Arc::new(SinkInner {
            buffered: Mutex::new(Vec::new()),
            metrics,
            out,
            credit,
        }))
    }

    fn push(&self, reply: proto::TaggedReply) -> bool {
        if self.0.out.is_closed() {
            return false;
        }
        let mut buffered = self.0.buffered.lock().unwrap_or_else(|e| e.into_inner());
        if buffered.is_empty() {
            DIRTY.with(|d| d.borrow_mut().push(self.clone()));
        }
        buffered.push(reply);
        true
    }
}

/// Sends every answer buffered on this thread, one batch per pipeline call (more if the
/// answers are large: a batch stays under `peer::BATCH_BYTES_MAX`).
pub fn flush_replies() {
    let dirty = DIRTY.with(|d| std::mem::take(&mut *d.borrow_mut()));
    for sink in dirty {
        let replies =
            std::mem::take(&mut *sink.0.buffered.lock().unwrap_or_else(|e| e.into_inner()));
        if replies.is_empty() {
            continue;
        }
        sink.0.credit.add_permits(replies.len());
        for replies in split_by_encoded_len(replies, peer::BATCH_BYTES_MAX) {
            let _ = sink.0.out.send(Ok(proto::ReplyBatch { replies }));
        }
    }
}

/// Splits `items` into runs of at most `max_bytes` encoded (a single larger item goes alone),
/// in order, so that a batch of them never nears the gRPC message limit.
pub fn split_by_encoded_len<T: prost::Message>(items: Vec<T>, max_bytes: usize) -> Vec<Vec<T>> {
    // The usual case, one run: hand the vector on as it is.
    if items.iter().map(T::encoded_len).sum::<usize>() <= max_bytes {
        return if items.is_empty() {
            Vec::new()
        } else {
            vec![items]
        };
    }
    let mut runs = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for item in items {
        let len = item.encoded_len();
        if !current.is_empty() && bytes + len > max_bytes {
            runs.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += len;
        current.push(item);
    }
    if !current.is_empty() {
        runs.push(current);
    }
    runs
}

pub enum ClientRequest {
    Put {
        key: Bytes,
        value: Bytes,
        id: RequestId,
        reply: Reply<LogIndex>,
    },
    Delete {
        key: Bytes,
        id: RequestId,
        reply: Reply<(bool, LogIndex)>,
    },
    Get {
        key: Bytes,
        stale: bool,
        /// With `stale`: answer once this node has applied this index.
        min_index: LogIndex,
        reply: Reply<Option<Bytes>>,
    },
    Status {
        reply: Reply<NodeStatus>,
    },
    /// Leader only: a point-in-time view of the state machine for a backup.
    Snapshot {
        reply: Reply<BackupSource>,
    },
    /// Leader only: hand leadership to `target` (0: the most caught-up voter); answered with
    /// (from, to, term) once `to` leads.
    TransferLeader {
        target: NodeId,
        reply: Reply<(NodeId, NodeId, u64)>,
    },
    /// A membership change; answered with the entry's index (0: in force already) and the
    /// configuration after it.
    ChangeMembership {
        change: crate::raft::ConfChange,
        reply: Reply<(LogIndex, crate::raft::ClusterConfig)>,
    },
}

/// What a backup streams: the state machine, and whose it is.
pub struct BackupSource {
    pub source: crate::storage::SnapshotSource,
    pub from: NodeId,
    pub term: u64,
    pub cluster_id: u64,
}

/// Why a client request failed, as the node runtime sees it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("not the leader (leader: {})", leader_id.map_or("unknown".to_string(), |id| format!("node {id} at {}", leader_addr.as_deref().unwrap_or("?"))))]
    NotLeader {
        leader_id: Option<NodeId>,
        leader_addr: Option<String>,
    },
    /// The write was proposed but leadership was lost before it committed: it may or may not
    /// be applied.
    #[error("leadership lost before the request completed; a write may or may not be applied")]
    LeadershipLost,
    /// The log index the write was proposed at was taken by another leader's entry: it was not
    /// applied.
    #[error("the write was overwritten by a new leader and not applied")]
    NotCommitted,
    #[error("too many writes are waiting to commit ({0} bytes); retry later")]
    Busy(usize),
    #[error("{0}")]
    InvalidArgument(String),
    /// Cannot be done now, may be later (a membership change while another is in progress).
    #[error("{0}")]
    TryAgain(String),
    #[error("node is shutting down")]
    ShuttingDown,
    #[error("storage failure: {0}")]
    Storage(String),
}

#[derive(Clone, Debug, Default)]
pub struct PeerStatus {
    pub id: NodeId,
    pub match_index: LogIndex,
    pub next_index: LogIndex,
    pub active: bool,
}

#[derive(Clone, Debug, Default)]
pub struct NodeStatus {
    pub id: NodeId,
    pub role: String,
    pub term: u64,
    pub leader_id: NodeId,
    pub leader_addr: String,
    pub commit_index: LogIndex,
    pub applied_index: LogIndex,
    pub first_log_index: LogIndex,
    pub last_log_index: LogIndex,
    pub voters: Vec<NodeId>,
    pub config: crate::raft::ClusterConfig,
    pub config_index: LogIndex,
    pub config_pending: bool,
    pub progress: Vec<PeerStatus>,
    pub snapshot_index: LogIndex,
    pub snapshot_term: u64,
    pub log_bytes: u64,
    pub data_bytes: u64,
    pub last_snapshot_unix_ms: u64,
    pub snapshots_installed: u64,
    pub snapshots_sent: u64,
    pub cluster_id: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    fn append(bytes: usize) -> proto::RaftMessage {
        proto::RaftMessage {
            from: 1,
            to: 2,
            term: 1,
            cluster_id: 0,
            body: Some(proto::raft_message::Body::AppendRequest(
                proto::AppendRequest {
                    entries: vec![proto::Entry {
                        index: 1,
                        term: 1,
                        kind: 0,
                        data: vec![b'x'; bytes].into(),
                    }],
                    ..Default::default()
                },
            )),
        }
    }

    #[test]
    fn runs_stay_under_the_byte_limit_and_keep_order() {
        let messages: Vec<_> = (0..10).map(|i| append(300 + i)).collect();
        let one = messages[0].encoded_len();
        let runs = split_by_encoded_len(messages.clone(), 3 * one + 5);
        assert!(runs.len() >= 4, "{} runs", runs.len());
        for r in &runs {
            let bytes: usize = r.iter().map(|m| m.encoded_len()).sum();
            assert!(r.len() == 1 || bytes <= 3 * one + 5, "{bytes} bytes");
        }
        let flat: Vec<_> = runs.into_iter().flatten().collect();
        assert_eq!(flat, messages, "nothing lost or reordered");
        // An item over the limit goes alone rather than being dropped.
        let big = split_by_encoded_len(vec![append(10), append(5000), append(10)], 1000);
        assert_eq!(big.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1, 1]);
        assert!(split_by_encoded_len(Vec::<proto::RaftMessage>::new(), 1000).is_empty());
    }
}
