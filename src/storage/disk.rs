//! The Raft log and hard state on fjall, implementing the core's [`LogStore`].

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use crate::raft::storage::take_within_budget;
use crate::raft::{
    Entry, EntryKind, HardState, LogIndex, LogStore, NodeId, SnapshotMeta, StorageError, Term,
};

use super::kv::{KvStore, sm_keyspace_generation};
use super::snapshot::Stager;

/// 2: the log may start after a compacted prefix (`log_start`), the applied index carries its
/// term, and the state machine's keyspaces come in generations. Format 1 directories are
/// upgraded in place when opened (they read the same, with no compacted prefix).
const FORMAT_VERSION: u64 = 2;
/// fjall's minimum.
const JOURNAL_BYTES_MAX: u64 = 64 << 20;
const KEY_NODE_ID: &[u8] = b"node_id";
const KEY_FORMAT: &[u8] = b"format";
const KEY_HARD_STATE: &[u8] = b"hard_state";
/// The last compacted entry (index, term as u64 LE): the log starts after it.
pub(crate) const KEY_LOG_START: &[u8] = b"log_start";

/// Why a data directory cannot be opened. Each names the directory.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "data directory {dir} belongs to node {found}, not node {expected}; refusing to start (use the node's own directory or another data_directory)"
    )]
    WrongNode {
        dir: PathBuf,
        expected: NodeId,
        found: NodeId,
    },
    #[error(
        "data directory {dir} has on-disk format {found}, this raftkv reads formats 1 to {FORMAT_VERSION}"
    )]
    WrongFormat { dir: PathBuf, found: u64 },
    #[error("data directory {dir} is corrupt: {what}")]
    Corrupt { dir: PathBuf, what: String },
    #[error("data directory {dir} is in use by another raftkv process (is node already running?)")]
    Locked { dir: PathBuf },
    #[error("cannot open data directory {dir}: {source}")]
    Storage { dir: PathBuf, source: StorageError },
}

/// A fjall error with a readable message (fjall's own `Display` is its `Debug`).
#[derive(Debug)]
pub struct FjallError(fjall::Error);

impl std::fmt::Display for FjallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            fjall::Error::Poisoned => {
                f.write_str("a previous write failed; the database refuses further writes")
            }
            fjall::Error::Io(io) => write!(f, "I/O error: {io}"),
            other => write!(f, "{other:?}"),
        }
    }
}

impl std::error::Error for FjallError {}

pub fn io_err(e: fjall::Error) -> StorageError {
    StorageError::io("database error", FjallError(e))
}

pub(crate) fn corrupt(what: impl Into<String>) -> StorageError {
    StorageError::Corrupt(what.into())
}

/// Makes a directory's entries durable (a new file or folder in it survives a power loss
/// only once its parent directory is fsynced; fjall does not do it for `keyspaces/`).
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io(format!("syncing directory {}", dir.display()), e))
}

/// What a node recovers from its data directory.
pub struct Recovered {
    pub log: DiskLog,
    pub kv: KvStore,
    pub hard_state: HardState,
    /// Stages snapshots received from a leader.
    pub stager: Stager,
}

