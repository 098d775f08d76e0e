//! Refresh rotation, reuse detection, lifetimes and concurrency, run against
//! both stores: in memory, and (feature `redis`) a real Redis, shared by two
//! service instances.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use gateway_mw::jwt::{JwtConfig, JwtVerifier, KeySet, VerifyingKey};
use gateway_mw::token::{MemoryStore, RefreshStore, TokenConfig, TokenError, TokenService};
use time_kit::ManualClock;

const SECRET: &[u8] = b"token-service-test-secret-0123456789";
const START_MS: i64 = 1_795_557_600_000;

/// The suite's hand-moved clock, at `START_MS`.
fn manual_clock() -> ManualClock {
    ManualClock::new(UNIX_EPOCH + Duration::from_millis(START_MS as u64))
}

fn config(grace: Duration) -> TokenConfig {
    TokenConfig::hs256("https://issuer.test", "gateway", "k1", SECRET)
        .with_reuse_grace(grace)
        .with_refresh_lifetimes(Duration::from_secs(3_600), Duration::from_secs(8 * 3_600))
}

fn service<S: RefreshStore>(store: S, clock: &ManualClock, grace: Duration) -> TokenService<S> {
    TokenService::new(store, config(grace)).with_clock(Arc::new(clock.clone()))
}

// ------------------------------------------------------------ the shared suite

async fn rotation_and_reuse<S: RefreshStore>(store: S) {
    let clock = manual_clock();
    let svc = service(store, &clock, Duration::from_secs(10));
    let roles = vec!["clerk".to_owned()];
    let first = svc.issue("alice", &roles).await.unwrap();
    let verifier = JwtVerifier::new(
        KeySet::new()
            .with_key(VerifyingKey::hs256("k1", SECRET))
            .unwrap(),
        JwtConfig::default()
            .with_issuer("https://issuer.test")
            .with_audience("gateway"),
    );
    let claims = verifier
        .verify_at(&first.access_token, START_MS / 1_000)
        .unwrap();
    assert_eq!(
        (claims.subject.as_str(), claims.roles.clone()),
        ("alice", roles.clone())
    );
    assert!(
        !format!("{first:?}").contains(&first.refresh_token),
        "Debug must not print tokens"
    );

    clock.advance(Duration::from_secs(60));
    let second = svc.refresh(&first.refresh_token).await.unwrap();
    assert_ne!(second.refresh_token, first.refresh_token);
    let claims = verifier
        .verify_at(&second.access_token, START_MS / 1_000 + 60)
        .unwrap();
    assert_eq!(claims.roles, roles, "roles survive rotation");

    // The spent token again, after the grace window: the family is revoked.
    clock.advance(Duration::from_secs(11));
    assert!(
        matches!(svc.refresh(&first.refresh_token).await, Err(TokenError::ReuseDetected { subject }) if subject == "alice")
    );
    assert!(matches!(
        svc.refresh(&second.refresh_token).await,
        Err(TokenError::Revoked)
    ));

    // Other families are untouched.
    let other = svc.issue("bob", &[]).await.unwrap();
    assert!(svc.refresh(&other.refresh_token).await.is_ok());
}

async fn grace_window<S: RefreshStore>(store: S) {
    let clock = manual_clock();
    let svc = service(store, &clock, Duration::from_secs(10));
    let r0 = svc.issue("alice", &[]).await.unwrap().refresh_token;
    let r1 = svc.refresh(&r0).await.unwrap().refresh_token;
    clock.advance(Duration::from_secs(5));
    // The immediate predecessor, within grace, once: a concurrent refresh.
    let r1b = svc.refresh(&r0).await.unwrap().refresh_token;
    assert_ne!(r1, r1b);
    // Twice is reuse.
    assert!(matches!(
        svc.refresh(&r0).await,
        Err(TokenError::ReuseDetected { .. })
    ));
    assert!(matches!(svc.refresh(&r1).await, Err(TokenError::Revoked)));

    // Grace does not apply once the successor has itself been used.
    let s0 = svc.issue("carol", &[]).await.unwrap().refresh_token;
    let s1 = svc.refresh(&s0).await.unwrap().refresh_token;
    svc.refresh(&s1).await.unwrap();
    assert!(matches!(
        svc.refresh(&s0).await,
        Err(TokenError::ReuseDetected { .. })
    ));
}

