//! Whether a node is alive and ready, for `/livez`, `/readyz` and the gRPC health service.
//!
//! 1. The core records, at the end of every round of its loop (at least once a tick), the
//!    leader it knows, when it last heard from it, its applied index and the leader's commit
//!    index as last heard (from the leader's appends and heartbeats). Plain atomics: nothing
//!    waits on the core.
//! 2. Live: the core's loop ran within [`CORE_STALL`] (a core stuck in a hung disk is not).
//! 3. Ready (etcd's /readyz): live, knows a leader and heard from it within an election
//!    timeout (a leader: is one), and has applied up to that leader's commit index. At the
//!    end of a round a follower has applied all the leader told it was committed (one ordered
//!    stream carries the entries before the commit index that covers them), so a follower
//!    under load stays ready; a lagging one, or one cut off from the leader, is not.
//! 4. A node whose loop did not run for longer than an election timeout (paused, starved, or
//!    just started) is not ready for an election timeout after it runs again: what it reads
//!    first is what queued up while it was stalled (old appends, with the leader's old commit
//!    index), which would make it look caught up before it is.
//! 5. A node that is stopping is neither.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::raft::{LogIndex, NodeId};

/// A core whose loop has not run for this long is not live.
pub const CORE_STALL: Duration = Duration::from_secs(5);

pub struct Health {
    started: Instant,
    /// A follower that has not heard from its leader for this long is not ready.
    leader_silent_max: Duration,
    /// Milliseconds since `started` of the core's last round, plus one (0: none yet).
    last_round: AtomicU64,
    leader: AtomicU64,
    /// Milliseconds since `started` when the leader was last heard from, plus one.
    leader_heard: AtomicU64,
    applied: AtomicU64,
    leader_commit: AtomicU64,
    /// Milliseconds since `started` when the loop last ran again after a stall (see 4).
    resumed: AtomicU64,
    stopping: AtomicBool,
}

