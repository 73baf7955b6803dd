//! Least privilege once the daemon runs.
//!
//! Loading and attaching the programs and the start-up snapshot need capabilities. After
//! that the daemon reads only what it already holds (the rings are mapped memory, the maps
//! and programs are open file descriptors), with two exceptions:
//!
//! - entering other network namespaces at scrape time: `setns(2)` with `CLONE_NEWNET` needs
//!   CAP_SYS_ADMIN (`netns_install()` checks it in the namespace's user namespace and in the
//!   caller's);
//! - reading the counter maps on kernels before 6.5 with `kernel.unprivileged_bpf_disabled`
//!   set (Debian's default): `__sys_bpf()` refused every command without CAP_BPF or
//!   CAP_SYS_ADMIN until "bpf: move unprivileged checks into map_create() and
//!   bpf_prog_load()" (6.5). The daemon does not trust a version number for this: it tries a
//!   read from a thread without capabilities ([`kept_after_startup`]).
//!
//! Capabilities belong to threads: `capset(2)` changes only the calling thread's, and a new
//! thread starts with a copy of its creator's. So one [`PrivilegedThread`] does the work
//! that needs them and keeps only those; the main thread (which drains the rings) drops
//! every capability once start-up is done, and the async runtime's threads (HTTP, tail
//! clients, blocking work) drop theirs as they start ([`drop_all`]), so nothing a neighbour
//! sends is parsed by a thread holding a capability.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;

pub use caps::Capability;
use caps::{CapSet, CapsHashSet};

/// A failure to read or change the calling thread's capabilities.
#[derive(Debug, thiserror::Error)]
#[error("changing the thread's capabilities: {0}")]
pub struct CapsError(String);

impl From<caps::errors::CapsError> for CapsError {
    fn from(e: caps::errors::CapsError) -> Self {
        CapsError(e.to_string())
    }
}

/// The calling thread's effective capabilities.
pub fn effective() -> Result<HashSet<Capability>, CapsError> {
    Ok(caps::read(None, CapSet::Effective)?)
}

/// Keeps only those of `keep` the calling thread holds, in its permitted and effective sets;
/// empties its inheritable and ambient sets (nothing it executes inherits anything). What
/// is dropped from the permitted set cannot come back.
pub fn restrict_thread(keep: &[Capability]) -> Result<(), CapsError> {
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    let held = caps::read(None, CapSet::Permitted)?;
    let kept: CapsHashSet = keep.iter().copied().filter(|cap| held.contains(cap)).collect();
    // The effective set must stay within the permitted one: narrow it first.
    caps::set(None, CapSet::Effective, &kept)?;
    caps::set(None, CapSet::Permitted, &kept)?;
    Ok(())
}

/// Drops every capability of the calling thread. The runtime's threads call it as they
/// start; a failure is logged, not fatal (the thread then keeps what it had).
pub fn drop_all() {
    if let Err(e) = restrict_thread(&[]) {
        log::warn!("{e}: this thread keeps its capabilities");
    }
}

