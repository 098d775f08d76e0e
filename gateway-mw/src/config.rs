//! The gateway's configuration file (TOML), documented option by option in
//! `docs/gateway-mw/CONFIG.md`. Every section but `[jwt]`, `[[routes]]` and
//! `[upstreams]` is optional and has defaults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is invalid or does not match the schema.
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// The configuration is well-formed but inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Listen address. Default `127.0.0.1:8080`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Seconds to let in-flight requests finish on SIGTERM. Default 10.
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
    /// Token verification.
    pub jwt: JwtSection,
    /// The demo token endpoints (`/auth/token`, `/auth/refresh`, `/auth/logout`).
    #[serde(default)]
    pub tokens: TokensSection,
    /// Demo users for `/auth/token`.
    #[serde(default)]
    pub users: Vec<UserEntry>,
    /// API keys accepted in `X-Api-Key`.
    #[serde(default)]
    pub api_keys: Vec<ApiKeyEntry>,
    /// Roles by name.
    #[serde(default)]
    pub roles: BTreeMap<String, RoleEntry>,
    /// Route rules: method, path template, permission, upstream.
    pub routes: Vec<RouteEntry>,
    /// Upstreams by name.
    pub upstreams: BTreeMap<String, UpstreamEntry>,
    /// Rate limits.
    #[serde(default)]
    pub rate_limits: RateLimitSection,
    /// CORS.
    #[serde(default)]
    pub cors: CorsSection,
    /// Trusted proxies for `X-Forwarded-For`.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// The audit log.
    #[serde(default)]
    pub audit: AuditSection,
    /// The gateway's own administrative endpoints.
    #[serde(default)]
    pub admin: AdminSection,
    /// A demo upstream the example starts in-process.
    #[serde(default)]
    pub demo_upstream: Option<DemoUpstream>,
    /// Shared state in Redis: rate limits and refresh tokens (feature `redis`).
    #[serde(default)]
    pub redis: Option<RedisSection>,
}

/// `[redis]`: when present, rate limits and refresh tokens live in Redis, so
/// every gateway instance shares them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSection {
    /// `redis://host:port[/db]`.
    pub url: String,
    /// Prefix of every key the gateway writes. Default `gw:`.
    #[serde(default = "default_redis_prefix")]
    pub prefix: String,
    /// Per rate-limit check. Default 20 ms.
    #[serde(default = "default_redis_timeout")]
    pub timeout_ms: u64,
    /// When Redis fails: `local` (a per-instance limiter, default), `open` or `closed`.
    #[serde(default = "default_on_failure")]
    pub on_failure: String,
}

fn default_redis_prefix() -> String {
    "gw:".into()
}
fn default_redis_timeout() -> u64 {
    20
}
fn default_on_failure() -> String {
    "local".into()
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_grace() -> u64 {
    10
}

/// `[jwt]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSection {
    /// Required `iss`, if set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    #[serde(default)]
    pub audience: Option<String>,
    /// Leeway in seconds. Default 30.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// Keys (`[[jwt.keys]]`).
    #[serde(default)]
    pub keys: Vec<KeyEntry>,
    /// A JWKS file to load keys from, in addition to `keys`.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
}

fn default_leeway() -> u64 {
    30
}

/// `[[jwt.keys]]`: one verification key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// The key id tokens name in `kid`.
    pub kid: String,
    /// `HS256`, `RS256`, `ES256` or `EdDSA`: the one algorithm this key verifies.
    pub alg: String,
    /// HS256: the secret, inline (for demos).
    #[serde(default)]
    pub secret: Option<String>,
    /// HS256: the name of an environment variable holding the secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// RS256/ES256/EdDSA: a PEM file with the public key.
    #[serde(default)]
    pub public_key_pem: Option<PathBuf>,
}

