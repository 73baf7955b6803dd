//! `tcpmon run`, and the pipeline it shares with the stand-alone tail: load, drain the ring
//! buffer in batches, decode, track, and hand observations to the metrics and tail clients.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use log::{debug, info, warn};
use prometheus::Registry;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::aggregate::Aggregator;
use crate::cli::RunArgs;
use crate::decode::{decode, is_transition};
use crate::loader::{self, HookChoice, LoadOptions, Loaded};
use crate::metrics::{self, CounterSource, KernelCollector};
use crate::snapshot;
use crate::source::{Drained, Recorder, RingSource, BATCH_RECORDS};
use crate::tail::hub::{self, DaemonSink, NewSubscriber, TailHub, TailMetrics};
use crate::tail::record::WallClock;
use crate::tracker::Tracker;

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Knobs of the pipeline (a subset of `tcpmon run`'s flags).
#[derive(Clone, Debug)]
pub struct PipelineOptions {
    /// Ring buffer size.
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
    /// Loads and attaches the eBPF program with these options.
    fn load(&self) -> anyhow::Result<Loaded> {
        let options = LoadOptions {
            ring_bytes: self.ring_bytes,
            wakeup_bytes: self.wakeup_bytes,
            hook: self.hook,
        };
        loader::load(options).context("loading the eBPF program")
    }

    /// The options `tcpmon run` was given.
    pub fn from_run(args: &RunArgs) -> Self {
        PipelineOptions {
            ring_bytes: args.ring_bytes,
            wakeup_bytes: args.wakeup_bytes(),
            drain_interval: args.drain_interval,
            max_sockets: args.max_sockets,
            record: args.record.clone(),
            hook: args.hook,
        }
    }
}

/// What the drain loop did, for the shutdown summary.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    /// Records read from the ring.
    pub received: u64,
    /// Records that did not decode.
    pub undecodable: u64,
    /// Sockets in the table at the end.
    pub tracked: usize,
}

/// The running pipeline.
struct Pipeline {
    source: RingSource,
    tracker: Tracker,
    /// Table capacity at the last drain, to notice growth.
    capacity: usize,
    recorder: Option<Recorder>,
    summary: Summary,
}

impl Pipeline {
    fn new(
        rings: Vec<aya::maps::RingBuf<aya::maps::MapData>>,
        options: &PipelineOptions,
    ) -> anyhow::Result<Self> {
        let recorder = match &options.record {
            Some(path) => Some(
                Recorder::create(path).with_context(|| format!("creating {}", path.display()))?,
            ),
            None => None,
        };
        Ok(Pipeline {
            source: RingSource::new(rings, options.drain_interval, options.wakeup_bytes == 0)
                .context("watching the ring buffers")?,
            tracker: Tracker::new(options.max_sockets),
            capacity: 0,
            recorder,
            summary: Summary::default(),
        })
    }

    /// Drains one batch and publishes what it changed; returns how many records it took.
    ///
    /// The batch's records are counted as received last, after the tracker's gauges are
    /// published: a scrape that sees them received (e.g. one waiting until received + lost
    /// reaches the kernel's count) also sees everything they produced.
    fn drain_batch(&mut self, aggregator: &Aggregator, hub: &mut TailHub) -> Drained {
        self.process_batch(aggregator, hub, false)
    }

    /// Hands the tracker the records still waiting for their turn (at shutdown).
    fn flush_held(&mut self, aggregator: &Aggregator, hub: &mut TailHub) {
        self.process_batch(aggregator, hub, true);
    }

    /// [`Pipeline::drain_batch`], or with `flush` everything held back.
    fn process_batch(
        &mut self,
        aggregator: &Aggregator,
        hub: &mut TailHub,
        flush: bool,
    ) -> Drained {
        let Pipeline { source, tracker, recorder, summary, .. } = self;
        let mut sink = DaemonSink { aggregator, hub };
        let mut transitions = 0;
        let each = |bytes: &[u8]| {
            summary.received += 1;
            transitions += u64::from(is_transition(bytes));
            if let Some(out) = recorder.as_mut() {
                if let Err(e) = out.write(bytes) {
                    warn!("recording stopped: {e}");
                    *recorder = None;
                }
            }
            match decode(bytes) {
                Ok(record) => tracker.on_record(&record, &mut sink),
                Err(e) => {
                    summary.undecodable += 1;
                    aggregator.record_undecodable();
                    if summary.undecodable.is_power_of_two() {
                        warn!(
                            "skipped an undecodable record ({e}); {} so far",
                            summary.undecodable
                        );
                    }
                }
            }
        };
        let drained = if flush {
            Drained { handed: source.flush(each), more: false }
        } else {
            source.drain(BATCH_RECORDS, each)
        };
        aggregator.publish_tracker(tracker, unix_now());
        aggregator.records_received(transitions, drained.handed as u64 - transitions);
        drained
    }

