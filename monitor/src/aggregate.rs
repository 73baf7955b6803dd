//! Observations → Prometheus histograms and counters.
//!
//! Label values come from closed enums ([`Side`], [`CloseReason`], [`TcpState`]), so the
//! number of series is fixed at start-up: no addresses, pids or ports ever become labels.
//! Every label set is resolved once here, so recording an observation is a few atomic adds
//! (no hashing of label values, no allocation).

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use crate::decode::TcpState;
use crate::metrics::{catch_up, ScrapeGate};
use crate::tracker::{CloseReason, Observation, ObservationSink, ResetDirection, Side, Tracker};

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

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Index of a side in the per-side arrays.
const fn side_index(side: Side) -> usize {
    match side {
        Side::Active => 0,
        Side::Passive => 1,
    }
}

const SIDES: [Side; 2] = [Side::Active, Side::Passive];

/// The daemon's metrics that come from observations and from its own work.
pub struct Aggregator {
    handshake: [Histogram; 2],
    handshake_retransmits: [IntCounter; 2],
    /// `[sent, received]`
    resets: [IntCounter; 2],
    teardown: [Histogram; 2],
    close_wait: Histogram,
    lifetime: [Histogram; 2],
    opened: [IntCounter; 2],
    /// `[side: active, passive, unknown][reason]`
    closed: [[IntCounter; CloseReason::ALL.len()]; 3],
    connect_failures: [IntCounter; CloseReason::ALL.len()],
    connections: [IntGauge; 12],
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
    last_drain: Gauge,
    /// Per-namespace series, when `--netns-labels` asks for them.
    namespaces: Option<NamespaceMetrics>,
    /// Held by whoever feeds these metrics a batch, and by scrapes.
    gate: ScrapeGate,
}

/// The main connection metrics split by network namespace (`--netns-labels N`): the first N
/// namespaces seen get a `netns` label of their own (the inode, as `readlink
/// /proc/PID/ns/net` shows it), later ones share `netns="other"`, so the series stay bounded
/// on a host that creates namespaces all day.
struct NamespaceMetrics {
    opened: IntCounterVec,
    closed: IntCounterVec,
    failures: IntCounterVec,
    handshake: HistogramVec,
    labels: std::sync::Mutex<std::collections::HashMap<u32, String>>,
    limit: usize,
}

impl NamespaceMetrics {
    /// Records `observation` under its namespace's label. The label strings live in the map,
    /// so this allocates only the first time a namespace is seen.
    fn observe(&self, observation: &Observation, netns: u32) {
        let mut labels = self.labels.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if netns != 0 && labels.len() < self.limit {
            labels.entry(netns).or_insert_with(|| netns.to_string());
        }
        let ns = match netns {
            0 => "unknown",
            _ => labels.get(&netns).map_or("other", String::as_str),
        };
        match *observation {
            Observation::Opened { side } => {
                self.opened.with_label_values(&[ns, side.as_str()]).inc()
            }
            Observation::Handshake { side, duration_ns, .. } => {
                self.handshake.with_label_values(&[ns, side.as_str()]).observe(seconds(duration_ns))
            }
            Observation::ConnectFailed { reason, .. } => {
                self.failures.with_label_values(&[ns, reason.as_str()]).inc()
            }
            Observation::Closed { side, reason, .. } => {
                let side = side.map_or("unknown", Side::as_str);
                self.closed.with_label_values(&[ns, side, reason.as_str()]).inc()
            }
            _ => {}
        }
    }
}

fn reason_index(reason: CloseReason) -> usize {
    CloseReason::ALL.iter().position(|r| *r == reason).unwrap_or(CloseReason::ALL.len() - 1)
}

