//! The `relay` binary: parse flags, set up logging, run.
//!
//! Invariant: startup failures print one line saying what to change and exit non-zero; no panic
//! backtraces for operator errors.

use clap::Parser;
use relay_control::config::Config;

fn main() {
    let config = Config::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log).unwrap_or_else(|e| {
        eprintln!("relay: invalid --log filter {:?}: {e}", config.log);
        std::process::exit(2);
    });
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    if let Err(e) = relay_control::run(config) {
        eprintln!("relay: {e:#}");
        std::process::exit(1);
    }
}
