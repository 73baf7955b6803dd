//! The connection metric families, and the series of one (port, workload) pair, each
//! created the first time something is recorded in it: a pair that only ever accepts
//! connections never exports the series of connects.

use std::cell::Cell;
use std::sync::{Mutex, OnceLock, PoisonError};

use prometheus::local::{LocalHistogram, LocalIntCounter};
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use super::{
    ACCEPT_WAIT_BUCKETS, CLOSE_WAIT_BUCKETS, LATENCY_BUCKETS, LIFETIME_BUCKETS, STATE_BUCKETS,
};
use crate::metrics::registered;
use crate::tracker::{AbandonReason, CloseReason, Observation, ResetDirection, Side, TIMED_STATES};

/// The families whose series are split by port and workload.
pub(super) struct Families {
    handshake: HistogramVec,
    teardown: HistogramVec,
    close_wait: HistogramVec,
    lifetime: HistogramVec,
    state_duration: HistogramVec,
    accept_wait: HistogramVec,
    abandoned: IntCounterVec,
    opened: IntCounterVec,
    closed: IntCounterVec,
    handshake_retransmits: IntCounterVec,
    resets: IntCounterVec,
    failures: IntCounterVec,
    synack_retransmits: IntCounterVec,
    time_wait_entered: IntCounterVec,
    /// Only with `port` or `workload` labels: host-wide, `tcpmon_connections{state}` says it.
    close_wait_sockets: Option<IntGaugeVec>,
    /// The age of the oldest connection now in CLOSE_WAIT.
    pub(super) close_wait_oldest: GaugeVec,
}

