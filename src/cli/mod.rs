//! The `raftkv` command line: one enum, a file per subcommand.

/// `println!` that survives a closed pipe (`raftkv monitor --json | head -c 300`, or
/// `raftkv cluster | tee f` and Ctrl-C): output nobody reads any more is dropped, instead of
/// panicking the command ("failed printing to stdout: Broken pipe") and skipping what it still
/// has to do, such as stopping its nodes.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

pub mod bench;
pub mod certs;
pub mod cluster;
pub mod leader;
pub mod member;
pub mod monitor;
pub mod node;
pub mod scrape;
pub mod shell;
pub mod snapshot;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "raftkv",
    version,
    about = "A fault-tolerant, Raft-replicated key-value store",
    long_about = "A fault-tolerant, Raft-replicated key-value store.\n\n\
        Start the 5-node cluster of config.json with `raftkv cluster`, then talk to it with \
        `raftkv shell`. A cluster of 2f+1 nodes keeps working while f nodes are down (2 of 5)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run one Raft node (gRPC server, durable state under data_directory/node-<id>).
    #[command(long_about = "Run one Raft node.\n\n\
        The node serves peers (NodeCommunication) and clients (DataService) over gRPC on its \
        configured port, keeps its durable state in <data_directory>/node-<id>/ and logs to \
        <log_directory>/node-<id>.log and stderr (RUST_LOG sets the level, default info; \
        --log-format json for JSON lines). With an http_port (config or --http-port) it serves \
        /metrics (Prometheus), /livez and /readyz over HTTP. With a tls section in the config \
        (raftkv certs init) it serves TLS only: mutual TLS with its peers, clients with a user \
        certificate or token. Without one it serves plaintext, and only on loopback addresses \
        unless --insecure. SIGHUP reloads its certificates and users file; SIGTERM or Ctrl-C \
        stops it cleanly.")]
    Node(node::NodeArgs),
    /// Start the cluster's nodes as child processes and supervise them.
    #[command(
        long_about = "Start nodes of the cluster as child processes of this executable.\n\n\
        Prints each node's pid, address and log file, then the leader. A node that dies is \
        restarted with backoff unless --no-auto-restart. Ctrl-C or SIGTERM stops every node \
        (SIGTERM, then SIGKILL after a grace period)."
    )]
    Cluster(cluster::ClusterArgs),
    /// Interactive client: set, get, del, status, leader, member.
    #[command(
        long_about = "An interactive client (a REPL with history and tab completion).\n\n\
        Commands (case-insensitive): set KEY VALUE, get KEY, get --stale KEY, del KEY, status, \
        leader, leader transfer [ID], member list|add|promote|remove, help, exit. Keys and \
        values may be quoted as in a POSIX shell: set 'my key' \"a value\". Ctrl-C cancels the \
        running command. When standard input is not a terminal, commands are read line by line, so \
        `echo \"get color\" | raftkv shell` works in scripts; the exit code is 1 if any command \
        failed."
    )]
    Shell(shell::ShellArgs),
    /// Live dashboard of every node (or --once / --json for scripts).
    #[command(
        long_about = "A live terminal dashboard of the cluster.\n\nOne row per node: address, up/down, role, term, leader, commit/applied/last log index and how far it lags the leader, or why it is down; for nodes whose config entry has an http_port, the p99 of their log fsyncs and of their round trips to peers (FSYNC P99, RTT P99, from /metrics). A narrow terminal drops whole columns, least important first, and says which. The top line shows the leader, quorum health and writes/s. q, Esc or Ctrl-C quit. --once prints a plain table and --json one JSON object; both exit 0 if a quorum is up, 1 if not."
    )]
    Monitor(monitor::MonitorArgs),
    /// Measure throughput and latency with a closed-loop load.
    #[command(
        long_about = "Measure throughput and latency.\n\n--clients concurrent clients each keep one request in flight (closed loop). After --warmup, the run measures --ops operations or for --duration, then reports ops/s, latency percentiles (p50/p90/p99/p99.9/max, HDR histogram), errors by kind and leader changes. --json prints one machine-readable line."
    )]
    Bench(bench::BenchArgs),
    /// Backups: save a snapshot of the store, inspect one, restore one into a new cluster.
    Snapshot(snapshot::SnapshotArgs),
    /// Leadership: hand it to another node (`leader transfer [ID]`).
    Leader(leader::LeaderArgs),
    /// Membership: list, add, promote and remove members (`member list|add|promote|remove`).
    Member(member::MemberArgs),
    /// TLS: make a cluster CA and certificates (`certs init`), a node's (`certs node`), a
    /// user's certificate or token (`certs user`).
    #[command(long_about = "Certificates for a secure cluster.\n\n\
        `raftkv certs init --config config.json --out certs` makes a CA, a certificate for every \
        node, an admin client certificate and a users file, and adds the tls section to the \
        config: from then on the nodes serve TLS only (mutual TLS between nodes) and every \
        command connects as admin. `certs user NAME --role read-only|read-write|admin \
        [--token]` adds a user; `certs node ID --hosts H` makes a certificate for a node added \
        later. Nodes reload certificates and the users file on SIGHUP.")]
    Certs(certs::CertsArgs),
}

