//! Engine configuration: plain data, one field for every size, count, rate and time a client controls.
//!
//! Invariant: no I/O and no defaults hidden elsewhere; the control crate maps its CLI onto these.

use std::net::SocketAddr;
use std::time::Duration;

/// Everything the engine needs to start its cores.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Address every core listens on (SO_REUSEPORT); port 0 picks a free port once for all cores.
    pub listen: SocketAddr,
    /// Number of cores (executors), each pinned to one CPU.
    pub cores: usize,
    /// Bounds on what clients can make the relay hold.
    pub limits: Limits,
    /// Which agents calls may dial.
    pub agents: crate::session::agent::AgentPolicy,
    /// When set, a caller's stream must carry `relaySig` = `twilio::stream_signature(key, callSid)`
    /// in its `start` (the relay's TwiML adds it), or it is closed with 1008.
    pub stream_key: Option<crate::secret::Secret>,
    /// WebRTC legs (WHIP/WHEP); `None` turns them off (offers are answered 503).
    pub rtc: Option<RtcSettings>,
    /// TLS on the listening port (`https://`, `wss://`); `None` serves plain HTTP.
    pub tls: Option<TlsIdentity>,
    /// What the built-in Retell LLM responder says when Retell connects (empty: nothing).
    pub begin_sentence: String,
    /// Where owner cores hand every call record change; `None` keeps records in memory only.
    pub records: Option<RecordSink>,
    /// Functions Realtime agents may call, and where their calls go.
    pub tools: ToolSettings,
    /// This node's name (`--node-id`): every HTTP answer and every 101 names it in
    /// `x-relay-node`, so a client behind a balancer sees which node served each leg (empty: no
    /// header).
    pub node_id: String,
}

/// The tools every Realtime session declares (unless a call brings its own) and the webhook that
/// runs their calls.
#[derive(Debug, Clone)]
pub struct ToolSettings {
    /// Declared in every Realtime session whose call has no tools of its own (`--agent-tools`).
    pub declared: std::sync::Arc<[crate::proto::tools::Tool]>,
    /// Where function calls are POSTed (`--tools-url`); `None`: every call gets an error output.
    pub url: Option<String>,
    /// Key of the `X-Relay-Signature` HMAC (`--tools-secret`).
    pub secret: Option<crate::secret::Secret>,
    /// How long one call may take, connect to last byte of the answer (`--tools-timeout`).
    pub timeout: Duration,
    /// Calls one session may have running at once; a call past it gets an error output, so a
    /// model cannot pile up requests while the tools server is slow.
    pub concurrent_per_session: usize,
}

impl Default for ToolSettings {
    fn default() -> Self {
        Self {
            declared: std::sync::Arc::from(Vec::new()),
            url: None,
            secret: None,
            timeout: Duration::from_secs(10),
            concurrent_per_session: 4,
        }
    }
}

/// Receives every call record change from the owner cores ([`crate::core::Output::Record`]).
///
/// # Invariants
/// It runs on a core's thread, between two media inputs: it must return at once, never block or
/// do I/O (hand the change to a bounded queue with `try_send`, counting what does not fit).
#[derive(Clone)]
pub struct RecordSink(std::sync::Arc<dyn Fn(Box<crate::core::command::RecordChange>) + Send + Sync>);

impl RecordSink {
    /// A sink that calls `f` with each change.
    pub fn new(f: impl Fn(Box<crate::core::command::RecordChange>) + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(f))
    }

    /// Hands `change` over.
    pub fn send(&self, change: Box<crate::core::command::RecordChange>) {
        (self.0)(change);
    }
}

impl std::fmt::Debug for RecordSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordSink")
    }
}

/// The certificate chain and private key the listening port presents, as PEM.
#[derive(Clone)]
pub struct TlsIdentity {
    /// PEM certificates, leaf first.
    pub cert_pem: Vec<u8>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsIdentity(..)")
    }
}

/// How the cores serve WebRTC.
#[derive(Debug, Clone)]
pub struct RtcSettings {
    /// Core `i` binds UDP port `port_base + i` (0: any free port per core, for tests).
    pub port_base: u16,
    /// The address ICE candidates name (deployments behind 1:1 NAT); default the listen address.
    pub public_ip: Option<std::net::IpAddr>,
    /// Opus encoder settings for audio toward peers.
    pub opus: crate::media::opus::OpusSettings,
    /// Playout buffers for audio from peers.
    pub playout: crate::media::playout::PlayoutConfig,
}

