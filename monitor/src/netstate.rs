//! What no state transition tells, read from the kernel when Prometheus scrapes, in every
//! network namespace tcpmon watches:
//!
//! - TIME_WAIT sockets: `tcp_time_wait()` hands a closing socket to a timewait mini-socket
//!   without a state change of the full one, so the count comes from `/proc/net/sockstat`
//!   (`tw`: the namespace's `tcp_death_row.tw_refcount`, both families), less the timewait
//!   sockets still in FIN_WAIT2 (below);
//! - FIN_WAIT2: an orphaned socket whose FIN was acknowledged becomes a timewait socket in
//!   substate FIN_WAIT2 at once (`tcp_rcv_state_process()`), which `ss` lists as FIN-WAIT-2
//!   and the tracker has seen close; `sock_diag` reports timewait sockets by substate, so a
//!   dump of FIN_WAIT2 counts both kinds;
//! - request sockets (SYN received, SYN-ACK sent: `ss` shows them as SYN-RECV) and every
//!   listener's accept queue, depth and limit (`ss -lnt`'s Recv-Q and Send-Q), from the same
//!   `sock_diag` dump (LISTEN, SYN_RECV and FIN_WAIT2 sockets: not the TIME_WAIT or
//!   established crowds; the SYN queues bound the request sockets even in a SYN flood);
//! - the kernel's queue and TIME_WAIT counters of `/proc/net/netstat` (`TcpExt`).
//!
//! One read serves every scrape within [`MIN_INTERVAL`]: Prometheus servers scraping the same
//! host together cost one walk of the namespaces, and a scrape storm cannot turn into a dump
//! storm. The SYN_RECV and FIN_WAIT2 counts of a namespace whose TCP was quiet since its last
//! dump are reused rather than dumped again ([`Activity`]): each such dump walks the whole TCP
//! hash table the namespace uses, by default the host's, which on a container host costs
//! milliseconds per namespace.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use netlink_packet_sock_diag::inet::StateFlags;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts};

use crate::decode::TcpState;
use crate::metrics::{catch_up, CONNECTIONS, CONNECTIONS_HELP};
use crate::naming::NamingService;
use crate::privilege::PrivilegedThread;
use crate::sockdiag;

/// Scrapes closer together than this share one read.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// `(TcpExt field, metric, help)` of the kernel counters exported.
pub const KERNEL_COUNTERS: [(&str, &str, &str); 8] = [
    (
        "ListenOverflows",
        "tcpmon_listen_overflows_total",
        "Final ACKs dropped because the listener's accept queue was full (TcpExtListenOverflows).",
    ),
    (
        "ListenDrops",
        "tcpmon_listen_drops_total",
        "SYNs and final ACKs a listener dropped, overflows included (TcpExtListenDrops).",
    ),
    (
        "TCPReqQFullDrop",
        "tcpmon_syn_queue_full_drops_total",
        "SYNs dropped because the SYN queue was full and SYN cookies were off \
         (TcpExtTCPReqQFullDrop).",
    ),
    (
        "TCPReqQFullDoCookies",
        "tcpmon_syn_queue_full_cookies_total",
        "SYNs answered with a SYN cookie because the SYN queue was full \
         (TcpExtTCPReqQFullDoCookies).",
    ),
    ("SyncookiesSent", "tcpmon_syncookies_sent_total", "SYN cookies sent (TcpExtSyncookiesSent)."),
    (
        "SyncookiesRecv",
        "tcpmon_syncookies_received_total",
        "Valid SYN cookies received: connections completed by a cookie (TcpExtSyncookiesRecv).",
    ),
    (
        "SyncookiesFailed",
        "tcpmon_syncookies_failed_total",
        "ACKs with an invalid SYN cookie (TcpExtSyncookiesFailed).",
    ),
    (
        "TCPTimeWaitOverflow",
        "tcpmon_time_wait_overflows_total",
        "Closes that got no TIME_WAIT socket because net.ipv4.tcp_max_tw_buckets was reached \
         (TcpExtTCPTimeWaitOverflow).",
    ),
];

const COUNTERS: usize = KERNEL_COUNTERS.len();

/// One listener's accept queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenQueue {
    /// Its local port.
    pub port: u16,
    /// Connections waiting for `accept()`.
    pub length: u32,
    /// The backlog: the most that can wait.
    pub limit: u32,
}

