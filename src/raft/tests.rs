//! Unit tests of the core, organised after the Raft paper (Ongaro & Ousterhout 2014) and the
//! dissertation (Ongaro 2014) for pre-vote, check-quorum and ReadIndex.

use bytes::Bytes;

use super::harness::{Net, config, entry};
use super::*;

fn log_terms(terms: &[Term]) -> Vec<Entry> {
    terms
        .iter()
        .enumerate()
        .map(|(i, &t)| entry(i as u64 + 1, t))
        .collect()
}

/// A core with `store` as its durable log, at `term` with no vote, having committed `commit`.
fn core(cfg: Config, store: MemLogStore, term: Term, commit: LogIndex) -> Raft<MemLogStore> {
    Raft::new(
        cfg,
        store,
        HardState {
            term,
            vote: 0,
            commit,
        },
        0,
    )
    .expect("valid config")
}

fn msg(from: NodeId, to: NodeId, term: Term, body: MessageBody) -> Message {
    Message {
        from,
        to,
        term,
        body,
    }
}

fn no_pre_vote(id: NodeId, n: u64) -> Config {
    let mut c = config(id, n);
    c.pre_vote = false;
    c
}

// ---------------------------------------------------------------------------------------------
// 5.2 Leader election
// ---------------------------------------------------------------------------------------------

// Reference: section 5.2. A follower that hears nothing for an election timeout becomes a
// candidate: it increments its term, votes for itself and asks every other node for its vote.
#[test]
fn follower_times_out_and_campaigns() {
    let mut r = core(no_pre_vote(1, 3), MemLogStore::new(), 0, 0);
    for _ in 0..20 {
        r.tick();
    }
    assert_eq!(r.role(), Role::Candidate);
    assert_eq!(r.term(), 1);
    let rd = r.ready().expect("ready");
    assert_eq!(
        rd.hard_state,
        Some(HardState {
            term: 1,
            vote: 1,
            commit: 0
        })
    );
    assert!(rd.must_sync, "term and vote must be durable");
    let mut to: Vec<NodeId> = rd.messages.iter().map(|m| m.to).collect();
    to.sort_unstable();
    assert_eq!(to, vec![2, 3]);
    for m in &rd.messages {
        assert_eq!(
            m.body,
            MessageBody::VoteRequest {
                pre_vote: false,
                last_log_index: 0,
                last_log_term: 0,
                leader_transfer: false,
            }
        );
        assert_eq!(m.term, 1);
        assert!(
            !m.needs_persisted_state(),
            "requests may leave before the write"
        );
    }
}

// Reference: section 5.2. Election timeouts are chosen randomly from a fixed interval.
#[test]
fn election_timeouts_are_randomized_within_bounds() {
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..200 {
        let mut c = no_pre_vote(1, 3);
        c.seed = seed;
        let mut r = core(c, MemLogStore::new(), 0, 0);
        let mut ticks = 0;
        while r.role() == Role::Follower {
            r.tick();
            ticks += 1;
        }
        assert!(
            (10..=20).contains(&ticks),
            "timeout {ticks} outside [10, 20]"
        );
        seen.insert(ticks);
    }
    assert!(seen.len() > 5, "timeouts are not spread: {seen:?}");
}

// Reference: section 5.2. A candidate wins with votes from a majority; each outcome of one round.
#[test]
fn leader_election_in_one_round() {
    // (cluster size, nodes that cannot be reached, expected role of node 1)
    let cases: &[(u64, &[NodeId], Role)] = &[
        (1, &[], Role::Leader),
        (3, &[], Role::Leader),
        (3, &[3], Role::Leader),
        (3, &[2, 3], Role::Candidate),
        (5, &[4, 5], Role::Leader),
        (5, &[3, 4, 5], Role::Candidate),
        (7, &[5, 6, 7], Role::Leader),
        (7, &[4, 5, 6, 7], Role::Candidate),
    ];
    for &(n, down, want) in cases {
        let mut net = Net::with(n, no_pre_vote);
        for &d in down {
            net.isolate(d);
        }
        net.elect(1);
        assert_eq!(net.node(1).role(), want, "n={n} down={down:?}");
        assert_eq!(net.node(1).term(), 1);
    }
}

// Reference: section 5.2. Each server votes for at most one candidate in a given term, on a
// first-come-first-served basis.
#[test]
fn voter_votes_once_per_term() {
    let mut r = core(no_pre_vote(1, 3), MemLogStore::new(), 0, 0);
    let req = |from| Message {
        from,
        to: 1,
        term: 1,
        body: MessageBody::VoteRequest {
            pre_vote: false,
            last_log_index: 0,
            last_log_term: 0,
            leader_transfer: false,
        },
    };
    r.step(req(2)).expect("step");
    r.step(req(3)).expect("step");
    r.step(req(2)).expect("step");
    let rd = r.ready().expect("ready");
    let answers: Vec<(NodeId, bool)> = rd
        .messages
        .iter()
        .map(|m| match m.body {
            MessageBody::VoteResponse { granted, .. } => (m.to, granted),
            _ => panic!("unexpected {m:?}"),
        })
        .collect();
    assert_eq!(answers, vec![(2, true), (3, false), (2, true)]);
    assert_eq!(rd.hard_state.map(|h| h.vote), Some(2));
    assert!(rd.messages.iter().all(Message::needs_persisted_state));
}

// Reference: section 5.2. A candidate that receives AppendEntries from a leader of its term
// returns to follower state.
#[test]
fn candidate_steps_down_for_leader_of_same_term() {
    let mut r = core(no_pre_vote(1, 3), MemLogStore::new(), 0, 0);
    r.hup();
    let _ = r.ready().expect("ready");
    r.advance();
    assert_eq!(r.role(), Role::Candidate);
    r.step(msg(
        2,
        1,
        1,
        MessageBody::AppendRequest {
            prev_log_index: 0,
            prev_log_term: 0,
            entries: vec![],
            leader_commit: 0,
            read_context: 0,
        },
    ))
    .expect("step");
    assert_eq!(r.role(), Role::Follower);
    assert_eq!(r.leader(), 2);
    assert_eq!(r.term(), 1);
}

// Reference: section 5.1. A server that sees a higher term adopts it and becomes a follower;
// requests with a stale term are rejected.
#[test]
fn higher_term_deposes_and_stale_term_is_rejected() {
    let mut net = Net::new(3);
    net.elect(1);
    assert_eq!(net.leaders(), vec![1]);
    let t = net.node(1).term();
    net.node(1)
        .step(msg(
            2,
            1,
            t + 5,
            MessageBody::AppendResponse {
                success: false,
                index: 0,
                reject_hint_index: 0,
                reject_hint_term: 0,
                read_context: 0,
            },
        ))
        .expect("step");
    assert_eq!(net.node(1).role(), Role::Follower);
    assert_eq!(net.node(1).term(), t + 5);

    // A stale append is answered with our term and changes nothing.
    let mut r = core(config(1, 3), MemLogStore::new(), 5, 0);
    r.step(msg(
        2,
        1,
        3,
        MessageBody::AppendRequest {
            prev_log_index: 0,
            prev_log_term: 0,
            entries: vec![entry(1, 3)],
            leader_commit: 1,
            read_context: 0,
        },
    ))
    .expect("step");
    assert_eq!(r.term(), 5);
    assert_eq!(r.last_index(), 0);
    let rd = r.ready().expect("ready");
    assert_eq!(rd.messages.len(), 1);
    assert_eq!(rd.messages[0].term, 5);
    assert!(matches!(
        rd.messages[0].body,
        MessageBody::AppendResponse { success: false, .. }
    ));
}

// Messages addressed to another node, or claiming to come from this node or from nobody, change
// nothing (the transport checks too; the core does not rely on it). A vote request from a
// removed node is refused in this node's term, which it keeps (hashicorp/raft#524).
#[test]
fn misaddressed_and_foreign_messages_are_ignored() {
    let vote = |from, to| Message {
        from,
        to,
        term: 9,
        body: MessageBody::VoteRequest {
            pre_vote: false,
            last_log_index: 9,
            last_log_term: 9,
            leader_transfer: false,
        },
    };
    for (from, to) in [(2, 3), (1, 1), (0, 1)] {
        let mut r = core(no_pre_vote(1, 3), MemLogStore::new(), 2, 0);
        r.step(vote(from, to)).expect("step");
        assert_eq!(r.term(), 2, "from {from} to {to}");
        assert!(
            !r.has_ready(),
            "from {from} to {to}: no answer, no state change"
        );
    }
    let mut c = no_pre_vote(1, 3);
    c.members.removed.insert(7);
    let mut r = core(c, MemLogStore::new(), 2, 0);
    r.step(vote(7, 1)).expect("step");
    assert_eq!(r.term(), 2, "a removed node does not change the term");
    let rd = r.ready().expect("ready");
    assert_eq!(rd.hard_state, None, "nor the vote");
    assert_eq!(
        rd.messages,
        vec![Message {
            from: 1,
            to: 7,
            term: 2,
            body: MessageBody::VoteResponse {
                pre_vote: false,
                granted: false
            },
        }]
    );
}

// Reference: section 5.4.1. A voter denies its vote if its own log is more up-to-date.
#[test]
fn vote_denied_to_candidate_with_stale_log() {
    // (voter log terms, candidate last index, candidate last term, granted)
    let cases: &[(&[Term], LogIndex, Term, bool)] = &[
        (&[1, 2], 2, 2, true),
        (&[1, 2], 3, 2, true),
        (&[1, 2], 1, 2, false),
        (&[1, 2], 5, 1, false),
        (&[1, 2], 1, 3, true),
        (&[], 0, 0, true),
    ];
    for &(terms, li, lt, want) in cases {
        let mut store = MemLogStore::new();
        store.append(&log_terms(terms));
        let mut r = core(no_pre_vote(1, 3), store, 3, 0);
        r.step(msg(
            2,
            1,
            4,
            MessageBody::VoteRequest {
                pre_vote: false,
                last_log_index: li,
                last_log_term: lt,
                leader_transfer: false,
            },
        ))
        .expect("step");
        let rd = r.ready().expect("ready");
        let granted = matches!(
            rd.messages[0].body,
            MessageBody::VoteResponse { granted: true, .. }
        );
        assert_eq!(granted, want, "voter {terms:?} candidate ({li}, {lt})");
    }
}

// ---------------------------------------------------------------------------------------------
// 5.3 Log replication
// ---------------------------------------------------------------------------------------------

