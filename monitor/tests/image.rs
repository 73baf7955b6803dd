//! The container image, loaded and run for real with podman: what `cargo xtask test` builds
//! into `target/package` (`cargo xtask package`) before the tests run. The container gets the
//! settings of deploy/kubernetes/daemonset.yaml, read from the manifest itself (its
//! capabilities, seccomp profile, mounts, environment, host network, not privileged), so the
//! manifest cannot drift from what was tested. Needs root, like the kernel tests.

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use common::tls::{https_get, Pki, PASSWORD, USER};
use common::{kernel_tests_enabled, parse_metrics, server_port, Metrics};
use yaml_rust2::{Yaml, YamlLoader};

fn workspace(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The image archive `cargo xtask test` built, and the name it loads under.
fn archive() -> Option<(PathBuf, String)> {
    let archive = common::artefact("_oci.tar")?;
    let file = archive.file_name().unwrap().to_str().unwrap();
    let version = file.strip_prefix("tcpmon_").unwrap().strip_suffix("_oci.tar").unwrap();
    Some((archive.clone(), format!("localhost/tcpmon:{version}")))
}

/// podman with the settings our machines need (deploy/container/containers.conf).
fn podman(args: &[&str]) -> Command {
    let mut command = Command::new("podman");
    command.args(args).env("CONTAINERS_CONF", workspace("deploy/container/containers.conf"));
    command
}

fn output(command: &mut Command) -> (bool, String) {
    let out = command.output().expect("running podman");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The label of every container these tests start: a run that was killed leaves some behind,
/// which the next run removes.
const TEST_LABEL: &str = "tcpmon-image-test";

/// What a killed run of these tests left: its containers, and its tracefs mounts.
fn remove_leftovers() {
    let filter = format!("label={TEST_LABEL}");
    let (_, ids) = output(&mut podman(&["ps", "--all", "--quiet", "--filter", &filter]));
    for id in ids.split_whitespace() {
        let _ = output(&mut podman(&["rm", "--force", id]));
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let prefix = std::env::temp_dir().join("tcpmon-tracefs-");
    let prefix = prefix.to_string_lossy();
    for mount_point in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)) {
        if mount_point.starts_with(prefix.as_ref()) {
            let _ = Command::new("umount").arg(mount_point).status();
            let _ = std::fs::remove_dir(mount_point);
        }
    }
}

/// Loads the archive into podman's store once (as the README says: `podman load -i`), and
/// returns the image's name.
fn loaded_image() -> Option<String> {
    static LOADED: OnceLock<Option<String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let (archive, name) = archive()?;
            remove_leftovers();
            let (ok, log) = output(podman(&["load", "--input"]).arg(&archive));
            assert!(ok, "podman load: {log}");
            let (ok, log) = output(&mut podman(&["image", "exists", &name]));
            assert!(ok, "the archive did not load as {name}: {log}");
            Some(name)
        })
        .clone()
}

/// What differs on the test machine from a Kubernetes node.
struct Node {
    /// hostPath → the path here.
    host_paths: BTreeMap<&'static str, PathBuf>,
    /// `status.hostIP`.
    host_ip: &'static str,
    /// Environment variables set to another value (the port: 9979 may be taken here).
    env: BTreeMap<&'static str, String>,
    /// Secret name → a directory with its keys as files, as the kubelet mounts it.
    secrets: BTreeMap<&'static str, PathBuf>,
    /// The CA that signed the web certificate in the secret `tcpmon-web`.
    pki: Pki,
    _secrets: tempdir::Dir,
    _tracefs: Tracefs,
    _pod_logs: tempdir::Dir,
}

/// A tracefs mounted for the test (the machine has none mounted), unmounted on drop.
struct Tracefs(PathBuf);

