//! Kernel integration tests: the real eBPF program, the real daemon, real TCP traffic.
//!
//! They need root (CI runs as root). Without it they fail, unless
//! `TCPMON_SKIP_KERNEL_TESTS=1` is set, in which case they say they were skipped.
//!
//! The tracepoint sees the whole host, so each test asserts on *deltas* between two scrapes
//! taken around its own traffic, scrapes over one keep-alive connection (so scraping adds no
//! connections of its own), waits until the daemon has received every transition the kernel
//! counted, and runs alone (a lock serializes the tests of this file).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

fn kernel_tests_enabled() -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("TCPMON_SKIP_KERNEL_TESTS").is_some() {
        eprintln!("SKIPPED: kernel test needs root (TCPMON_SKIP_KERNEL_TESTS is set)");
        return false;
    }
    panic!("kernel tests need root (CAP_BPF, CAP_PERFMON); set TCPMON_SKIP_KERNEL_TESTS=1 to skip them");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `tcpmon run`, stopped with SIGTERM on drop.
struct Daemon {
    child: Child,
    scraper: BufReader<TcpStream>,
}

type Metrics = HashMap<String, f64>;

impl Daemon {
    fn start(extra: &[&str]) -> Daemon {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tcpmon"))
            .args(["run", "--listen", &listen.to_string(), "--drain-interval", "10ms"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tcpmon");
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut stderr = String::new();
                child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
                panic!("tcpmon exited early ({status}):\n{stderr}");
            }
            if let Ok(stream) = TcpStream::connect(listen) {
                break stream;
            }
            assert!(Instant::now() < deadline, "tcpmon did not start listening within 30s");
            thread::sleep(Duration::from_millis(50));
        };
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Daemon { child, scraper: BufReader::new(stream) }
    }

