//! The metrics endpoint as a neighbour meets it: TLS, basic auth, mTLS, certificate
//! rotation, a broken web config at start and at runtime, and the connection cap. These
//! run the real server (`monitor::web::serve`, or the binary) over real sockets; no kernel
//! program is needed.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::tls::{https_get, Pki, PASSWORD, USER};
use monitor::metrics::ScrapeGate;
use monitor::web::active::ActiveConfig;
use monitor::web::{self, Guard, Health, HttpMetrics};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tcpmon-web-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Serves a registry with `tcpmon_test_total 7` on its own runtime thread, guarded by the
/// web config at `config` (none: plain HTTP) and the cap; returns the address.
fn serve(config: Option<&Path>, max_connections: usize) -> SocketAddr {
    let (active, sources) = match config {
        Some(path) => {
            let (active, sources) = ActiveConfig::load(path).unwrap();
            (active, Some(sources))
        }
        None => (ActiveConfig::open(), None),
    };
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let registry = prometheus::Registry::new();
            let counter = prometheus::IntCounter::new("tcpmon_test_total", "A test.").unwrap();
            counter.inc_by(7);
            registry.register(Box::new(counter)).unwrap();
            let listener = web::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            sender.send(listener.local_addr().unwrap()).unwrap();
            if let Some(sources) = sources {
                tokio::spawn(active.clone().watch(sources));
            }
            let health: Health = Arc::new(|| Ok(()));
            let metrics = HttpMetrics::new(&registry).unwrap();
            let guard = Guard { config: active, max_connections, metrics };
            let unguarded = prometheus::Registry::new();
            web::serve(listener, registry, unguarded, ScrapeGate::default(), health, guard).await;
        });
    });
    receiver.recv().unwrap()
}

/// A plain-HTTP GET on a new connection: the status and the whole response.
fn plain_get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    (text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0), text)
}

#[test]
fn over_tls_only_the_configured_user_reads_the_metrics_and_healthz_stays_open() {
    let pki = Pki::new(&temp_dir("auth"));
    let config =
        pki.web_config("http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n");
    let address = serve(Some(&config), 40);
    let client = pki.client(false);

    let ok = https_get(address, client.clone(), "/metrics", Some((USER, PASSWORD))).unwrap();
    assert_eq!(ok.status, 200, "{}", ok.head);
    assert!(ok.body.contains("tcpmon_test_total 7"), "{}", ok.body);
    assert!(ok.head.contains("x-content-type-options: nosniff"), "{}", ok.head);

    for credentials in [None, Some((USER, "wrong")), Some(("nobody", PASSWORD))] {
        let refused = https_get(address, client.clone(), "/metrics", credentials).unwrap();
        assert_eq!(refused.status, 401, "{credentials:?}");
        assert!(refused.head.contains("www-authenticate: basic"), "{}", refused.head);
        assert!(!refused.body.contains("tcpmon_test_total"), "{}", refused.body);
    }
    let probe = https_get(address, client, "/healthz", None).unwrap();
    assert_eq!(probe.status, 200, "a kubelet probe needs no credentials");

    // Plain HTTP to the TLS listener gets no metrics.
    let (status, text) = plain_get(address, "/metrics");
    assert!(status != 200 && !text.contains("tcpmon_test_total"), "{status}: {text}");
    // The endpoint counts what it refused (a body newer than the shared one's second).
    std::thread::sleep(Duration::from_millis(1100));
    let counted = https_get(address, pki.client(false), "/metrics", Some((USER, PASSWORD)));
    let body = counted.unwrap().body;
    assert!(
        body.contains("tcpmon_http_rejected_requests_total{reason=\"unauthorized\"} 3"),
        "{body}"
    );
    assert!(body.contains("tcpmon_http_tls_handshake_failures_total 1"), "{body}");
}

#[test]
fn with_mtls_a_client_without_a_certificate_is_refused() {
    let pki = Pki::new(&temp_dir("mtls"));
    let config = pki
        .web_config("  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n");
    let address = serve(Some(&config), 40);
    let anonymous = https_get(address, pki.client(false), "/metrics", Some((USER, PASSWORD)));
    assert!(
        anonymous.as_ref().map(|a| a.status != 200).unwrap_or(true),
        "a client without a certificate got {:?}",
        anonymous.map(|a| a.status)
    );
    let known = https_get(address, pki.client(true), "/metrics", Some((USER, PASSWORD))).unwrap();
    assert_eq!(known.status, 200, "{}", known.head);
}

