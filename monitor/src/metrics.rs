//! The Prometheus registry's kernel-backed metrics, the gate that keeps scrapes between
//! batches, and the encoding ([`crate::web`] serves it).
//!
//! Metrics are encoded only when scraped. The in-kernel counters (per state transition, and
//! ring-buffer losses) are read at scrape time, so they are exact even when userspace lags.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use log::warn;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, Encoder, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

use crate::decode::TcpState;
use crate::loader::{CounterReadError, KernelCounters, KernelCounts};
use crate::privilege::PrivilegedThread;

/// Something that can read the in-kernel counters (the real maps, or a fake in tests).
pub trait CounterSource: Send + 'static {
    /// Reads every counter.
    fn read(&self) -> Result<KernelCounts, CounterReadError>;
}

impl CounterSource for KernelCounters {
    fn read(&self) -> Result<KernelCounts, CounterReadError> {
        KernelCounters::read(self)
    }
}

/// The kernel counters, read on the [`PrivilegedThread`]: where the kernel wants CAP_BPF for
/// every `bpf()` call (before 6.5, with `kernel.unprivileged_bpf_disabled` set), that is
/// the one thread that keeps it (see [`crate::privilege`]).
pub struct CountersOnThread {
    /// The maps.
    pub counters: Arc<KernelCounters>,
    /// Where they are read.
    pub reader: PrivilegedThread,
}

impl CounterSource for CountersOnThread {
    fn read(&self) -> Result<KernelCounts, CounterReadError> {
        let counters = self.counters.clone();
        self.reader.run(move || counters.read())?
    }
}

/// `tcpmon_connections`, the one family two collectors add to: the aggregator (the states
/// the tracker counts) and the kernel-state collector (TIME_WAIT, SYN_RECV, FIN_WAIT2).
pub const CONNECTIONS: &str = "tcpmon_connections";
/// The help of [`CONNECTIONS`].
pub const CONNECTIONS_HELP: &str = "TCP sockets per state, as ss -tan counts them in every \
     network namespace: the tracker's count for full sockets; TIME_WAIT from /proc/net/sockstat, \
     SYN_RECV (request sockets) and FIN_WAIT2 (full and timewait sockets) from sock_diag.";

/// Registers `metric` in `registry` and hands it back: the one way tcpmon's metrics are
/// registered.
pub fn registered<M: Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> prometheus::Result<M> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

/// Raises `counter` to `total`, a count kept elsewhere (in the kernel, in the tracker) that
/// only grows: Prometheus counters can only be incremented, so publish the growth.
pub fn catch_up(counter: &IntCounter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

fn state_name(number: i32) -> &'static str {
    TcpState::try_from(number).map(TcpState::name).unwrap_or("UNKNOWN")
}

/// Exposes the kernel counters as `tcpmon_state_transitions_total{from,to}` and
/// `tcpmon_events_lost_total`, read fresh at every scrape.
pub struct KernelCollector<S: CounterSource> {
    source: Mutex<S>,
    transitions: IntCounterVec,
    lost: IntCounter,
    notes_lost: IntCounter,
    missed: IntCounter,
    run_seconds: Counter,
    runs: IntCounter,
    read_errors: IntCounter,
    descs: Vec<Desc>,
}

