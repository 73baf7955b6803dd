//! What the tracker remembers per socket, kept small: a million of them fit the memory
//! budget (BENCHMARKS.md).

use super::observation::{ConnectionPhase, ConnectionRecord, Owner, TransitionRecord};
use super::outcome::{CloseReason, Resets, Side};
use crate::decode::{Endpoints, Event, TcpState};

/// A CLOCK_MONOTONIC time (or a duration) that may be unknown, in 8 bytes where
/// `Option<u64>` takes 16: stored plus one in a `NonZeroU64`. Seven of these per socket keep
/// the table within its memory budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Stamp(Option<std::num::NonZeroU64>);

impl Stamp {
    pub(super) const NONE: Stamp = Stamp(None);

    pub(super) fn at(ns: u64) -> Stamp {
        Stamp(std::num::NonZeroU64::new(ns.wrapping_add(1)))
    }

    pub(super) fn get(self) -> Option<u64> {
        self.0.map(|stored| stored.get() - 1)
    }

    pub(super) fn is_none(self) -> bool {
        self.0.is_none()
    }
}

/// How long an accepted connection waited in its listener's accept queue, in µs (up to
/// ~71 minutes), in 4 bytes: `None` until the application's accept() was seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct AcceptWait(Option<std::num::NonZeroU32>);

impl AcceptWait {
    /// Accepted after `wait_ns` in the queue.
    pub(super) fn of(wait_ns: u64) -> AcceptWait {
        let us = (wait_ns / 1_000).min(u64::from(u32::MAX - 1)) as u32;
        AcceptWait(std::num::NonZeroU32::new(us + 1))
    }

    pub(super) fn accepted(self) -> bool {
        self.0.is_some()
    }

    /// Nanoseconds (µs precision), when accepted.
    pub(super) fn ns(self) -> Option<u64> {
        self.0.map(|stored| u64::from(stored.get() - 1) * 1_000)
    }
}

/// Nanoseconds from `from` to `to`; 0 if `to` is earlier (clocks of two CPUs).
pub(super) fn elapsed(from: u64, to: u64) -> u64 {
    to.saturating_sub(from)
}

/// The timestamps of the transitions that start the intervals we measure, and the socket's
/// identity. Every anchor is a transition actually seen. When events are lost, a socket
/// whose next event does not follow its tracked state keeps only anchors that are still
/// valid, so it reports fewer intervals rather than wrong ones. One case cannot be told
/// apart: a socket's CLOSE *and* the birth of a new socket at the same kernel address both
/// lost, with the new socket's next transition happening to follow the old one's state. Loss
/// is visible in `tcpmon_events_lost_total`.
#[derive(Clone, Copy, Debug)]
pub(super) struct SocketEntry {
    pub(super) state: TcpState,
    /// When the socket entered `state`; `None` when that transition was not seen.
    pub(super) state_since_ns: Stamp,
    /// The first transition seen (birth), `None` for sockets first seen mid-life.
    pub(super) start_ns: Stamp,
    pub(super) owner: Owner,
    pub(super) endpoints: Endpoints,
    /// How the connection was opened, when known.
    pub(super) open_side: Option<Side>,
    /// CLOSE → SYN_SENT time (active opens only).
    pub(super) syn_sent_ns: Stamp,
    /// SYN or SYN-ACK retransmissions, once known.
    pub(super) handshake_retransmits: Option<u32>,
    /// Accepted while the accept queue was full: a SYN-ACK was resent after the client's ACK.
    pub(super) accept_queue_full: bool,
    /// Passive: the wait from the accept queue to the application's accept().
    pub(super) accept_wait: AcceptWait,
    /// Handshake duration, once established.
    pub(super) handshake_ns: Stamp,
    pub(super) established_ns: Stamp,
    /// For a socket first seen mid-life (no `open_side`): whether its local port had a
    /// listener then. Decided once, so its observations stay in one series.
    pub(super) local_listening: Option<bool>,
    /// Network namespace inode; 0 until a record carried it.
    pub(super) netns: u32,
    /// The socket's cgroup v2 id; 0 until a record carried it.
    pub(super) cgroup_id: u64,
    pub(super) resets: Resets,
    /// Who sent the first FIN, and when (apart: an `Option<(Side, u64)>` takes 16 bytes).
    pub(super) first_fin_side: Option<Side>,
    pub(super) first_fin_ns: Stamp,
    pub(super) close_wait_ns: Stamp,
    /// CLOSE_WAIT → LAST_ACK time.
    pub(super) close_wait_until_ns: Stamp,
    pub(super) last_seen_ns: u64,
}

