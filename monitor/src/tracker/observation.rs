//! What the tracker emits: [`Observation`]s for the metrics, and for the tail per-connection
//! ([`ConnectionRecord`]) and per-transition ([`TransitionRecord`]) records, handed to an
//! [`ObservationSink`].

use std::borrow::Cow;

use super::outcome::{AbandonReason, CloseReason, ResetDirection, Side};
use crate::decode::{comm_text, Endpoints, Event, TcpState, TcpStats};

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
    /// The application closed a socket the peer had closed: CLOSE_WAIT → LAST_ACK (it left
    /// CLOSE_WAIT).
    CloseWait {
        /// Nanoseconds the socket sat in CLOSE_WAIT.
        duration_ns: u64,
    },
    /// The peer closed first: the connection is in CLOSE_WAIT until the application closes.
    CloseWaitEntered,
    /// A connection seen entering CLOSE_WAIT left it another way than by the application's
    /// close ([`Observation::CloseWait`]): a reset, or lost events.
    CloseWaitLeft,
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
        /// An active close handed the connection to a TIME_WAIT socket: FIN_WAIT2 or CLOSING
        /// → CLOSE after an orderly FIN exchange (`tcp_time_wait()`).
        time_wait: bool,
    },
    /// The application's accept() took an established connection from its listener's queue.
    Accepted {
        /// Nanoseconds from entering the queue (ESTABLISHED) to accept() returning it.
        wait_ns: u64,
    },
    /// An established connection left its listener's queue without being accepted.
    AcceptAbandoned {
        /// Why it left.
        reason: AbandonReason,
    },
    /// A request socket resent its SYN-ACK (`tcp:tcp_retransmit_synack`).
    SynAckRetransmitted {
        /// The client had already sent its final ACK, which the kernel dropped because the
        /// accept queue was full; otherwise the SYN-ACK or the ACK was lost, or the client
        /// is silent (a SYN flood).
        client_acked: bool,
    },
    /// A socket started listening (`listen()`): its port is a service of this host.
    Listening {
        /// The local port.
        port: u16,
    },
    /// A connection left one of the [`super::TIMED_STATES`] after this long in it (from the
    /// transition into it to the one out of it).
    StateLeft {
        /// The state it left.
        state: TcpState,
        /// Nanoseconds it spent there.
        duration_ns: u64,
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
    pub fn comm(&self) -> Cow<'_, str> {
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
    /// In CLOSE_WAIT now (`tcpmon tail --close-wait`): the peer closed, the application
    /// has not.
    CloseWait,
}

impl ConnectionPhase {
    /// The tail's name for it (the `event` of a `connection` record).
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionPhase::Established => "established",
            ConnectionPhase::Closed => "closed",
            ConnectionPhase::Failed => "failed",
            ConnectionPhase::CloseWait => "close_wait",
        }
    }
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
    /// Accepted connections: a SYN-ACK was resent after the client had already completed
    /// its handshake, because the listener's accept queue was full.
    pub accept_queue_full: bool,
    /// Accepted connections: from entering the accept queue (ESTABLISHED) to the
    /// application's accept(), µs precision; `None` until accepted, or when not seen.
    pub accept_wait_ns: Option<u64>,
    /// Inode of the connection's network namespace, when known.
    pub netns: Option<u32>,
    /// The socket's cgroup v2 id, when known.
    pub cgroup_id: Option<u64>,
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
    /// The socket's cgroup v2 id, when known.
    pub cgroup_id: Option<u64>,
    /// State before.
    pub old: TcpState,
    /// State after.
    pub new: TcpState,
    /// Time spent in `old`, when its start was seen.
    pub in_old_ns: Option<u64>,
}

/// Whose connection an observation is about: what per-namespace, per-port and per-workload
/// series need. Every field may be unknown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attribution {
    /// Inode of the connection's network namespace; 0 when unknown.
    pub netns: u32,
    /// The socket's cgroup v2 id; 0 when unknown.
    pub cgroup_id: u64,
    /// The service the connection is for: the local (listening) port of an accepted
    /// connection, the remote port of a connect; `None` when not known.
    pub service_port: Option<u16>,
    /// Whether `service_port` is one this host listens on (accepted connections).
    pub listening: bool,
}

/// Receives observations; implemented by the aggregator, the tail, and `Vec` for tests.
pub trait ObservationSink {
    /// Called once per observation, in order.
    fn observe(&mut self, observation: &Observation);

    /// An observation about a connection that is known by `whose`. Sinks that split
    /// metrics by namespace, port or workload override this; the others see
    /// [`Self::observe`].
    fn observe_in(&mut self, observation: &Observation, whose: &Attribution) {
        let _ = whose;
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
