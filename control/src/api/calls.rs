//! Outbound calls through Twilio's REST API and their records (seed 004): `/outbound-call`,
//! `/end-call`, `/call-status?callSid=&user_id=`.
//!
//! Invariant: call state comes from real events (Twilio's answers, stream start/stop, status
//! callbacks) stored on the call's owner core; nothing is invented here.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use relay_engine::core::command::{CallRecord, Command, CommandError, Direction, RecordUpdate, Reply};
use relay_engine::id::SessionId;
use relay_engine::proto::tools;
use relay_engine::shell::{CoreHandle, FetchRequest, Request};
use serde_json::{json, Value};

use super::handover::{self, Handover, MAX_TEXT_BYTES};
use super::params::{self, Body};
use crate::config::{ApiConfig, TwilioAccount};
use crate::error::{json_response, ApiError};
use crate::limits::UserLimits;
use crate::records::Records;

/// How long a Twilio REST request may take.
const TWILIO_TIMEOUT: Duration = Duration::from_secs(10);

/// `POST /outbound-call {"user_id","number","prompt","first_message","tools"}`: dials `number`
/// through Twilio, with the relay's `/twilio/voice` as the call's webhook. `tools` (declarations
/// as for `--agent-tools`) stay in the call's record on its owner core, which puts them in the
/// session of the call's Realtime agent instead of the relay's tools.
///
/// The call's user, prompt, first message, project, intent and tools also travel in the
/// webhook URL's query ([`Handover`]; the status callback's carries the user, project and intent),
/// so whichever relay node Twilio's webhook reaches briefs the call as this one would.
///
/// # Errors
/// 400 for missing or invalid fields or a webhook URL past Twilio's 4000 characters, 429 past 5
/// initiations a minute per user, 503 without Twilio credentials, 502 when Twilio refuses or
/// cannot be reached.
pub async fn outbound_call(
    core: &CoreHandle,
    config: &ApiConfig,
    users: &Arc<UserLimits>,
    request: &Request,
) -> Result<Response<Bytes>, ApiError> {
    let body = Body::parse(&request.body)?;
    let (Ok(user_id), Ok(number)) = (body.string("user_id"), body.string("number")) else {
        return Err(ApiError::bad_request("User ID and phone number are required"));
    };
    if user_id.len() > 128 {
        return Err(ApiError::bad_request("user_id must be at most 128 characters"));
    }
    if !is_e164(number) {
        return Err(ApiError::bad_request("number must be an E.164 phone number, such as +14155550123"));
    }
    let prompt = optional_text(&body, "prompt")?;
    let first_message = optional_text(&body, "first_message")?;
    let project_id = optional_label(&body, "projectId")?;
    let intent = optional_label(&body, "intent")?;
    let (tools, tools_json) = match body.field("tools") {
        None => (None, None),
        Some(v) => {
            let parsed = tools::parse_tools(v).map_err(|e| ApiError::bad_request(e.to_string()))?;
            (Some(parsed.into()), Some(handover::tools_json(v)))
        }
    };
    if core.draining() {
        // A new call: a draining node places none (its callSid is unknown until Twilio answers,
        // so the node's own cores cannot be asked).
        return Err(ApiError::draining());
    }
    let account = twilio_account(config)?;
    let base = super::twilio::http_base(config, &request.head.headers);
    let handover = Handover {
        user_id: user_id.to_owned(),
        prompt: prompt.clone(),
        first_message: first_message.clone(),
        project_id: project_id.clone(),
        intent: intent.clone(),
        tools: tools_json,
    };
    // Checked before the initiation counts: a refused URL places no call.
    let voice_url = handover.url(&base, "/twilio/voice")?;
    let owner = Handover {
        user_id: user_id.to_owned(),
        project_id: project_id.clone(),
        intent: intent.clone(),
        ..Handover::default()
    };
    let status_url = owner.url(&base, "/twilio/status")?;
    let initiated = match crate::limits::try_initiate(core, users, user_id).await {
        Ok(at) => at,
        Err(wait) => {
            let mut e =
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "at most 5 calls a minute may be initiated per user");
            e.retry_after = Some(wait.as_secs().max(1));
            return Err(e);
        }
    };
    let form = [
        ("To", number.to_owned()),
        ("From", account.from.clone()),
        ("Url", voice_url),
        ("Method", "POST".to_owned()),
        ("StatusCallback", status_url),
        ("StatusCallbackMethod", "POST".to_owned()),
        ("StatusCallbackEvent", "initiated".to_owned()),
        ("StatusCallbackEvent", "ringing".to_owned()),
        ("StatusCallbackEvent", "answered".to_owned()),
        ("StatusCallbackEvent", "completed".to_owned()),
    ];
    let url = format!("{}/2010-04-01/Accounts/{}/Calls.json", account.api_base, account.sid);
    let answer = match twilio_post(core, &account, url, &form).await {
        Ok(a) => a,
        Err(TwilioError::Refused(e)) => {
            // Twilio said no: no call was placed, so the attempt does not count. (Transport errors
            // and timeouts do count: the request may have reached Twilio and placed the call.)
            crate::limits::refund(core, users, user_id, initiated).await;
            return Err(e);
        }
        Err(TwilioError::Unreachable(e)) => return Err(e),
    };
    let call_sid = answer["sid"]
        .as_str()
        .and_then(|s| SessionId::parse(s).ok())
        .ok_or_else(|| ApiError::new(StatusCode::BAD_GATEWAY, "Twilio's answer has no valid call sid"))?;
    let update = RecordUpdate {
        user_id: Some(user_id.to_owned()),
        status: Some(answer["status"].as_str().unwrap_or("queued").to_owned()),
        from: Some(account.from.clone()),
        to: Some(number.to_owned()),
        prompt,
        first_message,
        project_id,
        intent,
        direction: Some(Direction::Outbound),
        tools,
        ..RecordUpdate::default()
    };
    record(core, &call_sid, update).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "success": true, "message": "Call initiated", "callSid": call_sid.as_str() }),
    ))
}

