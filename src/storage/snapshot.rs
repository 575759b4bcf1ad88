//! Snapshots of the state machine, without a snapshot file: the fjall state machine *is* the
//! snapshot (Raft dissertation 5.2; etcd v3, dragonboat's on-disk state machine).
//!
//! 1. Sending: [`KvStore::snapshot_source`](super::KvStore::snapshot_source) takes a fjall
//!    snapshot (a point-in-time view across keyspaces; writes go on) with the applied index and
//!    term it holds. [`ChunkReader`] turns it into chunks of encoded records: every key-value
//!    pair in key order, then every client-session record (the session table is part of the
//!    replicated state: without it a retried write could apply twice after an install).
//! 2. Receiving: [`Stager::stage`] writes the chunks into a fresh generation of keyspaces with
//!    fjall's bulk ingestion (tables written and fsynced directly, not through the journal),
//!    apart from the live state. Keys must arrive in ascending order (fjall panics otherwise),
//!    so the order is checked here and a stream that breaks it is refused.
//! 3. Installing: [`super::install_snapshot`] switches the live generation and drops the log in
//!    one batch, then fsyncs. A crash at any point leaves either the old state or the new one.
//!
//! Record: `tag: u8 (0 kv, 1 session) | key_len: u32 LE | key | value_len: u32 LE | value`.
//! Each chunk travels with an xxh3-64 checksum of its bytes; the last one also carries the
//! number of records and bytes, so that a truncated stream is detected.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use fjall::{Database, Keyspace, Readable};

use crate::raft::{LogIndex, SnapshotMeta, StorageError};

use super::disk::{corrupt, io_err, sync_dir};
use super::kv::{Session, StagedState, decode_sessions, open_sm_keyspace, sm_keyspace_names};

/// The version of the snapshot stream's record format.
pub const SNAPSHOT_FORMAT: u32 = 1;
/// Bytes of records per chunk (a single larger record goes alone).
pub const CHUNK_BYTES: usize = 2 << 20;
const TAG_KV: u8 = 0;
const TAG_SESSION: u8 = 1;

/// The checksum of a chunk's bytes.
pub fn checksum(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

/// A point-in-time view of the state machine at `meta`.
pub struct SnapshotSource {
    pub(crate) snapshot: fjall::Snapshot,
    pub(crate) kv: Keyspace,
    pub(crate) sessions: Keyspace,
    pub meta: SnapshotMeta,
    /// The configuration in force at `meta.index`, if the state machine holds one.
    pub config: Option<crate::raft::ClusterConfig>,
}

impl SnapshotSource {
    pub fn chunks(self) -> ChunkReader {
        ChunkReader {
            kv: self.snapshot.iter(&self.kv),
            sessions: self.snapshot.iter(&self.sessions),
            _snapshot: self.snapshot,
            records: 0,
            bytes: 0,
        }
    }
}

/// Reads a snapshot as chunks of records (blocking reads; run it off the async runtime).
pub struct ChunkReader {
    kv: fjall::Iter,
    sessions: fjall::Iter,
    _snapshot: fjall::Snapshot,
    /// Records and record bytes read so far.
    pub records: u64,
    pub bytes: u64,
}

impl ChunkReader {
    /// The next chunk, or `None` at the end.
    ///
    /// # Errors
    /// A storage error reading the snapshot.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, StorageError> {
        let mut out = Vec::with_capacity(CHUNK_BYTES + 4096);
        while out.len() < CHUNK_BYTES {
            let (tag, item) = match self.kv.next() {
                Some(item) => (TAG_KV, item),
                None => match self.sessions.next() {
                    Some(item) => (TAG_SESSION, item),
                    None => break,
                },
            };
            let (k, v) = item.into_inner().map_err(io_err)?;
            let before = out.len();
            out.push(tag);
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(&k);
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(&v);
            self.records += 1;
            self.bytes += (out.len() - before) as u64;
        }
        Ok((!out.is_empty()).then_some(out))
    }
}

/// Splits a chunk into its records.
fn records(chunk: &[u8]) -> impl Iterator<Item = Result<(u8, &[u8], &[u8]), StorageError>> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at >= chunk.len() {
            return None;
        }
        let bad = || Some(Err(corrupt("snapshot record truncated")));
        let tag = chunk[at];
        let len_at = |i: usize| -> Option<usize> {
            Some(u32::from_le_bytes(chunk.get(i..i + 4)?.try_into().ok()?) as usize)
        };
        let Some(klen) = len_at(at + 1) else {
            return bad();
        };
        let k_at = at + 5;
        let Some(vlen) = len_at(k_at + klen) else {
            return bad();
        };
        let v_at = k_at + klen + 4;
        if chunk.len() < v_at + vlen {
            return bad();
        }
        at = v_at + vlen;
        Some(Ok((
            tag,
            &chunk[k_at..k_at + klen],
            &chunk[v_at..v_at + vlen],
        )))
    })
}

