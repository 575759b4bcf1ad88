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

    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, State)> = HashSet::new();
    // (call event, state before it)
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut state: State = None;
    let mut best: Vec<usize> = Vec::new();
    let mut cur = next[head];
    while next[head] != usize::MAX {
        if cur == usize::MAX {
            // Nothing left to try at this level: backtrack.
            let Some((call, before)) = stack.pop() else {
                break;
            };
            let op = events[call].op;
            linearized[op / 64] &= !(1 << (op % 64));
            state = before;
            if let Some(r) = events[call].partner {
                relink(r, &mut next, &mut prev);
            }
            relink(call, &mut next, &mut prev);
            cur = next[call];
            continue;
        }
        let e = events[cur];
        if e.is_call {
            let op = ops[e.op];
            if let Some(after) = step(&state, &op.input, &op.output) {
                let mut lin = linearized.clone();
                lin[e.op / 64] |= 1 << (e.op % 64);
                if cache.insert((lin.clone(), after.clone())) {
                    if cache.len() > max_states {
                        return Verdict::Unknown(format!(
                            "key {key:?}: more than {max_states} states explored"
                        ));
                    }
                    stack.push((cur, state.clone()));
                    if stack.len() > best.len() {
                        best = stack.iter().map(|&(c, _)| ops[events[c].op].id).collect();
                    }
                    state = after;
                    linearized = lin;
                    unlink(cur, &mut next, &mut prev);
                    if let Some(r) = e.partner {
                        unlink(r, &mut next, &mut prev);
                    }
                    cur = next[head];
                    continue;
                }
            }
            cur = next[cur];
        } else {
            // A return of an operation not yet linearized: every order from here misses it.
            let Some((call, before)) = stack.pop() else {
                let stuck = ops
                    .iter()
                    .filter(|o| !best.contains(&o.id))
                    .map(|o| o.id)
                    .collect();
                return Verdict::Violation(Violation {
                    key,
                    linearized: best,
                    stuck,
                });
            };
            let op = events[call].op;
            linearized[op / 64] &= !(1 << (op % 64));
            state = before;
            if let Some(r) = events[call].partner {
                relink(r, &mut next, &mut prev);
            }
            relink(call, &mut next, &mut prev);
            cur = next[call];
        }
    }
    if next[head] == usize::MAX {
        Verdict::Ok
    } else {
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
}
