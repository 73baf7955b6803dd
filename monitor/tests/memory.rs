//! The socket cap of each shipped deployment fits its memory limit with margin: the pipeline
//! filled to that cap (the `fill` example: births that never close, a tenth more than the
//! cap, so eviction runs) peaks well below the limit, with room left for what the daemon holds
//! besides (its rings, HTTP and tail buffers, the start-up snapshot).
//!
//! The limits and caps are read from the shipped files themselves, so raising a cap or
//! lowering a limit without the other fails here.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What the daemon holds besides the pipeline: measured, the release daemon idles at 24 MiB
/// RSS with its rings (`--ring-bytes`, 8 MiB by default), HTTP and tail buffers; its start-up
/// peaks at 45 MiB while it parses the kernel's BTF, before any socket is tracked. Rounded
/// up.
const REST_OF_THE_DAEMON_KIB: u64 = 40 * 1024;
/// The share of a limit the daemon may reach at its cap.
const MARGIN: f64 = 0.8;

fn workspace(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The `fill` example `cargo test` built beside this test binary.
fn fill_example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let debug = exe.parent().and_then(Path::parent).unwrap();
    let fill = debug.join("examples/fill");
    assert!(fill.is_file(), "{} missing: `cargo test` builds the examples", fill.display());
    fill
}

/// Peak RSS (KiB) of the pipeline filled to `max_sockets`, and how many it held.
fn peak_at(max_sockets: usize) -> (u64, u64) {
    let out = Command::new(fill_example()).arg(max_sockets.to_string()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "fill: {text}{}", String::from_utf8_lossy(&out.stderr));
    let field = |key: &str| -> u64 {
        let prefix = format!("{key}=");
        text.split_whitespace()
            .find_map(|word| word.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no {key} in {text}"))
            .parse()
            .unwrap()
    };
    assert_eq!(field("undecodable"), 0, "{text}");
    (field("peak_rss_kib"), field("tracked"))
}

/// `512M` (systemd: powers of 1024) or `256Mi` (Kubernetes) in KiB.
fn kib(size: &str) -> u64 {
    let digits: String = size.chars().take_while(char::is_ascii_digit).collect();
    let number: u64 = digits.parse().unwrap();
    match &size[digits.len()..] {
        "M" | "Mi" => number * 1024,
        "G" | "Gi" => number * 1024 * 1024,
        other => panic!("unit {other:?} in {size}"),
    }
}

/// `(what, limit in KiB, socket cap)` of each shipped deployment.
fn shipped_limits() -> Vec<(&'static str, u64, usize)> {
    let unit = std::fs::read_to_string(workspace("deploy/systemd/tcpmon.service")).unwrap();
    let setting = |key: &str| unit.lines().find_map(|l| l.strip_prefix(key)).map(str::to_owned);
    let unit_limit = kib(&setting("MemoryMax=").expect("the unit sets MemoryMax="));
    let unit_cap = setting("Environment=TCPMON_MAX_SOCKETS=")
        .map_or(monitor::tracker::DEFAULT_MAX_SOCKETS, |cap| cap.parse().unwrap());

    let manifest = std::fs::read_to_string(workspace("deploy/kubernetes/daemonset.yaml")).unwrap();
    let docs = yaml_rust2::YamlLoader::load_from_str(&manifest).unwrap();
    let container = &docs[0]["spec"]["template"]["spec"]["containers"][0];
    let pod_limit = kib(container["resources"]["limits"]["memory"].as_str().unwrap());
    let pod_cap = container["env"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|var| var["name"].as_str() == Some("TCPMON_MAX_SOCKETS"))
        .map_or(monitor::tracker::DEFAULT_MAX_SOCKETS, |var| {
            var["value"].as_str().unwrap().parse().unwrap()
        });
    vec![("systemd unit", unit_limit, unit_cap), ("DaemonSet", pod_limit, pod_cap)]
}

/// The "pipeline peak" the README's memory table gives for deployment `what`, in MiB.
fn readme_peak_mib(what: &str) -> f64 {
    let readme = std::fs::read_to_string(workspace("README.md")).unwrap();
    let row = readme
        .lines()
        .find(|line| line.starts_with(&format!("| {what} |")))
        .unwrap_or_else(|| panic!("no row for {what} in the README's memory table"));
    let cell = row.split('|').nth(4).unwrap().trim();
    cell.trim_end_matches(" MiB").parse().unwrap_or_else(|_| panic!("peak {cell:?} in {row}"))
}

#[test]
fn each_shipped_socket_cap_fits_its_memory_limit_with_margin() {
    for (what, limit_kib, cap) in shipped_limits() {
        let (peak_kib, tracked) = peak_at(cap);
        // Eviction kept the table at its cap (it frees a batch at a time).
        assert!(tracked <= cap as u64 && tracked >= cap as u64 * 9 / 10, "{what}: {tracked}");
        let total = peak_kib + REST_OF_THE_DAEMON_KIB;
        println!(
            "{what}: --max-sockets {cap}: pipeline peak {} MiB, with the rest of the daemon \
             {} MiB, limit {} MiB",
            peak_kib / 1024,
            total / 1024,
            limit_kib / 1024
        );
        // The README's table gives this peak: it must still be what the code measures.
        let documented = readme_peak_mib(what);
        let measured = peak_kib as f64 / 1024.0;
        assert!(
            (documented - measured).abs() <= measured * 0.15,
            "README, \"Memory\": {what} peaks at {documented} MiB, measured {measured:.0} MiB"
        );
        assert!(
            total as f64 <= limit_kib as f64 * MARGIN,
            "{what}: {cap} sockets peak at {peak_kib} KiB (+{REST_OF_THE_DAEMON_KIB} KiB for the \
             rest of the daemon), over {MARGIN} of the {limit_kib} KiB limit"
        );
    }
}

#[test]
fn the_default_cap_would_not_fit_the_pod_and_a_larger_one_not_the_unit() {
    // The check above can fail: the DaemonSet's limit with the default cap, and the unit's
    // with twice the default, are over the margin.
    let limits = shipped_limits();
    let (_, pod_limit, _) = limits[1];
    let (peak, _) = peak_at(monitor::tracker::DEFAULT_MAX_SOCKETS);
    assert!((peak + REST_OF_THE_DAEMON_KIB) as f64 > pod_limit as f64 * MARGIN, "{peak}");
    let (_, unit_limit, unit_cap) = limits[0];
    let (peak, _) = peak_at(unit_cap * 2);
    assert!((peak + REST_OF_THE_DAEMON_KIB) as f64 > unit_limit as f64 * MARGIN, "{peak}");
}