impl<S: CounterSource> KernelCollector<S> {
    /// Wraps `source`.
    pub fn new(source: S) -> prometheus::Result<Self> {
        let transitions = IntCounterVec::new(
            Opts::new(
                "tcpmon_state_transitions_total",
                "TCP state transitions tcpmon's program counted in the kernel (exact even when \
                 the ring buffer is full; the transitions the kernel did not run it for are in \
                 tcpmon_bpf_recursion_misses_total only).",
            ),
            &["from", "to"],
        )?;
        let lost = IntCounter::new(
            "tcpmon_events_lost_total",
            "Transitions the kernel could not queue because the ring buffer was full.",
        )?;
        let notes_lost = IntCounter::new(
            "tcpmon_notes_lost_total",
            "Reset and SYN-ACK-retransmission records the kernel could not queue because the \
             ring buffer was full (their connections lose only that detail).",
        )?;
        let missed = IntCounter::new(
            "tcpmon_bpf_recursion_misses_total",
            "Transitions the kernel did not run tcpmon's program for, because it was already \
             running on that CPU (a softirq that interrupted it changed sockets' states; the \
             classic build: any tracing BPF program was running). They are in no other count; \
             a socket that lost its last ones stays tracked in its old state until a new \
             socket at its address replaces it.",
        )?;
        let run_seconds = Counter::new(
            "tcpmon_bpf_run_seconds_total",
            "CPU time spent in tcpmon's eBPF program (grows only with kernel.bpf_stats_enabled=1).",
        )?;
        let runs = IntCounter::new(
            "tcpmon_bpf_runs_total",
            "Runs of tcpmon's eBPF program (counted only with kernel.bpf_stats_enabled=1).",
        )?;
        let read_errors = IntCounter::new(
            "tcpmon_kernel_map_read_errors_total",
            "Scrapes at which the in-kernel counters could not be read.",
        )?;
        let descs = [
            transitions.desc(),
            lost.desc(),
            notes_lost.desc(),
            missed.desc(),
            run_seconds.desc(),
            runs.desc(),
            read_errors.desc(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        Ok(KernelCollector {
            source: Mutex::new(source),
            transitions,
            lost,
            notes_lost,
            missed,
            run_seconds,
            runs,
            read_errors,
            descs,
        })
    }

    /// Ring-buffer losses as of the last read.
    pub fn lost_so_far(&self) -> u64 {
        self.refresh();
        self.lost.get()
    }

    fn refresh(&self) {
        let Ok(source) = self.source.lock() else { return };
        match source.read() {
            Ok(counts) => {
                for (old, new, total) in counts.transitions {
                    let counter =
                        self.transitions.with_label_values(&[state_name(old), state_name(new)]);
                    catch_up(&counter, total);
                }
                catch_up(&self.lost, counts.ring_reserve_failed);
                catch_up(&self.notes_lost, counts.notes_lost);
                catch_up(&self.missed, counts.recursion_misses);
                catch_up(&self.runs, counts.run_count);
                let seconds = counts.run_time_ns as f64 / 1e9;
                self.run_seconds.inc_by((seconds - self.run_seconds.get()).max(0.0));
            }
            Err(e) => {
                warn!("reading the in-kernel counters failed: {e}");
                self.read_errors.inc();
            }
        }
    }
}

impl<S: CounterSource> Collector for KernelCollector<S> {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.refresh();
        let mut families = self.transitions.collect();
        families.extend(self.lost.collect());
        families.extend(self.notes_lost.collect());
        families.extend(self.missed.collect());
        families.extend(self.run_seconds.collect());
        families.extend(self.runs.collect());
        families.extend(self.read_errors.collect());
        families
    }
}

/// Makes every scrape one consistent picture, taken between two batches of records and
/// never in the middle of one.
///
/// The registry reads its collectors one after another, in no fixed order (they sit in a
/// hash map). Without the gate, a scrape taken while the pipeline applies a batch could read
/// `tcpmon_events_received_total` after the batch and `tcpmon_connections_opened_total`
/// before it: records counted as received whose connections are not counted yet, so
/// "received + lost = the kernel's count" would not mean that every number is complete.
/// The pipeline holds the gate while it applies and publishes a batch (uncontended: one lock
/// per batch of up to thousands of records), the HTTP handler while it reads the metrics.
#[derive(Clone, Debug, Default)]
pub struct ScrapeGate {
    lock: Arc<Mutex<()>>,
    /// Batches applied so far: a scrape encoded at one generation is what any scrape would
    /// read until the next batch.
    generation: Arc<AtomicU64>,
}

impl ScrapeGate {
    /// Keeps batches out until the guard drops (a scrape reading the metrics).
    pub fn hold(&self) -> MutexGuard<'_, ()> {
        // The lock guards no data: a panic elsewhere cannot have left anything half-written.
        self.lock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps scrapes out while a batch is applied, and counts the batch.
    pub fn hold_to_apply(&self) -> MutexGuard<'_, ()> {
        let guard = self.hold();
        self.generation.fetch_add(1, Ordering::Release);
        guard
    }

