//! Kernel tests of what the state tracepoint alone cannot tell, over a real veth path between
//! two network namespaces the tests create: handshakes that lost their first SYN or SYN-ACK
//! (the kernel's 1 s initial RTO is the ground truth), exact byte totals, reset direction,
//! listeners older than the daemon, and each connection's namespace. Needs root.
//!
//! Tests that look only at their own namespaces (a tail filtered on their network, the
//! `tcpmon_netns_*` series of their namespaces) run beside each other; those that assert
//! host-wide numbers or change a host-wide sysctl run alone.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use common::{
    delta, in_namespace, in_netns, kernel_tests_enabled, set_linger_zero, Daemon, NetnsPair,
    NetnsTest,
};
use serde_json::Value;

const US_PER_S: u64 = 1_000_000;

fn us(record: &Value, field: &str) -> u64 {
    record[field].as_u64().unwrap_or_else(|| panic!("no {field} in {record}"))
}

/// The tail's JSON records, each side of each connection once.
fn records(lines: &[String]) -> Vec<Value> {
    lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn side<'a>(records: &'a [Value], side: &str) -> &'a Value {
    records
        .iter()
        .find(|r| r["side"] == side)
        .unwrap_or_else(|| panic!("no {side} in {records:#?}"))
}

/// One exchange: the client sends `up` bytes and half-closes; the server reads them all,
/// answers with `down` bytes and closes; the client reads to EOF and closes.
fn exchange(pair: &NetnsPair, listener: TcpListener, up: usize, down: usize) {
    let server = listener.local_addr().unwrap();
    let acceptor = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), up);
        conn.write_all(&vec![b'd'; down]).unwrap();
    });
    let mut client = in_netns(&pair.client, || TcpStream::connect(server)).unwrap();
    client.write_all(&vec![b'u'; up]).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), down);
    acceptor.join().unwrap();
}

/// Drops the first packets matching `rule` in `namespace` for 300 ms: the kernel's 1 s
/// retransmission then gets through.
fn drop_for_a_moment(namespace: &str, rule: &str) -> thread::JoinHandle<()> {
    NetnsPair::nft(
        namespace,
        &format!(
            "table inet tcpmon_test {{\n chain input {{\n  type filter hook input priority 0;\n  {rule} drop\n }}\n}}\n"
        ),
    );
    let namespace = namespace.to_owned();
    thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        NetnsPair::nft(&namespace, "delete table inet tcpmon_test");
    })
}

#[test]
fn a_lost_first_syn_costs_the_client_one_second_and_one_retry_and_bytes_are_exact() {
    if !kernel_tests_enabled() {
        return;
    }
    let _host = common::shared();
    let test = NetnsTest::new("syn", 8080);
    let mut daemon = Daemon::start(&["--netns-labels", "64"]);
    let tail = test.tail(&daemon, &["--count", "2"]);
    let before = daemon.settled_scrape();

    let NetnsTest { pair, listener, .. } = test;
    let restore = drop_for_a_moment(&pair.server, "tcp dport 8080 tcp flags & (syn | ack) == syn");
    exchange(&pair, listener, 1000, 2345);
    restore.join().unwrap();

    let records = records(&tail.finish());
    let client = side(&records, "active");
    let server = side(&records, "passive");
    // The SYN was retransmitted after the initial RTO (1 s): one retry, ~1 s handshake.
    let handshake = us(client, "handshake_us");
    assert!((US_PER_S..US_PER_S * 3 / 2).contains(&handshake), "{client}");
    assert_eq!(client["handshake_retransmits"], 1, "{client}");
    // The server never saw the first SYN: its handshake is one round trip, no retry.
    assert!(us(server, "handshake_us") < US_PER_S / 10, "{server}");
    assert_eq!(server["handshake_retransmits"], 0, "{server}");
    // Exact application payload each way.
    assert_eq!(
        (client["bytes_sent"].as_u64(), client["bytes_received"].as_u64()),
        (Some(1000), Some(2345))
    );
    assert_eq!(
        (server["bytes_sent"].as_u64(), server["bytes_received"].as_u64()),
        (Some(2345), Some(1000))
    );
    // Each end in its own namespace; the accepted one owned by the listening process.
    assert_eq!(client["netns"].as_u64(), Some(NetnsPair::inode(&pair.client)));
    assert_eq!(server["netns"].as_u64(), Some(NetnsPair::inode(&pair.server)));
    assert_eq!(server["pid"], std::process::id());
    assert_eq!(client["pid"], std::process::id());

    // --netns-labels: the connection in its namespaces' own series, which no other test's
    // traffic reaches.
    let after = daemon.settled_scrape();
    let (client_ns, server_ns) = (NetnsPair::inode(&pair.client), NetnsPair::inode(&pair.server));
    let d = |family: &str, netns: u64, labels: &str| {
        delta(&before, &after, &in_namespace(family, netns, labels))
    };
    assert_eq!(d("tcpmon_netns_connections_opened_total", client_ns, "side=\"active\""), 1.0);
    assert_eq!(d("tcpmon_netns_connections_opened_total", server_ns, "side=\"passive\""), 1.0);
    let closed = "tcpmon_netns_connections_closed_total";
    assert_eq!(d(closed, server_ns, "reason=\"fin\",side=\"passive\""), 1.0);
    assert_eq!(d(closed, client_ns, "reason=\"fin\",side=\"active\""), 1.0);
    // The one-retry handshake lands in the histogram's (1, 1.5] bucket, the server's below 1.
    let bucket = |netns, side: &str, le: &str| {
        let labels = format!("side=\"{side}\",le=\"{le}\"");
        d("tcpmon_netns_handshake_duration_seconds_bucket", netns, &labels)
    };
    assert_eq!((bucket(client_ns, "active", "1"), bucket(client_ns, "active", "1.5")), (0.0, 1.0));
    assert_eq!(bucket(server_ns, "passive", "1"), 1.0);
    // The host-wide counter saw at least this retry (other tests may retry meanwhile).
    let retries = delta(&before, &after, "tcpmon_handshake_retransmits_total{side=\"active\"}");
    assert!(retries >= 1.0, "{retries}");
}