/// Counts the key-value and session records of a chunk.
///
/// # Errors
/// A malformed record.
pub fn count_records(chunk: &[u8]) -> Result<(u64, u64), StorageError> {
    let (mut kv, mut sessions) = (0, 0);
    for r in records(chunk) {
        match r?.0 {
            TAG_KV => kv += 1,
            TAG_SESSION => sessions += 1,
            t => return Err(corrupt(format!("snapshot record of unknown kind {t}"))),
        }
    }
    Ok((kv, sessions))
}

/// Seeds an empty data directory `dir` for node `id` of a new cluster `cluster_id` with a
/// snapshot at `meta` (`raftkv snapshot restore`): its state machine is the snapshot's, its log
/// starts after it, its term is the snapshot's.
///
/// # Errors
/// A malformed snapshot or a storage error; the caller removes `dir`.
pub fn restore(
    dir: &Path,
    id: crate::raft::NodeId,
    meta: SnapshotMeta,
    cluster_id: u64,
    chunks: impl Iterator<Item = Result<Vec<u8>, String>>,
) -> Result<u64, super::disk::OpenError> {
    let wrap = |source| super::disk::OpenError::Storage {
        dir: dir.to_path_buf(),
        source,
    };
    let mut r = super::open(dir, id)?;
    let mut staged = r.stager.stage(meta, chunks).map_err(wrap)?;
    staged.cluster_id = cluster_id;
    let records = staged.records;
    super::install_snapshot(&mut r.log, &mut r.kv, staged).map_err(wrap)?;
    let hs = crate::raft::HardState {
        term: meta.term,
        vote: 0,
        commit: meta.index,
    };
    r.log.append(&[], Some(hs), true).map_err(wrap)?;
    Ok(records)
}

/// Stages received snapshots in fresh keyspace generations of one node's database. Cheap to
/// clone; used by the peer service while the core runs.
#[derive(Clone)]
pub struct Stager {
    db: Database,
    dir: PathBuf,
    next_generation: Arc<AtomicU64>,
}

impl Stager {
    pub(crate) fn new(db: Database, dir: &Path, next_generation: u64) -> Self {
        Stager {
            db,
            dir: dir.to_path_buf(),
            next_generation: Arc::new(AtomicU64::new(next_generation)),
        }
    }

    /// Writes a snapshot at `meta` from `chunks` into a new generation of keyspaces and makes
    /// it durable. Blocking. On any error the partial staging is deleted.
    ///
    /// # Errors
    /// A broken stream (the iterator's error), records out of order or malformed, or storage.
    pub fn stage(
        &self,
        meta: SnapshotMeta,
        chunks: impl Iterator<Item = Result<Vec<u8>, String>>,
    ) -> Result<StagedState, StorageError> {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let (kv_name, sessions_name) = sm_keyspace_names(generation);
        let kv = open_sm_keyspace(&self.db, &kv_name)?;
        let sessions = open_sm_keyspace(&self.db, &sessions_name)?;
        let result = self.ingest(&kv, &sessions, chunks);
        match result {
            Ok((session_table, records)) => {
                sync_dir(&self.dir.join("keyspaces"))?;
                Ok(StagedState {
                    meta,
                    generation,
                    kv,
                    sessions,
                    session_table,
                    records,
                    cluster_id: 0,
                    config: None,
                })
            }
            Err(e) => {
                let _ = self.db.delete_keyspace(kv);
                let _ = self.db.delete_keyspace(sessions);
                Err(e)
            }
        }
    }

