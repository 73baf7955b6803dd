//! Daemon side of the tail: the Unix socket server and the fan-out of records to clients.
//!
//! The drain loop owns the [`TailHub`] and never waits on a client: each client has a bounded
//! queue; when it is full the record is dropped, counted for that client (it is told how many
//! it missed at the first drain after its queue has room again) and in
//! `tcpmon_tail_records_dropped_total`. A client that reads nothing for a minute is
//! disconnected. A client must keep its side of the socket open: end-of-file means it left.

use crate::exit::StartError;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use log::{debug, info};
use prometheus::{IntCounter, IntGauge, Registry};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc::{self, error::TrySendError};

use super::filter::Subscribe;
use super::record::{ConnectionLine, TailRecord, TransitionLine, PROTOCOL_VERSION};
use crate::clock::WallClock;
use crate::tracker::{ConnectionRecord, TransitionRecord};

/// Records a client may have queued before the daemon starts dropping its records.
pub const CLIENT_QUEUE: usize = 4096;
/// A client that accepts no bytes for this long is disconnected (its queue is long full).
const STALLED_CLIENT: Duration = Duration::from_secs(60);
/// Longest subscribe request accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A client ready to receive records.
pub struct NewSubscriber {
    /// What it asked for (validated).
    pub request: Subscribe,
    /// Where its lines go.
    pub queue: mpsc::Sender<Bytes>,
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
        let clients = IntGauge::new("tcpmon_tail_clients", "Connected tail clients.")?;
        let sent =
            IntCounter::new("tcpmon_tail_records_sent_total", "Records queued to tail clients.")?;
        let dropped = IntCounter::new(
            "tcpmon_tail_records_dropped_total",
            "Records dropped because a tail client read too slowly (each client is told).",
        )?;
        registry.register(Box::new(clients.clone()))?;
        registry.register(Box::new(sent.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        Ok(TailMetrics { clients, sent, dropped })
    }
}

struct Subscriber {
    request: Subscribe,
    queue: mpsc::Sender<Bytes>,
    missed: u64,
    gone: bool,
}

/// The connected clients, owned by the drain loop.
pub struct TailHub {
    subscribers: Vec<Subscriber>,
    clock: WallClock,
    metrics: TailMetrics,
    mode: &'static str,
}

impl TailHub {
    /// An empty hub converting timestamps with `clock`; `mode` (`daemon`, `standalone`) is
    /// announced to clients.
    pub fn new(clock: WallClock, metrics: TailMetrics, mode: &'static str) -> Self {
        TailHub { subscribers: Vec::new(), clock, metrics, mode }
    }

    /// Adds a client and sends it `hello`: from that line on it sees every matching record.
    pub fn add(&mut self, subscriber: NewSubscriber) {
        let hello = TailRecord::Hello { version: PROTOCOL_VERSION, mode: self.mode.into() };
        if subscriber.queue.try_send(Bytes::from(hello.to_line())).is_err() {
            return; // already gone
        }
        self.subscribers.push(Subscriber {
            request: subscriber.request,
            queue: subscriber.queue,
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

    /// Tells clients that missed records as soon as their queue has room, and forgets
    /// clients that went away. Called after every drain.
    pub fn prune(&mut self) {
        for subscriber in &mut self.subscribers {
            subscriber.send_missed_notice();
        }
        let before = self.subscribers.len();
        self.subscribers.retain(|s| !s.gone && !s.queue.is_closed());
        if self.subscribers.len() != before {
            self.metrics.clients.set(self.subscribers.len() as i64);
        }
    }

    /// Sends a record to every client whose request `wants` it, serialized once by `line`.
    fn publish(
        &mut self,
        wants: impl Fn(&Subscribe) -> bool,
        line: impl FnOnce(&WallClock) -> TailRecord,
    ) {
        let mut line = Some(line);
        let mut bytes = None;
        for subscriber in &mut self.subscribers {
            if subscriber.gone || !wants(&subscriber.request) {
                continue;
            }
            let bytes = bytes.get_or_insert_with(|| {
                let make = line.take().expect("serialized once");
                Bytes::from(make(&self.clock).to_line())
            });
            // A pending notice goes first, so it sits exactly where the gap is.
            if subscriber.send_missed_notice() {
                match subscriber.queue.try_send(bytes.clone()) {
                    Ok(()) => {
                        self.metrics.sent.inc();
                        continue;
                    }
                    Err(TrySendError::Closed(_)) => subscriber.gone = true,
                    Err(TrySendError::Full(_)) => {}
                }
            }
            if !subscriber.gone {
                subscriber.missed += 1;
                self.metrics.dropped.inc();
            }
        }
    }

    /// Sends a connection record to every client that wants it (serialized once).
    pub fn publish_connection(&mut self, record: &ConnectionRecord) {
        self.publish(
            |request| request.wants_connection(record),
            |clock| TailRecord::Connection(ConnectionLine::from_record(record, clock)),
        );
    }

    /// Sends a transition record to every client that wants it (serialized once).
    pub fn publish_transition(&mut self, record: &TransitionRecord) {
        self.publish(
            |request| request.wants_transition(record),
            |clock| TailRecord::Transition(TransitionLine::from_record(record, clock)),
        );
    }
}

impl Subscriber {
    /// Queues the `missed` notice if one is pending. True when the queue is clear of it
    /// (sent now, or nothing was pending); false when it is still pending or the client left.
    fn send_missed_notice(&mut self) -> bool {
        if self.missed == 0 {
            return true;
        }
        let notice = TailRecord::Missed { records: self.missed }.to_line();
        match self.queue.try_send(Bytes::from(notice)) {
            Ok(()) => {
                self.missed = 0;
                true
            }
            Err(TrySendError::Full(_)) => false,
            Err(TrySendError::Closed(_)) => {
                self.gone = true;
                false
            }
        }
    }
}

/// Binds the tail socket with owner-only permissions. A live socket at `path` means another
/// daemon is running: that is an error. A dead one (left by a crash) is replaced.
pub fn bind_socket(path: &Path) -> Result<UnixListener, StartError> {
    let failed = |reason: String| StartError::SocketPath { path: path.to_owned(), reason };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| failed(format!("creating {}: {e}", parent.display())))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(StartError::AlreadyRunning { path: path.to_owned() });
        }
        std::fs::remove_file(path)
            .map_err(|e| failed(format!("removing the stale socket: {e}")))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| failed(e.to_string()))?;
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

/// Accepts tail clients until the task is dropped.
pub async fn serve(
    listener: UnixListener,
    new_subscribers: mpsc::Sender<NewSubscriber>,
    live: LiveClients,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
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
    let (queue, mut lines) = mpsc::channel(CLIENT_QUEUE);
    if new_subscribers.send(NewSubscriber { request, queue }).await.is_err() {
        return; // shutting down
    }
    info!("tail client connected");
    let (mut from_client, mut to_client) = stream.into_split();
    let mut batch = Vec::with_capacity(64 * 1024);
    let mut ignored = [0u8; 512];
    loop {
        tokio::select! {
            line = lines.recv() => {
                let Some(line) = line else { break };
                batch.clear();
                batch.extend_from_slice(&line);
                while batch.len() < 64 * 1024 {
                    match lines.try_recv() {
                        Ok(more) => batch.extend_from_slice(&more),
                        Err(_) => break,
                    }
                }
                match tokio::time::timeout(STALLED_CLIENT, to_client.write_all(&batch)).await {
                    Ok(Ok(())) => {}
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