/// Parses durations like `500ms`, `10s`, `2m`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (examples: 500ms, 10s, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit in {s:?} (use ms, s, m or h)"
            ));
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The `--config` option shared by every subcommand.
#[derive(clap::Args, Debug, Clone)]
pub struct ConfigArg {
    /// Path to the cluster configuration (JSON: nodes, election_timeout_ms, heartbeat_interval_ms,
    /// data_directory).
    #[arg(long, short = 'c', default_value = "config.json")]
    pub config: PathBuf,
    #[command(flatten)]
    pub security: SecurityArgs,
}

/// The TLS and credential options every command takes; each defaults to config.json's `tls`
/// section.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "TLS and credentials (defaults: config.json's tls section)")]
pub struct SecurityArgs {
    /// The cluster CA (PEM) the nodes' certificates are checked against [default: tls.ca_file].
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// The certificate to present (PEM): a user's for the commands, the node's for `node`
    /// [default: tls.client_cert_file, or tls.node_cert_file for `node`].
    #[arg(long, value_name = "PATH", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// The private key of --cert-file (PEM).
    #[arg(long, value_name = "PATH", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// A file holding the token to present (the RAFTKV_TOKEN variable also gives one)
    /// [default: tls.client_token_file].
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
}

impl ConfigArg {
    /// The dialer of a command that talks to the cluster of `cfg`: TLS with its CA and the
    /// user's certificate and token, or plaintext when the config has no tls section.
    ///
    /// # Errors
    /// A file that cannot be used (named, with why), or a token without TLS.
    pub fn dialer(&self, cfg: &crate::config::Config) -> anyhow::Result<crate::security::Dialer> {
        use crate::security::{Dialer, Files, load_client};
        let s = &self.security;
        let tls = cfg.tls.as_ref();
        let tls_wanted = tls.is_some() || s.ca_file.is_some();
        let token = match (&s.token_file, std::env::var("RAFTKV_TOKEN")) {
            (Some(f), _) => Some(read_token(f)?),
            // The variable is for secure clusters; a plaintext one ignores it.
            (None, Ok(t)) if !t.trim().is_empty() && tls_wanted => Some(t),
            _ => match tls.and_then(|t| t.client_token_file.as_ref()) {
                Some(f) => Some(read_token(&cfg.resolve(f))?),
                None => None,
            },
        };
        let ca = match (&s.ca_file, tls) {
            (Some(c), _) => c.clone(),
            (None, Some(t)) => cfg.resolve(&t.ca_file),
            (None, None) => {
                if s.cert_file.is_some() {
                    anyhow::bail!(
                        "--cert-file needs the cluster CA: give --ca-file, or a tls section in the config"
                    );
                }
                return Dialer::plaintext()
                    .with_token(token)
                    .map_err(anyhow::Error::msg);
            }
        };
        let (cert, key) = match (&s.cert_file, &s.key_file) {
            (Some(c), Some(k)) => (Some(c.clone()), Some(k.clone())),
            _ => (
                tls.and_then(|t| t.client_cert_file.as_ref())
                    .map(|p| cfg.resolve(p)),
                tls.and_then(|t| t.client_key_file.as_ref())
                    .map(|p| cfg.resolve(p)),
            ),
        };
        let material = load_client(&Files { ca, cert, key }).map_err(anyhow::Error::msg)?;
        Dialer::tls(material)
            .with_token(token)
            .map_err(anyhow::Error::msg)
    }
}

fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let t = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read the token file {}: {e}", path.display()))?;
    if t.trim().is_empty() {
        anyhow::bail!("the token file {} is empty", path.display());
    }
    Ok(t.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
