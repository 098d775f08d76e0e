//! Criterion benches of gateway-mw's per-request decisions.
//!
//! ```text
//! cargo bench --features gateway --bench gateway
//! ```

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use gateway_mw::jwt::{JwtConfig, JwtVerifier, KeySet, VerifyingKey};
use gateway_mw::ratelimit::{KeyedLimiter, LimiterConfig, Quota};
use gateway_mw::rbac::{Decision, PolicyConfig, RoleDef, RouteRule};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;

const SECRET: &[u8] = b"pyjwt-fixture-secret-0123456789abcdef";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/jwt-kit/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("fixture")
}

fn bench_jwt(c: &mut Criterion) {
    let keys = KeySet::new()
        .with_key(VerifyingKey::hs256("hs", SECRET))
        .and_then(|k| k.with_key(VerifyingKey::rs256_pem("rs", &fixture("rsa_public.pem"))?))
        .and_then(|k| k.with_key(VerifyingKey::es256_pem("es", &fixture("ec_public.pem"))?))
        .and_then(|k| {
            k.with_key(VerifyingKey::eddsa_pem(
                "ed",
                &fixture("ed25519_public.pem"),
            )?)
        })
        .expect("keys");
    let verifier = JwtVerifier::new(
        keys,
        JwtConfig::default()
            .with_issuer("https://issuer.test")
            .with_audience("gateway"),
    );
    let now = 1_795_557_600i64;
    let claims = json!({"sub": "alice", "iss": "https://issuer.test", "aud": "gateway", "exp": now + 600, "roles": ["admin"]});
    let mut group = c.benchmark_group("jwt_verify");
    for (alg, kid, key) in [
        (Algorithm::HS256, "hs", EncodingKey::from_secret(SECRET)),
        (
            Algorithm::RS256,
            "rs",
            EncodingKey::from_rsa_pem(&fixture("rsa_private.pem")).expect("rsa"),
        ),
        (
            Algorithm::ES256,
            "es",
            EncodingKey::from_ec_pem(&fixture("ec_private.pem")).expect("ec"),
        ),
        (
            Algorithm::EdDSA,
            "ed",
            EncodingKey::from_ed_pem(&fixture("ed25519_private.pem")).expect("ed"),
        ),
    ] {
        let mut header = Header::new(alg);
        header.kid = Some(kid.into());
        let token = encode(&header, &claims, &key).expect("sign");
        assert!(verifier.verify_at(&token, now).is_ok());
        group.bench_function(format!("{alg:?}"), |b| {
            b.iter(|| verifier.verify_at(black_box(&token), now).is_ok())
        });
    }
    // The same RS256 token through a verifier with the verified-token cache:
    // signature skipped on a hit, time checks kept.
    let cached = JwtVerifier::new(
        KeySet::new()
            .with_key(VerifyingKey::rs256_pem("rs", &fixture("rsa_public.pem")).expect("rsa"))
            .expect("keys"),
        JwtConfig::default()
            .with_issuer("https://issuer.test")
            .with_audience("gateway"),
    )
    .with_cache(1_024);
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rs".into());
    let rs_key = EncodingKey::from_rsa_pem(&fixture("rsa_private.pem")).expect("rsa");
    let token = encode(&header, &claims, &rs_key).expect("sign");
    group.bench_function("RS256_cached", |b| {
        b.iter(|| cached.verify_at(black_box(&token), now).is_ok())
    });
    group.finish();
}