/// Opens (creating if new) the data directory of node `id`.
///
/// # Errors
/// If the directory belongs to another node, has another format, is locked or unreadable.
pub fn open(dir: &Path, id: NodeId) -> Result<Recovered, OpenError> {
    let wrap = |source| OpenError::Storage {
        dir: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| {
        wrap(StorageError::io(
            format!("creating directory {}", dir.display()),
            e,
        ))
    })?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent).map_err(wrap)?;
    }
    // The journal is shared by every keyspace and only freed once the memtables it covers are
    // flushed: capping it (fjall's default is 512 MiB) bounds the data directory, which with
    // log compaction no longer grows with history.
    let db = match Database::builder(dir)
        .manual_journal_persist(true)
        .worker_threads(1)
        .max_journaling_size(JOURNAL_BYTES_MAX)
        .open()
    {
        Ok(db) => db,
        Err(fjall::Error::Locked) => {
            return Err(OpenError::Locked {
                dir: dir.to_path_buf(),
            });
        }
        Err(e) => return Err(wrap(io_err(e))),
    };
    // Memtable sizes bound a node's memory (fjall's default is 64 MiB per keyspace). Small
    // memtables also keep inserts cheap: every applied write is one skiplist insert, and with
    // a 32 MiB kv memtable the search alone was about 15% of a busy leader's CPU (cache misses);
    // 4 MiB measured about 10% less CPU per write than 32 MiB and a little less than 8. The log
    // is written once per batch and read back from the in-memory tail, so it needs little.
    let ks = |name: &str, memtable_bytes: u64| {
        db.keyspace(name, || {
            KeyspaceCreateOptions::default().max_memtable_size(memtable_bytes)
        })
        .map_err(io_err)
        .map_err(wrap)
    };
    let (log, meta) = (ks("log", 16 << 20)?, ks("meta", 1 << 20)?);
    let corrupt = |what: &str| OpenError::Corrupt {
        dir: dir.to_path_buf(),
        what: what.to_string(),
    };

    match meta.get(KEY_NODE_ID).map_err(io_err).map_err(wrap)? {
        Some(v) => {
            let found = decode_u64(&v).ok_or_else(|| corrupt("node_id"))?;
            if found != id {
                return Err(OpenError::WrongNode {
                    dir: dir.to_path_buf(),
                    expected: id,
                    found,
                });
            }
            let format = meta
                .get(KEY_FORMAT)
                .map_err(io_err)
                .map_err(wrap)?
                .and_then(|v| decode_u64(&v))
                .ok_or_else(|| corrupt("format"))?;
            if !(1..=FORMAT_VERSION).contains(&format) {
                return Err(OpenError::WrongFormat {
                    dir: dir.to_path_buf(),
                    found: format,
                });
            }
            if format < FORMAT_VERSION {
                meta.insert(KEY_FORMAT, FORMAT_VERSION.to_le_bytes().to_vec())
                    .map_err(io_err)
                    .map_err(wrap)?;
            }
        }
        None => {
            let mut b = db.batch();
            b.insert(&meta, KEY_NODE_ID, id.to_le_bytes().to_vec());
            b.insert(&meta, KEY_FORMAT, FORMAT_VERSION.to_le_bytes().to_vec());
            b.commit().map_err(io_err).map_err(wrap)?;
            db.persist(PersistMode::SyncAll)
                .map_err(io_err)
                .map_err(wrap)?;
        }
    }

    let hard_state = match meta.get(KEY_HARD_STATE).map_err(io_err).map_err(wrap)? {
        Some(v) if v.len() == 24 => HardState {
            term: u64_at(&v, 0),
            vote: u64_at(&v, 8),
            commit: u64_at(&v, 16),
        },
        Some(_) => return Err(corrupt("hard_state")),
        None => HardState::default(),
    };

    let start = match meta.get(KEY_LOG_START).map_err(io_err).map_err(wrap)? {
        Some(v) if v.len() == 16 => SnapshotMeta {
            index: u64_at(&v, 0),
            term: u64_at(&v, 8),
        },
        Some(_) => return Err(corrupt("log_start")),
        None => SnapshotMeta::default(),
    };

    // Rebuild the term index and the batch sizes, checking that the log is contiguous from
    // its start. The first batch may straddle the start (compaction keeps it whole).
    let mut terms: Vec<(LogIndex, Term)> = Vec::new();
    let mut batches: VecDeque<(LogIndex, u64)> = VecDeque::new();
    let mut last = start.index;
    for item in log.iter() {
        let (k, v) = item.into_inner().map_err(io_err).map_err(wrap)?;
        let first = decode_index(&k).ok_or_else(|| corrupt("log key"))?;
        let entries =
            decode_batch(first, &v).ok_or_else(|| corrupt(&format!("log batch at {first}")))?;
        let batch_last = entries.last().map_or(first, |e| e.index);
        if batch_last <= start.index {
            continue; // compacted away, not yet deleted
        }
        if first > last + 1 || (first <= start.index && last != start.index) {
            return Err(corrupt(&format!(
                "log gap: entry {first} follows entry {last}"
            )));
        }
        for e in entries.iter().filter(|e| e.index > start.index) {
            if terms.last().is_none_or(|&(_, t)| t != e.term) {
                terms.push((e.index, e.term));
            }
        }
        batches.push_back((first, v.len() as u64));
        last = batch_last;
    }
    let next_generation = db
        .list_keyspace_names()
        .iter()
        .filter_map(|n| sm_keyspace_generation(n))
        .max()
        .unwrap_or(0)
        + 1;
    let kv = KvStore::open(db.clone(), meta.clone(), dir).map_err(wrap)?;
    let stager = Stager::new(db.clone(), dir, next_generation);
    if kv.applied() > last.max(hard_state.commit) {
        return Err(corrupt(&format!(
            "applied index {} is beyond the log ({last})",
            kv.applied()
        )));
    }
    if kv.applied() < start.index {
        return Err(corrupt(&format!(
            "the log starts after entry {}, but the state machine has applied only up to {}",
            start.index,
            kv.applied()
        )));
    }
    let hard_state = HardState {
        commit: hard_state.commit.min(last).max(start.index),
        ..hard_state
    };
    let log_bytes = batches.iter().map(|&(_, b)| b).sum();
    Ok(Recovered {
        log: DiskLog {
            db,
            log,
            meta,
            start,
            last,
            terms,
            batches,
            log_bytes,
            tail: VecDeque::new(),
            tail_bytes: 0,
        },
        kv,
        hard_state,
        stager,
    })
}

