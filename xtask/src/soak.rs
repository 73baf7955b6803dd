//! `cargo xtask soak`: the release daemon under connection churn for several minutes, with a
//! tail attached and /metrics scraped continuously, sampling its RSS. Passes when RSS is flat
//! after warm-up, every scrape succeeded, and every transition the kernel counted is received,
//! lost (ring full) or a recursion miss — nothing unaccounted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::bench::{http_get, metric, start_tcpmon_with_tail, status_kib, stop};
use crate::churn;

/// Sums every series of a metric family in a scrape.
fn family_sum(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(family) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Scrapes twice over one kept-alive connection, 300 ms apart, and returns the second: the
/// scrape's own connection makes transitions, which the daemon has drained by then.
fn settled_metrics(address: &str) -> Result<String> {
    use std::io::{BufRead, BufReader, Read, Write};
    let stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream);
    let mut body = String::new();
    for _ in 0..2 {
        reader.get_mut().write_all(b"GET /metrics HTTP/1.1\r\nHost: soak\r\n\r\n")?;
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse()?;
            }
        }
        let mut bytes = vec![0; length];
        reader.read_exact(&mut bytes)?;
        body = String::from_utf8_lossy(&bytes).into_owned();
        thread::sleep(Duration::from_millis(300));
    }
    Ok(body)
}

/// Runs the soak for `minutes`; fails when a property does not hold.
pub fn run(minutes: u64) -> Result<()> {
    crate::cargo(&["build", "--release", "--package", "monitor", "--bin", "tcpmon"])?;
    let tcpmon = crate::workspace_root().join("target/release/tcpmon");
    let scratch = std::env::temp_dir().join(format!("tcpmon-soak-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let (mut processes, address) = start_tcpmon_with_tail(&tcpmon, &scratch)?;
    let daemon = processes[0].id();

    // Two scrapers for the whole run.
    let stop_scraping = Arc::new(AtomicBool::new(false));
    let (scrapes, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let scrapers: Vec<_> = (0..2)
        .map(|_| {
            let (stop_scraping, scrapes, failures) =
                (stop_scraping.clone(), scrapes.clone(), failures.clone());
            let address = address.clone();
            thread::spawn(move || {
                while !stop_scraping.load(Ordering::Relaxed) {
                    match http_get(&address, "/metrics") {
                        Some(_) => scrapes.fetch_add(1, Ordering::Relaxed),
                        None => failures.fetch_add(1, Ordering::Relaxed),
                    };
                    thread::sleep(Duration::from_millis(50));
                }
            })
        })
        .collect();

    let started = Instant::now();
    let total = Duration::from_secs(minutes * 60);
    let mut samples: Vec<(u64, u64, f64)> = Vec::new(); // (seconds, RSS KiB, conn/s)
    println!("soak: {minutes} min of churn; sampling every 10 s");
    println!("{:>6} {:>10} {:>10} {:>12}", "t(s)", "RSS(KiB)", "conn/s", "events");
    while started.elapsed() < total {
        let report = churn::run(Duration::from_secs(10), 2)?;
        let rss = status_kib(daemon, "VmRSS");
        let events = http_get(&address, "/metrics")
            .and_then(|t| metric(&t, "tcpmon_events_received_total"))
            .unwrap_or(0.0);
        let t = started.elapsed().as_secs();
        println!("{t:>6} {rss:>10} {:>10.0} {events:>12.0}", report.per_second());
        samples.push((t, rss, report.per_second()));
    }
    stop_scraping.store(true, Ordering::Relaxed);
    for scraper in scrapers {
        let _ = scraper.join();
    }

    // Let the last connections close and the daemon drain, then account for every event.
    thread::sleep(Duration::from_secs(1));
    let text = settled_metrics(&address)?;
    let kernel = family_sum(&text, "tcpmon_state_transitions_total");
    let received = metric(&text, "tcpmon_events_received_total").unwrap_or(0.0);
    let lost = metric(&text, "tcpmon_events_lost_total").unwrap_or(0.0);
    let misses = metric(&text, "tcpmon_bpf_recursion_misses_total").unwrap_or(0.0);
    let inconsistent =
        metric(&text, "tcpmon_tracker_inconsistent_transitions_total").unwrap_or(0.0);
    for mut process in processes.drain(..).rev() {
        stop(&mut process, libc::SIGTERM);
    }
    let _ = std::fs::remove_dir_all(&scratch);

    // Warm-up: the table and allocator reach their working size in the first samples.
    let warm = samples.get(2).or(samples.last()).map_or(0, |s| s.1);
    let last = samples.last().map_or(0, |s| s.1);
    let peak = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let growth = last as f64 / warm.max(1) as f64 - 1.0;
    println!(
        "soak: RSS after warm-up {warm} KiB, at the end {last} KiB ({:+.1}%), peak {peak} KiB",
        growth * 100.0
    );
    println!(
        "soak: {received:.0} events received + {lost:.0} lost = {:.0}; the kernel counted \
         {kernel:.0}; {misses:.0} recursion misses; {inconsistent:.0} out-of-sequence \
         transitions; scrapes {} ok, {} failed",
        received + lost,
        scrapes.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed)
    );
    let mut problems = Vec::new();
    if received + lost != kernel {
        problems.push(format!("{} events unaccounted for", kernel - received - lost));
    }
    // The per-CPU rings are merged back by timestamp: a merge error shows as transitions out
    // of sequence (a skipped transition can make at most two).
    if inconsistent > 2.0 * misses {
        problems.push(format!("{inconsistent:.0} transitions out of sequence"));
    }
    if failures.load(Ordering::Relaxed) > 0 {
        problems.push("some scrapes failed".to_owned());
    }
    if samples.len() >= 4 && growth > 0.10 {
        problems.push(format!("RSS grew {:.1}% after warm-up", growth * 100.0));
    }
    if problems.is_empty() {
        println!("soak: PASS");
        Ok(())
    } else {
        bail!("soak failed: {}", problems.join("; "))
    }
}
