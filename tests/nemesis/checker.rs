//! A linearizability checker for a key-value register: Wing & Gong's search with Lowe's
//! memoization ("just-in-time linearization"), as in Porcupine and Knossos, run per key
//! (linearizability is compositional, so keys are checked independently).
//!
//! An operation whose outcome is unknown (a write that timed out) has no return event: it may
//! take effect at any time after it was invoked, or never, like Jepsen's `info` operations.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Input {
    Put(String),
    Get,
    Delete,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    /// A put took effect.
    Ok,
    /// What a get read.
    Value(Option<String>),
    /// What a delete said: whether the key existed.
    Existed(bool),
    /// Unknown: the operation may or may not have taken effect.
    Unknown,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Op {
    pub id: usize,
    pub client: usize,
    pub key: String,
    pub input: Input,
    pub output: Output,
    /// Nanoseconds since the start of the test.
    pub call: u64,
    /// `None` when the outcome is unknown.
    pub ret: Option<u64>,
}

/// The register's state: the value, or none.
type State = Option<String>;

/// Applies `input` to `state`; `None` if `output` cannot be what it returned.
fn step(state: &State, input: &Input, output: &Output) -> Option<State> {
    match (input, output) {
        (Input::Put(v), Output::Ok | Output::Unknown) => Some(Some(v.clone())),
        (Input::Get, Output::Value(v)) => (v == state).then(|| state.clone()),
        (Input::Get, Output::Unknown) => Some(state.clone()),
        (Input::Delete, Output::Existed(e)) => (*e == state.is_some()).then_some(None),
        (Input::Delete, Output::Unknown) => Some(None),
        _ => None,
    }
}

/// Stands for the value of any unknown put that no read observed: such values are
/// indistinguishable to every later operation.
const UNREAD: &str = "\u{0}unread";

/// `step` with symmetry reductions for operations whose outcome is unknown. Not applying such an
/// operation at all is always allowed, so applying it is only worth trying where it can make a
/// difference:
/// - an unknown put that no read observed can only matter by making an empty key exist (for a
///   later delete that found the key); from any other state it could only fail later reads, so it
///   is skipped there, and its value becomes the one `UNREAD` token;
/// - an unknown delete of an empty key changes nothing and is skipped.
fn step_reduced(state: &State, op: &Op, unread: bool) -> Option<State> {
    match (&op.input, &op.output) {
        (Input::Put(_), Output::Unknown) if unread => {
            state.is_none().then(|| Some(UNREAD.to_string()))
        }
        (Input::Delete, Output::Unknown) if state.is_none() => None,
        _ => step(state, &op.input, &op.output),
    }
}

#[derive(Debug)]
pub struct Violation {
    pub key: String,
    /// The operations of the longest linearizable prefix found, and those that could not be
    /// placed after it.
    pub linearized: Vec<usize>,
    pub stuck: Vec<usize>,
}

pub enum Verdict {
    Ok,
    Violation(Violation),
    /// The search gave up (too many states); neither proven nor refuted.
    Unknown(String),
}

/// Checks every key's history.
pub fn check(ops: &[Op], max_states: usize) -> Verdict {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        by_key.entry(&op.key).or_default().push(op);
    }
    for ops in by_key.into_values() {
        match check_key(&ops, max_states) {
            Verdict::Ok => {}
            other => return other,
        }
    }
    Verdict::Ok
}

#[derive(Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
    /// For a call: the index of its return event, if any.
    partner: Option<usize>,
}

