//! # jwt_kit: JWT verification for the ferrokeel suite
//!
//! Keys pinned to algorithms, selected by `kid`, and strict claim checks:
//! the one JWT implementation that gateway-mw, notify-hub and order-saga
//! share.
//!
//! Signatures are checked by [`jsonwebtoken`]; everything around them is
//! decided here, before and after, so each rule is explicit and testable:
//!
//! 1. Tokens over [`JwtConfig::max_token_bytes`] (8 KiB) are rejected unread.
//! 2. The header is parsed by us. `alg: none` (any case) and algorithms other
//!    than HS256, RS256, ES256 and EdDSA are rejected. Headers that try to
//!    choose or carry the key (`jku`, `x5u`, `jwk`, `x5c`) or demand
//!    extensions (`crit`) are rejected: keys come only from configuration.
//! 3. The key is selected by `kid` (or the configured default key when the
//!    token has none) and the header's `alg` must equal the algorithm the key
//!    is pinned to. This is what stops algorithm confusion: an HS256 token
//!    cannot be checked against an RSA key's bytes.
//! 4. Claims are checked against the caller's clock: `exp` is always
//!    required and must be a number; `nbf` and `iat` are checked when
//!    present; `iss` and `aud` are required whenever they are configured, and
//!    a wrong type is a rejection, never a skip. `sub` must be a non-empty
//!    string.
//!
//! ```
//! use jwt_kit::{JwtConfig, JwtVerifier, KeySet, VerifyingKey};
//!
//! let keys = KeySet::new().with_key(VerifyingKey::hs256("k1", b"a-32-byte-or-longer-shared-secret!")).unwrap();
//! let verifier = JwtVerifier::new(keys, JwtConfig::default().with_issuer("https://issuer.test"));
//! assert!(verifier.verify("not.a.jwt").is_err());
//! ```

#![forbid(unsafe_code)]

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

/// Why a token was rejected. Messages are safe to log: they never contain
/// the token or a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// The token is larger than the configured maximum.
    #[error("token is {len} bytes; at most {max} are accepted")]
    TooLarge {
        /// The token's length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The token is not three base64url segments with a JSON header and payload.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// `alg: none`: unsigned tokens are never accepted.
    #[error("unsigned tokens (alg none) are not accepted")]
    AlgNone,
    /// The header names an algorithm this verifier does not support.
    #[error("unsupported algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    /// The header carries a field that would let the token choose its own key.
    #[error("header field {0:?} is not accepted: keys come only from configuration")]
    ForbiddenHeader(&'static str),
    /// The token has no `kid` and no default key is configured.
    #[error("token has no kid")]
    MissingKid,
    /// No configured key has the token's `kid`.
    #[error("unknown kid")]
    UnknownKid,
    /// The header's `alg` differs from the algorithm the key is pinned to.
    #[error("algorithm {token:?} does not match the key's pinned {pinned:?}")]
    AlgorithmMismatch {
        /// The header's algorithm.
        token: String,
        /// The key's algorithm.
        pinned: String,
    },
    /// The signature does not verify.
    #[error("invalid signature")]
    InvalidSignature,
    /// A required claim is absent.
    #[error("missing required claim {0:?}")]
    MissingClaim(&'static str),
    /// A claim has the wrong JSON type.
    #[error("claim {0:?} has the wrong type")]
    InvalidClaimType(&'static str),
    /// `exp` has passed (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// `iat` is in the future (beyond the leeway).
    #[error("token issued in the future")]
    IssuedInFuture,
    /// `iss` is not one of the configured issuers.
    #[error("untrusted issuer")]
    InvalidIssuer,
    /// `aud` does not contain a configured audience.
    #[error("token is not for this audience")]
    InvalidAudience,
}

/// Why a key or key set could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key material could not be parsed.
    #[error("key {kid:?}: {reason}")]
    Invalid {
        /// The key id.
        kid: String,
        /// What was wrong.
        reason: String,
    },
    /// Two keys share a `kid`.
    #[error("duplicate kid {0:?}")]
    DuplicateKid(String),
    /// An HMAC secret shorter than 32 bytes (RFC 7518 §3.2 requires at least
    /// the hash size).
    #[error("key {0:?}: HS256 secrets must be at least 32 bytes")]
    WeakSecret(String),
    /// The JWKS document is not valid JSON or lacks required fields.
    #[error("JWKS: {0}")]
    Jwks(String),
}

/// The algorithms a key can be pinned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlg {
    /// HMAC with SHA-256.
    Hs256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// ECDSA on P-256 with SHA-256.
    Es256,
    /// Ed25519.
    EdDsa,
}

impl KeyAlg {
    /// The JOSE name (`"HS256"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlg::Hs256 => "HS256",
            KeyAlg::Rs256 => "RS256",
            KeyAlg::Es256 => "ES256",
            KeyAlg::EdDsa => "EdDSA",
        }
    }

    fn from_header(alg: &str) -> Option<KeyAlg> {
        Some(match alg {
            "HS256" => KeyAlg::Hs256,
            "RS256" => KeyAlg::Rs256,
            "ES256" => KeyAlg::Es256,
            "EdDSA" => KeyAlg::EdDsa,
            _ => return None,
        })
    }

    fn algorithm(self) -> Algorithm {
        match self {
            KeyAlg::Hs256 => Algorithm::HS256,
            KeyAlg::Rs256 => Algorithm::RS256,
            KeyAlg::Es256 => Algorithm::ES256,
            KeyAlg::EdDsa => Algorithm::EdDSA,
        }
    }
}

