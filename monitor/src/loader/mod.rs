//! The only module that talks to aya: checks that the running kernel can run the programs,
//! loads and attaches them, and hands out their maps. Dropping [`Loaded`] detaches them.
//!
//! [`btf`] finds the struct fields the programs read in the kernel's BTF, [`tracefs`] mounts
//! tracefs and checks classic tracepoint layouts, [`counters`] reads the in-kernel counters.

pub mod btf;
pub mod counters;
mod error;
mod host;
mod kernel_log;
pub mod tracefs;

use std::path::Path;

use aya::maps::{Map, MapData, PerCpuArray};
use aya::programs::{BtfTracePoint, FExit, ProgramType, TracePoint};
use aya::{Btf, Ebpf, EbpfLoader};
use log::{info, warn};
use monitor_common::{names, KernelOffsets, MAX_RINGS, OFFSET_UNKNOWN};

pub use btf::VMLINUX_BTF;
pub use counters::{CounterReadError, KernelCounters, KernelCounts};
use error::{aya_error, check_object};
pub use error::{object_fingerprint, FingerprintError, LoadError};
pub use host::{
    can_load, effective_capabilities, has, kernel_version, seccomp_filtered, CAP_BPF, CAP_PERFMON,
    CAP_SYS_ADMIN, MIN_KERNEL,
};
pub use kernel_log::KernelLog;
use tracefs::{
    Tracepoint, ACCEPT4_TRACEPOINT, ACCEPT_TRACEPOINT, STATE_TRACEPOINT, SYNACK_TRACEPOINT,
};

/// The eBPF object built by `build.rs` (aya-build) from `monitor-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

/// Set (to anything) in the environment, the programs skip reading sockets' cgroups (every
/// workload is `unknown`): `cargo xtask bench` measures what that read costs with it.
pub const WITHOUT_CGROUP_ENV: &str = "TCPMON_BENCH_WITHOUT_CGROUP";

/// Knobs of the kernel side.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Ring buffer size in bytes (a power of two, multiple of the page size).
    pub ring_bytes: u32,
    /// Wake userspace once this many bytes wait in a ring (at most a quarter of each ring is
    /// used); 0 wakes it for every event.
    pub wakeup_bytes: u64,
    /// Mount tracefs if it is not (the daemon); a check leaves the host as it is, and does
    /// without what needs tracefs.
    pub mount_tracefs: bool,
    /// Which build of the state program to attach.
    pub hook: HookChoice,
    /// How to see the application's accept() calls.
    pub accept: AcceptChoice,
}

/// How to see the application's accept() calls (`--accept-wait`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AcceptChoice {
    /// fexit on `inet_csk_accept` where the kernel allows BPF trampolines; otherwise not at
    /// all, since the syscall tracepoints slow every system call on the host.
    #[default]
    Auto,
    /// Only fexit.
    Fexit,
    /// The syscall tracepoints, whatever they cost.
    Syscalls,
    /// Not at all.
    Off,
}

/// The hook that sees the application's accept() calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptHook {
    /// `fexit/inet_csk_accept`: every accept, io_uring's included, at no cost elsewhere.
    Fexit,
    /// `syscalls:sys_exit_accept4` and `sys_exit_accept`: accept() and accept4() only, and
    /// every system call on the host takes the kernel's slow path while attached.
    Syscalls,
}

/// How many ring buffers to use for `cpus` CPUs, and the size of each: one per CPU up to
/// [`MAX_RINGS`], sharing `total_bytes` (a power of two) evenly, each a power of two of at
/// least one page as the kernel requires.
pub fn ring_layout(cpus: usize, total_bytes: u32) -> (usize, u32) {
    let rings = cpus.clamp(1, MAX_RINGS);
    let share = (total_bytes / rings as u32).max(PAGE_BYTES);
    // Round down to a power of two: the sum stays within the budget.
    (rings, 1 << (31 - share.leading_zeros()))
}

