//! The `raftkv` executable: parses the command line and hands over to the library.

use clap::Parser;
use raftkv::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    // Before anything can build TLS: rustls panics at first use without a chosen provider.
    raftkv::security::install_crypto_provider();
    if !matches!(cli.command, Command::Node(_)) {
        // Client commands log warnings only (RUST_LOG overrides); the node sets up its own.
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .try_init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Node(a) => raftkv::cli::node::run(a).await,
            Command::Cluster(a) => raftkv::cli::cluster::run(a).await,
            Command::Shell(a) => raftkv::cli::shell::run(a).await,
            Command::Monitor(a) => raftkv::cli::monitor::run(a).await,
            Command::Bench(a) => raftkv::cli::bench::run(a).await,
            Command::Snapshot(a) => raftkv::cli::snapshot::run(a).await,
            Command::Leader(a) => raftkv::cli::leader::run(a).await,
            Command::Member(a) => raftkv::cli::member::run(a).await,
            Command::Certs(a) => raftkv::cli::certs::run(a),
        }
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
