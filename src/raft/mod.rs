//! The Raft consensus core: pure, deterministic, no I/O, no async, no clock, no global RNG.
//!
//! See [`core`] for the contract between the core and the runtime that drives it.

pub mod core;
pub mod log;
pub mod membership;
pub mod progress;
pub mod quorum;
pub mod storage;
pub mod tracker;
pub mod types;

pub use self::core::{Config, Error, Raft, Status};
pub use self::membership::{ClusterConfig, ConfChange, Member};
pub use self::storage::{LogStore, MemLogStore, StorageError};
pub use self::types::*;

#[cfg(test)]
mod harness;
#[cfg(test)]
mod tests;