/// The durable Raft log.
pub struct DiskLog {
    db: Database,
    log: Keyspace,
    meta: Keyspace,
    /// The last compacted entry; the log starts after it.
    start: SnapshotMeta,
    /// Invariant: entries `[start.index + 1, last]` are stored.
    last: LogIndex,
    /// `(first index, term)` of each run of entries with one term, ascending, from
    /// `start.index + 1` (bounded by compaction, like the log).
    terms: Vec<(LogIndex, Term)>,
    /// `(first index, encoded bytes)` of each stored batch, ascending, for the compaction
    /// policy (bounded by compaction).
    batches: VecDeque<(LogIndex, u64)>,
    /// Sum of `batches`' bytes.
    log_bytes: u64,
    /// The most recent entries, so that applying them and sending them to followers does not
    /// read them back from fjall. Invariant: contiguous and ending at `last` (or empty).
    tail: VecDeque<Entry>,
    tail_bytes: usize,
}

/// Bytes of recent entries kept in memory.
const TAIL_CACHE_BYTES: usize = 32 << 20;

impl DiskLog {
    /// Makes `entries` (replacing any stored entry at or above the first one) and `hard_state`
    /// durable in one atomic batch; fsyncs if `sync`.
    ///
    /// # Errors
    /// A storage error; the database is then poisoned and the node must stop.
    pub fn append(
        &mut self,
        entries: &[Entry],
        hard_state: Option<HardState>,
        sync: bool,
    ) -> Result<(), StorageError> {
        let mut b = self.db.batch();
        if let Some(first) = entries.first() {
            let at = first.index;
            assert!(
                at <= self.last + 1,
                "append at {at} leaves a gap after {}",
                self.last
            );
            if at <= self.last {
                // Replace a conflicting suffix (rare: after a leader change): drop every batch
                // starting at or after `at`, and cut the batch that straddles it. The batches
                // are found in fjall itself, so that no index in memory grows with the log.
                for item in self.log.range(at.to_be_bytes()..) {
                    b.remove(&self.log, item.key().map_err(io_err)?);
                }
                if let Some(item) = self.log.range(..at.to_be_bytes()).next_back() {
                    let (k, batch) = read_batch(item)?;
                    if batch.last().is_some_and(|e| e.index >= at) {
                        let prefix: Vec<Entry> =
                            batch.into_iter().filter(|e| e.index < at).collect();
                        b.insert(&self.log, k.to_be_bytes().to_vec(), encode_batch(&prefix));
                    }
                }
            }
            let encoded = encode_batch(entries);
            while self.batches.back().is_some_and(|&(k, _)| k >= at) {
                if let Some((_, bytes)) = self.batches.pop_back() {
                    self.log_bytes -= bytes;
                }
            }
            self.batches.push_back((at, encoded.len() as u64));
            self.log_bytes += encoded.len() as u64;
            b.insert(&self.log, at.to_be_bytes().to_vec(), encoded);
        }
        if let Some(hs) = hard_state {
            let mut v = Vec::with_capacity(24);
            v.extend_from_slice(&hs.term.to_le_bytes());
            v.extend_from_slice(&hs.vote.to_le_bytes());
            v.extend_from_slice(&hs.commit.to_le_bytes());
            b.insert(&self.meta, KEY_HARD_STATE, v);
        }
        b.commit().map_err(io_err)?;
        if sync {
            self.db.persist(PersistMode::SyncData).map_err(io_err)?;
        }
        if let Some(first) = entries.first() {
            while self
                .terms
                .last()
                .is_some_and(|&(start, _)| start >= first.index)
            {
                self.terms.pop();
            }
            for e in entries {
                if self.terms.last().is_none_or(|&(_, t)| t != e.term) {
                    self.terms.push((e.index, e.term));
                }
            }
            self.last = entries.last().map_or(self.last, |e| e.index);
            self.cache_tail(entries);
        }
        Ok(())
    }

