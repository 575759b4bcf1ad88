//! The raftkv client: finds the leader, follows `not leader` hints, retries unreachable nodes
//! with backoff within a deadline, and, when it gives up, says which nodes it tried and what
//! each answered.
//!
//! Writes carry a request id (client id + sequence number), so a write retried after a lost
//! answer is applied at most once. Reads are linearizable (ReadIndex on the leader) unless
//! `stale` is asked for, in which case any node answers from its own state.

mod pipeline;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::security::{Conn as Channel, Dialer, Purpose};
use bytes::Bytes;
use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use pipeline::{Failure, Pipeline, Reply, Request};

use crate::proto;
use crate::proto::data_service_client::DataServiceClient;
use crate::raft::NodeId;
use crate::transport::{LEADER_ADDR_HEADER, LEADER_ID_HEADER};

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// Refused by the cluster (e.g. a key or value over the limit). Nothing was written.
    #[error("{0}")]
    Rejected(String),
    /// No node could be reached at all.
    #[error("cannot reach the cluster: {}", tried_list(.tried))]
    Unreachable {
        tried: BTreeMap<NodeId, (String, String)>,
    },
    /// Nodes answered, but none could serve the request before the deadline.
    #[error("the cluster has no quorum: no leader could {} within {}s ({}){}",
        if *.write { "commit the write" } else { "serve the request" },
        .timeout.as_secs_f32(),
        tried_list(.tried),
        if *.outcome_unknown { ". The write's outcome is unknown: it may still be applied once a quorum is back" } else if *.write { ". The write was not applied" } else { "" })]
    NoQuorum {
        tried: BTreeMap<NodeId, (String, String)>,
        write: bool,
        outcome_unknown: bool,
        timeout: Duration,
    },
}

impl ClientError {
    /// True if a write failed in a way that leaves it possibly applied.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            ClientError::NoQuorum {
                outcome_unknown: true,
                ..
            }
        )
    }
}

fn tried_list(tried: &BTreeMap<NodeId, (String, String)>) -> String {
    let mut s = String::from("tried ");
    for (i, (id, (addr, err))) in tried.iter().enumerate() {
        if i > 0 {
            s.push_str("; ");
        }
        let _ = write!(s, "node {id} at {addr}: {err}");
    }
    s
}

/// Per node: what it said and where it is.
#[derive(Clone)]
pub struct Client {
    nodes: BTreeMap<NodeId, String>,
    channels: BTreeMap<NodeId, Channel>,
    pipelines: BTreeMap<NodeId, Pipeline>,
    leader: Option<NodeId>,
    client_id: u64,
    seq: u64,
    /// The log index of this client's last acknowledged write: stale reads wait for it, so
    /// that the client reads its own writes on any node.
    last_write: u64,
    timeout: Duration,
    /// Give up as soon as every node has refused the connection (see [`Client::fail_fast`]).
    fail_fast: bool,
    /// TLS and credentials.
    dialer: Dialer,
}

pub struct StatusReport {
    pub id: NodeId,
    pub addr: String,
    pub result: Result<proto::StatusResponse, String>,
}

impl Client {
    /// A client for the cluster `nodes` (`id -> host:port`). Connections are made lazily.
    /// Must be called within a Tokio runtime.
    pub fn new(nodes: BTreeMap<NodeId, String>) -> Client {
        Client::with_dialer(nodes, Dialer::plaintext())
    }

    /// A client for the cluster `nodes` that connects with `dialer` (TLS, credentials).
    pub fn with_dialer(nodes: BTreeMap<NodeId, String>, dialer: Dialer) -> Client {
        let channels: BTreeMap<NodeId, Channel> = nodes
            .iter()
            .filter_map(|(&id, addr)| Some((id, dialer.lazy(addr, Purpose::Client).ok()?)))
            .collect();
        let pipelines = channels
            .iter()
            .map(|(&id, ch)| (id, Pipeline::start(ch.clone())))
            .collect();
        Client {
            nodes,
            channels,
            pipelines,
            leader: None,
            client_id: random_id(),
            seq: 0,
            last_write: 0,
            timeout: DEFAULT_TIMEOUT,
            fail_fast: false,
            dialer,
        }
    }

