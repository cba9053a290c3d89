//! Outbound audio pacing toward a caller, with Twilio's playback semantics: chunks are released
//! whole, at most `lead` samples ahead of a modelled 1× playout and through a 2× token bucket;
//! marks come back once playout reaches them; a clear (barge-in) flushes and returns every mark.
//!
//! Invariant: sans-IO and integer-only (time is passed in, positions are sample counts); the
//! released-but-unplayed amount never exceeds `lead_samples` except for one oversize chunk sent
//! when nothing was in flight; queue and marks never grow past the configured bounds.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Nanoseconds per second, the scale of every time ⇄ sample conversion.
const NANOS_PER_SEC: u128 = 1_000_000_000;

/// How a [`Pacer`] paces and how much it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacerConfig {
    /// Sample rate of the audio pushed, in Hz; playout runs at exactly this rate. Zero is read as 1.
    pub sample_rate_hz: u32,
    /// How far released audio may run ahead of playout, in samples; also the token bucket's
    /// capacity. Bounds how much the caller must flush on barge-in.
    pub lead_samples: u64,
    /// Most unreleased audio held, in samples; a push past it fails with [`PacerError::Full`].
    pub max_queued_samples: u64,
    /// Most marks held (pending, plus played but not yet polled); a push past it fails.
    pub max_marks: usize,
    /// Most unreleased chunks held, whatever their size: tiny chunks cannot grow the queue past
    /// this; a push past it fails with [`PacerError::Full`].
    pub max_queued_chunks: usize,
}

impl PacerConfig {
    /// Defaults for `sample_rate_hz`: 200 ms lead, 60 s of queue, 1024 marks.
    pub fn for_rate(sample_rate_hz: u32) -> Self {
        let rate = u64::from(sample_rate_hz);
        Self {
            sample_rate_hz,
            lead_samples: rate / 5,
            max_queued_samples: rate * 60,
            max_marks: 1024,
            max_queued_chunks: 4096,
        }
    }
}

/// Why a push was refused; the item is dropped and the caller counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacerError {
    /// The queue would pass `max_queued_samples`, or `max_marks` marks are held.
    #[error("pacer queue is full")]
    Full,
}

/// An effect for the leg to carry out, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output<P> {
    /// Send this chunk to the caller now.
    Transmit {
        /// The chunk as pushed.
        payload: P,
        /// Its length in samples, as pushed.
        samples: u32,
    },
    /// Tell the caller to flush everything it has buffered (Twilio `clear`).
    Clear,
    /// The audio before this mark has played (or was cleared): report it to the agent.
    MarkPlayed(String),
}

/// Paces one leg's outbound audio; `P` is the chunk payload, moved through untouched.
///
/// Drive it like every sans-IO machine here: after each `push_*`/`handle_*`, drain
/// [`Pacer::poll_output`] until `None`, then call [`Pacer::handle_timeout`] at
/// [`Pacer::poll_timeout`].
///
/// # Invariants
/// Positions are cumulative sample counts in one stream coordinate: `played ≤ released`, a mark
/// sits at `released + queued` when pushed, and mark positions never decrease.
#[derive(Debug)]
pub struct Pacer<P> {
    config: PacerConfig,
    /// Unreleased chunks, in push order.
    queue: VecDeque<Chunk<P>>,
    /// Sum of `queue`'s samples, checked against `max_queued_samples` on every push.
    queued_samples: u64,
    /// Marks not yet reported, in push order (so by non-decreasing position).
    marks: VecDeque<Mark>,
    /// Outputs a clear decided (marks due before it, `Clear`, then every pending mark); polled
    /// before anything computed from time, so the leg sees them in that order.
    ready: VecDeque<Output<P>>,
    /// `MarkPlayed`s in `ready`: they still count against `max_marks`, so repeated clears
    /// without polling cannot grow `ready` without bound.
    ready_marks: usize,
    /// Total samples ever released; the stream coordinate for playout and marks.
    released_samples: u64,
    playout: Playout,
    bucket: Bucket,
    /// The latest instant any input carried; outputs are computed as of this time. Kept
    /// monotonic (an earlier `now` is ignored) so a clock hiccup cannot move playout backwards.
    now: Option<Instant>,
}

