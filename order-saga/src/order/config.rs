//! The order service's settings.

use std::time::Duration;

use crate::model::CartLimits;

/// Settings of the order service and its orchestrator. Every field has a
/// production default ([`OrderConfig::default`]).
#[derive(Debug, Clone)]
pub struct OrderConfig {
    /// This instance's id, the owner of its leases. Must be unique among
    /// running instances; keeping it across restarts lets a restarted
    /// instance resume its own sagas at once instead of after their leases
    /// expire. Default: random.
    pub instance_id: String,
    /// How long a claimed saga stays with this instance without a write.
    /// Default 10 s.
    pub lease: Duration,
    /// How often due sagas are claimed (and the crash-recovery scan runs).
    /// Default 250 ms.
    pub poll_interval: Duration,
    /// Most sagas driven at once by this instance. Default 1,024.
    pub max_concurrent_sagas: usize,
    /// Most create requests between their first write and their answer at
    /// once; more wait before writing anything. Keeps a burst from queueing
    /// half-created orders behind each other for connections (which would
    /// outlast their leases). Default 64.
    pub max_concurrent_creates: usize,
    /// How long stock is held for an order that has not completed.
    /// Default 15 min.
    pub reservation_ttl: Duration,
    /// Tries of a forward step that fails transiently (inventory or
    /// shipping unavailable) before the order rolls back. Default 5.
    pub max_step_attempts: u32,
    /// Tries of a compensation before the order goes to `NeedsAttention`.
    /// Default 8.
    pub max_compensation_attempts: u32,
    /// First retry delay, doubled per attempt (with full jitter). Default 100 ms.
    pub retry_base: Duration,
    /// Longest retry delay. Default 30 s.
    pub retry_max: Duration,
    /// How long an idempotency key and its answer are kept. Default 24 h.
    pub idempotency_ttl: Duration,
    /// Cart limits. Default 50 lines, 100 units per line.
    pub cart: CartLimits,
    /// The currency of every amount. Default `USD`.
    pub currency: String,
    /// Largest page of `list_orders`. Default 100.
    pub max_page: usize,
}

impl Default for OrderConfig {
    fn default() -> OrderConfig {
        OrderConfig {
            instance_id: format!("order-{:016x}", fastrand::u64(..)),
            lease: Duration::from_secs(10),
            poll_interval: Duration::from_millis(250),
            max_concurrent_sagas: 1024,
            max_concurrent_creates: 64,
            reservation_ttl: Duration::from_secs(15 * 60),
            max_step_attempts: 5,
            max_compensation_attempts: 8,
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
            idempotency_ttl: Duration::from_secs(24 * 3600),
            cart: CartLimits::default(),
            currency: "USD".to_owned(),
            max_page: 100,
        }
    }
}

impl OrderConfig {
    /// The delay before retry number `attempt` (1-based): exponential with
    /// full jitter, capped at `retry_max`.
    pub fn retry_delay(&self, attempt: u32) -> Duration {
        let exp = self
            .retry_base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let cap = exp.min(self.retry_max);
        cap.mul_f64(fastrand::f64())
    }
}
