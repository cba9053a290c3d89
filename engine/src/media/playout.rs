//! Playout (jitter) buffer for one incoming RTP audio stream of 20 ms packets: reorders within a
//! bounded window, then releases one frame per 20 ms after a target delay, saying for each frame
//! whether to decode a packet, recover it from the next packet's FEC, or conceal it.
//!
//! Codec-agnostic: payloads are opaque [`Bytes`]. Sequence numbers are extended to 64 bits, so the
//! 16-bit wrap is invisible; a jump of more than [`PlayoutConfig::resync_frames`] (a sender
//! restart) starts the stream afresh instead of concealing the gap. A frame is declared lost only
//! once a later packet has arrived; when nothing at all is buffered (the sender paused, DTX, or a
//! network stall) the buffer conceals without moving its playout point, so a resumed stream is
//! not late, and after [`PlayoutConfig::idle_after`] without packets it goes quiet until the next.
//! Delay grown by stalls is given back: above [`PlayoutConfig::max_delay`] at once, and one frame
//! per second while the buffer never ran below its target for a whole second.
//!
//! Invariant: sans-IO (time is passed in, never read); at most `capacity_frames` packets held;
//! frames released never outrun real time (≤ 1 + elapsed / 20 ms since the first packet); no
//! panics on any sequence of inputs, including time going backwards.

use std::time::{Duration, Instant};

use bytes::Bytes;

/// The duration of one packet and of one released frame.
pub const FRAME: Duration = Duration::from_millis(20);

/// The most packets any buffer holds, whatever its configuration asks for.
pub const MAX_CAPACITY_FRAMES: usize = 1000;

/// Played frames per delay-shrinking window (one second).
const SHRINK_WINDOW_FRAMES: u32 = 50;

/// Extended sequence numbers start here, so a backward step from the first packet cannot
/// underflow.
const EXT_BASE: u64 = 1 << 32;

/// How a [`PlayoutBuffer`] trades delay against loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlayoutConfig {
    /// Delay from the first packet of a (re)started stream to its first released frame: the
    /// jitter absorbed without a concealed frame. Default 10 ms: later packets make the buffer
    /// conceal one frame and hold its playout point, which adds 20 ms of delay where the network
    /// needs it; a window with spare depth gives it back.
    pub target_delay: Duration,
    /// Most packets held (a sequence-number window); further-ahead packets push the oldest out.
    /// Clamped to 2..=[`MAX_CAPACITY_FRAMES`]. Default 50 (1 s).
    pub capacity_frames: usize,
    /// Most audio held after a release; beyond it the oldest frames are dropped at once, so a
    /// burst after a stall cannot leave the call permanently late. Default 200 ms.
    pub max_delay: Duration,
    /// With nothing buffered and no packet for this long, the stream goes idle: no more
    /// concealment until the next packet, which restarts it cleanly. Default 200 ms.
    pub idle_after: Duration,
    /// A sequence jump larger than this many packets (either way) is a sender restart: the buffer
    /// is cleared and the stream restarts at the new packet. Default 100 (2 s).
    pub resync_frames: u64,
}

impl Default for PlayoutConfig {
    fn default() -> Self {
        Self {
            target_delay: Duration::from_millis(10),
            capacity_frames: 50,
            max_delay: Duration::from_millis(200),
            idle_after: Duration::from_millis(200),
            resync_frames: 100,
        }
    }
}

/// What to do for the next 20 ms frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Playout {
    /// Decode this packet.
    Packet(Bytes),
    /// This frame was lost but the next packet has arrived: decode this frame from that packet's
    /// in-band FEC (Opus `decode_fec`). The same packet is released as [`Playout::Packet`] next.
    Fec(Bytes),
    /// Nothing to decode: conceal (codec PLC).
    Conceal,
}

/// Counters since the buffer was made; every pushed packet ends in exactly one of `played`,
/// `late`, `duplicates` or `overflow_dropped`, or is still held ([`PlayoutBuffer::buffered`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlayoutStats {
    /// Packets pushed.
    pub received: u64,
    /// Packets released as [`Playout::Packet`].
    pub played: u64,
    /// Packets behind the playout point on arrival (their frame was already played, recovered or
    /// given up on), dropped.
    pub late: u64,
    /// Copies of a packet still held, dropped.
    pub duplicates: u64,
    /// Frames passed over without their packet (a later packet had arrived, or the window moved).
    pub lost: u64,
    /// [`Playout::Conceal`] released (losses without FEC, and underruns).
    pub concealed: u64,
    /// [`Playout::Fec`] released.
    pub fec_recovered: u64,
    /// Held packets dropped to bound the buffer or its delay, or by a resync.
    pub overflow_dropped: u64,
    /// Restarts on a sequence jump.
    pub resyncs: u64,
}

