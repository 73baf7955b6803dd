//! The command line, with the daemon's TOML config file (`tcpmon run --config FILE`).
//!
//! Precedence, highest first: command-line flag, environment variable (`TCPMON_*`), config
//! file, built-in default. Keys are the long flag names:
//!
//! ```toml
//! listen = "127.0.0.1:9979"
//! web-config = "/etc/tcpmon/web.yml"   # TLS and basic auth (node_exporter's format)
//! web-max-connections = 40
//! ring-bytes = "8MiB"
//! drain-interval = "100ms"
//! low-latency = false
//! max-sockets = 524288
//! netns-labels = 0      # split the main metrics by network namespace, for up to N of them
//! port-labels = 32      # service ports with a `port` value of their own, per side (0: no label)
//! ports = "443,5432"    # ports that always get one
//! workload-labels = 32  # workloads with a `workload` value of their own (0: no label)
//! label-pairs = 64      # (port, workload) pairs with series of their own: the series budget
//! workloads = "nginx.service,shop/*"   # workload name patterns that always get a value
//! label-idle = "10m"    # a value unused, gone and idle this long is retired
//! cgroup-root = "/host/sys/fs/cgroup"   # the cgroup2 tree (default: from mountinfo)
//! pod-logs = "/var/log/pods"   # the kubelet's pod directories, which name pods
//! hook = "auto"         # or "btf", "tracepoint": which build of the kernel program
//! tail-socket = "/run/tcpmon/tail.sock"
//! record = "/var/tmp/tcpmon.rec"   # raw records, for bug reports
//! log-level = "info"
//! log-format = "text"   # or "json"
//! ```
//!
//! The flags are the one list of settings: the file's keys are read off the clap definition
//! in [`crate::cli`], and each value from the file is handed to clap as the flag it stands
//! for (`--key=value`), so it goes through the flag's own parser. Unknown keys and bad values
//! are errors (exit code 2), never ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, CommandFactory, FromArgMatches};

use crate::cli::Cli;

/// The subcommand whose flags the file may set (besides the global ones).
const RUN: &str = "run";
/// Flags that are not settings.
const NOT_SETTINGS: [&str; 3] = ["config", "help", "version"];

/// Why the command line and config file do not make a valid configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The command line itself is wrong (clap prints it best: `ConfigError::exit`).
    #[error(transparent)]
    Usage(#[from] clap::Error),
    /// The config file could not be read.
    #[error("config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not TOML.
    #[error("config file {}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message.
        message: String,
    },
    /// The file has a key that is not a setting.
    #[error("config file {}: unknown key `{key}` (known: {})", path.display(), known.join(", "))]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Every key the file may have.
        known: Vec<String>,
    },
    /// A key's value is not valid for its setting.
    #[error("config file {}: `{key}`: {message}", path.display())]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong with the value.
        message: String,
    },
}

impl ConfigError {
    /// Prints the error and exits with code 2 (a usage error).
    pub fn exit(&self) -> ! {
        match self {
            ConfigError::Usage(e) => e.exit(),
            other => {
                eprintln!("tcpmon: error: {other}");
                std::process::exit(crate::exit::USAGE.into())
            }
        }
    }
}

/// Each setting's value as written on the command line, in the environment or in the file
/// (defaults included), by key: what tells a SIGHUP which settings a new file changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Values(BTreeMap<String, Vec<OsString>>);

impl Values {
    /// The keys whose values differ in `newer` (a value written another way, `8MiB` for
    /// `8388608`, counts as a change).
    pub fn changed_in(&self, newer: &Values) -> Vec<String> {
        let keys: BTreeSet<&String> = self.0.keys().chain(newer.0.keys()).collect();
        keys.into_iter().filter(|key| self.0.get(*key) != newer.0.get(*key)).cloned().collect()
    }

