//! The main connection metrics split by network namespace (`--netns-labels N`).

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use super::{seconds, LATENCY_BUCKETS};
use crate::metrics::registered;
use crate::tracker::{CloseReason, Observation, Side};

/// The main connection metrics split by network namespace (`--netns-labels N`): the first N
/// namespaces seen get a `netns` label of their own (the inode, as `readlink
/// /proc/PID/ns/net` shows it), later ones share `netns="other"`, so the series stay bounded
/// on a host that creates namespaces all day. The values are the naming service's, which the
/// kernel counters' `netns` label shares.
pub(super) struct NamespaceMetrics {
    opened: IntCounterVec,
    closed: IntCounterVec,
    failures: IntCounterVec,
    handshake: HistogramVec,
}

impl NamespaceMetrics {
    /// Records `observation` under its namespace's value `ns`.
    pub(super) fn observe(&self, observation: &Observation, ns: &str) {
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

impl NamespaceMetrics {
    /// Removes every series of the retired `netns` value `ns`.
    pub(super) fn remove(&self, ns: &str) {
        for side in ["active", "passive"] {
            let _ = self.opened.remove_label_values(&[ns, side]);
            let _ = self.handshake.remove_label_values(&[ns, side]);
        }
        for reason in CloseReason::ALL {
            let _ = self.failures.remove_label_values(&[ns, reason.as_str()]);
            for side in ["active", "passive", "unknown"] {
                let _ = self.closed.remove_label_values(&[ns, side, reason.as_str()]);
            }
        }
    }

    /// Registers the per-namespace families.
    pub(super) fn new(registry: &Registry) -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            registered(registry, IntCounterVec::new(Opts::new(name, help), labels)?)
        };
        let handshake = HistogramVec::new(
            HistogramOpts::new(
                "tcpmon_netns_handshake_duration_seconds",
                "tcpmon_handshake_duration_seconds by network namespace.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["netns", "side"],
        )?;
        let handshake = registered(registry, handshake)?;
        Ok(NamespaceMetrics {
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
        })
    }
}
