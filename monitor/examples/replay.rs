//! Replay microbenchmark: the daemon's pipeline (decode → tracker → aggregate, in batches,
//! as `tcpmon run` drains its rings) on one core, on a synthetic stream shaped like loopback
//! connection churn (10 transitions per connection, socket addresses reused as the kernel's
//! slab allocator does). Also counts heap allocations per event and the tracker's bytes per
//! tracked socket. Run by `cargo xtask bench`; prints `key=value`.
//!
//! `cargo run --release --example replay -- [connections] [passes]`
//!
//! `passes` (default 1) repeats the timed pass, so a profiler (`perf record`) sees mostly the
//! pipeline rather than the set-up; the figure printed is the mean over the passes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use monitor::decode::{fixture, TcpState};
use monitor::pipeline::Pipeline;
use monitor::source::ReplaySource;

/// The daemon's pipeline over `records`, with its own metrics (the default `port` and
/// `workload` labels) and no tail client.
fn pipeline(records: Vec<Vec<u8>>, max_sockets: usize) -> Pipeline<ReplaySource> {
    Pipeline::with_default_labels(ReplaySource::new(records), max_sockets).expect("metrics").0
}

/// Counts allocations and live bytes.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static LIVE_BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; the counters have no effect on allocation.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// `connections` client/server pairs, `in_flight` at a time, as raw ring records.
fn churn_stream(connections: u64, in_flight: u64) -> Vec<Vec<u8>> {
    use TcpState::*;
    let mut records = Vec::with_capacity(connections as usize * 10);
    let mut t = 1_000_000u64;
    for i in 0..connections {
        let slot = i % in_flight; // reused addresses, like the slab
        let (client, server) =
            (0xffff_8880_0000_0000 + slot * 0x1000, 0xffff_8881_0000_0000 + slot * 0x1000);
        let port = 30_000 + (i % 30_000) as u16;
        let mut push = |dt: u64, sk: u64, old, new, sport, dport| {
            t += dt;
            let mut raw = fixture::v4(t, sk, old, new, sport, dport, 0);
            // The root cgroup (id 1) at births and closes, where the kernel reads it.
            if old == Close || new == Close || old == Listen {
                raw.cgroup_id = 1;
            }
            records.push(fixture::bytes(&raw));
        };
        push(1_000, client, Close, SynSent, 0, 8080);
        push(20_000, client, SynSent, Established, port, 8080);
        push(1_000, server, Listen, SynRecv, 8080, port);
        push(1_000, server, SynRecv, Established, 8080, port);
        push(5_000, server, Established, FinWait1, 8080, port);
        push(1_000, client, Established, CloseWait, port, 8080);
        push(40_000, server, FinWait1, FinWait2, 8080, port);
        push(1_000, server, FinWait2, Close, 8080, port);
        push(2_000, client, CloseWait, LastAck, port, 8080);
        push(20_000, client, LastAck, Close, port, 8080);
    }
    records
}

fn main() {
    let arg = |n: usize| std::env::args().nth(n).and_then(|a| a.parse::<u64>().ok());
    let connections = arg(1).unwrap_or(200_000);
    let passes = arg(2).unwrap_or(1).max(1);
    let records = churn_stream(connections, 64);
    let events = records.len() as f64 * passes as f64;
    let mut churn = pipeline(records, monitor::tracker::DEFAULT_MAX_SOCKETS);

    // Warm-up pass: grows the table to its working size, so the timed pass measures steady state.
    churn.drain_now();
    churn.source_mut().rewind();
    let allocations_before = ALLOCATIONS.load(Ordering::Relaxed);
    let started = Instant::now();
    for pass in 0..passes {
        if pass > 0 {
            churn.source_mut().rewind();
        }
        churn.drain_now();
    }
    let seconds = started.elapsed().as_secs_f64();
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - allocations_before;
    assert_eq!(churn.finish().undecodable, 0);

    // Memory per tracked socket: 100k established connections held open (the records and
    // the pipeline exist before the count starts: only what tracking adds is counted).
    const OPEN: u64 = 100_000;
    let mut opens = Vec::with_capacity(2 * OPEN as usize);
    for i in 0..OPEN {
        let sk = 0xffff_8890_0000_0000 + i * 0x800;
        for (old, new, sport) in [
            (TcpState::Close, TcpState::SynSent, 0),
            (TcpState::SynSent, TcpState::Established, 40_000),
        ] {
            opens.push(fixture::bytes(&fixture::v4(i, sk, old, new, sport, 80, 0)));
        }
    }
    // One of them closing: the check for quiet sockets then scans the whole table.
    let closing = fixture::v4(
        OPEN,
        0xffff_8890_0000_0000,
        TcpState::Established,
        TcpState::FinWait1,
        40_000,
        80,
        0,
    );
    opens.push(fixture::bytes(&closing));
    let mut held = pipeline(opens, 1 << 20);
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    held.drain_now();
    let bytes_per_socket = (LIVE_BYTES.load(Ordering::Relaxed) - before) as f64 / OPEN as f64;
    let rss_kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .unwrap_or_default();
    assert_eq!(held.tracker().len() as u64, OPEN);
    // What a check for quiet sockets costs the pipeline: one scan of the table.
    let scan = Instant::now();
    let suspects = held.tracker().suspects(u64::MAX, 0, monitor::pipeline::quiet::MAX_SUSPECTS);
    let quiet_scan_ms = scan.elapsed().as_secs_f64() * 1e3;
    assert_eq!(suspects.len(), 1);

    println!(
        "replay events={events} seconds={seconds:.4} events_per_sec={:.0} allocations_per_event={:.6} \
         tracked_sockets={OPEN} bytes_per_socket={bytes_per_socket:.0} peak_rss_kib={rss_kib} \
         quiet_scan_ms={quiet_scan_ms:.2}",
        events / seconds,
        allocations as f64 / events,
    );
}
