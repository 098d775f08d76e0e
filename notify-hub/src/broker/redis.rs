//! Redis pub/sub between hub nodes (fred).

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::{ClientLike, EventInterface, PubsubInterface};
use tokio::sync::mpsc;

use super::{Broker, BrokerError, BrokerEvent, MembershipChange, Published};
use crate::store::BoxFuture;

/// How long a publish (or ping) may take before it counts as failed.
const PUBLISH_TIMEOUT: Duration = Duration::from_millis(500);

/// A [`Broker`] over Redis pub/sub: every node publishes to and subscribes
/// to one channel for sends, `{prefix}notify:deliveries`, and one for
/// membership changes, `{prefix}notify:memberships` (a node that predates
/// stream subscriptions never subscribes to it).
///
/// Pub/sub is fire-and-forget: a node that is disconnected from Redis misses
/// what is published meanwhile. Nothing is lost for the user: the
/// notification is already stored, and the connection notices the gap at
/// the next message (or the client resumes with `since` after reconnecting).
pub struct RedisBroker {
    channel: String,
    changes: String,
    publisher: fred::clients::Client,
    subscriber: fred::clients::SubscriberClient,
    subscribed: parking_lot::Mutex<bool>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("channel", &self.channel)
            .field("changes", &self.changes)
            .finish_non_exhaustive()
    }
}

impl RedisBroker {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379`); `prefix` keeps
    /// several deployments (or tests) on one Redis apart.
    ///
    /// The connection is set up by the suite's one Redis setup
    /// ([`redis_kit::RedisSetup`]: bounded first connect, reconnect
    /// back-off, a subscriber that re-subscribes after reconnects).
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisBroker, BrokerError> {
        let unavailable = |e: redis_kit::RedisError| BrokerError::unavailable("connect", e);
        let setup = redis_kit::RedisSetup::new(url);
        let publisher = setup.connect().await.map_err(unavailable)?;
        let subscriber = setup.connect_subscriber().await.map_err(unavailable)?;
        Ok(RedisBroker {
            channel: format!("{prefix}notify:deliveries"),
            changes: format!("{prefix}notify:memberships"),
            publisher,
            subscriber,
            subscribed: parking_lot::Mutex::new(false),
        })
    }
}

impl RedisBroker {
    /// Publishes `payload` on `channel`, bounded: during an outage fred
    /// would hold the command until it reconnects, and the writer (and
    /// every send behind it) with it.
    async fn send(&self, channel: &str, payload: String) -> Result<(), BrokerError> {
        match tokio::time::timeout(
            PUBLISH_TIMEOUT,
            self.publisher.publish::<i64, _, _>(channel, payload),
        )
        .await
        {
            Ok(result) => result
                .map(drop)
                .map_err(|e| BrokerError::unavailable("publish", e)),
            Err(elapsed) => Err(BrokerError::unavailable("publish timed out", elapsed)),
        }
    }
}

impl Broker for RedisBroker {
    fn publish(&self, message: Arc<Published>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let payload = serde_json::to_string(&*message)
                .map_err(|e| BrokerError::unavailable("publish: encoding the message", e))?;
            self.send(&self.channel, payload).await
        })
    }

    fn publish_change(
        &self,
        change: Arc<MembershipChange>,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let payload = serde_json::to_string(&*change)
                .map_err(|e| BrokerError::unavailable("publish: encoding the change", e))?;
            self.send(&self.changes, payload).await
        })
    }

    fn subscribe(&self, sink: mpsc::Sender<BrokerEvent>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            {
                let mut subscribed = self.subscribed.lock();
                if *subscribed {
                    return Err(BrokerError::AlreadySubscribed);
                }
                *subscribed = true;
            }
            let mut messages = self.subscriber.message_rx();
            // After a reconnect, whatever was published meanwhile is gone.
            let mut reconnects = self.subscriber.reconnect_rx();
            let channel = self.channel.clone();
            let changes = self.changes.clone();
            tokio::spawn(async move {
                use tokio::sync::broadcast::error::RecvError;
                loop {
                    let event = tokio::select! {
                        received = messages.recv() => match received {
                            Ok(message) => {
                                let Some(bytes) = message.value.as_bytes() else {
                                    continue;
                                };
                                let decoded = if *message.channel == *channel {
                                    serde_json::from_slice::<Published>(bytes)
                                        .map(|p| BrokerEvent::Published(Arc::new(p)))
                                } else if *message.channel == *changes {
                                    serde_json::from_slice::<MembershipChange>(bytes)
                                        .map(|c| BrokerEvent::Changed(Arc::new(c)))
                                } else {
                                    continue;
                                };
                                match decoded {
                                    Ok(event) => event,
                                    Err(e) => {
                                        tracing::warn!(error = %e, "undecodable broker message");
                                        continue;
                                    }
                                }
                            }
                            Err(RecvError::Lagged(n)) => {
                                tracing::warn!(missed = n, "broker subscriber lagged; connections resync from the store");
                                BrokerEvent::Resync
                            }
                            Err(RecvError::Closed) => break,
                        },
                        reconnected = reconnects.recv() => match reconnected {
                            Ok(_) | Err(RecvError::Lagged(_)) => {
                                tracing::info!("broker subscriber reconnected; connections resync from the store");
                                BrokerEvent::Resync
                            }
                            Err(RecvError::Closed) => break,
                        },
                    };
                    if sink.send(event).await.is_err() {
                        break;
                    }
                }
            });
            self.subscriber
                .subscribe(vec![self.channel.as_str(), self.changes.as_str()])
                .await
                .map_err(|e| BrokerError::unavailable("subscribe", e))
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            match tokio::time::timeout(PUBLISH_TIMEOUT, self.publisher.ping::<String>(None)).await {
                Ok(result) => result
                    .map(drop)
                    .map_err(|e| BrokerError::unavailable("ping", e)),
                Err(elapsed) => Err(BrokerError::unavailable("ping timed out", elapsed)),
            }
        })
    }
}
