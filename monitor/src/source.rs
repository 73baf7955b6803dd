//! Where events come from: the kernel's per-CPU ring buffers (drained in batches on tokio and
//! merged back into time order), or a recorded stream for tests and benchmarks. Both hand out
//! raw record bytes; decoding is the caller's business.
//!
//! The rings are read in place: a record is handed out as a slice of the ring's own memory,
//! and the ring's consumer position (which frees the space for the kernel) moves once per
//! drain, past what was handed out. Copying records out, and moving the consumer position for
//! every record (as aya's `RingBuf::next` does), cost the daemon a copy and a cache line
//! bounced to the producing CPU per record.

use std::fs::File;
use std::future::poll_fn;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use aya::maps::MapData;
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

/// A ring record's header (`struct bpf_ringbuf_hdr`): a `u32` length with these flags, then
/// a `u32` the kernel keeps for itself (include/uapi/linux/bpf.h).
pub const HEADER_BYTES: usize = 8;
/// Set while the producer is still writing the record.
const BUSY: u32 = 1 << 31;
/// Set when the producer gave the record up.
const DISCARD: u32 = 1 << 30;

/// A ring buffer's shared memory, mapped as libbpf and aya map it: the consumer position's
/// page read-write, then the producer position's page and the data pages read-only, the
/// data pages twice in a row so that a record wrapping around the end is contiguous
/// (`ringbuf_map_mmap_user`, kernel/bpf/ringbuf.c).
struct RingMemory {
    consumer: *mut libc::c_void,
    producer: *mut libc::c_void,
    page: usize,
    /// Bytes of data: a power of two.
    size: usize,
}

// SAFETY: the mappings are owned by this value; the positions in them are atomics, and the
// data is only read (see `RingMemory::record`).
unsafe impl Send for RingMemory {}

/// One record of a ring, at a position.
enum Entry<'a> {
    /// Still being written: nothing after it can be read yet.
    Busy,
    /// Given up by its producer: skip it.
    Discarded { next: usize },
    /// Committed.
    Record { bytes: &'a [u8], next: usize },
}

impl RingMemory {
    fn map(fd: BorrowedFd<'_>, size: u32) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| io::Error::other("page size unknown"))?;
        let size = size as usize;
        if !size.is_power_of_two() {
            return Err(io::Error::other(format!("ring size {size} is not a power of two")));
        }
        let map =
            |length: usize, protection: i32, offset: usize| -> io::Result<*mut libc::c_void> {
                // SAFETY: a fresh shared mapping of the map's fd; the kernel checks the offset,
                // length and protection (ringbuf_map_mmap_user).
                let address = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        length,
                        protection,
                        libc::MAP_SHARED,
                        fd.as_raw_fd(),
                        offset as libc::off_t,
                    )
                };
                if address == libc::MAP_FAILED {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(address)
                }
            };
        let consumer = map(page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        match map(page + 2 * size, libc::PROT_READ, page) {
            Ok(producer) => Ok(RingMemory { consumer, producer, page, size }),
            Err(e) => {
                // SAFETY: mapped just above with this length.
                unsafe { libc::munmap(consumer, page) };
                Err(e)
            }
        }
    }

    /// The position word at the start of the page `at` (the consumer's or the producer's).
    fn position(&self, at: *mut libc::c_void) -> &AtomicUsize {
        // SAFETY: both position pages stay mapped while `self` lives and start with the
        // position, an aligned word the kernel updates atomically.
        unsafe { &*at.cast::<AtomicUsize>() }
    }

    /// How far the producers have reserved (committed or not).
    fn producer_position(&self) -> usize {
        // The kernel stores it with release semantics (bpf_ringbuf_reserve).
        self.position(self.producer).load(Ordering::Acquire)
    }

    fn consumer_position(&self) -> usize {
        self.position(self.consumer).load(Ordering::Acquire)
    }

    /// Frees everything before `position` for the producers.
    fn set_consumer_position(&self, position: usize) {
        // Released after the records were read; the kernel reads it with acquire before
        // reusing their space (__bpf_ringbuf_reserve).
        self.position(self.consumer).store(position, Ordering::Release);
    }

    /// The record at `position` (which a previous record's `next`, or the consumer
    /// position, gave; the producer position is past it).
    fn record(&self, position: usize) -> Entry<'_> {
        let offset = position & (self.size - 1);
        // SAFETY: the data pages start one page into the producer mapping, so the header at
        // `offset` (< size) lies within it.
        let base = unsafe { self.producer.cast::<u8>().add(self.page) };
        // The kernel commits a record by clearing BUSY with a fully ordered xchg
        // (bpf_ringbuf_commit): acquire makes the record's bytes visible once it is clear.
        let header = unsafe { &*base.add(offset).cast::<AtomicU32>() }.load(Ordering::Acquire);
        if header & BUSY != 0 {
            return Entry::Busy;
        }
        let len = ((header & !(BUSY | DISCARD)) as usize).min(self.size);
        let next = record_end(position, len);
        if header & DISCARD != 0 {
            return Entry::Discarded { next };
        }
        Entry::Record { bytes: self.committed(position, len), next }
    }

    /// The `len` bytes of the committed record at `position` (as [`Self::record`] found
    /// them; still unconsumed, so unchanged).
    fn committed(&self, position: usize, len: usize) -> &[u8] {
        let offset = position & (self.size - 1);
        // SAFETY: the data pages start one page into the producer mapping and are mapped
        // twice, so `offset + HEADER_BYTES + len` (len ≤ size) lies within the mapping; the
        // bytes are not written again until the consumer position passes them.
        unsafe {
            let base = self.producer.cast::<u8>().add(self.page);
            std::slice::from_raw_parts(base.add(offset + HEADER_BYTES), len)
        }
    }
}

