//! From ring buffer to metrics and tail clients: drain records in batches, decode, track,
//! and hand the observations to the aggregator and the tail hub.
//!
//! `tcpmon run`, the stand-alone tail, the replay test and the replay benchmark all run this
//! one path ([`Pipeline::drain_batch`]); only the [`Source`] differs: the kernel's rings or a
//! recording.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use log::{info, warn};
use prometheus::Registry;
use tokio::signal::unix::Signal;
use tokio::sync::mpsc;

use crate::aggregate::{labels::LabelLimits, Aggregator};
use crate::clock::{unix_seconds, WallClock};
use crate::decode::{decode, is_transition, TcpState};
use crate::loader::{self, HookChoice, LoadOptions, Loaded};
use crate::metrics::ScrapeGate;
use crate::privilege::PrivilegedThread;
use crate::snapshot;
use crate::source::{Drained, Recorder, RingSource, Source, BATCH_RECORDS};
use crate::tail::hub::{NewSubscriber, TailHub, TailMetrics};
use crate::tracker::{Attribution, Observation, ObservationSink, Tracker};
use crate::workload::Workloads;

/// Knobs of the pipeline and of the kernel side it reads.
#[derive(Clone, Debug)]
pub struct PipelineOptions {
    /// Ring buffer bytes, shared by the per-CPU rings.
    pub ring_bytes: u32,
    /// Wake-up threshold (0: every event).
    pub wakeup_bytes: u64,
    /// Longest wait between drains.
    pub drain_interval: Duration,
    /// Tracker capacity.
    pub max_sockets: usize,
    /// Where to record raw records, if anywhere.
    pub record: Option<PathBuf>,
    /// Which build of the state program to attach.
    pub hook: HookChoice,
}

impl PipelineOptions {
    /// Loads and attaches the eBPF programs with these options.
    pub fn load(&self) -> anyhow::Result<Loaded> {
        let options = LoadOptions {
            ring_bytes: self.ring_bytes,
            wakeup_bytes: self.wakeup_bytes,
            mount_tracefs: true,
            hook: self.hook,
        };
        loader::load(options).context("loading the eBPF program")
    }
}

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
struct DaemonSink<'a> {
    aggregator: &'a mut Aggregator,
    hub: &'a mut TailHub,
}

