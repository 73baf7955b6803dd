//! Kernel integration tests of attribution: real processes in real cgroup2 directories (a
//! systemd-style unit and a fake Kubernetes pod), real loopback connections between them,
//! and the `port` and `workload` of every metric and tail record. Needs root, like
//! tests/kernel.rs.
//!
//! A process joins a cgroup by writing its pid to `cgroup.procs`, and a socket belongs to
//! the cgroup of the process that creates it; the test's own threads share one process, so
//! each server and client is this test binary run again as a helper process
//! ([`helper_process`]) that moves itself into its cgroup first.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{in_bucket, kernel_tests_enabled, server_port, Daemon, Metrics, Tail};
use serde_json::Value;

/// The role a helper process plays, from its environment: `serve PORT COUNT WAIT_MS` (accept
/// COUNT connections, read each to EOF, wait WAIT_MS in CLOSE_WAIT, close) or `connect PORT COUNT` (connect and
/// close at once, COUNT times; a refused connect is fine).
const ROLE: &str = "TCPMON_TEST_ROLE";
/// The cgroup directory the helper moves into before anything else.
const CGROUP: &str = "TCPMON_TEST_CGROUP";

/// Not a test of its own: the body of the helper processes (returns at once otherwise).
#[test]
fn helper_process() {
    let Ok(role) = std::env::var(ROLE) else { return };
    if let Ok(cgroup) = std::env::var(CGROUP) {
        std::fs::write(Path::new(&cgroup).join("cgroup.procs"), "0").expect("joining the cgroup");
    }
    let words: Vec<&str> = role.split(' ').collect();
    let number = |at: usize| words[at].parse::<u64>().unwrap();
    match words[0] {
        "serve" => {
            let listener = TcpListener::bind(("127.0.0.1", number(1) as u16)).unwrap();
            println!("listening");
            // One thread per connection, so each waits its own time in CLOSE_WAIT.
            let wait = Duration::from_millis(number(3));
            let handlers: Vec<_> = (0..number(2))
                .map(|_| {
                    let (mut connection, _) = listener.accept().unwrap();
                    std::thread::spawn(move || {
                        let mut rest = Vec::new();
                        connection.read_to_end(&mut rest).unwrap();
                        std::thread::sleep(wait);
                    })
                })
                .collect();
            handlers.into_iter().for_each(|handler| handler.join().unwrap());
        }
        "connect" => {
            for _ in 0..number(2) {
                drop(TcpStream::connect(("127.0.0.1", number(1) as u16)));
            }
        }
        other => panic!("unknown role {other}"),
    }
}

/// Runs this test binary as a helper in `cgroup`; a server returns once it listens.
fn helper(cgroup: &Path, role: &str) -> Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper_process", "--nocapture", "--test-threads", "1"])
        .env(ROLE, role)
        .env(CGROUP, cgroup)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The harness writes to stdout too ("test helper_process ... ok"): read all of it, so
    // it never meets a closed pipe, and tell when a server listens.
    let (listening, ready) = std::sync::mpsc::channel();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if line.ends_with("listening") {
                let _ = listening.send(());
            }
        }
    });
    if role.starts_with("serve") {
        let listened = ready.recv_timeout(Duration::from_secs(30));
        assert!(listened.is_ok(), "the server never listened");
    }
    child
}

fn finish(mut child: Child) {
    assert!(child.wait().unwrap().success());
}

/// Test cgroups under the machine's cgroup2 mount, and a fake kubelet pod-log directory;
/// removed on drop (after their processes ended).
struct Cgroups {
    root: PathBuf,
    pod_logs: PathBuf,
    /// `tcpmon-test-<pid>.slice/web.service`
    web: PathBuf,
    /// `…/kubepods.slice/kubepods-pod<uid>.slice/cri-containerd-<64 hex>.scope`
    pod: PathBuf,
    /// Its name, as the pod-log directory tells it.
    pod_name: String,
}