/// `[tokens]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensSection {
    /// The key (`kid`) that signs access tokens; must be in `[jwt]`. An
    /// HS256 key signs with its secret; an RS256/ES256/EdDSA key needs
    /// `private_key_pem`.
    #[serde(default)]
    pub signing_kid: Option<String>,
    /// For an asymmetric `signing_kid`: a PEM file with its private key.
    #[serde(default)]
    pub private_key_pem: Option<PathBuf>,
    /// Access-token lifetime. Default 600 s.
    #[serde(default = "default_access_ttl")]
    pub access_ttl_secs: u64,
    /// Refresh-token idle lifetime. Default 7 days.
    #[serde(default = "default_idle")]
    pub refresh_idle_ttl_secs: u64,
    /// Session absolute lifetime. Default 30 days.
    #[serde(default = "default_absolute")]
    pub refresh_absolute_ttl_secs: u64,
    /// Grace for concurrent refreshes. Default 10 s.
    #[serde(default = "default_reuse_grace")]
    pub reuse_grace_secs: u64,
}

impl Default for TokensSection {
    fn default() -> Self {
        TokensSection {
            signing_kid: None,
            private_key_pem: None,
            access_ttl_secs: default_access_ttl(),
            refresh_idle_ttl_secs: default_idle(),
            refresh_absolute_ttl_secs: default_absolute(),
            reuse_grace_secs: default_reuse_grace(),
        }
    }
}

fn default_access_ttl() -> u64 {
    600
}
fn default_idle() -> u64 {
    7 * 24 * 3600
}
fn default_absolute() -> u64 {
    30 * 24 * 3600
}
fn default_reuse_grace() -> u64 {
    10
}

/// `[[users]]`: a demo user.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    /// Login name (becomes `sub`).
    pub name: String,
    /// Hex SHA-256 of the password (demo only: use a real identity provider
    /// and a password hash such as Argon2id in production).
    pub password_sha256: String,
    /// Roles.
    #[serde(default)]
    pub roles: Vec<String>,
}

/// `[[api_keys]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyEntry {
    /// The key's id (used for limits and the audit log).
    pub id: String,
    /// The key itself, inline (demo) ...
    #[serde(default)]
    pub key: Option<String>,
    /// ... or the name of an environment variable holding it.
    #[serde(default)]
    pub key_env: Option<String>,
    /// Roles.
    #[serde(default)]
    pub roles: Vec<String>,
}

/// `[roles.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleEntry {
    /// `resource:action` permissions.
    #[serde(default)]
    pub permissions: Vec<String>,
    /// Roles whose permissions this one also grants.
    #[serde(default)]
    pub inherits: Vec<String>,
}

/// `[[routes]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteEntry {
    /// Method, or `*`.
    pub method: String,
    /// Path template (`/v1/orders/{id}`, `/files/*rest`).
    pub path: String,
    /// Required permission.
    pub permission: String,
    /// Upstream name.
    pub upstream: String,
    /// Content types the route accepts (415 otherwise); empty accepts any.
    #[serde(default)]
    pub content_types: Vec<String>,
    /// Whether the body must be JSON (depth 32, 256 KiB).
    #[serde(default)]
    pub json: bool,
    /// A quota for this route per caller, replacing the default one here.
    #[serde(default)]
    pub quota_per_minute: Option<u32>,
}

/// `[upstreams.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamEntry {
    /// Base URL, `http://host:port`.
    pub url: String,
    /// Per-request timeout. Default 10 s.
    #[serde(default = "default_upstream_timeout")]
    pub timeout_ms: u64,
    /// Speak HTTP/2 (cleartext, prior knowledge) to this upstream: requests
    /// share a few multiplexed connections instead of one connection each.
    /// The upstream must accept h2c. Default false (HTTP/1.1, pooled).
    #[serde(default)]
    pub http2: bool,
}

fn default_upstream_timeout() -> u64 {
    10_000
}

