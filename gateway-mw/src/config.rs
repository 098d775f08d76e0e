//! The gateway's configuration file (TOML), documented option by option in
//! `docs/gateway-mw/CONFIG.md`. Every section but `[jwt]`, `[[routes]]` and
//! `[upstreams]` is optional and has defaults.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

/// Why a configuration could not be loaded or built. Each variant keeps the
/// error that caused it as its [`source`](std::error::Error::source).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A file could not be read (the configuration, a key, the audit log).
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is invalid or does not match the schema (unknown keys, a
    /// value outside a field's allowed values, a wrong type).
    #[error("invalid configuration: {source}")]
    Parse {
        /// The TOML error, with the line, the field and what is allowed.
        #[source]
        source: toml::de::Error,
    },
    /// The configuration is well-formed but inconsistent.
    #[error("invalid configuration: {field}: {reason}")]
    Invalid {
        /// The key or section at fault, as written in the file
        /// (e.g. `[redis] on_failure`, `[[routes]] GET /v1/x`).
        field: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// An environment variable a key names is unset or not UTF-8.
    #[error("invalid configuration: {field}: environment variable {var}: {source}")]
    Env {
        /// The key naming the variable.
        field: String,
        /// The variable.
        var: String,
        /// Why it could not be read.
        #[source]
        source: std::env::VarError,
    },
    /// A JWT verification key (or the JWKS file) was refused.
    #[error("invalid configuration: [jwt]: {source}")]
    Key {
        /// The key error.
        #[source]
        source: crate::jwt::KeyError,
    },
    /// `[tokens]` could not make a signing key.
    #[error("invalid configuration: [tokens]: {source}")]
    Signing {
        /// The token error.
        #[source]
        source: crate::token::TokenError,
    },
    /// The roles do not compile into a policy (unknown parent, cycle, bad
    /// permission).
    #[error("invalid configuration: [roles]: {source}")]
    Policy {
        /// The policy error.
        #[source]
        source: crate::rbac::PolicyError,
    },
    /// A route template is invalid or routed twice.
    #[error("invalid configuration: {route}: {source}")]
    Route {
        /// The route, as `[[routes]] METHOD path` (or `built-in METHOD path`).
        route: String,
        /// The router's error.
        #[source]
        source: crate::router::RouteError,
    },
    /// `[cors]` is refused.
    #[error("invalid configuration: [cors]: {source}")]
    Cors {
        /// The CORS error.
        #[source]
        source: crate::http::CorsConfigError,
    },
    /// `trusted_proxies` holds something that is not a CIDR.
    #[error("invalid configuration: trusted_proxies: {source}")]
    TrustedProxies {
        /// The parse error.
        #[source]
        source: crate::client_ip::InvalidCidr,
    },
    /// The audit log could not be opened or its writer started.
    #[error("cannot start the audit log: {source}")]
    Audit {
        /// The audit log's error.
        #[source]
        source: crate::audit::AuditError,
    },
    /// A `[[users]]` password hash is not a valid Argon2 PHC string.
    #[error("invalid configuration: [[users]] {user:?} password_hash: {source}")]
    Password {
        /// The user.
        user: String,
        /// The PHC parser's error.
        #[source]
        source: argon2::password_hash::Error,
    },
    /// `[redis]` could not be reached or is malformed.
    #[error("invalid configuration: [redis]: {reason}")]
    Redis {
        /// What failed.
        reason: String,
        /// The client's error, if there was one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

/// What kind of failure a [`ConfigError`] is, to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// [`ConfigError::Read`].
    Read,
    /// [`ConfigError::Parse`].
    Parse,
    /// [`ConfigError::Invalid`].
    Invalid,
    /// [`ConfigError::Env`].
    Env,
    /// [`ConfigError::Key`].
    Key,
    /// [`ConfigError::Signing`].
    Signing,
    /// [`ConfigError::Policy`].
    Policy,
    /// [`ConfigError::Route`].
    Route,
    /// [`ConfigError::Cors`].
    Cors,
    /// [`ConfigError::TrustedProxies`].
    TrustedProxies,
    /// [`ConfigError::Audit`].
    Audit,
    /// [`ConfigError::Redis`].
    Redis,
    /// [`ConfigError::Password`].
    Password,
}

impl ConfigError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ConfigErrorKind {
        match self {
            ConfigError::Read { .. } => ConfigErrorKind::Read,
            ConfigError::Parse { .. } => ConfigErrorKind::Parse,
            ConfigError::Invalid { .. } => ConfigErrorKind::Invalid,
            ConfigError::Env { .. } => ConfigErrorKind::Env,
            ConfigError::Key { .. } => ConfigErrorKind::Key,
            ConfigError::Signing { .. } => ConfigErrorKind::Signing,
            ConfigError::Policy { .. } => ConfigErrorKind::Policy,
            ConfigError::Route { .. } => ConfigErrorKind::Route,
            ConfigError::Cors { .. } => ConfigErrorKind::Cors,
            ConfigError::TrustedProxies { .. } => ConfigErrorKind::TrustedProxies,
            ConfigError::Audit { .. } => ConfigErrorKind::Audit,
            ConfigError::Redis { .. } => ConfigErrorKind::Redis,
            ConfigError::Password { .. } => ConfigErrorKind::Password,
        }
    }

    /// An inconsistency in `field`.
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Reads one of a fixed set of strings, refusing any other with an error
/// that names the field and lists the allowed values.
fn choice<'de, D, T: Copy>(
    deserializer: D,
    field: &str,
    allowed: &[(&str, T)],
    hint: &str,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    let value = String::deserialize(deserializer)?;
    allowed
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<String> = allowed.iter().map(|(n, _)| format!("{n:?}")).collect();
            serde::de::Error::custom(format!(
                "{field}: unknown value {value:?}; allowed: {}{hint}",
                names.join(", ")
            ))
        })
}

