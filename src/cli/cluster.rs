//! `raftkv cluster`: starts nodes as child processes of this executable and supervises them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::client::Client;
use crate::config::Config;
use crate::raft::NodeId;

use super::ConfigArg;

#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Which nodes to start: `all`, or ids separated by commas (e.g. `1,2,3`). Besides the
    /// config's nodes, a member added later (`raftkv member add`) can be named, or is part of
    /// `all`, when a running member knows it: it is started at its address in the membership.
    #[arg(long, default_value = "all")]
    pub nodes: String,
    /// Do not restart a node that exits or is killed.
    #[arg(long)]
    pub no_auto_restart: bool,
    /// How long stopping nodes may take before they are killed with SIGKILL.
    #[arg(long, default_value = "10s", value_parser = super::parse_duration)]
    pub grace: Duration,
    /// The nodes' log format (their log files under the config's log directory): text or json.
    #[arg(long, value_enum, default_value_t = super::node::LogFormat::Text)]
    pub log_format: super::node::LogFormat,
    /// Let the nodes serve plaintext on non-loopback addresses (`raftkv node --insecure`).
    #[arg(long)]
    pub insecure: bool,
}

const RESTART_BACKOFF_MIN: Duration = Duration::from_secs(1);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A node that ran this long before dying is restarted with the minimum backoff again.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

struct Child {
    pid: Option<Pid>,
    generation: u64,
    started: Instant,
    backoff: Duration,
}

/// The nodes to start, with the address of each that is not in the config (a member added
/// later, as the running cluster reports it).
fn parse_nodes(
    spec: &str,
    cfg: &Config,
    members: &BTreeMap<NodeId, String>,
) -> anyhow::Result<Vec<(NodeId, Option<String>)>> {
    let extra = |id: NodeId| {
        (cfg.node(id).is_none())
            .then(|| members.get(&id).cloned())
            .flatten()
    };
    if spec.trim() == "all" {
        let mut ids: Vec<NodeId> = cfg.ids();
        ids.extend(
            members
                .keys()
                .filter(|id| !ids.contains(id))
                .copied()
                .collect::<Vec<_>>(),
        );
        return Ok(ids.into_iter().map(|id| (id, extra(id))).collect());
    }
    let mut ids: Vec<(NodeId, Option<String>)> = Vec::new();
    for part in spec.split(',') {
        let part = part.trim();
        let id: NodeId = part.parse().with_context(|| {
            format!("--nodes: {part:?} is not a node id (use `all` or e.g. `1,2,3`)")
        })?;
        if cfg.node(id).is_none() && !members.contains_key(&id) {
            bail!(
                "--nodes: node {id} is not in the config (configured ids: {:?}), and no running member knows of it; add it first with `raftkv member add {id} HOST:PORT`",
                cfg.ids()
            );
        }
        if !ids.iter().any(|(i, _)| *i == id) {
            ids.push((id, extra(id)));
        }
    }
    if ids.is_empty() {
        bail!("--nodes: no node ids given");
    }
    Ok(ids)
}

fn describe_exit(status: &std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(sig)) => match Signal::try_from(sig) {
                Ok(sig) => format!("killed by {sig}"),
                Err(_) => format!("killed by signal {sig}"),
            },
            _ => "exited".to_string(),
        },
        Err(e) => format!("unknown status ({e})"),
    }
}

