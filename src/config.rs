//! `config.json`: the cluster's topology and timing, in the seed's format.
//!
//! ```json
//! {
//!     "nodes": [{"id": 1, "host": "localhost", "port": 50051}, ...],
//!     "election_timeout_ms": {"min": 150, "max": 300},
//!     "heartbeat_interval_ms": 50,
//!     "data_directory": "./data"
//! }
//! ```
//! Optional fields: `log_directory` (default `./logs`), `max_key_bytes` (default 4096),
//! `max_value_bytes` (default 1 MiB), `snapshot` (log compaction, see [`SnapshotPolicy`]).
//! Relative directories are relative to the config file.
//! Unknown fields are refused, so that a misspelt option is not silently ignored.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::raft::NodeId;

pub const DEFAULT_MAX_KEY_BYTES: usize = 4096;
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1 << 20;
/// Timeouts and intervals above an hour are refused (they would not fit the core's ticks long
/// before they stopped making sense).
pub const ELECTION_TIMEOUT_MS_MAX: u64 = 3_600_000;

/// Hard ceiling for values: one value must fit into one Raft message and one gRPC message.
pub const MAX_VALUE_BYTES_LIMIT: usize = 8 << 20;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeAddr {
    pub id: NodeId,
    pub host: String,
    pub port: u16,
    /// Where the node serves `/metrics` (Prometheus), `/livez` and `/readyz` over HTTP, on
    /// the same host; none when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_port: Option<u16>,
}

impl NodeAddr {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Splits `host:port` (`[v6]:port` too), checking both parts.
///
/// # Errors
/// What is wrong with it, for the user.
pub fn parse_address(addr: &str) -> Result<(String, u16), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| "expected HOST:PORT, e.g. localhost:50056".to_string())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.trim().is_empty() {
        return Err("the host is empty (expected HOST:PORT)".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok((host.to_string(), p)),
        _ => Err(format!("port {port:?} is not a number between 1 and 65535")),
    }
}

/// Checks an address given on a command line or in a request.
///
/// # Errors
/// As [`parse_address`].
pub fn check_address(addr: &str) -> Result<(), String> {
    parse_address(addr).map(|_| ())
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ElectionTimeout {
    pub min: u64,
    pub max: u64,
}

/// When a node compacts its log (every node decides alone; its state machine is the
/// snapshot, so compaction only drops log entries the state machine already holds).
///
/// `"snapshot": {"log_entries_max": 100000, "log_bytes_max": 134217728, "keep_entries": 20000,
/// "keep_bytes": 33554432}` (each optional): once the log holds more than `log_entries_max`
/// applied entries or `log_bytes_max` bytes, it is cut so that it keeps the newest
/// `keep_entries` entries, but no more than `keep_bytes` bytes of them. A follower that falls
/// behind by less than the kept log catches up from the log; one further behind gets a
/// snapshot. Compaction waits while a snapshot is being sent.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_entries_max: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_bytes_max: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_entries: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_bytes: Option<u64>,
}

/// [`SnapshotConfig`] with its defaults filled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotPolicy {
    pub log_entries_max: u64,
    pub log_bytes_max: u64,
    pub keep_entries: u64,
    pub keep_bytes: u64,
}

impl SnapshotPolicy {
    /// fjall's journal cap for this policy: twice the log's limit, within fjall's 64-512 MiB.
    /// The journal is only freed once the memtables it covers are flushed, so it bounds the
    /// data directory together with the compacted log.
    pub fn journal_bytes(&self) -> u64 {
        self.log_bytes_max
            .saturating_mul(2)
            .clamp(64 << 20, 512 << 20)
    }
}

