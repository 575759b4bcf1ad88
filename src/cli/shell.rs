//! `raftkv shell`: a REPL client (rustyline), or a line-by-line script reader when stdin is not
//! a terminal.

use std::io::{BufRead, IsTerminal};
use std::time::Duration;

use rustyline::completion::Completer;
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Context as RlContext, Editor, Helper};

use crate::client::Client;
use crate::config::Config;

use super::ConfigArg;

#[derive(clap::Args, Debug)]
pub struct ShellArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// How long one command may take (finding a leader, retries) before it fails.
    #[arg(long, default_value = "10s", value_parser = super::parse_duration)]
    pub timeout: Duration,
}

const COMMANDS: &[&str] = &[
    "set", "get", "del", "status", "leader", "member", "help", "exit", "quit",
];

const HELP: &str = "\
commands:
  set KEY VALUE      write KEY (VALUE is the rest of the line)
  get KEY            read KEY (linearizable, through the leader)
  get --stale KEY    read KEY from any node (fast; may miss others' latest writes, never your own)
  del KEY            delete KEY
  status             every node's role, term, leader and log indexes
  leader             which node leads
  leader transfer [ID]  hand leadership to node ID (default: the most caught-up node)
  member list        every member: address, voter or learner, match index
  member add ID HOST:PORT [--learner]  add a node (a learner, promoted once caught up)
  member promote ID  make a caught-up learner a voter
  member remove ID   remove a member for good (its id is never reused)
  help               this text
  exit               leave (also: quit, Ctrl-D)";

struct ShellHelper;

impl Completer for ShellHelper {
    type Candidate = String;
    fn complete(
        &self,
        line: &str,
        pos: usize,
        _: &RlContext<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        let head = &line[..pos];
        if head.contains(char::is_whitespace) {
            return Ok((pos, Vec::new()));
        }
        Ok((
            0,
            COMMANDS
                .iter()
                .filter(|c| c.starts_with(head))
                .map(|c| c.to_string())
                .collect(),
        ))
    }
}
impl Hinter for ShellHelper {
    type Hint = String;
}
impl Highlighter for ShellHelper {}
impl Validator for ShellHelper {}
impl Helper for ShellHelper {}

/// Runs one command line; returns its output, or an error message.
pub async fn execute(
    client: &mut Client,
    line: &str,
    timeout: Duration,
) -> Result<Option<String>, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let (cmd, rest) = line
        .split_once(char::is_whitespace)
        .map_or((line, ""), |(c, r)| (c, r.trim()));
    let one_key = |what: &str| -> Result<String, String> {
        if rest.is_empty() || rest.contains(char::is_whitespace) {
            Err(format!("usage: {what} KEY"))
        } else {
            Ok(rest.to_string())
        }
    };
    match cmd.to_ascii_lowercase().as_str() {
        "set" | "put" => {
            let Some((key, value)) = rest.split_once(char::is_whitespace) else {
                return Err("usage: set KEY VALUE".into());
            };
            client
                .put(key.to_string(), value.trim_start().to_string())
                .await
                .map_err(|e| e.to_string())?;
            Ok(Some("OK".into()))
        }
        "get" => {
            // Flags are whole words: `get --staleUpper` is an unknown flag, not key `Upper`.
            let (stale, key) = match rest.split_once(char::is_whitespace) {
                Some(("--stale", k)) => (true, k.trim()),
                _ if rest == "--stale" => (true, ""),
                _ if rest.starts_with("--") => {
                    let flag = rest.split_whitespace().next().unwrap_or(rest);
                    return Err(format!("unknown flag {flag:?}; usage: get [--stale] KEY"));
                }
                _ => (false, rest),
            };
            if key.is_empty() || key.contains(char::is_whitespace) {
                return Err("usage: get [--stale] KEY".into());
            }
            match client
                .get(key.to_string(), stale)
                .await
                .map_err(|e| e.to_string())?
            {
                Some(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
                None => Ok(Some("(not found)".into())),
            }
        }
        "del" | "delete" => {
            let key = one_key("del")?;
            let existed = client.delete(key).await.map_err(|e| e.to_string())?;
            Ok(Some(if existed { "deleted" } else { "(not found)" }.into()))
        }
        "status" => Ok(Some(status_table(client, timeout).await)),
        "leader"
            if rest
                .split_whitespace()
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case("transfer")) =>
        {
            let args: Vec<&str> = rest.split_whitespace().skip(1).collect();
            let target = match args.as_slice() {
                [] => None,
                [id] => Some(id.parse::<crate::raft::NodeId>().map_err(|_| {
                    format!("usage: leader transfer [ID] ({id:?} is not a node id)")
                })?),
                _ => return Err("usage: leader transfer [ID]".into()),
            };
            super::leader::transfer(client, target).await.map(Some)
        }
        "leader" => {
            let reports = client.status_all(timeout.min(Duration::from_secs(2))).await;
            let up: Vec<_> = reports
                .iter()
                .filter_map(|r| r.result.as_ref().ok())
                .collect();
            match up.iter().find(|s| s.role == "leader") {
                Some(l) => {
                    let addr = client.nodes().get(&l.id).cloned().unwrap_or_default();
                    Ok(Some(format!("node {} ({addr}), term {}", l.id, l.term)))
                }
                None if up.is_empty() => Err(format!("no node answered ({} tried)", reports.len())),
                None => Err(format!(
                    "no leader ({} of {} nodes up)",
                    up.len(),
                    reports.len()
                )),
            }
        }
        "member" => super::member::shell(client, rest).await.map(Some),
        "help" | "?" => Ok(Some(HELP.into())),
        other => Err(format!(
            "unknown command {other:?}; type `help` for the list"
        )),
    }
}

