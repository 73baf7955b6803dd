//! `xtask guest`: what runs inside each VM of the kernel matrix (`cargo xtask kernels`), after
//! the guest's `/init` mounted the file systems. It runs `tcpmon check`, then for each build of
//! the program (`--hook`): starts `tcpmon run` and a JSON tail, makes traffic whose every
//! number is known, and prints what it found as one `@@result {json}` line for the host to
//! judge. The host decides; traffic that cannot be made at all panics, which fails that hook
//! only.
//!
//! The traffic, each on a port of its own (the guest has nothing else on loopback):
//! - IPv4 and IPv6: two connections each (one byte each way, then closed by the client);
//! - CLOSE_WAIT: the client shuts down first, the server waits 300 ms before `close()`;
//! - a refused connect (no listener);
//! - a reset: the client closes with `SO_LINGER` 0;
//! - a resent SYN-ACK, on IPv4, IPv6, and IPv4 to an IPv6 listener: a `TCP_DEFER_ACCEPT` (1 s) listener drops the client's bare ACK
//!   (`tcp_check_req()`) and resends its SYN-ACK after 1 s (`syn_ack_recalc()`); the ACK that
//!   answers it comes after the defer period and completes the handshake (or else the client's
//!   data 1.3 s in does), so the passive handshake takes ≥ 1 s with one SYN-ACK retransmission:
//!   no firewall needed, which the guest does not have;
//! - the accept queue: five connections accepted 400 ms after their handshakes, then one
//!   the client resets while it waits there (abandoned, reason `reset`);
//! - then 3 s of connection churn from 8 threads, compared with the kernel's `Tcp:` counters.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::churn;
use serde_json::{json, Value};

const METRICS: &str = "127.0.0.1:9979";
const TAIL_SOCKET: &str = "/run/tcpmon/tail.sock";
const V4_PORT: u16 = 8081;
const V6_PORT: u16 = 8082;
const CLOSE_WAIT_PORT: u16 = 8083;
const REFUSED_PORT: u16 = 8084;
const RESET_PORT: u16 = 8085;
/// Resent SYN-ACKs: an IPv4 listener, an IPv6 one, and an IPv6 one an IPv4 client reaches
/// (its child is `AF_INET6` with IPv4-mapped addresses).
const SYNACK_PORTS: [(&str, &str, u16); 3] =
    [("127.0.0.1", "127.0.0.1", 8086), ("::1", "::1", 8087), ("::", "127.0.0.1", 8088)];
/// How long the CLOSE_WAIT server waits before `close()`.
const CLOSE_WAIT: Duration = Duration::from_millis(300);
const ACCEPT_PORT: u16 = 8089;
/// How long the accepting server lets its five connections wait in the queue.
const ACCEPT_WAIT: Duration = Duration::from_millis(400);
const ACCEPTED: usize = 5;

/// Runs `check` and every hook's scenario; prints `@@check` and `@@result` lines.
pub fn run(hooks: &[String]) -> Result<()> {
    let check = Command::new("tcpmon").arg("check").output().context("running tcpmon check")?;
    for line in String::from_utf8_lossy(&check.stdout).lines() {
        println!("@@check-line {line}");
    }
    println!("@@check rc={}", check.status.code().unwrap_or(-1));
    for hook in hooks {
        // A panic in one scenario (traffic that could not be made) fails that hook only.
        let report = std::panic::catch_unwind(|| scenario(hook)).unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            // Its daemon and tail may still run; the next hook needs the port.
            let _ = Command::new("killall").args(["-q", "tcpmon"]).status();
            json!({ "hook": hook, "loaded": false, "error": format!("the scenario panicked: {why}") })
        });
        println!("@@result {report}");
    }
    Ok(())
}

/// One finding: a name, whether it held, and what was seen.
fn finding(name: &str, ok: bool, seen: String) -> Value {
    json!({ "name": name, "ok": ok, "seen": seen })
}

/// A finding about the connections on `port` (their tail records are kept if it fails).
fn port_finding(name: &str, port: u16, ok: bool, seen: String) -> Value {
    json!({ "name": name, "port": port, "ok": ok, "seen": seen })
}

