//! The `port` and `workload` label values: closed sets by construction. Each label has a
//! cap; what comes after the cap shares `other` (the aggregator counts what it lumps
//! there). A value is kept while it is in use; once its workload is gone and it has been
//! idle for `--label-idle`, it is retired and its slot given to the next one
//! ([`super::Naming::retire`] decides when). Pinned values (`--ports`, `--workloads`) are
//! never capped and never retired. The (port, workload) pairs that get series of their own
//! are capped too, which is what bounds the number of series (README, "Series budget").

use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

/// The value of every port or workload beyond its label's cap.
pub const OTHER: &str = "other";
/// The value when a connection's port or workload is not known.
pub const UNKNOWN: &str = "unknown";

/// Index of a label value in its [`LabelValues`].
pub type ValueIndex = u16;

/// Index of [`OTHER`] in every [`LabelValues`].
pub const OTHER_INDEX: ValueIndex = 0;
/// Index of [`UNKNOWN`] in every [`LabelValues`].
pub const UNKNOWN_INDEX: ValueIndex = 1;

/// How many values each label may take (`--port-labels`, `--ports`, `--workload-labels`,
/// `--label-pairs`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelLimits {
    /// Ports with a value of their own, per side: listening ports, and remote ports of
    /// connects. 0 with no `pinned_ports`: no `port` label at all.
    pub ports: usize,
    /// Ports that always get a value of their own (not counted in `ports`).
    pub pinned_ports: Vec<u16>,
    /// Workloads with a value of their own. 0: no `workload` label.
    pub workloads: usize,
    /// Workload names (glob patterns) that always get a value of their own, not counted in
    /// `workloads` and never retired.
    pub pinned_workloads: Vec<glob::Pattern>,
    /// (port, workload) pairs with series of their own; later pairs share
    /// `port="other",workload="other"`.
    pub pairs: usize,
    /// How long a value whose workload is gone stays unused before it is retired
    /// (`--label-idle`).
    pub idle: Duration,
}

/// `--label-idle` default.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(600);

impl LabelLimits {
    /// No `port` and no `workload` label: the series of tcpmon before attribution.
    pub const NONE: LabelLimits = LabelLimits {
        ports: 0,
        pinned_ports: Vec::new(),
        workloads: 0,
        pinned_workloads: Vec::new(),
        pairs: 0,
        idle: DEFAULT_IDLE,
    };

    /// `tcpmon run`'s defaults: 32 ports per side, 32 workloads, 64 pairs (README, "Series
    /// budget").
    pub const DEFAULT: LabelLimits = LabelLimits {
        ports: 32,
        pinned_ports: Vec::new(),
        workloads: 32,
        pinned_workloads: Vec::new(),
        pairs: 64,
        idle: DEFAULT_IDLE,
    };

    /// Whether the metrics carry a `port` label.
    pub fn port_label(&self) -> bool {
        self.ports > 0 || !self.pinned_ports.is_empty()
    }

    /// Whether the metrics carry a `workload` label.
    pub fn workload_label(&self) -> bool {
        self.workloads > 0
    }
}

/// The values one label has given out: `other` and `unknown` first, then the rest in the
/// order they were first seen, a retired value's slot reused by the next.
#[derive(Debug)]
pub struct LabelValues {
    names: Vec<String>,
    /// When each value was given or last touched (see [`LabelValues::touch`]).
    touched: Vec<Instant>,
    /// Slots of retired values.
    free: Vec<ValueIndex>,
}

impl LabelValues {
    fn new() -> Self {
        let now = Instant::now();
        LabelValues {
            names: vec![OTHER.to_owned(), UNKNOWN.to_owned()],
            touched: vec![now, now],
            free: Vec::new(),
        }
    }

    fn add(&mut self, name: String) -> ValueIndex {
        let now = Instant::now();
        if let Some(index) = self.free.pop() {
            self.names[usize::from(index)] = name;
            self.touched[usize::from(index)] = now;
            return index;
        }
        self.names.push(name);
        self.touched.push(now);
        (self.names.len() - 1) as ValueIndex
    }

