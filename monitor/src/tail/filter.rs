//! What a tail client wants to see. The client sends a [`Subscribe`] request; the daemon
//! applies the [`Filter`] before formatting anything, so a narrow tail on a busy host costs
//! little. Values of one criterion are alternatives (OR); different criteria must all hold.

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::record::PROTOCOL_VERSION;
use crate::tracker::{
    CloseReason, ConnectionPhase, ConnectionRecord, Endpoints, Owner, Side, TransitionRecord,
};

/// Which records a tail shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum View {
    /// One record per connection when it ends (and, optionally, when it is established).
    #[default]
    Connections,
    /// One record per state transition.
    Events,
    /// The connections now in CLOSE_WAIT, once, oldest first; then the stream ends.
    CloseWait,
}

/// A client's request: the first line it sends, as JSON.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscribe {
    /// Must be [`PROTOCOL_VERSION`].
    pub version: u32,
    /// Connections or events.
    #[serde(default)]
    pub view: View,
    /// Connections view: also send a record when a connection is established.
    #[serde(default)]
    pub established: bool,
    /// What to keep.
    #[serde(default)]
    pub filter: Filter,
}

/// Criteria a record must meet.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Filter {
    /// Local or remote port.
    pub ports: Vec<u16>,
    /// Local port.
    pub local_ports: Vec<u16>,
    /// Remote port.
    pub remote_ports: Vec<u16>,
    /// Local or remote address within one of these networks.
    pub addrs: Vec<IpNet>,
    /// Local address within one of these networks.
    pub local_addrs: Vec<IpNet>,
    /// Remote address within one of these networks.
    pub remote_addrs: Vec<IpNet>,
    /// Owning process id.
    pub pids: Vec<u32>,
    /// Owning task name (exact).
    pub comms: Vec<String>,
    /// `active` or `passive`.
    pub sides: Vec<String>,
    /// Workload name patterns (`*` matches any run of characters).
    pub workloads: Vec<String>,
    /// Connection outcomes (`fin`, `reset`, …); connections view only.
    pub outcomes: Vec<String>,
    /// Minimum handshake, µs; connections view only.
    pub min_handshake_us: Option<u64>,
    /// Minimum lifetime, µs; connections view only.
    pub min_lifetime_us: Option<u64>,
    /// Minimum teardown, µs; connections view only.
    pub min_teardown_us: Option<u64>,
}

/// Parses `10.0.0.0/8`, `2001:db8::/32`, or a plain address (a /32 or /128).
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    IpNet::from_str(text)
        .or_else(|_| IpAddr::from_str(text).map(|ip| IpNet::from(ip.to_canonical())))
        .map(|net| net.trunc())
        .map_err(|_| format!("`{text}` is not an address or CIDR network (e.g. 10.0.0.0/8, ::1)"))
}

/// Parses an outcome name.
pub fn parse_outcome(text: &str) -> Result<String, String> {
    if text == "reset" {
        return Ok(text.to_owned());
    }
    CloseReason::ALL.iter().find(|r| r.as_str() == text).map(|r| r.as_str().to_owned()).ok_or_else(
        || {
            let names: Vec<_> = CloseReason::ALL.iter().map(|r| r.as_str()).collect();
            format!("`{text}` is not an outcome; one of: {}, reset (either)", names.join(", "))
        },
    )
}

/// Parses `active` or `passive`.
pub fn parse_side(text: &str) -> Result<String, String> {
    match text {
        "active" | "passive" => Ok(text.to_owned()),
        _ => Err(format!("`{text}` is not a side: active or passive")),
    }
}

/// Whether `text` matches `pattern`, where `*` stands for any run of characters (a shell
/// glob with `*` only). No allocation: the daemon runs it for every record a tail with
/// `--workload` sees.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let (pattern, text) = (pattern.as_bytes(), text.as_bytes());
    let (mut p, mut t) = (0, 0);
    // The last `*` seen, and how much of the text it has absorbed.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((star_p, star_t)) => {
                    star = Some((star_p, star_t + 1));
                    p = star_p + 1;
                    t = star_t + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

fn any_or_empty<T>(values: &[T], test: impl Fn(&T) -> bool) -> bool {
    values.is_empty() || values.iter().any(test)
}

fn contains(nets: &[IpNet], ip: IpAddr) -> bool {
    // Dual-stack sockets show IPv4 peers as ::ffff:a.b.c.d; match them as IPv4 too.
    let canonical = ip.to_canonical();
    nets.iter().any(|net| net.contains(&ip) || net.contains(&canonical))
}

