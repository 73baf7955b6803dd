//! Types shared by the eBPF program (`monitor-ebpf`) and the daemon (`monitor`).
//!
//! Everything here is `#[repr(C)]`, fixed-size, integers only, with explicit padding, because
//! the same bytes are written by the kernel side and read by userspace. Userspace never trusts
//! them: it converts with `TryFrom` and counts what it cannot decode.
#![no_std]

/// A fingerprint of this file, the whole of `monitor-common`. The eBPF object embeds the
/// value it was compiled with (symbol [`names::FINGERPRINT_SYMBOL`]) and the loader refuses an
/// object whose value differs from its own: an object built before an edit here could write
/// records that the decoder reads another way (fields moved, sizes or constants changed).
/// Every byte counts, comments included: cheap, and it can never miss a change.
pub const SOURCE_FINGERPRINT: u64 = fnv1a(include_bytes!("lib.rs"));

/// FNV-1a, 64 bits.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    let mut at = 0;
    while at < bytes.len() {
        hash ^= bytes[at] as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        at += 1;
    }
    hash
}

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
    /// shutdown); 0 for the others, which may run in softirq context
    /// (docs/ARCHITECTURE.md, "Who owns a transition").
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
    /// Inode number of the socket's network namespace (as in `/proc/PID/ns/net`), read on
    /// the transitions that start a socket's life and on CLOSE; 0 when not read.
    pub netns: u32,
    /// Local address. For `AF_INET` the tracepoint stores the IPv4-mapped IPv6 address.
    pub saddr: [u8; 16],
    /// Remote address, same encoding as `saddr`.
    pub daddr: [u8; 16],
    /// `bpf_get_current_comm()`: NUL-padded task name, read when `pid_tgid` is; zeros
    /// otherwise.
    pub comm: [u8; 16],
    /// The socket's cgroup v2 id (`sk->sk_cgrp_data.cgroup->kn->id`, the inode number of the
    /// cgroup's directory), read with `netns`; 0 when not read. `cgroup_sk_alloc()` gives a
    /// socket the cgroup of the task that creates it (connect, listen); an accepted child
    /// copies its listener's (`sk_clone_lock()` → `cgroup_sk_clone()`).
    pub cgroup_id: u64,
}

/// Size in bytes of [`StateEvent`].
pub const STATE_EVENT_SIZE: usize = core::mem::size_of::<StateEvent>();

/// Counters of the socket's `struct tcp_sock` (the ones `ss -i` and `tcplife` show), read by
/// the eBPF program at the transitions where they mean something: handshake completion
/// (only `total_retrans`, which then counts SYN or SYN-ACK retransmissions, and `srtt_us`,
/// the handshake's RTT sample; the rest are zero) and CLOSE (totals of the connection's life).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpStats {
    /// `tcp_sock.bytes_acked` (RFC 4898 `tcpEStatsAppHCThruOctetsAcked`): sequence space the
    /// peer acknowledged, so payload plus 1 for our SYN (active opens) and 1 for our FIN.
    pub bytes_acked: u64,
    /// `tcp_sock.bytes_received` (`tcpEStatsAppHCThruOctetsReceived`): sequence space
    /// received in order, so payload plus 1 for the peer's FIN.
    pub bytes_received: u64,
    /// `tcp_sock.bytes_sent`: payload bytes transmitted, retransmissions included.
    pub bytes_sent: u64,
    /// `tcp_sock.bytes_retrans`: payload bytes retransmitted.
    pub bytes_retrans: u64,
    /// `tcp_sock.segs_out`: segments sent, retransmissions included.
    pub segs_out: u32,
    /// `tcp_sock.segs_in`: segments received.
    pub segs_in: u32,
    /// `tcp_sock.total_retrans`: segments retransmitted over the socket's life. A passive
    /// child starts with its request socket's SYN-ACK retransmissions (`tcp_create_openreq_child`).
    pub total_retrans: u32,
    /// `tcp_sock.srtt_us`: smoothed RTT in microseconds, left-shifted by 3 as the kernel keeps it.
    pub srtt_us_x8: u32,
    /// Low 32 bits of `sk->sk_flags` (`enum sock_flags` bits: [`SOCK_DONE`] is set by
    /// `tcp_fin()` when the peer's FIN arrives).
    pub sk_flags: u32,
    /// 1 when every counter the program meant to read was read (their offsets are known and
    /// no read faulted); 0 otherwise, and then userspace reports none of them.
    pub complete: u32,
}

