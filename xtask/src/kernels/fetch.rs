//! Where the matrix's kernels and qemu come from: Debian's packages, through private apt
//! configurations (the machine's own sources stay untouched), cached in `target/kernels`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use super::Series;
use crate::package::{run, walk};

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
pub(super) fn ensure_qemu(cache: &Path) -> Result<()> {
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
pub(super) struct Kernel {
    pub(super) series: &'static str,
    pub(super) package: String,
    pub(super) version: String,
    /// `uname -r`.
    pub(super) release: String,
    pub(super) vmlinuz: PathBuf,
    pub(super) modules: PathBuf,
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
pub(super) fn fetch(cache: &Path, series: &[&Series]) -> Result<Vec<Kernel>> {
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
