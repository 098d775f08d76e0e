//! What the store fails with.

use chrono::NaiveDate;
use pg_kit::PgError;

/// An error of the PostgreSQL store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnalyticsError {
    /// The database could not be reached, or failed in a way a retry may
    /// fix. Nothing of the call was committed, except when the connection
    /// was lost while its commit was in flight: then the outcome is
    /// unknown, and a retry tells (an ingest batch retried under its id is
    /// answered as a replay if it had committed).
    #[error("PostgreSQL unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A statement was refused (a bug, or a schema this version does not
    /// know); nothing of the call was committed.
    #[error("PostgreSQL refused a statement")]
    Query(#[source] tokio_postgres::Error),
    /// The month's partition cannot be created: the default partition holds
    /// rows of that month, which must be moved first.
    #[error("the default partition holds rows of the month starting {month}")]
    PartitionBlocked {
        /// The first day of the month.
        month: NaiveDate,
    },
    /// A stored row could not be read back.
    #[error("stored data is not valid: {0}")]
    Corrupt(String),
    /// The batch id was committed before with different events: a key
    /// reused for another batch (a client bug), not a retry. Nothing was
    /// written; retrying the same call fails the same way.
    #[error("the batch id {batch_id} was committed before with different events")]
    IdempotencyKeyReused {
        /// The batch id.
        batch_id: uuid::Uuid,
    },
}

impl AnalyticsError {
    pub(crate) fn from_pg(e: PgError) -> AnalyticsError {
        match e {
            PgError::Query(e) => AnalyticsError::from_query(e),
            other => AnalyticsError::Unavailable(Box::new(other)),
        }
    }

    pub(crate) fn from_query(e: tokio_postgres::Error) -> AnalyticsError {
        let transient = match e.code() {
            // No SQLSTATE: the socket (closed, I/O), or a value that did not
            // convert, which a retry would not fix.
            None => {
                e.is_closed()
                    || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>())
            }
            Some(code) => {
                let code = code.code();
                matches!(&code[..2], "08" | "53" | "57" | "58")
                    || code == "40001"
                    || code == "40P01"
            }
        };
        if transient {
            AnalyticsError::Unavailable(Box::new(e))
        } else {
            AnalyticsError::Query(e)
        }
    }

    pub(crate) fn from_pool(e: bb8::RunError<tokio_postgres::Error>) -> AnalyticsError {
        AnalyticsError::Unavailable(Box::new(PgError::Pool(e)))
    }

    /// Whether a retry may succeed (the database was unavailable).
    pub fn is_transient(&self) -> bool {
        matches!(self, AnalyticsError::Unavailable(_))
    }
}
