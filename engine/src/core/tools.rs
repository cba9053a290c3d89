//! Function calls of a Realtime agent leg: which tools its session declares, a finished call
//! checked (declared name, JSON arguments, a free slot) and handed to the shell as
//! [`Output::CallTool`], and the webhook's answer sent back to the model as the call's output, then
//! `response.create`. Every call counts in the call record; an answer may set the call's intent.
//!
//! Invariant: sans-IO; a call is started once per `call_id`, and the call's audio never waits for
//! one (the shell runs it as its own task and reports through [`CoreState::handle_tool_result`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};

use super::{CoreState, Output};
use crate::id::{ConnectionId, SessionId};
use crate::proto::events::RetellEvent;
use crate::proto::realtime;
use crate::proto::tools::{self, Answer, Tool};
use crate::secret::Secret;
use crate::session::Agent;
use crate::time::Now;

/// Call ids remembered per session to start each call once (the oldest are forgotten past it).
const SEEN_CALLS: usize = 64;

/// A function call for the shell to POST to the tools server, then report with
/// [`CoreState::handle_tool_result`].
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The call (session) it belongs to.
    pub session: SessionId,
    /// The Realtime agent leg that made it.
    pub conn: ConnectionId,
    /// The model's id for the call.
    pub call_id: String,
    /// Where to POST (`--tools-url`).
    pub url: String,
    /// Key of the `X-Relay-Signature` HMAC.
    pub secret: Option<Secret>,
    /// How long the whole request may take.
    pub timeout: Duration,
    /// The JSON body ([`tools::request_body`]); the shell adds the timestamp and signature.
    pub body: Bytes,
}

/// What became of a [`ToolCall`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolResult {
    /// The call (session).
    pub session: SessionId,
    /// The agent leg that made the call.
    pub conn: ConnectionId,
    /// The model's id for the call.
    pub call_id: String,
    /// The tools server's answer, or why there is none (non-2xx, bad body, transport, timeout).
    pub outcome: Result<Answer, String>,
}

/// Function call counts of one core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ToolStats {
    /// Function calls models made (each `call_id` once), refused ones included.
    pub calls: u64,
    /// Calls that ended with an error output: the tools server failed, timed out or answered
    /// badly, the arguments were not JSON, no server is configured, or too many were running.
    pub failed: u64,
    /// Calls of a tool the session did not declare (answered with an error, never POSTed).
    pub refused: u64,
}

/// One Realtime leg's tools: what it declared and the calls it made.
#[derive(Debug)]
pub(super) struct SessionTools {
    /// The agent leg.
    conn: ConnectionId,
    declared: Arc<[Tool]>,
    /// Calls POSTed and not yet answered.
    in_flight: usize,
    /// Recent call ids, so a repeated event does not run a call twice.
    seen: VecDeque<String>,
}

impl CoreState {
    /// Uses `settings` for Realtime agents' tools: the declared list and the webhook.
    #[must_use]
    pub fn with_tools(mut self, settings: crate::config::ToolSettings) -> Self {
        self.tools = settings;
        self
    }

    /// The tools a new Realtime leg `conn` of session `id` declares, as `session.update` lists
    /// them: the call's own (from `/outbound-call`) or else the relay's.
    pub(super) fn realtime_tools(&mut self, id: &SessionId, conn: ConnectionId) -> Vec<Value> {
        let declared =
            self.records.get(id).and_then(|r| r.tools.clone()).unwrap_or_else(|| self.tools.declared.clone());
        let list = declared.iter().map(tools::session_tool).collect();
        self.tool_calls.insert(id.clone(), SessionTools { conn, declared, in_flight: 0, seen: VecDeque::new() });
        list
    }

    /// The model finished a function call: start it once, or answer it with an error at once.
    pub(super) fn realtime_function_call(
        &mut self,
        now: Now,
        id: &SessionId,
        conn: ConnectionId,
        call_id: String,
        name: String,
        arguments: &str,
    ) {
        let Some(state) = self.tool_calls.get_mut(id).filter(|s| s.conn == conn) else { return };
        if state.seen.contains(&call_id) {
            return;
        }
        if state.seen.len() >= SEEN_CALLS {
            state.seen.pop_front();
        }
        state.seen.push_back(call_id.clone());
        let declared = state.declared.iter().any(|t| t.name == name);
        let busy = state.in_flight >= self.tools.concurrent_per_session;
        self.stats.tools.calls += 1;
        if let Some(r) = self.records.get_mut(id) {
            r.function_calls += 1;
            self.emit_record(id);
        }
        self.broadcast(now, id, RetellEvent::Update, json!({ "functionCall": { "name": name, "callId": call_id } }));
        let refusal = if !declared {
            self.stats.tools.refused += 1;
            Some(format!("unknown tool {name:?}"))
        } else {
            None
        };
        let arguments = serde_json::from_str::<Value>(arguments);
        let failure = match (&arguments, &self.tools.url) {
            _ if refusal.is_some() => None,
            (Err(_), _) => Some("the arguments are not valid JSON".to_owned()),
            (_, None) => Some("no tools server is configured".to_owned()),
            _ if busy => Some("too many tool calls are running for this call".to_owned()),
            _ => None,
        };
        if failure.is_some() {
            self.stats.tools.failed += 1;
        }
        if let Some(message) = refusal.or(failure) {
            return self.tool_output(id, conn, &call_id, &tools::error_output(&message));
        }
        let (Ok(arguments), Some(url)) = (arguments, self.tools.url.clone()) else { return };
        if let Some(state) = self.tool_calls.get_mut(id) {
            state.in_flight += 1;
        }
        let body = Bytes::from(tools::request_body(id.as_str(), &call_id, &name, &arguments));
        self.outputs.push_back(Output::CallTool(Box::new(ToolCall {
            session: id.clone(),
            conn,
            call_id,
            url,
            secret: self.tools.secret.clone(),
            timeout: self.tools.timeout,
            body,
        })));
    }

    /// A tool call ended: its output (or error) goes to the model, which is asked to respond; an
    /// answer's intent becomes the call's.
    pub fn handle_tool_result(&mut self, now: Now, result: ToolResult) {
        let ToolResult { session: id, conn, call_id, outcome } = result;
        if let Some(state) = self.tool_calls.get_mut(&id).filter(|s| s.conn == conn) {
            state.in_flight = state.in_flight.saturating_sub(1);
        }
        let output = match outcome {
            Ok(Answer { output, intent }) => {
                if let Some(intent) = intent {
                    let update = super::command::RecordUpdate { intent: Some(intent), ..Default::default() };
                    if self.records.contains_key(&id) {
                        self.update_record(now, &id, update);
                        self.emit_record(&id);
                    }
                }
                output
            }
            Err(message) => {
                self.stats.tools.failed += 1;
                let data = json!({ "message": format!("tool call failed: {message}"), "source": "tools" });
                self.broadcast(now, &id, RetellEvent::Error, data);
                tools::error_output(&message)
            }
        };
        self.tool_output(&id, conn, &call_id, &output);
    }

    /// Sends a call's output and `response.create` on the agent leg, if it is still the session's.
    fn tool_output(&mut self, id: &SessionId, conn: ConnectionId, call_id: &str, output: &str) {
        let open = self
            .slots
            .get(id)
            .and_then(|s| s.session.as_ref())
            .is_some_and(|s| matches!(s.agent, Agent::Open { conn: c, .. } if c == conn));
        if open {
            self.send(conn, realtime::function_call_output(call_id, output));
            self.send(conn, realtime::response_create());
        }
    }
}
