//! The one naming service: every value a capped label takes — `port`, `workload`, `netns`,
//! and the (port, workload) pairs that get series of their own — is given out here, once,
//! and every family that uses a label shares its values: the aggregator's connection series,
//! the scrape-time kernel state ([`crate::netstate`]) and the tail's workload names. So one
//! namespace or port is never named in one family and `other` in another.
//!
//! The daemon makes one [`NamingService`] and hands clones of it to the aggregator, the
//! kernel-state collector and the pipeline (for the tail). The aggregator asks it once per
//! new origin (it remembers the answer), so the drain path locks it rarely.

pub mod labels;
pub mod workload;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use rustc_hash::{FxHashMap, FxHashSet};

use labels::{LabelLimits, PortLabels, ValueIndex, WorkloadLabels, OTHER_INDEX, UNKNOWN_INDEX};
use workload::Workloads;

/// A (port, workload) pair of label values.
pub type Pair = (ValueIndex, ValueIndex);

/// The pair every origin beyond the pair cap shares.
pub const OVERFLOW_PAIR: Pair = (OTHER_INDEX, OTHER_INDEX);

/// Where an origin's observations go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Named {
    /// Its pair: its own port and workload values, or [`OVERFLOW_PAIR`] beyond the pair cap.
    pub pair: Pair,
    /// The pair's number, in the order pairs were given out (0, 1, …): where its series go.
    pub index: usize,
    /// `[port, workload, pair]`: which of them were lumped into `other` by their cap.
    pub other: [bool; 3],
    /// Whether the pair was given out just now (its number may be a retired pair's).
    pub fresh: bool,
}

/// What the tracker still holds, which retirement never takes.
#[derive(Debug, Default)]
pub struct InUse {
    /// Ports a tracked socket listens on.
    pub listening_ports: FxHashSet<u16>,
    /// Service ports of tracked sockets (either side).
    pub ports: FxHashSet<u16>,
    /// Cgroups of tracked sockets.
    pub cgroups: FxHashSet<u64>,
    /// Namespaces of tracked sockets.
    pub netns: FxHashSet<u32>,
}

/// Every capped label's values. Reached through a [`NamingService`].
pub struct Naming {
    limits: LabelLimits,
    ports: PortLabels,
    workloads: WorkloadLabels,
    /// cgroup id → workload name.
    names: Workloads,
    /// Pairs with series of their own ([`OVERFLOW_PAIR`] included once it is used), by
    /// their [`Named::index`].
    pairs: FxHashMap<Pair, usize>,
    /// Numbers of retired pairs, given to the next new ones.
    free_pairs: Vec<usize>,
    /// Namespaces with a `netns` value of their own (`--netns-labels`), by inode, and when
    /// each was last asked for.
    netns: HashMap<u32, (String, Instant)>,
    netns_limit: usize,
    /// The time of the batch being applied (one clock read per batch, not per lookup).
    now: Instant,
}

impl Naming {
    /// Values within `limits`, workloads named by `names`, and up to `netns_limit`
    /// namespaces with a value of their own (0: no `netns` label).
    pub fn new(limits: LabelLimits, names: Workloads, netns_limit: usize) -> Self {
        Naming {
            ports: PortLabels::new(&limits),
            workloads: WorkloadLabels::new(&limits),
            limits,
            names,
            pairs: FxHashMap::default(),
            free_pairs: Vec::new(),
            netns: HashMap::new(),
            netns_limit,
            now: Instant::now(),
        }
    }

    /// Sets the time lookups are stamped with until the next call.
    pub fn set_now(&mut self, now: Instant) {
        self.now = now;
    }

    /// The caps.
    pub fn limits(&self) -> &LabelLimits {
        &self.limits
    }

    /// The values of an origin: its service port (`None`: not known), whether it listens on
    /// it, and its cgroup id. Values are given out as needed, `other` past a cap.
    pub fn name(&mut self, service_port: Option<u16>, listening: bool, cgroup_id: u64) -> Named {
        let port = match self.limits.port_label() {
            true => self.ports.index(service_port, listening),
            false => UNKNOWN_INDEX,
        };
        let workload = match self.limits.workload_label() {
            true => {
                let names = &mut self.names;
                self.workloads.index(cgroup_id, || names.name(cgroup_id).to_string())
            }
            false => UNKNOWN_INDEX,
        };
        let requested = (port, workload);
        let own_pairs = self.pairs.len() - usize::from(self.pairs.contains_key(&OVERFLOW_PAIR));
        let pair = if self.pairs.contains_key(&requested) {
            requested
        } else if own_pairs >= self.limits.pairs.max(1) {
            OVERFLOW_PAIR
        } else {
            requested
        };
        let other = [port == OTHER_INDEX, workload == OTHER_INDEX, pair != requested];
        if let Some(&index) = self.pairs.get(&pair) {
            return Named { pair, index, other, fresh: false };
        }
        let index = self.free_pairs.pop().unwrap_or(self.pairs.len());
        self.pairs.insert(pair, index);
        Named { pair, index, other, fresh: true }
    }

