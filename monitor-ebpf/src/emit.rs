//! What the state program does with a transition: count it, and write and submit its
//! record (with the socket's counters where they matter); the notes the small programs
//! submit; and the rare anomalies they log (aya-log, at most once per CPU per kind per
//! second, only on the paths where something went wrong).

use aya_ebpf::EbpfContext;
use aya_log_ebpf::{debug, warn};

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    maps::RingBuf,
};
use monitor_common::tcp_state::{
    CLOSE, CLOSE_WAIT, ESTABLISHED, FIN_WAIT1, LAST_ACK, LISTEN, SYN_RECV, SYN_SENT,
};
use monitor_common::{
    counter, is_birth, log_kind, transition_index, KernelOffsets, SocketNote, StateEvent,
    StateEventWithStats, AF_INET, AF_INET6, SOCK_ERR_UNKNOWN,
};

use crate::maps::{
    bump, logging_cpu, offsets, ring, ring_slot, CHECK_BYTES, EVENT_COUNTERS, TRANSITIONS,
    UNCHECKED_BYTES, WAKEUP_BYTES,
};
use crate::read::{store16, Reader};
use crate::socket::{cgroup_id, netns_inum, tcp_stats, Socket};

/// Transitions that run in the owning process's own system call — connect(), listen(),
/// close()/shutdown() — so the current task is the owner. Every other transition may run in
/// softirq context on behalf of whatever task was interrupted; reading pid/comm there costs
/// two helper calls for a meaningless answer.
#[inline(always)]
fn runs_in_owner_context(old: i32, new: i32) -> bool {
    matches!(
        (old, new),
        (CLOSE, SYN_SENT) | (CLOSE, LISTEN) | (ESTABLISHED, FIN_WAIT1) | (CLOSE_WAIT, LAST_ACK)
    )
}

