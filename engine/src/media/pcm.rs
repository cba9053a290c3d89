//! Small helpers on 16-bit PCM frames: saturating mixing, μ-law frames (over [`super::g711`]) and
//! conversion to floats for models that take them.
//!
//! Invariant: pure arithmetic; the only allocations are the returned `Bytes`/`Vec`, sized by the
//! input; no panics on any input.

use bytes::Bytes;

use super::g711;

/// Adds `add` into `acc` sample by sample, saturating at the i16 range; stops at the shorter.
pub fn mix_into(acc: &mut [i16], add: &[i16]) {
    for (a, &b) in acc.iter_mut().zip(add) {
        *a = a.saturating_add(b);
    }
}

/// Decodes a μ-law frame into `out` and returns the samples written (the shorter of the two).
pub fn ulaw_to_pcm(codes: &[u8], out: &mut [i16]) -> usize {
    g711::decode_into(codes, out)
}

/// Encodes `pcm` into μ-law codes in `out` and returns the codes written (the shorter of the two).
pub fn pcm_to_ulaw(pcm: &[i16], out: &mut [u8]) -> usize {
    g711::encode_into(pcm, out)
}

/// Encodes `pcm` as a new μ-law frame, for sharing with every listener of a call.
pub fn pcm_to_ulaw_bytes(pcm: &[i16]) -> Bytes {
    Bytes::from(pcm.iter().map(|&s| g711::encode(s)).collect::<Vec<u8>>())
}

/// `pcm` as floats in [-1, 1) (sample / 32768).
pub fn to_f32_samples(pcm: &[i16]) -> Vec<f32> {
    pcm.iter().map(|&s| f32::from(s) / 32768.0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Mixing adds, saturates at both ends, and leaves the tail of a longer `acc` alone.
    #[test]
    fn mixing() {
        let mut acc = [100, -100, 30000, -30000, 5];
        mix_into(&mut acc, &[1, -1, 10000, -10000]);
        assert_eq!(acc, [101, -101, i16::MAX, i16::MIN, 5]);
        mix_into(&mut acc[..1], &[1, 2, 3]);
        assert_eq!(acc[..2], [102, -101]);
    }

    /// μ-law frames go through the G.711 tables both ways.
    #[test]
    fn ulaw_frames() {
        let pcm = [0i16, 1000, -1000, i16::MAX];
        let mut codes = [0u8; 4];
        assert_eq!(pcm_to_ulaw(&pcm, &mut codes), 4);
        assert_eq!(codes, [0xFF, 0xCE, 0x4E, 0x80]);
        assert_eq!(&pcm_to_ulaw_bytes(&pcm)[..], &codes[..]);
        let mut back = [0i16; 5];
        assert_eq!(ulaw_to_pcm(&codes, &mut back), 4);
        assert_eq!(back, [0, 988, -988, 32124, 0]);
    }

    /// Floats span [-1, 1).
    #[test]
    fn floats() {
        assert_eq!(to_f32_samples(&[i16::MIN, 0, 16384, i16::MAX]), vec![-1.0, 0.0, 0.5, 32767.0 / 32768.0]);
        assert!(to_f32_samples(&[]).is_empty());
    }

    proptest! {
        /// Mixing equals the clamped wide sum for any samples.
        #[test]
        fn mix_is_clamped_sum(a in any::<i16>(), b in any::<i16>()) {
            let mut acc = [a];
            mix_into(&mut acc, &[b]);
            prop_assert_eq!(i32::from(acc[0]), (i32::from(a) + i32::from(b)).clamp(-32768, 32767));
        }
    }
}
