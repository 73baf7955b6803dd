//! Peak memory with the tracker at its cap: the daemon's pipeline (decode → tracker →
//! aggregate, the default `port` and `workload` labels) fed births of established
//! connections that never close, until the table holds `--max-sockets` of them and a tenth
//! more have been evicted. Records are made as they are drained, so the figure is the
//! pipeline's own: what `tcpmon run` holds at that cap, less its rings (mapped kernel memory,
//! `--ring-bytes`) and its HTTP buffers. Prints `key=value`; run by the memory test.
//!
//! `cargo run --release --example fill -- MAX_SOCKETS`

use monitor::decode::{fixture, TcpState};
use monitor::pipeline::Pipeline;
use monitor::source::{Drained, Source};

/// Births of `total` sockets at distinct kernel addresses (two transitions each: CLOSE →
/// SYN_SENT, SYN_SENT → ESTABLISHED), made on demand.
struct Births {
    total: u64,
    next_record: u64,
}

impl Source for Births {
    fn drain(&mut self, max: usize, mut each: impl FnMut(&[u8])) -> Drained {
        let end = (self.next_record + max as u64).min(2 * self.total);
        for record in self.next_record..end {
            let socket = record / 2;
            let sk = 0xffff_8890_0000_0000 + socket * 0x800;
            let (old, new, sport) = if record % 2 == 0 {
                (TcpState::Close, TcpState::SynSent, 0)
            } else {
                (TcpState::SynSent, TcpState::Established, 10_000 + (socket % 50_000) as u16)
            };
            // Many destinations: each connection to its own upstream port, as on a busy host.
            let dport = 1 + (socket % 60_000) as u16;
            each(&fixture::bytes(&fixture::v4(record, sk, old, new, sport, dport, 0)));
        }
        let handed = (end - self.next_record) as usize;
        self.next_record = end;
        Drained { handed, more: end < 2 * self.total }
    }

    fn flush(&mut self, _each: impl FnMut(&[u8])) -> usize {
        0
    }
}

/// A `/proc/self/status` field in KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with(field))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

fn main() {
    let Some(max_sockets) = std::env::args().nth(1).and_then(|a| a.parse::<usize>().ok()) else {
        eprintln!("usage: fill MAX_SOCKETS");
        std::process::exit(2);
    };
    let total = max_sockets as u64 + max_sockets as u64 / 10;
    let births = Births { total, next_record: 0 };
    let (mut pipeline, registry) =
        Pipeline::with_default_labels(births, max_sockets).expect("metrics");
    pipeline.drain_now();
    // A scrape at the cap, as Prometheus would take one.
    let scrape = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .expect("encoding the metrics");
    let tracked = pipeline.tracker().len();
    let summary = pipeline.finish();
    println!(
        "fill max_sockets={max_sockets} births={total} tracked={tracked} received={} \
         undecodable={} scrape_bytes={} peak_rss_kib={} rss_kib={}",
        summary.received,
        summary.undecodable,
        scrape.len(),
        status_kib("VmHWM:"),
        status_kib("VmRSS:"),
    );
}
