//! The invariants, checked as the simulation runs. Each check panics with a description.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use raftkv::raft::{Entry, LogIndex, LogStore, MemLogStore, NodeId, Raft, SnapshotMeta, Term};

#[derive(Default)]
pub struct Checker {
    /// Election safety: the one leader of each term.
    leaders: HashMap<Term, NodeId>,
    /// Log matching: what every durable log holds at (index, term): data, and the term of the
    /// entry before it. Two logs that agree on (index, term) then agree on everything before.
    entries: HashMap<(LogIndex, Term), (Bytes, Term)>,
    /// Every entry known to be committed somewhere: index -> term.
    pub committed: BTreeMap<LogIndex, Term>,
    /// State machine safety: what was applied at each index.
    applied: HashMap<LogIndex, (Term, Bytes)>,
    /// The highest commit index any node has learned (for read checks).
    pub max_commit: LogIndex,
}

impl Checker {
    /// Reference: Raft paper Figure 3, Election Safety.
    pub fn on_leader(&mut self, r: &Raft<MemLogStore>) {
        let (id, term) = (r.id(), r.term());
        if let Some(&other) = self.leaders.get(&term) {
            assert_eq!(
                other, id,
                "election safety: nodes {other} and {id} both lead term {term}"
            );
        }
        self.leaders.insert(term, id);
        // Leader completeness: the new leader holds every committed entry (in its log, or
        // compacted into its state machine).
        let compacted = r.first_index().saturating_sub(1);
        for (&i, &t) in self.committed.range(compacted..) {
            assert_eq!(
                r.term_at(i),
                Some(t),
                "leader completeness: leader {id} of term {term} lacks committed entry {i} (term {t})"
            );
        }
    }

    /// Called before `entries` are made durable on top of `store`.
    pub fn on_persist(&mut self, id: NodeId, store: &MemLogStore, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        // Nothing committed is ever truncated away.
        for i in first.index..=store.last_index() {
            let old = store.term(i).expect("stored");
            let new = entries.get((i - first.index) as usize).map(|e| e.term);
            if self.committed.get(&i) == Some(&old) && new != Some(old) {
                panic!("node {id} truncates committed entry {i} (term {old})");
            }
        }
        let mut prev_term = if first.index == 1 {
            0
        } else {
            store.term(first.index - 1).expect("no gap")
        };
        for e in entries {
            let seen = self
                .entries
                .entry((e.index, e.term))
                .or_insert_with(|| (e.data.clone(), prev_term));
            assert!(
                seen.0 == e.data && seen.1 == prev_term,
                "log matching: node {id} has a different entry {} of term {}",
                e.index,
                e.term
            );
            prev_term = e.term;
        }
    }

    /// Records what a node now knows to be committed, from `from` (exclusive) to its commit
    /// index.
    pub fn on_commit(&mut self, r: &Raft<MemLogStore>, from: LogIndex) {
        let commit = r.commit_index();
        // Entries below the log's start came in a snapshot, checked by `on_install`.
        for i in (from + 1).max(r.first_index().saturating_sub(1))..=commit {
            if i == 0 {
                continue;
            }
            let t = r.term_at(i).expect("committed entries are in the log");
            let known = *self.committed.entry(i).or_insert(t);
            assert_eq!(
                known,
                t,
                "node {} commits term {t} at {i}, but term {known} was committed there",
                r.id()
            );
        }
        self.max_commit = self.max_commit.max(commit);
    }

    /// Reference: Raft paper Figure 3, State Machine Safety.
    pub fn on_apply(&mut self, id: NodeId, e: &Entry) {
        let seen = self
            .applied
            .entry(e.index)
            .or_insert_with(|| (e.term, e.data.clone()));
        assert!(
            seen.0 == e.term && seen.1 == e.data,
            "state machine safety: node {id} applied a different entry at {}",
            e.index
        );
        assert_eq!(
            self.committed.get(&e.index),
            Some(&e.term),
            "node {id} applied an uncommitted entry {}",
            e.index
        );
    }

    /// A snapshot is installed on node `id`: the state machine it brings must equal what every
    /// node applied at each of its indexes, and hold only committed entries.
    pub fn on_install(
        &mut self,
        id: NodeId,
        snap: SnapshotMeta,
        state: &[(LogIndex, Term, Bytes)],
    ) {
        assert_eq!(
            state.len() as u64,
            snap.index,
            "node {id}: snapshot at {} holds {} entries",
            snap.index,
            state.len()
        );
        assert_eq!(
            state.last().map_or(0, |e| e.1),
            snap.term,
            "node {id}: snapshot term"
        );
        for (i, t, data) in state {
            let seen = self.applied.get(i).expect("snapshots hold applied entries");
            assert!(
                seen.0 == *t && seen.1 == *data,
                "node {id}: installed state differs from the applied state at {i}"
            );
            assert_eq!(
                self.committed.get(i),
                Some(t),
                "node {id}: snapshot holds uncommitted {i}"
            );
        }
    }

    /// No committed entry is lost: each is on a majority of durable logs, or compacted into
    /// their state machines (crashed nodes count with what they had on disk). A node that lost
    /// its state and rejoins counts for the entries up to its catch-up index (`covers`): it
    /// votes for no one until it has them.
    /// `logs` are the voters of the latest committed configuration: each committed entry must
    /// be on enough of them to meet every quorum of it (a majority when they are odd; with
    /// single-server changes, an entry committed by a quorum of the next configuration meets
    /// every quorum of this one).
    pub fn check_durable_majority(&self, logs: &[(&MemLogStore, LogIndex)]) {
        let n = logs.len();
        let majority = n - (n / 2 + 1) + 1;
        for (&i, &t) in &self.committed {
            let holders = logs
                .iter()
                .filter(|(l, covers)| {
                    l.term(i).ok() == Some(t) || i <= l.snapshot().index || i <= *covers
                })
                .count();
            assert!(
                holders >= majority,
                "committed entry {i} (term {t}) is durable on only {holders} nodes"
            );
        }
    }
}
