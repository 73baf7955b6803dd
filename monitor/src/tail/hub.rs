//! Daemon side of the tail: the Unix socket server and the fan-out of records to clients.
//!
//! The drain loop owns the [`TailHub`] and never waits on a client. Each record a client
//! wants is written (once, whatever the number of clients) into that client's pending lines,
//! and every batch of the drain ends with one [`Chunk`] per client on its queue: one wake-up
//! of its writer per batch, not one per record. Each client may have [`CLIENT_QUEUE`]
//! records queued and not yet written to its socket (its [`Backlog`]); beyond that a record
//! is dropped, counted for that client (it is told how many it missed as soon as there is
//! room again) and in `tcpmon_tail_records_dropped_total`. A client that reads nothing for a
//! minute is disconnected. A client must keep its side of the socket open: end-of-file
//! means it left.

use crate::exit::StartError;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use log::{debug, info};
use prometheus::{IntCounter, IntGauge, Registry};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc::{self, error::TrySendError};

use super::filter::Subscribe;
use super::json::{write_connection, write_transition, TimeWriter};
use super::record::{TailRecord, PROTOCOL_VERSION};
use crate::clock::WallClock;
use crate::metrics::registered;
use crate::tracker::{ConnectionRecord, TransitionRecord};

/// Records a client may have queued and not yet written before the daemon starts dropping
/// its records.
pub const CLIENT_QUEUE: usize = 4096;
/// A client that accepts no bytes for this long is disconnected (its queue is long full).
const STALLED_CLIENT: Duration = Duration::from_secs(60);
/// Longest subscribe request accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes the writer of a client gathers for one write to its socket.
const WRITE_BATCH: usize = 64 * 1024;

/// Lines for one client, and how many records they hold.
#[derive(Debug)]
pub struct Chunk {
    /// Whole lines, each ending in `\n`.
    pub lines: Bytes,
    /// Records among them (each counts against the client's [`Backlog`]).
    pub records: usize,
}

/// Records queued for one client and not yet written out: the hub adds what it queues, the
/// client's writer takes away what it wrote.
#[derive(Clone, Debug, Default)]
pub struct Backlog(Arc<AtomicUsize>);

impl Backlog {
    /// Records queued and not yet written.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    fn queued(&self, records: usize) {
        self.0.fetch_add(records, Ordering::AcqRel);
    }

    /// `records` were written out (or taken by an in-process client).
    pub fn written(&self, records: usize) {
        self.0.fetch_sub(records, Ordering::AcqRel);
    }
}

/// A client ready to receive records: the hub's end of its queue.
pub struct NewSubscriber {
    /// What it asked for (validated).
    pub request: Subscribe,
    /// Where its chunks go.
    pub queue: mpsc::Sender<Chunk>,
    /// Its records not yet written.
    pub backlog: Backlog,
}

/// The client's end of its queue.
pub struct ClientQueue {
    /// The chunks the hub sends.
    pub chunks: mpsc::Receiver<Chunk>,
    /// To be told what was written.
    pub backlog: Backlog,
}

/// A queue between the hub and one client that asked for `request`.
pub fn queue(request: Subscribe) -> (NewSubscriber, ClientQueue) {
    // Every chunk holds at least one record, and at most CLIENT_QUEUE records are queued:
    // the channel can never be full.
    let (queue, chunks) = mpsc::channel(CLIENT_QUEUE + 1);
    let backlog = Backlog::default();
    (NewSubscriber { request, queue, backlog: backlog.clone() }, ClientQueue { chunks, backlog })
}

/// The tail's self-observability metrics.
#[derive(Clone)]
pub struct TailMetrics {
    clients: IntGauge,
    sent: IntCounter,
    dropped: IntCounter,
}

impl TailMetrics {
    /// Creates and registers the metrics.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let clients =
            registered(registry, IntGauge::new("tcpmon_tail_clients", "Connected tail clients.")?)?;
        let sent = registered(
            registry,
            IntCounter::new("tcpmon_tail_records_sent_total", "Records queued to tail clients.")?,
        )?;
        let dropped = registered(
            registry,
            IntCounter::new(
                "tcpmon_tail_records_dropped_total",
                "Records dropped because a tail client read too slowly (each client is told).",
            )?,
        )?;
        Ok(TailMetrics { clients, sent, dropped })
    }
}

