//! Kernel integration tests of why handshakes fail and where closes go: a listener whose
//! accept queue overflows, SYN cookies, and TIME_WAIT — each in network namespaces the test
//! creates, each number checked against the kernel's own (`/proc/net/netstat` of that
//! namespace, `ss`). Needs root, like tests/kernel.rs.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::thread;
use std::time::Duration;

use common::{in_netns, kernel_tests_enabled, server_port, Daemon, Metrics, NetnsPair, Tail};
use monitor::netstate::{parse_netstat, KERNEL_COUNTERS};
use serde_json::Value;

/// The kernel's `TcpExt` counters in a namespace, by field name (every field, not only the
/// ones tcpmon exports).
fn mib(namespace: &str) -> HashMap<String, u64> {
    let out = Command::new("ip")
        .args(["netns", "exec", namespace, "cat", "/proc/net/netstat"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut fields = HashMap::new();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        if let (Some(("TcpExt", names)), Some(("TcpExt", values))) =
            (names.split_once(": "), values.split_once(": "))
        {
            for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
                fields.insert(name.to_owned(), value.parse().unwrap());
            }
        }
    }
    // The daemon's parser reads the same text the same way.
    let ours = parse_netstat(&text);
    for (index, (field, ..)) in KERNEL_COUNTERS.iter().enumerate() {
        assert_eq!(ours[index], fields.get(*field).copied(), "{field}");
    }
    fields
}

