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
//! | LISTEN → SYN_RECV → ESTABLISHED (child socket)   | passive open, handshake = first SYN-ACK → ACK (see below) |
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
//!   handshake. What is: the first SYN-ACK sent → the final ACK. The child starts with its
//!   request socket's SYN-ACK retransmissions in `total_retrans` (`tcp_create_openreq_child`)
//!   and, when there were none, with that exact interval as its first RTT sample in `srtt_us`
//!   (`tcp_check_req` → `tcp_synack_rtt_meas`: now − `snt_synack`), both read at SYN_RECV →
//!   ESTABLISHED. When the SYN-ACK was resent, Karn's rule forbids that sample (with
//!   timestamps the kernel samples the echo of the *last* SYN-ACK instead); then
//!   `tcp:tcp_retransmit_synack` has told us the request's first SYN-ACK time
//!   (`snt_synack`) under the 4-tuple the child inherits, and the handshake runs from it to
//!   ESTABLISHED.
//! - At SYN_SENT → ESTABLISHED and SYN_SENT → CLOSE the socket's `total_retrans` counts the
//!   SYN retransmissions (`tcp_retransmit_skb`), read from the record's stats.
//! - An orphaned active closer leaves FIN_WAIT2 for CLOSE as soon as its FIN is acknowledged
//!   (`tcp_rcv_state_process` → `tcp_time_wait`): the peer's FIN is handled by the timewait
//!   mini-socket, which the tracepoint does not show. Active teardown therefore ends when the
//!   full socket is handed to TIME_WAIT (or, if the application still holds it, when the peer's
//!   FIN arrives).
//! - `tcp_done_with_error()` stores `sk_err` *before* `tcp_done()` sets TCP_CLOSE, so the error
//!   read at the CLOSE transition tells refused (ECONNREFUSED) from timed out (ETIMEDOUT) from
//!   reset (ECONNRESET, or EPIPE in CLOSE_WAIT). An application close that sends RST instead of
//!   FIN (unread data, SO_LINGER 0) leaves `sk_err` at 0, and the kernel sends that RST only
//!   after the CLOSE (`__tcp_close`, `tcp_disconnect`): it is an abort. RSTs the kernel sends
//!   *before* closing (orphaned FIN_WAIT2 timeout, out of orphan memory) arrive as reset
//!   notes (`tcp:tcp_send_reset`) and make the close `reset_sent`.

use rustc_hash::{FxHashMap, FxHashSet};

pub use crate::decode::Endpoints;
use crate::decode::{
    comm_text, Event, Note, NoteKind, Record, SockErr, SynAckRetransmitted, TcpState, TcpStats,
};
use crate::snapshot::ExistingSocket;

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
    ResetReceived,
    /// The kernel reset the connection on its own before closing it (orphaned FIN_WAIT2 or
    /// orphan-memory timeout): seen through `tcp:tcp_send_reset`.
    ResetSent,
    /// Closed by the local application without a FIN exchange: RST sent on close (unread
    /// data, SO_LINGER 0), `connect()` abandoned, or killed (ECONNABORTED, e.g. `ss -K`).
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
    pub const ALL: [CloseReason; 9] = [
        CloseReason::Fin,
        CloseReason::ResetReceived,
        CloseReason::ResetSent,
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
            CloseReason::ResetReceived => "reset_received",
            CloseReason::ResetSent => "reset_sent",
            CloseReason::Abort => "abort",
            CloseReason::Timeout => "timeout",
            CloseReason::Refused => "refused",
            CloseReason::Unreachable => "unreachable",
            CloseReason::Error => "error",
            CloseReason::Unknown => "unknown",
        }
    }

    /// Classifies a transition to CLOSE from `old` with the socket error the kernel had set
    /// and the resets seen on the socket before it. `local_port` is the socket's port at the
    /// transition (0: never assigned one).
    pub fn classify(old: TcpState, err: SockErr, local_port: u16, resets: Resets) -> CloseReason {
        use TcpState::*;
        let orderly = matches!(old, FinWait2 | Closing | LastAck | TimeWait);
        match err {
            // A RST the kernel sent before closing, with no error of its own: the kernel gave
            // up on the connection (tcp_keepalive_timer for an orphaned FIN_WAIT2,
            // tcp_out_of_resources). With an error, the error says why (a keepalive timeout
            // also sends RST).
            SockErr::None | SockErr::Unknown if resets.sent => CloseReason::ResetSent,
            SockErr::None | SockErr::Unknown if resets.received => CloseReason::ResetReceived,
            SockErr::Errno(libc::ECONNREFUSED) => CloseReason::Refused,
            SockErr::Errno(libc::ECONNRESET | libc::EPIPE) => CloseReason::ResetReceived,
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

/// Resets seen on a socket before it closed (from reset notes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resets {
    /// The kernel sent a RST for it.
    pub sent: bool,
    /// It processed a RST from the peer.
    pub received: bool,
}

/// Which way a RST went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResetDirection {
    /// This host sent it.
    Sent,
    /// This host received it.
    Received,
}

