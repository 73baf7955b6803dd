//! The tail's `connection` and `transition` records written as JSON straight into a buffer:
//! byte for byte what [`TailRecord`](super::record::TailRecord) serializes to (the tests
//! hold the two together), without building its owned strings first. The daemon writes one
//! of these for every record a tail client wants: it allocates nothing, and keeps the
//! formatting machinery (`fmt::Display`) off the common paths, which profiling showed to cost
//! more than the rest of the record together.

use std::io::Write as _;
use std::net::IpAddr;

use super::record::micros;
use crate::clock::WallClock;
use crate::decode::TcpStats;
use crate::tracker::{ConnectionRecord, Endpoints, Owner, Side, TransitionRecord};

/// Writes RFC 3339 times with microseconds, as `humantime::format_rfc3339_micros` does,
/// formatting the date and time of day only when the second changes (the records of one
/// drain mostly share it).
#[derive(Clone, Debug, Default)]
pub struct TimeWriter {
    /// The second of `prefix`, as Unix seconds plus one (0: none yet).
    second: u64,
    /// `YYYY-MM-DDTHH:MM:SS` of that second.
    prefix: [u8; 19],
}

impl TimeWriter {
    /// Writes the time of `monotonic_ns`, quoted.
    fn write(&mut self, out: &mut Vec<u8>, clock: &WallClock, monotonic_ns: u64) {
        let unix_ns = clock.unix_ns(monotonic_ns);
        let (second, micros) = (unix_ns / 1_000_000_000, unix_ns % 1_000_000_000 / 1_000);
        if second + 1 != self.second {
            let full = clock.rfc3339(monotonic_ns).to_string();
            match full.as_bytes().get(..19) {
                Some(prefix) => self.prefix.copy_from_slice(prefix),
                None => {
                    // Not the usual form (far future): write it as it is.
                    let _ = write!(out, "\"{full}\"");
                    return;
                }
            }
            self.second = second + 1;
        }
        out.push(b'"');
        out.extend_from_slice(&self.prefix);
        out.push(b'.');
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(micros);
        out.extend(std::iter::repeat_n(b'0', 6 - digits.len()));
        out.extend_from_slice(digits.as_bytes());
        out.extend_from_slice(b"Z\"");
    }
}

/// One JSON object being written: keys in order, values typed.
struct Object<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
    times: &'a mut TimeWriter,
}

impl<'a> Object<'a> {
    fn new(out: &'a mut Vec<u8>, times: &'a mut TimeWriter, kind: &str) -> Self {
        let mut object = Object { out, first: true, times };
        object.text("type", kind);
        object
    }

