//! Loads from kernel memory and from trace records, and the aligned stores that write
//! 16-byte record fields.

use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, generated},
    programs::TracePointContext,
    EbpfContext,
};
use monitor_common::OFFSET_UNKNOWN;

/// One load from the tracepoint record. Volatile so the compiler emits exactly this load:
/// the verifier allows only constant-offset, aligned loads from the context, and a merged
/// `memcpy` from it is rejected ("dereference of modified ctx ptr").
#[inline(always)]
pub(crate) unsafe fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    unsafe { core::ptr::read_volatile(ctx.as_ptr().cast::<u8>().add(offset).cast::<T>()) }
}

/// Copies a 16-byte address field as two 8-byte loads (offsets 40 and 56 are 8-aligned).
#[inline(always)]
pub(crate) unsafe fn copy_addr(ctx: &TracePointContext, offset: usize, dst: &mut [u8; 16]) {
    unsafe { store16(dst, field::<u64>(ctx, offset), field::<u64>(ctx, offset + 8)) };
}

/// Copies a 16-byte address field that is only 2-aligned in the record, 2 bytes at a time
/// (tracepoint context loads must be aligned to their size).
#[inline(always)]
pub(crate) unsafe fn copy_addr_2aligned(
    ctx: &TracePointContext,
    offset: usize,
    dst: &mut [u8; 16],
) {
    let dst = dst.as_mut_ptr().cast::<u16>();
    for i in 0..8 {
        unsafe { core::ptr::write_unaligned(dst.add(i), field::<u16>(ctx, offset + 2 * i)) };
    }
}

/// Stores a 16-byte field of a record (an address, a task name) as two 8-byte stores. Every
/// such field of the shared records sits at an 8-aligned offset of an 8-aligned record;
/// written as aligned, it is two store instructions, where an unaligned write becomes
/// sixteen byte stores (or a call to a `memset` subprogram), each run on every transition.
#[inline(always)]
pub(crate) unsafe fn store16(dst: &mut [u8; 16], low: u64, high: u64) {
    let dst = dst.as_mut_ptr().cast::<u64>();
    // Volatile: LLVM would otherwise merge two zero stores into a `memset` call.
    unsafe {
        dst.write_volatile(low);
        dst.add(1).write_volatile(high);
    }
}

/// Reads kernel memory at known offsets from a base address.
pub(crate) trait Reader: Sized {
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
pub(crate) struct Probe(pub(crate) u64);

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

impl Probe {
    /// A reader of the struct whose address is the pointer `bytes` past the base (an array
    /// slot: a run-time offset, where [`Reader::follow`] takes a field's).
    #[inline(always)]
    pub(crate) unsafe fn follow_at(&self, bytes: u64) -> Self {
        if self.0 == 0 {
            return Probe(0);
        }
        let at = self.0.wrapping_add(bytes) as *const u64;
        Probe(unsafe { bpf_probe_read_kernel(at) }.unwrap_or(0))
    }
}

/// Reads with plain loads from a BTF-typed pointer (the BTF build). The offsets live in the
/// read-only, frozen `OFFSETS` map, so the verifier knows them as constants, checks each load
/// against the kernel's BTF (field and size), and prunes the branches of unknown offsets; a
/// faulting load reads 0 instead of crashing (`BPF_PROBE_MEM`).
#[derive(Clone, Copy)]
pub(crate) struct Direct(pub(crate) *const u8);

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