#[test]
fn a_lost_first_synack_costs_both_ends_one_second() {
    if !kernel_tests_enabled() {
        return;
    }
    let _host = common::shared();
    let test = NetnsTest::new("synack", 8081);
    let daemon = Daemon::start(&[]);
    let tail = test.tail(&daemon, &["--count", "2"]);

    let NetnsTest { pair, listener, .. } = test;
    let restore =
        drop_for_a_moment(&pair.client, "tcp sport 8081 tcp flags & (syn | ack) == syn | ack");
    exchange(&pair, listener, 10, 10);
    restore.join().unwrap();

    let records = records(&tail.finish());
    let client = side(&records, "active");
    let server = side(&records, "passive");
    // The server's handshake runs from its first SYN-ACK, not from the one that got through.
    let passive = us(server, "handshake_us");
    assert!((US_PER_S * 9 / 10..US_PER_S * 3 / 2).contains(&passive), "{server}");
    // Resent on its own timer and/or for the client's retransmitted SYN.
    let resent = server["handshake_retransmits"].as_u64().unwrap();
    assert!((1..=2).contains(&resent), "{server}");
    let active = us(client, "handshake_us");
    assert!((US_PER_S * 9 / 10..US_PER_S * 3 / 2).contains(&active), "{client}");
    assert_eq!(client["handshake_retransmits"], 1, "{client}");
}

#[test]
fn resets_are_told_apart_and_older_listeners_own_their_connections() {
    if !kernel_tests_enabled() {
        return;
    }
    let _host = common::shared();
    // Listening before the daemon starts: only the start-up snapshot knows its owner.
    let test = NetnsTest::new("rst", 8082);
    let server = test.server();
    let mut daemon = Daemon::start(&["--netns-labels", "64"]);
    let tail = test.tail(&daemon, &["--count", "2"]);
    let before = daemon.settled_scrape();

    // The server aborts (SO_LINGER 0 sends a RST); the client receives it.
    let NetnsTest { pair, listener, .. } = test;
    let acceptor = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut byte = [0u8; 1];
        conn.read_exact(&mut byte).unwrap();
        set_linger_zero(&conn);
    });
    let mut client = in_netns(&pair.client, || TcpStream::connect(server)).unwrap();
    client.write_all(b"x").unwrap();
    acceptor.join().unwrap();
    let mut rest = Vec::new();
    let error = client.read_to_end(&mut rest).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
    drop(client);

    let records = records(&tail.finish());
    let server_side = side(&records, "passive");
    assert_eq!(server_side["outcome"], "abort", "{server_side}");
    assert_eq!(server_side["pid"], std::process::id(), "owned by the pre-existing listener");
    assert!(server_side["comm"].as_str().is_some_and(|c| !c.is_empty()), "{server_side}");
    let client_side = side(&records, "active");
    assert_eq!(client_side["outcome"], "reset_received", "{client_side}");

    let after = daemon.settled_scrape();
    let resets =
        |d: &str| delta(&before, &after, &format!("tcpmon_resets_total{{direction=\"{d}\"}}"));
    assert!(
        resets("sent") >= 1.0 && resets("received") >= 1.0,
        "{} {}",
        resets("sent"),
        resets("received")
    );
    let closed = |netns: &str, labels: &str| {
        let netns = NetnsPair::inode(netns);
        delta(
            &before,
            &after,
            &in_namespace("tcpmon_netns_connections_closed_total", netns, labels),
        )
    };
    assert_eq!(closed(&pair.server, "reason=\"abort\",side=\"passive\""), 1.0);
    assert_eq!(closed(&pair.client, "reason=\"reset_received\",side=\"active\""), 1.0);
}