impl Families {
    /// Registers every family, each with its own labels followed by `extra` (`port`,
    /// `workload`, or none).
    pub(super) fn new(registry: &Registry, extra: &[&str]) -> prometheus::Result<Self> {
        let labels = |own: &[&'static str]| -> Vec<&str> {
            own.iter().copied().chain(extra.iter().copied()).collect()
        };
        let histogram = |name: &str, help: &str, buckets: &[f64], own: &[&'static str]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            registered(registry, HistogramVec::new(opts, &labels(own))?)
        };
        let counter = |name: &str, help: &str, own: &[&'static str]| {
            registered(registry, IntCounterVec::new(Opts::new(name, help), &labels(own))?)
        };
        let close_wait_sockets = if extra.is_empty() {
            None
        } else {
            let opts = Opts::new(
                "tcpmon_close_wait_sockets",
                "Connections in CLOSE_WAIT now (the peer closed, the application has not yet), \
                 among those tcpmon saw enter it.",
            );
            Some(registered(registry, IntGaugeVec::new(opts, extra)?)?)
        };
        let oldest = Opts::new(
            "tcpmon_close_wait_oldest_seconds",
            "Age of the oldest connection now in CLOSE_WAIT (the peer closed, the application \
             has not), among those tcpmon saw enter it; 0 when there is none. A leak shows as a \
             line that climbs. Refreshed every second.",
        );
        let close_wait_oldest = registered(registry, GaugeVec::new(oldest, extra)?)?;
        Ok(Families {
            close_wait_sockets,
            close_wait_oldest,
            handshake: histogram(
                "tcpmon_handshake_duration_seconds",
                "TCP three-way handshake latency. side=active: SYN sent to SYN-ACK received \
                 (SYN_SENT -> ESTABLISHED). side=passive: first SYN-ACK sent to the final ACK \
                 (the request socket's snt_synack to SYN_RECV -> ESTABLISHED). Retransmissions \
                 are included: a lost first SYN or SYN-ACK adds the 1 s initial RTO.",
                LATENCY_BUCKETS,
                &["side"],
            )?,
            teardown: histogram(
                "tcpmon_teardown_duration_seconds",
                "Orderly TCP close latency, from the first FIN to CLOSE. side=passive: the peer \
                 sent the first FIN (ESTABLISHED -> CLOSE_WAIT ... CLOSE: includes the time the \
                 application took to close). side=active: this host did (ESTABLISHED -> \
                 FIN_WAIT1 ... CLOSE); if the application had already closed the socket it ends \
                 when our FIN is acknowledged (the kernel hands it to TIME_WAIT), otherwise when \
                 the peer's FIN arrives.",
                LATENCY_BUCKETS,
                &["side"],
            )?,
            close_wait: histogram(
                "tcpmon_close_wait_duration_seconds",
                "Time the application took to close() after the peer's FIN (CLOSE_WAIT -> LAST_ACK).",
                CLOSE_WAIT_BUCKETS,
                &[],
            )?,
            state_duration: histogram(
                "tcpmon_state_duration_seconds",
                "Time connections spent in each state they left, from the transition into it to \
                 the one out of it: SYN_SENT (connect until answered or failed), SYN_RECV, \
                 FIN_WAIT1, FIN_WAIT2 (until the peer's FIN, or the hand-over to TIME_WAIT), \
                 CLOSE_WAIT (until the application closed), LAST_ACK, CLOSING. ESTABLISHED is \
                 tcpmon_connection_duration_seconds.",
                STATE_BUCKETS,
                &["state"],
            )?,
            accept_wait: histogram(
                "tcpmon_accept_wait_seconds",
                "Time accepted connections waited in their listener's accept queue: from \
                 ESTABLISHED (the handshake done, the connection queued) to the application's \
                 accept() returning it (syscalls:sys_exit_accept4/accept; accepts through \
                 io_uring are not seen). A slow acceptor shows here while clients already \
                 consider themselves connected.",
                ACCEPT_WAIT_BUCKETS,
                &[],
            )?,
            abandoned: counter(
                "tcpmon_accept_abandoned_total",
                "Established connections that left the accept queue without being accepted: \
                 reason=reset (the client reset it while it waited), listener_closed (the \
                 listener closed with it queued), other (a timeout, or killed).",
                &["reason"],
            )?,
            lifetime: histogram(
                "tcpmon_connection_duration_seconds",
                "Connection lifetime, ESTABLISHED -> CLOSE, by how it was opened.",
                LIFETIME_BUCKETS,
                &["side"],
            )?,
            opened: counter(
                "tcpmon_connections_opened_total",
                "Connections that reached ESTABLISHED, by how they were opened.",
                &["side"],
            )?,
            closed: counter(
                "tcpmon_connections_closed_total",
                "Established connections that reached CLOSE, by how they were opened \
                 (unknown: open before tcpmon saw it) and how they ended.",
                &["side", "reason"],
            )?,
            handshake_retransmits: counter(
                "tcpmon_handshake_retransmits_total",
                "Handshake retransmissions: SYNs (side=active, completed or failed connects) and \
                 SYN-ACKs (side=passive, accepted connections).",
                &["side"],
            )?,
            resets: counter(
                "tcpmon_resets_total",
                "RST segments the kernel sent (tcp:tcp_send_reset; also for segments no socket \
                 owns) or processed from a peer (tcp:tcp_receive_reset).",
                &["direction"],
            )?,
            failures: counter(
                "tcpmon_connect_failures_total",
                "Active opens that never reached ESTABLISHED (SYN_SENT -> CLOSE), by reason.",
                &["reason"],
            )?,
            synack_retransmits: counter(
                "tcpmon_synack_retransmits_total",
                "SYN-ACKs a listening port resent (tcp:tcp_retransmit_synack), whether or not \
                 the connection was ever accepted. reason=accept_queue_full: the client had \
                 already sent its final ACK, which the kernel dropped because the accept \
                 queue was full; reason=unacknowledged: no ACK the listener would take came \
                 (a lost SYN-ACK or ACK, a SYN flood, or a TCP_DEFER_ACCEPT listener still \
                 waiting for data).",
                &["reason"],
            )?,
            time_wait_entered: counter(
                "tcpmon_time_wait_entered_total",
                "Active closes handed to a TIME_WAIT socket (FIN_WAIT2 or CLOSING -> CLOSE \
                 after an orderly FIN exchange; tcp_time_wait()).",
                &[],
            )?,
        })
    }
}

/// Index of a side in the per-side arrays.
const fn side_index(side: Side) -> usize {
    match side {
        Side::Active => 0,
        Side::Passive => 1,
    }
}

fn reason_index(reason: CloseReason) -> usize {
    CloseReason::ALL.iter().position(|r| *r == reason).unwrap_or(CloseReason::ALL.len() - 1)
}

