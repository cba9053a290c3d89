//! WebRTC legs on a core: WHIP/WHEP offers, datagrams, peer events, and the routing of audio that
//! involves a WebRTC leg or needs PCM (the WHEP mix, voice activity, raw samples on `/ws`).
//!
//! Invariant: sans-IO like the rest of the core; every frame is converted at most once per format.

use std::collections::HashMap;
use std::net::SocketAddr;

use bytes::Bytes;
use serde_json::json;

use super::command::{CommandError, IceRestart, Reply, RtcOffer, RtcPatch, RtcRole};
use super::{agent_audio_out, authorizes, codec_timing, to_frontends, CoreState, LegKind, ListenKind, Output};
use crate::id::{SessionId, StreamId};
use crate::media::opus::OpusSettings;
use crate::media::playout::PlayoutConfig;
use crate::media::vad::VadEvent;
use crate::proto::events::{self, RetellEvent};
use crate::proto::{frontend, twilio};
use crate::rtc::{Endpoint, IceError, IceUpdate, OfferError, PeerEvent, PeerId, Want};
use crate::session::media::{self, Mixer, Pcm, RtcLeg, Side};
use crate::session::{Agent, Pending, Source, AGENT_BACKLOG};
use crate::time::Now;

/// An agent that sends no audio this long has stopped talking (the VAD's own hangover, ~300 ms,
/// applies while frames arrive).
const AGENT_QUIET: std::time::Duration = std::time::Duration::from_millis(300);

/// Opus samples of one 20 ms frame on the wire (48 kHz clock).
const WIRE_SAMPLES: u32 = 960;

/// The core's WebRTC endpoint and what it needs to make legs.
pub(super) struct RtcState {
    pub(super) endpoint: Endpoint,
    /// Which session each peer belongs to.
    pub(super) peers: HashMap<PeerId, SessionId>,
    pub(super) opus: OpusSettings,
    pub(super) playout: PlayoutConfig,
}

impl CoreState {
    /// Enables WebRTC legs on this core: `endpoint` carries their peers; audio toward peers is
    /// encoded with `opus`, audio from them goes through playout buffers made with `playout`.
    #[must_use]
    pub fn with_rtc(mut self, endpoint: Endpoint, opus: OpusSettings, playout: PlayoutConfig) -> Self {
        self.rtc = Some(RtcState { endpoint, peers: HashMap::new(), opus, playout });
        self
    }

    /// The certificate to prepare a spare peer with, when the endpoint wants one.
    pub fn wants_spare_peer(&self) -> Option<crate::rtc::Certificate> {
        let rtc = self.rtc.as_ref()?;
        rtc.endpoint.wants_spare().then(|| rtc.endpoint.certificate().clone())
    }

    /// A peer prepared off the core, for the next offer.
    pub fn add_spare_peer(&mut self, spare: crate::rtc::Prepared) {
        if let Some(rtc) = self.rtc.as_mut() {
            rtc.endpoint.add_spare(spare);
        }
    }

    /// A datagram from `source` reached this core's WebRTC socket.
    pub fn handle_datagram(&mut self, now: Now, source: SocketAddr, data: &[u8]) {
        let Some(rtc) = self.rtc.as_mut() else { return };
        rtc.endpoint.handle_datagram(now.instant, source, data);
        self.drain_rtc_events(now);
    }