impl<P> Pacer<P> {
    /// An empty pacer: nothing queued or in flight, token bucket full.
    pub fn new(config: PacerConfig) -> Self {
        let config = PacerConfig { sample_rate_hz: config.sample_rate_hz.max(1), ..config };
        Self {
            config,
            queue: VecDeque::new(),
            queued_samples: 0,
            marks: VecDeque::new(),
            ready: VecDeque::new(),
            ready_marks: 0,
            released_samples: 0,
            playout: Playout::Idle,
            bucket: Bucket::FULL,
            now: None,
        }
    }

    /// Queues a chunk of `samples` samples behind everything pushed before.
    ///
    /// # Errors
    /// [`PacerError::Full`] when it would pass `max_queued_samples`; the chunk is dropped.
    pub fn push_audio(&mut self, now: Instant, payload: P, samples: u32) -> Result<(), PacerError> {
        self.advance_clock(now);
        let queued = self.queued_samples.saturating_add(u64::from(samples));
        if queued > self.config.max_queued_samples || self.queue.len() >= self.config.max_queued_chunks {
            return Err(PacerError::Full);
        }
        self.queue.push_back(Chunk { payload, samples });
        self.queued_samples = queued;
        Ok(())
    }

    /// Places mark `name` at the end of the audio pushed so far.
    ///
    /// # Errors
    /// [`PacerError::Full`] when `max_marks` marks are held; the mark is dropped.
    pub fn push_mark(&mut self, now: Instant, name: String) -> Result<(), PacerError> {
        self.advance_clock(now);
        if self.marks.len() + self.ready_marks >= self.config.max_marks {
            return Err(PacerError::Full);
        }
        let position = self.released_samples.saturating_add(self.queued_samples);
        self.marks.push_back(Mark { position, name });
        Ok(())
    }

    /// Barge-in: drops the queue, then outputs `Clear` and every pending mark in order.
    ///
    /// Marks whose audio had already played by `now` come out before the `Clear`. Afterwards
    /// nothing is in flight and the token bucket is full. A `Clear` still waiting to be polled
    /// absorbs this one (nothing was transmitted in between, so one flush does both).
    pub fn handle_clear(&mut self, now: Instant) {
        let now = self.advance_clock(now);
        let played = self.played_samples(now);
        while let Some(mark) = self.marks.pop_front() {
            if mark.position > played {
                self.marks.push_front(mark);
                break;
            }
            self.ready_mark(mark);
        }
        if !self.ready.iter().any(|o| matches!(o, Output::Clear)) {
            self.ready.push_back(Output::Clear);
        }
        while let Some(mark) = self.marks.pop_front() {
            self.ready_mark(mark);
        }
        self.queue.clear();
        self.queued_samples = 0;
        self.playout = Playout::Idle;
        self.bucket = Bucket::FULL;
    }