/// The wake-up threshold each ring gets for a `requested` one (0: wake for every record):
/// at most a quarter of the ring, or a ring smaller than the threshold would never wake the
/// daemon and only its drain timer would empty it.
pub fn wakeup_threshold(requested: u64, ring_bytes: u32) -> u64 {
    requested.min(u64::from(ring_bytes) / 4)
}

/// How many bytes each CPU writes between two looks at its ring's fill (see the eBPF
/// program's `wakeup_flags`): the wake-up threshold shared among the CPUs that write to one
/// ring (`cpu % rings`), so the ring cannot pass the threshold unnoticed.
pub fn check_interval(wakeup_bytes: u64, cpus: usize, rings: usize) -> u64 {
    let sharers = cpus.div_ceil(rings.max(1)).max(1) as u64;
    (wakeup_bytes / sharers).max(1)
}

/// The smallest ring buffer: one page.
const PAGE_BYTES: u32 = 4096;

/// Which build of the state program to attach to `sock:inet_sock_set_state`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HookChoice {
    /// The BTF tracepoint, else the classic one.
    #[default]
    Auto,
    /// Only the BTF tracepoint.
    Btf,
    /// Only the classic tracepoint.
    Tracepoint,
}

/// The build of the state program that is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// The BTF tracepoint (`tp_btf/inet_sock_set_state`): reads the socket directly, and the
    /// kernel builds no trace record for it.
    Btf,
    /// The classic tracepoint (`tracepoint/sock/inet_sock_set_state`): reads the trace
    /// record; needs tracefs.
    Tracepoint,
}

impl Hook {
    /// How logs and metrics name it.
    pub fn name(self) -> &'static str {
        match self {
            Hook::Btf => "btf",
            Hook::Tracepoint => "tracepoint",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Hook::Btf => names::STATE_BTF_PROGRAM,
            Hook::Tracepoint => names::STATE_PROGRAM,
        }
    }
}

/// The loaded, attached program and its maps.
pub struct Loaded {
    /// Keeps the program (and its link) alive; dropping it detaches.
    pub ebpf: Ebpf,
    /// The ring buffers in use, one per CPU (see [`ring_layout`]), for the source to map
    /// itself (aya's `RingBuf` would map each ring once more: 2 × its size more RSS).
    pub rings: Vec<MapData>,
    /// The size of each ring, bytes.
    pub ring_bytes: u32,
    /// The in-kernel counters.
    pub counters: KernelCounters,
    /// Whether `sk_err` is read (close reasons); false without kernel BTF.
    pub reads_sock_err: bool,
    /// Which enrichment programs are attached.
    pub enrichments: Enrichments,
    /// Which build of the state program is attached.
    pub hook: Hook,
    /// The programs' own log lines, to forward ([`KernelLog::forward`]).
    pub kernel_log: Option<KernelLog>,
}

