//! The simulated cluster: nodes, network, faults and clients, all driven by one seeded RNG.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use bytes::Bytes;
use raftkv::raft::{
    ClusterConfig, ConfChange, Config, Entry, EntryKind, HardState, LogIndex, LogStore,
    MemLogStore, Message, MessageBody, NodeId, Raft, Role, SnapshotMeta, Term,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::checker::Checker;

/// One tick is 10 time units (10 ms with the default 150-300 ms election timeout).
const TICK: u64 = 10;
/// How long faults are injected, then how long a healed cluster has to recover.
const FAULT_PHASE: u64 = 20_000;
const LIVENESS_BOUND: u64 = 6_000;

#[derive(Default, Clone, Debug)]
pub struct Stats {
    pub schedules: u64,
    pub steps: u64,
    pub elections: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub committed: u64,
    pub reads: u64,
    pub acked: u64,
    pub compactions: u64,
    pub snapshots_installed: u64,
    pub damages: u64,
    pub repairs: u64,
    pub transfers: u64,
    pub conf_changes: u64,
    pub retired: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.schedules += o.schedules;
        self.steps += o.steps;
        self.elections += o.elections;
        self.crashes += o.crashes;
        self.partitions += o.partitions;
        self.committed += o.committed;
        self.reads += o.reads;
        self.acked += o.acked;
        self.compactions += o.compactions;
        self.snapshots_installed += o.snapshots_installed;
        self.damages += o.damages;
        self.repairs += o.repairs;
        self.transfers += o.transfers;
        self.conf_changes += o.conf_changes;
        self.retired += o.retired;
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} schedules, {} events, {} elections won, {} crashes, {} partitions, {} entries committed, {} proposals acknowledged, {} reads checked, {} compactions, {} snapshots installed, {} disks damaged, {} repairs, {} leadership transfers started, {} membership changes proposed, {} removed nodes stopped",
            self.schedules,
            self.steps,
            self.elections,
            self.crashes,
            self.partitions,
            self.committed,
            self.acked,
            self.reads,
            self.compactions,
            self.snapshots_installed,
            self.damages,
            self.repairs,
            self.transfers,
            self.conf_changes,
            self.retired
        )
    }
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Tick(NodeId),
    Deliver(u64),
    Crash,
    Restart(NodeId),
    Partition,
    Heal,
    Propose,
    Read,
    /// A snapshot transfer from `.0` to `.1` was lost: the sender's runtime reports the failure.
    SnapshotFailed(NodeId, NodeId),
    /// One node's disk is damaged (the node crashes first if it is up).
    Damage,
    /// The leader is asked to hand leadership to another node (or the most caught-up one).
    Transfer,
    /// The leader is asked for a membership change: add a new node, promote a learner or
    /// remove a member (the leader included).
    Membership,
}

/// What the node keeps apart from its log to detect damage (`durable.json` in the real store),
/// here exact: the real one lags by up to 100 ms, and losses within that lag go undetected.
#[derive(Clone, Copy, Default)]
struct Watermark {
    last_index: LogIndex,
    last_term: Term,
    term: Term,
    vote: NodeId,
    /// While rejoining: the catch-up index and the term of the node's entry there
    /// (`Term::MAX`: unknown), so that a second repair waits for it too.
    catch_up: (LogIndex, Term),
}

/// The checksum of one durable entry (the real store keeps one per batch).
fn checksum(e: &Entry) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (e.index, e.term, &e.data[..]).hash(&mut h);
    h.finish()
}

/// A state machine: the applied entries in order.
type StateMachine = Vec<(LogIndex, Term, Bytes)>;

struct Node {
    raft: Option<Raft<MemLogStore>>,
    /// Durable state while crashed.
    disk: MemLogStore,
    hard_state: HardState,
    /// The state machine: applied entries in order; durable with its applied index.
    applied: StateMachine,
    /// A snapshot received and staged, not yet installed (lost in a crash).
    staged: Option<(SnapshotMeta, StateMachine)>,
    /// Commit index already reported to the checker.
    recorded_commit: LogIndex,
    /// Proposals waiting for their index to be applied: index -> (term, data).
    proposals: BTreeMap<LogIndex, (Term, Bytes)>,
    /// ReadIndex requests: ctx -> the highest commit index anywhere when the read began.
    reads: HashMap<u64, LogIndex>,
    /// Confirmed reads waiting for the state machine to catch up: (index, ctx).
    confirmed_reads: Vec<(LogIndex, u64)>,
    restarts: u64,
    /// Durable: the watermark, the checksums of the log's entries, and the rejoin record
    /// (vote floor, catch-up index while catching up) after a repair.
    watermark: Watermark,
    sums: HashMap<LogIndex, u64>,
    rejoin: Option<(Term, Option<(LogIndex, Term)>)>,
    /// Damaged while down (the store must detect it at the next start).
    damaged: bool,
    /// Started empty to join an existing cluster (it knows no configuration until told).
    joined: bool,
    /// It applied its own removal and stopped for good (as the runtime exits).
    retired: bool,
    /// The configuration its state machine holds (the last configuration entry applied, or a
    /// snapshot's): every next one must differ by one voter at most.
    sm_config: Option<ClusterConfig>,
}