    /// GET /metrics over the kept-alive connection.
    fn scrape(&mut self) -> Metrics {
        self.scraper.get_mut().write_all(b"GET /metrics HTTP/1.1\r\nHost: tcpmon\r\n\r\n").unwrap();
        let mut length = None;
        let mut line = String::new();
        self.scraper.read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "status line: {line:?}");
        loop {
            line.clear();
            self.scraper.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                }
            }
        }
        let mut body = vec![0; length.expect("content-length")];
        self.scraper.read_exact(&mut body).unwrap();
        parse_metrics(&String::from_utf8(body).unwrap())
    }

    /// Scrapes once the daemon has received every transition the kernel counted (minus the
    /// ones lost, which the tests require to be none).
    fn settled_scrape(&mut self) -> Metrics {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = self.scrape();
            let kernel: f64 = m
                .iter()
                .filter(|(k, _)| k.starts_with("tcpmon_state_transitions_total"))
                .map(|(_, v)| v)
                .sum();
            let received = m["tcpmon_events_received_total"];
            if received == kernel - m["tcpmon_events_lost_total"] {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not catch up: received {received}, kernel {kernel}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(mut self) -> (std::process::ExitStatus, String, Duration) {
        let started = Instant::now();
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        let elapsed = started.elapsed();
        let mut stderr = String::new();
        self.child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        (status, stderr, elapsed)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }
}

fn parse_metrics(text: &str) -> Metrics {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn delta(before: &Metrics, after: &Metrics, series: &str) -> f64 {
    let get = |m: &Metrics| m.get(series).copied().unwrap_or(0.0);
    get(after) - get(before)
}

/// How many observations of `histogram{labels}` fell in `(low, high]` between two scrapes.
fn in_bucket(
    before: &Metrics,
    after: &Metrics,
    histogram: &str,
    labels: &str,
    low: &str,
    high: &str,
) -> f64 {
    let series = |le: &str| {
        if labels.is_empty() {
            format!("{histogram}_bucket{{le=\"{le}\"}}")
        } else {
            format!("{histogram}_bucket{{{labels},le=\"{le}\"}}")
        }
    };
    delta(before, after, &series(high)) - delta(before, after, &series(low))
}

/// One client/server exchange where the client sends, half-closes, and the server waits
/// `server_wait` in CLOSE_WAIT before close(); the client reads to EOF, then closes.
fn exchange_with_slow_close(server: SocketAddr, count: usize, server_wait: Duration) {
    let listener = TcpListener::bind(server).unwrap();
    let server = listener.local_addr().unwrap();
    let acceptor = thread::spawn(move || {
        for _ in 0..count {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            conn.read_to_end(&mut buf).unwrap(); // until the client's FIN: now in CLOSE_WAIT
            thread::sleep(server_wait);
            drop(conn);
        }
    });
    for _ in 0..count {
        let mut client = TcpStream::connect(server).unwrap();
        client.write_all(b"hello").unwrap();
        client.shutdown(Shutdown::Write).unwrap(); // our FIN first: active teardown
        let mut buf = Vec::new();
        client.read_to_end(&mut buf).unwrap(); // the server's FIN, after server_wait
    }
    acceptor.join().unwrap();
}

fn refused_connect(ip: &str) {
    let closed = TcpListener::bind(format!("{ip}:0")).unwrap();
    let address = closed.local_addr().unwrap();
    drop(closed);
    let err = TcpStream::connect(address).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

fn check_own_traffic(ip: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kernel_tests_enabled() {
        return;
    }
    let mut daemon = Daemon::start(&[]);
    let before = daemon.settled_scrape();
    const N: usize = 5;
    exchange_with_slow_close(format!("{ip}:0").parse().unwrap(), N, Duration::from_millis(300));
    refused_connect(ip);
    let after = daemon.settled_scrape();
    let d = |series: &str| delta(&before, &after, series);
    let n = N as f64;

    assert_eq!(after["tcpmon_events_lost_total"], 0.0);
    assert_eq!(d("tcpmon_connections_opened_total{side=\"active\"}"), n);
    assert_eq!(d("tcpmon_connections_opened_total{side=\"passive\"}"), n);
    assert_eq!(d("tcpmon_handshake_duration_seconds_count{side=\"active\"}"), n);
    assert_eq!(d("tcpmon_connections_closed_total{reason=\"fin\",side=\"active\"}"), n);
    assert_eq!(d("tcpmon_connections_closed_total{reason=\"fin\",side=\"passive\"}"), n);
    assert_eq!(d("tcpmon_connect_failures_total{reason=\"refused\"}"), 1.0);
    assert_eq!(d("tcpmon_state_transitions_total{from=\"SYN_SENT\",to=\"CLOSE\"}"), 1.0);
    // Loopback handshakes take microseconds, far below 25 ms.
    assert_eq!(
        in_bucket(
            &before,
            &after,
            "tcpmon_handshake_duration_seconds",
            "side=\"active\"",
            "0",
            "0.025"
        ),
        n
    );
    // The server sat 300 ms in CLOSE_WAIT: (0.25, 0.5] holds every one of them.
    assert_eq!(
        in_bucket(&before, &after, "tcpmon_close_wait_duration_seconds", "", "0.25", "0.5"),
        n
    );
    // Both teardowns span the 300 ms: the server's from the client's FIN to the final ACK, the
    // client's from its FIN to the server's FIN (it still held the socket, so no early TIME_WAIT).
    assert_eq!(
        in_bucket(
            &before,
            &after,
            "tcpmon_teardown_duration_seconds",
            "side=\"passive\"",
            "0.25",
            "0.5"
        ),
        n
    );
    assert_eq!(
        in_bucket(
            &before,
            &after,
            "tcpmon_teardown_duration_seconds",
            "side=\"active\"",
            "0.25",
            "0.5"
        ),
        n
    );
    assert_eq!(
        in_bucket(
            &before,
            &after,
            "tcpmon_connection_duration_seconds",
            "side=\"passive\"",
            "0.1",
            "0.5"
        ),
        n
    );
    // Nothing of ours was left behind in the table.
    let (status, stderr, _) = daemon.stop();
    assert!(status.success(), "{stderr}");
}

#[test]
fn counts_and_latencies_of_own_ipv4_connections() {
    check_own_traffic("127.0.0.1");
}

#[test]
fn counts_and_latencies_of_own_ipv6_connections() {
    check_own_traffic("[::1]");
}

#[test]
fn sigterm_detaches_and_exits_zero_with_a_summary() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kernel_tests_enabled() {
        return;
    }
    let programs = || {
        let out = Command::new("bpftool").args(["prog", "show"]).output().expect("bpftool");
        String::from_utf8_lossy(&out.stdout).matches("inet_sock_set_state").count()
    };
    let before = programs();
    let mut daemon = Daemon::start(&[]);
    daemon.settled_scrape();
    assert_eq!(programs(), before + 1, "the program is attached while running");
    let (status, stderr, elapsed) = daemon.stop();
    assert!(status.success(), "exit status {status}; stderr:\n{stderr}");
    assert!(stderr.contains("SIGTERM: detached and stopped"), "{stderr}");
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?} to stop");
    assert_eq!(programs(), before, "no program left behind");
}

#[test]
fn a_taken_listen_address_is_a_clear_error() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kernel_tests_enabled() {
        return;
    }
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tcpmon"))
        .args(["run", "--listen", &taken.local_addr().unwrap().to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the address is in use"), "{stderr}");
}

#[test]
fn bad_flags_exit_2_with_a_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_tcpmon"))
        .args(["run", "--ring-bytes", "3MiB"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("power of two"), "{stderr}");
}
