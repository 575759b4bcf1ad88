//! The Raft log as the core sees it: the durable entries in a [`LogStore`], followed by the
//! entries appended since the last `Ready` (not yet durable).

use super::storage::{LogStore, StorageError};
use super::types::{Entry, LogIndex, SnapshotMeta, Term};

pub struct RaftLog<S> {
    pub store: S,
    /// Entries appended since the last `Ready`, starting at `unstable_offset`. They shadow any
    /// durable entry at or above `unstable_offset` (a conflicting suffix about to be replaced).
    unstable: Vec<Entry>,
    /// Invariant: `unstable_offset <= store.last_index() + 1`, or with a pending snapshot
    /// `unstable_offset == snapshot.index + 1`.
    unstable_offset: LogIndex,
    /// A snapshot accepted from the leader but not yet installed by the runtime. Until it is,
    /// it shadows the whole stored log: the log starts after it.
    pending_snapshot: Option<SnapshotMeta>,
    /// The highest index known to be committed.
    /// Invariant: `applied <= applying <= committed <= last_index()`.
    pub committed: LogIndex,
    /// The highest index handed out for applying (by `ready`).
    pub applying: LogIndex,
    /// The highest index applied to the state machine (as confirmed by `advance_apply`).
    pub applied: LogIndex,
}

impl<S: LogStore> RaftLog<S> {
    pub fn new(store: S, committed: LogIndex, applied: LogIndex) -> Self {
        let unstable_offset = store.last_index() + 1;
        let mut log = RaftLog {
            store,
            unstable: Vec::new(),
            unstable_offset,
            pending_snapshot: None,
            committed: 0,
            applying: 0,
            applied: 0,
        };
        // A commit index or applied index beyond the durable log cannot be trusted; the
        // snapshot's index is committed by definition.
        log.committed = committed.min(log.last_index()).max(log.first_index() - 1);
        log.applied = applied.min(log.committed);
        log.applying = log.applied;
        log
    }

    pub fn last_index(&self) -> LogIndex {
        match self.unstable.last() {
            Some(e) => e.index,
            None => self.unstable_offset - 1,
        }
    }

    pub fn first_index(&self) -> LogIndex {
        match self.pending_snapshot {
            Some(s) => s.index + 1,
            None => self.store.first_index(),
        }
    }

    /// The snapshot accepted but not yet installed, if any.
    pub fn pending_snapshot(&self) -> Option<SnapshotMeta> {
        self.pending_snapshot
    }

    pub fn last_term(&self) -> Term {
        // The last entry always has a known term (or is index 0 / a snapshot's last entry).
        self.term(self.last_index()).unwrap_or(0)
    }

    /// The term of the entry at `index`: `Compacted` below `first_index() - 1`.
    pub fn term(&self, index: LogIndex) -> Result<Term, StorageError> {
        if index >= self.unstable_offset {
            return self
                .unstable
                .get((index - self.unstable_offset) as usize)
                .map(|e| e.term)
                .ok_or(StorageError::Unavailable(index));
        }
        if let Some(snap) = self.pending_snapshot {
            // Below the unstable offset, which is `snap.index + 1`.
            return if index == snap.index {
                Ok(snap.term)
            } else {
                Err(StorageError::Compacted(index))
            };
        }
        self.store.term(index)
    }

    pub fn match_term(&self, index: LogIndex, term: Term) -> bool {
        matches!(self.term(index), Ok(t) if t == term)
    }

    /// Raft paper 5.4.1: a candidate's log is at least as up-to-date as ours if its last term is
    /// higher, or equal with an index at least as high.
    pub fn is_up_to_date(&self, last_index: LogIndex, last_term: Term) -> bool {
        let my_term = self.last_term();
        last_term > my_term || (last_term == my_term && last_index >= self.last_index())
    }