pub struct Sim {
    seed: u64,
    rng: SmallRng,
    now: u64,
    seq: u64,
    events: BinaryHeap<Reverse<(u64, u64, Event)>>,
    in_flight: HashMap<u64, Message>,
    nodes: BTreeMap<NodeId, Node>,
    /// The nodes that run or may be restarted (not those that stopped after their removal).
    ids: Vec<NodeId>,
    /// The configuration a new cluster starts with.
    boot: ClusterConfig,
    /// Membership changes (one schedule in two), chosen by an RNG of their own so that the
    /// other schedules run exactly as before.
    membership: Option<SmallRng>,
    next_id: NodeId,
    /// Every configuration entry ever made durable somewhere, by (index, term).
    configs: BTreeMap<(LogIndex, Term), ClusterConfig>,
    cut: BTreeSet<(NodeId, NodeId)>,
    checker: Checker,
    pub stats: Stats,
    faults: bool,
    drop_p: f64,
    dup_p: f64,
    delay_max: u64,
    crash_mid_ready_p: f64,
    next_value: u64,
    next_read: u64,
    /// Compaction policy of this schedule: compact when the log holds more than
    /// `compact_entries` applied entries, keeping `trailing_entries`.
    compact_entries: u64,
    trailing_entries: u64,
    /// Snapshot transfers in flight: (from, to, index) -> the sender's state machine.
    snapshot_data: HashMap<(NodeId, NodeId, LogIndex), StateMachine>,
}

impl Sim {
    pub fn new(seed: u64) -> Sim {
        let mut rng = SmallRng::seed_from_u64(seed);
        let n = [3u64, 5, 7][(seed % 3) as usize];
        let voters: Vec<NodeId> = (1..=n).collect();
        // One schedule in four has a learner too (it gets the log, votes on nothing).
        let learners: Vec<NodeId> = if (seed / 3) % 4 == 1 {
            vec![n + 1]
        } else {
            Vec::new()
        };
        let ids: Vec<NodeId> = voters.iter().chain(&learners).copied().collect();
        let mut boot = ClusterConfig::with_voters(voters.iter().copied());
        for &l in &learners {
            boot.add_learner(l);
        }
        let mut nodes = BTreeMap::new();
        for &id in &ids {
            let mut node = Node::new(false);
            node.raft = Some(start(id, &boot, &node, seed));
            nodes.insert(id, node);
        }
        let membership =
            ((seed / 12) % 2 == 1).then(|| SmallRng::seed_from_u64(seed ^ 0x6d65_6d62_6572));
        let next_id = ids.iter().max().copied().unwrap_or(0) + 1;
        let drop_p = rng.random_range(0.0..0.2);
        let dup_p = rng.random_range(0.0..0.1);
        let delay_max = rng.random_range(1..=40);
        let crash_mid_ready_p = rng.random_range(0.0..0.002);
        // Small thresholds, so that compactions and snapshot installs happen constantly; one
        // schedule in eight never compacts.
        let compact_entries = if rng.random_bool(0.125) {
            u64::MAX
        } else {
            rng.random_range(2..60)
        };
        let trailing_entries = rng.random_range(0..20);
        let mut sim = Sim {
            seed,
            rng,
            now: 0,
            seq: 0,
            events: BinaryHeap::new(),
            in_flight: HashMap::new(),
            nodes,
            ids,
            boot,
            membership,
            next_id,
            configs: BTreeMap::new(),
            cut: BTreeSet::new(),
            checker: Checker::default(),
            stats: Stats {
                schedules: 1,
                ..Stats::default()
            },
            faults: true,
            drop_p,
            dup_p,
            delay_max,
            crash_mid_ready_p,
            next_value: 0,
            next_read: 0,
            compact_entries,
            trailing_entries,
            snapshot_data: HashMap::new(),
        };
        for id in sim.ids.clone() {
            let offset = sim.rng.random_range(0..TICK);
            sim.schedule(offset, Event::Tick(id));
        }
        let first_crash = sim.rng.random_range(200..1500);
        sim.schedule(first_crash, Event::Crash);
        let first_partition = sim.rng.random_range(200..1500);
        sim.schedule(first_partition, Event::Partition);
        // Leadership transfers now and then, in half of the schedules.
        if sim.rng.random_bool(0.5) {
            let first_transfer = sim.rng.random_range(300..2000);
            sim.schedule(first_transfer, Event::Transfer);
        }
        // One schedule in four damages disks.
        if sim.rng.random_bool(0.25) {
            let first_damage = sim.rng.random_range(500..3000);
            sim.schedule(first_damage, Event::Damage);
        }
        sim.schedule(50, Event::Propose);
        sim.schedule(60, Event::Read);
        if let Some(m) = sim.membership.as_mut() {
            let first = m.random_range(300..2000);
            sim.schedule(first, Event::Membership);
        }
        sim
    }

    fn schedule(&mut self, after: u64, ev: Event) {
        self.seq += 1;
        self.events.push(Reverse((self.now + after, self.seq, ev)));
    }

