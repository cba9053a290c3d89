//! Method + path → route. 404 and 405 (with `Allow`) are decided here and nowhere else.
//!
//! Invariant: pure lookup over a static table; no allocation on the match path.

use http::Method;

/// An endpoint of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /health`.
    Health,
    /// `GET /health/detailed`.
    HealthDetailed,
    /// `GET /health/ready`: whether the node takes new calls (a balancer's health check).
    HealthReady,
    /// `POST /admin/drain`: stop taking new calls, keep serving live ones.
    AdminDrain,
    /// `POST /admin/undrain`: take new calls again.
    AdminUndrain,
    /// `GET /metrics` (Prometheus text exposition).
    Metrics,
    /// `POST /start-call`.
    StartCall,
    /// `POST /stop-call`.
    StopCall,
    /// `POST /mute`.
    Mute,
    /// `POST /unmute`.
    Unmute,
    /// `POST /send-custom-stream`.
    SendCustomStream,
    /// `POST /resume-microphone`.
    ResumeMicrophone,
    /// `GET /call-status`.
    CallStatus,
    /// `GET /track-status`.
    TrackStatus,
    /// `GET /ws` (WebSocket upgrade).
    Events,
    /// `POST /twilio/voice` (Twilio webhook).
    TwilioVoice,
    /// `POST /twilio/status` (Twilio status callback).
    TwilioStatus,
    /// `POST /twilio/transcription` (Twilio Real-Time Transcription callback).
    TwilioTranscription,
    /// `GET /twilio/stream` and `/twilio/stream/{callSid}` (Twilio Media Stream upgrade).
    TwilioStream,
    /// `GET /frontend-stream` (WebSocket upgrade).
    FrontendStream,
    /// `POST /outbound-call`.
    OutboundCall,
    /// `POST /end-call`.
    EndCall,
    /// `GET /llm-websocket/{call_id}` (Retell custom-LLM WebSocket upgrade).
    LlmSocket,
    /// `POST /whip/{sessionId}` (WHIP offer).
    Whip,
    /// `POST /whep/{sessionId}` (WHEP offer).
    Whep,
    /// `DELETE /whip/{sessionId}/{leg}` or `/whep/{sessionId}/{leg}`: end a WebRTC leg.
    RtcLeg,
    /// `PATCH /whip/{sessionId}/{leg}` or `/whep/{sessionId}/{leg}`: trickled ICE candidates or an
    /// ICE restart (RFC 9725 §4.3).
    RtcIce,
    /// `GET /analytics/project/{projectId}`: a project's call analytics (seed 003).
    Analytics,
    /// `GET /analytics/project/{projectId}/recent`: its most recent calls.
    AnalyticsRecent,
    /// `GET /analytics/project/{projectId}/statistics`: its calls per day in a date range.
    AnalyticsStatistics,
    /// `GET /openapi.json`: the OpenAPI 3.1 document.
    OpenApi,
    /// `GET /docs`: the HTML page rendering it.
    Docs,
    /// `GET /calls`: this node's live calls.
    Calls,
    /// `GET /console`: the operator's page (public: it holds no data, its API calls carry the key).
    Console,
}

/// Why a request has no route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// No endpoint has this path (404).
    NotFound,
    /// The path exists for other methods (405 with this `Allow` value).
    MethodNotAllowed(&'static str),
}

/// A path's methods: the route per method, and the `Allow` header value listing them.
struct Entry {
    path: &'static str,
    methods: &'static [(Method, Route)],
    allow: &'static str,
}

/// Every method the relay serves somewhere (the answer to `OPTIONS *`).
pub const ALL_METHODS: &str = "GET, HEAD, POST, PATCH, DELETE, OPTIONS";

const GET: &str = "GET, HEAD, OPTIONS";
const POST: &str = "POST, OPTIONS";
/// A WHIP/WHEP leg's resource (RFC 9725's session URL).
const LEG: &str = "PATCH, DELETE, OPTIONS";

