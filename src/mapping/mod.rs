//! Field mapping: compiles the configured `[[mapping]]` tables once at start-up and turns each
//! Kafka record into an API event, a filtered record, or an error naming the field.
//!
//! PLACEHOLDER (spine issue): the simplest config-driven field copy; the mapping engine replaces
//! the internals behind this same interface (`MappingConfig`, `Mapper`, `SourceRecord`,
//! `MapOutcome`).

use crate::event::{ContractOptions, Event};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One `[[mapping]]` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct MappingConfig {
    /// Topics this mapping applies to.
    pub topics: Vec<String>,
    /// Target field → JSON pointer into the record value.
    #[serde(flatten)]
    pub fields: BTreeMap<String, String>,
}

/// A Kafka record as the mapping sees it.
#[derive(Debug, Clone, Copy)]
pub struct SourceRecord<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// The record's Kafka timestamp in milliseconds, when it has one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<&'a [u8]>,
    /// `None` for a tombstone.
    pub value: Option<&'a [u8]>,
    pub headers: &'a [(&'a str, &'a [u8])],
}

/// Where a record failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Mapping,
    Validation,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Mapping => "mapping",
            Stage::Validation => "validation",
        }
    }
}

/// Why a record cannot become an event.
#[derive(Debug, Clone, PartialEq)]
pub struct MapError {
    pub stage: Stage,
    /// The target field concerned, when there is one.
    pub field: Option<String>,
    /// A short machine-readable reason (a contract rule code, `not_json`, `unknown_value`, …).
    pub reason: String,
    /// A sentence for humans.
    pub message: String,
}

/// The result of mapping one record.
#[derive(Debug, Clone, PartialEq)]
pub enum MapOutcome {
    Event(Box<Event>),
    /// A rule said this record is not an event for the API.
    Filtered {
        reason: String,
    },
    Failed(MapError),
}

/// Errors in the mapping configuration, each naming the mapping and the field.
#[derive(Debug)]
pub struct MappingErrors(pub Vec<String>);

/// The compiled mappings.
#[derive(Debug)]
pub struct Mapper {
    mappings: Vec<MappingConfig>,
    contract: ContractOptions,
}

impl Mapper {
    pub fn compile(cfgs: &[MappingConfig], contract: &ContractOptions) -> Result<Mapper, MappingErrors> {
        Ok(Mapper {
            mappings: cfgs.to_vec(),
            contract: *contract,
        })
    }

    pub fn map(&self, rec: &SourceRecord<'_>) -> MapOutcome {
        let fail = |stage, field: Option<&str>, reason: &str, message: String| {
            MapOutcome::Failed(MapError {
                stage,
                field: field.map(str::to_string),
                reason: reason.into(),
                message,
            })
        };
        let Some(m) = self.mappings.iter().find(|m| m.topics.iter().any(|t| t == rec.topic)) else {
            return fail(
                Stage::Mapping,
                None,
                "no_mapping",
                format!("no mapping for topic {}", rec.topic),
            );
        };
        let Some(value) = rec.value else {
            return fail(Stage::Mapping, None, "tombstone", "record has no value".into());
        };
        let v: serde_json::Value = match serde_json::from_slice(value) {
            Ok(v) => v,
            Err(e) => return fail(Stage::Mapping, None, "not_json", format!("value is not JSON: {e}")),
        };
        let mut obj = serde_json::Map::new();
        for (target, pointer) in &m.fields {
            if let Some(x) = v.pointer(pointer) {
                obj.insert(target.clone(), x.clone());
            }
        }
        let event = match Event::from_json(&obj) {
            Ok(e) => e,
            Err(v) => return fail(Stage::Mapping, Some(&v[0].field), v[0].rule, v[0].message.clone()),
        };
        match event.validate(&self.contract).into_iter().next() {
            Some(v) => fail(Stage::Validation, Some(&v.field), v.rule, v.message),
            None => MapOutcome::Event(Box::new(event)),
        }
    }
}
