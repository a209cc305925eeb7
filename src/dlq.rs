//! The dead-letter topic: records that cannot be delivered, with headers saying why.

use serde::{Deserialize, Serialize};

/// `[dead_letter]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// The topic receiving dead letters (on the source cluster).
    #[serde(default = "default_topic")]
    pub topic: String,
}

fn default_topic() -> String {
    "datapulse-bridge-dead-letter".into()
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig { topic: default_topic() }
    }
}

impl DeadLetterConfig {
    pub fn validate(&self, origin: &dyn Fn(&str) -> String) -> Vec<String> {
        if self.topic.trim().is_empty() {
            vec![format!(
                "key `dead_letter.topic` {}: must not be empty",
                origin("dead_letter.topic")
            )]
        } else {
            Vec::new()
        }
    }
}