    /// Frees the slot of a value no pair and no workload uses any more.
    fn retire(&mut self, index: ValueIndex) {
        debug_assert!(index > UNKNOWN_INDEX);
        self.names[usize::from(index)].clear();
        self.free.push(index);
    }

    /// Notes that `index` was in use at `at` (a retired pair's last activity).
    pub fn touch(&mut self, index: ValueIndex, at: Instant) {
        let touched = &mut self.touched[usize::from(index)];
        *touched = (*touched).max(at);
    }

    /// Whether `index` has not been touched for `idle` at `now`.
    fn idle(&self, index: ValueIndex, now: Instant, idle: Duration) -> bool {
        now.saturating_duration_since(self.touched[usize::from(index)]) >= idle
    }

    /// The value at `index`.
    pub fn name(&self, index: ValueIndex) -> &str {
        &self.names[usize::from(index)]
    }

    /// Values given out and not retired, `other` and `unknown` not included.
    pub fn given(&self) -> usize {
        self.names.len() - 2 - self.free.len()
    }
}

/// Which side of the port cap a port counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PortKind {
    Pinned,
    Listening,
    Remote,
}

/// The `port` label: pinned ports, listening ports (learned at `listen()` and from the
/// start-up snapshot) and the remote ports of connects, each side capped.
#[derive(Debug)]
pub struct PortLabels {
    cap: usize,
    values: LabelValues,
    by_port: FxHashMap<u16, (ValueIndex, PortKind)>,
    listening: usize,
    remote: usize,
}

impl PortLabels {
    /// Port values for `limits`.
    pub fn new(limits: &LabelLimits) -> Self {
        let mut labels = PortLabels {
            cap: limits.ports,
            values: LabelValues::new(),
            by_port: FxHashMap::default(),
            listening: 0,
            remote: 0,
        };
        for &port in &limits.pinned_ports {
            if !labels.by_port.contains_key(&port) {
                let index = labels.values.add(port.to_string());
                labels.by_port.insert(port, (index, PortKind::Pinned));
            }
        }
        labels
    }

    /// A port this host listens on: it gets a value if there is room (not counted as
    /// overflow when there is none: no connection was lumped yet).
    pub fn learn_listener(&mut self, port: u16) {
        self.give(port, PortKind::Listening);
    }

    /// The value of a connection's service port: `listening` for accepted connections
    /// (the local port), otherwise a connect's remote port.
    pub fn index(&mut self, port: Option<u16>, listening: bool) -> ValueIndex {
        let Some(port) = port else { return UNKNOWN_INDEX };
        if let Some((index, _)) = self.by_port.get(&port) {
            return *index;
        }
        let kind = if listening { PortKind::Listening } else { PortKind::Remote };
        self.give(port, kind).unwrap_or(OTHER_INDEX)
    }

    fn give(&mut self, port: u16, kind: PortKind) -> Option<ValueIndex> {
        if let Some((index, _)) = self.by_port.get(&port) {
            return Some(*index);
        }
        let taken = match kind {
            PortKind::Listening => &mut self.listening,
            PortKind::Remote => &mut self.remote,
            PortKind::Pinned => unreachable!("pinned ports are given at start"),
        };
        if *taken >= self.cap {
            return None;
        }
        *taken += 1;
        let index = self.values.add(port.to_string());
        self.by_port.insert(port, (index, kind));
        Some(index)
    }

    /// The values given out so far.
    pub fn values(&self) -> &LabelValues {
        &self.values
    }

    /// Notes that the value `index` was in use at `at`.
    pub fn touch(&mut self, index: ValueIndex, at: Instant) {
        self.values.touch(index, at);
    }