impl Drop for Tracefs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let path = std::env::temp_dir().join(format!("tcpmon-{tag}"));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Node {
    fn here(metrics_port: u16) -> Node {
        let tag = format!("{}-{metrics_port}", std::process::id());
        let tracefs = std::env::temp_dir().join(format!("tcpmon-tracefs-{tag}"));
        std::fs::create_dir_all(&tracefs).unwrap();
        let mounted = Command::new("mount").args(["-t", "tracefs", "nodev"]).arg(&tracefs).status();
        let tracefs = Tracefs(tracefs); // unmounted on drop from here on, even on a panic
        assert!(mounted.unwrap().success(), "mounting tracefs at {}", tracefs.0.display());
        let pod_logs = tempdir::Dir::new(&format!("pod-logs-{tag}"));
        // The Secret the README tells operators to create: web.yml, tls.crt, tls.key.
        let secrets = tempdir::Dir::new(&format!("secrets-{tag}"));
        let pki = Pki::new(&secrets.0.join("pki"));
        let secret = secrets.0.join("tcpmon-web");
        std::fs::create_dir_all(&secret).unwrap();
        std::fs::copy(pki.dir.join("server.pem"), secret.join("tls.crt")).unwrap();
        std::fs::copy(pki.dir.join("server.key"), secret.join("tls.key")).unwrap();
        let web = common::tls::web_config_text("tls.crt", "tls.key", "");
        std::fs::write(secret.join("web.yml"), web).unwrap();
        // The node's cgroup2 tree: /sys/fs/cgroup, or its `unified` mount on a hybrid host
        // like ours (the manifest's comment says to mount that there).
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let cgroup2 = mounts
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.get(2) == Some(&"cgroup2"))
            .map(|f| PathBuf::from(f[1]))
            .expect("a cgroup2 mount");
        Node {
            host_paths: BTreeMap::from([
                ("/sys/kernel/tracing", tracefs.0.clone()),
                ("/sys/fs/cgroup", cgroup2),
                ("/var/log/pods", pod_logs.0.clone()),
            ]),
            host_ip: "127.0.0.1",
            env: BTreeMap::from([("TCPMON_LISTEN", format!("127.0.0.1:{metrics_port}"))]),
            secrets: BTreeMap::from([("tcpmon-web", secret)]),
            pki,
            _secrets: secrets,
            _tracefs: tracefs,
            _pod_logs: pod_logs,
        }
    }
}

/// The DaemonSet's container, as `podman run` flags and the arguments after the image.
struct Container {
    flags: Vec<String>,
    args: Vec<String>,
    image: String,
}

fn push(flags: &mut Vec<String>, flag: &str, value: String) {
    flags.extend([flag.to_owned(), value]);
}

fn strings(yaml: &Yaml) -> Vec<String> {
    yaml.as_vec().into_iter().flatten().filter_map(|s| s.as_str()).map(str::to_owned).collect()
}

/// The pod and container settings the translation reproduces, and those it leaves out because
/// they concern Kubernetes only (scheduling, probes, port declarations). Any other key fails
/// the test, so a new setting cannot go untested by accident.
const POD_KEYS: &[&str] =
    &["hostNetwork", "hostPID", "automountServiceAccountToken", "containers", "volumes"];
const POD_KEYS_NOT_REPRODUCED: &[&str] = &["terminationGracePeriodSeconds", "tolerations"];
const CONTAINER_KEYS: &[&str] =
    &["name", "image", "args", "env", "securityContext", "volumeMounts", "resources"];
const CONTAINER_KEYS_NOT_REPRODUCED: &[&str] =
    &["imagePullPolicy", "ports", "readinessProbe", "livenessProbe"];
const SECURITY_KEYS: &[&str] = &[
    "privileged",
    "allowPrivilegeEscalation",
    "readOnlyRootFilesystem",
    "runAsUser",
    "capabilities",
    "seccompProfile",
];

