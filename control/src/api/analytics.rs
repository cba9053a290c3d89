//! Call analytics (seed 003): `GET /analytics/project/{projectId}`, `…/recent` and
//! `…/statistics`, answered from the records database.
//!
//! Invariant: no database access on a core's thread: every read runs on the executor's blocking
//! pool ([`CoreHandle::blocking`]); handlers validate everything before reading.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Response, StatusCode};
use relay_engine::shell::{CoreHandle, Request};

use super::params;
use crate::error::{json_response, ApiError};
use crate::records::time::{self, Bound, DAY_MS};
use crate::records::{query, Records};

/// The analytics routes' common prefix.
const PREFIX: &str = "/analytics/project/";
/// Days the overview covers when no range is given.
const DEFAULT_DAYS: u64 = 30;
/// Recent calls returned when no `limit` is given.
const DEFAULT_LIMIT: usize = 10;
/// Most recent calls returned; a larger `limit` gets this many.
const MAX_LIMIT: usize = 100;
/// Longest project id, bytes.
const MAX_PROJECT_BYTES: usize = 128;

/// `GET /analytics/project/{projectId}?startDate=&endDate=`: the project's overview over the
/// range (default: the last 30 days up to now).
///
/// # Errors
/// 400 for a bad project id or date, or a start after the end; 500 when the database fails.
pub async fn overview(core: &CoreHandle, records: &Records, request: &Request) -> Result<Response<Bytes>, ApiError> {
    let project = project_id(request)?;
    let query = request.head.uri.query();
    let start = date(query, "startDate", Bound::Start)?;
    // Without an end, the range runs to now (or is empty, when it starts later than now).
    let end = match date(query, "endDate", Bound::End)? {
        Some(end) => end,
        None => start.map_or_else(now_ms, |s| s.max(now_ms())),
    };
    let start = start.unwrap_or_else(|| end.saturating_sub(DEFAULT_DAYS * DAY_MS));
    check_order(start, end)?;
    let calls = {
        let (records, project) = (records.clone(), project.clone());
        core.blocking(move || records.summaries(&project, start, end)).await.map_err(db_error)?
    };
    let name = records.projects().name(&project);
    Ok(json_response(StatusCode::OK, &query::overview(&project, name, start, end, &calls)))
}

/// `GET /analytics/project/{projectId}/recent?limit=`: the newest calls first (default 10, at
/// most 100).
///
/// # Errors
/// 400 for a bad project id or a `limit` that is not a positive integer; 500 when the database
/// fails.
pub async fn recent(core: &CoreHandle, records: &Records, request: &Request) -> Result<Response<Bytes>, ApiError> {
    let project = project_id(request)?;
    let limit = match params::query(request.head.uri.query(), "limit") {
        None => DEFAULT_LIMIT,
        // Any positive integer, however long: past MAX_LIMIT it is clamped, as documented.
        Some(s) => match s.trim() {
            digits
                if !digits.is_empty()
                    && digits.bytes().all(|b| b.is_ascii_digit())
                    && digits.bytes().any(|b| b != b'0') =>
            {
                digits.parse::<usize>().unwrap_or(MAX_LIMIT).min(MAX_LIMIT)
            }
            _ => return Err(ApiError::bad_request(format!("limit must be an integer from 1 to {MAX_LIMIT}"))),
        },
    };
    let calls = {
        let records = records.clone();
        core.blocking(move || records.recent(&project, limit)).await.map_err(db_error)?
    };
    let calls: Vec<serde_json::Value> = calls.iter().map(query::recent_call).collect();
    Ok(json_response(StatusCode::OK, &serde_json::json!({ "calls": calls })))
}

/// `GET /analytics/project/{projectId}/statistics?startDate=&endDate=` (both required): totals
/// and calls per UTC day. A date without a time covers its whole day.
///
/// # Errors
/// 400 for a bad project id, a missing or invalid date, or a start after the end; 500 when the
/// database fails.
pub async fn statistics(core: &CoreHandle, records: &Records, request: &Request) -> Result<Response<Bytes>, ApiError> {
    let project = project_id(request)?;
    let query = request.head.uri.query();
    let (Some(start), Some(end)) = (date(query, "startDate", Bound::Start)?, date(query, "endDate", Bound::End)?)
    else {
        return Err(ApiError::bad_request("startDate and endDate are required (ISO 8601 dates)"));
    };
    check_order(start, end)?;
    let calls = {
        let records = records.clone();
        core.blocking(move || records.summaries(&project, start, end)).await.map_err(db_error)?
    };
    Ok(json_response(StatusCode::OK, &query::statistics(&calls)))
}

/// The `{projectId}` path segment, percent-decoded: 1–128 bytes without control characters.
fn project_id(request: &Request) -> Result<String, ApiError> {
    let path = request.head.uri.path();
    let raw = path.strip_prefix(PREFIX).and_then(|rest| rest.split('/').next()).unwrap_or_default();
    let id = params::decode(raw);
    if id.is_empty() || id.len() > MAX_PROJECT_BYTES || id.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "projectId must be 1 to {MAX_PROJECT_BYTES} bytes without control characters"
        )));
    }
    Ok(id)
}

/// Query parameter `name` as ms since the epoch, `None` when absent or empty.
fn date(query: Option<&str>, name: &str, bound: Bound) -> Result<Option<u64>, ApiError> {
    match params::query(query, name).filter(|v| !v.trim().is_empty()) {
        None => Ok(None),
        Some(v) => time::parse(&v, bound).map(Some).ok_or_else(|| {
            ApiError::bad_request(format!(
                "{name} must be an ISO 8601 date or date-time, such as 2025-01-15 or 2025-01-15T10:30:00Z"
            ))
        }),
    }
}

fn check_order(start: u64, end: u64) -> Result<(), ApiError> {
    if start > end {
        return Err(ApiError::bad_request("startDate must not be after endDate"));
    }
    Ok(())
}

/// A records database failure as the API answers it, logged: 503 while the shared database
/// cannot be reached (try again later), else 500.
pub(super) fn db_error(e: crate::records::Error) -> ApiError {
    if e.is_unavailable() {
        tracing::warn!("cannot read call records: {e}");
        let mut error = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the call-records database is unavailable right now; try again shortly",
        );
        error.retry_after = Some(5);
        return error;
    }
    tracing::error!("cannot read call records: {e}");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "call records cannot be read right now")
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
