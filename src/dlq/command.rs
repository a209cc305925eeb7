//! The `dlq list` and `dlq replay` commands.

use super::read::{parse_time, read_all, DeadLetter};
use super::{DeadLetterConfig, DeadLetters};
use crate::dedupe::{DedupeConfig, Deduper, StoreKind};
use crate::offsets::RecordId;
use crate::source::KafkaConfig;
use crate::telemetry::Telemetry;
use rdkafka::message::Header;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// `datapulse-bridge dlq` commands.
#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead letters grouped by stage and reason, with examples.
    List(DlqFilter),
    /// Re-produce chosen dead letters to their source topic, so the running bridge takes them
    /// through the pipeline again (for after a mapping fix). Dedupe drops any already delivered.
    Replay {
        #[command(flatten)]
        filter: DlqFilter,
        /// Print what would be replayed without producing anything.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Which dead letters a `dlq` command concerns.
#[derive(Debug, Clone, clap::Args)]
pub struct DlqFilter {
    /// The bridge's configuration file (for the brokers and the dead-letter topic).
    #[arg(long, short)]
    pub config: Option<std::path::PathBuf>,
    /// Only these reasons (repeatable), e.g. `currency`, `double_count`, `rejected`.
    #[arg(long)]
    pub reason: Vec<String>,
    /// Only this stage: mapping, validation, dedupe or api.
    #[arg(long)]
    pub stage: Option<String>,
    /// Only dead letters written at or after this RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    pub since: Option<time::OffsetDateTime>,
    /// Only dead letters written before this RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    pub until: Option<time::OffsetDateTime>,
    /// Only these source records, as `topic/partition/offset` (repeatable).
    #[arg(long = "record")]
    pub records: Vec<RecordId>,
}

impl DlqFilter {
    fn matches(&self, d: &DeadLetter) -> bool {
        (self.reason.is_empty() || self.reason.contains(&d.reason))
            && self.stage.as_ref().is_none_or(|s| *s == d.stage)
            && self.since.is_none_or(|s| d.time.is_some_and(|t| t >= s))
            && self.until.is_none_or(|u| d.time.is_some_and(|t| t < u))
            && (self.records.is_empty() || self.records.contains(&d.record.id))
    }
}

impl DlqCommand {
    /// The dead letters the command concerns.
    pub fn filter(&self) -> &DlqFilter {
        match self {
            DlqCommand::List(f) => f,
            DlqCommand::Replay { filter, .. } => filter,
        }
    }
}

/// What a `dlq` command needs of the bridge's configuration.
pub struct DlqSettings<'a> {
    pub kafka: &'a KafkaConfig,
    pub dead_letter: &'a DeadLetterConfig,
    /// For letting ids in doubt go on replay (Redis store).
    pub dedupe: &'a DedupeConfig,
}

/// Runs a `dlq` command, printing to stdout.
///
/// Errors: the dead-letter topic cannot be read, the producer or the dedupe store cannot be
/// created, or a replayed record is not acknowledged.
pub async fn run_command(cmd: DlqCommand, cfg: DlqSettings<'_>) -> anyhow::Result<()> {
    let filter = cmd.filter();
    let topic = cfg.dead_letter.topic.clone();
    let kafka = cfg.kafka.clone();
    let all = tokio::task::spawn_blocking(move || read_all(&kafka, &topic)).await??;
    let chosen: Vec<&DeadLetter> = all.iter().filter(|d| filter.matches(d)).collect();
    match cmd {
        DlqCommand::List(_) => {
            let mut groups: std::collections::BTreeMap<(&str, &str), Vec<&DeadLetter>> = Default::default();
            for d in &chosen {
                groups.entry((d.stage.as_str(), d.reason.as_str())).or_default().push(d);
            }
            println!(
                "{} dead letters on {} ({} match)",
                all.len(),
                cfg.dead_letter.topic,
                chosen.len()
            );
            for ((stage, reason), ds) in groups {
                println!("\n{:>6}  {stage}: {reason}", ds.len());
                for d in ds.iter().take(3) {
                    println!("        {}  {}", d.record.id, d.error);
                }
            }
        }
        DlqCommand::Replay { dry_run, .. } => {
            // A command's metrics are not exported: a telemetry of its own, dropped at the end.
            let telemetry = Telemetry::new();
            let dl = DeadLetters::new(cfg.kafka, cfg.dead_letter, &telemetry)?;
            let cancel = CancellationToken::new();
            // An `in_doubt` dead letter's id stays a duplicate in the dedupe store until replayed:
            // replaying it says the operator found it missing in DataPulse.
            let in_doubt = chosen.iter().any(|d| d.dedupe_key.is_some());
            let deduper = match (in_doubt && !dry_run, cfg.dedupe.store) {
                (true, StoreKind::Redis) => Some(Deduper::new(cfg.dedupe, &telemetry).await?),
                _ => None,
            };
            for d in &chosen {
                if d.record.id.topic.is_empty() {
                    println!("skipped {}: no source topic header", d.at);
                    continue;
                }
                if dry_run {
                    println!("would replay {} to {}", d.at, d.record.id.topic);
                    continue;
                }
                if let (Some(deduper), Some(key)) = (&deduper, &d.dedupe_key) {
                    if deduper.forget_doubt(key).await.map_err(|e| anyhow::anyhow!("{e}"))? {
                        println!("{key} is no longer in doubt: it will be sent");
                    }
                }
                dl.replay(d, &cancel).await?;
                println!("replayed {} ({}: {}) to {}", d.at, d.stage, d.reason, d.record.id.topic);
            }
            println!(
                "{} dead letters {}",
                chosen.len(),
                if dry_run { "would be replayed" } else { "replayed" }
            );
        }
    }
    Ok(())
}

impl DeadLetters {
    /// Produces a dead letter's original record to its source topic again, marked with a
    /// `dp.replayed_from` header.
    async fn replay(&self, d: &DeadLetter, _cancel: &CancellationToken) -> anyhow::Result<()> {
        let mut h = d.record.original_headers(1);
        h = h.insert(Header {
            key: "dp.replayed_from",
            value: Some(d.at.as_str()),
        });
        let record = d.record.to_record(&d.record.id.topic, h);
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)?;
        Ok(())
    }
}
