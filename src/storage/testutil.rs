//! Helpers shared by the storage tests.

use crate::raft::{Entry, EntryKind, LogIndex, Term};

use super::command::{Command, Op, RequestId};

/// A log entry at `index` of `term` that puts `k = v` for request `seq` of client `client`.
pub fn put_entry(index: LogIndex, term: Term, client: u64, seq: u64, k: &str, v: &str) -> Entry {
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
        term,
        kind: EntryKind::Normal,
        data: cmd.encode(),
    }
}