struct Subscriber {
    request: Subscribe,
    queue: mpsc::Sender<Chunk>,
    backlog: Backlog,
    /// Lines queued since the last flush.
    pending: Vec<u8>,
    /// Records among them.
    pending_records: usize,
    /// Records dropped that the client has not been told of.
    missed: u64,
    gone: bool,
}

impl Subscriber {
    /// Whether one more record fits in the client's queue.
    fn has_room(&self) -> bool {
        self.backlog.get() + self.pending_records < CLIENT_QUEUE
    }

    /// Queues the `missed` notice if one is pending and there is room: it sits exactly where
    /// the gap is. True when no notice is pending any more.
    fn queue_missed_notice(&mut self) -> bool {
        if self.missed == 0 {
            return true;
        }
        if !self.has_room() {
            return false;
        }
        let notice = TailRecord::Missed { records: self.missed }.to_line();
        self.pending.extend_from_slice(&notice);
        self.pending_records += 1;
        self.missed = 0;
        true
    }

    /// Sends what is pending as one chunk.
    fn flush(&mut self) {
        if self.pending_records == 0 || self.gone {
            return;
        }
        let records = std::mem::take(&mut self.pending_records);
        // The buffer goes with the chunk (no copy); the next one starts at its size.
        let capacity = self.pending.capacity();
        let lines = Bytes::from(std::mem::replace(&mut self.pending, Vec::with_capacity(capacity)));
        self.backlog.queued(records);
        match self.queue.try_send(Chunk { lines, records }) {
            Ok(()) => {}
            Err(TrySendError::Closed(_)) | Err(TrySendError::Full(_)) => {
                self.backlog.written(records);
                self.gone = true;
            }
        }
    }
}

/// The connected clients, owned by the drain loop.
pub struct TailHub {
    subscribers: Vec<Subscriber>,
    clock: WallClock,
    metrics: TailMetrics,
    mode: &'static str,
    /// The record being published, serialized once for every client that wants it.
    line: Vec<u8>,
    times: TimeWriter,
}

impl TailHub {
    /// An empty hub converting timestamps with `clock`; `mode` (`daemon`, `standalone`) is
    /// announced to clients.
    pub fn new(clock: WallClock, metrics: TailMetrics, mode: &'static str) -> Self {
        let (line, times) = (Vec::new(), TimeWriter::default());
        TailHub { subscribers: Vec::new(), clock, metrics, mode, line, times }
    }

    /// Adds a client and sends it `hello`: from that line on it sees every matching record.
    pub fn add(&mut self, subscriber: NewSubscriber) {
        let NewSubscriber { request, queue, backlog } = subscriber;
        let hello = TailRecord::Hello { version: PROTOCOL_VERSION, mode: self.mode.into() };
        backlog.queued(1);
        if queue.try_send(Chunk { lines: Bytes::from(hello.to_line()), records: 1 }).is_err() {
            return; // already gone
        }
        self.subscribers.push(Subscriber {
            request,
            queue,
            backlog,
            pending: Vec::new(),
            pending_records: 0,
            missed: 0,
            gone: false,
        });
        self.metrics.clients.set(self.subscribers.len() as i64);
    }

    /// True when no client is connected.
    pub fn is_empty(&self) -> bool {
        self.subscribers.is_empty()
    }

    /// Re-reads the wall clock (suspend and NTP steps move it against CLOCK_MONOTONIC).
    pub fn resync_clock(&mut self) {
        self.clock = WallClock::now();
    }

    /// Sends every client what was queued for it since the last flush, in one chunk; tells
    /// clients that missed records as soon as there is room; forgets clients that went away.
    /// Called at the end of every batch of a drain.
    pub fn flush(&mut self) {
        for subscriber in &mut self.subscribers {
            subscriber.queue_missed_notice();
            subscriber.flush();
        }
        let before = self.subscribers.len();
        self.subscribers.retain(|s| !s.gone && !s.queue.is_closed());
        if self.subscribers.len() != before {
            self.metrics.clients.set(self.subscribers.len() as i64);
        }
    }

