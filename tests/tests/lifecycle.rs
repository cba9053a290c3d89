//! The process: `--help`, configuration through environment twins, startup errors as one clear
//! line (never a panic), and graceful shutdown on SIGTERM/SIGINT.

use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;

use relay_tests::{
    assert_success, encode_frame, ids_on_core, output_bounded, relay_command, temp_dir, Conn, RawWs, Relay, TIMEOUT,
};
use serde_json::json;

/// `relay --help` exits 0 and documents the main flags.
#[test]
fn help_lists_the_flags() {
    let mut cmd = relay_command();
    cmd.arg("--help");
    let out = output_bounded(cmd, TIMEOUT);
    assert!(out.status.success(), "--help exit status {:?}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--listen", "--cores", "--api-key", "--data-dir"] {
        assert!(text.contains(flag), "--help mentions {flag}:\n{text}");
    }
}

/// With `RLIMIT_MEMLOCK` at 0 the relay exits non-zero naming the limit, without panicking.
#[test]
fn memlock_limit_is_a_clear_error() {
    let data = temp_dir("memlock");
    let mut cmd = relay_command();
    cmd.args(["--listen", "127.0.0.1:0", "--cores", "2", "--data-dir"]).arg(&data);
    // SAFETY: the closure runs in the forked child before exec and only calls setrlimit, which is
    // async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            let zero = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &zero) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = output_bounded(cmd, TIMEOUT);
    let _ = std::fs::remove_dir_all(&data);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit status {:?}; stderr:\n{stderr}", out.status);
    assert!(stderr.contains("RLIMIT_MEMLOCK"), "stderr names RLIMIT_MEMLOCK:\n{stderr}");
    assert!(!stderr.contains("panicked"), "no panic:\n{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.contains("RLIMIT_MEMLOCK")).count(), 1, "one error line:\n{stderr}");
}

/// Without io_uring (its setup syscall refused, as seccomp profiles and `io_uring_disabled` do)
/// the relay exits non-zero with one line naming io_uring, without panicking.
#[cfg(target_arch = "x86_64")]
#[test]
fn missing_io_uring_is_a_clear_error() {
    let data = temp_dir("no-uring");
    let mut cmd = relay_command();
    cmd.args(["--listen", "127.0.0.1:0", "--cores", "2", "--data-dir"]).arg(&data);
    // SAFETY: the closure runs in the forked child before exec; prctl is async-signal-safe and the
    // filter program lives on the child's stack for the duration of the call that copies it.
    unsafe {
        cmd.pre_exec(|| {
            deny_io_uring_setup()?;
            Ok(())
        });
    }
    let out = output_bounded(cmd, TIMEOUT);
    let _ = std::fs::remove_dir_all(&data);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit status {:?}; stderr:\n{stderr}", out.status);
    assert!(!stderr.contains("panicked"), "no panic:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("io_uring")).collect();
    assert_eq!(lines.len(), 1, "one error line naming io_uring:\n{stderr}");
    assert!(lines[0].contains("io_uring_disabled"), "the line says what to change:\n{stderr}");
}

/// Installs a seccomp filter that fails `io_uring_setup` with ENOSYS and allows everything else.
#[cfg(target_arch = "x86_64")]
fn deny_io_uring_setup() -> std::io::Result<()> {
    const IO_URING_SETUP: u32 = 425; // x86_64 syscall number.
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const RET_ERRNO: u32 = 0x0005_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    let filter = [
        libc::sock_filter { code: LD_W_ABS, jt: 0, jf: 0, k: 0 }, // seccomp_data.nr
        libc::sock_filter { code: JEQ_K, jt: 0, jf: 1, k: IO_URING_SETUP },
        libc::sock_filter { code: RET_K, jt: 0, jf: 0, k: RET_ERRNO | libc::ENOSYS as u32 },
        libc::sock_filter { code: RET_K, jt: 0, jf: 0, k: RET_ALLOW },
    ];
    let program = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
    // SAFETY: plain prctl calls; `program` points at `filter`, which outlives both calls.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &program as *const libc::sock_fprog) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A port already taken gives a non-zero exit and one line saying so.
#[test]
fn taken_port_is_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("local addr").to_string();
    let data = temp_dir("taken");
    let mut cmd = relay_command();
    cmd.args(["--listen", &addr, "--cores", "2", "--data-dir"]).arg(&data);
    let out = output_bounded(cmd, TIMEOUT);
    let _ = std::fs::remove_dir_all(&data);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit status {:?}; stderr:\n{stderr}", out.status);
    assert!(!stderr.contains("panicked"), "no panic:\n{stderr}");
    let port = addr.rsplit(':').next().expect("port");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains(port) && (l.contains("in use") || l.contains("taken"))
        })
        .collect();
    assert_eq!(lines.len(), 1, "one line naming the port as taken:\n{stderr}");
    drop(taken);
}