    /// Takes `key`'s value from `newer` (a setting now in effect).
    pub fn adopt(&mut self, key: &str, newer: &Values) {
        match newer.0.get(key) {
            Some(value) => self.0.insert(key.to_owned(), value.clone()),
            None => self.0.remove(key),
        };
    }
}

/// A parsed command line and the values it was made of.
#[derive(Debug)]
pub struct Settings {
    /// What to do, with every setting.
    pub cli: Cli,
    /// Each setting as written.
    pub values: Values,
}

/// A setting the config file may hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    /// The key: the flag's long name, e.g. `ring-bytes`.
    pub name: String,
    /// clap's id of the flag, e.g. `ring_bytes`.
    id: String,
    /// An on/off flag (`--low-latency`), which takes no value.
    switch: bool,
    /// A global flag (`--log-level`) rather than one of `tcpmon run`'s.
    global: bool,
}

/// The settings the file may hold: the global flags and `tcpmon run`'s.
pub fn keys() -> Vec<Key> {
    let command = Cli::command();
    let global = command.get_arguments().map(|arg| (arg, true));
    let run = command.find_subcommand(RUN).into_iter().flat_map(|run| run.get_arguments());
    global
        .chain(run.map(|arg| (arg, false)))
        .filter_map(|(arg, global)| {
            Some(Key {
                name: arg.get_long()?.to_owned(),
                id: arg.get_id().to_string(),
                switch: matches!(arg.get_action(), ArgAction::SetTrue),
                global,
            })
        })
        .filter(|key| !NOT_SETTINGS.contains(&key.name.as_str()))
        .collect()
}

impl Key {
    /// Where clap keeps this setting's value.
    fn matches<'m>(&self, matches: &'m ArgMatches) -> Option<&'m ArgMatches> {
        if self.global {
            Some(matches)
        } else {
            matches.subcommand_matches(RUN)
        }
    }

    /// Whether a flag or an environment variable set it (the file then does not).
    fn set_elsewhere(&self, matches: &ArgMatches) -> bool {
        self.matches(matches).is_some_and(|m| {
            matches!(
                m.value_source(&self.id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        })
    }

    /// Its value as written (a default included).
    fn raw(&self, matches: &ArgMatches) -> Option<Vec<OsString>> {
        let values = self.matches(matches)?.get_raw(&self.id)?;
        Some(values.map(OsStr::to_owned).collect())
    }
}

/// Parses a whole command line (`args[0]` is the program) and, when it names a config file,
/// fills every setting that neither a flag nor an environment variable set from the file.
pub fn parse<I, T>(args: I) -> Result<Settings, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let matches = Cli::command().try_get_matches_from(&args)?;
    let config = matches.subcommand_matches(RUN).and_then(|m| m.get_one::<PathBuf>("config"));
    let matches = match config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
            // Before a `--`, if any: after it they would be taken for positional values.
            let at = args.iter().position(|arg| arg == "--").unwrap_or(args.len());
            args.splice(at..at, file_flags(&text, &matches, path)?);
            Cli::command().try_get_matches_from(&args)?
        }
        None => matches,
    };
    let cli = Cli::from_arg_matches(&matches)?;
    Ok(Settings { cli, values: values(&matches) })
}

/// The settings the daemon would start with now: the process's own command line and
/// environment, and its config file read again (SIGHUP).
pub fn reread() -> Result<Settings, ConfigError> {
    parse(std::env::args_os())
}

