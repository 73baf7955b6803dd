//! Ring-buffer bytes → typed [`Record`]s.
//!
//! The kernel side writes four record types, told apart by their length:
//! [`monitor_common::StateEvent`], [`monitor_common::StateEventWithStats`],
//! [`monitor_common::SocketNote`] and [`monitor_common::SynAckRetransmit`]. Nothing here
//! trusts them.
//! Every malformed record becomes a [`DecodeError`] value (the daemon counts them), never a
//! panic. Decoding allocates nothing: an [`Event`] is `Copy` and keeps addresses and the
//! task name as raw bytes until something wants to print them.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use monitor_common::{
    note, SocketNote, StateEvent, StateEventWithStats, SynAckRetransmit, NOTE_SIZE,
    SOCK_ERR_UNKNOWN, STATE_EVENT_SIZE, STATE_EVENT_WITH_STATS_SIZE, SYNACK_RETRANSMIT_SIZE,
};

pub use monitor_common::TcpStats;

use monitor_common::tcp_state;
pub use monitor_common::{AF_INET, AF_INET6};

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`; the numbers live in
/// [`monitor_common::tcp_state`], which the eBPF program uses too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum TcpState {
    /// `TCP_ESTABLISHED`
    Established = tcp_state::ESTABLISHED as u8,
    /// `TCP_SYN_SENT`
    SynSent = tcp_state::SYN_SENT as u8,
    /// `TCP_SYN_RECV`
    SynRecv = tcp_state::SYN_RECV as u8,
    /// `TCP_FIN_WAIT1`
    FinWait1 = tcp_state::FIN_WAIT1 as u8,
    /// `TCP_FIN_WAIT2`
    FinWait2 = tcp_state::FIN_WAIT2 as u8,
    /// `TCP_TIME_WAIT` (never the new state of a full socket: docs/ARCHITECTURE.md, "TIME_WAIT
    /// is not a state of the full socket")
    TimeWait = tcp_state::TIME_WAIT as u8,
    /// `TCP_CLOSE`
    Close = tcp_state::CLOSE as u8,
    /// `TCP_CLOSE_WAIT`
    CloseWait = tcp_state::CLOSE_WAIT as u8,
    /// `TCP_LAST_ACK`
    LastAck = tcp_state::LAST_ACK as u8,
    /// `TCP_LISTEN`
    Listen = tcp_state::LISTEN as u8,
    /// `TCP_CLOSING`
    Closing = tcp_state::CLOSING as u8,
    /// `TCP_NEW_SYN_RECV` (request sockets; not reported by the tracepoint in practice)
    NewSynRecv = tcp_state::NEW_SYN_RECV as u8,
}

impl TcpState {
    /// Every state, in kernel order.
    pub const ALL: [TcpState; 12] = [
        TcpState::Established,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Listen,
        TcpState::Closing,
        TcpState::NewSynRecv,
    ];

    /// The name `ss` and the kernel's tracepoint use, e.g. `"ESTABLISHED"`, `"SYN_SENT"`.
    pub const fn name(self) -> &'static str {
        match self {
            TcpState::Established => "ESTABLISHED",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::FinWait1 => "FIN_WAIT1",
            TcpState::FinWait2 => "FIN_WAIT2",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::Listen => "LISTEN",
            TcpState::Closing => "CLOSING",
            TcpState::NewSynRecv => "NEW_SYN_RECV",
        }
    }

    /// Index into per-state arrays (`0..12`).
    pub const fn index(self) -> usize {
        self as usize - 1
    }
}

impl TryFrom<i32> for TcpState {
    type Error = DecodeError;

    fn try_from(value: i32) -> Result<Self, Self::Error> {
        match value {
            1..=12 => Ok(TcpState::ALL[value as usize - 1]),
            _ => Err(DecodeError::UnknownState(value)),
        }
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a ring-buffer record could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The record's size is none of the record types' (truncated or from another program).
    #[error(
        "record is {0} bytes, expected {STATE_EVENT_SIZE}, {STATE_EVENT_WITH_STATS_SIZE}, {NOTE_SIZE} or {SYNACK_RETRANSMIT_SIZE}"
    )]
    WrongSize(usize),
    /// A socket note of a kind this version does not know.
    #[error("unknown socket note kind {0}")]
    UnknownNote(u32),
    /// A state number outside the kernel's `TCP_*` range.
    #[error("unknown TCP state number {0}")]
    UnknownState(i32),
    /// An address family other than `AF_INET`/`AF_INET6`.
    #[error("unknown address family {0}")]
    UnknownFamily(u16),
}

/// The value of `sk->sk_err` the kernel had set when a socket reached `TCP_CLOSE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockErr {
    /// No error recorded (0): the socket was closed without an error (FIN or local abort).
    None,
    /// An errno value such as `ECONNREFUSED`.
    Errno(i32),
    /// The eBPF program could not read it (no BTF, or the read failed).
    Unknown,
}

