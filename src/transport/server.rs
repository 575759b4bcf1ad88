//! The gRPC servers: peers' Raft streams and the client API. Client input is checked here
//! (sizes, empty keys) before it reaches the node.

use std::time::Duration;

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::Op;
use crate::proto;
use crate::proto::data_service_server::DataService;
use crate::proto::node_communication_server::NodeCommunication;
use crate::raft::{LogIndex, NodeId};
use crate::security::auth::{self, Action, Auth, Principal};
use crate::storage::command::RequestId;

use super::convert::message_from_wire;
use super::{
    ClientRequest, Inbound, LEADER_ADDR_HEADER, LEADER_ID_HEADER, NodeStatus, Reply, ReplySink,
    ServiceError,
};

/// How long a client request may wait for the node (commit, read confirmation) by default.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests of one pipeline call that may wait for answers at a time; more wait to be read.
const PIPELINE_IN_FLIGHT_MAX: usize = 16 * 1024;

#[derive(Clone)]
pub struct Limits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
}

#[derive(Clone)]
pub struct PeerService {
    pub id: NodeId,
    pub inbound: mpsc::Sender<Inbound>,
    pub snapshots: super::snapshot::Receiver,
    pub cluster: super::ClusterId,
    /// The node serves TLS: every call must come with a node certificate of the cluster CA,
    /// and speak only as that node.
    pub tls: bool,
}

/// The node a peer call's certificate names (None on a plaintext node).
///
/// # Errors
/// PERMISSION_DENIED without a node certificate (a user's certificate, a token, nothing).
fn peer_node<T>(tls: bool, request: &Request<T>) -> Result<Option<NodeId>, Status> {
    use crate::security::listener::{ConnInfo, PeerIdentity};
    if !tls {
        return Ok(None);
    }
    let info = request.extensions().get::<ConnInfo>();
    match info.map(|i| &i.peer) {
        Some(PeerIdentity::Node(id)) => Ok(Some(*id)),
        other => {
            let what = match other {
                Some(PeerIdentity::User(u)) => format!("a user's certificate ({u})"),
                _ => "no certificate".to_string(),
            };
            let from = info.map_or_else(|| "?".to_string(), |i| i.remote.to_string());
            tracing::warn!(%from, "refused a peer call with {what}: the peer service accepts node certificates only");
            Err(Status::permission_denied(format!(
                "permission denied: the peer service accepts node certificates of the cluster CA only, and this call came with {what}"
            )))
        }
    }
}

#[tonic::async_trait]
impl NodeCommunication for PeerService {
    async fn stream(
        &self,
        request: Request<Streaming<proto::MessageBatch>>,
    ) -> Result<Response<proto::StreamClosed>, Status> {
        let sender = peer_node(self.tls, &request)?;
        let mut stream = request.into_inner();
        let mut warned = false;
        while let Some(batch) = stream.message().await? {
            if let Some(cert) = sender
                && let Some(m) = batch.messages.iter().find(|m| m.from != cert)
            {
                // A real node's certificate speaking as another node: none of the stream's
                // messages is trusted.
                tracing::warn!(
                    node = self.id,
                    "refused a stream: node {cert}'s certificate sent a message from node {}",
                    m.from
                );
                return Err(Status::permission_denied(format!(
                    "permission denied: node {cert}'s certificate may send messages from node {cert} only, not from node {}",
                    m.from
                )));
            }
            let mine = self.cluster.load(std::sync::atomic::Ordering::Relaxed);
            if let Some(m) = batch
                .messages
                .iter()
                .find(|m| mine != 0 && m.cluster_id != 0 && m.cluster_id != mine)
            {
                // Another cluster's node (a misplaced data directory or a wrong address): its
                // messages must not touch our term or log.
                if !warned {
                    tracing::warn!(
                        "ignoring node {}: it belongs to cluster {}, this node to cluster {}",
                        m.from,
                        super::cluster_id_str(m.cluster_id),
                        super::cluster_id_str(mine)
                    );
                    warned = true;
                }
                continue;
            }
            let messages = batch
                .messages
                .into_iter()
                .map(|m| message_from_wire(m, self.id, super::is_peer))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    tracing::warn!("dropping a stream with an invalid peer message: {e}");
                    Status::invalid_argument(e.to_string())
                })?;
            // The whole batch is one input for the core: one wake-up, not one per message.
            if self.inbound.send(Inbound::Peers(messages)).await.is_err() {
                return Err(Status::unavailable("node is shutting down"));
            }
        }
        Ok(Response::new(proto::StreamClosed {}))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<proto::SnapshotChunk>>,
    ) -> Result<Response<proto::SnapshotReply>, Status> {
        let sender = peer_node(self.tls, &request)?;
        // A snapshot's header names its sender: it must be the certificate's node.
        let reply = self
            .snapshots
            .receive(request.into_inner(), move |from| {
                super::is_peer(from) && sender.is_none_or(|s| s == from)
            })
            .await
            .inspect_err(|s| tracing::warn!(node = self.id, "snapshot refused: {}", s.message()))?;
        Ok(Response::new(reply))
    }
}