const SIDES: [Side; 2] = [Side::Active, Side::Passive];
const CLOSED_SIDES: [&str; 3] = ["active", "passive", "unknown"];
const REASONS: usize = CloseReason::ALL.len();
/// `reason` of `tcpmon_synack_retransmits_total`, by whether the client had acknowledged.
const SYNACK_REASONS: [&str; 2] = ["unacknowledged", "accept_queue_full"];

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// How a [`SeriesSet`] holds a series: counters and histograms as local accumulators (plain
/// adds on the pipeline's thread, no atomic operation per observation), which
/// [`SeriesSet::flush`] adds to the shared series once per batch, before a scrape can look
/// (scrapes wait for the batch: see `ScrapeGate`); gauges as they are.
trait Held {
    type Series;
    fn held(self) -> Self::Series;
}

impl Held for Histogram {
    type Series = LocalHistogram;
    fn held(self) -> LocalHistogram {
        self.local()
    }
}

impl Held for IntCounter {
    type Series = LocalIntCounter;
    fn held(self) -> LocalIntCounter {
        self.local()
    }
}

impl Held for IntGauge {
    type Series = IntGauge;
    fn held(self) -> IntGauge {
        self
    }
}

impl Held for Gauge {
    type Series = Gauge;
    fn held(self) -> Gauge {
        self
    }
}

/// The series of one (port, workload) pair, each resolved once: recording is then a few
/// plain adds, with no hashing of label values.
pub(super) struct SeriesSet {
    /// The values of the extra labels, in the order [`Families::new`] got their names.
    extra: Vec<String>,
    handshake: [OnceLock<LocalHistogram>; 2],
    handshake_retransmits: [OnceLock<LocalIntCounter>; 2],
    /// `[sent, received]`
    resets: [OnceLock<LocalIntCounter>; 2],
    teardown: [OnceLock<LocalHistogram>; 2],
    close_wait: OnceLock<LocalHistogram>,
    lifetime: [OnceLock<LocalHistogram>; 2],
    /// By [`TIMED_STATES`] index.
    state_duration: [OnceLock<LocalHistogram>; TIMED_STATES.len()],
    accept_wait: OnceLock<LocalHistogram>,
    /// By [`AbandonReason::ALL`] index.
    abandoned: [OnceLock<LocalIntCounter>; AbandonReason::ALL.len()],
    opened: [OnceLock<LocalIntCounter>; 2],
    /// `[side: active, passive, unknown][reason]`
    closed: [[OnceLock<LocalIntCounter>; REASONS]; 3],
    connect_failures: [OnceLock<LocalIntCounter>; REASONS],
    /// `[unacknowledged, accept_queue_full]`
    synack_retransmits: [OnceLock<LocalIntCounter>; 2],
    time_wait_entered: OnceLock<LocalIntCounter>,
    close_wait_sockets: OnceLock<IntGauge>,
    close_wait_oldest: OnceLock<Gauge>,
    /// Something was recorded since the last [`SeriesSet::flush`].
    pending: Cell<bool>,
    /// How to remove each series created so far from its family (when the pair retires).
    created: Mutex<Vec<Box<dyn Fn() + Send>>>,
}

/// The child of `family` for `own` label values followed by the set's `extra`, created on
/// first use (and noted in `created`, so [`SeriesSet::remove`] finds it).
macro_rules! child {
    ($set:expr, $cell:expr, $family:expr, [$($own:expr),*]) => {
        $cell.get_or_init(|| {
            let values: Vec<String> = [$($own),*]
                .into_iter()
                .map(str::to_owned)
                .chain($set.extra.iter().cloned())
                .collect();
            let family = $family.clone();
            let remove = move || {
                let values: Vec<&str> = values.iter().map(String::as_str).collect();
                let _ = family.remove_label_values(&values);
            };
            let child = {
                let values: Vec<&str> = [$($own),*]
                    .into_iter()
                    .chain($set.extra.iter().map(String::as_str))
                    .collect();
                Held::held($family.with_label_values(&values))
            };
            $set.created.lock().unwrap_or_else(PoisonError::into_inner).push(Box::new(remove));
            child
        })
    };
}

