//! Builds the eBPF program (`monitor-ebpf`) for the BPF target and embeds it in `tcpmon`.
//!
//! The BPF target needs a compiler that ships `core` for `bpfel-unknown-none`: Debian's
//! `rustc-web` with `libstd-rust-web-dev-bpf`. `cargo xtask setup` installs it and links it
//! as the rustup toolchain named below (docs/TESTING.md, "The machines").
use std::process::Command;

/// The rustup toolchain `cargo xtask setup` links; override with `TCPMON_BPF_TOOLCHAIN`.
const DEFAULT_TOOLCHAIN: &str = "tcpmon-bpf";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=TCPMON_BPF_TOOLCHAIN");
    // aya-build reruns this script when files under monitor-ebpf/ change, and cargo reruns it
    // when this crate's own build inputs do; nothing else. The eBPF object is also built from
    // monitor-common (the record layouts, map names, constants) and from the workspace's
    // manifest and lock file (aya-ebpf's version, the eBPF crate's profile): without these
    // lines an edit there rebuilt tcpmon around a stale object whose records the decoder
    // then misread (the loader now also refuses such an object: see SOURCE_FINGERPRINT).
    for input in ["../monitor-common", "../Cargo.toml", "../Cargo.lock"] {
        println!("cargo:rerun-if-changed={}/{input}", env!("CARGO_MANIFEST_DIR"));
    }
    let toolchain =
        std::env::var("TCPMON_BPF_TOOLCHAIN").unwrap_or_else(|_| DEFAULT_TOOLCHAIN.to_owned());
    let available = Command::new("rustup")
        .args(["run", &toolchain, "rustc", "--print", "target-libdir", "--target"])
        .arg("bpfel-unknown-none")
        .output()
        .map(|out| out.status.success())
        .unwrap_or(false);
    if !available && std::env::var_os("AYA_BUILD_SKIP").is_none() {
        anyhow::bail!(
            "the eBPF toolchain `{toolchain}` is not set up: run `cargo xtask setup` \
             (installs Debian's rustc-web, its BPF core library and bpf-linker)"
        );
    }
    // Debian's rustc is a stable compiler; aya-ebpf uses one unstable feature. Allow it for
    // that crate only. The prebuilt `core` means no `-Z build-std` (aya-build only adds it
    // when RUSTC_BOOTSTRAP names the eBPF package or is "1").
    std::env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf");
    // The workspace's release profile asks for whole-program LTO for the daemon; the eBPF
    // object is linked by bpf-linker, which does its own whole-program work: build it with
    // the default, as it was measured (BENCHMARKS.md). The variable overrides the manifest
    // for the inner cargo only: this script's environment is that cargo's.
    std::env::set_var("CARGO_PROFILE_RELEASE_LTO", "false");
    let package = aya_build::Package {
        name: "monitor-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../monitor-ebpf"),
        ..Default::default()
    };
    let out_dir =
        std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let log = out_dir.join("ebpf-build.log");
    let (built, captured) = capture_stdout(|| {
        aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain))
    })?;
    // aya-build echoes every line of the inner cargo as a `cargo:warning`, which cargo shows
    // as `warning: monitor@…: Compiling …` on every build. Keep them in a log; pass on the
    // other directives, and the lines that are diagnostics of the eBPF crate.
    std::fs::write(&log, &captured)?;
    for line in captured.lines() {
        match line.strip_prefix("cargo:warning=") {
            Some(text) if !is_progress(text) && built.is_ok() => println!("{line}"),
            Some(_) => {}
            None => println!("{line}"),
        }
    }
    built.map_err(|e| {
        anyhow::anyhow!("{e:#}\n\nthe eBPF build's output ({}):\n{captured}", log.display())
    })
}

/// Whether `line` is cargo's progress, not a diagnostic.
fn is_progress(line: &str) -> bool {
    let words = [
        "Compiling",
        "Finished",
        "Building",
        "Running",
        "Fresh",
        "Blocking",
        "Updating",
        "Locking",
        "Adding",
        "Downloading",
        "Downloaded",
        "Checking",
    ];
    let line = line.trim_start();
    line.is_empty() || words.iter().any(|word| line.starts_with(word))
}

/// Runs `f` with this process's stdout (fd 1, where build-script directives go) sent to a
/// file, and returns its result and what it printed.
fn capture_stdout<T>(f: impl FnOnce() -> T) -> anyhow::Result<(T, String)> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    let mut file = tempfile_in_out_dir()?;
    std::io::stdout().flush()?;
    // SAFETY: dup/dup2 on valid descriptors; fd 1 is restored below before anything else
    // prints.
    let saved = unsafe { libc::dup(1) };
    anyhow::ensure!(saved >= 0, "dup(1): {}", std::io::Error::last_os_error());
    anyhow::ensure!(unsafe { libc::dup2(file.as_raw_fd(), 1) } >= 0, "dup2 onto stdout failed");
    let result = f();
    std::io::stdout().flush()?;
    // SAFETY: as above.
    unsafe {
        libc::dup2(saved, 1);
        libc::close(saved);
    }
    let mut captured = String::new();
    file.rewind()?;
    file.read_to_string(&mut captured)?;
    Ok((result, captured))
}

/// A new, empty file in OUT_DIR for the capture.
fn tempfile_in_out_dir() -> std::io::Result<std::fs::File> {
    let dir = std::path::PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("ebpf-build.stdout"))
}
