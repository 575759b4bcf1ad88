//! InstallSnapshot over gRPC: the leader streams its state machine to a follower in
//! checksummed chunks on a call (and connection) of its own; the follower stages it apart from
//! its live state and hands it to its core.
//!
//! Flow control is HTTP/2's: a chunk is read from the fjall snapshot only when the previous
//! ones have been taken by the stream, so at most a few chunks are in memory on either side.
//! Each chunk must move within [`CHUNK_TIMEOUT`], or the transfer is abandoned (a timeout per
//! chunk, not per snapshot: a large snapshot on a slow link still gets through, a stalled one
//! does not hold its slot forever).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::proto;
use crate::proto::node_communication_client::NodeCommunicationClient;
use crate::raft::{ClusterConfig, Message, MessageBody, NodeId, SnapshotMeta, Term};
use crate::storage::snapshot::{SNAPSHOT_FORMAT, checksum};
use crate::storage::{SnapshotSource, StagedState, Stager};

use super::Inbound;
use super::peer::GRPC_MESSAGE_BYTES_MAX;

/// How long one chunk may take to move, on either side, before the transfer is abandoned.
pub const CHUNK_TIMEOUT: Duration = Duration::from_secs(10);
/// Chunks read ahead of the stream on the sending side.
const CHUNKS_AHEAD: usize = 2;
/// How long the sender waits, after its last chunk, for the receiver to stage and install.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(120);

/// What a finished transfer tells the sender's core.
#[derive(Debug)]
pub struct SendOutcome {
    pub installed: bool,
    pub detail: String,
    pub bytes: u64,
    pub records: u64,
}

/// Streams `source` to the node at `addr` as `from` in `term`. Returns what the receiver
/// answered, or why the transfer failed.
pub async fn send(
    from: NodeId,
    to: NodeId,
    term: Term,
    cluster_id: u64,
    addr: &str,
    source: SnapshotSource,
    dialer: &crate::security::Dialer,
) -> Result<SendOutcome, String> {
    let channel = dialer
        .connect(addr, crate::security::Purpose::Snapshot)
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let mut client = NodeCommunicationClient::new(channel)
        .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX)
        .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX);
    let meta = source.meta;
    let header = proto::SnapshotHeader {
        from,
        to,
        term,
        index: meta.index,
        snapshot_term: meta.term,
        format: SNAPSHOT_FORMAT,
        cluster_id,
        config: source
            .config
            .as_ref()
            .map_or_else(Default::default, ClusterConfig::encode),
    };
    let (rx, reader) = read_ahead(header, source, |c| c);
    // A watchdog on progress: the time the stream last took a chunk.
    let started = Instant::now();
    let last_progress = Arc::new(AtomicU64::new(0));
    let all_sent = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (progress, sent) = (last_progress.clone(), all_sent.clone());
    let stream = ReceiverStream::new(rx).map(move |c| {
        progress.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        if c.last {
            sent.store(true, Ordering::Relaxed);
        }
        c
    });
    // Once the last chunk is out, the receiver stages and installs: that is not a stall.
    let stalled = async {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if all_sent.load(Ordering::Relaxed) {
                tokio::time::sleep(INSTALL_TIMEOUT).await;
                return format!(
                    "no answer {} s after the last chunk",
                    INSTALL_TIMEOUT.as_secs()
                );
            }
            let last = Duration::from_millis(last_progress.load(Ordering::Relaxed));
            if started.elapsed().saturating_sub(last) > CHUNK_TIMEOUT {
                return format!("no progress for {} s", CHUNK_TIMEOUT.as_secs());
            }
        }
    };
    let answer = tokio::select! {
        r = client.install_snapshot(stream) => r.map_err(|s| describe(&s)),
        why = stalled => Err(why),
    };
    let read = reader.await.map_err(|e| format!("reader: {e}"))?;
    let reply = answer?.into_inner();
    let (records, bytes) = read?;
    Ok(SendOutcome {
        installed: reply.installed,
        detail: reply.detail,
        bytes,
        records,
    })
}

/// The reader of [`read_ahead`]: the totals (records, bytes), or why it stopped.
pub type ChunkReaderTask = tokio::task::JoinHandle<Result<(u64, u64), String>>;