impl Cgroups {
    fn new(tag: &str) -> Cgroups {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mount = monitor::naming::workload::cgroup2_mount(&mountinfo).expect("a cgroup2 mount");
        let id = format!("{:08x}", std::process::id());
        let root = mount.join(format!("tcpmon-test-{id}-{tag}.slice"));
        let uid = format!("{id}-7e57-4c9a-8d2e-0123456789ab");
        let container = format!("{id}{}", "c0ffee".repeat(10)).chars().take(64).collect::<String>();
        let pod = root
            .join("kubepods.slice")
            .join(format!("kubepods-pod{}.slice", uid.replace('-', "_")))
            .join(format!("cri-containerd-{container}.scope"));
        let web = root.join("web.service");
        for directory in [&web, &pod] {
            std::fs::create_dir_all(directory).unwrap();
        }
        let pod_logs = std::env::temp_dir().join(format!("tcpmon-pods-{id}-{tag}"));
        std::fs::create_dir_all(pod_logs.join(format!("shop_web-7d9f_{uid}"))).unwrap();
        Cgroups { root, pod_logs, web, pod, pod_name: "shop/web-7d9f".into() }
    }

    /// A cgroup of its own under the test's root.
    fn unit(&self, name: &str) -> PathBuf {
        let path = self.root.join(name);
        std::fs::create_dir_all(&path).unwrap();
        path
    }

    fn id(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().ino()
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        // Children first: a cgroup directory is removed with rmdir, and only when empty.
        let mut directories = Vec::new();
        let mut pending = vec![self.root.clone()];
        while let Some(directory) = pending.pop() {
            for entry in std::fs::read_dir(&directory).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    pending.push(entry.path());
                }
            }
            directories.push(directory);
        }
        for directory in directories.iter().rev() {
            let _ = std::fs::remove_dir(directory);
        }
        let _ = std::fs::remove_dir_all(&self.pod_logs);
    }
}

fn series(name: &str, labels: &[(&str, &str)]) -> String {
    let mut sorted: Vec<_> = labels.to_vec();
    sorted.sort();
    let labels: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", labels.join(","))
}

fn value(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.get(&series(name, labels)).copied().unwrap_or(0.0)
}

