//! Per-socket state machine: turns TCP state transitions into [`Observation`]s.
//!
//! Pure logic, no kernel access: the daemon feeds it decoded events, tests feed it recorded
//! sequences. Sockets are keyed by their kernel address (`skaddr`), never by the 4-tuple,
//! because an active open first reports source port 0 (docs/ARCHITECTURE.md, "Sockets are
//! keyed by address, never by 4-tuple").
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
//!
//! The module's files: [`outcome`] (sides, close reasons, reset directions: the label
//! vocabulary), [`observation`] (what the tracker emits), `entry` (what it remembers per
//! socket), `table` (the socket table with its per-state counts and eviction), `machine`
//! (what a transition does to its socket's entry), `closing` and `listeners` (the ends of
//! connections; listeners and accept queues) and this file, the tracker that puts them
//! together: births, sockets it did not expect, the start-up snapshot.

mod closing;
mod entry;
mod listeners;
mod machine;
mod stale;

pub mod observation;
pub mod outcome;
mod table;

use rustc_hash::{FxHashMap, FxHashSet};

pub use crate::decode::Endpoints;
use crate::decode::{Event, Record, TcpState};
use closing::log_out_of_sequence;
use entry::{elapsed, SocketEntry, Stamp};
use listeners::Listener;
use machine::{Continuity, Keep, Machine};
pub use observation::{
    Attribution, ConnectionPhase, ConnectionRecord, Observation, ObservationSink, Owner,
    RecordingSink, TransitionRecord,
};
pub use outcome::{AbandonReason, CloseReason, ResetDirection, Resets, Side};
pub use stale::{Settled, Suspect, TRANSIENT_STATES};
use table::SocketTable;

/// A TCP socket that existed before the program was attached (from the start-up snapshot):
/// the tracker's input for sockets whose birth it never saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExistingSocket {
    /// Its state then.
    pub state: TcpState,
    /// Its addresses and ports.
    pub endpoints: Endpoints,
    /// Inode of its network namespace.
    pub netns: u32,
    /// The process holding it, when one was found.
    pub owner: Owner,
    /// The cgroup v2 id of that process; 0 when unknown.
    pub cgroup_id: u64,
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
    /// Quiet sockets the kernel no longer had when asked ([`Tracker::settle`]): their last
    /// transitions never reached us.
    pub vanished: u64,
    /// Quiet sockets the kernel had in a later state than tracked.
    pub moved: u64,
}

/// Most request sockets with a resent SYN-ACK remembered at once (a SYN flood makes many; its
/// requests are never established, and the table is bounded), and never more than the
/// socket table's cap.
pub const MAX_PENDING_SYNACKS: usize = 65_536;

/// How long a request socket can still become a connection after its first SYN-ACK: the
/// default 5 retries take ~63 s; allow for `tcp_synack_retries` up to 6.
const SYNACK_HORIZON_NS: u64 = 130 * 1_000_000_000;

/// Default table capacity: ~2× the sockets of a very busy host. Full, the daemon's pipeline
/// peaks at ~280 MiB (the table doubles as it grows), which the systemd unit's
/// `MemoryMax=512M` holds with margin; `monitor/tests/memory.rs` measures it.
pub const DEFAULT_MAX_SOCKETS: usize = 1 << 19;

/// The states whose time a connection spent in them is measured
/// ([`Observation::StateLeft`]). ESTABLISHED is the connection's lifetime, LISTEN a
/// listener's, CLOSE the end; TIME_WAIT and request sockets make no transitions of their own.
pub const TIMED_STATES: [TcpState; 7] = [
    TcpState::SynSent,
    TcpState::SynRecv,
    TcpState::FinWait1,
    TcpState::FinWait2,
    TcpState::CloseWait,
    TcpState::LastAck,
    TcpState::Closing,
];

/// The per-socket state machine: the socket table, and the [`Machine`] that applies each
/// transition to a socket's entry.
#[derive(Debug)]
pub struct Tracker {
    table: SocketTable,
    machine: Machine,
    /// While a snapshot is being taken: the namespace and 4-tuple of every event since the
    /// program was attached, whose sockets the events already describe better than the
    /// snapshot. Namespace 0 (a mid-life event names none) stands for every namespace.
    touched: Option<FxHashSet<(u32, Endpoints)>>,
    /// Entries in CLOSE_WAIT dropped without a transition, to report at the next store.
    gone_close_waits: Vec<SocketEntry>,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker::new(DEFAULT_MAX_SOCKETS)
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

/// A socket's birth ([`monitor_common::is_birth`], the program's own rule).
fn is_birth(event: &Event) -> bool {
    monitor_common::is_birth(event.old as i32, event.new as i32)
}

impl Tracker {
    /// A tracker that holds at most `max_sockets` sockets (at least 1).
    pub fn new(max_sockets: usize) -> Self {
        Tracker {
            table: SocketTable::new(max_sockets),
            machine: Machine {
                listeners: FxHashMap::default(),
                synack_retransmits: FxHashMap::default(),
                listener_ports: FxHashMap::default(),
                synack_pruned_ns: 0,
                accepts_seen: false,
                stats: TrackerStats::default(),
            },
            touched: None,
            gone_close_waits: Vec::new(),
        }
    }

