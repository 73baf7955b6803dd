//! Project tasks: `cargo xtask setup | run | test | bench | soak | package | kernels`.
//!
//! `setup` makes a fresh Debian machine able to build the eBPF program: Debian's Rust with
//! its prebuilt `core` for the BPF target, bpf-linker, a rustup toolchain entry tying them
//! together, and the tools the tests use. It is idempotent and quick when nothing is missing.
//! `run` and `test` call it first, so the README needs only those two commands.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod accept;
mod bench;
mod bpfstats;
mod churn;
mod image;
mod kernels;
mod namespaces;
mod package;
mod setup;
mod soak;
mod spread;

/// tcpmon's project tasks.
#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install or verify everything the build and the tests need (root, Debian).
    Setup,
    /// Set up, build in release mode and run the daemon: `cargo xtask run -- [tcpmon run flags]`.
    Run {
        /// Flags passed to `tcpmon run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure tcpmon against no monitor and the installed peers; writes BENCHMARKS.md (root).
    Bench {
        /// Seconds of churn per run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Interleaved rounds.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Short run (1 s, 1 round) that writes no report: checks the bench works.
        #[arg(long)]
        smoke: bool,
    },
    /// (Used by bench) hold N loopback connections open until stdin closes.
    #[command(hide = true)]
    Hold {
        /// Connections to hold.
        #[arg(long)]
        connections: usize,
    },
    /// Run the release daemon under churn with a tail and scrapes for MINUTES; checks RSS stays
    /// flat and no event goes unaccounted (root).
    Soak {
        /// How long, in minutes.
        #[arg(long, default_value_t = 5)]
        minutes: u64,
    },
    /// Loopback connection churn (connect, 1-byte echo, close) for a fixed time.
    Churn {
        /// How long to run, in seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Client threads.
        #[arg(long, default_value_t = 2)]
        clients: usize,
    },
    /// Build the Debian package (`tcpmon_<version>_amd64.deb`) and the container image
    /// (`tcpmon_<version>_oci.tar`, loads as `localhost/tcpmon:<version>`) into DIR.
    Package {
        /// Where to put it.
        #[arg(long, default_value = "target/package")]
        out: PathBuf,
    },
    /// Boot the Debian kernels of the matrix (5.10, 6.1, 6.12, newest) in qemu and check both
    /// builds of the program in each; writes the README's "Supported kernels" table (root).
    Kernels {
        /// Only these series (5.10, 6.1, 6.12, newest); the README is then left alone.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// (Run inside the matrix's VMs) the guest's scenario for each hook.
    #[command(hide = true)]
    Guest {
        /// The builds to run, comma-separated.
        #[arg(long, value_delimiter = ',')]
        hooks: Vec<String>,
    },
    /// Set up, then check formatting, lint, and run every test (kernel tests need root).
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy`.
        #[arg(long)]
        no_lint: bool,
        /// The inner loop: lint, unit and kernel tests only; no package, image, systemd
        /// container, kernel matrix or benchmark (CI runs the full suite).
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.task {
        Task::Setup => setup::ensure(),
        Task::Run { args } => {
            setup::ensure()?;
            cargo(&["build", "--release", "--package", "monitor", "--bin", "tcpmon"])?;
            let binary = workspace_root().join("target/release/tcpmon");
            let status = Command::new(&binary)
                .arg("run")
                .args(&args)
                .status()
                .with_context(|| format!("starting {}", binary.display()))?;
            if !status.success() {
                bail!("tcpmon exited with {status}");
            }
            Ok(())
        }
        Task::Bench { seconds, rounds, smoke } => {
            setup::ensure()?;
            let options = if smoke {
                bench::Options::smoke()
            } else {
                bench::Options {
                    seconds,
                    rounds,
                    report: Some(workspace_root().join("BENCHMARKS.md")),
                    held_connections: 50_000,
                    verdicts: true,
                    namespaces: &[1, 100, 300],
                }
            };
            bench::run(options)
        }
        Task::Hold { connections } => bench::hold(connections),
        Task::Soak { minutes } => {
            setup::ensure()?;
            soak::run(minutes)
        }
        Task::Churn { seconds, clients } => {
            let report = churn::run(std::time::Duration::from_secs(seconds), clients)?;
            println!(
                "churn: {} connections in {:.2}s = {:.0}/s ({} errors)",
                report.connections,
                report.elapsed.as_secs_f64(),
                report.per_second(),
                report.errors
            );
            Ok(())
        }
        Task::Package { out } => {
            setup::ensure()?;
            let out = if out.is_absolute() { out } else { workspace_root().join(out) };
            build_artefacts(&out)
        }
        Task::Kernels { only } => {
            setup::ensure()?;
            kernels::run_matrix(&only, true).map(|_| ())
        }
        Task::Guest { hooks } => kernels::guest::run(&hooks),
        Task::Test { no_lint, quick } => {
            setup::ensure()?;
            if !no_lint {
                cargo(&["fmt", "--all", "--check"])?;
                // Default members only: the eBPF crate cannot be built for the host.
                cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
                // No crate of the workspace, the eBPF one included, depends on a crate it
                // does not use (called directly: as `cargo machete` under xtask's cargo it
                // takes the subcommand's name for a path).
                machete()?;
            }
            if quick {
                // The artefact tests skip themselves without artefacts when told to.
                let (passed, failed) = cargo_test(&[("TCPMON_SKIP_PACKAGE_TESTS", "1")])?;
                println!(
                    "tests: {passed} passed, {failed} failed (quick: no package, image, systemd \
                     container, kernel matrix or benchmark)"
                );
                return Ok(());
            }
            // The package, image and systemd tests install and run what this builds
            // (monitor/tests/package.rs, image.rs, systemd.rs).
            build_artefacts(&workspace_root().join(PACKAGE_DIR))?;
            let (passed, failed) = cargo_test(&[])?;
            // Both builds of the program on every kernel of the matrix, in VMs: one test per
            // (kernel, build), each of several checks.
            let matrix = kernels::run_matrix(&[], false)?;
            // The benchmark's timings are not assertions (these machines are noisy); this only
            // checks that `cargo xtask bench` still runs end to end.
            bench::run(bench::Options::smoke())?;
            // One closing line for the whole suite (cargo's last line is the doc-test run).
            println!("tests: {} passed, {failed} failed", passed + matrix);
            Ok(())
        }
    }
}

/// Builds the Debian package and the image from one release binary.
fn build_artefacts(out: &Path) -> Result<()> {
    let (binary, version) = package::release_binary()?;
    package::build(out, &binary, &version)?;
    image::build(out, &binary, &version)?;
    Ok(())
}

/// Where `cargo xtask test` puts the package and the image its tests install.
const PACKAGE_DIR: &str = "target/package";

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new(".")).to_path_buf()
}

/// Runs `cargo test` with `env` added, echoing its output, and totals its `test result:`
/// lines.
fn cargo_test(env: &[(&str, &str)]) -> Result<(u64, u64)> {
    use std::io::BufRead;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("xtask: cargo test");
    let mut child = Command::new(&cargo)
        .arg("test")
        .envs(env.iter().copied())
        .current_dir(workspace_root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cargo}"))?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(word)?
                            .trim()
                            .rsplit(' ')
                            .next()?
                            .parse::<u64>()
                            .ok()
                    })
                    .unwrap_or(0)
            };
            passed += count("passed");
            failed += count("failed");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`cargo test` failed ({status}): {passed} passed, {failed} failed");
    }
    Ok((passed, failed))
}

/// Replaces what lies between the lines `begin` and `end` of the file at `path` with
/// `content`, keeping the rest of the file (hand-written prose around generated tables).
/// Written beside it, then renamed: an error never leaves half a file.
pub fn write_between_markers(path: &Path, begin: &str, end: &str, content: &str) -> Result<()> {
    use std::io::Write as _;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let start = text.find(begin);
    let stop = start.and_then(|b| text[b..].find(end).map(|e| b + e));
    let (Some(start), Some(stop)) = (start, stop) else {
        bail!("{} has no {begin} … {end} markers", path.display());
    };
    let updated = format!("{}{begin}\n{content}{}", &text[..start], &text[stop..]);
    let partial = path.with_extension("md.partial");
    std::fs::File::create(&partial)?.write_all(updated.as_bytes())?;
    std::fs::rename(&partial, path)?;
    Ok(())
}

/// Runs cargo in the workspace root.
/// `cargo-machete` on the workspace: fails when a crate depends on one it does not use.
fn machete() -> Result<()> {
    println!("xtask: cargo-machete");
    let status = Command::new("cargo-machete")
        .arg(workspace_root())
        .status()
        .context("starting cargo-machete (cargo xtask setup installs it)")?;
    if !status.success() {
        bail!("cargo-machete found a dependency nothing uses ({status})");
    }
    Ok(())
}

pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("xtask: cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("starting {cargo}"))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
