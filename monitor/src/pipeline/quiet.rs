//! Asking the kernel about tracked sockets that have been quiet for long in states its own
//! timers end ([`crate::tracker::TRANSIENT_STATES`]): their last transitions may never have
//! reached us. One exact `sock_diag` lookup per socket, in its network namespace, on the
//! kernel-reader thread (the one that may enter namespaces), while the pipeline keeps
//! draining; the answers are applied between batches ([`crate::tracker::Tracker::settle`]).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::Instant;

use crate::decode::TcpState;
use crate::privilege::{NoAnswer, PrivilegedThread};
use crate::sockdiag::{self, Lookup};
use crate::tracker::Suspect;

/// How often the socket table is scanned for quiet sockets.
pub const CHECK_EVERY: Duration = Duration::from_secs(15);

/// How long a socket must have been quiet in a transient state to be asked about. The
/// kernel's timers keep a socket there far longer only when the peer is gone (a SYN or FIN
/// unanswered: up to ~2 min of retries by default), and such a socket costs one lookup per
/// check.
pub const QUIET_FOR: Duration = Duration::from_secs(15);

/// Most sockets asked about per check: each is a netlink round trip of microseconds.
pub const MAX_SUSPECTS: usize = 4096;

/// How long answers wait before they are applied, so that the drain that precedes them
/// releases every record stamped before the lookups (the ring merge holds back the last
/// 100 µs: `source::CLOCK_MARGIN_NS`). A socket that closed before its lookup committed its
/// CLOSE before the kernel unhashed it; applied after that CLOSE, "gone" is never mistaken
/// for a socket we merely had not heard of yet.
const SETTLE_AFTER: Duration = Duration::from_millis(1);

/// A suspect and what the kernel said of its 4-tuple: the state of the full socket there.
pub type Answer = (Suspect, Option<TcpState>);

type Pending = Pin<Box<dyn Future<Output = Result<Vec<Answer>, NoAnswer>> + Send>>;

/// What the pipeline should do next about quiet sockets.
pub enum Step {
    /// Scan the table and [`QuietChecks::ask`] about what it finds.
    Due,
    /// Drain, then apply these answers.
    Answered(Vec<Answer>),
}

/// Where the checks of quiet sockets stand; kept by the pipeline's driver across runs.
pub struct QuietChecks {
    reader: PrivilegedThread,
    next: Instant,
    pending: Option<Pending>,
    /// Answers received, and when they may be applied.
    ready: Option<(Instant, Vec<Answer>)>,
}

impl QuietChecks {
    /// Checks that ask on `reader`, the first one [`CHECK_EVERY`] from now.
    pub fn new(reader: PrivilegedThread) -> Self {
        QuietChecks { reader, next: Instant::now() + CHECK_EVERY, pending: None, ready: None }
    }

    /// Resolves when a check is due or answers are ready. Cancel-safe: a lookup under way
    /// and answers received stay here when the caller stops waiting.
    pub async fn next(&mut self) -> Step {
        if let Some(pending) = self.pending.as_mut() {
            let answers = pending.await.unwrap_or_default();
            self.pending = None;
            self.ready = Some((Instant::now() + SETTLE_AFTER, answers));
        }
        if let Some((at, _)) = &self.ready {
            tokio::time::sleep_until(*at).await;
            let answers = self.ready.take().map(|(_, answers)| answers).unwrap_or_default();
            self.next = Instant::now() + CHECK_EVERY;
            return Step::Answered(answers);
        }
        tokio::time::sleep_until(self.next).await;
        Step::Due
    }

    /// Asks the kernel about `suspects` on the reader thread; with none, waits for the next
    /// check.
    pub fn ask(&mut self, suspects: Vec<Suspect>) {
        if suspects.is_empty() {
            self.next = Instant::now() + CHECK_EVERY;
        } else {
            self.pending = Some(Box::pin(self.reader.spawn(move || look_up(&suspects))));
        }
    }
}

/// Most lookups per check: a suspect whose namespace is unknown is asked in every one.
const MAX_LOOKUPS: usize = 16_384;

/// Looks each suspect up in its network namespace, or in every namespace when its own is not
/// known (a socket first seen mid-life): found in none of them, it is gone. A namespace no
/// process or `ip netns` name holds any more is not asked (its orphaned sockets may still
/// be closing): its suspects get no answer, nor do those of a namespace that cannot be
/// entered, nor those of an unknown one unless every namespace was read.
fn look_up(suspects: &[Suspect]) -> Vec<Answer> {
    let mut namespaces = sockdiag::namespaces(sockdiag::own_namespace());
    let (known, unknown): (Vec<&Suspect>, Vec<&Suspect>) =
        suspects.iter().partition(|suspect| suspect.netns != 0);
    let room = MAX_LOOKUPS.saturating_sub(known.len()) / namespaces.len().max(1);
    let unknown = &unknown[..unknown.len().min(room)];
    if unknown.is_empty() {
        let wanted: HashSet<u32> = known.iter().map(|suspect| suspect.netns).collect();
        namespaces.retain(|(netns, _)| wanted.contains(netns));
    }
    let answered = sockdiag::in_each(&namespaces, |netns| {
        let mut lookup = Lookup::open()?;
        let here = known.iter().filter(|suspect| suspect.netns == netns).chain(unknown);
        here.map(|suspect| Ok((**suspect, lookup.state_of(&suspect.endpoints)?))).collect()
    });
    let mut answers = Vec::new();
    let mut anywhere: HashMap<u64, Option<TcpState>> = HashMap::new();
    let mut every_namespace_read = true;
    for (netns, result) in answered {
        let found: Vec<Answer> = match result {
            Ok(found) => found,
            Err(e) => {
                every_namespace_read = false;
                log::debug!("asking about quiet sockets in network namespace {netns}: {e}");
                continue;
            }
        };
        for (suspect, state) in found {
            if suspect.netns != 0 {
                answers.push((suspect, state));
            } else {
                let seen = anywhere.entry(suspect.skaddr).or_default();
                *seen = seen.or(state);
            }
        }
    }
    if every_namespace_read {
        let found = |suspect: &Suspect| anywhere.get(&suspect.skaddr).copied().flatten();
        answers.extend(unknown.iter().map(|suspect| (**suspect, found(suspect))));
    }
    answers
}
