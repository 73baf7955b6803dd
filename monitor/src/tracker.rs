//! Per-socket state machine: turns TCP state transitions into [`Observation`]s.
//!
//! Pure logic, no kernel access: the daemon feeds it decoded events, tests feed it recorded
//! sequences. Sockets are keyed by their kernel address (`skaddr`), never by the 4-tuple,
//! because an active open first reports source port 0 (see DESIGN.md).
//!
//! What the kernel's `sock:inet_sock_set_state` tracepoint shows, and what we derive:
//!
//! | sequence                                         | observation                          |
//! |--------------------------------------------------|--------------------------------------|
//! | CLOSE → SYN_SENT → ESTABLISHED                   | active open, handshake = SYN → SYN-ACK |
//! | LISTEN → SYN_RECV → ESTABLISHED (child socket)   | passive open (no handshake: see below) |
//! | SYN_SENT → CLOSE                                 | connect failure (reason from `sk_err`) |
//! | ESTABLISHED → FIN_WAIT1 → FIN_WAIT2 → CLOSE      | active teardown (we sent the first FIN) |
//! | ESTABLISHED → FIN_WAIT1 → CLOSING → CLOSE        | simultaneous close, active teardown  |
//! | ESTABLISHED → CLOSE_WAIT → LAST_ACK → CLOSE      | passive teardown; CLOSE_WAIT → LAST_ACK is the application's close-wait time |
//! | ESTABLISHED/CLOSE_WAIT/… → CLOSE, `sk_err` set   | reset, timeout, …                    |
//!
//! Kernel facts this relies on:
//! - A passive child socket reports LISTEN → SYN_RECV and SYN_RECV → ESTABLISHED microseconds
//!   apart, both when the final ACK arrives (`tcp_check_req` → `inet_csk_clone_lock`): the
//!   request socket's life emits nothing. SYN_RECV → ESTABLISHED is therefore *not* the passive
//!   handshake, and we do not report it as one.
//! - An orphaned active closer leaves FIN_WAIT2 for CLOSE as soon as its FIN is acknowledged
//!   (`tcp_rcv_state_process` → `tcp_time_wait`): the peer's FIN is handled by the timewait
//!   mini-socket, which the tracepoint does not show. Active teardown therefore ends when the
//!   full socket is handed to TIME_WAIT (or, if the application still holds it, when the peer's
//!   FIN arrives).
//! - `tcp_done_with_error()` stores `sk_err` *before* `tcp_done()` sets TCP_CLOSE, so the error
//!   read at the CLOSE transition tells refused (ECONNREFUSED) from timed out (ETIMEDOUT) from
//!   reset (ECONNRESET, or EPIPE in CLOSE_WAIT). An application close that sends RST instead of
//!   FIN (unread data, SO_LINGER 0) leaves `sk_err` at 0.

use rustc_hash::FxHashMap;

pub use crate::decode::Endpoints;
use crate::decode::{comm_text, Event, SockErr, TcpState};

/// Which end started something: the open (connect vs accept) or the teardown (first FIN).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// This host: `connect()` for an open, the first FIN for a teardown.
    Active,
    /// The peer: an accepted connection, or the peer's FIN first.
    Passive,
}

impl Side {
    /// Label value: `"active"` or `"passive"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Side::Active => "active",
            Side::Passive => "passive",
        }
    }
}

/// How a connection (or a connection attempt) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Orderly FIN exchange.
    Fin,
    /// Reset received from the peer (ECONNRESET, or EPIPE in CLOSE_WAIT).
    Reset,
    /// Closed locally without a FIN exchange: RST sent on close (unread data, SO_LINGER 0),
    /// `connect()` abandoned, or killed (ECONNABORTED, e.g. `ss -K`).
    Abort,
    /// Retransmission, SYN or keepalive timeout (ETIMEDOUT).
    Timeout,
    /// Connect refused: RST in answer to our SYN (ECONNREFUSED).
    Refused,
    /// ICMP unreachable (EHOSTUNREACH, ENETUNREACH, …).
    Unreachable,
    /// Any other socket error, or a connect that failed locally before any SYN was sent
    /// (no local port could be assigned, no route, …).
    Error,
    /// The error could not be read and the states do not tell.
    Unknown,
}

impl CloseReason {
    /// Every reason, for pre-creating metric label sets.
    pub const ALL: [CloseReason; 8] = [
        CloseReason::Fin,
        CloseReason::Reset,
        CloseReason::Abort,
        CloseReason::Timeout,
        CloseReason::Refused,
        CloseReason::Unreachable,
        CloseReason::Error,
        CloseReason::Unknown,
    ];

