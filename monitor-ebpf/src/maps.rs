//! The maps and globals the programs share with the loader: one ring buffer per CPU, the
//! per-CPU counters, and the values the loader sets before loading (offsets, wake-up
//! thresholds). Their names are `monitor-common`'s, so the two sides cannot drift apart.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, generated},
    macros::map,
    maps::{PerCpuArray, RingBuf},
    Global,
};
use monitor_common::{counter, log_kind, KernelOffsets, OFFSET_UNKNOWN, TRANSITION_SLOTS};

// One ring buffer per CPU (up to `MAX_RINGS`, CPUs beyond share them: `cpu % RINGS`), so
// CPUs do not contend for one ring's lock and producer position: measured 40 ns/event less
// than a single shared ring with two CPUs under churn. The loader sizes the rings in use
// (`--ring-bytes` split among them) and leaves the others at one page. Userspace merges the
// rings back into timestamp order.
macro_rules! rings {
    ($($index:literal $name:ident),+) => {
        $(
            #[map]
            static $name: RingBuf = RingBuf::with_byte_size(4096, 0);
        )+

        /// The ring in slot `slot` (the last for any slot beyond).
        #[inline(always)]
        fn ring_in(slot: u32) -> &'static RingBuf {
            match slot {
                $($index => &$name,)+
                _ => &EVENTS15,
            }
        }
    };
}
monitor_common::with_rings!(rings);

/// How many rings are in use (1..=`MAX_RINGS`); set by the loader.
#[unsafe(no_mangle)]
static RINGS: Global<u32> = Global::new(1);

/// The slot of the ring `cpu` writes to. A CPU has a ring of its own unless there are more
/// CPUs than rings: no division then (a `%` is an integer division on every run).
#[inline(always)]
pub(crate) fn ring_slot(cpu: u32) -> u32 {
    let rings = RINGS.load();
    if rings <= 1 {
        0
    } else if cpu < rings {
        cpu
    } else {
        cpu % rings
    }
}

/// The ring of the CPU this runs on.
#[inline(always)]
pub(crate) fn ring() -> &'static RingBuf {
    // SAFETY: no arguments; returns the current CPU's number.
    let cpu = unsafe { generated::bpf_get_smp_processor_id() };
    ring_in(ring_slot(cpu))
}

#[map(name = "TRANSITIONS")]
pub(crate) static TRANSITIONS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(TRANSITION_SLOTS, 0);

#[map(name = "EVENT_COUNTERS")]
pub(crate) static EVENT_COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(counter::SLOTS, 0);

/// Field offsets of the running kernel's structs, from its BTF; set by the loader. Read
/// through [`offsets`] only.
#[unsafe(no_mangle)]
pub(crate) static OFFSETS: KernelOffsets = KernelOffsets::UNKNOWN;

/// The loader's offsets, each field loaded where it is used. The address goes through a
/// volatile read, so the compiler cannot fold in the placeholder values the static starts
/// with (the loader replaces them); `Global::load` would copy every field on every run.
/// The verifier still sees a pointer into the frozen read-only map, and knows each loaded
/// offset as a constant.
#[inline(always)]
pub(crate) fn offsets() -> &'static KernelOffsets {
    let at: *const KernelOffsets = &raw const OFFSETS;
    // SAFETY: reads a local; the pointer is the static's own address.
    unsafe { &*core::ptr::read_volatile(&at) }
}

/// The `monitor-common` this object was compiled from; the loader compares it with its own
/// before loading, so a stale object is refused instead of misread.
#[unsafe(no_mangle)]
#[used]
pub(crate) static COMMON_FINGERPRINT: u64 = monitor_common::SOURCE_FINGERPRINT;

/// Wake the consumer only once this many bytes wait in the ring (it also drains on a timer);
/// 0 wakes it for every event (low-latency mode).
#[unsafe(no_mangle)]
pub(crate) static WAKEUP_BYTES: Global<u64> = Global::new(0);

/// How many bytes this CPU writes between two looks at how full its ring is: the wake-up
/// threshold shared among the CPUs that write to one ring; set by the loader.
#[unsafe(no_mangle)]
pub(crate) static CHECK_BYTES: Global<u64> = Global::new(0);

/// The bit offset of `inet_request_sock.acked`, set by the loader (bitfields have no byte
/// offset of their own).
#[unsafe(no_mangle)]
pub(crate) static REQ_ACKED_BIT: Global<u32> = Global::new(OFFSET_UNKNOWN);

/// Bytes this CPU has written since it last looked at its ring's fill (one slot).
#[map(name = "UNCHECKED_BYTES")]
pub(crate) static UNCHECKED_BYTES: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// When each [`log_kind`] was last logged on this CPU (`bpf_ktime_get_ns`; 0: never).
#[map(name = "LOGGED_AT")]
pub(crate) static LOGGED_AT: PerCpuArray<u64> = PerCpuArray::with_max_entries(log_kind::SLOTS, 0);

/// Whether `kind` may be logged now: at most once per CPU per kind per second, so a ring
/// that stays full costs one line a second per CPU, not one per lost record. Called only on
/// the paths where something went wrong.
#[inline(always)]
pub(crate) fn may_log(kind: u32) -> bool {
    let Some(at) = LOGGED_AT.get_ptr_mut(kind) else { return false };
    // SAFETY: this CPU's slot; a nested run can at worst log twice in a second.
    unsafe {
        let now = bpf_ktime_get_ns();
        if *at != 0 && now.wrapping_sub(*at) < 1_000_000_000 {
            return false;
        }
        *at = now;
    }
    true
}

/// This CPU's number, when `kind` may be logged now ([`may_log`]): what every log line
/// names.
#[inline(always)]
pub(crate) fn logging_cpu(kind: u32) -> Option<u32> {
    // SAFETY: no arguments; returns the current CPU's number.
    may_log(kind).then(|| unsafe { generated::bpf_get_smp_processor_id() })
}

/// Adds one to slot `index` of a per-CPU counter map.
#[inline(always)]
pub(crate) fn bump(map: &PerCpuArray<u64>, index: u32) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // Per-CPU slot, and tracing programs do not nest on one CPU: a plain add is exact.
        unsafe { *slot += 1 };
    }
}
