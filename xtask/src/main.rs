//! Project tasks: `cargo xtask setup | run | test`.
//!
//! `setup` makes a fresh Debian machine able to build the eBPF program: Debian's Rust with
//! its prebuilt `core` for the BPF target, bpf-linker, a rustup toolchain entry tying them
//! together, and the tools the tests use. It is idempotent and quick when nothing is missing.
//! `run` and `test` call it first, so the README needs only those two commands.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod churn;
mod setup;

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
    /// Loopback connection churn (connect, 1-byte echo, close) for a fixed time.
    Churn {
        /// How long to run, in seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Client threads.
        #[arg(long, default_value_t = 2)]
        clients: usize,
    },
    /// Set up, then check formatting, lint, and run every test (kernel tests need root).
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy`.
        #[arg(long)]
        no_lint: bool,
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
        Task::Test { no_lint } => {
            setup::ensure()?;
            if !no_lint {
                cargo(&["fmt", "--all", "--check"])?;
                // Default members only: the eBPF crate cannot be built for the host.
                cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
            }
            cargo(&["test"])
        }
    }
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new(".")).to_path_buf()
}

fn cargo(args: &[&str]) -> Result<()> {
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