    /// Label value, e.g. `"fin"`, `"refused"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            CloseReason::Fin => "fin",
            CloseReason::Reset => "reset",
            CloseReason::Abort => "abort",
            CloseReason::Timeout => "timeout",
            CloseReason::Refused => "refused",
            CloseReason::Unreachable => "unreachable",
            CloseReason::Error => "error",
            CloseReason::Unknown => "unknown",
        }
    }

    /// Classifies a transition to CLOSE from `old` with the socket error the kernel had set.
    /// `local_port` is the socket's port at the transition (0: never assigned one).
    pub fn classify(old: TcpState, err: SockErr, local_port: u16) -> CloseReason {
        use TcpState::*;
        let orderly = matches!(old, FinWait2 | Closing | LastAck | TimeWait);
        match err {
            SockErr::Errno(libc::ECONNREFUSED) => CloseReason::Refused,
            SockErr::Errno(libc::ECONNRESET | libc::EPIPE) => CloseReason::Reset,
            SockErr::Errno(libc::ETIMEDOUT) => CloseReason::Timeout,
            SockErr::Errno(libc::ECONNABORTED) => CloseReason::Abort,
            // An ICMP error can sit in sk_err of an open socket (IP_RECVERR) until the
            // application reads it; the close path of a finishing socket sets only the errors
            // above, so an orderly end with any other errno is still an orderly end.
            SockErr::Errno(_) if orderly => CloseReason::Fin,
            // EACCES, ENONET: IPv6 "administratively prohibited", "not on network".
            SockErr::Errno(
                libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::ENETDOWN
                | libc::EACCES
                | libc::ENONET,
            ) => CloseReason::Unreachable,
            SockErr::Errno(_) => CloseReason::Error,
            SockErr::None if orderly => CloseReason::Fin,
            // tcp_v4_connect/tcp_v6_connect fail *after* SYN_SENT when no local port
            // (EADDRNOTAVAIL) or route can be had: CLOSE with no error and no port ever set.
            SockErr::None if old == SynSent && local_port == 0 => CloseReason::Error,
            SockErr::None => CloseReason::Abort,
            SockErr::Unknown if orderly => CloseReason::Fin,
            SockErr::Unknown => CloseReason::Unknown,
        }
    }
}

/// Something worth a metric or a tail line, derived from one transition.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Observation {
    /// A connection reached ESTABLISHED.
    Opened {
        /// Active (connect) or passive (accept).
        side: Side,
    },
    /// An active open finished its handshake: SYN sent → SYN-ACK received.
    Handshake {
        /// Always [`Side::Active`] until passive handshakes are measured with kernel fields.
        side: Side,
        /// Nanoseconds from CLOSE → SYN_SENT to SYN_SENT → ESTABLISHED.
        duration_ns: u64,
    },
    /// An active open failed before ESTABLISHED.
    ConnectFailed {
        /// Refused, timeout, unreachable, abort, …
        reason: CloseReason,
        /// Nanoseconds since the SYN was sent, when known.
        duration_ns: Option<u64>,
    },
    /// The application closed a socket the peer had closed: CLOSE_WAIT → LAST_ACK.
    CloseWait {
        /// Nanoseconds the socket sat in CLOSE_WAIT.
        duration_ns: u64,
    },
    /// An established connection reached CLOSE.
    Closed {
        /// How it was opened; `None` for sockets first seen mid-life.
        side: Option<Side>,
        /// How it ended.
        reason: CloseReason,
        /// ESTABLISHED → CLOSE, when the establishment was seen.
        lifetime_ns: Option<u64>,
        /// For orderly closes whose first FIN was seen: who sent it, and the nanoseconds from
        /// that FIN (ESTABLISHED → FIN_WAIT1 or → CLOSE_WAIT) to CLOSE.
        teardown: Option<(Side, u64)>,
    },
    /// A per-connection record for the tail (only when the sink wants records).
    Connection(ConnectionRecord),
    /// A per-transition record for the tail (only when the sink wants records).
    Transition(TransitionRecord),
}

/// The process a connection belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Process id (tgid); `None` when unknown.
    pub pid: Option<u32>,
    /// NUL-padded task name; all zeros when unknown.
    pub comm: [u8; 16],
}

impl Owner {
    /// No known owner.
    pub const UNKNOWN: Owner = Owner { pid: None, comm: [0; 16] };

    /// The task that was current during `event`. Only meaningful for transitions that run in
    /// the owner's system call (connect, listen, close, shutdown), not in softirq context.
    pub fn current(event: &Event) -> Owner {
        Owner { pid: Some(event.pid), comm: event.comm }
    }

    /// The task name without padding, lossily decoded; empty when unknown.
    pub fn comm(&self) -> String {
        comm_text(&self.comm)
    }
}

/// Where a connection is in its life when a [`ConnectionRecord`] is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionPhase {
    /// Just reached ESTABLISHED.
    Established,
    /// Reached CLOSE after being established.
    Closed,
    /// Reached CLOSE without ever being established (connect failure, aborted accept).
    Failed,
}

/// Everything known about one connection, for the per-connection tail.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConnectionRecord {
    /// Which moment this record describes.
    pub phase: ConnectionPhase,
    /// CLOCK_MONOTONIC ns of the connection's first transition (SYN sent, or child created);
    /// `None` when first seen mid-life.
    pub start_ns: Option<u64>,
    /// CLOCK_MONOTONIC ns of the transition that produced this record.
    pub time_ns: u64,
    /// How it was opened, when known.
    pub side: Option<Side>,
    /// The owning process, when known.
    pub owner: Owner,
    /// Addresses and ports.
    pub endpoints: Endpoints,
    /// Active opens: SYN sent → SYN-ACK received.
    pub handshake_ns: Option<u64>,
    /// ESTABLISHED → CLOSE.
    pub lifetime_ns: Option<u64>,
    /// Orderly closes: who sent the first FIN, and first FIN → CLOSE.
    pub teardown: Option<(Side, u64)>,
    /// CLOSE_WAIT → LAST_ACK.
    pub close_wait_ns: Option<u64>,
    /// How it ended; `None` for [`ConnectionPhase::Established`].
    pub outcome: Option<CloseReason>,
}