#[test]
fn ports_and_workloads_label_real_traffic_in_real_cgroups() {
    let _host = common::exclusive();
    if !kernel_tests_enabled() {
        return;
    }
    for hook in ["btf", "tracepoint"] {
        let cgroups = Cgroups::new(hook);
        let (web_port, pod_port) = (server_port(), server_port());
        let pods = cgroups.pod_logs.to_str().unwrap();
        let pinned = format!("{web_port},{pod_port}");
        let mut daemon = Daemon::start(&["--hook", hook, "--pod-logs", pods, "--ports", &pinned]);
        let before = daemon.settled_scrape();
        let web_tail = Tail::start(
            &daemon.tail_socket,
            &["--json", "--count", "6", "--port", &web_port.to_string()],
            "following the daemon",
        );
        let pod_tail = Tail::start(
            &daemon.tail_socket,
            &["--json", "--count", "5", "--workload", "shop/*"],
            "following the daemon",
        );

        // web.service serves 3 connections from the pod, holding each 300 ms in CLOSE_WAIT;
        // the pod serves 2 from web.service, 150 ms each.
        let web_server = helper(&cgroups.web, &format!("serve {web_port} 3 300"));
        let pod_server = helper(&cgroups.pod, &format!("serve {pod_port} 2 150"));
        assert_eq!(
            monitor::naming::workload::cgroup_id_of(
                cgroups.root.parent().unwrap(),
                web_server.id()
            ),
            Cgroups::id(&cgroups.web),
            "the snapshot reads a process's cgroup as the kernel names it"
        );
        let pod_client = helper(&cgroups.pod, &format!("connect {web_port} 3"));
        let web_client = helper(&cgroups.web, &format!("connect {pod_port} 2"));
        for child in [pod_client, web_client, web_server, pod_server] {
            finish(child);
        }
        let after = daemon.settled_scrape();

        let web = ("workload", "web.service");
        let pod = ("workload", cgroups.pod_name.as_str());
        let (web_port, pod_port) = (web_port.to_string(), pod_port.to_string());
        let (on_web, on_pod) = (("port", web_port.as_str()), ("port", pod_port.as_str()));
        let opened = |side: &str, port, workload| {
            let labels = [("side", side), port, workload];
            value(&after, "tcpmon_connections_opened_total", &labels)
                - value(&before, "tcpmon_connections_opened_total", &labels)
        };
        assert_eq!(opened("passive", on_web, web), 3.0, "{hook}");
        assert_eq!(opened("active", on_web, pod), 3.0, "{hook}");
        assert_eq!(opened("passive", on_pod, pod), 2.0, "{hook}");
        assert_eq!(opened("active", on_pod, web), 2.0, "{hook}");
        assert_eq!(opened("passive", on_web, pod), 0.0, "{hook}");
        let closed = |side: &str, port, workload| {
            value(
                &after,
                "tcpmon_connections_closed_total",
                &[("side", side), ("reason", "fin"), port, workload],
            )
        };
        assert_eq!(
            (closed("passive", on_web, web), closed("active", on_web, pod)),
            (3.0, 3.0),
            "{hook}"
        );
        assert_eq!(
            (closed("passive", on_pod, pod), closed("active", on_pod, web)),
            (2.0, 2.0),
            "{hook}"
        );
        let close_wait = |port: (&str, &str), workload: (&str, &str), low, high| {
            let labels = format!("{}=\"{}\",{}=\"{}\"", port.0, port.1, workload.0, workload.1);
            in_bucket(&before, &after, "tcpmon_close_wait_duration_seconds", &labels, low, high)
        };
        assert_eq!(close_wait(on_web, web, "0.25", "0.5"), 3.0, "{hook}: 300 ms in CLOSE_WAIT");
        assert_eq!(close_wait(on_pod, pod, "0.1", "0.25"), 2.0, "{hook}: 150 ms in CLOSE_WAIT");
        let handshakes = |side: &str, port: (&str, &str), workload: (&str, &str)| {
            let labels = format!(
                "{}=\"{}\",side=\"{side}\",{}=\"{}\"",
                port.0, port.1, workload.0, workload.1
            );
            in_bucket(&before, &after, "tcpmon_handshake_duration_seconds", &labels, "0", "0.005")
        };
        assert_eq!(handshakes("active", on_web, pod), 3.0, "{hook}: loopback handshakes");
        assert_eq!(handshakes("passive", on_web, web), 3.0, "{hook}");
        // The gauge exists once a socket entered CLOSE_WAIT, and is back at 0.
        let gauge = series("tcpmon_close_wait_sockets", &[on_web, web]);
        assert_eq!(after.get(&gauge), Some(&0.0), "{hook}: every CLOSE_WAIT ended");

        // The tail: both sides of the web service's connections, each with its workload.
        let records = |tail: Tail| -> Vec<Value> {
            tail.finish().iter().map(|l| serde_json::from_str(l).unwrap()).collect()
        };
        let mut seen = BTreeMap::new();
        for record in records(web_tail) {
            let key = (
                record["side"].as_str().unwrap().to_owned(),
                record["workload"].as_str().unwrap().to_owned(),
            );
            *seen.entry(key).or_insert(0) += 1;
            let expected = if record["side"] == "passive" { &cgroups.web } else { &cgroups.pod };
            assert_eq!(record["cgroup_id"], Cgroups::id(expected), "{hook}: {record}");
        }
        let expected = BTreeMap::from([
            (("active".to_owned(), cgroups.pod_name.clone()), 3),
            (("passive".to_owned(), "web.service".to_owned()), 3),
        ]);
        assert_eq!(seen, expected, "{hook}");
        let pod_records = records(pod_tail);
        assert!(pod_records.iter().all(|r| r["workload"] == cgroups.pod_name.as_str()), "{hook}");
        let sides: Vec<(&str, u64)> = pod_records
            .iter()
            .map(|r| {
                (
                    r["side"].as_str().unwrap(),
                    if r["side"] == "active" {
                        r["remote_port"].as_u64().unwrap()
                    } else {
                        r["local_port"].as_u64().unwrap()
                    },
                )
            })
            .collect();
        let to_web = sides
            .iter()
            .filter(|(side, port)| *side == "active" && port.to_string() == web_port)
            .count();
        let on_own = sides
            .iter()
            .filter(|(side, port)| *side == "passive" && port.to_string() == pod_port)
            .count();
        assert_eq!((to_web, on_own), (3, 2), "{hook}: {sides:?}");
        drop(daemon);
    }
}

