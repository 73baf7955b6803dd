//! Types shared by the eBPF program (`monitor-ebpf`) and the daemon (`monitor`).
//!
//! Everything here is `#[repr(C)]`, fixed-size, integers only, with explicit padding, because
//! the same bytes are written by the kernel side and read by userspace. Userspace never trusts
//! them: it converts with `TryFrom` and counts what it cannot decode.
#![no_std]

/// One `sock:inet_sock_set_state` transition of a TCP socket, as the eBPF program submits it
/// to the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateEvent {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub timestamp_ns: u64,
    /// The kernel address of the `struct sock`; the identity of a connection for its whole
    /// life (the 4-tuple is not: an active open first reports source port 0).
    pub skaddr: u64,
    /// `bpf_get_current_pid_tgid()`: tgid in the upper 32 bits, thread id in the lower. Only
    /// read for transitions that run in the owner's system call (connect, listen, close,
    /// shutdown); 0 for the others, which may run in softirq context (see DESIGN.md).
    pub pid_tgid: u64,
    /// The kernel's `TCP_*` state number before the transition.
    pub oldstate: i32,
    /// The kernel's `TCP_*` state number after the transition.
    pub newstate: i32,
    /// `sk->sk_err` read when the new state is `TCP_CLOSE` (the kernel stores the error, e.g.
    /// `ECONNREFUSED`, before `tcp_done()` changes the state); 0 on other transitions,
    /// [`SOCK_ERR_UNKNOWN`] when it could not be read.
    pub sock_err: i32,
    /// Local port, host byte order (0 until the kernel picked one).
    pub sport: u16,
    /// Remote port, host byte order.
    pub dport: u16,
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub family: u16,
    /// Explicit padding; always zero.
    pub _pad0: u16,
    /// Explicit padding; always zero.
    pub _pad1: u32,
    /// Local address. For `AF_INET` the tracepoint stores the IPv4-mapped IPv6 address.
    pub saddr: [u8; 16],
    /// Remote address, same encoding as `saddr`.
    pub daddr: [u8; 16],
    /// `bpf_get_current_comm()`: NUL-padded task name, read when `pid_tgid` is; zeros
    /// otherwise.
    pub comm: [u8; 16],
}

/// Size in bytes of [`StateEvent`]; the decoder rejects records of any other size.
pub const STATE_EVENT_SIZE: usize = core::mem::size_of::<StateEvent>();

/// `sock_err` value meaning "the program could not read `sk->sk_err`".
pub const SOCK_ERR_UNKNOWN: i32 = -1;

/// `IPPROTO_TCP`: the tracepoint also reports SCTP and MPTCP sockets, which we skip.
pub const IPPROTO_TCP: u16 = 6;

/// Number of slots in the per-CPU transition counter array: index = `old * 16 + new`.
/// Kernel TCP states are 1..=12 (`TCP_ESTABLISHED`..`TCP_NEW_SYN_RECV`), so 16 covers them.
pub const STATE_SLOTS: u32 = 16;

/// Total slots of the transition counter map.
pub const TRANSITION_SLOTS: u32 = STATE_SLOTS * STATE_SLOTS;

/// Index of the transition counter for `old -> new`, or `None` when a state is out of range.
#[inline(always)]
pub fn transition_index(old: i32, new: i32) -> Option<u32> {
    if (0..STATE_SLOTS as i32).contains(&old) && (0..STATE_SLOTS as i32).contains(&new) {
        Some(old as u32 * STATE_SLOTS + new as u32)
    } else {
        None
    }
}

/// Slots of the per-CPU `EVENT_COUNTERS` map.
pub mod counter {
    /// Events that could not be reserved in the ring buffer (ring full): lost to userspace,
    /// but still counted in the transition counters.
    pub const RING_RESERVE_FAILED: u32 = 0;
    /// TCP transitions whose states were out of range for the transition counters.
    pub const STATE_OUT_OF_RANGE: u32 = 1;
    /// Number of slots.
    pub const SLOTS: u32 = 2;
}

/// Map and program names, so the loader and the eBPF program cannot drift apart.
pub mod names {
    /// The ring buffer carrying [`super::StateEvent`] records.
    pub const EVENTS_MAP: &str = "EVENTS";
    /// Per-CPU `u64` counters, one per `(old, new)` state pair.
    pub const TRANSITIONS_MAP: &str = "TRANSITIONS";
    /// Per-CPU `u64` counters indexed by [`super::counter`].
    pub const EVENT_COUNTERS_MAP: &str = "EVENT_COUNTERS";
    /// The tracepoint program.
    pub const STATE_PROGRAM: &str = "inet_sock_set_state";
    /// Global: byte offset of `sk_err` in `struct sock` (u32::MAX disables the read).
    pub const SK_ERR_OFFSET_GLOBAL: &str = "SK_ERR_OFFSET";
    /// Global: wake userspace once this many bytes are waiting (0: wake on every event).
    pub const WAKEUP_BYTES_GLOBAL: &str = "WAKEUP_BYTES";
}

/// Byte offsets of the `sock:inet_sock_set_state` record fields the eBPF program reads.
/// The loader compares them with the running kernel's `format` file before attaching.
pub mod tracepoint_layout {
    /// `const void *skaddr`
    pub const SKADDR: usize = 8;
    /// `int oldstate`
    pub const OLDSTATE: usize = 16;
    /// `int newstate`
    pub const NEWSTATE: usize = 20;
    /// `__u16 sport`
    pub const SPORT: usize = 24;
    /// `__u16 dport`
    pub const DPORT: usize = 26;
    /// `__u16 family`
    pub const FAMILY: usize = 28;
    /// `__u16 protocol`
    pub const PROTOCOL: usize = 30;
    /// `__u8 saddr_v6[16]`
    pub const SADDR_V6: usize = 40;
    /// `__u8 daddr_v6[16]`
    pub const DADDR_V6: usize = 56;

    /// `(field name, offset, size)` for every field the program reads.
    pub const FIELDS: [(&str, usize, usize); 9] = [
        ("skaddr", SKADDR, 8),
        ("oldstate", OLDSTATE, 4),
        ("newstate", NEWSTATE, 4),
        ("sport", SPORT, 2),
        ("dport", DPORT, 2),
        ("family", FAMILY, 2),
        ("protocol", PROTOCOL, 2),
        ("saddr_v6", SADDR_V6, 16),
        ("daddr_v6", DADDR_V6, 16),
    ];
}

#[cfg(feature = "user")]
// SAFETY: StateEvent is repr(C), Copy, made of integers with explicit padding: every bit
// pattern is a valid value.
unsafe impl aya::Pod for StateEvent {}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn state_event_layout_is_stable() {
        assert_eq!(size_of::<StateEvent>(), 96);
        assert_eq!(align_of::<StateEvent>(), 8);
        assert_eq!(offset_of!(StateEvent, oldstate), 24);
        assert_eq!(offset_of!(StateEvent, sock_err), 32);
        assert_eq!(offset_of!(StateEvent, family), 40);
        assert_eq!(offset_of!(StateEvent, saddr), 48);
        assert_eq!(offset_of!(StateEvent, daddr), 64);
        assert_eq!(offset_of!(StateEvent, comm), 80);
    }

    #[test]
    fn transition_index_covers_all_kernel_states() {
        assert_eq!(transition_index(7, 2), Some(7 * 16 + 2));
        assert_eq!(transition_index(12, 12), Some(204));
        assert_eq!(transition_index(16, 1), None);
        assert_eq!(transition_index(-1, 1), None);
        assert!(transition_index(15, 15).unwrap() < TRANSITION_SLOTS);
    }
}
