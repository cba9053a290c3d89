//! `relay-bench`: load scenarios against Relay or any server with the same API.
//!
//! Invariant: every loop is bounded in count and time; traffic goes only to loopback, the URL
//! given, or (with `--netns`) the veth pair to the namespace the bench made itself.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use relay_bench::client::Conn;
use relay_bench::netns::Netns;
use relay_bench::sampler::{Sampler, Usage};
use relay_bench::stats::Summary;
use relay_bench::target::{listen_arg, Cluster, Target};
use relay_bench::telephony::{Generator, Options, Report};
use serde_json::json;
use serde_json::Value;

#[derive(Parser)]
#[command(name = "relay-bench", about = "Load scenarios and latency measurement for Relay")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Control-plane throughput: C clients on keep-alive connections start then stop N sessions.
    Control {
        /// Start this relay binary on a free loopback port (instead of --url).
        #[arg(long)]
        spawn: Option<String>,
        /// An already running server, `http://127.0.0.1:8080`.
        #[arg(long)]
        url: Option<String>,
        /// Cores for a spawned relay.
        #[arg(long, default_value_t = 2)]
        cores: usize,
        /// Sessions to start and stop in all.
        #[arg(long, default_value_t = 10_000)]
        sessions: usize,
        /// Concurrent clients (threads, one connection each).
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Where to write the JSON result.
        #[arg(long)]
        json: Option<String>,
    },
    /// Twilio-protocol calls through a server to an echoing bot: per-frame one-way latency, loss,
    /// duplication, reordering and late frames each way, frontend fan-out, and the server's CPU
    /// and memory per call.
    Telephony {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        out: OutArgs,
    },
    /// One run, same machine: the floor (`relay-bench floor`, the least a relay of this protocol
    /// can do), Relay, and the Node.js `ws` baseline (bench/baseline) under the same load, one
    /// after the other; prints each, then every figure also as × floor.
    Compare {
        /// The relay binary.
        #[arg(long, default_value = "target/release/relay")]
        relay: String,
        /// The baseline's start script.
        #[arg(long, default_value = "bench/baseline/start")]
        baseline: String,
        /// Cores for the relay.
        #[arg(long, default_value_t = 1)]
        cores: usize,
        /// The legs, in the order they run: `floor`, `relay`, `baseline`, and `direct` (callers
        /// talk to the bot with no server between). Ratios are against `floor` when it runs.
        #[arg(long, value_delimiter = ',', default_value = "floor,relay,baseline")]
        legs: Vec<Leg>,
        /// Run the legs this many times over, alternated (floor, relay, baseline, floor, …).
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        out: OutArgs,
    },
    /// The floor server on its own: one thread, epoll, hand-written WebSocket framing, serving the
    /// bench's Twilio callers, their bots and frontends as Relay does (what `compare` measures
    /// Relay against). Prints `floor listening on http://ADDR` to stderr once it listens.
    Floor {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// An address a caller's `agentUrl` may name, repeatable (Relay's `--agent-allow`).
        #[arg(long = "agent-allow")]
        agent_allow: Vec<std::net::IpAddr>,
        /// Flags the bench gives any spawned server (`--cores`, `--log`, …): accepted, ignored.
        #[arg(long, hide = true)]
        cores: Option<usize>,
    },
    /// CPU per 20 ms frame (median, p99) and quality of μ-law, Opus at several settings, the
    /// 8 kHz-direct and resampled μ-law ⇄ Opus paths, and rubato resampler types; single thread.
    Codec {
        /// Frames per timing run.
        #[arg(long, default_value_t = 3000)]
        frames: usize,
        /// Pin to this CPU.
        #[arg(long)]
        cpu: Option<usize>,
        /// Where to write the JSON result.
        #[arg(long)]
        json: Option<String>,
    },
    /// Transcoded calls through a relay: per call a Twilio-protocol caller (μ-law 8 kHz) and a
    /// WebRTC agent (WHIP, Opus 48 kHz); one-way latency each way from tone bursts found in the
    /// decoded audio, bursts missed, and the relay's CPU and memory per call.
    Webrtc {
        /// Start this relay binary on a free loopback port (unless --url is given).
        #[arg(long, default_value = "target/release/relay")]
        spawn: String,
        /// An already running keyless relay instead, `http://127.0.0.1:8080`.
        #[arg(long)]
        url: Option<String>,
        /// Its process id, to sample CPU and memory (with --url).
        #[arg(long)]
        pid: Option<u32>,
        /// Cores for a spawned relay.
        #[arg(long, default_value_t = 1)]
        cores: usize,
        /// An extra flag for a spawned relay, repeatable: `--relay-arg=--opus-complexity=5`.
        #[arg(long = "relay-arg", allow_hyphen_values = true)]
        relay_args: Vec<String>,
        /// Concurrent calls.
        #[arg(long, default_value_t = 20)]
        calls: u32,
        /// Seconds of audio per call, each way.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// A burst every this many 20 ms frames in each direction (at least 2).
        #[arg(long, default_value_t = 25)]
        burst_every: u64,
        /// Opus complexity of the agents' encoders (the generator's cost, not the relay's).
        #[arg(long, default_value_t = 0)]
        encoder_complexity: u8,
        /// CPU for a spawned relay.
        #[arg(long)]
        server_cpu: Option<usize>,
        /// CPU for the load generator.
        #[arg(long)]
        bench_cpu: Option<usize>,
        #[command(flatten)]
        out: OutArgs,
    },
    /// The balancer hop: the same telephony load straight to one relay node, then through HAProxy
    /// (`haproxy -f deploy/haproxy.cfg`, with `RELAY_BIND` and `RELAY_NODE1..3` set) in front of
    /// `--nodes` relay nodes on loopback, in one run; prints both, the latency the hop adds
    /// (p50/p99 each way) and HAProxy's CPU per call. Callers open `/twilio/stream/{callSid}`.
    Cluster {
        /// The relay binary (every node, and the direct run's node).
        #[arg(long, default_value = "target/release/relay")]
        relay: String,
        /// The HAProxy binary (`scripts/deps-cluster` installs Debian's package).
        #[arg(long, default_value = "haproxy")]
        haproxy: String,
        /// The HAProxy configuration, used unchanged.
        #[arg(long, default_value = "deploy/haproxy.cfg")]
        haproxy_config: String,
        /// Relay nodes behind HAProxy (1 to 3; with 1, the hop alone in front of the same kind of
        /// node the direct run measures).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Cores per relay node.
        #[arg(long, default_value_t = 1)]
        cores: usize,
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Telephony at growing call counts against one server: finds where p99 starts to climb.
    Ramp {
        #[command(flatten)]
        target: TargetArgs,
        /// First call count.
        #[arg(long, default_value_t = 10)]
        from: u32,
        /// Call count added at each step.
        #[arg(long, default_value_t = 20)]
        step: u32,
        /// Last call count.
        #[arg(long, default_value_t = 200)]
        to: u32,
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        out: OutArgs,
    },
}

