//! The start-up snapshot: TCP sockets that already exist when the daemon starts, read with
//! netlink `sock_diag` (what `ss` uses) in every network namespace in use, with
//! their owning process from `/proc/PID/fd` and its cgroup from `/proc/PID/cgroup`. The tracker uses it so that
//! `tcpmon_connections{state}` is right from the first scrape, listeners older than the daemon
//! own their accepted connections, and sockets open before the start close cleanly later.
//!
//! `sock_diag` identifies sockets by a cookie, not by the kernel address the tracepoint
//! reports, so snapshot sockets are matched to later events by their 4-tuple.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::PathBuf;

use netlink_packet_sock_diag::inet::StateFlags;

use crate::decode::{Endpoints, TcpState};
use crate::naming::workload;
use crate::sockdiag;
use crate::tracker::{ExistingSocket, Owner};

/// The result of [`take`].
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Every full TCP socket found (not TIME_WAIT or request sockets, which the state
    /// tracepoint never reports either).
    pub sockets: Vec<ExistingSocket>,
    /// Network namespaces read.
    pub namespaces: usize,
    /// What could not be read, for the log.
    pub problems: Vec<String>,
}

/// States worth tracking: every full-socket state but TIME_WAIT.
fn wanted_states() -> StateFlags {
    StateFlags::all() - StateFlags::TIME_WAIT
}

/// Reads every TCP socket of every network namespace in use. Never fails as a whole: what
/// cannot be read is listed in [`Snapshot::problems`].
/// Owners' cgroups are found under `cgroup_root` (`--cgroup-root`), else under the cgroup2
/// mount of `/proc/self/mountinfo`.
pub fn take(cgroup_root: Option<PathBuf>) -> Snapshot {
    let mut snapshot = Snapshot::default();
    let (owners, unreadable) = socket_owners(cgroup_root);
    if unreadable > 0 {
        snapshot.problems.push(format!(
            "the sockets of {unreadable} processes could not be read (/proc/PID/fd needs \
             CAP_SYS_PTRACE for other users): their owners stay unknown"
        ));
    }
    let namespaces = sockdiag::namespaces(sockdiag::own_namespace());
    for (netns, dumped) in sockdiag::in_each(&namespaces, |_| dump_all()) {
        match dumped {
            Ok(found) => {
                snapshot.namespaces += 1;
                snapshot.sockets.extend(found.into_iter().map(|(state, endpoints, inode)| {
                    let (owner, cgroup_id) =
                        owners.get(&inode).copied().unwrap_or((Owner::UNKNOWN, 0));
                    ExistingSocket { state, endpoints, netns, owner, cgroup_id }
                }));
            }
            Err(e) => snapshot.problems.push(format!("network namespace {netns}: {e}")),
        }
    }
    snapshot
}

/// The inode of the initial PID namespace (`PROC_PID_INIT_INO`, include/linux/proc_ns.h).
const INITIAL_PID_NAMESPACE: u64 = 0xEFFF_FFFC;

/// Socket inode → the first process found holding it (`/proc/PID/fd/N` → `socket:[INODE]`)
/// and that process's cgroup id. Also returns how many processes' fd tables could not be
/// read.
fn socket_owners(cgroup_root: Option<PathBuf>) -> (HashMap<u32, (Owner, u64)>, usize) {
    let cgroup2 = cgroup_root.or_else(|| {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        workload::cgroup2_mount(&mountinfo)
    });
    let mut owners = HashMap::new();
    let in_host_pid_namespace = fs::metadata("/proc/self/ns/pid")
        .is_ok_and(|meta| std::os::unix::fs::MetadataExt::ino(&meta) == INITIAL_PID_NAMESPACE);
    let mut unreadable = 0;
    for pid in sockdiag::pids() {
        let fds = match fs::read_dir(format!("/proc/{pid}/fd")) {
            Ok(fds) => fds,
            // The process ended meanwhile: nothing to read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(_) => {
                unreadable += 1;
                continue;
            }
        };
        let mut owner = None;
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else { continue };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u32>().ok())
            else {
                continue;
            };
            let owner = *owner.get_or_insert_with(|| {
                let cgroup_id =
                    cgroup2.as_deref().map_or(0, |mount| workload::cgroup_id_of(mount, pid));
                // The kernel program reports pids as the initial PID namespace numbers them;
                // /proc here numbers them as ours does. In a PID namespace of our own (a
                // container) they differ, and the host's number cannot be read: say none.
                let host_pid = in_host_pid_namespace.then_some(pid);
                (Owner { pid: host_pid, comm: task_name(pid) }, cgroup_id)
            });
            owners.entry(inode).or_insert(owner);
        }
    }
    (owners, unreadable)
}

/// `/proc/PID/comm` as the kernel's NUL-padded 16-byte name.
fn task_name(pid: u32) -> [u8; 16] {
    let mut name = [0u8; 16];
    if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/comm")) {
        let text = text.trim_end_matches('\n').as_bytes();
        let len = text.len().min(15);
        name[..len].copy_from_slice(&text[..len]);
    }
    name
}

/// Both families of the current network namespace: `(state, endpoints, inode)`.
fn dump_all() -> io::Result<Vec<(TcpState, Endpoints, u32)>> {
    let sockets = sockdiag::dump_both(wanted_states())?;
    // The SYN_RECV filter also dumps request sockets (no inode, no full socket, never a
    // state event); their children are born later.
    Ok(sockets
        .into_iter()
        .filter(|s| !(s.state == TcpState::SynRecv && s.inode == 0))
        .map(|s| (s.state, s.endpoints, s.inode))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn finds_our_own_listener_with_its_owner() {
        // sock_diag and /proc/PID/fd work unprivileged for our own sockets.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let snapshot = take(None);
        let ours = snapshot
            .sockets
            .iter()
            .find(|s| s.state == TcpState::Listen && s.endpoints.sport == port)
            .unwrap_or_else(|| panic!("listener on {port} not in {:?}", snapshot.problems));
        assert_eq!(ours.endpoints.local(), listener.local_addr().unwrap());
        assert_eq!(ours.owner.pid, Some(std::process::id()));
        assert_ne!(ours.netns, 0);
        assert!(snapshot.namespaces >= 1);
    }
}
