//! Helpers shared by the Redis test binaries.

use std::sync::Arc;

use notify_hub::broker::RedisBroker;
use notify_hub::{Hub, HubConfig, MemoryStore};
use testkit::TestRedis;

/// Two hubs on one shared store (as two nodes share one PostgreSQL), each
/// with its own Redis broker connection.
pub(crate) async fn two_hubs(redis: &TestRedis) -> (Hub, Hub) {
    let store = Arc::new(MemoryStore::new());
    let mut hubs = Vec::new();
    for _ in 0..2 {
        let broker = RedisBroker::connect(redis.url(), redis.prefix())
            .await
            .unwrap();
        hubs.push(
            Hub::start(HubConfig::default(), Arc::clone(&store), broker)
                .await
                .unwrap(),
        );
    }
    let b = hubs.pop().unwrap();
    (hubs.pop().unwrap(), b)
}