    /// WHIP or WHEP: a new leg for session `id` from an SDP offer.
    pub(super) fn rtc_offer(&mut self, now: Now, id: &SessionId, offer: RtcOffer) -> Result<Reply, CommandError> {
        if self.shutting_down {
            return Err(CommandError::ShuttingDown);
        }
        let rtc = self.rtc.as_mut().ok_or(CommandError::RtcDisabled)?;
        let slot = self.slots.get_mut(id).ok_or(CommandError::NotFound)?;
        let listeners = slot.listeners.len();
        let session = slot.session.as_mut().ok_or(CommandError::NotFound)?;
        if !authorizes(session, &offer.credential) {
            return Err(CommandError::Unauthorized);
        }
        let conflict = match &offer.role {
            RtcRole::Caller if session.caller.is_some() || session.leg(&RtcRole::Caller).is_some() => {
                Some(format!("session {id} already has a caller"))
            }
            RtcRole::Agent if session.agent != Agent::None => Some(format!("session {id} already has an agent")),
            RtcRole::Custom(s) if session.leg(&offer.role).is_some() => {
                Some(format!("session {id} already has a custom stream {s}"))
            }
            _ => None,
        };
        if let Some(c) = conflict {
            return Err(CommandError::Conflict(c));
        }
        if session.legs.len() >= self.limits.rtc_legs_per_session {
            return Err(CommandError::Limit(format!(
                "session {id} has its limit of {} WebRTC legs",
                self.limits.rtc_legs_per_session
            )));
        }
        let whep = session.legs.iter().filter(|l| l.role == RtcRole::Listener).count();
        if offer.role == RtcRole::Listener && whep + listeners >= self.limits.observers_per_session {
            return Err(CommandError::Limit(format!(
                "session {id} has its limit of {} listeners",
                self.limits.observers_per_session
            )));
        }
        let want = if offer.role == RtcRole::Listener { Want::Send } else { Want::Receive };
        let (peer, sdp, flow) = rtc.endpoint.accept(now.instant, &offer.sdp, want).map_err(|e| match e {
            OfferError::TooManyPeers { .. } => CommandError::Limit(e.to_string()),
            OfferError::Internal(_) => CommandError::Internal,
            e => CommandError::BadOffer(e.to_string()),
        })?;
        rtc.peers.insert(peer, id.clone());
        if offer.role == RtcRole::Agent {
            session.agent = Agent::Peer(peer);
        }
        if offer.role == RtcRole::Listener && session.mixer.is_none() {
            session.mixer = Some(Mixer::new(rtc.opus));
        }
        session.legs.push(RtcLeg::new(peer, offer.role, flow, rtc.opus, rtc.playout));
        let etag = rtc.endpoint.ice_tag(peer).unwrap_or_default().to_owned();
        self.drain_rtc_events(now);
        Ok(Reply::RtcAnswer { leg: peer.0, sdp, etag })
    }

    /// `PATCH` on a leg's resource: trickled candidates (204) or an ICE restart (200 with the
    /// answer fragment), after the token, the leg and `If-Match` are checked in that order.
    pub(super) fn rtc_patch(&mut self, now: Now, id: &SessionId, patch: &RtcPatch) -> Result<Reply, CommandError> {
        let session = self.slots.get(id).and_then(|s| s.session.as_ref()).ok_or(CommandError::NotFound)?;
        if !authorizes(session, &patch.credential) {
            return Err(CommandError::Unauthorized);
        }
        let peer = PeerId(patch.leg);
        if !session.legs.iter().any(|l| l.peer == peer) {
            return Err(CommandError::LegNotFound);
        }
        let rtc = self.rtc.as_mut().ok_or(CommandError::RtcDisabled)?;
        let current = rtc.endpoint.ice_tag(peer).ok_or(CommandError::LegNotFound)?;
        match &patch.if_match {
            None => return Err(CommandError::PreconditionRequired),
            Some(p) if !p.matches(current) => return Err(CommandError::PreconditionFailed),
            Some(_) => {}
        }
        let update = rtc.endpoint.handle_ice_fragment(now.instant, peer, &patch.fragment).map_err(|e| match e {
            IceError::Gone => CommandError::LegNotFound,
            e => CommandError::BadFragment(e.to_string()),
        });
        let restart = match update {
            Ok(IceUpdate::Trickled) => None,
            Ok(IceUpdate::Restarted { fragment }) => {
                Some(IceRestart { fragment, etag: rtc.endpoint.ice_tag(peer).unwrap_or_default().to_owned() })
            }
            Err(e) => {
                self.drain_rtc_events(now);
                return Err(e);
            }
        };
        self.drain_rtc_events(now);
        Ok(Reply::RtcPatched { restart })
    }