/// One state transition with its connection's identity, for the events view of the tail.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TransitionRecord {
    /// CLOCK_MONOTONIC ns of the transition.
    pub time_ns: u64,
    /// How the connection was opened, when known.
    pub side: Option<Side>,
    /// The owning process (not the task that happened to run the transition), when known.
    pub owner: Owner,
    /// Addresses and ports.
    pub endpoints: Endpoints,
    /// State before.
    pub old: TcpState,
    /// State after.
    pub new: TcpState,
    /// Time spent in `old`, when its start was seen.
    pub in_old_ns: Option<u64>,
}

/// Receives observations; implemented by the aggregator, the tail, and `Vec` for tests.
pub trait ObservationSink {
    /// Called once per observation, in order.
    fn observe(&mut self, observation: &Observation);

    /// Whether to also build [`Observation::Connection`] and [`Observation::Transition`]
    /// records (only worth it while someone is tailing).
    fn wants_records(&self) -> bool {
        false
    }
}

/// Collects the metric observations only (no tail records).
impl ObservationSink for Vec<Observation> {
    fn observe(&mut self, observation: &Observation) {
        self.push(*observation);
    }
}

/// Collects every observation including tail records (tests, tools).
#[derive(Debug, Default)]
pub struct RecordingSink(pub Vec<Observation>);

impl ObservationSink for RecordingSink {
    fn observe(&mut self, observation: &Observation) {
        self.0.push(*observation);
    }

    fn wants_records(&self) -> bool {
        true
    }
}

/// Counters about the tracker itself (exported as self-observability metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackerStats {
    /// Sockets whose first event was not their birth (open before start, or events lost).
    pub first_seen_midlife: u64,
    /// Events whose old state differed from the tracked state (events lost in between).
    pub inconsistent: u64,
    /// Entries evicted because the table was full.
    pub evicted_capacity: u64,
    /// Entries replaced by a new socket at the same address (the old CLOSE was lost).
    pub replaced_stale: u64,
    /// Passive children that closed before ESTABLISHED (not a connect failure of ours).
    pub passive_open_aborted: u64,
}

/// What the tracker remembers per socket: timestamps of the transitions that start the
/// intervals we measure. Every anchor is a transition actually seen. When events are lost, a
/// socket whose next event does not follow its tracked state keeps only anchors that are
/// still valid, so it reports fewer intervals rather than wrong ones. One case cannot be told
/// apart: a socket's CLOSE *and* the birth of a new socket at the same kernel address both
/// lost, with the new socket's next transition happening to follow the old one's state. Loss
/// is visible in `tcpmon_events_lost_total`.
#[derive(Clone, Copy, Debug)]
struct SocketEntry {
    state: TcpState,
    /// When the socket entered `state`; `None` when that transition was not seen.
    state_since_ns: Option<u64>,
    /// The first transition seen (birth), `None` for sockets first seen mid-life.
    start_ns: Option<u64>,
    owner: Owner,
    endpoints: Endpoints,
    /// How the connection was opened, when known.
    open_side: Option<Side>,
    /// CLOSE → SYN_SENT time (active opens only).
    syn_sent_ns: Option<u64>,
    established_ns: Option<u64>,
    /// First FIN (sent or received) and who sent it.
    teardown: Option<(Side, u64)>,
    close_wait_ns: Option<u64>,
    /// CLOSE_WAIT → LAST_ACK time.
    close_wait_until_ns: Option<u64>,
    last_seen_ns: u64,
}

impl SocketEntry {
    fn new(state: TcpState, open_side: Option<Side>, event: &Event) -> Self {
        let now = event.timestamp_ns;
        SocketEntry {
            state,
            state_since_ns: None,
            start_ns: None,
            owner: Owner::UNKNOWN,
            endpoints: event.endpoints,
            open_side,
            syn_sent_ns: None,
            established_ns: None,
            teardown: None,
            close_wait_ns: None,
            close_wait_until_ns: None,
            last_seen_ns: now,
        }
    }
}

/// Where a state sits in a connection's life; a transition that starts from an earlier phase
/// than the tracked state means a new socket now lives at the same address.
fn phase(state: TcpState) -> u8 {
    use TcpState::*;
    match state {
        Close | Listen | SynSent | SynRecv | NewSynRecv => 0,
        Established => 1,
        FinWait1 | CloseWait => 2,
        FinWait2 | Closing | LastAck | TimeWait => 3,
    }
}

fn elapsed(from: u64, to: u64) -> u64 {
    to.saturating_sub(from)
}

fn transition_record(
    event: &Event,
    entry: &SocketEntry,
    in_old_ns: Option<u64>,
) -> TransitionRecord {
    TransitionRecord {
        time_ns: event.timestamp_ns,
        side: entry.open_side,
        owner: entry.owner,
        endpoints: entry.endpoints,
        old: event.old,
        new: event.new,
        in_old_ns,
    }
}

fn connection_record(
    entry: &SocketEntry,
    phase: ConnectionPhase,
    now: u64,
    outcome: Option<CloseReason>,
) -> ConnectionRecord {
    let handshake_ns = match (entry.open_side, entry.syn_sent_ns, entry.established_ns) {
        (Some(Side::Active), Some(sent), Some(established)) => Some(elapsed(sent, established)),
        _ => None,
    };
    let close_wait_ns = match (entry.close_wait_ns, entry.close_wait_until_ns) {
        (Some(since), Some(until)) => Some(elapsed(since, until)),
        _ => None,
    };
    ConnectionRecord {
        phase,
        start_ns: entry.start_ns,
        time_ns: now,
        side: entry.open_side,
        owner: entry.owner,
        endpoints: entry.endpoints,
        handshake_ns,
        lifetime_ns: None,
        teardown: None,
        close_wait_ns,
        outcome,
    }
}