    /// The key (first index) of the stored batch that holds entry `index`.
    fn batch_holding(&self, index: LogIndex) -> Result<LogIndex, StorageError> {
        let k = self
            .log
            .range(..=index.to_be_bytes())
            .next_back()
            .ok_or_else(|| corrupt(format!("log entry {index} is missing")))?
            .key()
            .map_err(io_err)?;
        decode_index(&k).ok_or_else(|| corrupt(format!("log key {k:?}")))
    }

    /// The last compacted entry: the log starts after it.
    pub fn start(&self) -> SnapshotMeta {
        self.start
    }

    /// Encoded bytes of the stored log (an estimate: whole batches).
    pub fn log_bytes(&self) -> u64 {
        self.log_bytes
    }

    /// The index below which `keep_bytes` of the newest log remain (the start of the oldest
    /// batch needed to keep them).
    pub fn index_keeping_bytes(&self, keep_bytes: u64) -> LogIndex {
        let mut kept = 0u64;
        for &(first, bytes) in self.batches.iter().rev() {
            kept += bytes;
            if kept >= keep_bytes {
                return first.saturating_sub(1);
            }
        }
        self.start.index
    }

    /// Forgets every entry up to and including `index` (log compaction). The caller guarantees
    /// that the state machine has applied `index` and that the apply is in the journal before
    /// this (the journal is one ordered sequence, so a compaction that survives a crash implies
    /// the applies before it did). Deletes whole batches only; one that straddles `index` stays
    /// until a later compaction passes its end.
    ///
    /// # Errors
    /// A storage error; the node must stop.
    pub fn compact(&mut self, index: LogIndex) -> Result<(), StorageError> {
        if index <= self.start.index {
            return Ok(());
        }
        assert!(
            index <= self.last,
            "compacting to {index} beyond the log ({})",
            self.last
        );
        let term = self.term(index)?;
        let mut b = self.db.batch();
        // Every batch that ends at or before `index` (a batch ends where the next begins).
        while self.batches.len() >= 2 && self.batches[1].0 <= index + 1 {
            if let Some((k, bytes)) = self.batches.pop_front() {
                b.remove(&self.log, k.to_be_bytes().to_vec());
                self.log_bytes -= bytes;
            }
        }
        if index == self.last
            && let Some((k, bytes)) = self.batches.pop_front()
        {
            b.remove(&self.log, k.to_be_bytes().to_vec());
            self.log_bytes -= bytes;
        }
        let start = SnapshotMeta { index, term };
        b.insert(&self.meta, KEY_LOG_START, encode_meta(start));
        b.commit().map_err(io_err)?;
        self.start = start;
        let run = self.terms.partition_point(|&(s, _)| s <= index + 1);
        if run > 0 {
            self.terms.drain(..run - 1);
            if let Some(first) = self.terms.first_mut() {
                first.0 = first.0.max(index + 1);
            }
        }
        if index == self.last {
            self.terms.clear();
        }
        while self.tail.front().is_some_and(|e| e.index <= index) {
            if let Some(e) = self.tail.pop_front() {
                self.tail_bytes -= e.size_bytes();
            }
        }
        Ok(())
    }

    /// Adds to `b` the deletion of the whole log and a new start at `snap` (installing a
    /// snapshot). [`DiskLog::snapshot_installed`] updates memory once `b` is committed.
    pub(crate) fn drop_all_into(&self, b: &mut fjall::OwnedWriteBatch, snap: SnapshotMeta) {
        for &(k, _) in &self.batches {
            b.remove(&self.log, k.to_be_bytes().to_vec());
        }
        b.insert(&self.meta, KEY_LOG_START, encode_meta(snap));
    }

    pub(crate) fn snapshot_installed(&mut self, snap: SnapshotMeta) {
        self.start = snap;
        self.last = snap.index;
        self.terms.clear();
        self.batches.clear();
        self.log_bytes = 0;
        self.tail.clear();
        self.tail_bytes = 0;
    }

    fn cache_tail(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        while self.tail.back().is_some_and(|e| e.index >= first.index) {
            if let Some(e) = self.tail.pop_back() {
                self.tail_bytes -= e.size_bytes();
            }
        }
        if self.tail.back().is_some_and(|e| e.index + 1 != first.index) {
            self.tail.clear();
            self.tail_bytes = 0;
        }
        for e in entries {
            self.tail_bytes += e.size_bytes();
            self.tail.push_back(e.clone());
        }
        while self.tail_bytes > TAIL_CACHE_BYTES {
            if let Some(e) = self.tail.pop_front() {
                self.tail_bytes -= e.size_bytes();
            }
        }
    }
}