fn scenario(hook: &str) -> Value {
    let log_path = format!("/tmp/run-{hook}.log");
    let log = std::fs::File::create(&log_path).expect("creating the daemon's log");
    let started = Instant::now();
    // Each route to accept(): fexit (where the guest allows BPF trampolines) with the BTF
    // build, the syscall tracepoints with the classic one.
    let accept_wait = if hook == "tracepoint" { "syscalls" } else { "auto" };
    let mut daemon = match Command::new("tcpmon")
        .args(["run", "--hook", hook, "--listen", METRICS, "--drain-interval", "10ms"])
        .args(["--accept-wait", accept_wait])
        .args(["--tail-socket", TAIL_SOCKET])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return json!({ "hook": hook, "loaded": false, "error": e.to_string() }),
    };
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // A verifier run under emulation can take a minute; a daemon that exits has failed.
    let deadline = Instant::now() + Duration::from_secs(300);
    while http_get("/healthz").is_none() {
        if daemon.try_wait().ok().flatten().is_some() || Instant::now() > deadline {
            let _ = daemon.kill();
            let _ = daemon.wait();
            let error = log().lines().filter(|l| l.contains("ERROR")).collect::<Vec<_>>().join(" ");
            return json!({ "hook": hook, "loaded": false, "error": first_chars(&error, 600) });
        }
        thread::sleep(Duration::from_millis(100));
    }
    let load_seconds = started.elapsed().as_secs_f64();
    let features = attach_line_features(&log());
    let tail = Tail::start();
    let before = scrape();
    traffic();
    let records = tail.wait_for(records_complete, Duration::from_secs(30));
    let after = scrape();
    let mut findings = judge(&before, &after, &records, &features);
    findings.push(churn_against_the_kernels_counters());
    // What explains a failed check: the tracker's anomalies, and the tail's records of our ports.
    let anomalies: serde_json::Map<String, Value> = [
        "tcpmon_bpf_recursion_misses_total",
        "tcpmon_events_lost_total",
        "tcpmon_notes_lost_total",
        "tcpmon_tracker_inconsistent_transitions_total",
        "tcpmon_tracker_sockets_first_seen_midlife_total",
        "tcpmon_tracker_sockets_replaced_total",
        "tcpmon_tracker_synack_untracked_total",
        "tcpmon_passive_opens_aborted_total",
        "tcpmon_tail_records_dropped_total",
    ]
    .iter()
    .map(|name| (name.to_string(), json!(delta(&before, &after, name, &[]))))
    .collect();
    let failed_ports: Vec<u16> = findings
        .iter()
        .filter(|f| f["ok"] != true)
        .filter_map(|f| f["port"].as_u64())
        .map(|p| p as u16)
        .collect();
    let records_seen: Vec<Value> = failed_ports
        .iter()
        .flat_map(|&port| {
            records.iter().filter(move |r| r["local_port"] == port || r["remote_port"] == port)
        })
        .cloned()
        .collect();

    // SIGTERM: a clean exit that detaches everything.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let status = daemon.wait().map(|s| s.code().unwrap_or(-1)).unwrap_or(-1);
    findings.push(finding("sigterm", status == 0, format!("exit code {status}")));
    let warnings: Vec<String> = log()
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .map(|l| first_chars(l, 300))
        .collect();
    json!({
        "hook": hook,
        "loaded": true,
        "load_seconds": load_seconds,
        "features": features,
        "findings": findings,
        "anomalies": anomalies,
        "records_of_failed_checks": records_seen,
        "warnings": warnings,
    })
}

fn first_chars(text: &str, n: usize) -> String {
    text.chars().take(n).collect()
}

/// What the daemon's start-up line says it attached: `... (btf build; ...; close reasons from
/// sk_err: yes; SYN-ACK times: yes; reset direction: yes); ...`.
fn attach_line_features(log: &str) -> Value {
    let line = log.lines().find(|l| l.contains("attached to")).unwrap_or_default();
    let says = |what: &str| line.contains(&format!("{what}: yes"));
    let build = line.split(" build;").next().and_then(|s| s.rsplit('(').next()).unwrap_or("");
    // `SYN-ACK times: yes (btf build)`
    let synack_build = line
        .split("SYN-ACK times: yes (")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or("");
    json!({
        "build": build,
        "synack_build": synack_build,
        "close_reasons": says("close reasons from sk_err"),
        "synack_times": says("SYN-ACK times"),
        "reset_direction": says("reset direction"),
        "accept_wait": !line.contains("accept() seen through: no"),
        "accept_route": if line.contains("accept() seen through: fexit") {
            "fexit"
        } else if line.contains("accept() seen through: syscall tracepoints") {
            "syscalls"
        } else {
            "no"
        },
    })
}

