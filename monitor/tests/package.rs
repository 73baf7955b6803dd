//! The Debian package, checked and installed for real: what `cargo xtask test` builds into
//! `target/package` (`cargo xtask package`) before the tests run. Needs root, like the kernel
//! tests.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::kernel_tests_enabled;

/// The package `cargo xtask test` built.
fn package() -> Option<PathBuf> {
    common::artefact("_amd64.deb")
}

fn output(command: &mut Command) -> (bool, String) {
    let out = command.output().expect("running a command");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn lintian_finds_no_errors_or_warnings() {
    let Some(deb) = package() else { return };
    let (ok, report) =
        output(Command::new("lintian").args(["--fail-on", "error,warning"]).arg(&deb));
    assert!(ok, "lintian:\n{report}");
    assert!(!report.lines().any(|l| l.starts_with("E:") || l.starts_with("W:")), "{report}");
}

#[test]
fn the_package_installs_runs_and_leaves_nothing_behind() {
    if !kernel_tests_enabled() {
        return;
    }
    let Some(deb) = package() else { return };
    let dpkg = |args: &[&str]| output(Command::new("dpkg").args(args));
    let _ = dpkg(&["--purge", "tcpmon"]); // a run that failed half-way
    let (ok, log) = output(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(ok, "dpkg -i: {log}");

    let (ok, files) = dpkg(&["-L", "tcpmon"]);
    assert!(ok, "{files}");
    let installed: Vec<&str> = files.lines().filter(|f| Path::new(f).is_file()).collect();
    for expected in [
        "/usr/bin/tcpmon",
        "/usr/lib/systemd/system/tcpmon.service",
        "/etc/tcpmon/tcpmon.toml",
        "/usr/share/man/man1/tcpmon.1.gz",
        "/usr/share/bash-completion/completions/tcpmon",
        "/usr/share/zsh/vendor-completions/_tcpmon",
        "/usr/share/fish/vendor_completions.d/tcpmon.fish",
    ] {
        assert!(installed.contains(&expected), "{expected} not in {installed:?}");
    }
    // On PATH, and able to load the program here.
    let (ok, check) = output(Command::new("sh").args(["-c", "tcpmon check"]));
    assert!(ok, "tcpmon check: {check}");
    let (ok, page) = output(
        Command::new("man").args(["-l", "/usr/share/man/man1/tcpmon.1.gz"]).env("MANPAGER", "cat"),
    );
    assert!(ok && page.contains("tcpmon"), "man: {page}");
    let (ok, verify) = output(Command::new("systemd-analyze").args([
        "verify",
        "--man=no",
        "/usr/lib/systemd/system/tcpmon.service",
    ]));
    assert!(ok && verify.trim().is_empty(), "systemd-analyze verify: {verify}");
    // The unit is enabled (not started: no systemd runs here).
    assert!(Path::new("/etc/systemd/system/multi-user.target.wants/tcpmon.service").exists());

    // Removed: every file but the conffile goes; purged: the conffile too.
    let (ok, log) = dpkg(&["-r", "tcpmon"]);
    assert!(ok, "dpkg -r: {log}");
    for file in &installed {
        let kept = *file == "/etc/tcpmon/tcpmon.toml";
        assert_eq!(Path::new(file).exists(), kept, "{file} after dpkg -r");
    }
    let (ok, log) = dpkg(&["--purge", "tcpmon"]);
    assert!(ok, "dpkg --purge: {log}");
    assert!(!Path::new("/etc/tcpmon").exists(), "/etc/tcpmon after purge");
    assert!(!Path::new("/etc/systemd/system/multi-user.target.wants/tcpmon.service").exists());
    let (known, _) = dpkg(&["-s", "tcpmon"]);
    assert!(!known, "dpkg still knows tcpmon");
}
