//! The Raft consensus state machine.
//!
//! The contract, after etcd raft:
//! 1. The caller feeds events: [`Raft::tick`] once per logical tick, [`Raft::step`] for every
//!    message from a peer, [`Raft::propose`] for new commands and [`Raft::read_index`] for
//!    linearizable reads.
//! 2. When [`Raft::has_ready`] says so, the caller takes [`Raft::ready`] and executes it in the
//!    order documented on [`Ready`] (persist before answering; apply in order).
//! 3. The caller calls [`Raft::advance`], and only then feeds further events.
//!
//! The core does no I/O and reads no clock; its only randomness (election timeouts) comes from a
//! RNG seeded at construction. Given the same seed and the same events it makes the same
//! decisions, which is what lets the simulator replay a failing schedule exactly.

use std::collections::VecDeque;

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::log::RaftLog;
use super::membership::{ClusterConfig, ConfChange};
use super::progress::ProgressState;
use super::quorum::VoteResult;
use super::storage::{LogStore, StorageError};
use super::tracker::ProgressTracker;
use super::types::*;

/// The configuration a configuration-change entry holds.
fn decode_config(e: &Entry) -> Result<ClusterConfig, Error> {
    ClusterConfig::decode(&e.data).map_err(|why| {
        Error::Storage(StorageError::Corrupt(format!(
            "configuration entry {}: {why}",
            e.index
        )))
    })
}

/// Static parameters of one core.
#[derive(Clone, Debug)]
pub struct Config {
    pub id: NodeId,
    /// The configuration in force at the applied index the core starts from: the one the
    /// state machine holds, or the bootstrap configuration of a new cluster (voters, and
    /// learners, which receive the log and snapshots but vote on nothing and count toward no
    /// quorum). Configuration entries in the log after that index are read at start-up.
    /// Empty for a node that joins an existing cluster: it learns the configuration from the
    /// leader. A node that is not a voter of its configuration never campaigns.
    pub members: ClusterConfig,
    /// A learner may be promoted once its log is within this many entries of the leader's.
    pub promote_max_lag: u64,
    /// A follower that hears no leader for a random number of ticks in
    /// `[election_ticks_min, election_ticks_max]` starts an election.
    pub election_ticks_min: u32,
    pub election_ticks_max: u32,
    /// A leader sends heartbeats every `heartbeat_ticks`.
    pub heartbeat_ticks: u32,
    /// Appends a leader keeps in flight to one follower before waiting for answers.
    pub max_inflight_msgs: usize,
    /// Entry bytes a leader keeps in flight to one follower (at least one message goes).
    pub max_inflight_bytes: usize,
    /// Entry bytes in one append message (at least one entry is always sent).
    pub max_msg_bytes: usize,
    /// Entry bytes a leader accepts beyond its commit index before refusing proposals.
    pub max_uncommitted_bytes: usize,
    /// Entry bytes handed out for applying in one `Ready`.
    pub max_apply_bytes: usize,
    /// Raft dissertation 9.6: campaign only after a pre-vote round says we could win.
    pub pre_vote: bool,
    /// Raft dissertation 6.2: a leader that has not heard from a majority for an election
    /// timeout steps down, and followers that heard from a leader recently ignore vote requests.
    pub check_quorum: bool,
    /// Seeds the election-timeout RNG.
    pub seed: u64,
}

impl Config {
    /// Defaults matching a 10 ms tick: elections after 150-300 ms, heartbeats every 50 ms.
    pub fn new(id: NodeId, voters: Vec<NodeId>, seed: u64) -> Self {
        Config {
            id,
            members: ClusterConfig::with_voters(voters),
            promote_max_lag: 1000,
            election_ticks_min: 15,
            election_ticks_max: 30,
            heartbeat_ticks: 5,
            max_inflight_msgs: 256,
            max_inflight_bytes: 16 << 20,
            max_msg_bytes: 1 << 20,
            max_uncommitted_bytes: 64 << 20,
            max_apply_bytes: 4 << 20,
            pre_vote: true,
            check_quorum: true,
            seed,
        }
    }

    pub fn validate(&self) -> Result<(), Error> {
        let bad = |why: &str| Err(Error::Config(why.to_string()));
        if self.id == 0 {
            return bad("node id 0 is reserved for 'nobody'");
        }
        if !self.members.is_empty() && self.members.voters().next().is_none() {
            return bad("a configuration needs at least one voter");
        }
        if self.members.contains(0) {
            return bad("member id 0 is reserved for 'nobody'");
        }
        if self.heartbeat_ticks == 0 || self.election_ticks_min <= self.heartbeat_ticks {
            return bad("the election timeout must be longer than the heartbeat interval");
        }
        if self.election_ticks_max < self.election_ticks_min {
            return bad("election_ticks_max must be at least election_ticks_min");
        }
        if self.max_inflight_msgs == 0 {
            return bad("max_inflight_msgs must be at least 1");
        }
        Ok(())
    }
}

/// Why a call into the core failed. A failed call leaves the core unchanged.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not the leader (leader: {})", if *leader == 0 { "unknown".to_string() } else { leader.to_string() })]
    NotLeader { leader: NodeId },
    #[error("proposal dropped: {0} bytes of uncommitted entries are pending")]
    ProposalDropped(usize),
    #[error("invalid raft configuration: {0}")]
    Config(String),
    #[error("leadership is being transferred to node {to}; retry there in a moment")]
    TransferInProgress { to: NodeId },
    #[error("cannot transfer leadership: {0}")]
    TransferRefused(String),
    /// `retry`: the change may pass later (another one in progress, a learner catching up).
    #[error("membership change refused: {why}")]
    ConfChangeRefused { why: String, retry: bool },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A snapshot of a core's state for `Status` and tests.
#[derive(Clone, Debug)]
pub struct Status {
    pub id: NodeId,
    pub role: Role,
    pub term: Term,
    pub vote: NodeId,
    pub leader: NodeId,
    pub commit: LogIndex,
    pub applied: LogIndex,
    pub first_index: LogIndex,
    pub last_index: LogIndex,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// The configuration in force (the latest in the log), and the index of its entry (0: the
    /// bootstrap configuration).
    pub config: ClusterConfig,
    pub config_index: LogIndex,
    /// Whether that entry is not yet committed: a change is in progress.
    pub config_pending: bool,
    /// Leader only: the node leadership is being transferred to (0: none).
    pub lead_transferee: NodeId,
    /// Leader only: `(follower, match, next, recently active)`.
    pub progress: Vec<(NodeId, LogIndex, LogIndex, bool)>,
}

struct PendingRead {
    ctx: u64,
    index: LogIndex,
    /// The heartbeat round (sent after the read arrived) whose quorum acknowledgement proves we
    /// were still the leader.
    round: u64,
}

/// What the last `Ready` handed out, for `advance_append`.
struct InFlightReady {
    snapshot: Option<SnapshotMeta>,
}

pub struct Raft<S: LogStore> {
    id: NodeId,
    /// Sorted; includes `id`.
    cfg: Config,

    term: Term,
    vote: NodeId,
    leader: NodeId,
    role: Role,
    pub(crate) log: RaftLog<S>,

    /// The members; on a leader the progress of each (itself included); on a candidate the
    /// votes of its campaign. All quorum arithmetic is its.
    tracker: ProgressTracker,
    /// The configurations of the log, oldest first: the one in force at the applied index
    /// (or a snapshot's), then one per configuration entry after it. The last is in force
    /// (on append: dissertation 4.1); a truncated entry's is dropped with it, which brings
    /// back the one before.
    configs: Vec<(LogIndex, ClusterConfig)>,

    election_elapsed: u32,
    heartbeat_elapsed: u32,
    randomized_election_timeout: u32,
    rng: SmallRng,

