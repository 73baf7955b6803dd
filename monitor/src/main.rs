use std::process::ExitCode;

use clap::CommandFactory;
use monitor::cli::{Cli, Command};

fn main() -> ExitCode {
    let settings = monitor::config::parse(std::env::args_os()).unwrap_or_else(|e| e.exit());
    let cli = settings.cli;
    monitor::logging::init(&cli);
    // The daemon serves HTTP and tail clients from threads without capabilities: only its
    // main thread (until start-up is done) and one kernel-reader thread hold any. The
    // stand-alone tail loads the program on a runtime thread, so its threads keep theirs.
    let daemon = matches!(cli.command, Command::Run(_));
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // The drain loop runs on the main thread; one worker serves HTTP and tail clients.
    builder.worker_threads(1).enable_all();
    if daemon {
        builder.on_thread_start(monitor::privilege::drop_all);
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tcpmon: error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Run(args) => runtime.block_on(monitor::daemon::run(*args, settings.values)),
        Command::Tail(args) => {
            let options = match args.options() {
                Ok(options) => options,
                Err(message) => {
                    eprintln!("tcpmon tail: error: {message}");
                    return ExitCode::from(monitor::exit::USAGE);
                }
            };
            let pipeline = args.standalone_pipeline();
            let standalone = |client| monitor::standalone::standalone(pipeline, client);
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
