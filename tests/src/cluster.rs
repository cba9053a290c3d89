//! A Relay cluster for tests: three `relay` nodes, each in a network namespace of its own joined
//! to the root namespace by a veth pair with addresses of the test's own, and HAProxy in the root
//! namespace on 127.0.0.1 running `deploy/haproxy.cfg` unchanged. Callers and agents run in the
//! root namespace; a node reaches them at its pair's root-side address ([`Cluster::root_ip`]).
//!
//! Invariant: everything made is undone when the [`Cluster`] drops, also when a test panics
//! (processes killed, namespaces and with them the veth pairs deleted); every wait is bounded.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::{pump, relay_bin, temp_dir, Conn, POLL_INTERVAL, TIMEOUT};

/// Nodes in a cluster: as many as `deploy/haproxy.cfg` names.
pub const NODES: usize = 3;

/// The port every node listens on, inside its own namespace.
pub const NODE_PORT: u16 = 8080;

/// Namespaces of this harness are named `<prefix><pid><run><node>` (run and node one digit each).
const NETNS_PREFIX: &str = "rcl";

/// The backend of `deploy/haproxy.cfg` whose servers are the nodes.
const BACKEND: &str = "relay_nodes";

/// How a cluster is started.
pub struct Options {
    /// Extra flags for node `n` (from 0), given the root-side address the node reaches the
    /// test's agents and peers at; called again on every restart.
    pub node_args: Box<dyn Fn(usize, IpAddr) -> Vec<String> + Send + Sync>,
    /// The path HAProxy's check asks for instead of the `/health/ready` the config names
    /// (`None`: the config as written).
    pub check_path: Option<String>,
    /// `--cores` of each node.
    pub cores: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self { node_args: Box::new(|_, _| Vec::new()), check_path: None, cores: 1 }
    }
}

/// Three relay nodes in network namespaces behind HAProxy; torn down on drop.
pub struct Cluster {
    nodes: Vec<Node>,
    haproxy: Option<Child>,
    haproxy_logs: Arc<Mutex<Vec<String>>>,
    addr: SocketAddr,
    dir: PathBuf,
    options: Options,
}

/// One node: its namespace, its addresses and its process (while it runs).
struct Node {
    netns: String,
    root_ip: Ipv4Addr,
    node_ip: Ipv4Addr,
    child: Option<Child>,
    logs: Arc<Mutex<Vec<String>>>,
    data_dir: PathBuf,
}

