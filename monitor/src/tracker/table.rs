//! The per-socket table: tracked sockets by kernel address, the sockets of the start-up
//! snapshot not yet seen in an event (by 4-tuple and namespace: `sock_diag` does not give the
//! kernel address, and on a container host every pod's namespace can hold the same 4-tuple),
//! the count of sockets per state, and eviction at the cap. Every change goes
//! through here, so the per-state counts (the `tcpmon_connections{state}` gauges) always
//! equal the table's contents.

use rustc_hash::FxHashMap;

use super::entry::SocketEntry;
use super::{ExistingSocket, Keep};
use crate::decode::{Endpoints, TcpState};

/// Tracked sockets, at most `max_sockets` of them.
#[derive(Debug)]
pub(super) struct SocketTable {
    entries: FxHashMap<u64, SocketEntry>,
    /// Snapshot sockets by 4-tuple, one per namespace that holds it.
    existing: FxHashMap<Endpoints, Vec<ExistingSocket>>,
    existing_count: usize,
    per_state: [u64; TcpState::ALL.len()],
    max_sockets: usize,
    evicted: u64,
    evicted_close_waits: Vec<SocketEntry>,
}

impl SocketTable {
    /// An empty table that holds at most `max_sockets` sockets (at least 1).
    pub(super) fn new(max_sockets: usize) -> Self {
        SocketTable {
            entries: FxHashMap::default(),
            existing: FxHashMap::default(),
            existing_count: 0,
            per_state: [0; TcpState::ALL.len()],
            max_sockets: max_sockets.max(1),
            evicted: 0,
            evicted_close_waits: Vec::new(),
        }
    }

    /// Changes the cap; a lower one takes effect as sockets are added.
    pub(super) fn set_max_sockets(&mut self, max_sockets: usize) {
        self.max_sockets = max_sockets.max(1);
    }

    /// The cap.
    pub(super) fn max_sockets(&self) -> usize {
        self.max_sockets
    }

    /// Sockets tracked, snapshot sockets not yet seen in an event included.
    pub(super) fn len(&self) -> usize {
        self.entries.len() + self.existing_count
    }

    /// Whether adding a socket would evict others.
    pub(super) fn is_full(&self) -> bool {
        self.len() >= self.max_sockets
    }

    /// Entries the table holds before it grows (it doubles, rehashing every entry).
    pub(super) fn capacity(&self) -> usize {
        self.entries.capacity()
    }

    /// Sockets per state, indexed by [`TcpState::index`].
    pub(super) fn per_state(&self) -> &[u64; TcpState::ALL.len()] {
        &self.per_state
    }

    /// Sockets evicted to make room so far.
    pub(super) fn evicted(&self) -> u64 {
        self.evicted
    }

    /// The entry of the socket at kernel address `skaddr`.
    pub(super) fn get(&self, skaddr: u64) -> Option<&SocketEntry> {
        self.entries.get(&skaddr)
    }

    /// Stores `entry` for `skaddr`, replacing what was there; evicts others when the table
    /// is full and `skaddr` is new.
    #[inline]
    pub(super) fn put(&mut self, skaddr: u64, entry: SocketEntry) {
        if let Some(slot) = self.entries.get_mut(&skaddr) {
            self.per_state[slot.state.index()] -= 1;
            self.per_state[entry.state.index()] += 1;
            *slot = entry;
            return;
        }
        if self.is_full() {
            if self.existing_count > self.entries.len() {
                self.evict_existing();
            } else {
                self.evict_oldest();
            }
        }
        self.per_state[entry.state.index()] += 1;
        self.entries.insert(skaddr, entry);
    }

    /// Lets `change` update the entry at `skaddr` where it is, if that socket is tracked in
    /// `state`; the per-state counts follow its new state, and an entry `change` says is
    /// closed is forgotten. Returns false, having done nothing, when no entry at `skaddr`
    /// is in `state`.
    #[inline]
    pub(super) fn change_in_place(
        &mut self,
        skaddr: u64,
        state: TcpState,
        change: impl FnOnce(&mut SocketEntry) -> Keep,
    ) -> bool {
        let Some(entry) = self.entries.get_mut(&skaddr).filter(|entry| entry.state == state) else {
            return false;
        };
        let kept = change(entry);
        self.per_state[state.index()] -= 1;
        match kept {
            Keep::Entry => self.per_state[entry.state.index()] += 1,
            Keep::Nothing => {
                self.entries.remove(&skaddr);
            }
        }
        true
    }

    /// Forgets the socket at `skaddr`; returns its entry.
    #[inline]
    pub(super) fn remove(&mut self, skaddr: u64) -> Option<SocketEntry> {
        let entry = self.entries.remove(&skaddr)?;
        self.per_state[entry.state.index()] -= 1;
        Some(entry)
    }

    /// Every tracked entry.
    pub(super) fn entries(&self) -> impl Iterator<Item = &SocketEntry> {
        self.entries.values()
    }