impl Default for SnapshotPolicy {
    /// About 3-6 s of writes at full speed on a small machine (256-byte values), so that a
    /// node restarted within seconds catches up from the log (etcd keeps 5,000 entries;
    /// Consul's trap is a trailing log shorter than a snapshot transfer, hashicorp/consul#9609).
    fn default() -> Self {
        SnapshotPolicy {
            log_entries_max: 100_000,
            log_bytes_max: 128 << 20,
            keep_entries: 20_000,
            keep_bytes: 32 << 20,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub nodes: Vec<NodeAddr>,
    pub election_timeout_ms: ElectionTimeout,
    pub heartbeat_interval_ms: u64,
    pub data_directory: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_directory: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_key_bytes: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_value_bytes: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotConfig>,
    /// TLS for every connection, and who may do what (see `security`). None: plaintext, and
    /// every client may do everything (only allowed on loopback addresses, or with --insecure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// The directory of the config file; relative paths are resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// config.json's `tls` section. Paths are relative to the config file's directory; `{id}` in
/// the node files stands for the node's id.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA (PEM): nodes and clients trust certificates it signed, and only those.
    pub ca_file: PathBuf,
    /// Each node's certificate (PEM, its chain after it), e.g. `certs/node-{id}.crt`. Its
    /// subject's common name is `raftkv-node-<id>`.
    pub node_cert_file: String,
    /// Each node's private key (PEM).
    pub node_key_file: String,
    /// The certificate the commands (shell, bench, monitor, ...) present, e.g. `certs/admin.crt`;
    /// its common name is the user name. `--cert-file` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<PathBuf>,
    /// A file holding the token the commands present instead of a certificate
    /// (`--token-file`, or the RAFTKV_TOKEN variable, override it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_token_file: Option<PathBuf>,
    /// The users, their roles and token digests (JSON; see `security::auth`). Without it, any
    /// client certificate of the CA is an admin and tokens are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users_file: Option<PathBuf>,
}

/// A config file that cannot be used, with what is wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The cause is in the message, not the error chain: said once.
    #[error("{}", read_error(.path, .error))]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config file {path} is not valid: {message} (line {line}, column {column})")]
    Parse {
        path: PathBuf,
        message: String,
        line: usize,
        column: usize,
    },
    #[error("config file {path}: `{field}`: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

fn read_error(path: &Path, e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::NotFound {
        format!(
            "config file {} not found (give its path with --config PATH; the repository's config.json is an example)",
            path.display()
        )
    } else {
        format!("cannot read config file {}: {e}", path.display())
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file and the offending field.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let mut cfg = Config::parse(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: strip_position(&e.to_string()),
            line: e.line(),
            column: e.column(),
        })?;
        cfg.base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        cfg.validate()
            .map_err(|(field, message)| ConfigError::Invalid {
                path: path.to_path_buf(),
                field,
                message,
            })?;
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<Config, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Checks the config for consistency. Returns the field at fault and what is wrong.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |field: &str, msg: String| Err((field.to_string(), msg));
        if self.nodes.is_empty() {
            return err("nodes", "at least one node is required".into());
        }
        let mut ids: HashMap<NodeId, usize> = HashMap::new();
        // Each address taken, by whom: "node 1" or "node 1's http_port".
        let mut addrs: HashMap<(String, u16), String> = HashMap::new();
        let mut ports: HashMap<u16, NodeId> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if n.id == 0 {
                return err(
                    &format!("nodes[{i}].id"),
                    "node ids start at 1 (0 is reserved)".into(),
                );
            }
            if let Some(j) = ids.insert(n.id, i) {
                return err(
                    &format!("nodes[{i}].id"),
                    format!("duplicate node id {} (also nodes[{j}])", n.id),
                );
            }
            if n.host.trim().is_empty() {
                return err(&format!("nodes[{i}].host"), "must not be empty".into());
            }
            if n.port == 0 {
                return err(
                    &format!("nodes[{i}].port"),
                    "must be between 1 and 65535".into(),
                );
            }
            if let Some(other) = addrs.insert((n.host.clone(), n.port), format!("node {}", n.id)) {
                return err(
                    &format!("nodes[{i}].port"),
                    format!("duplicate address {}:{} (also {other})", n.host, n.port),
                );
            }
            if n.http_port == Some(0) {
                return err(
                    &format!("nodes[{i}].http_port"),
                    "must be between 1 and 65535 (leave it out for no HTTP endpoint)".into(),
                );
            }
            if n.http_port == Some(n.port) {
                return err(
                    &format!("nodes[{i}].http_port"),
                    format!(
                        "{} is the node's gRPC port too; give it a port of its own",
                        n.port
                    ),
                );
            }
            if let Some(h) = n.http_port
                && let Some(other) =
                    addrs.insert((n.host.clone(), h), format!("node {}'s http_port", n.id))
            {
                return err(
                    &format!("nodes[{i}].http_port"),
                    format!("duplicate address {}:{h} (also {other})", n.host),
                );
            }
            // Different spellings of one machine (localhost, 127.0.0.1) cannot share a port.
            if is_local(&n.host) {
                for (field, port) in [("port", Some(n.port)), ("http_port", n.http_port)] {
                    let Some(port) = port else { continue };
                    if let Some(&other) = ports.get(&port) {
                        return err(
                            &format!("nodes[{i}].{field}"),
                            format!("duplicate port {port} (also node {other})"),
                        );
                    }
                    ports.insert(port, n.id);
                }
            }
        }
        let e = &self.election_timeout_ms;
        // Timeouts become ticks (u32) in the core: far beyond any sensible value, but checked
        // here rather than truncated there.
        for (field, v) in [
            ("election_timeout_ms.min", e.min),
            ("election_timeout_ms.max", e.max),
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
        ] {
            if v > ELECTION_TIMEOUT_MS_MAX {
                return err(
                    field,
                    format!(
                        "{v} ms is more than the maximum of {ELECTION_TIMEOUT_MS_MAX} ms (one hour)"
                    ),
                );
            }
        }
        if e.min == 0 {
            return err("election_timeout_ms.min", "must be at least 1".into());
        }
        if e.min >= e.max {
            return err(
                "election_timeout_ms",
                format!(
                    "min ({}) must be less than max ({}), so that timeouts can be randomized",
                    e.min, e.max
                ),
            );
        }
        if self.heartbeat_interval_ms == 0 {
            return err("heartbeat_interval_ms", "must be at least 1".into());
        }
        if self.heartbeat_interval_ms * 2 > e.min {
            return err(
                "heartbeat_interval_ms",
                format!(
                    "{} ms is too close to the election timeout minimum of {} ms; it must be at most half of it",
                    self.heartbeat_interval_ms, e.min
                ),
            );
        }
        if self.data_directory.as_os_str().is_empty() {
            return err("data_directory", "must not be empty".into());
        }
        if self.max_key_bytes == Some(0) {
            return err("max_key_bytes", "must be at least 1".into());
        }
        if self.max_value_bytes == Some(0) {
            return err("max_value_bytes", "must be at least 1".into());
        }
        if let Some(v) = self.max_value_bytes
            && v > MAX_VALUE_BYTES_LIMIT
        {
            return err(
                "max_value_bytes",
                format!("{v} exceeds the ceiling of {MAX_VALUE_BYTES_LIMIT} bytes"),
            );
        }
        if let Some(s) = &self.snapshot {
            let p = self.snapshot_policy();
            for (field, v) in [
                ("snapshot.log_entries_max", s.log_entries_max),
                ("snapshot.log_bytes_max", s.log_bytes_max),
            ] {
                if v == Some(0) {
                    return err(field, "must be at least 1".into());
                }
            }
            if p.keep_entries >= p.log_entries_max {
                return err(
                    "snapshot.keep_entries",
                    format!(
                        "{} must be less than log_entries_max ({}), or compaction would never free anything",
                        p.keep_entries, p.log_entries_max
                    ),
                );
            }
            if p.keep_bytes >= p.log_bytes_max {
                return err(
                    "snapshot.keep_bytes",
                    format!(
                        "{} must be less than log_bytes_max ({})",
                        p.keep_bytes, p.log_bytes_max
                    ),
                );
            }
        }
        Ok(())
    }

