//! `cargo xtask bench`: tcpmon's cost, measured against no monitor, against two references
//! on the same tracepoint (bpftrace's empty program, the floor; and the hash-map counter any
//! user could write instead) and against the peers installed on the machine (libbpf-tools
//! `tcpstates`, `tcplife`), in one interleaved run. Costs are compared within the run only:
//! the machines come in CPU kinds whose helper calls cost several times more than others'.
//!
//! For each configuration and round: start the monitor, run the loopback churn for a fixed
//! time, and read the kernel-side cost of the monitor's BPF programs (`bpf_stats`, by program
//! id: the ids that appeared when the monitor started), the userspace CPU time of the
//! monitor's processes, their peak RSS, and (for tcpmon) events received and lost. Then the
//! replay microbenchmark. Results go to stdout and BENCHMARKS.md.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bpfstats::{bpf_programs, bpf_stats, is_accept_program, STATS_SYSCTL};
use crate::churn;
use crate::namespaces::ScrapeCost;
use crate::spread::{median, shown, Spread};

/// What to run.
pub struct Options {
    /// Seconds of churn per run.
    pub seconds: u64,
    /// Interleaved rounds.
    pub rounds: usize,
    /// Where to write the report (None: stdout only).
    pub report: Option<PathBuf>,
    /// Connections held open for the memory measurement (each is two tracked sockets).
    pub held_connections: usize,
    /// Judge the targets (not in a smoke run, whose one short round cannot).
    pub verdicts: bool,
    /// Network namespace counts to measure the scrape's cost at.
    pub namespaces: &'static [usize],
}

impl Options {
    /// A short run (1 s, 1 round, a few namespaces) that writes no report and judges
    /// nothing: it checks that the bench still runs end to end.
    pub fn smoke() -> Options {
        Options {
            seconds: 1,
            rounds: 1,
            report: None,
            held_connections: 1_000,
            verdicts: false,
            namespaces: &[1, 10],
        }
    }
}