/// Which server to measure.
#[derive(clap::Args, Clone)]
struct TargetArgs {
    /// Start this relay binary on a free loopback port.
    #[arg(long)]
    spawn: Option<String>,
    /// Start the Node.js baseline with this script (bench/baseline/start).
    #[arg(long)]
    spawn_baseline: Option<String>,
    /// An already running server (relay started with `--agent-allow 127.0.0.1`).
    #[arg(long)]
    url: Option<String>,
    /// Its process id, to sample CPU and memory (with --url).
    #[arg(long)]
    pid: Option<u32>,
    /// No server: callers talk to the bot directly (the loopback floor).
    #[arg(long)]
    direct: bool,
    /// Cores for a spawned relay.
    #[arg(long, default_value_t = 1)]
    cores: usize,
}

/// The load and where results go.
#[derive(clap::Args, Clone, Copy)]
struct LoadArgs {
    /// Concurrent calls.
    #[arg(long, default_value_t = 20)]
    calls: u32,
    /// Seconds of audio per call.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Start every call's frames at the same instant (worst case) instead of staggering them.
    #[arg(long)]
    aligned: bool,
    /// Frontend listeners per call.
    #[arg(long, default_value_t = 1)]
    frontends: u32,
    /// A frame later than this many ms after it was due counts as late.
    #[arg(long, default_value_t = 60)]
    late_ms: u64,
    /// CPU for a spawned server (the bench pins itself to --bench-cpu).
    #[arg(long)]
    server_cpu: Option<usize>,
    /// CPU for the load generator.
    #[arg(long)]
    bench_cpu: Option<usize>,
    /// Drive the sockets with a thread each (the original generator, saturated from ~200 calls
    /// per CPU) instead of the event loop (one thread, ~550 calls per CPU); to compare generators.
    #[arg(long)]
    threads: bool,
    /// Run the spawned server in a network namespace of its own, joined to the generator by a
    /// veth pair with each end's receive processing steered to the receiving side's CPU (as a
    /// NIC's would be), instead of loopback, where a sender pays for the receiver's TCP work.
    /// Needs --server-cpu, --bench-cpu, root and iproute2.
    #[arg(long)]
    netns: bool,
    /// Callers open `/twilio/stream/{callSid}` (the form Relay's TwiML uses) instead of
    /// `/twilio/stream`, so a balancer in front of several relays can route them by the path
    /// (`--url` of an HAProxy); the `cluster` scenario always does.
    #[arg(long)]
    keyed_path: bool,
}