    /// A client of the cluster `nodes` (config.json's, typically) that has asked the cluster
    /// for its current members: see [`Client::refresh_members`].
    pub async fn discover(nodes: BTreeMap<NodeId, String>) -> Client {
        Client::discover_with(nodes, Dialer::plaintext()).await
    }

    /// [`Client::discover`] with `dialer` (TLS, credentials).
    pub async fn discover_with(nodes: BTreeMap<NodeId, String>, dialer: Dialer) -> Client {
        let mut c = Client::with_dialer(nodes, dialer);
        c.refresh_members().await;
        c
    }

    /// A client of the cluster that the nodes at `addrs` belong to (a node that joins knows
    /// only where some members are, not their ids): asked all at once, the one with the
    /// newest configuration (highest term, then configuration entry) tells the members.
    ///
    /// # Errors
    /// No address answered with a membership (each named with what it said).
    pub async fn from_addresses(
        addrs: &[String],
        timeout: Duration,
        dialer: &Dialer,
    ) -> Result<Client, String> {
        let mut set = tokio::task::JoinSet::new();
        for addr in addrs.iter().cloned() {
            let dialer = dialer.clone();
            set.spawn(async move {
                let answer = match dialer.lazy(&addr, Purpose::Client) {
                    Err(e) => Err(e),
                    Ok(ch) => {
                        let mut c = DataServiceClient::new(ch);
                        match tokio::time::timeout(timeout, c.status(proto::StatusRequest {})).await
                        {
                            Ok(Ok(r)) => Ok(r.into_inner()),
                            Ok(Err(s)) => Err(describe(&s)),
                            Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
                        }
                    }
                };
                (addr, answer)
            });
        }
        let mut tried = Vec::new();
        let mut best: Option<proto::StatusResponse> = None;
        for (addr, answer) in set.join_all().await {
            match answer {
                Ok(s) if !s.members.is_empty() => {
                    if best
                        .as_ref()
                        .is_none_or(|b| (s.term, s.config_index) > (b.term, b.config_index))
                    {
                        best = Some(s);
                    }
                }
                Ok(s) => tried.push(format!(
                    "{addr}: node {} knows no membership yet (it is joining too)",
                    s.id
                )),
                Err(e) => tried.push(format!("{addr}: {e}")),
            }
        }
        match best {
            Some(s) => {
                Ok(Client::with_dialer(members_of(&s), dialer.clone())
                    .with_timeout(DEFAULT_TIMEOUT))
            }
            None => Err(format!(
                "cannot reach the cluster (tried {})",
                tried.join("; ")
            )),
        }
    }

    /// Learns the current members from the cluster (the configuration of the node that
    /// answers with the highest term and configuration entry), so that a client started from
    /// a config.json listing only the original nodes reaches every member after membership
    /// changes. Nodes that are no longer members are dropped. Without any answer, nothing
    /// changes.
    pub async fn refresh_members(&mut self) {
        let reports = self.status_all(Duration::from_secs(1)).await;
        let best = reports
            .iter()
            .filter_map(|r| r.result.as_ref().ok())
            .filter(|s| !s.members.is_empty())
            .max_by_key(|s| (s.term, s.config_index));
        if let Some(s) = best {
            let members = members_of(s);
            self.nodes.retain(|id, _| members.contains_key(id));
            self.channels.retain(|id, _| members.contains_key(id));
            self.pipelines.retain(|id, _| members.contains_key(id));
            for (id, addr) in members {
                self.add_node(id, addr);
            }
        }
    }

    /// Adds (or moves) node `id` at `addr`.
    fn add_node(&mut self, id: NodeId, addr: String) {
        if self.nodes.get(&id) == Some(&addr) {
            return;
        }
        if let Ok(ch) = self.dialer.lazy(&addr, Purpose::Client) {
            self.pipelines.insert(id, Pipeline::start(ch.clone()));
            self.channels.insert(id, ch);
        }
        self.nodes.insert(id, addr);
    }

