//! Configuration: every flag with its `RELAY_*` environment twin, its default and its meaning.
//!
//! Invariant: the doc comments here are user documentation; `relay --help` prints them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use relay_engine::config::{EngineConfig, Limits, RtcSettings, ToolSettings};
use relay_engine::media::opus::OpusSettings;
use relay_engine::media::playout::PlayoutConfig;
use relay_engine::proto::realtime::ApiShape;
use relay_engine::secret::Secret;
use relay_engine::session::agent::{AgentPolicy, AgentUrl, Briefing, RealtimeAgent};

/// Relay: a thread-per-core media relay for voice-AI calls.
///
/// Serves phone calls (Twilio Media Streams, upstream bots, listeners) and the session-control API
/// (HTTP and WebSocket) on one port from one pinned executor per
/// core. Every flag has an environment twin, shown in brackets.
#[derive(Debug, Clone, Parser)]
#[command(name = "relay", version)]
pub struct Config {
    /// Address and port for HTTP and WebSocket. Port 0 picks a free port.
    #[arg(long, env = "RELAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Executors to run, one pinned per CPU. Default: every CPU this process may use.
    #[arg(long, env = "RELAY_CORES")]
    pub cores: Option<usize>,

    /// Bearer token required on control endpoints (all but /health). Without it, only a loopback
    /// --listen address is allowed, unless --insecure-public is given.
    #[arg(long, env = "RELAY_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Allow listening on a non-loopback address without an --api-key.
    #[arg(long, env = "RELAY_INSECURE_PUBLIC")]
    pub insecure_public: bool,

    /// Directory for the embedded database and state; created when missing.
    #[arg(long, env = "RELAY_DATA_DIR", default_value = "./relay-data")]
    pub data_dir: PathBuf,

    /// Shared call records for a cluster: `postgresql://user[:password]@host:port/db` (or
    /// `postgres://`). Every node's records go to this database, and per-user limits are counted
    /// there so they hold across nodes. The schema is created or migrated at start. Default: the
    /// embedded database in --data-dir (one node). The password is a secret: never logged.
    #[arg(long, env = "RELAY_RECORDS_URL", hide_env_values = true)]
    pub records_url: Option<String>,

    /// Project of calls that name none (no `projectId` stream parameter, no number mapping).
    #[arg(long, env = "RELAY_DEFAULT_PROJECT", default_value = "default")]
    pub default_project: String,

    /// Comma-separated `number=projectId` entries: calls to that number (or, outbound, from it)
    /// belong to that project unless they name one, e.g. `+15550001=proj_1,+15550002=proj_2`.
    #[arg(long, env = "RELAY_PROJECT_FOR_NUMBER", default_value = "")]
    pub project_for_number: String,

    /// Comma-separated `projectId=name` entries: the `projectName` analytics report (default: the
    /// project id), e.g. `proj_1=Demo Plumbing`.
    #[arg(long, env = "RELAY_PROJECT_NAMES", default_value = "")]
    pub project_names: String,

    /// Origins browsers may call the API from: `*` for any, or a comma-separated list of
    /// origins such as `https://app.example.com`. Empty disables CORS.
    #[arg(long, env = "RELAY_CORS_ORIGINS", default_value = "*")]
    pub cors_origins: String,

    /// This node's name: every HTTP answer and every WebSocket 101 carries it as `X-Relay-Node`,
    /// and `/health` shows it (1–64 of `[A-Za-z0-9._-]`). Default: the host name.
    #[arg(long, env = "RELAY_NODE_ID")]
    pub node_id: Option<String>,

    /// Base URL clients and Twilio reach the relay at (`https://relay.example.com`), used in TwiML
    /// stream URLs and signature checks behind proxies. Default: taken from each request's Host.
    #[arg(long, env = "RELAY_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// Upstream agent every call dials, a `ws://` bot speaking Twilio's Media Streams protocol.
    #[arg(long, env = "RELAY_AGENT_URL")]
    pub agent_url: Option<String>,

    /// Comma-separated `host` or `host:port` entries that a per-call `agentUrl` parameter may name.
    #[arg(long, env = "RELAY_AGENT_ALLOW", default_value = "")]
    pub agent_allow: String,

    /// Twilio auth token: when set, webhooks and stream upgrades must carry a valid
    /// X-Twilio-Signature (403 otherwise).
    #[arg(long, env = "RELAY_TWILIO_AUTH_TOKEN", hide_env_values = true)]
    pub twilio_auth_token: Option<String>,

    /// Ask Twilio for Real-Time Transcription of both tracks on every call (`<Start><Transcription>`
    /// in the TwiML; billed by Twilio). Its callbacks feed `transcription` events to frontends,
    /// transcript `update`s to `/ws` and the call record.
    #[arg(long, env = "RELAY_TWILIO_TRANSCRIPTION")]
    pub twilio_transcription: bool,

