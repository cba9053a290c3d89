//! G.711 μ-law ⇄ 16-bit linear PCM, bit-exact with ITU-T G.191's reference `ulaw_compress` /
//! `ulaw_expand` (the implementation that accompanies G.711) for every input.
//!
//! Invariant: pure integer arithmetic on caller-owned buffers: no allocation, no state, no panics.

/// The μ-law code of linear 0; a silent telephony frame is filled with it.
pub const SILENCE: u8 = 0xFF;

/// Linear value of a μ-law `code` (one lookup in a table built at compile time).
#[inline]
pub fn decode(code: u8) -> i16 {
    DECODE[usize::from(code)]
}

/// μ-law code of a linear `sample`, by table.
///
/// The code depends only on the sample's sign and its 14-bit magnitude (`magnitude >> 2`, after
/// the clip), so an 8 KiB table built at compile time holds every code; the sign is one bit.
/// Negative samples take G.191's one's-complement magnitude (`!x`, i.e. `-x - 1`), which is what
/// makes this bit-exact with the ITU reference (Sun's popular `linear2ulaw` negates instead and
/// differs on 127 negative inputs).
#[inline]
pub fn encode(sample: i16) -> u8 {
    // Bit 7 of the code before inversion: set for negative samples (`>> 8` keeps the sign bit).
    let sign = (sample >> 8) as u8 & 0x80;
    // x for x >= 0, !x for x < 0: 0..=32767.
    let magnitude = (sample ^ (sample >> 15)) as u16;
    let index = usize::from(magnitude.min(CLIP as u16) >> 2);
    !(sign | ENCODE[index])
}

/// Decodes `codes` into `out`, one sample per code, and returns how many were decoded.
///
/// Processes `min(codes.len(), out.len())` items; the rest of the longer slice is left alone.
pub fn decode_into(codes: &[u8], out: &mut [i16]) -> usize {
    let n = codes.len().min(out.len());
    for (sample, &code) in out.iter_mut().zip(codes) {
        *sample = decode(code);
    }
    n
}

/// Encodes `samples` into `out`, one code per sample, and returns how many were encoded.
///
/// Processes `min(samples.len(), out.len())` items; the rest of the longer slice is left alone.
pub fn encode_into(samples: &[i16], out: &mut [u8]) -> usize {
    let n = samples.len().min(out.len());
    for (code, &sample) in out.iter_mut().zip(samples) {
        *code = encode(sample);
    }
    n
}

/// Linear value of every code, indexed by code.
static DECODE: [i16; 256] = decode_table();

/// Segment and mantissa (the code's low 7 bits, before sign and inversion) for each 14-bit
/// magnitude `0..=CLIP >> 2`.
static ENCODE: [u8; (CLIP as usize >> 2) + 1] = encode_table();

/// The G.711 segment search, run once at compile time for every magnitude the table holds.
const fn encode_table() -> [u8; (CLIP as usize >> 2) + 1] {
    let mut table = [0u8; (CLIP as usize >> 2) + 1];
    let mut i = 0;
    while i < table.len() {
        // `(m + BIAS) >> 2 == (m >> 2) + BIAS / 4` for every m, since BIAS is a multiple of 4, and
        // the bits below 2 never reach the code: index `i` stands for magnitudes 4i..4i+3.
        let biased = ((i as u32) << 2) + BIAS;
        // `biased >> 7` is 1..=255, so this is floor(log2) in 0..=7.
        let segment = 31 - (biased >> 7).leading_zeros();
        let mantissa = (biased >> (segment + 3)) & 0x0F;
        table[i] = ((segment << 4) | mantissa) as u8;
        i += 1;
    }
    table
}

/// `ulaw2linear` for every code, at compile time.
const fn decode_table() -> [i16; 256] {
    let mut table = [0i16; 256];
    let mut code = 0usize;
    while code < 256 {
        // `code < 256`, so the cast is lossless.
        let inverted = !(code as u8);
        let mantissa = (inverted & 0x0F) as i32;
        let segment = ((inverted & 0x70) >> 4) as i32;
        let magnitude = ((mantissa << 3) + BIAS as i32) << segment;
        // |magnitude - BIAS| <= 32124, so the cast to i16 is lossless.
        table[code] =
            if inverted & 0x80 != 0 { (BIAS as i32 - magnitude) as i16 } else { (magnitude - BIAS as i32) as i16 };
        code += 1;
    }
    table
}

/// Added to the magnitude before encoding so that every segment boundary is a power of two.
const BIAS: u32 = 0x84;

