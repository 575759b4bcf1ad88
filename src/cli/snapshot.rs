//! `raftkv snapshot save | status | restore`: backups of the whole store.
//!
//! A backup file is the leader's state machine at one applied index, in the chunks
//! InstallSnapshot carries: `RAFTKV-SNAPSHOT` and a format byte, then frames of
//! `length: u32 LE | SnapshotChunk (protobuf)`. The first chunk is the header (cluster id,
//! index, term, format), every chunk has a checksum and a sequence number, the last one the
//! totals; a truncated or damaged file fails one of those checks.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use prost::Message as _;

use crate::client::Client;
use crate::config::Config;
use crate::proto;
use crate::raft::SnapshotMeta;
use crate::transport::cluster_id_str;
use crate::transport::snapshot::ChunkVerifier;

use super::ConfigArg;

const MAGIC: &[u8; 16] = b"RAFTKV-SNAPSHOT\x01";
/// A frame larger than this is damage, not data (chunks are 2 MiB).
const FRAME_BYTES_MAX: usize = 64 << 20;

#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Save a consistent snapshot of the whole store, streamed from the leader, to FILE.
    #[command(
        long_about = "Save a consistent snapshot of the whole store to FILE.\n\n\
        The leader streams its state machine at its applied index (every key, and the client \
        sessions that make retried writes apply once) while writes go on. The file is written \
        to FILE.tmp and renamed when complete and verified, so FILE is never a partial backup."
    )]
    Save {
        file: PathBuf,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Verify FILE and print what is in it.
    Status { file: PathBuf },
    /// Seed the empty data directories of a new cluster from FILE.
    #[command(
        long_about = "Seed the data directories of a new cluster from FILE.\n\n\
        Every node of --config gets the snapshot's state in <data_directory>/node-<id>, with a \
        new cluster id, so that members of the old cluster cannot join the new one by accident. \
        The data directories must not exist yet (nothing is overwritten). FILE is verified \
        completely first; if anything fails, nothing is left behind. Then start the cluster \
        (`raftkv cluster --config C`)."
    )]
    Restore {
        file: PathBuf,
        #[command(flatten)]
        config: ConfigArg,
    },
}

pub async fn run(args: SnapshotArgs) -> anyhow::Result<()> {
    match args.command {
        SnapshotCommand::Save { file, config } => save(&file, &config).await,
        SnapshotCommand::Status { file } => status(&file),
        SnapshotCommand::Restore { file, config } => restore(&file, &config.config),
    }
}

async fn save(file: &Path, config: &super::ConfigArg) -> anyhow::Result<()> {
    let cfg = Config::load(&config.config)?;
    let client = Client::discover_with(cfg.addrs(), config.dialer(&cfg)?).await;
    let (leader, mut stream) = client.save_snapshot().await.map_err(|e| anyhow!(e))?;
    let tmp = tmp_path(file);
    let result = async {
        let f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = BufWriter::new(f);
        w.write_all(MAGIC)?;
        let mut v = ChunkVerifier::default();
        while let Some(chunk) = stream.message().await.map_err(|s| {
            anyhow!(
                "the snapshot stream from node {leader} broke: {}",
                s.message()
            )
        })? {
            v.check(&chunk)
                .map_err(|e| anyhow!("node {leader} sent a damaged snapshot: {e}"))?;
            let bytes = chunk.encode_to_vec();
            w.write_all(&(bytes.len() as u32).to_le_bytes())?;
            w.write_all(&bytes)?;
        }
        let Some((records, bytes)) = v.done else {
            bail!("the snapshot stream from node {leader} ended before its last chunk");
        };
        let f = w.into_inner().map_err(|e| anyhow!("writing: {e}"))?;
        f.sync_all()?;
        Ok::<_, anyhow::Error>((v.header, records, bytes))
    }
    .await;
    let (header, records, bytes) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.context(format!("nothing was written to {}", file.display())));
        }
    };
    std::fs::rename(&tmp, file).with_context(|| format!("renaming to {}", file.display()))?;
    let h = header.unwrap_or_default();
    outln!(
        "saved {}: index {} (term {}) of cluster {}, from node {leader}: {records} records, {:.1} MiB",
        file.display(),
        h.index,
        h.snapshot_term,
        cluster_id_str(h.cluster_id),
        bytes as f64 / (1 << 20) as f64
    );
    Ok(())
}

