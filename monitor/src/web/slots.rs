//! The connection cap (`--web-max-connections`). At most N connections are served in full.
//! When all N are taken, a new connection takes the slot of the one that has been waiting
//! longest for its next request, if that one has waited at least [`EVICTABLE_AFTER`]: an
//! idle keep-alive, a slowloris that never finishes its headers, or a client that stopped
//! reading its answers all lose their slot to someone who asks, so they cannot keep a
//! scraper out. A connection whose request is being answered is never taken. Failing that,
//! the newcomer gets one of [`OVERFLOW_CONNECTIONS`] overflow slots (one quick answer), and
//! beyond those it is closed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// How long a connection must have waited for its next request before a newcomer may take
/// its slot: far above a client's time from connect to a complete request on any network a
/// scraper uses, far below the 30 s a slowloris could otherwise hold it.
pub const EVICTABLE_AFTER: Duration = Duration::from_secs(1);
/// Connections beyond the cap that still get one quick answer.
pub const OVERFLOW_CONNECTIONS: usize = 256;

/// One full slot, shared by its connection's task and the slot list.
pub struct Slot {
    /// In the service: a request is being answered.
    busy: AtomicBool,
    /// Since when it has been waiting for a request (ms since [`Slots`]' start).
    waiting_since: AtomicU64,
    evicted: Notify,
    /// Whether [`Slot::evicted`] was signalled.
    taken: AtomicBool,
}

impl Slot {
    /// A request is being answered: the slot cannot be taken.
    pub fn begin(&self) {
        self.busy.store(true, Ordering::Relaxed);
    }

    /// The request was answered at `at` (ms since the start): waiting again.
    fn end(&self, at: u64) {
        self.waiting_since.store(at, Ordering::Relaxed);
        self.busy.store(false, Ordering::Relaxed);
    }

    /// Resolves when a newcomer took this slot.
    pub async fn evicted(&self) {
        self.evicted.notified().await
    }
}

/// What a new connection gets.
pub enum Admission {
    /// A full slot (released on drop).
    Full(SlotGuard),
    /// An overflow slot: one quick answer.
    Overflow(OwnedSemaphorePermit),
    /// Nothing: close it.
    Refused,
}

/// The cap's state.
pub struct Slots {
    max: usize,
    started: Instant,
    full: Mutex<Vec<Arc<Slot>>>,
    overflow: Arc<Semaphore>,
}

impl Slots {
    /// At most `max` full slots (at least 1).
    pub fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots {
            max: max.max(1),
            started: Instant::now(),
            full: Mutex::new(Vec::new()),
            overflow: Arc::new(Semaphore::new(OVERFLOW_CONNECTIONS)),
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A slot for a new connection: a free one, the longest-waiting evictable one, an
    /// overflow one, or none.
    pub fn admit(self: &Arc<Self>) -> Admission {
        let now = self.now_ms();
        let mut full = self.full.lock().unwrap_or_else(PoisonError::into_inner);
        if full.len() >= self.max {
            let evictable = EVICTABLE_AFTER.as_millis() as u64;
            let oldest = full
                .iter()
                .enumerate()
                .filter(|(_, slot)| {
                    !slot.busy.load(Ordering::Relaxed)
                        && now.saturating_sub(slot.waiting_since.load(Ordering::Relaxed))
                            >= evictable
                })
                .min_by_key(|(_, slot)| slot.waiting_since.load(Ordering::Relaxed))
                .map(|(index, _)| index);
            match oldest {
                Some(index) => {
                    let old = full.swap_remove(index);
                    old.taken.store(true, Ordering::Relaxed);
                    old.evicted.notify_one();
                }
                None => {
                    drop(full);
                    return match self.overflow.clone().try_acquire_owned() {
                        Ok(permit) => Admission::Overflow(permit),
                        Err(_) => Admission::Refused,
                    };
                }
            }
        }
        let slot = Arc::new(Slot {
            busy: AtomicBool::new(false),
            waiting_since: AtomicU64::new(now),
            evicted: Notify::new(),
            taken: AtomicBool::new(false),
        });
        full.push(slot.clone());
        Admission::Full(SlotGuard { slots: self.clone(), slot })
    }
}

/// A full slot, released when its connection ends.
pub struct SlotGuard {
    slots: Arc<Slots>,
    slot: Arc<Slot>,
}

impl SlotGuard {
    /// The slot.
    pub fn slot(&self) -> &Arc<Slot> {
        &self.slot
    }

    /// The request was answered: waiting again from now.
    pub fn answered(&self) {
        self.slot.end(self.slots.now_ms());
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if self.slot.taken.load(Ordering::Relaxed) {
            return; // already out of the list
        }
        let mut full = self.slots.full.lock().unwrap_or_else(PoisonError::into_inner);
        full.retain(|slot| !Arc::ptr_eq(slot, &self.slot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_newcomer_takes_the_longest_waiting_idle_slot_but_never_a_busy_or_young_one() {
        let slots = Slots::new(2);
        let Admission::Full(first) = slots.admit() else { panic!("a free slot") };
        let Admission::Full(second) = slots.admit() else { panic!("a free slot") };
        // Both young: the third gets an overflow slot.
        assert!(matches!(slots.admit(), Admission::Overflow(_)));
        tokio::time::sleep(EVICTABLE_AFTER + Duration::from_millis(50)).await;
        second.slot().begin(); // answering a request: never taken
        let Admission::Full(third) = slots.admit() else { panic!("the first's slot") };
        tokio::time::timeout(Duration::from_secs(1), first.slot().evicted())
            .await
            .expect("the first was told");
        // Now the second (busy) and the third (young) hold the slots.
        assert!(matches!(slots.admit(), Admission::Overflow(_)));
        drop(first);
        assert_eq!(slots.full.lock().unwrap().len(), 2, "the evicted one was already out");
        second.answered();
        drop(third);
        assert!(matches!(slots.admit(), Admission::Full(_)), "a slot was released");
    }
}
