//! Why loading failed, told apart so that each has its exit code and a message that says
//! what to do; and the check that the embedded object matches this binary.

use monitor_common::names;

use super::btf::VMLINUX_BTF;
use super::host::{can_load, effective_capabilities, seccomp_filtered};
use super::tracefs::{FormatError, MountError};

/// The error for an EPERM while `what`: missing capabilities, or, when this process has
/// them, a seccomp filter (a container runtime's default profile allows `bpf()` only with
/// CAP_SYS_ADMIN).
pub(super) fn permission(what: impl Into<String>) -> LoadError {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let what = what.into();
    match effective_capabilities(&status) {
        Some(caps) if can_load(caps) && seccomp_filtered(&status) => LoadError::Seccomp { what },
        _ => LoadError::Permission { what },
    }
}

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
        what: String,
    },
    /// The capabilities are there, but a seccomp filter refuses the system call.
    #[error(
        "permission denied while {what}, although this process has CAP_BPF and CAP_PERFMON (or \
         CAP_SYS_ADMIN): a seccomp filter refuses bpf() or perf_event_open() (Seccomp: 2 in \
         /proc/self/status; container runtimes' default profiles allow bpf() only with \
         CAP_SYS_ADMIN): run with a seccomp profile that allows both"
    )]
    Seccomp {
        /// What was being done.
        what: String,
    },
    /// tracefs is not mounted and could not be mounted.
    #[error(transparent)]
    Tracefs(MountError),
    /// A classic tracepoint is missing or laid out differently.
    #[error(transparent)]
    Format(FormatError),
    /// BPF ring buffers need Linux 5.8.
    #[error("kernel {release} is too old: tcpmon needs BPF ring buffers, in Linux 5.8 and newer")]
    KernelTooOld {
        /// `uname -r`.
        release: String,
    },
    /// The kernel exposes no BTF, which the programs need to find struct fields.
    #[error(
        "the kernel has no BTF at {VMLINUX_BTF}: tcpmon needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (every major distribution's kernel since 2021)"
    )]
    NoBtf,
    /// The BTF build reads the socket's addresses and ports itself and needs all their
    /// offsets.
    #[error(
        "the BTF build needs the offsets of the socket's addresses and ports, and some are unknown"
    )]
    SocketFieldsUnknown,
    /// The kernel's BTF lacks a field on the way from a task to its accepted socket.
    #[error("the offsets of the fields from a task to its sockets (task_struct.files … socket.sk) are not all known")]
    AcceptFieldsUnknown,
    /// `inet_csk_accept()` is missing from the BTF, or takes neither 2 nor 4 arguments.
    #[error(
        "inet_csk_accept() in the kernel's BTF has an unknown argument list ({0:?} arguments)"
    )]
    AcceptSignature(Option<usize>),
    /// The embedded eBPF object lacks a program or map this binary expects.
    #[error("the embedded eBPF object has no {kind} {name}: rebuild tcpmon")]
    NotInObject {
        /// `program` or `map`.
        kind: &'static str,
        /// Its name.
        name: &'static str,
    },
    /// The embedded eBPF object was compiled from another `monitor-common` than this
    /// binary: its records would be misread.
    #[error(
        "the embedded eBPF program was built from another version of monitor-common than the \
         rest of tcpmon ({0}): rebuild tcpmon (`touch monitor-ebpf/src/main.rs && cargo build`)"
    )]
    StaleObject(FingerprintError),
    /// Loading or attaching failed for another reason.
    #[error("{what}: {source}")]
    Aya {
        /// What was being done.
        what: String,
        /// aya's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl From<MountError> for LoadError {
    fn from(error: MountError) -> Self {
        match error {
            MountError::Permission => permission("mounting tracefs"),
            other => LoadError::Tracefs(other),
        }
    }
}

impl From<FormatError> for LoadError {
    fn from(error: FormatError) -> Self {
        match error {
            FormatError::PermissionDenied { .. } => {
                LoadError::Permission { what: "reading a tracepoint's format".into() }
            }
            other => LoadError::Format(other),
        }
    }
}

pub(super) fn aya_error(
    what: impl Into<String>,
    source: impl std::error::Error + Send + Sync + 'static,
) -> LoadError {
    // EPERM anywhere in the chain means missing privilege (EACCES is the verifier's "no").
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&source);
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(libc::EPERM) {
                return permission(what);
            }
        }
        cause = error.source();
    }
    LoadError::Aya { what: what.into(), source: Box::new(source) }
}

/// Why an eBPF object's fingerprint does not match this binary's.
#[derive(Debug, thiserror::Error)]
pub enum FingerprintError {
    /// It is not an ELF object.
    #[error("not an ELF object: {0}")]
    NotElf(object::Error),
    /// It has no (readable) fingerprint symbol.
    #[error("no readable {} symbol", names::FINGERPRINT_SYMBOL)]
    NoSymbol,
    /// It was built from another `monitor-common`.
    #[error("fingerprint {found:#018x}, expected {expected:#018x}")]
    Differs {
        /// The object's.
        found: u64,
        /// This binary's [`monitor_common::SOURCE_FINGERPRINT`].
        expected: u64,
    },
}

/// The [`monitor_common::SOURCE_FINGERPRINT`] an eBPF object was compiled with: the `u64`
/// at its [`names::FINGERPRINT_SYMBOL`] symbol.
pub fn object_fingerprint(object: &[u8]) -> Result<u64, FingerprintError> {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
    let file = object::File::parse(object).map_err(FingerprintError::NotElf)?;
    let symbol =
        file.symbol_by_name(names::FINGERPRINT_SYMBOL).ok_or(FingerprintError::NoSymbol)?;
    let data = symbol
        .section_index()
        .and_then(|index| file.section_by_index(index).ok())
        .and_then(|section| section.data().ok())
        .ok_or(FingerprintError::NoSymbol)?;
    // In a relocatable object a symbol's address is its offset in its section.
    let bytes = usize::try_from(symbol.address())
        .ok()
        .and_then(|start| data.get(start..start.checked_add(8)?))
        .ok_or(FingerprintError::NoSymbol)?;
    Ok(u64::from_le_bytes(bytes.try_into().map_err(|_| FingerprintError::NoSymbol)?))
}

/// Refuses an object compiled from another `monitor-common` than this binary.
pub(super) fn check_object(object: &[u8]) -> Result<(), FingerprintError> {
    let expected = monitor_common::SOURCE_FINGERPRINT;
    match object_fingerprint(object)? {
        found if found == expected => Ok(()),
        found => Err(FingerprintError::Differs { found, expected }),
    }
}
