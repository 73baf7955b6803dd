//! tcpmon: TCP connection-state monitoring with eBPF.
//!
//! Data flows kernel → [`loader`] (attach) → [`source`] (per-CPU ring buffers, merged back
//! into time order by [`reorder`]) → [`decode`] (bytes → events) → [`tracker`] (per-socket
//! state machine → observations) → [`aggregate`] (Prometheus metrics, served by
//! [`metrics`]) and the tail hub ([`tail`]); [`pipeline`] is that path, which
//! [`daemon`] and [`standalone`] (the tail without a daemon) drive. Only `loader`, `source` and [`snapshot`] (the sockets that exist at
//! start-up) touch the kernel; everything else is plain Rust driven by unit tests with
//! recorded events.

pub mod aggregate;
pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod decode;
pub mod exit;
pub mod loader;
pub mod logging;
pub mod metrics;
pub mod naming;
pub mod netstate;
pub mod pipeline;
pub mod privilege;
pub mod reorder;
pub mod snapshot;
pub mod sockdiag;
pub mod source;
pub mod standalone;
pub mod tail;
pub mod tracker;
pub mod web;
