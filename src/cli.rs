//! The commands that read a configuration file (`check`, `run`, `map`, `dlq`): the one place that
//! does, so that no stage depends on `config`. `main.rs` parses the command line and calls these.

use crate::config::{self, Config, ConfigError};
use crate::dlq::{DlqCommand, DlqSettings};
use crate::mapping::{run_map, MapRunError, Mapper, MappingErrors, Summary};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The configuration file to read: `--config` (which must exist), or the default file (which may
/// be absent when the environment supplies everything).
pub fn config_path(given: Option<PathBuf>) -> (PathBuf, bool) {
    match given {
        Some(p) => (p, true),
        None => (PathBuf::from(config::DEFAULT_CONFIG_FILE), false),
    }
}

/// Loads and validates the configuration (see [`config::load`]).
///
/// Errors: every problem found, each naming the key and the file or variable.
pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
    config::load(path, explicit).map(|l| l.config)
}

/// Arguments of `datapulse-bridge map`.
#[derive(Debug, Clone, clap::Args)]
pub struct MapArgs {
    /// The bridge configuration file (its `[[mapping]]` tables are used).
    #[arg(long, short)]
    pub config: PathBuf,
    /// The topic records are mapped as, unless a record names its own `topic`. Default: the
    /// first of `kafka.topics`.
    #[arg(long)]
    pub topic: Option<String>,
    /// Sample records, one a line: the record value as JSON, or an object
    /// `{"key":..,"value":..,"headers":{..},"topic":..}`. Standard input when absent.
    pub file: Option<PathBuf>,
}

/// Runs `map`: events on stdout, failures and filtered records on stderr.
/// Exit status: 0 when every record mapped or was filtered, 1 when one failed, 2 when the
/// configuration or the input cannot be read.
pub fn run_map_command(args: MapArgs) -> ExitCode {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let result = match &args.file {
        Some(path) => match std::fs::File::open(path) {
            Ok(f) => map(
                &args,
                std::io::BufReader::new(f),
                &mut stdout.lock(),
                &mut stderr.lock(),
            ),
            Err(source) => Err(MapCommandError::Open {
                path: path.clone(),
                source,
            }),
        },
        None => map(&args, std::io::stdin().lock(), &mut stdout.lock(), &mut stderr.lock()),
    };
    match result {
        Ok(s) if s.failed == 0 => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            let _ = writeln!(stderr.lock(), "error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Why `map` could not map its input.
#[derive(Debug, thiserror::Error)]
pub enum MapCommandError {
    /// The configuration is invalid (its mappings included).
    #[error("{}", .0.to_string().trim_end())]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Mapping(#[from] MappingErrors),
    #[error("cannot open {}: {source}", path.display())]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Map(#[from] MapRunError),
}

/// The body of [`run_map_command`], over any input and outputs: loads `args.config`, compiles its
/// mappings and maps every sample record of `input`.
///
/// Errors: the configuration is invalid, or the input cannot be read (see [`run_map`]).
pub fn map(
    args: &MapArgs,
    input: impl BufRead,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Summary, MapCommandError> {
    let cfg = load(&args.config, true)?;
    let mapper = Mapper::compile(&cfg.mapping, &cfg.api.contract())?;
    let default_topic = args.topic.clone().or_else(|| cfg.kafka.topics.first().cloned());
    let max_event_bytes = crate::mapping::max_event_bytes(cfg.batch.max_bytes);
    Ok(run_map(&mapper, max_event_bytes, default_topic, input, out, err)?)
}

/// Runs a `dlq` command with the configuration its `--config` names.
///
/// Errors: the configuration is invalid, or the command failed (see [`crate::dlq::run_command`]).
pub async fn run_dlq_command(cmd: DlqCommand) -> anyhow::Result<()> {
    let (path, explicit) = config_path(cmd.filter().config.clone());
    let cfg = load(&path, explicit)?;
    let settings = DlqSettings {
        kafka: &cfg.kafka,
        dead_letter: &cfg.dead_letter,
        dedupe: &cfg.dedupe,
    };
    // The errors quote librdkafka and Redis, whose messages may carry a configured secret.
    let scrubber = cfg.scrubber();
    crate::dlq::run_command(cmd, settings)
        .await
        .map_err(|e| anyhow::anyhow!("{}", scrubber.scrub(&format!("{e:#}"))))
}
