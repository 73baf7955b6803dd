//! Helpers shared by the kernel integration tests: a running daemon, scraping, traffic.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn kernel_tests_enabled() -> bool {
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

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `tcpmon run`, stopped with SIGTERM on drop.
pub struct Daemon {
    child: Child,
    scraper: BufReader<TcpStream>,
    address: SocketAddr,
    /// The daemon's tail socket.
    pub tail_socket: PathBuf,
}

pub type Metrics = HashMap<String, f64>;

impl Daemon {
    pub fn start(extra: &[&str]) -> Daemon {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let tail_socket = unique_socket_path();
        // Drain often, so tests see their records quickly, unless the test says otherwise.
        let drain: &[&str] =
            if extra.contains(&"--drain-interval") { &[] } else { &["--drain-interval", "10ms"] };
        let mut child = Command::new(env!("CARGO_BIN_EXE_tcpmon"))
            .args(["run", "--listen", &listen.to_string()])
            .args(drain)
            .arg("--tail-socket")
            .arg(&tail_socket)
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
        Daemon { child, scraper: BufReader::new(stream), address: listen, tail_socket }
    }

    /// Where /metrics is served.
    pub fn metrics_address(&self) -> SocketAddr {
        self.address
    }

    /// GET /metrics over the kept-alive connection (reopened if the daemon closed it as idle;
    /// tests that count connections scrape often enough that it never is).
    pub fn scrape(&mut self) -> Metrics {
        let mut line = String::new();
        let request = b"GET /metrics HTTP/1.1\r\nHost: tcpmon\r\n\r\n";
        let sent = self.scraper.get_mut().write_all(request).is_ok();
        if !sent || self.scraper.read_line(&mut line).unwrap_or(0) == 0 {
            let stream = TcpStream::connect(self.address).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            self.scraper = BufReader::new(stream);
            self.scraper.get_mut().write_all(request).unwrap();
            line.clear();
            self.scraper.read_line(&mut line).unwrap();
        }
        let mut length = None;
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
    pub fn settled_scrape(&mut self) -> Metrics {
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

    pub fn stop(mut self) -> (std::process::ExitStatus, String, Duration) {
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

pub fn parse_metrics(text: &str) -> Metrics {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

pub fn delta(before: &Metrics, after: &Metrics, series: &str) -> f64 {
    let get = |m: &Metrics| m.get(series).copied().unwrap_or(0.0);
    get(after) - get(before)
}

/// How many observations of `histogram{labels}` fell in `(low, high]` between two scrapes.
pub fn in_bucket(
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

/// A socket path no other test or daemon uses.
pub fn unique_socket_path() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "tcpmon-test-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// One client/server exchange where the client sends, half-closes, and the server waits
/// `server_wait` in CLOSE_WAIT before close(); the client reads to EOF, then closes.
pub fn exchange_with_slow_close(server: SocketAddr, count: usize, server_wait: Duration) {
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

/// A loopback listener whose accept queue holds 4096 connections. std listens with a backlog
/// of 128; in a burst a full queue drops SYNs, and each drop costs a 1 s retransmission.
pub fn listener_with_deep_backlog() -> TcpListener {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: listen(2) again on a socket we own only raises its backlog.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) };
    listener
}

/// Connects `count` times to `listener` from `clients` threads, closing each at once.
pub fn churn_on(listener: TcpListener, count: usize, clients: usize) {
    let port = listener.local_addr().unwrap().port();
    let server = thread::spawn(move || {
        for _ in 0..count {
            drop(listener.accept().unwrap());
        }
    });
    let clients: Vec<_> = (0..clients)
        .map(|i| {
            let share = count / clients + usize::from(i < count % clients);
            thread::spawn(move || {
                for _ in 0..share {
                    drop(TcpStream::connect(("127.0.0.1", port)).unwrap());
                }
            })
        })
        .collect();
    clients.into_iter().for_each(|c| c.join().unwrap());
    server.join().unwrap();
}
