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
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    if !mounts.lines().any(|l| l.contains(" tracefs ")) {
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

/// `tcpmon check` in a mount namespace of its own without tracefs (wherever the host has it
/// mounted), whose mounts are shared (among its own: it is private to the host), so a mount
/// check made without a private namespace of its own would show here; as `capabilities` grants
/// (`setpriv` keeps root but bounds its capabilities, as `--cap-drop ALL --cap-add ...` does
/// in a container). Returns its exit status, its report, and whether tracefs got mounted.
fn check_without_tracefs(capabilities: &str) -> (Option<i32>, String, bool) {
    let script = format!(
        "for m in $(awk '$3 == \"tracefs\" {{ print $2 }}' /proc/self/mounts); do umount $m; done; \
         mount --make-rshared /; \
         setpriv --bounding-set=-all{capabilities} --inh-caps=-all {} check; status=$?; \
         grep -q ' tracefs ' /proc/self/mounts && echo MOUNTED; exit $status",
        env!("CARGO_BIN_EXE_tcpmon")
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mounted = text.lines().any(|l| l == "MOUNTED");
    (out.status.code(), text, mounted)
}

#[test]
fn without_tracefs_check_still_loads_the_program_and_agrees_with_run() {
    let _host = common::exclusive();
    if !kernel_tests_enabled() {
        return;
    }
    // Root: `run` would mount tracefs; check says so, and tries both builds as run would,
    // with tracefs mounted in a mount namespace of check's own: nothing stays mounted.
    let (code, text, mounted) = check_without_tracefs(",+all");
    assert_eq!(code, Some(0), "{text}");
    assert!(text.lines().any(|l| l.starts_with("warn") && l.contains("will mount it")), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("ok")
            && l.contains("trial load")
            && l.contains("btf build")
            && l.contains("SYN-ACK times: yes")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("ok") && l.contains("tracepoint build: loaded")),
        "{text}"
    );
    assert!(!mounted, "check mounted tracefs: {text}");
    // CAP_BPF and CAP_PERFMON only: tracefs cannot be mounted, `run` works without it (the BTF
    // build, no SYN-ACK times), so check warns and passes.
    let (code, text, mounted) = check_without_tracefs(",+bpf,+perfmon");
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("warn") && l.contains("tracefs") && l.contains("CAP_SYS_ADMIN")),
        "{text}"
    );
    assert!(text.lines().any(|l| l.contains("trial load") && l.contains("btf build")), "{text}");
    // The classic build cannot attach without tracefs: a warning, since auto uses the other.
    assert!(
        text.lines().any(|l| l.starts_with("warn") && l.contains("tracepoint build")),
        "{text}"
    );
    assert!(text.contains("tcpmon can run here."), "{text}");
    assert!(!mounted);
}

