//! The log as the core sees it: durable entries behind [`LogStore`], plus an in-memory
//! implementation for tests and the simulator.

use super::types::{Entry, LogIndex, Term};

/// A failure to read the durable log. The node cannot go on safely and must stop.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("log entry {0} is not available (compacted or never written)")]
    Unavailable(LogIndex),
    #[error("log storage failed: {0}")]
    Io(String),
}

/// Read access to the durable part of the Raft log.
///
/// To ensure correctness, implementers guarantee:
/// - the entries in `[first_index, last_index]` are contiguous and exactly those that were
///   persisted (after a write of entries starting at `i`, no older entry at or above `i`
///   remains);
/// - `term(first_index - 1)` answers too (0 while nothing has been compacted away), so the
///   consistency check of the first entry works;
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
    /// Invariant: `entries[i].index == i + 1`.
    entries: Vec<Entry>,
}

impl MemLogStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `entries`, first removing every entry at or above `entries[0].index`.
    ///
    /// # Panics
    /// If `entries` would leave a gap after the stored log.
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        assert!(
            first.index >= 1 && first.index <= self.entries.len() as u64 + 1,
            "append at {} would leave a gap after {}",
            first.index,
            self.entries.len()
        );
        self.entries.truncate(first.index as usize - 1);
        self.entries.extend_from_slice(entries);
    }

    pub fn all(&self) -> &[Entry] {
        &self.entries
    }
}

impl LogStore for MemLogStore {
    fn first_index(&self) -> LogIndex {
        1
    }

    fn last_index(&self) -> LogIndex {
        self.entries.len() as u64
    }

    fn term(&self, index: LogIndex) -> Result<Term, StorageError> {
        if index == 0 {
            return Ok(0);
        }
        self.entries
            .get(index as usize - 1)
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
        if lo < 1 || hi > self.last_index() + 1 {
            return Err(StorageError::Unavailable(if lo < 1 { lo } else { hi - 1 }));
        }
        Ok(take_within_budget(
            self.entries[lo as usize - 1..hi as usize - 1]
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