/// The file's settings as flags (`--key=value`), for the keys the command line and the
/// environment left at their defaults.
fn file_flags(text: &str, matches: &ArgMatches, path: &Path) -> Result<Vec<OsString>, ConfigError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax {
        path: path.to_owned(),
        message: e.message().to_owned(),
    })?;
    let keys = keys();
    let mut flags = Vec::new();
    for (key, value) in &table {
        let bad = |message: String| ConfigError::BadValue {
            path: path.to_owned(),
            key: key.clone(),
            message,
        };
        let Some(setting) = keys.iter().find(|k| &k.name == key) else {
            return Err(ConfigError::UnknownKey {
                path: path.to_owned(),
                key: key.clone(),
                known: keys.into_iter().map(|k| k.name).collect(),
            });
        };
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => return Err(bad(format!("unexpected {}", other.type_str()))),
        };
        if setting.set_elsewhere(matches) {
            continue;
        }
        if setting.switch {
            match text.parse::<bool>() {
                Ok(true) => flags.push(format!("--{key}").into()),
                Ok(false) => {}
                Err(_) => return Err(bad(format!("`{text}` is not true or false"))),
            }
            continue;
        }
        check_value(key, &text).map_err(|why| bad(with_value(&text, why)))?;
        flags.push(format!("--{key}={text}").into());
    }
    Ok(flags)
}

/// Runs `text` through the parser of the flag `--key`, for an error that names the key.
fn check_value(key: &str, text: &str) -> Result<(), String> {
    let flag = format!("--{key}={text}");
    Cli::command()
        .try_get_matches_from(["tcpmon", RUN, &flag])
        .map(drop)
        .map_err(|e| message_of(&e))
}

/// `why` a value is wrong, saying which value unless it already does.
fn with_value(text: &str, why: String) -> String {
    if why.contains(text) {
        why
    } else {
        format!("`{text}`: {why}")
    }
}

/// What is wrong with a value, in one line: a parser's own message where it has one (ours
/// say it best), else clap's (e.g. an enum's possible values) without the usage advice.
fn message_of(error: &clap::Error) -> String {
    if let Some(source) = std::error::Error::source(error) {
        return source.to_string();
    }
    let rendered = error.to_string();
    let lines: Vec<&str> =
        rendered.lines().take_while(|line| !line.trim().is_empty()).map(str::trim).collect();
    lines.join(" ").trim_start_matches("error: ").to_owned()
}