impl Aggregator {
    /// Creates every metric and registers it in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let histogram = |name: &str, help: &str, buckets: &[f64], labels: &[&str]| {
            let vec = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )?;
            registry.register(Box::new(vec.clone()))?;
            Ok::<_, prometheus::Error>(vec)
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let vec = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(vec.clone()))?;
            Ok::<_, prometheus::Error>(vec)
        };
        let plain_counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };

        let handshake = histogram(
            "tcpmon_handshake_duration_seconds",
            "TCP three-way handshake latency. side=active: SYN sent to SYN-ACK received \
             (SYN_SENT -> ESTABLISHED). side=passive: first SYN-ACK sent to the final ACK \
             (the request socket's snt_synack to SYN_RECV -> ESTABLISHED). Retransmissions \
             are included: a lost first SYN or SYN-ACK adds the 1 s initial RTO.",
            LATENCY_BUCKETS,
            &["side"],
        )?;
        let teardown = histogram(
            "tcpmon_teardown_duration_seconds",
            "Orderly TCP close latency, from the first FIN to CLOSE. side=passive: the peer \
             sent the first FIN (ESTABLISHED -> CLOSE_WAIT ... CLOSE: includes the time the \
             application took to close). side=active: this host did (ESTABLISHED -> \
             FIN_WAIT1 ... CLOSE); if the application had already closed the socket it ends \
             when our FIN is acknowledged (the kernel hands it to TIME_WAIT), otherwise when \
             the peer's FIN arrives.",
            LATENCY_BUCKETS,
            &["side"],
        )?;
        let close_wait = histogram(
            "tcpmon_close_wait_duration_seconds",
            "Time the application took to close() after the peer's FIN (CLOSE_WAIT -> LAST_ACK).",
            CLOSE_WAIT_BUCKETS,
            &[],
        )?;
        let lifetime = histogram(
            "tcpmon_connection_duration_seconds",
            "Connection lifetime, ESTABLISHED -> CLOSE, by how it was opened.",
            LIFETIME_BUCKETS,
            &["side"],
        )?;
        let opened = counter(
            "tcpmon_connections_opened_total",
            "Connections that reached ESTABLISHED, by how they were opened.",
            &["side"],
        )?;
        let closed = counter(
            "tcpmon_connections_closed_total",
            "Established connections that reached CLOSE, by how they were opened \
             (unknown: open before tcpmon saw it) and how they ended.",
            &["side", "reason"],
        )?;
        let handshake_retransmits = counter(
            "tcpmon_handshake_retransmits_total",
            "Handshake retransmissions: SYNs (side=active, completed or failed connects) and \
             SYN-ACKs (side=passive, accepted connections).",
            &["side"],
        )?;
        let resets = counter(
            "tcpmon_resets_total",
            "RST segments the kernel sent (tcp:tcp_send_reset; also for segments no socket \
             owns) or processed from a peer (tcp:tcp_receive_reset).",
            &["direction"],
        )?;
        let failures = counter(
            "tcpmon_connect_failures_total",
            "Active opens that never reached ESTABLISHED (SYN_SENT -> CLOSE), by reason.",
            &["reason"],
        )?;
        let connections = IntGaugeVec::new(
            Opts::new("tcpmon_connections", "Tracked sockets per TCP state."),
            &["state"],
        )?;
        registry.register(Box::new(connections.clone()))?;
        let evictions = counter(
            "tcpmon_tracker_evictions_total",
            "Sockets dropped from the tracking table, by reason.",
            &["reason"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new("tcpmon_build_info", "tcpmon build information; always 1."),
            &["version"],
        )?;
        registry.register(Box::new(build_info.clone()))?;
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let tracked_sockets =
            IntGauge::new("tcpmon_tracked_sockets", "Sockets in the tracking table.")?;
        registry.register(Box::new(tracked_sockets.clone()))?;
        let last_drain = Gauge::new(
            "tcpmon_last_drain_timestamp_seconds",
            "Unix time at which the daemon last drained the ring buffer.",
        )?;
        registry.register(Box::new(last_drain.clone()))?;

        let unknown_side = ["unknown"];
        let side_labels = |side: Side| [side.as_str()];
        Ok(Aggregator {
            handshake: SIDES.map(|s| handshake.with_label_values(&side_labels(s))),
            handshake_retransmits: SIDES
                .map(|s| handshake_retransmits.with_label_values(&side_labels(s))),
            resets: [ResetDirection::Sent, ResetDirection::Received]
                .map(|d| resets.with_label_values(&[d.as_str()])),
            teardown: SIDES.map(|s| teardown.with_label_values(&side_labels(s))),
            close_wait: close_wait.with_label_values(&[] as &[&str]),
            lifetime: SIDES.map(|s| lifetime.with_label_values(&side_labels(s))),
            opened: SIDES.map(|s| opened.with_label_values(&side_labels(s))),
            closed: [side_labels(Side::Active), side_labels(Side::Passive), unknown_side].map(
                |[side]| CloseReason::ALL.map(|r| closed.with_label_values(&[side, r.as_str()])),
            ),
            connect_failures: CloseReason::ALL
                .map(|r| failures.with_label_values(&[r.as_str()])),
            connections: TcpState::ALL.map(|s| connections.with_label_values(&[s.name()])),
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
            last_drain,
            namespaces: None,
            gate: ScrapeGate::default(),
        })
    }

    /// Adds the per-namespace series (`--netns-labels`), for at most `limit` namespaces.
    pub fn enable_netns_labels(
        &mut self,
        registry: &Registry,
        limit: usize,
    ) -> prometheus::Result<()> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let vec = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(vec.clone()))?;
            Ok::<_, prometheus::Error>(vec)
        };
        let handshake = HistogramVec::new(
            HistogramOpts::new(
                "tcpmon_netns_handshake_duration_seconds",
                "tcpmon_handshake_duration_seconds by network namespace.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["netns", "side"],
        )?;
        registry.register(Box::new(handshake.clone()))?;
        self.namespaces = Some(NamespaceMetrics {
            opened: counter(
                "tcpmon_netns_connections_opened_total",
                "tcpmon_connections_opened_total by network namespace.",
                &["netns", "side"],
            )?,
            closed: counter(
                "tcpmon_netns_connections_closed_total",
                "tcpmon_connections_closed_total by network namespace.",
                &["netns", "side", "reason"],
            )?,
            failures: counter(
                "tcpmon_netns_connect_failures_total",
                "tcpmon_connect_failures_total by network namespace.",
                &["netns", "reason"],
            )?,
            handshake,
            labels: Default::default(),
            limit,
        });
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

    /// Publishes the tracker's gauges and the growth of its counters since the last call.
    pub fn publish_tracker(&self, tracker: &Tracker, unix_time: f64) {
        for (gauge, count) in self.connections.iter().zip(tracker.per_state()) {
            gauge.set(*count as i64);
        }
        self.tracked_sockets.set(tracker.len() as i64);
        let stats = tracker.stats();
        catch_up(&self.evictions, stats.evicted_capacity);
        catch_up(&self.inconsistent, stats.inconsistent);
        catch_up(&self.first_seen_midlife, stats.first_seen_midlife);
        catch_up(&self.replaced_stale, stats.replaced_stale);
        catch_up(&self.passive_open_aborted, stats.passive_open_aborted);
        catch_up(&self.synack_untracked, stats.synack_untracked);
        self.last_drain.set(unix_time);
    }
}