// Reference: section 5.3. A new leader appends a no-op of its term, replicates it and commits
// once a majority has it; followers learn the commit index and apply.
#[test]
fn leader_commits_noop_and_proposals_on_majority() {
    let mut net = Net::new(5);
    net.elect(1);
    let (index, term) = net.propose(1, "x=1").expect("leader accepts");
    assert_eq!((index, term), (2, 1));
    for id in 1..=5 {
        assert_eq!(net.log_of(id), vec![(1, 1), (2, 1)], "node {id}");
    }
    assert_eq!(net.node(1).commit_index(), 2);
    // Followers learn the new commit index from the next message.
    net.tick_all();
    for id in 1..=5 {
        let applied = &net.applied[&id];
        assert_eq!(applied.len(), 2, "node {id} applied {applied:?}");
        assert_eq!(applied[0].kind, EntryKind::Noop);
        assert_eq!(applied[1].data, Bytes::from("x=1"));
    }
}

// A leader counts itself toward a quorum only for entries it has made durable: an entry still
// waiting for its own write is committed only if enough followers have it.
#[test]
fn leader_does_not_count_its_unpersisted_entries() {
    let mut net = Net::new(3);
    net.elect(1);
    let commit = net.node(1).commit_index();
    let r = net.node(1);
    let (index, term) = r.propose(Bytes::from("x")).expect("leader");
    // Node 2 claims the entry before the leader has written it (an asynchronous runtime could
    // see this order); one follower plus an unwritten leader copy is not a majority of 3.
    r.step(Message {
        from: 2,
        to: 1,
        term,
        body: MessageBody::AppendResponse {
            success: true,
            index,
            reject_hint_index: 0,
            reject_hint_term: 0,
            read_context: 0,
        },
    })
    .expect("step");
    assert_eq!(
        r.commit_index(),
        commit,
        "committed before the leader's own write"
    );
    // Once the leader's write is done, the same two copies are a majority.
    let rd = r.ready().expect("ready");
    r.store_mut().append(&rd.entries);
    r.advance();
    assert_eq!(r.commit_index(), index);
}

// Reference: section 5.3. A leader with only a minority cannot commit.
#[test]
fn minority_leader_does_not_commit() {
    let mut net = Net::new(5);
    net.elect(1);
    net.isolate(3);
    net.isolate(4);
    net.isolate(5);
    net.propose(1, "lost").expect("still leader");
    assert_eq!(net.node(1).last_index(), 2);
    assert_eq!(net.node(1).commit_index(), 1);
    net.heal();
    // The lost append stalls the pipeline to 3..5 until a heartbeat notices (at most 3 rounds).
    for _ in 0..3 {
        net.tick_all();
    }
    assert_eq!(net.node(1).commit_index(), 2);
}

// Reference: section 5.3. The follower rejects an append whose previous entry does not match,
// and truncates a conflicting suffix when it does match.
#[test]
fn follower_consistency_check_and_truncation() {
    // Follower log: 1@1 2@2 3@2.
    let mk = || {
        let mut store = MemLogStore::new();
        store.append(&log_terms(&[1, 2, 2]));
        core(config(1, 3), store, 2, 1)
    };
    let append = |prev_log_index, prev_log_term, entries: Vec<Entry>| {
        msg(
            2,
            1,
            3,
            MessageBody::AppendRequest {
                prev_log_index,
                prev_log_term,
                entries,
                leader_commit: 3,
                read_context: 0,
            },
        )
    };
    // (prev index, prev term, entries, success, resulting log terms)
    type Case = (LogIndex, Term, Vec<Entry>, bool, Vec<Term>);
    let cases: Vec<Case> = vec![
        (3, 2, vec![entry(4, 3)], true, vec![1, 2, 2, 3]),
        (3, 3, vec![entry(4, 3)], false, vec![1, 2, 2]),
        (5, 2, vec![entry(6, 3)], false, vec![1, 2, 2]),
        (1, 1, vec![entry(2, 3)], true, vec![1, 3]),
        (2, 2, vec![entry(3, 2), entry(4, 3)], true, vec![1, 2, 2, 3]),
        (2, 2, vec![entry(3, 2)], true, vec![1, 2, 2]),
    ];
    for (pi, pt, entries, ok, want) in cases {
        let mut r = mk();
        r.step(append(pi, pt, entries)).expect("step");
        let rd = r.ready().expect("ready");
        let MessageBody::AppendResponse { success, .. } = rd.messages[0].body else {
            panic!("expected an append response");
        };
        assert_eq!(success, ok, "prev ({pi}, {pt})");
        let last = r.last_index();
        let got: Vec<Term> = r
            .entries(1, last + 1)
            .expect("entries")
            .iter()
            .map(|e| e.term)
            .collect();
        assert_eq!(got, want, "prev ({pi}, {pt})");
        r.store_mut().append(&rd.entries);
        r.advance();
        r.check_invariants();
    }
}

// Reference: section 5.3 and Figure 7. Whatever the follower's log, the leader brings it in line
// with its own: missing entries are filled in, extra uncommitted ones are replaced.
#[test]
fn leader_syncs_follower_logs_of_figure_7() {
    let leader: &[Term] = &[1, 1, 1, 4, 4, 5, 5, 6, 6, 6];
    let followers: &[&[Term]] = &[
        &[1, 1, 1, 4, 4, 5, 5, 6, 6],
        &[1, 1, 1, 4],
        &[1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],
        &[1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],
        &[1, 1, 1, 4, 4, 4, 4],
        &[1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],
    ];
    for (i, &f) in followers.iter().enumerate() {
        let mut net = Net::new(3);
        net.set_log(1, config(1, 3), &log_terms(leader), 7);
        net.set_log(2, config(2, 3), &log_terms(f), 7);
        net.set_log(3, config(3, 3), &[], 7);
        net.elect(1);
        assert_eq!(
            net.leaders(),
            vec![1],
            "follower ({})",
            (b'a' + i as u8) as char
        );
        net.propose(1, "after").expect("leader");
        net.tick_all();
        let want = net.log_of(1);
        assert_eq!(want.len(), 12, "leader log + no-op + proposal");
        assert_eq!(
            net.log_of(2),
            want,
            "follower ({})",
            (b'a' + i as u8) as char
        );
        assert_eq!(net.node(2).commit_index(), 12);
    }
}

// Reference: section 5.3. A conflict inside entries not yet durable (two leaders' appends in one
// batch of input) cuts exactly there; one inside durable entries replaces them from there on.
#[test]
fn log_truncation_inside_and_below_the_unstable_entries() {
    use super::log::RaftLog;
    let mut store = MemLogStore::new();
    store.append(&log_terms(&[1, 1]));
    let mut log = RaftLog::new(store, 0, 0);
    let terms_of = |log: &RaftLog<MemLogStore>| -> Vec<Term> {
        log.entries(1, log.last_index() + 1, usize::MAX)
            .expect("entries")
            .iter()
            .map(|e| e.term)
            .collect()
    };
    log.append(&[entry(3, 1), entry(4, 1), entry(5, 1), entry(6, 1)]);
    log.append(&[entry(5, 2)]);
    log.check_invariants();
    let terms = terms_of(&log);
    assert_eq!(terms, vec![1, 1, 1, 1, 2]);
    assert_eq!(log.unstable_entries().first().map(|e| e.index), Some(3));
    // Now below the unstable part: the durable entry 2 is replaced too.
    log.append(&[entry(2, 3)]);
    log.check_invariants();
    let terms = terms_of(&log);
    assert_eq!(terms, vec![1, 3]);
    assert_eq!(log.unstable_entries(), &[entry(2, 3)]);
}

// Fast backtracking's search: the last index at or before `index` whose term is at most `term`
// (Figure 7's leader log: terms 1 1 1 4 4 5 5 6 6 6).
#[test]
fn find_conflict_by_term_on_figure_7() {
    use super::log::RaftLog;
    let mut store = MemLogStore::new();
    store.append(&log_terms(&[1, 1, 1, 4, 4, 5, 5, 6, 6, 6]));
    let log = RaftLog::new(store, 0, 0);
    assert_eq!(log.find_conflict_by_term(10, 6), (10, 6));
    assert_eq!(log.find_conflict_by_term(10, 4), (5, 4));
    assert_eq!(log.find_conflict_by_term(10, 3), (3, 1));
    assert_eq!(log.find_conflict_by_term(7, 5), (7, 5));
    assert_eq!(
        log.find_conflict_by_term(12, 7),
        (10, 6),
        "beyond the log: from its end"
    );
    assert_eq!(log.find_conflict_by_term(10, 0), (0, 0));
    assert_eq!(log.first_index(), 1);
}

// Entries across the durable and not-yet-durable parts, whole and under byte budgets (each test
// entry is 3 bytes of data + 24 of overhead = 27 bytes).
#[test]
fn entries_span_durable_and_unstable_parts_within_budget() {
    use super::log::RaftLog;
    let mut store = MemLogStore::new();
    store.append(&log_terms(&[1, 1, 1]));
    let mut log = RaftLog::new(store, 0, 0);
    log.append(&[entry(4, 2), entry(5, 2), entry(6, 2)]);
    let idx = |v: Vec<Entry>| v.iter().map(|e| e.index).collect::<Vec<_>>();
    let size = entry(1, 1).size_bytes();
    assert_eq!(
        idx(log.entries(2, 6, usize::MAX).expect("entries")),
        vec![2, 3, 4, 5]
    );
    assert_eq!(
        idx(log.entries(4, 7, usize::MAX).expect("entries")),
        vec![4, 5, 6]
    );
    assert_eq!(
        idx(log.entries(1, 7, 2 * size).expect("entries")),
        vec![1, 2],
        "budget ends in the durable part"
    );
    assert_eq!(
        idx(log.entries(2, 7, 3 * size).expect("entries")),
        vec![2, 3, 4],
        "budget ends in the unstable part"
    );
    assert_eq!(
        idx(log.entries(2, 7, 3 * size + 1).expect("entries")),
        vec![2, 3, 4]
    );
    assert_eq!(
        idx(log.entries(4, 7, 2 * size).expect("entries")),
        vec![4, 5],
        "budget within the unstable part"
    );
    assert_eq!(
        idx(log.entries(3, 7, 1).expect("entries")),
        vec![3],
        "at least one"
    );
    assert_eq!(
        idx(log.entries(5, 7, 1).expect("entries")),
        vec![5],
        "at least one, unstable"
    );
    assert_eq!(
        idx(log.entries(3, 3, usize::MAX).expect("entries")),
        Vec::<u64>::new()
    );
    assert!(
        log.entries(5, 8, usize::MAX).is_err(),
        "beyond the last index"
    );
}

