//! The `relay` binary: parse flags, set up logging, run.
//!
//! Invariant: startup failures print one line saying what to change and exit non-zero; no panic
//! backtraces for operator errors.

use clap::Parser;
use relay_control::config::Config;

/// Logs a panic as one error line (thread, message, location). A panic in a session is caught and
/// only that session is dropped; the full backtrace is printed only when RUST_BACKTRACE asks for it.
fn install_panic_hook() {
    let backtrace = std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0");
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if backtrace {
            default(info);
            return;
        }
        let thread = std::thread::current();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        let location = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        tracing::error!("bug: thread {} panicked: {message}{location}", thread.name().unwrap_or("?"));
    }));
}

fn main() {
    let config = Config::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log).unwrap_or_else(|e| {
        eprintln!("relay: invalid --log filter {:?}: {e}", config.log);
        std::process::exit(2);
    });
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    install_panic_hook();
    if let Err(e) = relay_control::run(config) {
        eprintln!("relay: {e:#}");
        std::process::exit(1);
    }
}