    /// Twilio account SID, for outbound calls through Twilio's REST API.
    #[arg(long, env = "RELAY_TWILIO_ACCOUNT_SID")]
    pub twilio_account_sid: Option<String>,

    /// Caller number (E.164) for outbound calls.
    #[arg(long, env = "RELAY_TWILIO_FROM")]
    pub twilio_from: Option<String>,

    /// Base URL of Twilio's REST API (a local stand-in in tests).
    #[arg(long, env = "RELAY_TWILIO_API_BASE", default_value = "https://api.twilio.com")]
    pub twilio_api_base: String,

    /// PEM file of extra certificate authorities trusted for outbound TLS (Twilio API base),
    /// besides the web PKI roots.
    #[arg(long, env = "RELAY_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<PathBuf>,

    /// Concurrent `/frontend-stream` sockets per `user_id` (close 1008 past it).
    #[arg(long, env = "RELAY_FRONTEND_SOCKETS_PER_USER", default_value_t = 3)]
    pub frontend_sockets_per_user: usize,

    /// Log filter: error, warn, info, debug or trace, optionally per module
    /// (`info,relay_engine=debug`).
    #[arg(long, env = "RELAY_LOG", default_value = "info")]
    pub log: String,

    /// Largest request body accepted, bytes (413 past it).
    #[arg(long, env = "RELAY_MAX_BODY_BYTES", default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: usize,

    /// Largest request head accepted, bytes (431 past it).
    #[arg(long, env = "RELAY_MAX_HEAD_BYTES", default_value_t = Limits::default().max_head_bytes)]
    pub max_head_bytes: usize,

    /// Most header fields in a request (431 past it; at most 128).
    #[arg(long, env = "RELAY_MAX_HEADERS", default_value_t = Limits::default().max_headers)]
    pub max_headers: usize,

    /// Time a client has to send a whole request once it started one (408 past it).
    #[arg(long, env = "RELAY_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,

    /// Time an idle keep-alive connection stays open.
    #[arg(long, env = "RELAY_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Sessions one core holds (503 past it).
    #[arg(long, env = "RELAY_SESSIONS_PER_CORE", default_value_t = Limits::default().sessions_per_core)]
    pub sessions_per_core: usize,

    /// Event sockets (/ws) one session may have (429 past it).
    #[arg(long, env = "RELAY_OBSERVERS_PER_SESSION", default_value_t = Limits::default().observers_per_session)]
    pub observers_per_session: usize,

    /// How long a /ws socket may wait for its session to be started (then closed with 1008).
    #[arg(long, env = "RELAY_PENDING_OBSERVER_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub pending_observer_timeout: Duration,

    /// Open connections one core serves; more are closed at once.
    #[arg(long, env = "RELAY_CONNECTIONS_PER_CORE", default_value_t = Limits::default().connections_per_core)]
    pub connections_per_core: usize,

    /// Not-yet-started session ids with waiting sockets one core holds (503 past it).
    #[arg(long, env = "RELAY_PENDING_SESSIONS_PER_CORE", default_value_t = Limits::default().pending_sessions_per_core)]
    pub pending_sessions_per_core: usize,

    /// Largest WebSocket frame payload a client may send, bytes (close 1009 past it).
    #[arg(long, env = "RELAY_WS_MAX_FRAME_BYTES", default_value_t = Limits::default().ws_max_frame_bytes)]
    pub ws_max_frame_bytes: usize,

    /// Largest reassembled WebSocket message, bytes (close 1009 past it).
    #[arg(long, env = "RELAY_WS_MAX_MESSAGE_BYTES", default_value_t = Limits::default().ws_max_message_bytes)]
    pub ws_max_message_bytes: usize,

    /// Frames queued toward one WebSocket before new ones are dropped (counted).
    #[arg(long, env = "RELAY_WS_OUTBOX_FRAMES", default_value_t = Limits::default().ws_outbox_frames)]
    pub ws_outbox_frames: usize,

    /// A quiet WebSocket gets a ping after this long.
    #[arg(long, env = "RELAY_WS_PING_INTERVAL", default_value = "20s", value_parser = humantime::parse_duration)]
    pub ws_ping_interval: Duration,

    /// A WebSocket whose peer sends nothing (not even pongs) this long is closed with 1001.
    #[arg(long, env = "RELAY_WS_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub ws_idle_timeout: Duration,

    /// How long a request waits for the session's core to answer (503 past it).
    #[arg(long, env = "RELAY_COMMAND_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub command_timeout: Duration,

    /// How long an idle core polls for work before it sleeps (0 = sleep at once). Spinning trades
    /// idle CPU for fewer sleep/wake cycles; see BENCHMARKS.md for measured effects.
    #[arg(long, env = "RELAY_SPIN_BEFORE_PARK", default_value = "0s", value_parser = humantime::parse_duration)]
    pub spin_before_park: Duration,