/// `[[jwt.keys]] alg`: the one algorithm a key verifies (and signs with,
/// for `[tokens] signing_kid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// `HS256`: HMAC-SHA-256 with a shared secret.
    Hs256,
    /// `RS256`: RSA PKCS#1 v1.5 with SHA-256.
    Rs256,
    /// `ES256`: ECDSA P-256 with SHA-256.
    Es256,
    /// `EdDSA`: Ed25519.
    EdDsa,
}

impl KeyAlgorithm {
    /// The verifier's algorithm.
    pub fn key_alg(self) -> crate::jwt::KeyAlg {
        match self {
            KeyAlgorithm::Hs256 => crate::jwt::KeyAlg::Hs256,
            KeyAlgorithm::Rs256 => crate::jwt::KeyAlg::Rs256,
            KeyAlgorithm::Es256 => crate::jwt::KeyAlg::Es256,
            KeyAlgorithm::EdDsa => crate::jwt::KeyAlg::EdDsa,
        }
    }
}

impl std::fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.key_alg().as_str())
    }
}

impl<'de> Deserialize<'de> for KeyAlgorithm {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        choice(
            d,
            "[[jwt.keys]] alg",
            &[
                ("HS256", KeyAlgorithm::Hs256),
                ("RS256", KeyAlgorithm::Rs256),
                ("ES256", KeyAlgorithm::Es256),
                ("EdDSA", KeyAlgorithm::EdDsa),
            ],
            "",
        )
    }
}

/// `[redis] on_failure`: what a rate-limit check does when Redis fails or
/// times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RedisFailure {
    /// `local`: a per-instance limiter with the same quota (the default).
    #[default]
    Local,
    /// `open`: allow.
    Open,
    /// `closed`: deny.
    Closed,
}

impl<'de> Deserialize<'de> for RedisFailure {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        choice(
            d,
            "[redis] on_failure",
            &[
                ("local", RedisFailure::Local),
                ("open", RedisFailure::Open),
                ("closed", RedisFailure::Closed),
            ],
            "",
        )
    }
}

