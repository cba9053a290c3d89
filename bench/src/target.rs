//! The server under test: a relay the bench starts itself, or an address given by URL.
//!
//! Invariant: a spawned relay is always killed when the bench ends, and only listens on loopback
//! (or, with a [`Netns`], on the namespace's private address).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::netns::Netns;

/// A server to measure.
pub struct Target {
    /// Where it listens.
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl Target {
    /// Starts the relay `binary` on a free loopback port (in `net` when given: on its address) with
    /// `cores` cores (pinned to `cpu` when given) and waits until it listens.
    ///
    /// # Errors
    /// When it does not start or never reports its address.
    pub fn spawn(
        binary: &str,
        cores: usize,
        extra: &[String],
        cpu: Option<usize>,
        net: Option<&Netns>,
    ) -> anyhow::Result<Self> {
        let data_dir = std::env::temp_dir().join(format!("relay-bench-{}", std::process::id()));
        let mut args: Vec<String> = [
            "--listen",
            &listen_arg(net),
            "--rtc-port-base",
            "0",
            "--cores",
            &cores.to_string(),
            "--log",
            "warn,relay_control=info",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if net.is_some() {
            // The namespace's address is private to the bench: no key is needed to listen there.
            args.push("--insecure-public".to_owned());
        }
        args.push("--data-dir".to_owned());
        args.push(data_dir.display().to_string());
        args.extend_from_slice(extra);
        Self::spawn_process(binary, &args, cpu, net)
    }

    /// Starts any server `program` with `args` (it must print `listening on http://ADDR` to
    /// stderr), pinned to `cpu` when given, inside `net` when given, and waits until it listens.
    ///
    /// # Errors
    /// When it does not start or never reports its address.
    pub fn spawn_process(
        program: &str,
        args: &[String],
        cpu: Option<usize>,
        net: Option<&Netns>,
    ) -> anyhow::Result<Self> {
        // `ip netns exec` execs the program in place: the child's pid is the server's.
        let (program, args) = match net {
            Some(net) => net.wrap(program, args),
            None => (program.to_owned(), args.to_vec()),
        };
        let program = program.as_str();
        let mut command = Command::new(program);
        command.args(&args).stderr(Stdio::piped()).stdout(Stdio::null());
        if let Some(cpu) = cpu {
            // SAFETY: runs in the forked child before exec and only calls sched_setaffinity, which
            // is async-signal-safe; the set lives on the child's stack.
            unsafe {
                command.pre_exec(move || {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().with_context(|| format!("start {program}"))?;
        let stderr = child.stderr.take().context("stderr is piped")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let found = line
                    .split("listening on http://")
                    .nth(1)
                    .map(|rest| Ok::<_, String>(rest.split_whitespace().next().unwrap_or_default().to_owned()));
                // Other lines are kept for the error, should the address never come.
                let _ = tx.send(found.unwrap_or(Err(line)));
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let mut said = Vec::new();
        let addr = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(Ok(addr)) => break addr,
                Ok(Err(line)) if said.len() < 20 => said.push(line),
                Ok(Err(_)) => {}
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("{program} did not report its listen address; it said: {}", said.join(" | "));
                }
            }
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

/// The `--listen` value for a server: a free port on loopback, or on `net`'s server address.
pub fn listen_arg(net: Option<&Netns>) -> String {
    match net {
        Some(net) => format!("{}:0", net.server_ip),
        None => "127.0.0.1:0".to_owned(),
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
