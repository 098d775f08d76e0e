//! Fan-out between hub nodes, behind the [`Broker`] trait.
//!
//! After a batch commits, the hub hands each send to its own local
//! connections directly, then publishes one [`Published`] message per send;
//! every other hub node sharing the broker receives it and hands it to its
//! local connections. A node's own messages may come back to it (Redis
//! pub/sub echoes them); it recognises them by [`Published::origin`] and
//! skips them. [`LocalBroker`] is the single-node broker (there is no other
//! node to reach); `RedisBroker` (feature `redis`) connects several over
//! Redis pub/sub.

#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "redis")]
pub use self::redis::RedisBroker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;
use uuid::Uuid;

use crate::notification::Notification;
use crate::store::{BoxFuture, Recipient};

/// A committed send, on its way to the nodes that hold its recipients.
///
/// A broker carries it unchanged (including [`origin`](Published::origin)):
/// its JSON is `{"n": notification, "r": [{"user_id", "seq"}, …], "o": origin}`,
/// with `"g": {"g": group, "k": offset}` added for a group send (ADR 0026;
/// a node that does not know the key ignores it).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Published {
    /// The stored notification.
    #[serde(rename = "n")]
    pub notification: Arc<Notification>,
    /// Its recipients with their sequence numbers.
    #[serde(rename = "r")]
    pub recipients: Vec<Recipient>,
    /// The hub node that committed it ([`Hub::node_id`](crate::Hub::node_id)).
    /// That node has already handed it to its own connections, so it skips
    /// the copy the broker brings back. Nil when absent from the message.
    #[serde(rename = "o", default)]
    pub origin: Uuid,
    /// For a group send: its group and its offset in the group's stream.
    #[serde(rename = "g", default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupOffset>,
}

/// Where a group send sits in its group's stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupOffset {
    /// The group.
    #[serde(rename = "g")]
    pub group: String,
    /// The send's offset in the group's stream.
    #[serde(rename = "k")]
    pub offset: u64,
}

/// A committed change of membership, on its way to the nodes that hold
/// the user's stream subscriptions (ADR 0026). JSON:
/// `{"c": "join" | "leave", "g": group, "u": user, "k": offset, "o": origin}`,
/// where `k` is the join's `joined_after` or the leave record's offset.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MembershipChange {
    /// Joined or left.
    #[serde(rename = "c")]
    pub kind: ChangeKind,
    /// The group.
    #[serde(rename = "g")]
    pub group: String,
    /// The user.
    #[serde(rename = "u")]
    pub user: String,
    /// `joined_after` for a join, the leave record's offset for a leave.
    #[serde(rename = "k")]
    pub offset: u64,
    /// The hub node that committed it; it skips its own.
    #[serde(rename = "o", default)]
    pub origin: Uuid,
}

/// What a [`MembershipChange`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// The user joined the group.
    Join,
    /// The user left the group.
    Leave,
}

/// What a broker hands to its hub.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum BrokerEvent {
    /// A committed send, from any node.
    Published(Arc<Published>),
    /// A committed change of membership, from any node.
    Changed(Arc<MembershipChange>),
    /// Messages may have been lost (the subscriber lagged or reconnected):
    /// every local connection re-reads its stream from the store.
    Resync,
}

/// A broker failure. `Display` names the operation; the client's error (or
/// the timeout) is the [`source`](std::error::Error::source). Its `kind()`
/// is [`ErrorKind::Unavailable`](crate::ErrorKind::Unavailable) or
/// [`ErrorKind::Misuse`](crate::ErrorKind::Misuse).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The broker could not be reached or refused the operation.
    #[error("broker unavailable ({operation})")]
    Unavailable {
        /// What the broker was doing, e.g. `publish` or `ping`.
        operation: &'static str,
        /// The client's error or the timeout, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },
    /// `subscribe` was called twice.
    #[error("broker already has a subscriber")]
    AlreadySubscribed,
}

impl BrokerError {
    /// An [`Unavailable`](BrokerError::Unavailable) error during `operation`, caused by `source`.
    pub fn unavailable(
        operation: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> BrokerError {
        BrokerError::Unavailable {
            operation,
            source: Some(Box::new(source)),
        }
    }
}

/// Carries committed sends to every hub node.
pub trait Broker: Send + Sync + 'static {
    /// Sends `message` to every subscribed node. The publishing node may or
    /// may not receive it back; it skips its own either way.
    fn publish(&self, message: Arc<Published>) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Starts forwarding every message published by any node to `sink`,
    /// and a [`BrokerEvent::Resync`] whenever messages may have been lost.
    /// The hub calls this once, at start.
    fn subscribe(&self, sink: mpsc::Sender<BrokerEvent>) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Checks that the broker answers (for readiness probes).
    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Sends a membership change to every subscribed node, for their
    /// stream subscriptions. The default does nothing: right for a broker
    /// with no other node to reach. A broker that connects nodes forwards
    /// them to the subscribed sinks as [`BrokerEvent::Changed`].
    fn publish_change(
        &self,
        change: Arc<MembershipChange>,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        let _ = change;
        Box::pin(async { Ok(()) })
    }
}

impl<B: Broker + ?Sized> Broker for Arc<B> {
    fn publish(&self, message: Arc<Published>) -> BoxFuture<'_, Result<(), BrokerError>> {
        (**self).publish(message)
    }
    fn publish_change(
        &self,
        change: Arc<MembershipChange>,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        (**self).publish_change(change)
    }
    fn subscribe(&self, sink: mpsc::Sender<BrokerEvent>) -> BoxFuture<'_, Result<(), BrokerError>> {
        (**self).subscribe(sink)
    }
    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        (**self).ping()
    }
}

/// The single-node broker: there is no other node, and the hub hands its
/// own sends to its own connections without a broker, so publishing does
/// nothing.
#[derive(Debug, Default)]
pub struct LocalBroker {
    subscribed: AtomicBool,
}

impl LocalBroker {
    /// A broker with no subscriber yet.
    pub fn new() -> LocalBroker {
        LocalBroker::default()
    }
}

impl Broker for LocalBroker {
    fn publish(&self, _message: Arc<Published>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }

    fn subscribe(
        &self,
        _sink: mpsc::Sender<BrokerEvent>,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        let result = if self.subscribed.swap(true, Ordering::AcqRel) {
            Err(BrokerError::AlreadySubscribed)
        } else {
            Ok(())
        };
        Box::pin(async move { result })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }
}