/// `[audit] sink`: where audit records go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuditSinkKind {
    /// `stdout`: JSON lines on standard output (the default).
    #[default]
    Stdout,
    /// `file`: appended to `[audit] path`, mode 0600, the chain continued
    /// across restarts.
    File,
}

impl<'de> Deserialize<'de> for AuditSinkKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        choice(
            d,
            "[audit] sink",
            &[
                ("stdout", AuditSinkKind::Stdout),
                ("file", AuditSinkKind::File),
            ],
            " (a file sink names its file in [audit] path)",
        )
    }
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
    /// How connections are spread over threads. Default `multi_thread`.
    #[serde(default)]
    pub runtime: RuntimeLayout,
    /// Serving threads with `runtime = "per_core"`. Default: one per core.
    #[serde(default)]
    pub threads: Option<usize>,
    /// With `runtime = "per_core"`: pin each serving thread to a CPU of its
    /// own when there are no more threads than CPUs
    /// (`http_kit::ServeConfig::pin_threads`). Default true.
    #[serde(default = "default_true")]
    pub pin_threads: bool,
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
/// every gateway instance shares them. `Debug` hides the URL's credentials.
#[derive(Clone, Deserialize)]
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
    #[serde(default)]
    pub on_failure: RedisFailure,
}

impl std::fmt::Debug for RedisSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSection")
            .field("url", &redact_userinfo(&self.url))
            .field("prefix", &self.prefix)
            .field("timeout_ms", &self.timeout_ms)
            .field("on_failure", &self.on_failure)
            .finish()
    }
}

/// `scheme://user:password@host/...` with the user and password replaced,
/// so a URL can be shown.
fn redact_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://{REDACTED}{}", &rest[at..]),
        None => url.to_owned(),
    }
}

/// What `Debug` shows instead of a secret.
const REDACTED: &str = "<redacted>";

/// A secret read from the configuration (an HMAC key, an API key): usable
/// through [`Secret::expose`], never shown by `Debug` or `Display`, so the
/// effective configuration can be printed and logged.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the code that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

fn default_redis_prefix() -> String {
    "gw:".into()
}
fn default_redis_timeout() -> u64 {
    20
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_grace() -> u64 {
    10
}

fn default_true() -> bool {
    true
}

/// `runtime`: how the gateway spreads connections over threads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeLayout {
    /// The caller's tokio runtime (the example's is multi-threaded): one
    /// listening socket, connections spread by work stealing.
    #[default]
    MultiThread,
    /// One single-threaded runtime per serving thread, each serving the
    /// connections dealt to it in turn (`http_kit::per_thread`) with its own
    /// upstream connections: a request and its upstream exchange stay on
    /// one thread, as in nginx and HAProxy. A connection stays on the
    /// thread it was dealt to, so a few long-lived busy connections can
    /// load the threads unevenly.
    PerCore,
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
    pub alg: KeyAlgorithm,
    /// HS256: the secret, inline (for demos). Redacted in `Debug`.
    #[serde(default)]
    pub secret: Option<Secret>,
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

/// `[[users]]`: a user of the demo token endpoint (`POST /auth/token`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    /// Login name (becomes `sub`).
    pub name: String,
    /// The password as an Argon2id PHC string
    /// (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`), from
    /// [`hash_password`] or any Argon2 tool. Redacted in `Debug`.
    #[serde(default)]
    pub password_hash: Option<Secret>,
    /// Roles.
    #[serde(default)]
    pub roles: Vec<String>,
    /// The former unsalted SHA-256 field: read only to refuse it with an
    /// error that says what to do instead.
    #[serde(default, rename = "password_sha256")]
    legacy_password_sha256: Option<Secret>,
}

