//! Access and refresh tokens with rotation and reuse detection.
//!
//! [`TokenService::issue`] mints a short-lived JWT access token and an opaque
//! refresh token that starts a *family*. [`TokenService::refresh`] rotates:
//! the presented refresh token is spent and a new pair is returned, in the
//! same family. Presenting a spent token again means it leaked (or a client
//! is confused): the whole family is revoked. The one exception is the
//! immediate predecessor of a still-unused token, presented again within the
//! grace window (default 10 s), once: two concurrent refreshes from the same
//! client then both succeed. Families also end at an absolute lifetime, and a
//! refresh token at its idle lifetime.
//!
//! Refresh tokens are 256 random bits, stored only as their SHA-256: a copy
//! of the store cannot be replayed. Storage sits behind [`RefreshStore`], with
//! [`MemoryStore`] and (feature `redis`) `RedisStore`, whose rotation is one
//! atomic Lua script. Both run the same test suite.
//!
//! See `docs/adr/0007-gateway-refresh-token-rotation.md` for the design.

mod memory;
#[cfg(feature = "redis")]
mod redis;

pub use memory::MemoryStore;
#[cfg(feature = "redis")]
pub use redis::RedisStore;

use std::future::Future;
use std::time::Duration;

use time_kit::SharedClock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use sha2::{Digest, Sha256};

/// Lifetimes and the grace window, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationPolicy {
    /// A family ends this long after it was issued, whatever happens.
    pub absolute_ms: i64,
    /// A refresh token ends this long after it was issued if unused.
    pub idle_ms: i64,
    /// How long a just-spent token may be presented again (once).
    pub grace_ms: i64,
}