    fn ingest(
        &self,
        kv: &Keyspace,
        sessions: &Keyspace,
        chunks: impl Iterator<Item = Result<Vec<u8>, String>>,
    ) -> Result<(super::kv::SessionTable, u64), StorageError> {
        let mut kv_in = Some(kv.start_ingestion().map_err(io_err)?);
        let mut sessions_in = None;
        let mut last_key: Option<Vec<u8>> = None;
        let mut cache = std::collections::HashMap::<u64, Session>::new();
        let mut record_keys: Vec<LogIndex> = Vec::new();
        let mut count = 0u64;
        for chunk in chunks {
            let chunk = chunk.map_err(|e| StorageError::Io {
                what: format!("snapshot stream broke: {e}"),
                source: None,
            })?;
            for r in records(&chunk) {
                let (tag, k, v) = r?;
                if k.is_empty() {
                    return Err(corrupt("snapshot record with an empty key"));
                }
                if last_key.as_deref().is_some_and(|last| k <= last)
                    && !(tag == TAG_SESSION && sessions_in.is_none())
                {
                    return Err(corrupt("snapshot keys out of order"));
                }
                match tag {
                    TAG_KV if sessions_in.is_none() => {
                        if let Some(ing) = kv_in.as_mut() {
                            ing.write(k.to_vec(), v.to_vec()).map_err(io_err)?;
                        }
                    }
                    TAG_SESSION => {
                        if sessions_in.is_none() {
                            if let Some(ing) = kv_in.take() {
                                ing.finish().map_err(io_err)?;
                            }
                            sessions_in = Some(sessions.start_ingestion().map_err(io_err)?);
                        }
                        let key = <[u8; 8]>::try_from(k)
                            .map(u64::from_be_bytes)
                            .map_err(|_| corrupt("snapshot session key"))?;
                        decode_sessions(v, &mut cache)
                            .ok_or_else(|| corrupt("snapshot session record"))?;
                        record_keys.push(key);
                        if let Some(ing) = sessions_in.as_mut() {
                            ing.write(k.to_vec(), v.to_vec()).map_err(io_err)?;
                        }
                    }
                    _ => return Err(corrupt("snapshot record of unknown kind or order")),
                }
                last_key = Some(k.to_vec());
                count += 1;
            }
        }
        if let Some(ing) = kv_in.take() {
            ing.finish().map_err(io_err)?;
        }
        if let Some(ing) = sessions_in.take() {
            ing.finish().map_err(io_err)?;
        }
        Ok(((cache, record_keys), count))
    }

