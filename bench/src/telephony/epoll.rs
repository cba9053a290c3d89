//! The few OS calls the event-loop generator needs that std lacks: epoll(7) with a nanosecond
//! timeout (`epoll_pwait2`), and the thread's timer slack.
//!
//! Invariant: every `unsafe` here is a plain syscall on a descriptor this module owns or a buffer
//! it sizes; nothing else in the bench touches epoll.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Readiness the loop asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Interest {
    /// Data (or EOF) to read.
    Read,
    /// Data to read, and room to write what the socket pushed back.
    ReadWrite,
}

/// One readiness report.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Event {
    /// The token the descriptor was registered with.
    pub(crate) token: u64,
    /// Readable, or EOF, or an error (a read says which).
    pub(crate) readable: bool,
    /// Writable, or an error (a write or `SO_ERROR` says which).
    pub(crate) writable: bool,
}

/// An epoll instance, level-triggered: a socket left unread is reported again.
pub(crate) struct Epoll {
    fd: OwnedFd,
    events: Vec<libc::epoll_event>,
    /// `epoll_pwait2` is missing (kernel < 5.11): fall back to millisecond timeouts.
    coarse: bool,
}

impl Epoll {
    /// A new instance that reports up to `batch` events per wait.
    pub(crate) fn new(batch: usize) -> io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers; on success it returns a new descriptor we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by epoll_create1 and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, events: vec![libc::epoll_event { events: 0, u64: 0 }; batch.max(1)], coarse: false })
    }

    /// Registers `fd` under `token`.
    pub(crate) fn add(&self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, interest)
    }

    /// Changes what `fd` is watched for.
    pub(crate) fn modify(&self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, interest)
    }

    /// Stops watching `fd`.
    pub(crate) fn delete(&self, fd: RawFd) -> io::Result<()> {
        // SAFETY: EPOLL_CTL_DEL ignores the event argument (null is allowed since Linux 2.6.9).
        if unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        let flags = match interest {
            Interest::Read => libc::EPOLLIN,
            Interest::ReadWrite => libc::EPOLLIN | libc::EPOLLOUT,
        };
        let mut event = libc::epoll_event { events: flags as u32, u64: token };
        // SAFETY: `event` is a valid epoll_event for the duration of the call; the kernel copies it.
        if unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut event) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits until something is ready or `timeout` passes (`None`: no limit), and appends what is
    /// ready to `out`. An interrupted wait returns no events.
    pub(crate) fn wait(&mut self, out: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        let max = libc::c_int::try_from(self.events.len()).unwrap_or(libc::c_int::MAX);
        let n = if self.coarse {
            // Round up, so the loop never wakes before its deadline and spins.
            let ms = timeout.map_or(-1, |t| libc::c_int::try_from(t.as_micros().div_ceil(1000)).unwrap_or(i32::MAX));
            // SAFETY: `events` has room for `max` entries, which the kernel fills.
            unsafe { libc::epoll_wait(self.fd.as_raw_fd(), self.events.as_mut_ptr(), max, ms) }
        } else {
            let ts = timeout.map(|t| libc::timespec {
                tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_nsec: t.subsec_nanos() as libc::c_long, // < 10⁹: fits any c_long.
            });
            let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
            // SAFETY: epoll_pwait2(epfd, events, maxevents, timeout, sigmask, sigsetsize): `events`
            // has room for `max` entries; `ts_ptr` is null or points at a live timespec; no sigmask.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_epoll_pwait2,
                    self.fd.as_raw_fd(),
                    self.events.as_mut_ptr(),
                    max,
                    ts_ptr,
                    std::ptr::null::<libc::sigset_t>(),
                    0usize,
                )
            };
            if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
                self.coarse = true;
                return self.wait(out, timeout);
            }
            r as libc::c_int
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(()) } else { Err(e) };
        }
        for e in &self.events[..usize::try_from(n).unwrap_or(0)] {
            // Copies out of the (packed on x86-64) struct; no reference to its fields is taken.
            let (flags, token) = (e.events, e.u64);
            let error = flags & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0;
            out.push(Event {
                token,
                readable: error || flags & (libc::EPOLLIN | libc::EPOLLRDHUP) as u32 != 0,
                writable: error || flags & libc::EPOLLOUT as u32 != 0,
            });
        }
        Ok(())
    }
}

