//! gRPC: the `NodeCommunication` (peers) and `DataService` (clients) servers, outgoing peer
//! streams, and the requests they hand to the node runtime. Wire (prost) types stop here.

pub mod convert;
pub mod peer;
pub mod server;

use bytes::Bytes;
use tokio::sync::oneshot;

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
}

pub type Reply<T> = oneshot::Sender<Result<T, ServiceError>>;

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
        reply: Reply<Option<Bytes>>,
    },
    Status {
        reply: Reply<NodeStatus>,
    },
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
    pub progress: Vec<PeerStatus>,
}
