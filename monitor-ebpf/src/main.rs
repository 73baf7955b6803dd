//! The kernel side of tcpmon: one program on `sock:inet_sock_set_state`.
//!
//! It does three things and nothing else: count every TCP transition in a per-CPU array (so
//! the counts stay exact when the ring buffer is full), copy the record's fields into a ring
//! buffer entry, and submit it. All interpretation happens in userspace, where unit tests
//! reach it.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, generated},
    macros::{map, tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::TracePointContext,
    EbpfContext, Global,
};
use monitor_common::{
    counter, tracepoint_layout as tp, transition_index, StateEvent, IPPROTO_TCP, SOCK_ERR_UNKNOWN,
    TRANSITION_SLOTS,
};

// The kernel's TCP states (include/net/tcp_states.h).
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
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

/// Bytes one record takes in the ring: the record and the ring's 8-byte header.
const RECORD_BYTES: u64 = core::mem::size_of::<StateEvent>() as u64 + 8;

/// Default ring size; the loader overrides it with `--ring-bytes`.
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

#[map(name = "TRANSITIONS")]
static TRANSITIONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(TRANSITION_SLOTS, 0);

#[map(name = "EVENT_COUNTERS")]
static EVENT_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::SLOTS, 0);

/// Offset of `sk_err` in `struct sock`, taken from the running kernel's BTF by the loader.
/// `u32::MAX` disables the read.
#[unsafe(no_mangle)]
static SK_ERR_OFFSET: Global<u32> = Global::new(u32::MAX);

/// Wake the consumer only once this many bytes wait in the ring (it also drains on a timer);
/// 0 wakes it for every event (low-latency mode).
#[unsafe(no_mangle)]
static WAKEUP_BYTES: Global<u64> = Global::new(0);

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    // SAFETY: the loader verified these offsets against the event's `format` file; tracepoint
    // context loads at constant, aligned offsets are checked by the verifier.
    unsafe { on_state_change(&ctx) };
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
    let dst = dst.as_mut_ptr().cast::<u64>();
    unsafe {
        core::ptr::write_unaligned(dst, field::<u64>(ctx, offset));
        core::ptr::write_unaligned(dst.add(1), field::<u64>(ctx, offset + 8));
    }
}

#[inline(always)]
fn bump(map: &PerCpuArray<u64>, index: u32) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // Per-CPU slot, and tracing programs do not nest on one CPU: a plain add is exact.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
unsafe fn on_state_change(ctx: &TracePointContext) {
    let protocol: u16 = unsafe { field(ctx, tp::PROTOCOL) };
    if protocol != IPPROTO_TCP {
        return;
    }
    let oldstate: i32 = unsafe { field(ctx, tp::OLDSTATE) };
    let newstate: i32 = unsafe { field(ctx, tp::NEWSTATE) };
    match transition_index(oldstate, newstate) {
        Some(index) => bump(&TRANSITIONS, index),
        None => bump(&EVENT_COUNTERS, counter::STATE_OUT_OF_RANGE),
    }

    let Some(mut entry) = EVENTS.reserve::<StateEvent>(0) else {
        bump(&EVENT_COUNTERS, counter::RING_RESERVE_FAILED);
        return;
    };
    let event = entry.as_mut_ptr();
    let skaddr: u64 = unsafe { field(ctx, tp::SKADDR) };
    let sock_err = if newstate == TCP_CLOSE {
        let offset = SK_ERR_OFFSET.load();
        if offset == u32::MAX {
            SOCK_ERR_UNKNOWN
        } else {
            unsafe { bpf_probe_read_kernel((skaddr + offset as u64) as *const i32) }
                .unwrap_or(SOCK_ERR_UNKNOWN)
        }
    } else {
        0
    };
    unsafe {
        (*event).timestamp_ns = bpf_ktime_get_ns();
        (*event).skaddr = skaddr;
        (*event).pid_tgid = 0;
        (*event).oldstate = oldstate;
        (*event).newstate = newstate;
        (*event).sock_err = sock_err;
        (*event).sport = field(ctx, tp::SPORT);
        (*event).dport = field(ctx, tp::DPORT);
        (*event).family = field(ctx, tp::FAMILY);
        (*event)._pad0 = 0;
        (*event)._pad1 = 0;
        copy_addr(ctx, tp::SADDR_V6, &mut (*event).saddr);
        copy_addr(ctx, tp::DADDR_V6, &mut (*event).daddr);
        if runs_in_owner_context(oldstate, newstate) {
            (*event).pid_tgid = bpf_get_current_pid_tgid();
            // Written straight into the ring entry: no stack copy.
            generated::bpf_get_current_comm((*event).comm.as_mut_ptr().cast(), 16);
        } else {
            // Ring memory is not zeroed by reserve.
            let comm = (*event).comm.as_mut_ptr().cast::<u64>();
            core::ptr::write_unaligned(comm, 0);
            core::ptr::write_unaligned(comm.add(1), 0);
        }
    }

    let wakeup_bytes = WAKEUP_BYTES.load();
    let flags = if wakeup_bytes == 0 {
        0
    } else {
        // Wake the daemon once, with the record that crosses the threshold, not with every
        // record after it: a forced wake-up queues an irq_work, and until the daemon runs
        // the ring stays above the threshold. Available data includes this record (it counts
        // from reservation). Should two CPUs race past the line, the daemon's drain timer
        // still comes.
        let waiting = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
        if waiting >= wakeup_bytes && waiting < wakeup_bytes + RECORD_BYTES {
            BPF_RB_FORCE_WAKEUP as u64
        } else {
            BPF_RB_NO_WAKEUP as u64
        }
    };
    entry.submit(flags);
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