/// Fails on a key of `map` in neither list.
fn known_keys(what: &str, map: &Yaml, reproduced: &[&str], left_out: &[&str]) {
    let keys = map.as_hash().map(|h| h.keys().cloned().collect::<Vec<_>>()).unwrap_or_default();
    for key in keys {
        let key = key.as_str().unwrap_or_default().to_owned();
        assert!(
            reproduced.contains(&key.as_str()) || left_out.contains(&key.as_str()),
            "{what}.{key}: a setting the image test does not reproduce; teach it"
        );
    }
}

/// Translates the manifest's pod spec into podman flags, failing on any setting it does not
/// know (so a new setting cannot go untested by accident).
fn daemonset_container(node: &Node) -> Container {
    let text = std::fs::read_to_string(workspace("deploy/kubernetes/daemonset.yaml")).unwrap();
    let docs = YamlLoader::load_from_str(&text).unwrap();
    let pod = &docs[0]["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    known_keys("spec", pod, POD_KEYS, POD_KEYS_NOT_REPRODUCED);
    known_keys("container", container, CONTAINER_KEYS, CONTAINER_KEYS_NOT_REPRODUCED);
    known_keys("securityContext", &container["securityContext"], SECURITY_KEYS, &[]);
    assert_eq!(pod["containers"].as_vec().map(Vec::len), Some(1), "one container");
    let mut flags: Vec<String> = Vec::new();

    match pod["hostNetwork"].as_bool() {
        Some(true) => push(&mut flags, "--network", "host".into()),
        other => panic!("the test reproduces host-network pods only, not hostNetwork {other:?}"),
    }
    if pod["hostPID"].as_bool() == Some(true) {
        push(&mut flags, "--pid", "host".into());
    }
    // podman mounts no service-account token, as the manifest asks: with the key absent or
    // true, Kubernetes would mount one that this test could not reproduce.
    assert_eq!(
        pod["automountServiceAccountToken"].as_bool(),
        Some(false),
        "the pod never talks to the API server: it must not carry a token"
    );
    let security = &container["securityContext"];
    assert_eq!(security["privileged"].as_bool(), Some(false), "the pod must not be privileged");
    if security["readOnlyRootFilesystem"].as_bool() == Some(true) {
        // As Kubernetes does it: no tmpfs on /run, /tmp and /var/tmp unless the pod asks.
        flags.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
    }
    if security["allowPrivilegeEscalation"].as_bool() == Some(false) {
        push(&mut flags, "--security-opt", "no-new-privileges".into());
    }
    if let Some(uid) = security["runAsUser"].as_i64() {
        push(&mut flags, "--user", uid.to_string());
    }
    for cap in strings(&security["capabilities"]["drop"]) {
        push(&mut flags, "--cap-drop", cap);
    }
    for cap in strings(&security["capabilities"]["add"]) {
        push(&mut flags, "--cap-add", cap);
    }
    let seccomp = &security["seccompProfile"];
    match seccomp["type"].as_str() {
        Some("Localhost") => {
            // Relative to the kubelet's seccomp root; the file ships beside the manifest.
            let profile = seccomp["localhostProfile"].as_str().unwrap();
            let file = workspace("deploy/kubernetes").join(Path::new(profile).file_name().unwrap());
            assert!(file.is_file(), "{} is not shipped", file.display());
            push(&mut flags, "--security-opt", format!("seccomp={}", file.display()));
        }
        Some("RuntimeDefault") | None => {}
        other => panic!("seccompProfile {other:?}"),
    }
    if let Some(memory) = container["resources"]["limits"]["memory"].as_str() {
        push(&mut flags, "--memory", memory.trim_end_matches('i').to_lowercase());
    }

    let volumes = pod["volumes"].as_vec().unwrap();
    for mount in container["volumeMounts"].as_vec().unwrap() {
        let name = mount["name"].as_str().unwrap();
        let target = mount["mountPath"].as_str().unwrap();
        let volume = volumes.iter().find(|v| v["name"].as_str() == Some(name)).unwrap();
        let read_only = mount["readOnly"].as_bool() == Some(true);
        if let Some(path) = volume["hostPath"]["path"].as_str() {
            let here = node.host_paths.get(path).unwrap_or_else(|| panic!("hostPath {path}"));
            let options = if read_only { ":ro" } else { "" };
            push(&mut flags, "--volume", format!("{}:{target}{options}", here.display()));
        } else if volume["emptyDir"].as_hash().is_some() {
            push(&mut flags, "--mount", format!("type=tmpfs,destination={target}"));
        } else if let Some(secret) = volume["secret"]["secretName"].as_str() {
            // The kubelet mounts a Secret read-only whatever the mount says.
            let here = node.secrets.get(secret).unwrap_or_else(|| panic!("secret {secret}"));
            push(&mut flags, "--volume", format!("{}:{target}:ro", here.display()));
        } else {
            panic!("volume {name}: only hostPath, emptyDir and secret are reproduced");
        }
    }

    // Kubernetes expands $(NAME) from the variables before it.
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container["env"].as_vec().into_iter().flatten() {
        let name = var["name"].as_str().unwrap().to_owned();
        let value = if let Some(value) = var["value"].as_str() {
            env.iter().fold(value.to_owned(), |v, (n, x)| v.replace(&format!("$({n})"), x))
        } else {
            let field = var["valueFrom"]["fieldRef"]["fieldPath"].as_str();
            assert_eq!(field, Some("status.hostIP"), "env {name}");
            node.host_ip.to_owned()
        };
        env.push((name, value));
    }
    for (name, value) in &env {
        let value = node.env.get(name.as_str()).unwrap_or(value);
        push(&mut flags, "--env", format!("{name}={value}"));
    }
    Container {
        flags,
        args: strings(&container["args"]),
        image: container["image"].as_str().unwrap().to_owned(),
    }
}

/// GET /metrics as Prometheus does with the DaemonSet: over TLS, with basic auth.
fn scrape(node: &Node, port: u16) -> Metrics {
    let address = ([127, 0, 0, 1], port).into();
    let answer = https_get(address, node.pki.client(false), "/metrics", Some((USER, PASSWORD)));
    let answer = answer.expect("GET /metrics");
    assert_eq!(answer.status, 200, "{}", answer.head);
    parse_metrics(&answer.body)
}

/// The readiness probe as the kubelet sends it (its scheme from the manifest, no
/// credentials): whether it got 200.
fn probe(node: &Node, port: u16) -> bool {
    let text = std::fs::read_to_string(workspace("deploy/kubernetes/daemonset.yaml")).unwrap();
    let docs = YamlLoader::load_from_str(&text).unwrap();
    let probe = &docs[0]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"];
    assert_eq!(probe["scheme"].as_str(), Some("HTTPS"), "the endpoint serves TLS");
    let path = probe["path"].as_str().unwrap();
    let address = ([127, 0, 0, 1], port).into();
    https_get(address, node.pki.client(false), path, None).is_ok_and(|a| a.status == 200)
}

/// The sum of `family` over the series with every one of `labels`.
fn sum(m: &Metrics, family: &str, labels: &[String]) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(&format!("{family}{{")))
        .filter(|(k, _)| labels.iter().all(|l| k.contains(l.as_str())))
        .map(|(_, v)| v)
        .sum()
}