/// Prepares the kernel, loads the program with `options` and attaches it.
pub fn load(options: LoadOptions) -> Result<Loaded, LoadError> {
    check_object(EBPF_OBJECT).map_err(LoadError::StaleObject)?;
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    if kernel_version(&release).is_some_and(|version| version < MIN_KERNEL) {
        return Err(LoadError::KernelTooOld { release });
    }
    if !Path::new(VMLINUX_BTF).exists() {
        return Err(LoadError::NoBtf);
    }
    let report = btf::kernel_offsets(Path::new(VMLINUX_BTF)).unwrap_or_else(|e| {
        warn!("{e}: no struct field can be read (the numbers that need them are not reported)");
        btf::OffsetReport {
            offsets: KernelOffsets::UNKNOWN,
            missing: Vec::new(),
            req_acked_bit: OFFSET_UNKNOWN,
            accept_parameters: None,
        }
    });
    for problem in &report.missing {
        warn!("not read from the kernel (the numbers that need it are not reported): {problem}");
    }
    let mut offsets = report.offsets;
    if !reads_current_task() {
        // The BTF build then names a transition's owner through the two older helpers (its
        // program checks these offsets); without this, Linux 5.10's verifier rejects it
        // ("invalid func unknown#158").
        offsets.task_pid = OFFSET_UNKNOWN;
    }
    if std::env::var_os(WITHOUT_CGROUP_ENV).is_some() {
        // The verifier prunes the loads of an unknown offset: the program as it was before
        // it read cgroups, for the benchmark's comparison.
        offsets.sk_cgroup = OFFSET_UNKNOWN;
    }
    // Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; harmless on newer ones.
    let _ = nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_MEMLOCK,
        nix::sys::resource::RLIM_INFINITY,
        nix::sys::resource::RLIM_INFINITY,
    );

    // One parse of the kernel's BTF serves relocations and the BTF tracepoints.
    let btf = Btf::from_sys_fs().ok();
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| aya_error(what, e))?;
    let (rings, ring_bytes) = ring_layout(cpus, options.ring_bytes);
    let rings_global = rings as u32;
    let wakeup_bytes = wakeup_threshold(options.wakeup_bytes, ring_bytes);
    let check_bytes = check_interval(wakeup_bytes, cpus, rings);
    let mut loader = EbpfLoader::new();
    loader
        .btf(btf.as_ref())
        .override_global(names::OFFSETS_GLOBAL, &offsets, true)
        .override_global(names::WAKEUP_BYTES_GLOBAL, &wakeup_bytes, true)
        .override_global(names::REQ_ACKED_BIT_GLOBAL, &report.req_acked_bit, true)
        .override_global(names::CHECK_BYTES_GLOBAL, &check_bytes, true)
        .override_global(names::RINGS_GLOBAL, &rings_global, true);
    for name in &names::EVENTS_MAPS[..rings] {
        loader.map_max_entries(name, ring_bytes);
    }
    let mut ebpf = loader.load(EBPF_OBJECT).map_err(|e| aya_error("loading the eBPF object", e))?;

    let mount = options.mount_tracefs;
    let hook = attach_state_program(&mut ebpf, btf.as_ref(), &offsets, options.hook, mount)?;
    let program = ebpf
        .program(hook.program())
        .ok_or(LoadError::NotInObject { kind: "program", name: hook.program() })?
        .fd()
        .and_then(|fd| fd.try_clone().map_err(Into::into))
        .map_err(|e| aya_error("duplicating the program fd", e))?;

    let mut enrichments = attach_enrichments(&mut ebpf, btf.as_ref(), &offsets, hook, mount);
    let accept_parameters = report.accept_parameters;
    enrichments.accept =
        attach_accept(&mut ebpf, btf.as_ref(), &offsets, accept_parameters, options.accept, mount);

    let kernel_log = KernelLog::take(&mut ebpf);
    let mut take = |name: &'static str| {
        ebpf.take_map(name).ok_or(LoadError::NotInObject { kind: "map", name })
    };
    let rings = names::EVENTS_MAPS[..rings]
        .iter()
        .map(|name| match take(name)? {
            Map::RingBuf(data) => Ok(data),
            _ => Err(LoadError::NotInObject { kind: "ring buffer", name }),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let transitions = PerCpuArray::try_from(take(names::TRANSITIONS_MAP)?)
        .map_err(|e| aya_error("opening the transition counters", e))?;
    let events = PerCpuArray::try_from(take(names::EVENT_COUNTERS_MAP)?)
        .map_err(|e| aya_error("opening the event counters", e))?;
    // Parsing the kernel's BTF (ours for sk_err, aya's for relocations) leaves ~25 MiB of
    // freed heap that glibc keeps: give it back, it is never needed again.
    // SAFETY: malloc_trim only releases free memory; it has no preconditions.
    unsafe { libc::malloc_trim(0) };
    Ok(Loaded {
        ebpf,
        rings,
        ring_bytes,
        counters: KernelCounters { transitions, events, program },
        reads_sock_err: report.reads_sock_err(),
        enrichments,
        hook,
        kernel_log,
    })
}

/// Whether the kernel has `bpf_get_current_task_btf` (Linux 5.11, commit 3ca1032ab7ab), with
/// which the BTF build reads the current task's ids and name in one call. Probed as libbpf
/// does: a two-instruction tracepoint program calling it.
fn reads_current_task() -> bool {
    use aya::sys::{is_helper_supported, BpfHelper};
    is_helper_supported(ProgramType::TracePoint, BpfHelper::BPF_FUNC_get_current_task_btf)
        .unwrap_or(false)
}

/// Attaches the state program as `choice` asks: the BTF build when the kernel's verifier
/// accepts it (checked by loading it), else the classic tracepoint.
fn attach_state_program(
    ebpf: &mut Ebpf,
    btf: Option<&Btf>,
    offsets: &KernelOffsets,
    choice: HookChoice,
    mount: bool,
) -> Result<Hook, LoadError> {
    if choice != HookChoice::Tracepoint {
        match attach_btf_state_program(ebpf, btf, offsets) {
            Ok(()) => return Ok(Hook::Btf),
            Err(e) if choice == HookChoice::Btf => return Err(e),
            Err(e) => info!("BTF tracepoint not usable ({e}); using the classic tracepoint"),
        }
    }
    attach_classic(ebpf, names::STATE_PROGRAM, &STATE_TRACEPOINT, mount)?;
    Ok(Hook::Tracepoint)
}

/// Loads and attaches `tp_btf/inet_sock_set_state`. It needs the kernel's BTF and every
/// socket field's offset; the verifier then checks each load against the BTF.
fn attach_btf_state_program(
    ebpf: &mut Ebpf,
    btf: Option<&Btf>,
    offsets: &KernelOffsets,
) -> Result<(), LoadError> {
    let btf = btf.ok_or(LoadError::NoBtf)?;
    if !offsets.socket_fields_known() {
        return Err(LoadError::SocketFieldsUnknown);
    }
    let name = names::STATE_BTF_PROGRAM;
    let program: &mut BtfTracePoint = ebpf
        .program_mut(name)
        .ok_or(LoadError::NotInObject { kind: "program", name })?
        .try_into()
        .map_err(|e| aya_error("finding the BTF tracepoint program", e))?;
    program
        .load("inet_sock_set_state", btf)
        .map_err(|e| aya_error("loading the BTF state program", e))?;
    program.attach().map_err(|e| aya_error("attaching to tp_btf/inet_sock_set_state", e))?;
    Ok(())
}

/// Loads program `name` and attaches it to the classic `tracepoint`, once tracefs is mounted
/// and the tracepoint's record is laid out as the program reads it.
fn attach_classic(
    ebpf: &mut Ebpf,
    name: &'static str,
    tracepoint: &Tracepoint,
    mount: bool,
) -> Result<(), LoadError> {
    let root = tracefs::ensure_tracefs(mount)?;
    tracepoint.check_format(Path::new(root))?;
    load_classic(ebpf, name, tracepoint)?
        .attach(tracepoint.category, tracepoint.name)
        .map_err(|e| aya_error(format!("attaching to {tracepoint}"), e))?;
    Ok(())
}

/// Loads the classic tracepoint program `name`, for `tracepoint` (the first it attaches to).
fn load_classic<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
    tracepoint: &Tracepoint,
) -> Result<&'a mut TracePoint, LoadError> {
    let program: &mut TracePoint = ebpf
        .program_mut(name)
        .ok_or(LoadError::NotInObject { kind: "program", name })?
        .try_into()
        .map_err(|e| aya_error(format!("finding the program for {tracepoint}"), e))?;
    program.load().map_err(|e| aya_error(format!("loading the program for {tracepoint}"), e))?;
    Ok(program)
}

