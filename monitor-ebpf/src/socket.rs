//! One socket as the state program sees it, from a trace record (classic build) or from the
//! socket itself (BTF build): its address, endpoints, owner, namespace, cgroup and counters;
//! and the request socket the SYN-ACK programs read.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_skc_to_tcp_sock, generated},
    programs::TracePointContext,
};
use monitor_common::{
    tracepoint_layout as tp, KernelOffsets, StateEvent, SynAckRetransmit, TcpStats, AF_INET,
    OFFSET_UNKNOWN, SYNACK_CLIENT_ACKED,
};

use crate::maps::{offsets, REQ_ACKED_BIT};
use crate::read::{copy_addr, field, store16, Direct, Probe, Reader};

/// The socket of one transition, as one build of the program sees it.
pub(crate) trait Socket {
    /// How the socket's memory is read.
    type Reader: Reader;
    /// The `struct sock` address: the connection's identity.
    fn skaddr(&self) -> u64;
    /// A reader of the `struct sock`.
    fn sock(&self) -> Self::Reader;
    /// A reader of the socket as `struct tcp_sock`.
    unsafe fn tcp_sock(&self) -> Self::Reader;
    /// Copies ports, family and both addresses into the record.
    unsafe fn write_endpoints(&self, event: *mut StateEvent, offsets: &KernelOffsets);
    /// Writes the current task's ids and name into the record (for transitions that run in
    /// the owner's system call). Through the helpers by default.
    #[inline(always)]
    unsafe fn write_owner(&self, event: *mut StateEvent, _offsets: &KernelOffsets) {
        unsafe { write_owner_by_helpers(event) };
    }
    /// Corrects what [`Socket::write_endpoints`] wrote for a transition to CLOSE, given the
    /// socket as a `tcp_sock`.
    unsafe fn fix_closing_endpoints(
        &self,
        _event: *mut StateEvent,
        _tcp: &Self::Reader,
        _offsets: &KernelOffsets,
    ) {
    }
}

/// The classic tracepoint's record.
pub(crate) struct TraceRecord<'a> {
    pub(crate) ctx: &'a TracePointContext,
    pub(crate) skaddr: u64,
}

impl Socket for TraceRecord<'_> {
    type Reader = Probe;

    fn skaddr(&self) -> u64 {
        self.skaddr
    }

    fn sock(&self) -> Probe {
        Probe(self.skaddr)
    }

    unsafe fn tcp_sock(&self) -> Probe {
        Probe(self.skaddr)
    }

    #[inline(always)]
    unsafe fn write_endpoints(&self, event: *mut StateEvent, _offsets: &KernelOffsets) {
        unsafe {
            (*event).sport = field(self.ctx, tp::SPORT);
            (*event).dport = field(self.ctx, tp::DPORT);
            (*event).family = field(self.ctx, tp::FAMILY);
            copy_addr(self.ctx, tp::SADDR_V6, &mut (*event).saddr);
            copy_addr(self.ctx, tp::DADDR_V6, &mut (*event).daddr);
        }
    }
}

impl Socket for Direct {
    type Reader = Direct;

    /// Loads the ids and the name from the task itself: one call that returns `current`,
    /// where `bpf_get_current_comm` copies the name through `strscpy` and a `memset`.
    #[inline(always)]
    unsafe fn write_owner(&self, event: *mut StateEvent, o: &KernelOffsets) {
        let fields = [o.task_pid, o.task_tgid, o.task_comm];
        if fields.contains(&OFFSET_UNKNOWN) {
            return unsafe { write_owner_by_helpers(event) };
        }
        unsafe {
            let task = Direct(generated::bpf_get_current_task_btf() as *const u8);
            let pid: u32 = task.read(o.task_pid).unwrap_or(0);
            let tgid: u32 = task.read(o.task_tgid).unwrap_or(0);
            (*event).pid_tgid = u64::from(tgid) << 32 | u64::from(pid);
            let low = task.read(o.task_comm).unwrap_or(0u64);
            let high = task.read(o.task_comm.wrapping_add(8)).unwrap_or(0u64);
            store16(&mut (*event).comm, low, high);
        }
    }