impl TcpStats {
    /// Payload bytes sent, each counted once: transmitted minus retransmitted.
    pub fn payload_sent(&self) -> u64 {
        self.bytes_sent.saturating_sub(self.bytes_retrans)
    }

    /// Payload bytes received in order: `bytes_received` without the peer's FIN, which takes
    /// one sequence number (`tcp_data_queue` advances `rcv_nxt` over it before `tcp_fin()`
    /// marks the socket [`SOCK_DONE`]).
    pub fn payload_received(&self) -> u64 {
        let fin = u64::from(self.sk_flags >> SOCK_DONE & 1);
        self.bytes_received.saturating_sub(fin)
    }
}

/// `enum sock_flags` bit set by `tcp_fin()` (include/net/sock.h; unchanged since Linux 2.6).
pub const SOCK_DONE: u32 = 1;

/// A [`StateEvent`] followed by the socket's [`TcpStats`]: submitted instead of a plain
/// `StateEvent` for transitions to CLOSE and for SYN_SENT/SYN_RECV → ESTABLISHED.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateEventWithStats {
    /// The transition.
    pub event: StateEvent,
    /// The socket's counters at the transition.
    pub stats: TcpStats,
}

/// Size in bytes of [`StateEventWithStats`].
pub const STATE_EVENT_WITH_STATS_SIZE: usize = core::mem::size_of::<StateEventWithStats>();

/// A fact about one socket: a reset sent or received (the BTF tracepoints `tcp:tcp_send_reset`
/// and `tcp:tcp_receive_reset`), or its accept() by the application. Ring records are told apart by their length:
/// [`STATE_EVENT_SIZE`], [`STATE_EVENT_WITH_STATS_SIZE`], [`NOTE_SIZE`] or [`SYNACK_RETRANSMIT_SIZE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketNote {
    /// `bpf_ktime_get_ns()`.
    pub timestamp_ns: u64,
    /// The socket the note is about (0: none, e.g. a reset sent for a segment no socket owns).
    pub skaddr: u64,
    /// One of [`note`].
    pub kind: u32,
    /// Reserved for a kind-specific value; 0 today.
    pub value: u32,
    /// Reserved; always zero.
    pub _reserved: u64,
}

/// Size in bytes of [`SocketNote`].
pub const NOTE_SIZE: usize = core::mem::size_of::<SocketNote>();

/// Kinds of [`SocketNote`].
pub mod note {
    /// The kernel sent a RST for this socket (`tcp:tcp_send_reset`).
    pub const RESET_SENT: u32 = 2;
    /// The socket processed a RST from the peer (`tcp:tcp_receive_reset`).
    pub const RESET_RECEIVED: u32 = 3;
    /// The application's accept() (or accept4()) returned this socket: it left its
    /// listener's accept queue (`syscalls:sys_exit_accept4`, `syscalls:sys_exit_accept`).
    pub const ACCEPTED: u32 = 4;
}

/// A SYN-ACK retransmission (`tcp:tcp_retransmit_synack`), with the request socket's 4-tuple
/// (which its child socket will have) and the time its *first* SYN-ACK left. The state
/// tracepoint never sees request sockets, so this is how an accepted connection's handshake
/// gets its start when the SYN-ACK had to be resent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynAckRetransmit {
    /// `bpf_ktime_get_ns()`.
    pub timestamp_ns: u64,
    /// `tcp_rsk(req)->snt_synack`: CLOCK_MONOTONIC µs of the first SYN-ACK (set once, in
    /// `tcp_make_synack`); 0 when it could not be read.
    pub first_synack_us: u64,
    /// Local (listening) port, host byte order.
    pub sport: u16,
    /// Remote port, host byte order.
    pub dport: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// [`SYNACK_CLIENT_ACKED`] or 0.
    pub flags: u16,
    /// Local address, IPv4-mapped for `AF_INET` (as in [`StateEvent`]).
    pub saddr: [u8; 16],
    /// Remote address, same encoding.
    pub daddr: [u8; 16],
}

