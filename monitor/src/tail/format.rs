//! Human output of `tcpmon tail`: aligned columns, compact IPv6, durations in sensible
//! units, times of day in UTC. Colour only when asked (stdout is a terminal).

use std::fmt::Write as _;

use super::filter::View;
#[cfg(test)]
use super::record::Totals;
use super::record::{ConnectionLine, Identity, TailRecord, TransitionLine};

const ADDR_WIDTH: usize = 23;
const WORKLOAD_WIDTH: usize = 20;

/// `52µs`, `3.25ms`, `301ms`, `1.02s`, `31.5s`, `2m05s`, `1h02m`.
pub fn duration(us: u64) -> String {
    match us {
        0..=999 => format!("{us}µs"),
        1_000..=9_999 => format!("{:.2}ms", us as f64 / 1e3),
        10_000..=999_999 => format!("{}ms", us / 1_000),
        1_000_000..=9_999_999 => format!("{:.2}s", us as f64 / 1e6),
        10_000_000..=59_999_999 => format!("{:.1}s", us as f64 / 1e6),
        60_000_000..=3_599_999_999 => format!("{}m{:02}s", us / 60_000_000, us / 1_000_000 % 60),
        _ => format!("{}h{:02}m", us / 3_600_000_000, us / 60_000_000 % 60),
    }
}

fn optional_duration(us: Option<u64>) -> String {
    us.map_or_else(|| "-".to_owned(), duration)
}

/// `512B`, `1.5K`, `977K`, `12M`, `3.4G` (powers of 1024, like `ss` and `tcplife`'s KB).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["K", "M", "G", "T"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value < 10.0 {
        format!("{value:.1}{}", UNITS[unit])
    } else {
        format!("{value:.0}{}", UNITS[unit])
    }
}

/// The handshake column: its duration, and `+N` when N SYNs or SYN-ACKs were retransmitted.
fn handshake(us: Option<u64>, retransmits: Option<u32>) -> String {
    match (us, retransmits) {
        (Some(us), Some(n)) if n > 0 => format!("{}+{n}", duration(us)),
        (us, _) => optional_duration(us),
    }
}

/// `HH:MM:SS.mmm` of an RFC 3339 time, or the input when it has no such part.
fn time_of_day(rfc3339: &str) -> &str {
    rfc3339.get(11..23).unwrap_or(rfc3339)
}

/// `addr:port`, IPv6 in brackets; IPv4-mapped IPv6 (dual-stack sockets) shown as IPv4.
fn endpoint(addr: &str, port: u16) -> String {
    match addr.parse::<std::net::IpAddr>().map(|ip| ip.to_canonical()) {
        Ok(std::net::IpAddr::V4(v4)) => format!("{v4}:{port}"),
        Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        Err(_) => format!("{addr}:{port}"),
    }
}

