//! The replicated state machine: a key-value map on fjall, with client sessions that make
//! retried writes apply at most once.

use std::collections::HashMap;
use std::path::Path;

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions};

use crate::raft::{ClusterConfig, Entry, EntryKind, LogIndex, SnapshotMeta, StorageError, Term};

use super::command::{Command, Op};
use super::disk::{corrupt, encode_meta, io_err, sync_dir, u64_at};

/// The applied index and its term (u64 LE each; an 8-byte value, from format 1, has no term).
pub(crate) const KEY_APPLIED: &[u8] = b"applied";
/// Which pair of state-machine keyspaces is live (u64 LE; absent: 0). An installed snapshot
/// is staged in the next generation's keyspaces and made live by writing this key.
pub(crate) const KEY_SM_GENERATION: &[u8] = b"sm_generation";
/// The cluster this node belongs to (u64 LE; absent: not known yet). Set by the first applied
/// `SetClusterId` entry or by an installed snapshot.
pub(crate) const KEY_CLUSTER_ID: &[u8] = b"cluster_id";
/// The configuration in force at the applied index (JSON, as in the log's configuration
/// entries; absent: none applied yet, the bootstrap configuration of config.json holds).
pub(crate) const KEY_MEMBERSHIP: &[u8] = b"membership";

/// The names of generation `gen`'s key-value and session keyspaces.
pub(crate) fn sm_keyspace_names(generation: u64) -> (String, String) {
    if generation == 0 {
        ("kv".into(), "sessions".into())
    } else {
        (format!("kv-{generation}"), format!("sessions-{generation}"))
    }
}

/// The generation a state-machine keyspace name belongs to, if it is one.
pub(crate) fn sm_keyspace_generation(name: &str) -> Option<u64> {
    match name {
        "kv" | "sessions" => Some(0),
        _ => name
            .strip_prefix("kv-")
            .or_else(|| name.strip_prefix("sessions-"))
            .and_then(|g| g.parse().ok()),
    }
}

/// Opens (creating) one of the state machine's keyspaces. Memtable sizes bound a node's
/// memory (fjall's default is 64 MiB per keyspace). Small memtables also keep inserts cheap:
/// every applied write is one skiplist insert, and with a 32 MiB kv memtable the search alone
/// was about 15% of a busy leader's CPU (cache misses); 4 MiB measured about 10% less CPU per
/// write than 32 MiB and a little less than 8.
pub(crate) fn open_sm_keyspace(db: &Database, name: &str) -> Result<Keyspace, StorageError> {
    db.keyspace(name, || {
        KeyspaceCreateOptions::default().max_memtable_size(4 << 20)
    })
    .map_err(io_err)
}

pub(crate) fn decode_applied(v: &[u8]) -> Option<SnapshotMeta> {
    match v.len() {
        8 => Some(SnapshotMeta {
            index: u64_at(v, 0),
            term: 0,
        }),
        16 => Some(SnapshotMeta {
            index: u64_at(v, 0),
            term: u64_at(v, 8),
        }),
        _ => None,
    }
}
/// Sessions unused for this many log entries are forgotten (checked every
/// `SESSION_SWEEP_EVERY` entries, at the same log index on every replica, so all agree). A
/// client that retries a write after this many other entries may see it applied twice.
pub const SESSION_TTL_ENTRIES: u64 = 1 << 22;
const SESSION_SWEEP_EVERY: u64 = 1 << 16;
/// Session records (one per apply batch) kept before they are folded into one snapshot.
const SESSION_RECORDS_MAX: usize = 1024;
/// client id, then the session.
const SESSION_RECORD_BYTES: usize = 8 + 17;

/// What applying one entry did; the leader answers its client with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    Noop,
    Put,
    Delete {
        existed: bool,
    },
    /// A request already applied (a client retry): nothing changed; `existed` repeats the
    /// original answer of a delete.
    Duplicate {
        existed: bool,
    },
}

/// The last request applied for one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Session {
    seq: u64,
    existed: bool,
    last_used: LogIndex,
}