/// A verification key pinned to one algorithm.
#[derive(Clone)]
pub struct VerifyingKey {
    kid: String,
    alg: KeyAlg,
    key: DecodingKey,
    weak_secret: bool,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl VerifyingKey {
    /// An HS256 shared secret (at least 32 bytes, checked when added to a set).
    pub fn hs256(kid: impl Into<String>, secret: &[u8]) -> VerifyingKey {
        VerifyingKey {
            kid: kid.into(),
            alg: KeyAlg::Hs256,
            key: DecodingKey::from_secret(secret),
            weak_secret: secret.len() < 32,
        }
    }

    /// An RS256 public key in PEM.
    pub fn rs256_pem(kid: impl Into<String>, pem: &[u8]) -> Result<VerifyingKey, KeyError> {
        Self::pem(kid.into(), KeyAlg::Rs256, DecodingKey::from_rsa_pem(pem))
    }

    /// An ES256 (P-256) public key in PEM.
    pub fn es256_pem(kid: impl Into<String>, pem: &[u8]) -> Result<VerifyingKey, KeyError> {
        Self::pem(kid.into(), KeyAlg::Es256, DecodingKey::from_ec_pem(pem))
    }

    /// An Ed25519 public key in PEM.
    pub fn eddsa_pem(kid: impl Into<String>, pem: &[u8]) -> Result<VerifyingKey, KeyError> {
        Self::pem(kid.into(), KeyAlg::EdDsa, DecodingKey::from_ed_pem(pem))
    }

    fn pem(
        kid: String,
        alg: KeyAlg,
        key: jsonwebtoken::errors::Result<DecodingKey>,
    ) -> Result<VerifyingKey, KeyError> {
        match key {
            Ok(key) => Ok(VerifyingKey {
                kid,
                alg,
                key,
                weak_secret: false,
            }),
            Err(e) => Err(KeyError::Invalid {
                kid,
                reason: e.to_string(),
            }),
        }
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The algorithm this key is pinned to.
    pub fn alg(&self) -> KeyAlg {
        self.alg
    }
}

/// The configured verification keys, by `kid`.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, VerifyingKey>,
    default_kid: Option<String>,
}

impl KeySet {
    /// An empty set.
    pub fn new() -> KeySet {
        KeySet::default()
    }

    /// Adds a key; fails on a duplicate `kid` or a weak HMAC secret.
    pub fn with_key(mut self, key: VerifyingKey) -> Result<KeySet, KeyError> {
        if key.weak_secret {
            return Err(KeyError::WeakSecret(key.kid));
        }
        if self.keys.contains_key(&key.kid) {
            return Err(KeyError::DuplicateKid(key.kid));
        }
        self.keys.insert(key.kid.clone(), key);
        Ok(self)
    }

    /// Uses the key `kid` for tokens whose header has no `kid`.
    pub fn with_default_kid(mut self, kid: impl Into<String>) -> KeySet {
        self.default_kid = Some(kid.into());
        self
    }

