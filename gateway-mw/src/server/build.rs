//! Building a [`GatewayServer`] from a [`GatewayConfig`]: keys, policy,
//! limits, audit log, upstream clients and the layer stacks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::Layer;

use super::admin::admin_endpoint;
use super::login::{Tokens, auth_endpoint};
use super::proxy::{Upstream, proxy};
use super::routes::{Handler, Matched, build_table};
use super::{BoxedService, GatewayServer, State};
use crate::audit::{AuditChain, AuditLog, FileWriter, StdoutWriter};
use crate::client_ip::TrustedProxies;
use crate::config::{ConfigError, GatewayConfig, KeyEntry};
use crate::http::{
    ApiKeys, AuthLayer, AuthzLayer, ClientIpLayer, CorsConfig, GatewayMetrics, GatewayParts,
    MetricsLayer, RateLimitLayer, RateLimits, SecurityHeadersLayer, ValidationConfig,
    ValidationLayer,
};
use crate::jwt::{JwtConfig, JwtVerifier, KeySet, VerifyingKey};
use crate::ratelimit::Quota;
use crate::rbac::{PolicyConfig, RoleDef};
use crate::token::{MemoryStore, TokenConfig, TokenService};

fn key_from_entry(entry: &KeyEntry) -> Result<VerifyingKey, ConfigError> {
    let invalid =
        |why: String| ConfigError::Invalid(format!("[[jwt.keys]] {:?}: {why}", entry.kid));
    match entry.alg.as_str() {
        "HS256" => {
            let secret = match (&entry.secret, &entry.secret_env) {
                (Some(s), _) => s.clone(),
                (None, Some(var)) => std::env::var(var)
                    .map_err(|_| invalid(format!("environment variable {var} is not set")))?,
                (None, None) => return Err(invalid("HS256 needs secret or secret_env".into())),
            };
            Ok(VerifyingKey::hs256(entry.kid.clone(), secret.as_bytes()))
        }
        alg @ ("RS256" | "ES256" | "EdDSA") => {
            let path = entry
                .public_key_pem
                .as_ref()
                .ok_or_else(|| invalid(format!("{alg} needs public_key_pem")))?;
            let pem =
                std::fs::read(path).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
            let key = match alg {
                "RS256" => VerifyingKey::rs256_pem(entry.kid.clone(), &pem),
                "ES256" => VerifyingKey::es256_pem(entry.kid.clone(), &pem),
                _ => VerifyingKey::eddsa_pem(entry.kid.clone(), &pem),
            };
            key.map_err(|e| invalid(e.to_string()))
        }
        other => Err(invalid(format!("unsupported alg {other:?}"))),
    }
}

/// How `[tokens] signing_kid` signs: with its HS256 secret, or with the
/// private key in `[tokens] private_key_pem` for an asymmetric key.
fn signing_config(config: &GatewayConfig, kid: &str) -> Result<TokenConfig, ConfigError> {
    let entry = config
        .jwt
        .keys
        .iter()
        .find(|k| k.kid == kid)
        .ok_or_else(|| ConfigError::Invalid(format!("no key {kid:?}")))?;
    let issuer = config.jwt.issuer.clone().unwrap_or_default();
    let audience = config.jwt.audience.clone().unwrap_or_default();
    let alg = match entry.alg.as_str() {
        "HS256" => {
            let secret = match (&entry.secret, &entry.secret_env) {
                (Some(s), _) => s.as_bytes().to_vec(),
                (None, Some(var)) => std::env::var(var)
                    .map(String::into_bytes)
                    .map_err(|_| ConfigError::Invalid(format!("{var} is not set")))?,
                (None, None) => {
                    return Err(ConfigError::Invalid(format!("key {kid:?} has no secret")));
                }
            };
            return Ok(TokenConfig::hs256(issuer, audience, kid, &secret));
        }
        "RS256" => crate::jwt::KeyAlg::Rs256,
        "ES256" => crate::jwt::KeyAlg::Es256,
        "EdDSA" => crate::jwt::KeyAlg::EdDsa,
        other => {
            return Err(ConfigError::Invalid(format!(
                "key {kid:?}: unknown alg {other:?}"
            )));
        }
    };
    let path = config.tokens.private_key_pem.as_ref().ok_or_else(|| {
        ConfigError::Invalid(format!(
            "[tokens] signing_kid {kid:?} is {}: set [tokens] private_key_pem",
            entry.alg
        ))
    })?;
    let pem = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    TokenConfig::from_private_pem(issuer, audience, kid, alg, &pem)
        .map_err(|e| ConfigError::Invalid(format!("[tokens] private_key_pem: {e}")))
}