/// Sessions are stored as a log of records in the `sessions` keyspace: key = the applied index of
/// the batch that wrote it, value = `(client id, seq, existed, last used)` for every session that
/// batch touched. Replaying the records in key order rebuilds the table. Every
/// `SESSION_RECORDS_MAX` records they are folded into one full snapshot, so that a batch costs
/// one insert rather than one per client.
fn encode_sessions<'a>(sessions: impl Iterator<Item = (&'a u64, &'a Session)>) -> Vec<u8> {
    let mut v = Vec::new();
    for (id, s) in sessions {
        v.extend_from_slice(&id.to_le_bytes());
        v.extend_from_slice(&s.seq.to_le_bytes());
        v.push(u8::from(s.existed));
        v.extend_from_slice(&s.last_used.to_le_bytes());
    }
    v
}

pub(crate) fn decode_sessions(v: &[u8], into: &mut HashMap<u64, Session>) -> Option<()> {
    if !v.len().is_multiple_of(SESSION_RECORD_BYTES) {
        return None;
    }
    for r in v.chunks_exact(SESSION_RECORD_BYTES) {
        into.insert(
            u64_at(r, 0),
            Session {
                seq: u64_at(r, 8),
                existed: r[16] != 0,
                last_used: u64_at(r, 17),
            },
        );
    }
    Some(())
}

pub struct KvStore {
    db: Database,
    /// The live generation of the `kv` and `sessions` keyspaces.
    generation: u64,
    kv: Keyspace,
    meta: Keyspace,
    sessions: Keyspace,
    /// Every session, in memory; the keyspace is its durable copy, written in the same batch as
    /// the state it describes. A lookup per write must not cost a search of the LSM tree.
    session_cache: HashMap<u64, Session>,
    /// Keys of the session records in the keyspace, ascending.
    session_records: Vec<LogIndex>,
    applied: LogIndex,
    /// The term of the entry at `applied` (0 if unknown: a format-1 directory before its first
    /// apply).
    applied_term: Term,
    /// 0 until known.
    cluster_id: u64,
    /// The configuration in force at `applied`, once a configuration entry or a snapshot
    /// carrying one has been applied.
    config: Option<ClusterConfig>,
}

/// The session table read from a sessions keyspace: the cache and the record keys.
pub(crate) type SessionTable = (HashMap<u64, Session>, Vec<LogIndex>);

pub(crate) fn load_sessions(sessions: &Keyspace) -> Result<SessionTable, StorageError> {
    let mut session_cache = HashMap::new();
    let mut session_records = Vec::new();
    for item in sessions.iter() {
        let (k, v) = item.into_inner().map_err(io_err)?;
        let key = <[u8; 8]>::try_from(k.as_ref()).map(u64::from_be_bytes);
        match (key, decode_sessions(&v, &mut session_cache)) {
            (Ok(key), Some(())) => session_records.push(key),
            _ => return Err(corrupt("client session record")),
        }
    }
    Ok((session_cache, session_records))
}

/// A snapshot staged apart from the live state machine: generation `generation`'s keyspaces,
/// complete and durable, holding the state at `meta`.
pub struct StagedState {
    pub meta: SnapshotMeta,
    pub(crate) generation: u64,
    pub(crate) kv: Keyspace,
    pub(crate) sessions: Keyspace,
    pub(crate) session_table: SessionTable,
    /// Records the snapshot held.
    pub records: u64,
    /// The cluster the snapshot came from (0: not known).
    pub cluster_id: u64,
    /// The configuration in force at `meta.index` (`None`: the sender did not know one).
    pub config: Option<ClusterConfig>,
}

impl KvStore {
    /// Opens the live state machine of `db`, whose directory is `dir`, and deletes any other
    /// generation's keyspaces (a snapshot staged or replaced before a crash).
    pub(crate) fn open(db: Database, meta: Keyspace, dir: &Path) -> Result<Self, StorageError> {
        let generation = match meta.get(KEY_SM_GENERATION).map_err(io_err)? {
            Some(v) if v.len() == 8 => u64_at(&v, 0),
            Some(_) => return Err(corrupt("sm_generation")),
            None => 0,
        };
        let (kv_name, sessions_name) = sm_keyspace_names(generation);
        let kv = open_sm_keyspace(&db, &kv_name)?;
        let sessions = open_sm_keyspace(&db, &sessions_name)?;
        sync_dir(&dir.join("keyspaces"))?;
        let applied = match meta.get(KEY_APPLIED).map_err(io_err)? {
            Some(v) => decode_applied(&v).ok_or_else(|| corrupt("applied index"))?,
            None => SnapshotMeta::default(),
        };
        let (session_cache, session_records) = load_sessions(&sessions)?;
        let cluster_id = match meta.get(KEY_CLUSTER_ID).map_err(io_err)? {
            Some(v) if v.len() == 8 => u64_at(&v, 0),
            Some(_) => return Err(corrupt("cluster_id")),
            None => 0,
        };
        let config = match meta.get(KEY_MEMBERSHIP).map_err(io_err)? {
            Some(v) => {
                Some(ClusterConfig::decode(&v).map_err(|e| corrupt(format!("membership: {e}")))?)
            }
            None => None,
        };
        Ok(KvStore {
            config,
            cluster_id,
            db,
            generation,
            kv,
            meta,
            sessions,
            session_cache,
            session_records,
            applied: applied.index,
            applied_term: applied.term,
        })
    }

