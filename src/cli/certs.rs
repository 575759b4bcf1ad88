//! `raftkv certs`: a cluster CA and its certificates, so that a secure cluster is one command.
//!
//! - `init` makes the CA, a certificate for every node of config.json, an `admin` client
//!   certificate and a users file, and adds the `tls` section to config.json.
//! - `node` makes a certificate for a node added later (`raftkv member add`).
//! - `user` adds a user: a client certificate, or a token (`--token`), and its entry in the
//!   users file. The nodes read it again on SIGHUP.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use super::ConfigArg;
use crate::config::{Config, TlsConfig};
use crate::raft::NodeId;
use crate::security::auth::{Role, User, UsersFile, new_token, token_digest, write_private};

#[derive(clap::Args, Debug)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub command: CertsCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum CertsCommand {
    /// Create a CA, a certificate for every node of the config, an admin client certificate
    /// and a users file in --out, and add the tls section to the config file.
    Init {
        #[command(flatten)]
        config: ConfigArg,
        /// The directory for the CA, certificates, keys and users file (created; keys are
        /// written readable by their owner only).
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Days the node and client certificates are valid (the CA: ten years).
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
        /// More host names or IP addresses for every node certificate (besides each node's
        /// host, localhost, 127.0.0.1 and ::1), comma-separated.
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
        /// Replace a CA already in --out, and a tls section already in the config.
        #[arg(long)]
        force: bool,
    },
    /// Create a certificate for node ID (one added later with `raftkv member add`), signed by
    /// the CA of the config's tls section.
    Node {
        /// The node's id.
        id: NodeId,
        /// Its host names or IP addresses (comma-separated); localhost, 127.0.0.1 and ::1 are
        /// always included.
        #[arg(long, value_delimiter = ',', required = true)]
        hosts: Vec<String>,
        #[command(flatten)]
        issue: Issue,
    },
    /// Add (or replace) a user: a client certificate NAME.crt/NAME.key, or with --token a
    /// token in NAME.token, beside the CA; and its entry in the users file. Send the nodes
    /// SIGHUP to take it into use.
    User {
        /// The user's name (a certificate's common name).
        name: String,
        /// read-only (get, status), read-write (also put, delete) or admin (also membership,
        /// leader transfer, snapshot save).
        #[arg(long, value_parser = Role::parse)]
        role: Role,
        /// Restrict the user to keys starting with this prefix (repeatable); default: all keys.
        #[arg(long = "key-prefix", value_name = "PREFIX")]
        key_prefixes: Vec<String>,
        /// Make a token instead of a certificate.
        #[arg(long)]
        token: bool,
        /// Replace a user already in the users file (and its files).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        issue: Issue,
    },
}

/// What `certs node` and `certs user` share: the config whose CA signs, and the validity.
#[derive(clap::Args, Debug)]
pub struct Issue {
    #[command(flatten)]
    config: ConfigArg,
    /// The CA's private key [default: ca.key beside the CA certificate].
    #[arg(long)]
    ca_key: Option<PathBuf>,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..))]
    days: u32,
}

impl Issue {
    /// The config, once the options that do not apply here are refused: `certs` writes files
    /// beside the CA, so the commands' certificate and token options mean nothing to it.
    fn config(&self) -> anyhow::Result<Config> {
        let s = &self.config.security;
        if s.cert_file.is_some() || s.token_file.is_some() {
            bail!(
                "--cert-file, --key-file and --token-file are for the commands that talk to a cluster; certs writes NAME.crt, NAME.key or NAME.token beside the CA"
            );
        }
        Ok(Config::load(&self.config.config)?)
    }
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    match args.command {
        CertsCommand::Init {
            config,
            out,
            days,
            hosts,
            force,
        } => init(&config.config, &out, days, &hosts, force),
        CertsCommand::Node { id, hosts, issue } => {
            let cfg = issue.config()?;
            let (tls, issuer) = load_ca(&cfg, issue.ca_key.as_deref())?;
            let cert = cfg.resolve(Path::new(
                &tls.node_cert_file.replace("{id}", &id.to_string()),
            ));
            let key = cfg.resolve(Path::new(
                &tls.node_key_file.replace("{id}", &id.to_string()),
            ));
            write_node(&issuer, id, &hosts, issue.days, &cert, &key)?;
            outln!("node {id}: {} and {}", cert.display(), key.display());
            Ok(())
        }
        CertsCommand::User {
            name,
            role,
            key_prefixes,
            token,
            force,
            issue,
        } => user(&issue, &name, role, key_prefixes, (token, force)),
    }
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // An hour back, for clocks a little behind this one.
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + Duration::from_secs(u64::from(days) * 86_400);
}