pub async fn run(args: ClusterArgs) -> anyhow::Result<()> {
    let cfg = Config::load(&args.config.config)?;
    for w in cfg.warnings() {
        eprintln!("warning: {w}");
    }
    // Members added since config.json was written, if some node already runs.
    let client = Client::discover_with(cfg.addrs(), args.config.dialer(&cfg)?).await;
    let members = client.nodes().clone();
    let ids = parse_nodes(&args.nodes, &cfg, &members)?;
    let extra: BTreeMap<NodeId, String> = ids
        .iter()
        .filter_map(|(id, a)| a.clone().map(|a| (*id, a)))
        .collect();
    let join: Vec<String> = members
        .iter()
        .filter(|(id, _)| !extra.contains_key(id))
        .map(|(_, a)| a.clone())
        .collect();
    let ids: Vec<NodeId> = ids.into_iter().map(|(id, _)| id).collect();
    let exe = std::env::current_exe().context("finding the raftkv executable")?;
    let config_path = args
        .config
        .config
        .canonicalize()
        .unwrap_or_else(|_| args.config.config.clone());
    let (exit_tx, mut exit_rx) =
        mpsc::unbounded_channel::<(NodeId, u64, std::io::Result<ExitStatus>)>();

    let spawn = |id: NodeId, generation: u64| -> anyhow::Result<Pid> {
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg("node")
            .arg("--id")
            .arg(id.to_string())
            .arg("--config")
            .arg(&config_path)
            .arg("--quiet");
        if args.insecure {
            cmd.arg("--insecure");
        }
        if args.log_format == super::node::LogFormat::Json {
            cmd.arg("--log-format").arg("json");
        }
        if let Some(addr) = extra.get(&id) {
            // Not in config.json: where it listens, and whom to ask if its directory is empty.
            cmd.arg("--listen").arg(addr);
            if !join.is_empty() {
                cmd.arg("--join").arg(join.join(","));
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // Own process group: a terminal's Ctrl-C reaches only us, and we stop the nodes in order.
        cmd.process_group(0);
        // If this supervisor dies, its nodes get SIGTERM instead of running on as orphans.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("starting node {id}"))?;
        let pid = child
            .id()
            .map(|p| Pid::from_raw(p as i32))
            .context("child has no pid")?;
        let tx = exit_tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send((id, generation, status));
        });
        Ok(pid)
    };

    let mut children: BTreeMap<NodeId, Child> = BTreeMap::new();
    outln!("{:<4} {:<8} {:<22} LOG", "ID", "PID", "ADDRESS");
    for &id in &ids {
        let pid = spawn(id, 0)?;
        let addr = cfg
            .node(id)
            .map(|n| n.addr())
            .or_else(|| extra.get(&id).cloned())
            .unwrap_or_default();
        let log: PathBuf = cfg.log_dir().join(format!("node-{id}.log"));
        outln!("{:<4} {:<8} {:<22} {}", id, pid, addr, log.display());
        children.insert(
            id,
            Child {
                pid: Some(pid),
                generation: 0,
                started: Instant::now(),
                backoff: RESTART_BACKOFF_MIN,
            },
        );
    }

    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    // The command as the user can type it from here: the executable as they started it
    // (`raftkv` on the PATH, else its path, e.g. target/release/raftkv under cargo run).
    let connect_with = {
        let exe_arg = std::env::args().next().unwrap_or_else(|| "raftkv".into());
        let exe_arg = if exe_arg.contains('/') {
            exe_arg
        } else {
            "raftkv".into()
        };
        let quote =
            |s: &str| shlex::try_quote(s).map_or_else(|_| s.to_string(), |q| q.into_owned());
        format!(
            "{} shell --config {}",
            quote(&exe_arg),
            quote(&args.config.config.display().to_string())
        )
    };
    let mut leader_reported = false;
    let mut leader_poll = tokio::time::interval(Duration::from_millis(250));
    let (restart_tx, mut restart_rx) = mpsc::unbounded_channel::<NodeId>();
    let started = Instant::now();

    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                for c in children.values() {
                    if let Some(pid) = c.pid {
                        let _ = kill(pid, Signal::SIGHUP);
                    }
                }
                outln!("SIGHUP passed on to the nodes: they reload their certificates and users file");
            }
            Some((id, generation, status)) = exit_rx.recv() => {
                let Some(c) = children.get_mut(&id) else { continue };
                if c.generation != generation {
                    continue;
                }
                let pid = c.pid.take().map_or(0, |p| p.as_raw());
                let ran = c.started.elapsed();
                outln!("node {id} (pid {pid}) exited after {:.1}s: {}", ran.as_secs_f64(), describe_exit(&status));
                if status.as_ref().is_ok_and(|s| s.success()) {
                    // Not a crash: a node removed from the cluster stops this way (or someone
                    // stopped it on purpose).
                    outln!("not restarting node {id}: it stopped cleanly (see {})", cfg.log_dir().join(format!("node-{id}.log")).display());
                    if children.values().all(|c| c.pid.is_none()) {
                        bail!("every node has exited");
                    }
                    continue;
                }
                let removed = client
                    .status_all(Duration::from_millis(500))
                    .await
                    .iter()
                    .filter_map(|r| r.result.as_ref().ok())
                    .any(|s| s.removed.contains(&id));
                if removed {
                    outln!("not restarting node {id}: it was removed from the cluster");
                    if children.values().all(|c| c.pid.is_none()) {
                        bail!("every node has exited");
                    }
                    continue;
                }
                if args.no_auto_restart {
                    outln!("not restarting node {id} (--no-auto-restart)");
                    if children.values().all(|c| c.pid.is_none()) {
                        bail!("every node has exited");
                    }
                    continue;
                }
                if ran >= HEALTHY_RUN {
                    c.backoff = RESTART_BACKOFF_MIN;
                }
                let delay = c.backoff;
                c.backoff = (c.backoff * 2).min(RESTART_BACKOFF_MAX);
                outln!("restarting node {id} in {}s", delay.as_secs());
                let tx = restart_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = tx.send(id);
                });
            }
            Some(id) = restart_rx.recv() => {
                let Some(c) = children.get_mut(&id) else { continue };
                if c.pid.is_some() {
                    continue;
                }
                c.generation += 1;
                match spawn(id, c.generation) {
                    Ok(pid) => {
                        c.pid = Some(pid);
                        c.started = Instant::now();
                        outln!("node {id} restarted (pid {pid})");
                    }
                    Err(e) => outln!("cannot restart node {id}: {e:#}"),
                }
            }
            _ = leader_poll.tick(), if !leader_reported => {
                let reports = client.status_all(Duration::from_millis(200)).await;
                let leader = reports.iter().filter_map(|r| r.result.as_ref().ok()).find(|s| s.role == "leader");
                if let Some(l) = leader {
                    outln!("leader: node {} ({}), term {}", l.id, client.nodes().get(&l.id).cloned().or_else(|| cfg.node(l.id).map(|n| n.addr())).unwrap_or_default(), l.term);
                    outln!("connect with: {connect_with}");
                    leader_reported = true;
                } else if started.elapsed() > Duration::from_secs(10) {
                    let majority = cfg.nodes.len() / 2 + 1;
                    outln!("no leader yet after 10s ({} of {} nodes running; a leader needs {majority})", ids.len(), cfg.nodes.len());
                    leader_reported = true;
                }
            }
        }
    }

    outln!(
        "stopping {} node(s)...",
        children.values().filter(|c| c.pid.is_some()).count()
    );
    for c in children.values() {
        if let Some(pid) = c.pid {
            let _ = kill(pid, Signal::SIGTERM);
        }
    }
    let deadline = tokio::time::Instant::now() + args.grace;
    while children.values().any(|c| c.pid.is_some()) {
        match tokio::time::timeout_at(deadline, exit_rx.recv()).await {
            Ok(Some((id, generation, status))) => {
                if let Some(c) = children.get_mut(&id)
                    && c.generation == generation
                {
                    c.pid = None;
                    outln!("node {id} stopped ({})", describe_exit(&status));
                }
            }
            Ok(None) => break,
            Err(_) => {
                for (id, c) in &children {
                    if let Some(pid) = c.pid {
                        outln!(
                            "node {id} did not stop within {}s: SIGKILL",
                            args.grace.as_secs()
                        );
                        let _ = kill(pid, Signal::SIGKILL);
                    }
                }
                break;
            }
        }
    }
    Ok(())
}
