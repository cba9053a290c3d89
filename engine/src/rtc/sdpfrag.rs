//! RFC 8840 `application/trickle-ice-sdpfrag` bodies, as WHIP and WHEP clients `PATCH` them
//! (RFC 9725 §4.3): the ICE credentials, the media sections by `a=mid`, the trickled candidates
//! and `a=end-of-candidates`; and the relay's own answer fragment after an ICE restart.
//!
//! Invariant: total and bounded: any text is a fragment or a [`FragmentError`]; size, lines,
//! line length and candidates are capped before anything is kept; no str0m types.

/// The largest fragment accepted, bytes.
pub const MAX_FRAGMENT_BYTES: usize = 16 * 1024;
/// The most lines a fragment may have (blank lines included).
pub const MAX_LINES: usize = 128;
/// The most candidates one fragment may carry (a browser gathers a handful per interface).
pub const MAX_CANDIDATES: usize = 32;
/// The longest line, bytes (a candidate line is well under 300).
pub const MAX_LINE_BYTES: usize = 1024;

/// A parsed trickle-ICE fragment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IceFragment {
    /// `a=ice-ufrag`: the client's ICE username fragment (the same for a trickle, new for a
    /// restart).
    pub ufrag: Option<String>,
    /// `a=ice-pwd`: the client's ICE password.
    pub pwd: Option<String>,
    /// The `a=mid` of every media section, in order.
    pub mids: Vec<String>,
    /// The candidates, each as `candidate:…` (the attribute without `a=`), in order.
    pub candidates: Vec<String>,
    /// `a=end-of-candidates` was present: the client has gathered everything.
    pub end_of_candidates: bool,
}

/// Why a fragment was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FragmentError {
    /// Nothing but blank lines.
    #[error("the SDP fragment is empty")]
    Empty,
    /// Over [`MAX_FRAGMENT_BYTES`].
    #[error("the SDP fragment is over {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// Over [`MAX_LINES`].
    #[error("the SDP fragment has more than {limit} lines")]
    TooManyLines {
        /// The limit.
        limit: usize,
    },
    /// A line over [`MAX_LINE_BYTES`].
    #[error("line {line} of the SDP fragment is over {limit} bytes")]
    LineTooLong {
        /// The line number, from 1.
        line: usize,
        /// The limit.
        limit: usize,
    },
    /// Over [`MAX_CANDIDATES`].
    #[error("the SDP fragment has more than {limit} candidates")]
    TooManyCandidates {
        /// The limit.
        limit: usize,
    },
    /// A line that is neither `a=` nor `m=` (a whole SDP description, or not SDP at all).
    #[error("line {line} of the SDP fragment is neither an attribute (a=) nor a media line (m=)")]
    NotAFragment {
        /// The line number, from 1.
        line: usize,
    },
    /// A malformed `m=` or `a=mid` line, or an `a=mid` outside a media section.
    #[error("line {line} of the SDP fragment: {why}")]
    BadSection {
        /// The line number, from 1.
        line: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// An `a=candidate` line that does not follow RFC 8839's grammar.
    #[error("line {line} of the SDP fragment is not a valid candidate: {why}")]
    BadCandidate {
        /// The line number, from 1.
        line: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// An `a=ice-ufrag` or `a=ice-pwd` of the wrong length or characters (RFC 8839 §5.4).
    #[error(
        "the SDP fragment's {what} is not valid (RFC 8839: ufrag 4-256, pwd 22-256 characters of A-Z a-z 0-9 + /)"
    )]
    BadCredential {
        /// `a=ice-ufrag` or `a=ice-pwd`.
        what: &'static str,
    },
    /// Two different values for the same credential.
    #[error("the SDP fragment has two different {what} values")]
    Conflicting {
        /// `a=ice-ufrag` or `a=ice-pwd`.
        what: &'static str,
    },
}