    /// Deletes a staged snapshot that will not be installed.
    pub fn discard(&self, staged: StagedState) {
        let _ = self.db.delete_keyspace(staged.kv);
        let _ = self.db.delete_keyspace(staged.sessions);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::raft::{Entry, LogStore};
    use crate::storage::{ApplyOutcome, install_snapshot, open};

    fn put(index: LogIndex, client: u64, seq: u64, k: &str, v: &str) -> Entry {
        crate::storage::testutil::put_entry(index, 2, client, seq, k, v)
    }

    fn chunks_of(source: SnapshotSource) -> Vec<Vec<u8>> {
        let mut r = source.chunks();
        let mut out = Vec::new();
        while let Some(c) = r.next_chunk().expect("read") {
            out.push(c);
        }
        out
    }

    #[test]
    fn compaction_drops_whole_batches_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut r = open(dir.path(), 1).expect("open");
            for first in [1u64, 5, 9] {
                let batch: Vec<Entry> = (first..first + 4)
                    .map(|i| put(i, 0, 0, &format!("k{i}"), "v"))
                    .collect();
                r.log.append(&batch, None, true).expect("append");
                r.kv.apply(&batch).expect("apply");
            }
            let bytes = r.log.log_bytes();
            r.log.compact(6).expect("compact");
            assert!(r.log.log_bytes() < bytes, "the first batch is gone");
            assert_eq!(r.log.first_index(), 7);
            assert_eq!(r.log.term(6).expect("term"), 2);
            assert!(matches!(r.log.term(5), Err(StorageError::Compacted(5))));
            assert!(matches!(
                r.log.entries(6, 8, usize::MAX),
                Err(StorageError::Compacted(6))
            ));
        }
        let mut r = open(dir.path(), 1).expect("reopen");
        assert_eq!((r.log.first_index(), r.log.last_index()), (7, 12));
        let got = r.log.entries(7, 13, usize::MAX).expect("entries");
        assert_eq!(
            got.iter().map(|e| e.index).collect::<Vec<_>>(),
            (7..=12).collect::<Vec<_>>()
        );
        // Compacting everything leaves an empty log that starts after the last entry.
        r.log.compact(12).expect("compact");
        assert_eq!(r.log.log_bytes(), 0);
        drop(r);
        let mut r = open(dir.path(), 1).expect("reopen");
        assert_eq!((r.log.first_index(), r.log.last_index()), (13, 12));
        assert_eq!(r.log.term(12).expect("term"), 2);
        assert_eq!(r.hard_state.commit, 12, "the log's start is committed");
        r.log
            .append(&[put(13, 0, 0, "k13", "v")], None, true)
            .expect("append after compaction");
        assert_eq!(r.log.last_index(), 13);
    }

    #[test]
    fn snapshot_streams_while_writes_go_on_and_installs_atomically() {
        let a_dir = tempfile::tempdir().expect("tempdir");
        let b_dir = tempfile::tempdir().expect("tempdir");
        let mut a = open(a_dir.path(), 1).expect("open");
        let batch: Vec<Entry> = (1..=300)
            .map(|i| {
                put(
                    i,
                    1 + i % 3,
                    i,
                    &format!("key{i:05}"),
                    &"x".repeat(i as usize),
                )
            })
            .collect();
        a.kv.apply(&batch).expect("apply");
        let source = a.kv.snapshot_source();
        assert_eq!(
            source.meta,
            SnapshotMeta {
                index: 300,
                term: 2
            }
        );
        // Written after the snapshot was taken: not in it.
        a.kv.apply(&[put(301, 9, 1, "late", "v")]).expect("apply");
        let chunks = chunks_of(source);

        let mut b = open(b_dir.path(), 2).expect("open");
        b.log
            .append(
                &[put(1, 0, 0, "old", "v"), put(2, 0, 0, "old2", "v")],
                None,
                true,
            )
            .expect("append");
        b.kv.apply(&[put(1, 0, 0, "old", "v")]).expect("apply");
        let meta = SnapshotMeta {
            index: 300,
            term: 2,
        };
        let staged = b
            .stager
            .stage(meta, chunks.into_iter().map(Ok))
            .expect("staged");
        assert_eq!(
            staged.records,
            300 + 1,
            "every key and the one session record"
        );
        assert_eq!(
            b.kv.get(b"old").expect("get"),
            Some(Bytes::from("v")),
            "live state untouched"
        );
        install_snapshot(&mut b.log, &mut b.kv, staged).expect("install");
        let check = |r: &mut crate::storage::disk::Recovered| {
            assert_eq!(r.kv.applied(), 300);
            assert_eq!(r.kv.get(b"old").expect("get"), None);
            assert_eq!(r.kv.get(b"late").expect("get"), None);
            assert_eq!(
                r.kv.get(b"key00150").expect("get"),
                Some(Bytes::from("x".repeat(150)))
            );
            assert_eq!((r.log.first_index(), r.log.last_index()), (301, 300));
            assert_eq!(r.log.term(300).expect("term"), 2);
        };
        check(&mut b);
        drop(b);
        let mut b = open(b_dir.path(), 2).expect("reopen");
        check(&mut b);
        assert_eq!(b.kv.generation(), 1);
        assert!(!b.kv.db_has_keyspace("kv"), "the old generation is deleted");
        // The session table came along: a retry of the last write of client 1 + 300 % 3 is a
        // duplicate.
        let retry = [put(301, 1, 300, "key00300", "again")];
        b.log.append(&retry, None, true).expect("append");
        let out = b.kv.apply(&retry).expect("apply");
        assert_eq!(out, vec![ApplyOutcome::Duplicate { existed: false }]);
    }

    #[test]
    fn a_snapshot_staged_but_not_installed_is_dropped_at_restart() {
        let a_dir = tempfile::tempdir().expect("tempdir");
        let b_dir = tempfile::tempdir().expect("tempdir");
        let mut a = open(a_dir.path(), 1).expect("open");
        a.kv.apply(&[put(1, 0, 0, "k", "v")]).expect("apply");
        let chunks = chunks_of(a.kv.snapshot_source());
        {
            let b = open(b_dir.path(), 2).expect("open");
            let staged = b
                .stager
                .stage(
                    SnapshotMeta { index: 1, term: 2 },
                    chunks.into_iter().map(Ok),
                )
                .expect("staged");
            assert!(b.kv.db_has_keyspace("kv-1"));
            drop(staged); // the node crashed before installing it
        }
        let b = open(b_dir.path(), 2).expect("reopen");
        assert_eq!(b.kv.generation(), 0);
        assert_eq!(b.kv.get(b"k").expect("get"), None);
        assert!(!b.kv.db_has_keyspace("kv-1"), "the staging was deleted");
    }

    /// The watermark: a log shorter than what had been made durable is refused as damaged;
    /// a log that shrank legitimately (a conflicting suffix replaced) is not.
    #[test]
    fn lost_durable_entries_are_detected_but_a_replaced_suffix_is_not() {
        use crate::storage::disk::OpenError;
        use crate::storage::durable;
        let dir = tempfile::tempdir().expect("tempdir");
        let e = |i, t| {
            let mut x = put(i, 0, 0, "k", "v");
            x.term = t;
            x
        };
        {
            let mut r = open(dir.path(), 1).expect("open");
            let hs = crate::raft::HardState {
                term: 2,
                vote: 1,
                commit: 0,
            };
            r.log
                .append(
                    &(1..=5).map(|i| e(i, 2)).collect::<Vec<_>>(),
                    Some(hs),
                    true,
                )
                .expect("append");
            // A new leader replaces 3-5 with one entry of term 3.
            r.log.append(&[e(3, 3)], None, true).expect("append");
        }
        let w = durable::read(dir.path()).expect("read").expect("written");
        assert_eq!((w.last_index, w.last_term, w.term, w.vote), (3, 3, 2, 1));
        drop(open(dir.path(), 1).expect("a replaced suffix is not damage"));
        // The watermark says more was durable than the log holds: entries were lost.
        durable::write(
            dir.path(),
            durable::Watermark {
                last_index: 9,
                last_term: 3,
                ..w
            },
        )
        .expect("write");
        let err = open(dir.path(), 1).err().expect("refused");
        assert!(matches!(err, OpenError::Damaged { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("entry 9 (term 3) had been made durable"),
            "{err}"
        );
        // A lost vote too.
        durable::write(dir.path(), durable::Watermark { term: 4, ..w }).expect("write");
        let err = open(dir.path(), 1).err().expect("refused");
        assert!(
            err.to_string()
                .contains("a vote this node cast may be lost"),
            "{err}"
        );
    }

    #[test]
    fn damaged_or_unordered_snapshots_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = open(dir.path(), 2).expect("open");
        let rec = |k: &str| {
            let mut v = vec![TAG_KV];
            v.extend_from_slice(&(k.len() as u32).to_le_bytes());
            v.extend_from_slice(k.as_bytes());
            v.extend_from_slice(&1u32.to_le_bytes());
            v.push(b'v');
            v
        };
        let meta = SnapshotMeta { index: 5, term: 1 };
        let unordered = [rec("b"), rec("a")].concat();
        let e = b
            .stager
            .stage(meta, std::iter::once(Ok(unordered)))
            .err()
            .expect("refused");
        assert!(e.to_string().contains("out of order"), "{e}");
        let mut truncated = rec("a");
        truncated.pop();
        let e = b
            .stager
            .stage(meta, std::iter::once(Ok(truncated)))
            .err()
            .expect("refused");
        assert!(e.to_string().contains("truncated"), "{e}");
        let e = b
            .stager
            .stage(
                meta,
                [Ok(rec("a")), Err("connection reset".into())].into_iter(),
            )
            .err()
            .expect("refused");
        assert!(e.to_string().contains("connection reset"), "{e}");
        drop(b);
        let b = open(dir.path(), 2).expect("reopen");
        assert!(!b.kv.db_has_keyspace("kv-1") && !b.kv.db_has_keyspace("kv-3"));
    }
}

