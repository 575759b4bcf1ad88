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
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tonic::transport::server::TcpIncoming;

pub mod health;
mod http;
mod join;

use crate::config::{Config, SnapshotPolicy};
use crate::proto::data_service_server::DataServiceServer;
use crate::proto::node_communication_server::NodeCommunicationServer;
use crate::raft::{self, LogIndex, LogStore, NodeId, Raft, Role, SnapshotMeta, Term};
use crate::storage::command::{Command, Op, RequestId};
use crate::storage::{self, ApplyOutcome, DiskLog, KvStore, Stager};
use crate::transport::peer::{
    CONNECTION_WINDOW_BYTES, GRPC_MESSAGE_BYTES_MAX, Peers, STREAM_WINDOW_BYTES,
};
use crate::transport::server::{ClientService, Limits, PeerService};
use crate::transport::snapshot::{self as snapshot_transport, PendingInstall};
use crate::transport::{
    ClientRequest, ClusterId, Inbound, NodeStatus, PeerStatus, Reply, ServiceError, cluster_id_str,
};

/// Inputs queued for the core before senders wait.
const INBOUND_QUEUE: usize = 16 * 1024;
/// Inputs taken in one round before the core produces a `Ready`.
const ROUND_INPUTS_MAX: usize = 8192;

/// How a node starts beyond its config entry: joining a running cluster (`raftkv node
/// --join`), and where it serves HTTP.
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    /// Members to ask (`host:port`); empty: the node does not join.
    pub join: Vec<String>,
    /// Where this node listens (and what the others are told); default: its entry in the
    /// config file, else its address in the stored membership.
    pub listen: Option<String>,
    /// Ask for promotion to voter once caught up.
    pub voter: bool,
    /// The HTTP port for `/metrics`, `/livez` and `/readyz` (on the node's host); default:
    /// the config entry's `http_port`. None: no HTTP endpoint, and no metrics are recorded.
    pub http_port: Option<u16>,
    /// This node's certificate, key and CA: None serves plaintext.
    pub tls: Option<crate::security::Files>,
    /// The users file (with `tls`); None: every client certificate of the CA is an admin.
    pub users_file: Option<std::path::PathBuf>,
    /// Serve plaintext on a non-loopback address (refused without it).
    pub insecure: bool,
}

/// How a node stopped without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// On a signal.
    Shutdown,
    /// It applied its own removal from the cluster (a removed node serves and votes no more).
    Removed,
}