    /// Drains until the ring is empty, yielding between full batches.
    /// Reads the sockets that existed before the program was attached (see [`snapshot`]) and
    /// hands them to the tracker, after the events that already describe some of them.
    async fn load_snapshot(&mut self, aggregator: &Aggregator, hub: &mut TailHub) {
        let started = Instant::now();
        self.tracker.expect_snapshot();
        // Walking /proc can take a while on a big host: keep draining meanwhile, so the ring
        // does not overflow (events seen now also tell the tracker which sockets it knows).
        let mut task = tokio::task::spawn_blocking(snapshot::take);
        let snapshot = loop {
            tokio::select! {
                done = &mut task => break done.unwrap_or_default(),
                ready = self.source.ready() => {
                    if ready.is_ok() {
                        while self.drain_batch(aggregator, hub).more {}
                    }
                }
            }
        };
        while self.drain_batch(aggregator, hub).more {}
        let added = self.tracker.preload(&snapshot.sockets);
        for problem in &snapshot.problems {
            warn!("start-up snapshot incomplete: {problem}");
        }
        info!(
            "start-up snapshot: {added} existing TCP sockets in {} network namespaces ({:.0?})",
            snapshot.namespaces,
            started.elapsed()
        );
        aggregator.publish_tracker(&self.tracker, unix_now());
    }

    async fn drain_all(&mut self, aggregator: &Aggregator, hub: &mut TailHub) {
        while self.drain_batch(aggregator, hub).more {
            // A flood: let the HTTP server, tail writers and signals in between batches.
            tokio::task::yield_now().await;
        }
        hub.prune();
        hub.resync_clock();
        let capacity = self.tracker.capacity();
        if capacity != self.capacity {
            // The table just doubled: the old one is freed, but glibc keeps large freed
            // blocks; hand them back so RSS follows the table, not its history.
            // SAFETY: malloc_trim only releases free memory.
            unsafe { libc::malloc_trim(0) };
            self.capacity = capacity;
        }
    }

    /// Runs until `control.stop` resolves (returning its reason), or until the last tail
    /// client leaves when `control.until_no_clients` is set.
    async fn run<S: Future<Output = &'static str>>(
        &mut self,
        aggregator: &Aggregator,
        hub: &mut TailHub,
        new_subscribers: &mut mpsc::Receiver<NewSubscriber>,
        control: Control<'_, S>,
        drained: impl Fn(),
    ) -> anyhow::Result<&'static str> {
        let Control { stop, mut reloader, until_no_clients } = control;
        tokio::pin!(stop);
        loop {
            let hangup = async {
                match reloader.as_mut() {
                    Some(reloader) => reloader.hangup.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                reason = &mut stop => return Ok(reason),
                Some(()) = hangup => {
                    if let Some(reloader) = reloader.as_mut() {
                        reloader.reload(self);
                    }
                    continue;
                }
                Some(subscriber) = new_subscribers.recv() => hub.add(subscriber),
                ready = self.source.ready() => ready.context("waiting on the ring buffer")?,
            }
            while let Ok(subscriber) = new_subscribers.try_recv() {
                hub.add(subscriber);
            }
            self.drain_all(aggregator, hub).await;
            drained();
            if until_no_clients && hub.is_empty() {
                return Ok("the tail ended");
            }
        }
    }

    fn finish(mut self, aggregator: &Aggregator, hub: &mut TailHub) -> Summary {
        while self.drain_batch(aggregator, hub).more {}
        self.flush_held(aggregator, hub);
        if let Some(e) = self.recorder.as_mut().and_then(|out| out.flush().err()) {
            warn!("flushing the recording failed: {e}");
        }
        self.summary.tracked = self.tracker.len();
        self.summary
    }
}

/// Installs the SIGTERM/SIGINT handlers now (so a signal during start-up is not fatal) and
/// returns a future that resolves, with the signal's name, once one arrives.
fn termination() -> anyhow::Result<impl Future<Output = &'static str>> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

