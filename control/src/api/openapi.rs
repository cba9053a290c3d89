//! `GET /openapi.json` (the OpenAPI 3.1 document of the API) and `GET /docs` (a self-contained
//! page rendering it). The document is `openapi/openapi.json`, built once per process: stamped
//! with the crate version, and reduced to the operations the router really serves.
//!
//! Invariant: the served document never names an endpoint this build does not route; the page
//! loads nothing but `/openapi.json` (no CDN, no external resource).

use std::sync::OnceLock;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Response};
use serde_json::{Map, Value};

use super::ops::VERSION;
use crate::router::{self, Miss};

/// The whole document as written, including operations whose routes may not exist yet.
pub const SOURCE: &str = include_str!("openapi/openapi.json");

/// The `/docs` page: inline CSS and script, fetches `/openapi.json`.
pub const DOCS_HTML: &str = include_str!("openapi/docs.html");

/// What `/docs` may load: itself and `/openapi.json`, nothing from elsewhere.
const DOCS_CSP: &str =
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'";

/// The extension in `info` listing operations of [`SOURCE`] that this build does not route.
pub const UNSERVED_EXTENSION: &str = "x-relay-unserved-operations";

/// `GET /openapi.json`.
pub fn openapi_json() -> Response<Bytes> {
    static BODY: OnceLock<Bytes> = OnceLock::new();
    let body = BODY.get_or_init(|| Bytes::from(document().to_string()));
    respond(body.clone(), "application/json")
}

/// `GET /docs`.
pub fn docs() -> Response<Bytes> {
    let mut response = respond(Bytes::from_static(DOCS_HTML.as_bytes()), "text/html; charset=utf-8");
    response.headers_mut().insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(DOCS_CSP));
    response
}

/// The served document: [`SOURCE`] with `info.version` set to the crate version and without the
/// operations the router does not serve (listed in `info.x-relay-unserved-operations` instead).
///
/// # Panics
/// When [`SOURCE`] is not a JSON object with `info` and `paths` (a unit test pins that it is).
pub fn document() -> &'static Value {
    static DOCUMENT: OnceLock<Value> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let mut doc: Value = serde_json::from_str(SOURCE).expect("openapi.json is valid JSON (unit-tested)");
        let unserved = retain_served(&mut doc);
        let info = doc["info"].as_object_mut().expect("openapi.json has an info object (unit-tested)");
        info.insert("version".into(), Value::from(VERSION));
        if !unserved.is_empty() {
            info.insert(UNSERVED_EXTENSION.into(), Value::from(unserved));
        }
        doc
    })
}

/// A concrete path for an OpenAPI path template: each `{name}` becomes `name1` (a valid id).
pub fn example_path(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else { break };
        out.push_str(&rest[..open]);
        out.push_str(&rest[open + 1..open + close]);
        out.push('1');
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    out
}

/// Whether the router answers `method` on `template` as the operation says: a route for it, or
/// (for an operation documenting only `405`) a 405 with `Allow`.
pub fn is_served(method: &Method, template: &str, operation: &Value) -> bool {
    let only_405 = operation["responses"].as_object().is_some_and(|r| r.len() == 1 && r.contains_key("405"));
    match router::route(method, &example_path(template)) {
        Ok(_) => !only_405,
        Err(Miss::MethodNotAllowed(_)) => only_405,
        Err(Miss::NotFound) => false,
    }
}

/// HTTP methods an OpenAPI path item may hold, by their key.
const METHOD_KEYS: &[(&str, Method)] = &[
    ("get", Method::GET),
    ("put", Method::PUT),
    ("post", Method::POST),
    ("delete", Method::DELETE),
    ("options", Method::OPTIONS),
    ("head", Method::HEAD),
    ("patch", Method::PATCH),
    ("trace", Method::TRACE),
];

/// Removes the operations the router does not serve (and paths left empty); returns them as
/// `"METHOD /path"`.
fn retain_served(doc: &mut Value) -> Vec<String> {
    let mut unserved = Vec::new();
    let paths = doc["paths"].as_object_mut().expect("openapi.json has a paths object (unit-tested)");
    let mut kept = Map::new();
    for (template, mut item) in std::mem::take(paths) {
        let Some(ops) = item.as_object_mut() else { continue };
        for (key, method) in METHOD_KEYS {
            if let Some(op) = ops.get(*key) {
                if !is_served(method, &template, op) {
                    ops.remove(*key);
                    unserved.push(format!("{method} {template}"));
                }
            }
        }
        if METHOD_KEYS.iter().any(|(key, _)| ops.contains_key(*key)) {
            kept.insert(template, item);
        }
    }
    *paths = kept;
    unserved
}