    pub fn run(&mut self) {
        // Safety phase: faults.
        self.run_until(FAULT_PHASE);
        // Liveness phase: heal everything, restart every node, stop losing messages.
        self.faults = false;
        self.drop_p = 0.0;
        self.dup_p = 0.0;
        self.crash_mid_ready_p = 0.0;
        self.cut.clear();
        for id in self.ids.clone() {
            if self.nodes[&id].raft.is_none() {
                self.restart(id);
            }
        }
        let deadline = self.now + LIVENESS_BOUND;
        let leader = loop {
            self.run_until(self.now + 100);
            if let Some(l) = self.settled_leader() {
                break l;
            }
            assert!(
                self.now < deadline,
                "liveness: no leader within {LIVENESS_BOUND} after healing: {}",
                self.describe()
            );
        };
        // Nodes outside the leader's configuration (removed without learning it, or added by
        // a change that was lost) are stopped, as an operator would.
        let members = self.nodes[&leader]
            .raft
            .as_ref()
            .expect("up")
            .config()
            .clone();
        for id in self.ids.clone() {
            if !members.contains(id) {
                self.retire(id);
            }
        }
        // A last write must commit and reach every node, which then agree on everything.
        let data = Bytes::from(format!("final-{}", self.seed));
        // A transfer begun before the healing may still hold proposals back (at most an
        // election timeout).
        let mut leader = leader;
        let index = loop {
            match self.node_mut(leader).propose(data.clone()) {
                Ok((index, _)) => break index,
                Err(raftkv::raft::Error::TransferInProgress { .. }) => {}
                Err(e) => panic!("the stable leader refuses the final write: {e}"),
            }
            assert!(self.now < deadline, "liveness: a transfer never ended");
            self.run_until(self.now + 100);
            leader = loop {
                if let Some(l) = self.settled_leader() {
                    break l;
                }
                assert!(self.now < deadline, "liveness: no leader after a transfer");
                self.run_until(self.now + 100);
            };
        };
        self.process(leader);
        loop {
            self.run_until(self.now + 100);
            let done = self
                .ids
                .iter()
                .all(|id| self.nodes[id].applied.len() as u64 >= index);
            if done {
                break;
            }
            assert!(
                self.now < deadline,
                "liveness: final write {index} not applied everywhere in time"
            );
        }
        let reference = &self.nodes[&leader].applied[..index as usize];
        for id in &self.ids {
            let node = &self.nodes[id];
            assert_eq!(
                &node.applied[..index as usize],
                reference,
                "node {id} diverged"
            );
            // Every proposal made on a live node has been resolved by applying its index.
            if let Some((&i, _)) = node.proposals.iter().next() {
                assert!(
                    i > node.applied.len() as u64,
                    "node {id}: proposal {i} unresolved"
                );
            }
        }
        self.check_durable();
        self.stats.committed = self.checker.max_commit;
    }

    /// A stable leader whose configuration is committed and makes it a voter (a change in
    /// progress when the faults stopped, its own removal say, has finished).
    fn settled_leader(&self) -> Option<NodeId> {
        let l = self.stable_leader()?;
        let r = self.nodes[&l].raft.as_ref()?;
        (r.config_index() <= r.commit_index() && r.config().is_voter(l)).then_some(l)
    }

    /// The leader every member of its configuration that is up follows.
    fn stable_leader(&self) -> Option<NodeId> {
        let leaders: Vec<&Raft<MemLogStore>> = self
            .nodes
            .values()
            .filter_map(|n| n.raft.as_ref())
            .filter(|r| r.role() == Role::Leader)
            .collect();
        let l = leaders.iter().max_by_key(|r| r.term())?;
        let all_follow = self
            .nodes
            .values()
            .filter_map(|n| n.raft.as_ref())
            .filter(|r| l.config().contains(r.id()))
            .all(|r| r.leader() == l.id() && r.term() == l.term());
        all_follow.then_some(l.id())
    }

    /// Every node's state, for a failure message.
    fn describe(&self) -> String {
        let mut out = String::new();
        for (id, n) in &self.nodes {
            let Some(r) = n.raft.as_ref() else {
                out.push_str(&format!("\n  node {id}: down (retired: {})", n.retired));
                continue;
            };
            out.push_str(&format!(
                "\n  node {id}: {} term {} leader {} commit {} last {} (term {:?}) config@{} voters {:?} learners {:?} removed {:?} rejoining {}",
                r.role(),
                r.term(),
                r.leader(),
                r.commit_index(),
                r.last_index(),
                r.term_at(r.last_index()),
                r.config_index(),
                r.config().voters().collect::<Vec<_>>(),
                r.config().learners().collect::<Vec<_>>(),
                r.config().removed,
                r.rejoining()
            ));
        }
        out
    }

    /// Stops node `id` for good: it applied its removal (the runtime then exits), or it is
    /// outside the final configuration.
    fn retire(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("node");
        if let Some(r) = node.raft.take() {
            node.disk = r.store().clone();
        }
        node.retired = true;
        node.proposals.clear();
        node.reads.clear();
        node.confirmed_reads.clear();
        self.ids.retain(|&i| i != id);
        self.stats.retired += 1;
    }

    /// The voters of the latest committed configuration.
    fn committed_voters(&self) -> BTreeSet<NodeId> {
        self.configs
            .iter()
            .rev()
            .find(|((i, t), _)| self.checker.committed.get(i) == Some(t))
            .map_or(&self.boot, |(_, c)| c)
            .voters()
            .collect()
    }