impl ObservationSink for &Aggregator {
    fn observe_in(&mut self, observation: &Observation, netns: u32) {
        self.observe(observation);
        if let Some(namespaces) = &self.namespaces {
            namespaces.observe(observation, netns);
        }
    }

    fn observe(&mut self, observation: &Observation) {
        match *observation {
            Observation::Opened { side } => self.opened[side_index(side)].inc(),
            Observation::Handshake { side, duration_ns, .. } => {
                self.handshake[side_index(side)].observe(seconds(duration_ns));
            }
            Observation::HandshakeRetransmits { side, count } => {
                self.handshake_retransmits[side_index(side)].inc_by(u64::from(count));
            }
            Observation::ConnectFailed { reason, retransmits, .. } => {
                self.connect_failures[reason_index(reason)].inc();
                self.handshake_retransmits[side_index(Side::Active)]
                    .inc_by(u64::from(retransmits.unwrap_or(0)));
            }
            Observation::Reset { direction } => {
                self.resets[matches!(direction, ResetDirection::Received) as usize].inc();
            }
            Observation::CloseWait { duration_ns } => self.close_wait.observe(seconds(duration_ns)),
            Observation::Closed { side, reason, lifetime_ns, teardown } => {
                let row = side.map_or(2, side_index);
                self.closed[row][reason_index(reason)].inc();
                if let (Some(side), Some(ns)) = (side, lifetime_ns) {
                    self.lifetime[side_index(side)].observe(seconds(ns));
                }
                if let Some((side, ns)) = teardown {
                    self.teardown[side_index(side)].observe(seconds(ns));
                }
            }
            // Per-connection records are the tail's; metrics stay low-cardinality.
            Observation::Connection(_) | Observation::Transition(_) => {}
        }
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
    use monitor_common::note;
    use prometheus::Encoder;

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
        let aggregator = Aggregator::new(&registry).unwrap();
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
                    tracker.on_record(&decode(&fixture::bytes(&synack)).unwrap(), &mut &aggregator);
                    let raw = v4(1_200 * ms + 1_000_000, sk, old, new, 1, 2, err);
                    let stats = TcpStats { total_retrans: 1, ..TcpStats::default() };
                    fixture::bytes(&fixture::with_stats(raw, stats))
                }
                _ => fixture::bytes(&raw),
            };
            aggregator.records_received(1, 0);
            tracker.on_record(&decode(&bytes).unwrap(), &mut &aggregator);
        }
        let reset = fixture::note(0, 0, note::RESET_SENT, 1);
        tracker.on_record(&decode(&fixture::bytes(&reset)).unwrap(), &mut &aggregator);
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
        let mut aggregator = Aggregator::new(&registry).unwrap();
        aggregator.enable_netns_labels(&registry, 2).unwrap();
        for netns in [11, 12, 13, 14, 11, 0] {
            (&aggregator).observe_in(&Observation::Opened { side: Side::Active }, netns);
        }
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
    fn bucket_bounds_are_increasing() {
        for buckets in [LATENCY_BUCKETS, CLOSE_WAIT_BUCKETS, LIFETIME_BUCKETS] {
            assert!(buckets.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
