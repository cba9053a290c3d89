//! Credentials: the API key on control endpoints and the bearer/query tokens of event sockets.
//!
//! Invariant: secrets are compared in constant time and never logged.

use http::{header, HeaderMap};
use relay_engine::core::Credential;
use relay_engine::secret::Secret;

/// The token in `Authorization: Bearer <token>`, if present.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim()).filter(|t| !t.is_empty())
}

/// Whether the request carries the API key (always true when none is configured).
pub fn has_api_key(api_key: Option<&Secret>, headers: &HeaderMap) -> bool {
    match api_key {
        None => true,
        Some(key) => bearer(headers).is_some_and(|t| key.matches(t)),
    }
}

/// What an event socket presented: the API key, a session token (header, or the `accessToken`
/// query parameter browsers must use), or nothing.
pub fn credential(api_key: Option<&Secret>, headers: &HeaderMap, query_token: Option<String>) -> Credential {
    let token = bearer(headers).map(str::to_owned).or(query_token);
    match token {
        Some(t) if api_key.is_some_and(|k| k.matches(&t)) => Credential::Operator,
        Some(t) => Credential::Token(Secret::new(t)),
        None => Credential::Anonymous,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).expect("ascii"));
        h
    }

    /// Bearer parsing is case-insensitive in the scheme and exact in the token.
    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer(&headers("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&headers("bearer abc")), Some("abc"));
        assert_eq!(bearer(&headers("Basic abc")), None);
        assert_eq!(bearer(&headers("Bearer ")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    /// The API key gates only when configured; sockets get operator, token or anonymous.
    #[test]
    fn keys_and_credentials() {
        let key = Secret::new("k");
        assert!(has_api_key(None, &HeaderMap::new()));
        assert!(!has_api_key(Some(&key), &HeaderMap::new()));
        assert!(!has_api_key(Some(&key), &headers("Bearer x")));
        assert!(has_api_key(Some(&key), &headers("Bearer k")));
        assert!(matches!(credential(Some(&key), &headers("Bearer k"), None), Credential::Operator));
        assert!(matches!(credential(Some(&key), &HeaderMap::new(), Some("t".into())), Credential::Token(_)));
        assert!(matches!(credential(None, &HeaderMap::new(), None), Credential::Anonymous));
    }
}
