//! Conversion between wire (prost) types and core types. Peer input is checked here, once;
//! past this point the core trusts it.

use crate::proto;
use crate::raft::{Entry, EntryKind, Message, MessageBody, NodeId};

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("message without a body")]
    NoBody,
    #[error("message from node {0}: not a node id")]
    UnknownSender(NodeId),
    #[error("message for node {to}, but this is node {me}")]
    WrongRecipient { to: NodeId, me: NodeId },
    #[error("append entries are not contiguous after index {0}")]
    NotContiguous(u64),
    #[error("unknown entry kind {0}")]
    UnknownEntryKind(i32),
}

/// The wire form of a message for the peer stream; `None` for an `InstallSnapshot`, which
/// travels as a snapshot stream of its own (the receiver builds the message from it).
pub fn message_to_wire(m: Message) -> Option<proto::RaftMessage> {
    use proto::raft_message::Body;
    let body = match m.body {
        MessageBody::InstallSnapshot { .. } => return None,
        MessageBody::VoteRequest {
            pre_vote,
            last_log_index,
            last_log_term,
            leader_transfer,
        } => Body::VoteRequest(proto::VoteRequest {
            pre_vote,
            last_log_index,
            last_log_term,
            leader_transfer,
        }),
        MessageBody::TimeoutNow => Body::TimeoutNow(proto::TimeoutNow {}),
        MessageBody::VoteResponse { pre_vote, granted } => {
            Body::VoteResponse(proto::VoteResponse { pre_vote, granted })
        }
        MessageBody::AppendRequest {
            prev_log_index,
            prev_log_term,
            entries,
            leader_commit,
            read_context,
        } => Body::AppendRequest(proto::AppendRequest {
            prev_log_index,
            prev_log_term,
            entries: entries.into_iter().map(entry_to_wire).collect(),
            leader_commit,
            read_context,
        }),
        MessageBody::AppendResponse {
            success,
            index,
            reject_hint_index,
            reject_hint_term,
            read_context,
        } => Body::AppendResponse(proto::AppendResponse {
            success,
            index,
            reject_hint_index,
            reject_hint_term,
            read_context,
        }),
    };
    Some(proto::RaftMessage {
        from: m.from,
        to: m.to,
        term: m.term,
        cluster_id: 0,
        body: Some(body),
    })
}

fn entry_to_wire(e: Entry) -> proto::Entry {
    let kind = match e.kind {
        EntryKind::Normal => proto::EntryKind::Normal,
        EntryKind::Noop => proto::EntryKind::Noop,
        EntryKind::ConfChange => proto::EntryKind::ConfChange,
    };
    proto::Entry {
        index: e.index,
        term: e.term,
        kind: kind as i32,
        data: e.data,
    }
}

