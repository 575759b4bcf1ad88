//! `raftkv node`: runs one node until SIGTERM/SIGINT.

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::Config;
use crate::raft::NodeId;

use super::ConfigArg;

#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    /// This node's id: one of the ids in the config's "nodes", or, with --join, a new id
    /// (never one a removed member had).
    #[arg(long)]
    pub id: NodeId,
    #[command(flatten)]
    pub config: ConfigArg,
    /// Log only to the log file, not to stderr (used by `raftkv cluster`).
    #[arg(long)]
    pub quiet: bool,
    /// Repair a damaged data directory: move it aside (to `node-<id>.damaged-<time>`) and
    /// start with an empty one that keeps the node's id, cluster, term and vote. The node
    /// catches up from the leader by snapshot and votes again only once it has heard from a
    /// leader. Use it when the node refuses to start because its data directory is damaged,
    /// and only while the rest of the cluster is up.
    #[arg(long)]
    pub repair: bool,
    /// Join a running cluster: ask the members at these addresses (HOST:PORT, comma-separated;
    /// one that answers is enough) to add this node as a learner at its --listen address. The
    /// node starts with an empty data directory under the config's data_directory and catches
    /// up from the leader (by snapshot when the log is compacted). Timings come from the config;
    /// the id need not be in it.
    #[arg(long, value_delimiter = ',', value_name = "HOST:PORT", value_parser = parse_addr)]
    pub join: Vec<String>,
    /// Where this node listens for peers and clients, as the others will reach it
    /// (HOST:PORT). Default: its entry in the config, else its address in the membership.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_addr)]
    pub listen: Option<String>,
    /// With --join: ask for promotion to voter once caught up (the leader refuses until the
    /// node's log is within 1000 entries of its own; the node asks again every second).
    #[arg(long, requires = "join")]
    pub voter: bool,
    /// Serve /metrics (Prometheus), /livez and /readyz over HTTP on this port, on the node's
    /// host. Default: the node's "http_port" in the config; none if it has none.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub http_port: Option<u16>,
    /// The log's format: text (one line per event) or json (one JSON object per line, for log
    /// collectors). Both the log file and stderr use it.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Serve plaintext (no TLS, no authentication) on a non-loopback address. Without a tls
    /// section in the config, a node refuses such an address unless given this; only for a
    /// network you trust entirely.
    #[arg(long)]
    pub insecure: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

fn parse_addr(s: &str) -> Result<String, String> {
    crate::config::check_address(s).map(|()| s.to_string())
}

pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    let cfg = Config::load(&args.config.config)?;
    if args.id == 0 {
        anyhow::bail!("node id 0 is reserved; ids start at 1");
    }
    if !args.join.is_empty() && args.listen.is_none() && cfg.node(args.id).is_none() {
        anyhow::bail!(
            "--join needs --listen HOST:PORT: node {} is not in {}, so the address the others should reach it at must be given",
            args.id,
            args.config.config.display()
        );
    }
    if args.join.is_empty()
        && args.listen.is_none()
        && cfg.node(args.id).is_none()
        && !cfg.node_data_dir(args.id).exists()
    {
        anyhow::bail!(
            "node id {} is not in {} (configured ids: {}); to add a new node to a running cluster, start it with --join HOST:PORT --listen HOST:PORT",
            args.id,
            args.config.config.display(),
            cfg.ids()
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let sec = &args.config.security;
    if sec.token_file.is_some() {
        anyhow::bail!(
            "--token-file is for the commands that talk to a cluster; a node presents its certificate"
        );
    }
    let tls = match (&cfg.tls, &sec.ca_file) {
        (None, None) => {
            if sec.cert_file.is_some() {
                anyhow::bail!(
                    "--cert-file needs a CA: give --ca-file, or a tls section in {}",
                    args.config.config.display()
                );
            }
            None
        }
        (t, ca) => {
            let mut files = match t {
                Some(t) => crate::security::Files::node(&cfg, t, args.id),
                None => crate::security::Files {
                    ca: std::path::PathBuf::new(),
                    cert: None,
                    key: None,
                },
            };
            if let Some(ca) = ca {
                files.ca = ca.clone();
            }
            if let (Some(c), Some(k)) = (&sec.cert_file, &sec.key_file) {
                files.cert = Some(c.clone());
                files.key = Some(k.clone());
            }
            if files.cert.is_none() {
                anyhow::bail!(
                    "--ca-file without a tls section needs --cert-file and --key-file: the node's own certificate"
                );
            }
            Some(files)
        }
    };
    let join = crate::node::NodeOptions {
        join: args.join.clone(),
        listen: args.listen.clone(),
        voter: args.voter,
        http_port: args.http_port,
        users_file: cfg
            .tls
            .as_ref()
            .and_then(|t| t.users_file.as_ref())
            .map(|p| cfg.resolve(p)),
        tls,
        insecure: args.insecure,
    };
    let log_dir = cfg.log_dir();
    std::fs::create_dir_all(&log_dir)
        .with_context(|| format!("creating log directory {}", log_dir.display()))?;
    let file = tracing_appender::rolling::never(&log_dir, format!("node-{}.log", args.id));
    let (file, _guard) = tracing_appender::non_blocking(file);
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // This module's own messages (the node's final error) go to the log file only: `main`
    // prints the error to stderr once.
    let stderr_filter = || match "raftkv::cli::node=off".parse() {
        Ok(d) => filter().add_directive(d),
        Err(_) => filter(),
    };
    use tracing_subscriber::Layer;
    let json = args.log_format == LogFormat::Json;
    let stderr_layer = (!args.quiet).then(|| {
        // Colours only on a terminal (not in a file, a pipe or journald).
        let l = tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr);
        if json {
            l.json().with_filter(stderr_filter()).boxed()
        } else {
            l.with_filter(stderr_filter()).boxed()
        }
    });
    let file_layer = {
        let l = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(file);
        if json {
            l.json().with_filter(filter()).boxed()
        } else {
            l.with_filter(filter()).boxed()
        }
    };
    tracing_subscriber::registry()
        .with(file_layer)
        .with(stderr_layer)
        .try_init()
        .ok();
    // A panic (in the core thread, say) goes to the log file with its message and location,
    // not only to stderr, which `raftkv cluster` discards.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        tracing::error!(
            thread,
            location,
            "panic: {}",
            crate::node::panic_message(info.payload())
        );
        default_hook(info);
    }));

    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }
    if args.repair {
        // Asks the peers as this node (its certificate may ask a node's status).
        let repair_dialer = match &join.tls {
            Some(f) => crate::security::Dialer::tls(
                crate::security::load_client(f).map_err(anyhow::Error::msg)?,
            ),
            None => crate::security::Dialer::plaintext(),
        };
        let dir = cfg.node_data_dir(args.id);
        let peers = cfg
            .nodes
            .iter()
            .filter(|n| n.id != args.id)
            .map(|n| (n.id, n.addr()));
        let answers = crate::transport::peer::probe_peers(
            peers,
            std::time::Duration::from_secs(1),
            &repair_dialer,
        )
        .await;
        let peers_term = answers.iter().map(|a| a.term).max().unwrap_or(0);
        let peers_commit = answers.iter().map(|a| a.commit).max();
        let (aside, w) = crate::storage::disk::repair(&dir, args.id, peers_term, peers_commit)?;
        let msg = format!(
            "repair: moved the data directory {} to {}; node {} starts empty in cluster {} at term {} and catches up from the leader by snapshot (it votes again once it has caught up). Delete the old directory when you no longer need it.",
            dir.display(),
            aside.display(),
            args.id,
            crate::transport::cluster_id_str(w.cluster_id),
            w.term.max(peers_term)
        );
        tracing::warn!("{msg}");
        eprintln!("{msg}");
    }
    let (tx, rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        let _ = tx.send(true);
    });
    let dir = cfg.node_data_dir(args.id);
    let result = crate::node::run(cfg, args.id, join, rx).await;
    match &result {
        Err(e) => tracing::error!("node {} stopped: {e:#}", args.id),
        Ok(crate::node::Stopped::Removed) => {
            let msg = format!(
                "node {} was removed from the cluster and has stopped; its id is never used again. Its data directory {} can be deleted.",
                args.id,
                dir.display()
            );
            tracing::info!("{msg}");
            eprintln!("{msg}");
        }
        Ok(crate::node::Stopped::Shutdown) => tracing::info!("node {} stopped cleanly", args.id),
    }
    result.map(|_| ())
}
