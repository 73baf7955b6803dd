//! The only module that talks to aya: prepares the kernel (tracefs), checks that the running
//! kernel matches what the eBPF program expects, loads and attaches it, and hands out its
//! maps. Dropping [`Loaded`] detaches the program.

use std::fs;
use std::path::{Path, PathBuf};

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::{BtfTracePoint, ProgramFd, TracePoint};
use aya::{Btf, Ebpf, EbpfLoader};
use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_info};
use log::{info, warn};
use monitor_common::{
    counter, names, synack_layout, tracepoint_layout, KernelOffsets, MAX_RINGS, OFFSET_UNKNOWN,
    TRANSITION_SLOTS,
};

/// The eBPF object built by `build.rs` (aya-build) from `monitor-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

/// Where tracefs is mounted by default, and where we mount it when nobody did.
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// The older location under debugfs.
const TRACEFS_DEBUGFS: &str = "/sys/kernel/debug/tracing";
/// Where the kernel exposes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// What can go wrong while loading; each variant says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Not enough privilege to load BPF programs.
    #[error(
        "permission denied while {what}: tcpmon needs root, or CAP_BPF + CAP_PERFMON \
         (+ CAP_SYS_ADMIN to mount tracefs)"
    )]
    Permission {
        /// What was being done.
        what: &'static str,
    },
    /// tracefs is not mounted and could not be mounted.
    #[error(
        "tracefs is not mounted and mounting it at {TRACEFS} failed ({source}); mount it with \
         `mount -t tracefs tracefs {TRACEFS}`"
    )]
    Tracefs {
        /// The mount error.
        source: nix::Error,
    },
    /// The tracepoint is missing (kernel too old, or not built with it).
    #[error("the kernel has no sock:inet_sock_set_state tracepoint ({path}): Linux 4.16 or newer is needed")]
    MissingTracepoint {
        /// The format file that was looked for.
        path: PathBuf,
    },
    /// BPF ring buffers need Linux 5.8.
    #[error("kernel {release} is too old: tcpmon needs BPF ring buffers, in Linux 5.8 and newer")]
    KernelTooOld {
        /// `uname -r`.
        release: String,
    },
    /// The kernel exposes no BTF, which the programs need to find struct fields.
    #[error(
        "the kernel has no BTF at {}: tcpmon needs a kernel built with CONFIG_DEBUG_INFO_BTF=y \
         (every major distribution's kernel since 2021)",
        path.display()
    )]
    NoBtf {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The tracepoint's record layout is not the one the program was built for.
    #[error("sock:inet_sock_set_state has an unexpected layout on this kernel: {0}")]
    Layout(String),
    /// The embedded eBPF object was compiled from another `monitor-common` than this
    /// binary: its records would be misread.
    #[error(
        "the embedded eBPF program was built from another version of monitor-common \
         ({found}) than the rest of tcpmon (fingerprint {expected:#018x}): rebuild tcpmon \
         (`touch monitor-ebpf/src/main.rs && cargo build`)"
    )]
    StaleObject {
        /// The object's fingerprint, or why it could not be read.
        found: String,
        /// This binary's [`monitor_common::SOURCE_FINGERPRINT`].
        expected: u64,
    },
    /// Loading or attaching failed for another reason.
    #[error("{what}: {source}")]
    Aya {
        /// What was being done.
        what: &'static str,
        /// aya's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn aya_error(
    what: &'static str,
    source: impl std::error::Error + Send + Sync + 'static,
) -> LoadError {
    // EPERM anywhere in the chain means missing privilege (EACCES is the verifier's "no").
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&source);
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(libc::EPERM) {
                return LoadError::Permission { what };
            }
        }
        cause = error.source();
    }
    LoadError::Aya { what, source: Box::new(source) }
}

/// Knobs of the kernel side.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Ring buffer size in bytes (a power of two, multiple of the page size).
    pub ring_bytes: u32,
    /// Wake userspace once this many bytes wait in a ring (at most a quarter of each ring is
    /// used); 0 wakes it for every event.
    pub wakeup_bytes: u64,
    /// Which build of the state program to attach.
    pub hook: HookChoice,
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

/// The smallest ring buffer: one page.
const PAGE_BYTES: u32 = 4096;

