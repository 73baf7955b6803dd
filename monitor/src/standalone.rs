//! `tcpmon tail` without a daemon: the tail loads the program itself and runs the pipeline
//! for its one client, until that client goes away.

use anyhow::Context as _;
use prometheus::Registry;

use crate::aggregate::Aggregator;
use crate::clock::WallClock;
use crate::naming::labels::LabelLimits;
use crate::naming::workload::Workloads;
use crate::naming::{Naming, NamingService};
use crate::pipeline::{Controls, Pipeline, PipelineOptions};
use crate::privilege::PrivilegedThread;
use crate::tail::hub::{NewSubscriber, TailHub, TailMetrics};

/// Runs the pipeline for one in-process tail client (`tcpmon tail` without a daemon) until
/// that client goes away.
pub async fn standalone(options: PipelineOptions, client: NewSubscriber) -> anyhow::Result<()> {
    let registry = Registry::new(); // never served; the aggregator needs one
    let names = Workloads::discover(crate::naming::workload::DEFAULT_POD_LOGS.into());
    let naming = NamingService::new(Naming::new(LabelLimits::NONE, names, 0));
    let aggregator = Aggregator::with_labels(&registry, naming)?;
    let hub = TailHub::new(WallClock::now(), TailMetrics::new(&registry)?, "standalone");
    let mut loaded = options.load()?;
    let rings = std::mem::take(&mut loaded.rings);
    if let Some(kernel_log) = loaded.kernel_log.take() {
        tokio::spawn(kernel_log.forward());
    }
    let mut pipeline = Pipeline::attach(rings, loaded.ring_bytes, &options, aggregator, hub)?;
    pipeline.set_accepts_seen(loaded.enrichments.accept.is_some());
    let reader = PrivilegedThread::start().context("starting the snapshot thread")?;
    pipeline.load_snapshot(None, &reader).await;
    pipeline.add_subscriber(client);
    let mut controls = Controls {
        stop: std::future::pending(),
        hangup: None,
        subscribers: None,
        until_no_clients: true,
        // A tail shows transitions, not gauges: what the table believes of quiet sockets
        // does not show.
        quiet: None,
    };
    pipeline.run(&mut controls).await?;
    drop(loaded);
    Ok(())
}
