//! TwiML answers for Twilio's voice webhook: `<Connect><Stream>` with `<Parameter>`s.
//!
//! Invariant: every attribute value is XML-escaped.

/// `<Response><Connect><Stream url="…"><Parameter name="…" value="…"/>…</Stream></Connect></Response>`,
/// preceded by `<Start><Transcription statusCallbackUrl="…" track="both_tracks"/></Start>` when a
/// transcription callback URL is given.
pub fn connect_stream(stream_url: &str, parameters: &[(&str, &str)], transcription_callback: Option<&str>) -> String {
    let mut out = String::with_capacity(256);
    out.push_str(r#"<?xml version="1.0" encoding="UTF-8"?><Response>"#);
    if let Some(callback) = transcription_callback {
        out.push_str(r#"<Start><Transcription statusCallbackUrl=""#);
        escape_into(&mut out, callback);
        out.push_str(r#"" track="both_tracks"/></Start>"#);
    }
    out.push_str(r#"<Connect><Stream url=""#);
    escape_into(&mut out, stream_url);
    out.push_str(r#"">"#);
    for (name, value) in parameters {
        out.push_str(r#"<Parameter name=""#);
        escape_into(&mut out, name);
        out.push_str(r#"" value=""#);
        escape_into(&mut out, value);
        out.push_str(r#""/>"#);
    }
    out.push_str("</Stream></Connect></Response>");
    out
}

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The document has the stream URL and escaped parameters, in order.
    #[test]
    fn stream_document() {
        let x =
            connect_stream("wss://relay.example/twilio/stream", &[("callSid", "CA1"), ("from", "+1 <\"x\">&")], None);
        assert_eq!(
            x,
            r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="wss://relay.example/twilio/stream"><Parameter name="callSid" value="CA1"/><Parameter name="from" value="+1 &lt;&quot;x&quot;&gt;&amp;"/></Stream></Connect></Response>"#
        );
    }

    /// With a callback URL, transcription starts before the stream connects.
    #[test]
    fn transcription_first() {
        let x = connect_stream("wss://r/twilio/stream", &[], Some("https://r/twilio/transcription?a=1&b=2"));
        assert!(x.contains(r#"<Response><Start><Transcription statusCallbackUrl="https://r/twilio/transcription?a=1&amp;b=2" track="both_tracks"/></Start><Connect><Stream url="wss://r/twilio/stream">"#), "{x}");
    }
}