/// Capability names for the log, sorted (`CAP_SYS_ADMIN, …`; `none`).
pub fn names(set: &HashSet<Capability>) -> String {
    let mut names: Vec<String> = set.iter().map(|cap| cap.to_string()).collect();
    names.sort();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

/// The capabilities the [`PrivilegedThread`] keeps after start-up: CAP_SYS_ADMIN where the
/// daemon has it (to enter network namespaces; it also passes `bpf_capable()`), else
/// CAP_BPF where map reads need it (`maps_need_cap_bpf`, found by a read without any).
pub fn kept_after_startup(held: &HashSet<Capability>, maps_need_cap_bpf: bool) -> Vec<Capability> {
    if held.contains(&Capability::CAP_SYS_ADMIN) {
        vec![Capability::CAP_SYS_ADMIN]
    } else if maps_need_cap_bpf && held.contains(&Capability::CAP_BPF) {
        vec![Capability::CAP_BPF]
    } else {
        Vec::new()
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The thread gave no answer (a job panicked, or the thread could not run).
#[derive(Debug, thiserror::Error)]
#[error("the privileged thread gave no answer (its job failed)")]
pub struct NoAnswer;

/// One long-lived thread that runs the work needing capabilities, one job at a time, and
/// keeps only the capabilities that work needs ([`PrivilegedThread::restrict`]). Cheap to
/// clone; the thread ends when every handle is gone.
#[derive(Clone)]
pub struct PrivilegedThread {
    jobs: mpsc::Sender<Job>,
}

impl PrivilegedThread {
    /// Starts the thread, with the calling thread's capabilities.
    pub fn start() -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new().name("tcpmon-kernel".into()).spawn(move || {
            for job in queue {
                // A job that panics loses its answer, not the thread.
                let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
            }
        })?;
        Ok(PrivilegedThread { jobs })
    }

    /// Runs `job` on the thread and waits for its result. Never call it from a job (the
    /// thread would wait for itself).
    pub fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NoAnswer> {
        let (answer, result) = mpsc::sync_channel(1);
        self.jobs
            .send(Box::new(move || {
                let _ = answer.send(job());
            }))
            .map_err(|_| NoAnswer)?;
        result.recv().map_err(|_| NoAnswer)
    }

    /// Runs `job` on the thread; the result arrives through the returned future, so an
    /// async caller keeps working meanwhile.
    pub fn spawn<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T, NoAnswer>> {
        let (answer, result) = tokio::sync::oneshot::channel();
        let sent = self.jobs.send(Box::new(move || {
            let _ = answer.send(job());
        }));
        async move {
            sent.map_err(|_| NoAnswer)?;
            result.await.map_err(|_| NoAnswer)
        }
    }

    /// Keeps only `keep` on the thread; returns what it holds afterwards.
    pub fn restrict(&self, keep: Vec<Capability>) -> Result<HashSet<Capability>, CapsError> {
        self.run(move || {
            restrict_thread(&keep)?;
            effective()
        })
        .map_err(|e| CapsError(e.to_string()))?
    }

    /// The thread's effective capabilities.
    pub fn effective(&self) -> Result<HashSet<Capability>, CapsError> {
        self.run(effective).map_err(|e| CapsError(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thread_keeps_sys_admin_else_bpf_only_where_maps_need_it() {
        use Capability::*;
        let all: HashSet<Capability> =
            [CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, CAP_DAC_READ_SEARCH].into();
        assert_eq!(kept_after_startup(&all, true), vec![CAP_SYS_ADMIN]);
        assert_eq!(kept_after_startup(&all, false), vec![CAP_SYS_ADMIN]);
        // The DaemonSet's pod: CAP_BPF and CAP_PERFMON only.
        let pod: HashSet<Capability> = [CAP_BPF, CAP_PERFMON].into();
        assert_eq!(kept_after_startup(&pod, true), vec![CAP_BPF]);
        assert_eq!(kept_after_startup(&pod, false), Vec::<Capability>::new());
        assert_eq!(kept_after_startup(&HashSet::new(), true), Vec::<Capability>::new());
    }

    #[test]
    fn jobs_run_on_one_named_thread_and_a_panic_loses_only_its_answer() {
        let thread = PrivilegedThread::start().unwrap();
        let name = || std::thread::current().name().map(str::to_owned);
        assert_eq!(thread.run(name).unwrap().as_deref(), Some("tcpmon-kernel"));
        assert!(thread.run(|| panic!("a failing job")).is_err());
        assert_eq!(thread.run(|| 7).unwrap(), 7);
        let answer = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(thread.spawn(|| 8));
        assert_eq!(answer.unwrap(), 8);
    }

    #[test]
    fn a_restricted_thread_keeps_only_what_it_was_told_and_others_are_untouched() {
        let thread = PrivilegedThread::start().unwrap();
        let before = thread.effective().unwrap();
        let mine = effective().unwrap();
        let kept = thread.restrict(vec![Capability::CAP_SYS_ADMIN]).unwrap();
        let expected: HashSet<Capability> =
            before.intersection(&[Capability::CAP_SYS_ADMIN].into()).copied().collect();
        assert_eq!(kept, expected);
        assert_eq!(thread.run(|| caps::read(None, CapSet::Permitted).unwrap()).unwrap(), expected);
        // Capabilities are per thread: this one keeps what it had.
        assert_eq!(effective().unwrap(), mine);
        thread.restrict(Vec::new()).unwrap();
        assert!(thread.effective().unwrap().is_empty());
    }
}
