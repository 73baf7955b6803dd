//! Logs go to stderr through the `log` facade: as text, or as one JSON object per line, at the
//! level `--log-level` (else `RUST_LOG`, else `info`) asks for. A plain level can change while
//! the daemon runs (SIGHUP); per-module filters are fixed until restart.

use std::io::Write;

use log::LevelFilter;

use crate::cli::{Cli, LogFormat};

/// The filter asked for: `--log-level` (flag, environment or config file), else `RUST_LOG`,
/// else `info`.
pub fn filter_of(cli: &Cli) -> String {
    cli.log_level
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_owned())
}

/// Installs the logger as `cli` asks.
pub fn init(cli: &Cli) {
    let spec = filter_of(cli);
    let mut builder = env_logger::Builder::new();
    // A plain level is applied through log's global maximum, so SIGHUP can change it;
    // per-module filters are fixed until restart.
    let plain: Option<LevelFilter> = spec.parse().ok();
    match plain {
        Some(_) => builder.filter_level(LevelFilter::Trace),
        None => builder.parse_filters(&spec),
    };
    if cli.log_format == LogFormat::Json {
        builder.format(|out, record| {
            let line = serde_json::json!({
                "ts": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
                "level": record.level().as_str(),
                "target": record.target(),
                "msg": record.args().to_string(),
            });
            writeln!(out, "{line}")
        });
    } else if stderr_is_journal() {
        // journald stamps every line itself and reads its priority from a `<N>` prefix
        // (sd-daemon(3)), so `journalctl -p warning` finds warnings.
        builder.format(|out, record| {
            writeln!(out, "<{}>{}: {}", priority(record.level()), record.target(), record.args())
        });
    }
    builder.init();
    if let Some(level) = plain {
        log::set_max_level(level);
    }
}

/// Whether stderr is connected to the journal: systemd sets `JOURNAL_STREAM` to its
/// `device:inode` (systemd.exec(5)); a process that inherited the variable but writes
/// elsewhere (a pipe, a terminal) keeps the plain format.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else { return false };
    let Ok(stderr) = std::fs::metadata("/proc/self/fd/2") else { return false };
    journal_stream_is(&stream, stderr.dev(), stderr.ino())
}

/// Whether `JOURNAL_STREAM`'s value names the file with `dev` and `ino`.
fn journal_stream_is(stream: &str, dev: u64, ino: u64) -> bool {
    stream.split_once(':').and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
        == Some((dev, ino))
}

/// The syslog priority of a level, as sd-daemon(3) prefixes want it.
fn priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// A per-module filter (e.g. `monitor=debug`) cannot replace the running one.
#[derive(Debug, thiserror::Error)]
#[error("module log filters (`{0}`) need a restart")]
pub struct FixedFilter(pub String);

/// Applies `spec` if it is a plain level. Returns the previous and the new level when the
/// level changed.
pub fn set_level(spec: &str) -> Result<Option<(LevelFilter, LevelFilter)>, FixedFilter> {
    let level: LevelFilter = spec.parse().map_err(|_| FixedFilter(spec.to_owned()))?;
    let previous = log::max_level();
    if level == previous {
        return Ok(None);
    }
    log::set_max_level(level);
    Ok(Some((previous, level)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_lines_carry_syslog_priorities_only_when_stderr_is_the_journal() {
        assert!(journal_stream_is("8:4242", 8, 4242));
        assert!(!journal_stream_is("8:4242", 8, 4243), "another stream: a pipe, a terminal");
        assert!(!journal_stream_is("garbage", 8, 4242));
        assert_eq!(priority(log::Level::Warn), 4);
        assert_eq!(priority(log::Level::Error), 3);
        assert_eq!(priority(log::Level::Info), 6);
    }
}
