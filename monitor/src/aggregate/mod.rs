//! Observations → Prometheus histograms and counters.
//!
//! Label values come from closed sets: enums ([`Side`], [`CloseReason`], [`TcpState`]) and
//! the capped `port` and `workload` values of [`crate::naming`], so the number of series has a hard
//! bound (README, "Series budget"): no addresses or pids ever become labels. Every label set
//! is resolved once, so recording an observation is a lookup of its (port, workload) pair
//! and a few atomic adds (no hashing of label values, no allocation).

mod attributed;
mod namespaces;
mod series;

use std::time::{Duration, Instant};

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::decode::TcpState;
use crate::metrics::{catch_up, registered, ScrapeGate, CONNECTIONS, CONNECTIONS_HELP};
use crate::naming::NamingService;
use crate::tracker::{Attribution, Observation, ObservationSink, Tracker};
use attributed::{Attributed, CAPPED};
use namespaces::NamespaceMetrics;
use series::Families;

/// Buckets (seconds) for handshake and teardown latency: from loopback (tens of µs) to SYN
/// retries. Linux retransmits an unanswered SYN after 1 s, then 2, 4, 8, 16, 32 s
/// (`TCP_TIMEOUT_INIT`, doubling), so a handshake that needed N retries takes just over
/// 1, 3, 7, 15, 31, 63, 127 s: the bounds 1.5, 3.5, 7.5, … put each retry count in a bucket
/// of its own.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 3.5, 7.5, 15.5, 31.5, 63.5, 127.5,
];

/// Buckets (seconds) for CLOSE_WAIT time: from an application that closes at once to one that
/// leaks sockets for an hour.
pub const CLOSE_WAIT_BUCKETS: &[f64] = &[
    0.000_1, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0,
    1800.0, 3600.0,
];

/// Buckets (seconds) for connection lifetime: RPCs of a millisecond to day-long sessions.
pub const LIFETIME_BUCKETS: &[f64] = &[
    0.000_1, 0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0,
    14_400.0, 43_200.0, 86_400.0,
];