    /// Every tracked entry, with its kernel address.
    pub(super) fn keyed_entries(&self) -> impl Iterator<Item = (u64, &SocketEntry)> {
        self.entries.iter().map(|(&skaddr, entry)| (skaddr, entry))
    }

    /// Every snapshot socket not yet seen in an event.
    pub(super) fn existing(&self) -> impl Iterator<Item = &ExistingSocket> {
        self.existing.values().flatten()
    }

    /// Whether snapshot sockets are still waiting for their first event.
    pub(super) fn has_existing(&self) -> bool {
        self.existing_count > 0
    }

    /// Takes a snapshot socket with these endpoints, if one is waiting: the one in namespace
    /// `netns` when the event names it (a socket's birth and CLOSE do), else any. Mid-life
    /// events carry no namespace, so among identical 4-tuples in several namespaces the
    /// owner taken may be a twin's (see [`Self::take_existing_or_twin`] for the counts).
    pub(super) fn take_existing(
        &mut self,
        endpoints: &Endpoints,
        netns: u32,
    ) -> Option<ExistingSocket> {
        let group = self.existing.get_mut(endpoints)?;
        let at = match netns {
            0 => group.len().checked_sub(1)?,
            _ => group.iter().position(|socket| socket.netns == netns)?,
        };
        let socket = group.swap_remove(at);
        if group.is_empty() {
            self.existing.remove(endpoints);
        }
        self.existing_count -= 1;
        self.per_state[socket.state.index()] -= 1;
        Some(socket)
    }

    /// [`Self::take_existing`] for a socket's first event seen: a CLOSE that finds no twin in
    /// its namespace takes another's, because a mid-life event of that other socket may
    /// have taken its own. Every event thus takes one snapshot socket while any is left with
    /// its 4-tuple, and the per-state counts stay exact. (A birth must not: a new socket in
    /// another namespace is not the end of a snapshot one.)
    pub(super) fn take_existing_or_twin(
        &mut self,
        endpoints: &Endpoints,
        netns: u32,
    ) -> Option<ExistingSocket> {
        match self.take_existing(endpoints, netns) {
            None if netns != 0 => self.take_existing(endpoints, 0),
            taken => taken,
        }
    }

    /// Adds a snapshot socket (the caller checks [`Self::is_full`]). Returns false when it
    /// replaced one with the same 4-tuple in the same namespace.
    pub(super) fn add_existing(&mut self, socket: ExistingSocket) -> bool {
        self.per_state[socket.state.index()] += 1;
        let group = self.existing.entry(socket.endpoints).or_default();
        match group.iter_mut().find(|old| old.netns == socket.netns) {
            Some(old) => {
                self.per_state[old.state.index()] -= 1;
                *old = socket;
                false
            }
            None => {
                group.push(socket);
                self.existing_count += 1;
                true
            }
        }
    }

    /// Makes room by dropping 1/16 (at least one) of the snapshot sockets not seen since the
    /// start: they have no activity time to order them by.
    fn evict_existing(&mut self) {
        let count = (self.existing_count / 16).max(1);
        let mut dropped = 0;
        while dropped < count {
            let Some(key) = self.existing.keys().next().copied() else { break };
            for socket in self.existing.remove(&key).unwrap_or_default() {
                self.per_state[socket.state.index()] -= 1;
                self.existing_count -= 1;
                dropped += 1;
            }
        }
        self.evicted += dropped as u64;
    }

    /// Makes room by evicting the least recently updated 1/16 of the table (at least one).
    /// A scan, but only when the table is full, and it frees many slots at once.
    fn evict_oldest(&mut self) {
        let count = (self.entries.len() / 16).max(1);
        let mut ages: Vec<(u64, u64)> =
            self.entries.iter().map(|(key, entry)| (entry.last_seen_ns, *key)).collect();
        ages.select_nth_unstable(count - 1);
        for &(_, key) in &ages[..count] {
            if let Some(entry) = self.remove(key) {
                if entry.state == TcpState::CloseWait && !entry.close_wait_ns.is_none() {
                    self.evicted_close_waits.push(entry);
                }
            }
        }
        self.evicted += count as u64;
    }

    /// Whether evictions left entries in CLOSE_WAIT to report.
    #[inline]
    pub(super) fn has_evicted_close_waits(&self) -> bool {
        !self.evicted_close_waits.is_empty()
    }

