//! Playout (jitter) buffer for one incoming RTP audio stream whose packets may hold any duration
//! (Opus: 2.5 to 120 ms, RFC 7587, changing mid-stream): orders packets by RTP timestamp within a
//! bounded window, then releases audio in steps of one 20 ms output frame after a target delay,
//! saying for each piece of the stream whether to decode a packet, recover a gap from the next
//! packet's FEC, or conceal it, each piece sized in samples of the 48 kHz RTP clock.
//!
//! Codec-agnostic: payloads are opaque [`Bytes`] whose duration the caller reads (Opus: from the
//! TOC byte) and passes in. Timestamps are extended to 64 bits, so the 32-bit wrap is invisible; a
//! jump of more than [`PlayoutConfig::resync_frames`] frames (a sender restart) starts the stream
//! afresh instead of concealing the gap. A gap in the timestamps is concealed as loss only once a
//! later packet has arrived, and then exactly its length; when nothing at all is buffered (the
//! sender paused, DTX, or a network stall) the buffer conceals without moving its playout point,
//! so a resumed stream is not late (and a gap before it that such concealment already played is
//! not concealed twice), and after [`PlayoutConfig::idle_after`] without packets it goes quiet
//! until the next. Delay grown by stalls is given back: above [`PlayoutConfig::max_delay`] at
//! once, and one frame per second while the buffer never ran below its target for a whole second.
//!
//! Invariant: sans-IO (time is passed in, never read); at most `capacity_frames` packets held, no
//! allocation after construction; [`Playout::Frame`]s released never outrun real time (≤ 1 +
//! elapsed / 20 ms since the first packet, plus one per underrun: delay added, then given back), and the audio released before each one covers every
//! frame so far; no panics on any sequence of inputs, including time going backwards.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// The duration of one released frame (the engine's output step).
pub const FRAME: Duration = Duration::from_millis(20);

/// Samples of one released frame at the 48 kHz RTP clock.
pub const FRAME_SAMPLES: u32 = 960;

/// The longest packet a duration may claim (120 ms, Opus's longest, RFC 6716 §3.2.5); longer
/// claims are clamped to it, and a zero duration is read as one sample.
pub const MAX_PACKET_SAMPLES: u32 = 5760;

/// The most packets any buffer holds, whatever its configuration asks for.
pub const MAX_CAPACITY_FRAMES: usize = 1000;

/// Played frames per delay-shrinking window (one second).
const SHRINK_WINDOW_FRAMES: u32 = 50;

/// A packet starting this close (2.5 ms, Opus's shortest frame) to the playout point is at it: a
/// sender whose timestamps are a few samples off its packets' durations is followed, not
/// concealed around.
const SNAP: u64 = 120;

/// Samples per millisecond of the 48 kHz RTP clock.
const SAMPLES_PER_MS: u64 = 48;

/// Extended timestamps start here, so a backward step from the first packet cannot underflow.
const EXT_BASE: u64 = 1 << 40;

/// How a [`PlayoutBuffer`] trades delay against loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlayoutConfig {
    /// Delay from the first packet of a (re)started stream to its first released frame (plus,
    /// for packets shorter than a frame, the time the rest of that frame takes to arrive): the
    /// jitter absorbed without a concealed frame. Default 10 ms: later packets make the buffer
    /// conceal and hold its playout point, which adds delay where the network needs it; a window
    /// with spare depth gives it back.
    pub target_delay: Duration,
    /// Most packets held, and the span of audio (this many 20 ms frames) held ahead of the
    /// playout point; further-ahead packets push the oldest out. Clamped to
    /// 2..=[`MAX_CAPACITY_FRAMES`]. Default 50 (1 s).
    pub capacity_frames: usize,
    /// Most audio held after a release; beyond it the oldest packets are dropped at once, so a
    /// burst after a stall cannot leave the call permanently late. Default 200 ms.
    pub max_delay: Duration,
    /// With nothing buffered and no packet for this long, the stream goes idle: no more
    /// concealment until the next packet, which restarts it cleanly. Default 200 ms.
    pub idle_after: Duration,
    /// A timestamp jump larger than this many 20 ms frames (either way) is a sender restart: the
    /// buffer is cleared and the stream restarts at the new packet. Default 100 (2 s).
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

/// What to do next: decode, recover or conceal a piece of the stream, or emit a frame.
///
/// Each 20 ms step releases pieces until the audio released covers the step, then
/// [`Playout::Frame`]: the consumer decodes the pieces in order into a queue and takes one 20 ms
/// frame from it at each `Frame`. A 60 ms packet covers three steps (the next two release only
/// their `Frame`); two 10 ms packets make one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Playout {
    /// Decode this packet, all of it: `samples` of audio (at 48 kHz), the duration given when it
    /// was pushed.
    Packet {
        /// The packet.
        payload: Bytes,
        /// Its duration at 48 kHz.
        samples: u32,
    },
    /// `samples` (at most one frame) were lost just before this packet, which has arrived:
    /// recover them from its in-band FEC (Opus `decode_fec`). The same packet is released as
    /// [`Playout::Packet`] next.
    Fec {
        /// The packet after the gap.
        next: Bytes,
        /// The length of the gap's part recovered, at 48 kHz.
        samples: u32,
    },
    /// Nothing to decode for `samples` (at 48 kHz): conceal them (codec PLC).
    Conceal {
        /// How much to conceal, at 48 kHz.
        samples: u32,
    },
    /// One 20 ms frame is due now: the pieces released so far cover it.
    Frame,
}

/// Counters since the buffer was made; every pushed packet ends in exactly one of `played`,
/// `late`, `duplicates` or `overflow_dropped`, or is still held ([`PlayoutBuffer::buffered`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlayoutStats {
    /// Packets pushed.
    pub received: u64,
    /// Packets released as [`Playout::Packet`].
    pub played: u64,
    /// Packets behind the playout point (their audio was already played, recovered or given up
    /// on), dropped.
    pub late: u64,
    /// Copies of a packet still held (the same timestamp), dropped.
    pub duplicates: u64,
    /// Pieces of a gap (each at most a frame) concealed or recovered because their packet never
    /// came while a later one had, plus frames passed over without their packet, plus the frames
    /// of an underrun that a sequence-number gap shows were lost rather than paused (DTX).
    pub lost: u64,
    /// [`Playout::Conceal`] released (losses without FEC, and underruns).
    pub concealed: u64,
    /// [`Playout::Fec`] released.
    pub fec_recovered: u64,
    /// Held packets dropped to bound the buffer or its delay, or by a resync.
    pub overflow_dropped: u64,
    /// Restarts on a timestamp jump.
    pub resyncs: u64,
    /// [`Playout::Conceal`] released with nothing held (an underrun: the playout point held, so
    /// each adds up to a frame of delay that a window with spare depth may give back).
    pub underruns: u64,
}

