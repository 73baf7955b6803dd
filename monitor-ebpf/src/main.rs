//! The kernel side of tcpmon.
//!
//! The main program sits on `sock:inet_sock_set_state`. It counts every TCP transition in a
//! per-CPU array (so the counts stay exact when the ring buffer is full), copies the socket's
//! fields into a ring buffer entry, and submits it; at handshake completion and at CLOSE it
//! adds the socket's `tcp_sock` counters. It comes in two builds of the same logic: a BTF
//! tracepoint that reads the socket directly (preferred: no trace record is built, and its
//! loads are plain memory loads the verifier checks against the kernel's BTF), and a classic
//! tracepoint reading the trace record, for kernels where the BTF build does not load. Three small programs add facts the state tracepoint
//! cannot show: SYN-ACK retransmissions with the first SYN-ACK's time
//! (`tcp:tcp_retransmit_synack`) and resets sent and received (BTF tracepoints). All
//! interpretation happens in userspace, where unit tests reach it.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_skc_to_tcp_sock,
        generated,
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, TracePointContext},
    EbpfContext, Global,
};
use monitor_common::{
    counter, note, synack_layout as synack, tracepoint_layout as tp, transition_index,
    KernelOffsets, SocketNote, StateEvent, StateEventWithStats, SynAckRetransmit, TcpStats,
    AF_INET, IPPROTO_TCP, OFFSET_UNKNOWN, SOCK_ERR_UNKNOWN, SYNACK_CLIENT_ACKED, TRANSITION_SLOTS,
};

// The kernel's TCP states (include/net/tcp_states.h).
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_FIN_WAIT1: i32 = 4;
const TCP_CLOSE: i32 = 7;
const TCP_CLOSE_WAIT: i32 = 8;
const TCP_LAST_ACK: i32 = 9;
const TCP_LISTEN: i32 = 10;

/// Transitions that run in the owning process's own system call — connect(), listen(),
/// close()/shutdown() — so the current task is the owner. Every other transition may run in
/// softirq context on behalf of whatever task was interrupted; reading pid/comm there costs
/// two helper calls for a meaningless answer.
#[inline(always)]
fn runs_in_owner_context(old: i32, new: i32) -> bool {
    matches!(
        (old, new),
        (TCP_CLOSE, TCP_SYN_SENT)
            | (TCP_CLOSE, TCP_LISTEN)
            | (TCP_ESTABLISHED, TCP_FIN_WAIT1)
            | (TCP_CLOSE_WAIT, TCP_LAST_ACK)
    )
}

/// The transitions that start a socket's life: the moment to read its network namespace.
#[inline(always)]
fn is_birth(old: i32, new: i32) -> bool {
    matches!(
        (old, new),
        (TCP_CLOSE, TCP_SYN_SENT) | (TCP_CLOSE, TCP_LISTEN) | (TCP_LISTEN, TCP_SYN_RECV)
    )
}

/// Transitions whose record carries the socket's [`TcpStats`]: handshake completion (SYN or
/// SYN-ACK retransmissions, the handshake RTT) and CLOSE (the connection's totals).
#[inline(always)]
fn wants_stats(old: i32, new: i32) -> bool {
    new == TCP_CLOSE || (new == TCP_ESTABLISHED && (old == TCP_SYN_SENT || old == TCP_SYN_RECV))
}

// One ring buffer per CPU (up to [`MAX_RINGS`], CPUs beyond share them: `cpu % RINGS`), so
// CPUs do not contend for one ring's lock and producer position: measured 40 ns/event less
// than a single shared ring with two CPUs under churn. The loader sizes the rings in use
// (`--ring-bytes` split among them) and leaves the others at one page. Userspace merges the
// rings back into timestamp order.
#[map(name = "EVENTS0")]
static EVENTS0: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map(name = "EVENTS1")]
static EVENTS1: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map(name = "EVENTS2")]
static EVENTS2: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map(name = "EVENTS3")]
static EVENTS3: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map(name = "EVENTS4")]
static EVENTS4: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map(name = "EVENTS5")]
static EVENTS5: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map(name = "EVENTS6")]
static EVENTS6: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map(name = "EVENTS7")]
static EVENTS7: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map(name = "EVENTS8")]
static EVENTS8: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map(name = "EVENTS9")]
static EVENTS9: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map(name = "EVENTS10")]
static EVENTS10: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map(name = "EVENTS11")]
static EVENTS11: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map(name = "EVENTS12")]
static EVENTS12: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map(name = "EVENTS13")]
static EVENTS13: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map(name = "EVENTS14")]
static EVENTS14: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map(name = "EVENTS15")]
static EVENTS15: RingBuf = RingBuf::with_byte_size(4096, 0);