/// Buckets (seconds) for the wait in the accept queue: an application that accepts at once
/// (µs) to one stalled long enough for clients to time out.
pub const ACCEPT_WAIT_BUCKETS: &[f64] =
    &[0.000_1, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Buckets (seconds) for the time in each state: a loopback round trip to an hour.
pub const STATE_BUCKETS: &[f64] = &[0.000_1, 0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0];

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// The most series one (port, workload) pair can have: every side, direction and reason of
/// every family split by port and workload (histograms: one per bucket, `+Inf`, `_sum`,
/// `_count`). The series budget is this times the pairs (README).
pub const SERIES_PER_PAIR: usize = {
    let latency = LATENCY_BUCKETS.len() + 3;
    let histograms = 2 * latency /* handshake */ + 2 * latency /* teardown */
        + (CLOSE_WAIT_BUCKETS.len() + 3) + 2 * (LIFETIME_BUCKETS.len() + 3)
        + crate::tracker::TIMED_STATES.len() * (STATE_BUCKETS.len() + 3)
        + (ACCEPT_WAIT_BUCKETS.len() + 3);
    let reasons = crate::tracker::CloseReason::ALL.len();
    let counters = 2 /* opened */ + 3 * reasons /* closed */ + reasons /* connect failures */
        + 2 /* handshake retransmits */ + 2 /* resets */ + 1 /* CLOSE_WAIT sockets */
        + 1 /* oldest CLOSE_WAIT */ + 2 /* SYN-ACK retransmits */ + 1 /* TIME_WAIT entered */
        + crate::tracker::AbandonReason::ALL.len() /* abandoned in the accept queue */;
    histograms + counters
};

/// How often `tcpmon_close_wait_oldest_seconds` is refreshed.
pub const CLOSE_WAIT_AGE_EVERY: Duration = Duration::from_secs(1);

/// The states the tracker counts. The state tracepoint never reports TIME_WAIT (a timewait
/// mini-socket takes over) nor request sockets (NEW_SYN_RECV; `ss` shows them as SYN-RECV),
/// a full socket in SYN_RECV lives for microseconds, and an orphaned FIN_WAIT2 socket
/// becomes a timewait one that `ss` still lists as FIN-WAIT-2: [`crate::netstate`] reads
/// those three from the kernel. CLOSE is the end, not a population.
pub const TRACKED_STATES: [TcpState; 7] = [
    TcpState::Established,
    TcpState::SynSent,
    TcpState::FinWait1,
    TcpState::CloseWait,
    TcpState::LastAck,
    TcpState::Closing,
    TcpState::Listen,
];

/// The daemon's metrics that come from observations and from its own work.
pub struct Aggregator {
    families: Families,
    attributed: Attributed,
    /// `tcpmon_connections` of the [`TRACKED_STATES`].
    connections: [IntGauge; TRACKED_STATES.len()],
    tracked_sockets: IntGauge,
    events_received: IntCounter,
    notes_received: IntCounter,
    events_undecodable: IntCounter,
    evictions: IntCounter,
    inconsistent: IntCounter,
    first_seen_midlife: IntCounter,
    replaced_stale: IntCounter,
    passive_open_aborted: IntCounter,
    synack_untracked: IntCounter,
    vanished: IntCounter,
    moved: IntCounter,
    last_drain: Gauge,
    /// Per-namespace series, when `--netns-labels` asks for them.
    namespaces: Option<NamespaceMetrics>,
    /// Held by whoever feeds these metrics a batch, and by scrapes.
    gate: ScrapeGate,
}

impl Aggregator {
    /// Creates every metric, without `port` or `workload` labels, and registers it in
    /// `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        Aggregator::with_labels(registry, NamingService::unlabelled())
    }

    /// Creates every metric with the `port` and `workload` labels `naming`'s limits ask for,
    /// their values from `naming`, and registers it in `registry`.
    pub fn with_labels(registry: &Registry, naming: NamingService) -> prometheus::Result<Self> {
        let limits = naming.lock().limits().clone();
        let mut extra = Vec::new();
        if limits.port_label() {
            extra.push("port");
        }
        if limits.workload_label() {
            extra.push("workload");
        }
        let families = Families::new(registry, &extra)?;
        let counter = |name: &str, help: &str, labels: &[&str]| {
            registered(registry, IntCounterVec::new(Opts::new(name, help), labels)?)
        };
        let plain_counter =
            |name: &str, help: &str| registered(registry, IntCounter::new(name, help)?);
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            registered(registry, IntGaugeVec::new(Opts::new(name, help), labels)?)
        };
        let counts = if extra.is_empty() {
            None
        } else {
            let label_values = gauge_vec(
                "tcpmon_label_values",
                "Values given out by each capped label (port, workload; pair: the (port, \
                 workload) pairs with series of their own), other and unknown not included.",
                &["label"],
            )?;
            let label_overflow = counter(
                "tcpmon_label_overflow_total",
                "Observations recorded under port=\"other\" or workload=\"other\" (both for \
                 label=\"pair\") because the label's cap was reached.",
                &["label"],
            )?;
            Some((
                CAPPED.map(|label| label_values.with_label_values(&[label])),
                CAPPED.map(|label| label_overflow.with_label_values(&[label])),
            ))
        };
        let mut attributed = Attributed::new(naming, counts);
        if attributed.counts.is_none() {
            // One set for everything, created at start as tcpmon always did.
            let index = attributed.resolve((0, false, 0)).set();
            attributed.sets[index].create_all(&families);
        }

        // One gauge per state, the state a constant label: the scrape-time collector adds the
        // other states to the same family, which Prometheus' client merges only when every
        // part declares the same label names the same way.
        let connections = TRACKED_STATES.map(|state| {
            let opts = Opts::new(CONNECTIONS, CONNECTIONS_HELP).const_label("state", state.name());
            IntGauge::with_opts(opts)
        });
        let mut gauges = Vec::with_capacity(connections.len());
        for gauge in connections {
            gauges.push(registered(registry, gauge?)?);
        }
        let connections: [IntGauge; TRACKED_STATES.len()] =
            gauges.try_into().unwrap_or_else(|_| unreachable!("one gauge per tracked state"));
        let evictions = counter(
            "tcpmon_tracker_evictions_total",
            "Sockets dropped from the tracking table, by reason.",
            &["reason"],
        )?;
        let build_info =
            gauge_vec("tcpmon_build_info", "tcpmon build information; always 1.", &["version"])?;
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let tracked_sockets = registered(
            registry,
            IntGauge::new("tcpmon_tracked_sockets", "Sockets in the tracking table.")?,
        )?;
        let last_drain = registered(
            registry,
            Gauge::new(
                "tcpmon_last_drain_timestamp_seconds",
                "Unix time at which the daemon last drained the ring buffer.",
            )?,
        )?;

        Ok(Aggregator {
            families,
            attributed,
            connections,
            tracked_sockets,
            events_received: plain_counter(
                "tcpmon_events_received_total",
                "State-transition records read from the ring buffer.",
            )?,
            notes_received: plain_counter(
                "tcpmon_notes_received_total",
                "Reset and SYN-ACK-retransmission records read from the ring buffer.",
            )?,
            events_undecodable: plain_counter(
                "tcpmon_events_undecodable_total",
                "Ring-buffer records that could not be decoded (and were skipped).",
            )?,
            evictions: evictions.with_label_values(&["capacity"]),
            inconsistent: plain_counter(
                "tcpmon_tracker_inconsistent_transitions_total",
                "Transitions whose old state differed from the tracked one (events lost in \
                 between); such sockets report only intervals whose both ends were seen.",
            )?,
            first_seen_midlife: plain_counter(
                "tcpmon_tracker_sockets_first_seen_midlife_total",
                "Sockets first seen after their birth (open before tcpmon started, or events lost).",
            )?,
            replaced_stale: plain_counter(
                "tcpmon_tracker_sockets_replaced_total",
                "Tracked sockets replaced by a new socket at the same kernel address before \
                 their CLOSE was seen (events lost).",
            )?,
            passive_open_aborted: plain_counter(
                "tcpmon_passive_opens_aborted_total",
                "Accepted connections that closed before reaching ESTABLISHED.",
            )?,
            synack_untracked: plain_counter(
                "tcpmon_tracker_synack_untracked_total",
                "SYN-ACK retransmissions not remembered because the pending table was full \
                 (a SYN flood); their connections report retries but no handshake duration.",
            )?,
            vanished: plain_counter(
                "tcpmon_tracker_sockets_vanished_total",
                "Tracked sockets quiet in SYN_SENT, SYN_RECV, FIN_WAIT1, CLOSING or LAST_ACK that \
                 the kernel no longer had when asked: their last transitions never reached \
                 tcpmon (skipped by the kernel, or lost); forgotten.",
            )?,
            moved: plain_counter(
                "tcpmon_tracker_sockets_moved_total",
                "Tracked sockets quiet in SYN_SENT, SYN_RECV, FIN_WAIT1, CLOSING or LAST_ACK that \
                 the kernel had in a later state when asked; now tracked in that state.",
            )?,
            last_drain,
            namespaces: None,
            gate: ScrapeGate::default(),
        })
    }

    /// Adds the per-namespace series (`--netns-labels`), their `netns` values from the
    /// naming service.
    pub fn enable_netns_labels(&mut self, registry: &Registry) -> prometheus::Result<()> {
        self.namespaces = Some(NamespaceMetrics::new(registry)?);
        Ok(())
    }

    /// Counts records read from the ring buffer: state transitions (which the kernel also
    /// counts, so received + lost adds up to its count) and notes.
    pub fn records_received(&self, transitions: u64, notes: u64) {
        self.events_received.inc_by(transitions);
        self.notes_received.inc_by(notes);
    }

    /// The gate that keeps scrapes of these metrics between two batches: the pipeline holds
    /// it while it applies one, the HTTP handler while it reads them.
    pub fn scrape_gate(&self) -> ScrapeGate {
        self.gate.clone()
    }

    /// Counts one record that failed to decode.
    pub fn record_undecodable(&self) {
        self.events_undecodable.inc();
    }

    /// Ports this host listened on before tcpmon started (the start-up snapshot): they get
    /// `port` values like the listeners seen at `listen()`.
    pub fn learn_listeners(&mut self, ports: impl IntoIterator<Item = u16>) {
        let mut naming = self.attributed.naming.lock();
        for port in ports {
            naming.learn_listener(port);
        }
    }

    /// The naming service its label values come from.
    pub fn naming(&self) -> &NamingService {
        &self.attributed.naming
    }

    /// Sets `tcpmon_close_wait_oldest_seconds` of every pair from the connections now in
    /// CLOSE_WAIT (`now_ns`: CLOCK_MONOTONIC, the records' clock). A walk of the tracker,
    /// done once a second ([`CLOSE_WAIT_AGE_EVERY`]), not per batch.
    pub fn publish_close_wait_ages(&mut self, tracker: &Tracker, now_ns: u64) {
        let mut oldest: Vec<Option<u64>> = Vec::new();
        tracker.for_each_close_wait(|whose, since| {
            let attributed = &mut self.attributed;
            let set = if attributed.counts.is_none() {
                0
            } else {
                let origin = (whose.service_port.unwrap_or(0), whose.listening, whose.cgroup_id);
                attributed.set_of(origin)
            };
            if oldest.len() <= set {
                oldest.resize(set + 1, None);
            }
            let first = oldest[set].get_or_insert(since);
            *first = (*first).min(since);
        });
        for (index, set) in self.attributed.sets.iter().enumerate() {
            let since = oldest.get(index).copied().flatten();
            let age = since.map(|since| now_ns.saturating_sub(since) as f64 / 1e9);
            set.set_close_wait_oldest(&self.families, age);
        }
    }

    /// Publishes the tracker's gauges and the growth of its counters since the last call,
    /// after a batch; now and then retires label values ([`Attributed::retire`]).
    pub fn publish_tracker(&mut self, tracker: &Tracker, unix_time: f64) {
        self.attributed.flush();
        let now = Instant::now();
        self.attributed.now = now;
        let idle = {
            let mut naming = self.attributed.naming.lock();
            naming.set_now(now);
            naming.limits().idle
        };
        // Checked a few times per idle period: a value goes at most a quarter late.
        let every = (idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
        if now.saturating_duration_since(self.attributed.aged) >= CLOSE_WAIT_AGE_EVERY {
            self.attributed.aged = now;
            self.publish_close_wait_ages(tracker, crate::clock::monotonic_ns());
        }
        if now.saturating_duration_since(self.attributed.swept) >= every {
            self.attributed.swept = now;
            let netns = self.attributed.retire(tracker);
            if let Some(namespaces) = &self.namespaces {
                for value in netns {
                    namespaces.remove(&value);
                }
            }
        }
        let per_state = tracker.per_state();
        for (gauge, state) in self.connections.iter().zip(TRACKED_STATES) {
            gauge.set(per_state[state.index()] as i64);
        }
        self.tracked_sockets.set(tracker.len() as i64);
        let stats = tracker.stats();
        catch_up(&self.evictions, stats.evicted_capacity);
        catch_up(&self.inconsistent, stats.inconsistent);
        catch_up(&self.first_seen_midlife, stats.first_seen_midlife);
        catch_up(&self.replaced_stale, stats.replaced_stale);
        catch_up(&self.passive_open_aborted, stats.passive_open_aborted);
        catch_up(&self.synack_untracked, stats.synack_untracked);
        catch_up(&self.vanished, stats.vanished);
        catch_up(&self.moved, stats.moved);
        self.attributed.publish();
        self.last_drain.set(unix_time);
    }
}

