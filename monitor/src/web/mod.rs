//! The HTTP endpoint: `/metrics` and `/healthz`, for a port a neighbour can reach.
//!
//! - A scrape's cost does not grow with the number of scrapers: the encoded body is shared
//!   by every scrape until the next batch of records is applied (at most [`MAX_AGE`]), one
//!   scrape encodes while the others wait for its result, and the encoding runs on the
//!   blocking pool, so `/healthz` and the tail are never behind it. gzip when asked.
//! - Each connection has deadlines: its TLS handshake within [`HANDSHAKE_TIMEOUT`], its
//!   headers within [`HEADER_TIMEOUT`], each write within [`WRITE_TIMEOUT`] (a client that
//!   never reads is dropped), its whole life within [`CONNECTION_LIFETIME`]; a request is at
//!   most 64 KiB.
//! - At most `--web-max-connections` are served in full; a newcomer takes the slot of one
//!   that has waited over a second for its next request, else one of
//!   [`OVERFLOW_CONNECTIONS`] more slots gets one quick answer (`/healthz`, or 503), and
//!   beyond that a connection is closed ([`slots`]).
//! - `--web-config` adds TLS, basic auth, headers and a rate limit ([`config`]), re-read
//!   when its files change ([`active`]); `/healthz` stays open for probes.