/// Which build of the state program to attach to `sock:inet_sock_set_state`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum HookChoice {
    /// The BTF tracepoint, else the classic one.
    #[default]
    Auto,
    /// Only the BTF tracepoint (`tp_btf`): reads the socket directly, skips the trace record.
    Btf,
    /// Only the classic tracepoint: needs tracefs; for kernels whose verifier refuses the
    /// BTF build.
    Tracepoint,
}

/// The build of the state program that is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// The BTF tracepoint (`tp_btf/inet_sock_set_state`).
    Btf,
    /// The classic tracepoint (`tracepoint/sock/inet_sock_set_state`).
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
}

/// The loaded, attached program and its maps.
pub struct Loaded {
    /// Keeps the program (and its link) alive; dropping it detaches.
    pub ebpf: Ebpf,
    /// The ring buffers in use, one per CPU (see [`ring_layout`]).
    pub rings: Vec<RingBuf<MapData>>,
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
}

/// In-kernel per-CPU counters, summed over CPUs when read, and the program's own statistics.
pub struct KernelCounters {
    transitions: PerCpuArray<MapData, u64>,
    events: PerCpuArray<MapData, u64>,
    program: ProgramFd,
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

impl KernelCounters {
    /// Reads and sums every counter.
    pub fn read(&self) -> Result<KernelCounts, aya::maps::MapError> {
        let mut counts = KernelCounts::default();
        for index in 0..TRANSITION_SLOTS {
            let total: u64 = self.transitions.get(&index, 0)?.iter().sum();
            if total > 0 {
                let slots = monitor_common::STATE_SLOTS;
                counts.transitions.push(((index / slots) as i32, (index % slots) as i32, total));
            }
        }
        counts.ring_reserve_failed =
            self.events.get(&counter::RING_RESERVE_FAILED, 0)?.iter().sum();
        counts.notes_lost = self.events.get(&counter::NOTE_RESERVE_FAILED, 0)?.iter().sum();
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

/// Mounts tracefs at [`TRACEFS`] unless it is already mounted where aya looks for it (and
/// says so when it mounts it). Returns where it is mounted. Only the classic tracepoints need
/// it, so it is called where one is attached.
pub fn ensure_tracefs() -> Result<&'static str, LoadError> {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if let Some(root) = tracefs_mount(&mounts) {
        return Ok(root);
    }
    nix::mount::mount(
        Some("tracefs"),
        TRACEFS,
        Some("tracefs"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|source| match source {
        nix::Error::EPERM => LoadError::Permission { what: "mounting tracefs" },
        source => LoadError::Tracefs { source },
    })?;
    info!("tracefs was not mounted; mounted it at {TRACEFS} (tracepoint attachment needs it)");
    Ok(TRACEFS)
}

/// Where `/proc/self/mounts` shows tracefs, among the places aya looks for it.
pub fn tracefs_mount(mounts: &str) -> Option<&'static str> {
    let mounted_at = |place: &str| {
        mounts.lines().any(|line| {
            let mut fields = line.split_whitespace();
            let (_, mount_point, fs_type) = (fields.next(), fields.next(), fields.next());
            fs_type == Some("tracefs") && mount_point == Some(place)
        })
    };
    [TRACEFS, TRACEFS_DEBUGFS].into_iter().find(|place| mounted_at(place))
}

/// One `field:` line of a tracepoint `format` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatField {
    /// The field's name, e.g. `saddr_v6` (array brackets removed).
    pub name: String,
    /// Byte offset in the record.
    pub offset: usize,
    /// Size in bytes.
    pub size: usize,
}

/// Parses the `field:` lines of a tracepoint `format` file. Lines that do not parse are
/// skipped; [`check_layout`] then reports the fields it needed and did not find.
pub fn parse_format(text: &str) -> Vec<FormatField> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.trim().split(';').map(str::trim);
            let declaration = parts.next()?.strip_prefix("field:")?;
            let name = declaration.rsplit(' ').next()?;
            let name = name.split('[').next()?.to_owned();
            let mut offset = None;
            let mut size = None;
            for part in parts {
                if let Some(v) = part.strip_prefix("offset:") {
                    offset = v.parse().ok();
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = v.parse().ok();
                }
            }
            Some(FormatField { name, offset: offset?, size: size? })
        })
        .collect()
}

