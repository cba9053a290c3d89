//! The queue between the core and one socket's writer, and that socket's liveness bookkeeping
//! (idle peer, pings, unanswered close), swept by the core's timer task.
//!
//! Invariant: bounded (a full outbox refuses, the core counts the drop); nothing here arms a
//! timer or reads the clock per frame.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use event_listener::Event;
use tungstenite::Utf8Bytes;

/// How long a closing socket waits for the peer's close frame before the TCP connection is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The queue between the core and one socket's writer, and the socket's liveness bookkeeping.
///
/// Deadlines (idle peer, unanswered close, stalled write) are enforced by the core's periodic
/// [`Outbox::sweep`], which shuts the socket down; nothing arms a timer per frame.
pub(crate) struct Outbox {
    pub(super) frames: RefCell<VecDeque<Utf8Bytes>>,
    pub(super) close: Cell<Option<(u16, &'static str)>>,
    /// When the close began: the peer has until then plus [`CLOSE_WAIT`] to answer it.
    pub(super) closing_since: Cell<Option<Instant>>,
    /// Wakes the writer when a frame, a close or a ping request arrives.
    pub(super) event: Event,
    /// Frames that could not be queued or encoded for this socket.
    pub(super) dropped: Cell<u64>,
    /// The socket, for the sweep to shut down; -1 until `run` starts.
    pub(super) fd: Cell<RawFd>,
    /// Coarse time (the core's tick clock) of the last bytes from the peer.
    pub(super) last_rx: Cell<Instant>,
    /// Coarse time of the last bytes written to the peer.
    pub(super) last_tx: Cell<Instant>,
    /// When the write now in progress began, if one is.
    pub(super) writing_since: Cell<Option<Instant>>,
    /// The sweep asks the writer for a ping.
    pub(super) ping_due: Cell<bool>,
    /// Coarse time of the last ping the sweep asked for.
    pub(super) last_ping: Cell<Instant>,
    /// The sweep shut the socket down; nothing more to do for it.
    pub(super) killed: Cell<bool>,
    /// The peer ended the connection with a close frame (not a drop).
    pub(super) peer_closed: Cell<bool>,
    /// A media leg (caller or agent): on overflow only media frames are dropped, never the
    /// protocol's control messages (`start`, marks, `clear`, `stop`).
    pub(super) media_leg: Cell<bool>,
}

impl Outbox {
    /// Frames waiting for this socket's writer.
    pub(crate) fn queued(&self) -> usize {
        self.frames.borrow().len()
    }

    pub(crate) fn new(now: Instant) -> Self {
        Self {
            frames: RefCell::new(VecDeque::new()),
            close: Cell::new(None),
            closing_since: Cell::new(None),
            event: Event::new(),
            dropped: Cell::new(0),
            fd: Cell::new(-1),
            last_rx: Cell::new(now),
            last_tx: Cell::new(now),
            writing_since: Cell::new(None),
            ping_due: Cell::new(false),
            last_ping: Cell::new(now),
            killed: Cell::new(false),
            peer_closed: Cell::new(false),
            media_leg: Cell::new(false),
        }
    }

    /// Marks this socket as a media leg (see `media_leg`).
    pub(crate) fn set_media_leg(&self) {
        self.media_leg.set(true);
    }

    /// Queues a frame. When `limit` frames are already waiting (the peer is not keeping up), the
    /// oldest is dropped to make room, so a slow listener hears the newest audio and loses only its
    /// own frames. Returns false when a frame was dropped (or the socket is closing).
    pub(crate) fn push(&self, text: Utf8Bytes, limit: usize) -> bool {
        if self.close.get().is_some() {
            return false;
        }
        let mut frames = self.frames.borrow_mut();
        let mut dropped = false;
        if frames.len() >= limit {
            if self.media_leg.get() {
                // Drop the oldest media frame; control messages must arrive, up to a hard cap of
                // twice the limit, past which the peer is plainly not reading: close the leg.
                match frames.iter().position(is_media) {
                    Some(i) => {
                        frames.remove(i);
                        dropped = true;
                    }
                    None if is_media(&text) => return false,
                    None if frames.len() >= 2 * limit.max(1) => {
                        drop(frames);
                        self.close(1008, "peer is not reading");
                        return false;
                    }
                    None => {}
                }
            } else if frames.pop_front().is_some() {
                dropped = true;
            } else {
                return false; // A zero limit: nothing can be queued.
            }
        }
        frames.push_back(text);
        drop(frames);
        self.event.notify(1);
        !dropped
    }

    /// Asks the writer to send a close frame after what is queued, then end the connection.
    pub(crate) fn close(&self, code: u16, reason: &'static str) {
        if self.close.get().is_none() {
            self.close.set(Some((code, reason)));
        }
        self.event.notify(1);
    }