    fn key(&mut self, key: &str) {
        self.out.push(if self.first { b'{' } else { b',' });
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    /// A string that needs no escaping (a name from a closed set).
    fn text(&mut self, key: &str, value: &str) {
        self.key(key);
        self.out.push(b'"');
        self.out.extend_from_slice(value.as_bytes());
        self.out.push(b'"');
    }

    fn optional_text(&mut self, key: &str, value: Option<&str>) {
        match value {
            Some(value) => self.text(key, value),
            None => self.null(key),
        }
    }

    /// A time, quoted.
    fn time(&mut self, key: &str, clock: &WallClock, monotonic_ns: Option<u64>) {
        match monotonic_ns {
            Some(ns) => {
                self.key(key);
                self.times.write(self.out, clock, ns);
            }
            None => self.null(key),
        }
    }

    /// An address as `IpAddr` displays it, quoted: IPv4 digit by digit, IPv6 (rarer, and
    /// compressed by rules best left to the standard library) through `Display`.
    fn address(&mut self, key: &str, ip: IpAddr) {
        self.key(key);
        self.out.push(b'"');
        match ip {
            IpAddr::V4(v4) => {
                let mut digits = itoa::Buffer::new();
                for (index, octet) in v4.octets().into_iter().enumerate() {
                    if index > 0 {
                        self.out.push(b'.');
                    }
                    self.out.extend_from_slice(digits.format(octet).as_bytes());
                }
            }
            IpAddr::V6(v6) => {
                // Writing into a Vec cannot fail.
                let _ = write!(self.out, "{v6}");
            }
        }
        self.out.push(b'"');
    }

    /// A string from outside (a task name): escaped as JSON requires.
    fn escaped(&mut self, key: &str, value: &str) {
        self.key(key);
        let _ = serde_json::to_writer(&mut *self.out, value);
    }

    fn number(&mut self, key: &str, value: impl itoa::Integer) {
        self.key(key);
        self.out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    fn optional_number(&mut self, key: &str, value: Option<impl itoa::Integer>) {
        match value {
            Some(value) => self.number(key, value),
            None => self.null(key),
        }
    }

    fn boolean(&mut self, key: &str, value: bool) {
        self.key(key);
        self.out.extend_from_slice(if value { b"true" } else { b"false" });
    }

    fn null(&mut self, key: &str) {
        self.key(key);
        self.out.extend_from_slice(b"null");
    }

    fn end(self) {
        self.out.extend_from_slice(b"}\n");
    }

    /// The fields `connection` and `transition` records share (see `record::Identity`).
    fn identity(
        &mut self,
        side: Option<Side>,
        owner: &Owner,
        endpoints: &Endpoints,
        netns: Option<u32>,
        cgroup_id: Option<u64>,
        workload: &str,
    ) {
        let (local, remote) = (endpoints.local(), endpoints.remote());
        self.optional_text("side", side.map(Side::as_str));
        self.optional_number("pid", owner.pid);
        match owner.pid {
            Some(_) => self.escaped("comm", &owner.comm()),
            None => self.null("comm"),
        }
        self.optional_number("netns", netns);
        self.optional_number("cgroup_id", cgroup_id);
        self.escaped("workload", workload);
        self.text("family", if local.is_ipv4() { "ipv4" } else { "ipv6" });
        self.address("local_addr", local.ip());
        self.number("local_port", local.port());
        self.address("remote_addr", remote.ip());
        self.number("remote_port", remote.port());
    }

    /// A connection's counters at CLOSE (see `record::Totals`).
    fn totals(&mut self, stats: Option<&TcpStats>) {
        self.optional_number("bytes_sent", stats.map(TcpStats::payload_sent));
        self.optional_number("bytes_received", stats.map(TcpStats::payload_received));
        self.optional_number("bytes_acked", stats.map(|s| s.bytes_acked));
        self.optional_number("segments_out", stats.map(|s| s.segs_out));
        self.optional_number("segments_in", stats.map(|s| s.segs_in));
        self.optional_number("retransmits", stats.map(|s| s.total_retrans));
        let srtt = stats.and_then(|s| (s.srtt_us_x8 != 0).then_some(s.srtt_us_x8 >> 3));
        self.optional_number("srtt_us", srtt);
    }
}

/// Appends `record`, of workload `workload`, as a `connection` line.
pub fn write_connection(
    out: &mut Vec<u8>,
    times: &mut TimeWriter,
    record: &ConnectionRecord,
    workload: &str,
    clock: &WallClock,
) {
    let mut object = Object::new(out, times, "connection");
    object.text("event", record.phase.as_str());
    object.time("start_time", clock, record.start_ns);
    object.time("time", clock, Some(record.time_ns));
    let (netns, cgroup_id) = (record.netns, record.cgroup_id);
    object.identity(record.side, &record.owner, &record.endpoints, netns, cgroup_id, workload);
    object.optional_number("handshake_us", record.handshake_ns.map(micros));
    object.optional_number("handshake_retransmits", record.handshake_retransmits);
    object.boolean("accept_queue_full", record.accept_queue_full);
    object.optional_number("accept_wait_us", record.accept_wait_ns.map(micros));
    object.optional_number("lifetime_us", record.lifetime_ns.map(micros));
    object.optional_number("teardown_us", record.teardown.map(|(_, ns)| micros(ns)));
    object.optional_text("teardown_side", record.teardown.map(|(side, _)| side.as_str()));
    object.optional_number("close_wait_us", record.close_wait_ns.map(micros));
    object.optional_text("outcome", record.outcome.map(|o| o.as_str()));
    object.totals(record.stats.as_ref());
    object.end();
}

/// Appends `record` as a `transition` line.
pub fn write_transition(
    out: &mut Vec<u8>,
    times: &mut TimeWriter,
    record: &TransitionRecord,
    workload: &str,
    clock: &WallClock,
) {
    let mut object = Object::new(out, times, "transition");
    object.time("time", clock, Some(record.time_ns));
    let (netns, cgroup_id) = (record.netns, record.cgroup_id);
    object.identity(record.side, &record.owner, &record.endpoints, netns, cgroup_id, workload);
    object.text("old_state", record.old.name());
    object.text("new_state", record.new.name());
    object.optional_number("in_old_state_us", record.in_old_ns.map(micros));
    object.end();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{fixture, TcpState};
    use crate::tail::record::{ConnectionLine, TailRecord, TransitionLine};
    use crate::tracker::{CloseReason, ConnectionPhase};

    fn connection(owner: Owner, endpoints: Endpoints, full: bool) -> ConnectionRecord {
        ConnectionRecord {
            phase: if full { ConnectionPhase::Closed } else { ConnectionPhase::Failed },
            start_ns: full.then_some(1_000_000_000),
            time_ns: 1_300_000_123,
            side: full.then_some(Side::Passive),
            owner,
            endpoints,
            handshake_ns: full.then_some(37_500),
            handshake_retransmits: Some(1),
            accept_queue_full: full,
            accept_wait_ns: None,
            netns: full.then_some(4026531840),
            cgroup_id: full.then_some(1 << 40),
            stats: full.then(fixture::closed_stats),
            lifetime_ns: full.then_some(299_999_999),
            teardown: full.then_some((Side::Active, 300_000_000)),
            close_wait_ns: None,
            outcome: Some(if full { CloseReason::Fin } else { CloseReason::Refused }),
        }
    }

    fn owners() -> Vec<Owner> {
        let named = |name: &[u8]| {
            let mut comm = [0u8; 16];
            comm[..name.len()].copy_from_slice(name);
            Owner { pid: Some(7), comm }
        };
        vec![
            Owner::UNKNOWN,
            named(b"nginx"),
            named(b"q\"uo\\te\n\x01"),
            named(b"\xff\xfebad utf8"),
            Owner { pid: Some(u32::MAX), comm: *b"sixteen chars!!!" },
        ]
    }

    fn endpoints() -> Vec<Endpoints> {
        vec![
            Endpoints::new("127.0.0.1:80".parse().unwrap(), "10.0.0.2:40000".parse().unwrap()),
            Endpoints::new("[::1]:443".parse().unwrap(), "[fe80::1]:0".parse().unwrap()),
        ]
    }

    #[test]
    fn connection_lines_are_what_the_records_serialize_to() {
        let clock = WallClock::with_offset(1_795_000_000_000_000_000);
        for owner in owners() {
            for endpoints in endpoints() {
                for (full, workload) in [(true, "shop/web \"1\"\n"), (false, "unknown")] {
                    let record = connection(owner, endpoints, full);
                    let mut written = Vec::new();
                    let times = &mut TimeWriter::default();
                    write_connection(&mut written, times, &record, workload, &clock);
                    let line = ConnectionLine::from_record(&record, workload, &clock);
                    let expected = TailRecord::Connection(Box::new(line)).to_line();
                    assert_eq!(
                        String::from_utf8_lossy(&written),
                        String::from_utf8_lossy(&expected)
                    );
                }
            }
        }
    }

    #[test]
    fn times_are_humantimes_whether_the_second_is_new_or_not() {
        let clock = WallClock::with_offset(1_795_000_000_000_000_000);
        let mut times = TimeWriter::default();
        for ns in
            [0, 999_999_999, 1_000_000_000, 1_000_000_001, 1_000_999_999, 86_400_000_000_000, 5]
        {
            let mut written = Vec::new();
            times.write(&mut written, &clock, ns);
            assert_eq!(String::from_utf8(written).unwrap(), format!("\"{}\"", clock.format(ns)));
        }
    }

    #[test]
    fn transition_lines_are_what_the_records_serialize_to() {
        let clock = WallClock::with_offset(1_795_000_000_000_000_000);
        for owner in owners() {
            for endpoints in endpoints() {
                for (side, in_old_ns) in [(None, None), (Some(Side::Active), Some(41_000_000))] {
                    let record = TransitionRecord {
                        time_ns: 5_000_000_000,
                        side,
                        owner,
                        endpoints,
                        netns: side.map(|_| 1),
                        cgroup_id: side.map(|_| 7),
                        old: TcpState::FinWait1,
                        new: TcpState::FinWait2,
                        in_old_ns,
                    };
                    let mut written = Vec::new();
                    let times = &mut TimeWriter::default();
                    write_transition(&mut written, times, &record, "web.service", &clock);
                    let line = TransitionLine::from_record(&record, "web.service", &clock);
                    let expected = TailRecord::Transition(Box::new(line)).to_line();
                    assert_eq!(
                        String::from_utf8_lossy(&written),
                        String::from_utf8_lossy(&expected)
                    );
                }
            }
        }
    }
}