/// [`SynAckRetransmit::flags`]: the client's final ACK had arrived (`inet_rsk(req)->acked`),
/// but the listener's accept queue was full, so the kernel dropped it and resends the SYN-ACK
/// until there is room (`tcp_check_req()`, `listen_overflow`; with `tcp_abort_on_overflow`
/// off, the default). Not set for a `TCP_DEFER_ACCEPT` listener, whose `tcp_check_req()`
/// also drops a bare ACK and marks the request acked while it waits for data.
pub const SYNACK_CLIENT_ACKED: u16 = 1;

/// Size in bytes of [`SynAckRetransmit`].
pub const SYNACK_RETRANSMIT_SIZE: usize = core::mem::size_of::<SynAckRetransmit>();

/// One kernel struct member the programs read: `struct {structure}.{path}`, with anonymous
/// members searched through as C does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelField {
    /// The field of [`KernelOffsets`] that holds its offset.
    pub name: &'static str,
    /// The struct, e.g. `sock`.
    pub structure: &'static str,
    /// The member, then members of that member, e.g. `["__sk_common", "skc_net"]`.
    pub path: &'static [&'static str],
}

/// Declares [`KernelOffsets`] from one list: each field with its docs and the kernel struct
/// member it is the offset of. The struct, [`KernelOffsets::UNKNOWN`] and
/// [`KernelOffsets::FIELDS`] (what the loader looks up in the BTF) come from the same lines,
/// so they cannot drift apart.
macro_rules! kernel_offsets {
    ($($(#[$doc:meta])* $field:ident: $structure:ident $(. $member:ident)+,)+) => {
        /// Byte offsets of the kernel struct fields the programs read, found by the loader in
        /// the running kernel's BTF (`/sys/kernel/btf/vmlinux`), never compiled in.
        /// [`OFFSET_UNKNOWN`] disables a read.
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct KernelOffsets {
            $($(#[$doc])* pub $field: u32,)+
            /// Explicit padding; always zero.
            pub _pad: u32,
        }

        impl KernelOffsets {
            /// Every read disabled.
            pub const UNKNOWN: KernelOffsets =
                KernelOffsets { $($field: OFFSET_UNKNOWN,)+ _pad: 0 };

            /// Where each offset comes from, in the order of the struct's fields.
            pub const FIELDS: &'static [KernelField] = &[$(KernelField {
                name: stringify!($field),
                structure: stringify!($structure),
                path: &[$(stringify!($member)),+],
            },)+];

            /// Every offset, in the order of [`Self::FIELDS`], to be filled in.
            pub fn slots_mut(&mut self) -> [&mut u32; Self::FIELDS.len()] {
                [$(&mut self.$field,)+]
            }
        }
    };
}

kernel_offsets! {
    /// `struct sock.sk_err`.
    sk_err: sock.sk_err,
    /// `struct sock.__sk_common.skc_net` (a `struct net *`).
    skc_net: sock.__sk_common.skc_net,
    /// `struct net.ns.inum`.
    net_inum: net.ns.inum,
    /// `struct tcp_sock.bytes_acked`.
    bytes_acked: tcp_sock.bytes_acked,
    /// `struct tcp_sock.bytes_received`.
    bytes_received: tcp_sock.bytes_received,
    /// `struct tcp_sock.segs_out`.
    segs_out: tcp_sock.segs_out,
    /// `struct tcp_sock.segs_in`.
    segs_in: tcp_sock.segs_in,
    /// `struct tcp_sock.total_retrans`.
    total_retrans: tcp_sock.total_retrans,
    /// `struct tcp_sock.srtt_us`.
    srtt_us: tcp_sock.srtt_us,
    /// `struct tcp_request_sock.snt_synack`.
    snt_synack: tcp_request_sock.snt_synack,
    /// `struct tcp_sock.bytes_sent`.
    bytes_sent: tcp_sock.bytes_sent,
    /// `struct tcp_sock.bytes_retrans`.
    bytes_retrans: tcp_sock.bytes_retrans,
    /// `struct sock.__sk_common.skc_flags` (`sk_flags`).
    sk_flags: sock.__sk_common.skc_flags,
    /// `struct sock.__sk_common.skc_family`.
    skc_family: sock.__sk_common.skc_family,
    /// `struct sock.__sk_common.skc_num`: local port, host byte order.
    skc_num: sock.__sk_common.skc_num,
    /// `struct sock.__sk_common.skc_dport`: remote port, network byte order.
    skc_dport: sock.__sk_common.skc_dport,
    /// `struct sock.__sk_common.skc_rcv_saddr`: local IPv4 address.
    skc_rcv_saddr: sock.__sk_common.skc_rcv_saddr,
    /// `struct sock.__sk_common.skc_daddr`: remote IPv4 address.
    skc_daddr: sock.__sk_common.skc_daddr,
    /// `struct sock.__sk_common.skc_v6_rcv_saddr`: local IPv6 address.
    skc_v6_rcv_saddr: sock.__sk_common.skc_v6_rcv_saddr,
    /// `struct sock.__sk_common.skc_v6_daddr`: remote IPv6 address.
    skc_v6_daddr: sock.__sk_common.skc_v6_daddr,
    /// `struct sock.sk_protocol` (a plain `u16` since Linux 5.6; a bitfield before, then
    /// unknown).
    sk_protocol: sock.sk_protocol,
    /// `struct tcp_sock.inet_conn.icsk_inet.inet_sport`: local port, network byte order.
    /// Unlike `skc_num`, which `inet_put_port()` zeroes before the state becomes CLOSE, it
    /// keeps the port (the classic tracepoint reports this one).
    inet_sport: tcp_sock.inet_conn.icsk_inet.inet_sport,
    /// `struct task_struct.pid`: the thread id.
    task_pid: task_struct.pid,
    /// `struct task_struct.tgid`: the process id.
    task_tgid: task_struct.tgid,
    /// `struct task_struct.comm`: the task name, 16 bytes.
    task_comm: task_struct.comm,
    /// `struct sock.sk_cgrp_data.cgroup` (a `struct cgroup *`; Linux 5.15+, before that the
    /// pointer hid in a tagged `u64` and the offset is unknown).
    sk_cgroup: sock.sk_cgrp_data.cgroup,
    /// `struct cgroup.kn` (a `struct kernfs_node *`).
    cgroup_kn: cgroup.kn,
    /// `struct kernfs_node.id`: the cgroup id, `u64` since Linux 5.5.
    kernfs_id: kernfs_node.id,
    /// `struct request_sock.__req_common.skc_listener` (`rsk_listener`): the listener a
    /// request socket belongs to.
    req_listener: request_sock.__req_common.skc_listener,
    /// `struct inet_connection_sock.icsk_accept_queue.rskq_defer_accept`: the listener's
    /// `TCP_DEFER_ACCEPT` retries (0: off).
    defer_accept: inet_connection_sock.icsk_accept_queue.rskq_defer_accept,
    /// `struct task_struct.files` (a `struct files_struct *`): the task's open files.
    task_files: task_struct.files,
    /// `struct files_struct.fdt` (a `struct fdtable *`).
    files_fdt: files_struct.fdt,
    /// `struct fdtable.max_fds`: how many slots `fd` has.
    fdt_max_fds: fdtable.max_fds,
    /// `struct fdtable.fd` (a `struct file **`): the file of each descriptor.
    fdt_fd: fdtable.fd,
    /// `struct file.private_data`: a socket file's `struct socket *`.
    file_private_data: file.private_data,
    /// `struct socket.file`: the file a socket belongs to (checks that a file is a socket's).
    socket_file: socket.file,
    /// `struct socket.sk`: the socket's `struct sock *`.
    socket_sk: socket.sk,
}

/// "This offset could not be found": the program skips the read.
pub const OFFSET_UNKNOWN: u32 = u32::MAX;

impl KernelOffsets {
    /// Whether every field the BTF state program reads from the socket is known: without
    /// them only the classic tracepoint, which copies them for us, can run.
    pub fn socket_fields_known(&self) -> bool {
        [
            self.skc_family,
            self.skc_num,
            self.skc_dport,
            self.skc_rcv_saddr,
            self.skc_daddr,
            self.skc_v6_rcv_saddr,
            self.skc_v6_daddr,
            self.sk_protocol,
            self.inet_sport,
        ]
        .iter()
        .all(|&offset| offset != OFFSET_UNKNOWN)
    }

    /// Whether every field the accept program follows from the current task to the accepted
    /// socket is known: task → files → fd table → file → socket → sock.
    pub fn accept_fields_known(&self) -> bool {
        [
            self.task_files,
            self.files_fdt,
            self.fdt_max_fds,
            self.fdt_fd,
            self.file_private_data,
            self.socket_file,
            self.socket_sk,
        ]
        .iter()
        .all(|&offset| offset != OFFSET_UNKNOWN)
    }
}

/// `sock_err` value meaning "the program could not read `sk->sk_err`".
pub const SOCK_ERR_UNKNOWN: i32 = -1;

/// `AF_INET` from `<sys/socket.h>`.
pub const AF_INET: u16 = 2;
/// `AF_INET6` from `<sys/socket.h>`.
pub const AF_INET6: u16 = 10;

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
    /// Socket notes (SYN-ACK facts, resets) that could not be reserved in the ring buffer.
    pub const NOTE_RESERVE_FAILED: u32 = 2;
    /// Number of slots.
    pub const SLOTS: u32 = 3;
}

