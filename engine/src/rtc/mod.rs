//! One core's WebRTC peers (str0m), behind an API of our own: SDP offers in, answers out; datagrams
//! and time in, datagrams, peer events and deadlines out.
//!
//! Every peer is ICE-lite with one host candidate: this core's UDP socket. Datagrams reach their
//! peer in O(1): STUN binding requests by the ufrag in their `USERNAME` (each peer gets random ICE
//! credentials, so the ufrag is also unguessable), everything else by the remote address a valid
//! request came from. The str0m drive loop is followed exactly: every input to a peer is followed
//! by a full drain of its output. Trickled candidates and ICE restarts (WHIP/WHEP `PATCH`) arrive as
//! [`sdpfrag::IceFragment`]s: a restart re-applies the peer's own offer with its new credentials,
//! which is how str0m restarts ICE on the answering side, and the ufrag demultiplexing follows.
//!
//! Invariant: sans-IO (no sockets, no clock); str0m types stay inside this module.

pub mod sdpfrag;
pub mod stun;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use str0m::change::SdpOffer;
use str0m::media::{Direction, MediaTime, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, IceCreds, Input, Output, Rtc};

/// A peer's id on its core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The process's DTLS certificate, shared by every peer on every core (its fingerprint is in every
/// answer).
#[derive(Clone)]
pub struct Certificate(str0m::config::DtlsCert);

impl Certificate {
    /// A new self-signed certificate.
    ///
    /// # Errors
    /// When the crypto provider cannot make one (it always can with the built-in provider).
    pub fn generate() -> Result<Self, OfferError> {
        str0m::crypto::from_feature_flags()
            .dtls_provider
            .generate_certificate()
            .map(Self)
            .ok_or(OfferError::Internal("no DTLS certificate could be generated"))
    }
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Certificate(..)")
    }
}

/// A peer built ahead of its offer. Building one costs about a millisecond (mostly DTLS setup),
/// accepting an offer on it about 50 µs, so cores keep a few ready, built off the core's thread,
/// and a burst of offers does not stall the calls a core carries.
pub struct Prepared {
    rtc: Rtc,
    ufrag: String,
}

impl Prepared {
    /// A new ICE-lite, Opus-only peer with random ICE credentials and the process's certificate.
    pub fn new(cert: &Certificate, now: Instant) -> Self {
        let creds = IceCreds::new();
        let ufrag = creds.ufrag.clone();
        let rtc = Rtc::builder()
            .set_ice_lite(true)
            .set_dtls_cert(cert.0.clone())
            .set_local_ice_credentials(creds)
            .clear_codecs()
            .enable_opus(true, false)
            // The relay runs its own playout buffer: packets are handed over as they arrive.
            .set_reordering_size_audio(0)
            .build(now);
        Self { rtc, ufrag }
    }
}

impl fmt::Debug for Prepared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Prepared(..)")
    }
}

// Prepared peers are built on another thread and moved to their core.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<Prepared>();
    send::<Certificate>();
};

/// Prepared peers a core keeps ready.
pub const SPARES: usize = 4;

/// What the relay does with a peer's audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Publishing (WHIP): the relay must receive audio; it also sends if the offer lets it.
    Receive,
    /// Listening (WHEP): the relay must send audio.
    Send,
}

/// Why an offer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    /// Not parseable SDP.
    #[error("the offer is not valid SDP: {0}")]
    Malformed(String),
    /// No audio section.
    #[error("the offer has no audio section")]
    NoAudio,
    /// Audio, but not Opus.
    #[error("the offer's audio has no codec the relay supports (Opus 48 kHz)")]
    UnsupportedCodec,
    /// The audio flows the wrong way for the endpoint.
    #[error("the offer's audio direction does not fit: {0}")]
    Direction(&'static str),
    /// The core holds as many peers as it may.
    #[error("this core has its limit of {limit} WebRTC peers")]
    TooManyPeers {
        /// The configured limit.
        limit: usize,
    },
    /// str0m refused the offer for a reason of its own.
    #[error("the offer could not be accepted: {0}")]
    Refused(String),
    /// A bug or a resource failure.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// What a trickle-ICE fragment did to a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IceUpdate {
    /// Candidates were added to the ICE session in use.
    Trickled,
    /// ICE restarted: the relay's answer fragment with its new credentials and candidate.
    Restarted {
        /// `application/trickle-ice-sdpfrag` text.
        fragment: String,
    },
}