    /// Says that every accept() is reported ([`crate::decode::NoteKind::Accepted`]), so that
    /// a connection closed before one is an abandoned one. A recording's first accept note
    /// says so too.
    pub fn set_accepts_seen(&mut self, seen: bool) {
        self.machine.accepts_seen = seen;
    }

    /// Changes the table's cap (config reload); a lower cap takes effect as sockets are added.
    pub fn set_max_sockets(&mut self, max_sockets: usize) {
        self.table.set_max_sockets(max_sockets);
    }

    /// Sockets currently tracked, snapshot sockets not yet seen in an event included.
    pub fn len(&self) -> usize {
        self.table.len()
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
            let described = touched.contains(&(socket.netns, socket.endpoints))
                || touched.contains(&(0, socket.endpoints));
            if described || self.table.is_full() {
                continue;
            }
            if socket.state == TcpState::Listen {
                let listener =
                    Listener { skaddr: 0, owner: socket.owner, cgroup_id: socket.cgroup_id };
                let key = (socket.netns, socket.endpoints.sport);
                let machine = &mut self.machine;
                if let std::collections::hash_map::Entry::Vacant(slot) =
                    machine.listeners.entry(key)
                {
                    slot.insert(listener);
                    machine.count_listener(socket.endpoints.sport, socket.cgroup_id);
                }
            }
            added += usize::from(self.table.add_existing(*socket));
        }
        added
    }

    /// Tracked sockets per state, indexed by [`TcpState::index`].
    pub fn per_state(&self) -> &[u64; 12] {
        self.table.per_state()
    }

    /// The tracker's own counters.
    pub fn stats(&self) -> TrackerStats {
        TrackerStats { evicted_capacity: self.table.evicted(), ..self.machine.stats }
    }

    /// Applies one decoded ring record.
    pub fn on_record(&mut self, record: &Record, sink: &mut impl ObservationSink) {
        match record {
            Record::State(event) => self.on_event(event, sink),
            Record::Note(note) => self.on_note(note, sink),
            Record::SynAckRetransmit(synack) => self.on_synack_retransmit(synack, sink),
        }
    }

    /// Applies one transition and reports what it completes to `sink`.
    pub fn on_event(&mut self, event: &Event, sink: &mut impl ObservationSink) {
        if let Some(touched) = self.touched.as_mut() {
            touched.insert((event.netns, event.endpoints));
        }
        self.machine.track_listener(event);
        if is_birth(event) {
            self.on_birth(event, sink);
            return;
        }
        // The usual case: the event follows the tracked state, and the entry changes where
        // the table holds it.
        let machine = &mut self.machine;
        let follows = self.table.change_in_place(event.skaddr, event.old, |entry| {
            machine.apply(entry, event, Continuity::Follows, sink)
        });
        if follows {
            return;
        }
        let mut entry = self.entry_for_unexpected(event);
        match self.machine.apply(&mut entry, event, Continuity::Broken, sink) {
            Keep::Entry => self.put(event.skaddr, entry, sink),
            Keep::Nothing => {
                self.table.remove(event.skaddr);
            }
        }
    }

    /// A socket is born: a fresh entry replaces whatever was tracked at its address or its
    /// 4-tuple (their CLOSE was missed).
    #[inline]
    fn on_birth(&mut self, event: &Event, sink: &mut impl ObservationSink) {
        use TcpState::*;
        if let Some(stale) = self.table.remove(event.skaddr) {
            self.machine.stats.replaced_stale += 1;
            if stale.state == CloseWait && !stale.close_wait_ns.is_none() {
                sink.observe_in(&Observation::CloseWaitLeft, &self.machine.attribution(&stale));
            }
        }
        if self.table.has_existing() {
            self.table.take_existing(&event.endpoints, event.netns);
        }
        let (side, owner, cgroup_id) = match event.new {
            Close => return,
            // connect() and listen() run in the caller's context.
            SynSent => (Some(Side::Active), Owner::current(event), 0),
            Listen => (None, Owner::current(event), 0),
            SynRecv => match self.machine.listeners.get(&(event.netns, event.endpoints.sport)) {
                Some(listener) => (Some(Side::Passive), listener.owner, listener.cgroup_id),
                None => (Some(Side::Passive), Owner::UNKNOWN, 0),
            },
            _ => (None, Owner::UNKNOWN, 0),
        };
        let now = Stamp::at(event.timestamp_ns);
        let mut entry = SocketEntry::new(event.new, side, event);
        entry.owner = owner;
        if entry.cgroup_id == 0 {
            entry.cgroup_id = cgroup_id;
        }
        entry.start_ns = now;
        entry.state_since_ns = now;
        if event.new == SynSent {
            entry.syn_sent_ns = now;
        }
        if event.new == Listen {
            let listening = Observation::Listening { port: event.endpoints.sport };
            sink.observe_in(&listening, &self.machine.attribution(&entry));
        }
        if sink.wants_records() {
            sink.observe(&Observation::Transition(entry.transition_record(event, None)));
        }
        self.put(event.skaddr, entry, sink);
    }

