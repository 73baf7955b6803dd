//! The tail's records: what the daemon sends a client, and exactly what `tcpmon tail --json`
//! prints — one JSON object per line, tagged by `"type"`. Field names carry their units
//! (`_us` = microseconds); times are RFC 3339 in UTC with microseconds.
//!
//! | type | fields |
//! |---|---|
//! | `connection` | `event` (`established`, `closed`, `failed`), `start_time` (null if first seen mid-life), `time`, `side` (`active`, `passive`, null), `pid`, `comm` (null when unknown), `netns` (network namespace inode, as in `/proc/PID/ns/net`), `cgroup_id` (the socket's cgroup v2 id, null when unknown), `workload` (its name: `namespace/pod`, `container/<id>`, a systemd unit, a cgroup path, `host`, or `unknown`), `family` (`ipv4`, `ipv6`), `local_addr`, `local_port`, `remote_addr`, `remote_port`, `handshake_us` (active: SYN → SYN-ACK; passive: first SYN-ACK → ACK), `handshake_retransmits` (SYNs or SYN-ACKs resent), `accept_queue_full` (accepted connections whose SYN-ACK was resent after the client's ACK, which the kernel dropped because the listener's accept queue was full), `accept_wait_us` (accepted connections: ESTABLISHED, when the connection is queued, → the application's accept(); null until accepted or when accept() is not seen), `lifetime_us`, `teardown_us`, `teardown_side`, `close_wait_us`, `outcome` (`fin`, `reset_received`, `reset_sent`, `abort`, `timeout`, `refused`, `unreachable`, `error`, `unknown`; null while established); on `closed` and `failed`: `bytes_sent` and `bytes_received` (application payload, exact), `bytes_acked` (the kernel's counter as `ss`/`tcplife` show it: payload + 1 for each acknowledged SYN and FIN), `segments_out`, `segments_in`, `retransmits`, `srtt_us` (null when unknown) |
//! | `transition` | `time`, `side`, `pid`, `comm`, `netns`, `cgroup_id`, `workload`, `family`, addresses and ports as above, `old_state`, `new_state`, `in_old_state_us` (null when the old state's start was not seen) |
//! | `missed` | `records`: how many records the daemon dropped because this client read too slowly |
//! | `hello` | `version`, `mode` (`daemon`, `standalone`): first line of a stream (not printed) |
//! | `error` | `message`: the daemon refused the request (not printed to stdout) |

use serde::{Deserialize, Serialize};

/// Protocol version of the subscribe request and the records.
pub const PROTOCOL_VERSION: u32 = 1;

/// One line of a tail stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TailRecord {
    /// A connection was established, closed, or failed. (Both records are boxed: each is
    /// hundreds of bytes, the other lines a few dozen.)
    Connection(Box<ConnectionLine>),
    /// A state transition (events view).
    Transition(Box<TransitionLine>),
    /// Records dropped for this client.
    Missed {
        /// How many.
        records: u64,
    },
    /// First line of every stream.
    Hello {
        /// [`PROTOCOL_VERSION`].
        version: u32,
        /// `daemon` or `standalone`.
        mode: String,
    },
    /// The request was refused.
    Error {
        /// Why.
        message: String,
    },
}

/// Who and where: the fields `connection` and `transition` records share.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    /// `active`, `passive`, or null.
    pub side: Option<String>,
    /// Owning process id.
    pub pid: Option<u32>,
    /// Owning task name.
    pub comm: Option<String>,
    /// Network namespace inode.
    pub netns: Option<u32>,
    /// The socket's cgroup v2 id.
    pub cgroup_id: Option<u64>,
    /// The workload the cgroup is named after (`unknown` when it is not known).
    pub workload: String,
    /// `ipv4` or `ipv6`.
    pub family: String,
    /// Local address.
    pub local_addr: String,
    /// Local port.
    pub local_port: u16,
    /// Remote address.
    pub remote_addr: String,
    /// Remote port.
    pub remote_port: u16,
}

/// A `connection` record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectionLine {
    /// `established`, `closed` or `failed`.
    pub event: String,
    /// When the connection began (SYN sent, or accepted child created).
    pub start_time: Option<String>,
    /// When this record's transition happened.
    pub time: String,
    /// Side, owner, addresses and ports (flattened into the record's own fields).
    #[serde(flatten)]
    pub who: Identity,
    /// Active: SYN sent → SYN-ACK received; passive: first SYN-ACK sent → final ACK.
    pub handshake_us: Option<u64>,
    /// SYN (active) or SYN-ACK (passive) retransmissions in the handshake.
    pub handshake_retransmits: Option<u32>,
    /// Accepted while the listener's accept queue was full (a SYN-ACK resent after the
    /// client's ACK).
    pub accept_queue_full: bool,
    /// Accepted connections: ESTABLISHED (queued) → the application's accept(); null until
    /// accepted, or when accept() is not seen.
    pub accept_wait_us: Option<u64>,
    /// ESTABLISHED → CLOSE.
    pub lifetime_us: Option<u64>,
    /// First FIN → CLOSE, orderly closes.
    pub teardown_us: Option<u64>,
    /// Who sent the first FIN.
    pub teardown_side: Option<String>,
    /// CLOSE_WAIT → LAST_ACK.
    pub close_wait_us: Option<u64>,
    /// How it ended.
    pub outcome: Option<String>,
    /// The socket's counters at CLOSE (null on `established`).
    #[serde(flatten)]
    pub totals: Totals,
}

