//! Listeners, their request sockets and their accept queues: who owns an accepted connection
//! (the listener's owner and cgroup, learned at `listen()` or from the start-up snapshot),
//! when its handshake began (the SYN-ACK notes, and the child's first RTT sample), and how
//! long it waited for the application's accept() (the accept notes), or that it never got it.

use super::entry::{elapsed, AcceptWait, SocketEntry};
use super::{
    AbandonReason, Attribution, CloseReason, Machine, Observation, ObservationSink, Owner,
    ResetDirection, Side, Tracker, MAX_PENDING_SYNACKS, SYNACK_HORIZON_NS,
};
use crate::decode::{Endpoints, Event, Note, NoteKind, SynAckRetransmitted, TcpState, TcpStats};

/// A request socket that resent its SYN-ACK, until its child is established.
#[derive(Clone, Copy, Debug)]
pub(super) struct PendingSynAck {
    /// CLOCK_MONOTONIC ns of its first SYN-ACK.
    pub(super) first_ns: u64,
    /// Some retransmission was sent after the client's ACK: the accept queue was full.
    pub(super) client_acked: bool,
}

/// A listening socket, as accepted children need it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Listener {
    /// The kernel address; 0 for listeners from the snapshot.
    pub(super) skaddr: u64,
    pub(super) owner: Owner,
    /// Its cgroup: the children's unless their records carry their own.
    pub(super) cgroup_id: u64,
}

impl Tracker {
    /// Counts a SYN-ACK retransmission for its listening port, and remembers when the
    /// request socket sent its first one and whether the client had already answered.
    pub fn on_synack_retransmit(
        &mut self,
        synack: &SynAckRetransmitted,
        sink: &mut impl ObservationSink,
    ) {
        let port = synack.endpoints.sport;
        let whose = Attribution {
            netns: 0,
            cgroup_id: self.machine.listener_ports.get(&port).map_or(0, |(_, cgroup)| *cgroup),
            service_port: Some(port),
            listening: true,
        };
        let client_acked = synack.client_acked;
        sink.observe_in(&Observation::SynAckRetransmitted { client_acked }, &whose);
        let Some(first) = synack.first_synack_ns else { return };
        let cap = MAX_PENDING_SYNACKS.min(self.table.max_sockets());
        if self.machine.synack_retransmits.len() >= cap
            && !self.machine.synack_retransmits.contains_key(&synack.endpoints)
        {
            // Requests give up after net.ipv4.tcp_synack_retries (5: ~63 s): older ones
            // never become connections. Scan at most once a second, so a sustained flood
            // costs a lookup per record, not a scan.
            if synack.timestamp_ns >= self.machine.synack_pruned_ns.saturating_add(1_000_000_000) {
                self.machine.synack_pruned_ns = synack.timestamp_ns;
                let horizon = synack.timestamp_ns.saturating_sub(SYNACK_HORIZON_NS);
                self.machine.synack_retransmits.retain(|_, pending| pending.first_ns >= horizon);
            }
            if self.machine.synack_retransmits.len() >= cap {
                self.machine.stats.synack_untracked += 1;
                return;
            }
        }
        let pending = self
            .machine
            .synack_retransmits
            .entry(synack.endpoints)
            .or_insert(PendingSynAck { first_ns: first, client_acked: false });
        pending.client_acked |= client_acked;
    }

    /// Applies a socket note: facts the state transitions do not carry.
    pub fn on_note(&mut self, note: &Note, sink: &mut impl ObservationSink) {
        match note.kind {
            NoteKind::Accepted => self.on_accept(note, sink),
            NoteKind::ResetSent | NoteKind::ResetReceived => {
                let direction = if note.kind == NoteKind::ResetReceived {
                    ResetDirection::Received
                } else {
                    ResetDirection::Sent
                };
                let reset = Observation::Reset { direction };
                let Some(mut entry) = self.table.get(note.skaddr).copied() else {
                    sink.observe(&reset);
                    return;
                };
                sink.observe_in(&reset, &self.machine.attribution(&entry));
                // A listener answering a bad segment is not closing: only flag connections.
                if entry.state != TcpState::Listen {
                    match direction {
                        ResetDirection::Sent => entry.resets.sent = true,
                        ResetDirection::Received => entry.resets.received = true,
                    }
                    self.put(note.skaddr, entry, sink);
                }
            }
        }
    }

