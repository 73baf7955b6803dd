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
    let package = aya_build::Package {
        name: "monitor-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../monitor-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain))
}
