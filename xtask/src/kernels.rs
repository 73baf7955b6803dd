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

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::package::run;

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

/// The suites the kernels come from, all on Debian's mirror.
const KERNEL_SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main
";

/// bookworm with its backports, for qemu.
const QEMU_SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
";

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
    for kernel in &kernels {
        let booted = Instant::now();
        // A kernel that hangs or panics is a failed row; the others still run.
        let log = boot(kernel, &initrd)?;
        let log_file = cache.join(format!("{}.log", kernel.series));
        fs::write(&log_file, &log)?;
        let row = Row::parse(kernel, &log);
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
    let table = table(&rows);
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

/// A private apt configuration in `dir` with `sources` as its only sources.
fn apt(dir: &Path, sources: &str) -> Result<Vec<String>> {
    for sub in ["lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    let list = dir.join("sources.list");
    fs::write(&list, sources)?;
    let option =
        |name: &str, value: &Path| vec!["-o".into(), format!("{name}={}", value.display())];
    let mut args = Vec::new();
    args.extend(option("Dir::Etc::SourceList", &list));
    args.extend(option("Dir::Etc::SourceParts", Path::new("/dev/null")));
    args.extend(option("Dir::State::Lists", &dir.join("lists")));
    args.extend(option("Dir::Cache", &dir.join("cache")));
    // Downloads land in our own folders, which apt's sandbox user cannot write.
    args.extend(["-o".into(), "APT::Sandbox::User=root".into()]);
    args.extend(["-o".into(), "Acquire::Languages=none".into()]);
    Ok(args)
}

/// `apt-get update` with `args`, at most every six hours for the same sources (the indexes
/// are cached; the stamp holds the sources they came from).
fn apt_update(dir: &Path, args: &[String], sources: &str) -> Result<()> {
    let stamp = dir.join("updated");
    let same_sources = fs::read_to_string(&stamp).is_ok_and(|s| s == sources);
    let recent = fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(6 * 3600));
    if !(same_sources && recent) {
        run(Command::new("apt-get").args(args).args(["-q", "update"]), "apt-get update")?;
        fs::write(&stamp, sources)?;
    }
    Ok(())
}

/// Installs qemu from bookworm-backports unless `qemu-system-x86_64` is there.
fn ensure_qemu(cache: &Path) -> Result<()> {
    let have = Command::new("qemu-system-x86_64").arg("--version").stdout(Stdio::null()).status();
    if have.is_ok_and(|s| s.success()) {
        return Ok(());
    }
    println!("xtask: installing qemu-system-x86 from bookworm-backports");
    let dir = cache.join("apt-qemu");
    let args = apt(&dir, QEMU_SOURCES)?;
    apt_update(&dir, &args, QEMU_SOURCES)?;
    run(
        Command::new("apt-get")
            .args(&args)
            .args(["-q", "-y", "--no-install-recommends", "-t", "bookworm-backports"])
            .args(["install", "qemu-system-x86"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get install qemu-system-x86",
    )?;
    Ok(())
}

/// A kernel ready to boot.
struct Kernel {
    series: &'static str,
    package: String,
    version: String,
    /// `uname -r`.
    release: String,
    vmlinuz: PathBuf,
    modules: PathBuf,
}

/// The digit runs of `text`, as numbers: the key that orders package names by version.
fn version_key(text: &str) -> Vec<u64> {
    text.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect()
}

/// Whether `name` matches `pattern`, where `#` stands for one or more digits and dots,
/// taken greedily (no backtracking: the text after a `#` must not start with a digit or a dot).
fn matches(pattern: &str, name: &str) -> bool {
    let mut rest = name;
    let mut parts = pattern.split('#');
    let first = parts.next().unwrap_or_default();
    let Some(after) = rest.strip_prefix(first) else { return false };
    rest = after;
    for literal in parts {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let Some(after) = rest.strip_prefix(literal) else { return false };
        rest = after;
    }
    rest.is_empty()
}

/// The newest package of each series, downloaded (or from the cache) and unpacked.
fn fetch(cache: &Path, series: &[&Series]) -> Result<Vec<Kernel>> {
    let dir = cache.join("apt");
    let args = apt(&dir, KERNEL_SOURCES)?;
    apt_update(&dir, &args, KERNEL_SOURCES)?;
    let names = String::from_utf8(run(
        Command::new("apt-cache").args(&args).arg("pkgnames"),
        "apt-cache pkgnames",
    )?)?;
    let mut kernels = Vec::new();
    for s in series {
        let package = s
            .packages
            .iter()
            .find_map(|pattern| {
                names.lines().filter(|n| matches(pattern, n)).max_by_key(|n| version_key(n))
            })
            .with_context(|| format!("no package for kernel {} ({:?})", s.name, s.packages))?
            .to_owned();
        let show = String::from_utf8(run(
            Command::new("apt-cache").args(&args).args(["show", &package]),
            "apt-cache show",
        )?)?;
        let version = show
            .lines()
            .find_map(|l| l.strip_prefix("Version: "))
            .context("a Version in apt-cache show")?
            .to_owned();
        kernels.push(unpacked(cache, s.name, &package, &version, &args)?);
    }
    Ok(kernels)
}

/// `package` at `version`, unpacked into `cache/<series>` unless it already is.
fn unpacked(
    cache: &Path,
    series: &'static str,
    package: &str,
    version: &str,
    apt_args: &[String],
) -> Result<Kernel> {
    let dir = cache.join(series);
    let stamp = dir.join("PACKAGE");
    let kernel = |release: String| Kernel {
        series,
        package: package.to_owned(),
        version: version.to_owned(),
        release,
        vmlinuz: dir.join("vmlinuz"),
        modules: dir.join("modules"),
    };
    if let Ok(text) = fs::read_to_string(&stamp) {
        let fields: Vec<&str> = text.split_whitespace().collect();
        if fields.len() == 3 && fields[0] == package && fields[1] == version {
            return Ok(kernel(fields[2].to_owned()));
        }
    }
    println!("xtask: downloading {package} {version}");
    let work = cache.join(format!("{series}.download"));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(work.join("tree"))?;
    let mut unpack_messages = String::new();
    let mut debs = vec![package.to_owned()];
    // 7.2 on: the modules are in a package of their own.
    if let Some(rest) = package.strip_prefix("linux-binary-unsigned-") {
        debs.push(format!("linux-modules-{rest}"));
    }
    for (index, deb) in debs.iter().enumerate() {
        // The image package at the version chosen; its modules package as apt picks it.
        let wanted = if index == 0 { format!("{deb}={version}") } else { deb.clone() };
        run(
            Command::new("apt-get")
                .args(apt_args)
                .args(["-q", "download", &wanted])
                .current_dir(&work),
            "apt-get download",
        )?;
        let file = fs::read_dir(&work)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{deb}_")) && n.ends_with(".deb"))
            })
            .context("the downloaded package")?;
        // Only the image and the two modules, not the hundreds of MB of the rest. tar fails
        // when a pattern is absent (a linux-binary package has no modules): what is missing
        // is looked for below, with tar's words kept for the message.
        let unpack = Command::new("sh")
            .arg("-c")
            .arg(
                "dpkg-deb --fsys-tarfile \"$1\" | tar -x -C \"$2\" --wildcards \
                 '*vmlinuz*' '*/inet_diag.ko*' '*/tcp_diag.ko*'",
            )
            .args(["sh"])
            .arg(&file)
            .arg(work.join("tree"))
            .output()?;
        unpack_messages.push_str(&String::from_utf8_lossy(&unpack.stderr));
        fs::remove_file(&file)?;
    }
    let files = walk(&work.join("tree"))?;
    let image = files
        .iter()
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz")))
        .with_context(|| format!("no vmlinuz in {package}: {}", unpack_messages.trim()))?;
    // /boot/vmlinuz-<release>, or usr/lib/modules/<release>/vmlinuz.
    let name = image.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let release = match name.strip_prefix("vmlinuz-") {
        Some(release) => release.to_owned(),
        None => image
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .context("the release of usr/lib/modules/<release>/vmlinuz")?
            .to_owned(),
    };
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("modules"))?;
    fs::copy(image, dir.join("vmlinuz"))?;
    for module in ["inet_diag", "tcp_diag"] {
        let found = files
            .iter()
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{module}.ko")))
            })
            .with_context(|| {
                format!("no {module} module in {package}: {}", unpack_messages.trim())
            })?;
        let plain = decompressed(found)?;
        fs::write(dir.join("modules").join(format!("{module}.ko")), plain)?;
    }
    fs::write(&stamp, format!("{package} {version} {release}\n"))?;
    fs::remove_dir_all(&work)?;
    Ok(kernel(release))
}

