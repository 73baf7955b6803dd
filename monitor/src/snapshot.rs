//! The start-up snapshot: TCP sockets that already exist when the daemon starts, read with
//! netlink `sock_diag` (what `ss` uses) in every network namespace in use, with
//! their owning process from `/proc/PID/fd` and its cgroup from `/proc/PID/cgroup`. The tracker uses it so that
//! `tcpmon_connections{state}` is right from the first scrape, listeners older than the daemon
//! own their accepted connections, and sockets open before the start close cleanly later.
//!
//! `sock_diag` identifies sockets by a cookie, not by the kernel address the tracepoint
//! reports, so snapshot sockets are matched to later events by their 4-tuple.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};

use crate::decode::{Endpoints, TcpState};
use crate::tracker::{ExistingSocket, Owner};
use crate::workload;

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
pub fn take() -> Snapshot {
    let mut snapshot = Snapshot::default();
    let (owners, unreadable) = socket_owners();
    if unreadable > 0 {
        snapshot.problems.push(format!(
            "the sockets of {unreadable} processes could not be read (/proc/PID/fd needs \
             CAP_SYS_PTRACE for other users): their owners stay unknown"
        ));
    }
    let own = fs::metadata("/proc/self/ns/net").map(|m| m.ino() as u32).unwrap_or(0);
    for (netns, path) in namespaces(own) {
        let dumped = if netns == own {
            dump_all()
        } else {
            // setns() changes the calling thread's namespace: do it on a thread of its own.
            std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        let handle = File::open(&path)?;
                        nix::sched::setns(handle, nix::sched::CloneFlags::CLONE_NEWNET)
                            .map_err(io::Error::from)?;
                        dump_all()
                    })
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("the dump thread panicked")))
            })
        };
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

/// Network namespaces some process is in or `ip netns` named (a namespace can outlive its
/// processes, pinned by a mount in /run/netns and by its sockets), by inode, with a path to
/// open each; `own` first.
fn namespaces(own: u32) -> Vec<(u32, String)> {
    let mut found: HashMap<u32, String> = HashMap::new();
    found.insert(own, "/proc/self/ns/net".to_owned());
    let named = fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.path().to_str().map(str::to_owned));
    for path in pids().map(|pid| format!("/proc/{pid}/ns/net")).chain(named) {
        if let Ok(meta) = fs::metadata(&path) {
            found.entry(meta.ino() as u32).or_insert(path);
        }
    }
    let mut list: Vec<_> = found.into_iter().collect();
    list.sort_by_key(|(inode, _)| (*inode != own, *inode));
    list
}

fn pids() -> impl Iterator<Item = u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
}

/// Socket inode → the first process found holding it (`/proc/PID/fd/N` → `socket:[INODE]`)
/// and that process's cgroup id. Also returns how many processes' fd tables could not be
/// read.
fn socket_owners() -> (HashMap<u32, (Owner, u64)>, usize) {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let cgroup2 = workload::cgroup2_mount(&mountinfo);
    let mut owners = HashMap::new();
    let mut unreadable = 0;
    for pid in pids() {
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
                (Owner { pid: Some(pid), comm: task_name(pid) }, cgroup_id)
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

/// Both families of the current network namespace.
fn dump_all() -> io::Result<Vec<(TcpState, Endpoints, u32)>> {
    let mut sockets = dump(AF_INET)?;
    sockets.extend(dump(AF_INET6)?);
    Ok(sockets)
}

/// One `SOCK_DIAG_BY_FAMILY` dump of TCP sockets: `(state, endpoints, inode)`.
fn dump(family: u8) -> io::Result<Vec<(TcpState, Endpoints, u32)>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() };
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: wanted_states(),
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut buffer = vec![0; request.buffer_len()];
    request.serialize(&mut buffer);
    socket.send(&buffer, 0)?;

    let mut sockets = Vec::new();
    let mut receive = vec![0u8; 1 << 16];
    loop {
        let size = socket.recv(&mut &mut receive[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&receive[offset..size])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    let h = &response.header;
                    let Ok(state) = TcpState::try_from(i32::from(h.state)) else { continue };
                    // The SYN_RECV filter also dumps request sockets (no inode, no full
                    // socket, never a state event); their children are born later.
                    if state == TcpState::SynRecv && h.inode == 0 {
                        continue;
                    }
                    let id = &h.socket_id;
                    let local = SocketAddr::new(id.source_address, id.source_port);
                    let remote = SocketAddr::new(id.destination_address, id.destination_port);
                    if local.is_ipv4() == remote.is_ipv4() {
                        sockets.push((state, Endpoints::new(local, remote), h.inode));
                    }
                }
                NetlinkPayload::Done(_) => return Ok(sockets),
                NetlinkPayload::Error(e) => return Err(e.to_io()),
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
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
        let snapshot = take();
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
