//! Outgoing Raft messages: one long-lived gRPC stream per peer, messages pipelined in batches.
//!
//! The core collects each round's messages per peer and hands every peer one batch, straight
//! into the peer's stream. A task per peer only keeps the stream open. A slow or dead peer never
//! blocks the core or the other peers: each stream has a bounded queue, and a batch that does
//! not fit is dropped (Raft retries on the next heartbeat).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::proto;
use crate::proto::node_communication_client::NodeCommunicationClient;
use crate::raft::{Message, NodeId};

use super::convert::message_to_wire;

/// Batches queued per peer stream before new ones are dropped.
const PEER_QUEUE_BATCHES: usize = 256;
/// Encoded bytes per batch at most (a single larger message goes alone); far below
/// `GRPC_MESSAGE_BYTES_MAX`, which a batch must never reach.
pub const BATCH_BYTES_MAX: usize = 8 << 20;
pub const GRPC_MESSAGE_BYTES_MAX: usize = 64 << 20;
pub const STREAM_WINDOW_BYTES: u32 = 8 << 20;
pub const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;

/// The sending end of one peer's live stream, if it has one.
type Slot = Arc<Mutex<Option<mpsc::Sender<proto::MessageBatch>>>>;

pub struct Peers {
    /// Per peer: its address, its stream's sending end, and the task that keeps it open.
    streams: HashMap<NodeId, (String, Slot, tokio::task::AbortHandle)>,
    /// Stamped on every message.
    cluster: super::ClusterId,
    dialer: crate::security::Dialer,
    /// Messages of the current round, by peer (reused between rounds).
    pending: HashMap<NodeId, Vec<proto::RaftMessage>>,
}

impl Peers {
    /// Starts one connection task per peer (`id -> host:port`).
    pub fn start(
        peers: impl IntoIterator<Item = (NodeId, String)>,
        cluster: super::ClusterId,
        dialer: crate::security::Dialer,
    ) -> Peers {
        let mut p = Peers {
            streams: HashMap::new(),
            cluster,
            dialer,
            pending: HashMap::new(),
        };
        p.set(peers);
        p
    }

    /// Connects to exactly `peers` (`id -> host:port`): streams to nodes no longer among them
    /// are closed, new ones opened (the membership changed).
    pub fn set(&mut self, peers: impl IntoIterator<Item = (NodeId, String)>) {
        let peers: HashMap<NodeId, String> = peers.into_iter().collect();
        self.streams.retain(|id, (addr, _, task)| {
            let keep = peers.get(id) == Some(addr);
            if !keep {
                task.abort();
            }
            keep
        });
        self.pending.retain(|id, _| peers.contains_key(id));
        for (id, addr) in peers {
            self.streams.entry(id).or_insert_with(|| {
                let slot = Slot::default();
                let task = tokio::spawn(peer_loop(
                    id,
                    addr.clone(),
                    slot.clone(),
                    self.dialer.clone(),
                ));
                (addr, slot, task.abort_handle())
            });
        }
    }

    /// Adds a message to its peer's batch; `flush` sends the batches.
    pub fn push(&mut self, m: Message) {
        if self.streams.contains_key(&m.to)
            && let Some(mut wire) = message_to_wire(m)
        {
            wire.cluster_id = self.cluster.load(std::sync::atomic::Ordering::Relaxed);
            self.pending.entry(wire.to).or_default().push(wire);
        }
    }

    /// Hands each peer its batch: straight to the peer's stream, with no task in between. A
    /// peer without a live stream, or whose stream is backed up, loses the batch; Raft resends
    /// what matters.
    pub fn flush(&mut self) {
        for (id, messages) in &mut self.pending {
            if messages.is_empty() {
                continue;
            }
            let Some((_, slot, _)) = self.streams.get(id) else {
                messages.clear();
                continue;
            };
            let tx = slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
            // A follower catching up can be sent hundreds of appends of up to `max_msg_bytes`
            // in one round: together they could exceed the gRPC message limit.
            for messages in super::split_by_encoded_len(std::mem::take(messages), BATCH_BYTES_MAX) {
                let batch = proto::MessageBatch { messages };
                if tx.as_ref().is_none_or(|tx| tx.try_send(batch).is_err()) {
                    tracing::trace!(
                        peer = id,
                        "no stream to peer or stream backed up; batch dropped"
                    );
                }
            }
        }
    }
}

/// Keeps a stream open to one peer, reconnecting with backoff, and publishes its sending end.
async fn peer_loop(id: NodeId, addr: String, slot: Slot, dialer: crate::security::Dialer) {
    use crate::security::Purpose;
    if let Err(e) = dialer.endpoint(&addr, Purpose::PeerStream) {
        tracing::error!(peer = id, %addr, "invalid peer address: {e}");
        return;
    }
    let set = |tx: Option<mpsc::Sender<proto::MessageBatch>>| {
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = tx;
    };
    let mut backoff = Duration::from_millis(20);
    let mut was_connected = true;
    loop {
        // Built for each connection, so that a reloaded certificate is used from then on.
        let channel = match dialer.connect(&addr, Purpose::PeerStream).await {
            Ok(c) => c,
            Err(e) => {
                if was_connected {
                    tracing::info!(peer = id, %addr, "cannot reach peer: {e}");
                    was_connected = false;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
        };
        if !was_connected {
            tracing::info!(peer = id, %addr, "connected to peer");
        }
        was_connected = true;
        backoff = Duration::from_millis(20);
        let (tx, batches) = mpsc::channel::<proto::MessageBatch>(PEER_QUEUE_BATCHES);
        let mut client = NodeCommunicationClient::new(channel)
            .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX)
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX);
        set(Some(tx));
        // Runs until the stream breaks (the peer went away or the connection failed).
        if let Err(status) = client.stream(ReceiverStream::new(batches)).await {
            tracing::debug!(peer = id, "stream to peer ended: {status}");
        }
        set(None);
        tokio::time::sleep(backoff).await;
    }
}

/// What a peer said about itself when asked at start-up.
#[derive(Clone, Copy, Debug)]
pub struct PeerAnswer {
    pub id: NodeId,
    pub cluster_id: u64,
    pub term: u64,
    pub commit: u64,
}

/// Asks each of `peers` (`id -> host:port`) for its status (cluster, term, commit index),
/// concurrently, within `timeout`; returns the answers.
pub async fn probe_peers(
    peers: impl IntoIterator<Item = (NodeId, String)>,
    timeout: Duration,
    dialer: &crate::security::Dialer,
) -> Vec<PeerAnswer> {
    let mut tasks = Vec::new();
    for (id, addr) in peers {
        let dialer = dialer.clone();
        tasks.push(tokio::spawn(async move {
            let ask = async {
                let channel = dialer
                    .connect(&addr, crate::security::Purpose::Probe)
                    .await
                    .ok()?;
                let mut c = crate::proto::data_service_client::DataServiceClient::new(channel);
                let s = c.status(proto::StatusRequest {}).await.ok()?.into_inner();
                Some(PeerAnswer {
                    id,
                    cluster_id: s.cluster_id,
                    term: s.term,
                    commit: s.commit_index,
                })
            };
            tokio::time::timeout(timeout, ask).await.ok().flatten()
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        if let Ok(Some(a)) = t.await {
            answers.push(a);
        }
    }
    answers
}
