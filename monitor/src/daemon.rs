//! `tcpmon run`: claim the metrics address and the tail socket, load the programs, and run
//! the [`Pipeline`] until SIGINT or SIGTERM, reloading the config file on SIGHUP.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use log::{debug, info, warn};
use prometheus::Registry;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::aggregate::Aggregator;
use crate::cli::{Command, RunArgs};
use crate::clock::WallClock;
use crate::config::{self, Values};
use crate::exit::StartError;
use crate::loader::KernelCounters;
use crate::loader::Loaded;
use crate::logging;
use crate::metrics::{CounterSource, CountersOnThread, KernelCollector};
use crate::naming::workload::Workloads;
use crate::naming::{Naming, NamingService};
use crate::netstate::NetState;
use crate::pipeline::quiet::QuietChecks;
use crate::pipeline::{Controls, Pipeline, Wake};
use crate::privilege::{self, Capability, PrivilegedThread};
use crate::source::RingSource;
use crate::tail::hub::{self, TailHub, TailMetrics};
use crate::web;
use crate::web::active::ActiveConfig;

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

/// The settings a SIGHUP applies at once (keys of the config file); the others take effect
/// at the next start.
const LOG_LEVEL: &str = "log-level";
/// See [`LOG_LEVEL`].
const DRAIN_INTERVAL: &str = "drain-interval";
/// See [`LOG_LEVEL`].
const MAX_SOCKETS: &str = "max-sockets";

/// What SIGHUP may change without a restart, and how.
struct Reloader {
    /// The config file, if the daemon was given one.
    config: Option<PathBuf>,
    /// Every setting as the daemon runs with it (those that need a restart at their
    /// start-up value).
    running: Values,
    /// The same, typed, for the log.
    current: RunArgs,
}

impl Reloader {
    /// Re-reads the config file and applies what can change while running: the log level
    /// (a plain level), the drain interval and the socket table's cap. Counters, histograms
    /// and tracked sockets are untouched; a bad file changes nothing.
    fn reload(&mut self, pipeline: &mut Pipeline<RingSource>) {
        let Some(path) = self.config.as_ref() else {
            info!("SIGHUP: no --config file to reload");
            return;
        };
        let new = match config::reread() {
            Ok(settings) => settings,
            Err(e) => {
                warn!("SIGHUP: keeping the running configuration: {e}");
                return;
            }
        };
        let Command::Run(args) = &new.cli.command else {
            warn!("SIGHUP: the command line no longer reads as `tcpmon run`; nothing changed");
            return;
        };
        let mut changed = Vec::new();
        // The same source as at start-up: the flag or file, else RUST_LOG, else info.
        match logging::set_level(&logging::filter_of(&new.cli)) {
            Ok(Some((old, level))) => changed.push(format!("log level {old} -> {level}")),
            Ok(None) => {}
            Err(e) => warn!("SIGHUP: {e}"),
        }
        self.running.adopt(LOG_LEVEL, &new.values);
        for key in self.running.changed_in(&new.values) {
            match key.as_str() {
                // Written differently (`0.1s` for `100ms`) need not mean changed.
                DRAIN_INTERVAL if args.drain_interval != self.current.drain_interval => {
                    let (old, new) = (self.current.drain_interval, args.drain_interval);
                    changed.push(format!("drain interval {old:?} -> {new:?}"));
                    pipeline.set_drain_interval(new);
                    self.current.drain_interval = new;
                }
                MAX_SOCKETS if args.max_sockets != self.current.max_sockets => {
                    let (old, new) = (self.current.max_sockets, args.max_sockets);
                    changed.push(format!("max sockets {old} -> {new}"));
                    pipeline.set_max_sockets(new);
                    self.current.max_sockets = new;
                }
                DRAIN_INTERVAL | MAX_SOCKETS => {}
                _ => {
                    let at = path.display();
                    warn!("SIGHUP: `{key}` changed in {at}; it takes effect at restart");
                    continue;
                }
            }
            self.running.adopt(&key, &new.values);
        }
        info!(
            "SIGHUP: reloaded {}: {}",
            path.display(),
            if changed.is_empty() { "nothing to change".to_owned() } else { changed.join(", ") }
        );
    }
}