/// The playout buffer of one stream.
#[derive(Debug)]
pub struct PlayoutBuffer {
    config: PlayoutConfig,
    state: State,
    /// Ring of held packets, indexed by extended sequence modulo its length; each slot keeps its
    /// extended sequence to tell a duplicate from a stale occupant.
    slots: Vec<Option<(u64, Bytes, Instant)>>,
    /// Packets held.
    held: usize,
    /// Extended sequence of the next frame to release.
    next_seq: u64,
    /// Highest extended sequence seen since the stream (re)started; the reference for extension.
    highest: u64,
    /// Whether any packet was ever seen (else `highest` means nothing).
    seen: bool,
    last_arrival: Option<Instant>,
    /// Smallest depth seen at a release in the current shrink window, and releases in it.
    window_min_depth: u64,
    /// Shortest wait of a played packet (release time − arrival) in the current window; an
    /// underrun or a loss makes it zero.
    window_min_slack: Duration,
    window_frames: u32,
    stats: PlayoutStats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No stream: no output until a packet arrives.
    Idle,
    /// Waiting out the target delay before the first release.
    Buffering { start_at: Instant },
    /// Releasing one frame per [`FRAME`]; the next is due then.
    Playing { next_due: Instant },
}

impl Default for PlayoutBuffer {
    fn default() -> Self {
        Self::new(PlayoutConfig::default())
    }
}

impl PlayoutBuffer {
    /// An idle buffer with `config` (capacity clamped to 2..=[`MAX_CAPACITY_FRAMES`]).
    pub fn new(config: PlayoutConfig) -> Self {
        let capacity = config.capacity_frames.clamp(2, MAX_CAPACITY_FRAMES);
        Self {
            config: PlayoutConfig { capacity_frames: capacity, ..config },
            state: State::Idle,
            slots: vec![None; capacity],
            held: 0,
            next_seq: EXT_BASE,
            highest: EXT_BASE,
            seen: false,
            last_arrival: None,
            window_min_depth: u64::MAX,
            window_min_slack: Duration::MAX,
            window_frames: 0,
            stats: PlayoutStats::default(),
        }
    }

    /// Takes in one packet with RTP sequence number `seq` that arrived at `now`.
    pub fn push(&mut self, now: Instant, seq: u16, payload: Bytes) {
        self.stats.received += 1;
        self.last_arrival = Some(now);
        let ext = self.extend(seq);
        if self.state == State::Idle {
            self.restart(now, ext);
        } else if ext > self.highest.saturating_add(self.config.resync_frames)
            || ext.saturating_add(self.config.resync_frames) < self.next_seq
        {
            self.stats.resyncs += 1;
            self.restart(now, ext);
        } else if ext < self.next_seq {
            let buffering = matches!(self.state, State::Buffering { .. });
            if buffering && self.highest - ext < self.capacity() {
                // Reordered before playback began: start from the earlier packet instead.
                self.next_seq = ext;
            } else {
                self.stats.late += 1;
                return;
            }
        }
        if ext >= self.next_seq + self.capacity() {
            // Too far ahead to hold: drop the oldest frames until it fits.
            let new_next = ext + 1 - self.capacity();
            self.skip_to(new_next);
        }
        let i = self.index(ext);
        match &self.slots[i] {
            Some((held, _, _)) if *held == ext => {
                self.stats.duplicates += 1;
                return;
            }
            Some(_) => {
                // A stale occupant cannot remain once the window moved past it (`skip_to` and
                // `restart` clear what they pass), but count it rather than trust that.
                self.stats.overflow_dropped += 1;
                self.held -= 1;
            }
            None => {}
        }
        self.slots[i] = Some((ext, payload, now));
        self.held += 1;
        self.highest = self.highest.max(ext);
    }

