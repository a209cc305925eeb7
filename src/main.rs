use clap::{Parser, Subcommand};
use datapulse_bridge::cli::{self, config_path};
use datapulse_bridge::{demo, dlq, pipeline, sandbox, telemetry};
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc rather than glibc's malloc: records are allocated on the consumer thread and freed on
/// the delivery side, and under that pattern glibc's per-thread arenas grew and shrank their heaps
/// (`mprotect`, page faults) for about a sixth of the bridge's CPU in `cargo bench --bench e2e`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Run the bridge: consume, map, deliver, commit.
    Run {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Dry-run the mapping over sample records (JSON lines); exits non-zero if any fails.
    Map(cli::MapArgs),
    /// The whole pipeline on embedded components (mock Kafka, in-process sandbox), no setup.
    Demo(demo::DemoArgs),
    /// Inspect and replay dead letters.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Serve the Server Events API sandbox.
    Sandbox(Box<sandbox::SandboxArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => {
            let (path, explicit) = config_path(config);
            match cli::load(&path, explicit) {
                Ok(cfg) => {
                    print!("{}", cfg.to_redacted_toml());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprint!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Run { config } => {
            let (path, explicit) = config_path(config);
            let cfg = match cli::load(&path, explicit) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let scrubber = cfg.scrubber();
            telemetry::scrub_panics(scrubber.clone(), std::io::stderr);
            telemetry::init_logging(cfg.telemetry.log_format, &cfg.telemetry.log_level, scrubber.clone());
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            let telemetry = telemetry::Telemetry::with_scrubber(scrubber.clone());
            let result = rt.block_on(async move {
                datapulse_bridge::source::awaiting_assignment(&telemetry, "starting: the pipeline is not running yet");
                let addr = match telemetry.serve(&cfg.telemetry.listen).await {
                    Ok(addr) => addr,
                    Err(e) => {
                        return Err(format!(
                            "cannot serve the operations port on telemetry.listen = {}: {e}",
                            cfg.telemetry.listen
                        ))
                    }
                };
                tracing::info!(%addr, "operations server listening (/metrics, /health/live, /health/ready)");
                let shutdown = tokio_util::sync::CancellationToken::new();
                pipeline::cancel_on_signals(shutdown.clone());
                // `{:#}`-free: each error's Display already names its cause.
                pipeline::run(cfg, shutdown, telemetry).await.map_err(|e| e.to_string())
            });
            match result {
                Ok(()) => {
                    tracing::info!("stopped");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    tracing::error!(error = %e, "bridge failed");
                    eprintln!("error: {}", scrubber.scrub(&e));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Map(args) => cli::run_map_command(args),
        Command::Demo(args) => {
            telemetry::init_logging(telemetry::LogFormat::Text, "error", Default::default());
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            match rt.block_on(demo::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Dlq(cmd) => {
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            match rt.block_on(cli::run_dlq_command(cmd)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
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