    /// Asks the leader for a random membership change (3 to 5 voters, new nodes get new ids).
    fn change_membership(&mut self) {
        let Some(l) = self.leader() else {
            return;
        };
        let c = self.nodes[&l].raft.as_ref().expect("up").config().clone();
        let m = self.membership.as_mut().expect("membership schedule");
        let voters: Vec<NodeId> = c.voters().collect();
        let learners: Vec<NodeId> = c.learners().collect();
        let add = voters.len() < 5 && m.random_bool(0.5);
        let change = match learners.first() {
            Some(&id) if m.random_bool(0.8) => ConfChange::Promote { id },
            Some(&id) => ConfChange::Remove { id },
            None if add || voters.len() <= 3 => ConfChange::AddLearner {
                id: self.next_id,
                address: format!("sim:{}", self.next_id),
            },
            None => ConfChange::Remove {
                id: voters[m.random_range(0..voters.len())],
            },
        };
        if let ConfChange::Remove { id } = change {
            // The operator keeps a majority of every configuration on disks it can trust (as
            // `damage` does): no removal that leaves half the voters damaged or catching up.
            let untrusted = voters
                .iter()
                .filter(|&&v| v != id)
                .filter(|v| {
                    let n = &self.nodes[v];
                    n.damaged || matches!(n.rejoin, Some((_, Some(_))))
                })
                .count();
            let remaining = voters.len() - usize::from(voters.contains(&id));
            if untrusted * 2 >= remaining {
                return;
            }
        }
        match self.node_mut(l).propose_conf_change(&change) {
            Ok(_) => {
                self.stats.conf_changes += 1;
                if let ConfChange::AddLearner { id, .. } = change {
                    // The new node starts empty and waits to be told the configuration.
                    self.next_id += 1;
                    let mut node = Node::new(true);
                    node.raft = Some(start(id, &self.boot, &node, self.seed ^ id));
                    self.nodes.insert(id, node);
                    self.ids.push(id);
                    let offset = self
                        .membership
                        .as_mut()
                        .expect("membership schedule")
                        .random_range(0..TICK);
                    self.schedule(offset, Event::Tick(id));
                }
            }
            Err(raftkv::raft::Error::ConfChangeRefused { .. })
            | Err(raftkv::raft::Error::TransferInProgress { .. })
            | Err(raftkv::raft::Error::ProposalDropped(_)) => {}
            Err(e) => panic!("unexpected membership change error {e}"),
        }
        self.process(l);
    }

    fn run_until(&mut self, until: u64) {
        while let Some(Reverse((t, _, _))) = self.events.peek() {
            if *t > until {
                break;
            }
            let Some(Reverse((t, _, ev))) = self.events.pop() else {
                break;
            };
            self.now = t;
            self.stats.steps += 1;
            self.handle(ev);
        }
        self.now = until;
    }

    fn node_mut(&mut self, id: NodeId) -> &mut Raft<MemLogStore> {
        self.nodes
            .get_mut(&id)
            .and_then(|n| n.raft.as_mut())
            .expect("node is up")
    }

    /// The lowest-numbered node that believes it leads (a stale leader may too).
    fn leader(&self) -> Option<NodeId> {
        self.ids.iter().copied().find(|&id| {
            self.nodes[&id]
                .raft
                .as_ref()
                .is_some_and(|r| r.role() == Role::Leader)
        })
    }