/// A module file's contents, decompressed by its extension.
fn decompressed(path: &Path) -> Result<Vec<u8>> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => return Ok(fs::read(path)?),
    };
    run(Command::new(tool).arg("-dc").arg(path), tool)
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
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
        let listing = String::from_utf8(run(Command::new("ldd").arg(binary), "ldd")?)?;
        for library in
            listing.lines().filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        {
            let dest = tree.join(library.trim_start_matches('/'));
            fs::create_dir_all(dest.parent().context("a library's folder")?)?;
            fs::copy(library, &dest)?;
        }
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
        .args(["900", "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp"])
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

/// What one kernel's guest reported.
struct Row {
    series: &'static str,
    package: String,
    version: String,
    release: String,
    check_rc: Option<i32>,
    check: Vec<String>,
    results: Vec<Value>,
    /// Why the guest did not finish (qemu's status and words), if it did not.
    unfinished: Option<String>,
}

impl Row {
    fn parse(kernel: &Kernel, log: &str) -> Row {
        let mut row = Row {
            series: kernel.series,
            package: kernel.package.clone(),
            version: kernel.version.clone(),
            release: kernel.release.clone(),
            check_rc: None,
            check: Vec::new(),
            results: Vec::new(),
            unfinished: None,
        };
        for line in log.lines() {
            if let Some(rest) = line.strip_prefix("@@check rc=") {
                row.check_rc = rest.trim().parse().ok();
            } else if let Some(rest) = line.strip_prefix("@@check-line ") {
                row.check.push(rest.to_owned());
            } else if let Some(rest) = line.strip_prefix("@@unfinished ") {
                row.unfinished = Some(rest.to_owned());
            } else if let Some(rest) = line.strip_prefix("@@result ") {
                if let Ok(value) = serde_json::from_str(rest) {
                    row.results.push(value);
                }
            }
        }
        row
    }

