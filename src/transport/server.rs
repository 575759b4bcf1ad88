//! The gRPC servers: peers' Raft streams and the client API. Client input is checked here
//! (sizes, empty keys) before it reaches the node.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

use crate::proto;
use crate::proto::data_service_server::DataService;
use crate::proto::node_communication_server::NodeCommunication;
use crate::raft::NodeId;
use crate::storage::command::RequestId;

use super::convert::message_from_wire;
use super::{
    ClientRequest, Inbound, LEADER_ADDR_HEADER, LEADER_ID_HEADER, NodeStatus, ServiceError,
};

/// How long a client request may wait for the node (commit, read confirmation) by default.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Limits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
}

#[derive(Clone)]
pub struct PeerService {
    pub id: NodeId,
    pub members: Vec<NodeId>,
    pub inbound: mpsc::Sender<Inbound>,
}

#[tonic::async_trait]
impl NodeCommunication for PeerService {
    async fn stream(
        &self,
        request: Request<Streaming<proto::MessageBatch>>,
    ) -> Result<Response<proto::StreamClosed>, Status> {
        let mut stream = request.into_inner();
        while let Some(batch) = stream.message().await? {
            for m in batch.messages {
                match message_from_wire(m, self.id, |id| self.members.contains(&id)) {
                    Ok(m) => {
                        if self.inbound.send(Inbound::Peer(m)).await.is_err() {
                            return Err(Status::unavailable("node is shutting down"));
                        }
                    }
                    Err(e) => {
                        tracing::warn!("dropping invalid peer message: {e}");
                        return Err(Status::invalid_argument(e.to_string()));
                    }
                }
            }
        }
        Ok(Response::new(proto::StreamClosed {}))
    }
}

#[derive(Clone)]
pub struct ClientService {
    pub inbound: mpsc::Sender<Inbound>,
    pub limits: Limits,
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
        ServiceError::ShuttingDown => Status::unavailable(e.to_string()),
        ServiceError::Storage(_) => Status::internal(e.to_string()),
    }
}

impl ClientService {
    async fn call<T>(
        &self,
        make: impl FnOnce(super::Reply<T>) -> ClientRequest,
        what: &str,
    ) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.inbound
            .send(Inbound::Client(make(tx)))
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

    fn check_key(&self, key: &[u8]) -> Result<(), Status> {
        if key.is_empty() {
            return Err(Status::invalid_argument("the key must not be empty"));
        }
        if key.len() > self.limits.max_key_bytes {
            return Err(Status::invalid_argument(format!(
                "key of {} bytes exceeds the limit of {} bytes (max_key_bytes)",
                key.len(),
                self.limits.max_key_bytes
            )));
        }
        Ok(())
    }
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
        let r = request.into_inner();
        self.check_key(&r.key)?;
        if r.value.len() > self.limits.max_value_bytes {
            return Err(Status::invalid_argument(format!(
                "value of {} bytes exceeds the limit of {} bytes (max_value_bytes); nothing was written",
                r.value.len(),
                self.limits.max_value_bytes
            )));
        }
        let id = request_id(r.id);
        let index = self
            .call(
                |reply| ClientRequest::Put {
                    key: r.key,
                    value: r.value,
                    id,
                    reply,
                },
                "write",
            )
            .await?;
        Ok(Response::new(proto::PutResponse { index }))
    }

    async fn get(
        &self,
        request: Request<proto::GetRequest>,
    ) -> Result<Response<proto::GetResponse>, Status> {
        let r = request.into_inner();
        self.check_key(&r.key)?;
        let value = self
            .call(
                |reply| ClientRequest::Get {
                    key: r.key,
                    stale: r.stale,
                    reply,
                },
                "read",
            )
            .await?;
        Ok(Response::new(proto::GetResponse {
            found: value.is_some(),
            value: value.unwrap_or_default(),
        }))
    }

    async fn delete(
        &self,
        request: Request<proto::DeleteRequest>,
    ) -> Result<Response<proto::DeleteResponse>, Status> {
        let r = request.into_inner();
        self.check_key(&r.key)?;
        let id = request_id(r.id);
        let (existed, index) = self
            .call(
                |reply| ClientRequest::Delete {
                    key: r.key,
                    id,
                    reply,
                },
                "write",
            )
            .await?;
        Ok(Response::new(proto::DeleteResponse { existed, index }))
    }

    async fn status(
        &self,
        _: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusResponse>, Status> {
        let s: NodeStatus = self
            .call(|reply| ClientRequest::Status { reply }, "status")
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
        }))
    }
}
