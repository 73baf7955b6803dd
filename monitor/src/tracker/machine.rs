//! What one transition does to its socket's entry (the sequences in the tracker's module
//! docs), and what that needs to know besides the socket table.

use rustc_hash::FxHashMap;

use super::entry::{elapsed, SocketEntry, Stamp};
use super::listeners::{Listener, PendingSynAck};
use super::{
    Attribution, ConnectionPhase, Observation, ObservationSink, Owner, Resets, Side, TrackerStats,
    TIMED_STATES,
};
use crate::decode::{Endpoints, Event, TcpState};

/// What applies a transition to one socket's entry, and what it knows besides the socket
/// table: listeners, request sockets that resent their SYN-ACK, its own counters. Kept apart
/// from the table so that the usual transition changes its entry where the table holds it
/// (an entry is 168 bytes: copying it out and back in was a tenth of the daemon's time).
#[derive(Debug)]
pub(super) struct Machine {
    /// Listening sockets by network namespace and port: `listen()` runs in the owner's
    /// context, accepted children are created in softirq context, so the listener is how we
    /// know a child's owner.
    pub(super) listeners: FxHashMap<(u32, u16), Listener>,
    /// First SYN-ACK time of request sockets that retransmitted it, by the 4-tuple their
    /// child will have; taken when the child is established.
    pub(super) synack_retransmits: FxHashMap<Endpoints, PendingSynAck>,
    /// Listeners per port in any namespace, and the cgroup of the latest: records without a
    /// namespace (SYN-ACKs, sockets first seen mid-life) are matched by port alone.
    pub(super) listener_ports: FxHashMap<u16, (u32, u64)>,
    /// When `synack_retransmits` was last pruned.
    pub(super) synack_pruned_ns: u64,
    /// The application's accept() calls are seen (the accept program is attached, or a
    /// recording carries its notes): an established passive child that closes before one
    /// took it was abandoned in the accept queue.
    pub(super) accepts_seen: bool,
    pub(super) stats: TrackerStats,
}

/// Whether a transition follows the state its socket was tracked in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Continuity {
    /// It does: the time in the state it leaves is known.
    Follows,
    /// It does not (an unknown socket, or transitions lost in between).
    Broken,
}

/// What is left of a socket's entry after a transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Keep {
    /// The socket lives on, in the entry's new state.
    Entry,
    /// The socket closed.
    Nothing,
}

impl Machine {
    /// Applies a transition (not a birth) to the socket's `entry` and reports what it
    /// completes to `sink`.
    #[inline]
    pub(super) fn apply(
        &mut self,
        entry: &mut SocketEntry,
        event: &Event,
        continuity: Continuity,
        sink: &mut impl ObservationSink,
    ) -> Keep {
        use TcpState::*;
        let now = event.timestamp_ns;
        // Leaving CLOSE_WAIT for LAST_ACK is reported as its duration (below); any other way
        // out (a reset, lost events) on its own, with the attribution it entered with (before
        // this record's cgroup or namespace, if it carries one, is taken).
        let left_otherwise = (event.old, event.new) != (CloseWait, LastAck);
        let was_entered = entry.state == CloseWait && !entry.close_wait_ns.is_none();
        if was_entered && event.new != CloseWait && left_otherwise {
            sink.observe_in(&Observation::CloseWaitLeft, &self.attribution(entry));
        }
        entry.last_seen_ns = now;
        entry.endpoints = event.endpoints;
        entry.learn_origin(event);
        // close() and shutdown() run in the owner's context: the one safe moment to learn
        // the owner of a socket first seen mid-life.
        if entry.owner.pid.is_none()
            && matches!((event.old, event.new), (Established, FinWait1) | (CloseWait, LastAck))
        {
            entry.owner = Owner::current(event);
        }
        // Time in the state it leaves, when the transition into it was seen.
        if continuity == Continuity::Follows && TIMED_STATES.contains(&event.old) {
            if let Some(since) = entry.state_since_ns.get() {
                let left =
                    Observation::StateLeft { state: event.old, duration_ns: elapsed(since, now) };
                sink.observe_in(&left, &self.attribution(entry));
            }
        }
        if sink.wants_records() {
            let in_old = entry.state_since_ns.get().filter(|_| continuity == Continuity::Follows);
            let in_old = in_old.map(|since| elapsed(since, now));
            sink.observe(&Observation::Transition(entry.transition_record(event, in_old)));
        }

        match (event.old, event.new) {
            (_, Established) => self.on_established(entry, event, sink),
            // TCP Fast Open: an accepted child exists from the SYN on and may see a FIN, or
            // be closed, before the final ACK; the kernel then counts it as established
            // (tcp_set_state), and so do we.
            (SynRecv, FinWait1 | CloseWait) if entry.established_ns.is_none() => {
                if let Some(side) = entry.open_side {
                    sink.observe_in(&Observation::Opened { side }, &self.attribution(entry));
                }
                entry.established_ns = Stamp::at(now);
                self.first_fin(entry, event, sink);
            }
            (Established, FinWait1 | CloseWait) => self.first_fin(entry, event, sink),
            (CloseWait, LastAck) => {
                if let Some(since) = entry.close_wait_ns.get() {
                    let close_wait = Observation::CloseWait { duration_ns: elapsed(since, now) };
                    sink.observe_in(&close_wait, &self.attribution(entry));
                    entry.close_wait_until_ns = Stamp::at(now);
                }
            }
            (_, Close) => {
                self.close(event, entry, sink);
                return Keep::Nothing;
            }
            _ => {}
        }
        entry.state = event.new;
        entry.state_since_ns = Stamp::at(now);
        Keep::Entry
    }