    fn up(&self, id: NodeId) -> bool {
        self.nodes[&id].raft.is_some()
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Tick(id) => {
                if self.up(id) {
                    self.node_mut(id).tick();
                    self.process(id);
                }
                if !self.nodes[&id].retired {
                    self.schedule(TICK, Event::Tick(id));
                }
            }
            Event::Membership => {
                if !self.faults {
                    return;
                }
                self.change_membership();
                let m = self.membership.as_mut().expect("membership schedule");
                let next = m.random_range(300..2500);
                self.schedule(next, Event::Membership);
            }
            Event::Deliver(key) => {
                let Some(m) = self.in_flight.remove(&key) else {
                    return;
                };
                let to = m.to;
                let delivered = self.up(to) && !self.cut.contains(&(m.from, to));
                if let MessageBody::InstallSnapshot { snapshot, .. } = m.body {
                    // The transfer ends: the sender's runtime reports it; the receiver's has
                    // staged it.
                    self.report_snapshot(m.from, to, delivered);
                    if !delivered {
                        return;
                    }
                    let data = self.snapshot_data[&(m.from, to, snapshot.index)].clone();
                    self.nodes.get_mut(&to).expect("node").staged = Some((snapshot, data));
                }
                if delivered {
                    self.node_mut(to).step(m).expect("step");
                    let node = self.nodes.get_mut(&to).expect("node");
                    let pending = node.raft.as_ref().and_then(|r| r.pending_snapshot());
                    if node
                        .staged
                        .as_ref()
                        .is_some_and(|(s, _)| Some(*s) != pending)
                    {
                        node.staged = None; // not accepted: discarded
                    }
                    self.process(to);
                }
            }
            Event::SnapshotFailed(from, to) => self.report_snapshot(from, to, false),
            Event::Crash => {
                if !self.faults {
                    return;
                }
                // Half of the crashes hit the leader, if there is one.
                let leader = self.leader();
                let id = match leader {
                    Some(l) if self.rng.random_bool(0.5) => l,
                    _ => self.ids[self.rng.random_range(0..self.ids.len())],
                };
                if self.up(id) {
                    self.crash(id);
                    let down = self.rng.random_range(50..1500);
                    self.schedule(down, Event::Restart(id));
                }
                let next = self.rng.random_range(100..1500);
                self.schedule(next, Event::Crash);
            }
            Event::Restart(id) => {
                if !self.up(id) && !self.nodes[&id].retired {
                    self.restart(id);
                }
            }
            Event::Transfer => {
                if !self.faults {
                    return;
                }
                let leader = self.leader();
                if let Some(l) = leader {
                    // Any node, itself or 0 (the most caught-up) included.
                    let target = self.rng.random_range(0..=self.ids.len() as u64);
                    match self.node_mut(l).transfer_leader(target) {
                        Ok(_) => self.stats.transfers += 1,
                        Err(raftkv::raft::Error::TransferRefused(_)) => {}
                        Err(e) => panic!("unexpected transfer error {e}"),
                    }
                    self.process(l);
                }
                let next = self.rng.random_range(200..2000);
                self.schedule(next, Event::Transfer);
            }
            Event::Damage => {
                if !self.faults {
                    return;
                }
                self.damage();
                let next = self.rng.random_range(500..3000);
                self.schedule(next, Event::Damage);
            }
            Event::Partition => {
                if !self.faults {
                    return;
                }
                self.partition();
                self.stats.partitions += 1;
                let heal = self.rng.random_range(100..1500);
                self.schedule(heal, Event::Heal);
            }
            Event::Heal => {
                self.cut.clear();
                if self.faults {
                    let next = self.rng.random_range(50..1000);
                    self.schedule(next, Event::Partition);
                }
            }
            Event::Propose => {
                self.propose();
                let next = self.rng.random_range(1..40);
                self.schedule(next, Event::Propose);
            }
            Event::Read => {
                self.read();
                let next = self.rng.random_range(1..60);
                self.schedule(next, Event::Read);
            }
        }
    }

    fn partition(&mut self) {
        self.cut.clear();
        let n = self.ids.len();
        let mut shuffled = self.ids.clone();
        for i in (1..n).rev() {
            let j = self.rng.random_range(0..=i);
            shuffled.swap(i, j);
        }
        // Sometimes put the leader on the minority side.
        if self.rng.random_bool(0.5)
            && let Some(pos) = shuffled.iter().position(|&id| {
                self.nodes[&id]
                    .raft
                    .as_ref()
                    .is_some_and(|r| r.role() == Role::Leader)
            })
        {
            shuffled.swap(0, pos);
        }
        let k = self.rng.random_range(1..=n / 2);
        let (a, b) = shuffled.split_at(k);
        let one_way = self.rng.random_bool(0.3);
        for &x in a {
            for &y in b {
                self.cut.insert((x, y));
                if !one_way {
                    self.cut.insert((y, x));
                }
            }
        }
        // Now and then also some random single links.
        for _ in 0..self.rng.random_range(0..3) {
            let x = self.ids[self.rng.random_range(0..n)];
            let y = self.ids[self.rng.random_range(0..n)];
            if x != y {
                self.cut.insert((x, y));
            }
        }
    }

    /// Damages one node's disk, in a way its store detects at start-up: a lost tail of synced
    /// entries (a torn journal), a corrupted entry (a checksum mismatch) or a hard state rolled
    /// back. At most a minority of nodes is damaged or catching up after a repair at a time: a
    /// majority keeps its disk.
    fn damage(&mut self) {
        let untrusted = self
            .nodes
            .values()
            .filter(|n| matches!(n.rejoin, Some((_, Some(_)))) || n.damaged)
            .count();
        // A minority of the smallest voter set a leader may count on (the committed
        // configuration, or the newest one made durable anywhere: one voter apart).
        let newest = self
            .configs
            .values()
            .next_back()
            .map_or(usize::MAX, |c| c.voters().count());
        let voters = self.committed_voters().len().min(newest);
        if untrusted >= voters.saturating_sub(1) / 2 {
            return;
        }
        let id = self.ids[self.rng.random_range(0..self.ids.len())];
        if self.nodes[&id].damaged {
            return;
        }
        if self.up(id) {
            self.crash(id);
            let down = self.rng.random_range(50..1500);
            self.schedule(down, Event::Restart(id));
        }
        let kind = self.rng.random_range(0..3);
        let node = self.nodes.get_mut(&id).expect("node");
        let entries = node.disk.all().to_vec();
        let rebuild = |snap: SnapshotMeta, entries: &[Entry]| {
            let mut s = MemLogStore::new();
            if snap.index > 0 {
                s.install_snapshot(snap);
            }
            s.append(entries);
            s
        };
        match kind {
            0 if !entries.is_empty() => {
                let keep = self.rng.random_range(0..entries.len());
                node.disk = rebuild(node.disk.snapshot(), &entries[..keep]);
            }
            1 if !entries.is_empty() => {
                let mut entries = entries;
                let i = self.rng.random_range(0..entries.len());
                entries[i].data = Bytes::from_static(b"\xde\xad");
                node.disk = rebuild(node.disk.snapshot(), &entries);
            }
            2 if node.hard_state.term > 0 => {
                node.hard_state = HardState {
                    term: node.hard_state.term - 1,
                    ..node.hard_state
                };
            }
            _ => return,
        }
        node.damaged = true;
        self.stats.damages += 1;
    }

    /// What the real store checks at start-up (`storage::disk::open`): checksums, and nothing
    /// lost below the watermark. Returns what is wrong.
    fn detect_damage(node: &Node) -> Option<String> {
        for e in node.disk.all() {
            if node.sums.get(&e.index) != Some(&checksum(e)) {
                return Some(format!("checksum of entry {}", e.index));
            }
        }
        let w = node.watermark;
        let last = node.disk.last_index();
        let last_term = node.disk.term(last).unwrap_or(0);
        if (last_term, last) < (w.last_term, w.last_index) {
            return Some(format!(
                "log ends at {last}, durable up to {}",
                w.last_index
            ));
        }
        let hs = node.hard_state;
        if hs.term < w.term || (hs.term == w.term && w.vote != 0 && hs.vote != w.vote) {
            return Some("hard state older than the watermark".into());
        }
        None
    }

    /// `raftkv node --repair` (`storage::disk::repair`): asks the peers it can reach for their
    /// term and commit index, then starts empty, keeping its identity and the term and vote of
    /// its watermark, and rejoins.
    fn repair(&mut self, id: NodeId) {
        let answers: Vec<(Term, LogIndex)> = self
            .ids
            .iter()
            .filter(|&&p| p != id && !self.cut.contains(&(id, p)) && !self.cut.contains(&(p, id)))
            .filter_map(|p| self.nodes[p].raft.as_ref())
            .map(|r| (r.term(), r.commit_index()))
            .collect();
        let peers_term = answers.iter().map(|a| a.0).max().unwrap_or(0);
        let peers_commit = answers.iter().map(|a| a.1).max();
        let node = self.nodes.get_mut(&id).expect("node");
        let w = node.watermark;
        let floor = w.term.max(peers_term);
        let vote = if floor == w.term { w.vote } else { 0 };
        let catch_up = [
            (peers_commit.unwrap_or(0), Term::MAX),
            (w.last_index, w.last_term),
            w.catch_up,
        ]
        .into_iter()
        .max()
        .expect("three candidates");
        node.disk = MemLogStore::new();
        node.hard_state = HardState {
            term: floor,
            vote,
            commit: 0,
        };
        node.applied.clear();
        node.sm_config = None;
        node.sums.clear();
        node.recorded_commit = 0;
        node.watermark = Watermark {
            term: floor,
            vote,
            catch_up,
            ..Watermark::default()
        };
        node.rejoin = Some((floor, Some(catch_up)));
        node.damaged = false;
        self.stats.repairs += 1;
    }

    fn report_snapshot(&mut self, from: NodeId, to: NodeId, ok: bool) {
        if self.up(from) {
            self.node_mut(from).report_snapshot(to, ok);
            self.process(from);
        }
    }

    fn send(&mut self, m: Message) {
        if self.faults && self.rng.random_bool(self.drop_p) {
            if matches!(m.body, MessageBody::InstallSnapshot { .. }) {
                let after = self.rng.random_range(1..=self.delay_max * 4);
                self.schedule(after, Event::SnapshotFailed(m.from, m.to));
            }
            return;
        }
        let copies = if self.faults && self.rng.random_bool(self.dup_p) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.rng.random_range(1..=self.delay_max);
            self.seq += 1;
            let key = self.seq;
            self.in_flight.insert(key, m.clone());
            self.schedule(delay, Event::Deliver(key));
        }
    }

    fn crash(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("node");
        let r = node.raft.take().expect("up");
        node.disk = r.store().clone();
        node.staged = None;
        node.proposals.clear();
        node.reads.clear();
        node.confirmed_reads.clear();
        self.stats.crashes += 1;
        self.check_durable();
    }

    fn restart(&mut self, id: NodeId) {
        let found = Self::detect_damage(&self.nodes[&id]);
        assert_eq!(
            found.is_some(),
            self.nodes[&id].damaged,
            "node {id}: damage {}detected ({found:?})",
            if found.is_some() { "falsely " } else { "not " }
        );
        if found.is_some() {
            self.repair(id);
        }
        let boot = self.boot.clone();
        let node = self.nodes.get_mut(&id).expect("node");
        node.restarts += 1;
        let r = start(id, &boot, node, self.seed ^ (node.restarts << 32));
        node.recorded_commit = node.recorded_commit.min(r.commit_index());
        node.raft = Some(r);
    }

    fn check_durable(&self) {
        // Only voters make a quorum: a learner's copy keeps nothing safe.
        let voters = self.committed_voters();
        let stores: Vec<(&MemLogStore, LogIndex)> = self
            .nodes
            .iter()
            .filter(|(id, _)| voters.contains(id))
            .map(|(_, n)| {
                let store = n.raft.as_ref().map_or(&n.disk, |r| r.store());
                // A damaged node detects it at start-up and rejoins (see `repair`).
                let covers = match n.rejoin {
                    _ if n.damaged => n.watermark.last_index.max(n.watermark.catch_up.0),
                    Some((_, Some((c, _)))) => c,
                    _ => 0,
                };
                (store, covers)
            })
            .collect();
        // A store holds what it has compacted in its state machine (checked on install).
        self.checker.check_durable_majority(&stores);
    }

    fn propose(&mut self) {
        let candidates: Vec<NodeId> = self.ids.iter().copied().filter(|&id| self.up(id)).collect();
        if candidates.is_empty() {
            return;
        }
        // Mostly at the leader; sometimes at a random node (which refuses).
        let leader = self.leader();
        let id = match leader {
            Some(l) if self.rng.random_bool(0.9) => l,
            _ => candidates[self.rng.random_range(0..candidates.len())],
        };
        self.next_value += 1;
        let data = Bytes::from(format!("v{}", self.next_value));
        let r = self.node_mut(id);
        match r.propose(data.clone()) {
            Ok((index, term)) => {
                self.nodes
                    .get_mut(&id)
                    .expect("node")
                    .proposals
                    .insert(index, (term, data));
                self.process(id);
            }
            Err(raftkv::raft::Error::NotLeader { leader }) => {
                assert_ne!(leader, id, "a follower names itself as leader");
            }
            Err(raftkv::raft::Error::ProposalDropped(_)) => {}
            Err(raftkv::raft::Error::TransferInProgress { to }) => {
                assert_ne!(to, id, "a leader transfers to another node");
            }
            Err(e) => panic!("unexpected propose error {e}"),
        }
    }

    fn read(&mut self) {
        let leader = self.leader();
        let Some(id) = leader else {
            return;
        };
        self.next_read += 1;
        let ctx = self.next_read;
        let floor = self.checker.max_commit;
        self.node_mut(id)
            .read_index(ctx)
            .expect("leader accepts reads");
        self.nodes
            .get_mut(&id)
            .expect("node")
            .reads
            .insert(ctx, floor);
        self.process(id);
    }

    /// Executes every `Ready` of node `id`, as the real runtime does, checking as it goes.
    fn process(&mut self, id: NodeId) {
        loop {
            let crash_now = self.rng.random_bool(self.crash_mid_ready_p);
            let node = self.nodes.get_mut(&id).expect("node");
            let Some(r) = node.raft.as_mut() else {
                return;
            };
            if !r.has_ready() {
                return;
            }
            let rd = r.ready().expect("ready");
            if rd.soft_state.is_some_and(|s| s.role == Role::Leader) {
                self.checker.on_leader(r);
                self.stats.elections += 1;
            }
            self.checker.on_commit(r, node.recorded_commit);
            node.recorded_commit = r.commit_index();
            let (requests, responses): (Vec<Message>, Vec<Message>) = rd
                .messages
                .into_iter()
                .partition(|m| !m.needs_persisted_state());
            // 1. Requests leave at once (a leader's appends in parallel with its write), and
            //    snapshot transfers start, of the state machine as it is now.
            for m in requests {
                self.send(m);
            }
            let node = self.nodes.get_mut(&id).expect("node");
            let r = node.raft.as_ref().expect("up");
            let mut snapshot_msgs = Vec::new();
            for &to in &rd.snapshot_sends {
                let index = r.applied_index();
                let term = r.term_at(index).expect("the applied entry's term is known");
                assert_eq!(index, node.applied.len() as u64);
                let snapshot = SnapshotMeta { index, term };
                let config = r.config_at(index).cloned().unwrap_or_default();
                self.snapshot_data
                    .insert((id, to, index), node.applied.clone());
                snapshot_msgs.push(Message {
                    from: id,
                    to,
                    term: r.term(),
                    body: MessageBody::InstallSnapshot { snapshot, config },
                });
            }
            for m in snapshot_msgs {
                self.send(m);
            }
            if crash_now {
                // The process dies before the write: everything in this Ready is lost.
                self.crash(id);
                let down = self.rng.random_range(50..800);
                self.schedule(down, Event::Restart(id));
                return;
            }
            let node = self.nodes.get_mut(&id).expect("node");
            let r = node.raft.as_mut().expect("up");
            // 2. Install the staged snapshot, then persist.
            if let Some(snap) = rd.snapshot {
                let (staged, data) = node.staged.take().expect("the accepted snapshot is staged");
                assert_eq!(staged, snap, "node {id} installs the snapshot it staged");
                self.checker.on_install(id, snap, &data);
                r.store_mut().install_snapshot(snap);
                node.applied = data;
                node.sm_config = sm_config(&node.applied);
                // Proposals the snapshot covers are never applied here one by one: their
                // outcome is unknown to this node (the runtime failed them when it lost the
                // leadership; a client's retry is deduplicated by the sessions in the snapshot).
                node.proposals.retain(|&i, _| i > snap.index);
                self.stats.snapshots_installed += 1;
                node.mark_durable();
                if self.rng.random_bool(self.crash_mid_ready_p * 20.0) {
                    // The install is durable (one batch and an fsync); the process dies before
                    // the rest of this Ready is written.
                    self.crash(id);
                    let down = self.rng.random_range(50..800);
                    self.schedule(down, Event::Restart(id));
                    return;
                }
            }
            let node = self.nodes.get_mut(&id).expect("node");
            let r = node.raft.as_mut().expect("up");
            self.checker.on_persist(id, r.store(), &rd.entries);
            for e in rd
                .entries
                .iter()
                .filter(|e| e.kind == EntryKind::ConfChange)
            {
                let c = ClusterConfig::decode(&e.data).expect("a configuration entry");
                self.configs.entry((e.index, e.term)).or_insert(c);
            }
            r.store_mut().append(&rd.entries);
            if let Some(hs) = rd.hard_state {
                node.hard_state = hs;
            }
            for e in &rd.entries {
                node.sums.insert(e.index, checksum(e));
            }
            node.mark_durable();
            // 3. Responses, now that what they promise is durable.
            for m in responses {
                self.send(m);
            }
            // 4. Apply.
            let node = self.nodes.get_mut(&id).expect("node");
            for e in &rd.committed_entries {
                self.checker.on_apply(id, e);
                assert_eq!(
                    e.index,
                    node.applied.len() as u64 + 1,
                    "node {id} applies out of order"
                );
                let data = if e.kind == EntryKind::Noop {
                    Bytes::new()
                } else {
                    e.data.clone()
                };
                if e.kind == EntryKind::ConfChange {
                    // Every quorum of a configuration overlaps every quorum of the one before
                    // (single-server changes): they differ by one voter at most.
                    let next = ClusterConfig::decode(&e.data).expect("a configuration entry");
                    let before = node.sm_config.as_ref().unwrap_or(&self.boot);
                    let (a, b): (BTreeSet<NodeId>, BTreeSet<NodeId>) =
                        (before.voters().collect(), next.voters().collect());
                    assert!(
                        a.symmetric_difference(&b).count() <= 1,
                        "node {id}: configuration entry {} changes voters {a:?} to {b:?}",
                        e.index
                    );
                    node.sm_config = Some(next);
                }
                node.applied.push((e.index, e.term, data));
                if let Some((term, _)) = node.proposals.remove(&e.index)
                    && term == e.term
                {
                    self.stats.acked += 1;
                }
            }
            // 5. Reads: the confirmed index must cover every commit that happened before the
            //    read began; the read is served once applied.
            for rs in &rd.read_states {
                let floor = node.reads.remove(&rs.ctx).expect("a read we asked for");
                assert!(
                    rs.index >= floor,
                    "stale read on node {id}: read index {} < commit index {floor} seen before the read",
                    rs.index
                );
                node.confirmed_reads.push((rs.index, rs.ctx));
            }
            for ctx in &rd.dropped_reads {
                node.reads.remove(ctx);
            }
            let applied = node.applied.len() as u64;
            let before = node.confirmed_reads.len();
            node.confirmed_reads.retain(|&(i, _)| i > applied);
            self.stats.reads += (before - node.confirmed_reads.len()) as u64;
            let r = node.raft.as_mut().expect("up");
            r.advance();
            r.check_invariants();
            if let Some((floor, Some(_))) = node.rejoin
                && !r.rejoining()
            {
                node.rejoin = Some((floor, None));
                node.watermark.catch_up = (0, 0);
            }
            assert_eq!(
                r.applied_index(),
                node.applied.len() as u64,
                "applied index tracks the state machine"
            );
            if node
                .sm_config
                .as_ref()
                .is_some_and(|c| c.removed.contains(&id))
            {
                // It applied its own removal: the runtime stops the node.
                self.retire(id);
                return;
            }
            // Compaction policy: keep a trailing log behind what is applied.
            let applied = r.applied_index();
            let first = r.store().first_index();
            if applied + 1 - first > self.compact_entries {
                let to = applied.saturating_sub(self.trailing_entries);
                if to >= first {
                    r.store_mut().compact(to);
                    node.sums.retain(|&i, _| i > to);
                    self.stats.compactions += 1;
                }
            }
        }
    }
}