/// How many rings are in use (1..=[`MAX_RINGS`]); set by the loader.
#[unsafe(no_mangle)]
static RINGS: Global<u32> = Global::new(1);

/// The ring of the CPU this runs on.
#[inline(always)]
fn ring() -> &'static RingBuf {
    // SAFETY: no arguments; returns the current CPU's number.
    let cpu = unsafe { generated::bpf_get_smp_processor_id() };
    let rings = RINGS.load();
    if rings <= 1 {
        return &EVENTS0;
    }
    // A CPU has a ring of its own unless there are more CPUs than rings: no division then
    // (a `%` is an integer division on every run).
    let slot = if cpu < rings { cpu } else { cpu % rings };
    match slot {
        0 => &EVENTS0,
        1 => &EVENTS1,
        2 => &EVENTS2,
        3 => &EVENTS3,
        4 => &EVENTS4,
        5 => &EVENTS5,
        6 => &EVENTS6,
        7 => &EVENTS7,
        8 => &EVENTS8,
        9 => &EVENTS9,
        10 => &EVENTS10,
        11 => &EVENTS11,
        12 => &EVENTS12,
        13 => &EVENTS13,
        14 => &EVENTS14,
        _ => &EVENTS15,
    }
}

#[map(name = "TRANSITIONS")]
static TRANSITIONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(TRANSITION_SLOTS, 0);

#[map(name = "EVENT_COUNTERS")]
static EVENT_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::SLOTS, 0);

/// Field offsets of the running kernel's structs, from its BTF; set by the loader. Read
/// through [`offsets`] only.
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets::UNKNOWN;

/// The loader's offsets, each field loaded where it is used. The address goes through a
/// volatile read, so the compiler cannot fold in the placeholder values the static starts
/// with (the loader replaces them); `Global::load` would copy every field on every run.
/// The verifier still sees a pointer into the frozen read-only map, and knows each loaded
/// offset as a constant.
#[inline(always)]
fn offsets() -> &'static KernelOffsets {
    let at: *const KernelOffsets = &raw const OFFSETS;
    // SAFETY: reads a local; the pointer is the static's own address.
    unsafe { &*core::ptr::read_volatile(&at) }
}

/// The `monitor-common` this object was compiled from; the loader compares it with its own
/// before loading, so a stale object is refused instead of misread.
#[unsafe(no_mangle)]
#[used]
static COMMON_FINGERPRINT: u64 = monitor_common::SOURCE_FINGERPRINT;

/// Wake the consumer only once this many bytes wait in the ring (it also drains on a timer);
/// 0 wakes it for every event (low-latency mode).
#[unsafe(no_mangle)]
static WAKEUP_BYTES: Global<u64> = Global::new(0);

/// How many bytes this CPU writes between two looks at how full its ring is: the wake-up
/// threshold shared among the CPUs that write to one ring; set by the loader.
#[unsafe(no_mangle)]
static CHECK_BYTES: Global<u64> = Global::new(0);

/// The bit offset of `inet_request_sock.acked`, set by the loader (bitfields have no byte
/// offset of their own).
#[unsafe(no_mangle)]
static REQ_ACKED_BIT: Global<u32> = Global::new(OFFSET_UNKNOWN);

