//! What the Twirp front door remembers between an SDK's calls: the ticket a caller was told
//! to call again for (`egress-scaler:{q}:held:<digest>`, the SHA-256 of the recording's
//! de-duplication key), so that the retry learns how that ticket ended even after it freed
//! its key: a failure or a cancel is answered to the retry rather than queued again.

use std::time::Duration;

use super::{Keys, QueueError, QueueName, QueueStore, TicketId, decode, parse_ticket_id};

fn held_key(queue: &QueueName, dedup_key: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest: String = Sha256::digest(dedup_key.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    Keys::of(queue).key(&format!("held:{digest}"))
}

impl QueueStore {
    /// Remembers for `ttl` that a caller was told to call again for `ticket`, the holder of
    /// `dedup_key`.
    pub async fn remember_held(
        &self,
        queue: &QueueName,
        dedup_key: &str,
        ticket: &TicketId,
        ttl: Duration,
    ) -> Result<(), QueueError> {
        self.query(
            redis::cmd("SET")
                .arg(held_key(queue, dedup_key))
                .arg(ticket.as_str())
                .arg("PX")
                .arg(ttl.as_millis().max(1) as u64),
        )
        .await?;
        Ok(())
    }

    /// The ticket a caller was last told to call again for under `dedup_key`, if remembered.
    pub async fn held_ticket(
        &self,
        queue: &QueueName,
        dedup_key: &str,
    ) -> Result<Option<TicketId>, QueueError> {
        let value = self
            .query(redis::cmd("GET").arg(held_key(queue, dedup_key)))
            .await?;
        let id: Option<String> = decode(value, "held ticket")?;
        id.map(parse_ticket_id).transpose()
    }

    /// Forgets the remembered ticket once its outcome has been answered.
    pub async fn forget_held(&self, queue: &QueueName, dedup_key: &str) -> Result<(), QueueError> {
        self.query(redis::cmd("DEL").arg(held_key(queue, dedup_key)))
            .await?;
        Ok(())
    }
}