/// Starts a non-blocking TCP connect to `addr`; its completion (or failure) shows as
/// writability.
///
/// # Errors
/// When the socket cannot be made or the connect fails at once.
pub(crate) fn connect(addr: std::net::SocketAddr) -> io::Result<std::net::TcpStream> {
    let domain = if addr.is_ipv6() { socket2::Domain::IPV6 } else { socket2::Domain::IPV4 };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(socket.into())
}

/// Sets how far the kernel may defer this thread's timed wake-ups to batch them (default 50 µs).
///
/// # Errors
/// When prctl refuses (it does not for an unprivileged thread setting its own slack).
pub(crate) fn set_timer_slack(slack: Duration) -> io::Result<()> {
    let ns = libc::c_ulong::try_from(slack.as_nanos()).unwrap_or(libc::c_ulong::MAX).max(1);
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Most bytes a socket may push back before its peer counts as not reading (a generator that
/// buffered without bound would hide a stalled server).
pub(crate) const MAX_UNSENT_BYTES: usize = 1 << 20;

/// Writes `bytes` to a non-blocking `stream` now, or keeps what it will not take in `unsent` and
/// watches it (registered as `token`) for room; bytes queue behind earlier unsent ones.
///
/// # Errors
/// The socket's error; `WriteZero` when it takes nothing; `Other` once more than
/// [`MAX_UNSENT_BYTES`] wait.
pub(crate) fn send_or_queue(
    epoll: &Epoll,
    token: u64,
    stream: &mut std::net::TcpStream,
    unsent: &mut Vec<u8>,
    bytes: &[u8],
) -> io::Result<()> {
    use std::io::{ErrorKind, Write as _};
    if !unsent.is_empty() {
        if unsent.len() + bytes.len() > MAX_UNSENT_BYTES {
            return Err(io::Error::other("the peer is not reading"));
        }
        unsent.extend_from_slice(bytes);
        return Ok(());
    }
    let mut written = 0;
    while written < bytes.len() {
        match stream.write(&bytes[written..]) {
            Ok(0) => return Err(io::Error::from(ErrorKind::WriteZero)),
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    if written < bytes.len() {
        unsent.extend_from_slice(&bytes[written..]);
        epoll.modify(stream.as_raw_fd(), token, Interest::ReadWrite)?;
    }
    Ok(())
}

/// Writes what `stream` pushed back earlier (now that it reported room); stops watching for room
/// once `unsent` is out.
///
/// # Errors
/// The socket's error.
pub(crate) fn flush_unsent(
    epoll: &Epoll,
    token: u64,
    stream: &mut std::net::TcpStream,
    unsent: &mut Vec<u8>,
) -> io::Result<()> {
    use std::io::{ErrorKind, Write as _};
    if unsent.is_empty() {
        return Ok(());
    }
    let n = match stream.write(unsent) {
        Ok(n) => n,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => 0,
        Err(e) => return Err(e),
    };
    unsent.drain(..n);
    if unsent.is_empty() {
        epoll.modify(stream.as_raw_fd(), token, Interest::Read)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    /// An idle socket is not reported; a written one is, readable, under its token; asking for
    /// room reports it writable.
    #[test]
    fn readiness_and_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client = std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let mut epoll = Epoll::new(8).expect("epoll");
        epoll.add(server.as_raw_fd(), 7, Interest::Read).expect("add");
        let mut out = Vec::new();
        epoll.wait(&mut out, Some(Duration::from_millis(5))).expect("wait");
        assert!(out.is_empty(), "nothing to read yet");
        client.write_all(b"x").expect("write");
        epoll.wait(&mut out, Some(Duration::from_secs(5))).expect("wait");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].token, 7);
        assert!(out[0].readable && !out[0].writable);
        out.clear();
        epoll.modify(server.as_raw_fd(), 7, Interest::ReadWrite).expect("modify");
        epoll.wait(&mut out, Some(Duration::from_secs(5))).expect("wait");
        assert!(out[0].writable, "an idle socket has room to write");
    }
}
