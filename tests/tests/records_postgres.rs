//! Shared call records in PostgreSQL (`--records-url`), against real relays and a throwaway
//! PostgreSQL cluster: relays on loopback sharing one database see each other's calls in
//! analytics, `/call-status` and `/end-call`; nodes starting together against an empty database
//! all come up; a database outage costs no call and loses no record; per-user limits hold across
//! nodes. Needs root (the cluster runs as the `postgres` user) and PostgreSQL (`scripts/deps-db`).

use relay_tests::postgres::Postgres;
use relay_tests::telephony::{frames, Frontend, TwilioBot, TwilioCaller};
use relay_tests::twilio_rest::{signed_caller, TwilioRest, ACCOUNT_SID};
use relay_tests::{assert_error, poll_until, Relay, WsMsg};
use serde_json::{json, Value};

const NUMBER: &str = "+14155550123";
/// A password in the records URL (trust authentication ignores it): it must never be printed.
const PASSWORD: &str = "pg-s3cret-pw";

/// A call on each of two nodes: analytics on either counts both; the outbound call placed on
/// node 1 is found by `/call-status` on node 2, and `/end-call` on node 2 hangs it up.
#[test]
fn every_node_sees_every_call() {
    let pg = Postgres::start();
    let twilio = TwilioRest::start();
    let url = pg.url_with_password(PASSWORD);
    let n1 = node(&url, "n1", &twilio.relay_args());
    let n2 = node(&url, "n2", &twilio.relay_args());

    let c1 = signed_caller(&n1, "CApg1", &[("projectId", "proj_pg"), ("intent", "sales")]);
    let c2 = signed_caller(&n2, "CApg2", &[("projectId", "proj_pg")]);
    for c in [&c1, &c2] {
        c.send_audio(&frames(1, 0..5));
        c.wait_sent();
        c.stop();
        c.wait_closed();
    }
    for relay in [&n1, &n2] {
        let overview = poll_until("both nodes' calls in the overview", || {
            let v = ok_json(relay, "/analytics/project/proj_pg");
            (v["totalCalls"] == 2 && v["callsByStatus"]["active"] == 0).then_some(v)
        });
        assert_eq!(overview["completedCalls"], 2, "{overview}");
        assert_eq!(overview["callsByIntent"], json!({ "sales": 1, "unknown": 1 }), "{overview}");
        let recent = ok_json(relay, "/analytics/project/proj_pg/recent");
        let mut ids: Vec<&str> =
            recent["calls"].as_array().expect("calls").iter().filter_map(|c| c["callSid"].as_str()).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["CApg1", "CApg2"], "{recent}");
        let today = utc_date_now();
        let stats = ok_json(relay, &format!("/analytics/project/proj_pg/statistics?startDate={today}&endDate={today}"));
        assert_eq!(stats["totalCalls"], 2, "{stats}");
    }

    // An outbound call placed on node 1, live there.
    let resp = n1.post("/outbound-call", &json!({ "user_id": "olga", "number": NUMBER }));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let call = twilio.next_call();
    let (_, caller) = call.answer();
    caller.send_audio(&frames(2, 0..3));
    let status = poll_until("node 2 sees the call in progress", || {
        let r = n2.get(&format!("/call-status?callSid={}&user_id=olga", call.sid));
        (r.status == 200 && r.json()["status"] == "in-progress").then(|| r.json())
    });
    assert!(status["startTime"].is_string(), "{status}");
    assert_error(&n2.get(&format!("/call-status?callSid={}&user_id=mallory", call.sid)), 404);
    assert_error(&n2.post("/end-call", &json!({ "callSid": call.sid, "user_id": "mallory" })), 404);

    let resp = n2.post("/end-call", &json!({ "callSid": call.sid, "user_id": "olga" }));
    assert_eq!(resp.status, 200, "end-call on the other node: {}", resp.text());
    let hang_up = twilio.requests().into_iter().last().expect("a request");
    let path = format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{}.json", call.sid);
    assert_eq!((hang_up.method.as_str(), hang_up.path.as_str()), ("POST", path.as_str()));
    assert_eq!(hang_up.field("Status"), Some("completed"));
    // Twilio ends the stream on node 1 once it has hung up.
    call.hang_up(&caller, 3);
    for relay in [&n1, &n2] {
        poll_until("the call completed on both nodes", || {
            let r = relay.get(&format!("/call-status?callSid={}&user_id=olga", call.sid));
            (r.status == 200 && r.json()["status"] == "completed").then_some(())
        });
    }
    for relay in [&n1, &n2] {
        assert!(!relay.logs().iter().any(|l| l.contains(PASSWORD)), "the password is never logged");
    }
}