impl ResetDirection {
    /// Label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            ResetDirection::Sent => "sent",
            ResetDirection::Received => "received",
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
    /// A handshake completed. Active: SYN sent (CLOSE → SYN_SENT) → SYN-ACK received
    /// (SYN_SENT → ESTABLISHED). Passive: first SYN-ACK sent → final ACK (SYN_RECV →
    /// ESTABLISHED).
    Handshake {
        /// Which end.
        side: Side,
        /// Nanoseconds.
        duration_ns: u64,
        /// SYN (active) or SYN-ACK (passive) retransmissions, when the kernel told.
        retransmits: Option<u32>,
    },
    /// SYNs (active) or SYN-ACKs (passive) a completed handshake resent, whether or not its
    /// duration is known.
    HandshakeRetransmits {
        /// Which end.
        side: Side,
        /// How many.
        count: u32,
    },
    /// An active open failed before ESTABLISHED.
    ConnectFailed {
        /// Refused, timeout, unreachable, abort, …
        reason: CloseReason,
        /// Nanoseconds since the SYN was sent, when known.
        duration_ns: Option<u64>,
        /// SYN retransmissions before it failed, when the kernel told.
        retransmits: Option<u32>,
    },
    /// The kernel sent or processed a RST (for a tracked socket or not).
    Reset {
        /// Sent or received.
        direction: ResetDirection,
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
    /// Active: SYN sent → SYN-ACK received; passive: first SYN-ACK sent → final ACK.
    pub handshake_ns: Option<u64>,
    /// SYN (active) or SYN-ACK (passive) retransmissions during the handshake.
    pub handshake_retransmits: Option<u32>,
    /// Inode of the connection's network namespace, when known.
    pub netns: Option<u32>,
    /// The socket's counters at CLOSE (closed and failed records only).
    pub stats: Option<TcpStats>,
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
    /// Inode of the connection's network namespace, when known.
    pub netns: Option<u32>,
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

    /// An observation about a connection in network namespace `netns` (0: unknown). Sinks
    /// that split metrics by namespace override this; the others see [`Self::observe`].
    fn observe_in(&mut self, observation: &Observation, netns: u32) {
        let _ = netns;
        self.observe(observation);
    }

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
    /// SYN-ACK retransmissions not remembered because the pending table was full (their
    /// connections report retries but no handshake duration).
    pub synack_untracked: u64,
}

/// A CLOCK_MONOTONIC time (or a duration) that may be unknown, in 8 bytes where
/// `Option<u64>` takes 16: stored plus one in a `NonZeroU64`. Seven of these per socket keep
/// the table within its memory budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Stamp(Option<std::num::NonZeroU64>);

impl Stamp {
    const NONE: Stamp = Stamp(None);

    fn at(ns: u64) -> Stamp {
        Stamp(std::num::NonZeroU64::new(ns.wrapping_add(1)))
    }

    fn get(self) -> Option<u64> {
        self.0.map(|stored| stored.get() - 1)
    }

