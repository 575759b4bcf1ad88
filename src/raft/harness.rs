//! A synchronous in-memory cluster for unit tests: every core's `Ready` is executed at once and
//! messages are delivered in order, except over links that are cut.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

use super::*;

pub type MessageFilter = Box<dyn Fn(&Message) -> bool>;

pub struct Net {
    pub nodes: BTreeMap<NodeId, Raft<MemLogStore>>,
    /// Directed links that drop everything.
    pub cut: BTreeSet<(NodeId, NodeId)>,
    /// Every message delivered, for assertions.
    pub delivered: Vec<Message>,
    /// Applied commands per node.
    pub applied: BTreeMap<NodeId, Vec<Entry>>,
    pub read_states: BTreeMap<NodeId, Vec<ReadState>>,
    pub dropped_reads: BTreeMap<NodeId, Vec<u64>>,
    /// Messages for which this returns false are dropped.
    pub filter: Option<MessageFilter>,
    queue: VecDeque<Message>,
    /// Snapshots in flight or staged: (from, to, index) -> the sender's applied entries.
    snapshot_data: BTreeMap<(NodeId, NodeId, LogIndex), Vec<Entry>>,
    /// Snapshots installed: (node, snapshot).
    pub installed: Vec<(NodeId, SnapshotMeta)>,
    /// Snapshot transfers that failed, by receiver.
    pub failed_snapshots: Vec<NodeId>,
}

pub fn config(id: NodeId, n: u64) -> Config {
    let mut c = Config::new(id, (1..=n).collect(), id * 7919);
    c.election_ticks_min = 10;
    c.election_ticks_max = 20;
    c.heartbeat_ticks = 1;
    c
}

pub fn entry(index: LogIndex, term: Term) -> Entry {
    Entry {
        index,
        term,
        kind: EntryKind::Normal,
        data: Bytes::from(format!("{index}@{term}")),
    }
}

impl Net {
    pub fn new(n: u64) -> Net {
        Net::with(n, config)
    }

    pub fn with(n: u64, cfg: impl Fn(NodeId, u64) -> Config) -> Net {
        let nodes = (1..=n)
            .map(|id| {
                let r = Raft::new(cfg(id, n), MemLogStore::new(), HardState::default(), 0)
                    .expect("valid config");
                (id, r)
            })
            .collect();
        Net {
            nodes,
            cut: BTreeSet::new(),
            delivered: Vec::new(),
            applied: BTreeMap::new(),
            read_states: BTreeMap::new(),
            dropped_reads: BTreeMap::new(),
            filter: None,
            queue: VecDeque::new(),
            snapshot_data: BTreeMap::new(),
            installed: Vec::new(),
            failed_snapshots: Vec::new(),
        }
    }

    /// Replaces node `id` by a core with the given durable log and term.
    pub fn set_log(&mut self, id: NodeId, cfg: Config, log: &[Entry], term: Term) {
        let mut store = MemLogStore::new();
        store.append(log);
        let hs = HardState {
            term,
            vote: 0,
            commit: 0,
        };
        self.nodes
            .insert(id, Raft::new(cfg, store, hs, 0).expect("valid config"));
    }

    pub fn node(&mut self, id: NodeId) -> &mut Raft<MemLogStore> {
        self.nodes.get_mut(&id).expect("node exists")
    }

