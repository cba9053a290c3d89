//! The server under test: a relay the bench starts itself, or an address given by URL.
//!
//! Invariant: a spawned relay is always killed when the bench ends, and only listens on loopback.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};

/// A server to measure.
pub struct Target {
    /// Where it listens.
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl Target {
    /// Starts `binary` on a free loopback port with `cores` cores and waits until it listens.
    ///
    /// # Errors
    /// When it does not start or never reports its address.
    pub fn spawn(binary: &str, cores: usize, extra: &[String]) -> anyhow::Result<Self> {
        let data_dir = std::env::temp_dir().join(format!("relay-bench-{}", std::process::id()));
        let mut child = Command::new(binary)
            .args(["--listen", "127.0.0.1:0", "--cores", &cores.to_string(), "--log", "warn,relay_control=info"])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(extra)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("start {binary}"))?;
        let stderr = child.stderr.take().context("stderr is piped")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or_default().to_owned();
                    let _ = tx.send(addr);
                }
            }
        });
        let Ok(addr) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            bail!("{binary} did not report its listen address");
        };
        Ok(Self { addr: addr.parse().context("listen address")?, child: Some(child) })
    }

    /// A server already running at `url` (`http://host:port`).
    ///
    /// # Errors
    /// When the URL is not `http://` with an IP address and port.
    pub fn url(url: &str) -> anyhow::Result<Self> {
        let rest = url.strip_prefix("http://").context("only http:// URLs")?;
        Ok(Self { addr: rest.trim_end_matches('/').parse().context("http://ip:port")?, child: None })
    }

    /// Process id of a spawned relay.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
