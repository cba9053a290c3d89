//! Three relay nodes, each in a network namespace of its own, behind HAProxy running
//! `deploy/haproxy.cfg` unchanged: every leg of a call (Twilio caller, its bot, a frontend, a `/ws`
//! observer, a WHIP leg, a WHEP listener, the HTTP calls naming it) reaches one node, audio flows
//! on all of them, the calls spread over all nodes, and a node killed with `kill -9` costs only
//! its own calls.
//!
//! Scenarios share [`cluster`] / [`cluster_with`] (extra node flags), [`open_calls`] and
//! [`talk`], so the drain and PostgreSQL scenarios (issue 15) are built the same way.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use relay_tests::cluster::{Cluster, Options, NODES};
use relay_tests::postgres::Postgres;
use relay_tests::telephony::{frames, unulaw, BotConn, Events, Frontend, Peer, TwilioBot, TwilioCaller};
use relay_tests::twilio_rest::{twilio_args, TwilioRest, Twiml};
use relay_tests::webrtc::{self, dominant_hz, rms, Send};
use relay_tests::{poll_until, Conn, RawWs, Response, WsMsg, TIMEOUT};
use serde_json::{json, Value};
use str0m::media::Direction;

/// The access token every test call is started with.
const TOKEN: &str = "tok";

/// The tone the WHIP leg publishes (Hz).
const WHIP_HZ: f32 = 600.0;

/// Calls of the routing scenario.
const CALLS: usize = 30;

/// A cluster whose nodes dial `bot` as their agent, node N on path `/bot/nodeN` (so the bot sees
/// which node dialled), and whose HAProxy checks `/health/ready` as shipped.
fn cluster(bot: &TwilioBot) -> Cluster {
    cluster_with(bot, |_, _| Vec::new())
}

/// As [`cluster`], with `extra(n, root)` added to node `n`'s flags (e.g. a shared
/// `--records-url`), `root` being the address node `n` reaches the test's own servers at.
fn cluster_with(
    bot: &TwilioBot,
    extra: impl Fn(usize, IpAddr) -> Vec<String> + std::marker::Send + Sync + 'static,
) -> Cluster {
    let port = bot.authority().parse::<SocketAddr>().expect("the bot's address").port();
    Cluster::start(Options {
        node_args: Box::new(move |n, root: IpAddr| {
            let url = format!("ws://{}/bot/{}", SocketAddr::new(root, port), Cluster::node_name(n));
            let mut args = vec!["--agent-url".to_owned(), url];
            args.extend(extra(n, root));
            args
        }),
        check_path: None,
        cores: 1,
    })
}

/// One test call through the cluster, with every kind of leg.
struct Call {
    id: String,
    /// Its frames' tag: the caller's frames are tagged `tag`, the bot's `tag + 100`.
    tag: u8,
    /// The node that answered its first leg (`/start-call`).
    node: usize,
    caller: TwilioCaller,
    bot: BotConn,
    front: Frontend,
    events: Events,
    /// A WebRTC publisher (WHIP, a custom stream: the call's agent is the bot) sending a tone.
    whip: RtcLeg,
    /// A WebRTC listener (WHEP) hearing the call's mix.
    whep: RtcLeg,
    /// Every tenth call: Retell's custom-LLM socket (`/llm-websocket/{call_id}`), held open.
    llm: Option<Peer>,
}

/// A WebRTC peer driven on its own thread from the moment it connected until finished (a peer
/// left unpolled would miss its relay's packets and ICE checks). The thread owns the peer (a
/// lock shared with it would starve readers), and hands it back when finished.
struct RtcLeg {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<webrtc::Peer>>,
}

