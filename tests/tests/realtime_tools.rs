//! Tools over HTTP: a Realtime agent's function calls POSTed, signed, to a local tools server
//! (`--agent-tools`, `--tools-url`, `--tools-secret`, `--tools-timeout`; per-call `tools` in
//! `/outbound-call`), the answer returned to the model as the call's output followed by
//! `response.create`, failures as error outputs, counts in `/health/detailed`, the call record and
//! analytics (`totalFunctionCalls`, `callsByIntent`). The Realtime stand-in speaks the GA events
//! (`response.function_call_arguments.done`, `conversation.item.create` with a
//! `function_call_output` item, `response.create`).

use std::path::PathBuf;

use relay_tests::telephony::{b64, frames, unb64, BotConn, TwilioBot, TwilioCaller};
use relay_tests::tools_server::{Reply, ToolsServer};
use relay_tests::twilio_rest::TwilioRest;
use relay_tests::{output_bounded, poll_until, relay_command, temp_dir, Relay, TIMEOUT};
use serde_json::{json, Value};

/// The tools the relay declares in these tests.
fn declared() -> Value {
    json!([
        {"name": "book_table", "description": "Books a table",
         "parameters": {"type": "object", "properties": {"people": {"type": "integer"}}, "required": ["people"]}},
        {"name": "lookup_order", "description": "Finds an order", "parameters": {"type": "object"}}
    ])
}

/// Writes `tools` to a fresh file for `--agent-tools`.
fn tools_file(tools: &Value) -> PathBuf {
    let path = temp_dir("tools").join("tools.json");
    std::fs::write(&path, tools.to_string()).expect("write the tools file");
    path
}

fn start(realtime: &TwilioBot, tools: &ToolsServer, extra: &[&str]) -> Relay {
    let file = tools_file(&declared());
    let url = realtime.url("/v1/realtime?model=gpt-test");
    let mut args: Vec<String> = vec!["--openai-url".into(), url, "--agent-tools".into(), file.display().to_string()];
    args.extend(tools.relay_args());
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Relay::start(&args)
}

/// The Realtime messages of one type the stand-in received.
fn of_type(conn: &BotConn, kind: &str) -> Vec<Value> {
    conn.received().iter().filter_map(|a| a.json().cloned()).filter(|v| v["type"] == kind).collect()
}

/// The model finishing a call of `name`, as the GA server event carries it.
fn function_call(conn: &BotConn, call_id: &str, name: &str, arguments: &Value) {
    conn.send_json(&json!({
        "type": "response.function_call_arguments.done", "event_id": format!("ev_{call_id}"),
        "response_id": "resp_1", "item_id": format!("item_{call_id}"), "output_index": 0,
        "call_id": call_id, "name": name, "arguments": arguments.to_string(),
    }));
}

/// The function call outputs the stand-in received, as (call_id, output), each followed by a
/// `response.create`.
fn outputs(conn: &BotConn, n: usize) -> Vec<(String, String)> {
    poll_until("function call outputs", || {
        let got: Vec<Value> = conn.received().iter().filter_map(|a| a.json().cloned()).collect();
        let mut out = Vec::new();
        for (i, v) in got.iter().enumerate() {
            if v["type"] == "conversation.item.create" && v["item"]["type"] == "function_call_output" {
                // Both are sent together; the second may still be on its way.
                let next = got.get(i + 1)?;
                assert_eq!(next["type"], "response.create", "response.create follows each output");
                let id = v["item"]["call_id"].as_str().unwrap_or_default().to_owned();
                out.push((id, v["item"]["output"].as_str().unwrap_or_default().to_owned()));
            }
        }
        (out.len() >= n).then_some(out)
    })
}

/// The sum over cores of `/health/detailed`'s tool counters.
fn tool_counts(relay: &Relay) -> (u64, u64, u64) {
    let v = relay.get("/health/detailed").json();
    let cores = v["services"]["server"]["cores"].as_array().cloned().unwrap_or_default();
    let sum = |k: &str| cores.iter().map(|c| c["toolCalls"][k].as_u64().unwrap_or(0)).sum::<u64>();
    (sum("calls"), sum("failed"), sum("refused"))
}

