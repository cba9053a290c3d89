//! Which upstream agents a session may dial: the configured default, or a per-call URL whose host
//! is on the allow-list.
//!
//! Invariant: nothing is dialled that the operator did not configure or allow-list.

use std::fmt;

/// A parsed `ws://` or `wss://` agent URL.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentUrl {
    /// Whether the connection uses TLS (`wss`).
    pub tls: bool,
    /// Host name or IP literal (brackets removed from IPv6).
    pub host: String,
    /// Port (the scheme's default when the URL has none).
    pub port: u16,
    /// Path and query, at least `/`.
    pub path: String,
}

/// Why an agent URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentUrlError {
    /// Not a `ws://` or `wss://` URL with a host.
    #[error("agent URLs must be ws:// or wss:// with a host")]
    Invalid,
    /// The host is not on `--agent-allow`.
    #[error("agent host {0} is not on the allow-list")]
    NotAllowed(String),
}

impl AgentUrl {
    /// Parses `url`.
    ///
    /// # Errors
    /// [`AgentUrlError::Invalid`] unless it is `ws://` or `wss://` with a host.
    pub fn parse(url: &str) -> Result<Self, AgentUrlError> {
        let uri: http::Uri = url.parse().map_err(|_| AgentUrlError::Invalid)?;
        let tls = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(AgentUrlError::Invalid),
        };
        let authority = uri.authority().ok_or(AgentUrlError::Invalid)?;
        if authority.as_str().contains('@') {
            return Err(AgentUrlError::Invalid);
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
        if host.is_empty() {
            return Err(AgentUrlError::Invalid);
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        Ok(Self { tls, host, port, path: if path.is_empty() { "/".to_owned() } else { path } })
    }

    /// `host:port` as it goes in a `Host` header.
    pub fn host_header(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Shows scheme, host, port and path, never the query: agent URLs often carry API keys there.
impl fmt::Display for AgentUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.split('?').next().unwrap_or("/");
        let query = if self.path.contains('?') { "?…" } else { "" };
        write!(f, "{}://{}{path}{query}", if self.tls { "wss" } else { "ws" }, self.host_header())
    }
}

impl fmt::Debug for AgentUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgentUrl({self})")
    }
}

/// The protocol an agent leg speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AgentProtocol {
    /// Twilio Media Streams (the bot sees the call as Twilio would send it).
    #[default]
    Twilio,
    /// The OpenAI Realtime API (or a compatible server).
    Realtime,
    /// An upstream Retell custom-LLM server, fed what Retell sends on `/llm-websocket/{call_id}`.
    RetellLlm,
}

/// An OpenAI-Realtime-compatible upstream: where, the API key it takes, the interface it speaks,
/// and how calls brief it.
#[derive(Debug, Clone)]
pub struct RealtimeAgent {
    /// `wss://api.openai.com/v1/realtime?model=…` or a compatible server.
    pub url: AgentUrl,
    /// Sent as `Authorization: Bearer`.
    pub api_key: Option<crate::secret::Secret>,
    /// GA (default) or the retired beta interface.
    pub shape: crate::proto::realtime::ApiShape,
    /// The voice asked for (`None`: the server's default).
    pub voice: Option<String>,
    /// Instructions and greetings for calls that bring none of their own.
    pub briefing: Briefing,
}

/// How a Realtime session is briefed when its call brings no `prompt`/`first_message` of its own
/// (an outbound call's, from `/outbound-call`, always wins).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Briefing {
    /// Instructions for every other call.
    pub instructions: Option<String>,
    /// What the model says first on every other call.
    pub first_message: Option<String>,
    /// Instructions by the relay's own number on the call (the number called, or for outbound
    /// calls the number calling); these win over [`Briefing::instructions`].
    pub instructions_by_number: std::collections::HashMap<String, String>,
}

impl Briefing {
    /// The instructions for a call on the relay's `number`, if any.
    pub fn instructions_for(&self, number: Option<&str>) -> Option<&str> {
        number.and_then(|n| self.instructions_by_number.get(n)).or(self.instructions.as_ref()).map(String::as_str)
    }
}

/// What a Realtime agent leg tracks to truncate after a barge-in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RealtimeState {
    /// The assistant item now being queued, and how many samples of it were queued.
    pub item: Option<(String, u64)>,
    /// The item a barge-in interrupted: its deltas still in flight from the model (sent before it
    /// cancelled the response) are dropped, not played after the `clear`.
    pub interrupted: Option<String>,
    /// What the caller heard of the items: marks sent to a Twilio caller and its echoes, and the
    /// pacer's playout model for a caller that does not echo.
    pub heard: super::heard::Heard,
}

