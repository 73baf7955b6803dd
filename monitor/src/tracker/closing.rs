//! A socket's end: the first FIN, the close and its reason, and the CLOSE_WAIT sockets an
//! eviction took before they closed.

use super::entry::{elapsed, SocketEntry, Stamp};
use super::{CloseReason, ConnectionPhase, Machine, Observation, ObservationSink, Side, Tracker};
use crate::decode::{Event, TcpState};

impl Tracker {
    #[cold]
    #[inline(never)]
    pub(super) fn report_gone_close_waits(&mut self, sink: &mut impl ObservationSink) {
        self.gone_close_waits.extend(self.table.take_evicted_close_waits());
        for gone in std::mem::take(&mut self.gone_close_waits) {
            sink.observe_in(&Observation::CloseWaitLeft, &self.machine.attribution(&gone));
        }
    }
}

impl Machine {
    /// The first FIN of an orderly close: ours (→ FIN_WAIT1) starts an active teardown, the
    /// peer's (→ CLOSE_WAIT) a passive one and the application's close-wait time.
    pub(super) fn first_fin(
        &self,
        entry: &mut SocketEntry,
        event: &Event,
        sink: &mut impl ObservationSink,
    ) {
        let now = event.timestamp_ns;
        entry.first_fin_ns = Stamp::at(now);
        if event.new == TcpState::FinWait1 {
            entry.first_fin_side = Some(Side::Active);
        } else {
            entry.first_fin_side = Some(Side::Passive);
            entry.close_wait_ns = Stamp::at(now);
            sink.observe_in(&Observation::CloseWaitEntered, &self.attribution(entry));
        }
    }

    /// Reports the end of a connection, or of a connection attempt.
    pub(super) fn close(
        &mut self,
        event: &Event,
        entry: &SocketEntry,
        sink: &mut impl ObservationSink,
    ) {
        let now = event.timestamp_ns;
        let reason =
            CloseReason::classify(event.old, event.sock_err, event.endpoints.sport, entry.resets);
        if event.old == TcpState::Listen {
            return;
        }
        let records = sink.wants_records();
        let pre_established = matches!(event.old, TcpState::SynSent | TcpState::SynRecv)
            && entry.established_ns.is_none();
        if pre_established {
            if entry.open_side == Some(Side::Passive) {
                // A child the kernel discarded before anyone could accept it: no connection
                // failed, so it gets no `failed` record (the `--events` view still shows its
                // transitions). Mostly the loser when two CPUs complete the same handshake at
                // once (the client's ACK and its first data): `inet_ehash_nolisten()` finds
                // the winner already hashed and closes this one, which the kernel matrix sees
                // on 16 CPUs; else a listener closed while the child was being queued
                // (`inet_child_forget()`).
                self.stats.passive_open_aborted += 1;
                return;
            }
            // SYN retransmissions of a connect that never completed.
            let retransmits = event.stats.map(|stats| stats.total_retrans);
            let duration_ns = entry.syn_sent_ns.get().map(|sent| elapsed(sent, now));
            let failed = Observation::ConnectFailed { reason, duration_ns, retransmits };
            sink.observe_in(&failed, &self.attribution(entry));
            if records {
                let mut record =
                    entry.connection_record(ConnectionPhase::Failed, now, Some(reason));
                record.handshake_retransmits = retransmits.or(entry.handshake_retransmits);
                record.stats = event.stats;
                sink.observe(&Observation::Connection(record));
            }
            return;
        }
        let teardown = match (reason, entry.first_fin()) {
            (CloseReason::Fin, Some((side, since))) => Some((side, elapsed(since, now))),
            _ => None,
        };
        let lifetime_ns = entry.established_ns.get().map(|since| elapsed(since, now));
        // tcp_time_wait() ends an orderly active close in FIN_WAIT2 (our FIN acknowledged, the
        // peer's received) or CLOSING (simultaneous close); a FIN_WAIT2 that times out or is
        // reset ends with a RST instead, so its reason is not `fin`.
        let time_wait = reason == CloseReason::Fin
            && matches!(event.old, TcpState::FinWait2 | TcpState::Closing);
        if let Some(reason) = self.abandoned(entry, event, reason) {
            sink.observe_in(&Observation::AcceptAbandoned { reason }, &self.attribution(entry));
        }
        let side = entry.open_side;
        let closed = Observation::Closed { side, reason, lifetime_ns, teardown, time_wait };
        sink.observe_in(&closed, &self.attribution(entry));
        if records {
            let mut record = entry.connection_record(ConnectionPhase::Closed, now, Some(reason));
            record.lifetime_ns = lifetime_ns;
            record.teardown = teardown;
            record.stats = event.stats;
            sink.observe(&Observation::Connection(record));
        }
    }
}

/// Logs the first few out-of-sequence transitions in full (they are rare, and each is worth
/// a look: a lost transition, or a kernel path that changes state without the tracepoint).
pub(super) fn log_out_of_sequence(count: u64, event: &Event, tracked: TcpState) {
    if count <= 8 {
        log::info!(
            "out-of-sequence transition {:?} -> {:?} of socket {:#x} ({} -> {}), tracked in \
             {tracked:?} (#{count}; only the first 8 are logged)",
            event.old,
            event.new,
            event.skaddr,
            event.endpoints.local(),
            event.endpoints.remote(),
        );
    }
}