/// Why a trickle-ICE fragment was refused (the ICE session in use is kept).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IceError {
    /// The peer is gone.
    #[error("the WebRTC leg is gone")]
    Gone,
    /// The fragment does not fit the peer's session.
    #[error("{0}")]
    Mismatch(String),
    /// str0m refused the restart.
    #[error("the ICE restart could not be applied: {0}")]
    Refused(String),
}

/// How a peer's audio flows, from the relay's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// The relay receives the peer's audio.
    pub receives: bool,
    /// The relay sends audio to the peer.
    pub sends: bool,
}

/// Something that happened to a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// ICE and DTLS are up: media flows from now on.
    Connected(PeerId),
    /// An Opus packet from the peer, in arrival order (not necessarily sequence order).
    Audio {
        /// The peer.
        peer: PeerId,
        /// Its RTP sequence number (extended past wrap-around).
        seq: u64,
        /// Its RTP timestamp (48 kHz clock).
        rtp_time: u64,
        /// The Opus packet.
        payload: Bytes,
    },
    /// The peer is gone (ICE consent lost, DTLS closed, or an error); it has been removed.
    Closed {
        /// The peer.
        peer: PeerId,
        /// Why, for logs and events.
        reason: &'static str,
    },
}

/// A datagram to send from this core's socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// Where to.
    pub to: SocketAddr,
    /// The bytes.
    pub data: Vec<u8>,
}

/// Counters of the endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Peers now.
    pub peers: usize,
    /// Datagrams that matched no peer (dropped).
    pub unmatched: u64,
    /// Datagrams a peer refused (str0m error on input).
    pub refused: u64,
    /// Trickled candidates the relay could not use (mDNS names, unknown transports), skipped.
    pub skipped_candidates: u64,
}

struct Peer {
    rtc: Rtc,
    /// The relay's ICE ufrag for this peer (the demultiplexing key; also the ICE session's
    /// entity-tag, which changes with it on a restart).
    ufrag: String,
    /// The peer's offer with its current ICE credentials and no candidates: an ICE restart
    /// re-applies it with the new ones (bounded by the HTTP body limit of the offer).
    offer: String,
    /// The peer's current ICE credentials (ufrag, pwd) from its offer or its last restart.
    remote: Option<(String, String)>,
    /// The `a=mid` values of the offer's sections (a trickled fragment may name only these).
    mids: Vec<String>,
    /// The audio section and its Opus payload type.
    mid: Mid,
    pt: Pt,
    flow: Flow,
    connected: bool,
    /// Remote addresses routed to this peer (bounded).
    remotes: Vec<SocketAddr>,
    /// The deadline this peer's timer entry is valid for.
    armed: Option<Instant>,
    /// RTP clock of the audio the relay sends: next timestamp, and when the last frame went.
    send_clock: Option<(u64, Instant)>,
    /// When the offer was accepted: a peer not connected by [`CONNECT_DEADLINE`] is dropped.
    created: Instant,
    /// Candidates trickled in this ICE session (reset by a restart): str0m keeps every remote
    /// candidate until a restart, so a client may add at most [`TRICKLED_PER_SESSION`].
    trickled: usize,
}

/// How long an accepted offer may take to connect (ICE and DTLS) before its leg is dropped.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(30);

/// Candidates a client may trickle into one ICE session (a browser gathers a handful per
/// interface; two full fragments' worth).
pub const TRICKLED_PER_SESSION: usize = 2 * sdpfrag::MAX_CANDIDATES;

/// Remote addresses one peer may be reached from (ICE may try a few).
const REMOTES_PER_PEER: usize = 4;
/// The soonest a peer's timer is re-armed after `now` (str0m may ask to be polled again at once).
const MIN_REARM: Duration = Duration::from_millis(1);

/// Opus's RTP clock.
const OPUS_HZ: u64 = 48_000;

/// One core's WebRTC peers.
pub struct Endpoint {
    cert: Certificate,
    /// The host candidate every answer names: this core's socket as peers reach it.
    candidate: SocketAddr,
    max_peers: usize,
    peers: HashMap<PeerId, Peer>,
    by_ufrag: HashMap<String, PeerId>,
    by_addr: HashMap<SocketAddr, PeerId>,
    timers: BinaryHeap<Reverse<(Instant, PeerId)>>,
    spares: Vec<Prepared>,
    events: VecDeque<PeerEvent>,
    transmits: VecDeque<Datagram>,
    next: u64,
    stats: EndpointStats,
}