/// The declared tools are in the session; a call is POSTed once, signed, with the call's sid, id,
/// name and parsed arguments; the answer goes back as its output, then `response.create`; the
/// count and the answer's intent reach the record and analytics.
#[test]
fn tool_call_round_trip() {
    let realtime = TwilioBot::start();
    let tools = ToolsServer::start();
    let relay = start(&realtime, &tools, &[]);
    let call = "CAtools1";
    let caller = TwilioCaller::start(&relay, call, &[("projectId", "proj-tools")]);
    let conn = realtime.ready(0);
    let update = poll_until("session.update", || of_type(&conn, "session.update").into_iter().next());
    let session_tools: Vec<Value> = declared()
        .as_array()
        .expect("array")
        .iter()
        .map(|t| json!({"type": "function", "name": t["name"], "description": t["description"], "parameters": t["parameters"]}))
        .collect();
    assert_eq!(update["session"]["tools"], json!(session_tools), "{update}");
    assert_eq!(update["session"]["tool_choice"], "auto");

    tools.reply(Reply::Json(200, json!({"output": "Booked a table for 2 at 19:00", "intent": "booking"})));
    function_call(&conn, "call_1", "book_table", &json!({"people": 2}));
    let request = tools.wait_requests(1).remove(0);
    assert_eq!((request.method.as_str(), request.path.as_str()), ("POST", "/tools"));
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert!(request.signed, "X-Relay-Signature verifies with the shared secret: {request:?}");
    let timestamp: u64 = request.header("x-relay-timestamp").and_then(|t| t.parse().ok()).expect("a timestamp");
    assert!(timestamp > 1_600_000_000, "Unix seconds: {timestamp}");
    assert_eq!(
        request.json(),
        json!({"callSid": call, "callId": "call_1", "name": "book_table", "arguments": {"people": 2}})
    );
    assert_eq!(outputs(&conn, 1), vec![("call_1".to_owned(), "Booked a table for 2 at 19:00".to_owned())]);

    // The same call repeated (a duplicate event) is not run again; a second call is.
    function_call(&conn, "call_1", "book_table", &json!({"people": 2}));
    function_call(&conn, "call_2", "lookup_order", &json!({"order": "A7"}));
    assert_eq!(outputs(&conn, 2)[1], ("call_2".to_owned(), "ok".to_owned()));
    assert_eq!(tools.requests().len(), 2, "call_1 ran once");
    assert_eq!(tool_counts(&relay), (2, 0, 0));

    caller.stop();
    let overview = poll_until("the calls in analytics", || {
        let v = relay.get("/analytics/project/proj-tools").json();
        (v["totalFunctionCalls"] == 2).then_some(v)
    });
    assert_eq!(overview["callsByIntent"], json!({"booking": 1}), "{overview}");
    let recent = relay.get("/analytics/project/proj-tools/recent").json();
    assert_eq!(recent["calls"][0]["intent"], "booking", "{recent}");
}

/// A tools server that answers non-2xx, not in time, or more than 64 KiB, and a tool that was
/// never declared: each gives the model an error output, the undeclared one at once and never
/// reaching the server; all are counted.
#[test]
fn failing_tools_give_error_outputs() {
    let realtime = TwilioBot::start();
    let tools = ToolsServer::start();
    let relay = start(&realtime, &tools, &["--tools-timeout", "300ms"]);
    let _caller = TwilioCaller::start(&relay, "CAtools2", &[]);
    let conn = realtime.ready(0);
    poll_until("session.update", || of_type(&conn, "session.update").into_iter().next());

    tools.reply(Reply::Json(503, json!({"error": "down for maintenance"})));
    function_call(&conn, "call_500", "book_table", &json!({"people": 4}));
    let out = outputs(&conn, 1);
    let error: Value = serde_json::from_str(&out[0].1).expect("a JSON error output");
    assert!(error["error"].as_str().is_some_and(|e| e.contains("503")), "{error}");

    tools.reply(Reply::Silent);
    function_call(&conn, "call_slow", "lookup_order", &json!({}));
    let out = outputs(&conn, 2);
    assert_eq!(out[1].0, "call_slow");
    let error: Value = serde_json::from_str(&out[1].1).expect("a JSON error output");
    assert!(error["error"].as_str().is_some_and(|e| e.contains("timed out")), "{error}");

    function_call(&conn, "call_unknown", "delete_everything", &json!({}));
    let out = outputs(&conn, 3);
    assert_eq!(out[2].0, "call_unknown");
    let error: Value = serde_json::from_str(&out[2].1).expect("a JSON error output");
    assert!(error["error"].as_str().is_some_and(|e| e.contains("unknown tool")), "{error}");
    assert_eq!(tools.requests().len(), 2, "the undeclared tool was never POSTed");

    tools.reply(Reply::Json(200, json!({"output": "x".repeat(70 * 1024)})));
    function_call(&conn, "call_big", "lookup_order", &json!({}));
    let out = outputs(&conn, 4);
    assert_eq!(out[3].0, "call_big");
    let error: Value = serde_json::from_str(&out[3].1).expect("a JSON error output");
    assert!(error["error"].as_str().is_some_and(|e| e.contains("too large") || e.contains("larger")), "{error}");
    assert_eq!(tool_counts(&relay), (4, 3, 1), "calls, failed, refused");
    let metrics = relay.get("/metrics").text();
    assert!(metrics.contains("relay_tool_call_failures_total"), "{metrics}");
}