#[test]
fn connections_open_before_the_start_are_counted_at_once_and_close_without_invented_times() {
    if !kernel_tests_enabled() {
        return;
    }
    // The established gauge below is host-wide.
    let _host = common::exclusive();
    let NetnsTest { pair, listener, .. } = NetnsTest::new("pre", 8083);
    let server = listener.local_addr().unwrap();
    const OPEN: usize = 5;
    let clients: Vec<TcpStream> =
        (0..OPEN).map(|_| in_netns(&pair.client, || TcpStream::connect(server)).unwrap()).collect();
    let accepted: Vec<TcpStream> = (0..OPEN).map(|_| listener.accept().unwrap().0).collect();

    let mut daemon = Daemon::start(&[]);
    // The very first scrape already counts them (both ends of each, and the listener).
    let first = daemon.scrape();
    assert!(first["tcpmon_connections{state=\"ESTABLISHED\"}"] >= (2 * OPEN) as f64, "{first:?}");
    assert!(first["tcpmon_connections{state=\"LISTEN\"}"] >= 1.0);
    let count = (2 * OPEN).to_string();
    let subnet = pair.subnet();
    let tail = common::Tail::start(
        &daemon.tail_socket,
        &["--json", "--port", "8083", "--addr", &subnet, "--count", &count],
        "following the daemon",
    );
    let before = daemon.settled_scrape();
    for (client, server_end) in clients.into_iter().zip(accepted) {
        drop(client); // our FIN first
        let mut rest = Vec::new();
        let mut server_end = server_end;
        server_end.read_to_end(&mut rest).unwrap();
        drop(server_end);
    }
    let records = records(&tail.finish());
    for record in &records {
        assert_eq!(record["event"], "closed", "{record}");
        assert_eq!(record["outcome"], "fin", "{record}");
        // First seen mid-life: no start, handshake or lifetime is invented.
        for field in ["start_time", "side", "handshake_us", "lifetime_us"] {
            assert_eq!(record[field], Value::Null, "{field} in {record}");
        }
        // Owners and namespaces come from the snapshot.
        assert_eq!(record["pid"], std::process::id(), "{record}");
        let home = if record["local_port"] == 8083 { &pair.server } else { &pair.client };
        assert_eq!(record["netns"].as_u64(), Some(NetnsPair::inode(home)), "{record}");
    }
    // Global series: other sockets of the host may close meanwhile (the tail above is the
    // exact check of our own).
    let after = daemon.settled_scrape();
    let closed =
        delta(&before, &after, "tcpmon_connections_closed_total{reason=\"fin\",side=\"unknown\"}");
    assert!(closed >= (2 * OPEN) as f64, "{closed}");
    let established = delta(&before, &after, "tcpmon_connections{state=\"ESTABLISHED\"}");
    assert!(established <= -((2 * OPEN) as f64), "{established}");
}

/// A non-blocking connect() from the current thread's namespace: the socket stays in
/// SYN_SENT while its SYN-ACKs are dropped.
fn start_connect(to: SocketAddr) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(to) = to else { panic!("IPv4 only") };
    // SAFETY: plain socket(2)/connect(2) with a correctly sized sockaddr_in; the fd is owned.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let address = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: to.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(*to.ip()).to_be() },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            (&address as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        let err = std::io::Error::last_os_error();
        assert!(rc == 0 || err.raw_os_error() == Some(libc::EINPROGRESS), "connect: {err}");
        std::os::fd::OwnedFd::from_raw_fd(fd)
    }
}

