//! The kernel programs' own log lines (aya-log): rare anomalies such as a ring found full,
//! each naming its CPU, ring and socket, forwarded to the daemon's log.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::panic::AssertUnwindSafe;

use aya::Ebpf;
use aya_log::EbpfLogger;
use log::{error, warn};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The reader of the programs' log ring.
pub struct KernelLog(EbpfLogger<&'static dyn log::Log>);

impl AsRawFd for KernelLog {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl KernelLog {
    /// Takes the log ring out of `ebpf`; `None` (and a warning) when it cannot be read.
    pub fn take(ebpf: &mut Ebpf) -> Option<KernelLog> {
        match EbpfLogger::init(ebpf) {
            Ok(logger) => Some(KernelLog(logger)),
            Err(e) => {
                warn!("the kernel programs' log is not forwarded: {e}");
                None
            }
        }
    }

    /// Forwards every line as it comes, until the ring cannot be watched any more.
    pub async fn forward(self) {
        // SAFETY: the logger owns its ring's fd, which stays open and unchanged until the
        // AsyncFd (which owns the logger from here on) is dropped.
        let ring = unsafe { AsyncFd::register_with_interest(self, Interest::READABLE) };
        let mut ring = match ring {
            Ok(ring) => ring,
            Err(e) => {
                return warn!("the kernel programs' log is not forwarded: {}", e.into_parts().1)
            }
        };
        loop {
            let Ok(mut ready) = ring.readable_mut().await else { return };
            // aya-log panics on a record it cannot parse; the programs are ours, but a bad
            // line must not take the daemon's runtime thread with it.
            let logger = &mut ready.get_inner_mut().0;
            if std::panic::catch_unwind(AssertUnwindSafe(|| logger.flush())).is_err() {
                return error!(
                    "a kernel log record could not be read; the kernel's log is no longer forwarded"
                );
            }
            ready.clear_ready();
        }
    }
}