    /// Loads every key of a JWKS document. Each key must have a `kid` and an
    /// `alg` (which pins it) of HS256, RS256, ES256 or EdDSA, matching its type.
    pub fn from_jwks(json: &str) -> Result<KeySet, KeyError> {
        let set: JwkSet = serde_json::from_str(json).map_err(|e| KeyError::Jwks(e.to_string()))?;
        let mut keys = KeySet::new();
        for jwk in &set.keys {
            let kid = jwk
                .common
                .key_id
                .clone()
                .ok_or_else(|| KeyError::Jwks("a key has no kid".into()))?;
            let alg = match (jwk.common.key_algorithm, &jwk.algorithm) {
                (Some(KeyAlgorithm::HS256), AlgorithmParameters::OctetKey(_)) => KeyAlg::Hs256,
                (Some(KeyAlgorithm::RS256), AlgorithmParameters::RSA(_)) => KeyAlg::Rs256,
                (Some(KeyAlgorithm::ES256), AlgorithmParameters::EllipticCurve(_)) => KeyAlg::Es256,
                (Some(KeyAlgorithm::EdDSA), AlgorithmParameters::OctetKeyPair(_)) => KeyAlg::EdDsa,
                (None, _) => return Err(KeyError::Jwks(format!("key {kid:?} has no alg to pin"))),
                (Some(other), _) => {
                    return Err(KeyError::Jwks(format!(
                        "key {kid:?}: alg {other:?} is unsupported or does not match its type"
                    )));
                }
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| KeyError::Invalid {
                kid: kid.clone(),
                reason: e.to_string(),
            })?;
            let weak_secret = matches!(&jwk.algorithm, AlgorithmParameters::OctetKey(p)
                if URL_SAFE_NO_PAD.decode(p.value.trim_end_matches('=')).map_or(true, |s| s.len() < 32));
            keys = keys.with_key(VerifyingKey {
                kid,
                alg,
                key,
                weak_secret,
            })?;
        }
        Ok(keys)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Claim and size rules.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct JwtConfig {
    /// Accepted issuers; when non-empty, `iss` is required and must match one.
    pub issuers: Vec<String>,
    /// Accepted audiences; when non-empty, `aud` is required and must contain one.
    pub audiences: Vec<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds. Default 30.
    pub leeway_secs: u64,
    /// Largest token accepted, in bytes. Default 8,192.
    pub max_token_bytes: usize,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            issuers: Vec::new(),
            audiences: Vec::new(),
            leeway_secs: 30,
            max_token_bytes: 8 * 1024,
        }
    }
}

impl JwtConfig {
    /// Requires `iss` to be `issuer` (call again to accept several).
    pub fn with_issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuers.push(issuer.into());
        self
    }

    /// Requires `aud` to contain `audience` (call again to accept several).
    pub fn with_audience(mut self, audience: impl Into<String>) -> Self {
        self.audiences.push(audience.into());
        self
    }

    /// Sets [`JwtConfig::leeway_secs`].
    pub fn with_leeway_secs(mut self, secs: u64) -> Self {
        self.leeway_secs = secs;
        self
    }

    /// Sets [`JwtConfig::max_token_bytes`].
    pub fn with_max_token_bytes(mut self, max: usize) -> Self {
        self.max_token_bytes = max;
        self
    }
}

/// The claims of a verified token.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    /// `sub`: who the token is for.
    pub subject: String,
    /// `iss`, when present.
    pub issuer: Option<String>,
    /// `exp`, Unix seconds.
    pub expires_at: i64,
    /// `roles` (an array of strings), empty when absent.
    pub roles: Vec<String>,
    /// The `kid` of the key that verified the token.
    pub kid: String,
    /// Every claim, as sent.
    pub all: Map<String, Value>,
}

/// Verifies JWTs against a [`KeySet`] and a [`JwtConfig`].
#[derive(Debug, Clone)]
pub struct JwtVerifier {
    keys: KeySet,
    config: JwtConfig,
    cache: Option<std::sync::Arc<VerifiedCache>>,
    clock: time_kit::SharedClock,
}

/// Tokens already verified, by the SHA-256 of the whole token: a hit skips
/// the signature check (0.2–0.4 ms for RS256/ES256) but never the time checks.
///
/// The entries are kept per thread ([`VERIFIED`]), up to `capacity` on each:
/// a hit takes no lock, and the claims it shares were made on the same
/// thread, so neither a mutex nor a reference count bounces between cores
/// on every request (a gateway serving one runtime per core). A token is
/// verified once on each thread that sees it.
#[derive(Debug)]
struct VerifiedCache {
    capacity: usize,
    hasher: DigestHash,
}