impl GatewayServer {
    /// Builds the gateway (keys, policy, limits, audit log, upstream client)
    /// from `config`. Fails with a clear message on any inconsistency.
    pub async fn build(config: GatewayConfig) -> Result<GatewayServer, ConfigError> {
        let invalid = |e: &dyn std::fmt::Display| ConfigError::Invalid(e.to_string());
        // Keys and verification.
        let mut keys = match &config.jwt.jwks_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                KeySet::from_jwks(&text).map_err(|e| invalid(&e))?
            }
            None => KeySet::new(),
        };
        for entry in &config.jwt.keys {
            keys = keys
                .with_key(key_from_entry(entry)?)
                .map_err(|e| invalid(&e))?;
        }
        let mut jwt = JwtConfig::default().with_leeway_secs(config.jwt.leeway_secs);
        if let Some(iss) = &config.jwt.issuer {
            jwt = jwt.with_issuer(iss.clone());
        }
        if let Some(aud) = &config.jwt.audience {
            jwt = jwt.with_audience(aud.clone());
        }
        // Verified tokens are cached (time checks still run on every use): an
        // RS256/ES256 signature costs hundreds of microseconds.
        let verifier = JwtVerifier::new(keys, jwt).with_cache(100_000);

        // One route table for dispatch, validation, authorization and the
        // upstreams; the policy holds only the roles.
        let routes = build_table(&config)?;
        let mut policy = PolicyConfig::default();
        for (name, role) in &config.roles {
            policy = policy.role(
                name.clone(),
                RoleDef::new(role.permissions.clone()).inherits(role.inherits.clone()),
            );
        }
        let validation = ValidationConfig::default();
        let policy = policy.compile().map_err(|e| invalid(&e))?;

        // API keys, limits, proxies, CORS.
        let mut api_keys = ApiKeys::new();
        for entry in &config.api_keys {
            let key = match (&entry.key, &entry.key_env) {
                (Some(k), _) => k.clone(),
                (None, Some(var)) => std::env::var(var).map_err(|_| {
                    ConfigError::Invalid(format!("api key {:?}: {var} is not set", entry.id))
                })?,
                (None, None) => {
                    return Err(ConfigError::Invalid(format!(
                        "api key {:?} needs key or key_env",
                        entry.id
                    )));
                }
            };
            api_keys = api_keys.with_key(entry.id.clone(), &key, entry.roles.clone());
        }
        let r = &config.rate_limits;
        let limits = RateLimits::new(
            Quota::per_minute(r.per_user_per_minute),
            Quota::per_minute(r.per_api_key_per_minute),
        )
        .with_anonymous(Quota::per_minute(r.per_ip_per_minute));
        let limits =
            config
                .routes
                .iter()
                .fold(limits, |limits, route| match route.quota_per_minute {
                    Some(q) => {
                        limits.with_route_quota(&route.method, &route.path, Quota::per_minute(q))
                    }
                    None => limits,
                });
        #[cfg(feature = "redis")]
        let redis = match &config.redis {
            Some(section) => Some(connect_redis(&section.url).await?),
            None => None,
        };
        #[cfg(feature = "redis")]
        let limits = match (&redis, &config.redis) {
            (Some(client), Some(section)) => limits.with_redis(crate::http::RedisLimits {
                client: client.clone(),
                prefix: format!("{}rl:", section.prefix),
                timeout: Duration::from_millis(section.timeout_ms),
                on_failure: match section.on_failure.as_str() {
                    "open" => crate::ratelimit::FailurePolicy::FailOpen,
                    "closed" => crate::ratelimit::FailurePolicy::FailClosed,
                    _ => crate::ratelimit::FailurePolicy::LocalFallback,
                },
            }),
            _ => limits,
        };
        let limits = Arc::new(limits);
        let trusted = TrustedProxies::parse(&config.trusted_proxies).map_err(|e| invalid(&e))?;
        let mut cors = CorsConfig::default().with_credentials(config.cors.allow_credentials);
        for origin in &config.cors.allowed_origins {
            cors = cors.allow_origin(origin.clone());
        }
        let cors = cors.layer().map_err(|e| invalid(&e))?;

        // Audit log and metrics.
        let audit = if config.audit.sink == "stdout" {
            AuditLog::spawn(StdoutWriter, AuditChain::new(), config.audit.queue)
        } else {
            let path = std::path::PathBuf::from(&config.audit.sink);
            let (writer, chain) =
                FileWriter::open(&path).map_err(|source| ConfigError::Read { path, source })?;
            AuditLog::spawn(writer, chain, config.audit.queue)
        }
        .map_err(|e| invalid(&e))?;
        let audit = Arc::new(audit);
        let metrics = Arc::new(GatewayMetrics::new(Some(Arc::clone(&audit))));

        // Demo token service.
        let tokens = match &config.tokens.signing_kid {
            Some(kid) => {
                let t = &config.tokens;
                let token_config = signing_config(&config, kid)?
                    .with_reuse_grace(Duration::from_secs(t.reuse_grace_secs))
                    .with_refresh_lifetimes(
                        Duration::from_secs(t.refresh_idle_ttl_secs),
                        Duration::from_secs(t.refresh_absolute_ttl_secs),
                    );
                let token_config =
                    token_config.with_access_ttl(Duration::from_secs(t.access_ttl_secs));
                #[cfg(feature = "redis")]
                if let (Some(client), Some(section)) = (&redis, &config.redis) {
                    let store = crate::token::RedisStore::new(
                        client.clone(),
                        format!("{}tokens:", section.prefix),
                    );
                    Some(Tokens::Redis(TokenService::new(store, token_config)))
                } else {
                    Some(Tokens::Memory(TokenService::new(
                        MemoryStore::new(),
                        token_config,
                    )))
                }
                #[cfg(not(feature = "redis"))]
                Some(Tokens::Memory(TokenService::new(
                    MemoryStore::new(),
                    token_config,
                )))
            }
            None => None,
        };
        let users = config
            .users
            .iter()
            .map(|u| {
                let mut hash = [0u8; 32];
                hex::decode_to_slice(&u.password_sha256, &mut hash).map_err(|_| {
                    ConfigError::Invalid(format!(
                        "user {:?}: password_sha256 is not 64 hex digits",
                        u.name
                    ))
                })?;
                Ok((u.name.clone(), (hash, u.roles.clone())))
            })
            .collect::<Result<HashMap<_, _>, ConfigError>>()?;

        let mut all_upstreams: Vec<Upstream> = Vec::new();
        for u in config.upstreams.values() {
            all_upstreams.push(Upstream {
                base: u.url.trim_end_matches('/').to_owned(),
                timeout: Duration::from_millis(u.timeout_ms),
                http2: u.http2,
            });
        }
        // Small request/response messages: Nagle's algorithm would hold
        // them back waiting for ACKs, so both hops disable it.
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector.clone());
        let client_h2 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .http2_only(true)
            .build(connector);
        let state = Arc::new(State {
            client,
            client_h2,
            routes,
            all_upstreams,
            tokens,
            #[cfg(feature = "redis")]
            redis,
            users,
            audit: Arc::clone(&audit),
            metrics: Arc::clone(&metrics),
        });

        let audit_sink: Arc<dyn crate::audit::AuditSink> = audit;
        let parts = GatewayParts {
            verifier: Arc::new(verifier),
            api_keys: Some(Arc::new(api_keys)),
            policy: Arc::new(policy),
            limits: Arc::clone(&limits),
            audit: Arc::clone(&audit_sink),
            trusted_proxies: trusted.clone(),
        };
        let validation = ValidationLayer::new(validation);
        let edge = tower::ServiceBuilder::new()
            .layer(MetricsLayer::new(Arc::clone(&metrics)))
            .layer(SecurityHeadersLayer::default())
            .layer(cors);
        let proxy_state = Arc::clone(&state);
        // The Gateway stack (auth → authz → rate limit), with validation in
        // front of it and the client IP in front of that.
        let mut auth_layer = AuthLayer::new(Arc::clone(&parts.verifier), Arc::clone(&parts.audit));
        if let Some(keys) = &parts.api_keys {
            auth_layer = auth_layer.with_api_keys(Arc::clone(keys));
        }
        let guarded = auth_layer.layer(
            AuthzLayer::new(Arc::clone(&parts.policy), Arc::clone(&parts.audit)).layer(
                RateLimitLayer::new(Arc::clone(&parts.limits), Arc::clone(&parts.audit)).layer(
                    tower::service_fn(move |req: Request<Full<Bytes>>| {
                        let state = Arc::clone(&proxy_state);
                        async move {
                            let route = req.extensions().get::<Matched>().map(|m| Arc::clone(&m.0));
                            match route.as_ref().map(|r| &r.handler) {
                                Some(Handler::RevokeSessions) => admin_endpoint(state, req).await,
                                Some(Handler::Proxy(upstream)) => proxy(state, upstream, req).await,
                                // Authorization denies unrouted requests before this.
                                _ => Ok(crate::http::error_response(
                                    http::StatusCode::NOT_FOUND,
                                    "route_not_found",
                                    "no such route",
                                )),
                            }
                        }
                    }),
                ),
            ),
        );
        let api = edge.clone().service(
            ClientIpLayer::new(parts.trusted_proxies.clone())
                .layer(validation.clone().layer(guarded)),
        );
        let auth_state = Arc::clone(&state);
        let auth = edge.service(ClientIpLayer::new(trusted).layer(validation.layer(
            RateLimitLayer::new(limits, audit_sink).layer(tower::service_fn(move |req| {
                auth_endpoint(Arc::clone(&auth_state), req)
            })),
        )));
        Ok(GatewayServer {
            config,
            state,
            api: BoxedService::new(api),
            auth: BoxedService::new(auth),
        })
    }
}

#[cfg(feature = "redis")]
async fn connect_redis(url: &str) -> Result<fred::prelude::Client, ConfigError> {
    use fred::prelude::{Builder, ClientLike, Config};
    let invalid = |why: String| ConfigError::Invalid(format!("[redis] {why}"));
    let config = Config::from_url(url).map_err(|e| invalid(format!("bad url: {e}")))?;
    let client = Builder::from_config(config)
        .with_connection_config(|c| c.connection_timeout = Duration::from_secs(3))
        .build()
        .map_err(|e| invalid(e.to_string()))?;
    match tokio::time::timeout(Duration::from_secs(5), client.init()).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(e)) => Err(invalid(format!("cannot connect: {e}"))),
        Err(_) => Err(invalid("cannot connect: timed out".into())),
    }
}
