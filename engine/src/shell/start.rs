//! Starting the relay: the checks (memlock, io_uring), the listen sockets, one pinned executor per
//! core running [`run_core`], and the [`Relay`] and [`ShutdownHandle`] the caller keeps.
//!
//! Invariant: the top of the shell; it starts everything and nothing in the shell imports it.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::core_task::{run_core, CoreSetup};
use super::global::{Global, MediaGauges, RtcGauges};
use super::service::ControlService;
use super::tls::server_config;
use super::{clock, rtc};
use crate::config::EngineConfig;
use crate::id::CoreId;

/// Why the relay could not start; each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listen socket could not be created.
    #[error("cannot listen on {addr}: {source}{hint}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
        /// What to change.
        hint: &'static str,
    },
    /// `RLIMIT_MEMLOCK` is below what io_uring needs.
    #[error("io_uring needs RLIMIT_MEMLOCK of at least {need_kib} KiB, but it is {have_kib} KiB: raise it (`ulimit -l unlimited`, LimitMEMLOCK=infinity under systemd, `--ulimit memlock=-1` for containers)")]
    Memlock {
        /// Locked memory needed, KiB.
        need_kib: u64,
        /// The current limit, KiB.
        have_kib: u64,
    },
    /// An executor could not start (io_uring missing or refused).
    #[error("cannot start core {core}: {message}")]
    Executor {
        /// Which core.
        core: usize,
        /// What failed and what to change.
        message: String,
    },
    /// The kernel refuses io_uring.
    #[error("io_uring is unavailable ({source}): Relay needs Linux ≥ 5.8 with io_uring enabled (sysctl kernel.io_uring_disabled=0{disabled}) and a seccomp profile that allows io_uring_setup")]
    IoUring {
        /// The error `io_uring_setup` returned.
        source: std::io::Error,
        /// The current `kernel.io_uring_disabled` setting, when readable.
        disabled: String,
    },
    /// `--cores` is zero.
    #[error("--cores must be at least 1")]
    NoCores,
    /// A core's WebRTC socket could not be made.
    #[error("cannot serve WebRTC: {0}")]
    Rtc(String),
    /// The TLS certificate or key cannot be used.
    #[error("cannot serve TLS: {0}")]
    Tls(String),
}

/// Asks a running relay to shut down gracefully; cheap to clone and `Send`.
#[derive(Clone)]
pub struct ShutdownHandle(Arc<Global>);

impl ShutdownHandle {
    /// Starts graceful shutdown: stop accepting, end calls, close sockets, exit. A node that was
    /// drained and has no call left exits at once, without waiting for connections to close.
    pub fn shutdown(&self) {
        let drained =
            self.0.draining.load(Ordering::Acquire) && self.0.sessions.iter().all(|s| s.load(Ordering::Acquire) == 0);
        self.0.shutdown_at_once.store(drained, Ordering::Release);
        self.0.shutdown.store(true, Ordering::Release);
    }

    /// Starts draining (SIGUSR1, as `POST /admin/drain`): no new calls, live ones go on.
    pub fn drain(&self) {
        self.0.draining.store(true, Ordering::Release);
    }
}

/// A running relay.
pub struct Relay {
    local_addr: SocketAddr,
    rtc_addrs: Vec<SocketAddr>,
    global: Arc<Global>,
    exits: mpsc::Receiver<(usize, Result<(), String>)>,
    cores: usize,
}

impl Relay {
    /// The address the cores listen on (the real port when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Each core's WebRTC address as ICE candidates name it (empty when WebRTC is off).
    pub fn rtc_addrs(&self) -> &[SocketAddr] {
        &self.rtc_addrs
    }

    /// A handle that triggers graceful shutdown from any thread (e.g. a signal handler thread).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.global.clone())
    }

    /// Blocks until every core has exited.
    ///
    /// # Errors
    /// When a core exits before shutdown was asked for (a core that dies ends the process).
    pub fn wait(self) -> Result<(), String> {
        for _ in 0..self.cores {
            let (core, result) = self.exits.recv().map_err(|_| "core threads vanished".to_owned())?;
            result.map_err(|e| format!("core {core} failed: {e}"))?;
            if !self.global.shutdown.load(Ordering::Acquire) {
                return Err(format!("core {core} exited unexpectedly"));
            }
        }
        Ok(())
    }
}

/// Storage I/O memory glommio pre-registers per executor, bytes. Relay does no file I/O on the
/// executors, so this stays small.
const IO_MEMORY_BYTES: usize = 256 << 10;
/// RLIMIT_MEMLOCK glommio refuses to start below (its `MemLockLimit` check, measured: 512 KiB
/// whatever the core count on kernel 6.x, which charges io_uring rings to the memory cgroup).
const MEMLOCK_NEEDED_BYTES: u64 = 512 << 10;