/// One decoded TCP state transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_MONOTONIC nanoseconds at the transition.
    pub timestamp_ns: u64,
    /// Kernel address of the socket: its identity for its whole life.
    pub skaddr: u64,
    /// Process id (tgid) of the task that was current; meaningless in softirq context.
    pub pid: u32,
    /// Thread id of the task that was current.
    pub tid: u32,
    /// State before.
    pub old: TcpState,
    /// State after.
    pub new: TcpState,
    /// `sk_err` when `new` is `Close`, otherwise [`SockErr::None`].
    pub sock_err: SockErr,
    /// Addresses and ports.
    pub endpoints: Endpoints,
    /// NUL-padded task name.
    pub comm: [u8; 16],
    /// Inode of the socket's network namespace; 0 when the record did not carry it.
    pub netns: u32,
    /// The socket's cgroup v2 id; 0 when the record did not carry it.
    pub cgroup_id: u64,
    /// The socket's counters, on handshake completion and CLOSE records.
    pub stats: Option<TcpStats>,
}

/// A fact about a socket that is not a state change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Note {
    /// CLOCK_MONOTONIC nanoseconds.
    pub timestamp_ns: u64,
    /// The socket it is about (0: none).
    pub skaddr: u64,
    /// What happened.
    pub kind: NoteKind,
}

/// What a [`Note`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoteKind {
    /// The kernel sent a RST for the socket.
    ResetSent,
    /// The socket processed a RST from its peer.
    ResetReceived,
    /// The application's accept() returned the socket: it left its listener's queue.
    Accepted,
}

/// A request socket retransmitted its SYN-ACK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynAckRetransmitted {
    /// CLOCK_MONOTONIC ns of the retransmission.
    pub timestamp_ns: u64,
    /// CLOCK_MONOTONIC ns of the request's first SYN-ACK (µs precision); `None` if unread.
    pub first_synack_ns: Option<u64>,
    /// The client had acknowledged the SYN-ACK, but the accept queue was full
    /// ([`monitor_common::SYNACK_CLIENT_ACKED`]).
    pub client_acked: bool,
    /// The 4-tuple the accepted child socket will have.
    pub endpoints: Endpoints,
}

/// One decoded ring-buffer record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// A TCP state transition.
    State(Event),
    /// A reset note.
    Note(Note),
    /// A SYN-ACK retransmission.
    SynAckRetransmit(SynAckRetransmitted),
}

/// A socket's addresses as the latest transition reported them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoints {
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Local port (0 before the kernel picked one).
    pub sport: u16,
    /// Remote port.
    pub dport: u16,
    /// Local address as the tracepoint stores it (IPv4-mapped for `AF_INET`).
    pub saddr: [u8; 16],
    /// Remote address, same encoding.
    pub daddr: [u8; 16],
}