#[derive(Clone)]
pub struct ClientService {
    pub inbound: mpsc::Sender<Inbound>,
    pub limits: Limits,
    /// Counts and times requests, when the node records metrics.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Who may do what: every request is checked (see `security::auth`).
    pub auth: Arc<Auth>,
}

pub fn status_from(e: ServiceError) -> Status {
    let msg = e.to_string();
    match e {
        ServiceError::NotLeader {
            leader_id,
            leader_addr,
        } => {
            let mut s = Status::failed_precondition(msg);
            if let Some(Ok(v)) = leader_id.map(|id| MetadataValue::try_from(id.to_string())) {
                s.metadata_mut().insert(LEADER_ID_HEADER, v);
            }
            if let Some(Ok(v)) = leader_addr.map(MetadataValue::try_from) {
                s.metadata_mut().insert(LEADER_ADDR_HEADER, v);
            }
            s
        }
        ServiceError::LeadershipLost | ServiceError::NotCommitted => Status::aborted(e.to_string()),
        ServiceError::Busy(_) => Status::resource_exhausted(e.to_string()),
        ServiceError::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
        ServiceError::TryAgain(_) => Status::unavailable(e.to_string()),
        ServiceError::ShuttingDown => Status::unavailable(e.to_string()),
        ServiceError::Storage(_) => Status::internal(e.to_string()),
    }
}

impl ClientService {
    /// Hands one request to the core and waits for its answer (counted and timed as `op`).
    async fn call<T>(
        &self,
        op: crate::metrics::Op,
        make: impl FnOnce(Reply<T>) -> Result<ClientRequest, Status>,
        what: &str,
    ) -> Result<T, Status> {
        let Some(m) = &self.metrics else {
            return self.call_core(make, what).await;
        };
        let started = std::time::Instant::now();
        let r = self.call_core(make, what).await;
        let code = r.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
        m.request(op, code, started.elapsed());
        r
    }