impl SeriesSet {
    /// The series for the extra label values `extra`, none created yet.
    pub(super) fn new(extra: Vec<String>) -> Self {
        SeriesSet {
            extra,
            handshake: Default::default(),
            handshake_retransmits: Default::default(),
            resets: Default::default(),
            teardown: Default::default(),
            close_wait: Default::default(),
            lifetime: Default::default(),
            state_duration: Default::default(),
            accept_wait: Default::default(),
            abandoned: Default::default(),
            opened: Default::default(),
            closed: Default::default(),
            connect_failures: Default::default(),
            synack_retransmits: Default::default(),
            time_wait_entered: Default::default(),
            close_wait_sockets: Default::default(),
            close_wait_oldest: Default::default(),
            pending: Cell::new(false),
            created: Mutex::default(),
        }
    }

    /// Adds what was recorded since the last flush to the shared series, which scrapes read.
    pub(super) fn flush(&self) {
        if !self.pending.replace(false) {
            return;
        }
        let histograms = self.handshake.iter().chain(&self.teardown).chain(&self.lifetime);
        let histograms = histograms.chain(&self.state_duration);
        for histogram in histograms.chain([&self.close_wait, &self.accept_wait]) {
            if let Some(histogram) = histogram.get() {
                histogram.flush();
            }
        }
        let counters = self.handshake_retransmits.iter().chain(&self.resets);
        let counters = counters.chain(&self.abandoned).chain(&self.opened);
        let counters = counters.chain(self.closed.iter().flatten()).chain(&self.connect_failures);
        let counters = counters.chain(&self.synack_retransmits);
        for counter in counters.chain([&self.time_wait_entered]) {
            if let Some(counter) = counter.get() {
                counter.flush();
            }
        }
    }

    /// Removes every series this set created from its family: Prometheus then marks them
    /// stale, as for a deleted pod.
    pub(super) fn remove(&self) {
        self.flush();
        let created =
            std::mem::take(&mut *self.created.lock().unwrap_or_else(PoisonError::into_inner));
        for remove in created {
            remove();
        }
    }

    /// Creates every series at 0, as tcpmon without port or workload labels always has
    /// (dashboards and alerts then see the series before the first event).
    pub(super) fn create_all(&self, f: &Families) {
        for side in SIDES {
            let (i, s) = (side_index(side), side.as_str());
            child!(self, self.handshake[i], f.handshake, [s]);
            child!(self, self.handshake_retransmits[i], f.handshake_retransmits, [s]);
            child!(self, self.teardown[i], f.teardown, [s]);
            child!(self, self.lifetime[i], f.lifetime, [s]);
            child!(self, self.opened[i], f.opened, [s]);
        }
        for (i, direction) in [ResetDirection::Sent, ResetDirection::Received].iter().enumerate() {
            child!(self, self.resets[i], f.resets, [direction.as_str()]);
        }
        child!(self, self.close_wait, f.close_wait, []);
        for (row, side) in CLOSED_SIDES.iter().enumerate() {
            for reason in CloseReason::ALL {
                let r = reason_index(reason);
                child!(self, self.closed[row][r], f.closed, [*side, reason.as_str()]);
            }
        }
        for reason in CloseReason::ALL {
            let r = reason_index(reason);
            child!(self, self.connect_failures[r], f.failures, [reason.as_str()]);
        }
        for (i, reason) in SYNACK_REASONS.iter().enumerate() {
            child!(self, self.synack_retransmits[i], f.synack_retransmits, [*reason]);
        }
        child!(self, self.time_wait_entered, f.time_wait_entered, []);
        child!(self, self.close_wait_oldest, f.close_wait_oldest, []);
        for (i, state) in TIMED_STATES.iter().enumerate() {
            child!(self, self.state_duration[i], f.state_duration, [state.name()]);
        }
        child!(self, self.accept_wait, f.accept_wait, []);
        for (i, reason) in AbandonReason::ALL.iter().enumerate() {
            child!(self, self.abandoned[i], f.abandoned, [reason.as_str()]);
        }
    }

