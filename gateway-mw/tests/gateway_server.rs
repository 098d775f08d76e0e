//! The configured gateway end to end on loopback: token endpoints, the
//! layer stack, proxying to a real upstream, upstream failure, and a graceful
//! drain with many requests in flight.
#![cfg(feature = "proxy")]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use gateway_mw::config::GatewayConfig;
use gateway_mw::server::GatewayServer;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex_lower(&sha2::Sha256::digest(s.as_bytes()))
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An Argon2id PHC string for `password`. Cheap parameters keep the tests
/// fast; `config::hash_password` uses the OWASP ones.
fn argon2id(password: &str) -> String {
    use argon2::PasswordHasher;
    let params = argon2::Params::new(256, 1, 1, None).unwrap();
    let salt = argon2::password_hash::SaltString::encode_b64(b"gateway-test-salt").unwrap();
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

/// Requests an upstream has received and answered, and the gate each
/// request waits at before it is answered.
#[derive(Clone)]
struct Counts {
    arrived: Arc<AtomicUsize>,
    served: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::Semaphore>,
}

/// An upstream that echoes the forwarded identity; with `gated`, each request
/// waits until the test opens the gate.
async fn upstream(gated: bool) -> (String, Counts) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let permits = if gated {
        0
    } else {
        tokio::sync::Semaphore::MAX_PERMITS
    };
    let counts = Counts {
        arrived: Arc::default(),
        served: Arc::default(),
        gate: Arc::new(tokio::sync::Semaphore::new(permits)),
    };
    let counter = counts.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = counter.clone();
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let counter = counter.clone();
                    async move {
                        counter.arrived.fetch_add(1, Ordering::SeqCst);
                        let _permit = counter.gate.acquire().await.unwrap();
                        counter.served.fetch_add(1, Ordering::SeqCst);
                        let h = |name: &str| {
                            req.headers()
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned()
                        };
                        let body = json!({
                            "version": format!("{:?}", req.version()),
                            "path": req.uri().path(),
                            "subject": h("x-gateway-subject"),
                            "authorization": h("authorization"),
                            "forwarded_for": h("x-forwarded-for"),
                        });
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(
                            body.to_string(),
                        ))))
                    }
                });
            tokio::spawn(async move {
                // HTTP/1.1 and h2c, for `http2 = true` upstreams.
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(TokioIo::new(stream), service)
                .await;
            });
        }
    });
    (format!("http://{addr}"), counts)
}

/// The test configuration as TOML text.
fn config_text(orders: &str, dead: &str) -> String {
    let toml = format!(
        r#"
shutdown_grace_secs = 10
[jwt]
issuer = "https://gw.test"
audience = "api"
[[jwt.keys]]
kid = "k"
alg = "HS256"
secret = "integration-test-secret-0123456789abcdef"
[tokens]
signing_kid = "k"
reuse_grace_secs = 0
[[users]]
name = "alice"
password_hash = "{alice}"
roles = ["writer"]
[[users]]
name = "bob"
password_hash = "{bob}"
roles = ["reader"]
[[users]]
name = "carol"
password_hash = "{carol}"
roles = ["admin"]
[roles.admin]
permissions = ["gateway:admin"]
inherits = ["writer"]
[roles.reader]
permissions = ["orders:read"]
[roles.writer]
permissions = ["orders:write"]
inherits = ["reader"]
[[routes]]
method = "GET"
path = "/v1/orders/{{id}}"
permission = "orders:read"
upstream = "orders"
[[routes]]
method = "POST"
path = "/v1/orders"
permission = "orders:write"
upstream = "orders"
json = true
[[routes]]
method = "GET"
path = "/v1/broken"
permission = "orders:read"
upstream = "dead"
[upstreams.orders]
url = "{orders}"
[upstreams.dead]
url = "{dead}"
timeout_ms = 2000
[rate_limits]
per_user_per_minute = 100000
[audit]
sink = "file"
path = "{audit}"
"#,
        alice = argon2id("alice-pw"),
        bob = argon2id("bob-pw"),
        carol = argon2id("carol-pw"),
        audit = std::env::temp_dir()
            .join(format!("gw-it-audit-{}.jsonl", std::process::id()))
            .display(),
    );
    toml
}

