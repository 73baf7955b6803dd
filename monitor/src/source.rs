//! Where events come from: the kernel's per-CPU ring buffers (drained in batches on tokio and
//! merged back into time order), or a recorded stream for tests and benchmarks. Both hand out
//! raw record bytes; decoding is the caller's business.

use std::fs::File;
use std::future::poll_fn;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::task::Poll;
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::clock::monotonic_ns;
use crate::reorder::{timestamp_of, Reorder};

/// How many records one batch drains before the caller gets control back (so metrics
/// scrapes and shutdown are served between batches under a flood).
pub const BATCH_RECORDS: usize = 4096;

/// Records stamped within this long before a drain began wait for the next drain (see
/// [`crate::reorder`]): it covers clock differences between CPUs.
const CLOCK_MARGIN_NS: u64 = 100_000;

/// In low-latency mode, how soon to drain again when records wait for their turn.
const HELD_RETRY: Duration = Duration::from_millis(1);

/// The kernel's ring buffers (one per CPU), registered with tokio's reactor.
pub struct RingSource {
    rings: Vec<Ring>,
    tick: tokio::time::Interval,
    reorder: Reorder,
    low_latency: bool,
}

/// One ring, what is left in it, and the stamp of the last record read from it.
struct Ring {
    ring: AsyncFd<RingBuf<MapData>>,
    positions: Positions,
    last_timestamp_ns: u64,
}

/// Read-only views of a ring buffer's consumer and producer positions (the first two pages
/// of the map, as libbpf and aya map them), to tell a drained ring from one whose reader
/// stopped early.
///
/// The reader stops at the first record still being written (its BUSY bit set). Records
/// committed after it stay out of sight until it is committed: a program interrupted
/// between reserve and submit by a softirq that runs the programs again (BTF tracepoints do
/// nest) leaves every record of that softirq behind its own.
struct Positions {
    consumer: *mut libc::c_void,
    producer: *mut libc::c_void,
    page: usize,
}

// SAFETY: the mappings are read-only views owned by this value; reading them from any thread
// is as safe as from the one that made them.
unsafe impl Send for Positions {}

impl Positions {
    fn map(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| io::Error::other("page size unknown"))?;
        let map_page = |index: usize| -> io::Result<*mut libc::c_void> {
            // SAFETY: a fresh read-only shared mapping of one page of the map's fd; the kernel
            // checks the offset and protection (ringbuf_map_mmap).
            let address = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    page,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    (index * page) as libc::off_t,
                )
            };
            if address == libc::MAP_FAILED {
                Err(io::Error::last_os_error())
            } else {
                Ok(address)
            }
        };
        let consumer = map_page(0)?;
        let producer = match map_page(1) {
            Ok(producer) => producer,
            Err(e) => {
                // SAFETY: `consumer` was mapped just above with this length.
                unsafe { libc::munmap(consumer, page) };
                return Err(e);
            }
        };
        Ok(Positions { consumer, producer, page })
    }

    /// Whether records (committed or not) are left past the consumer position.
    fn unread(&self) -> bool {
        use std::sync::atomic::{AtomicUsize, Ordering};
        // SAFETY: both pages stay mapped while `self` lives and start with the position, an
        // aligned word the kernel and aya update atomically.
        let (producer, consumer) = unsafe {
            (
                (*self.producer.cast::<AtomicUsize>()).load(Ordering::Acquire),
                (*self.consumer.cast::<AtomicUsize>()).load(Ordering::Acquire),
            )
        };
        producer != consumer
    }
}

impl Drop for Positions {
    fn drop(&mut self) {
        // SAFETY: both were mapped by `Positions::map` with this length and are not used after.
        unsafe {
            libc::munmap(self.consumer, self.page);
            libc::munmap(self.producer, self.page);
        }
    }
}

/// What one drain did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Records handed to the caller.
    pub handed: usize,
    /// The source had more records than one batch takes: drain again.
    pub more: bool,
}

/// Where the pipeline's raw records come from: the kernel's rings, or a recording.
pub trait Source {
    /// Hands `each` up to `max` records whose turn has come, in the order they happened.
    /// Each record's bytes are valid only during the call.
    fn drain(&mut self, max: usize, each: impl FnMut(&[u8])) -> Drained;