impl Endpoint {
    /// An endpoint whose answers name `candidate` (this core's UDP socket as peers reach it), with
    /// at most `max_peers` peers.
    pub fn new(cert: Certificate, candidate: SocketAddr, max_peers: usize) -> Self {
        Self {
            cert,
            candidate,
            max_peers,
            peers: HashMap::new(),
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
            timers: BinaryHeap::new(),
            spares: Vec::new(),
            events: VecDeque::new(),
            transmits: VecDeque::new(),
            next: 1,
            stats: EndpointStats::default(),
        }
    }

    /// The candidate address answers name.
    pub fn candidate(&self) -> SocketAddr {
        self.candidate
    }

    /// The process's certificate (to prepare peers with, on any thread).
    pub fn certificate(&self) -> &Certificate {
        &self.cert
    }

    /// Whether fewer than [`SPARES`] prepared peers are ready.
    pub fn wants_spare(&self) -> bool {
        self.spares.len() < SPARES
    }

    /// Keeps `spare` for the next offer (dropped if enough are ready).
    pub fn add_spare(&mut self, spare: Prepared) {
        if self.wants_spare() {
            self.spares.push(spare);
        }
    }

    /// Accepts an SDP offer: a new peer with its answer.
    ///
    /// # Errors
    /// [`OfferError`] when the offer is not SDP, has no Opus audio, flows the wrong way for
    /// `want`, or the core is full.
    pub fn accept(&mut self, now: Instant, offer: &str, want: Want) -> Result<(PeerId, String, Flow), OfferError> {
        if self.peers.len() >= self.max_peers {
            return Err(OfferError::TooManyPeers { limit: self.max_peers });
        }
        let offered_audio = offer.lines().any(|l| l.trim_start().starts_with("m=audio "));
        let remote = remote_credentials(offer);
        let mids: Vec<String> =
            offer.lines().filter_map(|l| l.trim().strip_prefix("a=mid:")).map(str::to_owned).take(16).collect();
        let stored = with_credentials(offer, None);
        let offer = SdpOffer::from_sdp_string(offer).map_err(|e| OfferError::Malformed(short(&e.to_string())))?;
        // A spare built earlier off the core, else one built now (a burst beyond the spares).
        let Prepared { mut rtc, ufrag } = self.spares.pop().unwrap_or_else(|| Prepared::new(&self.cert, now));
        let candidate = Candidate::host(self.candidate, Protocol::Udp)
            .map_err(|_| OfferError::Internal("the relay's candidate address is not usable"))?;
        rtc.add_local_candidate(candidate);
        let answer = rtc.sdp_api().accept_offer(offer).map_err(|e| OfferError::Refused(short(&e.to_string())))?;
        let answer = answer.to_sdp_string();
        // What the answer accepted: its first audio section with Opus (str0m announces media only
        // once the peer connects, so the answer itself is read).
        let (mid, pt, direction) = match answered_audio(&answer) {
            Answered::Opus { mid, pt, direction } => (Mid::from(mid.as_str()), Pt::from(pt), direction),
            Answered::NoOpus => return Err(OfferError::UnsupportedCodec),
            // str0m rejects (port 0) an audio section it has no codec for.
            Answered::NoAudio if offered_audio => return Err(OfferError::UnsupportedCodec),
            Answered::NoAudio => return Err(OfferError::NoAudio),
        };
        // The answer says what Relay sends (20 ms packets) and what it takes (any Opus duration).
        let answer = with_ptime(&answer, &mid);
        let flow = Flow {
            receives: matches!(direction, Direction::RecvOnly | Direction::SendRecv),
            sends: matches!(direction, Direction::SendOnly | Direction::SendRecv),
        };
        match want {
            Want::Receive if !flow.receives => return Err(OfferError::Direction("a publisher must send audio")),
            Want::Send if !flow.sends => return Err(OfferError::Direction("a listener must receive audio")),
            _ => {}
        }
        let id = PeerId(self.next);
        self.next += 1;
        self.by_ufrag.insert(ufrag.clone(), id);
        self.peers.insert(
            id,
            Peer {
                rtc,
                ufrag,
                offer: stored,
                remote,
                mids,
                mid,
                pt,
                flow,
                connected: false,
                remotes: Vec::new(),
                armed: None,
                send_clock: None,
                created: now,
                trickled: 0,
            },
        );
        self.stats.peers = self.peers.len();
        self.drive(id, now);
        Ok((id, answer, flow))
    }