/// Default table capacity: ~4× the sockets of a very busy host, ~100 bytes each.
pub const DEFAULT_MAX_SOCKETS: usize = 1 << 20;

/// The per-socket table.
#[derive(Debug)]
pub struct Tracker {
    table: FxHashMap<u64, SocketEntry>,
    /// Listening sockets by port: `listen()` runs in the owner's context, accepted children
    /// are created in softirq context, so the listener is how we know a child's owner.
    listeners: FxHashMap<u16, (u64, Owner)>,
    per_state: [u64; 12],
    max_sockets: usize,
    stats: TrackerStats,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker::new(DEFAULT_MAX_SOCKETS)
    }
}

impl Tracker {
    /// A tracker that holds at most `max_sockets` sockets (at least 1).
    pub fn new(max_sockets: usize) -> Self {
        Tracker {
            table: FxHashMap::default(),
            listeners: FxHashMap::default(),
            per_state: [0; 12],
            max_sockets: max_sockets.max(1),
            stats: TrackerStats::default(),
        }
    }

    /// Sockets currently tracked.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Sockets the table can hold before it grows (it doubles, rehashing every entry).
    pub fn capacity(&self) -> usize {
        self.table.capacity()
    }

    /// True when no socket is tracked.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Tracked sockets per state, indexed by [`TcpState::index`].
    pub fn per_state(&self) -> &[u64; 12] {
        &self.per_state
    }

    /// The tracker's own counters.
    pub fn stats(&self) -> TrackerStats {
        self.stats
    }

    /// Applies one transition and reports what it completes to `sink`.
    pub fn on_event(&mut self, event: &Event, sink: &mut impl ObservationSink) {
        use TcpState::*;
        let now = event.timestamp_ns;
        let records = sink.wants_records();
        self.track_listener(event);

        // A socket's birth: connect(), listen(), or a passive child cloned from a listener.
        let born = event.old == Close || (event.old == Listen && event.new == SynRecv);
        if born {
            if self.remove(event.skaddr).is_some() {
                self.stats.replaced_stale += 1;
            }
            let mut entry = match event.new {
                Close => return,
                SynSent => {
                    let mut entry = SocketEntry::new(SynSent, Some(Side::Active), event);
                    entry.syn_sent_ns = Some(now);
                    entry.owner = Owner::current(event); // connect() runs in the caller
                    entry
                }
                SynRecv => {
                    let mut entry = SocketEntry::new(SynRecv, Some(Side::Passive), event);
                    entry.owner = self.listener_owner(event.endpoints.sport);
                    entry
                }
                Listen => {
                    let mut entry = SocketEntry::new(Listen, None, event);
                    entry.owner = Owner::current(event); // listen() runs in the caller
                    entry
                }
                other => SocketEntry::new(other, None, event),
            };
            entry.start_ns = Some(now);
            entry.state_since_ns = Some(now);
            if records {
                sink.observe(&Observation::Transition(transition_record(event, &entry, None)));
            }
            self.insert(event.skaddr, entry);
            return;
        }

        let (mut entry, consistent) = match self.table.get(&event.skaddr) {
            Some(entry) if entry.state == event.old => (*entry, true),
            Some(entry) if phase(event.old) >= phase(entry.state) => {
                // Events were lost in between; every anchor kept is still a real time.
                self.stats.inconsistent += 1;
                (*entry, false)
            }
            tracked => {
                // Unknown socket, or a new socket at a reused address whose birth was lost:
                // start from what this event shows, with no anchors.
                if tracked.is_some() {
                    self.stats.inconsistent += 1;
                    self.stats.replaced_stale += 1;
                } else {
                    self.stats.first_seen_midlife += 1;
                }
                let side = match event.old {
                    SynSent => Some(Side::Active),
                    SynRecv => Some(Side::Passive),
                    _ => None,
                };
                (SocketEntry::new(event.old, side, event), false)
            }
        };
        entry.last_seen_ns = now;
        entry.endpoints = event.endpoints;
        // close() and shutdown() run in the owner's context: the one safe moment to learn
        // the owner of a socket first seen mid-life.
        if entry.owner.pid.is_none()
            && matches!((event.old, event.new), (Established, FinWait1) | (CloseWait, LastAck))
        {
            entry.owner = Owner::current(event);
        }
        if records {
            let in_old = if consistent {
                entry.state_since_ns.map(|since| elapsed(since, now))
            } else {
                None
            };
            sink.observe(&Observation::Transition(transition_record(event, &entry, in_old)));
        }

        match (event.old, event.new) {
            (_, Established) => {
                if let Some(side) = entry.open_side {
                    sink.observe(&Observation::Opened { side });
                }
                if let (Some(Side::Active), Some(sent)) = (entry.open_side, entry.syn_sent_ns) {
                    let duration_ns = elapsed(sent, now);
                    sink.observe(&Observation::Handshake { side: Side::Active, duration_ns });
                }
                entry.established_ns = Some(now);
                if records {
                    let record = connection_record(&entry, ConnectionPhase::Established, now, None);
                    sink.observe(&Observation::Connection(record));
                }
            }
            // TCP Fast Open: an accepted child exists from the SYN on and may see a FIN, or
            // be closed, before the final ACK; the kernel then counts it as established
            // (tcp_set_state), and so do we.
            (SynRecv, FinWait1 | CloseWait) if entry.established_ns.is_none() => {
                if let Some(side) = entry.open_side {
                    sink.observe(&Observation::Opened { side });
                }
                entry.established_ns = Some(now);
                if event.new == FinWait1 {
                    entry.teardown = Some((Side::Active, now));
                } else {
                    entry.teardown = Some((Side::Passive, now));
                    entry.close_wait_ns = Some(now);
                }
            }
            (Established, FinWait1) => entry.teardown = Some((Side::Active, now)),
            (Established, CloseWait) => {
                entry.teardown = Some((Side::Passive, now));
                entry.close_wait_ns = Some(now);
            }
            (CloseWait, LastAck) => {
                if let Some(since) = entry.close_wait_ns {
                    sink.observe(&Observation::CloseWait { duration_ns: elapsed(since, now) });
                    entry.close_wait_until_ns = Some(now);
                }
            }
            (_, Close) => {
                self.close(event, &entry, sink, records);
                self.remove(event.skaddr);
                return;
            }
            _ => {}
        }
        entry.state = event.new;
        entry.state_since_ns = Some(now);
        self.upsert(event.skaddr, entry);
    }

