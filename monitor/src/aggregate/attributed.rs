//! How the connection series are split by (port, workload) pair: each origin's observations
//! go to the series set of the pair the naming service gave it, remembered per origin; and,
//! a few times per `--label-idle`, the pairs and values nothing uses any more are retired.

use std::time::Instant;

use prometheus::{IntCounter, IntGauge};
use rustc_hash::FxHashMap;

use super::series::SeriesSet;
use crate::metrics::catch_up;
use crate::naming::{InUse, NamingService, Pair, OVERFLOW_PAIR};
use crate::tracker::{Attribution, Tracker};

/// `[port, workload, pair]`: the labels whose values are capped.
pub(super) const CAPPED: [&str; 3] = ["port", "workload", "pair"];

/// Where an origin's observations go: its series set, and which labels were lumped into
/// `other` on the way (counted per observation). Eight bytes, so it stays in a register: as
/// `usize` and `[bool; 3]` it went through the stack, and reading the flags back stalled
/// every observation.
#[derive(Clone, Copy, Debug)]
pub(super) struct Resolved {
    set: u32,
    /// Bit `i` set: `CAPPED[i]` (`[port, workload, pair]`) was lumped into `other`.
    other: u8,
}

impl Resolved {
    pub(super) fn set(self) -> usize {
        self.set as usize
    }
}

/// An origin (service port or 0, listening, cgroup id) in one word, which hashes with one
/// multiplication; `None` for a cgroup id above 2^47 (ids are inode numbers: never seen).
fn packed((port, listening, cgroup_id): (u16, bool, u64)) -> Option<u64> {
    (cgroup_id < 1 << 47).then(|| cgroup_id << 17 | u64::from(listening) << 16 | u64::from(port))
}

/// Most origins remembered by [`Attributed`]; past it the memo starts over (the values
/// given out stay).
const MAX_ORIGINS: usize = 65_536;

/// How the connection series are split: the series set of each (port, workload) pair the
/// naming service gave out, and which set each origin's observations go to.
pub(super) struct Attributed {
    /// The label values; asked once per new origin.
    pub(super) naming: NamingService,
    /// The series of each pair, by the pair's [`crate::naming::Named::index`].
    pub(super) sets: Vec<SeriesSet>,
    /// When each set last recorded an observation (the batch's time).
    active: Vec<Instant>,
    /// The time of the batch being applied.
    pub(super) now: Instant,
    /// When values were last checked for retirement.
    pub(super) swept: Instant,
    /// When the oldest CLOSE_WAIT ages were last refreshed.
    pub(super) aged: Instant,
    /// [`packed`] origins → where they resolved: one lookup per observation instead of three.
    origins: FxHashMap<u64, Resolved>,
    /// The last origin resolved: a connection's observations mostly come in runs.
    last: Option<(u64, Resolved)>,
    /// `[port, workload, pair]` observations lumped into `other`.
    overflow: [u64; 3],
    /// `[port, workload, pair]` values given out and overflow; only with labels.
    pub(super) counts: Option<([IntGauge; 3], [IntCounter; 3])>,
}

impl Attributed {
    /// No pair given out yet; `counts` are the label-value gauges and overflow counters
    /// (`None`: no `port` or `workload` label).
    pub(super) fn new(
        naming: NamingService,
        counts: Option<([IntGauge; 3], [IntCounter; 3])>,
    ) -> Self {
        let now = Instant::now();
        Attributed {
            naming,
            sets: Vec::new(),
            active: Vec::new(),
            now,
            swept: now,
            aged: now,
            origins: FxHashMap::default(),
            last: None,
            overflow: [0; 3],
            counts,
        }
    }

    /// The series set of `whose` (`None`: an observation no connection is known for).
    pub(super) fn set_for(&mut self, whose: Option<&Attribution>) -> &SeriesSet {
        if self.counts.is_none() {
            return &self.sets[0];
        }
        let origin = whose
            .map_or((0, false, 0), |w| (w.service_port.unwrap_or(0), w.listening, w.cgroup_id));
        let key = packed(origin);
        let resolved = match self.last {
            Some((last, resolved)) if Some(last) == key => resolved,
            _ => match key.and_then(|key| self.origins.get(&key)) {
                Some(resolved) => {
                    self.last = key.map(|key| (key, *resolved));
                    *resolved
                }
                None => self.resolve(origin),
            },
        };
        if resolved.other != 0 {
            for (i, count) in self.overflow.iter_mut().enumerate() {
                *count += u64::from(resolved.other >> i & 1);
            }
        }
        self.active[resolved.set()] = self.now;
        &self.sets[resolved.set()]
    }