/// Rare conditions the programs log through aya-log (at most once per CPU per kind per
/// second: slots of the per-CPU `LOGGED_AT` map, which holds when each was last logged).
pub mod log_kind {
    /// A transition's record found its ring full (warn).
    pub const RING_FULL: u32 = 0;
    /// A note's record found its ring full (warn).
    pub const NOTE_RING_FULL: u32 = 1;
    /// A read of a socket's memory failed, or a state was out of range (debug).
    pub const ANOMALY: u32 = 2;
    /// A SYN-ACK retransmission's listener could not be read (debug).
    pub const SYNACK_LISTENER: u32 = 3;
    /// Number of slots.
    pub const SLOTS: u32 = 4;
}

/// Most ring buffers the programs use: one per CPU up to this many; more CPUs share them.
pub const MAX_RINGS: usize = 16;

/// The one list of the ring maps: calls `$then!` with `index NAME` for each of the
/// [`MAX_RINGS`] rings. The eBPF program declares the maps from it, and the loader finds
/// them by the names it makes ([`names::EVENTS_MAPS`]).
#[macro_export]
macro_rules! with_rings {
    ($then:ident) => {
        $then! {
            0 EVENTS0, 1 EVENTS1, 2 EVENTS2, 3 EVENTS3, 4 EVENTS4, 5 EVENTS5, 6 EVENTS6,
            7 EVENTS7, 8 EVENTS8, 9 EVENTS9, 10 EVENTS10, 11 EVENTS11, 12 EVENTS12, 13 EVENTS13,
            14 EVENTS14, 15 EVENTS15
        }
    };
}

