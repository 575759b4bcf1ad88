//! Outgoing Raft messages: one long-lived gRPC stream per peer, messages pipelined in batches.
//!
//! A slow or dead peer never blocks the core or the other peers: each peer has a bounded queue,
//! and a message that does not fit is dropped (Raft retries on the next heartbeat).

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::proto;
use crate::proto::node_communication_client::NodeCommunicationClient;
use crate::raft::{Message, NodeId};

use super::convert::message_to_wire;

/// Messages queued per peer before new ones are dropped.
const PEER_QUEUE_MESSAGES: usize = 4096;
/// Messages sent in one batch at most.
const BATCH_MESSAGES_MAX: usize = 512;
pub const GRPC_MESSAGE_BYTES_MAX: usize = 64 << 20;
pub const STREAM_WINDOW_BYTES: u32 = 8 << 20;
pub const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;

#[derive(Clone)]
pub struct Peers {
    queues: HashMap<NodeId, mpsc::Sender<Message>>,
}

impl Peers {
    /// Starts one sender task per peer (`id -> host:port`).
    pub fn start(peers: impl IntoIterator<Item = (NodeId, String)>) -> Peers {
        let mut queues = HashMap::new();
        for (id, addr) in peers {
            let (tx, rx) = mpsc::channel(PEER_QUEUE_MESSAGES);
            tokio::spawn(peer_loop(id, addr, rx));
            queues.insert(id, tx);
        }
        Peers { queues }
    }

    /// Queues a message; drops it if the peer's queue is full.
    pub fn send(&self, m: Message) {
        if let Some(q) = self.queues.get(&m.to)
            && q.try_send(m).is_err()
        {
            tracing::trace!("peer queue full; message dropped");
        }
    }
}

async fn peer_loop(id: NodeId, addr: String, mut rx: mpsc::Receiver<Message>) {
    let endpoint = match Endpoint::from_shared(format!("http://{addr}")) {
        Ok(e) => e
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5)),
        Err(e) => {
            tracing::error!(peer = id, %addr, "invalid peer address: {e}");
            return;
        }
    };
    let mut backoff = Duration::from_millis(20);
    let mut was_connected = true;
    loop {
        // Connect only when there is something to say.
        let Some(first) = rx.recv().await else {
            return;
        };
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(e) => {
                if was_connected {
                    tracing::info!(peer = id, %addr, "cannot reach peer: {e}");
                    was_connected = false;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                // Whatever queued up meanwhile is stale; Raft will resend what matters.
                while rx.try_recv().is_ok() {}
                continue;
            }
        };
        if !was_connected {
            tracing::info!(peer = id, %addr, "connected to peer");
        }
        was_connected = true;
        backoff = Duration::from_millis(20);
        let (tx, batches) = mpsc::channel::<proto::MessageBatch>(64);
        let mut client = NodeCommunicationClient::new(channel)
            .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX)
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX);
        let call = tokio::spawn(async move { client.stream(ReceiverStream::new(batches)).await });
        let mut pending = vec![first];
        loop {
            while pending.len() < BATCH_MESSAGES_MAX {
                match rx.try_recv() {
                    Ok(m) => pending.push(m),
                    Err(_) => break,
                }
            }
            let batch = proto::MessageBatch {
                messages: pending.drain(..).map(message_to_wire).collect(),
            };
            if tx.send(batch).await.is_err() {
                break; // the stream ended: reconnect
            }
            match rx.recv().await {
                Some(m) => pending.push(m),
                None => {
                    call.abort();
                    return;
                }
            }
        }
        if let Ok(Err(status)) = call.await {
            tracing::debug!(peer = id, "stream to peer ended: {status}");
        }
        tokio::time::sleep(backoff).await;
    }
}