    /// `DELETE` on a leg's resource.
    pub(super) fn rtc_end(
        &mut self,
        now: Now,
        id: &SessionId,
        leg: u64,
        credential: &super::Credential,
    ) -> Result<Reply, CommandError> {
        let session = self.slots.get(id).and_then(|s| s.session.as_ref()).ok_or(CommandError::NotFound)?;
        if !authorizes(session, credential) {
            return Err(CommandError::Unauthorized);
        }
        let peer = PeerId(leg);
        if !session.legs.iter().any(|l| l.peer == peer) {
            return Err(CommandError::LegNotFound);
        }
        if let Some(rtc) = self.rtc.as_mut() {
            rtc.endpoint.close(peer);
        }
        self.remove_leg(now, peer, "deleted");
        Ok(Reply::RtcEnded)
    }

    /// Forgets leg `peer` (already closed on the endpoint): a caller leaving ends the call, as a
    /// Twilio caller hanging up does; an agent leaving leaves the call without one.
    fn remove_leg(&mut self, now: Now, peer: PeerId, reason: &str) {
        let Some(id) = self.rtc.as_mut().and_then(|r| r.peers.remove(&peer)) else { return };
        let Some(session) = self.slots.get_mut(&id).and_then(|s| s.session.as_mut()) else { return };
        let Some(at) = session.legs.iter().position(|l| l.peer == peer) else { return };
        let leg = session.legs.remove(at);
        match leg.role {
            RtcRole::Caller => self.end(now, &id, "caller_hangup", 1000, "call ended"),
            RtcRole::Agent => {
                if session.agent == Agent::Peer(peer) {
                    session.agent = Agent::None;
                }
                let data = json!({ "message": format!("agent disconnected: {reason}"), "source": "agent" });
                self.broadcast(now, &id, RetellEvent::Error, data);
            }
            RtcRole::Listener => {
                if !session.legs.iter().any(|l| l.role == RtcRole::Listener) {
                    session.mixer = None;
                }
            }
            RtcRole::Custom(_) => {}
        }
    }

    /// Closes every WebRTC leg of a session that is ending.
    pub(super) fn close_legs(&mut self, legs: &[RtcLeg]) {
        let Some(rtc) = self.rtc.as_mut() else { return };
        for leg in legs {
            rtc.peers.remove(&leg.peer);
            rtc.endpoint.close(leg.peer);
        }
    }

    /// Closes the peers of session `id` after a panic (its state is gone).
    pub(super) fn close_peers_of(&mut self, id: &SessionId) {
        let Some(rtc) = self.rtc.as_mut() else { return };
        let peers: Vec<PeerId> = rtc.peers.iter().filter(|(_, s)| *s == id).map(|(p, _)| *p).collect();
        for p in peers {
            rtc.peers.remove(&p);
            rtc.endpoint.close(p);
        }
    }

    /// Advances the endpoint's timers.
    pub(super) fn rtc_timeout(&mut self, now: Now) {
        let Some(rtc) = self.rtc.as_mut() else { return };
        rtc.endpoint.handle_timeout(now.instant);
        self.drain_rtc_events(now);
    }

    /// The endpoint's next deadline.
    pub(super) fn rtc_poll_timeout(&self) -> Option<std::time::Instant> {
        self.rtc.as_ref().and_then(|r| r.endpoint.poll_timeout())
    }

    /// The next datagram to send, as an output.
    pub(super) fn poll_datagram(&mut self) -> Option<Output> {
        let d = self.rtc.as_mut()?.endpoint.poll_transmit()?;
        Some(Output::Datagram { to: d.to, data: d.data })
    }

    fn drain_rtc_events(&mut self, now: Now) {
        while let Some(event) = self.rtc.as_mut().and_then(|r| r.endpoint.poll_event()) {
            match event {
                PeerEvent::Connected(peer) => self.peer_connected(now, peer),
                PeerEvent::Audio { peer, seq, rtp_time, payload } => self.peer_audio(now, peer, seq, rtp_time, payload),
                PeerEvent::Closed { peer, reason } => self.remove_leg(now, peer, reason),
            }
        }
    }

    fn session_of_peer(&self, peer: PeerId) -> Option<SessionId> {
        self.rtc.as_ref().and_then(|r| r.peers.get(&peer)).cloned()
    }