    fn track_listener(&mut self, event: &Event) {
        match (event.old, event.new) {
            (TcpState::Close, TcpState::Listen) => {
                self.listeners.insert(event.endpoints.sport, (event.skaddr, Owner::current(event)));
            }
            (TcpState::Listen, TcpState::Close)
                if self
                    .listeners
                    .get(&event.endpoints.sport)
                    .is_some_and(|(sk, _)| *sk == event.skaddr) =>
            {
                self.listeners.remove(&event.endpoints.sport);
            }
            _ => {}
        }
    }

    fn listener_owner(&self, port: u16) -> Owner {
        self.listeners.get(&port).map_or(Owner::UNKNOWN, |(_, owner)| *owner)
    }

    fn close(
        &mut self,
        event: &Event,
        entry: &SocketEntry,
        sink: &mut impl ObservationSink,
        records: bool,
    ) {
        let now = event.timestamp_ns;
        let reason = CloseReason::classify(event.old, event.sock_err, event.endpoints.sport);
        if event.old == TcpState::Listen {
            return;
        }
        let pre_established = matches!(event.old, TcpState::SynSent | TcpState::SynRecv)
            && entry.established_ns.is_none();
        if pre_established {
            match entry.open_side {
                Some(Side::Passive) => self.stats.passive_open_aborted += 1,
                _ => sink.observe(&Observation::ConnectFailed {
                    reason,
                    duration_ns: entry.syn_sent_ns.map(|sent| elapsed(sent, now)),
                }),
            }
            if records {
                let record = connection_record(entry, ConnectionPhase::Failed, now, Some(reason));
                sink.observe(&Observation::Connection(record));
            }
            return;
        }
        let teardown = match (reason, entry.teardown) {
            (CloseReason::Fin, Some((side, since))) => Some((side, elapsed(since, now))),
            _ => None,
        };
        let lifetime_ns = entry.established_ns.map(|since| elapsed(since, now));
        sink.observe(&Observation::Closed { side: entry.open_side, reason, lifetime_ns, teardown });
        if records {
            let mut record = connection_record(entry, ConnectionPhase::Closed, now, Some(reason));
            record.lifetime_ns = lifetime_ns;
            record.teardown = teardown;
            sink.observe(&Observation::Connection(record));
        }
    }

    fn remove(&mut self, skaddr: u64) -> Option<SocketEntry> {
        let entry = self.table.remove(&skaddr)?;
        self.per_state[entry.state.index()] -= 1;
        Some(entry)
    }

    fn insert(&mut self, skaddr: u64, entry: SocketEntry) {
        if self.table.len() >= self.max_sockets {
            self.evict_oldest();
        }
        self.per_state[entry.state.index()] += 1;
        self.table.insert(skaddr, entry);
    }

    fn upsert(&mut self, skaddr: u64, entry: SocketEntry) {
        match self.table.get_mut(&skaddr) {
            Some(slot) => {
                self.per_state[slot.state.index()] -= 1;
                self.per_state[entry.state.index()] += 1;
                *slot = entry;
            }
            None => self.insert(skaddr, entry),
        }
    }