impl Endpoints {
    /// Endpoints of a connection between `local` and `remote` (both of one family).
    pub fn new(local: SocketAddr, remote: SocketAddr) -> Self {
        let raw = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        Endpoints {
            family: if local.is_ipv4() { AF_INET } else { AF_INET6 },
            sport: local.port(),
            dport: remote.port(),
            saddr: raw(local.ip()),
            daddr: raw(remote.ip()),
        }
    }

    fn ip(&self, raw: [u8; 16]) -> IpAddr {
        let v6 = Ipv6Addr::from(raw);
        match (self.family, v6.to_ipv4_mapped()) {
            (AF_INET, Some(v4)) => IpAddr::V4(v4),
            (AF_INET, None) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            _ => IpAddr::V6(v6),
        }
    }

    /// Local address and port.
    pub fn local(&self) -> SocketAddr {
        SocketAddr::new(self.ip(self.saddr), self.sport)
    }

    /// Remote address and port.
    pub fn remote(&self) -> SocketAddr {
        SocketAddr::new(self.ip(self.daddr), self.dport)
    }
}

/// A NUL-padded kernel task name as text (lossy), without the padding: borrowed from
/// `comm` unless it is not valid UTF-8, so matching and writing a name allocate nothing.
pub fn comm_text(comm: &[u8; 16]) -> Cow<'_, str> {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end])
}

impl Event {
    /// Local address and port.
    pub fn local(&self) -> SocketAddr {
        self.endpoints.local()
    }

    /// Remote address and port.
    pub fn remote(&self) -> SocketAddr {
        self.endpoints.remote()
    }

    /// The task name, lossily decoded, without the NUL padding.
    pub fn comm(&self) -> Cow<'_, str> {
        comm_text(&self.comm)
    }
}

/// Whether a ring record of this length is a state transition (the records the kernel also
/// counts); notes and malformed records are not.
pub fn is_transition(record: &[u8]) -> bool {
    matches!(record.len(), STATE_EVENT_SIZE | STATE_EVENT_WITH_STATS_SIZE)
}

/// What a record that did not decode was about, for the log: its socket and transition when
/// it is a transition's, else its length (nothing in it is trusted beyond that).
pub fn describe(bytes: &[u8]) -> String {
    if bytes.len() == STATE_EVENT_SIZE || bytes.len() == STATE_EVENT_WITH_STATS_SIZE {
        // SAFETY: at least a StateEvent's bytes; plain integers, read unaligned.
        let raw: StateEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        format!(
            "socket {:#x}, transition {} -> {}, family {}",
            raw.skaddr, raw.oldstate, raw.newstate, raw.family
        )
    } else {
        format!("a record of {} bytes", bytes.len())
    }
}

/// Decodes one ring-buffer record; its length tells its type.
#[inline]
pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
    match bytes.len() {
        STATE_EVENT_SIZE => {
            // SAFETY: the length was checked; the record types are plain integers (any bit
            // pattern is valid) and read_unaligned makes no assumption about the ring's
            // alignment.
            let raw: StateEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            decode_record(&raw).map(Record::State)
        }
        STATE_EVENT_WITH_STATS_SIZE => {
            // SAFETY: as above.
            let raw: StateEventWithStats =
                unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            let mut event = decode_record(&raw.event)?;
            event.stats = (raw.stats.complete != 0).then_some(raw.stats);
            Ok(Record::State(event))
        }
        NOTE_SIZE => {
            // SAFETY: as above.
            let raw: SocketNote = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            decode_note(&raw).map(Record::Note)
        }
        SYNACK_RETRANSMIT_SIZE => {
            // SAFETY: as above.
            let raw: SynAckRetransmit = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            Ok(Record::SynAckRetransmit(SynAckRetransmitted {
                timestamp_ns: raw.timestamp_ns,
                first_synack_ns: (raw.first_synack_us != 0)
                    .then(|| raw.first_synack_us.saturating_mul(1000)),
                client_acked: raw.flags & monitor_common::SYNACK_CLIENT_ACKED != 0,
                endpoints: endpoints(raw.family, raw.sport, raw.dport, raw.saddr, raw.daddr)?,
            }))
        }
        other => Err(DecodeError::WrongSize(other)),
    }
}