/// Which of the programs beside the state tracepoint are attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Enrichments {
    /// `tcp:tcp_retransmit_synack`: passive handshakes whose SYN-ACK was resent; which build
    /// of the program is attached, if one is.
    pub synack: Option<Hook>,
    /// `tcp:tcp_send_reset` and `tcp:tcp_receive_reset`: who reset a connection.
    pub resets: bool,
    /// The application's accept() of each connection, hence the wait in the accept queue
    /// and connections abandoned there: which hook sees it, if one does.
    pub accept: Option<AcceptHook>,
}

impl Enrichments {
    /// How the start-up line and `tcpmon check` name the accept hook in use.
    pub fn accept_route(&self) -> &'static str {
        match self.accept {
            Some(AcceptHook::Fexit) => "fexit (inet_csk_accept)",
            Some(AcceptHook::Syscalls) => {
                "syscall tracepoints (sys_exit_accept4, sys_exit_accept; every system call \
                 on the host takes the slow path)"
            }
            None => "no",
        }
    }
}

/// Loads and attaches the enrichment programs. Each is optional: without it the daemon still
/// runs and the numbers it would give are not reported (a warning says which).
fn attach_enrichments(
    ebpf: &mut Ebpf,
    btf: Option<&Btf>,
    offsets: &KernelOffsets,
    state_hook: Hook,
    mount: bool,
) -> Enrichments {
    let synack = attach_synack(ebpf, btf, offsets, state_hook, mount);
    let Some(btf) = btf else {
        warn!("no kernel BTF: reset direction is not reported");
        return Enrichments { synack, resets: false, accept: None };
    };
    // Attached independently: either one alone still counts its direction.
    let resets = [
        (names::RESET_SENT_PROGRAM, "tcp_send_reset"),
        (names::RESET_RECEIVED_PROGRAM, "tcp_receive_reset"),
    ]
    .map(|(name, tracepoint)| match attach_btf_tracepoint(ebpf, name, tracepoint, btf) {
        Ok(()) => true,
        Err(e) => {
            warn!("program {name} not attached ({e}); the numbers it gives are not reported");
            false
        }
    });
    Enrichments { synack, resets: resets == [true, true], accept: None }
}

