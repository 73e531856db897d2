//! `hub`: parse the command line, load settings, call into the library.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use hub::cli::{self, Cli, Command};
use hub::config::LogFormat;
use hub::{Hub, Settings};

fn init_tracing(default_filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // Colours only for a terminal: a log file or pipe gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        // One JSON object per line, with the span's fields (device_id).
        LogFormat::Json => builder.json().with_current_span(true).init(),
    }
}

/// Exit code of a command line that cannot be parsed (EX_USAGE): distinct
/// from `hub command send --wait`'s 2 (FAILED) and 3 (EXPIRED).
const USAGE_ERROR: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(USAGE_ERROR)
            } else {
                // --help and --version.
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the subcommand; returns the process exit code.
async fn run(cli: Cli) -> anyhow::Result<u8> {
    let ok = |r: anyhow::Result<()>| r.map(|()| 0);
    match cli.command {
        Command::Serve { config } => {
            let settings = Settings::load(config.as_deref())?;
            init_tracing(&settings.log.filter, settings.log.format);
            ok(Hub::start(settings).await?.run_until_signal().await)
        }
        Command::PrintConfig { config } => {
            print!("{}", Settings::load(config.as_deref())?.to_toml());
            Ok(0)
        }
        Command::Query(args) => ok(cli::query(&args, &mut std::io::stdout().lock()).await),
        Command::Devices(cmd) => match &cmd.action {
            None => ok(cli::devices(&cmd.list, &cmd.filter, &mut std::io::stdout().lock()).await),
            Some(action) => ok(cli::device_action(action, &mut std::io::stdout().lock()).await),
        },
        Command::Backup(args) => ok(cli::backup(&args, &mut std::io::stdout().lock()).await),
        Command::Certs(args) => ok(cli::certs::run(&args, &mut std::io::stdout().lock())),
        Command::Watch(args) => ok(cli::watch(&args, &mut std::io::stdout().lock()).await),
        Command::Stats(args) => ok(cli::stats(&args, &mut std::io::stdout().lock()).await),
        Command::Command(action) => cli::command(&action, &mut std::io::stdout().lock()).await,
        Command::Twin(action) => ok(cli::twin(&action, &mut std::io::stdout().lock()).await),
        Command::Alarm(action) => ok(cli::alarm(&action, &mut std::io::stdout().lock()).await),
        Command::Job(action) => ok(cli::job(&action, &mut std::io::stdout().lock()).await),
        Command::Demo(args) => {
            init_tracing("warn", LogFormat::Text);
            ok(cli::demo(args).await)
        }
    }
}
