//! Twilio's HTTP side: webhook signatures, form bodies and TwiML.
//!
//! Invariant: pure functions; no I/O and no secrets in error messages.

pub mod signature;
pub mod twiml;

/// Parses an `application/x-www-form-urlencoded` body into ordered pairs (`+` is a space).
pub fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(body);
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (crate::api::params::decode(k), crate::api::params::decode(v))
        })
        .collect()
}

/// The value of form field `name`, if present.
pub fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Form bodies decode `+`, percent escapes and empty values, in order.
    #[test]
    fn forms() {
        let f = parse_form(b"CallSid=CA1&From=%2B1555&Body=a+b&Empty=&Flag");
        assert_eq!(field(&f, "CallSid"), Some("CA1"));
        assert_eq!(field(&f, "From"), Some("+1555"));
        assert_eq!(field(&f, "Body"), Some("a b"));
        assert_eq!(field(&f, "Empty"), Some(""));
        assert_eq!(field(&f, "Flag"), Some(""));
        assert_eq!(field(&f, "Nope"), None);
        assert!(parse_form(b"").is_empty());
    }
}
