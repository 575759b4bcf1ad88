//! raftkv: a fault-tolerant, Raft-replicated key-value store.
//!
//! # Layout
//! - [`raft`]: the consensus core; pure and deterministic.

pub mod raft;

pub mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("raftkv");
}
