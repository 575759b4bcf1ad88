//! Deterministic simulation of raftkv's Raft core.
//!
//! Runs 3-, 5- and 7-node clusters of the real core (one schedule in four with a learner too) over a simulated network that drops,
//! delays, duplicates and reorders messages and makes symmetric and one-way partitions, with
//! crashes that lose everything not yet durable (including in the middle of a `Ready`, and
//! between a snapshot's install and the rest of its `Ready`), and, in one schedule in four,
//! damaged disks: a lost tail of synced entries, a corrupted entry or a rolled-back hard state,
//! which the node must detect at start-up (checksums and the watermark, as `storage::disk`
//! does) and then repair and rejoin as `raftkv node --repair` does; in half of them the leader
//! is asked now and then to hand leadership over (TimeoutNow); in half of them the leader is
//! asked for membership changes (new nodes with new ids added as learners, promoted, members
//! removed, the leader included, between 3 and 5 voters; a removed node stops once it applies
//! its removal), and every configuration entry applied must differ from the one before by one
//! voter at most. Every
//! parameter of a schedule comes from one seed. After every event the checker verifies election
//! safety, log matching, leader completeness, state machine safety, that no committed entry is
//! ever lost and that ReadIndex reads are not stale. When the faults stop, the cluster must elect
//! a leader, resolve pending proposals and converge within a bounded time (liveness).
//!
//! - `cargo test --release --test sim`: 600 seeds.
//! - `RAFTKV_SIM_SEED=<seed> cargo test --release --test sim -- --nocapture`: replays one seed.
//! - `RAFTKV_SIM_SEEDS=100000`: a soak (see `just sim-soak`).

mod checker;
mod cluster;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cluster::{Sim, Stats};

fn run_seed(seed: u64) -> Result<Stats, String> {
    let result = std::panic::catch_unwind(|| {
        let mut sim = Sim::new(seed);
        sim.run();
        sim.stats
    });
    result.map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".to_string())
    })
}

#[test]
fn simulated_clusters_keep_raft_safety_and_liveness() {
    if let Ok(seed) = std::env::var("RAFTKV_SIM_SEED") {
        let seed: u64 = seed.parse().expect("RAFTKV_SIM_SEED must be a number");
        match run_seed(seed) {
            Ok(stats) => println!("seed={seed} ok: {stats}"),
            Err(e) => panic!(
                "seed={seed} failed: {e}\nreplay: RAFTKV_SIM_SEED={seed} cargo test --release --test sim -- --nocapture"
            ),
        }
        return;
    }
    let seeds: u64 = std::env::var("RAFTKV_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let base: u64 = std::env::var("RAFTKV_SIM_BASE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    let next = Arc::new(AtomicU64::new(0));
    let total = Arc::new(Mutex::new(Stats::default()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let started = std::time::Instant::now();
    // Silence the default panic printer; failures are reported with their seed below.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (next, total, failures) = (next.clone(), total.clone(), failures.clone());
            s.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= seeds {
                        break;
                    }
                    let seed = base + i;
                    match run_seed(seed) {
                        Ok(st) => total.lock().expect("lock").add(&st),
                        Err(e) => failures.lock().expect("lock").push((seed, e)),
                    }
                }
            });
        }
    });
    std::panic::set_hook(hook);
    let elapsed = started.elapsed().as_secs_f64();
    let total = total.lock().expect("lock");
    println!(
        "simulated {seeds} schedules in {elapsed:.1}s ({:.0} events/s): {total}",
        total.steps as f64 / elapsed
    );
    let failures = failures.lock().expect("lock");
    if !failures.is_empty() {
        let mut msg = format!("{} of {seeds} seeds failed:\n", failures.len());
        for (seed, e) in failures.iter().take(10) {
            msg += &format!(
                "  seed={seed}: {e}\n  replay: RAFTKV_SIM_SEED={seed} cargo test --release --test sim -- --nocapture\n"
            );
        }
        panic!("{msg}");
    }
}
