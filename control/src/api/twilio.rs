//! Twilio's side of a call (seeds 003/004): the voice webhook (TwiML), status callbacks, the
//! Media Stream upgrade, and `/frontend-stream` listeners.
//!
//! Invariant: when a Twilio auth token is configured, nothing here acts on a request whose
//! X-Twilio-Signature does not verify.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use relay_engine::core::command::{Command, CommandError, RecordUpdate, Reply, Speaker, Transcript};
use relay_engine::core::Credential;
use relay_engine::id::SessionId;
use relay_engine::proto::ws;
use relay_engine::shell::{CoreHandle, Request, SocketKind, Upgrade};
use serde_json::json;

use super::handover::{self, Handover};
use super::{calls, params};
use crate::auth;
use crate::config::ApiConfig;
use crate::error::{json_response, ApiError};
use crate::limits::UserLimits;
use crate::twilio::{field, parse_form, signature, twiml};

/// `POST /twilio/voice`: answers Twilio's incoming-call webhook with `<Connect><Stream>`, passing
/// the call's id, numbers, the webhook's `agentUrl` query parameter and, for outbound calls, the
/// agent's `prompt` and `first_message` as stream parameters. Records the call as in progress.
///
/// An outbound call's webhook URL carries its hand-over ([`Handover`]: user, prompt, first
/// message, project, intent, tools) in its query, covered by Twilio's signature: the call's record
/// is seeded from it on this node's owner core before the TwiML is written, so the node that
/// serves the call need not be the one that dialled it.
///
/// # Errors
/// 403 for a bad signature, 400 without a valid `CallSid` or with a hand-over field out of bounds.
pub async fn voice(core: &CoreHandle, config: &ApiConfig, request: &Request) -> Result<Response<Bytes>, ApiError> {
    let (form, id) = signed_call(config, request)?;
    admit(core, &id).await?;
    let call_sid = id.as_str();
    let query = request.head.uri.query();
    let mut update = match Handover::from_query(query)? {
        Some(handover) => handover.record_update(),
        // `?projectId=` / `?intent=` on the webhook URL configured at Twilio, as `agentUrl`.
        None => {
            let label = |name: &str| params::query(query, name).filter(|v| handover::is_label(v));
            RecordUpdate { project_id: label("projectId"), intent: label("intent"), ..RecordUpdate::default() }
        }
    };
    update.from = field(&form, "From").map(bounded_number);
    update.to = field(&form, "To").map(bounded_number);
    let record = calls::record(core, &id, update).await?;
    // The call's key in the path (Twilio allows no query string on stream URLs): a balancer in
    // front of several relays routes the stream to the node of the call's other legs.
    let stream_url = format!("{}/twilio/stream/{call_sid}", ws_base(config, &request.head.headers));
    let agent_url = params::query(request.head.uri.query(), "agentUrl");
    let mut parameters = vec![("callSid", call_sid)];
    for (name, key) in [("from", "From"), ("to", "To")] {
        if let Some(v) = field(&form, key) {
            parameters.push((name, v));
        }
    }
    if let Some(url) = agent_url.as_deref().filter(|u| !u.is_empty()) {
        parameters.push(("agentUrl", url));
    }
    for (name, value) in [
        ("prompt", &record.prompt),
        ("first_message", &record.first_message),
        ("user_id", &record.user_id),
        ("projectId", &record.project_id),
        ("intent", &record.intent),
    ] {
        if let Some(v) = value {
            parameters.push((name, v));
        }
    }
    // Binds the stream Twilio opens to this call: its upgrade signature covers only the URL.
    let relay_sig =
        config.twilio_auth_token.as_ref().map(|t| relay_engine::proto::twilio::stream_signature(t, id.as_str()));
    if let Some(sig) = relay_sig.as_deref() {
        parameters.push(("relaySig", sig));
    }
    let callback = config
        .twilio_transcription
        .then(|| format!("{}/twilio/transcription", http_base(config, &request.head.headers)));
    let mut response = Response::new(Bytes::from(twiml::connect_stream(&stream_url, &parameters, callback.as_deref())));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/xml"));
    Ok(response)
}

/// Refuses a leg that would begin call `id` while the node drains and its owner core does not
/// know the call (503 with `Retry-After`); a node that is not draining asks nothing.
///
/// # Errors
/// 503 while draining, for a call the node does not know (or whose core did not answer).
pub async fn admit(core: &CoreHandle, id: &SessionId) -> Result<(), ApiError> {
    if !core.draining() {
        return Ok(());
    }
    match core.dispatch(id.clone(), Command::Admit).await {
        Ok(_) => Ok(()),
        Err(e) => Err(ApiError::from_command(&e, id.as_str())),
    }
}

