//! Command-line interface. The `///` comments are the `--help` text; every daemon flag can
//! also come from a `TCPMON_*` environment variable (the flag wins).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;

pub use crate::loader::{AcceptChoice, HookChoice};
use crate::naming::labels::LabelLimits;
use crate::pipeline::PipelineOptions;
use crate::tail::client::TailOptions;
use crate::tail::filter::{parse_net, parse_outcome, parse_side, Filter, Subscribe, View};
use crate::tail::record::PROTOCOL_VERSION;

/// tcpmon: TCP handshake, teardown and connection-outcome metrics from the kernel's
/// sock:inet_sock_set_state tracepoint, for Prometheus.
#[derive(Debug, Parser)]
#[command(name = "tcpmon", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,

    /// Log level: error, warn, info, debug, trace (or an env_logger filter such as
    /// `monitor=debug`). RUST_LOG is used when this is not given.
    #[arg(long, global = true, env = "TCPMON_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Log format on stderr.
    #[arg(long, global = true, env = "TCPMON_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `[time LEVEL target] message`
    Text,
    /// One JSON object per line: `ts`, `level`, `target`, `msg`.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the eBPF program and serve Prometheus metrics until SIGINT/SIGTERM (needs root).
    Run(Box<RunArgs>),
    /// Watch connections live: from the running daemon, or stand-alone when none runs.
    Tail(Box<TailArgs>),
    /// Diagnose this host: can tcpmon run here, and if not, what to fix. Exit code 0 if it can.
    Check,
    /// Print a shell completion script, e.g. `tcpmon completions bash > /etc/bash_completion.d/tcpmon`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `tcpmon man > /usr/local/share/man/man1/tcpmon.1`.
    Man,
}

/// `--hook`: the command line's names for [`HookChoice`] (the loader knows nothing of clap).
impl clap::ValueEnum for HookChoice {
    fn value_variants<'a>() -> &'a [Self] {
        &[HookChoice::Auto, HookChoice::Btf, HookChoice::Tracepoint]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        use clap::builder::PossibleValue;
        Some(match self {
            HookChoice::Auto => {
                PossibleValue::new("auto").help("The BTF tracepoint, else the classic one")
            }
            HookChoice::Btf => PossibleValue::new("btf").help(
                "Only the BTF tracepoint (`tp_btf`): reads the socket directly, skips the \
                 trace record",
            ),
            HookChoice::Tracepoint => PossibleValue::new("tracepoint").help(
                "Only the classic tracepoint: needs tracefs; for kernels whose verifier \
                 refuses the BTF build",
            ),
        })
    }
}

/// `--accept-wait`: the command line's names for [`AcceptChoice`].
impl clap::ValueEnum for AcceptChoice {
    fn value_variants<'a>() -> &'a [Self] {
        &[AcceptChoice::Auto, AcceptChoice::Fexit, AcceptChoice::Syscalls, AcceptChoice::Off]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        use clap::builder::PossibleValue;
        Some(match self {
            AcceptChoice::Auto => PossibleValue::new("auto")
                .help("fexit where the kernel allows BPF trampolines, else off"),
            AcceptChoice::Fexit => PossibleValue::new("fexit").help(
                "fexit on inet_csk_accept: every accept (io_uring's too), no cost elsewhere; \
                 needs BPF trampolines",
            ),
            AcceptChoice::Syscalls => PossibleValue::new("syscalls").help(
                "The accept()/accept4() syscall tracepoints: works without trampolines, but \
                 every system call on the host takes the kernel's slow path while attached",
            ),
            AcceptChoice::Off => PossibleValue::new("off").help("Do not watch accept()"),
        })
    }
}