/// The playout buffer of one stream.
#[derive(Debug)]
pub struct PlayoutBuffer {
    config: PlayoutConfig,
    state: State,
    /// The due time of the step being released (its pieces went out, its `Frame` not yet).
    open: Option<Instant>,
    /// Held packets in timestamp order; its capacity is reserved at construction.
    held: VecDeque<Held>,
    /// Extended timestamp where the audio released so far ends: the next piece starts here.
    play_ts: u64,
    /// Samples the open step still needs (positive), or audio already released for the steps
    /// ahead (negative: the rest of a packet longer than a frame). The consumer's queue holds
    /// exactly this surplus, so it is kept across restarts and idle periods.
    owed: i64,
    /// Samples concealed by underruns since a packet was last played: a gap found before the next
    /// packet is first set against this (that time was already played), then concealed.
    credit: u64,
    /// RTP sequence number of the packet last played: the packet after an underrun tells a loss
    /// (its number is not the next) from a pause or DTX (it is). `None` after a (re)start.
    last_seq: Option<u16>,
    /// Highest extended timestamp seen since the stream (re)started; the reference for extension.
    highest: u64,
    /// Whether any packet was ever seen (else `highest` means nothing).
    seen: bool,
    last_arrival: Option<Instant>,
    /// Arrival of the first packet ever pushed, and the frames released since: the clock is never
    /// moved earlier than real time since the first packet, plus the underruns' added delay.
    first_arrival: Option<Instant>,
    frames_out: u64,
    /// Smallest depth (samples held beyond the step) seen at a step in the current shrink window.
    window_min_depth: i64,
    /// Shortest wait of a played packet (release time − arrival) in the current window; an
    /// underrun or a loss makes it zero.
    window_min_slack: Duration,
    window_frames: u32,
    stats: PlayoutStats,
}

/// One packet held.
#[derive(Debug)]
struct Held {
    /// Extended RTP timestamp.
    ts: u64,
    /// RTP sequence number (only compared with the previous packet's, for the loss count).
    seq: u16,
    /// Duration at 48 kHz, 1..=[`MAX_PACKET_SAMPLES`].
    samples: u32,
    payload: Bytes,
    arrived: Instant,
}

