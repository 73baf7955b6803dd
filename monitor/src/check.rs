//! `tcpmon check`: can tcpmon run on this host, and if not, what to do about it.
//!
//! Like `bpftool feature probe`, but for what tcpmon needs: kernel version (BPF ring buffer),
//! BTF (close reasons), tracefs, the tracepoint and its record layout, capabilities, and — when
//! it can be done without side effects — a real load and attach of the program.

use std::fmt;
use std::path::Path;

use crate::loader::tracefs::{self, FormatError, STATE_TRACEPOINT, TRACEFS};
use crate::loader::{
    self, btf, effective_capabilities, has, kernel_version, AcceptChoice, Enrichments, HookChoice,
    LoadOptions, CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, MIN_KERNEL, VMLINUX_BTF,
};

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Fine.
    Ok,
    /// tcpmon runs, with a limitation or a side effect worth knowing.
    Warn,
    /// tcpmon cannot run until this is fixed.
    Fail,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        })
    }
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// What was checked.
    pub what: &'static str,
    /// How it came out.
    pub status: Status,
    /// What was found, and for a warning or failure, what to do.
    pub detail: String,
}

fn finding(what: &'static str, status: Status, detail: impl Into<String>) -> Finding {
    Finding { what, status, detail: detail.into() }
}

