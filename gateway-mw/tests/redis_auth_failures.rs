//! The failed-authentication limit shared through Redis: a peek counts
//! nothing, sees what the other instance counted, and an address over the
//! limit is refused by every instance before any token is verified.
#![cfg(all(feature = "redis", feature = "http"))]

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use fred::prelude::{Builder, Client, ClientLike, Config};
use gateway_mw::http::{AuthLayer, ClientIpLayer, NoAudit, PeerAddr, RateLimits, RedisLimits};
use gateway_mw::jwt::{JwtConfig, JwtVerifier, KeySet, VerifyingKey};
use gateway_mw::ratelimit::{FailurePolicy, Quota, RedisLimiter, RedisLimiterConfig};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use testkit::TestRedis;
use tower::{Layer, ServiceExt};

async fn client(url: &str) -> Client {
    let client = Builder::from_config(Config::from_url(url).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    client
}

#[tokio::test]
async fn a_peek_counts_nothing_and_sees_the_shared_state() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let config = RedisLimiterConfig::new(Quota::per_minute(2), redis.key("af:"));
    let a = RedisLimiter::new(client(redis.url()).await, config.clone());
    let b = RedisLimiter::new(client(redis.url()).await, config);
    for _ in 0..5 {
        let peek = b.try_peek("198.51.100.1").await.unwrap().decision;
        assert!(peek.allowed);
        assert_eq!(peek.remaining, 2);
    }
    assert_eq!(redis.count_keys().await, 0, "a peek writes nothing");
    assert!(a.try_check("198.51.100.1").await.unwrap().decision.allowed);
    assert_eq!(
        b.try_peek("198.51.100.1").await.unwrap().decision.remaining,
        1
    );
    assert!(a.try_check("198.51.100.1").await.unwrap().decision.allowed);
    let over = b.try_peek("198.51.100.1").await.unwrap().decision;
    assert!(!over.allowed);
    assert!(over.retry_after.is_some_and(|r| r.as_secs() <= 30));
    assert!(
        b.peek("198.51.100.2").await.allowed,
        "other addresses are free"
    );
}

fn gateway(
    limits: Arc<RateLimits>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<gateway_mw::http::GatewayBody>,
    Error = Infallible,
> + Clone {
    let verifier = JwtVerifier::new(
        KeySet::new()
            .with_key(VerifyingKey::hs256(
                "k",
                b"redis-auth-failure-secret-0123456789",
            ))
            .unwrap(),
        JwtConfig::default(),
    );
    let auth = AuthLayer::new(Arc::new(verifier), Arc::new(NoAudit)).with_limits(limits);
    let upstream = tower::service_fn(|_: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    });
    ClientIpLayer::default().layer(auth.layer(upstream))
}

async fn forged(
    service: impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<gateway_mw::http::GatewayBody>,
        Error = Infallible,
    >,
) -> StatusCode {
    let mut request = Request::get("/x")
        .header("authorization", "Bearer forged.jwt.token")
        .body(Full::new(Bytes::new()))
        .unwrap();
    request
        .extensions_mut()
        .insert(PeerAddr("203.0.113.77:1234".parse().unwrap()));
    service.oneshot(request).await.unwrap().status()
}

#[tokio::test]
async fn two_instances_share_the_failure_limit() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let limits = |client| {
        Arc::new(
            RateLimits::default()
                .with_auth_failures(Quota::per_minute(3))
                .with_redis(RedisLimits {
                    client,
                    prefix: redis.key("rl:"),
                    timeout: std::time::Duration::from_secs(2),
                    on_failure: FailurePolicy::FailClosed,
                }),
        )
    };
    let one = gateway(limits(client(redis.url()).await));
    let two = gateway(limits(client(redis.url()).await));
    assert_eq!(forged(one.clone()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(forged(two.clone()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(forged(one.clone()).await, StatusCode::UNAUTHORIZED);
    // The third failure exhausted the shared quota: both instances refuse.
    assert_eq!(forged(two).await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(forged(one).await, StatusCode::TOO_MANY_REQUESTS);
}
