//! The Raft log and hard state on fjall, implementing the core's [`LogStore`].

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use crate::raft::storage::take_within_budget;
use crate::raft::{
    Entry, EntryKind, HardState, LogIndex, LogStore, NodeId, SnapshotMeta, StorageError, Term,
};

use super::durable::{self, Watermark, WatermarkWriter};
use super::kv::{KvStore, sm_keyspace_generation};
use super::snapshot::Stager;

/// 2: the log may start after a compacted prefix (`log_start`), the applied index carries its
/// term, and the state machine's keyspaces come in generations. Format 1 directories are
/// upgraded in place when opened (they read the same, with no compacted prefix).
const FORMAT_VERSION: u64 = 2;
/// fjall's minimum.
/// fjall's journal cap when none is given (see [`open_with_journal`]).
pub const JOURNAL_BYTES_DEFAULT: u64 = 256 << 20;
/// fjall's minimum and default.
pub const JOURNAL_BYTES_MIN: u64 = 64 << 20;
pub const JOURNAL_BYTES_MAX: u64 = 512 << 20;
const KEY_NODE_ID: &[u8] = b"node_id";
const KEY_FORMAT: &[u8] = b"format";
const KEY_HARD_STATE: &[u8] = b"hard_state";
/// The last compacted entry (index, term as u64 LE): the log starts after it.
pub(crate) const KEY_LOG_START: &[u8] = b"log_start";
/// A node that lost its durable state and rejoins: (vote floor, catch-up index (0 once caught
/// up), the term of its own entry there (`u64::MAX`: unknown)), u64 LE each (see
/// `Raft::set_rejoin`; records of 16 bytes, from before the term, read as unknown).
const KEY_REJOIN: &[u8] = b"rejoin";
/// Log batches stored at or after this index carry a checksum (u64 LE; older ones, from
/// before checksums, do not).
const KEY_LOG_CHECKSUMS_FROM: &[u8] = b"log_checksums_from";

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
    /// State the node had made durable is gone or damaged: it must not vote, lead or serve
    /// from what is left.
    #[error(
        "data directory {dir} is damaged: {what}. This node must not vote or serve from it, or acknowledged writes could be lost. Repair it with `raftkv node --repair` (the damaged directory is moved aside and the node catches up from the leader by snapshot; the rest of the cluster must be up), or restore the directory from a backup"
    )]
    Damaged { dir: PathBuf, what: String },
    #[error("data directory {dir} is in use by another raftkv process (is node already running?)")]
    Locked { dir: PathBuf },
    /// The cause follows in the error chain.
    #[error("cannot open data directory {dir}")]
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

/// A fjall error as a storage error: its readable message, said once (no cause in the chain
/// that repeats it).
pub fn io_err(e: fjall::Error) -> StorageError {
    StorageError::Io {
        what: FjallError(e).to_string(),
        source: None,
    }
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
    /// Set on a node that lost its durable state: the term it must not vote in again (or
    /// before), and the commit index to reach before it votes at all (`None`: reached).
    pub rejoin: Option<(Term, Option<(LogIndex, Term)>)>,
    /// The directory was created just now (no node id was stored in it).
    pub is_new: bool,
}

/// Opens (creating if new) the data directory of node `id`.
///
/// # Errors
/// If the directory belongs to another node, has another format, is locked or unreadable.
pub fn open(dir: &Path, id: NodeId) -> Result<Recovered, OpenError> {
    open_with_journal(dir, id, JOURNAL_BYTES_DEFAULT)
}