/// Three nodes started at the same moment against an empty database all come up (the schema is
/// made once, under a lock) and report the shared database up.
#[test]
fn nodes_starting_together_all_come_up() {
    let pg = Postgres::start();
    let url = pg.url();
    let nodes: Vec<Relay> = std::thread::scope(|s| {
        let handles: Vec<_> = ["a", "b", "c"]
            .map(|name| {
                s.spawn({
                    let url = url.clone();
                    move || node(&url, name, &[])
                })
            })
            .into_iter()
            .collect();
        handles.into_iter().map(|h| h.join().expect("a node started")).collect()
    });
    for relay in &nodes {
        let detailed = relay.detailed();
        let db = &detailed["services"]["database"];
        assert_eq!((&db["status"], &db["backend"]), (&json!("up"), &json!("postgresql")), "{detailed}");
    }
}

/// PostgreSQL stopped mid-call for ten seconds of audio: every frame of the call flows on, `/health/detailed` says the database
/// is down (degraded, 200) while `/health` stays 200, a records read answers 503, and the records
/// of calls that ended during the outage appear once it is back.
#[test]
fn database_outage_costs_no_call() {
    let mut pg = Postgres::start();
    let bot = TwilioBot::start();
    let url = pg.url_with_password(PASSWORD);
    let relay = node(&url, "solo", &["--agent-url".to_owned(), bot.url("/agent")]);
    let caller = TwilioCaller::start(&relay, "CAlive", &[("projectId", "proj_out")]);
    let agent = bot.ready(0);
    let (up, down) = (frames(10, 0..5), frames(11, 0..5));
    caller.send_audio(&up);
    agent.send_audio(&down);
    assert_eq!(agent.wait_media(up.len()), up);
    assert_eq!(caller.wait_media(down.len()).len(), down.len());

    pg.stop();
    let detailed = poll_until("the database reported down", || {
        let r = relay.get("/health/detailed");
        (r.json()["services"]["database"]["status"] == "down").then_some(r)
    });
    assert_eq!(detailed.status, 200, "a shared database down degrades, not fails: {}", detailed.text());
    assert_eq!(detailed.json()["status"], "degraded");
    assert_eq!(relay.get("/health").status, 200);
    let read = relay.get("/analytics/project/proj_out");
    assert_eq!(read.status, 503, "{}", read.text());
    assert!(read.json()["error"].as_str().is_some_and(|e| e.contains("unavailable")), "{}", read.text());

    // Calls go on and end while the database is away: ten more seconds of audio each way, every
    // frame delivered.
    let (up2, down2) = (frames(12, 0..500), frames(13, 0..500));
    caller.send_audio(&up2);
    agent.send_audio(&down2);
    caller.wait_sent();
    agent.wait_sent();
    assert_eq!(agent.wait_media(up.len() + up2.len())[up.len()..], up2[..], "caller audio during the outage");
    let heard: Vec<Vec<u8>> = caller.wait_media(down.len() + down2.len()).into_iter().map(|(_, f)| f).collect();
    assert_eq!(heard[down.len()..], down2[..], "the agent's audio during the outage");
    let short = TwilioCaller::start(&relay, "CAshort", &[("projectId", "proj_out")]);
    short.stop();
    short.wait_closed();
    caller.stop();
    caller.wait_closed();
    poll_until("the ended calls' records queued", || {
        let v = relay.detailed();
        (v["services"]["database"]["queued"].as_u64() >= Some(2)).then_some(())
    });

    pg.start_again();
    let overview = poll_until("the outage's records written", || {
        let r = relay.get("/analytics/project/proj_out");
        (r.status == 200 && r.json()["totalCalls"] == 2 && r.json()["callsByStatus"]["active"] == 0).then(|| r.json())
    });
    assert_eq!(overview["completedCalls"], 2, "{overview}");
    let db = poll_until("the database up again", || {
        let v = relay.detailed();
        (v["services"]["database"]["status"] == "up").then(|| v["services"]["database"].clone())
    });
    assert_eq!((&db["queued"], &db["dropped"]), (&json!(0), &json!(0)), "{db}");
    assert!(!relay.logs().iter().any(|l| l.contains(PASSWORD)), "the password is never logged");
}