impl UserEntry {
    /// A user whose password hash is `password_hash` (an Argon2id PHC string).
    pub fn new(name: impl Into<String>, password_hash: Secret, roles: Vec<String>) -> UserEntry {
        UserEntry {
            name: name.into(),
            password_hash: Some(password_hash),
            roles,
            legacy_password_sha256: None,
        }
    }

    /// Checks the hash: present, an Argon2id PHC string, not a bare digest.
    fn check_password_hash(&self) -> Result<(), ConfigError> {
        let field = format!("[[users]] {:?} password_hash", self.name);
        let how = "make one with `cargo run --example gateway -- --hash-password` \
                   (see docs/gateway-mw/CONFIG.md)";
        if self.legacy_password_sha256.is_some() {
            return Err(ConfigError::invalid(
                format!("[[users]] {:?} password_sha256", self.name),
                format!(
                    "unsalted SHA-256 password hashes are no longer accepted; \
                     set password_hash to an Argon2id PHC string instead: {how}"
                ),
            ));
        }
        let Some(hash) = &self.password_hash else {
            return Err(ConfigError::invalid(field, format!("is required: {how}")));
        };
        let hash = hash.expose();
        if hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ConfigError::invalid(
                field,
                format!(
                    "looks like an unsalted SHA-256 digest; an Argon2id PHC string is required: {how}"
                ),
            ));
        }
        let parsed = argon2::PasswordHash::new(hash).map_err(|source| ConfigError::Password {
            user: self.name.clone(),
            source,
        })?;
        if parsed.algorithm != argon2::Algorithm::Argon2id.ident() {
            return Err(ConfigError::invalid(
                field,
                format!(
                    "is a {} hash; only argon2id is accepted: {how}",
                    parsed.algorithm
                ),
            ));
        }
        argon2::Params::try_from(&parsed).map_err(|source| ConfigError::Password {
            user: self.name.clone(),
            source,
        })?;
        Ok(())
    }
}

/// Hashes `password` for `[[users]] password_hash`: Argon2id, version 19,
/// 19 MiB, 2 passes, 1 lane (the OWASP recommendation), with a random
/// 128-bit salt, as a PHC string.
pub fn hash_password(password: &str) -> Result<Secret, crate::Error> {
    use argon2::PasswordHasher;
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(crate::Error::Random)?;
    let salt = argon2::password_hash::SaltString::encode_b64(&salt)
        .map_err(|source| crate::Error::PasswordHash { source })?;
    let hash = argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|source| crate::Error::PasswordHash { source })?;
    Ok(Secret::new(hash.to_string()))
}

/// `[[api_keys]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyEntry {
    /// The key's id (used for limits and the audit log).
    pub id: String,
    /// The key itself, inline (demo; redacted in `Debug`) ...
    #[serde(default)]
    pub key: Option<Secret>,
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
    /// `stdout` (the default) or `file`.
    #[serde(default)]
    pub sink: AuditSinkKind,
    /// The file, for `sink = "file"` (appended, chained across restarts).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Queue capacity. Default 10,000.
    #[serde(default = "default_audit_queue")]
    pub queue: usize,
}

