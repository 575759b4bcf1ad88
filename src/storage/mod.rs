//! Durable state of a node, in one fjall database at `<data_directory>/node-<id>/`:
//!
//! | keyspace   | key                    | value                                   |
//! |------------|------------------------|-----------------------------------------|
//! | `log`      | index (u64 big-endian) | term (u64 LE), kind (u8), data          |
//! | `meta`     | `hard_state`, `node_id`, `applied`, `format` | see [`disk`]      |
//! | `kv`       | user key               | user value                              |
//! | `sessions` | client id (u64 BE)     | last seq, its result and when last used |
//!
//! The contract with the runtime (DESIGN.md):
//! 1. Log entries and hard state are written in one batch and fsynced before the core is told
//!    they are durable ([`DiskLog::append`]).
//! 2. Applying committed entries writes the key-value changes, the client sessions and the
//!    applied index in one atomic batch ([`KvStore::apply`]); it needs no fsync of its own, as
//!    the log it came from is durable and a restart re-applies from the applied index.
//! 3. A failed write poisons the database; the node must stop.

pub mod command;
pub mod disk;
pub mod kv;

pub use disk::{DiskLog, open};
pub use kv::{ApplyOutcome, KvStore};
