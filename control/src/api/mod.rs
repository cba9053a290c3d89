//! The API service: routes a request, checks credentials and CORS, and runs its handler.
//!
//! Invariant: decide, then act: handlers parse and validate into typed commands before anything
//! reaches a core, and every failure is an [`ApiError`] rendered with the JSON envelope.

pub mod analytics;
pub mod calls;
pub mod calls_list;
pub mod console;
pub mod handover;
pub mod openapi;
pub mod ops;
pub mod params;
pub mod rtc;
pub mod session;
pub mod twilio;

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use relay_engine::proto::http::RequestHead;
use relay_engine::shell::{ControlService, CoreHandle, Outcome, Request};

use crate::auth;
use crate::config::ApiConfig;
use crate::cors;
use crate::error::ApiError;
use crate::limits::UserLimits;
use crate::probe::DataDirHealth;
use crate::records::Records;
use crate::router::{self, Miss, Route};

/// The control plane's implementation of the engine's [`ControlService`]; one clone per core.
#[derive(Clone)]
pub struct Service {
    config: Arc<ApiConfig>,
    data_dir: Arc<DataDirHealth>,
    users: Arc<UserLimits>,
    records: Records,
    /// The records store's counters, for `/metrics`.
    store_stats: Arc<crate::records::StoreStats>,
}

impl Service {
    /// A service with `config`, reporting the data directory's health from `data_dir`,
    /// answering analytics from `records`, exporting the store's counters (`store_stats`) and
    /// counting per-user limits in `users`.
    pub fn new(
        config: ApiConfig,
        data_dir: Arc<DataDirHealth>,
        records: Records,
        store_stats: Arc<crate::records::StoreStats>,
        users: Arc<UserLimits>,
    ) -> Self {
        Self { config: Arc::new(config), data_dir, users, records, store_stats }
    }

    async fn dispatch(&self, core: &CoreHandle, route: Route, request: &Request) -> Result<Outcome, ApiError> {
        let respond = |r: Result<Response<Bytes>, ApiError>| r.map(Outcome::Respond);
        match route {
            Route::Health => respond(Ok(ops::health(core))),
            Route::HealthReady => respond(Ok(ops::ready(core))),
            Route::AdminDrain => respond(Ok(ops::drain(core, true))),
            Route::AdminUndrain => respond(Ok(ops::drain(core, false))),
            Route::Metrics => {
                let mut r = Response::new(Bytes::from(crate::metrics::render(core, &self.store_stats)));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                respond(Ok(r))
            }
            Route::HealthDetailed => {
                respond(Ok(ops::health_detailed(core, &self.data_dir, &self.store_stats, self.config.twilio.is_some())))
            }
            Route::OpenApi => respond(Ok(openapi::openapi_json())),
            Route::Docs => respond(Ok(openapi::docs())),
            Route::Console => respond(Ok(console::page())),
            Route::Calls => respond(calls_list::list(core, &self.records, request).await),
            Route::StartCall => respond(session::start_call(core, request).await),
            Route::StopCall => respond(session::stop_call(core, request).await),
            Route::Mute => respond(session::set_microphone(core, request, false).await),
            Route::Unmute => respond(session::set_microphone(core, request, true).await),
            Route::SendCustomStream => respond(session::send_custom_stream(core, request).await),
            Route::ResumeMicrophone => respond(session::resume_microphone(core, request).await),
            Route::CallStatus
                if params::query(request.head.uri.query(), "sessionId").is_none()
                    && params::query(request.head.uri.query(), "callSid").is_some() =>
            {
                respond(calls::call_status(core, &self.records, request).await)
            }
            Route::CallStatus => respond(session::call_status(core, request).await),
            Route::OutboundCall => respond(calls::outbound_call(core, &self.config, &self.users, request).await),
            Route::EndCall => respond(calls::end_call(core, &self.config, &self.records, request).await),
            Route::TrackStatus => respond(session::track_status(core, request).await),
            Route::Events => session::events(&self.config, request).map(Outcome::Upgrade),
            Route::TwilioVoice => respond(twilio::voice(core, &self.config, request).await),
            Route::TwilioStatus => respond(twilio::status(core, &self.config, request).await),
            Route::TwilioTranscription => respond(twilio::transcription(core, &self.config, request).await),
            Route::TwilioStream => {
                let upgrade = twilio::stream(&self.config, request)?;
                if let (true, Some(id)) = (upgrade.session_fixed, &upgrade.session) {
                    // The path names the call: a draining node refuses a call it does not know
                    // before the 101, so a balancer can send the stream elsewhere.
                    twilio::admit(core, id).await?;
                }
                Ok(Outcome::Upgrade(upgrade))
            }
            Route::LlmSocket => session::llm_socket(request).map(Outcome::Upgrade),
            Route::Whip => respond(rtc::offer(core, &self.config, request, rtc::Kind::Whip).await),
            Route::Whep => respond(rtc::offer(core, &self.config, request, rtc::Kind::Whep).await),
            Route::RtcLeg => respond(rtc::delete(core, &self.config, request).await),
            Route::RtcIce => respond(rtc::patch(core, &self.config, request).await),
            Route::Analytics => respond(analytics::overview(core, &self.records, request).await),
            Route::AnalyticsRecent => respond(analytics::recent(core, &self.records, request).await),
            Route::AnalyticsStatistics => respond(analytics::statistics(core, &self.records, request).await),
            Route::FrontendStream => {
                twilio::frontend(core, &self.config, &self.users, request).await.map(Outcome::Upgrade)
            }
        }
    }
}