/// `--listen`: a socket address, or a bare IPv6 address followed by `:PORT` (what
/// substituting an address into `ADDRESS:PORT` gives, as the DaemonSet does with the node's).
fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = text.parse() {
        return Ok(address);
    }
    let bad = || format!("`{text}` is not ADDRESS:PORT (e.g. 127.0.0.1:9979, [::1]:9979)");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let host: std::net::Ipv6Addr = host.parse().map_err(|_| bad())?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    Ok(SocketAddr::new(host.into(), port))
}

/// `--ring-bytes` default, also used by the stand-alone tail.
const DEFAULT_RING_BYTES: &str = "8MiB";
/// `--drain-interval` default, also used by the stand-alone tail.
const DEFAULT_DRAIN_INTERVAL: &str = "100ms";

/// Options of `tcpmon run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Address to serve /metrics and /healthz on: ADDRESS:PORT, an IPv6 address in brackets
    /// or bare (`[fd00::5]:9979` or `fd00::5:9979`: a bare one's last `:N` is the port, so
    /// `$(NODE_IP):9979` works on IPv4 and IPv6 nodes alike).
    #[arg(long, env = "TCPMON_LISTEN", default_value = "127.0.0.1:9979", value_parser = parse_listen)]
    pub listen: SocketAddr,

    /// Web configuration in the exporter-toolkit format (node_exporter's
    /// `--web.config.file`): TLS, basic auth, headers, rate limit. Re-read when it or a file
    /// it names changes. /healthz stays open for probes.
    #[arg(long, env = "TCPMON_WEB_CONFIG", value_name = "FILE")]
    pub web_config: Option<PathBuf>,

    /// Connections to the metrics endpoint served at once; up to 256 more only get /healthz
    /// answered (anything else: 503), and beyond that connections are closed.
    #[arg(long, env = "TCPMON_WEB_MAX_CONNECTIONS", value_name = "N",
          default_value_t = crate::web::DEFAULT_MAX_CONNECTIONS,
          value_parser = connection_cap)]
    pub web_max_connections: usize,

    /// Ring buffer bytes between kernel and daemon, shared evenly by one ring per CPU (up to
    /// 16): a power of two of at least 4KiB (suffixes KiB, MiB accepted). Each transition
    /// takes 112 bytes (168 for handshake completions and closes), its record and the ring's
    /// 8-byte header.
    #[arg(long, env = "TCPMON_RING_BYTES", default_value = DEFAULT_RING_BYTES, value_parser = parse_ring_bytes)]
    pub ring_bytes: u32,

    /// Longest time a transition waits in the ring before the daemon reads it
    /// (e.g. 100ms, 1s). The kernel also wakes the daemon when a quarter of the ring is full.
    #[arg(long, env = "TCPMON_DRAIN_INTERVAL", default_value = DEFAULT_DRAIN_INTERVAL, value_parser = parse_interval)]
    pub drain_interval: Duration,

    /// Wake the daemon for every transition instead of batching (lowest latency, more CPU).
    #[arg(long, env = "TCPMON_LOW_LATENCY")]
    pub low_latency: bool,

    /// Most sockets tracked at once; beyond it the least recently active are evicted
    /// (counted in tcpmon_tracker_evictions_total). Peak memory grows ~540 bytes per socket
    /// of the cap (README, "Memory").
    #[arg(long, env = "TCPMON_MAX_SOCKETS", default_value_t = crate::tracker::DEFAULT_MAX_SOCKETS,
          value_parser = clap::value_parser!(usize))]
    pub max_sockets: usize,

    /// Also export the main connection metrics by network namespace (`tcpmon_netns_*`, with a
    /// `netns` label): up to N namespaces get their own series, the rest share
    /// netns="other". 0 (the default) turns them off.
    #[arg(long, env = "TCPMON_NETNS_LABELS", value_name = "N", default_value_t = 0)]
    pub netns_labels: usize,

    /// Give the service ports a `port` label of their own: up to N listening ports (learned
    /// at listen() and at start-up) and N remote ports of connects (in the order first seen);
    /// later ones share port="other". 0 with no --ports: no `port` label (the series of
    /// tcpmon 0.1).
    #[arg(long, env = "TCPMON_PORT_LABELS", value_name = "N", default_value_t = LabelLimits::DEFAULT.ports,
          value_parser = label_cap)]
    pub port_labels: usize,

    /// Ports that always get a `port` value of their own, beyond --port-labels
    /// (comma-separated, e.g. 443,5432).
    #[arg(long, env = "TCPMON_PORTS", value_name = "LIST", value_delimiter = ',')]
    pub ports: Vec<u16>,

    /// Give up to N workloads (systemd units, containers, pods, cgroups) a `workload` label
    /// of their own, in the order first seen; later ones share workload="other". 0: no
    /// `workload` label.
    #[arg(long, env = "TCPMON_WORKLOAD_LABELS", value_name = "N", default_value_t = LabelLimits::DEFAULT.workloads,
          value_parser = label_cap)]
    pub workload_labels: usize,

    /// Workloads that always get a `workload` value of their own, beyond --workload-labels,
    /// and keep it: glob patterns of their names (comma-separated, e.g.
    /// `nginx.service,shop/*`).
    #[arg(long, env = "TCPMON_WORKLOADS", value_name = "LIST", value_delimiter = ',',
          value_parser = parse_workload_pattern)]
    pub workloads: Vec<glob::Pattern>,

    /// A `port`, `workload`, pair or `netns` value is retired (its series removed, its slot
    /// freed for the next) once no tracked socket uses it, its workload is gone (listener
    /// closed, cgroup removed, namespace gone) and it has been idle this long (e.g. 10m, 2s).
    #[arg(long, env = "TCPMON_LABEL_IDLE", value_name = "DUR", default_value = "10m",
          value_parser = parse_label_idle)]
    pub label_idle: Duration,

    /// Most (port, workload) pairs with series of their own; later pairs share
    /// port="other",workload="other". With --port-labels and --workload-labels this is the
    /// series budget (README).
    #[arg(long, env = "TCPMON_LABEL_PAIRS", value_name = "N", default_value_t = LabelLimits::DEFAULT.pairs as u64,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub label_pairs: u64,

    /// The cgroup2 tree workloads are named from; by default the cgroup2 mount in
    /// /proc/self/mountinfo. In a container with a cgroup namespace of its own, mount the
    /// host's tree and point this at it.
    #[arg(long, env = "TCPMON_CGROUP_ROOT", value_name = "DIR")]
    pub cgroup_root: Option<PathBuf>,

    /// The kubelet's pod log directory (`<namespace>_<pod>_<uid>` entries), which names pods
    /// `namespace/pod`; without it pods are `pod/<uid>`.
    #[arg(long, env = "TCPMON_POD_LOGS", value_name = "DIR", default_value = crate::naming::workload::DEFAULT_POD_LOGS)]
    pub pod_logs: PathBuf,

    /// Which build of the kernel program to attach: `btf` reads the socket directly and
    /// costs least (Linux 5.10+ in practice); `tracepoint` is the classic tracepoint, which
    /// needs tracefs; `auto` tries `btf` first.
    #[arg(long, env = "TCPMON_HOOK", value_enum, default_value_t = HookChoice::Auto)]
    pub hook: HookChoice,

    /// How to see the application's accept() calls, for the accept queue wait and the
    /// connections abandoned there: `fexit` (on inet_csk_accept; needs BPF trampolines),
    /// `syscalls` (the syscall tracepoints: every system call on the host takes the kernel's
    /// slow path while attached, ~60 ns each on an AMD EPYC, BENCHMARKS.md), `off`, or
    /// `auto`: fexit where it loads, else off.
    #[arg(long, env = "TCPMON_ACCEPT_WAIT", value_enum, default_value_t = AcceptChoice::Auto)]
    pub accept_wait: AcceptChoice,

    /// Also append every raw ring-buffer record to FILE, for replay tests and bug reports
    /// (contains addresses, ports and process names).
    #[arg(long, env = "TCPMON_RECORD", value_name = "FILE")]
    pub record: Option<PathBuf>,

    /// Unix socket that `tcpmon tail` connects to (created owner-only).
    #[arg(long, env = "TCPMON_TAIL_SOCKET", default_value = "/run/tcpmon/tail.sock")]
    pub tail_socket: PathBuf,

    /// TOML file with any of these settings (keys are the flag names, e.g. `ring-bytes`).
    /// Precedence: flag, then environment variable, then this file, then the default.
    #[arg(long, env = "TCPMON_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Options of `tcpmon tail`. Values of one filter are alternatives; different filters must
