//! Moving an accepted TCP connection to another core: the socket travels as a duplicated file
//! descriptor, with the bytes already read beside it in the message.
//!
//! Invariant: the only `unsafe` fd adoption in the engine; a descriptor is adopted exactly once.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

use glommio::net::TcpStream;

/// Duplicates the socket under `stream` so it survives dropping `stream` on this core.
///
/// The duplicate refers to the same open socket; dropping the original closes only its own
/// descriptor (glommio's `TcpStream` closes, never shuts down, on drop).
pub(crate) fn detach(stream: &TcpStream) -> io::Result<OwnedFd> {
    // SAFETY: `as_raw_fd` is a live descriptor owned by `stream` for the duration of this call;
    // F_DUPFD_CLOEXEC creates a new descriptor we own and do not alias.
    let fd = unsafe { libc::fcntl(stream.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by fcntl and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adopts a descriptor produced by [`detach`] on this core's executor.
pub(crate) fn adopt(fd: OwnedFd) -> TcpStream {
    // SAFETY: `fd` is an owned, open, connected TCP socket (from `detach`); `into_raw_fd` gives up
    // that ownership, so the stream is its only owner.
    unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) }
}