impl Cluster {
    /// Makes the namespaces, starts the nodes (each healthy on `/health`) and HAProxy, and waits
    /// until HAProxy sees every node up. Needs root, iproute2 and haproxy (`scripts/deps-cluster`).
    ///
    /// # Panics
    /// When a step fails or does not finish within [`TIMEOUT`]; what was made is removed.
    pub fn start(options: Options) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        remove_stale_namespaces();
        let pid = std::process::id();
        let run = NEXT.fetch_add(1, Ordering::Relaxed) % 4;
        let dir = temp_dir("cluster");
        let mut cluster = Self {
            nodes: Vec::new(),
            haproxy: None,
            haproxy_logs: Arc::new(Mutex::new(Vec::new())),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
            options,
        };
        for n in 0..NODES {
            // A /30 of 10.213.0.0/16 per node, from the pid and the run: tests running at once
            // (in this process or others) use different names and addresses.
            let subnet = (pid % 1000) * 12 + run * 3 + n as u32;
            let base = subnet * 4;
            let (hi, lo) = (u8::try_from(base / 256).expect("below 256"), u8::try_from(base % 256).expect("byte"));
            let netns = format!("{NETNS_PREFIX}{pid}{run}{n}");
            let node = Node {
                root_ip: Ipv4Addr::new(10, 213, hi, lo + 1),
                node_ip: Ipv4Addr::new(10, 213, hi, lo + 2),
                child: None,
                logs: Arc::new(Mutex::new(Vec::new())),
                data_dir: cluster.dir.join(format!("node{}", n + 1)),
                netns,
            };
            // A namespace left over by a killed run of the same name goes first.
            let _ = Command::new("ip").args(["netns", "del", &node.netns]).stderr(Stdio::null()).status();
            let ns = node.netns.clone();
            let (host_end, ns_end) = (format!("{ns}h"), format!("{ns}n"));
            let (root, inner) = (node.root_ip, node.node_ip);
            cluster.nodes.push(node);
            ip(&["netns", "add", &ns]);
            ip(&["link", "add", &host_end, "type", "veth", "peer", "name", &ns_end, "netns", &ns]);
            ip(&["addr", "add", &format!("{root}/30"), "dev", &host_end]);
            ip(&["link", "set", &host_end, "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("{inner}/30"), "dev", &ns_end]);
            ip(&["-n", &ns, "link", "set", &ns_end, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        for n in 0..NODES {
            cluster.spawn_node(n);
        }
        for n in 0..NODES {
            cluster.wait_node_healthy(n);
        }
        cluster.start_haproxy();
        for n in 0..NODES {
            cluster.wait_status(n, "UP");
        }
        cluster
    }

    /// HAProxy's address: where clients reach the cluster.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Node `n`'s HTTP address (inside its namespace, reachable from the root one).
    pub fn node_addr(&self, n: usize) -> SocketAddr {
        SocketAddr::new(self.nodes[n].node_ip.into(), NODE_PORT)
    }

    /// The address node `n` reaches the root namespace at (its veth pair's root side): agents and
    /// WebRTC peers serving a call on node `n` listen there.
    pub fn root_ip(&self, n: usize) -> IpAddr {
        self.nodes[n].root_ip.into()
    }

    /// Node `n`'s name, as `--node-id` gives it and `X-Relay-Node` shows it: `node1`…`node3`.
    pub fn node_name(n: usize) -> String {
        format!("node{}", n + 1)
    }

    /// The node index an `X-Relay-Node` value names.
    pub fn node_index(name: &str) -> Option<usize> {
        (0..NODES).find(|n| Self::node_name(*n) == name)
    }

    /// Every line node `n` wrote to stdout and stderr, across restarts.
    pub fn logs(&self, n: usize) -> Vec<String> {
        self.nodes[n].logs.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Sends `signal` to node `n`'s process.
    ///
    /// # Panics
    /// When the node is not running.
    pub fn signal(&self, n: usize, signal: libc::c_int) {
        let child = self.nodes[n].child.as_ref().expect("the node runs");
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: kill has no memory effects; the pid is our own child, not yet reaped (it is
        // reaped only in kill9/drop, which take the Child out first), so it names no other process.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) failed: {}", std::io::Error::last_os_error());
    }

    /// `kill -9` node `n` and reaps it: its sockets close as a crashed host's would (reset by its
    /// kernel), nothing of it says goodbye.
    ///
    /// # Panics
    /// When the node is not running.
    pub fn kill9(&mut self, n: usize) {
        let mut child = self.nodes[n].child.take().expect("the node runs");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Waits up to `limit` for node `n` to exit on its own (e.g. after SIGTERM) and reaps it.
    ///
    /// # Panics
    /// When it is not running, or still runs after `limit` (it is then killed).
    pub fn wait_exit(&mut self, n: usize, limit: Duration) -> ExitStatus {
        let mut child = self.nodes[n].child.take().expect("the node runs");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait on a node") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("node{} still ran {limit:?} later:\n{}", n + 1, self.logs(n).join("\n"));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Starts node `n` again, with the same address, flags and data directory, and waits until
    /// it answers `/health` (HAProxy's check may take a little longer: [`Self::wait_status`]).
    ///
    /// # Panics
    /// When it is still running, or is not healthy within [`TIMEOUT`].
    pub fn restart(&mut self, n: usize) {
        assert!(self.nodes[n].child.is_none(), "node {n} still runs");
        self.spawn_node(n);
        self.wait_node_healthy(n);
    }

    /// HAProxy's view of node `n`: `UP`, `DOWN`, `NOLB` (its check says 404: draining),
    /// `MAINT`, or a transition such as `DOWN 1/2`.
    ///
    /// # Panics
    /// When HAProxy's stats socket does not answer or does not list the node.
    pub fn status(&self, n: usize) -> String {
        let csv = self.haproxy_command("show stat");
        let name = Self::node_name(n);
        server_status(&csv, &name).unwrap_or_else(|| panic!("HAProxy's stats list no server {name}:\n{csv}"))
    }

    /// Waits until HAProxy's view of node `n` is exactly `want` (see [`Self::status`]).
    ///
    /// # Panics
    /// When it is not within [`TIMEOUT`].
    pub fn wait_status(&self, n: usize, want: &str) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let now = self.status(n);
            if now == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "HAProxy sees node{} as {now:?}, not {want:?}, after {TIMEOUT:?}; HAProxy said:\n{}",
                n + 1,
                self.haproxy_logs.lock().unwrap_or_else(PoisonError::into_inner).join("\n")
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// One command on HAProxy's admin socket, its answer.
    ///
    /// # Panics
    /// When the socket does not answer.
    pub fn haproxy_command(&self, command: &str) -> String {
        let mut socket = UnixStream::connect(self.stats_socket()).expect("connect to HAProxy's stats socket");
        socket.set_read_timeout(Some(TIMEOUT)).expect("set read timeout");
        socket.write_all(format!("{command}\n").as_bytes()).expect("write to HAProxy's stats socket");
        let mut answer = String::new();
        socket.read_to_string(&mut answer).expect("read HAProxy's answer");
        answer
    }

    /// `haproxy`: Debian's /usr/sbin/haproxy (often not on a user's PATH), else from PATH.
    pub fn haproxy_bin() -> PathBuf {
        let debian = Path::new("/usr/sbin/haproxy");
        if debian.exists() {
            debian.to_path_buf()
        } else {
            PathBuf::from("haproxy")
        }
    }

    fn stats_socket(&self) -> PathBuf {
        self.dir.join("haproxy.sock")
    }

    fn spawn_node(&mut self, n: usize) {
        let node_ip: IpAddr = self.nodes[n].node_ip.into();
        let extra = (self.options.node_args)(n, self.nodes[n].root_ip.into());
        let node = &mut self.nodes[n];
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.netns]).arg(relay_bin());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("RELAY_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("RELAY_LOG", "info").env("NO_COLOR", "1");
        cmd.arg("--listen").arg(SocketAddr::new(node_ip, NODE_PORT).to_string());
        cmd.args(["--cores", &self.options.cores.to_string(), "--rtc-port-base", "0", "--insecure-public"]);
        cmd.args(["--node-id", &Self::node_name(n), "--public-ip", &node_ip.to_string()]);
        cmd.arg("--data-dir").arg(&node.data_dir);
        cmd.args(extra);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // `ip netns exec` execs the relay in the namespace: the child's pid is the relay's.
        let mut child = cmd.spawn().expect("spawn ip netns exec relay");
        pump(child.stdout.take().expect("piped stdout"), node.logs.clone(), None);
        pump(child.stderr.take().expect("piped stderr"), node.logs.clone(), None);
        node.child = Some(child);
    }

    fn wait_node_healthy(&mut self, n: usize) {
        let addr = self.node_addr(n);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let node = &mut self.nodes[n];
            if let Some(status) = node.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                node.child = None;
                panic!("node{} exited with {status} before it was healthy:\n{}", n + 1, self.logs(n).join("\n"));
            }
            let healthy = Conn::try_open(addr)
                .and_then(|mut c| {
                    c.send("GET", "/health", &[("Connection", "close")], None);
                    c.try_read_response()
                })
                .is_ok_and(|r| r.status == 200);
            if healthy {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node{} not healthy within {TIMEOUT:?}:\n{}",
                n + 1,
                self.logs(n).join("\n")
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn start_haproxy(&mut self) {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/haproxy.cfg");
        let config = match &self.options.check_path {
            None => shipped,
            Some(path) => {
                let text = std::fs::read_to_string(&shipped).expect("read deploy/haproxy.cfg");
                let from = "uri /health/ready ";
                assert!(text.contains(from), "deploy/haproxy.cfg checks {from:?}");
                let patched = self.dir.join("haproxy.cfg");
                std::fs::write(&patched, text.replace(from, &format!("uri {path} "))).expect("write the config copy");
                patched
            }
        };
        // A second file adds the admin socket the harness reads HAProxy's view of the nodes from.
        let stats = self.dir.join("stats.cfg");
        std::fs::write(&stats, format!("global\n    stats socket {} level admin\n", self.stats_socket().display()))
            .expect("write the stats config");
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        self.addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut cmd = Command::new(Self::haproxy_bin());
        cmd.arg("-db").arg("-f").arg(&config).arg("-f").arg(&stats);
        cmd.env("RELAY_BIND", self.addr.to_string());
        for n in 0..NODES {
            cmd.env(format!("RELAY_NODE{}", n + 1), self.node_addr(n).to_string());
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn haproxy (scripts/deps-cluster installs it)");
        pump(child.stdout.take().expect("piped stdout"), self.haproxy_logs.clone(), None);
        pump(child.stderr.take().expect("piped stderr"), self.haproxy_logs.clone(), None);
        self.haproxy = Some(child);
        let deadline = Instant::now() + TIMEOUT;
        while UnixStream::connect(self.stats_socket()).is_err() || Conn::try_open(self.addr).is_err() {
            if let Some(status) = self.haproxy.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "haproxy exited with {status}:\n{}",
                    self.haproxy_logs.lock().unwrap_or_else(PoisonError::into_inner).join("\n")
                );
            }
            assert!(Instant::now() < deadline, "haproxy did not listen within {TIMEOUT:?}");
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut child) = self.haproxy.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            for (n, node) in self.nodes.iter().enumerate() {
                let logs = node.logs.lock().unwrap_or_else(PoisonError::into_inner);
                let tail = &logs[logs.len().saturating_sub(30)..];
                eprintln!("---- node{} output (last {} lines) ----\n{}", n + 1, tail.len(), tail.join("\n"));
            }
            let logs = self.haproxy_logs.lock().unwrap_or_else(PoisonError::into_inner);
            eprintln!("---- haproxy output ----\n{}", logs.join("\n"));
        }
        for node in &self.nodes {
            let _ = Command::new("ip").args(["netns", "del", &node.netns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Deletes this harness's namespaces whose test process is gone (it was killed before it could
/// clean up), so killed runs do not pile up namespaces and addresses.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if let Some(pid) = owner_pid(name) {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
}

/// The test process that made namespace `name`, if this harness named it.
fn owner_pid(name: &str) -> Option<u32> {
    let digits = name.strip_prefix(NETNS_PREFIX)?;
    if digits.len() < 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits[..digits.len() - 2].parse().ok()
}

/// The `status` column of server `name` of the nodes' backend in HAProxy's `show stat` CSV.
fn server_status(csv: &str, name: &str) -> Option<String> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next()?.strip_prefix("# ")?.split(',').collect();
    let column = |wanted: &str| header.iter().position(|h| *h == wanted);
    let (px, sv, status) = (column("pxname")?, column("svname")?, column("status")?);
    lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|f| f.get(px) == Some(&BACKEND) && f.get(sv) == Some(&name))
        .and_then(|f| f.get(status).map(|s| (*s).to_owned()))
}

/// Runs `ip args`.
///
/// # Panics
/// When it fails (not root, no iproute2): the caller's `Cluster` then drops and cleans up.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip (iproute2; scripts/deps-cluster)");
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {}; the cluster test needs root and iproute2",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

#[cfg(test)]
mod tests {
    use super::{owner_pid, server_status};

    /// Only names this harness makes are read as a pid (the last two digits are run and node).
    #[test]
    fn stale_namespaces_are_recognised_by_name() {
        assert_eq!(owner_pid("rcl1234501"), Some(12345));
        assert_eq!(owner_pid("rcl712"), Some(7));
        assert_eq!(owner_pid("rcl12"), None);
        assert_eq!(owner_pid("rcl12x45"), None);
        assert_eq!(owner_pid("relay-bench-12345"), None);
        assert_eq!(owner_pid("rc1234501"), None);
    }

    /// A server's status is read by column name from `show stat`, only in the nodes' backend.
    #[test]
    fn server_status_reads_the_backend_row() {
        let csv = "# pxname,svname,qcur,status,weight\n\
                   relay,FRONTEND,,OPEN,\n\
                   other,node1,0,DOWN,1\n\
                   relay_nodes,node1,0,UP,1\n\
                   relay_nodes,node2,0,NOLB,1\n\
                   relay_nodes,BACKEND,0,UP,2\n";
        assert_eq!(server_status(csv, "node1").as_deref(), Some("UP"));
        assert_eq!(server_status(csv, "node2").as_deref(), Some("NOLB"));
        assert_eq!(server_status(csv, "node3"), None);
        assert_eq!(server_status("garbage", "node1"), None);
    }
}