    /// A connection reached ESTABLISHED: it is opened, and its handshake may be complete.
    fn on_established(
        &mut self,
        entry: &mut SocketEntry,
        event: &Event,
        sink: &mut impl ObservationSink,
    ) {
        use TcpState::*;
        let now = event.timestamp_ns;
        let whose = self.attribution(entry);
        if let Some(side) = entry.open_side {
            sink.observe_in(&Observation::Opened { side }, &whose);
        }
        // total_retrans at SYN_SENT → ESTABLISHED counts SYN retransmissions; a passive
        // child inherits its request socket's SYN-ACK retransmissions.
        if let Some(stats) = event.stats.filter(|_| matches!(event.old, SynSent | SynRecv)) {
            entry.handshake_retransmits = Some(stats.total_retrans);
            if let Some(side) = entry.open_side.filter(|_| stats.total_retrans > 0) {
                let count = stats.total_retrans;
                sink.observe_in(&Observation::HandshakeRetransmits { side, count }, &whose);
            }
        }
        let duration = match entry.open_side {
            Some(Side::Active) if event.old == SynSent => {
                entry.syn_sent_ns.get().map(|sent| elapsed(sent, now))
            }
            Some(Side::Passive) if event.old == SynRecv => {
                let (duration, queue_full) =
                    self.passive_handshake(&entry.endpoints, event.stats.as_ref(), now);
                entry.accept_queue_full = queue_full;
                duration
            }
            _ => None,
        };
        if let (Some(side), Some(duration_ns)) = (entry.open_side, duration) {
            entry.handshake_ns = Stamp::at(duration_ns);
            let retransmits = entry.handshake_retransmits;
            let handshake = Observation::Handshake { side, duration_ns, retransmits };
            sink.observe_in(&handshake, &whose);
        }
        entry.established_ns = Stamp::at(now);
        // A RST sent while still connecting (e.g. to a bad SYN-ACK) did not end it.
        entry.resets = Resets::default();
        if sink.wants_records() {
            let record = entry.connection_record(ConnectionPhase::Established, now, None);
            sink.observe(&Observation::Connection(record));
        }
    }

    /// Whose a tracked connection is. The service port of a socket first seen mid-life is
    /// the local one when this host listened on it then, else the remote one.
    pub(super) fn attribution(&self, entry: &SocketEntry) -> Attribution {
        let endpoints = &entry.endpoints;
        let listening = match (entry.open_side, entry.local_listening) {
            (Some(side), _) => side == Side::Passive,
            (None, Some(listening)) => listening,
            (None, None) => self.local_port_listens(entry),
        };
        let port = if listening { endpoints.sport } else { endpoints.dport };
        Attribution {
            netns: entry.netns,
            cgroup_id: entry.cgroup_id,
            service_port: (port != 0).then_some(port),
            listening,
        }
    }
}