    /// Retires every value `retirable` says may go (given its port and whether it was
    /// learned as a listener) that has been idle for `idle`; pinned ports never go. Returns
    /// how many were retired.
    pub fn retire(
        &mut self,
        now: Instant,
        idle: Duration,
        mut retirable: impl FnMut(ValueIndex, u16, bool) -> bool,
    ) -> usize {
        let values = &mut self.values;
        let (mut listening, mut remote) = (0, 0);
        self.by_port.retain(|&port, &mut (index, kind)| {
            let keep = kind == PortKind::Pinned
                || !values.idle(index, now, idle)
                || !retirable(index, port, kind == PortKind::Listening);
            if !keep {
                values.retire(index);
                match kind {
                    PortKind::Listening => listening += 1,
                    PortKind::Remote => remote += 1,
                    PortKind::Pinned => {}
                }
            }
            keep
        });
        self.listening -= listening;
        self.remote -= remote;
        listening + remote
    }

    /// The value `port` has, without giving it one: [`OTHER`] if it has none.
    pub fn value_of(&self, port: u16) -> &str {
        self.by_port.get(&port).map_or(OTHER, |(index, _)| self.values.name(*index))
    }
}

/// The `workload` label: workload names in the order first seen, capped.
#[derive(Debug)]
pub struct WorkloadLabels {
    cap: usize,
    values: LabelValues,
    by_name: FxHashMap<String, ValueIndex>,
    /// cgroup id → value: most lookups stop here, without the name.
    by_cgroup: FxHashMap<u64, ValueIndex>,
    /// Names that always get a value (`--workloads`), and the values they got.
    pins: Vec<glob::Pattern>,
    pinned: Vec<ValueIndex>,
}

/// Most cgroup ids remembered by [`WorkloadLabels`] (names are bounded by the cap; ids of a
/// host that creates cgroups all day are not).
const MAX_CGROUPS: usize = 65_536;

impl WorkloadLabels {
    /// Workload values for `limits`.
    pub fn new(limits: &LabelLimits) -> Self {
        WorkloadLabels {
            cap: limits.workloads,
            values: LabelValues::new(),
            by_name: FxHashMap::default(),
            by_cgroup: FxHashMap::default(),
            pins: limits.pinned_workloads.clone(),
            pinned: Vec::new(),
        }
    }

    /// The value of cgroup `cgroup_id` (0: unknown); `name` is asked only the first time
    /// an id is seen.
    pub fn index(&mut self, cgroup_id: u64, name: impl FnOnce() -> String) -> ValueIndex {
        if cgroup_id == 0 {
            return UNKNOWN_INDEX;
        }
        if let Some(index) = self.by_cgroup.get(&cgroup_id) {
            return *index;
        }
        let name = name();
        let index = match self.by_name.get(&name) {
            Some(index) => *index,
            None if name == UNKNOWN => UNKNOWN_INDEX,
            None if self.pins.iter().any(|pin| pin.matches(&name)) => {
                let index = self.values.add(name.clone());
                self.by_name.insert(name, index);
                self.pinned.push(index);
                index
            }
            None if self.by_name.len() - self.pinned.len() < self.cap => {
                let index = self.values.add(name.clone());
                self.by_name.insert(name, index);
                index
            }
            None => OTHER_INDEX,
        };
        // An id not found (yet) is asked again next time: the cgroup may just be new.
        if index != UNKNOWN_INDEX {
            if self.by_cgroup.len() >= MAX_CGROUPS {
                self.by_cgroup.clear();
            }
            self.by_cgroup.insert(cgroup_id, index);
        }
        index
    }

    /// The values given out so far.
    pub fn values(&self) -> &LabelValues {
        &self.values
    }

    /// Notes that the value `index` was in use at `at`.
    pub fn touch(&mut self, index: ValueIndex, at: Instant) {
        self.values.touch(index, at);
    }

    /// The cgroup ids known to have value `index`.
    pub fn cgroups_of(&self, index: ValueIndex) -> Vec<u64> {
        self.by_cgroup.iter().filter(|(_, v)| **v == index).map(|(id, _)| *id).collect()
    }