/// A listener started before the daemon: its accepted connections carry its workload. On
/// this kernel the child's own record carries the cgroup it copied from the listener, so this
/// holds even without the snapshot; the snapshot's fallback (the owner's cgroup from
/// `/proc/PID/cgroup`, for kernels whose records carry none) is the tracker's unit test
/// `sockets_from_the_snapshot_keep_their_owners_cgroup_when_records_carry_none`, and the
/// snapshot's reading of `/proc/PID/cgroup` is checked in the test above.
#[test]
fn a_listener_older_than_the_daemon_keeps_its_workload() {
    let _host = common::exclusive();
    if !kernel_tests_enabled() {
        return;
    }
    let cgroups = Cgroups::new("snapshot");
    let db = cgroups.unit("db.service");
    let port = server_port();
    let server = helper(&db, &format!("serve {port} 2 0"));
    let mut daemon = Daemon::start(&[]);
    let tail = Tail::start(
        &daemon.tail_socket,
        &["--json", "--count", "2", "--lport", &port.to_string()],
        "following the daemon",
    );
    for _ in 0..2 {
        drop(TcpStream::connect(("127.0.0.1", port)).unwrap());
    }
    finish(server);
    let after = daemon.settled_scrape();
    let port_label = port.to_string();
    let labels = [("side", "passive"), ("port", port_label.as_str()), ("workload", "db.service")];
    assert_eq!(value(&after, "tcpmon_connections_opened_total", &labels), 2.0);
    for record in tail.finish() {
        let record: Value = serde_json::from_str(&record).unwrap();
        assert_eq!(
            (record["workload"].as_str(), record["side"].as_str()),
            (Some("db.service"), Some("passive"))
        );
        assert_eq!(record["cgroup_id"], Cgroups::id(&db));
    }
}

#[test]
fn ports_and_workloads_beyond_their_caps_share_other_and_are_counted() {
    let _host = common::exclusive();
    if !kernel_tests_enabled() {
        return;
    }
    const CAP: usize = 2;
    let cgroups = Cgroups::new("caps");
    // Three workloads, each listening on two ports: six listeners, three workloads, for
    // caps of two. The host's own listeners and workloads (from the start-up snapshot, and
    // the test's scrapes) may take values first: whichever of ours come later share
    // `other`, so the test checks what the daemon says it gave out.
    let units: Vec<PathBuf> =
        ["a.service", "b.service", "c.service"].iter().map(|u| cgroups.unit(u)).collect();
    let cap = CAP.to_string();
    let mut daemon = Daemon::start(&["--port-labels", &cap, "--workload-labels", &cap]);
    let before = daemon.settled_scrape();
    let mut expected = Vec::new(); // (port, workload, connections), in the order first seen
    for (index, unit) in units.iter().enumerate() {
        for copy in 0..2 {
            let port = server_port();
            let connections = 1 + index * 2 + copy;
            let server = helper(unit, &format!("serve {port} {connections} 0"));
            for _ in 0..connections {
                drop(TcpStream::connect(("127.0.0.1", port)).unwrap());
            }
            finish(server);
            let name = unit.file_name().unwrap().to_str().unwrap().to_owned();
            expected.push((port.to_string(), name, connections as f64));
        }
    }
    let after = daemon.settled_scrape();
    let label = |m: &Metrics, name: &str, label: &str| value(m, name, &[("label", label)]);
    // Six ports for two listening values and two remote ones (a connect to a port without
    // a value gives it one from the remote side): both sides are full.
    assert_eq!(label(&after, "tcpmon_label_values", "port") as usize, 2 * CAP, "both sides full");
    assert_eq!(label(&after, "tcpmon_label_values", "workload") as usize, CAP, "exactly the cap");

    // Every connection of ours is counted once: under its own port and workload if they
    // got values, else under `other`; the passive opens under `other` are ours alone (the
    // host accepts nothing meanwhile).
    let passive = |m: &Metrics, port: &str, workload: &str| {
        value(
            m,
            "tcpmon_connections_opened_total",
            &[("side", "passive"), ("port", port), ("workload", workload)],
        )
    };
    let known_port = |port: &str| after.keys().any(|k| k.contains(&format!("port=\"{port}\"")));
    let known_workload = |w: &str| after.keys().any(|k| k.contains(&format!("workload=\"{w}\"")));
    let mut lumped = 0.0;
    let mut own_ports = 0;
    for (port, workload, connections) in &expected {
        let (port_value, workload_value) = (
            if known_port(port) { port.as_str() } else { "other" },
            if known_workload(workload) { workload.as_str() } else { "other" },
        );
        if port_value == "other" || workload_value == "other" {
            lumped += connections;
        } else {
            own_ports += 1;
            assert_eq!(
                passive(&after, port_value, workload_value),
                *connections,
                "{port} {workload}"
            );
        }
    }
    assert!(own_ports < expected.len(), "some of our six ports went past the cap");
    let other_delta: f64 = after
        .iter()
        .filter(|(k, _)| {
            k.starts_with("tcpmon_connections_opened_total{")
                && k.contains("side=\"passive\"")
                && (k.contains("port=\"other\"") || k.contains("workload=\"other\""))
        })
        .map(|(k, v)| v - before.get(k).copied().unwrap_or(0.0))
        .sum();
    assert_eq!(other_delta, lumped, "ours beyond the caps, each counted once under other");
    let overflow = |m: &Metrics| {
        label(m, "tcpmon_label_overflow_total", "port")
            + label(m, "tcpmon_label_overflow_total", "workload")
    };
    assert!(overflow(&after) - overflow(&before) >= 1.0, "the overflow is counted");
}