/// The ring names of a [`with_rings`] list.
macro_rules! ring_names {
    ($($index:literal $name:ident),+) => {
        [$(stringify!($name)),+]
    };
}

/// A socket's birth: connect() (CLOSE → SYN_SENT), listen() (CLOSE → LISTEN), or a passive
/// child cloned from its listener (LISTEN → SYN_RECV); the kernel moves a socket out of CLOSE
/// only in `tcp_connect()` and `inet_csk_listen_start()`. The program reads the socket's
/// namespace and cgroup there; the tracker starts a new entry there.
#[inline(always)]
pub fn is_birth(old: i32, new: i32) -> bool {
    use tcp_state::{CLOSE, LISTEN, SYN_RECV, SYN_SENT};
    matches!((old, new), (CLOSE, SYN_SENT) | (CLOSE, LISTEN) | (LISTEN, SYN_RECV))
}

/// The kernel's TCP states (include/net/tcp_states.h), as the records carry them.
pub mod tcp_state {
    /// `TCP_ESTABLISHED`
    pub const ESTABLISHED: i32 = 1;
    /// `TCP_SYN_SENT`
    pub const SYN_SENT: i32 = 2;
    /// `TCP_SYN_RECV`
    pub const SYN_RECV: i32 = 3;
    /// `TCP_FIN_WAIT1`
    pub const FIN_WAIT1: i32 = 4;
    /// `TCP_FIN_WAIT2`
    pub const FIN_WAIT2: i32 = 5;
    /// `TCP_TIME_WAIT`
    pub const TIME_WAIT: i32 = 6;
    /// `TCP_CLOSE`
    pub const CLOSE: i32 = 7;
    /// `TCP_CLOSE_WAIT`
    pub const CLOSE_WAIT: i32 = 8;
    /// `TCP_LAST_ACK`
    pub const LAST_ACK: i32 = 9;
    /// `TCP_LISTEN`
    pub const LISTEN: i32 = 10;
    /// `TCP_CLOSING`
    pub const CLOSING: i32 = 11;
    /// `TCP_NEW_SYN_RECV`
    pub const NEW_SYN_RECV: i32 = 12;
}

