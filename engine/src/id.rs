//! Validated identifiers and the documented session → core hash.
//!
//! Invariant: an id that exists as a value has passed validation; nothing here allocates per call
//! except the parse that creates an owned id.

use std::fmt;

/// Longest id the API accepts, in bytes (API.md: 1–128 chars of `[A-Za-z0-9._:-]`).
pub const MAX_ID_LEN: usize = 128;

/// Why a string is not a valid id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The string is empty.
    #[error("must not be empty")]
    Empty,
    /// The string is longer than [`MAX_ID_LEN`] bytes.
    #[error("must be at most {MAX_ID_LEN} characters")]
    TooLong,
    /// The string has a byte outside `[A-Za-z0-9._:-]`.
    #[error("may contain only letters, digits, '.', '_', ':' and '-'")]
    InvalidChar,
}

fn validate(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong);
    }
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')) {
        return Err(IdError::InvalidChar);
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Box<str>);

        impl $name {
            /// Validates `s` and returns it as an id.
            ///
            /// # Errors
            /// [`IdError`] when `s` is empty, too long or has a character outside the allowed set.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                validate(s)?;
                Ok(Self(s.into()))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }
    };
}

string_id!(
    /// A call's key: `sessionId`, Twilio's `callSid` or Retell's `call_id` (one key space).
    SessionId
);
string_id!(
    /// A custom audio stream's id (`streamId` of `/send-custom-stream` and WHIP role=custom).
    StreamId
);

/// Index of a core (executor) in `0..cores`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct CoreId(pub usize);

impl fmt::Display for CoreId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A connection's number, unique within its core for the life of the process.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ConnectionId(pub u64);

/// 64-bit FNV-1a of the id's UTF-8 bytes: the documented, stable session hash.
///
/// Offset basis `0xcbf29ce484222325`, prime `0x100000001b3`. Load balancers and the bench compute
/// the same value to find a session's core; it must never change.
pub fn stable_hash(id: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_bytes() {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The core that owns `id` when the relay runs `cores` executors: `stable_hash(id) % cores`.
///
/// # Panics
/// When `cores` is zero (a relay always has at least one core).
pub fn core_for(id: &SessionId, cores: usize) -> CoreId {
    assert!(cores > 0, "a relay has at least one core");
    // The modulo is below `cores`, which is a usize, so the cast back cannot truncate.
    CoreId((stable_hash(id.as_str()) % cores as u64) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The hash matches FNV-1a's published test vectors, so it is the documented function.
    #[test]
    fn fnv1a_vectors() {
        assert_eq!(stable_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(stable_hash("foobar"), 0x8594_4171_f739_67e8);
    }

    /// Ids of the allowed set up to 128 chars parse; everything else is refused with its reason.
    #[test]
    fn id_validation() {
        assert!(SessionId::parse("session-123").is_ok());
        assert!(SessionId::parse("CA0123456789abcdef.x:y_z").is_ok());
        assert!(SessionId::parse(&"a".repeat(128)).is_ok());
        assert_eq!(SessionId::parse(""), Err(IdError::Empty));
        assert_eq!(SessionId::parse(&"a".repeat(129)), Err(IdError::TooLong));
        assert_eq!(SessionId::parse("a b"), Err(IdError::InvalidChar));
        assert_eq!(SessionId::parse("a/b"), Err(IdError::InvalidChar));
        assert_eq!(SessionId::parse("é"), Err(IdError::InvalidChar));
    }

    /// Every core gets a share of sequential ids, so the hash spreads real traffic.
    #[test]
    fn core_for_spreads() {
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            let id = SessionId::parse(&format!("session-{i}")).expect("valid id");
            counts[core_for(&id, 4).0] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread: {counts:?}");
        }
    }

    proptest! {
        /// core_for is always in range and equals the hash modulo the core count.
        #[test]
        fn core_for_in_range(s in "[A-Za-z0-9._:-]{1,128}", cores in 1usize..64) {
            let id = SessionId::parse(&s).expect("generated from the allowed set");
            let core = core_for(&id, cores);
            prop_assert!(core.0 < cores);
            prop_assert_eq!(core.0 as u64, stable_hash(&s) % cores as u64);
        }

        /// Parsing never panics, and accepts exactly the allowed set.
        #[test]
        fn parse_total(s in ".{0,140}") {
            let ok = !s.is_empty() && s.len() <= 128
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b".:_-".contains(&b));
            prop_assert_eq!(SessionId::parse(&s).is_ok(), ok);
        }
    }
}
