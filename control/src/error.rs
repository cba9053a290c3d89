//! API errors: one status per variant of API.md, rendered as `{"success":false,"error":…}`.
//!
//! Invariant: error messages are sentences for the client and never contain secrets.

use bytes::Bytes;
use http::header::HeaderName;
use http::{header, HeaderValue, Response, StatusCode};
use relay_engine::core::command::DRAIN_RETRY_AFTER_SECS;
use relay_engine::error::CommandError;

/// An error answer: status plus a sentence, and any headers the status requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong, for the client.
    pub message: String,
    /// Headers the status requires (`Allow` for 405, `Upgrade` for 426).
    pub headers: Vec<(HeaderName, &'static str)>,
    /// Seconds for `Retry-After` (429, 503); 1 when unset.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), headers: Vec::new(), retry_after: None }
    }

    /// 400: the request is malformed or a field is missing or invalid.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 401: credentials missing or wrong.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    /// 404 for a path with no endpoint.
    pub fn no_route(method: &http::Method, path: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("no endpoint {method} {path}"))
    }

    /// 405 with the methods the path accepts.
    pub fn method_not_allowed(method: &http::Method, path: &str, allow: &'static str) -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: format!("{method} is not allowed on {path}; use {}", allow.trim_end_matches(", OPTIONS")),
            headers: vec![(header::ALLOW, allow)],
            retry_after: None,
        }
    }

    /// 426: the endpoint is a WebSocket; names the protocol and version to use.
    pub fn upgrade_required(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UPGRADE_REQUIRED,
            message: message.into(),
            headers: vec![(header::UPGRADE, "websocket"), (header::SEC_WEBSOCKET_VERSION, "13")],
            retry_after: None,
        }
    }

    /// The error for a failed session command.
    pub fn from_command(error: &CommandError, session: &str) -> Self {
        let status = match error {
            CommandError::NotFound => StatusCode::NOT_FOUND,
            CommandError::AlreadyActive => StatusCode::CONFLICT,
            CommandError::CoreFull { .. }
            | CommandError::Busy
            | CommandError::ShuttingDown
            | CommandError::Draining => StatusCode::SERVICE_UNAVAILABLE,
            CommandError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            CommandError::Unauthorized => StatusCode::UNAUTHORIZED,
            CommandError::Conflict(_) => StatusCode::CONFLICT,
            CommandError::BadOffer(_) => StatusCode::BAD_REQUEST,
            CommandError::LegNotFound => StatusCode::NOT_FOUND,
            CommandError::PreconditionRequired => StatusCode::PRECONDITION_REQUIRED,
            CommandError::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            CommandError::BadFragment(_) => StatusCode::BAD_REQUEST,
            CommandError::Limit(_) | CommandError::RtcDisabled => StatusCode::SERVICE_UNAVAILABLE,
        };
        let message = match error {
            CommandError::NotFound => format!("session {session} not found"),
            CommandError::AlreadyActive => format!("session {session} is already active"),
            other => other.to_string(),
        };
        // A draining node's refusal: the retry goes to another node, soon.
        let retry_after = (*error == CommandError::Draining).then_some(DRAIN_RETRY_AFTER_SECS);
        Self { retry_after, ..Self::new(status, message) }
    }

    /// 503 for a new call on a draining node, with its `Retry-After`.
    pub fn draining() -> Self {
        Self::from_command(&CommandError::Draining, "")
    }

    /// The HTTP response.
    pub fn into_response(self) -> Response<Bytes> {
        let body = serde_json::json!({ "success": false, "error": self.message });
        let mut response = json_response(self.status, &body);
        for (name, value) in self.headers {
            response.headers_mut().insert(name, HeaderValue::from_static(value));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE || self.status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(self.retry_after.unwrap_or(1)));
        }
        response
    }
}

/// A JSON response with `status`.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
