//! The durable FIFO queue of egress requests in Redis (DESIGN.md 5), with de-duplication.
//!
//! Every multi-key change is one Lua script, and every key of queue `q` starts with
//! `egress-scaler:{q}:` so that all of them live in one Redis Cluster slot.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::model::{Demand, EgressKind};

/// A validated queue name: 1 to 64 of `[A-Za-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct QueueName(String);

/// The queue name is empty, too long or has characters outside `[A-Za-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid queue name {0:?}: use 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'")]
pub struct InvalidQueueName(pub String);

impl FromStr for QueueName {
    type Err = InvalidQueueName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let valid = !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if valid {
            Ok(QueueName(s.to_owned()))
        } else {
            Err(InvalidQueueName(s.to_owned()))
        }
    }
}

impl QueueName {
    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key prefix of this queue, hash tag included: `egress-scaler:{q}:`.
    pub fn key_prefix(&self) -> String {
        format!("egress-scaler:{{{}}}:", self.0)
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