pub mod active;
mod auth;
pub mod config;
mod slots;

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{
    HeaderValue, ACCEPT_ENCODING, ALLOW, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE,
    RETRY_AFTER, VARY, WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio::net::{TcpListener, TcpStream};
use tokio_io_timeout::TimeoutStream;
use tokio_rustls::TlsAcceptor;

use self::active::ActiveConfig;
use self::auth::{Authenticator, RateLimiter};
use self::config::WebConfig;
use self::slots::{Admission, SlotGuard, Slots};

use crate::exit::StartError;
use crate::metrics::{encode, registered, ScrapeGate};

/// Longest a body is served again while no batch changed it (the kernel state is read at most
/// once a second as well).
pub const MAX_AGE: Duration = Duration::from_secs(1);
/// A client's request headers must arrive within this, which is also the idle limit of a
/// kept-alive connection: above Prometheus's default 15 s interval, so scrapers keep theirs.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Each write must complete within this: a client that stops reading is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a connection lives, however it behaves.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// A TLS client must finish its handshake within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// `--web-max-connections` default: node_exporter's `--web.max-requests`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 40;
pub use slots::OVERFLOW_CONNECTIONS;
/// An overflow connection's whole life.
pub const OVERFLOW_LIFETIME: Duration = Duration::from_secs(2);

/// Whether the daemon is healthy (`/healthz`), and why not.
pub type Health = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// One encoded scrape.
struct Encoded {
    /// The batch generation it was read at.
    generation: u64,
    at: Instant,
    plain: Bytes,
    /// Compressed the first time someone asks.
    gzip: OnceLock<Bytes>,
}

/// What the connections share.
struct Endpoint {
    registry: Registry,
    unguarded: Registry,
    gate: ScrapeGate,
    health: Health,
    last: Mutex<Option<Arc<Encoded>>>,
    /// One encoding at a time; the others wait for its result.
    encoding: tokio::sync::Mutex<()>,
    authenticator: Arc<Authenticator>,
    limiter: RateLimiter,
    metrics: HttpMetrics,
}

impl Endpoint {
    /// The last body, if no batch has been applied since and it is young enough.
    fn fresh(&self) -> Option<Arc<Encoded>> {
        let last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        last.as_ref()
            .filter(|e| e.generation == self.gate.generation() && e.at.elapsed() < MAX_AGE)
            .cloned()
    }

    /// The body of a scrape: shared while fresh, else encoded once, off this worker.
    async fn body(self: &Arc<Self>) -> Arc<Encoded> {
        if let Some(fresh) = self.fresh() {
            return fresh;
        }
        let _only_one = self.encoding.lock().await;
        if let Some(fresh) = self.fresh() {
            return fresh; // encoded while this one waited
        }
        // Read before encoding: a batch applied meanwhile makes the next scrape encode anew.
        let generation = self.gate.generation();
        let endpoint = self.clone();
        let plain = tokio::task::spawn_blocking(move || {
            encode(&endpoint.registry, &endpoint.unguarded, &endpoint.gate)
        })
        .await
        .unwrap_or_else(|e| {
            warn!("encoding the metrics failed: {e}");
            Vec::new()
        });
        let encoded = Arc::new(Encoded {
            generation,
            at: Instant::now(),
            plain: Bytes::from(plain),
            gzip: OnceLock::new(),
        });
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(encoded.clone());
        encoded
    }
}

/// `body` gzip-compressed.
fn gzip(body: &[u8]) -> Bytes {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing to a Vec cannot fail.
    let _ = encoder.write_all(body);
    Bytes::from(encoder.finish().unwrap_or_default())
}

/// Whether a request accepts a gzip-encoded body.
fn accepts_gzip(request: &Request<Incoming>) -> bool {
    request
        .headers()
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default();
            let refused = parts.any(|p| p.replace(' ', "") == "q=0");
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

/// How the endpoint guards itself: its web configuration and connection cap.
#[derive(Clone)]
pub struct Guard {
    /// The web configuration in force (TLS, users, headers, rate limit).
    pub config: Arc<ActiveConfig>,
    /// Connections served in full at once ([`DEFAULT_MAX_CONNECTIONS`] by default).
    pub max_connections: usize,
    /// What it counts of its own work.
    pub metrics: HttpMetrics,
}

/// The endpoint's own counters: how connections were admitted and why requests were
/// refused, so a flood or a guessing neighbour shows on the dashboard.
#[derive(Clone)]
pub struct HttpMetrics {
    /// `[full, overflow, refused]`
    admitted: [IntCounter; 3],
    evicted: IntCounter,
    /// `[unauthorized, rate_limited, overloaded]`
    rejected: [IntCounter; 3],
    handshake_failures: IntCounter,
}

impl HttpMetrics {
    /// Registers the counters in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let vec = |name: &str, help: &str, label: &str| {
            registered(registry, IntCounterVec::new(Opts::new(name, help), &[label])?)
        };
        let admitted = vec(
            "tcpmon_http_connections_total",
            "Connections to the metrics endpoint, by the slot they got: full, overflow (one \
             quick answer: /healthz, else 503) or refused (closed: every slot taken).",
            "slot",
        )?;
        let rejected = vec(
            "tcpmon_http_rejected_requests_total",
            "Requests refused: unauthorized (401), rate_limited (429, the web config's \
             rate_limit), overloaded (503 on an overflow slot).",
            "reason",
        )?;
        Ok(HttpMetrics {
            admitted: ["full", "overflow", "refused"].map(|s| admitted.with_label_values(&[s])),
            evicted: registered(
                registry,
                IntCounter::new(
                    "tcpmon_http_evictions_total",
                    "Connections whose slot a newcomer took: they had waited over a second since \
                     their last authorized request was answered (idle, slow, or never asking).",
                )?,
            )?,
            rejected: ["unauthorized", "rate_limited", "overloaded"]
                .map(|r| rejected.with_label_values(&[r])),
            handshake_failures: registered(
                registry,
                IntCounter::new(
                    "tcpmon_http_tls_handshake_failures_total",
                    "TLS handshakes that failed or timed out (plain HTTP to the TLS port, a \
                     client without a trusted certificate under mTLS, …).",
                )?,
            )?,
        })
    }
}

/// Whether a connection has one of the full slots, or an overflow one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Full,
    /// Beyond `--web-max-connections`: one request within [`OVERFLOW_LIFETIME`], `/healthz`
    /// answered and anything else 503, so a flood cannot starve the kubelet's probes.
    Overflow,
}

