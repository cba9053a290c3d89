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
    /// `GET /twilio/stream` (Twilio Media Stream upgrade).
    TwilioStream,
    /// `GET /frontend-stream` (WebSocket upgrade).
    FrontendStream,
    /// `POST /outbound-call`.
    OutboundCall,
    /// `POST /end-call`.
    EndCall,
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
pub const ALL_METHODS: &str = "GET, HEAD, POST, OPTIONS";

const GET: &str = "GET, HEAD, OPTIONS";
const POST: &str = "POST, OPTIONS";

static TABLE: &[Entry] = &[
    Entry { path: "/health", methods: &[(Method::GET, Route::Health)], allow: GET },
    Entry { path: "/health/detailed", methods: &[(Method::GET, Route::HealthDetailed)], allow: GET },
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

fn entry(path: &str) -> Option<&'static Entry> {
    // A trailing slash names the same resource, as most HTTP routers treat it.
    let path = if path.len() > 1 { path.strip_suffix('/').unwrap_or(path) } else { path };
    TABLE.iter().find(|e| e.path == path)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(allow("/mute"), Some("POST, OPTIONS"));
        assert_eq!(allow("/x"), None);
    }
}