/// A connection's `tcp_sock` counters at CLOSE.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Application payload sent, each byte once (`bytes_sent` − `bytes_retrans`).
    pub bytes_sent: Option<u64>,
    /// Application payload received (`bytes_received` without the peer's FIN).
    pub bytes_received: Option<u64>,
    /// The kernel's `bytes_acked` as `ss -i` and `tcplife` show it: acknowledged sequence
    /// space, i.e. payload plus one each for an acknowledged SYN and FIN.
    pub bytes_acked: Option<u64>,
    /// Segments sent, retransmissions included.
    pub segments_out: Option<u32>,
    /// Segments received.
    pub segments_in: Option<u32>,
    /// Segments retransmitted over the connection's life.
    pub retransmits: Option<u32>,
    /// Smoothed RTT at close, µs (null when no RTT was ever sampled).
    pub srtt_us: Option<u32>,
}

/// A `transition` record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransitionLine {
    /// When it happened.
    pub time: String,
    /// Side, owner, addresses and ports (flattened into the record's own fields).
    #[serde(flatten)]
    pub who: Identity,
    /// State before, e.g. `SYN_SENT`.
    pub old_state: String,
    /// State after.
    pub new_state: String,
    /// Time spent in the old state.
    pub in_old_state_us: Option<u64>,
}

/// Nanoseconds as the tail's whole microseconds.
pub(super) fn micros(ns: u64) -> u64 {
    ns / 1_000
}

impl TailRecord {
    /// The record as one line of JSON, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        // Serializing these plain structs cannot fail.
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

/// The records built the slow, obvious way from the tracker's: the reference that the
/// daemon's allocation-free writer (`json.rs`) is checked against. Tests only.
#[cfg(test)]
mod reference {
    use super::{micros, ConnectionLine, Identity, Totals, TransitionLine};
    use crate::clock::WallClock;
    use crate::decode::TcpStats;
    use crate::tracker::{ConnectionRecord, Endpoints, Owner, Side, TransitionRecord};

    impl Identity {
        /// The identity of a tracked socket.
        pub fn of(
            side: Option<Side>,
            owner: &Owner,
            endpoints: &Endpoints,
            netns: Option<u32>,
            cgroup_id: Option<u64>,
            workload: &str,
        ) -> Self {
            let (local, remote) = (endpoints.local(), endpoints.remote());
            let (pid, comm) = match owner.pid {
                Some(pid) => (Some(pid), Some(owner.comm().into_owned())),
                None => (None, None),
            };
            Identity {
                side: side.map(|s| s.as_str().to_owned()),
                pid,
                comm,
                netns,
                cgroup_id,
                workload: workload.to_owned(),
                family: if local.is_ipv4() { "ipv4" } else { "ipv6" }.to_owned(),
                local_addr: local.ip().to_string(),
                local_port: local.port(),
                remote_addr: remote.ip().to_string(),
                remote_port: remote.port(),
            }
        }
    }

    impl Totals {
        fn of(stats: Option<&TcpStats>) -> Self {
            let Some(stats) = stats else { return Totals::default() };
            Totals {
                bytes_sent: Some(stats.payload_sent()),
                bytes_received: Some(stats.payload_received()),
                bytes_acked: Some(stats.bytes_acked),
                segments_out: Some(stats.segs_out),
                segments_in: Some(stats.segs_in),
                retransmits: Some(stats.total_retrans),
                srtt_us: (stats.srtt_us_x8 != 0).then_some(stats.srtt_us_x8 >> 3),
            }
        }
    }

    impl ConnectionLine {
        /// The JSON form of a tracker record of workload `workload`.
        pub fn from_record(record: &ConnectionRecord, workload: &str, clock: &WallClock) -> Self {
            ConnectionLine {
                event: record.phase.as_str().to_owned(),
                start_time: record.start_ns.map(|ns| clock.format(ns)),
                time: clock.format(record.time_ns),
                who: Identity::of(
                    record.side,
                    &record.owner,
                    &record.endpoints,
                    record.netns,
                    record.cgroup_id,
                    workload,
                ),
                handshake_us: record.handshake_ns.map(micros),
                handshake_retransmits: record.handshake_retransmits,
                accept_queue_full: record.accept_queue_full,
                accept_wait_us: record.accept_wait_ns.map(micros),
                lifetime_us: record.lifetime_ns.map(micros),
                teardown_us: record.teardown.map(|(_, ns)| micros(ns)),
                teardown_side: record.teardown.map(|(s, _)| s.as_str().to_owned()),
                close_wait_us: record.close_wait_ns.map(micros),
                outcome: record.outcome.map(|o| o.as_str().to_owned()),
                totals: Totals::of(record.stats.as_ref()),
            }
        }
    }

