//! Puts records drained from several per-CPU ring buffers back into the order they happened.
//!
//! Each ring is in commit order, but a socket's transitions run on whichever CPU handles it
//! (connect() on the caller's CPU, the SYN-ACK in softirq elsewhere), so draining ring after
//! ring can deliver a socket's ESTABLISHED before its SYN_SENT. The tracker needs each
//! socket's transitions in order.
//!
//! The rule that makes ordering by timestamp exact: a socket's state changes under its lock,
//! and the program commits a record before the lock is released, so a socket's earlier
//! record is committed before its next record's timestamp is even taken. Take a watermark W
//! from the clock *before* reading any ring, and release only records stamped before W:
//! every earlier record of the same socket was committed before that stamp, hence before the
//! rings were read, hence is in hand and sorts first. Records stamped at or after W wait for
//! the next drain. (A small margin covers clock differences between CPUs.)
//!
//! Held records are copied into one reused buffer, so after warm-up nothing is allocated.

/// Records not yet handed out, in one reused byte buffer.
#[derive(Debug, Default)]
pub struct Reorder {
    bytes: Vec<u8>,
    held: Vec<Held>,
    next_sequence: u64,
}

/// Where one held record is in `bytes`, and what it sorts by.
#[derive(Clone, Copy, Debug)]
struct Held {
    timestamp_ns: u64,
    /// Arrival order: keeps ring order among equal timestamps (and is what an unstable sort,
    /// which allocates nothing, needs to be stable).
    sequence: u64,
    start: usize,
    len: usize,
}

/// The record's kernel timestamp: every record type starts with `timestamp_ns` (a record
/// too short to have one sorts first, and fails to decode).
pub fn timestamp_of(record: &[u8]) -> u64 {
    record.get(..8).map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

impl Reorder {
    /// Copies `record` in until [`Reorder::release`] hands it out.
    pub fn push(&mut self, record: &[u8]) {
        self.held.push(Held {
            timestamp_ns: timestamp_of(record),
            sequence: self.next_sequence,
            start: self.bytes.len(),
            len: record.len(),
        });
        self.next_sequence += 1;
        self.bytes.extend_from_slice(record);
    }

    /// Hands `each` every held record stamped before `watermark_ns`, oldest first; keeps the
    /// others. Returns how many it handed out.
    pub fn release(&mut self, watermark_ns: u64, each: impl FnMut(&[u8])) -> usize {
        self.release_where(|timestamp_ns| timestamp_ns < watermark_ns, each)
    }

    /// Hands out everything held, oldest first (at shutdown).
    pub fn release_all(&mut self, each: impl FnMut(&[u8])) -> usize {
        self.release_where(|_| true, each)
    }

    fn release_where(&mut self, due: impl Fn(u64) -> bool, mut each: impl FnMut(&[u8])) -> usize {
        self.held.sort_unstable_by_key(|h| (h.timestamp_ns, h.sequence));
        let released = self.held.partition_point(|h| due(h.timestamp_ns));
        for h in &self.held[..released] {
            each(&self.bytes[h.start..h.start + h.len]);
        }
        self.held.drain(..released);
        self.compact();
        released
    }

    /// How many records are held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Moves the kept records to the front of the buffer, in their (sorted) order.
    fn compact(&mut self) {
        if self.held.is_empty() {
            self.bytes.clear();
            return;
        }
        // Kept records go after the current bytes, then the front is dropped: one copy each,
        // no allocation once the buffer has grown to its working size.
        let old_len = self.bytes.len();
        for h in &mut self.held {
            let start = self.bytes.len();
            self.bytes.extend_from_within(h.start..h.start + h.len);
            h.start = start - old_len;
        }
        self.bytes.drain(..old_len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record stamped `timestamp_ns` whose other bytes say `tag`.
    fn record(timestamp_ns: u64, tag: u8, len: usize) -> Vec<u8> {
        let mut bytes = timestamp_ns.to_le_bytes().to_vec();
        bytes.resize(len, tag);
        bytes
    }

    fn released(reorder: &mut Reorder, watermark_ns: u64) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        reorder.release(watermark_ns, |r| out.push(r.to_vec()));
        out
    }

    #[test]
    fn records_come_out_in_timestamp_order_whatever_ring_they_came_from() {
        let mut reorder = Reorder::default();
        // Ring 0 drained first holds the later transition of a socket whose earlier one ran
        // on CPU 1.
        reorder.push(&record(30, b'b', 96));
        reorder.push(&record(40, b'c', 152));
        reorder.push(&record(10, b'a', 96));
        reorder.push(&record(35, b'n', 32));
        let out = released(&mut reorder, 100);
        assert_eq!(
            out,
            vec![
                record(10, b'a', 96),
                record(30, b'b', 96),
                record(35, b'n', 32),
                record(40, b'c', 152)
            ]
        );
        assert!(reorder.is_empty());
    }

    #[test]
    fn records_at_or_after_the_watermark_wait_for_the_next_drain() {
        let mut reorder = Reorder::default();
        reorder.push(&record(50, b'x', 96));
        reorder.push(&record(20, b'y', 96));
        reorder.push(&record(60, b'z', 56));
        assert_eq!(released(&mut reorder, 50), vec![record(20, b'y', 96)]);
        assert_eq!(reorder.len(), 2);
        // The next drain brings an earlier record of another ring: it still goes first.
        reorder.push(&record(45, b'w', 96));
        assert_eq!(
            released(&mut reorder, 1000),
            vec![record(45, b'w', 96), record(50, b'x', 96), record(60, b'z', 56)]
        );
    }

    #[test]
    fn equal_timestamps_keep_arrival_order() {
        let mut reorder = Reorder::default();
        for tag in [b'p', b'q', b'r', b's'] {
            reorder.push(&record(7, tag, 32));
        }
        let tags: Vec<u8> = released(&mut reorder, 8).iter().map(|r| r[8]).collect();
        assert_eq!(tags, b"pqrs");
    }

    #[test]
    fn short_records_sort_first_and_are_handed_out_unchanged() {
        let mut reorder = Reorder::default();
        reorder.push(&record(5, b'a', 96));
        reorder.push(&[1, 2, 3]);
        assert_eq!(released(&mut reorder, 6), vec![vec![1, 2, 3], record(5, b'a', 96)]);
    }

    #[test]
    fn release_all_hands_out_even_the_newest() {
        let mut reorder = Reorder::default();
        reorder.push(&record(u64::MAX, b'm', 96));
        reorder.push(&record(3, b'k', 96));
        let mut out = Vec::new();
        assert_eq!(reorder.release_all(|r| out.push(r.to_vec())), 2);
        assert_eq!(out, vec![record(3, b'k', 96), record(u64::MAX, b'm', 96)]);
    }

    #[test]
    fn the_buffer_is_reused_once_warm() {
        let mut reorder = Reorder::default();
        for round in 0..50u64 {
            for i in 0..100u64 {
                reorder.push(&record(round * 1000 + (i * 7919) % 100, b'r', 96));
            }
            released(&mut reorder, round * 1000 + 50);
        }
        let capacity = (reorder.bytes.capacity(), reorder.held.capacity());
        for round in 50..100u64 {
            for i in 0..100u64 {
                reorder.push(&record(round * 1000 + (i * 7919) % 100, b'r', 96));
            }
            released(&mut reorder, round * 1000 + 50);
        }
        assert_eq!((reorder.bytes.capacity(), reorder.held.capacity()), capacity);
    }
}