async fn lifetimes<S: RefreshStore>(store: S) {
    let clock = manual_clock();
    let svc = service(store, &clock, Duration::from_secs(10));
    // Idle: unused for longer than an hour.
    let idle = svc.issue("alice", &[]).await.unwrap().refresh_token;
    clock.advance(Duration::from_secs(3_601));
    assert!(matches!(svc.refresh(&idle).await, Err(TokenError::Expired)));
    // Absolute: rotating every 50 minutes keeps it alive only for 8 hours.
    let mut token = svc.issue("bob", &[]).await.unwrap().refresh_token;
    let mut rotations = 0;
    loop {
        clock.advance(Duration::from_secs(50 * 60));
        match svc.refresh(&token).await {
            Ok(pair) => {
                token = pair.refresh_token;
                rotations += 1;
            }
            Err(TokenError::Expired) => break,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(
        rotations, 9,
        "8 h / 50 min = 9 rotations before the absolute lifetime"
    );
}

async fn logout_and_garbage<S: RefreshStore>(store: S) {
    let clock = manual_clock();
    let svc = service(store, &clock, Duration::from_secs(10));
    let pair = svc.issue("alice", &[]).await.unwrap();
    svc.logout(&pair.refresh_token).await.unwrap();
    assert!(matches!(
        svc.refresh(&pair.refresh_token).await,
        Err(TokenError::Revoked)
    ));
    assert!(matches!(
        svc.logout("never-issued").await,
        Err(TokenError::Invalid)
    ));
    for garbage in [
        "",
        "x",
        &"A".repeat(10_000),
        "'; DROP TABLE tokens; --",
        "rt:*",
    ] {
        assert!(
            matches!(svc.refresh(garbage).await, Err(TokenError::Invalid)),
            "{garbage:.20}"
        );
    }
}

async fn revoke_every_session_of_a_subject<S: RefreshStore>(store: S) {
    let clock = manual_clock();
    let svc = service(store, &clock, Duration::from_secs(10));
    // Three sessions of alice (one already rotated, one logged out), one of bob.
    let a1 = svc.issue("alice", &[]).await.unwrap();
    let a1 = svc.refresh(&a1.refresh_token).await.unwrap();
    let a2 = svc.issue("alice", &[]).await.unwrap();
    let a3 = svc.issue("alice", &[]).await.unwrap();
    svc.logout(&a3.refresh_token).await.unwrap();
    let b = svc.issue("bob", &[]).await.unwrap();
    assert_eq!(
        svc.revoke_subject("alice").await.unwrap(),
        2,
        "two were active"
    );
    for token in [&a1.refresh_token, &a2.refresh_token] {
        assert!(matches!(svc.refresh(token).await, Err(TokenError::Revoked)));
    }
    // Nobody else is touched; a second call finds nothing; a new login works.
    assert!(svc.refresh(&b.refresh_token).await.is_ok());
    assert_eq!(svc.revoke_subject("alice").await.unwrap(), 0);
    assert_eq!(svc.revoke_subject("nobody").await.unwrap(), 0);
    let again = svc.issue("alice", &[]).await.unwrap();
    assert!(svc.refresh(&again.refresh_token).await.is_ok());
}

/// `n` concurrent refreshes of one token through `services` (round robin):
/// returns how many succeeded.
async fn concurrent_refreshes<S: RefreshStore + 'static>(
    services: Vec<Arc<TokenService<S>>>,
    token: String,
    n: usize,
) -> usize {
    let mut tasks = Vec::new();
    for i in 0..n {
        let svc = Arc::clone(&services[i % services.len()]);
        let token = token.clone();
        tasks.push(tokio::spawn(async move { svc.refresh(&token).await }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(TokenError::ReuseDetected { .. } | TokenError::Revoked) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    ok
}

// ------------------------------------------------------------ in memory

#[tokio::test]
async fn memory_rotation_and_reuse() {
    rotation_and_reuse(MemoryStore::new()).await;
}

#[tokio::test]
async fn memory_grace_window() {
    grace_window(MemoryStore::new()).await;
}

#[tokio::test]
async fn memory_revoke_every_session_of_a_subject() {
    revoke_every_session_of_a_subject(MemoryStore::new()).await;
}

#[tokio::test]
async fn memory_lifetimes() {
    lifetimes(MemoryStore::new()).await;
}

#[tokio::test]
async fn memory_logout_and_garbage() {
    logout_and_garbage(MemoryStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_concurrent_refreshes_mint_at_most_the_grace_allowance() {
    let clock = manual_clock();
    for (grace, allowed) in [(Duration::ZERO, 1), (Duration::from_secs(10), 2)] {
        let svc = Arc::new(service(MemoryStore::new(), &clock, grace));
        let token = svc.issue("alice", &[]).await.unwrap().refresh_token;
        assert_eq!(concurrent_refreshes(vec![svc], token, 32).await, allowed);
    }
}

// ------------------------------------------------------------ Redis

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use fred::prelude::{Builder, ClientLike, Config};
    use gateway_mw::token::RedisStore;
    use testkit::TestRedis;

    async fn store(redis: &TestRedis) -> RedisStore {
        let client = Builder::from_config(Config::from_url(redis.url()).unwrap())
            .build()
            .unwrap();
        client.init().await.unwrap();
        RedisStore::new(client, redis.key("tokens:"))
    }

    #[tokio::test]
    async fn redis_rotation_and_reuse() {
        let Some(redis) = TestRedis::create().await else {
            return;
        };
        rotation_and_reuse(store(&redis).await).await;
    }

    #[tokio::test]
    async fn redis_grace_window() {
        let Some(redis) = TestRedis::create().await else {
            return;
        };
        grace_window(store(&redis).await).await;
    }

    #[tokio::test]
    async fn redis_lifetimes() {
        let Some(redis) = TestRedis::create().await else {
            return;
        };
        lifetimes(store(&redis).await).await;
    }

    #[tokio::test]
    async fn redis_revoke_every_session_of_a_subject() {
        let Some(redis) = TestRedis::create().await else {
            return;
        };
        revoke_every_session_of_a_subject(store(&redis).await).await;
    }

    #[tokio::test]
    async fn redis_logout_and_garbage() {
        let Some(redis) = TestRedis::create().await else {
            return;
        };
        logout_and_garbage(store(&redis).await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_instances_racing_on_one_token_mint_at_most_the_grace_allowance() {
        let Some(redis) = TestRedis::create().await else {
            return;
        };
        let clock = manual_clock();
        for (grace, allowed) in [(Duration::ZERO, 1), (Duration::from_secs(10), 2)] {
            let a = Arc::new(service(store(&redis).await, &clock, grace));
            let b = Arc::new(service(store(&redis).await, &clock, grace));
            for _ in 0..5 {
                let token = a.issue("alice", &[]).await.unwrap().refresh_token;
                assert_eq!(
                    concurrent_refreshes(vec![Arc::clone(&a), Arc::clone(&b)], token, 32).await,
                    allowed
                );
            }
        }
    }

    #[tokio::test]
    async fn only_hashes_are_stored() {
        let Some(redis) = TestRedis::create().await else {
            return;
        };
        let clock = manual_clock();
        let svc = service(store(&redis).await, &clock, Duration::from_secs(10));
        let pair = svc.issue("alice", &[]).await.unwrap();
        let keys: Vec<String> = redis
            .client()
            .custom(
                fred::cmd!("KEYS"),
                vec![format!("{}*", redis.key("tokens:"))],
            )
            .await
            .unwrap();
        // The token record, its family, and the subject's family index.
        assert_eq!(keys.len(), 3, "{keys:?}");
        assert!(keys.iter().all(|k| !k.contains(&pair.refresh_token)));
        assert!(
            keys.iter()
                .any(|k| k.ends_with(&gateway_mw::token::hash_token(&pair.refresh_token)))
        );
    }
}

#[tokio::test]
async fn access_tokens_can_be_signed_with_an_asymmetric_key() {
    use gateway_mw::jwt::KeyAlg;
    let fixture = |name: &str| {
        std::fs::read(format!(
            "{}/../jwt-kit/tests/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    };
    for (alg, private, public) in [
        (KeyAlg::Rs256, "rsa_private.pem", "rsa_public.pem"),
        (KeyAlg::Es256, "ec_private.pem", "ec_public.pem"),
        (KeyAlg::EdDsa, "ed25519_private.pem", "ed25519_public.pem"),
    ] {
        let config = config(Duration::from_secs(10))
            .with_signing_key_pem("asym", alg, &fixture(private))
            .unwrap();
        let clock = manual_clock();
        let svc = TokenService::new(MemoryStore::new(), config).with_clock(Arc::new(clock.clone()));
        let pair = svc.issue("alice", &["reader".to_owned()]).await.unwrap();
        let key = match alg {
            KeyAlg::Rs256 => VerifyingKey::rs256_pem("asym", &fixture(public)),
            KeyAlg::Es256 => VerifyingKey::es256_pem("asym", &fixture(public)),
            _ => VerifyingKey::eddsa_pem("asym", &fixture(public)),
        }
        .unwrap();
        let verifier = JwtVerifier::new(
            KeySet::new().with_key(key).unwrap(),
            JwtConfig::default().with_issuer("https://issuer.test"),
        );
        let claims = verifier
            .verify_at(&pair.access_token, START_MS / 1_000)
            .unwrap();
        assert_eq!(
            (claims.subject.as_str(), claims.kid.as_str()),
            ("alice", "asym"),
            "{alg:?}"
        );
    }
    let hs = config(Duration::from_secs(10)).with_signing_key_pem("x", KeyAlg::Hs256, b"");
    assert!(hs.is_err());
}