    /// Retires `pairs` (each with its last activity: the aggregator found them idle for
    /// `--label-idle` and used by no tracked socket), then every value that is now unused,
    /// whose workload is gone (no listener on the port, the cgroup removed, no socket in the
    /// namespace) and that has been idle as long. Returns the `netns` values retired, whose
    /// series the caller removes. Pinned values, `other` and `unknown` never go.
    pub fn retire(&mut self, pairs: &[(Pair, Instant)], in_use: &InUse) -> Vec<String> {
        for &(pair @ (port, workload), last_active) in pairs {
            if pair == OVERFLOW_PAIR {
                continue;
            }
            if let Some(index) = self.pairs.remove(&pair) {
                self.free_pairs.push(index);
                self.ports.touch(port, last_active);
                self.workloads.touch(workload, last_active);
            }
        }
        let (now, idle) = (self.now, self.limits.idle);
        let used_ports: FxHashSet<ValueIndex> = self.pairs.keys().map(|(port, _)| *port).collect();
        self.ports.retire(now, idle, |index, port, listener| {
            let still_listening = listener && in_use.listening_ports.contains(&port);
            !used_ports.contains(&index) && !still_listening && !in_use.ports.contains(&port)
        });
        let used: FxHashSet<ValueIndex> =
            self.pairs.keys().map(|(_, workload)| *workload).collect();
        let names = &self.names;
        self.workloads.retire(now, idle, |labels, index| {
            let alive = |id: &u64| in_use.cgroups.contains(id) || names.exists(*id);
            !used.contains(&index) && !labels.cgroups_of(index).iter().any(alive)
        });
        let mut netns = Vec::new();
        self.netns.retain(|inode, (value, last)| {
            let keep = in_use.netns.contains(inode) || now.saturating_duration_since(*last) < idle;
            if !keep {
                netns.push(std::mem::take(value));
            }
            keep
        });
        netns
    }

    /// Every pair given out and its number.
    pub fn pairs(&self) -> impl Iterator<Item = (Pair, usize)> + '_ {
        self.pairs.iter().map(|(pair, index)| (*pair, *index))
    }

    /// The label values of `pair`: `port` and `workload`, those of the two labels in use.
    pub fn pair_values(&self, (port, workload): Pair) -> Vec<String> {
        let mut values = Vec::new();
        if self.limits.port_label() {
            values.push(self.ports.values().name(port).to_owned());
        }
        if self.limits.workload_label() {
            values.push(self.workloads.values().name(workload).to_owned());
        }
        values
    }

    /// A port the host listens on (seen at `listen()` or in the start-up snapshot): it gets
    /// a `port` value of its own, within the cap.
    pub fn learn_listener(&mut self, port: u16) {
        self.ports.learn_listener(port);
    }

    /// Whether the kernel counters and the `tcpmon_netns_*` families have a `netns` label.
    pub fn netns_label(&self) -> bool {
        self.netns_limit > 0
    }

    /// The `port` value of listening port `port`; `None` without a `port` label.
    pub fn listening_port_value(&self, port: u16) -> Option<&str> {
        self.limits.port_label().then(|| self.ports.value_of(port))
    }

    /// The `netns` value of namespace `inode`: its inode for the first `--netns-labels`,
    /// `other` after, `unknown` for 0; `None` without a `netns` label.
    pub fn netns_value(&mut self, inode: u32) -> Option<&str> {
        if self.netns_limit == 0 {
            return None;
        }
        if inode == 0 {
            return Some(labels::UNKNOWN);
        }
        let now = self.now;
        if !self.netns.contains_key(&inode) && self.netns.len() < self.netns_limit {
            self.netns.insert(inode, (inode.to_string(), now));
        }
        match self.netns.get_mut(&inode) {
            Some((value, last)) => {
                *last = now;
                Some(value)
            }
            None => Some(labels::OTHER),
        }
    }

    /// Whether `value` is a `netns` value in use: `other`, `unknown`, or a namespace's that
    /// has not been retired.
    pub fn netns_value_held(&self, value: &str) -> bool {
        value == labels::OTHER
            || value == labels::UNKNOWN
            || value.parse::<u32>().is_ok_and(|inode| self.netns.contains_key(&inode))
    }

    /// The workload name of cgroup `cgroup_id` (for the tail: uncapped, `unknown` for none).
    pub fn workload_name(&mut self, cgroup_id: Option<u64>) -> &str {
        self.names.name(cgroup_id.unwrap_or(0))
    }

    /// `[port, workload, pair]`: values given out by each capped label (`other` and
    /// `unknown` not counted).
    pub fn given(&self) -> [usize; 3] {
        let pairs = self.pairs.len() - usize::from(self.pairs.contains_key(&OVERFLOW_PAIR));
        [self.ports.values().given(), self.workloads.values().given(), pairs]
    }

    /// Where workloads are named from (the cgroup2 tree), if found.
    pub fn cgroup_mount(&self) -> Option<&std::path::Path> {
        self.names.mount()
    }
}

/// A shared handle on the one [`Naming`]. Cheap to clone.
#[derive(Clone)]
pub struct NamingService(Arc<Mutex<Naming>>);