/// One GET over HTTP/1.0; the body if the status is 200.
fn http_get(path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(METRICS).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200")).then(|| body.to_owned())
}

type Metrics = HashMap<String, f64>;

fn scrape() -> Metrics {
    let body = http_get("/metrics").unwrap_or_default();
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of `family`'s series that carry every one of `labels`.
fn sum(m: &Metrics, family: &str, labels: &[&str]) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(&format!("{family}{{")) || *k == family)
        .filter(|(k, _)| labels.iter().all(|l| k.contains(l)))
        .map(|(_, v)| v)
        .sum()
}

fn delta(before: &Metrics, after: &Metrics, family: &str, labels: &[&str]) -> f64 {
    sum(after, family, labels) - sum(before, family, labels)
}

/// `tcpmon tail --json`, read as it comes.
struct Tail {
    child: Child,
    records: Arc<Mutex<Vec<Value>>>,
}

impl Tail {
    fn start() -> Tail {
        let mut child = Command::new("tcpmon")
            .args(["tail", "--json", "--socket", TAIL_SOCKET])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tcpmon tail");
        // It says on stderr when it follows the daemon; records after that are complete.
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (ready, is_ready) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if line.contains("following the daemon") {
                    let _ = ready.send(());
                }
            }
        });
        let _ = is_ready.recv_timeout(Duration::from_secs(30));
        let records = Arc::new(Mutex::new(Vec::new()));
        let sink = records.clone();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if let Ok(value) = serde_json::from_str::<Value>(&line) {
                    sink.lock().unwrap().push(value);
                }
            }
        });
        Tail { child, records }
    }

    /// The records so far, once `done` says they are all there or `limit` passed.
    fn wait_for(mut self, done: impl Fn(&[Value]) -> bool, limit: Duration) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        while !done(&self.records.lock().unwrap()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let records = self.records.lock().unwrap().clone();
        records
    }
}

/// The tail's closed or failed records of connections on `port` (either end).
fn on_port(records: &[Value], port: u16) -> Vec<&Value> {
    records
        .iter()
        .filter(|r| r["type"] == "connection" && (r["event"] == "closed" || r["event"] == "failed"))
        .filter(|r| r["local_port"] == port || r["remote_port"] == port)
        .collect()
}

fn passive(records: &[&Value]) -> Option<Value> {
    records.iter().find(|r| r["side"] == "passive").map(|r| (*r).clone())
}

/// Every scenario's connections have been reported (both ends, where both are ours).
fn records_complete(records: &[Value]) -> bool {
    let n = |port| on_port(records, port).len();
    n(V4_PORT) >= 4
        && n(V6_PORT) >= 4
        && n(CLOSE_WAIT_PORT) >= 2
        && n(REFUSED_PORT) >= 1
        && n(RESET_PORT) >= 2
        && SYNACK_PORTS.iter().all(|&(_, _, port)| n(port) >= 2)
        && n(ACCEPT_PORT) >= 2 * ACCEPTED + 2
}

