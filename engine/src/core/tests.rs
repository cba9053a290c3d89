//! Scenario tests of `CoreState` with a virtual clock.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::command::{Command, CommandError, Reply, StartCall};
use super::*;
use crate::id::StreamId;
use crate::media::SampleRate;
use crate::session::agent::AgentPolicy;

struct Harness {
    core: CoreState,
    t0: Instant,
    ms: u64,
}

impl Harness {
    fn new(limits: Limits) -> Self {
        #[allow(clippy::disallowed_methods)] // The virtual clock's origin; tests advance `ms` by hand.
        let t0 = Instant::now();
        Self { core: CoreState::new(limits, AgentPolicy::default()), t0, ms: 0 }
    }

    fn now(&self) -> Now {
        Now { instant: self.t0 + Duration::from_millis(self.ms), unix_ms: 1_700_000_000_000 + self.ms }
    }

    fn cmd(&mut self, id: &str, c: Command) -> Result<Reply, CommandError> {
        let now = self.now();
        self.core.handle_command(now, &sid(id), c)
    }

    fn attach(&mut self, id: &str, conn: u64, cred: Credential) -> Result<Option<Utf8Bytes>, AttachError> {
        let now = self.now();
        self.core.handle_attach(now, &sid(id), ConnectionId(conn), ListenKind::Events, cred)
    }

    fn detach(&mut self, conn: u64) {
        let now = self.now();
        self.core.handle_detach(now, ConnectionId(conn), true);
    }

    fn drain(&mut self) -> Vec<Output> {
        std::iter::from_fn(|| self.core.poll_output()).collect()
    }

    /// Event types sent to `conn`, in order, and whether it was closed (with code).
    fn events_for(outputs: &[Output], conn: u64) -> (Vec<String>, Option<u16>) {
        let mut types = Vec::new();
        let mut closed = None;
        for o in outputs {
            match o {
                Output::Send { conn: c, text } if c.0 == conn => {
                    let v: Value = serde_json::from_str(text).expect("json");
                    types.push(v["eventType"].as_str().or_else(|| v["type"].as_str()).unwrap_or_default().to_owned());
                }
                Output::Close { conn: c, code, .. } if c.0 == conn => closed = Some(*code),
                _ => {}
            }
        }
        (types, closed)
    }
}

fn sid(s: &str) -> SessionId {
    SessionId::parse(s).expect("valid id")
}

fn start(token: &str) -> Command {
    Command::Start(StartCall {
        access_token: Secret::new(token),
        sample_rate: SampleRate::DEFAULT,
        emit_raw_audio_samples: false,
    })
}

fn token(t: &str) -> Credential {
    Credential::Token(Secret::new(t))
}

/// Every control command emits its event to every attached socket, in order, and stop closes them.
#[test]
fn control_events_reach_observers() {
    let mut h = Harness::new(Limits::default());
    assert_eq!(h.cmd("s", start("tok")), Ok(Reply::Started));
    h.attach("s", 1, token("tok")).expect("token fits");
    h.attach("s", 2, Credential::Operator).expect("operator");
    h.cmd("s", Command::SetMicrophone(false)).expect("mute");
    h.cmd("s", Command::SetMicrophone(true)).expect("unmute");
    h.cmd("s", Command::SendCustomStream(StreamId::parse("c").expect("valid"))).expect("custom");
    h.cmd("s", Command::ResumeMicrophone).expect("resume");
    h.cmd("s", Command::Stop).expect("stop");
    let out = h.drain();
    for conn in [1, 2] {
        let (types, closed) = Harness::events_for(&out, conn);
        assert_eq!(types, ["update", "update", "custom_media_stream_sent", "microphone_resumed", "call_ended"]);
        assert_eq!(closed, Some(1000));
    }
    assert_eq!(h.core.stats(), Stats::default());
}