    /// Asks the leader for a membership change and waits until it is committed; retries
    /// while the leader says "not now" (another change in progress, a learner still catching
    /// up) until the client's timeout. Returns the entry's index (0: the change was in force
    /// already) and the members after it.
    ///
    /// # Errors
    /// No leader (naming every node tried), or why the change was refused.
    pub async fn change_membership(
        &self,
        op: proto::MembershipOp,
        id: NodeId,
        address: &str,
    ) -> Result<(u64, Vec<proto::MemberInfo>), ChangeError> {
        let deadline = Instant::now() + self.timeout;
        let req = proto::MembershipRequest {
            op: op as i32,
            id,
            address: address.to_string(),
        };
        loop {
            let err = match self.find_leader("change the membership").await {
                Ok((leader, mut c)) => match c.change_membership(req.clone()).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        return Ok((r.index, r.members));
                    }
                    Err(s) if matches!(s.code(), Code::Unavailable | Code::FailedPrecondition) => {
                        format!("node {leader}: {}", describe(&s))
                    }
                    Err(s) => {
                        return Err(ChangeError {
                            retryable: false,
                            message: s.message().to_string(),
                        });
                    }
                },
                Err(e) => e,
            };
            if Instant::now() + Duration::from_millis(250) >= deadline {
                return Err(ChangeError {
                    retryable: true,
                    message: format!("{err} (still so after {}s)", self.timeout.as_secs_f32()),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A copy with its own client id (for concurrent writers), sharing connections.
    pub fn fork(&self) -> Client {
        Client {
            client_id: random_id(),
            seq: 0,
            ..self.clone()
        }
    }

    /// A request fails with [`ClientError::Unreachable`] as soon as every node has refused the
    /// connection, instead of retrying until the timeout: for commands a person waits on (the
    /// shell, bench), where no node running at all is a mistake to report at once. Without
    /// it (the default) a client rides out a whole-cluster restart within its timeout.
    pub fn fail_fast(mut self) -> Client {
        self.fail_fast = true;
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    pub fn nodes(&self) -> &BTreeMap<NodeId, String> {
        &self.nodes
    }

    /// Every known node but `me`, with its address.
    pub fn nodes_except(&self, me: NodeId) -> BTreeMap<NodeId, String> {
        self.nodes
            .iter()
            .filter(|(id, _)| **id != me)
            .map(|(&id, a)| (id, a.clone()))
            .collect()
    }

    /// The node believed to lead, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }

    fn next_id(&mut self) -> proto::RequestId {
        self.seq += 1;
        proto::RequestId {
            client_id: self.client_id,
            seq: self.seq,
        }
    }

    /// Writes `key = value`. Returns the log index it was applied at.
    pub async fn put(
        &mut self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<u64, ClientError> {
        let (key, value) = (key.into(), value.into());
        check_sizes(&key, Some(&value), true)?;
        let req = proto::PutRequest {
            key,
            value,
            id: Some(self.next_id()),
        };
        match self.call(Request::Put(req), true, false).await? {
            Reply::Put(r) => {
                self.last_write = self.last_write.max(r.index);
                Ok(r.index)
            }
            other => Err(unexpected(other)),
        }
    }

    /// Reads `key`: linearizable through the leader, or `stale` from any node.
    pub async fn get(
        &mut self,
        key: impl Into<Bytes>,
        stale: bool,
    ) -> Result<Option<Bytes>, ClientError> {
        let key = key.into();
        check_sizes(&key, None, false)?;
        let req = proto::GetRequest {
            key,
            stale,
            min_index: if stale { self.last_write } else { 0 },
        };
        match self.call(Request::Get(req), false, stale).await? {
            Reply::Get(r) => Ok(r.found.then_some(r.value)),
            other => Err(unexpected(other)),
        }
    }

    /// Reads `key` from one node's state machine (stale), without retries.
    pub async fn get_from(
        &self,
        node: NodeId,
        key: impl Into<Bytes>,
    ) -> Result<Option<Bytes>, String> {
        let ch = self
            .channels
            .get(&node)
            .ok_or_else(|| format!("unknown node {node}"))?
            .clone();
        let req = proto::GetRequest {
            key: key.into(),
            stale: true,
            min_index: 0,
        };
        let mut c = DataServiceClient::new(ch);
        match tokio::time::timeout(self.timeout, c.get(req)).await {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                Ok(r.found.then_some(r.value))
            }
            Ok(Err(s)) => Err(describe(&s)),
            Err(_) => Err("timed out".into()),
        }
    }

    /// Deletes `key`. Returns whether it existed.
    pub async fn delete(&mut self, key: impl Into<Bytes>) -> Result<bool, ClientError> {
        let key = key.into();
        check_sizes(&key, None, true)?;
        let req = proto::DeleteRequest {
            key,
            id: Some(self.next_id()),
        };
        match self.call(Request::Delete(req), true, false).await? {
            Reply::Delete(r) => {
                self.last_write = self.last_write.max(r.index);
                Ok(r.existed)
            }
            other => Err(unexpected(other)),
        }
    }

    /// Opens a backup stream from the leader (found by asking every node for its status).
    ///
    /// # Errors
    /// No leader (naming every node tried and what it answered), or the leader's refusal.
    pub async fn save_snapshot(
        &self,
    ) -> Result<(NodeId, tonic::Streaming<proto::SnapshotChunk>), String> {
        let (leader, c) = self.find_leader("take the snapshot from").await?;
        let stream = c
            .max_decoding_message_size(64 << 20)
            .save_snapshot(proto::SaveSnapshotRequest {})
            .await
            .map_err(|s| format!("node {leader}: {}", describe(&s)))?
            .into_inner();
        Ok((leader, stream))
    }

    /// Asks the leader to hand leadership to `target` (0: the most caught-up other voter) and
    /// waits until it has: (from, to, term).
    ///
    /// # Errors
    /// No leader (naming every node tried), or why the leader refused or gave up.
    pub async fn transfer_leader(&self, target: NodeId) -> Result<(NodeId, NodeId, u64), String> {
        if target != 0 && !self.nodes.contains_key(&target) {
            return Err(format!(
                "node {target} is not a member (members: {})",
                self.nodes
                    .keys()
                    .map(|id| id.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let (_, mut c) = self.find_leader("transfer leadership from").await?;
        let r = c
            .transfer_leader(proto::TransferLeaderRequest { target })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        Ok((r.from, r.to, r.term))
    }

    /// The node that leads in the highest term, asking every node, and a client of it.
    async fn find_leader(
        &self,
        what: &str,
    ) -> Result<(NodeId, DataServiceClient<Channel>), String> {
        let reports = self.status_all(Duration::from_secs(2)).await;
        let answers = || reports.iter().filter_map(|r| r.result.as_ref().ok());
        // A leader that answered; else the leader the others name (it may be a member this
        // client was not started with).
        let leader = answers()
            .filter(|s| s.role == "leader")
            .max_by_key(|s| s.term)
            .map(|s| (s.id, String::new()))
            .or_else(|| {
                answers()
                    .filter(|s| s.leader_id != 0 && !s.leader_addr.is_empty())
                    .max_by_key(|s| s.term)
                    .map(|s| (s.leader_id, s.leader_addr.clone()))
            });
        if let Some((leader, addr)) = &leader
            && !self.channels.contains_key(leader)
            && let Ok(ch) = self.dialer.lazy(addr, Purpose::Client)
        {
            return Ok((*leader, DataServiceClient::new(ch)));
        }
        let Some((leader, _)) = leader else {
            let tried: Vec<String> = reports
                .iter()
                .map(|r| match &r.result {
                    Ok(s) => format!("node {} at {}: {} without a leader", r.id, r.addr, s.role),
                    Err(e) => format!("node {} at {}: {e}", r.id, r.addr),
                })
                .collect();
            return Err(format!("no leader to {what} (tried {})", tried.join("; ")));
        };
        let ch = self
            .channels
            .get(&leader)
            .cloned()
            .ok_or_else(|| format!("node {leader} has an invalid address"))?;
        Ok((leader, DataServiceClient::new(ch)))
    }

    /// Asks every node for its status, concurrently, each within `timeout`.
    pub async fn status_all(&self, timeout: Duration) -> Vec<StatusReport> {
        let mut set = tokio::task::JoinSet::new();
        for (&id, addr) in &self.nodes {
            let ch = self.channels.get(&id).cloned();
            let addr = addr.clone();
            set.spawn(async move {
                let result = match ch {
                    None => Err("invalid address".to_string()),
                    Some(ch) => {
                        let mut c = DataServiceClient::new(ch);
                        match tokio::time::timeout(timeout, c.status(proto::StatusRequest {})).await
                        {
                            Ok(Ok(r)) => Ok(r.into_inner()),
                            Ok(Err(s)) => Err(describe(&s)),
                            Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
                        }
                    }
                };
                StatusReport { id, addr, result }
            });
        }
        let mut reports: Vec<StatusReport> = set.join_all().await;
        reports.sort_by_key(|r| r.id);
        reports
    }

    async fn call(
        &mut self,
        req: Request,
        write: bool,
        any_node: bool,
    ) -> Result<Reply, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let mut ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let mut tried: BTreeMap<NodeId, (String, String)> = BTreeMap::new();
        let mut reached_any = false;
        let mut outcome_unknown = false;
        let mut backoff = Duration::from_millis(10);
        let mut next_in_turn = 0usize;
        // Stale reads spread over the nodes; everything else starts at the leader.
        let mut target = if any_node {
            ids[(self.client_id % ids.len() as u64) as usize]
        } else {
            self.leader.unwrap_or(ids[0])
        };
        let mut hops_without_progress = 0usize;
        let mut refused_connection: std::collections::BTreeSet<NodeId> = Default::default();
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let addr = self.nodes.get(&target).cloned().unwrap_or_default();
            let Some(pipeline) = self.pipelines.get(&target) else {
                tried.insert(target, (addr, "invalid address".into()));
                target = ids[next_in_turn % ids.len()];
                next_in_turn += 1;
                continue;
            };
            let remaining = deadline - now;
            let (status, refused) =
                match tokio::time::timeout(remaining, pipeline.call(req.clone())).await {
                    Ok(Ok(Reply::Error(e))) => (status_of(e), false),
                    Ok(Ok(reply)) => {
                        if !any_node {
                            self.leader = Some(target);
                        }
                        return Ok(reply);
                    }
                    Ok(Err(Failure::NotSent(status))) => (status, true),
                    Ok(Err(Failure::Lost(status))) => (status, false),
                    Err(_) => {
                        tried.insert(target, (addr, "no answer before the deadline".into()));
                        reached_any = true;
                        outcome_unknown |= write;
                        break;
                    }
                };
            if !refused {
                reached_any = true;
            } else if is_connect_error(&status) {
                refused_connection.insert(target);
            }
            tried.insert(
                target,
                (
                    addr,
                    if refused {
                        describe_unsent(&status)
                    } else {
                        describe(&status)
                    },
                ),
            );
            if self.fail_fast && !reached_any && ids.iter().all(|i| refused_connection.contains(i))
            {
                return Err(ClientError::Unreachable { tried });
            }
            match status.code() {
                // Refused for who the client is: every node would say the same.
                Code::InvalidArgument
                | Code::OutOfRange
                | Code::PermissionDenied
                | Code::Unauthenticated => {
                    return Err(ClientError::Rejected(status.message().to_string()));
                }
                Code::FailedPrecondition => {
                    // Not the leader: follow its hint at once, else look around.
                    let hint = status
                        .metadata()
                        .get(LEADER_ID_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<NodeId>().ok());
                    let hint_addr = status
                        .metadata()
                        .get(LEADER_ADDR_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    // A leader this client did not know of (a member added since its
                    // config.json was written): it is reached at the address the hint gives.
                    let hint = match (hint, hint_addr) {
                        (Some(h), _) if self.nodes.contains_key(&h) => Some(h),
                        (Some(h), Some(addr)) if !addr.is_empty() => {
                            self.add_node(h, addr);
                            ids = self.nodes.keys().copied().collect();
                            Some(h)
                        }
                        _ => None,
                    };
                    match hint {
                        Some(h) if h != target && hops_without_progress < ids.len() => {
                            hops_without_progress += 1;
                            target = h;
                            continue;
                        }
                        _ => {}
                    }
                }
                _ => {
                    // Anything but a clean refusal may have reached the state machine.
                    if write && !refused && status.code() != Code::ResourceExhausted {
                        outcome_unknown = true;
                    }
                }
            }
            self.leader = None;
            hops_without_progress = 0;
            target = ids[next_in_turn % ids.len()];
            next_in_turn += 1;
            if next_in_turn.is_multiple_of(ids.len()) || target == ids[0] {
                let sleep = backoff.min(deadline.saturating_duration_since(Instant::now()));
                tokio::time::sleep(sleep).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
        if reached_any {
            Err(ClientError::NoQuorum {
                tried,
                write,
                outcome_unknown,
                timeout: self.timeout,
            })
        } else {
            Err(ClientError::Unreachable { tried })
        }
    }
}

/// Why a membership change failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ChangeError {
    /// It may pass later (no leader, another change in progress, a learner catching up).
    pub retryable: bool,
    pub message: String,
}

/// Every member a node's status names, with its address.
fn members_of(s: &proto::StatusResponse) -> BTreeMap<NodeId, String> {
    s.members
        .iter()
        .filter(|m| !m.address.is_empty())
        .map(|m| (m.id, m.address.clone()))
        .collect()
}

/// Refuses, before sending, what no node can accept: a value over the ceiling of
/// `max_value_bytes`, or a request over the gRPC message limit (which a node would refuse by
/// closing the whole connection, the other requests on it with an unknown outcome).
fn check_sizes(key: &[u8], value: Option<&[u8]>, write: bool) -> Result<(), ClientError> {
    use crate::config::MAX_VALUE_BYTES_LIMIT;
    use crate::transport::peer::GRPC_MESSAGE_BYTES_MAX;
    let v = value.map_or(0, <[u8]>::len);
    if v > MAX_VALUE_BYTES_LIMIT {
        return Err(ClientError::Rejected(format!(
            "value of {v} bytes exceeds the largest value a node accepts ({MAX_VALUE_BYTES_LIMIT} bytes, the ceiling of max_value_bytes); nothing was written"
        )));
    }
    // Room for the rest of the request (ids, tags, framing).
    if key.len() + v + 1024 > GRPC_MESSAGE_BYTES_MAX {
        return Err(ClientError::Rejected(format!(
            "key of {} bytes exceeds the gRPC message limit of {GRPC_MESSAGE_BYTES_MAX} bytes (and every node's max_key_bytes){}",
            key.len(),
            if write { "; nothing was written" } else { "" }
        )));
    }
    Ok(())
}

/// A pipelined request's error as the status the unary call would have returned.
fn status_of(e: proto::RequestError) -> Status {
    let mut s = Status::new(Code::from_i32(e.code), e.message);
    if e.leader_id != 0
        && let Ok(v) = MetadataValue::try_from(e.leader_id.to_string())
    {
        s.metadata_mut().insert(LEADER_ID_HEADER, v);
    }
    if !e.leader_addr.is_empty()
        && let Ok(v) = MetadataValue::try_from(e.leader_addr)
    {
        s.metadata_mut().insert(LEADER_ADDR_HEADER, v);
    }
    s
}

/// A node that answered a request with the wrong kind of reply: a bug on its side, reported
/// rather than trusted.
fn unexpected(reply: Reply) -> ClientError {
    ClientError::Rejected(format!(
        "the node answered with an unexpected reply: {reply:?}"
    ))
}

/// A connection that was never made: the request certainly did not arrive.
fn is_connect_error(s: &Status) -> bool {
    if s.code() != Code::Unavailable {
        return false;
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    let mut text = s.message().to_lowercase();
    while let Some(e) = src {
        text.push(' ');
        text.push_str(&e.to_string().to_lowercase());
        src = e.source();
    }
    text.contains("connect") || text.contains("refused")
}

/// A one-line account of a request that never reached the node.
fn describe_unsent(s: &Status) -> String {
    if let Some(tls) = crate::security::describe_tls_failure(s) {
        return tls;
    }
    if is_connect_error(s) {
        "unreachable (connection refused or timed out)".to_string()
    } else {
        format!("not reached: {}", describe(s))
    }
}

/// A one-line account of a gRPC failure.
pub fn describe(s: &Status) -> String {
    if let Some(tls) = crate::security::describe_tls_failure(s) {
        return tls;
    }
    if is_connect_error(s) {
        return "unreachable (connection refused or timed out)".to_string();
    }
    match s.code() {
        Code::Unavailable => format!("unavailable: {}", s.message()),
        Code::DeadlineExceeded => format!("timed out: {}", s.message()),
        _ => s.message().to_string(),
    }
}

fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish() | 1
}
