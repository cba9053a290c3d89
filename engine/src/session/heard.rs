//! What a Twilio caller really heard of a Realtime agent's items: a `mark` sent to the caller after
//! each piece of agent audio the pacer releases, Twilio's echoes of those marks (sent when its
//! playback reaches them), and the pacer's playout model as the fallback for a caller that never
//! echoes. A barge-in truncates the item to [`Heard::heard_ms`].
//!
//! The rule: once the caller echoed one of our marks during playback, its echoes alone decide
//! (Twilio's playback is the truth, the model only an estimate); until then the model decides.
//! Twilio echoes every pending mark at once when it gets a `clear` ("clear … causes any mark
//! messages to be sent back"), so echoes of marks sent before the last clear say nothing about
//! playback: they are ignored, and do not switch the stream to trusting echoes.
//!
//! Invariant: pure and bounded: at most [`MAX_PENDING`] pieces waiting for release and
//! [`MAX_IN_FLIGHT`] marks waiting for their echo, whatever the model or the caller send.

use std::collections::VecDeque;

/// Most pieces of audio queued in the pacer and not yet released that get a mark; a piece past
/// it gets none (the next piece's mark covers its audio, so the answer is only coarser).
pub const MAX_PENDING: usize = 1024;

/// Most marks sent to the caller and not yet echoed that are remembered; past it the oldest is
/// forgotten (a caller that never echoes must not grow the call's memory).
pub const MAX_IN_FLIGHT: usize = 256;

/// The prefix of every mark the relay sends to a caller for a Realtime agent.
const PREFIX: &str = "rt.";

/// One call's record of what its caller heard of the agent's items.
///
/// Drive it with the audio's lifecycle: [`Heard::queued`] when a piece enters the pacer,
/// [`Heard::poll_mark`] after every release (send each name to the caller, after the audio),
/// [`Heard::handle_echo`] for each echoed mark, [`Heard::handle_modelled`] when the pacer's model
/// says a piece played, [`Heard::handle_clear`] whenever the caller is sent a `clear`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Heard {
    /// Pieces in the pacer, not yet released, in push order (so by non-decreasing end position).
    pending: VecDeque<Piece>,
    /// Marks sent to the caller and not yet echoed, in send order (so by increasing number).
    in_flight: VecDeque<Sent>,
    /// The number of the next mark sent; marks are named by it, so an echo maps back to its
    /// entry in `in_flight` without trusting anything else in the name.
    next: u64,
    /// Marks numbered below this were sent before the last clear: their echoes are Twilio's flush.
    cleared_below: u64,
    /// Whether the caller echoed a mark during playback: from then on only echoes decide.
    echoes: bool,
    /// The item and offset (ms) of the last mark the caller echoed since the last clear.
    echoed: Option<(String, u64)>,
    /// The item and offset (ms) the playout model says played, since the last clear.
    modelled: Option<(String, u64)>,
}

/// What an echoed mark meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    /// One of ours, played: the caller heard its item up to its offset.
    Played,
    /// One of ours that the relay no longer tracks: sent before the last clear (Twilio's flush),
    /// or forgotten past [`MAX_IN_FLIGHT`]. Normal; ignored.
    Stale,
    /// A name the relay never sent to this caller: a protocol error.
    Unknown,
}

impl Heard {
    /// A piece of `item_id` ending at `position` (the pacer's stream coordinate, in samples) was
    /// queued; once the pacer has released up to `position`, a mark saying `end_ms` of the item
    /// were heard follows it.
    pub fn queued(&mut self, position: u64, item_id: &str, end_ms: u64) {
        if self.pending.len() < MAX_PENDING {
            self.pending.push_back(Piece { position, item_id: item_id.to_owned(), end_ms });
        }
    }

    /// The name of the next mark to send to the caller now that the pacer has released up to
    /// `released` samples, or `None`; call until `None` after every release.
    pub fn poll_mark(&mut self, released: u64) -> Option<String> {
        let piece = self.pending.front().filter(|p| p.position <= released)?;
        let name = mark_name(self.next, piece.end_ms);
        let piece = self.pending.pop_front().expect("front checked above");
        if self.in_flight.len() == MAX_IN_FLIGHT {
            self.in_flight.pop_front();
        }
        self.in_flight.push_back(Sent { number: self.next, item_id: piece.item_id, end_ms: piece.end_ms });
        self.next += 1;
        Some(name)
    }

