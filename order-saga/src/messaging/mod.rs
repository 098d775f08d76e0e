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
//!
//! | piece | in memory (default) | durable |
//! |---|---|---|
//! | outbox | [`MemoryOutbox`] | `orders.outbox` via [`outbox::append`] + [`PgOutboxSource`] (feature `postgres`) |
//! | relay | [`OutboxRelay`] | [`OutboxRelay`] (one leader per database) |
//! | bus | [`MemoryBus`] | [`RedisStreamPublisher`] (feature `redis`) |
//! | consumer | [`MemoryConsumer`] | [`StreamConsumer`] (feature `redis`) |
//! | idempotency | [`MemoryTimeline`]'s id set | [`inbox::process_once`] (feature `postgres`) |
//!
//! The design, with its guarantees and failure modes, is in
//! `docs/order-saga/MESSAGING.md`.

use crate::BoxFuture;
use crate::events::EventEnvelope;

pub mod handler;
#[cfg(feature = "postgres")]
pub mod inbox;
pub mod memory;
pub mod outbox;
#[cfg(feature = "redis")]
pub mod redis;
pub mod relay;
pub mod timeline;

pub use handler::{ConsumerPolicy, ConsumerSnapshot, ConsumerStats, EventHandler, HandlerError};
pub use memory::{
    Delivery, MemoryBus, MemoryBusConfig, MemoryConsumer, MemoryConsumerHandle, MemoryDeadLetter,
};
pub use outbox::{MemoryOutbox, MemoryOutboxSource, OutboxError, OutboxRecord, OutboxSource};
#[cfg(feature = "postgres")]
pub use outbox::{OUTBOX_MIGRATION, PgOutboxSource};
#[cfg(feature = "redis")]
pub use redis::{
    GroupStart, RedisStreamPublisher, StreamConsumer, StreamConsumerConfig, StreamConsumerHandle,
    StreamError, StreamPublisherConfig,
};
pub use relay::{OutboxRelay, RelayConfig, RelayHandle, RelaySnapshot, RelayStats};
#[cfg(feature = "postgres")]
pub use timeline::OrderTimeline;
pub use timeline::{MemoryTimeline, Timeline, TimelineEntry, TimelineError};

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