    /// PEM certificate chain: TLS (`https://`, `wss://`) on `--listen` (Twilio connects only to
    /// `wss://`). Needs `--tls-key`.
    #[arg(long, env = "RELAY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for `--tls-cert`.
    #[arg(long, env = "RELAY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Upstream Retell custom-LLM server (`wss://host/llm-websocket`; the call id is appended):
    /// `/llm-websocket/{call_id}` is forwarded there both ways instead of the built-in responder.
    #[arg(long, env = "RELAY_LLM_UPSTREAM_URL")]
    pub llm_upstream_url: Option<String>,

    /// How often `/health/detailed` checks that configured upstreams (agent, Realtime, LLM) accept
    /// TCP connections (each check opens and closes one connection); 0 turns the checks off.
    #[arg(long, env = "RELAY_UPSTREAM_CHECK_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub upstream_check_interval: Duration,

    /// What the built-in Retell custom-LLM responder (`/llm-websocket/{call_id}`) says first.
    #[arg(long, env = "RELAY_BEGIN_SENTENCE", default_value = relay_engine::core::DEFAULT_BEGIN_SENTENCE)]
    pub begin_sentence: String,

    /// OpenAI-Realtime-compatible agent (`wss://api.openai.com/v1/realtime?model=…`): calls with no
    /// Twilio-protocol agent talk to it (μ-law both ways, barge-in, transcripts).
    #[arg(long, env = "RELAY_OPENAI_URL")]
    pub openai_url: Option<String>,

    /// API key for `--openai-url` (sent as `Authorization: Bearer`).
    #[arg(long, env = "RELAY_OPENAI_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<String>,

    /// Interface `--openai-url` speaks: `ga` (OpenAI's current Realtime API) or `beta` (the
    /// retired beta interface: `OpenAI-Beta: realtime=v1` and its session shape), for providers
    /// that still speak it.
    #[arg(long, env = "RELAY_OPENAI_API_SHAPE", default_value = "ga", value_parser = ["ga", "beta"])]
    pub openai_api_shape: String,

    /// Voice the Realtime model speaks with (e.g. `marin`); default: the server's.
    #[arg(long, env = "RELAY_OPENAI_VOICE")]
    pub openai_voice: Option<String>,

    /// Instructions (system prompt) for Realtime sessions of calls that bring no `prompt` of their
    /// own: the text, or `@FILE` to read it from a file (at most 16 KiB).
    #[arg(long, env = "RELAY_AGENT_INSTRUCTIONS")]
    pub agent_instructions: Option<String>,

    /// Instructions for calls on one of the relay's numbers (the number called; for outbound
    /// calls without a `prompt`, the number calling): comma-separated `NUMBER=@FILE` (the file's
    /// text, at most 16 KiB) or `NUMBER=TEXT` (text without commas) entries, e.g.
    /// `+15550001=@/etc/relay/acme.txt`; the flag may also be repeated. Wins over
    /// --agent-instructions; an outbound call's `prompt` wins over both.
    #[arg(long, env = "RELAY_AGENT_INSTRUCTIONS_FOR_NUMBER", value_delimiter = ',')]
    pub agent_instructions_for_number: Vec<String>,

    /// What the Realtime model says first on calls that bring no `first_message` of their own
    /// (at most 4096 bytes); default: nothing, the model waits for the caller.
    #[arg(long, env = "RELAY_AGENT_FIRST_MESSAGE")]
    pub agent_first_message: Option<String>,

    /// Tools every Realtime agent may call (unless `/outbound-call` gives a call its own): a JSON
    /// file holding an array of `{"name", "description", "parameters"}` (parameters a JSON Schema
    /// object); at most 64 tools in 64 KiB. Read and checked at startup.
    #[arg(long, env = "RELAY_AGENT_TOOLS")]
    pub agent_tools: Option<PathBuf>,

    /// Where Realtime agents' function calls are POSTed (`http://` or `https://`), signed with
    /// `--tools-secret` (see README, "Tools"). Without it, a function call gets an error output.
    #[arg(long, env = "RELAY_TOOLS_URL")]
    pub tools_url: Option<String>,

    /// Shared secret of the `X-Relay-Signature` HMAC-SHA256 on requests to `--tools-url`
    /// (required with it).
    #[arg(long, env = "RELAY_TOOLS_SECRET", hide_env_values = true)]
    pub tools_secret: Option<String>,

    /// How long one request to `--tools-url` may take, connect to last byte of the answer; past
    /// it the model gets an error output.
    #[arg(long, env = "RELAY_TOOLS_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tools_timeout: Duration,

    /// First UDP port for WebRTC: core i uses port base + i (0: any free port per core).
    #[arg(long, env = "RELAY_RTC_PORT_BASE", default_value_t = 40_000)]
    pub rtc_port_base: u16,