/// Largest magnitude encoded exactly; larger ones take the top code (so `BIAS + CLIP` fits 15 bits).
const CLIP: u32 = 32635;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// ITU-T G.191's `ulaw_compress` (the G.711 reference implementation), ported line by line:
    /// 14-bit magnitude with one's-complement negation, bias 33, clip 0x1FFF.
    fn g191_ulaw_compress(linear: i16) -> u8 {
        let x = i32::from(linear);
        let mut absno = if x < 0 { ((!x) >> 2) + 33 } else { (x >> 2) + 33 };
        if absno > 0x1FFF {
            absno = 0x1FFF;
        }
        let mut i = absno >> 6;
        let mut segno = 1;
        while i != 0 {
            segno += 1;
            i >>= 1;
        }
        let high_nibble = 0x0008 - segno;
        let low_nibble = 0x000F - ((absno >> segno) & 0x000F);
        let mut log = (high_nibble << 4) | low_nibble;
        if x >= 0 {
            log |= 0x0080;
        }
        log as u8
    }

    /// ITU-T G.191's `ulaw_expand`, ported line by line.
    fn g191_ulaw_expand(code: u8) -> i16 {
        let log = i32::from(code);
        let sign = if log < 0x80 { -1 } else { 1 };
        let mantissa = !log;
        let exponent = (mantissa >> 4) & 0x07;
        let segment = exponent + 1;
        let mantissa = mantissa & 0x0F;
        let step = 4 << segment;
        (sign * ((0x80 << exponent) + step * mantissa + step / 2 - 4 * 33)) as i16
    }

    /// Sun's `ulaw2linear`, computed at run time.
    fn sun_ulaw2linear(code: u8) -> i16 {
        let u = i32::from(!code);
        let t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4);
        (if u & 0x80 != 0 { 0x84 - t } else { t - 0x84 }) as i16
    }

    /// The documented anchor values of the μ-law curve.
    #[test]
    fn known_values() {
        assert_eq!(decode(0x00), -32124);
        assert_eq!(decode(0x80), 32124);
        assert_eq!(decode(0xFF), 0);
        assert_eq!(decode(0x7F), 0);
        assert_eq!(decode(0xFE), 8);
        assert_eq!(decode(0x7E), -8);
        assert_eq!(decode(0xF0), 120);
        assert_eq!(decode(0xEF), 132);
        assert_eq!(decode(SILENCE), 0);
        assert_eq!(encode(0), SILENCE);
        assert_eq!(encode(i16::MAX), 0x80);
        assert_eq!(encode(i16::MIN), 0x00);
        assert_eq!(encode(-1), 0x7F);
        assert_eq!(encode(1), 0xFF);
        assert_eq!(encode(4), 0xFE);
        assert_eq!(encode(-4), 0x7F, "G.191: -4 has one's-complement magnitude 3, still in the zero bin");
        assert_eq!(encode(-5), 0x7E);
        assert_eq!(encode(1000), 0xCE);
        assert_eq!(encode(-1000), 0x4E);
        assert_eq!(encode(32635), 0x80);
        for (sample, code) in [(0, 0xFF), (1000, 0xCE), (-1000, 0x4E), (4, 0xFE), (-4, 0x7F), (-5, 0x7E), (12345, 0x97)]
        {
            assert_eq!(g191_ulaw_compress(sample), code, "{sample}");
            assert_eq!(encode(sample), code, "{sample}");
        }
    }

    /// The compile-time table equals G.191's `ulaw_expand` for all 256 codes.
    #[test]
    fn decode_table_matches_reference() {
        for code in 0..=255u8 {
            assert_eq!(decode(code), g191_ulaw_expand(code), "code {code:#04x}");
            assert_eq!(decode(code), sun_ulaw2linear(code), "the two classic decoders agree at {code:#04x}");
        }
    }

    /// `encode` equals G.191's `ulaw_compress` for all 65536 inputs.
    #[test]
    fn encode_matches_reference_exhaustively() {
        for sample in i16::MIN..=i16::MAX {
            assert_eq!(encode(sample), g191_ulaw_compress(sample), "sample {sample}");
        }
    }

    /// Every code survives decode then encode, except 0x7F (negative zero), which becomes 0xFF.
    #[test]
    fn encode_inverts_decode() {
        for code in 0..=255u8 {
            let expected = if code == 0x7F { 0xFF } else { code };
            assert_eq!(encode(decode(code)), expected, "code {code:#04x}");
        }
    }

    /// Decoding rises strictly over 0x00..=0x7F and falls strictly over 0x80..=0xFF.
    #[test]
    fn decode_is_monotonic_per_half() {
        for code in 0x00..0x7Fu8 {
            assert!(decode(code) < decode(code + 1), "negative half at {code:#04x}");
        }
        for code in 0x80..0xFFu8 {
            assert!(decode(code) > decode(code + 1), "positive half at {code:#04x}");
        }
    }

    /// The slice forms agree with the scalar ones and stop at the shorter slice.
    #[test]
    fn slice_forms() {
        let samples = [0i16, 1, -1, 1000, -1000, i16::MAX, i16::MIN];
        let mut codes = [0u8; 5];
        assert_eq!(encode_into(&samples, &mut codes), 5);
        assert_eq!(codes, [0xFF, 0xFF, 0x7F, 0xCE, 0x4E]);
        let mut out = [7i16; 8];
        assert_eq!(decode_into(&codes, &mut out), 5);
        assert_eq!(out, [0, 0, 0, 988, -988, 7, 7, 7]);
        assert_eq!(encode_into(&[], &mut codes), 0);
        assert_eq!(decode_into(&codes, &mut []), 0);
    }

    proptest! {
        /// A round trip is off by at most half the quantisation step of the sample's segment
        /// (inputs beyond the clip level come back as the largest magnitude, ±32124).
        #[test]
        fn round_trip_error_within_half_step(x in any::<i16>()) {
            let code = encode(x);
            let back = i32::from(decode(code));
            let x = i32::from(x);
            if x.abs() <= 32635 {
                let segment = (!code >> 4) & 0x07;
                let half_step = 1i32 << (segment + 2);
                prop_assert!((back - x).abs() <= half_step, "x {} back {} segment {}", x, back, segment);
            } else {
                prop_assert_eq!(back, 32124 * x.signum());
            }
        }
    }
}
