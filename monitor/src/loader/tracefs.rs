//! tracefs: mounting it when nobody did, and checking a classic tracepoint's record layout
//! (its `format` file) against the offsets the programs read. Only the classic builds need
//! it; BTF tracepoints read the kernel's own arguments.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use log::info;
use monitor_common::{synack_layout, syscall_exit_layout, tracepoint_layout};

/// Where tracefs is mounted by default, and where we mount it when nobody did.
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// The older location under debugfs.
const TRACEFS_DEBUGFS: &str = "/sys/kernel/debug/tracing";

/// tracefs is not mounted and could not be mounted.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// Mounting was refused: no CAP_SYS_ADMIN, or a seccomp filter (the systemd unit's)
    /// that refuses mount().
    #[error(
        "tracefs is not mounted, and mounting it at {TRACEFS} was refused (it needs \
         CAP_SYS_ADMIN and a mount() no seccomp filter refuses; the systemd unit allows \
         neither, as systemd's sys-kernel-tracing.mount mounts it at boot): mount it with \
         `mount -t tracefs tracefs {TRACEFS}`"
    )]
    Permission,
    /// Not mounted, and the caller asked not to mount it (a check changes nothing).
    #[error("tracefs is not mounted (`mount -t tracefs tracefs {TRACEFS}`)")]
    NotMounted,
    /// The mount failed for another reason.
    #[error(
        "tracefs is not mounted and mounting it at {TRACEFS} failed ({0}); mount it with \
         `mount -t tracefs tracefs {TRACEFS}`"
    )]
    Failed(nix::Error),
}

/// Mounts tracefs at [`TRACEFS`] unless it is already mounted where aya looks for it (and
/// says so when it mounts it), or only finds it when `mount` is false. Returns where it is
/// mounted.
pub fn ensure_tracefs(mount: bool) -> Result<&'static str, MountError> {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if let Some(root) = tracefs_mount(&mounts) {
        return Ok(root);
    }
    if !mount {
        return Err(MountError::NotMounted);
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
        nix::Error::EPERM => MountError::Permission,
        source => MountError::Failed(source),
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

/// A classic tracepoint whose record a program reads, and the fields it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracepoint {
    /// Its category, e.g. `sock`.
    pub category: &'static str,
    /// Its name, e.g. `inet_sock_set_state`.
    pub name: &'static str,
    /// `(field name, offset, size)` for every field the program reads.
    pub fields: &'static [(&'static str, usize, usize)],
    /// The first Linux release that has it.
    pub since: &'static str,
}

/// `sock:inet_sock_set_state`, read by the classic build of the state program.
pub const STATE_TRACEPOINT: Tracepoint = Tracepoint {
    category: "sock",
    name: "inet_sock_set_state",
    fields: &tracepoint_layout::FIELDS,
    since: "4.16",
};

/// `tcp:tcp_retransmit_synack`: SYN-ACK retransmissions with the first SYN-ACK's time.
pub const SYNACK_TRACEPOINT: Tracepoint = Tracepoint {
    category: "tcp",
    name: "tcp_retransmit_synack",
    fields: &synack_layout::FIELDS,
    since: "4.15",
};

/// `syscalls:sys_exit_accept4`: accept4() returned, with the new descriptor.
pub const ACCEPT4_TRACEPOINT: Tracepoint = Tracepoint {
    category: "syscalls",
    name: "sys_exit_accept4",
    fields: &syscall_exit_layout::FIELDS,
    since: "2.6.33 with CONFIG_FTRACE_SYSCALLS",
};

/// `syscalls:sys_exit_accept`: accept() returned (architectures that have it, x86-64
/// among them; others route accept() through accept4()).
pub const ACCEPT_TRACEPOINT: Tracepoint = Tracepoint {
    category: "syscalls",
    name: "sys_exit_accept",
    fields: &syscall_exit_layout::FIELDS,
    since: "2.6.33 with CONFIG_FTRACE_SYSCALLS",
};

impl fmt::Display for Tracepoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.category, self.name)
    }
}