    /// A datagram from `source` reached this core's socket.
    pub fn handle_datagram(&mut self, now: Instant, source: SocketAddr, data: &[u8]) {
        let peer = match stun::kind(data) {
            // A binding request names its peer; it also (re)binds the sender's address to it.
            stun::Kind::Stun => match stun::request_ufrag(data).and_then(|u| self.by_ufrag.get(u)).copied() {
                Some(id) => Some(id),
                None => self.by_addr.get(&source).copied(),
            },
            stun::Kind::Dtls | stun::Kind::Rtp => self.by_addr.get(&source).copied(),
            stun::Kind::Other => None,
        };
        let Some(id) = peer else {
            self.stats.unmatched += 1;
            return;
        };
        let Some(p) = self.peers.get_mut(&id) else {
            self.stats.unmatched += 1;
            return;
        };
        let Ok(receive) = Receive::new(Protocol::Udp, source, self.candidate, data) else {
            self.stats.refused += 1;
            return;
        };
        let input = Input::Receive(now, receive);
        if !p.rtc.accepts(&input) {
            self.stats.refused += 1;
            return;
        }
        if p.rtc.handle_input(input).is_err() {
            self.stats.refused += 1;
        } else if let Some(i) = p.remotes.iter().position(|a| *a == source) {
            // Seen again (media or a check): the most recently used, so the last to make room for
            // a new path; the path in use is never the one evicted.
            if i + 1 < p.remotes.len() {
                let again = p.remotes.remove(i);
                p.remotes.push(again);
            }
        } else if stun::kind(data) == stun::Kind::Stun {
            if p.remotes.len() >= REMOTES_PER_PEER {
                let old = p.remotes.remove(0);
                self.by_addr.remove(&old);
            }
            p.remotes.push(source);
            if let Some(other) = self.by_addr.insert(source, id) {
                if other != id {
                    if let Some(o) = self.peers.get_mut(&other) {
                        o.remotes.retain(|a| *a != source);
                    }
                }
            }
        }
        self.drive(id, now);
    }

