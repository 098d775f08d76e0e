//! Building a [`GatewayServer`] from a [`GatewayConfig`]: keys, policy,
//! limits, audit log, upstream clients and the layer stacks.

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
use super::login::{Tokens, Users, auth_endpoint};
use super::proxy::{Upstream, proxy};
use super::routes::{Handler, Matched, build_table};
use super::{BoxedService, GatewayServer, State};
use crate::audit::{AuditChain, AuditLog, FileWriter, StdoutWriter};
use crate::client_ip::TrustedProxies;
#[cfg(feature = "redis")]
use crate::config::RedisFailure;
use crate::config::{AuditSinkKind, ConfigError, GatewayConfig, KeyAlgorithm, KeyEntry, Secret};
use crate::http::{
    ApiKeys, AuthLayer, AuthzLayer, ClientIpLayer, CorsConfig, GatewayMetrics, GatewayParts,
    MetricsLayer, RateLimitLayer, RateLimits, SecurityHeadersLayer, ValidationConfig,
    ValidationLayer,
};
use crate::jwt::{JwtConfig, JwtVerifier, KeySet, VerifyingKey};
use crate::ratelimit::Quota;
use crate::rbac::{PolicyConfig, RoleDef};
use crate::token::{MemoryStore, TokenConfig, TokenService};

/// Reads a value given inline or through an environment variable
/// (`validate` ensured exactly one is set).
fn inline_or_env(
    field: &str,
    inline: Option<&Secret>,
    env: Option<&String>,
) -> Result<String, ConfigError> {
    match (inline, env) {
        (Some(value), _) => Ok(value.expose().to_owned()),
        (None, Some(var)) => std::env::var(var).map_err(|source| ConfigError::Env {
            field: field.to_owned(),
            var: var.clone(),
            source,
        }),
        (None, None) => Err(ConfigError::invalid(
            field,
            "no value and no environment variable",
        )),
    }
}