/// Checks one key. `ops` are that key's operations.
pub fn check_key(ops: &[&Op], max_states: usize) -> Verdict {
    if ops.is_empty() {
        return Verdict::Ok;
    }
    let key = ops[0].key.clone();
    // Events in time order; at equal times, returns before calls (an operation that returned
    // at t happened before one called at t).
    let mut evs: Vec<(u64, bool, usize)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        evs.push((op.call, true, i));
        if let Some(r) = op.ret {
            evs.push((r.max(op.call), false, i));
        }
    }
    evs.sort_by_key(|&(t, is_call, i)| (t, is_call, i));
    let n = evs.len();
    let mut events: Vec<Event> = evs
        .iter()
        .map(|&(_, is_call, op)| Event {
            op,
            is_call,
            partner: None,
        })
        .collect();
    let mut ret_of = vec![None; ops.len()];
    for (i, e) in events.iter().enumerate() {
        if !e.is_call {
            ret_of[e.op] = Some(i);
        }
    }
    for e in events.iter_mut() {
        if e.is_call {
            e.partner = ret_of[e.op];
        }
    }
    // A doubly linked list over the events, with a head sentinel at index n.
    // `usize::MAX` ends the list. `n > 0`: every operation has a call event.
    let head = n;
    let mut next: Vec<usize> = (1..n).chain([usize::MAX, 0]).collect();
    let mut prev: Vec<usize> = std::iter::once(head)
        .chain(0..n - 1)
        .chain([usize::MAX])
        .collect();
    let unlink = |i: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = nx;
        if nx != usize::MAX {
            prev[nx] = p;
        }
    };
    let relink = |i: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = i;
        if nx != usize::MAX {
            prev[nx] = i;
        }
    };

    // The memo cache holds (set of linearized operations, state) pairs. A set is represented by
    // its Zobrist hash: the XOR of a random 128-bit value per member, updated in O(1) as
    // operations are linearized and undone (a bitset per entry would cost O(n) memory each).
    // A collision could only prune a branch wrongly, i.e. report a violation that is not one,
    // never hide one; at 128 bits it does not happen in practice.
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next_random = || {
        // splitmix64
        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let zobrist: Vec<u128> = (0..ops.len())
        .map(|_| (u128::from(next_random()) << 64) | u128::from(next_random()))
        .collect();
    let mut cache: HashSet<(u128, State)> = HashSet::new();

    // The operations that may be linearized next: every call before the first return still in
    // the list (an operation called after another returned cannot precede it). Operations with
    // a known outcome are tried first: an unknown write that nobody observed stays a candidate
    // forever, and trying it first would send the search down dead ends at every step. The
    // order of candidates does not affect the verdict, only the time to reach it.
    let candidates = |next: &Vec<usize>| -> Vec<usize> {
        let mut known = Vec::new();
        let mut unknown = Vec::new();
        let mut i = next[head];
        while i != usize::MAX && events[i].is_call {
            if events[i].partner.is_some() {
                known.push(i);
            } else {
                unknown.push(i);
            }
            i = next[i];
        }
        known.extend(unknown);
        known
    };

    // Values some read observed; an unknown put of any other value is "unread".
    let read: HashSet<&str> = ops
        .iter()
        .filter_map(|o| match &o.output {
            Output::Value(Some(v)) => Some(v.as_str()),
            _ => None,
        })
        .collect();
    let unread: Vec<bool> = ops
        .iter()
        .map(|o| matches!((&o.input, &o.output), (Input::Put(v), Output::Unknown) if !read.contains(v.as_str())))
        .collect();

    struct Frame {
        cands: Vec<usize>,
        pos: usize,
        state: State,
        linearized: u128,
        /// The call event this frame linearized to reach its child, to undo on backtracking.
        applied: Option<usize>,
    }
    let mut frames = vec![Frame {
        cands: candidates(&next),
        pos: 0,
        state: None,
        linearized: 0,
        applied: None,
    }];
    let mut best: Vec<usize> = Vec::new();
    // Done when every operation with a known outcome is placed; unknown ones may never happen.
    let mut known_left = ops.iter().filter(|o| o.ret.is_some()).count();
    loop {
        if known_left == 0 {
            return Verdict::Ok;
        }
        let depth = frames.len();
        let Some(f) = frames.last_mut() else {
            break;
        };
        if f.pos == f.cands.len() {
            // Every candidate failed from here: undo the parent's choice and try its next one.
            frames.pop();
            let Some(parent) = frames.last_mut() else {
                break;
            };
            if let Some(call) = parent.applied.take() {
                if let Some(r) = events[call].partner {
                    relink(r, &mut next, &mut prev);
                    known_left += 1;
                }
                relink(call, &mut next, &mut prev);
            }
            continue;
        }
        let call = f.cands[f.pos];
        f.pos += 1;
        let op = events[call].op;
        let Some(after) = step_reduced(&f.state, ops[op], unread[op]) else {
            continue;
        };
        let linearized = f.linearized ^ zobrist[op];
        if !cache.insert((linearized, after.clone())) {
            continue;
        }
        if cache.len() > max_states {
            return Verdict::Unknown(format!(
                "key {key:?}: more than {max_states} states explored"
            ));
        }
        f.applied = Some(call);
        unlink(call, &mut next, &mut prev);
        if let Some(r) = events[call].partner {
            unlink(r, &mut next, &mut prev);
            known_left -= 1;
        }
        if depth > best.len() {
            best = frames
                .iter()
                .filter_map(|f| f.applied)
                .map(|c| ops[events[c].op].id)
                .collect();
        }
        frames.push(Frame {
            cands: candidates(&next),
            pos: 0,
            state: after,
            linearized,
            applied: None,
        });
    }
    let stuck = ops
        .iter()
        .filter(|o| !best.contains(&o.id))
        .map(|o| o.id)
        .collect();
    Verdict::Violation(Violation {
        key,
        linearized: best,
        stuck,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds ops from (client, input, output, call, return) with times in arbitrary units.
    fn h(spec: &[(usize, Input, Output, u64, Option<u64>)]) -> Vec<Op> {
        spec.iter()
            .enumerate()
            .map(|(id, (client, input, output, call, ret))| Op {
                id,
                client: *client,
                key: "k".into(),
                input: input.clone(),
                output: output.clone(),
                call: *call,
                ret: *ret,
            })
            .collect()
    }

    fn put(v: &str) -> Input {
        Input::Put(v.into())
    }

    fn val(v: Option<&str>) -> Output {
        Output::Value(v.map(String::from))
    }

    fn ok(ops: &[Op]) -> bool {
        matches!(check(ops, 1_000_000), Verdict::Ok)
    }

    #[test]
    fn sequential_history_passes() {
        let ops = h(&[
            (0, Input::Get, val(None), 0, Some(1)),
            (0, put("a"), Output::Ok, 2, Some(3)),
            (1, Input::Get, val(Some("a")), 4, Some(5)),
            (1, Input::Delete, Output::Existed(true), 6, Some(7)),
            (0, Input::Get, val(None), 8, Some(9)),
            (0, Input::Delete, Output::Existed(false), 10, Some(11)),
        ]);
        assert!(ok(&ops));
    }

    #[test]
    fn concurrent_reads_may_see_either_side_of_a_write() {
        // A read overlapping a write may return the old or the new value.
        let ops = h(&[
            (0, put("a"), Output::Ok, 0, Some(1)),
            (1, put("b"), Output::Ok, 2, Some(10)),
            (2, Input::Get, val(Some("b")), 3, Some(4)),
            (3, Input::Get, val(Some("a")), 5, Some(9)),
        ]);
        assert!(
            !ok(&ops),
            "a read that starts after b was read cannot see a again"
        );
        // Overlapping reads may be ordered either way.
        let ops = h(&[
            (0, put("a"), Output::Ok, 0, Some(1)),
            (1, put("b"), Output::Ok, 2, Some(10)),
            (2, Input::Get, val(Some("b")), 3, Some(4)),
            (3, Input::Get, val(Some("a")), 3, Some(9)),
        ]);
        assert!(ok(&ops));
        let ops = h(&[
            (0, put("a"), Output::Ok, 0, Some(1)),
            (1, put("b"), Output::Ok, 2, Some(10)),
            (2, Input::Get, val(Some("a")), 3, Some(4)),
            (3, Input::Get, val(Some("b")), 5, Some(9)),
        ]);
        assert!(ok(&ops));
    }

    #[test]
    fn stale_read_fails() {
        let ops = h(&[
            (0, put("a"), Output::Ok, 0, Some(1)),
            (0, put("b"), Output::Ok, 2, Some(3)),
            (1, Input::Get, val(Some("a")), 4, Some(5)),
        ]);
        assert!(!ok(&ops));
    }

    #[test]
    fn lost_acknowledged_write_fails() {
        let ops = h(&[
            (0, put("a"), Output::Ok, 0, Some(1)),
            (1, Input::Get, val(None), 2, Some(3)),
        ]);
        assert!(!ok(&ops));
    }

    #[test]
    fn read_of_a_value_never_written_fails() {
        let ops = h(&[
            (0, put("a"), Output::Ok, 0, Some(1)),
            (1, Input::Get, val(Some("zzz")), 2, Some(3)),
        ]);
        assert!(!ok(&ops));
    }

    #[test]
    fn read_going_back_in_time_fails() {
        // Both writes finish before the reads; the second read sees the older value.
        let ops = h(&[
            (0, put("a"), Output::Ok, 0, Some(10)),
            (1, put("b"), Output::Ok, 0, Some(10)),
            (2, Input::Get, val(Some("b")), 11, Some(12)),
            (2, Input::Get, val(Some("a")), 13, Some(14)),
        ]);
        assert!(!ok(&ops));
    }

    #[test]
    fn unknown_outcomes_may_apply_late_or_never() {
        // A timed-out write may show up long after it was invoked...
        let ops = h(&[
            (0, put("a"), Output::Ok, 0, Some(1)),
            (1, put("x"), Output::Unknown, 2, None),
            (2, Input::Get, val(Some("a")), 3, Some(4)),
            (2, Input::Get, val(Some("x")), 20, Some(21)),
        ]);
        assert!(ok(&ops));
        // ...or never.
        let ops = h(&[
            (0, put("a"), Output::Ok, 0, Some(1)),
            (1, put("x"), Output::Unknown, 2, None),
            (2, Input::Get, val(Some("a")), 30, Some(31)),
        ]);
        assert!(ok(&ops));
        // But not before it was invoked.
        let ops = h(&[
            (2, Input::Get, val(Some("x")), 0, Some(1)),
            (1, put("x"), Output::Unknown, 2, None),
        ]);
        assert!(!ok(&ops));
    }

    #[test]
    fn delete_answers_are_checked() {
        let ops = h(&[
            (0, put("a"), Output::Ok, 0, Some(1)),
            (1, Input::Delete, Output::Existed(false), 2, Some(3)),
        ]);
        assert!(!ok(&ops), "the key existed");
    }

    #[test]
    fn violation_names_the_key_and_operations() {
        let ops = h(&[
            (0, put("a"), Output::Ok, 0, Some(1)),
            (1, Input::Get, val(None), 2, Some(3)),
        ]);
        match check(&ops, 1000) {
            Verdict::Violation(v) => {
                assert_eq!(v.key, "k");
                assert!(v.stuck.contains(&1), "{v:?}");
            }
            _ => panic!("expected a violation"),
        }
    }

    #[test]
    fn many_concurrent_clients_check_quickly() {
        // 200 overlapping writes and reads of a consistent history.
        let mut spec = Vec::new();
        for i in 0..200u64 {
            let c = (i % 8) as usize;
            spec.push((
                c,
                put(&format!("v{i}")),
                Output::Ok,
                i * 10,
                Some(i * 10 + 15),
            ));
            spec.push((
                c,
                Input::Get,
                val(Some(&format!("v{i}"))),
                i * 10 + 16,
                Some(i * 10 + 18),
            ));
        }
        let ops = h(&spec);
        assert!(ok(&ops));
    }

    #[test]
    fn long_histories_with_unknown_writes_stay_cheap() {
        // 20,000 operations on one key, 8 clients, every 50th write with an unknown outcome that
        // nobody ever reads: the cache must not grow with the square of the history.
        let mut spec = Vec::new();
        for i in 1..=10_000u64 {
            let c = (i % 8) as usize;
            let unknown = i % 50 == 0;
            let (out, ret) = if unknown {
                (Output::Unknown, None)
            } else {
                (Output::Ok, Some(i * 10 + 15))
            };
            spec.push((c, put(&format!("v{i}")), out, i * 10, ret));
            let seen = if unknown {
                format!("v{}", i - 1)
            } else {
                format!("v{i}")
            };
            if !unknown {
                spec.push((
                    c,
                    Input::Get,
                    val(Some(&seen)),
                    i * 10 + 16,
                    Some(i * 10 + 18),
                ));
            } else {
                spec.push((
                    c,
                    Input::Get,
                    val(Some(&seen)),
                    i * 10 + 1,
                    Some(i * 10 + 2),
                ));
            }
        }
        let ops = h(&spec);
        assert!(matches!(check(&ops, 5_000_000), Verdict::Ok));
    }
}