    /// Advances every peer whose deadline has come.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((at, id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(p) = self.peers.get_mut(&id) else { continue };
            if p.armed != Some(at) {
                continue;
            }
            p.armed = None;
            if p.rtc.handle_input(Input::Timeout(now)).is_err() {
                self.remove(id, "timeout handling failed");
                continue;
            }
            self.drive(id, now);
        }
    }

    /// The entity-tag of `peer`'s ICE session (RFC 9725 §4.3.1): its local ufrag, which is
    /// random per peer and new after each restart.
    pub fn ice_tag(&self, peer: PeerId) -> Option<&str> {
        self.peers.get(&peer).map(|p| p.ufrag.as_str())
    }

    /// Applies a trickle-ICE fragment a client `PATCH`ed for `peer`: with the peer's current
    /// credentials (or none) its candidates are added; with a new ufrag and pwd it is an ICE
    /// restart: the relay takes new credentials of its own, answers them, and from then on
    /// routes binding requests by the new ufrag only. Candidates the relay cannot use (mDNS
    /// names, unknown transports) are skipped, as RFC 8839 lets an agent do.
    ///
    /// # Errors
    /// [`IceError`] when the peer is gone, the fragment names a section the peer does not have,
    /// changes the password without the ufrag, or str0m refuses the restart; the ICE session in
    /// use is then kept, as RFC 9725 §4.3.3 asks.
    pub fn handle_ice_fragment(
        &mut self,
        now: Instant,
        peer: PeerId,
        fragment: &sdpfrag::IceFragment,
    ) -> Result<IceUpdate, IceError> {
        let p = self.peers.get_mut(&peer).ok_or(IceError::Gone)?;
        if let Some(mid) = fragment.mids.iter().find(|m| !p.mids.contains(m)) {
            return Err(IceError::Mismatch(format!(
                "the fragment names mid {}, which this session does not have",
                short(mid)
            )));
        }
        let restart = match (&fragment.ufrag, &fragment.pwd, &p.remote) {
            (Some(u), pwd, Some((ru, rp))) if u == ru => {
                if pwd.as_ref().is_some_and(|w| w != rp) {
                    return Err(IceError::Mismatch("a=ice-pwd changed without a new a=ice-ufrag".to_owned()));
                }
                None
            }
            (Some(u), Some(w), _) => Some((u.clone(), w.clone())),
            (Some(_), None, _) => {
                return Err(IceError::Mismatch("an ICE restart (a new a=ice-ufrag) needs its a=ice-pwd".to_owned()))
            }
            (None, _, _) => None,
        };
        if restart.is_none() && p.trickled + fragment.candidates.len() > TRICKLED_PER_SESSION {
            return Err(IceError::Mismatch(format!(
                "at most {TRICKLED_PER_SESSION} candidates may be trickled in one ICE session"
            )));
        }
        let update = match restart {
            None => IceUpdate::Trickled,
            Some(creds) => {
                let offer = with_credentials(&p.offer, Some((&creds.0, &creds.1)));
                let parsed = SdpOffer::from_sdp_string(&offer).map_err(|e| IceError::Refused(short(&e.to_string())))?;
                let answer = p.rtc.sdp_api().accept_offer(parsed);
                // Whatever str0m did, the demultiplexing follows the credentials it now has.
                let local = p.rtc.direct_api().local_ice_credentials();
                if local.ufrag != p.ufrag {
                    let old = std::mem::replace(&mut p.ufrag, local.ufrag.clone());
                    self.by_ufrag.remove(&old);
                    self.by_ufrag.insert(local.ufrag.clone(), peer);
                }
                let answer = answer.map_err(|e| IceError::Refused(short(&e.to_string())))?.to_sdp_string();
                p.offer = offer;
                p.remote = Some(creds);
                p.trickled = 0;
                IceUpdate::Restarted { fragment: restart_fragment(&answer, &local.ufrag, &local.pass) }
            }
        };
        let p = self.peers.get_mut(&peer).ok_or(IceError::Gone)?;
        p.trickled += fragment.candidates.len();
        for line in &fragment.candidates {
            match Candidate::from_sdp_string(line) {
                Ok(c) => p.rtc.add_remote_candidate(c),
                Err(_) => self.stats.skipped_candidates += 1,
            }
        }
        self.drive(peer, now);
        Ok(update)
    }

    /// Sends one Opus packet of `samples` (at 48 kHz) to `peer`. Returns false when the peer cannot
    /// take audio (not connected, not sending, gone).
    pub fn write_audio(&mut self, now: Instant, peer: PeerId, opus: &[u8], samples: u32) -> bool {
        let Some(p) = self.peers.get_mut(&peer) else { return false };
        if !p.connected || !p.flow.sends {
            return false;
        }
        // The RTP clock runs with the audio; after a pause it jumps by the time that passed, so the
        // peer's jitter buffer sees the gap as time, not as a burst.
        let ts = match p.send_clock {
            None => 0,
            Some((next, last)) => {
                let gap = now.saturating_duration_since(last);
                if gap > Duration::from_millis(60) {
                    next.saturating_add(duration_to_rtp(gap)).saturating_sub(u64::from(samples))
                } else {
                    next
                }
            }
        };
        p.send_clock = Some((ts.saturating_add(u64::from(samples)), now));
        let (mid, pt) = (p.mid, p.pt);
        let Some(writer) = p.rtc.writer(mid) else { return false };
        let ok = writer.write(pt, now, MediaTime::new(ts, str0m::media::Frequency::FORTY_EIGHT_KHZ), opus).is_ok();
        self.drive(peer, now);
        ok
    }

    /// Ends `peer` (its leg was deleted or its session ended): DTLS `close_notify` goes out so the
    /// peer learns at once; no event follows.
    pub fn close(&mut self, peer: PeerId) {
        if let Some(mut p) = self.peers.remove(&peer) {
            if p.rtc.close().is_ok() {
                while let Ok(output) = p.rtc.poll_output() {
                    match output {
                        Output::Transmit(t) => {
                            self.transmits.push_back(Datagram { to: t.destination, data: t.contents.into() });
                        }
                        Output::Event(_) => {}
                        Output::Timeout(_) => break,
                    }
                }
            }
            p.rtc.disconnect();
            self.forget(peer, &p);
        }
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<PeerEvent> {
        self.events.pop_front()
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Datagram> {
        self.transmits.pop_front()
    }

    /// When [`Self::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// How `peer`'s audio flows, if it exists.
    pub fn flow(&self, peer: PeerId) -> Option<Flow> {
        self.peers.get(&peer).map(|p| p.flow)
    }

    /// Counters.
    pub fn stats(&self) -> EndpointStats {
        self.stats
    }

    /// Drains `id`'s output completely: datagrams, events, and its next deadline.
    fn drive(&mut self, id: PeerId, now: Instant) {
        let mut closed = None;
        let Some(p) = self.peers.get_mut(&id) else { return };
        let deadline = (!p.connected).then(|| p.created + CONNECT_DEADLINE);
        if deadline.is_some_and(|d| now >= d) {
            return self.remove(id, "no connection within the deadline");
        }
        loop {
            match p.rtc.poll_output() {
                Ok(Output::Timeout(at)) => {
                    if !p.rtc.is_alive() {
                        closed = Some("connection closed");
                        break;
                    }
                    // A peer still connecting wakes at its deadline at the latest; "again now" is
                    // a millisecond on, so one call of `handle_timeout` (fixed `now`) always ends.
                    let at = deadline.map_or(at, |d| at.min(d)).max(now + MIN_REARM);
                    if p.armed != Some(at) {
                        p.armed = Some(at);
                        self.timers.push(Reverse((at, id)));
                    }
                    break;
                }
                Ok(Output::Transmit(t)) => {
                    self.transmits.push_back(Datagram { to: t.destination, data: t.contents.into() })
                }
                Ok(Output::Event(e)) => match e {
                    Event::Connected => {
                        p.connected = true;
                        self.events.push_back(PeerEvent::Connected(id));
                    }
                    Event::Closed => {
                        closed = Some("the peer closed the connection");
                        break;
                    }
                    Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                        closed = Some("ICE connectivity lost");
                        break;
                    }
                    Event::MediaData(d) if d.mid == p.mid && p.flow.receives => {
                        self.events.push_back(PeerEvent::Audio {
                            peer: id,
                            seq: **d.seq_range.start(),
                            rtp_time: d.time.numer(),
                            payload: Bytes::copy_from_slice(&d.data),
                        });
                    }
                    _ => {}
                },
                Err(_) => {
                    closed = Some("WebRTC error");
                    break;
                }
            }
        }
        if let Some(reason) = closed {
            self.remove(id, reason);
        }
    }

    fn remove(&mut self, id: PeerId, reason: &'static str) {
        if let Some(p) = self.peers.remove(&id) {
            self.forget(id, &p);
            self.events.push_back(PeerEvent::Closed { peer: id, reason });
        }
    }

    fn forget(&mut self, id: PeerId, p: &Peer) {
        self.by_ufrag.remove(&p.ufrag);
        for a in &p.remotes {
            if self.by_addr.get(a) == Some(&id) {
                self.by_addr.remove(a);
            }
        }
        self.stats.peers = self.peers.len();
    }
}

