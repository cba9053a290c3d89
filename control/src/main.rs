//! The `relay` binary: parse flags, set up logging, run.
//!
//! Invariant: startup failures print one line saying what to change and exit non-zero; no panic
//! backtraces for operator errors.

use clap::{CommandFactory as _, FromArgMatches as _};
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

/// One line to stderr that never panics, even when stderr is closed.
fn say(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn main() {
    let matches = Config::command().get_matches();
    let config = Config::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if config.print_config {
        use std::io::Write as _;
        // A closed stdout (`relay --print-config | head`) ends the listing quietly.
        let _ = std::io::stdout().write_all(relay_control::config::describe(&Config::command(), &matches).as_bytes());
        return;
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log).unwrap_or_else(|e| {
        say(&format!("relay: invalid --log filter {:?}: {e}", config.log));
        std::process::exit(2);
    });
    // A closed stderr (say `relay 2>&1 | head`) must not cost anything: the fmt layer's own
    // error report would `eprintln!`, which panics, and a panic on the signals thread would leave
    // the relay deaf to SIGTERM. Log lines that cannot be written are dropped instead. Colours only
    // on a terminal, so files and journals get plain text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .log_internal_errors(false)
        .init();
    install_panic_hook();
    if let Err(e) = relay_control::run(config) {
        say(&format!("relay: {e:#}"));
        std::process::exit(1);
    }
}
