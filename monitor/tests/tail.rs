//! Kernel integration tests of `tcpmon tail`, through the daemon and stand-alone: the real
//! eBPF program, the test's own connections, and checks that exactly those records appear
//! with the right ports, sides, outcomes and durations. Needs root, like tests/kernel.rs.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    churn_on, delta, free_port, kernel_tests_enabled, listener_with_deep_backlog, set_linger_zero,
    unique_socket_path, Daemon, Tail,
};
use serde_json::Value;

/// The test's own traffic on three ports: a connection whose server waits 300 ms in
/// CLOSE_WAIT, a connection the server resets (SO_LINGER 0), and a refused connect.
struct Traffic {
    slow_port: u16,
    reset_port: u16,
    refused_port: u16,
    slow_listener: TcpListener,
    reset_listener: TcpListener,
}

impl Traffic {
    fn prepare() -> Traffic {
        let slow_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let reset_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        Traffic {
            slow_port: slow_listener.local_addr().unwrap().port(),
            reset_port: reset_listener.local_addr().unwrap().port(),
            refused_port: free_port(),
            slow_listener,
            reset_listener,
        }
    }

    fn port_args(&self) -> Vec<String> {
        [self.slow_port, self.reset_port, self.refused_port]
            .iter()
            .flat_map(|p| ["--port".to_owned(), p.to_string()])
            .collect()
    }

    /// Returns the client ports of the slow and reset connections.
    fn run(self) -> (u16, u16) {
        let Traffic { slow_port, reset_port, refused_port, slow_listener, reset_listener } = self;
        let slow = thread::spawn(move || {
            let (mut conn, _) = slow_listener.accept().unwrap();
            let mut buf = Vec::new();
            conn.read_to_end(&mut buf).unwrap();
            thread::sleep(Duration::from_millis(300));
        });
        let mut client = TcpStream::connect(("127.0.0.1", slow_port)).unwrap();
        let slow_client_port = client.local_addr().unwrap().port();
        client.write_all(b"hello").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut buf = Vec::new();
        client.read_to_end(&mut buf).unwrap();
        drop(client);
        slow.join().unwrap();

        let reset = thread::spawn(move || {
            let (mut conn, _) = reset_listener.accept().unwrap();
            let mut byte = [0u8; 1];
            conn.read_exact(&mut byte).unwrap();
            set_linger_zero(&conn);
        });
        let mut client = TcpStream::connect(("127.0.0.1", reset_port)).unwrap();
        let reset_client_port = client.local_addr().unwrap().port();
        client.write_all(b"x").unwrap();
        reset.join().unwrap();
        let err = client.read_to_end(&mut buf).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
        drop(client);

        let err = TcpStream::connect(("127.0.0.1", refused_port)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        (slow_client_port, reset_client_port)
    }
}

fn us(value: &Value, field: &str) -> u64 {
    value[field].as_u64().unwrap_or_else(|| panic!("{field} missing in {value}"))
}

fn check_records(
    lines: &[String],
    slow_port: u16,
    reset_port: u16,
    refused_port: u16,
    clients: (u16, u16),
) {
    let records: Vec<Value> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 5, "{lines:#?}");
    assert!(records.iter().all(|r| r["type"] == "connection"), "{lines:#?}");
    let find = |local: u16, remote: u16| {
        records
            .iter()
            .find(|r| r["local_port"] == local && r["remote_port"] == remote)
            .unwrap_or_else(|| panic!("no record {local} -> {remote} in {lines:#?}"))
    };
    let ms = 1_000;

    // Slow close: the client sent the first FIN; the server sat 300 ms in CLOSE_WAIT.
    let client = find(clients.0, slow_port);
    assert_eq!(client["side"], "active");
    assert_eq!(client["outcome"], "fin");
    assert_eq!(client["event"], "closed");
    assert_eq!(client["pid"], std::process::id());
    assert!(us(client, "handshake_us") < 25 * ms, "{client}");
    assert!((300 * ms..450 * ms).contains(&us(client, "teardown_us")), "{client}");
    assert_eq!(client["teardown_side"], "active");
    let server = find(slow_port, clients.0);
    assert_eq!(server["side"], "passive");
    assert_eq!(server["outcome"], "fin");
    assert_eq!(server["pid"], std::process::id(), "accepted connections belong to the listener");
    assert!((300 * ms..450 * ms).contains(&us(server, "close_wait_us")), "{server}");
    assert!((300 * ms..450 * ms).contains(&us(server, "teardown_us")), "{server}");
    assert!((300 * ms..450 * ms).contains(&us(server, "lifetime_us")), "{server}");
    // Passive handshake: the SYN-ACK's RTT sample on loopback, no retries.
    assert!(us(server, "handshake_us") < 25 * ms, "{server}");
    assert_eq!(server["handshake_retransmits"], 0);
    assert_eq!(client["handshake_retransmits"], 0);

