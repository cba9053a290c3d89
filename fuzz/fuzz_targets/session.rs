//! One core's sessions (`CoreState`, sans-IO) driven by fuzzer-chosen sequences of what the shell
//! feeds it: control commands (start, stop, mute, custom stream, resume, status, records,
//! transcripts), listener attaches and their texts, Twilio caller streams (valid, mutated and raw
//! frames), agent legs (Twilio or Realtime: open, frames, close), Retell LLM sockets, detaches,
//! shutdown and virtual time. Connections are used as the shell uses them: fresh ids, frames only
//! on open connections, one detach each.
//!
//! Asserts: no panic (counter underflow included); timers settle; every text sent to a listener,
//! caller or agent is JSON; the counts stay consistent (active sessions within the core limit and
//! never more than the starts, callers within sessions, observers within attached listeners); after
//! a shutdown and every socket's detach, nothing is left.
#![no_main]

use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use relay_engine::config::Limits;
use relay_engine::core::command::{Command, Direction, RecordUpdate, Reply, Speaker, StartCall, Transcript};
use relay_engine::core::{CoreState, Credential, ListenKind, Output};
use relay_engine::id::{ConnectionId, SessionId, StreamId};
use relay_engine::media::SampleRate;
use relay_engine::proto::twilio;
use relay_engine::secret::Secret;
use relay_engine::proto::realtime::ApiShape;
use relay_engine::session::agent::{AgentPolicy, AgentProtocol, AgentUrl, Briefing, RealtimeAgent};
use serde_json::{json, Value};

#[derive(Arbitrary, Debug)]
struct Input {
    setup: Setup,
    steps: Vec<Step>,
}

#[derive(Arbitrary, Debug)]
struct Setup {
    /// Which agents calls get: 0 none, 1 a Twilio-protocol bot, 2 a Realtime model, 3 both.
    agents: u8,
    llm_upstream: bool,
    sessions_per_core: u8,
    observers_per_session: u8,
    pending_sessions_per_core: u8,
    records_per_core: u8,
    begin_sentence: bool,
}

#[derive(Arbitrary, Debug)]
enum Step {
    Command { session: u8, command: Cmd },
    Attach { session: u8, frontend: bool, credential: Cred },
    Detach { conn: u8, peer_closed: bool },
    ListenerText { conn: u8, text: ListenerText },
    CallerOpen { session: u8 },
    CallerFrame { conn: u8, frame: CallerFrame },
    AgentOpen { agent: u8 },
    AgentFrame { agent: u8, frame: AgentFrame },
    AgentClosed { agent: u8 },
    AgentDetach { agent: u8 },
    LlmOpen { session: u8 },
    LlmText { conn: u8, text: RetellText },
    Advance { ms: u16 },
    Shutdown,
}

#[derive(Arbitrary, Debug)]
enum Cmd {
    Start { token: u8, rate: u8, raw_samples: bool },
    Stop,
    SetMicrophone(bool),
    SendCustomStream(u8),
    ResumeMicrophone,
    CallStatus,
    TrackStatus,
    Record { status: u8, user: Option<u8>, duration_secs: Option<u16>, outbound: bool, project: Option<u8> },
    ReadRecord,
    Transcript { agent: bool, text: String },
    RtcEnd { leg: u8 },
}

#[derive(Arbitrary, Debug)]
enum Cred {
    Operator,
    Token(u8),
    Anonymous,
}