/// Bytes this CPU has written since it last looked at its ring's fill (one slot).
#[map(name = "UNCHECKED_BYTES")]
static UNCHECKED_BYTES: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The classic build: fields come from the trace record the kernel fills for us.
#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    // SAFETY: the loader verified these offsets against the event's `format` file; tracepoint
    // context loads at constant, aligned offsets are checked by the verifier.
    unsafe {
        let protocol: u16 = field(&ctx, tp::PROTOCOL);
        if protocol != IPPROTO_TCP {
            return 0;
        }
        let socket = TraceRecord { ctx: &ctx, skaddr: field(&ctx, tp::SKADDR) };
        on_state_change(&socket, field(&ctx, tp::OLDSTATE), field(&ctx, tp::NEWSTATE));
    }
    0
}

/// The BTF build: `trace_inet_sock_set_state(sk, oldstate, newstate)`'s arguments, with the
/// socket's fields read from the socket itself. The kernel skips building the trace record
/// (`perf_trace_inet_sock_set_state`) for a raw attachment, and every read is a direct load.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> u32 {
    let sk: *const u8 = ctx.arg(0);
    let socket = Direct(sk);
    let offsets = offsets();
    // SAFETY: `sk` is the tracepoint's socket; the offsets come from this kernel's BTF and
    // the verifier checks every load against it (the loader falls back to the classic build
    // when it refuses).
    unsafe {
        let protocol: Option<u16> = socket.read(offsets.sk_protocol);
        if protocol != Some(IPPROTO_TCP) {
            return 0;
        }
        on_state_change(&socket, ctx.arg(1), ctx.arg(2));
    }
    0
}

/// One load from the tracepoint record. Volatile so the compiler emits exactly this load:
/// the verifier allows only constant-offset, aligned loads from the context, and a merged
/// `memcpy` from it is rejected ("dereference of modified ctx ptr").
#[inline(always)]
unsafe fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    unsafe { core::ptr::read_volatile(ctx.as_ptr().cast::<u8>().add(offset).cast::<T>()) }
}

/// Copies a 16-byte address field as two 8-byte loads (offsets 40 and 56 are 8-aligned).
#[inline(always)]
unsafe fn copy_addr(ctx: &TracePointContext, offset: usize, dst: &mut [u8; 16]) {
    unsafe { store16(dst, field::<u64>(ctx, offset), field::<u64>(ctx, offset + 8)) };
}

/// Stores a 16-byte field of a record (an address, a task name) as two 8-byte stores. Every
/// such field of the shared records sits at an 8-aligned offset of an 8-aligned record;
/// written as aligned, it is two store instructions, where an unaligned write becomes
/// sixteen byte stores (or a call to a `memset` subprogram), each run on every transition.
#[inline(always)]
unsafe fn store16(dst: &mut [u8; 16], low: u64, high: u64) {
    let dst = dst.as_mut_ptr().cast::<u64>();
    // Volatile: LLVM would otherwise merge two zero stores into a `memset` call.
    unsafe {
        dst.write_volatile(low);
        dst.add(1).write_volatile(high);
    }
}

#[inline(always)]
fn bump(map: &PerCpuArray<u64>, index: u32) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // Per-CPU slot, and tracing programs do not nest on one CPU: a plain add is exact.
        unsafe { *slot += 1 };
    }
}

/// Reads kernel memory at known offsets from a base address.
trait Reader: Sized {
    /// The `T` at `offset` from the base; `None` when the offset is unknown, the base is
    /// NULL or the read faults.
    unsafe fn read<T: Copy>(&self, offset: u32) -> Option<T>;

    /// A reader of the struct whose address is the pointer at `offset`.
    unsafe fn follow(&self, offset: u32) -> Self;

    /// The `T` at `offset`, or zero with `failed` made non-zero.
    #[inline(always)]
    unsafe fn read_or_zero<T: Copy + Default>(&self, offset: u32, failed: &mut i64) -> T {
        match unsafe { self.read(offset) } {
            Some(value) => value,
            None => {
                *failed |= 1;
                T::default()
            }
        }
    }
}

/// Reads through `bpf_probe_read_kernel` from an untyped address (the classic build: the
/// verifier knows nothing of the socket's type).
#[derive(Clone, Copy)]
struct Probe(u64);