/// Checks and converts a message from a peer. `me` is this node, `known` tells whether an id
/// belongs to the cluster.
pub fn message_from_wire(
    m: proto::RaftMessage,
    me: NodeId,
    known: impl Fn(NodeId) -> bool,
) -> Result<Message, ConvertError> {
    use proto::raft_message::Body;
    if m.to != me {
        return Err(ConvertError::WrongRecipient { to: m.to, me });
    }
    if m.from == me || !known(m.from) {
        return Err(ConvertError::UnknownSender(m.from));
    }
    let body = match m.body.ok_or(ConvertError::NoBody)? {
        Body::VoteRequest(v) => MessageBody::VoteRequest {
            pre_vote: v.pre_vote,
            last_log_index: v.last_log_index,
            last_log_term: v.last_log_term,
            leader_transfer: v.leader_transfer,
        },
        Body::TimeoutNow(_) => MessageBody::TimeoutNow,
        Body::VoteResponse(v) => MessageBody::VoteResponse {
            pre_vote: v.pre_vote,
            granted: v.granted,
        },
        Body::AppendRequest(a) => {
            let mut entries = Vec::with_capacity(a.entries.len());
            for (expect, e) in (a.prev_log_index + 1..).zip(a.entries) {
                if e.index != expect {
                    return Err(ConvertError::NotContiguous(expect - 1));
                }
                let kind = match proto::EntryKind::try_from(e.kind) {
                    Ok(proto::EntryKind::Normal) => EntryKind::Normal,
                    Ok(proto::EntryKind::Noop) => EntryKind::Noop,
                    Ok(proto::EntryKind::ConfChange) => EntryKind::ConfChange,
                    Err(_) => return Err(ConvertError::UnknownEntryKind(e.kind)),
                };
                entries.push(Entry {
                    index: e.index,
                    term: e.term,
                    kind,
                    data: e.data,
                });
            }
            MessageBody::AppendRequest {
                prev_log_index: a.prev_log_index,
                prev_log_term: a.prev_log_term,
                entries,
                leader_commit: a.leader_commit,
                read_context: a.read_context,
            }
        }
        Body::AppendResponse(a) => MessageBody::AppendResponse {
            success: a.success,
            index: a.index,
            reject_hint_index: a.reject_hint_index,
            reject_hint_term: a.reject_hint_term,
            read_context: a.read_context,
        },
    };
    Ok(Message {
        from: m.from,
        to: m.to,
        term: m.term,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn append(entries: Vec<Entry>) -> Message {
        Message {
            from: 2,
            to: 1,
            term: 3,
            body: MessageBody::AppendRequest {
                prev_log_index: 4,
                prev_log_term: 2,
                entries,
                leader_commit: 4,
                read_context: 7,
            },
        }
    }

    #[test]
    fn round_trip() {
        let e = |i| Entry {
            index: i,
            term: 3,
            kind: EntryKind::Normal,
            data: Bytes::from("x"),
        };
        let msgs = [
            append(vec![e(5), e(6)]),
            Message {
                from: 2,
                to: 1,
                term: 3,
                body: MessageBody::VoteRequest {
                    pre_vote: true,
                    last_log_index: 1,
                    last_log_term: 1,
                    leader_transfer: false,
                },
            },
            Message {
                from: 3,
                to: 1,
                term: 3,
                body: MessageBody::VoteResponse {
                    pre_vote: false,
                    granted: true,
                },
            },
            Message {
                from: 3,
                to: 1,
                term: 3,
                body: MessageBody::AppendResponse {
                    success: false,
                    index: 9,
                    reject_hint_index: 5,
                    reject_hint_term: 2,
                    read_context: 1,
                },
            },
        ];
        for m in msgs {
            let back =
                message_from_wire(message_to_wire(m.clone()).expect("wire"), 1, |id| id <= 3)
                    .expect("valid");
            assert_eq!(back, m);
        }
    }

    #[test]
    fn bad_input_is_refused() {
        let e = |i| Entry {
            index: i,
            term: 3,
            kind: EntryKind::Normal,
            data: Bytes::new(),
        };
        let gap = message_to_wire(append(vec![e(5), e(7)])).expect("wire");
        assert!(matches!(
            message_from_wire(gap, 1, |_| true),
            Err(ConvertError::NotContiguous(5))
        ));
        let wrong_start = message_to_wire(append(vec![e(6)])).expect("wire");
        assert!(matches!(
            message_from_wire(wrong_start, 1, |_| true),
            Err(ConvertError::NotContiguous(4))
        ));
        let m = message_to_wire(append(vec![])).expect("wire");
        assert!(matches!(
            message_from_wire(m.clone(), 2, |_| true),
            Err(ConvertError::WrongRecipient { .. })
        ));
        assert!(matches!(
            message_from_wire(m.clone(), 1, |id| id != 2),
            Err(ConvertError::UnknownSender(2))
        ));
        let mut no_body = m;
        no_body.body = None;
        assert!(matches!(
            message_from_wire(no_body, 1, |_| true),
            Err(ConvertError::NoBody)
        ));
    }
}
