//! `raftkv bench`: a closed-loop load generator. Each client keeps one request in flight; after
//! a warm-up, it measures throughput and latency percentiles (HDR histogram) and counts errors
//! by kind and the leader changes it saw.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::client::{Client, ClientError};
use crate::config::Config;

use super::ConfigArg;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Only writes.
    Put,
    /// Only reads (keys are written once before the run).
    Get,
    /// Reads and writes, `--read-ratio` of them reads.
    Mixed,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Operations to measure (default 100000 unless --duration is given).
    #[arg(long)]
    pub ops: Option<u64>,
    /// Measure for this long (e.g. 30s) instead of (or as well as) a number of operations.
    #[arg(long, value_parser = super::parse_duration)]
    pub duration: Option<Duration>,
    /// Bytes per value.
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Distinct keys, chosen uniformly at random.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    #[arg(long, value_enum, default_value_t = Workload::Put)]
    pub workload: Workload,
    /// Share of reads in the mixed workload.
    #[arg(long, default_value_t = 0.9)]
    pub read_ratio: f64,
    /// Serve reads from any node's local state (fast, possibly stale) instead of linearizably
    /// through the leader.
    #[arg(long)]
    pub stale_reads: bool,
    /// Unmeasured warm-up before the measurement.
    #[arg(long, default_value = "1s", value_parser = super::parse_duration)]
    pub warmup: Duration,
    /// Connections per node. The clients share them: each connection carries one pipelined
    /// call, and requests issued at the same time travel together in one message.
    #[arg(long, default_value_t = 4)]
    pub conns: usize,
    /// Per-request deadline (leader discovery and retries included).
    #[arg(long, default_value = "10s", value_parser = super::parse_duration)]
    pub timeout: Duration,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub workload: Workload,
    pub clients: usize,
    pub nodes: usize,
    pub value_size: usize,
    pub keys: u64,
    pub stale_reads: bool,
    pub ops: u64,
    pub errors: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub errors_by_kind: BTreeMap<String, u64>,
    pub leader_changes: u64,
}

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

struct Worker {
    hist: Histogram<u64>,
    errors: BTreeMap<String, u64>,
}

