use std::io::Write;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use monitor::cli::{Cli, Command, LogFormat};

fn init_logging(cli: &Cli) {
    let spec = cli
        .log_level
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_owned());
    let mut builder = env_logger::Builder::new();
    // A plain level is applied through log's global maximum, so SIGHUP can change it;
    // per-module filters are fixed until restart.
    let plain: Option<log::LevelFilter> = spec.parse().ok();
    match plain {
        Some(_) => builder.filter_level(log::LevelFilter::Trace),
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

/// Parses the command line, then the config file if one is named; exits 2 on bad input.
fn parse() -> Cli {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let config = match &cli.command {
        Command::Run(run) => run.config.clone(),
        _ => None,
    };
    if let Some(path) = config {
        if let Err(e) = monitor::config::apply(&path, &mut cli, &matches) {
            eprintln!("tcpmon: error: config file {e}");
            std::process::exit(2);
        }
    }
    cli
}

fn main() -> ExitCode {
    let cli = parse();
    init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        // The drain loop runs on the main thread; one worker serves HTTP and tail clients.
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tcpmon: error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Run(args) => runtime.block_on(monitor::daemon::run(args)),
        Command::Tail(args) => {
            let options = match args.options() {
                Ok(options) => options,
                Err(message) => {
                    eprintln!("tcpmon tail: error: {message}");
                    return ExitCode::from(monitor::exit::USAGE);
                }
            };
            let pipeline = args.standalone_pipeline();
            let standalone = |client| monitor::pipeline::standalone(pipeline, client);
            return runtime.block_on(monitor::tail::client::run(options, standalone));
        }
        Command::Check => {
            let findings = monitor::check::run_checks();
            return if monitor::check::report(&findings) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "tcpmon", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Man => {
            let page = clap_mangen::Man::new(Cli::command());
            return match page.render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tcpmon: error: writing the man page: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::from(monitor::exit::code(&e))
        }
    }
}
