//! Authentication: bearer JWTs and API keys.
//!
//! * `Authorization: Bearer <jwt>`; the scheme is matched case-insensitively
//!   (RFC 9110 §11.1), so `bearer` and `BEARER` work too.
//! * `X-Api-Key: <key>`, when API keys are configured.
//! * Both at once, or either header twice, is refused (401
//!   `conflicting_credentials`): which one would win is a choice a client
//!   must not be able to steer, and an invalid token must never be masked by
//!   a valid key.
//!
//! Failed authentications (an invalid or forged token, an unknown API key,
//! conflicting credentials) are counted per client IP against
//! [`RateLimits::with_auth_failures`] (default 20 per minute). While an
//! address is over it, every request from it that carries a credential is
//! answered 429 `auth_failures_limited` with `Retry-After` *before* any
//! verification, so forged RS256/ES256 tokens cannot buy signature checks.
//! Requests without credentials are not counted (they cost nothing to
//! refuse) and still get 401 `missing_credentials`.
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http::header::{AUTHORIZATION, HeaderValue, WWW_AUTHENTICATE};
use http::{Request, Response, StatusCode};
use sha2::{Digest, Sha256};

use super::rate::set_headers;
use super::{
    AuditSink, BoxError, ClientIp, GatewayBody, Principal, PrincipalKind, RateLimits, boxed,
    error_response, with_request_context,
};
use crate::audit::{AuditEntry, Outcome};
use crate::jwt::{JwtError, JwtVerifier};
use crate::ratelimit::RateDecision;

/// API keys, stored as SHA-256 hashes, each with an id and roles.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    by_hash: HashMap<[u8; 32], (String, Vec<String>)>,
}

impl ApiKeys {
    /// An empty set.
    pub fn new() -> ApiKeys {
        ApiKeys::default()
    }

    /// Accepts `key` (the secret the client sends in `X-Api-Key`) as `id`
    /// with `roles`. Only its hash is kept.
    pub fn with_key(mut self, id: impl Into<String>, key: &str, roles: Vec<String>) -> Self {
        self.by_hash
            .insert(Sha256::digest(key.as_bytes()).into(), (id.into(), roles));
        self
    }

    fn find(&self, key: &str) -> Option<&(String, Vec<String>)> {
        use subtle::ConstantTimeEq;
        let presented = <[u8; 32]>::from(Sha256::digest(key.as_bytes()));
        // Every stored digest is compared in full, in constant time: how long
        // this takes says nothing about which bytes of which key matched.
        let mut found = None;
        for (digest, entry) in &self.by_hash {
            if bool::from(digest.ct_eq(&presented)) {
                found = Some(entry);
            }
        }
        found
    }
}

/// Verifies credentials and inserts a [`Principal`]; see the module docs.
#[derive(Clone)]
pub struct AuthLayer {
    verifier: Arc<JwtVerifier>,
    api_keys: Option<Arc<ApiKeys>>,
    audit: Arc<dyn AuditSink>,
    limits: Arc<RateLimits>,
}

impl std::fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthLayer").finish_non_exhaustive()
    }
}

impl AuthLayer {
    /// Bearer JWTs only, with the default failed-authentication limit (20
    /// per minute per client IP, in this process).
    pub fn new(verifier: Arc<JwtVerifier>, audit: Arc<dyn AuditSink>) -> AuthLayer {
        AuthLayer {
            verifier,
            api_keys: None,
            audit,
            limits: Arc::new(RateLimits::default()),
        }
    }

    /// Counts failed authentications against `limits`'
    /// [`RateLimits::with_auth_failures`] quota (shared in Redis when
    /// `limits` is), instead of a limiter of its own.
    pub fn with_limits(mut self, limits: Arc<RateLimits>) -> Self {
        self.limits = limits;
        self
    }