#[derive(Clone, Debug)]
enum Config {
    None,
    Tcpmon,
    /// `tcpmon run` with the kernel program's cgroup read turned off: what attribution costs.
    TcpmonWithoutCgroup,
    TcpmonTail,
    Peer(&'static str),
    /// A bpftrace program on `sock:inet_sock_set_state`: (row name, program).
    Bpftrace(&'static str, &'static str),
}

/// The references: the cheapest program on the tracepoint, and the counter a user could
/// write in one line.
/// Where the generated report goes in BENCHMARKS.md; the history after it is kept.
const REPORT_BEGIN: &str = "<!-- bench:begin (written by cargo xtask bench) -->";
/// See [`REPORT_BEGIN`].
const REPORT_END: &str = "<!-- bench:end -->";

const BPFTRACE_EMPTY: Config =
    Config::Bpftrace("bpftrace: empty program", "tracepoint:sock:inet_sock_set_state { }");
const BPFTRACE_COUNTER: Config = Config::Bpftrace(
    "bpftrace: hash-map counter",
    "tracepoint:sock:inet_sock_set_state { @[args->newstate] = count(); }",
);

impl Config {
    fn name(&self) -> String {
        match self {
            Config::None => "no monitor".into(),
            Config::Tcpmon => "tcpmon run".into(),
            Config::TcpmonWithoutCgroup => "tcpmon run, no cgroup read".into(),
            Config::TcpmonTail => "tcpmon run + tail --json".into(),
            Config::Peer(p) => format!("libbpf-tools {p}"),
            Config::Bpftrace(name, _) => (*name).into(),
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Sample {
    /// Why the configuration could not be measured (a peer or reference that failed).
    failed: Option<String>,
    connections_per_sec: f64,
    bpf_ns_per_event: Option<f64>,
    user_cpu_ns_per_event: Option<f64>,
    peak_rss_mib: Option<f64>,
    lost: Option<u64>,
}

/// A `kB` field of `/proc/PID/status`, e.g. `VmRSS` or `VmHWM` (peak RSS); 0 if unreadable.
pub(crate) fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

pub(crate) fn http_get(address: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.starts_with("HTTP/1.1 200").then_some(response)
}

pub(crate) fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

pub(crate) fn stop(child: &mut Child, signal: i32) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, signal) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

struct Monitor {
    processes: Vec<Child>,
    metrics_address: Option<String>,
}

/// Starts `tcpmon run` alone and waits until it is healthy.
fn start_daemon(tcpmon: &Path, scratch: &Path) -> Result<Monitor> {
    start(&Config::Tcpmon, tcpmon, scratch)
}

/// Stops a monitor's processes (SIGINT, as the daemon is stopped by hand).
fn stop_daemon(monitor: &mut Monitor) {
    for process in monitor.processes.iter_mut() {
        stop(process, libc::SIGINT);
    }
}

/// The daemon's CPU per `/metrics` scrape beyond what it spends idle: the first scrape, then
/// scrapes more than a second apart (closer ones share one kernel read), each against the
/// same time idle.
fn daemon_scrape_cost(monitor: &Monitor) -> Result<ScrapeCost> {
    let address = monitor.metrics_address.as_deref().context("metrics address")?;
    let daemon = monitor.processes.first().context("no daemon")?.id();
    const SCRAPES: u32 = 3;
    let gap = Duration::from_millis(1_100);
    let idle_from = cpu_ns(daemon);
    thread::sleep(gap * SCRAPES);
    let idle = cpu_ns(daemon).saturating_sub(idle_from) / u64::from(SCRAPES);
    let scrapes = |count: u32| -> Result<f64> {
        let busy_from = cpu_ns(daemon);
        for _ in 0..count {
            http_get(address, "/metrics").context("scraping tcpmon")?;
            thread::sleep(gap);
        }
        let busy = cpu_ns(daemon).saturating_sub(busy_from);
        Ok(busy.saturating_sub(idle * u64::from(count)) as f64 / f64::from(count) / 1e6)
    };
    let first_ms = scrapes(1)?;
    Ok(ScrapeCost { first_ms, idle_ms: scrapes(SCRAPES)? })
}

/// Starts `tcpmon run` with a `tail --json` attached (soak); returns the processes, daemon
/// first, and the metrics address.
pub(crate) fn start_tcpmon_with_tail(
    tcpmon: &Path,
    scratch: &Path,
) -> Result<(Vec<Child>, String)> {
    let monitor = start(&Config::TcpmonTail, tcpmon, scratch)?;
    let address = monitor.metrics_address.clone().context("no metrics address")?;
    Ok((monitor.processes, address))
}

fn start(config: &Config, tcpmon: &Path, scratch: &Path) -> Result<Monitor> {
    start_with(config, tcpmon, scratch, &[])
}

/// [`start`], with `extra` arguments for `tcpmon run`.
fn start_with(config: &Config, tcpmon: &Path, scratch: &Path, extra: &[&str]) -> Result<Monitor> {
    let quiet = || Stdio::null();
    match config {
        Config::None => Ok(Monitor { processes: vec![], metrics_address: None }),
        Config::Tcpmon | Config::TcpmonWithoutCgroup | Config::TcpmonTail => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let address = format!("127.0.0.1:{port}");
            let socket = scratch.join("tail.sock");
            let mut daemon = Command::new(tcpmon);
            if matches!(config, Config::TcpmonWithoutCgroup) {
                // monitor::loader::WITHOUT_CGROUP_ENV
                daemon.env("TCPMON_BENCH_WITHOUT_CGROUP", "1");
            }
            let daemon = daemon
                .args(["run", "--listen", &address, "--tail-socket"])
                .arg(&socket)
                .args(extra)
                .stdout(quiet())
                .stderr(quiet())
                .spawn()
                .context("starting tcpmon run")?;
            let mut monitor =
                Monitor { processes: vec![daemon], metrics_address: Some(address.clone()) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while http_get(&address, "/healthz").is_none() {
                if Instant::now() > deadline {
                    bail!("tcpmon run did not become healthy");
                }
                thread::sleep(Duration::from_millis(50));
            }
            if matches!(config, Config::TcpmonTail) {
                let mut tail = Command::new(tcpmon)
                    .args(["tail", "--json", "--socket"])
                    .arg(&socket)
                    .stdout(quiet())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("starting tcpmon tail")?;
                let mut stderr = BufReader::new(tail.stderr.take().context("tail stderr")?);
                let mut line = String::new();
                stderr.read_line(&mut line)?;
                if !line.contains("following the daemon") {
                    bail!("tcpmon tail did not attach: {line}");
                }
                thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
                monitor.processes.push(tail);
            }
            Ok(monitor)
        }
        Config::Peer(tool) => {
            let mut command = Command::new(format!("/usr/sbin/{tool}"));
            command.stdout(quiet()).stderr(quiet());
            start_tool(command, tool)
        }
        Config::Bpftrace(_, program) => {
            let mut command = Command::new("bpftrace");
            command.args(["-e", program]).stdout(quiet()).stderr(Stdio::piped());
            start_tool(command, "bpftrace")
        }
    }
}

/// Starts a peer tool and waits until it has loaded a BPF program; fails with what it said
/// on stderr (when piped) if it exits or loads nothing.
fn start_tool(mut command: Command, tool: &str) -> Result<Monitor> {
    let before: BTreeSet<u64> = bpf_programs()?.keys().copied().collect();
    let mut child = command.spawn().with_context(|| format!("starting {tool}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while bpf_programs()?.keys().all(|id| before.contains(id)) {
        let exited = child.try_wait()?.is_some();
        if exited || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let mut said = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = stderr.read_to_string(&mut said);
            }
            let said = said.lines().find(|l| !l.trim().is_empty()).unwrap_or("no message");
            bail!("{tool} loaded no BPF program: {said}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(300)); // attach follows load
    if let Some(stderr) = child.stderr.take() {
        thread::spawn(move || std::io::copy(&mut { stderr }, &mut std::io::sink()));
    }
    Ok(Monitor { processes: vec![child], metrics_address: None })
}

/// CPU time of all of a process's threads so far, in ns (`/proc/PID/task/*/schedstat`).
fn cpu_ns(pid: u32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
    tasks
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Runs `config` twice under the churn: first with `bpf_stats` on, for the programs' own
/// cost; then with it off, as in production (it adds two clock reads to every run of
/// every program, which would weigh on every monitor's throughput), for the throughput,
/// the monitor's CPU time, its peak RSS and its losses.
fn run_one(config: &Config, seconds: u64, tcpmon: &Path, scratch: &Path) -> Result<Sample> {
    let before_ids: BTreeSet<u64> = bpf_programs()?.keys().copied().collect();
    let mut monitor = start(config, tcpmon, scratch)?;
    let result = measure(&monitor, &before_ids, seconds);
    for process in monitor.processes.iter_mut().rev() {
        stop(process, libc::SIGINT);
    }
    result
}

fn measure(monitor: &Monitor, before_ids: &BTreeSet<u64>, seconds: u64) -> Result<Sample> {
    // The accept hook runs once per accepted connection, not per transition: it has rows
    // of its own (crate::accept), and its runs would dilute these.
    let ours: Vec<u64> = bpf_programs()?
        .iter()
        .filter(|(id, program)| !before_ids.contains(id) && !is_accept_program(&program.name))
        .map(|(id, _)| *id)
        .collect();
    let mut sample = Sample::default();
    // The programs' runs per connection: what the CPU time is divided by.
    let mut runs_per_connection = None;
    if !ours.is_empty() {
        bpf_stats(true)?;
        let progs_before = bpf_programs()?;
        let report = churn::run(Duration::from_secs(seconds.div_ceil(2)), 2);
        let progs_after = bpf_programs()?;
        bpf_stats(false)?;
        let report = report?;
        let (mut run_ns, mut runs) = (0u64, 0u64);
        for id in &ours {
            let (b, a) = (
                progs_before.get(id).cloned().unwrap_or_default(),
                progs_after.get(id).cloned().unwrap_or_default(),
            );
            run_ns += a.run_time_ns.saturating_sub(b.run_time_ns);
            runs += a.run_cnt.saturating_sub(b.run_cnt);
        }
        if runs > 0 && report.connections > 0 {
            sample.bpf_ns_per_event = Some(run_ns as f64 / runs as f64);
            runs_per_connection = Some(runs as f64 / report.connections as f64);
        }
    }

    // Peak RSS during the load, not the start-up transient: "5" resets VmHWM (proc(5)).
    for process in &monitor.processes {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", process.id()), "5");
    }
    // Scraped before the CPU count starts: a scrape's cost is measured on its own (`Held`).
    let metrics_before = monitor.metrics_address.as_deref().and_then(|a| http_get(a, "/metrics"));
    let cpu_before: u64 = monitor.processes.iter().map(|p| cpu_ns(p.id())).sum();
    let report = churn::run(Duration::from_secs(seconds), 2)?;
    thread::sleep(Duration::from_millis(300)); // let the monitor drain
    let cpu_after: u64 = monitor.processes.iter().map(|p| cpu_ns(p.id())).sum();
    let metrics_after = monitor.metrics_address.as_deref().and_then(|a| http_get(a, "/metrics"));
    let rss: u64 = monitor.processes.iter().map(|p| status_kib(p.id(), "VmHWM")).sum();

    sample.connections_per_sec = report.per_second();
    if let Some(per_connection) = runs_per_connection {
        let events = report.connections as f64 * per_connection;
        sample.user_cpu_ns_per_event = Some(cpu_after.saturating_sub(cpu_before) as f64 / events);
        sample.peak_rss_mib = Some(rss as f64 / 1024.0);
    }
    if let (Some(b), Some(a)) = (&metrics_before, &metrics_after) {
        let lost = |t: &str| metric(t, "tcpmon_events_lost_total").unwrap_or(0.0);
        sample.lost = Some((lost(a) - lost(b)) as u64);
    }
    Ok(sample)
}

/// Connections one `xtask hold` process keeps open: two fds each, within the usual hard
/// RLIMIT_NOFILE of 20k that even root cannot raise without CAP_SYS_RESOURCE.
const HELD_PER_PROCESS: usize = 9_000;

/// `xtask hold`: opens `connections` loopback connections to a listener of its own, prints
/// `ready`, and keeps them open until its stdin closes.
pub fn hold(connections: usize) -> Result<()> {
    let wanted = (connections * 2 + 256) as libc::rlim_t;
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid struct; raising the soft limit up to the hard
    // one needs no privilege.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = wanted.min(limit.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    // std listens with a backlog of 128; a full accept queue drops SYNs, and each drop costs
    // the connect a 1 s retransmission. Calling listen() again raises the backlog.
    // SAFETY: listen(2) on a socket we own.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) };
    let target = listener.local_addr()?;
    let acceptor = thread::spawn(move || {
        (0..connections).filter_map(|_| listener.accept().ok().map(|(s, _)| s)).collect::<Vec<_>>()
    });
    let clients = (0..connections)
        .map(|_| TcpStream::connect(target))
        .collect::<Result<Vec<_>, _>>()
        .context("opening held connections")?;
    let servers = acceptor.join().map_err(|_| anyhow::anyhow!("acceptor panicked"))?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest); // until the parent closes it
    drop((clients, servers));
    Ok(())
}

/// What the daemon costs while `connections` loopback connections are held open.
/// Everything one run measured, for the report.
struct Measured {
    /// `(configuration index, sample)` of every round.
    samples: Vec<(usize, Sample)>,
    held: Held,
    namespaces: Vec<crate::namespaces::Row>,
    accept: Vec<crate::accept::Row>,
    /// The replay benchmark's `key=value` line.
    replay: String,
}

#[derive(Clone, Copy)]
struct Held {
    /// Sockets it tracked.
    tracked: f64,
    /// Its RSS, MiB.
    rss_mib: f64,
    /// CPU per `/metrics` scrape: the kernel state read (every namespace's sockstat, netstat
    /// and snmp, a `sock_diag` dump) and the encoding, beyond what the idle daemon spends.
    scrape: ScrapeCost,
}

/// Holds `connections` loopback connections open (in several `xtask hold` processes), so
/// tcpmon tracks twice as many sockets, and measures the daemon meanwhile.
fn rss_with_open_connections(tcpmon: &Path, scratch: &Path, connections: usize) -> Result<Held> {
    let mut monitor = start(&Config::Tcpmon, tcpmon, scratch)?;
    let address = monitor.metrics_address.clone().context("metrics address")?;
    let me = std::env::current_exe().context("finding the xtask binary")?;
    let mut holders = Vec::new();
    let mut left = connections;
    while left > 0 {
        let count = left.min(HELD_PER_PROCESS);
        left -= count;
        let mut holder = Command::new(&me)
            .args(["hold", "--connections", &count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a connection holder")?;
        let mut line = String::new();
        BufReader::new(holder.stdout.take().context("holder stdout")?).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("a connection holder failed to open its connections");
        }
        holders.push(holder);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let tracked = loop {
        let text = http_get(&address, "/metrics").unwrap_or_default();
        let tracked = metric(&text, "tcpmon_tracked_sockets").unwrap_or(0.0);
        if tracked >= (connections * 2) as f64 || Instant::now() > deadline {
            break tracked;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let rss_kib = status_kib(monitor.processes[0].id(), "VmRSS");
    let scrape = daemon_scrape_cost(&monitor)?;
    for mut holder in holders {
        drop(holder.stdin.take()); // EOF: the holder closes its connections and exits
        let _ = holder.wait();
    }
    stop_daemon(&mut monitor);
    Ok(Held { tracked, rss_mib: rss_kib as f64 / 1024.0, scrape })
}

/// The CPU vulnerabilities the kernel mitigates (or reports unmitigated): what makes helper
/// calls and returns cheap or dear, so that numbers of different machines are not mixed up.
fn mitigations() -> String {
    let dir = Path::new("/sys/devices/system/cpu/vulnerabilities");
    let mut entries: Vec<(String, String)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let state = std::fs::read_to_string(entry.path()).ok()?.trim().to_owned();
            let name = entry.file_name().to_string_lossy().into_owned();
            (state != "Not affected").then_some((name, state))
        })
        .collect();
    entries.sort();
    if entries.is_empty() {
        return "none reported".into();
    }
    let list: Vec<String> =
        entries.iter().map(|(name, state)| format!("{name}: {state}")).collect();
    list.join("; ")
}

/// Mounts tracefs where it is missing: bpftrace attaches classic tracepoints.
fn ensure_tracefs() {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if !mounts.lines().any(|l| l.split_whitespace().nth(2) == Some("tracefs")) {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
            .status();
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1).map(|m| m.trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| format!("{:.0} GiB", kib as f64 / 1024.0 / 1024.0))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, {memory}, Linux {}", kernel.trim())
}

/// One configuration's results over all rounds.
struct Row {
    name: String,
    /// Why it was never measured, if it never was.
    failed: Option<String>,
    connections_per_sec: f64,
    min: f64,
    max: f64,
    /// Conn/s ÷ the unmonitored run of the same round, over rounds.
    paired: Spread,
    /// BPF ns/event and the monitor's CPU ns/event, over rounds: verdicts need the spread.
    bpf: Option<Spread>,
    user: Option<Spread>,
    rss_mib: Option<f64>,
    lost: Option<u64>,
}

/// Whether a target was met, judged against the rounds' spread.
#[derive(Clone, Debug, PartialEq)]
enum Verdict {
    Met,
    NotMet,
    /// The spread of the rounds covers the target: the run cannot tell.
    WithinNoise,
    NotMeasured,
}

impl Verdict {
    /// `figure ≤ limit`, every round on the same side of it, or noise.
    fn at_most(figure: Option<Spread>, limit: Option<Spread>) -> Verdict {
        match (figure, limit) {
            (Some(f), Some(l)) if f.high <= l.low => Verdict::Met,
            (Some(f), Some(l)) if f.low > l.high => Verdict::NotMet,
            (Some(_), Some(_)) => Verdict::WithinNoise,
            _ => Verdict::NotMeasured,
        }
    }

    /// `figure ≥ limit`, likewise.
    fn at_least(figure: Option<Spread>, limit: Option<Spread>) -> Verdict {
        let negate = |s: Spread| Spread { median: -s.median, low: -s.high, high: -s.low };
        Verdict::at_most(figure.map(negate), limit.map(negate))
    }

    /// A single measurement (no rounds to spread over).
    fn single(ok: Option<bool>) -> Verdict {
        match ok {
            Some(true) => Verdict::Met,
            Some(false) => Verdict::NotMet,
            None => Verdict::NotMeasured,
        }
    }

    fn word(&self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::NotMet => "NOT met",
            Verdict::WithinNoise => "within noise",
            Verdict::NotMeasured => "not measured",
        }
    }
}

/// A constant as a spread of one value.
fn exactly(value: f64) -> Option<Spread> {
    Some(Spread { median: value, low: value, high: value })
}

/// Medians per configuration, from the measured samples only. The runs of a round are
/// adjacent in time, so pairing each with the unmonitored run of its round cancels slow
/// drifts of the machine.
fn summarize(configs: &[Config], samples: &[(usize, Sample)]) -> Vec<Row> {
    let per_round = configs.len();
    configs
        .iter()
        .enumerate()
        .map(|(index, config)| {
            let measured: Vec<&Sample> = samples
                .iter()
                .filter(|(i, s)| *i == index && s.failed.is_none())
                .map(|(_, s)| s)
                .collect();
            let failed = if measured.is_empty() {
                let why =
                    samples.iter().find(|(i, _)| *i == index).and_then(|(_, s)| s.failed.clone());
                Some(why.unwrap_or_else(|| "no run".into()))
            } else {
                None
            };
            let of = |f: &dyn Fn(&Sample) -> Option<f64>| -> Option<f64> {
                let mut v: Vec<f64> = measured.iter().filter_map(|s| f(s)).collect();
                (!v.is_empty()).then(|| median(&mut v))
            };
            let all: Vec<f64> = measured.iter().map(|s| s.connections_per_sec).collect();
            let ratios: Vec<f64> = samples
                .chunks(per_round)
                .filter_map(|round| {
                    let none = round.iter().find(|(i, _)| *i == 0)?.1.connections_per_sec;
                    let this = round.iter().find(|(i, s)| *i == index && s.failed.is_none())?;
                    Some(this.1.connections_per_sec / none)
                })
                .collect();
            Row {
                name: config.name(),
                failed,
                connections_per_sec: of(&|s| Some(s.connections_per_sec)).unwrap_or(f64::NAN),
                min: all.iter().copied().fold(f64::INFINITY, f64::min),
                max: all.iter().copied().fold(0.0, f64::max),
                paired: Spread::of(&ratios).unwrap_or(Spread {
                    median: f64::NAN,
                    low: f64::NAN,
                    high: f64::NAN,
                }),
                bpf: Spread::of(
                    &measured.iter().filter_map(|s| s.bpf_ns_per_event).collect::<Vec<_>>(),
                ),
                user: Spread::of(
                    &measured.iter().filter_map(|s| s.user_cpu_ns_per_event).collect::<Vec<_>>(),
                ),
                rss_mib: of(&|s| s.peak_rss_mib),
                lost: measured.iter().filter_map(|s| s.lost).reduce(|a, b| a + b),
            }
        })
        .collect()
}

/// Runs the benchmark.
pub fn run(options: Options) -> Result<()> {
    let root = crate::workspace_root();
    crate::cargo(&[
        "build",
        "--release",
        "--package",
        "monitor",
        "--bin",
        "tcpmon",
        "--example",
        "replay",
    ])?;
    let tcpmon = root.join("target/release/tcpmon");
    let scratch = std::env::temp_dir().join(format!("tcpmon-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let configs = configurations();
    let stats_before = std::fs::read_to_string(STATS_SYSCTL).unwrap_or_default();
    bpf_stats(false)?;
    let samples = interleaved_rounds(&configs, &options, &tcpmon, &scratch);
    let _ = std::fs::write(STATS_SYSCTL, stats_before.trim());
    let measured = samples.and_then(|samples| {
        let held = rss_with_open_connections(&tcpmon, &scratch, options.held_connections)?;
        let scrape_cost = || -> Result<ScrapeCost> {
            let mut daemon = start_daemon(&tcpmon, &scratch)?;
            thread::sleep(Duration::from_millis(500)); // the start-up snapshot's reads are done
            let cost = daemon_scrape_cost(&daemon);
            stop_daemon(&mut daemon);
            cost
        };
        let namespaces = crate::namespaces::measure(options.namespaces, &scrape_cost)?;
        let with_tcpmon = |extra: &[&str], measure: &mut dyn FnMut() -> Result<()>| {
            let mut daemon = start_with(&Config::Tcpmon, &tcpmon, &scratch, extra)?;
            let measured = measure();
            stop_daemon(&mut daemon);
            measured
        };
        let accept = crate::accept::measure(options.rounds, options.seconds, &with_tcpmon)?;
        Ok((samples, held, namespaces, accept))
    });
    let _ = std::fs::remove_dir_all(&scratch);
    let (samples, held, namespaces, accept) = measured?;
    println!(
        "bench: {:.0} tracked sockets, daemon RSS {:.1} MiB, CPU per scrape {}",
        held.tracked, held.rss_mib, held.scrape
    );
    for row in &namespaces {
        println!(
            "bench: {} network namespaces: CPU per scrape {} (shared TCP hash), {} (own)",
            row.namespaces,
            row.shared,
            row.own.map_or("-".to_owned(), |cost| cost.to_string())
        );
    }
    let replay = replay(&root)?;
    let measured = Measured { samples, held, namespaces, accept, replay };
    let report = report(&options, &configs, &measured);
    println!("\n{report}");
    if let Some(path) = options.report {
        // The history below the markers is written by hand and kept.
        crate::write_between_markers(&path, REPORT_BEGIN, REPORT_END, &report)?;
        println!("bench: wrote {}", path.display());
    }
    Ok(())
}

/// What one run compares: no monitor, tcpmon's configurations, the bpftrace references and
/// each installed peer.
fn configurations() -> Vec<Config> {
    let mut configs = vec![
        Config::None,
        Config::Tcpmon,
        Config::TcpmonWithoutCgroup,
        Config::TcpmonTail,
        BPFTRACE_EMPTY,
        BPFTRACE_COUNTER,
    ];
    ensure_tracefs();
    for peer in ["tcpstates", "tcplife"] {
        if Path::new("/usr/sbin").join(peer).exists() {
            configs.push(Config::Peer(peer));
        } else {
            println!("bench: /usr/sbin/{peer} not installed (Debian: libbpf-tools); skipping it");
        }
    }
    configs
}

/// Every configuration once per round, interleaved so that the machine's drift hits them
/// all alike: `(configuration index, sample)`.
fn interleaved_rounds(
    configs: &[Config],
    options: &Options,
    tcpmon: &Path,
    scratch: &Path,
) -> Result<Vec<(usize, Sample)>> {
    let mut samples: Vec<(usize, Sample)> = Vec::new();
    for round in 1..=options.rounds {
        for (index, config) in configs.iter().enumerate() {
            let sample = match run_one(config, options.seconds, tcpmon, scratch) {
                Ok(sample) => sample,
                // A reference or peer that cannot run here is reported, not fatal.
                Err(e) if matches!(config, Config::Peer(_) | Config::Bpftrace(..)) => {
                    Sample { failed: Some(format!("{e:#}")), ..Sample::default() }
                }
                Err(e) => return Err(e),
            };
            match &sample.failed {
                Some(why) => println!("bench: round {round} {:<28} not measured: {why}", config.name()),
                None => println!(
                    "bench: round {round} {:<28} {:>8.0} conn/s  bpf {:>6} ns/event  user {:>6} ns/event",
                    config.name(),
                    sample.connections_per_sec,
                    sample.bpf_ns_per_event.map_or("-".into(), |v| format!("{v:.0}")),
                    sample.user_cpu_ns_per_event.map_or("-".into(), |v| format!("{v:.0}")),
                ),
            }
            samples.push((index, sample));
        }
    }
    Ok(samples)
}

/// The replay microbenchmark's `key=value` line.
fn replay(root: &Path) -> Result<String> {
    // 200,000 connections (2 M records), timed over 5 passes: one pass is 0.1 s, where a
    // scheduler hiccup moves the figure by several per cent.
    let replay_out = Command::new(root.join("target/release/examples/replay"))
        .args(["200000", "5"])
        .output()
        .context("running the replay benchmark")?;
    let replay = String::from_utf8_lossy(&replay_out.stdout).trim().to_owned();
    Ok(replay)
}

/// BENCHMARKS.md's generated part: the table, memory, replay and the targets.
fn report(options: &Options, configs: &[Config], measured: &Measured) -> String {
    let Measured { samples, held, namespaces, accept, replay } = measured;
    let Held { tracked, rss_mib: held_rss, scrape } = *held;
    let field = |key: &str| -> Option<f64> {
        replay
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
    };
    let rows = summarize(configs, samples);
    let mut report = String::new();
    report.push_str("Generated by `cargo xtask bench` (root; it enables `kernel.bpf_stats_enabled` for the run).\n\n");
    report.push_str(&format!(
        "- Machine: {}\n- CPU vulnerabilities the kernel reports (what makes calls and returns dear): {}\n- Workload: loopback connection churn (connect → 1-byte echo → close, 2 client threads), {} s per run, {} interleaved rounds; medians shown, min–max across rounds\n- Each run: {} s of churn with `kernel.bpf_stats_enabled=1` for BPF ns/event (run_time_ns / run_cnt of the monitor's own programs; the stats add two clock reads to every run, the same for every row: the empty program shows them), then {} s with it off, as in production, for everything else\n- User CPU ns/event: CPU time of the monitor's processes (all threads, schedstat) / its programs' runs, at the rate per connection of the first part\n- Peak RSS: VmHWM of the monitor's processes during the load (reset after start-up)\n- vs none: ratio of the medians; paired: median (min–max) over rounds of each run's conn/s ÷ the unmonitored run of the same round, which cancels the machine's drift between rounds (the targets use it)\n\n",
        machine(), mitigations(), options.seconds, options.rounds, options.seconds.div_ceil(2), options.seconds
    ));
    report.push_str("| configuration | conn/s | min–max | vs none | paired (min–max) | BPF ns/event | user CPU ns/event | peak RSS MiB | lost events |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let baseline = rows.first().map(|r| r.connections_per_sec).unwrap_or(f64::NAN);
    let opt = |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
    for row in &rows {
        if let Some(why) = &row.failed {
            report.push_str(&format!("| {} | not measured: {why} | | | | | | | |\n", row.name));
            continue;
        }
        let Spread { median: ratio, low, high } = row.paired;
        report.push_str(&format!(
            "| {} | {:.0} | {:.0}–{:.0} | {:.3} | {ratio:.3} ({low:.3}–{high:.3}) | {} | {} | {} | {} |\n",
            row.name,
            row.connections_per_sec,
            row.min,
            row.max,
            row.connections_per_sec / baseline,
            opt(row.bpf.map(|s| s.median), 0),
            opt(row.user.map(|s| s.median), 0),
            opt(row.rss_mib, 1),
            row.lost.map_or("-".into(), |l| l.to_string()),
        ));
    }
    report.push_str(&format!(
        "\nMemory: with {} loopback connections held open, the daemon tracked {tracked:.0} sockets at an RSS of {held_rss:.1} MiB (8 MiB of ring buffers included, each mapped twice by the kernel's ring-buffer layout). A `/metrics` scrape then cost {scrape} of CPU (the kernel state read included: every namespace's sockstat, netstat and snmp, a `sock_diag` dump of LISTEN, SYN_RECV and FIN_WAIT2 sockets, the last two reused while the connections are idle), beyond the idle daemon's.\n",
        options.held_connections
    ));
    report.push_str(&crate::namespaces::report(namespaces));
    report.push_str(&crate::accept::report(accept));
    report.push_str(&format!(
        "\nReplay (the daemon's pipeline: decode → tracker → aggregate, one core, `cargo run --release --example replay -- 200000 5`, the mean of 5 passes):\n\n```\n{replay}\n```\n\n"
    ));

    let bpf = |config: &Config| {
        rows.iter().find(|r| r.name == config.name()).and_then(|r| r.bpf).map(|s| s.median)
    };
    let ours_bpf = bpf(&Config::Tcpmon);
    if let (Some(with), Some(without)) = (ours_bpf, bpf(&Config::TcpmonWithoutCgroup)) {
        report.push_str(&format!(
            "Attribution's kernel cost: reading each socket's cgroup (three loads at births and \
             closes) takes the program from {without:.0} to {with:.0} ns/event ({:+.0} ns), \
             medians of the same run.\n\n",
            with - without
        ));
    }
    if !options.verdicts {
        report.push_str("(A smoke run: figures only. `cargo xtask bench` judges the targets.)\n");
        return report;
    }
    report.push_str(
        "Verdicts over rounds are \"met\" or \"NOT met\" only when every round is on the same \
         side of the target; \"within noise\" when the rounds' spread (shown as median \
         (min–max)) covers it.\n\n",
    );
    report.push_str("| target | measured | verdict |\n|---|---|---|\n");
    for (target, verdict, measured) in targets(&rows, held, namespaces, &field) {
        report.push_str(&format!(
            "| {target} | {} | {} |\n",
            measured.unwrap_or_else(|| "-".into()),
            verdict.word()
        ));
    }
    report
}

/// Each target `(what, verdict, measured)`, against references measured in the same run.
/// A verdict over rounds is "met" or "NOT met" only when every round is on the same side of
/// the target; when the rounds' spread covers it, the run cannot tell: "within noise".
fn targets(
    rows: &[Row],
    held: &Held,
    namespaces: &[crate::namespaces::Row],
    field: &dyn Fn(&str) -> Option<f64>,
) -> Vec<(String, Verdict, Option<String>)> {
    let Held { tracked, rss_mib: held_rss, scrape } = *held;
    let at_300 = namespaces.iter().find(|row| row.namespaces == 300);
    let row = |config: &Config| rows.iter().find(|r| r.name == config.name() && r.failed.is_none());
    let ratio = |config: &Config| row(config).map(|r| r.paired);
    let bpf = |config: &Config| row(config).and_then(|r| r.bpf);
    let user = |config: &Config| row(config).and_then(|r| r.user);
    let tcpstates = Config::Peer("tcpstates");
    let (ours, tailed) = (ratio(&Config::Tcpmon), ratio(&Config::TcpmonTail));
    let ours_bpf = bpf(&Config::Tcpmon);
    let (floor, counter) = (bpf(&BPFTRACE_EMPTY), bpf(&BPFTRACE_COUNTER));
    let lost: Option<u64> =
        [Config::Tcpmon, Config::TcpmonTail].iter().map(|c| row(c).and_then(|r| r.lost)).sum();
    // The overhead (1 − ratio) at most half of tcpstates': ratio ≥ (1 + tcpstates' ratio) / 2.
    let half_of_tcpstates = ratio(&tcpstates).map(|t| Spread {
        median: (1.0 + t.median) / 2.0,
        low: (1.0 + t.low) / 2.0,
        high: (1.0 + t.high) / 2.0,
    });
    vec![
        (
            "BPF ns/event ≤ the bpftrace hash-map counter's (× the empty program's)".to_owned(),
            Verdict::at_most(ours_bpf, counter),
            ours_bpf.zip(counter).map(|(o, c)| {
                let times =
                    |v: f64| floor.map_or(String::new(), |f| format!(" ({:.2}×)", v / f.median));
                format!(
                    "{}{} vs {}{} ns",
                    shown(o, 0),
                    times(o.median),
                    shown(c, 0),
                    times(c.median)
                )
            }),
        ),
        (
            "throughput with `tcpmon run` ≥ 0.95 of unmonitored (paired)".to_owned(),
            Verdict::at_least(ours, exactly(0.95)),
            ours.map(|r| shown(r, 3)),
        ),
        (
            "throughput with a `tail --json` attached ≥ 0.90 (paired)".to_owned(),
            Verdict::at_least(tailed, exactly(0.90)),
            tailed.map(|r| shown(r, 3)),
        ),
        (
            "daemon CPU ≤ 80 ns per transition".to_owned(),
            Verdict::at_most(user(&Config::Tcpmon), exactly(80.0)),
            user(&Config::Tcpmon).map(|v| format!("{} ns", shown(v, 0))),
        ),
        (
            "daemon + one `tail --json` CPU ≤ 300 ns per transition".to_owned(),
            Verdict::at_most(user(&Config::TcpmonTail), exactly(300.0)),
            user(&Config::TcpmonTail).map(|v| format!("{} ns", shown(v, 0))),
        ),
        (
            "nothing lost at the default ring size".to_owned(),
            Verdict::single(lost.map(|l| l == 0)),
            lost.map(|l| l.to_string()),
        ),
        (
            "overhead at most half of tcpstates' (paired ratio ≥ (1 + tcpstates') / 2)".to_owned(),
            Verdict::at_least(ours, half_of_tcpstates),
            ours.zip(half_of_tcpstates).map(|(o, t)| format!("{} vs {}", shown(o, 3), shown(t, 3))),
        ),
        (
            "BPF below tcpstates'".to_owned(),
            Verdict::at_most(ours_bpf, bpf(&tcpstates)),
            ours_bpf
                .zip(bpf(&tcpstates))
                .map(|(o, t)| format!("{} vs {} ns", shown(o, 0), shown(t, 0))),
        ),
        (
            "replay ≥ 15 M events/s".to_owned(),
            Verdict::single(field("events_per_sec").map(|v| v >= 15e6)),
            field("events_per_sec").map(|v| format!("{:.1} M/s", v / 1e6)),
        ),
        (
            "zero allocations per event".to_owned(),
            Verdict::single(field("allocations_per_event").map(|v| v == 0.0)),
            field("allocations_per_event").map(|v| format!("{v}")),
        ),
        (
            "≤ 256 bytes per tracked socket".to_owned(),
            Verdict::single(field("bytes_per_socket").map(|v| v <= 256.0)),
            field("bytes_per_socket").map(|v| format!("{v:.0} B")),
        ),
        (
            "≤ 20 ms CPU per scrape with 100 k tracked sockets (later scrapes)".to_owned(),
            Verdict::single((tracked >= 100_000.0).then_some(scrape.idle_ms <= 20.0)),
            Some(format!("{scrape} at {tracked:.0} sockets")),
        ),
        (
            "RSS < 64 MiB with 100 k tracked sockets".to_owned(),
            Verdict::single((tracked >= 100_000.0).then_some(held_rss < 64.0)),
            Some(format!("{held_rss:.1} MiB at {tracked:.0} sockets")),
        ),
        (
            "≤ 50 ms CPU per scrape with 300 idle namespaces sharing the host's TCP hash"
                .to_owned(),
            Verdict::single(at_300.map(|row| row.shared.idle_ms <= 50.0)),
            at_300.map(|row| row.shared.to_string()),
        ),
        (
            "≤ 50 ms CPU per scrape with 300 idle namespaces with their own TCP hash".to_owned(),
            Verdict::single(at_300.and_then(|row| row.own).map(|cost| cost.idle_ms <= 50.0)),
            at_300.and_then(|row| row.own).map(|cost| cost.to_string()),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spread(low: f64, high: f64) -> Option<Spread> {
        Some(Spread { median: (low + high) / 2.0, low, high })
    }

    #[test]
    fn a_verdict_is_given_only_when_every_round_is_on_one_side() {
        // BPF 253 vs 251 with overlapping rounds: the run cannot tell.
        let counter = spread(246.0, 256.0);
        assert_eq!(Verdict::at_most(spread(248.0, 258.0), counter), Verdict::WithinNoise);
        assert_eq!(Verdict::at_most(spread(230.0, 240.0), counter), Verdict::Met);
        assert_eq!(Verdict::at_most(spread(260.0, 270.0), counter), Verdict::NotMet);
        assert_eq!(Verdict::at_least(spread(0.94, 0.97), exactly(0.95)), Verdict::WithinNoise);
        assert_eq!(Verdict::at_least(spread(0.95, 0.97), exactly(0.95)), Verdict::Met);
        assert_eq!(Verdict::at_least(spread(0.90, 0.94), exactly(0.95)), Verdict::NotMet);
        assert_eq!(Verdict::at_most(None, exactly(1.0)), Verdict::NotMeasured);
        assert_eq!(Spread::of(&[3.0, 1.0, 2.0]), Some(Spread { median: 2.0, low: 1.0, high: 3.0 }));
    }
}