// Fast backtracking: a follower with a long divergent suffix is repaired in a number of round
// trips bounded by the number of conflicting terms, not entries.
#[test]
fn conflicting_terms_are_skipped_in_one_round_trip_each() {
    let mut leader_terms = vec![1u64; 5];
    leader_terms.extend(std::iter::repeat_n(4, 50));
    let mut follower_terms = vec![1u64; 5];
    follower_terms.extend(std::iter::repeat_n(2, 30));
    follower_terms.extend(std::iter::repeat_n(3, 30));
    let mut net = Net::new(3);
    net.set_log(1, config(1, 3), &log_terms(&leader_terms), 5);
    net.set_log(2, config(2, 3), &log_terms(&follower_terms), 5);
    net.set_log(3, config(3, 3), &[], 5);
    net.elect(1);
    net.tick_all();
    let rejects = net
        .delivered
        .iter()
        .filter(|m| {
            m.from == 2 && matches!(m.body, MessageBody::AppendResponse { success: false, .. })
        })
        .count();
    assert!(rejects <= 3, "{rejects} rejections for 2 conflicting terms");
    assert_eq!(net.log_of(2), net.log_of(1));
}

// ---------------------------------------------------------------------------------------------
// 5.4 Safety
// ---------------------------------------------------------------------------------------------

// Reference: section 5.4.1. A candidate whose log lacks a committed entry cannot be elected.
#[test]
fn candidate_missing_committed_entries_loses() {
    let mut net = Net::new(3);
    net.elect(1);
    net.isolate(3);
    net.propose(1, "a").expect("leader");
    net.propose(1, "b").expect("leader");
    assert_eq!(net.node(1).commit_index(), 3);
    net.heal();
    net.isolate(1);
    // Node 3 missed the committed entries; node 2 refuses it.
    net.node(3).hup();
    net.settle();
    assert_ne!(net.node(3).role(), Role::Leader);
    net.node(2).hup();
    net.settle();
    assert_eq!(net.node(2).role(), Role::Leader);
}