/// all match.
#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    /// One line per state transition instead of one per connection.
    #[arg(long)]
    pub events: bool,

    /// Also print a line when a connection is established (connections view).
    #[arg(long, conflicts_with = "events")]
    pub established: bool,

    /// List the connections now in CLOSE_WAIT (the peer closed, the application has not),
    /// oldest first, with their owners and how long they have waited; then exit. Filters
    /// apply. Needs the daemon.
    #[arg(long, conflicts_with_all = ["events", "established"])]
    pub close_wait: bool,

    /// One JSON object per line (fields documented in the README); nothing else on stdout.
    #[arg(long)]
    pub json: bool,

    /// Exit after N records.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,

    /// Never colour the output (it is only coloured on a terminal anyway).
    #[arg(long)]
    pub no_color: bool,

    /// The daemon's tail socket.
    #[arg(long, env = "TCPMON_TAIL_SOCKET", default_value = "/run/tcpmon/tail.sock")]
    pub socket: PathBuf,

    /// Local or remote port.
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,

    /// Local port.
    #[arg(long = "lport", value_name = "PORT")]
    pub local_ports: Vec<u16>,

    /// Remote port.
    #[arg(long = "rport", value_name = "PORT")]
    pub remote_ports: Vec<u16>,

    /// Local or remote address, or CIDR network (10.0.0.0/8, ::1).
    #[arg(long = "addr", value_name = "ADDR|CIDR", value_parser = parse_net)]
    pub addrs: Vec<IpNet>,

    /// Local address or network.
    #[arg(long = "laddr", value_name = "ADDR|CIDR", value_parser = parse_net)]
    pub local_addrs: Vec<IpNet>,

    /// Remote address or network.
    #[arg(long = "raddr", value_name = "ADDR|CIDR", value_parser = parse_net)]
    pub remote_addrs: Vec<IpNet>,

    /// Owning process id.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// Owning process name (exact, as in /proc/PID/comm).
    #[arg(long = "comm", value_name = "NAME")]
    pub comms: Vec<String>,

    /// Workload name, where `*` matches anything (e.g. nginx.service, 'shop/*',
    /// 'container/*').
    #[arg(long = "workload", value_name = "PATTERN")]
    pub workloads: Vec<String>,

    /// active (this host connected) or passive (accepted).
    #[arg(long = "side", value_parser = parse_side)]
    pub sides: Vec<String>,

    /// How connections ended: fin, reset_received, reset_sent, reset (either), abort, timeout,
    /// refused, unreachable, error, unknown.
    #[arg(long = "outcome", value_parser = parse_outcome, conflicts_with = "events")]
    pub outcomes: Vec<String>,

    /// Only connections whose handshake took at least this long (e.g. 200ms).
    #[arg(long, value_name = "DURATION", value_parser = parse_min, conflicts_with = "events")]
    pub min_handshake: Option<Duration>,

    /// Only connections that lived at least this long.
    #[arg(long, value_name = "DURATION", value_parser = parse_min, conflicts_with = "events")]
    pub min_lifetime: Option<Duration>,

    /// Only connections whose teardown took at least this long.
    #[arg(long, value_name = "DURATION", value_parser = parse_min, conflicts_with = "events")]
    pub min_teardown: Option<Duration>,
}

