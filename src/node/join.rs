//! `raftkv node --join`: a node that is not a member asks the cluster to add it as a learner
//! at the address it listens on, and (with `--voter`) to promote it once it has caught up.
//!
//! Both requests are idempotent (a change already in force succeeds at once), so a joining
//! node that restarts simply asks again. The leader judges "caught up" (see
//! `Raft::propose_conf_change`); until then it answers "not now" and the node asks again.

use std::time::Duration;

use crate::client::Client;
use crate::proto::MembershipOp;
use crate::raft::NodeId;

/// How often a joining node asks again after "not now" or no answer.
const RETRY: Duration = Duration::from_secs(1);

pub async fn join_cluster(
    id: NodeId,
    listen: String,
    via: Vec<String>,
    voter: bool,
    core: tokio::sync::mpsc::Sender<crate::transport::Inbound>,
    dialer: crate::security::Dialer,
) {
    let client = loop {
        match Client::from_addresses(&via, Duration::from_secs(1), &dialer).await {
            Ok(c) => break c.with_timeout(Duration::from_secs(5)),
            Err(e) => {
                tracing::warn!(node = id, "joining: {e}; trying again");
                tokio::time::sleep(RETRY).await;
            }
        }
    };
    // Until the leader's log tells this node the members, it answers them at these addresses.
    let hints = client.nodes_except(id);
    let _ = core.send(crate::transport::Inbound::PeerHints(hints)).await;
    if !ask(&client, id, MembershipOp::AddLearner, &listen).await {
        return;
    }
    tracing::info!(
        node = id,
        %listen,
        "joined the cluster as a learner; catching up from the leader"
    );
    if voter && ask(&client, id, MembershipOp::Promote, "").await {
        tracing::info!(node = id, "promoted to voter");
    }
}

/// Whether the leader, as the nodes at `addrs` know it, reports `me` removed by a committed
/// configuration.
pub async fn removal_committed(
    addrs: &[String],
    me: NodeId,
    dialer: &crate::security::Dialer,
) -> bool {
    let Ok(client) = Client::from_addresses(addrs, Duration::from_secs(1), dialer).await else {
        return false;
    };
    client
        .status_all(Duration::from_secs(1))
        .await
        .into_iter()
        .filter_map(|r| r.result.ok())
        .filter(|s| s.role == "leader")
        .max_by_key(|s| s.term)
        .is_some_and(|l| l.removed.contains(&me) && !l.config_pending)
}

/// Asks until the change is in force (true) or refused for good (false: logged).
async fn ask(client: &Client, id: NodeId, op: MembershipOp, address: &str) -> bool {
    loop {
        match client.change_membership(op, id, address).await {
            Ok(_) => return true,
            Err(e) if e.retryable => {
                tracing::info!(node = id, "joining: {e}; asking again");
                tokio::time::sleep(RETRY).await;
            }
            Err(e) => {
                tracing::error!(node = id, "joining refused: {e}");
                return false;
            }
        }
    }
}