/// `POST /twilio/status`: a status callback; updates the call's record (status, duration). An
/// outbound call's callback URL names its user, project and intent ([`Handover`]), so the node
/// that receives it knows whose call it is even before (or without) the voice webhook.
///
/// # Errors
/// 403 for a bad signature, 400 without `CallSid` or `CallStatus`.
pub async fn status(core: &CoreHandle, config: &ApiConfig, request: &Request) -> Result<Response<Bytes>, ApiError> {
    let (form, id) = signed_call(config, request)?;
    let status = field(&form, "CallStatus")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::bad_request("CallStatus is required"))?;
    if !CALL_STATUSES.contains(&status) {
        return Err(ApiError::bad_request("CallStatus is not one of Twilio's call statuses"));
    }
    let mut update = Handover::from_query(request.head.uri.query())?.map(|h| h.record_update()).unwrap_or_default();
    update.status = Some(status.to_owned());
    update.duration_secs = field(&form, "CallDuration").and_then(|d| d.parse().ok());
    calls::record(core, &id, update).await?;
    Ok(json_response(StatusCode::OK, &json!({ "success": true })))
}

/// `POST /twilio/transcription`: Twilio Real-Time Transcription callbacks. Final
/// `transcription-content` events become a transcript of the call (caller = `inbound_track`);
/// partial results and the other events are acknowledged and ignored.
///
/// # Errors
/// 403 for a bad signature, 400 without `CallSid` or with unreadable `TranscriptionData`.
pub async fn transcription(
    core: &CoreHandle,
    config: &ApiConfig,
    request: &Request,
) -> Result<Response<Bytes>, ApiError> {
    let (form, id) = signed_call(config, request)?;
    let content = field(&form, "TranscriptionEvent") == Some("transcription-content");
    let partial = field(&form, "Final").is_some_and(|f| f.eq_ignore_ascii_case("false"));
    if content && !partial {
        let data: serde_json::Value = serde_json::from_str(field(&form, "TranscriptionData").unwrap_or("{}"))
            .map_err(|_| ApiError::bad_request("TranscriptionData is not JSON"))?;
        let text = data["transcript"].as_str().unwrap_or_default().trim();
        if !text.is_empty() {
            let speaker = if field(&form, "Track") == Some("outbound_track") { Speaker::Agent } else { Speaker::User };
            let transcript = Transcript { speaker, text: text.chars().take(4096).collect() };
            // A transcript for a call that already ended is acknowledged all the same: Twilio
            // would only retry it.
            let _ = core.dispatch(id, Command::Transcript(Box::new(transcript))).await;
        }
    }
    Ok(json_response(StatusCode::OK, &json!({ "success": true })))
}

/// `GET /twilio/stream`: the caller's Media Stream. The session comes from its `start` message;
/// `?callSid=` is the fallback.
///
/// # Errors
/// 403 for a bad signature, 400/426 for a bad handshake.
pub fn stream(config: &ApiConfig, request: &Request) -> Result<Upgrade, ApiError> {
    verify(config, request, &[])?;
    let accept = accept(request)?;
    // `/twilio/stream/{callSid}` (the TwiML's form: a balancer routes by the path) names the call
    // for good; `?callSid=` (seed 003's clients) only when the `start` names none.
    let in_path = request.head.uri.path().strip_prefix("/twilio/stream/").map(|s| s.trim_end_matches('/'));
    let (session, session_fixed) = match in_path.filter(|s| !s.is_empty()) {
        Some(s) => (Some(params::session_id(&params::decode(s), "callSid")?), true),
        None => match params::query(request.head.uri.query(), "callSid").filter(|s| !s.is_empty()) {
            Some(s) => (Some(params::session_id(&s, "callSid")?), false),
            None => (None, false),
        },
    };
    Ok(Upgrade {
        kind: SocketKind::Caller,
        session,
        session_fixed,
        credential: Credential::Operator,
        accept,
        guard: None,
        reject: None,
    })
}

/// `GET /frontend-stream?callSid=&user_id=`: a listener for the call's audio and transcripts, at
/// most `frontend_sockets_per_user` at once per user (close 1008 past it).
///
/// # Errors
/// 400 for missing ids, 401 without a credential when an API key is configured, 400/426 for a
/// bad handshake.
pub async fn frontend(
    core: &CoreHandle,
    config: &ApiConfig,
    limits: &Arc<UserLimits>,
    request: &Request,
) -> Result<Upgrade, ApiError> {
    let query = request.head.uri.query();
    let session = params::query_session(query, "callSid")?;
    let user = params::query(query, "user_id")
        .filter(|u| !u.is_empty())
        .ok_or_else(|| ApiError::bad_request("query parameter user_id is required"))?;
    if user.len() > 128 {
        return Err(ApiError::bad_request("user_id must be at most 128 characters"));
    }
    let credential = listener_credential(config, request)?;
    let accept = accept(request)?;
    // An outbound call is its initiator's: other users may not listen to it.
    // (This stops honest mistakes; the user id is the client's own claim, so it is not access
    // control: the credential above is.)
    match core.dispatch(session.clone(), Command::ReadRecord).await {
        Ok(Reply::Record(record)) if record.user_id.as_deref().is_some_and(|owner| owner != user) => {
            return Err(ApiError::new(StatusCode::NOT_FOUND, format!("call {session} not found")));
        }
        Ok(_) | Err(CommandError::NotFound) => {}
        Err(e) => return Err(ApiError::from_command(&e, session.as_str())),
    }
    let (guard, reject) = match crate::limits::acquire_socket(core, limits, &user).await {
        Some(g) => (Some(Box::new(g) as Box<dyn std::any::Any + Send>), None),
        None => (None, Some((1008, "too many concurrent connections for this user"))),
    };
    Ok(Upgrade {
        kind: SocketKind::Frontend,
        session: Some(session),
        session_fixed: false,
        credential,
        accept,
        guard,
        reject,
    })
}

