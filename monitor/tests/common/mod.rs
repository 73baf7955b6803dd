//! Helpers shared by the kernel integration tests: a running daemon, scraping, traffic.
#![allow(dead_code)] // each test binary uses a different subset

pub mod tls;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread;
use std::time::{Duration, Instant};

/// The host as the tests of one binary share it. The tracepoint sees the whole host, so a
/// test that asserts host-wide counts, or changes host-wide state (a sysctl without a
/// per-namespace copy), must run alone; a test that makes its traffic in its own network
/// namespaces and looks only at those (tail filters on its addresses, `tcpmon_netns_*`
/// series) can run beside others of its kind.
static HOST: RwLock<()> = RwLock::new(());

/// For a test that asserts host-wide counts or changes host-wide state: runs alone.
pub fn exclusive() -> RwLockWriteGuard<'static, ()> {
    HOST.write().unwrap_or_else(PoisonError::into_inner)
}

/// For a test that looks only at its own network namespaces: runs beside others such.
pub fn shared() -> RwLockReadGuard<'static, ()> {
    HOST.read().unwrap_or_else(PoisonError::into_inner)
}

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

/// `tcpmon` run as nobody with no capabilities at all (setpriv, util-linux).
pub fn unprivileged_tcpmon() -> Command {
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["--inh-caps=-all", "--bounding-set=-all"])
        .arg(env!("CARGO_BIN_EXE_tcpmon"));
    command
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A free port below the ephemeral range (32768–60999 by default), for a server another
/// program binds later: ports from [`free_port`] can meanwhile become some connection's
/// source port.
pub fn server_port() -> u16 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let mut seed = u64::from(std::process::id()) ^ u64::from(now.subsec_nanos());
    loop {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let port = 20_000 + (seed >> 33) as u16 % 10_000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A connection to the metrics endpoint: plain TCP, or TLS.
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// How a test reaches a daemon started with `--web-config`: a TLS client and the
/// `Authorization` header line.
#[derive(Clone)]
pub struct Secured {
    pub client: std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
    pub authorization: String,
}

impl Secured {
    /// The client for `pki`'s CA, with its basic-auth user.
    pub fn for_pki(pki: &tls::Pki) -> Secured {
        use base64::Engine as _;
        let credentials = format!("{}:{}", tls::USER, tls::PASSWORD);
        let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
        Secured {
            client: pki.client(false),
            authorization: format!("Authorization: Basic {encoded}\r\n"),
        }
    }
}

/// A new kept-alive connection to the metrics endpoint.
fn connect(address: SocketAddr, secured: Option<&Secured>) -> BufReader<Box<dyn Stream>> {
    let stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    BufReader::new(match secured {
        None => Box::new(stream),
        Some(secured) => {
            let name = tokio_rustls::rustls::pki_types::ServerName::IpAddress(address.ip().into());
            let tls =
                tokio_rustls::rustls::ClientConnection::new(secured.client.clone(), name).unwrap();
            Box::new(tokio_rustls::rustls::StreamOwned::new(tls, stream))
        }
    })
}

/// A running `tcpmon run`, stopped with SIGTERM on drop.
pub struct Daemon {
    child: Child,
    scraper: BufReader<Box<dyn Stream>>,
    address: SocketAddr,
    secured: Option<Secured>,
    /// The daemon's tail socket.
    pub tail_socket: PathBuf,
    /// Everything the daemon wrote to stderr so far.
    stderr: std::sync::Arc<Mutex<String>>,
    reader: Option<thread::JoinHandle<()>>,
}

pub type Metrics = HashMap<String, f64>;

impl Daemon {
    /// Starts `tcpmon run` on a port the kernel picks (a port chosen beforehand can be taken
    /// by someone else before the daemon binds it) and waits until it serves `/metrics`.
    pub fn start(extra: &[&str]) -> Daemon {
        Daemon::start_with(extra, None)
    }

    /// Starts `tcpmon run` with `extra` (which gives a `--web-config`), reached over TLS with
    /// basic auth.
    pub fn start_secured(extra: &[&str], secured: Secured) -> Daemon {
        Daemon::start_with(extra, Some(secured))
    }

    fn start_with(extra: &[&str], secured: Option<Secured>) -> Daemon {
        let tail_socket = unique_socket_path();
        // Drain often, so tests see their records quickly, unless the test says otherwise.
        let drain: &[&str] =
            if extra.contains(&"--drain-interval") { &[] } else { &["--drain-interval", "10ms"] };
        let mut child = Command::new(env!("CARGO_BIN_EXE_tcpmon"))
            .args(["run", "--listen", "127.0.0.1:0"])
            .args(drain)
            .arg("--tail-socket")
            .arg(&tail_socket)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tcpmon");
        // stderr is read as it comes (kept for `stop`); the start-up line names the address.
        let stderr = std::sync::Arc::new(Mutex::new(String::new()));
        let (lines, startup) = mpsc::channel();
        let pipe = child.stderr.take().unwrap();
        let collected = stderr.clone();
        let reader = thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut all = collected.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
                let _ = lines.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let address: SocketAddr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match startup.recv_timeout(left) {
                Ok(line) => {
                    let url = line.split("metrics on ").nth(1).and_then(|r| r.split_once("://"));
                    if let Some((_, rest)) = url {
                        break rest.split('/').next().unwrap().parse().unwrap();
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("tcpmon did not start within 30 s:\n{}", stderr.lock().unwrap());
                }
            }
        };
        let scraper = connect(address, secured.as_ref());
        let mut daemon =
            Daemon { child, scraper, address, secured, tail_socket, stderr, reader: Some(reader) };
        daemon.scrape();
        daemon
    }

    /// Where /metrics is served.
    pub fn metrics_address(&self) -> SocketAddr {
        self.address
    }

    /// GET /metrics over the kept-alive connection (reopened if the daemon closed it as idle;
    /// tests that count connections scrape often enough that it never is).
    pub fn scrape(&mut self) -> Metrics {
        let mut line = String::new();
        let authorization = self.secured.as_ref().map(|s| s.authorization.as_str());
        let request =
            format!("GET /metrics HTTP/1.1\r\nHost: tcpmon\r\n{}\r\n", authorization.unwrap_or(""));
        let request = request.as_bytes();
        let sent = self.scraper.get_mut().write_all(request).is_ok();
        if !sent || self.scraper.read_line(&mut line).unwrap_or(0) == 0 {
            self.scraper = connect(self.address, self.secured.as_ref());
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
            let kernel = kernel_transitions(&m);
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

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The daemon's resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// What the daemon wrote to stderr so far (for failure messages).
    pub fn stderr_so_far(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    pub fn stop(mut self) -> (std::process::ExitStatus, String, Duration) {
        let started = Instant::now();
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        let elapsed = started.elapsed();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join(); // ends with the daemon's stderr
        }
        let stderr = self.stderr.lock().unwrap().clone();
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

/// Every series of a scrape, and for series with `port` or `workload` labels (on by
/// default) also their sum over those labels, under the name the series has without them
/// (`tcpmon_connections_opened_total{side="active"}`): the host-wide totals tests compare with
/// the kernel's counters.
pub fn parse_metrics(text: &str) -> Metrics {
    let mut metrics = Metrics::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        metrics.insert(series.to_owned(), value);
        if let Some(total) = without_attribution(series) {
            *metrics.entry(total).or_insert(0.0) += value;
        }
    }
    metrics
}

/// `series` without its `port` and `workload` labels, if it has any.
pub fn without_attribution(series: &str) -> Option<String> {
    let (name, labels) = series.strip_suffix('}')?.split_once('{')?;
    let labels: Vec<&str> = labels.split("\",").map(|l| l.trim_end_matches('"')).collect();
    let kept: Vec<&str> = labels
        .iter()
        .copied()
        .filter(|l| !l.starts_with("port=\"") && !l.starts_with("workload=\""))
        .collect();
    if kept.len() == labels.len() {
        return None;
    }
    if kept.is_empty() {
        return Some(name.to_owned());
    }
    Some(format!("{name}{{{}\"}}", kept.join("\",")))
}

/// Every TCP transition the kernel counted (all `tcpmon_state_transitions_total` series).
pub fn kernel_transitions(m: &Metrics) -> f64 {
    m.iter().filter(|(k, _)| k.starts_with("tcpmon_state_transitions_total")).map(|(_, v)| v).sum()
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

/// A running `tcpmon tail`, with its stderr forwarded line by line.
pub struct Tail {
    pub child: Child,
    pub stderr: mpsc::Receiver<String>,
    /// Collects stdout while the tail runs (see [`Tail::drain_in_background`]).
    stdout: Option<thread::JoinHandle<String>>,
}

impl Tail {
    /// Starts `tcpmon tail ARGS` and waits until it says it sees every record from now on.
    pub fn start(socket: &Path, args: &[&str], ready: &str) -> Tail {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tcpmon"))
            .arg("tail")
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tcpmon tail");
        let (send, stderr) = mpsc::channel();
        let pipe = child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = send.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match stderr.recv_timeout(left) {
                Ok(line) if line.contains(ready) => break,
                Ok(_) => {}
                Err(_) => panic!("tcpmon tail never printed {ready:?}"),
            }
        }
        Tail { child, stderr, stdout: None }
    }

    /// Reads stdout as it comes, so a long stream never fills the pipe and stalls the tail.
    pub fn drain_in_background(mut self) -> Tail {
        self.stdout = Some(self.drain_stdout());
        self
    }

    /// Waits (at most 60 s) for the tail to exit — it was given --count — and returns its
    /// stdout lines.
    pub fn finish(self) -> Vec<String> {
        let (status, lines, stderr) = self.wait();
        assert!(status.success(), "tail failed ({status}): {stderr:?}");
        lines
    }

    /// Waits (at most 60 s) for the tail to exit however it ends; returns its exit status,
    /// stdout lines and stderr lines.
    pub fn wait(mut self) -> (std::process::ExitStatus, Vec<String>, Vec<String>) {
        let reader = match self.stdout.take() {
            Some(reader) => reader,
            None => self.drain_stdout(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("tail did not exit within 60 s: a record never came");
            }
            thread::sleep(Duration::from_millis(20));
        };
        let out = reader.join().unwrap();
        let stderr: Vec<String> = self.stderr.try_iter().collect();
        (status, out.lines().map(str::to_owned).collect(), stderr)
    }
}

impl Tail {
    fn drain_stdout(&mut self) -> thread::JoinHandle<String> {
        let mut pipe = self.child.stdout.take().unwrap();
        thread::spawn(move || {
            let mut out = String::new();
            let _ = pipe.read_to_string(&mut out);
            out
        })
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn set_linger_zero(stream: &TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt with a valid fd and a correctly sized linger struct.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    assert_eq!(rc, 0);
}

/// Two network namespaces joined by a veth pair: a real, non-loopback path between a
/// "server" at `10.X.0.1` and a "client" at `10.X.0.2`. Removed on drop.
pub struct NetnsPair {
    /// Name of the server's namespace (under /run/netns).
    pub server: String,
    /// Name of the client's namespace.
    pub client: String,
    /// The server's address.
    pub server_ip: std::net::Ipv4Addr,
}

/// Runs `ip` with `args`, which must succeed.
pub fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("running ip(8)");
    assert!(status.success(), "ip {args:?} failed");
}

impl NetnsPair {
    pub fn new(tag: &str) -> NetnsPair {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id() % 100_000);
        let pair = NetnsPair {
            server: format!("tcpmon-{tag}-s{id}"),
            client: format!("tcpmon-{tag}-c{id}"),
            server_ip: std::net::Ipv4Addr::new(10, 201, n as u8, 1),
        };
        let (s, c) = (&pair.server, &pair.client);
        let (vs, vc) = (format!("tms{id}"), format!("tmc{id}"));
        let subnet = |host| format!("10.201.{n}.{host}/24");
        ip(&["netns", "add", s]);
        ip(&["netns", "add", c]);
        ip(&["link", "add", &vs, "netns", s, "type", "veth", "peer", "name", &vc, "netns", c]);
        ip(&["-n", s, "addr", "add", &subnet(1), "dev", &vs]);
        ip(&["-n", c, "addr", "add", &subnet(2), "dev", &vc]);
        for (ns, dev) in [(s, &vs), (c, &vc)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    /// The pair's own network, `10.201.N.0/24`: what a tail filters on to see only the
    /// pair's connections.
    pub fn subnet(&self) -> String {
        let [a, b, c, _] = self.server_ip.octets();
        format!("{a}.{b}.{c}.0/24")
    }

    /// The namespace's inode, as tcpmon reports it.
    pub fn inode(name: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/run/netns/{name}")).unwrap().ino()
    }

    /// Loads an nftables ruleset into a namespace.
    pub fn nft(namespace: &str, ruleset: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", namespace, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("running nft");
        child.stdin.take().unwrap().write_all(ruleset.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "nft rejected:\n{ruleset}");
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.server, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a thread that has entered network namespace `name`: sockets it creates live
/// there and keep working from any thread.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    in_netns_at(&Path::new("/run/netns").join(name), f)
}

/// [`in_netns`] for the namespace file at `path` (`/proc/PID/ns/net`, `/run/netns/NAME`).
pub fn in_netns_at<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|scope| {
        scope
            .spawn(|| {
                let handle = std::fs::File::open(path).unwrap();
                nix::sched::setns(handle, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap()
    })
}

/// The start of most namespace tests: a namespace pair, and a listener on `port` in the
/// server's namespace, listening before any daemon starts.
pub struct NetnsTest {
    /// The two namespaces.
    pub pair: NetnsPair,
    /// The server's listener.
    pub listener: TcpListener,
    /// Its port.
    pub port: u16,
}

impl NetnsTest {
    /// Creates the pair (named after `tag`) and the listener.
    pub fn new(tag: &str, port: u16) -> NetnsTest {
        let pair = NetnsPair::new(tag);
        let listener = in_netns(&pair.server, || TcpListener::bind((pair.server_ip, port)))
            .unwrap_or_else(|e| panic!("listening on {}:{port}: {e}", pair.server_ip));
        NetnsTest { pair, listener, port }
    }

    /// The listener's address.
    pub fn server(&self) -> SocketAddr {
        SocketAddr::from((self.pair.server_ip, self.port))
    }

    /// A `tail --json` of this test's own connections (its port, its network) through
    /// `daemon`, with `extra` arguments (e.g. `--count 2`).
    pub fn tail(&self, daemon: &Daemon, extra: &[&str]) -> Tail {
        let (port, subnet) = (self.port.to_string(), self.pair.subnet());
        let mut args = vec!["--json", "--port", &port, "--addr", &subnet];
        args.extend_from_slice(extra);
        Tail::start(&daemon.tail_socket, &args, "following the daemon")
    }
}

/// The name of the `--netns-labels` series of `family` for namespace `netns`, with the other
/// labels as Prometheus sorts them after `netns` (e.g. `side="active"`).
pub fn in_namespace(family: &str, netns: u64, labels: &str) -> String {
    format!("{family}{{netns=\"{netns}\",{labels}}}")
}

/// CAP_SYS_ADMIN, CAP_PERFMON and CAP_BPF as bits of `/proc/PID/status`'s capability sets.
pub const CAP_SYS_ADMIN: u64 = 1 << 21;
/// See [`CAP_SYS_ADMIN`].
pub const CAP_PERFMON: u64 = 1 << 38;
/// See [`CAP_SYS_ADMIN`].
pub const CAP_BPF: u64 = 1 << 39;

/// One thread's name and capability sets.
#[derive(Debug, PartialEq, Eq)]
pub struct ThreadCaps {
    /// Its name (`comm`).
    pub name: String,
    /// `CapEff`.
    pub effective: u64,
    /// `CapPrm`.
    pub permitted: u64,
}

/// Every thread of `pid` with its capabilities, read from `status` texts under `proc` (the
/// host's `/proc`, or a container's through its root).
pub fn thread_capabilities_in(proc: &Path, pid: u32) -> Vec<ThreadCaps> {
    let tasks = proc.join(pid.to_string()).join("task");
    let mut threads = Vec::new();
    for task in std::fs::read_dir(&tasks).unwrap_or_else(|e| panic!("{}: {e}", tasks.display())) {
        let Ok(status) = std::fs::read_to_string(task.unwrap().path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        threads.push(parse_thread_caps(&status));
    }
    threads
}

/// The name and capability sets of one `/proc/PID/task/TID/status`.
pub fn parse_thread_caps(status: &str) -> ThreadCaps {
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or("").to_owned()
    };
    let hex = |name: &str| u64::from_str_radix(&field(name), 16).unwrap();
    ThreadCaps { name: field("Name:"), effective: hex("CapEff:"), permitted: hex("CapPrm:") }
}

/// Checks that after start-up only the daemon's kernel-reader thread holds capabilities, one
/// of the sets `kept` (in both its effective and permitted sets); every other thread none.
pub fn assert_least_privilege(threads: &[ThreadCaps], kept: &[u64]) {
    let readers: Vec<&ThreadCaps> = threads.iter().filter(|t| t.name == "tcpmon-kernel").collect();
    assert_eq!(readers.len(), 1, "one kernel-reader thread: {threads:?}");
    let reader = readers[0];
    assert!(
        reader.effective == reader.permitted && kept.contains(&reader.permitted),
        "the kernel-reader thread holds {:#x}/{:#x}, not one of {kept:#x?}: {threads:?}",
        reader.effective,
        reader.permitted
    );
    for thread in threads.iter().filter(|t| t.name != "tcpmon-kernel") {
        assert_eq!((thread.effective, thread.permitted), (0, 0), "{thread:?} in {threads:?}");
    }
}

/// `GET path` on loopback port `port` (HTTP/1.0): the body of a 200 answer.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1);
    (status == Some("200")).then(|| body.to_owned())
}

/// Every BPF program loaded on the host: `(id, name)` (bpftool).
pub fn bpf_programs() -> Vec<(u64, String)> {
    let out = Command::new("bpftool").args(["--json", "prog", "show"]).output().unwrap();
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    let programs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = programs.as_array().unwrap().iter();
    list.map(|p| (p["id"].as_u64().unwrap(), p["name"].as_str().unwrap_or("").to_owned())).collect()
}

/// The ids of every BPF program loaded on the host.
pub fn bpf_program_ids() -> Vec<u64> {
    bpf_programs().into_iter().map(|(id, _)| id).collect()
}

/// tcpmon's programs loaded since `before` (ids from [`bpf_program_ids`]); at least its state
/// program. bpftool here cannot show which process holds a program, so a test that uses this
/// must be the only one starting daemons meanwhile.
pub fn our_programs_since(before: &[u64]) -> Vec<u64> {
    use monitor_common::names;
    let our_names = [
        names::STATE_PROGRAM,
        names::STATE_BTF_PROGRAM,
        names::SYNACK_PROGRAM,
        names::SYNACK_BTF_PROGRAM,
        names::RESET_SENT_PROGRAM,
        names::RESET_RECEIVED_PROGRAM,
    ];
    let ours: Vec<(u64, String)> = bpf_programs()
        .into_iter()
        .filter(|(id, name)| !before.contains(id) && our_names.contains(&name.as_str()))
        .collect();
    assert!(
        ours.iter().any(|(_, name)| name.starts_with(names::STATE_PROGRAM)),
        "no state program was loaded: {ours:?}"
    );
    ours.into_iter().map(|(id, _)| id).collect()
}

/// Fails unless every program of `ours` is gone within 5 s (the kernel frees a released
/// program from a work queue, a moment after its last holder exits).
pub fn assert_unloaded(ours: &[u64], when: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let remaining = bpf_program_ids();
        let left: Vec<_> = ours.iter().filter(|id| remaining.contains(id)).collect();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "programs {left:?} still loaded {when}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// The artefact `cargo xtask test` (or `cargo xtask package`) built into `target/package`
/// whose name ends with `suffix` (`_amd64.deb`, `_oci.tar`). `None` when
/// `TCPMON_SKIP_PACKAGE_TESTS` is set (`cargo xtask test --quick`: the tests that need it are
/// skipped, even where an older one lies there); missing otherwise is a failure.
pub fn artefact(suffix: &str) -> Option<PathBuf> {
    if std::env::var_os("TCPMON_SKIP_PACKAGE_TESTS").is_some() {
        eprintln!("SKIPPED: TCPMON_SKIP_PACKAGE_TESTS is set");
        return None;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/package");
    let found =
        std::fs::read_dir(&dir).into_iter().flatten().flatten().map(|e| e.path()).find(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.starts_with("tcpmon_") && name.ends_with(suffix)
        });
    Some(found.unwrap_or_else(|| {
        panic!(
            "no tcpmon_*{suffix} in {}: run `cargo xtask package` (cargo xtask test does), or \
             set TCPMON_SKIP_PACKAGE_TESTS=1",
            dir.display()
        )
    }))
}

/// `count` connections to `listener`, each sending a byte that the server echoes, then closed
/// by the client (its socket goes to TIME_WAIT).
pub fn echo_exchanges(listener: &TcpListener, count: usize) {
    let address = listener.local_addr().unwrap();
    let server = {
        let listener = listener.try_clone().unwrap();
        thread::spawn(move || {
            for _ in 0..count {
                let (mut stream, _) = listener.accept().unwrap();
                let mut byte = [0u8];
                stream.read_exact(&mut byte).unwrap();
                stream.write_all(&byte).unwrap();
                let _ = stream.read(&mut byte); // until the client closes
            }
        })
    };
    for _ in 0..count {
        let mut stream = TcpStream::connect(address).unwrap();
        stream.write_all(b"x").unwrap();
        let mut byte = [0u8];
        stream.read_exact(&mut byte).unwrap();
    }
    server.join().unwrap();
}