/// Why a tracepoint's layout could not be confirmed.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Its `format` file is not readable by us.
    #[error("cannot read {}: permission denied", path.display())]
    PermissionDenied {
        /// The `format` file.
        path: PathBuf,
    },
    /// The kernel does not have the tracepoint.
    #[error("the kernel has no {tracepoint} tracepoint ({}): Linux {} or newer is needed", path.display(), tracepoint.since)]
    Missing {
        /// Which.
        tracepoint: Tracepoint,
        /// The `format` file looked for.
        path: PathBuf,
    },
    /// Its record is not laid out as the program expects.
    #[error("{tracepoint} has an unexpected layout on this kernel: {mismatch}")]
    Layout {
        /// Which.
        tracepoint: Tracepoint,
        /// Every difference.
        mismatch: LayoutMismatch,
    },
}

impl Tracepoint {
    /// Reads the tracepoint's `format` file under the tracefs mounted at `root` and checks
    /// every field the program reads.
    pub fn check_format(&self, root: &Path) -> Result<(), FormatError> {
        let path = root.join("events").join(self.category).join(self.name).join("format");
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(FormatError::PermissionDenied { path })
            }
            Err(_) => return Err(FormatError::Missing { tracepoint: *self, path }),
        };
        check_fields(&parse_format(&text), self.fields)
            .map_err(|mismatch| FormatError::Layout { tracepoint: *self, mismatch })
    }
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
/// skipped; [`check_fields`] then reports the fields it needed and did not find.
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

/// A field the program reads that is not where it expects it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldProblem {
    /// The record has no such field.
    Missing(&'static str),
    /// The field is elsewhere, or of another size.
    Moved {
        /// The field.
        name: &'static str,
        /// `(offset, size)` in the record.
        found: (usize, usize),
        /// `(offset, size)` the program reads.
        expected: (usize, usize),
    },
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldProblem::Missing(name) => write!(f, "field `{name}` is missing"),
            FieldProblem::Moved { name, found: (offset, size), expected: (at, bytes) } => write!(
                f,
                "field `{name}` is at offset {offset} size {size}, expected offset {at} size {bytes}"
            ),
        }
    }
}

/// Every field that differs from what the program reads (never empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutMismatch(pub Vec<FieldProblem>);

impl fmt::Display for LayoutMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, problem) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// Checks `fields` (a parsed `format` file) against `expected` `(name, offset, size)`.
pub fn check_fields(
    fields: &[FormatField],
    expected: &[(&'static str, usize, usize)],
) -> Result<(), LayoutMismatch> {
    let problems: Vec<FieldProblem> = expected
        .iter()
        .filter_map(|&(name, offset, size)| match fields.iter().find(|f| f.name == name) {
            None => Some(FieldProblem::Missing(name)),
            Some(f) if (f.offset, f.size) != (offset, size) => Some(FieldProblem::Moved {
                name,
                found: (f.offset, f.size),
                expected: (offset, size),
            }),
            Some(_) => None,
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(LayoutMismatch(problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(check_fields(&fields, STATE_TRACEPOINT.fields), Ok(()));
    }

    #[test]
    fn names_every_field_that_moved_or_vanished() {
        let moved = FORMAT_6_18
            .replace("sport;\toffset:24", "sport;\toffset:64")
            .replace("\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;\n", "");
        let err = check_fields(&parse_format(&moved), STATE_TRACEPOINT.fields).unwrap_err();
        assert_eq!(
            err.to_string(),
            "field `sport` is at offset 64 size 2, expected offset 24 size 2; \
             field `protocol` is missing"
        );
        assert!(
            check_fields(&parse_format("garbage\n\nfield:;;;"), STATE_TRACEPOINT.fields).is_err()
        );
    }

    #[test]
    fn a_missing_or_changed_format_file_says_which_tracepoint() {
        let root = std::env::temp_dir().join(format!("tcpmon-tracefs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root); // left by an earlier failed run
        let err = STATE_TRACEPOINT.check_format(&root).unwrap_err().to_string();
        assert!(
            err.starts_with("the kernel has no sock:inet_sock_set_state tracepoint")
                && err.ends_with("Linux 4.16 or newer is needed"),
            "{err}"
        );
        let dir = root.join("events/sock/inet_sock_set_state");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("format"), FORMAT_6_18.replace("dport;\toffset:26", "dport;\toffset:2"))
            .unwrap();
        let err = STATE_TRACEPOINT.check_format(&root).unwrap_err().to_string();
        assert!(err.starts_with("sock:inet_sock_set_state has an unexpected layout"), "{err}");
        fs::write(dir.join("format"), FORMAT_6_18).unwrap();
        assert!(STATE_TRACEPOINT.check_format(&root).is_ok());
        fs::remove_dir_all(&root).unwrap();
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
}
