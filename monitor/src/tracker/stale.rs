//! Tracked sockets the kernel may no longer have. A socket whose last transitions never
//! reached us (the kernel skipped the program for them, or the ring was full) stays tracked
//! in its old state until a new socket is born at its address, which on a quiet host may be
//! never: `tcpmon_connections` would count it forever. Sockets in states the kernel's own
//! timers end are asked about once they have been quiet for long, and forgotten when the
//! kernel has no such socket.

use super::entry::Stamp;
use super::machine::Keep;
use super::{phase, Tracker};
use crate::decode::{Endpoints, TcpState};

/// The states a socket leaves within a bounded time on the kernel's own timers (SYN and
/// SYN-ACK retries, the FIN's retransmissions), so one tracked in them long after its last
/// transition is worth asking the kernel about. ESTABLISHED, CLOSE_WAIT and a FIN_WAIT2 the
/// application holds last as long as the application wants: they are not asked about.
pub const TRANSIENT_STATES: [TcpState; 5] = [
    TcpState::SynSent,
    TcpState::SynRecv,
    TcpState::FinWait1,
    TcpState::Closing,
    TcpState::LastAck,
];

/// A tracked socket to ask the kernel about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Suspect {
    /// Its kernel address: the tracker's key.
    pub skaddr: u64,
    /// Its network namespace, where to ask; 0 when not known (ask in every one).
    pub netns: u32,
    /// What to ask for.
    pub endpoints: Endpoints,
    /// Its tracked state.
    pub state: TcpState,
    /// Its last transition (CLOCK_MONOTONIC ns): the answer applies only if none came since.
    pub last_seen_ns: u64,
}

/// What the tracker did with the kernel's answer about a [`Suspect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    /// The kernel has the socket in the tracked state, or a transition came meanwhile.
    Unchanged,
    /// The kernel has no such socket: the entry is gone.
    Vanished,
    /// The kernel has it in a later state: the entry now says so.
    Moved(TcpState),
}

impl Tracker {
    /// Up to `max` tracked sockets in [`TRANSIENT_STATES`] whose last transition is more than
    /// `quiet_ns` before `now_ns` (a socket first seen mid-life may have no namespace: 0). A
    /// scan of the table, skipped while no socket is in those states.
    pub fn suspects(&self, now_ns: u64, quiet_ns: u64, max: usize) -> Vec<Suspect> {
        let per_state = self.table.per_state();
        if TRANSIENT_STATES.iter().all(|state| per_state[state.index()] == 0) {
            return Vec::new();
        }
        self.table
            .keyed_entries()
            .filter(|(_, entry)| {
                TRANSIENT_STATES.contains(&entry.state)
                    && now_ns.saturating_sub(entry.last_seen_ns) > quiet_ns
            })
            .map(|(skaddr, entry)| Suspect {
                skaddr,
                netns: entry.netns,
                endpoints: entry.endpoints,
                state: entry.state,
                last_seen_ns: entry.last_seen_ns,
            })
            .take(max)
            .collect()
    }

