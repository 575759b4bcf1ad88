//! The durable watermark: a small file beside fjall's journal, `durable.json`, that records a
//! lower bound of what this node has made durable: the last log entry, and the term and vote.
//!
//! fjall treats a damaged or missing piece of its journal as a torn tail and silently recovers
//! the prefix before it. For a Raft node that is data loss it must not trust: entries it
//! acknowledged, or a vote it cast, may be gone, and voting or leading on the shorter state can
//! lose committed writes (Alagappan et al., FAST 2018). The watermark lives outside the journal,
//! so the same damage does not take it along, and at start-up the recovered state must reach it.
//!
//! 1. After every synced log write the watermark may move up; a background thread writes the
//!    newest value at most every [`WRITE_INTERVAL`] (a temporary file, fsynced, renamed over the
//!    old one, directory fsynced), so it costs no fsync on the write path.
//! 2. Before the log legitimately shrinks (a conflicting suffix replaced, a snapshot installed)
//!    the lower value is written synchronously first, so that a crash in between is not
//!    mistaken for damage.
//! 3. At a clean shutdown the exact value is written.
//!
//! What it cannot see: losses of entries made durable within the last [`WRITE_INTERVAL`] before
//! a crash (kill -9, power loss), since the watermark lags by up to that much.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::raft::{LogIndex, NodeId, StorageError, Term};

use super::disk::sync_dir;

pub const FILE: &str = "durable.json";
/// How often the background writer catches up with the newest watermark.
pub const WRITE_INTERVAL: Duration = Duration::from_millis(100);

/// What the node had made durable, at least.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    pub last_index: LogIndex,
    pub last_term: Term,
    pub term: Term,
    pub vote: NodeId,
    /// The cluster the node belongs to (0: not known yet); kept here too, so that a repaired
    /// node keeps its identity even if the database cannot be opened.
    pub cluster_id: u64,
    /// While the node rejoins after a repair: the index it must catch up to (0 otherwise). Kept
    /// here so that a second repair before it has caught up still waits for it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub catch_up: LogIndex,
    /// The term of this node's own entry at `catch_up` (0: unknown).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub catch_up_term: Term,
}

fn is_zero(i: &u64) -> bool {
    *i == 0
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    #[serde(flatten)]
    w: Watermark,
    /// xxh3-64 of the fields above, in hex.
    checksum: String,
}

fn checksum(w: &Watermark) -> String {
    let mut text = format!(
        "{}/{}/{}/{}/{}",
        w.last_index, w.last_term, w.term, w.vote, w.cluster_id
    );
    // Absent when 0, so that files written before the field existed still verify.
    if w.catch_up != 0 {
        text += &format!("/{}", w.catch_up);
    }
    if w.catch_up_term != 0 {
        text += &format!("/{}", w.catch_up_term);
    }
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()))
}

/// Reads the watermark of the data directory `dir`: `None` if there is none (a new directory,
/// or one from before watermarks).
///
/// # Errors
/// `Corrupt` if the file is unreadable or its checksum does not match.
pub fn read(dir: &Path) -> Result<Option<Watermark>, StorageError> {
    let path = dir.join(FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StorageError::io(format!("reading {}", path.display()), e)),
    };
    let bad = |why: &str| StorageError::Corrupt(format!("{} {why}", path.display()));
    let d: OnDisk = serde_json::from_str(&text).map_err(|_| bad("is not a watermark file"))?;
    if checksum(&d.w) != d.checksum {
        return Err(bad("fails its checksum"));
    }
    Ok(Some(d.w))
}

/// Writes the watermark atomically and durably.
///
/// # Errors
/// An I/O error.
pub fn write(dir: &Path, w: Watermark) -> Result<(), StorageError> {
    let path = dir.join(FILE);
    let tmp = dir.join(format!("{FILE}.tmp"));
    let text = serde_json::to_string(&OnDisk {
        w,
        checksum: checksum(&w),
    })
    .map_err(|e| StorageError::io("encoding the watermark", e))?;
    let io = |what: &str, e| StorageError::io(format!("{what} {}", tmp.display()), e);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating", e))?;
        f.write_all(text.as_bytes()).map_err(|e| io("writing", e))?;
        f.sync_all().map_err(|e| io("syncing", e))?;
    }
    std::fs::rename(&tmp, &path).map_err(|e| io("renaming", e))?;
    sync_dir(dir)
}