/// What changes whenever a namespace's SYN_RECV or FIN_WAIT2 population can have changed,
/// provided it had no request socket (whose SYN-ACK timer can drop it without a segment):
/// - a request socket needs a SYN in, and a full socket enters or leaves FIN_WAIT2 on a
///   segment in (our FIN acknowledged, the peer's FIN) or with a RST out: segments in and out
///   (`Tcp:` `InSegs` and `OutSegs` of `/proc/net/snmp`, which `tcp_v4_rcv()`/`tcp_v6_rcv()`
///   count for every segment they take and `__tcp_transmit_skb()` for every one sent, both
///   families);
/// - a socket closing, or handed to a timewait socket, changes the hashed sockets (`inuse` of
///   `sockstat` and `sockstat6`);
/// - a timewait socket in substate FIN_WAIT2 comes and goes with the timewait count (`tw`),
///   and turns into TIME_WAIT on the peer's FIN (a segment in).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Activity {
    /// `Tcp: InSegs`.
    pub segments_in: u64,
    /// `Tcp: OutSegs`.
    pub segments_out: u64,
    /// Hashed TCP sockets, both families.
    pub in_use: u64,
    /// Timewait sockets.
    pub timewait: u64,
}

/// What one network namespace says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceState {
    /// Timewait sockets, both families and substates (`sockstat`'s `tw`).
    pub timewait_sockets: u64,
    /// Sockets in FIN_WAIT2: full ones and timewait ones in that substate.
    pub fin_wait2: u64,
    /// Of those, timewait sockets (no inode).
    pub fin_wait2_timewait: u64,
    /// Request sockets (and full sockets in SYN_RECV, which live for microseconds).
    pub syn_recv: u64,
    /// Every listener.
    pub listeners: Vec<ListenQueue>,
    /// [`KERNEL_COUNTERS`], in order; `None` when the kernel has no such field.
    pub counters: [Option<u64>; COUNTERS],
    /// Its activity when SYN_RECV and FIN_WAIT2 were last dumped; `None` if unknown.
    pub dumped_at: Option<Activity>,
}

impl NamespaceState {
    /// Whether this read's SYN_RECV and FIN_WAIT2 counts still hold at `now` (see
    /// [`Activity`]).
    fn still_holds(&self, now: &Activity) -> bool {
        self.syn_recv == 0 && self.dumped_at.as_ref() == Some(now)
    }
}

/// The `tw` of `/proc/net/sockstat`'s `TCP:` line.
pub fn parse_sockstat_time_wait(text: &str) -> Option<u64> {
    parse_sockstat_tcp(text, "tw")
}

/// A field (`inuse`, `tw`, …) of `/proc/net/sockstat`'s `TCP:` line.
fn parse_sockstat_tcp(text: &str, field: &str) -> Option<u64> {
    parse_sockstat(text, "TCP:", field)
}

/// A field of the line that starts with `protocol` (`TCP:`, or `TCP6:` in `sockstat6`).
fn parse_sockstat(text: &str, protocol: &str, field: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.starts_with(protocol))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|word| *word == field)?;
    words.get(at + 1)?.parse().ok()
}

/// The [`KERNEL_COUNTERS`] in a `/proc/net/netstat` text: pairs of lines, names then values,
/// for each section (`TcpExt:`, `IpExt:`, …).
pub fn parse_netstat(text: &str) -> [Option<u64>; COUNTERS] {
    let mut counters = [None; COUNTERS];
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let (Some(("TcpExt", names)), Some(("TcpExt", values))) =
            (names.split_once(": "), values.split_once(": "))
        else {
            continue;
        };
        for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
            if let Some(index) = KERNEL_COUNTERS.iter().position(|(field, ..)| *field == name) {
                counters[index] = value.parse().ok();
            }
        }
    }
    counters
}