/// Binds the listen sockets, starts one executor per core and returns once all serve.
///
/// # Errors
/// [`StartError`] with a message that says what to change.
pub fn start<S: ControlService>(config: EngineConfig, service: S) -> Result<Relay, StartError> {
    if config.cores == 0 {
        return Err(StartError::NoCores);
    }
    check_memlock()?;
    raise_file_limit();
    check_io_uring()?;
    let listeners = bind_listeners(config.listen, config.cores)?;
    let local_addr =
        listeners[0].local_addr().map_err(|source| StartError::Listen { addr: config.listen, source, hint: "" })?;
    let tls = match &config.tls {
        Some(id) => Some(server_config(&id.cert_pem, &id.key_pem).map_err(StartError::Tls)?),
        None => None,
    };
    // One WebRTC socket per core, and one DTLS certificate for the process.
    let (rtc_addrs, mut rtc_cores) = match &config.rtc {
        Some(settings) => {
            let bound = rtc::bind(settings, config.listen.ip(), config.cores).map_err(StartError::Rtc)?;
            let addrs = bound.iter().map(|c| c.candidate).collect();
            (addrs, bound.into_iter().map(Some).collect())
        }
        None => (Vec::new(), (0..config.cores).map(|_| None).collect::<Vec<_>>()),
    };
    let cpus = allowed_cpus();
    let global = Arc::new(Global {
        shutdown: AtomicBool::new(false),
        shutdown_at_once: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        ticks: (0..config.cores).map(|_| AtomicU64::new(0)).collect(),
        sessions: (0..config.cores).map(|_| AtomicUsize::new(0)).collect(),
        observers: (0..config.cores).map(|_| AtomicUsize::new(0)).collect(),
        connections: (0..config.cores).map(|_| AtomicUsize::new(0)).collect(),
        protocol_errors: (0..config.cores).map(|_| AtomicU64::new(0)).collect(),
        agent_errors: (0..config.cores).map(|_| AtomicU64::new(0)).collect(),
        pacer_drops: (0..config.cores).map(|_| AtomicU64::new(0)).collect(),
        rtc: (0..config.cores).map(|_| RtcGauges::default()).collect(),
        media: (0..config.cores).map(|_| MediaGauges::default()).collect(),
        tools: (0..config.cores).map(|_| Default::default()).collect(),
        started: clock::now().instant,
    });
    let mesh = glommio::channels::channel_mesh::MeshBuilder::full(config.cores, config.limits.mesh_capacity);
    // Each core has at most `mesh_capacity` requests outstanding, so each reply channel needs no more.
    let replies = glommio::channels::channel_mesh::MeshBuilder::full(config.cores, config.limits.mesh_capacity);
    let (ready_tx, ready_rx) = mpsc::channel::<(usize, Result<(), String>)>();
    let (exit_tx, exit_rx) = mpsc::channel();
    for (index, listener) in listeners.into_iter().enumerate() {
        let cpu = cpus[index % cpus.len()];
        let core = CoreSetup {
            id: CoreId(index),
            cores: config.cores,
            limits: config.limits.clone(),
            agents: config.agents.clone(),
            stream_key: config.stream_key.clone(),
            node_id: config.node_id.clone(),
            listener: OwnedFd::from(listener),
            rtc: rtc_cores[index].take(),
            tls: tls.clone(),
            begin_sentence: config.begin_sentence.clone(),
            tools: config.tools.clone(),
            records: config.records.clone(),
            mesh: mesh.clone(),
            replies: replies.clone(),
            global: global.clone(),
        };
        let service = service.clone();
        let ready = ready_tx.clone();
        let exit = exit_tx.clone();
        let mut builder = glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(cpu))
            .name(&format!("core-{index:02}"))
            .io_memory(IO_MEMORY_BYTES);
        if !config.limits.spin_before_park.is_zero() {
            builder = builder.spin_before_park(config.limits.spin_before_park);
        }
        let spawned = builder.spawn(move || run_core(core, service, ready));
        let handle = spawned.map_err(|e| StartError::Executor { core: index, message: explain(&e.to_string()) })?;
        std::thread::Builder::new()
            .name(format!("core-{index:02}-join"))
            .spawn(move || {
                let result = match handle.join() {
                    Ok(r) => r,
                    Err(e) => Err(explain(&e.to_string())),
                };
                let _ = exit.send((index, result));
            })
            .map_err(|e| StartError::Executor { core: index, message: e.to_string() })?;
    }
    drop(ready_tx);
    for _ in 0..config.cores {
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok((_, Ok(()))) => {}
            Ok((core, Err(message))) => return Err(StartError::Executor { core, message }),
            Err(_) => {
                // A core ended before reporting: its join result says why.
                let (core, result) = exit_rx
                    .recv_timeout(Duration::from_secs(5))
                    .unwrap_or_else(|_| (0, Err("did not start within 30 s".to_owned())));
                let message = result.err().unwrap_or_else(|| "exited during startup".to_owned());
                return Err(StartError::Executor { core, message });
            }
        }
    }
    Ok(Relay { local_addr, rtc_addrs, global, exits: exit_rx, cores: config.cores })
}

