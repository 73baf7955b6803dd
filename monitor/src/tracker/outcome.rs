//! The closed vocabulary of outcomes, which label values come from: which end started
//! something ([`Side`]), how a connection ended ([`CloseReason`]) and which way a RST went
//! ([`ResetDirection`]). Being closed enums is what keeps the metrics' series bounded.

use crate::decode::{SockErr, TcpState};

/// Which end started something: the open (connect vs accept) or the teardown (first FIN).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// This host: `connect()` for an open, the first FIN for a teardown.
    Active,
    /// The peer: an accepted connection, or the peer's FIN first.
    Passive,
}

impl Side {
    /// Label value: `"active"` or `"passive"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Side::Active => "active",
            Side::Passive => "passive",
        }
    }
}

/// Why an established connection left its listener's accept queue without the application's
/// accept() taking it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AbandonReason {
    /// The client reset it while it waited. (A client's FIN alone does not take it out: it
    /// waits on in CLOSE_WAIT, and accept() still returns it.)
    Reset,
    /// Its listener closed: `inet_csk_listen_stop()` disconnects every queued child.
    ListenerClosed,
    /// Any other end: a timeout, or killed (`ss -K`).
    Other,
}

impl AbandonReason {
    /// Every reason, for pre-creating metric label sets.
    pub const ALL: [AbandonReason; 3] =
        [AbandonReason::Reset, AbandonReason::ListenerClosed, AbandonReason::Other];

    /// Label value: `"reset"`, `"listener_closed"` or `"other"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            AbandonReason::Reset => "reset",
            AbandonReason::ListenerClosed => "listener_closed",
            AbandonReason::Other => "other",
        }
    }
}

/// How a connection (or a connection attempt) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Orderly FIN exchange.
    Fin,
    /// Reset received from the peer (ECONNRESET, or EPIPE in CLOSE_WAIT).
    ResetReceived,
    /// The kernel reset the connection on its own before closing it (orphaned FIN_WAIT2 or
    /// orphan-memory timeout): seen through `tcp:tcp_send_reset`.
    ResetSent,
    /// Closed by the local application without a FIN exchange: RST sent on close (unread
    /// data, SO_LINGER 0), `connect()` abandoned, or killed (ECONNABORTED, e.g. `ss -K`).
    Abort,
    /// Retransmission, SYN or keepalive timeout (ETIMEDOUT).
    Timeout,
    /// Connect refused: RST in answer to our SYN (ECONNREFUSED).
    Refused,
    /// ICMP unreachable (EHOSTUNREACH, ENETUNREACH, …).
    Unreachable,
    /// Any other socket error, or a connect that failed locally before any SYN was sent
    /// (no local port could be assigned, no route, …).
    Error,
    /// The error could not be read and the states do not tell.
    Unknown,
}

impl CloseReason {
    /// Every reason, for pre-creating metric label sets.
    pub const ALL: [CloseReason; 9] = [
        CloseReason::Fin,
        CloseReason::ResetReceived,
        CloseReason::ResetSent,
        CloseReason::Abort,
        CloseReason::Timeout,
        CloseReason::Refused,
        CloseReason::Unreachable,
        CloseReason::Error,
        CloseReason::Unknown,
    ];