/// `metric{labels}` in a scrape, 0 when absent.
fn value(m: &Metrics, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

/// A kernel counter as tcpmon exports it for one namespace (`--netns-labels`).
fn counter_in(m: &Metrics, metric: &str, netns: u64) -> f64 {
    value(m, &format!("{metric}{{netns=\"{netns}\"}}"))
}

/// Sum of every series of `metric` whose labels include `label`.
fn sum_with(m: &Metrics, metric: &str, label: &str) -> f64 {
    let prefix = format!("{metric}{{");
    m.iter().filter(|(k, _)| k.starts_with(&prefix) && k.contains(label)).map(|(_, v)| v).sum()
}

/// Scrapes until tcpmon has read the kernel again (its reads are at most once a second).
fn fresh_scrape(daemon: &mut Daemon) -> Metrics {
    thread::sleep(monitor::netstate::MIN_INTERVAL + Duration::from_millis(100));
    daemon.settled_scrape()
}

#[test]
fn an_overflowing_accept_queue_is_seen_in_the_gauges_the_counters_and_the_tail() {
    let _shared = common::shared();
    if !kernel_tests_enabled() {
        return;
    }
    let pair = NetnsPair::new("aq");
    let port = server_port();
    let listener = in_netns(&pair.server, || TcpListener::bind((pair.server_ip, port))).unwrap();
    // A backlog of 3: the accept queue holds four connections, the SYN queue four requests
    // (the kernel admits one more than the backlog to each).
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 3) }, 0);
    let netns = NetnsPair::inode(&pair.server);
    let mut daemon = Daemon::start(&["--netns-labels", "100000", "--ports", &port.to_string()]);
    let tail = Tail::start(
        &daemon.tail_socket,
        &["--json", "--count", "12", "--port", &port.to_string()],
        "following the daemon",
    );
    let before = fresh_scrape(&mut daemon);
    let mib_before = mib(&pair.server);

    // Two connections wait in the accept queue; then four clients. A listener drops SYNs
    // while its accept queue is full, so to overflow it the SYNs must all wait in the SYN
    // queue first: the clients' final ACKs are dropped on the way in (nftables) until the
    // four requests wait there, then let through. The next SYN-ACKs (~3 s after the SYNs)
    // bring four ACKs at once: two fit the accept queue, the kernel drops the other two and
    // resends those SYN-ACKs (~7 s) until there is room. Each connect() returns at once: a
    // client is ESTABLISHED at the first SYN-ACK.
    let server = pair.server_ip;
    let mut clients: Vec<TcpStream> = in_netns(&pair.client, || {
        (0..2).map(|_| TcpStream::connect((server, port)).unwrap()).collect()
    });
    let hold = format!(
        "table inet hold {{\n chain input {{\n  type filter hook input priority 0;\n  \
         tcp dport {port} tcp flags & (syn | ack) == ack drop\n }}\n}}\n"
    );
    NetnsPair::nft(&pair.server, &hold);
    clients.extend(in_netns(&pair.client, || {
        (0..4).map(|_| TcpStream::connect((server, port)).unwrap()).collect::<Vec<_>>()
    }));
    thread::sleep(Duration::from_millis(1500));
    NetnsPair::nft(&pair.server, "delete table inet hold");
    thread::sleep(Duration::from_millis(2200));
    let full = fresh_scrape(&mut daemon);
    let queue = |m: &Metrics, what: &str| {
        value(m, &format!("tcpmon_listen_queue_{what}{{port=\"{port}\"}}"))
    };
    assert_eq!((queue(&full, "length"), queue(&full, "limit")), (4.0, 3.0));
    let ss = Command::new("ip")
        .args(["netns", "exec", &pair.server, "ss", "-Hlnt", &format!("sport = :{port}")])
        .output()
        .unwrap();
    let ss = String::from_utf8(ss.stdout).unwrap();
    let columns: Vec<&str> = ss.split_whitespace().collect();
    assert_eq!((columns[1], columns[2]), ("4", "3"), "ss -lnt: {ss}");

    // Now the server accepts: the two queued at once, the others when their next SYN-ACK
    // brings their client's ACK again.
    let accepted: Vec<TcpStream> = (0..6).map(|_| listener.accept().unwrap().0).collect();
    drop(clients);
    for mut connection in accepted {
        let mut rest = Vec::new();
        connection.read_to_end(&mut rest).unwrap();
    }
    let records: Vec<Value> =
        tail.finish().iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let after = fresh_scrape(&mut daemon);
    let mib_after = mib(&pair.server);
    let mib_delta = |field: &str| (mib_after[field] - mib_before[field]) as f64;

    // The kernel's queue counters, as the kernel counts them in that namespace.
    for (field, metric) in [
        ("ListenOverflows", "tcpmon_listen_overflows_total"),
        ("ListenDrops", "tcpmon_listen_drops_total"),
    ] {
        let ours = counter_in(&after, metric, netns) - counter_in(&before, metric, netns);
        assert_eq!(ours, mib_delta(field), "{metric}");
    }
    assert!(mib_delta("ListenOverflows") >= 2.0);
    // Every SYN-ACK resent for the port (the kernel counts them as TCPSynRetrans), most
    // after the client's ACK.
    let synacks = |m: &Metrics, reason: &str| {
        sum_with(
            m,
            "tcpmon_synack_retransmits_total",
            &format!("port=\"{port}\",reason=\"{reason}\""),
        )
    };
    let resent = |m: &Metrics| synacks(m, "accept_queue_full") + synacks(m, "unacknowledged");
    assert_eq!(resent(&after) - resent(&before), mib_delta("TCPSynRetrans"));
    assert!(synacks(&after, "accept_queue_full") - synacks(&before, "accept_queue_full") >= 2.0);

    // The tail: the two that waited say so, with a handshake of the SYN-ACKs it took; their
    // clients' handshakes were as fast as the others'.
    let passive: Vec<&Value> = records.iter().filter(|r| r["side"] == "passive").collect();
    let waited: Vec<&&Value> = passive.iter().filter(|r| r["accept_queue_full"] == true).collect();
    assert_eq!((passive.len(), waited.len()), (6, 2), "{records:?}");
    for record in &waited {
        assert!(record["handshake_retransmits"].as_u64().unwrap() >= 1, "{record}");
        assert!(record["handshake_us"].as_u64().unwrap() >= 1_000_000, "{record}");
    }
    for record in records.iter().filter(|r| r["side"] == "active") {
        assert!(record["handshake_us"].as_u64().unwrap() < 100_000, "{record}");
        assert_eq!(record["accept_queue_full"], false);
    }
}