static TABLE: &[Entry] = &[
    Entry { path: "/health", methods: &[(Method::GET, Route::Health)], allow: GET },
    Entry { path: "/health/detailed", methods: &[(Method::GET, Route::HealthDetailed)], allow: GET },
    Entry { path: "/health/ready", methods: &[(Method::GET, Route::HealthReady)], allow: GET },
    Entry { path: "/admin/drain", methods: &[(Method::POST, Route::AdminDrain)], allow: POST },
    Entry { path: "/admin/undrain", methods: &[(Method::POST, Route::AdminUndrain)], allow: POST },
    Entry { path: "/metrics", methods: &[(Method::GET, Route::Metrics)], allow: GET },
    Entry { path: "/start-call", methods: &[(Method::POST, Route::StartCall)], allow: POST },
    Entry { path: "/stop-call", methods: &[(Method::POST, Route::StopCall)], allow: POST },
    Entry { path: "/mute", methods: &[(Method::POST, Route::Mute)], allow: POST },
    Entry { path: "/unmute", methods: &[(Method::POST, Route::Unmute)], allow: POST },
    Entry { path: "/send-custom-stream", methods: &[(Method::POST, Route::SendCustomStream)], allow: POST },
    Entry { path: "/resume-microphone", methods: &[(Method::POST, Route::ResumeMicrophone)], allow: POST },
    Entry { path: "/call-status", methods: &[(Method::GET, Route::CallStatus)], allow: GET },
    Entry { path: "/track-status", methods: &[(Method::GET, Route::TrackStatus)], allow: GET },
    Entry { path: "/ws", methods: &[(Method::GET, Route::Events)], allow: GET },
    Entry { path: "/twilio/voice", methods: &[(Method::POST, Route::TwilioVoice)], allow: POST },
    Entry { path: "/twilio/status", methods: &[(Method::POST, Route::TwilioStatus)], allow: POST },
    Entry { path: "/twilio/transcription", methods: &[(Method::POST, Route::TwilioTranscription)], allow: POST },
    Entry { path: "/twilio/stream", methods: &[(Method::GET, Route::TwilioStream)], allow: GET },
    Entry { path: "/frontend-stream", methods: &[(Method::GET, Route::FrontendStream)], allow: GET },
    Entry { path: "/outbound-call", methods: &[(Method::POST, Route::OutboundCall)], allow: POST },
    Entry { path: "/end-call", methods: &[(Method::POST, Route::EndCall)], allow: POST },
    Entry { path: "/openapi.json", methods: &[(Method::GET, Route::OpenApi)], allow: GET },
    Entry { path: "/docs", methods: &[(Method::GET, Route::Docs)], allow: GET },
    Entry { path: "/calls", methods: &[(Method::GET, Route::Calls)], allow: GET },
    Entry { path: "/console", methods: &[(Method::GET, Route::Console)], allow: GET },
];

/// The route for `method` on `path`. `HEAD` is served wherever `GET` is.
///
/// # Errors
/// [`Miss`] saying whether the path is unknown or only the method is wrong.
pub fn route(method: &Method, path: &str) -> Result<Route, Miss> {
    let entry = entry(path).ok_or(Miss::NotFound)?;
    let wanted = if method == Method::HEAD { &Method::GET } else { method };
    entry.methods.iter().find(|(m, _)| m == wanted).map(|(_, r)| *r).ok_or(Miss::MethodNotAllowed(entry.allow))
}

/// The `Allow` value for `path`, if it exists (for `OPTIONS` and CORS preflights).
pub fn allow(path: &str) -> Option<&'static str> {
    entry(path).map(|e| e.allow)
}

