//! The cluster's configuration as the log records it: every member with its address and
//! whether it votes, plus the ids removed for good (an id is never reused, so that a late
//! message of a removed node can never be taken for a new member's).
//!
//! A configuration-change entry holds the *whole* new configuration (hashicorp/raft does the
//! same), so that an entry means the same thing wherever it is read: on append, on restart, in
//! a snapshot, on a node that joined with nothing. It is JSON, which an operator can read in a
//! dump of the log; such entries are rare and small.
//!
//! Changes are single-server (Raft dissertation 4.1): add a learner, promote a learner to
//! voter, remove a member. Any two majorities of configurations that differ by one voter
//! overlap, so no joint consensus is needed, provided the leader changes one at a time and has
//! committed an entry of its own term first (the 2015 raft-dev correction); see
//! [`crate::raft::Raft::propose_conf_change`].

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::tracker::Membership;
use super::types::NodeId;

/// One member: where it listens for peers and clients, and whether it votes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// `host:port`; empty when not known (a configuration built from ids alone, in tests).
    #[serde(default)]
    pub address: String,
    pub voter: bool,
}

/// A configuration: the members and the ids removed for good.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    pub members: BTreeMap<NodeId, Member>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub removed: BTreeSet<NodeId>,
}

/// One single-server change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfChange {
    /// A new member that receives the log but does not vote until promoted.
    AddLearner { id: NodeId, address: String },
    /// A learner becomes a voter (the leader checks that it has caught up).
    Promote { id: NodeId },
    /// A member (voter or learner, the leader included) leaves for good.
    Remove { id: NodeId },
}

impl ConfChange {
    /// The node the change is about.
    pub fn node(&self) -> NodeId {
        match *self {
            ConfChange::AddLearner { id, .. }
            | ConfChange::Promote { id }
            | ConfChange::Remove { id } => id,
        }
    }
}

impl std::fmt::Display for ConfChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfChange::AddLearner { id, address } => {
                write!(f, "add node {id} at {address} as a learner")
            }
            ConfChange::Promote { id } => write!(f, "promote node {id} to voter"),
            ConfChange::Remove { id } => write!(f, "remove node {id}"),
        }
    }
}

impl ClusterConfig {
    /// Voters `ids`, with no addresses.
    pub fn with_voters(ids: impl IntoIterator<Item = NodeId>) -> Self {
        ClusterConfig {
            members: ids
                .into_iter()
                .map(|id| {
                    (
                        id,
                        Member {
                            address: String::new(),
                            voter: true,
                        },
                    )
                })
                .collect(),
            removed: BTreeSet::new(),
        }
    }

