//! The server under test: a relay the bench starts itself, or an address given by URL.
//!
//! Invariant: a spawned relay is always killed when the bench ends, and only listens on loopback
//! (or, with a [`Netns`], on the namespace's private address).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::netns::Netns;

/// Relays spawned so far by this process (each gets its own data directory).
static SPAWNED: AtomicUsize = AtomicUsize::new(0);

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
        // One directory per spawned relay: a cluster's nodes must not share a records store.
        let n = SPAWNED.fetch_add(1, Ordering::Relaxed);
        let data_dir = std::env::temp_dir().join(format!("relay-bench-{}-{n}", std::process::id()));
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
        pin_to(&mut command, cpu);
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

/// Three relay nodes on loopback behind HAProxy, as `deploy/haproxy.cfg` runs them: the callers
/// talk to HAProxy's address, which routes every leg of a call to one node by the call's key.
pub struct Cluster {
    /// HAProxy: its address is where the callers go; its pid is what the sampler watches.
    pub balancer: Target,
    /// The relay nodes (dropped after HAProxy).
    pub nodes: Vec<Target>,
}

impl Cluster {
    /// Starts `nodes` relays (1 to 3; each `--node-id nodeN`, its own port, data directory and
    /// WebRTC ports, `extra` flags) and `haproxy -f config` with `RELAY_BIND` (a free loopback
    /// port) and `RELAY_NODE1..3` (the nodes' addresses; with fewer than three nodes the last one
    /// fills the remaining slots, so the same configuration serves), the nodes and HAProxy pinned to
    /// `cpu` when given (the load generator keeps its own CPU); waits until HAProxy answers
    /// `/health` through a node.
    ///
    /// # Errors
    /// When a relay or HAProxy does not start, or HAProxy does not serve within 30 s.
    pub fn spawn(
        relay: &str,
        cores: usize,
        nodes: usize,
        extra: &[String],
        haproxy: &str,
        config: &str,
        cpu: Option<usize>,
    ) -> anyhow::Result<Self> {
        let count = nodes.clamp(1, 3);
        let mut started = Vec::with_capacity(count);
        for i in 1..=count {
            let mut args = extra.to_vec();
            args.extend(["--node-id".to_owned(), format!("node{i}")]);
            started.push(Target::spawn(relay, cores, &args, cpu, None)?);
        }
        let bind = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port for HAProxy")?;
            probe.local_addr()?
        };
        let mut command = Command::new(haproxy);
        // -db: stay in the foreground, so the child is HAProxy itself (its pid is what is sampled).
        command.args(["-db", "-f", config]).env("RELAY_BIND", bind.to_string());
        for slot in 1..=3 {
            let node = &started[(slot - 1).min(count - 1)];
            command.env(format!("RELAY_NODE{slot}"), node.addr.to_string());
        }
        // Its alerts go to a file (a pipe nobody drains could stall it), read back should it fail.
        let log = std::env::temp_dir().join(format!("relay-bench-haproxy-{}.log", std::process::id()));
        let log_file = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        command.stdout(Stdio::null()).stderr(log_file);
        pin_to(&mut command, cpu);
        let child = command.spawn().with_context(|| format!("start {haproxy} -f {config}"))?;
        let mut balancer = Self { balancer: Target { addr: bind, child: Some(child) }, nodes: started };
        let serving = balancer.wait_serving();
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        serving.with_context(|| format!("HAProxy said: {}", said.trim()))?;
        Ok(balancer)
    }

    /// Audio frames each node received so far (`relay_frames_in_total` summed over its cores and
    /// leg kinds, from its `/metrics`): whether every node carried calls. `None` for a node that
    /// did not answer.
    pub fn frames_in(&self) -> Vec<Option<u64>> {
        self.nodes
            .iter()
            .map(|node| {
                let resp = crate::client::Conn::connect(node.addr).and_then(|mut c| c.request("GET", "/metrics", None));
                let text = String::from_utf8(resp.ok()?.body).ok()?;
                Some(
                    text.lines()
                        .filter(|l| l.starts_with("relay_frames_in_total"))
                        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                        .sum::<f64>() as u64,
                )
            })
            .collect()
    }

    /// Waits (bounded, 30 s) until `/health` answers 200 through HAProxy: it listens and its
    /// health checks found a node up.
    fn wait_serving(&mut self) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.balancer.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("HAProxy exited at start ({status})");
                }
            }
            let ok = crate::client::Conn::connect(self.balancer.addr)
                .and_then(|mut c| c.request("GET", "/health", None))
                .is_ok_and(|r| r.status == 200);
            if ok {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                bail!("HAProxy at {} did not serve /health within 30 s", self.balancer.addr);
            }
            // HAProxy says nothing when it is ready; its first health checks take ~a second.
            std::thread::sleep(Duration::from_millis(100));
        }
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

/// Makes `command`'s process run only on `cpu`, when one is given (from before it execs).
fn pin_to(command: &mut Command, cpu: Option<usize>) {
    let Some(cpu) = cpu else { return };
    // SAFETY: runs in the forked child before exec; `pin_current_thread` only fills a set on the
    // stack and calls sched_setaffinity, which is async-signal-safe.
    unsafe {
        command.pre_exec(move || crate::sampler::pin_current_thread(cpu));
    }
}