/// Where the record of `len` bytes at `position` ends (records are 8-aligned).
fn record_end(position: usize, len: usize) -> usize {
    position + (HEADER_BYTES + len).next_multiple_of(8)
}

impl Drop for RingMemory {
    fn drop(&mut self) {
        // SAFETY: both were mapped by `RingMemory::map` with these lengths and are not used
        // after.
        unsafe {
            libc::munmap(self.consumer, self.page);
            libc::munmap(self.producer, self.page + 2 * self.size);
        }
    }
}

/// The kernel's ring buffers (one per CPU), registered with tokio's reactor.
pub struct RingSource {
    rings: Vec<Ring>,
    tick: tokio::time::Interval,
    /// Records read and not yet handed out: (ring position, length).
    reorder: Reorder<(usize, usize)>,
    low_latency: bool,
}

/// A ring buffer map's fd, for tokio to watch: readable when the kernel wakes us.
struct RingFd(MapData);

impl std::os::fd::AsRawFd for RingFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.fd().as_fd().as_raw_fd()
    }
}

/// One ring: its readiness, its memory, and how far it has been read and handed out.
struct Ring {
    ring: AsyncFd<RingFd>,
    memory: RingMemory,
    /// Where the next record to read starts.
    read: usize,
    /// Where the first record not yet handed out starts (the consumer position to publish).
    handed: usize,
    /// The stamp of the last record read.
    last_timestamp_ns: u64,
}

impl Ring {
    /// Reads committed records, at most `max`, into `reorder` as ring `index`; stops at the
    /// first record still being written. Returns how many it read.
    fn read(&mut self, index: usize, max: usize, reorder: &mut Reorder<(usize, usize)>) -> usize {
        let mut read = 0;
        let mut produced = self.memory.producer_position();
        // Records are stamped up to the moment they are read, which is after the drain's
        // watermark: the bound for impossible stamps is taken per batch, after the reads.
        let mut read_by = monotonic_ns() + CLOCK_MARGIN_NS;
        while read < max {
            if self.read == produced {
                produced = self.memory.producer_position();
                if self.read == produced {
                    break;
                }
            }
            match self.memory.record(self.read) {
                Entry::Busy => break,
                Entry::Discarded { next } => {
                    // Nothing to hand out: skipped as soon as everything before it was.
                    if self.handed == self.read {
                        self.handed = next;
                    }
                    self.read = next;
                }
                Entry::Record { bytes, next } => {
                    // A stamp from the future (damage) counts as now, so it cannot hold the
                    // ring's queue back forever.
                    let mut timestamp_ns = timestamp_of(bytes);
                    if timestamp_ns > read_by {
                        read_by = monotonic_ns() + CLOCK_MARGIN_NS;
                        timestamp_ns = timestamp_ns.min(read_by);
                    }
                    reorder.push(index, timestamp_ns, (self.read, bytes.len()));
                    self.last_timestamp_ns = timestamp_ns;
                    self.read = next;
                    read += 1;
                }
            }
        }
        read
    }

    /// Whether records (committed or not) are left past what was read.
    fn unread(&self) -> bool {
        self.memory.producer_position() != self.read
    }

