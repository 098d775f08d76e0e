//! The hub: durable sends with group commit, group membership, history, and
//! live delivery to local subscriptions.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use time_kit::SharedClock;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::broker::{
    Broker, BrokerError, BrokerEvent, ChangeKind, GroupOffset, LocalBroker, MembershipChange,
    Published,
};
use crate::error::Error;
use crate::notification::{Delivery, Limits, Notification, valid_id};
use crate::registry::{HubStats, Registry};
use crate::store::{Append, Appended, Audience, HistoryItem, MemoryStore, Store};
use crate::subscription::{Closed, Position, StreamSubscription, Subscription};

/// Hub settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HubConfig {
    /// Deliveries buffered per connection before it counts as a slow
    /// consumer and is closed. Default 1,024.
    pub queue_capacity: usize,
    /// Most sends written in one store transaction (group commit). Default 1,024.
    pub max_batch: usize,
    /// Sends waiting for the writer before `send_*` waits too. Default 16,384.
    pub write_queue: usize,
    /// Deliveries read from the store per page when a connection replays.
    /// Default 500.
    pub replay_page: usize,
    /// Most recipients of one `send_to_users`. Default 10,000.
    pub max_recipients: usize,
    /// Most members a group may have for `broadcast_to_group` (checked when
    /// the batch commits, and only while `v1_group_fanout` is on). Default
    /// 100,000.
    pub max_group_recipients: usize,
    /// Whether a group send also writes protocol v1's per-member copies
    /// (a seq in each member's sequence and its delivery row), so that
    /// `notify.v1` connections and [`Hub::history`] see group sends. Off,
    /// a group send writes one item in the group's stream whatever the
    /// group's size (ADR 0026), and reaches only `notify.v2` connections
    /// (stream subscriptions); v1 connections then get direct sends only.
    /// Give every node the same setting. Default on.
    pub v1_group_fanout: bool,
    /// Largest `limit` accepted by [`Hub::history`]. Default 1,000.
    pub max_history: usize,
    /// Size limits on notifications.
    pub limits: Limits,
    /// The wall clock the hub (and its server) reads: the `timestamp` and
    /// the UUIDv7 `id` a send gets when it has none, a token's expiry on an
    /// open WebSocket (close 4001), the delivery-latency metric. Default:
    /// the system clock; tests pass a `time_kit::ManualClock`.
    pub clock: SharedClock,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            queue_capacity: 1024,
            max_batch: 1024,
            write_queue: 16_384,
            replay_page: 500,
            max_recipients: 10_000,
            max_group_recipients: 100_000,
            v1_group_fanout: true,
            max_history: 1000,
            limits: Limits::default(),
            clock: time_kit::system(),
        }
    }
}

impl HubConfig {
    /// Sets [`queue_capacity`](HubConfig::queue_capacity) (at least 1).
    pub fn with_queue_capacity(mut self, capacity: usize) -> Self {
        self.queue_capacity = capacity.max(1);
        self
    }

    /// Sets [`max_batch`](HubConfig::max_batch) (at least 1).
    pub fn with_max_batch(mut self, max: usize) -> Self {
        self.max_batch = max.max(1);
        self
    }

    /// Sets [`max_group_recipients`](HubConfig::max_group_recipients).
    pub fn with_max_group_recipients(mut self, max: usize) -> Self {
        self.max_group_recipients = max;
        self
    }

    /// Sets [`v1_group_fanout`](HubConfig::v1_group_fanout).
    pub fn with_v1_group_fanout(mut self, on: bool) -> Self {
        self.v1_group_fanout = on;
        self
    }

    /// Sets [`clock`](HubConfig::clock).
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Sets [`replay_page`](HubConfig::replay_page) (at least 1).
    pub fn with_replay_page(mut self, page: usize) -> Self {
        self.replay_page = page.max(1);
        self
    }
}

/// What a successful send stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The notification id.
    pub id: Uuid,
    /// Its timestamp.
    pub timestamp: DateTime<Utc>,
    /// How many users it was stored for; for a group send, how many
    /// members the group had (whether or not v1 copies were written).
    pub recipients: usize,
}

struct WriteJob {
    append: Append,
    reply: oneshot::Sender<Result<Receipt, Error>>,
}