/// Every setting's value as written, by key.
fn values(matches: &ArgMatches) -> Values {
    let written = keys().into_iter().filter_map(|key| Some((key.raw(matches)?, key.name)));
    Values(written.map(|(raw, name)| (name, raw)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Command, LogFormat, RunArgs};
    use crate::loader::HookChoice;

    fn parse_with(args: &[&str], file: &str) -> Result<Cli, String> {
        let path = std::env::temp_dir().join(format!(
            "tcpmon-config-{}-{:?}.toml",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, file).unwrap();
        let mut args: Vec<OsString> = args.iter().map(OsString::from).collect();
        args.extend([OsString::from("--config"), path.clone().into()]);
        let parsed = parse(args).map(|settings| settings.cli).map_err(|e| e.to_string());
        std::fs::remove_file(&path).unwrap();
        parsed
    }

    fn run(cli: &Cli) -> &RunArgs {
        match &cli.command {
            Command::Run(run) => run,
            _ => panic!("not run"),
        }
    }

    #[test]
    fn the_file_fills_what_flags_left_at_their_defaults() {
        let file = "listen = \"0.0.0.0:9100\"\nring-bytes = \"1MiB\"\nmax-sockets = 5000\nlow-latency = true\nlog-format = \"json\"\nlog-level = \"debug\"\n";
        let cli = parse_with(&["tcpmon", "run", "--ring-bytes", "2MiB"], file).unwrap();
        assert_eq!(run(&cli).listen, "0.0.0.0:9100".parse().unwrap()); // from the file
        assert_eq!(run(&cli).ring_bytes, 2 << 20); // the flag wins
        assert_eq!(run(&cli).max_sockets, 5000);
        assert!(run(&cli).low_latency);
        assert_eq!((cli.log_format, cli.log_level.as_deref()), (LogFormat::Json, Some("debug")));
        let cli = parse_with(&["tcpmon", "run"], "hook = \"tracepoint\"").unwrap();
        assert_eq!(run(&cli).hook, HookChoice::Tracepoint);
        let path = std::env::temp_dir().join(format!("tcpmon-dashes-{}.toml", std::process::id()));
        std::fs::write(&path, "max-sockets = 7").unwrap();
        let args = [OsString::from("tcpmon"), "run".into(), "--config".into(), path.clone().into()];
        let parsed = parse(args.into_iter().chain([OsString::from("--")]));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(run(&parsed.unwrap().cli).max_sockets, 7, "file settings go before a `--`");
        let cli = parse_with(&["tcpmon", "--log-level", "warn", "run"], "log-level = \"debug\"");
        assert_eq!(cli.unwrap().log_level.as_deref(), Some("warn"), "a global flag wins too");
    }

    #[test]
    fn bad_files_are_errors_that_name_the_key() {
        let err = parse_with(&["tcpmon", "run"], "lisen = \"x\"").unwrap_err();
        assert!(err.contains("unknown key `lisen`") && err.contains("ring-bytes"), "{err}");
        let err = parse_with(&["tcpmon", "run"], "ring-bytes = \"3MiB\"").unwrap_err();
        assert!(err.contains("`ring-bytes`: `3MiB` must be a power of two"), "{err}");
        let err = parse_with(&["tcpmon", "run"], "hook = \"kprobe\"").unwrap_err();
        assert!(err.contains("`hook`") && err.contains("auto, btf, tracepoint"), "{err}");
        let err = parse_with(&["tcpmon", "run"], "listen = [1, 2]").unwrap_err();
        assert!(err.contains("`listen`: unexpected array"), "{err}");
        let err = parse_with(&["tcpmon", "run"], "max-sockets = \"many\"").unwrap_err();
        assert!(err.contains("`max-sockets`: `many`: invalid digit"), "{err}");
        let err = parse_with(&["tcpmon", "run"], "low-latency = \"often\"").unwrap_err();
        assert!(err.contains("`low-latency`: `often` is not true or false"), "{err}");
        let err = parse_with(&["tcpmon", "run"], "config = \"other.toml\"").unwrap_err();
        assert!(err.contains("unknown key `config`"), "{err}");
        assert!(parse_with(&["tcpmon", "run"], "not toml at all =").is_err());
        let missing = parse(["tcpmon", "run", "--config", "/nonexistent.toml"]).unwrap_err();
        assert!(missing.to_string().starts_with("config file /nonexistent.toml: "), "{missing}");
    }

    #[test]
    fn every_flag_of_run_is_a_key() {
        let keys: Vec<String> = keys().into_iter().map(|key| key.name).collect();
        for key in [
            "listen",
            "web-config",
            "web-max-connections",
            "ring-bytes",
            "drain-interval",
            "low-latency",
            "max-sockets",
            "netns-labels",
            "port-labels",
            "ports",
            "workload-labels",
            "label-pairs",
            "workloads",
            "label-idle",
            "cgroup-root",
            "pod-logs",
            "hook",
            "accept-wait",
            "record",
            "tail-socket",
            "log-level",
            "log-format",
        ] {
            assert!(keys.contains(&key.to_owned()), "{key} in {keys:?}");
        }
        assert_eq!(keys.len(), 22, "{keys:?}");
    }

    #[test]
    fn a_reload_sees_which_settings_changed() {
        let values = |args: &[&str]| parse(args.iter().copied()).unwrap().values;
        let running = values(&["tcpmon", "run", "--max-sockets", "10"]);
        let same = values(&["tcpmon", "run", "--max-sockets", "10"]);
        assert!(running.changed_in(&same).is_empty());
        let newer = values(&["tcpmon", "--log-level", "debug", "run", "--max-sockets", "20"]);
        assert_eq!(running.changed_in(&newer), ["log-level", "max-sockets"]);
        let mut adopted = running.clone();
        adopted.adopt("max-sockets", &newer);
        assert_eq!(adopted.changed_in(&newer), ["log-level"]);
    }
}