    /// Makes room by evicting the least recently updated 1/16 of the table (at least one).
    /// A scan, but only when the table is full, and it frees many slots at once.
    fn evict_oldest(&mut self) {
        let count = (self.table.len() / 16).max(1);
        let mut ages: Vec<(u64, u64)> =
            self.table.iter().map(|(key, entry)| (entry.last_seen_ns, *key)).collect();
        ages.select_nth_unstable(count - 1);
        for &(_, key) in &ages[..count] {
            self.remove(key);
        }
        self.stats.evicted_capacity += count as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{decode_record, fixture::v4};
    use TcpState::*;

    const MS: u64 = 1_000_000;

    /// Replays `(ms, skaddr, old, new, sk_err)` steps and returns the observations.
    fn replay(
        tracker: &mut Tracker,
        steps: &[(u64, u64, TcpState, TcpState, i32)],
    ) -> Vec<Observation> {
        let mut out = Vec::new();
        for &(ms, sk, old, new, err) in steps {
            let event = decode_record(&v4(ms * MS, sk, old, new, 40000, 80, err)).unwrap();
            tracker.on_event(&event, &mut out);
        }
        out
    }

    fn run(steps: &[(u64, u64, TcpState, TcpState, i32)]) -> (Vec<Observation>, Tracker) {
        let mut tracker = Tracker::default();
        let out = replay(&mut tracker, steps);
        (out, tracker)
    }

    #[test]
    fn active_open_and_active_close() {
        let (out, tracker) = run(&[
            (100, 1, Close, SynSent, 0),
            (103, 1, SynSent, Established, 0),
            (1103, 1, Established, FinWait1, 0),
            (1143, 1, FinWait1, FinWait2, 0),
            (1143, 1, FinWait2, Close, 0),
        ]);
        assert_eq!(
            out,
            vec![
                Observation::Opened { side: Side::Active },
                Observation::Handshake { side: Side::Active, duration_ns: 3 * MS },
                Observation::Closed {
                    side: Some(Side::Active),
                    reason: CloseReason::Fin,
                    lifetime_ns: Some(1040 * MS),
                    teardown: Some((Side::Active, 40 * MS)),
                },
            ]
        );
        assert!(tracker.is_empty());
        assert_eq!(tracker.per_state(), &[0; 12]);
    }

    #[test]
    fn passive_open_and_passive_close_with_close_wait() {
        let (out, _) = run(&[
            (0, 9, Close, Listen, 0),
            (10, 2, Listen, SynRecv, 0),
            (10, 2, SynRecv, Established, 0),
            (500, 2, Established, CloseWait, 0),
            (800, 2, CloseWait, LastAck, 0),
            (801, 2, LastAck, Close, 0),
        ]);
        assert_eq!(
            out,
            vec![
                // No handshake: SYN_RECV → ESTABLISHED is not the passive handshake.
                Observation::Opened { side: Side::Passive },
                Observation::CloseWait { duration_ns: 300 * MS },
                Observation::Closed {
                    side: Some(Side::Passive),
                    reason: CloseReason::Fin,
                    lifetime_ns: Some(791 * MS),
                    teardown: Some((Side::Passive, 301 * MS)),
                },
            ]
        );
    }

    #[test]
    fn simultaneous_close_is_an_active_teardown() {
        let (out, _) = run(&[
            (0, 1, Close, SynSent, 0),
            (1, 1, SynSent, Established, 0),
            (10, 1, Established, FinWait1, 0),
            (11, 1, FinWait1, Closing, 0),
            (12, 1, Closing, Close, 0),
        ]);
        assert_eq!(
            out.last(),
            Some(&Observation::Closed {
                side: Some(Side::Active),
                reason: CloseReason::Fin,
                lifetime_ns: Some(11 * MS),
                teardown: Some((Side::Active, 2 * MS)),
            })
        );
    }

    #[test]
    fn resets_and_aborts() {
        let (out, _) = run(&[
            (0, 1, Close, SynSent, 0),
            (1, 1, SynSent, Established, 0),
            (5, 1, Established, Close, libc::ECONNRESET),
            (0, 2, Close, SynSent, 0),
            (1, 2, SynSent, Established, 0),
            (7, 2, Established, Close, 0),
            (0, 3, Listen, SynRecv, 0),
            (0, 3, SynRecv, Established, 0),
            (2, 3, Established, CloseWait, 0),
            (4, 3, CloseWait, Close, libc::EPIPE),
        ]);
        let closes: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Observation::Closed { reason, teardown, side, .. } => {
                    Some((*side, *reason, *teardown))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            closes,
            vec![
                (Some(Side::Active), CloseReason::Reset, None),
                (Some(Side::Active), CloseReason::Abort, None),
                (Some(Side::Passive), CloseReason::Reset, None),
            ]
        );
    }

    #[test]
    fn refused_timeout_and_abandoned_connects() {
        let (out, tracker) = run(&[
            (0, 1, Close, SynSent, 0),
            (1, 1, SynSent, Close, libc::ECONNREFUSED),
            (0, 2, Close, SynSent, 0),
            (127_000, 2, SynSent, Close, libc::ETIMEDOUT),
            (0, 3, Close, SynSent, 0),
            (50, 3, SynSent, Close, 0),
            (0, 4, Close, SynSent, 0),
            (3, 4, SynSent, Close, libc::EHOSTUNREACH),
        ]);
        assert_eq!(
            out,
            vec![
                Observation::ConnectFailed { reason: CloseReason::Refused, duration_ns: Some(MS) },
                Observation::ConnectFailed {
                    reason: CloseReason::Timeout,
                    duration_ns: Some(127_000 * MS)
                },
                Observation::ConnectFailed {
                    reason: CloseReason::Abort,
                    duration_ns: Some(50 * MS)
                },
                Observation::ConnectFailed {
                    reason: CloseReason::Unreachable,
                    duration_ns: Some(3 * MS)
                },
            ]
        );
        assert!(tracker.is_empty());
    }

    #[test]
    fn sockets_first_seen_mid_life_report_only_what_was_seen() {
        let (out, tracker) = run(&[
            // Established before we started: the teardown is seen whole, the lifetime is not.
            (0, 1, Established, FinWait1, 0),
            (40, 1, FinWait1, FinWait2, 0),
            (40, 1, FinWait2, Close, 0),
            // Only its close is seen.
            (5, 2, LastAck, Close, 0),
        ]);
        assert_eq!(
            out,
            vec![
                Observation::Closed {
                    side: None,
                    reason: CloseReason::Fin,
                    lifetime_ns: None,
                    teardown: Some((Side::Active, 40 * MS)),
                },
                Observation::Closed {
                    side: None,
                    reason: CloseReason::Fin,
                    lifetime_ns: None,
                    teardown: None
                },
            ]
        );
        assert_eq!(tracker.stats().first_seen_midlife, 2);
    }

    #[test]
    fn a_reused_socket_address_starts_a_fresh_connection() {
        let (out, tracker) = run(&[
            (0, 7, Close, SynSent, 0),
            (2, 7, SynSent, Established, 0),
            (3, 7, Established, FinWait1, 0),
            (4, 7, FinWait1, FinWait2, 0),
            (4, 7, FinWait2, Close, 0),
            (100, 7, Close, SynSent, 0),
            (105, 7, SynSent, Established, 0),
        ]);
        assert_eq!(
            out.last(),
            Some(&Observation::Handshake { side: Side::Active, duration_ns: 5 * MS })
        );
        assert_eq!(tracker.len(), 1);
        assert_eq!(tracker.per_state()[Established.index()], 1);
        assert_eq!(tracker.stats().replaced_stale, 0);
    }

    #[test]
    fn lost_events_never_produce_wrong_latencies() {
        // Lost: the old connection's CLOSE and the new one's CLOSE → SYN_SENT.
        let (out, tracker) = run(&[
            (0, 7, Close, SynSent, 0),
            (2, 7, SynSent, Established, 0),
            (900, 7, SynSent, Established, 0),
            (950, 7, Established, FinWait1, 0),
            (960, 7, FinWait1, FinWait2, 0),
            (960, 7, FinWait2, Close, 0),
        ]);
        // The second "open" must not use the first SYN time, and the lifetime must not
        // start at the first connection's establishment.
        assert_eq!(
            &out[2..],
            &[
                Observation::Opened { side: Side::Active },
                Observation::Closed {
                    side: Some(Side::Active),
                    reason: CloseReason::Fin,
                    lifetime_ns: Some(60 * MS),
                    teardown: Some((Side::Active, 10 * MS)),
                },
            ]
        );
        assert_eq!(tracker.stats().inconsistent, 1);

        // Lost: ESTABLISHED → FIN_WAIT1. No teardown can be measured; the lifetime still is.
        let (out, tracker) = run(&[
            (0, 1, Close, SynSent, 0),
            (1, 1, SynSent, Established, 0),
            (50, 1, FinWait1, FinWait2, 0),
            (50, 1, FinWait2, Close, 0),
        ]);
        assert_eq!(
            out.last(),
            Some(&Observation::Closed {
                side: Some(Side::Active),
                reason: CloseReason::Fin,
                lifetime_ns: Some(49 * MS),
                teardown: None,
            })
        );
        assert_eq!(tracker.stats().inconsistent, 1);
    }

    #[test]
    fn listeners_are_tracked_but_never_counted_as_connections() {
        let (out, mut tracker) = run(&[(0, 9, Close, Listen, 0)]);
        assert!(out.is_empty());
        assert_eq!(tracker.per_state()[Listen.index()], 1);
        let out = replay(&mut tracker, &[(5, 9, Listen, Close, 0)]);
        assert!(out.is_empty());
        assert!(tracker.is_empty());
    }

    #[test]
    fn passive_child_closed_before_established_is_not_a_connect_failure() {
        let (out, tracker) =
            run(&[(0, 3, Listen, SynRecv, 0), (1, 3, SynRecv, Close, libc::ECONNRESET)]);
        assert!(out.is_empty());
        assert_eq!(tracker.stats().passive_open_aborted, 1);
    }

    #[test]
    fn a_connect_that_never_got_a_port_is_an_error_not_an_abort() {
        let mut tracker = Tracker::default();
        let mut out = Vec::new();
        for (ms, old, new) in [(0, Close, SynSent), (1, SynSent, Close)] {
            let raw = v4(ms * MS, 5, old, new, 0, 80, 0); // sport stays 0
            tracker.on_event(&decode_record(&raw).unwrap(), &mut out);
        }
        assert_eq!(
            out,
            vec![Observation::ConnectFailed { reason: CloseReason::Error, duration_ns: Some(MS) }]
        );
    }

    #[test]
    fn fast_open_children_are_established_by_a_fin_before_the_ack() {
        let (out, _) = run(&[
            (0, 2, Listen, SynRecv, 0),
            (1, 2, SynRecv, CloseWait, 0),
            (3, 2, CloseWait, LastAck, 0),
            (4, 2, LastAck, Close, 0),
        ]);
        assert_eq!(
            out,
            vec![
                Observation::Opened { side: Side::Passive },
                Observation::CloseWait { duration_ns: 2 * MS },
                Observation::Closed {
                    side: Some(Side::Passive),
                    reason: CloseReason::Fin,
                    lifetime_ns: Some(3 * MS),
                    teardown: Some((Side::Passive, 3 * MS)),
                },
            ]
        );
    }

    #[test]
    fn stale_icmp_errors_do_not_relabel_an_orderly_close() {
        assert_eq!(
            CloseReason::classify(LastAck, SockErr::Errno(libc::EHOSTUNREACH), 40000),
            CloseReason::Fin
        );
        assert_eq!(
            CloseReason::classify(LastAck, SockErr::Errno(libc::ETIMEDOUT), 40000),
            CloseReason::Timeout
        );
        assert_eq!(
            CloseReason::classify(FinWait2, SockErr::Errno(libc::ECONNRESET), 40000),
            CloseReason::Reset
        );
        assert_eq!(
            CloseReason::classify(SynSent, SockErr::Errno(libc::EACCES), 40000),
            CloseReason::Unreachable
        );
    }

    #[test]
    fn unknown_sock_err_falls_back_to_the_states() {
        assert_eq!(CloseReason::classify(LastAck, SockErr::Unknown, 40000), CloseReason::Fin);
        assert_eq!(CloseReason::classify(SynSent, SockErr::Unknown, 40000), CloseReason::Unknown);
        assert_eq!(
            CloseReason::classify(Established, SockErr::Errno(libc::EIO), 40000),
            CloseReason::Error
        );
        assert_eq!(
            CloseReason::classify(Established, SockErr::Errno(libc::ECONNABORTED), 40000),
            CloseReason::Abort
        );
    }

    fn records(steps: &[(u64, u64, TcpState, TcpState, i32)]) -> Vec<Observation> {
        let mut tracker = Tracker::default();
        let mut sink = RecordingSink::default();
        for &(ms, sk, old, new, err) in steps {
            let listener = new == Listen || (old, new) == (Listen, Close);
            let mut raw = v4(ms * MS, sk, old, new, if listener { 80 } else { 40000 }, 80, err);
            if (old, new) == (Listen, SynRecv) {
                raw.sport = 80;
                raw.dport = 40000;
                raw.pid_tgid = 7 << 32; // softirq: whatever task was interrupted
            }
            if (old, new) == (Close, Listen) {
                raw.pid_tgid = 99 << 32;
                raw.comm = *b"nginx\0\0\0\0\0\0\0\0\0\0\0";
            }
            tracker.on_event(&decode_record(&raw).unwrap(), &mut sink);
        }
        sink.0
    }

    #[test]
    fn connection_records_carry_identity_and_every_latency() {
        let out = records(&[
            (0, 1, Close, SynSent, 0),
            (2, 1, SynSent, Established, 0),
            (10, 1, Established, CloseWait, 0),
            (310, 1, CloseWait, LastAck, 0),
            (311, 1, LastAck, Close, 0),
        ]);
        let connections: Vec<ConnectionRecord> = out
            .iter()
            .filter_map(|o| match o {
                Observation::Connection(c) => Some(*c),
                _ => None,
            })
            .collect();
        assert_eq!(connections.len(), 2);
        assert_eq!(connections[0].phase, ConnectionPhase::Established);
        assert_eq!(connections[0].handshake_ns, Some(2 * MS));
        let closed = connections[1];
        assert_eq!(closed.phase, ConnectionPhase::Closed);
        assert_eq!(closed.start_ns, Some(0));
        assert_eq!(closed.time_ns, 311 * MS);
        assert_eq!(closed.side, Some(Side::Active));
        assert_eq!(closed.owner.pid, Some(4242));
        assert_eq!(closed.owner.comm(), "test");
        assert_eq!(closed.endpoints.local(), "127.0.0.1:40000".parse().unwrap());
        assert_eq!(closed.endpoints.remote(), "127.0.0.1:80".parse().unwrap());
        assert_eq!(closed.handshake_ns, Some(2 * MS));
        assert_eq!(closed.lifetime_ns, Some(309 * MS));
        assert_eq!(closed.teardown, Some((Side::Passive, 301 * MS)));
        assert_eq!(closed.close_wait_ns, Some(300 * MS));
        assert_eq!(closed.outcome, Some(CloseReason::Fin));

        let transitions: Vec<TransitionRecord> = out
            .iter()
            .filter_map(|o| match o {
                Observation::Transition(t) => Some(*t),
                _ => None,
            })
            .collect();
        assert_eq!(transitions.len(), 5);
        assert_eq!(transitions[0].in_old_ns, None);
        assert_eq!(transitions[1].in_old_ns, Some(2 * MS));
        assert_eq!(transitions[3].in_old_ns, Some(300 * MS));
        assert_eq!(transitions[3].new, LastAck);
    }

    #[test]
    fn accepted_connections_belong_to_the_listener_not_the_interrupted_task() {
        let out = records(&[
            (0, 9, Close, Listen, 0),
            (5, 2, Listen, SynRecv, 0),
            (5, 2, SynRecv, Established, 0),
            (6, 2, Established, Close, libc::ECONNRESET),
            // Its listener closed: a later child of port 80 has no known owner.
            (7, 9, Listen, Close, 0),
            (8, 3, Listen, SynRecv, 0),
            (8, 3, SynRecv, Close, 0),
        ]);
        let owners: Vec<(ConnectionPhase, Option<u32>, String)> = out
            .iter()
            .filter_map(|o| match o {
                Observation::Connection(c) => Some((c.phase, c.owner.pid, c.owner.comm())),
                _ => None,
            })
            .collect();
        assert_eq!(
            owners,
            vec![
                (ConnectionPhase::Established, Some(99), "nginx".to_owned()),
                (ConnectionPhase::Closed, Some(99), "nginx".to_owned()),
                (ConnectionPhase::Failed, None, String::new()),
            ]
        );
    }

    #[test]
    fn without_a_tail_no_records_are_built() {
        let (out, _) = run(&[(0, 1, Close, SynSent, 0), (1, 1, SynSent, Established, 0)]);
        assert!(out
            .iter()
            .all(|o| !matches!(o, Observation::Connection(_) | Observation::Transition(_))));
    }

    #[test]
    fn the_table_stays_within_its_cap() {
        let mut tracker = Tracker::new(64);
        for sk in 0..1000u64 {
            replay(&mut tracker, &[(sk, sk, Close, SynSent, 0)]);
            assert!(tracker.len() <= 64);
        }
        assert_eq!(tracker.per_state()[SynSent.index()], tracker.len() as u64);
        assert!(tracker.stats().evicted_capacity >= 1000 - 64);
        // The newest sockets survive eviction.
        let out = replay(&mut tracker, &[(2000, 999, SynSent, Established, 0)]);
        assert_eq!(
            out.last(),
            Some(&Observation::Handshake { side: Side::Active, duration_ns: 1001 * MS })
        );
    }
}