    /// Sets the age of this pair's oldest connection in CLOSE_WAIT (`None`: there is none),
    /// creating the series the first time there is one.
    pub(super) fn set_close_wait_oldest(&self, f: &Families, age_seconds: Option<f64>) {
        match age_seconds {
            Some(age) => child!(self, self.close_wait_oldest, f.close_wait_oldest, []).set(age),
            None => {
                if let Some(gauge) = self.close_wait_oldest.get() {
                    gauge.set(0.0);
                }
            }
        }
    }

    /// Records one observation.
    pub(super) fn record(&self, f: &Families, observation: &Observation) {
        self.pending.set(true);
        match *observation {
            Observation::Opened { side } => {
                child!(self, self.opened[side_index(side)], f.opened, [side.as_str()]).inc()
            }
            Observation::Handshake { side, duration_ns, .. } => {
                child!(self, self.handshake[side_index(side)], f.handshake, [side.as_str()])
                    .observe(seconds(duration_ns))
            }
            Observation::HandshakeRetransmits { side, count } => {
                let i = side_index(side);
                child!(
                    self,
                    self.handshake_retransmits[i],
                    f.handshake_retransmits,
                    [side.as_str()]
                )
                .inc_by(u64::from(count))
            }
            Observation::ConnectFailed { reason, retransmits, .. } => {
                let r = reason_index(reason);
                child!(self, self.connect_failures[r], f.failures, [reason.as_str()]).inc();
                if let Some(count) = retransmits.filter(|count| *count > 0) {
                    let active = Side::Active.as_str();
                    child!(self, self.handshake_retransmits[0], f.handshake_retransmits, [active])
                        .inc_by(u64::from(count));
                }
            }
            Observation::Reset { direction } => {
                let i = matches!(direction, ResetDirection::Received) as usize;
                child!(self, self.resets[i], f.resets, [direction.as_str()]).inc()
            }
            Observation::CloseWait { duration_ns } => {
                child!(self, self.close_wait, f.close_wait, []).observe(seconds(duration_ns));
                if let Some(family) = &f.close_wait_sockets {
                    child!(self, self.close_wait_sockets, family, []).dec();
                }
            }
            Observation::Closed { side, reason, lifetime_ns, teardown, time_wait } => {
                if time_wait {
                    child!(self, self.time_wait_entered, f.time_wait_entered, []).inc();
                }
                let row = side.map_or(2, side_index);
                let r = reason_index(reason);
                child!(self, self.closed[row][r], f.closed, [CLOSED_SIDES[row], reason.as_str()])
                    .inc();
                if let (Some(side), Some(ns)) = (side, lifetime_ns) {
                    child!(self, self.lifetime[side_index(side)], f.lifetime, [side.as_str()])
                        .observe(seconds(ns));
                }
                if let Some((side, ns)) = teardown {
                    child!(self, self.teardown[side_index(side)], f.teardown, [side.as_str()])
                        .observe(seconds(ns));
                }
            }
            Observation::SynAckRetransmitted { client_acked } => {
                let i = usize::from(client_acked);
                let reason = SYNACK_REASONS[i];
                child!(self, self.synack_retransmits[i], f.synack_retransmits, [reason]).inc()
            }
            Observation::CloseWaitEntered | Observation::CloseWaitLeft => {
                if matches!(observation, Observation::CloseWaitEntered) {
                    // Its age is set once a second; the series exists from the first one.
                    child!(self, self.close_wait_oldest, f.close_wait_oldest, []);
                }
                let Some(family) = &f.close_wait_sockets else { return };
                let gauge = child!(self, self.close_wait_sockets, family, []);
                match observation {
                    Observation::CloseWaitEntered => gauge.inc(),
                    _ => gauge.dec(),
                }
            }
            Observation::StateLeft { state, duration_ns } => {
                let Some(i) = TIMED_STATES.iter().position(|timed| *timed == state) else { return };
                child!(self, self.state_duration[i], f.state_duration, [state.name()])
                    .observe(seconds(duration_ns))
            }
            Observation::Accepted { wait_ns } => {
                child!(self, self.accept_wait, f.accept_wait, []).observe(seconds(wait_ns))
            }
            Observation::AcceptAbandoned { reason } => {
                let i = AbandonReason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
                child!(self, self.abandoned[i], f.abandoned, [reason.as_str()]).inc()
            }
            Observation::Listening { .. }
            | Observation::Connection(_)
            | Observation::Transition(_) => {}
        }
    }
}
