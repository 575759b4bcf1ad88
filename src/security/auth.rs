//! Who a client is and what it may do.
//!
//! A client is known by its certificate (the subject's common name is the user name) or by a
//! bearer token (`authorization: Bearer <token>`). The users file (config.json
//! `tls.users_file`) lists each user's role, the key prefixes it may touch, and the SHA-256
//! digest of its token; a token itself is never stored. Tokens are 256-bit random secrets made
//! by `raftkv certs user --token`, so a fast digest is as safe as a password hash would be and
//! costs nothing per request. The file is read at start-up and again on SIGHUP.
//!
//! Every request of `DataService` is checked here, by one function over one enum of every
//! action ([`Action`]): each key of each operation (a pipeline's requests one by one), status,
//! and the admin operations (membership, leader transfer, snapshot save). A node's certificate
//! is not a user: it may ask a node's status and add or promote itself (`raftkv node --join`),
//! nothing else. The peer service accepts node certificates only (see `transport::server`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use tonic::{Request, Status};

use super::listener::{ConnInfo, PeerIdentity};
use crate::raft::NodeId;

/// What a user may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Get and status.
    ReadOnly,
    /// Also put and delete.
    ReadWrite,
    /// Also membership changes, leader transfer and snapshot save.
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::ReadOnly => "read-only",
            Role::ReadWrite => "read-write",
            Role::Admin => "admin",
        }
    }

    /// Parses a role's name.
    ///
    /// # Errors
    /// An unknown name.
    pub fn parse(s: &str) -> Result<Role, String> {
        match s {
            "read-only" => Ok(Role::ReadOnly),
            "read-write" => Ok(Role::ReadWrite),
            "admin" => Ok(Role::Admin),
            _ => Err(format!(
                "unknown role {s:?} (roles: read-only, read-write, admin)"
            )),
        }
    }
}

/// One user of the users file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    pub role: Role,
    /// The keys it may read or write start with one of these (UTF-8); empty: every key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_prefixes: Vec<String>,
    /// The SHA-256 of its token (hex), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
}

impl User {
    fn may_touch(&self, key: &[u8]) -> bool {
        self.key_prefixes.is_empty()
            || self
                .key_prefixes
                .iter()
                .any(|p| key.starts_with(p.as_bytes()))
    }
}

/// The users file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsersFile {
    pub users: Vec<User>,
}

impl UsersFile {
    /// Reads and checks `path`.
    ///
    /// # Errors
    /// The file cannot be read or parsed, or a user is defined twice, has a node's name, or a
    /// malformed digest.
    pub fn load(path: &Path) -> Result<UsersFile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the users file {}: {e}", path.display()))?;
        let f: UsersFile = serde_json::from_str(&text)
            .map_err(|e| format!("the users file {} is invalid: {e}", path.display()))?;
        f.check()
            .map_err(|e| format!("the users file {} is invalid: {e}", path.display()))?;
        Ok(f)
    }

    fn check(&self) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        let mut digests = std::collections::HashSet::new();
        for u in &self.users {
            if let Some(d) = &u.token_sha256
                && !digests.insert(d.to_ascii_lowercase())
            {
                return Err(format!("user {:?} has another user's token", u.name));
            }
            if u.name.is_empty() {
                return Err("a user has an empty name".into());
            }
            if u.name.starts_with("raftkv-node-") {
                return Err(format!(
                    "user {:?} has a node's name: raftkv-node-<id> names nodes only",
                    u.name
                ));
            }
            if u.role == Role::Admin && !u.key_prefixes.is_empty() {
                return Err(format!(
                    "user {:?}: an admin cannot be bound to key prefixes (an admin may save a snapshot, which holds every key)",
                    u.name
                ));
            }
            if !names.insert(u.name.as_str()) {
                return Err(format!("user {:?} is listed twice", u.name));
            }
            if let Some(d) = &u.token_sha256
                && (d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(format!(
                    "user {:?}: token_sha256 must be 64 hex digits",
                    u.name
                ));
            }
        }
        Ok(())
    }

    /// Writes the file (0600: it names who may do what).
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())? + "\n";
        write_private(path, text.as_bytes())
    }
}

