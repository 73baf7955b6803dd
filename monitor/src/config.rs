//! The daemon's TOML config file (`tcpmon run --config FILE`).
//!
//! Precedence, highest first: command-line flag, environment variable (`TCPMON_*`), config
//! file, built-in default. Keys are the long flag names:
//!
//! ```toml
//! listen = "127.0.0.1:9979"
//! ring-bytes = "8MiB"
//! drain-interval = "100ms"
//! low-latency = false
//! max-sockets = 1048576
//! netns-labels = 0      # split the main metrics by network namespace, for up to N of them
//! hook = "auto"         # or "btf", "tracepoint": which build of the kernel program
//! tail-socket = "/run/tcpmon/tail.sock"
//! record = "/var/tmp/tcpmon.rec"   # raw records, for bug reports
//! log-level = "info"
//! log-format = "text"   # or "json"
//! ```
//!
//! Unknown keys and bad values are errors (exit code 2), never ignored.

use std::path::Path;

use clap::parser::ValueSource;
use clap::ArgMatches;

use crate::cli::{parse_interval, parse_ring_bytes, Cli, LogFormat, RunArgs};

/// Keys the file may hold.
const KEYS: [&str; 11] = [
    "listen",
    "hook",
    "netns-labels",
    "record",
    "ring-bytes",
    "drain-interval",
    "low-latency",
    "max-sockets",
    "tail-socket",
    "log-level",
    "log-format",
];

/// Reads `path` and fills every setting of `cli` that neither a flag nor an environment
/// variable set. `matches` are the parsed command line that `cli` came from.
pub fn apply(path: &Path, cli: &mut Cli, matches: &ArgMatches) -> Result<(), String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    apply_text(&text, cli, matches).map_err(|e| format!("{}: {e}", path.display()))
}

/// [`apply`] on the file's contents.
pub fn apply_text(text: &str, cli: &mut Cli, matches: &ArgMatches) -> Result<(), String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.message().to_owned())?;
    if let Some(unknown) = table.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(format!("unknown key `{unknown}` (known: {})", KEYS.join(", ")));
    }
    let run_matches = matches.subcommand_matches("run");
    // A value from the file counts only where the flag was left at its default.
    let unset = |m: Option<&ArgMatches>, id: &str| {
        m.is_none_or(|m| matches!(m.value_source(id), None | Some(ValueSource::DefaultValue)))
    };
    let text_of = |key: &str, value: &toml::Value| -> Result<String, String> {
        match value {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(i) => Ok(i.to_string()),
            toml::Value::Boolean(b) => Ok(b.to_string()),
            other => Err(format!("`{key}`: unexpected {}", other.type_str())),
        }
    };
    for (key, value) in &table {
        let id = key.replace('-', "_");
        let value = text_of(key, value)?;
        let bad = |e: String| format!("`{key}`: {e}");
        match key.as_str() {
            "log-level" if unset(Some(matches), &id) => cli.log_level = Some(value),
            "log-format" if unset(Some(matches), &id) => {
                cli.log_format = match value.as_str() {
                    "text" => LogFormat::Text,
                    "json" => LogFormat::Json,
                    other => return Err(bad(format!("`{other}` is not text or json"))),
                }
            }
            _ => {
                let crate::cli::Command::Run(run) = &mut cli.command else { continue };
                if unset(run_matches, &id) {
                    apply_run(run, key, &value).map_err(bad)?;
                }
            }
        }
    }
    Ok(())
}

/// The daemon's settings as they would be if it started now: the process's own command line
/// and environment, and `path` read again (SIGHUP).
pub fn reread(path: &Path) -> Result<(Cli, RunArgs), String> {
    use clap::{CommandFactory, FromArgMatches};
    let matches =
        Cli::command().try_get_matches_from(std::env::args_os()).map_err(|e| e.to_string())?;
    let mut cli = Cli::from_arg_matches(&matches).map_err(|e| e.to_string())?;
    apply(path, &mut cli, &matches)?;
    match &cli.command {
        crate::cli::Command::Run(run) => {
            let run = run.clone();
            Ok((cli, run))
        }
        _ => Err("not a `tcpmon run` command line".into()),
    }
}

fn apply_run(run: &mut RunArgs, key: &str, value: &str) -> Result<(), String> {
    match key {
        "listen" => run.listen = value.parse().map_err(|e| format!("`{value}`: {e}"))?,
        "ring-bytes" => run.ring_bytes = parse_ring_bytes(value)?,
        "drain-interval" => run.drain_interval = parse_interval(value)?,
        "low-latency" => {
            run.low_latency =
                value.parse().map_err(|_| format!("`{value}` is not true or false"))?
        }
        "max-sockets" => {
            run.max_sockets = value.parse().map_err(|_| format!("`{value}` is not a count"))?
        }
        "tail-socket" => run.tail_socket = value.into(),
        "netns-labels" => {
            run.netns_labels = value.parse().map_err(|_| format!("`{value}` is not a count"))?
        }
        "record" => run.record = Some(value.into()),
        "hook" => {
            run.hook = clap::ValueEnum::from_str(value, false)
                .map_err(|_| format!("`{value}` is not auto, btf or tracepoint"))?
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    fn parse(args: &[&str], file: &str) -> Result<Cli, String> {
        let matches = Cli::command().try_get_matches_from(args).map_err(|e| e.to_string())?;
        let mut cli = Cli::from_arg_matches(&matches).map_err(|e| e.to_string())?;
        apply_text(file, &mut cli, &matches)?;
        Ok(cli)
    }

    fn run(cli: &Cli) -> &RunArgs {
        match &cli.command {
            crate::cli::Command::Run(run) => run,
            _ => panic!("not run"),
        }
    }

    #[test]
    fn the_file_fills_what_flags_left_at_their_defaults() {
        let file = "listen = \"0.0.0.0:9100\"\nring-bytes = \"1MiB\"\nmax-sockets = 5000\nlow-latency = true\nlog-format = \"json\"\n";
        let cli = parse(&["tcpmon", "run", "--ring-bytes", "2MiB"], file).unwrap();
        assert_eq!(run(&cli).listen, "0.0.0.0:9100".parse().unwrap()); // from the file
        assert_eq!(run(&cli).ring_bytes, 2 << 20); // the flag wins
        assert_eq!(run(&cli).max_sockets, 5000);
        assert!(run(&cli).low_latency);
        assert_eq!(cli.log_format, LogFormat::Json);
        let cli = parse(&["tcpmon", "run"], "hook = \"tracepoint\"").unwrap();
        assert_eq!(run(&cli).hook, crate::loader::HookChoice::Tracepoint);
    }

    #[test]
    fn bad_files_are_errors_that_name_the_key() {
        let err = parse(&["tcpmon", "run"], "lisen = \"x\"").unwrap_err();
        assert!(err.contains("unknown key `lisen`"), "{err}");
        let err = parse(&["tcpmon", "run"], "ring-bytes = \"3MiB\"").unwrap_err();
        assert!(err.contains("`ring-bytes`") && err.contains("power of two"), "{err}");
        let err = parse(&["tcpmon", "run"], "hook = \"kprobe\"").unwrap_err();
        assert!(err.contains("`hook`") && err.contains("auto, btf or tracepoint"), "{err}");
        let err = parse(&["tcpmon", "run"], "listen = [1, 2]").unwrap_err();
        assert!(err.contains("unexpected array"), "{err}");
        assert!(parse(&["tcpmon", "run"], "not toml at all =").is_err());
    }
}