/// `POST /end-call {"callSid","user_id"}`: hangs the call up through Twilio.
///
/// # Errors
/// 400 for missing fields, 404 for a call this user did not initiate, 503 without Twilio
/// credentials, 502 when Twilio refuses.
pub async fn end_call(
    core: &CoreHandle,
    config: &ApiConfig,
    records: &Records,
    request: &Request,
) -> Result<Response<Bytes>, ApiError> {
    let body = Body::parse(&request.body)?;
    let (Ok(call_sid), Ok(user_id)) = (body.string("callSid"), body.string("user_id")) else {
        return Err(ApiError::bad_request("callSid and user_id are required"));
    };
    let id = params::session_id(call_sid, "callSid")?;
    owned_record(core, records, &id, user_id).await?;
    let account = twilio_account(config)?;
    let url = format!("{}/2010-04-01/Accounts/{}/Calls/{}.json", account.api_base, account.sid, id);
    twilio_post(core, &account, url, &[("Status", "completed".to_owned())]).await.map_err(TwilioError::into_api)?;
    // The stream ends when Twilio hangs up; ending the session now stops media at once.
    let _ = core.dispatch(id.clone(), Command::Stop).await;
    record(core, &id, RecordUpdate { status: Some("completed".into()), ..RecordUpdate::default() }).await?;
    Ok(json_response(StatusCode::OK, &json!({ "success": true, "message": "Call ended successfully" })))
}

/// `GET /call-status?callSid=&user_id=` (seed 004's shape).
///
/// # Errors
/// 400 for missing ids, 404 for an unknown call or another user's call.
pub async fn call_status(core: &CoreHandle, records: &Records, request: &Request) -> Result<Response<Bytes>, ApiError> {
    let query = request.head.uri.query();
    let id = params::query_session(query, "callSid")?;
    let user = params::query(query, "user_id")
        .filter(|u| !u.is_empty())
        .ok_or_else(|| ApiError::bad_request("query parameter user_id is required"))?;
    let r = owned_record(core, records, &id, &user).await?;
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let body = json!({
        "success": true,
        "callSid": id.as_str(),
        "status": r.status,
        "startTime": r.start_ms.map(rfc3339),
        "endTime": r.end_ms.map(rfc3339),
        "duration": r.duration_at(now_ms),
    });
    let mut response = json_response(StatusCode::OK, &body);
    response.headers_mut().insert(super::session::CORE_HEADER, HeaderValue::from(core.owner(&id).0));
    Ok(response)
}

/// Updates (or creates) the record of `id` on its owner core.
///
/// # Errors
/// 503 when the owner core does not answer.
pub async fn record(core: &CoreHandle, id: &SessionId, update: RecordUpdate) -> Result<CallRecord, ApiError> {
    match core.dispatch(id.clone(), Command::Record(Box::new(update))).await {
        Ok(Reply::Record(r)) => Ok(*r),
        Ok(_) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "unexpected reply for a call record")),
        Err(e) => Err(ApiError::from_command(&e, id.as_str())),
    }
}

