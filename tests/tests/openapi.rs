//! `/openapi.json` and `/docs`: the document is valid OpenAPI 3.1, describes exactly what the
//! router serves, and both are public and self-contained.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use relay_control::router;
use relay_tests::{output_bounded, temp_dir, Relay, Response};
use serde_json::Value;

/// Methods an OpenAPI path item may hold.
const METHODS: &[&str] = &["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// Longest the validator may take, its first-run `pip install` included.
const VALIDATOR_LIMIT: Duration = Duration::from_secs(600);

/// The document parses, declares OpenAPI 3.1, documents every path and method the router serves,
/// and documents nothing the relay does not answer.
#[test]
fn document_matches_the_router() {
    let relay = Relay::start(&[]);
    let resp = relay.get("/openapi.json");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("content-type"), Some("application/json"));
    let doc = resp.json();
    let version = doc["openapi"].as_str().expect("openapi is a string");
    assert!(version.starts_with("3.1."), "openapi: {version}");
    assert!(doc["info"]["version"].as_str().is_some_and(|v| !v.is_empty()), "info.version: {}", doc["info"]);

    let documented = operations(&doc);
    let routed: BTreeSet<(String, String)> =
        router::endpoints().map(|e| (normalize(e.path), e.method.as_str().to_ascii_lowercase())).collect();
    assert!(routed.len() >= 20, "the router lists its endpoints: {routed:?}");
    let documented_normalized: BTreeSet<(String, String)> =
        documented.iter().map(|(template, method)| (normalize(template), method.clone())).collect();
    let undocumented: Vec<_> = routed.iter().filter(|op| !documented_normalized.contains(*op)).collect();
    assert!(undocumented.is_empty(), "served but not documented: {undocumented:?}");

    for (template, method) in &documented {
        let op = operation(&doc, template, method);
        let refusal = only_405(op);
        let path = example_path(template);
        if refusal {
            // A documented refusal (answered only with 405): the path exists, the method does not.
            assert!(!routed.contains(&(normalize(template), method.clone())), "{method} {template} is refused");
            assert!(routed.iter().any(|(p, _)| *p == normalize(template)), "{template} exists for some method");
        } else {
            assert!(routed.contains(&(normalize(template), method.clone())), "{method} {template} is routed");
        }
        // And over the wire: no "no endpoint" 404, and 405 exactly for the documented refusals.
        let resp = relay.conn().request(&method.to_ascii_uppercase(), &path, &[], None);
        let no_route = resp.status == 404 && resp.text().contains("no endpoint");
        assert!(!no_route, "{method} {path}: {} {}", resp.status, resp.text());
        if refusal {
            assert_eq!(resp.status, 405, "{method} {path}: {}", resp.text());
            assert!(resp.header("allow").is_some_and(|a| a.contains("DELETE")), "{method} {path}: {:?}", resp.headers);
        } else {
            assert_ne!(resp.status, 405, "{method} {path}: {}", resp.text());
        }
    }
    let websockets = documented.iter().filter(|(t, m)| operation(&doc, t, m).get("x-websocket-messages").is_some());
    assert!(websockets.count() >= 3, "/ws, /twilio/stream and /frontend-stream list their messages");
}

/// The document validates against the OpenAPI 3.1 JSON Schema (openapi-spec-validator, through
/// `scripts/validate-openapi`).
#[test]
fn document_is_valid_openapi() {
    let python = Command::new("python3").arg("--version").output();
    assert!(
        python.is_ok_and(|o| o.status.success()),
        "python3 is required to validate the OpenAPI document (scripts/validate-openapi installs \
         openapi-spec-validator from PyPI into target/); install python3 with pip and venv"
    );
    let relay = Relay::start(&[]);
    let resp = relay.get("/openapi.json");
    assert_eq!(resp.status, 200, "{}", resp.text());
    let dir = temp_dir("openapi");
    let file = dir.join("openapi.json");
    std::fs::write(&file, &resp.body).expect("write the document");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/validate-openapi");
    let mut cmd = Command::new(&script);
    cmd.arg(&file);
    let out = output_bounded(cmd, VALIDATOR_LIMIT);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{} rejected the document:\n{}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `/docs` is an HTML page that renders `/openapi.json` and loads nothing from anywhere else.
#[test]
fn docs_page_is_self_contained() {
    let relay = Relay::start(&[]);
    let resp = relay.get("/docs");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("content-type"), Some("text/html; charset=utf-8"));
    let html = resp.text();
    assert!(html.starts_with("<!doctype html>"), "{}", &html[..html.len().min(80)]);
    assert!(html.contains("\"/openapi.json\""), "the page fetches /openapi.json");
    for external in ["http://", "https://", "//cdn", "<script src", "<link"] {
        assert!(!html.contains(external), "the page references {external}");
    }
    let csp = resp.header("content-security-policy").expect("a Content-Security-Policy");
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"), "{csp}");
}