impl LoadArgs {
    /// The namespace for the server, when --netns asks for one.
    fn net(&self) -> anyhow::Result<Option<Netns>> {
        if !self.netns {
            return Ok(None);
        }
        let (Some(server), Some(bench)) = (self.server_cpu, self.bench_cpu) else {
            bail!("--netns needs --server-cpu and --bench-cpu");
        };
        Netns::create(server, bench).map(Some)
    }

    fn generator(&self) -> Generator {
        if self.threads {
            Generator::Threads
        } else {
            Generator::Events
        }
    }
}

/// Where to write results.
#[derive(clap::Args, Clone)]
struct OutArgs {
    /// JSON results file.
    #[arg(long)]
    json: Option<String>,
    /// SVG percentile plot.
    #[arg(long)]
    svg: Option<String>,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().scenario {
        Scenario::Control { spawn, url, cores, sessions, clients, json } => {
            let target = match (spawn, url) {
                (Some(bin), None) => Target::spawn(&bin, cores, &[], None, None)?,
                (None, Some(url)) => Target::url(&url)?,
                _ => bail!("give exactly one of --spawn or --url"),
            };
            control(&target, sessions, clients.max(1), json.as_deref())
        }
        Scenario::Telephony { target, load, out } => {
            pin_bench(load)?;
            let net = load.net()?;
            let server = start_target(&target, load, net.as_ref())?;
            let m = measure(server.as_ref(), target.pid, load, net.as_ref())?;
            let name = match (&target.spawn_baseline, target.direct) {
                (Some(_), _) => "baseline (Node.js ws)",
                (None, true) => "direct (no relay)",
                _ => "relay",
            };
            print_measurement(name, &m, load);
            write_outputs(&out, &[(name.to_owned(), &m)], load)?;
            m.check()
        }
        Scenario::Compare { relay, baseline, cores, legs, rounds, load, out } => {
            pin_bench(load)?;
            let net = load.net()?;
            let net = net.as_ref();
            let floor_bin = std::env::current_exe().context("the bench's own path, to start the floor")?;
            let floor_bin = floor_bin.to_string_lossy().into_owned();
            let mut runs: Vec<(String, Measurement)> = Vec::new();
            for round in 1..=rounds.max(1) {
                let mut this_round = Vec::new();
                for leg in &legs {
                    let server = match leg {
                        Leg::Direct => None,
                        Leg::Floor => {
                            let mut args = vec!["floor".to_owned(), "--listen".to_owned(), listen_arg(net)];
                            args.extend(agent_allow(net));
                            Some(Target::spawn_process(&floor_bin, &args, load.server_cpu, net)?)
                        }
                        Leg::Relay => Some(Target::spawn(&relay, cores, &agent_allow(net), load.server_cpu, net)?),
                        Leg::Baseline => Some(Target::spawn_process(
                            &baseline,
                            &["--listen".to_owned(), listen_arg(net)],
                            load.server_cpu,
                            net,
                        )?),
                    };
                    let m = measure(server.as_ref(), None, load, net)?;
                    drop(server);
                    let name =
                        if rounds > 1 { format!("{} (round {round})", leg.label()) } else { leg.label().to_owned() };
                    print_measurement(&name, &m, load);
                    this_round.push((*leg, m));
                }
                print_table(&this_round, load);
                runs.extend(this_round.into_iter().map(|(leg, m)| {
                    let name = if rounds > 1 { format!("{} {round}", leg.as_str()) } else { leg.as_str().to_owned() };
                    (name, m)
                }));
            }
            let named: Vec<(String, &Measurement)> = runs.iter().map(|(n, m)| (n.clone(), m)).collect();
            write_outputs(&out, &named, load)?;
            for (name, m) in &runs {
                m.check().with_context(|| name.clone())?;
            }
            Ok(())
        }
        Scenario::Floor { listen, agent_allow, cores: _ } => {
            relay_bench::floor::serve(&relay_bench::floor::Options { listen, agent_allow })
        }
        Scenario::Codec { frames, cpu, json } => {
            if let Some(cpu) = cpu {
                relay_bench::sampler::pin_current_thread(cpu).with_context(|| format!("pin to CPU {cpu}"))?;
            }
            relay_bench::codec::run(&relay_bench::codec::CodecOptions { frames, json })
        }
        Scenario::Webrtc {
            spawn,
            url,
            pid,
            cores,
            relay_args,
            calls,
            seconds,
            burst_every,
            encoder_complexity,
            server_cpu,
            bench_cpu,
            out,
        } => {
            if let Some(cpu) = bench_cpu {
                relay_bench::sampler::pin_current_thread(cpu).with_context(|| format!("pin the bench to CPU {cpu}"))?;
            }
            let target = match &url {
                Some(url) => Target::url(url)?,
                None => Target::spawn(&spawn, cores, &relay_args, server_cpu, None)?,
            };
            let opts = relay_bench::webrtc::Options {
                calls: calls.max(1),
                seconds: seconds.max(1),
                burst_every: burst_every.max(2),
                encoder_complexity: encoder_complexity.min(10),
                cpu: bench_cpu,
            };
            // A spawned relay's pinned CPU is watched; a --pid may run anywhere.
            let watched = server_cpu.filter(|_| target.pid().is_some());
            let m = relay_bench::webrtc::measure(target.addr, pid.or_else(|| target.pid()), watched, opts)?;
            drop(target);
            let name =
                if relay_args.is_empty() { "relay".to_owned() } else { format!("relay {}", relay_args.join(" ")) };
            m.print(&name);
            if let Some(path) = &out.json {
                let doc = m.to_json(&name, &relay_args);
                std::fs::write(path, serde_json::to_vec_pretty(&doc)?).with_context(|| format!("write {path}"))?;
            }
            if let Some(path) = &out.svg {
                let series = vec![
                    ("caller → agent (μ-law → Opus)".to_owned(), "#1f77b4", m.report.uplink.latency.curve()),
                    (
                        "agent → caller (Opus → playout → μ-law)".to_owned(),
                        "#d62728",
                        m.report.downlink.latency.curve(),
                    ),
                ];
                let title = format!("transcoded one-way latency, {calls} calls ({name})");
                std::fs::write(path, relay_bench::plot::percentile_svg(&title, &series))
                    .with_context(|| format!("write {path}"))?;
            }
            m.check()
        }
        Scenario::Cluster { relay, haproxy, haproxy_config, nodes, cores, load, out } => {
            pin_bench(load)?;
            if load.netns {
                bail!("the cluster scenario runs on loopback only (no --netns)");
            }
            // --server-cpu pins the direct run's relay, and every node and HAProxy in the second
            // run (the servers share it; the generator keeps --bench-cpu to itself). The second
            // run samples HAProxy's process.
            let load = LoadArgs { keyed_path: true, ..load };
            let node = Target::spawn(&relay, cores, &agent_allow(None), load.server_cpu, None)?;
            let direct = measure(Some(&node), None, load, None)?;
            drop(node);
            print_measurement("relay, one node, direct", &direct, load);
            let cluster =
                Cluster::spawn(&relay, cores, nodes, &agent_allow(None), &haproxy, &haproxy_config, load.server_cpu)?;
            let via = measure(Some(&cluster.balancer), None, load, None)?;
            let per_node: Vec<String> = cluster
                .frames_in()
                .iter()
                .enumerate()
                .map(|(i, n)| format!("node{} {}", i + 1, n.map_or_else(|| "?".to_owned(), |n| n.to_string())))
                .collect();
            drop(cluster);
            print_measurement(
                &format!("through HAProxy to {} node(s) (server = HAProxy)", nodes.clamp(1, 3)),
                &via,
                load,
            );
            print_hop(&direct, &via, load);
            println!("  audio frames each node received: {}", per_node.join(", "));
            write_outputs(&out, &[("direct".to_owned(), &direct), ("haproxy".to_owned(), &via)], load)?;
            direct.check()?;
            via.check()
        }
        Scenario::Ramp { target, from, step, to, load, out } => {
            pin_bench(load)?;
            let net = load.net()?;
            let server = start_target(&target, load, net.as_ref())?;
            let mut steps = Vec::new();
            let mut calls = from.max(1);
            while calls <= to {
                let m = measure(server.as_ref(), target.pid, LoadArgs { calls, ..load }, net.as_ref())?;
                let up = m.report.uplink.summary();
                println!(
                    "calls {calls:>5}: uplink p50 {:>7.0} µs p99 {:>8.0} µs p99.9 {:>8.0} µs; server {:>5.1} % of a core{}; lost {}; late sends {}; generator {:>3.0} %{}, send lag p99 {:.0} µs{}",
                    up.p50_us,
                    up.p99_us,
                    up.p999_us,
                    m.server.map_or(0.0, |u| u.cores * 100.0),
                    cpu_busy_note(m.server.and_then(|u| u.cpu_busy)),
                    m.lost(),
                    m.report.late_sends,
                    m.bench_cores * 100.0,
                    cpu_busy_note(m.bench_cpu_busy),
                    m.report.send_lag.summary().p99_us,
                    if m.valid() { "" } else { " INVALID" }
                );
                steps.push((calls, m));
                calls += step.max(1);
            }
            let base = steps.first().map_or(0.0, |(_, m)| m.report.uplink.summary().p99_us);
            if let Some((knee, _)) = steps.iter().find(|(_, m)| m.report.uplink.summary().p99_us > 2.0 * base.max(1.0))
            {
                println!("p99 is more than twice the first step's from {knee} calls on");
            } else {
                println!("p99 stayed within twice the first step's up to {to} calls");
            }
            let named: Vec<(String, &Measurement)> = steps.iter().map(|(c, m)| (format!("{c} calls"), m)).collect();
            write_outputs(&out, &named, load)
        }
    }
}

