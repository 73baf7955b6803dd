//! What the host must offer before anything is loaded: a kernel new enough, and the
//! capabilities (read from `/proc/self/status`, as `tcpmon check` shows them).

/// The oldest kernel tcpmon runs on: 5.8 added the BPF ring buffer.
pub const MIN_KERNEL: (u32, u32) = (5, 8);

/// `(major, minor)` of a kernel release such as `6.18.44-fc`.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut numbers = release.trim().split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty());
    Some((numbers.next()?.parse().ok()?, numbers.next()?.parse().ok()?))
}

/// Capability numbers (linux/capability.h).
pub const CAP_SYS_ADMIN: u32 = 21;
/// See [`CAP_SYS_ADMIN`].
pub const CAP_PERFMON: u32 = 38;
/// See [`CAP_SYS_ADMIN`].
pub const CAP_BPF: u32 = 39;

/// The effective capability set from `/proc/self/status` (`CapEff:` in hex).
pub fn effective_capabilities(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

/// Whether `caps` holds capability `cap`.
pub fn has(caps: u64, cap: u32) -> bool {
    caps & (1 << cap) != 0
}

/// Whether a seccomp filter applies to this process (`Seccomp: 2` in `/proc/self/status`).
pub fn seccomp_filtered(status: &str) -> bool {
    status.lines().find_map(|l| l.strip_prefix("Seccomp:")).is_some_and(|mode| mode.trim() == "2")
}

/// Whether `caps` suffice to load and attach the programs.
pub fn can_load(caps: u64) -> bool {
    has(caps, CAP_SYS_ADMIN) || (has(caps, CAP_BPF) && has(caps, CAP_PERFMON))
}