pub async fn status_table(client: &Client, timeout: Duration) -> String {
    let reports = client.status_all(timeout.min(Duration::from_secs(2))).await;
    let mut out = format!(
        "{:<4} {:<22} {:<6} {:<13} {:>6} {:>6} {:>8} {:>8} {:>8}",
        "ID", "ADDRESS", "STATE", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED", "LAST"
    );
    // Learners as the configuration of the newest answer names them.
    let learners: Vec<u64> = reports
        .iter()
        .filter_map(|r| r.result.as_ref().ok())
        .max_by_key(|s| (s.term, s.config_index))
        .map(|s| {
            s.members
                .iter()
                .filter(|m| !m.voter)
                .map(|m| m.id)
                .collect()
        })
        .unwrap_or_default();
    for r in reports {
        out.push('\n');
        match r.result {
            Ok(s) => out.push_str(&format!(
                "{:<4} {:<22} {:<6} {:<13} {:>6} {:>6} {:>8} {:>8} {:>8}",
                r.id,
                r.addr,
                "up",
                if learners.contains(&r.id) {
                    "learner".to_string()
                } else {
                    s.role
                },
                s.term,
                if s.leader_id == 0 {
                    "-".to_string()
                } else {
                    s.leader_id.to_string()
                },
                s.commit_index,
                s.applied_index,
                s.last_log_index
            )),
            Err(e) => out.push_str(&format!("{:<4} {:<22} {:<6} {}", r.id, r.addr, "down", e)),
        }
    }
    out
}

pub async fn run(args: ShellArgs) -> anyhow::Result<()> {
    let cfg = Config::load(&args.config.config)?;
    let mut client = Client::discover(cfg.addrs())
        .await
        .with_timeout(args.timeout);
    if !std::io::stdin().is_terminal() {
        // Each line runs as it arrives (a script fed by a slow producer, or a pipe kept open,
        // is not held back until end of input); a line that is not UTF-8 fails alone.
        let mut failed = 0usize;
        let mut stdin = std::io::BufReader::new(std::io::stdin());
        let mut raw = Vec::new();
        let mut number = 0usize;
        loop {
            raw.clear();
            if tokio::task::block_in_place(|| stdin.read_until(b'\n', &mut raw))? == 0 {
                break;
            }
            number += 1;
            let Ok(line) = std::str::from_utf8(&raw) else {
                failed += 1;
                eprintln!("error: line {number} is not UTF-8; skipped");
                continue;
            };
            let line = line.trim_end_matches(['\n', '\r']).to_string();
            match execute(&mut client, &line, args.timeout).await {
                Ok(Some(out)) => outln!("{out}"),
                Ok(None) => {}
                Err(e) => {
                    if matches!(line.trim(), "exit" | "quit") {
                        break;
                    }
                    failed += 1;
                    eprintln!("error: {e}");
                }
            }
            if matches!(line.trim(), "exit" | "quit") {
                break;
            }
        }
        if failed > 0 {
            anyhow::bail!("{failed} command(s) failed");
        }
        return Ok(());
    }

    let mut rl: Editor<ShellHelper, DefaultHistory> = Editor::new()?;
    rl.set_helper(Some(ShellHelper));
    let history =
        std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".raftkv_history"));
    if let Some(h) = &history {
        let _ = rl.load_history(h);
    }
    outln!(
        "raftkv shell: {} nodes in {}. Type `help` for commands.",
        cfg.nodes.len(),
        args.config.config.display()
    );
    loop {
        let line = tokio::task::block_in_place(|| rl.readline("raftkv> "));
        match line {
            Ok(line) => {
                let trimmed = line.trim();
                if trimmed.is_empty() {
                    continue;
                }
                let _ = rl.add_history_entry(trimmed);
                if matches!(trimmed, "exit" | "quit") {
                    break;
                }
                match execute(&mut client, trimmed, args.timeout).await {
                    Ok(Some(out)) => outln!("{out}"),
                    Ok(None) => {}
                    Err(e) => outln!("error: {e}"),
                }
            }
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(h) = &history {
        let _ = rl.save_history(h);
    }
    Ok(())
}
