//! Replays a stream recorded from the real kernel (tests/fixtures/loopback.rec, made by
//! tests/fixtures/make_traffic.py) through decode → tracker and checks every observation
//! against what that traffic did.

use std::path::Path;

use monitor::decode::{decode, Record, AF_INET6};
use monitor::source::{read_recording, ReplaySource};
use monitor::tracker::{
    CloseReason, ConnectionPhase, Observation, RecordingSink, ResetDirection, Side, Tracker,
};

const MS: u64 = 1_000_000;

fn replay() -> (Vec<Observation>, Tracker, Vec<monitor::decode::Event>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loopback.rec");
    let records = read_recording(&path).expect("reading the fixture");
    assert_eq!(records.len(), 58);
    let mut source = ReplaySource::new(records);
    let mut tracker = Tracker::default();
    let mut observations = RecordingSink::default();
    let mut events = Vec::new();
    source.drain(usize::MAX, |bytes| {
        let record = decode(bytes).expect("every recorded record decodes");
        tracker.on_record(&record, &mut observations);
        if let Record::State(event) = record {
            events.push(event);
        }
    });
    (observations.0, tracker, events)
}

#[test]
fn the_recorded_loopback_stream_yields_exactly_its_connections() {
    let (observations, tracker, events) = replay();
    let count = |f: &dyn Fn(&Observation) -> bool| observations.iter().filter(|o| f(o)).count();

    assert_eq!(count(&|o| matches!(o, Observation::Opened { side: Side::Active })), 5);
    assert_eq!(count(&|o| matches!(o, Observation::Opened { side: Side::Passive })), 5);
    assert_eq!(
        count(&|o| matches!(o, Observation::ConnectFailed { reason: CloseReason::Refused, .. })),
        1
    );
    assert_eq!(count(&|o| matches!(o, Observation::ConnectFailed { .. })), 1);

    // Handshakes on loopback, both ends: real, positive, well under 5 ms, no retries.
    for side in [Side::Active, Side::Passive] {
        let handshakes: Vec<(u64, Option<u32>)> = observations
            .iter()
            .filter_map(|o| match *o {
                Observation::Handshake { side: s, duration_ns, retransmits } if s == side => {
                    Some((duration_ns, retransmits))
                }
                _ => None,
            })
            .collect();
        assert_eq!(handshakes.len(), 5, "{side:?}");
        assert!(
            handshakes.iter().all(|&(ns, retries)| ns > 0 && ns < 5 * MS && retries == Some(0)),
            "{side:?}: {handshakes:?}"
        );
    }

    // Every client sent "hello" (5 bytes) and the servers sent nothing; every record knows
    // its namespace.
    let closed: Vec<_> = observations
        .iter()
        .filter_map(|o| match o {
            Observation::Connection(r) if r.phase == ConnectionPhase::Closed => Some(*r),
            _ => None,
        })
        .collect();
    assert_eq!(closed.len(), 10);
    for record in &closed {
        let stats = record.stats.expect("CLOSE records carry the socket's counters");
        let (sent, received) = match record.side {
            Some(Side::Active) => (5, 0),
            _ => (0, 5),
        };
        assert_eq!(
            (stats.payload_sent(), stats.payload_received()),
            (sent, received),
            "{record:?}"
        );
        assert!(record.netns.is_some());
    }

    // The abort's RST, and the RST refusing the last connect: each sent and received once.
    let resets = |direction| count(&|o| *o == Observation::Reset { direction });
    assert_eq!((resets(ResetDirection::Sent), resets(ResetDirection::Received)), (2, 2));

    // Close-wait: three of ~300 ms, one of ~100 ms (sleep() never returns early).
    let mut close_waits: Vec<u64> = observations
        .iter()
        .filter_map(|o| match o {
            Observation::CloseWait { duration_ns } => Some(*duration_ns),
            _ => None,
        })
        .collect();
    close_waits.sort_unstable();
    assert_eq!(close_waits.len(), 4);
    assert!((100 * MS..150 * MS).contains(&close_waits[0]), "{close_waits:?}");
    assert!(close_waits[1..].iter().all(|ns| (300 * MS..350 * MS).contains(ns)), "{close_waits:?}");

    // Four orderly closes on each side, each teardown spanning the server's wait.
    for side in [Side::Active, Side::Passive] {
        let teardowns: Vec<u64> = observations
            .iter()
            .filter_map(|o| match o {
                Observation::Closed {
                    side: Some(s), reason: CloseReason::Fin, teardown, ..
                } if *s == side => {
                    teardown.map(|(teardown_side, ns)| {
                        // The client sent the first FIN: its teardown is active, the server's passive.
                        let expected =
                            if side == Side::Active { Side::Active } else { Side::Passive };
                        assert_eq!(teardown_side, expected);
                        ns
                    })
                }
                _ => None,
            })
            .collect();
        assert_eq!(teardowns.len(), 4, "{side:?}");
        assert!(teardowns.iter().all(|&ns| (100 * MS..350 * MS).contains(&ns)), "{teardowns:?}");
    }

    // SO_LINGER 0: the server aborted (RST sent, no sk_err), the client saw the reset.
    assert_eq!(
        count(&|o| matches!(
            o,
            Observation::Closed { side: Some(Side::Passive), reason: CloseReason::Abort, .. }
        )),
        1
    );
    assert_eq!(
        count(&|o| matches!(
            o,
            Observation::Closed {
                side: Some(Side::Active),
                reason: CloseReason::ResetReceived,
                ..
            }
        )),
        1
    );
    assert_eq!(count(&|o| matches!(o, Observation::Closed { .. })), 10);

    // Everything closed; nothing was inconsistent or seen mid-life.
    assert!(tracker.is_empty());
    assert_eq!(tracker.stats(), Default::default());
    assert_eq!(events.iter().filter(|e| e.endpoints.family == AF_INET6).count(), 12);
    // An active open's first transition carries source port 0 (the port is chosen later).
    assert!(events.iter().any(|e| e.old == monitor::decode::TcpState::Close
        && e.new == monitor::decode::TcpState::SynSent
        && e.endpoints.sport == 0));
}