/// Checks that every field the program reads is where it expects it, with the size it
/// expects. Returns a description of every difference.
pub fn check_layout(fields: &[FormatField]) -> Result<(), String> {
    check_fields(fields, &tracepoint_layout::FIELDS)
}

/// Checks `fields` (a parsed `format` file) against `expected` `(name, offset, size)`.
pub fn check_fields(
    fields: &[FormatField],
    expected: &[(&str, usize, usize)],
) -> Result<(), String> {
    let mut problems = Vec::new();
    for &(name, offset, size) in expected {
        match fields.iter().find(|f| f.name == name) {
            None => problems.push(format!("field `{name}` is missing")),
            Some(f) if f.offset != offset || f.size != size => problems.push(format!(
                "field `{name}` is at offset {} size {}, expected offset {offset} size {size}",
                f.offset, f.size
            )),
            Some(_) => {}
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// The kernel struct fields the programs read, each as `(struct, member path)`, in the order
/// of [`KernelOffsets`]' fields.
pub const KERNEL_FIELDS: [(&str, &[&str]); 22] = [
    ("sock", &["sk_err"]),
    ("sock", &["__sk_common", "skc_net"]),
    ("net", &["ns", "inum"]),
    ("tcp_sock", &["bytes_acked"]),
    ("tcp_sock", &["bytes_received"]),
    ("tcp_sock", &["segs_out"]),
    ("tcp_sock", &["segs_in"]),
    ("tcp_sock", &["total_retrans"]),
    ("tcp_sock", &["srtt_us"]),
    ("tcp_request_sock", &["snt_synack"]),
    ("tcp_sock", &["bytes_sent"]),
    ("tcp_sock", &["bytes_retrans"]),
    ("sock", &["__sk_common", "skc_flags"]),
    ("sock", &["__sk_common", "skc_family"]),
    ("sock", &["__sk_common", "skc_num"]),
    ("sock", &["__sk_common", "skc_dport"]),
    ("sock", &["__sk_common", "skc_rcv_saddr"]),
    ("sock", &["__sk_common", "skc_daddr"]),
    ("sock", &["__sk_common", "skc_v6_rcv_saddr"]),
    ("sock", &["__sk_common", "skc_v6_daddr"]),
    ("sock", &["sk_protocol"]),
    ("tcp_sock", &["inet_conn", "icsk_inet", "inet_sport"]),
];

/// The offsets found in the kernel's BTF, and a note for each field that was not.
#[derive(Clone, Debug)]
pub struct OffsetReport {
    /// What the programs will read (unknown fields disabled).
    pub offsets: KernelOffsets,
    /// `"struct X.member: why"` for every field that could not be located.
    pub missing: Vec<String>,
}

impl OffsetReport {
    /// Close reasons come from `sk_err`.
    pub fn reads_sock_err(&self) -> bool {
        self.offsets.sk_err != OFFSET_UNKNOWN
    }
}

/// Reads the byte offsets of every field the programs use from the kernel's BTF. Fails only
/// when the BTF itself cannot be read.
pub fn kernel_offsets(btf_path: &Path) -> Result<OffsetReport, String> {
    let btf = btf_rs::Btf::from_file(btf_path)
        .map_err(|e| format!("reading {}: {e}", btf_path.display()))?;
    let mut found = [OFFSET_UNKNOWN; KERNEL_FIELDS.len()];
    let mut missing = Vec::new();
    for (slot, (ty, path)) in found.iter_mut().zip(KERNEL_FIELDS) {
        match member_offset(&btf, ty, path) {
            Ok(offset) => *slot = offset,
            Err(e) => missing.push(format!("struct {ty}.{}: {e}", path.join("."))),
        }
    }
    let [sk_err, skc_net, net_inum, bytes_acked, bytes_received, segs_out, segs_in, total_retrans, srtt_us, snt_synack, bytes_sent, bytes_retrans, sk_flags, skc_family, skc_num, skc_dport, skc_rcv_saddr, skc_daddr, skc_v6_rcv_saddr, skc_v6_daddr, sk_protocol, inet_sport] =
        found;
    let offsets = KernelOffsets {
        sk_err,
        skc_net,
        net_inum,
        bytes_acked,
        bytes_received,
        segs_out,
        segs_in,
        total_retrans,
        srtt_us,
        snt_synack,
        bytes_sent,
        bytes_retrans,
        sk_flags,
        skc_family,
        skc_num,
        skc_dport,
        skc_rcv_saddr,
        skc_daddr,
        skc_v6_rcv_saddr,
        skc_v6_daddr,
        sk_protocol,
        inet_sport,
        _pad: 0,
    };
    Ok(OffsetReport { offsets, missing })
}

/// Byte offset of `path` (a member, then members of that member) inside `struct name`.
/// Anonymous struct and union members are searched through, as C does.
fn member_offset(btf: &btf_rs::Btf, name: &str, path: &[&str]) -> Result<u32, String> {
    let mut current = btf
        .resolve_types_by_name(name)
        .map_err(|e| e.to_string())?
        .into_iter()
        .find_map(|ty| match ty {
            btf_rs::Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
        .ok_or("no such struct")?;
    let mut offset_bits = 0;
    for (depth, field) in path.iter().enumerate() {
        let (bits, member) =
            find_member(btf, &current, field, 0).ok_or_else(|| format!("no member {field}"))?;
        if member.bitfield_size().is_some_and(|size| size != 0) || bits % 8 != 0 {
            return Err(format!("{field} is a bitfield"));
        }
        offset_bits += bits;
        if depth + 1 < path.len() {
            current = struct_of(btf, &member).ok_or_else(|| format!("{field} is not a struct"))?;
        }
    }
    Ok(offset_bits / 8)
}

/// `(bit offset, member)` of `field` in `s`, looking inside anonymous members.
fn find_member(
    btf: &btf_rs::Btf,
    s: &btf_rs::Struct,
    field: &str,
    depth: u32,
) -> Option<(u32, btf_rs::Member)> {
    for member in &s.members {
        let name = btf.resolve_name(member).unwrap_or_default();
        if name == field {
            return Some((member.bit_offset(), member.clone()));
        }
        if name.is_empty() && depth < 8 {
            if let Some(inner) = struct_of(btf, member) {
                if let Some((bits, found)) = find_member(btf, &inner, field, depth + 1) {
                    return Some((member.bit_offset() + bits, found));
                }
            }
        }
    }
    None
}

/// The struct or union a member's type is, through typedefs and qualifiers.
fn struct_of(btf: &btf_rs::Btf, member: &btf_rs::Member) -> Option<btf_rs::Struct> {
    let mut ty = btf.resolve_chained_type(member).ok()?;
    for _ in 0..8 {
        ty = match ty {
            btf_rs::Type::Struct(s) | btf_rs::Type::Union(s) => return Some(s),
            btf_rs::Type::Typedef(t) => btf.resolve_chained_type(&t).ok()?,
            btf_rs::Type::Const(t) => btf.resolve_chained_type(&t).ok()?,
            btf_rs::Type::Volatile(t) => btf.resolve_chained_type(&t).ok()?,
            _ => return None,
        };
    }
    None
}

/// The [`monitor_common::SOURCE_FINGERPRINT`] an eBPF object was compiled with: the `u64`
/// at its [`names::FINGERPRINT_SYMBOL`] symbol.
pub fn object_fingerprint(object: &[u8]) -> Result<u64, String> {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
    let file = object::File::parse(object).map_err(|e| format!("not an ELF object: {e}"))?;
    let symbol = file
        .symbol_by_name(names::FINGERPRINT_SYMBOL)
        .ok_or_else(|| format!("no {} symbol", names::FINGERPRINT_SYMBOL))?;
    let section = symbol
        .section_index()
        .and_then(|index| file.section_by_index(index).ok())
        .ok_or("the symbol has no section")?;
    let data = section.data().map_err(|e| e.to_string())?;
    // In a relocatable object a symbol's address is its offset in its section.
    let start = usize::try_from(symbol.address()).map_err(|e| e.to_string())?;
    let bytes = data.get(start..start + 8).ok_or("the symbol lies outside its section")?;
    Ok(u64::from_le_bytes(bytes.try_into().map_err(|_| "8 bytes")?))
}

/// Refuses an embedded object compiled from another `monitor-common` than this binary.
fn check_object(object: &[u8]) -> Result<(), LoadError> {
    let expected = monitor_common::SOURCE_FINGERPRINT;
    match object_fingerprint(object) {
        Ok(found) if found == expected => Ok(()),
        Ok(found) => {
            Err(LoadError::StaleObject { found: format!("fingerprint {found:#018x}"), expected })
        }
        Err(why) => Err(LoadError::StaleObject { found: why, expected }),
    }
}

/// Prepares the kernel, loads the program with `options` and attaches it.
pub fn load(options: LoadOptions) -> Result<Loaded, LoadError> {
    check_object(EBPF_OBJECT)?;
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    if crate::check::kernel_version(&release).is_some_and(|version| version < (5, 8)) {
        return Err(LoadError::KernelTooOld { release });
    }
    if !Path::new(VMLINUX_BTF).exists() {
        return Err(LoadError::NoBtf { path: VMLINUX_BTF.into() });
    }
    let report = kernel_offsets(Path::new(VMLINUX_BTF))
        .unwrap_or_else(|e| OffsetReport { offsets: KernelOffsets::UNKNOWN, missing: vec![e] });
    for problem in &report.missing {
        warn!("not read from the kernel (the numbers that need it are not reported): {problem}");
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
    let mut loader = EbpfLoader::new();
    loader
        .btf(btf.as_ref())
        .override_global(names::OFFSETS_GLOBAL, &report.offsets, true)
        .override_global(names::WAKEUP_BYTES_GLOBAL, &wakeup_bytes, true)
        .override_global(names::RINGS_GLOBAL, &rings_global, true);
    for name in &names::EVENTS_MAPS[..rings] {
        loader.map_max_entries(name, ring_bytes);
    }
    let mut ebpf = loader.load(EBPF_OBJECT).map_err(|e| aya_error("loading the eBPF object", e))?;

    let hook = attach_state_program(&mut ebpf, btf.as_ref(), &report.offsets, options.hook)?;
    let program_name = match hook {
        Hook::Btf => names::STATE_BTF_PROGRAM,
        Hook::Tracepoint => names::STATE_PROGRAM,
    };
    let program_fd = ebpf
        .program(program_name)
        .ok_or_else(|| LoadError::Layout("program missing from the eBPF object".into()))?
        .fd()
        .and_then(|fd| fd.try_clone().map_err(Into::into))
        .map_err(|e| aya_error("duplicating the program fd", e))?;

    let enrichments = attach_enrichments(&mut ebpf, btf.as_ref(), &report.offsets);

    let mut take = |name: &'static str| {
        ebpf.take_map(name)
            .ok_or_else(|| LoadError::Layout(format!("map {name} missing from the eBPF object")))
    };
    let rings = names::EVENTS_MAPS[..rings]
        .iter()
        .map(|name| {
            RingBuf::try_from(take(name)?).map_err(|e| aya_error("opening a ring buffer", e))
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
        counters: KernelCounters { transitions, events, program: program_fd },
        reads_sock_err: report.reads_sock_err(),
        enrichments,
        hook,
    })
}

/// Attaches the state program as `choice` asks: the BTF build when the kernel's verifier
/// accepts it (checked by loading it), else the classic tracepoint.
fn attach_state_program(
    ebpf: &mut Ebpf,
    btf: Option<&Btf>,
    offsets: &KernelOffsets,
    choice: HookChoice,
) -> Result<Hook, LoadError> {
    if choice != HookChoice::Tracepoint {
        match attach_btf_state_program(ebpf, btf, offsets) {
            Ok(()) => return Ok(Hook::Btf),
            Err(e) if choice == HookChoice::Btf => return Err(e),
            Err(e) => info!("BTF tracepoint not usable ({e}); using the classic tracepoint"),
        }
    }
    let tracefs = ensure_tracefs()?;
    let format_path = Path::new(tracefs).join("events/sock/inet_sock_set_state/format");
    let format = match fs::read_to_string(&format_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(LoadError::Permission { what: "reading the tracepoint format" });
        }
        Err(_) => return Err(LoadError::MissingTracepoint { path: format_path }),
    };
    check_layout(&parse_format(&format)).map_err(LoadError::Layout)?;
    let program: &mut TracePoint = ebpf
        .program_mut(names::STATE_PROGRAM)
        .ok_or_else(|| LoadError::Layout("program missing from the eBPF object".into()))?
        .try_into()
        .map_err(|e| aya_error("finding the tracepoint program", e))?;
    program.load().map_err(|e| aya_error("loading the program into the kernel", e))?;
    program
        .attach("sock", "inet_sock_set_state")
        .map_err(|e| aya_error("attaching to sock:inet_sock_set_state", e))?;
    Ok(Hook::Tracepoint)
}

/// Loads and attaches `tp_btf/inet_sock_set_state`. It needs the kernel's BTF and every
/// socket field's offset; the verifier then checks each load against the BTF.
fn attach_btf_state_program(
    ebpf: &mut Ebpf,
    btf: Option<&Btf>,
    offsets: &KernelOffsets,
) -> Result<(), LoadError> {
    let btf = btf.ok_or_else(|| LoadError::NoBtf { path: VMLINUX_BTF.into() })?;
    if !offsets.socket_fields_known() {
        return Err(LoadError::Layout("a socket field's offset is unknown".into()));
    }
    let program: &mut BtfTracePoint = ebpf
        .program_mut(names::STATE_BTF_PROGRAM)
        .ok_or_else(|| LoadError::Layout("program missing from the eBPF object".into()))?
        .try_into()
        .map_err(|e| aya_error("finding the BTF tracepoint program", e))?;
    program
        .load("inet_sock_set_state", btf)
        .map_err(|e| aya_error("loading the BTF state program", e))?;
    program.attach().map_err(|e| aya_error("attaching to tp_btf/inet_sock_set_state", e))?;
    Ok(())
}

/// Which of the programs beside the state tracepoint are attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Enrichments {
    /// `tcp:tcp_retransmit_synack`: passive handshakes whose SYN-ACK was resent.
    pub synack: bool,
    /// `tcp:tcp_send_reset` and `tcp:tcp_receive_reset`: who reset a connection.
    pub resets: bool,
}

/// Loads and attaches the enrichment programs. Each is optional: without it the daemon still
/// runs and the numbers it would give are not reported (a warning says which).
fn attach_enrichments(ebpf: &mut Ebpf, btf: Option<&Btf>, offsets: &KernelOffsets) -> Enrichments {
    let synack = match attach_synack(ebpf, offsets) {
        Ok(attached) => attached,
        Err(why) => {
            warn!("{why}; SYN-ACK retransmissions are not seen");
            false
        }
    };
    let Some(btf) = btf else {
        warn!("no kernel BTF: reset direction is not reported");
        return Enrichments { synack, resets: false };
    };
    // Attached independently: either one alone still counts its direction.
    let sent = attach_program(ebpf, names::RESET_SENT_PROGRAM, |program: &mut BtfTracePoint| {
        program.load("tcp_send_reset", btf)?;
        program.attach().map(drop)
    });
    let received =
        attach_program(ebpf, names::RESET_RECEIVED_PROGRAM, |program: &mut BtfTracePoint| {
            program.load("tcp_receive_reset", btf)?;
            program.attach().map(drop)
        });
    let resets = sent && received;
    Enrichments { synack, resets }
}

/// Attaches `tcp:tcp_retransmit_synack` once its record layout checks out; `Ok(false)` when
/// the request socket's `snt_synack` offset is unknown (already warned about).
fn attach_synack(ebpf: &mut Ebpf, offsets: &KernelOffsets) -> Result<bool, String> {
    let tracefs = ensure_tracefs().map_err(|e| e.to_string())?;
    let format = Path::new(tracefs).join("events/tcp/tcp_retransmit_synack/format");
    let text = fs::read_to_string(&format).map_err(|e| format!("{}: {e}", format.display()))?;
    check_fields(&parse_format(&text), &synack_layout::FIELDS)
        .map_err(|e| format!("tcp:tcp_retransmit_synack has an unexpected layout ({e})"))?;
    if offsets.snt_synack == OFFSET_UNKNOWN {
        return Ok(false);
    }
    Ok(attach_program(ebpf, names::SYNACK_PROGRAM, |program: &mut TracePoint| {
        program.load()?;
        program.attach("tcp", "tcp_retransmit_synack").map(drop)
    }))
}

/// Loads and attaches one program with `attach`; logs and returns false on failure.
fn attach_program<P>(
    ebpf: &mut Ebpf,
    name: &str,
    attach: impl FnOnce(&mut P) -> Result<(), aya::programs::ProgramError>,
) -> bool
where
    for<'p> &'p mut P: TryFrom<&'p mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let result = match ebpf.program_mut(name) {
        Some(program) => <&mut P>::try_from(program).and_then(attach).map_err(|e| format!("{e:#}")),
        None => Err("missing from the eBPF object".to_owned()),
    };
    match result {
        Ok(()) => true,
        Err(e) => {
            warn!("program {name} not attached ({e}); the numbers it gives are not reported");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_program_was_built_from_this_monitor_common() {
        // Fails when build.rs did not rebuild the eBPF object after an edit of monitor-common.
        assert_eq!(check_object(EBPF_OBJECT).map_err(|e| e.to_string()), Ok(()));
        let err = check_object(b"not an object").unwrap_err().to_string();
        assert!(err.contains("not an ELF object") && err.contains("rebuild"), "{err}");
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
    fn each_ring_wakes_the_daemon_by_a_quarter_full() {
        // `--ring-bytes 8MiB` asks for 2 MiB; 16 rings of 512 KiB wake at 128 KiB each.
        assert_eq!(wakeup_threshold(2 << 20, 512 << 10), 128 << 10);
        assert_eq!(wakeup_threshold(2 << 20, 8 << 20), 2 << 20);
        assert_eq!(wakeup_threshold(0, 4 << 20), 0);
    }

    const FORMAT_6_18: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s\"";

    #[test]
    fn accepts_the_layout_of_the_kernels_we_run_on() {
        let fields = parse_format(FORMAT_6_18);
        assert_eq!(fields.len(), 13);
        assert_eq!(fields[2], FormatField { name: "skaddr".into(), offset: 8, size: 8 });
        assert_eq!(fields[11], FormatField { name: "saddr_v6".into(), offset: 40, size: 16 });
        assert_eq!(check_layout(&fields), Ok(()));
    }

    #[test]
    fn names_every_field_that_moved_or_vanished() {
        let moved = FORMAT_6_18
            .replace("sport;\toffset:24", "sport;\toffset:64")
            .replace("\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;\n", "");
        let err = check_layout(&parse_format(&moved)).unwrap_err();
        assert!(
            err.contains("field `sport` is at offset 64 size 2, expected offset 24 size 2"),
            "{err}"
        );
        assert!(err.contains("field `protocol` is missing"), "{err}");
        assert!(check_layout(&parse_format("garbage\n\nfield:;;;")).is_err());
    }

    #[test]
    fn recognises_a_tracefs_mount() {
        let debugfs_only = "sysfs /sys sysfs rw 0 0\ndebugfs /sys/kernel/debug debugfs rw 0 0\n";
        assert_eq!(tracefs_mount(debugfs_only), None);
        assert_eq!(
            tracefs_mount("tracefs /sys/kernel/tracing tracefs rw,nosuid 0 0\n"),
            Some(TRACEFS)
        );
        assert_eq!(
            tracefs_mount("tracefs /sys/kernel/debug/tracing tracefs rw 0 0\n"),
            Some(TRACEFS_DEBUGFS)
        );
        assert_eq!(tracefs_mount("tracefs /elsewhere tracefs rw 0 0\n"), None);
    }

    #[test]
    fn finds_every_field_in_the_running_kernels_btf() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("skipped: no {VMLINUX_BTF} on this machine");
            return;
        }
        let report = kernel_offsets(path).unwrap();
        assert!(report.missing.is_empty(), "{:?}", report.missing);
        let o = report.offsets;
        // struct sock is several hundred bytes; sk_err lives well inside it, skc_net in its
        // first cache line (struct sock_common).
        assert!((100..1024).contains(&o.sk_err), "sk_err {}", o.sk_err);
        assert!(o.skc_net < 64, "skc_net {}", o.skc_net);
        // tcp_sock embeds struct sock (and inet_connection_sock) first.
        for tcp in [o.bytes_acked, o.bytes_received, o.segs_in, o.segs_out, o.srtt_us] {
            assert!(tcp > o.sk_err, "tcp_sock field at {tcp}");
        }
        assert_eq!(o.bytes_acked % 8, 0);
        assert!(kernel_offsets(Path::new("/nonexistent")).is_err());
    }
}