/// One check's name and outcome (`Err` says why it failed).
pub type Check = (&'static str, Result<(), String>);

impl Health {
    /// `leader_silent_max`: the election timeout (a follower that heard nothing from its
    /// leader for longer is cut off from it).
    pub fn new(leader_silent_max: Duration) -> Health {
        Health {
            started: Instant::now(),
            leader_silent_max,
            last_round: AtomicU64::new(0),
            leader: AtomicU64::new(0),
            leader_heard: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            leader_commit: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    fn since(&self, ms: u64) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(ms))
    }

    /// The core's state at the end of a round; `heard`: it heard from the leader in this
    /// round (or is the leader).
    pub fn round(&self, leader: NodeId, heard: bool, applied: LogIndex, leader_commit: LogIndex) {
        let now = self.now_ms();
        let last = self.last_round.swap(now, Ordering::Relaxed);
        if last == 0 || Duration::from_millis(now - last.min(now)) > self.leader_silent_max {
            self.resumed.store(now, Ordering::Relaxed);
        }
        self.leader.store(leader, Ordering::Relaxed);
        if heard {
            self.leader_heard.store(now, Ordering::Relaxed);
        }
        self.applied.store(applied, Ordering::Relaxed);
        self.leader_commit.store(leader_commit, Ordering::Relaxed);
    }

    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub fn live(&self) -> Vec<Check> {
        let last = self.last_round.load(Ordering::Relaxed);
        let core = if self.stopping.load(Ordering::Relaxed) {
            Err("the node is shutting down".to_string())
        } else if last == 0 {
            Err("the Raft core has not started yet".to_string())
        } else {
            let idle = self.since(last);
            if idle > CORE_STALL {
                Err(format!(
                    "the Raft core has not run for {:.1} s (a hung disk?)",
                    idle.as_secs_f64()
                ))
            } else {
                Ok(())
            }
        };
        vec![("core", core)]
    }

    pub fn ready(&self) -> Vec<Check> {
        let mut checks = self.live();
        let leader = self.leader.load(Ordering::Relaxed);
        let heard = self.leader_heard.load(Ordering::Relaxed);
        let silent = self.since(heard);
        checks.push((
            "leader",
            if leader == 0 {
                Err("no leader known (an election is under way, or this node is cut off from a quorum)".into())
            } else if heard == 0 || silent > self.leader_silent_max {
                Err(format!(
                    "nothing heard from leader {leader} for {} ms (cut off from it?)",
                    silent.as_millis()
                ))
            } else {
                Ok(())
            },
        ));
        let (applied, commit) = (
            self.applied.load(Ordering::Relaxed),
            self.leader_commit.load(Ordering::Relaxed),
        );
        let running = self.since(self.resumed.load(Ordering::Relaxed));
        checks.push((
            "applied",
            if leader == 0 {
                Err("no leader to catch up with".into())
            } else if running <= self.leader_silent_max {
                Err(format!(
                    "running again for {} ms only, after a stall or start: what it has heard may be old",
                    running.as_millis()
                ))
            } else if applied < commit {
                Err(format!(
                    "applied up to {applied}, behind the leader's commit index {commit}"
                ))
            } else {
                Ok(())
            },
        ));
        checks
    }
}

/// Whether every check passed.
pub fn passed(checks: &[Check]) -> bool {
    checks.iter().all(|(_, r)| r.is_ok())
}

/// etcd's format: `ok` when every check passed (unless `verbose`); else a line per check,
/// `[+]name ok` or `[-]name failed: why`, then `<what> check failed`.
pub fn report(what: &str, checks: &[Check], verbose: bool) -> String {
    let ok = passed(checks);
    if ok && !verbose {
        return "ok\n".into();
    }
    let mut out = String::new();
    for (name, r) in checks {
        match r {
            Ok(()) => out.push_str(&format!("[+]{name} ok\n")),
            Err(why) => out.push_str(&format!("[-]{name} failed: {why}\n")),
        }
    }
    out.push_str(&if ok {
        format!("{what} check passed\n")
    } else {
        format!("{what} check failed\n")
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rounds every 5 ms for `ms`, as a running core's loop gives them.
    fn run_for(h: &Health, ms: u64, leader: NodeId, applied: LogIndex, commit: LogIndex) {
        let until = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < until {
            h.round(leader, leader != 0, applied, commit);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn ready_needs_a_leader_heard_from_and_its_commit_applied() {
        let h = Health::new(Duration::from_millis(50));
        assert!(!passed(&h.live()), "no round yet");
        h.round(0, false, 10, 10);
        assert!(passed(&h.live()));
        let r = report("readyz", &h.ready(), false);
        assert!(r.contains("[-]leader failed: no leader"), "{r}");

        // Just started: not ready for an election timeout, whatever it has heard.
        h.round(2, true, 10, 10);
        let r = report("readyz", &h.ready(), false);
        assert!(r.contains("[-]applied failed: running again for"), "{r}");
        run_for(&h, 80, 2, 10, 10);
        assert!(
            passed(&h.ready()),
            "{}",
            report("readyz", &h.ready(), false)
        );
        assert_eq!(report("readyz", &h.ready(), false), "ok\n");
        assert!(report("readyz", &h.ready(), true).contains("[+]applied ok"));

        // A leader known but not heard from (its id came in a vote, say): not ready.
        let fresh = Health::new(Duration::from_millis(50));
        fresh.round(3, false, 10, 10);
        let r = report("readyz", &fresh.ready(), false);
        assert!(
            r.contains("[-]leader failed: nothing heard from leader 3"),
            "{r}"
        );

        // Behind the leader's commit index: not ready, and says by how much.
        h.round(2, true, 5, 900);
        let r = report("readyz", &h.ready(), false);
        assert!(
            r.contains("[-]applied failed: applied up to 5, behind the leader's commit index 900"),
            "{r}"
        );
        h.round(2, true, 900, 900);
        assert!(passed(&h.ready()));

        // Stalled longer than an election timeout (a paused process): not ready at once, even
        // though the first (old) append it reads says it is caught up.
        std::thread::sleep(Duration::from_millis(70));
        h.round(2, true, 900, 900);
        assert!(
            !passed(&h.ready()),
            "{}",
            report("readyz", &h.ready(), false)
        );
        run_for(&h, 80, 2, 900, 900);
        assert!(passed(&h.ready()));

        h.stopping();
        assert!(!passed(&h.live()));
        assert!(!passed(&h.ready()));
    }

    #[test]
    fn a_follower_that_stops_hearing_from_its_leader_is_not_ready() {
        let h = Health::new(Duration::from_millis(100));
        run_for(&h, 130, 2, 10, 10);
        assert!(passed(&h.ready()));
        // Its loop runs on, but nothing comes from the leader.
        let until = Instant::now() + Duration::from_millis(150);
        while Instant::now() < until {
            h.round(2, false, 10, 10);
            std::thread::sleep(Duration::from_millis(5));
        }
        let r = report("readyz", &h.ready(), false);
        assert!(
            r.contains("[-]leader failed: nothing heard from leader 2"),
            "{r}"
        );
        assert!(passed(&h.live()));
    }
}
