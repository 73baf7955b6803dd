//! From ring buffer to metrics and tail clients: drain records in batches, decode, track,
//! and hand the observations to the aggregator and the tail hub.
//!
//! This is the synchronous core, which `tcpmon run`, the stand-alone tail, the replay test
//! and the benchmarks share ([`Pipeline::drain_batch`]); only the [`Source`] differs: the
//! kernel's rings or a recording. [`driver`] runs it over the kernel's rings, asynchronously:
//! attach, the start-up snapshot, the run loop.

pub mod driver;
pub mod quiet;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::aggregate::Aggregator;
use crate::clock::unix_seconds;
use crate::decode::{decode, describe, is_transition};
use crate::metrics::ScrapeGate;
use crate::naming::NamingService;
use crate::source::{Drained, Recorder, Source, BATCH_RECORDS};
use crate::tail::filter::View;
use crate::tail::hub::{NewSubscriber, TailHub};
use crate::tracker::{
    Attribution, ConnectionRecord, Observation, ObservationSink, Settled, Tracker,
};

pub use driver::{Controls, PipelineOptions, Wake};

/// What the pipeline did, for the shutdown summary.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    /// Records read from the source.
    pub received: u64,
    /// Records that did not decode.
    pub undecodable: u64,
    /// Sockets in the table at the end.
    pub tracked: usize,
}

/// When the pipeline last drained its source, for `/healthz`.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    started: Instant,
    last_drain_ms: Arc<AtomicU64>,
}

impl Heartbeat {
    fn new() -> Self {
        Heartbeat { started: Instant::now(), last_drain_ms: Arc::default() }
    }

    fn beat(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_drain_ms.store(now, Ordering::Relaxed);
    }

    /// Time since the last drain (since the start, before the first).
    pub fn since_last_drain(&self) -> Duration {
        let last = Duration::from_millis(self.last_drain_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

/// Feeds metrics to the aggregator and records, with their workload names, to the tail.
struct Outputs<'a> {
    aggregator: &'a mut Aggregator,
    hub: &'a mut TailHub,
    /// Where the tail's workload names come from (the aggregator's naming service).
    naming: &'a NamingService,
}

impl ObservationSink for Outputs<'_> {
    fn observe(&mut self, observation: &Observation) {
        match observation {
            Observation::Connection(record) => {
                let mut naming = self.naming.lock();
                self.hub.publish_connection(record, naming.workload_name(record.cgroup_id));
            }
            Observation::Transition(record) => {
                let mut naming = self.naming.lock();
                self.hub.publish_transition(record, naming.workload_name(record.cgroup_id));
            }
            other => self.aggregator.observe(other),
        }
    }

    fn observe_in(&mut self, observation: &Observation, whose: &Attribution) {
        self.aggregator.observe_in(observation, whose);
    }

    fn wants_records(&self) -> bool {
        !self.hub.is_empty()
    }
}

/// Everything after the source: the recording, the decoder, the tracker, the metrics and
/// the tail. Kept apart from the source so a drain can hand it records while it reads.
struct Stages {
    tracker: Tracker,
    aggregator: Aggregator,
    /// The aggregator's naming service, which names the tail's workloads.
    naming: NamingService,
    hub: TailHub,
    recorder: Option<Recorder>,
    summary: Summary,
    /// State transitions among the records of the batch being drained.
    batch_transitions: u64,
}

impl Stages {
    /// Takes one record exactly as the source delivered it.
    fn ingest(&mut self, bytes: &[u8]) {
        self.summary.received += 1;
        self.batch_transitions += u64::from(is_transition(bytes));
        if let Some(out) = self.recorder.as_mut() {
            if let Err(e) = out.write(bytes) {
                warn!("recording stopped: {e}");
                self.recorder = None;
            }
        }
        match decode(bytes) {
            Ok(record) => {
                let mut sink = Outputs {
                    aggregator: &mut self.aggregator,
                    hub: &mut self.hub,
                    naming: &self.naming,
                };
                self.tracker.on_record(&record, &mut sink);
            }
            Err(e) => {
                self.summary.undecodable += 1;
                self.aggregator.record_undecodable();
                if self.summary.undecodable.is_power_of_two() {
                    warn!(
                        "skipped an undecodable record ({e}: {}); {} so far (only every power \
                         of two is logged)",
                        describe(bytes),
                        self.summary.undecodable
                    );
                }
            }
        }
    }

    /// Publishes what a batch of `handed` records changed: the tail clients get their lines,
    /// the metrics the tracker's gauges, then the records are counted as received. Scrapes
    /// wait for the batch (see [`ScrapeGate`]), so one that sees records received (e.g. one
    /// waiting until received + lost reaches the kernel's count) also sees what they did.
    fn publish(&mut self, handed: usize) {
        self.hub.flush();
        self.aggregator.publish_tracker(&self.tracker, unix_seconds());
        let transitions = std::mem::take(&mut self.batch_transitions);
        self.aggregator.records_received(transitions, handed as u64 - transitions);
    }
}

/// The running pipeline: a source and the stages its records go through.
pub struct Pipeline<S> {
    source: S,
    stages: Stages,
    /// The socket table's capacity at the last drain, to notice growth.
    capacity: usize,
    heartbeat: Heartbeat,
    /// Held while a batch is applied, so scrapes see none of it or all of it.
    gate: ScrapeGate,
}

impl<S: Source> Pipeline<S> {
    /// The daemon's pipeline over `source`, with the default `port` and `workload` labels,
    /// metrics in a registry of its own and no tail client: what the replay benchmarks and
    /// the memory measurement run. Also returns the registry, to scrape.
    pub fn with_default_labels(
        source: S,
        max_sockets: usize,
    ) -> prometheus::Result<(Self, prometheus::Registry)> {
        use crate::clock::WallClock;
        use crate::naming::{labels::LabelLimits, workload, Naming, NamingService};
        use crate::tail::hub::TailMetrics;
        let registry = prometheus::Registry::new();
        let names = workload::Workloads::discover(workload::DEFAULT_POD_LOGS.into());
        let naming = NamingService::new(Naming::new(LabelLimits::DEFAULT, names, 0));
        let aggregator = Aggregator::with_labels(&registry, naming)?;
        let hub = TailHub::new(WallClock::now(), TailMetrics::new(&registry)?, "replay");
        Ok((Pipeline::new(source, Tracker::new(max_sockets), aggregator, hub), registry))
    }

