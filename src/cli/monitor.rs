//! `raftkv monitor`: the cluster live in the terminal (ratatui), or once as a table or JSON.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant};

use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table};
use serde::Serialize;

use crate::client::{Client, StatusReport};
use crate::config::Config;
use crate::raft::NodeId;

use super::ConfigArg;

#[derive(clap::Args, Debug)]
pub struct MonitorArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// How often to poll every node's status.
    #[arg(long, default_value = "500ms", value_parser = super::parse_duration)]
    pub interval: Duration,
    /// Print the view once as a plain table and exit: code 0 if a quorum is up, 1 if not.
    #[arg(long)]
    pub once: bool,
    /// Print the view once as one JSON object and exit (same exit codes as --once).
    #[arg(long)]
    pub json: bool,
}

/// A node that applied this many entries fewer than the leader committed counts as lagging.
const LAG_WARN_ENTRIES: u64 = 100;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct NodeView {
    pub id: NodeId,
    pub addr: String,
    pub up: bool,
    pub role: Option<String>,
    /// Whether it votes (false: a learner), as the configuration in force says.
    pub voter: bool,
    pub term: Option<u64>,
    pub leader: Option<NodeId>,
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub last_log_index: Option<u64>,
    /// Entries the node has still to apply to catch up with the leader's commit index.
    pub lag: Option<u64>,
    /// The first entry of the log (those before it are compacted into the snapshot).
    pub first_log_index: Option<u64>,
    /// The snapshot the log starts after: its index and term.
    pub snapshot_index: Option<u64>,
    pub snapshot_term: Option<u64>,
    /// Bytes of the stored log, and of the whole data directory.
    pub log_bytes: Option<u64>,
    pub data_bytes: Option<u64>,
    /// When this node last sent or installed a snapshot (Unix ms), and how many it installed
    /// and sent since it started.
    pub last_snapshot_unix_ms: Option<u64>,
    pub snapshots_installed: Option<u64>,
    pub snapshots_sent: Option<u64>,
    /// From the node's /metrics (when its config entry has an http_port): p99 of its log
    /// fsyncs and of its round trips to its peers, over the last poll interval.
    pub fsync_p99_ms: Option<f64>,
    pub peer_rtt_p99_ms: Option<f64>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ClusterView {
    pub leader: Option<NodeId>,
    pub term: Option<u64>,
    pub up: usize,
    pub total: usize,
    pub quorum: bool,
    /// The configuration in force (the leader's, else the newest any node reports).
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// The entry of a membership change not yet committed.
    pub change_pending: Option<u64>,
    /// Derived from the leader's commit index between two polls.
    pub writes_per_sec: Option<f64>,
    pub nodes: Vec<NodeView>,
}

/// The leader's commit index at a point in time, for the write rate.
#[derive(Clone, Copy)]
pub struct CommitSample {
    at: Instant,
    leader: NodeId,
    term: u64,
    commit: u64,
}

pub fn build_view(
    reports: &[StatusReport],
    prev: Option<CommitSample>,
    now: Instant,
) -> (ClusterView, Option<CommitSample>) {
    let up: Vec<_> = reports
        .iter()
        .filter_map(|r| r.result.as_ref().ok())
        .collect();
    let leader = up
        .iter()
        .filter(|s| s.role == "leader")
        .max_by_key(|s| s.term);
    let leader_commit = leader.map(|l| l.commit_index);
    let config = leader
        .copied()
        .or_else(|| up.iter().copied().max_by_key(|s| (s.term, s.config_index)));
    let is_voter = |id: NodeId| {
        config
            .is_none_or(|c| c.members.is_empty() || c.members.iter().any(|m| m.id == id && m.voter))
    };
    let nodes: Vec<NodeView> = reports
        .iter()
        .map(|r| match &r.result {
            Ok(s) => NodeView {
                id: r.id,
                addr: r.addr.clone(),
                up: true,
                role: Some(s.role.clone()),
                voter: is_voter(r.id),
                term: Some(s.term),
                leader: (s.leader_id != 0).then_some(s.leader_id),
                commit_index: Some(s.commit_index),
                applied_index: Some(s.applied_index),
                last_log_index: Some(s.last_log_index),
                lag: leader_commit.map(|c| c.saturating_sub(s.applied_index)),
                first_log_index: Some(s.first_log_index),
                snapshot_index: Some(s.snapshot_index),
                snapshot_term: Some(s.snapshot_term),
                log_bytes: Some(s.log_bytes),
                data_bytes: Some(s.data_bytes),
                last_snapshot_unix_ms: (s.last_snapshot_unix_ms != 0)
                    .then_some(s.last_snapshot_unix_ms),
                snapshots_installed: Some(s.snapshots_installed),
                snapshots_sent: Some(s.snapshots_sent),
                fsync_p99_ms: None,
                peer_rtt_p99_ms: None,
                error: None,
            },
            Err(e) => NodeView {
                id: r.id,
                addr: r.addr.clone(),
                up: false,
                role: None,
                voter: is_voter(r.id),
                term: None,
                leader: None,
                commit_index: None,
                applied_index: None,
                last_log_index: None,
                lag: None,
                first_log_index: None,
                snapshot_index: None,
                snapshot_term: None,
                log_bytes: None,
                data_bytes: None,
                last_snapshot_unix_ms: None,
                snapshots_installed: None,
                snapshots_sent: None,
                fsync_p99_ms: None,
                peer_rtt_p99_ms: None,
                error: Some(e.clone()),
            },
        })
        .collect();
    let sample = leader.map(|l| CommitSample {
        at: now,
        leader: l.id,
        term: l.term,
        commit: l.commit_index,
    });
    let writes_per_sec = match (prev, sample) {
        (Some(p), Some(s)) if p.leader == s.leader && p.term == s.term && s.at > p.at => {
            Some(s.commit.saturating_sub(p.commit) as f64 / (s.at - p.at).as_secs_f64())
        }
        _ => None,
    };
    let voters: Vec<NodeId> = nodes.iter().filter(|n| n.voter).map(|n| n.id).collect();
    let learners: Vec<NodeId> = nodes.iter().filter(|n| !n.voter).map(|n| n.id).collect();
    // A quorum is of voters: learners do not count.
    let total = voters.len();
    let voters_up = nodes.iter().filter(|n| n.voter && n.up).count();
    let view = ClusterView {
        leader: leader.map(|l| l.id),
        term: leader
            .map(|l| l.term)
            .or_else(|| up.iter().map(|s| s.term).max()),
        up: voters_up,
        total,
        quorum: voters_up > total / 2 && leader.is_some(),
        voters,
        learners,
        change_pending: config.filter(|c| c.config_pending).map(|c| c.config_index),
        writes_per_sec,
        nodes,
    };
    (view, sample)
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or("-".to_string(), |v| v.to_string())
}

/// The summary line's parts; a narrow terminal wraps the line between them, never inside one.
fn summary_parts(v: &ClusterView) -> Vec<String> {
    let health = if v.quorum {
        "quorum ok"
    } else if v.up > v.total / 2 {
        "no leader"
    } else {
        "NO QUORUM"
    };
    let mut parts = vec![
        format!(
            "leader: {}",
            v.leader.map_or("none".to_string(), |l| format!("node {l}"))
        ),
        format!("term: {}", opt(v.term)),
        format!("{}/{} voters up, {health}", v.up, v.total),
        format!(
            "writes/s: {}",
            v.writes_per_sec
                .map_or("-".to_string(), |w| format!("{w:.0}"))
        ),
    ];
    if !v.learners.is_empty() {
        let ids: Vec<String> = v.learners.iter().map(u64::to_string).collect();
        parts.push(format!("learners: {}", ids.join(",")));
    }
    if let Some(i) = v.change_pending {
        parts.push(format!("membership change pending (entry {i})"));
    }
    parts
}

const SUMMARY_GAP: &str = "   ";

/// The summary as one line (`plain`'s first).
pub fn summary(v: &ClusterView) -> String {
    summary_parts(v).join(SUMMARY_GAP)
}

/// The table's columns, in the order they are shown.
const HEADERS: [&str; NCOLS] = [
    "ID",
    "ADDRESS",
    "STATE",
    "ROLE",
    "TERM",
    "LEADER",
    "COMMIT",
    "APPLIED",
    "LAST LOG",
    "LAG",
    "LOG FROM",
    "DISK",
    "FSYNC P99",
    "RTT P99",
];
const NCOLS: usize = 14;
/// The columns read from the nodes' `/metrics` (config `http_port`): left out when no node
/// shown has them.
const METRIC_COLUMNS: [usize; 2] = [12, 13];

/// The columns of numbers (and sizes): right-aligned, and never cut.
const NUMERIC: [bool; NCOLS] = [
    false, false, false, false, true, true, true, true, true, true, true, true, true, true,
];

/// The columns (indices into `HEADERS`) from the one a narrow terminal keeps longest to the one
/// it hides first, for an operator watching a cluster in trouble:
/// - ID: which node a row is about; nothing else in the row means anything without it.
/// - STATE: up or down, the first question.
/// - ROLE: who leads, a candidate (an election under way), a learner.
/// - TERM: terms climbing, or one node's term ahead of the others: elections, a cut-off node.
/// - COMMIT, APPLIED: progress; a commit index that stands still means writes do not get through.
/// - LAG: how far a node applies behind the leader's commit index (the two above, subtracted).
/// - FSYNC P99, RTT P99 (from the node's /metrics, over the last poll): a slow disk or network
///   shows here before it costs elections.
/// - LEADER: the leader each node believes in; the summary line already names the real one, so
///   this only tells a node that disagrees (partitioned, or not yet told).
/// - LAST LOG: entries a node holds beyond the commit index.
/// - DISK: the size of its data directory (a full disk stops a node: the unreachable list says).
/// - LOG FROM: where its log starts after the last snapshot (compaction).
/// - ADDRESS: fixed by the configuration file, and a down node's is in the unreachable list.
const PRIORITY: [usize; NCOLS] = [0, 2, 3, 4, 6, 7, 9, 12, 13, 5, 8, 11, 10, 1];

/// The spaces between two columns: ratatui's `Table` default, which `render` keeps; `plain`
/// uses the same.
const COLUMN_SPACING: u16 = 1;

/// Bytes as MiB or GiB, short.
fn size(b: Option<u64>) -> String {
    match b {
        None => "-".into(),
        Some(b) if b >= 10 << 30 => format!("{}G", b >> 30),
        Some(b) if b >= 1 << 30 => format!("{:.1}G", b as f64 / (1u64 << 30) as f64),
        Some(b) => format!("{}M", b.div_ceil(1 << 20)),
    }
}

fn cells(n: &NodeView) -> [String; NCOLS] {
    [
        n.id.to_string(),
        n.addr.clone(),
        if n.up { "up".into() } else { "down".into() },
        match (&n.role, n.voter) {
            (Some(r), true) => r.clone(),
            // A learner is a follower that does not vote.
            (Some(_), false) => "learner".into(),
            (None, _) => "-".into(),
        },
        opt(n.term),
        opt(n.leader),
        opt(n.commit_index),
        opt(n.applied_index),
        opt(n.last_log_index),
        opt(n.lag),
        opt(n.first_log_index),
        size(n.data_bytes),
        millis(n.fsync_p99_ms),
        millis(n.peer_rtt_p99_ms),
    ]
}

/// Milliseconds, short.
fn millis(ms: Option<f64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms >= 100.0 => format!("{ms:.0}ms"),
        Some(ms) if ms >= 10.0 => format!("{ms:.1}ms"),
        Some(ms) => format!("{ms:.2}ms"),
    }
}