impl LogStore for DiskLog {
    fn first_index(&self) -> LogIndex {
        self.start.index + 1
    }

    fn last_index(&self) -> LogIndex {
        self.last
    }

    fn term(&self, index: LogIndex) -> Result<Term, StorageError> {
        if index < self.start.index {
            return Err(StorageError::Compacted(index));
        }
        if index == self.start.index {
            return Ok(self.start.term);
        }
        if index > self.last {
            return Err(StorageError::Unavailable(index));
        }
        let run = self.terms.partition_point(|&(start, _)| start <= index);
        Ok(self.terms[run - 1].1)
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
        if lo <= self.start.index {
            return Err(StorageError::Compacted(lo));
        }
        if hi > self.last + 1 {
            return Err(StorageError::Unavailable(hi - 1));
        }
        let mut out = Vec::with_capacity((hi - lo).min(1024) as usize);
        if let Some(first) = self.tail.front()
            && lo >= first.index
        {
            let range = (lo - first.index) as usize..(hi - first.index) as usize;
            return Ok(take_within_budget(
                self.tail.range(range).cloned(),
                max_bytes,
            ));
        }
        let mut bytes = 0usize;
        // The batch holding `lo`, and those after it.
        let from = self.batch_holding(lo)?;
        'batches: for item in self.log.range(from.to_be_bytes()..hi.to_be_bytes()) {
            let (_, batch) = read_batch(item)?;
            for e in batch {
                if e.index < lo {
                    continue;
                }
                if e.index >= hi {
                    break 'batches;
                }
                bytes += e.size_bytes();
                if !out.is_empty() && bytes > max_bytes {
                    break 'batches;
                }
                out.push(e);
            }
        }
        if out.first().is_none_or(|e| e.index != lo) {
            return Err(corrupt(format!("log entry {lo} is missing")));
        }
        Ok(out)
    }
}

/// The key (first index) and entries of a stored batch.
fn read_batch(item: fjall::Guard) -> Result<(LogIndex, Vec<Entry>), StorageError> {
    let (k, v) = item.into_inner().map_err(io_err)?;
    let first = decode_index(&k).ok_or_else(|| corrupt(format!("log key {k:?}")))?;
    let batch = decode_batch(first, &v).ok_or_else(|| corrupt(format!("log batch {first}")))?;
    Ok((first, batch))
}

/// A batch of consecutive entries in one value: per entry `term: u64 LE | kind: u8 |
/// len: u32 LE | data` (indexes follow from the key).
fn encode_batch(entries: &[Entry]) -> Vec<u8> {
    let mut v = Vec::with_capacity(entries.iter().map(|e| 13 + e.data.len()).sum());
    for e in entries {
        v.extend_from_slice(&e.term.to_le_bytes());
        v.push(match e.kind {
            EntryKind::Normal => 0,
            EntryKind::Noop => 1,
        });
        v.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
        v.extend_from_slice(&e.data);
    }
    v
}

fn decode_batch(first: LogIndex, v: &[u8]) -> Option<Vec<Entry>> {
    let v = Bytes::copy_from_slice(v);
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < v.len() {
        if v.len() < at + 13 {
            return None;
        }
        let term = u64_at(&v, at);
        let kind = match v[at + 8] {
            0 => EntryKind::Normal,
            1 => EntryKind::Noop,
            _ => return None,
        };
        let len = u32::from_le_bytes(v[at + 9..at + 13].try_into().ok()?) as usize;
        at += 13;
        if v.len() < at + len {
            return None;
        }
        out.push(Entry {
            index: first + out.len() as u64,
            term,
            kind,
            data: v.slice(at..at + len),
        });
        at += len;
    }
    (!out.is_empty()).then_some(out)
}

pub(crate) fn encode_meta(s: SnapshotMeta) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&s.index.to_le_bytes());
    v.extend_from_slice(&s.term.to_le_bytes());
    v
}

fn decode_index(k: &[u8]) -> Option<LogIndex> {
    Some(u64::from_be_bytes(k.try_into().ok()?))
}

pub(crate) fn decode_u64(v: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(v.try_into().ok()?))
}

pub(crate) fn u64_at(v: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&v[at..at + 8]);
    u64::from_le_bytes(b)
}
