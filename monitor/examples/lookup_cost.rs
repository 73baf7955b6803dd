//! What one exact `sock_diag` lookup costs (the check of quiet sockets makes up to 16,384
//! per 15 s on the kernel-reader thread): a connection that exists, and a 4-tuple with
//! none, each looked up 16,384 times in this namespace.
//!
//! `cargo run --release --example lookup_cost` (no privileges needed).

use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use monitor::decode::Endpoints;
use monitor::sockdiag::Lookup;

fn main() {
    const LOOKUPS: u32 = 16_384;
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
    let client = TcpStream::connect(listener.local_addr().expect("its address")).expect("connect");
    let (local, remote) = (client.local_addr().expect("local"), client.peer_addr().expect("peer"));
    let present = Endpoints::new(local, remote);
    let absent = Endpoints { sport: 1, ..present };
    let mut lookup = Lookup::open().expect("a sock_diag socket");
    for (name, endpoints) in [("a connection", present), ("no socket", absent)] {
        let started = Instant::now();
        for _ in 0..LOOKUPS {
            lookup.state_of(&endpoints).expect("a lookup");
        }
        let elapsed = started.elapsed().as_secs_f64();
        println!(
            "lookup_cost of={name:?} lookups={LOOKUPS} ms={:.1} us_each={:.2}",
            elapsed * 1e3,
            elapsed * 1e6 / f64::from(LOOKUPS)
        );
    }
}