fn read_file(path: &std::path::Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

fn hs256_secret(entry: &KeyEntry) -> Result<String, ConfigError> {
    let field = format!("[[jwt.keys]] {:?} secret_env", entry.kid);
    inline_or_env(&field, entry.secret.as_ref(), entry.secret_env.as_ref())
}

fn key_from_entry(entry: &KeyEntry) -> Result<VerifyingKey, ConfigError> {
    let key = |source| ConfigError::Key { source };
    let kid = entry.kid.clone();
    if entry.alg == KeyAlgorithm::Hs256 {
        return Ok(VerifyingKey::hs256(kid, hs256_secret(entry)?.as_bytes()));
    }
    let path = entry.public_key_pem.as_ref().ok_or_else(|| {
        ConfigError::invalid(
            format!("[[jwt.keys]] {:?}", entry.kid),
            format!("{} needs public_key_pem", entry.alg),
        )
    })?;
    let pem = read_file(path)?;
    match entry.alg {
        KeyAlgorithm::Rs256 => VerifyingKey::rs256_pem(kid, &pem),
        KeyAlgorithm::Es256 => VerifyingKey::es256_pem(kid, &pem),
        KeyAlgorithm::EdDsa | KeyAlgorithm::Hs256 => VerifyingKey::eddsa_pem(kid, &pem),
    }
    .map_err(key)
}

/// How `[tokens] signing_kid` signs: with its HS256 secret, or with the
/// private key in `[tokens] private_key_pem` for an asymmetric key.
fn signing_config(config: &GatewayConfig, kid: &str) -> Result<TokenConfig, ConfigError> {
    let entry = config
        .jwt
        .keys
        .iter()
        .find(|k| k.kid == kid)
        .ok_or_else(|| ConfigError::invalid("[tokens] signing_kid", format!("no key {kid:?}")))?;
    let issuer = config.jwt.issuer.clone().unwrap_or_default();
    let audience = config.jwt.audience.clone().unwrap_or_default();
    if entry.alg == KeyAlgorithm::Hs256 {
        let secret = hs256_secret(entry)?;
        return Ok(TokenConfig::hs256(issuer, audience, kid, secret.as_bytes()));
    }
    let path = config.tokens.private_key_pem.as_ref().ok_or_else(|| {
        ConfigError::invalid(
            "[tokens] signing_kid",
            format!("{kid:?} is {}: set [tokens] private_key_pem", entry.alg),
        )
    })?;
    let pem = read_file(path)?;
    TokenConfig::from_private_pem(issuer, audience, kid, entry.alg.key_alg(), &pem)
        .map_err(|source| ConfigError::Signing { source })
}

impl GatewayServer {
    /// Builds the gateway (keys, policy, limits, audit log, upstream client)
    /// from `config`. Validates the whole configuration first
    /// ([`GatewayConfig::validate`]) and then everything that needs files or
    /// the environment; only then does it open the audit log and connect to
    /// Redis. Binds nothing.
    pub async fn build(config: GatewayConfig) -> Result<GatewayServer, ConfigError> {
        config.validate()?;
        // Keys and verification.
        let mut keys = match &config.jwt.jwks_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                KeySet::from_jwks(&text).map_err(|source| ConfigError::Key { source })?
            }
            None => KeySet::new(),
        };
        for entry in &config.jwt.keys {
            keys = keys
                .with_key(key_from_entry(entry)?)
                .map_err(|source| ConfigError::Key { source })?;
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
        let policy = policy
            .compile()
            .map_err(|source| ConfigError::Policy { source })?;
        // Default path options (`;` refused): the same ones `dispatch` routes with.
        let validation = ValidationConfig::default();

        // API keys, limits, proxies, CORS.
        let mut api_keys = ApiKeys::new();
        for entry in &config.api_keys {
            let field = format!("[[api_keys]] {:?} key_env", entry.id);
            let key = inline_or_env(&field, entry.key.as_ref(), entry.key_env.as_ref())?;
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
        let trusted = TrustedProxies::parse(&config.trusted_proxies)
            .map_err(|source| ConfigError::TrustedProxies { source })?;
        let mut cors = CorsConfig::default().with_credentials(config.cors.allow_credentials);
        for origin in &config.cors.allowed_origins {
            cors = cors.allow_origin(origin.clone());
        }
        let cors = cors
            .layer()
            .map_err(|source| ConfigError::Cors { source })?;
        let users = Users::new(&config.users)?;
        let token_config = match &config.tokens.signing_kid {
            Some(kid) => {
                let t = &config.tokens;
                Some(
                    signing_config(&config, kid)?
                        .with_reuse_grace(Duration::from_secs(t.reuse_grace_secs))
                        .with_refresh_lifetimes(
                            Duration::from_secs(t.refresh_idle_ttl_secs),
                            Duration::from_secs(t.refresh_absolute_ttl_secs),
                        )
                        .with_access_ttl(Duration::from_secs(t.access_ttl_secs)),
                )
            }
            None => None,
        };

        // Everything is checked: now the side effects (Redis, the audit file).
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
                on_failure: match section.on_failure {
                    RedisFailure::Open => crate::ratelimit::FailurePolicy::FailOpen,
                    RedisFailure::Closed => crate::ratelimit::FailurePolicy::FailClosed,
                    RedisFailure::Local => crate::ratelimit::FailurePolicy::LocalFallback,
                },
            }),
            _ => limits,
        };
        let limits = Arc::new(limits);
        let tokens = token_config.map(|token_config| {
            #[cfg(feature = "redis")]
            if let (Some(client), Some(section)) = (&redis, &config.redis) {
                let store = crate::token::RedisStore::new(
                    client.clone(),
                    format!("{}tokens:", section.prefix),
                );
                return Tokens::Redis(TokenService::new(store, token_config));
            }
            Tokens::Memory(TokenService::new(MemoryStore::new(), token_config))
        });

        // Audit log and metrics.
        let audit = match (config.audit.sink, &config.audit.path) {
            (AuditSinkKind::File, Some(path)) => FileWriter::open(path)
                .and_then(|(writer, chain)| AuditLog::spawn(writer, chain, config.audit.queue)),
            _ => AuditLog::spawn(StdoutWriter, AuditChain::new(), config.audit.queue),
        }
        .map_err(|source| ConfigError::Audit { source })?;
        let audit = Arc::new(audit);
        let metrics = Arc::new(GatewayMetrics::new(Some(Arc::clone(&audit))));

        let mut all_upstreams: Vec<Upstream> = Vec::new();
        for u in config.upstreams.values() {
            all_upstreams.push(Upstream::new(
                &u.url,
                Duration::from_millis(u.timeout_ms),
                u.http2,
            ));
        }
        // Small request/response messages: Nagle's algorithm would hold
        // them back waiting for ACKs, so both hops disable it.
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client_h2 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(super::pool::IDLE_TIMEOUT)
            .http2_only(true)
            .build(connector);
        let state = Arc::new(State {
            pool: super::pool::UpstreamPool::new(),
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
        let mut auth_layer = AuthLayer::new(Arc::clone(&parts.verifier), Arc::clone(&parts.audit))
            .with_limits(Arc::clone(&parts.limits));
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
/// Connects with the suite's one Redis setup (`redis_kit`: bounded first
/// connect, reconnect back-off).
async fn connect_redis(url: &str) -> Result<fred::prelude::Client, ConfigError> {
    redis_kit::RedisSetup::new(url)
        .connect()
        .await
        .map_err(|e| ConfigError::Redis {
            reason: "cannot connect".to_owned(),
            source: Some(Box::new(e)),
        })
}
