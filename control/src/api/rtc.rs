//! WHIP (RFC 9725) and WHEP: WebRTC legs from SDP offers, `PATCH` (trickled candidates, ICE
//! restarts) and `DELETE` on their resources.
//!
//! Invariant: the offer is checked here for what HTTP can tell (type, size, UTF-8, ids, role), and
//! a trickle-ICE fragment and its `If-Match` are parsed here; the SDP itself, the entity-tag and
//! the ICE session are judged by the session's owner core, which answers with its own candidate.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use relay_engine::core::command::{Command, IceRestart, IfMatch, Reply, RtcOffer, RtcPatch, RtcRole};
use relay_engine::core::Credential;
use relay_engine::rtc::sdpfrag::IceFragment;
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
        Ok(Reply::RtcAnswer { leg, sdp, etag }) => {
            let mut r = Response::new(Bytes::from(sdp));
            *r.status_mut() = StatusCode::CREATED;
            let location =
                format!("{}{}/{}/{leg}", config.public_url.as_deref().unwrap_or(""), kind.prefix(), id.as_str());
            let headers = r.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/sdp"));
            if let Ok(v) = HeaderValue::from_str(&location) {
                headers.insert(header::LOCATION, v);
            }
            if let Ok(v) = HeaderValue::from_str(&format!("\"{etag}\"")) {
                headers.insert(header::ETAG, v);
            }
            headers.insert(ACCEPT_PATCH, HeaderValue::from_static(SDPFRAG));
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

/// `PATCH /whip/{sessionId}/{leg}` (and `/whep/…`) with an `application/trickle-ice-sdpfrag`
/// body (RFC 9725 §4.3): 204 when candidates were added, 200 with the relay's answer fragment and
/// a new `ETag` for an ICE restart.
///
/// # Errors
/// 400 for a bad id, fragment or `If-Match`; 401 without the session's token; 404 for an unknown
/// session or leg; 412 when `If-Match` names another ICE session; 415 for another content type;
/// 428 without `If-Match`.
pub async fn patch(core: &CoreHandle, config: &ApiConfig, request: &Request) -> Result<Response<Bytes>, ApiError> {
    let segments = router::segments(request.head.uri.path());
    let id = params::session_id(&params::decode(segments.first().copied().unwrap_or_default()), "sessionId")?;
    let leg: u64 = segments
        .get(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no such WebRTC leg in this session"))?;
    let content_type = request.head.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case(SDPFRAG) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a PATCH on a WebRTC leg must be sent with Content-Type: application/trickle-ice-sdpfrag",
        ));
    }
    let text =
        std::str::from_utf8(&request.body).map_err(|_| ApiError::bad_request("the SDP fragment is not UTF-8"))?;
    let fragment = IceFragment::parse(text).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let if_match = if_match(&request.head.headers)?;
    let credential = media_credential(config, request)?;
    let owner = core.owner(&id);
    let name = id.as_str().to_owned();
    let command = Command::RtcPatch(Box::new(RtcPatch { leg, fragment, if_match, credential }));
    let mut response = match core.dispatch(id, command).await {
        Ok(Reply::RtcPatched { restart: None }) => {
            let mut r = Response::new(Bytes::new());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        Ok(Reply::RtcPatched { restart: Some(IceRestart { fragment, etag }) }) => {
            let mut r = Response::new(Bytes::from(fragment));
            let headers = r.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(SDPFRAG));
            if let Ok(v) = HeaderValue::from_str(&format!("\"{etag}\"")) {
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

/// The media type of trickle-ICE fragments (RFC 8840).
pub const SDPFRAG: &str = "application/trickle-ice-sdpfrag";

/// `Accept-Patch` (RFC 5789 §3.1): what a leg's resource takes in a `PATCH`.
pub const ACCEPT_PATCH: header::HeaderName = header::HeaderName::from_static("accept-patch");

/// The most entity-tags one `If-Match` may list.
const MAX_IF_MATCH_TAGS: usize = 16;

/// The request's `If-Match` (RFC 9110 §13.1.1), all its field lines together: `*`, or a list of
/// entity-tags of which only the strong ones can match.
///
/// # Errors
/// 400 when it is not `*` or a list of quoted entity-tags, or lists more than 16.
pub fn if_match(headers: &http::HeaderMap) -> Result<Option<IfMatch>, ApiError> {
    let bad = || ApiError::bad_request("If-Match must be * or a list of quoted entity-tags (\"…\")");
    let mut lines = headers.get_all(header::IF_MATCH).iter().peekable();
    if lines.peek().is_none() {
        return Ok(None);
    }
    let mut tags = Vec::new();
    let mut any = false;
    for line in lines {
        let line = line.to_str().map_err(|_| bad())?;
        for item in line.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            if item == "*" {
                any = true;
                continue;
            }
            let (weak, quoted) = match item.strip_prefix("W/") {
                Some(rest) => (true, rest),
                None => (false, item),
            };
            let opaque = quoted.strip_prefix('"').and_then(|q| q.strip_suffix('"')).ok_or_else(bad)?;
            if opaque.contains('"') {
                return Err(bad());
            }
            if tags.len() >= MAX_IF_MATCH_TAGS {
                return Err(ApiError::bad_request(format!("If-Match lists more than {MAX_IF_MATCH_TAGS} entity-tags")));
            }
            // Strong comparison: a weak tag never matches, so it is dropped.
            if !weak {
                tags.push(opaque.to_owned());
            }
        }
    }
    match (any, tags.is_empty()) {
        (true, true) => Ok(Some(IfMatch::Any)),
        (true, false) => Err(bad()),
        (false, _) => Ok(Some(IfMatch::Tags(tags))),
    }
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

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::*;

    fn headers(values: &[&'static str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::IF_MATCH, HeaderValue::from_static(v));
        }
        h
    }

    /// If-Match: absent, `*`, strong tags over several lines; weak tags kept out of the list.
    #[test]
    fn if_match_forms() {
        assert_eq!(if_match(&headers(&[])).expect("ok"), None);
        assert_eq!(if_match(&headers(&["*"])).expect("ok"), Some(IfMatch::Any));
        assert_eq!(
            if_match(&headers(&["\"a\", W/\"b\"", "\"c\""])).expect("ok"),
            Some(IfMatch::Tags(vec!["a".into(), "c".into()]))
        );
        let weak = if_match(&headers(&["W/\"a\""])).expect("ok").expect("present");
        assert!(!weak.matches("a"), "a weak tag never matches (strong comparison)");
        assert!(IfMatch::Any.matches("anything"));
        assert!(IfMatch::Tags(vec!["x".into()]).matches("x"));
        assert!(!IfMatch::Tags(vec!["x".into()]).matches("y"));
    }

    /// Malformed If-Match values and over-long lists are 400s.
    #[test]
    fn if_match_refusals() {
        for bad in [&["abc"][..], &["\"a"], &["\"a\"b\""], &["*, \"a\""], &["W/abc"]] {
            let e = if_match(&headers(bad)).expect_err("refused");
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad:?}");
        }
        let many = vec!["\"t\""; MAX_IF_MATCH_TAGS + 1];
        assert_eq!(if_match(&headers(&many)).expect_err("refused").status, StatusCode::BAD_REQUEST);
    }
}