/// While a tool call waits for its server, the caller's audio still reaches the model and the
/// model's audio still reaches the caller; the output follows once the server answers.
#[test]
fn audio_flows_while_a_tool_is_slow() {
    let realtime = TwilioBot::start();
    let tools = ToolsServer::start();
    let relay = start(&realtime, &tools, &[]);
    let caller = TwilioCaller::start(&relay, "CAtools3", &[]);
    let conn = realtime.ready(0);
    poll_until("session.update", || of_type(&conn, "session.update").into_iter().next());

    tools.reply(Reply::Held(json!({"output": "found it"})));
    function_call(&conn, "call_held", "lookup_order", &json!({"order": "B2"}));
    tools.wait_requests(1);

    let sent = frames(5, 0..10);
    caller.send_audio(&sent);
    let appended = poll_until("the caller's audio at the model", || {
        let got: Vec<Vec<u8>> = of_type(&conn, "input_audio_buffer.append")
            .iter()
            .map(|v| unb64(v["audio"].as_str().unwrap_or("")))
            .collect();
        (got.len() >= 10).then_some(got)
    });
    assert_eq!(appended, sent, "caller audio flows during the tool call");
    let reply = frames(6, 0..3);
    for f in &reply {
        conn.send_json(&json!({"type": "response.output_audio.delta", "item_id": "item_hold", "delta": b64(f)}));
    }
    let heard: Vec<Vec<u8>> = caller.wait_media(3).into_iter().map(|(_, f)| f).collect();
    assert_eq!(heard, reply, "the model's audio plays during the tool call");
    assert!(of_type(&conn, "conversation.item.create").is_empty(), "no output before the server answers");

    tools.release();
    assert_eq!(outputs(&conn, 1), vec![("call_held".to_owned(), "found it".to_owned())]);
}