/// Moves this whole test process into cgroup directory `cgroup`: sockets it creates from now
/// on belong there. (Every thread moves: only tests that run alone may do it.)
fn move_into(cgroup: &Path) {
    std::fs::write(cgroup.join("cgroup.procs"), "0").expect("moving into the cgroup");
}

#[test]
fn a_burst_of_new_cgroups_loses_nothing_and_names_every_connection_even_short_lived_ones() {
    let _host = common::exclusive();
    if !kernel_tests_enabled() {
        return;
    }
    const BURST: usize = 1000;
    let cgroups = Cgroups::new("burst");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mount = monitor::naming::workload::cgroup2_mount(&mountinfo).unwrap();
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let own = mount
        .join(own.lines().find_map(|l| l.strip_prefix("0::")).unwrap().trim_start_matches('/'));
    // Room for a value per workload and pair: each connection must be named, not lumped.
    let mut daemon = Daemon::start(&[
        "--workload-labels",
        "2000",
        "--label-pairs",
        "4000",
        "--drain-interval",
        "100ms",
    ]);
    let listener = common::listener_with_deep_backlog();
    let port = listener.local_addr().unwrap().port();
    let acceptor = std::thread::spawn(move || {
        for _ in 0..=BURST {
            drop(listener.accept().unwrap());
        }
    });
    // /healthz answers throughout (its latency is reported, not asserted: a noisy machine).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let metrics = daemon.metrics_address().port();
    let prober = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut slowest = Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = std::time::Instant::now();
                assert!(common::http_get(metrics, "/healthz").is_some(), "/healthz failed");
                slowest = slowest.max(started.elapsed());
                std::thread::sleep(Duration::from_millis(10));
            }
            slowest
        })
    };

    // A new cgroup for each connection, one after the other, as fast as they come.
    for index in 0..BURST {
        move_into(&cgroups.unit(&format!("burst-{index}.service")));
        drop(TcpStream::connect(("127.0.0.1", port)).unwrap());
    }
    // One that lives 200 ms after its connection, then is removed.
    let short = cgroups.unit("short.service");
    move_into(&short);
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    move_into(&own);
    std::thread::sleep(Duration::from_millis(200));
    std::fs::remove_dir(&short).expect("removing the short-lived cgroup");
    drop(client);
    acceptor.join().unwrap();

    let on_port = format!("port=\"{port}\"");
    let opened = |m: &Metrics, workload: &dyn Fn(&str) -> bool| -> f64 {
        m.iter()
            .filter(|(k, _)| {
                k.starts_with("tcpmon_connections_opened_total{")
                    && k.contains("side=\"active\"")
                    && k.contains(&on_port)
            })
            .filter(|(k, _)| {
                let value = k.split("workload=\"").nth(1).and_then(|v| v.split('"').next());
                value.is_some_and(workload)
            })
            .map(|(_, v)| v)
            .sum()
    };
    // Every connection counted, then the prober stopped, so that the count can settle.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while opened(&daemon.scrape(), &|_| true) < (BURST + 1) as f64 {
        assert!(std::time::Instant::now() < deadline, "the connections were never all counted");
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let slowest = prober.join().unwrap();
    println!("/healthz answered every probe; the slowest took {slowest:?}");
    let after = daemon.settled_scrape();

    assert_eq!(after["tcpmon_events_lost_total"], 0.0);
    let burst = opened(&after, &|w| w.starts_with("burst-") && w.ends_with(".service"));
    assert_eq!(burst, BURST as f64, "each burst connection under its own unit's name");
    assert_eq!(opened(&after, &|w| w == "unknown" || w == "other"), 0.0, "none unnamed");
    assert_eq!(opened(&after, &|w| w == "short.service"), 1.0, "the short-lived cgroup named");
    let (status, stderr, _) = daemon.stop();
    assert!(status.success(), "{stderr}");
}

