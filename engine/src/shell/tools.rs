//! Runs a Realtime agent's function call: the signed POST to the tools server, as its own task on
//! the core's executor, and its answer (or failure) reported back to the core.
//!
//! Invariant: off the media path: the call's audio is routed by other inputs while this task
//! waits; one deadline (`--tools-timeout`) bounds the whole exchange.

use std::rc::Rc;

use super::clock;
use super::fetch::{self, FetchRequest};
use super::shared::CoreShared;
use crate::core::{ToolCall, ToolResult};
use crate::proto::tools;

/// POSTs `call` to the tools server and hands the outcome to the core.
pub(crate) async fn tool_task(shared: Rc<CoreShared>, call: ToolCall) {
    let ToolCall { session, conn, call_id, url, secret, timeout, body } = call;
    let timestamp_s = clock::now().unix_ms / 1000;
    let mut headers = vec![
        ("Content-Type".to_owned(), "application/json".to_owned()),
        (tools::TIMESTAMP_HEADER.to_owned(), timestamp_s.to_string()),
    ];
    if let Some(secret) = &secret {
        headers.push((
            tools::SIGNATURE_HEADER.to_owned(),
            tools::signature(secret.expose().as_bytes(), timestamp_s, &body),
        ));
    }
    let request = FetchRequest { method: "POST", url, headers, body };
    let outcome = match fetch::fetch_bounded(request, timeout, tools::MAX_ANSWER_BYTES).await {
        Ok(response) if (200..300).contains(&response.status) => {
            tools::parse_answer(&response.body).map_err(|e| e.to_string())
        }
        Ok(response) => Err(format!("the tools server answered {}", response.status)),
        Err(fetch::FetchError::Timeout) => {
            Err(format!("the tools server timed out (no answer within {} ms)", timeout.as_millis()))
        }
        Err(e) => Err(format!("the tools server could not be reached: {e}")),
    };
    if let Err(reason) = &outcome {
        tracing::info!(core = shared.id.0, session = %session, "tool call {call_id} failed: {reason}");
    }
    let now = shared.now();
    let result = ToolResult { session: session.clone(), conn, call_id, outcome };
    shared.drive(Some(&session), |state| state.handle_tool_result(now, result));
}
