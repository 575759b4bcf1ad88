//! Plain data types of the Raft core: log entries, hard state, messages and the `Ready` batch.

use bytes::Bytes;

/// Identifies a node of the cluster. `0` means "nobody" (no leader known, no vote cast).
pub type NodeId = u64;
/// A Raft term. Terms only grow.
pub type Term = u64;
/// A position in the Raft log. The first entry has index 1; index 0 is the empty prefix.
pub type LogIndex = u64;

/// What a log entry carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// A command for the state machine (opaque to the core).
    Normal,
    /// Appended by a new leader when it takes office, so that it can commit entries of earlier
    /// terms by committing one of its own (Raft paper 5.4.2). Applies nothing.
    Noop,
    /// A configuration change: the data is the whole new [`super::ClusterConfig`], in force
    /// from the moment the entry is appended (dissertation 4.1), committed or not.
    ConfChange,
}

/// One entry of the replicated log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub index: LogIndex,
    pub term: Term,
    pub kind: EntryKind,
    pub data: Bytes,
}

/// Bytes an entry adds to a message or to the uncommitted budget (payload plus fixed header).
pub const ENTRY_OVERHEAD_BYTES: usize = 24;

impl Entry {
    pub fn size_bytes(&self) -> usize {
        self.data.len() + ENTRY_OVERHEAD_BYTES
    }
}

/// Where a snapshot of the state machine stands in the log: it holds the effect of every entry
/// up to `index`, and `term` is that entry's term. `(0, 0)` is the empty snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SnapshotMeta {
    pub index: LogIndex,
    pub term: Term,
}

/// The state that must be durable before a node answers a message that depends on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: Term,
    /// The candidate voted for in `term`, or 0.
    pub vote: NodeId,
    /// The highest index known to be committed. Persisting it is an optimisation (less to
    /// re-learn after a restart), not a safety requirement.
    pub commit: LogIndex,
}

/// The role a node plays in its current term.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Follower,
    /// Asking for pre-votes: would a majority vote for me? Does not change the term.
    PreCandidate,
    Candidate,
    Leader,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Follower => "follower",
            Role::PreCandidate => "pre-candidate",
            Role::Candidate => "candidate",
            Role::Leader => "leader",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message between two cores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub from: NodeId,
    pub to: NodeId,
    /// The sender's term; for a pre-vote request the term it would campaign in, and for a
    /// granted pre-vote response that same future term.
    pub term: Term,
    pub body: MessageBody,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageBody {
    VoteRequest {
        pre_vote: bool,
        last_log_index: LogIndex,
        last_log_term: Term,
        /// The campaign was started by the leader handing over (`TimeoutNow`): voters grant
        /// it even within a leader's lease (dissertation 3.10).
        leader_transfer: bool,
    },
    VoteResponse {
        pre_vote: bool,
        granted: bool,
    },
    /// AppendEntries. Without entries it is a heartbeat.
    AppendRequest {
        prev_log_index: LogIndex,
        prev_log_term: Term,
        entries: Vec<Entry>,
        leader_commit: LogIndex,
        /// The leader's ReadIndex round this message belongs to (0: none); echoed back.
        read_context: u64,
    },
    AppendResponse {
        success: bool,
        /// Success: the last index known to match the leader. Reject: the rejected
        /// `prev_log_index`.
        index: LogIndex,
        /// Reject only: the highest index at which the follower's log may still match, and
        /// its term (fast backtracking, etcd raft `findConflictByTerm`).
        reject_hint_index: LogIndex,
        reject_hint_term: Term,
        read_context: u64,
    },
    /// InstallSnapshot (Raft paper 7), as the core sees it: the sender's runtime has streamed a
    /// complete, verified snapshot of its state machine at `snapshot` to the receiver's runtime,
    /// which holds it staged apart from the live state. The core decides whether to install it
    /// (see [`Ready::snapshot`]); it is answered with an `AppendResponse`.
    InstallSnapshot {
        snapshot: SnapshotMeta,
        /// The configuration in force at `snapshot.index` (empty: the snapshot predates
        /// membership in the log, and the receiver keeps the one it has).
        config: super::ClusterConfig,
    },
    /// Leadership transfer (dissertation 3.10): the leader tells a caught-up voter to start an
    /// election at once, without waiting for its timeout or a pre-vote.
    TimeoutNow,
}

impl Message {
    /// True for messages that assert something about the sender's *durable* state (a vote it
    /// granted, entries it appended). They must not leave the node before the `Ready` they came
    /// with has been persisted. Requests may be sent at once, in parallel with the write.
    pub fn needs_persisted_state(&self) -> bool {
        matches!(
            self.body,
            MessageBody::VoteResponse { .. } | MessageBody::AppendResponse { .. }
        )
    }
}

/// A linearizable read that may now be served: once the local state machine has applied
/// `index`, reading it reflects every write acknowledged before the read arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState {
    pub ctx: u64,
    pub index: LogIndex,
}

/// Volatile state worth reporting when it changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftState {
    pub role: Role,
    pub leader: NodeId,
}

/// One batch of work produced by [`crate::raft::Raft::ready`].
///
/// To ensure correctness, the caller executes it in this order:
/// 1. Send the messages for which [`Message::needs_persisted_state`] is false (requests; a
///    leader's appends travel in parallel with its own write), and start streaming a snapshot
///    of the state machine to each of `snapshot_sends` (in the background; report the outcome
///    with [`crate::raft::Raft::report_snapshot`]).
/// 2. If `snapshot` is set, install the staged snapshot it names, atomically: the state machine
///    becomes the snapshot's and the whole stored log is dropped (the log now starts after
///    `snapshot.index`). Then make `hard_state` and `entries` durable: delete every stored
///    entry with an index at or above `entries[0].index`, then store `entries`; fsync if
///    `must_sync`.
/// 3. Send the remaining messages (responses).
/// 4. Apply `committed_entries` in order.
/// 5. Serve each of `read_states` once the applied index has reached its `index`.
/// 6. Call [`crate::raft::Raft::advance`] (or `advance_append` after step 3 and
///    `advance_apply` once the entries of step 4 are applied).
#[derive(Debug, Default)]
pub struct Ready {
    /// Set when the role or the known leader changed since the last `Ready`.
    pub soft_state: Option<SoftState>,
    /// Set when term, vote or commit changed.
    pub hard_state: Option<HardState>,
    /// A staged snapshot to install before anything else is persisted or applied.
    pub snapshot: Option<SnapshotMeta>,
    /// New log entries, contiguous; they may replace a conflicting suffix of the stored log.
    pub entries: Vec<Entry>,
    pub messages: Vec<Message>,
    /// Leader: peers whose next entry is compacted away; stream each a snapshot.
    pub snapshot_sends: Vec<NodeId>,
    /// Committed entries not yet applied, in log order.
    pub committed_entries: Vec<Entry>,
    pub read_states: Vec<ReadState>,
    /// Reads that can no longer be served here (leadership lost); their clients should retry.
    pub dropped_reads: Vec<u64>,
    /// Whether step 2 must fsync: entries, term or vote changed (commit alone does not need it).
    pub must_sync: bool,
}

impl Ready {
    pub fn is_empty(&self) -> bool {
        self.soft_state.is_none()
            && self.hard_state.is_none()
            && self.snapshot.is_none()
            && self.snapshot_sends.is_empty()
            && self.entries.is_empty()
            && self.messages.is_empty()
            && self.committed_entries.is_empty()
            && self.read_states.is_empty()
            && self.dropped_reads.is_empty()
    }
}
