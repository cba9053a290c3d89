//! `X-Twilio-Signature`: base64(HMAC-SHA1(auth token, URL + sorted form fields)).
//!
//! Invariant: comparison is constant-time; every URL form Twilio's own validator accepts (with and
//! without the default port) is tried, nothing looser.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use relay_engine::secret::Secret;
use sha1::Sha1;

/// The signature Twilio computes for a request to `url` with form `params` (empty for GET and
/// WebSocket upgrades).
pub fn compute(auth_token: &Secret, url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    // HMAC takes keys of any length, so construction cannot fail.
    let mut mac = Hmac::<Sha1>::new_from_slice(auth_token.expose().as_bytes()).expect("HMAC accepts any key length");
    mac.update(url.as_bytes());
    for (k, v) in sorted {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Whether `signature` matches a request to one of `urls` (each also tried with and without its
/// scheme's default port, as Twilio's validator does) with form `params`.
pub fn verify(auth_token: &Secret, signature: &str, urls: &[String], params: &[(String, String)]) -> bool {
    let provided = Secret::new(signature.trim());
    urls.iter().flat_map(|u| port_variants(u)).any(|u| provided.matches(&compute(auth_token, &u, params)))
}

/// `url` as given, plus the same URL with the default port added (when absent) or removed (when
/// present).
fn port_variants(url: &str) -> Vec<String> {
    let mut out = vec![url.to_owned()];
    let Some((scheme, rest)) = url.split_once("://") else { return out };
    let default = match scheme {
        "https" | "wss" => "443",
        "http" | "ws" => "80",
        _ => return out,
    };
    let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    if let Some(host) = authority.strip_suffix(&format!(":{default}")) {
        out.push(format!("{scheme}://{host}{path}"));
    } else if !authority.contains(':') || authority.ends_with(']') {
        out.push(format!("{scheme}://{authority}:{default}{path}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Vec<(String, String)> {
        [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
    }

    /// Twilio's documented example signs to its documented value.
    #[test]
    fn documented_example() {
        let token = Secret::new("12345");
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        assert_eq!(compute(&token, url, &params()), "0/KCTR6DLpKmkAf8muzZqo1nDgQ=");
        assert!(verify(&token, "0/KCTR6DLpKmkAf8muzZqo1nDgQ=", &[url.to_owned()], &params()));
    }

    /// A tampered parameter, URL or token fails; the port variants pass.
    #[test]
    fn tampering_fails_ports_pass() {
        let token = Secret::new("12345");
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        let sig = compute(&token, url, &params());
        let mut tampered = params();
        tampered[2].1 = "9999".into();
        assert!(!verify(&token, &sig, &[url.to_owned()], &tampered));
        assert!(!verify(&token, &sig, &["https://mycompany.com/other".to_owned()], &params()));
        assert!(!verify(&Secret::new("54321"), &sig, &[url.to_owned()], &params()));
        assert!(verify(&token, &sig, &["https://mycompany.com:443/myapp.php?foo=1&bar=2".to_owned()], &params()));
        let with_port = compute(&token, "https://mycompany.com:443/myapp.php?foo=1&bar=2", &params());
        assert!(verify(&token, &with_port, &[url.to_owned()], &params()));
    }

    /// Port variants add or strip only the scheme's default port.
    #[test]
    fn variants() {
        assert_eq!(port_variants("wss://h/x"), ["wss://h/x", "wss://h:443/x"]);
        assert_eq!(port_variants("http://h:80/x?a"), ["http://h:80/x?a", "http://h/x?a"]);
        assert_eq!(port_variants("http://h:8080/x"), ["http://h:8080/x"]);
    }
}
