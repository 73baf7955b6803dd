//! Where the struct fields the programs read sit in the running kernel: looked up in its BTF
//! (`/sys/kernel/btf/vmlinux`), never compiled in, so one build runs on every kernel whose
//! structs have these members, wherever they moved.

use std::fmt;
use std::path::{Path, PathBuf};

use monitor_common::{KernelField, KernelOffsets, OFFSET_UNKNOWN};

/// Where the kernel exposes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The kernel's BTF could not be read at all.
#[derive(Debug, thiserror::Error)]
#[error("reading {}: {source}", path.display())]
pub struct BtfError {
    /// The file.
    pub path: PathBuf,
    /// btf-rs's error.
    pub source: btf_rs::Error,
}

/// Why one field could not be located.
#[derive(Debug, thiserror::Error)]
pub enum FieldError {
    /// The BTF has no struct of that name with members.
    #[error("no such struct")]
    NoStruct,
    /// A member on the path does not exist.
    #[error("no member {0}")]
    NoMember(&'static str),
    /// A member on the path is a bitfield (no byte offset to read at).
    #[error("{0} is a bitfield")]
    Bitfield(&'static str),
    /// A member the path goes through is not a struct or union.
    #[error("{0} is not a struct")]
    NotAStruct(&'static str),
    /// The BTF could not be searched.
    #[error("{0}")]
    Lookup(#[from] btf_rs::Error),
}

/// A field that could not be located: its reads are disabled.
#[derive(Debug)]
pub struct MissingField {
    /// The field.
    pub field: KernelField,
    /// Why.
    pub reason: FieldError,
}

impl fmt::Display for MissingField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let KernelField { structure, path, .. } = self.field;
        write!(f, "struct {structure}.{}: {}", path.join("."), self.reason)
    }
}

/// The offsets found in the kernel's BTF, and the fields that were not.
#[derive(Debug)]
pub struct OffsetReport {
    /// What the programs will read (unknown fields disabled).
    pub offsets: KernelOffsets,
    /// Every field that could not be located.
    pub missing: Vec<MissingField>,
    /// Bit offset of `struct inet_request_sock.acked` (a one-bit bitfield), or
    /// [`OFFSET_UNKNOWN`].
    pub req_acked_bit: u32,
    /// How many parameters `inet_csk_accept()` takes (4 before Linux 6.10, 2 since): where
    /// an fexit program finds its return value. `None` when the BTF has no such function.
    pub accept_parameters: Option<usize>,
}

impl OffsetReport {
    /// Close reasons come from `sk_err`.
    pub fn reads_sock_err(&self) -> bool {
        self.offsets.sk_err != OFFSET_UNKNOWN
    }
}

/// Reads the byte offset of every field the programs use ([`KernelOffsets::FIELDS`]) from
/// the kernel's BTF. Fails only when the BTF itself cannot be read.
pub fn kernel_offsets(btf_path: &Path) -> Result<OffsetReport, BtfError> {
    let btf = btf_rs::Btf::from_file(btf_path)
        .map_err(|source| BtfError { path: btf_path.to_owned(), source })?;
    let mut offsets = KernelOffsets::UNKNOWN;
    let mut missing = Vec::new();
    for (slot, field) in offsets.slots_mut().into_iter().zip(KernelOffsets::FIELDS) {
        match member_offset(&btf, field.structure, field.path) {
            Ok(offset) => *slot = offset,
            Err(reason) => missing.push(MissingField { field: *field, reason }),
        }
    }
    let req_acked_bit =
        bitfield_offset(&btf, "inet_request_sock", "acked").unwrap_or(OFFSET_UNKNOWN);
    let accept_parameters = parameter_count(&btf, "inet_csk_accept");
    Ok(OffsetReport { offsets, missing, req_acked_bit, accept_parameters })
}

/// How many parameters the kernel function `name` takes.
fn parameter_count(btf: &btf_rs::Btf, name: &str) -> Option<usize> {
    btf.resolve_types_by_name(name).ok()?.into_iter().find_map(|ty| match ty {
        btf_rs::Type::Func(func) => match btf.resolve_chained_type(&func).ok()? {
            btf_rs::Type::FuncProto(proto) => Some(proto.parameters.len()),
            _ => None,
        },
        _ => None,
    })
}

/// Bit offset of the one-bit bitfield `field` of `struct name`.
fn bitfield_offset(btf: &btf_rs::Btf, name: &str, field: &str) -> Option<u32> {
    let found = btf.resolve_types_by_name(name).ok()?.into_iter().find_map(|ty| match ty {
        btf_rs::Type::Struct(s) if !s.members.is_empty() => Some(s),
        _ => None,
    })?;
    let (bits, member) = find_member(btf, &found, field, 0)?;
    (member.bitfield_size() == Some(1)).then_some(bits)
}

/// Byte offset of `path` (a member, then members of that member) inside `struct name`.
/// Anonymous struct and union members are searched through, as C does.
fn member_offset(btf: &btf_rs::Btf, name: &str, path: &[&'static str]) -> Result<u32, FieldError> {
    let mut current = btf
        .resolve_types_by_name(name)?
        .into_iter()
        .find_map(|ty| match ty {
            btf_rs::Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
        .ok_or(FieldError::NoStruct)?;
    let mut offset_bits = 0;
    for (depth, &field) in path.iter().enumerate() {
        let (bits, member) =
            find_member(btf, &current, field, 0).ok_or(FieldError::NoMember(field))?;
        if member.bitfield_size().is_some_and(|size| size != 0) || bits % 8 != 0 {
            return Err(FieldError::Bitfield(field));
        }
        offset_bits += bits;
        if depth + 1 < path.len() {
            current = struct_of(btf, &member).ok_or(FieldError::NotAStruct(field))?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
        // inet_request_sock.acked: a one-bit field after struct request_sock (bpftool
        // shows bits_offset=1868 on 6.18).
        let acked = report.req_acked_bit;
        assert!(acked != OFFSET_UNKNOWN && acked > 8 * 200, "acked bit {acked}");
        // inet_csk_accept(sk, arg) since Linux 6.10.
        assert_eq!(report.accept_parameters, Some(2));
        assert!(o.fdt_fd != OFFSET_UNKNOWN && o.socket_sk != OFFSET_UNKNOWN);
        let err = kernel_offsets(Path::new("/nonexistent")).unwrap_err();
        assert!(err.to_string().starts_with("reading /nonexistent: "), "{err}");
    }

    #[test]
    fn missing_fields_say_which_member_and_why() {
        let missing = MissingField {
            field: KernelOffsets::FIELDS[1],
            reason: FieldError::NoMember("skc_net"),
        };
        assert_eq!(missing.to_string(), "struct sock.__sk_common.skc_net: no member skc_net");
    }
}
