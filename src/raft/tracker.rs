//! Who the members are and, on a leader, how far each one's log has come (after etcd-io/raft
//! `tracker/` and raft-rs `tracker/`). The leader is tracked like every other member: its own
//! progress is its durable log, so that "has a quorum reached index i" is one question asked
//! of the voters, whoever leads. Majorities come from [`super::quorum`]; nothing outside
//! these two modules counts voters.

use std::collections::{BTreeMap, BTreeSet};

use super::progress::Progress;
use super::quorum::{JointConfig, VoteResult};
use super::types::{LogIndex, NodeId};

/// The members of a configuration: voters (possibly a joint pair) and learners, which receive
/// the log but vote on nothing and count toward no quorum.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    pub voters: JointConfig,
    pub learners: BTreeSet<NodeId>,
}

impl Membership {
    /// A configuration of `voters` only.
    pub fn new(voters: impl IntoIterator<Item = NodeId>) -> Self {
        Membership {
            voters: JointConfig::new(voters),
            learners: BTreeSet::new(),
        }
    }

    /// Every member, voter or learner.
    pub fn members(&self) -> BTreeSet<NodeId> {
        let mut all = self.voters.ids();
        all.extend(&self.learners);
        all
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.voters.contains(id) || self.learners.contains(&id)
    }

    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(id)
    }
}

/// The membership, plus the leader's progress of every member and a campaign's votes.
#[derive(Debug, Clone, Default)]
pub struct ProgressTracker {
    membership: Membership,
    /// Leader only: every member, the leader itself included.
    progress: BTreeMap<NodeId, Progress>,
    /// (Pre-)candidate only: the first answer of each node in this campaign.
    votes: BTreeMap<NodeId, bool>,
    /// Leader only: members the latest (uncommitted) configuration removed. They are still
    /// replicated to, so that they learn of their removal, but count for nothing.
    departing: BTreeSet<NodeId>,
}