    /// The entry an event continues when it does not follow the tracked state. Unknown
    /// sockets and sockets whose events were lost get an entry that only claims what the
    /// event shows.
    #[inline(never)]
    fn entry_for_unexpected(&mut self, event: &Event) -> SocketEntry {
        use TcpState::*;
        match self.table.get(event.skaddr) {
            Some(entry) if phase(event.old) >= phase(entry.state) => {
                // Events were lost in between; every anchor kept is still a real time.
                let entry = *entry;
                self.machine.stats.inconsistent += 1;
                log_out_of_sequence(self.machine.stats.inconsistent, event, entry.state);
                entry
            }
            tracked => {
                // Unknown socket, or a new socket at a reused address whose birth was lost:
                // start from what this event shows, with no anchors.
                if let Some(tracked) = tracked.copied() {
                    if tracked.state == CloseWait && !tracked.close_wait_ns.is_none() {
                        self.gone_close_waits.push(tracked);
                    }
                    let tracked = tracked.state;
                    self.machine.stats.inconsistent += 1;
                    log_out_of_sequence(self.machine.stats.inconsistent, event, tracked);
                    self.machine.stats.replaced_stale += 1;
                } else {
                    self.machine.stats.first_seen_midlife += 1;
                }
                let side = match event.old {
                    SynSent => Some(Side::Active),
                    SynRecv => Some(Side::Passive),
                    _ => None,
                };
                let mut entry = SocketEntry::new(event.old, side, event);
                // A socket from the start-up snapshot: its owner and namespace are known,
                // its birth is not (no handshake, no lifetime).
                let existing = self.table.take_existing_or_twin(&event.endpoints, event.netns);
                if let Some(existing) = existing {
                    entry.owner = existing.owner;
                    entry.netns = existing.netns;
                    if entry.cgroup_id == 0 {
                        entry.cgroup_id = existing.cgroup_id;
                    }
                }
                if side.is_none() {
                    entry.local_listening = Some(self.machine.local_port_listens(&entry));
                }
                entry
            }
        }
    }

    /// Stores an entry; reports the CLOSE_WAIT sockets dropped without a transition (evicted
    /// to make room, or replaced after lost events). Inlined: an entry is 168 bytes, and a
    /// call that takes it by value copies it.
    #[inline(always)]
    fn put(&mut self, skaddr: u64, entry: SocketEntry, sink: &mut impl ObservationSink) {
        self.table.put(skaddr, entry);
        if self.table.has_evicted_close_waits() || !self.gone_close_waits.is_empty() {
            self.report_gone_close_waits(sink);
        }
    }

    /// Whose each tracked socket is, snapshot sockets and listeners included: the label
    /// values retirement must not take ([`crate::naming::Naming::retire`]).
    pub fn for_each_owner(&self, mut owner: impl FnMut(&Attribution)) {
        for entry in self.table.entries() {
            owner(&self.machine.attribution(entry));
        }
        for socket in self.table.existing() {
            let endpoints = &socket.endpoints;
            let listening = self.machine.listener_ports.contains_key(&endpoints.sport);
            let port = if listening { endpoints.sport } else { endpoints.dport };
            owner(&Attribution {
                netns: socket.netns,
                cgroup_id: socket.cgroup_id,
                service_port: (port != 0).then_some(port),
                listening,
            });
        }
        for (&(netns, port), listener) in &self.machine.listeners {
            let service_port = Some(port);
            owner(&Attribution {
                netns,
                cgroup_id: listener.cgroup_id,
                service_port,
                listening: true,
            });
        }
    }

    /// Every connection now in CLOSE_WAIT that was seen entering it: whose it is, and since
    /// when (CLOCK_MONOTONIC ns).
    pub fn for_each_close_wait(&self, mut close_wait: impl FnMut(&Attribution, u64)) {
        for (entry, since) in self.close_waits() {
            close_wait(&self.machine.attribution(entry), since);
        }
    }

    /// A record of every connection now in CLOSE_WAIT that was seen entering it, at `now_ns`:
    /// its `close_wait_ns` is how long it has waited so far.
    pub fn close_wait_records(&self, now_ns: u64) -> Vec<ConnectionRecord> {
        let record = |(entry, since): (&SocketEntry, u64)| {
            let mut record = entry.connection_record(ConnectionPhase::CloseWait, now_ns, None);
            record.close_wait_ns = Some(elapsed(since, now_ns));
            record
        };
        self.close_waits().map(record).collect()
    }

    /// The connections now in CLOSE_WAIT that were seen entering it, with since when.
    fn close_waits(&self) -> impl Iterator<Item = (&SocketEntry, u64)> {
        let waiting = self.table.entries().filter(|entry| entry.state == TcpState::CloseWait);
        waiting.filter_map(|entry| Some((entry, entry.close_wait_ns.get()?)))
    }
}

#[cfg(test)]
mod tests;
