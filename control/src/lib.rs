//! # relay-control
//!
//! Relay's control plane: configuration and CLI, the documented HTTP/WebSocket API, and
//! startup. It implements the engine's `ControlService`; the engine owns sockets, cores and
//! sessions.
//!
//! ## What it never does
//!
//! * Hold session state: sessions live on their owner core in the engine; handlers turn a request
//!   into a typed command, dispatch it to that core, and render the reply.
//! * Leak secrets: API keys and access tokens are `Secret`s, redacted in logs and responses.
//!
//! ## Flow of a request
//!
//! 1. The engine parses the head on the core that accepted the connection and calls
//!    [`api::Service`]'s `handle`.
//! 2. [`router`] picks the route (or 404/405), [`auth`] checks the API key, [`cors`] decorates.
//! 3. The handler validates the body ([`api::params`]) into an engine `Command` and awaits
//!    `CoreHandle::dispatch`, which runs it on the session's core, locally or over the mesh.
//! 4. The reply becomes the seed-compatible JSON envelope; errors become [`error::ApiError`].

pub mod api;
pub mod auth;
pub mod config;
pub mod cors;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod probe;
pub mod records;
pub mod router;
pub mod twilio;

use anyhow::Context as _;

/// Starts the relay with `config`, serves until SIGINT/SIGTERM, then shuts down gracefully
/// (at once when it was drained and no call is left); SIGUSR1 drains it.
///
/// # Errors
/// A one-line reason the relay could not start or a core failed.
pub fn run(config: config::Config) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create --data-dir {}", config.data_dir.display()))?;
    let mut engine = config.engine();
    if engine.node_id.is_empty() {
        engine.node_id = config::host_node_id();
    }
    let briefing = config.briefing().map_err(anyhow::Error::msg)?;
    if let Some(realtime) = engine.agents.realtime.as_mut() {
        realtime.briefing = briefing;
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        let cert_pem = std::fs::read(cert).with_context(|| format!("cannot read --tls-cert {}", cert.display()))?;
        let key_pem = std::fs::read(key).with_context(|| format!("cannot read --tls-key {}", key.display()))?;
        engine.tls = Some(relay_engine::config::TlsIdentity { cert_pem, key_pem });
    }
    if let Some(path) = &config.agent_tools {
        let json = std::fs::read(path).with_context(|| format!("cannot read --agent-tools {}", path.display()))?;
        let tools = relay_engine::proto::tools::parse_tools_json(&json)
            .map_err(|e| anyhow::anyhow!("--agent-tools {}: {e}", path.display()))?;
        engine.tools.declared = tools.into();
    }
    let scheme = if engine.tls.is_some() { "https" } else { "http" };
    let cores = engine.cores;
    let grace = engine.limits.shutdown_grace;
    let system_roots = relay_engine::shell::load_system_roots();
    tracing::debug!("{system_roots} certificates in the system's trust store");
    if let Some(path) = &config.upstream_ca_file {
        let pem = std::fs::read(path).with_context(|| format!("cannot read --upstream-ca-file {}", path.display()))?;
        relay_engine::shell::trust_extra_roots(&pem)
            .map_err(|e| anyhow::anyhow!("--upstream-ca-file {}: {e}", path.display()))?;
    }
    let projects = config.projects().map_err(anyhow::Error::msg)?;
    // Dropped on every way out of `run`, which commits what is queued (see `RecordStore::close`).
    let node = engine.node_id.clone();
    // The URL may hold a password: from here on it is a `Secret`, and only `Settings`' redacted
    // form is ever printed.
    let shared = match config.records_url.clone().map(relay_engine::secret::Secret::new) {
        Some(url) => {
            Some(records::postgres::Settings::from_secret(&url).map_err(|e| anyhow::anyhow!("--records-url: {e}"))?)
        }
        None => None,
    };
    let store = match &shared {
        Some(settings) => {
            let store = records::RecordStore::connect(settings, &node, projects)?;
            tracing::info!("call records in {settings} (shared by the cluster)");
            store
        }
        None => records::RecordStore::open(&config.data_dir, projects)?,
    };
    engine.records = Some(store.sink());
    let upstreams = [
        ("openai", &engine.agents.realtime.as_ref().map(|r| r.url.clone())),
        ("agent", &engine.agents.default_url),
        ("llm", &engine.agents.llm_upstream),
    ]
    .into_iter()
    .filter_map(|(name, url)| url.as_ref().map(|u| probe::Upstream::new(name, u.host_header())))
    .collect();
    let data_dir = probe::start(
        config.data_dir.clone(),
        Some((store.records(), store.stats())),
        upstreams,
        config.upstream_check_interval,
    )
    .context("cannot start the data-dir probe")?;
    metrics::install();
    let users = limits::UserLimits::new(config.frontend_sockets_per_user, limits::INITIATIONS_PER_MINUTE);
    if let Some(pool) = store.records().shared() {
        limits::share(&users, pool, node).context("cannot start the user-limits thread")?;
    }
    let service = api::Service::new(config.api(), data_dir, store.records(), store.stats(), users);
    let relay = relay_engine::shell::start(engine, service)?;
    tracing::info!("relay listening on {scheme}://{} with {cores} cores", relay.local_addr());
    if !relay.rtc_addrs().is_empty() {
        let addrs: Vec<String> = relay.rtc_addrs().iter().map(ToString::to_string).collect();
        tracing::info!("WebRTC (WHIP/WHEP) on udp {}", addrs.join(", "));
    }

    let shutdown = relay.shutdown_handle();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGUSR1,
    ])
    .context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut forever = signals.forever();
            // SIGUSR1 drains (as `POST /admin/drain`) and the relay goes on; the first SIGINT or
            // SIGTERM shuts down.
            for signal in forever.by_ref() {
                if signal == signal_hook::consts::SIGUSR1 {
                    tracing::info!(signal, "draining: new calls are refused, live calls go on");
                    shutdown.drain();
                    continue;
                }
                tracing::info!(signal, "shutting down: ending calls and closing connections");
                shutdown.shutdown();
                // A core that cannot finish in time must not keep the process alive.
                let deadline = grace + std::time::Duration::from_secs(2);
                std::thread::spawn(move || {
                    std::thread::sleep(deadline);
                    tracing::warn!("shutdown took longer than {deadline:?}; exiting");
                    std::process::exit(1);
                });
                break;
            }
            if forever.any(|signal| signal != signal_hook::consts::SIGUSR1) {
                tracing::warn!("second signal: exiting now");
                std::process::exit(130);
            }
        })
        .context("cannot start the signal thread")?;

    relay.wait().map_err(anyhow::Error::msg)?;
    // The cores are gone and have queued the records of every call they ended: commit them all.
    let stats = store.stats();
    store.close().map_err(|e| anyhow::anyhow!("call records not all saved: {e}"))?;
    let dropped = stats.dropped.load(std::sync::atomic::Ordering::Relaxed);
    if dropped > 0 {
        tracing::warn!(dropped, "call record changes were dropped because the records queue was full");
    }
    tracing::info!("relay stopped");
    Ok(())
}