/// Each thread's verified tokens, per live [`VerifiedCache`].
type ThreadCaches = Vec<(
    std::sync::Weak<VerifiedCache>,
    HashMap<[u8; 32], CachedToken, DigestHash>,
)>;

thread_local! {
    static VERIFIED: std::cell::RefCell<ThreadCaches> = const { std::cell::RefCell::new(Vec::new()) };
}

impl VerifiedCache {
    /// Runs `f` on this thread's entries of `cache`, dropping the entries
    /// of caches that no longer exist on the way; `None` while the thread
    /// is tearing down its locals.
    fn with_entries<R>(
        cache: &std::sync::Arc<VerifiedCache>,
        f: impl FnOnce(&mut HashMap<[u8; 32], CachedToken, DigestHash>) -> R,
    ) -> Option<R> {
        VERIFIED
            .try_with(|all| {
                let mut all = all.try_borrow_mut().ok()?;
                // Only live caches stay, so an address seen here is this
                // cache's, not a dropped one's reused.
                all.retain(|(owner, _)| owner.strong_count() > 0);
                let at = match all
                    .iter()
                    .position(|(owner, _)| owner.as_ptr() == std::sync::Arc::as_ptr(cache))
                {
                    Some(at) => at,
                    None => {
                        all.push((
                            std::sync::Arc::downgrade(cache),
                            HashMap::with_hasher(cache.hasher.clone()),
                        ));
                        all.len() - 1
                    }
                };
                Some(f(&mut all[at].1))
            })
            .ok()
            .flatten()
    }
}

/// Hashes the cache's keys, which are SHA-256 digests and so already
/// uniform: eight of their bytes, mixed with a random seed of the cache's,
/// instead of SipHash over all 32 on every request. Only verified tokens
/// are stored, and the seed hides where a digest lands, so a client cannot
/// aim tokens at one bucket.
#[derive(Debug, Clone)]
struct DigestHash {
    seed: u64,
}

impl DigestHash {
    fn new() -> DigestHash {
        use std::hash::BuildHasher;
        // std's RandomState is seeded from the OS: a random u64 without a
        // dependency for it.
        DigestHash {
            seed: std::collections::hash_map::RandomState::new().hash_one(0u64),
        }
    }
}

impl std::hash::BuildHasher for DigestHash {
    type Hasher = DigestHasher;

    fn build_hasher(&self) -> DigestHasher {
        DigestHasher(self.seed)
    }
}

/// See [`DigestHash`].
#[derive(Debug)]
struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as its length, then its bytes in one write.
        if let Some(word) = bytes.first_chunk::<8>() {
            self.0 ^= u64::from_le_bytes(*word);
        }
    }

    fn write_usize(&mut self, _length: usize) {}

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A verified token's claims and its `nbf`, if any. Shared, so a hit costs
/// a reference count rather than a copy of every claim.
type CachedToken = (std::sync::Arc<Claims>, Option<i64>);

impl VerifiedCache {
    fn key(token: &str) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(token.as_bytes()).into()
    }
}

impl JwtVerifier {
    /// A verifier over `keys` with `config`'s claim rules.
    pub fn new(keys: KeySet, config: JwtConfig) -> JwtVerifier {
        JwtVerifier {
            keys,
            config,
            cache: None,
            clock: time_kit::system(),
        }
    }

    /// Reads "now" from `clock` in [`JwtVerifier::verify`] (the system
    /// clock by default), so tests of expiry move a
    /// [`ManualClock`](time_kit::ManualClock) instead of sleeping.
    pub fn with_clock(mut self, clock: time_kit::SharedClock) -> JwtVerifier {
        self.clock = clock;
        self
    }

    /// The clock [`JwtVerifier::verify`] reads.
    pub fn clock(&self) -> &time_kit::SharedClock {
        &self.clock
    }

    /// Remembers up to `capacity` verified tokens (keyed by their SHA-256)
    /// on each thread that verifies, so a token seen again skips the
    /// signature check; `exp` and `nbf` are still checked on every use.
    /// Worth it for RS256/ES256, whose signatures cost hundreds of
    /// microseconds. Per thread, so a hit takes no lock: memory is up to
    /// `capacity` entries times the threads that verify, and a token is
    /// verified once on each of them. Clones of the verifier share its
    /// cache; the entries go when the last clone is dropped (on each
    /// thread, at its next verification).
    pub fn with_cache(mut self, capacity: usize) -> JwtVerifier {
        self.cache = Some(std::sync::Arc::new(VerifiedCache {
            capacity: capacity.max(1),
            hasher: DigestHash::new(),
        }));
        self
    }