fn config(orders: &str, dead: &str) -> GatewayConfig {
    GatewayConfig::parse(&config_text(orders, dead)).unwrap()
}

#[cfg(feature = "redis")]
fn toml_of(orders: &str) -> String {
    config_text(orders, "http://127.0.0.1:1")
}

struct Running {
    base: String,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

async fn start(config: GatewayConfig) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = GatewayServer::build(config).await.unwrap();
    let done = tokio::spawn(server.serve(listener, async move {
        let _ = stopped.await;
    }));
    let client = Client::builder(TokioExecutor::new()).build_http();
    Running {
        base,
        stop: Some(stop),
        done,
        client,
    }
}

impl Running {
    async fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> (u16, http::HeaderMap, Value) {
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let body = match body {
            Some(b) => {
                request = request.header("content-type", "application/json");
                Full::new(Bytes::from(b.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let response = self
            .client
            .request(request.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            headers,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn login(&self, user: &str, password: &str) -> Value {
        let (status, _, body) = self
            .call(
                "POST",
                "/auth/token",
                &[],
                Some(json!({"username": user, "password": password})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn refresh(&self, token: &str) -> (u16, Value) {
        let (status, _, body) = self
            .call(
                "POST",
                "/auth/refresh",
                &[],
                Some(json!({"refresh_token": token})),
            )
            .await;
        (status, body)
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(15), self.done)
            .await
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_call_refresh_and_the_error_paths() {
    let (orders, _) = upstream(false).await;
    let gw = start(config(&orders, "http://127.0.0.1:1")).await;

    let alice = gw.login("alice", "alice-pw").await;
    let access = alice["access_token"].as_str().unwrap().to_owned();
    let bearer = format!("Bearer {access}");
    let (status, headers, body) = gw
        .call(
            "GET",
            "/v1/orders/7",
            &[("authorization", &bearer), ("x-request-id", "req-1")],
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["path"], "/v1/orders/7");
    assert_eq!(body["subject"], "alice", "the upstream learns who called");
    assert_eq!(body["authorization"], "", "credentials are not forwarded");
    assert_eq!(body["forwarded_for"], "127.0.0.1");
    assert_eq!(headers["x-request-id"], "req-1");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert!(headers.contains_key("ratelimit"));

    // Authorization and validation.
    let bob = gw.login("bob", "bob-pw").await;
    let bob_bearer = format!("Bearer {}", bob["access_token"].as_str().unwrap());
    assert_eq!(
        gw.call(
            "POST",
            "/v1/orders",
            &[("authorization", &bob_bearer)],
            Some(json!({"sku": "a"}))
        )
        .await
        .0,
        403
    );
    assert_eq!(
        gw.call(
            "POST",
            "/v1/orders",
            &[("authorization", &bearer)],
            Some(json!({"sku": "a"}))
        )
        .await
        .0,
        200
    );
    assert_eq!(
        gw.call(
            "DELETE",
            "/v1/orders/7",
            &[("authorization", &bearer)],
            None
        )
        .await
        .0,
        404
    );
    assert_eq!(gw.call("GET", "/v1/orders/7", &[], None).await.0, 401);
    assert_eq!(
        gw.call("GET", "/v1/../admin", &[("authorization", &bearer)], None)
            .await
            .0,
        400
    );
    let (status, _, body) = gw
        .call(
            "POST",
            "/auth/token",
            &[],
            Some(json!({"username": "alice", "password": "wrong"})),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_credentials"))
    );

    // Rotation and reuse detection (grace 0 in this config).
    let first = alice["refresh_token"].as_str().unwrap().to_owned();
    let (status, rotated) = gw.refresh(&first).await;
    assert_eq!(status, 200);
    let (status, body) = gw.refresh(&first).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("token_reused"))
    );
    let second = rotated["refresh_token"].as_str().unwrap();
    assert_eq!(gw.refresh(second).await.0, 401, "the family is revoked");

    // An unreachable upstream is a 502; health and readiness report it.
    let (status, _, body) = gw
        .call("GET", "/v1/broken", &[("authorization", &bearer)], None)
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("upstream_unavailable"))
    );
    assert_eq!(gw.call("GET", "/healthz", &[], None).await.0, 200);
    // Readiness is unauthenticated: it counts, and names no upstream.
    let (status, _, body) = gw.call("GET", "/readyz", &[], None).await;
    assert_eq!(status, 503);
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["upstreams"], json!({"total": 2, "unreachable": 1}));
    let text = body.to_string();
    assert!(
        !text.contains("127.0.0.1") && !text.contains("http://"),
        "no upstream address in {text}"
    );
    gw.stop().await;
}

/// The gateway routes once, from one table holding its own endpoints and
/// the configured routes: a route that collides with a built-in endpoint is
/// refused at build, naming it, instead of being silently shadowed.
#[tokio::test]
async fn a_route_colliding_with_a_built_in_endpoint_is_refused() {
    for (method, path) in [
        ("GET", "/healthz"),
        ("POST", "/auth/token"),
        ("POST", "/admin/users/{user}/revoke-sessions"),
    ] {
        let text = config_text("http://127.0.0.1:1", "http://127.0.0.1:1").replace(
            "[upstreams.orders]",
            &format!(
                "[[routes]]\nmethod = \"{method}\"\npath = \"{path}\"\npermission = \"orders:read\"\nupstream = \"orders\"\n[upstreams.orders]"
            ),
        );
        let config = GatewayConfig::parse(&text).unwrap();
        let error = GatewayServer::build(config)
            .await
            .expect_err("a colliding route is refused")
            .to_string();
        assert!(
            error.contains(&format!("{method} {path}")) && error.contains("already routed"),
            "{error}"
        );
    }
}

/// Validation and authorization read the route the gateway matched once
/// (the `Routed` extension) instead of routing the path again: here the
/// policy has no route rules and the validation config no routes, so only
/// the extension can decide.
#[tokio::test]
async fn the_layers_reuse_the_front_routers_match() {
    use gateway_mw::http::{
        AuthzLayer, JsonLimits, NoAudit, Principal, PrincipalKind, RouteLimits, RouteSpec, Routed,
        ValidationConfig, ValidationLayer,
    };
    use gateway_mw::rbac::{PolicyConfig, RoleDef};
    use tower::{Layer, ServiceExt};

    let policy = PolicyConfig::default()
        .role("reader", RoleDef::new(["orders:read"]))
        .compile()
        .unwrap();
    let ok = tower::service_fn(|_: http::Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new())))
    });
    let service = ValidationLayer::new(ValidationConfig::default())
        .layer(AuthzLayer::new(Arc::new(policy), Arc::new(NoAudit)).layer(ok));
    let status = |routed: Routed, content_type: &'static str| {
        let service = service.clone();
        async move {
            let mut request = http::Request::post("/v1/anything")
                .header("content-type", content_type)
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap();
            request.extensions_mut().insert(Principal {
                id: "bob".into(),
                roles: vec!["reader".into()],
                kind: PrincipalKind::User,
            });
            request.extensions_mut().insert(routed);
            service.oneshot(request).await.unwrap().status().as_u16()
        }
    };
    let route = |permission: &str, limits: Option<RouteLimits>| {
        Routed(Some(Arc::new(RouteSpec::new(
            "/v1/anything",
            Some(permission.to_owned()),
            limits,
        ))))
    };
    assert_eq!(status(route("orders:read", None), "text/plain").await, 200);
    assert_eq!(status(route("orders:write", None), "text/plain").await, 403);
    assert_eq!(status(Routed(None), "text/plain").await, 404);
    let json = Some(RouteLimits::json(JsonLimits::default()));
    assert_eq!(
        status(route("orders:read", json.clone()), "text/plain").await,
        415
    );
    assert_eq!(
        status(route("orders:read", json), "application/json").await,
        200
    );
}