#[test]
fn retired_values_come_back_for_new_workloads_and_a_long_lived_one_keeps_its_series() {
    let _host = common::exclusive();
    if !kernel_tests_enabled() {
        return;
    }
    let cgroups = Cgroups::new("retire");
    let mut daemon = Daemon::start(&["--workload-labels", "4", "--label-idle", "2s"]);
    let opened = |m: &Metrics, port: u16, workload: &str| {
        let port = port.to_string();
        let labels = [("side", "passive"), ("port", port.as_str()), ("workload", workload)];
        m.get(&series("tcpmon_connections_opened_total", &labels)).copied()
    };
    // The long-lived workload: a server that listens throughout and holds one connection.
    let steady = cgroups.unit("steady.service");
    let steady_port = server_port();
    let server = helper(&steady, &format!("serve {steady_port} 13 0"));
    let held = TcpStream::connect(("127.0.0.1", steady_port)).unwrap();
    for round in 0..12 {
        // A short-lived unit: it listens, takes one connection, ends, and its cgroup goes.
        let name = format!("job-{round}.service");
        let unit = cgroups.unit(&name);
        let port = server_port();
        let job = helper(&unit, &format!("serve {port} 1 0"));
        drop(TcpStream::connect(("127.0.0.1", port)).unwrap());
        finish(job);
        // Its cgroup lives on 300 ms after the connection (the bound for naming it).
        std::thread::sleep(Duration::from_millis(300));
        std::fs::remove_dir(&unit).unwrap();
        drop(TcpStream::connect(("127.0.0.1", steady_port)).unwrap());
        let m = daemon.settled_scrape();
        let ours: Vec<_> =
            m.keys().filter(|k| k.starts_with("tcpmon_connections_opened")).collect();
        assert_eq!(opened(&m, port, &name), Some(1.0), "{name} got values of its own: {ours:?}");
        // The long-lived one: the same series throughout, counting every connection.
        let expected = f64::from(round) + 2.0; // the held one and one per round
        assert_eq!(opened(&m, steady_port, "steady.service"), Some(expected), "round {round}");
        let workloads = value(&m, "tcpmon_label_values", &[("label", "workload")]);
        assert!(workloads <= 4.0, "{workloads} workload values for a cap of 4");
        // Idle for --label-idle with its cgroup gone: retired, its series removed.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while opened(&daemon.scrape(), port, &name).is_some() {
            assert!(std::time::Instant::now() < deadline, "{name} was never retired");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    drop(held);
    finish(server);
    let m = daemon.settled_scrape();
    assert_eq!(m["tcpmon_events_lost_total"], 0.0);
    let (status, stderr, _) = daemon.stop();
    assert!(status.success(), "{stderr}");
}