    msgs: Vec<Message>,
    /// Leader: peers to stream a snapshot to, for the next `Ready`.
    snapshot_sends: Vec<NodeId>,
    /// Leader: new entries (or a commit that may free flow control) to send at the next
    /// `ready`.
    need_bcast: bool,

    /// Leader: the last ReadIndex heartbeat round started.
    read_round: u64,
    read_round_needed: bool,
    pending_reads: VecDeque<PendingRead>,
    /// Reads that arrived before this leader committed an entry of its own term: its commit
    /// index may still lag the real one (dissertation 6.4 step 1).
    reads_awaiting_commit: Vec<u64>,
    read_states: Vec<ReadState>,
    dropped_reads: Vec<u64>,

    /// Leader: `(index, bytes)` of its uncommitted proposals, for flow control.
    uncommitted: VecDeque<(LogIndex, usize)>,
    uncommitted_bytes: usize,

    /// Set on a node that rejoins without the durable state it once had (repaired, or started
    /// on an empty directory in an existing cluster): it neither votes nor campaigns until its
    /// commit index has reached `catch_up_to` (what its peers had committed when it came
    /// back), so that its empty log cannot help elect a leader lacking acknowledged writes.
    catch_up_to: Option<LogIndex>,
    /// The term of the entry this node had at `catch_up_to` (`Term::MAX` when unknown, or when
    /// `catch_up_to` is what its peers had committed, which the commit index reaches anyway):
    /// see `lower_catch_up`.
    catch_up_term: Term,
    /// It may have voted in terms up to this one before it lost its state: it never votes (or
    /// campaigns) in them again.
    vote_floor: Term,

    /// Leader: the voter leadership is being handed to (dissertation 3.10; 0: none), and the
    /// ticks since the transfer began (it is abandoned after a minimum election timeout).
    lead_transferee: NodeId,
    transfer_elapsed: u32,

    prev_soft: SoftState,
    prev_hard: HardState,
    in_flight: Option<InFlightReady>,
}

impl<S: LogStore> Raft<S> {
    /// Creates a core from durable state: the log in `store`, the `hard_state` last persisted,
    /// and the index the state machine has applied.
    ///
    /// # Errors
    /// If the configuration is invalid.
    pub fn new(
        cfg: Config,
        store: S,
        hard_state: HardState,
        applied: LogIndex,
    ) -> Result<Self, Error> {
        cfg.validate()?;
        let log = RaftLog::new(store, hard_state.commit, applied);
        // Configuration entries not yet applied are in force already.
        let mut configs = vec![(applied, cfg.members.clone())];
        let lo = (applied + 1).max(log.first_index());
        let mut at = lo;
        while at <= log.last_index() {
            let batch = log.entries(at, log.last_index() + 1, 16 << 20)?;
            for e in &batch {
                if e.kind == EntryKind::ConfChange {
                    configs.push((e.index, decode_config(e)?));
                }
            }
            at = batch.last().map_or(at + 1, |e| e.index + 1);
        }
        let mut r = Raft {
            id: cfg.id,
            tracker: ProgressTracker::new(
                configs
                    .last()
                    .expect("one configuration at least")
                    .1
                    .membership(),
            ),
            configs,
            term: hard_state.term,
            vote: hard_state.vote,
            leader: 0,
            role: Role::Follower,
            log,
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_election_timeout: 0,
            rng: SmallRng::seed_from_u64(cfg.seed),
            msgs: Vec::new(),
            snapshot_sends: Vec::new(),
            need_bcast: false,
            read_round: 0,
            read_round_needed: false,
            pending_reads: VecDeque::new(),
            reads_awaiting_commit: Vec::new(),
            read_states: Vec::new(),
            dropped_reads: Vec::new(),
            uncommitted: VecDeque::new(),
            uncommitted_bytes: 0,
            catch_up_to: None,
            catch_up_term: Term::MAX,
            vote_floor: 0,
            lead_transferee: 0,
            transfer_elapsed: 0,
            prev_soft: SoftState {
                role: Role::Follower,
                leader: 0,
            },
            prev_hard: HardState::default(),
            in_flight: None,
            cfg,
        };
        r.prev_hard = r.hard_state();
        r.reset_randomized_election_timeout();
        Ok(r)
    }

    // ------------------------------------------------------------------------------------------
    // Accessors
    // ------------------------------------------------------------------------------------------

    pub fn id(&self) -> NodeId {
        self.id
    }
    pub fn term(&self) -> Term {
        self.term
    }
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn leader(&self) -> NodeId {
        self.leader
    }
    pub fn commit_index(&self) -> LogIndex {
        self.log.committed
    }
    pub fn applied_index(&self) -> LogIndex {
        self.log.applied
    }
    pub fn last_index(&self) -> LogIndex {
        self.log.last_index()
    }
    pub fn first_index(&self) -> LogIndex {
        self.log.first_index()
    }
    /// A snapshot accepted from the leader that the next `Ready` asks to install.
    pub fn pending_snapshot(&self) -> Option<SnapshotMeta> {
        self.log.pending_snapshot()
    }
    pub fn store(&self) -> &S {
        &self.log.store
    }
    /// Whether the node is still catching up after rejoining (see [`Raft::set_rejoin`]).
    /// Leader: the node leadership is being transferred to (0: none).
    pub fn lead_transferee(&self) -> NodeId {
        self.lead_transferee
    }
    pub fn rejoining(&self) -> bool {
        self.catch_up_to.is_some()
    }
    /// The node lost its durable state and rejoins: no votes or campaigns for terms up to
    /// `vote_floor`, and none at all until the commit index reaches `catch_up_to`, given as
    /// (index, the term of the node's own entry there, or `Term::MAX` if unknown); `None`:
    /// caught up already.
    pub fn set_rejoin(&mut self, vote_floor: Term, catch_up_to: Option<(LogIndex, Term)>) {
        self.vote_floor = vote_floor;
        self.catch_up_to = catch_up_to
            .map(|(i, _)| i)
            .filter(|&i| i > self.log.committed);
        self.catch_up_term = catch_up_to.map_or(Term::MAX, |(_, t)| t);
        self.lower_catch_up();
    }

    /// A rejoining node waits for the entries it may have acknowledged before it lost its
    /// state: those up to `catch_up_to`, of terms up to `catch_up_term`. Its log now comes
    /// from leaders that hold every entry committed before their term (leader completeness;
    /// none of them counted on this node's lost state). Once that log has, at or below the
    /// catch-up index, an entry of a later term than `catch_up_term`, the node's old entries
    /// from there on were never committed (log matching: everything after it is of a later
    /// term too), so it waits only for the entries before. Without this, a node whose old tail
    /// was overwritten would wait for the commit index to pass it, which an idle cluster never
    /// does.
    fn lower_catch_up(&mut self) {
        let Some(c) = self.catch_up_to else {
            return;
        };
        let hi = c.min(self.log.last_index());
        if !self.log.term(hi).is_ok_and(|t| t > self.catch_up_term) {
            return;
        }
        let (j, _) = self.log.find_conflict_by_term(hi, self.catch_up_term);
        self.catch_up_to = (j > self.log.committed).then_some(j);
    }
    fn may_vote_in(&self, term: Term) -> bool {
        self.catch_up_to.is_none() && term > self.vote_floor
    }