impl IceFragment {
    /// Parses `text` (CRLF or LF line ends).
    ///
    /// Attributes other than the ones kept (`a=ice-options`, `a=group`, `a=ice-lite`…) are
    /// ignored, as RFC 8840 lets a receiver do.
    ///
    /// # Errors
    /// [`FragmentError`] naming the first problem (and its line).
    pub fn parse(text: &str) -> Result<Self, FragmentError> {
        if text.len() > MAX_FRAGMENT_BYTES {
            return Err(FragmentError::TooLarge { limit: MAX_FRAGMENT_BYTES });
        }
        let mut fragment = Self::default();
        let mut in_section = false;
        let mut any = false;
        for (index, raw) in text.split('\n').enumerate() {
            let line = index + 1;
            if line > MAX_LINES {
                return Err(FragmentError::TooManyLines { limit: MAX_LINES });
            }
            if raw.len() > MAX_LINE_BYTES {
                return Err(FragmentError::LineTooLong { line, limit: MAX_LINE_BYTES });
            }
            let l = raw.strip_suffix('\r').unwrap_or(raw);
            if l.trim().is_empty() {
                continue;
            }
            any = true;
            if let Some(m) = l.strip_prefix("m=") {
                if m.split(' ').filter(|f| !f.is_empty()).count() < 4 {
                    return Err(FragmentError::BadSection {
                        line,
                        why: "an m= line has media, port, proto and formats",
                    });
                }
                in_section = true;
                continue;
            }
            let Some(attribute) = l.strip_prefix("a=") else {
                return Err(FragmentError::NotAFragment { line });
            };
            let (name, value) = attribute.split_once(':').unwrap_or((attribute, ""));
            match name {
                "mid" => {
                    if !in_section {
                        return Err(FragmentError::BadSection { line, why: "a=mid outside a media section" });
                    }
                    if value.is_empty() || value.len() > 32 || !value.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(FragmentError::BadSection { line, why: "a=mid needs a token of 1-32 characters" });
                    }
                    fragment.mids.push(value.to_owned());
                }
                "ice-ufrag" => set_credential(&mut fragment.ufrag, value, "a=ice-ufrag", 4)?,
                "ice-pwd" => set_credential(&mut fragment.pwd, value, "a=ice-pwd", 22)?,
                "candidate" => {
                    if fragment.candidates.len() >= MAX_CANDIDATES {
                        return Err(FragmentError::TooManyCandidates { limit: MAX_CANDIDATES });
                    }
                    check_candidate(value).map_err(|why| FragmentError::BadCandidate { line, why })?;
                    fragment.candidates.push(format!("candidate:{value}"));
                }
                "end-of-candidates" => fragment.end_of_candidates = true,
                _ => {}
            }
        }
        if any {
            Ok(fragment)
        } else {
            Err(FragmentError::Empty)
        }
    }
}

/// The fragment the relay answers an ICE restart with (RFC 9725 §4.3.2): its ICE-lite flag, new
/// credentials, and per media section its candidates and end-of-candidates (the relay gathers
/// nothing later).
pub fn restart_answer(ufrag: &str, pwd: &str, sections: &[(&str, &str)], candidates: &[&str]) -> String {
    let mut out = format!("a=ice-lite\r\na=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\n");
    for (m_line, mid) in sections {
        out.push_str(&format!("{m_line}\r\na=mid:{mid}\r\n"));
        for c in candidates {
            out.push_str(&format!("a={c}\r\n"));
        }
        out.push_str("a=end-of-candidates\r\n");
    }
    out
}

/// Whether `c` is an ICE character (RFC 8839: `ALPHA / DIGIT / "+" / "/"`).
fn ice_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'+' || c == b'/'
}

fn set_credential(slot: &mut Option<String>, value: &str, what: &'static str, min: usize) -> Result<(), FragmentError> {
    if !(min..=256).contains(&value.len()) || !value.bytes().all(ice_char) {
        return Err(FragmentError::BadCredential { what });
    }
    match slot {
        Some(v) if v != value => Err(FragmentError::Conflicting { what }),
        Some(_) => Ok(()),
        None => {
            *slot = Some(value.to_owned());
            Ok(())
        }
    }
}