/// Map and program names, so the loader and the eBPF program cannot drift apart.
pub mod names {
    /// The ring buffers carrying the records, one per CPU: `EVENTS0` ..
    /// `EVENTS{MAX_RINGS - 1}`.
    pub const EVENTS_MAPS: [&str; super::MAX_RINGS] = with_rings!(ring_names);
    /// Global: how many of the rings are in use.
    pub const RINGS_GLOBAL: &str = "RINGS";
    /// Per-CPU `u64` counters, one per `(old, new)` state pair.
    pub const TRANSITIONS_MAP: &str = "TRANSITIONS";
    /// Per-CPU `u64` counters indexed by [`super::counter`].
    pub const EVENT_COUNTERS_MAP: &str = "EVENT_COUNTERS";
    /// The classic tracepoint build of the state program.
    pub const STATE_PROGRAM: &str = "inet_sock_set_state";
    /// The BTF tracepoint build of the state program.
    pub const STATE_BTF_PROGRAM: &str = "inet_sock_set_state_btf";
    /// Global: the [`super::KernelOffsets`] of the running kernel.
    pub const OFFSETS_GLOBAL: &str = "OFFSETS";
    /// Tracepoint program on `tcp:tcp_retransmit_synack` (the classic build).
    pub const SYNACK_PROGRAM: &str = "tcp_retransmit_synack";
    /// BTF tracepoint program on `tcp_retransmit_synack` (the BTF build).
    pub const SYNACK_BTF_PROGRAM: &str = "tcp_retransmit_synack_btf";
    /// BTF tracepoint program on `tcp:tcp_send_reset`.
    pub const RESET_SENT_PROGRAM: &str = "tcp_send_reset";
    /// BTF tracepoint program on `tcp:tcp_receive_reset`.
    pub const RESET_RECEIVED_PROGRAM: &str = "tcp_receive_reset";
    /// Tracepoint program on `syscalls:sys_exit_accept4` and `syscalls:sys_exit_accept`.
    pub const ACCEPT_SYSCALLS_PROGRAM: &str = "sys_exit_accept";
    /// fexit program on `inet_csk_accept(sk, arg)` (Linux 6.10 and later).
    pub const ACCEPT_FEXIT_PROGRAM: &str = "inet_csk_accept_exit";
    /// fexit program on `inet_csk_accept(sk, flags, err, kern)` (before Linux 6.10).
    pub const ACCEPT_FEXIT_BEFORE_6_10_PROGRAM: &str = "inet_csk_accept_exit_before_6_10";
    /// Global: wake userspace once this many bytes are waiting (0: wake on every event).
    pub const WAKEUP_BYTES_GLOBAL: &str = "WAKEUP_BYTES";
    /// Global: bytes a CPU writes between two looks at its ring's fill.
    pub const CHECK_BYTES_GLOBAL: &str = "CHECK_BYTES";
    /// Global: the bit offset of `struct inet_request_sock.acked` (a bitfield, so not one of
    /// the byte offsets of [`super::KernelOffsets`]); [`super::OFFSET_UNKNOWN`] if unknown.
    pub const REQ_ACKED_BIT_GLOBAL: &str = "REQ_ACKED_BIT";
    /// The `u64` [`super::SOURCE_FINGERPRINT`] the object was compiled with (read-only data,
    /// never used by a program).
    pub const FINGERPRINT_SYMBOL: &str = "COMMON_FINGERPRINT";
}

