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
use crate::raft::NodeId;

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

const HELP: &str = r#"commands:
  set KEY VALUE      write KEY (VALUE: every word after KEY, joined by one space)
  get KEY            read KEY (linearizable, through the leader)
  get --stale KEY    read KEY from any node (fast; may miss others' latest writes, never your own)
  get -- KEY         read a KEY that starts with --
  del KEY            delete KEY
  status             every node's role, term, leader and log indexes
  leader             which node leads
  leader transfer [ID]  hand leadership to node ID (default: the most caught-up node)
  member list        every member: address, voter or learner, match index
  member add ID HOST:PORT [--learner]  add a node (a learner, promoted once caught up)
  member promote ID  make a caught-up learner a voter
  member remove ID   remove a member for good (its id is never reused)
  help               this text
  exit               leave (also: quit, Ctrl-D)

words are split as a POSIX shell splits them:
  set 'my key' "a value"     key `my key`, value `a value`
  set k "  padded  "         quotes keep spaces exactly (two on each side here)
  set k ""                   an empty value
  set k hello   world        unquoted words are joined by one space: `hello world`
  set k it\'s                outside quotes a backslash escapes the next character
  'single quotes' keep everything as typed; in "double quotes" only \" \\ \$ \` are escapes.
  A quote left open is an error and nothing runs. A line starting with # is a comment;
  elsewhere # is an ordinary character (set color #fff).
commands are case-insensitive (SET, Get); keys, values and flags are not.
Ctrl-C cancels the command that is running (a cancelled set or del may still take effect).
History is kept in ~/.raftkv_history."#;

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
        let lower = head.to_ascii_lowercase();
        Ok((
            0,
            COMMANDS
                .iter()
                .filter(|c| c.starts_with(&lower))
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

/// One shell line, parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// A blank line or a comment.
    Nothing,
    Set {
        key: String,
        value: String,
    },
    Get {
        key: String,
        stale: bool,
    },
    Del {
        key: String,
    },
    Status,
    Leader,
    LeaderTransfer(Option<NodeId>),
    /// `member ...`: the words after `member`, the subcommand lowered.
    Member(String),
    Help,
    Exit,
}

impl Command {
    /// Whether the command may change the cluster (so a cancelled one may still take effect).
    fn writes(&self) -> bool {
        matches!(
            self,
            Command::Set { .. }
                | Command::Del { .. }
                | Command::LeaderTransfer(_)
                | Command::Member(_)
        )
    }
}

/// Splits a line into words as a POSIX shell does (by `shlex`), except that `#` starts a
/// comment only at the start of the line (the caller's check), so `set color #fff` stores
/// `#fff` instead of failing for want of a value. An unbalanced quote or a trailing backslash
/// is an error naming it.
fn split_words(line: &str) -> Result<Vec<String>, String> {
    // shlex takes an unquoted `#` at the start of a word for a comment to the end of the line:
    // escape every unquoted `#`. The same walk finds an open quote and where it opened.
    let mut escaped = String::with_capacity(line.len() + 8);
    let mut open: Option<(char, usize)> = None;
    let mut chars = line.chars().enumerate();
    while let Some((col, c)) = chars.next() {
        match (open, c) {
            (None, '#') => escaped.push_str("\\#"),
            (None, '\'' | '"') => {
                open = Some((c, col + 1));
                escaped.push(c);
            }
            (Some((q, _)), _) if c == q => {
                open = None;
                escaped.push(c);
            }
            (None | Some(('"', _)), '\\') => {
                escaped.push(c);
                match chars.next() {
                    Some((_, next)) => escaped.push(next),
                    None => {
                        return Err(
                            "the line ends with a backslash (write \\\\ for a backslash)".into(),
                        );
                    }
                }
            }
            _ => escaped.push(c),
        }
    }
    if let Some((q, col)) = open {
        return Err(format!(
            "unclosed quote: the {q} at column {col} has no closing {q}; nothing was run"
        ));
    }
    shlex::split(&escaped).ok_or_else(|| "unbalanced quoting; nothing was run".into())
}

fn key_word(key: &str, usage: &str) -> Result<String, String> {
    if key.is_empty() {
        Err(format!("the key must not be empty; {usage}"))
    } else {
        Ok(key.to_string())
    }
}

/// Parses one shell line (see `HELP` for the rules).
pub fn parse(line: &str) -> Result<Command, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(Command::Nothing);
    }
    let words = split_words(line)?;
    let Some((cmd, args)) = words.split_first() else {
        return Ok(Command::Nothing);
    };
    match cmd.to_ascii_lowercase().as_str() {
        "set" | "put" => {
            const USAGE: &str = "usage: set KEY VALUE";
            match args {
                [key, value @ ..] if !value.is_empty() => Ok(Command::Set {
                    key: key_word(key, USAGE)?,
                    value: value.join(" "),
                }),
                _ => Err(USAGE.into()),
            }
        }
        "get" => {
            const USAGE: &str = "usage: get [--stale] KEY";
            // Flags are whole words (`get --staleUpper` is an unknown flag, not key `Upper`),
            // before the key; `--` ends them.
            let mut stale = false;
            let mut rest = args;
            while let [first, tail @ ..] = rest {
                match first.as_str() {
                    "--" => {
                        rest = tail;
                        break;
                    }
                    "--stale" => stale = true,
                    flag if flag.starts_with("--") => {
                        return Err(format!("unknown flag {flag:?}; {USAGE}"));
                    }
                    _ => break,
                }
                rest = tail;
            }
            match rest {
                [key] => Ok(Command::Get {
                    key: key_word(key, USAGE)?,
                    stale,
                }),
                _ => Err(USAGE.into()),
            }
        }
        "del" | "delete" => match args {
            [key] => Ok(Command::Del {
                key: key_word(key, "usage: del KEY")?,
            }),
            _ => Err("usage: del KEY".into()),
        },
        "status" => Ok(Command::Status),
        "leader" => match args {
            [sub, rest @ ..] if sub.eq_ignore_ascii_case("transfer") => match rest {
                [] => Ok(Command::LeaderTransfer(None)),
                [id] => id
                    .parse::<NodeId>()
                    .map(|id| Command::LeaderTransfer(Some(id)))
                    .map_err(|_| format!("usage: leader transfer [ID] ({id:?} is not a node id)")),
                _ => Err("usage: leader transfer [ID]".into()),
            },
            _ => Ok(Command::Leader),
        },
        "member" => {
            let mut words: Vec<String> = args.to_vec();
            if let Some(sub) = words.first_mut() {
                sub.make_ascii_lowercase();
            }
            Ok(Command::Member(words.join(" ")))
        }
        "help" | "?" => Ok(Command::Help),
        "exit" | "quit" => Ok(Command::Exit),
        other => Err(format!(
            "unknown command {other:?}; type `help` for the list"
        )),
    }
}