#[test]
fn a_syn_flood_does_not_grow_the_daemon_past_its_cap() {
    if !kernel_tests_enabled() {
        return;
    }
    // 3000 half-open connections and their SYN-ACK retransmissions load the whole host.
    let _host = common::exclusive();
    const CAP: usize = 1000;
    const HALF_OPEN: usize = 3000;
    // SAFETY: raising our own soft fd limit to the hard one.
    unsafe {
        let mut limit = std::mem::zeroed::<libc::rlimit>();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    let pair = NetnsPair::new("flood");
    // Room for every request, so the kernel keeps and retransmits all of them (a queue more
    // than half full has its old requests pruned instead: reqsk_timer_handler).
    for setting in ["net.ipv4.tcp_max_syn_backlog=65535", "net.core.somaxconn=65535"] {
        let status = std::process::Command::new("ip")
            .args(["netns", "exec", &pair.server, "sysctl", "-qw", setting])
            .status()
            .unwrap();
        assert!(status.success(), "{setting}");
    }
    let listener = in_netns(&pair.server, || TcpListener::bind((pair.server_ip, 8084))).unwrap();
    // SAFETY: listen(2) again on our socket only raises its backlog.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 65535) };
    // The client never sees a SYN-ACK: its sockets stay in SYN_SENT, the server's requests
    // keep resending SYN-ACKs.
    NetnsPair::nft(
        &pair.client,
        "table inet flood {\n chain input {\n  type filter hook input priority 0;\n  tcp sport 8084 drop\n }\n}\n",
    );
    let mut daemon = Daemon::start(&["--max-sockets", &CAP.to_string()]);
    let before = daemon.settled_scrape();
    let rss_before = daemon.rss_kib();

    let server = listener.local_addr().unwrap();
    let half_open: Vec<_> =
        in_netns(&pair.client, || (0..HALF_OPEN).map(|_| start_connect(server)).collect());
    // Past the first SYN and SYN-ACK retransmissions (1 s after each request; on a loaded
    // machine the requests' timers spread out, so wait until every request has resent).
    let untracked_metric = "tcpmon_tracker_synack_untracked_total";
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut after = daemon.settled_scrape();
    while delta(&before, &after, untracked_metric) < (HALF_OPEN - CAP) as f64
        && std::time::Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(250));
        after = daemon.settled_scrape();
    }
    let rss_after = daemon.rss_kib();

    assert!(after["tcpmon_tracked_sockets"] <= CAP as f64, "{}", after["tcpmon_tracked_sockets"]);
    let evicted = delta(&before, &after, "tcpmon_tracker_evictions_total{reason=\"capacity\"}");
    assert!(evicted >= (HALF_OPEN - CAP) as f64, "evicted {evicted}");
    let synacks = delta(&before, &after, "tcpmon_notes_received_total");
    let untracked = delta(&before, &after, untracked_metric);
    assert!(synacks >= HALF_OPEN as f64, "every request resent its SYN-ACK: {synacks}");
    assert!(untracked >= (HALF_OPEN - CAP) as f64, "untracked {untracked}");
    // Bounded tables: memory does not follow the flood (3000 entries would be < 1 MiB anyway;
    // the bound catches a leak, not a byte count).
    assert!(rss_after < rss_before + 16 * 1024, "RSS {rss_before} KiB -> {rss_after} KiB");
    drop(half_open);
}

/// Sets a host-wide sysctl for the guard's life (some, like tcp_max_orphans, have no
/// per-namespace copy).
struct SysctlGuard {
    path: &'static str,
    old: String,
}

impl SysctlGuard {
    fn set(path: &'static str, value: &str) -> SysctlGuard {
        let old = std::fs::read_to_string(path).unwrap();
        std::fs::write(path, value).unwrap();
        SysctlGuard { path, old }
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, self.old.trim());
    }
}

#[test]
fn an_orphan_the_kernel_resets_is_reset_sent() {
    if !kernel_tests_enabled() {
        return;
    }
    // tcp_max_orphans has no per-namespace copy: it would reset other tests' orphans.
    let _host = common::exclusive();
    let test = NetnsTest::new("orphan", 8085);
    let daemon = Daemon::start(&[]);
    let tail = test.tail(&daemon, &["--side", "active", "--count", "1"]);
    let NetnsTest { pair, listener, .. } = test;
    let mut client =
        in_netns(&pair.client, || TcpStream::connect(listener.local_addr().unwrap())).unwrap();
    let (_server_end, _) = listener.accept().unwrap();
    // From now on nothing reaches the server: the client's data and FIN stay unacknowledged.
    NetnsPair::nft(
        &pair.server,
        "table inet orphan {\n chain input {\n  type filter hook input priority 0;\n  tcp dport 8085 drop\n }\n}\n",
    );
    client.write_all(&[b'x'; 1000]).unwrap();
    drop(client); // an orphan in FIN_WAIT1 with unacknowledged data
                  // Then no orphan is allowed: at its next retransmission timeout the kernel gives up on it
                  // and resets it (tcp_write_timeout -> tcp_out_of_resources), with no socket error. (Set
                  // before close(), __tcp_close would abort it itself: CLOSE first, then the RST.)
    let _orphans = SysctlGuard::set("/proc/sys/net/ipv4/tcp_max_orphans", "0");

    let records = records(&tail.finish());
    assert_eq!(records[0]["outcome"], "reset_sent", "{}", records[0]);
    assert_eq!(records[0]["bytes_sent"], 1000, "{}", records[0]);
}

/// Network namespaces named `tcpmon-many-<pid>-<i>`, each with loopback up; removed on drop.
struct ManyNamespaces(Vec<String>);

