//! Durable state of a node, in one fjall database at `<data_directory>/node-<id>/`:
//!
//! | keyspace   | key                    | value                                   |
//! |------------|------------------------|-----------------------------------------|
//! | `log`      | index (u64 big-endian) | term (u64 LE), kind (u8), data          |
//! | `meta`     | `hard_state`, `node_id`, `applied`, `format`, `log_start`, `sm_generation` | see [`disk`], [`kv`] |
//! | `kv` (`kv-<g>`) | user key          | user value                              |
//! | `sessions` (`sessions-<g>`) | applied index (u64 BE) | sessions written by that batch |
//!
//! The state machine's keyspaces come in generations: an installed snapshot is staged in
//! generation `g + 1` and made live by one batch that writes `sm_generation` (see
//! [`snapshot`]). The log starts after `log_start` (the last compacted entry).
//!
//! The contract with the runtime (DESIGN.md):
//! 1. Log entries and hard state are written in one batch and fsynced before the core is told
//!    they are durable ([`DiskLog::append`]).
//! 2. Applying committed entries writes the key-value changes, the client sessions and the
//!    applied index in one atomic batch ([`KvStore::apply`]); it needs no fsync of its own, as
//!    the log it came from is durable and a restart re-applies from the applied index.
//! 3. A failed write poisons the database; the node must stop.
//! 4. The log is compacted only up to what is applied ([`DiskLog::compact`]); fjall's journal is
//!    one ordered sequence, so a compaction that survived a crash implies the applies before it.

pub mod command;
pub mod disk;
pub mod durable;
pub mod kv;
pub mod snapshot;
#[cfg(test)]
mod testutil;

pub use disk::{DiskLog, open};
pub use kv::{ApplyOutcome, KvStore, StagedState};
pub use snapshot::{SnapshotSource, Stager};

use crate::raft::StorageError;

/// Installs a staged snapshot: in one batch the log is dropped (it restarts after the
/// snapshot) and the staged generation becomes the live state machine; then an fsync. A crash
/// before the batch is durable leaves the old state and log, after it the new ones.
///
/// # Errors
/// A storage error; the node must stop.
pub fn install_snapshot(
    log: &mut DiskLog,
    kv: &mut KvStore,
    staged: StagedState,
) -> Result<(), StorageError> {
    let meta = staged.meta;
    log.before_install(meta)?;
    kv.install(staged, |b| log.drop_all_into(b, meta))?;
    log.snapshot_installed(meta);
    Ok(())
}