impl Node {
    fn new(joined: bool) -> Node {
        Node {
            raft: None,
            disk: MemLogStore::new(),
            hard_state: HardState::default(),
            applied: Vec::new(),
            staged: None,
            recorded_commit: 0,
            proposals: BTreeMap::new(),
            reads: HashMap::new(),
            confirmed_reads: Vec::new(),
            restarts: 0,
            watermark: Watermark::default(),
            sums: HashMap::new(),
            rejoin: None,
            damaged: false,
            joined,
            retired: false,
            sm_config: None,
        }
    }

    /// The watermark follows what was made durable (exactly; see `Watermark`).
    fn mark_durable(&mut self) {
        let store = self.raft.as_ref().map_or(&self.disk, |r| r.store());
        let last_index = store.last_index();
        self.watermark = Watermark {
            last_index,
            last_term: store.term(last_index).unwrap_or(0),
            term: self.hard_state.term,
            vote: self.hard_state.vote,
            ..self.watermark
        };
    }
}

/// The configuration a state machine holds: its last configuration entry's.
fn sm_config(applied: &StateMachine) -> Option<ClusterConfig> {
    applied.iter().rev().find_map(|(_, _, data)| {
        data.starts_with(b"{")
            .then(|| ClusterConfig::decode(data).ok())
            .flatten()
    })
}

/// Starts (or restarts) a core from a node's durable state: the configuration is its state
/// machine's, else (nothing applied yet) the bootstrap one, or none for a node that joined.
fn start(id: NodeId, boot: &ClusterConfig, node: &Node, seed: u64) -> Raft<MemLogStore> {
    let mut cfg = Config::new(id, Vec::new(), seed.wrapping_mul(31).wrapping_add(id));
    cfg.members = match &node.sm_config {
        Some(c) => c.clone(),
        None if node.joined => ClusterConfig::default(),
        None => boot.clone(),
    };
    cfg.max_inflight_msgs = 16;
    cfg.max_inflight_bytes = 2048;
    cfg.max_msg_bytes = 512;
    Raft::new(
        cfg,
        node.disk.clone(),
        node.hard_state,
        node.applied.len() as u64,
    )
    .map(|mut r| {
        if let Some((floor, catch_up)) = node.rejoin {
            r.set_rejoin(floor, catch_up);
        }
        r
    })
    .expect("valid config")
}