    /// Address WebRTC ICE candidates name, for deployments behind 1:1 NAT (default: the listen
    /// address, which must then not be 0.0.0.0 or ::).
    #[arg(long, env = "RELAY_PUBLIC_IP")]
    pub public_ip: Option<std::net::IpAddr>,

    /// Turn WebRTC (WHIP/WHEP) off: no UDP sockets, offers are answered 503.
    #[arg(long, env = "RELAY_DISABLE_WEBRTC")]
    pub disable_webrtc: bool,

    /// WebRTC legs (WHIP publishers and WHEP listeners) one session may have (503 past it).
    #[arg(long, env = "RELAY_RTC_LEGS_PER_SESSION", default_value_t = Limits::default().rtc_legs_per_session)]
    pub rtc_legs_per_session: usize,

    /// WebRTC peers one core holds (503 past it).
    #[arg(long, env = "RELAY_RTC_PEERS_PER_CORE", default_value_t = Limits::default().rtc_peers_per_core)]
    pub rtc_peers_per_core: usize,

    /// Opus encoder complexity toward WebRTC peers, 0 (cheapest) to 10 (see BENCHMARKS.md).
    #[arg(long, env = "RELAY_OPUS_COMPLEXITY", default_value_t = OpusSettings::default().complexity)]
    pub opus_complexity: u8,

    /// Opus in-band forward error correction toward WebRTC peers.
    #[arg(long, env = "RELAY_OPUS_FEC", default_value_t = OpusSettings::default().fec, action = clap::ArgAction::Set)]
    pub opus_fec: bool,

    /// Opus discontinuous transmission (tiny packets during silence) toward WebRTC peers.
    #[arg(long, env = "RELAY_OPUS_DTX", default_value_t = OpusSettings::default().dtx, action = clap::ArgAction::Set)]
    pub opus_dtx: bool,

    /// Initial jitter delay of audio from WebRTC peers (the buffer grows by a frame where packets
    /// come late, and gives it back when the network calms).
    #[arg(long, env = "RELAY_PLAYOUT_DELAY", default_value = "10ms", value_parser = humantime::parse_duration)]
    pub playout_delay: Duration,

    /// How long graceful shutdown waits for connections to close.
    #[arg(long, env = "RELAY_SHUTDOWN_GRACE", default_value = "3s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Print every setting (documentation, environment twin, the value in effect and where it came
    /// from; secrets redacted) as an environment file, then exit.
    #[arg(long)]
    pub print_config: bool,
}

/// Every setting with an environment twin as an environment file: each one's documentation as
/// comments with where the value came from, then `RELAY_NAME=value` with the value in effect. Secrets
/// (flags with hidden environment values) are shown as set or unset, never by value; unset
/// optional settings are commented out.
pub fn describe(command: &clap::Command, matches: &clap::ArgMatches) -> String {
    use std::fmt::Write as _;
    let mut out =
        String::from("# Relay settings in effect. Each flag's environment twin is shown; a flag wins over it.\n");
    for arg in command.get_arguments() {
        let Some(env) = arg.get_env().and_then(|e| e.to_str()) else { continue };
        let id = arg.get_id().as_str();
        let flag = arg.get_long().unwrap_or(id);
        let _ = writeln!(out);
        let help = arg.get_long_help().or_else(|| arg.get_help()).map(ToString::to_string).unwrap_or_default();
        for line in help.lines() {
            let _ = writeln!(out, "# {line}");
        }
        let source = match matches.value_source(id) {
            Some(clap::parser::ValueSource::CommandLine) => "set by --".to_owned() + flag,
            Some(clap::parser::ValueSource::EnvVariable) => format!("set by {env}"),
            Some(clap::parser::ValueSource::DefaultValue) => "default".to_owned(),
            _ => "unset".to_owned(),
        };
        let value = matches
            .get_raw(id)
            .map(|values| values.map(|v| v.to_string_lossy().into_owned()).collect::<Vec<_>>().join(","));
        // Environment files (systemd, docker) allow no comment after a value: the source goes above.
        let _ = writeln!(out, "# --{flag}: {source}");
        let _ = match value {
            Some(_) if arg.is_hide_env_values_set() => writeln!(out, "# {env}=<redacted>"),
            Some(v) => writeln!(out, "{env}={}", env_quote(&v)),
            None => writeln!(out, "# {env}="),
        };
    }
    out
}

/// `value` as an environment-file value: bare when it is plain, else single-quoted.
fn env_quote(value: &str) -> String {
    let plain = !value.is_empty() && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.,:/@%+=[]".contains(&b));
    if plain {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\'', "'\\''"))
    }
}

/// Where CORS lets browsers call from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    /// No cross-origin access.
    None,
    /// Any origin (`*`).
    Any,
    /// Exactly these origins.
    List(Vec<String>),
}