/// Reads `source` as a stream of chunks (header first, totals last) on a blocking thread, a
/// few chunks ahead of the consumer (the stream's flow control paces the reads). `wrap` turns
/// each chunk into the channel's item. Returns the channel and the reader, which ends with the
/// totals (records, bytes) or why it stopped.
pub fn read_ahead<T: Send + 'static>(
    header: proto::SnapshotHeader,
    source: SnapshotSource,
    wrap: impl Fn(proto::SnapshotChunk) -> T + Send + 'static,
) -> (mpsc::Receiver<T>, ChunkReaderTask) {
    let (tx, rx) = mpsc::channel::<T>(CHUNKS_AHEAD);
    let reader = tokio::task::spawn_blocking(move || -> Result<(u64, u64), String> {
        let gone = || "the receiver went away".to_string();
        let first = proto::SnapshotChunk {
            header: Some(header),
            seq: 0,
            checksum: checksum(&[]),
            ..Default::default()
        };
        tx.blocking_send(wrap(first)).map_err(|_| gone())?;
        let mut chunks = source.chunks();
        let mut seq = 1;
        while let Some(data) = chunks.next_chunk().map_err(|e| format!("reading: {e}"))? {
            let chunk = proto::SnapshotChunk {
                seq,
                checksum: checksum(&data),
                data: data.into(),
                ..Default::default()
            };
            tx.blocking_send(wrap(chunk)).map_err(|_| gone())?;
            seq += 1;
        }
        tx.blocking_send(wrap(proto::SnapshotChunk {
            seq,
            checksum: checksum(&[]),
            last: true,
            total_records: chunks.records,
            total_bytes: chunks.bytes,
            ..Default::default()
        }))
        .map_err(|_| gone())?;
        Ok((chunks.records, chunks.bytes))
    });
    (rx, reader)
}

/// Checks a complete sequence of chunks as they arrive, one by one (a backup file, read back):
/// the header first, then data chunks in order with matching checksums, then the totals.
#[derive(Default)]
pub struct ChunkVerifier {
    pub header: Option<proto::SnapshotHeader>,
    next_seq: u64,
    pub bytes: u64,
    pub done: Option<(u64, u64)>,
}

impl ChunkVerifier {
    /// Checks the next chunk; returns its data if it carries any.
    ///
    /// # Errors
    /// What is wrong with it, naming the chunk.
    pub fn check(&mut self, c: &proto::SnapshotChunk) -> Result<(), String> {
        if self.done.is_some() {
            return Err("data after the last chunk".into());
        }
        if c.seq != self.next_seq {
            return Err(format!(
                "chunk {} where chunk {} was expected",
                c.seq, self.next_seq
            ));
        }
        if checksum(&c.data) != c.checksum {
            return Err(format!("chunk {} fails its checksum", c.seq));
        }
        if c.seq == 0 {
            let h = c.header.clone().ok_or("the first chunk has no header")?;
            if h.format != SNAPSHOT_FORMAT {
                return Err(format!(
                    "snapshot format {}, this raftkv reads {SNAPSHOT_FORMAT}",
                    h.format
                ));
            }
            self.header = Some(h);
        } else if c.last {
            if c.total_bytes != self.bytes {
                return Err(format!(
                    "truncated: {} bytes announced, {} present",
                    c.total_bytes, self.bytes
                ));
            }
            self.done = Some((c.total_records, c.total_bytes));
        } else {
            self.bytes += c.data.len() as u64;
        }
        self.next_seq += 1;
        Ok(())
    }
}

