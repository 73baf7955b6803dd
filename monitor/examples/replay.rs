//! Replay microbenchmark: decode → tracker → aggregate on one core, on a synthetic stream
//! shaped like loopback connection churn (10 transitions per connection, socket addresses
//! reused as the kernel's slab allocator does). Also counts heap allocations per event and
//! the tracker's bytes per tracked socket. Run by `cargo xtask bench`; prints `key=value`.
//!
//! `cargo run --release --example replay -- [connections]`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use monitor::aggregate::Aggregator;
use monitor::decode::{decode, fixture, TcpState};
use monitor::tracker::{Observation, ObservationSink, Tracker};

/// Discards observations (the table's own memory is what is measured).
struct Discard;

impl ObservationSink for Discard {
    fn observe(&mut self, _: &Observation) {}
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
            records.push(fixture::bytes(&fixture::v4(t, sk, old, new, sport, dport, 0)));
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
    let connections: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let records = churn_stream(connections, 64);
    let registry = prometheus::Registry::new();
    let aggregator = Aggregator::new(&registry).expect("metrics");
    let mut tracker = Tracker::default();

    // Warm-up pass: grows the table to its working size, so the timed pass measures steady state.
    for record in &records {
        aggregator.records_received(1, 0);
        tracker.on_record(&decode(record).expect("valid"), &mut &aggregator);
    }
    let allocations_before = ALLOCATIONS.load(Ordering::Relaxed);
    let started = Instant::now();
    for record in &records {
        aggregator.records_received(1, 0);
        match decode(record) {
            Ok(record) => tracker.on_record(&record, &mut &aggregator),
            Err(_) => aggregator.record_undecodable(),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - allocations_before;
    let events = records.len() as f64;

    // Memory per tracked socket: 100k established connections held open.
    const OPEN: u64 = 100_000;
    let mut tracker = Tracker::new(1 << 20);
    let mut sink = Discard;
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    for i in 0..OPEN {
        let sk = 0xffff_8890_0000_0000 + i * 0x800;
        for (old, new, sport) in [
            (TcpState::Close, TcpState::SynSent, 0),
            (TcpState::SynSent, TcpState::Established, 40_000),
        ] {
            tracker.on_record(
                &decode(&fixture::bytes(&fixture::v4(i, sk, old, new, sport, 80, 0)))
                    .expect("valid"),
                &mut sink,
            );
        }
    }
    let bytes_per_socket = (LIVE_BYTES.load(Ordering::Relaxed) - before) as f64 / OPEN as f64;
    let rss_kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .unwrap_or_default();
    assert_eq!(tracker.len() as u64, OPEN);

    println!(
        "replay events={} seconds={seconds:.4} events_per_sec={:.0} allocations_per_event={:.6} \
         tracked_sockets={OPEN} bytes_per_socket={bytes_per_socket:.0} peak_rss_kib={rss_kib}",
        records.len(),
        events / seconds,
        allocations as f64 / events,
    );
}