/// What the store decided about a presented refresh token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    /// Spent and replaced by the successor.
    Rotated {
        /// The family's subject.
        subject: String,
        /// The family's roles.
        roles: Vec<String>,
        /// Whether this was a grace-window second use.
        in_grace: bool,
    },
    /// No such token.
    Invalid,
    /// The token or its family is past its lifetime.
    Expired,
    /// The family was revoked (logout or earlier reuse).
    Revoked,
    /// A spent token was presented again: the family is now revoked.
    ReuseDetected {
        /// The family's subject, for the audit log.
        subject: String,
    },
}

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Redis failed (connection, timeout, script error).
    #[cfg(feature = "redis")]
    #[error("refresh-token store: redis: {0}")]
    Redis(#[source] fred::error::Error),
    /// The store answered something the client does not understand.
    #[error("refresh-token store: unexpected reply: {0}")]
    UnexpectedReply(String),
    /// A value could not be encoded or decoded.
    #[error("refresh-token store: encoding: {0}")]
    Encoding(#[source] serde_json::Error),
    /// Any other store's failure (for [`RefreshStore`] implementations
    /// outside this crate).
    #[error("refresh-token store: {0}")]
    Other(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Storage of refresh-token families. Implementations must make `rotate`
/// atomic: two concurrent calls with the same presented token must not both
/// see it active.
pub trait RefreshStore: Send + Sync {
    /// Starts a family whose first token has hash `token_hash`.
    fn create(
        &self,
        token_hash: &str,
        family: &str,
        subject: &str,
        roles: &[String],
        now_ms: i64,
        policy: &RotationPolicy,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Spends `presented_hash` and stores `successor_hash` in its family, if
    /// the rules allow; see [`Rotation`].
    fn rotate(
        &self,
        presented_hash: &str,
        successor_hash: &str,
        now_ms: i64,
        policy: &RotationPolicy,
    ) -> impl Future<Output = Result<Rotation, StoreError>> + Send;

    /// Revokes the family of `presented_hash`; `false` if there is no such token.
    fn revoke(&self, presented_hash: &str)
    -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Revokes every family (session) of `subject`; returns how many were
    /// still active.
    fn revoke_subject(
        &self,
        subject: &str,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;
}

/// Why issuing or refreshing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The refresh token is unknown.
    #[error("invalid refresh token")]
    Invalid,
    /// The refresh token or its family is past its lifetime.
    #[error("refresh token expired")]
    Expired,
    /// The family was revoked.
    #[error("refresh token revoked")]
    Revoked,
    /// A spent refresh token was reused; its family has been revoked.
    #[error("refresh token reuse detected; the session has been revoked")]
    ReuseDetected {
        /// Whose family was revoked.
        subject: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The operating system's random number generator failed.
    #[error("random number generator unavailable: {0}")]
    Random(#[source] getrandom::Error),
    /// The signing key could not be loaded, or signing failed.
    #[error("access-token signing: {0}")]
    Signing(#[source] jsonwebtoken::errors::Error),
    /// An asymmetric constructor was given `HS256`, which takes a secret
    /// ([`TokenConfig::hs256`]).
    #[error("HS256 signs with a secret: use TokenConfig::hs256")]
    NotAsymmetric,
}

/// What kind of failure a [`TokenError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenErrorKind {
    /// [`TokenError::Invalid`].
    Invalid,
    /// [`TokenError::Expired`].
    Expired,
    /// [`TokenError::Revoked`].
    Revoked,
    /// [`TokenError::ReuseDetected`].
    ReuseDetected,
    /// [`TokenError::Store`].
    Store,
    /// [`TokenError::Random`].
    Random,
    /// [`TokenError::Signing`] or [`TokenError::NotAsymmetric`].
    Signing,
}

impl TokenError {
    /// What kind of failure this is.
    pub fn kind(&self) -> TokenErrorKind {
        match self {
            TokenError::Invalid => TokenErrorKind::Invalid,
            TokenError::Expired => TokenErrorKind::Expired,
            TokenError::Revoked => TokenErrorKind::Revoked,
            TokenError::ReuseDetected { .. } => TokenErrorKind::ReuseDetected,
            TokenError::Store(_) => TokenErrorKind::Store,
            TokenError::Random(_) => TokenErrorKind::Random,
            TokenError::Signing(_) | TokenError::NotAsymmetric => TokenErrorKind::Signing,
        }
    }
}

/// The signing key of an asymmetric algorithm, from its private PEM.
fn asymmetric_key(
    alg: crate::jwt::KeyAlg,
    private_pem: &[u8],
) -> Result<(Algorithm, EncodingKey), TokenError> {
    let signing = TokenError::Signing;
    Ok(match alg {
        crate::jwt::KeyAlg::Rs256 => (
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(private_pem).map_err(signing)?,
        ),
        crate::jwt::KeyAlg::Es256 => (
            Algorithm::ES256,
            EncodingKey::from_ec_pem(private_pem).map_err(signing)?,
        ),
        crate::jwt::KeyAlg::EdDsa => (
            Algorithm::EdDSA,
            EncodingKey::from_ed_pem(private_pem).map_err(signing)?,
        ),
        crate::jwt::KeyAlg::Hs256 => return Err(TokenError::NotAsymmetric),
    })
}

/// Token lifetimes and the signing key.
#[derive(Clone)]
#[non_exhaustive]
pub struct TokenConfig {
    /// `iss` of access tokens.
    pub issuer: String,
    /// `aud` of access tokens.
    pub audience: String,
    /// Access-token lifetime. Default 10 minutes.
    pub access_ttl: Duration,
    /// Refresh-token idle lifetime. Default 7 days.
    pub refresh_idle_ttl: Duration,
    /// Family absolute lifetime. Default 30 days.
    pub refresh_absolute_ttl: Duration,
    /// Grace window for the immediate predecessor. Default 10 s.
    pub reuse_grace: Duration,
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("access_ttl", &self.access_ttl)
            .field("refresh_idle_ttl", &self.refresh_idle_ttl)
            .field("refresh_absolute_ttl", &self.refresh_absolute_ttl)
            .field("reuse_grace", &self.reuse_grace)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl TokenConfig {
    /// Access tokens signed HS256 with `secret` under `kid`.
    pub fn hs256(
        issuer: impl Into<String>,
        audience: impl Into<String>,
        kid: impl Into<String>,
        secret: &[u8],
    ) -> TokenConfig {
        TokenConfig {
            issuer: issuer.into(),
            audience: audience.into(),
            access_ttl: Duration::from_secs(600),
            refresh_idle_ttl: Duration::from_secs(7 * 24 * 3600),
            refresh_absolute_ttl: Duration::from_secs(30 * 24 * 3600),
            reuse_grace: Duration::from_secs(10),
            kid: kid.into(),
            alg: Algorithm::HS256,
            key: EncodingKey::from_secret(secret),
        }
    }

    /// Access tokens signed with an asymmetric private key (PEM) under
    /// `kid`, so verifiers need only the public key: `RS256` (RSA), `ES256`
    /// (P-256) or `EdDSA` (Ed25519).
    pub fn from_private_pem(
        issuer: impl Into<String>,
        audience: impl Into<String>,
        kid: impl Into<String>,
        alg: crate::jwt::KeyAlg,
        private_pem: &[u8],
    ) -> Result<TokenConfig, TokenError> {
        let (alg, key) = asymmetric_key(alg, private_pem)?;
        let mut config = TokenConfig::hs256(issuer, audience, kid, &[]);
        config.alg = alg;
        config.key = key;
        Ok(config)
    }

    /// Switches an existing configuration to an asymmetric private key (PEM);
    /// see [`TokenConfig::from_private_pem`].
    pub fn with_signing_key_pem(
        mut self,
        kid: impl Into<String>,
        alg: crate::jwt::KeyAlg,
        private_pem: &[u8],
    ) -> Result<Self, TokenError> {
        let (alg, key) = asymmetric_key(alg, private_pem)?;
        self.kid = kid.into();
        self.alg = alg;
        self.key = key;
        Ok(self)
    }

    /// Sets [`TokenConfig::access_ttl`].
    pub fn with_access_ttl(mut self, ttl: Duration) -> Self {
        self.access_ttl = ttl;
        self
    }

    /// Sets [`TokenConfig::reuse_grace`].
    pub fn with_reuse_grace(mut self, grace: Duration) -> Self {
        self.reuse_grace = grace;
        self
    }

    /// Sets the idle and absolute refresh lifetimes.
    pub fn with_refresh_lifetimes(mut self, idle: Duration, absolute: Duration) -> Self {
        self.refresh_idle_ttl = idle;
        self.refresh_absolute_ttl = absolute;
        self
    }

    fn policy(&self) -> RotationPolicy {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        RotationPolicy {
            absolute_ms: ms(self.refresh_absolute_ttl),
            idle_ms: ms(self.refresh_idle_ttl),
            grace_ms: ms(self.reuse_grace),
        }
    }
}

/// An access token and a refresh token.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenPair {
    /// The JWT access token.
    pub access_token: String,
    /// The opaque refresh token (shown once; only its hash is stored).
    pub refresh_token: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
}

impl std::fmt::Debug for TokenPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tokens are secrets: never in logs.
        f.debug_struct("TokenPair")
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// Issues and rotates tokens over a [`RefreshStore`].
pub struct TokenService<S> {
    store: S,
    config: TokenConfig,
    clock: SharedClock,
}

impl<S> std::fmt::Debug for TokenService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S: RefreshStore> TokenService<S> {
    /// A service over `store`, on the system clock.
    pub fn new(store: S, config: TokenConfig) -> TokenService<S> {
        TokenService {
            store,
            config,
            clock: time_kit::system(),
        }
    }

    /// Reads time from `clock` (the suite's [`time_kit::Clock`]; tests pass
    /// a [`time_kit::ManualClock`]) instead of the system clock: token
    /// `iat`/`exp`, refresh lifetimes and the grace window all follow it.
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Starts a session for `subject`: a new family and its first pair.
    pub async fn issue(&self, subject: &str, roles: &[String]) -> Result<TokenPair, TokenError> {
        let now = self.clock.unix_millis();
        let refresh = random_token()?;
        let family = random_token()?;
        self.store
            .create(
                &hash_token(&refresh),
                &family,
                subject,
                roles,
                now,
                &self.config.policy(),
            )
            .await?;
        self.pair(subject, roles, refresh, now)
    }

    /// Rotates `refresh_token`: spends it and returns a new pair.
    pub async fn refresh(&self, refresh_token: &str) -> Result<TokenPair, TokenError> {
        let now = self.clock.unix_millis();
        let successor = random_token()?;
        let outcome = self
            .store
            .rotate(
                &hash_token(refresh_token),
                &hash_token(&successor),
                now,
                &self.config.policy(),
            )
            .await?;
        match outcome {
            Rotation::Rotated {
                subject,
                roles,
                in_grace,
            } => {
                if in_grace {
                    tracing::info!(%subject, "refresh within the grace window");
                }
                self.pair(&subject, &roles, successor, now)
            }
            Rotation::Invalid => Err(TokenError::Invalid),
            Rotation::Expired => Err(TokenError::Expired),
            Rotation::Revoked => Err(TokenError::Revoked),
            Rotation::ReuseDetected { subject } => {
                tracing::warn!(%subject, "refresh token reuse: family revoked");
                Err(TokenError::ReuseDetected { subject })
            }
        }
    }

    /// Ends the session of `refresh_token` (revokes its family).
    pub async fn logout(&self, refresh_token: &str) -> Result<(), TokenError> {
        if self.store.revoke(&hash_token(refresh_token)).await? {
            Ok(())
        } else {
            Err(TokenError::Invalid)
        }
    }

    /// Ends every session of `subject` (an administrator's action): all its
    /// refresh-token families are revoked, so no refresh succeeds; access
    /// tokens already issued stay valid until they expire (minutes).
    /// Returns how many sessions were active.
    pub async fn revoke_subject(&self, subject: &str) -> Result<usize, TokenError> {
        Ok(self.store.revoke_subject(subject).await?)
    }

    fn pair(
        &self,
        subject: &str,
        roles: &[String],
        refresh_token: String,
        now_ms: i64,
    ) -> Result<TokenPair, TokenError> {
        let now = now_ms / 1_000;
        let ttl = self.config.access_ttl.as_secs();
        let claims = serde_json::json!({
            "sub": subject,
            "iss": self.config.issuer,
            "aud": self.config.audience,
            "iat": now,
            "exp": now + ttl as i64,
            "jti": random_token()?,
            "roles": roles,
        });
        let mut header = Header::new(self.config.alg);
        header.kid = Some(self.config.kid.clone());
        let access_token = jsonwebtoken::encode(&header, &claims, &self.config.key)
            .map_err(TokenError::Signing)?;
        Ok(TokenPair {
            access_token,
            refresh_token,
            expires_in: ttl,
        })
    }
}

/// 256 random bits from the operating system, base64url.
fn random_token() -> Result<String, TokenError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(TokenError::Random)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// The stored form of a refresh token.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}