impl ManyNamespaces {
    fn new(count: usize) -> ManyNamespaces {
        let names: Vec<String> =
            (0..count).map(|i| format!("tcpmon-many-{}-{i}", std::process::id())).collect();
        let namespaces = ManyNamespaces(names); // removed on drop from here on
        for name in &namespaces.0 {
            common::ip(&["netns", "add", name]);
            common::ip(&["-n", name, "link", "set", "lo", "up"]);
        }
        namespaces
    }
}

impl Drop for ManyNamespaces {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = std::process::Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// `(LISTEN, ESTABLISHED)` sockets as `ss` counts them, summed over the host's namespace
/// and every namespace of `paths` other than it.
fn ss_counts(paths: &[(u32, String)]) -> (u64, u64) {
    let (mut listen, mut established) = (0, 0);
    for (_, path) in paths {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={path}"))
            .args(["ss", "-Htan"])
            .output()
            .unwrap();
        assert!(out.status.success(), "ss in {path}");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            match line.split_whitespace().next() {
                Some("LISTEN") => listen += 1,
                Some("ESTAB") => established += 1,
                _ => {}
            }
        }
    }
    (listen, established)
}

/// The daemon's `(LISTEN, ESTABLISHED)` gauges equal `ss` summed over every namespace, read
/// around the scrape until the host's own sockets held still for it.
fn assert_gauges_equal_ss(daemon: &mut Daemon, when: &str) {
    let paths = monitor::sockdiag::namespaces(monitor::sockdiag::own_namespace());
    for attempt in 1..=10 {
        let before = ss_counts(&paths);
        let m = daemon.settled_scrape();
        let after = ss_counts(&paths);
        let ours = (
            m["tcpmon_connections{state=\"LISTEN\"}"] as u64,
            m["tcpmon_connections{state=\"ESTABLISHED\"}"] as u64,
        );
        if before == after && ours == before {
            return;
        }
        assert!(attempt < 10, "{when}: tcpmon {ours:?}, ss {before:?} then {after:?}");
        thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn the_same_listener_and_connection_in_300_namespaces_are_300_sockets_each_closed_in_its_own() {
    if !kernel_tests_enabled() {
        return;
    }
    let _host = common::exclusive(); // host-wide gauges
    const COUNT: usize = 300;
    // 900 sockets held by this process: raise its open-file limit to the hard one.
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    let namespaces = ManyNamespaces::new(COUNT);
    // As every pod listening on 127.0.0.1:8080 with a sidecar connected to it: identical
    // 4-tuples for the listeners, and for connections whose client ports coincide.
    let sockets: Vec<(TcpListener, TcpStream, TcpStream)> = namespaces
        .0
        .iter()
        .map(|name| {
            in_netns(name, || {
                let listener = TcpListener::bind("127.0.0.1:8080").unwrap();
                let client = TcpStream::connect("127.0.0.1:8080").unwrap();
                let (server, _) = listener.accept().unwrap();
                (listener, client, server)
            })
        })
        .collect();
    let inodes: Vec<u64> = namespaces.0.iter().map(|name| NetnsPair::inode(name)).collect();

    let started = std::time::Instant::now();
    let mut daemon = Daemon::start(&["--netns-labels", "1000"]);
    println!("start-up with {COUNT} extra namespaces: {:?}", started.elapsed());
    assert_gauges_equal_ss(&mut daemon, "after the start");
    // Where namespaces share the host's TCP hash table, the start-up log says how to avoid
    // a walk of it per namespace and scrape.
    let shared = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_child_ehash_entries")
        .is_ok_and(|entries| entries.trim() == "0");
    let hinted = daemon.stderr_so_far().contains("net.ipv4.tcp_child_ehash_entries");
    assert_eq!(hinted, shared, "{}", daemon.stderr_so_far());
    let scrape = std::time::Instant::now();
    let before = daemon.scrape();
    println!("one scrape with {COUNT} extra namespaces: {:?}", scrape.elapsed());

    // Each connection ends (client first), each listener closes.
    for (listener, client, mut server) in sockets {
        drop(client);
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).unwrap();
        drop(server);
        drop(listener);
    }
    assert_gauges_equal_ss(&mut daemon, "after the closes");
    // Both ends of each connection were matched to snapshot sockets of its own namespace.
    let after = daemon.settled_scrape();
    for inode in inodes {
        let closed = in_namespace(
            "tcpmon_netns_connections_closed_total",
            inode,
            "reason=\"fin\",side=\"unknown\"",
        );
        assert_eq!(delta(&before, &after, &closed), 2.0, "{closed}");
    }
    assert_eq!(after["tcpmon_events_lost_total"], 0.0);
    drop(namespaces);
    let (status, stderr, _) = daemon.stop();
    assert!(status.success(), "{stderr}");
}

#[test]
fn the_oldest_close_wait_ages_while_the_application_holds_it_and_drops_to_0_after() {
    if !kernel_tests_enabled() {
        return;
    }
    let _shared = common::shared(); // only its own port's series
    let test = NetnsTest::new("oldest", 8086);
    let mut daemon = Daemon::start(&[]);
    // The largest value of `family` among our port's series that have label `with`.
    let ours_with = |m: &common::Metrics, family: &str, with: &str| -> Option<f64> {
        let mut values = m
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{family}{{")) && k.contains("port=\"8086\""))
            .filter(|(k, _)| k.contains(with))
            .map(|(_, v)| *v);
        let first = values.next()?;
        Some(values.fold(first, f64::max))
    };
    let ours = |m: &common::Metrics, family: &str| ours_with(m, family, "");
    let before = daemon.settled_scrape();
    let mut client = in_netns(&test.pair.client, || TcpStream::connect(test.server())).unwrap();
    let (mut server, _) = test.listener.accept().unwrap();
    // The peer sends its FIN (shutdown, not close: a closed socket would wait in FIN_WAIT2
    // as a timewait mini-socket, where no transition shows it): the server's end is in
    // CLOSE_WAIT, the client's in FIN_WAIT2.
    client.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).unwrap();
    let held = std::time::Instant::now(); // the FIN arrived before this
                                          // While the application holds it, the gauge climbs past 2 s and never past the hold.
    let mut seen = 0.0;
    while held.elapsed() < Duration::from_millis(2900) {
        let m = daemon.scrape();
        let bound = held.elapsed().as_secs_f64() + 0.05;
        if let Some(age) = ours(&m, "tcpmon_close_wait_oldest_seconds") {
            assert!(age <= bound, "oldest CLOSE_WAIT {age} s after {bound} s");
            seen = age;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert!((2.0..=3.0).contains(&seen), "oldest CLOSE_WAIT read {seen} s near the end");
    // The tail lists it: our one socket, its owner, how long it has waited.
    let listing = std::process::Command::new(env!("CARGO_BIN_EXE_tcpmon"))
        .args(["tail", "--close-wait", "--json", "--port", "8086", "--socket"])
        .arg(&daemon.tail_socket)
        .output()
        .unwrap();
    assert!(listing.status.success(), "{}", String::from_utf8_lossy(&listing.stderr));
    let listed = records(
        &String::from_utf8_lossy(&listing.stdout).lines().map(String::from).collect::<Vec<_>>(),
    );
    assert_eq!(listed.len(), 1, "{listed:#?}");
    let waiting = &listed[0];
    assert_eq!((&waiting["event"], &waiting["side"]), (&"close_wait".into(), &"passive".into()));
    assert_eq!(waiting["pid"], std::process::id(), "{waiting}");
    let waited = us(waiting, "close_wait_us");
    let bound = held.elapsed().as_micros() as u64 + 50_000;
    assert!((2_000_000..=bound).contains(&waited), "listed after {waited} µs, held {bound} µs");
    thread::sleep(Duration::from_millis(3000).saturating_sub(held.elapsed()));
    drop(server);
    client.read_to_end(&mut rest).unwrap();
    drop(client);
    // Closed: the gauge is 0 at its next refresh, and the wait is in the histogram.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let after = loop {
        let m = daemon.settled_scrape();
        if ours(&m, "tcpmon_close_wait_oldest_seconds") == Some(0.0) {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "the oldest CLOSE_WAIT never went to 0");
        thread::sleep(Duration::from_millis(200));
    };
    let sum =
        |m: &common::Metrics| ours(m, "tcpmon_close_wait_duration_seconds_sum").unwrap_or(0.0);
    let waited = sum(&after) - sum(&before);
    assert!((3.0..3.1).contains(&waited), "CLOSE_WAIT lasted {waited} s, held 3 s");
    // The time in each state: the server's CLOSE_WAIT, and the client's FIN_WAIT2 (its FIN
    // acknowledged, the server's not yet sent) lasted the 3 s hold; FIN_WAIT2 starts at the
    // ACK of the client's FIN, which the server may delay (delayed ACK: up to ~40 ms).
    let state_sum = "tcpmon_state_duration_seconds_sum";
    for (state, low) in [("CLOSE_WAIT", 3.0), ("FIN_WAIT2", 2.9)] {
        let with = format!("state=\"{state}\"");
        let spent = |m: &common::Metrics| ours_with(m, state_sum, &with).unwrap_or(0.0);
        let spent = spent(&after) - spent(&before);
        assert!((low..3.1).contains(&spent), "{state} lasted {spent} s, held 3 s");
    }
}

#[test]
fn namespaces_that_go_away_take_their_netns_series_and_values_with_them() {
    if !kernel_tests_enabled() {
        return;
    }
    let _shared = common::shared(); // only its own namespaces' series
    let test = NetnsTest::new("gone", 8087);
    let mut daemon = Daemon::start(&["--netns-labels", "1000", "--label-idle", "1s"]);
    let (server, client) =
        (NetnsPair::inode(&test.pair.server), NetnsPair::inode(&test.pair.client));
    let ours = |m: &common::Metrics| -> Vec<String> {
        m.keys()
            .filter(|k| [server, client].iter().any(|n| k.contains(&format!("netns=\"{n}\""))))
            .cloned()
            .collect()
    };
    let NetnsTest { pair, listener, .. } = test;
    exchange(&pair, listener, 10, 10);
    let m = daemon.settled_scrape();
    let opened = in_namespace("tcpmon_netns_connections_opened_total", client, "side=\"active\"");
    assert_eq!(m.get(&opened), Some(&1.0), "{:?}", ours(&m));
    // The kernel counters are read in every namespace, ours too.
    let overflows = format!("tcpmon_listen_overflows_total{{netns=\"{server}\"}}");
    assert!(m.contains_key(&overflows), "{:?}", ours(&m));
    // The namespaces go (ip netns del; their sockets are closed): once idle for
    // --label-idle, every series of theirs is gone and their values are free.
    drop(pair);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let m = daemon.settled_scrape();
        let left = ours(&m);
        if left.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still exported: {left:?}");
        thread::sleep(Duration::from_millis(300));
    }
    let (status, stderr, _) = daemon.stop();
    assert!(status.success(), "{stderr}");
}

