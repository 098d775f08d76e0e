//! Messaging: the transactional outbox's relay and the event bus it
//! publishes to, with idempotent consumers.
//!
//! The order store writes each [`EventEnvelope`] to its outbox in the same
//! transaction as the state change it describes. A relay reads the outbox in
//! order and hands batches to an [`EventPublisher`]; consumers read from the
//! bus in consumer groups and de-duplicate through an inbox.
//!
//! Buses: in memory (the embedded default) and Redis Streams (feature
//! `redis`).

use crate::BoxFuture;
use crate::events::EventEnvelope;

/// What publishing to the bus fails with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// The bus could not be reached or refused the write; the relay keeps
    /// the events in the outbox and retries.
    #[error("event bus unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// An event could not be encoded or decoded.
    #[error("malformed event")]
    Malformed(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Where the outbox relay publishes events.
pub trait EventPublisher: Send + Sync + 'static {
    /// Publishes `events` in order; on error none or some may have been
    /// published (consumers de-duplicate by event id).
    fn publish<'a>(&'a self, events: &'a [EventEnvelope]) -> BoxFuture<'a, Result<(), BusError>>;
}