/// The metric columns no row has a value in.
fn absent_columns(rows: &[[String; NCOLS]]) -> Vec<usize> {
    METRIC_COLUMNS
        .into_iter()
        .filter(|&c| rows.iter().all(|r| r[c] == "-"))
        .collect()
}

/// Terminal cells `s` takes.
fn text_width(s: &str) -> usize {
    Span::raw(s).width()
}

/// `s` cut to `max` terminal cells, the cut marked with an ellipsis.
fn ellipsize(s: &str, max: usize) -> String {
    if text_width(s) <= max {
        return s.to_string();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in s.chars() {
        let w = text_width(c.encode_utf8(&mut [0; 4]));
        if used + w + 1 > max {
            break;
        }
        out.push(c);
        used += w;
    }
    if max > 0 {
        out.push('…');
    }
    out
}

/// `parts` on as few lines of `width` cells as they go on whole, `SUMMARY_GAP` between two on
/// a line (a part wider than a whole line is cut with an ellipsis).
fn wrap_parts(parts: &[String], width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for p in parts {
        match lines.last_mut() {
            Some(l) if text_width(l) + SUMMARY_GAP.len() + text_width(p) <= width => {
                l.push_str(SUMMARY_GAP);
                l.push_str(p);
            }
            _ => lines.push(ellipsize(p, width)),
        }
    }
    lines
}

/// Each column's width: its header's or its widest cell's, whichever is wider.
fn column_widths(rows: &[[String; NCOLS]]) -> [usize; NCOLS] {
    std::array::from_fn(|c| {
        rows.iter()
            .fold(text_width(HEADERS[c]), |w, r| w.max(text_width(&r[c])))
    })
}

/// Which columns go whole into `width` cells with `COLUMN_SPACING` between them, the least
/// important (`PRIORITY`) left out first: those shown, in table order, and those hidden, most
/// important first.
fn fit_columns(
    widths: &[usize; NCOLS],
    width: usize,
    absent: &[usize],
) -> (Vec<usize>, Vec<usize>) {
    let order: Vec<usize> = PRIORITY
        .into_iter()
        .filter(|c| !absent.contains(c))
        .collect();
    let mut used = 0;
    let mut kept = 0;
    for (k, &c) in order.iter().enumerate() {
        let need = widths[c]
            + if k == 0 {
                0
            } else {
                usize::from(COLUMN_SPACING)
            };
        if used + need > width {
            break;
        }
        used += need;
        kept = k + 1;
    }
    let mut shown = order[..kept].to_vec();
    shown.sort_unstable();
    (shown, order[kept..].to_vec())
}

/// The view as plain text (for `--once`): every column, each as wide as its widest cell.
pub fn plain(v: &ClusterView) -> String {
    let rows: Vec<[String; NCOLS]> = v.nodes.iter().map(cells).collect();
    let widths = column_widths(&rows);
    let absent = absent_columns(&rows);
    let gap = " ".repeat(usize::from(COLUMN_SPACING));
    let line = |c: &[String; NCOLS]| {
        let mut s = String::new();
        for (i, cell) in c.iter().enumerate() {
            if absent.contains(&i) {
                continue;
            }
            if i > 0 {
                s.push_str(&gap);
            }
            let pad = " ".repeat(widths[i].saturating_sub(text_width(cell)));
            if NUMERIC[i] {
                s.push_str(&pad);
                s.push_str(cell);
            } else {
                s.push_str(cell);
                s.push_str(&pad);
            }
        }
        s.trim_end().to_string()
    };
    let mut out = summary(v);
    out.push('\n');
    out.push_str(&line(&HEADERS.map(String::from)));
    for (n, c) in v.nodes.iter().zip(&rows) {
        out.push('\n');
        out.push_str(&line(c));
        if let Some(e) = &n.error {
            out.push_str(&format!("  ({e})"));
        }
    }
    out
}

fn row_style(n: &NodeView) -> Style {
    if !n.up {
        Style::new().fg(Color::Red)
    } else if n.role.as_deref() == Some("leader") {
        Style::new().fg(Color::Green).add_modifier(Modifier::BOLD)
    } else if n.lag.is_some_and(|l| l > LAG_WARN_ENTRIES) || n.leader.is_none() {
        Style::new().fg(Color::Yellow)
    } else {
        Style::new()
    }
}

fn to_u16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// Draws the dashboard. A terminal too narrow for every column hides whole columns, the least
/// important first (`PRIORITY`), and one too short for every node hides the last rows: the
/// table's bottom border says which. Numbers are never cut; a down node's error may be, with
/// an ellipsis.
pub fn render(f: &mut Frame, v: &ClusterView, title: &str) {
    let area = f.area();
    let summary_lines = wrap_parts(&summary_parts(v), usize::from(area.width.saturating_sub(2)));
    let top_height = to_u16(summary_lines.len()).saturating_add(2);
    let down: Vec<(&NodeView, &String)> = v
        .nodes
        .iter()
        .filter_map(|n| n.error.as_ref().map(|e| (n, e)))
        .collect();
    // Between the summary and the footer line: the table (borders, header, a row per node) and
    // the unreachable list (borders, a line per down node). When both do not fit, the list
    // gives way first, down to one line (the table shows those nodes down too), then the table.
    let room = area.height.saturating_sub(top_height.saturating_add(1));
    let table_wants = to_u16(v.nodes.len()).saturating_add(3);
    let errors_want = if down.is_empty() {
        0
    } else {
        to_u16(down.len()).saturating_add(2)
    };
    let errors_height = if table_wants.saturating_add(errors_want) <= room {
        errors_want
    } else if down.is_empty() || room < 4 + 3 {
        // No room for the list and a table of at least one row.
        0
    } else {
        room.saturating_sub(table_wants).clamp(3, errors_want)
    };
    let [top, table, problems, bottom] = Layout::vertical([
        Constraint::Length(top_height),
        Constraint::Length(room - errors_height),
        Constraint::Length(errors_height),
        Constraint::Length(1),
    ])
    .areas(area);

    let health_style = if v.quorum {
        Style::new().fg(Color::Green)
    } else {
        Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
    };
    let summary: Vec<Line> = summary_lines
        .into_iter()
        .map(|l| Line::from(Span::styled(l, health_style)))
        .collect();
    f.render_widget(
        Paragraph::new(summary)
            .block(Block::bordered().title(format!(" raftkv monitor: {title} "))),
        top,
    );

    let shown_rows = usize::from(table.height.saturating_sub(3)).min(v.nodes.len());
    let (shown_nodes, hidden_nodes) = v.nodes.split_at(shown_rows);
    let rows: Vec<[String; NCOLS]> = shown_nodes.iter().map(cells).collect();
    let widths = column_widths(&rows);
    let (columns, hidden_columns) = fit_columns(
        &widths,
        usize::from(table.width.saturating_sub(2)),
        &absent_columns(&rows),
    );
    let cell = |i: usize, s: String| {
        let line = Line::from(s);
        Cell::from(if NUMERIC[i] {
            line.right_aligned()
        } else {
            line
        })
    };
    let header = Row::new(columns.iter().map(|&i| cell(i, HEADERS[i].to_string())))
        .add_modifier(Modifier::BOLD);
    let table_rows = shown_nodes
        .iter()
        .zip(rows)
        .map(|(n, r)| Row::new(columns.iter().map(|&i| cell(i, r[i].clone()))).style(row_style(n)));
    let constraints: Vec<Constraint> = columns
        .iter()
        .map(|&i| Constraint::Length(to_u16(widths[i])))
        .collect();

    let mut notices = Vec::new();
    match hidden_nodes {
        [] => {}
        [n] => notices.push(format!("1 node not shown: {}", n.id)),
        ns => {
            let ids: Vec<String> = ns.iter().map(|n| n.id.to_string()).collect();
            notices.push(format!("{} nodes not shown: {}", ns.len(), ids.join(", ")));
        }
    }
    if !hidden_columns.is_empty() {
        let names: Vec<&str> = hidden_columns.iter().map(|&i| HEADERS[i]).collect();
        notices.push(format!(
            "{} column{} hidden (widen the terminal): {}",
            names.len(),
            if names.len() == 1 { "" } else { "s" },
            names.join(", ")
        ));
    }
    if errors_height == 0 && !down.is_empty() {
        notices.push(match down.len() {
            1 => "no room for why a node is down".to_string(),
            n => format!("no room for why {n} nodes are down"),
        });
    }
    let mut block = Block::bordered().title(" nodes ");
    if !notices.is_empty() {
        let notice = ellipsize(
            &notices.join(" · "),
            usize::from(table.width.saturating_sub(4)),
        );
        block = block.title_bottom(Line::from(format!(" {notice} ")).yellow());
    }
    f.render_widget(
        Table::new(table_rows, constraints)
            .column_spacing(COLUMN_SPACING)
            .header(header)
            .block(block),
        table,
    );

    if errors_height > 0 {
        let width = usize::from(problems.width.saturating_sub(2));
        let lines: Vec<Line> = down
            .iter()
            .take(usize::from(problems.height.saturating_sub(2)))
            .map(|(n, e)| {
                Line::from(ellipsize(
                    &format!("node {} ({}): {e}", n.id, n.addr),
                    width,
                ))
                .red()
            })
            .collect();
        let title = match down.len() - lines.len() {
            0 => " unreachable ".to_string(),
            more => format!(" unreachable, {more} not shown "),
        };
        f.render_widget(
            Paragraph::new(lines).block(Block::bordered().title(title)),
            problems,
        );
    }
    f.render_widget(Line::from("q / Esc / Ctrl-C: quit").dim(), bottom);
}

/// Why node `id` is down, as far as its log file `log` on this machine tells: the error it
/// stopped with (a full or read-only disk and a damaged data directory named as such), or that
/// it stopped cleanly. `None` without a log here, or when the log's last word is that the node
/// was listening (killed, paused or cut off: the connection error says which it looks like).
pub fn down_reason(log: &Path, id: NodeId) -> Option<String> {
    const TAIL_BYTES: u64 = 256 << 10;
    let mut f = std::fs::File::open(log).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))
        .ok()?;
    let mut tail = Vec::new();
    f.take(TAIL_BYTES).read_to_end(&mut tail).ok()?;
    let tail = String::from_utf8_lossy(&tail);
    let stopped = format!("node {id} stopped");
    let last = tail
        .lines()
        .rev()
        .find(|l| l.contains(&stopped) || l.contains(" listening"))?;
    let (_, what) = last.split_once(&stopped)?;
    let at = last.split_whitespace().next().unwrap_or("");
    if what.starts_with(" cleanly") {
        return Some(format!("stopped cleanly at {at}"));
    }
    let why = what.trim_start_matches(':').trim();
    let kind = if why.contains("No space left on device") || why.contains("os error 28") {
        "disk full: "
    } else if why.contains("Read-only file system") || why.contains("os error 30") {
        "disk read-only: "
    } else if why.contains("is damaged") {
        "data directory damaged: "
    } else {
        ""
    };
    let mut why = why.to_string();
    if why.chars().count() > 240 {
        why = why.chars().take(240).collect::<String>() + "...";
    }
    Some(format!(
        "{kind}stopped at {at} with: {why} (see {})",
        log.display()
    ))
}