#[test]
fn syn_cookies_are_counted_as_the_kernel_counts_them() {
    let _shared = common::shared();
    if !kernel_tests_enabled() {
        return;
    }
    let pair = NetnsPair::new("sc");
    // 2: a cookie for every SYN, whether or not the SYN queue is full (a flood's effect).
    let sysctl = Command::new("ip")
        .args(["netns", "exec", &pair.server, "sysctl", "-qw", "net.ipv4.tcp_syncookies=2"])
        .status()
        .unwrap();
    assert!(sysctl.success());
    let (port, flooded) = (server_port(), server_port());
    let bind = |port| in_netns(&pair.server, || TcpListener::bind((pair.server_ip, port))).unwrap();
    let (listener, _flooded_listener) = (bind(port), bind(flooded));
    let netns = NetnsPair::inode(&pair.server);
    let mut daemon = Daemon::start(&["--netns-labels", "100000"]);
    let before = fresh_scrape(&mut daemon);
    let mib_before = mib(&pair.server);
    // N connections a cookie completes, and a flood of F SYNs whose handshakes never do
    // (their final ACKs are dropped on the way in).
    const N: usize = 5;
    const F: usize = 20;
    let server = pair.server_ip;
    let clients: Vec<TcpStream> = in_netns(&pair.client, || {
        (0..N).map(|_| TcpStream::connect((server, port)).unwrap()).collect()
    });
    let accepted: Vec<TcpStream> = (0..N).map(|_| listener.accept().unwrap().0).collect();
    NetnsPair::nft(
        &pair.server,
        &format!(
            "table inet flood {{\n chain input {{\n  type filter hook input priority 0;\n  \
             tcp dport {flooded} tcp flags & (syn | ack) == ack drop\n }}\n}}\n"
        ),
    );
    let flood: Vec<TcpStream> = in_netns(&pair.client, || {
        (0..F).map(|_| TcpStream::connect((server, flooded)).unwrap()).collect()
    });
    drop((clients, accepted, flood));
    let after = fresh_scrape(&mut daemon);
    let mib_after = mib(&pair.server);
    for (field, metric) in [
        ("SyncookiesSent", "tcpmon_syncookies_sent_total"),
        ("SyncookiesRecv", "tcpmon_syncookies_received_total"),
        ("SyncookiesFailed", "tcpmon_syncookies_failed_total"),
    ] {
        let kernel = (mib_after[field] - mib_before[field]) as f64;
        let ours = counter_in(&after, metric, netns) - counter_in(&before, metric, netns);
        assert_eq!(ours, kernel, "{metric}");
        let expected = match field {
            "SyncookiesSent" => N + F,
            "SyncookiesRecv" => N,
            _ => 0,
        };
        assert_eq!(kernel, expected as f64, "{field}");
    }
}

/// `ss`'s TIME-WAIT count, summed over every network namespace tcpmon reads.
fn time_wait_everywhere() -> usize {
    ss_states_everywhere().get("TIME_WAIT").copied().unwrap_or(0)
}

/// Scrapes at a quiet moment and checks tcpmon's TIME_WAIT gauge against `ss` in every
/// namespace (the host's TIME_WAIT sockets of earlier tests expire meanwhile, and the scrape
/// adds its own, so `ss` is asked before and after).
fn scrape_checking_time_wait(daemon: &mut Daemon) -> Metrics {
    let ss_before = time_wait_everywhere();
    let scrape = fresh_scrape(daemon);
    let ss_after = time_wait_everywhere();
    let gauge = value(&scrape, "tcpmon_connections{state=\"TIME_WAIT\"}");
    let (low, high) = (ss_before.min(ss_after) as f64, ss_before.max(ss_after) as f64);
    assert!(
        gauge >= low * 0.99 - 1.0 && gauge <= high * 1.01 + 1.0,
        "TIME_WAIT: tcpmon {gauge}, ss {ss_before}..{ss_after}"
    );
    scrape
}

/// Sets a sysctl of a namespace (`net.ipv4.*` ones are per namespace).
fn sysctl_in(namespace: &str, setting: &str) {
    let status = Command::new("ip")
        .args(["netns", "exec", namespace, "sysctl", "-qw", setting])
        .status()
        .unwrap();
    assert!(status.success(), "sysctl -w {setting}");
}