/// Attaches a hook on the application's accept() calls as `choice` asks (see
/// [`AcceptChoice`]), and says in the log what it chose and why.
fn attach_accept(
    ebpf: &mut Ebpf,
    btf: Option<&Btf>,
    offsets: &KernelOffsets,
    parameters: Option<usize>,
    choice: AcceptChoice,
    mount: bool,
) -> Option<AcceptHook> {
    let unreported = "the accept wait and abandoned connections are not reported";
    if choice == AcceptChoice::Off {
        return None;
    }
    if choice != AcceptChoice::Syscalls {
        match attach_accept_fexit(ebpf, btf, offsets, parameters) {
            Ok(()) => return Some(AcceptHook::Fexit),
            Err(e) if choice == AcceptChoice::Fexit => {
                warn!("fexit on inet_csk_accept not usable ({e}): {unreported}");
                return None;
            }
            Err(e) => {
                info!(
                    "fexit on inet_csk_accept not usable ({e}): {unreported}. \
                     `--accept-wait syscalls` sees accept() through the syscall tracepoints, \
                     which slow every system call on the host (BENCHMARKS.md)"
                );
                return None;
            }
        }
    }
    match attach_accept_syscalls(ebpf, offsets, mount) {
        Ok(()) => Some(AcceptHook::Syscalls),
        Err(e) => {
            warn!("accept() is not seen ({e}): {unreported}");
            None
        }
    }
}

