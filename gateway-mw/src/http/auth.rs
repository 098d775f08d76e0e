//! Authentication: bearer JWTs and API keys.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{AUTHORIZATION, HeaderValue, WWW_AUTHENTICATE};
use http::{Request, Response, StatusCode};
use sha2::{Digest, Sha256};

use super::{
    AuditSink, BoxError, GatewayBody, Principal, PrincipalKind, boxed, error_response,
    with_request_context,
};
use crate::audit::{AuditEntry, Outcome};
use crate::jwt::{JwtError, JwtVerifier};

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
        self.by_hash
            .get(&<[u8; 32]>::from(Sha256::digest(key.as_bytes())))
    }
}

/// Verifies credentials and inserts a [`Principal`]; see the module docs.
#[derive(Clone)]
pub struct AuthLayer {
    verifier: Arc<JwtVerifier>,
    api_keys: Option<Arc<ApiKeys>>,
    audit: Arc<dyn AuditSink>,
}

impl std::fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthLayer").finish_non_exhaustive()
    }
}

impl AuthLayer {
    /// Bearer JWTs only.
    pub fn new(verifier: Arc<JwtVerifier>, audit: Arc<dyn AuditSink>) -> AuthLayer {
        AuthLayer {
            verifier,
            api_keys: None,
            audit,
        }
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
    BadApiKey,
    BadToken(JwtError),
}

impl AuthLayer {
    fn authenticate<B>(&self, request: &Request<B>) -> Result<Principal, Failure> {
        if let Some(keys) = &self.api_keys
            && let Some(key) = request.headers().get("x-api-key")
        {
            let key = key.to_str().map_err(|_| Failure::BadApiKey)?;
            let (id, roles) = keys.find(key).ok_or(Failure::BadApiKey)?;
            return Ok(Principal {
                id: id.clone(),
                roles: roles.clone(),
                kind: PrincipalKind::ApiKey,
            });
        }
        let header = request
            .headers()
            .get(AUTHORIZATION)
            .ok_or(Failure::Missing)?;
        let token = header
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or(Failure::Missing)?;
        let claims = self.verifier.verify(token).map_err(Failure::BadToken)?;
        Ok(Principal {
            id: claims.subject,
            roles: claims.roles,
            kind: PrincipalKind::User,
        })
    }

    fn reject<B>(&self, request: &Request<B>, failure: Failure) -> Response<GatewayBody> {
        let (code, message, challenge) = match &failure {
            Failure::Missing => (
                "missing_credentials",
                "authentication required".to_owned(),
                "Bearer",
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
}

impl<S, B, ResBody> tower::Service<Request<B>> for AuthService<S>
where
    S: tower::Service<Request<B>, Response = Response<ResBody>> + Send,
    S::Future: Send + 'static,
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
        match self.layer.authenticate(&request) {
            Ok(principal) => {
                request.extensions_mut().insert(principal);
                let future = self.inner.call(request);
                Box::pin(async move { future.await.map(boxed) })
            }
            Err(failure) => {
                let response = self.layer.reject(&request, failure);
                Box::pin(async move { Ok(response) })
            }
        }
    }
}