    /// Verifies `token` as of the verifier's clock.
    pub fn verify(&self, token: &str) -> Result<Claims, JwtError> {
        self.verify_at(token, self.clock.unix_secs())
    }

    /// Verifies `token` as of `now` (Unix seconds).
    pub fn verify_at(&self, token: &str, now: i64) -> Result<Claims, JwtError> {
        self.verify_shared_at(token, now)
            .map(std::sync::Arc::unwrap_or_clone)
    }

    /// Like [`JwtVerifier::verify`], but the claims come shared: with a
    /// cache ([`JwtVerifier::with_cache`]), a token seen again costs a
    /// reference count instead of a copy of every claim. For callers that
    /// read a few claims per request (a gateway's authentication layer).
    pub fn verify_shared(&self, token: &str) -> Result<std::sync::Arc<Claims>, JwtError> {
        self.verify_shared_at(token, self.clock.unix_secs())
    }

    /// [`JwtVerifier::verify_shared`] as of `now` (Unix seconds).
    pub fn verify_shared_at(
        &self,
        token: &str,
        now: i64,
    ) -> Result<std::sync::Arc<Claims>, JwtError> {
        let Some(cache) = &self.cache else {
            return self.verify_uncached(token, now).map(std::sync::Arc::new);
        };
        if token.len() > self.config.max_token_bytes {
            return self.verify_uncached(token, now).map(std::sync::Arc::new);
        }
        let key = VerifiedCache::key(token);
        let leeway = self.config.leeway_secs as i64;
        let hit = VerifiedCache::with_entries(cache, |entries| {
            let (claims, nbf) = entries.get(&key)?;
            if now > claims.expires_at.saturating_add(leeway) {
                entries.remove(&key);
                return Some(Err(JwtError::Expired));
            }
            if nbf.is_some_and(|nbf| now.saturating_add(leeway) < nbf) {
                return Some(Err(JwtError::NotYetValid));
            }
            Some(Ok(std::sync::Arc::clone(claims)))
        })
        .flatten();
        if let Some(hit) = hit {
            return hit;
        }
        let claims = std::sync::Arc::new(self.verify_uncached(token, now)?);
        let nbf = claims
            .all
            .get("nbf")
            .and_then(Value::as_f64)
            .map(|f| f.floor() as i64);
        VerifiedCache::with_entries(cache, |entries| {
            if entries.len() >= cache.capacity {
                entries.retain(|_, (c, _)| now <= c.expires_at.saturating_add(leeway));
                if entries.len() >= cache.capacity {
                    entries.clear();
                }
            }
            entries.insert(key, (std::sync::Arc::clone(&claims), nbf));
        });
        Ok(claims)
    }

    fn verify_uncached(&self, token: &str, now: i64) -> Result<Claims, JwtError> {
        if token.len() > self.config.max_token_bytes {
            return Err(JwtError::TooLarge {
                len: token.len(),
                max: self.config.max_token_bytes,
            });
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed(
                "a JWT has exactly three dot-separated segments",
            ));
        };
        let header = decode_header(header_b64)?;
        let key = self.select_key(&header)?;

