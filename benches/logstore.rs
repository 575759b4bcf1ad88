//! The Raft log's storage, measured: raftkv's fjall log (`storage::disk::DiskLog`) beside a
//! prototype of a segmented log of our own (etcd's `wal`, hashicorp's `raft-wal`: preallocated
//! segments, one checksummed record per batch, torn-tail repair at open, compaction by deleting
//! whole segments). Both append batches of entries with the hard state and fdatasync each one,
//! as a node does.
//!
//! `cargo bench --bench logstore` (`just bench-log`). Prints, per store and batch size: synced
//! batches per second, append+sync latency p50/p99, CPU per entry (process user+system time,
//! background threads included), bytes written to the block device per byte of payload, the
//! disk used after the run, and the disk used after 1M entries more with compaction to the
//! last 20,000 entries every 100,000 (steady state). The prototype is a measuring instrument, not raftkv code: it is not used by the node.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use raftkv::raft::{Entry, EntryKind, HardState, LogIndex};

const VALUE_BYTES: usize = 256;
const KEEP_ENTRIES: u64 = 20_000;
const SEGMENT_BYTES: u64 = 64 << 20;
/// Zeros written to preallocate segments, and the CPU time (ms) that took: left out of the
/// write amplification and the CPU per entry, which then measure the appends themselves
/// (preallocation adds one write of each segment's size, off the write path).
static PREALLOCATED: AtomicU64 = AtomicU64::new(0);
static PREALLOCATION_CPU_MS: AtomicU64 = AtomicU64::new(0);

fn main() {
    let filter = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    // (entries per batch, batches): one client's writes, then a loaded leader's batches.
    let shapes = [(1usize, 3000usize), (64, 4000)];
    // Then, to see the disk that compaction gives back: 1M entries more in batches of 64,
    // compacting to the last 20,000 whenever 100,000 more have been written.
    const STEADY_ENTRIES: u64 = 1_000_000;
    println!(
        "{:<10} {:>6} {:>10} {:>9} {:>9} {:>12} {:>10} {:>10} {:>10}",
        "store",
        "batch",
        "batches/s",
        "p50 ms",
        "p99 ms",
        "CPU us/entry",
        "write amp",
        "disk MiB",
        "steady MiB"
    );
    for (per_batch, batches) in shapes {
        for store in ["fjall", "segmented"] {
            if filter.as_deref().is_some_and(|f| !store.contains(f)) {
                continue;
            }
            let dir = tempfile::tempdir_in(std::env::var("RAFTKV_BENCH_DIR").unwrap_or(".".into()))
                .expect("tempdir");
            let mut log: Box<dyn Log> = match store {
                "fjall" => Box::new(FjallLog::open(dir.path())),
                _ => Box::new(SegLog::open(dir.path())),
            };
            let r = run(log.as_mut(), per_batch, batches, STEADY_ENTRIES);
            println!(
                "{:<10} {:>6} {:>10.0} {:>9.3} {:>9.3} {:>12.1} {:>10.2} {:>10.1} {:>10.1}",
                store,
                per_batch,
                r.batches_per_sec,
                r.p50_ms,
                r.p99_ms,
                r.cpu_us_per_entry,
                r.write_amp,
                r.disk_mib,
                r.steady_mib
            );
        }
    }
}

trait Log {
    fn append(&mut self, entries: &[Entry], hs: HardState);
    fn compact(&mut self, to: LogIndex);
    /// Waits for background work that is not the store's own (the prototype's preallocation).
    fn quiesce(&self) {}
    fn dir(&self) -> &Path;
}

struct Report {
    batches_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_entry: f64,
    write_amp: f64,
    disk_mib: f64,
    steady_mib: f64,
}

fn batch(value: &Bytes, first: LogIndex, n: usize) -> (Vec<Entry>, HardState) {
    let entries: Vec<Entry> = (0..n as u64)
        .map(|i| Entry {
            index: first + i,
            term: 1,
            kind: EntryKind::Normal,
            data: value.clone(),
        })
        .collect();
    let hs = HardState {
        term: 1,
        vote: 1,
        commit: first.saturating_sub(1),
    };
    (entries, hs)
}

fn own_cpu() -> Duration {
    cpu_time().saturating_sub(Duration::from_millis(
        PREALLOCATION_CPU_MS.load(Ordering::SeqCst),
    ))
}