    /// Hands out every record still held back (at shutdown, after the last drain).
    fn flush(&mut self, each: impl FnMut(&[u8])) -> usize;
}

impl RingSource {
    /// Registers `rings`. The producer only wakes us once `wakeup_bytes` are waiting (see the
    /// eBPF program), so we also drain every `drain_interval` to bound the delay of a quiet
    /// stream; with `low_latency` (a wake-up per record) records that must wait for their
    /// turn are drained again within a millisecond. Must be called inside a tokio runtime.
    pub fn new(
        rings: Vec<RingBuf<MapData>>,
        drain_interval: Duration,
        low_latency: bool,
    ) -> io::Result<Self> {
        let rings = rings
            .into_iter()
            .map(|ring| {
                use std::os::fd::AsFd;
                let positions = Positions::map(ring.as_fd())?;
                // SAFETY: the ring buffer owns its map fd, which stays open and unchanged
                // until the RingBuf (owned by the AsyncFd from here on) is dropped.
                let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
                    .map_err(|e| e.into_parts().1)?;
                Ok(Ring { ring, positions, last_timestamp_ns: 0 })
            })
            .collect::<io::Result<Vec<_>>>()?;
        let mut tick = tokio::time::interval(drain_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(RingSource { rings, tick, reorder: Reorder::default(), low_latency })
    }

    /// Changes the longest wait between drains (config reload).
    pub fn set_drain_interval(&mut self, drain_interval: Duration) {
        self.tick = tokio::time::interval(drain_interval);
        self.tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }

    /// Waits until records may be available: the kernel woke us, or the drain timer fired.
    pub async fn ready(&mut self) -> io::Result<()> {
        let retry_held = self.low_latency && !self.reorder.is_empty();
        let rings = &mut self.rings;
        let woken = poll_fn(|cx| {
            let mut any = false;
            for ring in rings.iter_mut() {
                if let Poll::Ready(guard) = ring.ring.poll_read_ready_mut(cx) {
                    // Clear before draining: a record submitted during the drain re-arms it.
                    guard?.clear_ready();
                    any = true;
                }
            }
            if any {
                Poll::Ready(Ok::<(), io::Error>(()))
            } else {
                Poll::Pending
            }
        });
        tokio::select! {
            woken = woken => woken?,
            _ = self.tick.tick() => {}
            _ = tokio::time::sleep(HELD_RETRY), if retry_held => {}
        }
        Ok(())
    }
}

impl Source for RingSource {
    /// Reads up to `max` waiting records and hands `each` those whose turn has come, in the
    /// order they happened (records still in flight on another CPU could precede the rest:
    /// those wait for a later drain). Each record's bytes are valid only during the call.
    fn drain(&mut self, max: usize, mut each: impl FnMut(&[u8])) -> Drained {
        if let [ring] = self.rings.as_mut_slice() {
            // One ring is already in commit order.
            let ring = ring.ring.get_mut();
            let mut handed = 0;
            while handed < max {
                let Some(record) = ring.next() else { break };
                each(&record);
                handed += 1;
            }
            return Drained { handed, more: handed == max };
        }
        // Taken before any ring is read: every record stamped earlier that any of its
        // socket's later records depends on is already committed (see `reorder`).
        let now = monotonic_ns();
        let mut watermark = now.saturating_sub(CLOCK_MARGIN_NS);
        let per_ring = (max / self.rings.len()).max(1);
        let mut more = false;
        for (index, ring) in self.rings.iter_mut().enumerate() {
            let Ring { ring: fd, positions, last_timestamp_ns } = ring;
            let reader = fd.get_mut();
            let mut read = 0;
            // Records are stamped up to the moment they are read, which is after `now`:
            // the bound for impossible stamps is taken per batch of reads, after them.
            let mut read_by = monotonic_ns() + CLOCK_MARGIN_NS;
            while read < per_ring {
                let Some(record) = reader.next() else { break };
                if timestamp_of(&record) > read_by {
                    read_by = monotonic_ns() + CLOCK_MARGIN_NS;
                }
                *last_timestamp_ns = self.reorder.push(index, &record, read_by);
                read += 1;
            }
            more |= read == per_ring;
            if positions.unread() {
                // Cut short, or stopped at a record still being written with committed ones
                // possibly behind it: what is left was stamped after the last record read
                // (a record committed behind a busy one was written by a program nested
                // inside that one's, after it reserved). Nothing later may go out yet.
                watermark = watermark.min(*last_timestamp_ns);
            }
        }
        Drained { handed: self.reorder.release(watermark, each), more }
    }