    fn peer_connected(&mut self, now: Now, peer: PeerId) {
        let Some(id) = self.session_of_peer(peer) else { return };
        let Some(session) = self.slots.get_mut(&id).and_then(|s| s.session.as_mut()) else { return };
        let Some(leg) = session.leg_mut(peer) else { return };
        leg.connected = true;
        if leg.role == RtcRole::Caller {
            // A Twilio-protocol bot behind Relay hears a WebRTC caller as a Media Stream: its
            // greeting names the session as the call.
            session.rtc_greeting = Some(twilio::Start {
                sequence: None,
                stream_sid: format!(
                    "MZ{:032x}",
                    (u128::from(crate::id::stable_hash(id.as_str())) << 64) | u128::from(peer.0)
                ),
                account_sid: "AC00000000000000000000000000000000".to_owned(),
                call_sid: id.as_str().to_owned(),
                tracks: vec!["inbound".to_owned()],
                custom_parameters: vec![("callSid".to_owned(), id.as_str().to_owned())],
                media_format: twilio::MediaFormat::default(),
            });
            // A WebRTC call has a record like a phone call: in progress from now.
            let update = super::command::RecordUpdate { status: Some("in-progress".into()), ..Default::default() };
            let record = self.update_record(now, &id, update);
            if record.start_ms.is_none() {
                if let Some(r) = self.records.get_mut(&id) {
                    r.start_ms = Some(now.unix_ms);
                }
            }
            self.emit_record(&id);
            self.broadcast(now, &id, RetellEvent::Update, json!({ "isConnected": true }));
            self.dial_agent(now, &id, None);
        }
    }

    fn peer_audio(&mut self, now: Now, peer: PeerId, seq: u64, rtp_time: u64, payload: Bytes) {
        let Some(id) = self.session_of_peer(peer) else { return };
        let Some(session) = self.slots.get_mut(&id).and_then(|s| s.session.as_mut()) else { return };
        let counts = &mut session.counts;
        let Some(leg) = session.legs.iter_mut().find(|l| l.peer == peer) else { return };
        match leg.role {
            RtcRole::Caller => counts.caller.frames_in += 1,
            RtcRole::Agent => counts.agent.frames_in += 1,
            RtcRole::Custom(_) | RtcRole::Listener => {}
        }
        let Some(inbound) = leg.inbound.as_mut() else { return };
        // RTP timestamps are 32 bits on the wire and sequence numbers 16; the playout buffer
        // extends the one and only compares the other with its predecessor.
        inbound.push(now.instant, (seq & 0xffff) as u16, (rtp_time & 0xffff_ffff) as u32, payload);
        self.stats.frames_in.add(LegKind::Webrtc, 1);
        let first = !leg.heard;
        leg.heard = true;
        if first && leg.role == RtcRole::Agent {
            self.broadcast(now, &id, RetellEvent::AgentMediaStreamReady, json!({ "source": "webrtc" }));
            self.broadcast(now, &id, RetellEvent::CallReady, json!({ "agent": "connected" }));
        }
        self.schedule(now, &id);
    }

    /// The session's WebRTC timers: frames due from playout buffers, routed; the WHEP mix.
    pub(super) fn rtc_tick(&mut self, now: Now, id: &SessionId) {
        let Some(session) = self.slots.get_mut(id).and_then(|s| s.session.as_mut()) else { return };
        let mut due = Vec::new();
        let counters = &mut self.stats.rtc;
        let timing = codec_timing(&self.codec_timer);
        // Who hears each side at full band: WebRTC peers and the mix; phones need only 8 kHz.
        let mix = session.mixer.is_some();
        let agent_peer =
            matches!(session.agent, Agent::Peer(p) if session.legs.iter().any(|l| l.peer == p && l.flow.sends));
        let caller_peer = session.legs.iter().any(|l| l.role == RtcRole::Caller && l.flow.sends);
        for leg in &mut session.legs {
            let wideband = match leg.role {
                RtcRole::Caller | RtcRole::Custom(_) => agent_peer || mix,
                RtcRole::Agent => caller_peer || mix,
                RtcRole::Listener => false,
            };
            let Some(inbound) = leg.inbound.as_mut() else { continue };
            while let Some(frame) = inbound.next_frame(now.instant, wideband, timing) {
                due.push((leg.peer, leg.role.clone(), frame));
            }
            let (was, is) = (inbound.reported, inbound.playout.stats());
            counters.lost += is.lost - was.lost;
            counters.concealed += is.concealed - was.concealed;
            counters.fec_recovered += is.fec_recovered - was.fec_recovered;
            counters.late += is.late - was.late;
            counters.decode_errors += inbound.decode_errors - inbound.reported_errors;
            inbound.reported_errors = inbound.decode_errors;
            inbound.reported = is;
        }
        for (peer, role, frame) in due {
            match role {
                RtcRole::Caller => self.caller_frame_from_peer(now, id, peer, frame),
                RtcRole::Agent => self.agent_frame_from_peer(now, id, peer, frame),
                RtcRole::Custom(stream) => self.custom_frame(now, id, peer, &stream, frame),
                RtcRole::Listener => {}
            }
        }
        let Some(session) = self.slots.get_mut(id).and_then(|s| s.session.as_mut()) else { return };
        let Some(mixer) = session.mixer.as_mut() else { return };
        let packet = mixer.tick(now.instant, codec_timing(&self.codec_timer), &mut self.stats.rtc.encode_errors);
        let Some(packet) = packet else { return };
        let listeners: Vec<PeerId> =
            session.legs.iter().filter(|l| l.role == RtcRole::Listener && l.connected).map(|l| l.peer).collect();
        if let Some(rtc) = self.rtc.as_mut() {
            // One encode, shared by every listener.
            for peer in listeners {
                if rtc.endpoint.write_audio(now.instant, peer, &packet, WIRE_SAMPLES) {
                    self.stats.frames_out.add(LegKind::Webrtc, 1);
                }
            }
        }
    }