    /// `tcp_set_state(TCP_CLOSE)` releases the local port (`inet_put_port()` zeroes
    /// `skc_num`) before the tracepoint runs; `inet_sport`, which the classic tracepoint
    /// reports, still holds it.
    #[inline(always)]
    unsafe fn fix_closing_endpoints(
        &self,
        event: *mut StateEvent,
        tcp: &Direct,
        offsets: &KernelOffsets,
    ) {
        if let Some(sport) = unsafe { tcp.read::<u16>(offsets.inet_sport) } {
            unsafe { (*event).sport = u16::from_be(sport) };
        }
    }

    fn skaddr(&self) -> u64 {
        self.0 as u64
    }

    fn sock(&self) -> Direct {
        *self
    }

    #[inline(always)]
    unsafe fn tcp_sock(&self) -> Direct {
        // The verifier only allows loads inside the pointer's BTF type: `tcp_sock` fields lie
        // past `struct sock`, so the pointer must be retyped (NULL unless a full TCP socket).
        Direct(unsafe { bpf_skc_to_tcp_sock(self.0 as *mut _) } as *const u8)
    }

    /// Stores what `TP_STORE_ADDRS` (include/trace/events/sock.h) would: ports in host byte
    /// order, and for `AF_INET` the IPv4-mapped IPv6 form of both addresses.
    #[inline(always)]
    unsafe fn write_endpoints(&self, event: *mut StateEvent, o: &KernelOffsets) {
        unsafe {
            let family: u16 = self.read(o.skc_family).unwrap_or(0);
            let dport: u16 = self.read(o.skc_dport).unwrap_or(0);
            (*event).sport = self.read(o.skc_num).unwrap_or(0);
            (*event).dport = u16::from_be(dport);
            (*event).family = family;
            let ipv4 = family == AF_INET;
            write_addresses(self, ipv4, o, &mut (*event).saddr, &mut (*event).daddr);
        }
    }
}

/// Stores a socket's local and remote addresses from its `sock_common` as
/// `TP_STORE_ADDRS` (include/trace/events/sock.h) does: for an `AF_INET` socket (`ipv4`) the
/// IPv4-mapped IPv6 form. The state program's socket and the SYN-ACK program's request socket
/// alike.
#[inline(always)]
pub(crate) unsafe fn write_addresses<R: Reader>(
    sock: &R,
    ipv4: bool,
    o: &KernelOffsets,
    saddr: &mut [u8; 16],
    daddr: &mut [u8; 16],
) {
    unsafe {
        if ipv4 {
            // ::ffff:a.b.c.d; little-endian u64 of bytes 8..16 = [0, 0, ff, ff, a, b, c, d].
            let mapped = |v4: u32| 0xffff_0000u64 | (u64::from(v4) << 32);
            // Both loads before the (volatile) stores, which the compiler may not reorder.
            let local = mapped(sock.read(o.skc_rcv_saddr).unwrap_or(0));
            let remote = mapped(sock.read(o.skc_daddr).unwrap_or(0));
            store16(saddr, 0, local);
            store16(daddr, 0, remote);
        } else {
            let (s, d) = (o.skc_v6_rcv_saddr, o.skc_v6_daddr);
            let half = |offset: u32| sock.read(offset).unwrap_or(0u64);
            store16(saddr, half(s), half(s.wrapping_add(8)));
            store16(daddr, half(d), half(d.wrapping_add(8)));
        }
    }
}

/// The current task's ids and name through `bpf_get_current_pid_tgid` and
/// `bpf_get_current_comm`.
#[inline(always)]
pub(crate) unsafe fn write_owner_by_helpers(event: *mut StateEvent) {
    unsafe {
        (*event).pid_tgid = bpf_get_current_pid_tgid();
        generated::bpf_get_current_comm((*event).comm.as_mut_ptr().cast(), 16);
    }
}