    impl TransitionLine {
        /// The JSON form of a tracker record of workload `workload`.
        pub fn from_record(record: &TransitionRecord, workload: &str, clock: &WallClock) -> Self {
            TransitionLine {
                time: clock.format(record.time_ns),
                who: Identity::of(
                    record.side,
                    &record.owner,
                    &record.endpoints,
                    record.netns,
                    record.cgroup_id,
                    workload,
                ),
                old_state: record.old.name().to_owned(),
                new_state: record.new.name().to_owned(),
                in_old_state_us: record.in_old_ns.map(micros),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::WallClock;
    use crate::decode::fixture;
    use crate::tracker::{CloseReason, ConnectionPhase, ConnectionRecord, Endpoints, Owner, Side};

    #[test]
    fn json_field_names_and_units_are_stable() {
        let record = ConnectionRecord {
            phase: ConnectionPhase::Closed,
            start_ns: Some(1_000_000_000),
            time_ns: 1_300_000_000,
            side: Some(Side::Passive),
            owner: Owner { pid: Some(7), comm: *b"nginx\0\0\0\0\0\0\0\0\0\0\0" },
            endpoints: Endpoints::new("[::1]:443".parse().unwrap(), "[::1]:50000".parse().unwrap()),
            handshake_ns: None,
            handshake_retransmits: Some(1),
            accept_queue_full: true,
            accept_wait_ns: Some(400_123_000),
            netns: Some(4026531840),
            cgroup_id: Some(4242),
            stats: Some(fixture::closed_stats()),
            lifetime_ns: Some(299_999_999),
            teardown: Some((Side::Passive, 300_000_000)),
            close_wait_ns: Some(250_000_000),
            outcome: Some(CloseReason::Fin),
        };
        let clock = WallClock::with_offset(1_795_000_000_000_000_000);
        let line = TailRecord::Connection(Box::new(ConnectionLine::from_record(
            &record,
            "nginx.service",
            &clock,
        )))
        .to_line();
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        let object = value.as_object().unwrap();
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "accept_queue_full",
                "accept_wait_us",
                "bytes_acked",
                "bytes_received",
                "bytes_sent",
                "cgroup_id",
                "close_wait_us",
                "comm",
                "event",
                "family",
                "handshake_retransmits",
                "handshake_us",
                "lifetime_us",
                "local_addr",
                "local_port",
                "netns",
                "outcome",
                "pid",
                "remote_addr",
                "remote_port",
                "retransmits",
                "segments_in",
                "segments_out",
                "side",
                "srtt_us",
                "start_time",
                "teardown_side",
                "teardown_us",
                "time",
                "type",
                "workload"
            ]
        );
        assert_eq!(value["type"], "connection");
        assert_eq!(value["event"], "closed");
        assert_eq!(value["lifetime_us"], 299_999); // microseconds, truncated
        assert_eq!(value["teardown_us"], 300_000);
        assert_eq!(value["close_wait_us"], 250_000);
        assert_eq!(value["handshake_us"], serde_json::Value::Null);
        assert_eq!(value["family"], "ipv6");
        assert_eq!(value["netns"], 4026531840u32);
        assert_eq!(
            (&value["cgroup_id"], &value["workload"]),
            (&4242.into(), &"nginx.service".into())
        );
        assert_eq!(value["handshake_retransmits"], 1);
        assert_eq!(value["accept_queue_full"], true);
        assert_eq!(value["accept_wait_us"], 400_123);
        assert_eq!(value["bytes_acked"], 1_000_001);
        assert_eq!(value["bytes_sent"], 1_000_000);
        assert_eq!(value["bytes_received"], 12);
        assert_eq!(value["srtt_us"], 250); // the kernel keeps srtt << 3
        assert_eq!(value["local_addr"], "::1");
        assert_eq!(value["remote_port"], 50000);
        assert_eq!(value["start_time"], "2026-11-18T11:06:41.000000Z");
        assert_eq!(value["time"], "2026-11-18T11:06:41.300000Z");
        assert!(line.ends_with(b"}\n"));
        // What the client prints with --json parses back into the same record.
        let back: TailRecord = serde_json::from_slice(&line).unwrap();
        assert!(
            matches!(back, TailRecord::Connection(c) if c.who.comm.as_deref() == Some("nginx"))
        );
    }

    #[test]
    fn missed_notices_are_records_too() {
        let line = TailRecord::Missed { records: 3 }.to_line();
        assert_eq!(line, b"{\"type\":\"missed\",\"records\":3}\n");
    }
}