/// Resources under a prefix: `prefix` then this many non-empty segments.
static PATTERNS: &[(&str, usize, Entry)] = &[
    (
        "/llm-websocket/",
        1,
        Entry { path: "/llm-websocket/{call_id}", methods: &[(Method::GET, Route::LlmSocket)], allow: GET },
    ),
    (
        "/twilio/stream/",
        1,
        Entry { path: "/twilio/stream/{callSid}", methods: &[(Method::GET, Route::TwilioStream)], allow: GET },
    ),
    ("/whip/", 1, Entry { path: "/whip/{sessionId}", methods: &[(Method::POST, Route::Whip)], allow: POST }),
    ("/whep/", 1, Entry { path: "/whep/{sessionId}", methods: &[(Method::POST, Route::Whep)], allow: POST }),
    (
        "/whip/",
        2,
        Entry {
            path: "/whip/{sessionId}/{leg}",
            methods: &[(Method::PATCH, Route::RtcIce), (Method::DELETE, Route::RtcLeg)],
            allow: LEG,
        },
    ),
    (
        "/whep/",
        2,
        Entry {
            path: "/whep/{sessionId}/{leg}",
            methods: &[(Method::PATCH, Route::RtcIce), (Method::DELETE, Route::RtcLeg)],
            allow: LEG,
        },
    ),
    (
        "/analytics/project/",
        1,
        Entry { path: "/analytics/project/{projectId}", methods: &[(Method::GET, Route::Analytics)], allow: GET },
    ),
    (
        "/analytics/project/",
        2,
        Entry {
            path: "/analytics/project/{projectId}/recent",
            methods: &[(Method::GET, Route::AnalyticsRecent)],
            allow: GET,
        },
    ),
    (
        "/analytics/project/",
        2,
        Entry {
            path: "/analytics/project/{projectId}/statistics",
            methods: &[(Method::GET, Route::AnalyticsStatistics)],
            allow: GET,
        },
    ),
];

fn entry(path: &str) -> Option<&'static Entry> {
    // A trailing slash names the same resource, as most HTTP routers treat it.
    let path = if path.len() > 1 { path.strip_suffix('/').unwrap_or(path) } else { path };
    TABLE.iter().find(|e| e.path == path).or_else(|| {
        PATTERNS.iter().find_map(|(prefix, segments, entry)| {
            let rest = path.strip_prefix(prefix)?;
            let ok = rest.split('/').count() == *segments && rest.split('/').all(|s| !s.is_empty());
            // Fixed segments of the template (`recent` in `{projectId}/recent`) must match as written.
            let template = entry.path.strip_prefix(prefix).unwrap_or_default();
            let fixed = template.split('/').zip(rest.split('/')).all(|(t, s)| t.starts_with('{') || t == s);
            (ok && fixed).then_some(entry)
        })
    })
}

/// One method on one path the router serves (`HEAD` is implied by `GET`, `OPTIONS` by any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// The path, with `{name}` for a pattern's segments (`/whip/{sessionId}/{leg}`), as OpenAPI
    /// writes path templates.
    pub path: &'static str,
    /// The method.
    pub method: &'static Method,
    /// Where it goes.
    pub route: Route,
}

/// Every path and method the router serves, fixed paths first (for the OpenAPI coverage checks).
pub fn endpoints() -> impl Iterator<Item = Endpoint> {
    TABLE.iter().chain(PATTERNS.iter().map(|(_, _, e)| e)).flat_map(|entry| {
        entry.methods.iter().map(move |(method, route)| Endpoint { path: entry.path, method, route: *route })
    })
}

