//! Authorization: RBAC on the matched route.
//!
//! The path is first rewritten into its normal form
//! ([`crate::router::normalize_path`]), so the rule that decides is the rule
//! the upstream's spelling of the path selects, and the upstream receives
//! that normal form. A path with no safe normal form is refused (400
//! `invalid_path`) even when no `ValidationLayer` runs in front.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response, StatusCode};

use super::{
    AuditSink, BoxError, GatewayBody, MatchedRoute, Principal, Routed, boxed, error_response,
    with_request_context,
};
use crate::audit::{AuditEntry, Outcome};
use crate::rbac::{Decision, Policy};
use crate::router::PathOptions;

/// Checks the [`Principal`]'s roles against a [`Policy`]; see the module docs.
#[derive(Clone)]
pub struct AuthzLayer {
    policy: Arc<Policy>,
    audit: Arc<dyn AuditSink>,
    path_options: PathOptions,
}

impl std::fmt::Debug for AuthzLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthzLayer")
            .field("rules", &self.policy.rule_count())
            .finish_non_exhaustive()
    }
}

impl AuthzLayer {
    /// Enforces `policy`.
    pub fn new(policy: Arc<Policy>, audit: Arc<dyn AuditSink>) -> AuthzLayer {
        AuthzLayer {
            policy,
            audit,
            path_options: PathOptions::default(),
        }
    }

    /// Accepts `;` in path segments (refused by default; see
    /// [`PathOptions::allow_semicolons`]).
    pub fn with_semicolons(mut self, allow: bool) -> Self {
        self.path_options = self.path_options.with_semicolons(allow);
        self
    }
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = AuthzService<S>;

    fn layer(&self, inner: S) -> AuthzService<S> {
        AuthzService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`AuthzLayer`].
#[derive(Clone, Debug)]
pub struct AuthzService<S> {
    inner: S,
    layer: AuthzLayer,
}

impl<S, B, ResBody> tower::Service<Request<B>> for AuthzService<S>
where
    S: tower::Service<Request<B>, Response = Response<ResBody>>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<GatewayBody>;
    type Error = S::Error;
    type Future = AuthzFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let Some(principal) = request.extensions().get::<Principal>().cloned() else {
            // Authorization without authentication is a wiring error; refuse.
            let response = error_response(
                StatusCode::UNAUTHORIZED,
                "missing_credentials",
                "authentication required",
            );
            return AuthzFuture::Decided {
                response: Some(response),
            };
        };
        // Normalize before deciding, so the decision is about the spelling
        // the upstream will see (and receive). A front router's `Routed`
        // was matched on the raw path; `Router::find` compares decoded
        // literals, so it agrees with the normal form whenever one exists.
        if let Err(e) = super::path::normalize_request_path(&mut request, self.layer.path_options) {
            let entry = AuditEntry::new("authz.check", Outcome::Denied)
                .who(principal.id.clone())
                .reason("invalid_path");
            self.layer
                .audit
                .record(with_request_context(entry, &request));
            let response = error_response(StatusCode::BAD_REQUEST, "invalid_path", &e.to_string());
            return AuthzFuture::Decided {
                response: Some(response),
            };
        }
        // A front router's match (`Routed`) is reused rather than routing again.
        let decision = match request.extensions().get::<Routed>() {
            Some(routed) => routed.decide(&self.layer.policy, &principal.roles),
            None => self.layer.policy.check(
                request.method().as_str(),
                request.uri().path(),
                &principal.roles,
            ),
        };
        let denied =
            |status, code, route: Option<String>, message: String, request: &Request<B>| {
                let mut entry = AuditEntry::new("authz.check", Outcome::Denied)
                    .who(principal.id.clone())
                    .reason(code);
                if let Some(route) = route {
                    entry = entry.route(route);
                }
                self.layer
                    .audit
                    .record(with_request_context(entry, request));
                error_response(status, code, &message)
            };
        let response = match decision {
            Decision::Allow { route, .. } => {
                request.extensions_mut().insert(MatchedRoute(route.clone()));
                return AuthzFuture::Allowed {
                    future: self.inner.call(request),
                    route: Some(route),
                };
            }
            Decision::Forbidden { route, permission } => {
                let mut response = denied(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    Some(format!("{} {route}", request.method())),
                    format!("missing permission {permission}"),
                    &request,
                );
                response.extensions_mut().insert(MatchedRoute(route));
                response
            }
            Decision::NoRoute => denied(
                StatusCode::NOT_FOUND,
                "route_not_found",
                None,
                "no such route".to_owned(),
                &request,
            ),
        };
        AuthzFuture::Decided {
            response: Some(response),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`AuthzService`]: the request's, when allowed
    /// (its [`MatchedRoute`] also rides on the response, for the metrics
    /// layer outside), or the rejection decided at once.
    #[project = AuthzFutureProj]
    #[derive(Debug)]
    #[allow(missing_docs)] // pin-project-lite cannot carry docs on variant fields
    pub enum AuthzFuture<F> {
        /// Allowed: the service inside answers.
        Allowed { #[pin] future: F, route: Option<String> },
        /// Rejected (or an error answered) without calling the service inside.
        Decided { response: Option<Response<GatewayBody>> },
    }
}

impl<F, ResBody, E> Future for AuthzFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Output = Result<Response<GatewayBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AuthzFutureProj::Allowed { future, route } => {
                let mut response = boxed(ready!(future.poll(cx))?);
                if let Some(route) = route.take() {
                    response.extensions_mut().insert(MatchedRoute(route));
                }
                Poll::Ready(Ok(response))
            }
            AuthzFutureProj::Decided { response } => Poll::Ready(Ok(response
                .take()
                .expect("AuthzFuture polled after completion"))),
        }
    }
}
