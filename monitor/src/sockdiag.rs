//! TCP sockets as `ss` reads them: netlink `sock_diag` dumps of the calling thread's network
//! namespace, and the namespaces in use on the host. Used by the start-up [`crate::snapshot`]
//! and by the scrape-time [`crate::netstate`].

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

/// One socket of a dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    /// Its state (request sockets show as `SynRecv`, as in `ss`).
    pub state: TcpState,
    /// Addresses and ports.
    pub endpoints: Endpoints,
    /// The socket's inode; 0 for request and TIME_WAIT sockets.
    pub inode: u32,
    /// `idiag_rqueue`: for a listener, the connections waiting in its accept queue (what
    /// `ss -lnt` shows as Recv-Q).
    pub recv_queue: u32,
    /// `idiag_wqueue`: for a listener, its accept queue's limit (the backlog, `ss -lnt`'s
    /// Send-Q).
    pub send_queue: u32,
}

/// The sockets of both families in `states`, in the calling thread's network namespace.
pub fn dump_both(states: StateFlags) -> io::Result<Vec<DiagSocket>> {
    dump_families(states, [true, true])
}

/// The sockets in `states` of the families `[IPv4, IPv6]` asks for: each dump walks the
/// hash tables whatever it finds, so a family known to have no socket is not dumped.
pub fn dump_families(states: StateFlags, families: [bool; 2]) -> io::Result<Vec<DiagSocket>> {
    let mut sockets = Vec::new();
    for (family, wanted) in [AF_INET, AF_INET6].into_iter().zip(families) {
        if wanted {
            sockets.extend(dump(family, states.clone())?);
        }
    }
    Ok(sockets)
}

/// One `SOCK_DIAG_BY_FAMILY` dump of TCP sockets of `family` in `states`.
fn dump(family: u8, states: StateFlags) -> io::Result<Vec<DiagSocket>> {
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
            states,
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
                    // Request sockets report TCP_NEW_SYN_RECV: `ss` shows them as SYN-RECV.
                    let state = match i32::from(h.state) {
                        12 => Ok(TcpState::SynRecv),
                        state => TcpState::try_from(state),
                    };
                    let id = &h.socket_id;
                    let local = SocketAddr::new(id.source_address, id.source_port);
                    let remote = SocketAddr::new(id.destination_address, id.destination_port);
                    if let (Ok(state), true) = (state, local.is_ipv4() == remote.is_ipv4()) {
                        sockets.push(DiagSocket {
                            state,
                            endpoints: Endpoints::new(local, remote),
                            inode: h.inode,
                            recv_queue: h.recv_queue,
                            send_queue: h.send_queue,
                        });
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

/// Network namespaces some process is in or `ip netns` named (a namespace can outlive its
/// processes, pinned by a mount in /run/netns and by its sockets), by inode, with a path to
/// open each; the daemon's own (`own`) first.
pub fn namespaces(own: u32) -> Vec<(u32, String)> {
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

/// The daemon's own network namespace inode (0 if unreadable).
pub fn own_namespace() -> u32 {
    namespace_of("/proc/self/ns/net")
}

/// Every process id in /proc.
pub fn pids() -> impl Iterator<Item = u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
}

/// Runs `read` (given the namespace's inode) in each of `namespaces` (from [`namespaces`]) on
/// the calling thread, entering
/// them one after the other, and returns the thread to the daemon's own namespace at the
/// end (`setns()` changes only the calling thread's namespace). The daemon calls it on its
/// [`crate::privilege::PrivilegedThread`], the one thread that keeps CAP_SYS_ADMIN for
/// `setns()`. The daemon's own namespace is read without `setns()`: a daemon with only
/// CAP_BPF and CAP_PERFMON (the DaemonSet's) still reads its own, the node's under
/// hostNetwork.
pub fn in_each<T>(
    namespaces: &[(u32, String)],
    read: impl Fn(u32) -> io::Result<T>,
) -> Vec<(u32, io::Result<T>)> {
    // /proc/self is the thread-group leader, which never leaves the daemon's namespace.
    let home = own_namespace();
    let mut current = namespace_of("/proc/thread-self/ns/net");
    let mut enter = |netns: u32, path: &str| -> io::Result<()> {
        if netns != current {
            let handle = File::open(path)?;
            nix::sched::setns(handle, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)?;
            current = netns;
        }
        Ok(())
    };
    let results = namespaces
        .iter()
        .map(|(netns, path)| (*netns, enter(*netns, path).and_then(|()| read(*netns))))
        .collect();
    if let Err(e) = enter(home, "/proc/self/ns/net") {
        log::warn!("returning to the daemon's network namespace after a read: {e}");
    }
    results
}

/// The inode of the network namespace at `path` (0 if unreadable).
fn namespace_of(path: &str) -> u32 {
    fs::metadata(path).map(|m| m.ino() as u32).unwrap_or(0)
}
