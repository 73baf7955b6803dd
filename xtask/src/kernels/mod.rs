//! `cargo xtask kernels`: the kernel matrix. Boots the Debian kernels users run (5.10, 6.1,
//! 6.12 and the newest in sid) in qemu, runs tcpmon inside each with both builds of its
//! program (`--hook btf` and `--hook tracepoint`), and checks the numbers against traffic
//! whose every number is known (`xtask guest`, in guest.rs). Writes the README's "Supported
//! kernels" table from the results.
//!
//! - **Kernels** come from Debian's own packages, through a private apt configuration under
//!   `target/kernels/apt` (the machine's sources stay untouched), and are cached in
//!   `target/kernels/<series>`: only `vmlinuz`, and the `inet_diag`/`tcp_diag` modules
//!   (Debian builds them as modules; without them `sock_diag`, which the start-up snapshot and
//!   the kernel-state reads use, answers ENOENT).
//! - **qemu** comes from bookworm-backports (bookworm's own would remove the `qemu-utils` from
//!   backports that our machines ship). KVM does not work on our machines (a paravirtual
//!   `/dev/kvm`), so it emulates (`-accel tcg`); each kernel boots in a few seconds.
//! - **The guest** is an initramfs: busybox, the release `tcpmon`, this xtask binary (which
//!   runs the scenario), the libraries `ldd` lists for both, the two modules and `/init`.

mod fetch;
pub mod guest;
mod report;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::package::run;
use fetch::{ensure_qemu, fetch, Kernel};
use report::{table, write_readme_table, Row};

/// One kernel of the matrix: a name, and which Debian packages hold it.
struct Series {
    /// How the table names it.
    name: &'static str,
    /// The package holding `vmlinuz`, as a pattern: `#` stands for the digits and dots that
    /// vary; the highest match wins.
    packages: &'static [&'static str],
}

/// The matrix: Debian 11, Debian 12 (and Amazon Linux 2023's series), the 6.12 LTS, and the
/// newest Debian has. Newest first where two patterns could match.
const MATRIX: &[Series] = &[
    Series { name: "5.10", packages: &["linux-image-5.10.0-#-amd64-unsigned"] },
    Series { name: "6.1", packages: &["linux-image-6.1.0-#-amd64-unsigned"] },
    Series { name: "6.12", packages: &["linux-image-6.12.#+deb12-amd64-unsigned"] },
    // From 7.2 the image is in linux-binary-*, under usr/lib/modules/<version>/vmlinuz.
    Series {
        name: "newest",
        packages: &["linux-binary-unsigned-#+deb#-amd64", "linux-image-#+deb#-amd64-unsigned"],
    },
];

/// The guest's CPUs: one ring buffer each, up to the program's 16 (`MAX_RINGS`), and the
/// verifier walks every ring the program may pick, so 16 is its hardest case. Linux 5.10 and
/// 6.1 rejected the classic build at 2 already, before its reads lost their branches.
const GUEST_CPUS: usize = 16;

/// The builds `--hook` can select.
const HOOKS: &[&str] = &["btf", "tracepoint"];

/// The guest's `/init`: mounts what a booted system has, loads the diag modules, runs the
/// scenario, powers off. Kernel command-line words reach it as environment variables.
const INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mkdir -p /run/tcpmon
ip link set lo up
for m in inet_diag tcp_diag; do insmod /lib/modules/$(uname -r)/$m.ko; done
echo "@@guest $(uname -r)"
xtask guest --hooks "$hooks"
echo "@@done rc=$?"
poweroff -f
"#;

