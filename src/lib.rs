//! raftkv: a fault-tolerant, Raft-replicated key-value store.
//!
//! # Layout
//! Data flows down, results flow back up; nothing imports a layer above it.
//! - `cli`: the `raftkv` subcommands (node, cluster, shell, monitor, bench).
//! - [`client`] — leader discovery, redirects, retries and deadlines.
//! - [`node`] — the runtime; one tokio task owns the Raft core and executes its output.
//! - [`transport`] — gRPC servers and peer connections; wire types stop here.
//! - [`storage`] — the durable log, hard state and key-value state machine on fjall.
//! - [`raft`] — the consensus core; pure and deterministic.
//! - [`config`](mod@config) — `config.json`.
//! - [`metrics`] — a node's Prometheus metrics (served by `node` over HTTP).

pub mod config;
pub mod metrics;
pub mod raft;
pub mod security;
pub mod storage;

pub mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("raftkv");
}
pub mod cli;
pub mod client;
pub mod node;
pub mod transport;
