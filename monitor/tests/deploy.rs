//! The operator's world, for real: promtool on our rules and on our live /metrics, a real
//! Prometheus scraping a real daemon while the test makes traffic, every Grafana query
//! evaluated by that Prometheus, and the systemd and Kubernetes manifests checked.
//! `cargo xtask setup` installs Debian's prometheus package (promtool included).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::tls::{https_get, Pki, PASSWORD, USER};
use common::{exchange_with_slow_close, kernel_tests_enabled, server_port, Daemon, Secured};
use serde_json::Value;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(path)
}

fn tool(name: &str) -> String {
    let found = Command::new("sh").args(["-c", &format!("command -v {name}")]).output().unwrap();
    assert!(
        found.status.success(),
        "{name} is missing: run `cargo xtask setup` (Debian package prometheus)"
    );
    name.to_owned()
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    let dir = deploy("prometheus");
    let check = Command::new(tool("promtool"))
        .args(["check", "rules", "tcpmon-rules.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let test = Command::new("promtool")
        .args(["test", "rules", "tcpmon-rules.test.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
    assert!(test.status.success() && out.contains("SUCCESS"), "{out}");
    let config = Command::new("promtool")
        .args(["check", "config", "scrape.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(config.status.success(), "{}", String::from_utf8_lossy(&config.stdout));
}

struct Prometheus {
    child: Child,
    address: String,
    _dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

fn http_get_once(address: &str, path_and_query: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path_and_query} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    // Prometheus answers with chunked encoding; the JSON is the one line that starts with '{'.
    let body = body.lines().find(|l| l.starts_with('{')).map(str::to_owned).unwrap_or(body);
    Ok((status, body))
}

/// GET with a few retries: both servers here may still be starting. Each retry is logged, so
/// a transient failure stays visible in the test output.
fn http_get(address: &str, path_and_query: &str) -> (u16, String) {
    for attempt in 1..=5 {
        match http_get_once(address, path_and_query) {
            Ok(response) => return response,
            Err(e) => {
                eprintln!("GET http://{address}{path_and_query} failed (attempt {attempt}): {e}");
                thread::sleep(Duration::from_millis(200));
            }
        }
    }
    panic!("GET http://{address}{path_and_query} failed 5 times");
}

fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Prometheus {
    /// A Prometheus scraping `target` every second; `job` is more of the job's settings
    /// (indented as its keys).
    fn start(target: &str, job: &str) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("tcpmon-prom-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(deploy("prometheus/tcpmon-rules.yml"), dir.join("tcpmon-rules.yml")).unwrap();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [tcpmon-rules.yml]\n\
                 scrape_configs:\n  - job_name: tcpmon\n{job}    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let address = format!("127.0.0.1:{}", server_port());
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={address}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus");
        let prometheus = Prometheus { child, address, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(&prometheus.address).is_err()
            || http_get(&prometheus.address, "/-/ready").0 != 200
        {
            assert!(Instant::now() < deadline, "prometheus did not become ready");
            thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    fn query(&self, query: &str) -> Value {
        let (status, body) =
            http_get(&self.address, &format!("/api/v1/query?query={}", encode(query)));
        let value: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{query}: {e}: {body}"));
        assert_eq!(status, 200, "{query}: {body}");
        assert_eq!(value["status"], "success", "{query}: {body}");
        value
    }

    /// The single value of an instant-vector query, if it has one sample.
    fn scalar(&self, query: &str) -> Option<f64> {
        let value = self.query(query);
        let result = value["data"]["result"].as_array()?;
        result.first()?["value"][1].as_str()?.parse().ok()
    }
}

/// Connections whose server waits 50 ms in CLOSE_WAIT: handshakes, teardowns and close-waits.
fn traffic(count: usize) {
    exchange_with_slow_close("127.0.0.1:0".parse().unwrap(), count, Duration::from_millis(50));
}

#[test]
fn a_real_prometheus_scrapes_tcpmon_and_answers_the_dashboard_queries() {
    let _host = common::exclusive();
    if !kernel_tests_enabled() {
        return;
    }
    // As a node exposes it: TLS and basic auth from a web config (monitor/tests/web.rs has
    // the refusals), which Prometheus speaks with its own tls_config and basic_auth.
    let dir = std::env::temp_dir().join(format!("tcpmon-deploy-tls-{}", std::process::id()));
    let pki = Pki::new(&dir);
    let web_config = pki.web_config("");
    let mut daemon = Daemon::start_secured(
        &["--web-config", web_config.to_str().unwrap()],
        Secured::for_pki(&pki),
    );
    // promtool's linter on our live exposition: it prints nothing when all is well.
    let address = daemon.metrics_address().to_string();
    let metrics =
        https_get(daemon.metrics_address(), pki.client(false), "/metrics", Some((USER, PASSWORD)))
            .unwrap()
            .body;
    traffic(3); // so histograms have samples to lint too
    let mut lint = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    lint.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let lint = lint.wait_with_output().unwrap();
    let problems = format!(
        "{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    assert!(
        lint.status.success() && problems.trim().is_empty(),
        "promtool check metrics: {problems}"
    );

    let job = format!(
        "    scheme: https\n    tls_config:\n      ca_file: {}\n    basic_auth:\n      \
         username: {USER}\n      password: {PASSWORD}\n",
        pki.dir.join("ca.pem").display()
    );
    let prometheus = Prometheus::start(&address, &job);
    let deadline = Instant::now() + Duration::from_secs(30);
    while prometheus.scalar("up{job=\"tcpmon\"}") != Some(1.0) {
        assert!(Instant::now() < deadline, "prometheus never scraped tcpmon");
        thread::sleep(Duration::from_millis(250));
    }
    let opened_before =
        prometheus.scalar("sum(tcpmon_connections_opened_total{side=\"active\"})").unwrap_or(0.0);
    // Traffic spread over several scrapes, so rate() has points to work with.
    for _ in 0..5 {
        traffic(10);
        thread::sleep(Duration::from_millis(700));
    }
    daemon.settled_scrape();
    thread::sleep(Duration::from_secs(2)); // at least one more scrape after the traffic

    let opened_after =
        prometheus.scalar("sum(tcpmon_connections_opened_total{side=\"active\"})").unwrap();
    assert!(opened_after - opened_before >= 50.0, "opened {opened_before} -> {opened_after}");
    let p99 = prometheus
        .scalar("histogram_quantile(0.99, sum by (le) (rate(tcpmon_handshake_duration_seconds_bucket{side=\"active\"}[30s])))")
        .expect("a p99 handshake latency");
    assert!(p99 > 0.0 && p99 < 0.025, "loopback handshake p99 {p99}");
    let close_wait = prometheus
        .scalar("histogram_quantile(0.5, sum by (le) (rate(tcpmon_close_wait_duration_seconds_bucket[30s])))")
        .expect("a median close-wait");
    assert!(
        (0.01..0.1).contains(&close_wait),
        "median close-wait {close_wait} (server waits 50 ms)"
    );
    // The recording rules load and evaluate in the real server.
    let (_, rules) = http_get(&prometheus.address, "/api/v1/rules");
    let rules: Value = serde_json::from_str(&rules).unwrap();
    let health: Vec<&str> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .map(|r| r["health"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(health.len(), 24, "{rules}");
    assert!(health.iter().all(|h| *h == "ok" || *h == "unknown"), "{health:?}");

    // Every query of the dashboard is valid PromQL that this Prometheus evaluates.
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/tcpmon.json")).unwrap())
            .unwrap();
    let mut evaluated = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$instance", ".*")
                .replace("$__rate_interval", "30s");
            prometheus.query(&expr);
            evaluated += 1;
        }
    }
    assert_eq!(evaluated, 43);
    // The per-service panels have data: the traffic's 50 accepted connections (five
    // servers, one port each), under ports and a workload that were found.
    let attributed = prometheus
        .scalar(
            "sum(tcpmon_connections_opened_total{side=\"passive\",port!~\"unknown|other\",\
             workload!~\"unknown|other\"})",
        )
        .unwrap_or(0.0);
    assert!(attributed >= 50.0, "attributed passive opens: {attributed}");
    let (status, stderr, _) = daemon.stop();
    assert!(status.success(), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let unit = std::fs::read_to_string(deploy("systemd/tcpmon.service")).unwrap();
    for required in [
        "ExecStart=/usr/local/bin/tcpmon run",
        "CapabilityBoundingSet=CAP_BPF CAP_PERFMON",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "RuntimeDirectory=tcpmon",
        "Environment=TCPMON_LISTEN=127.0.0.1:9979",
    ] {
        assert!(unit.contains(required), "missing {required}");
    }
    // systemd's own checker, with ExecStart pointed at the binary under test.
    let dir = std::env::temp_dir().join(format!("tcpmon-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("tcpmon.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/tcpmon", env!("CARGO_BIN_EXE_tcpmon")))
        .unwrap();
    let verify = Command::new(tool("systemd-analyze"))
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(verify.status.success() && out.trim().is_empty(), "systemd-analyze verify: {out}");
}

#[test]
fn the_kubernetes_manifest_runs_unprivileged_with_the_needed_capabilities() {
    use yaml_rust2::YamlLoader;
    let docs = YamlLoader::load_from_str(
        &std::fs::read_to_string(deploy("kubernetes/daemonset.yaml")).unwrap(),
    )
    .unwrap();
    let ds = &docs[0];
    assert_eq!(ds["apiVersion"].as_str(), Some("apps/v1"));
    assert_eq!(ds["kind"].as_str(), Some("DaemonSet"));
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    assert_eq!(
        &ds["spec"]["selector"]["matchLabels"], labels,
        "the selector must match the pod labels"
    );
    let pod = &ds["spec"]["template"]["spec"];
    // Host network: the kernel state it reads is the node's (the manifest says why).
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["privileged"].as_bool(), Some(false));
    assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true));
    let caps: Vec<&str> = security["capabilities"]["add"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert_eq!(caps, ["BPF", "PERFMON"]);
    assert_eq!(security["capabilities"]["drop"][0].as_str(), Some("ALL"));
    assert_eq!(container["ports"][0]["containerPort"].as_i64(), Some(9979));
    assert_eq!(container["readinessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    let env = container["env"].as_vec().unwrap();
    assert!(env.iter().any(|e| e["name"].as_str() == Some("TCPMON_LISTEN")));
    // Every volume mounted is declared.
    let volumes: Vec<&str> =
        pod["volumes"].as_vec().unwrap().iter().filter_map(|v| v["name"].as_str()).collect();
    for mount in container["volumeMounts"].as_vec().unwrap() {
        assert!(volumes.contains(&mount["name"].as_str().unwrap()), "{mount:?}");
    }
    let k8s = YamlLoader::load_from_str(
        &std::fs::read_to_string(deploy("prometheus/scrape-kubernetes.yml")).unwrap(),
    )
    .unwrap();
    assert_eq!(k8s[0]["scrape_configs"][0]["job_name"].as_str(), Some("tcpmon-kubernetes"));
}