fn bench_ratelimit(c: &mut Criterion) {
    let mut group = c.benchmark_group("ratelimit_check");
    let limiter: KeyedLimiter = KeyedLimiter::new(LimiterConfig::new(Quota::per_minute(1_000)));
    let keys: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
    let mut i = 0;
    group.bench_function("uncontended", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            limiter.check(black_box(keys[i].as_str()))
        })
    });
    let limiter = Arc::new(limiter);
    let keys = Arc::new(keys);
    group.bench_function("two_threads", |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            let handles: Vec<_> = (0..2)
                .map(|t| {
                    let (limiter, keys) = (Arc::clone(&limiter), Arc::clone(&keys));
                    std::thread::spawn(move || {
                        for n in 0..iters as usize {
                            black_box(limiter.check(keys[(n * 2 + t) % keys.len()].as_str()));
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("thread");
            }
            started.elapsed()
        })
    });
    group.finish();
}

fn bench_rbac(c: &mut Criterion) {
    let mut config = PolicyConfig::default()
        .role("reader", RoleDef::new(["svc:read"]))
        .role("admin", RoleDef::new(["svc:write"]).inherits(["reader"]));
    for i in 0..10_000 {
        config = config.rule(RouteRule::new(
            "GET",
            format!("/svc{}/items/{{id}}/sub{}", i % 100, i / 100),
            "svc:read",
        ));
    }
    let policy = config.compile().expect("policy");
    let mut group = c.benchmark_group("rbac_check");
    group.measurement_time(Duration::from_secs(3));
    group.bench_function("10000_rules", |b| {
        b.iter(|| {
            matches!(
                policy.check("GET", black_box("/svc42/items/9001/sub77"), &["admin"]),
                Decision::Allow { .. }
            )
        })
    });
    group.finish();
}

/// The full in-process stack (metrics, client IP, HS256 JWT, RBAC, local
/// rate limiter) in front of a trivial service, against the bare service, so
/// the difference is the stack's own cost per request.
fn bench_stack(c: &mut Criterion) {
    use std::convert::Infallible;

    use bytes::Bytes;
    use gateway_mw::http::{Gateway, GatewayMetrics, GatewayParts, MetricsLayer, RateLimits};
    use http_body_util::Full;
    use tower::{Layer, ServiceExt};

    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let keys = KeySet::new()
        .with_key(VerifyingKey::hs256("hs", SECRET))
        .expect("key");
    let verifier = JwtVerifier::new(
        keys,
        JwtConfig::default()
            .with_issuer("https://issuer.test")
            .with_audience("gateway"),
    );
    let policy = PolicyConfig::default()
        .role("reader", RoleDef::new(["orders:read"]))
        .rule(RouteRule::new("GET", "/v1/orders/{id}", "orders:read"))
        .compile()
        .expect("policy");
    let parts = GatewayParts::new(verifier, policy).with_limits(RateLimits::new(
        Quota::per_minute(u32::MAX),
        Quota::per_minute(u32::MAX),
    ));
    let bare = tower::service_fn(|_req: http::Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"{}"))))
    });
    let full = MetricsLayer::new(Arc::new(GatewayMetrics::default()))
        .layer(Gateway::new(parts).wrap(bare));
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3_600;
    let claims = json!({"sub": "alice", "iss": "https://issuer.test", "aud": "gateway", "exp": exp, "roles": ["reader"]});
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("hs".into());
    let bearer = format!(
        "Bearer {}",
        encode(&header, &claims, &EncodingKey::from_secret(SECRET)).expect("sign")
    );
    let request = || {
        http::Request::get("/v1/orders/42")
            .header("authorization", bearer.as_str())
            .body(Full::new(Bytes::new()))
            .expect("request")
    };
    let mut group = c.benchmark_group("stack");
    group.bench_function("bare_service", |b| {
        b.iter(|| {
            runtime
                .block_on(bare.oneshot(request()))
                .expect("ok")
                .status()
        })
    });
    group.bench_function("full_stack_hs256", |b| {
        b.iter(|| {
            let response = runtime
                .block_on(full.clone().oneshot(request()))
                .expect("ok");
            assert_eq!(response.status(), http::StatusCode::OK);
        })
    });
    group.finish();
}

criterion_group!(benches, bench_jwt, bench_ratelimit, bench_rbac, bench_stack);
criterion_main!(benches);