/// Any process can name itself anything (prctl PR_SET_NAME): never let a name carry
/// control characters (terminal escape sequences) to the operator's terminal.
fn printable(name: &str) -> String {
    name.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// A name cut to `width` characters, its end replaced by `…` when it is longer (the JSON
/// view has it whole).
fn fit(name: &str, width: usize) -> String {
    if name.chars().count() <= width {
        return name.to_owned();
    }
    let mut cut: String = name.chars().take(width - 1).collect();
    cut.push('…');
    cut
}

/// SIDE, PID, COMM, WORKLOAD, LOCAL and REMOTE, as both views print them.
fn identity_columns(who: &Identity) -> String {
    let (pid, comm) = match who.pid {
        Some(pid) => (pid.to_string(), printable(who.comm.as_deref().unwrap_or_default())),
        None => ("-".to_owned(), "-".to_owned()),
    };
    format!(
        "{:<7} {:>7} {:<15} {:<WORKLOAD_WIDTH$} {:<ADDR_WIDTH$} {:<ADDR_WIDTH$}",
        who.side.as_deref().unwrap_or("-"),
        pid,
        comm,
        fit(&printable(&who.workload), WORKLOAD_WIDTH),
        endpoint(&who.local_addr, who.local_port),
        endpoint(&who.remote_addr, who.remote_port),
    )
}

/// The header line of a view.
pub fn header(view: View) -> String {
    match view {
        View::Connections | View::CloseWait => format!(
            "{:<12} {:<7} {:>7} {:<15} {:<WORKLOAD_WIDTH$} {:<ADDR_WIDTH$} {:<ADDR_WIDTH$} {:>9} {:>9} {:>9} {:>10} {:>6} {:>6}  {}",
            "TIME(UTC)", "SIDE", "PID", "COMM", "WORKLOAD", "LOCAL", "REMOTE", "HANDSHAKE", "LIFETIME",
            "TEARDOWN", "CLOSE_WAIT", "TX", "RX", "OUTCOME"
        ),
        View::Events => format!(
            "{:<12} {:<7} {:>7} {:<15} {:<WORKLOAD_WIDTH$} {:<ADDR_WIDTH$} {:<ADDR_WIDTH$} {:<26} {:>9}",
            "TIME(UTC)", "SIDE", "PID", "COMM", "WORKLOAD", "LOCAL", "REMOTE", "TRANSITION", "IN_OLD"
        ),
    }
}

fn colored(text: &str, outcome: &str, color: bool) -> String {
    if !color {
        return text.to_owned();
    }
    let code = match outcome {
        "fin" => "32",                                               // green
        "reset_received" | "reset_sent" | "abort" | "error" => "31", // red
        "timeout" | "refused" | "unreachable" => "33",               // yellow
        _ => return text.to_owned(),
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

/// One connection line. TIME is when the connection began (when known).
pub fn connection(line: &ConnectionLine, color: bool) -> String {
    let time = time_of_day(line.start_time.as_deref().unwrap_or(&line.time));
    let outcome = match (&line.outcome, line.event.as_str()) {
        (Some(outcome), _) => colored(outcome, outcome, color),
        (None, event) => event.to_owned(),
    };
    let mut out = String::with_capacity(160);
    let _ = write!(
        out,
        "{:<12} {} {:>9} {:>9} {:>9} {:>10} {:>6} {:>6}  {}",
        time,
        identity_columns(&line.who),
        handshake(line.handshake_us, line.handshake_retransmits),
        optional_duration(line.lifetime_us),
        optional_duration(line.teardown_us),
        optional_duration(line.close_wait_us),
        line.totals.bytes_sent.map_or_else(|| "-".to_owned(), bytes),
        line.totals.bytes_received.map_or_else(|| "-".to_owned(), bytes),
        outcome,
    );
    if let Some(wait) = line.accept_wait_us {
        let _ = write!(out, " (waited {} for accept)", optional_duration(Some(wait)).trim());
    }
    if line.accept_queue_full {
        out.push_str(" (accept queue was full)");
    }
    out
}

/// One transition line.
pub fn transition(line: &TransitionLine) -> String {
    format!(
        "{:<12} {} {:<26} {:>9}",
        time_of_day(&line.time),
        identity_columns(&line.who),
        format!("{} -> {}", line.old_state, line.new_state),
        optional_duration(line.in_old_state_us),
    )
}

/// The human line for any record that is printed on stdout (`None` for hello/error).
pub fn human(record: &TailRecord, color: bool) -> Option<String> {
    match record {
        TailRecord::Connection(line) => Some(connection(line, color)),
        TailRecord::Transition(line) => Some(transition(line)),
        TailRecord::Missed { records } => Some(format!(
            "-- missed {records} records: this tail read too slowly and the daemon dropped them --"
        )),
        TailRecord::Hello { .. } | TailRecord::Error { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tail::record::{ConnectionLine, TransitionLine};

    fn closed_v4() -> ConnectionLine {
        ConnectionLine {
            event: "closed".into(),
            start_time: Some("2026-11-24T08:10:57.880156Z".into()),
            time: "2026-11-24T08:10:58.180000Z".into(),
            who: Identity {
                side: Some("active".into()),
                pid: Some(27810),
                comm: Some("python3".into()),
                netns: Some(4026531840),
                cgroup_id: Some(7),
                workload: "nginx.service".into(),
                family: "ipv4".into(),
                local_addr: "127.0.0.1".into(),
                local_port: 49104,
                remote_addr: "127.0.0.1".into(),
                remote_port: 48493,
            },
            handshake_us: Some(43),
            handshake_retransmits: Some(0),
            accept_queue_full: false,
            accept_wait_us: None,
            lifetime_us: Some(300_412),
            teardown_us: Some(300_301),
            teardown_side: Some("active".into()),
            close_wait_us: None,
            outcome: Some("fin".into()),
            totals: Totals {
                bytes_sent: Some(1_500),
                bytes_acked: Some(1_502),
                bytes_received: Some(1_000_000),
                segments_out: Some(5),
                segments_in: Some(6),
                retransmits: Some(0),
                srtt_us: Some(30),
            },
        }
    }

    #[test]
    fn golden_connection_lines() {
        assert_eq!(
            header(View::Connections),
            "TIME(UTC)    SIDE        PID COMM            WORKLOAD             LOCAL                   REMOTE                  HANDSHAKE  LIFETIME  TEARDOWN CLOSE_WAIT     TX     RX  OUTCOME"
        );
        assert_eq!(
            connection(&closed_v4(), false),
            "08:10:57.880 active    27810 python3         nginx.service        127.0.0.1:49104         127.0.0.1:48493              43µs     300ms     300ms          -   1.5K   977K  fin"
        );

        // IPv6, unknown owner, a 15-character comm elsewhere, mid-life start, still open.
        let mut v6 = closed_v4();
        v6.who.family = "ipv6".into();
        v6.who.local_addr = "2001:db8::1".into();
        v6.who.remote_addr = "::1".into();
        v6.who.pid = None;
        v6.who.comm = None;
        v6.who.workload = "unknown".into();
        v6.who.cgroup_id = None;
        v6.start_time = None;
        v6.who.side = None;
        v6.event = "established".into();
        v6.outcome = None;
        v6.handshake_us = None;
        v6.lifetime_us = None;
        v6.teardown_us = None;
        v6.totals = Totals::default();
        assert_eq!(
            connection(&v6, false),
            "08:10:58.180 -             - -               unknown              [2001:db8::1]:49104     [::1]:48493                     -         -         -          -      -      -  established"
        );

        let mut long = closed_v4();
        long.who.comm = Some("kworker/u16:3-e".into());
        long.outcome = Some("reset_received".into());
        long.close_wait_us = Some(4_200_000_000);
        long.handshake_us = Some(1_003_000);
        long.handshake_retransmits = Some(1);
        long.totals.bytes_received = Some(5 << 30);
        assert_eq!(
            connection(&long, false),
            "08:10:57.880 active    27810 kworker/u16:3-e nginx.service        127.0.0.1:49104         127.0.0.1:48493           1.00s+1     300ms     300ms      1h10m   1.5K   5.0G  reset_received"
        );
        assert_eq!(
            connection(&long, true),
            "08:10:57.880 active    27810 kworker/u16:3-e nginx.service        127.0.0.1:49104         127.0.0.1:48493           1.00s+1     300ms     300ms      1h10m   1.5K   5.0G  \x1b[31mreset_received\x1b[0m"
        );
    }

    #[test]
    fn golden_transition_line() {
        let line = TransitionLine {
            time: "2026-11-24T08:10:57.880199Z".into(),
            who: Identity {
                side: Some("passive".into()),
                pid: Some(1),
                comm: Some("nginx".into()),
                netns: None,
                cgroup_id: Some(9),
                workload: "kube-system/ingress-nginx-controller-7d9f".into(),
                family: "ipv6".into(),
                local_addr: "::1".into(),
                local_port: 443,
                remote_addr: "::1".into(),
                remote_port: 50000,
            },
            old_state: "CLOSE_WAIT".into(),
            new_state: "LAST_ACK".into(),
            in_old_state_us: Some(2_500_000),
        };
        assert_eq!(
            transition(&line),
            "08:10:57.880 passive       1 nginx           kube-system/ingress… [::1]:443               [::1]:50000             CLOSE_WAIT -> LAST_ACK         2.50s"
        );
    }

    #[test]
    fn hostile_names_and_mapped_addresses_print_safely() {
        let mut line = closed_v4();
        line.who.comm = Some("evil\x1b[2Jname".into());
        line.who.workload = "/evil\x1b[2J".into();
        line.who.family = "ipv6".into();
        line.who.remote_addr = "::ffff:198.51.100.4".into();
        let text = connection(&line, false);
        assert!(!text.contains('\x1b'), "{text:?}");
        assert!(text.contains("evil?[2Jname"), "{text}");
        assert!(text.contains(" 198.51.100.4:48493 "), "{text}");
    }

    #[test]
    fn durations_use_sensible_units() {
        for (us, text) in [
            (0, "0µs"),
            (999, "999µs"),
            (1_000, "1.00ms"),
            (3_254, "3.25ms"),
            (300_412, "300ms"),
            (1_020_000, "1.02s"),
            (31_500_000, "31.5s"),
            (125_000_000, "2m05s"),
            (3_720_000_000, "1h02m"),
        ] {
            assert_eq!(duration(us), text);
        }
    }

    #[test]
    fn missed_records_are_a_line_of_their_own() {
        let line = human(&TailRecord::Missed { records: 17 }, false).unwrap();
        assert!(line.contains("missed 17 records"), "{line}");
        assert!(human(&TailRecord::Hello { version: 1, mode: "daemon".into() }, false).is_none());
    }
}