/// Every value that names a choice is one of a fixed set, and every
/// inconsistency is refused when the file is loaded (or when `build` is
/// given a configuration assembled in code), with an error naming the field
/// and, for a choice, the allowed values.
#[tokio::test]
async fn each_invalid_configuration_is_refused_naming_the_field() {
    use gateway_mw::config::ConfigErrorKind as Kind;
    let base = config_text("http://127.0.0.1:1", "http://127.0.0.1:2");
    let cases: &[(&str, &str, Kind, &[&str])] = &[
        (
            "alg = \"HS256\"",
            "alg = \"HS512\"",
            Kind::Parse,
            &[
                "[[jwt.keys]] alg",
                "\"HS512\"",
                "\"HS256\", \"RS256\", \"ES256\", \"EdDSA\"",
            ],
        ),
        (
            "[audit]\nsink = \"file\"",
            "[redis]\nurl = \"redis://127.0.0.1:1\"\non_failure = \"maybe\"\n[audit]\nsink = \"file\"",
            Kind::Parse,
            &[
                "[redis] on_failure",
                "\"maybe\"",
                "\"local\", \"open\", \"closed\"",
            ],
        ),
        (
            "sink = \"file\"",
            "sink = \"/var/log/audit.jsonl\"",
            Kind::Parse,
            &["[audit] sink", "\"stdout\", \"file\"", "[audit] path"],
        ),
        (
            "sink = \"file\"\npath",
            "sink = \"file\"\n# path",
            Kind::Invalid,
            &["[audit] path", "needs a path"],
        ),
        (
            "secret = \"integration",
            "secret_env = \"X\"\nsecret = \"integration",
            Kind::Invalid,
            &["[[jwt.keys]] \"k\"", "not both"],
        ),
        (
            "alg = \"HS256\"",
            "alg = \"RS256\"",
            Kind::Invalid,
            &["[[jwt.keys]] \"k\"", "RS256 needs public_key_pem"],
        ),
        (
            "roles = [\"reader\"]",
            "roles = [\"raeder\"]",
            Kind::Invalid,
            &["[[users]] \"bob\"", "\"raeder\" is not defined"],
        ),
        (
            "name = \"bob\"",
            "name = \"alice\"",
            Kind::Invalid,
            &["[[users]] \"alice\"", "defined twice"],
        ),
        (
            "per_user_per_minute = 100000",
            "per_user_per_minute = 0",
            Kind::Invalid,
            &["[rate_limits] per_user_per_minute", "at least 1"],
        ),
        (
            "method = \"POST\"",
            "method = \"PO ST\"",
            Kind::Invalid,
            &["[[routes]] PO ST", "HTTP method"],
        ),
        (
            "permission = \"orders:write\"",
            "permission = \"orders\"",
            Kind::Invalid,
            &["[[routes]] POST /v1/orders", "resource:action"],
        ),
        (
            "url = \"http://127.0.0.1:2\"",
            "url = \"https://127.0.0.1:2\"",
            Kind::Invalid,
            &["[upstreams.dead] url", "http://"],
        ),
        (
            "signing_kid = \"k\"",
            "private_key_pem = \"/k.pem\"",
            Kind::Invalid,
            &["[tokens] private_key_pem", "signing_kid is not"],
        ),
        (
            "[roles.admin]",
            "[admin]\npermission = \"admin\"\n[roles.admin]",
            Kind::Invalid,
            &["[admin] permission", "resource:action"],
        ),
    ];
    for (from, to, kind, needles) in cases {
        assert!(base.contains(from), "the case applies: {from}");
        let text = base.replacen(from, to, 1);
        let error = GatewayConfig::parse(&text).expect_err(to);
        let message = error.to_string();
        assert_eq!(error.kind(), *kind, "{message}");
        for needle in *needles {
            assert!(message.contains(needle), "{needle:?} not in {message}");
        }
    }

    // `build` validates a configuration assembled in code the same way.
    let mut config = GatewayConfig::parse(&base).unwrap();
    config.audit.path = None;
    let error = GatewayServer::build(config).await.unwrap_err();
    assert_eq!(error.kind(), Kind::Invalid, "{error}");
    assert!(error.to_string().contains("[audit] path"), "{error}");

    // What needs the environment or a parser is refused at build, with the cause kept.
    let text = base.replacen(
        "secret = \"integration-test-secret-0123456789abcdef\"",
        "secret_env = \"GATEWAY_TEST_SURELY_UNSET_VARIABLE\"",
        1,
    );
    let error = GatewayServer::build(GatewayConfig::parse(&text).unwrap())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), Kind::Env, "{error}");
    assert!(
        error
            .to_string()
            .contains("GATEWAY_TEST_SURELY_UNSET_VARIABLE")
    );
    assert!(std::error::Error::source(&error).is_some_and(|s| s.is::<std::env::VarError>()));
    let text = base.replacen("[jwt]", "trusted_proxies = [\"not-a-cidr\"]\n[jwt]", 1);
    let error = GatewayServer::build(GatewayConfig::parse(&text).unwrap())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), Kind::TrustedProxies, "{error}");
    assert!(std::error::Error::source(&error).is_some());
}