/// The `Tcp:` segment counters (`InSegs`, `OutSegs`) of a `/proc/net/snmp` text.
fn parse_snmp_segments(text: &str) -> Option<(u64, u64)> {
    let mut lines = text.lines().filter(|line| line.starts_with("Tcp:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let field = |wanted: &str| {
        let at = names.split_whitespace().position(|name| name == wanted)?;
        values.split_whitespace().nth(at)?.parse().ok()
    };
    Some((field("InSegs")?, field("OutSegs")?))
}

/// Reads the calling thread's network namespace. `last` is its previous read, if any: when
/// the namespace was quiet since (see [`Activity`]), its SYN_RECV and FIN_WAIT2 counts are
/// taken from it and only the listeners are dumped, which walks the listening hash and not
/// the established one.
pub fn read_namespace(last: Option<&NamespaceState>) -> io::Result<NamespaceState> {
    let read = |file: &str| std::fs::read_to_string(format!("/proc/thread-self/net/{file}"));
    let (sockstat, netstat, snmp) = (read("sockstat")?, read("netstat")?, read("snmp")?);
    // sockstat6 is absent without IPv6.
    let sockstat6 = read("sockstat6").unwrap_or_default();
    let mut state = NamespaceState {
        timewait_sockets: parse_sockstat_time_wait(&sockstat).unwrap_or(0),
        counters: parse_netstat(&netstat),
        ..NamespaceState::default()
    };
    let in_use =
        [parse_sockstat_tcp(&sockstat, "inuse"), parse_sockstat(&sockstat6, "TCP6:", "inuse")];
    let segments = parse_snmp_segments(&snmp);
    let activity = match (in_use, segments) {
        ([Some(v4), v6], Some((segments_in, segments_out))) => Some(Activity {
            segments_in,
            segments_out,
            in_use: v4 + v6.unwrap_or(0),
            timewait: state.timewait_sockets,
        }),
        _ => None,
    };
    // No hashed TCP socket of either family (listeners and connections: an IPv6 one counts
    // in sockstat6 only) and no timewait one: no listener, so no request socket, and nothing
    // in FIN_WAIT2. The dump would find nothing, after walking the whole TCP hash the
    // namespace uses (the host's, unless `tcp_child_ehash_entries` gave it its own; TIME_WAIT
    // entries included): skip it.
    if activity.is_some_and(|now| now.in_use == 0 && now.timewait == 0) {
        state.dumped_at = activity;
        return Ok(state);
    }
    let still_holds = match (last, activity) {
        (Some(last), Some(now)) => last.still_holds(&now).then_some(last),
        _ => None,
    };
    let quiet = still_holds.is_some();
    let wanted = match still_holds {
        Some(last) => {
            (state.syn_recv, state.fin_wait2) = (last.syn_recv, last.fin_wait2);
            state.fin_wait2_timewait = last.fin_wait2_timewait;
            StateFlags::LISTEN
        }
        None => StateFlags::LISTEN | StateFlags::SYN_RECV | StateFlags::FIN_WAIT2,
    };
    state.dumped_at = activity;
    // A family with no hashed socket has no listener, hence no request socket and no full
    // FIN_WAIT2 one; only timewait sockets (counted for both families together) can be
    // there, and they matter only to a dump of FIN_WAIT2.
    let families = match in_use {
        [Some(v4), v6] => {
            let timewait = !quiet && state.timewait_sockets > 0;
            [v4 > 0 || timewait, v6.unwrap_or(0) > 0 || (timewait && v6.is_some())]
        }
        _ => [true, true],
    };
    for socket in sockdiag::dump_families(wanted, families)? {
        match socket.state {
            TcpState::Listen => state.listeners.push(ListenQueue {
                port: socket.endpoints.sport,
                length: socket.recv_queue,
                limit: socket.send_queue,
            }),
            TcpState::SynRecv => state.syn_recv += 1,
            TcpState::FinWait2 => {
                state.fin_wait2 += 1;
                state.fin_wait2_timewait += u64::from(socket.inode == 0);
            }
            _ => {}
        }
    }
    Ok(state)
}

/// Namespaces beyond which [`shared_hash_hint`] speaks up.
const MANY_NAMESPACES: usize = 16;

/// A hint for container hosts, when `namespaces` is many and new namespaces share the
/// host's TCP established hash. A `sock_diag` dump of SYN_RECV and FIN_WAIT2 sockets walks
/// every bucket of the table its namespace uses (`inet_diag_dump_icsk()`, filtering by
/// namespace), so with one shared table each namespace read costs a walk of the host's
/// (262,144 buckets on a 24 GiB machine: ~2.4 ms). `net.ipv4.tcp_child_ehash_entries`
/// (Linux 6.1+) gives namespaces created after it is set a table of their own; measured
/// here, 101 namespaces read in 20–30 ms instead of ~250 ms.
pub fn shared_hash_hint(namespaces: usize) -> Option<String> {
    if namespaces <= MANY_NAMESPACES {
        return None;
    }
    let path = "/proc/sys/net/ipv4/tcp_child_ehash_entries";
    let entries = std::fs::read_to_string(path).ok()?;
    (entries.trim() == "0").then(|| {
        format!(
            "{namespaces} network namespaces: if they share the host's TCP hash table, each              scrape walks it once per namespace; setting net.ipv4.tcp_child_ehash_entries              (e.g. 1024) before containers start gives each its own and makes scrapes cheap              (README, \"Container hosts\")"
        )
    })
}

/// The size of `net.ipv4.ip_local_port_range` (the ports connects can take), or `None`.
fn ephemeral_ports() -> Option<i64> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut bounds = text.split_whitespace().map(|word| word.parse::<i64>());
    let (Some(Ok(low)), Some(Ok(high))) = (bounds.next(), bounds.next()) else { return None };
    Some(high - low + 1)
}