/// A seccomp filter that fails `bpf(2)` with EPERM, as a container runtime's default profile
/// does for a process without CAP_SYS_ADMIN; installed in the child before it runs tcpmon.
fn refuse_bpf(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const NR_BPF: u32 = 321; // x86_64
    let statement = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let (ld_abs, jeq, ret) = (0x20, 0x15, 0x06); // BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    let filter = [
        statement(ld_abs, 0, 0, 4),              // arch
        statement(jeq, 0, 3, AUDIT_ARCH_X86_64), // other arches: allow
        statement(ld_abs, 0, 0, 0),              // syscall number
        statement(jeq, 0, 1, NR_BPF),
        statement(ret, 0, 0, 0x0005_0000 | libc::EPERM as u32), // SECCOMP_RET_ERRNO
        statement(ret, 0, 0, 0x7fff_0000),                      // SECCOMP_RET_ALLOW
    ];
    // SAFETY: prctl only, between fork and exec; the filter outlives the call (moved in).
    unsafe {
        command.pre_exec(move || {
            let program =
                libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut _ };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, 2, &program as *const libc::sock_fprog) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn a_seccomp_filter_that_refuses_bpf_is_named_as_such() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut check = tcpmon();
    check.arg("check");
    refuse_bpf(&mut check);
    let out = check.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("trial load") && l.contains("seccomp")),
        "{text}"
    );
    let mut run = tcpmon();
    run.args(["run", "--listen", "127.0.0.1:0", "--tail-socket"]).arg(common::unique_socket_path());
    refuse_bpf(&mut run);
    let out = run.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(monitor::exit::PERMISSION as i32), "{stderr}");
    assert!(stderr.contains("seccomp filter refuses bpf()"), "{stderr}");
    assert!(!stderr.contains("needs root"), "{stderr}");
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
    // The daemon counted the churn, so that a reload that reset the counters would show. Not
    // all 50 need be counted: exact counts are tests/kernel.rs's subject, and a transition the
    // kernel never runs our program for (docs/ARCHITECTURE.md, "Transitions the kernel skips")
    // is in no count (a fresh CI machine once counted fewer than 50 here). Said first if it
    // fails, as CI shows a failure's first line: what can explain a shortfall.
    let series = |name: &str| before.get(name).copied().unwrap_or(0.0);
    assert!(
        before[opened] >= 40.0,
        "{} of 50 active opens; kernel SYN_SENT->ESTABLISHED {}, recursion misses {}, \
         inconsistent {}, first seen mid-life {}, replaced {}, lost {}\n{before:?}\n\
         daemon log:\n{}",
        before[opened],
        series("tcpmon_state_transitions_total{from=\"SYN_SENT\",to=\"ESTABLISHED\"}"),
        series("tcpmon_bpf_recursion_misses_total"),
        series("tcpmon_tracker_inconsistent_transitions_total"),
        series("tcpmon_tracker_sockets_first_seen_midlife_total"),
        series("tcpmon_tracker_sockets_replaced_total"),
        series("tcpmon_events_lost_total"),
        daemon.stderr_so_far()
    );

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

#[test]
fn in_a_pid_namespace_of_its_own_the_tail_shows_no_pids_from_that_namespace() {
    use std::io::{BufRead, BufReader};
    let _host = common::exclusive();
    if !kernel_tests_enabled() {
        return;
    }
    // The daemon as in a container with its own PID namespace: it is pid 1 there. unshare
    // ignores SIGTERM while it waits: the daemon gets it through their process group.
    use std::os::unix::process::CommandExt;
    let socket = common::unique_socket_path();
    let mut daemon = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM"])
        .process_group(0)
        .arg(env!("CARGO_BIN_EXE_tcpmon"))
        .args(["run", "--listen", "127.0.0.1:0", "--drain-interval", "10ms", "--tail-socket"])
        .arg(&socket)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(daemon.stderr.take().unwrap()).lines().map_while(Result::ok);
    let mut address = None;
    let mut lines = lines.into_iter();
    for line in lines.by_ref() {
        if let Some(rest) = line.split("metrics on http://").nth(1) {
            address = Some(rest.split('/').next().unwrap().to_owned());
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    let address = address.expect("the daemon's start-up line");
    let port = address.rsplit(':').next().unwrap().to_owned();
    // Its metrics listener is older than its program: its owner comes from the snapshot,
    // which reads /proc in the daemon's PID namespace. A connection accepted on it then.
    let tail = common::Tail::start(
        &socket,
        &["--json", "--established", "--count", "1", "--lport", &port],
        "following the daemon",
    );
    drop(std::net::TcpStream::connect(&address).unwrap());
    let record: serde_json::Value = serde_json::from_str(&tail.finish()[0]).unwrap();
    // SAFETY: plain kill(2) on our own child's process group.
    unsafe { libc::kill(-(daemon.id() as i32), libc::SIGTERM) };
    let _ = daemon.wait();
    assert_eq!(record["side"], "passive", "{record}");
    // Never the daemon's pid 1 of its own namespace beside the kernel's host pids.
    assert_eq!(record["pid"], serde_json::Value::Null, "{record}");
}