    /// The next frame's instruction, if one is due at `now`; call again until `None`, then wait
    /// until [`Self::poll_timeout`].
    pub fn poll(&mut self, now: Instant) -> Option<Playout> {
        let due = match self.state {
            State::Idle => return None,
            State::Buffering { start_at } => start_at,
            State::Playing { next_due } => next_due,
        };
        if now < due {
            return None;
        }
        let empty = self.depth() == 0;
        let quiet = self.last_arrival.is_none_or(|t| now.saturating_duration_since(t) >= self.config.idle_after);
        if empty && quiet {
            self.state = State::Idle;
            return None;
        }
        self.state = State::Playing { next_due: due.checked_add(FRAME).unwrap_or(due) };
        if empty {
            // Underrun: nothing to lose yet, so the playout point stays where it is.
            self.stats.concealed += 1;
            self.window_min_depth = 0;
            self.window_min_slack = Duration::ZERO;
            self.end_of_frame();
            return Some(Playout::Conceal);
        }
        self.trim(due);
        self.window_min_depth = self.window_min_depth.min(self.depth());
        let out = match self.take_timed(self.next_seq) {
            Some((packet, arrived)) => {
                self.stats.played += 1;
                self.window_min_slack = self.window_min_slack.min(due.saturating_duration_since(arrived));
                Playout::Packet(packet)
            }
            None => {
                self.window_min_slack = Duration::ZERO;
                self.stats.lost += 1;
                match self.peek(self.next_seq + 1).cloned() {
                    Some(next) => {
                        self.stats.fec_recovered += 1;
                        Playout::Fec(next)
                    }
                    None => {
                        self.stats.concealed += 1;
                        Playout::Conceal
                    }
                }
            }
        };
        self.next_seq += 1;
        self.end_of_frame();
        Some(out)
    }