/// Transitions whose record carries the socket's [`TcpStats`]: handshake completion (SYN or
/// SYN-ACK retransmissions, the handshake RTT) and CLOSE (the connection's totals).
#[inline(always)]
fn wants_stats(old: i32, new: i32) -> bool {
    new == CLOSE || (new == ESTABLISHED && (old == SYN_SENT || old == SYN_RECV))
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
pub(crate) fn wakeup_flags(ring: &RingBuf, size: usize, reserved: bool) -> u64 {
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
pub(crate) fn output<C: EbpfContext, T>(ctx: &C, record: &T, lost: u32) {
    let ring = ring();
    let flags = wakeup_flags(ring, core::mem::size_of::<T>(), false);
    if ring.output::<T>(record, flags).is_err() {
        bump(&EVENT_COUNTERS, lost);
        if let Some(cpu) = logging_cpu(log_kind::NOTE_RING_FULL) {
            warn!(
                ctx,
                "ring EVENTS{} full on CPU {}: a note was lost (tcpmon_notes_lost_total counts \
                 them; a larger --ring-bytes or a shorter --drain-interval helps)",
                ring_slot(cpu),
                cpu
            );
        }
    }
}

/// `address` as a plain number. In the BTF build a socket's address is a typed pointer, and
/// the verifier refuses the shifts that write a number into a log line ("pointer arithmetic
/// prohibited"); a copy that a helper makes is untyped. Only on the paths that log.
#[inline(always)]
pub(crate) fn as_number(address: u64) -> u64 {
    let copy = address;
    // SAFETY: reads 8 bytes of this program's own stack.
    unsafe { bpf_probe_read_kernel(&raw const copy) }.unwrap_or(0)
}

/// Logs that a transition of `skaddr` was lost to a full ring.
#[inline(never)]
fn log_ring_full<C: EbpfContext>(ctx: &C, skaddr: u64, oldstate: i32, newstate: i32) {
    let Some(cpu) = logging_cpu(log_kind::RING_FULL) else { return };
    let skaddr = as_number(skaddr);
    warn!(
        ctx,
        "ring EVENTS{} full on CPU {}: lost the transition {} -> {} of socket {:x} \
         (tcpmon_events_lost_total counts them; a larger --ring-bytes or a shorter \
         --drain-interval helps)",
        ring_slot(cpu),
        cpu,
        oldstate,
        newstate,
        skaddr
    );
}

/// Logs a record the program could not fill as it should: a read of the socket that failed
/// (`what`: 1 `sk_err`, 2 the `tcp_sock` counters), or a family or state it does not know (3).
#[inline(never)]
fn log_anomaly<C: EbpfContext>(ctx: &C, what: u32, skaddr: u64, family: u16, states: [i32; 2]) {
    let Some(cpu) = logging_cpu(log_kind::ANOMALY) else { return };
    let skaddr = as_number(skaddr);
    debug!(
        ctx,
        "CPU {}: socket {:x} (family {}), transition {} -> {}: anomaly {} (1: sk_err unread, \
         2: counters unread, 3: family or state unknown)",
        cpu,
        skaddr,
        family,
        states[0],
        states[1],
        what
    );
}

/// What both builds do with a TCP transition: count it, and submit its record.
#[inline(always)]
pub(crate) unsafe fn on_state_change<C: EbpfContext, S: Socket>(
    ctx: &C,
    socket: &S,
    oldstate: i32,
    newstate: i32,
) {
    match transition_index(oldstate, newstate) {
        Some(index) => bump(&TRANSITIONS, index),
        None => {
            bump(&EVENT_COUNTERS, counter::STATE_OUT_OF_RANGE);
            log_anomaly(ctx, 3, socket.skaddr(), 0, [oldstate, newstate]);
        }
    }

    let offsets = offsets();
    let ring = ring();
    if wants_stats(oldstate, newstate) {
        let Some(mut entry) = ring.reserve::<StateEventWithStats>(0) else {
            bump(&EVENT_COUNTERS, counter::RING_RESERVE_FAILED);
            log_ring_full(ctx, socket.skaddr(), oldstate, newstate);
            return;
        };
        let record = entry.as_mut_ptr();
        unsafe {
            fill(socket, &raw mut (*record).event, oldstate, newstate, offsets);
            let tcp = socket.tcp_sock();
            let closing = newstate == CLOSE;
            if closing {
                socket.fix_closing_endpoints(&raw mut (*record).event, &tcp, offsets);
            }
            (*record).stats = tcp_stats(&tcp, offsets, closing);
            let event = &(*record).event;
            let what = match ((*record).stats.complete, event.sock_err) {
                (0, _) => 2,
                (_, SOCK_ERR_UNKNOWN) => 1,
                _ if !matches!(event.family, AF_INET | AF_INET6) => 3,
                _ => 0,
            };
            if what != 0 {
                log_anomaly(ctx, what, event.skaddr, event.family, [oldstate, newstate]);
            }
        }
        entry.submit(wakeup_flags(ring, core::mem::size_of::<StateEventWithStats>(), true));
    } else {
        let Some(mut entry) = ring.reserve::<StateEvent>(0) else {
            bump(&EVENT_COUNTERS, counter::RING_RESERVE_FAILED);
            log_ring_full(ctx, socket.skaddr(), oldstate, newstate);
            return;
        };
        unsafe { fill(socket, entry.as_mut_ptr(), oldstate, newstate, offsets) };
        entry.submit(wakeup_flags(ring, core::mem::size_of::<StateEvent>(), true));
    }
}

/// Writes every field of the transition's record.
#[inline(always)]
pub(crate) unsafe fn fill<S: Socket>(
    socket: &S,
    event: *mut StateEvent,
    oldstate: i32,
    newstate: i32,
    offsets: &KernelOffsets,
) {
    let sock = socket.sock();
    let sock_err = if newstate == CLOSE {
        unsafe { sock.read(offsets.sk_err) }.unwrap_or(SOCK_ERR_UNKNOWN)
    } else {
        0
    };
    // At birth for the tracker, and at CLOSE for sockets it first saw mid-life.
    let (netns, cgroup_id) = if is_birth(oldstate, newstate) || newstate == CLOSE {
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
pub(crate) fn submit_note<C: EbpfContext>(ctx: &C, skaddr: u64, kind: u32, value: u32) {
    let timestamp_ns = unsafe { bpf_ktime_get_ns() };
    let note = SocketNote { timestamp_ns, skaddr, kind, value, _reserved: 0 };
    output(ctx, &note, counter::NOTE_RESERVE_FAILED);
}
