//! Group commit for requests on one key: while one group of requests for a
//! key is being handled, the requests for that key that arrive wait and
//! form the next group, handled as one.
//!
//! This is what lets one hot SKU take many reservations per database
//! transaction (the PostgreSQL inventory, keyed by SKU), and the order
//! store write many saga transitions per statement (keyed by a shard of
//! the order id): the transaction costs the same for one request or a
//! hundred, so the rate a hot row can take grows with the demand on it
//! instead of stopping at one transaction per commit flush. With no
//! concurrency every group has one request and nothing waits.
//!
//! Groups run on a spawned task, not on the caller's future, so a caller
//! that gives up (a client that disconnects) cannot strand the others.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

/// The cause of a failure that every request of a group shares.
pub(crate) type SharedCause = Arc<dyn std::error::Error + Send + Sync>;

/// `cause` as the error of each of `n` requests of one group: each gets
/// its own error, built by `wrap`, whose source is the shared cause.
pub(crate) fn fail_each<T, E>(
    n: usize,
    cause: SharedCause,
    wrap: impl Fn(Box<dyn std::error::Error + Send + Sync>) -> E,
) -> Vec<Result<T, E>> {
    (0..n)
        .map(|_| Err(wrap(Box::new(Arc::clone(&cause)))))
        .collect()
}

/// Groups concurrent requests by key; see the module docs.
pub(crate) struct Combiner<K, T, R> {
    queues: Arc<Mutex<HashMap<K, Queue<T, R>>>>,
    max_group: usize,
}

impl<K, T, R> std::fmt::Debug for Combiner<K, T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Combiner")
            .field("keys", &self.queues.lock().len())
            .field("max_group", &self.max_group)
            .finish()
    }
}

impl<K, T, R> Clone for Combiner<K, T, R> {
    fn clone(&self) -> Self {
        Combiner {
            queues: Arc::clone(&self.queues),
            max_group: self.max_group,
        }
    }
}

struct Queue<T, R> {
    waiting: VecDeque<(T, oneshot::Sender<R>)>,
}

impl<K, T, R> Combiner<K, T, R>
where
    K: Hash + Eq + Clone + Send + 'static,
    T: Send + 'static,
    R: Send + 'static,
{
    /// Groups of at most `max_group` requests (at least 1).
    pub(crate) fn new(max_group: usize) -> Combiner<K, T, R> {
        Combiner {
            queues: Arc::new(Mutex::new(HashMap::new())),
            max_group: max_group.max(1),
        }
    }

    /// Submits `item` under `key` and waits for its result; `handle`
    /// returns one result per item, in order. When `key` is idle, `item`
    /// is handled alone on this future; otherwise it joins the key's queue
    /// and a task hands it to `handle` with the others queued. `None` when
    /// the group was lost (its handler panicked or returned too few
    /// results): the outcome is unknown.
    pub(crate) async fn submit<F, Fut>(&self, key: K, item: T, handle: F) -> Option<R>
    where
        F: Fn(K, Vec<T>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        let (reply, result) = oneshot::channel();
        let leader = {
            let mut queues = self.queues.lock();
            match queues.get_mut(&key) {
                // The key is busy: whoever runs it will take the item.
                Some(queue) => {
                    queue.waiting.push_back((item, reply));
                    None
                }
                // Idle: an empty queue marks it busy while this call runs.
                None => {
                    queues.insert(
                        key.clone(),
                        Queue {
                            waiting: VecDeque::new(),
                        },
                    );
                    Some(item)
                }
            }
        };
        let Some(item) = leader else {
            return result.await.ok();
        };
        // Whether this call completes or its future is dropped, the
        // requests that queued meanwhile are handed to a task.
        let _handoff = Handoff {
            queues: Arc::clone(&self.queues),
            key: key.clone(),
            start: Some(Box::new({
                let (queues, key, max_group, handle) = (
                    Arc::clone(&self.queues),
                    key.clone(),
                    self.max_group,
                    handle.clone(),
                );
                move |runtime: tokio::runtime::Handle| {
                    runtime.spawn(run(queues, key, max_group, handle));
                }
            })),
        };
        handle(key, vec![item]).await.into_iter().next()
    }
}