/// Adds to each unreachable node's error what its log file says, when it is on this machine.
fn explain_down(reports: &mut [StatusReport], cfg: &Config) {
    for r in reports {
        if let Err(e) = &mut r.result
            && let Some(why) = down_reason(&cfg.log_dir().join(format!("node-{}.log", r.id)), r.id)
        {
            *e = format!("{e}; {why}");
        }
    }
}

/// Reads the key metrics of every node that serves them, and keeps each node's last
/// histograms so that the p99s cover the last poll interval.
struct MetricsPoller {
    client: super::scrape::HttpClient,
    last: std::collections::BTreeMap<NodeId, super::scrape::KeyMetrics>,
}

impl MetricsPoller {
    fn new(dialer: &crate::security::Dialer) -> MetricsPoller {
        MetricsPoller {
            client: super::scrape::http_client(dialer),
            last: Default::default(),
        }
    }

    /// Scrapes (concurrently) the nodes whose config entry has an `http_port`, and fills in
    /// their p99s in `view`.
    async fn poll(&mut self, cfg: &Config, timeout: Duration, view: &mut ClusterView) {
        use super::scrape;
        let targets: Vec<(NodeId, String, u16)> = cfg
            .nodes
            .iter()
            .filter_map(|n| n.http_port.map(|p| (n.id, n.host.clone(), p)))
            .collect();
        if targets.is_empty() {
            return;
        }
        let tasks: Vec<_> = targets
            .into_iter()
            .map(|(id, host, port)| {
                let client = self.client.clone();
                tokio::spawn(
                    async move { (id, scrape::fetch(&client, &host, port, timeout).await) },
                )
            })
            .collect();
        for t in tasks {
            let Ok((id, Ok(now))) = t.await else {
                continue;
            };
            let before = self.last.get(&id);
            let p99 = |now: &scrape::Buckets, before: Option<&scrape::Buckets>| {
                // Over the last interval if anything happened in it, else since the start.
                scrape::quantile(&scrape::since(now, before), 0.99)
                    .or_else(|| scrape::quantile(now, 0.99))
                    .map(|s| s * 1000.0)
            };
            let fsync = p99(&now.fsync, before.map(|b| &b.fsync));
            let rtt = p99(&now.peer_rtt, before.map(|b| &b.peer_rtt));
            if let Some(n) = view.nodes.iter_mut().find(|n| n.id == id && n.up) {
                n.fsync_p99_ms = fsync;
                n.peer_rtt_p99_ms = rtt;
            }
            self.last.insert(id, now);
        }
    }
}