    /// The set an origin's observations go to, without counting anything.
    pub(super) fn set_of(&mut self, origin: (u16, bool, u64)) -> usize {
        match packed(origin).and_then(|key| self.origins.get(&key)) {
            Some(resolved) => resolved.set(),
            None => self.resolve(origin).set(),
        }
    }

    /// Asks the naming service for the origin's values, gives its pair a series set, and
    /// remembers the answer.
    pub(super) fn resolve(&mut self, origin: (u16, bool, u64)) -> Resolved {
        let (service_port, listening, cgroup_id) = origin;
        let mut naming = self.naming.lock();
        let named = naming.name((service_port != 0).then_some(service_port), listening, cgroup_id);
        // Pairs are numbered as the naming service gives them out, and this is its only
        // user: a new pair is the next set, or takes the number of a retired one.
        if named.fresh {
            let set = SeriesSet::new(naming.pair_values(named.pair));
            if named.index == self.sets.len() {
                self.sets.push(set);
                self.active.push(self.now);
            } else {
                self.sets[named.index] = set;
                self.active[named.index] = self.now;
            }
        }
        drop(naming);
        let other = named.other.iter().enumerate().map(|(i, &lumped)| u8::from(lumped) << i);
        // Set indexes are bounded by the pair cap, far below 2^32.
        let resolved = Resolved { set: named.index as u32, other: other.sum() };
        // Remembered even when the cgroup had no name (it was gone, or there is no cgroup2
        // mount): an origin's observations must all land in one series, or a gauge raised
        // in one would be lowered in another.
        if let Some(key) = packed(origin) {
            if self.origins.len() >= MAX_ORIGINS {
                self.origins.clear();
            }
            self.origins.insert(key, resolved);
            self.last = Some((key, resolved));
        }
        resolved
    }

    /// Retires the pairs idle for `--label-idle` that no tracked socket uses, and then the
    /// values nothing uses any more ([`crate::naming::Naming::retire`]): their series are
    /// removed, so Prometheus marks them stale, and their slots go to the next ones. Every
    /// origin of a tracked socket keeps the set it resolved to (a CLOSE_WAIT gauge raised in
    /// one set must be lowered in the same); other origins are resolved afresh. Returns the
    /// `netns` values retired.
    pub(super) fn retire(&mut self, tracker: &Tracker) -> Vec<String> {
        let mut in_use = InUse::default();
        let mut used = vec![false; self.sets.len()];
        let mut kept = FxHashMap::default();
        tracker.for_each_owner(|whose| {
            in_use.netns.insert(whose.netns);
            in_use.cgroups.insert(whose.cgroup_id);
            if let Some(port) = whose.service_port {
                in_use.ports.insert(port);
                if whose.listening {
                    in_use.listening_ports.insert(port);
                }
            }
            // Only origins already resolved are looked up: asking the naming service here
            // would give values to sockets that have done nothing since the start. The
            // values of the others are kept by their ports and cgroups above.
            let origin = (whose.service_port.unwrap_or(0), whose.listening, whose.cgroup_id);
            if let Some(key) = packed(origin) {
                if let Some(resolved) = self.origins.get(&key) {
                    used[resolved.set()] = true;
                    kept.insert(key, *resolved);
                }
            }
        });
        if self.counts.is_none() {
            // No `port` or `workload` label: one set, never retired; only `netns` values go.
            return self.naming.lock().retire(&[], &in_use);
        }
        let mut naming = self.naming.lock();
        let idle = naming.limits().idle;
        let now = self.now;
        let pairs: FxHashMap<usize, Pair> =
            naming.pairs().map(|(pair, index)| (index, pair)).collect();
        let mut retiring = Vec::new();
        for (index, set) in self.sets.iter().enumerate() {
            let Some(&pair) = pairs.get(&index) else { continue };
            let last = self.active[index];
            if pair != OVERFLOW_PAIR && !used[index] && now.saturating_duration_since(last) >= idle
            {
                set.remove();
                retiring.push((pair, last));
            }
        }
        let netns = naming.retire(&retiring, &in_use);
        drop(naming);
        self.origins = kept;
        self.last = None;
        netns
    }

    /// Adds what the sets recorded since the last flush to the series scrapes read.
    pub(super) fn flush(&self) {
        for set in &self.sets {
            set.flush();
        }
    }

    /// Publishes how many values each capped label has given out, and its overflow.
    pub(super) fn publish(&self) {
        let Some((values, overflows)) = &self.counts else { return };
        let given = self.naming.lock().given();
        for index in 0..CAPPED.len() {
            values[index].set(given[index] as i64);
            catch_up(&overflows[index], self.overflow[index]);
        }
    }
}