    /// Appends entries that directly follow or replace a suffix of the log.
    ///
    /// # Panics
    /// If the entries would leave a gap or replace a committed entry.
    pub fn append(&mut self, entries: &[Entry]) -> LogIndex {
        let Some(first) = entries.first() else {
            return self.last_index();
        };
        let at = first.index;
        assert!(
            at > self.committed,
            "entry {at} would overwrite committed log (committed {})",
            self.committed
        );
        assert!(
            at <= self.last_index() + 1,
            "append at {at} would leave a gap after {}",
            self.last_index()
        );
        if at >= self.unstable_offset {
            self.unstable.truncate((at - self.unstable_offset) as usize);
        } else {
            // Replacing durable entries: the next write will delete them first.
            self.unstable.clear();
            self.unstable_offset = at;
        }
        self.unstable.extend_from_slice(entries);
        self.last_index()
    }

    /// The follower side of AppendEntries. If the log matched at `prev_index`/`prev_term`
    /// (Raft paper 5.3), returns the index of the last new entry and the first index the
    /// entries replaced or added (0: the log had them all); `None` if it did not match.
    pub fn maybe_append(
        &mut self,
        prev_index: LogIndex,
        prev_term: Term,
        leader_commit: LogIndex,
        entries: &[Entry],
    ) -> Option<(LogIndex, LogIndex)> {
        if !self.match_term(prev_index, prev_term) {
            return None;
        }
        let last_new = prev_index + entries.len() as u64;
        let conflict = self.find_conflict(entries);
        if conflict != 0 {
            assert!(
                conflict > self.committed,
                "entry {conflict} conflicts with committed entry (committed {})",
                self.committed
            );
            let skip = (conflict - prev_index - 1) as usize;
            self.append(&entries[skip..]);
        }
        // Only up to what this message proved matches the leader (not our whole log).
        self.commit_to(leader_commit.min(last_new));
        Some((last_new, conflict))
    }

    /// The index of the first entry that is not in the log with the same term, or 0.
    fn find_conflict(&self, entries: &[Entry]) -> LogIndex {
        entries
            .iter()
            .find(|e| !self.match_term(e.index, e.term))
            .map_or(0, |e| e.index)
    }

    /// The largest index `<= index` whose term is `<= term`, with its term: where a log whose
    /// entry at `index` has `term` may still match ours.
    pub fn find_conflict_by_term(&self, index: LogIndex, term: Term) -> (LogIndex, Term) {
        let mut i = index.min(self.last_index());
        loop {
            match self.term(i) {
                Ok(t) if t > term => i -= 1,
                Ok(t) => return (i, t),
                // Compacted away: the caller falls back to the snapshot boundary.
                Err(_) => return (i, 0),
            }
        }
    }

    pub fn commit_to(&mut self, index: LogIndex) {
        if index > self.committed {
            assert!(
                index <= self.last_index(),
                "commit {index} is beyond the last index {}",
                self.last_index()
            );
            self.committed = index;
        }
    }

    /// Commits `index` if it is newer than the commit index and of `term` (the leader's term;
    /// Raft paper 5.4.2: a leader never commits an older term's entry by counting replicas).
    pub fn maybe_commit(&mut self, index: LogIndex, term: Term) -> bool {
        if index > self.committed && self.match_term(index, term) {
            self.commit_to(index);
            true
        } else {
            false
        }
    }