impl TailArgs {
    /// What the tail client does.
    pub fn options(&self) -> Result<TailOptions, String> {
        Ok(TailOptions {
            socket: self.socket.clone(),
            request: self.subscribe()?,
            json: self.json,
            count: self.count,
            no_color: self.no_color,
        })
    }

    /// The pipeline the tail runs itself when no daemon runs: the daemon's defaults, but
    /// woken for every event (a person is watching).
    pub fn standalone_pipeline(&self) -> PipelineOptions {
        // The constants parse: see the test `the_shared_defaults_parse`.
        PipelineOptions {
            ring_bytes: parse_ring_bytes(DEFAULT_RING_BYTES).expect("a valid constant"),
            wakeup_bytes: 0,
            drain_interval: parse_interval(DEFAULT_DRAIN_INTERVAL).expect("a valid constant"),
            max_sockets: crate::tracker::DEFAULT_MAX_SOCKETS,
            record: None,
            hook: HookChoice::default(),
            accept: AcceptChoice::default(),
        }
    }

    /// The request sent to the daemon.
    pub fn subscribe(&self) -> Result<Subscribe, String> {
        let micros = |d: Option<Duration>| d.map(|d| d.as_micros().min(u64::MAX as u128) as u64);
        let request = Subscribe {
            version: PROTOCOL_VERSION,
            view: match (self.events, self.close_wait) {
                (true, _) => View::Events,
                (_, true) => View::CloseWait,
                _ => View::Connections,
            },
            established: self.established,
            filter: Filter {
                ports: self.ports.clone(),
                local_ports: self.local_ports.clone(),
                remote_ports: self.remote_ports.clone(),
                addrs: self.addrs.clone(),
                local_addrs: self.local_addrs.clone(),
                remote_addrs: self.remote_addrs.clone(),
                pids: self.pids.clone(),
                comms: self.comms.clone(),
                sides: self.sides.clone(),
                workloads: self.workloads.clone(),
                outcomes: self.outcomes.clone(),
                min_handshake_us: micros(self.min_handshake),
                min_lifetime_us: micros(self.min_lifetime),
                min_teardown_us: micros(self.min_teardown),
            },
        };
        request.validate()?;
        Ok(request)
    }
}

