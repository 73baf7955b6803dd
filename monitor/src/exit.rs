//! Exit codes: one per kind of problem, so supervisors and scripts can tell a missing
//! privilege from a port in use without parsing messages.
//!
//! | code | meaning |
//! |---:|---|
//! | 0 | stopped cleanly (SIGTERM, SIGINT) |
//! | 1 | any other failure |
//! | 2 | bad command line, config file or web config file |
//! | 3 | not enough privilege (root, or CAP_BPF + CAP_PERFMON) |
//! | 4 | the kernel cannot run tcpmon: too old for BPF ring buffers (< 5.8), no BTF, no or a changed tracepoint |
//! | 5 | tracefs is not mounted and cannot be mounted |
//! | 6 | the `--listen` address is in use or cannot be bound |
//! | 7 | the tail socket cannot be created at `--tail-socket` |
//! | 8 | another tcpmon daemon is already running |

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::loader::LoadError;

/// Any other failure.
pub const FAILURE: u8 = 1;
/// Bad command line or config file.
pub const USAGE: u8 = 2;
/// Not enough privilege.
pub const PERMISSION: u8 = 3;
/// The kernel lacks something tcpmon needs.
pub const KERNEL: u8 = 4;
/// tracefs missing and not mountable.
pub const TRACEFS: u8 = 5;
/// The metrics address cannot be bound.
pub const LISTEN: u8 = 6;
/// The tail socket cannot be created.
pub const SOCKET_PATH: u8 = 7;
/// Another daemon is running.
pub const ALREADY_RUNNING: u8 = 8;

/// Start-up failures outside the loader that have an exit code of their own.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The metrics address is taken.
    #[error(
        "cannot listen on {address}: the address is in use (is another tcpmon running? choose \
         another with --listen)"
    )]
    AddressInUse {
        /// The address.
        address: SocketAddr,
    },
    /// The metrics address cannot be bound for another reason.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A daemon answers on the tail socket.
    #[error(
        "another tcpmon daemon is already running (it serves tails on {}); stop it first, or \
         give this one another --tail-socket",
        path.display()
    )]
    AlreadyRunning {
        /// The socket.
        path: PathBuf,
    },
    /// The web configuration file cannot be used (the message names the file and key).
    #[error("{0}")]
    WebConfig(String),
    /// The tail socket cannot be created.
    #[error("cannot create the tail socket {}: {reason}", path.display())]
    SocketPath {
        /// The socket.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// The exit code for `error`: the first cause in its chain that has one of its own.
pub fn code(error: &anyhow::Error) -> u8 {
    for cause in error.chain() {
        if let Some(load) = cause.downcast_ref::<LoadError>() {
            return match load {
                LoadError::Permission { .. } | LoadError::Seccomp { .. } => PERMISSION,
                LoadError::Tracefs(_) => TRACEFS,
                LoadError::Format(_)
                | LoadError::KernelTooOld { .. }
                | LoadError::NoBtf
                | LoadError::SocketFieldsUnknown
                | LoadError::AcceptFieldsUnknown
                | LoadError::AcceptSignature(_) => KERNEL,
                LoadError::Aya { .. }
                | LoadError::NotInObject { .. }
                | LoadError::StaleObject(_) => FAILURE,
            };
        }
        if let Some(start) = cause.downcast_ref::<StartError>() {
            return match start {
                StartError::AddressInUse { .. } | StartError::Listen { .. } => LISTEN,
                StartError::AlreadyRunning { .. } => ALREADY_RUNNING,
                StartError::SocketPath { .. } => SOCKET_PATH,
                StartError::WebConfig(_) => USAGE,
            };
        }
    }
    FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::tracefs::MountError;
    use anyhow::Context as _;

    #[test]
    fn every_kind_of_failure_has_its_code_through_context() {
        let wrapped = |e: anyhow::Error| e.context("starting").context("tcpmon run");
        let cases: [(anyhow::Error, u8); 8] = [
            (LoadError::Permission { what: "loading".into() }.into(), PERMISSION),
            (LoadError::KernelTooOld { release: "5.4.0".into() }.into(), KERNEL),
            (LoadError::NoBtf.into(), KERNEL),
            (LoadError::Tracefs(MountError::Failed(nix::Error::ENODEV)).into(), TRACEFS),
            (StartError::AddressInUse { address: "127.0.0.1:1".parse().unwrap() }.into(), LISTEN),
            (StartError::AlreadyRunning { path: "/run/x".into() }.into(), ALREADY_RUNNING),
            (StartError::WebConfig("web config /x: `a`: b".into()).into(), USAGE),
            (
                StartError::SocketPath { path: "/proc/x".into(), reason: "EACCES".into() }.into(),
                SOCKET_PATH,
            ),
        ];
        for (error, expected) in cases {
            let error = wrapped(error);
            assert_eq!(code(&error), expected, "{error:#}");
        }
        let other: anyhow::Result<()> = Err(std::io::Error::other("disk")).context("recording");
        assert_eq!(code(&other.unwrap_err()), FAILURE);
    }
}
