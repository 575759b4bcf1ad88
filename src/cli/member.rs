//! `raftkv member list|add|promote|remove`: the cluster's membership (Raft dissertation 4,
//! single-server changes). The shell has the same commands.

use std::time::{Duration, Instant};

use anyhow::anyhow;

use crate::client::Client;
use crate::config::Config;
use crate::proto::MembershipOp;
use crate::raft::NodeId;

use super::ConfigArg;

#[derive(clap::Args, Debug)]
pub struct MemberArgs {
    #[command(subcommand)]
    pub command: MemberCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum MemberCommand {
    /// Every member: id, address, voter or learner, and how far its log has come.
    #[command(
        long_about = "Every member: id, address, voter or learner, and its match index (how far \
        its log matches the leader's, as the leader tracks it), then a change in progress if \
        there is one. The members come from the cluster, not from config.json, which only \
        tells where to start looking."
    )]
    List {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Add node ID at HOST:PORT: as a learner, then promoted to voter once it has caught up.
    #[command(long_about = "Add node ID, listening at HOST:PORT.\n\n\
        The node is added as a learner: it receives the log (by snapshot if the log is \
        compacted) but does not vote, so the cluster's quorum does not change while it catches \
        up. Without --learner the command then waits until the leader finds it caught up \
        (within 1000 entries) and promotes it to voter. Start the new node with \
        `raftkv node --id ID --config C --join HOST:PORT --listen HOST:PORT` (before or after \
        this command; with --join the node asks to be added itself, and --voter to be \
        promoted). IDs are never reused: a removed member's id is refused.")]
    Add {
        id: NodeId,
        /// Where the new node listens for peers and clients.
        #[arg(value_name = "HOST:PORT", value_parser = parse_addr)]
        address: String,
        /// Leave it a learner (promote it later with `member promote`).
        #[arg(long)]
        learner: bool,
        /// How long to wait for the new node to catch up before giving up on the promotion
        /// (it stays a learner).
        #[arg(long, default_value = "10m", value_parser = super::parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Make learner ID a voter (refused until it has caught up).
    Promote {
        id: NodeId,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Remove member ID for good (a voter, a learner, or the leader itself).
    #[command(long_about = "Remove member ID for good.\n\n\
        A removed node stops (it exits once it has applied its removal) and its id is never \
        used again. Removing the leader works too: it commits its own removal, then hands the \
        leadership to a caught-up voter. Removing a voter lowers the quorum; a cluster keeps \
        at least one voter.")]
    Remove {
        id: NodeId,
        #[command(flatten)]
        config: ConfigArg,
    },
}

fn parse_addr(s: &str) -> Result<String, String> {
    crate::config::check_address(s).map(|()| s.to_string())
}

/// The members as a table, from the leader's point of view (or any node's, with no leader).
pub async fn list(client: &Client) -> Result<String, String> {
    let reports = client.status_all(Duration::from_secs(2)).await;
    let answers: Vec<_> = reports
        .iter()
        .filter_map(|r| r.result.as_ref().ok())
        .collect();
    let Some(s) = answers
        .iter()
        .find(|s| s.role == "leader")
        .or_else(|| answers.iter().max_by_key(|s| (s.term, s.config_index)))
    else {
        return Err(format!(
            "cannot reach the cluster (tried {})",
            reports
                .iter()
                .map(|r| format!("node {} at {}", r.id, r.addr))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    let mut out = format!("{:<4} {:<22} {:<8} {:>8}", "ID", "ADDRESS", "ROLE", "MATCH");
    for m in &s.members {
        let matched = if m.id == s.id {
            s.last_log_index.to_string()
        } else {
            s.progress
                .iter()
                .find(|p| p.id == m.id)
                .map_or("-".into(), |p| p.match_index.to_string())
        };
        let role = if m.voter { "voter" } else { "learner" };
        let lead = if m.id == s.leader_id { " (leader)" } else { "" };
        out.push_str(&format!(
            "\n{:<4} {:<22} {:<8} {:>8}{lead}",
            m.id, m.address, role, matched
        ));
    }
    if s.role != "leader" {
        out.push_str(&format!(
            "\n(no leader answered: as node {} sees it; match indexes are the leader's to know)",
            s.id
        ));
    }
    if s.config_pending {
        out.push_str(&format!(
            "\nchange in progress: configuration entry {} is not committed yet",
            s.config_index
        ));
    }
    Ok(out)
}

fn summary(members: &[crate::proto::MemberInfo]) -> String {
    let ids = |voter: bool| {
        members
            .iter()
            .filter(|m| m.voter == voter)
            .map(|m| m.id.to_string())
            .collect::<Vec<_>>()
    };
    let (v, l) = (ids(true), ids(false));
    if l.is_empty() {
        format!("voters {}", v.join(", "))
    } else {
        format!("voters {}; learners {}", v.join(", "), l.join(", "))
    }
}

/// Adds `id` at `address` as a learner; unless `learner`, then promotes it once caught up
/// (waiting up to `wait`).
pub async fn add(
    client: &Client,
    id: NodeId,
    address: &str,
    learner: bool,
    wait: Duration,
) -> Result<String, String> {
    let (index, members) = client
        .change_membership(MembershipOp::AddLearner, id, address)
        .await
        .map_err(|e| e.to_string())?;
    let added = if index == 0 {
        format!("node {id} was already a member at {address}")
    } else {
        format!("node {id} added as a learner at {address} (entry {index})")
    };
    if learner {
        return Ok(format!("{added}; {}", summary(&members)));
    }
    eprintln!("{added}; waiting for it to catch up to promote it (Ctrl-C leaves it a learner)");
    let started = Instant::now();
    loop {
        match client
            .change_membership(MembershipOp::Promote, id, "")
            .await
        {
            Ok((index, members)) => {
                return Ok(format!(
                    "node {id} promoted to voter (entry {index}) after {:.1} s; {}",
                    started.elapsed().as_secs_f64(),
                    summary(&members)
                ));
            }
            Err(e) if e.retryable && started.elapsed() < wait => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                return Err(format!(
                    "{added}, but it was not promoted: {e}. It stays a learner; promote it with `raftkv member promote {id}` once it has caught up"
                ));
            }
        }
    }
}

pub async fn promote(client: &Client, id: NodeId) -> Result<String, String> {
    let (index, members) = client
        .change_membership(MembershipOp::Promote, id, "")
        .await
        .map_err(|e| e.to_string())?;
    Ok(if index == 0 {
        format!("node {id} is a voter already; {}", summary(&members))
    } else {
        format!(
            "node {id} promoted to voter (entry {index}); {}",
            summary(&members)
        )
    })
}

pub async fn remove(client: &Client, id: NodeId) -> Result<String, String> {
    let (index, members) = client
        .change_membership(MembershipOp::Remove, id, "")
        .await
        .map_err(|e| e.to_string())?;
    Ok(if index == 0 {
        format!("node {id} was removed already; {}", summary(&members))
    } else {
        format!(
            "node {id} removed (entry {index}); its id is never used again; {}",
            summary(&members)
        )
    })
}

pub async fn run(args: MemberArgs) -> anyhow::Result<()> {
    let config = match &args.command {
        MemberCommand::List { config }
        | MemberCommand::Add { config, .. }
        | MemberCommand::Promote { config, .. }
        | MemberCommand::Remove { config, .. } => config,
    };
    let cfg = Config::load(&config.config)?;
    let client = Client::discover_with(cfg.addrs(), config.dialer(&cfg)?).await;
    let out = match args.command {
        MemberCommand::List { .. } => list(&client).await,
        MemberCommand::Add {
            id,
            address,
            learner,
            timeout,
            ..
        } => add(&client, id, &address, learner, timeout).await,
        MemberCommand::Promote { id, .. } => promote(&client, id).await,
        MemberCommand::Remove { id, .. } => remove(&client, id).await,
    };
    outln!("{}", out.map_err(|e| anyhow!(e))?);
    Ok(())
}

/// The shell's `member ...` line (after the word `member`).
pub async fn shell(client: &Client, rest: &str) -> Result<String, String> {
    const USAGE: &str = "usage: member list | member add ID HOST:PORT [--learner] | member promote ID | member remove ID";
    let words: Vec<&str> = rest.split_whitespace().collect();
    let id = |w: &str| {
        w.parse::<NodeId>()
            .ok()
            .filter(|&id| id != 0)
            .ok_or_else(|| format!("{w:?} is not a node id; {USAGE}"))
    };
    match words.as_slice() {
        ["list"] => list(client).await,
        ["add", i, addr] | ["add", i, addr, "--learner"] => {
            parse_addr(addr).map_err(|e| format!("address {addr:?}: {e}"))?;
            let learner = words.len() == 4;
            add(client, id(i)?, addr, learner, Duration::from_secs(600)).await
        }
        ["promote", i] => promote(client, id(i)?).await,
        ["remove", i] => remove(client, id(i)?).await,
        _ => Err(USAGE.into()),
    }
}
