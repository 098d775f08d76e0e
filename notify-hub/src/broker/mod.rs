//! Fan-out between hub nodes, behind the [`Broker`] trait.
//!
//! After a batch commits, the hub publishes one [`Published`] message per
//! send; every hub node sharing the broker (including the sender) receives it
//! and hands it to its own local connections. [`LocalBroker`] connects a hub
//! to itself; `RedisBroker` (feature `redis`) connects several over Redis
//! pub/sub.

#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "redis")]
pub use self::redis::RedisBroker;

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::notification::Notification;
use crate::store::{BoxFuture, Recipient};

/// A committed send, on its way to the nodes that hold its recipients.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Published {
    /// The stored notification.
    #[serde(rename = "n")]
    pub notification: Arc<Notification>,
    /// Its recipients with their sequence numbers.
    #[serde(rename = "r")]
    pub recipients: Vec<Recipient>,
}

/// What a broker hands to its hub.
#[derive(Debug, Clone)]
pub enum BrokerEvent {
    /// A committed send, from any node.
    Published(Arc<Published>),
    /// Messages may have been lost (the subscriber lagged or reconnected):
    /// every local connection re-reads its stream from the store.
    Resync,
}

/// A broker failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The broker could not be reached or refused the operation.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// `subscribe` was called twice.
    #[error("broker already has a subscriber")]
    AlreadySubscribed,
}

/// Carries committed sends to every hub node.
pub trait Broker: Send + Sync + 'static {
    /// Sends `message` to every subscribed node.
    fn publish(&self, message: Arc<Published>) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Starts forwarding every message published by any node to `sink`,
    /// and a [`BrokerEvent::Resync`] whenever messages may have been lost.
    /// The hub calls this once, at start.
    fn subscribe(&self, sink: mpsc::Sender<BrokerEvent>) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Checks that the broker answers (for readiness probes).
    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>>;
}

impl<B: Broker + ?Sized> Broker for Arc<B> {
    fn publish(&self, message: Arc<Published>) -> BoxFuture<'_, Result<(), BrokerError>> {
        (**self).publish(message)
    }
    fn subscribe(&self, sink: mpsc::Sender<BrokerEvent>) -> BoxFuture<'_, Result<(), BrokerError>> {
        (**self).subscribe(sink)
    }
    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        (**self).ping()
    }
}

/// The single-node broker: publishing hands the message straight to this
/// process's hub. Backpressure is real: `publish` waits when the hub's
/// dispatcher falls behind, so memory stays bounded.
#[derive(Debug, Default)]
pub struct LocalBroker {
    sink: Mutex<Option<mpsc::Sender<BrokerEvent>>>,
}

impl LocalBroker {
    /// A broker with no subscriber yet.
    pub fn new() -> LocalBroker {
        LocalBroker::default()
    }
}

impl Broker for LocalBroker {
    fn publish(&self, message: Arc<Published>) -> BoxFuture<'_, Result<(), BrokerError>> {
        let sink = self.sink.lock().clone();
        Box::pin(async move {
            match sink {
                // No subscriber (or it is gone): nobody is connected here.
                None => Ok(()),
                Some(sink) => {
                    let _ = sink.send(BrokerEvent::Published(message)).await;
                    Ok(())
                }
            }
        })
    }

    fn subscribe(&self, sink: mpsc::Sender<BrokerEvent>) -> BoxFuture<'_, Result<(), BrokerError>> {
        let mut slot = self.sink.lock();
        let result = if slot.is_some() {
            Err(BrokerError::AlreadySubscribed)
        } else {
            *slot = Some(sink);
            Ok(())
        };
        Box::pin(async move { result })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }
}