impl Subscribe {
    /// Checks a request before the daemon accepts it.
    pub fn validate(&self) -> Result<(), String> {
        if self.version != PROTOCOL_VERSION {
            return Err(format!(
                "protocol version {} is not supported (this daemon speaks {PROTOCOL_VERSION}); \
                 use a tcpmon tail of the daemon's version",
                self.version
            ));
        }
        let f = &self.filter;
        f.check_bounds()?;
        for outcome in &f.outcomes {
            parse_outcome(outcome)?;
        }
        for side in &f.sides {
            parse_side(side)?;
        }
        let connection_only = !f.outcomes.is_empty()
            || f.min_handshake_us.is_some()
            || f.min_lifetime_us.is_some()
            || f.min_teardown_us.is_some();
        if self.view == View::Events && connection_only {
            return Err("outcome and minimum-duration filters apply to connections, not to \
                        --events"
                .into());
        }
        Ok(())
    }
}

/// Most values one filter flag may list: a request is parsed by the daemon, and its filters
/// run against every record while the client stays.
pub const MAX_FILTER_VALUES: usize = 256;
/// Longest name or pattern a filter may hold, in bytes.
pub const MAX_PATTERN_BYTES: usize = 256;

impl Filter {
    /// Every list within [`MAX_FILTER_VALUES`], every name and pattern within
    /// [`MAX_PATTERN_BYTES`].
    fn check_bounds(&self) -> Result<(), String> {
        let lengths = [
            ("--port", self.ports.len()),
            ("--lport", self.local_ports.len()),
            ("--rport", self.remote_ports.len()),
            ("--addr", self.addrs.len()),
            ("--laddr", self.local_addrs.len()),
            ("--raddr", self.remote_addrs.len()),
            ("--pid", self.pids.len()),
            ("--comm", self.comms.len()),
            ("--side", self.sides.len()),
            ("--workload", self.workloads.len()),
            ("--outcome", self.outcomes.len()),
        ];
        for (flag, count) in lengths {
            if count > MAX_FILTER_VALUES {
                return Err(format!("{flag}: {count} values; at most {MAX_FILTER_VALUES}"));
            }
        }
        let texts = [
            ("--comm", &self.comms),
            ("--side", &self.sides),
            ("--workload", &self.workloads),
            ("--outcome", &self.outcomes),
        ];
        for (flag, values) in texts {
            if let Some(long) = values.iter().find(|v| v.len() > MAX_PATTERN_BYTES) {
                return Err(format!(
                    "{flag}: a value of {} bytes; at most {MAX_PATTERN_BYTES}",
                    long.len()
                ));
            }
        }
        Ok(())
    }

    fn matches_identity(
        &self,
        side: Option<Side>,
        owner: &Owner,
        endpoints: &Endpoints,
        workload: &str,
    ) -> bool {
        let (local, remote) = (endpoints.local(), endpoints.remote());
        any_or_empty(&self.ports, |p| *p == local.port() || *p == remote.port())
            && any_or_empty(&self.local_ports, |p| *p == local.port())
            && any_or_empty(&self.remote_ports, |p| *p == remote.port())
            && (self.addrs.is_empty()
                || contains(&self.addrs, local.ip())
                || contains(&self.addrs, remote.ip()))
            && (self.local_addrs.is_empty() || contains(&self.local_addrs, local.ip()))
            && (self.remote_addrs.is_empty() || contains(&self.remote_addrs, remote.ip()))
            && any_or_empty(&self.pids, |p| owner.pid == Some(*p))
            && any_or_empty(&self.comms, |c| owner.pid.is_some() && *c == owner.comm())
            && any_or_empty(&self.sides, |s| side.is_some_and(|side| side.as_str() == s))
            && any_or_empty(&self.workloads, |pattern| glob_matches(pattern, workload))
    }

    /// Whether a connection record of workload `workload` passes.
    pub fn matches_connection(&self, record: &ConnectionRecord, workload: &str) -> bool {
        let at_least = |min: Option<u64>, value: Option<u64>| {
            min.is_none_or(|min| value.is_some_and(|ns| ns / 1_000 >= min))
        };
        self.matches_identity(record.side, &record.owner, &record.endpoints, workload)
            && any_or_empty(&self.outcomes, |o| {
                record.outcome.is_some_and(|outcome| {
                    // `reset` is either direction.
                    outcome.as_str() == o
                        || (o == "reset" && outcome.as_str().starts_with("reset_"))
                })
            })
            && at_least(self.min_handshake_us, record.handshake_ns)
            && at_least(self.min_lifetime_us, record.lifetime_ns)
            && at_least(self.min_teardown_us, record.teardown.map(|(_, ns)| ns))
    }

