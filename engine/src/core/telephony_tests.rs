//! Scenario tests of calls with legs: a Twilio caller stream, an agent bot, frontend and event
//! listeners, driven through `CoreState` with a virtual clock.

use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use serde_json::Value;

use super::*;
use crate::session::agent::{AgentPolicy, AgentUrl};

const CALLER: ConnectionId = ConnectionId(100);
const FRONTEND: ConnectionId = ConnectionId(5);
const EVENTS: ConnectionId = ConnectionId(6);

struct Call {
    core: CoreState,
    t0: Instant,
    ms: u64,
    agent: Option<ConnectionId>,
    /// Every output so far, in order.
    log: Vec<Output>,
}

impl Call {
    fn new(policy: AgentPolicy) -> Self {
        #[allow(clippy::disallowed_methods)] // The virtual clock's origin; tests advance `ms` by hand.
        let t0 = Instant::now();
        Self { core: CoreState::new(Limits::default(), policy), t0, ms: 0, agent: None, log: Vec::new() }
    }

    fn with_bot() -> Self {
        Self::new(AgentPolicy {
            default_url: Some(AgentUrl::parse("ws://127.0.0.1:9/bot").expect("valid")),
            allow: vec![],
            realtime: None,
            llm_upstream: None,
        })
    }

    fn with_realtime() -> Self {
        Self::new(AgentPolicy {
            default_url: None,
            allow: vec![],
            realtime: Some(crate::session::agent::RealtimeAgent {
                url: AgentUrl::parse("ws://127.0.0.1:9/v1/realtime").expect("valid"),
                api_key: None,
                shape: realtime::ApiShape::Ga,
                voice: None,
                briefing: crate::session::agent::Briefing::default(),
            }),
            llm_upstream: None,
        })
    }

    fn now(&self) -> Now {
        Now { instant: self.t0 + Duration::from_millis(self.ms), unix_ms: 1_700_000_000_000 + self.ms }
    }

    fn drain(&mut self) {
        while let Some(o) = self.core.poll_output() {
            if let Output::ConnectAgent { conn, .. } = &o {
                self.agent = Some(*conn);
            }
            self.log.push(o);
        }
    }

    fn caller(&mut self, text: &Utf8Bytes) {
        let now = self.now();
        let frame = Bytes::copy_from_slice(text.as_bytes());
        self.core.handle_caller_frame(now, CALLER, &frame);
        self.drain();
    }

    fn bot(&mut self, text: &Utf8Bytes) {
        let now = self.now();
        let frame = Bytes::copy_from_slice(text.as_bytes());
        let agent = self.agent.expect("agent dialled");
        self.core.handle_agent_frame(now, agent, &frame);
        self.drain();
    }