    /// The next deadline of a session's media (playout releases, the mix, the agent going quiet).
    pub(super) fn rtc_session_timeout(session: &crate::session::Session) -> Option<std::time::Instant> {
        let legs = session.legs.iter().filter_map(RtcLeg::poll_timeout).min();
        let mix = session.mixer.as_ref().and_then(Mixer::poll_timeout);
        let quiet = session.agent_heard_at.filter(|_| session.vad.is_active()).map(|t| t + AGENT_QUIET);
        [legs, mix, quiet].into_iter().flatten().min()
    }

    /// An agent talking that has sent nothing for [`AGENT_QUIET`] stopped talking.
    pub(super) fn check_agent_quiet(&mut self, now: Now, id: &SessionId) {
        let Some(session) = self.slots.get_mut(id).and_then(|s| s.session.as_mut()) else { return };
        let quiet = session.agent_heard_at.is_some_and(|t| now.instant >= t + AGENT_QUIET);
        if quiet && session.vad.is_active() {
            session.vad.reset();
            self.broadcast(now, id, RetellEvent::AgentStopTalking, json!({}));
        }
    }

    /// A frame of a WebRTC caller: to the agent (a bot as μ-law, a peer as Opus), frontends and
    /// the mix.
    fn caller_frame_from_peer(&mut self, now: Now, id: &SessionId, peer: PeerId, frame: Pcm) {
        let Some(slot) = self.slots.get_mut(id) else { return };
        let Some(session) = slot.session.as_mut() else { return };
        let frontends = slot.listeners.iter().any(|l| l.active && l.kind == ListenKind::Frontend);
        let bot = matches!(session.agent, Agent::Open { .. } | Agent::Connecting { .. });
        let ulaw = if frontends || bot {
            let timing = codec_timing(&self.codec_timer);
            session.leg_mut(peer).and_then(|l| l.inbound.as_mut()).and_then(|i| i.to_ulaw(&frame, timing))
        } else {
            None
        };
        if let Some(payload) = &ulaw {
            to_frontends(
                &mut self.outputs,
                &mut self.stats.frames_out,
                &slot.listeners,
                payload,
                frontend::FrontendTrack::Inbound,
            );
        }
        let hears = session.agent_hears_microphone();
        if bot && *session.source() == Source::Microphone {
            let payload = match (hears, ulaw) {
                (true, Some(p)) => p,
                _ => twilio::silence_payload(media::FRAME_8K),
            };
            self.send_to_bot(id, payload, media::FRAME_8K, None, None);
        }
        self.caller_pcm(now, id, frame);
    }