/// Settings the API handlers read, shared by every core.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Bearer token for control endpoints.
    pub api_key: Option<Secret>,
    /// CORS policy.
    pub cors: CorsOrigins,
    /// The data directory (probed by /health/detailed).
    pub data_dir: PathBuf,
    /// Base URL of the relay as clients see it, without a trailing slash.
    pub public_url: Option<String>,
    /// Twilio auth token for signature checks.
    pub twilio_auth_token: Option<Secret>,
    /// Concurrent frontend sockets per user id.
    pub frontend_sockets_per_user: usize,
    /// Whether TwiML starts Twilio's Real-Time Transcription.
    pub twilio_transcription: bool,
    /// Twilio REST credentials, when all three are configured.
    pub twilio: Option<TwilioAccount>,
}

/// Longest `--agent-instructions` text or file, bytes.
const MAX_INSTRUCTIONS_BYTES: usize = 16 * 1024;
/// Longest `--agent-first-message`, bytes (as an outbound call's `first_message`).
const MAX_FIRST_MESSAGE_BYTES: usize = 4096;

/// What the relay needs to place and end calls through Twilio's REST API.
#[derive(Debug, Clone)]
pub struct TwilioAccount {
    /// Account SID (`AC…`).
    pub sid: String,
    /// Auth token (also the webhook signing key).
    pub auth_token: Secret,
    /// Caller number.
    pub from: String,
    /// REST API base URL, without a trailing slash.
    pub api_base: String,
}