/// Compares what tcpmon reported with what the traffic did.
fn judge(before: &Metrics, after: &Metrics, records: &[Value], features: &Value) -> Vec<Value> {
    let mut findings = Vec::new();
    for (name, port, family) in [("ipv4", V4_PORT, "ipv4"), ("ipv6", V6_PORT, "ipv6")] {
        let label = format!("port=\"{port}\"");
        let opened =
            |side: &str| delta(before, after, "tcpmon_connections_opened_total", &[&label, side]);
        let (active, passive) = (opened("side=\"active\""), opened("side=\"passive\""));
        let tail: Vec<&Value> =
            on_port(records, port).into_iter().filter(|r| r["family"] == family).collect();
        let fin = tail.iter().filter(|r| r["outcome"] == "fin").count();
        findings.push(port_finding(
            name,
            port,
            active == 2.0 && passive == 2.0 && tail.len() == 4 && fin == 4,
            format!(
                "opened active {active} passive {passive}; tail: {} closed, {fin} by FIN",
                tail.len()
            ),
        ));
    }

    let in_bucket = |name: &str, low: &str, high: &str| {
        let le = |bound: &str| format!("le=\"{bound}\"");
        let count = |m: &Metrics, bound: &str| sum(m, name, &[&le(bound)]);
        (count(after, high) - count(before, high)) - (count(after, low) - count(before, low))
    };
    let close_wait = in_bucket("tcpmon_close_wait_duration_seconds_bucket", "0.25", "0.5");
    let tail_close_wait = passive(&on_port(records, CLOSE_WAIT_PORT))
        .and_then(|r| r["close_wait_us"].as_u64())
        .unwrap_or(0);
    findings.push(port_finding(
        "close_wait",
        CLOSE_WAIT_PORT,
        close_wait == 1.0 && (250_000..500_000).contains(&tail_close_wait),
        format!("(0.25 s, 0.5 s]: {close_wait}; tail close_wait_us {tail_close_wait}"),
    ));
    // The same wait as time in state CLOSE_WAIT, in the (0.1 s, 1 s] bucket.
    let in_state = |state: &str, le: &str| {
        let labels = [format!("state=\"{state}\""), format!("le=\"{le}\"")];
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        delta(before, after, "tcpmon_state_duration_seconds_bucket", &labels)
    };
    let in_close_wait = in_state("CLOSE_WAIT", "1") - in_state("CLOSE_WAIT", "0.1");
    findings.push(port_finding(
        "state_duration",
        CLOSE_WAIT_PORT,
        in_close_wait == 1.0,
        format!("CLOSE_WAIT in (0.1 s, 1 s]: {in_close_wait}"),
    ));

    let port = format!("port=\"{ACCEPT_PORT}\"");
    let waited = |series: &str| delta(before, after, series, &[&port]);
    let (count, total) =
        (waited("tcpmon_accept_wait_seconds_count"), waited("tcpmon_accept_wait_seconds_sum"));
    let abandoned =
        delta(before, after, "tcpmon_accept_abandoned_total", &[&port, "reason=\"reset\""]);
    let tail_waits: Vec<u64> = on_port(records, ACCEPT_PORT)
        .iter()
        .filter(|r| r["side"] == "passive")
        .filter_map(|r| r["accept_wait_us"].as_u64())
        .collect();
    let expected = ACCEPT_WAIT.as_secs_f64() * ACCEPTED as f64;
    findings.push(port_finding(
        "accept_wait",
        ACCEPT_PORT,
        count == ACCEPTED as f64
            && (expected - 0.1..=expected + 0.1).contains(&total)
            && tail_waits.len() == ACCEPTED
            && tail_waits.iter().all(|us| (350_000..=450_000).contains(us))
            && abandoned == 1.0,
        format!(
            "accepted {count}, waits summed {total:.3} s; tail accept_wait_us {tail_waits:?}; \
             abandoned (reset) {abandoned}"
        ),
    ));

    let refused = delta(before, after, "tcpmon_connect_failures_total", &["reason=\"refused\""]);
    let tail_refused =
        on_port(records, REFUSED_PORT).iter().filter(|r| r["outcome"] == "refused").count();
    findings.push(port_finding(
        "refused",
        REFUSED_PORT,
        refused == 1.0 && tail_refused == 1,
        format!("tcpmon_connect_failures_total{{reason=refused}} +{refused}; tail {tail_refused}"),
    ));

    // Which end reset it is told only with the reset programs attached.
    let reset = passive(&on_port(records, RESET_PORT)).map(|r| r["outcome"].clone());
    let expected = if features["reset_direction"] == true { "reset_received" } else { "unknown" };
    findings.push(port_finding(
        "reset",
        RESET_PORT,
        reset.as_ref().is_some_and(|o| o == expected),
        format!("passive end's outcome {reset:?} (expected {expected})"),
    ));

    let resent = delta(before, after, "tcpmon_synack_retransmits_total", &[]);
    for (listen, _, port) in SYNACK_PORTS {
        let synack = passive(&on_port(records, port));
        let retransmits = synack.as_ref().and_then(|r| r["handshake_retransmits"].as_u64());
        let handshake_us = synack.as_ref().and_then(|r| r["handshake_us"].as_u64());
        // One SYN-ACK resent after the initial 1 s RTO. In an emulated (TCG) guest the
        // request's timer (jiffies) once fired 13 ms short of 1 s by the clock the stamps
        // use (987 ms on 6.1); why is not known. Without the retransmission it would take
        // microseconds.
        let measured = retransmits.is_some_and(|n| n >= 1)
            && handshake_us.is_some_and(|us| (950_000..3_500_000).contains(&us));
        // Without SYN-ACK times the daemon must say so, not report a wrong handshake.
        let ok = if features["synack_times"] == true {
            measured && resent >= SYNACK_PORTS.len() as f64
        } else {
            handshake_us.is_none()
        };
        findings.push(port_finding(
            &format!("synack [{listen}]:{port}"),
            port,
            ok,
            format!(
                "SYN-ACKs resent +{resent} (all listeners); passive handshake_us \
                 {handshake_us:?}, handshake_retransmits {retransmits:?}"
            ),
        ));
    }
    findings
}