/// `[rate_limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSection {
    /// Per user. Default 1,000/min.
    #[serde(default = "default_user_rate")]
    pub per_user_per_minute: u32,
    /// Per API key. Default 10,000/min.
    #[serde(default = "default_key_rate")]
    pub per_api_key_per_minute: u32,
    /// Per anonymous client IP (IPv6 /64). Default 60/min.
    #[serde(default = "default_ip_rate")]
    pub per_ip_per_minute: u32,
}

impl Default for RateLimitSection {
    fn default() -> Self {
        RateLimitSection {
            per_user_per_minute: default_user_rate(),
            per_api_key_per_minute: default_key_rate(),
            per_ip_per_minute: default_ip_rate(),
        }
    }
}

fn default_user_rate() -> u32 {
    1_000
}
fn default_key_rate() -> u32 {
    10_000
}
fn default_ip_rate() -> u32 {
    60
}

/// `[cors]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsSection {
    /// Exact origins. Default none.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Whether credentials may be sent. Default false.
    #[serde(default)]
    pub allow_credentials: bool,
}

/// `[audit]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// `stdout`, or a file path (appended, chained across restarts). Default `stdout`.
    #[serde(default = "default_audit_sink")]
    pub sink: String,
    /// Queue capacity. Default 10,000.
    #[serde(default = "default_audit_queue")]
    pub queue: usize,
}

impl Default for AuditSection {
    fn default() -> Self {
        AuditSection {
            sink: default_audit_sink(),
            queue: default_audit_queue(),
        }
    }
}

fn default_audit_sink() -> String {
    "stdout".into()
}
fn default_audit_queue() -> usize {
    10_000
}

/// `[admin]`: the gateway's administrative endpoints
/// (`POST /admin/users/{user}/revoke-sessions`), each audited.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// The permission an administrator needs. Default `gateway:admin`.
    #[serde(default = "default_admin_permission")]
    pub permission: String,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            permission: default_admin_permission(),
        }
    }
}

fn default_admin_permission() -> String {
    "gateway:admin".into()
}

/// `[demo_upstream]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoUpstream {
    /// Where the demo upstream listens.
    pub listen: SocketAddr,
}

impl GatewayConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<GatewayConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        GatewayConfig::parse(&text)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<GatewayConfig, ConfigError> {
        let config: GatewayConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for route in &self.routes {
            if !self.upstreams.contains_key(&route.upstream) {
                return Err(ConfigError::Invalid(format!(
                    "route {} {} names unknown upstream {:?}",
                    route.method, route.path, route.upstream
                )));
            }
        }
        for (name, upstream) in &self.upstreams {
            if !upstream.url.starts_with("http://") {
                return Err(ConfigError::Invalid(format!(
                    "upstream {name:?}: only http:// URLs are supported, got {:?}",
                    upstream.url
                )));
            }
        }
        if self.jwt.keys.is_empty() && self.jwt.jwks_file.is_none() {
            return Err(ConfigError::Invalid(
                "[jwt] needs at least one key or a jwks_file".into(),
            ));
        }
        if let Some(redis) = &self.redis {
            if !cfg!(feature = "redis") {
                return Err(ConfigError::Invalid(
                    "[redis] is set but this build lacks the `redis` feature".into(),
                ));
            }
            if !matches!(redis.on_failure.as_str(), "local" | "open" | "closed") {
                return Err(ConfigError::Invalid(format!(
                    "[redis] on_failure must be local, open or closed, got {:?}",
                    redis.on_failure
                )));
            }
        }
        if let Some(kid) = &self.tokens.signing_kid {
            match self.jwt.keys.iter().find(|k| &k.kid == kid) {
                None => {
                    return Err(ConfigError::Invalid(format!(
                        "[tokens] signing_kid {kid:?} must name a key in [jwt]"
                    )));
                }
                Some(k) if k.alg != "HS256" && self.tokens.private_key_pem.is_none() => {
                    return Err(ConfigError::Invalid(format!(
                        "[tokens] signing_kid {kid:?} is {}: set [tokens] private_key_pem",
                        k.alg
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}