/// Pins the load generator (this process and every thread it starts later) when asked.
fn pin_bench(load: LoadArgs) -> anyhow::Result<()> {
    if let Some(cpu) = load.bench_cpu {
        relay_bench::sampler::pin_current_thread(cpu).with_context(|| format!("pin the bench to CPU {cpu}"))?;
    }
    Ok(())
}

/// The relay flag that lets it dial the bench's bot.
fn agent_allow(net: Option<&Netns>) -> Vec<String> {
    let ip = net.map_or_else(|| "127.0.0.1".to_owned(), |n| n.peer_ip.to_string());
    vec!["--agent-allow".to_owned(), ip]
}

fn start_target(t: &TargetArgs, load: LoadArgs, net: Option<&Netns>) -> anyhow::Result<Option<Target>> {
    Ok(match (&t.spawn, &t.spawn_baseline, &t.url, t.direct) {
        (Some(bin), None, None, false) => Some(Target::spawn(bin, t.cores, &agent_allow(net), load.server_cpu, net)?),
        (None, Some(script), None, false) => {
            Some(Target::spawn_process(script, &["--listen".into(), listen_arg(net)], load.server_cpu, net)?)
        }
        (None, None, Some(url), false) if net.is_none() => Some(Target::url(url)?),
        (None, None, None, true) => None,
        _ => bail!("give exactly one of --spawn, --spawn-baseline, --url or --direct (--netns: not with --url)"),
    })
}

