//! `raftkv leader transfer [ID]`: move the leadership before maintenance (Raft dissertation
//! 3.10). The shell has the same command.

use std::time::Instant;

use anyhow::anyhow;

use crate::client::Client;
use crate::config::Config;
use crate::raft::NodeId;

use super::ConfigArg;

#[derive(clap::Args, Debug)]
pub struct LeaderArgs {
    #[command(subcommand)]
    pub command: LeaderCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum LeaderCommand {
    /// Hand leadership to node ID, or to the most caught-up other voter.
    #[command(
        long_about = "Hand leadership to node ID, or without ID to the most caught-up other voter.\n\n\
        The leader stops taking writes (clients are sent to the target and retry there), brings \
        the target's log up to its own and tells it to start an election at once; the command \
        returns when the target leads. If it has not taken over within an election timeout, the \
        old leader goes on leading and the command fails saying so. Use it before stopping the \
        leader's machine: writes pause for one election round instead of an election timeout."
    )]
    Transfer {
        /// The node to lead next (default: the most caught-up other voter).
        id: Option<NodeId>,
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// Transfers leadership to `target` (None: the most caught-up voter) and says what happened.
///
/// # Errors
/// Why it did not happen: no leader (with the nodes tried), a refused target, or a target that
/// did not take over in time.
pub async fn transfer(client: &Client, target: Option<NodeId>) -> Result<String, String> {
    let started = Instant::now();
    let (from, to, term) = client.transfer_leader(target.unwrap_or(0)).await?;
    let ms = started.elapsed().as_millis();
    Ok(if from == to {
        format!("node {to} already leads (term {term})")
    } else {
        format!("leadership moved from node {from} to node {to} (term {term}) in {ms} ms")
    })
}

pub async fn run(args: LeaderArgs) -> anyhow::Result<()> {
    match args.command {
        LeaderCommand::Transfer { id, config } => {
            let cfg = Config::load(&config.config)?;
            let client = Client::discover_with(cfg.addrs(), config.dialer(&cfg)?).await;
            let msg = transfer(&client, id).await.map_err(|e| anyhow!(e))?;
            outln!("{msg}");
            Ok(())
        }
    }
}