/// `run` validates and builds everything before it binds: with the listen
/// port taken, an invalid configuration reports the configuration error
/// (it never reached the bind), while a valid one reports the bind error.
#[tokio::test]
async fn an_invalid_config_never_binds_the_port() {
    use gateway_mw::ErrorKind;
    use gateway_mw::config::ConfigErrorKind;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let valid = config_text("http://127.0.0.1:1", "http://127.0.0.1:2").replacen(
        "shutdown_grace_secs = 10",
        &format!("listen = \"{addr}\"\nshutdown_grace_secs = 10"),
        1,
    );
    // Refused only by build (the CORS layer), not by parse.
    let invalid = valid.replacen(
        "[audit]",
        "[cors]\nallowed_origins = [\"*\"]\nallow_credentials = true\n[audit]",
        1,
    );
    let error = gateway_mw::server::run(GatewayConfig::parse(&invalid).unwrap(), async {})
        .await
        .unwrap_err();
    assert_eq!(
        error.kind(),
        ErrorKind::Config(ConfigErrorKind::Cors),
        "{error}"
    );
    let error = gateway_mw::server::run(GatewayConfig::parse(&valid).unwrap(), async {})
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Bind, "{error}");
    drop(taken);
}

/// The effective configuration the gateway example prints (its `Debug`)
/// shows no secret: not the HMAC secret, not an API key, not a password
/// hash, not the password in the Redis URL.
#[test]
fn no_secret_appears_in_the_printed_configuration() {
    let mut text = config_text("http://127.0.0.1:1", "http://127.0.0.1:2");
    text.push_str(
        "[[api_keys]]\nid = \"billing\"\nkey = \"ak_live_9f8e7d6c5b4a\"\nroles = [\"reader\"]\n",
    );
    let mut secrets = vec![
        "integration-test-secret-0123456789abcdef".to_owned(),
        "ak_live_9f8e7d6c5b4a".to_owned(),
        argon2id("alice-pw"),
    ];
    if cfg!(feature = "redis") {
        text.push_str("[redis]\nurl = \"redis://gw:hunter2-redis-pw@127.0.0.1:6379/0\"\n");
        secrets.push("hunter2-redis-pw".to_owned());
    }
    let config = GatewayConfig::parse(&text).unwrap();
    for printed in [format!("{config:?}"), format!("{config:#?}")] {
        for secret in &secrets {
            assert!(!printed.contains(secret.as_str()), "{secret} printed");
        }
        assert!(printed.contains("<redacted>"));
        assert!(printed.contains("billing"), "the rest is still shown");
    }
}

