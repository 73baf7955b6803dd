//! What each guest reported, judged, and the README's "Supported kernels" table.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::Result;
use serde_json::Value;

use super::fetch::Kernel;
use super::{GUEST_CPUS, HOOKS};

/// What one kernel's guest reported.
pub(super) struct Row {
    series: &'static str,
    package: String,
    version: String,
    release: String,
    check_rc: Option<i32>,
    check: Vec<String>,
    results: Vec<Value>,
    /// Why the guest did not finish (qemu's status and words), if it did not.
    unfinished: Option<String>,
}

impl Row {
    pub(super) fn parse(kernel: &Kernel, log: &str) -> Row {
        let mut row = Row {
            series: kernel.series,
            package: kernel.package.clone(),
            version: kernel.version.clone(),
            release: kernel.release.clone(),
            check_rc: None,
            check: Vec::new(),
            results: Vec::new(),
            unfinished: None,
        };
        for line in log.lines() {
            if let Some(rest) = line.strip_prefix("@@check rc=") {
                row.check_rc = rest.trim().parse().ok();
            } else if let Some(rest) = line.strip_prefix("@@check-line ") {
                row.check.push(rest.to_owned());
            } else if let Some(rest) = line.strip_prefix("@@unfinished ") {
                row.unfinished = Some(rest.to_owned());
            } else if let Some(rest) = line.strip_prefix("@@result ") {
                if let Ok(value) = serde_json::from_str(rest) {
                    row.results.push(value);
                }
            }
        }
        row
    }

    fn result(&self, hook: &str) -> Option<&Value> {
        self.results.iter().find(|r| r["hook"] == hook)
    }

    /// Everything that did not hold, one line each.
    pub(super) fn failures(&self) -> Vec<String> {
        let mut failed = Vec::new();
        let at = |what: &str| format!("{} ({}): {what}", self.series, self.release);
        if let Some(why) = &self.unfinished {
            failed.push(at(&format!("the guest did not finish: {why}")));
        }
        if self.check_rc != Some(0) {
            failed.push(at(&format!(
                "check exited {:?}: {}",
                self.check_rc,
                self.check.join(" | ")
            )));
        }
        // check must try (and pass) every build: a FAIL or a warning on a trial load is a failure
        // here, where both builds must load.
        for line in self.check.iter().filter(|l| l.contains("trial load")) {
            if !line.starts_with("ok") {
                failed.push(at(&format!("check: {line}")));
            }
        }
        for hook in HOOKS {
            let Some(result) = self.result(hook) else {
                failed.push(at(&format!("{hook}: no result")));
                continue;
            };
            if result["loaded"] != true {
                failed.push(at(&format!("{hook}: did not load: {}", result["error"])));
                continue;
            }
            let mut any = false;
            for f in result["findings"].as_array().into_iter().flatten() {
                if f["ok"] != true {
                    any = true;
                    failed.push(at(&format!("{hook}: {}: {}", f["name"], f["seen"])));
                }
            }
            if any {
                failed.push(at(&format!(
                    "{hook}: tracker anomalies {}; tail records of the failed checks' ports: {}",
                    result["anomalies"], result["records_of_failed_checks"]
                )));
            }
            for feature in ["close_reasons", "synack_times", "reset_direction", "accept_wait"] {
                if result["features"][feature] != true {
                    failed.push(at(&format!("{hook}: {feature} not available")));
                }
            }
        }
        failed
    }

    pub(super) fn passed(&self) -> bool {
        self.failures().is_empty()
    }
}

/// The README's table: one row per kernel and build.
pub(super) fn table(rows: &[Row]) -> String {
    let date = Command::new("date").args(["-u", "+%Y-%m-%d"]).output();
    let date =
        date.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default();
    let host = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut out = format!(
        "Last run {date}, {GUEST_CPUS} guest CPUs (one ring buffer each: the verifier's hardest \
         case). The whole test suite also runs on the machine's own kernel ({}).\n\n",
        host.trim()
    );
    out.push_str(
        "| kernel (Debian package) | build | loads | close reasons | SYN-ACK times | reset direction | accept wait | checks |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let mark = |b: bool| if b { "yes" } else { "**no**" };
    let mut check_names: Vec<String> = Vec::new();
    for row in rows {
        for hook in HOOKS {
            let kernel = format!("{} (`{}` {})", row.release, row.package, row.version);
            let Some(result) = row.result(hook) else {
                let _ = writeln!(out, "| {kernel} | {hook} | **no result** | | | | | |");
                continue;
            };
            if result["loaded"] != true {
                let error = result["error"].as_str().unwrap_or_default().replace('|', "\\|");
                let error: String = error.chars().take(120).collect();
                let _ = writeln!(out, "| {kernel} | {hook} | **no**: {error} | | | | | |");
                continue;
            }
            let features = &result["features"];
            let findings = result["findings"].as_array().cloned().unwrap_or_default();
            let name = |f: &Value| f["name"].as_str().unwrap_or_default().to_owned();
            for f in &findings {
                if !check_names.contains(&name(f)) {
                    check_names.push(name(f));
                }
            }
            let failed: Vec<String> =
                findings.iter().filter(|f| f["ok"] != true).map(name).collect();
            let checks = match failed.is_empty() {
                true => format!("all {} passed", findings.len()),
                false => format!("**failed: {}**", failed.join(", ")),
            };
            let synack = match features["synack_build"].as_str() {
                Some(build) if features["synack_times"] == true => format!("yes ({build})"),
                _ => mark(features["synack_times"] == true).to_owned(),
            };
            let _ = writeln!(
                out,
                "| {kernel} | {hook} | yes | {} | {synack} | {} | {} | {checks} |",
                mark(features["close_reasons"] == true),
                mark(features["reset_direction"] == true),
                match features["accept_route"].as_str() {
                    Some(route) if features["accept_wait"] == true => format!("yes ({route})"),
                    _ => mark(false).to_owned(),
                },
            );
        }
    }
    let _ = writeln!(out, "\nThe checks, per kernel and build: {}.", check_names.join(", "));
    out
}

const TABLE_BEGIN: &str = "<!-- kernels:begin (written by cargo xtask kernels) -->";
const TABLE_END: &str = "<!-- kernels:end -->";

/// Replaces the table between the README's markers.
pub(super) fn write_readme_table(readme: &Path, table: &str) -> Result<()> {
    crate::write_between_markers(readme, TABLE_BEGIN, TABLE_END, table)
}