/// Writes `bytes` to `path`, readable by its owner only.
///
/// # Errors
/// The file cannot be written.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    f.write_all(bytes)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The hex SHA-256 of `token`.
pub fn token_digest(token: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, token.trim().as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A new random token (256 bits, hex, prefixed so that it is recognisable in a leak scan).
///
/// # Errors
/// The system's random source failed.
pub fn new_token() -> Result<String, String> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| "the system's random source failed".to_string())?;
    Ok(format!(
        "rkv_{}",
        b.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// Who sent a request.
#[derive(Clone, Debug)]
pub enum Principal {
    /// A plaintext node: no authentication (the seed's localhost cluster).
    Open,
    /// Node `id`'s certificate.
    Node(NodeId),
    /// A user.
    User(Arc<User>),
}

/// What a caller presented: its connection's certificate and its authorization header.
#[derive(Clone, Debug)]
pub struct Credentials {
    conn: Option<ConnInfo>,
    authorization: Option<String>,
}

/// Everything a client can ask, for the check.
#[derive(Clone, Copy, Debug)]
pub enum Action<'a> {
    Read(&'a [u8]),
    Write(&'a [u8]),
    /// A node's status (membership, terms, indexes; no keys or values).
    Status,
    /// A membership change of node `id`.
    Membership {
        op: crate::proto::MembershipOp,
        id: NodeId,
    },
    TransferLeader,
    /// A snapshot holds every key and value.
    SaveSnapshot,
}

struct Table {
    by_name: HashMap<String, Arc<User>>,
    by_token: HashMap<String, Arc<User>>,
}

impl Table {
    fn new(f: Option<UsersFile>) -> Option<Table> {
        let f = f?;
        let mut t = Table {
            by_name: HashMap::new(),
            by_token: HashMap::new(),
        };
        for u in f.users {
            let u = Arc::new(u);
            if let Some(d) = &u.token_sha256 {
                t.by_token.insert(d.to_ascii_lowercase(), u.clone());
            }
            t.by_name.insert(u.name.clone(), u);
        }
        Some(t)
    }
}

/// A node's authentication and authorisation of client requests.
pub struct Auth {
    tls: bool,
    file: Option<PathBuf>,
    /// Counts reloads: a long-lived call (the pipeline) resolves its caller again after one.
    generation: std::sync::atomic::AtomicU64,
    /// None with TLS: no users file (every client certificate of the CA is an admin).
    table: RwLock<Arc<Option<Table>>>,
}

impl Auth {
    /// A plaintext node: everyone may do everything.
    pub fn open() -> Auth {
        Auth {
            tls: false,
            file: None,
            generation: Default::default(),
            table: RwLock::new(Arc::new(None)),
        }
    }

    /// A TLS node with `users_file` (or none).
    ///
    /// # Errors
    /// The users file cannot be used.
    pub fn tls(users_file: Option<PathBuf>) -> Result<Auth, String> {
        let table = match &users_file {
            Some(p) => Table::new(Some(UsersFile::load(p)?)),
            None => None,
        };
        Ok(Auth {
            tls: true,
            file: users_file,
            generation: Default::default(),
            table: RwLock::new(Arc::new(table)),
        })
    }

    /// Reads the users file again; returns how many users it has. On failure nothing changes.
    ///
    /// # Errors
    /// The file cannot be used.
    pub fn reload(&self) -> Result<Option<usize>, String> {
        let Some(p) = &self.file else {
            return Ok(None);
        };
        let f = UsersFile::load(p)?;
        let n = f.users.len();
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Table::new(Some(f)));
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        Ok(Some(n))
    }

    /// Changes with every reload of the users file.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// What identifies the caller of `req`: its connection and its authorization header.
    pub fn credentials<T>(req: &Request<T>) -> Credentials {
        Credentials {
            conn: req.extensions().get::<ConnInfo>().cloned(),
            authorization: req
                .metadata()
                .get("authorization")
                .map(|v| v.to_str().map(str::to_string).unwrap_or_default()),
        }
    }

    fn table(&self) -> Arc<Option<Table>> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Who sent `req`.
    ///
    /// # Errors
    /// UNAUTHENTICATED: no credentials, or a token that is not valid. PERMISSION_DENIED: a
    /// certificate's user who is not in the users file.
    pub fn principal<T>(&self, req: &Request<T>) -> Result<Principal, Status> {
        // Read in place: a unary call copies nothing to be known.
        let authorization = req
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap_or_default());
        self.resolve_parts(req.extensions().get::<ConnInfo>(), authorization)
    }

    /// Who presents `creds`, under the users in force now.
    ///
    /// # Errors
    /// As [`Auth::principal`].
    pub fn resolve(&self, creds: &Credentials) -> Result<Principal, Status> {
        self.resolve_parts(creds.conn.as_ref(), creds.authorization.as_deref())
    }

    fn resolve_parts(
        &self,
        conn: Option<&ConnInfo>,
        authorization: Option<&str>,
    ) -> Result<Principal, Status> {
        if !self.tls {
            return Ok(Principal::Open);
        }
        let Some(info) = conn else {
            return Err(Status::unauthenticated(
                "the connection is not TLS: this node requires TLS",
            ));
        };
        let table = self.table();
        if let Some(v) = authorization {
            let token = v
                .split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, t)| t.trim())
                .ok_or_else(|| {
                    Status::unauthenticated("the authorization header is not \"Bearer <token>\"")
                })?;
            let Some(t) = table.as_ref() else {
                return Err(Status::unauthenticated(
                    "this cluster accepts no tokens (its nodes have no users file): present a client certificate",
                ));
            };
            return t
                .by_token
                .get(&token_digest(token))
                .map(|u| Principal::User(u.clone()))
                .ok_or_else(|| Status::unauthenticated("the token is not valid (no user has it)"));
        }
        match &info.peer {
            PeerIdentity::Node(id) => Ok(Principal::Node(*id)),
            PeerIdentity::User(name) => match table.as_ref() {
                None => Ok(Principal::User(Arc::new(User {
                    name: name.clone(),
                    role: Role::Admin,
                    key_prefixes: Vec::new(),
                    token_sha256: None,
                }))),
                Some(t) => t
                    .by_name
                    .get(name)
                    .map(|u| Principal::User(u.clone()))
                    .ok_or_else(|| {
                        Status::permission_denied(format!(
                            "permission denied: user {name} (from the client certificate) is not in the users file"
                        ))
                    }),
            },
            PeerIdentity::None => Err(Status::unauthenticated(
                "this cluster requires authentication: present a client certificate of the cluster CA, or a token (--token-file, RAFTKV_TOKEN)",
            )),
        }
    }

    /// Whoever sent `req`, if allowed `action`.
    ///
    /// # Errors
    /// As [`Auth::principal`] and [`check`].
    pub fn authorize<T>(&self, req: &Request<T>, action: Action<'_>) -> Result<Principal, Status> {
        let p = self.principal(req)?;
        check(&p, action)?;
        Ok(p)
    }
}

