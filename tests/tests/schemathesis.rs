//! Schemathesis (`scripts/schemathesis`, from PyPI) against the real relay: every HTTP operation
//! of `/openapi.json` is exercised with generated valid and invalid requests and stateful
//! sequences, and no answer is a server error or contradicts the document. Plus regression tests
//! for what it found.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use relay_tests::twilio_rest::TwilioRest;
use relay_tests::{assert_error, output_bounded, Relay};

/// Longest one run may take, its first-run `pip install` included (a run itself takes ~15 s).
const RUN_LIMIT: Duration = Duration::from_secs(600);

/// The API key the relays under test demand.
const API_KEY: &str = "schemathesis-key";

/// Runs `scripts/schemathesis` against `relay` with `extra` arguments for `st run`, and fails
/// with its whole output unless every check passed.
fn schemathesis(relay: &Relay, extra: &[&str]) {
    let python = Command::new("python3").arg("--version").output();
    assert!(
        python.is_ok_and(|o| o.status.success()),
        "python3 is required to run Schemathesis (scripts/schemathesis installs it from PyPI into \
         target/schemathesis-venv); install python3 with pip and venv"
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/schemathesis");
    let mut cmd = Command::new(&script);
    cmd.env("RELAY_API_KEY", API_KEY).arg(format!("http://{}", relay.addr())).args(extra);
    let out = output_bounded(cmd, RUN_LIMIT);
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}\n{}\nrelay logs:\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        relay.logs().join("\n")
    );
    // Shown with `--nocapture`: what ran, and how long it took.
    println!("{}", String::from_utf8_lossy(&out.stdout));
}

/// A relay with an API key and no Twilio account: everything but placing and ending outbound
/// calls, which can only answer 503 ("not configured") there and are run against a configured
/// relay below. Twilio's webhooks take the API key on such a relay, so they are exercised in full.
#[test]
fn relay_conforms_to_its_document() {
    let relay = Relay::start(&["--api-key", API_KEY]);
    schemathesis(&relay, &["--exclude-path", "/outbound-call", "--exclude-path", "/end-call"]);
    assert!(relay.health()["status"] == "ok", "the relay survived the run");
}

/// A relay with a Twilio account (a local stand-in for Twilio's REST API): outbound calls are
/// placed and ended for real and call status is read back. (Its webhooks demand Twilio's
/// signature here, so they are exercised on the relay above.)
#[test]
fn twilio_operations_conform_to_the_document() {
    let twilio = TwilioRest::start();
    let mut args = vec!["--api-key".to_owned(), API_KEY.to_owned()];
    args.extend(twilio.relay_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let relay = Relay::start(&args);
    schemathesis(&relay, &["--include-path-regex", "^/(outbound-call|end-call|call-status)$"]);
    assert!(relay.health()["status"] == "ok", "the relay survived the run");
}

/// Found by Schemathesis: an analytics date whose 10th byte falls inside a multi-byte character
/// (or a zone designator with one) panicked the core that parsed it, and took the relay down.
/// They are refused with 400 like any other malformed date.
#[test]
fn multibyte_dates_are_refused() {
    let relay = Relay::start(&["--api-key", API_KEY]);
    let dates = [
        // "u" + U+7FFEA…: byte 10 is inside a four-byte character.
        "u%F1%BF%9F%AA%C3%81%F1%9E%9D%99%F1%8F%87%9D%F1%81%B9%9D%2C",
        // "2025-01-15T10:30+1é1": a four-byte zone whose second byte starts "é".
        "2025-01-15T10:30%2B1%C3%A91",
        "2025-01-1%C3%A9",
    ];
    for date in dates {
        for path in [
            format!("/analytics/project/p/statistics?startDate={date}&endDate=2025-01-16"),
            format!("/analytics/project/p/statistics?startDate=2025-01-15&endDate={date}"),
            format!("/analytics/project/p?startDate={date}"),
        ] {
            let resp = relay.get(&path);
            assert_error(&resp, 400);
            assert!(resp.text().contains("ISO 8601"), "{path}: {}", resp.text());
        }
    }
    let resp = relay.get("/analytics/project/p/statistics?startDate=2025-01-15T10:30%2B01:00&endDate=2025-01-16");
    assert_eq!(resp.status, 200, "a well-formed zone still parses: {}", resp.text());
    assert!(relay.health()["status"] == "ok", "the relay is still up");
}
