//! Property tests: the decoder never panics on any bytes, and the tracker keeps its
//! invariants under any sequence of transitions — including sequences no kernel would produce
//! (lost events, reordered or garbage states), since a lossy ring can make them.

use monitor::decode::{decode, fixture, Record, TcpState};
use monitor::tracker::{Observation, RecordingSink, Tracker};
use proptest::prelude::*;

fn state() -> impl Strategy<Value = TcpState> {
    (1i32..=12).prop_map(|n| TcpState::try_from(n).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(Record::State(event)) = decode(&bytes) {
            let _ = (event.local(), event.remote(), event.comm());
        }
    }

    #[test]
    fn records_round_trip(ts in any::<u64>(), sk in any::<u64>(), old in state(), new in state(),
                          sport in any::<u16>(), dport in any::<u16>(), err in any::<i32>()) {
        let raw = fixture::v4(ts, sk, old, new, sport, dport, err);
        let Record::State(event) = decode(&fixture::bytes(&raw)).unwrap() else {
            return Err(TestCaseError::fail("not a state record"));
        };
        prop_assert_eq!((event.timestamp_ns, event.skaddr, event.old, event.new), (ts, sk, old, new));
        prop_assert_eq!((event.local().port(), event.remote().port()), (sport, dport));
    }

    #[test]
    fn the_tracker_keeps_its_invariants_under_any_sequence(
        steps in proptest::collection::vec((0u64..8, state(), state(), 0u64..1_000_000, -2i32..120), 1..300),
        cap in 1usize..6,
    ) {
        let mut tracker = Tracker::new(cap);
        let mut sink = RecordingSink::default();
        let mut now = 0u64;
        for (sk, old, new, dt, err) in steps {
            now += dt;
            let record = decode(&fixture::bytes(&fixture::v4(now, sk, old, new, 1, 2, err))).unwrap();
            tracker.on_record(&record, &mut sink);
            // The per-state gauges always add up to the table, which never exceeds its cap.
            prop_assert_eq!(tracker.per_state().iter().sum::<u64>(), tracker.len() as u64);
            prop_assert!(tracker.len() <= cap);
        }
        // No interval can be longer than the whole stream, whatever was lost in between.
        for o in &sink.0 {
            let longest = match *o {
                Observation::Handshake { duration_ns, .. } | Observation::CloseWait { duration_ns } => Some(duration_ns),
                Observation::ConnectFailed { duration_ns, .. } => duration_ns,
                Observation::Closed { lifetime_ns, teardown, .. } => lifetime_ns.max(teardown.map(|(_, ns)| ns)),
                _ => None,
            };
            prop_assert!(longest.unwrap_or(0) <= now);
        }
    }
}
