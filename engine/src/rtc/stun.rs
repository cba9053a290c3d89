//! Just enough STUN (RFC 8489) to route a binding request to its peer: the local ICE ufrag in its
//! `USERNAME` attribute. Everything else about STUN (integrity, responses) is str0m's.
//!
//! Invariant: total over any bytes; reads only inside the datagram and the message's own length.

/// First bytes of a datagram, as RFC 7983 demultiplexes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 0–3: STUN.
    Stun,
    /// 20–63: DTLS.
    Dtls,
    /// 128–191: RTP or RTCP.
    Rtp,
    /// Anything else (including empty datagrams): not ours.
    Other,
}

/// What an incoming datagram is, by its first byte.
pub fn kind(datagram: &[u8]) -> Kind {
    match datagram.first() {
        Some(0..=3) => Kind::Stun,
        Some(20..=63) => Kind::Dtls,
        Some(128..=191) => Kind::Rtp,
        _ => Kind::Other,
    }
}

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
const HEADER: usize = 20;
const USERNAME: u16 = 0x0006;
/// Binding request (method 0x001, class request).
const BINDING_REQUEST: u16 = 0x0001;

/// The recipient's ufrag of a STUN binding request (`USERNAME` is `recipient:sender`), if
/// `datagram` is one and carries a well-formed `USERNAME`.
pub fn request_ufrag(datagram: &[u8]) -> Option<&str> {
    if datagram.len() < HEADER || datagram[4..8] != MAGIC_COOKIE {
        return None;
    }
    if u16::from_be_bytes([datagram[0], datagram[1]]) != BINDING_REQUEST {
        return None;
    }
    let length = usize::from(u16::from_be_bytes([datagram[2], datagram[3]]));
    let body = datagram.get(HEADER..HEADER.checked_add(length)?)?;
    let mut rest = body;
    while rest.len() >= 4 {
        let kind = u16::from_be_bytes([rest[0], rest[1]]);
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        let value = rest.get(4..4 + len)?;
        if kind == USERNAME {
            let username = std::str::from_utf8(value).ok()?;
            let (local, _) = username.split_once(':')?;
            return (!local.is_empty()).then_some(local);
        }
        // Attributes are padded to four bytes.
        let padded = (len + 3) & !3;
        rest = rest.get(4 + padded..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn binding(username: &[u8]) -> Vec<u8> {
        let mut attrs = Vec::new();
        // An attribute before USERNAME, to walk past: PRIORITY (0x0024), 4 bytes.
        attrs.extend_from_slice(&[0x00, 0x24, 0x00, 0x04, 1, 2, 3, 4]);
        attrs.extend_from_slice(&USERNAME.to_be_bytes());
        attrs.extend_from_slice(&u16::try_from(username.len()).expect("short").to_be_bytes());
        attrs.extend_from_slice(username);
        while attrs.len() % 4 != 0 {
            attrs.push(0);
        }
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&u16::try_from(attrs.len()).expect("short").to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE);
        m.extend_from_slice(&[7; 12]);
        m.extend_from_slice(&attrs);
        m
    }

    /// The recipient half of USERNAME comes back; anything malformed gives nothing.
    #[test]
    fn username() {
        assert_eq!(request_ufrag(&binding(b"relayUfrag:peer")), Some("relayUfrag"));
        assert_eq!(request_ufrag(&binding(b"abc:d")), Some("abc"));
        assert_eq!(request_ufrag(&binding(b"nocolon")), None);
        assert_eq!(request_ufrag(&binding(b":peer")), None);
        assert_eq!(request_ufrag(&binding(&[0xff, b':', b'x'])), None, "not UTF-8");
        let mut response = binding(b"a:b");
        response[0] = 0x01; // binding success response
        assert_eq!(request_ufrag(&response), None);
        let mut cookie = binding(b"a:b");
        cookie[4] = 0;
        assert_eq!(request_ufrag(&cookie), None);
        let full = binding(b"a:b");
        for cut in 0..full.len() {
            assert_eq!(request_ufrag(&full[..cut]), None, "truncated at {cut}");
        }
        assert_eq!(kind(&full), Kind::Stun);
        assert_eq!(kind(&[22, 254, 253]), Kind::Dtls);
        assert_eq!(kind(&[0x80, 111]), Kind::Rtp);
        assert_eq!(kind(&[]), Kind::Other);
        assert_eq!(kind(&[200]), Kind::Other);
    }

    proptest! {
        /// Any bytes at all: no panic, and a found ufrag is a non-empty part of the datagram.
        #[test]
        fn total(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Some(u) = request_ufrag(&bytes) {
                prop_assert!(!u.is_empty() && u.len() < bytes.len());
            }
        }
    }
}