fn named(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "raftkv");
    dn
}

/// A new CA certificate and key (PEM), valid for ten years.
///
/// # Errors
/// Key generation or signing failed.
pub fn new_ca() -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    // A name of its own: another cluster's CA must not look like this one's issuer.
    let tag = crate::security::auth::new_token()
        .map_err(anyhow::Error::msg)?
        .chars()
        .skip(4)
        .take(8)
        .collect::<String>();
    p.distinguished_name = named(&format!("raftkv cluster CA {tag}"));
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut p, 3650);
    let cert = p.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A leaf certificate and key (PEM) for `cn`, signed by `issuer`: for a node (server and client
/// use, valid for `hosts`) or a user (client use only).
///
/// # Errors
/// A host that is not a valid name, or signing failed.
pub fn new_leaf(
    issuer: &Issuer<'_, KeyPair>,
    cn: &str,
    hosts: &[String],
    node: bool,
    days: u32,
) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(hosts.to_vec())
        .map_err(|e| anyhow!("invalid host name in {hosts:?}: {e}"))?;
    p.distinguished_name = named(cn);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = if node {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    validity(&mut p, days);
    let cert = p.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn node_hosts(host: &str, extra: &[String]) -> Vec<String> {
    let mut hosts: Vec<String> = vec![host.to_string()];
    hosts.extend(extra.iter().cloned());
    for h in ["localhost", "127.0.0.1", "::1"] {
        hosts.push(h.to_string());
    }
    let mut seen = std::collections::HashSet::new();
    hosts.retain(|h| !h.is_empty() && seen.insert(h.clone()));
    hosts
}

fn write_public(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn write_node(
    issuer: &Issuer<'_, KeyPair>,
    id: NodeId,
    hosts: &[String],
    days: u32,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<()> {
    let host = hosts.first().map_or("localhost", String::as_str);
    let (c, k) = new_leaf(
        issuer,
        &crate::security::node_common_name(id),
        &node_hosts(host, hosts),
        true,
        days,
    )?;
    write_public(cert, &c)?;
    write_private(key, k.as_bytes()).map_err(anyhow::Error::msg)
}

/// How `dir` is written in the config at `config`: as given when the config is in the current
/// directory, else absolute.
fn config_path(config: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let in_cwd = config
        .parent()
        .is_none_or(|p| p.as_os_str().is_empty() || p == Path::new("."));
    if in_cwd || dir.is_absolute() {
        Ok(dir.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(dir))
    }
}

fn init(config: &Path, out: &Path, days: u32, hosts: &[String], force: bool) -> anyhow::Result<()> {
    let cfg = Config::load(config)?;
    if cfg.tls.is_some() && !force {
        bail!(
            "{} already has a tls section; give --force to replace it (and make a new CA: every node and client then needs the new certificates)",
            config.display()
        );
    }
    let ca_key = out.join("ca.key");
    if ca_key.exists() && !force {
        bail!(
            "{} already exists; give --force to replace this CA, or use `raftkv certs node` / `raftkv certs user` to issue more certificates from it",
            ca_key.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (ca_pem, ca_key_pem) = new_ca()?;
    write_public(&out.join("ca.crt"), &ca_pem)?;
    write_private(&ca_key, ca_key_pem.as_bytes()).map_err(anyhow::Error::msg)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&ca_key_pem)?)?;
    let mut written = vec![format!(
        "{} (the CA; keep ca.key offline if you can)",
        out.join("ca.crt").display()
    )];
    for n in &cfg.nodes {
        let mut all = vec![n.host.clone()];
        all.extend(hosts.iter().cloned());
        let cert = out.join(format!("node-{}.crt", n.id));
        let key = out.join(format!("node-{}.key", n.id));
        write_node(&issuer, n.id, &all, days, &cert, &key)?;
        written.push(format!("{} (node {})", cert.display(), n.id));
    }
    let (c, k) = new_leaf(&issuer, "admin", &[], false, days)?;
    write_public(&out.join("admin.crt"), &c)?;
    write_private(&out.join("admin.key"), k.as_bytes()).map_err(anyhow::Error::msg)?;
    written.push(format!("{} (user admin)", out.join("admin.crt").display()));
    let users = UsersFile {
        users: vec![User {
            name: "admin".into(),
            role: Role::Admin,
            key_prefixes: Vec::new(),
            token_sha256: None,
        }],
    };
    users
        .save(&out.join("users.json"))
        .map_err(anyhow::Error::msg)?;
    written.push(format!(
        "{} (users and roles)",
        out.join("users.json").display()
    ));

    let dir = config_path(config, out)?;
    let p = |f: &str| dir.join(f);
    let tls = TlsConfig {
        ca_file: p("ca.crt"),
        node_cert_file: p("node-{id}.crt").display().to_string(),
        node_key_file: p("node-{id}.key").display().to_string(),
        client_cert_file: Some(p("admin.crt")),
        client_key_file: Some(p("admin.key")),
        client_token_file: None,
        users_file: Some(p("users.json")),
    };
    set_tls_section(config, &tls)?;
    for w in &written {
        outln!("wrote {w}");
    }
    outln!(
        "added a tls section to {}: nodes now serve TLS only, and the commands connect as user admin",
        config.display()
    );
    outln!(
        "add users with: raftkv certs user NAME --role read-only|read-write|admin [--token] --config {}",
        config.display()
    );
    Ok(())
}

/// Adds (or replaces) the `tls` section of the config file, keeping the rest of its text as it
/// is when there was none.
fn set_tls_section(config: &Path, tls: &TlsConfig) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let mut value: serde_json::Value = serde_json::from_str(&text)?;
    let new = if value.get("tls").is_none() {
        // Indented as the file's own keys are.
        let indent: String = text
            .lines()
            .find(|l| l.trim_start().starts_with('"'))
            .map_or("  ".into(), |l| {
                l.chars().take_while(|c| c.is_whitespace()).collect()
            });
        let mut section = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(indent.as_bytes());
        let mut ser = serde_json::Serializer::with_formatter(&mut section, fmt);
        serde::Serialize::serialize(tls, &mut ser)?;
        let section = String::from_utf8(section)?.replace('\n', &format!("\n{indent}"));
        let body = text.trim_end();
        let body = body
            .strip_suffix('}')
            .ok_or_else(|| anyhow!("{} does not end with }}", config.display()))?
            .trim_end();
        format!("{body},\n{indent}\"tls\": {section}\n}}\n")
    } else {
        value["tls"] = serde_json::to_value(tls)?;
        serde_json::to_string_pretty(&value)? + "\n"
    };
    // The result must still be a valid config.
    Config::parse(&new).map_err(|e| anyhow!("the new config would not parse: {e}"))?;
    std::fs::write(config, new).with_context(|| format!("writing {}", config.display()))
}

fn load_ca(
    cfg: &Config,
    ca_key: Option<&Path>,
) -> anyhow::Result<(TlsConfig, Issuer<'static, KeyPair>)> {
    let tls = cfg
        .tls
        .clone()
        .ok_or_else(|| anyhow!("the config has no tls section: run raftkv certs init first"))?;
    let ca = cfg.resolve(&tls.ca_file);
    let key = ca_key.map_or_else(|| ca.with_file_name("ca.key"), Path::to_path_buf);
    let ca_pem =
        std::fs::read_to_string(&ca).with_context(|| format!("reading the CA {}", ca.display()))?;
    let key_pem = std::fs::read_to_string(&key).with_context(|| {
        format!(
            "reading the CA's key {} (give its path with --ca-key)",
            key.display()
        )
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&key_pem)?)
        .map_err(|e| anyhow!("the CA {} cannot sign: {e}", ca.display()))?;
    Ok((tls, issuer))
}

fn user(
    issue: &Issue,
    name: &str,
    role: Role,
    key_prefixes: Vec<String>,
    (token, force): (bool, bool),
) -> anyhow::Result<()> {
    let cfg = issue.config()?;
    // Its files go beside the CA's and the nodes': never one of theirs.
    let reserved = name == "ca"
        || name == "users"
        || name
            .strip_prefix("node-")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if reserved {
        bail!(
            "{name:?} cannot be a user name: its files would replace the CA's, a node's or the users file"
        );
    }
    if name.starts_with("raftkv-node-")
        || name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        || name.starts_with('.')
    {
        bail!(
            "{name:?} cannot be a user name: use letters, digits and - _ . @ (not starting with a dot; raftkv-node-<id> names nodes)"
        );
    }
    if role == Role::Admin && !key_prefixes.is_empty() {
        bail!(
            "an admin cannot be bound to key prefixes: an admin may save a snapshot, which holds every key"
        );
    }
    let tls = cfg
        .tls
        .clone()
        .ok_or_else(|| anyhow!("the config has no tls section: run raftkv certs init first"))?;
    let users_path = cfg.resolve(
        tls.users_file
            .as_ref()
            .ok_or_else(|| anyhow!("the config's tls section has no users_file"))?,
    );
    let mut users = if users_path.exists() {
        UsersFile::load(&users_path).map_err(anyhow::Error::msg)?
    } else {
        UsersFile::default()
    };
    let dir = cfg
        .resolve(&tls.ca_file)
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let before = users.users.iter().find(|u| u.name == name).cloned();
    if let Some(b) = &before
        && !force
    {
        bail!(
            "user {name} is already in {} (role {}{}); give --force to replace it",
            users_path.display(),
            b.role.name(),
            if b.token_sha256.is_some() {
                ", with a token"
            } else {
                ""
            }
        );
    }
    let mut entry = User {
        name: name.to_string(),
        role,
        key_prefixes,
        token_sha256: None,
    };
    if token {
        let t = new_token().map_err(anyhow::Error::msg)?;
        entry.token_sha256 = Some(token_digest(&t));
        let f = dir.join(format!("{name}.token"));
        if dir.join(format!("{name}.crt")).exists() {
            outln!(
                "note: {} still logs in as {name} until it expires (a certificate cannot be revoked; delete it and its key)",
                dir.join(format!("{name}.crt")).display()
            );
        }
        write_private(&f, format!("{t}\n").as_bytes()).map_err(anyhow::Error::msg)?;
        outln!(
            "wrote {} (the token: give it with --token-file or RAFTKV_TOKEN; only its digest is in the users file)",
            f.display()
        );
    } else {
        let (_, issuer) = load_ca(&cfg, issue.ca_key.as_deref())?;
        let (c, k) = new_leaf(&issuer, name, &[], false, issue.days)?;
        let (cf, kf) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        write_public(&cf, &c)?;
        write_private(&kf, k.as_bytes()).map_err(anyhow::Error::msg)?;
        outln!(
            "wrote {} and {} (give them with --cert-file and --key-file)",
            cf.display(),
            kf.display()
        );
    }
    users.users.retain(|u| u.name != name);
    users.users.push(entry);
    users.save(&users_path).map_err(anyhow::Error::msg)?;
    if let Some(b) = before {
        outln!(
            "replaced user {name} (was {}{})",
            b.role.name(),
            if b.token_sha256.is_some() {
                ", with a token"
            } else {
                ""
            }
        );
    }
    outln!(
        "user {name} ({}) is in {}; send the nodes SIGHUP to take it into use (raftkv cluster passes SIGHUP on to its nodes)",
        role.name(),
        users_path.display()
    );
    Ok(())
}