impl Reader for Probe {
    #[inline(always)]
    unsafe fn read<T: Copy>(&self, offset: u32) -> Option<T> {
        if offset == OFFSET_UNKNOWN || self.0 == 0 {
            return None;
        }
        unsafe { bpf_probe_read_kernel((self.0 + offset as u64) as *const T) }.ok()
    }

    #[inline(always)]
    unsafe fn follow(&self, offset: u32) -> Self {
        Probe(unsafe { self.read(offset) }.unwrap_or(0))
    }

    /// Without a branch: the helper zero-fills `value` when it fails (a NULL base included),
    /// and its return code (0 or a negative errno) is OR-ed into `failed`. Branching on each
    /// of the nine counters' reads made 2^9+ paths with different values, which the
    /// verifiers of Linux 5.10 and 6.1 could not prune: "BPF program is too large.
    /// Processed 1000001 insn" for the classic build. The unknown-offset test stays: the
    /// offsets are constants to the verifier (a frozen map), so it prunes that branch.
    #[inline(always)]
    unsafe fn read_or_zero<T: Copy + Default>(&self, offset: u32, failed: &mut i64) -> T {
        if offset == OFFSET_UNKNOWN {
            *failed |= 1;
            return T::default();
        }
        let mut value = core::mem::MaybeUninit::<T>::uninit();
        // SAFETY: the helper writes size_of::<T>() bytes into `value` whatever happens.
        unsafe {
            let code = generated::bpf_probe_read_kernel(
                value.as_mut_ptr().cast(),
                core::mem::size_of::<T>() as u32,
                (self.0.wrapping_add(offset as u64)) as *const _,
            );
            *failed |= code;
            value.assume_init()
        }
    }
}

/// Reads with plain loads from a BTF-typed pointer (the BTF build). The offsets live in the
/// read-only, frozen `OFFSETS` map, so the verifier knows them as constants, checks each load
/// against the kernel's BTF (field and size), and prunes the branches of unknown offsets; a
/// faulting load reads 0 instead of crashing (`BPF_PROBE_MEM`).
#[derive(Clone, Copy)]
struct Direct(*const u8);

impl Reader for Direct {
    #[inline(always)]
    unsafe fn read<T: Copy>(&self, offset: u32) -> Option<T> {
        if offset == OFFSET_UNKNOWN || self.0.is_null() {
            return None;
        }
        Some(unsafe { core::ptr::read_volatile(self.0.add(offset as usize).cast::<T>()) })
    }

    #[inline(always)]
    unsafe fn follow(&self, offset: u32) -> Self {
        Direct(unsafe { self.read::<*const u8>(offset) }.unwrap_or(core::ptr::null()))
    }
}

/// The socket of one transition, as one build of the program sees it.
trait Socket {
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
struct TraceRecord<'a> {
    ctx: &'a TracePointContext,
    skaddr: u64,
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
            if family == AF_INET {
                // ::ffff:a.b.c.d; little-endian u64 of bytes 8..16 = [0, 0, ff, ff, a, b, c, d].
                let mapped = |v4: u32| 0xffff_0000u64 | (u64::from(v4) << 32);
                let saddr = mapped(self.read(o.skc_rcv_saddr).unwrap_or(0));
                let daddr = mapped(self.read(o.skc_daddr).unwrap_or(0));
                store16(&mut (*event).saddr, 0, saddr);
                store16(&mut (*event).daddr, 0, daddr);
            } else {
                let (s, d) = (o.skc_v6_rcv_saddr, o.skc_v6_daddr);
                let half = |offset: u32| self.read(offset).unwrap_or(0u64);
                store16(&mut (*event).saddr, half(s), half(s.wrapping_add(8)));
                store16(&mut (*event).daddr, half(d), half(d.wrapping_add(8)));
            }
        }
    }
}

/// The current task's ids and name through `bpf_get_current_pid_tgid` and
/// `bpf_get_current_comm`.
#[inline(always)]
unsafe fn write_owner_by_helpers(event: *mut StateEvent) {
    unsafe {
        (*event).pid_tgid = bpf_get_current_pid_tgid();
        generated::bpf_get_current_comm((*event).comm.as_mut_ptr().cast(), 16);
    }
}