    /// Whether this node may stand for election: a voter that may vote in `term`. A learner
    /// never campaigns (etcd raft `promotable`). Nor does a removed node, once its removal is
    /// committed; until then it may (dissertation 4.2.2: "a server that is not part of its
    /// own latest configuration should still start new elections, as it might still be
    /// needed until the C_new entry is committed"), without counting its own vote: it may hold
    /// entries, the removal among them, that no voter of the new configuration has, and no
    /// one else could then be elected.
    fn may_campaign_in(&self, term: Term) -> bool {
        let voter = self.tracker.membership().is_voter(self.id)
            || match self.configs.as_slice() {
                [.., (_, before), (index, _)] => {
                    *index > self.log.committed && before.is_voter(self.id)
                }
                _ => false,
            };
        voter && self.may_vote_in(term)
    }

    /// Members being removed whose connections the runtime keeps: on a leader those it still
    /// replicates to until they know; on a follower those its uncommitted configuration
    /// removed (a leader removing itself among them).
    pub fn departing(&self) -> Vec<NodeId> {
        if self.role == Role::Leader {
            return self
                .tracker
                .departing()
                .iter()
                .copied()
                .filter(|&id| id != self.id)
                .collect();
        }
        // A follower keeps answering members its uncommitted configuration removed (a leader
        // removing itself must still hear the acknowledgements that commit its removal).
        match self.configs.as_slice() {
            [.., (_, before), (index, now)] if *index > self.log.committed => before
                .members
                .keys()
                .filter(|&&id| id != self.id && !now.contains(id))
                .copied()
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The configuration in force: the latest in the log, committed or not.
    pub fn config(&self) -> &ClusterConfig {
        &self.configs.last().expect("one configuration at least").1
    }

    /// The index of the latest configuration's entry (at or below the applied index when it
    /// came with the state machine or a snapshot).
    pub fn config_index(&self) -> LogIndex {
        self.configs.last().expect("one configuration at least").0
    }

    /// The configuration in force once entry `index` has been applied: the one a snapshot of
    /// the state machine at `index` must carry.
    pub fn config_at(&self, index: LogIndex) -> Option<&ClusterConfig> {
        self.configs
            .iter()
            .rev()
            .find(|(i, _)| *i <= index)
            .map(|(_, c)| c)
    }

    /// The latest configuration changed (appended, truncated away, or restored from a
    /// snapshot): the tracker follows; a leader starts or stops replicating to members.
    fn config_changed(&mut self) {
        let membership = self.config().membership();
        // A removed member is still sent the log until it has its removal and knows it is
        // committed (see `release_departed`): it learns of its removal (and stops) instead of
        // waiting for a leader forever.
        let departing = match self.configs.as_slice() {
            [.., (_, before), (_, now)] => before
                .members
                .keys()
                .filter(|id| !now.contains(**id))
                .copied()
                .collect(),
            _ => Default::default(),
        };
        let next = self.log.last_index() + 1;
        let durable = self.persisted_index();
        let leader = self.role == Role::Leader;
        self.tracker.set_membership(
            membership,
            departing,
            self.id,
            leader.then_some((next, durable)),
        );
        if self.lead_transferee != 0 && !self.tracker.membership().is_voter(self.lead_transferee) {
            self.lead_transferee = 0;
            self.transfer_elapsed = 0;
        }
        if leader {
            self.need_bcast = true;
        }
    }

    /// Entries from `from` on replaced what the log had there: their configurations replace
    /// those of the entries they replaced.
    fn configs_appended(&mut self, from: LogIndex, entries: &[Entry]) -> Result<(), Error> {
        let before = self.configs.len();
        self.configs.retain(|(i, _)| *i < from);
        debug_assert!(
            !self.configs.is_empty(),
            "the base configuration is never truncated"
        );
        let mut changed = self.configs.len() != before;
        for e in entries
            .iter()
            .filter(|e| e.index >= from && e.kind == EntryKind::ConfChange)
        {
            self.configs.push((e.index, decode_config(e)?));
            changed = true;
        }
        if changed {
            self.config_changed();
        }
        Ok(())
    }
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.log.store
    }
    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.committed,
        }
    }
    fn soft_state(&self) -> SoftState {
        SoftState {
            role: self.role,
            leader: self.leader,
        }
    }

    pub fn status(&self) -> Status {
        Status {
            id: self.id,
            role: self.role,
            term: self.term,
            vote: self.vote,
            leader: self.leader,
            commit: self.log.committed,
            applied: self.log.applied,
            first_index: self.log.first_index(),
            last_index: self.log.last_index(),
            voters: self.tracker.membership().voters.ids().into_iter().collect(),
            learners: self.tracker.membership().learners.iter().copied().collect(),
            config: self.config().clone(),
            config_index: self.config_index(),
            config_pending: self.config_index() > self.log.committed,
            lead_transferee: self.lead_transferee,
            progress: self
                .tracker
                .progress()
                .iter()
                .filter(|&(&id, _)| id != self.id)
                .map(|(&id, p)| (id, p.match_index, p.next_index, p.recent_active))
                .collect(),
        }
    }

    /// The term of the entry at `index`, if the log has it.
    pub fn term_at(&self, index: LogIndex) -> Option<Term> {
        self.log.term(index).ok()
    }

    /// The entries `[lo, hi)` of the log (durable or not), e.g. for tests and invariants.
    pub fn entries(&self, lo: LogIndex, hi: LogIndex) -> Result<Vec<Entry>, StorageError> {
        self.log.entries(lo, hi, usize::MAX)
    }

    /// Whether this node alone is a quorum (a single voter).
    fn is_singleton(&self) -> bool {
        self.tracker.membership().voters.is_singleton_of(self.id)
    }

    /// Every other member: whom a leader replicates to.
    fn peers(&self) -> Vec<NodeId> {
        self.tracker.peers(self.id)
    }

    // ------------------------------------------------------------------------------------------
    // Role transitions
    // ------------------------------------------------------------------------------------------

    fn reset_randomized_election_timeout(&mut self) {
        self.randomized_election_timeout = self
            .rng
            .random_range(self.cfg.election_ticks_min..=self.cfg.election_ticks_max);
    }

    /// Common to every role change: a new term forgets the vote; timers restart.
    fn reset(&mut self, term: Term) {
        if term != self.term {
            self.term = term;
            self.vote = 0;
        }
        self.leader = 0;
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        self.reset_randomized_election_timeout();
        self.tracker.reset_votes();
        self.tracker.clear_progress();
        self.snapshot_sends.clear();
        self.need_bcast = false;
        self.uncommitted.clear();
        self.uncommitted_bytes = 0;
        self.lead_transferee = 0;
        self.transfer_elapsed = 0;
        // Reads in progress cannot be confirmed by a leader that is no longer one.
        self.dropped_reads
            .extend(self.pending_reads.drain(..).map(|r| r.ctx));
        self.dropped_reads.append(&mut self.reads_awaiting_commit);
        self.read_round_needed = false;
    }

    fn become_follower(&mut self, term: Term, leader: NodeId) {
        self.reset(term);
        self.leader = leader;
        self.role = Role::Follower;
    }

    fn become_pre_candidate(&mut self) {
        assert_ne!(
            self.role,
            Role::Leader,
            "invalid transition [leader -> pre-candidate]"
        );
        // A pre-vote changes neither term nor vote.
        self.tracker.reset_votes();
        self.leader = 0;
        self.election_elapsed = 0;
        self.reset_randomized_election_timeout();
        self.role = Role::PreCandidate;
    }

    fn become_candidate(&mut self) {
        assert_ne!(
            self.role,
            Role::Leader,
            "invalid transition [leader -> candidate]"
        );
        self.reset(self.term + 1);
        self.vote = self.id;
        self.role = Role::Candidate;
    }

    fn become_leader(&mut self) {
        assert_eq!(
            self.role,
            Role::Candidate,
            "invalid transition [follower -> leader]"
        );
        self.reset(self.term);
        self.leader = self.id;
        self.role = Role::Leader;
        let next = self.log.last_index() + 1;
        // A fresh leader counts every follower as active until the first check.
        let durable = self.persisted_index();
        self.tracker.reset_progress(self.id, next, durable);
        // Raft 5.4.2 / dissertation 6.4: commit an entry of our own term at once; it also
        // commits every earlier entry and lets us serve ReadIndex reads.
        let noop = Entry {
            index: next,
            term: self.term,
            kind: EntryKind::Noop,
            data: Bytes::new(),
        };
        self.log.append(&[noop]);
        self.need_bcast = true;
        // A single-voter cluster commits on persistence (see `advance`).
    }

    // ------------------------------------------------------------------------------------------
    // Ticks
    // ------------------------------------------------------------------------------------------

    /// Advances the logical clock by one tick.
    pub fn tick(&mut self) {
        assert!(
            self.in_flight.is_none(),
            "tick between ready() and advance()"
        );
        match self.role {
            Role::Leader => self.tick_heartbeat(),
            _ => self.tick_election(),
        }
    }

    fn tick_election(&mut self) {
        self.election_elapsed = self.election_elapsed.saturating_add(1);
        // A node that may not campaign (a learner, a rejoining node) lets the count grow, as
        // etcd raft does: were it reset every timeout, the node would keep believing in a
        // leader lease it no longer has, and refuse every vote a new leader needs.
        if self.election_elapsed >= self.randomized_election_timeout
            && self.may_campaign_in(self.term + 1)
        {
            self.election_elapsed = 0;
            self.campaign(self.cfg.pre_vote);
        }
    }

    fn tick_heartbeat(&mut self) {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self.lead_transferee != 0 {
            self.transfer_elapsed += 1;
            if self.transfer_elapsed >= self.cfg.election_ticks_min {
                // The target did not take over within an election timeout: keep leading.
                self.lead_transferee = 0;
                self.transfer_elapsed = 0;
            }
        }
        if self.election_elapsed >= self.cfg.election_ticks_min {
            self.election_elapsed = 0;
            if self.cfg.check_quorum {
                if !self.tracker.quorum_active(self.id) {
                    // Dissertation 6.2: we may be cut off; step down so that clients look
                    // elsewhere instead of waiting on a leader that cannot commit.
                    self.become_follower(self.term, 0);
                    return;
                }
                self.tracker.reset_recent_active(self.id);
            }
        }
        if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks {
            self.heartbeat_elapsed = 0;
            for p in self.peers() {
                // A probe that went unanswered is retried when the heartbeat is answered.
                if let Some(pr) = self.tracker.get_mut(p) {
                    pr.check_stalled();
                }
                self.send_heartbeat(p);
            }
        }
    }

    // ------------------------------------------------------------------------------------------
    // Elections (Raft paper 5.2, dissertation 9.6)
    // ------------------------------------------------------------------------------------------

    /// Starts an election now, as if the election timeout had elapsed (no-op on a leader).
    pub fn hup(&mut self) {
        assert!(
            self.in_flight.is_none(),
            "hup between ready() and advance()"
        );
        if self.role != Role::Leader && self.may_campaign_in(self.term + 1) {
            self.campaign(self.cfg.pre_vote);
        }
    }

    fn campaign(&mut self, pre_vote: bool) {
        self.campaign_with(pre_vote, false);
    }

    /// `leader_transfer`: started by the leader's `TimeoutNow`; voters grant it within their
    /// leader lease.
    fn campaign_with(&mut self, pre_vote: bool, leader_transfer: bool) {
        let vote_term = if pre_vote {
            self.become_pre_candidate();
            self.term + 1
        } else {
            self.become_candidate();
            self.term
        };
        self.tracker.record_vote(self.id, true);
        if self.tracker.tally_votes() == VoteResult::Won {
            return self.won_election(pre_vote);
        }
        let last_log_index = self.log.last_index();
        let last_log_term = self.log.last_term();
        for to in self.tracker.voters_except(self.id) {
            self.send(
                to,
                vote_term,
                MessageBody::VoteRequest {
                    pre_vote,
                    last_log_index,
                    last_log_term,
                    leader_transfer,
                },
            );
        }
    }

    fn won_election(&mut self, pre_vote: bool) {
        if pre_vote {
            self.campaign(false);
        } else {
            self.become_leader();
        }
    }

    fn on_vote_request(
        &mut self,
        m: &Message,
        pre_vote: bool,
        last_log_index: LogIndex,
        last_log_term: Term,
    ) {
        // We may vote for `from` if we already did, or if we have voted for nobody and follow
        // nobody in this term, or (pre-vote) if it asks about a later term.
        let can_vote = self.may_vote_in(m.term)
            && (self.vote == m.from
                || (self.vote == 0 && self.leader == 0)
                || (pre_vote && m.term > self.term));
        let granted = can_vote && self.log.is_up_to_date(last_log_index, last_log_term);
        if granted {
            // Answer in the term the candidate asked about, so that it counts the vote.
            self.send(
                m.from,
                m.term,
                MessageBody::VoteResponse {
                    pre_vote,
                    granted: true,
                },
            );
            if !pre_vote {
                self.election_elapsed = 0;
                self.vote = m.from;
            }
        } else {
            self.refuse_vote(m.from, pre_vote);
        }
    }

    /// A refusal, in our term (a candidate behind us learns it from the answer).
    fn refuse_vote(&mut self, to: NodeId, pre_vote: bool) {
        self.send(
            to,
            self.term,
            MessageBody::VoteResponse {
                pre_vote,
                granted: false,
            },
        );
    }

    fn on_vote_response(&mut self, m: &Message, pre_vote: bool, granted: bool) {
        let expected = match self.role {
            Role::PreCandidate => pre_vote && (!granted || m.term == self.term + 1),
            Role::Candidate => !pre_vote,
            _ => false,
        };
        if !expected {
            return;
        }
        self.tracker.record_vote(m.from, granted);
        match self.tracker.tally_votes() {
            VoteResult::Won => self.won_election(pre_vote),
            VoteResult::Lost => self.become_follower(self.term, 0),
            VoteResult::Pending => {}
        }
    }

    // ------------------------------------------------------------------------------------------
    // Messages
    // ------------------------------------------------------------------------------------------

    fn send(&mut self, to: NodeId, term: Term, body: MessageBody) {
        self.msgs.push(Message {
            from: self.id,
            to,
            term,
            body,
        });
    }

    /// Processes one message from a peer.
    ///
    /// # Errors
    /// Only if the log cannot be read; the node must then stop.
    pub fn step(&mut self, m: Message) -> Result<(), Error> {
        assert!(
            self.in_flight.is_none(),
            "step between ready() and advance()"
        );
        // Messages are taken from nodes outside the configuration too (dissertation 4.1): a
        // leader added after this node's last configuration entry must be able to bring it up
        // to date. Votes are the exception below.
        if m.to != self.id || m.from == self.id || m.from == 0 {
            return Ok(());
        }
        if let MessageBody::VoteRequest { pre_vote, .. } = m.body
            && self
                .config_at(self.log.committed)
                .is_some_and(|c| c.removed.contains(&m.from))
        {
            // A node whose removal this node knows to be committed asks for votes: it must
            // not make anyone change term, let alone win (hashicorp/raft#524); a quorum of the
            // new configuration holds the removal and can elect a leader without it. It
            // learns our term from the refusal. Not refused: an id this node does not know (a
            // member added after its last configuration entry), nor one removed by an entry
            // not known to be committed (it may be truncated; refusing could leave no
            // electable candidate).
            self.refuse_vote(m.from, pre_vote);
            return Ok(());
        }
        if m.term > self.term {
            if let MessageBody::VoteRequest {
                leader_transfer: false,
                ..
            } = m.body
            {
                // Dissertation 6.2 (with check-quorum): a node that heard from a live leader
                // within the minimum election timeout neither updates its term nor votes:
                // a disruptive node must not depose a healthy leader.
                let in_lease = self.cfg.check_quorum
                    && self.leader != 0
                    && self.election_elapsed < self.cfg.election_ticks_min;
                if in_lease {
                    return Ok(());
                }
            }
            // A pre-vote (request, or grant for a future term) changes nobody's term.
            let keeps_term = matches!(
                m.body,
                MessageBody::VoteRequest { pre_vote: true, .. }
                    | MessageBody::VoteResponse {
                        pre_vote: true,
                        granted: true,
                    }
            );
            if !keeps_term {
                // An append names its sender as leader below, with the rest of its handling.
                self.become_follower(m.term, 0);
            }
        } else if m.term < self.term {
            match m.body {
                MessageBody::AppendRequest { .. } | MessageBody::InstallSnapshot { .. } => {
                    // A deposed leader learns our newer term and steps down. Without this, a
                    // leader cut off by a partition could go on leading a stale term forever:
                    // with pre-vote, nodes that moved on never send it a higher-term request.
                    self.send(
                        m.from,
                        self.term,
                        MessageBody::AppendResponse {
                            success: false,
                            index: 0,
                            reject_hint_index: 0,
                            reject_hint_term: 0,
                            read_context: 0,
                        },
                    );
                }
                MessageBody::VoteRequest { pre_vote: true, .. } => {
                    // Tell a pre-candidate behind us at once, rather than let it wait out its
                    // timeout: it learns our term from the refusal and follows.
                    self.refuse_vote(m.from, true);
                }
                _ => {}
            }
            return Ok(());
        }

        match m.body {
            MessageBody::VoteRequest {
                pre_vote,
                last_log_index,
                last_log_term,
                ..
            } => {
                self.on_vote_request(&m, pre_vote, last_log_index, last_log_term);
            }
            MessageBody::TimeoutNow => {
                // Only from the leader of our term, and only if we may lead (a rejoining node
                // or a learner may not).
                if self.role == Role::Follower
                    && m.from == self.leader
                    && self.may_campaign_in(self.term + 1)
                {
                    self.campaign_with(false, true);
                }
            }
            MessageBody::VoteResponse { pre_vote, granted } => {
                self.on_vote_response(&m, pre_vote, granted)
            }
            MessageBody::AppendRequest { .. } | MessageBody::InstallSnapshot { .. } => {
                match self.role {
                    Role::Leader => {
                        // Election safety: two leaders in one term cannot happen.
                        panic!(
                            "leader {} got an append from {} in its own term {}",
                            self.id, m.from, self.term
                        );
                    }
                    Role::PreCandidate | Role::Candidate => self.become_follower(self.term, m.from),
                    Role::Follower => {}
                }
                self.leader = m.from;
                self.election_elapsed = 0;
                match m.body {
                    MessageBody::InstallSnapshot { snapshot, config } => {
                        self.on_install_snapshot(m.from, snapshot, config)
                    }
                    _ => self.on_append_request(m)?,
                }
                self.lower_catch_up();
                if self.catch_up_to.is_some_and(|i| self.log.committed >= i) {
                    self.catch_up_to = None;
                }
            }
            MessageBody::AppendResponse {
                success,
                index,
                reject_hint_index,
                reject_hint_term,
                read_context,
            } => {
                if self.role == Role::Leader {
                    self.on_append_response(
                        m.from,
                        success,
                        index,
                        reject_hint_index,
                        reject_hint_term,
                        read_context,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Follower side of AppendEntries (Raft paper 5.3).
    fn on_append_request(&mut self, m: Message) -> Result<(), Error> {
        let MessageBody::AppendRequest {
            prev_log_index,
            prev_log_term,
            entries,
            leader_commit,
            read_context,
        } = m.body
        else {
            return Ok(());
        };
        let reply = |success, index, hint_index, hint_term| MessageBody::AppendResponse {
            success,
            index,
            reject_hint_index: hint_index,
            reject_hint_term: hint_term,
            read_context,
        };
        if prev_log_index < self.log.committed {
            // Old news: everything up to our commit index matches the leader already.
            let committed = self.log.committed;
            self.send(m.from, self.term, reply(true, committed, 0, 0));
            return Ok(());
        }
        match self
            .log
            .maybe_append(prev_log_index, prev_log_term, leader_commit, &entries)
        {
            Some((last_new, conflict)) => {
                if conflict != 0 {
                    self.configs_appended(conflict, &entries)?;
                }
                self.send(m.from, self.term, reply(true, last_new, 0, 0))
            }
            None => {
                // Fast backtracking: point the leader at the last entry that may still match,
                // skipping every entry of a term newer than the one it asked about.
                let probe = prev_log_index.min(self.log.last_index());
                let (hint_index, hint_term) = self.log.find_conflict_by_term(probe, prev_log_term);
                self.send(
                    m.from,
                    self.term,
                    reply(false, prev_log_index, hint_index, hint_term),
                );
            }
        }
        Ok(())
    }

    /// Follower side of InstallSnapshot (Raft paper 7; etcd raft `restore`). The snapshot is
    /// already staged by the runtime; the core only decides whether to install it, and answers
    /// like an append: the index that now matches the leader.
    fn on_install_snapshot(&mut self, from: NodeId, snap: SnapshotMeta, config: ClusterConfig) {
        let reply = |index| MessageBody::AppendResponse {
            success: true,
            index,
            reject_hint_index: 0,
            reject_hint_term: 0,
            read_context: 0,
        };
        if snap.index <= self.log.committed {
            // Stale (or duplicated): we already have everything it holds.
            let committed = self.log.committed;
            self.send(from, self.term, reply(committed));
            return;
        }
        if self.log.applying != self.log.applied {
            // Entries handed out are still being applied; the leader retries.
            return;
        }
        if self.log.match_term(snap.index, snap.term) {
            // Our log already holds the snapshot's last entry: the snapshot is not needed, the
            // entries up to it are committed (Raft paper 7: retain the entries following it).
            self.log.commit_to(snap.index);
            let committed = self.log.committed;
            self.send(from, self.term, reply(committed));
            return;
        }
        // Our log does not hold the snapshot's last entry (or holds another term there): the
        // whole log is dropped, not only what follows the snapshot (hashicorp/raft#697).
        self.log.restore(snap);
        let config = if config.is_empty() {
            // A sender from before membership was in the log (no change was ever made): the
            // configuration is the one this node had at its commit index, never one of the
            // uncommitted entries just dropped.
            self.config_at(self.log.committed)
                .unwrap_or_else(|| self.config())
                .clone()
        } else {
            config
        };
        self.configs = vec![(snap.index, config)];
        self.config_changed();
        // Sent after the install is durable (an AppendResponse waits for persistence).
        self.send(from, self.term, reply(snap.index));
    }

    /// Leader side of an AppendEntries answer.
    fn on_append_response(
        &mut self,
        from: NodeId,
        success: bool,
        index: LogIndex,
        hint_index: LogIndex,
        hint_term: Term,
        read_context: u64,
    ) -> Result<(), Error> {
        let Some(pr) = self.tracker.get_mut(from) else {
            return Ok(());
        };
        pr.recent_active = true;
        if read_context > pr.read_ack {
            pr.read_ack = read_context;
            self.confirm_reads();
        }
        let Some(pr) = self.tracker.get_mut(from) else {
            return Ok(());
        };
        if !success {
            // Skip the whole conflicting term at once: the largest index of ours whose term is
            // not newer than the follower's entry at hint_index.
            let match_hint = if hint_term > 0 {
                let (i, _) = self.log.find_conflict_by_term(hint_index, hint_term);
                i
            } else {
                hint_index
            };
            let first_index = self.log.first_index();
            let pr = self.tracker.get_mut(from).expect("progress exists");
            if pr.maybe_decr_to(index, match_hint) {
                self.send_append(from)?;
            } else if pr.state == ProgressState::Probe && pr.match_index + 1 < first_index {
                // The answer to a heartbeat sent at the snapshot's index (the follower's match
                // index is compacted away): whatever it says, the follower needs a snapshot.
                pr.probe_sent = false;
                self.send_append(from)?;
            }
            return Ok(());
        }
        if pr.state == ProgressState::Probe {
            pr.probe_sent = false;
        }
        let first_index = self.log.first_index();
        let pr = self.tracker.get_mut(from).expect("progress exists");
        if pr.maybe_update(index) {
            match pr.state {
                ProgressState::Probe => pr.become_replicate(),
                // The follower installed a snapshot (at whatever index): once the log can
                // continue from its match index, replicate (etcd raft `handleAppendEntries`).
                ProgressState::Snapshot if pr.match_index + 1 >= first_index => {
                    pr.become_replicate()
                }
                // Still behind the log: the transfer in flight goes on (its report ends it).
                ProgressState::Snapshot => {}
                ProgressState::Replicate => {}
            }
            if self.maybe_commit() {
                self.need_bcast = true;
            }
            self.release_departed();
            if self.tracker.get(from).is_none() {
                return Ok(());
            }
        }
        if from == self.lead_transferee
            && self.tracker.get(from).map(|p| p.match_index) == Some(self.log.last_index())
        {
            // The target has caught up: hand over.
            self.send(from, self.term, MessageBody::TimeoutNow);
            return Ok(());
        }
        // Keep the pipeline full while the follower is behind.
        while self.send_append(from)? {}
        Ok(())
    }

    /// Starts handing leadership to `target` (dissertation 3.10), or to the most caught-up
    /// other voter if `target` is 0. Once the target's log matches ours it is told to
    /// campaign at once (`TimeoutNow`); meanwhile proposals are refused with
    /// [`Error::TransferInProgress`]; if it has not taken over within a minimum election
    /// timeout, the transfer is abandoned and this node goes on leading. Returns the target.
    ///
    /// # Errors
    /// `NotLeader`, or `TransferRefused` for a target that is not a voter (or no other voter
    /// at all); a log read error.
    pub fn transfer_leader(&mut self, target: NodeId) -> Result<NodeId, Error> {
        assert!(
            self.in_flight.is_none(),
            "transfer_leader between ready() and advance()"
        );
        if self.role != Role::Leader {
            return Err(Error::NotLeader {
                leader: self.leader,
            });
        }
        let target = if target == 0 {
            // The most caught-up other voter, one heard from this round first.
            self.tracker
                .voters_except(self.id)
                .into_iter()
                .filter_map(|id| {
                    self.tracker
                        .get(id)
                        .map(|p| (p.recent_active, p.match_index, std::cmp::Reverse(id)))
                })
                .max()
                .map(|(_, _, std::cmp::Reverse(id))| id)
                .ok_or_else(|| Error::TransferRefused("there is no other voter".into()))?
        } else {
            target
        };
        if target == self.id {
            // Staying: a transfer in progress is called off.
            self.lead_transferee = 0;
            self.transfer_elapsed = 0;
            return Ok(target);
        }
        if !self.tracker.membership().is_voter(target) {
            return Err(Error::TransferRefused(format!(
                "node {target} is not a voter of this cluster"
            )));
        }
        if self.lead_transferee == target {
            return Ok(target);
        }
        // A target that does not answer is not refused here (it may just not have answered
        // since the last check-quorum round): the transfer is abandoned after an election
        // timeout, and the caller told so.
        self.lead_transferee = target;
        self.transfer_elapsed = 0;
        if self.tracker.get(target).map(|p| p.match_index) == Some(self.log.last_index()) {
            self.send(target, self.term, MessageBody::TimeoutNow);
        } else {
            self.send_append(target)?;
        }
        Ok(target)
    }

    /// Sends `to` the entries it lacks, with the commit index. Returns whether a message went
    /// out (not if `to` has everything or its flow control is full).
    fn send_append(&mut self, to: NodeId) -> Result<bool, Error> {
        let (max_inflight, max_inflight_bytes) =
            (self.cfg.max_inflight_msgs, self.cfg.max_inflight_bytes);
        let Some(pr) = self.tracker.get(to) else {
            return Ok(false);
        };
        if pr.is_paused(max_inflight, max_inflight_bytes) {
            return Ok(false);
        }
        let next = pr.next_index;
        let last = self.log.last_index();
        if next > last && next >= self.log.first_index() {
            return Ok(false);
        }
        let prev_log_index = next - 1;
        let (prev_log_term, entries) = match self
            .log
            .term(prev_log_index)
            .and_then(|t| Ok((t, self.log.entries(next, last + 1, self.cfg.max_msg_bytes)?)))
        {
            Ok(found) => found,
            // What the follower needs next is compacted away: it needs a snapshot.
            Err(StorageError::Compacted(_)) => return Ok(self.send_snapshot(to)),
            Err(e) => return Err(e.into()),
        };
        let sent_last = entries.last().map_or(prev_log_index, |e| e.index);
        let pr = self.tracker.get_mut(to).expect("progress exists");
        if !entries.is_empty() || pr.state == ProgressState::Probe {
            pr.sent_entries(sent_last, entries.iter().map(Entry::size_bytes).sum());
        }
        let leader_commit = self.log.committed;
        let read_context = self.read_round;
        self.send(
            to,
            self.term,
            MessageBody::AppendRequest {
                prev_log_index,
                prev_log_term,
                entries,
                leader_commit,
                read_context,
            },
        );
        Ok(true)
    }

    /// Starts a snapshot transfer to `to` (etcd raft `maybeSendSnapshot`), unless it has not
    /// been heard from recently: snapshots to a dead peer would only flood the network. The
    /// peer gets no appends until the transfer ends (`report_snapshot` or its answer).
    fn send_snapshot(&mut self, to: NodeId) -> bool {
        let Some(pr) = self.tracker.get_mut(to) else {
            return false;
        };
        if !pr.recent_active {
            return false;
        }
        pr.become_snapshot();
        if !self.snapshot_sends.contains(&to) {
            self.snapshot_sends.push(to);
        }
        true
    }

    /// The runtime's snapshot transfer to `to` ended. Either way the follower is probed again
    /// from its match index; after a success its answer to the install moves it on, after a
    /// failure the next heartbeat answer starts another transfer (the runtime decides how soon
    /// to report a failure, which paces the retries).
    pub fn report_snapshot(&mut self, to: NodeId, ok: bool) {
        let _ = ok;
        if let Some(pr) = self.tracker.get_mut(to)
            && pr.state == ProgressState::Snapshot
        {
            pr.become_probe();
            pr.probe_sent = true;
        }
    }

    /// A heartbeat: an empty append at the follower's match index, which always succeeds on a
    /// follower of this term; it carries the commit index as far as the follower can take it.
    /// If that index is compacted away, it is sent at the snapshot's index instead, which only
    /// keeps the follower from campaigning (and confirms reads).
    fn send_heartbeat(&mut self, to: NodeId) {
        let Some(pr) = self.tracker.get(to) else {
            return;
        };
        let mut prev_log_index = pr.match_index;
        if prev_log_index + 1 < self.log.first_index() {
            prev_log_index = self.log.first_index() - 1;
        }
        let Ok(prev_log_term) = self.log.term(prev_log_index) else {
            return;
        };
        let leader_commit = self.log.committed.min(prev_log_index);
        let read_context = self.read_round;
        self.send(
            to,
            self.term,
            MessageBody::AppendRequest {
                prev_log_index,
                prev_log_term,
                entries: Vec::new(),
                leader_commit,
                read_context,
            },
        );
    }

    /// Advances the commit index to what a majority has made durable, if it is of this term.
    fn maybe_commit(&mut self) -> bool {
        // The leader's own progress is its durable log.
        let durable = self.persisted_index();
        if let Some(me) = self.tracker.get_mut(self.id) {
            me.match_index = durable;
            me.next_index = durable + 1;
        }
        let index = self.tracker.committed();
        if !self.log.maybe_commit(index, self.term) {
            return false;
        }
        let committed = self.log.committed;
        self.release_departed();
        if !self.config().is_voter(self.id) && self.config_index() <= committed {
            // Our own removal is committed (dissertation 4.2.2: a leader that is not in the
            // new configuration leads until then, without counting itself). Hand over to a
            // voter that has everything, so that the cluster need not wait for a timeout.
            self.step_down_removed();
            return true;
        }
        while self
            .uncommitted
            .front()
            .is_some_and(|&(i, _)| i <= committed)
        {
            if let Some((_, bytes)) = self.uncommitted.pop_front() {
                self.uncommitted_bytes -= bytes;
            }
        }
        if !self.reads_awaiting_commit.is_empty() {
            let waiting = std::mem::take(&mut self.reads_awaiting_commit);
            for ctx in waiting {
                self.queue_read(ctx);
            }
        }
        true
    }

    /// Removed members that have their removal entry, once it is committed, are told the
    /// commit index one last time (so that they apply it and stop) and then left alone.
    fn release_departed(&mut self) {
        let index = self.config_index();
        if self.tracker.departing().is_empty() || self.log.committed < index {
            return;
        }
        for id in self.tracker.departing().clone() {
            if id == self.id {
                self.tracker.release(id);
            } else if self.tracker.get(id).is_some_and(|p| p.match_index >= index) {
                self.send_heartbeat(id);
                self.tracker.release(id);
            }
        }
    }

    fn step_down_removed(&mut self) {
        let last = self.log.last_index();
        let heir = self
            .tracker
            .voters_except(self.id)
            .into_iter()
            .find(|&id| self.tracker.get(id).is_some_and(|p| p.match_index == last));
        if let Some(heir) = heir {
            self.send(heir, self.term, MessageBody::TimeoutNow);
        }
        self.become_follower(self.term, 0);
    }

    /// The last index durable on this node.
    pub fn persisted_index(&self) -> LogIndex {
        self.log.last_index() - self.log.unstable_entries().len() as u64
    }

    // ------------------------------------------------------------------------------------------
    // Client requests
    // ------------------------------------------------------------------------------------------

    /// Appends a command to the leader's log. Returns its index and term: the command took
    /// effect iff the entry applied at that index has that term.
    ///
    /// # Errors
    /// `NotLeader` on any other node; `ProposalDropped` if too much is uncommitted.
    pub fn propose(&mut self, data: Bytes) -> Result<(LogIndex, Term), Error> {
        assert!(
            self.in_flight.is_none(),
            "propose between ready() and advance()"
        );
        self.check_may_propose()?;
        self.append_proposal(EntryKind::Normal, data)
    }

    fn check_may_propose(&self) -> Result<(), Error> {
        if self.role != Role::Leader {
            return Err(Error::NotLeader {
                leader: self.leader,
            });
        }
        if self.lead_transferee != 0 {
            // Dissertation 3.10: a leader handing over stops taking new entries, so that the
            // target can catch up; the client retries at the new leader.
            return Err(Error::TransferInProgress {
                to: self.lead_transferee,
            });
        }
        Ok(())
    }

    fn append_proposal(&mut self, kind: EntryKind, data: Bytes) -> Result<(LogIndex, Term), Error> {
        let entry = Entry {
            index: self.log.last_index() + 1,
            term: self.term,
            kind,
            data,
        };
        let bytes = entry.size_bytes();
        if self.uncommitted_bytes > 0
            && self.uncommitted_bytes + bytes > self.cfg.max_uncommitted_bytes
        {
            return Err(Error::ProposalDropped(self.uncommitted_bytes));
        }
        let index = entry.index;
        if kind == EntryKind::ConfChange {
            self.configs_appended(index, std::slice::from_ref(&entry))?;
        }
        self.log.append(&[entry]);
        self.uncommitted.push_back((index, bytes));
        self.uncommitted_bytes += bytes;
        self.need_bcast = true;
        Ok((index, self.term))
    }

    /// Proposes a single-server configuration change (dissertation 4.1). It is in force as soon
    /// as it is appended, here and on each follower; it is done once committed. Returns the
    /// entry's index and term, as [`Raft::propose`] does.
    ///
    /// Refused, leaving everything as it was:
    /// - while another change is not yet committed (one at a time: two uncommitted
    ///   single-server changes could make majorities that do not overlap);
    /// - until this leader has committed an entry of its own term (the 2015 raft-dev
    ///   correction: otherwise a change of a deposed leader's term could be lost while one of
    ///   this term is committed on a majority that does not overlap it);
    /// - for a promotion, unless the learner is active and within `promote_max_lag` entries;
    /// - for anything the configuration itself rules out (see [`ClusterConfig::apply`]).
    ///
    /// # Errors
    /// `NotLeader`, `TransferInProgress`, `ProposalDropped`, or `ConfChangeRefused` saying why.
    pub fn propose_conf_change(&mut self, change: &ConfChange) -> Result<(LogIndex, Term), Error> {
        assert!(
            self.in_flight.is_none(),
            "propose_conf_change between ready() and advance()"
        );
        self.check_may_propose()?;
        let refuse = |why: String| Err(Error::ConfChangeRefused { why, retry: true });
        if self.config_index() > self.log.committed {
            return refuse(format!(
                "another change (entry {}) is not committed yet; retry once it is",
                self.config_index()
            ));
        }
        if !self.log.match_term(self.log.committed, self.term) {
            return refuse(
                "the leader has not yet committed an entry of its term; retry in a moment".into(),
            );
        }
        let next = self
            .config()
            .apply(change)
            .map_err(|why| Error::ConfChangeRefused { why, retry: false })?;
        if let ConfChange::Promote { id } = *change {
            let last = self.log.last_index();
            let (matched, active) = self
                .tracker
                .get(id)
                .map_or((0, false), |p| (p.match_index, p.recent_active));
            // It must hold the configuration that made it a learner (so it has answered at
            // least once since), and be close behind.
            if !active || matched < self.config_index() || matched + self.cfg.promote_max_lag < last
            {
                return refuse(format!(
                    "node {id} has not caught up: its log reaches entry {matched} of {last}{}; a learner is promoted once it is within {} entries of the leader",
                    if active {
                        ""
                    } else {
                        " and it has not answered recently"
                    },
                    self.cfg.promote_max_lag
                ));
            }
        }
        // etcd's strict reconfiguration check: a change must leave a quorum of voters that
        // answered recently, or the cluster could be left unable to elect anyone.
        let new = next.membership();
        let active = |id: NodeId| {
            Some(id == self.id || self.tracker.get(id).is_some_and(|p| p.recent_active))
        };
        if !matches!(change, ConfChange::AddLearner { .. })
            && new.voters.vote_result(active) != VoteResult::Won
        {
            let up: Vec<String> = new
                .voters
                .ids()
                .into_iter()
                .filter(|&id| active(id) == Some(true))
                .map(|id| id.to_string())
                .collect();
            return refuse(format!(
                "after it, too few voters would be up for a quorum ({} of {} answered recently: {}); bring members back first",
                up.len(),
                new.voters.ids().len(),
                up.join(", ")
            ));
        }
        self.append_proposal(EntryKind::ConfChange, next.encode())
    }

    /// Requests a linearizable read (dissertation 6.4). Once a quorum has confirmed that we are
    /// still the leader, a [`ReadState`] with `ctx` comes out of `ready`; the read may be served
    /// when the state machine has applied its index. If leadership is lost first, `ctx` comes
    /// out in `Ready::dropped_reads`.
    ///
    /// # Errors
    /// `NotLeader` on any other node.
    pub fn read_index(&mut self, ctx: u64) -> Result<(), Error> {
        assert!(
            self.in_flight.is_none(),
            "read_index between ready() and advance()"
        );
        if self.role != Role::Leader {
            return Err(Error::NotLeader {
                leader: self.leader,
            });
        }
        if !self.log.match_term(self.log.committed, self.term) {
            self.reads_awaiting_commit.push(ctx);
            return Ok(());
        }
        self.queue_read(ctx);
        Ok(())
    }

    fn queue_read(&mut self, ctx: u64) {
        let index = self.log.committed;
        if self.is_singleton() {
            self.read_states.push(ReadState { ctx, index });
            return;
        }
        // Confirmed by the next round, which starts at the next `ready`, after this read.
        self.pending_reads.push_back(PendingRead {
            ctx,
            index,
            round: self.read_round + 1,
        });
        self.read_round_needed = true;
    }

    /// Releases reads whose round a quorum (us included) has acknowledged.
    fn confirm_reads(&mut self) {
        let round = self.read_round;
        if let Some(me) = self.tracker.get_mut(self.id) {
            me.read_ack = round;
        }
        let confirmed = self.tracker.read_confirmed();
        while self
            .pending_reads
            .front()
            .is_some_and(|r| r.round <= confirmed)
        {
            if let Some(r) = self.pending_reads.pop_front() {
                self.read_states.push(ReadState {
                    ctx: r.ctx,
                    index: r.index,
                });
            }
        }
    }

    // ------------------------------------------------------------------------------------------
    // Ready / advance
    // ------------------------------------------------------------------------------------------

    /// Whether `ready` would return any work.
    pub fn has_ready(&self) -> bool {
        !self.msgs.is_empty()
            || !self.snapshot_sends.is_empty()
            || self.log.pending_snapshot().is_some()
            || !self.log.unstable_entries().is_empty()
            || self.log.has_next_committed_entries()
            || !self.read_states.is_empty()
            || !self.dropped_reads.is_empty()
            || (self.role == Role::Leader && (self.need_bcast || self.read_round_needed))
            || self.soft_state() != self.prev_soft
            || self.hard_state() != self.prev_hard
    }

    /// Leader: sends what was batched up since the last `ready` - one append per follower for
    /// all new proposals, and one heartbeat round for all new reads.
    fn flush_leader(&mut self) -> Result<(), Error> {
        if self.role != Role::Leader {
            return Ok(());
        }
        let start_round = std::mem::take(&mut self.read_round_needed);
        if start_round {
            self.read_round += 1;
        }
        let bcast = std::mem::take(&mut self.need_bcast);
        if !bcast && !start_round {
            return Ok(());
        }
        // A new commit index alone is not worth a message round: it rides on the next append
        // or heartbeat. Followers only need it to apply, and no client waits for that.
        for p in self.peers() {
            let sent = bcast && self.send_append(p)?;
            if start_round && !sent {
                self.send_heartbeat(p);
            }
        }
        Ok(())
    }

    /// Returns the work to do; see [`Ready`] for the order. Must be followed by `advance`.
    ///
    /// # Errors
    /// Only if the log cannot be read; the node must then stop.
    pub fn ready(&mut self) -> Result<Ready, Error> {
        assert!(self.in_flight.is_none(), "ready() twice without advance()");
        self.flush_leader()?;
        let soft = self.soft_state();
        let hard = self.hard_state();
        let entries = self.log.unstable_entries().to_vec();
        let snapshot = self.log.pending_snapshot();
        let must_sync = !entries.is_empty()
            || snapshot.is_some()
            || hard.term != self.prev_hard.term
            || hard.vote != self.prev_hard.vote;
        let committed_entries = if self.log.has_next_committed_entries() {
            self.log.next_committed_entries(self.cfg.max_apply_bytes)?
        } else {
            Vec::new()
        };
        if let Some(last) = committed_entries.last() {
            self.log.applying_to(last.index);
        }
        let rd = Ready {
            soft_state: (soft != self.prev_soft).then_some(soft),
            hard_state: (hard != self.prev_hard).then_some(hard),
            snapshot,
            entries,
            messages: std::mem::take(&mut self.msgs),
            snapshot_sends: std::mem::take(&mut self.snapshot_sends),
            committed_entries,
            read_states: std::mem::take(&mut self.read_states),
            dropped_reads: std::mem::take(&mut self.dropped_reads),
            must_sync,
        };
        self.prev_soft = soft;
        self.prev_hard = hard;
        self.in_flight = Some(InFlightReady { snapshot });
        Ok(rd)
    }

    /// The last `Ready` has been executed: its snapshot installed, its entries and hard state
    /// durable, and its committed entries applied.
    pub fn advance(&mut self) {
        self.advance_append();
        let applying = self.log.applying;
        self.advance_apply(applying);
    }

    /// The persistence part of the last `Ready` is done (raft-rs `advance_append`): its
    /// snapshot is installed and its entries and hard state are durable. Its committed entries
    /// may still be being applied; the core takes new input meanwhile, and the next `Ready`
    /// hands out only entries after them.
    pub fn advance_append(&mut self) {
        let done = self
            .in_flight
            .take()
            .expect("advance_append() without ready()");
        if let Some(snap) = done.snapshot {
            self.log.snapshot_installed(snap);
        }
        self.log.stable_all();
        if self.role == Role::Leader && self.maybe_commit() {
            // Our own write may complete a quorum (always so with a single voter).
            self.need_bcast = true;
        }
    }

    /// The state machine has applied every entry up to `index` (raft-rs `advance_apply_to`).
    ///
    /// # Panics
    /// If `index` was not handed out for applying.
    pub fn advance_apply(&mut self, index: LogIndex) {
        self.log.applied_to(index);
        // The state machine now holds the configuration in force at `index`: older ones are
        // never needed again (a truncation stops above the commit index).
        let applied = self.log.applied;
        let keep_from = self
            .configs
            .iter()
            .rposition(|(i, _)| *i <= applied)
            .unwrap_or(0);
        self.configs.drain(..keep_from);
    }

    /// Checks the core's internal invariants; panics with a description if one is broken.
    pub fn check_invariants(&self) {
        self.log.check_invariants();
        match self.role {
            Role::Leader => {
                assert_eq!(self.leader, self.id, "a leader leads itself");
                assert_eq!(self.vote, self.id, "a leader voted for itself in its term");
                assert_eq!(
                    self.tracker.progress().len(),
                    self.tracker.tracked().len(),
                    "leader tracks every member"
                );
                for (id, p) in self.tracker.progress() {
                    assert!(p.match_index < p.next_index, "peer {id}: match >= next");
                    assert!(
                        p.next_index <= self.log.last_index() + 1,
                        "peer {id}: next beyond log"
                    );
                }
            }
            Role::Candidate => assert_eq!(self.vote, self.id, "a candidate voted for itself"),
            Role::Follower | Role::PreCandidate => {
                assert!(
                    self.tracker.progress().is_empty(),
                    "only a leader tracks progress"
                );
            }
        }
    }
}