/// Login passwords are Argon2id PHC strings: the right password logs in,
/// a wrong one or an unknown user does not, and an unsalted SHA-256 hash
/// (in the old field or the new one) or another algorithm is refused at
/// load, saying what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_are_argon2id_and_sha256_hashes_are_refused_at_load() {
    use gateway_mw::config::ConfigErrorKind as Kind;
    let (orders, _) = upstream(false).await;
    let base = config_text(&orders, "http://127.0.0.1:1");
    let alice = format!("password_hash = \"{}\"", argon2id("alice-pw"));
    assert!(base.contains(&alice));
    let refused = |to: String, kind: Kind, needles: &[&str]| {
        let error = GatewayConfig::parse(&base.replacen(&alice, &to, 1)).expect_err(&to);
        let message = error.to_string();
        assert_eq!(error.kind(), kind, "{message}");
        for needle in needles {
            assert!(message.contains(needle), "{needle:?} not in {message}");
        }
    };
    let sha256 = sha256_hex("alice-pw");
    refused(
        format!("password_sha256 = \"{sha256}\""),
        Kind::Invalid,
        &[
            "[[users]] \"alice\" password_sha256",
            "Argon2id",
            "--hash-password",
        ],
    );
    refused(
        format!("password_hash = \"{sha256}\""),
        Kind::Invalid,
        &["unsalted SHA-256", "Argon2id"],
    );
    let argon2i = argon2id("alice-pw").replace("$argon2id$", "$argon2i$");
    refused(
        format!("password_hash = \"{argon2i}\""),
        Kind::Invalid,
        &["argon2i", "only argon2id"],
    );
    refused(
        "password_hash = \"$argon2id$v=19$m=19456,t=2,p=1$%%%$%%%\"".into(),
        Kind::Password,
        &["alice"],
    );
    refused(String::new(), Kind::Invalid, &["password_hash", "required"]);

    // A hash from hash_password (the OWASP parameters) logs its user in.
    let hash = gateway_mw::config::hash_password("correct horse").unwrap();
    assert!(hash.expose().starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
    assert_ne!(
        hash.expose(),
        gateway_mw::config::hash_password("correct horse")
            .unwrap()
            .expose(),
        "salted"
    );
    let text = base.replacen(&alice, &format!("password_hash = \"{}\"", hash.expose()), 1);
    let gw = start(GatewayConfig::parse(&text).unwrap()).await;
    assert!(gw.login("alice", "correct horse").await["access_token"].is_string());
    for (user, password) in [
        ("alice", "alice-pw"),
        ("alice", ""),
        ("mallory", "correct horse"),
    ] {
        let (status, _, body) = gw
            .call(
                "POST",
                "/auth/token",
                &[],
                Some(json!({"username": user, "password": password})),
            )
            .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_credentials"))
        );
    }
    gw.stop().await;
}