/// A listener's credential: the API key or a session token (bearer or `?accessToken=`). Without
/// either, only a relay with no API key lets it through (as anonymous).
///
/// # Errors
/// 401 when an API key is configured and the request carries no credential.
pub fn listener_credential(config: &ApiConfig, request: &Request) -> Result<Credential, ApiError> {
    let query = request.head.uri.query();
    let token = params::query(query, "accessToken").or_else(|| params::query(query, "token")).filter(|t| !t.is_empty());
    let credential = auth::credential(config.api_key.as_ref(), &request.head.headers, token);
    if config.api_key.is_some() && matches!(credential, Credential::Anonymous) {
        return Err(ApiError::unauthorized("an access token or the API key is required"));
    }
    Ok(credential)
}

/// The `Sec-WebSocket-Accept` for a valid upgrade request.
///
/// # Errors
/// 426 for a plain GET or an unsupported version, 400 for a bad key.
pub fn accept(request: &Request) -> Result<String, ApiError> {
    let head = &request.head;
    if !ws::wants_upgrade(&head.headers) {
        return Err(ApiError::upgrade_required("this endpoint is a WebSocket: connect with Upgrade: websocket"));
    }
    ws::accept_key(head).map_err(|e| match e {
        ws::HandshakeError::Version => ApiError::upgrade_required(e.to_string()),
        other => ApiError::new(other.status(), other.to_string()),
    })
}

/// A Twilio webhook's form, once its signature checks out, and the call it names (`CallSid`).
fn signed_call(config: &ApiConfig, request: &Request) -> Result<(Vec<(String, String)>, SessionId), ApiError> {
    let form = parse_form(&request.body);
    verify(config, request, &form)?;
    let call_sid = field(&form, "CallSid")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::bad_request("CallSid is required"))?;
    let id = params::session_id(call_sid, "CallSid")?;
    Ok((form, id))
}

/// Twilio's call statuses (its `CallStatus` values).
const CALL_STATUSES: &[&str] = &[
    "queued",
    "initiated",
    "ringing",
    "in-progress",
    "answered",
    "completed",
    "busy",
    "failed",
    "no-answer",
    "canceled",
];

/// A phone number or client name as stored: at most 64 bytes (E.164 needs 16).
fn bounded_number(s: &str) -> String {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Checks X-Twilio-Signature when an auth token is configured.
fn verify(config: &ApiConfig, request: &Request, form: &[(String, String)]) -> Result<(), ApiError> {
    let Some(token) = &config.twilio_auth_token else { return Ok(()) };
    let provided = request.head.headers.get("x-twilio-signature").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let urls = candidate_urls(config, request);
    if !provided.is_empty() && signature::verify(token, provided, &urls, form) {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::FORBIDDEN, "invalid or missing X-Twilio-Signature"))
    }
}

/// The URLs Twilio may have signed: the public URL (when configured) or the request's Host, under
/// each scheme Twilio uses (https for webhooks, wss for streams; http/ws for plain deployments).
fn candidate_urls(config: &ApiConfig, request: &Request) -> Vec<String> {
    let path = request.head.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut hosts = Vec::new();
    if let Some(public) = &config.public_url {
        if let Some((_, authority)) = public.split_once("://") {
            hosts.push(authority.trim_end_matches('/').to_owned());
        }
    }
    if let Some(host) = request.head.headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
        hosts.push(host.to_owned());
    }
    let mut urls = Vec::new();
    for host in &hosts {
        for scheme in ["https", "wss", "http", "ws"] {
            urls.push(format!("{scheme}://{host}{path}"));
        }
    }
    urls
}

/// `https://host` (or `http://`) under which Twilio reaches the relay's webhooks.
pub(crate) fn http_base(config: &ApiConfig, headers: &HeaderMap) -> String {
    if let Some(public) = &config.public_url {
        return public.clone();
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    let tls = headers.get("x-forwarded-proto").is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"));
    format!("{}://{host}", if tls { "https" } else { "http" })
}

/// `wss://host` (or `ws://` for a plain-HTTP deployment) under which Twilio reaches the relay.
fn ws_base(config: &ApiConfig, headers: &HeaderMap) -> String {
    if let Some(public) = &config.public_url {
        if let Some(rest) = public.strip_prefix("https://") {
            return format!("wss://{rest}");
        }
        if let Some(rest) = public.strip_prefix("http://") {
            return format!("ws://{rest}");
        }
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    let tls = headers.get("x-forwarded-proto").is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"));
    format!("{}://{host}", if tls { "wss" } else { "ws" })
}
