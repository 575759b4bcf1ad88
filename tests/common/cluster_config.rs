//! Shared by the process tests, the nemesis test and the benchmarks: a `config.json` for a
//! cluster of real `raftkv` processes in a test directory, and starting one of its nodes.
#![allow(dead_code)] // each user needs a different part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// `n` loopback addresses on ports that were free a moment ago (the listeners are closed before
/// the nodes bind them).
pub fn free_loopback(n: usize) -> Vec<(String, u16)> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| {
            (
                "127.0.0.1".to_string(),
                l.local_addr().expect("local addr").port(),
            )
        })
        .collect()
}

/// Writes `dir/config.json` for nodes 1..=n at `hosts`, with the seed's timing, data in
/// `./data` and logs in `./logs`; `extra` is appended as further JSON fields (e.g.
/// `"max_value_bytes": 65536`).
pub fn write(dir: &Path, hosts: &[(String, u16)], extra: &str) -> PathBuf {
    let nodes: Vec<String> = hosts
        .iter()
        .enumerate()
        .map(|(i, (h, p))| format!(r#"{{"id": {}, "host": "{h}", "port": {p}}}"#, i + 1))
        .collect();
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    let text = format!(
        r#"{{"nodes": [{}], "election_timeout_ms": {{"min": 150, "max": 300}}, "heartbeat_interval_ms": 50, "data_directory": "./data", "log_directory": "./logs"{extra}}}"#,
        nodes.join(", ")
    );
    let path = dir.join("config.json");
    std::fs::write(&path, text).expect("write config");
    path
}

/// Gives every node in `config` an `http_port` (ports that were free a moment ago); returns
/// them in the order of the config's nodes.
pub fn add_http_ports(config: &Path) -> Vec<u16> {
    let text = std::fs::read_to_string(config).expect("read config");
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("config is JSON");
    let nodes = v["nodes"].as_array_mut().expect("nodes");
    let ports: Vec<u16> = free_loopback(nodes.len())
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    for (node, port) in nodes.iter_mut().zip(&ports) {
        node["http_port"] = (*port).into();
    }
    std::fs::write(config, v.to_string()).expect("write config");
    ports
}

/// Starts `raftkv node --id id --config config --quiet`, its output discarded (the node logs
/// to its log file).
pub fn spawn_node(config: &Path, id: u64) -> Child {
    Command::new(env!("CARGO_BIN_EXE_raftkv"))
        .args(["node", "--id", &id.to_string(), "--config"])
        .arg(config)
        .arg("--quiet")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn raftkv node")
}

/// Makes the cluster of `config` secure with `raftkv certs init` (certificates in `certs/`
/// beside the config).
pub fn certs_init(config: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_raftkv"))
        .args(["certs", "init", "--config"])
        .arg(config)
        .args(["--out", "certs"])
        .current_dir(config.parent().expect("the config's directory"))
        .output()
        .expect("run raftkv certs init");
    assert!(out.status.success(), "certs init: {out:?}");
}