/// Starts the task that runs a key's queue, on the runtime given.
type StartTask = Box<dyn FnOnce(tokio::runtime::Handle) + Send>;

/// Hands a key's queue on when its first caller is done: to a task when
/// requests are waiting, or frees the key when none are.
struct Handoff<K: Hash + Eq, T, R> {
    queues: Arc<Mutex<HashMap<K, Queue<T, R>>>>,
    key: K,
    start: Option<StartTask>,
}

impl<K: Hash + Eq, T, R> Drop for Handoff<K, T, R> {
    fn drop(&mut self) {
        let mut queues = self.queues.lock();
        let waiting = queues
            .get(&self.key)
            .is_some_and(|queue| !queue.waiting.is_empty());
        let runtime = tokio::runtime::Handle::try_current();
        match (waiting, runtime, self.start.take()) {
            (true, Ok(runtime), Some(start)) => {
                // The queue stays in the map (busy) for the task to run.
                drop(queues);
                start(runtime);
            }
            // Nothing waits; or no runtime to run it on (the future was
            // dropped outside one), and its callers learn the outcome is
            // unknown.
            _ => {
                queues.remove(&self.key);
            }
        }
    }
}

/// Hands groups of `key` to `handle` until its queue is empty, then
/// removes the queue (under the lock, so a request arriving then starts a
/// new task).
async fn run<K, T, R, F, Fut>(
    queues: Arc<Mutex<HashMap<K, Queue<T, R>>>>,
    key: K,
    max_group: usize,
    handle: F,
) where
    K: Hash + Eq + Clone,
    F: Fn(K, Vec<T>) -> Fut,
    Fut: Future<Output = Vec<R>>,
{
    // Whatever ends this task (a panic in `handle` included), the key's
    // queue must not stay behind with nobody to run it.
    let mut guard = QueueGuard {
        queues: Arc::clone(&queues),
        key: key.clone(),
        armed: true,
    };
    loop {
        let group: Vec<(T, oneshot::Sender<R>)> = {
            let mut map = queues.lock();
            let Some(queue) = map.get_mut(&key) else {
                guard.armed = false;
                return;
            };
            if queue.waiting.is_empty() {
                map.remove(&key);
                guard.armed = false;
                return;
            }
            let n = queue.waiting.len().min(max_group);
            queue.waiting.drain(..n).collect()
        };
        let (items, replies): (Vec<T>, Vec<oneshot::Sender<R>>) = group.into_iter().unzip();
        let results = handle(key.clone(), items).await;
        // A caller that stopped waiting just misses its result.
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }
}

struct QueueGuard<K: Hash + Eq, T, R> {
    queues: Arc<Mutex<HashMap<K, Queue<T, R>>>>,
    key: K,
    armed: bool,
}