impl Config {
    /// Checks combinations clap cannot, e.g. a public address without an API key.
    ///
    /// # Errors
    /// A sentence saying what to change.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(node) = &self.node_id {
            if !valid_node_id(node) {
                return Err(format!("--node-id {node:?}: must be 1 to 64 of A-Z a-z 0-9 . _ -"));
            }
        }
        if let Some(url) = &self.records_url {
            // The URL may hold a password: the error never quotes it.
            crate::records::postgres::Settings::parse(url).map_err(|e| format!("--records-url: {e}"))?;
        }
        if self.cores == Some(0) {
            return Err("--cores must be at least 1".to_owned());
        }
        if self.api_key.as_deref().is_some_and(str::is_empty) {
            return Err("--api-key must not be empty".to_owned());
        }
        if let Some(url) = self.llm_upstream_url.as_deref().filter(|u| !u.is_empty()) {
            AgentUrl::parse(url).map_err(|e| format!("--llm-upstream-url: {e}"))?;
        }
        if let Some(url) = self.openai_url.as_deref().filter(|u| !u.is_empty()) {
            AgentUrl::parse(url).map_err(|e| format!("--openai-url: {e}"))?;
        }
        if !self.listen.ip().is_loopback() && self.api_key.is_none() && !self.insecure_public {
            return Err(format!(
                "refusing to listen on {} without --api-key: set RELAY_API_KEY, listen on 127.0.0.1, or pass --insecure-public",
                self.listen
            ));
        }
        if let Some(url) = self.tools_url.as_deref() {
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.parse::<http::Uri>().is_err() {
                return Err(format!("--tools-url {url}: must be an http:// or https:// URL"));
            }
            if self.tools_secret.as_deref().is_none_or(str::is_empty) {
                return Err("--tools-url needs --tools-secret (the key of the requests' signature)".to_owned());
            }
        }
        if self.tools_timeout.is_zero() {
            return Err("--tools-timeout must be above zero".to_owned());
        }
        if self.ws_ping_interval.is_zero() || self.ws_idle_timeout <= self.ws_ping_interval {
            return Err("--ws-idle-timeout must be longer than --ws-ping-interval (and both above zero)".to_owned());
        }
        if let Some(url) = &self.agent_url {
            AgentUrl::parse(url).map_err(|e| format!("--agent-url {url}: {e}"))?;
        }
        if !(self.twilio_api_base.starts_with("http://") || self.twilio_api_base.starts_with("https://")) {
            return Err(format!("--twilio-api-base {}: must start with http:// or https://", self.twilio_api_base));
        }
        if let Some(url) = &self.public_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("--public-url {url}: must start with http:// or https://"));
            }
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("--tls-cert and --tls-key go together".to_owned());
        }
        if self.playout_delay > Duration::from_millis(500) {
            return Err("--playout-delay must be at most 500ms".to_owned());
        }
        if self.opus_complexity > 10 {
            return Err("--opus-complexity must be between 0 and 10".to_owned());
        }
        self.projects()?;
        if self.max_headers == 0 || self.max_headers > relay_engine::proto::http::HEADER_SLOTS {
            return Err(format!("--max-headers must be between 1 and {}", relay_engine::proto::http::HEADER_SLOTS));
        }
        Ok(())
    }

    /// The engine's part of the configuration.
    pub fn engine(&self) -> EngineConfig {
        let limits = Limits {
            max_body_bytes: self.max_body_bytes,
            max_head_bytes: self.max_head_bytes,
            max_headers: self.max_headers,
            header_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
            sessions_per_core: self.sessions_per_core,
            observers_per_session: self.observers_per_session,
            pending_observer_timeout: self.pending_observer_timeout,
            shutdown_grace: self.shutdown_grace,
            connections_per_core: self.connections_per_core,
            pending_sessions_per_core: self.pending_sessions_per_core,
            ws_max_frame_bytes: self.ws_max_frame_bytes,
            ws_max_message_bytes: self.ws_max_message_bytes,
            ws_outbox_frames: self.ws_outbox_frames,
            ws_ping_interval: self.ws_ping_interval,
            ws_idle_timeout: self.ws_idle_timeout,
            command_timeout: self.command_timeout,
            spin_before_park: self.spin_before_park,
            rtc_legs_per_session: self.rtc_legs_per_session,
            rtc_peers_per_core: self.rtc_peers_per_core,
            ..Limits::default()
        };
        let agents = AgentPolicy {
            default_url: self.agent_url.as_deref().and_then(|u| AgentUrl::parse(u).ok()),
            allow: self.agent_allow.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect(),
            realtime: self.openai_url.as_deref().and_then(|u| AgentUrl::parse(u).ok()).map(|url| RealtimeAgent {
                url,
                api_key: self.openai_api_key.clone().filter(|k| !k.is_empty()).map(Secret::new),
                shape: if self.openai_api_shape == "beta" { ApiShape::Beta } else { ApiShape::Ga },
                voice: self.openai_voice.clone().filter(|v| !v.is_empty()),
                // Read by `run` ([`Config::briefing`]): this view does no I/O.
                briefing: Briefing::default(),
            }),
            llm_upstream: self.llm_upstream_url.as_deref().and_then(|u| AgentUrl::parse(u).ok()),
        };
        EngineConfig {
            // Without `--node-id`, `run` names the node after the host (this view does no I/O).
            node_id: self.node_id.clone().unwrap_or_default(),
            listen: self.listen,
            cores: self.cores.unwrap_or_else(relay_engine::shell::available_cores),
            limits,
            agents,
            // With a Twilio token, streams must carry the per-call signature the TwiML hands out.
            stream_key: self.twilio_auth_token.clone().filter(|t| !t.is_empty()).map(Secret::new),
            // Read from the files by `run` (this view does no I/O).
            tls: None,
            begin_sentence: self.begin_sentence.clone(),
            // Opened by `run` (this view does no I/O).
            records: None,
            tools: ToolSettings {
                // Read from `--agent-tools` by `run` (this view does no I/O).
                declared: Arc::from(Vec::new()),
                url: self.tools_url.clone(),
                secret: self.tools_secret.clone().filter(|s| !s.is_empty()).map(Secret::new),
                timeout: self.tools_timeout,
                ..ToolSettings::default()
            },
            rtc: (!self.disable_webrtc).then(|| RtcSettings {
                port_base: self.rtc_port_base,
                public_ip: self.public_ip,
                opus: OpusSettings {
                    complexity: self.opus_complexity,
                    fec: self.opus_fec,
                    dtx: self.opus_dtx,
                    ..OpusSettings::default()
                },
                playout: PlayoutConfig { target_delay: self.playout_delay, ..PlayoutConfig::default() },
            }),
        }
    }

    /// How Realtime sessions are briefed (`--agent-instructions`, `--agent-instructions-for-number`,
    /// `--agent-first-message`), with `@FILE` values read from their files.
    ///
    /// # Errors
    /// A sentence naming the flag whose entry is malformed, too long, or whose file is unreadable.
    pub fn briefing(&self) -> Result<Briefing, String> {
        let text = |flag: &str, value: &str| -> Result<String, String> {
            let text = match value.strip_prefix('@') {
                Some(path) => std::fs::read_to_string(path).map_err(|e| format!("{flag}: cannot read {path}: {e}"))?,
                None => value.to_owned(),
            };
            if text.len() > MAX_INSTRUCTIONS_BYTES {
                return Err(format!("{flag}: instructions must be at most {MAX_INSTRUCTIONS_BYTES} bytes"));
            }
            Ok(text.trim().to_owned())
        };
        let mut briefing = Briefing::default();
        if let Some(value) = self.agent_instructions.as_deref().filter(|v| !v.is_empty()) {
            briefing.instructions = Some(text("--agent-instructions", value)?).filter(|t| !t.is_empty());
        }
        for entry in self.agent_instructions_for_number.iter().filter(|e| !e.trim().is_empty()) {
            let flag = "--agent-instructions-for-number";
            match entry.split_once('=').map(|(k, v)| (k.trim(), v.trim())) {
                Some((number, value))
                    if !number.is_empty()
                        && number.len() <= 64
                        && !number.contains(char::is_whitespace)
                        && !value.is_empty() =>
                {
                    briefing.instructions_by_number.insert(number.to_owned(), text(flag, value)?);
                }
                _ => return Err(format!("{flag} entry {entry:?}: expected NUMBER=TEXT or NUMBER=@FILE")),
            }
        }
        if let Some(first) = self.agent_first_message.as_deref().filter(|v| !v.trim().is_empty()) {
            if first.len() > MAX_FIRST_MESSAGE_BYTES {
                return Err(format!("--agent-first-message must be at most {MAX_FIRST_MESSAGE_BYTES} bytes"));
            }
            briefing.first_message = Some(first.trim().to_owned());
        }
        Ok(briefing)
    }

    /// How call records are assigned to projects (`--default-project`, `--project-for-number`,
    /// `--project-names`).
    ///
    /// # Errors
    /// A sentence naming the malformed entry.
    pub fn projects(&self) -> Result<crate::records::Projects, String> {
        fn pairs(flag: &str, list: &str) -> Result<std::collections::HashMap<String, String>, String> {
            let mut map = std::collections::HashMap::new();
            for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                match entry.split_once('=').map(|(k, v)| (k.trim(), v.trim())) {
                    Some((k, v)) if !k.is_empty() && !v.is_empty() && v.len() <= 128 => {
                        map.insert(k.to_owned(), v.to_owned());
                    }
                    _ => return Err(format!("{flag} entry {entry:?}: expected key=value (value 1-128 bytes)")),
                }
            }
            Ok(map)
        }
        let default = self.default_project.trim();
        if default.is_empty() || default.len() > 128 {
            return Err("--default-project must be 1-128 bytes".to_owned());
        }
        Ok(crate::records::Projects {
            by_number: pairs("--project-for-number", &self.project_for_number)?,
            default: default.to_owned(),
            names: pairs("--project-names", &self.project_names)?,
        })
    }

    /// The API handlers' part of the configuration.
    pub fn api(&self) -> ApiConfig {
        let origins: Vec<String> = self
            .cors_origins
            .split(',')
            .map(|o| o.trim().trim_end_matches('/').to_owned())
            .filter(|o| !o.is_empty())
            .collect();
        let cors = if origins.is_empty() {
            CorsOrigins::None
        } else if origins.iter().any(|o| o == "*") {
            CorsOrigins::Any
        } else {
            CorsOrigins::List(origins)
        };
        ApiConfig {
            api_key: self.api_key.clone().map(Secret::new),
            cors,
            data_dir: self.data_dir.clone(),
            public_url: self.public_url.as_deref().map(|u| u.trim_end_matches('/').to_owned()),
            twilio_auth_token: self.twilio_auth_token.clone().filter(|t| !t.is_empty()).map(Secret::new),
            frontend_sockets_per_user: self.frontend_sockets_per_user,
            twilio_transcription: self.twilio_transcription,
            twilio: match (&self.twilio_account_sid, &self.twilio_auth_token, &self.twilio_from) {
                (Some(sid), Some(token), Some(from)) if !sid.is_empty() && !token.is_empty() && !from.is_empty() => {
                    Some(TwilioAccount {
                        sid: sid.clone(),
                        auth_token: Secret::new(token.clone()),
                        from: from.clone(),
                        api_base: self.twilio_api_base.trim_end_matches('/').to_owned(),
                    })
                }
                _ => None,
            },
        }
    }
}