    /// Whether a transition record of workload `workload` passes.
    pub fn matches_transition(&self, record: &TransitionRecord, workload: &str) -> bool {
        self.matches_identity(record.side, &record.owner, &record.endpoints, workload)
    }
}

impl Subscribe {
    /// Whether this subscriber wants `record` of `workload` at all (view, established flag,
    /// filter).
    pub fn wants_connection(&self, record: &ConnectionRecord, workload: &str) -> bool {
        let view = match record.phase {
            ConnectionPhase::CloseWait => View::CloseWait,
            _ => View::Connections,
        };
        self.view == view
            && (self.established || record.phase != ConnectionPhase::Established)
            && self.filter.matches_connection(record, workload)
    }

    /// Whether this subscriber wants `record` of `workload`.
    pub fn wants_transition(&self, record: &TransitionRecord, workload: &str) -> bool {
        self.view == View::Events && self.filter.matches_transition(record, workload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        local: &str,
        remote: &str,
        pid: Option<u32>,
        outcome: CloseReason,
    ) -> ConnectionRecord {
        ConnectionRecord {
            phase: ConnectionPhase::Closed,
            start_ns: Some(0),
            time_ns: 1,
            side: Some(Side::Active),
            owner: Owner { pid, comm: *b"psql\0\0\0\0\0\0\0\0\0\0\0\0" },
            endpoints: Endpoints::new(local.parse().unwrap(), remote.parse().unwrap()),
            handshake_ns: Some(250_000_000),
            handshake_retransmits: None,
            accept_queue_full: false,
            accept_wait_ns: None,
            netns: None,
            cgroup_id: None,
            stats: None,
            lifetime_ns: Some(1_000_000_000),
            teardown: None,
            close_wait_ns: None,
            outcome: Some(outcome),
        }
    }

    fn filter(f: impl FnOnce(&mut Filter)) -> Filter {
        let mut filter = Filter::default();
        f(&mut filter);
        filter
    }

    #[test]
    fn criteria_combine_as_documented() {
        let r = record("10.1.2.3:40000", "192.0.2.7:5432", Some(9), CloseReason::ResetReceived);
        assert!(Filter::default().matches_connection(&r, "web.service"));
        assert!(filter(|f| f.ports = vec![5432]).matches_connection(&r, "web.service"));
        assert!(filter(|f| f.ports = vec![80, 40000]).matches_connection(&r, "web.service")); // OR within
        assert!(!filter(|f| f.local_ports = vec![5432]).matches_connection(&r, "web.service"));
        assert!(filter(|f| f.remote_ports = vec![5432]).matches_connection(&r, "web.service"));
        assert!(filter(|f| f.addrs = vec![parse_net("10.0.0.0/8").unwrap()])
            .matches_connection(&r, "web.service"));
        assert!(!filter(|f| f.remote_addrs = vec![parse_net("10.0.0.0/8").unwrap()])
            .matches_connection(&r, "web.service"));
        assert!(filter(|f| f.remote_addrs = vec![parse_net("192.0.2.7").unwrap()])
            .matches_connection(&r, "web.service"));
        assert!(filter(|f| f.pids = vec![9]).matches_connection(&r, "web.service"));
        assert!(filter(|f| f.comms = vec!["psql".into()]).matches_connection(&r, "web.service"));
        assert!(!filter(|f| f.comms = vec!["psq".into()]).matches_connection(&r, "web.service"));
        assert!(filter(|f| f.sides = vec!["active".into()]).matches_connection(&r, "web.service"));
        assert!(!filter(|f| f.sides = vec!["passive".into()]).matches_connection(&r, "web.service"));
        assert!(filter(|f| f.outcomes = vec!["fin".into(), "reset_received".into()])
            .matches_connection(&r, "web.service"));
        assert!(!filter(|f| f.outcomes = vec!["fin".into()]).matches_connection(&r, "web.service"));
        assert!(filter(|f| f.outcomes = vec!["reset".into()]).matches_connection(&r, "web.service"));
        // AND across criteria.
        assert!(!filter(|f| {
            f.ports = vec![5432];
            f.pids = vec![10];
        })
        .matches_connection(&r, "web.service"));
    }

    #[test]
    fn workloads_match_by_pattern() {
        let r = record("10.1.2.3:40000", "192.0.2.7:5432", Some(9), CloseReason::Fin);
        let workloads = |patterns: &[&str]| {
            filter(|f| f.workloads = patterns.iter().map(|p| p.to_string()).collect())
        };
        assert!(workloads(&["web.service"]).matches_connection(&r, "web.service"));
        assert!(workloads(&["db*", "*.service"]).matches_connection(&r, "web.service"));
        assert!(!workloads(&["web"]).matches_connection(&r, "web.service"));
        assert!(workloads(&["shop/*"]).matches_connection(&r, "shop/web-7d9f"));
        assert!(!workloads(&["shop/*"]).matches_connection(&r, "host"));
        for (pattern, text, expected) in [
            ("*", "", true),
            ("", "", true),
            ("", "a", false),
            ("a*b*c", "aXbYbc", true),
            ("a*b*c", "aXbYbd", false),
            ("*service", "web.service", true),
            ("container/*ab", "container/0123456789ab", true),
            ("**a", "bba", true),
        ] {
            assert_eq!(glob_matches(pattern, text), expected, "{pattern} ~ {text}");
        }
    }

    #[test]
    fn minimum_durations_need_the_duration_to_be_known() {
        let r = record("10.1.2.3:40000", "192.0.2.7:5432", Some(9), CloseReason::Fin);
        assert!(
            filter(|f| f.min_handshake_us = Some(200_000)).matches_connection(&r, "web.service")
        );
        assert!(
            !filter(|f| f.min_handshake_us = Some(300_000)).matches_connection(&r, "web.service")
        );
        assert!(
            filter(|f| f.min_lifetime_us = Some(1_000_000)).matches_connection(&r, "web.service")
        );
        assert!(!filter(|f| f.min_teardown_us = Some(0)).matches_connection(&r, "web.service"));
        // unknown
    }

    #[test]
    fn unknown_owners_never_match_pid_or_comm() {
        let r = record("10.1.2.3:40000", "192.0.2.7:5432", None, CloseReason::Fin);
        assert!(!filter(|f| f.pids = vec![0]).matches_connection(&r, "web.service"));
        assert!(!filter(|f| f.comms = vec![String::new()]).matches_connection(&r, "web.service"));
    }

    #[test]
    fn ipv4_mapped_peers_match_ipv4_networks() {
        let r = record(
            "[::ffff:10.0.0.1]:80",
            "[::ffff:198.51.100.4]:40000",
            Some(1),
            CloseReason::Fin,
        );
        assert!(
            filter(|f| f.raddr_for_test("198.51.100.0/24")).matches_connection(&r, "web.service")
        );
    }

    impl Filter {
        fn raddr_for_test(&mut self, net: &str) {
            self.remote_addrs = vec![parse_net(net).unwrap()];
        }
    }

    #[test]
    fn requests_are_validated() {
        let ok = Subscribe { version: PROTOCOL_VERSION, ..Default::default() };
        assert_eq!(ok.validate(), Ok(()));
        let old = Subscribe { version: 99, ..Default::default() };
        assert!(old.validate().unwrap_err().contains("version 99"));
        let mut events = ok.clone();
        events.view = View::Events;
        events.filter.outcomes = vec!["fin".into()];
        assert!(events.validate().unwrap_err().contains("not to --events"));
        let mut bad = ok.clone();
        bad.filter.outcomes = vec!["boom".into()];
        assert!(bad.validate().is_err());
        // Bounded: lists of at most 256 values, names and patterns of at most 256 bytes.
        let mut many = ok.clone();
        many.filter.ports = (0..MAX_FILTER_VALUES as u16).collect();
        assert_eq!(many.validate(), Ok(()));
        many.filter.ports.push(1);
        assert_eq!(many.validate().unwrap_err(), "--port: 257 values; at most 256");
        let mut long = ok.clone();
        long.filter.workloads = vec!["a".repeat(MAX_PATTERN_BYTES)];
        assert_eq!(long.validate(), Ok(()));
        long.filter.workloads = vec!["a".repeat(MAX_PATTERN_BYTES + 1)];
        assert_eq!(long.validate().unwrap_err(), "--workload: a value of 257 bytes; at most 256");
        // Unknown fields are refused, not ignored: a typo must not widen a filter silently.
        let typo = r#"{"version":1,"filter":{"prots":[80]}}"#;
        assert!(serde_json::from_str::<Subscribe>(typo).is_err());
    }

    #[test]
    fn networks_parse_with_or_without_a_prefix() {
        assert_eq!(parse_net("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_net("::1").unwrap().to_string(), "::1/128");
        assert_eq!(parse_net("::ffff:10.0.0.1").unwrap().to_string(), "10.0.0.1/32");
        assert!(parse_net("10.0.0.0/33").is_err());
        assert!(parse_net("").is_err());
    }
}