impl ProgressTracker {
    pub fn new(membership: Membership) -> Self {
        ProgressTracker {
            membership,
            progress: BTreeMap::new(),
            votes: BTreeMap::new(),
            departing: BTreeSet::new(),
        }
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// The members other than `me`, in id order: whom a leader replicates to and a candidate
    /// asks (a learner is never asked for a vote: see `voters_except`).
    pub fn peers(&self, me: NodeId) -> Vec<NodeId> {
        self.tracked().into_iter().filter(|&id| id != me).collect()
    }

    /// Every node a leader tracks: the members and the departing.
    pub fn tracked(&self) -> BTreeSet<NodeId> {
        let mut all = self.membership.members();
        all.extend(&self.departing);
        all
    }

    pub fn departing(&self) -> &BTreeSet<NodeId> {
        &self.departing
    }

    /// A departing member has learned of its removal: it is no longer tracked.
    pub fn release(&mut self, id: NodeId) {
        self.departing.remove(&id);
        self.progress.remove(&id);
    }

    /// The voters other than `me`.
    pub fn voters_except(&self, me: NodeId) -> Vec<NodeId> {
        self.membership
            .voters
            .ids()
            .into_iter()
            .filter(|&id| id != me)
            .collect()
    }

    // ---------------------------------------------------------------------------------------
    // Progress (leader)
    // ---------------------------------------------------------------------------------------

    /// A new leader `me` starts tracking every member at `next`, each counted as active until
    /// the first check-quorum round; its own progress is its durable log (`durable`).
    pub fn reset_progress(&mut self, me: NodeId, next: LogIndex, durable: LogIndex) {
        self.progress.clear();
        for id in self.tracked() {
            let mut pr = Progress::new(next);
            pr.recent_active = true;
            if id == me {
                pr.match_index = durable;
                pr.next_index = durable + 1;
            }
            self.progress.insert(id, pr);
        }
    }

    /// A new configuration. On a leader (`leader`: `(next, durable)` as for
    /// [`Self::reset_progress`]), new members start being probed at `next` and members that
    /// left stop being tracked.
    /// `departing`: members of the configuration before, not in this one, while this one is
    /// not committed.
    pub fn set_membership(
        &mut self,
        membership: Membership,
        departing: BTreeSet<NodeId>,
        me: NodeId,
        leader: Option<(LogIndex, LogIndex)>,
    ) {
        self.membership = membership;
        self.departing = departing;
        let Some((next, durable)) = leader else {
            return;
        };
        let members = self.tracked();
        self.progress.retain(|id, _| members.contains(id));
        for id in members {
            self.progress.entry(id).or_insert_with(|| {
                // A new member has not been heard from (it counts toward no quorum yet).
                let mut pr = Progress::new(next);
                if id == me {
                    pr.match_index = durable;
                    pr.next_index = durable + 1;
                }
                pr
            });
        }
    }

    pub fn clear_progress(&mut self) {
        self.progress.clear();
    }

    pub fn progress(&self) -> &BTreeMap<NodeId, Progress> {
        &self.progress
    }

    pub fn get(&self, id: NodeId) -> Option<&Progress> {
        self.progress.get(&id)
    }

    pub fn get_mut(&mut self, id: NodeId) -> Option<&mut Progress> {
        self.progress.get_mut(&id)
    }

    /// The largest index a quorum of voters has made durable.
    pub fn committed(&self) -> LogIndex {
        self.membership
            .voters
            .committed_index(|id| self.progress.get(&id).map(|p| p.match_index))
    }

    /// The highest ReadIndex round a quorum of voters has acknowledged.
    pub fn read_confirmed(&self) -> u64 {
        self.membership
            .voters
            .committed_index(|id| self.progress.get(&id).map(|p| p.read_ack))
    }

    /// Whether a quorum of voters was heard from since the last [`Self::reset_recent_active`]
    /// (the leader `me` always counts itself).
    pub fn quorum_active(&self, me: NodeId) -> bool {
        self.membership
            .voters
            .vote_result(|id| self.progress.get(&id).map(|p| id == me || p.recent_active))
            == VoteResult::Won
    }

    pub fn reset_recent_active(&mut self, me: NodeId) {
        for (&id, p) in &mut self.progress {
            p.recent_active = id == me;
        }
    }

    // ---------------------------------------------------------------------------------------
    // Votes (candidate)
    // ---------------------------------------------------------------------------------------

    pub fn reset_votes(&mut self) {
        self.votes.clear();
    }

    /// Records `id`'s answer; only its first answer in a campaign counts.
    pub fn record_vote(&mut self, id: NodeId, granted: bool) {
        self.votes.entry(id).or_insert(granted);
    }

    /// The campaign's outcome so far, over the voters only.
    pub fn tally_votes(&self) -> VoteResult {
        self.membership
            .voters
            .vote_result(|id| self.votes.get(&id).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leader_counts_like_any_member() {
        let mut t = ProgressTracker::new(Membership::new([1, 2, 3]));
        t.reset_progress(1, 11, 10);
        assert_eq!(t.committed(), 0, "followers have matched nothing yet");
        t.get_mut(2).expect("2").match_index = 7;
        assert_eq!(t.committed(), 7, "leader (10) and node 2 (7)");
        t.get_mut(3).expect("3").match_index = 12;
        assert_eq!(t.committed(), 10);
        // The leader's durable log is behind: the followers alone make the quorum.
        t.get_mut(1).expect("1").match_index = 3;
        assert_eq!(t.committed(), 7);
    }

    #[test]
    fn learners_are_replicated_to_but_count_for_nothing() {
        let mut m = Membership::new([1, 2, 3]);
        m.learners.insert(4);
        let mut t = ProgressTracker::new(m);
        assert_eq!(t.peers(1), vec![2, 3, 4]);
        assert_eq!(t.voters_except(1), vec![2, 3]);
        t.reset_progress(1, 1, 5);
        t.get_mut(4).expect("4").match_index = 5;
        assert_eq!(t.committed(), 0, "a learner does not make a quorum");
        t.get_mut(2).expect("2").match_index = 5;
        assert_eq!(t.committed(), 5);
        t.reset_recent_active(1);
        t.get_mut(4).expect("4").recent_active = true;
        assert!(
            !t.quorum_active(1),
            "the leader and a learner are no quorum"
        );
        t.get_mut(3).expect("3").recent_active = true;
        assert!(t.quorum_active(1));
        t.record_vote(1, true);
        t.record_vote(4, true);
        assert_eq!(t.tally_votes(), VoteResult::Pending);
        t.record_vote(2, false);
        t.record_vote(2, true);
        assert_eq!(t.tally_votes(), VoteResult::Pending, "first answer counts");
        t.record_vote(3, false);
        assert_eq!(t.tally_votes(), VoteResult::Lost);
    }
}
