//! `GET /calls`: this node's live calls, gathered from every core through the mesh (each core
//! answers from its own state, the oldest `limit` at most) and merged into one bounded list; with
//! `?all=1` and a shared records database (`--records-url`), every node's calls that have not
//! ended, from their records.
//!
//! Invariant: never blocks a core (one read of each core's state, no input, no wait on a full
//! queue; the merge and the JSON on the blocking pool) and never shows a secret (no access token, no stream parameter, only ids, kinds, states
//! and counts).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Response, StatusCode};
use relay_engine::core::command::{CallSummary, CommandError, CoreCalls};
use relay_engine::session::LegCounts;
use relay_engine::shell::{CoreHandle, Request};
use serde_json::{json, Value};

use crate::api::params;
use crate::error::{json_response, ApiError};
use crate::records::{Records, StoredCall};

/// How far back `?all=1` looks for calls that have not ended: a record whose node died before it
/// could end it stays without an end, and is not listed after this long.
pub const CLUSTER_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Calls listed when the request names no `limit`.
pub const DEFAULT_LIMIT: usize = 100;
/// The largest `limit` a request may ask for: a node of 2 000 calls answers in one page of at
/// most this many (about 500 bytes each).
pub const MAX_LIMIT: usize = 1000;

/// The `limit` query parameter: 1 to [`MAX_LIMIT`], [`DEFAULT_LIMIT`] when absent.
///
/// # Errors
/// 400 when it is not a whole number in range.
pub fn limit(query: Option<&str>) -> Result<usize, ApiError> {
    match params::query(query, "limit") {
        None => Ok(DEFAULT_LIMIT),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(format!("limit must be a whole number from 1 to {MAX_LIMIT}"))),
        },
    }
}

/// Whether the request asks for every node's calls (`all=1` or `all=true`).
///
/// # Errors
/// 400 for another value.
pub fn all(query: Option<&str>) -> Result<bool, ApiError> {
    match params::query(query, "all").as_deref() {
        None | Some("0" | "false") => Ok(false),
        Some("1" | "true") => Ok(true),
        Some(_) => Err(ApiError::bad_request("all must be 1, true, 0 or false")),
    }
}

/// `GET /calls[?limit=][&all=1]`.
///
/// # Errors
/// 400 for a bad `limit` or `all`, or `all=1` without a shared records database; 503 when that
/// database cannot be read.
pub async fn list(core: &CoreHandle, records: &Records, request: &Request) -> Result<Response<Bytes>, ApiError> {
    let query = request.head.uri.query();
    let limit = limit(query)?;
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    if all(query)? {
        if records.shared().is_none() {
            return Err(ApiError::bad_request(
                "all=1 lists every node's calls from the shared records: start the relay with --records-url",
            ));
        }
        let since_ms = now_ms.saturating_sub(CLUSTER_WINDOW.as_millis() as u64);
        let (records, node) = (records.clone(), core.node_id().to_owned());
        return core
            .blocking(move || {
                let (calls, total) = records.live(since_ms, limit)?;
                Ok(json_response(StatusCode::OK, &render_cluster(&calls, total, limit, now_ms, &node)))
            })
            .await
            .map_err(|e: crate::records::Error| {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("the records database: {e}"))
            });
    }
    let answers = core.calls(limit).await;
    // Merging and serializing up to 1000 calls takes milliseconds: on the blocking pool, so the
    // core that took the request goes on moving its calls' frames meanwhile.
    let node = core.node_id().to_owned();
    Ok(core.blocking(move || json_response(StatusCode::OK, &render(answers, limit, now_ms, &node))).await)
}

/// The `?all=1` answer: every node's calls that have not ended, from their records.
pub fn render_cluster(calls: &[StoredCall], total: u64, limit: usize, now_ms: u64, node: &str) -> Value {
    let listed: Vec<Value> = calls
        .iter()
        .map(|c| {
            let started_ms = c.start_ms.unwrap_or(c.created_ms);
            json!({
                "id": c.id,
                "node": c.node,
                "status": c.status,
                "direction": c.direction,
                "projectId": c.project_id,
                "startedAt": iso(started_ms),
                "startedAtMs": started_ms,
                "durationMs": now_ms.saturating_sub(started_ms),
            })
        })
        .collect();
    json!({
        "scope": "cluster",
        "node": node,
        "generatedAt": iso(now_ms),
        "generatedAtMs": now_ms,
        "total": total,
        "limit": limit,
        "truncated": (listed.len() as u64) < total,
        "calls": listed,
    })
}

