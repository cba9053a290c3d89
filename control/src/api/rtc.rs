//! WHIP (RFC 9725) and WHEP: WebRTC legs from SDP offers, and `DELETE` on their resources.
//!
//! Invariant: the offer is checked here for what HTTP can tell (type, size, UTF-8, ids, role); the
//! SDP itself is judged by the session's owner core, which answers with its own UDP candidate.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use relay_engine::core::command::{Command, Reply, RtcOffer, RtcRole};
use relay_engine::core::Credential;
use relay_engine::shell::{CoreHandle, Request};
use serde_json::json;

use super::params;
use super::session::CORE_HEADER;
use crate::auth;
use crate::config::ApiConfig;
use crate::error::{json_response, ApiError};
use crate::router;

/// Which kind of offer endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `POST /whip/{sessionId}`: publish.
    Whip,
    /// `POST /whep/{sessionId}`: listen.
    Whep,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Self::Whip => "/whip",
            Self::Whep => "/whep",
        }
    }
}

/// `POST /whip/{sessionId}?role=caller|agent|custom&streamId=` and `POST /whep/{sessionId}`.
///
/// # Errors
/// 400 for a bad id, role or offer; 401 without the session's token; 404 for an unknown session;
/// 409 when the role is taken; 415 when the body is not `application/sdp`; 503 when full.
pub async fn offer(
    core: &CoreHandle,
    config: &ApiConfig,
    request: &Request,
    kind: Kind,
) -> Result<Response<Bytes>, ApiError> {
    let path = request.head.uri.path();
    let segments = router::segments(path);
    let id = params::session_id(&params::decode(segments.first().copied().unwrap_or_default()), "sessionId")?;
    let query = request.head.uri.query();
    let role = match kind {
        Kind::Whep => RtcRole::Listener,
        Kind::Whip => match params::query(query, "role").as_deref() {
            None | Some("caller") => RtcRole::Caller,
            Some("agent") => RtcRole::Agent,
            Some("custom") => match params::query(query, "streamId") {
                Some(s) if !s.is_empty() => RtcRole::Custom(params::stream_id(&s, "streamId")?),
                _ => return Err(ApiError::bad_request("role=custom needs a streamId query parameter")),
            },
            Some(_) => return Err(ApiError::bad_request("role must be caller, agent or custom")),
        },
    };
    let content_type = request.head.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/sdp") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the offer must be sent with Content-Type: application/sdp",
        ));
    }
    let sdp =
        std::str::from_utf8(&request.body).map_err(|_| ApiError::bad_request("the SDP offer is not UTF-8"))?.to_owned();
    if sdp.trim().is_empty() {
        return Err(ApiError::bad_request("the SDP offer is empty"));
    }
    let credential = media_credential(config, request)?;
    let owner = core.owner(&id);
    let name = id.as_str().to_owned();
    let command = Command::RtcOffer(Box::new(RtcOffer { role, sdp, credential }));
    let mut response = match core.dispatch(id.clone(), command).await {
        Ok(Reply::RtcAnswer { leg, sdp }) => {
            let mut r = Response::new(Bytes::from(sdp));
            *r.status_mut() = StatusCode::CREATED;
            let location =
                format!("{}{}/{}/{leg}", config.public_url.as_deref().unwrap_or(""), kind.prefix(), id.as_str());
            let headers = r.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/sdp"));
            if let Ok(v) = HeaderValue::from_str(&location) {
                headers.insert(header::LOCATION, v);
            }
            if let Ok(v) = HeaderValue::from_str(&format!("\"{name}-{leg}\"")) {
                headers.insert(header::ETAG, v);
            }
            r
        }
        Ok(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "unexpected reply").into_response(),
        Err(e) => ApiError::from_command(&e, &name).into_response(),
    };
    response.headers_mut().insert(CORE_HEADER, HeaderValue::from(owner.0));
    Ok(response)
}

/// `DELETE /whip/{sessionId}/{leg}` (and `/whep/…`): ends the leg.
///
/// # Errors
/// 400 for a bad id, 401 without the session's token, 404 for an unknown session or leg.
pub async fn delete(core: &CoreHandle, config: &ApiConfig, request: &Request) -> Result<Response<Bytes>, ApiError> {
    let segments = router::segments(request.head.uri.path());
    let id = params::session_id(&params::decode(segments.first().copied().unwrap_or_default()), "sessionId")?;
    let leg: u64 = segments
        .get(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no such WebRTC leg in this session"))?;
    let credential = media_credential(config, request)?;
    let owner = core.owner(&id);
    let name = id.as_str().to_owned();
    let mut response = match core.dispatch(id, Command::RtcEnd { leg, credential }).await {
        Ok(_) => json_response(
            StatusCode::OK,
            &json!({ "success": true, "message": "WebRTC leg ended", "data": { "sessionId": name, "leg": leg } }),
        ),
        Err(e) => ApiError::from_command(&e, &name).into_response(),
    };
    response.headers_mut().insert(CORE_HEADER, HeaderValue::from(owner.0));
    Ok(response)
}

/// What a media-leg request presents: the session's token or the API key (`Authorization:
/// Bearer`). Nothing is enough only for a session without a token on a relay without an API key.
fn media_credential(config: &ApiConfig, request: &Request) -> Result<Credential, ApiError> {
    let credential = auth::credential(config.api_key.as_ref(), &request.head.headers, None);
    if config.api_key.is_some() && matches!(credential, Credential::Anonymous) {
        return Err(ApiError::unauthorized("send Authorization: Bearer <the session's accessToken>"));
    }
    Ok(credential)
}