/// Checks a candidate attribute's value against RFC 8839 §5.1: foundation, component, transport,
/// priority, address, port, `typ` and a type, then name/value extensions.
fn check_candidate(value: &str) -> Result<(), &'static str> {
    let mut f = value.split(' ').filter(|s| !s.is_empty());
    let foundation = f.next().ok_or("no foundation")?;
    if foundation.len() > 32 || !foundation.bytes().all(ice_char) {
        return Err("the foundation is 1-32 ICE characters");
    }
    let component = f.next().ok_or("no component id")?;
    if component.is_empty() || component.len() > 5 || !component.bytes().all(|b| b.is_ascii_digit()) {
        return Err("the component id is 1-5 digits");
    }
    let transport = f.next().ok_or("no transport")?;
    if !transport.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err("the transport is a token");
    }
    let priority = f.next().ok_or("no priority")?;
    if priority.len() > 10 || priority.parse::<u32>().is_err() {
        return Err("the priority is a 32-bit number");
    }
    let address = f.next().ok_or("no address")?;
    if address.len() > 255 || !address.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the address is an IP address or a host name");
    }
    let port = f.next().ok_or("no port")?;
    if port.parse::<u16>().is_err() {
        return Err("the port is a number up to 65535");
    }
    if f.next() != Some("typ") {
        return Err("typ and a candidate type follow the port");
    }
    let kind = f.next().ok_or("no candidate type")?;
    if !kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err("the candidate type is a token");
    }
    // Extensions come as name/value pairs (raddr, rport, generation, ufrag, network-id…).
    let mut count = 0;
    while let Some(_name) = f.next() {
        f.next().ok_or("an extension has a name and a value")?;
        count += 1;
        if count > 16 {
            return Err("too many extensions");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRICKLE: &str = "a=ice-options:trickle ice2\r\n\
        a=group:BUNDLE 0\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
        a=mid:0\r\n\
        a=ice-ufrag:EsAw\r\n\
        a=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1\r\n\
        a=candidate:1387637174 1 udp 2122260223 192.0.2.1 61764 typ host generation 0 ufrag EsAw network-id 1\r\n\
        a=candidate:473322822 1 tcp 1518280447 192.0.2.1 9 typ host tcptype active generation 0 ufrag EsAw\r\n\
        a=candidate:1 1 udp 1 4a5b.local 5000 typ host\r\n\
        a=end-of-candidates\r\n";

    /// RFC 9725's trickle example parses: credentials, mid, every candidate, end-of-candidates.
    #[test]
    fn rfc_example() {
        let f = IceFragment::parse(TRICKLE).expect("parses");
        assert_eq!(f.ufrag.as_deref(), Some("EsAw"));
        assert_eq!(f.pwd.as_deref(), Some("P2uYro0UCOQ4zxjKXaWCBui1"));
        assert_eq!(f.mids, vec!["0".to_owned()]);
        assert_eq!(f.candidates.len(), 3);
        assert!(f.candidates[0].starts_with("candidate:1387637174 1 udp"));
        assert!(f.end_of_candidates);
    }

    /// LF line ends, session-level credentials and a fragment with only end-of-candidates parse.
    #[test]
    fn minimal_forms() {
        let f = IceFragment::parse("a=ice-ufrag:abcd\na=ice-pwd:0123456789012345678901\n").expect("parses");
        assert_eq!(f.ufrag.as_deref(), Some("abcd"));
        assert!(f.candidates.is_empty() && f.mids.is_empty());
        let f = IceFragment::parse("a=end-of-candidates").expect("parses");
        assert!(f.end_of_candidates);
    }

    /// Each malformed input gets its own error, naming the line where there is one.
    #[test]
    fn refusals() {
        assert_eq!(IceFragment::parse(""), Err(FragmentError::Empty));
        assert_eq!(IceFragment::parse("\r\n\r\n"), Err(FragmentError::Empty));
        assert_eq!(IceFragment::parse("v=0\r\no=- 1 1 IN IP4 0.0.0.0"), Err(FragmentError::NotAFragment { line: 1 }));
        assert!(matches!(IceFragment::parse("a=mid:0"), Err(FragmentError::BadSection { line: 1, .. })));
        assert!(matches!(IceFragment::parse("m=audio 9\r\na=mid:0"), Err(FragmentError::BadSection { line: 1, .. })));
        assert_eq!(
            IceFragment::parse("a=ice-ufrag:abc"),
            Err(FragmentError::BadCredential { what: "a=ice-ufrag" }),
            "a ufrag has at least 4 characters"
        );
        assert_eq!(IceFragment::parse("a=ice-pwd:short"), Err(FragmentError::BadCredential { what: "a=ice-pwd" }));
        assert_eq!(
            IceFragment::parse("a=ice-ufrag:ab;d"),
            Err(FragmentError::BadCredential { what: "a=ice-ufrag" }),
            "only ICE characters"
        );
        assert_eq!(
            IceFragment::parse("a=ice-ufrag:abcd\r\na=ice-ufrag:abce"),
            Err(FragmentError::Conflicting { what: "a=ice-ufrag" })
        );
        for bad in [
            "a=candidate:",
            "a=candidate:1 1 udp",
            "a=candidate:1 x udp 1 192.0.2.1 5000 typ host",
            "a=candidate:1 1 udp 99999999999 192.0.2.1 5000 typ host",
            "a=candidate:1 1 udp 1 192.0.2.1 70000 typ host",
            "a=candidate:1 1 udp 1 192.0.2.1 5000 host",
            "a=candidate:1 1 udp 1 192.0.2.1 5000 typ host raddr",
        ] {
            assert!(
                matches!(IceFragment::parse(bad), Err(FragmentError::BadCandidate { line: 1, .. })),
                "{bad} is refused"
            );
        }
    }

    /// Size, line count, line length and candidate count are bounded.
    #[test]
    fn bounds() {
        let big = "a=x\r\n".repeat(MAX_FRAGMENT_BYTES / 5 + 1);
        assert_eq!(IceFragment::parse(&big), Err(FragmentError::TooLarge { limit: MAX_FRAGMENT_BYTES }));
        let many = "\n".repeat(MAX_LINES + 1);
        assert_eq!(IceFragment::parse(&many), Err(FragmentError::TooManyLines { limit: MAX_LINES }));
        let long = format!("a=x:{}", "y".repeat(MAX_LINE_BYTES));
        assert_eq!(IceFragment::parse(&long), Err(FragmentError::LineTooLong { line: 1, limit: MAX_LINE_BYTES }));
        let candidates = "a=candidate:1 1 udp 1 192.0.2.1 5000 typ host\n".repeat(MAX_CANDIDATES + 1);
        assert_eq!(IceFragment::parse(&candidates), Err(FragmentError::TooManyCandidates { limit: MAX_CANDIDATES }));
    }

    /// The restart answer names the new credentials once and every section's candidates.
    #[test]
    fn restart_answer_parses_back() {
        let text = restart_answer(
            "newufrag",
            "0123456789012345678901",
            &[("m=audio 9 UDP/TLS/RTP/SAVPF 111", "0")],
            &["candidate:1 1 udp 2130706431 127.0.0.1 4000 typ host"],
        );
        let f = IceFragment::parse(&text).expect("our own fragment parses");
        assert_eq!(f.ufrag.as_deref(), Some("newufrag"));
        assert_eq!(f.mids, vec!["0".to_owned()]);
        assert_eq!(f.candidates.len(), 1);
        assert!(f.end_of_candidates && text.starts_with("a=ice-lite\r\n"));
    }
}
