//! The hub: durable sends with group commit, group membership, history, and
//! live delivery to local subscriptions.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::broker::{Broker, BrokerError, BrokerEvent, LocalBroker, Published};
use crate::notification::{Delivery, InvalidNotification, Limits, Notification, valid_id};
use crate::store::{Append, Appended, Audience, MemoryStore, Store, StoreError};
use crate::subscription::{Slot, Subscription};

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
    /// the batch commits). Default 100,000.
    pub max_group_recipients: usize,
    /// Largest `limit` accepted by [`Hub::history`]. Default 1,000.
    pub max_history: usize,
    /// Size limits on notifications.
    pub limits: Limits,
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
            max_history: 1000,
            limits: Limits::default(),
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

    /// Sets [`replay_page`](HubConfig::replay_page) (at least 1).
    pub fn with_replay_page(mut self, page: usize) -> Self {
        self.replay_page = page.max(1);
        self
    }
}

/// Why a hub operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// The store failed; nothing of this send was stored.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker failed at start or in a readiness check.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The notification breaks a size limit.
    #[error("invalid notification: {0}")]
    InvalidNotification(#[from] InvalidNotification),
    /// A user or group id is empty, longer than 128 bytes, or holds control characters.
    #[error("invalid {0} id")]
    InvalidId(&'static str),
    /// `send_to_users` got an empty list.
    #[error("no recipients")]
    NoRecipients,
    /// `send_to_users` got more recipients than the configured maximum, or
    /// the group of `broadcast_to_group` has more members than its maximum.
    #[error("too many recipients (at most {max})")]
    TooManyRecipients {
        /// The configured maximum.
        max: usize,
    },
    /// A `limit` above the configured maximum.
    #[error("limit must be 1 to {max}")]
    InvalidLimit {
        /// The configured maximum.
        max: usize,
    },
    /// A notification with this id is already stored; this send stored
    /// nothing (it is treated as a retry, not delivered twice).
    #[error("a notification with id {0} already exists")]
    DuplicateId(Uuid),
    /// The hub is shutting down.
    #[error("hub is shut down")]
    ShutDown,
}

/// What a successful send stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The notification id.
    pub id: Uuid,
    /// Its timestamp.
    pub timestamp: DateTime<Utc>,
    /// How many users it was stored for.
    pub recipients: usize,
}

/// Counters of a hub, for metrics.
#[derive(Debug, Default)]
pub struct HubStats {
    pub(crate) sends: AtomicU64,
    pub(crate) send_errors: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) overflowed: AtomicU64,
    pub(crate) broker_errors: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) connections: AtomicUsize,
}

impl HubStats {
    /// Sends stored successfully.
    pub fn sends(&self) -> u64 {
        self.sends.load(Ordering::Relaxed)
    }
    /// Sends that failed in the store.
    pub fn send_errors(&self) -> u64 {
        self.send_errors.load(Ordering::Relaxed)
    }
    /// Deliveries handed to local connections.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
    /// Connections closed because their queue overflowed (slow consumers).
    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }
    /// Publishes that failed (the notification was stored; live delivery
    /// falls back to recovery).
    pub fn broker_errors(&self) -> u64 {
        self.broker_errors.load(Ordering::Relaxed)
    }
    /// Store transactions written by the group-commit writer.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }
    /// Open subscriptions on this node.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

/// State shared by the hub, its dispatcher and its subscriptions.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) registry: DashMap<String, Vec<Arc<Slot>>>,
    pub(crate) stats: HubStats,
    pub(crate) next_id: AtomicU64,
}

struct WriteJob {
    append: Append,
    reply: oneshot::Sender<Result<Receipt, HubError>>,
}

