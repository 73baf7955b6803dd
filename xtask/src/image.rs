//! `cargo xtask package` (the image half): an OCI image archive, `tcpmon_<version>_oci.tar`,
//! built `FROM scratch` (deploy/container/Containerfile) with `podman build`, so nothing is
//! pulled: its one layer is the stripped binary and the shared libraries `ldd` lists for it.
//!
//! The build uses a podman store of its own under `out`, removed afterwards: the machine's
//! store only ever sees the image when someone loads the archive (`podman load -i`), which is
//! what the README and monitor/tests/image.rs do.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::package::{install_stripped, run};

/// The name the archive's image loads under; deploy/kubernetes/daemonset.yaml names it too.
pub fn image_name(version: &str) -> String {
    format!("localhost/tcpmon:{version}")
}

/// The podman settings our machines need (runc, ulimits under the hard limits), as a
/// `CONTAINERS_CONF` file; see its comments.
pub fn containers_conf() -> PathBuf {
    crate::workspace_root().join("deploy/container/containers.conf")
}

/// Builds the image from the release `binary` into `out/tcpmon_<version>_oci.tar`.
pub fn build(out: &Path, binary: &Path, version: &str) -> Result<PathBuf> {
    let work = out.join("image-build");
    let _ = fs::remove_dir_all(&work);
    let rootfs = work.join("context/rootfs");
    let tcpmon = rootfs.join("usr/bin/tcpmon");
    install_stripped(binary, &tcpmon)?;
    copy_linked_libraries(&tcpmon, &rootfs)?;
    fs::copy(
        crate::workspace_root().join("deploy/container/Containerfile"),
        work.join("context/Containerfile"),
    )?;

    let archive = out.join(format!("tcpmon_{version}_oci.tar"));
    let _ = fs::remove_file(&archive);
    let name = image_name(version);
    let podman = |args: &[&str]| {
        let mut command = Command::new("podman");
        command
            .arg("--root")
            .arg(work.join("store"))
            .arg("--runroot")
            .arg(work.join("run"))
            .args(args)
            .env("CONTAINERS_CONF", containers_conf());
        command
    };
    let context = work.join("context");
    let context = context.to_str().context("a UTF-8 path")?;
    let version_label = format!("org.opencontainers.image.version={version}");
    run(
        podman(&[
            "build",
            "--quiet",
            // No time in the layers or the config: the same binary gives the same image.
            "--timestamp",
            "0",
            "--label",
            "org.opencontainers.image.title=tcpmon",
            "--label",
            "org.opencontainers.image.description=TCP connection-state monitor with eBPF",
            "--label",
            &version_label,
            "--tag",
            &name,
            context,
        ])
        .current_dir(context),
        "podman build",
    )?;
    let archive_arg = archive.to_str().context("a UTF-8 path")?;
    run(
        &mut podman(&[
            "save",
            "--quiet",
            "--format",
            "oci-archive",
            "--output",
            archive_arg,
            &name,
        ]),
        "podman save",
    )?;
    // The store's layers are only readable through podman; it removes them itself.
    let _ = podman(&["rmi", "--all", "--force"]).output();
    fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    println!("xtask: built {} ({name})", archive.display());
    Ok(archive)
}

/// Copies the shared libraries `binary` loads, as `ldd` resolves them (the dynamic linker
/// included), under `root` at the paths the dynamic linker looks for them, through symlinks.
pub fn copy_linked_libraries(binary: &Path, root: &Path) -> Result<()> {
    for library in linked_libraries(binary)? {
        let dest = root.join(library.strip_prefix("/")?);
        fs::create_dir_all(dest.parent().context("a library path with a parent")?)?;
        fs::copy(&library, &dest).with_context(|| format!("copying {}", library.display()))?;
    }
    Ok(())
}

/// The shared libraries `binary` loads, as `ldd` resolves them, the dynamic linker included.
fn linked_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let listing = String::from_utf8(run(Command::new("ldd").arg(binary), "ldd")?)?;
    // Lines are `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)`, or
    // `/lib64/ld-linux-x86-64.so.2 (0x…)` for the linker; the vDSO has no path.
    Ok(listing
        .lines()
        .filter_map(|line| line.split_whitespace().find(|word| word.starts_with('/')))
        .map(PathBuf::from)
        .collect())
}