    /// The caller echoed the mark `name`: playback reached it (or a clear flushed it).
    pub fn handle_echo(&mut self, name: &str) -> Echo {
        let Some((number, end_ms)) = parse_mark_name(name) else { return Echo::Unknown };
        if number >= self.next {
            return Echo::Unknown;
        }
        if number < self.cleared_below {
            return Echo::Stale;
        }
        let Ok(index) = self.in_flight.binary_search_by_key(&number, |s| s.number) else {
            // Forgotten past the bound, or echoed out of order after a later one.
            return Echo::Stale;
        };
        if self.in_flight[index].end_ms != end_ms {
            return Echo::Unknown;
        }
        // Twilio echoes in order: the marks sent before this one have played too.
        self.in_flight.drain(..index);
        let sent = self.in_flight.pop_front().expect("the echoed mark was at `index`");
        self.echoes = true;
        self.echoed = Some((sent.item_id, sent.end_ms));
        Echo::Played
    }

    /// The pacer's playout model says `end_ms` of `item_id` played.
    pub fn handle_modelled(&mut self, item_id: &str, end_ms: u64) {
        self.modelled = Some((item_id.to_owned(), end_ms));
    }

    /// The caller was sent a `clear`: nothing queued will play, and echoes of the marks sent so
    /// far are Twilio's flush, not playback.
    pub fn handle_clear(&mut self) {
        self.pending.clear();
        self.in_flight.clear();
        self.cleared_below = self.next;
        self.echoed = None;
        self.modelled = None;
    }

    /// How much of `item_id` (ms) the caller heard: the last echoed mark's offset once the
    /// caller echoes marks, else the playout model's; 0 when what it heard last was another item.
    pub fn heard_ms(&self, item_id: &str) -> u64 {
        let last = if self.echoes { &self.echoed } else { &self.modelled };
        match last {
            Some((item, ms)) if item == item_id => *ms,
            _ => 0,
        }
    }

    /// Whether the caller's echoes decide (it echoed a mark during playback).
    pub fn trusts_echoes(&self) -> bool {
        self.echoes
    }

    /// Whether audio was sent to the caller that it has not yet confirmed hearing (marks in
    /// flight), as far as its echoes tell.
    pub fn unconfirmed(&self) -> bool {
        !self.in_flight.is_empty()
    }
}

/// A queued piece waiting for its release.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Piece {
    /// The pacer position (samples) its audio ends at.
    position: u64,
    item_id: String,
    end_ms: u64,
}

/// A mark sent to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    number: u64,
    item_id: String,
    end_ms: u64,
}

/// `rt.<number>.<end_ms>`: short whatever the item id (Twilio echoes it verbatim), numbered so
/// the relay maps an echo back to its item, with the offset readable in a capture.
fn mark_name(number: u64, end_ms: u64) -> String {
    format!("{PREFIX}{number}.{end_ms}")
}