    fn result(&self, hook: &str) -> Option<&Value> {
        self.results.iter().find(|r| r["hook"] == hook)
    }

    /// Everything that did not hold, one line each.
    fn failures(&self) -> Vec<String> {
        let mut failed = Vec::new();
        let at = |what: &str| format!("{} ({}): {what}", self.series, self.release);
        if let Some(why) = &self.unfinished {
            failed.push(at(&format!("the guest did not finish: {why}")));
        }
        if self.check_rc != Some(0) {
            failed.push(at(&format!(
                "check exited {:?}: {}",
                self.check_rc,
                self.check.join(" | ")
            )));
        }
        // check must try (and pass) every build: a FAIL or a warning on a trial load is a failure
        // here, where both builds must load.
        for line in self.check.iter().filter(|l| l.contains("trial load")) {
            if !line.starts_with("ok") {
                failed.push(at(&format!("check: {line}")));
            }
        }
        for hook in HOOKS {
            let Some(result) = self.result(hook) else {
                failed.push(at(&format!("{hook}: no result")));
                continue;
            };
            if result["loaded"] != true {
                failed.push(at(&format!("{hook}: did not load: {}", result["error"])));
                continue;
            }
            let mut any = false;
            for f in result["findings"].as_array().into_iter().flatten() {
                if f["ok"] != true {
                    any = true;
                    failed.push(at(&format!("{hook}: {}: {}", f["name"], f["seen"])));
                }
            }
            if any {
                failed.push(at(&format!(
                    "{hook}: tracker anomalies {}; tail records of the failed checks' ports: {}",
                    result["anomalies"], result["records_of_failed_checks"]
                )));
            }
            for feature in ["close_reasons", "synack_times", "reset_direction"] {
                if result["features"][feature] != true {
                    failed.push(at(&format!("{hook}: {feature} not available")));
                }
            }
        }
        failed
    }

    fn passed(&self) -> bool {
        self.failures().is_empty()
    }
}