/// Serves `/metrics` and `/healthz` until the task is dropped. Each connection is its own
/// task with its deadlines, so a slow or broken client delays nobody else.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    unguarded: Registry,
    gate: ScrapeGate,
    health: Health,
    guard: Guard,
) {
    let endpoint = Arc::new(Endpoint {
        registry,
        unguarded,
        gate,
        health,
        last: Mutex::new(None),
        encoding: tokio::sync::Mutex::new(()),
        authenticator: Arc::new(Authenticator::new()),
        limiter: RateLimiter::default(),
        metrics: guard.metrics.clone(),
    });
    let slots = Slots::new(guard.max_connections);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("accepting a metrics connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let admitted = &endpoint.metrics.admitted;
        let (slot, overflow) = match slots.admit() {
            Admission::Full(slot) => {
                admitted[0].inc();
                (Some(Arc::new(slot)), None)
            }
            Admission::Overflow(permit) => {
                admitted[1].inc();
                (None, Some(permit))
            }
            Admission::Refused => {
                admitted[2].inc();
                debug!("metrics connection from {peer} refused: every slot is taken");
                continue; // dropped: closed
            }
        };
        let endpoint = endpoint.clone();
        let config = guard.config.clone();
        tokio::spawn(async move {
            let lifetime = if slot.is_some() { CONNECTION_LIFETIME } else { OVERFLOW_LIFETIME };
            let evicted = slot.as_ref().map(|s| s.slot().clone());
            let endpoint_metrics = endpoint.metrics.clone();
            let served = tokio::time::timeout(lifetime, connection(stream, slot, config, endpoint));
            let outcome = match evicted {
                Some(evicted) => tokio::select! {
                    outcome = served => outcome,
                    () = evicted.evicted() => {
                        endpoint_metrics.evicted.inc();
                        Ok(Err("its slot went to a newcomer".to_owned()))
                    }
                },
                None => served.await,
            };
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!("metrics connection from {peer}: {e}"),
                Err(_) => debug!("metrics connection from {peer}: closed after its lifetime"),
            }
            drop(overflow);
        });
    }
}

/// One connection: its TLS handshake if configured, then HTTP/1.1 with its deadlines.
async fn connection(
    stream: TcpStream,
    slot: Option<Arc<SlotGuard>>,
    config: Arc<ActiveConfig>,
    endpoint: Arc<Endpoint>,
) -> Result<(), String> {
    let mut stream = TimeoutStream::new(stream);
    stream.set_write_timeout(Some(WRITE_TIMEOUT));
    stream.set_read_timeout(Some(HEADER_TIMEOUT));
    let stream = Box::pin(stream);
    // TLS is settled at the handshake; credentials, headers and the rate limit are read
    // per request, so a changed password applies to kept-alive connections too.
    let tls = config.current().tls.clone();
    match tls {
        Some(tls) => {
            let accepting = TlsAcceptor::from(tls).accept(stream);
            let handshake = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accepting).await {
                Ok(Ok(stream)) => Ok(stream),
                Ok(Err(e)) => Err(format!("TLS handshake: {e}")),
                Err(_) => Err("no TLS handshake in time".to_owned()),
            };
            if handshake.is_err() {
                endpoint.metrics.handshake_failures.inc();
            }
            let tls_stream = handshake?;
            http(tls_stream, slot, config, endpoint).await
        }
        None => http(stream, slot, config, endpoint).await,
    }
}

async fn http<IO>(
    io: IO,
    slot: Option<Arc<SlotGuard>>,
    config: Arc<ActiveConfig>,
    endpoint: Arc<Endpoint>,
) -> Result<(), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let class = if slot.is_some() { Class::Full } else { Class::Overflow };
    let service = hyper::service::service_fn(move |request| {
        let (endpoint, slot, config) = (endpoint.clone(), slot.clone(), config.current());
        async move {
            let mut response = match check(&request, class, &config, &endpoint).await {
                Verdict::Answer(response) => response.map(|body| Answer { body, slot: None }),
                Verdict::Serve { head } => {
                    // Busy until hyper has taken the whole body: the slot cannot be taken
                    // mid-answer. Only authorized requests count: a neighbour's probes or
                    // wrong passwords never keep a slot from someone who asks.
                    if let Some(slot) = &slot {
                        slot.slot().begin();
                    }
                    let path = request.uri().path();
                    let response = respond(&request, path, head, &endpoint).await;
                    response.map(|body| Answer { body, slot })
                }
            };
            response.headers_mut().extend(config.headers.iter().cloned());
            Ok::<_, Infallible>(response)
        }
    });
    let header_timeout = match class {
        Class::Full => HEADER_TIMEOUT,
        Class::Overflow => OVERFLOW_LIFETIME,
    };
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(class == Class::Full)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), service)
        .await
        .map_err(|e| e.to_string())
}