/// Turns glommio's startup errors into what the operator has to change.
fn explain(error: &str) -> String {
    let lower = error.to_ascii_lowercase();
    if lower.contains("cannot allocate memory") || lower.contains("memlock") || lower.contains("enomem") {
        format!("{error}: locked memory is too low for io_uring; raise RLIMIT_MEMLOCK (`ulimit -l unlimited`)")
    } else if lower.contains("function not implemented")
        || lower.contains("operation not permitted")
        || lower.contains("permission denied")
    {
        format!("{error}: io_uring is unavailable; Relay needs Linux ≥ 5.8 with io_uring enabled (sysctl kernel.io_uring_disabled=0, and a seccomp profile that allows io_uring_setup)")
    } else {
        error.to_owned()
    }
}

/// Creates and closes a one-entry ring, so a kernel without io_uring is reported here rather than
/// as a panic inside glommio's executor setup.
fn check_io_uring() -> Result<(), StartError> {
    // struct io_uring_params is 120 bytes of u32 fields; zeroed asks for the defaults.
    let mut params = [0u32; 30];
    // SAFETY: io_uring_setup reads and writes only the params struct we pass, sized as the kernel
    // expects; on success it returns a new descriptor that we own and close right away.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        let source = std::io::Error::last_os_error();
        let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .map(|v| format!("; it is {}", v.trim()))
            .unwrap_or_default();
        return Err(StartError::IoUring { source, disabled });
    }
    // SAFETY: `fd` is the descriptor io_uring_setup just returned; nothing else refers to it.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

fn check_memlock() -> Result<(), StartError> {
    let need = MEMLOCK_NEEDED_BYTES;
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return Ok(()); // Cannot tell; let the executors report what fails.
    }
    if lim.rlim_cur == libc::RLIM_INFINITY || lim.rlim_cur >= need {
        return Ok(());
    }
    if lim.rlim_max == libc::RLIM_INFINITY || lim.rlim_max >= need {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads the struct we pass; raising the soft limit up to the hard limit
        // is always permitted.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raised) } == 0 {
            return Ok(());
        }
    }
    Err(StartError::Memlock { need_kib: need / 1024, have_kib: lim.rlim_cur / 1024 })
}

/// Raises the soft limit on open files to the hard limit: every connection, agent leg and WebRTC
/// socket is a descriptor, and distributions start processes at 1024. Returns the limit in force.
pub fn raise_file_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads the struct we pass; raising the soft limit up to the hard limit
        // is always permitted.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return lim.rlim_max;
        }
    }
    lim.rlim_cur
}

fn bind_listeners(addr: SocketAddr, cores: usize) -> Result<Vec<StdListener>, StartError> {
    let mut listeners = Vec::with_capacity(cores);
    let mut bound = addr;
    for _ in 0..cores {
        let listener = bind_one(bound).map_err(|source| {
            let hint = match source.kind() {
                std::io::ErrorKind::AddrInUse => ": the port is taken; choose another with --listen / RELAY_LISTEN",
                std::io::ErrorKind::PermissionDenied => ": ports below 1024 need privileges; choose a port ≥ 1024",
                std::io::ErrorKind::AddrNotAvailable => ": that address is not on this machine",
                _ => "",
            };
            StartError::Listen { addr, source, hint }
        })?;
        if bound.port() == 0 {
            // Port 0: the first core's socket picked a port, every other core joins that port.
            bound = listener.local_addr().map_err(|source| StartError::Listen { addr, source, hint: "" })?;
        }
        listeners.push(listener);
    }
    Ok(listeners)
}

fn bind_one(addr: SocketAddr) -> std::io::Result<StdListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// CPUs this process may run on (its affinity mask), in order.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into `set`.
    let ok = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) } == 0;
    let cpus: Vec<usize> = if ok {
        // SAFETY: CPU_ISSET reads the set we own; the index is below CPU_SETSIZE.
        (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
    } else {
        Vec::new()
    };
    if cpus.is_empty() {
        vec![0]
    } else {
        cpus
    }
}

/// CPUs this process may use: the default for `--cores`.
pub fn available_cores() -> usize {
    allowed_cpus().len()
}
