//! The programs' in-kernel counters: per-CPU arrays summed when read, and the kernel's own
//! statistics of the state program. They stay exact when the ring buffer overflows.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use aya::maps::{MapData, MapError, PerCpuArray};
use aya::programs::ProgramFd;
use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_info};
use monitor_common::{counter, STATE_SLOTS, TRANSITION_SLOTS};

/// In-kernel per-CPU counters, summed over CPUs when read, and the program's own statistics.
pub struct KernelCounters {
    pub(super) transitions: PerCpuArray<MapData, u64>,
    pub(super) events: PerCpuArray<MapData, u64>,
    pub(super) program: ProgramFd,
}

/// One read of the kernel counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelCounts {
    /// `(old state, new state, count)` for every pair with a non-zero count.
    pub transitions: Vec<(i32, i32, u64)>,
    /// Records lost because the ring was full.
    pub ring_reserve_failed: u64,
    /// Reset and SYN-ACK records lost because the ring was full.
    pub notes_lost: u64,
    /// Runs the kernel skipped because another BPF program was already running on that CPU
    /// (`trace_call_bpf`'s `bpf_prog_active` guard): transitions nobody counted.
    pub recursion_misses: u64,
    /// Total run time of the program, ns (only grows while `kernel.bpf_stats_enabled=1`).
    pub run_time_ns: u64,
    /// Runs of the program (only counted while `kernel.bpf_stats_enabled=1`).
    pub run_count: u64,
}

impl KernelCounts {
    /// Total TCP transitions the kernel saw.
    pub fn total_transitions(&self) -> u64 {
        self.transitions.iter().map(|(_, _, n)| n).sum()
    }
}

/// The counters could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CounterReadError {
    /// A counter map could not be read.
    #[error("reading the {map} map: {source}")]
    Map {
        /// Which map.
        map: &'static str,
        /// aya's error.
        source: MapError,
    },
    /// The thread that reads them gave no answer.
    #[error("reading the counters: {0}")]
    NoAnswer(#[from] crate::privilege::NoAnswer),
}

impl KernelCounters {
    /// Reads and sums every counter.
    pub fn read(&self) -> Result<KernelCounts, CounterReadError> {
        let sum = |map: &PerCpuArray<MapData, u64>, name, index| {
            map.get(&index, 0)
                .map(|per_cpu| per_cpu.iter().sum::<u64>())
                .map_err(|source| CounterReadError::Map { map: name, source })
        };
        let mut counts = KernelCounts::default();
        for index in 0..TRANSITION_SLOTS {
            let total = sum(&self.transitions, "transitions", index)?;
            if total > 0 {
                let (old, new) = (index / STATE_SLOTS, index % STATE_SLOTS);
                counts.transitions.push((old as i32, new as i32, total));
            }
        }
        counts.ring_reserve_failed =
            sum(&self.events, "event counters", counter::RING_RESERVE_FAILED)?;
        counts.notes_lost = sum(&self.events, "event counters", counter::NOTE_RESERVE_FAILED)?;
        // The statistics are a bonus: counters are still worth reporting without them.
        if let Ok(info) = program_info(self.program.as_fd()) {
            counts.recursion_misses = info.recursion_misses;
            counts.run_time_ns = info.run_time_ns;
            counts.run_count = info.run_cnt;
        }
        Ok(counts)
    }
}

/// `BPF_OBJ_GET_INFO_BY_FD` for a program (aya 0.14's `ProgramInfo` lacks the counters).
fn program_info(fd: BorrowedFd<'_>) -> std::io::Result<bpf_prog_info> {
    // SAFETY: both are plain C structs for which all-zeroes is a valid value.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info_len = std::mem::size_of::<bpf_prog_info>() as u32;
    attr.info.info = (&mut info as *mut bpf_prog_info) as u64;
    // SAFETY: the kernel writes at most info_len bytes into `info`, which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            &mut attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info)
}
