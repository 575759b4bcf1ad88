//! The node runtime: one task owns the Raft core and executes its output.
//!
//! 1. It waits for input (a tick, a peer message, a client request), then takes *all* pending
//!    input before asking the core for `Ready`, so that many proposals become one batch: one
//!    log write, one fsync, one append message per follower.
//! 2. It executes each `Ready` in the order the core demands: send requests; persist entries and
//!    hard state (fsync); send responses; apply committed entries (state machine and applied
//!    index in one batch); answer clients whose writes applied or whose reads are now safe.
//! 3. A storage failure is fatal: the node stops rather than run on state it cannot trust.
//!
//! The core loop runs on its own OS thread, since fjall's writes and fsyncs block.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tonic::transport::server::TcpIncoming;

use crate::config::Config;
use crate::proto::data_service_server::DataServiceServer;
use crate::proto::node_communication_server::NodeCommunicationServer;
use crate::raft::{self, LogIndex, LogStore, NodeId, Raft, Role, Term};
use crate::storage::command::{Command, Op, RequestId};
use crate::storage::{self, ApplyOutcome, DiskLog, KvStore};
use crate::transport::peer::{
    CONNECTION_WINDOW_BYTES, GRPC_MESSAGE_BYTES_MAX, Peers, STREAM_WINDOW_BYTES,
};
use crate::transport::server::{ClientService, Limits, PeerService};
use crate::transport::{ClientRequest, Inbound, NodeStatus, PeerStatus, Reply, ServiceError};

/// Inputs queued for the core before senders wait.
const INBOUND_QUEUE: usize = 16 * 1024;
/// Inputs taken in one round before the core produces a `Ready`.
const ROUND_INPUTS_MAX: usize = 8192;

/// Runs node `id` until `shutdown` fires. Binds its port first, so that a port in use is
/// reported before anything else happens.
///
/// # Errors
/// A port in use, an unusable data directory, or a fatal storage failure while running.
pub async fn run(
    cfg: Config,
    id: NodeId,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let me = cfg
        .node(id)
        .ok_or_else(|| anyhow!("node id {id} is not in the config (ids: {:?})", cfg.ids()))?
        .clone();
    let listener = bind(&me.host, me.port).await?;
    let local = listener.local_addr().context("reading the bound address")?;

    let dir = cfg.node_data_dir(id);
    let recovered = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || storage::open(&dir, id)
    })
    .await
    .context("opening storage")??;
    tracing::info!(
        node = id,
        %local,
        dir = %dir.display(),
        term = recovered.hard_state.term,
        last_index = recovered.log.last_index(),
        applied = recovered.kv.applied(),
        "node starting"
    );

    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
    let peers = Peers::start(
        cfg.nodes
            .iter()
            .filter(|n| n.id != id)
            .map(|n| (n.id, n.addr())),
    );

    let peer_service = PeerService {
        id,
        members: cfg.ids(),
        inbound: inbound_tx.clone(),
    };
    let client_service = ClientService {
        inbound: inbound_tx.clone(),
        limits: Limits {
            max_key_bytes: cfg.max_key_bytes(),
            max_value_bytes: cfg.max_value_bytes(),
        },
    };
    // Stops the server and the core: on a signal, or when the core stops by itself (a fatal
    // storage error), so that the process exits instead of serving without a core.
    let (stop_tx, stop_rx) = watch::channel(false);
    let server_shutdown = {
        let mut s = stop_rx.clone();
        async move {
            let _ = s.wait_for(|v| *v).await;
        }
    };
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .add_service(
            NodeCommunicationServer::new(peer_service)
                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        )
        .add_service(
            DataServiceServer::new(client_service)
                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        )
        // Nagle's algorithm would hold small answers back until the client's delayed ACK (40 ms).
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            server_shutdown,
        );
    let server = tokio::spawn(server);

    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ id;
    let raft_cfg = cfg.raft_config(id, seed);
    let raft = Raft::new(
        raft_cfg,
        recovered.log,
        recovered.hard_state,
        recovered.kv.applied(),
    )?;
    let core = Core {
        id,
        raft,
        kv: recovered.kv,
        peers,
        addrs: cfg.addrs(),
        writes: BTreeMap::new(),
        reads: HashMap::new(),
        confirmed_reads: BTreeMap::new(),
        next_read: 0,
        role: Role::Follower,
        leader: 0,
    };
    let tick = Duration::from_millis(cfg.tick_ms());
    let handle = tokio::runtime::Handle::current();
    let (core_done_tx, core_done_rx) = tokio::sync::oneshot::channel::<()>();
    let core_thread = std::thread::Builder::new()
        .name(format!("raft-core-{id}"))
        .spawn(move || {
            let result = handle.block_on(core.run(inbound_rx, tick, stop_rx));
            let _ = core_done_tx.send(());
            result
        })
        .context("starting the core thread")?;
    tracing::info!(node = id, %local, "listening");

    tokio::select! {
        _ = shutdown.wait_for(|v| *v) => tracing::info!(node = id, "shutting down"),
        _ = core_done_rx => tracing::error!(node = id, "the Raft core stopped; shutting down"),
    }
    let _ = stop_tx.send(true);
    let core_result = tokio::task::spawn_blocking(move || core_thread.join())
        .await
        .context("joining the core thread")?
        .map_err(|_| anyhow!("the core thread panicked"))?;
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    core_result
}