    async fn call_core<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Result<ClientRequest, Status>,
        what: &str,
    ) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.inbound
            .send(Inbound::Client(make(Reply::Once(tx))?))
            .await
            .map_err(|_| status_from(ServiceError::ShuttingDown))?;
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(r)) => r.map_err(status_from),
            Ok(Err(_)) => Err(status_from(ServiceError::ShuttingDown)),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "{what} did not complete within {}s: the cluster may have no quorum{}",
                REQUEST_TIMEOUT.as_secs(),
                if what == "write" {
                    "; the write's outcome is unknown (it may still be applied)"
                } else {
                    ""
                }
            ))),
        }
    }

    /// Checks a key; for a write (`write`), the error says that nothing was written.
    fn check_key(&self, key: &[u8], write: bool) -> Result<(), Status> {
        let nothing = if write { "; nothing was written" } else { "" };
        if key.is_empty() {
            return Err(Status::invalid_argument(format!(
                "the key must not be empty{nothing}"
            )));
        }
        if key.len() > self.limits.max_key_bytes {
            return Err(Status::invalid_argument(format!(
                "key of {} bytes exceeds the limit of {} bytes (max_key_bytes){nothing}",
                key.len(),
                self.limits.max_key_bytes
            )));
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<(), Status> {
        if value.len() > self.limits.max_value_bytes {
            return Err(Status::invalid_argument(format!(
                "value of {} bytes exceeds the limit of {} bytes (max_value_bytes); nothing was written",
                value.len(),
                self.limits.max_value_bytes
            )));
        }
        Ok(())
    }

    /// Checks a put and turns it into a request for the core, answered by `reply`.
    fn put_request(
        &self,
        who: &Who,
        p: proto::PutRequest,
        reply: Reply<LogIndex>,
    ) -> Result<ClientRequest, Status> {
        let who = who.as_ref().map_err(|s| nothing_written(s.clone()))?;
        auth::check(who, Action::Write(&p.key)).map_err(nothing_written)?;
        self.check_key(&p.key, true)?;
        self.check_value(&p.value)?;
        Ok(ClientRequest::Put {
            key: p.key,
            value: p.value,
            id: request_id(p.id),
            reply,
        })
    }

    fn get_request(
        &self,
        who: &Who,
        g: proto::GetRequest,
        reply: Reply<Option<Bytes>>,
    ) -> Result<ClientRequest, Status> {
        let who = who.as_ref().map_err(Clone::clone)?;
        auth::check(who, Action::Read(&g.key))?;
        self.check_key(&g.key, false)?;
        Ok(ClientRequest::Get {
            key: g.key,
            stale: g.stale,
            min_index: g.min_index,
            reply,
        })
    }

    fn delete_request(
        &self,
        who: &Who,
        d: proto::DeleteRequest,
        reply: Reply<(bool, LogIndex)>,
    ) -> Result<ClientRequest, Status> {
        let who = who.as_ref().map_err(|s| nothing_written(s.clone()))?;
        auth::check(who, Action::Write(&d.key)).map_err(nothing_written)?;
        self.check_key(&d.key, true)?;
        Ok(ClientRequest::Delete {
            key: d.key,
            id: request_id(d.id),
            reply,
        })
    }

    /// Checks one pipelined request and turns it into a request for the core, answered into
    /// `sink` exactly as the unary call would answer.
    fn prepare(
        &self,
        who: &Who,
        r: proto::TaggedRequest,
        sink: &ReplySink,
    ) -> Result<ClientRequest, Status> {
        use proto::tagged_reply::Reply as Out;
        use proto::tagged_request::Request as In;
        let tag = r.tag;
        let Some(request) = r.request else {
            return Err(Status::invalid_argument("empty request"));
        };
        let (op, r) = match request {
            In::Put(p) => (
                Op::Put,
                self.put_request(
                    who,
                    p,
                    Reply::tagged(tag, sink, Op::Put, |i| Out::Put(put_response(i))),
                ),
            ),
            In::Get(g) => {
                let op = if g.stale { Op::GetStale } else { Op::Get };
                (
                    op,
                    self.get_request(
                        who,
                        g,
                        Reply::tagged(tag, sink, op, |v| Out::Get(get_response(v))),
                    ),
                )
            }
            In::Delete(d) => (
                Op::Delete,
                self.delete_request(
                    who,
                    d,
                    Reply::tagged(tag, sink, Op::Delete, |r| Out::Delete(delete_response(r))),
                ),
            ),
        };
        // Refused here, before the core: counted here (the core's answers count themselves).
        if let (Err(s), Some(m)) = (&r, &self.metrics) {
            m.request(op, s.code(), Duration::ZERO);
        }
        r
    }

    /// Serves one `Pipeline` call: takes request batches and hands each batch's valid requests
    /// to the core at once. The core answers into the call's sink; invalid requests are
    /// answered here. At most `PIPELINE_IN_FLIGHT_MAX` requests wait for answers at a time.
    async fn serve_pipeline(
        self,
        creds: auth::Credentials,
        mut incoming: Streaming<proto::RequestBatch>,
        out: mpsc::UnboundedSender<Result<proto::ReplyBatch, Status>>,
    ) {
        // Resolved again whenever the users file is reloaded: a user removed or demoted loses
        // what it may do on calls it has open, from their next batch.
        let mut generation = self.auth.generation();
        let mut who: Who = self.auth.resolve(&creds);
        let credit = Arc::new(Semaphore::new(PIPELINE_IN_FLIGHT_MAX));
        let sink = ReplySink::new(out.clone(), credit.clone(), self.metrics.clone());
        while let Ok(Some(batch)) = incoming.message().await {
            if self.auth.generation() != generation {
                generation = self.auth.generation();
                who = self.auth.resolve(&creds);
            }
            let mut to_core = Vec::with_capacity(batch.requests.len());
            let mut refused = Vec::new();
            for r in batch.requests {
                let tag = r.tag;
                match self.prepare(&who, r, &sink) {
                    Ok(req) => to_core.push(req),
                    Err(s) => refused.push(proto::TaggedReply {
                        tag,
                        reply: Some(proto::tagged_reply::Reply::Error(request_error(&s))),
                    }),
                }
            }
            if !refused.is_empty()
                && out
                    .send(Ok(proto::ReplyBatch { replies: refused }))
                    .is_err()
            {
                return;
            }
            if to_core.is_empty() {
                continue;
            }
            let n = u32::try_from(to_core.len().min(PIPELINE_IN_FLIGHT_MAX)).unwrap_or(u32::MAX);
            match credit.acquire_many(n).await {
                Ok(permits) => permits.forget(), // returned as the answers go out
                Err(_) => return,
            }
            if self.inbound.send(Inbound::Clients(to_core)).await.is_err() {
                let _ = out.send(Err(status_from(ServiceError::ShuttingDown)));
                return;
            }
        }
    }
}

/// A pipelined request's error: the status the unary call would have returned.
pub fn request_error(s: &Status) -> proto::RequestError {
    let header = |name| {
        s.metadata()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    proto::RequestError {
        code: s.code() as i32,
        message: s.message().to_string(),
        leader_id: header(LEADER_ID_HEADER)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        leader_addr: header(LEADER_ADDR_HEADER).unwrap_or_default(),
    }
}

fn put_response(index: LogIndex) -> proto::PutResponse {
    proto::PutResponse { index }
}

fn get_response(value: Option<Bytes>) -> proto::GetResponse {
    proto::GetResponse {
        found: value.is_some(),
        value: value.unwrap_or_default(),
    }
}

fn delete_response((existed, index): (bool, LogIndex)) -> proto::DeleteResponse {
    proto::DeleteResponse { existed, index }
}

fn request_id(id: Option<proto::RequestId>) -> RequestId {
    id.map_or(RequestId::default(), |i| RequestId {
        client_id: i.client_id,
        seq: i.seq,
    })
}

#[tonic::async_trait]
impl DataService for ClientService {
    async fn put(
        &self,
        request: Request<proto::PutRequest>,
    ) -> Result<Response<proto::PutResponse>, Status> {
        let who = self.auth.principal(&request);
        let r = request.into_inner();
        let index = self
            .call(Op::Put, |reply| self.put_request(&who, r, reply), "write")
            .await?;
        Ok(Response::new(put_response(index)))
    }

    async fn get(
        &self,
        request: Request<proto::GetRequest>,
    ) -> Result<Response<proto::GetResponse>, Status> {
        let who = self.auth.principal(&request);
        let r = request.into_inner();
        let op = if r.stale { Op::GetStale } else { Op::Get };
        let value = self
            .call(op, |reply| self.get_request(&who, r, reply), "read")
            .await?;
        Ok(Response::new(get_response(value)))
    }

    async fn delete(
        &self,
        request: Request<proto::DeleteRequest>,
    ) -> Result<Response<proto::DeleteResponse>, Status> {
        let who = self.auth.principal(&request);
        let r = request.into_inner();
        let answer = self
            .call(
                Op::Delete,
                |reply| self.delete_request(&who, r, reply),
                "write",
            )
            .await?;
        Ok(Response::new(delete_response(answer)))
    }

    type PipelineStream = UnboundedReceiverStream<Result<proto::ReplyBatch, Status>>;

    async fn pipeline(
        &self,
        request: Request<Streaming<proto::RequestBatch>>,
    ) -> Result<Response<Self::PipelineStream>, Status> {
        // A caller who is nobody gets each request refused in its answer, as the unary calls
        // refuse it (a write's refusal says that nothing was written).
        let creds = Auth::credentials(&request);
        let (out, answers) = mpsc::unbounded_channel();
        tokio::spawn(
            self.clone()
                .serve_pipeline(creds, request.into_inner(), out),
        );
        Ok(Response::new(UnboundedReceiverStream::new(answers)))
    }

    type SaveSnapshotStream =
        tokio_stream::wrappers::ReceiverStream<Result<proto::SnapshotChunk, Status>>;

    async fn save_snapshot(
        &self,
        req: Request<proto::SaveSnapshotRequest>,
    ) -> Result<Response<Self::SaveSnapshotStream>, Status> {
        self.auth.authorize(&req, Action::SaveSnapshot)?;
        let b: super::BackupSource = self
            .call(
                Op::Snapshot,
                |reply| Ok(ClientRequest::Snapshot { reply }),
                "snapshot",
            )
            .await?;
        let meta = b.source.meta;
        let header = proto::SnapshotHeader {
            from: b.from,
            to: 0,
            term: b.term,
            index: meta.index,
            snapshot_term: meta.term,
            format: crate::storage::snapshot::SNAPSHOT_FORMAT,
            cluster_id: b.cluster_id,
            config: b
                .source
                .config
                .as_ref()
                .map_or_else(Default::default, crate::raft::ClusterConfig::encode),
        };
        let (rx, reader) = super::snapshot::read_ahead(header, b.source, Ok);
        tokio::spawn(async move {
            if let Ok(Err(e)) = reader.await {
                tracing::warn!("backup stream ended early: {e}");
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn transfer_leader(
        &self,
        req: Request<proto::TransferLeaderRequest>,
    ) -> Result<Response<proto::TransferLeaderResponse>, Status> {
        self.auth.authorize(&req, Action::TransferLeader)?;
        let target = req.into_inner().target;
        let (from, to, term) = self
            .call(
                Op::TransferLeader,
                |reply| Ok(ClientRequest::TransferLeader { target, reply }),
                "leadership transfer",
            )
            .await?;
        Ok(Response::new(proto::TransferLeaderResponse {
            from,
            to,
            term,
        }))
    }

    async fn change_membership(
        &self,
        req: Request<proto::MembershipRequest>,
    ) -> Result<Response<proto::MembershipResponse>, Status> {
        use crate::raft::ConfChange;
        let who = self.auth.principal(&req)?;
        let r = req.into_inner();
        if let Ok(op) = proto::MembershipOp::try_from(r.op) {
            auth::check(&who, Action::Membership { op, id: r.id })?;
        } else {
            // An unknown operation is refused below; only an admin learns that.
            auth::check(
                &who,
                Action::Membership {
                    op: proto::MembershipOp::Remove,
                    id: r.id,
                },
            )?;
        }
        if r.id == 0 {
            return Err(Status::invalid_argument("node id 0 is reserved"));
        }
        let change = match proto::MembershipOp::try_from(r.op) {
            Ok(proto::MembershipOp::AddLearner) => {
                crate::config::check_address(&r.address).map_err(|e| {
                    Status::invalid_argument(format!("address {:?}: {e}", r.address))
                })?;
                ConfChange::AddLearner {
                    id: r.id,
                    address: r.address,
                }
            }
            Ok(proto::MembershipOp::Promote) => ConfChange::Promote { id: r.id },
            Ok(proto::MembershipOp::Remove) => ConfChange::Remove { id: r.id },
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown membership operation {}",
                    r.op
                )));
            }
        };
        let (index, config) = self
            .call(
                Op::ChangeMembership,
                |reply| Ok(ClientRequest::ChangeMembership { change, reply }),
                "the membership change",
            )
            .await?;
        Ok(Response::new(proto::MembershipResponse {
            index,
            members: member_infos(&config),
        }))
    }

    async fn status(
        &self,
        req: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusResponse>, Status> {
        self.auth.authorize(&req, Action::Status)?;
        let s: NodeStatus = self
            .call(
                Op::Status,
                |reply| Ok(ClientRequest::Status { reply }),
                "status",
            )
            .await?;
        Ok(Response::new(proto::StatusResponse {
            id: s.id,
            role: s.role,
            term: s.term,
            leader_id: s.leader_id,
            leader_addr: s.leader_addr,
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            last_log_index: s.last_log_index,
            voters: s.voters,
            progress: s
                .progress
                .into_iter()
                .map(|p| proto::PeerProgress {
                    id: p.id,
                    match_index: p.match_index,
                    next_index: p.next_index,
                    active: p.active,
                })
                .collect(),
            first_log_index: s.first_log_index,
            snapshot_index: s.snapshot_index,
            snapshot_term: s.snapshot_term,
            log_bytes: s.log_bytes,
            data_bytes: s.data_bytes,
            last_snapshot_unix_ms: s.last_snapshot_unix_ms,
            snapshots_installed: s.snapshots_installed,
            snapshots_sent: s.snapshots_sent,
            cluster_id: s.cluster_id,
            members: member_infos(&s.config),
            config_index: s.config_index,
            config_pending: s.config_pending,
            removed: s.config.removed.iter().copied().collect(),
        }))
    }
}

/// Who sent a request, or why nobody is known.
type Who = Result<Principal, Status>;

/// A refused write's status says that nothing was written.
fn nothing_written(s: Status) -> Status {
    Status::new(s.code(), format!("{}; nothing was written", s.message()))
}

fn member_infos(c: &crate::raft::ClusterConfig) -> Vec<proto::MemberInfo> {
    c.members
        .iter()
        .map(|(&id, m)| proto::MemberInfo {
            id,
            address: m.address.clone(),
            voter: m.voter,
        })
        .collect()
}