/// [`open`] with fjall's journal capped at `journal_bytes` (clamped to 64-512 MiB). A small
/// cap bounds the data directory more tightly but makes fjall flush memtables, and stall
/// writes, more often: with 64 MiB and 1.6 KB values, leaders stepped down about twice as
/// often as with 512 MiB.
///
/// # Errors
/// As [`open`].
pub fn open_with_journal(
    dir: &Path,
    id: NodeId,
    journal_bytes: u64,
) -> Result<Recovered, OpenError> {
    let journal_bytes = journal_bytes.clamp(JOURNAL_BYTES_MIN, JOURNAL_BYTES_MAX);
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
        .max_journaling_size(journal_bytes)
        .open()
    {
        Ok(db) => db,
        Err(fjall::Error::Locked) => {
            return Err(OpenError::Locked {
                dir: dir.to_path_buf(),
            });
        }
        Err(
            e @ (fjall::Error::JournalRecovery(_)
            | fjall::Error::InvalidTrailer
            | fjall::Error::InvalidTag(_)
            | fjall::Error::Decompress(_)),
        ) => {
            return Err(OpenError::Damaged {
                dir: dir.to_path_buf(),
                what: format!(
                    "its journal ({}) cannot be read back ({})",
                    dir.join("*.jnl").display(),
                    FjallError(e)
                ),
            });
        }
        Err(e) => return Err(wrap(io_err(e))),
    };
    // What fjall recovered may include writes that reached only the page cache before a
    // crash: make it durable before anything (the watermark) is derived from it.
    db.persist(PersistMode::SyncAll)
        .map_err(io_err)
        .map_err(wrap)?;
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
    let damaged = |what: String| OpenError::Damaged {
        dir: dir.to_path_buf(),
        what,
    };
    let watermark = durable::read(dir).map_err(|e| damaged(e.to_string()))?;

    let stored_id = meta.get(KEY_NODE_ID).map_err(io_err).map_err(wrap)?;
    let is_new = stored_id.is_none();
    match stored_id {
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

    let checksums_from = match meta
        .get(KEY_LOG_CHECKSUMS_FROM)
        .map_err(io_err)
        .map_err(wrap)?
    {
        Some(v) if v.len() == 8 => Some(u64_at(&v, 0)),
        Some(_) => return Err(corrupt("log_checksums_from")),
        None => None,
    };

    // Rebuild the term index and the batch sizes, checking that the log is contiguous from
    // its start, that every checksum matches and that terms never decrease. The first batch
    // may straddle the start (compaction keeps it whole).
    let mut terms: Vec<(LogIndex, Term)> = Vec::new();
    let mut batches: VecDeque<(LogIndex, u64)> = VecDeque::new();
    let mut last = start.index;
    for item in log.iter() {
        let (k, v) = item.into_inner().map_err(io_err).map_err(wrap)?;
        let first = decode_index(&k).ok_or_else(|| corrupt("log key"))?;
        let checked = checksums_from.is_some_and(|c| first >= c);
        let entries = decode_batch(first, &v, checked).ok_or_else(|| {
            damaged(format!(
                "the log batch that starts at entry {first} fails its checksum or cannot be decoded (keyspace `log` in {})",
                dir.display()
            ))
        })?;
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
            let prev = terms.last().map_or(start.term, |&(_, t)| t);
            if e.term < prev {
                return Err(damaged(format!(
                    "log entry {} has term {}, lower than the term {prev} before it",
                    e.index, e.term
                )));
            }
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
    let last_term = terms.last().map_or(start.term, |&(_, t)| t);
    // Every applied entry was durable in the log before it was applied, and the commit index
    // never passes the durable log: the journal is one ordered sequence, so if either lies
    // beyond the log, entries were lost after they were made durable.
    if kv.applied() > last {
        return Err(damaged(format!(
            "the state machine has applied entry {}, but the log ends at entry {last}",
            kv.applied()
        )));
    }
    if hard_state.commit > last {
        return Err(damaged(format!(
            "entry {} was committed here, but the log ends at entry {last}",
            hard_state.commit
        )));
    }
    if let Some(w) = watermark {
        if (last_term, last) < (w.last_term, w.last_index) {
            return Err(damaged(format!(
                "the log ends at entry {last} (term {last_term}), but entry {} (term {}) had been made durable ({})",
                w.last_index,
                w.last_term,
                dir.join(durable::FILE).display()
            )));
        }
        if hard_state.term < w.term
            || (hard_state.term == w.term && w.vote != 0 && hard_state.vote != w.vote)
        {
            return Err(damaged(format!(
                "the stored term and vote ({}, {}) are older than what had been made durable ({}, {}): a vote this node cast may be lost",
                hard_state.term, hard_state.vote, w.term, w.vote
            )));
        }
    }
    let checksums_from = match checksums_from {
        Some(c) => c,
        None => {
            // From here on (a new directory, or one from before checksums).
            meta.insert(KEY_LOG_CHECKSUMS_FROM, (last + 1).to_le_bytes().to_vec())
                .map_err(io_err)
                .map_err(wrap)?;
            last + 1
        }
    };
    kv.delete_stale_generations().map_err(wrap)?;
    let rejoin = match meta.get(KEY_REJOIN).map_err(io_err).map_err(wrap)? {
        Some(v) if v.len() == 16 || v.len() == 24 => {
            let catch_up = u64_at(&v, 8);
            let term = if v.len() == 24 {
                u64_at(&v, 16)
            } else {
                Term::MAX
            };
            Some((u64_at(&v, 0), (catch_up != 0).then_some((catch_up, term))))
        }
        Some(_) => return Err(corrupt("rejoin")),
        None => None,
    };
    if let Some(w) = watermark
        && w.catch_up > rejoin.and_then(|(_, c)| c).map_or(0, |c| c.0)
    {
        // The record that keeps this node from voting before it has caught up is gone.
        return Err(damaged(format!(
            "this node was rejoining and must catch up to entry {} before it votes ({}), but its rejoin record is missing",
            w.catch_up,
            dir.join(durable::FILE).display()
        )));
    }
    let mark = Watermark {
        last_index: last,
        last_term,
        term: hard_state.term,
        vote: hard_state.vote,
        cluster_id: kv.cluster_id(),
        catch_up: rejoin.and_then(|(_, c)| c).map_or(0, |c| c.0),
        catch_up_term: rejoin
            .and_then(|(_, c)| c)
            .map_or(0, |c| if c.1 == Term::MAX { 0 } else { c.1 }),
    };
    let watermark = WatermarkWriter::start(dir, mark, watermark != Some(mark)).map_err(wrap)?;
    if kv.applied() < start.index {
        return Err(corrupt(&format!(
            "the log starts after entry {}, but the state machine has applied only up to {}",
            start.index,
            kv.applied()
        )));
    }
    let hard_state = HardState {
        commit: hard_state.commit.max(start.index),
        ..hard_state
    };
    let log_bytes = batches.iter().map(|&(_, b)| b).sum();
    Ok(Recovered {
        rejoin,
        is_new,
        log: DiskLog {
            db,
            log,
            meta,
            start,
            last,
            terms,
            batches,
            log_bytes,
            checksums_from,
            watermark,
            durable_hard_state: hard_state,
            tail: VecDeque::new(),
            tail_bytes: 0,
            last_fsync: None,
        },
        kv,
        hard_state,
        stager,
    })
}

/// `raftkv node --repair`: replaces the (damaged) data directory `dir` of node `id` by an
/// empty one that keeps the node's identity: its id, its cluster, and the term and vote it last
/// made durable (from the watermark, if readable). The old directory is moved aside, not
/// deleted. The new one is built and synced under a temporary name first and then renamed into
/// place, so that a crash never leaves an empty directory without its rejoin record. The node
/// rejoins (`Raft::set_rejoin`): no votes in terms up to the highest it or its peers
/// (`peers_term`) knew, and none at all until its commit index reaches both the last index it
/// had made durable (its watermark) and what its peers had committed (`peers_commit`). Returns
/// where the old directory went and the watermark read from it.
///
/// # Errors
/// If `dir` does not exist or cannot be moved, or the new one cannot be created.
pub fn repair(
    dir: &Path,
    id: NodeId,
    peers_term: Term,
    peers_commit: Option<LogIndex>,
) -> Result<(PathBuf, Watermark), OpenError> {
    let wrap = |source| OpenError::Storage {
        dir: dir.to_path_buf(),
        source,
    };
    if !dir.exists() {
        return Err(wrap(StorageError::Io {
            what: "there is no data directory to repair".into(),
            source: None,
        }));
    }
    let w = durable::read(dir).ok().flatten().unwrap_or_default();
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "node".into());
    // A second repair within the same second gets a name of its own.
    let aside = (1..)
        .map(|n: u32| match n {
            1 => dir.with_file_name(format!("{name}.damaged-{secs}")),
            n => dir.with_file_name(format!("{name}.damaged-{secs}-{n}")),
        })
        .find(|p| !p.exists())
        .expect("an unused name");
    let fresh = dir.with_file_name(format!("{name}.repairing"));
    let io = |what: String, e: std::io::Error| wrap(StorageError::io(what, e));
    if fresh.exists() {
        std::fs::remove_dir_all(&fresh)
            .map_err(|e| io(format!("removing {}", fresh.display()), e))?;
    }
    let floor = w.term.max(peers_term);
    {
        let r = open(&fresh, id)?;
        let mut b = r.log.db.batch();
        let hs = HardState {
            term: floor,
            vote: if floor == w.term { w.vote } else { 0 },
            commit: 0,
        };
        b.insert(&r.log.meta, KEY_HARD_STATE, encode_hard_state(hs));
        // Every entry this node acknowledged is at or below its watermark, and one of them may
        // be committed on the strength of that acknowledgement alone; a peer's commit index can
        // be lower (a lagging peer answered, the leader did not). Waiting only for the peers'
        // commit lost committed entries in the simulator.
        // A node repaired again before it caught up waits for what it waited for before. Each
        // index comes with the term of this node's entry there (unknown: `u64::MAX`; what the
        // peers committed is reached anyway), so that the core can lower the target once the
        // leader's log shows those entries were overwritten (`Raft::set_rejoin`).
        let known = |t: Term| if t == 0 { Term::MAX } else { t };
        let catch_up = [
            (peers_commit.unwrap_or(0), Term::MAX),
            (w.last_index, known(w.last_term)),
            (w.catch_up, known(w.catch_up_term)),
        ]
        .into_iter()
        .max()
        .unwrap_or((0, Term::MAX));
        b.insert(
            &r.log.meta,
            KEY_REJOIN,
            encode_rejoin(floor, Some(catch_up)),
        );
        if w.cluster_id != 0 {
            b.insert(
                &r.log.meta,
                super::kv::KEY_CLUSTER_ID,
                w.cluster_id.to_le_bytes().to_vec(),
            );
        }
        b.commit().map_err(io_err).map_err(wrap)?;
        r.log
            .db
            .persist(PersistMode::SyncAll)
            .map_err(io_err)
            .map_err(wrap)?;
        r.log
            .watermark
            .write_now(Watermark {
                last_index: 0,
                last_term: 0,
                term: hs.term,
                vote: hs.vote,
                cluster_id: w.cluster_id,
                catch_up: catch_up.0,
                catch_up_term: if catch_up.1 == Term::MAX {
                    0
                } else {
                    catch_up.1
                },
            })
            .map_err(wrap)?;
    }
    std::fs::rename(dir, &aside).map_err(|e| io(format!("moving it to {}", aside.display()), e))?;
    std::fs::rename(&fresh, dir)
        .map_err(|e| io(format!("moving {} into place", fresh.display()), e))?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent).map_err(wrap)?;
    }
    Ok((aside, w))
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
    /// Batches stored at or after this index carry a checksum.
    checksums_from: LogIndex,
    /// Records what is durable, apart from the journal (see [`durable`]).
    watermark: WatermarkWriter,
    /// The hard state last made durable.
    durable_hard_state: HardState,
    /// The most recent entries, so that applying them and sending them to followers does not
    /// read them back from fjall. Invariant: contiguous and ending at `last` (or empty).
    tail: VecDeque<Entry>,
    tail_bytes: usize,
    /// How long the last append's fsync took, until the runtime takes it.
    last_fsync: Option<std::time::Duration>,
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
                    let (k, batch) = read_batch(item, self.checksums_from)?;
                    if batch.last().is_some_and(|e| e.index >= at) {
                        let prefix: Vec<Entry> =
                            batch.into_iter().filter(|e| e.index < at).collect();
                        let checked = k >= self.checksums_from;
                        let cut = encode_batch(k, &prefix, checked);
                        // The log's size follows the cut batch's new size.
                        if let Some(last) = self.batches.iter_mut().rev().find(|(bk, _)| *bk == k) {
                            self.log_bytes = self.log_bytes - last.1 + cut.len() as u64;
                            last.1 = cut.len() as u64;
                        }
                        b.insert(&self.log, k.to_be_bytes().to_vec(), cut);
                    }
                }
                // The log shrinks legitimately: lower the watermark first, so that a crash
                // before this write is not taken for damage.
                let mut w = self.watermark.current();
                w.last_index = at - 1;
                w.last_term = self.term(at - 1)?;
                self.watermark.write_now(w)?;
            }
            let encoded = encode_batch(at, entries, at >= self.checksums_from);
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
            b.insert(&self.meta, KEY_HARD_STATE, encode_hard_state(hs));
        }
        b.commit().map_err(io_err)?;
        if sync {
            let started = std::time::Instant::now();
            self.db.persist(PersistMode::SyncData).map_err(io_err)?;
            self.last_fsync = Some(started.elapsed());
            if let Some(hs) = hard_state {
                self.durable_hard_state = hs;
            }
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
        if sync {
            let mut w = self.watermark.current();
            w.last_index = self.last;
            w.last_term = self.term(self.last)?;
            w.term = self.durable_hard_state.term;
            w.vote = self.durable_hard_state.vote;
            self.watermark.set(w);
        }
        Ok(())
    }

    /// Records (durably) that this node rejoins without its former state: see
    /// `Raft::set_rejoin`. `catch_up_to: None` records that it has caught up.
    pub fn set_rejoin(
        &self,
        vote_floor: Term,
        catch_up_to: Option<(LogIndex, Term)>,
    ) -> Result<(), StorageError> {
        let mut w = self.watermark.current();
        w.catch_up = catch_up_to.map_or(0, |c| c.0);
        w.catch_up_term = catch_up_to.map_or(0, |c| if c.1 == Term::MAX { 0 } else { c.1 });
        if catch_up_to.is_none() {
            // Caught up: the watermark first, so that a crash in between leaves the record
            // (the node rejoins again), never a watermark that says a record is missing.
            self.watermark.write_now(w)?;
        }
        self.meta
            .insert(KEY_REJOIN, encode_rejoin(vote_floor, catch_up_to))
            .map_err(io_err)?;
        self.db.persist(PersistMode::SyncAll).map_err(io_err)?;
        if catch_up_to.is_some() {
            // The record first: a watermark never names a record that is not there.
            self.watermark.write_now(w)?;
        }
        Ok(())
    }

    /// The cluster id became known; the watermark keeps it too.
    pub fn set_cluster_id(&self, id: u64) {
        let mut w = self.watermark.current();
        if w.cluster_id != id {
            w.cluster_id = id;
            self.watermark.set(w);
        }
    }

    /// Before a snapshot's install drops the log: lowers the watermark to the snapshot if that
    /// is lower (a crash before the install is durable then finds the old log above it).
    pub(crate) fn before_install(&self, snap: SnapshotMeta) -> Result<(), StorageError> {
        let mut w = self.watermark.current();
        if (snap.term, snap.index) < (w.last_term, w.last_index) {
            w.last_index = snap.index;
            w.last_term = snap.term;
            self.watermark.write_now(w)?;
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
    /// How long the last fsync of an append took, once (for the fsync latency metric).
    pub fn take_fsync_time(&mut self) -> Option<std::time::Duration> {
        self.last_fsync.take()
    }

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
        // Synced at once: the log keyspace's tables must never get ahead of `log_start` in a
        // recovery (fjall recovers each keyspace from its own flushed state).
        self.db.persist(PersistMode::SyncData).map_err(io_err)?;
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

    /// The install batch is committed and synced: the log now starts after `snap`, and so does
    /// the watermark.
    pub(crate) fn snapshot_installed(&mut self, snap: SnapshotMeta) {
        let mut w = self.watermark.current();
        w.last_index = snap.index;
        w.last_term = snap.term;
        self.watermark.set(w);
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
            let (_, batch) = read_batch(item, self.checksums_from)?;
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
fn read_batch(
    item: fjall::Guard,
    checksums_from: LogIndex,
) -> Result<(LogIndex, Vec<Entry>), StorageError> {
    let (k, v) = item.into_inner().map_err(io_err)?;
    let first = decode_index(&k).ok_or_else(|| corrupt(format!("log key {k:?}")))?;
    let batch = decode_batch(first, &v, first >= checksums_from).ok_or_else(|| {
        corrupt(format!(
            "the log batch that starts at entry {first} fails its checksum"
        ))
    })?;
    Ok((first, batch))
}

/// A batch of consecutive entries in one value: per entry `term: u64 LE | kind: u8 |
/// len: u32 LE | data` (indexes follow from the key).
///
/// A checked batch ends with `xxh3-64(first index BE | the entries)` (u64 LE).
fn encode_batch(first: LogIndex, entries: &[Entry], checked: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(entries.iter().map(|e| 13 + e.data.len()).sum::<usize>() + 8);
    for e in entries {
        v.extend_from_slice(&e.term.to_le_bytes());
        v.push(match e.kind {
            EntryKind::Normal => 0,
            EntryKind::Noop => 1,
            EntryKind::ConfChange => 2,
        });
        v.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
        v.extend_from_slice(&e.data);
    }
    if checked {
        let sum = batch_checksum(first, &v);
        v.extend_from_slice(&sum.to_le_bytes());
    }
    v
}

fn batch_checksum(first: LogIndex, entries: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&first.to_be_bytes());
    h.update(entries);
    h.digest()
}

fn decode_batch(first: LogIndex, v: &[u8], checked: bool) -> Option<Vec<Entry>> {
    let v = if checked {
        let (entries, sum) = v.split_at_checked(v.len().checked_sub(8)?)?;
        if batch_checksum(first, entries) != u64::from_le_bytes(sum.try_into().ok()?) {
            return None;
        }
        entries
    } else {
        v
    };
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
            2 => EntryKind::ConfChange,
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

/// `term | vote | commit`, u64 LE each.
fn encode_hard_state(hs: HardState) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    v.extend_from_slice(&hs.term.to_le_bytes());
    v.extend_from_slice(&hs.vote.to_le_bytes());
    v.extend_from_slice(&hs.commit.to_le_bytes());
    v
}

/// `vote floor | catch-up index (0: caught up)`, u64 LE each.
fn encode_rejoin(vote_floor: Term, catch_up_to: Option<(LogIndex, Term)>) -> Vec<u8> {
    let (index, term) = catch_up_to.unwrap_or((0, Term::MAX));
    let mut v = vote_floor.to_le_bytes().to_vec();
    v.extend_from_slice(&index.to_le_bytes());
    v.extend_from_slice(&term.to_le_bytes());
    v
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A rejoin record as 6b19b02..a087ce8 wrote it (16 bytes, no term) still opens, with the
    /// term unknown, so that the node waits for the whole catch-up index as it did then.
    #[test]
    fn a_rejoin_record_from_before_its_term_opens() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let r = open(dir.path(), 1).expect("open");
            let mut old = 4u64.to_le_bytes().to_vec();
            old.extend_from_slice(&9u64.to_le_bytes());
            r.log.meta.insert(KEY_REJOIN, old).expect("insert");
            r.log.db.persist(PersistMode::SyncAll).expect("persist");
        }
        let r = open(dir.path(), 1).expect("reopen");
        assert_eq!(r.rejoin, Some((4, Some((9, Term::MAX)))));
    }
}