/// A socket may wait for its session; at start it receives call_started if its token fits, and
/// is closed with 1008 if not.
#[test]
fn pending_observers_checked_at_start() {
    let mut h = Harness::new(Limits::default());
    h.attach("s", 1, token("right")).expect("pending");
    h.attach("s", 2, token("wrong")).expect("pending");
    assert_eq!(h.attach("s", 3, Credential::Anonymous), Err(AttachError::Unauthorized));
    h.cmd("s", start("right")).expect("start");
    let out = h.drain();
    assert_eq!(Harness::events_for(&out, 1), (vec!["call_started".to_owned()], None));
    assert_eq!(Harness::events_for(&out, 2), (vec![], Some(1008)));
    assert_eq!((h.core.stats().active_sessions, h.core.stats().observers), (1, 1));
}

/// Waiting sockets expire after the timeout, not before; a started session stops the expiry.
#[test]
fn pending_expiry() {
    let limits = Limits { pending_observer_timeout: Duration::from_secs(30), ..Limits::default() };
    let mut h = Harness::new(limits);
    h.attach("a", 1, token("x")).expect("pending");
    h.attach("b", 2, token("y")).expect("pending");
    h.cmd("b", start("y")).expect("start");
    h.drain();
    assert_eq!(h.core.poll_timeout(), Some(h.t0 + Duration::from_secs(30)));
    h.ms = 29_999;
    let now = h.now();
    h.core.handle_timeout(now);
    assert!(h.drain().is_empty());
    h.ms = 30_000;
    let now = h.now();
    h.core.handle_timeout(now);
    let out = h.drain();
    assert_eq!(out, vec![Output::Close { conn: ConnectionId(1), code: 1008, reason: "session was not started" }]);
    assert_eq!((h.core.stats().active_sessions, h.core.stats().observers), (1, 1));
    assert_eq!(h.core.poll_timeout(), None);
}

/// Errors: unknown session 404-class, double start 409-class, core full.
#[test]
fn command_errors() {
    let mut h = Harness::new(Limits { sessions_per_core: 1, ..Limits::default() });
    assert_eq!(h.cmd("s", Command::Stop), Err(CommandError::NotFound));
    assert_eq!(h.cmd("s", Command::CallStatus), Err(CommandError::NotFound));
    h.cmd("s", start("t")).expect("start");
    assert_eq!(h.cmd("s", start("t")), Err(CommandError::AlreadyActive));
    assert_eq!(h.cmd("t", start("t")), Err(CommandError::CoreFull { limit: 1 }));
    h.cmd("s", Command::Stop).expect("stop");
    assert_eq!(h.cmd("s", Command::Stop), Err(CommandError::NotFound));
    h.cmd("t", start("t")).expect("room again");
}

/// Observer limits per session and attach with a wrong token.
#[test]
fn attach_limits() {
    let mut h = Harness::new(Limits { observers_per_session: 2, pending_sessions_per_core: 1, ..Limits::default() });
    h.cmd("s", start("t")).expect("start");
    assert_eq!(h.attach("s", 1, token("bad")), Err(AttachError::Unauthorized));
    assert_eq!(h.attach("s", 1, Credential::Anonymous), Err(AttachError::Unauthorized));
    h.attach("s", 1, token("t")).expect("1");
    h.attach("s", 2, token("t")).expect("2");
    assert_eq!(h.attach("s", 3, token("t")), Err(AttachError::TooManyObservers { limit: 2 }));
    h.detach(1);
    h.attach("s", 3, token("t")).expect("room after detach");
    h.attach("p", 4, token("t")).expect("pending 1");
    assert_eq!(h.attach("q", 5, token("t")), Err(AttachError::TooManyPending));
}