/// A user's 3 frontend sockets on node 1 leave no place on node 2 (the 4th is closed 1008) until
/// one closes; a node restarted after `kill -9` gives back the places it held; 5 initiations on
/// node 1 make the 6th on node 2 a 429.
#[test]
fn user_limits_hold_across_nodes() {
    let pg = Postgres::start();
    let twilio = TwilioRest::start();
    let url = pg.url();
    let n1 = node(&url, "n1", &twilio.relay_args());
    let mut n2 = node(&url, "n2", &twilio.relay_args());

    let open: Vec<Frontend> = (0..3).map(|_| Frontend::connect(&n1, "CA-lim", "fiona", "")).collect();
    let fourth = Frontend::open(&n2, "CA-lim", "fiona", "").expect("the 4th socket is upgraded, then closed");
    assert_eq!(fourth.wait_closed(), Some(Some(1008)), "the 4th socket, on the other node, is closed 1008");
    assert!(Frontend::connect(&n2, "CA-lim", "gwen", "").sync(), "another user is not affected");
    open[0].close(1000);
    assert_eq!(open[0].wait_closed(), Some(Some(1000)));
    let on_n2 = poll_until("fiona's freed place usable on node 2", || accepted(&n2, "fiona"));

    // Node 2 dies holding one of fiona's places; started again under its name, it gives it back.
    n2.signal(libc::SIGKILL);
    n2.wait_exit(relay_tests::TIMEOUT);
    drop(on_n2);
    let n2 = node(&url, "n2", &twilio.relay_args());
    let again = accepted(&n1, "fiona").expect("the dead node's place is free after its restart");
    assert!(accepted(&n2, "fiona").is_none(), "three places taken again");
    drop(again);

    for i in 0..5 {
        let resp = n1.post("/outbound-call", &json!({ "user_id": "ivan", "number": NUMBER }));
        assert_eq!(resp.status, 200, "initiation {i}: {}", resp.text());
    }
    let sixth = n2.post("/outbound-call", &json!({ "user_id": "ivan", "number": NUMBER }));
    assert_error(&sixth, 429);
    let retry: u64 = sixth.header("retry-after").and_then(|v| v.trim().parse().ok()).expect("a numeric Retry-After");
    assert!((1..=60).contains(&retry), "Retry-After within the minute: {retry}");
    assert_eq!(twilio.created().len(), 5, "the refused initiation did not reach Twilio");
    let other = n2.post("/outbound-call", &json!({ "user_id": "jane", "number": NUMBER }));
    assert_eq!(other.status, 200, "another user still dials: {}", other.text());
}

/// A relay on the shared database `url`, named `name`, with `extra` flags.
fn node(url: &str, name: &str, extra: &[String]) -> Relay {
    let mut args = vec!["--records-url", url, "--node-id", name];
    args.extend(extra.iter().map(String::as_str));
    Relay::start(&args)
}

/// A frontend of `user` that `relay` keeps open, or `None` when it closes it with 1008.
fn accepted(relay: &Relay, user: &str) -> Option<Frontend> {
    let f = Frontend::open(relay, "CA-lim", user, "").expect("upgrade");
    if f.sync() {
        return Some(f);
    }
    assert!(
        f.received().iter().any(|a| a.msg == WsMsg::Close(Some(1008))),
        "a refused socket is closed with 1008: {:?}",
        f.received()
    );
    None
}

/// `GET path`, asserted 200, as JSON.
fn ok_json(relay: &Relay, path: &str) -> Value {
    let resp = relay.get(path);
    assert_eq!(resp.status, 200, "{path}: {}", resp.text());
    resp.json()
}

/// Today's UTC date, `YYYY-MM-DD` (civil from days, counted here independently of the relay).
fn utc_date_now() -> String {
    let days =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs() / 86_400;
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `GET /calls?all=1` on any node lists every node's calls that have not ended, from the shared
/// records, each with the node that serves it; a call that ends leaves the list.
#[test]
fn every_node_lists_every_live_call() {
    let pg = Postgres::start();
    let url = pg.url();
    let n1 = node(&url, "n1", &[]);
    let n2 = node(&url, "n2", &[]);
    let c1 = TwilioCaller::start(&n1, "CAlive1", &[]);
    let c2 = TwilioCaller::start(&n2, "CAlive2", &[]);
    c1.send_audio(&frames(1, 0..5));
    c2.send_audio(&frames(2, 0..5));
    let live = |relay: &Relay| -> Vec<(String, String)> {
        let v = ok_json(relay, "/calls?all=1");
        assert_eq!(v["scope"], "cluster", "{v}");
        let calls = v["calls"].as_array().cloned().unwrap_or_default();
        calls
            .iter()
            .map(|c| (c["id"].as_str().unwrap_or("").to_owned(), c["node"].as_str().unwrap_or("").to_owned()))
            .collect()
    };
    let both = vec![("CAlive1".to_owned(), "n1".to_owned()), ("CAlive2".to_owned(), "n2".to_owned())];
    for relay in [&n1, &n2] {
        poll_until("both nodes' live calls", || {
            let mut calls = live(relay);
            calls.sort();
            (calls == both).then_some(())
        });
    }
    // This node's own list is still its own calls only.
    let local = ok_json(&n1, "/calls");
    assert_eq!(local["total"], 1, "{local}");
    c2.stop();
    c2.wait_closed();
    poll_until("the ended call to leave the list", || {
        (live(&n1) == vec![("CAlive1".to_owned(), "n1".to_owned())]).then_some(())
    });
}
