//! The inbox: how a PostgreSQL consumer handles each event once.
//!
//! The buses deliver at least once (a relay republishes after a crash, a
//! consumer's pending events are taken over by another). A consumer makes
//! its effect idempotent by calling [`process_once`] in the same
//! transaction as the effect: the first transaction to record
//! `(consumer, event_id)` in `orders.inbox` applies the effect; any other
//! (a redelivery, or a second consumer racing on the same event) finds the
//! row, skips the effect, and commits nothing new. Two racing transactions
//! serialize on the primary key: the second waits for the first to commit
//! and then sees the row.

use std::time::Duration;

use tokio_postgres::GenericClient;
use tokio_postgres::types::Type;

use crate::pg::{PgTransaction, Prepared};
use uuid::Uuid;

/// Records that `consumer` processed `event_id`, in the consumer's
/// transaction `tx`. Returns `true` the first time (apply the effect in the
/// same transaction) and `false` if it was already processed (skip it).
pub async fn process_once(
    tx: &PgTransaction<'_>,
    consumer: &str,
    event_id: Uuid,
) -> Result<bool, tokio_postgres::Error> {
    let inserted = tx
        .execute_prepared(
            "INSERT INTO orders.inbox (consumer, event_id) VALUES ($1, $2)
             ON CONFLICT (consumer, event_id) DO NOTHING",
            &[(&consumer, Type::TEXT), (&event_id, Type::UUID)],
        )
        .await?;
    Ok(inserted == 1)
}

/// Deletes inbox rows older than `older_than`; returns how many. Keep
/// `older_than` well beyond the longest an event can be redelivered (the
/// stream's retention), or a late redelivery is processed again.
pub async fn purge(
    client: &impl GenericClient,
    older_than: Duration,
) -> Result<u64, tokio_postgres::Error> {
    let secs = older_than.as_secs_f64();
    let mut purged = 0;
    loop {
        let n = client
            .execute(
                "DELETE FROM orders.inbox WHERE ctid IN (
                     SELECT ctid FROM orders.inbox
                     WHERE processed_at < now() - make_interval(secs => $1)
                     LIMIT 5000)",
                &[&secs],
            )
            .await?;
        purged += n;
        if n < 5000 {
            return Ok(purged);
        }
    }
}

/// Whether an error is about the connection or the server's state (down,
/// restarting, overloaded, a serialization conflict) rather than the
/// statement: retrying later may work.
pub(crate) fn is_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => true,
        Some(code) => {
            let code = code.code();
            matches!(&code[..2], "08" | "53" | "57" | "58") || code == "40001" || code == "40P01"
        }
    }
}