impl ObservationSink for Aggregator {
    fn observe_in(&mut self, observation: &Observation, whose: &Attribution) {
        if let Observation::Listening { port } = *observation {
            self.attributed.naming.lock().learn_listener(port);
            return;
        }
        if let Some(namespaces) = &self.namespaces {
            if let Some(netns) = self.attributed.naming.lock().netns_value(whose.netns) {
                namespaces.observe(observation, netns);
            }
        }
        self.attributed.set_for(Some(whose)).record(&self.families, observation);
    }

    fn observe(&mut self, observation: &Observation) {
        self.attributed.set_for(None).record(&self.families, observation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{
        decode,
        fixture::{self, v4},
        TcpStats,
    };
    use crate::naming::labels::LabelLimits;
    use crate::naming::workload::Workloads;
    use crate::naming::Naming;
    use crate::tracker::{ResetDirection, Side};
    use monitor_common::note;
    use prometheus::Encoder;
    use std::collections::BTreeMap;

    fn scrape(registry: &Registry) -> String {
        let mut out = Vec::new();
        prometheus::TextEncoder::new().encode(&registry.gather(), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn observations_land_in_the_right_series_and_buckets() {
        let registry = Registry::new();
        let mut aggregator = Aggregator::new(&registry).unwrap();
        let mut tracker = Tracker::default();
        use TcpState::*;
        let ms = 1_000_000u64;
        let steps = [
            (0, 1, Close, SynSent, 0),
            (2 * ms, 1, SynSent, Established, 0),
            (0, 2, Listen, SynRecv, 0),
            (0, 2, SynRecv, Established, 0),
            (100 * ms, 2, Established, CloseWait, 0),
            (400 * ms, 2, CloseWait, LastAck, 0),
            (401 * ms, 2, LastAck, Close, 0),
            (0, 3, Close, SynSent, 0),
            (ms, 3, SynSent, Close, libc::ECONNREFUSED),
        ];
        for (ts, sk, old, new, err) in steps {
            let raw = v4(ts, sk, old, new, 1, 2, err);
            let bytes = match (sk, old, new) {
                // The refused connect retried its SYN twice.
                (3, SynSent, Close) => {
                    let stats = TcpStats { total_retrans: 2, ..TcpStats::default() };
                    fixture::bytes(&fixture::with_stats(raw, stats))
                }
                // The passive child's SYN-ACK was resent once; its first one left 1.2 s
                // before the final ACK.
                (2, SynRecv, Established) => {
                    let synack = fixture::synack_retransmit(ts, 1_000, 1, 2);
                    tracker.on_record(&decode(&fixture::bytes(&synack)).unwrap(), &mut aggregator);
                    let raw = v4(1_200 * ms + 1_000_000, sk, old, new, 1, 2, err);
                    let stats = TcpStats { total_retrans: 1, ..TcpStats::default() };
                    fixture::bytes(&fixture::with_stats(raw, stats))
                }
                _ => fixture::bytes(&raw),
            };
            aggregator.records_received(1, 0);
            tracker.on_record(&decode(&bytes).unwrap(), &mut aggregator);
        }
        let reset = fixture::note(0, 0, note::RESET_SENT, 1);
        tracker.on_record(&decode(&fixture::bytes(&reset)).unwrap(), &mut aggregator);
        aggregator.publish_tracker(&tracker, 1.0);
        let text = scrape(&registry);
        let v = |series: &str| {
            value(&text, series).unwrap_or_else(|| panic!("{series} missing in\n{text}"))
        };

        assert_eq!(v("tcpmon_handshake_duration_seconds_count{side=\"active\"}"), 1.0);
        assert_eq!(
            v("tcpmon_handshake_duration_seconds_bucket{side=\"active\",le=\"0.001\"}"),
            0.0
        );
        assert_eq!(
            v("tcpmon_handshake_duration_seconds_bucket{side=\"active\",le=\"0.0025\"}"),
            1.0
        );
        assert_eq!(v("tcpmon_handshake_duration_seconds_bucket{side=\"passive\",le=\"1\"}"), 0.0);
        assert_eq!(v("tcpmon_handshake_duration_seconds_bucket{side=\"passive\",le=\"1.5\"}"), 1.0);
        assert_eq!(v("tcpmon_handshake_retransmits_total{side=\"active\"}"), 2.0);
        assert_eq!(v("tcpmon_handshake_retransmits_total{side=\"passive\"}"), 1.0);
        assert_eq!(v("tcpmon_resets_total{direction=\"sent\"}"), 1.0);
        assert_eq!(v("tcpmon_resets_total{direction=\"received\"}"), 0.0);
        assert_eq!(v("tcpmon_close_wait_duration_seconds_bucket{le=\"0.25\"}"), 0.0);
        assert_eq!(v("tcpmon_close_wait_duration_seconds_bucket{le=\"0.5\"}"), 1.0);
        assert_eq!(v("tcpmon_teardown_duration_seconds_bucket{side=\"passive\",le=\"0.25\"}"), 0.0);
        assert_eq!(v("tcpmon_teardown_duration_seconds_bucket{side=\"passive\",le=\"0.5\"}"), 1.0);
        assert_eq!(v("tcpmon_connections_opened_total{side=\"active\"}"), 1.0);
        assert_eq!(v("tcpmon_connections_opened_total{side=\"passive\"}"), 1.0);
        assert_eq!(v("tcpmon_connections_closed_total{reason=\"fin\",side=\"passive\"}"), 1.0);
        assert_eq!(v("tcpmon_connect_failures_total{reason=\"refused\"}"), 1.0);
        assert_eq!(v("tcpmon_connect_failures_total{reason=\"timeout\"}"), 0.0);
        assert_eq!(v("tcpmon_connections{state=\"ESTABLISHED\"}"), 1.0);
        assert_eq!(v("tcpmon_tracked_sockets"), 1.0);
        assert_eq!(v("tcpmon_events_received_total"), 9.0);
        assert_eq!(v("tcpmon_build_info{version=\"0.1.0\"}"), 1.0);
    }

    #[test]
    fn netns_labels_are_bounded() {
        let registry = Registry::new();
        let names = Workloads::new(None, Default::default());
        let naming = NamingService::new(Naming::new(LabelLimits::NONE, names, 2));
        let mut aggregator = Aggregator::with_labels(&registry, naming).unwrap();
        aggregator.enable_netns_labels(&registry).unwrap();
        for netns in [11, 12, 13, 14, 11, 0] {
            let whose = Attribution { netns, ..Attribution::default() };
            aggregator.observe_in(&Observation::Opened { side: Side::Active }, &whose);
        }
        aggregator.attributed.flush(); // what the end of a batch does
        let text = scrape(&registry);
        let v = |ns: &str| {
            value(
                &text,
                &format!("tcpmon_netns_connections_opened_total{{netns=\"{ns}\",side=\"active\"}}"),
            )
        };
        assert_eq!(
            (v("11"), v("12"), v("other"), v("unknown")),
            (Some(2.0), Some(1.0), Some(2.0), Some(1.0))
        );
        assert_eq!(v("13"), None, "beyond the limit");
        assert_eq!(value(&text, "tcpmon_connections_opened_total{side=\"active\"}"), Some(6.0));
    }

    #[test]
    fn idle_values_of_gone_workloads_are_retired_and_their_slots_reused_but_pins_stay() {
        let root = std::env::temp_dir().join(format!("tcpmon-retire-{}", std::process::id()));
        let cgroup = |name: &str| {
            let path = root.join(name);
            std::fs::create_dir_all(&path).unwrap();
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap())
        };
        let (job1, job2, keep) =
            (cgroup("job1.service"), cgroup("job2.service"), cgroup("keep.service"));
        let registry = Registry::new();
        let limits = LabelLimits {
            ports: 1,
            workloads: 1,
            pinned_workloads: vec![glob::Pattern::new("keep*").unwrap()],
            pairs: 8,
            idle: Duration::from_millis(100),
            ..LabelLimits::NONE
        };
        let names = Workloads::new(Some(root.clone()), root.join("no-pods"));
        let mut aggregator =
            Aggregator::with_labels(&registry, NamingService::new(Naming::new(limits, names, 0)))
                .unwrap();
        let connect = |aggregator: &mut Aggregator, port, cgroup_id| {
            let whose =
                Attribution { netns: 1, cgroup_id, service_port: Some(port), listening: false };
            aggregator.observe_in(&Observation::Opened { side: Side::Active }, &whose);
        };
        let opened = |port: &str, workload: &str| {
            let series = format!(
                "tcpmon_connections_opened_total{{port=\"{port}\",side=\"active\",workload=\"{workload}\"}}"
            );
            value(&scrape(&registry), &series)
        };
        let label_values = |label: &str| {
            value(&scrape(&registry), &format!("tcpmon_label_values{{label=\"{label}\"}}"))
        };
        connect(&mut aggregator, 5432, job1);
        connect(&mut aggregator, 5433, job2); // both caps are full: other
        connect(&mut aggregator, 5434, keep); // pinned: a value beyond the cap
        aggregator.publish_tracker(&Tracker::default(), 1.0);
        assert_eq!(opened("5432", "job1.service"), Some(1.0));
        assert_eq!(opened("other", "other"), Some(1.0));
        assert_eq!(opened("other", "keep.service"), Some(1.0));
        assert_eq!(label_values("workload"), Some(2.0));

        // The jobs end (their cgroups go), the pinned one too; all idle past --label-idle.
        std::fs::remove_dir(root.join("job1.service")).unwrap();
        std::fs::remove_dir(root.join("keep.service")).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        aggregator.publish_tracker(&Tracker::default(), 2.0);
        assert_eq!(opened("5432", "job1.service"), None, "retired: its series removed");
        assert_eq!(opened("other", "keep.service"), None, "an idle pair goes, pinned or not");
        assert_eq!(label_values("workload"), Some(1.0), "the pinned value stays");
        assert_eq!(label_values("port"), Some(0.0));

        // job2, lumped into `other` before, now gets the freed values.
        connect(&mut aggregator, 5433, job2);
        aggregator.publish_tracker(&Tracker::default(), 3.0);
        assert_eq!(opened("5433", "job2.service"), Some(1.0), "a fresh series from 0");
        assert_eq!(opened("other", "other"), Some(1.0), "the overflow pair never retires");
        assert_eq!(label_values("workload"), Some(2.0));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn ports_workloads_and_pairs_are_capped_and_counted() {
        let root = std::env::temp_dir().join(format!("tcpmon-labels-{}", std::process::id()));
        let cgroup = |name: &str| {
            let path = root.join(name);
            std::fs::create_dir_all(&path).unwrap();
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap())
        };
        let (web, db, cache) =
            (cgroup("web.service"), cgroup("db.service"), cgroup("cache.service"));
        let registry = Registry::new();
        let limits = LabelLimits {
            ports: 1,
            pinned_ports: vec![6379],
            workloads: 2,
            pairs: 5,
            ..LabelLimits::NONE
        };
        let names = Workloads::new(Some(root.clone()), root.join("no-pods"));
        let mut aggregator =
            Aggregator::with_labels(&registry, NamingService::new(Naming::new(limits, names, 0)))
                .unwrap();
        let passive = Observation::Opened { side: Side::Passive };
        let active = Observation::Opened { side: Side::Active };
        let whose = |port, listening, cgroup_id| Attribution {
            netns: 1,
            cgroup_id,
            service_port: Some(port),
            listening,
        };
        aggregator.observe_in(&Observation::Listening { port: 80 }, &whose(80, true, web));
        for (observation, port, listening, cgroup_id) in [
            (passive, 80, true, web),
            (passive, 80, true, web),
            (passive, 8080, true, web), // the listening side is full: other
            (active, 5432, false, db),
            (active, 6379, false, db),    // pinned
            (active, 5432, false, cache), // a third workload: other
            (active, 11211, false, 0),    // the remote side is full; cgroup unknown
        ] {
            aggregator.observe_in(&observation, &whose(port, listening, cgroup_id));
        }
        // A sixth pair is beyond the cap: both labels are other.
        aggregator.observe_in(&passive, &whose(80, true, db));
        aggregator.observe(&Observation::Reset { direction: ResetDirection::Sent });
        aggregator.publish_tracker(&Tracker::default(), 1.0);
        let text = scrape(&registry);
        std::fs::remove_dir_all(&root).unwrap();
        let opened = |side: &str, port: &str, workload: &str| {
            let series = format!(
                "tcpmon_connections_opened_total{{port=\"{port}\",side=\"{side}\",workload=\"{workload}\"}}"
            );
            value(&text, &series)
        };
        assert_eq!(opened("passive", "80", "web.service"), Some(2.0));
        assert_eq!(opened("passive", "other", "web.service"), Some(1.0));
        assert_eq!(opened("active", "5432", "db.service"), Some(1.0));
        assert_eq!(opened("active", "6379", "db.service"), Some(1.0));
        assert_eq!(opened("active", "5432", "other"), Some(1.0));
        assert_eq!(opened("active", "other", "unknown"), None, "a sixth pair");
        assert_eq!(opened("active", "other", "other"), Some(1.0), "the sixth pair");
        assert_eq!(opened("passive", "other", "other"), Some(1.0), "the seventh");
        assert_eq!(opened("passive", "80", "db.service"), None);
        assert_eq!(opened("active", "5432", "web.service"), None, "series exist once used");
        assert_eq!(
            value(
                &text,
                "tcpmon_resets_total{direction=\"sent\",port=\"other\",workload=\"other\"}"
            ),
            Some(1.0),
            "an unattributed reset is pair (unknown, unknown): over the cap too"
        );
        let label = |name: &str, label: &str| value(&text, &format!("{name}{{label=\"{label}\"}}"));
        assert_eq!(label("tcpmon_label_values", "port"), Some(3.0), "6379, 80, 5432");
        assert_eq!(label("tcpmon_label_values", "workload"), Some(2.0));
        assert_eq!(label("tcpmon_label_values", "pair"), Some(5.0));
        assert_eq!(label("tcpmon_label_overflow_total", "port"), Some(2.0));
        assert_eq!(label("tcpmon_label_overflow_total", "workload"), Some(1.0));
        assert_eq!(label("tcpmon_label_overflow_total", "pair"), Some(3.0));
    }

    #[test]
    fn no_labels_reproduce_the_series_of_before() {
        let registry = Registry::new();
        let limits = LabelLimits { pairs: 64, ..LabelLimits::NONE };
        let _aggregator = Aggregator::with_labels(
            &registry,
            NamingService::new(Naming::new(limits, Workloads::new(None, "".into()), 0)),
        );
        let before = include_str!("../../tests/fixtures/metrics-unlabelled.txt");
        // Every family of before, as it was; later features may add families of their own.
        // `tcpmon_connections` changed on purpose: CLOSE and NEW_SYN_RECV are gone (always 0),
        // TIME_WAIT and SYN_RECV come from the kernel at scrape time (`netstate`), and the
        // help says so.
        let families = |text: &str| -> BTreeMap<String, String> {
            let mut families = BTreeMap::new();
            for block in text.split("# HELP ").filter(|b| !b.is_empty()) {
                let name = block.split(' ').next().unwrap().to_owned();
                families.insert(name, block.to_owned());
            }
            families
        };
        let (old, now) = (families(before), families(&scrape(&registry)));
        for (name, block) in &old {
            if name == "tcpmon_connections" {
                let states = |block: &str| -> Vec<String> {
                    block
                        .lines()
                        .filter(|l| l.starts_with(&format!("{name}{{")))
                        .map(str::to_owned)
                        .collect()
                };
                let kept: Vec<String> = states(block)
                    .into_iter()
                    .filter(|line| {
                        TRACKED_STATES.iter().any(|s| line.contains(&format!("\"{}\"", s.name())))
                    })
                    .collect();
                assert_eq!(states(&now[name]), kept);
                continue;
            }
            assert_eq!(now.get(name), Some(block), "{name} changed");
        }
    }

    /// Series of the families split by port and workload, in a scrape.
    fn attributed_series(text: &str) -> usize {
        text.lines().filter(|l| !l.starts_with('#') && l.contains("workload=\"")).count()
    }

    /// Every observation a connection opened on `side` can yield: every way to close it, a
    /// teardown started by either end, and for connects every way to fail.
    fn observations_of(side: Side) -> Vec<Observation> {
        let mut all = vec![
            Observation::CloseWaitEntered,
            Observation::CloseWait { duration_ns: 1 },
            Observation::Opened { side },
            Observation::Handshake { side, duration_ns: 1, retransmits: None },
            Observation::HandshakeRetransmits { side, count: 1 },
        ];
        // Every state but the other side's half-open one.
        let half_open = if side == Side::Active { TcpState::SynRecv } else { TcpState::SynSent };
        for state in crate::tracker::TIMED_STATES.into_iter().filter(|s| *s != half_open) {
            all.push(Observation::StateLeft { state, duration_ns: 1 });
        }
        for reason in crate::tracker::CloseReason::ALL {
            for first_fin in [Side::Active, Side::Passive] {
                let teardown = Some((first_fin, 1));
                let lifetime_ns = Some(1);
                let (side, time_wait) = (Some(side), first_fin == Side::Active);
                all.push(Observation::Closed { side, reason, lifetime_ns, teardown, time_wait });
            }
            if side == Side::Active {
                all.push(Observation::ConnectFailed {
                    reason,
                    duration_ns: None,
                    retransmits: None,
                });
            }
        }
        for direction in [ResetDirection::Sent, ResetDirection::Received] {
            all.push(Observation::Reset { direction });
        }
        if side == Side::Passive {
            for client_acked in [false, true] {
                all.push(Observation::SynAckRetransmitted { client_acked });
            }
            all.push(Observation::Accepted { wait_ns: 1 });
            for reason in crate::tracker::AbandonReason::ALL {
                all.push(Observation::AcceptAbandoned { reason });
            }
        }
        all
    }

    /// Both sides' observations, and closes of connections first seen mid-life.
    fn every_observation() -> Vec<Observation> {
        let mut all = observations_of(Side::Active);
        all.extend(observations_of(Side::Passive));
        for reason in crate::tracker::CloseReason::ALL {
            let closed = Observation::Closed {
                side: None,
                reason,
                lifetime_ns: None,
                teardown: None,
                time_wait: false,
            };
            all.push(closed);
        }
        all
    }

    /// The series of a pair that only accepts (handshake, lifetime, opened, closed and
    /// retransmits of one side; teardown by either end; CLOSE_WAIT; resets) or only connects
    /// (the same, and connect failures).
    /// (A pair that only connects has no SYN-ACK retransmissions, and connect failures.)
    /// (Six states' times, 12 series each, and the oldest CLOSE_WAIT.)
    /// (Only an accepting pair: the accept wait, 14 series, and 3 reasons of abandonment.)
    const PASSIVE_PAIR: usize =
        26 + 2 * 26 + 20 + 1 + 20 + 1 + 9 + 1 + 2 + 1 + 2 + 6 * 12 + 1 + 14 + 3;
    const ACTIVE_PAIR: usize = PASSIVE_PAIR - 2 + 9 - 14 - 3;

    #[test]
    fn the_series_budget_holds_for_twenty_ports_twenty_upstreams_and_twenty_workloads() {
        let root = std::env::temp_dir().join(format!("tcpmon-budget-{}", std::process::id()));
        let workloads: Vec<u64> = (0..20)
            .map(|i| {
                let path = root.join(format!("app{i}.service"));
                std::fs::create_dir_all(&path).unwrap();
                std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap())
            })
            .collect();
        let defaults = LabelLimits {
            ports: 32,
            pinned_ports: Vec::new(),
            workloads: 32,
            pairs: 64,
            ..LabelLimits::NONE
        };
        let host = |limits: &LabelLimits, traffic: &dyn Fn(&mut Aggregator)| {
            let registry = Registry::new();
            let names = Workloads::new(Some(root.clone()), root.join("no-pods"));
            let mut aggregator = Aggregator::with_labels(
                &registry,
                NamingService::new(Naming::new(limits.clone(), names, 0)),
            )
            .unwrap();
            traffic(&mut aggregator);
            aggregator.publish_tracker(&Tracker::default(), 1.0);
            attributed_series(&scrape(&registry))
        };
        let whose = |port: u16, listening, cgroup_id| Attribution {
            netns: 1,
            cgroup_id,
            service_port: Some(port),
            listening,
        };
        // Realistic: workload i serves port 8000+i and calls upstreams 5000+i and
        // 5000+(i+1)%20, and its connections end every way they can.
        let realistic = |aggregator: &mut Aggregator| {
            for (i, &cgroup) in workloads.iter().enumerate() {
                let served = whose(8000 + i as u16, true, cgroup);
                for observation in observations_of(Side::Passive) {
                    aggregator.observe_in(&observation, &served);
                }
                for upstream in [5000 + i as u16, 5000 + (i as u16 + 1) % 20] {
                    for observation in observations_of(Side::Active) {
                        aggregator.observe_in(&observation, &whose(upstream, false, cgroup));
                    }
                }
            }
        };
        // The worst: every workload on every port, every kind of observation.
        let worst = |aggregator: &mut Aggregator| {
            for &cgroup in &workloads {
                for port in (8000..8020).chain(5000..5020) {
                    for observation in every_observation() {
                        aggregator.observe_in(&observation, &whose(port, port >= 8000, cgroup));
                    }
                }
            }
        };
        let realistic_series = host(&defaults, &realistic);
        let worst_series = host(&defaults, &worst);
        std::fs::remove_dir_all(&root).unwrap();
        // 60 pairs (20 served, 40 called), each with the series of one side.
        assert_eq!(realistic_series, 20 * PASSIVE_PAIR + 40 * ACTIVE_PAIR);
        // The pair cap, plus the shared `other` pair: the documented bound, reached.
        assert_eq!(worst_series, 65 * SERIES_PER_PAIR);
        assert_eq!((SERIES_PER_PAIR, PASSIVE_PAIR, ACTIVE_PAIR), (312, 225, 215));
        println!("series: realistic {realistic_series}, worst {worst_series}");
    }

    /// A set holds its counters and histograms as local accumulators and `SeriesSet::flush`
    /// names each of them again: one it missed would read 0 in every scrape. So every
    /// observation once, one batch's publish, and every counter and histogram series the set
    /// created must show it.
    #[test]
    fn one_batch_publishes_every_observation_a_set_recorded() {
        let registry = Registry::new();
        let names = Workloads::new(None, Default::default());
        let naming = NamingService::new(Naming::new(LabelLimits::DEFAULT, names, 0));
        let mut aggregator = Aggregator::with_labels(&registry, naming).unwrap();
        let whose = Attribution { netns: 1, cgroup_id: 0, service_port: Some(80), listening: true };
        for observation in every_observation() {
            aggregator.observe_in(&observation, &whose);
        }
        assert_eq!(attributed_series(&scrape(&registry)), SERIES_PER_PAIR);
        aggregator.publish_tracker(&Tracker::default(), 1.0);
        let text = scrape(&registry);
        let recorded: Vec<&str> = (text.lines())
            .filter(|l| l.contains("workload=\"") && !l.starts_with('#'))
            .filter(|l| l.contains("_total{") || l.contains("_count{"))
            .collect();
        assert!(recorded.len() > 40, "{text}");
        for line in recorded {
            let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(value > 0.0, "not published: {line}");
        }
    }

    #[test]
    fn bucket_bounds_are_increasing() {
        for buckets in [
            LATENCY_BUCKETS,
            CLOSE_WAIT_BUCKETS,
            LIFETIME_BUCKETS,
            STATE_BUCKETS,
            ACCEPT_WAIT_BUCKETS,
        ] {
            assert!(buckets.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