/// Binds the node's port, with an error that names it if it is taken.
async fn bind(host: &str, port: u16) -> anyhow::Result<TcpListener> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("cannot resolve host {host:?}"))?
        .collect();
    let mut last = None;
    for addr in addrs {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                return Err(anyhow!(
                    "port {port} is already in use ({host}:{port}); is another raftkv node or program running on it?"
                ));
            }
            Err(e) => last = Some(anyhow!("cannot listen on {addr}: {e}")),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("host {host:?} resolves to no address")))
}

/// A linearizable read: the key, and where to send the value.
type PendingRead = (Bytes, Reply<Option<Bytes>>);

enum PendingWrite {
    Put(Reply<LogIndex>),
    Delete(Reply<(bool, LogIndex)>),
}

struct Core {
    id: NodeId,
    raft: Raft<DiskLog>,
    kv: KvStore,
    peers: Peers,
    addrs: BTreeMap<NodeId, String>,
    /// Proposed writes by log index, with the term they were proposed in.
    writes: BTreeMap<LogIndex, (Term, PendingWrite)>,
    /// Reads waiting for leadership confirmation, by ReadIndex context.
    reads: HashMap<u64, PendingRead>,
    /// Confirmed reads waiting for the state machine to reach their index.
    confirmed_reads: BTreeMap<LogIndex, Vec<PendingRead>>,
    next_read: u64,
    role: Role,
    leader: NodeId,
}