    /// Caller audio as PCM (from any caller leg): to an agent peer, and to the mix.
    pub(super) fn caller_pcm(&mut self, now: Now, id: &SessionId, frame: Pcm) {
        let Some(session) = self.slots.get_mut(id).and_then(|s| s.session.as_mut()) else { return };
        if let Some(mixer) = session.mixer.as_mut() {
            mixer.push(now.instant, Side::Caller, frame.clone());
        }
        if *session.source() != Source::Microphone {
            return;
        }
        let frame = if session.agent_hears_microphone() { frame } else { Pcm::silence(frame.rate) };
        self.send_to_agent_peer(now, id, &frame);
        self.schedule(now, id);
    }

    /// A frame of a WebRTC agent: to the caller (Twilio as μ-law, a peer as Opus), frontends, the
    /// mix, the VAD and raw samples.
    fn agent_frame_from_peer(&mut self, now: Now, id: &SessionId, peer: PeerId, frame: Pcm) {
        let Some(slot) = self.slots.get_mut(id) else { return };
        let Some(session) = slot.session.as_mut() else { return };
        let frontends = slot.listeners.iter().any(|l| l.active && l.kind == ListenKind::Frontend);
        let caller = session.caller.as_ref().map(|c| (c.conn, c.start.stream_sid.clone()));
        if frontends || caller.is_some() {
            let timing = codec_timing(&self.codec_timer);
            if let Some(payload) =
                session.leg_mut(peer).and_then(|l| l.inbound.as_mut()).and_then(|i| i.to_ulaw(&frame, timing))
            {
                agent_audio_out(
                    &mut self.outputs,
                    &mut self.stats.frames_out,
                    caller.as_ref().map(|(conn, sid)| (*conn, sid.as_str())),
                    &slot.listeners,
                    &payload,
                );
                if caller.is_some() {
                    session.counts.caller.frames_out += 1;
                }
            }
        }
        self.agent_pcm(now, id, frame);
    }

    /// Agent audio as PCM, as it plays (from any agent leg): to a WebRTC caller, the mix, the VAD
    /// (`agent_start_talking` / `agent_stop_talking`) and raw samples on `/ws`.
    pub(super) fn agent_pcm(&mut self, now: Now, id: &SessionId, frame: Pcm) {
        let Some(session) = self.slots.get_mut(id).and_then(|s| s.session.as_mut()) else { return };
        if let Some(mixer) = session.mixer.as_mut() {
            mixer.push(now.instant, Side::Agent, frame.clone());
        }
        let vad = session.vad.push(&frame.samples);
        session.agent_heard_at = Some(now.instant);
        let raw = if session.emit_raw_audio_samples() {
            let rate = session.sample_rate();
            let samples = media::resample(&mut session.raw, &frame, rate, codec_timing(&self.codec_timer));
            samples.map(|s| crate::media::pcm::to_f32_samples(&s))
        } else {
            None
        };
        let caller_peer = session.leg(&RtcRole::Caller).filter(|l| l.flow.sends).map(|l| l.peer);
        if let Some(peer) = caller_peer {
            self.encode_to_peer(now, id, peer, &frame);
        }
        match vad {
            Some(VadEvent::Start) => self.broadcast(now, id, RetellEvent::AgentStartTalking, json!({})),
            Some(VadEvent::Stop) => self.broadcast(now, id, RetellEvent::AgentStopTalking, json!({})),
            None => {}
        }
        if let Some(samples) = raw {
            self.broadcast_raw(now, id, samples);
        }
        self.schedule(now, id);
    }

    /// A frame of custom stream `stream`: to the agent while it is the agent's source.
    fn custom_frame(&mut self, now: Now, id: &SessionId, peer: PeerId, stream: &StreamId, frame: Pcm) {
        let Some(session) = self.slots.get_mut(id).and_then(|s| s.session.as_mut()) else { return };
        if session.source() != &Source::Custom(stream.clone()) {
            return;
        }
        if matches!(session.agent, Agent::Open { .. } | Agent::Connecting { .. }) {
            let timing = codec_timing(&self.codec_timer);
            if let Some(payload) =
                session.leg_mut(peer).and_then(|l| l.inbound.as_mut()).and_then(|i| i.to_ulaw(&frame, timing))
            {
                self.send_to_bot(id, payload, media::FRAME_8K, None, None);
            }
        }
        self.send_to_agent_peer(now, id, &frame);
    }