/// The socket's cgroup v2 id, 0 when unknown: three loads, no helper call.
#[inline(always)]
unsafe fn cgroup_id<R: Reader>(sock: &R, offsets: &KernelOffsets) -> u64 {
    unsafe { sock.follow(offsets.sk_cgroup).follow(offsets.cgroup_kn).read(offsets.kernfs_id) }
        .unwrap_or(0)
}

/// Inode number of the socket's network namespace, 0 when unknown.
#[inline(always)]
unsafe fn netns_inum<R: Reader>(sock: &R, offsets: &KernelOffsets) -> u32 {
    unsafe { sock.follow(offsets.skc_net).read(offsets.net_inum).unwrap_or(0) }
}

/// The socket's counters: all of them at CLOSE; at handshake completion only the two the
/// handshake needs (this runs on 4 of a connection's ~10 transitions).
#[inline(always)]
unsafe fn tcp_stats<R: Reader>(tcp: &R, offsets: &KernelOffsets, closing: bool) -> TcpStats {
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

/// The flags implementing the wake-up policy (see [`WAKEUP_BYTES`]) for a record of `size`
/// bytes, already reserved in `ring` or about to be written to it (`reserved`).
///
/// Asking the ring how full it is (`bpf_ringbuf_query`) is a helper call, which on CPUs with
/// retpolines and SRSO mitigations costs as much as the rest of a record; so it is asked
/// only once this CPU has written [`CHECK_BYTES`] since it last asked, and the answer says
/// when to ask next. No fuller ring can go unnoticed: until all CPUs that share the ring
/// have written their share, it cannot have reached the threshold since the last look.
#[inline(always)]
fn wakeup_flags(ring: &RingBuf, size: usize, reserved: bool) -> u64 {
    let wakeup_bytes = WAKEUP_BYTES.load();
    if wakeup_bytes == 0 {
        return 0; // the kernel's default: wake whenever the daemon has caught up
    }
    let Some(unchecked) = UNCHECKED_BYTES.get_ptr_mut(0) else {
        return BPF_RB_NO_WAKEUP as u64;
    };
    // The ring's own 8-byte header per record.
    let record_bytes = size as u64 + 8;
    let check_bytes = CHECK_BYTES.load();
    // SAFETY: this CPU's slot; a nested run on this CPU can at worst make one look early
    // or late.
    unsafe {
        let written = *unchecked + record_bytes;
        if written < check_bytes {
            *unchecked = written;
            return BPF_RB_NO_WAKEUP as u64;
        }
        // The ring counts a record from its reservation.
        let unreserved = if reserved { 0 } else { record_bytes };
        let waiting = ring.query(BPF_RB_AVAIL_DATA as u64) + unreserved;
        if waiting >= wakeup_bytes {
            *unchecked = 0;
            return BPF_RB_FORCE_WAKEUP as u64;
        }
        // Look again when the ring could have reached the threshold, if every CPU that
        // shares it writes as fast as this one.
        let share_left = (wakeup_bytes - waiting) * check_bytes / wakeup_bytes;
        *unchecked = check_bytes.saturating_sub(share_left);
    }
    BPF_RB_NO_WAKEUP as u64
}

/// Copies a small `record` built on the stack into this CPU's ring (`bpf_ringbuf_output`:
/// reserve, copy and commit in one call); a full ring is counted in `lost`. Transitions are
/// written in place instead (reserve, fill, submit): measured cheaper for their 96 and 152
/// bytes than building them on the stack to copy.
#[inline(always)]
fn output<T>(record: &T, lost: u32) {
    let ring = ring();
    let flags = wakeup_flags(ring, core::mem::size_of::<T>(), false);
    if ring.output::<T>(record, flags).is_err() {
        bump(&EVENT_COUNTERS, lost);
    }
}

/// What both builds do with a TCP transition: count it, and submit its record.
#[inline(always)]
unsafe fn on_state_change<S: Socket>(socket: &S, oldstate: i32, newstate: i32) {
    match transition_index(oldstate, newstate) {
        Some(index) => bump(&TRANSITIONS, index),
        None => bump(&EVENT_COUNTERS, counter::STATE_OUT_OF_RANGE),
    }

    let offsets = offsets();
    let ring = ring();
    if wants_stats(oldstate, newstate) {
        let Some(mut entry) = ring.reserve::<StateEventWithStats>(0) else {
            bump(&EVENT_COUNTERS, counter::RING_RESERVE_FAILED);
            return;
        };
        let record = entry.as_mut_ptr();
        unsafe {
            fill(socket, &raw mut (*record).event, oldstate, newstate, offsets);
            let tcp = socket.tcp_sock();
            let closing = newstate == TCP_CLOSE;
            if closing {
                socket.fix_closing_endpoints(&raw mut (*record).event, &tcp, offsets);
            }
            (*record).stats = tcp_stats(&tcp, offsets, closing);
        }
        entry.submit(wakeup_flags(ring, core::mem::size_of::<StateEventWithStats>(), true));
    } else {
        let Some(mut entry) = ring.reserve::<StateEvent>(0) else {
            bump(&EVENT_COUNTERS, counter::RING_RESERVE_FAILED);
            return;
        };
        unsafe { fill(socket, entry.as_mut_ptr(), oldstate, newstate, offsets) };
        entry.submit(wakeup_flags(ring, core::mem::size_of::<StateEvent>(), true));
    }
}

/// Writes every field of the transition's record.
#[inline(always)]
unsafe fn fill<S: Socket>(
    socket: &S,
    event: *mut StateEvent,
    oldstate: i32,
    newstate: i32,
    offsets: &KernelOffsets,
) {
    let sock = socket.sock();
    let sock_err = if newstate == TCP_CLOSE {
        unsafe { sock.read(offsets.sk_err) }.unwrap_or(SOCK_ERR_UNKNOWN)
    } else {
        0
    };
    // At birth for the tracker, and at CLOSE for sockets it first saw mid-life.
    let (netns, cgroup_id) = if is_birth(oldstate, newstate) || newstate == TCP_CLOSE {
        unsafe { (netns_inum(&sock, offsets), cgroup_id(&sock, offsets)) }
    } else {
        (0, 0)
    };
    unsafe {
        (*event).timestamp_ns = bpf_ktime_get_ns();
        (*event).skaddr = socket.skaddr();
        (*event).pid_tgid = 0;
        (*event).oldstate = oldstate;
        (*event).newstate = newstate;
        (*event).sock_err = sock_err;
        (*event)._pad0 = 0;
        (*event).netns = netns;
        (*event).cgroup_id = cgroup_id;
        socket.write_endpoints(event, offsets);
        if runs_in_owner_context(oldstate, newstate) {
            socket.write_owner(event, offsets);
        } else {
            store16(&mut (*event).comm, 0, 0);
        }
    }
}

/// Submits a [`SocketNote`]; a full ring is counted apart from lost transitions.
#[inline(always)]
fn submit_note(skaddr: u64, kind: u32, value: u32) {
    let timestamp_ns = unsafe { bpf_ktime_get_ns() };
    let note = SocketNote { timestamp_ns, skaddr, kind, value, _reserved: 0 };
    output(&note, counter::NOTE_RESERVE_FAILED);
}

/// Copies a 16-byte address field that is only 2-aligned in the record, 2 bytes at a time
/// (tracepoint context loads must be aligned to their size).
#[inline(always)]
unsafe fn copy_addr_2aligned(ctx: &TracePointContext, offset: usize, dst: &mut [u8; 16]) {
    let dst = dst.as_mut_ptr().cast::<u16>();
    for i in 0..8 {
        unsafe { core::ptr::write_unaligned(dst.add(i), field::<u16>(ctx, offset + 2 * i)) };
    }
}

/// `tcp:tcp_retransmit_synack(listener, req)`: a request socket resent its SYN-ACK (timer,
/// or a retransmitted SYN). The request socket knows when its *first* SYN-ACK left
/// (`tcp_rsk(req)->snt_synack`); its child will carry the same 4-tuple. Rare, so its cost
/// does not matter. Two builds, as for the state program: [`tcp_retransmit_synack_btf`] reads
/// the request socket itself; this classic one reads the trace record, whose layout the
/// loader checked (Linux 5.10's record has no `family` and other offsets: there only the BTF
/// build runs).
#[tracepoint]
pub fn tcp_retransmit_synack(ctx: TracePointContext) -> u32 {
    let mut record = core::mem::MaybeUninit::<SynAckRetransmit>::uninit();
    let record = record.as_mut_ptr();
    // SAFETY: the loader verified the offsets against the event's `format` file.
    unsafe {
        let req: u64 = field(&ctx, synack::REQ);
        write_synack_request(record, req);
        (*record).sport = field(&ctx, synack::SPORT);
        (*record).dport = field(&ctx, synack::DPORT);
        (*record).family = field(&ctx, synack::FAMILY);
        copy_addr_2aligned(&ctx, synack::SADDR_V6, &mut (*record).saddr);
        copy_addr_2aligned(&ctx, synack::DADDR_V6, &mut (*record).daddr);
        output(&*record, counter::NOTE_RESERVE_FAILED);
    }
    0
}

/// `tp_btf/tcp_retransmit_synack(listener, req)`: the same record as
/// [`tcp_retransmit_synack`], from the request socket's own `sock_common` (`struct
/// request_sock` starts with one, so a socket's field offsets serve), needing neither tracefs
/// nor a record layout. What the child socket's records will show: the listener's family
/// (a child of an IPv6 listener stays `AF_INET6` for an IPv4 peer), the addresses of the
/// request's own family, IPv4-mapped when that is `AF_INET`.
#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn tcp_retransmit_synack_btf(ctx: BtfTracePointContext) -> u32 {
    let listener: u64 = ctx.arg(0);
    let req: u64 = ctx.arg(1);
    let mut record = core::mem::MaybeUninit::<SynAckRetransmit>::uninit();
    let record = record.as_mut_ptr();
    let o = offsets();
    // SAFETY: reads go through bpf_probe_read_kernel, which fails safely.
    unsafe {
        write_synack_request(record, req);
        let req = Probe(req);
        let dport: u16 = req.read(o.skc_dport).unwrap_or(0);
        (*record).sport = req.read(o.skc_num).unwrap_or(0);
        (*record).dport = u16::from_be(dport);
        (*record).family = Probe(listener).read(o.skc_family).unwrap_or(0);
        if req.read::<u16>(o.skc_family) == Some(AF_INET) {
            let mapped = |v4: u32| 0xffff_0000u64 | (u64::from(v4) << 32);
            store16(&mut (*record).saddr, 0, mapped(req.read(o.skc_rcv_saddr).unwrap_or(0)));
            store16(&mut (*record).daddr, 0, mapped(req.read(o.skc_daddr).unwrap_or(0)));
        } else {
            let (s, d) = (o.skc_v6_rcv_saddr, o.skc_v6_daddr);
            let half = |offset: u32| req.read(offset).unwrap_or(0u64);
            store16(&mut (*record).saddr, half(s), half(s.wrapping_add(8)));
            store16(&mut (*record).daddr, half(d), half(d.wrapping_add(8)));
        }
        output(&*record, counter::NOTE_RESERVE_FAILED);
    }
    0
}

/// What both SYN-ACK builds read from the request socket: the time, the first SYN-ACK's time,
/// and whether the client's ACK was dropped for a full accept queue.
#[inline(always)]
unsafe fn write_synack_request(record: *mut SynAckRetransmit, req: u64) {
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

/// `tcp:tcp_send_reset(sk, skb[, reason])`: `sk` is NULL when no socket owns the segment
/// answered, and may be a listener or a timewait socket; userspace matches full sockets.
/// Only the first argument is read: `reason` exists since Linux 6.10, and the verifier
/// rejects reading an argument a kernel's tracepoint does not have.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: BtfTracePointContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    submit_note(sk, note::RESET_SENT, 0);
    0
}

/// `tcp:tcp_receive_reset(sk)`, from `tcp_reset()` before `tcp_done()` closes the socket.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: BtfTracePointContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    submit_note(sk, note::RESET_RECEIVED, 0);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// bpf_probe_read_kernel is GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
