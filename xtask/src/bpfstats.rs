//! The kernel's own accounting of BPF programs (`kernel.bpf_stats_enabled`, read through
//! `bpftool prog show`): how long each program ran and how often.

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{Context, Result};

/// The sysctl that makes the kernel time every program run.
pub const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// One loaded program's totals.
#[derive(Clone, Debug, Default)]
pub struct ProgStats {
    /// Its name as the kernel keeps it (at most 15 characters).
    pub name: String,
    /// ns spent in it while stats were on.
    pub run_time_ns: u64,
    /// Runs while stats were on.
    pub run_cnt: u64,
}

/// Every loaded program, by id.
pub fn bpf_programs() -> Result<BTreeMap<u64, ProgStats>> {
    let out =
        Command::new("bpftool").args(["prog", "show", "-j"]).output().context("running bpftool")?;
    let programs: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("bpftool output")?;
    let mut map = BTreeMap::new();
    for p in programs.as_array().into_iter().flatten() {
        let Some(id) = p["id"].as_u64() else { continue };
        map.insert(
            id,
            ProgStats {
                name: p["name"].as_str().unwrap_or_default().to_owned(),
                run_time_ns: p["run_time_ns"].as_u64().unwrap_or(0),
                run_cnt: p["run_cnt"].as_u64().unwrap_or(0),
            },
        );
    }
    Ok(map)
}

/// Turns `kernel.bpf_stats_enabled` on or off.
pub fn bpf_stats(on: bool) -> Result<()> {
    std::fs::write(STATS_SYSCTL, if on { "1" } else { "0" })
        .context("setting kernel.bpf_stats_enabled (root needed)")
}

/// Whether a program (by its kernel name, cut at 15 characters) is one of tcpmon's accept
/// hooks: `sys_exit_accept` or `inet_csk_accept_exit*`.
pub fn is_accept_program(name: &str) -> bool {
    name.starts_with("sys_exit_accept") || name.starts_with("inet_csk_accep")
}