    /// Entries in `[lo, hi)`, at least one if the range is not empty, as many as fit into
    /// `max_bytes`.
    pub fn entries(
        &self,
        lo: LogIndex,
        hi: LogIndex,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        if lo >= hi {
            return Ok(Vec::new());
        }
        if lo < self.first_index() {
            return Err(StorageError::Compacted(lo));
        }
        if hi > self.last_index() + 1 {
            return Err(StorageError::Unavailable(hi - 1));
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        if lo < self.unstable_offset {
            let durable_hi = hi.min(self.unstable_offset);
            out = self.store.entries(lo, durable_hi, max_bytes)?;
            if out.last().map(|e| e.index + 1) != Some(durable_hi) {
                return Ok(out); // the budget ran out (or the range ended) in the durable part
            }
            bytes = out.iter().map(Entry::size_bytes).sum();
        }
        if hi > self.unstable_offset {
            let from = lo.max(self.unstable_offset);
            let slice = &self.unstable
                [(from - self.unstable_offset) as usize..(hi - self.unstable_offset) as usize];
            for e in slice {
                if !out.is_empty() && bytes + e.size_bytes() > max_bytes {
                    break;
                }
                bytes += e.size_bytes();
                out.push(e.clone());
            }
        }
        Ok(out)
    }

    /// The entries appended since the last `Ready`.
    pub fn unstable_entries(&self) -> &[Entry] {
        &self.unstable
    }

    /// The caller made the unstable entries durable.
    pub fn stable_all(&mut self) {
        if let Some(last) = self.unstable.last() {
            self.unstable_offset = last.index + 1;
            self.unstable.clear();
        }
    }

    /// Committed entries not handed out for applying yet, up to `max_bytes` (at least one).
    /// None while a snapshot waits to be installed: what follows it comes after.
    pub fn next_committed_entries(&self, max_bytes: usize) -> Result<Vec<Entry>, StorageError> {
        if self.pending_snapshot.is_some() {
            return Ok(Vec::new());
        }
        self.entries(self.applying + 1, self.committed + 1, max_bytes)
    }

    /// Whether committed entries wait to be handed out for applying.
    pub fn has_next_committed_entries(&self) -> bool {
        self.pending_snapshot.is_none() && self.committed > self.applying
    }

    /// Entries up to `index` were handed out for applying.
    pub fn applying_to(&mut self, index: LogIndex) {
        assert!(
            index <= self.committed && index >= self.applying,
            "applying index {index} out of range [{}, {}]",
            self.applying,
            self.committed
        );
        self.applying = index;
    }

    pub fn applied_to(&mut self, index: LogIndex) {
        assert!(
            index <= self.applying && index >= self.applied,
            "applied index {index} out of range [{}, {}]",
            self.applied,
            self.applying
        );
        self.applied = index;
    }

    /// Accepts a snapshot from the leader (Raft paper 7): it replaces the whole log, which
    /// restarts after it, and commits its index. The runtime installs it with the next `Ready`.
    ///
    /// # Panics
    /// If the snapshot is not newer than the commit index, or entries handed out for applying
    /// are not applied yet.
    pub fn restore(&mut self, snap: SnapshotMeta) {
        assert!(
            snap.index > self.committed,
            "snapshot {} is not newer than the commit index {}",
            snap.index,
            self.committed
        );
        assert_eq!(
            self.applying, self.applied,
            "a snapshot is restored while entries are being applied"
        );
        self.unstable.clear();
        self.unstable_offset = snap.index + 1;
        self.pending_snapshot = Some(snap);
        self.committed = snap.index;
    }

    /// The runtime installed `snap`: the store now starts after it, and the state machine is
    /// the snapshot's.
    pub fn snapshot_installed(&mut self, snap: SnapshotMeta) {
        if self.pending_snapshot == Some(snap) {
            self.pending_snapshot = None;
        }
        if snap.index > self.applied {
            self.applying = snap.index;
            self.applied = snap.index;
        }
    }

    pub fn check_invariants(&self) {
        assert!(self.applied <= self.applying, "applied > applying");
        assert!(self.applying <= self.committed, "applying > committed");
        assert!(
            self.committed <= self.last_index(),
            "committed > last index"
        );
        assert!(
            self.committed + 1 >= self.first_index(),
            "the log starts after the commit index"
        );
        match self.pending_snapshot {
            Some(s) => assert_eq!(
                self.unstable_offset,
                s.index + 1,
                "unstable entries follow the pending snapshot"
            ),
            None => assert!(
                self.unstable_offset <= self.store.last_index() + 1,
                "unstable offset beyond the durable log"
            ),
        }
        for (i, e) in self.unstable.iter().enumerate() {
            assert_eq!(
                e.index,
                self.unstable_offset + i as u64,
                "unstable log has a gap"
            );
        }
    }
}