    /// A pipeline from `source` to `aggregator` and `hub`.
    pub fn new(source: S, tracker: Tracker, aggregator: Aggregator, hub: TailHub) -> Self {
        let gate = aggregator.scrape_gate();
        let stages = Stages {
            tracker,
            naming: aggregator.naming().clone(),
            aggregator,
            hub,
            recorder: None,
            summary: Summary::default(),
            batch_transitions: 0,
        };
        Pipeline { source, stages, capacity: 0, heartbeat: Heartbeat::new(), gate }
    }

    /// Also writes every record to `recorder` (`--record`).
    pub fn record_to(&mut self, recorder: Recorder) {
        self.stages.recorder = Some(recorder);
    }

    /// The source (a replay can be rewound).
    pub fn source_mut(&mut self) -> &mut S {
        &mut self.source
    }

    /// The tracker (its gauges and counters are also published as metrics).
    pub fn tracker(&self) -> &Tracker {
        &self.stages.tracker
    }

    /// When the pipeline last drained its source.
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat.clone()
    }

    /// Adds a tail client: from its hello line on it sees every matching record. A
    /// `--close-wait` client gets the connections now in CLOSE_WAIT instead, and its stream
    /// ends.
    pub fn add_subscriber(&mut self, subscriber: NewSubscriber) {
        if subscriber.request.view != View::CloseWait {
            self.stages.hub.add(subscriber);
            return;
        }
        let records = self.stages.tracker.close_wait_records(crate::clock::monotonic_ns());
        let mut naming = self.stages.naming.lock();
        let named: Vec<(ConnectionRecord, String)> = records
            .into_iter()
            .map(|record| {
                let workload = naming.workload_name(record.cgroup_id).to_owned();
                (record, workload)
            })
            .collect();
        drop(naming);
        self.stages.hub.list(subscriber, named);
    }

    /// Changes the socket table's cap (config reload).
    pub fn set_max_sockets(&mut self, max_sockets: usize) {
        self.stages.tracker.set_max_sockets(max_sockets);
    }

    /// Says whether the accept program is attached ([`Tracker::set_accepts_seen`]).
    pub fn set_accepts_seen(&mut self, seen: bool) {
        self.stages.tracker.set_accepts_seen(seen);
    }

    /// Applies the kernel's answers about quiet sockets ([`quiet`]), between batches.
    fn settle(&mut self, answers: &[quiet::Answer]) {
        let _batch = self.gate.hold_to_apply();
        let stages = &mut self.stages;
        let mut vanished = 0;
        for (suspect, found) in answers {
            let settled = stages.tracker.settle(suspect, *found);
            vanished += usize::from(settled == Settled::Vanished);
        }
        if vanished > 0 {
            info!(
                "forgot {vanished} of {} quiet sockets asked about: the kernel no longer had \
                 them, their last transitions never reached tcpmon \
                 (tcpmon_tracker_sockets_vanished_total)",
                answers.len()
            );
        }
        stages.publish(0);
    }

    /// Drains one batch and publishes what it changed.
    pub fn drain_batch(&mut self) -> Drained {
        let _batch = self.gate.hold_to_apply();
        let stages = &mut self.stages;
        let drained = self.source.drain(BATCH_RECORDS, |bytes| stages.ingest(bytes));
        stages.publish(drained.handed);
        drained
    }

    /// Drains until the source has nothing more to give now.
    pub fn drain_now(&mut self) {
        while self.drain_batch().more {}
        self.after_drain();
    }

    /// Housekeeping after the source was emptied.
    fn after_drain(&mut self) {
        self.stages.hub.resync_clock();
        let capacity = self.stages.tracker.capacity();
        if capacity != self.capacity {
            // The table just doubled: the old one is freed, but glibc keeps large freed
            // blocks; hand them back so RSS follows the table, not its history.
            // SAFETY: malloc_trim only releases free memory.
            unsafe { libc::malloc_trim(0) };
            self.capacity = capacity;
        }
        self.heartbeat.beat();
    }

    /// Drains what is left, hands the tracker the records still held back, and ends: the
    /// tail clients' queues end with it (each client writes what it has, then stops).
    pub fn finish(mut self) -> Summary {
        while self.drain_batch().more {}
        let _batch = self.gate.hold_to_apply();
        let stages = &mut self.stages;
        let handed = self.source.flush(|bytes| stages.ingest(bytes));
        stages.publish(handed);
        if let Some(e) = stages.recorder.as_mut().and_then(|out| out.flush().err()) {
            warn!("flushing the recording failed: {e}");
        }
        Summary { tracked: stages.tracker.len(), ..stages.summary }
    }
}
