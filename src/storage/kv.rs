//! The replicated state machine: a key-value map on fjall, with client sessions that make
//! retried writes apply at most once.

use std::collections::HashMap;

use bytes::Bytes;
use fjall::{Database, Keyspace};

use crate::raft::{Entry, EntryKind, LogIndex, StorageError};

use super::command::{Command, Op};
use super::disk::{decode_u64, io_err, u64_at};

const KEY_APPLIED: &[u8] = b"applied";
/// Sessions unused for this many log entries are forgotten (checked every
/// `SESSION_SWEEP_EVERY` entries, at the same log index on every replica, so all agree).
pub const SESSION_TTL_ENTRIES: u64 = 1 << 22;
const SESSION_SWEEP_EVERY: u64 = 1 << 16;

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

#[derive(Clone, Copy)]
struct Session {
    seq: u64,
    existed: bool,
    last_used: LogIndex,
}

pub struct KvStore {
    db: Database,
    kv: Keyspace,
    meta: Keyspace,
    sessions: Keyspace,
    applied: LogIndex,
}

impl KvStore {
    pub(crate) fn new(
        db: Database,
        kv: Keyspace,
        meta: Keyspace,
        sessions: Keyspace,
    ) -> Result<Self, StorageError> {
        let applied = match meta.get(KEY_APPLIED).map_err(io_err)? {
            Some(v) => {
                decode_u64(&v).ok_or_else(|| StorageError::Io("corrupt applied index".into()))?
            }
            None => 0,
        };
        Ok(KvStore {
            db,
            kv,
            meta,
            sessions,
            applied,
        })
    }

    /// The index of the last entry applied.
    pub fn applied(&self) -> LogIndex {
        self.applied
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

    fn session(
        &self,
        client_id: u64,
        overlay: &HashMap<u64, Session>,
    ) -> Result<Option<Session>, StorageError> {
        if let Some(s) = overlay.get(&client_id) {
            return Ok(Some(*s));
        }
        let Some(v) = self.sessions.get(client_id.to_be_bytes()).map_err(io_err)? else {
            return Ok(None);
        };
        if v.len() != 17 {
            return Err(StorageError::Io(format!("corrupt session {client_id}")));
        }
        Ok(Some(Session {
            seq: u64_at(&v, 0),
            existed: v[8] != 0,
            last_used: u64_at(&v, 9),
        }))
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
        let mut sessions: HashMap<u64, Session> = HashMap::new();
        let mut applied = self.applied;
        for e in entries {
            assert_eq!(e.index, applied + 1, "entries must be applied in order");
            applied = e.index;
            if e.kind == EntryKind::Noop {
                outcomes.push(ApplyOutcome::Noop);
                continue;
            }
            let cmd = Command::decode(e.data.clone())
                .map_err(|err| StorageError::Io(format!("log entry {}: {err}", e.index)))?;
            let id = cmd.id;
            if id.client_id != 0
                && let Some(s) = self.session(id.client_id, &sessions)?
                && id.seq <= s.seq
            {
                outcomes.push(ApplyOutcome::Duplicate { existed: s.existed });
                continue;
            }
            let (outcome, existed) = match cmd.op {
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
                sessions.insert(
                    id.client_id,
                    Session {
                        seq: id.seq,
                        existed,
                        last_used: e.index,
                    },
                );
            }
            outcomes.push(outcome);
            if e.index % SESSION_SWEEP_EVERY == 0 {
                self.sweep_sessions(&mut b, e.index, &sessions)?;
            }
        }
        for (client, s) in &sessions {
            let mut v = Vec::with_capacity(17);
            v.extend_from_slice(&s.seq.to_le_bytes());
            v.push(u8::from(s.existed));
            v.extend_from_slice(&s.last_used.to_le_bytes());
            b.insert(&self.sessions, client.to_be_bytes().to_vec(), v);
        }
        b.insert(&self.meta, KEY_APPLIED, applied.to_le_bytes().to_vec());
        b.commit().map_err(io_err)?;
        self.applied = applied;
        Ok(outcomes)
    }

    fn sweep_sessions(
        &self,
        b: &mut fjall::OwnedWriteBatch,
        now: LogIndex,
        fresh: &HashMap<u64, Session>,
    ) -> Result<(), StorageError> {
        for item in self.sessions.iter() {
            let (k, v) = item.into_inner().map_err(io_err)?;
            if v.len() == 17 && u64_at(&v, 9) + SESSION_TTL_ENTRIES < now {
                let id = u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8]));
                if !fresh.contains_key(&id) {
                    b.remove(&self.sessions, k.to_vec());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{HardState, LogStore};
    use crate::storage::command::RequestId;
    use crate::storage::open;

    fn put(index: LogIndex, client: u64, seq: u64, k: &str, v: &str) -> Entry {
        let cmd = Command {
            id: RequestId {
                client_id: client,
                seq,
            },
            op: Op::Put {
                key: k.to_string().into(),
                value: v.to_string().into(),
            },
        };
        Entry {
            index,
            term: 1,
            kind: EntryKind::Normal,
            data: cmd.encode(),
        }
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

    #[test]
    fn log_truncation_replaces_the_suffix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = open(dir.path(), 1).expect("open");
        let mk = |i, t| Entry {
            index: i,
            term: t,
            kind: EntryKind::Normal,
            data: Bytes::from(format!("{i}/{t}")),
        };
        r.log
            .append(&[mk(1, 1), mk(2, 1), mk(3, 2), mk(4, 2)], None, true)
            .expect("append");
        r.log.append(&[mk(3, 3)], None, true).expect("append");
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
    }

    #[test]
    fn data_dir_of_another_node_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(open(dir.path(), 1).expect("open"));
        let err = open(dir.path(), 2).err().expect("refused");
        let msg = err.to_string();
        assert!(msg.contains("belongs to node 1, not node 2"), "{msg}");
    }
}
