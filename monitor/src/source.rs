//! Where events come from: the kernel's ring buffer (drained in batches on tokio), or a
//! recorded stream for tests and benchmarks. Both hand out raw record bytes; decoding is
//! the caller's business.

use std::io;
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// How many records one batch drains before the caller gets control back (so metrics
/// scrapes and shutdown are served between batches under a flood).
pub const BATCH_RECORDS: usize = 4096;

/// The kernel ring buffer, registered with tokio's reactor.
pub struct RingSource {
    ring: AsyncFd<RingBuf<MapData>>,
    tick: tokio::time::Interval,
}

impl RingSource {
    /// Registers `ring`. The producer only wakes us once `wakeup_bytes` are waiting (see the
    /// eBPF program), so we also drain every `drain_interval` to bound the delay of a quiet
    /// stream. Must be called inside a tokio runtime.
    pub fn new(ring: RingBuf<MapData>, drain_interval: Duration) -> io::Result<Self> {
        // SAFETY: the ring buffer owns its map fd, which stays open and unchanged until the
        // RingBuf (owned by the AsyncFd from here on) is dropped.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        let mut tick = tokio::time::interval(drain_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(RingSource { ring, tick })
    }

    /// Waits until records may be available: the kernel woke us, or the drain timer fired.
    pub async fn ready(&mut self) -> io::Result<()> {
        tokio::select! {
            guard = self.ring.readable_mut() => {
                // Clear before draining: a record submitted during the drain re-arms it.
                guard?.clear_ready();
            }
            _ = self.tick.tick() => {}
        }
        Ok(())
    }

    /// Hands up to `max` waiting records to `each`; returns how many it handed out. Each
    /// record's bytes are valid only during the call (the slot is released after it).
    pub fn drain(&mut self, max: usize, mut each: impl FnMut(&[u8])) -> usize {
        let ring = self.ring.get_mut();
        let mut count = 0;
        while count < max {
            let Some(record) = ring.next() else { break };
            each(&record);
            count += 1;
        }
        count
    }
}

/// A recorded stream of raw records, replayed in order (tests, benchmarks).
#[derive(Clone, Debug, Default)]
pub struct ReplaySource {
    records: Vec<Vec<u8>>,
    position: usize,
}

impl ReplaySource {
    /// A source that yields `records` once, in order.
    pub fn new(records: Vec<Vec<u8>>) -> Self {
        ReplaySource { records, position: 0 }
    }

    /// Same contract as [`RingSource::drain`].
    pub fn drain(&mut self, max: usize, mut each: impl FnMut(&[u8])) -> usize {
        let end = (self.position + max).min(self.records.len());
        for record in &self.records[self.position..end] {
            each(record);
        }
        let count = end - self.position;
        self.position = end;
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_yields_every_record_once_in_batches() {
        let mut source = ReplaySource::new((0..10u8).map(|i| vec![i]).collect());
        let mut seen = Vec::new();
        assert_eq!(source.drain(4, |r| seen.push(r[0])), 4);
        assert_eq!(source.drain(100, |r| seen.push(r[0])), 6);
        assert_eq!(source.drain(100, |r| seen.push(r[0])), 0);
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }
}