fn respond(body: Bytes, content_type: &'static str) -> Response<Bytes> {
    let mut response = Response::new(body);
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The source document parses and describes every endpoint of API.md, the ones other
    /// changes are adding included.
    #[test]
    fn source_covers_the_contract() {
        let doc: Value = serde_json::from_str(SOURCE).expect("valid JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        for (path, method) in [
            ("/analytics/project/{projectId}", "get"),
            ("/analytics/project/{projectId}/recent", "get"),
            ("/analytics/project/{projectId}/statistics", "get"),
            ("/metrics", "get"),
            ("/llm-websocket/{call_id}", "get"),
            ("/whip/{sessionId}/{leg}", "patch"),
            ("/openapi.json", "get"),
            ("/docs", "get"),
        ] {
            assert!(doc["paths"][path][method].is_object(), "{method} {path} is documented");
        }
    }

    /// Every `$ref` in the source names something that exists in it.
    #[test]
    fn references_resolve() {
        fn walk(v: &Value, doc: &Value, bad: &mut Vec<String>) {
            match v {
                Value::Object(map) => {
                    if let Some(Value::String(r)) = map.get("$ref") {
                        let target = r.strip_prefix('#').and_then(|p| doc.pointer(p));
                        if target.is_none() {
                            bad.push(r.clone());
                        }
                    }
                    map.values().for_each(|x| walk(x, doc, bad));
                }
                Value::Array(items) => items.iter().for_each(|x| walk(x, doc, bad)),
                _ => {}
            }
        }
        let doc: Value = serde_json::from_str(SOURCE).expect("valid JSON");
        let mut bad = Vec::new();
        walk(&doc, &doc, &mut bad);
        assert!(bad.is_empty(), "unresolved references: {bad:?}");
    }

    /// Every message named in an `x-websocket-messages` list is a schema.
    #[test]
    fn websocket_messages_are_schemas() {
        let doc: Value = serde_json::from_str(SOURCE).expect("valid JSON");
        let mut seen = 0;
        for item in doc["paths"].as_object().expect("paths").values() {
            let Some(messages) = item["get"]["x-websocket-messages"].as_object() else { continue };
            for name in messages.values().flat_map(|v| v.as_array().expect("a list")) {
                let name = name.as_str().expect("a name");
                assert!(doc["components"]["schemas"][name].is_object(), "{name} is in components.schemas");
                seen += 1;
            }
        }
        assert!(seen >= 15, "the four sockets list their messages ({seen})");
    }

    /// The served document keeps exactly what the router serves, and says what it left out.
    #[test]
    fn served_document_matches_the_router() {
        let doc = document();
        assert_eq!(doc["info"]["version"], VERSION);
        let paths = doc["paths"].as_object().expect("paths");
        for (template, item) in paths {
            for (key, method) in METHOD_KEYS {
                if let Some(op) = item.get(*key) {
                    assert!(is_served(method, template, op), "{method} {template} is served");
                }
            }
        }
        for endpoint in router::endpoints() {
            let key = endpoint.method.as_str().to_ascii_lowercase();
            assert!(paths[endpoint.path][&key].is_object(), "{} {} is documented", endpoint.method, endpoint.path);
        }
        assert!(paths["/openapi.json"]["get"].is_object());
        assert!(paths["/whip/{sessionId}/{leg}"]["patch"].is_object(), "trickle ICE is documented");
        let source: Value = serde_json::from_str(SOURCE).expect("valid JSON");
        let total = |d: &Value| {
            d["paths"].as_object().expect("paths").values().map(|i| i.as_object().expect("item").len()).sum::<usize>()
        };
        let unserved = doc["info"][UNSERVED_EXTENSION].as_array().map_or(0, Vec::len);
        assert!(total(doc) + unserved <= total(&source) && total(doc) > 20);
    }

    /// Templates become routable paths.
    #[test]
    fn example_paths() {
        assert_eq!(example_path("/whip/{sessionId}/{leg}"), "/whip/sessionId1/leg1");
        assert_eq!(example_path("/health"), "/health");
        assert_eq!(example_path("/a/{b"), "/a/{b");
    }

    /// The page is self-contained: it loads `/openapi.json` and nothing from another origin.
    #[test]
    fn docs_page_is_self_contained() {
        assert!(DOCS_HTML.contains("fetch(\"/openapi.json\""));
        assert!(!DOCS_HTML.contains("http://") && !DOCS_HTML.contains("https://"));
        assert!(!DOCS_HTML.contains("<script src") && !DOCS_HTML.contains("<link"));
        let response = docs();
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
    }
}
