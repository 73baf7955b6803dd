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
//! Each ring's records wait in a queue of their own, in ring order, and the queues are merged
//! by timestamp: no sort. What waits is a handle (the source's: where the record is in its
//! ring), never a copy of the record. After warm-up nothing is allocated.

use std::collections::VecDeque;

/// Records not yet handed out, as handles `H`: one queue per ring.
#[derive(Debug)]
pub struct Reorder<H> {
    queues: Vec<VecDeque<(u64, H)>>,
}

impl<H> Default for Reorder<H> {
    fn default() -> Self {
        Reorder { queues: Vec::new() }
    }
}

/// The record's kernel timestamp: every record type starts with `timestamp_ns` (a record
/// too short to have one sorts first, and fails to decode).
pub fn timestamp_of(record: &[u8]) -> u64 {
    record.get(..8).map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

impl<H: Copy> Reorder<H> {
    /// Holds the record `handle`, read from ring `ring` and stamped `timestamp_ns`, until
    /// its turn. Records of one ring must be pushed in ring order.
    pub fn push(&mut self, ring: usize, timestamp_ns: u64, handle: H) {
        if ring >= self.queues.len() {
            self.queues.resize_with(ring + 1, VecDeque::new);
        }
        self.queues[ring].push_back((timestamp_ns, handle));
    }

    /// Hands `each` the ring and handle of every held record stamped before `watermark_ns`,
    /// oldest first across rings (ring order within one); keeps the others. Returns how
    /// many it handed out.
    pub fn release(&mut self, watermark_ns: u64, each: impl FnMut(usize, H)) -> usize {
        self.release_where(|timestamp_ns| timestamp_ns < watermark_ns, each)
    }

    /// Hands out everything held, oldest first (at shutdown).
    pub fn release_all(&mut self, each: impl FnMut(usize, H)) -> usize {
        self.release_where(|_| true, each)
    }

    fn release_where(
        &mut self,
        due: impl Fn(u64) -> bool,
        mut each: impl FnMut(usize, H),
    ) -> usize {
        let mut released = 0;
        loop {
            // The queue whose next record is oldest (the first such queue on a tie).
            let mut oldest: Option<(u64, usize)> = None;
            for (ring, queue) in self.queues.iter().enumerate() {
                if let Some(&(timestamp_ns, _)) = queue.front() {
                    if oldest.is_none_or(|(best, _)| timestamp_ns < best) {
                        oldest = Some((timestamp_ns, ring));
                    }
                }
            }
            let Some((timestamp_ns, ring)) = oldest else { break };
            if !due(timestamp_ns) {
                break;
            }
            if let Some((_, handle)) = self.queues[ring].pop_front() {
                each(ring, handle);
                released += 1;
            }
        }
        released
    }

    /// How many records are held.
    pub fn len(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn released(reorder: &mut Reorder<char>, watermark_ns: u64) -> String {
        let mut out = String::new();
        reorder.release(watermark_ns, |_, tag| out.push(tag));
        out
    }

    #[test]
    fn records_come_out_in_timestamp_order_whatever_ring_they_came_from() {
        let mut reorder = Reorder::default();
        // Ring 0, drained first, holds the later transitions of a socket whose first one ran
        // on CPU 1.
        reorder.push(0, 30, 'b');
        reorder.push(0, 40, 'd');
        reorder.push(1, 10, 'a');
        reorder.push(1, 35, 'c');
        let mut rings = Vec::new();
        reorder.release(100, |ring, tag| rings.push((ring, tag)));
        assert_eq!(rings, [(1, 'a'), (0, 'b'), (1, 'c'), (0, 'd')]);
        assert!(reorder.is_empty());
    }

    #[test]
    fn records_at_or_after_the_watermark_wait_for_the_next_drain() {
        let mut reorder = Reorder::default();
        reorder.push(0, 20, 'y');
        reorder.push(0, 50, 'x');
        reorder.push(1, 60, 'z');
        assert_eq!(released(&mut reorder, 50), "y");
        assert_eq!(reorder.len(), 2);
        // Anything stamped before the watermark was in hand (see the module docs); what the
        // next drain brings interleaves with what waited.
        reorder.push(0, 55, 'w');
        reorder.push(1, 70, 'v');
        assert_eq!(released(&mut reorder, 1000), "xwzv");
    }

    #[test]
    fn one_ring_keeps_its_order_and_ties_go_to_the_lower_ring() {
        let mut reorder = Reorder::default();
        reorder.push(1, 7, 'p');
        reorder.push(1, 7, 'q');
        reorder.push(0, 7, 'o');
        assert_eq!(released(&mut reorder, 8), "opq");
    }

    #[test]
    fn release_all_hands_out_even_the_newest() {
        let mut reorder = Reorder::default();
        reorder.push(0, u64::MAX, 'm');
        reorder.push(1, 3, 'k');
        let mut out = String::new();
        assert_eq!(reorder.release_all(|_, tag| out.push(tag)), 2);
        assert_eq!(out, "km");
        assert!(reorder.is_empty());
    }

    #[test]
    fn the_queues_are_reused_once_warm() {
        let mut reorder = Reorder::default();
        let round = |reorder: &mut Reorder<char>, n: u64| {
            for i in 0..100u64 {
                reorder.push((i % 2) as usize, n * 1000 + i, 'r');
            }
            released(reorder, n * 1000 + 50);
        };
        for n in 0..50 {
            round(&mut reorder, n);
        }
        let capacity =
            |r: &Reorder<char>| -> Vec<usize> { r.queues.iter().map(VecDeque::capacity).collect() };
        let warm = capacity(&reorder);
        for n in 50..100 {
            round(&mut reorder, n);
        }
        assert_eq!(capacity(&reorder), warm);
    }

    #[test]
    fn a_short_record_has_no_timestamp_and_sorts_first() {
        assert_eq!(timestamp_of(&[1, 2, 3]), 0);
        assert_eq!(timestamp_of(&42u64.to_le_bytes()), 42);
    }
}