/// The `Tcp:` counters of `/proc/net/snmp`, by name.
fn snmp_tcp() -> HashMap<String, f64> {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut lines = text.lines().filter(|line| line.starts_with("Tcp:"));
    let (names, values) = (lines.next().unwrap_or_default(), lines.next().unwrap_or_default());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter_map(|(name, value)| Some((name.to_owned(), value.parse().ok()?)))
        .collect()
}

/// Connection churn on every guest CPU at once, against the kernel's own counters: every
/// connect the kernel counts (`ActiveOpens`) is an active open or a connect failure for
/// tcpmon, every child it creates (`PassiveOpens`, `tcp_create_openreq_child()`) an accepted
/// connection or a child discarded before ESTABLISHED (the loser when two CPUs complete one
/// handshake); `AttemptFails` and `EstabResets` (`tcp_done()`, `tcp_set_state()`) equal the
/// program's counts of the transitions they count, except that a discarded duplicate child
/// goes SYN_RECV -> CLOSE in `inet_ehash_nolisten()` (`inet_sk_set_state()`, not `tcp_done()`),
/// which counts no `AttemptFails` (5.10 under this churn: 1 such child, 0 AttemptFails): the
/// SYN_RECV -> CLOSE transitions beyond the kernel's count are at most the children tcpmon
/// saw discarded. The two scrapes' own connections (to the daemon's port) are in the
/// kernel's counts and not in the churn port's series.
fn churn_against_the_kernels_counters() -> Value {
    let mib_before = snmp_tcp();
    let before = scrape();
    let report = churn::run(Duration::from_secs(3), 8);
    thread::sleep(Duration::from_millis(500)); // the daemon drains every 10 ms
    let after = scrape();
    let mib_after = snmp_tcp();
    let mib = |name: &str| {
        let at = |counters: &HashMap<String, f64>| counters.get(name).copied();
        at(&mib_after).unwrap_or(f64::NAN) - at(&mib_before).unwrap_or(f64::NAN)
    };
    let (active_opens, passive_opens) = (mib("ActiveOpens") - 2.0, mib("PassiveOpens") - 2.0);
    let (attempt_fails, estab_resets) = (mib("AttemptFails"), mib("EstabResets"));
    let Ok(report) = report else {
        return finding("churn", false, format!("the churn failed: {report:?}"));
    };
    let port = format!("port=\"{}\"", report.port);
    let d = |family: &str, labels: &[&str]| delta(&before, &after, family, labels);
    let opened = |side: &str| d("tcpmon_connections_opened_total", &[&port, side]);
    let tcpmon_active = opened("side=\"active\"") + d("tcpmon_connect_failures_total", &[&port]);
    let tcpmon_passive = opened("side=\"passive\"") + d("tcpmon_passive_opens_aborted_total", &[]);
    let transitions = |from: &str| {
        let from = format!("from=\"{from}\"");
        d("tcpmon_state_transitions_total", &[&from, "to=\"CLOSE\""])
    };
    let failed = transitions("SYN_SENT") + transitions("SYN_RECV");
    let discarded = d("tcpmon_passive_opens_aborted_total", &[]);
    let reset = transitions("ESTABLISHED") + transitions("CLOSE_WAIT");
    let lost = d("tcpmon_events_lost_total", &[]);
    port_finding(
        "churn",
        report.port,
        lost == 0.0
            && report.connections > 0
            && tcpmon_active == active_opens
            && tcpmon_passive == passive_opens
            && failed >= attempt_fails
            && failed - attempt_fails <= discarded
            && reset == estab_resets,
        format!(
            "{} connections; ActiveOpens {active_opens} vs {tcpmon_active}, PassiveOpens \
             {passive_opens} vs {tcpmon_passive}, AttemptFails {attempt_fails} vs {failed} \
             ({discarded} children discarded), EstabResets {estab_resets} vs {reset}; lost {lost}",
            report.connections
        ),
    )
}