/// When [`Pipeline::run`] ends, and what it does on SIGHUP.
struct Control<'a, S> {
    /// Resolves with the reason to stop.
    stop: S,
    /// Reloads the configuration on SIGHUP (the daemon only).
    reloader: Option<&'a mut Reloader>,
    /// Stop when the last tail client leaves (the stand-alone tail).
    until_no_clients: bool,
}

/// What SIGHUP may change without a restart, and how.
struct Reloader {
    hangup: tokio::signal::unix::Signal,
    config: Option<PathBuf>,
    current: RunArgs,
}

impl Reloader {
    /// Re-reads the config file and applies what can change while running: the log level
    /// (a plain level), the drain interval and the socket table's cap. Counters, histograms
    /// and tracked sockets are untouched; a bad file changes nothing.
    fn reload(&mut self, pipeline: &mut Pipeline) {
        let Some(path) = self.config.clone() else {
            info!("SIGHUP: no --config file to reload");
            return;
        };
        let (cli, new) = match crate::config::reread(&path) {
            Ok(parsed) => parsed,
            Err(e) => {
                warn!("SIGHUP: keeping the running configuration: {e}");
                return;
            }
        };
        let mut changed = Vec::new();
        // The same source as at start-up: the flag or file, else RUST_LOG, else info.
        let level = cli
            .log_level
            .clone()
            .or_else(|| std::env::var("RUST_LOG").ok())
            .unwrap_or_else(|| "info".to_owned());
        let level = level.as_str();
        match level.parse::<log::LevelFilter>() {
            Ok(level) if level != log::max_level() => {
                changed.push(format!("log level {} -> {level}", log::max_level()));
                log::set_max_level(level);
            }
            Ok(_) => {}
            Err(_) => warn!("SIGHUP: module log filters (`{level}`) need a restart"),
        }
        if new.drain_interval != self.current.drain_interval {
            changed.push(format!(
                "drain interval {:?} -> {:?}",
                self.current.drain_interval, new.drain_interval
            ));
            pipeline.source.set_drain_interval(new.drain_interval);
        }
        if new.max_sockets != self.current.max_sockets {
            changed
                .push(format!("max sockets {} -> {}", self.current.max_sockets, new.max_sockets));
            pipeline.tracker.set_max_sockets(new.max_sockets);
        }
        let fixed = [
            ("listen", new.listen != self.current.listen),
            ("ring-bytes", new.ring_bytes != self.current.ring_bytes),
            ("low-latency", new.low_latency != self.current.low_latency),
            ("tail-socket", new.tail_socket != self.current.tail_socket),
            ("record", new.record != self.current.record),
            ("netns-labels", new.netns_labels != self.current.netns_labels),
            ("hook", new.hook != self.current.hook),
        ];
        for (key, _) in fixed.iter().filter(|(_, differs)| *differs) {
            warn!("SIGHUP: `{key}` changed in {}; it takes effect at restart", path.display());
        }
        info!(
            "SIGHUP: reloaded {}: {}",
            path.display(),
            if changed.is_empty() { "nothing to change".to_owned() } else { changed.join(", ") }
        );
        let (drain_interval, max_sockets) = (new.drain_interval, new.max_sockets);
        self.current.drain_interval = drain_interval;
        self.current.max_sockets = max_sockets;
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let stop = termination()?;
    // SIGHUP's default action ends the process: take it over before anything slow.
    let hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut reloader = Reloader { hangup, config: args.config.clone(), current: args.clone() };
    if !nix::unistd::geteuid().is_root() {
        warn!("not running as root: loading needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)");
    }
    // Claim the sockets first: a taken port or a running daemon should fail before anything
    // is loaded into the kernel.
    let listener = metrics::bind(args.listen).await?;
    let tail_listener = hub::bind_socket(&args.tail_socket)?;
    let registry = Registry::new();
    let mut aggregator = Aggregator::new(&registry).context("creating the metrics")?;
    if args.netns_labels > 0 {
        aggregator
            .enable_netns_labels(&registry, args.netns_labels)
            .context("creating the per-namespace metrics")?;
    }
    let mut hub = TailHub::new(WallClock::now(), TailMetrics::new(&registry)?, "daemon");

    let options = PipelineOptions::from_run(&args);
    let Loaded { ebpf, rings, ring_bytes, counters, reads_sock_err, enrichments, hook } =
        options.load()?;
    let collector = Arc::new(KernelCollector::new(counters).context("creating kernel metrics")?);
    registry
        .register(Box::new(SharedCollector(collector.clone())))
        .context("registering kernel metrics")?;
    let ring_count = rings.len();
    let mut pipeline = Pipeline::new(rings, &options)?;
    pipeline.load_snapshot(&aggregator, &mut hub).await;
    info!(
        "attached to sock:inet_sock_set_state ({} build; {} rings of {} KiB, {}; close reasons from sk_err: {}; \
         SYN-ACK times: {}; reset direction: {}); metrics on http://{}/metrics, tails on {}",
        hook.name(),
        ring_count,
        ring_bytes / 1024,
        if args.low_latency {
            "wake-up per event".to_owned()
        } else {
            format!("drain every {:?}", args.drain_interval)
        },
        if reads_sock_err { "yes" } else { "no" },
        if enrichments.synack { "yes" } else { "no" },
        if enrichments.resets { "yes" } else { "no" },
        listener.local_addr().unwrap_or(args.listen),
        args.tail_socket.display(),
    );

    // Healthy while the drain loop keeps turning.
    let last_drain_ms = Arc::new(AtomicU64::new(0));
    let stale_after = (args.drain_interval * 20).max(Duration::from_secs(5));
    let health = {
        let last_drain_ms = last_drain_ms.clone();
        Arc::new(move || {
            let last = Duration::from_millis(last_drain_ms.load(Ordering::Relaxed));
            let idle = started.elapsed().saturating_sub(last);
            if idle > stale_after {
                Err(format!("the ring buffer has not been drained for {idle:?}"))
            } else {
                Ok(())
            }
        })
    };
    let server = tokio::spawn(metrics::serve(listener, registry.clone(), health));
    let (subscribe, mut new_subscribers) = mpsc::channel(16);
    let live_clients = hub::LiveClients::default();
    let tails = tokio::spawn(hub::serve(tail_listener, subscribe, live_clients.clone()));

    let stop = pipeline
        .run(
            &aggregator,
            &mut hub,
            &mut new_subscribers,
            Control { stop, reloader: Some(&mut reloader), until_no_clients: false },
            || last_drain_ms.store(started.elapsed().as_millis() as u64, Ordering::Relaxed),
        )
        .await?;

    // Detach first so nothing new arrives, then take what is already in the ring.
    debug!("{stop}: detaching");
    drop(ebpf);
    let summary = pipeline.finish(&aggregator, &mut hub);
    server.abort();
    tails.abort();
    // Ending the queues lets each tail client write what it still has, then end.
    drop(hub);
    live_clients.drained(Duration::from_millis(500)).await;
    let _ = std::fs::remove_file(&args.tail_socket);
    let lost = collector.lost_so_far();
    info!(
        "{stop}: detached and stopped after {:.1?}: {} records received, {lost} transitions lost \
         (ring full), {} undecodable, {} sockets tracked at exit",
        started.elapsed(),
        summary.received,
        summary.undecodable,
        summary.tracked,
    );
    Ok(())
}

/// Runs the pipeline for one in-process tail client (`tcpmon tail` without a daemon) until
/// that client goes away.
pub async fn standalone(options: PipelineOptions, client: NewSubscriber) -> anyhow::Result<()> {
    let registry = Registry::new(); // never served; the aggregator needs one
    let aggregator = Aggregator::new(&registry)?;
    let mut hub = TailHub::new(WallClock::now(), TailMetrics::new(&registry)?, "standalone");
    let loaded = options.load()?;
    let mut pipeline = Pipeline::new(loaded.rings, &options)?;
    pipeline.load_snapshot(&aggregator, &mut hub).await;
    hub.add(client);
    let (_keep, mut none) = mpsc::channel(1);
    pipeline
        .run(
            &aggregator,
            &mut hub,
            &mut none,
            Control { stop: std::future::pending(), reloader: None, until_no_clients: true },
            || {},
        )
        .await?;
    drop(loaded.ebpf);
    Ok(())
}

/// Lets the registry and the daemon share one collector.
struct SharedCollector<S: CounterSource>(Arc<KernelCollector<S>>);

impl<S: CounterSource> prometheus::core::Collector for SharedCollector<S> {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.0.collect()
    }
}
