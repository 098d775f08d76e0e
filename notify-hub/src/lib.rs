//! # notify_hub: real-time notifications with durable history
//!
//! Per-user and per-group notifications, stored durably before anyone sees
//! them, delivered live to every connection of a user, and recoverable
//! after a disconnect with no gap and no duplicate.
//!
//! - [`Hub`] is the transport-agnostic core: `send_to_users`,
//!   `broadcast_to_group`, `history`, group membership, and
//!   [`Hub::subscribe`], which gives a [`Subscription`]: a stream of
//!   [`Delivery`]s in per-user sequence order.
//! - Storage sits behind [`Store`]: [`MemoryStore`] (embedded default) and
//!   `PgStore` (feature `postgres`). Sends are written in batches (group
//!   commit) by one writer task.
//! - Scale-out sits behind [`Broker`]: [`LocalBroker`] (one node) and
//!   `RedisBroker` (feature `redis`).
//! - Errors: every fallible call returns [`Error`] (or, at the store and
//!   broker level, [`StoreError`] / [`BrokerError`]); each keeps the
//!   driver's error as its source and has a `kind()` ([`ErrorKind`]).
//! - Time: the hub reads one injectable clock, [`HubConfig::clock`]
//!   (`time_kit`), for timestamps and token expiry.
//! - Write-through ([`LiveWriter`], ADR 0027): a transport may give a
//!   [`StreamSubscription`] a writer, and a live group item is then written
//!   to the connection by the task that dispatches it, without waking the
//!   connection's task, while the subscription waits with nothing queued.
//! - Feature `server`: the hyper 1.x WebSocket adapter and HTTP API
//!   ([`server`]); feature `jwt`: token verification with the suite's JWT
//!   verifier, ferrokeel-jwt ([`auth`]).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), notify_hub::Error> {
//! use notify_hub::{Hub, HubConfig, Notification};
//!
//! let hub = Hub::in_memory(HubConfig::default()).await?;
//! let mut alice = hub.subscribe("alice", None).await?;
//! hub.send_to_users(&["alice"], Notification::new("order.shipped", "Shipped", "Order 42")).await?;
//! let delivery = alice.next().await.expect("live delivery");
//! assert_eq!((delivery.seq, delivery.notification.kind.as_str()), (1, "order.shipped"));
//! # Ok(()) }
//! ```
//!
//! Design, protocol and API documents: `docs/notify-hub/`.
#![forbid(unsafe_code)]

// Modules point one way: notification (the domain) → store → broker →
// live → registry → subscription → hub → server; error and auth sit
// beside them.
pub mod auth;
pub mod broker;
mod error;
mod hub;
mod live;
mod notification;
mod registry;
#[cfg(feature = "server")]
pub mod server;
pub mod store;
mod subscription;

pub use broker::{
    Broker, BrokerError, BrokerEvent, ChangeKind, GroupOffset, LocalBroker, MembershipChange,
    Published,
};
pub use error::{Error, ErrorKind};
pub use hub::{Hub, HubConfig, Receipt};
pub use live::{LiveItem, LiveWriter};
pub use notification::{Delivery, InvalidNotification, Limits, Notification, SharedRender};
pub use registry::HubStats;
pub use store::{Appended, MemoryStore, Store, StoreError};
pub use subscription::{Closed, Position, StreamEvent, StreamSubscription, Subscription};

/// The former name of [`Error`], kept so existing code compiles.
pub type HubError = Error;
