//! The Debian package's unit under a real systemd, as a user runs it: a Debian 12 system built
//! from Debian's packages (mmdebstrap, cached in `target/systemd`) booted with systemd as PID 1
//! in a container (systemd-nspawn: it boots on these machines' hybrid cgroups and needs no
//! KVM), the package installed with dpkg, then started, scraped, tailed, reloaded, stopped and
//! purged with systemctl and dpkg. Everything the unit's hardening forbids would fail here.
//! Needs root, like the other kernel tests.

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{kernel_tests_enabled, parse_metrics, Metrics, CAP_SYS_ADMIN};

/// What the container's system is made of: systemd and the tools a package's maintainer
/// scripts and `ExecReload=` use (procps: kill).
const PACKAGES: &str = "systemd,systemd-sysv,dbus,procps";
/// Where the package directory appears in the container.
const PACKAGE_DIR: &str = "/var/tmp/tcpmon-package";
/// The unit's `/metrics` address (its `TCPMON_LISTEN`), in the container's network namespace.
const METRICS_PORT: u16 = 9979;

fn workspace(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The package `cargo xtask test` built.
fn package() -> Option<PathBuf> {
    common::artefact("_amd64.deb")
}

fn output(command: &mut Command) -> (bool, String) {
    let out = command.output().unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The Debian 12 root, built once (~30 s) and kept: the container runs on a copy of it.
fn debian_root() -> PathBuf {
    let dir = workspace("target/systemd");
    let root = dir.join(format!("bookworm-{}", PACKAGES.replace(',', "-")));
    if root.join("usr/lib/systemd/systemd").exists() {
        return root;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let building = dir.join("building");
    let _ = std::fs::remove_dir_all(&building);
    let (ok, log) = output(
        Command::new("mmdebstrap")
            .args(["--variant=minbase", &format!("--include={PACKAGES}"), "bookworm"])
            .arg(&building),
    );
    assert!(ok, "mmdebstrap: {log}");
    std::fs::rename(&building, &root).unwrap();
    root
}

/// A booted container, powered off (and its copy of the root removed by nspawn) on drop.
struct Container {
    nspawn: Child,
    /// The container's PID 1, as the host numbers it.
    leader: u32,
}

impl Container {
    /// Boots a copy of `root` with its own network namespace (loopback only), the package
    /// directory read-only at [`PACKAGE_DIR`], and what loading BPF programs needs: CAP_BPF and
    /// CAP_PERFMON (nspawn keeps CAP_SYS_ADMIN by default) and the two system calls nspawn's
    /// own filter refuses.
    fn boot(root: &Path, packages: &Path) -> Container {
        let name = format!("tcpmon-test-{}", std::process::id());
        let nspawn = Command::new("systemd-nspawn")
            .arg(format!("--directory={}", root.display()))
            .args(["--ephemeral", "--boot", "--register=no", "--keep-unit", "--private-network"])
            .arg(format!("--machine={name}"))
            .args(["--console=passive", "--capability=CAP_BPF,CAP_PERFMON"])
            .arg("--system-call-filter=bpf perf_event_open")
            .arg(format!("--bind-ro={}:{PACKAGE_DIR}", packages.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting systemd-nspawn (Debian: systemd-container)");
        let mut container = Container { nspawn, leader: 0 };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = container.nspawn.try_wait() {
                let mut stderr = String::new();
                let _ = container.nspawn.stderr.take().unwrap().read_to_string(&mut stderr);
                panic!("systemd-nspawn exited ({status}): {stderr}");
            }
            let pid = container.nspawn.id();
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"));
            if let Some(leader) =
                children.ok().and_then(|c| c.split_whitespace().next()?.parse().ok())
            {
                container.leader = leader;
                let (_, state) = container.run(&["systemctl", "is-system-running"]);
                match state.trim() {
                    "running" => return container,
                    "degraded" => {
                        let (_, failed) = container.run(&["systemctl", "--failed", "--no-pager"]);
                        panic!("the container's systemd is degraded:\n{failed}");
                    }
                    _ => {}
                }
            }
            assert!(Instant::now() < deadline, "the container did not boot within 60 s");
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `args` in every namespace of the container, as its root.
    fn run(&self, args: &[&str]) -> (bool, String) {
        output(Command::new("nsenter").arg("-t").arg(self.leader.to_string()).arg("-a").args(args))
    }

    /// Runs `f` on a thread in the container's network namespace.
    fn in_network<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        common::in_netns_at(Path::new(&format!("/proc/{}/ns/net", self.leader)), f)
    }

    /// A path of the container's file system, from the host.
    fn path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{inside}", self.leader))
    }

    /// The unit's journal, every line (`-o cat`: the messages), or those at `priority` or
    /// above.
    fn journal(&self, priority: Option<&str>) -> String {
        let mut args = vec!["journalctl", "-u", "tcpmon", "--no-pager", "-q", "-o", "cat"];
        if let Some(priority) = priority {
            args.extend(["-p", priority]);
        }
        self.run(&args).1
    }

    /// `/metrics`, scraped from inside the container's network namespace.
    fn scrape(&self) -> Metrics {
        let body = self.in_network(|| common::http_get(METRICS_PORT, "/metrics"));
        parse_metrics(&body.expect("GET /metrics in the container"))
    }

    /// `ss -Htan` in the container's network namespace, counted by state.
    fn ss_count(&self, filter: &[&str]) -> usize {
        let (ok, text) = output(
            Command::new("nsenter")
                .args(["-t", &self.leader.to_string(), "-n", "ss", "-Htan"])
                .args(filter),
        );
        assert!(ok, "ss: {text}");
        text.lines().filter(|l| !l.trim().is_empty()).count()
    }

    /// The main process of the unit, as the container numbers it (read it under
    /// [`Container::path`]`("/proc")`).
    fn main_pid(&self) -> u32 {
        let (ok, pid) = self.run(&["systemctl", "show", "-p", "MainPID", "--value", "tcpmon"]);
        assert!(ok, "{pid}");
        pid.trim().parse().unwrap()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.leader != 0 {
            let _ = self.run(&["systemctl", "poweroff"]);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// The exposure `systemd-analyze security` gives the unit.
fn exposure(report: &str) -> f64 {
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level for tcpmon.service"))
        .unwrap_or_else(|| panic!("no overall exposure in:\n{report}"));
    line.split(':').nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn the_packaged_unit_runs_under_systemd_hardened_and_leaves_nothing_behind() {
    if !kernel_tests_enabled() {
        return;
    }
    let Some(deb) = package() else { return };
    let root = debian_root();
    let container = Container::boot(&root, deb.parent().unwrap());
    let deb_inside = format!("{PACKAGE_DIR}/{}", deb.file_name().unwrap().to_str().unwrap());

    // Sockets that exist before the daemon starts: a listener and one established connection.
    let (listener, _pair) = container.in_network(|| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (listener, (client, server))
    });

    // dpkg starts the unit (Type=notify: once the programs are attached).
    let before_start = common::bpf_program_ids();
    let (ok, log) = container.run(&["dpkg", "-i", &deb_inside]);
    assert!(ok, "dpkg -i: {log}");
    let (_, active) = container.run(&["systemctl", "is-active", "tcpmon"]);
    assert_eq!(active.trim(), "active", "journal:\n{}", container.journal(None));
    let ours = common::our_programs_since(&before_start);
    let (_, watchdog) = container.run(&[
        "systemctl",
        "show",
        "-p",
        "WatchdogTimestampMonotonic",
        "--value",
        "tcpmon",
    ]);
    assert_ne!(watchdog.trim(), "0", "the daemon never pinged the watchdog");
    let journal = container.journal(None);
    let warnings = container.journal(Some("warning"));
    assert!(warnings.trim().is_empty(), "warnings in the journal:\n{warnings}\n\nall:\n{journal}");
    assert!(journal.contains("start-up snapshot:"), "{journal}");

    // Least privilege: only the kernel reader keeps CAP_SYS_ADMIN.
    let main_pid = container.main_pid();
    let proc = container.path("/proc");
    common::assert_least_privilege(
        &common::thread_capabilities_in(&proc, main_pid),
        &[CAP_SYS_ADMIN],
    );

    // The snapshot read the sockets that were there before: the gauges equal ss.
    let snapshot = container.scrape();
    for (state, filter) in [("LISTEN", "listening"), ("ESTABLISHED", "established")] {
        let gauge = snapshot[&format!("tcpmon_connections{{state=\"{state}\"}}")];
        let ss = container.ss_count(&["state", filter]);
        assert_eq!(gauge as usize, ss, "{state}: tcpmon {gauge}, ss {ss}");
    }

    // TIME_WAIT, which only the kernel-state read sees (netlink and setns under the unit's
    // filters), equals ss within 1% (the gauge is read at most once a second).
    container.in_network(|| common::echo_exchanges(&listener, 300));
    thread::sleep(Duration::from_millis(1100));
    let metrics = container.scrape();
    let gauge = metrics["tcpmon_connections{state=\"TIME_WAIT\"}"];
    let ss = container.ss_count(&["state", "time-wait"]) as f64;
    assert!(ss >= 300.0, "ss shows {ss} TIME_WAIT sockets");
    assert!((gauge - ss).abs() <= ss * 0.01, "TIME_WAIT: tcpmon {gauge}, ss {ss}");
    assert_eq!(metrics["tcpmon_kernel_state_read_errors_total"], 0.0);
    assert_eq!(metrics["tcpmon_kernel_map_read_errors_total"], 0.0);
    assert_eq!(metrics["tcpmon_events_lost_total"], 0.0);

    // A tail through the unit's socket sees a new connection.
    let port = listener.local_addr().unwrap().port();
    let mut tail = Command::new("nsenter")
        .args(["-t", &container.leader.to_string(), "-a", "timeout", "20", "tcpmon", "tail"])
        .args(["--json", "--count", "1", "--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(tail.stderr.take().unwrap());
    let mut said = String::new();
    while !said.contains("following the daemon") {
        let mut line = String::new();
        let read = std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
        assert!(read > 0, "the tail ended before it followed the daemon: {said}");
        said.push_str(&line);
    }
    container.in_network(|| common::echo_exchanges(&listener, 1));
    let tail = tail.wait_with_output().unwrap();
    let record = String::from_utf8_lossy(&tail.stdout).into_owned();
    assert!(tail.status.success(), "tail: {record}{said}");
    let record: serde_json::Value = serde_json::from_str(record.trim()).unwrap();
    let ports = [&record["local_port"], &record["remote_port"]];
    assert!(ports.iter().any(|p| p.as_u64() == Some(u64::from(port))), "{record}");

    // `systemctl reload` re-reads the config file, and the journal says what changed.
    let config = container.path("/etc/tcpmon/tcpmon.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("log-level = \"debug\"\n");
    std::fs::write(&config, text).unwrap();
    let (ok, log) = container.run(&["systemctl", "reload", "tcpmon"]);
    assert!(ok, "systemctl reload: {log}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !container.journal(None).contains("log level INFO -> DEBUG") {
        assert!(
            Instant::now() < deadline,
            "no reload in the journal:\n{}",
            container.journal(None)
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(container.main_pid(), main_pid, "a reload is not a restart");
    common::assert_least_privilege(
        &common::thread_capabilities_in(&proc, main_pid),
        &[CAP_SYS_ADMIN],
    );

    // The hardening, as systemd rates it (systemd 252, Debian 12's).
    let (_, report) = container.run(&["systemd-analyze", "security", "--no-pager", "tcpmon"]);
    let rated = exposure(&report);
    assert!(rated <= 3.0, "exposure {rated}:\n{report}");
    println!("systemd-analyze security tcpmon: {rated}");

    // Stopped: exit 0 well within the timeout, and its programs are gone.
    let started = Instant::now();
    let (ok, log) = container.run(&["systemctl", "stop", "tcpmon"]);
    assert!(ok, "systemctl stop: {log}");
    assert!(started.elapsed() < Duration::from_secs(10), "stop took {:?}", started.elapsed());
    let (_, result) =
        container.run(&["systemctl", "show", "-p", "Result,ExecMainStatus", "tcpmon"]);
    assert!(result.contains("Result=success") && result.contains("ExecMainStatus=0"), "{result}");
    common::assert_unloaded(&ours, "after systemctl stop");
    let warnings = container.journal(Some("warning"));
    assert!(warnings.trim().is_empty(), "warnings in the journal:\n{warnings}");

    // Purged: nothing of it is left.
    let (ok, log) = container.run(&["dpkg", "--purge", "tcpmon"]);
    assert!(ok, "dpkg --purge: {log}");
    for path in [
        "/usr/bin/tcpmon",
        "/usr/lib/systemd/system/tcpmon.service",
        "/etc/tcpmon",
        "/etc/systemd/system/multi-user.target.wants/tcpmon.service",
        "/run/tcpmon",
    ] {
        assert!(!container.path(path).exists(), "{path} after purge");
    }
    let (known, _) = container.run(&["dpkg", "-s", "tcpmon"]);
    assert!(!known, "dpkg still knows tcpmon");
    let (loaded, _) = container.run(&["systemctl", "cat", "tcpmon"]);
    assert!(!loaded, "systemd still knows tcpmon");
}