    /// Batches applied so far.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// Encodes every metric of `registry`, read between two batches (see [`ScrapeGate`]), and
/// of `unguarded`, read before (the kernel's state: its reads take milliseconds, during which
/// the pipeline keeps draining), in the Prometheus text format. Families of the same name
/// in both are one family.
pub fn encode(registry: &Registry, unguarded: &Registry, gate: &ScrapeGate) -> Vec<u8> {
    let outside = unguarded.gather();
    let mut families = {
        let _between_batches = gate.hold();
        registry.gather()
    };
    merge(&mut families, outside);
    let mut out = Vec::with_capacity(16 * 1024);
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        warn!("encoding metrics failed: {e}");
    }
    out
}

/// Adds `more` to `families`: metrics of a family already there join it, in label order.
fn merge(families: &mut Vec<MetricFamily>, more: Vec<MetricFamily>) {
    for mut family in more {
        match families.iter_mut().find(|f| f.name() == family.name()) {
            Some(existing) => {
                existing.mut_metric().extend(family.take_metric());
                let labels = |m: &prometheus::proto::Metric| -> Vec<(String, String)> {
                    let pairs = m.get_label().iter();
                    pairs.map(|p| (p.name().to_owned(), p.value().to_owned())).collect()
                };
                existing.mut_metric().sort_by_key(labels);
            }
            None => families.push(family),
        }
    }
    families.sort_by(|a, b| a.name().cmp(b.name()));
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(Arc<Mutex<KernelCounts>>);

    impl CounterSource for Fake {
        fn read(&self) -> Result<KernelCounts, CounterReadError> {
            Ok(self.0.lock().unwrap().clone())
        }
    }

    #[test]
    fn kernel_counters_are_read_at_every_scrape() {
        let counts = Arc::new(Mutex::new(KernelCounts {
            transitions: vec![(7, 2, 5), (2, 1, 4)],
            ..Default::default()
        }));
        let registry = Registry::new();
        registry.register(Box::new(KernelCollector::new(Fake(counts.clone())).unwrap())).unwrap();
        let text =
            String::from_utf8(encode(&registry, &Registry::new(), &ScrapeGate::default())).unwrap();
        assert!(
            text.contains("tcpmon_state_transitions_total{from=\"CLOSE\",to=\"SYN_SENT\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("tcpmon_state_transitions_total{from=\"SYN_SENT\",to=\"ESTABLISHED\"} 4")
        );
        assert!(text.contains("tcpmon_events_lost_total 0"));

        *counts.lock().unwrap() = KernelCounts {
            transitions: vec![(7, 2, 9), (2, 1, 4)],
            ring_reserve_failed: 3,
            notes_lost: 4,
            recursion_misses: 2,
            run_time_ns: 1_500_000_000,
            run_count: 13,
        };
        let text =
            String::from_utf8(encode(&registry, &Registry::new(), &ScrapeGate::default())).unwrap();
        assert!(
            text.contains("tcpmon_state_transitions_total{from=\"CLOSE\",to=\"SYN_SENT\"} 9"),
            "{text}"
        );
        assert!(text.contains("tcpmon_events_lost_total 3"));
        assert!(text.contains("tcpmon_notes_lost_total 4"));
        assert!(text.contains("tcpmon_bpf_recursion_misses_total 2"));
        assert!(text.contains("tcpmon_bpf_run_seconds_total 1.5"));
        assert!(text.contains("tcpmon_bpf_runs_total 13"));
    }
    #[test]
    fn a_family_read_outside_the_gate_joins_the_same_family_inside() {
        let (inside, outside) = (Registry::new(), Registry::new());
        for (registry, state, value) in [(&inside, "LISTEN", 3), (&outside, "TIME_WAIT", 7)] {
            let gauge = prometheus::IntGauge::with_opts(
                Opts::new("tcpmon_connections", "per state").const_label("state", state),
            )
            .unwrap();
            gauge.set(value);
            registry.register(Box::new(gauge)).unwrap();
        }
        let text = String::from_utf8(encode(&inside, &outside, &ScrapeGate::default())).unwrap();
        assert_eq!(text.matches("# TYPE tcpmon_connections").count(), 1, "{text}");
        assert!(text.contains(
            "tcpmon_connections{state=\"LISTEN\"} 3\ntcpmon_connections{state=\"TIME_WAIT\"} 7"
        ));
    }
}