    pub fn isolate(&mut self, id: NodeId) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for other in ids {
            if other != id {
                self.cut.insert((id, other));
                self.cut.insert((other, id));
            }
        }
    }

    pub fn heal(&mut self) {
        self.cut.clear();
    }

    /// Executes every pending `Ready` and delivers messages until nothing moves.
    pub fn settle(&mut self) {
        for _ in 0..100_000 {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                self.run_ready(id);
            }
            let Some(m) = self.queue.pop_front() else {
                if self.nodes.values().any(|r| r.has_ready()) {
                    continue; // e.g. committed entries handed out in slices
                }
                return;
            };
            let lost =
                self.cut.contains(&(m.from, m.to)) || self.filter.as_ref().is_some_and(|f| !f(&m));
            if let MessageBody::InstallSnapshot { snapshot, .. } = m.body {
                // The transfer (runtime work) ends here: report it to the sender.
                let data = self.snapshot_data.remove(&(m.from, m.to, snapshot.index));
                if let Some(sender) = self.nodes.get_mut(&m.from) {
                    sender.report_snapshot(m.to, !lost);
                }
                if lost {
                    self.failed_snapshots.push(m.to);
                    continue;
                }
                if let Some(data) = data {
                    self.snapshot_data.insert((0, m.to, snapshot.index), data);
                }
            }
            if lost {
                continue;
            }
            self.delivered.push(m.clone());
            let (to, snap) = match m.body {
                MessageBody::InstallSnapshot { snapshot, .. } => (m.to, Some(snapshot)),
                _ => (m.to, None),
            };
            if let Some(r) = self.nodes.get_mut(&m.to) {
                r.step(m).expect("step");
                r.check_invariants();
                // A staged snapshot the core did not accept is discarded.
                if let Some(snap) = snap
                    && r.pending_snapshot() != Some(snap)
                {
                    self.snapshot_data.remove(&(0, to, snap.index));
                }
            }
        }
        panic!("the network did not settle");
    }

    fn run_ready(&mut self, id: NodeId) {
        let r = self.nodes.get_mut(&id).expect("node exists");
        if !r.has_ready() {
            // has_ready must not hide work.
            let rd = r.ready().expect("ready");
            assert!(
                rd.is_empty() && !rd.must_sync,
                "node {id}: has_ready() was false but ready() had {rd:?}"
            );
            r.advance();
            return;
        }
        let rd = r.ready().expect("ready");
        if let Some(snap) = rd.snapshot {
            let data = self
                .snapshot_data
                .remove(&(0, id, snap.index))
                .expect("a staged snapshot");
            r.store_mut().install_snapshot(snap);
            self.applied.insert(id, data);
            self.installed.push((id, snap));
        }
        r.store_mut().append(&rd.entries);
        self.queue.extend(rd.messages);
        for to in rd.snapshot_sends {
            // The runtime streams its state machine as it is now.
            let index = r.applied_index();
            let term = r.term_at(index).expect("the applied entry's term is known");
            let data = self.applied.get(&id).cloned().unwrap_or_default();
            let snapshot = SnapshotMeta { index, term };
            let config = r.config_at(index).cloned().unwrap_or_default();
            self.snapshot_data.insert((id, to, index), data);
            self.queue.push_back(Message {
                from: id,
                to,
                term: r.term(),
                body: MessageBody::InstallSnapshot { snapshot, config },
            });
        }
        self.applied
            .entry(id)
            .or_default()
            .extend(rd.committed_entries);
        self.read_states
            .entry(id)
            .or_default()
            .extend(rd.read_states);
        self.dropped_reads
            .entry(id)
            .or_default()
            .extend(rd.dropped_reads);
        r.advance();
        r.check_invariants();
    }

    /// Ticks every node once, then settles.
    pub fn tick_all(&mut self) {
        for r in self.nodes.values_mut() {
            r.tick();
        }
        self.settle();
    }

    /// Makes `id` campaign now and settles.
    pub fn elect(&mut self, id: NodeId) {
        self.node(id).hup();
        self.settle();
    }

    pub fn propose(&mut self, id: NodeId, data: &str) -> Result<(LogIndex, Term), Error> {
        let r = self.propose_no_settle(id, data);
        self.settle();
        r
    }

    pub fn propose_no_settle(&mut self, id: NodeId, data: &str) -> Result<(LogIndex, Term), Error> {
        self.node(id).propose(Bytes::from(data.to_string()))
    }

    pub fn log_of(&mut self, id: NodeId) -> Vec<(LogIndex, Term)> {
        let r = self.node(id);
        let last = r.last_index();
        r.entries(1, last + 1)
            .expect("entries")
            .iter()
            .map(|e| (e.index, e.term))
            .collect()
    }

    pub fn leaders(&self) -> Vec<NodeId> {
        self.nodes
            .values()
            .filter(|r| r.role() == Role::Leader)
            .map(|r| r.id())
            .collect()
    }
}