/// Loads and attaches the fexit program on `inet_csk_accept` whose argument list matches
/// this kernel's (the return value follows the arguments).
fn attach_accept_fexit(
    ebpf: &mut Ebpf,
    btf: Option<&Btf>,
    offsets: &KernelOffsets,
    parameters: Option<usize>,
) -> Result<(), LoadError> {
    let btf = btf.ok_or(LoadError::NoBtf)?;
    if offsets.sk_protocol == OFFSET_UNKNOWN {
        return Err(LoadError::SocketFieldsUnknown);
    }
    let name = match parameters {
        Some(2) => names::ACCEPT_FEXIT_PROGRAM,
        Some(4) => names::ACCEPT_FEXIT_BEFORE_6_10_PROGRAM,
        _ => return Err(LoadError::AcceptSignature(parameters)),
    };
    let program: &mut FExit = ebpf
        .program_mut(name)
        .ok_or(LoadError::NotInObject { kind: "program", name })?
        .try_into()
        .map_err(|e| aya_error("finding the fexit program", e))?;
    program
        .load("inet_csk_accept", btf)
        .map_err(|e| aya_error("loading fexit/inet_csk_accept", e))?;
    program.attach().map_err(|e| aya_error("attaching fexit/inet_csk_accept", e))?;
    Ok(())
}

/// Attaches the accept program to the exits of accept4() and accept(). Syscall events exist
/// only as classic tracepoints, so this needs tracefs whichever build the state program
/// uses. accept() is optional: not every architecture has it.
fn attach_accept_syscalls(
    ebpf: &mut Ebpf,
    offsets: &KernelOffsets,
    mount: bool,
) -> Result<(), LoadError> {
    if !offsets.accept_fields_known() {
        return Err(LoadError::AcceptFieldsUnknown);
    }
    let root = Path::new(tracefs::ensure_tracefs(mount)?);
    ACCEPT4_TRACEPOINT.check_format(root)?;
    let with_accept = ACCEPT_TRACEPOINT.check_format(root).is_ok();
    let program = load_classic(ebpf, names::ACCEPT_SYSCALLS_PROGRAM, &ACCEPT4_TRACEPOINT)?;
    let tracepoints: &[&Tracepoint] = match with_accept {
        true => &[&ACCEPT4_TRACEPOINT, &ACCEPT_TRACEPOINT],
        false => &[&ACCEPT4_TRACEPOINT],
    };
    for tracepoint in tracepoints {
        program
            .attach(tracepoint.category, tracepoint.name)
            .map_err(|e| aya_error(format!("attaching to {tracepoint}"), e))?;
    }
    Ok(())
}

/// Attaches a build of the SYN-ACK program: the request socket's first SYN-ACK time is what
/// it adds. The BTF build reads the request socket itself (no tracefs, and no record layout:
/// Linux 5.10's differs); the classic build reads the trace record. The build of the state
/// program comes first, the other is the fallback, so `--hook tracepoint` runs (and the
/// kernel matrix tests) the classic builds of both where they load.
fn attach_synack(
    ebpf: &mut Ebpf,
    btf: Option<&Btf>,
    offsets: &KernelOffsets,
    state_hook: Hook,
    mount: bool,
) -> Option<Hook> {
    if offsets.snt_synack == OFFSET_UNKNOWN {
        return None;
    }
    let mut attach = |hook: Hook| match hook {
        Hook::Btf => match btf {
            Some(btf) if offsets.socket_fields_known() => {
                let name = names::SYNACK_BTF_PROGRAM;
                attach_btf_tracepoint(ebpf, name, "tcp_retransmit_synack", btf)
            }
            Some(_) => Err(LoadError::SocketFieldsUnknown),
            None => Err(LoadError::NoBtf),
        },
        Hook::Tracepoint => attach_classic(ebpf, names::SYNACK_PROGRAM, &SYNACK_TRACEPOINT, mount),
    };
    let other = match state_hook {
        Hook::Btf => Hook::Tracepoint,
        Hook::Tracepoint => Hook::Btf,
    };
    let first_error = match attach(state_hook) {
        Ok(()) => return Some(state_hook),
        Err(e) => e,
    };
    match attach(other) {
        Ok(()) => {
            info!(
                "SYN-ACK program: {} build ({} build: {first_error})",
                other.name(),
                state_hook.name()
            );
            Some(other)
        }
        Err(e) => {
            warn!("{first_error}; {e}; SYN-ACK retransmissions are not seen");
            None
        }
    }
}