/// The notification hub. Cheap to clone; every clone is the same hub.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), notify_hub::HubError> {
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
    shared: Arc<Shared>,
    writes: mpsc::Sender<WriteJob>,
    /// Set first: no new sends; the writer drains its queue.
    shutdown: watch::Sender<bool>,
    /// Set once the writer is done: the dispatcher delivers what it has, ends.
    closing: watch::Sender<bool>,
    /// Set once the dispatcher is done: subscriptions flush their queues, end.
    ended: watch::Sender<bool>,
    tasks: Mutex<Option<(JoinHandle<()>, JoinHandle<()>)>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("config", &self.inner.config)
            .field("connections", &self.inner.shared.stats.connections())
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// A single-node hub with the in-memory store and the local broker.
    pub async fn in_memory(config: HubConfig) -> Result<Hub, HubError> {
        Hub::start(config, MemoryStore::new(), LocalBroker::new()).await
    }

    /// Starts a hub on `store` and `broker`: subscribes to the broker and
    /// spawns the group-commit writer and the dispatcher. Needs a tokio
    /// runtime.
    pub async fn start(
        config: HubConfig,
        store: impl Store,
        broker: impl Broker,
    ) -> Result<Hub, HubError> {
        let store: Arc<dyn Store> = Arc::new(store);
        let broker: Arc<dyn Broker> = Arc::new(broker);
        let shared = Arc::new(Shared {
            registry: DashMap::new(),
            stats: HubStats::default(),
            next_id: AtomicU64::new(1),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (closing, closing_rx) = watch::channel(false);
        let (ended, _) = watch::channel(false);
        let (dispatch_tx, dispatch_rx) = mpsc::channel(4096);
        broker.subscribe(dispatch_tx).await?;
        let (writes, writes_rx) = mpsc::channel(config.write_queue.max(1));
        let writer = tokio::spawn(write_loop(
            writes_rx,
            Arc::clone(&store),
            Arc::clone(&broker),
            Arc::clone(&shared),
            config.max_batch.max(1),
            shutdown_rx,
        ));
        let dispatcher = tokio::spawn(dispatch_loop(dispatch_rx, Arc::clone(&shared), closing_rx));
        Ok(Hub {
            inner: Arc::new(Inner {
                config,
                store,
                broker,
                shared,
                writes,
                shutdown,
                closing,
                ended,
                tasks: Mutex::new(Some((writer, dispatcher))),
            }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &HubConfig {
        &self.inner.config
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &HubStats {
        &self.inner.shared.stats
    }

    /// Open subscriptions (connections) on this node.
    pub fn connection_count(&self) -> usize {
        self.inner.shared.stats.connections()
    }

    /// Stores `notification` for each of `users` (duplicates count once),
    /// then delivers it live. Returns once it is durably stored.
    pub async fn send_to_users<U: AsRef<str>>(
        &self,
        users: &[U],
        notification: Notification,
    ) -> Result<Receipt, HubError> {
        if users.is_empty() {
            return Err(HubError::NoRecipients);
        }
        let max = self.inner.config.max_recipients;
        if users.len() > max {
            return Err(HubError::TooManyRecipients { max });
        }
        let mut list = Vec::with_capacity(users.len());
        for user in users {
            let user = user.as_ref();
            if !valid_id(user) {
                return Err(HubError::InvalidId("user"));
            }
            list.push(user.to_owned());
        }
        // Sorted: a stable lock order in stores that lock per user.
        list.sort_unstable();
        list.dedup();
        self.submit(Audience::Users(list), notification).await
    }

    /// Stores `notification` for every current member of `group`, then
    /// delivers it live. Returns once it is durably stored.
    pub async fn broadcast_to_group(
        &self,
        group: &str,
        notification: Notification,
    ) -> Result<Receipt, HubError> {
        if !valid_id(group) {
            return Err(HubError::InvalidId("group"));
        }
        self.submit(Audience::Group(group.to_owned()), notification)
            .await
    }

    async fn submit(
        &self,
        audience: Audience,
        mut notification: Notification,
    ) -> Result<Receipt, HubError> {
        notification.validate(&self.inner.config.limits)?;
        if *self.inner.shutdown.borrow() {
            return Err(HubError::ShutDown);
        }
        notification.stamp();
        let (reply, receipt) = oneshot::channel();
        let job = WriteJob {
            append: Append {
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
            .map_err(|_| HubError::ShutDown)?;
        receipt.await.map_err(|_| HubError::ShutDown)?
    }

    /// Adds `user` to `group`; `true` if they were not a member yet.
    pub async fn join_group(&self, group: &str, user: &str) -> Result<bool, HubError> {
        check_ids(group, user)?;
        Ok(self.inner.store.join_group(group, user).await?)
    }

    /// Removes `user` from `group`; `true` if they were a member.
    pub async fn leave_group(&self, group: &str, user: &str) -> Result<bool, HubError> {
        check_ids(group, user)?;
        Ok(self.inner.store.leave_group(group, user).await?)
    }

    /// The newest `limit` notifications of `user`, newest first.
    pub async fn history(&self, user: &str, limit: usize) -> Result<Vec<Notification>, HubError> {
        Ok(self
            .deliveries(user, limit)
            .await?
            .into_iter()
            .map(|d| Arc::unwrap_or_clone(d.notification))
            .collect())
    }

    /// Like [`history`](Hub::history), with each notification's sequence number.
    pub async fn deliveries(&self, user: &str, limit: usize) -> Result<Vec<Delivery>, HubError> {
        if !valid_id(user) {
            return Err(HubError::InvalidId("user"));
        }
        let max = self.inner.config.max_history;
        if limit == 0 || limit > max {
            return Err(HubError::InvalidLimit { max });
        }
        Ok(self.inner.store.history(user, limit).await?)
    }

    /// Opens a live subscription for `user`. With `since = Some(n)` it first
    /// replays every stored notification with `seq > n`; with `None` it
    /// starts after the user's latest stored notification. Either way it
    /// continues live with no gap and no duplicate.
    pub async fn subscribe(
        &self,
        user: &str,
        since: Option<u64>,
    ) -> Result<Subscription, HubError> {
        if !valid_id(user) {
            return Err(HubError::InvalidId("user"));
        }
        if *self.inner.shutdown.borrow() {
            return Err(HubError::ShutDown);
        }
        // Register first, read the position second: whatever commits after
        // the read arrives live, whatever committed before is in the store.
        let mut subscription = Subscription::register(
            Arc::clone(&self.inner.shared),
            Arc::clone(&self.inner.store),
            user,
            self.inner.config.queue_capacity,
            self.inner.config.replay_page,
            self.inner.ended.subscribe(),
        );
        let latest = self.inner.store.last_seq(user).await?;
        subscription.start(latest, since);
        Ok(subscription)
    }

    /// Checks the store and the broker (for readiness probes).
    pub async fn ready(&self) -> Result<(), HubError> {
        self.inner.store.ping().await?;
        self.inner.broker.ping().await?;
        Ok(())
    }

    /// Stops taking sends, writes and publishes every send already queued,
    /// then ends every subscription (after it has handed out what it had
    /// queued). Returns within about `timeout`; `false` if the writer had not
    /// finished by then.
    pub async fn shutdown(&self, timeout: Duration) -> bool {
        let _ = self.inner.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + timeout;
        let tasks = self.inner.tasks.lock().take();
        let mut finished = true;
        let Some((writer, dispatcher)) = tasks else {
            // Another call is shutting down: wait for it to finish.
            let mut ended = self.inner.ended.subscribe();
            return tokio::time::timeout_at(deadline, ended.wait_for(|e| *e))
                .await
                .is_ok_and(|r| r.is_ok());
        };
        for (stage, task) in [
            (&self.inner.shutdown, writer),
            (&self.inner.closing, dispatcher),
        ] {
            let _ = stage.send(true);
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
                finished = false;
            }
        }
        let _ = self.inner.closing.send(true);
        // Only now: every published send has reached the subscriptions' queues.
        let _ = self.inner.ended.send(true);
        finished
    }
}

fn check_ids(group: &str, user: &str) -> Result<(), HubError> {
    if !valid_id(group) {
        return Err(HubError::InvalidId("group"));
    }
    if !valid_id(user) {
        return Err(HubError::InvalidId("user"));
    }
    Ok(())
}

/// The group-commit writer: takes every queued send (up to `max_batch`),
/// writes them in one store transaction, publishes each, then answers the
/// senders. Sends are therefore durable before anyone sees them.
async fn write_loop(
    mut rx: mpsc::Receiver<WriteJob>,
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    shared: Arc<Shared>,
    max_batch: usize,
    mut shutdown: watch::Receiver<bool>,
) {
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
        shared.stats.batches.fetch_add(1, Ordering::Relaxed);
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
                    let recipients = match result {
                        Appended::Stored(recipients) => recipients,
                        Appended::DuplicateId => {
                            let id = append.notification.id.unwrap_or_default();
                            let _ = reply.send(Err(HubError::DuplicateId(id)));
                            continue;
                        }
                        Appended::TooManyRecipients => {
                            let max = append.max_recipients;
                            let _ = reply.send(Err(HubError::TooManyRecipients { max }));
                            continue;
                        }
                    };
                    shared.stats.sends.fetch_add(1, Ordering::Relaxed);
                    let receipt = Receipt {
                        id: append.notification.id.unwrap_or_default(),
                        timestamp: append.notification.timestamp.unwrap_or_default(),
                        recipients: recipients.len(),
                    };
                    if !recipients.is_empty() {
                        let message = Arc::new(Published {
                            notification: append.notification,
                            recipients,
                        });
                        // After one failure the broker is down: skip the rest
                        // of this batch rather than wait out a timeout per send.
                        let published = if broker_down {
                            Err(BrokerError::Unavailable("skipped: broker down".into()))
                        } else {
                            broker.publish(message).await
                        };
                        if let Err(e) = published {
                            // Stored but not delivered live: clients recover by `since`.
                            shared.stats.broker_errors.fetch_add(1, Ordering::Relaxed);
                            if !broker_down {
                                tracing::warn!(error = %e, "publish failed after commit");
                            }
                            broker_down = true;
                        }
                    }
                    let _ = reply.send(Ok(receipt));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, sends = replies.len(), "store append failed");
                shared
                    .stats
                    .send_errors
                    .fetch_add(replies.len() as u64, Ordering::Relaxed);
                for reply in replies {
                    let _ = reply.send(Err(HubError::Store(e.clone())));
                }
            }
        }
    }
}

/// Hands each published send to the local subscriptions of its recipients,
/// without ever waiting on a connection: a full queue marks that connection
/// as a slow consumer instead.
async fn dispatch_loop(
    mut rx: mpsc::Receiver<BrokerEvent>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        // The stop signal first: under steady traffic from other nodes the
        // queue is never empty, and the drain below must still happen.
        let message = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => {
                // Deliver what has already arrived, then stop.
                while let Ok(event) = rx.try_recv() {
                    handle(&shared, &event);
                }
                None
            }
            event = rx.recv() => event,
        };
        let Some(event) = message else { break };
        handle(&shared, &event);
    }
}

fn handle(shared: &Shared, event: &BrokerEvent) {
    match event {
        BrokerEvent::Published(message) => dispatch(shared, message),
        BrokerEvent::Resync => {
            for slots in shared.registry.iter() {
                for slot in slots.iter() {
                    slot.resync();
                }
            }
        }
    }
}

fn dispatch(shared: &Shared, message: &Published) {
    // Serialized once per send, on the first local recipient.
    let mut json: Option<Option<Arc<str>>> = None;
    for recipient in &message.recipients {
        let Some(slots) = shared.registry.get(&recipient.user_id) else {
            continue;
        };
        let json = json
            .get_or_insert_with(|| {
                serde_json::to_string(&*message.notification)
                    .ok()
                    .map(Arc::from)
            })
            .clone();
        for slot in slots.iter() {
            slot.push(
                Delivery::live(
                    recipient.seq,
                    Arc::clone(&message.notification),
                    json.clone(),
                ),
                &shared.stats,
            );
        }
    }
}