    // SO_LINGER 0: the server aborted, the client saw a reset.
    assert_eq!(find(reset_port, clients.1)["outcome"], "abort");
    assert_eq!(find(clients.1, reset_port)["outcome"], "reset_received");

    let refused =
        records.iter().find(|r| r["remote_port"] == refused_port).expect("refused record");
    assert_eq!(refused["event"], "failed");
    assert_eq!(refused["outcome"], "refused");
    assert_eq!(refused["side"], "active");
    assert_eq!(refused["family"], "ipv4");
}

#[test]
fn tail_json_through_the_daemon_shows_exactly_our_connections() {
    let _host = common::exclusive();
    if !kernel_tests_enabled() {
        return;
    }
    let mut daemon = Daemon::start(&[]);
    let traffic = Traffic::prepare();
    let ports = (traffic.slow_port, traffic.reset_port, traffic.refused_port);
    let mut args = vec!["--json".to_owned(), "--count".to_owned(), "5".to_owned()];
    args.extend(traffic.port_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let tail = Tail::start(&daemon.tail_socket, &args, "following the daemon");
    // A second tail at the same time, on the events view of the slow connection only: its 10
    // transitions (the listener's own close may follow; --count stops before it).
    let slow = ports.0.to_string();
    let events = Tail::start(
        &daemon.tail_socket,
        &["--events", "--json", "--port", &slow, "--count", "10"],
        "following the daemon",
    );
    // And a scrape while both are attached.
    assert_eq!(daemon.scrape()["tcpmon_tail_clients"], 2.0);
    let clients = traffic.run();
    check_records(&tail.finish(), ports.0, ports.1, ports.2, clients);

    let transitions: Vec<Value> =
        events.finish().iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let pairs: Vec<(String, String)> = transitions
        .iter()
        .map(|t| (t["old_state"].as_str().unwrap().into(), t["new_state"].as_str().unwrap().into()))
        .collect();
    for expected in [
        ("CLOSE", "SYN_SENT"),
        ("SYN_SENT", "ESTABLISHED"),
        ("LISTEN", "SYN_RECV"),
        ("SYN_RECV", "ESTABLISHED"),
        ("ESTABLISHED", "FIN_WAIT1"),
        ("ESTABLISHED", "CLOSE_WAIT"),
        ("CLOSE_WAIT", "LAST_ACK"),
        ("LAST_ACK", "CLOSE"),
    ] {
        let expected = (expected.0.to_owned(), expected.1.to_owned());
        assert!(pairs.contains(&expected), "{expected:?} missing from {pairs:?}");
    }
    assert_eq!(transitions.len(), 10);
    // The server sat 300 ms in CLOSE_WAIT, and the events view says so.
    let close_wait = transitions.iter().find(|t| t["old_state"] == "CLOSE_WAIT").unwrap();
    assert!((300_000..450_000).contains(&us(close_wait, "in_old_state_us")), "{close_wait}");
}

#[test]
fn tail_json_stand_alone_shows_exactly_our_connections() {
    let _host = common::exclusive();
    if !kernel_tests_enabled() {
        return;
    }
    let traffic = Traffic::prepare();
    let ports = (traffic.slow_port, traffic.reset_port, traffic.refused_port);
    let mut args = vec!["--json".to_owned(), "--count".to_owned(), "5".to_owned()];
    args.extend(traffic.port_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let tail = Tail::start(&unique_socket_path(), &args, "stand-alone: attached");
    let clients = traffic.run();
    check_records(&tail.finish(), ports.0, ports.1, ports.2, clients);
}

#[test]
fn a_client_that_never_reads_neither_stalls_the_daemon_nor_misses_silently() {
    let _host = common::exclusive();
    if !kernel_tests_enabled() {
        return;
    }
    let mut daemon = Daemon::start(&[]);
    // Only our own port, so other traffic on the host cannot add to what it misses.
    let listener = listener_with_deep_backlog();
    let port = listener.local_addr().unwrap().port();
    let mut stuck = UnixStream::connect(&daemon.tail_socket).unwrap();
    let request =
        format!("{{\"version\":1,\"view\":\"events\",\"filter\":{{\"ports\":[{port}]}}}}\n");
    stuck.write_all(request.as_bytes()).unwrap();
    let mut reader = BufReader::new(stuck.try_clone().unwrap());
    let mut hello = String::new();
    reader.read_line(&mut hello).unwrap();
    assert!(hello.contains("\"hello\""), "{hello}");

    let before = daemon.settled_scrape();
    const N: usize = 2000; // ~20k transitions: far more than the client's queue and socket
    churn_on(listener, N, 1);
    let after = daemon.settled_scrape();
    assert_eq!(
        delta(&before, &after, "tcpmon_connections_opened_total{side=\"active\"}"),
        N as f64
    );
    assert_eq!(after["tcpmon_events_lost_total"], 0.0);
    let dropped = delta(&before, &after, "tcpmon_tail_records_dropped_total");
    assert!(dropped > 0.0, "the stuck client should have overflowed its queue");

    // Reading again, the client is told how many records it missed as soon as there is room
    // (no further traffic needed), and the count is exactly what the daemon dropped.
    stuck.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let reader_thread = thread::spawn(move || {
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return None;
            }
            if line.contains("\"missed\"") {
                return Some(line);
            }
        }
    });
    let missed = reader_thread.join().unwrap().expect("a missed notice");
    let missed: Value = serde_json::from_str(&missed).unwrap();
    assert_eq!(missed["records"].as_f64().unwrap(), dropped);
    let (status, stderr, _) = daemon.stop();
    assert!(status.success(), "{stderr}");
}