/// Runs node `id` until `shutdown` fires. Binds its port first, so that a port in use is
/// reported before anything else happens.
///
/// # Errors
/// A port in use, an unusable data directory, or a fatal storage failure while running.
pub async fn run(
    cfg: Config,
    id: NodeId,
    join: NodeOptions,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Stopped> {
    // Caught from the start (its default action ends the process): `raftkv cluster` passes
    // SIGHUP on to nodes that may still be starting.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    let listen = join
        .listen
        .clone()
        .or_else(|| cfg.node(id).map(|n| n.addr()));
    // Refused before anything is bound: plaintext only on loopback, unless asked for.
    if join.tls.is_none()
        && !join.insecure
        && let Some(a) = &listen
        && let Ok((host, _)) = crate::config::parse_address(a)
        && !is_loopback_host(&host)
    {
        return Err(insecure_refusal(id, a));
    }
    let mut listener = match &listen {
        Some(a) => Some(bind_addr(a).await?),
        None => None,
    };

    let dir = cfg.node_data_dir(id);
    let recovered = tokio::task::spawn_blocking({
        let dir = dir.clone();
        let journal = cfg.snapshot_policy().journal_bytes();
        move || storage::disk::open_with_journal(&dir, id, journal)
    })
    .await
    .context("opening storage")??;

    // The membership at the applied index: the state machine's, once one was applied (a
    // membership change, or a snapshot of a cluster that had one); else a new node joining
    // knows none (the leader will tell it), and a cluster that never changed is config.json's.
    let bootstrap = cfg.bootstrap_membership();
    let joining = !join.join.is_empty();
    let members = match recovered.kv.config() {
        Some(c) => c.clone(),
        None if joining => crate::raft::ClusterConfig::default(),
        None => bootstrap.clone(),
    };
    if members.removed.contains(&id) {
        return Err(anyhow!(
            "node {id} was removed from the cluster; node ids are never reused. To bring this machine back, delete {} and add it under a new id: raftkv member add NEW_ID HOST:PORT, then raftkv node --id NEW_ID --join ... --listen HOST:PORT",
            dir.display()
        ));
    }
    // The membership's address wins over an edited config.json: the peers dial that one.
    let stored_addr = recovered
        .kv
        .config()
        .and_then(|c| c.address(id))
        .map(str::to_string);
    if join.listen.is_none()
        && let (Some(a), Some(l)) = (&stored_addr, &listen)
        && a != l
    {
        tracing::warn!(
            node = id,
            "config.json puts node {id} at {l}, but the cluster's membership has it at {a}: listening at {a}"
        );
        drop(listener.take());
        listener = Some(bind_addr(a).await?);
    }
    let listener = match listener.take() {
        Some(l) => l,
        None => match members.address(id) {
            Some(a) => bind_addr(a).await?,
            None => {
                return Err(anyhow!(
                    "node id {id} is not in the config (ids: {}) and its data directory {} holds no membership with it; to add a new node to a running cluster, start it with --join HOST:PORT --listen HOST:PORT",
                    cfg.ids()
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    dir.display()
                ));
            }
        },
    };
    let local = listener.local_addr().context("reading the bound address")?;
    let http_port = join
        .http_port
        .or_else(|| cfg.node(id).and_then(|n| n.http_port));
    // --http-port gets the checks config.json's http_port gets.
    if let Some(p) = http_port {
        if p == local.port() {
            return Err(anyhow!(
                "HTTP port {p} is this node's gRPC port too; give it a port of its own"
            ));
        }
        if let Some(n) = cfg.nodes.iter().find(|n| n.id != id && n.port == p) {
            return Err(anyhow!(
                "HTTP port {p} is node {}'s gRPC port ({}); give it a port of its own",
                n.id,
                n.addr()
            ));
        }
    }
    let http_listener = match http_port {
        Some(port) => {
            let host = match &listen {
                Some(a) => crate::config::parse_address(a)
                    .map_or_else(|_| local.ip().to_string(), |(h, _)| h),
                None => local.ip().to_string(),
            };
            Some(
                bind(&host, port)
                    .await
                    .with_context(|| format!("the HTTP endpoint (http_port {port})"))?,
            )
        }
        None => None,
    };
    let host = match &listen {
        Some(a) => {
            crate::config::parse_address(a).map_or_else(|_| local.ip().to_string(), |(h, _)| h)
        }
        None => local.ip().to_string(),
    };
    if join.tls.is_none() && !join.insecure && !local.ip().is_loopback() {
        return Err(insecure_refusal(id, &local.to_string()));
    }
    let tls = match &join.tls {
        Some(files) => {
            let t = crate::security::ServerTls::load(files.clone(), id, &host)
                .map_err(anyhow::Error::msg)?;
            tracing::info!(
                node = id,
                valid_from = %t.valid.0,
                valid_until = %t.valid.1,
                "TLS on: peers need node certificates of the cluster CA, clients a user certificate or token"
            );
            Some(Arc::new(t))
        }
        None => None,
    };
    if tls.is_some() && join.users_file.is_none() {
        tracing::warn!(
            node = id,
            "TLS without a users file: every client certificate of the CA is an admin, and tokens are refused (tls.users_file in the config adds users with roles)"
        );
    }
    let auth = Arc::new(match &tls {
        Some(_) => {
            crate::security::auth::Auth::tls(join.users_file.clone()).map_err(anyhow::Error::msg)?
        }
        None => crate::security::auth::Auth::open(),
    });
    let dialer = tls
        .as_ref()
        .map_or_else(crate::security::Dialer::plaintext, |t| t.dialer());
    tracing::info!(
        node = id,
        %local,
        dir = %dir.display(),
        term = recovered.hard_state.term,
        last_index = recovered.log.last_index(),
        applied = recovered.kv.applied(),
        "node starting"
    );
    if let Some(stored) = recovered.kv.config()
        && !same_members(stored, &bootstrap)
    {
        tracing::warn!(
            node = id,
            "config.json lists {}, but the cluster's membership (from the log) is {}: the membership is used. config.json only bootstraps a new cluster and tells clients where to start",
            describe_members(&bootstrap),
            describe_members(stored)
        );
    }

    let peer_addrs = |c: &crate::raft::ClusterConfig| {
        c.members
            .iter()
            .filter(|(m, _)| **m != id)
            .filter_map(|(&m, _)| c.address(m).map(|a| (m, a.to_string())))
            .collect::<Vec<_>>()
    };
    let probe = if joining {
        join.join.iter().map(|a| (0, a.clone())).collect()
    } else {
        peer_addrs(&members)
    };
    let peers_know_cluster = check_cluster_identity(
        &dir,
        recovered.kv.cluster_id(),
        probe,
        members.voters().count(),
        &dialer,
    )
    .await?;
    let cluster: ClusterId = Arc::new(AtomicU64::new(recovered.kv.cluster_id()));
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ id;
    let mut raft_cfg = cfg.raft_config(id, seed);
    let heartbeat_ticks = raft_cfg.heartbeat_ticks;
    raft_cfg.members = members;
    let mut raft = Raft::new(
        raft_cfg,
        recovered.log,
        recovered.hard_state,
        recovered.kv.applied(),
    )?;
    let config = raft.config().clone();
    let peers = Peers::start(peer_addrs(&config), cluster.clone(), dialer.clone());
    let health = Arc::new(health::Health::new(Duration::from_millis(
        cfg.election_timeout_ms.max,
    )));
    let metrics = http_listener
        .as_ref()
        .map(|_| crate::metrics::Metrics::new(id));
    let (peer_addrs_tx, peer_addrs_rx) = watch::channel(addresses(&config));

    let peer_service = PeerService {
        id,
        inbound: inbound_tx.clone(),
        snapshots: snapshot_transport::Receiver::new(
            id,
            cluster.clone(),
            recovered.stager.clone(),
            inbound_tx.clone(),
        ),
        cluster: cluster.clone(),
        tls: tls.is_some(),
    };
    let client_service = ClientService {
        inbound: inbound_tx.clone(),
        limits: Limits {
            max_key_bytes: cfg.max_key_bytes(),
            max_value_bytes: cfg.max_value_bytes(),
        },
        metrics: metrics.clone(),
        auth: auth.clone(),
    };
    // The standard gRPC health service: "" is SERVING while the node is live, and
    // "raftkv.DataService" while it is ready (see `health`).
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // Stops the server and the core: on a signal, or when the core stops by itself (a fatal
    // storage error), so that the process exits instead of serving without a core.
    let (stop_tx, stop_rx) = watch::channel(false);
    let server_shutdown = {
        let mut s = stop_rx.clone();
        async move {
            let _ = s.wait_for(|v| *v).await;
        }
    };
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .add_service(health_service)
        .add_service(
            NodeCommunicationServer::new(peer_service)
                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        )
        .add_service(
            DataServiceServer::new(client_service)
                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        );
    let server = match &tls {
        // Nagle's algorithm would hold small answers back until the client's delayed ACK (40 ms).
        None => tokio::spawn(router.serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            server_shutdown,
        )),
        Some(t) => {
            use crate::security::listener::{Protocol, incoming};
            use tokio_stream::StreamExt as _;
            let conns = tokio_stream::wrappers::ReceiverStream::new(incoming(
                listener,
                t.clone(),
                Protocol::Grpc,
                id,
            ))
            .map(Ok::<_, std::io::Error>);
            tokio::spawn(router.serve_with_incoming_shutdown(conns, server_shutdown))
        }
    };
    let reloader = tokio::spawn(reload_on_sighup(id, hangup, tls.clone(), auth.clone()));
    let health_task = tokio::spawn(report_health(health.clone(), health_reporter));
    let http_server = match (http_listener, &metrics) {
        (Some(l), Some(m)) => {
            let http_local = l.local_addr().ok();
            let addr = http_local.map_or_else(|| "?".to_string(), |a| a.to_string());
            tracing::info!(node = id, %addr, "serving /metrics, /livez and /readyz over HTTP");
            let mut s = stop_rx.clone();
            let prober = tokio::spawn(probe_peers(id, peer_addrs_rx, m.clone(), dialer.clone()));
            let stop = async move {
                let _ = s.wait_for(|v| *v).await;
            };
            let served = match &tls {
                None => tokio::spawn(http::serve(l, m.clone(), health.clone(), stop)),
                Some(t) => {
                    use crate::security::listener::{HttpsListener, Protocol, incoming};
                    let local = l.local_addr().context("reading the HTTP address")?;
                    let rx = incoming(l, t.clone(), Protocol::Http, id);
                    tokio::spawn(http::serve(
                        HttpsListener { rx, local },
                        m.clone(),
                        health.clone(),
                        stop,
                    ))
                }
            };
            Some((served, prober))
        }
        _ => None,
    };

    let mut rejoin = recovered.rejoin;
    if recovered.is_new
        && rejoin.is_none()
        && let Some((term, commit)) = peers_know_cluster
    {
        // An empty directory in a cluster that exists (a wiped or replaced disk): this node
        // may have voted and acknowledged writes before it lost them.
        // What the peers committed (the term of its own entry there is unknown).
        let catch_up = (commit, crate::raft::Term::MAX);
        raft.store()
            .set_rejoin(term, Some(catch_up))
            .context("recording the rejoin")?;
        rejoin = Some((term, Some(catch_up)));
    }
    if let Some((floor, catch_up)) = rejoin {
        if let Some((c, _)) = catch_up {
            if joining && recovered.is_new {
                // A new member (its id is new, so it cannot have voted before; the guard is
                // kept in case an old member's id was given to an empty directory).
                tracing::info!(
                    node = id,
                    catch_up_to = c,
                    "a new node: it votes once it has caught up to entry {c}"
                );
            } else {
                tracing::warn!(
                    node = id,
                    vote_floor = floor,
                    catch_up_to = c,
                    "this node rejoins without its former state: it neither votes nor campaigns until it has caught up to entry {c}, and never votes in terms up to {floor}"
                );
            }
        }
        raft.set_rejoin(floor, catch_up);
    }
    let core = Core {
        id,
        raft,
        kv: recovered.kv,
        stager: recovered.stager,
        inbound: inbound_tx.clone(),
        policy: cfg.snapshot_policy(),
        pending_install: None,
        snapshot_sends: 0,
        sending_to: Default::default(),
        snapshot_floors: BTreeMap::new(),
        last_snapshot: None,
        snapshots_installed: 0,
        snapshots_sent: 0,
        cluster,
        rejoin_floor: rejoin.and_then(|(f, c)| c.map(|_| f)),
        cluster_id_proposed_in: 0,
        peers,
        addrs: addresses(&config),
        config,
        removed_since: None,
        hints: BTreeMap::new(),
        hints_dirty: false,
        hints_asked: None,
        removal_asked: None,
        departing: Vec::new(),
        writes: BTreeMap::new(),
        reads: HashMap::new(),
        confirmed_reads: BTreeMap::new(),
        next_read: 0,
        role: Role::Follower,
        leader: 0,
        transfer: None,
        health: health.clone(),
        metrics,
        leader_commit: (0, 0),
        leader_heard: false,
        peer_addrs: peer_addrs_tx,
        snapshot_started: BTreeMap::new(),
        dialer: dialer.clone(),
    };
    let tick = Duration::from_millis(cfg.tick_ms());
    let clock = TickClock::new(tick, heartbeat_ticks, tokio::time::Instant::now());
    let handle = tokio::runtime::Handle::current();
    let (core_done_tx, core_done_rx) = tokio::sync::oneshot::channel::<bool>();
    let core_thread = std::thread::Builder::new()
        .name(format!("raft-core-{id}"))
        .spawn(move || {
            let result = handle.block_on(core.run(inbound_rx, clock, stop_rx));
            let _ = core_done_tx.send(matches!(result, Ok(Stopped::Removed)));
            result
        })
        .context("starting the core thread")?;
    tracing::info!(node = id, %local, "listening");
    let joiner = joining.then(|| {
        let advertised = listen.clone().unwrap_or_else(|| local.to_string());
        tokio::spawn(join::join_cluster(
            id,
            advertised,
            join.join.clone(),
            join.voter,
            inbound_tx.clone(),
            dialer.clone(),
        ))
    });

    tokio::select! {
        _ = shutdown.wait_for(|v| *v) => tracing::info!(node = id, "shutting down"),
        removed = core_done_rx => if removed == Ok(true) {
            tracing::info!(node = id, "this node was removed from the cluster; stopping");
        } else {
            tracing::error!(node = id, "the Raft core stopped; shutting down");
        },
    }
    if let Some(j) = joiner {
        j.abort();
    }
    health.stopping();
    health_task.abort();
    reloader.abort();
    let _ = stop_tx.send(true);
    let core_result = tokio::task::spawn_blocking(move || core_thread.join())
        .await
        .context("joining the core thread")?
        .map_err(|p| anyhow!("the core thread panicked: {}", panic_message(p.as_ref())))?;
    let core_result = core_result.map_err(|e| storage_failure(e, &dir));
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    if let Some((http, prober)) = http_server {
        prober.abort();
        let _ = tokio::time::timeout(Duration::from_secs(2), http).await;
    }
    core_result
}