impl SocketEntry {
    /// An entry in `state` with nothing known but what `event` carries.
    pub(super) fn new(state: TcpState, open_side: Option<Side>, event: &Event) -> Self {
        SocketEntry {
            state,
            state_since_ns: Stamp::NONE,
            start_ns: Stamp::NONE,
            owner: Owner::UNKNOWN,
            endpoints: event.endpoints,
            open_side,
            syn_sent_ns: Stamp::NONE,
            handshake_retransmits: None,
            accept_queue_full: false,
            accept_wait: AcceptWait::default(),
            handshake_ns: Stamp::NONE,
            established_ns: Stamp::NONE,
            local_listening: None,
            netns: event.netns,
            cgroup_id: event.cgroup_id,
            resets: Resets::default(),
            first_fin_side: None,
            first_fin_ns: Stamp::NONE,
            close_wait_ns: Stamp::NONE,
            close_wait_until_ns: Stamp::NONE,
            last_seen_ns: event.timestamp_ns,
        }
    }

    /// The first FIN of an orderly close, when seen: who sent it, and when.
    pub(super) fn first_fin(&self) -> Option<(Side, u64)> {
        self.first_fin_side.zip(self.first_fin_ns.get())
    }

    fn netns(&self) -> Option<u32> {
        (self.netns != 0).then_some(self.netns)
    }

    fn cgroup_id(&self) -> Option<u64> {
        (self.cgroup_id != 0).then_some(self.cgroup_id)
    }

    /// Takes what `event` tells of the socket's namespace and cgroup (birth and CLOSE
    /// records carry them).
    pub(super) fn learn_origin(&mut self, event: &Event) {
        if event.netns != 0 {
            self.netns = event.netns;
        }
        if event.cgroup_id != 0 {
            self.cgroup_id = event.cgroup_id;
        }
    }

    /// The tail's record of `event` on this socket.
    pub(super) fn transition_record(
        &self,
        event: &Event,
        in_old_ns: Option<u64>,
    ) -> TransitionRecord {
        TransitionRecord {
            time_ns: event.timestamp_ns,
            side: self.open_side,
            owner: self.owner,
            endpoints: self.endpoints,
            netns: self.netns(),
            cgroup_id: self.cgroup_id(),
            old: event.old,
            new: event.new,
            in_old_ns,
        }
    }

    /// The tail's record of this connection at `now`, with what the entry knows (the caller
    /// adds what only the closing transition tells).
    pub(super) fn connection_record(
        &self,
        phase: ConnectionPhase,
        now: u64,
        outcome: Option<CloseReason>,
    ) -> ConnectionRecord {
        let close_wait_ns = match (self.close_wait_ns.get(), self.close_wait_until_ns.get()) {
            (Some(since), Some(until)) => Some(elapsed(since, until)),
            _ => None,
        };
        ConnectionRecord {
            phase,
            start_ns: self.start_ns.get(),
            time_ns: now,
            side: self.open_side,
            owner: self.owner,
            endpoints: self.endpoints,
            handshake_ns: self.handshake_ns.get(),
            handshake_retransmits: self.handshake_retransmits,
            accept_queue_full: self.accept_queue_full,
            accept_wait_ns: self.accept_wait.ns(),
            netns: self.netns(),
            cgroup_id: self.cgroup_id(),
            stats: None,
            lifetime_ns: None,
            teardown: None,
            close_wait_ns,
            outcome,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tracked_socket_stays_small() {
        // The table's memory budget (≤ 256 bytes per socket with the hash table's own
        // overhead, see BENCHMARKS.md) leaves about 168 bytes for the entry (168 today).
        let size = std::mem::size_of::<SocketEntry>();
        assert!(size <= 168, "SocketEntry is {size} bytes");
        assert_eq!(Stamp::at(0).get(), Some(0));
        assert_eq!(Stamp::at(u64::MAX - 1).get(), Some(u64::MAX - 1));
        assert_eq!(Stamp::NONE.get(), None);
    }
}
