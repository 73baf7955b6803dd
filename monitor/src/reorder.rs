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
//! Each ring's records are kept in a queue of their own, in ring order, and the queues are
//! merged by timestamp: no sort, and each held record is copied once (plus once more if it
//! has to wait for the next drain). After warm-up nothing is allocated.

/// Records not yet handed out: one queue per ring.
#[derive(Debug, Default)]
pub struct Reorder {
    queues: Vec<Queue>,
}

/// One ring's records not yet handed out, in ring order, in a reused byte buffer.
#[derive(Debug, Default)]
struct Queue {
    bytes: Vec<u8>,
    held: Vec<Held>,
    /// Index in `held` of the next record to hand out.
    head: usize,
}

/// Where one held record is in its queue's `bytes`, and what it sorts by.
#[derive(Clone, Copy, Debug)]
struct Held {
    timestamp_ns: u64,
    start: usize,
    len: usize,
}

/// The record's kernel timestamp: every record type starts with `timestamp_ns` (a record
/// too short to have one sorts first, and fails to decode).
pub fn timestamp_of(record: &[u8]) -> u64 {
    record.get(..8).map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

impl Queue {
    fn next_timestamp(&self) -> Option<u64> {
        self.held.get(self.head).map(|h| h.timestamp_ns)
    }

    /// Drops what was handed out; the rest moves to the front (it is contiguous: the end).
    fn compact(&mut self) {
        let Some(first) = self.held.get(self.head).map(|h| h.start) else {
            self.bytes.clear();
            self.held.clear();
            self.head = 0;
            return;
        };
        self.bytes.drain(..first);
        self.held.drain(..self.head);
        for h in &mut self.held {
            h.start -= first;
        }
        self.head = 0;
    }
}

impl Reorder {
    /// Copies `record`, read from ring `ring`, in until it is handed out. Records of one
    /// ring must be pushed in ring order. `read_by_ns` is a time taken after the record was
    /// read: a later stamp cannot come from the kernel's clock and counts as `read_by_ns`,
    /// so a damaged record cannot hold its ring's queue back forever. Returns the stamp the
    /// record sorts by.
    pub fn push(&mut self, ring: usize, record: &[u8], read_by_ns: u64) -> u64 {
        if ring >= self.queues.len() {
            self.queues.resize_with(ring + 1, Queue::default);
        }
        let queue = &mut self.queues[ring];
        let timestamp_ns = timestamp_of(record).min(read_by_ns);
        queue.held.push(Held { timestamp_ns, start: queue.bytes.len(), len: record.len() });
        queue.bytes.extend_from_slice(record);
        timestamp_ns
    }

    /// Hands `each` the held records stamped before `watermark_ns`, oldest first across
    /// rings (ring order within one); keeps the others. Returns how many it handed out.
    pub fn release(&mut self, watermark_ns: u64, each: impl FnMut(&[u8])) -> usize {
        self.release_where(|timestamp_ns| timestamp_ns < watermark_ns, each)
    }

    /// Hands out everything held, oldest first (at shutdown).
    pub fn release_all(&mut self, each: impl FnMut(&[u8])) -> usize {
        self.release_where(|_| true, each)
    }

    fn release_where(&mut self, due: impl Fn(u64) -> bool, mut each: impl FnMut(&[u8])) -> usize {
        let mut released = 0;
        loop {
            // The queue whose next record is oldest (the first such queue on a tie).
            let mut oldest: Option<(u64, usize)> = None;
            for (ring, queue) in self.queues.iter().enumerate() {
                if let Some(timestamp_ns) = queue.next_timestamp() {
                    if oldest.is_none_or(|(best, _)| timestamp_ns < best) {
                        oldest = Some((timestamp_ns, ring));
                    }
                }
            }
            let Some((timestamp_ns, ring)) = oldest else { break };
            if !due(timestamp_ns) {
                break;
            }
            let queue = &mut self.queues[ring];
            let h = queue.held[queue.head];
            each(&queue.bytes[h.start..h.start + h.len]);
            queue.head += 1;
            released += 1;
        }
        for queue in &mut self.queues {
            queue.compact();
        }
        released
    }

    /// How many records are held.
    pub fn len(&self) -> usize {
        self.queues.iter().map(|q| q.held.len() - q.head).sum()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        // Ring 0, drained first, holds the later transitions of a socket whose first one ran
        // on CPU 1.
        reorder.push(0, &record(30, b'b', 96), u64::MAX);
        reorder.push(0, &record(40, b'c', 152), u64::MAX);
        reorder.push(1, &record(10, b'a', 96), u64::MAX);
        reorder.push(1, &record(35, b'n', 32), u64::MAX);
        let out = released(&mut reorder, 100);
        let expected = [(10, b'a', 96), (30, b'b', 96), (35, b'n', 32), (40, b'c', 152)];
        assert_eq!(out, expected.map(|(t, tag, len)| record(t, tag, len)).to_vec());
        assert!(reorder.is_empty());
    }

    #[test]
    fn records_at_or_after_the_watermark_wait_for_the_next_drain() {
        let mut reorder = Reorder::default();
        reorder.push(0, &record(20, b'y', 96), u64::MAX);
        reorder.push(0, &record(50, b'x', 96), u64::MAX);
        reorder.push(1, &record(60, b'z', 56), u64::MAX);
        assert_eq!(released(&mut reorder, 50), vec![record(20, b'y', 96)]);
        assert_eq!(reorder.len(), 2);
        // Anything stamped before the watermark was in hand (see the module docs); what the
        // next drain brings interleaves with what waited.
        reorder.push(0, &record(55, b'w', 96), u64::MAX);
        reorder.push(1, &record(70, b'v', 96), u64::MAX);
        assert_eq!(
            released(&mut reorder, 1000),
            vec![
                record(50, b'x', 96),
                record(55, b'w', 96),
                record(60, b'z', 56),
                record(70, b'v', 96)
            ]
        );
    }

    #[test]
    fn one_ring_keeps_its_order_and_ties_go_to_the_lower_ring() {
        let mut reorder = Reorder::default();
        for tag in [b'p', b'q'] {
            reorder.push(1, &record(7, tag, 32), u64::MAX);
        }
        reorder.push(0, &record(7, b'o', 32), u64::MAX);
        let tags: Vec<u8> = released(&mut reorder, 8).iter().map(|r| r[8]).collect();
        assert_eq!(tags, b"opq");
    }

    #[test]
    fn short_records_sort_first_and_are_handed_out_unchanged() {
        let mut reorder = Reorder::default();
        reorder.push(0, &record(5, b'a', 96), u64::MAX);
        reorder.push(1, &[1, 2, 3], u64::MAX);
        assert_eq!(released(&mut reorder, 6), vec![vec![1, 2, 3], record(5, b'a', 96)]);
    }

    #[test]
    fn a_stamp_from_the_future_does_not_hold_its_ring_back() {
        let mut reorder = Reorder::default();
        reorder.push(0, &record(u64::MAX - 1, b'f', 96), 1_000);
        reorder.push(0, &record(900, b'g', 96), 1_000);
        // Stamped "now": released by the next drain's watermark, and what follows with it.
        assert_eq!(released(&mut reorder, 1_000).len(), 0);
        assert_eq!(released(&mut reorder, 2_000).len(), 2);
    }

    #[test]
    fn release_all_hands_out_even_the_newest() {
        let mut reorder = Reorder::default();
        reorder.push(0, &record(u64::MAX, b'm', 96), u64::MAX);
        reorder.push(1, &record(3, b'k', 96), u64::MAX);
        let mut out = Vec::new();
        assert_eq!(reorder.release_all(|r| out.push(r.to_vec())), 2);
        assert_eq!(out, vec![record(3, b'k', 96), record(u64::MAX, b'm', 96)]);
        assert!(reorder.is_empty());
    }

    #[test]
    fn the_buffers_are_reused_once_warm() {
        let mut reorder = Reorder::default();
        let round = |reorder: &mut Reorder, n: u64| {
            for i in 0..100u64 {
                reorder.push((i % 2) as usize, &record(n * 1000 + i, b'r', 96), u64::MAX);
            }
            released(reorder, n * 1000 + 50);
        };
        for n in 0..50 {
            round(&mut reorder, n);
        }
        let capacity = |r: &Reorder| -> Vec<(usize, usize)> {
            r.queues.iter().map(|q| (q.bytes.capacity(), q.held.capacity())).collect()
        };
        let warm = capacity(&reorder);
        for n in 50..100 {
            round(&mut reorder, n);
        }
        assert_eq!(capacity(&reorder), warm);
    }
}