/// Committed sends waiting for this node's dispatcher. The writer waits
/// when it is full, so memory stays bounded if the dispatcher falls behind.
const LOCAL_QUEUE: usize = 4096;

/// The notification hub. Cheap to clone; every clone is the same hub.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), notify_hub::Error> {
/// use notify_hub::{Hub, HubConfig, Notification};
///
/// let hub = Hub::in_memory(HubConfig::default()).await?;
/// let mut live = hub.subscribe("u1", None).await?;
/// hub.send_to_users(&["u1", "u2"], Notification::new("order.shipped", "Shipped", "On its way")).await?;
/// hub.join_group("g1", "u1").await?;
/// hub.broadcast_to_group("g1", Notification::new("news", "Hello", "Group news")).await?;
///
/// assert_eq!(live.next().await.unwrap().seq, 1);
/// assert_eq!(live.next().await.unwrap().notification.kind, "news");
/// let recent: Vec<Notification> = hub.history("u1", 50).await?; // newest first
/// assert_eq!(recent[0].kind, "news");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    config: HubConfig,
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    registry: Arc<Registry>,
    node: Uuid,
    writes: mpsc::Sender<WriteJob>,
    /// Set first: no new sends; the writer drains its queue, then ends,
    /// which ends the dispatcher once it has dispatched everything.
    shutdown: watch::Sender<bool>,
    /// Set once the dispatcher is done (after the registry ends the
    /// subscriptions): a second `shutdown` call waits for it.
    ended: watch::Sender<bool>,
    tasks: Mutex<Option<(JoinHandle<()>, JoinHandle<()>)>>,
}