impl RtcLeg {
    /// Drives `peer`, sending `send` every 20 ms. It polls every 10 ms, not every 2: sixty peers
    /// share the test's CPUs with three relays, and a packet that arrives ends the wait at once.
    fn drive(mut peer: webrtc::Peer, send: Send) -> Self {
        peer.set_poll_interval(Duration::from_millis(10));
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                peer.run(Duration::from_millis(100), send);
            }
            peer
        });
        Self { stop, thread: Some(thread) }
    }

    /// Stops driving the peer and hands it back, with everything it heard.
    ///
    /// # Panics
    /// When it was finished before, or its thread panicked.
    fn finish(&mut self) -> webrtc::Peer {
        self.stop.store(true, Ordering::Release);
        let thread = self.thread.take().expect("a leg is finished once");
        thread.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for RtcLeg {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One cluster at a time in this file: each runs three relays, HAProxy and a few hundred peer
/// threads, and the suite runs on two cores.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// 30 calls through HAProxy: every leg of each call is answered by the node that took its first
/// leg, audio flows on every leg (caller ⇄ bot exactly, both tracks at the frontend, the WHIP
/// tone to the bot once switched to it, the mix at the WHEP listener, events on `/ws`), and
/// all three nodes carry calls.
#[test]
fn every_leg_of_a_call_reaches_one_node() {
    let _one = one_at_a_time();
    let bot = TwilioBot::start_on(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let cluster = cluster(&bot);
    let ids: Vec<String> = (0..CALLS).map(|i| format!("CA-route-{i}")).collect();
    let mut calls = open_calls(&cluster, &bot, &ids);
    for n in 0..NODES {
        let carried = calls.iter().filter(|c| c.node == n).count();
        assert!(carried > 0, "{} carries no call of {CALLS}", Cluster::node_name(n));
    }
    let answered: BTreeSet<String> = (0..2 * NODES)
        .map(|_| get(cluster.addr(), "/health").header("x-relay-node").expect("X-Relay-Node").to_owned())
        .collect();
    assert_eq!(answered.len(), NODES, "requests naming no call go to any node: {answered:?}");

    talk(&calls, 50, || {
        for call in &calls {
            assert_exchanged(call, 50);
        }
        for call in &calls {
            let body = json!({ "sessionId": call.id, "streamId": "op" });
            let r = post(cluster.addr(), "/send-custom-stream", &body);
            assert_eq!(r.status, 200, "{}: /send-custom-stream: {}", call.id, r.text());
            assert_node(&r, call, "/send-custom-stream");
        }
        for call in &calls {
            call.events.wait_event("custom_media_stream_sent");
            let tone = call.bot.wait_media(50 + 50)[50 + 25..].concat();
            let pcm: Vec<i16> = tone.into_iter().map(unulaw).collect();
            let hz = dominant_hz(&pcm, 8000).unwrap_or(0.0);
            assert!((hz - WHIP_HZ).abs() <= 20.0, "{}: the bot hears the WHIP leg's tone, got {hz} Hz", call.id);
        }
    });
    for call in &mut calls {
        let whep = call.whep.finish();
        // A relay on a loaded CI machine mixes fewer frames than the second of audio it got (its
        // mix keeps a 20 ms grid and drops a backlog), so this asks for audio, not for all of it.
        assert!(whep.received >= 5, "{}: the WHEP listener received {} frames", call.id, whep.received);
        assert!(rms(&whep.heard) > 100.0, "{}: the WHEP listener hears the call's mix", call.id);
        let whip = call.whip.finish();
        assert!(whip.connected && !whip.closed, "{}: the WHIP leg stays connected", call.id);
        let status = get(cluster.addr(), &format!("/call-status?sessionId={}", call.id));
        assert_node(&status, call, "/call-status");
        assert_eq!(status.status, 200, "{}: {}", call.id, status.text());
    }
    for call in &calls {
        if call.tag % 10 == 0 {
            call.events.wait_event("audio");
        }
        if let Some(llm) = &call.llm {
            llm.send_json(&json!({ "interaction_type": "ping_pong", "timestamp": 1 }));
            llm.wait_until(&format!("{}: the LLM socket's pong", call.id), |r| {
                r.iter().find(|a| a.json().is_some_and(|v| v["response_type"] == "ping_pong")).map(|_| ())
            });
        }
        call.caller.stop();
        call.events.wait_event("call_ended");
    }
    bad_keys_cost_only_their_sender(&cluster);
}

/// Keys that are not valid ids, calls no node knows and bodies that are not JSON get the answer a
/// single node gives them, from a node (never from HAProxy), and every node stays up.
fn bad_keys_cost_only_their_sender(cluster: &Cluster) {
    let lb = cluster.addr();
    let bad_path = RawWs::connect(lb, "/twilio/stream/not%20an%20id", &[]).err();
    let bad_path = bad_path.expect("an invalid key in the path is refused");
    assert_eq!(bad_path.status, 400, "{}", bad_path.text());
    let long = format!("/ws?sessionId={}", "x".repeat(300));
    let long = RawWs::connect(lb, &long, &[]).err().expect("an oversized key in the query is refused");
    assert_eq!(long.status, 400, "{}", long.text());
    let bearer = format!("Bearer {TOKEN}");
    let sdp = [("Content-Type", "application/sdp"), ("Authorization", bearer.as_str()), ("Connection", "close")];
    let unknown = Conn::open(lb).request("POST", "/whip/CA-nobody", &sdp, Some("v=0\r\n"));
    assert_eq!(unknown.status, 404, "a leg of a call no node has: {}", unknown.text());
    let not_json = Conn::open(lb).request("POST", "/stop-call", &[("Connection", "close")], Some("{\"sessionId\":"));
    assert_eq!(not_json.status, 400, "{}", not_json.text());
    let form = [("Content-Type", "application/x-www-form-urlencoded"), ("Connection", "close")];
    let bad_form = Conn::open(lb).request("POST", "/twilio/voice", &form, Some("CallSid=a%20b"));
    assert_eq!(bad_form.status, 400, "{}", bad_form.text());
    for r in [&bad_path, &long, &unknown, &not_json, &bad_form] {
        let node = r.header("x-relay-node").and_then(Cluster::node_index);
        assert!(node.is_some(), "a node answers bad input itself: {:?}", r.headers);
    }
    for n in 0..NODES {
        let status = cluster.status(n);
        assert!(status.starts_with("UP"), "{} is still up: {status}", Cluster::node_name(n));
    }
}

/// `kill -9` of a node: the other nodes' calls lose no frame and see no close, the dead node's
/// calls end (every socket closes), and new calls go to the survivors; brought back, the node
/// takes new calls again while the calls started meanwhile keep every leg on their node.
#[test]
fn a_killed_node_costs_only_its_own_calls() {
    let _one = one_at_a_time();
    let bot = TwilioBot::start_on(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let mut cluster = cluster(&bot);
    let ids: Vec<String> = (0..9).map(|i| format!("CA-kill-{i}")).collect();
    let mut calls = open_calls(&cluster, &bot, &ids);
    let victim = calls[0].node;
    let (dead, live): (Vec<&Call>, Vec<&Call>) = calls.iter().partition(|c| c.node == victim);
    assert!(!live.is_empty(), "the other nodes carry calls too");

    let mut killed_at = Instant::now();
    talk(&calls, 100, || {
        for call in &calls {
            call.bot.wait_media(10);
        }
        killed_at = Instant::now();
        cluster.kill9(victim);
        for call in &dead {
            for (leg, peer) in legs(call) {
                assert!(peer.wait_ended(), "{}: its {leg} ends with its node", call.id);
            }
        }
        for call in &live {
            assert_exchanged(call, 100);
            for (leg, peer) in legs(call) {
                let closes: Vec<WsMsg> = peer
                    .received()
                    .into_iter()
                    .map(|a| a.msg)
                    .filter(|m| matches!(m, WsMsg::Close(_) | WsMsg::Gone(_)))
                    .collect();
                assert!(closes.is_empty() && !peer.ended(), "{}: its {leg} saw {closes:?}", call.id);
            }
        }
    });
    let again: Vec<String> = dead.iter().map(|c| c.id.clone()).collect();
    for call in calls.iter_mut().filter(|c| c.node != victim) {
        let whep = call.whep.finish();
        let after = whep.marks.iter().filter(|(at, _)| *at > killed_at).count();
        assert!(!whep.closed && after >= 25, "{}: the WHEP listener heard {after} frames after the kill", call.id);
    }

    // The dead node's calls are called again while it is down: their keys hash to it, so only
    // the survivors can take them.
    cluster.wait_status(victim, "DOWN");
    let meanwhile = open_calls(&cluster, &bot, &again);
    for call in &meanwhile {
        assert_ne!(call.node, victim, "{}: a new call goes to a survivor", call.id);
    }

    cluster.restart(victim);
    cluster.wait_status(victim, "UP");
    for call in &meanwhile {
        let (front, answer) = Frontend::connect_at(cluster.addr(), &call.id, "late", "&accessToken=tok");
        assert_eq!(node_in(&answer), call.node, "{}: a leg opened after the restart stays on its node", call.id);
        let (events, answer) = Events::open_at(cluster.addr(), &call.id, Some(TOKEN));
        assert_eq!(node_in(&answer), call.node, "{}: /ws after the restart", call.id);
        call.bot.send_audio(&frames(200, 0..5));
        assert_eq!(front.wait_audio("outbound", 5), frames(200, 0..5), "{}: audio reaches the late frontend", call.id);
        drop(events);
    }
    let fresh: Vec<String> = (0..9).map(|i| format!("CA-back-{i}")).collect();
    let back = open_calls(&cluster, &bot, &fresh);
    assert!(back.iter().any(|c| c.node == victim), "the node brought back takes new calls again");
}

/// Drain one node of the cluster: HAProxy sees its check say 404 (NOLB) and sends it no new
/// call, its live calls keep every leg (audio both ways, a new `/ws` observer answered by it)
/// until they end, it then stays unready, and SIGTERM makes it exit at once, far below its grace.
#[test]
fn a_drained_node_keeps_its_calls_until_they_end() {
    let _one = one_at_a_time();
    let bot = TwilioBot::start_on(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let mut cluster = cluster_with(&bot, |_, _| vec!["--shutdown-grace".to_owned(), "120s".to_owned()]);
    let ids: Vec<String> = (0..9).map(|i| format!("CA-drain-{i}")).collect();
    let calls = open_calls(&cluster, &bot, &ids);
    let drained = calls[0].node;
    let at = cluster.node_addr(drained);
    let answer = post(at, "/admin/drain", &json!({}));
    assert_eq!((answer.status, &answer.json()["draining"]), (200, &json!(true)), "{}", answer.text());
    cluster.wait_status(drained, "NOLB");

    talk(&calls, 50, || calls.iter().for_each(|call| assert_exchanged(call, 50)));
    let mine: Vec<&Call> = calls.iter().filter(|c| c.node == drained).collect();
    for call in &mine {
        let (events, answer) = Events::open_at(cluster.addr(), &call.id, Some(TOKEN));
        assert_eq!(node_in(&answer), drained, "{}: a new leg of a live call reaches its draining node", call.id);
        drop(events);
    }
    let fresh: Vec<String> = (0..9).map(|i| format!("CA-drain-new-{i}")).collect();
    for call in open_calls(&cluster, &bot, &fresh) {
        assert_ne!(call.node, drained, "{}: a new call goes to a node that is not draining", call.id);
    }

    for call in &mine {
        call.caller.stop();
        let stopped = post(cluster.addr(), "/stop-call", &json!({ "sessionId": call.id }));
        assert_node(&stopped, call, "/stop-call");
    }
    let ready = poll_until("the drained node's calls ended", || {
        let r = get(at, "/health/ready");
        (r.json()["activeSessions"] == 0).then_some(r)
    });
    assert_eq!((ready.status, &ready.json()["status"]), (404, &json!("draining")), "{}", ready.text());
    cluster.signal(drained, libc::SIGTERM);
    // Far below the 120 s grace: wait_exit panics past its limit.
    let status = cluster.wait_exit(drained, Duration::from_secs(30));
    assert!(status.success(), "the drained node exits cleanly: {status}");
}

/// One PostgreSQL beside the cluster (over its Unix socket, which every namespace shares):
/// PostgreSQL stopped for 10 s mid-call costs no frame and no leg, every node says its database
/// is down while staying ready, and once it is back every node's analytics count all the calls,
/// each recorded with the node that served it, those that ended during the outage included.
#[test]
fn shared_records_count_every_node_and_survive_an_outage() {
    let _one = one_at_a_time();
    let mut pg = Postgres::start();
    let url = pg.socket_url();
    let bot = TwilioBot::start_on(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let project = "proj_cluster";
    let cluster = cluster_with(&bot, move |_, _| {
        vec!["--records-url".to_owned(), url.clone(), "--default-project".to_owned(), project.to_owned()]
    });
    let ids: Vec<String> = (0..9).map(|i| format!("CA-rec-{i}")).collect();
    let calls = open_calls(&cluster, &bot, &ids);
    let used: BTreeSet<usize> = calls.iter().map(|c| c.node).collect();
    assert!(used.len() >= 2, "the calls spread over nodes: {used:?}");

    // 10 s of audio each way (500 frames), with PostgreSQL stopped all along.
    talk(&calls, 500, || {
        pg.stop();
        for n in 0..NODES {
            let detailed = poll_until("a node sees its database down", || {
                let r = get(cluster.node_addr(n), "/health/detailed");
                (r.json()["services"]["database"]["status"] == "down").then_some(r)
            });
            assert_eq!(detailed.status, 200, "node{} stays up: {}", n + 1, detailed.text());
            assert_eq!(get(cluster.node_addr(n), "/health/ready").status, 200, "node{} stays ready", n + 1);
        }
        calls.iter().for_each(|call| assert_exchanged(call, 500));
        for call in &calls {
            for (leg, peer) in legs(call) {
                assert!(!peer.ended(), "{}: its {leg} lives through the outage", call.id);
            }
            call.caller.stop();
        }
        for n in 0..NODES {
            poll_until("the calls ended during the outage", || {
                (get(cluster.node_addr(n), "/health/ready").json()["activeSessions"] == 0).then_some(())
            });
        }
    });
    pg.start_again();

    for n in 0..NODES {
        let overview = poll_until("every call in every node's analytics", || {
            let r = get(cluster.node_addr(n), &format!("/analytics/project/{project}"));
            (r.status == 200 && r.json()["totalCalls"] == ids.len() && r.json()["callsByStatus"]["active"] == 0)
                .then(|| r.json())
        });
        assert_eq!(overview["totalCalls"], ids.len(), "node{}: {overview}", n + 1);
        let recent = get(cluster.node_addr(n), &format!("/analytics/project/{project}/recent"));
        let recent = recent.json();
        for call in &calls {
            let row = recent["calls"].as_array().and_then(|a| a.iter().find(|c| c["callSid"] == call.id.as_str()));
            let row = row.unwrap_or_else(|| panic!("node{}: {} not in recent calls: {recent}", n + 1, call.id));
            assert_eq!(row["node"], Cluster::node_name(call.node), "{}: its record names its node", call.id);
        }
    }
}

/// Outbound calls, one placed on each node: each is served by the node HAProxy sends its webhook
/// and stream to (its bot, dialled by that node, briefed with the call's prompt and first
/// message), and `/call-status` and `/end-call` work on a node that neither placed nor serves it
/// (the shared records), the hang-up reaching Twilio.
#[test]
fn an_outbound_call_is_served_where_its_stream_lands_and_ended_from_any_node() {
    let _one = one_at_a_time();
    let pg = Postgres::start();
    let url = pg.socket_url();
    let twilio = TwilioRest::start_on(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let port = twilio.addr().port();
    let bot = TwilioBot::start_on(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    // Twilio reaches the cluster at its public URL (HAProxy): the webhooks and streams below are
    // delivered to HAProxy's address with that URL's host.
    let cluster = cluster_with(&bot, move |_, root| {
        let mut args = twilio_args(&format!("http://{root}:{port}"));
        args.extend(["--records-url", url.as_str(), "--public-url", "http://relay.cluster.test"].map(str::to_owned));
        args
    });
    let mut moved = 0;
    for placed in 0..NODES {
        let (user, prompt, first) = (format!("user{placed}"), format!("Prompt {placed}"), format!("Hello {placed}"));
        let body = json!({ "user_id": user, "number": "+14155550123", "prompt": prompt, "first_message": first });
        let resp = post(cluster.node_addr(placed), "/outbound-call", &body);
        assert_eq!(resp.status, 200, "outbound-call on node{}: {}", placed + 1, resp.text());
        let call = twilio.next_call();
        let since = bot.connections();
        let webhook = call.post_webhook_at(cluster.addr(), call.webhook_url());
        assert_eq!(webhook.status, 200, "{}: the voice webhook through HAProxy: {}", call.sid, webhook.text());
        let served = webhook.header("x-relay-node").and_then(Cluster::node_index).expect("a node answered");
        let caller = call.open_stream_at(cluster.addr(), &Twiml::parse(&webhook.text()));
        let agent = bot_for(&bot, since, &call.sid);
        assert_eq!(agent.path, format!("/bot/{}", Cluster::node_name(served)), "{}: served by its node", call.sid);
        let custom = agent.start_msg()["start"]["customParameters"].clone();
        assert_eq!((custom["prompt"].as_str(), custom["first_message"].as_str()), (Some(&*prompt), Some(&*first)));
        caller.send_audio(&frames(7, 0..5));
        same_frames(&agent.wait_media(5), &frames(7, 0..5), &format!("{}: the callee reaches its bot", call.sid));
        moved += usize::from(served != placed);

        let third = (0..NODES).find(|n| *n != placed && *n != served).expect("a node that is neither");
        let status = poll_until("the call's status on a third node", || {
            let r = get(cluster.node_addr(third), &format!("/call-status?callSid={}&user_id={user}", call.sid));
            (r.status == 200 && r.json()["status"] == "in-progress").then_some(r)
        });
        assert_eq!(status.header("x-relay-node"), Some(Cluster::node_name(third).as_str()));
        let end = json!({ "callSid": call.sid, "user_id": user });
        let ended = post(cluster.node_addr(third), "/end-call", &end);
        assert_eq!(ended.status, 200, "{}: /end-call on node{}: {}", call.sid, third + 1, ended.text());
        let hang_up = twilio.requests().into_iter().last().expect("a request");
        assert!(hang_up.path.ends_with(&format!("/Calls/{}.json", call.sid)), "{}", hang_up.path);
        assert_eq!(hang_up.field("Status"), Some("completed"), "{}: the hang-up reached Twilio", call.sid);
    }
    assert!(moved > 0, "at least one call was served by a node other than the one that placed it");
}

/// `deploy/haproxy.cfg` passes HAProxy's own check with its addresses from the environment.
#[test]
fn the_shipped_config_is_valid() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/haproxy.cfg");
    let out = std::process::Command::new(Cluster::haproxy_bin())
        .args(["-c", "-f", config])
        .env("RELAY_BIND", "127.0.0.1:8080")
        .env("RELAY_NODE1", "10.0.0.1:8080")
        .env("RELAY_NODE2", "10.0.0.2:8080")
        .env("RELAY_NODE3", "10.0.0.3:8080")
        .output()
        .expect("run haproxy -c (scripts/deps-cluster installs it)");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "haproxy -c: {said}");
    assert!(!said.contains("WARNING"), "haproxy -c warns: {said}");
}

/// Opens a call per id through HAProxy, all at once, each with every kind of leg, and checks
/// that every leg's answer names the node that answered its `/start-call`.
fn open_calls(cluster: &Cluster, bot: &TwilioBot, ids: &[String]) -> Vec<Call> {
    let since = bot.connections();
    std::thread::scope(|s| {
        let opening: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| s.spawn(move || open_call(cluster, bot, since, id, u8::try_from(i % 100).expect("tag"))))
            .collect();
        opening.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    })
}

/// Opens call `id` (see [`open_calls`]) with frames tagged `tag`; its bot connection is one
/// made after the `since`-th.
fn open_call(cluster: &Cluster, bot: &TwilioBot, since: usize, id: &str, tag: u8) -> Call {
    let lb = cluster.addr();
    // Every tenth call has the agent's audio on `/ws` too (raw samples cost the nodes a JSON
    // message per 20 ms).
    let raw = tag % 10 == 0;
    let body = json!({ "sessionId": id, "accessToken": TOKEN, "emitRawAudioSamples": raw });
    let started = post(lb, "/start-call", &body);
    assert_eq!(started.status, 200, "{id}: /start-call: {}", started.text());
    let node = started.header("x-relay-node").and_then(Cluster::node_index).expect("a node answered /start-call");
    let name = Cluster::node_name(node);
    // Twilio's webhook names the call in its form; the TwiML it gets streams to a path naming it.
    let form = format!("CallSid={id}&From=%2B15550001111&To=%2B15550002222&CallStatus=in-progress");
    let form_type = ("Content-Type", "application/x-www-form-urlencoded");
    let voice = Conn::open(lb).request("POST", "/twilio/voice", &[form_type, ("Connection", "close")], Some(&form));
    assert_eq!(voice.status, 200, "{id}: /twilio/voice: {}", voice.text());
    assert_eq!(voice.header("x-relay-node"), Some(name.as_str()), "{id}: /twilio/voice");
    let stream_path = format!("/twilio/stream/{id}");
    assert!(voice.text().contains(&format!("{lb}{stream_path}")), "{id}: the TwiML: {}", voice.text());
    let (front, answer) = Frontend::connect_at(lb, id, &format!("user-{id}"), "&accessToken=tok");
    assert_eq!(node_in(&answer), node, "{id}: /frontend-stream");
    let (events, answer) = Events::open_at(lb, id, Some(TOKEN));
    assert_eq!(node_in(&answer), node, "{id}: /ws");
    let (peer, answer) = Peer::connect_answered(lb, &stream_path, &[])
        .unwrap_or_else(|status| panic!("{id}: /twilio/stream refused with {status}"));
    assert_eq!(node_in(&answer), node, "{id}: /twilio/stream/{{callSid}}");
    let caller = TwilioCaller::greet(peer, id, &[("callSid", id)]);
    let agent = bot_for(bot, since, id);
    assert_eq!(agent.path, format!("/bot/{name}"), "{id}: the bot is dialled by the call's node");
    assert!(agent.sync(), "{id}: the relay closed the bot's connection");
    events.wait_event("call_ready");

    let root = cluster.root_ip(node);
    let mut whip = webrtc::Peer::new_on(Direction::SendOnly, root);
    let mut whep = webrtc::Peer::new_on(Direction::RecvOnly, root);
    for (peer, path) in [(&mut whip, format!("/whip/{id}?role=custom&streamId=op")), (&mut whep, format!("/whep/{id}"))]
    {
        let bearer = format!("Bearer {TOKEN}");
        let headers = [("Content-Type", "application/sdp"), ("Authorization", bearer.as_str())];
        let r = Conn::open(lb).request("POST", &path, &headers, Some(peer.offer()));
        assert_eq!(r.status, 201, "{id}: {path}: {}", r.text());
        assert_eq!(r.header("x-relay-node"), Some(name.as_str()), "{id}: {path}");
        let candidate = peer.accept_answer(&r.text());
        assert_eq!(candidate.ip(), cluster.node_addr(node).ip(), "{id}: {path}'s candidate is its node's address");
        assert!(peer.connect(Duration::from_secs(5)), "{id}: {path}: ICE and DTLS connect");
        let location = r.header("location").expect("a Location").to_owned();
        // The leg's resource URL names the call too: it reaches the same node (PATCH with no
        // body is refused there, not elsewhere: 4xx from the node that has the leg).
        let patch = Conn::open(lb).request("PATCH", &location, &[("Authorization", bearer.as_str())], None);
        assert_eq!(patch.header("x-relay-node"), Some(name.as_str()), "{id}: PATCH {location}: {}", patch.text());
    }
    let (whip, whep) = (RtcLeg::drive(whip, Send::Tone(WHIP_HZ)), RtcLeg::drive(whep, Send::Nothing));
    let llm = raw.then(|| {
        let (llm, answer) = Peer::connect_answered(lb, &format!("/llm-websocket/{id}"), &[])
            .unwrap_or_else(|status| panic!("{id}: /llm-websocket refused with {status}"));
        assert_eq!(node_in(&answer), node, "{id}: /llm-websocket/{{call_id}}");
        let config = |r: &[relay_tests::telephony::Arrival]| {
            r.iter().find(|a| a.json().is_some_and(|v| v["response_type"] == "config")).map(|_| ())
        };
        llm.wait_until(&format!("{id}: the LLM socket's config"), config);
        llm
    });
    Call { id: id.to_owned(), tag, node, caller, bot: agent, front, events, whip, whep, llm }
}

/// Each caller sends `n` frames (paced) and each bot answers with `n` (at once, as a TTS bot
/// does); then `during` runs.
fn talk(calls: &[Call], n: u32, during: impl FnOnce()) {
    for call in calls {
        call.caller.send_audio(&frames(call.tag, 0..n));
        call.bot.send_audio(&frames(call.tag + 100, 0..n));
    }
    during();
}

/// The call's caller and bot exchanged `n` frames each, none lost, none out of order, and its
/// frontend heard both sides.
fn assert_exchanged(call: &Call, n: u32) {
    let id = &call.id;
    let (from_caller, from_bot) = (frames(call.tag, 0..n), frames(call.tag + 100, 0..n));
    same_frames(&call.bot.wait_media(n as usize), &from_caller, &format!("{id}: the bot hears every caller frame"));
    let heard: Vec<Vec<u8>> = call.caller.wait_media(n as usize).into_iter().map(|(_, f)| f).collect();
    same_frames(&heard, &from_bot, &format!("{id}: the caller hears every bot frame"));
    same_frames(&call.front.wait_audio("inbound", n as usize), &from_caller, &format!("{id}: frontend, caller side"));
    same_frames(&call.front.wait_audio("outbound", n as usize), &from_bot, &format!("{id}: frontend, bot side"));
}

/// Asserts `got == want`, naming the first frame that differs (not printing them all).
fn same_frames(got: &[Vec<u8>], want: &[Vec<u8>], what: &str) {
    if got == want {
        return;
    }
    // A frame's tag and index are its first five bytes.
    let name = |f: &Vec<u8>| f.get(..5).map(<[u8]>::to_vec);
    let at = got.iter().zip(want).position(|(g, w)| g != w).unwrap_or_else(|| got.len().min(want.len()));
    panic!(
        "{what}: {} frames, {} expected; first difference at {at}: {:?} instead of {:?}",
        got.len(),
        want.len(),
        got.get(at).and_then(name),
        want.get(at).and_then(name)
    );
}

/// The WebSocket legs of a call, named.
fn legs(call: &Call) -> [(&'static str, &Peer); 4] {
    [
        ("caller", call.caller.peer()),
        ("bot", &call.bot),
        ("frontend", call.front.peer()),
        ("/ws observer", &call.events),
    ]
}

/// Waits (bounded) for the connection to end; whether it did.
trait WaitEnded {
    fn wait_ended(&self) -> bool;
}

impl WaitEnded for Peer {
    fn wait_ended(&self) -> bool {
        let deadline = Instant::now() + TIMEOUT;
        while !self.ended() && Instant::now() < deadline {
            let _ = self.wait_within(Duration::from_millis(100), |_| None::<()>);
        }
        self.ended()
    }
}

/// The bot connection for call `id` among those made after the `since`-th: the one whose
/// `start` names the call.
fn bot_for(bot: &TwilioBot, since: usize, id: &str) -> BotConn {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        for i in since..bot.connections() {
            let conn = bot.connection(i);
            let start = conn.received().into_iter().find(|a| a.event() == Some("start"));
            if start.and_then(|a| a.json().map(|v| v["start"]["callSid"] == id)).unwrap_or(false) {
                return conn;
            }
        }
        assert!(Instant::now() < deadline, "{id}: no bot connection greeted for it within {TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The node an upgrade's 101 names.
fn node_in(answer: &[(String, String)]) -> usize {
    answer
        .iter()
        .find(|(k, _)| k == "x-relay-node")
        .and_then(|(_, v)| Cluster::node_index(v))
        .unwrap_or_else(|| panic!("a 101 without X-Relay-Node: {answer:?}"))
}

/// Asserts that `r` came from `call`'s node.
fn assert_node(r: &Response, call: &Call, what: &str) {
    let want = Cluster::node_name(call.node);
    assert_eq!(r.header("x-relay-node"), Some(want.as_str()), "{}: {what} reaches the call's node", call.id);
}

/// `POST path` with a JSON body through `addr`, on a new connection.
fn post(addr: SocketAddr, path: &str, body: &Value) -> Response {
    Conn::open(addr).request("POST", path, &[("Connection", "close")], Some(&body.to_string()))
}

/// `GET path` through `addr`, on a new connection.
fn get(addr: SocketAddr, path: &str) -> Response {
    Conn::open(addr).request("GET", path, &[("Connection", "close")], None)
}