/// Byte offsets of the `tcp:tcp_retransmit_synack` record fields the eBPF program reads.
/// The loader compares them with the running kernel's `format` file before attaching.
pub mod synack_layout {
    /// `const void *req`
    pub const REQ: usize = 16;
    /// `__u16 sport`
    pub const SPORT: usize = 24;
    /// `__u16 dport`
    pub const DPORT: usize = 26;
    /// `__u16 family`
    pub const FAMILY: usize = 28;
    /// `__u8 saddr_v6[16]` (2-aligned only: read 2 bytes at a time)
    pub const SADDR_V6: usize = 38;
    /// `__u8 daddr_v6[16]`
    pub const DADDR_V6: usize = 54;

    /// `(field name, offset, size)` for every field the program reads.
    pub const FIELDS: [(&str, usize, usize); 6] = [
        ("req", REQ, 8),
        ("sport", SPORT, 2),
        ("dport", DPORT, 2),
        ("family", FAMILY, 2),
        ("saddr_v6", SADDR_V6, 16),
        ("daddr_v6", DADDR_V6, 16),
    ];
}

/// Byte offsets of the `syscalls:sys_exit_accept4` (and `sys_exit_accept`) record fields
/// the accept program reads; every `sys_exit_*` record has this layout.
pub mod syscall_exit_layout {
    /// `long ret`: the new descriptor, or a negative errno.
    pub const RET: usize = 16;

    /// `(field name, offset, size)` for every field the program reads.
    pub const FIELDS: [(&str, usize, usize); 1] = [("ret", RET, 8)];
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

#[cfg(feature = "user")]
// SAFETY: repr(C) integers, no implicit padding.
unsafe impl aya::Pod for KernelOffsets {}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn state_event_layout_is_stable() {
        assert_eq!(size_of::<StateEvent>(), 104);
        assert_eq!(align_of::<StateEvent>(), 8);
        assert_eq!(offset_of!(StateEvent, oldstate), 24);
        assert_eq!(offset_of!(StateEvent, sock_err), 32);
        assert_eq!(offset_of!(StateEvent, family), 40);
        assert_eq!(offset_of!(StateEvent, saddr), 48);
        assert_eq!(offset_of!(StateEvent, daddr), 64);
        assert_eq!(offset_of!(StateEvent, comm), 80);
        assert_eq!(offset_of!(StateEvent, cgroup_id), 96);
        assert_eq!(size_of::<TcpStats>(), 56);
        assert_eq!(size_of::<StateEventWithStats>(), 160);
        assert_eq!(size_of::<SocketNote>(), 32);
        assert_eq!(size_of::<KernelOffsets>(), 152);
        assert_eq!(size_of::<SynAckRetransmit>(), 56);
    }

    #[test]
    fn kernel_fields_follow_the_struct() {
        let mut offsets = KernelOffsets::UNKNOWN;
        for (index, slot) in offsets.slots_mut().into_iter().enumerate() {
            *slot = index as u32;
        }
        assert_eq!(
            (offsets.sk_err, offsets.skc_net, offsets.inet_sport, offsets.task_comm, offsets._pad),
            (0, 1, 21, 24, 0)
        );
        assert_eq!(KernelOffsets::FIELDS.len(), 37);
        assert_eq!(
            KernelOffsets::FIELDS[1],
            KernelField { name: "skc_net", structure: "sock", path: &["__sk_common", "skc_net"] }
        );
    }

    #[test]
    fn payload_excludes_fin_and_retransmissions() {
        let stats = TcpStats {
            bytes_received: 1235,
            bytes_sent: 1500,
            bytes_retrans: 266,
            sk_flags: 1 << SOCK_DONE | 1, // SOCK_DEAD too
            ..TcpStats::default()
        };
        assert_eq!((stats.payload_sent(), stats.payload_received()), (1234, 1234));
        let no_fin = TcpStats { sk_flags: 1, ..stats };
        assert_eq!(no_fin.payload_received(), 1235);
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