/// The kernel state collector: register it with the daemon's registry.
pub struct NetState {
    inner: Mutex<Inner>,
    descs: Vec<Desc>,
}

struct Inner {
    /// Where namespaces are entered: the one thread that keeps CAP_SYS_ADMIN.
    reader: PrivilegedThread,
    read_at: Option<Instant>,
    /// The `port` and `netns` values, shared with the connection metrics.
    naming: NamingService,
    /// Whether the kernel counters have a `netns` label (`--netns-labels`).
    netns_label: bool,
    /// Each namespace's counters at the last read, so vanished and new namespaces never make
    /// a total go down.
    last: HashMap<u32, [u64; COUNTERS]>,
    /// Each namespace's last read, whose dump a quiet namespace reuses.
    last_reads: HashMap<u32, NamespaceState>,
    time_wait: IntGauge,
    syn_recv: IntGauge,
    fin_wait2: IntGauge,
    queue_length: IntGaugeVec,
    queue_limit: IntGaugeVec,
    ephemeral_ports: IntGauge,
    read_errors: prometheus::IntCounter,
    counters: Vec<IntCounterVec>,
    /// Totals by `(counter, netns value)`.
    totals: BTreeMap<(usize, String), u64>,
}

impl NetState {
    /// A collector labelling listen queues with `naming`'s `port` values and the kernel
    /// counters with its `netns` values (each when that label is on), reading the namespaces
    /// on `reader`.
    pub fn new(reader: PrivilegedThread, naming: NamingService) -> prometheus::Result<Self> {
        let (port_label, netns_label) = {
            let naming = naming.lock();
            (naming.limits().port_label(), naming.netns_label())
        };
        let state_gauge = |state: &str| {
            IntGauge::with_opts(
                Opts::new(CONNECTIONS, CONNECTIONS_HELP).const_label("state", state),
            )
        };
        let port_labels: &[&str] = if port_label { &["port"] } else { &[] };
        let netns_labels: &[&str] = if netns_label { &["netns"] } else { &[] };
        let counters = KERNEL_COUNTERS
            .iter()
            .map(|(_, name, help)| IntCounterVec::new(Opts::new(*name, *help), netns_labels))
            .collect::<prometheus::Result<Vec<_>>>()?;
        let inner = Inner {
            reader,
            read_at: None,
            naming,
            netns_label,
            last: HashMap::new(),
            last_reads: HashMap::new(),
            time_wait: state_gauge("TIME_WAIT")?,
            syn_recv: state_gauge("SYN_RECV")?,
            fin_wait2: state_gauge("FIN_WAIT2")?,
            queue_length: IntGaugeVec::new(
                Opts::new(
                    "tcpmon_listen_queue_length",
                    "Connections waiting in listeners' accept queues, by listening port (ss -lnt \
                     Recv-Q, summed over namespaces and addresses).",
                ),
                port_labels,
            )?,
            queue_limit: IntGaugeVec::new(
                Opts::new(
                    "tcpmon_listen_queue_limit",
                    "Accept queue limits (the listen() backlog, ss -lnt Send-Q), by listening \
                     port, summed like tcpmon_listen_queue_length.",
                ),
                port_labels,
            )?,
            ephemeral_ports: IntGauge::new(
                "tcpmon_ephemeral_ports",
                "Ports in net.ipv4.ip_local_port_range of tcpmon's network namespace: what \
                 connects to one destination can use, TIME_WAIT ones included.",
            )?,
            read_errors: prometheus::IntCounter::new(
                "tcpmon_kernel_state_read_errors_total",
                "Network namespaces whose sockstat, netstat or sock_diag could not be read at a \
                 scrape.",
            )?,
            counters,
            totals: BTreeMap::new(),
        };
        let mut descs = Vec::new();
        for collector in inner.collectors() {
            descs.extend(collector.desc().into_iter().cloned());
        }
        Ok(NetState { inner: Mutex::new(inner), descs })
    }
}

