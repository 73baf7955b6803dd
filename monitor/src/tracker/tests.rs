//! The state machine's tests: recorded transition sequences and what they must yield.

use super::*;
use crate::decode::{decode_record, fixture::v4, TcpStats};
use TcpState::*;

const MS: u64 = 1_000_000;

/// Replays `(ms, skaddr, old, new, sk_err)` steps and returns the observations, times in
/// states left out ([`time_in_each_state_is_the_gap_between_the_transitions`] has those).
fn replay(
    tracker: &mut Tracker,
    steps: &[(u64, u64, TcpState, TcpState, i32)],
) -> Vec<Observation> {
    let mut out = replay_all(tracker, steps);
    out.retain(|o| !matches!(o, Observation::StateLeft { .. }));
    out
}

/// [`replay`], every observation.
fn replay_all(
    tracker: &mut Tracker,
    steps: &[(u64, u64, TcpState, TcpState, i32)],
) -> Vec<Observation> {
    let mut out = Vec::new();
    for &(ms, sk, old, new, err) in steps {
        let event = decode_record(&v4(ms * MS, sk, old, new, 40000, 80, err)).unwrap();
        tracker.on_event(&event, &mut out);
    }
    out
}

fn run(steps: &[(u64, u64, TcpState, TcpState, i32)]) -> (Vec<Observation>, Tracker) {
    let mut tracker = Tracker::default();
    let out = replay(&mut tracker, steps);
    (out, tracker)
}

/// Feeds raw records (as the ring delivers them) and returns every observation.
fn feed(tracker: &mut Tracker, records: &[Vec<u8>]) -> Vec<Observation> {
    let mut out = RecordingSink::default();
    for bytes in records {
        tracker.on_record(&crate::decode::decode(bytes).unwrap(), &mut out);
    }
    out.0.retain(|o| !matches!(o, Observation::StateLeft { .. }));
    out.0
}

fn stats(total_retrans: u32, srtt_us: u32) -> TcpStats {
    TcpStats { total_retrans, srtt_us_x8: srtt_us << 3, ..TcpStats::default() }
}