/// One telephony run with the server's and the generator's resource use over its steady state.
struct Measurement {
    report: Report,
    /// The server's CPU and memory while every call streamed (none for --direct or an unknown pid).
    server: Option<Usage>,
    /// The server's RSS before the calls, bytes.
    idle_rss: u64,
    /// The generator's own CPU use, in cores.
    bench_cores: f64,
    /// Busy fraction of the generator's pinned CPU (with --bench-cpu): its process time plus the
    /// softirq time of its loopback sends, which no process is charged for.
    bench_cpu_busy: Option<f64>,
    /// CPUs the generator may use.
    bench_cpus: usize,
    /// Calls in the run.
    calls: u32,
    /// Which generator drove it.
    generator: Generator,
}

impl Measurement {
    /// Frames that never arrived, on every path (frontends expect every frame of their call).
    fn lost(&self) -> u64 {
        let r = &self.report;
        (r.sent - r.received_by_bot)
            + (r.sent - r.received_by_callers)
            + self.fanout_expected().saturating_sub(r.received_by_frontends)
    }

    fn fanout_expected(&self) -> u64 {
        let r = &self.report;
        r.sent / u64::from(self.calls.max(1)) * r.frontends
    }

    /// The generator kept its schedule and had CPU to spare: otherwise latency is the bench's.
    fn valid(&self) -> bool {
        self.report.late_sends == 0
            && self.bench_cores < 0.9 * self.bench_cpus as f64
            && self.bench_cpu_busy.is_none_or(|busy| busy < 0.9)
    }

    /// Fails the run when frames were lost, duplicated or reordered.
    fn check(&self) -> anyhow::Result<()> {
        let r = &self.report;
        if self.lost() > 0 || r.duplicates > 0 || r.reordered > 0 {
            bail!("frames were lost ({}), duplicated ({}) or reordered ({})", self.lost(), r.duplicates, r.reordered);
        }
        Ok(())
    }
}

fn measure(
    target: Option<&Target>,
    pid: Option<u32>,
    load: LoadArgs,
    net: Option<&Netns>,
) -> anyhow::Result<Measurement> {
    let pid = pid.or_else(|| target.and_then(Target::pid));
    let idle_rss = pid.and_then(relay_bench::sampler::sample).map_or(0, |s| s.rss_bytes);
    // A spawned server's pinned CPU is watched only when the bench spawned it (a --pid may run anywhere).
    let server_cpu = load.server_cpu.filter(|_| target.is_some_and(|t| t.pid().is_some()));
    let server_sampler = pid.map(|p| Sampler::start(p, server_cpu, Duration::from_millis(250)));
    let bench_sampler = Sampler::start(std::process::id(), load.bench_cpu, Duration::from_millis(250));
    let opts = Options {
        calls: load.calls,
        seconds: load.seconds,
        aligned: load.aligned,
        frontends: load.frontends,
        late_after: Duration::from_millis(load.late_ms),
        generator: load.generator(),
        cpu: load.bench_cpu,
        bot_ip: net.map_or_else(|| std::net::Ipv4Addr::LOCALHOST.into(), |n| n.peer_ip),
        keyed_path: load.keyed_path,
    };
    let report = relay_bench::telephony::run(target.map(|t| t.addr), opts)?;
    let (from, to) = report.steady;
    let server = server_sampler.map(|s| relay_bench::sampler::usage(&s.finish(), from, to));
    let bench_usage = relay_bench::sampler::usage(&bench_sampler.finish(), from, to);
    let (bench_cores, bench_cpu_busy) = (bench_usage.cores, bench_usage.cpu_busy);
    // After pinning, the generator may use only the CPUs of its affinity mask; the event loop is
    // one thread, so one CPU is all it can ever use.
    let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
    let bench_cpus = opts.generator.cpus().map_or(allowed, |n| n.min(allowed));
    Ok(Measurement {
        report,
        server,
        idle_rss,
        bench_cores,
        bench_cpu_busy,
        bench_cpus,
        calls: load.calls,
        generator: opts.generator,
    })
}