impl Default for AuditSection {
    fn default() -> Self {
        AuditSection {
            sink: AuditSinkKind::Stdout,
            path: None,
            queue: default_audit_queue(),
        }
    }
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
            toml::from_str(text).map_err(|source| ConfigError::Parse { source })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks everything that can be checked without touching files, the
    /// environment or the network: every reference resolves, every value is
    /// in range, no key is set where it would be ignored. [`load`](Self::load),
    /// [`parse`](Self::parse) and `GatewayServer::build` all run it, so a
    /// configuration assembled in code is held to the same rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
            ConfigError::invalid(field, reason)
        }
        let at_least_one = |field: &str, value: u64| {
            if value == 0 {
                Err(invalid(field, "must be at least 1"))
            } else {
                Ok(())
            }
        };

        if self.threads == Some(0) {
            return Err(invalid("threads", "must be at least 1"));
        }
        if self.threads.is_some() && self.runtime != RuntimeLayout::PerCore {
            return Err(invalid(
                "threads",
                "applies only with runtime = \"per_core\" (a multi-threaded runtime is sized by its builder, e.g. TOKIO_WORKER_THREADS)",
            ));
        }

        // [jwt]
        if self.jwt.keys.is_empty() && self.jwt.jwks_file.is_none() {
            return Err(invalid(
                "[jwt]",
                "needs at least one [[jwt.keys]] or a jwks_file",
            ));
        }
        for key in &self.jwt.keys {
            let field = format!("[[jwt.keys]] {:?}", key.kid);
            match key.alg {
                KeyAlgorithm::Hs256 => {
                    match (&key.secret, &key.secret_env) {
                        (Some(_), Some(_)) => {
                            return Err(invalid(field, "set secret or secret_env, not both"));
                        }
                        (None, None) => {
                            return Err(invalid(field, "HS256 needs secret or secret_env"));
                        }
                        _ => {}
                    }
                    if key.public_key_pem.is_some() {
                        return Err(invalid(field, "HS256 takes no public_key_pem"));
                    }
                }
                alg => {
                    if key.public_key_pem.is_none() {
                        return Err(invalid(field, format!("{alg} needs public_key_pem")));
                    }
                    if key.secret.is_some() || key.secret_env.is_some() {
                        return Err(invalid(field, format!("{alg} takes no secret")));
                    }
                }
            }
        }

        // [tokens]
        let t = &self.tokens;
        match &t.signing_kid {
            Some(kid) => match self.jwt.keys.iter().find(|k| &k.kid == kid) {
                None => {
                    return Err(invalid(
                        "[tokens] signing_kid",
                        format!("{kid:?} must name a key in [[jwt.keys]]"),
                    ));
                }
                Some(k) if k.alg != KeyAlgorithm::Hs256 && t.private_key_pem.is_none() => {
                    return Err(invalid(
                        "[tokens] signing_kid",
                        format!("{kid:?} is {}: set [tokens] private_key_pem", k.alg),
                    ));
                }
                Some(k) if k.alg == KeyAlgorithm::Hs256 && t.private_key_pem.is_some() => {
                    return Err(invalid(
                        "[tokens] private_key_pem",
                        format!(
                            "{kid:?} is HS256 and signs with its secret; remove private_key_pem"
                        ),
                    ));
                }
                Some(_) => {}
            },
            None if t.private_key_pem.is_some() => {
                return Err(invalid(
                    "[tokens] private_key_pem",
                    "is set but signing_kid is not",
                ));
            }
            None => {}
        }
        at_least_one("[tokens] access_ttl_secs", t.access_ttl_secs)?;
        at_least_one("[tokens] refresh_idle_ttl_secs", t.refresh_idle_ttl_secs)?;
        at_least_one(
            "[tokens] refresh_absolute_ttl_secs",
            t.refresh_absolute_ttl_secs,
        )?;
        if t.refresh_idle_ttl_secs > t.refresh_absolute_ttl_secs {
            return Err(invalid(
                "[tokens] refresh_idle_ttl_secs",
                "must not exceed refresh_absolute_ttl_secs",
            ));
        }

        // [[users]] and [[api_keys]]
        let role_exists = |field: &str, roles: &[String]| match roles
            .iter()
            .find(|r| !self.roles.contains_key(*r))
        {
            Some(r) => Err(invalid(
                field,
                format!("role {r:?} is not defined in [roles]"),
            )),
            None => Ok(()),
        };
        let mut names = HashSet::new();
        for user in &self.users {
            let field = format!("[[users]] {:?}", user.name);
            if !names.insert(user.name.as_str()) {
                return Err(invalid(field, "defined twice"));
            }
            role_exists(&field, &user.roles)?;
            user.check_password_hash()?;
        }
        let mut ids = HashSet::new();
        for key in &self.api_keys {
            let field = format!("[[api_keys]] {:?}", key.id);
            if !ids.insert(key.id.as_str()) {
                return Err(invalid(field, "defined twice"));
            }
            match (&key.key, &key.key_env) {
                (Some(_), Some(_)) => return Err(invalid(field, "set key or key_env, not both")),
                (None, None) => return Err(invalid(field, "needs key or key_env")),
                _ => {}
            }
            role_exists(&field, &key.roles)?;
        }

        // [[routes]] and [upstreams]
        for route in &self.routes {
            let field = format!("[[routes]] {} {}", route.method, route.path);
            if route.method != "*" && http::Method::from_bytes(route.method.as_bytes()).is_err() {
                return Err(invalid(field, "method must be an HTTP method or *"));
            }
            if !is_permission(&route.permission) {
                return Err(invalid(
                    field,
                    format!("permission {:?} is not resource:action", route.permission),
                ));
            }
            if !self.upstreams.contains_key(&route.upstream) {
                return Err(invalid(
                    field,
                    format!("unknown upstream {:?}", route.upstream),
                ));
            }
            if route.json && !route.content_types.is_empty() {
                return Err(invalid(
                    field,
                    "json = true accepts application/json only; remove content_types",
                ));
            }
            if let Some(q) = route.quota_per_minute {
                at_least_one(&format!("{field} quota_per_minute"), q.into())?;
            }
        }
        for (name, upstream) in &self.upstreams {
            let field = format!("[upstreams.{name}]");
            let authority = upstream
                .url
                .strip_prefix("http://")
                .map(|rest| rest.split('/').next().unwrap_or_default());
            match authority {
                None => {
                    return Err(invalid(
                        format!("{field} url"),
                        format!("only http:// URLs are supported, got {:?}", upstream.url),
                    ));
                }
                Some(a) if a.is_empty() || a.parse::<http::uri::Authority>().is_err() => {
                    return Err(invalid(
                        format!("{field} url"),
                        format!("{:?} has no valid host[:port]", upstream.url),
                    ));
                }
                Some(_) => {}
            }
            at_least_one(&format!("{field} timeout_ms"), upstream.timeout_ms)?;
        }

        // [rate_limits], [audit], [admin], [redis]
        let r = &self.rate_limits;
        at_least_one(
            "[rate_limits] per_user_per_minute",
            r.per_user_per_minute.into(),
        )?;
        at_least_one(
            "[rate_limits] per_api_key_per_minute",
            r.per_api_key_per_minute.into(),
        )?;
        at_least_one(
            "[rate_limits] per_ip_per_minute",
            r.per_ip_per_minute.into(),
        )?;
        match (self.audit.sink, &self.audit.path) {
            (AuditSinkKind::File, None) => {
                return Err(invalid("[audit] path", "sink = \"file\" needs a path"));
            }
            (AuditSinkKind::Stdout, Some(_)) => {
                return Err(invalid("[audit] path", "is only used with sink = \"file\""));
            }
            _ => {}
        }
        at_least_one("[audit] queue", self.audit.queue as u64)?;
        if !is_permission(&self.admin.permission) {
            return Err(invalid(
                "[admin] permission",
                format!("{:?} is not resource:action", self.admin.permission),
            ));
        }
        if let Some(redis) = &self.redis {
            if !cfg!(feature = "redis") {
                return Err(invalid(
                    "[redis]",
                    "is set but this build lacks the `redis` feature",
                ));
            }
            if !(redis.url.starts_with("redis://") || redis.url.starts_with("rediss://")) {
                return Err(invalid(
                    "[redis] url",
                    "must start with redis:// or rediss://",
                ));
            }
            at_least_one("[redis] timeout_ms", redis.timeout_ms)?;
        }
        Ok(())
    }
}

/// `resource:action`, as `rbac` requires of permissions.
pub(crate) fn is_permission(permission: &str) -> bool {
    permission
        .split_once(':')
        .is_some_and(|(r, a)| !r.is_empty() && !a.is_empty() && !a.contains(':'))
}