fn error_kind(e: &ClientError) -> &'static str {
    match e {
        ClientError::Rejected(_) => "rejected",
        ClientError::Unreachable { .. } => "unreachable",
        ClientError::NoQuorum {
            outcome_unknown: true,
            ..
        } => "timeout (outcome unknown)",
        ClientError::NoQuorum { .. } => "no quorum",
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let cfg = Config::load(&args.config.config)?;
    anyhow::ensure!(args.clients > 0, "--clients must be at least 1");
    anyhow::ensure!(
        args.conns > 0,
        "--conns must be at least 1 (connections shared by the clients)"
    );
    anyhow::ensure!(
        args.ops != Some(0),
        "--ops must be at least 1 (or leave it out and give --duration)"
    );
    anyhow::ensure!(
        args.duration.is_none_or(|d| !d.is_zero()),
        "--duration must be longer than 0s"
    );
    anyhow::ensure!(
        !args.timeout.is_zero(),
        "--timeout must be longer than 0s (how long one request may take)"
    );
    anyhow::ensure!(args.keys > 0, "--keys must be at least 1");
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.read_ratio),
        "--read-ratio must be between 0 and 1"
    );
    anyhow::ensure!(
        args.value_size <= cfg.max_value_bytes(),
        "--value-size {} exceeds the cluster's max_value_bytes ({})",
        args.value_size,
        cfg.max_value_bytes()
    );
    let report = bench(&cfg, &args).await?;
    if args.json {
        outln!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn key(i: u64) -> Bytes {
    Bytes::from(format!("bench-{i:08}"))
}

pub async fn bench(cfg: &Config, args: &BenchArgs) -> anyhow::Result<Report> {
    // The members, as the cluster knows them (config.json may list only the original nodes).
    let dialer = args.config.dialer(cfg)?;
    let members = Client::discover_with(cfg.addrs(), dialer.clone())
        .await
        .nodes()
        .clone();
    let conns: Vec<Client> = (0..args.conns.max(1))
        .map(|_| {
            Client::with_dialer(members.clone(), dialer.clone())
                .with_timeout(args.timeout)
                .fail_fast()
        })
        .collect();
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    let value = Bytes::from(
        (0..args.value_size)
            .map(|_| rng.random_range(b'a'..=b'z'))
            .collect::<Vec<u8>>(),
    );

    // Make sure the cluster answers before starting the clock.
    let mut probe = conns[0].fork();
    probe.get(key(0), false).await.map_err(|e| match e {
        e @ crate::client::ClientError::Unreachable { .. } => {
            anyhow::anyhow!("{e}; nothing was measured")
        }
        e => anyhow::anyhow!("the cluster is not serving: {e}"),
    })?;

    if args.workload != Workload::Put {
        preload(&conns, args, &value).await?;
    }

    let ops_target = match (args.ops, args.duration) {
        (Some(n), _) => Some(n),
        (None, Some(_)) => None,
        (None, None) => Some(100_000),
    };
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let measured = Arc::new(AtomicU64::new(0));
    let leader_changes = Arc::new(AtomicU64::new(0));
    let last_leader = Arc::new(AtomicU64::new(probe.leader().unwrap_or(0)));
    let mut tasks = Vec::with_capacity(args.clients);
    for w in 0..args.clients {
        let mut client = conns[w % conns.len()].fork();
        let (phase, measured, leader_changes, last_leader) = (
            phase.clone(),
            measured.clone(),
            leader_changes.clone(),
            last_leader.clone(),
        );
        let value = value.clone();
        let args = args.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(w as u64);
            let mut me = Worker {
                hist: Histogram::new_with_bounds(1, 120_000_000, 3)
                    .expect("valid histogram bounds"),
                errors: BTreeMap::new(),
            };
            loop {
                let p = phase.load(Ordering::Relaxed);
                if p == STOP {
                    break;
                }
                let k = key(rng.random_range(0..args.keys));
                let read = match args.workload {
                    Workload::Put => false,
                    Workload::Get => true,
                    Workload::Mixed => rng.random_bool(args.read_ratio),
                };
                let started = Instant::now();
                let result = if read {
                    client.get(k, args.stale_reads).await.map(|_| ())
                } else {
                    client.put(k, value.clone()).await.map(|_| ())
                };
                let micros = started.elapsed().as_micros() as u64;
                if p != MEASURE || phase.load(Ordering::Relaxed) != MEASURE {
                    continue;
                }
                match result {
                    Ok(()) => {
                        let _ = me.hist.record(micros.max(1));
                    }
                    Err(e) => *me.errors.entry(error_kind(&e).to_string()).or_default() += 1,
                }
                if let Some(l) = client.leader() {
                    let prev = last_leader.swap(l, Ordering::Relaxed);
                    if prev != 0 && prev != l {
                        leader_changes.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let n = measured.fetch_add(1, Ordering::Relaxed) + 1;
                if ops_target.is_some_and(|t| n >= t) {
                    phase.store(STOP, Ordering::Relaxed);
                }
            }
            me
        }));
    }

    tokio::time::sleep(args.warmup).await;
    phase.store(MEASURE, Ordering::Relaxed);
    let started = Instant::now();
    let bar = progress_bar(ops_target, args.duration);
    let mut last = (Instant::now(), 0u64);
    while phase.load(Ordering::Relaxed) == MEASURE {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = measured.load(Ordering::Relaxed);
        let now = Instant::now();
        if now - last.0 >= Duration::from_millis(500) {
            let rate = (n - last.1) as f64 / (now - last.0).as_secs_f64();
            bar.set_message(format!("{rate:.0} ops/s"));
            last = (now, n);
        }
        match ops_target {
            Some(_) => bar.set_position(n),
            None => bar.set_position(started.elapsed().as_millis() as u64),
        }
        if args.duration.is_some_and(|d| started.elapsed() >= d) {
            phase.store(STOP, Ordering::Relaxed);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();

    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds");
    let mut errors_by_kind = BTreeMap::new();
    for t in tasks {
        let w = t.await?;
        hist.add(&w.hist)?;
        for (k, v) in w.errors {
            *errors_by_kind.entry(k).or_default() += v;
        }
    }
    let errors: u64 = errors_by_kind.values().sum();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(Report {
        workload: args.workload,
        clients: args.clients,
        nodes: cfg.nodes.len(),
        value_size: args.value_size,
        keys: args.keys,
        stale_reads: args.stale_reads,
        ops: hist.len(),
        errors,
        seconds,
        ops_per_sec: hist.len() as f64 / seconds,
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: hist.max() as f64 / 1000.0,
        errors_by_kind,
        leader_changes: leader_changes.load(Ordering::Relaxed),
    })
}

/// Writes every key once, so that reads find values.
async fn preload(conns: &[Client], args: &BenchArgs, value: &Bytes) -> anyhow::Result<()> {
    let bar = ProgressBar::new(args.keys).with_message("writing keys for the read workload");
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..args.clients.min(64) {
        let mut client = conns[w % conns.len()].fork();
        let (next, value, bar, keys) = (next.clone(), value.clone(), bar.clone(), args.keys);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= keys {
                    return Ok::<(), ClientError>(());
                }
                client.put(key(i), value.clone()).await?;
                bar.inc(1);
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    bar.finish_and_clear();
    Ok(())
}

fn progress_bar(ops: Option<u64>, duration: Option<Duration>) -> ProgressBar {
    let (len, template) = match (ops, duration) {
        (Some(n), _) => (n, "{spinner} {bar:30} {pos}/{len} ops  {msg}  {elapsed}"),
        (None, Some(d)) => (d.as_millis() as u64, "{spinner} {bar:30} {elapsed}  {msg}"),
        (None, None) => (0, "{spinner} {msg}"),
    };
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

pub fn print_report(r: &Report) {
    outln!(
        "raftkv bench: {:?} workload{}, {} clients, {}-byte values, {} keys, {} nodes",
        r.workload,
        if r.stale_reads { " (stale reads)" } else { "" },
        r.clients,
        r.value_size,
        r.keys,
        r.nodes
    );
    outln!(
        "  operations      {} ok, {} failed in {:.2} s",
        r.ops,
        r.errors,
        r.seconds
    );
    outln!("  throughput      {:.0} ops/s", r.ops_per_sec);
    outln!(
        "  latency (ms)    p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
        r.p50_ms,
        r.p90_ms,
        r.p99_ms,
        r.p999_ms,
        r.max_ms
    );
    if r.errors_by_kind.is_empty() {
        outln!("  errors          none");
    } else {
        // The label once; each further kind on its own line under the first.
        for (i, (k, v)) in r.errors_by_kind.iter().enumerate() {
            let label = if i == 0 { "errors" } else { "" };
            outln!("  {label:<15} {v} {k}");
        }
    }
    outln!("  leader changes  {}", r.leader_changes);
}