    /// Also accepts `X-Api-Key`.
    pub fn with_api_keys(mut self, keys: Arc<ApiKeys>) -> Self {
        self.api_keys = Some(keys);
        self
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`AuthLayer`].
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

enum Failure {
    Missing,
    Conflicting,
    BadApiKey,
    BadToken(JwtError),
}

impl Failure {
    /// Whether this failure counts against the per-IP failure limit: only
    /// presented credentials that did not verify do.
    fn counts(&self) -> bool {
        !matches!(self, Failure::Missing)
    }
}

/// The credential headers of a request, if it carries any.
fn has_credentials(headers: &HeaderMap) -> bool {
    headers.contains_key(AUTHORIZATION) || headers.contains_key("x-api-key")
}

/// The token of `Authorization: Bearer <token>`, the scheme matched
/// case-insensitively; `None` for another scheme or a malformed value.
fn bearer_token(value: &HeaderValue) -> Option<&str> {
    let value = value.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl AuthLayer {
    fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, Failure> {
        let authorization = headers.get_all(AUTHORIZATION);
        let api_key = headers.get_all("x-api-key");
        let count = |values: http::header::GetAll<'_, HeaderValue>| values.iter().count();
        let (authorizations, api_keys) = (count(authorization), count(api_key));
        if authorizations + api_keys > 1 {
            return Err(Failure::Conflicting);
        }
        if let Some(keys) = &self.api_keys
            && let Some(key) = headers.get("x-api-key")
        {
            let key = key.to_str().map_err(|_| Failure::BadApiKey)?;
            let (id, roles) = keys.find(key).ok_or(Failure::BadApiKey)?;
            return Ok(Principal {
                id: id.clone(),
                roles: roles.clone(),
                kind: PrincipalKind::ApiKey,
            });
        }
        let token = headers
            .get(AUTHORIZATION)
            .and_then(bearer_token)
            .ok_or(Failure::Missing)?;
        let claims = self
            .verifier
            .verify_shared(token)
            .map_err(Failure::BadToken)?;
        Ok(Principal {
            id: claims.subject.clone(),
            roles: claims.roles.clone(),
            kind: PrincipalKind::User,
        })
    }

    fn reject<B>(&self, request: &Request<B>, failure: &Failure) -> Response<GatewayBody> {
        let (code, message, challenge) = match failure {
            Failure::Missing => (
                "missing_credentials",
                "authentication required".to_owned(),
                "Bearer",
            ),
            Failure::Conflicting => (
                "conflicting_credentials",
                "send exactly one credential: one Authorization header or one X-Api-Key header"
                    .to_owned(),
                "Bearer error=\"invalid_request\"",
            ),
            Failure::BadApiKey => ("invalid_api_key", "invalid API key".to_owned(), "Bearer"),
            Failure::BadToken(e) => (
                "invalid_token",
                e.to_string(),
                "Bearer error=\"invalid_token\"",
            ),
        };
        let entry = AuditEntry::new("auth.authenticate", Outcome::Failure).reason(code);
        self.audit.record(with_request_context(entry, request));
        let mut response = error_response(StatusCode::UNAUTHORIZED, code, &message);
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        response
    }

    /// 429 for an address over its failed-authentication limit.
    fn limited<B>(&self, request: &Request<B>, decision: &RateDecision) -> Response<GatewayBody> {
        let entry =
            AuditEntry::new("auth.authenticate", Outcome::Denied).reason("auth_failures_limited");
        self.audit.record(with_request_context(entry, request));
        let mut response = error_response(
            StatusCode::TOO_MANY_REQUESTS,
            "auth_failures_limited",
            "too many failed authentications from this address; retry later",
        );
        set_headers(
            &mut response,
            "auth_failures",
            self.limits.auth_failure_quota(),
            decision,
        );
        response
    }
}

impl<S, B, ResBody> tower::Service<Request<B>> for AuthService<S>
where
    S: tower::Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<GatewayBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let layer = self.layer.clone();
        // The ready inner service serves this request; a clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let ip = request.extensions().get::<ClientIp>().copied();
            // Refuse an address over its failure limit before any
            // verification: that is what makes the limit cap signature work.
            if has_credentials(request.headers())
                && let Some(decision) = layer.limits.auth_failures_exceeded(ip).await
            {
                return Ok(layer.limited(&request, &decision));
            }
            match layer.authenticate(request.headers()) {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                    inner.call(request).await.map(boxed)
                }
                Err(failure) => {
                    if failure.counts() {
                        let decision = layer.limits.record_auth_failure(ip).await;
                        if !decision.allowed {
                            return Ok(layer.limited(&request, &decision));
                        }
                    }
                    Ok(layer.reject(&request, &failure))
                }
            }
        })
    }
}