    /// Retires every value `retirable` says may go (given the value) that has been idle for
    /// `idle`; pinned ones never go. Returns how many were retired.
    pub fn retire(
        &mut self,
        now: Instant,
        idle: Duration,
        mut retirable: impl FnMut(&Self, ValueIndex) -> bool,
    ) -> usize {
        let candidates: Vec<ValueIndex> = self
            .by_name
            .values()
            .copied()
            .filter(|index| !self.pinned.contains(index) && self.values.idle(*index, now, idle))
            .collect();
        let gone: Vec<ValueIndex> =
            candidates.into_iter().filter(|index| retirable(self, *index)).collect();
        for index in &gone {
            self.values.retire(*index);
        }
        if !gone.is_empty() {
            self.by_name.retain(|_, index| !gone.contains(index));
            // Ids lumped into `other` are asked again: there is room now. (An origin with a
            // live socket keeps its series anyway: the aggregator remembers it.)
            self.by_cgroup.retain(|_, index| *index != OTHER_INDEX && !gone.contains(index));
        }
        gone.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(ports: usize, pinned: &[u16], workloads: usize) -> LabelLimits {
        LabelLimits {
            ports,
            pinned_ports: pinned.to_vec(),
            workloads,
            pairs: 10,
            ..LabelLimits::NONE
        }
    }

    #[test]
    fn ports_are_capped_per_side_and_kept() {
        let mut ports = PortLabels::new(&limits(2, &[5432], 0));
        let name = |ports: &PortLabels, index| ports.values().name(index).to_owned();
        ports.learn_listener(80);
        ports.learn_listener(443);
        ports.learn_listener(8080); // the listening side is full
        let names = |ports: &mut PortLabels, list: &[u16], listening: bool| -> Vec<String> {
            list.iter()
                .map(|&p| {
                    let index = ports.index(Some(p), listening);
                    name(ports, index)
                })
                .collect()
        };
        let listening = names(&mut ports, &[80, 443, 8080], true);
        assert_eq!(listening, ["80", "443", "other"]);
        // Remote ports have a cap of their own; a pinned port is never capped.
        let remote = names(&mut ports, &[53, 6379, 11211, 5432, 53], false);
        assert_eq!(remote, ["53", "6379", "other", "5432", "53"]);
        let unknown = ports.index(None, false);
        assert_eq!(name(&ports, unknown), UNKNOWN);
        assert_eq!(ports.values().given(), 5);
        // A port once given keeps its value, whichever side it shows up on.
        assert_eq!(names(&mut ports, &[80], false), ["80"]);
    }

    #[test]
    fn workloads_are_capped_by_name_not_by_cgroup() {
        let mut workloads = WorkloadLabels::new(&limits(0, &[], 2));
        let mut asked = 0;
        let mut index = |id: u64, name: &str| {
            workloads.index(id, || {
                asked += 1;
                name.to_owned()
            })
        };
        let web = index(10, "web.service");
        // A restarted unit has a new cgroup and the same name: the same value.
        assert_eq!(index(11, "web.service"), web);
        let db = index(20, "db.service");
        assert_eq!(index(30, "cache.service"), OTHER_INDEX);
        assert_eq!(index(30, "cache.service"), OTHER_INDEX);
        assert_eq!(index(0, "never asked"), UNKNOWN_INDEX);
        assert_eq!(index(40, UNKNOWN), UNKNOWN_INDEX);
        assert_eq!(index(10, "web.service"), web);
        assert_ne!(web, db);
        assert_eq!(asked, 5, "ids are remembered, except unknown ones");
        assert_eq!(workloads.values().given(), 2);
        assert_eq!(workloads.values().name(web), "web.service");
    }

    #[test]
    fn no_limits_no_labels() {
        assert!(!LabelLimits::NONE.port_label() && !LabelLimits::NONE.workload_label());
        assert!(limits(0, &[80], 0).port_label());
    }
}