    /// Starts a call CA1 with frontend and event listeners and an open agent.
    fn connected() -> Self {
        let mut c = Self::with_bot();
        let id = SessionId::parse("CA1").expect("valid");
        c.core.handle_caller_open(&id, CALLER);
        c.caller(&twilio::connected_msg());
        let start = start("CA1");
        c.caller(&twilio::start_msg(1, &start.params()));
        let now = c.now();
        c.core.handle_attach(now, &id, FRONTEND, ListenKind::Frontend, Credential::Anonymous).expect("tokenless call");
        c.core.handle_listener_text(now, FRONTEND, r#"{"event":"connect-twilio","callSid":"CA1","user_id":"u"}"#);
        c.core.handle_attach(now, &id, EVENTS, ListenKind::Events, Credential::Anonymous).expect("tokenless call");
        let agent = c.agent.expect("the caller's start dials the agent");
        assert!(c.core.handle_agent_open(now, agent));
        c.drain();
        c
    }

    /// Advances virtual time to `ms`, running every timer due on the way.
    fn advance_to(&mut self, ms: u64) {
        loop {
            let target = self.t0 + Duration::from_millis(ms);
            match self.core.poll_timeout() {
                Some(t) if t <= target => {
                    self.ms = self.ms.max(t.duration_since(self.t0).as_millis() as u64);
                    let now = Now { instant: t.max(self.now().instant), unix_ms: 1_700_000_000_000 + self.ms };
                    self.core.handle_timeout(now);
                    self.drain();
                }
                _ => break,
            }
        }
        self.ms = ms;
    }

    /// Parsed JSON of every text sent to `conn`, in order.
    fn sent_to(&self, conn: ConnectionId) -> Vec<Value> {
        self.log
            .iter()
            .filter_map(|o| match o {
                Output::Send { conn: c, text } if *c == conn => Some(serde_json::from_str(text).expect("json")),
                _ => None,
            })
            .collect()
    }

    fn closed(&self, conn: ConnectionId) -> Option<u16> {
        self.log.iter().find_map(|o| match o {
            Output::Close { conn: c, code, .. } if *c == conn => Some(*code),
            _ => None,
        })
    }
}

fn start(call_sid: &str) -> twilio::Start {
    twilio::Start {
        sequence: Some(1),
        stream_sid: "MZ1".into(),
        account_sid: "AC1".into(),
        call_sid: call_sid.into(),
        tracks: vec!["inbound".into()],
        custom_parameters: vec![("callSid".into(), call_sid.into())],
        media_format: twilio::MediaFormat::default(),
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn media(seq: u64, bytes: &[u8]) -> Utf8Bytes {
    twilio::media_msg(seq, "MZ1", twilio::Track::Inbound, seq, seq * 20, b64(bytes).as_bytes())
}

fn events(values: &[Value]) -> Vec<String> {
    values
        .iter()
        .map(|v| v["eventType"].as_str().or_else(|| v["event"].as_str()).unwrap_or_default().to_owned())
        .collect()
}

/// A caller's start creates the session, dials the agent, and greets it as Twilio would.
#[test]
fn stream_start_creates_the_call_and_dials_the_agent() {
    let c = Call::connected();
    let agent = c.agent.expect("dialled");
    let to_agent = c.sent_to(agent);
    assert_eq!(events(&to_agent), ["connected", "start"]);
    assert_eq!(to_agent[1]["start"]["callSid"], "CA1");
    assert_eq!(to_agent[1]["start"]["customParameters"]["callSid"], "CA1");
    assert_eq!(events(&c.sent_to(EVENTS)), ["call_ready"]);
    assert_eq!(c.core.stats().active_sessions, 1);
    assert_eq!(c.core.stats().callers, 1);
}

/// Caller audio reaches the agent byte for byte and every frontend as the inbound track.
#[test]
fn caller_audio_reaches_agent_and_frontends() {
    let mut c = Call::connected();
    for i in 0..5u8 {
        c.caller(&media(u64::from(i) + 2, &[i; 160]));
    }
    let agent = c.agent.expect("dialled");
    let media_to_agent: Vec<Value> = c.sent_to(agent).into_iter().filter(|v| v["event"] == "media").collect();
    assert_eq!(media_to_agent.len(), 5);
    for (i, m) in media_to_agent.iter().enumerate() {
        assert_eq!(m["media"]["payload"], b64(&[i as u8; 160]));
        assert_eq!(m["media"]["track"], "inbound");
    }
    let audio: Vec<Value> = c.sent_to(FRONTEND);
    assert_eq!(audio.len(), 5);
    assert!(audio.iter().all(|a| a["event"] == "audio" && a["track"] == "inbound"));
    assert_eq!(audio[3]["payload"], b64(&[3; 160]));
}

/// While muted, or while a custom stream is selected, the agent gets μ-law silence of equal length.
#[test]
fn muted_caller_is_silence_to_the_agent() {
    let mut c = Call::connected();
    let id = SessionId::parse("CA1").expect("valid");
    let now = c.now();
    c.core.handle_command(now, &id, Command::SetMicrophone(false)).expect("mute");
    c.caller(&media(2, &[7; 160]));
    c.core.handle_command(now, &id, Command::SetMicrophone(true)).expect("unmute");
    c.caller(&media(3, &[7; 160]));
    let stream = crate::id::StreamId::parse("custom").expect("valid");
    c.core.handle_command(now, &id, Command::SendCustomStream(stream)).expect("custom");
    c.caller(&media(4, &[7; 160]));
    c.drain();
    let agent = c.agent.expect("dialled");
    let payloads: Vec<String> = c
        .sent_to(agent)
        .into_iter()
        .filter(|v| v["event"] == "media")
        .map(|v| v["media"]["payload"].as_str().expect("payload").to_owned())
        .collect();
    assert_eq!(payloads, [b64(&[0xFF; 160]), b64(&[7; 160]), b64(&[0xFF; 160])]);
    // Frontends always hear the real caller.
    assert!(c.sent_to(FRONTEND).iter().all(|a| a["payload"] == b64(&[7; 160])));
}

/// Agent audio sent all at once reaches the caller in order, paced, and a mark comes back only once
/// the audio before it has played.
#[test]
fn agent_audio_is_paced_and_marks_echo_after_playout() {
    let mut c = Call::connected();
    for i in 0..50u8 {
        let m = twilio::media_out("MZ1", b64(&[i; 160]).as_bytes());
        c.bot(&m);
    }
    c.bot(&twilio::mark_out("MZ1", "end-of-utterance"));
    let released_now = c.sent_to(CALLER).len();
    assert!(released_now <= 10, "at most the 200 ms lead is released at once, got {released_now}");
    let agent = c.agent.expect("dialled");
    let marks = |c: &Call| c.sent_to(agent).into_iter().filter(|v| v["event"] == "mark").count();
    assert_eq!(marks(&c), 0);
    c.advance_to(700);
    let mid = c.sent_to(CALLER).len();
    assert!((35..=45).contains(&mid), "after 0.7 s, 0.7 s played and at most 0.2 s more released: {mid}");
    assert_eq!(marks(&c), 0, "no mark before its audio played");
    c.advance_to(1_000);
    let to_caller = c.sent_to(CALLER);
    assert_eq!(to_caller.len(), 50);
    for (i, m) in to_caller.iter().enumerate() {
        assert_eq!(m["event"], "media");
        assert_eq!(m["streamSid"], "MZ1");
        assert_eq!(m["media"]["payload"], b64(&[i as u8; 160]), "in order");
    }
    assert_eq!(marks(&c), 1, "the mark comes back once 1 s of audio has played");
    let mark = c.sent_to(agent).into_iter().find(|v| v["event"] == "mark").expect("mark");
    assert_eq!(mark["mark"]["name"], "end-of-utterance");
    let outbound = c.sent_to(FRONTEND).into_iter().filter(|a| a["track"] == "outbound").count();
    assert_eq!(outbound, 50, "frontends hear what the caller hears");
}

/// The agent's clear drops queued audio, tells the caller to clear, and returns pending marks in order.
#[test]
fn clear_flushes_and_returns_marks() {
    let mut c = Call::connected();
    for i in 0..50u8 {
        c.bot(&twilio::media_out("MZ1", b64(&[i; 160]).as_bytes()));
        if i == 20 {
            c.bot(&twilio::mark_out("MZ1", "a"));
        }
    }
    c.bot(&twilio::mark_out("MZ1", "b"));
    c.advance_to(100);
    let before = c.sent_to(CALLER).len();
    c.bot(&twilio::clear_out("MZ1"));
    let to_caller = c.sent_to(CALLER);
    assert_eq!(to_caller.last().expect("clear")["event"], "clear");
    let agent = c.agent.expect("dialled");
    let names: Vec<Value> =
        c.sent_to(agent).into_iter().filter(|v| v["event"] == "mark").map(|v| v["mark"]["name"].clone()).collect();
    assert_eq!(names, ["a", "b"]);
    c.advance_to(5_000);
    assert_eq!(c.sent_to(CALLER).len(), before + 1, "nothing queued survives the clear");
}

/// A burst of agent clears with nothing played in between reaches the caller as one clear (a
/// clear with nothing to interrupt is not sent), so it cannot fill the caller's queue with control
/// messages; the next audio makes the next clear due again.
#[test]
fn repeated_clears_reach_the_caller_once() {
    let mut c = Call::connected();
    c.bot(&twilio::clear_out("MZ1"));
    assert!(c.sent_to(CALLER).iter().all(|v| v["event"] != "clear"), "nothing played yet: nothing to clear");
    c.bot(&twilio::media_out("MZ1", b64(&[1; 160]).as_bytes()));
    for _ in 0..1000 {
        c.bot(&twilio::clear_out("MZ1"));
    }
    let clears = |c: &Call| c.sent_to(CALLER).iter().filter(|v| v["event"] == "clear").count();
    assert_eq!(clears(&c), 1);
    assert_eq!(c.closed(CALLER), None, "the caller's leg stays open");
    c.bot(&twilio::media_out("MZ1", b64(&[2; 160]).as_bytes()));
    c.bot(&twilio::clear_out("MZ1"));
    assert_eq!(clears(&c), 2, "audio since the last clear: the clear goes out");
}

/// DTMF reaches the agent as Twilio's dtmf message and event listeners as an update.
#[test]
fn dtmf_reaches_agent_and_listeners() {
    let mut c = Call::connected();
    c.caller(&Utf8Bytes::from(
        r#"{"event":"dtmf","streamSid":"MZ1","sequenceNumber":"5","dtmf":{"track":"inbound_track","digit":"7"}}"#
            .to_owned(),
    ));
    let agent = c.agent.expect("dialled");
    let dtmf = c.sent_to(agent).into_iter().find(|v| v["event"] == "dtmf").expect("dtmf to agent");
    assert_eq!(dtmf["dtmf"]["digit"], "7");
    let update = c.sent_to(EVENTS).into_iter().find(|v| v["eventType"] == "update").expect("update");
    assert_eq!(update["data"]["dtmf"]["digit"], "7");
}

/// The caller's stop ends the call: call_ended to listeners, stop to the agent, every socket closed.
#[test]
fn stop_ends_the_call() {
    let mut c = Call::connected();
    c.caller(&twilio::stop_msg(9, "MZ1", "AC1", "CA1"));
    let agent = c.agent.expect("dialled");
    assert_eq!(events(&c.sent_to(EVENTS)).last().map(String::as_str), Some("call_ended"));
    assert_eq!(c.sent_to(agent).last().expect("stop")["event"], "stop");
    for conn in [CALLER, agent, FRONTEND, EVENTS] {
        assert_eq!(c.closed(conn), Some(1000), "{conn:?} closed");
    }
    assert_eq!(c.core.stats().active_sessions, 0);
    assert_eq!(c.core.stats().callers, 0);
    assert_eq!(c.core.stats().observers, 0);
}

/// An agent that fails costs only itself: an error event, and caller audio still reaches frontends.
#[test]
fn failed_agent_costs_only_itself() {
    let mut c = Call::with_bot();
    let id = SessionId::parse("CA1").expect("valid");
    c.core.handle_caller_open(&id, CALLER);
    c.caller(&twilio::start_msg(1, &start("CA1").params()));
    let now = c.now();
    c.core.handle_attach(now, &id, EVENTS, ListenKind::Events, Credential::Anonymous).expect("attach");
    c.core.handle_attach(now, &id, FRONTEND, ListenKind::Frontend, Credential::Anonymous).expect("attach");
    c.core.handle_listener_text(now, FRONTEND, r#"{"event":"connect-twilio","callSid":"CA1","user_id":"u"}"#);
    let agent = c.agent.expect("dialled");
    c.core.handle_agent_closed(now, agent, "connection refused");
    c.drain();
    assert!(!c.core.handle_agent_open(now, agent), "a failed leg cannot open later");
    let error = c.sent_to(EVENTS).into_iter().find(|v| v["eventType"] == "error").expect("error event");
    assert!(error["data"]["message"].as_str().expect("text").contains("connection refused"));
    assert!(c.sent_to(CALLER).is_empty(), "an agent that never opened played nothing to clear");
    c.caller(&media(2, &[1; 160]));
    assert_eq!(c.sent_to(FRONTEND).len(), 1, "caller audio still reaches observers");
    assert_eq!(c.core.stats().active_sessions, 1);
}

/// Malformed and out-of-order messages are counted and ignored; the call goes on.
#[test]
fn bad_messages_are_counted() {
    let mut c = Call::with_bot();
    let id = SessionId::parse("CA1").expect("valid");
    c.core.handle_caller_open(&id, CALLER);
    c.caller(&media(1, &[0; 160])); // media before start
    c.caller(&Utf8Bytes::from("not json".to_owned()));
    c.caller(&Utf8Bytes::from(r#"{"event":"nope"}"#.to_owned()));
    c.caller(&twilio::start_msg(1, &start("CA1").params()));
    c.caller(&twilio::start_msg(2, &start("CA1").params())); // a second start
    assert_eq!(c.core.stats().protocol_errors, 4);
    assert_eq!(c.core.stats().callers, 1);
}

/// A per-call agent URL off the allow-list is refused with an error event; allowed ones are dialled.
#[test]
fn per_call_agent_urls_need_the_allow_list() {
    let policy =
        AgentPolicy { default_url: None, allow: vec!["127.0.0.1:7000".into()], realtime: None, llm_upstream: None };
    for (url, dialled) in [("ws://127.0.0.1:7000/bot", true), ("ws://10.0.0.1/bot", false)] {
        let mut c = Call::new(policy.clone());
        let id = SessionId::parse("CA1").expect("valid");
        let now = c.now();
        c.core.handle_attach(now, &id, EVENTS, ListenKind::Events, Credential::Operator).expect("attach");
        c.core.handle_caller_open(&id, CALLER);
        let mut s = start("CA1");
        s.custom_parameters.push(("agentUrl".into(), url.into()));
        c.caller(&twilio::start_msg(1, &s.params()));
        assert_eq!(c.agent.is_some(), dialled, "{url}");
        let errors = c.sent_to(EVENTS).into_iter().filter(|v| v["eventType"] == "error").count();
        assert_eq!(errors, usize::from(!dialled), "{url}");
    }
}

/// A session started by /start-call gets its caller when the stream with its id starts.
#[test]
fn stream_joins_an_api_session() {
    let mut c = Call::with_bot();
    let id = SessionId::parse("CA1").expect("valid");
    let now = c.now();
    let start_call = command::StartCall {
        access_token: Secret::new("t"),
        sample_rate: crate::media::SampleRate::DEFAULT,
        emit_raw_audio_samples: false,
    };
    c.core.handle_command(now, &id, Command::Start(start_call)).expect("start");
    c.core.handle_caller_open(&id, CALLER);
    c.caller(&twilio::start_msg(1, &start("CA1").params()));
    let Ok(Reply::CallStatus(status)) = c.core.handle_command(now, &id, Command::CallStatus) else { panic!("status") };
    assert!(status.is_connected);
    let Ok(Reply::TrackStatus(tracks)) = c.core.handle_command(now, &id, Command::TrackStatus) else {
        panic!("tracks")
    };
    assert_eq!(tracks.tracks.len(), 1);
    assert_eq!(tracks.tracks[0].source, "microphone");
    // A second stream for the same call is refused.
    let second = ConnectionId(101);
    c.core.handle_caller_open(&id, second);
    let frame = Bytes::copy_from_slice(twilio::start_msg(1, &start("CA1").params()).as_bytes());
    c.core.handle_caller_frame(now, second, &frame);
    c.drain();
    assert_eq!(c.closed(second), Some(1008));
}

/// A call's record follows the real stream: in progress at start, completed with times at stop,
/// and outbound details and status callbacks merge into it.
#[test]
fn records_follow_the_stream() {
    let mut c = Call::with_bot();
    let id = SessionId::parse("CA1").expect("valid");
    let now = c.now();
    let update =
        command::RecordUpdate { user_id: Some("u1".into()), status: Some("queued".into()), ..Default::default() };
    c.core.handle_command(now, &id, Command::Record(Box::new(update))).expect("record");
    c.ms = 1_000;
    c.core.handle_caller_open(&id, CALLER);
    c.caller(&twilio::start_msg(1, &start("CA1").params()));
    let Ok(Reply::Record(r)) = c.core.handle_command(c.now(), &id, Command::ReadRecord) else { panic!("record") };
    assert_eq!(
        (r.status.as_str(), r.start_ms, r.user_id.as_deref()),
        ("in-progress", Some(1_700_000_001_000), Some("u1"))
    );
    c.ms = 4_000;
    c.caller(&twilio::stop_msg(9, "MZ1", "AC1", "CA1"));
    let Ok(Reply::Record(r)) = c.core.handle_command(c.now(), &id, Command::ReadRecord) else { panic!("record") };
    assert_eq!((r.status.as_str(), r.end_ms, r.duration_at(0)), ("completed", Some(1_700_000_004_000), Some(3)));
    let late = command::RecordUpdate { status: Some("in-progress".into()), ..Default::default() };
    c.core.handle_command(c.now(), &id, Command::Record(Box::new(late))).expect("record");
    let done = command::RecordUpdate { status: Some("completed".into()), duration_secs: Some(5), ..Default::default() };
    let Ok(Reply::Record(r)) = c.core.handle_command(c.now(), &id, Command::Record(Box::new(done))) else {
        panic!("record")
    };
    assert_eq!(
        (r.status.as_str(), r.duration_at(0)),
        ("completed", Some(5)),
        "Twilio's duration wins; ended stays ended"
    );
    let unknown = SessionId::parse("CA2").expect("valid");
    assert_eq!(c.core.handle_command(c.now(), &unknown, Command::ReadRecord), Err(CommandError::NotFound));
}

/// What the caller says while the agent is being dialled reaches it after the greeting, in order
/// (silence for frames sent while muted), with key presses in between.
#[test]
fn caller_input_during_dialling_is_delivered_on_open() {
    let mut c = Call::with_bot();
    let id = SessionId::parse("CA1").expect("valid");
    c.core.handle_caller_open(&id, CALLER);
    c.caller(&twilio::start_msg(1, &start("CA1").params()));
    c.caller(&media(2, &[1; 160]));
    c.caller(&Utf8Bytes::from(
        r#"{"event":"dtmf","streamSid":"MZ1","sequenceNumber":"3","dtmf":{"track":"inbound_track","digit":"5"}}"#
            .to_owned(),
    ));
    let now = c.now();
    c.core.handle_command(now, &id, Command::SetMicrophone(false)).expect("mute");
    c.caller(&media(4, &[2; 160]));
    let agent = c.agent.expect("dialled");
    assert!(c.sent_to(agent).is_empty(), "nothing is sent before the agent is open");
    assert!(c.core.handle_agent_open(now, agent));
    c.drain();
    let to_agent = c.sent_to(agent);
    assert_eq!(events(&to_agent), ["connected", "start", "media", "dtmf", "media"]);
    assert_eq!(to_agent[2]["media"]["payload"], b64(&[1; 160]));
    assert_eq!(to_agent[3]["dtmf"]["digit"], "5");
    assert_eq!(to_agent[4]["media"]["payload"], b64(&[0xFF; 160]), "muted while dialling: silence");
    let sequences: Vec<u64> =
        to_agent.iter().skip(1).map(|v| v["sequenceNumber"].as_str().expect("seq").parse().expect("number")).collect();
    assert_eq!(sequences, [1, 2, 3, 4], "sequence numbers continue without gaps");
}

/// An agent that dies mid-utterance: its queued audio is dropped and the caller is told to clear
/// what it buffered, so the dead agent falls silent at once; the call goes on.
#[test]
fn dead_agent_is_cleared_from_the_caller() {
    let mut c = Call::connected();
    for i in 0..20u8 {
        c.bot(&twilio::media_out("MZ1", b64(&[i; 160]).as_bytes()));
    }
    let agent = c.agent.expect("dialled");
    let now = c.now();
    c.core.handle_agent_closed(now, agent, "connection reset");
    c.drain();
    assert_eq!(c.sent_to(CALLER).last().expect("clear")["event"], "clear");
    let released = c.sent_to(CALLER).len();
    c.advance_to(5_000);
    assert_eq!(c.sent_to(CALLER).len(), released, "nothing more of the dead agent's audio is played");
    assert_eq!(c.core.stats().active_sessions, 1);
}

/// A bot that closes normally after its goodbye ends the call, but only once the goodbye played.
#[test]
fn agent_hangup_ends_the_call_after_its_audio() {
    let mut c = Call::connected();
    for i in 0..25u8 {
        c.bot(&twilio::media_out("MZ1", b64(&[i; 160]).as_bytes()));
    }
    let agent = c.agent.expect("dialled");
    let now = c.now();
    c.core.handle_detach(now, agent, true);
    c.drain();
    assert_eq!(c.core.stats().active_sessions, 1, "the goodbye is still playing");
    assert!(!c.sent_to(CALLER).iter().any(|v| v["event"] == "clear"), "a goodbye is not cleared");
    c.advance_to(2_000);
    assert_eq!(c.sent_to(CALLER).iter().filter(|v| v["event"] == "media").count(), 25, "all of it played");
    assert_eq!(c.core.stats().active_sessions, 0, "then the call ended");
    let ended = c.sent_to(EVENTS).into_iter().find(|v| v["eventType"] == "call_ended").expect("call_ended");
    assert_eq!(ended["data"]["reason"], "agent_hangup");
    assert_eq!(c.closed(CALLER), Some(1000));
}

/// A bot connection lost without a close frame is a failure: the call goes on without it.
#[test]
fn agent_loss_is_not_a_hangup() {
    let mut c = Call::connected();
    let agent = c.agent.expect("dialled");
    let now = c.now();
    c.core.handle_detach(now, agent, false);
    c.drain();
    c.advance_to(1_000);
    assert_eq!(c.core.stats().active_sessions, 1);
    assert!(c.sent_to(EVENTS).iter().any(|v| v["eventType"] == "error"));
}

/// Empty media from a bot is a protocol error, not a queue entry; one long chunk is paced in
/// 30 ms pieces whose payloads join back into the original.
#[test]
fn empty_and_long_agent_chunks() {
    let mut c = Call::connected();
    c.bot(&twilio::media_out("MZ1", b""));
    assert_eq!(c.core.stats().protocol_errors, 1);
    let long: Vec<u8> = (0..8000u32).map(|i| (i % 251) as u8).collect();
    c.bot(&twilio::media_out("MZ1", b64(&long).as_bytes()));
    let first = c.sent_to(CALLER).len();
    assert!((1..=7).contains(&first), "a 1 s chunk is not released whole: {first} pieces at once");
    c.advance_to(2_000);
    let pieces: Vec<Vec<u8>> = c
        .sent_to(CALLER)
        .iter()
        .filter(|v| v["event"] == "media")
        .map(|v| {
            base64::engine::general_purpose::STANDARD
                .decode(v["media"]["payload"].as_str().expect("payload"))
                .expect("b64")
        })
        .collect();
    assert_eq!(pieces.concat(), long, "the pieces carry the audio unchanged, in order");
    assert!(pieces.iter().all(|p| p.len() <= 240));
}

/// Listeners of an outbound call that is still ringing wait past the usual timeout, a bounded
/// number of times; a call's status only moves forward.
#[test]
fn ringing_calls_keep_listeners_waiting() {
    let limits = Limits { pending_observer_timeout: Duration::from_secs(30), ..Limits::default() };
    let mut c = Call::new(AgentPolicy::default());
    c.core = CoreState::new(limits, AgentPolicy::default());
    let id = SessionId::parse("CA9").expect("valid");
    let now = c.now();
    let update =
        command::RecordUpdate { user_id: Some("u".into()), status: Some("ringing".into()), ..Default::default() };
    c.core.handle_command(now, &id, Command::Record(Box::new(update))).expect("record");
    c.core.handle_attach(now, &id, FRONTEND, ListenKind::Frontend, Credential::Anonymous).expect("waits");
    c.advance_to(31_000);
    assert_eq!(c.closed(FRONTEND), None, "still ringing: the wait goes on");
    c.advance_to(200_000);
    assert_eq!(c.closed(FRONTEND), Some(1008), "but not for ever");
    let back = command::RecordUpdate { status: Some("queued".into()), ..Default::default() };
    let Ok(Reply::Record(r)) = c.core.handle_command(c.now(), &id, Command::Record(Box::new(back))) else {
        panic!("record")
    };
    assert_eq!(r.status, "ringing", "a late, earlier status does not move it back");
}

/// A transcribed utterance reaches frontends as `transcription`, event listeners as an `update` in
/// Retell's transcript shape, and the call's record.
#[test]
fn transcripts_reach_listeners_and_the_record() {
    let mut c = Call::connected();
    let id = SessionId::parse("CA1").expect("valid");
    let now = c.now();
    let t = command::Transcript { speaker: command::Speaker::User, text: "I need a plumber".into() };
    assert_eq!(c.core.handle_command(now, &id, Command::Transcript(Box::new(t))), Ok(Reply::Transcribed));
    c.drain();
    let to_frontend = c.sent_to(FRONTEND);
    assert_eq!(
        to_frontend.last().expect("transcription"),
        &serde_json::json!({"event":"transcription","text":"I need a plumber"})
    );
    let update = c.sent_to(EVENTS).into_iter().rfind(|v| v["eventType"] == "update").expect("update");
    assert_eq!(update["data"], serde_json::json!({"transcript":[{"role":"user","content":"I need a plumber"}]}));
    let Ok(Reply::Record(r)) = c.core.handle_command(now, &id, Command::ReadRecord) else { panic!("record") };
    assert_eq!(r.transcript, "user: I need a plumber\n");
    let unknown = SessionId::parse("CA404").expect("valid");
    let t = command::Transcript { speaker: command::Speaker::Agent, text: "x".into() };
    assert_eq!(c.core.handle_command(now, &unknown, Command::Transcript(Box::new(t))), Err(CommandError::NotFound));
}

/// Every record change leaves the core as a whole snapshot: the webhook's creation, the stream's
/// start (with its `projectId` and `intent` parameters), each transcript line and the end.
#[test]
fn record_changes_are_emitted_as_snapshots() {
    let records = |c: &mut Call| -> Vec<command::RecordChange> {
        std::mem::take(&mut c.log)
            .into_iter()
            .filter_map(|o| match o {
                Output::Record(change) => Some(*change),
                _ => None,
            })
            .collect()
    };
    let mut c = Call::with_bot();
    let id = SessionId::parse("CA1").expect("valid");
    let update = command::RecordUpdate { to: Some("+15550001".into()), ..Default::default() };
    c.core.handle_command(c.now(), &id, Command::Record(Box::new(update))).expect("record");
    c.drain();
    let created = records(&mut c);
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(created[0].id, id);
    assert_eq!(
        (created[0].record.status.as_str(), created[0].record.created_ms, created[0].record.direction),
        ("queued", 1_700_000_000_000, command::Direction::Inbound)
    );

    c.ms = 2_000;
    c.core.handle_caller_open(&id, CALLER);
    let mut start = start("CA1");
    start.custom_parameters.push(("projectId".into(), "proj_1".into()));
    start.custom_parameters.push(("intent".into(), "emergency".into()));
    start.custom_parameters.push(("from".into(), String::new()));
    c.caller(&twilio::start_msg(1, &start.params()));
    let started = records(&mut c);
    assert_eq!(started.len(), 1, "one change per input: {started:?}");
    let r = &started[0].record;
    assert_eq!(
        (
            r.status.as_str(),
            r.start_ms,
            r.project_id.as_deref(),
            r.intent.as_deref(),
            r.to.as_deref(),
            r.from.as_deref()
        ),
        ("in-progress", Some(1_700_000_002_000), Some("proj_1"), Some("emergency"), Some("+15550001"), None),
        "an empty parameter is no value"
    );
    assert_eq!(r.created_ms, 1_700_000_000_000, "creation time stays");

    let said = command::Transcript { speaker: command::Speaker::User, text: "my pipe burst".into() };
    c.core.handle_command(c.now(), &id, Command::Transcript(Box::new(said))).expect("transcript");
    c.drain();
    let heard = records(&mut c);
    assert_eq!(heard.len(), 1);
    assert_eq!(heard[0].record.transcript, "user: my pipe burst\n");

    c.ms = 5_000;
    c.caller(&twilio::stop_msg(9, "MZ1", "AC1", "CA1"));
    let ended = records(&mut c);
    assert_eq!(ended.len(), 1);
    assert_eq!(
        (ended[0].record.status.as_str(), ended[0].record.end_ms, ended[0].record.duration_at(0)),
        ("completed", Some(1_700_000_005_000), Some(3))
    );
    // Reading changes nothing and emits nothing.
    c.core.handle_command(c.now(), &id, Command::ReadRecord).expect("read");
    c.drain();
    assert!(records(&mut c).is_empty());
}

/// Frames are counted by leg kind both ways (one per socket they go to), queued agent audio shows
/// in the pacer depth until it is released, and socket drops are counted by the socket's kind.
#[test]
fn frames_queues_and_drops_are_counted_by_leg() {
    let mut c = Call::connected();
    for i in 0..5u8 {
        c.caller(&media(u64::from(i) + 2, &[i; 160]));
    }
    let s = c.core.stats();
    assert_eq!(
        (s.frames_in.get(LegKind::Caller), s.frames_out.get(LegKind::Bot), s.frames_out.get(LegKind::Frontend)),
        (5, 5, 5)
    );
    for i in 0..50u8 {
        c.bot(&twilio::media_out("MZ1", b64(&[i; 160]).as_bytes()));
    }
    let s = c.core.stats();
    assert_eq!(s.frames_in.get(LegKind::Bot), 50);
    let released = s.frames_out.get(LegKind::Caller);
    assert!(released > 0 && released < 50, "the pacer releases a lead at once, not all: {released}");
    assert_eq!(s.frames_out.get(LegKind::Frontend), 5 + released, "frontends hear agent audio as it is released");
    assert_eq!(c.core.queue_depths().pacer_frames, 50 - released);
    c.advance_to(2_000);
    let s = c.core.stats();
    assert_eq!((s.frames_out.get(LegKind::Caller), s.frames_out.get(LegKind::Frontend)), (50, 55));
    assert_eq!(c.core.queue_depths(), QueueDepths::default());
    assert_eq!((s.frames_in.get(LegKind::Webrtc), s.frames_out.get(LegKind::Webrtc)), (0, 0));

    let agent = c.agent.expect("dialled");
    for conn in [CALLER, agent, FRONTEND, EVENTS, EVENTS, ConnectionId(999)] {
        c.core.handle_send_dropped(conn, 1);
    }
    let d = c.core.stats().dropped;
    let kinds = [LegKind::Caller, LegKind::Bot, LegKind::Frontend, LegKind::Events].map(|k| d.get(k));
    assert_eq!(kinds, [1, 1, 1, 2], "an unknown socket is not counted by leg");
    assert_eq!(d.total(), 5);
    assert_eq!(c.core.stats().dropped_unattached, 1, "but as unattached");
    c.core.handle_send_dropped(FRONTEND, 3);
    assert_eq!(c.core.stats().dropped.get(LegKind::Frontend), 4, "an encoder's refusals count at once");
}

/// Caller frames held while the agent is dialled count as backlog, and as sent once it opens.
#[test]
fn dialling_backlog_is_a_queue() {
    let mut c = Call::with_bot();
    let id = SessionId::parse("CA1").expect("valid");
    c.core.handle_caller_open(&id, CALLER);
    c.caller(&twilio::start_msg(1, &start("CA1").params()));
    for i in 0..3u8 {
        c.caller(&media(u64::from(i) + 2, &[i; 160]));
    }
    assert_eq!(c.core.queue_depths().agent_backlog, 3);
    assert_eq!(c.core.stats().frames_out.get(LegKind::Bot), 0, "held, not sent");
    let agent = c.agent.expect("dialled");
    assert_eq!(c.core.leg_kind(agent), Some(LegKind::Bot));
    assert!(c.core.handle_agent_open(c.now(), agent));
    c.drain();
    assert_eq!(c.core.queue_depths().agent_backlog, 0);
    assert_eq!(c.core.stats().frames_out.get(LegKind::Bot), 3);
    assert_eq!(c.core.stats().frames_in.get(LegKind::Caller), 3);
}

/// A Realtime agent's legs are counted as `realtime`: caller audio held while dialling and sent
/// after, and its audio deltas.
#[test]
fn realtime_frames_are_counted_as_realtime() {
    let mut c = Call::with_realtime();
    let id = SessionId::parse("CA1").expect("valid");
    c.core.handle_caller_open(&id, CALLER);
    c.caller(&twilio::start_msg(1, &start("CA1").params()));
    c.caller(&media(2, &[1; 160]));
    let agent = c.agent.expect("dialled");
    assert!(c.core.handle_agent_open(c.now(), agent));
    c.drain();
    c.caller(&media(3, &[2; 160]));
    let delta = format!(r#"{{"type":"response.audio.delta","item_id":"i1","delta":"{}"}}"#, b64(&[3; 160]));
    c.bot(&Utf8Bytes::from(delta));
    let s = c.core.stats();
    assert_eq!((s.frames_out.get(LegKind::Realtime), s.frames_in.get(LegKind::Realtime)), (2, 1));
    assert_eq!((s.frames_out.get(LegKind::Bot), s.frames_in.get(LegKind::Bot)), (0, 0));
    assert_eq!(c.core.leg_kind(agent), Some(LegKind::Realtime));
}

/// A Realtime barge-in truncates the item at what the caller heard by the barge-in's time, even
/// when the marks that played since the last timer were not yet reported.
#[test]
fn realtime_barge_in_counts_marks_played_before_it() {
    let mut c = Call::with_realtime();
    let id = SessionId::parse("CA1").expect("valid");
    c.core.handle_caller_open(&id, CALLER);
    c.caller(&twilio::start_msg(1, &start("CA1").params()));
    let agent = c.agent.expect("dialled");
    assert!(c.core.handle_agent_open(c.now(), agent));
    c.drain();
    // One second of the model's audio at once, 20 ms per delta.
    for _ in 0..50 {
        let delta = format!(r#"{{"type":"response.audio.delta","item_id":"i1","delta":"{}"}}"#, b64(&[3; 160]));
        c.bot(&Utf8Bytes::from(delta));
    }
    // Timers release and report on time up to 150 ms; at 300 ms, before the timers due since
    // have run, the caller talks over it (by then 300 ms were released and played).
    c.advance_to(150);
    c.ms = 300;
    c.bot(&Utf8Bytes::from(r#"{"type":"input_audio_buffer.speech_started","audio_start_ms":300,"item_id":"u1"}"#));
    let truncate =
        c.sent_to(agent).into_iter().find(|v| v["type"] == "conversation.item.truncate").expect("a truncate");
    assert_eq!(truncate["item_id"], "i1");
    let ms = truncate["audio_end_ms"].as_u64().expect("audio_end_ms");
    assert!((280..=300).contains(&ms), "heard {ms} ms of 300");
}

/// A call CA1 from a Twilio caller with a Realtime agent leg open, and that leg.
fn realtime_marks_call() -> (Call, ConnectionId) {
    let c = realtime_call(Default::default(), &[]);
    let agent = c.agent.expect("dialled");
    (c, agent)
}

/// `n` deltas of item `item`, 200 ms (1600 μ-law bytes) each, from the model at once.
fn realtime_deltas(c: &mut Call, item: &str, n: usize) {
    for _ in 0..n {
        let delta = format!(r#"{{"type":"response.audio.delta","item_id":"{item}","delta":"{}"}}"#, b64(&[3; 1600]));
        c.bot(&Utf8Bytes::from(delta));
    }
}

/// The names of the marks sent to the caller so far, in order.
fn caller_marks(c: &Call) -> Vec<String> {
    c.sent_to(CALLER)
        .iter()
        .filter(|v| v["event"] == "mark")
        .map(|v| v["mark"]["name"].as_str().expect("a name").to_owned())
        .collect()
}

/// The caller (Twilio) echoes the mark `name`.
fn echo(c: &mut Call, seq: u64, name: &str) {
    c.caller(&twilio::mark_echo_msg(seq, "MZ1", name));
}

/// The model's `speech_started`; returns the truncate it caused, if any.
fn realtime_barge_in(c: &mut Call, agent: ConnectionId) -> Option<Value> {
    let before = c.sent_to(agent).len();
    c.bot(&Utf8Bytes::from(r#"{"type":"input_audio_buffer.speech_started","audio_start_ms":0,"item_id":"u1"}"#));
    c.sent_to(agent).into_iter().skip(before).find(|v| v["type"] == "conversation.item.truncate")
}

/// A Twilio caller gets a mark right after the last piece of each of the model's deltas, once
/// the pacer releases it: one per delta, in order, never ahead of its audio.
#[test]
fn realtime_audio_is_followed_by_caller_marks() {
    let (mut c, _) = realtime_marks_call();
    realtime_deltas(&mut c, "i1", 3);
    c.advance_to(1_000);
    let sent = c.sent_to(CALLER);
    let kinds: Vec<&str> = sent.iter().map(|v| v["event"].as_str().unwrap_or_default()).collect();
    let mut bytes = 0;
    let mut marks = Vec::new();
    for v in &sent {
        match v["event"].as_str() {
            Some("media") => {
                bytes += base64::engine::general_purpose::STANDARD
                    .decode(v["media"]["payload"].as_str().expect("payload"))
                    .expect("base64")
                    .len()
            }
            Some("mark") => marks.push((bytes, v["mark"]["name"].as_str().expect("name").to_owned())),
            _ => {}
        }
    }
    assert_eq!(
        marks,
        [(1600, "rt.0.200".to_owned()), (3200, "rt.1.400".to_owned()), (4800, "rt.2.600".to_owned())],
        "{kinds:?}"
    );
    assert_eq!(c.core.stats().protocol_errors, 0);
}

/// Barge-in truncates at the last mark the caller echoed, not at the model's (larger) estimate.
#[test]
fn realtime_truncate_follows_echoed_marks() {
    let (mut c, agent) = realtime_marks_call();
    realtime_deltas(&mut c, "i1", 10);
    c.advance_to(1_500);
    let marks = caller_marks(&c);
    assert!(marks.len() >= 6, "{marks:?}");
    echo(&mut c, 3, &marks[0]);
    echo(&mut c, 4, &marks[1]);
    let truncate = realtime_barge_in(&mut c, agent).expect("a truncate");
    assert_eq!(truncate["item_id"], "i1");
    assert_eq!(truncate["audio_end_ms"], 400, "the model thought about 1500 ms had played");
    assert_eq!(c.core.stats().protocol_errors, 0);
}

/// Deltas of an interrupted item that were still on their way when the model heard the caller
/// are not played after the clear (nor do they restart the item at 0 ms); the next item plays.
#[test]
fn realtime_deltas_of_an_interrupted_item_are_dropped() {
    let (mut c, agent) = realtime_marks_call();
    realtime_deltas(&mut c, "i1", 10);
    c.advance_to(500);
    assert!(realtime_barge_in(&mut c, agent).is_some(), "a truncate");
    let sent = c.sent_to(CALLER).len();
    realtime_deltas(&mut c, "i1", 2);
    c.advance_to(1_500);
    let after: Vec<Value> = c.sent_to(CALLER).into_iter().skip(sent).collect();
    assert!(after.iter().all(|v| v["event"] != "media"), "the interrupted item goes on: {after:?}");
    assert!(realtime_barge_in(&mut c, agent).is_none(), "nothing to truncate");
    realtime_deltas(&mut c, "i2", 1);
    c.advance_to(2_000);
    let after: Vec<Value> = c.sent_to(CALLER).into_iter().skip(sent).collect();
    assert!(after.iter().any(|v| v["event"] == "media"), "the next item plays: {after:?}");
}

/// A caller that never echoes: the playout model decides, as before marks were sent.
#[test]
fn realtime_truncate_falls_back_to_the_model() {
    let (mut c, agent) = realtime_marks_call();
    realtime_deltas(&mut c, "i1", 10);
    c.advance_to(1_500);
    assert!(caller_marks(&c).len() >= 6);
    let truncate = realtime_barge_in(&mut c, agent).expect("a truncate");
    assert_eq!(truncate["audio_end_ms"], 1400, "the last model mark at or before 1500 ms");
}

/// Twilio's echoes of the marks pending at a clear are its flush: no protocol error, not heard,
/// and they do not make the call trust echoes (the next item still uses the model).
#[test]
fn realtime_marks_echoed_after_a_clear_do_not_count() {
    let (mut c, agent) = realtime_marks_call();
    realtime_deltas(&mut c, "i1", 10);
    c.advance_to(600);
    let truncate = realtime_barge_in(&mut c, agent).expect("a truncate");
    assert_eq!(truncate["audio_end_ms"], 600);
    let marks = caller_marks(&c);
    assert!(c.sent_to(CALLER).iter().any(|v| v["event"] == "clear"));
    for (seq, name) in (3..).zip(&marks) {
        echo(&mut c, seq, name);
    }
    assert_eq!(c.core.stats().protocol_errors, 0, "the flush is Twilio's normal behaviour");
    realtime_deltas(&mut c, "i2", 10);
    c.advance_to(1_600);
    let truncate = realtime_barge_in(&mut c, agent).expect("a truncate");
    assert_eq!(truncate["item_id"], "i2");
    assert_eq!(truncate["audio_end_ms"], 1000, "the model's estimate: 1000 ms after the second item began");
}

/// A mark name the relay never sent to the caller is a protocol error and changes nothing; the
/// relay's own are not.
#[test]
fn realtime_unknown_caller_marks_are_errors() {
    let (mut c, agent) = realtime_marks_call();
    realtime_deltas(&mut c, "i1", 5);
    c.advance_to(700);
    let marks = caller_marks(&c);
    echo(&mut c, 3, &marks[0]);
    echo(&mut c, 4, "rt.99.200");
    echo(&mut c, 5, "someone-else");
    echo(&mut c, 6, &marks[1].replace(".400", ".450"));
    assert_eq!(c.core.stats().protocol_errors, 3);
    let truncate = realtime_barge_in(&mut c, agent).expect("a truncate");
    assert_eq!(truncate["audio_end_ms"], 200, "the one real echo");
}

/// The agent is greeted with the caller's custom parameters except the relay's own: the
/// session's bearer token and the stream signature.
#[test]
fn agent_start_omits_the_relay_parameters() {
    let mut c = Call::with_bot();
    let id = SessionId::parse("CA1").expect("valid");
    c.core.handle_caller_open(&id, CALLER);
    let mut s = start("CA1");
    s.custom_parameters.push(("accessToken".into(), "secret-token".into()));
    s.custom_parameters.push(("relaySig".into(), "sig".into()));
    s.custom_parameters.push(("lang".into(), "fr".into()));
    c.caller(&twilio::start_msg(1, &s.params()));
    let agent = c.agent.expect("dialled");
    assert!(c.core.handle_agent_open(c.now(), agent));
    c.drain();
    let start = c.sent_to(agent).into_iter().find(|v| v["event"] == "start").expect("the agent's start");
    let params = &start["start"]["customParameters"];
    assert_eq!(params, &serde_json::json!({"callSid": "CA1", "lang": "fr"}), "{start}");
}

/// A Realtime call with listeners, its agent open: the stream `start` carries `params` as custom
/// parameters beyond `callSid`.
fn realtime_call(briefing: crate::session::agent::Briefing, params: &[(&str, &str)]) -> Call {
    let mut c = Call::with_realtime();
    if let Some(r) = c.core.agents.realtime.as_mut() {
        r.briefing = briefing;
    }
    let id = SessionId::parse("CA1").expect("valid");
    c.core.handle_caller_open(&id, CALLER);
    let mut s = start("CA1");
    s.custom_parameters.extend(params.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    c.caller(&twilio::start_msg(1, &s.params()));
    let now = c.now();
    c.core.handle_attach(now, &id, FRONTEND, ListenKind::Frontend, Credential::Anonymous).expect("tokenless call");
    c.core.handle_listener_text(now, FRONTEND, r#"{"event":"connect-twilio","callSid":"CA1","user_id":"u"}"#);
    c.core.handle_attach(now, &id, EVENTS, ListenKind::Events, Credential::Anonymous).expect("tokenless call");
    let agent = c.agent.expect("dialled");
    assert!(c.core.handle_agent_open(now, agent));
    c.drain();
    c
}

/// What the Realtime agent received, by `type`.
fn realtime_types(c: &Call) -> Vec<String> {
    let agent = c.agent.expect("dialled");
    c.sent_to(agent).iter().map(|v| v["type"].as_str().unwrap_or_default().to_owned()).collect()
}

/// The session is configured in the GA shape; without a briefing it has no instructions and the
/// model is not asked to speak first.
#[test]
fn realtime_session_is_ga_and_unbriefed_by_default() {
    let c = realtime_call(Default::default(), &[]);
    assert_eq!(realtime_types(&c), ["session.update"]);
    let update = &c.sent_to(c.agent.expect("dialled"))[0];
    assert_eq!(update["session"]["type"], "realtime", "{update}");
    assert_eq!(update["session"]["audio"]["input"]["format"]["type"], "audio/pcmu", "{update}");
    assert!(update["session"].get("instructions").is_none(), "{update}");
}

/// An outbound call's record (from `/outbound-call`) briefs the session: its prompt becomes the
/// instructions and its first message is asked for at once, before the caller's held audio.
#[test]
fn realtime_briefing_from_the_record() {
    let mut c = Call::with_realtime();
    let id = SessionId::parse("CA1").expect("valid");
    let update = command::RecordUpdate {
        prompt: Some("You book tables.".into()),
        first_message: Some("Hi, it's Bella's.".into()),
        from: Some("+15550001".into()),
        direction: Some(command::Direction::Outbound),
        ..Default::default()
    };
    c.core.handle_command(c.now(), &id, Command::Record(Box::new(update))).expect("record");
    c.core.handle_caller_open(&id, CALLER);
    let mut s = start("CA1");
    // A stream parameter never overrides what the API said.
    s.custom_parameters.push(("prompt".into(), "something else".into()));
    c.caller(&twilio::start_msg(1, &s.params()));
    c.caller(&media(2, &[1; 160]));
    let agent = c.agent.expect("dialled");
    assert!(c.core.handle_agent_open(c.now(), agent));
    c.drain();
    assert_eq!(realtime_types(&c), ["session.update", "response.create", "input_audio_buffer.append"]);
    let sent = c.sent_to(agent);
    assert_eq!(sent[0]["session"]["instructions"], "You book tables.");
    let greeting = sent[1]["response"]["instructions"].as_str().expect("instructions");
    assert!(greeting.ends_with("Hi, it's Bella's."), "{greeting}");
}

/// Without a record's briefing, the stream's `prompt`/`first_message` parameters brief the
/// session (as long as a parameter may be); without those, the operator's setting for the number called, then the
/// default.
#[test]
fn realtime_briefing_from_parameters_and_flags() {
    let longest = "p".repeat(twilio::MAX_PARAMETER_VALUE_BYTES);
    let c = realtime_call(Default::default(), &[("prompt", &longest), ("first_message", "Hello there")]);
    let sent = c.sent_to(c.agent.expect("dialled"));
    assert_eq!(sent[0]["session"]["instructions"].as_str(), Some(longest.as_str()));
    assert!(sent[1]["response"]["instructions"].as_str().is_some_and(|i| i.ends_with("Hello there")));

    let briefing = crate::session::agent::Briefing {
        instructions: Some("Default brief.".into()),
        first_message: Some("Acme, hello!".into()),
        instructions_by_number: [("+15550009".to_owned(), "Acme brief.".to_owned())].into_iter().collect(),
    };
    let c = realtime_call(briefing.clone(), &[("to", "+15550009")]);
    let sent = c.sent_to(c.agent.expect("dialled"));
    assert_eq!(sent[0]["session"]["instructions"], "Acme brief.");
    assert!(sent[1]["response"]["instructions"].as_str().is_some_and(|i| i.ends_with("Acme, hello!")));
    let c = realtime_call(briefing, &[("to", "+15550000")]);
    assert_eq!(c.sent_to(c.agent.expect("dialled"))[0]["session"]["instructions"], "Default brief.");
}

/// A fatal error (the session refused) is counted, shown on `/ws` with its code, and closes only
/// the agent leg: the call, its caller and its frontends go on. A non-fatal one closes nothing.
#[test]
fn realtime_fatal_error_ends_only_the_agent_leg() {
    let mut c = realtime_call(Default::default(), &[]);
    let agent = c.agent.expect("dialled");
    c.bot(&Utf8Bytes::from(
        r#"{"type":"error","error":{"type":"invalid_request_error","code":"invalid_value","message":"bad item"}}"#,
    ));
    assert_eq!((c.core.stats().agent_errors, c.closed(agent)), (1, None));
    c.bot(&Utf8Bytes::from(
        r#"{"type":"error","error":{"type":"invalid_request_error","code":"beta_api_shape_disabled","message":"The beta is gone."}}"#,
    ));
    assert_eq!(c.core.stats().agent_errors, 2);
    assert_eq!(c.closed(agent), Some(1000), "the agent leg is closed");
    assert_eq!(c.closed(CALLER), None, "the caller is not");
    let errors: Vec<Value> = c.sent_to(EVENTS).into_iter().filter(|v| v["eventType"] == "error").collect();
    let refused = errors.iter().find(|v| v["data"]["code"] == "beta_api_shape_disabled").expect("the error on /ws");
    assert_eq!(
        (refused["data"]["fatal"].as_bool(), refused["data"]["type"].as_str()),
        (Some(true), Some("invalid_request_error"))
    );
    assert!(errors.iter().any(|v| v["data"]["message"].as_str().is_some_and(|m| m.starts_with("agent disconnected"))));
    // The call goes on: the caller's audio still reaches the frontend, and the socket closing
    // afterwards changes nothing.
    c.caller(&media(2, &[7; 160]));
    assert!(c.sent_to(FRONTEND).iter().any(|v| v["event"] == "audio"), "caller audio still reaches frontends");
    c.core.handle_detach(c.now(), agent, true);
    c.drain();
    assert_eq!((c.core.stats().active_sessions, c.core.stats().callers), (1, 1));
}

/// A Realtime session that cannot be opened counts as an agent error, and the call goes on.
#[test]
fn realtime_dial_failure_is_an_agent_error() {
    let mut c = Call::with_realtime();
    let id = SessionId::parse("CA1").expect("valid");
    c.core.handle_caller_open(&id, CALLER);
    c.caller(&twilio::start_msg(1, &start("CA1").params()));
    let agent = c.agent.expect("dialled");
    c.core.handle_agent_closed(c.now(), agent, "agent handshake: 401 Unauthorized");
    c.drain();
    assert_eq!((c.core.stats().agent_errors, c.core.stats().active_sessions), (1, 1));
    assert_eq!(c.closed(CALLER), None);
}

/// A Realtime server closing its socket (no way to hang up a call) ends only the agent leg.
#[test]
fn realtime_close_is_not_a_hangup() {
    let mut c = realtime_call(Default::default(), &[]);
    let agent = c.agent.expect("dialled");
    c.core.handle_detach(c.now(), agent, true);
    c.drain();
    c.advance_to(1_000);
    assert_eq!(c.closed(CALLER), None);
    assert_eq!(c.core.stats().active_sessions, 1);
    assert!(events(&c.sent_to(EVENTS)).iter().all(|e| e != "call_ended"));
}

/// A Realtime leg with tools: a call of a declared tool becomes one `CallTool` (a repeated event
/// does not start it again), its answer goes back as the output then `response.create` and sets
/// the record's intent; an undeclared tool is answered with an error at once; all are counted.
#[test]
fn realtime_function_calls_run_once_and_answer_the_model() {
    let mut c = Call::with_realtime();
    let tool = crate::proto::tools::Tool {
        name: "book".into(),
        description: "Books".into(),
        parameters: serde_json::json!({"type": "object"}),
    };
    let settings = crate::config::ToolSettings {
        declared: std::sync::Arc::from(vec![tool]),
        url: Some("http://127.0.0.1:9/tools".into()),
        ..Default::default()
    };
    c.core =
        std::mem::replace(&mut c.core, CoreState::new(Limits::default(), AgentPolicy::default())).with_tools(settings);
    let id = SessionId::parse("CA1").expect("valid");
    c.core.handle_caller_open(&id, CALLER);
    c.caller(&twilio::start_msg(1, &start("CA1").params()));
    let agent = c.agent.expect("dialled");
    assert!(c.core.handle_agent_open(c.now(), agent));
    c.drain();
    let update = c.sent_to(agent).into_iter().find(|v| v["type"] == "session.update").expect("session.update");
    assert_eq!(update["session"]["tools"][0]["name"], "book");
    assert_eq!(update["session"]["tool_choice"], "auto");

    let call =
        r#"{"type":"response.function_call_arguments.done","call_id":"c1","name":"book","arguments":"{\"n\":2}"}"#;
    c.bot(&Utf8Bytes::from_static(call));
    c.bot(&Utf8Bytes::from_static(call));
    let calls: Vec<ToolCall> = c
        .log
        .iter()
        .filter_map(|o| match o {
            Output::CallTool(t) => Some((**t).clone()),
            _ => None,
        })
        .collect();
    assert_eq!(calls.len(), 1, "one call per call_id");
    let body: Value = serde_json::from_slice(&calls[0].body).expect("json");
    assert_eq!(body, serde_json::json!({"callSid": "CA1", "callId": "c1", "name": "book", "arguments": {"n": 2}}));
    assert!(!c.sent_to(agent).iter().any(|v| v["type"] == "conversation.item.create"), "nothing before the answer");

    let answer = crate::proto::tools::Answer { output: "booked".into(), intent: Some("booking".into()) };
    let result = ToolResult { session: id.clone(), conn: agent, call_id: "c1".into(), outcome: Ok(answer) };
    c.core.handle_tool_result(c.now(), result);
    c.drain();
    let sent = c.sent_to(agent);
    let n = sent.len();
    assert_eq!(
        sent[n - 2]["item"],
        serde_json::json!({"type": "function_call_output", "call_id": "c1", "output": "booked"})
    );
    assert_eq!(sent[n - 1]["type"], "response.create");

    c.bot(&Utf8Bytes::from_static(
        r#"{"type":"response.function_call_arguments.done","call_id":"c2","name":"rm_rf","arguments":"{}"}"#,
    ));
    let sent = c.sent_to(agent);
    let n = sent.len();
    assert_eq!(sent[n - 2]["item"]["call_id"], "c2");
    assert!(sent[n - 2]["item"]["output"].as_str().is_some_and(|o| o.contains("unknown tool")));
    assert_eq!(c.log.iter().filter(|o| matches!(o, Output::CallTool(_))).count(), 1, "never POSTed");
    let record = match c.core.handle_command(c.now(), &id, Command::ReadRecord) {
        Ok(Reply::Record(r)) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!((record.function_calls, record.intent.as_deref()), (2, Some("booking")));
    assert_eq!(c.core.stats().tools, ToolStats { calls: 2, failed: 0, refused: 1 });
}

/// While draining, a caller stream whose `start` names a call the core does not know is closed
/// with 1013 and begins no session; a call the core knows (its webhook came first) still starts;
/// a live call keeps its caller, agent and listeners, and a new listener of it attaches.
#[test]
fn draining_refuses_unknown_calls_and_serves_known_ones() {
    let mut c = Call::connected();
    let live = SessionId::parse("CA1").expect("valid");
    c.core.handle_drain(true);
    // A new call's stream.
    let stranger = ConnectionId(300);
    let new = SessionId::parse("CA2").expect("valid");
    c.core.handle_caller_open(&new, stranger);
    let now = c.now();
    c.core.handle_caller_frame(
        now,
        stranger,
        &Bytes::copy_from_slice(twilio::start_msg(1, &start("CA2").params()).as_bytes()),
    );
    c.drain();
    assert_eq!(c.closed(stranger), Some(1013), "a new call's first leg is refused");
    assert_eq!(c.core.stats().active_sessions, 1, "no session began");
    assert_eq!(c.core.admits(&new), Err(CommandError::Draining));
    // The live call: its caller's audio still reaches its agent, and a new listener attaches.
    assert_eq!(c.core.admits(&live), Ok(()));
    let before = c.log.len();
    c.caller(&media(2, &[1; 160]));
    let agent = c.agent.expect("dialled");
    assert!(
        c.log[before..].iter().any(|o| matches!(o, Output::Send { conn, .. } if *conn == agent)),
        "caller audio still reaches the agent"
    );
    let watcher = ConnectionId(301);
    c.core
        .handle_attach(now, &live, watcher, ListenKind::Events, Credential::Anonymous)
        .expect("a live call's listener");
    // A call announced by its webhook before the drain: its stream still starts here.
    let known = SessionId::parse("CA3").expect("valid");
    c.core.handle_drain(false);
    c.core.handle_command(now, &known, Command::Record(Box::default())).expect("webhook record");
    c.core.handle_drain(true);
    assert_eq!(c.core.admits(&known), Ok(()), "a call the core knows is admitted");
    let third = ConnectionId(302);
    c.core.handle_caller_open(&known, third);
    c.core.handle_caller_frame(
        now,
        third,
        &Bytes::copy_from_slice(twilio::start_msg(1, &start("CA3").params()).as_bytes()),
    );
    c.drain();
    assert_eq!(c.closed(third), None);
    assert_eq!(c.core.stats().active_sessions, 2, "the known call began");
    // Undrained, a new call begins again.
    c.core.handle_drain(false);
    assert_eq!(c.core.admits(&new), Ok(()));
}

/// Every call record a core makes names the core's node.
#[test]
fn records_name_their_node() {
    let mut c = Call::with_bot();
    c.core = CoreState::new(Limits::default(), AgentPolicy::default()).with_node_id("node-7".into());
    let id = SessionId::parse("CA1").expect("valid");
    c.core.handle_caller_open(&id, CALLER);
    c.caller(&twilio::start_msg(1, &start("CA1").params()));
    let Ok(Reply::Record(r)) = c.core.handle_command(c.now(), &id, Command::ReadRecord) else { panic!("record") };
    assert_eq!(r.node, "node-7");
    let emitted = c.log.iter().rev().find_map(|o| match o {
        Output::Record(change) => Some(change.record.node.clone()),
        _ => None,
    });
    assert_eq!(emitted.as_deref(), Some("node-7"), "the emitted change carries it too");
}