/// Whether `id` can name a node: 1–64 of `[A-Za-z0-9._-]` (it goes into a header and logs as is).
pub fn valid_node_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The host's name as a node id (`/proc/sys/kernel/hostname`, cut to a valid id), else `relay`.
pub fn host_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let id: String = host
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' })
        .take(64)
        .collect();
    if valid_node_id(&id) {
        id
    } else {
        "relay".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("relay").chain(args.iter().copied())).expect("valid flags")
    }

    /// Defaults are the documented ones and pass validation.
    #[test]
    fn defaults() {
        let c = parse(&[]);
        assert_eq!(c.listen, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(c.engine().limits, Limits { header_timeout: Duration::from_secs(10), ..Limits::default() });
        assert_eq!(c.api().cors, CorsOrigins::Any);
        c.validate().expect("defaults are valid");
    }

    /// A public address needs an API key or an explicit opt-out.
    #[test]
    fn public_needs_key() {
        assert!(parse(&["--listen", "0.0.0.0:80"]).validate().is_err());
        assert!(parse(&["--listen", "0.0.0.0:80", "--api-key", "k"]).validate().is_ok());
        assert!(parse(&["--listen", "0.0.0.0:80", "--insecure-public"]).validate().is_ok());
        assert!(parse(&["--cores", "0"]).validate().is_err());
    }

    /// Project flags parse into the mapping; malformed entries are refused by name.
    #[test]
    fn project_flags() {
        let c = parse(&[
            "--project-for-number",
            "+15550001=proj_1, +15550002 = proj_2",
            "--project-names",
            "proj_1=Demo Plumbing",
        ]);
        let p = c.projects().expect("valid");
        assert_eq!(p.default, "default");
        assert_eq!(p.by_number.get("+15550002").map(String::as_str), Some("proj_2"));
        assert_eq!(p.name("proj_1"), "Demo Plumbing");
        assert!(parse(&["--project-for-number", "+1555"]).validate().is_err());
        assert!(parse(&["--project-names", "=x"]).validate().is_err());
        assert!(parse(&["--default-project", " "]).validate().is_err());
    }

    /// Briefing flags: inline text or `@FILE`, per-number entries, the first message; malformed
    /// entries and unreadable files are refused by flag; the shape defaults to GA.
    #[test]
    fn briefing_flags() {
        let dir = std::env::temp_dir().join(format!("relay-briefing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("sales.txt");
        std::fs::write(&file, "You sell plumbing.\nBe brief.\n").expect("write");
        let at_file = format!("+15550002=@{}", file.display());
        let c = parse(&[
            "--openai-url",
            "ws://127.0.0.1:9/v1/realtime",
            "--agent-instructions",
            "Be kind.",
            "--agent-instructions-for-number",
            "+15550001=Answer for Acme.",
            "--agent-instructions-for-number",
            &at_file,
            "--agent-instructions-for-number",
            "+15550003=One.,+15550004=Two.",
            "--agent-first-message",
            "Hello, Acme here!",
        ]);
        let b = c.briefing().expect("valid");
        assert_eq!(b.instructions.as_deref(), Some("Be kind."));
        assert_eq!(b.instructions_for(Some("+15550001")), Some("Answer for Acme."));
        assert_eq!(b.instructions_for(Some("+15550002")), Some("You sell plumbing.\nBe brief."));
        assert_eq!(b.instructions_for(Some("+15559999")), Some("Be kind."));
        assert_eq!(b.instructions_for(Some("+15550004")), Some("Two."), "comma-separated entries");
        assert_eq!(b.first_message.as_deref(), Some("Hello, Acme here!"));
        assert_eq!(c.engine().agents.realtime.expect("configured").shape, ApiShape::Ga);
        let beta = parse(&["--openai-url", "ws://127.0.0.1:9/", "--openai-api-shape", "beta"]);
        assert_eq!(beta.engine().agents.realtime.expect("configured").shape, ApiShape::Beta);
        assert!(Config::try_parse_from(["relay", "--openai-api-shape", "v2"]).is_err());
        assert!(parse(&["--agent-instructions-for-number", "no-equals"]).briefing().is_err());
        assert!(parse(&["--agent-instructions-for-number", "+1555=Hi, and welcome"]).briefing().is_err());
        assert!(parse(&["--agent-instructions", "@/nonexistent/relay-brief"]).briefing().is_err());
        let long = "x".repeat(MAX_INSTRUCTIONS_BYTES + 1);
        assert!(parse(&["--agent-instructions", &long]).briefing().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// CORS lists are split, trimmed and normalised.
    #[test]
    fn cors_lists() {
        assert_eq!(
            parse(&["--cors-origins", "https://a.example/, https://b.example"]).api().cors,
            CorsOrigins::List(vec!["https://a.example".into(), "https://b.example".into()])
        );
        assert_eq!(parse(&["--cors-origins", ""]).api().cors, CorsOrigins::None);
    }

    /// A tools URL must be http(s) and come with a secret; the engine view carries both and the
    /// timeout.
    #[test]
    fn tools_flags() {
        assert!(parse(&["--tools-url", "http://127.0.0.1:9/tools"]).validate().is_err(), "no secret");
        assert!(parse(&["--tools-url", "ftp://x/", "--tools-secret", "s"]).validate().is_err());
        assert!(parse(&["--tools-timeout", "0s"]).validate().is_err());
        let c = parse(&["--tools-url", "https://app.example/tools", "--tools-secret", "s", "--tools-timeout", "3s"]);
        c.validate().expect("valid");
        let tools = c.engine().tools;
        assert_eq!(tools.url.as_deref(), Some("https://app.example/tools"));
        assert_eq!(tools.secret.as_ref().map(Secret::expose), Some("s"));
        assert_eq!(tools.timeout, Duration::from_secs(3));
    }

    /// `--records-url` takes `postgresql://` and `postgres://` URLs; anything else is refused with
    /// a message that never quotes the URL (it may hold a password).
    #[test]
    fn records_url() {
        for ok in ["postgresql://relay:pw@db:5432/relay", "postgres://relay@127.0.0.1/relay"] {
            parse(&["--records-url", ok]).validate().expect(ok);
        }
        for bad in ["mysql://relay:hunter2@db/relay", "postgresql://relay:hunter2@db:99999/relay", "hunter2"] {
            let e = parse(&["--records-url", bad]).validate().expect_err(bad);
            assert!(e.starts_with("--records-url") && !e.contains("hunter2"), "{e}");
        }
    }
}