/// The answer from every core's reply: the oldest `limit` calls of all cores (by start time, then
/// id), how many there are, whether the list is cut, and the cores that did not answer.
pub fn render(answers: Vec<Result<CoreCalls, CommandError>>, limit: usize, now_ms: u64, node: &str) -> Value {
    let mut total = 0;
    let mut unavailable = Vec::new();
    let mut calls: Vec<(usize, CallSummary)> = Vec::new();
    for (i, answer) in answers.into_iter().enumerate() {
        match answer {
            Ok(core_calls) => {
                total += core_calls.total;
                let core = core_calls.core.0;
                calls.extend(core_calls.calls.into_iter().map(|c| (core, c)));
            }
            Err(_) => unavailable.push(i),
        }
    }
    calls.sort_unstable_by(|(_, a), (_, b)| (a.started_ms, &a.id).cmp(&(b.started_ms, &b.id)));
    calls.truncate(limit);
    let listed: Vec<Value> = calls.iter().map(|(core, c)| call(c, node, *core, now_ms)).collect();
    json!({
        "node": node,
        "generatedAt": iso(now_ms),
        "generatedAtMs": now_ms,
        "total": total,
        "limit": limit,
        "truncated": listed.len() < total,
        "unavailableCores": unavailable,
        "calls": listed,
    })
}

fn call(c: &CallSummary, node: &str, core: usize, now_ms: u64) -> Value {
    json!({
        "id": c.id.as_str(),
        "caller": c.caller.name(),
        "callerConnected": c.connected,
        "agent": c.agent.name(),
        "agentState": c.agent_state.name(),
        "node": node,
        "core": core,
        "startedAt": iso(c.started_ms),
        "startedAtMs": c.started_ms,
        "durationMs": now_ms.saturating_sub(c.started_ms),
        "legs": { "caller": leg(&c.counts.caller), "agent": leg(&c.counts.agent) },
        "microphoneEnabled": c.microphone_enabled,
        "customStream": c.custom_stream.as_ref().map(|s| s.as_str()),
        "listeners": c.listeners,
        "webrtcLegs": c.webrtc_legs,
    })
}

fn leg(counts: &LegCounts) -> Value {
    json!({ "framesIn": counts.frames_in, "framesOut": counts.frames_out, "dropped": counts.dropped })
}

/// `ms` since the epoch as ISO 8601 UTC with milliseconds.
fn iso(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_engine::core::command::{AgentKind, AgentState, CallerKind};
    use relay_engine::id::{CoreId, SessionId};
    use relay_engine::session::CallCounts;

    fn summary(id: &str, started_ms: u64) -> CallSummary {
        CallSummary {
            id: SessionId::parse(id).unwrap(),
            caller: CallerKind::Twilio,
            connected: true,
            agent: AgentKind::Bot,
            agent_state: AgentState::Open,
            started_ms,
            counts: CallCounts::default(),
            microphone_enabled: true,
            custom_stream: None,
            listeners: 0,
            webrtc_legs: 0,
        }
    }

    /// `all` takes 1/true/0/false (absent: this node only); anything else is a 400.
    #[test]
    fn all_is_a_flag() {
        assert!(!all(None).unwrap());
        assert!(all(Some("all=1")).unwrap());
        assert!(all(Some("limit=3&all=true")).unwrap());
        assert!(!all(Some("all=0")).unwrap());
        assert_eq!(all(Some("all=yes")).unwrap_err().status, StatusCode::BAD_REQUEST);
    }

    /// `limit` defaults to 100, takes 1 to 1000, and anything else is a 400.
    #[test]
    fn limit_is_bounded() {
        assert_eq!(limit(None).unwrap(), DEFAULT_LIMIT);
        assert_eq!(limit(Some("limit=1000")).unwrap(), 1000);
        assert_eq!(limit(Some("x=1&limit=7")).unwrap(), 7);
        for bad in ["limit=0", "limit=1001", "limit=-1", "limit=abc", "limit="] {
            assert_eq!(limit(Some(bad)).unwrap_err().status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    /// Calls of every core merge oldest first; past `limit` the list is cut and says so, and a core
    /// that did not answer is named instead of failing the answer.
    #[test]
    fn merges_cores_oldest_first_and_bounds() {
        let answers = vec![
            Ok(CoreCalls { core: CoreId(0), total: 3, calls: vec![summary("b", 20), summary("d", 40)] }),
            Err(CommandError::Busy),
            Ok(CoreCalls { core: CoreId(2), total: 1, calls: vec![summary("a", 20)] }),
        ];
        let v = render(answers, 2, 1_000, "n1");
        assert_eq!(v["total"], 4);
        assert_eq!(v["truncated"], true);
        assert_eq!(v["unavailableCores"], json!([1]));
        let ids: Vec<&str> = v["calls"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(v["calls"][0]["core"], 2);
        assert_eq!(v["calls"][0]["durationMs"], 980);
        assert_eq!(v["calls"][0]["startedAt"], "1970-01-01T00:00:00.020Z");
        assert_eq!(v["calls"][1]["legs"]["caller"], json!({ "framesIn": 0, "framesOut": 0, "dropped": 0 }));
    }
}