impl Inner {
    fn collectors(&self) -> Vec<&dyn Collector> {
        let mut all: Vec<&dyn Collector> = vec![
            &self.time_wait,
            &self.syn_recv,
            &self.fin_wait2,
            &self.queue_length,
            &self.queue_limit,
            &self.ephemeral_ports,
            &self.read_errors,
        ];
        all.extend(self.counters.iter().map(|c| c as &dyn Collector));
        all
    }

    /// Reads every namespace, unless the last read is recent enough.
    fn refresh(&mut self) {
        if self.read_at.is_some_and(|at| at.elapsed() < MIN_INTERVAL) {
            return;
        }
        self.read_at = Some(Instant::now());
        let last = std::mem::take(&mut self.last_reads);
        let reads = self.reader.run(move || {
            let namespaces = sockdiag::namespaces(sockdiag::own_namespace());
            sockdiag::in_each(&namespaces, |netns| read_namespace(last.get(&netns)))
        });
        let Ok(reads) = reads else {
            // The reader failed as a whole: nothing read, every total kept as it was.
            self.read_errors.inc();
            return;
        };
        let mut states = Vec::new();
        let mut unread = Vec::new();
        for (netns, read) in reads {
            match read {
                Ok(state) => states.push((netns, state)),
                // A namespace can vanish between the listing and the read.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(_) => {
                    self.read_errors.inc();
                    unread.push(netns);
                }
            }
        }
        self.publish(&states, &unread);
        self.last_reads = states.into_iter().collect();
    }

    /// Sets the gauges and advances the counters from one read; namespaces in `unread` still
    /// exist but could not be read this time (their last values are kept, so the next read
    /// adds only what they counted since).
    fn publish(&mut self, states: &[(u32, NamespaceState)], unread: &[u32]) {
        let sum = |count: fn(&NamespaceState) -> u64| {
            states.iter().map(|(_, state)| count(state) as i64).sum::<i64>()
        };
        self.time_wait.set(sum(|s| s.timewait_sockets.saturating_sub(s.fin_wait2_timewait)));
        self.syn_recv.set(sum(|s| s.syn_recv));
        self.fin_wait2.set(sum(|s| s.fin_wait2));
        self.queue_length.reset();
        self.queue_limit.reset();
        let mut naming = self.naming.lock();
        for queue in states.iter().flat_map(|(_, s)| &s.listeners) {
            let labels: Vec<&str> = naming.listening_port_value(queue.port).into_iter().collect();
            self.queue_length.with_label_values(&labels).add(i64::from(queue.length));
            self.queue_limit.with_label_values(&labels).add(i64::from(queue.limit));
        }
        if let Some(ports) = ephemeral_ports() {
            self.ephemeral_ports.set(ports);
        }
        let mut seen = HashMap::new();
        for (netns, state) in states {
            let label = naming.netns_value(*netns).unwrap_or_default().to_owned();
            let last = self.last.get(netns).copied().unwrap_or([0; COUNTERS]);
            let mut now = last;
            for (index, value) in state.counters.iter().enumerate() {
                let Some(value) = *value else { continue };
                // A counter never goes down; if it did (never seen), start over from it.
                let grown = value.checked_sub(last[index]).unwrap_or(value);
                *self.totals.entry((index, label.clone())).or_insert(0) += grown;
                now[index] = value;
            }
            seen.insert(*netns, now);
        }
        for netns in unread {
            if let Some(last) = self.last.get(netns) {
                seen.insert(*netns, *last);
            }
        }
        // A `netns` value the naming service retired (the namespace went) takes its series
        // with it: values are reused, so keeping them would unbound the series.
        if self.netns_label {
            let counters = &self.counters;
            self.totals.retain(|(index, label), _| {
                let keep = naming.netns_value_held(label);
                if !keep {
                    let _ = counters[*index].remove_label_values(&[label.as_str()]);
                }
                keep
            });
        }
        drop(naming);
        self.last = seen;
        for ((index, label), total) in &self.totals {
            let labels: Vec<&str> = if self.netns_label { vec![label.as_str()] } else { vec![] };
            catch_up(&self.counters[*index].with_label_values(&labels), *total);
        }
    }
}