impl Default for RtcSettings {
    fn default() -> Self {
        Self {
            port_base: 40_000,
            public_ip: None,
            opus: crate::media::opus::OpusSettings::default(),
            playout: crate::media::playout::PlayoutConfig::default(),
        }
    }
}

/// Bounds on client-controlled sizes, counts and times. Crossing one is a typed error or a counted drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest HTTP request head (request line + headers), bytes; past it the answer is 431.
    pub max_head_bytes: usize,
    /// Most header lines in one request; past it the answer is 431.
    pub max_headers: usize,
    /// Largest request body, bytes; past it the answer is 413 (control bodies are small JSON).
    pub max_body_bytes: usize,
    /// Time a client has to send a whole request (head and body) once it has started one.
    pub header_timeout: Duration,
    /// Time a keep-alive connection may sit idle between requests before it is closed.
    pub idle_timeout: Duration,
    /// Largest WebSocket frame payload a client may send, bytes; past it the socket closes with 1009.
    pub ws_max_frame_bytes: usize,
    /// Largest reassembled WebSocket message, bytes; past it the socket closes with 1009.
    pub ws_max_message_bytes: usize,
    /// Read buffer each WebSocket's frame parser keeps, bytes: small, because thousands of sockets
    /// are idle at once (it grows for a larger frame while one is parsed). Sockets receive into
    /// one buffer per core ([`Self::ws_receive_bytes`]), not this one.
    pub ws_read_buffer_bytes: usize,
    /// The per-core buffer WebSocket readers receive into, bytes: the most one read takes.
    pub ws_receive_bytes: usize,
    /// Most bytes queued for a WebSocket that is not reading before the socket is closed.
    pub ws_max_write_buffer_bytes: usize,
    /// A WebSocket quiet this long gets a ping from the relay.
    pub ws_ping_interval: Duration,
    /// A WebSocket whose peer sends nothing (not even pongs) this long is closed with 1001.
    pub ws_idle_timeout: Duration,
    /// How long an idle core polls for work before it parks (glommio's `spin_before_park`);
    /// parking costs a `membarrier` and a blocking `io_uring_enter`, so a short spin can save CPU
    /// when events are frequent. Zero disables spinning.
    pub spin_before_park: Duration,
    /// Time allowed to reach an agent: name lookup, TCP connect and WebSocket handshake.
    pub agent_connect_timeout: Duration,
    /// Frames queued toward one WebSocket before new ones are dropped (counted).
    pub ws_outbox_frames: usize,
    /// Event sockets (`/ws`) one session may have.
    pub observers_per_session: usize,
    /// Session ids that may have event sockets waiting for `/start-call` on one core.
    pub pending_sessions_per_core: usize,
    /// How long an event socket may wait for its session to start before it is closed with 1008.
    pub pending_observer_timeout: Duration,
    /// WebRTC legs (WHIP publishers and WHEP listeners) one session may have.
    pub rtc_legs_per_session: usize,
    /// WebRTC peers one core holds.
    pub rtc_peers_per_core: usize,
    /// Sessions one core holds; `/start-call` past it answers 503.
    pub sessions_per_core: usize,
    /// Open connections one core serves; connections past it are closed at once.
    pub connections_per_core: usize,
    /// Messages queued between two cores before new ones are shed.
    pub mesh_capacity: usize,
    /// Call records one core keeps (the oldest are forgotten past it).
    pub records_per_core: usize,
    /// How long a request waits for the owner core's reply before it answers 503.
    pub command_timeout: Duration,
    /// How long graceful shutdown waits for connections to finish before cores exit anyway.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_head_bytes: 8 * 1024,
            max_headers: 64,
            max_body_bytes: 64 * 1024,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            ws_max_frame_bytes: 64 * 1024,
            ws_max_message_bytes: 256 * 1024,
            ws_read_buffer_bytes: 1024,
            ws_receive_bytes: 16 * 1024,
            ws_max_write_buffer_bytes: 1024 * 1024,
            ws_ping_interval: Duration::from_secs(20),
            ws_idle_timeout: Duration::from_secs(60),
            agent_connect_timeout: Duration::from_secs(5),
            spin_before_park: Duration::ZERO,
            ws_outbox_frames: 256,
            observers_per_session: 32,
            pending_sessions_per_core: 10_000,
            pending_observer_timeout: Duration::from_secs(30),
            rtc_legs_per_session: 16,
            rtc_peers_per_core: 5_000,
            sessions_per_core: 20_000,
            connections_per_core: 50_000,
            mesh_capacity: 4096,
            records_per_core: 10_000,
            command_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(3),
        }
    }
}