/// `/outbound-call`'s `tools` replace the relay's in that call's session; invalid ones are a 400.
#[test]
fn outbound_call_tools_reach_the_session() {
    let twilio = TwilioRest::start();
    let realtime = TwilioBot::start();
    let tools = ToolsServer::start();
    let args = twilio.relay_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let relay = start(&realtime, &tools, &args);

    let own = json!([{"name": "confirm_appointment", "description": "Confirms", "parameters": {"type": "object"}}]);
    for (bad, why) in [
        (json!("book_table"), "not an array"),
        (json!([{"name": "has space", "parameters": {}}]), "bad name"),
        (json!([{"name": "a", "parameters": {}}, {"name": "a", "parameters": {}}]), "duplicate"),
        (Value::Array((0..65).map(|i| json!({"name": format!("t{i}"), "parameters": {}})).collect()), "65 tools"),
    ] {
        let resp = relay.post("/outbound-call", &json!({"user_id": "u1", "number": "+14155550123", "tools": bad}));
        assert_eq!(resp.status, 400, "{why}: {}", resp.text());
        assert!(resp.text().contains("tools"), "{why}: the error names the field: {}", resp.text());
    }
    assert!(twilio.requests().is_empty(), "nothing was dialled for an invalid body");

    let resp = relay.post(
        "/outbound-call",
        &json!({"user_id": "u1", "number": "+14155550123", "prompt": "Confirm the appointment", "tools": own}),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let placed = twilio.next_call();
    let (twiml, _caller) = placed.answer();
    assert!(twiml.parameter("tools").is_none(), "tools stay out of TwiML");
    let conn = realtime.ready(0);
    let update = poll_until("session.update", || of_type(&conn, "session.update").into_iter().next());
    assert_eq!(
        update["session"]["tools"],
        json!([{"type": "function", "name": "confirm_appointment", "description": "Confirms", "parameters": {"type": "object"}}]),
        "the call's own tools, not the relay's: {update}"
    );
    function_call(&conn, "call_b", "book_table", &json!({"people": 1}));
    let out = outputs(&conn, 1);
    assert!(out[0].1.contains("unknown tool"), "the relay's tools are not this call's: {out:?}");
    assert!(tools.requests().is_empty());
}

/// A bad `--agent-tools` file stops startup with one line naming the flag and the problem.
#[test]
fn bad_tools_file_is_a_startup_error() {
    for (tools, expected) in
        [(json!([{"name": "x"}]), "parameters is required"), (json!({"name": "x"}), "must be an array")]
    {
        let data = temp_dir("tools-bad");
        let file = tools_file(&tools);
        let mut cmd = relay_command();
        cmd.args(["--listen", "127.0.0.1:0", "--cores", "2", "--rtc-port-base", "0", "--data-dir"]).arg(&data);
        cmd.arg("--agent-tools").arg(&file);
        let out = output_bounded(cmd, TIMEOUT);
        let _ = std::fs::remove_dir_all(&data);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "exit status {:?}; stderr:\n{stderr}", out.status);
        assert!(stderr.contains("--agent-tools") && stderr.contains(expected), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// A finished `function_call` item, as `response.output_item.done` carries it.
fn function_call_item(conn: &BotConn, call_id: &str, name: &str, arguments: &Value, status: &str) {
    conn.send_json(&json!({
        "type": "response.output_item.done", "event_id": format!("ev_item_{call_id}"), "response_id": "resp_1",
        "output_index": 0,
        "item": {"id": format!("item_{call_id}"), "object": "realtime.item", "type": "function_call",
                 "status": status, "call_id": call_id, "name": name, "arguments": arguments.to_string()},
    }));
}

/// A GA server announces a call twice (arguments done, then the item); a beta server's
/// arguments event has no name and only the item names the function; an item an interrupted
/// response left incomplete is not a call. Each call runs exactly once.
#[test]
fn each_call_runs_once_whichever_events_carry_it() {
    let realtime = TwilioBot::start();
    let tools = ToolsServer::start();
    let relay = start(&realtime, &tools, &[]);
    let _caller = TwilioCaller::start(&relay, "CAtools4", &[]);
    let conn = realtime.ready(0);
    poll_until("session.update", || of_type(&conn, "session.update").into_iter().next());

    let args = json!({"people": 3});
    function_call(&conn, "call_ga", "book_table", &args);
    function_call_item(&conn, "call_ga", "book_table", &args, "completed");
    conn.send_json(&json!({
        "type": "response.function_call_arguments.done", "event_id": "ev_beta", "response_id": "resp_2",
        "item_id": "item_beta", "output_index": 0, "call_id": "call_beta", "arguments": args.to_string(),
    }));
    function_call_item(&conn, "call_beta", "book_table", &args, "completed");
    function_call_item(&conn, "call_cut", "book_table", &args, "incomplete");
    function_call(&conn, "call_last", "lookup_order", &json!({}));
    let out = outputs(&conn, 3);
    // The three run side by side: their answers may come back in any order.
    let mut ids: Vec<&str> = out.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["call_beta", "call_ga", "call_last"], "{out:?}");
    let mut posted: Vec<String> =
        tools.requests().iter().map(|r| r.json()["callId"].as_str().unwrap_or_default().to_owned()).collect();
    posted.sort_unstable();
    assert_eq!(posted, ["call_beta", "call_ga", "call_last"]);
    assert_eq!(tool_counts(&relay), (3, 0, 0));
}