/// Parses one `--workloads` pattern: a glob of at most 256 bytes.
fn parse_workload_pattern(text: &str) -> Result<glob::Pattern, String> {
    if text.len() > 256 {
        return Err(format!("a pattern of {} bytes is longer than 256", text.len()));
    }
    glob::Pattern::new(text).map_err(|e| format!("`{text}`: {e}"))
}

/// Parses `--label-idle`: at least 1 s.
fn parse_label_idle(text: &str) -> Result<Duration, String> {
    let idle =
        humantime::parse_duration(text).map_err(|e| format!("`{text}`: {e} (e.g. 10m, 2s)"))?;
    if idle < Duration::from_secs(1) {
        return Err(format!("`{text}` is shorter than 1s"));
    }
    Ok(idle)
}

/// Parses `--web-max-connections`: 1 to 10,000.
fn connection_cap(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=10_000).contains(&n) => Ok(n),
        Ok(n) => Err(format!("{n} is not between 1 and 10000 connections")),
        Err(e) => Err(format!("`{text}`: {e}")),
    }
}

/// Parses a label cap: at most 10,000 values (already far past any sane series budget; the
/// values are numbered in 16 bits).
fn label_cap(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n <= 10_000 => Ok(n),
        Ok(n) => Err(format!("{n} is more than 10000 label values")),
        Err(e) => Err(format!("`{text}`: {e}")),
    }
}

/// Parses a minimum duration such as `200ms` or `2s`.
pub fn parse_min(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("`{text}`: {e} (e.g. 200ms, 2s)"))
}

