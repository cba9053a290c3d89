//! Agent legs of Twilio calls: a bot that is down, never answers its handshake or dies mid-call does
//! not stop the call, and a per-call `agentUrl` is dialled only when its host is allow-listed.

use relay_tests::telephony::{frames, unused_port, Events, Frontend, StalledBot, TwilioBot, TwilioCaller};
use relay_tests::Relay;
use serde_json::Value;

/// A call on a relay started with `--api-key k`, watched from the start: its `/ws` events, a
/// frontend, and the Twilio caller (started with `params`).
fn watched_call(relay: &Relay, id: &str, params: &[(&str, &str)]) -> (Events, Frontend, TwilioCaller) {
    let events = Events::open(relay, id, Some("k"));
    let front = Frontend::connect(relay, id, "u", "&accessToken=k");
    let caller = TwilioCaller::start(relay, id, params);
    (events, front, caller)
}

/// Waits for the `/ws` `error` and checks that it names the agent.
fn assert_agent_error(events: &Events) -> Value {
    let error = events.wait_event("error");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.to_ascii_lowercase().contains("agent"), "the error names the agent: {error}");
    error
}

/// The call outlived its agent leg: the caller's stream is open and no `call_ended` came.
fn assert_call_goes_on(caller: &TwilioCaller, events: &Events) {
    assert!(!caller.ended(), "the caller's stream is still open");
    assert!(events.events().iter().all(|(t, _)| t != "call_ended"), "the call did not end");
}

/// With the agent down, `/ws` gets an `error` naming the agent and caller audio still reaches a frontend.
#[test]
fn agent_down_call_goes_on() {
    let down = format!("ws://{}/bot", unused_port());
    let relay = Relay::start(&["--agent-url", &down, "--api-key", "k"]);
    let (events, front, caller) = watched_call(&relay, "CA-down", &[]);
    assert_agent_error(&events);
    let sent = frames(50, 0..25);
    caller.send_audio(&sent);
    assert_eq!(front.wait_audio("inbound", sent.len()), sent, "caller audio reaches the frontend");
    assert_call_goes_on(&caller, &events);
}

/// With an agent that never answers its handshake, caller audio flows and `/ws` gets an `error` at the timeout.
#[test]
fn agent_stalled_call_goes_on() {
    let stalled = StalledBot::start();
    let relay = Relay::start(&["--agent-url", &stalled.url("/bot"), "--api-key", "k"]);
    let (events, front, caller) = watched_call(&relay, "CA-stalled", &[]);
    let sent = frames(51, 0..25);
    caller.send_audio(&sent);
    assert_eq!(front.wait_audio("inbound", sent.len()), sent, "caller audio flows while the agent stalls");
    assert_agent_error(&events);
    assert!(stalled.accepted() >= 1, "the relay did dial the stalled bot");
    let more = frames(52, 0..5);
    caller.send_audio(&more);
    let all = front.wait_audio("inbound", sent.len() + more.len());
    assert_eq!(all[sent.len()..], more[..], "audio still flows after the agent leg failed");
    assert_call_goes_on(&caller, &events);
}

/// A bot killed mid-call (its TCP connection dropped without a close frame, with audio still
/// queued for the caller): the caller is told `clear` and stops hearing it, `/ws` gets an `error`
/// naming the agent, and caller audio keeps reaching the frontend, frame for frame.
#[test]
fn agent_killed_mid_call_goes_on() {
    let bot = TwilioBot::start();
    let relay = Relay::start(&["--agent-url", &bot.url("/killed"), "--api-key", "k"]);
    let (events, front, caller) = watched_call(&relay, "CA-killed", &[]);
    let agent = bot.ready(0);
    let before = frames(54, 0..10);
    caller.send_audio(&before);
    assert_eq!(agent.wait_media(before.len()), before, "the bot hears the caller");
    // Five seconds of agent audio: most of it still in the caller's pacer when the bot dies.
    agent.send_audio(&frames(55, 0..250));
    caller.wait_media(5);
    agent.abort();

    assert_agent_error(&events);
    caller.wait_until("clear at the caller", |r| r.iter().find(|a| a.event() == Some("clear")).map(|_| ()));
    let after = frames(56, 0..25);
    caller.send_audio(&after);
    let heard = front.wait_audio("inbound", before.len() + after.len());
    assert_eq!(heard[..before.len()], before[..], "caller audio before the bot died");
    assert_eq!(heard[before.len()..], after[..], "caller audio after the bot died, none lost");
    let played = caller.media().len();
    assert!(played < 250, "the dead bot's queued audio was dropped ({played} of 250 frames played)");
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(caller.media().len(), played, "nothing more of the dead bot's audio reaches the caller");
    assert_call_goes_on(&caller, &events);
}

/// A per-call `agentUrl` whose host:port is allow-listed is dialled (its path, the caller's start).
#[test]
fn allow_listed_agent_url_is_dialled() {
    let default_bot = TwilioBot::start();
    let chosen = TwilioBot::start();
    let relay = Relay::start(&["--agent-url", &default_bot.url("/default"), "--agent-allow", &chosen.authority()]);
    let url = chosen.url("/per-call?x=1");
    let caller = TwilioCaller::start(&relay, "CA-chosen", &[("agentUrl", &url)]);
    let agent = chosen.ready(0);
    assert_eq!(agent.path, "/per-call?x=1", "the relay dials the per-call URL's path");
    let sent = frames(53, 0..10);
    caller.send_audio(&sent);
    assert_eq!(agent.wait_media(sent.len()), sent, "caller audio reaches the per-call agent");
    let starts = agent.events_named("start");
    assert_eq!(starts.len(), 1, "the bot was greeted with one start before the audio: {:?}", agent.event_names());
    let start = &starts[0].1;
    assert_eq!(start["start"]["callSid"], "CA-chosen", "start: {start}");
    assert_eq!(start["start"]["customParameters"]["agentUrl"], url.as_str(), "start: {start}");
    assert_eq!(default_bot.connections(), 0, "the default agent was not dialled");
}

/// A per-call `agentUrl` that is not allow-listed is not dialled: `/ws` gets an `error`, the call goes on.
#[test]
fn agent_url_not_allow_listed_is_refused() {
    let allowed = TwilioBot::start();
    let other = TwilioBot::start();
    let relay = Relay::start(&["--agent-allow", &allowed.authority(), "--api-key", "k"]);
    let (events, front, caller) = watched_call(&relay, "CA-refused", &[("agentUrl", &other.url("/evil"))]);
    let error = events.wait_event("error");
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "the error says why: {error}");
    let sent = frames(54, 0..10);
    caller.send_audio(&sent);
    assert_eq!(front.wait_audio("inbound", sent.len()), sent, "caller audio still reaches the frontend");
    assert_eq!(other.connections(), 0, "the non-allow-listed bot was not dialled");
    assert_eq!(allowed.connections(), 0, "nor any other bot");
    assert!(events.events().iter().all(|(t, _)| t != "call_ready"), "no agent became ready");
}
