//! The pipeline over the kernel's rings, driven asynchronously: attach to the rings, take
//! the start-up snapshot while draining, and run until the caller's controls say stop. The
//! daemon ([`crate::daemon`]) and the stand-alone tail ([`crate::standalone`]) drive it.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use log::{info, warn};
use tokio::signal::unix::Signal;
use tokio::sync::mpsc;

use super::quiet::{QuietChecks, Step, MAX_SUSPECTS, QUIET_FOR};
use super::Pipeline;
use crate::aggregate::Aggregator;
use crate::clock::{monotonic_ns, unix_seconds};
use crate::decode::TcpState;
use crate::loader::{self, AcceptChoice, HookChoice, LoadOptions, Loaded};
use crate::privilege::PrivilegedThread;
use crate::snapshot;
use crate::source::{Recorder, RingSource};
use crate::tail::hub::{NewSubscriber, TailHub};
use crate::tracker::Tracker;

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
    /// How to see accept() calls.
    pub accept: AcceptChoice,
}

impl PipelineOptions {
    /// Loads and attaches the eBPF programs with these options.
    pub fn load(&self) -> anyhow::Result<Loaded> {
        let options = LoadOptions {
            ring_bytes: self.ring_bytes,
            wakeup_bytes: self.wakeup_bytes,
            mount_tracefs: true,
            hook: self.hook,
            accept: self.accept,
        };
        loader::load(options).context("loading the eBPF program")
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
    /// Asks the kernel about quiet tracked sockets (see [`super::quiet`]); `None`: never.
    pub quiet: Option<QuietChecks>,
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
            let recorder = Recorder::create(path).with_context(|| {
                format!(
                    "creating the recording {} (--record writes a new file, never over one)",
                    path.display()
                )
            })?;
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
        if let Some(hint) = crate::netstate::shared_hash_hint(snapshot.namespaces) {
            info!("{hint}");
        }
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
                step = async {
                    match controls.quiet.as_mut() {
                        Some(quiet) => quiet.next().await,
                        None => std::future::pending().await,
                    }
                } => {
                    match step {
                        Step::Due => {
                            let quiet_ns = QUIET_FOR.as_nanos() as u64;
                            let tracker = &self.stages.tracker;
                            let suspects = tracker.suspects(monotonic_ns(), quiet_ns, MAX_SUSPECTS);
                            if let Some(quiet) = controls.quiet.as_mut() {
                                quiet.ask(suspects);
                            }
                        }
                        Step::Answered(answers) => {
                            self.drain_now();
                            self.settle(&answers);
                        }
                    }
                    continue;
                }
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
