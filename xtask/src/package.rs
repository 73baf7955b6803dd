//! `cargo xtask package`: a Debian package of the release binary, built with `dpkg-deb` from a
//! tree laid out here (no debhelper: the package is one binary and its files), with its
//! `Depends` from `dpkg-shlibdeps` and checked with `lintian` when installed.
//!
//! Contents: a stripped `/usr/bin/tcpmon`; the hardened unit (`/usr/lib/systemd/system`),
//! enabled at install but started only where systemd runs; `/etc/tcpmon/tcpmon.toml`, a
//! conffile; the man page; bash, zsh and fish completions; copyright and changelog.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

const MAINTAINER: &str = "tcpmon developers <tcpmon@example.org>";

/// The default configuration, installed as a conffile: every setting commented out at its
/// default, so an upgrade that changes a default changes it here too.
const CONFIG: &str = r#"# tcpmon run's settings; keys are the flag names (`tcpmon run --help`). Each value here
# is the default: uncomment to change it. Flags and TCPMON_* variables take precedence.
# After a change: `systemctl reload tcpmon` (SIGHUP) for drain-interval, max-sockets and the
# log level; `systemctl restart tcpmon` for the rest.

# listen = "127.0.0.1:9979"
# ring-bytes = "8MiB"
# drain-interval = "100ms"
# max-sockets = 524288
# netns-labels = 0
# port-labels = 32
# ports = "443,5432"
# workload-labels = 32
# label-pairs = 64
# pod-logs = "/var/log/pods"
# hook = "auto"
# tail-socket = "/run/tcpmon/tail.sock"
# log-level = "info"
"#;

/// Maintainer scripts as `dh_installsystemd` writes them: enable the unit at install, start
/// it only when systemd runs (not in a container or a chroot), stop it before removal.
const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = "configure" ] || [ "$1" = "abort-upgrade" ] || [ "$1" = "abort-deconfigure" ] || [ "$1" = "abort-remove" ]; then
	if deb-systemd-helper debian-installed 'tcpmon.service' >/dev/null 2>&1 || [ -z "$2" ]; then
		deb-systemd-helper enable 'tcpmon.service' >/dev/null || true
	fi
	if [ -d /run/systemd/system ]; then
		systemctl --system daemon-reload >/dev/null || true
		deb-systemd-invoke restart 'tcpmon.service' >/dev/null || true
	fi
fi
"#;

const PRERM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
	deb-systemd-invoke stop 'tcpmon.service' >/dev/null || true
fi
"#;

const POSTRM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
	systemctl --system daemon-reload >/dev/null || true
fi
if [ "$1" = "remove" ] && [ -x "/usr/bin/deb-systemd-helper" ]; then
	deb-systemd-helper mask 'tcpmon.service' >/dev/null || true
fi
if [ "$1" = "purge" ] && [ -x "/usr/bin/deb-systemd-helper" ]; then
	deb-systemd-helper purge 'tcpmon.service' >/dev/null || true
	deb-systemd-helper unmask 'tcpmon.service' >/dev/null || true
fi
"#;

/// The one source of the unit, for hand installs and for the package.
const UNIT: &str = "deploy/systemd/tcpmon.service";
/// What the package changes in it: the paths (its binary, its config file) and the install
/// note. Each must be found exactly once, so an edit of the unit cannot silently leave the
/// package's copy different.
const UNIT_CHANGES: [(&str, &str); 2] = [
    (
        "ExecStart=/usr/local/bin/tcpmon run\n",
        "ExecStart=/usr/bin/tcpmon run --config /etc/tcpmon/tcpmon.toml\n",
    ),
    (
        "# tcpmon as a hardened systemd service. Install the binary as /usr/local/bin/tcpmon, then:\n\
         #   install -m 0644 tcpmon.service /etc/systemd/system/ && systemctl enable --now tcpmon\n",
        "# tcpmon as a hardened systemd service, installed by the tcpmon package.\n",
    ),
];