    /// Enforces this socket's deadlines at (coarse) time `now`: a peer silent past `idle` is
    /// closed with 1001; a close unanswered for [`CLOSE_WAIT`] or a write stalled past
    /// `write_timeout` shuts the socket down (its reader and writer then end); a socket quiet for
    /// `ping` gets a ping.
    pub(crate) fn sweep(&self, now: Instant, idle: Duration, ping: Duration, write_timeout: Duration) {
        if self.killed.get() {
            return;
        }
        let closed_out = self.closing_since.get().is_some_and(|t| now.saturating_duration_since(t) > CLOSE_WAIT);
        let stalled = self.writing_since.get().is_some_and(|t| now.saturating_duration_since(t) > write_timeout);
        if closed_out || stalled {
            self.killed.set(true);
            let fd = self.fd.get();
            if fd >= 0 {
                // SAFETY: `fd` belongs to the live socket this outbox serves (set by `run`, which
                // removes the outbox before the socket is dropped); shutdown only changes its state.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
            return;
        }
        if self.close.get().is_none() && now.saturating_duration_since(self.last_rx.get()) > idle {
            self.close(1001, "idle timeout");
            return;
        }
        // Ping when the *peer* has been quiet (its pong is what proves it alive), at most once per
        // interval; a socket we stream to constantly is pinged all the same.
        if now.saturating_duration_since(self.last_rx.get()) >= ping
            && now.saturating_duration_since(self.last_ping.get()) >= ping
        {
            self.last_ping.set(now);
            self.ping_due.set(true);
            self.event.notify(1);
        }
    }
}

/// Whether a queued frame is a Twilio `media` message (the writers put `event` first).
fn is_media(text: &Utf8Bytes) -> bool {
    text.as_bytes().starts_with(br#"{"event":"media""#)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full outbox drops its oldest frame for each new one and says so; a closing one takes none.
    #[test]
    fn full_outbox_drops_oldest() {
        #[allow(clippy::disallowed_methods)] // A test's clock origin.
        let outbox = Outbox::new(Instant::now());
        for i in 0..3 {
            assert!(outbox.push(Utf8Bytes::from(format!("{i}")), 3));
        }
        assert!(!outbox.push(Utf8Bytes::from("3".to_owned()), 3));
        assert!(!outbox.push(Utf8Bytes::from("4".to_owned()), 3));
        let kept: Vec<String> = outbox.frames.borrow().iter().map(|t| t.as_str().to_owned()).collect();
        assert_eq!(kept, ["2", "3", "4"]);
        outbox.close(1000, "");
        assert!(!outbox.push(Utf8Bytes::from("5".to_owned()), 3));
        assert_eq!(outbox.frames.borrow().len(), 3);
    }

    /// On a media leg, overflow drops the oldest media frame, never a control message.
    #[test]
    fn media_leg_keeps_control_messages() {
        #[allow(clippy::disallowed_methods)] // A test's clock origin.
        let outbox = Outbox::new(Instant::now());
        outbox.set_media_leg();
        let media = |i: u8| Utf8Bytes::from(format!(r#"{{"event":"media","n":{i}}}"#));
        let control = |name: &str| Utf8Bytes::from(format!(r#"{{"event":"{name}"}}"#));
        assert!(outbox.push(control("connected"), 3));
        assert!(outbox.push(control("start"), 3));
        assert!(outbox.push(media(1), 3));
        assert!(!outbox.push(media(2), 3), "media 1 makes room for media 2");
        assert!(!outbox.push(control("mark"), 3), "media 2 makes room for the mark");
        assert!(!outbox.push(media(3), 3), "only control left: the new media frame is dropped");
        assert!(outbox.push(control("stop"), 3), "control past the limit is kept, nothing dropped");
        let kept: Vec<String> = outbox.frames.borrow().iter().map(|t| t.as_str().to_owned()).collect();
        assert_eq!(
            kept,
            [r#"{"event":"connected"}"#, r#"{"event":"start"}"#, r#"{"event":"mark"}"#, r#"{"event":"stop"}"#]
        );
        assert!(outbox.push(control("clear"), 3));
        assert!(outbox.push(control("clear"), 3));
        assert!(!outbox.push(control("clear"), 3), "twice the limit of control frames: the leg closes");
        assert_eq!(outbox.close.get(), Some((1008, "peer is not reading")));
    }

    /// The sweep pings a peer that has been quiet, even while we stream to it, once per interval;
    /// it closes a peer silent past the idle timeout, and kills a socket whose close went unanswered.
    #[test]
    fn sweep_pings_quiet_peers() {
        #[allow(clippy::disallowed_methods)] // A test's clock origin.
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let outbox = Outbox::new(t0);
        outbox.last_tx.set(t0 + s(25)); // We wrote a moment ago: it does not matter.
        outbox.sweep(t0 + s(21), s(60), s(20), s(60));
        assert!(outbox.ping_due.take(), "the peer was quiet for 21 s");
        outbox.sweep(t0 + s(22), s(60), s(20), s(60));
        assert!(!outbox.ping_due.get(), "not twice in one interval");
        outbox.last_rx.set(t0 + s(30)); // Its pong.
        outbox.sweep(t0 + s(45), s(60), s(20), s(60));
        assert!(!outbox.ping_due.get(), "the pong counts as activity");
        outbox.sweep(t0 + s(91), s(60), s(20), s(60));
        assert_eq!(outbox.close.get(), Some((1001, "idle timeout")));
        outbox.closing_since.set(Some(t0 + s(91)));
        outbox.sweep(t0 + s(94), s(60), s(20), s(60));
        assert!(outbox.killed.get(), "the close went unanswered for over 2 s");
    }
}