    /// Moves time to `now`; what became due is returned by [`Self::poll_output`].
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance_clock(now);
    }

    /// The next effect due as of the latest input's time, or `None` until more input.
    ///
    /// A mark is reported only once playout reached it, a chunk is released once both pacing
    /// rules allow it; a due mark comes before a chunk released at the same instant.
    pub fn poll_output(&mut self) -> Option<Output<P>> {
        if let Some(output) = self.ready.pop_front() {
            if matches!(output, Output::MarkPlayed(_)) {
                self.ready_marks -= 1;
            }
            return Some(output);
        }
        let now = self.now?;
        let played = self.played_samples(now);
        if let Some(mark) = self.marks.pop_front() {
            if mark.position <= played {
                return Some(Output::MarkPlayed(mark.name));
            }
            self.marks.push_front(mark);
        }
        let samples = self.queue.front()?.samples;
        if !self.may_release(now, samples) {
            return None;
        }
        let chunk = self.queue.pop_front()?;
        self.release(now, chunk.samples);
        Some(Output::Transmit { payload: chunk.payload, samples: chunk.samples })
    }

    /// When something next becomes due (a release or a mark); `None` when idle.
    ///
    /// Returns the latest input's time while outputs are waiting to be polled.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let now = self.now?;
        if !self.ready.is_empty() {
            return Some(now);
        }
        // A mark beyond `released` waits for a release first; that release is the deadline.
        let mark_at = self
            .marks
            .front()
            .filter(|m| m.position <= self.released_samples)
            .and_then(|m| self.playout_reaches(now, m.position));
        let release_at = self.queue.front().and_then(|c| self.release_at(now, c.samples));
        mark_at.into_iter().chain(release_at).min()
    }

    /// Samples pushed and not yet released.
    pub fn queued_samples(&self) -> u64 {
        self.queued_samples
    }

    /// Samples released so far: the stream position the next released chunk starts at.
    pub fn released_samples(&self) -> u64 {
        self.released_samples
    }

    /// The stream position (samples) the audio pushed so far ends at: a mark pushed now sits there.
    pub fn end_samples(&self) -> u64 {
        self.released_samples.saturating_add(self.queued_samples)
    }

    /// Samples released and not yet played at `now` (under the 1× playout model).
    pub fn in_flight_samples(&self, now: Instant) -> u64 {
        self.released_samples - self.played_samples(now)
    }

    /// Drops everything (queue, marks, waiting outputs) without any output: the leg is gone.
    pub fn reset(&mut self) {
        *self = Self::new(self.config);
    }

    /// Records `now` (keeping time monotonic) and returns the time outputs are computed at.
    fn advance_clock(&mut self, now: Instant) -> Instant {
        let now = self.now.map_or(now, |t| t.max(now));
        self.now = Some(now);
        now
    }

    /// Samples played by `now`: 1× since the playout started, never past what was released.
    fn played_samples(&self, now: Instant) -> u64 {
        match self.playout {
            Playout::Idle => self.released_samples,
            Playout::Running { since, from } => {
                let elapsed = samples_in(now.saturating_duration_since(since), self.config.sample_rate_hz);
                from.saturating_add(elapsed).min(self.released_samples)
            }
        }
    }

    /// When playout reaches `position` (`now` if it already has; `None` if never).
    fn playout_reaches(&self, now: Instant, position: u64) -> Option<Instant> {
        if self.played_samples(now) >= position {
            return Some(now);
        }
        match self.playout {
            // Idle means everything released has played, so `position` is beyond `released`.
            Playout::Idle => None,
            Playout::Running { since, from } => {
                since.checked_add(duration_of(position.saturating_sub(from), self.config.sample_rate_hz))
            }
        }
    }

    /// Whether a chunk of `samples` may be released at `now` under both pacing rules.
    fn may_release(&self, now: Instant, samples: u32) -> bool {
        let in_flight = self.in_flight_samples(now);
        let lead_ok = in_flight == 0 || in_flight.saturating_add(u64::from(samples)) <= self.config.lead_samples;
        lead_ok && self.bucket.level(now, self.config) >= self.cost(samples)
    }

    /// When a chunk of `samples` at the head of the queue may be released (`None` if never).
    fn release_at(&self, now: Instant, samples: u32) -> Option<Instant> {
        let samples = u64::from(samples);
        let lead = self.config.lead_samples;
        // Rule (b): in_flight + samples ≤ lead, i.e. played ≥ released + samples − lead; a chunk
        // larger than `lead` waits for nothing to be in flight instead.
        let target = match lead.checked_sub(samples) {
            Some(room) => self.released_samples.saturating_sub(room),
            None => self.released_samples,
        };
        let lead_at = self.playout_reaches(now, target)?;
        let bucket_at = self.bucket.reaches(now, self.cost_of(samples), self.config)?;
        Some(lead_at.max(bucket_at))
    }

    /// Releases a chunk of `samples` at `now`: playout restarts if it had run dry.
    fn release(&mut self, now: Instant, samples: u32) {
        if self.played_samples(now) == self.released_samples {
            self.playout = Playout::Running { since: now, from: self.released_samples };
        }
        let level = self.bucket.level(now, self.config);
        self.bucket = Bucket { level: level.saturating_sub(self.cost(samples)), at: Some(now) };
        self.released_samples = self.released_samples.saturating_add(u64::from(samples));
        self.queued_samples -= u64::from(samples);
    }

    /// Tokens a chunk of `samples` takes, in nano-samples.
    fn cost(&self, samples: u32) -> u128 {
        self.cost_of(u64::from(samples))
    }

    /// A chunk larger than the bucket costs the whole bucket, so it can still go (when the
    /// bucket is full) instead of waiting forever.
    fn cost_of(&self, samples: u64) -> u128 {
        u128::from(samples.min(self.config.lead_samples)) * NANOS_PER_SEC
    }

    fn ready_mark(&mut self, mark: Mark) {
        self.ready.push_back(Output::MarkPlayed(mark.name));
        self.ready_marks += 1;
    }
}