/// Soft open-file limit, to size the drain test on machines with a low one.
fn open_file_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_ends_a_users_sessions_and_the_action_is_audited() {
    let (orders, _) = upstream(false).await;
    let gw = start(config(&orders, "http://127.0.0.1:1")).await;
    let alice = gw.login("alice", "alice-pw").await;
    let bob = gw.login("bob", "bob-pw").await;
    let carol = gw.login("carol", "carol-pw").await;
    let bearer = |t: &Value| format!("Bearer {}", t["access_token"].as_str().unwrap());
    let path = "/admin/users/alice/revoke-sessions";
    // Not an administrator: 403; no credentials: 401.
    let (status, _, _) = gw
        .call("POST", path, &[("authorization", &bearer(&bob))], None)
        .await;
    assert_eq!(status, 403);
    assert_eq!(gw.call("POST", path, &[], None).await.0, 401);
    assert_eq!(
        gw.refresh(alice["refresh_token"].as_str().unwrap()).await.0,
        200,
        "still valid"
    );
    let alice = gw.login("alice", "alice-pw").await;

    let request_id = "admin-req-7";
    let (status, _, body) = gw
        .call(
            "POST",
            path,
            &[
                ("authorization", &bearer(&carol)),
                ("x-request-id", request_id),
            ],
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"user": "alice", "revoked_sessions": 2}));
    assert_eq!(
        gw.refresh(alice["refresh_token"].as_str().unwrap()).await.0,
        401
    );
    assert_eq!(
        gw.refresh(bob["refresh_token"].as_str().unwrap()).await.0,
        200,
        "others untouched"
    );
    gw.stop().await;

    // The audit log (flushed at stop) names who acted, on whom, and the request.
    let audit = std::fs::read_to_string(
        std::env::temp_dir().join(format!("gw-it-audit-{}.jsonl", std::process::id())),
    )
    .unwrap();
    let record: Value = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|r| r["action"] == "admin.revoke_sessions" && r["request_id"] == request_id)
        .expect("an admin.revoke_sessions record");
    assert_eq!(record["who"], "carol");
    assert_eq!(record["target"], "alice");
    assert_eq!(record["outcome"], "success");
    assert_eq!(record["reason"], "revoked=2");
    assert!(
        !audit.contains(carol["access_token"].as_str().unwrap()),
        "no token in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_tokens_signed_rs256_from_config() {
    let (orders, _) = upstream(false).await;
    let fixture = |name: &str| {
        format!(
            "{}/../jwt-kit/tests/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        )
    };
    let text = config_text(&orders, "http://127.0.0.1:1").replace(
        "[tokens]\nsigning_kid = \"k\"\n",
        &format!(
            "[[jwt.keys]]\nkid = \"rs\"\nalg = \"RS256\"\npublic_key_pem = \"{}\"\n[tokens]\nsigning_kid = \"rs\"\nprivate_key_pem = \"{}\"\n",
            fixture("rsa_public.pem"),
            fixture("rsa_private.pem")
        ),
    );
    assert!(text.contains("private_key_pem"), "the replacement applied");
    // Without the private key the gateway refuses to start, saying why.
    let missing = text.replace(
        &format!("private_key_pem = \"{}\"\n", fixture("rsa_private.pem")),
        "",
    );
    let error = GatewayConfig::parse(&missing)
        .expect_err("refused")
        .to_string();
    assert!(error.contains("private_key_pem"), "{error}");

    let gw = start(GatewayConfig::parse(&text).unwrap()).await;
    let pair = gw.login("alice", "alice-pw").await;
    let access = pair["access_token"].as_str().unwrap();
    use base64::Engine as _;
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(access.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (header["alg"].as_str(), header["kid"].as_str()),
        (Some("RS256"), Some("rs"))
    );
    let (status, _, _) = gw
        .call(
            "GET",
            "/v1/orders/1",
            &[("authorization", &format!("Bearer {access}"))],
            None,
        )
        .await;
    assert_eq!(status, 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upstream_is_reached_over_h2c() {
    let (orders, _) = upstream(false).await;
    let text = config_text(&orders, "http://127.0.0.1:1").replace(
        &format!("url = \"{orders}\"\n"),
        &format!("url = \"{orders}\"\nhttp2 = true\n"),
    );
    assert!(text.contains("http2 = true"));
    let gw = start(GatewayConfig::parse(&text).unwrap()).await;
    let pair = gw.login("alice", "alice-pw").await;
    let auth = format!("Bearer {}", pair["access_token"].as_str().unwrap());
    for i in 0..5 {
        let path = format!("/v1/orders/{i}");
        let (status, _, body) = gw
            .call("GET", &path, &[("authorization", &auth)], None)
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["version"], "HTTP/2.0");
        assert_eq!(body["path"], path);
        assert_eq!(body["subject"], "alice");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_drain_loses_no_in_flight_request() {
    // Each request holds four sockets (client, gateway in and out, upstream).
    let in_flight = 1_000.min(open_file_limit().saturating_sub(200) / 4);
    let (orders, counts) = upstream(true).await;
    let mut gw = start(config(&orders, "http://127.0.0.1:1")).await;
    let access = gw.login("alice", "alice-pw").await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let bearer = Arc::new(format!("Bearer {access}"));
    let base = gw.base.clone();

    let mut requests = Vec::new();
    for i in 0..in_flight {
        let (base, bearer) = (base.clone(), Arc::clone(&bearer));
        // One connection per request, so every request is truly in flight.
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http::<Full<Bytes>>();
        requests.push(tokio::spawn(async move {
            let request = http::Request::get(format!("{base}/v1/orders/{i}"))
                .header("authorization", bearer.as_str())
                .body(Full::new(Bytes::new()))
                .unwrap();
            client.request(request).await.map(|r| r.status().as_u16())
        }));
    }
    // Shut down once every request has reached the upstream, which holds
    // them all at its gate: every one is in flight through the gateway.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while counts.arrived.load(Ordering::SeqCst) < in_flight {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} requests arrived",
            counts.arrived.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(counts.served.load(Ordering::SeqCst), 0);
    let stop = gw.stop.take().unwrap();
    let _ = stop.send(());
    // The gateway is now draining; let the upstream answer.
    tokio::time::sleep(Duration::from_millis(200)).await;
    counts.gate.add_permits(in_flight);
    let mut ok = 0;
    for r in requests {
        if let Ok(Ok(200)) = r.await {
            ok += 1;
        }
    }
    tokio::time::timeout(Duration::from_secs(15), gw.done)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ok, in_flight, "every in-flight request completed");
    assert_eq!(counts.served.load(Ordering::SeqCst), in_flight);
    assert!(
        in_flight >= 200,
        "the machine's file limit is too low for a meaningful drain: {in_flight}"
    );
}

/// Two gateway instances sharing one Redis: one rate limit, exact, and one
/// set of refresh-token sessions.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateway_instances_share_limits_and_sessions_through_redis() {
    let Some(redis) = testkit::TestRedis::create().await else {
        return;
    };
    let (orders, _) = upstream(false).await;
    let shared = |quota: u32| {
        let mut text = format!(
            "{}\n[redis]\nurl = \"{}\"\nprefix = \"{}\"\ntimeout_ms = 2000\n",
            toml_of(&orders),
            redis.url(),
            redis.key("gw:")
        );
        text = text.replace(
            "per_user_per_minute = 100000",
            &format!("per_user_per_minute = {quota}"),
        );
        GatewayConfig::parse(&text).unwrap()
    };
    let a = start(shared(5)).await;
    let b = start(shared(5)).await;

    // A session started on A is refreshed on B; reusing the spent token on A
    // is detected, because both read the same store.
    let session = a.login("alice", "alice-pw").await;
    let first = session["refresh_token"].as_str().unwrap().to_owned();
    let (status, _) = b.refresh(&first).await;
    assert_eq!(status, 200);
    let (status, body) = a.refresh(&first).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("token_reused"))
    );

    // One limit of 5 per minute for alice, whichever instance she calls.
    let bearer = format!("Bearer {}", session["access_token"].as_str().unwrap());
    let mut allowed = 0;
    for i in 0..10 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let (status, _, _) = gw
            .call("GET", "/v1/orders/1", &[("authorization", &bearer)], None)
            .await;
        assert!(status == 200 || status == 429, "{status}");
        allowed += usize::from(status == 200);
    }
    assert_eq!(allowed, 5, "exactly the shared quota across both instances");
    assert_eq!(
        a.call("GET", "/readyz", &[], None).await.0,
        503,
        "the dead upstream keeps it unready"
    );
    a.stop().await;
    b.stop().await;
}

