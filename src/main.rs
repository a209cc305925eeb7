use clap::{Parser, Subcommand};
use datapulse_bridge::{config, sandbox};
use std::path::PathBuf;
use std::process::ExitCode;

/// Streams partner transactions from Kafka into the DataPulse Server Events API.
#[derive(Parser)]
#[command(name = "datapulse-bridge", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and validate a configuration; print it with secrets redacted.
    Check {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Serve the Server Events API sandbox.
    Sandbox(Box<sandbox::SandboxArgs>),
}

fn config_path(p: Option<PathBuf>) -> (PathBuf, bool) {
    match p {
        Some(p) => (p, true),
        None => (PathBuf::from(config::DEFAULT_CONFIG_FILE), false),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => {
            let (path, explicit) = config_path(config);
            match config::load(&path, explicit) {
                Ok(loaded) => {
                    print!("{}", loaded.config.to_redacted_toml());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprint!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Sandbox(args) => {
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            match rt.block_on(sandbox::run(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