    /// When [`Self::poll`] next has something (or a state change) to give; `None` when idle.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Idle => None,
            State::Buffering { start_at } => Some(start_at),
            State::Playing { next_due } => Some(next_due),
        }
    }

    /// Counters since the buffer was made.
    pub fn stats(&self) -> PlayoutStats {
        self.stats
    }

    /// Packets held now.
    pub fn buffered(&self) -> usize {
        self.held
    }

    /// Whether the buffer is idle (no stream, or it stopped).
    pub fn is_idle(&self) -> bool {
        self.state == State::Idle
    }

    /// The configuration in force (capacity after clamping).
    pub fn config(&self) -> PlayoutConfig {
        self.config
    }

    fn capacity(&self) -> u64 {
        self.slots.len() as u64
    }

    fn index(&self, ext: u64) -> usize {
        // The remainder is below the slot count, a usize.
        (ext % self.capacity()) as usize
    }

    /// Frames from the playout point to the newest packet held, inclusive (0 when none is ahead).
    fn depth(&self) -> u64 {
        if self.held == 0 {
            0
        } else {
            (self.highest + 1).saturating_sub(self.next_seq)
        }
    }

    /// Extends a 16-bit sequence number to the extended value nearest the highest seen.
    fn extend(&self, seq: u16) -> u64 {
        if !self.seen {
            return EXT_BASE + u64::from(seq);
        }
        // `highest` was once a 16-bit value plus a multiple of 2^16, so this is the signed
        // distance from it, in -32768..=32767.
        let delta = i64::from(seq.wrapping_sub(self.highest as u16) as i16);
        self.highest.saturating_add_signed(delta)
    }

    /// Clears everything held and starts a stream at `ext`, first release after the target delay.
    fn restart(&mut self, now: Instant, ext: u64) {
        self.clear_held();
        self.seen = true;
        self.next_seq = ext;
        self.highest = ext;
        self.window_min_depth = u64::MAX;
        self.window_min_slack = Duration::MAX;
        self.window_frames = 0;
        let start_at = now.checked_add(self.config.target_delay).unwrap_or(now);
        // A restart while playing never brings the next release forward: the stream never runs
        // faster than real time, whatever its sequence numbers do.
        let start_at = match self.state {
            State::Playing { next_due } => start_at.max(next_due),
            State::Buffering { start_at: earlier } => start_at.max(earlier),
            State::Idle => start_at,
        };
        self.state = State::Buffering { start_at };
    }

    fn clear_held(&mut self) {
        for slot in &mut self.slots {
            if slot.take().is_some() {
                self.stats.overflow_dropped += 1;
            }
        }
        self.held = 0;
    }

    /// Moves the playout point to `new_next`, dropping (and counting) what it passes.
    fn skip_to(&mut self, new_next: u64) {
        if new_next.saturating_sub(self.next_seq) >= self.capacity() {
            // Everything held is passed; count the rest as lost without walking the gap.
            let passed = new_next - self.next_seq;
            let held = self.held as u64;
            self.clear_held();
            self.stats.lost += passed - held;
        } else {
            while self.next_seq < new_next {
                if self.take(self.next_seq).is_some() {
                    self.stats.overflow_dropped += 1;
                } else {
                    self.stats.lost += 1;
                }
                self.next_seq += 1;
            }
        }
        self.next_seq = self.next_seq.max(new_next);
        self.highest = self.highest.max(self.next_seq.saturating_sub(1));
    }

    /// Gives back delay: at once above `max_delay`; after a whole window in which the buffer never
    /// ran below its target, one frame (by releasing the next frame at once when every packet
    /// waited a frame longer than the target, else by dropping one when a frame was always queued).
    fn trim(&mut self, due: Instant) {
        let max_frames = (self.config.max_delay.as_millis() / FRAME.as_millis()).max(1) as u64;
        let depth = self.depth();
        // A target above `max_delay` raises the ceiling to it (the operator asked for that delay).
        let max_frames = max_frames.max(self.target_frames().saturating_add(1));
        if depth > max_frames.saturating_add(1) {
            let target = self.target_frames().saturating_add(1);
            self.skip_to(self.next_seq + depth.saturating_sub(target));
        } else if self.window_frames >= SHRINK_WINDOW_FRAMES {
            let spare = self.config.target_delay.saturating_add(FRAME);
            if self.window_min_slack != Duration::MAX && self.window_min_slack >= spare {
                // Every packet of the window waited a frame longer than the target: the delay grew
                // for lateness that has passed. The clock moves a frame earlier (the frame after
                // this one goes out at once), giving the delay back without dropping audio.
                self.state = State::Playing { next_due: due };
            } else if self.window_min_depth > self.target_frames() + 1 && depth > 1 {
                self.skip_to(self.next_seq + 1);
            }
            self.window_min_depth = u64::MAX;
            self.window_min_slack = Duration::MAX;
            self.window_frames = 0;
        }
    }

    fn target_frames(&self) -> u64 {
        (self.config.target_delay.as_millis() / FRAME.as_millis()) as u64
    }

    fn end_of_frame(&mut self) {
        self.window_frames = self.window_frames.saturating_add(1);
    }

    fn take(&mut self, ext: u64) -> Option<Bytes> {
        self.take_timed(ext).map(|(packet, _)| packet)
    }

    /// The packet `ext` and when it arrived.
    fn take_timed(&mut self, ext: u64) -> Option<(Bytes, Instant)> {
        let i = self.index(ext);
        match self.slots[i].take() {
            Some((held, packet, arrived)) if held == ext => {
                self.held -= 1;
                Some((packet, arrived))
            }
            other => {
                self.slots[i] = other;
                None
            }
        }
    }

    fn peek(&self, ext: u64) -> Option<&Bytes> {
        match &self.slots[self.index(ext)] {
            Some((held, packet, _)) if *held == ext => Some(packet),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configuration these tests were written for: a 40 ms target (two frames).
    fn forty() -> PlayoutConfig {
        PlayoutConfig { target_delay: Duration::from_millis(40), ..PlayoutConfig::default() }
    }
    use proptest::prelude::*;

    fn origin() -> Instant {
        #[allow(clippy::disallowed_methods)] // The virtual clock's origin; tests add offsets to it.
        Instant::now()
    }

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn pkt(seq: u16) -> Bytes {
        Bytes::copy_from_slice(&seq.to_be_bytes())
    }

    /// Everything due at `now`.
    fn drain(p: &mut PlayoutBuffer, now: Instant) -> Vec<Playout> {
        std::iter::from_fn(|| p.poll(now)).collect()
    }

    /// One late packet makes the buffer conceal a frame and hold its place (20 ms more delay);
    /// once the lateness has passed for a window, the clock moves back a frame and the packets
    /// wait the target again, with no audio dropped.
    #[test]
    fn lateness_delay_is_given_back_without_loss() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(PlayoutConfig::default());
        // Packet i is released at `release[i]`; waiting time = release − arrival.
        let mut release = std::collections::HashMap::new();
        let mut arrival = std::collections::HashMap::new();
        let mut now = t0;
        let mut next_packet = 0u16;
        while now <= at(t0, 4000) {
            let due_ms = u64::from(next_packet) * 20 + if next_packet == 20 { 15 } else { 0 };
            if next_packet < 200 && now >= at(t0, due_ms) {
                p.push(now, next_packet, pkt(next_packet));
                arrival.insert(next_packet, now);
                next_packet += 1;
            }
            while let Some(out) = p.poll(now) {
                if let Playout::Packet(b) = out {
                    release.insert(u16::from_be_bytes([b[0], b[1]]), now);
                }
            }
            now += Duration::from_millis(1);
        }
        let wait = |i: u16| release[&i].duration_since(arrival[&i]).as_millis();
        let missing: Vec<u16> = (0..200).filter(|i| !release.contains_key(i)).collect();
        assert!(missing.is_empty(), "every packet was played, missing {missing:?}, stats {:?}", p.stats());
        assert_eq!(p.stats().concealed, 1, "one frame concealed for the late packet");
        assert!((9..=11).contains(&wait(10)), "before: the target ({} ms)", wait(10));
        assert!(wait(30) >= 25, "after the late packet the delay grew ({} ms)", wait(30));
        assert!((9..=11).contains(&wait(150)), "later it is back at the target ({} ms)", wait(150));
    }

    /// A target delay above `max_delay` (an operator's `--playout-delay`) is honoured, and a burst
    /// before the first release does not underflow the trim (found by fuzzing).
    #[test]
    fn target_above_max_delay() {
        let t0 = origin();
        let config = PlayoutConfig { target_delay: Duration::from_millis(300), ..PlayoutConfig::default() };
        let mut p = PlayoutBuffer::new(config);
        for seq in 0..15u16 {
            p.push(t0, seq, pkt(seq));
        }
        assert!(drain(&mut p, at(t0, 299)).is_empty());
        assert_eq!(drain(&mut p, at(t0, 300)).len(), 1, "the first frame after the 300 ms target");
    }

    /// A sender restart (a sequence jump) while playing never brings the next release forward: the
    /// stream never plays faster than real time (found by fuzzing).
    #[test]
    fn resync_never_speeds_up() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(forty());
        let mut released = 0;
        for i in 0..10u16 {
            p.push(at(t0, u64::from(i) * 20), i, pkt(i));
            released += drain(&mut p, at(t0, u64::from(i) * 20)).len();
        }
        // A jump far ahead, pushed just after a release: the restart keeps the schedule.
        p.push(at(t0, 181), 5000, pkt(5000));
        for ms in 181..=400 {
            released += drain(&mut p, at(t0, ms)).len();
            assert!(released as u64 <= ms / 20 + 1, "{released} frames by {ms} ms");
        }
    }

    /// In-order packets every 20 ms come out in order after the target delay, one per 20 ms.
    #[test]
    fn steady_stream() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(forty());
        assert_eq!(p.poll_timeout(), None);
        let mut out = Vec::new();
        for i in 0..100u16 {
            let now = at(t0, u64::from(i) * 20);
            p.push(now, i, pkt(i));
            if i == 0 {
                assert_eq!(p.poll_timeout(), Some(at(t0, 40)));
            }
            let got = drain(&mut p, now);
            assert!(got.len() <= 1);
            out.extend(got);
        }
        assert_eq!(out.len(), 98, "two frames still held: the 40 ms target");
        for (i, o) in out.iter().enumerate() {
            assert_eq!(o, &Playout::Packet(pkt(i as u16)));
        }
        let s = p.stats();
        assert_eq!((s.received, s.played, s.lost, s.concealed, s.late), (100, 98, 0, 0, 0));
    }

    /// Packets swapped within the window are released in sequence order.
    #[test]
    fn reorders() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(forty());
        let order = [0u16, 2, 1, 3, 5, 4, 6, 7, 8, 9];
        let mut out = Vec::new();
        for (i, &seq) in order.iter().enumerate() {
            let now = at(t0, i as u64 * 20);
            p.push(now, seq, pkt(seq));
            out.extend(drain(&mut p, now));
        }
        // The last is due at 40 + 9 × 20 ms.
        out.extend(drain(&mut p, at(t0, 220)));
        let seqs: Vec<Playout> = (0..10).map(|s| Playout::Packet(pkt(s))).collect();
        assert_eq!(out, seqs);
    }

    /// A lost packet whose successor has arrived is recovered by FEC from it; a lost packet with
    /// nothing after it is concealed; and a packet that comes after its frame is late.
    #[test]
    fn loss_fec_and_late() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(forty());
        for seq in [0u16, 2, 3] {
            p.push(t0, seq, pkt(seq));
        }
        assert_eq!(drain(&mut p, at(t0, 40)), vec![Playout::Packet(pkt(0))]);
        assert_eq!(drain(&mut p, at(t0, 60)), vec![Playout::Fec(pkt(2))]);
        p.push(at(t0, 61), 1, pkt(1));
        assert_eq!(drain(&mut p, at(t0, 80)), vec![Playout::Packet(pkt(2))]);
        // 4 lost, 5 and 6 lost too, 7 arrives: 4, 5 concealed, 6 from FEC of 7.
        p.push(at(t0, 81), 7, pkt(7));
        let got = drain(&mut p, at(t0, 180));
        assert_eq!(
            got,
            vec![
                Playout::Packet(pkt(3)),
                Playout::Conceal,
                Playout::Conceal,
                Playout::Fec(pkt(7)),
                Playout::Packet(pkt(7))
            ]
        );
        let s = p.stats();
        assert_eq!((s.late, s.lost, s.fec_recovered, s.concealed, s.played), (1, 4, 2, 2, 4));
    }

    /// Duplicates of a held packet are counted and dropped; copies of played packets are late.
    #[test]
    fn duplicates() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(forty());
        p.push(t0, 10, pkt(10));
        p.push(t0, 10, pkt(10));
        p.push(t0, 11, pkt(11));
        assert_eq!(drain(&mut p, at(t0, 40)), vec![Playout::Packet(pkt(10))]);
        p.push(at(t0, 41), 10, pkt(10));
        let s = p.stats();
        assert_eq!((s.duplicates, s.late, s.received), (1, 1, 4));
        assert_eq!(p.buffered(), 1);
    }

    /// A stream that stops conceals briefly, goes idle, and restarts cleanly on its next packet.
    #[test]
    fn idle_and_restart() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(forty());
        for i in 0..5u16 {
            p.push(at(t0, u64::from(i) * 20), i, pkt(i));
        }
        let mut conceals = 0;
        let mut t = 40;
        while let Some(due) = p.poll_timeout() {
            assert!(due <= at(t0, 1000), "never went idle");
            t = t.max(due.duration_since(t0).as_millis() as u64);
            for o in drain(&mut p, at(t0, t)) {
                if o == Playout::Conceal {
                    conceals += 1;
                }
            }
        }
        assert!(p.is_idle());
        // Last packet at 80 ms, idle 200 ms later; released up to 120 ms, concealed until 280.
        assert!((1..=10).contains(&conceals), "{conceals} concealments before idle");
        assert_eq!(drain(&mut p, at(t0, 5000)), vec![]);
        // A DTX sender resumes with the next sequence number much later.
        p.push(at(t0, 5000), 5, pkt(5));
        assert_eq!(p.poll_timeout(), Some(at(t0, 5040)));
        assert_eq!(drain(&mut p, at(t0, 5039)), vec![]);
        assert_eq!(drain(&mut p, at(t0, 5040)), vec![Playout::Packet(pkt(5))]);
        assert_eq!(p.stats().late, 0);
        assert_eq!(p.stats().lost, 0);
    }

    /// A short pause with continuous sequence numbers (DTX, a muted sender) is concealed without
    /// moving the playout point, so the resumed packets are not late.
    #[test]
    fn pause_is_not_loss() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(forty());
        p.push(t0, 0, pkt(0));
        assert_eq!(drain(&mut p, at(t0, 40)), vec![Playout::Packet(pkt(0))]);
        assert_eq!(drain(&mut p, at(t0, 120)), vec![Playout::Conceal; 4]);
        p.push(at(t0, 130), 1, pkt(1));
        assert_eq!(drain(&mut p, at(t0, 140)), vec![Playout::Packet(pkt(1))]);
        let s = p.stats();
        assert_eq!((s.late, s.lost, s.concealed), (0, 0, 4));
    }

    /// A huge sequence jump (sender restart) resynchronises instead of concealing the gap.
    #[test]
    fn jump_resyncs() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(forty());
        for i in 0..4u16 {
            p.push(at(t0, u64::from(i) * 20), i, pkt(i));
        }
        drain(&mut p, at(t0, 60));
        p.push(at(t0, 80), 30_000, pkt(30_000));
        p.push(at(t0, 100), 30_001, pkt(30_001));
        // Restarted with its own target delay: first release at 80 + 40 ms.
        assert_eq!(drain(&mut p, at(t0, 119)), vec![]);
        let got = drain(&mut p, at(t0, 140));
        assert_eq!(got, vec![Playout::Packet(pkt(30_000)), Playout::Packet(pkt(30_001))]);
        let s = p.stats();
        assert_eq!(s.resyncs, 1);
        assert!(s.lost < 5);
        // Backwards too.
        p.push(at(t0, 220), 7, pkt(7));
        assert_eq!(p.stats().resyncs, 2);
        assert_eq!(drain(&mut p, at(t0, 260)), vec![Playout::Packet(pkt(7))]);
    }

    /// A packet too far ahead for the window pushes the oldest out, counted.
    #[test]
    fn overflow_drops_oldest() {
        let t0 = origin();
        let config = PlayoutConfig { capacity_frames: 4, ..forty() };
        let mut p = PlayoutBuffer::new(config);
        for seq in 0..4u16 {
            p.push(t0, seq, pkt(seq));
        }
        p.push(t0, 5, pkt(5));
        assert_eq!(p.buffered(), 3, "0 and 1 pushed out; 2, 3, 5 held");
        let s = p.stats();
        assert_eq!((s.overflow_dropped, s.lost), (2, 0));
        assert_eq!(drain(&mut p, at(t0, 40)), vec![Playout::Packet(pkt(2))]);
    }

    /// A burst after a stall is trimmed back to the target when it exceeds the maximum delay, and
    /// smaller excess is given back one frame per second, without dropping audio.
    #[test]
    fn delay_is_given_back() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(forty());
        p.push(t0, 0, pkt(0));
        assert_eq!(drain(&mut p, at(t0, 40)), vec![Playout::Packet(pkt(0))]);
        // A 160 ms stall (concealed, playout point held) then 20 packets at once: 400 ms held.
        for t in (60..=180).step_by(20) {
            assert_eq!(drain(&mut p, at(t0, t)), vec![Playout::Conceal]);
        }
        for seq in 1..=20u16 {
            p.push(at(t0, 190), seq, pkt(seq));
        }
        let got = drain(&mut p, at(t0, 200));
        assert_eq!(got.len(), 1);
        assert!(matches!(got[0], Playout::Packet(_)));
        assert_eq!(p.buffered(), 2, "trimmed back to the 40 ms target");
        assert!(p.stats().overflow_dropped >= 15);
        // Now a steady stream with 100 ms of extra delay: shrinks by a frame per second.
        let mut p = PlayoutBuffer::new(forty());
        for i in 0..6u16 {
            p.push(t0, i, pkt(i));
        }
        for i in 6..400u16 {
            let now = at(t0, u64::from(i - 5) * 20);
            p.push(now, i, pkt(i));
            drain(&mut p, now);
        }
        assert!(p.buffered() <= 3, "{} held after 8 s", p.buffered());
        // Mostly by moving the clock; a drop only where the excess was under a frame of slack.
        assert!(p.stats().overflow_dropped <= 1, "{:?}", p.stats());
    }

    /// Sequence numbers wrap from 65535 to 0 without loss or reordering.
    #[test]
    fn wraps() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(forty());
        let mut out = Vec::new();
        for i in 0..20u16 {
            let seq = 65530u16.wrapping_add(i);
            let now = at(t0, u64::from(i) * 20);
            p.push(now, seq, pkt(seq));
            out.extend(drain(&mut p, now));
        }
        let expected: Vec<Playout> = (0..18u16).map(|i| Playout::Packet(pkt(65530u16.wrapping_add(i)))).collect();
        assert_eq!(out, expected);
        assert_eq!(p.stats().resyncs, 0);
    }

    /// Time going backwards, or an Instant far in the future, does not panic.
    #[test]
    fn odd_times() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(forty());
        p.push(at(t0, 1000), 1, pkt(1));
        assert_eq!(p.poll(t0), None);
        p.push(t0, 2, pkt(2));
        assert_eq!(drain(&mut p, at(t0, 1040)), vec![Playout::Packet(pkt(1))]);
        let mut p = PlayoutBuffer::new(PlayoutConfig { target_delay: Duration::MAX, ..forty() });
        p.push(t0, 0, pkt(0));
        assert_eq!(p.poll(t0), Some(Playout::Packet(pkt(0))), "an unrepresentable delay means none");
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// Advance the clock and push the next packet of the schedule (or a chosen one).
        Push { gap_ms: u8, seq_offset: i16 },
        /// Advance the clock and drain.
        Poll { gap_ms: u8 },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u8..40, -3i16..4).prop_map(|(gap_ms, seq_offset)| Step::Push { gap_ms, seq_offset }),
            1 => (0u8..40, -40i16..40).prop_map(|(gap_ms, seq_offset)| Step::Push { gap_ms, seq_offset }),
            3 => (0u8..60).prop_map(|gap_ms| Step::Poll { gap_ms }),
        ]
    }

    proptest! {
        /// Every packet pushed is played exactly once or counted (late, duplicate, dropped), or is
        /// still held; nothing is played twice; releases never outrun the clock.
        #[test]
        fn accounting(start in any::<u16>(), steps in proptest::collection::vec(step(), 0..400), cap in 2usize..60) {
            let t0 = origin();
            let mut p = PlayoutBuffer::new(PlayoutConfig { capacity_frames: cap, ..forty() });
            let (mut now_ms, mut next) = (0u64, start);
            let mut first_push: Option<u64> = None;
            let mut released = 0u64;
            let mut played: Vec<(u32, u16)> = Vec::new();
            let mut id = 0u32;
            for s in steps {
                match s {
                    Step::Push { gap_ms, seq_offset } => {
                        now_ms += u64::from(gap_ms);
                        let seq = next.wrapping_add(seq_offset as u16);
                        next = next.wrapping_add(1);
                        first_push.get_or_insert(now_ms);
                        // Payload: a unique id plus the sequence number.
                        let mut b = id.to_be_bytes().to_vec();
                        b.extend_from_slice(&seq.to_be_bytes());
                        id += 1;
                        p.push(at(t0, now_ms), seq, Bytes::from(b));
                    }
                    Step::Poll { gap_ms } => {
                        now_ms += u64::from(gap_ms);
                        while let Some(o) = p.poll(at(t0, now_ms)) {
                            released += 1;
                            let elapsed = now_ms - first_push.unwrap_or(now_ms);
                            prop_assert!(released <= elapsed / 20 + 1, "{} released in {} ms", released, elapsed);
                            if let Playout::Packet(b) = o {
                                let pid = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                                prop_assert!(played.iter().all(|(q, _)| *q != pid), "packet {} played twice", pid);
                                played.push((pid, u16::from_be_bytes([b[4], b[5]])));
                            }
                        }
                    }
                }
                prop_assert!(p.buffered() <= cap);
            }
            let s = p.stats();
            prop_assert_eq!(s.played, played.len() as u64);
            prop_assert_eq!(s.received, s.played + s.late + s.duplicates + s.overflow_dropped + p.buffered() as u64);
            prop_assert_eq!(s.concealed + s.fec_recovered + s.played, released);
        }

        /// Without loss or reordering, every packet plays in order across the 16-bit wrap.
        #[test]
        fn in_order_across_wrap(start in 65000u16.., n in 1usize..1200) {
            let t0 = origin();
            let mut p = PlayoutBuffer::new(forty());
            let mut out = Vec::new();
            for i in 0..n {
                let seq = start.wrapping_add(i as u16);
                let now = at(t0, i as u64 * 20);
                p.push(now, seq, pkt(seq));
                out.extend(std::iter::from_fn(|| p.poll(now)));
            }
            // The last is due 40 ms after it arrived.
            out.extend(std::iter::from_fn(|| p.poll(at(t0, (n as u64 - 1) * 20 + 40))));
            prop_assert_eq!(out.len(), n);
            for (i, o) in out.iter().enumerate() {
                prop_assert_eq!(o, &Playout::Packet(pkt(start.wrapping_add(i as u16))));
            }
        }
    }
}
