//! The scrape's cost by network namespaces (part of `cargo xtask bench`): a container host
//! has one namespace per pod, and the kernel state read at scrape time visits each. Every
//! namespace's `sock_diag` dump of SYN_RECV and FIN_WAIT2 sockets walks the whole TCP
//! established hash of the namespace (`inet_diag_dump_icsk()`), and by default every
//! namespace shares the host's table; `net.ipv4.tcp_child_ehash_entries` (Linux 6.1+) gives
//! namespaces created after it is set a table of their own. Both are measured: the daemon's
//! CPU per scrape with N namespaces (the host's and N - 1 made here, each with a listener, as
//! a pod has: a namespace with no TCP socket at all is not dumped).

use std::io::Write as _;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::thread;

use anyhow::{anyhow, bail, Context, Result};

/// The sysctl that gives new namespaces a TCP hash table of their own.
const CHILD_EHASH: &str = "/proc/sys/net/ipv4/tcp_child_ehash_entries";

/// The daemon's CPU for a `/metrics` scrape, ms, beyond what it spends idle.
#[derive(Clone, Copy, Debug)]
pub struct ScrapeCost {
    /// The first scrape: every namespace is dumped whole (as one that saw traffic since the
    /// last scrape is).
    pub first_ms: f64,
    /// The scrapes after it, while nothing moves: a quiet namespace's dump of SYN_RECV and
    /// FIN_WAIT2 is reused, its listeners read afresh.
    pub idle_ms: f64,
}

impl std::fmt::Display for ScrapeCost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1} ms (first: {:.1} ms)", self.idle_ms, self.first_ms)
    }
}

/// One row: CPU per scrape with `namespaces` namespaces.
#[derive(Clone, Copy, Debug)]
pub struct Row {
    /// Namespaces the daemon reads, its own included.
    pub namespaces: usize,
    /// CPU per scrape when they share the host's TCP hash table (the default).
    pub shared: ScrapeCost,
    /// The same with a table of their own (`tcp_child_ehash_entries` = 1024); `None` on
    /// kernels without the setting.
    pub own: Option<ScrapeCost>,
}

/// Measures the rows for `counts` namespaces; `scrape_cost` starts a daemon, measures its CPU
/// per scrape, and stops it.
pub fn measure(counts: &[usize], scrape_cost: &dyn Fn() -> Result<ScrapeCost>) -> Result<Vec<Row>> {
    let before = std::fs::read_to_string(CHILD_EHASH).ok();
    let rows = counts
        .iter()
        .map(|&namespaces| -> Result<Row> {
            let shared = with_namespaces(namespaces - 1, None, scrape_cost)?;
            let own = match &before {
                Some(_) => Some(with_namespaces(namespaces - 1, Some(1024), scrape_cost)?),
                None => None,
            };
            Ok(Row { namespaces, shared, own })
        })
        .collect();
    if let Some(before) = before {
        let _ = std::fs::write(CHILD_EHASH, before.trim());
    }
    rows
}

/// Makes `extra` namespaces (each with its own hash table of `own_table` buckets, if set),
/// measures the daemon's CPU per scrape, and removes them.
fn with_namespaces(
    extra: usize,
    own_table: Option<u32>,
    scrape_cost: &dyn Fn() -> Result<ScrapeCost>,
) -> Result<ScrapeCost> {
    let names: Vec<String> =
        (0..extra).map(|i| format!("tcpmon-bench-{}-{i}", std::process::id())).collect();
    if let Some(buckets) = own_table {
        std::fs::write(CHILD_EHASH, buckets.to_string())
            .context("setting tcp_child_ehash_entries")?;
    }
    let made = ip_batch(names.iter().map(|name| format!("netns add {name}")));
    if own_table.is_some() {
        let _ = std::fs::write(CHILD_EHASH, "0");
    }
    let measured = made.and_then(|()| {
        let _listeners =
            names.iter().map(|name| listen_in(name)).collect::<Result<Vec<TcpListener>>>()?;
        scrape_cost()
    });
    ip_batch(names.iter().map(|name| format!("netns del {name}")))?;
    measured
}

/// A listener on port 8080 in namespace `name` (its loopback is down: any address).
fn listen_in(name: &str) -> Result<TcpListener> {
    let path = format!("/run/netns/{name}");
    thread::scope(|scope| {
        scope
            .spawn(|| -> Result<TcpListener> {
                let namespace = std::fs::File::open(&path).with_context(|| path.clone())?;
                // SAFETY: setns(2) moves only this short-lived thread into the namespace.
                if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("entering {path}: {}", std::io::Error::last_os_error());
                }
                Ok(TcpListener::bind("0.0.0.0:8080")?)
            })
            .join()
            .map_err(|_| anyhow!("the thread entering {path} panicked"))?
    })
}

/// Runs `ip -batch -` with `lines`.
fn ip_batch(lines: impl Iterator<Item = String>) -> Result<()> {
    let mut ip = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("running ip -batch")?;
    let mut stdin = ip.stdin.take().context("ip stdin")?;
    for line in lines {
        writeln!(stdin, "{line}")?;
    }
    drop(stdin);
    if !ip.wait()?.success() {
        bail!("ip -batch failed");
    }
    Ok(())
}

/// The report's section.
pub fn report(rows: &[Row]) -> String {
    let mut text = String::from(
        "\nScrape cost by network namespaces (CPU per `/metrics` scrape beyond the idle daemon's; the host's namespace and N - 1 made for the run, each with one listener as a pod has and no traffic; each namespace's `sock_diag` dump of SYN_RECV and FIN_WAIT2 walks the TCP established hash its namespace uses, the host's unless `net.ipv4.tcp_child_ehash_entries` gave it one of its own. \"First\" is the first scrape, which dumps every namespace whole, as every later scrape does for a namespace that saw a segment since the one before; the other figure is a scrape while nothing moves, which reuses those dumps and reads only the listeners):\n\n| namespaces | shared hash table (default) | own tables (`tcp_child_ehash_entries=1024`) |\n|---:|---:|---:|\n",
    );
    for row in rows {
        let own = row.own.map_or("not available".to_owned(), |cost| cost.to_string());
        text.push_str(&format!("| {} | {} | {own} |\n", row.namespaces, row.shared));
    }
    text
}
