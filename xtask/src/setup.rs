//! `cargo xtask setup`: installs or verifies the eBPF toolchain and the test tools.
//!
//! The recipe (docs/TESTING.md, "The machines"): Debian's `rustc-web` (Rust 1.96, LLVM 22)
//! ships a prebuilt `core` for `bpfel-unknown-none` in `libstd-rust-web-dev-bpf`; bpf-linker
//! 0.10.4 (≥ 0.10.2: older ones emit BTF the kernel rejects) loads LLVM 22 at run time from a
//! `lib/` folder that rustup puts on LD_LIBRARY_PATH for a linked toolchain. So we link a
//! toolchain folder whose `bin/` points at Debian's rustc/cargo and whose `lib/` holds only
//! `libLLVM.so.22.1`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// Name of the rustup toolchain `monitor/build.rs` builds the eBPF crate with.
pub const TOOLCHAIN: &str = "tcpmon-bpf";
/// Debian packages: the BPF-capable Rust, and the tools the tests and the daemon use.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "iproute2",
    "bpftool",
    // The benchmark's peers: tcpstates, tcplife; and its references on the same tracepoint,
    // an empty program and a hash-map counter, written in bpftrace.
    "libbpf-tools",
    "bpftrace",
    // The end-to-end tests: a real Prometheus and promtool; the unit under a real systemd in
    // a container (a Debian root from mmdebstrap, booted with systemd-nspawn).
    "prometheus",
    "systemd",
    "mmdebstrap",
    "systemd-container",
    // Namespace tests drop the first SYN or SYN-ACK with a firewall rule, and set
    // per-namespace sysctls (procps: sysctl).
    "nftables",
    "procps",
    // The package: dpkg-shlibdeps for its Depends, lintian to check it, man to read its page.
    "dpkg-dev",
    "lintian",
    "man-db",
    // The image: podman builds it (FROM scratch, no RUN, so buildah's runtime is never used)
    // and the tests run it. runc, because Debian 12's crun refuses hybrid cgroups.
    "podman",
    "runc",
    // The kernel matrix (cargo xtask kernels; qemu itself comes from bookworm-backports
    // there): the guest's shell and tools, and the modules' compressors.
    "busybox-static",
    "xz-utils",
    "zstd",
];
const LIBLLVM: &str = "/usr/lib/x86_64-linux-gnu/libLLVM.so.22.1";
const BPF_LINKER_VERSION: &str = "0.10.4";
const BPF_LINKER_MIN: (u32, u32, u32) = (0, 10, 2);
/// cargo-machete, which `cargo xtask test` runs so that no crate depends on what it does not
/// use.
const MACHETE_VERSION: &str = "0.9.2";

/// Makes the machine ready; prints one line per step it had to take.
pub fn ensure() -> Result<()> {
    let started = Instant::now();
    check_kernel()?;
    ensure_packages()?;
    ensure_bpf_linker()?;
    ensure_machete()?;
    ensure_toolchain()?;
    println!("xtask: setup ok ({:.1}s)", started.elapsed().as_secs_f64());
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn check_kernel() -> Result<()> {
    if !cfg!(target_os = "linux") {
        bail!("tcpmon needs Linux");
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers =
        release.trim().split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u32>().ok());
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    if version < (5, 8) {
        bail!(
            "kernel {} is too old: tcpmon needs Linux 5.8 or newer (BPF ring buffer)",
            release.trim()
        );
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        println!(
            "xtask: warning: /sys/kernel/btf/vmlinux is missing (kernel without \
             CONFIG_DEBUG_INFO_BTF): tcpmon will run, but cannot tell close reasons apart"
        );
    }
    Ok(())
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if Command::new("apt-get").arg("--version").stdout(Stdio::null()).status().is_err() {
        bail!(
            "not a Debian-like machine (no apt-get). Install by hand: Rust ≥ 1.96 with the \
             `core` library for bpfel-unknown-none (Debian: {}), bpftool and iproute2",
            missing.join(" ")
        );
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}: run as root, or `sudo apt-get install {}`",
            missing.join(", "),
            missing.join(" ")
        );
    }
    println!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]), "apt-get update")?;
    // Installing `prometheus` would start a system-wide Prometheus on :9090; the tests run
    // their own. policy-rc.d (Debian's switch for this) keeps apt from starting services.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists();
    if own_policy {
        std::fs::write(policy, "#!/bin/sh\n# tcpmon xtask setup: start no service\nexit 101\n")
            .context("writing /usr/sbin/policy-rc.d")?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let installed = run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get install",
    );
    if own_policy {
        let _ = std::fs::remove_file(policy);
    }
    installed
}

fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let version =
        text.split_whitespace().find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??, parts.next().flatten().unwrap_or(0)))
}

fn ensure_bpf_linker() -> Result<()> {
    let current = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| parse_version(&String::from_utf8_lossy(&out.stdout)));
    if current.is_some_and(|v| v >= BPF_LINKER_MIN) {
        return Ok(());
    }
    println!(
        "xtask: installing bpf-linker {BPF_LINKER_VERSION} (found {current:?}; ≥ 0.10.2 needed)"
    );
    cargo_install("bpf-linker", BPF_LINKER_VERSION)
}

/// `cargo install --locked CRATE --version VERSION`.
fn cargo_install(krate: &str, version: &str) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let args = ["install", "--locked", krate, "--version", version];
    run(Command::new(cargo).args(args), &format!("cargo install {krate}"))
}

fn ensure_machete() -> Result<()> {
    let current = Command::new("cargo-machete").arg("--version").output().ok();
    let current = current.filter(|out| out.status.success()).map(|out| out.stdout);
    if current.is_some_and(|out| String::from_utf8_lossy(&out).contains(MACHETE_VERSION)) {
        return Ok(());
    }
    println!("xtask: installing cargo-machete {MACHETE_VERSION}");
    cargo_install("cargo-machete", MACHETE_VERSION)
}

fn toolchain_dir() -> PathBuf {
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"));
    data.join("tcpmon").join("bpf-toolchain")
}

fn toolchain_works() -> bool {
    Command::new("rustup")
        .args([
            "run",
            TOOLCHAIN,
            "rustc",
            "--print",
            "target-libdir",
            "--target",
            "bpfel-unknown-none",
        ])
        .output()
        .map(|out| {
            out.status.success() && Path::new(String::from_utf8_lossy(&out.stdout).trim()).exists()
        })
        .unwrap_or(false)
}

fn ensure_toolchain() -> Result<()> {
    let dir = toolchain_dir();
    let links = [
        (dir.join("bin/rustc"), PathBuf::from("/usr/bin/rustc")),
        (dir.join("bin/cargo"), PathBuf::from("/usr/bin/cargo")),
        (dir.join("lib/libLLVM.so.22.1"), PathBuf::from(LIBLLVM)),
    ];
    let links_ok =
        links.iter().all(|(link, target)| std::fs::read_link(link).ok().as_ref() == Some(target));
    if links_ok && toolchain_works() {
        return Ok(());
    }
    for (_, target) in &links {
        if !target.exists() {
            bail!("{} is missing: is Debian's rustc-web installed?", target.display());
        }
    }
    println!("xtask: linking rustup toolchain `{TOOLCHAIN}` at {}", dir.display());
    for (link, target) in &links {
        let parent = link.parent().context("toolchain path")?;
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let _ = std::fs::remove_file(link);
        std::os::unix::fs::symlink(target, link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    run(
        Command::new("rustup").args(["toolchain", "link", TOOLCHAIN]).arg(&dir),
        "rustup toolchain link",
    )?;
    if !toolchain_works() {
        bail!("the `{TOOLCHAIN}` toolchain has no `core` for bpfel-unknown-none: is libstd-rust-web-dev-bpf installed?");
    }
    Ok(())
}

fn run(command: &mut Command, what: &str) -> Result<()> {
    let status = command.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bpf_linker_versions() {
        assert_eq!(parse_version("bpf-linker 0.10.4"), Some((0, 10, 4)));
        assert!(parse_version("bpf-linker 0.10.0").unwrap() < BPF_LINKER_MIN);
        assert!(parse_version("bpf-linker 0.10.2").unwrap() >= BPF_LINKER_MIN);
        assert_eq!(parse_version("garbage"), None);
    }
}