impl<K: Hash + Eq, T, R> Drop for QueueGuard<K, T, R> {
    fn drop(&mut self) {
        if self.armed {
            // Dropping the waiting replies tells their callers the outcome
            // is unknown; the next request for the key starts afresh.
            self.queues.lock().remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_requests_on_one_key_are_grouped_and_answered_in_order() {
        let combiner: Combiner<&'static str, u32, u32> = Combiner::new(64);
        let groups = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..500u32)
            .map(|n| {
                let combiner = combiner.clone();
                let groups = Arc::clone(&groups);
                tokio::spawn(async move {
                    let key = if n % 2 == 0 { "even" } else { "odd" };
                    combiner
                        .submit(key, n, move |_, items: Vec<u32>| {
                            let groups = Arc::clone(&groups);
                            async move {
                                groups.fetch_add(1, Ordering::SeqCst);
                                // The work a transaction would take.
                                tokio::time::sleep(Duration::from_millis(2)).await;
                                assert!(items.len() <= 64);
                                items.into_iter().map(|i| i * 10).collect()
                            }
                        })
                        .await
                })
            })
            .collect();
        for (n, task) in tasks.into_iter().enumerate() {
            assert_eq!(task.await.unwrap(), Some(n as u32 * 10));
        }
        let groups = groups.load(Ordering::SeqCst);
        assert!(
            groups < 500,
            "{groups} groups for 500 requests: nothing was grouped"
        );
        assert!(combiner.queues.lock().is_empty());
    }

    #[tokio::test]
    async fn a_lost_result_is_reported_and_the_key_runs_again() {
        let combiner: Combiner<u8, u32, u32> = Combiner::new(8);
        // Too few results: the missing one is unknown.
        let lost = combiner
            .submit(1, 7, |_, _items: Vec<u32>| async { Vec::new() })
            .await;
        assert_eq!(lost, None);
        assert!(combiner.queues.lock().is_empty());
        let again = combiner
            .submit(1, 7, |_, items: Vec<u32>| async move { items })
            .await;
        assert_eq!(again, Some(7));
    }

    /// A handler whose first call waits for `release` (or forever, when
    /// `block` is set) and whose later calls panic when `panic_later`.
    fn gated(
        release: Arc<tokio::sync::Notify>,
        calls: Arc<AtomicUsize>,
        block: bool,
        panic_later: bool,
    ) -> impl Fn(u8, Vec<u32>) -> std::pin::Pin<Box<dyn Future<Output = Vec<u32>> + Send>>
    + Clone
    + Send
    + 'static {
        move |_, items| {
            let (release, calls) = (Arc::clone(&release), Arc::clone(&calls));
            Box::pin(async move {
                let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
                if first {
                    if block {
                        std::future::pending::<()>().await;
                    }
                    release.notified().await;
                } else if panic_later {
                    panic!("handler failed");
                }
                items
            })
        }
    }

    /// Submits 3 requests behind a running first one, then returns their
    /// tasks (they are queued once the first's handler has started).
    async fn queue_behind(
        combiner: &Combiner<u8, u32, u32>,
        handle: impl Fn(u8, Vec<u32>) -> std::pin::Pin<Box<dyn Future<Output = Vec<u32>> + Send>>
        + Clone
        + Send
        + 'static,
        calls: &AtomicUsize,
    ) -> (
        tokio::task::JoinHandle<Option<u32>>,
        Vec<tokio::task::JoinHandle<Option<u32>>>,
    ) {
        let first = {
            let (combiner, handle) = (combiner.clone(), handle.clone());
            tokio::spawn(async move { combiner.submit(1, 0, handle).await })
        };
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let queued = (1..=3)
            .map(|n| {
                let (combiner, handle) = (combiner.clone(), handle.clone());
                tokio::spawn(async move { combiner.submit(1, n, handle).await })
            })
            .collect();
        while combiner
            .queues
            .lock()
            .get(&1)
            .map_or(0, |q| q.waiting.len())
            < 3
        {
            tokio::task::yield_now().await;
        }
        (first, queued)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_queued_behind_a_dropped_caller_are_still_served() {
        let combiner: Combiner<u8, u32, u32> = Combiner::new(8);
        let (release, calls) = (
            Arc::new(tokio::sync::Notify::new()),
            Arc::new(AtomicUsize::new(0)),
        );
        let handle = gated(release, Arc::clone(&calls), true, false);
        let (first, queued) = queue_behind(&combiner, handle, &calls).await;
        // The first caller gives up while its own call is running.
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        for (n, task) in queued.into_iter().enumerate() {
            assert_eq!(task.await.unwrap(), Some(n as u32 + 1));
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "the three went as one group"
        );
        assert!(combiner.queues.lock().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_group_is_reported_to_its_callers_and_the_key_runs_again() {
        let combiner: Combiner<u8, u32, u32> = Combiner::new(8);
        let (release, calls) = (
            Arc::new(tokio::sync::Notify::new()),
            Arc::new(AtomicUsize::new(0)),
        );
        let handle = gated(Arc::clone(&release), Arc::clone(&calls), false, true);
        let (first, queued) = queue_behind(&combiner, handle, &calls).await;
        release.notify_one();
        assert_eq!(first.await.unwrap(), Some(0));
        for task in queued {
            assert_eq!(task.await.unwrap(), None, "the group's task panicked");
        }
        assert!(combiner.queues.lock().is_empty());
        let again = combiner
            .submit(1, 9, |_, items: Vec<u32>| async move { items })
            .await;
        assert_eq!(again, Some(9));
    }
}