/// One unreleased chunk.
#[derive(Debug)]
struct Chunk<P> {
    payload: P,
    samples: u32,
}

/// One unreported mark.
#[derive(Debug)]
struct Mark {
    /// Stream position (in `released` coordinates) the audio before the mark ends at.
    position: u64,
    name: String,
}

/// The caller's modelled playout.
#[derive(Debug, Clone, Copy)]
enum Playout {
    /// Everything released has played (or was flushed); the next release restarts playout.
    Idle,
    /// Playing at 1× since `since`, when it was at position `from`. Re-anchored only when
    /// playout restarts, so positions derive from one anchor and rounding never accumulates.
    Running { since: Instant, from: u64 },
}

/// Token bucket for rule (a), in nano-samples (samples × 10⁹) so a refill of
/// `2 × rate × elapsed_ns` is exact and never drifts.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Level at `at`.
    level: u128,
    /// When `level` was measured; `None` means full.
    at: Option<Instant>,
}

impl Bucket {
    const FULL: Self = Self { level: 0, at: None };

    fn capacity(config: PacerConfig) -> u128 {
        u128::from(config.lead_samples) * NANOS_PER_SEC
    }

    fn refill_per_ns(config: PacerConfig) -> u128 {
        2 * u128::from(config.sample_rate_hz)
    }

    fn level(&self, now: Instant, config: PacerConfig) -> u128 {
        let capacity = Self::capacity(config);
        let Some(at) = self.at else { return capacity };
        let refill = now.saturating_duration_since(at).as_nanos().saturating_mul(Self::refill_per_ns(config));
        self.level.saturating_add(refill).min(capacity)
    }

    /// When the level reaches `cost` (≤ capacity): `now` if it has, else rounded up to the ns.
    fn reaches(&self, now: Instant, cost: u128, config: PacerConfig) -> Option<Instant> {
        if self.level(now, config) >= cost {
            return Some(now);
        }
        let at = self.at?;
        let nanos = (cost - self.level).div_ceil(Self::refill_per_ns(config));
        at.checked_add(Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)))
    }
}

/// Whole samples that play in `elapsed` at `rate_hz`, rounded down (a sample counts once it
/// has fully played).
fn samples_in(elapsed: Duration, rate_hz: u32) -> u64 {
    let samples = elapsed.as_nanos().saturating_mul(u128::from(rate_hz)) / NANOS_PER_SEC;
    u64::try_from(samples).unwrap_or(u64::MAX)
}