    /// Hands out every record still waiting for its turn (at shutdown, after the rings are
    /// drained).
    fn flush(&mut self, each: impl FnMut(&[u8])) -> usize {
        self.reorder.release_all(each)
    }
}

/// First bytes of a recording file; the format is this magic, then per record a
/// little-endian `u32` length and the record's bytes, exactly as the ring delivered them.
pub const RECORDING_MAGIC: &[u8; 8] = b"TCPMONR1";

/// Writes raw records to a recording file (`tcpmon run --record FILE`).
pub struct Recorder {
    out: BufWriter<File>,
}

impl Recorder {
    /// Creates (or truncates) `path` and writes the header.
    pub fn create(path: &Path) -> io::Result<Self> {
        let mut out = BufWriter::new(File::create(path)?);
        out.write_all(RECORDING_MAGIC)?;
        Ok(Recorder { out })
    }

    /// Appends one record.
    pub fn write(&mut self, record: &[u8]) -> io::Result<()> {
        let length = u32::try_from(record.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        self.out.write_all(&length.to_le_bytes())?;
        self.out.write_all(record)
    }

    /// Flushes buffered records to the file.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Reads every record of a recording file. A truncated last record is an error that says
/// how many complete records came before it.
pub fn read_recording(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let mut input = BufReader::new(File::open(path)?);
    let mut magic = [0u8; 8];
    input.read_exact(&mut magic)?;
    if &magic != RECORDING_MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a tcpmon recording"));
    }
    let mut records = Vec::new();
    loop {
        let mut length = [0u8; 4];
        match input.read_exact(&mut length) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(records),
            Err(e) => return Err(e),
        }
        let length = u32::from_le_bytes(length) as usize;
        if length > 1 << 20 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "record longer than 1 MiB"));
        }
        let mut record = vec![0u8; length];
        input.read_exact(&mut record).map_err(|e| {
            io::Error::new(e.kind(), format!("record {} is truncated", records.len() + 1))
        })?;
        records.push(record);
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

    /// Starts over from the first record.
    pub fn rewind(&mut self) {
        self.position = 0;
    }
}

impl Source for ReplaySource {
    /// Hands up to `max` records to `each`, in recorded order.
    fn drain(&mut self, max: usize, mut each: impl FnMut(&[u8])) -> Drained {
        let end = self.position.saturating_add(max).min(self.records.len());
        for record in &self.records[self.position..end] {
            each(record);
        }
        let handed = end - self.position;
        self.position = end;
        Drained { handed, more: end < self.records.len() }
    }

    /// Nothing is held back: records are handed out in recorded order.
    fn flush(&mut self, _each: impl FnMut(&[u8])) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recordings_round_trip_and_reject_damage() {
        let dir = std::env::temp_dir().join(format!("tcpmon-rec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stream.rec");
        let mut recorder = Recorder::create(&path).unwrap();
        recorder.write(&[1, 2, 3]).unwrap();
        recorder.write(&[]).unwrap();
        recorder.flush().unwrap();
        assert_eq!(read_recording(&path).unwrap(), vec![vec![1, 2, 3], vec![]]);

        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let err = read_recording(&path).unwrap_err();
        assert!(err.to_string().contains("record 1 is truncated"), "{err}");
        std::fs::write(&path, b"NOTMAGIC").unwrap();
        assert_eq!(read_recording(&path).unwrap_err().kind(), io::ErrorKind::InvalidData);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn replay_yields_every_record_once_in_batches() {
        let mut source = ReplaySource::new((0..10u8).map(|i| vec![i]).collect());
        let mut seen = Vec::new();
        assert_eq!(source.drain(4, |r| seen.push(r[0])), Drained { handed: 4, more: true });
        assert_eq!(source.drain(100, |r| seen.push(r[0])), Drained { handed: 6, more: false });
        assert_eq!(source.drain(100, |r| seen.push(r[0])), Drained { handed: 0, more: false });
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        source.rewind();
        assert_eq!(source.drain(1, |r| seen.push(r[0])).handed, 1);
        assert_eq!(seen.last(), Some(&0));
    }
}