/// Runs the matrix (all of it, or the series named in `only`); fails if any check failed.
/// The table goes to `target/kernels/TABLE.md`, and with `write_readme` (a full run of
/// `cargo xtask kernels`, not the test suite's) into the README too. Returns how many
/// (kernel, build) pairs passed.
pub fn run_matrix(only: &[String], write_readme: bool) -> Result<u64> {
    let started = Instant::now();
    let root = crate::workspace_root();
    let cache = root.join("target/kernels");
    ensure_qemu(&cache)?;
    let series: Vec<&Series> =
        MATRIX.iter().filter(|s| only.is_empty() || only.iter().any(|o| o == s.name)).collect();
    if series.is_empty() {
        bail!("no kernel series named {only:?}; the matrix has {:?}", names());
    }
    let kernels = fetch(&cache, &series)?;
    let (tcpmon, _) = crate::package::release_binary()?;
    let xtask = std::env::current_exe().context("finding the xtask binary")?;
    let initrd = build_initrd(&cache, &tcpmon, &xtask, &kernels)?;

    let mut rows = Vec::new();
    let mut second_boots = Vec::new();
    for kernel in &kernels {
        let booted = Instant::now();
        // A kernel that hangs or panics is a failed row; the others still run.
        let mut log = boot(kernel, &initrd)?;
        let mut row = Row::parse(kernel, &log);
        if !row.passed() {
            // Sixteen emulated CPUs (TCG) now and then stall a guest or a deadline in it: one
            // more boot, and both results are reported. A real fault fails both.
            let first = row.failures().join("; ");
            println!(
                "xtask: kernel {} failed on its first boot ({}); booting it once more",
                kernel.series,
                first.chars().take(300).collect::<String>()
            );
            fs::write(cache.join(format!("{}.first.log", kernel.series)), &log)?;
            log = boot(kernel, &initrd)?;
            row = Row::parse(kernel, &log);
            second_boots.push(format!(
                "{}: {} on a second boot; the first failed: {}",
                kernel.series,
                if row.passed() { "passed" } else { "failed again" },
                first.chars().take(300).collect::<String>()
            ));
        }
        let log_file = cache.join(format!("{}.log", kernel.series));
        fs::write(&log_file, &log)?;
        println!(
            "xtask: kernel {} ({}): {} in {:.0}s (serial console: {})",
            kernel.series,
            kernel.release,
            if row.passed() { "passed" } else { "FAILED" },
            booted.elapsed().as_secs_f64(),
            log_file.display()
        );
        rows.push(row);
    }
    let mut table = table(&rows);
    for note in &second_boots {
        table.push_str(&format!("\nBooted twice: {note}.\n"));
    }
    println!("{table}");
    fs::write(cache.join("TABLE.md"), &table)?;
    if write_readme && only.is_empty() {
        write_readme_table(&root.join("README.md"), &table)?;
    }
    let failed: Vec<String> = rows.iter().flat_map(Row::failures).collect();
    println!("xtask: kernel matrix in {:.0}s", started.elapsed().as_secs_f64());
    if !failed.is_empty() {
        bail!("kernel matrix: {} failed:\n  {}", failed.len(), failed.join("\n  "));
    }
    Ok((rows.len() * HOOKS.len()) as u64)
}

fn names() -> Vec<&'static str> {
    MATRIX.iter().map(|s| s.name).collect()
}

/// The initramfs all kernels boot (the modules of each, by release).
fn build_initrd(cache: &Path, tcpmon: &Path, xtask: &Path, kernels: &[Kernel]) -> Result<PathBuf> {
    let tree = cache.join("initrd");
    let _ = fs::remove_dir_all(&tree);
    for dir in ["bin", "proc", "sys", "dev", "run", "tmp", "lib/modules"] {
        fs::create_dir_all(tree.join(dir))?;
    }
    fs::copy("/bin/busybox", tree.join("bin/busybox")).context("busybox (busybox-static)")?;
    let applets = String::from_utf8(run(Command::new("/bin/busybox").arg("--list"), "busybox")?)?;
    for applet in applets.lines().filter(|a| !a.is_empty() && *a != "busybox") {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet))?;
    }
    for (binary, name) in [(tcpmon, "tcpmon"), (xtask, "xtask")] {
        fs::copy(binary, tree.join("bin").join(name))?;
        crate::image::copy_linked_libraries(binary, &tree)?;
    }
    // Each kernel's modules in a folder of its release; /init loads the running kernel's.
    for kernel in kernels {
        let dest = tree.join("lib/modules").join(&kernel.release);
        fs::create_dir_all(&dest)?;
        for module in ["inet_diag", "tcp_diag"] {
            let file = format!("{module}.ko");
            fs::copy(kernel.modules.join(&file), dest.join(&file))?;
        }
    }
    fs::write(tree.join("init"), INIT)?;
    fs::set_permissions(tree.join("init"), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let initrd = cache.join("initrd.cpio.gz");
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > \"$1\"")
        .args(["sh"])
        .arg(&initrd)
        .current_dir(&tree)
        .status()?;
    if !status.success() {
        bail!("packing the initramfs");
    }
    fs::remove_dir_all(&tree)?;
    Ok(initrd)
}

/// Boots `kernel` with `initrd` and returns its serial console.
fn boot(kernel: &Kernel, initrd: &Path) -> Result<String> {
    let hooks = HOOKS.join(",");
    let child = Command::new("timeout")
        // A guest takes 30–65 s here; a hung one is stopped well before CI's budget.
        .args(["300", "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp"])
        .arg(GUEST_CPUS.to_string())
        .args(["-m", "1G", "-nographic", "-no-reboot", "-nic", "none", "-kernel"])
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet hooks={hooks}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let out = child.wait_with_output()?;
    let mut log = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    if !log.contains("@@done") {
        // Hung (timeout's 124) or crashed: the row says so, with qemu's own words.
        let stderr = String::from_utf8_lossy(&out.stderr);
        log.push_str(&format!("\n@@unfinished {} {}\n", out.status, stderr.trim()));
    }
    Ok(log)
}