    /// Frees what was handed out for the producers.
    fn publish_handed(&self) {
        if self.memory.consumer_position() != self.handed {
            self.memory.set_consumer_position(self.handed);
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
    /// Registers `rings`, each of `ring_bytes`. The producer only wakes us once
    /// `wakeup_bytes` are waiting (see the eBPF program), so we also drain every
    /// `drain_interval` to bound the delay of a quiet stream; with `low_latency` (a wake-up
    /// per record) records that must wait for their turn are drained again within a
    /// millisecond. Must be called inside a tokio runtime.
    pub fn new(
        rings: Vec<MapData>,
        ring_bytes: u32,
        drain_interval: Duration,
        low_latency: bool,
    ) -> io::Result<Self> {
        let rings = rings
            .into_iter()
            .map(|ring| {
                let memory = RingMemory::map(ring.fd().as_fd(), ring_bytes)?;
                let read = memory.consumer_position();
                // SAFETY: the map data owns its fd, which stays open and unchanged until it
                // (owned by the AsyncFd from here on) is dropped.
                let ring =
                    unsafe { AsyncFd::register_with_interest(RingFd(ring), Interest::READABLE) }
                        .map_err(|e| e.into_parts().1)?;
                Ok(Ring { ring, memory, read, handed: read, last_timestamp_ns: 0 })
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

    /// Hands `each` the records `reorder` releases, from the rings' memory, then frees them.
    fn hand_out(
        rings: &mut [Ring],
        reorder: &mut Reorder<(usize, usize)>,
        watermark_ns: Option<u64>,
        mut each: impl FnMut(&[u8]),
    ) -> usize {
        let mut give = |index: usize, (position, len): (usize, usize)| {
            let ring = &mut rings[index];
            each(ring.memory.committed(position, len));
            ring.handed = record_end(position, len);
        };
        let handed = match watermark_ns {
            Some(watermark_ns) => reorder.release(watermark_ns, &mut give),
            None => reorder.release_all(&mut give),
        };
        for ring in rings.iter() {
            ring.publish_handed();
        }
        handed
    }
}

impl Source for RingSource {
    /// Reads up to `max` waiting records and hands `each` those whose turn has come, in the
    /// order they happened (records still in flight on another CPU could precede the rest:
    /// those wait for a later drain). Each record's bytes are valid only during the call.
    fn drain(&mut self, max: usize, each: impl FnMut(&[u8])) -> Drained {
        let RingSource { rings, reorder, .. } = self;
        // Taken before any ring is read: every record stamped earlier that any of its
        // socket's later records depends on is already committed (see `reorder`).
        let mut watermark = monotonic_ns().saturating_sub(CLOCK_MARGIN_NS);
        if rings.len() == 1 {
            // One ring is already in commit order: nothing needs to wait.
            watermark = u64::MAX;
        }
        let per_ring = (max / rings.len().max(1)).max(1);
        let mut more = false;
        for (index, ring) in rings.iter_mut().enumerate() {
            let read = ring.read(index, per_ring, reorder);
            more |= read == per_ring;
            if ring.unread() && watermark != u64::MAX {
                // Cut short, or stopped at a record still being written with committed ones
                // possibly behind it: what is left was stamped after the last record read
                // (a record committed behind a busy one was written by a program nested
                // inside that one's, after it reserved). Nothing later may go out yet.
                watermark = watermark.min(ring.last_timestamp_ns);
            }
        }
        let handed = Self::hand_out(rings, reorder, Some(watermark), each);
        Drained { handed, more }
    }

    /// Hands out every record still waiting for its turn (at shutdown, after the rings are
    /// drained).
    fn flush(&mut self, each: impl FnMut(&[u8])) -> usize {
        let RingSource { rings, reorder, .. } = self;
        Self::hand_out(rings, reorder, None, each)
    }
}

/// First bytes of a recording file; the format is this magic, then per record a
/// little-endian `u32` length and the record's bytes, exactly as the ring delivered them.
/// The digit is the record layout's version: 2 added `StateEvent::cgroup_id`.
pub const RECORDING_MAGIC: &[u8; 8] = b"TCPMONR2";

/// Writes raw records to a recording file (`tcpmon run --record FILE`).
pub struct Recorder {
    out: BufWriter<File>,
}

impl Recorder {
    /// Creates `path`, a new file readable by its owner only, and writes the header. Never
    /// overwrites: an existing file (or a link, even to nothing) is an error, so `--record`
    /// pointed at a shared directory cannot be turned against another file.
    pub fn create(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true) // O_CREAT | O_EXCL: fails on anything there, links included
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        let mut out = BufWriter::new(file);
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
    if magic[..7] == RECORDING_MAGIC[..7] && magic != *RECORDING_MAGIC {
        let message = format!(
            "a tcpmon recording of record layout {}, this tcpmon reads layout {}",
            char::from(magic[7]),
            char::from(RECORDING_MAGIC[7])
        );
        return Err(io::Error::new(io::ErrorKind::InvalidData, message));
    }
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
    fn a_recording_is_a_new_owner_only_file_and_never_replaces_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tcpmon-record-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.rec");
        drop(Recorder::create(&path).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = Recorder::create(&path).err().expect("an existing file is refused");
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
        // A link planted at the path, even to a file not there yet, is not followed.
        let target = dir.join("victim");
        let link = dir.join("link.rec");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(Recorder::create(&link).is_err());
        assert!(!target.exists(), "the link's target was created");
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