// Reference: section 5.4.2 and Figure 8. A leader never commits an entry of an earlier term by
// counting replicas: index 2 (term 2) reaches a majority under the term-4 leader but stays
// uncommitted until an entry of term 4 commits; so a later leader may still replace it.
#[test]
fn figure_8_old_term_entry_is_not_committed_by_counting() {
    let cfg = |id| {
        let mut c = config(id, 5);
        c.check_quorum = false;
        c.max_msg_bytes = 1; // one entry per append, so index 2 can arrive without index 3
        c
    };
    let mut net = Net::new(5);
    net.set_log(1, cfg(1), &log_terms(&[1, 2]), 3);
    net.set_log(2, cfg(2), &log_terms(&[1, 2]), 3);
    net.set_log(3, cfg(3), &log_terms(&[1]), 3);
    net.set_log(4, cfg(4), &log_terms(&[1]), 3);
    net.set_log(5, cfg(5), &log_terms(&[1, 3]), 4);
    // S5 is down while S1 leads. S1's no-op (term 4) never reaches a node that holds index 2:
    // every append carrying it to such a node is lost.
    net.cut.insert((1, 5));
    net.cut.insert((5, 1));
    let holders = std::cell::RefCell::new(std::collections::BTreeSet::from([1u64, 2]));
    net.filter = Some(Box::new(move |m: &Message| match &m.body {
        MessageBody::AppendRequest { entries, .. } => {
            if entries.iter().any(|e| e.index == 2 && e.term == 2) {
                holders.borrow_mut().insert(m.to);
            }
            !(entries.iter().any(|e| e.term == 4) && holders.borrow().contains(&m.to))
        }
        _ => true,
    }));
    net.elect(1);
    assert_eq!(net.node(1).role(), Role::Leader);
    assert_eq!(net.node(1).term(), 4);
    for _ in 0..3 {
        net.tick_all();
    }
    let with_2_at_2 = (1..=5)
        .filter(|&id| net.log_of(id).get(1) == Some(&(2, 2)))
        .count();
    assert!(with_2_at_2 >= 3, "index 2 (term 2) reached a majority");
    for id in 1..=5 {
        assert!(
            net.node(id).commit_index() < 2,
            "node {id} committed an old-term entry by counting"
        );
    }
    // S1 goes away; S5 (last term 3) is elected and overwrites index 2 everywhere.
    net.filter = None;
    net.isolate(1);
    net.elect(5);
    assert_eq!(net.node(5).role(), Role::Leader);
    net.tick_all();
    for id in 2..=5 {
        assert_eq!(net.log_of(id)[..2], [(1, 1), (2, 3)], "node {id}");
        assert!(
            net.applied[&id].iter().all(|e| e.term != 2),
            "node {id} applied the overwritten entry"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Dissertation 9.6 pre-vote and 6.2 check-quorum
// ---------------------------------------------------------------------------------------------

// Reference: dissertation 9.6. A pre-vote is granted only for a later term: a node asking about
// our own term (it is behind us) is refused while we have a leader.
#[test]
fn pre_vote_for_the_current_term_is_refused() {
    let mut net = Net::new(3);
    net.elect(1);
    let term = net.node(2).term();
    net.node(2)
        .step(Message {
            from: 3,
            to: 2,
            term,
            body: MessageBody::VoteRequest {
                pre_vote: true,
                last_log_index: 100,
                last_log_term: term,
                leader_transfer: false,
            },
        })
        .expect("step");
    let rd = net.node(2).ready().expect("ready");
    let answer = rd
        .messages
        .iter()
        .find(|m| m.to == 3)
        .map(|m| m.body.clone());
    assert_eq!(
        answer,
        Some(MessageBody::VoteResponse {
            pre_vote: true,
            granted: false
        })
    );
    net.node(2).advance();
}

// A pre-candidate counts only pre-vote answers: real votes do not make it a candidate, and a
// quorum of refusals (at its own term) sends it back to follower.
#[test]
fn pre_candidate_counts_only_pre_votes() {
    let mut r = core(config(1, 3), MemLogStore::new(), 4, 0);
    r.hup();
    assert_eq!(r.role(), Role::PreCandidate);
    let _ = r.ready().expect("ready");
    r.advance();
    // Refusals of a real vote (at our term) are not pre-vote answers.
    for from in [2, 3] {
        r.step(Message {
            from,
            to: 1,
            term: 4,
            body: MessageBody::VoteResponse {
                pre_vote: false,
                granted: false,
            },
        })
        .expect("step");
    }
    assert_eq!(
        r.role(),
        Role::PreCandidate,
        "real-vote answers are not pre-votes"
    );
    for from in [2, 3] {
        r.step(Message {
            from,
            to: 1,
            term: 4,
            body: MessageBody::VoteResponse {
                pre_vote: true,
                granted: false,
            },
        })
        .expect("step");
    }
    assert_eq!(r.role(), Role::Follower, "a quorum refused");
    assert_eq!(r.term(), 4);
}

// A node cut off from the cluster keeps timing out, but with pre-vote it never raises its term;
// when it comes back it does not depose the healthy leader.
#[test]
fn pre_vote_keeps_partitioned_node_from_disrupting() {
    let mut net = Net::new(3);
    net.elect(1);
    let term = net.node(1).term();
    net.isolate(3);
    for _ in 0..100 {
        net.tick_all();
    }
    assert_eq!(net.node(3).term(), term, "pre-vote failed; term unchanged");
    net.heal();
    for _ in 0..5 {
        net.tick_all();
    }
    assert_eq!(net.leaders(), vec![1]);
    assert_eq!(net.node(1).term(), term);
    assert_eq!(net.node(3).leader(), 1);
}

// Without pre-vote the same node does raise its term (the behaviour pre-vote prevents).
#[test]
fn without_pre_vote_partitioned_node_raises_its_term() {
    let mut net = Net::with(3, |id, n| {
        let mut c = no_pre_vote(id, n);
        c.check_quorum = false;
        c
    });
    net.elect(1);
    let term = net.node(1).term();
    net.isolate(3);
    for _ in 0..100 {
        net.tick_all();
    }
    assert!(net.node(3).term() > term);
}

// The lease lasts exactly the minimum election timeout: a vote request one tick earlier is
// ignored, one at the boundary is answered.
#[test]
fn lease_ends_at_the_minimum_election_timeout() {
    for seed in 0..50 {
        let mut c = config(2, 3);
        c.seed = seed;
        let mut r = core(c, MemLogStore::new(), 1, 0);
        let heartbeat = msg(
            1,
            2,
            1,
            MessageBody::AppendRequest {
                prev_log_index: 0,
                prev_log_term: 0,
                entries: vec![],
                leader_commit: 0,
                read_context: 0,
            },
        );
        r.step(heartbeat).expect("step");
        let _ = r.ready().expect("ready");
        r.advance();
        for _ in 0..9 {
            r.tick();
        }
        let request = |r: &mut Raft<MemLogStore>| {
            r.step(msg(
                3,
                2,
                2,
                MessageBody::VoteRequest {
                    pre_vote: false,
                    last_log_index: 5,
                    last_log_term: 1,
                    leader_transfer: false,
                },
            ))
            .expect("step")
        };
        request(&mut r);
        assert_eq!(
            r.term(),
            1,
            "9 ticks after the leader spoke: still in the lease"
        );
        r.tick();
        if r.role() != Role::Follower {
            continue; // this seed's timeout was exactly the minimum: it campaigned itself
        }
        request(&mut r);
        assert_eq!(
            r.term(),
            2,
            "at the minimum election timeout the lease is over"
        );
        return;
    }
    panic!("no seed kept the node a follower for the minimum election timeout");
}

// A pre-vote request from a node behind us is refused at once, with our term.
#[test]
fn pre_vote_from_an_older_term_is_refused_with_our_term() {
    let mut r = core(config(1, 3), MemLogStore::new(), 5, 0);
    r.step(msg(
        2,
        1,
        3,
        MessageBody::VoteRequest {
            pre_vote: true,
            last_log_index: 0,
            last_log_term: 0,
            leader_transfer: false,
        },
    ))
    .expect("step");
    let rd = r.ready().expect("ready");
    assert_eq!(
        rd.messages,
        vec![msg(
            1,
            2,
            5,
            MessageBody::VoteResponse {
                pre_vote: true,
                granted: false
            }
        )]
    );
}

// Once a follower has acknowledged, the leader streams to it (Replicate): each new batch of
// proposals goes out without waiting for the previous one's answer (Probe would send one).
#[test]
fn leader_pipelines_appends_to_a_caught_up_follower() {
    let mut net = Net::new(3);
    net.elect(1);
    net.propose(1, "warm-up").expect("leader");
    let r = net.node(1);
    let mut appends_to_2 = 0;
    for i in 0..3 {
        r.propose(Bytes::from(format!("v{i}"))).expect("leader");
        let rd = r.ready().expect("ready");
        appends_to_2 += rd
            .messages
            .iter()
            .filter(|m| m.to == 2 && matches!(&m.body, MessageBody::AppendRequest { entries, .. } if !entries.is_empty()))
            .count();
        r.store_mut().append(&rd.entries);
        r.advance();
    }
    assert_eq!(appends_to_2, 3, "three appends in flight at once");
}

// A probe that is lost does not stall a follower: the next heartbeat's answer allows another.
#[test]
fn lost_probe_is_retried_after_a_heartbeat() {
    let mut net = Net::new(3);
    net.elect(1);
    net.isolate(3);
    for i in 0..5 {
        net.propose(1, &format!("v{i}")).expect("leader");
    }
    net.heal();
    // The first append that carries entries to node 3 is lost.
    let dropped = std::cell::Cell::new(false);
    net.filter = Some(Box::new(move |m: &Message| {
        let carries =
            matches!(&m.body, MessageBody::AppendRequest { entries, .. } if !entries.is_empty());
        if m.to == 3 && carries && !dropped.get() {
            dropped.set(true);
            return false;
        }
        true
    }));
    for _ in 0..4 {
        net.tick_all();
    }
    assert_eq!(net.log_of(3), net.log_of(1));
}

// Check-quorum: a leader that cannot hear from a majority steps down.
#[test]
fn check_quorum_leader_steps_down_when_isolated() {
    let mut net = Net::new(5);
    net.elect(1);
    net.isolate(1);
    for _ in 0..25 {
        net.node(1).tick();
        net.settle();
    }
    assert_eq!(net.node(1).role(), Role::Follower);
    assert_eq!(net.node(1).leader(), 0);
}

// Check-quorum lease: a follower that heard from the leader within the minimum election timeout
// ignores a vote request, even one with a higher term.
#[test]
fn follower_in_lease_ignores_vote_requests() {
    let mut net = Net::new(3);
    net.elect(1);
    let term = net.node(1).term();
    net.node(2)
        .step(msg(
            3,
            2,
            term + 1,
            MessageBody::VoteRequest {
                pre_vote: false,
                last_log_index: 100,
                last_log_term: 100,
                leader_transfer: false,
            },
        ))
        .expect("step");
    assert_eq!(net.node(2).term(), term);
    assert!(!net.node(2).has_ready() || net.node(2).ready().expect("ready").messages.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Client requests
// ---------------------------------------------------------------------------------------------

#[test]
fn propose_on_follower_names_the_leader() {
    let mut net = Net::new(3);
    net.elect(2);
    let err = net.propose(1, "x").expect_err("follower refuses");
    assert!(matches!(err, Error::NotLeader { leader: 2 }), "{err:?}");
    let err = net.node(1).read_index(7).expect_err("follower refuses");
    assert!(matches!(err, Error::NotLeader { leader: 2 }), "{err:?}");
}

#[test]
fn uncommitted_budget_drops_proposals() {
    let mut net = Net::with(3, |id, n| {
        let mut c = config(id, n);
        c.max_uncommitted_bytes = 200;
        c
    });
    net.elect(1);
    net.isolate(2);
    net.isolate(3);
    let mut accepted = 0;
    let err = loop {
        match net.propose(1, &"v".repeat(40)) {
            Ok(_) => accepted += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, Error::ProposalDropped(_)), "{err:?}");
    assert!((2..=4).contains(&accepted), "accepted {accepted}");
    net.heal();
    for _ in 0..3 {
        net.tick_all();
    }
    net.propose(1, "ok").expect("budget freed after commit");
}

// ReadIndex (dissertation 6.4): the read is released only after a quorum heartbeat round that
// started after it arrived, with the commit index as of its arrival.
#[test]
fn read_index_waits_for_quorum_round() {
    let mut net = Net::new(3);
    net.elect(1);
    net.propose(1, "x").expect("leader");
    net.node(1).read_index(42).expect("leader");
    assert!(
        net.read_states.get(&1).is_none_or(|v| v.is_empty()),
        "not before the round"
    );
    net.settle();
    assert_eq!(net.read_states[&1], vec![ReadState { ctx: 42, index: 2 }]);
}

// A read is confirmed only by a heartbeat round that started after it arrived: answers to an
// older round prove nothing about leadership at the time of the read.
#[test]
fn read_is_not_confirmed_by_an_older_round() {
    let mut net = Net::new(3);
    net.elect(1);
    let r = net.node(1);
    let term = r.term();
    let round_of = |r: &mut Raft<MemLogStore>, ctx| {
        r.read_index(ctx).expect("leader");
        let rd = r.ready().expect("ready");
        r.advance();
        rd.messages
            .iter()
            .find_map(|m| match m.body {
                MessageBody::AppendRequest { read_context, .. } => Some(read_context),
                _ => None,
            })
            .expect("a heartbeat round went out")
    };
    let first = round_of(r, 1);
    let second = round_of(r, 2);
    assert!(second > first);
    // Both followers answer the first round only: read 1 is confirmed, read 2 is not.
    for from in [2, 3] {
        r.step(Message {
            from,
            to: 1,
            term,
            body: MessageBody::AppendResponse {
                success: true,
                index: 1,
                reject_hint_index: 0,
                reject_hint_term: 0,
                read_context: first,
            },
        })
        .expect("step");
    }
    let rd = r.ready().expect("ready");
    assert_eq!(rd.read_states, vec![ReadState { ctx: 1, index: 1 }]);
    r.advance();
}

// Committed entries are handed out in slices of max_apply_bytes; has_ready keeps reporting the
// rest until all are applied.
#[test]
fn committed_entries_are_applied_in_slices() {
    let mut net = Net::with(3, |id, n| {
        let mut c = config(id, n);
        c.max_apply_bytes = 1;
        c
    });
    net.elect(1);
    for i in 0..4 {
        net.propose_no_settle(1, &format!("v{i}")).expect("leader");
    }
    net.settle();
    net.tick_all();
    for id in 1..=3 {
        assert_eq!(
            net.applied[&id].len(),
            5,
            "node {id}: no-op and four proposals"
        );
    }
}

// Whether a Ready needs an fsync: new entries, a new term or a new vote do; a new commit index
// alone does not (it can be re-learned from the leader).
#[test]
fn must_sync_exactly_when_entries_term_or_vote_change() {
    let mut r = core(no_pre_vote(1, 3), MemLogStore::new(), 0, 0);
    // New term and vote (campaign).
    r.hup();
    let rd = r.ready().expect("ready");
    assert!(rd.must_sync);
    r.advance();
    // A vote granted in the same term as ours: vote changes, term does not.
    let mut f = core(no_pre_vote(2, 3), MemLogStore::new(), 1, 0);
    f.step(msg(
        1,
        2,
        1,
        MessageBody::VoteRequest {
            pre_vote: false,
            last_log_index: 0,
            last_log_term: 0,
            leader_transfer: false,
        },
    ))
    .expect("step");
    let rd = f.ready().expect("ready");
    assert_eq!(rd.hard_state.map(|h| (h.term, h.vote)), Some((1, 1)));
    assert!(rd.must_sync, "a vote must be durable before it is sent");
    f.advance();
    // Entries in the same term.
    f.step(msg(
        1,
        2,
        1,
        MessageBody::AppendRequest {
            prev_log_index: 0,
            prev_log_term: 0,
            entries: vec![entry(1, 1)],
            leader_commit: 0,
            read_context: 0,
        },
    ))
    .expect("step");
    let rd = f.ready().expect("ready");
    assert!(rd.must_sync && rd.hard_state.is_none_or(|h| h.term == 1 && h.vote == 1));
    f.store_mut().append(&rd.entries);
    f.advance();
    // Only the commit index moves.
    f.step(msg(
        1,
        2,
        1,
        MessageBody::AppendRequest {
            prev_log_index: 1,
            prev_log_term: 1,
            entries: vec![],
            leader_commit: 1,
            read_context: 0,
        },
    ))
    .expect("step");
    let rd = f.ready().expect("ready");
    assert_eq!(rd.hard_state.map(|h| h.commit), Some(1));
    assert!(rd.entries.is_empty());
    assert!(!rd.must_sync, "a commit index alone needs no fsync");
    assert_eq!(rd.committed_entries.len(), 1, "and the entry is applied");
    f.advance();
}

#[test]
fn many_reads_share_one_round() {
    let mut net = Net::new(3);
    net.elect(1);
    let before = net.delivered.len();
    for ctx in 1..=100 {
        net.node(1).read_index(ctx).expect("leader");
    }
    net.settle();
    let heartbeats = net.delivered[before..]
        .iter()
        .filter(|m| matches!(m.body, MessageBody::AppendRequest { .. }))
        .count();
    assert_eq!(heartbeats, 2, "one round to the two followers");
    assert_eq!(net.read_states[&1].len(), 100);
}

#[test]
fn isolated_leader_cannot_serve_reads() {
    let mut net = Net::new(3);
    net.elect(1);
    net.isolate(1);
    net.node(1).read_index(9).expect("still thinks it leads");
    for _ in 0..30 {
        net.node(1).tick();
        net.settle();
    }
    assert!(net.read_states.get(&1).is_none_or(|v| v.is_empty()));
    assert_eq!(
        net.dropped_reads[&1],
        vec![9],
        "stepping down drops the read"
    );
}

// A new leader serves reads only once it has committed an entry of its own term: until then its
// commit index may be behind what the previous leader committed.
#[test]
fn read_before_first_commit_waits_for_noop() {
    let mut net = Net::new(3);
    net.isolate(2);
    net.isolate(3);
    net.node(1).hup();
    net.settle();
    assert_ne!(net.node(1).role(), Role::Leader);
    net.heal();
    // Win the election but keep the no-op from committing.
    net.filter = Some(Box::new(|m: &Message| {
        !matches!(m.body, MessageBody::AppendRequest { .. })
    }));
    net.elect(1);
    assert_eq!(net.node(1).role(), Role::Leader);
    net.node(1).read_index(5).expect("leader");
    net.settle();
    assert!(net.read_states.get(&1).is_none_or(|v| v.is_empty()));
    net.filter = None;
    net.tick_all();
    net.tick_all();
    let rs = &net.read_states[&1];
    assert_eq!(rs.len(), 1);
    assert!(rs[0].index >= 1, "served at or after the no-op");
}

#[test]
fn single_node_cluster_commits_and_reads_alone() {
    let mut net = Net::new(1);
    net.elect(1);
    assert_eq!(net.leaders(), vec![1]);
    net.propose(1, "solo").expect("leader");
    assert_eq!(net.node(1).commit_index(), 2);
    net.node(1).read_index(1).expect("leader");
    net.settle();
    assert_eq!(net.read_states[&1], vec![ReadState { ctx: 1, index: 2 }]);
}

// A leader's append loses nothing and is idempotent: duplicated or reordered messages leave the
// follower's log as the leader's.
#[test]
fn duplicate_and_stale_appends_are_harmless() {
    let mut net = Net::new(3);
    net.elect(1);
    for i in 0..5 {
        net.propose(1, &format!("v{i}")).expect("leader");
    }
    let old: Vec<Message> = net
        .delivered
        .iter()
        .filter(|m| m.to == 2 && matches!(m.body, MessageBody::AppendRequest { .. }))
        .cloned()
        .collect();
    for m in old.into_iter().rev() {
        net.node(2).step(m).expect("step");
        net.settle();
    }
    assert_eq!(net.log_of(2), net.log_of(1));
    // The last commit index travels with the next append or heartbeat.
    net.tick_all();
    assert_eq!(net.node(2).commit_index(), net.node(1).commit_index());
}

#[test]
fn invalid_configs_are_refused() {
    let base = || config(1, 3);
    let bad = [
        Config { id: 0, ..base() },
        Config {
            members: ClusterConfig::with_voters([1, 0, 2]),
            ..base()
        },
        Config {
            heartbeat_ticks: 20,
            ..base()
        },
        // A heartbeat as long as the minimum election timeout, or none at all.
        Config {
            heartbeat_ticks: 10,
            ..base()
        },
        Config {
            heartbeat_ticks: 0,
            ..base()
        },
        Config {
            election_ticks_max: 5,
            ..base()
        },
        // No pipelining at all.
        Config {
            max_inflight_msgs: 0,
            ..base()
        },
    ];
    for c in bad {
        let r = Raft::new(c.clone(), MemLogStore::new(), HardState::default(), 0);
        assert!(matches!(r, Err(Error::Config(_))), "{c:?}");
    }
    // A fixed election timeout (min == max) is allowed.
    let fixed = Config {
        election_ticks_min: 12,
        election_ticks_max: 12,
        ..base()
    };
    assert!(Raft::new(fixed, MemLogStore::new(), HardState::default(), 0).is_ok());
}

// A new commit index alone sends nothing: it rides on the next append or heartbeat. So a write
// costs one append and one answer per follower, not a second round to spread the commit.
#[test]
fn commit_index_rides_on_the_next_append_or_heartbeat() {
    let mut net = Net::new(3);
    net.elect(1);
    net.tick_all(); // the followers learn that the no-op (index 1) is committed
    assert_eq!(net.node(2).commit_index(), 1);
    let before = net.delivered.len();
    net.propose(1, "x").expect("leader");
    let count = |net: &Net, pick: fn(&MessageBody) -> bool| {
        net.delivered[before..]
            .iter()
            .filter(|m| pick(&m.body))
            .count()
    };
    assert_eq!(
        count(&net, |b| matches!(b, MessageBody::AppendRequest { .. })),
        2,
        "one append per follower"
    );
    assert_eq!(
        count(&net, |b| matches!(b, MessageBody::AppendResponse { .. })),
        2,
        "one answer per follower"
    );
    assert_eq!(net.node(1).commit_index(), 2);
    assert_eq!(net.node(2).commit_index(), 1, "not yet told");
    net.tick_all();
    for id in [2, 3] {
        assert_eq!(net.node(id).commit_index(), 2, "node {id}");
        assert_eq!(net.applied[&id].len(), 2, "node {id}: no-op and x");
    }
}

// ---------------------------------------------------------------------------------------------
// 7 Log compaction and InstallSnapshot
// ---------------------------------------------------------------------------------------------

/// Elects node 1 of 3, cuts node 3 off, commits `n` proposals on 1 and 2, and compacts node 1's
/// log up to its applied index.
fn leader_compacted_past_isolated_follower(n: usize) -> Net {
    let mut net = Net::new(3);
    net.elect(1);
    net.isolate(3);
    net.cut.remove(&(1, 2));
    net.cut.remove(&(2, 1));
    for i in 0..n {
        net.propose(1, &format!("x{i}")).expect("leader accepts");
    }
    let applied = net.node(1).applied_index();
    assert_eq!(applied, n as u64 + 1, "no-op and every proposal applied");
    net.node(1).store_mut().compact(applied);
    net
}

// Reference: section 7. A follower that needs entries the leader has compacted away gets the
// leader's snapshot, installs it, and is then replicated to from the log again.
#[test]
fn leader_sends_snapshot_to_follower_behind_its_first_index() {
    let mut net = leader_compacted_past_isolated_follower(5);
    assert_eq!(net.node(1).first_index(), 7);
    assert_eq!(
        net.node(1).term_at(6),
        Some(1),
        "term() at the snapshot index"
    );
    assert_eq!(net.node(1).term_at(5), None, "compacted");
    net.heal();
    net.tick_all();
    assert_eq!(net.installed, vec![(3, SnapshotMeta { index: 6, term: 1 })]);
    assert_eq!(
        net.applied[&3], net.applied[&1],
        "same state machine as the leader"
    );
    assert_eq!(net.node(3).first_index(), 7);
    assert_eq!(net.node(3).commit_index(), 6);
    // The log continues after the snapshot.
    net.propose(1, "after").expect("leader accepts");
    net.tick_all(); // the commit index rides on the next heartbeat
    assert_eq!(net.node(3).applied_index(), 7);
    assert_eq!(
        net.applied[&3].last().map(|e| e.data.clone()),
        Some(Bytes::from("after"))
    );
    let p = net.node(1).status().progress;
    assert!(p.iter().all(|&(_, m, _, _)| m == 7), "{p:?}");
}

// etcd raft `restore`: a snapshot not newer than the commit index is ignored and answered
// with the commit index; no install is asked of the runtime.
#[test]
fn stale_snapshot_is_ignored() {
    let mut store = MemLogStore::new();
    store.append(&log_terms(&[1, 1, 1]));
    let mut r = core(config(2, 3), store, 1, 3);
    let snap = SnapshotMeta { index: 2, term: 1 };
    r.step(msg(
        1,
        2,
        1,
        MessageBody::InstallSnapshot {
            snapshot: snap,
            config: ClusterConfig::default(),
        },
    ))
    .expect("step");
    assert_eq!(r.pending_snapshot(), None);
    let rd = r.ready().expect("ready");
    assert!(rd.snapshot.is_none());
    assert_eq!(
        rd.messages,
        vec![msg(
            2,
            1,
            1,
            MessageBody::AppendResponse {
                success: true,
                index: 3,
                reject_hint_index: 0,
                reject_hint_term: 0,
                read_context: 0
            }
        )]
    );
    r.advance();
    assert_eq!(r.last_index(), 3, "the log is untouched");
}

// Raft paper 7: if the log holds the snapshot's last entry (same index and term), the entries
// following it are retained and the snapshot is not installed; its index is committed.
#[test]
fn snapshot_matching_the_log_only_commits() {
    let mut store = MemLogStore::new();
    store.append(&log_terms(&[1, 1, 1, 1]));
    let mut r = core(config(2, 3), store, 1, 1);
    let snap = SnapshotMeta { index: 3, term: 1 };
    r.step(msg(
        1,
        2,
        1,
        MessageBody::InstallSnapshot {
            snapshot: snap,
            config: ClusterConfig::default(),
        },
    ))
    .expect("step");
    assert_eq!(r.pending_snapshot(), None);
    assert_eq!(r.commit_index(), 3);
    assert_eq!(r.last_index(), 4, "entries after the snapshot are kept");
}

// A follower whose log conflicts with the snapshot's last entry drops its whole log, not only
// what follows the snapshot (hashicorp/raft#697), and installs the snapshot.
#[test]
fn follower_with_conflicting_log_installs_snapshot_and_drops_its_log() {
    let mut store = MemLogStore::new();
    store.append(&log_terms(&[1, 1, 2, 2, 2, 2, 2, 2]));
    let mut r = core(config(2, 3), store, 3, 2);
    let snap = SnapshotMeta { index: 5, term: 3 };
    r.step(msg(
        1,
        2,
        3,
        MessageBody::InstallSnapshot {
            snapshot: snap,
            config: ClusterConfig::default(),
        },
    ))
    .expect("step");
    assert_eq!(r.pending_snapshot(), Some(snap));
    assert_eq!(r.last_index(), 5, "entries 6-8 (term 2) are gone too");
    assert_eq!(r.first_index(), 6);
    assert_eq!(r.term_at(5), Some(3));
    assert_eq!(r.term_at(4), None);
    r.check_invariants();
    let rd = r.ready().expect("ready");
    assert_eq!(rd.snapshot, Some(snap));
    assert!(rd.must_sync);
    assert!(
        rd.committed_entries.is_empty(),
        "nothing to apply below a snapshot"
    );
    assert!(
        rd.messages.iter().all(|m| m.needs_persisted_state()),
        "the answer waits for the install to be durable"
    );
    r.store_mut().install_snapshot(snap);
    r.advance();
    assert_eq!(r.applied_index(), 5);
    assert_eq!(r.commit_index(), 5);
    assert!(!r.has_ready());
    r.check_invariants();
    // Appends continue from the snapshot.
    let append = MessageBody::AppendRequest {
        prev_log_index: 5,
        prev_log_term: 3,
        entries: vec![entry(6, 3)],
        leader_commit: 6,
        read_context: 0,
    };
    r.step(msg(1, 2, 3, append)).expect("step");
    let rd = r.ready().expect("ready");
    assert_eq!(rd.committed_entries, vec![entry(6, 3)]);
    r.store_mut().append(&rd.entries);
    r.advance();
    assert_eq!(r.applied_index(), 6);
}

// A snapshot from a stale leader is refused with our term, like its appends.
#[test]
fn snapshot_from_an_older_term_is_refused() {
    let mut r = core(config(2, 3), MemLogStore::new(), 5, 0);
    let snap = SnapshotMeta { index: 9, term: 4 };
    r.step(msg(
        1,
        2,
        4,
        MessageBody::InstallSnapshot {
            snapshot: snap,
            config: ClusterConfig::default(),
        },
    ))
    .expect("step");
    assert_eq!(r.pending_snapshot(), None);
    let rd = r.ready().expect("ready");
    assert!(matches!(
        rd.messages.as_slice(),
        [Message {
            term: 5,
            body: MessageBody::AppendResponse { success: false, .. },
            ..
        }]
    ));
}

// etcd raft `MsgSnapStatus`: a failed transfer sends the follower back to probing; the next
// heartbeat answer starts another transfer, which succeeds.
#[test]
fn failed_snapshot_is_retried_after_a_heartbeat() {
    let mut net = leader_compacted_past_isolated_follower(3);
    net.heal();
    let dropped = std::rc::Rc::new(std::cell::Cell::new(0));
    let d = dropped.clone();
    net.filter = Some(Box::new(move |m| {
        let first = matches!(m.body, MessageBody::InstallSnapshot { .. }) && d.get() == 0;
        if first {
            d.set(1);
        }
        !first
    }));
    net.tick_all();
    assert_eq!(net.failed_snapshots, vec![3]);
    for _ in 0..3 {
        net.tick_all();
    }
    assert_eq!(net.installed.len(), 1, "installed at the second attempt");
    assert_eq!(net.applied[&3], net.applied[&1]);
}

// A follower that lost its log (a wiped disk) answers heartbeats at its old match index with a
// rejection pointing below it. The leader must lower its match index and catch it up, not
// probe the same index forever (a busy loop).
#[test]
fn wiped_follower_is_caught_up_without_a_busy_loop() {
    let mut net = Net::new(3);
    net.elect(1);
    for i in 0..4 {
        net.propose(1, &format!("x{i}")).expect("leader accepts");
    }
    let term = net.node(1).term();
    net.set_log(3, config(3, 3), &[], term);
    net.applied.remove(&3);
    let before = net.delivered.len();
    for _ in 0..3 {
        net.tick_all();
    }
    assert!(net.delivered.len() - before < 40, "no busy loop");
    assert_eq!(net.log_of(3), net.log_of(1));
    assert_eq!(net.node(3).commit_index(), 5);
    // And by snapshot when the log is compacted.
    net.set_log(3, config(3, 3), &[], term);
    net.applied.remove(&3);
    net.node(1).store_mut().compact(5);
    for _ in 0..3 {
        net.tick_all();
    }
    assert_eq!(net.installed, vec![(3, SnapshotMeta { index: 5, term })]);
    assert_eq!(net.applied[&3], net.applied[&1]);
}

// raft-rs `advance_append` / `advance_apply`: persistence and application are acknowledged
// apart. While entries are being applied the core takes input, and the next `Ready` does not
// hand the same entries out again.
#[test]
fn persistence_and_application_are_acknowledged_apart() {
    let mut store = MemLogStore::new();
    store.append(&log_terms(&[1]));
    let mut r = core(config(2, 3), store, 1, 0);
    let append = |prev: LogIndex, commit: LogIndex, e: Vec<Entry>| {
        msg(
            1,
            2,
            1,
            MessageBody::AppendRequest {
                prev_log_index: prev,
                prev_log_term: 1,
                entries: e,
                leader_commit: commit,
                read_context: 0,
            },
        )
    };
    r.step(append(1, 2, vec![entry(2, 1)])).expect("step");
    let rd = r.ready().expect("ready");
    assert_eq!(rd.committed_entries, vec![entry(1, 1), entry(2, 1)]);
    r.store_mut().append(&rd.entries);
    r.advance_append();
    // Applying 1-2 goes on; meanwhile entry 3 arrives and commits.
    r.step(append(2, 3, vec![entry(3, 1)])).expect("step");
    r.tick();
    let rd = r.ready().expect("ready");
    assert_eq!(
        rd.committed_entries,
        vec![entry(3, 1)],
        "1-2 not handed out again"
    );
    r.store_mut().append(&rd.entries);
    r.advance_append();
    assert_eq!(r.applied_index(), 0);
    r.advance_apply(2);
    assert_eq!(r.applied_index(), 2);
    r.advance_apply(3);
    assert_eq!(r.applied_index(), 3);
    assert!(!r.has_ready());
    r.check_invariants();
}

// A node that lost its durable state (repaired, or an empty directory in an existing cluster)
// neither votes nor campaigns until it has caught up to what its peers had committed, and never
// votes in a term it may have voted in before.
#[test]
fn rejoining_node_votes_only_after_catching_up() {
    let mut cfg = no_pre_vote(2, 3);
    cfg.check_quorum = false; // no leader lease in the way of the vote requests
    let mut r = core(cfg, MemLogStore::new(), 3, 0);
    r.set_rejoin(6, Some((2, Term::MAX)));
    for _ in 0..100 {
        r.tick();
    }
    assert_eq!(r.role(), Role::Follower, "does not campaign");
    let granted = |r: &mut Raft<MemLogStore>, term| {
        r.step(msg(
            3,
            2,
            term,
            MessageBody::VoteRequest {
                pre_vote: false,
                last_log_index: 9,
                last_log_term: 9,
                leader_transfer: false,
            },
        ))
        .expect("step");
        let rd = r.ready().expect("ready");
        r.store_mut().append(&rd.entries);
        r.advance();
        rd.messages
            .iter()
            .any(|m| matches!(m.body, MessageBody::VoteResponse { granted: true, .. }))
    };
    assert!(!granted(&mut r, 4), "still catching up");
    let append = |prev, prev_term, e: Vec<Entry>, commit| {
        msg(
            1,
            2,
            5,
            MessageBody::AppendRequest {
                prev_log_index: prev,
                prev_log_term: prev_term,
                entries: e,
                leader_commit: commit,
                read_context: 0,
            },
        )
    };
    // Hearing from a leader is not enough: its log is not here yet.
    r.step(append(0, 0, vec![], 0)).expect("step");
    assert!(r.rejoining());
    r.step(append(0, 0, vec![entry(1, 5), entry(2, 5)], 2))
        .expect("step");
    assert!(!r.rejoining(), "caught up to index 2");
    let rd = r.ready().expect("ready");
    r.store_mut().append(&rd.entries);
    r.advance();
    assert!(!granted(&mut r, 6), "term 6 is at or below the vote floor");
    assert!(granted(&mut r, 7));
}

/// A repaired node had entries up to 10 of term 2; the cluster's leader of term 5 overwrote
/// them from index 4 on, and commits only up to 6 (an idle cluster). Its old entries 4-10 were
/// never committed (the leader would have them), so the node waits only for what came before.
#[test]
fn a_rejoining_node_whose_old_tail_was_overwritten_waits_only_for_the_rest() {
    let mut cfg = no_pre_vote(2, 3);
    cfg.check_quorum = false;
    let mut r = core(cfg, MemLogStore::new(), 5, 0);
    r.set_rejoin(5, Some((10, 2)));
    let log = vec![
        entry(1, 1),
        entry(2, 2),
        entry(3, 2),
        entry(4, 5),
        entry(5, 5),
        entry(6, 5),
    ];
    r.step(msg(
        1,
        2,
        5,
        MessageBody::AppendRequest {
            prev_log_index: 0,
            prev_log_term: 0,
            entries: log.clone(),
            leader_commit: 2,
            read_context: 0,
        },
    ))
    .expect("step");
    assert!(
        r.rejoining(),
        "entry 3 (term 2) may be its own old one: not committed yet"
    );
    let rd = r.ready().expect("ready");
    r.store_mut().append(&rd.entries);
    r.advance();
    r.step(msg(
        1,
        2,
        5,
        MessageBody::AppendRequest {
            prev_log_index: 6,
            prev_log_term: 5,
            entries: vec![],
            leader_commit: 6,
            read_context: 0,
        },
    ))
    .expect("step");
    assert!(
        !r.rejoining(),
        "committed through 3, the last entry that could be its own, without waiting for 10"
    );
    // With the term unknown it must wait for index 10 itself.
    let mut cfg = no_pre_vote(2, 3);
    cfg.check_quorum = false;
    let mut store = MemLogStore::new();
    store.append(&log);
    let mut r = core(cfg, store, 5, 6);
    r.set_rejoin(5, Some((10, Term::MAX)));
    assert!(r.rejoining());
}

// ---------------------------------------------------------------------------------------------
// Leadership transfer (dissertation 3.10, etcd raft `MsgTransferLeader` / `MsgTimeoutNow`)
// ---------------------------------------------------------------------------------------------

#[test]
fn leadership_moves_to_a_caught_up_target_within_the_followers_lease() {
    let mut net = Net::new(3);
    net.elect(1);
    net.propose(1, "a").expect("propose");
    let term = net.node(1).term();
    // The followers heard from the leader a moment ago: without the transfer flag, their lease
    // would make them ignore node 3's vote request.
    assert_eq!(net.node(1).transfer_leader(3).expect("transfer"), 3);
    net.settle();
    assert_eq!(net.leaders(), vec![3]);
    assert_eq!(
        net.node(3).term(),
        term + 1,
        "one election, no pre-vote round"
    );
    assert_eq!(net.node(1).leader(), 3);
    assert_eq!(net.node(1).lead_transferee(), 0);
    // The new leader has every entry and takes writes.
    net.propose(3, "b").expect("the new leader takes writes");
    assert!(net.log_of(1).iter().any(|&(_, t)| t == term + 1));
}

#[test]
fn a_lagging_target_is_caught_up_first_and_proposals_wait_for_the_new_leader() {
    let mut net = Net::new(3);
    net.elect(1);
    net.cut.insert((1, 3));
    for i in 0..5 {
        net.propose(1, &format!("w{i}")).expect("propose");
    }
    assert!(net.node(3).last_index() < net.node(1).last_index());
    assert_eq!(net.node(1).transfer_leader(3).expect("transfer"), 3);
    // While the target catches up, the leader refuses writes and names the target.
    match net.node(1).propose(Bytes::from_static(b"x")) {
        Err(Error::TransferInProgress { to }) => assert_eq!(to, 3),
        other => panic!("expected TransferInProgress, got {other:?}"),
    }
    net.cut.clear();
    // The appends to node 3 were lost: the stalled pipeline is noticed at a heartbeat, the
    // gap closed, and then TimeoutNow sent, all within the transfer's election timeout.
    for _ in 0..8 {
        if net.leaders() == vec![3] {
            break;
        }
        net.tick_all();
    }
    assert_eq!(net.leaders(), vec![3]);
    let last1 = net.node(1).last_index();
    assert!(
        net.node(3).last_index() >= last1,
        "the target had the whole log"
    );
}

#[test]
fn a_transfer_that_does_not_finish_is_abandoned_after_an_election_timeout() {
    let mut net = Net::new(3);
    net.elect(1);
    // Node 3 hears nothing more from the leader (nor its TimeoutNow).
    net.cut.insert((1, 3));
    net.node(1).transfer_leader(3).expect("transfer");
    assert_eq!(net.node(1).lead_transferee(), 3);
    for _ in 0..9 {
        net.node(1).tick();
    }
    assert_eq!(
        net.node(1).lead_transferee(),
        3,
        "still trying before the timeout"
    );
    net.node(1).tick();
    assert_eq!(net.node(1).lead_transferee(), 0, "abandoned");
    assert_eq!(
        net.node(1).role(),
        Role::Leader,
        "the old leader goes on leading"
    );
    net.propose(1, "after").expect("writes are taken again");
}

#[test]
fn transfer_targets_are_checked() {
    let mut net = Net::new(3);
    net.elect(1);
    assert!(matches!(
        net.node(2).transfer_leader(3),
        Err(Error::NotLeader { leader: 1 })
    ));
    assert!(matches!(
        net.node(1).transfer_leader(9),
        Err(Error::TransferRefused(m)) if m.contains("not a voter")
    ));
    assert_eq!(net.node(1).transfer_leader(1).expect("self"), 1);
    assert_eq!(net.node(1).lead_transferee(), 0, "to itself: nothing to do");
    // To itself while a transfer runs: called off, writes are taken again.
    net.cut.insert((1, 2));
    net.node(1).transfer_leader(2).expect("transfer");
    assert_eq!(net.node(1).lead_transferee(), 2);
    net.node(1).transfer_leader(1).expect("stay");
    assert_eq!(net.node(1).lead_transferee(), 0);
    net.propose(1, "stays").expect("writes again");
    net.cut.clear();
    net.tick_all();
    // Without a target: the most caught-up other voter (node 3 misses the last entry).
    net.cut.insert((1, 3));
    net.propose(1, "a").expect("propose");
    assert_eq!(net.node(1).transfer_leader(0).expect("transfer"), 2);
}

#[test]
fn timeout_now_from_anyone_but_the_leader_is_ignored() {
    let mut net = Net::new(3);
    net.elect(1);
    let term = net.node(1).term();
    net.node(3)
        .step(msg(2, 3, term, MessageBody::TimeoutNow))
        .expect("step");
    net.settle();
    assert_eq!(net.leaders(), vec![1]);
    assert_eq!(net.node(3).term(), term);
}

// ---------------------------------------------------------------------------------------------
// Learners (non-voting members; etcd raft `tracker.Config.Learners`)
// ---------------------------------------------------------------------------------------------

fn with_learner(id: NodeId, _: u64) -> Config {
    let mut c = config(id, 3);
    c.members.add_learner(4);
    c
}

#[test]
fn a_learner_gets_the_log_but_counts_toward_no_quorum() {
    let mut net = Net::with(4, with_learner);
    net.elect(1);
    let (index, _) = net.propose(1, "a").expect("propose");
    assert_eq!(
        net.node(4).last_index(),
        index,
        "the learner is replicated to"
    );
    net.tick_all();
    assert_eq!(
        net.node(4).commit_index(),
        index,
        "and learns the commit index"
    );
    // With both other voters cut off, the learner's copy commits nothing.
    net.cut.insert((1, 2));
    net.cut.insert((1, 3));
    let (index, _) = net.propose(1, "b").expect("propose");
    assert_eq!(net.node(4).last_index(), index, "the learner has it");
    assert!(
        net.node(1).commit_index() < index,
        "leader + learner are no quorum"
    );
    net.cut.clear();
    // The lost appends are sent again once the heartbeats show the pipeline stalled.
    for _ in 0..10 {
        net.tick_all();
    }
    assert_eq!(net.node(1).commit_index(), index);
    let st = net.node(1).status();
    assert_eq!(st.voters, vec![1, 2, 3]);
    assert_eq!(st.learners, vec![4]);
    assert!(
        st.progress.iter().any(|p| p.0 == 4),
        "the leader tracks the learner"
    );
}

#[test]
fn a_learner_never_campaigns_not_even_on_timeout_now() {
    let mut net = Net::with(4, with_learner);
    net.elect(1);
    net.isolate(4);
    for _ in 0..200 {
        net.node(4).tick();
    }
    net.settle();
    assert_eq!(net.node(4).role(), Role::Follower);
    assert_eq!(
        net.node(4).term(),
        net.node(1).term(),
        "no campaign, no new term"
    );
    net.heal();
    assert!(matches!(
        net.node(1).transfer_leader(4),
        Err(Error::TransferRefused(m)) if m.contains("not a voter")
    ));
    let term = net.node(1).term();
    net.node(4)
        .step(msg(1, 4, term, MessageBody::TimeoutNow))
        .expect("step");
    net.settle();
    assert_eq!(net.leaders(), vec![1]);
}

/// etcd `campaign_learner_must_vote.txt`: a candidate whose configuration already makes the
/// learner a voter needs its vote; the learner answers vote requests like anyone.
#[test]
fn a_learner_still_answers_vote_requests() {
    let mut cfg = with_learner(4, 4);
    cfg.pre_vote = false;
    cfg.check_quorum = false;
    let mut r = core(cfg, MemLogStore::new(), 1, 0);
    r.step(msg(
        2,
        4,
        2,
        MessageBody::VoteRequest {
            pre_vote: false,
            last_log_index: 0,
            last_log_term: 0,
            leader_transfer: false,
        },
    ))
    .expect("step");
    let rd = r.ready().expect("ready");
    assert!(
        rd.messages
            .iter()
            .any(|m| m.to == 2 && matches!(m.body, MessageBody::VoteResponse { granted: true, .. })),
        "{:?}",
        rd.messages
    );
}

#[test]
fn learner_configurations_are_checked() {
    let mut c = Config::new(5, vec![1, 2, 3], 1);
    assert!(
        c.validate().is_ok(),
        "a node outside its configuration is valid: it waits to be added"
    );
    c.members.add_learner(5);
    assert!(c.validate().is_ok());
    c.members.members.retain(|_, m| !m.voter);
    assert!(c.validate().is_err(), "learners but no voter");
    c.members.members.clear();
    assert!(
        c.validate().is_ok(),
        "a joining node knows no configuration"
    );
}

// ---------------------------------------------------------------------------------------------
// Membership changes (dissertation 4; etcd raft `confchange/` and its testdata)
// ---------------------------------------------------------------------------------------------

fn add(id: NodeId) -> ConfChange {
    ConfChange::AddLearner {
        id,
        address: format!("h:{id}"),
    }
}

/// A node that joins with nothing: no log, no configuration.
fn joiner(net: &mut Net, id: NodeId) {
    let r = Raft::new(config(id, 0), MemLogStore::new(), HardState::default(), 0)
        .expect("a joining node's config");
    net.nodes.insert(id, r);
}

/// Proposes `change` on `leader`, settles, and returns the entry's index.
fn change(net: &mut Net, leader: NodeId, c: &ConfChange) -> LogIndex {
    let (index, _) = net.node(leader).propose_conf_change(c).expect("change");
    net.settle();
    index
}

/// Ticks until `done` (lost appends are noticed at heartbeats), at most 50 rounds.
fn tick_until(net: &mut Net, mut done: impl FnMut(&mut Net) -> bool) {
    for _ in 0..50 {
        if done(net) {
            return;
        }
        net.tick_all();
    }
    assert!(done(net), "not reached within 50 ticks");
}

fn refusal(r: Result<(LogIndex, Term), Error>) -> (String, bool) {
    match r {
        Err(Error::ConfChangeRefused { why, retry }) => (why, retry),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_learner_is_added_catches_up_and_is_promoted() {
    let mut net = Net::new(3);
    net.elect(1);
    net.propose(1, "before").expect("propose");
    joiner(&mut net, 4);
    let index = change(&mut net, 1, &add(4));
    for id in 1..=4 {
        let r = net.node(id);
        assert!(
            r.config().contains(4) && !r.config().is_voter(4),
            "node {id}"
        );
        assert_eq!(r.config_index(), index, "node {id}");
    }
    assert_eq!(net.node(4).commit_index(), net.node(1).commit_index());
    assert_eq!(net.node(1).status().learners, vec![4]);
    // A learner makes no quorum: with 2 and 3 cut off, nothing commits.
    net.isolate(2);
    net.cut.insert((1, 3));
    net.cut.insert((3, 1));
    let (i, _) = net.propose(1, "needs a voter").expect("propose");
    assert!(net.node(1).commit_index() < i);
    assert_eq!(net.node(4).last_index(), i, "but the learner has it");
    net.heal();
    tick_until(&mut net, |n| n.node(1).commit_index() >= i);
    // Promoted once caught up: now four voters, a quorum of three.
    change(&mut net, 1, &ConfChange::Promote { id: 4 });
    assert_eq!(net.node(1).status().voters, vec![1, 2, 3, 4]);
    assert!(net.node(4).config().is_voter(4));
    net.isolate(2);
    net.cut.insert((1, 3));
    net.cut.insert((3, 1));
    let (i, _) = net
        .propose(1, "1 and 4 are no quorum of four")
        .expect("propose");
    assert!(net.node(1).commit_index() < i);
    net.cut.remove(&(1, 3));
    net.cut.remove(&(3, 1));
    tick_until(&mut net, |n| n.node(1).commit_index() >= i);
}

#[test]
fn a_learner_that_lags_is_not_promoted() {
    let mut net = Net::with(3, |id, n| {
        let mut c = config(id, n);
        c.promote_max_lag = 3;
        c
    });
    net.elect(1);
    joiner(&mut net, 4);
    change(&mut net, 1, &add(4));
    net.isolate(4);
    for i in 0..5 {
        net.propose(1, &format!("w{i}")).expect("propose");
    }
    let (why, retry) = refusal(
        net.node(1)
            .propose_conf_change(&ConfChange::Promote { id: 4 }),
    );
    assert!(why.contains("has not caught up") && retry, "{why}");
    assert!(!net.node(1).config().is_voter(4), "nothing changed");
    net.heal();
    let last = net.node(1).last_index();
    tick_until(&mut net, |n| n.node(4).last_index() >= last);
    change(&mut net, 1, &ConfChange::Promote { id: 4 });
    assert!(net.node(1).config().is_voter(4));
}

#[test]
fn one_change_at_a_time() {
    let mut net = Net::new(3);
    net.elect(1);
    joiner(&mut net, 4);
    joiner(&mut net, 5);
    net.isolate(2);
    net.isolate(3);
    let (i, _) = net.node(1).propose_conf_change(&add(4)).expect("first");
    net.settle();
    assert!(
        net.node(1).commit_index() < i,
        "not committed: 2 and 3 are cut off"
    );
    let (why, retry) = refusal(net.node(1).propose_conf_change(&add(5)));
    assert!(why.contains("not committed yet") && retry, "{why}");
    net.heal();
    tick_until(&mut net, |n| n.node(1).commit_index() >= i);
    change(&mut net, 1, &add(5));
    assert!(net.node(1).config().contains(5));
}

// The 2015 raft-dev correction: a new leader must commit an entry of its own term before it
// changes the configuration (hashicorp/raft, etcd's pending-config index).
#[test]
fn a_new_leader_changes_nothing_before_it_commits_an_entry_of_its_term() {
    let mut net = Net::new(3);
    // Node 1 wins, but no follower's acknowledgement of its no-op arrives.
    net.filter = Some(Box::new(|m| {
        !matches!(m.body, MessageBody::AppendResponse { .. })
    }));
    net.elect(1);
    assert_eq!(net.leaders(), vec![1]);
    let (why, retry) = refusal(net.node(1).propose_conf_change(&add(4)));
    assert!(
        why.contains("has not yet committed an entry of its term") && retry,
        "{why}"
    );
    net.filter = None;
    let term = net.node(1).term();
    tick_until(&mut net, |n| {
        let r = n.node(1);
        r.term_at(r.commit_index()) == Some(term)
    });
    joiner(&mut net, 4);
    change(&mut net, 1, &add(4));
}

#[test]
fn changes_the_configuration_rules_out_are_refused_for_good() {
    let mut net = Net::new(3);
    net.elect(1);
    let (why, retry) = refusal(net.node(1).propose_conf_change(&add(2)));
    assert!(why.contains("already a member") && !retry, "{why}");
    let (why, _) = refusal(
        net.node(1)
            .propose_conf_change(&ConfChange::Promote { id: 2 }),
    );
    assert!(why.contains("already a voter"), "{why}");
    change(&mut net, 1, &ConfChange::Remove { id: 3 });
    let (why, retry) = refusal(net.node(1).propose_conf_change(&add(3)));
    assert!(why.contains("never reused") && !retry, "{why}");
    assert!(matches!(
        net.node(2).propose_conf_change(&add(4)),
        Err(Error::NotLeader { leader: 1 })
    ));
}

#[test]
fn a_removed_follower_is_no_longer_replicated_to_and_never_campaigns() {
    let mut net = Net::new(3);
    net.elect(1);
    let index = change(&mut net, 1, &ConfChange::Remove { id: 3 });
    assert_eq!(net.node(1).status().voters, vec![1, 2]);
    assert!(
        net.node(3).config().removed.contains(&3),
        "it got its removal"
    );
    assert!(
        net.node(3).commit_index() >= index,
        "and knows it is committed (so it applies it and stops)"
    );
    let before = net.node(3).last_index();
    net.propose(1, "after").expect("1 and 2 commit alone");
    assert_eq!(
        net.node(3).last_index(),
        before,
        "nothing more is sent to it"
    );
    // It hears no leader any more, yet it never campaigns (it is no voter).
    net.delivered.clear();
    for _ in 0..100 {
        net.tick_all();
    }
    assert!(
        !net.delivered.iter().any(|m| m.from == 3),
        "the removed node sends nothing"
    );
    assert_eq!(net.leaders(), vec![1]);
}

// hashicorp/raft#524: a removed node that did not learn of its removal times out and asks for
// votes; the members refuse without changing term, and the leader stays.
#[test]
fn a_removed_node_that_missed_its_removal_cannot_disrupt() {
    let mut net = Net::with(3, no_pre_vote);
    net.elect(1);
    net.isolate(3);
    change(&mut net, 1, &ConfChange::Remove { id: 3 });
    assert!(!net.node(3).config().removed.contains(&3), "3 missed it");
    let term = net.node(1).term();
    net.heal();
    for _ in 0..5 {
        net.node(3).hup();
        net.settle();
    }
    assert!(net.node(3).term() > term, "3 campaigned");
    assert_eq!(net.node(1).term(), term, "the members kept their term");
    assert_eq!(net.node(2).term(), term);
    assert_eq!(net.leaders(), vec![1]);
}

#[test]
fn the_leader_removes_itself_then_hands_over() {
    let mut net = Net::new(3);
    net.elect(1);
    let (index, _) = net
        .node(1)
        .propose_conf_change(&ConfChange::Remove { id: 1 })
        .expect("remove the leader");
    // In force on append: the leader no longer counts itself, and leads until it commits.
    assert!(!net.node(1).config().is_voter(1));
    assert_eq!(net.node(1).role(), Role::Leader);
    net.settle();
    assert!(net.node(2).commit_index() >= index || net.node(3).commit_index() >= index);
    let leaders = net.leaders();
    assert_eq!(leaders.len(), 1, "{leaders:?}");
    assert_ne!(
        leaders[0], 1,
        "handed over at once (TimeoutNow), no timeout waited for"
    );
    assert_eq!(net.node(1).role(), Role::Follower);
    let new = leaders[0];
    net.propose(new, "after")
        .expect("the rest of the cluster goes on");
    for _ in 0..100 {
        net.tick_all();
    }
    assert_eq!(net.leaders(), vec![new], "node 1 never campaigns again");
}

// etcd raft testdata/campaign_learner_must_vote.txt: a learner whose configuration is behind
// still votes for a candidate whose configuration makes it a voter.
#[test]
fn a_learner_still_votes() {
    let mut c = config(4, 3);
    c.members.add_learner(4);
    let mut r = core(c, MemLogStore::new(), 1, 0);
    r.step(Message {
        from: 2,
        to: 4,
        term: 2,
        body: MessageBody::VoteRequest {
            pre_vote: false,
            last_log_index: 5,
            last_log_term: 1,
            leader_transfer: false,
        },
    })
    .expect("step");
    let rd = r.ready().expect("ready");
    assert_eq!(
        rd.messages[0].body,
        MessageBody::VoteResponse {
            pre_vote: false,
            granted: true
        }
    );
}

// A configuration entry takes effect on append; when a new leader overwrites it, the
// configuration before it is back (dissertation 4.1).
#[test]
fn a_truncated_configuration_entry_takes_its_configuration_with_it() {
    let mut r = core(no_pre_vote(2, 3), MemLogStore::new(), 1, 0);
    let conf = ClusterConfig::with_voters([1, 2, 3])
        .apply(&add(4))
        .expect("add");
    let append = |from, term, entries: Vec<Entry>| Message {
        from,
        to: 2,
        term,
        body: MessageBody::AppendRequest {
            prev_log_index: 0,
            prev_log_term: 0,
            entries,
            leader_commit: 0,
            read_context: 0,
        },
    };
    let conf_entry = Entry {
        index: 1,
        term: 1,
        kind: EntryKind::ConfChange,
        data: conf.encode(),
    };
    r.step(append(1, 1, vec![conf_entry.clone()]))
        .expect("step");
    assert!(r.config().contains(4), "in force on append");
    assert_eq!(r.config_index(), 1);
    r.ready().expect("ready");
    r.advance();
    // A stale copy of the same append changes nothing.
    r.step(append(1, 1, vec![conf_entry])).expect("step");
    assert!(r.config().contains(4));
    r.ready().expect("ready");
    r.advance();
    r.step(append(3, 2, vec![entry(1, 2)])).expect("step");
    assert!(!r.config().contains(4), "the entry was overwritten");
    assert_eq!(r.config_index(), 0);
}

#[test]
fn configuration_entries_not_yet_applied_are_recovered_on_restart() {
    let conf = ClusterConfig::with_voters([1, 2, 3])
        .apply(&ConfChange::Remove { id: 3 })
        .expect("remove");
    let mut store = MemLogStore::new();
    store.append(&[
        entry(1, 1),
        Entry {
            index: 2,
            term: 1,
            kind: EntryKind::ConfChange,
            data: conf.encode(),
        },
        entry(3, 1),
    ]);
    let r = Raft::new(config(1, 3), store.clone(), HardState::default(), 1).expect("new");
    assert_eq!(r.config(), &conf);
    assert_eq!(r.config_index(), 2);
    assert_eq!(r.status().voters, vec![1, 2]);
    // Applied past it, the state machine's configuration is the base instead.
    let mut c = config(1, 3);
    c.members = conf.clone();
    let r = Raft::new(c, store, HardState::default(), 3).expect("new");
    assert_eq!(r.config(), &conf);
    // A corrupt configuration entry is refused, not guessed at.
    let mut bad = MemLogStore::new();
    bad.append(&[Entry {
        index: 1,
        term: 1,
        kind: EntryKind::ConfChange,
        data: Bytes::from_static(b"{"),
    }]);
    assert!(matches!(
        Raft::new(config(1, 3), bad, HardState::default(), 0),
        Err(Error::Storage(StorageError::Corrupt(_)))
    ));
}

// A node that joins after the log was compacted learns the configuration from the snapshot.
#[test]
fn a_member_added_after_compaction_gets_the_configuration_with_the_snapshot() {
    let mut net = Net::new(3);
    net.elect(1);
    joiner(&mut net, 4);
    net.isolate(4);
    change(&mut net, 1, &add(4));
    for i in 0..5 {
        net.propose(1, &format!("w{i}")).expect("propose");
    }
    let applied = net.node(1).applied_index();
    net.node(1).store_mut().compact(applied);
    net.heal();
    for _ in 0..10 {
        net.tick_all();
    }
    assert!(net.installed.iter().any(|&(id, _)| id == 4), "by snapshot");
    assert!(net.node(4).config().contains(4));
    let leader_config = net.node(1).config().clone();
    assert_eq!(net.node(4).config(), &leader_config);
    assert_eq!(net.node(4).commit_index(), net.node(1).commit_index());
}

// A node told to take over (TimeoutNow) crashes before it does: the transfer is abandoned
// after an election timeout and the old leader goes on; the target comes back as a follower.
#[test]
fn a_transfer_interrupted_by_a_crash_of_the_target_is_abandoned() {
    let mut net = Net::new(3);
    net.elect(1);
    net.propose(1, "a").expect("propose");
    net.cut.insert((1, 3));
    net.node(1).transfer_leader(3).expect("transfer");
    // Node 3 crashes: it restarts from its durable state (nothing volatile survives).
    let (store, hs, applied) = {
        let r = net.node(3);
        (r.store().clone(), r.hard_state(), r.applied_index())
    };
    net.nodes.insert(
        3,
        Raft::new(config(3, 3), store, hs, applied).expect("restart"),
    );
    for _ in 0..10 {
        net.node(1).tick();
    }
    net.settle();
    assert_eq!(net.node(1).lead_transferee(), 0, "abandoned");
    assert_eq!(net.leaders(), vec![1]);
    net.cut.clear();
    net.propose(1, "b").expect("the old leader goes on");
    net.tick_all();
    assert_eq!(net.node(3).leader(), 1);
    assert_eq!(net.log_of(3), net.log_of(1));
}

// etcd's strict reconfiguration check: no change that leaves fewer active voters than a
// quorum (the cluster could elect no one afterwards).
#[test]
fn a_change_that_leaves_no_active_quorum_is_refused() {
    let mut net = Net::new(3);
    net.elect(1);
    net.isolate(3);
    // A check-quorum round passes without node 3 answering.
    for _ in 0..12 {
        net.tick_all();
    }
    assert_eq!(net.leaders(), vec![1], "1 and 2 still make a quorum");
    let (why, retry) = refusal(
        net.node(1)
            .propose_conf_change(&ConfChange::Remove { id: 2 }),
    );
    assert!(why.contains("too few voters would be up") && retry, "{why}");
    change(&mut net, 1, &ConfChange::Remove { id: 3 });
    assert_eq!(net.node(1).status().voters, vec![1, 2]);
}

// A voter whose configuration is behind (it missed the addition of node 4) still answers node
// 4's vote request: only removed ids are refused, else a majority of the new configuration
// could be unable to elect anyone.
#[test]
fn a_member_this_node_does_not_know_yet_gets_its_vote() {
    let mut r = core(no_pre_vote(3, 3), MemLogStore::new(), 1, 0);
    r.step(Message {
        from: 4,
        to: 3,
        term: 2,
        body: MessageBody::VoteRequest {
            pre_vote: false,
            last_log_index: 9,
            last_log_term: 1,
            leader_transfer: false,
        },
    })
    .expect("step");
    let rd = r.ready().expect("ready");
    assert_eq!(
        rd.messages[0].body,
        MessageBody::VoteResponse {
            pre_vote: false,
            granted: true
        }
    );
}
