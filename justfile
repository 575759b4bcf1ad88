# raftkv tasks. `just --list` shows them. Every recipe is a plain cargo command underneath.

# Run the whole test suite (unit, simulator, real processes).
test:
    cargo test --release

# Start the 5-node cluster of config.json (Ctrl-C stops it).
cluster *ARGS:
    cargo run --release -- cluster --config config.json {{ARGS}}

# Open the interactive client.
shell:
    cargo run --release -- shell --config config.json

# Run the simulator over many seeds (default 100,000) and report coverage.
sim-soak SEEDS="100000":
    RAFTKV_SIM_SEEDS={{SEEDS}} cargo test --release --test sim -- --nocapture

# Replay one simulator seed.
sim-seed SEED:
    RAFTKV_SIM_SEED={{SEED}} cargo test --release --test sim -- --nocapture

# Formatting and lints, as CI runs them.
lint:
    cargo fmt --check
    cargo clippy --release --all-targets -- -D warnings

# Jepsen-style fault test with a linearizability check (SECS of faults; root for partitions).
nemesis SECS="600":
    RAFTKV_NEMESIS_SECS={{SECS}} cargo test --release --test nemesis -- --nocapture

# The benchmark table (fresh clusters of real processes), e.g. `just bench`, or RUNS=2.
bench RUNS="1":
    RAFTKV_BENCH_RUNS={{RUNS}} cargo bench --bench table

# The same table with etcd beside it, run for run (needs etcd: `apt install etcd-server`).
bench-etcd RUNS="2":
    RAFTKV_BENCH_ETCD=1 RAFTKV_BENCH_RUNS={{RUNS}} cargo bench --bench table

# The same table with metrics recorded (every node serving /metrics) beside it, run for run.
bench-metrics RUNS="2":
    RAFTKV_BENCH_METRICS=1 RAFTKV_BENCH_RUNS={{RUNS}} cargo bench --bench table

# The same table with TLS on (raftkv certs init: mutual TLS between nodes, clients with certificates) beside it.
bench-tls RUNS="2":
    RAFTKV_BENCH_TLS=1 RAFTKV_BENCH_RUNS={{RUNS}} cargo bench --bench table

# The Raft log's storage: fjall beside a segmented-log prototype (fsync, CPU, write amplification, disk).
bench-log:
    RAFTKV_BENCH_DIR=/tmp cargo bench --bench logstore

# A follower killed for 60 s under 64 writing clients, then restarted: catch-up time, RSS, terms (etcd beside it if installed).
bench-catchup:
    RAFTKV_BENCH_ETCD=${RAFTKV_BENCH_ETCD:-1} cargo bench --bench recovery

# A whole-cluster SIGKILL and restart after WRITES writes: time to the first write and to every node applied.
bench-restart WRITES="1000000":
    RAFTKV_RECOVERY=restart RAFTKV_RESTART_WRITES={{WRITES}} cargo bench --bench recovery

# Membership: time to add and promote a member with MIB MiB of state; write unavailability during a leadership transfer beside a kill -9 of the leader.
bench-membership MIB="1024":
    RAFTKV_MEMBER_MIB={{MIB}} cargo bench --bench membership

# Memory over a long write run: RSS of every node and the data size, sampled ten times.
bench-soak SECS="600":
    RAFTKV_BENCH_SOAK={{SECS}} cargo bench --bench table

# Mutation testing of the Raft core (needs `cargo install cargo-mutants`; about an hour on 2 cores).
mutants:
    RAFTKV_SIM_SEEDS=40 cargo mutants -f 'src/raft/*.rs' -e src/raft/harness.rs -e src/raft/tests.rs --timeout 20 -- --lib --test sim