/// Whether two configurations have the same members at the same addresses in the same roles.
fn same_members(a: &crate::raft::ClusterConfig, b: &crate::raft::ClusterConfig) -> bool {
    a.members == b.members
}

/// `voters 1 (h:1), 2 (h:2); learners 4 (h:4)`, for messages.
pub fn describe_members(c: &crate::raft::ClusterConfig) -> String {
    let list = |voter: bool| {
        c.members
            .iter()
            .filter(|(_, m)| m.voter == voter)
            .map(|(id, m)| format!("{id} ({})", m.address))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut s = format!("voters {}", list(true));
    if c.learners().next().is_some() {
        s.push_str(&format!("; learners {}", list(false)));
    }
    s
}

/// Every member's address, for leader hints and snapshot transfers.
fn addresses(c: &crate::raft::ClusterConfig) -> BTreeMap<NodeId, String> {
    c.members
        .keys()
        .filter_map(|&id| c.address(id).map(|a| (id, a.to_string())))
        .collect()
}

/// Binds `host:port`.
async fn bind_addr(addr: &str) -> anyhow::Result<TcpListener> {
    let (host, port) =
        crate::config::parse_address(addr).map_err(|e| anyhow!("listen address {addr:?}: {e}"))?;
    bind(&host, port).await
}

/// A failure of the running core (a storage error, typically): names the data directory, and
/// says what to do when its disk is full.
fn storage_failure(e: anyhow::Error, dir: &Path) -> anyhow::Error {
    let full = e.chain().any(|c| {
        c.to_string().contains("No space left on device")
            || c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull)
    });
    let e = e.context(format!("data directory {}", dir.display()));
    if full {
        e.context(format!(
            "the disk holding {} is full: free space on it, then restart the node (it recovers from its log)",
            dir.display()
        ))
    } else {
        e
    }
}

/// Keeps the gRPC health service in step with [`health::Health`] (checked four times a
/// second; only changes are reported).
async fn report_health(h: Arc<health::Health>, reporter: tonic_health::server::HealthReporter) {
    use tonic_health::ServingStatus::{NotServing, Serving};
    let mut last = None;
    let mut every = tokio::time::interval(Duration::from_millis(250));
    loop {
        every.tick().await;
        let now = (health::passed(&h.live()), health::passed(&h.ready()));
        if last == Some(now) {
            continue;
        }
        last = Some(now);
        let status = |ok| if ok { Serving } else { NotServing };
        reporter.set_service_status("", status(now.0)).await;
        reporter
            .set_service_status("raftkv.DataService", status(now.1))
            .await;
    }
}

/// Whether `host` (a config or --listen host) is a loopback address.
fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn insecure_refusal(id: NodeId, addr: &str) -> anyhow::Error {
    anyhow!(
        "node {id} would listen on {addr} without TLS: anyone who can reach that address could read and write every key and pose as a peer. Give config.json a tls section (raftkv certs init --config CONFIG --out certs sets one up), or pass --insecure to serve plaintext on a network you trust"
    )
}

/// Reloads the certificates and the users file on SIGHUP: new connections use them, open ones
/// keep theirs. A file that cannot be used is reported and the old ones are kept.
async fn reload_on_sighup(
    id: NodeId,
    hup: std::io::Result<tokio::signal::unix::Signal>,
    tls: Option<Arc<crate::security::ServerTls>>,
    auth: Arc<crate::security::auth::Auth>,
) {
    let Ok(mut hup) = hup else {
        tracing::warn!(
            node = id,
            "cannot catch SIGHUP: certificates are not reloaded"
        );
        return;
    };
    while hup.recv().await.is_some() {
        let Some(t) = &tls else {
            tracing::info!(
                node = id,
                "SIGHUP: this node serves plaintext; nothing to reload"
            );
            continue;
        };
        match t.reload() {
            Ok((from, until)) => tracing::info!(
                node = id,
                valid_from = %from,
                valid_until = %until,
                "SIGHUP: reloaded the certificates; new connections use them"
            ),
            Err(e) => tracing::error!(node = id, "SIGHUP: {e}; keeping the certificates in use"),
        }
        match auth.reload() {
            Ok(Some(n)) => tracing::info!(node = id, users = n, "SIGHUP: reloaded the users file"),
            Ok(None) => {}
            Err(e) => tracing::error!(node = id, "SIGHUP: {e}; keeping the users in force"),
        }
    }
}

/// Measures the round trip to every peer once a second with a gRPC health check (as etcd's
/// prober does), for `raftkv_network_peer_round_trip_time_seconds`. A connection's first check
/// (which includes connecting) is not counted.
async fn probe_peers(
    me: NodeId,
    mut addrs: watch::Receiver<BTreeMap<NodeId, String>>,
    metrics: Arc<crate::metrics::Metrics>,
    dialer: crate::security::Dialer,
) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let mut channels: BTreeMap<NodeId, (String, HealthClient<crate::security::Conn>, bool)> =
        BTreeMap::new();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        let current = addrs.borrow_and_update().clone();
        channels.retain(|id, (a, _, _)| current.get(id) == Some(a));
        for (&id, a) in current.iter().filter(|(id, _)| **id != me) {
            if channels.contains_key(&id) {
                continue;
            }
            if let Ok(ch) = dialer.lazy(a, crate::security::Purpose::Probe) {
                channels.insert(id, (a.clone(), HealthClient::new(ch), false));
            }
        }
        for (&id, (_, client, warm)) in channels.iter_mut() {
            let started = std::time::Instant::now();
            let check = client.check(HealthCheckRequest {
                service: String::new(),
            });
            match tokio::time::timeout(Duration::from_secs(1), check).await {
                Ok(Ok(_)) => {
                    if *warm {
                        metrics.peer_round_trip(id, started.elapsed());
                    }
                    *warm = true;
                }
                _ => *warm = false,
            }
        }
    }
}

