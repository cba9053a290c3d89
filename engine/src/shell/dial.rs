//! Outbound TCP for agents and HTTP fetches: a name's addresses, tried in order.
//!
//! Invariant: name lookups run on glommio's blocking pool, never on the core; an address that
//! refuses or times out moves on to the next one (a host reachable over IPv4 only but listed
//! with an IPv6 address first still connects).

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use glommio::net::TcpStream;

/// Addresses tried per name at most.
pub(crate) const MAX_ADDRESSES: usize = 8;
/// Time given to each address but the last: a refusal is immediate, a black hole costs this much.
const EARLY_ATTEMPT: Duration = Duration::from_secs(1);

/// The addresses `host` names (an IP literal is its own one address), at most [`MAX_ADDRESSES`].
///
/// # Errors
/// A one-line reason when the name does not resolve or has no address.
pub(crate) async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let target = (host.to_owned(), port);
    let found = glommio::executor()
        .spawn_blocking(move || target.to_socket_addrs().map(|addrs| addrs.take(MAX_ADDRESSES).collect::<Vec<_>>()))
        .await;
    match found {
        Ok(addrs) if !addrs.is_empty() => Ok(addrs),
        Ok(_) => Err(format!("{host} has no address")),
        Err(e) => Err(format!("cannot resolve {host}: {e}")),
    }
}

/// Connects to the first of `addrs` that accepts: each but the last gets [`EARLY_ATTEMPT`]
/// (or `timeout` if shorter), the last gets `timeout`.
///
/// # Errors
/// Every address's failure, in order, on one line.
pub(crate) async fn connect(addrs: &[SocketAddr], timeout: Duration) -> Result<TcpStream, String> {
    let mut failures = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let limit = if i + 1 == addrs.len() { timeout } else { EARLY_ATTEMPT.min(timeout) };
        match TcpStream::connect_timeout(addr, limit).await {
            Ok(stream) => return Ok(stream),
            Err(e) => failures.push(format!("{addr}: {e}")),
        }
    }
    if failures.is_empty() {
        return Err("no address to connect to".to_owned());
    }
    Err(failures.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refused address is skipped for the next; all failing gives each reason; literals and
    /// `localhost` resolve.
    #[test]
    fn falls_back_to_the_next_address() {
        let open = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let good = open.local_addr().expect("addr");
        let refused = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound).make().expect("executor");
        ex.run(async move {
            let stream = connect(&[refused, good], Duration::from_secs(2)).await.expect("second address");
            assert_eq!(stream.peer_addr().expect("peer"), good);
            let err = connect(&[refused, refused], Duration::from_secs(2)).await.expect_err("nothing listens");
            assert_eq!(err.matches(&refused.to_string()).count(), 2, "{err}");
            assert!(connect(&[], Duration::from_secs(1)).await.is_err());

            assert_eq!(resolve("127.0.0.1", 80).await, Ok(vec!["127.0.0.1:80".parse().expect("addr")]));
            assert_eq!(resolve("[::1]", 80).await, Ok(vec!["[::1]:80".parse().expect("addr")]));
            let local = resolve("localhost", 81).await.expect("localhost resolves");
            assert!(!local.is_empty() && local.len() <= MAX_ADDRESSES);
            assert!(local.iter().all(|a| a.ip().is_loopback() && a.port() == 81), "{local:?}");
        });
        drop(open);
    }
}