impl Core {
    async fn run(
        mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        tick: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|v| *v) => break,
                _ = ticker.tick() => self.raft.tick(),
                input = inbound.recv() => match input {
                    Some(input) => self.handle(input)?,
                    None => break,
                },
            }
            for _ in 0..ROUND_INPUTS_MAX {
                match inbound.try_recv() {
                    Ok(input) => self.handle(input)?,
                    Err(_) => break,
                }
            }
            while self.raft.has_ready() {
                self.process_ready()?;
            }
            // Pipelined answers of this round go out together, one batch per client call.
            crate::transport::flush_replies();
        }
        self.fail_all(|| ServiceError::ShuttingDown);
        crate::transport::flush_replies();
        Ok(())
    }

    fn not_leader(&self) -> ServiceError {
        let leader = self.raft.leader();
        ServiceError::NotLeader {
            leader_id: (leader != 0).then_some(leader),
            leader_addr: self.addrs.get(&leader).cloned(),
        }
    }

    fn handle(&mut self, input: Inbound) -> anyhow::Result<()> {
        match input {
            Inbound::Peers(ms) => {
                for m in ms {
                    self.raft.step(m)?;
                }
            }
            Inbound::Client(r) => self.handle_client(r),
            Inbound::Clients(rs) => {
                for r in rs {
                    self.handle_client(r);
                }
            }
        }
        Ok(())
    }

    fn handle_client(&mut self, request: ClientRequest) {
        match request {
            ClientRequest::Put {
                key,
                value,
                id,
                reply,
            } => {
                self.propose(Op::Put { key, value }, id, PendingWrite::Put(reply));
            }
            ClientRequest::Delete { key, id, reply } => {
                self.propose(Op::Delete { key }, id, PendingWrite::Delete(reply));
            }
            ClientRequest::Get {
                key,
                stale: true,
                min_index,
                reply,
            } => {
                if min_index > self.kv.applied() {
                    // The client's own last write is not applied here yet: wait for it like
                    // a confirmed read.
                    self.confirmed_reads
                        .entry(min_index)
                        .or_default()
                        .push((key, reply));
                } else {
                    let _ = reply.send(
                        self.kv
                            .get(&key)
                            .map_err(|e| ServiceError::Storage(e.to_string())),
                    );
                }
            }
            ClientRequest::Get {
                key,
                stale: false,
                reply,
                ..
            } => {
                self.next_read += 1;
                let ctx = self.next_read;
                match self.raft.read_index(ctx) {
                    Ok(()) => {
                        self.reads.insert(ctx, (key, reply));
                    }
                    Err(_) => {
                        let _ = reply.send(Err(self.not_leader()));
                    }
                }
            }
            ClientRequest::Status { reply } => {
                let _ = reply.send(Ok(self.status()));
            }
        }
    }

    fn propose(&mut self, op: Op, id: RequestId, pending: PendingWrite) {
        let data = Command { id, op }.encode();
        match self.raft.propose(data) {
            Ok((index, term)) => {
                self.writes.insert(index, (term, pending));
            }
            Err(e) => {
                let err = match e {
                    raft::Error::ProposalDropped(bytes) => ServiceError::Busy(bytes),
                    _ => self.not_leader(),
                };
                match pending {
                    PendingWrite::Put(r) => {
                        let _ = r.send(Err(err));
                    }
                    PendingWrite::Delete(r) => {
                        let _ = r.send(Err(err));
                    }
                }
            }
        }
    }

    fn status(&self) -> NodeStatus {
        let s = self.raft.status();
        NodeStatus {
            id: s.id,
            role: s.role.as_str().to_string(),
            term: s.term,
            leader_id: s.leader,
            leader_addr: self.addrs.get(&s.leader).cloned().unwrap_or_default(),
            commit_index: s.commit,
            applied_index: s.applied,
            first_log_index: s.first_index,
            last_log_index: s.last_index,
            voters: s.voters,
            progress: s
                .progress
                .into_iter()
                .map(|(id, match_index, next_index, active)| PeerStatus {
                    id,
                    match_index,
                    next_index,
                    active,
                })
                .collect(),
        }
    }

    fn fail_all(&mut self, err: impl Fn() -> ServiceError) {
        for (_, (_, w)) in std::mem::take(&mut self.writes) {
            match w {
                PendingWrite::Put(r) => {
                    let _ = r.send(Err(err()));
                }
                PendingWrite::Delete(r) => {
                    let _ = r.send(Err(err()));
                }
            }
        }
        for (_, (_, r)) in self.reads.drain() {
            let _ = r.send(Err(err()));
        }
        for (_, waiting) in std::mem::take(&mut self.confirmed_reads) {
            for (_, r) in waiting {
                let _ = r.send(Err(err()));
            }
        }
    }

    fn process_ready(&mut self) -> anyhow::Result<()> {
        let rd = self.raft.ready()?;
        if let Some(ss) = rd.soft_state {
            if ss.role != self.role || ss.leader != self.leader {
                tracing::info!(node = self.id, role = %ss.role, leader = ss.leader, term = self.raft.term(), "role changed");
            }
            if self.role == Role::Leader && ss.role != Role::Leader {
                // Writes in flight may still commit under the next leader, or be replaced.
                self.fail_all(|| ServiceError::LeadershipLost);
            }
            self.role = ss.role;
            self.leader = ss.leader;
        }
        // 1. Requests (a leader's appends) go out in parallel with our own write.
        let (requests, responses): (Vec<_>, Vec<_>) = rd
            .messages
            .into_iter()
            .partition(|m| !m.needs_persisted_state());
        for m in requests {
            self.peers.push(m);
        }
        self.peers.flush();
        // 2. Make entries and hard state durable: one batch, at most one fsync.
        if !rd.entries.is_empty() || rd.hard_state.is_some() {
            self.raft
                .store_mut()
                .append(&rd.entries, rd.hard_state, rd.must_sync)
                .context("persisting the Raft log")?;
        }
        // 3. Responses promise durable state; it is durable now.
        for m in responses {
            self.peers.push(m);
        }
        self.peers.flush();
        // 4. Apply committed entries and answer their clients.
        if !rd.committed_entries.is_empty() {
            let outcomes = self
                .kv
                .apply(&rd.committed_entries)
                .context("applying committed entries")?;
            for (e, outcome) in rd.committed_entries.iter().zip(outcomes) {
                let Some((term, w)) = self.writes.remove(&e.index) else {
                    continue;
                };
                let ok = term == e.term;
                match (w, outcome) {
                    (PendingWrite::Put(r), _) => {
                        let _ = r.send(if ok {
                            Ok(e.index)
                        } else {
                            Err(ServiceError::NotCommitted)
                        });
                    }
                    (
                        PendingWrite::Delete(r),
                        ApplyOutcome::Delete { existed } | ApplyOutcome::Duplicate { existed },
                    ) => {
                        let _ = r.send(if ok {
                            Ok((existed, e.index))
                        } else {
                            Err(ServiceError::NotCommitted)
                        });
                    }
                    (PendingWrite::Delete(r), _) => {
                        let _ = r.send(Err(ServiceError::NotCommitted));
                    }
                }
            }
        }
        // 5. Reads: confirmed ones are served once the state machine has caught up.
        for rs in rd.read_states {
            if let Some(read) = self.reads.remove(&rs.ctx) {
                self.confirmed_reads.entry(rs.index).or_default().push(read);
            }
        }
        for ctx in rd.dropped_reads {
            if let Some((_, r)) = self.reads.remove(&ctx) {
                let _ = r.send(Err(ServiceError::LeadershipLost));
            }
        }
        let applied = self.kv.applied();
        while let Some(entry) = self.confirmed_reads.first_entry() {
            if *entry.key() > applied {
                break;
            }
            for (key, r) in entry.remove() {
                let _ = r.send(
                    self.kv
                        .get(&key)
                        .map_err(|e| ServiceError::Storage(e.to_string())),
                );
            }
        }
        self.raft.advance();
        Ok(())
    }
}