impl Held {
    fn end(&self) -> u64 {
        self.ts + u64::from(self.samples)
    }
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
            open: None,
            held: VecDeque::with_capacity(capacity),
            play_ts: EXT_BASE,
            owed: 0,
            credit: 0,
            last_seq: None,
            highest: EXT_BASE,
            seen: false,
            last_arrival: None,
            first_arrival: None,
            frames_out: 0,
            window_min_depth: i64::MAX,
            window_min_slack: Duration::MAX,
            window_frames: 0,
            stats: PlayoutStats::default(),
        }
    }

    /// Takes in one packet with RTP sequence number `seq` and timestamp `rtp_time` (48 kHz clock)
    /// holding `samples` of audio (at 48 kHz; clamped to 1..=[`MAX_PACKET_SAMPLES`]) that arrived
    /// at `now`. Playout follows the timestamps; `seq` only tells a loss from a pause in the counts.
    pub fn push(&mut self, now: Instant, seq: u16, rtp_time: u32, samples: u32, payload: Bytes) {
        self.stats.received += 1;
        self.last_arrival = Some(now);
        self.first_arrival.get_or_insert(now);
        let samples = samples.clamp(1, MAX_PACKET_SAMPLES);
        let ts = self.extend(rtp_time);
        let resync = self.config.resync_frames.saturating_mul(u64::from(FRAME_SAMPLES));
        if self.state == State::Idle {
            self.restart(now, ts, samples);
        } else if ts > self.highest.saturating_add(resync) || ts.saturating_add(resync) < self.play_ts {
            self.stats.resyncs += 1;
            self.restart(now, ts, samples);
        } else if ts + SNAP <= self.play_ts {
            let buffering = matches!(self.state, State::Buffering { .. });
            if buffering && self.play_ts - ts <= self.window() {
                // Reordered before playback began: start from the earlier packet instead.
                self.play_ts = ts;
            } else {
                self.stats.late += 1;
                return;
            }
        }
        let window = self.window();
        if ts + u64::from(samples) > self.play_ts + window {
            // Too far ahead to hold: drop the oldest audio until it fits (never the packet itself).
            self.skip_to((ts + u64::from(samples) - window).min(ts));
        }
        if self.held.len() >= self.config.capacity_frames {
            // Full: the oldest packet makes room, and the playout point passes it.
            if let Some(oldest) = self.held.pop_front() {
                self.stats.overflow_dropped += 1;
                let missing = oldest.ts.saturating_sub(self.play_ts);
                if missing >= SNAP {
                    self.stats.lost += missing.div_ceil(u64::from(FRAME_SAMPLES));
                }
                self.play_ts = self.play_ts.max(oldest.end());
                self.credit = 0;
            }
            if ts + SNAP <= self.play_ts {
                self.stats.late += 1;
                return;
            }
        }
        let Err(at) = self.held.binary_search_by_key(&ts, |h| h.ts) else {
            self.stats.duplicates += 1;
            return;
        };
        self.held.insert(at, Held { ts, seq, samples, payload, arrived: now });
        self.highest = self.highest.max(ts);
    }

    /// The next piece or frame due at `now`, if any; call again until `None`, then wait until
    /// [`Self::poll_timeout`]. Once a step has begun, every call returns something until its
    /// [`Playout::Frame`].
    pub fn poll(&mut self, now: Instant) -> Option<Playout> {
        if let Some(due) = self.open {
            return Some(self.release(due));
        }
        let due = match self.state {
            State::Idle => return None,
            State::Buffering { start_at } => start_at,
            State::Playing { next_due } => next_due,
        };
        if now < due {
            return None;
        }
        let covered = self.owed + i64::from(FRAME_SAMPLES) <= 0;
        if self.held.is_empty() && !covered {
            let quiet = self.last_arrival.is_none_or(|t| now.saturating_duration_since(t) >= self.config.idle_after);
            if quiet {
                self.state = State::Idle;
                return None;
            }
        }
        self.owed += i64::from(FRAME_SAMPLES);
        self.open = Some(due);
        self.state = State::Playing { next_due: due.checked_add(FRAME).unwrap_or(due) };
        if !self.held.is_empty() {
            self.trim(due);
        }
        self.window_min_depth = self.window_min_depth.min(self.depth().max(0));
        Some(self.release(due))
    }

    /// When [`Self::poll`] next has something (or a state change) to give; `None` when idle.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if let Some(due) = self.open {
            return Some(due);
        }
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
        self.held.len()
    }

    /// Whether the buffer is idle (no stream, or it stopped).
    pub fn is_idle(&self) -> bool {
        self.state == State::Idle && self.open.is_none()
    }

    /// The configuration in force (capacity after clamping).
    pub fn config(&self) -> PlayoutConfig {
        self.config
    }

    /// The open step's next piece, or its `Frame` once the audio released covers it.
    fn release(&mut self, due: Instant) -> Playout {
        loop {
            if self.owed <= 0 {
                self.open = None;
                self.window_frames = self.window_frames.saturating_add(1);
                self.frames_out = self.frames_out.saturating_add(1);
                return Playout::Frame;
            }
            // `owed` is positive and at most a frame here.
            let owed = self.owed.unsigned_abs();
            let Some(front) = self.held.front() else {
                // Underrun: nothing to lose yet, so the playout point stays where it is.
                self.stats.concealed += 1;
                self.stats.underruns += 1;
                self.window_min_depth = 0;
                self.window_min_slack = Duration::ZERO;
                self.credit = self.credit.saturating_add(owed);
                self.owed = 0;
                return Playout::Conceal { samples: owed as u32 };
            };
            if front.ts + SNAP <= self.play_ts {
                // Overlaps audio already released (a sender whose packets overlap): late.
                self.held.pop_front();
                self.stats.late += 1;
                continue;
            }
            let gap = front.ts.saturating_sub(self.play_ts);
            if gap < SNAP {
                let Some(h) = self.held.pop_front() else { continue };
                self.stats.played += 1;
                self.last_seq = Some(h.seq);
                self.window_min_slack = self.window_min_slack.min(due.saturating_duration_since(h.arrived));
                self.play_ts = h.end();
                self.owed -= i64::from(h.samples);
                self.credit = 0;
                return Playout::Packet { payload: h.payload, samples: h.samples };
            }
            if self.credit > 0 {
                // Time an underrun already played: the stream resumes after it. Packets missing
                // between the last one played and this one mean that time was lost, not paused.
                let skip = self.credit.min(gap);
                if self.last_seq.is_some_and(|last| front.seq != last.wrapping_add(1)) {
                    self.stats.lost += skip.div_ceil(u64::from(FRAME_SAMPLES));
                }
                self.credit -= skip;
                self.play_ts += skip;
                continue;
            }
            self.stats.lost += 1;
            self.window_min_slack = Duration::ZERO;
            if gap <= u64::from(FRAME_SAMPLES) {
                self.stats.fec_recovered += 1;
                let next = front.payload.clone();
                self.play_ts += gap;
                self.owed -= gap as i64;
                return Playout::Fec { next, samples: gap as u32 };
            }
            // The gap's last frame waits for FEC from the packet after it; the rest is concealed.
            let n = (gap - u64::from(FRAME_SAMPLES)).min(owed);
            self.stats.concealed += 1;
            self.play_ts += n;
            self.owed -= n as i64;
            return Playout::Conceal { samples: n as u32 };
        }
    }

    /// Whether the frame after the open one may be due at `at`: not before `n` frames of real time
    /// since the first packet, `n` being its index less the underruns (the frames of delay the
    /// buffer added, which are what a shorter delay gives back).
    fn may_release_next_at(&self, at: Instant) -> bool {
        let n = self.frames_out.saturating_add(1).saturating_sub(self.stats.underruns);
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.first_arrival.and_then(|t| t.checked_add(FRAME.saturating_mul(n))).is_some_and(|earliest| at >= earliest)
    }

    /// The span of audio held ahead of the playout point, in samples.
    fn window(&self) -> u64 {
        self.config.capacity_frames as u64 * u64::from(FRAME_SAMPLES)
    }

    /// Samples held beyond what the open step needs (negative: the step is not covered).
    fn depth(&self) -> i64 {
        let end = self.held.back().map_or(self.play_ts, |h| h.end().max(self.play_ts));
        (end - self.play_ts) as i64 - self.owed
    }

    /// Extends a 32-bit timestamp to the extended value nearest the highest seen.
    fn extend(&self, rtp_time: u32) -> u64 {
        if !self.seen {
            return EXT_BASE + u64::from(rtp_time);
        }
        // `highest` was once a 32-bit value plus a multiple of 2^32, so this is the signed
        // distance from it, in -2^31..2^31.
        let delta = i64::from(rtp_time.wrapping_sub(self.highest as u32) as i32);
        self.highest.saturating_add_signed(delta)
    }

    /// Clears everything held and starts a stream at `ts` with a first packet of `samples`: the
    /// first release after the target delay, plus the time the rest of that frame takes to arrive
    /// when the packet is shorter than a frame.
    fn restart(&mut self, now: Instant, ts: u64, samples: u32) {
        self.clear_held();
        self.seen = true;
        self.play_ts = ts;
        self.highest = ts;
        self.credit = 0;
        self.last_seq = None;
        self.window_min_depth = i64::MAX;
        self.window_min_slack = Duration::MAX;
        self.window_frames = 0;
        let rest = Duration::from_micros(u64::from(FRAME_SAMPLES.saturating_sub(samples)) * 1000 / SAMPLES_PER_MS);
        let wait = self.config.target_delay.saturating_add(rest);
        let start_at = now.checked_add(wait).unwrap_or(now);
        // A restart while playing never brings the next release forward: the stream never runs
        // faster than real time, whatever its timestamps do.
        let start_at = match self.state {
            State::Playing { next_due } => start_at.max(next_due),
            State::Buffering { start_at: earlier } => start_at.max(earlier),
            State::Idle => start_at,
        };
        self.state = State::Buffering { start_at };
    }

    fn clear_held(&mut self) {
        self.stats.overflow_dropped += self.held.len() as u64;
        self.held.clear();
    }

    /// Moves the playout point forward to `target`, dropping (and counting) the packets it
    /// passes; a packet that straddles `target` is kept and the point stops at its start.
    fn skip_to(&mut self, target: u64) {
        if target <= self.play_ts {
            return;
        }
        let mut target = target;
        let mut passed_held = 0u64;
        while let Some(front) = self.held.front() {
            if front.ts + SNAP > target {
                break;
            }
            if front.end() > target + SNAP {
                target = front.ts.max(self.play_ts);
                break;
            }
            passed_held += u64::from(front.samples);
            self.held.pop_front();
            self.stats.overflow_dropped += 1;
        }
        let missing = target.saturating_sub(self.play_ts).saturating_sub(passed_held);
        if missing >= SNAP {
            self.stats.lost += missing.div_ceil(u64::from(FRAME_SAMPLES));
        }
        self.play_ts = self.play_ts.max(target);
        self.credit = 0;
    }

    /// Gives back delay: at once above `max_delay`; after a whole window in which the buffer never
    /// ran below its target, one frame (by releasing the next frame at once when every packet
    /// waited a frame longer than the target, else by dropping a packet when that much audio was
    /// always queued beyond the target).
    fn trim(&mut self, due: Instant) {
        let frame = i64::from(FRAME_SAMPLES);
        let target_frames = (self.config.target_delay.as_millis() / FRAME.as_millis()).min(1 << 20) as i64;
        let max_frames = (self.config.max_delay.as_millis() / FRAME.as_millis()).clamp(1, 1 << 20) as i64;
        // A target above `max_delay` raises the ceiling to it (the operator asked for that delay).
        let max_frames = max_frames.max(target_frames + 1);
        let keep = target_frames * frame;
        let depth = self.depth();
        if depth > max_frames * frame {
            self.skip_to(self.play_ts + (depth - keep) as u64);
        } else if self.window_frames >= SHRINK_WINDOW_FRAMES {
            let spare = self.config.target_delay.saturating_add(FRAME);
            if self.window_min_slack != Duration::MAX && self.window_min_slack >= spare && self.may_release_next_at(due)
            {
                // Every packet of the window waited a frame longer than the target: the delay grew
                // for lateness that has passed. The clock moves a frame earlier (the frame after
                // this one goes out at once), giving the delay back without dropping audio. Not
                // past real time, though: packets that arrive faster than it (a sender ahead of
                // its own timestamps) also wait long, and must not speed the stream up.
                self.state = State::Playing { next_due: due };
            } else if self.window_min_depth >= keep + frame && depth >= frame {
                let spare = self.window_min_depth - keep;
                let next = self.held.front().filter(|h| h.ts < self.play_ts + SNAP && i64::from(h.samples) <= spare);
                if let Some(end) = next.map(Held::end) {
                    self.skip_to(end);
                }
            }
            self.window_min_depth = i64::MAX;
            self.window_min_slack = Duration::MAX;
            self.window_frames = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The configuration these tests were written for: a 40 ms target (two frames).
    fn forty() -> PlayoutConfig {
        PlayoutConfig { target_delay: Duration::from_millis(40), ..PlayoutConfig::default() }
    }

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

    /// Pushes the 20 ms packet number `seq` of a stream whose timestamps start at 0.
    fn put(p: &mut PlayoutBuffer, now: Instant, seq: u16) {
        p.push(now, seq, u32::from(seq) * FRAME_SAMPLES, FRAME_SAMPLES, pkt(seq));
    }

    fn packet(seq: u16) -> Playout {
        Playout::Packet { payload: pkt(seq), samples: FRAME_SAMPLES }
    }

    fn fec(seq: u16) -> Playout {
        Playout::Fec { next: pkt(seq), samples: FRAME_SAMPLES }
    }

    fn conceal() -> Playout {
        Playout::Conceal { samples: FRAME_SAMPLES }
    }

    /// Everything due at `now`, frames included.
    fn drain(p: &mut PlayoutBuffer, now: Instant) -> Vec<Playout> {
        std::iter::from_fn(|| p.poll(now)).collect()
    }

    /// The pieces due at `now`, without the frame markers (for 20 ms packets, one per frame).
    fn pieces(p: &mut PlayoutBuffer, now: Instant) -> Vec<Playout> {
        drain(p, now).into_iter().filter(|o| *o != Playout::Frame).collect()
    }

    /// Frames due at `now`.
    fn frames(p: &mut PlayoutBuffer, now: Instant) -> usize {
        drain(p, now).iter().filter(|o| **o == Playout::Frame).count()
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
                put(&mut p, now, next_packet);
                arrival.insert(next_packet, now);
                next_packet += 1;
            }
            while let Some(out) = p.poll(now) {
                if let Playout::Packet { payload, .. } = out {
                    release.insert(u16::from_be_bytes([payload[0], payload[1]]), now);
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
            put(&mut p, t0, seq);
        }
        assert!(drain(&mut p, at(t0, 299)).is_empty());
        assert_eq!(frames(&mut p, at(t0, 300)), 1, "the first frame after the 300 ms target");
    }

    /// Packets that arrive faster than real time (80 ms of audio every 15 ms) wait long, but that
    /// is no delay to give back: frames never outrun real time since the first packet (found by
    /// fuzzing: the clock moved a frame earlier once a second).
    #[test]
    fn early_packets_never_speed_the_clock_up() {
        let t0 = origin();
        let config = PlayoutConfig {
            target_delay: Duration::from_millis(12),
            capacity_frames: 255,
            max_delay: Duration::from_millis(2550),
            ..PlayoutConfig::default()
        };
        let mut p = PlayoutBuffer::new(config);
        let mut released = 0u64;
        for ms in (0..3000u64).step_by(5) {
            if ms % 15 == 0 && ms / 15 < 30 {
                let k = ms / 15;
                p.push(at(t0, ms), k as u16, (k * 3840) as u32, 3840, pkt(k as u16));
            }
            released += frames(&mut p, at(t0, ms)) as u64;
            assert!(released <= ms / 20 + 1, "{released} frames by {ms} ms");
        }
        assert!(released >= 100, "the stream played: {released} frames {:?}", p.stats());
    }

    /// A sender restart (a timestamp jump) while playing never brings the next release forward:
    /// the stream never plays faster than real time (found by fuzzing).
    #[test]
    fn resync_never_speeds_up() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(forty());
        let mut released = 0;
        for i in 0..10u16 {
            put(&mut p, at(t0, u64::from(i) * 20), i);
            released += frames(&mut p, at(t0, u64::from(i) * 20));
        }
        // A jump far ahead, pushed just after a release: the restart keeps the schedule.
        put(&mut p, at(t0, 181), 5000);
        for ms in 181..=400 {
            released += frames(&mut p, at(t0, ms));
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
            put(&mut p, now, i);
            if i == 0 {
                assert_eq!(p.poll_timeout(), Some(at(t0, 40)));
            }
            let got = drain(&mut p, now);
            assert!(got.is_empty() || got.len() == 2 && got[1] == Playout::Frame, "{got:?}");
            out.extend(got.into_iter().filter(|o| *o != Playout::Frame));
        }
        assert_eq!(out.len(), 98, "two frames still held: the 40 ms target");
        for (i, o) in out.iter().enumerate() {
            assert_eq!(o, &packet(i as u16));
        }
        let s = p.stats();
        assert_eq!((s.received, s.played, s.lost, s.concealed, s.late), (100, 98, 0, 0, 0));
    }

    /// Packets swapped within the window are released in timestamp order.
    #[test]
    fn reorders() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(forty());
        let order = [0u16, 2, 1, 3, 5, 4, 6, 7, 8, 9];
        let mut out = Vec::new();
        for (i, &seq) in order.iter().enumerate() {
            let now = at(t0, i as u64 * 20);
            put(&mut p, now, seq);
            out.extend(pieces(&mut p, now));
        }
        // The last is due at 40 + 9 × 20 ms.
        out.extend(pieces(&mut p, at(t0, 220)));
        let seqs: Vec<Playout> = (0..10).map(packet).collect();
        assert_eq!(out, seqs);
    }

    /// A lost packet whose successor has arrived is recovered by FEC from it; a longer gap is
    /// concealed but for its last frame, recovered the same way; and a packet that comes after
    /// its audio was given up on is late.
    #[test]
    fn loss_fec_and_late() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(forty());
        for seq in [0u16, 2, 3] {
            put(&mut p, t0, seq);
        }
        assert_eq!(pieces(&mut p, at(t0, 40)), vec![packet(0)]);
        assert_eq!(pieces(&mut p, at(t0, 60)), vec![fec(2)]);
        put(&mut p, at(t0, 61), 1);
        assert_eq!(pieces(&mut p, at(t0, 80)), vec![packet(2)]);
        // 4 lost, 5 and 6 lost too, 7 arrives: 4, 5 concealed, 6 from FEC of 7.
        put(&mut p, at(t0, 81), 7);
        let got = pieces(&mut p, at(t0, 180));
        assert_eq!(got, vec![packet(3), conceal(), conceal(), fec(7), packet(7)]);
        let s = p.stats();
        assert_eq!((s.late, s.lost, s.fec_recovered, s.concealed, s.played), (1, 4, 2, 2, 4));
    }

    /// Duplicates of a held packet are counted and dropped; copies of played packets are late.
    #[test]
    fn duplicates() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(forty());
        put(&mut p, t0, 10);
        put(&mut p, t0, 10);
        put(&mut p, t0, 11);
        assert_eq!(pieces(&mut p, at(t0, 40)), vec![packet(10)]);
        put(&mut p, at(t0, 41), 10);
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
            put(&mut p, at(t0, u64::from(i) * 20), i);
        }
        let mut conceals = 0;
        let mut t = 40;
        while let Some(due) = p.poll_timeout() {
            assert!(due <= at(t0, 1000), "never went idle");
            t = t.max(due.duration_since(t0).as_millis() as u64);
            for o in drain(&mut p, at(t0, t)) {
                if matches!(o, Playout::Conceal { .. }) {
                    conceals += 1;
                }
            }
        }
        assert!(p.is_idle());
        // Last packet at 80 ms, idle 200 ms later; released up to 120 ms, concealed until 280.
        assert!((1..=10).contains(&conceals), "{conceals} concealments before idle");
        assert_eq!(drain(&mut p, at(t0, 5000)), vec![]);
        // A DTX sender resumes with the next sequence number much later (its timestamp moved on
        // by the pause).
        p.push(at(t0, 5000), 5, 5 * FRAME_SAMPLES + 48 * 4900, FRAME_SAMPLES, pkt(5));
        assert_eq!(p.poll_timeout(), Some(at(t0, 5040)));
        assert_eq!(drain(&mut p, at(t0, 5039)), vec![]);
        assert_eq!(drain(&mut p, at(t0, 5040)), vec![packet(5), Playout::Frame]);
        assert_eq!(p.stats().late, 0);
        assert_eq!(p.stats().lost, 0);
    }

    /// A short pause with continuous timestamps (a stall) is concealed without moving the playout
    /// point, so the resumed packets are not late.
    #[test]
    fn pause_is_not_loss() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(forty());
        put(&mut p, t0, 0);
        assert_eq!(pieces(&mut p, at(t0, 40)), vec![packet(0)]);
        assert_eq!(pieces(&mut p, at(t0, 120)), vec![conceal(); 4]);
        put(&mut p, at(t0, 130), 1);
        assert_eq!(pieces(&mut p, at(t0, 140)), vec![packet(1)]);
        let s = p.stats();
        assert_eq!((s.late, s.lost, s.concealed), (0, 0, 4));
    }

    /// A pause whose timestamps moved on with it (DTX, a muted sender) is concealed once: the gap
    /// before the resumed packet was already played as underrun concealment, so it is not
    /// concealed again, and the stream goes on without added delay.
    #[test]
    fn pause_with_a_timestamp_gap_is_concealed_once() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(forty());
        put(&mut p, t0, 0);
        assert_eq!(pieces(&mut p, at(t0, 40)), vec![packet(0)]);
        // Nothing for 80 ms of audio: four underruns.
        assert_eq!(pieces(&mut p, at(t0, 120)), vec![conceal(); 4]);
        // The sender resumes where its clock is now, four frames on, with the next sequence
        // numbers (it sent nothing meanwhile).
        p.push(at(t0, 130), 1, 5 * FRAME_SAMPLES, FRAME_SAMPLES, pkt(5));
        p.push(at(t0, 130), 2, 6 * FRAME_SAMPLES, FRAME_SAMPLES, pkt(6));
        assert_eq!(pieces(&mut p, at(t0, 160)), vec![packet(5), packet(6)]);
        let s = p.stats();
        assert_eq!((s.late, s.lost, s.concealed), (0, 0, 4));
    }

    /// Packets lost on the way while nothing else was buffered are concealed as underruns, once,
    /// and counted as lost when the next packet's sequence number shows they were sent.
    #[test]
    fn underrun_over_missing_sequence_numbers_is_loss() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(forty());
        put(&mut p, t0, 0);
        assert_eq!(pieces(&mut p, at(t0, 40)), vec![packet(0)]);
        assert_eq!(pieces(&mut p, at(t0, 120)), vec![conceal(); 4]);
        // Packets 1 to 4 never came; 5 and 6 do, on time.
        put(&mut p, at(t0, 130), 5);
        put(&mut p, at(t0, 130), 6);
        assert_eq!(pieces(&mut p, at(t0, 160)), vec![packet(5), packet(6)]);
        let s = p.stats();
        assert_eq!((s.late, s.lost, s.concealed), (0, 4, 4));
    }

    /// A huge timestamp jump (sender restart) resynchronises instead of concealing the gap.
    #[test]
    fn jump_resyncs() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(forty());
        for i in 0..4u16 {
            put(&mut p, at(t0, u64::from(i) * 20), i);
        }
        drain(&mut p, at(t0, 60));
        put(&mut p, at(t0, 80), 30_000);
        put(&mut p, at(t0, 100), 30_001);
        // Restarted with its own target delay: first release at 80 + 40 ms.
        assert_eq!(drain(&mut p, at(t0, 119)), vec![]);
        let got = pieces(&mut p, at(t0, 140));
        assert_eq!(got, vec![packet(30_000), packet(30_001)]);
        let s = p.stats();
        assert_eq!(s.resyncs, 1);
        assert!(s.lost < 5);
        // Backwards too.
        put(&mut p, at(t0, 220), 7);
        assert_eq!(p.stats().resyncs, 2);
        assert_eq!(pieces(&mut p, at(t0, 260)), vec![packet(7)]);
    }

    /// A packet too far ahead for the window (here 4 frames of audio) pushes the oldest out,
    /// counted.
    #[test]
    fn overflow_drops_oldest() {
        let t0 = origin();
        let config = PlayoutConfig { capacity_frames: 4, ..forty() };
        let mut p = PlayoutBuffer::new(config);
        for seq in 0..4u16 {
            put(&mut p, t0, seq);
        }
        put(&mut p, t0, 5);
        assert_eq!(p.buffered(), 3, "0 and 1 pushed out; 2, 3, 5 held");
        let s = p.stats();
        assert_eq!((s.overflow_dropped, s.lost), (2, 0));
        assert_eq!(pieces(&mut p, at(t0, 40)), vec![packet(2)]);
        // The window holds at most that many packets, however short.
        let mut p = PlayoutBuffer::new(config);
        for i in 0..6u32 {
            p.push(t0, i as u16, i * 120, 120, pkt(i as u16));
        }
        assert_eq!(p.buffered(), 4);
        assert_eq!(p.stats().overflow_dropped, 2);
    }

    /// A burst after a stall is trimmed back to the target when it exceeds the maximum delay, and
    /// smaller excess is given back one frame per second, without dropping audio.
    #[test]
    fn delay_is_given_back() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(forty());
        put(&mut p, t0, 0);
        assert_eq!(pieces(&mut p, at(t0, 40)), vec![packet(0)]);
        // A 160 ms stall (concealed, playout point held) then 20 packets at once: 400 ms held.
        for t in (60..=180).step_by(20) {
            assert_eq!(pieces(&mut p, at(t0, t)), vec![conceal()]);
        }
        for seq in 1..=20u16 {
            put(&mut p, at(t0, 190), seq);
        }
        let got = pieces(&mut p, at(t0, 200));
        assert_eq!(got.len(), 1);
        assert!(matches!(got[0], Playout::Packet { .. }));
        assert_eq!(p.buffered(), 2, "trimmed back to the 40 ms target");
        assert!(p.stats().overflow_dropped >= 15);
        // Now a steady stream whose sender starts 100 ms ahead of real time (a burst): shrinks by
        // a frame per second, by dropping, since playing faster would outrun real time (only the
        // delay underruns added is given back by moving the clock: see
        // `lateness_delay_is_given_back_without_loss`).
        let mut p = PlayoutBuffer::new(forty());
        for i in 0..6u16 {
            put(&mut p, t0, i);
        }
        for i in 6..400u16 {
            let now = at(t0, u64::from(i - 5) * 20);
            put(&mut p, now, i);
            drain(&mut p, now);
        }
        assert!(p.buffered() <= 3, "{} held after 8 s", p.buffered());
        assert!((1..=5).contains(&p.stats().overflow_dropped), "{:?}", p.stats());
    }

    /// RTP timestamps wrap from 2^32 − 1 to 0 without loss or reordering.
    #[test]
    fn wraps() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(forty());
        let mut out = Vec::new();
        let start = u32::MAX - 5 * FRAME_SAMPLES + 1;
        for i in 0..20u16 {
            let ts = start.wrapping_add(u32::from(i) * FRAME_SAMPLES);
            let now = at(t0, u64::from(i) * 20);
            p.push(now, i, ts, FRAME_SAMPLES, pkt(i));
            out.extend(pieces(&mut p, now));
        }
        let expected: Vec<Playout> = (0..18u16).map(packet).collect();
        assert_eq!(out, expected);
        assert_eq!(p.stats().resyncs, 0);
    }

    /// Time going backwards, or an Instant far in the future, does not panic.
    #[test]
    fn odd_times() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(forty());
        put(&mut p, at(t0, 1000), 1);
        assert_eq!(p.poll(t0), None);
        put(&mut p, t0, 2);
        assert_eq!(pieces(&mut p, at(t0, 1040)), vec![packet(1)]);
        let mut p = PlayoutBuffer::new(PlayoutConfig { target_delay: Duration::MAX, ..forty() });
        put(&mut p, t0, 0);
        assert_eq!(p.poll(t0), Some(packet(0)), "an unrepresentable delay means none");
        assert_eq!(p.poll(t0), Some(Playout::Frame));
    }

    /// Pushes packets of `sizes_ms` (contiguous timestamps from 0) as their audio is complete
    /// (the first at 0, each next one its own duration later), draining every millisecond until
    /// the drain that releases the last; returns every output with its time in ms.
    fn run_stream(p: &mut PlayoutBuffer, t0: Instant, sizes_ms: &[u32]) -> Vec<(u64, Playout)> {
        let mut out = Vec::new();
        let (mut ts, mut arrive_ms, mut next) = (0u32, 0u64, 0usize);
        for ms in 0..10_000 {
            let now = at(t0, ms);
            while next < sizes_ms.len() && arrive_ms <= ms {
                let samples = sizes_ms[next] * 48;
                p.push(now, next as u16, ts, samples, pkt(next as u16));
                ts = ts.wrapping_add(samples);
                next += 1;
                arrive_ms += u64::from(sizes_ms.get(next).copied().unwrap_or(0));
            }
            out.extend(drain(p, now).into_iter().map(|o| (ms, o)));
            if p.stats().played == sizes_ms.len() as u64 {
                break;
            }
        }
        out
    }

    /// Packets of every standard Opus duration (10, 20, 40, 60 ms; 2.5 and 120 ms too) play
    /// without a concealed sample: each is released whole, once, in order, frames go out one per
    /// 20 ms, and the audio released before each frame covers it (a 60 ms packet covers three, two
    /// 10 ms packets make one).
    #[test]
    fn every_packet_duration_plays_clean() {
        for &ms in &[10u32, 20, 40, 60, 120] {
            let t0 = origin();
            let mut p = PlayoutBuffer::new(PlayoutConfig::default());
            let n = (2400 / ms) as usize;
            let out = run_stream(&mut p, t0, &vec![ms; n]);
            let s = p.stats();
            assert_eq!((s.concealed, s.lost, s.late, s.fec_recovered), (0, 0, 0, 0), "{ms} ms: {s:?}");
            assert_eq!(s.played, n as u64, "{ms} ms: every packet played");
            let (mut audio, mut frames) = (0u64, 0u64);
            let mut times = Vec::new();
            let mut played = Vec::new();
            for (t, o) in &out {
                match o {
                    Playout::Packet { payload, samples } => {
                        assert_eq!(*samples, ms * 48);
                        played.push(u16::from_be_bytes([payload[0], payload[1]]));
                        audio += u64::from(*samples);
                    }
                    Playout::Frame => {
                        frames += 1;
                        times.push(*t);
                        assert!(audio >= frames * 960, "{ms} ms: frame {frames} covered");
                    }
                    other => panic!("{ms} ms: {other:?}"),
                }
            }
            assert_eq!(played, (0..n as u16).collect::<Vec<_>>(), "{ms} ms: in order");
            assert!(times.windows(2).all(|w| w[1] - w[0] == 20), "{ms} ms: one frame per 20 ms");
            // The first frame waits the 10 ms target, plus the rest of its frame for 10 ms packets.
            assert_eq!(times[0], if ms < 20 { 20 } else { 10 }, "{ms} ms");
            assert!(frames * 960 >= audio - u64::from(ms * 48), "{ms} ms: all played by the end");
        }
        // 2.5 ms packets (the shortest Opus frame): eight make a frame.
        let t0 = origin();
        let mut p = PlayoutBuffer::new(PlayoutConfig::default());
        let mut ts = 0u32;
        for k in 0..400u64 {
            // Packet k arrives at 2.5 × k ms (in whole ms).
            p.push(at(t0, k * 5 / 2), k as u16, ts, 120, pkt(k as u16));
            ts += 120;
            drain(&mut p, at(t0, k * 5 / 2));
        }
        drain(&mut p, at(t0, 1010));
        let s = p.stats();
        assert_eq!((s.concealed, s.lost, s.late, s.played), (0, 0, 0, 400), "{s:?}");
    }

    /// A stream whose packet duration changes mid-stream (20 → 60 → 10 → 40 ms) plays every
    /// packet once and in order; a switch to longer packets conceals only the time the longer
    /// packet takes to arrive (never more than the packet), and nothing is lost.
    #[test]
    fn changing_ptime() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(PlayoutConfig::default());
        let mut sizes = vec![20u32; 50];
        sizes.extend([60; 17]);
        sizes.extend([10; 100]);
        sizes.extend([40; 25]);
        let out = run_stream(&mut p, t0, &sizes);
        let s = p.stats();
        assert_eq!((s.lost, s.late, s.played), (0, 0, sizes.len() as u64), "{s:?}");
        assert!(s.concealed <= 4, "concealment only at the switches to longer packets: {s:?}");
        let mut run = 0u32;
        let mut audio = 0u64;
        let mut frames = 0u64;
        for (_, o) in &out {
            match o {
                Playout::Conceal { samples } => {
                    run += samples;
                    assert!(run <= 60 * 48, "a concealed run longer than the packet: {run}");
                }
                Playout::Packet { samples, .. } => {
                    run = 0;
                    audio += u64::from(*samples);
                }
                Playout::Frame => frames += 1,
                Playout::Fec { .. } => panic!("nothing was lost"),
            }
        }
        assert!(frames * 960 >= audio, "everything played");
    }

    /// A lost 60 ms packet is concealed for exactly its length: two frames concealed, its last
    /// 20 ms recovered from the next packet's FEC, then that packet plays whole.
    #[test]
    fn lost_long_packet_conceals_its_length() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(PlayoutConfig::default());
        let big = 60 * 48;
        p.push(t0, 0, 0, big, pkt(0));
        assert_eq!(drain(&mut p, at(t0, 10)), vec![Playout::Packet { payload: pkt(0), samples: big }, Playout::Frame]);
        // Packet 1 (ts 2880) lost; packet 2 arrives early (a sender ahead of its clock).
        p.push(at(t0, 50), 2, 2 * big, big, pkt(2));
        assert_eq!(drain(&mut p, at(t0, 50)), vec![Playout::Frame, Playout::Frame]);
        let got = drain(&mut p, at(t0, 130));
        assert_eq!(
            got,
            vec![
                conceal(),
                Playout::Frame,
                conceal(),
                Playout::Frame,
                Playout::Fec { next: pkt(2), samples: 960 },
                Playout::Frame,
                Playout::Packet { payload: pkt(2), samples: big },
                Playout::Frame,
            ]
        );
        let s = p.stats();
        assert_eq!((s.lost, s.concealed, s.fec_recovered, s.played), (3, 2, 1, 2));
        // On time instead (packet k at k × 60 ms): the lost packet's three frames are underruns,
        // concealed once, and the next packet plays at its own time, not late.
        let mut p = PlayoutBuffer::new(PlayoutConfig::default());
        p.push(t0, 0, 0, big, pkt(0));
        assert_eq!(
            pieces(&mut p, at(t0, 110)),
            vec![Playout::Packet { payload: pkt(0), samples: big }, conceal(), conceal(), conceal()]
        );
        p.push(at(t0, 120), 2, 2 * big, big, pkt(2));
        p.push(at(t0, 180), 3, 3 * big, big, pkt(3));
        let want = |seq: u16| Playout::Packet { payload: pkt(seq), samples: big };
        assert_eq!(pieces(&mut p, at(t0, 190)), vec![want(2), want(3)]);
        assert_eq!(p.stats().late, 0);
    }

    /// A gap shorter than a frame (one lost 10 ms packet) is recovered for exactly its length.
    #[test]
    fn short_gap_is_sized_to_the_gap() {
        let t0 = origin();
        let mut p = PlayoutBuffer::new(PlayoutConfig::default());
        let ten = 480;
        p.push(t0, 0, 0, ten, pkt(0));
        p.push(at(t0, 10), 1, ten, ten, pkt(1));
        // Packet 2 lost.
        p.push(at(t0, 30), 3, 3 * ten, ten, pkt(3));
        let got = drain(&mut p, at(t0, 40));
        let want = |seq: u16| Playout::Packet { payload: pkt(seq), samples: ten };
        assert_eq!(
            got,
            vec![
                want(0),
                want(1),
                Playout::Frame,
                Playout::Fec { next: pkt(3), samples: ten },
                want(3),
                Playout::Frame
            ]
        );
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// Advance the clock and push the next packet of the schedule (or a chosen one), of a
        /// chosen duration.
        Push { gap_ms: u8, offset: i16, size: u8 },
        /// Advance the clock and drain.
        Poll { gap_ms: u8 },
    }

    /// Standard Opus durations in samples at 48 kHz, and an odd one.
    const SIZES: [u32; 7] = [120, 480, 960, 1920, 2880, 5760, 1000];

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u8..40, -3i16..4, 0u8..7).prop_map(|(gap_ms, offset, size)| Step::Push { gap_ms, offset, size }),
            1 => (0u8..40, -40i16..40, 0u8..7).prop_map(|(gap_ms, offset, size)| Step::Push { gap_ms, offset, size }),
            3 => (0u8..60).prop_map(|gap_ms| Step::Poll { gap_ms }),
        ]
    }

    proptest! {
        /// Every packet pushed is played exactly once or counted (late, duplicate, dropped), or is
        /// still held; nothing is played twice; frames never outrun the clock, and the audio
        /// released before each frame covers every frame so far.
        #[test]
        fn accounting(start in any::<u32>(), steps in proptest::collection::vec(step(), 0..400), cap in 2usize..60) {
            let t0 = origin();
            let mut p = PlayoutBuffer::new(PlayoutConfig { capacity_frames: cap, ..forty() });
            let (mut now_ms, mut next) = (0u64, start);
            let mut first_push: Option<u64> = None;
            let (mut frames, mut pieces, mut audio) = (0u64, 0u64, 0u64);
            let mut played: Vec<u32> = Vec::new();
            let mut id = 0u32;
            for s in steps {
                match s {
                    Step::Push { gap_ms, offset, size } => {
                        now_ms += u64::from(gap_ms);
                        let samples = SIZES[usize::from(size)];
                        let ts = next.wrapping_add((i32::from(offset) * 960) as u32);
                        next = next.wrapping_add(samples);
                        first_push.get_or_insert(now_ms);
                        p.push(at(t0, now_ms), id as u16, ts, samples, Bytes::copy_from_slice(&id.to_be_bytes()));
                        id += 1;
                    }
                    Step::Poll { gap_ms } => {
                        now_ms += u64::from(gap_ms);
                        while let Some(o) = p.poll(at(t0, now_ms)) {
                            match o {
                                Playout::Frame => {
                                    frames += 1;
                                    let elapsed = now_ms - first_push.unwrap_or(now_ms);
                                    prop_assert!(frames <= elapsed / 20 + 1, "{} frames in {} ms", frames, elapsed);
                                    prop_assert!(audio >= frames * 960, "frame {} not covered: {}", frames, audio);
                                }
                                Playout::Packet { payload, samples } => {
                                    pieces += 1;
                                    audio += u64::from(samples);
                                    let pid = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                                    prop_assert!(!played.contains(&pid), "packet {} played twice", pid);
                                    played.push(pid);
                                }
                                Playout::Fec { samples, .. } | Playout::Conceal { samples } => {
                                    prop_assert!(samples > 0 && samples <= 960);
                                    pieces += 1;
                                    audio += u64::from(samples);
                                }
                            }
                        }
                        // Between steps, what was released runs at most one packet ahead.
                        prop_assert!(audio < frames * 960 + u64::from(MAX_PACKET_SAMPLES), "{} vs {} frames", audio, frames);
                    }
                }
                prop_assert!(p.buffered() <= cap);
            }
            let s = p.stats();
            prop_assert_eq!(s.played, played.len() as u64);
            prop_assert_eq!(s.received, s.played + s.late + s.duplicates + s.overflow_dropped + p.buffered() as u64);
            prop_assert_eq!(s.concealed + s.fec_recovered + s.played, pieces);
        }

        /// Without loss or reordering, every packet plays in order across the 32-bit wrap.
        #[test]
        fn in_order_across_wrap(back in 0u32..200_000, n in 1usize..1200) {
            let t0 = origin();
            let mut p = PlayoutBuffer::new(forty());
            let start = 0u32.wrapping_sub(back);
            let mut out = Vec::new();
            for i in 0..n {
                let ts = start.wrapping_add(i as u32 * FRAME_SAMPLES);
                let now = at(t0, i as u64 * 20);
                p.push(now, i as u16, ts, FRAME_SAMPLES, pkt(i as u16));
                out.extend(pieces(&mut p, now));
            }
            // The last is due 40 ms after it arrived.
            out.extend(pieces(&mut p, at(t0, (n as u64 - 1) * 20 + 40)));
            prop_assert_eq!(out.len(), n);
            for (i, o) in out.iter().enumerate() {
                prop_assert_eq!(o, &packet(i as u16));
            }
        }
    }
}