    /// Queues the record in `self.line` for every client whose request `wants` it; `write`
    /// serializes it, once, when the first such client is found.
    fn publish(
        &mut self,
        wants: impl Fn(&Subscribe) -> bool,
        write: impl FnOnce(&mut Vec<u8>, &mut TimeWriter, &WallClock),
    ) {
        let mut write = Some(write);
        for subscriber in &mut self.subscribers {
            if subscriber.gone || !wants(&subscriber.request) {
                continue;
            }
            if let Some(write) = write.take() {
                self.line.clear();
                write(&mut self.line, &mut self.times, &self.clock);
            }
            if subscriber.queue_missed_notice() && subscriber.has_room() {
                subscriber.pending.extend_from_slice(&self.line);
                subscriber.pending_records += 1;
                self.metrics.sent.inc();
            } else {
                subscriber.missed += 1;
                self.metrics.dropped.inc();
            }
        }
    }

    /// Answers a `--close-wait` client: `hello`, then `records` (each with its workload)
    /// that its filter passes, oldest wait first, at most [`CLIENT_QUEUE`] (a `missed`
    /// notice counts the rest); then its queue ends, which ends its stream.
    pub fn list(
        &mut self,
        subscriber: NewSubscriber,
        mut records: Vec<(ConnectionRecord, String)>,
    ) {
        let NewSubscriber { request, queue, backlog } = subscriber;
        records.retain(|(record, workload)| request.wants_connection(record, workload));
        records.sort_by_key(|(record, _)| std::cmp::Reverse(record.close_wait_ns));
        let hello = TailRecord::Hello { version: PROTOCOL_VERSION, mode: self.mode.into() };
        let mut lines = hello.to_line();
        let listed = records.len().min(CLIENT_QUEUE - 2);
        for (record, workload) in &records[..listed] {
            write_connection(&mut lines, &mut self.times, record, workload, &self.clock);
        }
        let missed = (records.len() - listed) as u64;
        if missed > 0 {
            lines.extend_from_slice(&TailRecord::Missed { records: missed }.to_line());
        }
        let count = 1 + listed + usize::from(missed > 0);
        self.metrics.sent.inc_by(listed as u64);
        backlog.queued(count);
        if queue.try_send(Chunk { lines: Bytes::from(lines), records: count }).is_err() {
            backlog.written(count);
        }
    }

    /// Queues a connection record of workload `workload` for every client that wants it.
    pub fn publish_connection(&mut self, record: &ConnectionRecord, workload: &str) {
        self.publish(
            |request| request.wants_connection(record, workload),
            |out, times, clock| write_connection(out, times, record, workload, clock),
        );
    }

    /// Queues a transition record of workload `workload` for every client that wants it.
    pub fn publish_transition(&mut self, record: &TransitionRecord, workload: &str) {
        self.publish(
            |request| request.wants_transition(record, workload),
            |out, times, clock| write_transition(out, times, record, workload, clock),
        );
    }
}

impl Drop for TailHub {
    /// What is still pending goes out before the queues end (shutdown).
    fn drop(&mut self) {
        for subscriber in &mut self.subscribers {
            subscriber.flush();
        }
    }
}

/// Binds the tail socket with owner-only permissions. A live socket at `path` means another
/// daemon is running: that is an error. A dead one (left by a crash) is replaced.
pub fn bind_socket(path: &Path) -> Result<UnixListener, StartError> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
    let failed = |reason: String| StartError::SocketPath { path: path.to_owned(), reason };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        // A directory of our own is made owner-only; an existing one is left as it is.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| failed(format!("creating {}: {e}", parent.display())))?;
    }
    // Not following a link: whatever lies at the path itself.
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(StartError::AlreadyRunning { path: path.to_owned() });
            }
            std::fs::remove_file(path)
                .map_err(|e| failed(format!("removing the stale socket: {e}")))?;
        }
        Ok(_) => {
            return Err(failed(
                "something that is not a socket is there; tcpmon does not remove it (choose \
                 another --tail-socket, or remove it)"
                    .into(),
            ))
        }
        Err(_) => {}
    }
    // Owner-only from its creation: bind() makes the socket file under the umask.
    let previous = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(previous);
    let listener = bound.map_err(|e| failed(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| failed(format!("restricting it to its owner: {e}")))?;
    Ok(listener)
}

