//! The session-control endpoints of seeds 000/001: start, stop, mute, custom streams, status,
//! and the `/ws` event socket upgrade.
//!
//! Invariant: every command runs on the session's owner core (via `CoreHandle::dispatch`), and
//! every answer about a session names that core in `x-relay-core`.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use relay_engine::core::command::{Command, Reply, StartCall};
use relay_engine::core::Credential;
use relay_engine::id::SessionId;
use relay_engine::media::SampleRate;
use relay_engine::secret::Secret;
use relay_engine::shell::{CoreHandle, Request, SocketKind, Upgrade};
use serde_json::{json, Value};

use super::params::{self, Body};
use crate::config::ApiConfig;
use crate::error::{json_response, ApiError};

/// Header naming the core that owns the session a response is about.
pub const CORE_HEADER: &str = "x-relay-core";

/// `POST /start-call`.
///
/// # Errors
/// 400 for invalid fields, 409 when active, 503 when the owner core is full.
pub async fn start_call(core: &CoreHandle, request: &Request) -> Result<Response<Bytes>, ApiError> {
    let body = Body::parse(&request.body)?;
    let id = body.session_id()?;
    let access_token = Secret::new(body.string("accessToken")?);
    let sample_rate = match body.field("sampleRate") {
        None => SampleRate::DEFAULT,
        Some(v) => v
            .as_u64()
            .and_then(SampleRate::from_hz)
            .ok_or_else(|| ApiError::bad_request("sampleRate must be one of 8000, 16000, 24000, 48000"))?,
    };
    let emit_raw_audio_samples = match body.field("emitRawAudioSamples") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad_request("emitRawAudioSamples must be true or false")),
    };
    let command = Command::Start(StartCall { access_token, sample_rate, emit_raw_audio_samples });
    let data = json!({
        "sessionId": id.as_str(),
        "config": {
            "accessToken": "***",
            "sampleRate": sample_rate.hz(),
            "emitRawAudioSamples": emit_raw_audio_samples,
        },
    });
    run(core, id, command, |_| ("Call started successfully", data)).await
}

/// `POST /stop-call`.
///
/// # Errors
/// 400 for a bad id, 404 when unknown.
pub async fn stop_call(core: &CoreHandle, request: &Request) -> Result<Response<Bytes>, ApiError> {
    let id = Body::parse(&request.body)?.session_id()?;
    let data = json!({ "sessionId": id.as_str() });
    run(core, id, Command::Stop, |_| ("Call stopped successfully", data)).await
}

/// `POST /mute` (`enabled` false) and `POST /unmute` (true).
///
/// # Errors
/// 400 for a bad id, 404 when unknown.
pub async fn set_microphone(core: &CoreHandle, request: &Request, enabled: bool) -> Result<Response<Bytes>, ApiError> {
    let id = Body::parse(&request.body)?.session_id()?;
    let name = id.as_str().to_owned();
    let message = if enabled { "Microphone unmuted" } else { "Microphone muted" };
    run(core, id, Command::SetMicrophone(enabled), move |reply| {
        let enabled = matches!(reply, Reply::Microphone { enabled: true });
        (message, json!({ "sessionId": name, "microphoneEnabled": enabled }))
    })
    .await
}

/// `POST /send-custom-stream`.
///
/// # Errors
/// 400 for a bad id, stream id or kind; 404 when unknown.
pub async fn send_custom_stream(core: &CoreHandle, request: &Request) -> Result<Response<Bytes>, ApiError> {
    let body = Body::parse(&request.body)?;
    let id = body.session_id()?;
    let stream = params::stream_id(body.string("streamId")?, "streamId")?;
    match body.field("kind") {
        None => {}
        Some(Value::String(k)) if k == "audio" => {}
        Some(_) => return Err(ApiError::bad_request("kind must be \"audio\"")),
    }
    let data = json!({ "sessionId": id.as_str(), "streamId": stream.as_str() });
    run(core, id, Command::SendCustomStream(stream), |_| ("Custom stream sent", data)).await
}

/// `POST /resume-microphone`.
///
/// # Errors
/// 400 for a bad id, 404 when unknown.
pub async fn resume_microphone(core: &CoreHandle, request: &Request) -> Result<Response<Bytes>, ApiError> {
    let id = Body::parse(&request.body)?.session_id()?;
    let data = json!({ "sessionId": id.as_str() });
    run(core, id, Command::ResumeMicrophone, |_| ("Microphone resumed", data)).await
}

