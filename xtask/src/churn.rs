//! `cargo xtask churn`: a loopback connection-churn load (connect → 1-byte echo → close, as
//! fast as the machine allows) for a fixed time. It is the workload behind the per-event cost
//! measurements; it only ever talks to 127.0.0.1 and stops by itself.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Result of one churn run.
#[derive(Clone, Copy, Debug)]
pub struct ChurnReport {
    /// Connections completed.
    pub connections: u64,
    /// Connect or I/O errors on the client side.
    pub errors: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// The echo server's port.
    pub port: u16,
}

impl ChurnReport {
    /// Completed connections per second.
    pub fn per_second(&self) -> f64 {
        self.connections as f64 / self.elapsed.as_secs_f64()
    }
}

/// The client's half of one exchange: connect to `address`, send a byte, read its echo. The
/// caller decides who closes first (dropping the stream, or reading until the server does).
pub fn exchange(address: SocketAddr) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect(address)?;
    let mut byte = [1u8; 1];
    stream.write_all(&byte)?;
    stream.read_exact(&mut byte)?;
    Ok(stream)
}

/// The server's half: read one byte from `conn` and send it back.
pub fn echo(conn: &mut TcpStream) -> std::io::Result<()> {
    let mut byte = [0u8; 1];
    conn.read_exact(&mut byte)?;
    conn.write_all(&byte)
}

/// Runs `clients` client threads against a local echo server for `duration`.
pub fn run(duration: Duration, clients: usize) -> Result<ChurnReport> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the churn server")?;
    let address = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    // The server closes first, so TIME_WAIT lands on its side and client ports stay free.
    let server = {
        let stop = stop.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = echo(&mut conn);
            }
        })
    };
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..clients.max(1))
        .map(|_| {
            let (done, errors) = (done.clone(), errors.clone());
            thread::spawn(move || {
                while started.elapsed() < duration {
                    // The server closes first: read until its FIN.
                    let ok = exchange(address).and_then(|mut s| {
                        let mut rest = Vec::new();
                        s.read_to_end(&mut rest).map(|_| ())
                    });
                    match ok {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = TcpStream::connect(address); // unblock accept()
    let _ = server.join();
    Ok(ChurnReport {
        connections: done.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        elapsed,
        port: address.port(),
    })
}