impl Service {
    /// The route for a (non-`OPTIONS`) request, or the answer it gets from its head alone: 404,
    /// 405 with `Allow`, or 401 without the API key.
    fn gate(&self, head: &RequestHead) -> Result<Route, ApiError> {
        let path = head.uri.path();
        let route = match router::route(&head.method, path) {
            Ok(route) => route,
            Err(Miss::NotFound) => return Err(ApiError::no_route(&head.method, path)),
            Err(Miss::MethodNotAllowed(allow)) => return Err(ApiError::method_not_allowed(&head.method, path, allow)),
        };
        // /health answers load balancers without credentials, and the API's description
        // (/openapi.json, /docs) is public; listeners check session tokens;
        // Twilio's endpoints check its signatures when a Twilio auth token is configured (else
        // they need the API key like everything else, when one is set).
        let twilio = matches!(
            route,
            Route::TwilioVoice | Route::TwilioStatus | Route::TwilioStream | Route::TwilioTranscription
        );
        // WebRTC legs present the session's access token (checked by the owner core).
        let open = matches!(
            route,
            Route::Health
                | Route::HealthReady
                | Route::OpenApi
                | Route::Docs
                | Route::Console
                | Route::Events
                | Route::FrontendStream
                | Route::Whip
                | Route::Whep
                | Route::RtcLeg
                | Route::RtcIce
        ) || (twilio && self.config.twilio_auth_token.is_some());
        if !open && !auth::has_api_key(self.config.api_key.as_ref(), &head.headers) {
            return Err(ApiError::unauthorized("a valid API key is required: send Authorization: Bearer <key>"));
        }
        Ok(route)
    }
}

impl ControlService for Service {
    async fn handle(&self, core: &CoreHandle, request: Request) -> Outcome {
        let head = &request.head;
        let path = head.uri.path();
        let mut outcome = if head.method == Method::OPTIONS {
            match router::allow(path).or_else(|| (path == "*").then_some(router::ALL_METHODS)) {
                Some(allow) => {
                    let mut response = cors::options(&self.config.cors, &head.headers, allow);
                    // RFC 5789 §3.1: a resource that takes PATCH says which bodies.
                    if allow.contains("PATCH") && path != "*" {
                        response.headers_mut().insert(rtc::ACCEPT_PATCH, http::HeaderValue::from_static(rtc::SDPFRAG));
                    }
                    Outcome::Respond(response)
                }
                None => Outcome::Respond(ApiError::no_route(&head.method, path).into_response()),
            }
        } else {
            let result = match self.gate(head) {
                Ok(route) => self.dispatch(core, route, &request).await,
                Err(e) => Err(e),
            };
            result.unwrap_or_else(|e| Outcome::Respond(e.into_response()))
        };
        if let Outcome::Respond(response) = &mut outcome {
            cors::decorate(&self.config.cors, &head.headers, response);
        }
        outcome
    }

    fn early_response(&self, head: &RequestHead) -> Option<Response<Bytes>> {
        if head.method == Method::OPTIONS {
            return None;
        }
        let mut response = self.gate(head).err()?.into_response();
        cors::decorate(&self.config.cors, &head.headers, &mut response);
        Some(response)
    }

    fn error_response(&self, status: StatusCode, message: &str, request: &HeaderMap) -> Response<Bytes> {
        let mut response = ApiError::new(status, message).into_response();
        cors::decorate(&self.config.cors, request, &mut response);
        response
    }
}