    /// The compaction policy, defaults filled in.
    pub fn snapshot_policy(&self) -> SnapshotPolicy {
        let d = SnapshotPolicy::default();
        let s = self.snapshot.clone().unwrap_or_default();
        SnapshotPolicy {
            log_entries_max: s.log_entries_max.unwrap_or(d.log_entries_max),
            log_bytes_max: s.log_bytes_max.unwrap_or(d.log_bytes_max),
            keep_entries: s.keep_entries.unwrap_or(d.keep_entries),
            keep_bytes: s.keep_bytes.unwrap_or(d.keep_bytes),
        }
    }

    pub fn node(&self, id: NodeId) -> Option<&NodeAddr> {
        self.nodes.iter().find(|n| n.id == id)
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    pub fn addrs(&self) -> BTreeMap<NodeId, String> {
        self.nodes.iter().map(|n| (n.id, n.addr())).collect()
    }

    /// `p` relative to the config file's directory, without `./` components (so that printed
    /// paths read `data/node-1`, not `././data/node-1`).
    pub fn resolve(&self, p: &Path) -> PathBuf {
        let joined = if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        };
        let clean: PathBuf = joined
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect();
        if clean.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            clean
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.resolve(&self.data_directory)
    }

    /// `<data_directory>/node-<id>`.
    pub fn node_data_dir(&self, id: NodeId) -> PathBuf {
        self.data_dir().join(format!("node-{id}"))
    }

    pub fn log_dir(&self) -> PathBuf {
        self.resolve(self.log_directory.as_deref().unwrap_or(Path::new("./logs")))
    }