/// A response body that tells its connection's slot the request was answered once hyper
/// has taken all of it (or dropped it).
struct Answer {
    body: Full<Bytes>,
    slot: Option<Arc<SlotGuard>>,
}

impl Answer {
    fn finished(&mut self) {
        if let Some(slot) = self.slot.take() {
            slot.answered();
        }
    }
}

impl hyper::body::Body for Answer {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        let frame = std::pin::Pin::new(&mut self.body).poll_frame(context);
        if let std::task::Poll::Ready(None) = frame {
            self.finished();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.finished();
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// What the checks before a request decided.
enum Verdict {
    /// Answered by the checks themselves.
    Answer(Response<Full<Bytes>>),
    /// Authorized: serve it.
    Serve { head: bool },
}

/// The checks before a request is served: method, `/healthz` (open, so kubelet probes need
/// no credentials, and never rate-limited, so a neighbour cannot fail them), overflow,
/// rate limit, credentials.
async fn check(
    request: &Request<Incoming>,
    class: Class,
    config: &WebConfig,
    endpoint: &Arc<Endpoint>,
) -> Verdict {
    let head = request.method() == Method::HEAD;
    if request.method() != Method::GET && !head {
        let mut response =
            reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", Bytes::from_static(b"use GET\n"));
        response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Verdict::Answer(response);
    }
    if request.uri().path() == "/healthz" {
        return Verdict::Answer(match (endpoint.health)() {
            Ok(()) => reply(StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                Bytes::from(format!("{why}\n")),
            ),
        });
    }
    if class == Class::Overflow {
        let text = Bytes::from_static(b"too many connections; try again\n");
        let mut response = reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", text);
        response.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
        endpoint.metrics.rejected[2].inc();
        return Verdict::Answer(response);
    }
    if let Some(limit) = &config.rate_limit {
        if !endpoint.limiter.take(limit) {
            let text = Bytes::from_static(b"too many requests\n");
            endpoint.metrics.rejected[1].inc();
            return Verdict::Answer(reply(StatusCode::TOO_MANY_REQUESTS, "text/plain", text));
        }
    }
    if !config.users.is_empty()
        && !endpoint.authenticator.allows(&config.users, request.headers().get(AUTHORIZATION)).await
    {
        let text = Bytes::from_static(b"unauthorized\n");
        endpoint.metrics.rejected[0].inc();
        let mut response = reply(StatusCode::UNAUTHORIZED, "text/plain", text);
        let challenge = HeaderValue::from_static("Basic realm=\"tcpmon\", charset=\"UTF-8\"");
        response.headers_mut().insert(WWW_AUTHENTICATE, challenge);
        return Verdict::Answer(response);
    }
    Verdict::Serve { head }
}

async fn respond(
    request: &Request<Incoming>,
    path: &str,
    head: bool,
    endpoint: &Arc<Endpoint>,
) -> Response<Full<Bytes>> {
    match path {
        // HEAD says the metrics are there without the cost of reading them.
        "/metrics" if head => reply(StatusCode::OK, prometheus::TEXT_FORMAT, Bytes::new()),
        "/metrics" => {
            let encoded = endpoint.body().await;
            let mut response = if accepts_gzip(request) {
                let compressed = match encoded.gzip.get() {
                    Some(done) => done.clone(),
                    None => {
                        let shared = encoded.clone();
                        tokio::task::spawn_blocking(move || {
                            shared.gzip.get_or_init(|| gzip(&shared.plain)).clone()
                        })
                        .await
                        .unwrap_or_default()
                    }
                };
                let mut response = reply(StatusCode::OK, prometheus::TEXT_FORMAT, compressed);
                response.headers_mut().insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                response
            } else {
                reply(StatusCode::OK, prometheus::TEXT_FORMAT, encoded.plain.clone())
            };
            response.headers_mut().insert(VARY, HeaderValue::from_static("Accept-Encoding"));
            response
        }
        "/" => reply(
            StatusCode::OK,
            "text/html",
            Bytes::from_static(
                b"<html><body><h1>tcpmon</h1><p><a href=\"/metrics\">/metrics</a> \
                  <a href=\"/healthz\">/healthz</a></p></body></html>\n",
            ),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found; try /metrics\n"),
        ),
    }
}

/// Binds the metrics listener, with an error that says what to do when the port is taken.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(address).await.map_err(|source| match source.kind() {
        std::io::ErrorKind::AddrInUse => StartError::AddressInUse { address },
        _ => StartError::Listen { address, source },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server over a registry with one counter; returns its address, the counter and gate.
    async fn server() -> (SocketAddr, prometheus::IntCounter, ScrapeGate) {
        let registry = Registry::new();
        let counter = prometheus::IntCounter::new("tcpmon_test_total", "A test counter.").unwrap();
        registry.register(Box::new(counter.clone())).unwrap();
        let gate = ScrapeGate::default();
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let address = listener.local_addr().unwrap();
        let health: Health = Arc::new(|| Ok(()));
        let metrics = HttpMetrics::new(&Registry::new()).unwrap();
        let guard = Guard { config: ActiveConfig::open(), max_connections: 4, metrics };
        tokio::spawn(serve(listener, registry, Registry::new(), gate.clone(), health, guard));
        (address, counter, gate)
    }

    /// One request on a new connection: the response's head and body.
    async fn request(address: SocketAddr, method: &str, headers: &str) -> (String, Vec<u8>) {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let text =
            format!("{method} /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{headers}\r\n");
        stream.write_all(text.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&response[..split]).to_lowercase();
        (head, response[split + 4..].to_vec())
    }

    #[tokio::test]
    async fn scrapes_share_a_body_until_a_batch_is_applied() {
        let (address, counter, gate) = server().await;
        counter.inc();
        let (_, first) = request(address, "GET", "").await;
        assert!(String::from_utf8_lossy(&first).contains("tcpmon_test_total 1"));
        // Changed without a batch: the body is shared (no encoding per scraper).
        counter.inc();
        let (_, again) = request(address, "GET", "").await;
        assert_eq!(again, first);
        // A batch applied: the next scrape reads anew.
        drop(gate.hold_to_apply());
        let (_, after) = request(address, "GET", "").await;
        assert!(String::from_utf8_lossy(&after).contains("tcpmon_test_total 2"));
    }

    #[tokio::test]
    async fn gzip_when_asked_head_without_a_body_and_405_with_allow() {
        let (address, counter, _) = server().await;
        counter.inc_by(7);
        let (head, plain) = request(address, "GET", "").await;
        assert!(!head.contains("content-encoding"), "{head}");
        let (head, zipped) = request(address, "GET", "accept-encoding: gzip, deflate\r\n").await;
        assert!(head.contains("content-encoding: gzip"), "{head}");
        let mut unzipped = Vec::new();
        flate2::read::GzDecoder::new(&zipped[..]).read_to_end(&mut unzipped).unwrap();
        assert_eq!(unzipped, plain);
        let (_, refused) = request(address, "GET", "accept-encoding: gzip;q=0\r\n").await;
        assert_eq!(refused, plain, "q=0 refuses gzip");
        let (head, body) = request(address, "HEAD", "").await;
        assert!(head.starts_with("http/1.1 200") && body.is_empty(), "{head}");
        let (head, _) = request(address, "POST", "content-length: 0\r\n").await;
        assert!(head.starts_with("http/1.1 405") && head.contains("allow: get, head"), "{head}");
    }
}