fn print_measurement(name: &str, m: &Measurement, load: LoadArgs) {
    let r = &m.report;
    println!(
        "\n{name}: {} calls × {} s, {} frames each way, {} frontends",
        load.calls, load.seconds, r.sent, r.frontends
    );
    println!(
        "{:<22} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "path", "frames", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "p99.99 µs", "max µs"
    );
    for (path, rec) in
        [("uplink caller→bot", &r.uplink), ("downlink bot→caller", &r.downlink), ("fan-out caller→frontend", &r.fanout)]
    {
        let s = rec.summary();
        if s.count == 0 {
            continue;
        }
        println!(
            "{path:<22} {:>8} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0}",
            s.count, s.p50_us, s.p90_us, s.p99_us, s.p999_us, s.p9999_us, s.max_us
        );
    }
    let fan_expected = m.fanout_expected();
    println!(
        "lost: uplink {} downlink {} fan-out {}; duplicated {}; reordered {}; late (>{} ms) {}; late sends {}",
        r.sent - r.received_by_bot,
        r.sent - r.received_by_callers,
        fan_expected.saturating_sub(r.received_by_frontends),
        r.duplicates,
        r.reordered,
        load.late_ms,
        r.late,
        r.late_sends
    );
    if let Some(u) = m.server {
        let calls = f64::from(load.calls.max(1));
        let per_call_mem = u.rss_mean_bytes.saturating_sub(m.idle_rss) as f64 / calls / 1024.0;
        println!(
            "server: {:.1} % of one core = {:.3} % per call; RSS {:.1} MiB (idle {:.1} MiB) = {:.1} KiB per call{}",
            u.cores * 100.0,
            u.cores * 100.0 / calls,
            u.rss_mean_bytes as f64 / 1048576.0,
            m.idle_rss as f64 / 1048576.0,
            per_call_mem,
            cpu_busy_note(u.cpu_busy)
        );
        println!(
            "server RSS over the steady state: {:.1} MiB first, {:.1} MiB last, {:.1} MiB at most",
            u.rss_first_last.0 as f64 / 1048576.0,
            u.rss_first_last.1 as f64 / 1048576.0,
            u.rss_max_bytes as f64 / 1048576.0
        );
    }
    let lag = r.send_lag.summary();
    println!(
        "generator ({}): {:.0} % of {} CPU(s){}; send lag p50 {:.0} µs p99 {:.0} µs p99.9 {:.0} µs max {:.0} µs",
        m.generator.as_str(),
        m.bench_cores * 100.0,
        m.bench_cpus,
        cpu_busy_note(m.bench_cpu_busy),
        lag.p50_us,
        lag.p99_us,
        lag.p999_us,
        lag.max_us
    );
    if !m.valid() {
        println!("WARNING: the load generator was saturated (late sends or CPU); this run is INVALID");
    }
}

/// ` (its CPU busy N %)` when the pinned CPU was watched.
fn cpu_busy_note(busy: Option<f64>) -> String {
    busy.map_or_else(String::new, |b| format!(" (its CPU {:.0} % busy)", b * 100.0))
}

/// A server `compare` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Leg {
    /// The bench's floor server (`relay-bench floor`).
    Floor,
    /// Relay.
    Relay,
    /// The Node.js `ws` baseline.
    Baseline,
    /// No server: callers talk to the bot directly.
    Direct,
}

impl Leg {
    fn as_str(self) -> &'static str {
        match self {
            Self::Floor => "floor",
            Self::Relay => "relay",
            Self::Baseline => "baseline",
            Self::Direct => "direct",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Floor => "floor (epoll, relay-bench floor)",
            Self::Relay => "relay",
            Self::Baseline => "baseline (Node.js ws)",
            Self::Direct => "direct (no relay)",
        }
    }
}