impl RunArgs {
    /// The `port` and `workload` label caps these flags ask for.
    pub fn label_limits(&self) -> LabelLimits {
        LabelLimits {
            ports: self.port_labels,
            pinned_ports: self.ports.clone(),
            workloads: self.workload_labels,
            pairs: usize::try_from(self.label_pairs).unwrap_or(usize::MAX),
            pinned_workloads: self.workloads.clone(),
            idle: self.label_idle,
        }
    }

    /// The pipeline these flags ask for.
    pub fn pipeline_options(&self) -> PipelineOptions {
        PipelineOptions {
            ring_bytes: self.ring_bytes,
            wakeup_bytes: self.wakeup_bytes(),
            drain_interval: self.drain_interval,
            max_sockets: self.max_sockets,
            record: self.record.clone(),
            hook: self.hook,
            accept: self.accept_wait,
        }
    }

    /// Bytes waiting in the ring at which the kernel wakes the daemon (0: every event).
    pub fn wakeup_bytes(&self) -> u64 {
        if self.low_latency {
            0
        } else {
            u64::from(self.ring_bytes) / 4
        }
    }
}

/// Parses a ring size such as `8MiB`, `256KiB` or `4096`.
pub fn parse_ring_bytes(text: &str) -> Result<u32, String> {
    let trimmed = text.trim();
    let (digits, unit) = match trimmed.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => trimmed.split_at(at),
        None => (trimmed, ""),
    };
    let number: u64 = digits.parse().map_err(|_| format!("`{text}` is not a size like 8MiB"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" | "m" => 1 << 20,
        "G" | "GiB" | "g" => 1 << 30,
        other => return Err(format!("unknown unit `{other}` in `{text}` (use KiB, MiB or GiB)")),
    };
    let bytes = number.checked_mul(multiplier).ok_or_else(|| format!("`{text}` is too large"))?;
    if bytes < 4096 || !bytes.is_power_of_two() {
        return Err(format!("`{text}` must be a power of two of at least 4KiB (e.g. 1MiB, 8MiB)"));
    }
    u32::try_from(bytes).map_err(|_| format!("`{text}` is too large: at most 2GiB"))
}

