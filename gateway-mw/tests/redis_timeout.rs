//! A slow Redis (paused with CLIENT PAUSE) trips the 20 ms timeout. In its own
//! test binary: the pause affects every client of the server briefly.
#![cfg(feature = "redis")]

use std::time::{Duration, Instant};

use fred::prelude::{Builder, ClientLike, Config};
use gateway_mw::ratelimit::{
    FailurePolicy, Quota, RedisLimitError, RedisLimiter, RedisLimiterConfig,
};
use testkit::TestRedis;

#[tokio::test]
async fn a_paused_redis_times_out_into_the_failure_policy() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let client = Builder::from_config(Config::from_url(redis.url()).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    let config = RedisLimiterConfig::new(Quota::per_second(5), redis.key("rl:"))
        .with_failure_policy(FailurePolicy::FailClosed);
    let limiter = RedisLimiter::new(client, config);
    assert!(
        limiter.try_check("k").await.unwrap().decision.allowed,
        "warm: the script is loaded"
    );

    let _: () = redis
        .client()
        .custom(fred::cmd!("CLIENT"), vec!["PAUSE", "300", "ALL"])
        .await
        .unwrap();
    let started = Instant::now();
    let result = limiter.try_check("k").await;
    assert!(
        matches!(result, Err(RedisLimitError::Timeout(_))),
        "{result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(150),
        "took {:?}",
        started.elapsed()
    );
    let decision = limiter.check("k").await;
    assert!(!decision.allowed, "fail-closed while Redis is paused");
    assert_eq!(limiter.failures(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
}