#[derive(Arbitrary, Debug)]
enum ListenerText {
    Ping,
    ConnectTwilio { session: u8, user: u8 },
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum CallerFrame {
    Connected,
    Start {
        session: u8,
        agent_url: Option<u8>,
        params: Vec<(String, String)>,
    },
    Media {
        chunk: Option<u32>,
        timestamp: Option<u32>,
        outbound: bool,
        audio: Vec<u8>,
    },
    Dtmf(u8),
    Mark(String),
    /// The echo of a mark the relay sent to a caller (picked among the last ones sent), as Twilio
    /// echoes it once played or flushed by a `clear`.
    EchoMark(u8),
    Stop,
    Clear,
    /// A valid frame (`base` picks which) with one byte replaced.
    Mutated {
        base: u8,
        at: u16,
        byte: u8,
    },
    /// A valid frame cut short.
    Truncated {
        base: u8,
        len: u16,
    },
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum AgentFrame {
    Media { audio: Vec<u8> },
    Mark(String),
    Clear,
    Stop,
    RealtimeDelta { item: u8, audio: Vec<u8> },
    RealtimeSpeechStarted,
    RealtimeTranscript { caller: bool, text: String },
    RealtimeError(String),
    Mutated { base: u8, at: u16, byte: u8 },
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum RetellText {
    Config(Option<u8>),
    Ping(Option<u32>),
    CallDetails,
    Respond { id: Option<u16>, reminder: bool, transcript: Vec<(bool, String)> },
    UpdateOnly(Vec<(bool, String)>),
    Raw(String),
}

const SESSIONS: [&str; 4] = ["CA0", "CA1", "CA2", "s-3"];
const STATUSES: [&str; 9] =
    ["queued", "ringing", "in-progress", "completed", "busy", "failed", "no-answer", "canceled", "odd"];
const AGENT_URLS: [&str; 4] = ["ws://127.0.0.1:9/bot", "ws://allowed.example:8080/x", "ws://other.example/x", "::"];
/// Frames longer than this are cut (a real relay bounds WebSocket messages far above it).
const MAX_AUDIO: usize = 640;
/// Steps per input, and timer runs per `Advance`, beyond which the input is cut (keeps runs fast).
const MAX_STEPS: usize = 256;
const MAX_TIMER_RUNS: usize = 20_000;

fn origin() -> Instant {
    static T0: OnceLock<Instant> = OnceLock::new();
    *T0.get_or_init(Instant::now)
}

fn sid(n: u8) -> SessionId {
    SessionId::parse(SESSIONS[usize::from(n) % SESSIONS.len()]).expect("valid id")
}

struct Harness {
    core: CoreState,
    limits: Limits,
    ms: u64,
    next_conn: u64,
    /// Connections the harness opened, by kind (removed once detached).
    listeners: Vec<ConnectionId>,
    callers: Vec<(ConnectionId, SessionId)>,
    llm: Vec<ConnectionId>,
    /// Agent legs the core asked to dial: id, protocol, whether the harness opened it.
    agents: Vec<(ConnectionId, AgentProtocol, bool)>,
    /// Listeners attached (not yet detached): observers can never exceed them.
    attached: HashSet<ConnectionId>,
    /// Connections whose every message must be JSON (listeners, callers, Twilio and Realtime agents).
    json: HashSet<ConnectionId>,
    /// Successful starts, by command or by a caller's `start` that created the session.
    starts: usize,
    /// Stream sid of the last `start` a caller sent (media frames echo it).
    stream_sid: String,
    /// Names of the last marks the core sent to callers (for their echoes), at most 64.
    sent_marks: Vec<String>,
}

impl Harness {
    fn now(&self) -> relay_engine::time::Now {
        relay_engine::time::Now {
            instant: origin() + Duration::from_millis(self.ms),
            unix_ms: 1_700_000_000_000 + self.ms,
        }
    }

    fn fresh(&mut self) -> ConnectionId {
        self.next_conn += 1;
        ConnectionId(self.next_conn)
    }

    fn drain(&mut self) {
        while let Some(output) = self.core.poll_output() {
            match output {
                Output::Send { conn, text } => {
                    if self.json.contains(&conn) {
                        assert!(serde_json::from_str::<Value>(&text).is_ok(), "not JSON to {conn:?}: {text:?}");
                    }
                    if self.callers.iter().any(|(c, _)| *c == conn) {
                        let v: Value = serde_json::from_str(&text).unwrap_or_default();
                        if let (Some("mark"), Some(name)) = (v["event"].as_str(), v["mark"]["name"].as_str()) {
                            if self.sent_marks.len() == 64 {
                                self.sent_marks.remove(0);
                            }
                            self.sent_marks.push(name.to_owned());
                        }
                    }
                }
                Output::ConnectAgent { conn, protocol, .. } => {
                    assert!(conn.0 >= 1 << 63, "core-made ids never collide with the shell's");
                    assert!(self.agents.iter().all(|(c, _, _)| *c != conn), "an agent id was reused");
                    if protocol != AgentProtocol::RetellLlm {
                        self.json.insert(conn);
                    }
                    self.agents.push((conn, protocol, false));
                }
                Output::Close { .. } | Output::Datagram { .. } | Output::Record(_) | Output::CallTool(_) => {}
            }
        }
    }

    fn check(&self) {
        let stats = self.core.stats();
        assert!(stats.active_sessions <= self.limits.sessions_per_core, "{stats:?}");
        assert!(stats.active_sessions <= self.starts, "{stats:?} after {} starts", self.starts);
        assert!(stats.callers <= stats.active_sessions, "{stats:?}");
        assert!(stats.observers <= self.attached.len(), "{stats:?} with {} attached", self.attached.len());
    }

    fn advance(&mut self, ms: u64) {
        let end = self.ms + ms;
        let target = origin() + Duration::from_millis(end);
        let mut runs = 0;
        while let Some(at) = self.core.poll_timeout().filter(|at| *at <= target) {
            runs += 1;
            assert!(runs <= MAX_TIMER_RUNS, "timers do not settle");
            self.ms = self.ms.max(at.saturating_duration_since(origin()).as_millis() as u64);
            let now = relay_engine::time::Now { instant: at.max(self.now().instant), ..self.now() };
            self.core.handle_timeout(now);
            self.drain();
            self.check();
        }
        self.ms = end;
    }

    fn step(&mut self, step: Step) {
        let now = self.now();
        match step {
            Step::Command { session, command } => {
                let id = sid(session);
                let is_start = matches!(command, Cmd::Start { .. });
                let reply = self.core.handle_command(now, &id, command.into_command());
                if is_start && reply == Ok(Reply::Started) {
                    self.starts += 1;
                }
                if let Ok(Reply::CallStatus(status)) = reply {
                    assert!(status.is_active);
                }
            }
            Step::Attach { session, frontend, credential } => {
                let conn = self.fresh();
                let kind = if frontend { ListenKind::Frontend } else { ListenKind::Events };
                let credential = match credential {
                    Cred::Operator => Credential::Operator,
                    Cred::Token(n) => Credential::Token(Secret::new(format!("tok{}", n % 3))),
                    Cred::Anonymous => Credential::Anonymous,
                };
                if let Ok(greeting) = self.core.handle_attach(now, &sid(session), conn, kind, credential) {
                    if let Some(text) = greeting {
                        assert!(serde_json::from_str::<Value>(&text).is_ok());
                    }
                    self.listeners.push(conn);
                    self.attached.insert(conn);
                    self.json.insert(conn);
                }
            }
            Step::Detach { conn, peer_closed } => {
                // Any kind of socket the shell holds: listeners, callers, Retell sockets.
                let total = self.listeners.len() + self.callers.len() + self.llm.len();
                if total == 0 {
                    return;
                }
                let i = usize::from(conn) % total;
                let conn = if i < self.listeners.len() {
                    let c = self.listeners.swap_remove(i);
                    self.attached.remove(&c);
                    c
                } else if i < self.listeners.len() + self.callers.len() {
                    self.callers.swap_remove(i - self.listeners.len()).0
                } else {
                    self.llm.swap_remove(i - self.listeners.len() - self.callers.len())
                };
                self.core.handle_detach(now, conn, peer_closed);
            }
            Step::ListenerText { conn, text } => {
                let Some(&conn) = pick(&self.listeners, conn) else { return };
                let text = match text {
                    ListenerText::Ping => r#"{"type":"ping"}"#.to_owned(),
                    ListenerText::ConnectTwilio { session, user } => {
                        json!({"event": "connect-twilio", "callSid": sid(session).as_str(), "user_id": format!("u{user}")})
                            .to_string()
                    }
                    ListenerText::Raw(s) => s,
                };
                self.core.handle_listener_text(now, conn, &text);
            }
            Step::CallerOpen { session } => {
                let conn = self.fresh();
                let id = sid(session);
                self.core.handle_caller_open(&id, conn);
                self.callers.push((conn, id));
                self.json.insert(conn);
            }
            Step::CallerFrame { conn, frame } => {
                let Some((conn, id)) = pick(&self.callers, conn).cloned() else { return };
                let active_before = self.core.stats().active_sessions;
                let frame = self.caller_frame(&id, frame);
                // Built as a start, or a mutated frame that still is one.
                let is_start = matches!(twilio::parse(&frame), Ok(twilio::Message::Start(_)));
                self.core.handle_caller_frame(now, conn, &frame);
                if is_start && self.core.stats().active_sessions > active_before {
                    self.starts += 1;
                }
            }
            Step::AgentOpen { agent } => {
                let Some((conn, _, opened)) = pick_mut(&mut self.agents, agent) else { return };
                if std::mem::replace(opened, true) {
                    return;
                }
                let conn = *conn;
                if !self.core.handle_agent_open(now, conn) {
                    // The shell closes the dialled socket and forgets it.
                    self.agents.retain(|(c, _, _)| *c != conn);
                }
            }
            Step::AgentFrame { agent, frame } => {
                let Some(&(conn, _, true)) = pick(&self.agents, agent) else { return };
                let frame = self.agent_frame(frame);
                self.core.handle_agent_frame(now, conn, &frame);
            }
            Step::AgentClosed { agent } => {
                // Dialling failed (or timed out): reported once, only for a leg never opened.
                let Some(&(conn, _, false)) = pick(&self.agents, agent) else { return };
                self.agents.retain(|(c, _, _)| *c != conn);
                self.core.handle_agent_closed(now, conn, "connection refused");
            }
            Step::AgentDetach { agent } => {
                let Some(&(conn, _, true)) = pick(&self.agents, agent) else { return };
                self.agents.retain(|(c, _, _)| *c != conn);
                self.core.handle_detach(now, conn, agent % 2 == 0);
            }
            Step::LlmOpen { session } => {
                let conn = self.fresh();
                self.core.handle_llm_open(now, &sid(session), conn);
                self.llm.push(conn);
            }
            Step::LlmText { conn, text } => {
                let Some(&conn) = pick(&self.llm, conn) else { return };
                self.core.handle_llm_text(now, conn, &text.into_text());
            }
            Step::Advance { ms } => self.advance(u64::from(ms % 10_000)),
            Step::Shutdown => self.core.handle_shutdown(now),
        }
    }

    fn caller_frame(&mut self, id: &SessionId, frame: CallerFrame) -> Bytes {
        let stream = self.stream_sid.clone();
        let text: String = match frame {
            CallerFrame::Connected => twilio::connected_msg().to_string(),
            CallerFrame::Start { session, agent_url, params } => {
                // Mostly the stream's own call (as the shell routed it), sometimes another.
                let call = if session % 4 == 0 { sid(session) } else { id.clone() };
                self.stream_sid = format!("MZ{session}");
                let mut custom: Vec<(String, String)> = params.into_iter().take(8).collect();
                custom.push(("callSid".into(), call.as_str().into()));
                if let Some(n) = agent_url {
                    custom.push(("agentUrl".into(), AGENT_URLS[usize::from(n) % AGENT_URLS.len()].into()));
                }
                let start = twilio::Start {
                    sequence: Some(1),
                    stream_sid: self.stream_sid.clone(),
                    account_sid: "AC1".into(),
                    call_sid: call.as_str().into(),
                    tracks: vec!["inbound".into()],
                    custom_parameters: custom,
                    media_format: twilio::MediaFormat::default(),
                };
                twilio::start_msg(1, &start.params()).to_string()
            }
            CallerFrame::Media { chunk, timestamp, outbound, audio } => {
                let payload = b64(&audio);
                let track = if outbound { twilio::Track::Outbound } else { twilio::Track::Inbound };
                let (chunk, ts) = (chunk.unwrap_or(1).into(), timestamp.unwrap_or(0).into());
                twilio::media_msg(2, &stream, track, chunk, ts, payload.as_bytes()).to_string()
            }
            CallerFrame::Dtmf(d) => {
                twilio::dtmf_msg(3, &stream, char::from(b"0123456789*#ABCDwx"[usize::from(d) % 18])).to_string()
            }
            CallerFrame::Mark(name) => twilio::mark_echo_msg(4, &stream, &name).to_string(),
            CallerFrame::EchoMark(n) => {
                let name = pick(&self.sent_marks, n).cloned().unwrap_or_default();
                twilio::mark_echo_msg(4, &stream, &name).to_string()
            }
            CallerFrame::Stop => twilio::stop_msg(5, &stream, "AC1", id.as_str()).to_string(),
            CallerFrame::Clear => twilio::clear_out(&stream).to_string(),
            CallerFrame::Mutated { base, at, byte } => mutate(caller_template(base, &stream, id), at, byte),
            CallerFrame::Truncated { base, len } => {
                let t = caller_template(base, &stream, id);
                String::from_utf8_lossy(&t.as_bytes()[..usize::from(len).min(t.len())]).into_owned()
            }
            CallerFrame::Raw(s) => s,
        };
        Bytes::from(text)
    }

    fn agent_frame(&self, frame: AgentFrame) -> Bytes {
        let sid = &self.stream_sid;
        let text: String = match frame {
            AgentFrame::Media { audio } => twilio::media_out(sid, b64(&audio).as_bytes()).to_string(),
            AgentFrame::Mark(name) => twilio::mark_out(sid, &name).to_string(),
            AgentFrame::Clear => twilio::clear_out(sid).to_string(),
            AgentFrame::Stop => twilio::stop_msg(9, sid, "AC1", "CA0").to_string(),
            AgentFrame::RealtimeDelta { item, audio } => {
                json!({"type": "response.audio.delta", "item_id": format!("item{item}"), "delta": b64(&audio)})
                    .to_string()
            }
            AgentFrame::RealtimeSpeechStarted => r#"{"type":"input_audio_buffer.speech_started"}"#.to_owned(),
            AgentFrame::RealtimeTranscript { caller: true, text } => {
                json!({"type": "conversation.item.input_audio_transcription.completed", "transcript": text}).to_string()
            }
            AgentFrame::RealtimeTranscript { caller: false, text } => {
                json!({"type": "response.audio_transcript.done", "transcript": text}).to_string()
            }
            AgentFrame::RealtimeError(message) => json!({"type": "error", "error": {"message": message}}).to_string(),
            AgentFrame::Mutated { base, at, byte } => {
                let template = match base % 4 {
                    0 => twilio::media_out(sid, b"//8A/w==").to_string(),
                    1 => twilio::mark_out(sid, "m1").to_string(),
                    2 => r#"{"type":"response.audio.delta","item_id":"i1","delta":"//8A/w=="}"#.to_owned(),
                    _ => twilio::clear_out(sid).to_string(),
                };
                mutate(template, at, byte)
            }
            AgentFrame::Raw(s) => s,
        };
        Bytes::from(text)
    }
}

impl Cmd {
    fn into_command(self) -> Command {
        match self {
            Self::Start { token, rate, raw_samples } => Command::Start(StartCall {
                access_token: Secret::new(format!("tok{}", token % 3)),
                sample_rate: [SampleRate::Hz8000, SampleRate::Hz16000, SampleRate::Hz24000, SampleRate::Hz48000]
                    [usize::from(rate) % 4],
                emit_raw_audio_samples: raw_samples,
            }),
            Self::Stop => Command::Stop,
            Self::SetMicrophone(on) => Command::SetMicrophone(on),
            Self::SendCustomStream(n) => {
                Command::SendCustomStream(StreamId::parse(&format!("custom{n}")).expect("valid"))
            }
            Self::ResumeMicrophone => Command::ResumeMicrophone,
            Self::CallStatus => Command::CallStatus,
            Self::TrackStatus => Command::TrackStatus,
            Self::Record { status, user, duration_secs, outbound, project } => {
                Command::Record(Box::new(RecordUpdate {
                    user_id: user.map(|u| format!("u{u}")),
                    status: Some(STATUSES[usize::from(status) % STATUSES.len()].to_owned()),
                    duration_secs: duration_secs.map(u64::from),
                    project_id: project.map(|p| format!("p{p}")),
                    direction: outbound.then_some(Direction::Outbound),
                    ..RecordUpdate::default()
                }))
            }
            Self::ReadRecord => Command::ReadRecord,
            Self::Transcript { agent, text } => Command::Transcript(Box::new(Transcript {
                speaker: if agent { Speaker::Agent } else { Speaker::User },
                text,
            })),
            Self::RtcEnd { leg } => Command::RtcEnd { leg: leg.into(), credential: Credential::Operator },
        }
    }
}

impl RetellText {
    fn into_text(self) -> String {
        let transcript = |t: Vec<(bool, String)>| -> Value {
            t.into_iter()
                .take(16)
                .map(|(agent, content)| json!({"role": if agent { "agent" } else { "user" }, "content": content}))
                .collect()
        };
        match self {
            Self::Config(id) => json!({"response_type": "config", "response_id": id}).to_string(),
            Self::Ping(ts) => json!({"interaction_type": "ping_pong", "timestamp": ts}).to_string(),
            Self::CallDetails => {
                json!({"interaction_type": "call_details", "call": {"call_id": "CA0", "from_number": "+15550100"}})
                    .to_string()
            }
            Self::Respond { id, reminder, transcript: t } => json!({
                "interaction_type": if reminder { "reminder_required" } else { "response_required" },
                "response_id": id,
                "transcript": transcript(t),
            })
            .to_string(),
            Self::UpdateOnly(t) => json!({"interaction_type": "update_only", "transcript": transcript(t)}).to_string(),
            Self::Raw(s) => s,
        }
    }
}

fn caller_template(base: u8, sid: &str, id: &SessionId) -> String {
    match base % 5 {
        0 => twilio::media_msg(2, sid, twilio::Track::Inbound, 1, 0, b"//8A/w==").to_string(),
        1 => {
            let start = twilio::Start {
                sequence: Some(1),
                stream_sid: "MZ1".into(),
                account_sid: "AC1".into(),
                call_sid: id.as_str().into(),
                tracks: vec!["inbound".into()],
                custom_parameters: vec![("callSid".into(), id.as_str().into())],
                media_format: twilio::MediaFormat::default(),
            };
            twilio::start_msg(1, &start.params()).to_string()
        }
        2 => twilio::mark_echo_msg(4, sid, "m1").to_string(),
        3 => twilio::dtmf_msg(3, sid, '5').to_string(),
        _ => twilio::stop_msg(5, sid, "AC1", id.as_str()).to_string(),
    }
}

/// `text` with the byte at `at` (modulo its length) replaced; a WebSocket text frame is UTF-8, so
/// a broken character becomes U+FFFD as a client's encoder would have to write it.
fn mutate(text: String, at: u16, byte: u8) -> String {
    let mut bytes = text.into_bytes();
    if !bytes.is_empty() {
        let i = usize::from(at) % bytes.len();
        bytes[i] = byte;
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn b64(audio: &[u8]) -> String {
    STANDARD.encode(&audio[..audio.len().min(MAX_AUDIO)])
}

fn pick<T>(items: &[T], n: u8) -> Option<&T> {
    (!items.is_empty()).then(|| &items[usize::from(n) % items.len()])
}

fn pick_mut<T>(items: &mut [T], n: u8) -> Option<&mut T> {
    let len = items.len();
    (len != 0).then(|| &mut items[usize::from(n) % len])
}

fuzz_target!(|input: Input| {
    let setup = input.setup;
    let limits = Limits {
        sessions_per_core: usize::from(setup.sessions_per_core % 4) + 1,
        observers_per_session: usize::from(setup.observers_per_session % 4) + 1,
        pending_sessions_per_core: usize::from(setup.pending_sessions_per_core % 4) + 1,
        records_per_core: usize::from(setup.records_per_core % 4) + 1,
        pending_observer_timeout: Duration::from_secs(5),
        ..Limits::default()
    };
    let url = |s: &str| AgentUrl::parse(s).expect("a valid agent URL");
    let policy = AgentPolicy {
        default_url: (setup.agents % 4 == 1 || setup.agents % 4 == 3).then(|| url(AGENT_URLS[0])),
        allow: vec!["allowed.example".into()],
        realtime: (setup.agents % 4 >= 2).then(|| RealtimeAgent {
            url: url("wss://realtime.example/v1/realtime?model=m"),
            api_key: Some(Secret::new("key")),
            shape: if setup.agents % 8 >= 4 { ApiShape::Beta } else { ApiShape::Ga },
            voice: None,
            briefing: Briefing {
                instructions: Some("Be brief.".into()),
                first_message: Some("Hello!".into()),
                ..Briefing::default()
            },
        }),
        llm_upstream: setup.llm_upstream.then(|| url("ws://127.0.0.1:9/llm-websocket")),
    };
    let begin = if setup.begin_sentence { "Hello!" } else { "" };
    let mut h = Harness {
        core: CoreState::new(limits.clone(), policy).with_begin_sentence(begin.to_owned()),
        limits,
        ms: 0,
        next_conn: 0,
        listeners: Vec::new(),
        callers: Vec::new(),
        llm: Vec::new(),
        agents: Vec::new(),
        attached: HashSet::new(),
        json: HashSet::new(),
        starts: 0,
        stream_sid: "MZ1".into(),
        sent_marks: Vec::new(),
    };
    for step in input.steps.into_iter().take(MAX_STEPS) {
        h.step(step);
        h.drain();
        h.check();
    }
    // The end of every run: shutdown, then every socket the shell holds goes away.
    let now = h.now();
    h.core.handle_shutdown(now);
    h.drain();
    let open: Vec<ConnectionId> = h
        .listeners
        .iter()
        .copied()
        .chain(h.callers.iter().map(|(c, _)| *c))
        .chain(h.llm.iter().copied())
        .chain(h.agents.iter().filter(|(_, _, opened)| *opened).map(|(c, _, _)| *c))
        .collect();
    for conn in open {
        h.core.handle_detach(now, conn, false);
    }
    h.drain();
    let stats = h.core.stats();
    assert_eq!((stats.active_sessions, stats.observers, stats.callers), (0, 0, 0), "{stats:?}");
});