/// The README's table: one row per kernel and build.
fn table(rows: &[Row]) -> String {
    let date = Command::new("date").args(["-u", "+%Y-%m-%d"]).output();
    let date =
        date.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default();
    let host = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut out = format!(
        "Last run {date}, {GUEST_CPUS} guest CPUs (one ring buffer each: the verifier's hardest \
         case). The whole test suite also runs on the machine's own kernel ({}).\n\n",
        host.trim()
    );
    out.push_str(
        "| kernel (Debian package) | build | loads | close reasons | SYN-ACK times | reset direction | checks |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let mark = |b: bool| if b { "yes" } else { "**no**" };
    let mut check_names: Vec<String> = Vec::new();
    for row in rows {
        for hook in HOOKS {
            let kernel = format!("{} (`{}` {})", row.release, row.package, row.version);
            let Some(result) = row.result(hook) else {
                let _ = writeln!(out, "| {kernel} | {hook} | **no result** | | | | |");
                continue;
            };
            if result["loaded"] != true {
                let error = result["error"].as_str().unwrap_or_default().replace('|', "\\|");
                let error: String = error.chars().take(120).collect();
                let _ = writeln!(out, "| {kernel} | {hook} | **no**: {error} | | | | |");
                continue;
            }
            let features = &result["features"];
            let findings = result["findings"].as_array().cloned().unwrap_or_default();
            let name = |f: &Value| f["name"].as_str().unwrap_or_default().to_owned();
            for f in &findings {
                if !check_names.contains(&name(f)) {
                    check_names.push(name(f));
                }
            }
            let failed: Vec<String> =
                findings.iter().filter(|f| f["ok"] != true).map(name).collect();
            let checks = match failed.is_empty() {
                true => format!("all {} passed", findings.len()),
                false => format!("**failed: {}**", failed.join(", ")),
            };
            let synack = match features["synack_build"].as_str() {
                Some(build) if features["synack_times"] == true => format!("yes ({build})"),
                _ => mark(features["synack_times"] == true).to_owned(),
            };
            let _ = writeln!(
                out,
                "| {kernel} | {hook} | yes | {} | {synack} | {} | {checks} |",
                mark(features["close_reasons"] == true),
                mark(features["reset_direction"] == true),
            );
        }
    }
    let _ = writeln!(out, "\nThe checks, per kernel and build: {}.", check_names.join(", "));
    out
}

const TABLE_BEGIN: &str = "<!-- kernels:begin (written by cargo xtask kernels) -->";
const TABLE_END: &str = "<!-- kernels:end -->";

/// Replaces the table between the README's markers.
fn write_readme_table(readme: &Path, table: &str) -> Result<()> {
    let text = fs::read_to_string(readme)?;
    let begin = text.find(TABLE_BEGIN);
    let end = begin.and_then(|b| text[b..].find(TABLE_END).map(|e| b + e));
    let (Some(begin), Some(end)) = (begin, end) else {
        bail!("README.md has no {TABLE_BEGIN} … {TABLE_END} markers");
    };
    let updated = format!("{}{TABLE_BEGIN}\n{table}{}", &text[..begin], &text[end..]);
    // Written beside it, then renamed: an error never leaves half a README.
    let partial = readme.with_extension("md.partial");
    fs::File::create(&partial)?.write_all(updated.as_bytes())?;
    fs::rename(&partial, readme)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_patterns_pick_the_series_and_order_by_version() {
        assert!(matches(
            "linux-image-5.10.0-#-amd64-unsigned",
            "linux-image-5.10.0-46-amd64-unsigned"
        ));
        assert!(!matches(
            "linux-image-5.10.0-#-amd64-unsigned",
            "linux-image-5.10.0-46-cloud-amd64-unsigned"
        ));
        assert!(matches(
            "linux-image-6.12.#+deb12-amd64-unsigned",
            "linux-image-6.12.117+deb12-amd64-unsigned"
        ));
        assert!(matches(
            "linux-binary-unsigned-#+deb#-amd64",
            "linux-binary-unsigned-7.2.13+deb14-amd64"
        ));
        assert!(!matches(
            "linux-binary-unsigned-#+deb#-amd64",
            "linux-binary-unsigned-7.2.13+deb14-amd64-rt"
        ));
        // The 6.1 pattern must not take bullseye's backport 6.1.0-0.deb11.N.
        assert!(!matches(
            "linux-image-6.1.0-#-amd64-unsigned",
            "linux-image-6.1.0-0.deb11.28-amd64-unsigned"
        ));
        assert!(version_key("linux-image-5.10.0-46") > version_key("linux-image-5.10.0-9"));
        assert!(version_key("7.2.13+deb14") > version_key("7.1.20+deb14"));
    }
}
