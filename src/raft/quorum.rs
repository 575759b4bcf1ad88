//! Quorum arithmetic over a configuration, and nothing else (after etcd-io/raft `quorum/`):
//! which index a quorum has reached, and whether a vote is won. A `MajorityConfig` is one set
//! of voters; a `JointConfig` is the pair of them that joint consensus needs (dissertation
//! 4.3), and equals a plain majority while its outgoing half is empty. Every decision of the
//! core that depends on "a majority" goes through here, so that learners (members that vote
//! on nothing) and configuration changes need no other code to agree on it.

use std::collections::BTreeSet;

use super::types::{LogIndex, NodeId};

/// The outcome of a vote so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoteResult {
    /// Neither won nor lost yet: more answers are needed.
    Pending,
    /// A quorum refused (or can no longer grant).
    Lost,
    Won,
}

/// One set of voters deciding by simple majority.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MajorityConfig {
    voters: BTreeSet<NodeId>,
}

impl MajorityConfig {
    pub fn new(voters: impl IntoIterator<Item = NodeId>) -> Self {
        MajorityConfig {
            voters: voters.into_iter().collect(),
        }
    }

    pub fn voters(&self) -> &BTreeSet<NodeId> {
        &self.voters
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.voters.contains(&id)
    }

    pub fn len(&self) -> usize {
        self.voters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.voters.is_empty()
    }

    /// The number of voters that make a majority.
    pub fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    /// The largest index that a majority of the voters has reached, by `acked` (a voter it
    /// knows nothing of counts as 0). An empty configuration has reached everything
    /// (`LogIndex::MAX`), so that it never holds back the other half of a joint one.
    pub fn committed_index(&self, acked: impl Fn(NodeId) -> Option<LogIndex>) -> LogIndex {
        if self.voters.is_empty() {
            return LogIndex::MAX;
        }
        // Small configurations: a stack array, no allocation on the hot path.
        let mut buf = [0 as LogIndex; 16];
        let mut heap;
        let values: &mut [LogIndex] = if self.voters.len() <= buf.len() {
            &mut buf[..self.voters.len()]
        } else {
            heap = vec![0; self.voters.len()];
            &mut heap
        };
        for (slot, &id) in values.iter_mut().zip(&self.voters) {
            *slot = acked(id).unwrap_or(0);
        }
        values.sort_unstable_by(|a, b| b.cmp(a));
        values[self.quorum() - 1]
    }

    /// Whether the vote recorded by `votes` (`Some(granted)` for a voter that answered) is won,
    /// lost or still open. An empty configuration has won.
    pub fn vote_result(&self, votes: impl Fn(NodeId) -> Option<bool>) -> VoteResult {
        if self.voters.is_empty() {
            return VoteResult::Won;
        }
        let (mut yes, mut missing) = (0, 0);
        for &id in &self.voters {
            match votes(id) {
                Some(true) => yes += 1,
                Some(false) => {}
                None => missing += 1,
            }
        }
        let q = self.quorum();
        if yes >= q {
            VoteResult::Won
        } else if yes + missing >= q {
            VoteResult::Pending
        } else {
            VoteResult::Lost
        }
    }
}

/// The voters of a configuration: `incoming`, and while a joint change is in progress also
/// `outgoing` (empty otherwise). A decision needs a majority of each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JointConfig {
    pub incoming: MajorityConfig,
    pub outgoing: MajorityConfig,
}

impl JointConfig {
    pub fn new(voters: impl IntoIterator<Item = NodeId>) -> Self {
        JointConfig {
            incoming: MajorityConfig::new(voters),
            outgoing: MajorityConfig::default(),
        }
    }

    /// Every voter of either half.
    pub fn ids(&self) -> BTreeSet<NodeId> {
        self.incoming
            .voters()
            .union(self.outgoing.voters())
            .copied()
            .collect()
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.incoming.contains(id) || self.outgoing.contains(id)
    }

    /// Whether `id` alone decides everything (a single voter, no joint change).
    pub fn is_singleton_of(&self, id: NodeId) -> bool {
        self.outgoing.is_empty() && self.incoming.len() == 1 && self.incoming.contains(id)
    }

    pub fn committed_index(&self, acked: impl Fn(NodeId) -> Option<LogIndex>) -> LogIndex {
        self.incoming
            .committed_index(&acked)
            .min(self.outgoing.committed_index(&acked))
    }