/// The segments after a pattern route's prefix (`/whip/{sessionId}/{leg}` → `[sessionId, leg]`),
/// still percent-encoded.
pub fn segments(path: &str) -> Vec<&str> {
    let path = if path.len() > 1 { path.strip_suffix('/').unwrap_or(path) } else { path };
    path.trim_start_matches('/').split('/').skip(1).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WHIP or WHEP leg's resource takes PATCH (trickle ICE, ICE restart) and DELETE; the offer
    /// endpoint only POST, so PATCH there is a 405 naming POST.
    #[test]
    fn leg_resources() {
        for prefix in ["/whip", "/whep"] {
            assert_eq!(route(&Method::PATCH, &format!("{prefix}/s1/7")), Ok(Route::RtcIce));
            assert_eq!(route(&Method::DELETE, &format!("{prefix}/s1/7/")), Ok(Route::RtcLeg));
            assert_eq!(
                route(&Method::GET, &format!("{prefix}/s1/7")),
                Err(Miss::MethodNotAllowed("PATCH, DELETE, OPTIONS"))
            );
            assert_eq!(route(&Method::PATCH, &format!("{prefix}/s1")), Err(Miss::MethodNotAllowed("POST, OPTIONS")));
            assert_eq!(allow(&format!("{prefix}/s1/7")), Some("PATCH, DELETE, OPTIONS"));
        }
        assert!(ALL_METHODS.contains("PATCH"));
    }

    /// Each documented endpoint routes; HEAD follows GET; wrong methods list the right ones.
    #[test]
    fn table() {
        assert_eq!(route(&Method::GET, "/health"), Ok(Route::Health));
        assert_eq!(route(&Method::HEAD, "/health"), Ok(Route::Health));
        assert_eq!(route(&Method::POST, "/start-call"), Ok(Route::StartCall));
        assert_eq!(route(&Method::POST, "/start-call/"), Ok(Route::StartCall));
        assert_eq!(route(&Method::GET, "/call-status"), Ok(Route::CallStatus));
        assert_eq!(route(&Method::GET, "/ws"), Ok(Route::Events));
        assert_eq!(route(&Method::GET, "/start-call"), Err(Miss::MethodNotAllowed("POST, OPTIONS")));
        assert_eq!(route(&Method::POST, "/health"), Err(Miss::MethodNotAllowed("GET, HEAD, OPTIONS")));
        assert_eq!(route(&Method::HEAD, "/mute"), Err(Miss::MethodNotAllowed("POST, OPTIONS")));
        assert_eq!(route(&Method::GET, "/nope"), Err(Miss::NotFound));
        assert_eq!(route(&Method::GET, "/"), Err(Miss::NotFound));
        assert_eq!(route(&Method::GET, "/healthz"), Err(Miss::NotFound));
        assert_eq!(route(&Method::POST, "/whip/s1"), Ok(Route::Whip));
        assert_eq!(route(&Method::GET, "/twilio/stream/CA1"), Ok(Route::TwilioStream));
        assert_eq!(route(&Method::GET, "/twilio/stream"), Ok(Route::TwilioStream));
        assert_eq!(route(&Method::POST, "/twilio/stream/CA1"), Err(Miss::MethodNotAllowed(GET)));
        assert_eq!(route(&Method::POST, "/whep/s1/"), Ok(Route::Whep));
        assert_eq!(route(&Method::DELETE, "/whip/s1/7"), Ok(Route::RtcLeg));
        assert_eq!(route(&Method::PATCH, "/whip/s1/7"), Ok(Route::RtcIce));
        assert_eq!(route(&Method::GET, "/whip/s1"), Err(Miss::MethodNotAllowed("POST, OPTIONS")));
        assert_eq!(route(&Method::POST, "/whip/"), Err(Miss::NotFound));
        assert_eq!(route(&Method::POST, "/whip//x"), Err(Miss::NotFound));
        assert_eq!(route(&Method::POST, "/whip/a/b/c"), Err(Miss::NotFound));
        assert_eq!(segments("/whip/s1/7"), vec!["s1", "7"]);
        assert_eq!(route(&Method::GET, "/analytics/project/proj_1"), Ok(Route::Analytics));
        assert_eq!(route(&Method::GET, "/analytics/project/proj_1/recent"), Ok(Route::AnalyticsRecent));
        assert_eq!(route(&Method::HEAD, "/analytics/project/p/statistics/"), Ok(Route::AnalyticsStatistics));
        assert_eq!(route(&Method::GET, "/analytics/project/p/other"), Err(Miss::NotFound));
        assert_eq!(route(&Method::GET, "/analytics/project/recent/statistics"), Ok(Route::AnalyticsStatistics));
        assert_eq!(route(&Method::GET, "/analytics/project/"), Err(Miss::NotFound));
        assert_eq!(route(&Method::GET, "/analytics/project/p/recent/x"), Err(Miss::NotFound));
        assert_eq!(route(&Method::POST, "/analytics/project/p"), Err(Miss::MethodNotAllowed("GET, HEAD, OPTIONS")));
        assert_eq!(allow("/mute"), Some("POST, OPTIONS"));
        assert_eq!(allow("/whep/s1/7"), Some("PATCH, DELETE, OPTIONS"));
        assert_eq!(allow("/x"), None);
    }
}