    /// The index of the last entry applied.
    pub fn applied(&self) -> LogIndex {
        self.applied
    }

    /// The cluster this node belongs to, 0 until known.
    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    /// The configuration in force at the applied index, if one was ever applied.
    pub fn config(&self) -> Option<&ClusterConfig> {
        self.config.as_ref()
    }

    /// The index and term of the last entry applied.
    pub fn applied_meta(&self) -> SnapshotMeta {
        SnapshotMeta {
            index: self.applied,
            term: self.applied_term,
        }
    }

    /// Bytes of the whole database on disk (tables and journal, as fjall counts them).
    pub fn disk_bytes(&self) -> u64 {
        self.db.disk_space().unwrap_or(0)
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Deletes every other generation's keyspaces (a snapshot staged, or replaced, before a
    /// crash). Called once the directory has passed its checks, so that a damaged one is left
    /// as it was found.
    pub(crate) fn delete_stale_generations(&self) -> Result<(), StorageError> {
        for name in self.db.list_keyspace_names() {
            let name: &str = &name;
            if sm_keyspace_generation(name).is_some_and(|g| g != self.generation) {
                let stale = self
                    .db
                    .keyspace(name, KeyspaceCreateOptions::default)
                    .map_err(io_err)?;
                self.db.delete_keyspace(stale).map_err(io_err)?;
            }
        }
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn db_has_keyspace(&self, name: &str) -> bool {
        self.db.keyspace_exists(name)
    }

    /// A point-in-time view of the state machine for streaming it as a snapshot while writes
    /// go on (fjall's snapshot: an apply batch is in it entirely or not at all).
    pub fn snapshot_source(&self) -> super::snapshot::SnapshotSource {
        super::snapshot::SnapshotSource {
            snapshot: self.db.snapshot(),
            kv: self.kv.clone(),
            sessions: self.sessions.clone(),
            meta: self.applied_meta(),
            config: self.config.clone(),
        }
    }

    /// Makes a staged snapshot the live state machine, atomically with `extra` (the log's
    /// deletion and new start): one batch names the new generation and applied index, then an
    /// fsync. A crash before the batch leaves the old state, after it the new; the old
    /// generation's keyspaces are deleted now or at the next start.
    pub(crate) fn install(
        &mut self,
        staged: StagedState,
        extra: impl FnOnce(&mut fjall::OwnedWriteBatch),
    ) -> Result<(), StorageError> {
        let mut b = self.db.batch();
        extra(&mut b);
        b.insert(
            &self.meta,
            KEY_SM_GENERATION,
            staged.generation.to_le_bytes().to_vec(),
        );
        b.insert(&self.meta, KEY_APPLIED, encode_meta(staged.meta));
        let cluster_id = if self.cluster_id == 0 {
            staged.cluster_id
        } else {
            self.cluster_id
        };
        if cluster_id != self.cluster_id {
            b.insert(
                &self.meta,
                KEY_CLUSTER_ID,
                cluster_id.to_le_bytes().to_vec(),
            );
        }
        // A snapshot without a configuration (its sender predates membership in the log)
        // leaves this node's as it was.
        if let Some(c) = &staged.config {
            b.insert(&self.meta, KEY_MEMBERSHIP, c.encode().to_vec());
        }
        b.commit().map_err(io_err)?;
        self.cluster_id = cluster_id;
        if staged.config.is_some() {
            self.config = staged.config.clone();
        }
        self.db
            .persist(fjall::PersistMode::SyncAll)
            .map_err(io_err)?;
        let old_kv = std::mem::replace(&mut self.kv, staged.kv);
        let old_sessions = std::mem::replace(&mut self.sessions, staged.sessions);
        self.generation = staged.generation;
        self.applied = staged.meta.index;
        self.applied_term = staged.meta.term;
        (self.session_cache, self.session_records) = staged.session_table;
        self.db.delete_keyspace(old_kv).map_err(io_err)?;
        self.db.delete_keyspace(old_sessions).map_err(io_err)?;
        Ok(())
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Bytes>, StorageError> {
        Ok(self
            .kv
            .get(key)
            .map_err(io_err)?
            .map(|v| Bytes::copy_from_slice(&v)))
    }

    /// An estimate of the number of keys.
    pub fn approximate_len(&self) -> usize {
        self.kv.approximate_len()
    }

    fn exists(&self, key: &Bytes, overlay: &HashMap<Bytes, bool>) -> Result<bool, StorageError> {
        match overlay.get(key) {
            Some(&present) => Ok(present),
            None => self.kv.contains_key(key).map_err(io_err),
        }
    }

    /// Applies committed entries, in order, in one atomic batch with the new applied index.
    ///
    /// # Errors
    /// A storage error (the node must stop), or an entry that cannot be decoded.
    ///
    /// # Panics
    /// If the entries do not directly follow the applied index.
    pub fn apply(&mut self, entries: &[Entry]) -> Result<Vec<ApplyOutcome>, StorageError> {
        let mut b = self.db.batch();
        let mut outcomes = Vec::with_capacity(entries.len());
        // Effects of earlier entries of this batch, which reads must see.
        let mut present: HashMap<Bytes, bool> = HashMap::new();
        let mut touched: HashMap<u64, Session> = HashMap::new();
        let mut expired: Vec<u64> = Vec::new();
        let mut applied = self.applied;
        let mut applied_term = self.applied_term;
        let mut new_cluster_id = None;
        let mut new_config = None;
        for e in entries {
            assert_eq!(e.index, applied + 1, "entries must be applied in order");
            applied = e.index;
            applied_term = e.term;
            if e.index.is_multiple_of(SESSION_SWEEP_EVERY) {
                expired.extend(self.expired_sessions(e.index, &touched));
            }
            if e.kind == EntryKind::Noop {
                outcomes.push(ApplyOutcome::Noop);
                continue;
            }
            if e.kind == EntryKind::ConfChange {
                let c = ClusterConfig::decode(&e.data)
                    .map_err(|err| corrupt(format!("configuration entry {}: {err}", e.index)))?;
                new_config = Some(c);
                outcomes.push(ApplyOutcome::Noop);
                continue;
            }
            let cmd = Command::decode(e.data.clone())
                .map_err(|err| corrupt(format!("log entry {}: {err}", e.index)))?;
            let id = cmd.id;
            if id.client_id != 0
                && let Some(s) = touched
                    .get(&id.client_id)
                    .or_else(|| self.session_cache.get(&id.client_id))
                && id.seq <= s.seq
            {
                outcomes.push(ApplyOutcome::Duplicate { existed: s.existed });
                continue;
            }
            let (outcome, existed) = match cmd.op {
                Op::SetClusterId { id } => {
                    if self.cluster_id == 0 && id != 0 && new_cluster_id.is_none() {
                        new_cluster_id = Some(id);
                        b.insert(&self.meta, KEY_CLUSTER_ID, id.to_le_bytes().to_vec());
                    }
                    (ApplyOutcome::Noop, false)
                }
                Op::Put { key, value } => {
                    b.insert(&self.kv, key.to_vec(), value.to_vec());
                    present.insert(key, true);
                    (ApplyOutcome::Put, false)
                }
                Op::Delete { key } => {
                    let existed = self.exists(&key, &present)?;
                    b.remove(&self.kv, key.to_vec());
                    present.insert(key, false);
                    (ApplyOutcome::Delete { existed }, existed)
                }
            };
            if id.client_id != 0 {
                touched.insert(
                    id.client_id,
                    Session {
                        seq: id.seq,
                        existed,
                        last_used: e.index,
                    },
                );
            }
            outcomes.push(outcome);
        }
        let snapshot = !expired.is_empty() || self.session_records.len() >= SESSION_RECORDS_MAX;
        let mut sessions_after = None;
        if snapshot {
            // Fold every record (and the expiries) into one full snapshot.
            let mut all = self.session_cache.clone();
            for id in &expired {
                all.remove(id);
            }
            all.extend(touched.iter().map(|(&id, &s)| (id, s)));
            for k in &self.session_records {
                b.remove(&self.sessions, k.to_be_bytes().to_vec());
            }
            if !all.is_empty() {
                b.insert(
                    &self.sessions,
                    applied.to_be_bytes().to_vec(),
                    encode_sessions(all.iter()),
                );
            }
            sessions_after = Some(all);
        } else if !touched.is_empty() {
            b.insert(
                &self.sessions,
                applied.to_be_bytes().to_vec(),
                encode_sessions(touched.iter()),
            );
        }
        if let Some(c) = &new_config {
            b.insert(&self.meta, KEY_MEMBERSHIP, c.encode().to_vec());
        }
        b.insert(
            &self.meta,
            KEY_APPLIED,
            encode_meta(SnapshotMeta {
                index: applied,
                term: applied_term,
            }),
        );
        b.commit().map_err(io_err)?;
        if new_config.is_some() {
            self.config = new_config;
        }
        // Out of fjall's userspace buffer into the OS: a kill -9 must not lose this batch
        // while a keyspace's memtable (say meta's, with the new applied index) is flushed to
        // a table without it. (The next log fsync makes it durable against power loss.)
        self.db
            .persist(fjall::PersistMode::Buffer)
            .map_err(io_err)?;
        self.applied = applied;
        self.applied_term = applied_term;
        if let Some(id) = new_cluster_id {
            self.cluster_id = id;
        }
        match sessions_after {
            Some(all) => {
                self.session_records = if all.is_empty() {
                    Vec::new()
                } else {
                    vec![applied]
                };
                self.session_cache = all;
            }
            None => {
                if !touched.is_empty() {
                    self.session_records.push(applied);
                }
                self.session_cache.extend(touched);
            }
        }
        Ok(outcomes)
    }

    /// Sessions not used within `SESSION_TTL_ENTRIES` before `now` (and not just now).
    fn expired_sessions(&self, now: LogIndex, fresh: &HashMap<u64, Session>) -> Vec<u64> {
        self.session_cache
            .iter()
            .filter(|(id, s)| s.last_used + SESSION_TTL_ENTRIES < now && !fresh.contains_key(id))
            .map(|(&id, _)| id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{HardState, LogStore};
    use crate::storage::command::RequestId;
    use crate::storage::open;

    fn put(index: LogIndex, client: u64, seq: u64, k: &str, v: &str) -> Entry {
        crate::storage::testutil::put_entry(index, 1, client, seq, k, v)
    }

    fn del(index: LogIndex, client: u64, seq: u64, k: &str) -> Entry {
        let cmd = Command {
            id: RequestId {
                client_id: client,
                seq,
            },
            op: Op::Delete {
                key: k.to_string().into(),
            },
        };
        Entry {
            index,
            term: 1,
            kind: EntryKind::Normal,
            data: cmd.encode(),
        }
    }

    #[test]
    fn apply_is_atomic_with_applied_index_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut r = open(dir.path(), 1).expect("open");
            let entries = vec![
                Entry {
                    index: 1,
                    term: 1,
                    kind: EntryKind::Noop,
                    data: Bytes::new(),
                },
                put(2, 9, 1, "a", "1"),
                del(3, 9, 2, "a"),
                del(4, 9, 3, "a"),
                put(5, 0, 0, "b", "2"),
            ];
            r.log
                .append(
                    &entries,
                    Some(HardState {
                        term: 1,
                        vote: 1,
                        commit: 5,
                    }),
                    true,
                )
                .expect("append");
            let out = r.kv.apply(&entries).expect("apply");
            assert_eq!(
                out,
                vec![
                    ApplyOutcome::Noop,
                    ApplyOutcome::Put,
                    ApplyOutcome::Delete { existed: true },
                    ApplyOutcome::Delete { existed: false },
                    ApplyOutcome::Put
                ]
            );
        }
        let r = open(dir.path(), 1).expect("reopen");
        assert_eq!(r.kv.applied(), 5);
        assert_eq!(
            r.hard_state,
            HardState {
                term: 1,
                vote: 1,
                commit: 5
            }
        );
        assert_eq!(r.log.last_index(), 5);
        assert_eq!(r.kv.get(b"a").expect("get"), None);
        assert_eq!(r.kv.get(b"b").expect("get"), Some(Bytes::from("2")));
    }

    #[test]
    fn retried_requests_apply_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = open(dir.path(), 1).expect("open");
        let e = vec![
            put(1, 5, 1, "k", "first"),
            put(2, 6, 1, "k", "other"),
            put(3, 5, 1, "k", "first"),
        ];
        let out = r.kv.apply(&e).expect("apply");
        assert_eq!(out[2], ApplyOutcome::Duplicate { existed: false });
        assert_eq!(
            r.kv.get(b"k").expect("get"),
            Some(Bytes::from("other")),
            "the retry did not re-apply"
        );
        // Across batches too.
        let out =
            r.kv.apply(&[del(4, 7, 1, "k"), del(5, 7, 1, "k")])
                .expect("apply");
        assert_eq!(
            out,
            vec![
                ApplyOutcome::Delete { existed: true },
                ApplyOutcome::Duplicate { existed: true }
            ]
        );
    }

    /// A log entry whose data names its index and term.
    fn log_entry(index: LogIndex, term: u64) -> Entry {
        Entry {
            index,
            term,
            kind: EntryKind::Normal,
            data: Bytes::from(format!("{index}/{term}")),
        }
    }

    #[test]
    fn log_truncation_replaces_the_suffix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = open(dir.path(), 1).expect("open");
        let mk = log_entry;
        r.log
            .append(&[mk(1, 1), mk(2, 1), mk(3, 2), mk(4, 2)], None, true)
            .expect("append");
        r.log.append(&[mk(3, 3)], None, true).expect("append");
        let bytes = r.log.log_bytes();
        assert_eq!(r.log.last_index(), 3);
        assert_eq!(r.log.term(3).expect("term"), 3);
        assert_eq!(r.log.term(2).expect("term"), 1);
        assert!(r.log.term(4).is_err());
        let got = r.log.entries(1, 4, usize::MAX).expect("entries");
        assert_eq!(got, vec![mk(1, 1), mk(2, 1), mk(3, 3)]);
        assert_eq!(
            r.log.entries(1, 4, 1).expect("entries").len(),
            1,
            "budget, but at least one"
        );
        drop(r);
        let r = open(dir.path(), 1).expect("reopen");
        assert_eq!(r.log.last_index(), 3);
        assert_eq!(r.log.term(3).expect("term"), 3);
        assert_eq!(
            r.log.log_bytes(),
            bytes,
            "the cut batch's new size is counted, not its old one"
        );
    }

    /// A repaired node waits for every entry it had made durable, even when the peers that
    /// answered had committed less: one of those entries may be committed on its
    /// acknowledgement (the simulator lost committed entries when it waited for the peers only).
    #[test]
    fn repair_waits_for_what_the_node_had_made_durable() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("node-1");
        {
            let mut r = open(&dir, 1).expect("open");
            let entries: Vec<Entry> = (1..=10).map(|i| log_entry(i, 2)).collect();
            let hs = HardState {
                term: 2,
                vote: 3,
                commit: 4,
            };
            r.log.append(&entries, Some(hs), true).expect("append");
        }
        let (aside, w) = crate::storage::disk::repair(&dir, 1, 1, Some(4)).expect("repair");
        assert!(aside.exists(), "the old directory is kept aside");
        assert_eq!(w.last_index, 10);
        let r = open(&dir, 1).expect("reopen");
        assert_eq!(
            r.rejoin,
            Some((2, Some((10, 2)))),
            "its last entry was of term 2"
        );
        assert_eq!(r.log.last_index(), 0);
        assert_eq!((r.hard_state.term, r.hard_state.vote), (2, 3));
        drop(r);
        // Peers that committed more than the node had: it waits for that.
        crate::storage::disk::repair(&dir, 1, 5, Some(30)).expect("repair again");
        let r = open(&dir, 1).expect("reopen");
        assert_eq!(r.rejoin, Some((5, Some((30, u64::MAX)))));
        assert_eq!((r.hard_state.term, r.hard_state.vote), (5, 0));
    }