/// Runs every check.
pub fn run_checks() -> Vec<Finding> {
    let mut findings = Vec::new();

    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let (major, minor) = MIN_KERNEL;
    let kernel_ok = match kernel_version(&release) {
        Some(v) if v >= MIN_KERNEL => {
            findings.push(finding(
                "kernel",
                Status::Ok,
                format!("{} (≥ {major}.{minor}: BPF ring buffer)", release.trim()),
            ));
            true
        }
        Some(_) => {
            findings.push(finding(
                "kernel",
                Status::Fail,
                format!(
                    "{} is older than {major}.{minor}, which added the BPF ring buffer: upgrade \
                     the kernel",
                    release.trim()
                ),
            ));
            false
        }
        None => {
            findings.push(finding("kernel", Status::Warn, "cannot read the kernel release"));
            true
        }
    };

    match btf::kernel_offsets(Path::new(VMLINUX_BTF)) {
        Ok(report) if report.missing.is_empty() => findings.push(finding(
            "BTF",
            Status::Ok,
            format!(
                "{VMLINUX_BTF}: all {} struct fields found (struct sock.sk_err at byte {})",
                monitor_common::KernelOffsets::FIELDS.len(),
                report.offsets.sk_err
            ),
        )),
        Ok(report) => {
            let missing: Vec<String> = report.missing.iter().map(ToString::to_string).collect();
            findings.push(finding(
                "BTF",
                Status::Warn,
                format!(
                    "tcpmon runs, but does not report what needs these fields: {}",
                    missing.join("; ")
                ),
            ))
        }
        Err(e) => findings.push(finding(
            "BTF",
            Status::Fail,
            format!("{e}: tcpmon needs the kernel's BTF to find the struct fields it reads (a kernel built with CONFIG_DEBUG_INFO_BTF=y)"),
        )),
    }

    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .as_deref()
        .and_then(effective_capabilities)
        .unwrap_or(0);
    let can_load = loader::can_load(caps);
    if can_load {
        let mut held = Vec::new();
        for (cap, name) in
            [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN")]
        {
            if has(caps, cap) {
                held.push(name);
            }
        }
        findings.push(finding("capabilities", Status::Ok, held.join(" ")));
    } else {
        findings.push(finding(
            "capabilities",
            Status::Fail,
            "missing CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN): run as root, or grant them (see deploy/systemd/tcpmon.service)",
        ));
    }

    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let tracefs = tracefs::tracefs_mount(&mounts);
    match tracefs {
        Some(root) => findings.push(finding("tracefs", Status::Ok, format!("mounted at {root}"))),
        None if has(caps, CAP_SYS_ADMIN) => findings.push(finding(
            "tracefs",
            Status::Warn,
            format!("not mounted: `tcpmon run` will mount it at {TRACEFS} (to do it at boot: `tracefs {TRACEFS} tracefs defaults 0 0` in /etc/fstab)"),
        )),
        // The BTF build needs no tracefs (the trial load below tells whether it loads).
        None => findings.push(finding(
            "tracefs",
            Status::Warn,
            format!(
                "not mounted, and mounting it needs CAP_SYS_ADMIN: `tcpmon run` does without the \
                 classic tracepoint builds (the fallbacks where the BTF builds do not load); \
                 mount it for them: `mount -t tracefs tracefs {TRACEFS}`"
            ),
        )),
    }

    if let Some(root) = tracefs {
        match STATE_TRACEPOINT.check_format(Path::new(root)) {
            Ok(()) => findings.push(finding(
                "tracepoint",
                Status::Ok,
                format!("{STATE_TRACEPOINT}, record layout as expected"),
            )),
            Err(e @ FormatError::PermissionDenied { .. }) => {
                findings.push(finding("tracepoint", Status::Fail, format!("{e} (run as root)")))
            }
            Err(e) => findings.push(finding("tracepoint", Status::Fail, e.to_string())),
        }
    }

    // The real thing, as `tcpmon run` would do it, for each build `--hook auto` may pick, but
    // changing nothing on the host: where `run` would mount tracefs, it is mounted in a mount
    // namespace of check's own; otherwise what needs tracefs is left out, as `run` would.
    if kernel_ok && can_load {
        let mount_tracefs = tracefs.is_none() && has(caps, CAP_SYS_ADMIN) && private_mounts();
        // With `--accept-wait auto`, as `run` by default: the line says whether fexit loads.
        let trial = |hook| match loader::load(LoadOptions {
            ring_bytes: 64 * 1024,
            wakeup_bytes: 0,
            mount_tracefs,
            hook,
            accept: AcceptChoice::Auto,
        }) {
            Ok(loaded) => (
                Trial::Loaded { synack: loaded.enrichments.synack.is_some() },
                Some(loaded.enrichments),
            ),
            Err(e) => (Trial::Failed(e.to_string()), None),
        };
        let (btf, btf_enrichments) = trial(HookChoice::Btf);
        let (classic, classic_enrichments) = trial(HookChoice::Tracepoint);
        findings.extend(trial_findings(&btf, &classic));
        if let Some(enrichments) = btf_enrichments.or(classic_enrichments) {
            findings.push(accept_finding(&enrichments));
        }
    }
    findings
}

/// Moves the calling thread into a mount namespace of its own whose mounts do not propagate
/// to the host's, so it can mount tracefs as `run` would without leaving it mounted. False if
/// it cannot (then nothing is mounted). Needs CAP_SYS_ADMIN. Only this thread moves (the
/// namespace is per thread, with CLONE_FS): the trial loads run on it, and the mounts they
/// read (`/proc/self/mounts`) are this thread's.
fn private_mounts() -> bool {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).is_ok()
        && mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .is_ok()
}

/// What a trial load of one build of the state program found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trial {
    /// Loaded and attached (then detached); whether SYN-ACK times came with it.
    Loaded {
        /// Whether the SYN-ACK retransmit program attached too.
        synack: bool,
    },
    /// Did not load or attach: why.
    Failed(String),
}