/// On a relay with an API key, both are public (as `/health` is), GET and HEAD alike, while
/// control endpoints still demand the key.
#[test]
fn public_without_the_api_key() {
    let relay = Relay::start(&["--api-key", "secret-key"]);
    let keyless = |method: &str, path: &str| -> Response { relay.request(method, path, &[], None) };
    assert_eq!(keyless("GET", "/health/detailed").status, 401, "the key is enforced");
    assert_eq!(keyless("POST", "/start-call").status, 401, "the key is enforced");
    let json = keyless("GET", "/openapi.json");
    assert_eq!(json.status, 200, "{}", json.text());
    assert!(json.json()["paths"]["/start-call"]["post"].is_object());
    let docs = keyless("GET", "/docs");
    assert_eq!(docs.status, 200, "{}", docs.text());
    for path in ["/openapi.json", "/docs"] {
        let head = keyless("HEAD", path);
        assert_eq!(head.status, 200, "HEAD {path}");
        assert!(head.body.is_empty(), "HEAD {path} has no body");
        let length: usize = head.header("content-length").and_then(|l| l.parse().ok()).expect("content-length");
        assert!(length > 1000, "HEAD {path} announces the GET body's length ({length})");
    }
    assert_eq!(keyless("POST", "/openapi.json").status, 405);
}

/// The document says how request bodies are framed (`Content-Length` or chunked, the limit by
/// decoded size) and that another transfer coding is 501, as the relay answers.
#[test]
fn document_states_body_framing() {
    let relay = Relay::start(&[]);
    let doc = relay.get("/openapi.json").json();
    let description = doc["info"]["description"].as_str().expect("info.description");
    for phrase in ["`Transfer-Encoding: chunked`", "501 (a transfer coding other than `chunked`)", "`Host`"] {
        assert!(description.contains(phrase), "info.description names {phrase}");
    }
    let too_large = doc["components"]["responses"]["PayloadTooLarge"]["description"].as_str().unwrap_or_default();
    assert!(too_large.contains("decoded size"), "413 says a chunked body counts decoded bytes: {too_large}");
    let body = "{\"sessionId\":\"doc\",\"accessToken\":\"t\"}";
    let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let mut conn = relay.conn();
    conn.write_raw(
        format!("POST /start-call HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}").as_bytes(),
    )
    .expect("write");
    assert_eq!(conn.read_response().status, 200, "a chunked body is taken as documented");
    let resp = relay.request("POST", "/start-call", &[("Transfer-Encoding", "gzip")], None);
    assert_eq!(resp.status, 501, "another coding is 501 as documented");
}

/// The document says how a Realtime model is briefed (`/outbound-call`'s `prompt` and
/// `first_message`) and documents the per-core `agentErrors` that `/health/detailed` serves.
#[test]
fn document_states_realtime_briefing_and_agent_errors() {
    let relay = Relay::start(&[]);
    let doc = relay.get("/openapi.json").json();
    let request = &doc["components"]["schemas"]["OutboundCallRequest"]["properties"];
    let prompt = request["prompt"]["description"].as_str().unwrap_or_default();
    assert!(prompt.contains("`instructions`"), "prompt becomes a Realtime session's instructions: {prompt}");
    let first = request["first_message"]["description"].as_str().unwrap_or_default();
    assert!(first.contains("`response.create`"), "first_message is asked for at once: {first}");
    let core = &doc["components"]["schemas"]["CoreStats"]["properties"];
    assert_eq!(core["agentErrors"]["type"], "integer", "CoreStats documents agentErrors");
    let served = relay.detailed();
    let cores = served["services"]["server"]["cores"].as_array().expect("cores");
    assert!(cores.iter().all(|c| c["agentErrors"].is_u64()), "and /health/detailed serves it: {served}");
}

/// Every `(path template with {} for parameters, lowercase method)` the document holds.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths is an object");
    let mut ops = BTreeSet::new();
    for (template, item) in paths {
        assert!(template.starts_with('/'), "path {template}");
        for method in METHODS {
            if item.get(*method).is_some() {
                ops.insert(((*template).clone(), (*method).to_owned()));
            }
        }
    }
    ops
}

fn operation<'a>(doc: &'a Value, template: &str, method: &str) -> &'a Value {
    &doc["paths"][template][method]
}

/// Whether an operation's only documented answer is 405 (a method the relay refuses).
fn only_405(op: &Value) -> bool {
    op["responses"].as_object().is_some_and(|r| r.len() == 1 && r.contains_key("405"))
}

/// `/whip/{sessionId}/{leg}` → `/whip/{}/{}`, so templates compare whatever their names.
fn normalize(template: &str) -> String {
    let mut out = String::new();
    let mut in_param = false;
    for c in template.chars() {
        match c {
            '{' => {
                in_param = true;
                out.push('{');
            }
            '}' => {
                in_param = false;
                out.push('}');
            }
            _ if in_param => {}
            _ => out.push(c),
        }
    }
    out
}

/// `/whip/{sessionId}/{leg}` → `/whip/p1/1`: a concrete path for a request.
fn example_path(template: &str) -> String {
    normalize(template).replace("{}", "p1")
}

/// `GET /calls` is documented with the API key, its bounded `limit` and its `CallList` answer;
/// `GET /console` is documented as public.
#[test]
fn document_states_calls_and_console() {
    let doc: Value = serde_json::from_str(relay_control::api::openapi::SOURCE).expect("the document is JSON");
    let calls = &doc["paths"]["/calls"]["get"];
    assert!(calls.get("security").is_none(), "/calls takes the API key (the default security)");
    let limit = calls["parameters"].as_array().and_then(|p| p.iter().find(|p| p["name"] == "limit")).expect("limit");
    assert_eq!(limit["schema"]["maximum"], 1000);
    assert_eq!(calls["responses"]["401"]["$ref"], "#/components/responses/Unauthorized");
    let list = &doc["components"]["schemas"]["CallList"];
    assert!(list["required"].as_array().is_some_and(|r| r.contains(&Value::from("truncated"))), "{list}");
    assert_eq!(doc["paths"]["/console"]["get"]["security"], serde_json::json!([]));
}
