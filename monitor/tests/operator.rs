//! The operator-facing CLI: `tcpmon check`, completions and man page, JSON logs, config files.

mod common;

use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{free_port, kernel_tests_enabled, unique_socket_path};

fn tcpmon() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tcpmon"))
}

#[test]
fn check_says_this_host_can_run_tcpmon_after_a_trial_load() {
    let _host = common::exclusive();
    if !kernel_tests_enabled() {
        return;
    }
    // Without tracefs, check warns and skips the trial load (it never mounts anything itself);
    // mount it the way `check` tells the user to, so every line can be checked.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    if !mounts.lines().any(|l| l.contains(" tracefs ")) {
        let before = tcpmon().arg("check").output().unwrap();
        let text = String::from_utf8_lossy(&before.stdout);
        assert!(before.status.success(), "{text}");
        assert!(
            text.lines().any(|l| l.starts_with("warn")
                && l.contains("tracefs")
                && l.contains("will mount it")),
            "{text}"
        );
        assert!(!text.contains("trial load"), "{text}");
        let mounted = Command::new("mount")
            .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
            .status()
            .unwrap();
        assert!(mounted.success());
    }
    let out = tcpmon().arg("check").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for line in ["kernel", "BTF", "capabilities", "tracefs", "tracepoint", "trial load"] {
        assert!(
            text.lines().any(|l| l.starts_with("ok") && l.contains(line)),
            "{line} not ok:\n{text}"
        );
    }
    assert!(text.contains("tcpmon can run here."), "{text}");
}

#[test]
fn check_tells_an_unprivileged_user_what_is_missing() {
    if !kernel_tests_enabled() {
        return;
    }
    let out = common::unprivileged_tcpmon().arg("check").output().expect("setpriv (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("FAIL")
            && l.contains("capabilities")
            && l.contains("run as root")),
        "{text}"
    );
    assert!(text.contains("cannot run here"), "{text}");
}

#[test]
fn completions_and_the_man_page_come_from_the_cli_definition() {
    for shell in ["bash", "zsh", "fish"] {
        let out = tcpmon().args(["completions", shell]).output().unwrap();
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success());
        for word in ["tail", "check", "ring-bytes", "min-handshake"] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
    let man = tcpmon().arg("man").output().unwrap();
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(man.status.success() && page.contains(".TH tcpmon 1"), "{page}");
    let version = tcpmon().arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("tcpmon {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let out = tcpmon()
        .args(["--log-format", "json", "run", "--listen", &taken.local_addr().unwrap().to_string()])
        .arg("--tail-socket")
        .arg(unique_socket_path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let error = lines.iter().find(|l| l["level"] == "ERROR").expect("an ERROR line");
    assert!(error["msg"].as_str().unwrap().contains("the address is in use"), "{error}");
    assert!(error["ts"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn a_bad_config_file_is_a_usage_error_naming_the_key() {
    let path = std::env::temp_dir().join(format!("tcpmon-bad-{}.toml", std::process::id()));
    std::fs::write(&path, "listen = \"127.0.0.1:9979\"\nring-byts = \"8MiB\"\n").unwrap();
    let out = tcpmon().args(["run", "--config"]).arg(&path).output().unwrap();
    std::fs::remove_file(&path).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("unknown key `ring-byts`"), "{stderr}");
}

#[test]
fn the_config_file_sets_what_flags_do_not() {
    let _host = common::exclusive();
    if !kernel_tests_enabled() {
        return;
    }
    let port = free_port();
    let socket = unique_socket_path();
    let path = std::env::temp_dir().join(format!("tcpmon-good-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:{port}\"\ntail-socket = {:?}\nlog-format = \"json\"\n",
            socket.display().to_string()
        ),
    )
    .unwrap();
    let mut daemon =
        tcpmon().args(["run", "--config"]).arg(&path).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(daemon.try_wait().unwrap().is_none(), "tcpmon exited");
        assert!(Instant::now() < deadline, "tcpmon did not listen on the configured port");
        thread::sleep(Duration::from_millis(50));
    }
    assert!(socket.exists(), "the configured tail socket");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let out = daemon.wait_with_output().unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.lines().all(|l| l.starts_with('{')), "log-format from the file: {stderr}");
}

#[test]
fn sighup_reloads_the_config_file_without_losing_counts() {
    let _host = common::exclusive();
    if !kernel_tests_enabled() {
        return;
    }
    let path = std::env::temp_dir().join(format!("tcpmon-hup-{}.toml", std::process::id()));
    std::fs::write(&path, "max-sockets = 1000\nlog-level = \"info\"\n").unwrap();
    let mut daemon = common::Daemon::start(&["--config", path.to_str().unwrap()]);
    let listener = common::listener_with_deep_backlog();
    common::churn_on(listener, 50, 2);
    let before = daemon.settled_scrape();
    let opened = "tcpmon_connections_opened_total{side=\"active\"}";
    assert!(before[opened] >= 50.0, "{before:?}\ndaemon log:\n{}", daemon.stderr_so_far());

    // Changes that apply at once, one that needs a restart, then a broken file.
    std::fs::write(&path, "max-sockets = 500\nlog-level = \"debug\"\nring-bytes = \"1MiB\"\n")
        .unwrap();
    daemon.signal(libc::SIGHUP);
    thread::sleep(Duration::from_secs(1));
    std::fs::write(&path, "max-sockets = \"many\"\n").unwrap();
    daemon.signal(libc::SIGHUP);
    thread::sleep(Duration::from_secs(1));

    let after = daemon.settled_scrape();
    assert!(after[opened] >= before[opened], "counts survive a reload");
    let (status, stderr, _) = daemon.stop();
    std::fs::remove_file(&path).unwrap();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("max sockets 1000 -> 500"), "{stderr}");
    assert!(stderr.contains("log level INFO -> DEBUG"), "{stderr}");
    assert!(
        stderr.contains("`ring-bytes` changed") && stderr.contains("takes effect at restart"),
        "{stderr}"
    );
    assert!(stderr.contains("keeping the running configuration"), "{stderr}");
    assert!(stderr.contains("`max-sockets`"), "the broken key is named: {stderr}");
}