/// Refuses a family we do not know.
#[inline]
fn known_family(family: u16) -> Result<(), DecodeError> {
    match family {
        AF_INET | AF_INET6 => Ok(()),
        _ => Err(DecodeError::UnknownFamily(family)),
    }
}

/// Addresses and ports as the kernel records them, for a family we know.
#[inline]
fn endpoints(
    family: u16,
    sport: u16,
    dport: u16,
    saddr: [u8; 16],
    daddr: [u8; 16],
) -> Result<Endpoints, DecodeError> {
    known_family(family)?;
    Ok(Endpoints { family, sport, dport, saddr, daddr })
}

/// Validates and converts a raw socket note.
pub fn decode_note(raw: &SocketNote) -> Result<Note, DecodeError> {
    let kind = match raw.kind {
        note::RESET_SENT => NoteKind::ResetSent,
        note::RESET_RECEIVED => NoteKind::ResetReceived,
        note::ACCEPTED => NoteKind::Accepted,
        other => return Err(DecodeError::UnknownNote(other)),
    };
    Ok(Note { timestamp_ns: raw.timestamp_ns, skaddr: raw.skaddr, kind })
}

/// Validates and converts a raw record.
#[inline]
pub fn decode_record(raw: &StateEvent) -> Result<Event, DecodeError> {
    let old = TcpState::try_from(raw.oldstate)?;
    let new = TcpState::try_from(raw.newstate)?;
    known_family(raw.family)?;
    // Built in place (not through `endpoints()` and its `Result`): the 38-byte temporary was
    // copied on in other pieces than it was written in, which the CPU cannot forward from
    // its store buffer: a stall on every record (a fifth of the decode-and-track time).
    let endpoints = Endpoints {
        family: raw.family,
        sport: raw.sport,
        dport: raw.dport,
        saddr: raw.saddr,
        daddr: raw.daddr,
    };
    let sock_err = match raw.sock_err {
        0 => SockErr::None,
        SOCK_ERR_UNKNOWN => SockErr::Unknown,
        errno => SockErr::Errno(errno),
    };
    Ok(Event {
        timestamp_ns: raw.timestamp_ns,
        skaddr: raw.skaddr,
        pid: (raw.pid_tgid >> 32) as u32,
        tid: raw.pid_tgid as u32,
        old,
        new,
        sock_err,
        endpoints,
        comm: raw.comm,
        netns: raw.netns,
        cgroup_id: raw.cgroup_id,
        stats: None,
    })
}

/// Builds raw records, for tests, fixtures and benchmarks.
pub mod fixture {
    use super::*;