fn tmp_path(file: &Path) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Reads and verifies a whole backup file, calling `each` with the data of every chunk.
fn read_file(
    file: &Path,
    mut each: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<(proto::SnapshotHeader, u64, u64)> {
    let bad = |why: String| anyhow!("{} is not a usable raftkv snapshot: {why}", file.display());
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut r = BufReader::new(f);
    let mut magic = [0u8; 16];
    r.read_exact(&mut magic)
        .map_err(|_| bad("it is too short to be one".into()))?;
    if magic[..15] != MAGIC[..15] {
        return Err(bad("it does not start with RAFTKV-SNAPSHOT".into()));
    }
    if magic[15] != MAGIC[15] {
        return Err(bad(format!(
            "file format {} is not {}",
            magic[15], MAGIC[15]
        )));
    }
    let mut v = ChunkVerifier::default();
    loop {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e).context(format!("reading {}", file.display())),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > FRAME_BYTES_MAX {
            return Err(bad(format!("a frame claims {len} bytes")));
        }
        let mut buf = vec![0u8; len];
        r.read_exact(&mut buf)
            .map_err(|_| bad("it is truncated (a frame is cut off)".into()))?;
        let chunk = proto::SnapshotChunk::decode(buf.as_slice())
            .map_err(|_| bad("a frame cannot be decoded".into()))?;
        v.check(&chunk).map_err(bad)?;
        if !chunk.data.is_empty() {
            each(&chunk.data)?;
        }
    }
    let (Some(h), Some((records, bytes))) = (v.header, v.done) else {
        return Err(bad("it is truncated (no last chunk)".into()));
    };
    Ok((h, records, bytes))
}

fn status(file: &Path) -> anyhow::Result<()> {
    let (mut kv, mut sessions) = (0u64, 0u64);
    let (h, records, bytes) = read_file(file, |data| {
        let (k, s) = crate::storage::snapshot::count_records(data)
            .map_err(|e| anyhow!("{}: {e}", file.display()))?;
        kv += k;
        sessions += s;
        Ok(())
    })?;
    if kv + sessions != records {
        bail!(
            "{} is not a usable raftkv snapshot: {records} records announced, {} present",
            file.display(),
            kv + sessions
        );
    }
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    outln!(
        "snapshot {}: verified (every chunk's checksum, order and the totals)",
        file.display()
    );
    outln!("  cluster:  {}", cluster_id_str(h.cluster_id));
    outln!(
        "  index:    {} (term {}), saved from node {} in term {}",
        h.index,
        h.snapshot_term,
        h.from,
        h.term
    );
    outln!("  format:   {}", h.format);
    outln!("  keys:     {kv}");
    outln!("  sessions: {sessions} records");
    outln!(
        "  size:     {:.1} MiB of records, {:.1} MiB file",
        bytes as f64 / (1 << 20) as f64,
        size as f64 / (1 << 20) as f64
    );
    Ok(())
}

fn restore(file: &Path, config: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(config)?;
    // Everything is checked before anything is written.
    for n in &cfg.nodes {
        let dir = cfg.node_data_dir(n.id);
        if dir.exists() {
            bail!(
                "data directory {} already exists; restore seeds the empty directories of a new cluster, so move it away first. Nothing was written.",
                dir.display()
            );
        }
    }
    let (h, records, _) = read_file(file, |_| Ok(()))?;
    let meta = SnapshotMeta {
        index: h.index,
        term: h.snapshot_term,
    };
    let cluster_id = crate::transport::new_cluster_id("restore");
    let mut done = Vec::new();
    for n in &cfg.nodes {
        let dir = cfg.node_data_dir(n.id);
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<u8>, String>>(2);
        let reader = {
            let file = file.to_path_buf();
            std::thread::spawn(move || {
                let r = read_file(&file, |d| {
                    tx.send(Ok(d.to_vec()))
                        .map_err(|_| anyhow!("the restore stopped"))
                });
                if let Err(e) = &r {
                    let _ = tx.send(Err(format!("{e:#}")));
                }
                r.map(|_| ())
            })
        };
        let r = crate::storage::snapshot::restore(&dir, n.id, meta, cluster_id, rx.into_iter());
        let read = reader.join().map_err(|_| anyhow!("the reader panicked"))?;
        if let Err(e) = r.map_err(anyhow::Error::from).and_then(|got| {
            read?;
            if got != records {
                bail!("{records} records announced, {got} restored");
            }
            Ok(())
        }) {
            let _ = std::fs::remove_dir_all(&dir);
            for d in &done {
                let _ = std::fs::remove_dir_all(d);
            }
            return Err(e.context(format!(
                "restoring node {} into {}; nothing was left behind",
                n.id,
                dir.display()
            )));
        }
        done.push(dir);
    }
    outln!(
        "restored {} (index {}, term {}, {records} records) into {} data directories of a new cluster {}:",
        file.display(),
        h.index,
        h.snapshot_term,
        done.len(),
        cluster_id_str(cluster_id)
    );
    for d in &done {
        outln!("  {}", d.display());
    }
    outln!(
        "start it with: raftkv cluster --config {}",
        config.display()
    );
    Ok(())
}
