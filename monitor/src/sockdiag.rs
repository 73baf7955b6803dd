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
    inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};

use crate::decode::{Endpoints, TcpState};
use monitor_common::tcp_state::{LISTEN, NEW_SYN_RECV, TIME_WAIT};

/// One socket of a dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    /// Its state (request sockets show as `SynRecv`, as in `ss`).
    pub state: TcpState,
    /// Addresses and ports.
    pub endpoints: Endpoints,
    /// The socket's inode; 0 for request and TIME_WAIT sockets, and for full sockets the
    /// application closed (orphans, e.g. in FIN_WAIT1 or LAST_ACK).
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

/// A `sock_diag` socket of the calling thread's network namespace.
fn diag_socket_open() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    Ok(socket)
}

/// Sends one `SOCK_DIAG_BY_FAMILY` request for TCP sockets of `family`.
fn send_request(
    socket: &Socket,
    flags: u16,
    family: u8,
    states: StateFlags,
    socket_id: SocketId,
) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
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
    Ok(())
}

/// A socket as a response describes it; `None` for a state or address mix we do not know.
fn diag_socket(h: &InetResponseHeader) -> Option<DiagSocket> {
    // Request sockets report TCP_NEW_SYN_RECV: `ss` shows them as SYN-RECV.
    let state = match i32::from(h.state) {
        NEW_SYN_RECV => TcpState::SynRecv,
        state => TcpState::try_from(state).ok()?,
    };
    let id = &h.socket_id;
    let local = SocketAddr::new(id.source_address, id.source_port);
    let remote = SocketAddr::new(id.destination_address, id.destination_port);
    (local.is_ipv4() == remote.is_ipv4()).then(|| DiagSocket {
        state,
        endpoints: Endpoints::new(local, remote),
        inode: h.inode,
        recv_queue: h.recv_queue,
        send_queue: h.send_queue,
    })
}

/// One `SOCK_DIAG_BY_FAMILY` dump of TCP sockets of `family` in `states`.
fn dump(family: u8, states: StateFlags) -> io::Result<Vec<DiagSocket>> {
    let socket = diag_socket_open()?;
    let socket_id = if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() };
    send_request(&socket, NLM_F_REQUEST | NLM_F_DUMP, family, states, socket_id)?;

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
                    sockets.extend(diag_socket(&response.header));
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

/// Exact lookups of single TCP sockets in the calling thread's network namespace, one
/// request each (`inet_diag_find_one_icsk()`: a hash lookup, not a walk of the table).
pub struct Lookup {
    socket: Socket,
    receive: Vec<u8>,
}

impl Lookup {
    /// Opens a `sock_diag` socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Lookup> {
        Ok(Lookup { socket: diag_socket_open()?, receive: vec![0; 1 << 13] })
    }

    /// The state of the full socket at exactly `endpoints`, or `None` when there is none: no
    /// socket at all, or only a TIME_WAIT or request socket there. The kernel looks the
    /// 4-tuple up as an incoming segment would (`inet_lookup()`), so with no connection it
    /// may answer with a listener on the local port: that is not the socket either.
    pub fn state_of(&mut self, endpoints: &Endpoints) -> io::Result<Option<TcpState>> {
        let (local, remote) = (endpoints.local(), endpoints.remote());
        let family = if local.is_ipv4() { AF_INET } else { AF_INET6 };
        let socket_id = SocketId {
            source_port: local.port(),
            destination_port: remote.port(),
            source_address: local.ip(),
            destination_address: remote.ip(),
            interface_id: 0,
            // All ones: no cookie to check (INET_DIAG_NOCOOKIE).
            cookie: [0xff; 8],
        };
        send_request(&self.socket, NLM_F_REQUEST, family, StateFlags::all(), socket_id)?;
        let size = self.socket.recv(&mut &mut self.receive[..], 0)?;
        let message = NetlinkMessage::<SockDiagMessage>::deserialize(&self.receive[..size])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        match message.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                // Not a connection's full socket: a listener, a timewait or a request socket
                // (an orphaned full socket has no inode, so the inode cannot tell).
                let full =
                    !matches!(i32::from(response.header.state), LISTEN | TIME_WAIT | NEW_SYN_RECV);
                let found = diag_socket(&response.header)
                    .filter(|found| full && found.endpoints == *endpoints);
                Ok(found.map(|found| found.state))
            }
            NetlinkPayload::Error(e) => match e.to_io() {
                e if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
                e => Err(e),
            },
            _ => Err(io::Error::new(io::ErrorKind::InvalidData, "an unexpected sock_diag answer")),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    /// Asks until `wanted` comes (a peer's segments take a moment), for at most 5 s.
    fn state_becomes(endpoints: &Endpoints, wanted: Option<TcpState>) -> Option<TcpState> {
        let mut lookup = Lookup::open().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let state = lookup.state_of(endpoints).unwrap();
            if state == wanted || Instant::now() > deadline {
                return state;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn an_exact_lookup_finds_a_connection_and_nothing_else_at_its_4_tuple() {
        // sock_diag answers unprivileged callers about the sockets of their namespace.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let ours = Endpoints::new(client.local_addr().unwrap(), client.peer_addr().unwrap());
        let theirs = Endpoints::new(server.local_addr().unwrap(), server.peer_addr().unwrap());
        let mut lookup = Lookup::open().unwrap();
        assert_eq!(lookup.state_of(&ours).unwrap(), Some(TcpState::Established));
        assert_eq!(lookup.state_of(&theirs).unwrap(), Some(TcpState::Established));
        // No connection from that remote port: the kernel answers with the listener on the
        // local port, which is not the socket asked for.
        let mut stranger = theirs;
        stranger.dport = stranger.dport.wrapping_add(1).max(1);
        assert_eq!(lookup.state_of(&stranger).unwrap(), None);
        let mut nowhere = ours;
        nowhere.sport = 1;
        assert_eq!(lookup.state_of(&nowhere).unwrap(), None);

        // Our FIN acknowledged: FIN_WAIT2; the peer's FIN too: only a timewait socket is left.
        client.shutdown(Shutdown::Write).unwrap();
        assert_eq!(state_becomes(&ours, Some(TcpState::FinWait2)), Some(TcpState::FinWait2));
        assert_eq!(state_becomes(&theirs, Some(TcpState::CloseWait)), Some(TcpState::CloseWait));
        drop(server);
        assert_eq!(state_becomes(&theirs, None), None);
        drop(client);
        assert_eq!(state_becomes(&ours, None), None, "a TIME_WAIT socket is no connection");
    }
}