    pub fn max_key_bytes(&self) -> usize {
        self.max_key_bytes.unwrap_or(DEFAULT_MAX_KEY_BYTES)
    }

    pub fn max_value_bytes(&self) -> usize {
        self.max_value_bytes.unwrap_or(DEFAULT_MAX_VALUE_BYTES)
    }

    /// The runtime's tick: a fifth of the heartbeat interval, so timeouts keep their precision.
    pub fn tick_ms(&self) -> u64 {
        (self.heartbeat_interval_ms / 5).max(1)
    }

    /// What is allowed but probably not meant, for the user to read once.
    pub fn warnings(&self) -> Vec<String> {
        let n = self.nodes.len();
        let mut w = Vec::new();
        if n > 1 && n.is_multiple_of(2) {
            w.push(format!(
                "config has {n} nodes: an even number tolerates no more failures than {} nodes do ({} may fail), and needs {} for a quorum",
                n - 1,
                (n - 1) / 2,
                n / 2 + 1
            ));
        }
        w
    }

    /// The membership a new cluster starts with: every node of the file, voting.
    pub fn bootstrap_membership(&self) -> crate::raft::ClusterConfig {
        crate::raft::ClusterConfig {
            members: self
                .nodes
                .iter()
                .map(|n| {
                    (
                        n.id,
                        crate::raft::Member {
                            address: n.addr(),
                            voter: true,
                        },
                    )
                })
                .collect(),
            removed: Default::default(),
        }
    }

    /// The Raft core's configuration for node `id`, with timeouts converted into ticks.
    pub fn raft_config(&self, id: NodeId, seed: u64) -> crate::raft::Config {
        let tick = self.tick_ms();
        let mut c = crate::raft::Config::new(id, self.ids(), seed);
        c.heartbeat_ticks = (self.heartbeat_interval_ms / tick).max(1) as u32;
        c.election_ticks_min = self.election_timeout_ms.min.div_ceil(tick) as u32;
        c.election_ticks_max =
            (self.election_timeout_ms.max / tick).max(c.election_ticks_min as u64) as u32;
        c.max_msg_bytes = (1 << 20).max(self.max_value_bytes() + self.max_key_bytes() + 64);
        c
    }
}

fn is_local(host: &str) -> bool {
    matches!(
        host,
        "localhost" | "127.0.0.1" | "::1" | "[::1]" | "0.0.0.0"
    )
}