/// The sum of every series of `family` for `port` whose labels contain `with`.
fn port_sum(m: &common::Metrics, family: &str, port: u16, with: &str) -> f64 {
    let port = format!("port=\"{port}\"");
    m.iter()
        .filter(|(k, _)| k.starts_with(&format!("{family}{{")) && k.contains(&port))
        .filter(|(k, _)| k.contains(with))
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn connections_wait_in_the_accept_queue_until_accept_and_those_that_leave_it_are_abandoned() {
    if !kernel_tests_enabled() {
        return;
    }
    let _shared = common::shared(); // only its own port's series and namespaces
    for hook in ["btf", "tracepoint"] {
        let test = NetnsTest::new(&format!("acc{}", &hook[..1]), 8093);
        let mut daemon = Daemon::start(&["--hook", hook, "--accept-wait", "syscalls"]);
        let log = daemon.stderr_so_far();
        assert!(log.contains("accept() seen through: syscall tracepoints"), "{log}");
        // 5 accepted + 1 reset while queued + 1 queued when the listener closes, both ends.
        let tail = test.tail(&daemon, &["--count", "14"]);
        let before = daemon.settled_scrape();

        // Five connections complete their handshakes; the application accepts them 0.4 s
        // later.
        let connect = || in_netns(&test.pair.client, || TcpStream::connect(test.server())).unwrap();
        let clients: Vec<TcpStream> = (0..5).map(|_| connect()).collect();
        thread::sleep(Duration::from_millis(400));
        let accepted: Vec<TcpStream> = (0..5).map(|_| test.listener.accept().unwrap().0).collect();
        drop(accepted);
        drop(clients);
        // A client that resets while its connection waits in the queue.
        let reset = connect();
        thread::sleep(Duration::from_millis(50));
        set_linger_zero(&reset);
        drop(reset);
        thread::sleep(Duration::from_millis(50));
        // A connection still queued when the listener closes.
        let queued = connect();
        thread::sleep(Duration::from_millis(50));
        let NetnsTest { pair, listener, .. } = test;
        drop(listener);
        drop(queued);

        let records = records(&tail.finish());
        let passive: Vec<&Value> = records.iter().filter(|r| r["side"] == "passive").collect();
        let waits: Vec<u64> = passive.iter().filter_map(|r| r["accept_wait_us"].as_u64()).collect();
        assert_eq!(waits.len(), 5, "{hook}: {passive:#?}");
        for wait in &waits {
            assert!((350_000..=450_000).contains(wait), "{hook}: accept waits {waits:?} µs");
        }
        assert_eq!(passive.len(), 7, "{hook}: {passive:#?}");

        let after = daemon.settled_scrape();
        let d = |family: &str, with: &str| {
            port_sum(&after, family, 8093, with) - port_sum(&before, family, 8093, with)
        };
        assert_eq!(d("tcpmon_accept_wait_seconds_count", ""), 5.0, "{hook}");
        let sum = d("tcpmon_accept_wait_seconds_sum", "");
        assert!((1.9..=2.1).contains(&sum), "{hook}: 5 waits of 0.4 s summed to {sum} s");
        println!("{hook} build: accept waits {waits:?} µs, sum {sum:.4} s");
        assert_eq!(d("tcpmon_accept_wait_seconds_bucket", "le=\"0.25\""), 0.0, "{hook}");
        assert_eq!(d("tcpmon_accept_wait_seconds_bucket", "le=\"0.5\""), 5.0, "{hook}");
        let abandoned = "tcpmon_accept_abandoned_total";
        assert_eq!(d(abandoned, "reason=\"reset\""), 1.0, "{hook}");
        assert_eq!(d(abandoned, "reason=\"listener_closed\""), 1.0, "{hook}");
        assert_eq!(d(abandoned, "reason=\"other\""), 0.0, "{hook}");
        drop(pair);
        let (status, stderr, _) = daemon.stop();
        assert!(status.success(), "{stderr}");
    }
}

#[test]
fn last_ack_lasts_until_the_peers_ack_which_a_drop_delays_to_the_fins_second_resend() {
    if !kernel_tests_enabled() {
        return;
    }
    let _shared = common::shared(); // only its own port's series
    let test = NetnsTest::new("lastack", 8094);
    let mut daemon = Daemon::start(&[]);
    let before = daemon.settled_scrape();
    let client = in_netns(&test.pair.client, || TcpStream::connect(test.server())).unwrap();
    let (mut server, _) = test.listener.accept().unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    server.read_to_end(&mut Vec::new()).unwrap(); // the client's FIN: CLOSE_WAIT
                                                  // The client's ACK of the server's FIN is dropped for 300 ms. The server probes with its
                                                  // FIN once a tail-loss-probe timeout has passed (`tcp_schedule_loss_probe()`: srtt/4 +
                                                  // TCP_RTO_MIN, 200 ms, with one segment out), and that ACK is dropped too; it resends on
                                                  // the retransmission timeout, 200 ms later, and that one is answered: ~0.41 s.
    let restore = drop_for_a_moment(&test.pair.server, "tcp dport 8094");
    drop(server); // close(): FIN sent, LAST_ACK
    restore.join().unwrap();
    thread::sleep(Duration::from_millis(700));
    drop(client);
    let after = daemon.settled_scrape();
    let spent = |state: &str| {
        let with = format!("state=\"{state}\"");
        port_sum(&after, "tcpmon_state_duration_seconds_sum", 8094, &with)
            - port_sum(&before, "tcpmon_state_duration_seconds_sum", 8094, &with)
    };
    let last_ack = spent("LAST_ACK");
    assert!((0.4..0.6).contains(&last_ack), "LAST_ACK lasted {last_ack} s, expected ~0.41 s");
    let count = |m: &common::Metrics| {
        port_sum(m, "tcpmon_state_duration_seconds_count", 8094, "state=\"LAST_ACK\"")
    };
    assert_eq!(count(&after) - count(&before), 1.0);
    println!("LAST_ACK with its first two ACKs dropped: {last_ack:.3} s");
}

#[test]
fn an_ipv6_listeners_queue_is_read_and_stays_current_while_its_namespace_is_quiet() {
    if !kernel_tests_enabled() {
        return;
    }
    let _shared = common::shared(); // only its own port's series
                                    // A dual-stack listener (`[::]`, as many servers bind by default) is an IPv6 socket: its
                                    // namespace has no IPv4 TCP socket at all (`sockstat` counts none, `sockstat6` does).
    let pair = NetnsPair::new("v6only");
    let listener = in_netns(&pair.server, || TcpListener::bind("[::]:8095")).unwrap();
    let mut daemon = Daemon::start(&[]);
    let server = SocketAddr::from((pair.server_ip, 8095));
    let clients: Vec<TcpStream> =
        (0..2).map(|_| in_netns(&pair.client, || TcpStream::connect(server)).unwrap()).collect();
    let queued = |daemon: &mut Daemon| {
        thread::sleep(monitor::netstate::MIN_INTERVAL + Duration::from_millis(100));
        let m = daemon.settled_scrape();
        (
            port_sum(&m, "tcpmon_listen_queue_length", 8095, ""),
            port_sum(&m, "tcpmon_listen_queue_limit", 8095, ""),
        )
    };
    assert_eq!(queued(&mut daemon), (2.0, 128.0), "two connections wait for accept()");
    // Nothing moves: the next read reuses the namespace's SYN_RECV and FIN_WAIT2 dump but
    // still reads the listener.
    assert_eq!(queued(&mut daemon), (2.0, 128.0));
    // accept() takes them without a segment on the wire: the queue is read afresh anyway.
    let accepted: Vec<TcpStream> = (0..2).map(|_| listener.accept().unwrap().0).collect();
    assert_eq!(queued(&mut daemon), (0.0, 128.0), "accepted");
    drop((accepted, clients));
}
