//! The accept hook's cost (part of `cargo xtask bench`). Its program runs once per accepted
//! connection, which is cheap; what can be dear is the route. Attaching a syscall tracepoint
//! sets `TIF_SYSCALL_TRACEPOINT` on every task, so every system call of every process goes
//! through the kernel's slow path (`syscall_trace_enter()`/`syscall_exit_work()`) while it is
//! attached, whatever the syscall. fexit on `inet_csk_accept` costs nothing outside accept.
//! So each route gets two figures: ns per `getppid()` (the cheapest system call: the slow
//! path's cost shows whole) with tcpmon attached that way, against no monitor; and the accept
//! program's own ns per run under the connection churn.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::bpfstats::{bpf_programs, bpf_stats, is_accept_program};
use crate::churn;
use crate::spread::{shown, Spread};

/// The ways of running measured: no monitor, then tcpmon with each `--accept-wait`.
const ROUTES: [(&str, Option<&str>); 4] = [
    ("no monitor", None),
    ("off", Some("off")),
    ("syscalls", Some("syscalls")),
    ("fexit", Some("fexit")),
];

/// Starts `tcpmon run` with extra arguments, runs a measurement once it is healthy, and stops
/// it.
pub type WithTcpmon<'a> = &'a dyn Fn(&[&str], &mut dyn FnMut() -> Result<()>) -> Result<()>;

/// One route's figures over the rounds.
#[derive(Clone, Debug)]
pub struct Row {
    /// `no monitor`, or the `--accept-wait` value.
    pub route: &'static str,
    /// ns per `getppid()` system call.
    pub syscall_ns: Option<Spread>,
    /// The accept program's ns per run; `None` when no accept program was attached (off,
    /// or a route this kernel refuses).
    pub program_ns: Option<Spread>,
}

/// Measures every route `rounds` times, interleaved.
pub fn measure(rounds: usize, seconds: u64, with_tcpmon: WithTcpmon) -> Result<Vec<Row>> {
    let mut syscalls: Vec<Vec<f64>> = vec![Vec::new(); ROUTES.len()];
    let mut programs: Vec<Vec<f64>> = vec![Vec::new(); ROUTES.len()];
    for _ in 0..rounds {
        for (index, (_, route)) in ROUTES.iter().enumerate() {
            let mut measure_once = || -> Result<()> {
                syscalls[index].push(ns_per_syscall());
                if let Some(ns) = accept_program_ns(seconds)? {
                    programs[index].push(ns);
                }
                Ok(())
            };
            match route {
                None => measure_once()?,
                Some(route) => with_tcpmon(&["--accept-wait", route], &mut measure_once)?,
            }
        }
    }
    Ok(ROUTES
        .iter()
        .enumerate()
        .map(|(index, (name, _))| Row {
            route: name,
            syscall_ns: Spread::of(&syscalls[index]),
            program_ns: Spread::of(&programs[index]),
        })
        .collect())
}

/// ns per `getppid()`: the best of three runs of 2 million calls (the slow path adds a fixed
/// cost to each; the best run is the one least disturbed by the rest of the machine).
fn ns_per_syscall() -> f64 {
    const CALLS: u32 = 2_000_000;
    (0..3)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..CALLS {
                // SAFETY: getppid(2) has no arguments and cannot fail.
                unsafe { libc::syscall(libc::SYS_getppid) };
            }
            started.elapsed().as_nanos() as f64 / f64::from(CALLS)
        })
        .fold(f64::INFINITY, f64::min)
}

/// The accept programs' ns per run under `seconds` of churn (one accept per connection);
/// `None` when none is attached.
fn accept_program_ns(seconds: u64) -> Result<Option<f64>> {
    bpf_stats(true)?;
    let before = bpf_programs();
    let churned = churn::run(Duration::from_secs(seconds), 2);
    let after = bpf_programs();
    bpf_stats(false)?;
    let (before, after) = (before?, after?);
    churned?;
    let (mut run_ns, mut runs) = (0, 0);
    for (id, program) in after.iter().filter(|(_, p)| is_accept_program(&p.name)) {
        let earlier = before.get(id).cloned().unwrap_or_default();
        run_ns += program.run_time_ns.saturating_sub(earlier.run_time_ns);
        runs += program.run_cnt.saturating_sub(earlier.run_cnt);
    }
    Ok((runs > 0).then(|| run_ns as f64 / runs as f64))
}

/// The report's section.
pub fn report(rows: &[Row]) -> String {
    let mut text = String::from(
        "\nThe accept hook (`--accept-wait`): ns per `getppid()` system call while tcpmon runs with each route (the best of three runs of 2 million calls; the syscall tracepoints send every system call of every process through the kernel's slow path), and the accept program's own ns per run under the churn:\n\n| `--accept-wait` | ns per system call | vs no monitor | accept program ns/run |\n|---|---:|---:|---:|\n",
    );
    let baseline = rows.first().and_then(|row| row.syscall_ns).map(|s| s.median);
    for row in rows {
        let syscall = row.syscall_ns.map_or("-".to_owned(), |s| shown(s, 1));
        let versus = match (row.syscall_ns, baseline) {
            (Some(s), Some(base)) => format!("{:+.1} ns", s.median - base),
            _ => "-".to_owned(),
        };
        let program = match (row.route, row.program_ns) {
            ("no monitor" | "off", _) => "-".to_owned(),
            (_, Some(s)) => shown(s, 0),
            (_, None) => "not attached here".to_owned(),
        };
        text.push_str(&format!("| {} | {syscall} | {versus} | {program} |\n", row.route));
    }
    text
}
