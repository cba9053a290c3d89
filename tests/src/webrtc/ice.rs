//! Trickle ICE and ICE restarts for the test peer, as a WHIP/WHEP client does them over `PATCH`
//! (RFC 9725 §4.3): an offer sent before gathering, its candidates trickled as an
//! `application/trickle-ice-sdpfrag`; a restart's fragment out, and the relay's answer fragment
//! applied as the new remote description.
//!
//! Invariant: only SDP text and str0m's own APIs; the peer's socket and drive loop are untouched.

use str0m::change::SdpAnswer;
use str0m::media::Direction;
use str0m::Candidate;

use super::Peer;

impl Peer {
    /// A peer whose offer carries no candidates, as a browser's does when it offers before
    /// gathering; [`Peer::trickle_fragment`] trickles them afterwards.
    pub fn trickling(direction: Direction) -> Self {
        let mut peer = Self::new(direction);
        peer.offer = without_candidates(&peer.offer);
        peer
    }

    /// The fragment that trickles this peer's candidates: its current ICE credentials, its media
    /// section, every candidate it has, and end-of-candidates.
    pub fn trickle_fragment(&mut self) -> String {
        let creds = self.ice_credentials();
        let candidates: Vec<String> = self.candidate_lines();
        fragment(&creds.0, &creds.1, &self.mid.to_string(), &candidates)
    }

    /// Starts an ICE restart (new local credentials, candidates kept); returns the fragment to
    /// `PATCH` with `If-Match: *`.
    ///
    /// # Panics
    /// When str0m makes no restart offer.
    pub fn restart_ice(&mut self) -> String {
        let mut api = self.rtc.sdp_api();
        let creds = api.ice_restart(true);
        let (_, pending) = api.apply().expect("a restart offer");
        self.pending = Some(pending);
        fragment(&creds.ufrag, &creds.pass, &self.mid.to_string(), &self.candidate_lines())
    }

    /// Applies the relay's answer to [`Peer::restart_ice`]: its `answer` (the 201's SDP) with the
    /// fragment's credentials, then the fragment's candidates.
    ///
    /// # Panics
    /// When the fragment lacks credentials or str0m refuses the answer.
    pub fn accept_restart(&mut self, answer: &str, fragment: &str) {
        let value = |name: &str| {
            fragment.lines().find_map(|l| l.trim().strip_prefix(name).map(str::to_owned)).expect("a credential")
        };
        let (ufrag, pwd) = (value("a=ice-ufrag:"), value("a=ice-pwd:"));
        let mut sdp = String::new();
        for line in without_candidates(answer).lines() {
            if line.starts_with("a=ice-ufrag:") {
                sdp.push_str(&format!("a=ice-ufrag:{ufrag}\r\n"));
            } else if line.starts_with("a=ice-pwd:") {
                sdp.push_str(&format!("a=ice-pwd:{pwd}\r\n"));
            } else {
                sdp.push_str(line);
                sdp.push_str("\r\n");
            }
        }
        let pending = self.pending.take().expect("a restart in progress");
        let answer = SdpAnswer::from_sdp_string(&sdp).expect("answer is SDP");
        self.rtc.sdp_api().accept_answer(pending, answer).expect("restart answer accepted");
        for c in fragment.lines().filter_map(|l| l.trim().strip_prefix("a=")).filter(|a| a.starts_with("candidate:")) {
            self.rtc.add_remote_candidate(Candidate::from_sdp_string(c).expect("the relay's candidate"));
        }
    }

    fn ice_credentials(&mut self) -> (String, String) {
        let creds = self.rtc.direct_api().local_ice_credentials();
        (creds.ufrag, creds.pass)
    }

    fn candidate_lines(&self) -> Vec<String> {
        let local = self.socket.local_addr().expect("addr");
        vec![Candidate::host(local, "udp").expect("host candidate").to_sdp_string()]
    }
}

/// `sdp` without `a=candidate` and `a=end-of-candidates` lines.
pub fn without_candidates(sdp: &str) -> String {
    sdp.lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.starts_with("a=candidate:") && *l != "a=end-of-candidates")
        .map(|l| format!("{l}\r\n"))
        .collect()
}

/// An RFC 8840 fragment: credentials, one section by `mid`, `candidates`, end-of-candidates.
pub fn fragment(ufrag: &str, pwd: &str, mid: &str, candidates: &[String]) -> String {
    let mut text =
        format!("a=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:{mid}\r\n");
    for c in candidates {
        text.push_str(&format!("a={c}\r\n"));
    }
    text.push_str("a=end-of-candidates\r\n");
    text
}