    /// The application's accept() returned a passive child: it waited in the queue from its
    /// ESTABLISHED (`tcp_check_req()` queues the child, then `tcp_child_process()` makes it
    /// ESTABLISHED, microseconds apart, both before accept() can see it), or from its birth
    /// for a TCP Fast Open child, which is queued (and may be accepted) in SYN_RECV.
    fn on_accept(&mut self, note: &Note, sink: &mut impl ObservationSink) {
        self.machine.accepts_seen = true;
        let Some(mut entry) = self.table.get(note.skaddr).copied() else { return };
        if entry.open_side != Some(Side::Passive) || entry.accept_wait.accepted() {
            return;
        }
        let Some(queued) = entry.established_ns.get().or(entry.start_ns.get()) else { return };
        let wait_ns = elapsed(queued, note.timestamp_ns);
        entry.accept_wait = AcceptWait::of(wait_ns);
        sink.observe_in(&Observation::Accepted { wait_ns }, &self.machine.attribution(&entry));
        self.put(note.skaddr, entry, sink);
    }
}

impl Machine {
    /// Why an established passive child closing now left its accept queue unaccepted, or
    /// `None` when it was accepted or that is not known: accept() calls are not seen, the
    /// child was first seen mid-life, or the application closed it (a FIN or RST of its
    /// own needs the socket, so it was accepted: through io_uring, which the accept program
    /// does not see). Its listener's CLOSE comes first when the listener takes it down:
    /// `__tcp_close()` sets the listener's state, then `inet_csk_listen_stop()` disconnects
    /// each queued child.
    pub(super) fn abandoned(
        &self,
        entry: &SocketEntry,
        event: &Event,
        reason: CloseReason,
    ) -> Option<AbandonReason> {
        let queued = self.accepts_seen
            && entry.open_side == Some(Side::Passive)
            && !entry.accept_wait.accepted()
            && !entry.start_ns.is_none()
            && matches!(event.old, TcpState::Established | TcpState::CloseWait);
        if !queued {
            return None;
        }
        let listener = (entry.netns, entry.endpoints.sport);
        Some(if !self.listeners.contains_key(&listener) {
            AbandonReason::ListenerClosed
        } else if reason == CloseReason::ResetReceived {
            AbandonReason::Reset
        } else {
            AbandonReason::Other
        })
    }

    /// First SYN-ACK → final ACK of an accepted child at SYN_RECV → ESTABLISHED (see the
    /// module docs), and whether a SYN-ACK was resent after the client's ACK (the accept
    /// queue was full).
    pub(super) fn passive_handshake(
        &mut self,
        endpoints: &Endpoints,
        stats: Option<&TcpStats>,
        now: u64,
    ) -> (Option<u64>, bool) {
        // An entry older than any request can live is another connection's.
        let resent = self
            .synack_retransmits
            .remove(endpoints)
            .filter(|pending| now.saturating_sub(pending.first_ns) <= SYNACK_HORIZON_NS);
        let queue_full = resent.is_some_and(|pending| pending.client_acked);
        let duration = match stats {
            Some(stats) if stats.total_retrans == 0 && stats.srtt_us_x8 != 0 => {
                Some(u64::from(stats.srtt_us_x8 >> 3) * 1_000)
            }
            Some(stats) if stats.total_retrans > 0 => {
                resent.map(|pending| elapsed(pending.first_ns, now))
            }
            _ => None,
        };
        (duration, queue_full)
    }

    pub(super) fn track_listener(&mut self, event: &Event) {
        let key = (event.netns, event.endpoints.sport);
        match (event.old, event.new) {
            (TcpState::Close, TcpState::Listen) => {
                let owner = Owner::current(event);
                let listener = Listener { skaddr: event.skaddr, owner, cgroup_id: event.cgroup_id };
                if self.listeners.insert(key, listener).is_none() {
                    self.count_listener(event.endpoints.sport, event.cgroup_id);
                }
            }
            // The listener itself closes (0: one from the snapshot, whose address is unknown).
            (TcpState::Listen, TcpState::Close)
                if self
                    .listeners
                    .get(&key)
                    .is_some_and(|listener| [0, event.skaddr].contains(&listener.skaddr)) =>
            {
                self.listeners.remove(&key);
                let port = event.endpoints.sport;
                if let Some((count, _)) = self.listener_ports.get_mut(&port) {
                    *count -= 1;
                    if *count == 0 {
                        self.listener_ports.remove(&port);
                    }
                }
            }
            _ => {}
        }
    }

    /// One more listener on `port`, in cgroup `cgroup_id`.
    pub(super) fn count_listener(&mut self, port: u16, cgroup_id: u64) {
        let (count, cgroup) = self.listener_ports.entry(port).or_insert((0, 0));
        *count += 1;
        *cgroup = cgroup_id;
    }

    /// Whether the socket's local port has a listener: in its namespace when known, in any
    /// otherwise (records carry the namespace only at birth and CLOSE).
    pub(super) fn local_port_listens(&self, entry: &SocketEntry) -> bool {
        let port = entry.endpoints.sport;
        match entry.netns {
            0 => self.listener_ports.contains_key(&port),
            netns => self.listeners.contains_key(&(netns, port)),
        }
    }
}