/// serde_json appends " at line L column C"; we report those separately.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"{
    "nodes": [
        {"id": 1, "host": "localhost", "port": 50051},
        {"id": 2, "host": "localhost", "port": 50052},
        {"id": 3, "host": "localhost", "port": 50053},
        {"id": 4, "host": "localhost", "port": 50054},
        {"id": 5, "host": "localhost", "port": 50055}
    ],
    "election_timeout_ms": {
        "min": 150,
        "max": 300
    },
    "heartbeat_interval_ms": 50,
    "data_directory": "./data"
}"#;

    fn load_text(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.json");
        std::fs::write(&path, text).expect("write");
        Config::load(&path)
    }

    fn field_of(r: Result<Config, ConfigError>) -> String {
        match r {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn seed_config_loads_and_maps_to_ticks() {
        let c = load_text(SEED).expect("the seed's config is valid");
        assert_eq!(c.nodes.len(), 5);
        let r = c.raft_config(3, 1);
        assert_eq!(c.tick_ms(), 10);
        assert_eq!(
            (
                r.heartbeat_ticks,
                r.election_ticks_min,
                r.election_ticks_max
            ),
            (5, 15, 30)
        );
        assert_eq!(r.members.voters().collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        assert!(c.node_data_dir(3).ends_with("data/node-3"));
    }

    #[test]
    fn snapshot_policy_has_defaults_and_is_checked() {
        let c = load_text(SEED).expect("valid");
        assert_eq!(c.snapshot_policy(), SnapshotPolicy::default());
        let with = |snapshot: &str| {
            load_text(&SEED.replace(
                r#""data_directory": "./data""#,
                &format!(r#""data_directory": "./data", "snapshot": {snapshot}"#),
            ))
        };
        let c = with(r#"{"log_entries_max": 5000, "keep_entries": 1000}"#).expect("valid");
        let p = c.snapshot_policy();
        assert_eq!((p.log_entries_max, p.keep_entries), (5000, 1000));
        assert_eq!(p.log_bytes_max, SnapshotPolicy::default().log_bytes_max);
        assert_eq!(
            field_of(with(r#"{"log_entries_max": 0}"#)),
            "snapshot.log_entries_max"
        );
        assert_eq!(
            field_of(with(r#"{"log_entries_max": 5000, "keep_entries": 5000}"#)),
            "snapshot.keep_entries"
        );
        assert_eq!(
            field_of(with(r#"{"log_bytes_max": 1000}"#)),
            "snapshot.keep_bytes"
        );
        assert!(matches!(
            with(r#"{"keep_entrys": 5}"#),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn the_repository_config_is_the_seed_config() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.json"))
            .expect("config.json");
        assert_eq!(
            Config::parse(&text).expect("parses"),
            Config::parse(SEED).expect("parses")
        );
    }

    #[test]
    fn malformed_json_names_line_and_column() {
        let r = load_text("{\n  \"nodes\": [\n    {\"id\": 1,, }\n  ]\n}");
        match r {
            Err(e @ ConfigError::Parse { line: 3, .. }) => {
                assert!(e.to_string().contains("line 3, column"), "{e}");
            }
            other => panic!("expected a parse error on line 3, got {other:?}"),
        }
    }

    #[test]
    fn each_inconsistency_names_its_field() {
        let cases = [
            (SEED.replace("50052", "50051"), "nodes[1].port"),
            (
                SEED.replace("\"port\": 50052", "\"port\": 50052, \"http_port\": 0"),
                "nodes[1].http_port",
            ),
            (
                SEED.replace("\"port\": 50052", "\"port\": 50052, \"http_port\": 50052"),
                "nodes[1].http_port",
            ),
            // Another node's gRPC port on the same machine.
            (
                SEED.replace("\"port\": 50052", "\"port\": 50052, \"http_port\": 50051"),
                "nodes[1].http_port",
            ),
            (
                SEED.replace("\"port\": 50051", "\"port\": 50051, \"http_port\": 9100")
                    .replace("\"port\": 50052", "\"port\": 50052, \"http_port\": 9100"),
                "nodes[1].http_port",
            ),
            (SEED.replace("\"id\": 2", "\"id\": 1"), "nodes[1].id"),
            (SEED.replace("\"id\": 2", "\"id\": 0"), "nodes[1].id"),
            (
                SEED.replace("\"min\": 150", "\"min\": 300"),
                "election_timeout_ms",
            ),
            (
                SEED.replace(
                    "\"heartbeat_interval_ms\": 50",
                    "\"heartbeat_interval_ms\": 100",
                ),
                "heartbeat_interval_ms",
            ),
            (
                SEED.replace(
                    "\"heartbeat_interval_ms\": 50",
                    "\"heartbeat_interval_ms\": 0",
                ),
                "heartbeat_interval_ms",
            ),
            (SEED.replace("\"./data\"", "\"\""), "data_directory"),
            (
                SEED.replace(
                    "\"host\": \"localhost\", \"port\": 50053",
                    "\"host\": \" \", \"port\": 50053",
                ),
                "nodes[2].host",
            ),
            // #12: an election maximum that would overflow the core's u32 ticks.
            (
                SEED.replace("\"max\": 300", "\"max\": 42949672960"),
                "election_timeout_ms.max",
            ),
            (
                SEED.replace(
                    "\"data_directory\"",
                    "\"max_value_bytes\": 0, \"data_directory\"",
                ),
                "max_value_bytes",
            ),
        ];
        for (text, field) in cases {
            assert_eq!(field_of(load_text(&text)), field, "{text}");
        }
    }

    #[test]
    fn unknown_and_missing_fields_are_refused_by_name() {
        let e =
            load_text(&SEED.replace("heartbeat_interval_ms", "heartbeat_ms")).expect_err("typo");
        assert!(e.to_string().contains("heartbeat_ms"), "{e}");
        let e =
            load_text(&SEED.replace("\"data_directory\": \"./data\"", "\"log_directory\": \"x\""))
                .expect_err("missing");
        assert!(e.to_string().contains("data_directory"), "{e}");
    }

    #[test]
    fn optional_fields_are_accepted() {
        let text = SEED.replace(
            "\"./data\"",
            "\"./data\", \"log_directory\": \"/tmp/l\", \"max_value_bytes\": 1000",
        );
        let c = load_text(&text).expect("valid");
        assert_eq!(c.max_value_bytes(), 1000);
        assert_eq!(c.log_dir(), PathBuf::from("/tmp/l"));
    }
}
