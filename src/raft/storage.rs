//! The log as the core sees it: durable entries behind [`LogStore`], plus an in-memory
//! implementation for tests and the simulator.

use super::types::{Entry, LogIndex, SnapshotMeta, Term};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A failure to read the durable log.
///
/// `Compacted` and `Unavailable` are answers, not failures: the core falls back to a snapshot
/// (compacted) or knows the entry does not exist yet (unavailable). `Io` and `Corrupt` mean the
/// node cannot go on safely and must stop.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("log entry {0} is compacted into the snapshot")]
    Compacted(LogIndex),
    #[error("log entry {0} is not available (never written)")]
    Unavailable(LogIndex),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: Option<BoxError>,
    },
    #[error("corrupt data: {0}")]
    Corrupt(String),
}

impl StorageError {
    /// An I/O failure described by `what`, caused by `source`.
    pub fn io(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StorageError::Io {
            what: what.into(),
            source: Some(source.into()),
        }
    }
}

/// Read access to the durable part of the Raft log.
///
/// To ensure correctness, implementers guarantee:
/// - the entries in `[first_index, last_index]` are contiguous and exactly those that were
///   persisted (after a write of entries starting at `i`, no older entry at or above `i`
///   remains);
/// - `term(first_index - 1)` answers too (the snapshot's term; 0 while nothing has been
///   compacted away), so the consistency check of the first entry works;
/// - an index below `first_index - 1` answers `Compacted`, above `last_index` `Unavailable`;
/// - reads reflect every write that completed before them.
pub trait LogStore {
    /// The index of the first entry available (1 while nothing has been compacted).
    fn first_index(&self) -> LogIndex;
    /// The index of the last entry persisted, or `first_index() - 1` if there is none.
    fn last_index(&self) -> LogIndex;
    /// The term of the entry at `index`, for `index` in `[first_index - 1, last_index]`.
    fn term(&self, index: LogIndex) -> Result<Term, StorageError>;
    /// Entries in `[lo, hi)`, at least one if the range is not empty, then as many as fit into
    /// `max_bytes`.
    fn entries(
        &self,
        lo: LogIndex,
        hi: LogIndex,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StorageError>;
}

/// An in-memory [`LogStore`] for tests and the simulator.
#[derive(Clone, Debug, Default)]
pub struct MemLogStore {
    /// The entry before the first one stored: the snapshot's index and term (0, 0 if none).
    snapshot: SnapshotMeta,
    /// Invariant: `entries[i].index == snapshot.index + 1 + i`.
    entries: Vec<Entry>,
}

impl MemLogStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `entries`, first removing every entry at or above `entries[0].index`.
    ///
    /// # Panics
    /// If `entries` would leave a gap after the stored log or replace a compacted entry.
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        assert!(
            first.index > self.snapshot.index && first.index <= self.last_index() + 1,
            "append at {} outside [{}, {}]",
            first.index,
            self.snapshot.index + 1,
            self.last_index() + 1
        );
        self.entries
            .truncate((first.index - self.snapshot.index - 1) as usize);
        self.entries.extend_from_slice(entries);
    }

    /// Forgets every entry up to and including `index` (which must be stored).
    pub fn compact(&mut self, index: LogIndex) {
        if index <= self.snapshot.index {
            return;
        }
        let term = self.term(index).expect("compacting to a stored entry");
        let drop = (index - self.snapshot.index) as usize;
        self.entries.drain(..drop);
        self.snapshot = SnapshotMeta { index, term };
    }

    /// Replaces the whole log by a snapshot's position: nothing stored, `first_index` follows
    /// the snapshot.
    pub fn install_snapshot(&mut self, snap: SnapshotMeta) {
        self.entries.clear();
        self.snapshot = snap;
    }

    /// The index and term of the last entry compacted away.
    pub fn snapshot(&self) -> SnapshotMeta {
        self.snapshot
    }

    pub fn all(&self) -> &[Entry] {
        &self.entries
    }
}

impl LogStore for MemLogStore {
    fn first_index(&self) -> LogIndex {
        self.snapshot.index + 1
    }

    fn last_index(&self) -> LogIndex {
        self.snapshot.index + self.entries.len() as u64
    }

    fn term(&self, index: LogIndex) -> Result<Term, StorageError> {
        if index < self.snapshot.index {
            return Err(StorageError::Compacted(index));
        }
        if index == self.snapshot.index {
            return Ok(self.snapshot.term);
        }
        self.entries
            .get((index - self.snapshot.index - 1) as usize)
            .map(|e| e.term)
            .ok_or(StorageError::Unavailable(index))
    }

    fn entries(
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
        let base = self.snapshot.index + 1;
        Ok(take_within_budget(
            self.entries[(lo - base) as usize..(hi - base) as usize]
                .iter()
                .cloned(),
            max_bytes,
        ))
    }
}

/// Takes entries while they fit into `max_bytes`, but always at least one, so that a single
/// large entry still makes progress.
pub fn take_within_budget(iter: impl Iterator<Item = Entry>, max_bytes: usize) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for e in iter {
        bytes += e.size_bytes();
        if !out.is_empty() && bytes > max_bytes {
            break;
        }
        out.push(e);
    }
    out
}
