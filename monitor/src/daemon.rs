//! `tcpmon run`: wires the loader, the ring-buffer source, the tracker, the aggregator and
//! the metrics endpoint together, and shuts them down cleanly.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use log::{debug, info, warn};
use prometheus::Registry;
use tokio::signal::unix::{signal, SignalKind};

use crate::aggregate::Aggregator;
use crate::cli::RunArgs;
use crate::decode::decode;
use crate::loader::{self, LoadOptions, Loaded};
use crate::metrics::{self, CounterSource, KernelCollector};
use crate::source::{Recorder, RingSource, BATCH_RECORDS};
use crate::tracker::Tracker;

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    if !nix::unistd::geteuid().is_root() {
        warn!("not running as root: loading needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)");
    }
    // Bind first: a taken port should fail before anything is loaded into the kernel.
    let listener = metrics::bind(args.listen).await?;
    let registry = Registry::new();
    let aggregator = Aggregator::new(&registry).context("creating the metrics")?;

    let Loaded { ebpf, ring, counters, reads_sock_err } = loader::load(LoadOptions {
        ring_bytes: args.ring_bytes,
        wakeup_bytes: args.wakeup_bytes(),
    })
    .context("loading the eBPF program")?;
    let collector = Arc::new(KernelCollector::new(counters).context("creating kernel metrics")?);
    registry
        .register(Box::new(SharedCollector(collector.clone())))
        .context("registering kernel metrics")?;
    let mut source =
        RingSource::new(ring, args.drain_interval).context("watching the ring buffer")?;
    info!(
        "attached to sock:inet_sock_set_state (ring {} KiB, {}; close reasons from sk_err: {}); \
         metrics on http://{}/metrics",
        args.ring_bytes / 1024,
        if args.low_latency {
            "wake-up per event".to_owned()
        } else {
            format!("drain every {:?}", args.drain_interval)
        },
        if reads_sock_err { "yes" } else { "no" },
        listener.local_addr().unwrap_or(args.listen),
    );

    // Healthy while the drain loop keeps turning.
    let last_drain_ms = Arc::new(AtomicU64::new(started.elapsed().as_millis() as u64));
    let stale_after = (args.drain_interval * 20).max(Duration::from_secs(5));
    let health = {
        let last_drain_ms = last_drain_ms.clone();
        Arc::new(move || {
            let idle = started
                .elapsed()
                .saturating_sub(Duration::from_millis(last_drain_ms.load(Ordering::Relaxed)));
            if idle > stale_after {
                Err(format!("the ring buffer has not been drained for {idle:?}"))
            } else {
                Ok(())
            }
        })
    };
    let server = tokio::spawn(metrics::serve(listener, registry.clone(), health));

    let mut recorder = match &args.record {
        Some(path) => {
            Some(Recorder::create(path).with_context(|| format!("creating {}", path.display()))?)
        }
        None => None,
    };
    let mut tracker = Tracker::new(args.max_sockets);
    let mut received = 0u64;
    let mut undecodable = 0u64;
    let mut process = |bytes: &[u8], tracker: &mut Tracker| {
        received += 1;
        aggregator.record_received();
        if let Some(out) = recorder.as_mut() {
            if let Err(e) = out.write(bytes) {
                warn!("recording stopped: {e}");
                recorder = None;
            }
        }
        match decode(bytes) {
            Ok(event) => tracker.on_event(&event, &mut &aggregator),
            Err(e) => {
                undecodable += 1;
                aggregator.record_undecodable();
                if undecodable.is_power_of_two() {
                    warn!("skipped an undecodable record ({e}); {undecodable} so far");
                }
            }
        }
    };

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let stop = loop {
        tokio::select! {
            biased;
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            ready = source.ready() => ready.context("waiting on the ring buffer")?,
        }
        loop {
            let drained = source.drain(BATCH_RECORDS, |bytes| process(bytes, &mut tracker));
            if drained < BATCH_RECORDS {
                break;
            }
            // A flood: let the metrics server and the signal handlers in between batches.
            tokio::task::yield_now().await;
        }
        aggregator.publish_tracker(&tracker, unix_now());
        last_drain_ms.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    };

    // Detach first so nothing new arrives, then take what is already in the ring.
    debug!("{stop}: detaching");
    drop(ebpf);
    while source.drain(BATCH_RECORDS, |bytes| process(bytes, &mut tracker)) > 0 {}
    aggregator.publish_tracker(&tracker, unix_now());
    if let Some(e) = recorder.as_mut().and_then(|out| out.flush().err()) {
        warn!("flushing the recording failed: {e}");
    }
    server.abort();
    let lost = collector.lost_so_far();
    info!(
        "{stop}: detached and stopped after {:.1?}: {received} events received, {lost} lost \
         (ring full), {undecodable} undecodable, {} sockets tracked at exit",
        started.elapsed(),
        tracker.len(),
    );
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