struct Shared {
    /// The newest value, and whether it is not written yet.
    state: Mutex<(Watermark, bool, bool)>,
    wake: Condvar,
}

/// Keeps `durable.json` of one data directory up to date from a background thread.
pub struct WatermarkWriter {
    dir: PathBuf,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WatermarkWriter {
    /// Starts the writer at `initial` (already on disk, or written now if `write_now`).
    ///
    /// # Errors
    /// An I/O error writing the initial value.
    pub fn start(dir: &Path, initial: Watermark, write_now: bool) -> Result<Self, StorageError> {
        if write_now {
            write(dir, initial)?;
        }
        let shared = Arc::new(Shared {
            state: Mutex::new((initial, false, false)),
            wake: Condvar::new(),
        });
        let thread = {
            let shared = shared.clone();
            let dir = dir.to_path_buf();
            std::thread::Builder::new()
                .name("raftkv-watermark".into())
                .spawn(move || writer_loop(&dir, &shared))
                .map_err(|e| StorageError::io("starting the watermark writer", e))?
        };
        Ok(WatermarkWriter {
            dir: dir.to_path_buf(),
            shared,
            thread: Some(thread),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Watermark, bool, bool)> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest value set.
    pub fn current(&self) -> Watermark {
        self.lock().0
    }

    /// Raises the watermark to `w` (durable already); written within `WRITE_INTERVAL`.
    pub fn set(&self, w: Watermark) {
        let mut s = self.lock();
        if s.0 != w {
            s.0 = w;
            s.1 = true;
        }
    }

    /// Writes `w` now (before the durable state shrinks to it).
    ///
    /// # Errors
    /// An I/O error.
    pub fn write_now(&self, w: Watermark) -> Result<(), StorageError> {
        let mut s = self.lock();
        write(&self.dir, w)?;
        s.0 = w;
        s.1 = false;
        Ok(())
    }
}

impl Drop for WatermarkWriter {
    fn drop(&mut self) {
        {
            let mut s = self.lock();
            s.2 = true;
        }
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn writer_loop(dir: &Path, shared: &Shared) {
    loop {
        let mut s = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if !s.2 {
            s = shared
                .wake
                .wait_timeout(s, WRITE_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let (w, dirty, stop) = *s;
        if dirty {
            // Held while writing, so that `write_now` cannot be overtaken by an older value.
            match write(dir, w) {
                Ok(()) => s.1 = false,
                Err(e) => tracing::error!("cannot write the durable watermark: {e}"),
            }
        }
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_a_damaged_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read(dir.path()).expect("read"), None);
        let w = Watermark {
            last_index: 49214,
            last_term: 3,
            term: 4,
            vote: 2,
            cluster_id: 77,
            catch_up: 0,
            catch_up_term: 0,
        };
        write(dir.path(), w).expect("write");
        assert_eq!(read(dir.path()).expect("read"), Some(w));
        let rejoining = Watermark {
            catch_up: 60000,
            catch_up_term: 3,
            ..w
        };
        write(dir.path(), rejoining).expect("write");
        assert_eq!(read(dir.path()).expect("read"), Some(rejoining));
        write(dir.path(), w).expect("write");
        let path = dir.path().join(FILE);
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, text.replace("49214", "49215")).expect("write");
        let e = read(dir.path()).expect_err("damaged");
        assert!(e.to_string().contains("fails its checksum"), "{e}");
    }

    #[test]
    fn the_writer_catches_up_and_writes_the_last_value_on_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = |i| Watermark {
            last_index: i,
            ..Watermark::default()
        };
        let writer = WatermarkWriter::start(dir.path(), w(1), true).expect("start");
        writer.set(w(5));
        std::thread::sleep(WRITE_INTERVAL * 3);
        assert_eq!(read(dir.path()).expect("read"), Some(w(5)));
        writer.set(w(9));
        drop(writer);
        assert_eq!(read(dir.path()).expect("read"), Some(w(9)));
    }
}
