//! The distributed limiter against a real Redis: exact across two instances,
//! and each failure policy when Redis is unreachable or too slow.
#![cfg(feature = "redis")]

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::{Builder, Client, ClientLike, Config};
use gateway_mw::ratelimit::{FailurePolicy, Quota, RedisLimiter, RedisLimiterConfig};
use testkit::TestRedis;

async fn client(url: &str) -> Client {
    let client = Builder::from_config(Config::from_url(url).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    client
}

#[tokio::test]
async fn burst_then_deny_with_retry_after() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let quota = Quota::per_second(10).with_burst(3);
    let limiter = RedisLimiter::new(
        client(redis.url()).await,
        RedisLimiterConfig::new(quota, redis.key("rl:")),
    );
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let d = limiter.try_check("alice").await.unwrap().decision;
        assert!(d.allowed);
        remaining.push(d.remaining);
    }
    assert_eq!(remaining, vec![2, 1, 0]);
    let denied = limiter.try_check("alice").await.unwrap().decision;
    assert!(!denied.allowed);
    let retry = denied.retry_after.unwrap();
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_millis(100),
        "{retry:?}"
    );
    assert!(
        limiter.try_check("bob").await.unwrap().decision.allowed,
        "keys are independent"
    );
    // The key expires by itself once its TAT passes.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(redis.count_keys().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_exact_limit() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let quota = Quota::per_second(100).with_burst(20);
    let config =
        RedisLimiterConfig::new(quota, redis.key("rl:")).with_timeout(Duration::from_secs(2));
    let a = Arc::new(RedisLimiter::new(client(redis.url()).await, config.clone()));
    let b = Arc::new(RedisLimiter::new(client(redis.url()).await, config));
    let mut tasks = Vec::new();
    for i in 0..64 {
        let limiter = Arc::clone(if i % 2 == 0 { &a } else { &b });
        tasks.push(tokio::spawn(async move {
            let (mut allowed, mut first, mut last) = (0u64, u64::MAX, 0u64);
            let deadline = tokio::time::Instant::now() + Duration::from_millis(1_500);
            while tokio::time::Instant::now() < deadline {
                let check = limiter.try_check("shared").await.unwrap();
                if check.decision.allowed {
                    allowed += 1;
                    first = first.min(check.now_us);
                    last = last.max(check.now_us);
                }
            }
            (allowed, first, last)
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let allowed: u64 = results.iter().map(|r| r.0).sum();
    let first = results.iter().map(|r| r.1).min().unwrap();
    let last = results.iter().map(|r| r.2).max().unwrap();
    let expected = 20 + (last - first) / 10_000;
    assert!(
        allowed.abs_diff(expected) <= 1,
        "allowed {allowed}, expected {expected} ± 1"
    );
    assert!(expected >= 100, "ran too briefly: {expected}");
}

async fn unreachable_client() -> Client {
    // Nothing listens on port 1; the client never connects.
    let client = Builder::from_config(Config::from_url("redis://127.0.0.1:1").unwrap())
        .build()
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(200), client.init()).await;
    client
}

#[tokio::test]
async fn an_unreachable_redis_falls_back_by_policy() {
    let quota = Quota::per_minute(2);
    let local = RedisLimiter::new(
        unreachable_client().await,
        RedisLimiterConfig::new(quota, "x:"),
    );
    let decisions: Vec<bool> = check_n(&local, 3).await;
    assert_eq!(
        decisions,
        vec![true, true, false],
        "the local fallback enforces the same quota"
    );
    assert_eq!(local.failures(), 3);

    let open = RedisLimiter::new(
        unreachable_client().await,
        RedisLimiterConfig::new(quota, "x:").with_failure_policy(FailurePolicy::FailOpen),
    );
    assert_eq!(check_n(&open, 3).await, vec![true, true, true]);
    let closed = RedisLimiter::new(
        unreachable_client().await,
        RedisLimiterConfig::new(quota, "x:").with_failure_policy(FailurePolicy::FailClosed),
    );
    let d = closed.check("k").await;
    assert!(!d.allowed);
    assert_eq!(d.retry_after, Some(Duration::from_secs(1)));
}

async fn check_n(limiter: &RedisLimiter, n: usize) -> Vec<bool> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(limiter.check("k").await.allowed);
    }
    out
}