/// A data directory written by the previous release (format 1, commit 6b19b02: one node that
/// applied `set alpha one`, `set beta two`, `del alpha`, `set gamma three`) still opens, is
/// upgraded in place, and keeps every key.
#[cfg(test)]
mod fixture_tests {
    use std::path::Path;

    use bytes::Bytes;

    use crate::raft::LogStore;
    use crate::storage::open;

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for e in std::fs::read_dir(from).expect("read fixture").flatten() {
            let target = to.join(e.file_name());
            if e.file_type().expect("type").is_dir() {
                copy_dir(&e.path(), &target);
            } else {
                std::fs::copy(e.path(), target).expect("copy");
            }
        }
    }

    #[test]
    fn a_format_1_directory_opens_and_keeps_its_keys() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format1/node-1");
        let dir = tempfile::tempdir().expect("tempdir");
        let node = dir.path().join("node-1");
        copy_dir(&fixture, &node);
        for _ in 0..2 {
            let r = open(&node, 1).expect("a format-1 directory opens");
            assert!(r.kv.applied() >= 5, "noop and four commands applied");
            assert!(r.log.last_index() >= r.kv.applied());
            assert_eq!(r.kv.get(b"alpha").expect("get"), None);
            assert_eq!(r.kv.get(b"beta").expect("get"), Some(Bytes::from("two")));
            assert_eq!(r.kv.get(b"gamma").expect("get"), Some(Bytes::from("three")));
        }
    }
}