    fn is_none(self) -> bool {
        self.0.is_none()
    }
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
    state_since_ns: Stamp,
    /// The first transition seen (birth), `None` for sockets first seen mid-life.
    start_ns: Stamp,
    owner: Owner,
    endpoints: Endpoints,
    /// How the connection was opened, when known.
    open_side: Option<Side>,
    /// CLOSE → SYN_SENT time (active opens only).
    syn_sent_ns: Stamp,
    /// SYN or SYN-ACK retransmissions, once known.
    handshake_retransmits: Option<u32>,
    /// Handshake duration, once established.
    handshake_ns: Stamp,
    established_ns: Stamp,
    /// Network namespace inode; 0 until a record carried it.
    netns: u32,
    resets: Resets,
    /// First FIN (sent or received) and who sent it.
    teardown: Option<(Side, u64)>,
    close_wait_ns: Stamp,
    /// CLOSE_WAIT → LAST_ACK time.
    close_wait_until_ns: Stamp,
    last_seen_ns: u64,
}

impl SocketEntry {
    fn new(state: TcpState, open_side: Option<Side>, event: &Event) -> Self {
        let now = event.timestamp_ns;
        SocketEntry {
            state,
            state_since_ns: Stamp::NONE,
            start_ns: Stamp::NONE,
            owner: Owner::UNKNOWN,
            endpoints: event.endpoints,
            open_side,
            syn_sent_ns: Stamp::NONE,
            handshake_retransmits: None,
            handshake_ns: Stamp::NONE,
            established_ns: Stamp::NONE,
            netns: event.netns,
            resets: Resets::default(),
            teardown: None,
            close_wait_ns: Stamp::NONE,
            close_wait_until_ns: Stamp::NONE,
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

fn netns(inum: u32) -> Option<u32> {
    (inum != 0).then_some(inum)
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
        netns: netns(entry.netns),
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
    let close_wait_ns = match (entry.close_wait_ns.get(), entry.close_wait_until_ns.get()) {
        (Some(since), Some(until)) => Some(elapsed(since, until)),
        _ => None,
    };
    ConnectionRecord {
        phase,
        start_ns: entry.start_ns.get(),
        time_ns: now,
        side: entry.open_side,
        owner: entry.owner,
        endpoints: entry.endpoints,
        handshake_ns: entry.handshake_ns.get(),
        handshake_retransmits: entry.handshake_retransmits,
        netns: netns(entry.netns),
        stats: None,
        lifetime_ns: None,
        teardown: None,
        close_wait_ns,
        outcome,
    }
}

/// Most request sockets with a resent SYN-ACK remembered at once (a SYN flood makes many; its
/// requests are never established, and the table is bounded), and never more than the
/// socket table's cap.
pub const MAX_PENDING_SYNACKS: usize = 65_536;

/// How long a request socket can still become a connection after its first SYN-ACK: the
/// default 5 retries take ~63 s; allow for `tcp_synack_retries` up to 6.
const SYNACK_HORIZON_NS: u64 = 130 * 1_000_000_000;

/// Default table capacity: ~4× the sockets of a very busy host, ~220 bytes each (~230 MiB if
/// ever full).
pub const DEFAULT_MAX_SOCKETS: usize = 1 << 20;

/// The per-socket table.
#[derive(Debug)]
pub struct Tracker {
    table: FxHashMap<u64, SocketEntry>,
    /// Listening sockets by network namespace and port: `listen()` runs in the owner's
    /// context, accepted children are created in softirq context, so the listener is how we
    /// know a child's owner. The kernel address is 0 for listeners from the snapshot.
    listeners: FxHashMap<(u32, u16), (u64, Owner)>,
    /// Sockets from the start-up snapshot not yet seen in an event, by 4-tuple (`sock_diag`
    /// does not give the kernel address).
    existing: FxHashMap<Endpoints, ExistingSocket>,
    /// While a snapshot is being taken: the 4-tuples of every event since the program was
    /// attached, whose sockets the events already describe better than the snapshot.
    touched: Option<FxHashSet<Endpoints>>,
    /// First SYN-ACK time of request sockets that retransmitted it, by the 4-tuple their
    /// child will have; taken when the child is established.
    synack_retransmits: FxHashMap<Endpoints, u64>,
    /// When `synack_retransmits` was last pruned.
    synack_pruned_ns: u64,
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
            existing: FxHashMap::default(),
            touched: None,
            synack_retransmits: FxHashMap::default(),
            synack_pruned_ns: 0,
            per_state: [0; 12],
            max_sockets: max_sockets.max(1),
            stats: TrackerStats::default(),
        }
    }

    /// Changes the table's cap (config reload); a lower cap takes effect as sockets are added.
    pub fn set_max_sockets(&mut self, max_sockets: usize) {
        self.max_sockets = max_sockets.max(1);
    }

    /// Sockets currently tracked, snapshot sockets not yet seen in an event included.
    pub fn len(&self) -> usize {
        self.table.len() + self.existing.len()
    }

    /// Sockets the table can hold before it grows (it doubles, rehashing every entry).
    pub fn capacity(&self) -> usize {
        self.table.capacity()
    }

    /// True when no socket is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts remembering which sockets events describe, until [`Tracker::preload`]: call
    /// before taking the snapshot, with the program already attached.
    pub fn expect_snapshot(&mut self) {
        self.touched = Some(FxHashSet::default());
    }

    /// Adds the sockets of the start-up snapshot, except those events already described
    /// (they were born, changed state or closed since the program was attached; drain the
    /// ring after taking the snapshot and before calling this). Returns how many were added.
    pub fn preload(&mut self, sockets: &[ExistingSocket]) -> usize {
        let touched = self.touched.take().unwrap_or_default();
        let mut added = 0;
        for socket in sockets {
            if touched.contains(&socket.endpoints) || self.len() >= self.max_sockets {
                continue;
            }
            if socket.state == TcpState::Listen {
                self.listeners
                    .entry((socket.netns, socket.endpoints.sport))
                    .or_insert((0, socket.owner));
            }
            // Two namespaces can hold the same 4-tuple (containers); events carry no
            // namespace mid-life, so only one of them can be matched: keep the last.
            match self.existing.insert(socket.endpoints, *socket) {
                Some(replaced) => self.per_state[replaced.state.index()] -= 1,
                None => added += 1,
            }
            self.per_state[socket.state.index()] += 1;
        }
        added
    }

    /// Tracked sockets per state, indexed by [`TcpState::index`].
    pub fn per_state(&self) -> &[u64; 12] {
        &self.per_state
    }

    /// The tracker's own counters.
    pub fn stats(&self) -> TrackerStats {
        self.stats
    }

    /// Applies one decoded ring record.
    pub fn on_record(&mut self, record: &Record, sink: &mut impl ObservationSink) {
        match record {
            Record::State(event) => self.on_event(event, sink),
            Record::Note(note) => self.on_note(note, sink),
            Record::SynAckRetransmit(synack) => self.on_synack_retransmit(synack),
        }
    }

    /// Remembers when a request socket that is resending its SYN-ACK sent the first one.
    pub fn on_synack_retransmit(&mut self, synack: &SynAckRetransmitted) {
        let Some(first) = synack.first_synack_ns else { return };
        let cap = MAX_PENDING_SYNACKS.min(self.max_sockets);
        if self.synack_retransmits.len() >= cap
            && !self.synack_retransmits.contains_key(&synack.endpoints)
        {
            // Requests give up after net.ipv4.tcp_synack_retries (5: ~63 s): older ones
            // never become connections. Scan at most once a second, so a sustained flood
            // costs a lookup per record, not a scan.
            if synack.timestamp_ns >= self.synack_pruned_ns.saturating_add(1_000_000_000) {
                self.synack_pruned_ns = synack.timestamp_ns;
                let horizon = synack.timestamp_ns.saturating_sub(SYNACK_HORIZON_NS);
                self.synack_retransmits.retain(|_, first| *first >= horizon);
            }
            if self.synack_retransmits.len() >= cap {
                self.stats.synack_untracked += 1;
                return;
            }
        }
        self.synack_retransmits.insert(synack.endpoints, first);
    }

    /// Applies a socket note: facts the state transitions do not carry.
    pub fn on_note(&mut self, note: &Note, sink: &mut impl ObservationSink) {
        let entry = self.table.get_mut(&note.skaddr);
        match note.kind {
            NoteKind::ResetSent | NoteKind::ResetReceived => {
                let direction = if note.kind == NoteKind::ResetReceived {
                    ResetDirection::Received
                } else {
                    ResetDirection::Sent
                };
                sink.observe(&Observation::Reset { direction });
                // A listener answering a bad segment is not closing: only flag connections.
                if let Some(entry) = entry.filter(|e| e.state != TcpState::Listen) {
                    match direction {
                        ResetDirection::Sent => entry.resets.sent = true,
                        ResetDirection::Received => entry.resets.received = true,
                    }
                }
            }
        }
    }

    /// Applies one transition and reports what it completes to `sink`.
    pub fn on_event(&mut self, event: &Event, sink: &mut impl ObservationSink) {
        use TcpState::*;
        let now = event.timestamp_ns;
        let records = sink.wants_records();
        if let Some(touched) = self.touched.as_mut() {
            touched.insert(event.endpoints);
        }
        self.track_listener(event);

        // A socket's birth: connect(), listen(), or a passive child cloned from a listener.
        let born = event.old == Close || (event.old == Listen && event.new == SynRecv);
        if born {
            if self.remove(event.skaddr).is_some() {
                self.stats.replaced_stale += 1;
            }
            // A snapshot socket with the same 4-tuple is gone (its CLOSE was missed).
            if !self.existing.is_empty() {
                if let Some(stale) = self.existing.remove(&event.endpoints) {
                    self.per_state[stale.state.index()] -= 1;
                }
            }
            let mut entry = match event.new {
                Close => return,
                SynSent => {
                    let mut entry = SocketEntry::new(SynSent, Some(Side::Active), event);
                    entry.syn_sent_ns = Stamp::at(now);
                    entry.owner = Owner::current(event); // connect() runs in the caller
                    entry
                }
                SynRecv => {
                    let mut entry = SocketEntry::new(SynRecv, Some(Side::Passive), event);
                    entry.owner = self.listener_owner(event.netns, event.endpoints.sport);
                    entry
                }
                Listen => {
                    let mut entry = SocketEntry::new(Listen, None, event);
                    entry.owner = Owner::current(event); // listen() runs in the caller
                    entry
                }
                other => SocketEntry::new(other, None, event),
            };
            entry.start_ns = Stamp::at(now);
            entry.state_since_ns = Stamp::at(now);
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
                log_out_of_sequence(self.stats.inconsistent, event, entry.state);
                (*entry, false)
            }
            tracked => {
                // Unknown socket, or a new socket at a reused address whose birth was lost:
                // start from what this event shows, with no anchors.
                if let Some(tracked) = tracked {
                    self.stats.inconsistent += 1;
                    log_out_of_sequence(self.stats.inconsistent, event, tracked.state);
                    self.stats.replaced_stale += 1;
                } else {
                    self.stats.first_seen_midlife += 1;
                }
                let side = match event.old {
                    SynSent => Some(Side::Active),
                    SynRecv => Some(Side::Passive),
                    _ => None,
                };
                let mut entry = SocketEntry::new(event.old, side, event);
                // A socket from the start-up snapshot: its owner and namespace are known,
                // its birth is not (no handshake, no lifetime).
                if let Some(existing) = self.existing.remove(&event.endpoints) {
                    self.per_state[existing.state.index()] -= 1;
                    entry.owner = existing.owner;
                    entry.netns = existing.netns;
                }
                (entry, false)
            }
        };
        entry.last_seen_ns = now;
        entry.endpoints = event.endpoints;
        if event.netns != 0 {
            entry.netns = event.netns;
        }
        // close() and shutdown() run in the owner's context: the one safe moment to learn
        // the owner of a socket first seen mid-life.
        if entry.owner.pid.is_none()
            && matches!((event.old, event.new), (Established, FinWait1) | (CloseWait, LastAck))
        {
            entry.owner = Owner::current(event);
        }
        if records {
            let in_old = if consistent {
                entry.state_since_ns.get().map(|since| elapsed(since, now))
            } else {
                None
            };
            sink.observe(&Observation::Transition(transition_record(event, &entry, in_old)));
        }

        match (event.old, event.new) {
            (_, Established) => {
                if let Some(side) = entry.open_side {
                    sink.observe_in(&Observation::Opened { side }, entry.netns);
                }
                // total_retrans at SYN_SENT → ESTABLISHED counts SYN retransmissions; a
                // passive child inherits its request socket's SYN-ACK retransmissions.
                if let Some(stats) = event.stats.filter(|_| matches!(event.old, SynSent | SynRecv))
                {
                    entry.handshake_retransmits = Some(stats.total_retrans);
                    if let Some(side) = entry.open_side.filter(|_| stats.total_retrans > 0) {
                        let count = stats.total_retrans;
                        sink.observe(&Observation::HandshakeRetransmits { side, count });
                    }
                }
                let duration = match entry.open_side {
                    Some(Side::Active) if event.old == SynSent => {
                        entry.syn_sent_ns.get().map(|sent| elapsed(sent, now))
                    }
                    Some(Side::Passive) if event.old == SynRecv => {
                        self.passive_handshake(&entry.endpoints, event.stats.as_ref(), now)
                    }
                    _ => None,
                };
                if let (Some(side), Some(duration_ns)) = (entry.open_side, duration) {
                    entry.handshake_ns = Stamp::at(duration_ns);
                    let retransmits = entry.handshake_retransmits;
                    let handshake = Observation::Handshake { side, duration_ns, retransmits };
                    sink.observe_in(&handshake, entry.netns);
                }
                entry.established_ns = Stamp::at(now);
                // A RST sent while still connecting (e.g. to a bad SYN-ACK) did not end it.
                entry.resets = Resets::default();
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
                    sink.observe_in(&Observation::Opened { side }, entry.netns);
                }
                entry.established_ns = Stamp::at(now);
                if event.new == FinWait1 {
                    entry.teardown = Some((Side::Active, now));
                } else {
                    entry.teardown = Some((Side::Passive, now));
                    entry.close_wait_ns = Stamp::at(now);
                }
            }
            (Established, FinWait1) => entry.teardown = Some((Side::Active, now)),
            (Established, CloseWait) => {
                entry.teardown = Some((Side::Passive, now));
                entry.close_wait_ns = Stamp::at(now);
            }
            (CloseWait, LastAck) => {
                if let Some(since) = entry.close_wait_ns.get() {
                    sink.observe(&Observation::CloseWait { duration_ns: elapsed(since, now) });
                    entry.close_wait_until_ns = Stamp::at(now);
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
        entry.state_since_ns = Stamp::at(now);
        self.upsert(event.skaddr, entry);
    }

    /// First SYN-ACK → final ACK of an accepted child at SYN_RECV → ESTABLISHED (see the
    /// module docs).
    fn passive_handshake(
        &mut self,
        endpoints: &Endpoints,
        stats: Option<&TcpStats>,
        now: u64,
    ) -> Option<u64> {
        let resent = self.synack_retransmits.remove(endpoints);
        match stats {
            Some(stats) if stats.total_retrans == 0 && stats.srtt_us_x8 != 0 => {
                Some(u64::from(stats.srtt_us_x8 >> 3) * 1_000)
            }
            // An entry older than any request can live is another connection's.
            Some(stats) if stats.total_retrans > 0 => resent
                .filter(|first| now.saturating_sub(*first) <= SYNACK_HORIZON_NS)
                .map(|first| elapsed(first, now)),
            _ => None,
        }
    }

    fn track_listener(&mut self, event: &Event) {
        let key = (event.netns, event.endpoints.sport);
        match (event.old, event.new) {
            (TcpState::Close, TcpState::Listen) => {
                self.listeners.insert(key, (event.skaddr, Owner::current(event)));
            }
            // The listener itself closes (0: one from the snapshot, whose address is unknown).
            (TcpState::Listen, TcpState::Close)
                if self
                    .listeners
                    .get(&key)
                    .is_some_and(|(sk, _)| [0, event.skaddr].contains(sk)) =>
            {
                self.listeners.remove(&key);
            }
            _ => {}
        }
    }

    fn listener_owner(&self, netns: u32, port: u16) -> Owner {
        self.listeners.get(&(netns, port)).map_or(Owner::UNKNOWN, |(_, owner)| *owner)
    }

    fn close(
        &mut self,
        event: &Event,
        entry: &SocketEntry,
        sink: &mut impl ObservationSink,
        records: bool,
    ) {
        let now = event.timestamp_ns;
        let reason =
            CloseReason::classify(event.old, event.sock_err, event.endpoints.sport, entry.resets);
        if event.old == TcpState::Listen {
            return;
        }
        let pre_established = matches!(event.old, TcpState::SynSent | TcpState::SynRecv)
            && entry.established_ns.is_none();
        if pre_established {
            // SYN retransmissions of a connect that never completed.
            let retransmits = event.stats.map(|stats| stats.total_retrans);
            match entry.open_side {
                Some(Side::Passive) => self.stats.passive_open_aborted += 1,
                _ => {
                    let duration_ns = entry.syn_sent_ns.get().map(|sent| elapsed(sent, now));
                    let failed = Observation::ConnectFailed { reason, duration_ns, retransmits };
                    sink.observe_in(&failed, entry.netns);
                }
            }
            if records {
                let mut record =
                    connection_record(entry, ConnectionPhase::Failed, now, Some(reason));
                record.handshake_retransmits = retransmits.or(entry.handshake_retransmits);
                record.stats = event.stats;
                sink.observe(&Observation::Connection(record));
            }
            return;
        }
        let teardown = match (reason, entry.teardown) {
            (CloseReason::Fin, Some((side, since))) => Some((side, elapsed(since, now))),
            _ => None,
        };
        let lifetime_ns = entry.established_ns.get().map(|since| elapsed(since, now));
        let closed = Observation::Closed { side: entry.open_side, reason, lifetime_ns, teardown };
        sink.observe_in(&closed, entry.netns);
        if records {
            let mut record = connection_record(entry, ConnectionPhase::Closed, now, Some(reason));
            record.lifetime_ns = lifetime_ns;
            record.teardown = teardown;
            record.stats = event.stats;
            sink.observe(&Observation::Connection(record));
        }
    }

    fn remove(&mut self, skaddr: u64) -> Option<SocketEntry> {
        let entry = self.table.remove(&skaddr)?;
        self.per_state[entry.state.index()] -= 1;
        Some(entry)
    }

    fn insert(&mut self, skaddr: u64, entry: SocketEntry) {
        if self.len() >= self.max_sockets {
            if self.existing.len() > self.table.len() {
                self.evict_existing();
            } else {
                self.evict_oldest();
            }
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

    /// Makes room by dropping 1/16 (at least one) of the snapshot sockets not seen since the
    /// start: they have no activity time to order them by.
    fn evict_existing(&mut self) {
        let count = (self.existing.len() / 16).max(1);
        let victims: Vec<Endpoints> = self.existing.keys().take(count).copied().collect();
        for key in victims {
            if let Some(gone) = self.existing.remove(&key) {
                self.per_state[gone.state.index()] -= 1;
            }
        }
        self.stats.evicted_capacity += count as u64;
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

/// Logs the first few out-of-sequence transitions in full (they are rare, and each is worth
/// a look: a lost transition, or a kernel path that changes state without the tracepoint).
fn log_out_of_sequence(count: u64, event: &Event, tracked: TcpState) {
    if count <= 8 {
        log::info!(
            "out-of-sequence transition {:?} -> {:?} of socket {:#x} ({} -> {}), tracked in \
             {tracked:?} (#{count}; only the first 8 are logged)",
            event.old,
            event.new,
            event.skaddr,
            event.endpoints.local(),
            event.endpoints.remote(),
        );
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

    /// Feeds raw records (as the ring delivers them) and returns every observation.
    fn feed(tracker: &mut Tracker, records: &[Vec<u8>]) -> Vec<Observation> {
        let mut out = RecordingSink::default();
        for bytes in records {
            tracker.on_record(&crate::decode::decode(bytes).unwrap(), &mut out);
        }
        out.0
    }

    fn stats(total_retrans: u32, srtt_us: u32) -> TcpStats {
        TcpStats { total_retrans, srtt_us_x8: srtt_us << 3, ..TcpStats::default() }
    }

    fn handshakes(out: &[Observation]) -> Vec<(Side, u64, Option<u32>)> {
        out.iter()
            .filter_map(|o| match *o {
                Observation::Handshake { side, duration_ns, retransmits } => {
                    Some((side, duration_ns, retransmits))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn passive_handshake_is_the_synack_rtt_sample_without_retransmissions() {
        use crate::decode::fixture::{bytes, with_stats};
        let mut tracker = Tracker::default();
        let out = feed(
            &mut tracker,
            &[
                bytes(&v4(5 * MS, 9, Listen, SynRecv, 80, 40000, 0)),
                // srtt_us after tcp_synack_rtt_meas: 250 µs from SYN-ACK to ACK.
                bytes(&with_stats(
                    v4(5 * MS, 9, SynRecv, Established, 80, 40000, 0),
                    stats(0, 250),
                )),
            ],
        );
        assert_eq!(handshakes(&out), [(Side::Passive, 250_000, Some(0))]);
    }

    #[test]
    fn passive_handshake_with_a_resent_synack_runs_from_the_first_synack() {
        use crate::decode::fixture::{bytes, synack_retransmit, with_stats};
        let mut tracker = Tracker::default();
        let out = feed(
            &mut tracker,
            &[
                // First SYN-ACK at t = 2 s; resent at 3 s; final ACK at 3.0004 s. Karn's rule
                // leaves srtt from the timestamp echo (small), which must not be used.
                bytes(&synack_retransmit(3_000 * MS, 2_000_000, 80, 40000)),
                bytes(&v4(3_000 * MS + 400_000, 9, Listen, SynRecv, 80, 40000, 0)),
                bytes(&with_stats(
                    v4(3_000 * MS + 400_000, 9, SynRecv, Established, 80, 40000, 0),
                    stats(1, 300),
                )),
            ],
        );
        assert_eq!(handshakes(&out), [(Side::Passive, 1_000_400_000, Some(1))]);
        assert!(tracker.synack_retransmits.is_empty(), "taken when established");

        // Another child with a retransmitted SYN-ACK whose note was lost: retries are
        // reported, a duration is not (it would be the wrong one).
        let out = feed(
            &mut tracker,
            &[
                bytes(&v4(4_000 * MS, 10, Listen, SynRecv, 80, 40001, 0)),
                bytes(&with_stats(
                    v4(4_000 * MS, 10, SynRecv, Established, 80, 40001, 0),
                    stats(2, 300),
                )),
            ],
        );
        assert_eq!(handshakes(&out), []);
        assert!(out.contains(&Observation::Opened { side: Side::Passive }));
        assert!(out.contains(&Observation::HandshakeRetransmits { side: Side::Passive, count: 2 }));
    }

    #[test]
    fn pending_synack_retransmissions_are_bounded() {
        use crate::decode::fixture::synack_retransmit;
        // A SYN flood whose requests all resend their SYN-ACK, from distinct peers.
        let mut tracker = Tracker::default();
        for i in 0..MAX_PENDING_SYNACKS as u64 + 10 {
            let mut raw = synack_retransmit(MS, 1, 80, i as u16);
            raw.daddr[14..].copy_from_slice(&((i >> 16) as u16).to_be_bytes());
            let record = crate::decode::decode(&crate::decode::fixture::bytes(&raw)).unwrap();
            tracker.on_record(&record, &mut Vec::new());
        }
        assert_eq!(tracker.synack_retransmits.len(), MAX_PENDING_SYNACKS);
        assert_eq!(tracker.stats().synack_untracked, 10);
        // Requests past the horizon can no longer complete: they make room.
        let late = synack_retransmit(SYNACK_HORIZON_NS + 2 * MS, SYNACK_HORIZON_NS / 1000, 81, 1);
        feed(&mut tracker, &[crate::decode::fixture::bytes(&late)]);
        assert_eq!(tracker.synack_retransmits.len(), 1);
    }

    #[test]
    fn syn_retransmissions_are_counted_on_success_and_failure() {
        use crate::decode::fixture::{bytes, with_stats};
        let mut tracker = Tracker::default();
        let out = feed(
            &mut tracker,
            &[
                bytes(&v4(0, 1, Close, SynSent, 0, 80, 0)),
                bytes(&with_stats(
                    v4(1_003 * MS, 1, SynSent, Established, 40000, 80, 0),
                    stats(1, 3),
                )),
                bytes(&v4(0, 2, Close, SynSent, 0, 81, 0)),
                bytes(&with_stats(
                    v4(127_000 * MS, 2, SynSent, Close, 40001, 81, libc::ETIMEDOUT),
                    stats(6, 0),
                )),
            ],
        );
        assert_eq!(handshakes(&out), [(Side::Active, 1_003 * MS, Some(1))]);
        assert!(out.contains(&Observation::ConnectFailed {
            reason: CloseReason::Timeout,
            duration_ns: Some(127_000 * MS),
            retransmits: Some(6),
        }));
    }

    #[test]
    fn resets_tell_sent_from_received_and_count_every_rst() {
        use crate::decode::fixture::{bytes, note};
        use monitor_common::note::{RESET_RECEIVED, RESET_SENT};
        let mut tracker = Tracker::default();
        let open = |sk| {
            [
                bytes(&v4(0, sk, Close, SynSent, 0, 80, 0)),
                bytes(&v4(MS, sk, SynSent, Established, 40000, 80, 0)),
            ]
        };
        let mut records: Vec<Vec<u8>> = Vec::new();
        // 1: orphaned FIN_WAIT2 killed by tcp_fin_timeout: RST sent, no error, then CLOSE.
        records.extend(open(1));
        records.push(bytes(&v4(2 * MS, 1, Established, FinWait1, 40000, 80, 0)));
        records.push(bytes(&v4(3 * MS, 1, FinWait1, FinWait2, 40000, 80, 0)));
        records.push(bytes(&note(60_000 * MS, 1, RESET_SENT, 0)));
        records.push(bytes(&v4(60_000 * MS, 1, FinWait2, Close, 40000, 80, 0)));
        // 2: the peer resets: tcp_reset() reports it, then sk_err = ECONNRESET.
        records.extend(open(2));
        records.push(bytes(&note(5 * MS, 2, RESET_RECEIVED, 0)));
        records.push(bytes(&v4(5 * MS, 2, Established, Close, 40000, 80, libc::ECONNRESET)));
        // 3: close() with unread data: CLOSE first, then the RST (tcp_send_active_reset).
        records.extend(open(3));
        records.push(bytes(&v4(5 * MS, 3, Established, Close, 40000, 80, 0)));
        records.push(bytes(&note(5 * MS, 3, RESET_SENT, 11)));
        // A RST for a segment no socket owns (a closed port).
        records.push(bytes(&note(6 * MS, 0, RESET_SENT, 1)));
        let out = feed(&mut tracker, &records);
        let reasons: Vec<CloseReason> = out
            .iter()
            .filter_map(|o| match o {
                Observation::Closed { reason, .. } => Some(*reason),
                _ => None,
            })
            .collect();
        assert_eq!(
            reasons,
            [CloseReason::ResetSent, CloseReason::ResetReceived, CloseReason::Abort]
        );
        let count = |d| out.iter().filter(|o| **o == Observation::Reset { direction: d }).count();
        assert_eq!((count(ResetDirection::Sent), count(ResetDirection::Received)), (3, 1));
    }

    #[test]
    fn connection_records_carry_netns_and_totals() {
        use crate::decode::fixture::{bytes, with_stats};
        let mut tracker = Tracker::default();
        let mut born = v4(0, 1, Close, SynSent, 0, 80, 0);
        born.netns = 4026532000;
        let totals = TcpStats { bytes_sent: 10, bytes_received: 20, ..stats(0, 5) };
        let out = feed(
            &mut tracker,
            &[
                bytes(&born),
                bytes(&v4(MS, 1, SynSent, Established, 40000, 80, 0)),
                bytes(&v4(2 * MS, 1, Established, CloseWait, 40000, 80, 0)),
                bytes(&v4(3 * MS, 1, CloseWait, LastAck, 40000, 80, 0)),
                bytes(&with_stats(v4(4 * MS, 1, LastAck, Close, 40000, 80, 0), totals)),
            ],
        );
        let closed = out
            .iter()
            .find_map(|o| match o {
                Observation::Connection(r) if r.phase == ConnectionPhase::Closed => Some(*r),
                _ => None,
            })
            .unwrap();
        assert_eq!(closed.netns, Some(4026532000));
        assert_eq!(closed.stats, Some(TcpStats { complete: 1, ..totals }));
        assert_eq!(closed.handshake_retransmits, None);
    }

    #[test]
    fn snapshot_sockets_are_counted_matched_and_closed_without_invented_times() {
        use crate::snapshot::ExistingSocket;
        let existing = |state, local: &str, remote: &str, pid| ExistingSocket {
            state,
            endpoints: Endpoints::new(local.parse().unwrap(), remote.parse().unwrap()),
            netns: 77,
            owner: Owner { pid: Some(pid), comm: *b"db\0\0\0\0\0\0\0\0\0\0\0\0\0\0" },
        };
        let mut tracker = Tracker::default();
        tracker.expect_snapshot();
        // An event between attach and preload: this socket is already described.
        let mut out = RecordingSink::default();
        let raced = decode_record(&v4(MS, 5, Established, CloseWait, 41000, 80, 0)).unwrap();
        tracker.on_event(&raced, &mut out);
        let added = tracker.preload(&[
            existing(Listen, "127.0.0.1:80", "0.0.0.0:0", 7),
            existing(Established, "127.0.0.1:40000", "127.0.0.1:80", 8),
            existing(Established, "127.0.0.1:41000", "127.0.0.1:80", 8),
        ]);
        assert_eq!(added, 2);
        assert_eq!(tracker.per_state()[Listen.index()], 1);
        assert_eq!(tracker.per_state()[Established.index()], 1);
        assert_eq!(tracker.per_state()[CloseWait.index()], 1);
        assert_eq!(tracker.len(), 3);

        // The existing connection closes: matched by 4-tuple, owner from the snapshot, no
        // lifetime or teardown start invented for the part of its life we did not see.
        let mut out = RecordingSink::default();
        for (ms, old, new) in
            [(10, Established, FinWait1), (11, FinWait1, FinWait2), (12, FinWait2, Close)]
        {
            tracker.on_event(
                &decode_record(&v4(ms * MS, 9, old, new, 40000, 80, 0)).unwrap(),
                &mut out,
            );
        }
        let closed = out.0.iter().find_map(|o| match o {
            Observation::Connection(r) if r.phase == ConnectionPhase::Closed => Some(*r),
            _ => None,
        });
        let closed = closed.unwrap();
        assert_eq!((closed.owner.pid, closed.netns, closed.side), (Some(8), Some(77), None));
        assert_eq!((closed.start_ns, closed.lifetime_ns, closed.handshake_ns), (None, None, None));
        assert_eq!(tracker.per_state()[Established.index()], 0);
        assert_eq!(tracker.len(), 2);

        // The listener from the snapshot owns the connections it accepts.
        let mut child = v4(20 * MS, 11, Listen, SynRecv, 80, 50000, 0);
        child.netns = 77;
        tracker.on_event(&decode_record(&child).unwrap(), &mut out);
        assert_eq!(tracker.table[&11].owner.pid, Some(7));
    }

    #[test]
    fn a_tracked_socket_stays_small() {
        // The table's memory budget (≤ 256 bytes per socket with the hash table's own
        // overhead, see BENCHMARKS.md) leaves about 168 bytes for the entry (160 today).
        let size = std::mem::size_of::<SocketEntry>();
        assert!(size <= 168, "SocketEntry is {size} bytes");
        assert_eq!(Stamp::at(0).get(), Some(0));
        assert_eq!(Stamp::at(u64::MAX - 1).get(), Some(u64::MAX - 1));
        assert_eq!(Stamp::NONE.get(), None);
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
                Observation::Handshake {
                    side: Side::Active,
                    duration_ns: 3 * MS,
                    retransmits: None
                },
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
                (Some(Side::Active), CloseReason::ResetReceived, None),
                (Some(Side::Active), CloseReason::Abort, None),
                (Some(Side::Passive), CloseReason::ResetReceived, None),
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
                Observation::ConnectFailed {
                    reason: CloseReason::Refused,
                    duration_ns: Some(MS),
                    retransmits: None
                },
                Observation::ConnectFailed {
                    reason: CloseReason::Timeout,
                    duration_ns: Some(127_000 * MS),
                    retransmits: None,
                },
                Observation::ConnectFailed {
                    reason: CloseReason::Abort,
                    duration_ns: Some(50 * MS),
                    retransmits: None,
                },
                Observation::ConnectFailed {
                    reason: CloseReason::Unreachable,
                    duration_ns: Some(3 * MS),
                    retransmits: None,
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
            Some(&Observation::Handshake {
                side: Side::Active,
                duration_ns: 5 * MS,
                retransmits: None
            })
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
            vec![Observation::ConnectFailed {
                reason: CloseReason::Error,
                duration_ns: Some(MS),
                retransmits: None
            }]
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
            CloseReason::classify(
                LastAck,
                SockErr::Errno(libc::EHOSTUNREACH),
                40000,
                Resets::default()
            ),
            CloseReason::Fin
        );
        assert_eq!(
            CloseReason::classify(
                LastAck,
                SockErr::Errno(libc::ETIMEDOUT),
                40000,
                Resets::default()
            ),
            CloseReason::Timeout
        );
        assert_eq!(
            CloseReason::classify(
                FinWait2,
                SockErr::Errno(libc::ECONNRESET),
                40000,
                Resets::default()
            ),
            CloseReason::ResetReceived
        );
        assert_eq!(
            CloseReason::classify(SynSent, SockErr::Errno(libc::EACCES), 40000, Resets::default()),
            CloseReason::Unreachable
        );
    }

    #[test]
    fn unknown_sock_err_falls_back_to_the_states() {
        assert_eq!(
            CloseReason::classify(LastAck, SockErr::Unknown, 40000, Resets::default()),
            CloseReason::Fin
        );
        assert_eq!(
            CloseReason::classify(SynSent, SockErr::Unknown, 40000, Resets::default()),
            CloseReason::Unknown
        );
        assert_eq!(
            CloseReason::classify(Established, SockErr::Errno(libc::EIO), 40000, Resets::default()),
            CloseReason::Error
        );
        assert_eq!(
            CloseReason::classify(
                Established,
                SockErr::Errno(libc::ECONNABORTED),
                40000,
                Resets::default()
            ),
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
            Some(&Observation::Handshake {
                side: Side::Active,
                duration_ns: 1001 * MS,
                retransmits: None
            })
        );
    }
}