    /// Whether the agent's source is a custom stream that is being published now (its frames then
    /// replace the caller's, silence included).
    pub(super) fn custom_source_live(session: &crate::session::Session) -> bool {
        match session.source() {
            Source::Custom(s) => {
                session.legs.iter().any(|l| matches!(&l.role, RtcRole::Custom(c) if c == s) && l.heard)
            }
            Source::Microphone => false,
        }
    }

    /// Sends base64 μ-law, `samples` long, to the agent leg the relay dialled (a Twilio-protocol
    /// bot or a Realtime agent), or holds it while the agent is dialled. `chunk` and
    /// `timestamp_ms` are a Twilio caller's own, kept toward a bot; without them the leg counts.
    pub(super) fn send_to_bot(
        &mut self,
        id: &SessionId,
        payload: Bytes,
        samples: usize,
        chunk: Option<u64>,
        timestamp_ms: Option<u64>,
    ) {
        let Some(session) = self.slots.get_mut(id).and_then(|s| s.session.as_mut()) else { return };
        match &mut session.agent {
            Agent::Connecting { backlog, .. } => {
                if backlog.len() >= AGENT_BACKLOG {
                    backlog.pop_front();
                }
                backlog.push_back(Pending::Media { payload, samples, chunk, timestamp_ms });
            }
            Agent::Open { conn, .. } if session.agent_protocol == crate::session::agent::AgentProtocol::Realtime => {
                self.stats.frames_out.add(LegKind::Realtime, 1);
                session.counts.agent.frames_out += 1;
                self.outputs.push_back(Output::Send { conn: *conn, text: crate::proto::realtime::append(&payload) });
            }
            Agent::Open { .. } => {
                if let Some((conn, text)) = session.agent_media_msg(&payload, samples, chunk, timestamp_ms) {
                    self.stats.frames_out.add(LegKind::Bot, 1);
                    session.counts.agent.frames_out += 1;
                    self.outputs.push_back(Output::Send { conn, text });
                }
            }
            _ => {}
        }
    }

    /// Encodes `frame` for the agent's WebRTC peer, if it has one that receives audio.
    fn send_to_agent_peer(&mut self, now: Now, id: &SessionId, frame: &Pcm) {
        let Some(session) = self.slots.get(id).and_then(|s| s.session.as_ref()) else { return };
        let Agent::Peer(peer) = session.agent else { return };
        self.encode_to_peer(now, id, peer, frame);
    }

    fn encode_to_peer(&mut self, now: Now, id: &SessionId, peer: PeerId, frame: &Pcm) {
        let Some(session) = self.slots.get_mut(id).and_then(|s| s.session.as_mut()) else { return };
        let counts = &mut session.counts;
        let Some(leg) = session.legs.iter_mut().find(|l| l.peer == peer) else { return };
        if !leg.connected {
            return;
        }
        let Some(outbound) = leg.outbound.as_mut() else { return };
        let packet = outbound.encode(frame, codec_timing(&self.codec_timer), &mut self.stats.rtc.encode_errors);
        let Some(packet) = packet else { return };
        if let Some(rtc) = self.rtc.as_mut() {
            if rtc.endpoint.write_audio(now.instant, peer, &packet, WIRE_SAMPLES) {
                self.stats.frames_out.add(LegKind::Webrtc, 1);
                match leg.role {
                    RtcRole::Caller => counts.caller.frames_out += 1,
                    RtcRole::Agent => counts.agent.frames_out += 1,
                    RtcRole::Custom(_) | RtcRole::Listener => {}
                }
            }
        }
    }

    /// Raw agent samples to `/ws` listeners of a session that asked for them.
    fn broadcast_raw(&mut self, now: Now, id: &SessionId, samples: Vec<f32>) {
        let Some(slot) = self.slots.get(id) else { return };
        let mut text = None;
        for l in slot.listeners.iter().filter(|l| l.kind == ListenKind::Events) {
            let text = text
                .get_or_insert_with(|| events::retell_event(RetellEvent::Audio, json!(samples), now.unix_ms))
                .clone();
            self.stats.frames_out.add(LegKind::Events, 1);
            self.outputs.push_back(Output::Send { conn: l.conn, text });
        }
    }
}