/// The operator's agent settings: a default URL and the hosts per-call URLs may name.
#[derive(Debug, Clone, Default)]
pub struct AgentPolicy {
    /// Dialled for every call that names no agent of its own.
    pub default_url: Option<AgentUrl>,
    /// `host` or `host:port` entries; a per-call URL must match one.
    pub allow: Vec<String>,
    /// The Realtime upstream, for calls with no Twilio-protocol agent.
    pub realtime: Option<RealtimeAgent>,
    /// Upstream Retell custom-LLM server (`ws(s)://host/llm-websocket`; the call id is appended);
    /// `None`: the built-in responder answers.
    pub llm_upstream: Option<AgentUrl>,
}

impl AgentPolicy {
    /// The agent for a call: `requested` (a per-call `agentUrl`) when allowed, else the default.
    ///
    /// # Errors
    /// When `requested` is malformed or its host is not allowed.
    pub fn resolve(&self, requested: Option<&str>) -> Result<Option<AgentUrl>, AgentUrlError> {
        let Some(requested) = requested.filter(|r| !r.is_empty()) else { return Ok(self.default_url.clone()) };
        let url = AgentUrl::parse(requested)?;
        if self.default_url.as_ref() == Some(&url) || self.allows(&url) {
            Ok(Some(url))
        } else {
            Err(AgentUrlError::NotAllowed(url.host_header()))
        }
    }

    fn allows(&self, url: &AgentUrl) -> bool {
        self.allow.iter().any(|entry| {
            let entry = entry.trim();
            match entry.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() && !host.ends_with(':') => {
                    host.trim_start_matches('[').trim_end_matches(']').eq_ignore_ascii_case(&url.host)
                        && port.parse::<u16>().ok() == Some(url.port)
                }
                _ => entry.trim_start_matches('[').trim_end_matches(']').eq_ignore_ascii_case(&url.host),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ws and wss URLs parse with default ports; other schemes and userinfo are refused.
    #[test]
    fn parse_urls() {
        let u = AgentUrl::parse("ws://127.0.0.1:9000/media?x=1").expect("valid");
        assert_eq!((u.tls, u.host.as_str(), u.port, u.path.as_str()), (false, "127.0.0.1", 9000, "/media?x=1"));
        let u = AgentUrl::parse("wss://bot.example").expect("valid");
        assert_eq!((u.tls, u.port, u.path.as_str()), (true, 443, "/"));
        let u = AgentUrl::parse("ws://[::1]:8/").expect("valid");
        assert_eq!((u.host.as_str(), u.host_header()), ("::1", "[::1]:8".to_owned()));
        assert_eq!(AgentUrl::parse("http://x/"), Err(AgentUrlError::Invalid));
        assert_eq!(AgentUrl::parse("ws://user:pw@x/"), Err(AgentUrlError::Invalid));
        assert_eq!(AgentUrl::parse("nonsense"), Err(AgentUrlError::Invalid));
        let secret = AgentUrl::parse("wss://bot.example/m?api_key=SECRET").expect("valid");
        assert_eq!(secret.to_string(), "wss://bot.example:443/m?…", "queries never reach logs or listeners");
        assert!(!format!("{secret:?}").contains("SECRET"));
    }

    /// Per-call URLs need an allow-list entry (host, or host:port exactly); the default is used otherwise.
    #[test]
    fn policy() {
        let p = AgentPolicy {
            realtime: None,
            llm_upstream: None,
            default_url: Some(AgentUrl::parse("ws://default:1/").expect("valid")),
            allow: vec!["bots.example".into(), "127.0.0.1:9000".into()],
        };
        assert_eq!(p.resolve(None).expect("ok").expect("default").host, "default");
        assert_eq!(p.resolve(Some("")).expect("ok").expect("default").host, "default");
        assert!(p.resolve(Some("wss://bots.example/x")).is_ok());
        assert!(p.resolve(Some("ws://127.0.0.1:9000/x")).is_ok());
        assert_eq!(p.resolve(Some("ws://127.0.0.1:9001/x")), Err(AgentUrlError::NotAllowed("127.0.0.1:9001".into())));
        assert_eq!(p.resolve(Some("ws://evil.example/")), Err(AgentUrlError::NotAllowed("evil.example:80".into())));
        assert!(p.resolve(Some("ws://default:1/")).is_ok(), "the default is always allowed");
        assert!(AgentPolicy::default().resolve(None).expect("ok").is_none());
    }
}
