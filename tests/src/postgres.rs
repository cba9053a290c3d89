//! A throwaway PostgreSQL cluster for tests: `initdb` in a temp directory, run as the `postgres`
//! user (initdb refuses root), listening on 127.0.0.1 and a free port with trust authentication,
//! with one database made for the test. Stopped and removed on drop.
//!
//! Invariant: every wait is bounded (`pg_ctl -w` with a timeout); a cluster that cannot start
//! fails the test with the reason, never skips it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Database made for the test in every cluster.
pub const DATABASE: &str = "relay_test";

/// Longest `pg_ctl` waits for the server to start or stop.
const PG_CTL_WAIT: Duration = Duration::from_secs(30);

/// A running PostgreSQL cluster in a temp directory; stopped and removed when dropped.
pub struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    running: bool,
}

impl Postgres {
    /// Makes and starts a cluster with a database named [`DATABASE`].
    ///
    /// # Panics
    /// When PostgreSQL is not installed (`scripts/deps-db` installs it), the test does not run as
    /// root, or the cluster cannot be made or started; the message says which, with its output.
    pub fn start() -> Self {
        let bin = bin_dir();
        let dir = crate::temp_dir("postgres");
        run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir), "chown the cluster's directory");
        let port = free_port();
        let mut pg = Self { bin, dir, port, running: false };
        pg.as_postgres("initdb", |c| {
            c.arg("-D").arg(pg.data()).args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"]);
        });
        pg.start_again();
        pg.as_postgres("createdb", |c| {
            c.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", DATABASE]);
        });
        pg
    }

    /// The URL of the test's database: `postgresql://postgres@127.0.0.1:<port>/relay_test`.
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// The URL of the test's database over the server's Unix socket (in its temp dir): reachable
    /// from a network namespace the test made, as the filesystem is shared and loopback is not.
    pub fn socket_url(&self) -> String {
        let dir = self.dir.display().to_string().replace('/', "%2F");
        format!("postgresql://postgres@{dir}:{}/{DATABASE}", self.port)
    }

    /// The same URL with `password` in it (trust authentication ignores it): for checking that
    /// the relay never prints it.
    pub fn url_with_password(&self, password: &str) -> String {
        format!("postgresql://postgres:{password}@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// The port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (fast shutdown: clients are disconnected) and waits until it is down.
    ///
    /// # Panics
    /// When `pg_ctl stop` fails.
    pub fn stop(&mut self) {
        if self.running {
            self.pg_ctl(&["stop", "-m", "fast"]);
            self.running = false;
        }
    }

    /// Starts the server again on the same port and data, and waits until it accepts connections.
    ///
    /// # Panics
    /// When `pg_ctl start` fails; the message carries the server's log.
    pub fn start_again(&mut self) {
        let options = format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", self.port, self.dir.display());
        let log = self.dir.join("server.log");
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D").arg(self.data()).arg("-l").arg(&log).args(["-w", "-t"]).arg(PG_CTL_WAIT.as_secs().to_string());
        cmd.args(["-o", &options, "start"]);
        let out = cmd.output().unwrap_or_else(|e| panic!("cannot run pg_ctl: {e}"));
        if !out.status.success() {
            let server_log = std::fs::read_to_string(&log).unwrap_or_default();
            panic!(
                "PostgreSQL did not start ({}): {}{}\nserver log:\n{server_log}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.running = true;
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn pg_ctl(&self, args: &[&str]) {
        let wait = PG_CTL_WAIT.as_secs().to_string();
        self.as_postgres("pg_ctl", |c| {
            c.arg("-D").arg(self.data()).args(["-w", "-t", &wait]).args(args);
        });
    }

    /// `runuser -u postgres -- <bin>/<program> …`.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(self.bin.join(program)).current_dir(&self.dir);
        cmd
    }

    fn as_postgres(&self, program: &str, args: impl FnOnce(&mut Command)) {
        let mut cmd = self.command(program);
        args(&mut cmd);
        run(&mut cmd, program);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self
                .command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-w", "-t", "10", "-m", "immediate", "stop"])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has `initdb`.
fn bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    let Some((_, bin)) = versions.pop() else {
        panic!("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): run scripts/deps-db");
    };
    // initdb refuses root, and only root may run it as the postgres user.
    // SAFETY: geteuid has no preconditions and only reads the process's credentials.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "the PostgreSQL tests run the server as the postgres user through runuser: run them as root");
    bin
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
