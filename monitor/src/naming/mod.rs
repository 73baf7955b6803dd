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

use rustc_hash::FxHashMap;

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
    /// Namespaces with a `netns` value of their own (`--netns-labels`), by inode.
    netns: HashMap<u32, String>,
    netns_limit: usize,
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
            netns: HashMap::new(),
            netns_limit,
        }
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
        let pair = if self.pairs.contains_key(&requested) {
            requested
        } else if self.pairs.len() >= self.limits.pairs.max(1) {
            OVERFLOW_PAIR
        } else {
            requested
        };
        let next = self.pairs.len();
        let index = *self.pairs.entry(pair).or_insert(next);
        let other = [port == OTHER_INDEX, workload == OTHER_INDEX, pair != requested];
        Named { pair, index, other }
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
        if !self.netns.contains_key(&inode) && self.netns.len() < self.netns_limit {
            self.netns.insert(inode, inode.to_string());
        }
        Some(self.netns.get(&inode).map_or(labels::OTHER, String::as_str))
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
        assert_eq!(naming.name(Some(80), true, 0), first, "the same origin, the same pair");
        let second = naming.name(Some(443), true, 0);
        assert_ne!(second.pair, first.pair);
        assert_eq!((first.index, second.index), (0, 1), "numbered as given out");
        // A third pair is over the cap of 2.
        naming.learn_listener(8080);
        let third = naming.name(Some(8080), true, 0);
        assert_eq!(third.pair, OVERFLOW_PAIR);
        assert_eq!((third.index, third.other), (2, [false, false, true]));
        assert_eq!(naming.given(), [3, 0, 2], "3 ports, the root cgroup unnamed, 2 pairs");
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
