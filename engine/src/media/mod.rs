//! Media types shared by sessions and legs.
//!
//! Invariant: pure data and arithmetic: no clocks, no I/O.

pub mod g711;
pub mod opus;
pub mod pacer;
pub mod pcm;
pub mod playout;
pub mod resample;
pub mod vad;

/// A PCM sample rate the API accepts for raw samples on `/ws` (`sampleRate` of `/start-call`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SampleRate {
    /// 8 kHz (telephony).
    Hz8000,
    /// 16 kHz (the default).
    Hz16000,
    /// 24 kHz.
    Hz24000,
    /// 48 kHz (WebRTC's Opus clock).
    Hz48000,
}

impl SampleRate {
    /// The rate `/start-call` uses when none is given.
    pub const DEFAULT: Self = Self::Hz16000;

    /// The rate for `hz`, if it is one the API accepts.
    pub fn from_hz(hz: u64) -> Option<Self> {
        match hz {
            8000 => Some(Self::Hz8000),
            16000 => Some(Self::Hz16000),
            24000 => Some(Self::Hz24000),
            48000 => Some(Self::Hz48000),
            _ => None,
        }
    }

    /// Samples per second.
    pub fn hz(self) -> u32 {
        match self {
            Self::Hz8000 => 8000,
            Self::Hz16000 => 16000,
            Self::Hz24000 => 24000,
            Self::Hz48000 => 48000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exactly the four documented rates round-trip; others are refused.
    #[test]
    fn rates() {
        for hz in [8000, 16000, 24000, 48000] {
            assert_eq!(SampleRate::from_hz(hz).map(|r| u64::from(r.hz())), Some(hz));
        }
        for hz in [0, 1, 11025, 22050, 44100, 96000] {
            assert_eq!(SampleRate::from_hz(hz), None);
        }
    }
}