    /// An IPv4 record `old -> new` for socket `skaddr` at `timestamp_ns`, between
    /// 127.0.0.1:`sport` and 127.0.0.1:`dport`, with the given `sk_err`.
    pub fn v4(
        timestamp_ns: u64,
        skaddr: u64,
        old: TcpState,
        new: TcpState,
        sport: u16,
        dport: u16,
        sock_err: i32,
    ) -> StateEvent {
        let mapped = |ip: Ipv4Addr| ip.to_ipv6_mapped().octets();
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"test");
        StateEvent {
            timestamp_ns,
            skaddr,
            pid_tgid: (4242u64 << 32) | 4243,
            oldstate: old as i32,
            newstate: new as i32,
            sock_err,
            sport,
            dport,
            family: AF_INET,
            _pad0: 0,
            netns: 0,
            saddr: mapped(Ipv4Addr::LOCALHOST),
            daddr: mapped(Ipv4Addr::LOCALHOST),
            comm,
            cgroup_id: 0,
        }
    }

    /// `event` with the socket counters the kernel adds on handshake and CLOSE records, all
    /// read (`complete`).
    pub fn with_stats(event: StateEvent, stats: TcpStats) -> StateEventWithStats {
        StateEventWithStats { event, stats: TcpStats { complete: 1, ..stats } }
    }

    /// The counters of a closed connection that sent 1,000,000 payload bytes (1,000 of them
    /// twice: one retransmission) and received 12 and the peer's FIN (`SOCK_DONE`), with a
    /// 250 µs smoothed RTT.
    pub fn closed_stats() -> TcpStats {
        TcpStats {
            bytes_acked: 1_000_001,
            bytes_received: 13,
            bytes_sent: 1_001_000,
            bytes_retrans: 1_000,
            segs_out: 9,
            segs_in: 8,
            total_retrans: 1,
            srtt_us_x8: 8 * 250,
            sk_flags: 1 << monitor_common::SOCK_DONE,
            complete: 1,
        }
    }

    /// A reset note.
    pub fn note(timestamp_ns: u64, skaddr: u64, kind: u32, value: u32) -> SocketNote {
        SocketNote { timestamp_ns, skaddr, kind, value, _reserved: 0 }
    }

    /// A SYN-ACK retransmission of a request between 127.0.0.1:`sport` (listener) and
    /// 127.0.0.1:`dport`, whose first SYN-ACK left at `first_synack_us`.
    pub fn synack_retransmit(
        timestamp_ns: u64,
        first_synack_us: u64,
        sport: u16,
        dport: u16,
    ) -> SynAckRetransmit {
        let loopback = Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets();
        SynAckRetransmit {
            timestamp_ns,
            first_synack_us,
            sport,
            dport,
            family: AF_INET,
            flags: 0,
            saddr: loopback,
            daddr: loopback,
        }
    }

    /// The ring-buffer record types (plain integers, no implicit padding).
    pub trait RawRecord: Copy {}
    impl RawRecord for StateEvent {}
    impl RawRecord for StateEventWithStats {}
    impl RawRecord for SocketNote {}
    impl RawRecord for SynAckRetransmit {}

    /// The record's bytes, as the ring buffer delivers them.
    pub fn bytes<T: RawRecord>(raw: &T) -> Vec<u8> {
        // SAFETY: the record types are repr(C) plain data with explicit padding.
        unsafe { std::slice::from_raw_parts((raw as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::{bytes, v4};
    use super::*;

    #[test]
    fn decodes_an_ipv4_record() {
        let raw =
            v4(10, 0xffff_8880_1234_5600, TcpState::SynSent, TcpState::Established, 40000, 80, 0);
        let event = state(&bytes(&raw));
        assert_eq!(event.old, TcpState::SynSent);
        assert_eq!(event.new, TcpState::Established);
        assert_eq!(event.local(), "127.0.0.1:40000".parse().unwrap());
        assert_eq!(event.remote(), "127.0.0.1:80".parse().unwrap());
        assert_eq!((event.pid, event.tid), (4242, 4243));
        assert_eq!(event.comm(), "test");
        assert_eq!(event.sock_err, SockErr::None);
    }

    #[test]
    fn decodes_an_ipv6_record_and_sock_errors() {
        let mut raw = v4(10, 1, TcpState::SynSent, TcpState::Close, 1, 2, 111);
        raw.family = AF_INET6;
        raw.daddr = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        let event = state(&bytes(&raw));
        assert_eq!(event.remote(), "[2001:db8::1]:2".parse().unwrap());
        assert_eq!(event.sock_err, SockErr::Errno(111));
        raw.sock_err = SOCK_ERR_UNKNOWN;
        assert_eq!(state(&bytes(&raw)).sock_err, SockErr::Unknown);
    }

    #[test]
    fn rejects_malformed_records() {
        let raw = v4(10, 1, TcpState::Close, TcpState::SynSent, 1, 2, 0);
        let good = bytes(&raw);
        assert_eq!(decode(&good[..50]), Err(DecodeError::WrongSize(50)));
        assert_eq!(decode(&[]), Err(DecodeError::WrongSize(0)));
        let mut long = good.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(DecodeError::WrongSize(105)));
        assert_eq!(decode(&bytes(&fixture::note(1, 2, 99, 0))), Err(DecodeError::UnknownNote(99)));
        let mut synack = fixture::synack_retransmit(1, 2, 3, 4);
        synack.family = 3;
        assert_eq!(decode(&bytes(&synack)), Err(DecodeError::UnknownFamily(3)));

        for bad_state in [0, 13, -5, i32::MAX] {
            let mut r = raw;
            r.newstate = bad_state;
            assert_eq!(decode(&bytes(&r)), Err(DecodeError::UnknownState(bad_state)));
        }
        let mut r = raw;
        r.family = 1;
        assert_eq!(decode(&bytes(&r)), Err(DecodeError::UnknownFamily(1)));
    }

    fn state(bytes: &[u8]) -> Event {
        match decode(bytes).unwrap() {
            Record::State(event) => event,
            other => panic!("not a state record: {other:?}"),
        }
    }

    #[test]
    fn decodes_stats_netns_and_notes() {
        let mut raw = v4(10, 7, TcpState::FinWait2, TcpState::Close, 1, 2, 0);
        raw.netns = 4026531840;
        raw.cgroup_id = 0x1_0000_0042;
        let stats = TcpStats {
            bytes_acked: 1 << 33,
            bytes_received: 5,
            segs_out: 3,
            segs_in: 4,
            total_retrans: 1,
            srtt_us_x8: 800,
            ..TcpStats::default()
        };
        let event = state(&bytes(&fixture::with_stats(raw, stats)));
        assert_eq!(
            (event.netns, event.cgroup_id, event.stats),
            (4026531840, 0x1_0000_0042, Some(TcpStats { complete: 1, ..stats }))
        );
        // A counter the program could not read: none are reported, rather than zeros.
        let partial = StateEventWithStats { event: raw, stats: TcpStats { complete: 0, ..stats } };
        assert_eq!(state(&bytes(&partial)).stats, None);
        assert_eq!(state(&bytes(&raw)).stats, None);

        let synack = decode(&bytes(&fixture::synack_retransmit(9, 1_500, 80, 40000))).unwrap();
        let Record::SynAckRetransmit(synack) = synack else { panic!("{synack:?}") };
        assert_eq!(synack.first_synack_ns, Some(1_500_000));
        assert_eq!(synack.endpoints.local(), "127.0.0.1:80".parse().unwrap());
        assert_eq!(synack.endpoints.remote(), "127.0.0.1:40000".parse().unwrap());
        let reset = decode(&bytes(&fixture::note(9, 7, note::RESET_SENT, 11))).unwrap();
        assert_eq!(
            reset,
            Record::Note(Note { timestamp_ns: 9, skaddr: 7, kind: NoteKind::ResetSent })
        );
    }

    #[test]
    fn garbage_never_panics() {
        // A deterministic sweep of pseudo-random records of every nearby length.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..=(STATE_EVENT_WITH_STATS_SIZE + 8) {
            for _ in 0..200 {
                let buf: Vec<u8> = (0..len)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        seed as u8
                    })
                    .collect();
                if let Ok(Record::State(event)) = decode(&buf) {
                    let _ = (event.local(), event.remote(), event.comm());
                }
            }
        }
    }

    #[test]
    fn state_names_match_the_kernel() {
        for (i, state) in TcpState::ALL.iter().enumerate() {
            assert_eq!(TcpState::try_from(i as i32 + 1), Ok(*state));
            assert_eq!(state.index(), i);
        }
        assert_eq!(TcpState::CloseWait.name(), "CLOSE_WAIT");
        assert_eq!(TcpState::FinWait2.to_string(), "FIN_WAIT2");
    }
}