/// The traffic described at the top of this file.
fn traffic() {
    // The client closes first (it drops its stream); the server waits for its FIN.
    let exchange = |address: &str, count: usize| {
        let listener = TcpListener::bind(address).expect("binding a listener");
        let address = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            for _ in 0..count {
                let (mut stream, _) = listener.accept().unwrap();
                let _ = churn::echo(&mut stream);
                let _ = stream.read(&mut [0u8]); // until the client closes
            }
        });
        for _ in 0..count {
            drop(churn::exchange(address).unwrap());
        }
        server.join().unwrap();
    };
    exchange(&format!("127.0.0.1:{V4_PORT}"), 2);
    exchange(&format!("[::1]:{V6_PORT}"), 2);

    // CLOSE_WAIT: the client's FIN first, the server's close() 300 ms later.
    let address: SocketAddr = format!("127.0.0.1:{CLOSE_WAIT_PORT}").parse().unwrap();
    let listener = TcpListener::bind(address).unwrap();
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest); // the FIN
        thread::sleep(CLOSE_WAIT);
    });
    let mut client = TcpStream::connect(address).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    server.join().unwrap();
    let _ = client.read_to_end(&mut Vec::new());
    drop(client);

    let refused = TcpStream::connect(("127.0.0.1", REFUSED_PORT));
    assert!(refused.is_err(), "something listens on the refused port");

    // A reset: SO_LINGER 0 makes close() send RST.
    let listener = TcpListener::bind(("127.0.0.1", RESET_PORT)).unwrap();
    let client = TcpStream::connect(("127.0.0.1", RESET_PORT)).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    set_option(client.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, &linger);
    drop(client);
    let _ = server.read(&mut [0u8; 1]); // ECONNRESET
    drop(server);

    for (listen, connect, port) in SYNACK_PORTS {
        resent_synack(listen, connect, port);
    }

    // The accept queue: five connections wait 400 ms for accept(); one more is reset by its
    // client while it waits.
    let listener = TcpListener::bind(("127.0.0.1", ACCEPT_PORT)).unwrap();
    let connect = || TcpStream::connect(("127.0.0.1", ACCEPT_PORT)).unwrap();
    let clients: Vec<TcpStream> = (0..ACCEPTED).map(|_| connect()).collect();
    thread::sleep(ACCEPT_WAIT);
    let accepted: Vec<TcpStream> = (0..ACCEPTED).map(|_| listener.accept().unwrap().0).collect();
    drop((clients, accepted));
    let reset = connect();
    thread::sleep(Duration::from_millis(50));
    set_option(reset.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, &linger);
    drop(reset);
    thread::sleep(Duration::from_millis(50));
}

/// A SYN-ACK the kernel resends: a `TCP_DEFER_ACCEPT` (1 s) listener on `listen` holds the
/// request of a client connecting to `connect` until data comes or the period ends.
fn resent_synack(listen: &str, connect: &str, port: u16) {
    let ip = |text: &str| text.parse::<std::net::IpAddr>().unwrap();
    let listener = TcpListener::bind((ip(listen), port)).unwrap();
    let seconds: libc::c_int = 1;
    set_option(listener.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, &seconds);
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut byte = [0u8];
        let _ = stream.read_exact(&mut byte);
    });
    let mut client = TcpStream::connect((ip(connect), port)).unwrap();
    thread::sleep(Duration::from_millis(1300));
    client.write_all(b"x").unwrap();
    server.join().unwrap();
    drop(client);
}

/// `setsockopt(fd, level, name, value)`; panics if the kernel refuses (the traffic would not
/// be what the checks expect).
fn set_option<T>(fd: std::os::fd::RawFd, level: libc::c_int, name: libc::c_int, value: &T) {
    // SAFETY: `value` is a valid T for the call's duration, and its size is passed with it.
    let result = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    assert_eq!(result, 0, "setsockopt({level}, {name}): {}", std::io::Error::last_os_error());
}