/// The record of `id` when `user` may see it: their own outbound call, or an inbound call (no user).
///
/// A record the owner core holds without a user may have been made again by a late status
/// callback after the original left memory (a restart, or the per-core cap): the stored record
/// then says whose call it is. A call this node does not hold at all may be another node's
/// (a cluster sharing `--records-url`) or have left memory: the stored record answers.
async fn owned_record(
    core: &CoreHandle,
    records: &Records,
    id: &SessionId,
    user: &str,
) -> Result<CallRecord, ApiError> {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, format!("call {id} not found"));
    let r = match core.dispatch(id.clone(), Command::ReadRecord).await {
        Ok(Reply::Record(r)) => *r,
        Ok(_) | Err(CommandError::NotFound) => {
            let (records, key) = (records.clone(), id.as_str().to_owned());
            let stored = core.blocking(move || records.get(&key)).await.map_err(super::analytics::db_error)?;
            return match stored {
                Some(call) if call.user_id.as_deref().is_none_or(|owner| owner == user) => Ok(call.into_record()),
                _ => Err(not_found()),
            };
        }
        Err(e) => return Err(ApiError::from_command(&e, id.as_str())),
    };
    let owner = match &r.user_id {
        Some(owner) => Some(owner.clone()),
        None => {
            let (records, key) = (records.clone(), id.as_str().to_owned());
            let stored = core.blocking(move || records.get(&key)).await.map_err(super::analytics::db_error)?;
            stored.and_then(|c| c.user_id)
        }
    };
    match owner {
        Some(owner) if owner != user => Err(not_found()),
        _ => Ok(r),
    }
}

/// Why a request to Twilio's REST API failed.
enum TwilioError {
    /// Twilio answered, refusing (non-2xx): nothing was done.
    Refused(ApiError),
    /// Twilio could not be reached or did not answer in time: the request may have been applied.
    Unreachable(ApiError),
}

impl TwilioError {
    fn into_api(self) -> ApiError {
        match self {
            Self::Refused(e) | Self::Unreachable(e) => e,
        }
    }
}

/// POSTs `form` to Twilio with Basic auth and returns its JSON answer.
async fn twilio_post(
    core: &CoreHandle,
    account: &TwilioAccount,
    url: String,
    form: &[(&str, String)],
) -> Result<Value, TwilioError> {
    let auth =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", account.sid, account.auth_token.expose()));
    let body = form.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&");
    let request = FetchRequest {
        method: "POST",
        url,
        headers: vec![
            ("authorization".to_owned(), format!("Basic {auth}")),
            ("content-type".to_owned(), "application/x-www-form-urlencoded".to_owned()),
            ("accept".to_owned(), "application/json".to_owned()),
        ],
        body: Bytes::from(body),
    };
    let response = core.fetch(request, TWILIO_TIMEOUT).await.map_err(|e| {
        TwilioError::Unreachable(ApiError::new(StatusCode::BAD_GATEWAY, format!("cannot reach Twilio: {e}")))
    })?;
    let answer: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    if !(200..300).contains(&response.status) {
        let why = answer["message"].as_str().unwrap_or("no message");
        let message = format!("Twilio refused the request ({}): {why}", response.status);
        return Err(TwilioError::Refused(ApiError::new(StatusCode::BAD_GATEWAY, message)));
    }
    Ok(answer)
}

fn twilio_account(config: &ApiConfig) -> Result<TwilioAccount, ApiError> {
    config.twilio.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "outbound calls are not configured: set --twilio-account-sid, --twilio-auth-token and --twilio-from",
        )
    })
}

fn optional_text(body: &Body, name: &str) -> Result<Option<String>, ApiError> {
    match body.field(name) {
        None => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_TEXT_BYTES => Ok(Some(s.clone())),
        Some(Value::String(_)) => Err(ApiError::bad_request(format!("{name} must be at most {MAX_TEXT_BYTES} bytes"))),
        Some(_) => Err(ApiError::bad_request(format!("{name} must be a string"))),
    }
}

/// An optional short label (`projectId`, `intent`): a non-empty string of at most 128 bytes.
fn optional_label(body: &Body, name: &str) -> Result<Option<String>, ApiError> {
    match body.field(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if handover::is_label(s) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::bad_request(format!("{name} must be a string of 1 to 128 bytes"))),
    }
}

/// `+` then 7 to 15 digits, the first not zero.
fn is_e164(number: &str) -> bool {
    let Some(digits) = number.strip_prefix('+') else { return false };
    (7..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0')
}

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// E.164: a plus, 7–15 digits, no leading zero.
    #[test]
    fn e164() {
        for ok in ["+14155550123", "+4930123456", "+1234567"] {
            assert!(is_e164(ok), "{ok}");
        }
        for bad in ["14155550123", "+0123456789", "+1 415 555", "+12", "+1234567890123456", "+1415555012a", ""] {
            assert!(!is_e164(bad), "{bad}");
        }
    }
}