/// Listening on a public address without an API key is refused unless `--insecure-public`.
#[test]
fn public_listen_needs_a_key() {
    let data = temp_dir("public");
    let mut cmd = relay_command();
    cmd.args(["--listen", "0.0.0.0:0", "--cores", "1", "--data-dir"]).arg(&data);
    let out = output_bounded(cmd, TIMEOUT);
    let _ = std::fs::remove_dir_all(&data);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit status {:?}; stderr:\n{stderr}", out.status);
    assert!(!stderr.contains("panicked"), "no panic:\n{stderr}");

    // With a key it starts, and answers on loopback.
    let relay = Relay::start(&["--listen", "0.0.0.0:0", "--api-key", "public-key"]);
    assert_eq!(relay.request("POST", "/start-call", &[], Some("{}")).status, 401);
    assert_eq!(relay.get("/health").status, 200);
    drop(relay);

    let relay = Relay::start(&["--listen", "0.0.0.0:0", "--insecure-public"]);
    assert_eq!(relay.get("/health").status, 200);
}

/// Invalid flag values are refused with a non-zero exit and no panic.
#[test]
fn invalid_flags_are_refused() {
    for args in [
        vec!["--cores", "0"],
        vec!["--cores", "many"],
        vec!["--header-timeout", "soon"],
        vec!["--listen", "not-an-address"],
        vec!["--max-body-bytes", "-5"],
        vec!["--no-such-flag"],
    ] {
        let data = temp_dir("badflag");
        let mut cmd = relay_command();
        cmd.args(["--data-dir"]).arg(&data);
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(&args);
        let out = output_bounded(cmd, TIMEOUT);
        let _ = std::fs::remove_dir_all(&data);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted; stderr:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
        assert!(!stderr.trim().is_empty(), "{args:?} says why");
    }
}

/// Flags have `RELAY_*` environment twins.
#[test]
fn environment_twins_configure_the_relay() {
    let relay = Relay::start_with_env(
        &[],
        &[("RELAY_CORES", "3"), ("RELAY_API_KEY", "env-key"), ("RELAY_LISTEN", "127.0.0.1:0")],
    );
    assert_eq!(relay.request("GET", "/health/detailed", &[], None).status, 401, "RELAY_API_KEY applies");
    let cores = relay.detailed()["services"]["server"]["cores"].as_array().expect("cores").len();
    assert_eq!(cores, 3, "RELAY_CORES applies");
}