/// Runs the daemon until SIGINT or SIGTERM. `values` are the settings as written, which a
/// reload compares the config file's new ones with.
pub async fn run(args: RunArgs, values: Values) -> anyhow::Result<()> {
    let started = Instant::now();
    let stop = termination()?;
    // SIGHUP's default action ends the process: take it over before anything slow.
    let hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut reloader =
        Reloader { config: args.config.clone(), running: values, current: args.clone() };
    if !nix::unistd::geteuid().is_root() {
        warn!("not running as root: loading needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)");
    }
    // A broken web config is a usage error, found before anything else is claimed.
    let (web_config, web_sources) = match &args.web_config {
        Some(path) => {
            let (active, sources) =
                ActiveConfig::load(path).map_err(|e| StartError::WebConfig(e.to_string()))?;
            (active, Some(sources))
        }
        None => (ActiveConfig::open(), None),
    };
    // Claim the sockets first: a taken port or a running daemon should fail before anything
    // is loaded into the kernel.
    let listener = web::bind(args.listen).await?;
    let tail_listener = hub::bind_socket(&args.tail_socket)?;
    // Started now, so it has the capabilities this thread has; it keeps only what the
    // kernel reads at scrape time need once start-up is done (see `drop_privileges`).
    let reader = PrivilegedThread::start().context("starting the kernel-reader thread")?;
    let registry = Registry::new();
    let names = match &args.cgroup_root {
        Some(root) => Workloads::new(Some(root.clone()), args.pod_logs.clone()),
        None => Workloads::discover(args.pod_logs.clone()),
    };
    match names.mount() {
        Some(mount) => info!("naming workloads from the cgroup2 tree at {}", mount.display()),
        None => warn!("no cgroup2 mount in /proc/self/mountinfo: every workload is `unknown`"),
    }
    // The one source of label values, shared by the connection metrics, the kernel state
    // read at scrape time and the tail.
    let naming = NamingService::new(Naming::new(args.label_limits(), names, args.netns_labels));
    let mut aggregator =
        Aggregator::with_labels(&registry, naming.clone()).context("creating the metrics")?;
    if args.netns_labels > 0 {
        aggregator.enable_netns_labels(&registry).context("creating the per-namespace metrics")?;
    }
    let kernel_state =
        NetState::new(reader.clone(), naming).context("creating the kernel state metrics")?;
    // Read outside the scrape gate (see `metrics::encode`).
    let kernel_registry = Registry::new();
    kernel_registry
        .register(Box::new(kernel_state))
        .context("registering the kernel state metrics")?;
    let hub = TailHub::new(WallClock::now(), TailMetrics::new(&registry)?, "daemon");

    let options = args.pipeline_options();
    let Loaded { ebpf, rings, ring_bytes, counters, reads_sock_err, enrichments, hook, kernel_log } =
        options.load()?;
    if let Some(kernel_log) = kernel_log {
        tokio::spawn(kernel_log.forward());
    }
    let counters = Arc::new(counters);
    let on_thread = CountersOnThread { counters: counters.clone(), reader: reader.clone() };
    let collector = Arc::new(KernelCollector::new(on_thread).context("creating kernel metrics")?);
    registry
        .register(Box::new(SharedCollector(collector.clone())))
        .context("registering kernel metrics")?;
    let ring_count = rings.len();
    let gate = aggregator.scrape_gate();
    let mut pipeline = Pipeline::attach(rings, ring_bytes, &options, aggregator, hub)?;
    pipeline.set_accepts_seen(enrichments.accept.is_some());
    pipeline.load_snapshot(args.cgroup_root.clone(), &reader).await;
    drop_privileges(&reader, &counters);
    info!(
        "attached to sock:inet_sock_set_state ({} build; {} rings of {} KiB, {}; close reasons from sk_err: {}; \
         SYN-ACK times: {}; reset direction: {}; accept() seen through: {}); metrics on {}://{}/metrics ({}), tails on {}",
        hook.name(),
        ring_count,
        ring_bytes / 1024,
        if args.low_latency {
            "wake-up per event".to_owned()
        } else {
            format!("drain every {:?}", args.drain_interval)
        },
        if reads_sock_err { "yes" } else { "no" },
        match enrichments.synack {
            Some(build) => format!("yes ({} build)", build.name()),
            None => "no".to_owned(),
        },
        if enrichments.resets { "yes" } else { "no" },
        enrichments.accept_route(),
        if web_config.current().tls.is_some() { "https" } else { "http" },
        listener.local_addr().unwrap_or(args.listen),
        web_config.describe(),
        args.tail_socket.display(),
    );

    // systemd (Type=notify): started. Outside systemd there is no NOTIFY_SOCKET and this
    // does nothing.
    notify(sd_notify::NotifyState::Ready);

    // Healthy while the drain loop keeps turning.
    let heartbeat = pipeline.heartbeat();
    let stale_after = (args.drain_interval * 20).max(Duration::from_secs(5));
    let health = Arc::new(move || {
        let idle = heartbeat.since_last_drain();
        if idle > stale_after {
            Err(format!("the ring buffer has not been drained for {idle:?}"))
        } else {
            Ok(())
        }
    });
    // systemd's watchdog (WatchdogSec=): pinged while the drain loop turns, so a daemon that
    // hangs is restarted rather than left serving stale numbers.
    let mut watchdog_usec = 0;
    if sd_notify::watchdog_enabled(false, &mut watchdog_usec) {
        let healthy = health.clone();
        let period = Duration::from_micros(watchdog_usec / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            loop {
                ticks.tick().await;
                if healthy().is_ok() {
                    notify(sd_notify::NotifyState::Watchdog);
                }
            }
        });
    }
    if let Some(sources) = web_sources {
        tokio::spawn(web_config.clone().watch(sources));
    }
    let guard = web::Guard {
        config: web_config,
        max_connections: args.web_max_connections,
        metrics: web::HttpMetrics::new(&registry).context("creating the HTTP metrics")?,
    };
    let server =
        tokio::spawn(web::serve(listener, registry.clone(), kernel_registry, gate, health, guard));
    let (subscribe, subscribers) = mpsc::channel(16);
    let live_clients = hub::LiveClients::default();
    let tails = tokio::spawn(hub::serve(tail_listener, subscribe, live_clients.clone()));

    let mut controls = Controls {
        stop: Box::pin(stop),
        hangup: Some(hangup),
        subscribers: Some(subscribers),
        until_no_clients: false,
        quiet: Some(QuietChecks::new(reader.clone())),
    };
    let stop = loop {
        match pipeline.run(&mut controls).await? {
            Wake::Hangup => {
                notify(sd_notify::NotifyState::Reloading);
                reloader.reload(&mut pipeline);
                notify(sd_notify::NotifyState::Ready);
            }
            Wake::Stop(reason) => break reason,
            Wake::NoClients => {}
        }
    };

    notify(sd_notify::NotifyState::Stopping);
    // Detach first so nothing new arrives, then take what is already in the ring.
    debug!("{stop}: detaching");
    drop(ebpf);
    let summary = pipeline.finish();
    server.abort();
    tails.abort();
    // The pipeline's end ended the tail queues: let each client write what it still has.
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

