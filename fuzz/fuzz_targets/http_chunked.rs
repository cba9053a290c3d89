//! Chunked request bodies: any bytes, fed whole or split at a fuzzer-chosen point, never panic,
//! give the same outcome and body either way, keep the decoded body within its limit and end
//! within the input. Round trip: any body, chunked with any sizes, extension and trailers and fed
//! in fuzzer-sized pieces, decodes to itself and ends exactly where its encoding ends; with a
//! limit one byte short it is refused as too large.
#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use relay_engine::config::Limits;
use relay_engine::proto::chunked::{encode, ChunkError, ChunkedDecoder, Decode};

/// Feeds `pieces` in turn; the outcome (with `used` counted from the start of all the input) and
/// the body.
fn feed(decoder: &mut ChunkedDecoder, pieces: &[&[u8]]) -> (Result<Decode, ChunkError>, Vec<u8>) {
    let mut body = Vec::new();
    let mut before = 0;
    for piece in pieces {
        match decoder.decode(piece, &mut body) {
            Ok(Decode::Incomplete) => before += piece.len(),
            Ok(Decode::Complete { used }) => {
                assert!(used <= piece.len(), "used {used} of a {}-byte piece", piece.len());
                return (Ok(Decode::Complete { used: before + used }), body);
            }
            Err(e) => return (Err(e), body),
        }
    }
    (Ok(Decode::Incomplete), body)
}

fuzz_target!(|data: &[u8]| {
    // Any bytes, with small limits so that they are reached.
    let limits = Limits { max_body_bytes: 64, max_head_bytes: 64, max_headers: 3, ..Limits::default() };
    let cut = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let (whole, whole_body) = feed(&mut ChunkedDecoder::for_request(&limits), &[data]);
    let (split, split_body) = feed(&mut ChunkedDecoder::for_request(&limits), &[&data[..cut], &data[cut..]]);
    assert_eq!(whole, split, "split at {cut}");
    if whole.is_ok() {
        assert_eq!(whole_body, split_body);
    }
    assert!(whole_body.len() <= limits.max_body_bytes);
    if let Ok(Decode::Complete { used }) = whole {
        assert!(used <= data.len());
    }

    // Round trip.
    let mut u = Unstructured::new(data);
    let Ok(len) = u.int_in_range(0..=512usize) else { return };
    let Ok(body) = u.bytes(len.min(u.len())).map(<[u8]>::to_vec) else { return };
    let sizes: Vec<usize> =
        (0..u.int_in_range(0..=6).unwrap_or(0)).map(|_| u.int_in_range(0..=80).unwrap_or(1)).collect();
    let extension: String = (0..u.int_in_range(0..=24).unwrap_or(0))
        .filter_map(|_| u.choose(b"abcXYZ019=;\" \t!#~.-").ok().map(|&b| b as char))
        .collect();
    let names = ["x-a", "checksum", "t"];
    let trailers: Vec<(&str, String)> = (0..u.int_in_range(0..=3).unwrap_or(0))
        .map(|i| {
            let v: String = (0..u.int_in_range(0..=12).unwrap_or(0))
                .map(|_| u.int_in_range(0x21u8..=0x7e).map_or('v', char::from))
                .collect();
            (names[i], v)
        })
        .collect();
    let trailer_refs: Vec<(&str, &str)> = trailers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let pieces: Vec<usize> =
        (0..u.int_in_range(1..=8).unwrap_or(1)).map(|_| u.int_in_range(1..=64).unwrap_or(1)).collect();
    let mut wire = encode(&body, &sizes, &extension, &trailer_refs);
    let end = wire.len();
    wire.extend_from_slice(u.take_rest());
    let mut split = Vec::new();
    let mut at = 0;
    for n in pieces.iter().cycle() {
        if at >= wire.len() {
            break;
        }
        let next = (at + n).min(wire.len());
        split.push(&wire[at..next]);
        at = next;
    }
    let limits = Limits { max_body_bytes: body.len(), ..Limits::default() };
    let (outcome, decoded) = feed(&mut ChunkedDecoder::for_request(&limits), &split);
    assert_eq!(outcome, Ok(Decode::Complete { used: end }), "{:?}", String::from_utf8_lossy(&wire[..end]));
    assert_eq!(decoded, body);
    if !body.is_empty() {
        let short = Limits { max_body_bytes: body.len() - 1, ..Limits::default() };
        let (outcome, _) = feed(&mut ChunkedDecoder::for_request(&short), &split);
        assert_eq!(outcome, Err(ChunkError::TooLarge { limit: body.len() - 1 }));
    }
});