    /// Label value, e.g. `"fin"`, `"refused"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            CloseReason::Fin => "fin",
            CloseReason::ResetReceived => "reset_received",
            CloseReason::ResetSent => "reset_sent",
            CloseReason::Abort => "abort",
            CloseReason::Timeout => "timeout",
            CloseReason::Refused => "refused",
            CloseReason::Unreachable => "unreachable",
            CloseReason::Error => "error",
            CloseReason::Unknown => "unknown",
        }
    }

    /// Classifies a transition to CLOSE from `old` with the socket error the kernel had set
    /// and the resets seen on the socket before it. `local_port` is the socket's port at the
    /// transition (0: never assigned one).
    pub fn classify(old: TcpState, err: SockErr, local_port: u16, resets: Resets) -> CloseReason {
        use TcpState::*;
        let orderly = matches!(old, FinWait2 | Closing | LastAck | TimeWait);
        match err {
            // A RST the kernel sent before closing, with no error of its own: the kernel gave
            // up on the connection (tcp_keepalive_timer for an orphaned FIN_WAIT2,
            // tcp_out_of_resources). With an error, the error says why (a keepalive timeout
            // also sends RST).
            SockErr::None | SockErr::Unknown if resets.sent => CloseReason::ResetSent,
            SockErr::None | SockErr::Unknown if resets.received => CloseReason::ResetReceived,
            SockErr::Errno(libc::ECONNREFUSED) => CloseReason::Refused,
            SockErr::Errno(libc::ECONNRESET | libc::EPIPE) => CloseReason::ResetReceived,
            SockErr::Errno(libc::ETIMEDOUT) => CloseReason::Timeout,
            SockErr::Errno(libc::ECONNABORTED) => CloseReason::Abort,
            // An ICMP error can sit in sk_err of an open socket (IP_RECVERR) until the
            // application reads it; the close path of a finishing socket sets only the errors
            // above, so an orderly end with any other errno is still an orderly end.
            SockErr::Errno(_) if orderly => CloseReason::Fin,
            // EACCES, ENONET: IPv6 "administratively prohibited", "not on network".
            SockErr::Errno(
                libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::ENETDOWN
                | libc::EACCES
                | libc::ENONET,
            ) => CloseReason::Unreachable,
            SockErr::Errno(_) => CloseReason::Error,
            SockErr::None if orderly => CloseReason::Fin,
            // tcp_v4_connect/tcp_v6_connect fail *after* SYN_SENT when no local port
            // (EADDRNOTAVAIL) or route can be had: CLOSE with no error and no port ever set.
            SockErr::None if old == SynSent && local_port == 0 => CloseReason::Error,
            SockErr::None => CloseReason::Abort,
            SockErr::Unknown if orderly => CloseReason::Fin,
            SockErr::Unknown => CloseReason::Unknown,
        }
    }
}

/// Resets seen on a socket before it closed (from reset notes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resets {
    /// The kernel sent a RST for it.
    pub sent: bool,
    /// It processed a RST from the peer.
    pub received: bool,
}

/// Which way a RST went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResetDirection {
    /// This host sent it.
    Sent,
    /// This host received it.
    Received,
}

impl ResetDirection {
    /// Label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            ResetDirection::Sent => "sent",
            ResetDirection::Received => "received",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TcpState::*;

    #[test]
    fn stale_icmp_errors_do_not_relabel_an_orderly_close() {
        assert_eq!(
            CloseReason::classify(
                LastAck,
                SockErr::Errno(libc::EHOSTUNREACH),
                40000,
                Resets::default()
            ),
            CloseReason::Fin
        );
        assert_eq!(
            CloseReason::classify(
                LastAck,
                SockErr::Errno(libc::ETIMEDOUT),
                40000,
                Resets::default()
            ),
            CloseReason::Timeout
        );
        assert_eq!(
            CloseReason::classify(
                FinWait2,
                SockErr::Errno(libc::ECONNRESET),
                40000,
                Resets::default()
            ),
            CloseReason::ResetReceived
        );
        assert_eq!(
            CloseReason::classify(SynSent, SockErr::Errno(libc::EACCES), 40000, Resets::default()),
            CloseReason::Unreachable
        );
    }

    #[test]
    fn unknown_sock_err_falls_back_to_the_states() {
        assert_eq!(
            CloseReason::classify(LastAck, SockErr::Unknown, 40000, Resets::default()),
            CloseReason::Fin
        );
        assert_eq!(
            CloseReason::classify(SynSent, SockErr::Unknown, 40000, Resets::default()),
            CloseReason::Unknown
        );
        assert_eq!(
            CloseReason::classify(Established, SockErr::Errno(libc::EIO), 40000, Resets::default()),
            CloseReason::Error
        );
        assert_eq!(
            CloseReason::classify(
                Established,
                SockErr::Errno(libc::ECONNABORTED),
                40000,
                Resets::default()
            ),
            CloseReason::Abort
        );
    }
}