/// A round's figures side by side, each also as × the floor's (when the floor ran), as a
/// Markdown table.
fn print_table(round: &[(Leg, Measurement)], load: LoadArgs) {
    struct Row {
        cpu_pct: Option<f64>,
        us: Option<f64>,
        rss_kib: Option<f64>,
        p50: f64,
        p99: f64,
        p999: f64,
    }
    let calls = f64::from(load.calls.max(1));
    let row = |m: &Measurement| {
        let up = m.report.uplink.summary();
        Row {
            cpu_pct: m.server.map(|u| u.cores * 100.0 / calls),
            us: m.server.map(|u| u.cores / calls * 20_000.0),
            rss_kib: m.server.map(|u| u.rss_mean_bytes.saturating_sub(m.idle_rss) as f64 / calls / 1024.0),
            p50: up.p50_us,
            p99: up.p99_us,
            p999: up.p999_us,
        }
    };
    let floor = round.iter().find(|(leg, _)| *leg == Leg::Floor).map(|(_, m)| row(m));
    let ratio = |v: Option<f64>, f: Option<f64>| match (v, f) {
        (Some(v), Some(f)) if f > 0.0 => format!(" ({:.2}×)", v / f),
        _ => String::new(),
    };
    let fig = |v: Option<f64>, digits: usize| v.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"));
    println!(
        "\n{} calls + {} frontend(s) each, {} s; × floor in brackets{}",
        load.calls,
        load.frontends,
        load.seconds,
        if round.iter().all(|(_, m)| m.valid()) { "" } else { " (a leg was INVALID: see above)" }
    );
    println!("| server | CPU per call | µs per call per 20 ms | RSS per call | caller→bot p50 | p99 | p99.9 |");
    println!("|---|---|---|---|---|---|---|");
    for (leg, m) in round {
        let r = row(m);
        let f = floor.as_ref();
        println!(
            "| {} | {} %{} | {}{} | {} KiB{} | {:.0} µs{} | {:.0} µs{} | {:.0} µs{} |",
            leg.as_str(),
            fig(r.cpu_pct, 3),
            ratio(r.cpu_pct, f.and_then(|f| f.cpu_pct)),
            fig(r.us, 0),
            ratio(r.us, f.and_then(|f| f.us)),
            fig(r.rss_kib, 1),
            ratio(r.rss_kib, f.and_then(|f| f.rss_kib)),
            r.p50,
            ratio(Some(r.p50), f.map(|f| f.p50)),
            r.p99,
            ratio(Some(r.p99), f.map(|f| f.p99)),
            r.p999,
            ratio(Some(r.p999), f.map(|f| f.p999)),
        );
    }
}

/// What the HAProxy hop added: latency percentiles each way, direct → through HAProxy, and
/// HAProxy's own CPU and memory.
fn print_hop(direct: &Measurement, via: &Measurement, load: LoadArgs) {
    println!("\nthe HAProxy hop at {} calls (direct → through HAProxy):", load.calls);
    for (path, d, v) in [
        ("uplink caller→bot", &direct.report.uplink, &via.report.uplink),
        ("downlink bot→caller", &direct.report.downlink, &via.report.downlink),
        ("fan-out caller→frontend", &direct.report.fanout, &via.report.fanout),
    ] {
        let (d, v) = (d.summary(), v.summary());
        if d.count == 0 || v.count == 0 {
            continue;
        }
        println!(
            "  {path:<24} p50 {:>6.0} → {:>6.0} µs ({:+.0}); p99 {:>6.0} → {:>6.0} µs ({:+.0})",
            d.p50_us,
            v.p50_us,
            v.p50_us - d.p50_us,
            d.p99_us,
            v.p99_us,
            v.p99_us - d.p99_us
        );
    }
    if let Some(u) = via.server {
        println!(
            "  HAProxy: {:.1} % of one core = {:.4} % of a core per call; RSS {:.1} MiB",
            u.cores * 100.0,
            u.cores * 100.0 / f64::from(load.calls.max(1)),
            u.rss_mean_bytes as f64 / 1048576.0
        );
    }
    if let Some(u) = direct.server {
        println!(
            "  (the direct run's relay: {:.1} % of one core = {:.4} % per call)",
            u.cores * 100.0,
            u.cores * 100.0 / f64::from(load.calls.max(1))
        );
    }
}