/// Loads program `name` and attaches it to the BTF tracepoint `tracepoint`.
fn attach_btf_tracepoint(
    ebpf: &mut Ebpf,
    name: &'static str,
    tracepoint: &str,
    btf: &Btf,
) -> Result<(), LoadError> {
    let program: &mut BtfTracePoint = ebpf
        .program_mut(name)
        .ok_or(LoadError::NotInObject { kind: "program", name })?
        .try_into()
        .map_err(|e| aya_error(format!("finding the program for tp_btf/{tracepoint}"), e))?;
    program
        .load(tracepoint, btf)
        .map_err(|e| aya_error(format!("loading the program for tp_btf/{tracepoint}"), e))?;
    program.attach().map_err(|e| aya_error(format!("attaching to tp_btf/{tracepoint}"), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_program_was_built_from_this_monitor_common() {
        // Fails when build.rs did not rebuild the eBPF object after an edit of monitor-common.
        assert_eq!(check_object(EBPF_OBJECT).map_err(|e| e.to_string()), Ok(()));
        let err = LoadError::StaleObject(check_object(b"not an object").unwrap_err());
        let err = err.to_string();
        assert!(err.contains("not an ELF object") && err.contains("rebuild"), "{err}");
    }

    #[test]
    fn reads_kernel_versions() {
        assert_eq!(kernel_version("6.18.44-fc-v769\n"), Some((6, 18)));
        assert_eq!(kernel_version("5.4.0-150-generic"), Some((5, 4)));
        assert!(kernel_version("5.4.0").unwrap() < MIN_KERNEL);
        assert_eq!(kernel_version("garbage"), None);
    }

    #[test]
    fn rings_are_one_per_cpu_and_share_the_budget() {
        assert_eq!(ring_layout(1, 8 << 20), (1, 8 << 20));
        assert_eq!(ring_layout(2, 8 << 20), (2, 4 << 20));
        // Not a power of two: each ring rounds down, the sum stays within the budget.
        assert_eq!(ring_layout(6, 8 << 20), (6, 1 << 20));
        // More CPUs than rings share them.
        assert_eq!(ring_layout(256, 8 << 20), (MAX_RINGS, 512 << 10));
        // Never below a page.
        assert_eq!(ring_layout(16, 4096), (16, 4096));
        assert_eq!(ring_layout(0, 4096), (1, 4096));
    }

    #[test]
    fn cpus_sharing_a_ring_look_at_it_in_turn() {
        // One ring per CPU: each looks once it wrote the whole threshold.
        assert_eq!(check_interval(1 << 20, 2, 2), 1 << 20);
        // 20 CPUs on 16 rings: two per ring at most, each looks after half the threshold.
        assert_eq!(check_interval(1 << 20, 20, 16), 1 << 19);
        assert_eq!(check_interval(0, 4, 4), 1);
        assert_eq!(check_interval(100, 256, 0), 1);
    }

    #[test]
    fn each_ring_wakes_the_daemon_by_a_quarter_full() {
        // `--ring-bytes 8MiB` asks for 2 MiB; 16 rings of 512 KiB wake at 128 KiB each.
        assert_eq!(wakeup_threshold(2 << 20, 512 << 10), 128 << 10);
        assert_eq!(wakeup_threshold(2 << 20, 8 << 20), 2 << 20);
        assert_eq!(wakeup_threshold(0, 4 << 20), 0);
    }
}