impl NamingService {
    /// The service for `naming`.
    pub fn new(naming: Naming) -> Self {
        NamingService(Arc::new(Mutex::new(naming)))
    }

    /// No labels at all: the series of tcpmon before attribution.
    pub fn unlabelled() -> Self {
        NamingService::new(Naming::new(
            LabelLimits::NONE,
            Workloads::new(None, Default::default()),
            0,
        ))
    }

    /// The values, locked while the guard lives (briefly: lookups and first-time names).
    pub fn lock(&self) -> MutexGuard<'_, Naming> {
        // A panic elsewhere leaves at worst a value given out and not yet used.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naming_of(limits: LabelLimits, netns: usize) -> Naming {
        Naming::new(limits, Workloads::new(None, Default::default()), netns)
    }

    #[test]
    fn pairs_past_the_cap_share_the_overflow_pair_and_are_counted_as_other() {
        let limits = LabelLimits { pairs: 2, ..LabelLimits::DEFAULT };
        let mut naming = naming_of(limits, 0);
        naming.learn_listener(80);
        naming.learn_listener(443);
        let first = naming.name(Some(80), true, 0);
        assert_eq!(first.other, [false, false, false]);
        let again = Named { fresh: false, ..first };
        assert_eq!(naming.name(Some(80), true, 0), again, "the same origin, the same pair");
        let second = naming.name(Some(443), true, 0);
        assert_ne!(second.pair, first.pair);
        assert_eq!((first.index, second.index), (0, 1), "numbered as given out");
        // A third pair is over the cap of 2.
        naming.learn_listener(8080);
        let third = naming.name(Some(8080), true, 0);
        assert_eq!(third.pair, OVERFLOW_PAIR);
        assert_eq!((third.index, third.other, third.fresh), (2, [false, false, true], true));
        assert_eq!(naming.given(), [3, 0, 2], "3 ports, the root cgroup unnamed, 2 pairs");
    }

    #[test]
    fn retired_pairs_and_values_come_back_for_new_ones_and_pins_stay() {
        let idle = std::time::Duration::from_secs(600);
        let limits =
            LabelLimits { ports: 1, pinned_ports: vec![6379], pairs: 3, idle, ..LabelLimits::NONE };
        let mut naming = naming_of(limits, 2);
        let start = Instant::now();
        naming.set_now(start);
        let a = naming.name(Some(80), false, 0);
        let pinned = naming.name(Some(6379), false, 0);
        assert!(a.fresh && pinned.fresh);
        assert_eq!(naming.name(Some(81), false, 0).other, [true, false, false], "port cap 1");
        assert_eq!(naming.given(), [2, 0, 3], "80, 6379; their pairs and (other, unknown)");
        let in_use = InUse {
            listening_ports: [443].into_iter().collect(),
            netns: [7].into_iter().collect(),
            ..InUse::default()
        };
        // Not idle yet: nothing goes (the caller passes only idle pairs; values wait too).
        naming.netns_value(7);
        naming.netns_value(8);
        assert!(naming.retire(&[(a.pair, start), (pinned.pair, start)], &in_use).is_empty());
        assert_eq!(naming.given(), [2, 0, 1], "the pairs went, the values stay while fresh");
        // Idle: port 80's value goes, the pinned one stays; namespace 8 (no socket) goes.
        // (Values are stamped with the clock when given: a second's margin.)
        naming.set_now(start + idle + std::time::Duration::from_secs(1));
        assert_eq!(naming.retire(&[], &in_use), ["8"]);
        assert_eq!(naming.given(), [1, 0, 1]);
        assert_eq!(naming.netns_value(9), Some("9"), "namespace 8's slot, for 9");
        // The freed slots go to new ones: port 81 and its pair, numbered as a retired pair.
        let b = naming.name(Some(81), false, 0);
        assert_eq!((b.other, b.fresh), ([false, false, false], true));
        assert!(b.index != 2, "a retired pair's number, not (other, unknown)'s");
        assert_eq!(naming.pair_values(b.pair), ["81"]);
        // A listener's port never goes while it listens.
        naming.learn_listener(443);
        naming.set_now(start + idle * 3);
        naming.retire(&[(b.pair, start + idle)], &in_use);
        assert_eq!(naming.listening_port_value(443), Some("443"), "it still listens");
        assert_eq!(naming.listening_port_value(81), Some("other"), "idle and gone");
        assert_eq!(naming.given(), [2, 0, 1], "6379 and 443");
    }

    #[test]
    fn one_netns_allocator_names_the_first_namespaces_and_lumps_the_rest() {
        let mut naming = naming_of(LabelLimits::NONE, 2);
        assert_eq!(naming.netns_value(10), Some("10"));
        assert_eq!(naming.netns_value(11), Some("11"));
        assert_eq!(naming.netns_value(12), Some("other"));
        assert_eq!(naming.netns_value(10), Some("10"), "a value, once given, is kept");
        assert_eq!(naming.netns_value(0), Some("unknown"));
        assert_eq!(naming_of(LabelLimits::NONE, 0).netns_value(10), None, "no netns label");
    }
}