fn write_outputs(out: &OutArgs, runs: &[(String, &Measurement)], load: LoadArgs) -> anyhow::Result<()> {
    if let Some(path) = &out.json {
        let docs: Vec<Value> = runs
            .iter()
            .map(|(name, m)| {
                let r = &m.report;
                json!({
                    "name": name, "calls": m.calls, "seconds": load.seconds, "aligned": load.aligned,
                    "generator": m.generator.as_str(), "send_lag": r.send_lag.summary().to_json(),
                    "frontends_per_call": load.frontends, "frames_each_way": r.sent,
                    "uplink": r.uplink.summary().to_json(), "downlink": r.downlink.summary().to_json(),
                    "fanout": r.fanout.summary().to_json(),
                    "lost_uplink": r.sent - r.received_by_bot, "lost_downlink": r.sent - r.received_by_callers,
                    "received_by_frontends": r.received_by_frontends,
                    "duplicates": r.duplicates, "reordered": r.reordered, "late": r.late, "late_sends": r.late_sends,
                    "server_cores": m.server.map(|u| u.cores), "server_rss_mean_bytes": m.server.map(|u| u.rss_mean_bytes),
                    "server_rss_first_bytes": m.server.map(|u| u.rss_first_last.0),
                    "server_rss_last_bytes": m.server.map(|u| u.rss_first_last.1),
                    "server_rss_max_bytes": m.server.map(|u| u.rss_max_bytes),
                    "server_idle_rss_bytes": m.idle_rss, "bench_cores": m.bench_cores, "valid": m.valid(),
                    "server_cpu_busy": m.server.and_then(|u| u.cpu_busy), "bench_cpu_busy": m.bench_cpu_busy,
                    "netns": load.netns,
                })
            })
            .collect();
        std::fs::write(path, serde_json::to_vec_pretty(&docs)?).with_context(|| format!("write {path}"))?;
    }
    if let Some(path) = &out.svg {
        const COLOURS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];
        let series: Vec<relay_bench::plot::Series<'_>> = runs
            .iter()
            .enumerate()
            .map(|(i, (name, m))| (format!("{name}: uplink"), COLOURS[i % COLOURS.len()], m.report.uplink.curve()))
            .collect();
        let title = format!("one-way latency caller → bot, {} calls", load.calls);
        std::fs::write(path, relay_bench::plot::percentile_svg(&title, &series))
            .with_context(|| format!("write {path}"))?;
    }
    Ok(())
}

/// Runs the control scenario; fails when any request fails or the relay's count is off afterwards.
fn control(target: &Target, sessions: usize, clients: usize, json_path: Option<&str>) -> anyhow::Result<()> {
    let run = format!("b{}", std::process::id());
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (next, run, addr) = (next.clone(), run.clone(), target.addr);
            std::thread::spawn(move || -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
                let mut conn = Conn::connect(addr)?;
                let (mut starts, mut stops) = (Vec::new(), Vec::new());
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= sessions {
                        break;
                    }
                    let id = format!("{run}-{i}");
                    let body = format!(r#"{{"sessionId":"{id}","accessToken":"t"}}"#);
                    starts.push(timed(|| expect(conn.request("POST", "/start-call", Some(&body)), 200))?);
                    let body = format!(r#"{{"sessionId":"{id}"}}"#);
                    stops.push(timed(|| expect(conn.request("POST", "/stop-call", Some(&body)), 200))?);
                }
                Ok((starts, stops))
            })
        })
        .collect();
    let (mut starts, mut stops) = (Vec::new(), Vec::new());
    for w in workers {
        let (a, b) = w.join().map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        starts.extend(a);
        stops.extend(b);
    }
    let elapsed = started.elapsed();
    let mut conn = Conn::connect(target.addr)?;
    let health: Value = serde_json::from_slice(&expect(conn.request("GET", "/health", None), 200)?.body)?;
    let active = health["activeSessions"].as_u64().context("activeSessions")?;
    let (start, stop) = (Summary::of(&starts), Summary::of(&stops));
    let ops = (start.count + stop.count) as f64 / elapsed.as_secs_f64();
    println!("control scenario: {sessions} sessions, {clients} clients, {:.2} s", elapsed.as_secs_f64());
    println!(
        "{:<12} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "op", "count", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs"
    );
    for (name, s) in [("start-call", &start), ("stop-call", &stop)] {
        println!(
            "{name:<12} {:>8} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>10.0}",
            s.count, s.p50_us, s.p90_us, s.p99_us, s.p999_us, s.max_us
        );
    }
    println!("throughput: {ops:.0} requests/s; sessions active afterwards: {active}");
    if let Some(path) = json_path {
        let doc = json!({
            "scenario": "control", "sessions": sessions, "clients": clients, "seconds": elapsed.as_secs_f64(),
            "requests_per_second": ops, "start_call": start.to_json(), "stop_call": stop.to_json(),
            "active_after": active, "relay_pid": target.pid(),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?).with_context(|| format!("write {path}"))?;
    }
    if start.count != sessions || stop.count != sessions {
        bail!("counted {} starts and {} stops for {sessions} sessions", start.count, stop.count);
    }
    if active != 0 {
        bail!("the server reports {active} active sessions after every session was stopped");
    }
    Ok(())
}

fn timed(f: impl FnOnce() -> anyhow::Result<relay_bench::client::Response>) -> anyhow::Result<Duration> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed())
}

fn expect(
    r: anyhow::Result<relay_bench::client::Response>,
    status: u16,
) -> anyhow::Result<relay_bench::client::Response> {
    let r = r?;
    if r.status != status {
        bail!("expected {status}, got {}: {}", r.status, String::from_utf8_lossy(&r.body));
    }
    Ok(r)
}
