//! One client's deep pipeline cannot monopolise its core: the relay yields between requests, so a
//! second client on the same core is served while the pipeline is still being answered.
//!
//! Over loopback, TCP flow control also makes the relay wait for more data about once per receive
//! window (~200 KiB of requests here), which gives other connections a turn even without the yield;
//! the test pins the behaviour (served mid-flood), whichever of the two provides it.

use std::io::{Read as _, Write as _};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use relay_tests::{assert_success, poll_until, set_send_buffer, Conn, Relay};

/// Rounds of [`PATTERN`] in the flood: 16,000 requests, about a second of work for a debug build.
const ROUNDS: usize = 4_000;
/// The flood's requests, repeated: bodiless answers (HEAD) keep the client's reading cheap, so the
/// relay never waits on a slow reader; `/health/detailed` costs the relay some work; the status of
/// `/call-status` shows whether the probe session existed yet when the relay answered it.
const PATTERN: &[&[u8]] = &[
    b"HEAD /call-status?sessionId=probe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD /health/detailed HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD /health/detailed HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD /health/detailed HTTP/1.1\r\nHost: x\r\n\r\n",
];

/// While thousands of pipelined requests are answered on one core, a new client is served too.
#[test]
fn pipeline_flood_does_not_starve_the_core() {
    let requests = ROUNDS * PATTERN.len();
    let relay = Relay::start(&["--cores", "1"]);
    let (stream, _) = Conn::open(relay.addr()).into_parts();
    set_send_buffer(&stream, 4 << 20);
    let mut writer = stream.try_clone().expect("clone the flood socket");
    let mut reader = stream;
    let answered = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicBool::new(false));

    // The whole pipeline in one write, which the enlarged send buffer takes at once.
    let flood_writer = thread::spawn(move || {
        let pipeline: Vec<u8> = PATTERN.concat().repeat(ROUNDS);
        writer.write_all(&pipeline).expect("write the pipeline");
    });
    // Reads the answers' heads as they come: every detailed-health answer must be 200; the probe's
    // statuses are tallied in order as (status, run length).
    let flood_reader = {
        let (answered, finished) = (answered.clone(), finished.clone());
        thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 256 * 1024];
            let mut probe: Vec<(u16, usize)> = Vec::new();
            let mut count = 0;
            while count < requests {
                let n = reader.read(&mut chunk).expect("read flood answers");
                assert!(n > 0, "flood connection closed after {count} answers");
                buf.extend_from_slice(&chunk[..n]);
                let mut at = 0;
                while let Some(end) = buf[at..].windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = &buf[at..at + end];
                    let status = head
                        .strip_prefix(b"HTTP/1.1 ")
                        .and_then(|rest| std::str::from_utf8(rest.get(..3)?).ok()?.parse::<u16>().ok())
                        .unwrap_or_else(|| panic!("answer {count}: {:?}", String::from_utf8_lossy(head)));
                    if count % PATTERN.len() == 0 {
                        match probe.last_mut() {
                            Some((s, run)) if *s == status => *run += 1,
                            _ => probe.push((status, 1)),
                        }
                    } else {
                        assert_eq!(status, 200, "answer {count} (detailed health)");
                    }
                    count += 1;
                    at += end + 4;
                }
                buf.drain(..at);
                answered.store(count, Ordering::SeqCst);
            }
            finished.store(true, Ordering::SeqCst);
            probe
        })
    };

    poll_until("the flood to be under way", || (answered.load(Ordering::SeqCst) > 0).then_some(()));
    // A second client, on a connection of its own opened mid-flood.
    let start = relay.start_call("probe", "t");
    let flood_unfinished = !finished.load(Ordering::SeqCst);
    let answered_by_then = answered.load(Ordering::SeqCst);
    assert_success(&start, "Call started successfully");

    flood_writer.join().expect("flood writer");
    let probe = flood_reader.join().expect("flood reader");
    assert!(
        flood_unfinished,
        "the second client was answered only after all {requests} pipelined requests ({answered_by_then} seen)"
    );
    // The relay's own order: the flood's probes saw no session (404) until the second client's
    // start, and the session (200) after it.
    assert!(
        probe.len() == 2 && probe[0].0 == 404 && probe[1].0 == 200,
        "probe statuses in order, as (status, count): {probe:?}"
    );
}