    pub fn vote_result(&self, votes: impl Fn(NodeId) -> Option<bool>) -> VoteResult {
        match (
            self.incoming.vote_result(&votes),
            self.outgoing.vote_result(&votes),
        ) {
            (VoteResult::Won, VoteResult::Won) => VoteResult::Won,
            (VoteResult::Lost, _) | (_, VoteResult::Lost) => VoteResult::Lost,
            _ => VoteResult::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn acked(m: &BTreeMap<NodeId, LogIndex>) -> impl Fn(NodeId) -> Option<LogIndex> + '_ {
        |id| m.get(&id).copied()
    }

    #[test]
    fn committed_index_is_what_a_majority_reached() {
        let c = MajorityConfig::new([1, 2, 3]);
        let m = BTreeMap::from([(1, 10), (2, 5), (3, 7)]);
        assert_eq!(c.committed_index(acked(&m)), 7);
        // A voter not heard of counts as 0; a node outside the configuration not at all.
        let m = BTreeMap::from([(1, 10), (2, 5), (9, 100)]);
        assert_eq!(c.committed_index(acked(&m)), 5);
        assert_eq!(MajorityConfig::new([4]).committed_index(|_| Some(3)), 3);
        assert_eq!(
            MajorityConfig::default().committed_index(|_| Some(3)),
            LogIndex::MAX
        );
        let even = MajorityConfig::new([1, 2, 3, 4]);
        let m = BTreeMap::from([(1, 9), (2, 8), (3, 2), (4, 1)]);
        assert_eq!(even.committed_index(acked(&m)), 2, "3 of 4 needed");
    }

    /// Against a brute force: the largest v that at least a majority of voters has reached.
    #[test]
    fn committed_index_matches_brute_force() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = (x % 20) as usize + 1;
            let c = MajorityConfig::new(1..=n as u64);
            let m: BTreeMap<NodeId, LogIndex> = (1..=n as u64)
                .map(|id| (id, (x.rotate_left(id as u32 * 3)) % 50))
                .collect();
            let brute = (0..=50)
                .rev()
                .find(|&v| m.values().filter(|&&a| a >= v).count() >= c.quorum())
                .unwrap_or(0);
            assert_eq!(c.committed_index(acked(&m)), brute, "{m:?}");
        }
    }

    #[test]
    fn majority_sizes() {
        let q = |n: u64| MajorityConfig::new(1..=n).quorum();
        assert_eq!([q(1), q(2), q(3), q(4), q(5), q(7)], [1, 2, 2, 3, 3, 4]);
    }

    #[test]
    fn votes_are_won_lost_or_pending() {
        let c = MajorityConfig::new([1, 2, 3]);
        let v = |m: BTreeMap<NodeId, bool>| c.vote_result(|id| m.get(&id).copied());
        assert_eq!(v(BTreeMap::from([(1, true)])), VoteResult::Pending);
        assert_eq!(v(BTreeMap::from([(1, true), (2, true)])), VoteResult::Won);
        assert_eq!(
            v(BTreeMap::from([(1, true), (2, false)])),
            VoteResult::Pending
        );
        assert_eq!(
            v(BTreeMap::from([(2, false), (3, false)])),
            VoteResult::Lost
        );
        // Answers from outside the configuration (a learner) count for nothing.
        assert_eq!(
            v(BTreeMap::from([(1, true), (7, true), (8, true)])),
            VoteResult::Pending
        );
        assert_eq!(
            MajorityConfig::default().vote_result(|_| None),
            VoteResult::Won
        );
    }

    #[test]
    fn a_joint_configuration_needs_both_halves() {
        let j = JointConfig {
            incoming: MajorityConfig::new([1, 2, 3]),
            outgoing: MajorityConfig::new([3, 4, 5]),
        };
        let m = BTreeMap::from([(1, 9), (2, 9), (3, 4), (4, 2), (5, 1)]);
        assert_eq!(j.committed_index(acked(&m)), 2);
        let votes = BTreeMap::from([(1, true), (2, true)]);
        assert_eq!(
            j.vote_result(|id| votes.get(&id).copied()),
            VoteResult::Pending
        );
        let votes = BTreeMap::from([(1, true), (2, true), (4, false), (5, false)]);
        assert_eq!(
            j.vote_result(|id| votes.get(&id).copied()),
            VoteResult::Lost
        );
        let votes = BTreeMap::from([(1, true), (3, true), (4, true)]);
        assert_eq!(j.vote_result(|id| votes.get(&id).copied()), VoteResult::Won);
        // Not joint: the outgoing half is empty and decides nothing.
        let plain = JointConfig::new([1, 2, 3]);
        assert_eq!(plain.committed_index(acked(&m)), 9);
        assert!(JointConfig::new([2]).is_singleton_of(2));
        assert!(!plain.is_singleton_of(1));
        assert_eq!(plain.ids(), BTreeSet::from([1, 2, 3]));
        assert_eq!(j.ids(), BTreeSet::from([1, 2, 3, 4, 5]));
    }
}