/// Parses a drain interval between 1 ms and 10 s.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval =
        humantime::parse_duration(text).map_err(|e| format!("`{text}`: {e} (e.g. 100ms)"))?;
    if interval < Duration::from_millis(1) || interval > Duration::from_secs(10) {
        return Err(format!("`{text}` must be between 1ms and 10s"));
    }
    Ok(interval)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_shared_defaults_parse() {
        assert_eq!(parse_ring_bytes(DEFAULT_RING_BYTES), Ok(8 << 20));
        assert_eq!(parse_interval(DEFAULT_DRAIN_INTERVAL), Ok(Duration::from_millis(100)));
    }

    #[test]
    fn ring_sizes() {
        assert_eq!(parse_ring_bytes("8MiB"), Ok(8 << 20));
        assert_eq!(parse_ring_bytes("4096"), Ok(4096));
        assert_eq!(parse_ring_bytes("256KiB"), Ok(256 << 10));
        assert!(parse_ring_bytes("3MiB").unwrap_err().contains("power of two"));
        assert!(parse_ring_bytes("1024").unwrap_err().contains("at least 4KiB"));
        assert!(parse_ring_bytes("8XB").unwrap_err().contains("unknown unit"));
        assert!(parse_ring_bytes("lots").is_err());
        assert!(parse_ring_bytes("4GiB").unwrap_err().contains("too large"));
        assert!(parse_ring_bytes("99999999999999999999").is_err());
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("100ms"), Ok(Duration::from_millis(100)));
        assert!(parse_interval("0s").is_err());
        assert!(parse_interval("1h").is_err());
        assert!(parse_interval("soon").is_err());
    }

    #[test]
    fn listen_takes_bare_ipv6_addresses_with_a_port() {
        assert_eq!(parse_listen("10.0.0.7:9979"), Ok("10.0.0.7:9979".parse().unwrap()));
        assert_eq!(parse_listen("[fd00::5]:9979"), Ok("[fd00::5]:9979".parse().unwrap()));
        // `$(NODE_IP):9979` on an IPv6 node.
        assert_eq!(parse_listen("fd00::5:9979"), Ok("[fd00::5]:9979".parse().unwrap()));
        assert_eq!(parse_listen("::1:0"), Ok("[::1]:0".parse().unwrap()));
        for bad in ["nowhere", "10.0.0.7", "fd00::5", "10.0.0.7:99999", "fd00::5:port", ""] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        for args in [
            &["tcpmon", "run", "--listen", "nowhere"][..],
            &["tcpmon", "run", "--ring-bytes", "3MiB"],
            &["tcpmon", "run", "--max-sockets", "-1"],
            &["tcpmon", "bogus"],
        ] {
            let err = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
        let Command::Run(run) = Cli::try_parse_from(["tcpmon", "run"]).unwrap().command else {
            panic!("not run")
        };
        assert_eq!(run.listen, "127.0.0.1:9979".parse().unwrap());
        assert_eq!(run.wakeup_bytes(), 2 << 20);
    }

    fn tail(args: &[&str]) -> Result<TailArgs, clap::Error> {
        let full: Vec<&str> = ["tcpmon", "tail"].iter().chain(args).copied().collect();
        Cli::try_parse_from(full).map(|cli| match cli.command {
            Command::Tail(args) => *args,
            _ => panic!("not tail"),
        })
    }

    #[test]
    fn logging_flags_are_global_and_validated() {
        let cli =
            Cli::try_parse_from(["tcpmon", "run", "--log-format", "json", "--log-level", "debug"])
                .unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
        assert_eq!(cli.log_level.as_deref(), Some("debug"));
        let err = Cli::try_parse_from(["tcpmon", "run", "--log-format", "xml"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn tail_filters_parse_into_the_request() {
        let args = tail(&[
            "--port",
            "5432",
            "--port",
            "80",
            "--addr",
            "10.0.0.0/8",
            "--raddr",
            "::1",
            "--side",
            "active",
            "--outcome",
            "reset",
            "--min-handshake",
            "200ms",
            "--comm",
            "psql",
        ])
        .unwrap();
        let request = args.subscribe().unwrap();
        assert_eq!(request.view, View::Connections);
        assert_eq!(request.filter.ports, vec![5432, 80]);
        assert_eq!(request.filter.addrs, vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]);
        assert_eq!(request.filter.remote_addrs, vec!["::1/128".parse::<IpNet>().unwrap()]);
        assert_eq!(request.filter.min_handshake_us, Some(200_000));
        assert_eq!(request.filter.outcomes, vec!["reset".to_owned()]);
        assert_eq!(tail(&["--events"]).unwrap().subscribe().unwrap().view, View::Events);
        let listing = tail(&["--close-wait", "--port", "80"]).unwrap().subscribe().unwrap();
        assert_eq!((listing.view, listing.filter.ports), (View::CloseWait, vec![80]));
    }

    #[test]
    fn bad_tail_filters_are_usage_errors_that_say_why() {
        for (args, says) in [
            (&["--addr", "10.0.0.0/33"][..], "not an address or CIDR"),
            (&["--addr", "example.com"], "not an address or CIDR"),
            (&["--port", "70000"], "70000"),
            (&["--port", "http"], "http"),
            (&["--outcome", "exploded"], "not an outcome"),
            (&["--side", "left"], "not a side"),
            (&["--events", "--outcome", "fin"], "cannot be used with"),
            (&["--events", "--min-lifetime", "1s"], "cannot be used with"),
            (&["--close-wait", "--events"], "cannot be used with"),
            (&["--min-lifetime", "soon"], "soon"),
        ] {
            let err = tail(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
            assert!(err.to_string().contains(says), "{args:?}: {err}");
        }
    }
}