fn describe(s: &Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// The receiving side: one snapshot at a time per node.
#[derive(Clone)]
pub struct Receiver {
    pub id: NodeId,
    pub cluster: super::ClusterId,
    pub stager: Stager,
    pub slots: Arc<Semaphore>,
    pub inbound: mpsc::Sender<Inbound>,
}

impl Receiver {
    pub fn new(
        id: NodeId,
        cluster: super::ClusterId,
        stager: Stager,
        inbound: mpsc::Sender<Inbound>,
    ) -> Self {
        Receiver {
            id,
            cluster,
            stager,
            slots: Arc::new(Semaphore::new(1)),
            inbound,
        }
    }

    /// Receives, verifies and stages one snapshot stream, then lets the core decide.
    pub async fn receive(
        &self,
        mut stream: Streaming<proto::SnapshotChunk>,
        is_member: impl Fn(NodeId) -> bool,
    ) -> Result<proto::SnapshotReply, Status> {
        let first = next_chunk(&mut stream).await?;
        let h = first
            .header
            .ok_or_else(|| Status::invalid_argument("snapshot stream without a header"))?;
        if h.to != self.id {
            return Err(Status::invalid_argument(format!(
                "snapshot for node {}, but this is node {}",
                h.to, self.id
            )));
        }
        if !is_member(h.from) {
            return Err(Status::permission_denied(format!(
                "snapshot from unknown node {}",
                h.from
            )));
        }
        let mine = self.cluster.load(Ordering::Relaxed);
        if mine != 0 && h.cluster_id != 0 && h.cluster_id != mine {
            return Err(Status::permission_denied(format!(
                "snapshot from node {} of cluster {}, but this node belongs to cluster {}",
                h.from,
                super::cluster_id_str(h.cluster_id),
                super::cluster_id_str(mine)
            )));
        }
        if h.format != SNAPSHOT_FORMAT {
            return Err(Status::invalid_argument(format!(
                "snapshot format {}, this node reads {SNAPSHOT_FORMAT}",
                h.format
            )));
        }
        let Ok(_slot) = self.slots.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(
                "a snapshot is already being received",
            ));
        };
        let meta = SnapshotMeta {
            index: h.index,
            term: h.snapshot_term,
        };
        let config = if h.config.is_empty() {
            None
        } else {
            Some(ClusterConfig::decode(&h.config).map_err(|e| {
                Status::invalid_argument(format!("snapshot with a bad configuration: {e}"))
            })?)
        };
        let started = Instant::now();
        let (tx, mut rx) = mpsc::channel::<Result<Vec<u8>, String>>(CHUNKS_AHEAD);
        let stager = self.stager.clone();
        // The staged state comes back on a oneshot: if this call is dropped meanwhile (the
        // sender gave up), the staging thread finds nobody waiting and deletes it.
        let (done, staging) = oneshot::channel();
        tokio::task::spawn_blocking(move || {
            let r = stager.stage(meta, std::iter::from_fn(move || rx.blocking_recv()));
            if let Err(Ok(staged)) = done.send(r) {
                stager.discard(staged);
            }
        });
        let fed = feed(&mut stream, &tx).await;
        if let Err(e) = &fed {
            let _ = tx.send(Err(e.message().to_string())).await;
        }
        drop(tx);
        let staged = staging
            .await
            .map_err(|_| Status::internal("staging the snapshot failed"))?;
        let (records, bytes) = fed?;
        let mut staged = staged.map_err(|e| Status::data_loss(format!("snapshot refused: {e}")))?;
        staged.cluster_id = h.cluster_id;
        staged.config = config.clone();
        if staged.records != records {
            self.stager.discard(staged);
            return Err(Status::data_loss(format!(
                "snapshot truncated: {records} records announced, fewer staged"
            )));
        }
        tracing::info!(
            node = self.id,
            from = h.from,
            index = meta.index,
            term = meta.term,
            records,
            mib = bytes as f64 / (1 << 20) as f64,
            secs = started.elapsed().as_secs_f64(),
            "snapshot received and staged"
        );
        let (reply, answer) = oneshot::channel();
        let message = Message {
            from: h.from,
            to: h.to,
            term: h.term,
            body: MessageBody::InstallSnapshot {
                snapshot: meta,
                config: config.unwrap_or_default(),
            },
        };
        // A slot first, then the hand-over without an await: the staged state is never
        // dropped on the way (it would stay on disk until the next restart).
        let Ok(permit) = self.inbound.reserve().await else {
            self.stager.discard(staged);
            return Err(Status::unavailable("node is shutting down"));
        };
        permit.send(Inbound::Snapshot {
            message,
            staged,
            reply,
        });
        let (installed, detail) = answer
            .await
            .map_err(|_| Status::unavailable("node is shutting down"))?;
        Ok(proto::SnapshotReply { installed, detail })
    }
}

/// The next chunk, within [`CHUNK_TIMEOUT`].
async fn next_chunk(
    stream: &mut Streaming<proto::SnapshotChunk>,
) -> Result<proto::SnapshotChunk, Status> {
    match tokio::time::timeout(CHUNK_TIMEOUT, stream.message()).await {
        Ok(Ok(Some(c))) => Ok(c),
        Ok(Ok(None)) => Err(Status::data_loss(
            "snapshot stream ended before its last chunk",
        )),
        Ok(Err(s)) => Err(s),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no snapshot chunk for {} s",
            CHUNK_TIMEOUT.as_secs()
        ))),
    }
}

/// Feeds the data of chunks 1.. to the stager, each verified (order and checksum); returns
/// the totals of the last chunk, checked against what arrived.
async fn feed(
    stream: &mut Streaming<proto::SnapshotChunk>,
    tx: &mpsc::Sender<Result<Vec<u8>, String>>,
) -> Result<(u64, u64), Status> {
    let mut bytes = 0u64;
    for seq in 1.. {
        let c = next_chunk(stream).await?;
        if c.seq != seq {
            return Err(Status::data_loss(format!(
                "snapshot chunk {} arrived where {seq} was expected",
                c.seq
            )));
        }
        if checksum(&c.data) != c.checksum {
            return Err(Status::data_loss(format!(
                "snapshot chunk {seq} is damaged (checksum mismatch)"
            )));
        }
        if c.last {
            if !c.data.is_empty() || c.total_bytes != bytes {
                return Err(Status::data_loss(format!(
                    "snapshot truncated: {} bytes announced, {bytes} received",
                    c.total_bytes
                )));
            }
            return Ok((c.total_records, bytes));
        }
        bytes += c.data.len() as u64;
        if tx.send(Ok(c.data.to_vec())).await.is_err() {
            // The stager stopped (a bad record); its error is reported.
            return Ok((u64::MAX, bytes));
        }
    }
    Err(Status::data_loss("snapshot stream too long"))
}

/// A staged snapshot waiting in the core for its `Ready`, with the stream's answer.
pub struct PendingInstall {
    pub staged: StagedState,
    pub reply: oneshot::Sender<(bool, String)>,
}