/// The message a panic was raised with.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Refuses to start on another cluster's data directory: if a majority of the cluster's nodes
/// answer that they belong to one cluster and this directory says another, it was put here by
/// mistake (restored from the wrong machine, copied from a test cluster). Running it would
/// only be ignored by the others at best. Without a majority answering, the node starts; its
/// peer messages are still checked one by one.
async fn check_cluster_identity(
    dir: &Path,
    mine: u64,
    peers: Vec<(NodeId, String)>,
    cluster_size: usize,
    dialer: &crate::security::Dialer,
) -> anyhow::Result<Option<(Term, LogIndex)>> {
    if peers.is_empty() {
        return Ok(None);
    }
    let answers =
        crate::transport::peer::probe_peers(peers, Duration::from_millis(1000), dialer).await;
    // If any peer knows its cluster, the highest term and commit index they report: what a
    // node without its former state must catch up to before it votes.
    let known = answers.iter().filter(|a| a.cluster_id != 0).fold(
        None,
        |acc: Option<(Term, LogIndex)>, a| {
            let (t, c) = acc.unwrap_or_default();
            Some((t.max(a.term), c.max(a.commit)))
        },
    );
    if mine == 0 {
        return Ok(known);
    }
    let mut by_id: BTreeMap<u64, Vec<NodeId>> = BTreeMap::new();
    for a in answers.iter().filter(|a| a.cluster_id != 0) {
        by_id.entry(a.cluster_id).or_default().push(a.id);
    }
    let quorum = cluster_size / 2 + 1;
    if let Some((&theirs, nodes)) = by_id
        .iter()
        .find(|(id, nodes)| **id != mine && nodes.len() >= quorum)
    {
        let nodes: Vec<String> = nodes.iter().map(u64::to_string).collect();
        return Err(anyhow!(
            "data directory {} belongs to cluster {}, but nodes {} belong to cluster {}: it is \
             another cluster's directory; refusing to start. Move it away and start this node \
             with an empty data directory: it then catches up from the leader by snapshot.",
            dir.display(),
            cluster_id_str(mine),
            nodes.join(", "),
            cluster_id_str(theirs)
        ));
    }
    Ok(known)
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
    Member(Reply<(LogIndex, crate::raft::ClusterConfig)>),
}

impl PendingWrite {
    fn fail(self, err: ServiceError) {
        match self {
            PendingWrite::Put(r) => {
                let _ = r.send(Err(err));
            }
            PendingWrite::Delete(r) => {
                let _ = r.send(Err(err));
            }
            PendingWrite::Member(r) => {
                let _ = r.send(Err(err));
            }
        }
    }
}

struct Core {
    id: NodeId,
    /// Dials peers (snapshot transfers).
    dialer: crate::security::Dialer,
    raft: Raft<DiskLog>,
    kv: KvStore,
    stager: Stager,
    /// The core's own input, for the snapshot transfers it starts to report back on.
    inbound: mpsc::Sender<Inbound>,
    policy: SnapshotPolicy,
    /// A snapshot accepted by the core, staged, waiting for the `Ready` that installs it.
    pending_install: Option<PendingInstall>,
    /// Snapshot transfers to followers in progress (compaction waits for them), and to whom.
    snapshot_sends: usize,
    sending_to: std::collections::BTreeSet<NodeId>,
    /// The index of the last snapshot sent to each follower, and when: compaction keeps the
    /// log after it until the follower's match index passes it, so that a follower that just
    /// installed a snapshot continues from the log instead of needing another one (the trap of
    /// hashicorp/consul#9609 under sustained writes).
    snapshot_floors: BTreeMap<NodeId, (LogIndex, std::time::Instant)>,
    /// The last snapshot sent or installed, and when.
    last_snapshot: Option<(SnapshotMeta, SystemTime)>,
    snapshots_installed: u64,
    snapshots_sent: u64,
    /// The cluster id the transport stamps and checks; follows the state machine's.
    cluster: ClusterId,
    /// Set while a rejoining node catches up: its vote floor, to record when it is done.
    rejoin_floor: Option<Term>,
    /// The term in which this node, as leader, last proposed a cluster id.
    cluster_id_proposed_in: Term,
    peers: Peers,
    /// Every member's address (from the configuration in force).
    addrs: BTreeMap<NodeId, String>,
    /// The configuration the transport was last set up for.
    config: crate::raft::ClusterConfig,
    /// Hints changed since the last `sync_membership`; when members were last asked for.
    hints_dirty: bool,
    hints_asked: Option<std::time::Instant>,
    /// When this node, knowing no leader, last asked whether it was removed.
    removal_asked: Option<std::time::Instant>,
    /// What `Raft::departing` said at the last `sync_membership`.
    departing: Vec<NodeId>,
    /// A joining node's view of the members before its configuration has any.
    hints: BTreeMap<NodeId, String>,
    /// When this node applied its own removal: it stops a moment later (so that its last
    /// messages, a hand-over among them, go out).
    removed_since: Option<std::time::Instant>,
    /// Proposed writes by log index, with the term they were proposed in.
    writes: BTreeMap<LogIndex, (Term, PendingWrite)>,
    /// Reads waiting for leadership confirmation, by ReadIndex context.
    reads: HashMap<u64, PendingRead>,
    /// Confirmed reads waiting for the state machine to reach their index.
    confirmed_reads: BTreeMap<LogIndex, Vec<PendingRead>>,
    next_read: u64,
    role: Role,
    leader: NodeId,
    /// A leadership transfer this leader started for a client, answered once it ends.
    transfer: Option<PendingTransfer>,
    /// What `/livez`, `/readyz` and the gRPC health service report, set every round.
    health: Arc<health::Health>,
    /// Recorded only when the node serves HTTP.
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// The highest commit index the leader of that term has told this node (its own on a
    /// leader): readiness compares the applied index with it.
    leader_commit: (Term, LogIndex),
    /// A message from the leader arrived in this round.
    leader_heard: bool,
    /// Every member's address, for the peer round-trip prober.
    peer_addrs: watch::Sender<BTreeMap<NodeId, String>>,
    /// When each snapshot transfer in progress started.
    snapshot_started: BTreeMap<NodeId, std::time::Instant>,
}

struct PendingTransfer {
    target: NodeId,
    started: std::time::Instant,
    reply: crate::transport::Reply<(NodeId, NodeId, u64)>,
}

/// When the core's logical ticks fall due: on a fixed grid of `tick`, so that a wake-up a
/// little late does not push every later tick back (`MissedTickBehavior::Delay` did: under CPU
/// contention the clocks ran 8-30% slow, and a leader's heartbeats drifted later with them).
///
/// After a late wake-up a leader is given the ticks that fell due meanwhile, up to one heartbeat
/// interval's worth, so its heartbeat goes out as soon as it runs again. Any other role is
/// given one tick, whatever it missed: a follower that was not scheduled for a while must not
/// count that time against a leader whose heartbeat may be waiting in its own queue. No clock
/// runs ahead of real time, so neither check-quorum nor a follower's lease is shorter than the
/// minimum election timeout.
#[derive(Debug)]
struct TickClock {
    tick: Duration,
    /// The most ticks a leader is given at one wake-up.
    catch_up: u32,
    next: tokio::time::Instant,
}