/// What an SDP answer accepted for audio.
#[derive(Debug, PartialEq, Eq)]
enum Answered {
    Opus { mid: String, pt: u8, direction: Direction },
    NoOpus,
    NoAudio,
}

/// Reads the first accepted (non-zero port) audio section of `sdp`: its mid, Opus payload type and
/// direction.
fn answered_audio(sdp: &str) -> Answered {
    let mut found_audio = false;
    let mut sections = sdp.split("\nm=").skip(1);
    for section in sections.by_ref() {
        let mut lines = section.lines().map(str::trim);
        let Some(m) = lines.next() else { continue };
        let fields: Vec<&str> = m.split_whitespace().collect();
        if fields.first() != Some(&"audio") || fields.get(1) == Some(&"0") {
            continue;
        }
        found_audio = true;
        let (mut mid, mut pt, mut direction) = (None, None, Direction::SendRecv);
        for line in lines {
            if let Some(v) = line.strip_prefix("a=mid:") {
                mid = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("a=rtpmap:") {
                let (number, codec) = v.split_once(' ').unwrap_or((v, ""));
                if codec.to_ascii_lowercase().starts_with("opus/48000") && pt.is_none() {
                    pt = number.parse().ok();
                }
            } else {
                match line {
                    "a=sendrecv" => direction = Direction::SendRecv,
                    "a=sendonly" => direction = Direction::SendOnly,
                    "a=recvonly" => direction = Direction::RecvOnly,
                    "a=inactive" => direction = Direction::Inactive,
                    _ => {}
                }
            }
        }
        if let (Some(mid), Some(pt)) = (mid, pt) {
            return Answered::Opus { mid, pt, direction };
        }
    }
    if found_audio {
        Answered::NoOpus
    } else {
        Answered::NoAudio
    }
}

/// The first `a=ice-ufrag` and `a=ice-pwd` of an SDP description.
fn remote_credentials(sdp: &str) -> Option<(String, String)> {
    let find = |prefix: &str| sdp.lines().find_map(|l| l.trim().strip_prefix(prefix).map(str::to_owned));
    Some((find("a=ice-ufrag:")?, find("a=ice-pwd:")?))
}

/// `sdp` without its candidates (str0m keeps those it was given), with every `a=ice-ufrag` and
/// `a=ice-pwd` replaced by `creds` when given.
fn with_credentials(sdp: &str, creds: Option<(&str, &str)>) -> String {
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.lines().map(|l| l.trim_end_matches('\r')) {
        if line.starts_with("a=candidate:") || line == "a=end-of-candidates" {
            continue;
        }
        match creds {
            Some((ufrag, _)) if line.starts_with("a=ice-ufrag:") => out.push_str(&format!("a=ice-ufrag:{ufrag}")),
            Some((_, pwd)) if line.starts_with("a=ice-pwd:") => out.push_str(&format!("a=ice-pwd:{pwd}")),
            _ => out.push_str(line),
        }
        out.push_str("\r\n");
    }
    out
}

/// The answer fragment of an ICE restart from the full answer str0m made: the new credentials,
/// the first accepted section (the BUNDLE tag) with its mid, and the relay's candidates.
fn restart_fragment(answer: &str, ufrag: &str, pwd: &str) -> String {
    let mut section = None;
    for s in answer.split("\nm=").skip(1) {
        let mut lines = s.lines().map(str::trim);
        let Some(m) = lines.next() else { continue };
        if m.split_whitespace().nth(1) == Some("0") {
            continue;
        }
        if let Some(mid) = lines.find_map(|l| l.strip_prefix("a=mid:")) {
            section = Some((format!("m={m}"), mid.to_owned()));
            break;
        }
    }
    let candidates: Vec<&str> =
        answer.lines().filter_map(|l| l.trim().strip_prefix("a=")).filter(|a| a.starts_with("candidate:")).collect();
    let sections: Vec<(&str, &str)> = section.iter().map(|(m, mid)| (m.as_str(), mid.as_str())).collect();
    sdpfrag::restart_answer(ufrag, pwd, &sections, &candidates)
}

/// `sdp` with `a=ptime:20` and `a=maxptime:120` added to the audio section of `mid` (unless it
/// states them already): Relay sends 20 ms Opus packets, and its playout takes any Opus packet
/// duration up to 120 ms (RFC 7587 §7).
fn with_ptime(sdp: &str, mid: &str) -> String {
    let mut out = String::with_capacity(sdp.len() + 40);
    let mut section: Vec<&str> = Vec::new();
    let flush = |section: &mut Vec<&str>, out: &mut String| {
        let ours = section.first().is_some_and(|m| m.starts_with("m=audio "))
            && section.iter().any(|l| l.strip_prefix("a=mid:") == Some(mid));
        for line in section.iter() {
            out.push_str(line);
            out.push_str("\r\n");
        }
        if ours {
            for (name, line) in [("a=ptime:", "a=ptime:20"), ("a=maxptime:", "a=maxptime:120")] {
                if !section.iter().any(|l| l.starts_with(name)) {
                    out.push_str(line);
                    out.push_str("\r\n");
                }
            }
        }
        section.clear();
    };
    for line in sdp.lines() {
        if line.starts_with("m=") {
            flush(&mut section, &mut out);
        }
        section.push(line);
    }
    flush(&mut section, &mut out);
    out
}

fn duration_to_rtp(d: Duration) -> u64 {
    u64::try_from(d.as_micros() * u128::from(OPUS_HZ) / 1_000_000).unwrap_or(u64::MAX / 2)
}

/// An error text bounded for a response body.
fn short(s: &str) -> String {
    let mut end = s.len().min(200);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests;
