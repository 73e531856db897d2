//! `hub`: parse the command line, load settings, call into the library.

use clap::Parser;
use hub::cli::{self, Cli, Command};
use hub::{Hub, Settings};

fn init_tracing(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let settings = Settings::load(config.as_deref())?;
            init_tracing(&settings.log.filter);
            Hub::start(settings).await?.run_until_signal().await
        }
        Command::PrintConfig { config } => {
            print!("{}", Settings::load(config.as_deref())?.to_toml());
            Ok(())
        }
        Command::Query(args) => cli::query(&args, &mut std::io::stdout().lock()).await,
        Command::Devices(args) => cli::devices(&args, &mut std::io::stdout().lock()).await,
        Command::Stats(args) => cli::stats(&args, &mut std::io::stdout().lock()).await,
        Command::Demo(args) => {
            init_tracing("warn");
            cli::demo(args).await
        }
    }
}