/// `GET /call-status?sessionId=`.
///
/// # Errors
/// 400 for a missing or bad id, 404 when unknown.
pub async fn call_status(core: &CoreHandle, request: &Request) -> Result<Response<Bytes>, ApiError> {
    let id = params::query_session(request.head.uri.query(), "sessionId")?;
    let name = id.as_str().to_owned();
    run(core, id, Command::CallStatus, move |reply| {
        let Reply::CallStatus(s) = reply else { return ("Call status retrieved", Value::Null) };
        let data = json!({
            "sessionId": name,
            "isActive": s.is_active,
            "isConnected": s.is_connected,
            "isAgentTalking": s.is_agent_talking,
            "hasWebSocket": s.has_web_socket,
        });
        ("Call status retrieved", data)
    })
    .await
}

/// `GET /track-status?sessionId=`.
///
/// # Errors
/// 400 for a missing or bad id, 404 when unknown.
pub async fn track_status(core: &CoreHandle, request: &Request) -> Result<Response<Bytes>, ApiError> {
    let id = params::query_session(request.head.uri.query(), "sessionId")?;
    run(core, id, Command::TrackStatus, |reply| {
        let Reply::TrackStatus(t) = reply else { return ("Track status retrieved", Value::Null) };
        let tracks: Vec<Value> = t
            .tracks
            .iter()
            .map(|tr| json!({ "sid": tr.sid, "kind": tr.kind, "name": tr.name, "source": tr.source }))
            .collect();
        let data = json!({ "microphoneEnabled": t.microphone_enabled, "totalTracks": tracks.len(), "publishedTracks": tracks });
        ("Track status retrieved", data)
    })
    .await
}

/// `GET /ws?sessionId=`: validates the upgrade; the engine completes it on the owner core.
///
/// On a relay without an API key the socket needs no token, as the seeds' servers did: their web
/// page opens `ws://HOST/ws?sessionId=X` before `/start-call`, and a browser's WebSocket cannot send
/// headers. Every other control endpoint of such a relay is open too, so a token would guard nothing
/// they do not already give away. A token that is presented is still checked.
///
/// # Errors
/// 400 for a bad id or handshake, 401 without a credential when an API key is configured, 426
/// for a plain GET or an unsupported version.
pub fn events(config: &ApiConfig, request: &Request) -> Result<Upgrade, ApiError> {
    let session = params::query_session(request.head.uri.query(), "sessionId")?;
    let accept = super::twilio::accept(request)?;
    let credential = match super::twilio::listener_credential(config, request)? {
        Credential::Anonymous if config.api_key.is_none() => Credential::Operator,
        presented => presented,
    };
    Ok(Upgrade {
        kind: SocketKind::Events,
        session: Some(session),
        session_fixed: false,
        credential,
        accept,
        guard: None,
        reject: None,
    })
}

/// `GET /llm-websocket/{call_id}`: Retell's custom-LLM socket, completed on the call's owner core
/// (the API key, when one is configured, was checked with the head).
///
/// # Errors
/// 400 for a bad call id or handshake, 426 for a plain GET.
pub fn llm_socket(request: &Request) -> Result<Upgrade, ApiError> {
    let segments = crate::router::segments(request.head.uri.path());
    let call = params::session_id(&params::decode(segments.first().copied().unwrap_or_default()), "call_id")?;
    let accept = super::twilio::accept(request)?;
    let credential = Credential::Operator;
    Ok(Upgrade {
        kind: SocketKind::Llm,
        session: Some(call),
        session_fixed: false,
        credential,
        accept,
        guard: None,
        reject: None,
    })
}

/// Runs `command` on the owner core and renders its reply with `render` (message, data).
async fn run(
    core: &CoreHandle,
    id: SessionId,
    command: Command,
    render: impl FnOnce(&Reply) -> (&'static str, Value),
) -> Result<Response<Bytes>, ApiError> {
    let owner = core.owner(&id);
    let name = id.as_str().to_owned();
    let result = core.dispatch(id, command).await;
    let mut response = match result {
        Ok(reply) => {
            let (message, data) = render(&reply);
            json_response(StatusCode::OK, &json!({ "success": true, "message": message, "data": data }))
        }
        Err(e) => ApiError::from_command(&e, &name).into_response(),
    };
    response.headers_mut().insert(CORE_HEADER, HeaderValue::from(owner.0));
    Ok(response)
}