/// Start-up is done: drops every capability of this thread (the drain loop's; the runtime's
/// threads dropped theirs as they started) and, on the kernel-reader thread, all but what
/// scrapes still need ([`privilege::kept_after_startup`]). A failure is logged: the daemon
/// works on, with more privilege than it needs.
fn drop_privileges(reader: &PrivilegedThread, counters: &Arc<KernelCounters>) {
    let held = match privilege::effective() {
        Ok(held) => held,
        Err(e) => {
            warn!("{e}: keeping every capability");
            return;
        }
    };
    if let Err(e) = privilege::restrict_thread(&[]) {
        warn!("{e}: the drain thread keeps its capabilities");
    }
    // A thread started now has none (it copies this one's): can it still read the maps?
    let probe = counters.clone();
    let maps_need_cap_bpf =
        std::thread::spawn(move || probe.read().is_err()).join().unwrap_or(true);
    let kept = privilege::kept_after_startup(&held, maps_need_cap_bpf);
    let why = match kept.first() {
        Some(Capability::CAP_SYS_ADMIN) => " (to enter network namespaces at scrape time)",
        Some(_) => " (this kernel wants it for every bpf() call: reading the counter maps)",
        None => "",
    };
    match reader.restrict(kept) {
        Ok(now) => info!(
            "start-up done: of the {} capabilities held, the kernel-reader thread keeps \
             {}{why}; every other thread holds none",
            held.len(),
            privilege::names(&now),
        ),
        Err(e) => warn!("{e}: the kernel-reader thread keeps its capabilities"),
    }
}

/// Tells systemd (under `Type=notify`) where the daemon is; a failure only costs the notice.
fn notify(state: sd_notify::NotifyState<'_>) {
    let what = format!("{state:?}");
    if let Err(e) = sd_notify::notify(false, &[state]) {
        debug!("telling systemd {what}: {e}");
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_a_reload_applies_are_config_keys() {
        let keys: Vec<String> = config::keys().into_iter().map(|key| key.name).collect();
        for key in [LOG_LEVEL, DRAIN_INTERVAL, MAX_SOCKETS] {
            assert!(keys.iter().any(|k| k == key), "{key} in {keys:?}");
        }
    }
}
