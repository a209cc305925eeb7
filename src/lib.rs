//! datapulse-bridge: Kafka consumer group → field mapping → dedupe → batched delivery to the
//! DataPulse Server Events API, committing offsets only behind what reached an outcome.
//! See `docs/ARCHITECTURE.md` for the map of the code and its invariants.

pub mod backoff;
pub mod batch;
pub mod cli;
pub mod config;
pub mod decimal;
pub mod dedupe;
pub mod deliver;
pub mod demo;
pub mod dlq;
pub mod event;
pub mod mapping;
pub mod offsets;
pub mod pipeline;
pub mod sandbox;
pub mod settings;
pub mod source;
pub mod telemetry;
