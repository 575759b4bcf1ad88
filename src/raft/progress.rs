//! What a leader knows about each follower's log (Raft paper Figure 2: `nextIndex`,
//! `matchIndex`), plus the flow control of etcd raft's progress tracker.

use std::collections::VecDeque;

use super::types::LogIndex;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    /// We don't know where the follower's log matches ours: send one append at a time and wait
    /// for its answer (or the next heartbeat) before sending the next.
    Probe,
    /// The follower's log matches up to `match_index`: stream appends optimistically, up to
    /// `max_inflight` unacknowledged messages.
    Replicate,
    /// The entries the follower needs next are compacted away: a snapshot is being streamed to
    /// it, and nothing else is sent until the transfer ends.
    Snapshot,
}

#[derive(Clone, Debug)]
pub struct Progress {
    /// Invariant: `match_index < next_index`.
    pub match_index: LogIndex,
    pub next_index: LogIndex,
    pub state: ProgressState,
    /// Probe only: an append is out and unanswered.
    pub probe_sent: bool,
    /// Replicate only: the last index and entry bytes of each append in flight, oldest first.
    pub inflight: VecDeque<(LogIndex, usize)>,
    /// Sum of the bytes in `inflight`.
    pub inflight_bytes: usize,
    /// Heard from since the last check-quorum round.
    pub recent_active: bool,
    /// The highest ReadIndex round this follower acknowledged.
    pub read_ack: u64,
    /// `match_index` at the last heartbeat, and for how many heartbeats in a row it has not
    /// moved while appends were in flight (a lost append stalls a pipeline; see `tick`).
    pub match_at_heartbeat: LogIndex,
    pub stalled_heartbeats: u32,
}

impl Progress {
    pub fn new(next_index: LogIndex) -> Self {
        Progress {
            match_index: 0,
            next_index,
            state: ProgressState::Probe,
            probe_sent: false,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            recent_active: false,
            read_ack: 0,
            match_at_heartbeat: 0,
            stalled_heartbeats: 0,
        }
    }

    /// Whether no more appends may go out: in Replicate, `max_inflight` messages or
    /// `max_inflight_bytes` of entries are unacknowledged (one message always may), so that a
    /// follower catching up is fed at the pace it acknowledges, with bounded memory on both
    /// sides (etcd raft `MaxInflightBytes`).
    pub fn is_paused(&self, max_inflight: usize, max_inflight_bytes: usize) -> bool {
        match self.state {
            ProgressState::Probe => self.probe_sent,
            ProgressState::Replicate => {
                self.inflight.len() >= max_inflight
                    || (!self.inflight.is_empty() && self.inflight_bytes >= max_inflight_bytes)
            }
            ProgressState::Snapshot => true,
        }
    }

    pub fn become_snapshot(&mut self) {
        self.state = ProgressState::Snapshot;
        self.probe_sent = false;
        self.inflight.clear();
        self.inflight_bytes = 0;
    }

    pub fn become_probe(&mut self) {
        self.state = ProgressState::Probe;
        self.next_index = self.match_index + 1;
        self.probe_sent = false;
        self.inflight.clear();
        self.inflight_bytes = 0;
    }

    pub fn become_replicate(&mut self) {
        self.state = ProgressState::Replicate;
        self.next_index = self.match_index + 1;
        self.probe_sent = false;
        self.inflight.clear();
        self.inflight_bytes = 0;
    }

    /// Called every heartbeat. A pipeline whose match index has not moved for two heartbeats
    /// while appends are in flight lost one of them (a broken connection): go back to probing
    /// from the match index. Returns whether it did.
    pub fn check_stalled(&mut self) -> bool {
        let moved = self.match_index != self.match_at_heartbeat;
        self.match_at_heartbeat = self.match_index;
        if self.state != ProgressState::Replicate || self.inflight.is_empty() || moved {
            self.stalled_heartbeats = 0;
            return false;
        }
        self.stalled_heartbeats += 1;
        if self.stalled_heartbeats >= 2 {
            self.stalled_heartbeats = 0;
            self.become_probe();
            return true;
        }
        false
    }