    #[test]
    fn data_dir_of_another_node_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(open(dir.path(), 1).expect("open"));
        let err = open(dir.path(), 2).err().expect("refused");
        let msg = err.to_string();
        assert!(msg.contains("belongs to node 1, not node 2"), "{msg}");
    }

    #[test]
    fn log_batches_are_read_across_and_cut_in_the_middle_after_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mk = log_entry;
        {
            let mut r = open(dir.path(), 1).expect("open");
            r.log
                .append(&(1..=4).map(|i| mk(i, 1)).collect::<Vec<_>>(), None, true)
                .expect("append");
            r.log
                .append(&(5..=8).map(|i| mk(i, 2)).collect::<Vec<_>>(), None, true)
                .expect("append");
            r.log
                .append(&(9..=12).map(|i| mk(i, 2)).collect::<Vec<_>>(), None, true)
                .expect("append");
        }
        let mut r = open(dir.path(), 1).expect("reopen");
        // No tail cache after a restart: these come from fjall, across batch boundaries.
        let got = r.log.entries(3, 11, usize::MAX).expect("entries");
        assert_eq!(
            got,
            (3..=10)
                .map(|i| mk(i, if i <= 4 { 1 } else { 2 }))
                .collect::<Vec<_>>()
        );
        // A conflict in the middle of the second batch replaces the suffix from there on.
        r.log
            .append(&[mk(6, 3), mk(7, 3)], None, true)
            .expect("append");
        drop(r);
        let r = open(dir.path(), 1).expect("reopen");
        assert_eq!(r.log.last_index(), 7);
        let terms: Vec<u64> = r
            .log
            .entries(1, 8, usize::MAX)
            .expect("entries")
            .iter()
            .map(|e| e.term)
            .collect();
        assert_eq!(terms, vec![1, 1, 1, 1, 2, 3, 3]);
        assert_eq!(r.log.term(5).expect("term"), 2);
        assert!(r.log.term(8).is_err());
    }

    #[test]
    fn log_truncation_at_a_batch_boundary_and_at_the_first_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mk = log_entry;
        let terms_after_reopen = |dir: &std::path::Path| {
            let r = open(dir, 1).expect("reopen");
            let last = r.log.last_index();
            r.log
                .entries(1, last + 1, usize::MAX)
                .expect("entries")
                .iter()
                .map(|e| (e.index, e.term))
                .collect::<Vec<_>>()
        };
        {
            let mut r = open(dir.path(), 1).expect("open");
            for (range, term) in [(1..=4, 1), (5..=8, 2), (9..=12, 2)] {
                r.log
                    .append(&range.map(|i| mk(i, term)).collect::<Vec<_>>(), None, true)
                    .expect("append");
            }
        }
        // Exactly where the second batch starts: the first batch stays whole.
        open(dir.path(), 1)
            .expect("reopen")
            .log
            .append(&[mk(5, 3)], None, true)
            .expect("append");
        assert_eq!(
            terms_after_reopen(dir.path()),
            vec![(1, 1), (2, 1), (3, 1), (4, 1), (5, 3)]
        );
        // At the first entry: nothing of the old log is left.
        let mut r = open(dir.path(), 1).expect("reopen");
        r.log.append(&[mk(1, 4)], None, true).expect("append");
        assert_eq!(r.log.last_index(), 1);
        assert!(r.log.term(2).is_err());
        drop(r);
        assert_eq!(terms_after_reopen(dir.path()), vec![(1, 4)]);
    }

    #[test]
    fn sessions_survive_reopen_through_records_and_snapshots() {
        let dir = tempfile::tempdir().expect("tempdir");
        let batches = SESSION_RECORDS_MAX as u64 + 10;
        {
            let mut r = open(dir.path(), 1).expect("open");
            for i in 1..=batches {
                // Client i % 7 writes its i-th request.
                let e = [put(i, 1 + i % 7, i, "k", "v")];
                r.log.append(&e, None, false).expect("append");
                r.kv.apply(&e).expect("apply");
            }
            assert!(
                r.kv.session_records.len() < SESSION_RECORDS_MAX,
                "records were folded"
            );
        }
        let mut r = open(dir.path(), 1).expect("reopen");
        assert_eq!(r.kv.session_cache.len(), 7);
        // The last request of client 1 + batches % 7 is a duplicate; a newer one is not.
        let client = 1 + batches % 7;
        let out =
            r.kv.apply(&[
                put(batches + 1, client, batches, "k", "again"),
                put(batches + 2, client, batches + 100, "k", "new"),
            ])
            .expect("apply");
        assert_eq!(
            out,
            vec![
                ApplyOutcome::Duplicate { existed: false },
                ApplyOutcome::Put
            ]
        );
    }
}