/// How long `samples` take to play at `rate_hz`, rounded up to the nanosecond, so that
/// `samples_in(duration_of(n)) ≥ n`: a deadline never fires before its position is reached.
fn duration_of(samples: u64, rate_hz: u32) -> Duration {
    let nanos = (u128::from(samples) * NANOS_PER_SEC).div_ceil(u128::from(rate_hz));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RATE: u32 = 8000;
    const LEAD: u64 = 1600;

    fn origin() -> Instant {
        #[allow(clippy::disallowed_methods)] // The virtual clock's origin; tests add offsets to it.
        Instant::now()
    }

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn drain(p: &mut Pacer<u32>) -> Vec<Output<u32>> {
        std::iter::from_fn(|| p.poll_output()).collect()
    }

    /// Drives `p` at every deadline up to `end`, returning each output with the time it came out.
    fn run_until(p: &mut Pacer<u32>, start: Instant, end: Instant) -> Vec<(Instant, Output<u32>)> {
        let mut out = Vec::new();
        let mut now = start;
        for _ in 0..100_000 {
            p.handle_timeout(now);
            out.extend(drain(p).into_iter().map(|o| (now, o)));
            match p.poll_timeout() {
                Some(t) if t <= end => {
                    assert!(t > now, "poll_timeout must move forward after a drain");
                    now = t;
                }
                _ => return out,
            }
        }
        panic!("pacer did not settle");
    }

    fn mark(name: &str) -> Output<u32> {
        Output::MarkPlayed(name.to_owned())
    }

    /// 10 s pushed at once is released in order, never above 2× real time nor `lead` ahead of playout.
    #[test]
    fn burst_is_paced() {
        let t0 = origin();
        let mut p = Pacer::new(PacerConfig::for_rate(RATE));
        for i in 0..500 {
            p.push_audio(t0, i, 160).expect("60 s queue holds 10 s");
        }
        let mut now = t0;
        let (mut next, mut released, mut last_release) = (0u32, 0u64, t0);
        for _ in 0..10_000 {
            p.handle_timeout(now);
            while let Some(output) = p.poll_output() {
                let Output::Transmit { payload, samples } = output else { panic!("unexpected {output:?}") };
                assert_eq!(payload, next);
                next += 1;
                released += u64::from(samples);
                last_release = now;
                let elapsed_ns = now.duration_since(t0).as_nanos();
                assert!(
                    u128::from(released) * NANOS_PER_SEC <= u128::from(LEAD) * NANOS_PER_SEC + 2 * 8000 * elapsed_ns
                );
                assert!(p.in_flight_samples(now) <= LEAD);
            }
            assert!(p.in_flight_samples(now) <= LEAD);
            match p.poll_timeout() {
                Some(t) => {
                    assert!(t > now);
                    now = t;
                }
                None => break,
            }
        }
        assert_eq!(next, 500);
        assert_eq!(last_release, ms(t0, 9800), "the last chunk goes out `lead` before the end");
        assert_eq!(p.in_flight_samples(ms(t0, 10_000)), 0);
        assert_eq!(p.queued_samples(), 0);
    }

    /// Real-time input (one 20 ms chunk every 20 ms) goes out the instant it is pushed.
    #[test]
    fn real_time_input_is_not_delayed() {
        let t0 = origin();
        let mut p = Pacer::new(PacerConfig::for_rate(RATE));
        for k in 0..100 {
            let now = ms(t0, 20 * u64::from(k));
            p.push_audio(now, k, 160).expect("room");
            assert_eq!(drain(&mut p), vec![Output::Transmit { payload: k, samples: 160 }]);
            assert_eq!(p.in_flight_samples(now), 160);
            assert_eq!(p.poll_timeout(), None);
        }
    }

    /// A mark comes back at its chunk's release time plus the time to play out to its end, not before.
    #[test]
    fn marks_follow_playout() {
        let t0 = origin();
        let mut p = Pacer::new(PacerConfig::for_rate(RATE));
        for i in 0..20 {
            p.push_audio(t0, i, 160).expect("room");
            if i == 14 {
                p.push_mark(t0, "a".into()).expect("room");
            }
        }
        p.push_mark(t0, "b".into()).expect("room");
        let out = run_until(&mut p, t0, ms(t0, 10_000));
        let at = |wanted: &Output<u32>| out.iter().position(|(_, o)| o == wanted).expect("emitted");
        let k14 = at(&Output::Transmit { payload: 14, samples: 160 });
        let (a, b) = (at(&mark("a")), at(&mark("b")));
        assert!(k14 < a && a < b);
        // Chunk 14 (samples 2240..2400) waits until played ≥ 2400 − 1600 = 800, i.e. 100 ms;
        // from there 1600 samples remain before its end: 200 ms.
        assert_eq!(out[k14].0, ms(t0, 100));
        assert_eq!(out[a].0, out[k14].0 + Duration::from_millis(200));
        assert_eq!(out[b].0, ms(t0, 400));
        // Not a nanosecond earlier.
        let mut q = Pacer::new(PacerConfig::for_rate(RATE));
        q.push_audio(t0, 0, 160).expect("room");
        q.push_mark(t0, "m".into()).expect("room");
        assert_eq!(drain(&mut q), vec![Output::Transmit { payload: 0, samples: 160 }]);
        assert_eq!(q.poll_timeout(), Some(ms(t0, 20)));
        q.handle_timeout(ms(t0, 20) - Duration::from_nanos(1));
        assert_eq!(drain(&mut q), vec![]);
        q.handle_timeout(ms(t0, 20));
        assert_eq!(drain(&mut q), vec![mark("m")]);
    }

    /// A mark pushed with nothing queued or in flight is reported at once.
    #[test]
    fn idle_mark_is_immediate() {
        let t0 = origin();
        let mut p: Pacer<u32> = Pacer::new(PacerConfig::for_rate(RATE));
        p.push_mark(t0, "now".into()).expect("room");
        assert_eq!(p.poll_timeout(), Some(t0));
        assert_eq!(drain(&mut p), vec![mark("now")]);
        assert_eq!(p.poll_timeout(), None);
    }

    /// Clear drops the queue, emits Clear then every pending mark in order, and audio flows again after.
    #[test]
    fn clear_flushes_and_returns_marks() {
        let t0 = origin();
        let mut p = Pacer::new(PacerConfig::for_rate(RATE));
        for i in 0..50 {
            p.push_audio(t0, i, 160).expect("room");
            if [5, 20, 49].contains(&i) {
                p.push_mark(t0, format!("m{i}")).expect("room");
            }
        }
        let out = run_until(&mut p, t0, ms(t0, 50));
        assert_eq!(out.len(), 12, "10 at once, then one per 20 ms");
        assert!(out.iter().all(|(_, o)| matches!(o, Output::Transmit { .. })));
        p.handle_clear(ms(t0, 50));
        assert_eq!(drain(&mut p), vec![Output::Clear, mark("m5"), mark("m20"), mark("m49")]);
        assert_eq!((p.queued_samples(), p.in_flight_samples(ms(t0, 50))), (0, 0));
        assert_eq!(p.poll_timeout(), None);
        // Flows again, with a full bucket: 10 chunks at once.
        let now = ms(t0, 60);
        for i in 100..111 {
            p.push_audio(now, i, 160).expect("room");
        }
        p.push_mark(now, "after".into()).expect("room");
        assert_eq!(drain(&mut p).len(), 10);
        let out = run_until(&mut p, now, ms(t0, 1000));
        assert_eq!(
            out,
            vec![(ms(t0, 80), Output::Transmit { payload: 110, samples: 160 }), (ms(t0, 280), mark("after"))]
        );
    }

    /// A mark already played when the clear arrives comes out before the Clear; clears coalesce.
    #[test]
    fn clear_orders_played_marks_first() {
        let t0 = origin();
        let mut p = Pacer::new(PacerConfig::for_rate(RATE));
        p.push_mark(t0, "done".into()).expect("room");
        p.push_audio(t0, 0, 160).expect("room");
        p.push_mark(t0, "pending".into()).expect("room");
        p.handle_clear(t0);
        p.handle_clear(t0);
        assert_eq!(drain(&mut p), vec![mark("done"), Output::Clear, mark("pending")]);
    }

    /// After an underrun, playout restarts from the next release, not from where it ran dry.
    #[test]
    fn underrun_then_resume() {
        let t0 = origin();
        let mut p = Pacer::new(PacerConfig::for_rate(RATE));
        p.push_audio(t0, 0, 160).expect("room");
        assert_eq!(drain(&mut p).len(), 1);
        assert_eq!(p.in_flight_samples(ms(t0, 10)), 80);
        assert_eq!(p.in_flight_samples(ms(t0, 100)), 0);
        let resume = ms(t0, 100);
        p.push_audio(resume, 1, 160).expect("room");
        p.push_mark(resume, "m".into()).expect("room");
        assert_eq!(drain(&mut p), vec![Output::Transmit { payload: 1, samples: 160 }]);
        assert_eq!(p.in_flight_samples(ms(t0, 110)), 80);
        assert_eq!(p.poll_timeout(), Some(ms(t0, 120)));
        assert_eq!(run_until(&mut p, resume, ms(t0, 1000)), vec![(ms(t0, 120), mark("m"))]);
    }

    /// A chunk larger than `lead` still goes out, once nothing is in flight.
    #[test]
    fn oversize_chunk_does_not_deadlock() {
        let t0 = origin();
        let mut p = Pacer::new(PacerConfig::for_rate(RATE));
        p.push_audio(t0, 0, 4000).expect("room");
        p.push_audio(t0, 1, 4000).expect("room");
        p.push_audio(t0, 2, 160).expect("room");
        let out = run_until(&mut p, t0, ms(t0, 10_000));
        let times: Vec<_> = out.iter().map(|(t, o)| (*t, o.clone())).collect();
        assert_eq!(
            times,
            vec![
                (t0, Output::Transmit { payload: 0, samples: 4000 }),
                (ms(t0, 500), Output::Transmit { payload: 1, samples: 4000 }),
                // 160 more fit once in flight ≤ 1440: 2560 of the second chunk played, 320 ms.
                (ms(t0, 820), Output::Transmit { payload: 2, samples: 160 }),
            ]
        );
    }

    /// Audio past `max_queued_samples` is refused alone; later audio that fits is still taken.
    #[test]
    fn audio_bound() {
        let t0 = origin();
        let config = PacerConfig { max_queued_samples: 1000, ..PacerConfig::for_rate(RATE) };
        let mut p = Pacer::new(config);
        for i in 0..6 {
            p.push_audio(t0, i, 160).expect("960 ≤ 1000");
        }
        assert_eq!(p.push_audio(t0, 6, 160), Err(PacerError::Full));
        assert_eq!(p.queued_samples(), 960);
        p.push_audio(t0, 7, 40).expect("exactly 1000");
        assert_eq!(p.push_audio(t0, 8, 1), Err(PacerError::Full));
        let sent: Vec<_> = drain(&mut p)
            .into_iter()
            .filter_map(|o| if let Output::Transmit { payload, .. } = o { Some(payload) } else { None })
            .collect();
        assert_eq!(sent, vec![0, 1, 2, 3, 4, 5, 7]);
    }

    /// Marks past `max_marks` are refused alone, counting those cleared but not yet polled.
    #[test]
    fn mark_bound() {
        let t0 = origin();
        let config = PacerConfig { max_marks: 2, ..PacerConfig::for_rate(RATE) };
        let mut p = Pacer::new(config);
        p.push_audio(t0, 0, 160).expect("room");
        p.push_mark(t0, "a".into()).expect("room");
        p.push_mark(t0, "b".into()).expect("room");
        assert_eq!(p.push_mark(t0, "c".into()), Err(PacerError::Full));
        p.handle_clear(t0);
        assert_eq!(p.push_mark(t0, "d".into()), Err(PacerError::Full));
        assert_eq!(drain(&mut p), vec![Output::Clear, mark("a"), mark("b")]);
        p.push_mark(t0, "e".into()).expect("room again");
        assert_eq!(drain(&mut p), vec![mark("e")]);
    }

    /// Reset drops queue, marks and waiting outputs without emitting anything.
    #[test]
    fn reset_is_silent() {
        let t0 = origin();
        let mut p = Pacer::new(PacerConfig::for_rate(RATE));
        p.push_audio(t0, 0, 160).expect("room");
        p.push_mark(t0, "a".into()).expect("room");
        p.handle_clear(t0);
        p.push_audio(t0, 1, 160).expect("room");
        p.reset();
        assert_eq!(drain(&mut p), vec![]);
        assert_eq!((p.queued_samples(), p.in_flight_samples(t0), p.poll_timeout()), (0, 0, None));
    }

    /// Degenerate configs and a clock stepping backwards neither panic nor stall.
    #[test]
    fn degenerate_inputs() {
        let t0 = ms(origin(), 1000);
        let config = PacerConfig {
            sample_rate_hz: 0,
            lead_samples: 0,
            max_queued_samples: 10_000,
            max_marks: 4,
            max_queued_chunks: 16,
        };
        let mut p = Pacer::new(config);
        for i in 0..3 {
            p.push_audio(t0, i, 2).expect("room");
        }
        p.push_mark(t0, "m".into()).expect("room");
        p.handle_timeout(t0 - Duration::from_millis(500));
        let out = run_until(&mut p, t0, ms(t0, 100_000));
        let names: Vec<_> = out.into_iter().map(|(_, o)| o).collect();
        assert_eq!(names.last(), Some(&mark("m")));
        assert_eq!(names.len(), 4);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Audio(u32),
        Mark,
        Clear,
        Advance(u64),
        Timeout,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u32..=800).prop_map(Op::Audio),
            1 => (1601u32..5000).prop_map(Op::Audio),
            3 => Just(Op::Mark),
            1 => Just(Op::Clear),
            3 => (0u64..200).prop_map(Op::Advance),
            2 => Just(Op::Timeout),
        ]
    }

    /// What the random drive has pushed and seen, checked after every drain.
    #[derive(Default)]
    struct Model {
        /// Samples accepted by `push_audio`.
        pushed: u64,
        /// Samples transmitted.
        sent: u64,
        /// Largest accepted chunk, or `lead` if larger: the in-flight bound.
        biggest: u64,
        /// Sequence number the next transmit must be at least.
        next_sent: u32,
        /// Sequence numbers below this were pushed before the latest clear.
        cleared_below: u32,
        /// Accepted marks by name, with the last accepted audio pushed before each.
        marks: Vec<(String, Option<u32>)>,
        /// Marks reported, in order.
        reported: Vec<String>,
    }

    impl Model {
        fn drain(&mut self, p: &mut Pacer<u32>, now: Instant) -> Result<(), TestCaseError> {
            let mut after_clear = false;
            while let Some(output) = p.poll_output() {
                match output {
                    Output::Transmit { payload, samples } => {
                        prop_assert!(payload >= self.next_sent, "transmits in push order");
                        self.next_sent = payload + 1;
                        self.sent += u64::from(samples);
                    }
                    Output::Clear => after_clear = true,
                    Output::MarkPlayed(name) => {
                        let entry = self.marks.iter().find(|(n, _)| *n == name);
                        prop_assert!(entry.is_some(), "unknown mark {}", name);
                        let needs = entry.and_then(|(_, s)| *s);
                        // Outside a clear's flush, the audio before the mark was sent (or dropped by an earlier clear).
                        if let (false, Some(s)) = (after_clear, needs) {
                            prop_assert!(
                                s < self.next_sent || s < self.cleared_below,
                                "mark {} before its audio",
                                name
                            );
                        }
                        self.reported.push(name);
                    }
                }
                prop_assert!(self.sent <= self.pushed);
                prop_assert!(p.in_flight_samples(now) <= self.biggest);
            }
            prop_assert!(p.in_flight_samples(now) <= self.biggest);
            Ok(())
        }
    }

    proptest! {
        /// Random pushes, clears and time steps never panic, never send more than was pushed or
        /// run past the lead, and report every accepted mark exactly once, in order, after its audio.
        #[test]
        fn random_drive(ops in proptest::collection::vec(op(), 0..200), max_marks in 1usize..8) {
            let t0 = origin();
            let config = PacerConfig { max_queued_samples: 8000, max_marks, ..PacerConfig::for_rate(RATE) };
            let mut p = Pacer::new(config);
            let mut m = Model { biggest: LEAD, ..Model::default() };
            let (mut now, mut seq, mut last_accepted) = (t0, 0u32, None);
            for op in ops {
                match op {
                    Op::Audio(samples) => {
                        if p.push_audio(now, seq, samples).is_ok() {
                            m.pushed += u64::from(samples);
                            m.biggest = m.biggest.max(u64::from(samples));
                            last_accepted = Some(seq);
                        }
                        seq += 1;
                    }
                    Op::Mark => {
                        let name = format!("m{}", m.marks.len());
                        if p.push_mark(now, name.clone()).is_ok() {
                            m.marks.push((name, last_accepted));
                        }
                    }
                    Op::Clear => {
                        p.handle_clear(now);
                        m.cleared_below = seq;
                    }
                    Op::Advance(step) => {
                        now += Duration::from_millis(step);
                        p.handle_timeout(now);
                    }
                    Op::Timeout => {
                        if let Some(t) = p.poll_timeout() {
                            now = now.max(t);
                        }
                        p.handle_timeout(now);
                    }
                }
                m.drain(&mut p, now)?;
            }
            let mut settled = false;
            for _ in 0..10_000 {
                let Some(t) = p.poll_timeout() else {
                    settled = true;
                    break;
                };
                prop_assert!(t > now, "poll_timeout moves forward after a drain");
                now = t;
                p.handle_timeout(now);
                m.drain(&mut p, now)?;
            }
            prop_assert!(settled, "final drain must settle");
            prop_assert_eq!(p.queued_samples(), 0);
            prop_assert_eq!(p.in_flight_samples(now + Duration::from_secs(10)), 0);
            let expected: Vec<String> = m.marks.into_iter().map(|(n, _)| n).collect();
            prop_assert_eq!(m.reported, expected);
        }
    }
}