fn handshakes(out: &[Observation]) -> Vec<(Side, u64, Option<u32>)> {
    out.iter()
        .filter_map(|o| match *o {
            Observation::Handshake { side, duration_ns, retransmits } => {
                Some((side, duration_ns, retransmits))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn passive_handshake_is_the_synack_rtt_sample_without_retransmissions() {
    use crate::decode::fixture::{bytes, with_stats};
    let mut tracker = Tracker::default();
    let out = feed(
        &mut tracker,
        &[
            bytes(&v4(5 * MS, 9, Listen, SynRecv, 80, 40000, 0)),
            // srtt_us after tcp_synack_rtt_meas: 250 µs from SYN-ACK to ACK.
            bytes(&with_stats(v4(5 * MS, 9, SynRecv, Established, 80, 40000, 0), stats(0, 250))),
        ],
    );
    assert_eq!(handshakes(&out), [(Side::Passive, 250_000, Some(0))]);
}

#[test]
fn passive_handshake_with_a_resent_synack_runs_from_the_first_synack() {
    use crate::decode::fixture::{bytes, synack_retransmit, with_stats};
    let mut tracker = Tracker::default();
    let out = feed(
        &mut tracker,
        &[
            // First SYN-ACK at t = 2 s; resent at 3 s; final ACK at 3.0004 s. Karn's rule
            // leaves srtt from the timestamp echo (small), which must not be used.
            bytes(&synack_retransmit(3_000 * MS, 2_000_000, 80, 40000)),
            bytes(&v4(3_000 * MS + 400_000, 9, Listen, SynRecv, 80, 40000, 0)),
            bytes(&with_stats(
                v4(3_000 * MS + 400_000, 9, SynRecv, Established, 80, 40000, 0),
                stats(1, 300),
            )),
        ],
    );
    assert_eq!(handshakes(&out), [(Side::Passive, 1_000_400_000, Some(1))]);
    assert!(tracker.machine.synack_retransmits.is_empty(), "taken when established");

    // Another child with a retransmitted SYN-ACK whose note was lost: retries are
    // reported, a duration is not (it would be the wrong one).
    let out = feed(
        &mut tracker,
        &[
            bytes(&v4(4_000 * MS, 10, Listen, SynRecv, 80, 40001, 0)),
            bytes(&with_stats(
                v4(4_000 * MS, 10, SynRecv, Established, 80, 40001, 0),
                stats(2, 300),
            )),
        ],
    );
    assert_eq!(handshakes(&out), []);
    assert!(out.contains(&Observation::Opened { side: Side::Passive }));
    assert!(out.contains(&Observation::HandshakeRetransmits { side: Side::Passive, count: 2 }));
}

#[test]
fn pending_synack_retransmissions_are_bounded() {
    use crate::decode::fixture::synack_retransmit;
    // A SYN flood whose requests all resend their SYN-ACK, from distinct peers.
    let mut tracker = Tracker::default();
    for i in 0..MAX_PENDING_SYNACKS as u64 + 10 {
        let mut raw = synack_retransmit(MS, 1, 80, i as u16);
        raw.daddr[14..].copy_from_slice(&((i >> 16) as u16).to_be_bytes());
        let record = crate::decode::decode(&crate::decode::fixture::bytes(&raw)).unwrap();
        tracker.on_record(&record, &mut Vec::new());
    }
    assert_eq!(tracker.machine.synack_retransmits.len(), MAX_PENDING_SYNACKS);
    assert_eq!(tracker.stats().synack_untracked, 10);
    // Requests past the horizon can no longer complete: they make room.
    let late = synack_retransmit(SYNACK_HORIZON_NS + 2 * MS, SYNACK_HORIZON_NS / 1000, 81, 1);
    feed(&mut tracker, &[crate::decode::fixture::bytes(&late)]);
    assert_eq!(tracker.machine.synack_retransmits.len(), 1);
}

#[test]
fn syn_retransmissions_are_counted_on_success_and_failure() {
    use crate::decode::fixture::{bytes, with_stats};
    let mut tracker = Tracker::default();
    let out = feed(
        &mut tracker,
        &[
            bytes(&v4(0, 1, Close, SynSent, 0, 80, 0)),
            bytes(&with_stats(v4(1_003 * MS, 1, SynSent, Established, 40000, 80, 0), stats(1, 3))),
            bytes(&v4(0, 2, Close, SynSent, 0, 81, 0)),
            bytes(&with_stats(
                v4(127_000 * MS, 2, SynSent, Close, 40001, 81, libc::ETIMEDOUT),
                stats(6, 0),
            )),
        ],
    );
    assert_eq!(handshakes(&out), [(Side::Active, 1_003 * MS, Some(1))]);
    assert!(out.contains(&Observation::ConnectFailed {
        reason: CloseReason::Timeout,
        duration_ns: Some(127_000 * MS),
        retransmits: Some(6),
    }));
}

#[test]
fn resets_tell_sent_from_received_and_count_every_rst() {
    use crate::decode::fixture::{bytes, note};
    use monitor_common::note::{RESET_RECEIVED, RESET_SENT};
    let mut tracker = Tracker::default();
    let open = |sk| {
        [
            bytes(&v4(0, sk, Close, SynSent, 0, 80, 0)),
            bytes(&v4(MS, sk, SynSent, Established, 40000, 80, 0)),
        ]
    };
    let mut records: Vec<Vec<u8>> = Vec::new();
    // 1: orphaned FIN_WAIT2 killed by tcp_fin_timeout: RST sent, no error, then CLOSE.
    records.extend(open(1));
    records.push(bytes(&v4(2 * MS, 1, Established, FinWait1, 40000, 80, 0)));
    records.push(bytes(&v4(3 * MS, 1, FinWait1, FinWait2, 40000, 80, 0)));
    records.push(bytes(&note(60_000 * MS, 1, RESET_SENT, 0)));
    records.push(bytes(&v4(60_000 * MS, 1, FinWait2, Close, 40000, 80, 0)));
    // 2: the peer resets: tcp_reset() reports it, then sk_err = ECONNRESET.
    records.extend(open(2));
    records.push(bytes(&note(5 * MS, 2, RESET_RECEIVED, 0)));
    records.push(bytes(&v4(5 * MS, 2, Established, Close, 40000, 80, libc::ECONNRESET)));
    // 3: close() with unread data: CLOSE first, then the RST (tcp_send_active_reset).
    records.extend(open(3));
    records.push(bytes(&v4(5 * MS, 3, Established, Close, 40000, 80, 0)));
    records.push(bytes(&note(5 * MS, 3, RESET_SENT, 11)));
    // A RST for a segment no socket owns (a closed port).
    records.push(bytes(&note(6 * MS, 0, RESET_SENT, 1)));
    let out = feed(&mut tracker, &records);
    let reasons: Vec<CloseReason> = out
        .iter()
        .filter_map(|o| match o {
            Observation::Closed { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect();
    assert_eq!(reasons, [CloseReason::ResetSent, CloseReason::ResetReceived, CloseReason::Abort]);
    let count = |d| out.iter().filter(|o| **o == Observation::Reset { direction: d }).count();
    assert_eq!((count(ResetDirection::Sent), count(ResetDirection::Received)), (3, 1));
}

#[test]
fn connection_records_carry_netns_and_totals() {
    use crate::decode::fixture::{bytes, with_stats};
    let mut tracker = Tracker::default();
    let mut born = v4(0, 1, Close, SynSent, 0, 80, 0);
    born.netns = 4026532000;
    let totals = TcpStats { bytes_sent: 10, bytes_received: 20, ..stats(0, 5) };
    let out = feed(
        &mut tracker,
        &[
            bytes(&born),
            bytes(&v4(MS, 1, SynSent, Established, 40000, 80, 0)),
            bytes(&v4(2 * MS, 1, Established, CloseWait, 40000, 80, 0)),
            bytes(&v4(3 * MS, 1, CloseWait, LastAck, 40000, 80, 0)),
            bytes(&with_stats(v4(4 * MS, 1, LastAck, Close, 40000, 80, 0), totals)),
        ],
    );
    let closed = out
        .iter()
        .find_map(|o| match o {
            Observation::Connection(r) if r.phase == ConnectionPhase::Closed => Some(*r),
            _ => None,
        })
        .unwrap();
    assert_eq!(closed.netns, Some(4026532000));
    assert_eq!(closed.stats, Some(TcpStats { complete: 1, ..totals }));
    assert_eq!(closed.handshake_retransmits, None);
}

#[test]
fn an_event_during_the_snapshot_hides_only_its_own_namespaces_twin() {
    let in_netns = |netns, local: &str| ExistingSocket {
        state: Listen,
        // The fixture's records are 127.0.0.1 to 127.0.0.1.
        endpoints: Endpoints::new(local.parse().unwrap(), "127.0.0.1:0".parse().unwrap()),
        netns,
        owner: Owner::UNKNOWN,
        cgroup_id: 0,
    };
    let mut tracker = Tracker::default();
    tracker.expect_snapshot();
    let mut out = RecordingSink::default();
    // A listener born in namespace 5 while the snapshot was taken: only that one is known.
    let mut raw = v4(MS, 5, Close, Listen, 8080, 0, 0);
    raw.netns = 5;
    tracker.on_event(&decode_record(&raw).unwrap(), &mut out);
    // A mid-life event names no namespace: every twin of its 4-tuple is described.
    tracker.on_event(&decode_record(&v4(MS, 6, Listen, Close, 9090, 0, 0)).unwrap(), &mut out);
    let added = tracker.preload(&[
        in_netns(5, "127.0.0.1:8080"),
        in_netns(6, "127.0.0.1:8080"),
        in_netns(5, "127.0.0.1:9090"),
        in_netns(6, "127.0.0.1:9090"),
    ]);
    assert_eq!(added, 1, "only namespace 6's listener on 8080 comes from the snapshot");
}

#[test]
fn snapshot_sockets_are_counted_matched_and_closed_without_invented_times() {
    let existing = |state, local: &str, remote: &str, pid| ExistingSocket {
        state,
        endpoints: Endpoints::new(local.parse().unwrap(), remote.parse().unwrap()),
        netns: 77,
        owner: Owner { pid: Some(pid), comm: *b"db\0\0\0\0\0\0\0\0\0\0\0\0\0\0" },
        cgroup_id: 0,
    };
    let mut tracker = Tracker::default();
    tracker.expect_snapshot();
    // An event between attach and preload: this socket is already described.
    let mut out = RecordingSink::default();
    let raced = decode_record(&v4(MS, 5, Established, CloseWait, 41000, 80, 0)).unwrap();
    tracker.on_event(&raced, &mut out);
    let added = tracker.preload(&[
        existing(Listen, "127.0.0.1:80", "0.0.0.0:0", 7),
        existing(Established, "127.0.0.1:40000", "127.0.0.1:80", 8),
        existing(Established, "127.0.0.1:41000", "127.0.0.1:80", 8),
    ]);
    assert_eq!(added, 2);
    assert_eq!(tracker.per_state()[Listen.index()], 1);
    assert_eq!(tracker.per_state()[Established.index()], 1);
    assert_eq!(tracker.per_state()[CloseWait.index()], 1);
    assert_eq!(tracker.len(), 3);

    // The existing connection closes: matched by 4-tuple, owner from the snapshot, no
    // lifetime or teardown start invented for the part of its life we did not see.
    let mut out = RecordingSink::default();
    for (ms, old, new) in
        [(10, Established, FinWait1), (11, FinWait1, FinWait2), (12, FinWait2, Close)]
    {
        tracker
            .on_event(&decode_record(&v4(ms * MS, 9, old, new, 40000, 80, 0)).unwrap(), &mut out);
    }
    let closed = out.0.iter().find_map(|o| match o {
        Observation::Connection(r) if r.phase == ConnectionPhase::Closed => Some(*r),
        _ => None,
    });
    let closed = closed.unwrap();
    assert_eq!((closed.owner.pid, closed.netns, closed.side), (Some(8), Some(77), None));
    assert_eq!((closed.start_ns, closed.lifetime_ns, closed.handshake_ns), (None, None, None));
    assert_eq!(tracker.per_state()[Established.index()], 0);
    assert_eq!(tracker.len(), 2);

    // The listener from the snapshot owns the connections it accepts.
    let mut child = v4(20 * MS, 11, Listen, SynRecv, 80, 50000, 0);
    child.netns = 77;
    tracker.on_event(&decode_record(&child).unwrap(), &mut out);
    assert_eq!(tracker.table.get(11).unwrap().owner.pid, Some(7));
}

#[test]
fn time_in_each_state_is_the_gap_between_the_transitions() {
    let mut tracker = Tracker::default();
    let out = replay_all(
        &mut tracker,
        &[
            (100, 1, Close, SynSent, 0),
            (103, 1, SynSent, Established, 0),
            (1103, 1, Established, FinWait1, 0),
            (1143, 1, FinWait1, FinWait2, 0),
            (2143, 1, FinWait2, Close, 0),
            // Passive, closed by the peer: CLOSE_WAIT until the application closes.
            (0, 9, Close, Listen, 0),
            (10, 2, Listen, SynRecv, 0),
            (12, 2, SynRecv, Established, 0),
            (500, 2, Established, CloseWait, 0),
            (3500, 2, CloseWait, LastAck, 0),
            (3501, 2, LastAck, Close, 0),
            // First seen mid-life: the time in FIN_WAIT1 is not known, FIN_WAIT2's is.
            (5000, 3, FinWait1, FinWait2, 0),
            (5060, 3, FinWait2, Close, 0),
        ],
    );
    let left: Vec<(TcpState, u64)> = out
        .iter()
        .filter_map(|o| match o {
            Observation::StateLeft { state, duration_ns } => Some((*state, duration_ns / MS)),
            _ => None,
        })
        .collect();
    assert_eq!(
        left,
        [
            (SynSent, 3),
            (FinWait1, 40),
            (FinWait2, 1000),
            (SynRecv, 2),
            (CloseWait, 3000),
            (LastAck, 1),
            (FinWait2, 60),
        ]
    );
}

#[test]
fn active_open_and_active_close() {
    let (out, tracker) = run(&[
        (100, 1, Close, SynSent, 0),
        (103, 1, SynSent, Established, 0),
        (1103, 1, Established, FinWait1, 0),
        (1143, 1, FinWait1, FinWait2, 0),
        (1143, 1, FinWait2, Close, 0),
    ]);
    assert_eq!(
        out,
        vec![
            Observation::Opened { side: Side::Active },
            Observation::Handshake { side: Side::Active, duration_ns: 3 * MS, retransmits: None },
            Observation::Closed {
                side: Some(Side::Active),
                reason: CloseReason::Fin,
                lifetime_ns: Some(1040 * MS),
                teardown: Some((Side::Active, 40 * MS)),
                time_wait: true,
            },
        ]
    );
    assert!(tracker.is_empty());
    assert_eq!(tracker.per_state(), &[0; 12]);
}

#[test]
fn passive_open_and_passive_close_with_close_wait() {
    let (out, _) = run(&[
        (0, 9, Close, Listen, 0),
        (10, 2, Listen, SynRecv, 0),
        (10, 2, SynRecv, Established, 0),
        (500, 2, Established, CloseWait, 0),
        (800, 2, CloseWait, LastAck, 0),
        (801, 2, LastAck, Close, 0),
    ]);
    assert_eq!(
        out,
        vec![
            Observation::Listening { port: 40000 },
            // No handshake: SYN_RECV → ESTABLISHED is not the passive handshake.
            Observation::Opened { side: Side::Passive },
            Observation::CloseWaitEntered,
            Observation::CloseWait { duration_ns: 300 * MS },
            Observation::Closed {
                side: Some(Side::Passive),
                reason: CloseReason::Fin,
                lifetime_ns: Some(791 * MS),
                teardown: Some((Side::Passive, 301 * MS)),
                time_wait: false,
            },
        ]
    );
}

#[test]
fn simultaneous_close_is_an_active_teardown() {
    let (out, _) = run(&[
        (0, 1, Close, SynSent, 0),
        (1, 1, SynSent, Established, 0),
        (10, 1, Established, FinWait1, 0),
        (11, 1, FinWait1, Closing, 0),
        (12, 1, Closing, Close, 0),
    ]);
    assert_eq!(
        &out[out.len() - 1..],
        [Observation::Closed {
            side: Some(Side::Active),
            reason: CloseReason::Fin,
            lifetime_ns: Some(11 * MS),
            teardown: Some((Side::Active, 2 * MS)),
            time_wait: true,
        },]
    );
}

#[test]
fn resets_and_aborts() {
    let (out, _) = run(&[
        (0, 1, Close, SynSent, 0),
        (1, 1, SynSent, Established, 0),
        (5, 1, Established, Close, libc::ECONNRESET),
        (0, 2, Close, SynSent, 0),
        (1, 2, SynSent, Established, 0),
        (7, 2, Established, Close, 0),
        (0, 3, Listen, SynRecv, 0),
        (0, 3, SynRecv, Established, 0),
        (2, 3, Established, CloseWait, 0),
        (4, 3, CloseWait, Close, libc::EPIPE),
    ]);
    let closes: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            Observation::Closed { reason, teardown, side, .. } => Some((*side, *reason, *teardown)),
            _ => None,
        })
        .collect();
    assert_eq!(
        closes,
        vec![
            (Some(Side::Active), CloseReason::ResetReceived, None),
            (Some(Side::Active), CloseReason::Abort, None),
            (Some(Side::Passive), CloseReason::ResetReceived, None),
        ]
    );
}

#[test]
fn refused_timeout_and_abandoned_connects() {
    let (out, tracker) = run(&[
        (0, 1, Close, SynSent, 0),
        (1, 1, SynSent, Close, libc::ECONNREFUSED),
        (0, 2, Close, SynSent, 0),
        (127_000, 2, SynSent, Close, libc::ETIMEDOUT),
        (0, 3, Close, SynSent, 0),
        (50, 3, SynSent, Close, 0),
        (0, 4, Close, SynSent, 0),
        (3, 4, SynSent, Close, libc::EHOSTUNREACH),
    ]);
    assert_eq!(
        out,
        vec![
            Observation::ConnectFailed {
                reason: CloseReason::Refused,
                duration_ns: Some(MS),
                retransmits: None
            },
            Observation::ConnectFailed {
                reason: CloseReason::Timeout,
                duration_ns: Some(127_000 * MS),
                retransmits: None,
            },
            Observation::ConnectFailed {
                reason: CloseReason::Abort,
                duration_ns: Some(50 * MS),
                retransmits: None,
            },
            Observation::ConnectFailed {
                reason: CloseReason::Unreachable,
                duration_ns: Some(3 * MS),
                retransmits: None,
            },
        ]
    );
    assert!(tracker.is_empty());
}

#[test]
fn sockets_first_seen_mid_life_report_only_what_was_seen() {
    let (out, tracker) = run(&[
        // Established before we started: the teardown is seen whole, the lifetime is not.
        (0, 1, Established, FinWait1, 0),
        (40, 1, FinWait1, FinWait2, 0),
        (40, 1, FinWait2, Close, 0),
        // Only its close is seen.
        (5, 2, LastAck, Close, 0),
    ]);
    assert_eq!(
        out,
        vec![
            Observation::Closed {
                side: None,
                reason: CloseReason::Fin,
                lifetime_ns: None,
                teardown: Some((Side::Active, 40 * MS)),
                time_wait: true,
            },
            Observation::Closed {
                side: None,
                reason: CloseReason::Fin,
                lifetime_ns: None,
                teardown: None,
                time_wait: false,
            },
        ]
    );
    assert_eq!(tracker.stats().first_seen_midlife, 2);
}

#[test]
fn a_reused_socket_address_starts_a_fresh_connection() {
    let (out, tracker) = run(&[
        (0, 7, Close, SynSent, 0),
        (2, 7, SynSent, Established, 0),
        (3, 7, Established, FinWait1, 0),
        (4, 7, FinWait1, FinWait2, 0),
        (4, 7, FinWait2, Close, 0),
        (100, 7, Close, SynSent, 0),
        (105, 7, SynSent, Established, 0),
    ]);
    assert_eq!(
        out.last(),
        Some(&Observation::Handshake {
            side: Side::Active,
            duration_ns: 5 * MS,
            retransmits: None
        })
    );
    assert_eq!(tracker.len(), 1);
    assert_eq!(tracker.per_state()[Established.index()], 1);
    assert_eq!(tracker.stats().replaced_stale, 0);
}

#[test]
fn lost_events_never_produce_wrong_latencies() {
    // Lost: the old connection's CLOSE and the new one's CLOSE → SYN_SENT.
    let (out, tracker) = run(&[
        (0, 7, Close, SynSent, 0),
        (2, 7, SynSent, Established, 0),
        (900, 7, SynSent, Established, 0),
        (950, 7, Established, FinWait1, 0),
        (960, 7, FinWait1, FinWait2, 0),
        (960, 7, FinWait2, Close, 0),
    ]);
    // The second "open" must not use the first SYN time, and the lifetime must not
    // start at the first connection's establishment.
    assert_eq!(
        &out[2..],
        &[
            Observation::Opened { side: Side::Active },
            Observation::Closed {
                side: Some(Side::Active),
                reason: CloseReason::Fin,
                lifetime_ns: Some(60 * MS),
                teardown: Some((Side::Active, 10 * MS)),
                time_wait: true,
            },
        ]
    );
    assert_eq!(tracker.stats().inconsistent, 1);

    // Lost: ESTABLISHED → FIN_WAIT1. No teardown can be measured; the lifetime still is.
    let (out, tracker) = run(&[
        (0, 1, Close, SynSent, 0),
        (1, 1, SynSent, Established, 0),
        (50, 1, FinWait1, FinWait2, 0),
        (50, 1, FinWait2, Close, 0),
    ]);
    assert_eq!(
        out.last(),
        Some(&Observation::Closed {
            side: Some(Side::Active),
            reason: CloseReason::Fin,
            lifetime_ns: Some(49 * MS),
            teardown: None,
            time_wait: true,
        })
    );
    assert_eq!(tracker.stats().inconsistent, 1);
}

#[test]
fn listeners_are_tracked_but_never_counted_as_connections() {
    let (out, mut tracker) = run(&[(0, 9, Close, Listen, 0)]);
    assert_eq!(out, [Observation::Listening { port: 40000 }]);
    assert_eq!(tracker.per_state()[Listen.index()], 1);
    let out = replay(&mut tracker, &[(5, 9, Listen, Close, 0)]);
    assert!(out.is_empty());
    assert!(tracker.is_empty());
}

#[test]
fn passive_child_closed_before_established_is_not_a_connect_failure() {
    let (out, tracker) =
        run(&[(0, 3, Listen, SynRecv, 0), (1, 3, SynRecv, Close, libc::ECONNRESET)]);
    assert!(out.is_empty());
    assert_eq!(tracker.stats().passive_open_aborted, 1);
}

/// Two CPUs completed one handshake (the client's ACK and its data, at once): the kernel made
/// two children of one request, hashed the first and closed the second straight from
/// SYN_RECV (`inet_ehash_nolisten()`), as a 16-CPU guest of the kernel matrix showed. The
/// tail shows one connection, not a failed one beside it; the transitions stay visible.
#[test]
fn a_duplicate_child_the_kernel_discards_is_no_failed_connection() {
    let mut tracker = Tracker::default();
    let mut sink = RecordingSink::default();
    for (us, skaddr, old, new) in [
        (0, 3, Listen, SynRecv), // the winner
        (2, 4, Listen, SynRecv), // the loser, same 4-tuple
        (3, 4, SynRecv, Close),  // not hashed: closed at once
        (5, 3, SynRecv, Established),
    ] {
        let raw = v4(us * 1_000, skaddr, old, new, 0, 8080, 50_000);
        tracker.on_event(&decode_record(&raw).unwrap(), &mut sink);
    }
    let connections: Vec<_> = sink
        .0
        .iter()
        .filter_map(|o| match o {
            Observation::Connection(record) => Some(record.phase),
            _ => None,
        })
        .collect();
    assert!(!connections.contains(&ConnectionPhase::Failed), "{connections:?}");
    let transitions = sink.0.iter().filter(|o| matches!(o, Observation::Transition(_))).count();
    assert_eq!(transitions, 4, "every transition stays in the --events view");
    assert_eq!(tracker.stats().passive_open_aborted, 1);
}

#[test]
fn a_connect_that_never_got_a_port_is_an_error_not_an_abort() {
    let mut tracker = Tracker::default();
    let mut out = Vec::new();
    for (ms, old, new) in [(0, Close, SynSent), (1, SynSent, Close)] {
        let raw = v4(ms * MS, 5, old, new, 0, 80, 0); // sport stays 0
        tracker.on_event(&decode_record(&raw).unwrap(), &mut out);
    }
    out.retain(|o| !matches!(o, Observation::StateLeft { .. }));
    assert_eq!(
        out,
        vec![Observation::ConnectFailed {
            reason: CloseReason::Error,
            duration_ns: Some(MS),
            retransmits: None
        }]
    );
}

#[test]
fn fast_open_children_are_established_by_a_fin_before_the_ack() {
    let (out, _) = run(&[
        (0, 2, Listen, SynRecv, 0),
        (1, 2, SynRecv, CloseWait, 0),
        (3, 2, CloseWait, LastAck, 0),
        (4, 2, LastAck, Close, 0),
    ]);
    assert_eq!(
        out,
        vec![
            Observation::Opened { side: Side::Passive },
            Observation::CloseWaitEntered,
            Observation::CloseWait { duration_ns: 2 * MS },
            Observation::Closed {
                side: Some(Side::Passive),
                reason: CloseReason::Fin,
                lifetime_ns: Some(3 * MS),
                teardown: Some((Side::Passive, 3 * MS)),
                time_wait: false,
            },
        ]
    );
}

fn records(steps: &[(u64, u64, TcpState, TcpState, i32)]) -> Vec<Observation> {
    let mut tracker = Tracker::default();
    let mut sink = RecordingSink::default();
    for &(ms, sk, old, new, err) in steps {
        let listener = new == Listen || (old, new) == (Listen, Close);
        let mut raw = v4(ms * MS, sk, old, new, if listener { 80 } else { 40000 }, 80, err);
        if (old, new) == (Listen, SynRecv) {
            raw.sport = 80;
            raw.dport = 40000;
            raw.pid_tgid = 7 << 32; // softirq: whatever task was interrupted
        }
        if (old, new) == (Close, Listen) {
            raw.pid_tgid = 99 << 32;
            raw.comm = *b"nginx\0\0\0\0\0\0\0\0\0\0\0";
        }
        tracker.on_event(&decode_record(&raw).unwrap(), &mut sink);
    }
    sink.0
}

#[test]
fn connection_records_carry_identity_and_every_latency() {
    let out = records(&[
        (0, 1, Close, SynSent, 0),
        (2, 1, SynSent, Established, 0),
        (10, 1, Established, CloseWait, 0),
        (310, 1, CloseWait, LastAck, 0),
        (311, 1, LastAck, Close, 0),
    ]);
    let connections: Vec<ConnectionRecord> = out
        .iter()
        .filter_map(|o| match o {
            Observation::Connection(c) => Some(*c),
            _ => None,
        })
        .collect();
    assert_eq!(connections.len(), 2);
    assert_eq!(connections[0].phase, ConnectionPhase::Established);
    assert_eq!(connections[0].handshake_ns, Some(2 * MS));
    let closed = connections[1];
    assert_eq!(closed.phase, ConnectionPhase::Closed);
    assert_eq!(closed.start_ns, Some(0));
    assert_eq!(closed.time_ns, 311 * MS);
    assert_eq!(closed.side, Some(Side::Active));
    assert_eq!(closed.owner.pid, Some(4242));
    assert_eq!(closed.owner.comm(), "test");
    assert_eq!(closed.endpoints.local(), "127.0.0.1:40000".parse().unwrap());
    assert_eq!(closed.endpoints.remote(), "127.0.0.1:80".parse().unwrap());
    assert_eq!(closed.handshake_ns, Some(2 * MS));
    assert_eq!(closed.lifetime_ns, Some(309 * MS));
    assert_eq!(closed.teardown, Some((Side::Passive, 301 * MS)));
    assert_eq!(closed.close_wait_ns, Some(300 * MS));
    assert_eq!(closed.outcome, Some(CloseReason::Fin));

    let transitions: Vec<TransitionRecord> = out
        .iter()
        .filter_map(|o| match o {
            Observation::Transition(t) => Some(*t),
            _ => None,
        })
        .collect();
    assert_eq!(transitions.len(), 5);
    assert_eq!(transitions[0].in_old_ns, None);
    assert_eq!(transitions[1].in_old_ns, Some(2 * MS));
    assert_eq!(transitions[3].in_old_ns, Some(300 * MS));
    assert_eq!(transitions[3].new, LastAck);
}

#[test]
fn accepted_connections_belong_to_the_listener_not_the_interrupted_task() {
    let out = records(&[
        (0, 9, Close, Listen, 0),
        (5, 2, Listen, SynRecv, 0),
        (5, 2, SynRecv, Established, 0),
        (6, 2, Established, Close, libc::ECONNRESET),
        // Its listener closed: a later child of port 80 has no known owner.
        (7, 9, Listen, Close, 0),
        (8, 3, Listen, SynRecv, 0),
        (8, 3, SynRecv, Established, 0),
        (9, 3, Established, Close, libc::ECONNRESET),
    ]);
    let owners: Vec<(ConnectionPhase, Option<u32>, String)> = out
        .iter()
        .filter_map(|o| match o {
            Observation::Connection(c) => Some((c.phase, c.owner.pid, c.owner.comm().into_owned())),
            _ => None,
        })
        .collect();
    assert_eq!(
        owners,
        vec![
            (ConnectionPhase::Established, Some(99), "nginx".to_owned()),
            (ConnectionPhase::Closed, Some(99), "nginx".to_owned()),
            (ConnectionPhase::Established, None, String::new()),
            (ConnectionPhase::Closed, None, String::new()),
        ]
    );
}

#[test]
fn without_a_tail_no_records_are_built() {
    let (out, _) = run(&[(0, 1, Close, SynSent, 0), (1, 1, SynSent, Established, 0)]);
    assert!(out
        .iter()
        .all(|o| !matches!(o, Observation::Connection(_) | Observation::Transition(_))));
}

#[test]
fn the_table_stays_within_its_cap() {
    let mut tracker = Tracker::new(64);
    for sk in 0..1000u64 {
        replay(&mut tracker, &[(sk, sk, Close, SynSent, 0)]);
        assert!(tracker.len() <= 64);
    }
    assert_eq!(tracker.per_state()[SynSent.index()], tracker.len() as u64);
    assert!(tracker.stats().evicted_capacity >= 1000 - 64);
    // The newest sockets survive eviction.
    let out = replay(&mut tracker, &[(2000, 999, SynSent, Established, 0)]);
    assert_eq!(
        out.last(),
        Some(&Observation::Handshake {
            side: Side::Active,
            duration_ns: 1001 * MS,
            retransmits: None
        })
    );
}

/// Keeps every metric observation with whose it is (`None`: not attributed).
#[derive(Default)]
struct AttributedSink(Vec<(Observation, Option<Attribution>)>);

impl ObservationSink for AttributedSink {
    fn observe(&mut self, observation: &Observation) {
        self.0.push((*observation, None));
    }

    fn observe_in(&mut self, observation: &Observation, whose: &Attribution) {
        self.0.push((*observation, Some(*whose)));
    }
}

#[test]
fn observations_are_attributed_to_the_service_port_and_the_sockets_cgroup() {
    let mut tracker = Tracker::default();
    let mut sink = AttributedSink::default();
    let event = |ms: u64, sk, old, new, local: u16, remote: u16, cgroup_id| {
        let mut raw = v4(ms * MS, sk, old, new, local, remote, 0);
        raw.cgroup_id = cgroup_id;
        raw.netns = 7;
        decode_record(&raw).unwrap()
    };
    for event in [
        // A listener in cgroup 11; its child's record carries no cgroup (older kernels).
        event(0, 9, Close, Listen, 80, 0, 11),
        event(1, 2, Listen, SynRecv, 80, 40000, 0),
        event(1, 2, SynRecv, Established, 80, 40000, 0),
        // A connect from cgroup 12 to port 5432.
        event(2, 3, Close, SynSent, 0, 5432, 12),
        event(3, 3, SynSent, Established, 41000, 5432, 0),
        // First seen mid-life on the listening port: an accepted connection.
        event(4, 4, Established, FinWait1, 80, 40001, 0),
        event(5, 4, FinWait1, Close, 80, 40001, 13),
    ] {
        tracker.on_event(&event, &mut sink);
    }
    let whose = |port, listening, cgroup_id| {
        Some(Attribution { netns: 7, cgroup_id, service_port: Some(port), listening })
    };
    let passive = Observation::Opened { side: Side::Passive };
    let active = Observation::Opened { side: Side::Active };
    let seen: Vec<_> = sink
        .0
        .iter()
        .filter(|(o, _)| {
            !matches!(o, Observation::Handshake { .. } | Observation::StateLeft { .. })
        })
        .collect();
    assert_eq!(seen[0], &(Observation::Listening { port: 80 }, whose(80, true, 11)));
    assert_eq!(seen[1], &(passive, whose(80, true, 11)), "the child takes its listener's cgroup");
    assert_eq!(seen[2], &(active, whose(5432, false, 12)));
    assert!(
        matches!(seen[3], (Observation::Closed { side: None, .. }, w) if *w == whose(80, true, 13))
    );
    assert_eq!(seen.len(), 4);
}

#[test]
fn sockets_from_the_snapshot_keep_their_owners_cgroup_when_records_carry_none() {
    let mut tracker = Tracker::default();
    tracker.expect_snapshot();
    let listener = ExistingSocket {
        state: Listen,
        endpoints: Endpoints::new("127.0.0.1:80".parse().unwrap(), "0.0.0.0:0".parse().unwrap()),
        netns: 0,
        owner: Owner::UNKNOWN,
        cgroup_id: 21,
    };
    let established = ExistingSocket {
        state: Established,
        endpoints: Endpoints::new(
            "127.0.0.1:80".parse().unwrap(),
            "127.0.0.1:40000".parse().unwrap(),
        ),
        cgroup_id: 22,
        ..listener
    };
    tracker.preload(&[listener, established]);
    let mut sink = AttributedSink::default();
    // Records without cgroup ids (a kernel where the program cannot read them): a child of
    // the old listener, and the old connection closing.
    for (ms, sk, old, new, local, remote) in [
        (1, 5, Listen, SynRecv, 80, 40001),
        (1, 5, SynRecv, Established, 80, 40001),
        (2, 6, Established, CloseWait, 80, 40000),
    ] {
        let event = decode_record(&v4(ms * MS, sk, old, new, local, remote, 0)).unwrap();
        tracker.on_event(&event, &mut sink);
    }
    let cgroups: Vec<(Observation, u64)> = sink
        .0
        .iter()
        .filter(|(o, _)| !matches!(o, Observation::StateLeft { .. }))
        .map(|(o, whose)| (*o, whose.map_or(0, |w| w.cgroup_id)))
        .collect();
    assert_eq!(
        cgroups,
        [(Observation::Opened { side: Side::Passive }, 21), (Observation::CloseWaitEntered, 22),]
    );
}

/// A listener on port 80 (socket 1) and passive children of it, established at `ms`.
fn queued(tracker: &mut Tracker, children: &[(u64, u64)]) -> Vec<Observation> {
    use crate::decode::fixture::bytes;
    let mut records = vec![bytes(&v4(0, 1, Close, Listen, 80, 0, 0))];
    for &(ms, sk) in children {
        let port = 40000 + sk as u16;
        records.push(bytes(&v4(ms * MS, sk, Listen, SynRecv, 80, port, 0)));
        records.push(bytes(&v4(ms * MS, sk, SynRecv, Established, 80, port, 0)));
    }
    feed(tracker, &records)
}

fn accepted(ms: u64, sk: u64) -> Vec<u8> {
    use crate::decode::fixture::{bytes, note};
    bytes(&note(ms * MS, sk, monitor_common::note::ACCEPTED, 0))
}

fn abandoned(out: &[Observation]) -> Vec<AbandonReason> {
    out.iter()
        .filter_map(|o| match *o {
            Observation::AcceptAbandoned { reason } => Some(reason),
            _ => None,
        })
        .collect()
}

#[test]
fn the_accept_wait_runs_from_established_to_accept_and_is_on_the_closed_record() {
    use crate::decode::fixture::bytes;
    let mut tracker = Tracker::default();
    tracker.set_accepts_seen(true);
    queued(&mut tracker, &[(10, 9)]);
    let out = feed(&mut tracker, &[accepted(410, 9), accepted(500, 9)]);
    // Once: a second note for the same socket (a lost CLOSE and a reused address would
    // need a birth first) changes nothing.
    assert_eq!(out, [Observation::Accepted { wait_ns: 400 * MS }]);
    let out = feed(
        &mut tracker,
        &[
            bytes(&v4(600 * MS, 9, Established, FinWait1, 80, 40009, 0)),
            bytes(&v4(601 * MS, 9, FinWait1, FinWait2, 80, 40009, 0)),
            bytes(&v4(602 * MS, 9, FinWait2, Close, 80, 40009, 0)),
        ],
    );
    assert_eq!(abandoned(&out), []);
    let closed = out.iter().find_map(|o| match o {
        Observation::Connection(record) if record.phase == ConnectionPhase::Closed => Some(record),
        _ => None,
    });
    assert_eq!(closed.unwrap().accept_wait_ns, Some(400 * MS));
    // Notes for sockets it does not track, or for active ones, are ignored.
    let out = feed(
        &mut tracker,
        &[accepted(700, 77), bytes(&v4(700 * MS, 5, Close, SynSent, 0, 80, 0)), accepted(701, 5)],
    );
    assert!(!out.iter().any(|o| matches!(o, Observation::Accepted { .. })), "{out:?}");
}

#[test]
fn connections_that_leave_the_queue_unaccepted_are_abandoned_with_their_reason() {
    use crate::decode::fixture::bytes;
    let mut tracker = Tracker::default();
    tracker.set_accepts_seen(true);
    queued(&mut tracker, &[(10, 9), (10, 10), (10, 11), (10, 12)]);
    let out = feed(
        &mut tracker,
        &[
            // Reset by the client while queued.
            bytes(&v4(20 * MS, 9, Established, Close, 80, 40009, libc::ECONNRESET)),
            // The client's FIN leaves it queued in CLOSE_WAIT: accept() still returns it.
            bytes(&v4(20 * MS, 10, Established, CloseWait, 80, 40010, 0)),
            accepted(30, 10),
            bytes(&v4(31 * MS, 10, CloseWait, LastAck, 80, 40010, 0)),
            bytes(&v4(32 * MS, 10, LastAck, Close, 80, 40010, 0)),
            // The listener closes, then inet_csk_listen_stop() disconnects the queued ones.
            bytes(&v4(40 * MS, 1, Listen, Close, 80, 0, 0)),
            bytes(&v4(40 * MS, 11, Established, Close, 80, 40011, 0)),
            bytes(&v4(40 * MS, 12, Established, Close, 80, 40012, 0)),
        ],
    );
    use AbandonReason::*;
    assert_eq!(abandoned(&out), [Reset, ListenerClosed, ListenerClosed]);
}

#[test]
fn without_accept_notes_nothing_is_called_abandoned() {
    use crate::decode::fixture::bytes;
    // The accept program is not attached: a reset child may have been accepted.
    let mut tracker = Tracker::default();
    queued(&mut tracker, &[(10, 9)]);
    let out = feed(&mut tracker, &[bytes(&v4(20 * MS, 9, Established, Close, 80, 40009, 0))]);
    assert_eq!(abandoned(&out), []);
    // Attached, but the application closes a socket whose accept() was not seen (io_uring):
    // its FIN proves it was accepted.
    tracker.set_accepts_seen(true);
    queued(&mut tracker, &[(30, 10)]);
    let out = feed(
        &mut tracker,
        &[
            bytes(&v4(40 * MS, 10, Established, FinWait1, 80, 40010, 0)),
            bytes(&v4(41 * MS, 10, FinWait1, Close, 80, 40010, 0)),
        ],
    );
    assert_eq!(abandoned(&out), []);
}
