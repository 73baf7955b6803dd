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
    }
    builder.init();
    if let Some(level) = plain {
        log::set_max_level(level);
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
