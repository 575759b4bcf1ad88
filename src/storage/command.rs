//! The commands carried in NORMAL log entries, and their durable encoding.
//!
//! Layout (all integers little-endian): `version: u8 = 1 | op: u8 | client_id: u64 | seq: u64 |
//! key_len: u32 | key | value` (value only for puts). The version byte lets a later format be
//! read beside this one.

use bytes::{Buf, BufMut, Bytes, BytesMut};

const VERSION: u8 = 1;
const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;
const OP_SET_CLUSTER_ID: u8 = 3;
const HEADER_BYTES: usize = 1 + 1 + 8 + 8 + 4;

/// Identifies a client request so that a retried write is applied at most once (Raft
/// dissertation 6.3). `client_id == 0` turns deduplication off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestId {
    pub client_id: u64,
    pub seq: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: Bytes,
        value: Bytes,
    },
    Delete {
        key: Bytes,
    },
    /// Names the cluster (its identity, checked on every peer message): proposed by the first
    /// leader of a new cluster; only the first one applied takes effect, so every node agrees.
    /// Encoded with the id as an 8-byte key.
    SetClusterId {
        id: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    pub id: RequestId,
    pub op: Op,
}

#[derive(Debug, thiserror::Error)]
#[error("corrupt command encoding: {0}")]
pub struct DecodeError(&'static str);

impl Command {
    pub fn encode(&self) -> Bytes {
        let id_key;
        let (op, key, value) = match &self.op {
            Op::Put { key, value } => (OP_PUT, key, Some(value)),
            Op::Delete { key } => (OP_DELETE, key, None),
            Op::SetClusterId { id } => {
                id_key = Bytes::copy_from_slice(&id.to_le_bytes());
                (OP_SET_CLUSTER_ID, &id_key, None)
            }
        };
        let mut b =
            BytesMut::with_capacity(HEADER_BYTES + key.len() + value.map_or(0, |v| v.len()));
        b.put_u8(VERSION);
        b.put_u8(op);
        b.put_u64_le(self.id.client_id);
        b.put_u64_le(self.id.seq);
        b.put_u32_le(key.len() as u32);
        b.put_slice(key);
        if let Some(v) = value {
            b.put_slice(v);
        }
        b.freeze()
    }

    pub fn decode(mut data: Bytes) -> Result<Command, DecodeError> {
        if data.len() < HEADER_BYTES {
            return Err(DecodeError("too short"));
        }
        if data.get_u8() != VERSION {
            return Err(DecodeError("unknown version"));
        }
        let op = data.get_u8();
        let id = RequestId {
            client_id: data.get_u64_le(),
            seq: data.get_u64_le(),
        };
        let key_len = data.get_u32_le() as usize;
        if data.len() < key_len {
            return Err(DecodeError("key beyond the end"));
        }
        let key = data.split_to(key_len);
        let op = match op {
            OP_PUT => Op::Put { key, value: data },
            OP_DELETE if data.is_empty() => Op::Delete { key },
            OP_DELETE => return Err(DecodeError("trailing bytes after delete")),
            OP_SET_CLUSTER_ID if data.is_empty() => Op::SetClusterId {
                id: u64::from_le_bytes(
                    key.as_ref()
                        .try_into()
                        .map_err(|_| DecodeError("cluster id of the wrong size"))?,
                ),
            },
            OP_SET_CLUSTER_ID => return Err(DecodeError("trailing bytes after cluster id")),
            _ => return Err(DecodeError("unknown operation")),
        };
        Ok(Command { id, op })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let cmds = [
            Command {
                id: RequestId {
                    client_id: 7,
                    seq: 9,
                },
                op: Op::Put {
                    key: "k".into(),
                    value: "v".into(),
                },
            },
            Command {
                id: RequestId::default(),
                op: Op::Put {
                    key: "".into(),
                    value: "".into(),
                },
            },
            Command {
                id: RequestId {
                    client_id: u64::MAX,
                    seq: 1,
                },
                op: Op::Delete { key: "key".into() },
            },
            Command {
                id: RequestId::default(),
                op: Op::SetClusterId {
                    id: 0x1234_5678_9abc_def0,
                },
            },
        ];
        for c in cmds {
            assert_eq!(Command::decode(c.encode()).expect("decodes"), c);
        }
    }

    #[test]
    fn corrupt_input_is_an_error() {
        let good = Command {
            id: RequestId::default(),
            op: Op::Delete { key: "abc".into() },
        }
        .encode();
        for cut in 0..good.len() {
            assert!(Command::decode(good.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut bad = good.to_vec();
        bad[0] = 9;
        assert!(Command::decode(Bytes::from(bad)).is_err());
    }
}
