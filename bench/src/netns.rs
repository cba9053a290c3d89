//! A network namespace for the server under test, joined to the generator by a veth pair, so that
//! each side's CPU pays for its own half of every packet as it would across a NIC.
//!
//! Over loopback the kernel runs the receiver's TCP processing (`tcp_v4_rcv`, the wake-up) in the
//! sender's system call: a server's CPU is charged for the generator's receives of everything it
//! sends, and the generator for the server's. Here each veth end's receive queue is steered (RPS)
//! to the receiving side's CPU, so packets the server sends are processed on the generator's CPU
//! and packets it receives on its own, the way a NIC's interrupts would land on each host.
//!
//! Invariant: the namespace (and with it both veth ends) is deleted when this value drops; the
//! addresses are a private /30 that only the two ends use.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use anyhow::{bail, Context};

/// A namespace for the server, and the veth pair to it.
pub struct Netns {
    name: String,
    /// The server's address, inside the namespace.
    pub server_ip: IpAddr,
    /// The generator's address, on the host side of the pair.
    pub peer_ip: IpAddr,
}

impl Netns {
    /// Creates the namespace and the veth pair, steering receive processing to `server_cpu` inside
    /// and to `bench_cpu` outside. Needs root and `ip` (iproute2).
    ///
    /// # Errors
    /// When a step fails (not root, no `ip`, no RPS in the kernel); what was made is removed.
    pub fn create(server_cpu: usize, bench_cpu: usize) -> anyhow::Result<Self> {
        let pid = std::process::id();
        let octet = u8::try_from(pid % 250).unwrap_or(0) + 1;
        let server = Ipv4Addr::new(10, 203, octet, 2);
        let peer = Ipv4Addr::new(10, 203, octet, 1);
        let this = Self { name: format!("relay-bench-{pid}"), server_ip: server.into(), peer_ip: peer.into() };
        let (host_end, ns_end) = (format!("rbh{pid}"), format!("rbn{pid}"));
        let ns = this.name.as_str();
        run(&["ip", "netns", "add", ns])?;
        // From here on a failure drops `this`, which deletes the namespace and both ends.
        run(&["ip", "link", "add", &host_end, "type", "veth", "peer", "name", &ns_end, "netns", ns])?;
        run(&["ip", "addr", "add", &format!("{peer}/30"), "dev", &host_end])?;
        run(&["ip", "link", "set", &host_end, "up"])?;
        run(&["ip", "-n", ns, "addr", "add", &format!("{server}/30"), "dev", &ns_end])?;
        run(&["ip", "-n", ns, "link", "set", &ns_end, "up"])?;
        run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        std::fs::write(format!("/sys/class/net/{host_end}/queues/rx-0/rps_cpus"), cpu_mask(bench_cpu))
            .context("steer the host end's receive queue (RPS)")?;
        // The namespace's own sysfs is mounted by `ip netns exec`.
        let steer = format!("echo {} > /sys/class/net/{ns_end}/queues/rx-0/rps_cpus", cpu_mask(server_cpu));
        run(&["ip", "netns", "exec", ns, "sh", "-c", &steer])?;
        Ok(this)
    }

    /// The command line that runs `program args` inside the namespace.
    pub fn wrap(&self, program: &str, args: &[String]) -> (String, Vec<String>) {
        let mut all = vec!["netns".to_owned(), "exec".to_owned(), self.name.clone(), program.to_owned()];
        all.extend_from_slice(args);
        ("ip".to_owned(), all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// `cpu` as a sysfs CPU mask: hex in comma-separated 32-bit groups, most significant first.
fn cpu_mask(cpu: usize) -> String {
    let (word, bit) = (cpu / 32, cpu % 32);
    (0..=word).rev().map(|w| format!("{:08x}", if w == word { 1u32 << bit } else { 0 })).collect::<Vec<_>>().join(",")
}

fn run(argv: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(argv[0]).args(&argv[1..]).status().with_context(|| format!("run {}", argv.join(" ")))?;
    if !status.success() {
        bail!("`{}` failed ({status}); --netns needs root and iproute2", argv.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::cpu_mask;

    #[test]
    fn cpu_masks_are_grouped_by_32_bits() {
        assert_eq!(cpu_mask(0), "00000001");
        assert_eq!(cpu_mask(1), "00000002");
        assert_eq!(cpu_mask(31), "80000000");
        assert_eq!(cpu_mask(32), "00000001,00000000");
        assert_eq!(cpu_mask(70), "00000040,00000000,00000000");
    }
}