/// Runs one parsed command; returns its output, or an error message. `Exit` and `Nothing`
/// print nothing.
pub async fn run_command(
    client: &mut Client,
    cmd: Command,
    timeout: Duration,
) -> Result<Option<String>, String> {
    match cmd {
        Command::Nothing | Command::Exit => Ok(None),
        Command::Set { key, value } => {
            client.put(key, value).await.map_err(|e| e.to_string())?;
            Ok(Some("OK".into()))
        }
        Command::Get { key, stale } => {
            match client.get(key, stale).await.map_err(|e| e.to_string())? {
                Some(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
                None => Ok(Some("(not found)".into())),
            }
        }
        Command::Del { key } => {
            let existed = client.delete(key).await.map_err(|e| e.to_string())?;
            Ok(Some(if existed { "deleted" } else { "(not found)" }.into()))
        }
        Command::Status => Ok(Some(status_table(client, timeout).await)),
        Command::LeaderTransfer(target) => super::leader::transfer(client, target).await.map(Some),
        Command::Leader => {
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
        Command::Member(rest) => super::member::shell(client, &rest).await.map(Some),
        Command::Help => Ok(Some(HELP.into())),
    }
}

/// Parses and runs one command line; returns its output, or an error message.
pub async fn execute(
    client: &mut Client,
    line: &str,
    timeout: Duration,
) -> Result<Option<String>, String> {
    run_command(client, parse(line)?, timeout).await
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
    let mut client = Client::discover_with(cfg.addrs(), args.config.dialer(&cfg)?)
        .await
        .with_timeout(args.timeout)
        .fail_fast();
    if !std::io::stdin().is_terminal() {
        // Each line runs as it arrives (a script fed by a slow producer, or a pipe kept open,
        // is not held back until end of input); a line that is not UTF-8 fails alone.
        // Ctrl-C is left to its default here: it stops the shell.
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
            let result = match parse(line.trim_end_matches(['\n', '\r'])) {
                Ok(Command::Exit) => break,
                Ok(cmd) => run_command(&mut client, cmd, args.timeout).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(Some(out)) => outln!("{out}"),
                Ok(None) => {}
                Err(e) => {
                    failed += 1;
                    eprintln!("error: {e}");
                }
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
        // rustyline reads in raw mode: Ctrl-C at the prompt is a key it answers with
        // `Interrupted` (the line is dropped, a new prompt shown), not a signal.
        let line = tokio::task::block_in_place(|| rl.readline("raftkv> "));
        let line = match line {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        let _ = rl.add_history_entry(trimmed);
        if let Some(h) = &history {
            // Appended as each line is entered: kept if the shell is killed, and not lost
            // to another shell that exits later.
            let _ = rl.append_history(h);
        }
        let cmd = match parse(trimmed) {
            Ok(Command::Exit) => break,
            Ok(cmd) => cmd,
            Err(e) => {
                outln!("error: {e}");
                continue;
            }
        };
        let writes = cmd.writes();
        // While a command runs the terminal is in cooked mode, so Ctrl-C is SIGINT: it
        // cancels the command (dropping its future) instead of killing the shell.
        tokio::select! {
            result = run_command(&mut client, cmd, args.timeout) => match result {
                Ok(Some(out)) => outln!("{out}"),
                Ok(None) => {}
                Err(e) => outln!("error: {e}"),
            },
            Ok(()) = tokio::signal::ctrl_c() => outln!(
                "\ncancelled{}",
                if writes { " (the change may still take effect)" } else { "" }
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Command, parse};

    fn set(key: &str, value: &str) -> Result<Command, String> {
        Ok(Command::Set {
            key: key.into(),
            value: value.into(),
        })
    }

    fn get(key: &str, stale: bool) -> Result<Command, String> {
        Ok(Command::Get {
            key: key.into(),
            stale,
        })
    }

    #[test]
    fn quoted_keys_and_values_keep_their_spaces() {
        assert_eq!(parse(r#"set 'my key' "a value""#), set("my key", "a value"));
        assert_eq!(parse(r#"set "my key" 'a value'"#), set("my key", "a value"));
        assert_eq!(parse("get 'my key'"), get("my key", false));
        assert_eq!(parse("get --stale 'my key'"), get("my key", true));
        assert_eq!(
            parse("del \"my key\""),
            Ok(Command::Del {
                key: "my key".into()
            })
        );
        // Quotes may join parts of one word, as in a shell.
        assert_eq!(parse(r#"set k a' 'b"c d""#), set("k", "a bc d"));
    }

    #[test]
    fn leading_and_trailing_spaces_survive_quotes() {
        assert_eq!(parse(r#"set k "  padded  ""#), set("k", "  padded  "));
        assert_eq!(parse("set k '\tTab '"), set("k", "\tTab "));
        assert_eq!(parse(r#"set ' k ' v"#), set(" k ", "v"));
    }

    #[test]
    fn an_empty_quoted_value_is_a_value() {
        assert_eq!(parse(r#"set k """#), set("k", ""));
        assert_eq!(parse("set k ''"), set("k", ""));
        // A missing value is still an error, and so is an empty key.
        assert_eq!(parse("set k"), Err("usage: set KEY VALUE".into()));
        assert!(
            parse("set '' v").is_err_and(|e| e.contains("the key must not be empty")),
            "{:?}",
            parse("set '' v")
        );
    }

    #[test]
    fn an_unclosed_quote_is_an_error_naming_it() {
        for (line, quote, col) in [
            ("set 'k v", '\'', 5),
            (r#"set k "v"#, '"', 7),
            (r#"get "k"#, '"', 5),
            (r#"set k 'it's'"#, '\'', 12),
        ] {
            let err = parse(line).expect_err(line);
            assert!(err.starts_with("unclosed quote"), "{line}: {err}");
            assert!(
                err.contains(&format!("the {quote} at column {col}")),
                "{line}: {err}"
            );
        }
        // A quote inside the other kind, or escaped, is not an open quote.
        assert_eq!(parse(r#"set k "it's""#), set("k", "it's"));
        assert_eq!(parse(r#"set k it\'s"#), set("k", "it's"));
        assert_eq!(parse(r#"set k "say \"hi\"""#), set("k", r#"say "hi""#));
        assert!(parse(r"set k v\").is_err_and(|e| e.contains("ends with a backslash")));
    }

    #[test]
    fn commands_are_case_insensitive_but_keys_values_and_flags_are_not() {
        assert_eq!(parse("SET Key Value"), set("Key", "Value"));
        assert_eq!(parse("Get Key"), get("Key", false));
        assert_eq!(parse("GET --stale Key"), get("Key", true));
        assert_eq!(parse("STATUS"), Ok(Command::Status));
        assert_eq!(parse("Leader"), Ok(Command::Leader));
        assert_eq!(
            parse("LEADER TRANSFER 2"),
            Ok(Command::LeaderTransfer(Some(2)))
        );
        assert_eq!(parse("EXIT"), Ok(Command::Exit));
        assert_eq!(parse("Quit"), Ok(Command::Exit));
        assert_eq!(parse("HELP"), Ok(Command::Help));
        assert_eq!(
            parse("MEMBER ADD 4 127.0.0.1:7 --learner"),
            Ok(Command::Member("add 4 127.0.0.1:7 --learner".into()))
        );
        assert!(
            parse("get --STALE k").is_err_and(|e| e.contains("unknown flag \"--STALE\"")),
            "{:?}",
            parse("get --STALE k")
        );
    }

    #[test]
    fn unquoted_words_after_the_key_are_the_value_joined_by_one_space() {
        assert_eq!(
            parse("set greeting hello world"),
            set("greeting", "hello world")
        );
        assert_eq!(
            parse("set greeting  hello   world  "),
            set("greeting", "hello world")
        );
        assert_eq!(
            parse("set k one \"two  three\""),
            set("k", "one two  three")
        );
    }

    #[test]
    fn hash_is_a_comment_only_at_the_start_of_a_line() {
        assert_eq!(parse("# set k v"), Ok(Command::Nothing));
        assert_eq!(parse("   # note"), Ok(Command::Nothing));
        assert_eq!(parse("set color #fff"), set("color", "#fff"));
        assert_eq!(
            parse("set note issue #12 done"),
            set("note", "issue #12 done")
        );
        assert_eq!(parse("set k '#'"), set("k", "#"));
        assert_eq!(parse(r#"set k "a \# b""#), set("k", r"a \# b"));
    }

    #[test]
    fn get_flags_are_whole_words_before_the_key() {
        assert!(parse("get --staleUpper").is_err_and(|e| e.contains("unknown flag")));
        assert_eq!(parse("get -- --odd"), get("--odd", false));
        assert_eq!(parse("get --stale -- --odd"), get("--odd", true));
        assert_eq!(
            parse("get k --stale"),
            Err("usage: get [--stale] KEY".into())
        );
        assert_eq!(parse("get a b"), Err("usage: get [--stale] KEY".into()));
        assert_eq!(parse("get --stale"), Err("usage: get [--stale] KEY".into()));
    }
}