pub async fn run(args: MonitorArgs) -> anyhow::Result<()> {
    let cfg = Config::load(&args.config.config)?;
    let dialer = args.config.dialer(&cfg)?;
    let mut client = Client::discover_with(cfg.addrs(), dialer.clone()).await;
    // Each node gets most of an interval to answer; they are asked concurrently.
    let per_node = args.interval.mul_f64(0.8).max(Duration::from_millis(50));
    let mut metrics = MetricsPoller::new(&dialer);
    if args.once || args.json {
        let first = client.status_all(per_node).await;
        let (mut first_view, sample) = build_view(&first, None, Instant::now());
        metrics.poll(&cfg, per_node, &mut first_view).await;
        tokio::time::sleep(args.interval).await;
        let mut reports = client.status_all(per_node).await;
        explain_down(&mut reports, &cfg);
        let (mut view, _) = build_view(&reports, sample, Instant::now());
        metrics.poll(&cfg, per_node, &mut view).await;
        if args.json {
            outln!("{}", serde_json::to_string(&view)?);
        } else {
            outln!("{}", plain(&view));
        }
        if !view.quorum {
            anyhow::bail!(
                "the cluster has no quorum ({} of {} nodes up, leader: {})",
                view.up,
                view.total,
                opt(view.leader)
            );
        }
        return Ok(());
    }

    let mut terminal = ratatui::try_init()?;
    let title = args.config.config.display().to_string();
    let result = async {
        let mut sample = None;
        let mut polls = 0u64;
        let mut ticker = tokio::time::interval(args.interval);
        let (keys_tx, mut keys_rx) = tokio::sync::mpsc::unbounded_channel();
        // Key presses are read on a blocking thread so that a slow node never delays quitting.
        std::thread::spawn(move || {
            loop {
                match event::poll(Duration::from_millis(100)) {
                    Ok(true) => match event::read() {
                        Ok(Event::Key(k)) if k.kind == KeyEventKind::Press => {
                            let quit = matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                                || (k.code == KeyCode::Char('c')
                                    && k.modifiers.contains(KeyModifiers::CONTROL));
                            if quit && keys_tx.send(()).is_err() {
                                return;
                            }
                            if quit {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    },
                    Ok(false) => {
                        if keys_tx.is_closed() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        loop {
            tokio::select! {
                _ = keys_rx.recv() => break,
                _ = ticker.tick() => {
                    polls += 1;
                    if polls.is_multiple_of(10) {
                        // Members added or removed since the monitor started.
                        client.refresh_members().await;
                    }
                    let mut reports = client.status_all(per_node).await;
                    explain_down(&mut reports, &cfg);
                    let (mut view, s) = build_view(&reports, sample, Instant::now());
                    metrics.poll(&cfg, per_node, &mut view).await;
                    sample = s.or(sample);
                    terminal.draw(|f| render(f, &view, &title))?;
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::StatusResponse;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    fn up(id: NodeId, role: &str, leader: NodeId, commit: u64, applied: u64) -> StatusReport {
        StatusReport {
            id,
            addr: format!("127.0.0.1:{}", 5000 + id),
            result: Ok(StatusResponse {
                id,
                role: role.into(),
                term: 3,
                leader_id: leader,
                commit_index: commit,
                applied_index: applied,
                last_log_index: commit,
                ..StatusResponse::default()
            }),
        }
    }

    #[test]
    fn a_down_nodes_log_tells_why_it_stopped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("node-2.log");
        let reason = |text: &str| {
            std::fs::write(&log, text).expect("write");
            down_reason(&log, 2)
        };
        assert_eq!(down_reason(&dir.path().join("none.log"), 2), None);
        let started = "2026-12-01T10:00:00.000001Z  INFO raftkv::node: listening node=2 local=127.0.0.1:5002\n";
        assert_eq!(reason(started), None, "killed or paused: nothing to add");
        let full = format!(
            "{started}2026-12-01T10:05:00.000002Z ERROR raftkv::cli::node: node 2 stopped: persisting the Raft log: data directory data/node-2: writing the log: No space left on device (os error 28)\n"
        );
        let why = reason(&full).expect("a reason");
        assert!(
            why.starts_with(
                "disk full: stopped at 2026-12-01T10:05:00.000002Z with: persisting the Raft log"
            ),
            "{why}"
        );
        assert!(why.contains("node-2.log"), "{why}");
        let clean = format!(
            "{started}2026-12-01T10:06:00.000003Z  INFO raftkv::cli::node: node 2 stopped cleanly\n"
        );
        assert_eq!(
            reason(&clean).as_deref(),
            Some("stopped cleanly at 2026-12-01T10:06:00.000003Z")
        );
        // Restarted since it stopped: the old error no longer explains anything.
        assert_eq!(reason(&format!("{full}{started}")), None);
        let damaged = format!(
            "{started}2026-12-01T10:07:00Z ERROR raftkv::cli::node: node 2 stopped: data directory data/node-2 is damaged: its journal cannot be read back\n"
        );
        assert!(
            reason(&damaged)
                .expect("a reason")
                .starts_with("data directory damaged: ")
        );
    }

    fn down(id: NodeId) -> StatusReport {
        StatusReport {
            id,
            addr: format!("127.0.0.1:{}", 5000 + id),
            result: Err("unreachable (connection refused)".into()),
        }
    }

    fn screen(v: &ClusterView) -> String {
        screen_at(v, 110, 16)
    }

    fn style_of_row(v: &ClusterView, row_text: &str) -> Style {
        let mut t = Terminal::new(TestBackend::new(110, 16)).expect("terminal");
        t.draw(|f| render(f, v, "config.json")).expect("draw");
        let buf = t.backend().buffer().clone();
        for y in 0..buf.area.height {
            let line: String = (0..buf.area.width)
                .map(|x| buf[(x, y)].symbol().to_string())
                .collect();
            if let Some(x) = line.find(row_text) {
                return buf[(x as u16, y)].style();
            }
        }
        panic!("row {row_text:?} not on screen");
    }

    #[test]
    fn healthy_cluster_shows_leader_quorum_and_rate() {
        let t0 = Instant::now();
        let r1 = [
            up(1, "leader", 1, 100, 100),
            up(2, "follower", 1, 100, 100),
            up(3, "follower", 1, 100, 90),
        ];
        let (_, s) = build_view(&r1, None, t0);
        let r2 = [
            up(1, "leader", 1, 600, 600),
            up(2, "follower", 1, 600, 600),
            up(3, "follower", 1, 600, 400),
        ];
        let (v, _) = build_view(&r2, s, t0 + Duration::from_millis(500));
        assert_eq!(v.leader, Some(1));
        assert!(v.quorum);
        assert_eq!(v.writes_per_sec.map(|w| w.round()), Some(1000.0));
        assert_eq!(v.nodes[2].lag, Some(200));
        let text = screen(&v);
        assert!(text.contains("leader: node 1"), "{text}");
        assert!(text.contains("3/3 voters up, quorum ok"), "{text}");
        assert!(text.contains("writes/s: 1000"), "{text}");
        assert_eq!(
            style_of_row(&v, "127.0.0.1:5001").fg,
            Some(Color::Green),
            "the leader stands out"
        );
        assert_eq!(
            style_of_row(&v, "127.0.0.1:5003").fg,
            Some(Color::Yellow),
            "a lagging node is coloured"
        );
    }

    #[test]
    fn dead_node_is_down_in_red_with_its_error() {
        let r = [
            up(1, "leader", 1, 10, 10),
            down(2),
            up(3, "follower", 1, 10, 10),
        ];
        let (v, _) = build_view(&r, None, Instant::now());
        assert!(v.quorum);
        assert_eq!(v.up, 2);
        let text = screen(&v);
        assert!(text.contains("2/3 voters up, quorum ok"), "{text}");
        assert!(text.contains("down"), "{text}");
        assert!(
            text.contains("node 2 (127.0.0.1:5002): unreachable (connection refused)"),
            "{text}"
        );
        assert_eq!(style_of_row(&v, "127.0.0.1:5002").fg, Some(Color::Red));
        assert!(plain(&v).contains("(unreachable (connection refused))"));
    }

    #[test]
    fn no_leader_means_no_quorum() {
        let r = [up(1, "follower", 0, 10, 10), down(2), down(3)];
        let (v, _) = build_view(&r, None, Instant::now());
        assert!(!v.quorum);
        assert_eq!(v.leader, None);
        let text = screen(&v);
        assert!(text.contains("leader: none"), "{text}");
        assert!(text.contains("1/3 voters up, NO QUORUM"), "{text}");
        let json = serde_json::to_value(&v).expect("json");
        assert_eq!(json["quorum"], false);
        assert_eq!(json["nodes"][1]["up"], false);
    }

    fn screen_at(v: &ClusterView, width: u16, height: u16) -> String {
        let mut t = Terminal::new(TestBackend::new(width, height)).expect("terminal");
        t.draw(|f| render(f, v, "config.json")).expect("draw");
        let buf = t.backend().buffer().clone();
        let mut s = String::new();
        for y in 0..buf.area.height {
            for x in 0..buf.area.width {
                s.push_str(buf[(x, y)].symbol());
            }
            s.push('\n');
        }
        s
    }

    /// Five nodes at commit index 776240; the followers have applied 776238.
    fn busy_cluster(nodes: NodeId) -> ClusterView {
        let r: Vec<StatusReport> = (1..=nodes)
            .map(|id| {
                if id == 1 {
                    up(1, "leader", 1, 776240, 776240)
                } else {
                    up(id, "follower", 1, 776240, 776238)
                }
            })
            .collect();
        build_view(&r, None, Instant::now()).0
    }

    /// The table's header line.
    fn header(text: &str) -> &str {
        text.lines()
            .find(|l| l.starts_with("│ID "))
            .unwrap_or_else(|| panic!("no header: {text}"))
    }

    #[test]
    fn a_narrow_terminal_hides_whole_columns_by_priority_and_says_so() {
        let v = busy_cluster(5);
        let rows_with = |text: &str, s: &str| text.lines().filter(|l| l.contains(s)).count();

        let text = screen_at(&v, 60, 15);
        // Every node's commit index in full (it used to show as 7762).
        assert_eq!(rows_with(&text, "776240"), 5, "{text}");
        assert_eq!(rows_with(&text, "776238"), 4, "{text}");
        let shown = [
            "ID", "STATE", "ROLE", "TERM", "COMMIT", "APPLIED", "LAG", "LEADER", "LAST LOG",
        ];
        for h in shown {
            assert!(header(&text).contains(h), "{h}: {text}");
        }
        for h in ["DISK", "LOG FROM", "ADDRESS"] {
            assert!(!header(&text).contains(h), "{h}: {text}");
        }
        assert!(!text.contains("127.0.0.1"), "{text}");
        assert!(
            text.contains("3 columns hidden (widen the terminal): DISK, LOG FROM"),
            "{text}"
        );

        let text = screen_at(&v, 40, 15);
        assert_eq!(rows_with(&text, "776240"), 5, "{text}");
        assert_eq!(rows_with(&text, "776238"), 4, "{text}");
        for h in ["ID", "STATE", "ROLE", "TERM", "COMMIT", "APPLIED"] {
            assert!(header(&text).contains(h), "{h}: {text}");
        }
        for h in ["LAG", "LAST LOG", "ADDRESS", "DISK"] {
            assert!(!header(&text).contains(h), "{h}: {text}");
        }
        assert!(text.contains("6 columns hidden"), "{text}");
        assert!(!text.contains("not shown"), "all five nodes fit: {text}");

        let text = screen_at(&v, 200, 40);
        for (i, h) in HEADERS.iter().enumerate() {
            // No node serves /metrics here: its columns are left out, not "hidden".
            assert_eq!(
                header(&text).contains(h),
                !METRIC_COLUMNS.contains(&i),
                "{h}: {text}"
            );
        }
        assert_eq!(rows_with(&text, "127.0.0.1:500"), 5, "{text}");
        assert!(!text.contains("hidden"), "{text}");
        assert!(!text.contains("not shown"), "{text}");

        // Nodes that serve /metrics: their fsync and round-trip p99s.
        let mut v = v;
        for n in &mut v.nodes {
            n.fsync_p99_ms = Some(3.25);
            n.peer_rtt_p99_ms = Some(0.4);
        }
        let text = screen_at(&v, 200, 40);
        for h in HEADERS {
            assert!(header(&text).contains(h), "{h}: {text}");
        }
        assert_eq!(rows_with(&text, "3.25ms"), 5, "{text}");
        assert_eq!(rows_with(&text, "0.40ms"), 5, "{text}");
        assert!(plain(&v).contains("FSYNC P99"));
        assert!(!text.contains("hidden"), "{text}");
    }

    #[test]
    fn a_short_terminal_says_which_nodes_are_not_shown() {
        let v = busy_cluster(9);
        let text = screen_at(&v, 60, 15);
        assert!(text.contains("2 nodes not shown: 8, 9"), "{text}");
        let rows: Vec<&str> = text.lines().filter(|l| l.contains("776240")).collect();
        assert_eq!(rows.len(), 7, "{text}");
        for (id, row) in (1..=7).zip(&rows) {
            assert!(row.starts_with(&format!("│{id} ")), "{text}");
        }

        let text = screen_at(&v, 200, 40);
        assert_eq!(
            text.lines().filter(|l| l.contains("776240")).count(),
            9,
            "{text}"
        );
        assert!(!text.contains("not shown"), "{text}");
    }

    #[test]
    fn a_long_down_reason_is_cut_with_an_ellipsis_but_no_number_is() {
        let long = |id: NodeId| StatusReport {
            id,
            addr: format!("127.0.0.1:{}", 5000 + id),
            result: Err(format!(
                "unreachable (connection refused); disk full: stopped at 2026-12-01T10:05:00.000002Z with: persisting the Raft log: data directory data/node-{id}: writing the log: No space left on device (os error 28) (see logs/node-{id}.log)"
            )),
        };
        let r = [
            up(1, "leader", 1, 776240, 776240),
            long(2),
            up(3, "follower", 1, 776240, 776240),
            long(4),
            up(5, "follower", 1, 776240, 776240),
        ];
        let (v, _) = build_view(&r, None, Instant::now());
        let text = screen_at(&v, 60, 15);
        let line = text
            .lines()
            .find(|l| l.contains("node 2 (127.0.0.1:5002): unreachable"))
            .unwrap_or_else(|| panic!("node 2's error: {text}"));
        assert!(line.ends_with("…│"), "{text}");
        // No room for node 4's error: said so.
        assert!(!text.contains("node 4 (127.0.0.1:5004)"), "{text}");
        assert!(text.contains("unreachable, 1 not shown"), "{text}");
        // The table keeps its numbers whole.
        assert!(
            text.lines().filter(|l| l.contains("776240")).count() >= 2,
            "{text}"
        );
        assert!(
            !text
                .lines()
                .any(|l| l.contains("7762") && !l.contains("776240")),
            "{text}"
        );
    }
}