impl Collector for NetState {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.refresh();
        inner.collectors().iter().flat_map(|c| c.collect()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockstat_and_netstat_parse_as_the_kernel_writes_them() {
        let sockstat =
            "sockets: used 150\nTCP: inuse 5 orphan 0 tw 44012 alloc 9 mem 1\nUDP: inuse 1 mem 0\n";
        assert_eq!(parse_sockstat_time_wait(sockstat), Some(44012));
        assert_eq!(parse_sockstat_time_wait("TCP: inuse 5\n"), None);
        assert_eq!(parse_sockstat_tcp(sockstat, "inuse"), Some(5));
        let sockstat6 = "TCP6: inuse 3\nUDP6: inuse 1\n";
        assert_eq!(parse_sockstat(sockstat6, "TCP6:", "inuse"), Some(3));
        assert_eq!(parse_sockstat_tcp(sockstat6, "inuse"), None);
        let netstat = "TcpExt: SyncookiesSent SyncookiesRecv SyncookiesFailed TW ListenOverflows ListenDrops\n\
                       TcpExt: 7 6 1 400 3 5\n\
                       IpExt: InNoRoutes ListenOverflows\n\
                       IpExt: 0 99\n";
        let counters = parse_netstat(netstat);
        let get =
            |field: &str| counters[KERNEL_COUNTERS.iter().position(|(f, ..)| *f == field).unwrap()];
        assert_eq!(
            (get("SyncookiesSent"), get("SyncookiesRecv"), get("SyncookiesFailed")),
            (Some(7), Some(6), Some(1))
        );
        assert_eq!((get("ListenOverflows"), get("ListenDrops")), (Some(3), Some(5)), "TcpExt only");
        assert_eq!(get("TCPReqQFullDrop"), None, "absent fields stay unknown");
    }

    #[test]
    fn snmp_segments_parse_as_the_kernel_writes_them() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs\n\
                    Tcp: 1 200 120000 -1 9 9 0 0 0 97367359 97338391 858\n\
                    Udp: InDatagrams\nUdp: 5\n";
        assert_eq!(parse_snmp_segments(snmp), Some((97_367_359, 97_338_391)));
        assert_eq!(parse_snmp_segments("Tcp: InSegs\n"), None);
    }

    #[test]
    fn a_quiet_namespace_keeps_its_counts_only_without_request_sockets() {
        let at = Activity { segments_in: 10, segments_out: 9, in_use: 2, timewait: 1 };
        let read =
            NamespaceState { fin_wait2: 3, dumped_at: Some(at), ..NamespaceState::default() };
        assert!(read.still_holds(&at));
        // Any segment, socket or timewait socket more: dumped again.
        assert!(!read.still_holds(&Activity { segments_in: 11, ..at }));
        assert!(!read.still_holds(&Activity { segments_out: 10, ..at }));
        assert!(!read.still_holds(&Activity { in_use: 1, ..at }));
        assert!(!read.still_holds(&Activity { timewait: 0, ..at }));
        // A request socket can expire on its timer without a segment: dumped again.
        assert!(!NamespaceState { syn_recv: 1, ..read.clone() }.still_holds(&at));
        assert!(!NamespaceState { dumped_at: None, ..read }.still_holds(&at));
    }

    #[test]
    fn counters_only_grow_when_namespaces_come_and_go() {
        let collector =
            NetState::new(PrivilegedThread::start().unwrap(), NamingService::unlabelled()).unwrap();
        let mut inner = collector.inner.lock().unwrap();
        let state = |overflows| {
            let mut state = NamespaceState::default();
            state.counters[0] = Some(overflows);
            state
        };
        let total = |inner: &Inner| inner.counters[0].with_label_values(&[] as &[&str]).get();
        inner.publish(&[(1, state(10)), (2, state(5))], &[]);
        assert_eq!(total(&inner), 15);
        // Namespace 2 is gone, namespace 1 grew by 3, namespace 3 is new with 4.
        inner.publish(&[(1, state(13)), (3, state(4))], &[]);
        assert_eq!(total(&inner), 22);
        // Namespace 3 could not be read once: when it can again, only its growth counts.
        inner.publish(&[(1, state(13))], &[3]);
        inner.publish(&[(1, state(13)), (3, state(6))], &[]);
        assert_eq!(total(&inner), 24);
    }

    #[test]
    fn this_namespace_reads_with_our_own_listener_in_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = read_namespace(None).unwrap();
        let ours = state.listeners.iter().find(|q| q.port == port).expect("our listener");
        // std listens with a backlog of 128.
        assert_eq!((ours.length, ours.limit), (0, 128));
        assert!(state.counters.iter().all(Option::is_some), "{:?}", state.counters);
        assert!(state.dumped_at.is_some_and(|at| at.in_use > 0 && at.segments_in > 0));
    }
}