fn show(key: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(key))
}

/// Whether `p` may do `action`.
///
/// # Errors
/// PERMISSION_DENIED, saying who may not do what and why.
pub fn check(p: &Principal, action: Action<'_>) -> Result<(), Status> {
    use crate::proto::MembershipOp;
    let deny = |m: String| Err(Status::permission_denied(format!("permission denied: {m}")));
    match p {
        Principal::Open => Ok(()),
        Principal::Node(id) => match action {
            Action::Status => Ok(()),
            Action::Membership {
                op: MembershipOp::AddLearner | MembershipOp::Promote,
                id: target,
            } if target == *id => Ok(()),
            Action::Membership { .. } => deny(format!(
                "node {id}'s certificate may add or promote only node {id} itself (raftkv node --join); other membership changes need an admin"
            )),
            Action::Read(_) | Action::Write(_) => deny(format!(
                "a node certificate (node {id}) may not read or write keys: it identifies a node, not a user"
            )),
            Action::TransferLeader | Action::SaveSnapshot => deny(format!(
                "a node certificate (node {id}) may not do this: it needs an admin user"
            )),
        },
        Principal::User(u) => {
            let role = |need: Role, what: &str| {
                if u.role as u8 >= need as u8 {
                    Ok(())
                } else {
                    deny(format!(
                        "user {} may not {what} (role {}; it needs {})",
                        u.name,
                        u.role.name(),
                        need.name()
                    ))
                }
            };
            let keys = |key: &[u8], verb: &str| {
                if u.may_touch(key) {
                    Ok(())
                } else {
                    deny(format!(
                        "user {} may not {verb} key {}: its keys start with {}",
                        u.name,
                        show(key),
                        u.key_prefixes
                            .iter()
                            .map(|p| format!("{p:?}"))
                            .collect::<Vec<_>>()
                            .join(" or ")
                    ))
                }
            };
            match action {
                Action::Status => Ok(()),
                Action::Read(k) => keys(k, "read"),
                Action::Write(k) => {
                    role(Role::ReadWrite, "write")?;
                    keys(k, "write")
                }
                Action::Membership { .. } => role(Role::Admin, "change the membership"),
                Action::TransferLeader => role(Role::Admin, "transfer the leadership"),
                Action::SaveSnapshot => {
                    role(Role::Admin, "save a snapshot (it holds every key)")?;
                    if u.key_prefixes.is_empty() {
                        Ok(())
                    } else {
                        deny(format!(
                            "user {} may not save a snapshot: it holds every key, and the user's keys are bounded",
                            u.name
                        ))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::MembershipOp;

    fn user(role: Role, prefixes: &[&str]) -> Principal {
        Principal::User(Arc::new(User {
            name: "u".into(),
            role,
            key_prefixes: prefixes.iter().map(|s| s.to_string()).collect(),
            token_sha256: None,
        }))
    }

    #[test]
    fn roles_allow_what_they_name() {
        let ro = user(Role::ReadOnly, &[]);
        assert!(check(&ro, Action::Read(b"k")).is_ok());
        assert!(check(&ro, Action::Status).is_ok());
        let e = check(&ro, Action::Write(b"k")).expect_err("read-only writes");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains("user u may not write"),
            "{}",
            e.message()
        );
        assert!(check(&ro, Action::SaveSnapshot).is_err());
        let rw = user(Role::ReadWrite, &[]);
        assert!(check(&rw, Action::Write(b"k")).is_ok());
        assert!(check(&rw, Action::TransferLeader).is_err());
        assert!(
            check(
                &rw,
                Action::Membership {
                    op: MembershipOp::Remove,
                    id: 2
                }
            )
            .is_err()
        );
        let admin = user(Role::Admin, &[]);
        assert!(check(&admin, Action::SaveSnapshot).is_ok());
        assert!(check(&user(Role::Admin, &["app/"]), Action::SaveSnapshot).is_err());
        assert!(check(&admin, Action::Write(b"k")).is_ok());
    }

    #[test]
    fn key_prefixes_bound_every_key() {
        let app = user(Role::ReadWrite, &["app/"]);
        assert!(check(&app, Action::Write(b"app/x")).is_ok());
        assert!(check(&app, Action::Read(b"app/")).is_ok());
        for k in [&b"ap"[..], b"other", b"", b"App/x", b"\xffapp/"] {
            assert!(check(&app, Action::Read(k)).is_err(), "{k:?}");
            assert!(check(&app, Action::Write(k)).is_err(), "{k:?}");
        }
    }

    #[test]
    fn a_node_may_only_join_itself() {
        let n = Principal::Node(4);
        assert!(check(&n, Action::Status).is_ok());
        for op in [MembershipOp::AddLearner, MembershipOp::Promote] {
            assert!(check(&n, Action::Membership { op, id: 4 }).is_ok());
            assert!(check(&n, Action::Membership { op, id: 5 }).is_err());
        }
        assert!(
            check(
                &n,
                Action::Membership {
                    op: MembershipOp::Remove,
                    id: 4
                }
            )
            .is_err()
        );
        assert!(check(&n, Action::Write(b"k")).is_err());
        assert!(check(&n, Action::Read(b"k")).is_err());
        assert!(check(&n, Action::SaveSnapshot).is_err());
    }

    #[test]
    fn users_file_is_checked() {
        let bad = |json: &str| {
            serde_json::from_str::<UsersFile>(json)
                .map_err(|e| e.to_string())
                .and_then(|f| f.check())
        };
        assert!(bad(r#"{"users":[{"name":"a","role":"admin"}]}"#).is_ok());
        assert!(bad(r#"{"users":[{"name":"a","role":"root"}]}"#).is_err());
        assert!(
            bad(r#"{"users":[{"name":"a","role":"admin"},{"name":"a","role":"read-only"}]}"#)
                .is_err()
        );
        assert!(bad(r#"{"users":[{"name":"raftkv-node-1","role":"admin"}]}"#).is_err());
        assert!(bad(r#"{"users":[{"name":"a","role":"admin","key_prefixes":["x/"]}]}"#).is_err());
        let d = "a".repeat(64);
        assert!(
            bad(&format!(
                r#"{{"users":[{{"name":"a","role":"read-only","token_sha256":"{d}"}},{{"name":"b","role":"admin","token_sha256":"{d}"}}]}}"#
            ))
            .is_err()
        );
        assert!(bad(r#"{"users":[{"name":"a","role":"admin","token_sha256":"xyz"}]}"#).is_err());
    }

    #[test]
    fn tokens_are_random_and_digested() {
        let a = new_token().expect("random");
        let b = new_token().expect("random");
        assert_ne!(a, b);
        assert_eq!(token_digest(&a).len(), 64);
        assert_eq!(token_digest(&a), token_digest(&format!("{a}\n")));
        assert_ne!(token_digest(&a), token_digest(&b));
    }
}