        let mut validation = Validation::new(key.alg.algorithm());
        // Claims are checked below against the caller's clock, with typed errors.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let data =
            jsonwebtoken::decode::<Value>(token, &key.key, &validation).map_err(|e| {
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::InvalidSignature => JwtError::InvalidSignature,
                    jsonwebtoken::errors::ErrorKind::Json(_)
                    | jsonwebtoken::errors::ErrorKind::Utf8(_) => {
                        JwtError::Malformed("the payload is not a JSON object")
                    }
                    jsonwebtoken::errors::ErrorKind::Base64(_) => {
                        JwtError::Malformed("a segment is not base64url")
                    }
                    _ => JwtError::InvalidSignature,
                }
            })?;
        let Value::Object(claims) = data.claims else {
            return Err(JwtError::Malformed("the payload is not a JSON object"));
        };
        self.check_claims(claims, now, key.kid.clone())
    }

    fn select_key(&self, header: &Map<String, Value>) -> Result<&VerifyingKey, JwtError> {
        let alg = match header.get("alg") {
            Some(Value::String(alg)) => alg.as_str(),
            Some(_) => return Err(JwtError::Malformed("alg is not a string")),
            None => return Err(JwtError::Malformed("the header has no alg")),
        };
        if alg.eq_ignore_ascii_case("none") {
            return Err(JwtError::AlgNone);
        }
        let Some(token_alg) = KeyAlg::from_header(alg) else {
            return Err(JwtError::UnsupportedAlgorithm(
                alg.chars().take(32).collect(),
            ));
        };
        for forbidden in ["jku", "x5u", "jwk", "x5c", "crit"] {
            if header.contains_key(forbidden) {
                return Err(JwtError::ForbiddenHeader(forbidden));
            }
        }
        let kid = match header.get("kid") {
            Some(Value::String(kid)) => kid.as_str(),
            Some(_) => return Err(JwtError::Malformed("kid is not a string")),
            None => self
                .keys
                .default_kid
                .as_deref()
                .ok_or(JwtError::MissingKid)?,
        };
        let key = self.keys.keys.get(kid).ok_or(JwtError::UnknownKid)?;
        if key.alg != token_alg {
            return Err(JwtError::AlgorithmMismatch {
                token: token_alg.as_str().to_owned(),
                pinned: key.alg.as_str().to_owned(),
            });
        }
        Ok(key)
    }

    fn check_claims(
        &self,
        claims: Map<String, Value>,
        now: i64,
        kid: String,
    ) -> Result<Claims, JwtError> {
        let leeway = self.config.leeway_secs as i64;
        let expires_at = numeric_date(&claims, "exp")?.ok_or(JwtError::MissingClaim("exp"))?;
        if now > expires_at.saturating_add(leeway) {
            return Err(JwtError::Expired);
        }
        if let Some(nbf) = numeric_date(&claims, "nbf")?
            && now.saturating_add(leeway) < nbf
        {
            return Err(JwtError::NotYetValid);
        }
        if let Some(iat) = numeric_date(&claims, "iat")?
            && iat > now.saturating_add(leeway)
        {
            return Err(JwtError::IssuedInFuture);
        }
        let issuer = match claims.get("iss") {
            None => None,
            Some(Value::String(iss)) => Some(iss.clone()),
            Some(_) => return Err(JwtError::InvalidClaimType("iss")),
        };
        if !self.config.issuers.is_empty() {
            let iss = issuer.as_deref().ok_or(JwtError::MissingClaim("iss"))?;
            if !self.config.issuers.iter().any(|i| i == iss) {
                return Err(JwtError::InvalidIssuer);
            }
        }
        if !self.config.audiences.is_empty() {
            let matches = |a: &str| self.config.audiences.iter().any(|c| c == a);
            match claims.get("aud") {
                None => return Err(JwtError::MissingClaim("aud")),
                Some(Value::String(aud)) if matches(aud) => {}
                Some(Value::String(_)) => return Err(JwtError::InvalidAudience),
                Some(Value::Array(list)) => {
                    if !list.iter().all(Value::is_string) {
                        return Err(JwtError::InvalidClaimType("aud"));
                    }
                    if !list.iter().filter_map(Value::as_str).any(matches) {
                        return Err(JwtError::InvalidAudience);
                    }
                }
                Some(_) => return Err(JwtError::InvalidClaimType("aud")),
            }
        }
        let subject = match claims.get("sub") {
            Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
            Some(Value::String(_)) | None => return Err(JwtError::MissingClaim("sub")),
            Some(_) => return Err(JwtError::InvalidClaimType("sub")),
        };
        let roles = match claims.get("roles") {
            None => Vec::new(),
            Some(Value::Array(list)) if list.iter().all(Value::is_string) => list
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            Some(_) => return Err(JwtError::InvalidClaimType("roles")),
        };
        Ok(Claims {
            subject,
            issuer,
            expires_at,
            roles,
            kid,
            all: claims,
        })
    }
}

fn decode_header(segment: &str) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| JwtError::Malformed("the header is not base64url"))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(JwtError::Malformed("the header is not a JSON object")),
    }
}

/// A NumericDate claim as whole seconds; `None` when absent.
fn numeric_date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite())
                .map(|f| f.floor() as i64)
        }) {
            Some(secs) => Ok(Some(secs)),
            None => Err(JwtError::InvalidClaimType(name)),
        },
        Some(_) => Err(JwtError::InvalidClaimType(name)),
    }
}