/// The socket's cgroup v2 id, 0 when unknown: three loads, no helper call.
#[inline(always)]
pub(crate) unsafe fn cgroup_id<R: Reader>(sock: &R, offsets: &KernelOffsets) -> u64 {
    unsafe { sock.follow(offsets.sk_cgroup).follow(offsets.cgroup_kn).read(offsets.kernfs_id) }
        .unwrap_or(0)
}

/// Inode number of the socket's network namespace, 0 when unknown.
#[inline(always)]
pub(crate) unsafe fn netns_inum<R: Reader>(sock: &R, offsets: &KernelOffsets) -> u32 {
    unsafe { sock.follow(offsets.skc_net).read(offsets.net_inum).unwrap_or(0) }
}

/// The socket's counters: all of them at CLOSE; at handshake completion only the two the
/// handshake needs (this runs on 4 of a connection's ~10 transitions).
#[inline(always)]
pub(crate) unsafe fn tcp_stats<R: Reader>(
    tcp: &R,
    offsets: &KernelOffsets,
    closing: bool,
) -> TcpStats {
    // `complete` tells userspace every read succeeded; otherwise it reports no counters
    // rather than zeros that would look real. Failures are OR-ed together and looked at
    // once, so the reads add no branches (see [`Reader::read_or_zero`]).
    let mut failed = 0;
    let f = &mut failed;
    let total_retrans = unsafe { tcp.read_or_zero(offsets.total_retrans, f) };
    let srtt_us_x8 = unsafe { tcp.read_or_zero(offsets.srtt_us, f) };
    if !closing {
        let complete = (failed == 0) as u32;
        return TcpStats { total_retrans, srtt_us_x8, complete, ..TcpStats::default() };
    }
    let stats = unsafe {
        TcpStats {
            bytes_acked: tcp.read_or_zero(offsets.bytes_acked, f),
            bytes_received: tcp.read_or_zero(offsets.bytes_received, f),
            bytes_sent: tcp.read_or_zero(offsets.bytes_sent, f),
            bytes_retrans: tcp.read_or_zero(offsets.bytes_retrans, f),
            segs_out: tcp.read_or_zero(offsets.segs_out, f),
            segs_in: tcp.read_or_zero(offsets.segs_in, f),
            sk_flags: tcp.read_or_zero(offsets.sk_flags, f),
            total_retrans,
            srtt_us_x8,
            complete: 0,
        }
    };
    TcpStats { complete: (failed == 0) as u32, ..stats }
}

/// What both SYN-ACK builds read from the request socket: the time, the first SYN-ACK's time,
/// and whether the client's ACK was dropped for a full accept queue.
#[inline(always)]
pub(crate) unsafe fn write_synack_request(record: *mut SynAckRetransmit, req: u64) {
    let o = offsets();
    unsafe {
        (*record).timestamp_ns = bpf_ktime_get_ns();
        (*record).first_synack_us = Probe(req).read(o.snt_synack).unwrap_or(0);
        // Little-endian bitfield (bpfel): bit `bit` is bit `bit % 8` of byte `bit / 8`.
        let acked = match REQ_ACKED_BIT.load() {
            OFFSET_UNKNOWN => 0,
            bit => Probe(req).read::<u8>(bit / 8).map_or(0, |byte| byte >> (bit % 8) & 1),
        };
        // A TCP_DEFER_ACCEPT listener marks requests acked too; only without it (read as
        // such) does an acked request mean a full accept queue.
        let defer: Option<u8> =
            if acked != 0 { Probe(req).follow(o.req_listener).read(o.defer_accept) } else { None };
        (*record).flags = if defer == Some(0) { SYNACK_CLIENT_ACKED } else { 0 };
    }
}