    /// Adds learner `id` (no address), for tests and the simulator.
    pub fn add_learner(&mut self, id: NodeId) {
        self.members.insert(
            id,
            Member {
                address: String::new(),
                voter: false,
            },
        );
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn voters(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.members
            .iter()
            .filter(|(_, m)| m.voter)
            .map(|(&id, _)| id)
    }

    pub fn learners(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.members
            .iter()
            .filter(|(_, m)| !m.voter)
            .map(|(&id, _)| id)
    }

    pub fn is_voter(&self, id: NodeId) -> bool {
        self.members.get(&id).is_some_and(|m| m.voter)
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.members.contains_key(&id)
    }

    /// The address of `id`, if it is a member with a known address.
    pub fn address(&self, id: NodeId) -> Option<&str> {
        self.members
            .get(&id)
            .map(|m| m.address.as_str())
            .filter(|a| !a.is_empty())
    }

    /// The ids and roles the quorum arithmetic needs.
    pub fn membership(&self) -> Membership {
        Membership {
            learners: self.learners().collect(),
            ..Membership::new(self.voters())
        }
    }

    /// The configuration after `change`, or why the change is not possible in this one.
    /// (Whether a learner has caught up is the leader's to judge; see `propose_conf_change`.)
    ///
    /// # Errors
    /// A text for the operator naming what is wrong.
    pub fn apply(&self, change: &ConfChange) -> Result<ClusterConfig, String> {
        let mut next = self.clone();
        match change {
            ConfChange::AddLearner { id, address } => {
                let id = *id;
                if id == 0 {
                    return Err("node id 0 is reserved".into());
                }
                if self.removed.contains(&id) {
                    return Err(format!(
                        "node id {id} belonged to a member that was removed; ids are never reused, choose a new one"
                    ));
                }
                if let Some(m) = self.members.get(&id) {
                    let role = if m.voter { "voter" } else { "learner" };
                    return Err(format!(
                        "node {id} is already a member ({role} at {})",
                        m.address
                    ));
                }
                if address.is_empty() {
                    return Err(format!("node {id} needs an address (host:port)"));
                }
                if let Some((other, _)) = self
                    .members
                    .iter()
                    .find(|(_, m)| m.address.eq_ignore_ascii_case(address))
                {
                    return Err(format!("address {address} is already node {other}'s"));
                }
                next.members.insert(
                    id,
                    Member {
                        address: address.clone(),
                        voter: false,
                    },
                );
            }
            ConfChange::Promote { id } => match next.members.get_mut(id) {
                None => return Err(format!("node {id} is not a member")),
                Some(m) if m.voter => return Err(format!("node {id} is already a voter")),
                Some(m) => m.voter = true,
            },
            ConfChange::Remove { id } => {
                let Some(m) = next.members.remove(id) else {
                    return Err(format!("node {id} is not a member"));
                };
                if m.voter && next.voters().next().is_none() {
                    return Err(format!(
                        "node {id} is the last voter; a cluster needs at least one"
                    ));
                }
                next.removed.insert(*id);
            }
        }
        Ok(next)
    }

    /// The payload of a configuration-change entry.
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("a configuration always serialises"))
    }

    /// # Errors
    /// The payload is not a configuration.
    pub fn decode(data: &[u8]) -> Result<Self, String> {
        let c: ClusterConfig = serde_json::from_slice(data).map_err(|e| e.to_string())?;
        if c.members.contains_key(&0) {
            return Err("member id 0".into());
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_check_what_an_operator_can_get_wrong() {
        let c = ClusterConfig::with_voters([1, 2, 3]);
        let add = |id, a: &str| ConfChange::AddLearner {
            id,
            address: a.into(),
        };
        let c4 = c.apply(&add(4, "h:4")).expect("add 4");
        assert!(c4.contains(4) && !c4.is_voter(4));
        assert!(
            c4.apply(&add(4, "h:5"))
                .expect_err("refused")
                .contains("already a member")
        );
        assert!(
            c4.apply(&add(5, "H:4"))
                .expect_err("refused")
                .contains("already node 4")
        );
        assert!(
            c4.apply(&add(5, ""))
                .expect_err("refused")
                .contains("address")
        );
        let p = c4.apply(&ConfChange::Promote { id: 4 }).expect("promote");
        assert!(p.is_voter(4));
        assert!(
            p.apply(&ConfChange::Promote { id: 4 })
                .expect_err("refused")
                .contains("already a voter")
        );
        let r = p.apply(&ConfChange::Remove { id: 2 }).expect("remove");
        assert!(!r.contains(2) && r.removed.contains(&2));
        assert!(
            r.apply(&add(2, "h:2"))
                .expect_err("refused")
                .contains("never reused")
        );
        assert!(
            r.apply(&ConfChange::Remove { id: 2 })
                .expect_err("refused")
                .contains("not a member")
        );
        let one = ClusterConfig::with_voters([1]);
        assert!(
            one.apply(&ConfChange::Remove { id: 1 })
                .expect_err("refused")
                .contains("last voter")
        );
        let round = ClusterConfig::decode(&r.encode()).expect("decode");
        assert_eq!(round, r);
        assert!(ClusterConfig::decode(b"{\"members\":{\"0\":{\"voter\":true}}}").is_err());
    }
}