impl Drop for Inner {
    /// The last handle on the hub is gone: its subscriptions end (after
    /// flushing what they have queued), as after a shutdown.
    fn drop(&mut self) {
        self.registry.end_all();
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("node", &self.inner.node)
            .field("config", &self.inner.config)
            .field("connections", &self.inner.registry.stats.connections())
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// A single-node hub with the in-memory store and the local broker.
    pub async fn in_memory(config: HubConfig) -> Result<Hub, Error> {
        Hub::start(config, MemoryStore::new(), LocalBroker::new()).await
    }

    /// Starts a hub on `store` and `broker`: subscribes to the broker and
    /// spawns the group-commit writer and the dispatcher. Needs a tokio
    /// runtime.
    pub async fn start(
        config: HubConfig,
        store: impl Store,
        broker: impl Broker,
    ) -> Result<Hub, Error> {
        let store: Arc<dyn Store> = Arc::new(store);
        let broker: Arc<dyn Broker> = Arc::new(broker);
        let registry = Arc::new(Registry::default());
        let node = Uuid::now_v7();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (ended, _) = watch::channel(false);
        let (broker_tx, broker_rx) = mpsc::channel(4096);
        broker.subscribe(broker_tx).await?;
        let (local_tx, local_rx) = mpsc::channel(LOCAL_QUEUE);
        let (writes, writes_rx) = mpsc::channel(config.write_queue.max(1));
        let writer = tokio::spawn(write_loop(
            writes_rx,
            Arc::clone(&store),
            Arc::clone(&broker),
            Writer {
                registry: Arc::clone(&registry),
                local: local_tx,
                node,
                max_batch: config.max_batch.max(1),
            },
            shutdown_rx,
        ));
        let dispatcher = tokio::spawn(dispatch_loop(
            local_rx,
            broker_rx,
            Arc::clone(&registry),
            node,
        ));
        Ok(Hub {
            inner: Arc::new(Inner {
                config,
                store,
                broker,
                registry,
                node,
                writes,
                shutdown,
                ended,
                tasks: Mutex::new(Some((writer, dispatcher))),
            }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &HubConfig {
        &self.inner.config
    }

    /// This hub's node id: the [`Published::origin`] of its sends.
    pub fn node_id(&self) -> Uuid {
        self.inner.node
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &HubStats {
        &self.inner.registry.stats
    }

    /// Open subscriptions (connections) on this node.
    pub fn connection_count(&self) -> usize {
        self.inner.registry.stats.connections()
    }

    /// Stores `notification` for each of `users` (duplicates count once),
    /// then delivers it live. Returns once it is durably stored and handed
    /// to this node's dispatcher.
    pub async fn send_to_users<U: AsRef<str>>(
        &self,
        users: &[U],
        notification: Notification,
    ) -> Result<Receipt, Error> {
        if users.is_empty() {
            return Err(Error::NoRecipients);
        }
        let max = self.inner.config.max_recipients;
        if users.len() > max {
            return Err(Error::TooManyRecipients { max });
        }
        let mut list = Vec::with_capacity(users.len());
        for user in users {
            let user = user.as_ref();
            if !valid_id(user) {
                return Err(Error::InvalidId("user"));
            }
            list.push(user.to_owned());
        }
        // Sorted: a stable lock order in stores that lock per user.
        list.sort_unstable();
        list.dedup();
        self.submit(Audience::Users(list), notification).await
    }

    /// Stores `notification` for every current member of `group`, then
    /// delivers it live. Returns once it is durably stored and handed to
    /// this node's dispatcher.
    pub async fn broadcast_to_group(
        &self,
        group: &str,
        notification: Notification,
    ) -> Result<Receipt, Error> {
        if !valid_id(group) {
            return Err(Error::InvalidId("group"));
        }
        self.submit(Audience::Group(group.to_owned()), notification)
            .await
    }

    async fn submit(
        &self,
        audience: Audience,
        mut notification: Notification,
    ) -> Result<Receipt, Error> {
        notification.validate(&self.inner.config.limits)?;
        if *self.inner.shutdown.borrow() {
            return Err(Error::ShutDown);
        }
        notification.stamp(self.inner.config.clock.now());
        let (reply, receipt) = oneshot::channel();
        let job = WriteJob {
            append: Append {
                fan_out: self.inner.config.v1_group_fanout,
                max_recipients: match audience {
                    Audience::Users(_) => usize::MAX,
                    Audience::Group(_) => self.inner.config.max_group_recipients,
                },
                audience,
                notification: Arc::new(notification),
            },
            reply,
        };
        self.inner
            .writes
            .send(job)
            .await
            .map_err(|_| Error::ShutDown)?;
        receipt.await.map_err(|_| Error::ShutDown)?
    }

    /// Adds `user` to `group`; `true` if they were not a member yet. The
    /// user's stream subscriptions on this node start receiving the group.
    pub async fn join_group(&self, group: &str, user: &str) -> Result<bool, Error> {
        self.change_membership(ChangeKind::Join, group, user).await
    }

    /// Removes `user` from `group`; `true` if they were a member. Stream
    /// subscriptions on this node see the leave at its place in the group's
    /// stream.
    pub async fn leave_group(&self, group: &str, user: &str) -> Result<bool, Error> {
        self.change_membership(ChangeKind::Leave, group, user).await
    }

    /// Stores a join or a leave, then tells this node's stream
    /// subscriptions and the other nodes. In a task of its own: once the
    /// store has committed, they must hear of it even if the caller stops
    /// waiting.
    async fn change_membership(
        &self,
        kind: ChangeKind,
        group: &str,
        user: &str,
    ) -> Result<bool, Error> {
        check_ids(group, user)?;
        let hub = self.clone();
        let (group, user) = (group.to_owned(), user.to_owned());
        let changed = tokio::spawn(async move {
            let store = &hub.inner.store;
            let offset = match kind {
                ChangeKind::Join => store.join_group(&group, &user).await?,
                ChangeKind::Leave => store.leave_group(&group, &user).await?,
            };
            if let Some(offset) = offset {
                hub.inner.registry.changed(kind, &group, &user, offset);
                hub.publish_change(kind, &group, &user, offset).await;
            }
            Ok::<_, Error>(offset.is_some())
        });
        changed.await.map_err(|_| Error::ShutDown)?
    }

    /// Tells the other nodes' stream subscriptions of a committed change of
    /// membership. A failure is counted, not returned: the change is
    /// stored, a leave still reaches them in order through the group's
    /// items, and a join when the subscription restarts or resyncs.
    async fn publish_change(&self, kind: ChangeKind, group: &str, user: &str, offset: u64) {
        let change = Arc::new(MembershipChange {
            kind,
            group: group.to_owned(),
            user: user.to_owned(),
            offset,
            origin: self.inner.node,
        });
        if let Err(e) = self.inner.broker.publish_change(change).await {
            self.inner
                .registry
                .stats
                .broker_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %crate::error::report(&e), "publishing a membership change failed");
        }
    }

    /// The newest `limit` notifications of `user`, newest first.
    pub async fn history(&self, user: &str, limit: usize) -> Result<Vec<Notification>, Error> {
        Ok(self
            .deliveries(user, limit)
            .await?
            .into_iter()
            .map(|d| Arc::unwrap_or_clone(d.notification))
            .collect())
    }

    /// Like [`history`](Hub::history), with each notification's sequence number.
    pub async fn deliveries(&self, user: &str, limit: usize) -> Result<Vec<Delivery>, Error> {
        if !valid_id(user) {
            return Err(Error::InvalidId("user"));
        }
        let max = self.inner.config.max_history;
        if limit == 0 || limit > max {
            return Err(Error::InvalidLimit { max });
        }
        Ok(self.inner.store.history(user, limit).await?)
    }

    /// The newest `limit` notifications of `user` across their streams
    /// (ADR 0026): direct sends, and the sends of each group inside the
    /// time they were a member, newest first. What a `notify.v2` connection
    /// delivered, whether or not v1's copies of group sends are written.
    pub async fn stream_history(
        &self,
        user: &str,
        limit: usize,
    ) -> Result<Vec<HistoryItem>, Error> {
        if !valid_id(user) {
            return Err(Error::InvalidId("user"));
        }
        let max = self.inner.config.max_history;
        if limit == 0 || limit > max {
            return Err(Error::InvalidLimit { max });
        }
        Ok(self.inner.store.stream_history(user, limit).await?)
    }

    /// Opens a live subscription for `user`. With `since = Some(n)` it first
    /// replays every stored notification with `seq > n`; with `None` it
    /// starts after the user's latest stored notification. Either way it
    /// continues live with no gap and no duplicate. A `since` above the
    /// user's latest seq counts as that seq, exactly as
    /// [`Subscription::resume`] does.
    pub async fn subscribe(&self, user: &str, since: Option<u64>) -> Result<Subscription, Error> {
        if !valid_id(user) {
            return Err(Error::InvalidId("user"));
        }
        if *self.inner.shutdown.borrow() {
            return Err(Error::ShutDown);
        }
        // Register first, read the position second: whatever commits after
        // the read arrives live, whatever committed before is in the store.
        let mut subscription = Subscription::register(
            Arc::clone(&self.inner.registry),
            Arc::clone(&self.inner.store),
            user,
            self.inner.config.queue_capacity,
            self.inner.config.replay_page,
        );
        let latest = self.inner.store.last_seq(user).await?;
        subscription.start(latest, since);
        Ok(subscription)
    }

    /// Subscribes to `user`'s streams (ADR 0026): their inbox (direct
    /// sends) and one stream per group they are a member of, each numbered
    /// on its own. With `from`, every stream it names continues after it
    /// (a past membership is read to its leave record, then a current one
    /// of the same group from its start), and a current group it does not
    /// name is announced and read from the join on; without `from`, every
    /// stream starts at its current end. Either way each stream continues
    /// live with no gap and no duplicate, and joins and leaves arrive as
    /// [`StreamEvent::Joined`](crate::StreamEvent::Joined) and
    /// [`StreamEvent::Left`](crate::StreamEvent::Left): through this hub at
    /// once, through another node by the broker's membership messages (one
    /// that was lost: a leave at the group's next item here, a join at the
    /// next resync).
    pub async fn subscribe_streams(
        &self,
        user: &str,
        from: Option<&Position>,
    ) -> Result<StreamSubscription, Error> {
        if !valid_id(user) {
            return Err(Error::InvalidId("user"));
        }
        if *self.inner.shutdown.borrow() {
            return Err(Error::ShutDown);
        }
        StreamSubscription::start(
            Arc::clone(&self.inner.registry),
            Arc::clone(&self.inner.store),
            user,
            // While v1's copies are written, a group send takes two places
            // in a stream subscription's queue (the copy in its inbox
            // sequence, skipped, and the group's item): twice the places,
            // so that it overflows at the same burst as a v1 one.
            self.inner.config.queue_capacity.saturating_mul(2),
            self.inner.config.replay_page,
            from,
        )
        .await
        .map_err(|closed| match closed {
            Closed::Store(e) => Error::Store(e),
            _ => Error::ShutDown,
        })
    }

    /// Checks the store and the broker (for readiness probes).
    pub async fn ready(&self) -> Result<(), Error> {
        self.inner.store.ping().await?;
        self.inner.broker.ping().await?;
        Ok(())
    }

    /// Stops taking sends, writes every send already queued and hands it to
    /// this node's connections, then ends every subscription (after it has
    /// handed out what it had queued). Every send acknowledged before is
    /// therefore handed out by every local subscription of its recipients
    /// before that subscription ends, whatever the broker does. Returns
    /// within about `timeout`; `false` if the writer or the dispatcher had
    /// not finished by then.
    pub async fn shutdown(&self, timeout: Duration) -> bool {
        // `send_replace`, not `send`: `send` keeps the old value when no
        // receiver is alive, and a later `subscribe` would then wait for a
        // shutdown that already happened.
        self.inner.shutdown.send_replace(true);
        let deadline = tokio::time::Instant::now() + timeout;
        let tasks = self.inner.tasks.lock().take();
        let Some((writer, dispatcher)) = tasks else {
            // Another call is shutting down: wait for it to finish.
            let mut ended = self.inner.ended.subscribe();
            return tokio::time::timeout_at(deadline, ended.wait_for(|e| *e))
                .await
                .is_ok_and(|r| r.is_ok());
        };
        let mut finished = true;
        // The writer ends once its queue is drained; that closes the
        // dispatcher's local queue, and the dispatcher ends once it has
        // dispatched all of it. An aborted writer closes it too.
        for task in [writer, dispatcher] {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
                finished = false;
            }
        }
        // Only now: every acknowledged send has reached the subscriptions' queues.
        self.inner.registry.end_all();
        self.inner.ended.send_replace(true);
        finished
    }
}

fn check_ids(group: &str, user: &str) -> Result<(), Error> {
    if !valid_id(group) {
        return Err(Error::InvalidId("group"));
    }
    if !valid_id(user) {
        return Err(Error::InvalidId("user"));
    }
    Ok(())
}

/// What the writer needs besides its queue, the store and the broker.
struct Writer {
    registry: Arc<Registry>,
    /// This node's dispatcher: committed sends for local connections.
    local: mpsc::Sender<Arc<Published>>,
    node: Uuid,
    max_batch: usize,
}

/// The group-commit writer: takes every queued send (up to `max_batch`),
/// writes them in one store transaction, hands each to this node's
/// dispatcher and publishes it to the other nodes, then answers the
/// senders. Sends are therefore durable before anyone sees them, and
/// on their way to this node's connections before they are acknowledged.
async fn write_loop(
    mut rx: mpsc::Receiver<WriteJob>,
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    writer: Writer,
    mut shutdown: watch::Receiver<bool>,
) {
    let Writer {
        registry,
        local,
        node,
        max_batch,
    } = writer;
    let mut jobs: Vec<WriteJob> = Vec::with_capacity(max_batch);
    let mut closing = false;
    loop {
        let received = if closing {
            rx.recv_many(&mut jobs, max_batch).await
        } else {
            tokio::select! {
                n = rx.recv_many(&mut jobs, max_batch) => n,
                _ = shutdown.wait_for(|stop| *stop) => {
                    // Refuse new sends, then drain what is queued.
                    rx.close();
                    closing = true;
                    continue;
                }
            }
        };
        if received == 0 {
            break;
        }
        let (appends, replies): (Vec<Append>, Vec<_>) =
            jobs.drain(..).map(|j| (j.append, j.reply)).unzip();
        let stats = &registry.stats;
        stats.batches.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let appended = store.append(&appends).await;
        tracing::debug!(
            sends = appends.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            ok = appended.is_ok(),
            "batch appended"
        );
        match appended {
            Ok(results) => {
                let mut broker_down = false;
                for ((append, reply), result) in appends.into_iter().zip(replies).zip(results) {
                    let (recipients, group, reached) = match result {
                        Appended::Stored(recipients) => {
                            let reached = recipients.len();
                            (recipients, None, reached)
                        }
                        Appended::Broadcast {
                            recipients,
                            offset,
                            members,
                        } => {
                            let group = match &append.audience {
                                Audience::Group(group) => Some(GroupOffset {
                                    group: group.clone(),
                                    offset,
                                }),
                                Audience::Users(_) => None,
                            };
                            (recipients, group, members)
                        }
                        Appended::DuplicateId => {
                            let id = append.notification.id.unwrap_or_default();
                            let _ = reply.send(Err(Error::DuplicateId(id)));
                            continue;
                        }
                        Appended::TooManyRecipients => {
                            let max = append.max_recipients;
                            let _ = reply.send(Err(Error::TooManyRecipients { max }));
                            continue;
                        }
                    };
                    stats.sends.fetch_add(1, Ordering::Relaxed);
                    let receipt = Receipt {
                        id: append.notification.id.unwrap_or_default(),
                        timestamp: append.notification.timestamp.unwrap_or_default(),
                        recipients: reached,
                    };
                    // A group send goes out even with no v1 recipient: the
                    // stream subscriptions that still index its group (a
                    // leave through another node) take it as their place in
                    // the stream.
                    if !recipients.is_empty() || group.is_some() {
                        let message = Arc::new(Published {
                            notification: append.notification,
                            recipients,
                            origin: node,
                            group,
                        });
                        // This node's connections get it from here, not from
                        // the broker's echo: that round trip may not be back
                        // when the hub shuts down, and an acknowledged send
                        // must reach them before their 1001 close. The
                        // channel closes only if the dispatcher was aborted.
                        let _ = local.send(Arc::clone(&message)).await;
                        // After one failure the broker is down: skip the rest
                        // of this batch rather than wait out a timeout per send.
                        let published = if broker_down {
                            Err(BrokerError::Unavailable {
                                operation: "publish skipped: an earlier publish of this batch failed",
                                source: None,
                            })
                        } else {
                            broker.publish(message).await
                        };
                        if let Err(e) = published {
                            // Stored and delivered here; other nodes'
                            // connections recover it by `since` or a resync.
                            stats.broker_errors.fetch_add(1, Ordering::Relaxed);
                            if !broker_down {
                                tracing::warn!(
                                    error = %crate::error::report(&e),
                                    "publish failed after commit"
                                );
                            }
                            broker_down = true;
                        }
                    }
                    let _ = reply.send(Ok(receipt));
                }
            }
            Err(e) => {
                tracing::warn!(
                    error = %crate::error::report(&e),
                    sends = replies.len(),
                    "store append failed"
                );
                stats
                    .send_errors
                    .fetch_add(replies.len() as u64, Ordering::Relaxed);
                for reply in replies {
                    let _ = reply.send(Err(Error::Store(e.clone())));
                }
            }
        }
    }
}

/// Hands every committed send to the local subscriptions of its
/// recipients: this node's own sends from the writer (`local`), other
/// nodes' from the broker. Ends when the writer has ended and everything it
/// committed has been dispatched.
async fn dispatch_loop(
    mut local: mpsc::Receiver<Arc<Published>>,
    mut broker: mpsc::Receiver<BrokerEvent>,
    registry: Arc<Registry>,
    node: Uuid,
) {
    let mut broker_open = true;
    loop {
        tokio::select! {
            message = local.recv() => match message {
                Some(message) => {
                    if let Some(fanout) = registry.dispatch(&message) {
                        fanout.deliver(&registry).await;
                    }
                }
                // The writer is done: everything it acknowledged is dispatched.
                None => break,
            },
            event = broker.recv(), if broker_open => match event {
                Some(event) => handle(&registry, node, &event).await,
                None => broker_open = false,
            },
        }
    }
    // What other nodes published and has already arrived, best effort.
    while let Ok(event) = broker.try_recv() {
        handle(&registry, node, &event).await;
    }
}

async fn handle(registry: &Arc<Registry>, node: Uuid, event: &BrokerEvent) {
    match event {
        // Our own send, echoed: already dispatched from the writer.
        BrokerEvent::Published(message) if message.origin == node => {}
        BrokerEvent::Published(message) => {
            if let Some(fanout) = registry.dispatch(message) {
                fanout.deliver(registry).await;
            }
        }
        BrokerEvent::Changed(change) if change.origin == node => {}
        BrokerEvent::Changed(change) => {
            registry.changed(change.kind, &change.group, &change.user, change.offset);
        }
        BrokerEvent::Resync => registry.resync_all(),
    }
}