#[test]
fn a_rotated_certificate_is_served_without_a_restart_and_a_broken_file_keeps_the_last_good() {
    let pki = Pki::new(&temp_dir("rotate"));
    let config = pki.web_config("");
    let address = serve(Some(&config), 40);
    let first = https_get(address, pki.client(false), "/healthz", None).unwrap().certificate;
    assert_eq!(first, common::tls::pem_certificate(&pki.dir.join("server.pem")));

    let rotated = pki.issue("server", &["127.0.0.1", "localhost"]);
    assert_ne!(rotated, first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let served = https_get(address, pki.client(false), "/healthz", None).unwrap().certificate;
        if served == rotated {
            break;
        }
        assert!(Instant::now() < deadline, "the new certificate was never served");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A broken file: the last good configuration stays in force.
    std::fs::write(&config, "tls_server_config:\n  cert_file: [oops\n").unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let still = https_get(address, pki.client(false), "/metrics", Some((USER, PASSWORD))).unwrap();
    assert_eq!((still.status, still.certificate), (200, rotated));
}

#[test]
fn a_broken_web_config_at_start_exits_2_naming_the_key() {
    let dir = temp_dir("broken");
    let pki = Pki::new(&dir);
    let cases = [
        ("tls_server_config:\n  cert_file: missing.pem\n  key_file: server.key\n", "tls_server_config.cert_file"),
        ("tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  min_version: TLS14\n", "tls_server_config.min_version"),
        ("basic_auth_users:\n  prometheus: plaintext\n", "basic_auth_users.prometheus"),
        ("tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  client_auth_type: RequireAnyClientCert\n", "tls_server_config.client_auth_type"),
        ("http_server_config:\n  headers:\n    Server: x\n", "http_server_config.headers.Server"),
        ("tls_config:\n  cert_file: server.pem\n", "tls_config"),
    ];
    for (text, key) in cases {
        let path = pki.dir.join("bad.yml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_tcpmon"))
            .args(["run", "--listen", "127.0.0.1:0", "--tail-socket"])
            .arg(dir.join("tail.sock"))
            .arg("--web-config")
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {stderr}");
        assert!(stderr.contains(key) && stderr.contains("bad.yml"), "{key}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn beyond_the_connection_cap_healthz_answers_metrics_get_503_and_idle_slots_are_taken() {
    let address = serve(None, 2);
    // Two connections take the full slots (held open, idle).
    let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(address).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let (status, text) = plain_get(address, "/metrics");
    assert_eq!(status, 503, "{text}");
    assert!(text.to_lowercase().contains("retry-after: 1"), "{text}");
    assert_eq!(plain_get(address, "/healthz").0, 200);
    // An overflow connection gets one answer within its short life, not a slot.
    let mut idle = TcpStream::connect(address).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut buffer = [0u8; 16];
    assert_eq!(idle.read(&mut buffer).unwrap_or(0), 0, "closed without an answer");
    assert!(started.elapsed() < Duration::from_secs(4), "held {:?}", started.elapsed());
    // The held connections have now waited over a second for a request: a newcomer takes
    // the longest-waiting one's slot, so idle or slow clients cannot keep a scraper out.
    let (status, text) = plain_get(address, "/metrics");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("tcpmon_test_total 7"));
    let closed = held
        .iter()
        .filter(|stream| {
            stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            matches!((&mut &**stream).read(&mut [0u8; 16]), Ok(0))
        })
        .count();
    assert_eq!(closed, 1, "exactly one held connection gave its slot up");
    assert!(text.contains("tcpmon_http_evictions_total 1"), "{text}");
    assert!(
        text.contains("tcpmon_http_rejected_requests_total{reason=\"overloaded\"} 1"),
        "{text}"
    );
}

#[test]
fn a_client_that_only_probes_healthz_cannot_hold_a_slot_against_a_scraper() {
    let address = serve(None, 1);
    // One kept-alive connection asking /healthz every 300 ms takes the only slot.
    let mut prober = TcpStream::connect(address).unwrap();
    prober.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        prober.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut answer = [0u8; 256];
        assert!(prober.read(&mut answer).unwrap() > 0, "the prober is answered");
        std::thread::sleep(Duration::from_millis(300));
    }
    // Probes are not requests a slot is kept for: a scraper takes it.
    let (status, text) = plain_get(address, "/metrics");
    assert_eq!(status, 200, "{text}");
    let mut rest = Vec::new();
    let _ = prober.read_to_end(&mut rest);
    assert!(
        prober.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").is_err() || {
            let mut answer = [0u8; 16];
            matches!(prober.read(&mut answer), Ok(0) | Err(_))
        },
        "the prober's connection was closed"
    );
}