/// The number and offset of a name made by [`mark_name`].
fn parse_mark_name(name: &str) -> Option<(u64, u64)> {
    let (number, end_ms) = name.strip_prefix(PREFIX)?.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(number) || !digits(end_ms) {
        return None;
    }
    Some((number.parse().ok()?, end_ms.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Queues `n` pieces of item `item`, 200 ms each, releases them all, returns the marks.
    fn play(h: &mut Heard, item: &str, from_ms: u64, n: u64) -> Vec<String> {
        for k in 1..=n {
            h.queued((from_ms + k * 200) * 8, item, k * 200);
        }
        let mut names = Vec::new();
        while let Some(name) = h.poll_mark((from_ms + n * 200) * 8) {
            names.push(name);
        }
        names
    }

    /// A mark is due only once the pacer released its piece's last sample, and its name maps
    /// back to the item and offset.
    #[test]
    fn marks_follow_releases() {
        let mut h = Heard::default();
        h.queued(1600, "i1", 200);
        h.queued(3200, "i1", 400);
        assert_eq!(h.poll_mark(1599), None);
        assert_eq!(h.poll_mark(1600).as_deref(), Some("rt.0.200"));
        assert_eq!(h.poll_mark(3000), None);
        assert_eq!(h.poll_mark(3200).as_deref(), Some("rt.1.400"));
        assert_eq!(h.poll_mark(9999), None);
        assert_eq!(h.handle_echo("rt.0.200"), Echo::Played);
        assert_eq!(h.heard_ms("i1"), 200);
        assert!(h.unconfirmed());
        assert_eq!(h.handle_echo("rt.1.400"), Echo::Played);
        assert_eq!(h.heard_ms("i1"), 400);
        assert_eq!(h.heard_ms("other"), 0, "what was heard last belongs to another item");
        assert!(!h.unconfirmed());
    }

    /// Until the caller echoes, the playout model decides; after its first echo, only echoes do.
    #[test]
    fn echoes_replace_the_model_once_they_come() {
        let mut h = Heard::default();
        let names = play(&mut h, "i1", 0, 5);
        h.handle_modelled("i1", 800);
        assert!(!h.trusts_echoes());
        assert_eq!(h.heard_ms("i1"), 800, "no echo yet: the model's estimate");
        assert_eq!(h.handle_echo(&names[1]), Echo::Played);
        assert!(h.trusts_echoes());
        assert_eq!(h.heard_ms("i1"), 400, "the caller heard less than the model thought");
        h.handle_modelled("i1", 1000);
        assert_eq!(h.heard_ms("i1"), 400, "the model no longer counts");
    }

    /// Echoes of marks sent before a clear are Twilio's flush: ignored, not heard, and they do
    /// not make the stream trust echoes.
    #[test]
    fn echoes_after_a_clear_do_not_count() {
        let mut h = Heard::default();
        let names = play(&mut h, "i1", 0, 5);
        assert_eq!(h.handle_echo(&names[0]), Echo::Played);
        h.handle_clear();
        for name in &names[1..] {
            assert_eq!(h.handle_echo(name), Echo::Stale);
        }
        assert_eq!(h.heard_ms("i1"), 0, "the clear ended the item; the flush adds nothing");

        let mut quiet = Heard::default();
        let names = play(&mut quiet, "i1", 0, 3);
        quiet.handle_clear();
        for name in &names {
            assert_eq!(quiet.handle_echo(name), Echo::Stale);
        }
        assert!(!quiet.trusts_echoes(), "a flush says nothing about playback");
        let _ = play(&mut quiet, "i2", 600, 3);
        quiet.handle_modelled("i2", 400);
        assert_eq!(quiet.heard_ms("i2"), 400, "still the model's estimate");
    }

    /// Names the relay never sent are unknown; a skipped echo implies the earlier marks played.
    #[test]
    fn unknown_and_skipped_echoes() {
        let mut h = Heard::default();
        let names = play(&mut h, "i1", 0, 3);
        for bad in ["user-mark", "rt.", "rt.9.200", "rt.0.999", "rt.x.200", "rt.0.200.1", "rt.+0.200"] {
            assert_eq!(h.handle_echo(bad), Echo::Unknown, "{bad}");
        }
        assert_eq!(h.handle_echo(&names[2]), Echo::Played);
        assert_eq!(h.heard_ms("i1"), 600);
        assert!(!h.unconfirmed(), "the marks before it are no longer waited for");
        assert_eq!(h.handle_echo(&names[0]), Echo::Stale, "an echo out of order is ignored");
        assert_eq!(h.heard_ms("i1"), 600);
    }

    /// Pending pieces and marks in flight stay bounded when the caller never echoes.
    #[test]
    fn memory_is_bounded() {
        let mut h = Heard::default();
        for k in 0..(MAX_PENDING as u64 + 10) {
            h.queued(k, "i1", k);
        }
        assert_eq!(h.pending.len(), MAX_PENDING);
        let mut sent = Vec::new();
        while let Some(name) = h.poll_mark(u64::MAX) {
            sent.push(name);
        }
        assert_eq!(sent.len(), MAX_PENDING);
        assert_eq!(h.in_flight.len(), MAX_IN_FLIGHT);
        assert_eq!(h.handle_echo(&sent[0]), Echo::Stale, "forgotten, not an error");
        assert_eq!(h.handle_echo(&sent[MAX_PENDING - 1]), Echo::Played);
    }
}