/// The loaded BPF programs: id and name.
/// A container removed (forcibly, if still running) on drop: a failed test leaves no daemon.
struct Running(String);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = output(&mut podman(&["rm", "--force", &self.0]));
    }
}

#[test]
fn the_image_runs_with_the_daemonsets_settings_counts_exactly_and_detaches_on_stop() {
    // Alone: it counts programs loaded while it runs, and the host's connections on its port.
    let _host = common::exclusive();
    if !kernel_tests_enabled() {
        return;
    }
    let Some(image) = loaded_image() else { return };
    let metrics_port = common::free_port();
    let node = Node::here(metrics_port);
    let container = daemonset_container(&node);
    assert_eq!(container.image, image, "the DaemonSet must name the image the archive loads as");

    // `check` passes under exactly those settings, its trial load included.
    let (ok, report) = output(
        podman(&["run", "--rm", "--label", TEST_LABEL])
            .args(&container.flags)
            .args([&image, "check"]),
    );
    assert!(ok, "tcpmon check in the container:\n{report}");
    assert!(report.contains("trial load") && !report.contains("FAIL"), "{report}");

    let name = format!("tcpmon-image-test-{}", std::process::id());
    let before_start = common::bpf_program_ids();
    let (ok, log) = output(
        podman(&["run", "--detach", "--name", &name, "--label", TEST_LABEL])
            .args(&container.flags)
            .arg(&image)
            .args(&container.args),
    );
    assert!(ok, "podman run: {log}");
    let _running = Running(name.clone());
    let stop = |name: &str| output(&mut podman(&["stop", "--time", "10", name]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !probe(&node, metrics_port) {
        if Instant::now() > deadline {
            let (_, logs) = output(&mut podman(&["logs", &name]));
            let _ = stop(&name);
            panic!("the container did not serve /healthz within 30 s:\n{logs}");
        }
        thread::sleep(Duration::from_millis(100));
    }
    // The programs it attached: those loaded since, under our programs' names (bpftool here
    // cannot show which process holds a program).
    let ours = common::our_programs_since(&before_start);

    // Loopback connections of our own, IPv4 and IPv6, to a port the daemon saw start listening
    // (so it has a `port` value of its own), counted exactly on both sides.
    let port = server_port();
    let v4 = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let v6 = TcpListener::bind(("::1", port)).unwrap();
    thread::sleep(Duration::from_millis(300)); // the listens reach the daemon first
    let before = scrape(&node, metrics_port);
    common::echo_exchanges(&v4, 4);
    common::echo_exchanges(&v6, 3);
    let on_port = format!("port=\"{port}\"");
    let count = |m: &Metrics, family: &str, side: &str| {
        sum(m, family, &[on_port.clone(), format!("side=\"{side}\"")])
    };
    let settle = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let m = scrape(&node, metrics_port);
        let closed = count(&m, "tcpmon_connections_closed_total", "passive")
            - count(&before, "tcpmon_connections_closed_total", "passive");
        if closed >= 7.0 || Instant::now() > settle {
            break m;
        }
        thread::sleep(Duration::from_millis(100));
    };
    for family in ["tcpmon_connections_opened_total", "tcpmon_connections_closed_total"] {
        for side in ["active", "passive"] {
            let seen = count(&after, family, side) - count(&before, family, side);
            assert_eq!(seen, 7.0, "{family}{{side={side}}} on port {port}");
        }
    }
    assert_eq!(after.get("tcpmon_events_lost_total"), Some(&0.0));
    // The kernel state (TIME_WAIT, listen queues, TcpExt) is the node's, read without
    // CAP_SYS_ADMIN: the daemon's own namespace needs no setns().
    assert_eq!(after.get("tcpmon_kernel_state_read_errors_total"), Some(&0.0));
    let queue = format!("tcpmon_listen_queue_limit{{{on_port}}}");
    assert!(after.get(&queue).is_some_and(|&limit| limit > 0.0), "no {queue}");
    // Least privilege under the pod's capabilities: after start-up CAP_PERFMON is gone from
    // every thread, and CAP_BPF from all but the kernel reader, which keeps it only on kernels
    // that want it for every bpf() call (before 6.5).
    let (ok, pid) = output(&mut podman(&["inspect", "--format", "{{.State.Pid}}", &name]));
    assert!(ok, "podman inspect: {pid}");
    let pid: u32 = pid.trim().parse().unwrap();
    let threads = common::thread_capabilities_in(Path::new("/proc"), pid);
    common::assert_least_privilege(&threads, &[0, common::CAP_BPF]);

    // SIGTERM (podman stop): a clean exit, and every program the daemon held is gone.
    let (ok, log) = stop(&name);
    assert!(ok, "podman stop: {log}");
    let (_, code) = output(&mut podman(&["inspect", "--format", "{{.State.ExitCode}}", &name]));
    let (_, logs) = output(&mut podman(&["logs", &name]));
    assert_eq!(code.trim(), "0", "the daemon's exit code after SIGTERM; its log:\n{logs}");
    assert!(!logs.contains("snapshot incomplete"), "the start-up snapshot failed:\n{logs}");
    common::assert_unloaded(&ours, "after the container stopped");
}

#[test]
fn the_runtimes_default_seccomp_profile_fails_with_a_message_naming_seccomp() {
    let _host = common::exclusive(); // its trial loads would show in the other test's count
    if !kernel_tests_enabled() {
        return;
    }
    let Some(image) = loaded_image() else { return };
    let node = Node::here(common::free_port());
    let mut flags = daemonset_container(&node).flags;
    // The same settings with the runtime's own profile (containers-common's here).
    let at = flags.iter().position(|f| f.starts_with("seccomp=")).expect("a seccomp profile");
    flags.drain(at - 1..=at);
    let (ok, report) = output(
        podman(&["run", "--rm", "--label", TEST_LABEL]).args(&flags).args([&image, "check"]),
    );
    assert!(!ok, "check passed under the default seccomp profile:\n{report}");
    let failed = report.lines().find(|l| l.starts_with("FAIL")).unwrap_or_default();
    assert!(
        failed.contains("trial load") && failed.contains("seccomp"),
        "the failure must name seccomp:\n{report}"
    );
}

/// The shipped profile is the runtime's default with bpf() and perf_event_open() allowed for
/// CAP_BPF and CAP_PERFMON, and nothing else changed (checked where containers-common's
/// default is installed, as on the test machines).
#[test]
fn the_shipped_seccomp_profile_is_the_runtime_default_plus_bpf_and_perf_event_open() {
    // The profile was made from this version's default; another version's may differ for
    // reasons of its own (then regenerate the profile: README, "A container image").
    const BASELINE: &str = "0.50.1+ds1-4";
    let default = Path::new("/usr/share/containers/seccomp.json");
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", "golang-github-containers-common"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !default.exists() || installed != BASELINE {
        eprintln!(
            "SKIPPED: the profile was made from containers-common {BASELINE}'s default; this \
             machine has {installed:?}"
        );
        return;
    }
    let read = |path: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let mut ours = read(&workspace("deploy/kubernetes/tcpmon-seccomp.json"));
    let theirs = read(default);
    let rules = ours["syscalls"].as_array_mut().unwrap();
    let added: Vec<serde_json::Value> = rules.split_off(rules.len() - 2);
    for (rule, (syscall, cap)) in
        added.iter().zip([("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")])
    {
        assert_eq!(rule["names"], serde_json::json!([syscall]));
        assert_eq!(rule["action"], "SCMP_ACT_ALLOW");
        assert_eq!(rule["includes"]["caps"], serde_json::json!([cap]));
    }
    // Put them back where the default refuses them without CAP_SYS_ADMIN; then the two match.
    for rule in rules.iter_mut() {
        if rule["action"] == "SCMP_ACT_ERRNO"
            && rule["excludes"]["caps"] == serde_json::json!(["CAP_SYS_ADMIN"])
        {
            let names = rule["names"].as_array_mut().unwrap();
            names.extend([serde_json::json!("bpf"), serde_json::json!("perf_event_open")]);
            names.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
            rule["comment"] = serde_json::json!("");
        }
    }
    assert_eq!(
        ours, theirs,
        "the profile differs from the runtime default in more than bpf and perf_event_open"
    );
}