/// The local ports of the TIME-WAIT sockets in `namespace` whose peer port is `port`.
fn time_wait_ports(namespace: &str, port: u16) -> Vec<u16> {
    let filter = format!("dport = :{port}");
    let out = Command::new("ip")
        .args(["netns", "exec", namespace, "ss", "-Htan", "state", "time-wait", &filter])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let local_port = |line: &str| {
        let local = line.split_whitespace().find(|field| field.contains(':'))?;
        local.rsplit(':').next()?.parse().ok()
    };
    let mut ports: Vec<u16> = text.lines().map(|line| local_port(line).unwrap()).collect();
    ports.sort_unstable();
    ports
}

/// A field of the `Tcp:` line of a namespace's `/proc/net/snmp` (`OutRsts`, …).
fn snmp_tcp(namespace: &str, field: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", namespace, "cat", "/proc/net/snmp"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut tcp = text.lines().filter_map(|line| line.strip_prefix("Tcp: "));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let at = names.split_whitespace().position(|name| name == field).unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// Sends a bare ACK from `from` to `to` whose sequence number (12345) is outside any window
/// the receiver has: a raw TCP segment, from the calling thread's namespace.
fn send_stray_ack(from: std::net::SocketAddrV4, to: std::net::SocketAddrV4) {
    let mut segment = [0u8; 20];
    segment[0..2].copy_from_slice(&from.port().to_be_bytes());
    segment[2..4].copy_from_slice(&to.port().to_be_bytes());
    segment[4..8].copy_from_slice(&12345u32.to_be_bytes());
    segment[12] = 5 << 4; // 20-byte header
    segment[13] = 0x10; // ACK
    segment[14..16].copy_from_slice(&65535u16.to_be_bytes());
    // The checksum covers a pseudo-header: both addresses, the protocol and the length.
    let mut pseudo = Vec::from(from.ip().octets());
    pseudo.extend(to.ip().octets());
    pseudo.extend([0, libc::IPPROTO_TCP as u8, 0, segment.len() as u8]);
    pseudo.extend(segment);
    let sum = pseudo.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    let checksum = !(((folded & 0xffff) + (folded >> 16)) as u16);
    segment[16..18].copy_from_slice(&checksum.to_be_bytes());
    let address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(to.ip().octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: plain socket calls on a descriptor this function owns, with buffers that
    // outlive them.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let sent = libc::sendto(
            fd,
            segment.as_ptr().cast(),
            segment.len(),
            0,
            (&raw const address).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        libc::close(fd);
        assert_eq!(sent, segment.len() as isize, "{}", std::io::Error::last_os_error());
    }
}

/// N orderly closes the client starts, to `port` on the pair's server: the client's sockets
/// go FIN_WAIT2 -> TIME_WAIT (over veth, so net.ipv4.tcp_tw_reuse, on for loopback only,
/// reuses none of them). The server reads each connection to its end, then closes it.
fn orderly_client_closes(pair: &NetnsPair, listener: TcpListener, port: u16, n: usize) {
    let server = thread::spawn(move || {
        for _ in 0..n {
            let (mut connection, _) = listener.accept().unwrap();
            let mut rest = Vec::new();
            connection.read_to_end(&mut rest).unwrap();
        }
    });
    let server_ip = pair.server_ip;
    in_netns(&pair.client, || {
        for _ in 0..n {
            drop(TcpStream::connect((server_ip, port)).unwrap());
        }
    });
    server.join().unwrap();
}

#[test]
fn time_wait_is_the_kernels_population_and_every_entry_is_counted() {
    let _host = common::exclusive();
    if !kernel_tests_enabled() {
        return;
    }
    let pair = NetnsPair::new("tw");
    let port = server_port();
    let listener = in_netns(&pair.server, || TcpListener::bind((pair.server_ip, port))).unwrap();
    let mut daemon = Daemon::start(&["--netns-labels", "100000", "--ports", &port.to_string()]);
    let before = fresh_scrape(&mut daemon);
    let mib_before = mib(&pair.client);
    // RFC 1337's rule: a TIME_WAIT socket ignores resets. Without it, now and then one of
    // ours is killed by a reset before anyone counts it (see the next test).
    sysctl_in(&pair.client, "net.ipv4.tcp_rfc1337=1");

    const N: usize = 300;
    orderly_client_closes(&pair, listener, port, N);

    let after = scrape_checking_time_wait(&mut daemon);
    // Ours are all there: the kernel's own list of them.
    assert_eq!(time_wait_ports(&pair.client, port).len(), N);
    // Every entry counted, as the kernel counts them: this kernel adds to TcpExtTW when
    // tcp_time_wait() takes a socket (__inet_twsk_schedule(); older ones counted at expiry).
    let entered =
        |m: &Metrics| sum_with(m, "tcpmon_time_wait_entered_total", &format!("port=\"{port}\""));
    let kernel = mib(&pair.client)["TW"] - mib_before["TW"];
    assert_eq!((entered(&after) - entered(&before), kernel as f64), (N as f64, N as f64));
}

/// Why the live TIME_WAIT population can be below the count of entries: a reset the TIME_WAIT
/// socket finds in its window kills it (`tcp_timewait_state_process()` with
/// `net.ipv4.tcp_rfc1337=0`, the default), and no counter says so. Under churn the reset
/// comes from the peer's own stack: its delayed ACK, overtaken by its FIN, arrives after the
/// connection closed there; our TIME_WAIT socket answers it with an ACK, and the peer, with
/// no socket left, answers that with a reset at exactly the expected sequence. Here a stray
/// ACK starts the same exchange for K chosen sockets.
#[test]
fn a_reset_kills_time_wait_sockets_the_kernel_counted_entering() {
    let _host = common::exclusive();
    if !kernel_tests_enabled() {
        return;
    }
    let pair = NetnsPair::new("twk");
    let port = server_port();
    let listener = in_netns(&pair.server, || TcpListener::bind((pair.server_ip, port))).unwrap();
    let mut daemon = Daemon::start(&["--ports", &port.to_string()]);
    let before = fresh_scrape(&mut daemon);
    let (mib_before, resets_before) = (mib(&pair.client), snmp_tcp(&pair.server, "OutRsts"));
    sysctl_in(&pair.client, "net.ipv4.tcp_rfc1337=1"); // none killed while they close

    const N: usize = 20;
    const K: usize = 7;
    orderly_client_closes(&pair, listener, port, N);
    let ports = time_wait_ports(&pair.client, port);
    assert_eq!(ports.len(), N);

    sysctl_in(&pair.client, "net.ipv4.tcp_rfc1337=0");
    let client_ip = std::net::Ipv4Addr::new(10, 201, pair.server_ip.octets()[2], 2);
    let server = std::net::SocketAddrV4::new(pair.server_ip, port);
    in_netns(&pair.server, || {
        for &client_port in &ports[..K] {
            send_stray_ack(server, std::net::SocketAddrV4::new(client_ip, client_port));
        }
    });
    let mut left = ports.clone();
    for _ in 0..50 {
        left = time_wait_ports(&pair.client, port);
        if left.len() <= N - K {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    // Exactly the K that were hit are gone, each by one reset from the server's namespace.
    assert_eq!(left, ports[K..]);
    assert_eq!(snmp_tcp(&pair.server, "OutRsts") - resets_before, K as u64);
    let after = scrape_checking_time_wait(&mut daemon);
    // They entered TIME_WAIT all the same: the kernel counted N, and so does tcpmon.
    let entered =
        |m: &Metrics| sum_with(m, "tcpmon_time_wait_entered_total", &format!("port=\"{port}\""));
    let kernel = mib(&pair.client)["TW"] - mib_before["TW"];
    assert_eq!((entered(&after) - entered(&before), kernel as f64), (N as f64, N as f64));
    // No counter of the kernel's moved for the K: not TWKilled, not TWRecycled.
    let mib_after = mib(&pair.client);
    for field in ["TWKilled", "TWRecycled"] {
        assert_eq!(mib_after[field], mib_before[field], "{field}");
    }
}

/// `ss -Htan`'s count of each state, summed over every network namespace tcpmon reads, by
/// the kernel's name for the state.
fn ss_states_everywhere() -> HashMap<String, usize> {
    let namespaces = monitor::sockdiag::namespaces(monitor::sockdiag::own_namespace());
    let mut counts = HashMap::new();
    for (_, path) in namespaces {
        let out = Command::new("nsenter")
            .arg(format!("--net={path}"))
            .args(["ss", "-Htan"])
            .output()
            .unwrap();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let state = match line.split_whitespace().next().unwrap_or_default() {
                "ESTAB" => "ESTABLISHED",
                "SYN-SENT" => "SYN_SENT",
                "SYN-RECV" => "SYN_RECV",
                "FIN-WAIT-1" => "FIN_WAIT1",
                "FIN-WAIT-2" => "FIN_WAIT2",
                "TIME-WAIT" => "TIME_WAIT",
                "CLOSE-WAIT" => "CLOSE_WAIT",
                "LAST-ACK" => "LAST_ACK",
                "LISTEN" => "LISTEN",
                "CLOSING" => "CLOSING",
                other => panic!("ss state {other}"),
            };
            *counts.entry(state.to_owned()).or_insert(0) += 1;
        }
    }
    counts
}

#[test]
fn every_exported_state_matches_ss_at_a_quiet_moment() {
    let _host = common::exclusive();
    if !kernel_tests_enabled() {
        return;
    }
    let pair = NetnsPair::new("st");
    let (port, waiting_port) = (server_port(), server_port());
    let bind = |port| in_netns(&pair.server, || TcpListener::bind((pair.server_ip, port))).unwrap();
    let (listener, waiting) = (bind(port), bind(waiting_port));
    let mut daemon = Daemon::start(&[]);
    let server = pair.server_ip;
    let connect = |port, count| -> Vec<TcpStream> {
        in_netns(&pair.client, || {
            (0..count).map(|_| TcpStream::connect((server, port)).unwrap()).collect()
        })
    };
    // Five connections both ends hold: ESTABLISHED twice over.
    let held_clients = connect(port, 5);
    let held: Vec<TcpStream> = (0..5).map(|_| listener.accept().unwrap().0).collect();
    // Three the server closes: the client in CLOSE_WAIT, the server's socket, orphaned with
    // its FIN acknowledged, a timewait socket in FIN_WAIT2.
    let half_closed = connect(port, 3);
    for _ in 0..3 {
        drop(listener.accept().unwrap().0);
    }
    // Two the server shuts down for writing but keeps: a full socket in FIN_WAIT2.
    let shut_clients = connect(port, 2);
    let shut: Vec<TcpStream> = (0..2)
        .map(|_| {
            let (connection, _) = listener.accept().unwrap();
            connection.shutdown(std::net::Shutdown::Write).unwrap();
            connection
        })
        .collect();
    // Two waiting in an accept queue, and ten orderly closes the client starts (TIME_WAIT).
    let queued = connect(waiting_port, 2);
    for client in connect(port, 10) {
        drop(client);
        let (mut connection, _) = listener.accept().unwrap();
        let mut rest = Vec::new();
        connection.read_to_end(&mut rest).unwrap();
    }
    thread::sleep(Duration::from_millis(300));

    let ss_before = ss_states_everywhere();
    let ours = fresh_scrape(&mut daemon);
    let ss_after = ss_states_everywhere();
    let states = [
        "ESTABLISHED",
        "SYN_SENT",
        "SYN_RECV",
        "FIN_WAIT1",
        "FIN_WAIT2",
        "TIME_WAIT",
        "CLOSE_WAIT",
        "LAST_ACK",
        "LISTEN",
        "CLOSING",
    ];
    for state in states {
        let gauge = value(&ours, &format!("tcpmon_connections{{state=\"{state}\"}}"));
        let ss = |counts: &HashMap<String, usize>| counts.get(state).copied().unwrap_or(0) as f64;
        let (low, high) = (ss(&ss_before).min(ss(&ss_after)), ss(&ss_before).max(ss(&ss_after)));
        assert!(
            gauge >= (low * 0.99).floor() && gauge <= (high * 1.01).ceil(),
            "{state}: tcpmon {gauge}, ss {low}..{high}"
        );
    }
    assert!(value(&ours, "tcpmon_connections{state=\"FIN_WAIT2\"}") >= 5.0, "ours: 3 + 2");
    assert!(value(&ours, "tcpmon_connections{state=\"CLOSE_WAIT\"}") >= 5.0);
    drop((held_clients, held, half_closed, shut_clients, shut, queued, waiting));
}