/// Counts client tasks still writing, so shutdown can let them flush.
#[derive(Clone, Default)]
pub struct LiveClients(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl LiveClients {
    /// Waits (at most `limit`) until every client task has written its queue and ended. Call
    /// after dropping the [`TailHub`], which ends each queue.
    pub async fn drained(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.0.load(std::sync::atomic::Ordering::Acquire) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Decrements the live count when a client task ends, however it ends.
struct Live(LiveClients);

impl Drop for Live {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Most tail clients at once; more are told so and closed.
pub const MAX_CLIENTS: usize = 32;

/// Accepts tail clients until the task is dropped, at most [`MAX_CLIENTS`] at once.
pub async fn serve(
    listener: UnixListener,
    new_subscribers: mpsc::Sender<NewSubscriber>,
    live: LiveClients,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                if live.0.load(std::sync::atomic::Ordering::Acquire) >= MAX_CLIENTS {
                    let message = format!(
                        "the daemon already serves {MAX_CLIENTS} tail clients, its most; try again \
                         when one has left"
                    );
                    tokio::spawn(refuse(stream, message));
                    continue;
                }
                live.0.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                let guard = Live(live.clone());
                let new_subscribers = new_subscribers.clone();
                tokio::spawn(async move {
                    let _guard = guard;
                    handle_client(stream, new_subscribers).await;
                });
            }
            Err(e) => {
                debug!("accepting a tail client failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn refuse(mut stream: UnixStream, message: String) {
    debug!("refused a tail client: {message}");
    let _ = stream.write_all(&TailRecord::Error { message }.to_line()).await;
}

async fn handle_client(stream: UnixStream, new_subscribers: mpsc::Sender<NewSubscriber>) {
    let mut reader = BufReader::new(stream).take(MAX_REQUEST);
    let mut line = String::new();
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
    let stream = reader.into_inner().into_inner();
    let request = match read {
        Err(_) => return refuse(stream, "no request within 5 s".into()).await,
        Ok(Err(e)) => return refuse(stream, format!("unreadable request: {e}")).await,
        Ok(Ok(_)) => match serde_json::from_str::<Subscribe>(&line) {
            Ok(request) => request,
            Err(e) => return refuse(stream, format!("invalid request: {e}")).await,
        },
    };
    if let Err(message) = request.validate() {
        return refuse(stream, message).await;
    }
    let (subscriber, client) = queue(request);
    if new_subscribers.send(subscriber).await.is_err() {
        return; // shutting down
    }
    info!("tail client connected");
    let ClientQueue { mut chunks, backlog } = client;
    let (mut from_client, mut to_client) = stream.into_split();
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let mut ignored = [0u8; 512];
    loop {
        tokio::select! {
            chunk = chunks.recv() => {
                let Some(chunk) = chunk else { break };
                batch.clear();
                batch.extend_from_slice(&chunk.lines);
                let mut records = chunk.records;
                while batch.len() < WRITE_BATCH {
                    match chunks.try_recv() {
                        Ok(more) => {
                            batch.extend_from_slice(&more.lines);
                            records += more.records;
                        }
                        Err(_) => break,
                    }
                }
                match tokio::time::timeout(STALLED_CLIENT, to_client.write_all(&batch)).await {
                    Ok(Ok(())) => backlog.written(records),
                    Ok(Err(_)) => break,
                    Err(_) => {
                        info!("disconnecting a tail client that read nothing for {STALLED_CLIENT:?}");
                        break;
                    }
                }
            }
            // Anything a client sends after its request is ignored; EOF means it left.
            read = from_client.read(&mut ignored) => {
                if !matches!(read, Ok(n) if n > 0) {
                    break;
                }
            }
        }
    }
    info!("tail client disconnected");
}

/// Default path of the tail socket.
pub fn default_socket() -> PathBuf {
    PathBuf::from("/run/tcpmon/tail.sock")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tail::filter::{Filter, View};
    use crate::tracker::{ConnectionPhase, Endpoints, Owner, Side};

    #[tokio::test]
    async fn the_socket_is_owner_only_in_an_owner_only_directory_and_replaces_no_file() {
        let dir = std::env::temp_dir().join(format!("tcpmon-socket-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("run/tail.sock");
        let listener = bind_socket(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.join("run")), 0o700);
        drop(listener);
        // A stale socket is replaced; a file that is not a socket is left alone.
        drop(bind_socket(&path).unwrap());
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "precious").unwrap();
        let refused = bind_socket(&path).expect_err("a regular file is refused").to_string();
        assert!(refused.contains("not a socket"), "{refused}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn waiting(port: u16, waited_ms: u64) -> ConnectionRecord {
        let local = format!("127.0.0.1:{port}").parse().unwrap();
        ConnectionRecord {
            phase: ConnectionPhase::CloseWait,
            start_ns: Some(0),
            time_ns: 1,
            side: Some(Side::Passive),
            owner: Owner { pid: Some(7), comm: *b"app\0\0\0\0\0\0\0\0\0\0\0\0\0" },
            endpoints: Endpoints::new(local, "127.0.0.1:40000".parse().unwrap()),
            handshake_ns: None,
            handshake_retransmits: None,
            accept_queue_full: false,
            accept_wait_ns: None,
            netns: None,
            cgroup_id: None,
            stats: None,
            lifetime_ns: None,
            teardown: None,
            close_wait_ns: Some(waited_ms * 1_000_000),
            outcome: None,
        }
    }

    /// The lines a `--close-wait` client with `filter` receives for `records`.
    fn listing(filter: Filter, records: &[ConnectionRecord]) -> Vec<TailRecord> {
        let metrics = TailMetrics::new(&Registry::new()).unwrap();
        let mut hub = TailHub::new(WallClock::now(), metrics, "daemon");
        let request = Subscribe {
            version: PROTOCOL_VERSION,
            view: View::CloseWait,
            filter,
            ..Subscribe::default()
        };
        let (subscriber, mut client) = queue(request);
        hub.list(subscriber, records.iter().map(|r| (*r, "app.service".to_owned())).collect());
        let chunk = client.chunks.try_recv().unwrap();
        assert!(client.chunks.try_recv().is_err(), "one chunk, then the queue ends");
        assert_eq!(client.backlog.get(), chunk.records);
        let lines = String::from_utf8(chunk.lines.to_vec()).unwrap();
        lines.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
    }

    fn waits(lines: &[TailRecord]) -> Vec<u64> {
        lines
            .iter()
            .filter_map(|line| match line {
                TailRecord::Connection(c) => c.close_wait_us,
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_close_wait_listing_is_filtered_oldest_first_and_bounded() {
        let records = [waiting(80, 5), waiting(443, 9_000), waiting(80, 300)];
        let all = listing(Filter::default(), &records);
        assert!(matches!(all[0], TailRecord::Hello { .. }));
        assert_eq!(waits(&all), [9_000_000, 300_000, 5_000]);
        let port_80 = listing(Filter { ports: vec![80], ..Filter::default() }, &records);
        assert_eq!(waits(&port_80), [300_000, 5_000]);
        // More than a client's queue holds: the oldest, then how many were left out.
        let many: Vec<ConnectionRecord> =
            (0..CLIENT_QUEUE as u64 + 10).map(|i| waiting(80, i)).collect();
        let lines = listing(Filter::default(), &many);
        assert_eq!(lines.len(), CLIENT_QUEUE);
        assert_eq!(waits(&lines).first(), Some(&((CLIENT_QUEUE as u64 + 9) * 1_000)));
        assert!(
            matches!(lines.last(), Some(TailRecord::Missed { records: 12 })),
            "{:?}",
            lines.last()
        );
    }
}