    /// An append ending at `last`, with `bytes` of entries, went out.
    pub fn sent_entries(&mut self, last: LogIndex, bytes: usize) {
        match self.state {
            ProgressState::Replicate => {
                self.next_index = last + 1;
                self.inflight.push_back((last, bytes));
                self.inflight_bytes += bytes;
            }
            ProgressState::Probe => self.probe_sent = true,
            ProgressState::Snapshot => {}
        }
    }

    /// The follower acknowledged that its log matches ours up to `index`. Returns whether that
    /// was news.
    pub fn maybe_update(&mut self, index: LogIndex) -> bool {
        let updated = index > self.match_index;
        if updated {
            self.match_index = index;
            self.probe_sent = false;
        }
        self.next_index = self.next_index.max(index + 1);
        while self
            .inflight
            .front()
            .is_some_and(|&(last, _)| last <= index)
        {
            if let Some((_, bytes)) = self.inflight.pop_front() {
                self.inflight_bytes -= bytes;
            }
        }
        updated
    }

    /// The follower rejected an append at `rejected`; `match_hint` is where its log may match
    /// ours. Returns false if the rejection is stale (answers an append we already superseded).
    ///
    /// A rejection at the match index itself (a heartbeat's) whose hint lies below it says the
    /// follower no longer holds entries it acknowledged: it lost its log (a wiped or damaged
    /// disk). The match index drops to the hint, so that the follower is caught up again, by
    /// snapshot if needed, instead of being probed at the same index forever. (If the rejection
    /// was merely old, this costs a resend of entries the follower already has.)
    pub fn maybe_decr_to(&mut self, rejected: LogIndex, match_hint: LogIndex) -> bool {
        let lost_log = rejected == self.match_index && match_hint < self.match_index;
        match self.state {
            ProgressState::Replicate => {
                if rejected <= self.match_index && !lost_log {
                    return false;
                }
                if lost_log {
                    self.match_index = match_hint;
                }
                self.become_probe();
                true
            }
            ProgressState::Probe => {
                if self.next_index != rejected + 1 {
                    return false;
                }
                if match_hint < self.match_index {
                    self.match_index = match_hint;
                }
                self.next_index = rejected.min(match_hint + 1).max(self.match_index + 1);
                self.probe_sent = false;
                true
            }
            ProgressState::Snapshot => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_in_flight_pause_a_replicating_follower() {
        let mut p = Progress::new(1);
        p.become_replicate();
        assert!(!p.is_paused(256, 250));
        p.sent_entries(1, 100);
        p.sent_entries(2, 100);
        assert!(!p.is_paused(256, 250));
        p.sent_entries(3, 100);
        assert!(p.is_paused(256, 250), "300 bytes in flight");
        assert!(p.maybe_update(1));
        assert!(!p.is_paused(256, 250), "200 bytes in flight");
        // One message always goes, however large.
        let mut q = Progress::new(1);
        q.become_replicate();
        assert!(!q.is_paused(256, 10));
        q.sent_entries(1, 1000);
        assert!(q.is_paused(256, 10));
        q.become_probe();
        assert_eq!(q.inflight_bytes, 0);
    }

    #[test]
    fn stale_rejections_are_ignored() {
        let mut p = Progress::new(10);
        p.become_replicate();
        p.maybe_update(5);
        assert!(!p.maybe_decr_to(4, 4), "rejection below match is stale");
        assert!(p.maybe_decr_to(8, 6));
        assert_eq!(p.state, ProgressState::Probe);
        assert_eq!(p.next_index, 6);
        assert!(
            !p.maybe_decr_to(8, 6),
            "probe rejection for another index is stale"
        );
        assert!(p.maybe_decr_to(5, 3));
        assert_eq!(
            (p.match_index, p.next_index),
            (3, 4),
            "a rejection at the match index with a lower hint: the follower lost its log"
        );
    }
}