fn own_written() -> u64 {
    written_bytes().saturating_sub(PREALLOCATED.load(Ordering::SeqCst))
}

fn run(log: &mut dyn Log, per_batch: usize, batches: usize, steady: u64) -> Report {
    let value = Bytes::from(vec![b'v'; VALUE_BYTES]);
    let mut lat = Vec::with_capacity(batches);
    log.quiesce();
    let (cpu0, io0) = (own_cpu(), own_written());
    let started = Instant::now();
    let mut next = 1;
    for _ in 0..batches {
        let (entries, hs) = batch(&value, next, per_batch);
        next += per_batch as u64;
        let t = Instant::now();
        log.append(&entries, hs);
        lat.push(t.elapsed());
    }
    let elapsed = started.elapsed();
    let written = next - 1;
    // Background work the writes caused (fjall's flushes) counts: wait for it.
    std::thread::sleep(Duration::from_millis(500));
    log.quiesce();
    let (cpu1, io1) = (own_cpu(), own_written());
    let disk_mib = du(log.dir()) as f64 / (1 << 20) as f64;
    let mut compacted_to = 0;
    while next - 1 < written + steady {
        let (entries, hs) = batch(&value, next, 64);
        next += 64;
        log.append(&entries, hs);
        if next - 1 - compacted_to > KEEP_ENTRIES + 100_000 {
            compacted_to = next - 1 - KEEP_ENTRIES;
            log.compact(compacted_to);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let steady_mib = du(log.dir()) as f64 / (1 << 20) as f64;
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    Report {
        batches_per_sec: batches as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.5).as_secs_f64() * 1e3,
        p99_ms: pct(0.99).as_secs_f64() * 1e3,
        cpu_us_per_entry: (cpu1 - cpu0).as_secs_f64() * 1e6 / written as f64,
        write_amp: (io1 - io0) as f64 / (written as usize * VALUE_BYTES) as f64,
        disk_mib,
        steady_mib,
    }
}

/// Process CPU time (user + system, every thread) from `/proc/self/stat`.
fn cpu_time() -> Duration {
    thread_cpu("/proc/self/stat")
}

/// CPU time (user + system) from a `stat` file of procfs.
fn thread_cpu(path: &str) -> Duration {
    let stat = std::fs::read_to_string(path).expect("stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 10)
}

/// Bytes written to the block device that holds the benchmark's directory (the whole
/// device: the machine should be otherwise idle). `/proc/self/io` would overstate them: with
/// large folios, rewriting 300 bytes of a page-cached file counts 2 MiB there.
fn written_bytes() -> u64 {
    use std::os::unix::fs::MetadataExt;
    let dir = std::env::var("RAFTKV_BENCH_DIR").unwrap_or(".".into());
    let dev = std::fs::metadata(dir).expect("bench dir").dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let stat = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat"))
        .expect("block device stat");
    let sectors: u64 = stat
        .split_whitespace()
        .nth(6)
        .and_then(|v| v.parse().ok())
        .expect("sectors written");
    sectors * 512
}

/// Disk blocks used under `dir`.
fn du(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

struct FjallLog {
    dir: PathBuf,
    r: raftkv::storage::disk::Recovered,
}

impl FjallLog {
    fn open(dir: &Path) -> Self {
        let dir = dir.join("node-1");
        let r = raftkv::storage::open(&dir, 1).expect("open");
        FjallLog { dir, r }
    }
}

impl Log for FjallLog {
    fn append(&mut self, entries: &[Entry], hs: HardState) {
        self.r.log.append(entries, Some(hs), true).expect("append");
    }
    fn compact(&mut self, to: LogIndex) {
        self.r.log.compact(to).expect("compact");
    }
    fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The prototype: segments of `SEGMENT_BYTES`, zero-filled and synced ahead of use by a
/// background thread (so that an append overwrites allocated blocks and fdatasync has no
/// metadata to write); each batch one record `[len u32][xxh3 u64][entries][hard state]`.
struct SegLog {
    dir: PathBuf,
    /// (first index, path) of every segment; the last is being written.
    segments: Vec<(LogIndex, PathBuf)>,
    file: File,
    offset: u64,
    next_segment: mpsc::Receiver<(PathBuf, File)>,
    last: LogIndex,
    buf: Vec<u8>,
    /// Segments taken from the preallocating thread, and its count before it started.
    taken: u64,
    base: u64,
}

impl Drop for SegLog {
    fn drop(&mut self) {
        // Let the thread finish the segment it is writing, so that the next run is not charged.
        self.quiesce();
    }
}

fn preallocate(path: &Path) -> File {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .read(true)
        .open(path)
        .expect("segment");
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(SEGMENT_BYTES >> 20) {
        f.write_all(&zeros).expect("zero-fill");
    }
    f.sync_all().expect("sync segment");
    File::open(path.parent().expect("dir"))
        .and_then(|d| d.sync_all())
        .expect("sync dir");
    f
}

impl SegLog {
    fn open(dir: &Path) -> Self {
        let dir = dir.join("wal");
        std::fs::create_dir_all(&dir).expect("dir");
        let base = PREALLOCATED.load(Ordering::SeqCst);
        let (tx, rx) = mpsc::sync_channel(0);
        let d = dir.clone();
        std::thread::spawn(move || {
            let tid = nix::unistd::gettid();
            let stat = format!("/proc/self/task/{tid}/stat");
            for n in 0u64.. {
                let path = d.join(format!("{n:016}.seg.tmp"));
                let before = thread_cpu(&stat);
                let f = preallocate(&path);
                PREALLOCATION_CPU_MS.fetch_add(
                    (thread_cpu(&stat) - before).as_millis() as u64,
                    Ordering::SeqCst,
                );
                PREALLOCATED.fetch_add(SEGMENT_BYTES, Ordering::SeqCst);
                if tx.send((path.clone(), f)).is_err() {
                    let _ = std::fs::remove_file(&path);
                    return;
                }
            }
        });
        let mut log = SegLog {
            dir,
            segments: Vec::new(),
            file: File::open("/dev/null").expect("placeholder"),
            offset: SEGMENT_BYTES,
            next_segment: rx,
            last: 0,
            buf: Vec::new(),
            taken: 0,
            base,
        };
        log.roll(1);
        log
    }

    fn roll(&mut self, first: LogIndex) {
        let (tmp, file) = self.next_segment.recv().expect("a preallocated segment");
        let path = self.dir.join(format!("{first:016}.seg"));
        std::fs::rename(&tmp, &path).expect("rename");
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .expect("sync dir");
        self.segments.push((first, path));
        self.taken += 1;
        self.file = file;
        self.offset = 0;
    }
}

impl Log for SegLog {
    fn append(&mut self, entries: &[Entry], hs: HardState) {
        let b = &mut self.buf;
        b.clear();
        b.extend_from_slice(&[0; 12]);
        for e in entries {
            b.extend_from_slice(&e.index.to_le_bytes());
            b.extend_from_slice(&e.term.to_le_bytes());
            b.push(e.kind as u8);
            b.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
            b.extend_from_slice(&e.data);
        }
        for v in [hs.term, hs.vote, hs.commit] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let len = (b.len() - 12) as u32;
        let sum = xxhash_rust::xxh3::xxh3_64(&b[12..]);
        b[..4].copy_from_slice(&len.to_le_bytes());
        b[4..12].copy_from_slice(&sum.to_le_bytes());
        if self.offset + b.len() as u64 > SEGMENT_BYTES {
            self.roll(entries.first().map_or(self.last + 1, |e| e.index));
        }
        self.file
            .write_all_at(&self.buf, self.offset)
            .expect("write");
        self.offset += self.buf.len() as u64;
        self.file.sync_data().expect("fdatasync");
        self.last = entries.last().map_or(self.last, |e| e.index);
    }

    fn quiesce(&self) {
        // The thread has prepared the segment after the current one when every segment taken
        // so far, plus that one, is counted.
        let want = self.base + (self.taken + 1) * SEGMENT_BYTES;
        while PREALLOCATED.load(Ordering::SeqCst) < want {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn compact(&mut self, to: LogIndex) {
        // A segment can go once the next one starts at or below `to + 1`.
        while self.segments.len() > 1 && self.segments[1].0 <= to + 1 {
            let (_, path) = self.segments.remove(0);
            std::fs::remove_file(path).expect("remove segment");
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .expect("sync dir");
    }

    fn dir(&self) -> &Path {
        &self.dir
    }
}