    /// Evicted entries that were in CLOSE_WAIT since the last call (the tracker reports them
    /// as gone from CLOSE_WAIT, or its per-port gauge would keep them forever).
    pub(super) fn take_evicted_close_waits(&mut self) -> Vec<SocketEntry> {
        std::mem::take(&mut self.evicted_close_waits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{decode_record, fixture::v4};
    use crate::tracker::Owner;
    use TcpState::*;

    fn entry(state: TcpState, last_seen_ns: u64) -> SocketEntry {
        let event = decode_record(&v4(last_seen_ns, 1, Close, SynSent, 40000, 80, 0)).unwrap();
        SocketEntry { state, ..SocketEntry::new(state, None, &event) }
    }

    fn existing(state: TcpState, port: u16) -> ExistingSocket {
        ExistingSocket {
            state,
            endpoints: Endpoints::new(
                "127.0.0.1:80".parse().unwrap(),
                format!("127.0.0.1:{port}").parse().unwrap(),
            ),
            netns: 1,
            owner: Owner::UNKNOWN,
            cgroup_id: 0,
        }
    }

    /// The per-state counts, recounted from the contents.
    fn recount(table: &SocketTable) -> [u64; 12] {
        let mut counts = [0; 12];
        for entry in table.entries.values() {
            counts[entry.state.index()] += 1;
        }
        for socket in table.existing() {
            counts[socket.state.index()] += 1;
        }
        counts
    }

    #[test]
    fn the_counts_follow_every_change() {
        let mut table = SocketTable::new(8);
        table.put(1, entry(SynSent, 1));
        table.put(1, entry(Established, 2));
        table.put(2, entry(Listen, 3));
        assert!(table.add_existing(existing(Established, 1)));
        assert!(!table.add_existing(existing(CloseWait, 1)), "same 4-tuple and netns: replaced");
        assert!(table.add_existing(existing(FinWait2, 2)));
        assert_eq!(table.per_state(), &recount(&table));
        assert_eq!((table.per_state()[Established.index()], table.len()), (1, 4));

        assert_eq!(
            table.take_existing(&existing(CloseWait, 1).endpoints, 0).unwrap().state,
            CloseWait
        );
        assert!(table.take_existing(&existing(CloseWait, 1).endpoints, 0).is_none());
        assert_eq!(table.remove(1).unwrap().state, Established);
        assert!(table.remove(1).is_none());
        assert_eq!(table.per_state(), &recount(&table));
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn the_same_4_tuple_in_many_namespaces_is_one_socket_each() {
        let mut table = SocketTable::new(1000);
        let in_netns = |netns| ExistingSocket { netns, ..existing(Listen, 8080) };
        for netns in 1..=300 {
            assert!(table.add_existing(in_netns(netns)));
        }
        assert_eq!((table.len(), table.per_state()[Listen.index()]), (300, 300));
        let endpoints = in_netns(1).endpoints;
        // A close names its namespace: that one goes; a namespace without it takes none.
        assert_eq!(table.take_existing(&endpoints, 7).unwrap().netns, 7);
        assert!(table.take_existing(&endpoints, 7).is_none());
        assert!(table.take_existing(&endpoints, 301).is_none());
        // A mid-life event names none: one of them goes, the count stays exact.
        assert!(table.take_existing(&endpoints, 0).is_some());
        assert_eq!(table.per_state()[Listen.index()], 298);
        assert_eq!(table.per_state(), &recount(&table));
        while table.take_existing(&endpoints, 0).is_some() {}
        assert_eq!((table.len(), table.has_existing()), (0, false));

        // Twins in 1 and 2: namespace 1's socket is first seen mid-life and takes 2's entry;
        // namespace 2's socket then closes, names 2, finds none of its own and takes 1's.
        table.add_existing(in_netns(1));
        table.add_existing(in_netns(2));
        assert_eq!(table.take_existing_or_twin(&endpoints, 0).unwrap().netns, 2);
        assert_eq!(table.take_existing_or_twin(&endpoints, 2).unwrap().netns, 1);
        assert_eq!((table.len(), table.per_state()[Listen.index()]), (0, 0));
        assert!(table.take_existing_or_twin(&endpoints, 2).is_none());
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_seen() {
        let mut table = SocketTable::new(32);
        for sk in 0..32 {
            table.put(sk, entry(Established, 100 + sk));
        }
        assert!(table.is_full());
        table.put(1000, entry(SynSent, 1000));
        // 1/16 of 32 went, the two seen longest ago.
        assert_eq!((table.len(), table.evicted()), (31, 2));
        assert!(table.get(0).is_none() && table.get(1).is_none() && table.get(2).is_some());
        assert_eq!(table.per_state(), &recount(&table));
        // Replacing an entry never evicts.
        table.put(1000, entry(Established, 1001));
        assert_eq!(table.evicted(), 2);
    }

    #[test]
    fn snapshot_sockets_go_first_when_they_are_the_majority() {
        let mut table = SocketTable::new(4);
        for port in 1..=3 {
            table.add_existing(existing(Established, port));
        }
        table.put(7, entry(SynSent, 1));
        table.put(8, entry(SynSent, 2));
        assert_eq!((table.len(), table.evicted()), (4, 1));
        assert!(table.get(7).is_some() && table.get(8).is_some());
        assert_eq!(table.per_state(), &recount(&table));
    }
}