/// `runtime = "per_core"`: two serving threads on one port, each with its
/// own runtime and upstream connections. Many clients at once, each request
/// answered by the upstream for its own path (no response crosses to
/// another request), then a drain that ends the threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_core_gateway_serves_every_request_on_its_threads_and_drains() {
    let (orders, counts) = upstream(false).await;
    let text = format!(
        "listen = \"127.0.0.1:0\"\nruntime = \"per_core\"\nthreads = 2\n{}",
        config_text(&orders, "http://127.0.0.1:1")
    );
    let config = GatewayConfig::parse(&text).unwrap();
    let bound = GatewayServer::build(config)
        .await
        .unwrap()
        .bind()
        .await
        .unwrap();
    let base = format!("http://{}", bound.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(bound.serve(async move {
        let _ = stopped.await;
    }));
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let login = http::Request::post(format!("{base}/auth/token"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            json!({"username": "alice", "password": "alice-pw"}).to_string(),
        )))
        .unwrap();
    let response = client.request(login).await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let bearer = Arc::new(format!("Bearer {}", body["access_token"].as_str().unwrap()));

    let (clients, each) = (48, 25);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (base, bearer) = (base.clone(), Arc::clone(&bearer));
        // A client (and so a connection) of its own: the kernel spreads
        // the connections over both threads' sockets.
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        tasks.push(tokio::spawn(async move {
            for i in 0..each {
                let path = format!("/v1/orders/{c}-{i}");
                let request = http::Request::get(format!("{base}{path}"))
                    .header("authorization", bearer.as_str())
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let response = client.request(request).await.unwrap();
                assert_eq!(response.status(), 200);
                let bytes = response.into_body().collect().await.unwrap().to_bytes();
                let echoed: Value = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(echoed["path"], path.as_str());
                assert_eq!(echoed["subject"], "alice");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(counts.served.load(Ordering::SeqCst), clients * each);
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(15), done)
        .await
        .expect("the serving threads drained and ended")
        .unwrap();
    // The port is released once every thread's socket is closed.
    let addr = base.trim_start_matches("http://");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// `threads` without `runtime = "per_core"`, or zero threads, is refused.
#[test]
fn threads_apply_only_to_a_per_core_runtime() {
    let text = config_text("http://127.0.0.1:1", "http://127.0.0.1:1");
    let error = GatewayConfig::parse(&format!("threads = 2\n{text}")).unwrap_err();
    assert!(error.to_string().contains("threads"), "{error}");
    let error =
        GatewayConfig::parse(&format!("runtime = \"per_core\"\nthreads = 0\n{text}")).unwrap_err();
    assert!(error.to_string().contains("at least 1"), "{error}");
    let error = GatewayConfig::parse(&format!("runtime = \"sideways\"\n{text}")).unwrap_err();
    assert!(error.to_string().contains("runtime"), "{error}");
}