/// The package's unit: [`UNIT`] with [`UNIT_CHANGES`].
fn packaged_unit(source: &str) -> Result<String> {
    let mut unit = source.to_owned();
    for (from, to) in UNIT_CHANGES {
        if unit.matches(from).count() != 1 {
            bail!("{UNIT} no longer has exactly one {from:?}: update UNIT_CHANGES in package.rs");
        }
        unit = unit.replace(from, to);
    }
    Ok(unit)
}

pub fn run(command: &mut Command, what: &str) -> Result<Vec<u8>> {
    let out = command.output().with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}

fn write(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(path.parent().context("a path with a parent")?)?;
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// `gzip -9n` of `data` (no name or time in the header: reproducible).
fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting gzip")?;
    let mut stdin = child.stdin.take().context("gzip stdin")?;
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output()?;
    writer.join().map_err(|_| anyhow::anyhow!("gzip writer panicked"))??;
    Ok(out.stdout)
}

/// The release binary, built now, and its version (`tcpmon --version`).
pub fn release_binary() -> Result<(PathBuf, String)> {
    crate::cargo(&["build", "--release", "--package", "monitor", "--bin", "tcpmon"])?;
    let binary = crate::workspace_root().join("target/release/tcpmon");
    let version =
        String::from_utf8(run(Command::new(&binary).arg("--version"), "tcpmon --version")?)?;
    let version = version.split_whitespace().nth(1).context("a version")?.to_owned();
    Ok((binary, version))
}

/// Copies `binary` to `dest`, stripped (lintian: unstripped-binary-or-object; the image is
/// smaller for it too).
pub fn install_stripped(binary: &Path, dest: &Path) -> Result<()> {
    fs::create_dir_all(dest.parent().context("a path with a parent")?)?;
    fs::copy(binary, dest)?;
    run(
        Command::new("strip")
            .args(["--strip-unneeded", "--remove-section=.comment", "--remove-section=.note"])
            .arg(dest),
        "strip",
    )?;
    Ok(())
}