/// The report's lines for the trial loads of the BTF build and the classic one, judged as
/// `--hook auto` uses them: the BTF build if it loads, else the classic one. A build `auto`
/// would not use is a warning when it fails (`--hook` could still ask for it); the run fails
/// only if neither loads.
pub fn trial_findings(btf: &Trial, classic: &Trial) -> Vec<Finding> {
    let loaded = |build: &str, synack: bool| {
        let (status, synack) = match synack {
            true => (Status::Ok, "SYN-ACK times: yes"),
            false => (
                Status::Warn,
                "SYN-ACK times: no (neither build of the SYN-ACK program attached: see the log)",
            ),
        };
        let detail = format!("{build} build: loaded and attached ({synack}), then detached");
        finding("trial load", status, detail)
    };
    match (btf, classic) {
        (Trial::Loaded { synack }, Trial::Loaded { .. }) => {
            vec![loaded("btf", *synack), finding("trial load", Status::Ok, "tracepoint build: loaded and attached, then detached (`--hook auto` uses the btf build)")]
        }
        (Trial::Loaded { synack }, Trial::Failed(e)) => vec![
            loaded("btf", *synack),
            finding(
                "trial load",
                Status::Warn,
                format!("tracepoint build: {e} (`--hook auto` uses the btf build; `--hook tracepoint` would fail)"),
            ),
        ],
        (Trial::Failed(e), Trial::Loaded { synack }) => vec![
            finding(
                "trial load",
                Status::Warn,
                format!("btf build: {e} (`--hook auto` falls back to the tracepoint build; `--hook btf` would fail)"),
            ),
            loaded("tracepoint", *synack),
        ],
        (Trial::Failed(btf), Trial::Failed(classic)) => vec![
            finding("trial load", Status::Fail, format!("btf build: {btf}")),
            finding("trial load", Status::Fail, format!("tracepoint build: {classic}")),
        ],
    }
}

/// How `run --accept-wait auto` sees accept() here: through fexit, or not at all (the
/// syscall tracepoints, which tax every system call, only when asked for).
pub fn accept_finding(enrichments: &Enrichments) -> Finding {
    match enrichments.accept {
        Some(_) => finding(
            "accept wait",
            Status::Ok,
            format!("accept() seen through {}", enrichments.accept_route()),
        ),
        None => finding(
            "accept wait",
            Status::Warn,
            "fexit on inet_csk_accept does not load here (BPF trampolines refused?): the \
             accept wait and abandoned connections are off by default; `--accept-wait \
             syscalls` sees accept() through the syscall tracepoints, which slow every system \
             call on the host (BENCHMARKS.md)",
        ),
    }
}

/// Prints the report; returns whether tcpmon can run.
pub fn report(findings: &[Finding]) -> bool {
    for f in findings {
        println!("{:<5} {:<13} {}", f.status.to_string(), f.what, f.detail);
    }
    let can_run = findings.iter().all(|f| f.status != Status::Fail);
    if can_run {
        println!("tcpmon can run here.");
    } else {
        println!("tcpmon cannot run here until the FAIL lines are fixed.");
    }
    can_run
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_effective_capabilities() {
        let root = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        let caps = effective_capabilities(root).unwrap();
        assert!(has(caps, CAP_BPF) && has(caps, CAP_PERFMON) && has(caps, CAP_SYS_ADMIN));
        let none = effective_capabilities("CapEff:\t0000000000000000\n").unwrap();
        assert!(!has(none, CAP_BPF));
        assert_eq!(effective_capabilities("no caps here"), None);
    }

    fn statuses(btf: &Trial, classic: &Trial) -> Vec<Status> {
        trial_findings(btf, classic).iter().map(|f| f.status).collect()
    }

    #[test]
    fn the_verdict_is_what_hook_auto_does() {
        let with_synack = Trial::Loaded { synack: true };
        let without = Trial::Loaded { synack: false };
        let failed = Trial::Failed("BPF program is too large".into());
        assert_eq!(statuses(&with_synack, &with_synack), [Status::Ok, Status::Ok]);
        // The classic build failing where the BTF one loads (Linux 5.10 and 6.1 before the
        // fix): auto runs, `--hook tracepoint` would not.
        let lines = trial_findings(&with_synack, &failed);
        assert_eq!(lines[1].status, Status::Warn);
        assert!(
            lines[1].detail.contains("too large") && lines[1].detail.contains("--hook tracepoint")
        );
        // Auto falls back: runs.
        assert_eq!(statuses(&failed, &with_synack), [Status::Warn, Status::Ok]);
        // Nothing loads: cannot run, and both say why.
        let lines = trial_findings(&failed, &failed);
        assert!(lines.iter().all(|l| l.status == Status::Fail && l.detail.contains("too large")));
        // No SYN-ACK times with the build auto uses: a warning.
        assert_eq!(statuses(&without, &with_synack), [Status::Warn, Status::Ok]);
    }
}