/// call-status reports attached sockets; ping gets pong with the current time.
#[test]
fn status_and_ping() {
    let mut h = Harness::new(Limits::default());
    h.cmd("s", start("t")).expect("start");
    let Ok(Reply::CallStatus(st)) = h.cmd("s", Command::CallStatus) else { panic!("status") };
    assert!(st.is_active && !st.has_web_socket && !st.is_connected && !st.is_agent_talking);
    h.attach("s", 9, token("t")).expect("attach");
    let Ok(Reply::CallStatus(st)) = h.cmd("s", Command::CallStatus) else { panic!("status") };
    assert!(st.has_web_socket);
    let now = h.now();
    h.core.handle_listener_text(now, ConnectionId(9), r#"{"type":"ping"}"#);
    h.core.handle_listener_text(now, ConnectionId(9), "not json");
    let out = h.drain();
    let (types, _) = Harness::events_for(&out, 9);
    assert_eq!(types, ["call_started".to_owned(), "pong".to_owned(), "error".to_owned()][1..]);
}

/// Shutdown ends every session with call_ended (reason shutdown) and closes all sockets with 1001.
#[test]
fn shutdown_ends_everything() {
    let mut h = Harness::new(Limits::default());
    h.cmd("a", start("t")).expect("start");
    h.attach("a", 1, token("t")).expect("attach");
    h.attach("b", 2, token("t")).expect("pending");
    h.drain();
    let now = h.now();
    h.core.handle_shutdown(now);
    let out = h.drain();
    assert_eq!(Harness::events_for(&out, 1), (vec!["call_ended".to_owned()], Some(1001)));
    assert_eq!(Harness::events_for(&out, 2), (vec![], Some(1001)));
    assert_eq!(h.core.stats(), Stats::default());
}

/// Sockets that waited and left free their place at once: the pending limit counts live waits.
#[test]
fn pending_limit_counts_live_waits() {
    let mut h = Harness::new(Limits { pending_sessions_per_core: 2, ..Limits::default() });
    for round in 0..10u64 {
        h.attach(&format!("a{round}"), round * 2, token("x")).expect("room");
        h.attach(&format!("b{round}"), round * 2 + 1, token("x")).expect("room");
        assert_eq!(h.attach("c", 999, token("x")), Err(AttachError::TooManyPending));
        h.detach(round * 2);
        h.detach(round * 2 + 1);
    }
    h.attach("started", 50, token("t")).expect("room");
    h.cmd("started", start("t")).expect("start");
    h.attach("p", 51, token("x")).expect("a started session no longer counts as waiting");
    h.attach("q", 52, token("x")).expect("room for the second");
}

/// After shutdown no session starts and no socket attaches.
#[test]
fn shutdown_refuses_new_work() {
    let mut h = Harness::new(Limits::default());
    let now = h.now();
    h.core.handle_shutdown(now);
    assert_eq!(h.cmd("s", start("t")), Err(CommandError::ShuttingDown));
    assert_eq!(h.attach("s", 1, token("t")), Err(AttachError::ShuttingDown));
}

/// A session whose input panicked is discarded alone (what the shell's `drive` does after catching
/// the panic): its sockets close with 1011, its counts are given back, and every other session and
/// socket on the core goes on as before.
#[test]
fn a_panicked_session_is_dropped_alone() {
    let mut h = Harness::new(Limits::default());
    h.cmd("bad", start("t")).expect("start");
    h.cmd("good", start("t")).expect("start");
    h.attach("bad", 1, token("t")).expect("attach");
    h.attach("bad", 2, token("t")).expect("attach");
    h.attach("good", 3, token("t")).expect("attach");
    h.drain();
    assert_eq!(h.core.stats().active_sessions, 2);
    assert_eq!(h.core.stats().observers, 3);
    h.core.handle_panic(&sid("bad"));
    let out = h.drain();
    for conn in [1, 2] {
        assert_eq!(Harness::events_for(&out, conn).1, Some(1011), "socket {conn} of the dropped session closes");
    }
    assert_eq!(Harness::events_for(&out, 3), (vec![], None), "the other session's socket is untouched");
    assert_eq!(h.core.stats().active_sessions, 1);
    assert_eq!(h.core.stats().observers, 1);
    assert_eq!(h.cmd("bad", Command::CallStatus), Err(CommandError::NotFound));
    assert!(matches!(h.cmd("good", Command::SetMicrophone(false)), Ok(Reply::Microphone { enabled: false })));
    let (events, closed) = Harness::events_for(&h.drain(), 3);
    assert_eq!((events, closed), (vec!["update".to_owned()], None), "the other session still gets its events");
    // The id can be used again.
    h.cmd("bad", start("t")).expect("a new session under the same id");
}

/// While draining, `/start-call` for a new id and a listener waiting for an unknown id are
/// refused (`Draining`), while every command of a live session works, its listeners attach and it
/// stops; undraining lets new sessions start again.
#[test]
fn draining_refuses_new_sessions_only() {
    let mut h = Harness::new(Limits::default());
    h.cmd("live", start("t")).expect("start");
    h.core.handle_drain(true);
    assert_eq!(h.cmd("new", start("t")), Err(CommandError::Draining));
    assert_eq!(h.cmd("new", Command::Admit), Err(CommandError::Draining));
    assert_eq!(h.attach("new", 1, token("t")), Err(AttachError::Draining));
    assert_eq!(h.core.stats().active_sessions, 1);
    assert_eq!(h.cmd("live", Command::Admit), Ok(Reply::Admitted));
    assert_eq!(h.cmd("live", start("t")), Err(CommandError::AlreadyActive), "a live id is not a new call");
    h.attach("live", 2, token("t")).expect("a live call's listener attaches");
    assert!(matches!(h.cmd("live", Command::SetMicrophone(false)), Ok(Reply::Microphone { enabled: false })));
    assert!(matches!(h.cmd("live", Command::CallStatus), Ok(Reply::CallStatus(_))));
    assert_eq!(h.cmd("live", Command::Stop), Ok(Reply::Stopped));
    assert_eq!(h.core.stats().active_sessions, 0);
    h.core.handle_drain(false);
    assert_eq!(h.cmd("new", start("t")), Ok(Reply::Started));
}

/// While draining, an outbound call placed before the drain (its record exists, no stream yet)
/// is still a call of the core: its session may start and its listeners may wait.
#[test]
fn draining_admits_calls_placed_before() {
    let mut h = Harness::new(Limits::default());
    let placed = command::RecordUpdate { direction: Some(command::Direction::Outbound), ..Default::default() };
    h.cmd("CA9", Command::Record(Box::new(placed))).expect("record");
    h.core.handle_drain(true);
    assert_eq!(h.cmd("CA9", Command::Admit), Ok(Reply::Admitted));
    h.attach("CA9", 1, token("t")).expect("a listener of a placed call waits");
    let done = command::RecordUpdate { status: Some("completed".into()), ..Default::default() };
    h.cmd("CA9", Command::Record(Box::new(done))).expect("record");
    assert_eq!(h.cmd("CA9", Command::Admit), Err(CommandError::Draining), "a call that is over is not admitted");
}

/// `calls` lists live sessions oldest first (start time, then id), at most `limit`, with the
/// total; a stopped session leaves the list; mute and custom streams show.
#[test]
fn calls_lists_oldest_first_bounded() {
    let mut h = Harness::new(Limits::default());
    for (i, id) in ["c", "a", "b"].iter().enumerate() {
        h.ms = i as u64 * 10;
        h.cmd(id, start("t")).unwrap();
    }
    h.ms = 20;
    h.cmd("d", start("t")).unwrap();
    let (calls, total) = h.core.calls(3);
    assert_eq!(total, 4);
    let ids: Vec<&str> = calls.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["c", "a", "b"], "by start time, then id (b and d started together)");
    assert_eq!(calls[0].started_ms, 1_700_000_000_000);
    assert_eq!(calls[0].caller, command::CallerKind::None);
    assert_eq!(calls[0].agent, command::AgentKind::None);
    h.cmd("a", Command::SetMicrophone(false)).unwrap();
    h.cmd("b", Command::SendCustomStream(StreamId::parse("s1").unwrap())).unwrap();
    h.cmd("c", Command::Stop).unwrap();
    let (calls, total) = h.core.calls(10);
    assert_eq!(total, 3);
    assert_eq!(calls.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), ["a", "b", "d"]);
    assert!(!calls[0].microphone_enabled);
    assert_eq!(calls[1].custom_stream.as_ref().map(StreamId::as_str), Some("s1"));
    assert_eq!(h.core.calls(0).0.len(), 0);
}