impl TickClock {
    fn new(tick: Duration, catch_up: u32, now: tokio::time::Instant) -> TickClock {
        let tick = tick.max(Duration::from_millis(1));
        TickClock {
            tick,
            catch_up: catch_up.max(1),
            next: now + tick,
        }
    }

    /// When the next tick falls due.
    fn next(&self) -> tokio::time::Instant {
        self.next
    }

    /// How many ticks to give the core at `now`; moves `next` past `now`.
    fn due(&mut self, now: tokio::time::Instant, leader: bool) -> u32 {
        if now < self.next {
            return 0;
        }
        let fell_due = (now - self.next).as_nanos() / self.tick.as_nanos() + 1;
        match u32::try_from(fell_due) {
            Ok(k) => self.next += self.tick * k,
            Err(_) => self.next = now + self.tick,
        }
        if leader {
            fell_due.min(u128::from(self.catch_up)) as u32
        } else {
            1
        }
    }
}

impl Core {
    async fn run(
        mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        mut clock: TickClock,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Stopped> {
        let timer = tokio::time::sleep_until(clock.next());
        tokio::pin!(timer);
        loop {
            let ticked = tokio::select! {
                biased;
                _ = shutdown.wait_for(|v| *v) => break,
                () = &mut timer => true,
                input = inbound.recv() => match input {
                    Some(input) => {
                        self.handle(input)?;
                        false
                    }
                    None => break,
                },
            };
            for _ in 0..ROUND_INPUTS_MAX {
                match inbound.try_recv() {
                    Ok(input) => self.handle(input)?,
                    Err(_) => break,
                }
            }
            // Ticks come after what is already queued: a follower whose thread was not
            // scheduled for a while reads the heartbeat waiting for it before its election
            // timer counts on, and a leader counts the answers that arrived before it checks
            // for a quorum.
            if ticked {
                let leader = self.raft.role() == Role::Leader;
                for _ in 0..clock.due(tokio::time::Instant::now(), leader) {
                    self.raft.tick();
                }
                timer.as_mut().reset(clock.next());
            }
            self.maybe_name_cluster();
            while self.raft.has_ready() {
                self.process_ready()?;
            }
            self.poll_transfer();
            self.sync_membership();
            self.check_removed();
            self.maybe_compact()?;
            self.maybe_end_repair()?;
            // Pipelined answers of this round go out together, one batch per client call.
            crate::transport::flush_replies();
            self.record_round();
            if self
                .removed_since
                .is_some_and(|t| t.elapsed() > Duration::from_secs(1))
            {
                self.fail_all(|| ServiceError::ShuttingDown);
                crate::transport::flush_replies();
                return Ok(Stopped::Removed);
            }
        }
        self.fail_all(|| ServiceError::ShuttingDown);
        crate::transport::flush_replies();
        Ok(Stopped::Shutdown)
    }

    /// Health and metrics at the end of a round: a few atomic stores.
    fn record_round(&mut self) {
        let (term, leader) = (self.raft.term(), self.raft.leader());
        if self.role == Role::Leader {
            self.leader_commit = (term, self.raft.commit_index());
        } else if self.leader_commit.0 != term {
            self.leader_commit = (term, 0);
        }
        let applied = self.kv.applied();
        let heard = std::mem::take(&mut self.leader_heard) || self.role == Role::Leader;
        self.health
            .round(leader, heard, applied, self.leader_commit.1);
        if let Some(m) = &self.metrics {
            use crate::metrics::set;
            set(&m.has_leader, u64::from(leader != 0));
            set(&m.is_leader, u64::from(self.role == Role::Leader));
            set(&m.term, term);
            set(&m.proposals_committed, self.raft.commit_index());
            set(&m.proposals_applied, applied);
            set(&m.proposals_pending, self.writes.len() as u64);
            let store = self.raft.store();
            set(&m.log_bytes, store.log_bytes());
            set(
                &m.log_entries,
                store.last_index().saturating_sub(store.start().index),
            );
            set(&m.snapshot_index, store.start().index);
            if m.disk_size_due() {
                set(&m.data_bytes, self.kv.disk_bytes());
            }
        }
    }

    /// Counts writes this node proposed that failed.
    fn count_failed(&self, n: usize) {
        if let Some(m) = &self.metrics {
            m.proposals_failed.inc_by(n as u64);
        }
    }

    /// A node that knows no leader asks now and then (every 3 s, in the background) whether
    /// the leader has it removed: a removed node that missed its removal entry would otherwise
    /// run, and campaign in vain, forever.
    fn check_removed(&mut self) {
        if self.raft.leader() != 0
            || self.removed_since.is_some()
            || self
                .removal_asked
                .is_some_and(|t| t.elapsed() < Duration::from_secs(3))
        {
            return;
        }
        self.removal_asked = Some(std::time::Instant::now());
        let addrs: Vec<String> = self
            .addrs
            .iter()
            .filter(|(id, _)| **id != self.id)
            .map(|(_, a)| a.clone())
            .collect();
        let (inbound, me) = (self.inbound.clone(), self.id);
        let dialer = self.dialer.clone();
        tokio::spawn(async move {
            if join::removal_committed(&addrs, me, &dialer).await {
                let _ = inbound.send(Inbound::RemovedByLeader).await;
            }
        });
    }

    /// Asks the members it knows (at most once a second, in the background) where every
    /// member is, after a message from `from`, a node it has no address for.
    fn ask_for_members(&mut self, from: NodeId) {
        if self
            .hints_asked
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.hints_asked = Some(std::time::Instant::now());
        tracing::info!(
            node = self.id,
            from,
            "message from node {from}, whose address this node does not know; asking the members"
        );
        let addrs: Vec<String> = self.addrs.values().cloned().collect();
        let inbound = self.inbound.clone();
        let me = self.id;
        let dialer = self.dialer.clone();
        tokio::spawn(async move {
            if let Ok(c) =
                crate::client::Client::from_addresses(&addrs, Duration::from_secs(1), &dialer).await
            {
                let _ = inbound.send(Inbound::PeerHints(c.nodes_except(me))).await;
            }
        });
    }

    /// Follows the configuration in force: connections to new members, none to members that
    /// left, removed ids refused by the peer service. Once this node's own removal is applied
    /// it stops (a removed node takes no part in the cluster any more: hashicorp/raft#524).
    fn sync_membership(&mut self) {
        if self.removed_since.is_none()
            && self
                .kv
                .config()
                .is_some_and(|c| c.removed.contains(&self.id))
        {
            tracing::warn!(
                node = self.id,
                "this node was removed from the cluster; it stops now and its id is never used again (its data directory can be deleted)"
            );
            self.removed_since = Some(std::time::Instant::now());
        }
        let departing = self.raft.departing();
        let changed = self.raft.config() != &self.config;
        if !changed && departing == self.departing && !self.hints_dirty {
            return;
        }
        let c = self.raft.config().clone();
        if changed && !c.is_empty() {
            tracing::info!(
                node = self.id,
                index = self.raft.config_index(),
                "membership: {}",
                describe_members(&c)
            );
        }
        // Hints matter only for members the configuration does not name.
        self.hints.retain(|id, _| !c.contains(*id));
        self.hints_dirty = false;
        // A member being removed is still reached until it knows (`Raft::departing`).
        let keep: BTreeMap<NodeId, String> = departing
            .iter()
            .filter_map(|id| self.addrs.get(id).map(|a| (*id, a.clone())))
            .collect();
        self.addrs = addresses(&c);
        for (id, a) in self.hints.iter().chain(&keep) {
            self.addrs.entry(*id).or_insert_with(|| a.clone());
        }
        self.departing = departing;
        self.peer_addrs.send_if_modified(|a| {
            let changed = *a != self.addrs;
            if changed {
                a.clone_from(&self.addrs);
            }
            changed
        });
        self.peers.set(
            self.addrs
                .iter()
                .filter(|(id, _)| **id != self.id)
                .map(|(&id, a)| (id, a.clone())),
        );
        self.config = c;
    }

    /// Answers the pending leadership transfer once it has ended: the target leads, another
    /// node does, or this node still leads after the core gave up (an election timeout).
    fn poll_transfer(&mut self) {
        let Some(t) = &self.transfer else {
            return;
        };
        let (leader, role) = (self.raft.leader(), self.raft.role());
        let outcome = if leader == t.target {
            Ok((self.id, t.target, self.raft.term()))
        } else if role == Role::Leader && self.raft.lead_transferee() == 0 {
            Err(ServiceError::InvalidArgument(format!(
                "node {} did not take over within an election timeout; node {} still leads",
                t.target, self.id
            )))
        } else if role != Role::Leader && leader != 0 {
            Err(ServiceError::InvalidArgument(format!(
                "node {leader} was elected instead of node {}",
                t.target
            )))
        } else if t.started.elapsed() > std::time::Duration::from_secs(3) {
            Err(ServiceError::InvalidArgument(format!(
                "no leader 3 s after the transfer to node {} began",
                t.target
            )))
        } else {
            return;
        };
        if let Some(t) = self.transfer.take() {
            let _ = t.reply.send(outcome);
        }
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
                    if !self.addrs.contains_key(&m.from) {
                        // A member this node has no address for (one added while it was down,
                        // or after it was repaired): it could not answer it.
                        self.ask_for_members(m.from);
                    }
                    let heard = match &m.body {
                        raft::MessageBody::AppendRequest { leader_commit, .. } => {
                            Some((m.term, m.from, *leader_commit))
                        }
                        _ => None,
                    };
                    self.raft.step(m)?;
                    if let Some((term, from, commit)) = heard
                        && term == self.raft.term()
                        && from == self.raft.leader()
                    {
                        let c = if self.leader_commit.0 == term {
                            self.leader_commit.1.max(commit)
                        } else {
                            commit
                        };
                        self.leader_commit = (term, c);
                        self.leader_heard = true;
                    }
                }
            }
            Inbound::Client(r) => self.handle_client(r),
            Inbound::RemovedByLeader => {
                if self.removed_since.is_none() {
                    tracing::warn!(
                        node = self.id,
                        "the leader reports this node removed from the cluster; it stops now and its id is never used again (its data directory can be deleted)"
                    );
                    self.removed_since = Some(std::time::Instant::now());
                }
            }
            Inbound::PeerHints(hints) => {
                self.hints.extend(hints);
                self.hints_dirty = true;
                self.sync_membership();
            }
            Inbound::Clients(rs) => {
                for r in rs {
                    self.handle_client(r);
                }
            }
            Inbound::Snapshot {
                message,
                staged,
                reply,
            } => {
                let meta = staged.meta;
                let sender_term = message.term;
                self.raft.step(message)?;
                if self.raft.pending_snapshot() == Some(meta) {
                    // A newer snapshot replaces one still waiting (one per round at most).
                    if let Some(old) = self
                        .pending_install
                        .replace(PendingInstall { staged, reply })
                    {
                        if let Some(m) = &self.metrics {
                            m.snapshot_receive_failures.inc();
                        }
                        self.stager.discard(old.staged);
                        let _ = old
                            .reply
                            .send((false, "superseded by a newer snapshot".into()));
                    }
                } else {
                    if let Some(m) = &self.metrics {
                        m.snapshot_receive_failures.inc();
                    }
                    self.stager.discard(staged);
                    let why = if sender_term < self.raft.term() {
                        format!(
                            "refused: the sender's term {sender_term} is older than this node's term {}",
                            self.raft.term()
                        )
                    } else {
                        format!(
                            "not needed: this node has committed {} (snapshot at {})",
                            self.raft.commit_index(),
                            meta.index
                        )
                    };
                    let _ = reply.send((false, why));
                }
            }
            Inbound::SnapshotSent { to, result } => {
                self.snapshot_sends -= 1;
                self.sending_to.remove(&to);
                let started = self.snapshot_started.remove(&to);
                if let Some(m) = &self.metrics {
                    match &result {
                        Ok(o) if o.installed => m.snapshot_send_success.inc(),
                        _ => m.snapshot_send_failures.inc(),
                    };
                    if let Some(t) = started {
                        m.snapshot_send_duration.observe(t.elapsed().as_secs_f64());
                    }
                }
                match &result {
                    Ok(o) => tracing::info!(
                        node = self.id,
                        to,
                        installed = o.installed,
                        records = o.records,
                        mib = o.bytes as f64 / (1 << 20) as f64,
                        detail = %o.detail,
                        "snapshot transfer finished"
                    ),
                    Err(e) => tracing::warn!(node = self.id, to, "snapshot transfer failed: {e}"),
                }
                self.raft.report_snapshot(to, result.is_ok());
            }
        }
        Ok(())
    }

    /// A leader of a cluster that has no id yet (a new cluster, or one from before ids) names
    /// it: the first `SetClusterId` entry applied wins, on every node alike.
    fn maybe_name_cluster(&mut self) {
        if self.raft.role() != Role::Leader
            || self.kv.cluster_id() != 0
            || self.cluster_id_proposed_in == self.raft.term()
        {
            return;
        }
        let id = crate::transport::new_cluster_id(&format!("node {}", self.id));
        let cmd = Command {
            id: RequestId::default(),
            op: Op::SetClusterId { id },
        };
        // Refused (a transfer in progress, too much pending): tried again next round.
        if self.raft.propose(cmd.encode()).is_ok() {
            self.cluster_id_proposed_in = self.raft.term();
        }
    }

    /// The state machine may have learned the cluster id (an applied entry or a snapshot).
    fn sync_cluster_id(&mut self) {
        let id = self.kv.cluster_id();
        if self.cluster.swap(id, Ordering::Relaxed) != id {
            tracing::info!(node = self.id, cluster = %cluster_id_str(id), "cluster id");
            self.raft.store().set_cluster_id(id);
        }
    }

    /// A rejoining node caught up: its vote counts again, durably.
    fn maybe_end_repair(&mut self) -> anyhow::Result<()> {
        if let Some(floor) = self.rejoin_floor
            && !self.raft.rejoining()
        {
            self.raft
                .store()
                .set_rejoin(floor, None)
                .context("recording the end of a rejoin")?;
            self.rejoin_floor = None;
            tracing::info!(
                node = self.id,
                commit = self.raft.commit_index(),
                "rejoining node caught up; it votes again (in terms after {floor})"
            );
        }
        Ok(())
    }

    /// Starts streaming the state machine, as it is now, to `to`, in the background (unless
    /// a transfer to `to` is still going: its report ends the core's wait).
    fn start_snapshot_send(&mut self, to: NodeId) {
        if !self.sending_to.insert(to) {
            return;
        }
        let mut source = self.kv.snapshot_source();
        // The configuration in force at the snapshot's index (config.json's for a cluster that
        // never changed): the receiver must not keep one from the log it drops.
        source.config = self.raft.config_at(source.meta.index).cloned();
        let inbound = self.inbound.clone();
        let (from, term) = (self.id, self.raft.term());
        let addr = self.addrs.get(&to).cloned().unwrap_or_default();
        let meta = source.meta;
        let cluster_id = self.kv.cluster_id();
        let dialer = self.dialer.clone();
        self.snapshot_sends += 1;
        self.snapshots_sent += 1;
        self.snapshot_started.insert(to, std::time::Instant::now());
        self.snapshot_floors
            .insert(to, (meta.index, std::time::Instant::now()));
        self.last_snapshot = Some((meta, SystemTime::now()));
        tracing::info!(
            node = self.id,
            to,
            index = meta.index,
            term = meta.term,
            "sending a snapshot (the follower needs entries compacted away)"
        );
        tokio::spawn(async move {
            let result = if meta.index > 0 && meta.term == 0 {
                // A format-1 directory that has not applied anything since its upgrade does not
                // know its applied entry's term yet.
                Err("the applied entry's term is not known yet".to_string())
            } else {
                snapshot_transport::send(from, to, term, cluster_id, &addr, source, &dialer).await
            };
            if result.is_err() {
                // Paces the retries: the core starts the next transfer on the next heartbeat
                // answer after this report.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let _ = inbound.send(Inbound::SnapshotSent { to, result }).await;
        });
    }

    /// Compacts the log once it has grown past the policy's limits, keeping the newest part
    /// (never past what is applied and durable, and not while a snapshot is being sent: a
    /// follower installing one needs the entries right after it).
    fn maybe_compact(&mut self) -> anyhow::Result<()> {
        let log = self.raft.store();
        let start = log.start().index;
        let compactable = self.kv.applied().min(self.raft.persisted_index());
        let entries = compactable.saturating_sub(start);
        let p = self.policy;
        if entries <= p.log_entries_max && log.log_bytes() <= p.log_bytes_max {
            return Ok(());
        }
        // Waits for snapshot transfers and their followers, up to a hard limit: a log of four
        // times its maximum is compacted whatever is in progress.
        let over_limit = log.log_bytes() > p.log_bytes_max.saturating_mul(4)
            || entries > p.log_entries_max.saturating_mul(4);
        if self.snapshot_sends > 0 && !over_limit {
            return Ok(());
        }
        let mut to = compactable
            .saturating_sub(p.keep_entries)
            .max(log.index_keeping_bytes(p.keep_bytes))
            .min(compactable);
        if !self.snapshot_floors.is_empty() {
            let matched: BTreeMap<NodeId, LogIndex> = self
                .raft
                .status()
                .progress
                .into_iter()
                .map(|(id, m, _, _)| (id, m))
                .collect();
            self.snapshot_floors.retain(|id, (floor, since)| {
                matched.get(id).is_some_and(|&m| m < *floor)
                    && since.elapsed() < Duration::from_secs(300)
            });
            if !over_limit && let Some(&(floor, _)) = self.snapshot_floors.values().min() {
                to = to.min(floor);
            }
        }
        let log = self.raft.store();
        if to <= start {
            return Ok(());
        }
        let before = log.log_bytes();
        self.raft
            .store_mut()
            .compact(to)
            .context("compacting the Raft log")?;
        tracing::debug!(
            node = self.id,
            to,
            freed_mib = (before - self.raft.store().log_bytes()) as f64 / (1 << 20) as f64,
            "log compacted"
        );
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
            ClientRequest::TransferLeader { target, reply } => {
                if self.transfer.is_some() {
                    let _ = reply.send(Err(ServiceError::InvalidArgument(
                        "a leadership transfer is already in progress".into(),
                    )));
                    return;
                }
                match self.raft.transfer_leader(target) {
                    Ok(to) if to == self.id => {
                        let _ = reply.send(Ok((self.id, to, self.raft.term())));
                    }
                    Ok(to) => {
                        tracing::info!(node = self.id, to, "transferring leadership");
                        self.transfer = Some(PendingTransfer {
                            target: to,
                            started: std::time::Instant::now(),
                            reply,
                        });
                    }
                    Err(raft::Error::NotLeader { .. }) => {
                        let _ = reply.send(Err(self.not_leader()));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ServiceError::InvalidArgument(e.to_string())));
                    }
                }
            }
            ClientRequest::ChangeMembership { change, reply } => {
                self.change_membership(change, reply);
            }
            ClientRequest::Snapshot { reply } => {
                if self.raft.role() != Role::Leader {
                    let _ = reply.send(Err(self.not_leader()));
                    return;
                }
                let mut source = self.kv.snapshot_source();
                source.config = self.raft.config_at(source.meta.index).cloned();
                let _ = reply.send(Ok(crate::transport::BackupSource {
                    source,
                    from: self.id,
                    term: self.raft.term(),
                    cluster_id: self.kv.cluster_id(),
                }));
            }
        }
    }

    fn change_membership(
        &mut self,
        change: crate::raft::ConfChange,
        reply: Reply<(LogIndex, crate::raft::ClusterConfig)>,
    ) {
        use crate::raft::ConfChange;
        if self.raft.role() != Role::Leader {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        // A change already in force is done (a joining node asks again after a restart).
        let c = self.raft.config();
        let done = match &change {
            ConfChange::AddLearner { id, address } => {
                c.members.get(id).is_some_and(|m| &m.address == address)
            }
            ConfChange::Promote { id } => c.is_voter(*id),
            ConfChange::Remove { id } => c.removed.contains(id),
        };
        if done && self.raft.config_index() <= self.raft.commit_index() {
            let _ = reply.send(Ok((0, c.clone())));
            return;
        }
        match self.raft.propose_conf_change(&change) {
            Ok((index, term)) => {
                tracing::info!(
                    node = self.id,
                    index,
                    "membership change proposed: {change}"
                );
                self.writes
                    .insert(index, (term, PendingWrite::Member(reply)));
            }
            Err(e) => {
                let err = match e {
                    raft::Error::NotLeader { .. } => self.not_leader(),
                    raft::Error::TransferInProgress { to } => ServiceError::NotLeader {
                        leader_id: Some(to),
                        leader_addr: self.addrs.get(&to).cloned(),
                    },
                    raft::Error::ProposalDropped(bytes) => ServiceError::Busy(bytes),
                    raft::Error::ConfChangeRefused { why, retry: true } => {
                        ServiceError::TryAgain(format!("cannot {change} now: {why}"))
                    }
                    raft::Error::ConfChangeRefused { why, .. } => {
                        ServiceError::InvalidArgument(format!("cannot {change}: {why}"))
                    }
                    other => ServiceError::InvalidArgument(format!("cannot {change}: {other}")),
                };
                let _ = reply.send(Err(err));
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
                // A refusal for want of leadership is a redirect, not a failed proposal.
                if matches!(e, raft::Error::ProposalDropped(_)) {
                    self.count_failed(1);
                }
                let err = match e {
                    raft::Error::ProposalDropped(bytes) => ServiceError::Busy(bytes),
                    // Refused while leadership moves: the hint points at the new leader.
                    raft::Error::TransferInProgress { to } => ServiceError::NotLeader {
                        leader_id: Some(to),
                        leader_addr: self.addrs.get(&to).cloned(),
                    },
                    _ => self.not_leader(),
                };
                pending.fail(err);
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
            config: s.config,
            config_index: s.config_index,
            config_pending: s.config_pending,
            snapshot_index: self.raft.store().start().index,
            snapshot_term: self.raft.store().start().term,
            log_bytes: self.raft.store().log_bytes(),
            data_bytes: self.kv.disk_bytes(),
            last_snapshot_unix_ms: self.last_snapshot.map_or(0, |(_, t)| {
                t.duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64)
            }),
            snapshots_installed: self.snapshots_installed,
            snapshots_sent: self.snapshots_sent,
            cluster_id: self.kv.cluster_id(),
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
            w.fail(err());
        }
        self.fail_reads(err);
    }

    /// Leadership lost: writes not yet committed may or may not be applied; those committed
    /// are answered when they apply here, as on a leader.
    fn fail_uncommitted(&mut self, err: impl Fn() -> ServiceError) {
        let uncommitted = self.writes.split_off(&(self.raft.commit_index() + 1));
        self.count_failed(uncommitted.len());
        for (_, (_, w)) in uncommitted {
            w.fail(err());
        }
        self.fail_reads(err);
    }

    fn fail_reads(&mut self, err: impl Fn() -> ServiceError) {
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
            if ss.leader != self.leader
                && ss.leader != 0
                && let Some(m) = &self.metrics
            {
                m.leader_changes.inc();
            }
            if self.role == Role::Leader && ss.role != Role::Leader {
                // Writes in flight may still commit under the next leader, or be replaced.
                self.fail_uncommitted(|| ServiceError::LeadershipLost);
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
        for to in rd.snapshot_sends {
            self.start_snapshot_send(to);
        }
        // 2. Install a snapshot the core accepted (atomically: the staged state becomes live
        //    and the log is dropped), then make entries and hard state durable: one batch, at
        //    most one fsync.
        if let Some(snap) = rd.snapshot {
            let pending = self
                .pending_install
                .take()
                .filter(|p| p.staged.meta == snap)
                .ok_or_else(|| {
                    anyhow!("the core installs snapshot {snap:?}, which is not staged")
                })?;
            storage::install_snapshot(self.raft.store_mut(), &mut self.kv, pending.staged)
                .context("installing a snapshot")?;
            tracing::info!(
                node = self.id,
                index = snap.index,
                term = snap.term,
                "snapshot installed"
            );
            self.last_snapshot = Some((snap, SystemTime::now()));
            self.snapshots_installed += 1;
            if let Some(m) = &self.metrics {
                m.snapshot_receive_success.inc();
            }
            // Writes this node proposed as leader that the snapshot covers are not applied
            // one by one here: their outcome is not known to it.
            let after = self.writes.split_off(&(snap.index + 1));
            self.count_failed(self.writes.len());
            for (_, (_, w)) in std::mem::replace(&mut self.writes, after) {
                w.fail(ServiceError::LeadershipLost);
            }
            self.sync_cluster_id();
            let _ = pending.reply.send((true, "installed".into()));
        }
        if !rd.entries.is_empty() || rd.hard_state.is_some() {
            self.raft
                .store_mut()
                .append(&rd.entries, rd.hard_state, rd.must_sync)
                .context("persisting the Raft log")?;
            if let Some(took) = self.raft.store_mut().take_fsync_time()
                && let Some(m) = &self.metrics
            {
                m.wal_fsync.observe(took.as_secs_f64());
            }
        }
        // 3. Responses promise durable state; it is durable now.
        for m in responses {
            self.peers.push(m);
        }
        self.peers.flush();
        // 4. Apply committed entries and answer their clients.
        if !rd.committed_entries.is_empty() {
            let started = self.metrics.as_ref().map(|_| std::time::Instant::now());
            let outcomes = self
                .kv
                .apply(&rd.committed_entries)
                .context("applying committed entries")?;
            if let (Some(m), Some(t)) = (&self.metrics, started) {
                m.backend_commit.observe(t.elapsed().as_secs_f64());
            }
            self.sync_cluster_id();
            for (e, outcome) in rd.committed_entries.iter().zip(outcomes) {
                let Some((term, w)) = self.writes.remove(&e.index) else {
                    continue;
                };
                let ok = term == e.term;
                if !ok {
                    self.count_failed(1);
                }
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
                    (PendingWrite::Member(r), _) => {
                        let _ = r.send(match crate::raft::ClusterConfig::decode(&e.data) {
                            Ok(c) if ok => Ok((e.index, c)),
                            _ => Err(ServiceError::NotCommitted),
                        });
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

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_leader_keeps_its_ticks_on_the_grid_and_catches_up_a_heartbeat_interval_at_most() {
        let t0 = tokio::time::Instant::now();
        let mut c = TickClock::new(10 * MS, 5, t0);
        assert_eq!(c.due(t0 + 5 * MS, true), 0, "not due yet");
        assert_eq!(c.due(t0 + 10 * MS, true), 1);
        assert_eq!(c.next(), t0 + 20 * MS);
        // 3 ms late: the next tick stays at 30, not 33.
        assert_eq!(c.due(t0 + 23 * MS, true), 1);
        assert_eq!(c.next(), t0 + 30 * MS);
        // Not scheduled from 23 to 64 ms: the ticks of 30, 40, 50 and 60 ms all come now.
        assert_eq!(c.due(t0 + 64 * MS, true), 4);
        assert_eq!(c.next(), t0 + 70 * MS);
        // Stopped for a second: one heartbeat interval's worth, the rest dropped.
        assert_eq!(c.due(t0 + 1070 * MS, true), 5);
        assert_eq!(c.next(), t0 + 1080 * MS);
    }

    #[test]
    fn any_other_role_gets_one_tick_per_wake_up_on_the_same_grid() {
        let t0 = tokio::time::Instant::now();
        let mut c = TickClock::new(10 * MS, 5, t0);
        assert_eq!(c.due(t0 + 13 * MS, false), 1);
        assert_eq!(c.next(), t0 + 20 * MS, "a little late: no drift");
        // A follower not scheduled for 150 ms counts one tick, not 15: a heartbeat may be
        // waiting in its queue.
        assert_eq!(c.due(t0 + 164 * MS, false), 1);
        assert_eq!(c.next(), t0 + 170 * MS);
    }

    #[test]
    fn no_clock_runs_ahead_of_real_time_and_small_lateness_loses_no_ticks() {
        for leader in [true, false] {
            let t0 = tokio::time::Instant::now();
            let mut c = TickClock::new(10 * MS, 5, t0);
            let (mut ticks, mut x) = (0u64, 12345u64);
            let mut now = t0;
            while now < t0 + Duration::from_secs(10) {
                // Wake up at the deadline, 0-7 ms late (always short of the next one).
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                now = c.next() + Duration::from_micros((x >> 33) % 7000);
                ticks += u64::from(c.due(now, leader));
                let real = ((now - t0).as_millis() / 10) as u64;
                assert!(ticks <= real, "{ticks} ticks after {real} ticks' time");
            }
            // One per 10 ms, none lost to lateness.
            assert!(ticks >= 999, "leader {leader}: {ticks} ticks in 10 s");
        }
    }

    #[test]
    fn a_storage_failure_names_the_data_directory_once_and_a_full_disk_says_what_to_do() {
        let full = crate::storage::disk::io_err(fjall::Error::Io(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "No space left on device (os error 28)",
        )));
        let e = storage_failure(
            anyhow::Error::new(full).context("persisting the Raft log"),
            Path::new("data/node-2"),
        );
        let text = format!("{e:#}");
        assert_eq!(
            text,
            "the disk holding data/node-2 is full: free space on it, then restart the node (it recovers from its log): data directory data/node-2: persisting the Raft log: I/O error: No space left on device (os error 28)"
        );
        assert_eq!(text.matches("No space left").count(), 1, "{text}");

        let other = storage_failure(anyhow!("applying committed entries"), Path::new("d"));
        assert_eq!(
            format!("{other:#}"),
            "data directory d: applying committed entries"
        );
    }
}