    /// Applies what the kernel said of a suspect's 4-tuple (`found`: the state of the full
    /// socket there, if any), asked after the suspect was taken and with every record
    /// stamped before the answer already applied (a socket's CLOSE is committed before the
    /// kernel unhashes it). An entry that changed since is left alone. A socket found in an
    /// earlier phase than tracked is a new one at that 4-tuple: the tracked one is gone.
    pub fn settle(&mut self, suspect: &Suspect, found: Option<TcpState>) -> Settled {
        let unchanged = self.table.get(suspect.skaddr).is_some_and(|entry| {
            entry.state == suspect.state && entry.last_seen_ns == suspect.last_seen_ns
        });
        if !unchanged {
            return Settled::Unchanged;
        }
        let settled = match found {
            Some(state) if state == suspect.state => Settled::Unchanged,
            Some(state) if phase(state) >= phase(suspect.state) => Settled::Moved(state),
            _ => Settled::Vanished,
        };
        match settled {
            Settled::Unchanged => {}
            Settled::Vanished => {
                // A transient state: no CLOSE_WAIT time was running, so nothing to report.
                self.table.remove(suspect.skaddr);
                self.machine.stats.vanished += 1;
            }
            Settled::Moved(state) => {
                // When it got there is not known: no time in that state will be measured.
                self.table.change_in_place(suspect.skaddr, suspect.state, |entry| {
                    entry.state = state;
                    entry.state_since_ns = Stamp::NONE;
                    Keep::Entry
                });
                self.machine.stats.moved += 1;
            }
        }
        settled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{decode_record, fixture::v4};
    use crate::tracker::{CloseReason, Observation};
    use TcpState::*;

    const S: u64 = 1_000_000_000;
    const NETNS: u32 = 4026531840;

    /// Feeds `(seconds, skaddr, old, new)` transitions of sockets in namespace `netns`
    /// (births and CLOSEs carry it; 0: a namespace never learned), each socket on its own
    /// local port.
    fn feed(tracker: &mut Tracker, netns: u32, steps: &[(u64, u64, TcpState, TcpState)]) {
        let mut out = Vec::new();
        for &(at, sk, old, new) in steps {
            let mut raw = v4(at * S, sk, old, new, 40000 + sk as u16, 80, 0);
            raw.netns = netns;
            tracker.on_event(&decode_record(&raw).unwrap(), &mut out);
        }
    }

    /// Socket `sk` opened at 0 s and closing (FIN_WAIT1) since `at` seconds.
    fn closing_since(sk: u64, at: u64) -> [(u64, u64, TcpState, TcpState); 3] {
        [(0, sk, Close, SynSent), (0, sk, SynSent, Established), (at, sk, Established, FinWait1)]
    }

    #[test]
    fn quiet_sockets_in_transient_states_are_asked_about_and_forgotten_when_gone() {
        let mut tracker = Tracker::default();
        feed(&mut tracker, NETNS, &closing_since(1, 2)); // quiet for 23 s at 25 s
        feed(&mut tracker, NETNS, &closing_since(2, 20)); // quiet for 5 s
        feed(&mut tracker, NETNS, &[(0, 3, Close, SynSent), (1, 3, SynSent, Established)]);
        feed(&mut tracker, 0, &closing_since(4, 2)); // its namespace is not known
        let mut suspects = tracker.suspects(25 * S, 15 * S, 100);
        suspects.sort_by_key(|suspect| suspect.skaddr);
        assert_eq!(suspects.len(), 2, "{suspects:?}");
        assert_eq!((suspects[1].skaddr, suspects[1].netns), (4, 0));
        let suspect = suspects[0];
        assert_eq!((suspect.skaddr, suspect.netns, suspect.state), (1, NETNS, FinWait1));
        assert_eq!(suspect.endpoints.sport, 40001);
        assert_eq!(tracker.suspects(25 * S, 15 * S, 1).len(), 1, "at most `max`");

        assert_eq!(tracker.settle(&suspect, Some(FinWait1)), Settled::Unchanged);
        assert_eq!(tracker.len(), 4);
        assert_eq!(tracker.settle(&suspect, None), Settled::Vanished);
        assert_eq!(tracker.len(), 3);
        assert_eq!(tracker.per_state()[FinWait1.index()], 2); // the quiet 4, and 2
        assert_eq!(tracker.stats().vanished, 1);
        // Asked again, a socket already forgotten changes nothing.
        assert_eq!(tracker.settle(&suspect, None), Settled::Unchanged);
        assert_eq!(tracker.stats().vanished, 1);
    }

    #[test]
    fn an_answer_about_a_socket_that_moved_on_meanwhile_changes_nothing() {
        let mut tracker = Tracker::default();
        feed(&mut tracker, NETNS, &closing_since(1, 2));
        let suspect = tracker.suspects(25 * S, 15 * S, 100)[0];
        // Its FIN was acknowledged after the suspect was taken, before the answer came.
        feed(&mut tracker, NETNS, &[(26, 1, FinWait1, FinWait2)]);
        assert_eq!(tracker.settle(&suspect, None), Settled::Unchanged);
        assert_eq!(tracker.per_state()[FinWait2.index()], 1);
        assert_eq!(tracker.stats().vanished, 0);
    }

    #[test]
    fn a_socket_the_kernel_has_in_a_later_state_is_tracked_in_it() {
        let mut tracker = Tracker::default();
        feed(&mut tracker, NETNS, &closing_since(1, 2));
        let suspect = tracker.suspects(25 * S, 15 * S, 100)[0];
        let mut out = Vec::new();
        assert_eq!(tracker.settle(&suspect, Some(FinWait2)), Settled::Moved(FinWait2));
        assert_eq!(tracker.per_state()[FinWait1.index()], 0);
        assert_eq!(tracker.per_state()[FinWait2.index()], 1);
        assert_eq!(tracker.stats().moved, 1);
        // Its CLOSE now follows the state it is tracked in: an orderly close, no anomaly, and
        // no time in FIN_WAIT2 (when it got there is not known).
        let mut raw = v4(30 * S, 1, FinWait2, Close, 40001, 80, 0);
        raw.netns = NETNS;
        tracker.on_event(&decode_record(&raw).unwrap(), &mut out);
        assert!(out.iter().any(|o| matches!(
            o,
            Observation::Closed { reason: CloseReason::Fin, time_wait: true, .. }
        )));
        assert!(!out.iter().any(|o| matches!(o, Observation::StateLeft { state: FinWait2, .. })));
        assert_eq!(tracker.stats().inconsistent, 0);
        assert!(tracker.is_empty());
    }

    #[test]
    fn a_socket_found_in_an_earlier_phase_is_a_new_one_and_the_tracked_one_is_gone() {
        let mut tracker = Tracker::default();
        feed(&mut tracker, NETNS, &closing_since(1, 2));
        let suspect = tracker.suspects(25 * S, 15 * S, 100)[0];
        assert_eq!(tracker.settle(&suspect, Some(Established)), Settled::Vanished);
        assert!(tracker.is_empty());
    }
}