/// SIGTERM ends every call (`call_ended` reason shutdown, then close 1001) and exits 0.
#[test]
fn sigterm_ends_calls_and_exits_cleanly() {
    let mut relay = Relay::start(&["--shutdown-grace", "3s"]);
    let mut sockets = Vec::new();
    for core in 0..2 {
        for id in ids_on_core("down", core, 2, 2) {
            assert_success(&relay.start_call(&id, "t"), "Call started successfully");
            for _ in 0..3 {
                sockets.push((id.clone(), relay.observe(&id, "t")));
            }
        }
    }
    // An idle keep-alive connection and a socket waiting for a session must not hold the exit up.
    let mut idle = relay.conn();
    assert_eq!(idle.get("/health").status, 200);
    let mut waiting = relay.observe("not-started", "t");

    relay.signal(libc::SIGTERM);
    for (id, ws) in &mut sockets {
        assert_eq!(ws.expect_event("call_ended"), json!({"sessionId": id, "reason": "shutdown"}));
        assert_eq!(ws.expect_close(), Some(1001), "{id}");
    }
    assert_eq!(waiting.expect_close(), Some(1001), "a socket waiting for a session is told the relay is going away");
    let status = relay.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

/// SIGINT shuts down gracefully too, exiting 0.
#[test]
fn sigint_exits_cleanly() {
    let mut relay = Relay::start(&["--shutdown-grace", "3s"]);
    assert_success(&relay.start_call("int", "t"), "Call started successfully");
    let mut ws = relay.observe("int", "t");
    relay.signal(libc::SIGINT);
    assert_eq!(ws.expect_event("call_ended")["reason"], "shutdown");
    assert_eq!(ws.expect_close(), Some(1001));
    let status = relay.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

/// A relay with nothing open exits 0 on SIGTERM, well within its grace period.
#[test]
fn idle_relay_terminates() {
    let mut relay = Relay::start(&["--shutdown-grace", "3s"]);
    let status = relay.terminate();
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    assert!(!relay.is_running());
}

/// `--data-dir` is created when missing.
#[test]
fn data_dir_is_created() {
    let parent = temp_dir("datadir");
    let dir = parent.join("nested").join("relay-data");
    let dir_arg = dir.to_str().expect("utf-8 temp path");
    let relay = Relay::start(&["--data-dir", dir_arg]);
    assert!(dir.is_dir(), "{} created", dir.display());
    drop(relay);
    let _ = std::fs::remove_dir_all(&parent);
}

/// Clients that never read or never finish their request do not keep the relay from exiting 0.
#[test]
fn stuck_clients_do_not_block_shutdown() {
    let mut relay = Relay::start(&["--shutdown-grace", "1s"]);
    assert_success(&relay.start_call("stuck", "t"), "Call started successfully");
    // A WebSocket client that never reads (its pongs pile up) and never answers the close.
    let mut deaf =
        RawWs::connect(relay.addr(), "/ws?sessionId=stuck", &[("Authorization", "Bearer t")]).expect("upgrade");
    let ping = encode_frame(true, 1, b"{\"type\":\"ping\"}", Some([9, 8, 7, 6]));
    let _ = deaf.send_raw(&ping.repeat(5000));
    // An HTTP client stuck halfway through its head, with the default 10 s header timeout.
    let mut slow = Conn::open(relay.addr());
    slow.write_raw(b"POST /start-call HTTP/1.1\r\nHost: x\r\n").expect("write half a head");
    let status = relay.terminate();
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

/// A relay whose stderr reader has gone away (`relay 2>&1 | head -1`) keeps serving and still
/// exits 0 on SIGTERM: log lines it cannot write are dropped, not turned into panics. Logs written
/// to a pipe are plain text, without terminal colour codes.
#[test]
fn closed_stderr_does_not_stop_shutdown() {
    use std::io::BufRead as _;
    use std::process::Stdio;

    let data = temp_dir("closed-stderr");
    let mut cmd = relay_command();
    cmd.args(["--listen", "127.0.0.1:0", "--cores", "2", "--log", "debug", "--data-dir"]).arg(&data);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn the relay");
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("piped stderr"));
    let mut line = String::new();
    let addr = loop {
        line.clear();
        let n = stderr.read_line(&mut line).expect("read the relay's stderr");
        assert!(n > 0, "relay closed stderr before logging its address");
        if let Some(at) = line.find("listening on http://") {
            let rest = &line[at + "listening on http://".len()..];
            let addr: std::net::SocketAddr =
                rest.split_whitespace().next().expect("address").parse().expect("listening address");
            break addr;
        }
    };
    assert!(!line.contains('\u{1b}'), "no colour codes in piped logs: {line:?}");
    drop(stderr);

    // Every request below logs at debug level into the closed pipe.
    for i in 0..3 {
        let mut conn = Conn::open(addr);
        let id = format!("closed-stderr-{i}");
        let resp = conn.post("/start-call", &json!({"sessionId": id, "accessToken": "t"}));
        assert_eq!(resp.status, 200, "relay still serves with stderr closed");
        assert_eq!(conn.get("/health").status, 200);
    }

    let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
    // SAFETY: `kill` with a valid signal number on our own child's pid has no memory effects.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "signal the relay");
    let deadline = std::time::Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&data);
            panic!("relay with a closed stderr did not exit within {TIMEOUT:?} of SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let _ = std::fs::remove_dir_all(&data);
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

/// `--print-config` lists every setting as an environment file (source above each value, secrets
/// redacted) and exits 0; fed back as the environment, it configures the same relay.
#[test]
fn print_config_round_trips_as_an_environment_file() {
    let data = temp_dir("print-config");
    let data_arg = data.to_str().expect("utf-8 temp path").to_owned();
    let mut cmd = relay_command();
    cmd.args(["--print-config", "--listen", "127.0.0.1:0", "--cores", "3", "--api-key", "secret-xyz"]);
    cmd.args(["--cors-origins", "https://a.example,https://b.example", "--data-dir", &data_arg]);
    cmd.env("RELAY_LOG", "info,relay_engine=debug");
    let out = output_bounded(cmd, TIMEOUT);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "exit {:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("secret-xyz"), "the API key is never printed:\n{text}");
    assert!(text.contains("\n# RELAY_API_KEY=<redacted>\n"), "{text}");
    assert!(text.contains("# --cores: set by --cores\nRELAY_CORES=3\n"), "{text}");
    assert!(text.contains("# --log: set by RELAY_LOG\nRELAY_LOG=info,relay_engine=debug\n"), "{text}");
    assert!(text.contains("# --shutdown-grace: default\nRELAY_SHUTDOWN_GRACE=3s\n"), "{text}");
    let help = output_bounded(
        {
            let mut c = relay_command();
            c.arg("--help");
            c
        },
        TIMEOUT,
    );
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    for var in help.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("RELAY_")) {
        assert!(text.contains(&format!("{var}=")), "{var} from --help is listed:\n{text}");
    }

    let mut env: Vec<(String, String)> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once('=').expect("NAME=value");
            let v = v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')).unwrap_or(v);
            (k.to_owned(), v.to_owned())
        })
        .collect();
    env.push(("RELAY_API_KEY".to_owned(), "secret-xyz".to_owned()));
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let relay = Relay::start_with_env(&[], &env_refs);
    let cores = relay.detailed()["services"]["server"]["cores"].as_array().expect("cores").len();
    assert_eq!(cores, 3, "RELAY_CORES from the listing applies");
    let resp = relay.request("GET", "/health", &[("Origin", "https://b.example")], None);
    assert_eq!(resp.header("access-control-allow-origin"), Some("https://b.example"), "CORS list applies");
    assert_eq!(relay.request("POST", "/stop-call", &[], Some("{}")).status, 401, "the key applies");
    drop(relay);
    let _ = std::fs::remove_dir_all(&data);
}