#[test]
fn tail_exits_quietly_when_its_reader_goes_away() {
    let _host = common::exclusive();
    if !kernel_tests_enabled() {
        return;
    }
    let daemon = Daemon::start(&[]);
    let mut tail = Tail::start(&daemon.tail_socket, &["--events"], "following the daemon");
    let mut stdout = BufReader::new(tail.child.stdout.take().unwrap());
    churn_on(listener_with_deep_backlog(), 3, 1);
    let mut lines = Vec::new();
    for _ in 0..3 {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        lines.push(line);
    }
    assert!(lines[0].starts_with("TIME(UTC)"), "{lines:?}");
    drop(stdout); // like `| head -3`
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        churn_on(listener_with_deep_backlog(), 3, 1);
        if let Some(status) = tail.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "tail did not exit after its stdout closed");
        thread::sleep(Duration::from_millis(50));
    };
    thread::sleep(Duration::from_millis(100));
    let stderr: Vec<String> = tail.stderr.try_iter().collect();
    assert!(status.success(), "{status}: {stderr:?}");
    assert!(stderr.iter().all(|l| !l.contains("panick") && !l.contains("error")), "{stderr:?}");
}

#[test]
fn a_bad_filter_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_tcpmon"))
        .args(["tail", "--addr", "10.0.0.0/33"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not an address or CIDR"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn records_drained_at_shutdown_still_reach_the_tail() {
    let _host = common::exclusive();
    if !kernel_tests_enabled() {
        return;
    }
    // Drain only every 10 s: the connection's records wait in the ring until SIGTERM makes the
    // daemon drain them one last time. (The daemon then also waits for tail writers to flush;
    // without that wait they usually, not always, win the race against process exit, which
    // this test cannot force either way.)
    let daemon = Daemon::start(&["--drain-interval", "10s"]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let tail =
        Tail::start(&daemon.tail_socket, &["--json", "--port", &port], "following the daemon");
    let server = thread::spawn(move || drop(listener.accept().unwrap()));
    drop(TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).unwrap());
    server.join().unwrap();
    thread::sleep(Duration::from_millis(200)); // both ends closed; nothing drained yet
    let (status, stderr, _) = daemon.stop();
    assert!(status.success(), "{stderr}");
    let mut tail = tail;
    let mut out = String::new();
    tail.child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let records: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 2, "both ends of the connection: {out}");
    assert!(records.iter().all(|r| r["type"] == "connection" && r["event"] == "closed"), "{out}");
}

#[test]
fn past_32_tail_clients_the_next_is_told_so_and_the_others_keep_their_records() {
    let _host = common::shared(); // its own port only
    if !kernel_tests_enabled() {
        return;
    }
    let daemon = Daemon::start(&[]);
    let listener = common::listener_with_deep_backlog();
    let port = listener.local_addr().unwrap().port();
    let request =
        format!("{{\"version\":1,\"view\":\"events\",\"filter\":{{\"ports\":[{port}]}}}}\n");
    let connect = || {
        let mut client = UnixStream::connect(&daemon.tail_socket).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        client.write_all(request.as_bytes()).unwrap();
        let mut reader = BufReader::new(client);
        let mut first = String::new();
        reader.read_line(&mut first).unwrap();
        (reader, first)
    };
    let mut clients = Vec::new();
    for _ in 0..32 {
        let (reader, hello) = connect();
        assert!(hello.contains("\"hello\""), "{hello}");
        clients.push(reader);
    }
    let (_, refused) = connect();
    assert!(refused.contains("\"error\"") && refused.contains("32 tail clients"), "{refused}");
    // The 32 still get their records: one connection's transitions reach the first client.
    common::churn_on(listener, 1, 1);
    let mut line = String::new();
    clients[0].read_line(&mut line).unwrap();
    assert!(line.contains(&format!(":{port}")) || line.contains(&port.to_string()), "{line}");
    // One leaves: there is room again.
    drop(clients.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, answer) = connect();
        if answer.contains("\"hello\"") {
            break;
        }
        assert!(Instant::now() < deadline, "no room after a client left: {answer}");
        thread::sleep(Duration::from_millis(50));
    }
}