impl ObservationSink for DaemonSink<'_> {
    fn observe(&mut self, observation: &Observation) {
        match observation {
            Observation::Connection(record) => {
                let workload = self.aggregator.workload_name(record.cgroup_id);
                self.hub.publish_connection(record, workload);
            }
            Observation::Transition(record) => {
                let workload = self.aggregator.workload_name(record.cgroup_id);
                self.hub.publish_transition(record, workload);
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
                let mut sink = DaemonSink { aggregator: &mut self.aggregator, hub: &mut self.hub };
                self.tracker.on_record(&record, &mut sink);
            }
            Err(e) => {
                self.summary.undecodable += 1;
                self.aggregator.record_undecodable();
                if self.summary.undecodable.is_power_of_two() {
                    warn!(
                        "skipped an undecodable record ({e}); {} so far",
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
    /// A pipeline from `source` to `aggregator` and `hub`.
    pub fn new(source: S, tracker: Tracker, aggregator: Aggregator, hub: TailHub) -> Self {
        let gate = aggregator.scrape_gate();
        let stages = Stages {
            tracker,
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

    /// Adds a tail client: from its hello line on it sees every matching record.
    pub fn add_subscriber(&mut self, subscriber: NewSubscriber) {
        self.stages.hub.add(subscriber);
    }

    /// Changes the socket table's cap (config reload).
    pub fn set_max_sockets(&mut self, max_sockets: usize) {
        self.stages.tracker.set_max_sockets(max_sockets);
    }

    /// Drains one batch and publishes what it changed.
    pub fn drain_batch(&mut self) -> Drained {
        let _batch = self.gate.hold();
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
        let _batch = self.gate.hold();
        let stages = &mut self.stages;
        let handed = self.source.flush(|bytes| stages.ingest(bytes));
        stages.publish(handed);
        if let Some(e) = stages.recorder.as_mut().and_then(|out| out.flush().err()) {
            warn!("flushing the recording failed: {e}");
        }
        Summary { tracked: stages.tracker.len(), ..stages.summary }
    }
}

/// What [`Pipeline::run`] listens to besides the ring buffers.
pub struct Controls<F> {
    /// Resolves with the reason to stop (e.g. `"SIGTERM"`).
    pub stop: F,
    /// SIGHUP, where the configuration can be reloaded (the daemon).
    pub hangup: Option<Signal>,
    /// New tail clients (the daemon's tail socket).
    pub subscribers: Option<mpsc::Receiver<NewSubscriber>>,
    /// Return once the last tail client has gone (the stand-alone tail).
    pub until_no_clients: bool,
}

/// Why [`Pipeline::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// `stop` resolved with this reason.
    Stop(&'static str),
    /// SIGHUP arrived: reload, then run again.
    Hangup,
    /// The last tail client went away.
    NoClients,
}

impl Pipeline<RingSource> {
    /// A pipeline reading the kernel's `rings` (of `ring_bytes` each), as `options` say.
    pub fn attach(
        rings: Vec<aya::maps::MapData>,
        ring_bytes: u32,
        options: &PipelineOptions,
        aggregator: Aggregator,
        hub: TailHub,
    ) -> anyhow::Result<Self> {
        let low_latency = options.wakeup_bytes == 0;
        let source = RingSource::new(rings, ring_bytes, options.drain_interval, low_latency)
            .context("watching the ring buffers")?;
        let mut pipeline =
            Pipeline::new(source, Tracker::new(options.max_sockets), aggregator, hub);
        if let Some(path) = &options.record {
            let recorder =
                Recorder::create(path).with_context(|| format!("creating {}", path.display()))?;
            pipeline.record_to(recorder);
        }
        Ok(pipeline)
    }

    /// Changes the longest wait between drains (config reload).
    pub fn set_drain_interval(&mut self, drain_interval: Duration) {
        self.source.set_drain_interval(drain_interval);
    }

    /// Reads the sockets that existed before the program was attached (see [`snapshot`])
    /// and hands them to the tracker, after the events that already describe some of them.
    /// Their owners' cgroups are found under `cgroup_root` (`--cgroup-root`), if given.
    pub async fn load_snapshot(&mut self, cgroup_root: Option<PathBuf>, reader: &PrivilegedThread) {
        let started = Instant::now();
        self.stages.tracker.expect_snapshot();
        // Walking /proc can take a while on a big host: keep draining meanwhile, so the ring
        // does not overflow (events seen now also tell the tracker which sockets it knows).
        // It runs on the thread that keeps the capabilities for it (other processes' fds,
        // other namespaces).
        let mut task = std::pin::pin!(reader.spawn(move || snapshot::take(cgroup_root)));
        let snapshot = loop {
            tokio::select! {
                done = &mut task => break done.unwrap_or_else(|e| snapshot::Snapshot {
                    problems: vec![e.to_string()],
                    ..Default::default()
                }),
                ready = self.source.ready() => {
                    if ready.is_ok() {
                        while self.drain_batch().more {}
                    }
                }
            }
        };
        while self.drain_batch().more {}
        let added = self.stages.tracker.preload(&snapshot.sockets);
        let listening = snapshot.sockets.iter().filter(|socket| socket.state == TcpState::Listen);
        self.stages.aggregator.learn_listeners(listening.map(|socket| socket.endpoints.sport));
        for problem in &snapshot.problems {
            warn!("start-up snapshot incomplete: {problem}");
        }
        info!(
            "start-up snapshot: {added} existing TCP sockets in {} network namespaces ({:.0?})",
            snapshot.namespaces,
            started.elapsed()
        );
        self.stages.aggregator.publish_tracker(&self.stages.tracker, unix_seconds());
    }

    /// Drains whenever the kernel or the drain timer says so, until something in `controls`
    /// needs the caller.
    pub async fn run<F>(&mut self, controls: &mut Controls<F>) -> anyhow::Result<Wake>
    where
        F: Future<Output = &'static str> + Unpin,
    {
        loop {
            let hangup = async {
                match controls.hangup.as_mut() {
                    Some(hangup) => hangup.recv().await,
                    None => std::future::pending().await,
                }
            };
            let subscriber = async {
                match controls.subscribers.as_mut() {
                    Some(subscribers) => subscribers.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                reason = &mut controls.stop => return Ok(Wake::Stop(reason)),
                Some(()) = hangup => return Ok(Wake::Hangup),
                Some(subscriber) = subscriber => self.add_subscriber(subscriber),
                ready = self.source.ready() => ready.context("waiting on the ring buffer")?,
            }
            while let Some(Ok(subscriber)) = controls.subscribers.as_mut().map(|s| s.try_recv()) {
                self.add_subscriber(subscriber);
            }
            while self.drain_batch().more {
                // A flood: let the HTTP server, tail writers and signals in between batches.
                tokio::task::yield_now().await;
            }
            self.after_drain();
            if controls.until_no_clients && self.stages.hub.is_empty() {
                return Ok(Wake::NoClients);
            }
        }
    }
}

/// Runs the pipeline for one in-process tail client (`tcpmon tail` without a daemon) until
/// that client goes away.
pub async fn standalone(options: PipelineOptions, client: NewSubscriber) -> anyhow::Result<()> {
    let registry = Registry::new(); // never served; the aggregator needs one
    let names = Workloads::discover(crate::workload::DEFAULT_POD_LOGS.into());
    let aggregator = Aggregator::with_labels(&registry, LabelLimits::NONE, names)?;
    let hub = TailHub::new(WallClock::now(), TailMetrics::new(&registry)?, "standalone");
    let mut loaded = options.load()?;
    let rings = std::mem::take(&mut loaded.rings);
    let mut pipeline = Pipeline::attach(rings, loaded.ring_bytes, &options, aggregator, hub)?;
    let reader = PrivilegedThread::start().context("starting the snapshot thread")?;
    pipeline.load_snapshot(None, &reader).await;
    pipeline.add_subscriber(client);
    let mut controls = Controls {
        stop: std::future::pending(),
        hangup: None,
        subscribers: None,
        until_no_clients: true,
    };
    pipeline.run(&mut controls).await?;
    drop(loaded);
    Ok(())
}
