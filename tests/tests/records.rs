//! Call records in the embedded database and the analytics answers of seed 003, against the real
//! relay: Twilio-protocol callers on `/twilio/stream` (with `projectId` and `intent` custom
//! parameters), outbound calls through the Twilio REST stand-in, restarts on the same
//! `--data-dir`, and SIGTERM during calls.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use relay_tests::telephony::{frames, TwilioCaller};
use relay_tests::twilio_rest::{signed_caller, TwilioRest, FROM_NUMBER};
use relay_tests::{assert_error, assert_json_type, is_rfc3339, poll_until, temp_dir, Relay};
use serde_json::{json, Value};

const KEY: &str = "records-test-key";
const NUMBER: &str = "+14155550123";

/// Inbound and outbound calls of two projects (by `projectId` parameter and by number) give the
/// overview, recent calls and statistics that their real streams, statuses and durations call for,
/// within the date ranges asked for, and nothing of other projects.
#[test]
fn analytics_follow_real_calls() {
    let twilio = TwilioRest::start();
    let mut args = twilio.relay_args();
    args.extend(
        [
            "--api-key",
            KEY,
            "--project-for-number",
            &format!("{FROM_NUMBER}=proj_a"),
            "--project-names",
            "proj_a=Demo Plumbing",
        ]
        .map(str::to_owned),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let relay = Relay::start(&args);
    let today_before = utc_date_now();

    // Two inbound calls of proj_a, one of proj_b, one of no project: real streams of known length.
    let a1 =
        signed_caller(&relay, "CAa1", &[("projectId", "proj_a"), ("intent", "emergency"), ("from", "+15551230001")]);
    let a2 = signed_caller(&relay, "CAa2", &[("projectId", "proj_a"), ("from", "+15551230002")]);
    let b1 = signed_caller(&relay, "CAb1", &[("projectId", "proj_b"), ("intent", "routine")]);
    let d1 = signed_caller(&relay, "CAd1", &[("to", "+15559990000")]);
    let started = Instant::now();
    a2.send_audio(&frames(2, 0..50));
    a2.wait_sent();
    a2.stop();
    a2.wait_closed();
    let a2_secs = started.elapsed();
    for c in [&b1, &d1] {
        c.stop();
        c.wait_closed();
    }
    a1.send_audio(&frames(1, 0..100));
    a1.wait_sent();
    a1.stop();
    a1.wait_closed();
    let a1_secs = started.elapsed();

    // An outbound call of proj_a (by its from number), answered, then hung up after 7 s by
    // Twilio's clock; and one that is never answered.
    let resp = relay.post("/outbound-call", &json!({ "user_id": "u1", "number": NUMBER }));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let out1 = twilio.next_call();
    let (_, caller) = out1.answer();
    caller.send_audio(&frames(3, 0..5));
    out1.hang_up(&caller, 7);
    let resp = relay.post("/outbound-call", &json!({ "user_id": "u1", "number": NUMBER, "intent": "sales" }));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let out2 = twilio.next_call();
    assert_eq!(out2.status_callback("ringing", None).status, 200);
    assert_eq!(out2.status_callback("no-answer", Some(0)).status, 200);

    // Records reach the database within a second or so of each change.
    let overview = poll_until("proj_a's 4 calls, all ended, in the database", || {
        let v = analytics(&relay, "/analytics/project/proj_a");
        (v["totalCalls"] == 4 && v["callsByStatus"]["active"] == 0).then_some(v)
    });
    let recent = analytics(&relay, "/analytics/project/proj_a/recent");
    let calls = recent["calls"].as_array().expect("calls array").clone();
    assert_eq!(calls.len(), 4, "{recent}");
    let by_id = |id: &str| calls.iter().find(|c| c["callSid"] == id).unwrap_or_else(|| panic!("{id} in {recent}"));
    let secs = |id: &str| by_id(id)["durationSec"].as_u64().unwrap_or_else(|| panic!("{id} has a duration"));
    // The relay's durations come from the stream's real start and stop, in whole seconds.
    for (id, measured) in [("CAa1", a1_secs), ("CAa2", a2_secs)] {
        let d = secs(id);
        assert!(d.abs_diff(measured.as_secs()) <= 1, "{id}: {d} s vs {measured:?}");
    }
    assert!(secs("CAa1") >= 1, "two seconds of audio");
    assert_eq!(secs(&out1.sid), 7, "Twilio's CallDuration wins");
    let total = secs("CAa1") + secs("CAa2") + 7 + secs(&out2.sid);
    let timed = 4;
    let today_after = utc_date_now();
    let today = overview["dateRange"]["end"].as_str().expect("end")[..10].to_owned();
    assert!(today == today_before || today == today_after, "{overview}");
    let expected = json!({
        "projectId": "proj_a",
        "projectName": "Demo Plumbing",
        "dateRange": overview["dateRange"].clone(),
        "totalCalls": 4,
        "completedCalls": 3,
        "missedCalls": 1,
        "failedCalls": 0,
        "averageDuration": (total + timed / 2) / timed,
        "totalDuration": total,
        "totalFunctionCalls": 0,
        "errorRate": 0.0,
        "callsByStatus": { "completed": 3, "missed": 1, "failed": 0, "active": 0 },
        "callsByIntent": { "emergency": 1, "sales": 1, "unknown": 2 },
    });
    assert_eq!(overview, expected);
    // Default range: the last 30 days up to now.
    let start = overview["dateRange"]["start"].as_str().expect("start");
    let end = overview["dateRange"]["end"].as_str().expect("end");
    assert!(is_rfc3339(start) && is_rfc3339(end), "{overview}");

    // Recent: newest first, with the seed's fields.
    let created: Vec<&str> = calls.iter().map(|c| c["createdAt"].as_str().expect("createdAt")).collect();
    assert!(created.windows(2).all(|w| w[0] >= w[1]), "newest first: {created:?}");
    assert_eq!(calls[0]["callSid"], out2.sid.as_str(), "the last call made is first");
    let a1 = by_id("CAa1");
    assert_eq!(
        (&a1["id"], &a1["status"], &a1["intent"], &a1["fromNumber"], &a1["transcriptPreview"]),
        (&json!("CAa1"), &json!("completed"), &json!("emergency"), &json!("+15551230001"), &json!(""))
    );
    assert!(is_rfc3339(a1["createdAt"].as_str().expect("createdAt")));
    assert_eq!(by_id(&out2.sid)["status"], "no-answer");
    assert_eq!(by_id(&out1.sid)["fromNumber"], FROM_NUMBER);

    // The other projects hold only their own calls.
    let b = analytics(&relay, "/analytics/project/proj_b");
    assert_eq!((b["totalCalls"].clone(), b["projectName"].clone()), (json!(1), json!("proj_b")));
    assert_eq!(b["callsByIntent"], json!({ "routine": 1 }));
    let d = poll_until("the default project's call", || {
        let v = analytics(&relay, "/analytics/project/default");
        (v["totalCalls"] == 1).then_some(v)
    });
    assert_eq!(d["completedCalls"], 1);
    let none = analytics(&relay, "/analytics/project/nobody");
    assert_eq!((none["totalCalls"].clone(), none["averageDuration"].clone()), (json!(0), json!(0)));
    assert_eq!(analytics(&relay, "/analytics/project/nobody/recent"), json!({ "calls": [] }));

    // Date ranges: today holds all four, a range that ends yesterday or starts tomorrow none.
    let stats = analytics(&relay, &format!("/analytics/project/proj_a/statistics?startDate={today}&endDate={today}"));
    assert_eq!(
        stats,
        json!({
            "totalCalls": 4, "completedCalls": 3, "averageCallDuration": (total + timed / 2) / timed,
            "totalMinutes": (total as f64 / 60.0 * 100.0).round() / 100.0,
            "callsByDay": [{ "date": today, "count": 4 }],
        })
    );
    let (yesterday, tomorrow) = (day_offset(&today, -1), day_offset(&today, 1));
    let wide = analytics(
        &relay,
        &format!("/analytics/project/proj_a/statistics?startDate={yesterday}T00:00:00Z&endDate={tomorrow}T23:59:59Z"),
    );
    assert_eq!(wide["callsByDay"], json!([{ "date": today, "count": 4 }]));
    let before =
        analytics(&relay, &format!("/analytics/project/proj_a/statistics?startDate=2020-01-01&endDate={yesterday}"));
    assert_eq!((before["totalCalls"].clone(), before["callsByDay"].clone()), (json!(0), json!([])));
    let after = analytics(&relay, &format!("/analytics/project/proj_a?startDate={tomorrow}&endDate={tomorrow}"));
    assert_eq!(after["totalCalls"], 0, "{after}");
    assert_eq!(after["dateRange"]["start"], format!("{tomorrow}T00:00:00Z"));
    let since_yesterday = analytics(&relay, &format!("/analytics/project/proj_a?startDate={yesterday}"));
    assert_eq!(since_yesterday["totalCalls"], 4, "the end defaults to now: {since_yesterday}");
    let ranged = analytics(&relay, &format!("/analytics/project/proj_a?startDate={today}&endDate={today}"));
    assert_eq!(ranged["totalCalls"], 4);
    assert_eq!(
        ranged["dateRange"],
        json!({ "start": format!("{today}T00:00:00Z"), "end": format!("{today}T23:59:59.999Z") })
    );

    // The API key guards analytics like every control endpoint.
    let resp = relay.request("GET", "/analytics/project/proj_a", &[("Connection", "close")], None);
    assert_error(&resp, 401);
}

/// `limit` defaults to 10 and is capped at 100; statistics need both valid dates; bad ranges,
/// limits and paths get the relay's error envelope.
#[test]
fn limits_and_bad_requests() {
    let relay = Relay::start(&["--api-key", KEY]);
    for i in 0..105 {
        let caller = TwilioCaller::start(&relay, &format!("CAm{i:03}"), &[("projectId", "many")]);
        caller.stop();
        caller.wait_closed();
    }
    poll_until("105 calls of project many", || {
        (analytics(&relay, "/analytics/project/many")["totalCalls"] == 105).then_some(())
    });
    let recent = |q: &str| analytics(&relay, &format!("/analytics/project/many/recent{q}"))["calls"].clone();
    let ten = recent("");
    assert_eq!(ten.as_array().map(Vec::len), Some(10));
    assert_eq!(ten[0]["callSid"], "CAm104", "newest first");
    assert_eq!(recent("?limit=3").as_array().map(Vec::len), Some(3));
    assert_eq!(recent("?limit=100").as_array().map(Vec::len), Some(100));
    assert_eq!(recent("?limit=1000").as_array().map(Vec::len), Some(100), "capped at 100");
    let huge = recent("?limit=99999999999999999999999");
    assert_eq!(huge.as_array().map(Vec::len), Some(100), "capped however long");
    // A start later than now without an end: an empty range, not a start-after-end error.
    let later = analytics(&relay, "/analytics/project/many?startDate=9999-01-01");
    assert_eq!(later["totalCalls"], 0, "{later}");
    for bad in ["?limit=0", "?limit=-1", "?limit=ten", "?limit=1.5", "?limit="] {
        let resp = relay.get(&format!("/analytics/project/many/recent{bad}"));
        assert_error(&resp, 400);
    }
    for bad in [
        "",
        "?startDate=2025-01-01",
        "?endDate=2025-01-01",
        "?startDate=2025-01-01&endDate=yesterday",
        "?startDate=2025-13-01&endDate=2025-12-31",
        "?startDate=2025-02-01&endDate=2025-01-01",
    ] {
        let resp = relay.get(&format!("/analytics/project/many/statistics{bad}"));
        assert_error(&resp, 400);
    }
    for bad in [
        "?startDate=soon",
        "?endDate=2025-01-01T25:00:00Z",
        "?startDate=2025-02-01&endDate=2025-01-01",
        // Past 9999-12-31T23:59:59.999Z, which RFC 3339 cannot write (this made the answer panic).
        "?startDate=2025-01-01&endDate=9999-12-31T23:59:59-00:01",
    ] {
        assert_error(&relay.get(&format!("/analytics/project/many{bad}")), 400);
    }
    assert_error(&relay.get("/analytics/project/many/other"), 404);
    assert_error(&relay.get("/analytics/project/"), 404);
    let resp = relay.post("/analytics/project/many", &json!({}));
    assert_error(&resp, 405);
}

/// Records survive a restart on the same `--data-dir`, and SIGTERM during calls writes every
/// call's final record (ended, with its duration) before the relay exits.
#[test]
fn records_survive_restart_and_sigterm() {
    let dir = temp_dir("records-restart");
    let dir_arg = dir.to_str().expect("utf-8 temp path").to_owned();
    let mut relay = Relay::start(&["--api-key", KEY, "--data-dir", &dir_arg]);
    let done = TwilioCaller::start(&relay, "CAs-done", &[("projectId", "proj_s"), ("intent", "billing")]);
    done.send_audio(&frames(1, 0..10));
    done.wait_sent();
    done.stop();
    done.wait_closed();
    let live: Vec<TwilioCaller> =
        (0..3).map(|i| TwilioCaller::start(&relay, &format!("CAs-live{i}"), &[("projectId", "proj_s")])).collect();
    for c in &live {
        c.send_audio(&frames(2, 0..60));
    }
    // Every live call is in progress on its core before the signal.
    for c in &live {
        poll_until("the call in progress", || {
            let v = relay.get(&format!("/call-status?callSid={}&user_id=anyone", c.call_sid)).json();
            (v["status"] == "in-progress").then_some(())
        });
    }
    std::thread::sleep(Duration::from_millis(300));
    let status = relay.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    for c in &live {
        assert!(c.wait_closed().is_some(), "the relay closed {}", c.call_sid);
    }

    let relay = Relay::start(&["--api-key", KEY, "--data-dir", &dir_arg]);
    let overview = analytics(&relay, "/analytics/project/proj_s");
    assert_eq!(overview["totalCalls"], 4, "{overview}");
    assert_eq!(overview["completedCalls"], 4, "calls ended by the shutdown are completed: {overview}");
    assert_eq!(overview["callsByStatus"]["active"], 0, "{overview}");
    assert_eq!(overview["callsByIntent"], json!({ "billing": 1, "unknown": 3 }));
    let recent = analytics(&relay, "/analytics/project/proj_s/recent");
    let calls = recent["calls"].as_array().expect("calls");
    assert_eq!(calls.len(), 4, "{recent}");
    for c in calls {
        assert!(c["durationSec"].is_u64(), "every call has its end and duration: {c}");
        assert_eq!(c["status"], "completed", "{c}");
    }
    let lives = calls.iter().filter(|c| c["callSid"].as_str().is_some_and(|s| s.starts_with("CAs-live"))).count();
    assert_eq!(lives, 3, "{recent}");
    // The database answers health checks with a real read.
    let detailed = relay.detailed();
    assert_eq!(detailed["services"]["database"]["status"], "up", "{detailed}");
    assert!(detailed["services"]["database"]["latency"].is_number(), "{detailed}");
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `GET path` with the API key, asserted 200 JSON.
fn analytics(relay: &Relay, path: &str) -> Value {
    let resp = relay.get(path);
    assert_eq!(resp.status, 200, "{path}: {}", resp.text());
    assert_json_type(&resp);
    resp.json()
}

/// Today's UTC date, `YYYY-MM-DD`.
fn utc_date_now() -> String {
    let days = SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs() / 86_400;
    date_of_days(days as i64)
}

/// The date `offset` days from `date`.
fn day_offset(date: &str, offset: i64) -> String {
    let (y, m, d) = (&date[0..4], &date[5..7], &date[8..10]);
    let (y, m, d): (i64, i64, i64) = (y.parse().expect("year"), m.parse().expect("month"), d.parse().expect("day"));
    // Days from civil (proleptic Gregorian), counted here independently of the relay's code.
    let (y2, m2) = if m <= 2 { (y - 1, m + 12) } else { (y, m) };
    let days = 365 * y2 + y2 / 4 - y2 / 100 + y2 / 400 + (153 * (m2 - 3) + 2) / 5 + d - 719_469;
    date_of_days(days + offset)
}

/// The civil date of a day number since 1970-01-01, by walking years and months.
fn date_of_days(mut days: i64) -> String {
    let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let mut year = 1970;
    while days >= if leap(year) { 366 } else { 365 } {
        days -= if leap(year) { 366 } else { 365 };
        year += 1;
    }
    let lengths = [31, if leap(year) { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let mut month = 0;
    while days >= lengths[month] {
        days -= lengths[month];
        month += 1;
    }
    format!("{year:04}-{:02}-{:02}", month + 1, days + 1)
}