/// Builds `tcpmon_<version>_amd64.deb` into `out` from the release `binary`; returns its path.
pub fn build(out: &Path, binary: &Path, version: &str) -> Result<PathBuf> {
    let root = crate::workspace_root();
    let name = format!("tcpmon_{version}_amd64");
    let tree = out.join(&name);
    let _ = fs::remove_dir_all(&tree);
    fs::create_dir_all(&tree)?;

    let bin = tree.join("usr/bin/tcpmon");
    install_stripped(binary, &bin)?;
    let tcpmon = |args: &[&str]| run(Command::new(&bin).args(args), "tcpmon");
    write(&tree.join("usr/share/man/man1/tcpmon.1.gz"), &gzip(&tcpmon(&["man"])?)?, 0o644)?;
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/tcpmon"),
        ("zsh", "usr/share/zsh/vendor-completions/_tcpmon"),
        ("fish", "usr/share/fish/vendor_completions.d/tcpmon.fish"),
    ] {
        write(&tree.join(path), &tcpmon(&["completions", shell])?, 0o644)?;
    }
    let unit = packaged_unit(&fs::read_to_string(root.join(UNIT))?)?;
    write(&tree.join("usr/lib/systemd/system/tcpmon.service"), unit.as_bytes(), 0o644)?;
    write(&tree.join("etc/tcpmon/tcpmon.toml"), CONFIG.as_bytes(), 0o644)?;
    let doc = tree.join("usr/share/doc/tcpmon");
    write(
        &doc.join("copyright"),
        b"Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
          Upstream-Name: tcpmon\n\n\
          Files: *\nCopyright: 2026 tcpmon developers\nLicense: MIT\n \
          Permission is hereby granted, free of charge, to any person obtaining a copy of this\n \
          software, to deal in it without restriction.\n",
        0o644,
    )?;
    let changelog = format!(
        "tcpmon ({version}) unstable; urgency=medium\n\n  * Package built by cargo xtask package.\n\n -- {MAINTAINER}  Mon, 30 Nov 2026 00:00:00 +0000\n"
    );
    // A native package (no Debian revision): the changelog is changelog.gz.
    write(&doc.join("changelog.gz"), &gzip(changelog.as_bytes())?, 0o644)?;

    // Depends: what the binary links, as dpkg-shlibdeps says (it wants a debian/control).
    let shlib_dir = out.join("shlibdeps");
    write(
        &shlib_dir.join("debian/control"),
        b"Source: tcpmon\n\nPackage: tcpmon\nArchitecture: any\n",
        0o644,
    )?;
    let shlibs = run(
        Command::new("dpkg-shlibdeps").arg("-O").arg(&bin).current_dir(&shlib_dir),
        "dpkg-shlibdeps",
    )?;
    let shlibs = String::from_utf8(shlibs)?;
    let shlibs_depends = shlibs
        .lines()
        .find_map(|line| line.strip_prefix("shlibs:Depends="))
        .context("dpkg-shlibdeps gave no Depends")?;
    // procps: the unit's ExecReload= runs its kill.
    let depends = format!("{shlibs_depends}, procps");
    let _ = fs::remove_dir_all(&shlib_dir);
    let installed_kib: u64 =
        walk(&tree)?.iter().map(|f| f.metadata().map_or(0, |m| m.len())).sum::<u64>() / 1024;
    let control = format!(
        "Package: tcpmon\nVersion: {version}\nArchitecture: amd64\nMaintainer: {MAINTAINER}\n\
         Installed-Size: {installed_kib}\nDepends: {depends}\nSection: net\nPriority: optional\n\
         Description: TCP connection-state monitor with eBPF\n \
         tcpmon follows every TCP state transition of the host through an eBPF\n \
         program on the sock:inet_sock_set_state tracepoint. It exports handshake\n \
         and teardown latencies, connect failures, resets, CLOSE_WAIT and\n \
         listen-queue trouble as Prometheus metrics, by service port and\n \
         workload; `tcpmon tail` shows connections live.\n"
    );
    let debian = tree.join("DEBIAN");
    // md5sums of every file but the conffile, as dh_md5sums writes them.
    let mut md5sums = String::new();
    let mut files = walk(&tree)?;
    files.sort();
    for file in files {
        let relative = file.strip_prefix(&tree)?.to_string_lossy().into_owned();
        if relative.starts_with("etc/") {
            continue;
        }
        let sum = String::from_utf8(run(Command::new("md5sum").arg(&file), "md5sum")?)?;
        let sum = sum.split_whitespace().next().context("an md5 sum")?.to_owned();
        md5sums.push_str(&format!("{sum}  {relative}\n"));
    }
    write(&debian.join("md5sums"), md5sums.as_bytes(), 0o644)?;
    write(&debian.join("control"), control.as_bytes(), 0o644)?;
    write(&debian.join("conffiles"), b"/etc/tcpmon/tcpmon.toml\n", 0o644)?;
    write(&debian.join("postinst"), POSTINST.as_bytes(), 0o755)?;
    write(&debian.join("prerm"), PRERM.as_bytes(), 0o755)?;
    write(&debian.join("postrm"), POSTRM.as_bytes(), 0o755)?;

    let deb = out.join(format!("{name}.deb"));
    run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&tree)
            .arg(&deb),
        "dpkg-deb --build",
    )?;
    fs::remove_dir_all(&tree)?;
    println!("xtask: built {}", deb.display());
    Ok(deb)
}

/// Every file under `dir`.
pub fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_unit_differs_from_the_shipped_one_only_in_its_paths() {
        let source = fs::read_to_string(crate::workspace_root().join(UNIT)).unwrap();
        let packaged = packaged_unit(&source).unwrap();
        assert!(
            packaged.contains("ExecStart=/usr/bin/tcpmon run --config /etc/tcpmon/tcpmon.toml\n")
        );
        assert!(!packaged.contains("/usr/local/bin"), "{packaged}");
        // Undoing the changes gives the source back: nothing else differs.
        let undone = UNIT_CHANGES.iter().fold(packaged, |unit, (from, to)| unit.replace(to, from));
        assert_eq!(undone, source);
        // A unit edited so that a change no longer applies fails the build.
        let edited = source.replace("ExecStart=/usr/local/bin/tcpmon run\n", "ExecStart=/opt/x\n");
        assert!(packaged_unit(&edited).is_err());
    }
}
