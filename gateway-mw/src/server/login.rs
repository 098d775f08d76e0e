//! The demo token endpoints: `POST /auth/token`, `/auth/refresh` and
//! `/auth/logout`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::routes::{Handler, LoginOp, Matched};
use super::{State, json};
use crate::audit::{AuditEntry, Outcome};
use crate::http::{ClientIp, GatewayBody};
use crate::token::{MemoryStore, TokenError, TokenService};

/// The token service over whichever store is configured.
pub(super) enum Tokens {
    Memory(TokenService<MemoryStore>),
    #[cfg(feature = "redis")]
    Redis(TokenService<crate::token::RedisStore>),
}

impl Tokens {
    pub(super) async fn issue(
        &self,
        subject: &str,
        roles: &[String],
    ) -> Result<crate::token::TokenPair, TokenError> {
        match self {
            Tokens::Memory(t) => t.issue(subject, roles).await,
            #[cfg(feature = "redis")]
            Tokens::Redis(t) => t.issue(subject, roles).await,
        }
    }

    pub(super) async fn refresh(&self, token: &str) -> Result<crate::token::TokenPair, TokenError> {
        match self {
            Tokens::Memory(t) => t.refresh(token).await,
            #[cfg(feature = "redis")]
            Tokens::Redis(t) => t.refresh(token).await,
        }
    }

    pub(super) async fn logout(&self, token: &str) -> Result<(), TokenError> {
        match self {
            Tokens::Memory(t) => t.logout(token).await,
            #[cfg(feature = "redis")]
            Tokens::Redis(t) => t.logout(token).await,
        }
    }

    pub(super) async fn revoke_subject(&self, subject: &str) -> Result<usize, TokenError> {
        match self {
            Tokens::Memory(t) => t.revoke_subject(subject).await,
            #[cfg(feature = "redis")]
            Tokens::Redis(t) => t.revoke_subject(subject).await,
        }
    }
}

#[derive(Deserialize)]
struct Login {
    username: String,
    password: String,
}

#[derive(Deserialize)]
struct RefreshBody {
    refresh_token: String,
}

/// `/auth/token`, `/auth/refresh`, `/auth/logout` (demo user store).
pub(super) async fn auth_endpoint(
    state: Arc<State>,
    request: Request<Full<Bytes>>,
) -> Result<Response<GatewayBody>, Infallible> {
    let Some(tokens) = state.tokens.as_ref() else {
        return Ok(crate::http::error_response(
            StatusCode::NOT_FOUND,
            "route_not_found",
            "token endpoints are not configured",
        ));
    };
    let ip = request
        .extensions()
        .get::<ClientIp>()
        .map(|ClientIp(ip)| ip.to_string());
    let audit = |entry: AuditEntry| {
        let entry = match &ip {
            Some(ip) => entry.client_ip(ip.clone()),
            None => entry,
        };
        crate::audit::AuditSink::record(&*state.audit, entry);
    };
    if request.method() != Method::POST {
        return Ok(crate::http::error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use POST",
        ));
    }
    let op = match request.extensions().get::<Matched>().map(|m| &m.0.handler) {
        Some(Handler::Login(op)) => *op,
        _ => LoginOp::Unknown,
    };
    let body = match request.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(never) => match never {},
    };
    let pair_json = |pair: crate::token::TokenPair| {
        json(
            StatusCode::OK,
            serde_json::json!({"access_token": pair.access_token, "refresh_token": pair.refresh_token, "token_type": "Bearer", "expires_in": pair.expires_in}),
        )
    };
    let unauthorized = |code: &str, message: &str| {
        crate::http::error_response(StatusCode::UNAUTHORIZED, code, message)
    };
    Ok(match op {
        LoginOp::Token => {
            let Ok(login) = serde_json::from_slice::<Login>(&body) else {
                return Ok(crate::http::error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "send {\"username\", \"password\"}",
                ));
            };
            let hash: [u8; 32] = Sha256::digest(login.password.as_bytes()).into();
            match state.users.get(&login.username) {
                Some((expected, roles)) if constant_time_eq(expected, &hash) => match tokens
                    .issue(&login.username, roles)
                    .await
                {
                    Ok(pair) => {
                        audit(AuditEntry::new("token.issue", Outcome::Success).who(login.username));
                        pair_json(pair)
                    }
                    Err(e) => crate::http::error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "token_store",
                        &e.to_string(),
                    ),
                },
                _ => {
                    audit(
                        AuditEntry::new("auth.login", Outcome::Failure)
                            .who(login.username)
                            .reason("bad_credentials"),
                    );
                    unauthorized("invalid_credentials", "invalid username or password")
                }
            }
        }
        LoginOp::Refresh | LoginOp::Logout => {
            let Ok(body) = serde_json::from_slice::<RefreshBody>(&body) else {
                return Ok(crate::http::error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "send {\"refresh_token\"}",
                ));
            };
            if op == LoginOp::Logout {
                match tokens.logout(&body.refresh_token).await {
                    Ok(()) => {
                        audit(AuditEntry::new("token.revoke", Outcome::Success));
                        json(StatusCode::OK, serde_json::json!({"status": "logged_out"}))
                    }
                    Err(_) => unauthorized("invalid_token", "unknown refresh token"),
                }
            } else {
                match tokens.refresh(&body.refresh_token).await {
                    Ok(pair) => {
                        audit(AuditEntry::new("token.refresh", Outcome::Success));
                        pair_json(pair)
                    }
                    Err(TokenError::ReuseDetected { subject }) => {
                        audit(
                            AuditEntry::new("token.reuse_detected", Outcome::Denied)
                                .who(subject)
                                .reason("family_revoked"),
                        );
                        unauthorized(
                            "token_reused",
                            "refresh token reuse detected; the session was revoked",
                        )
                    }
                    Err(e) => {
                        audit(AuditEntry::new("token.refresh", Outcome::Failure).reason("invalid"));
                        unauthorized("invalid_token", &e.to_string())
                    }
                }
            }
        }
        LoginOp::Unknown => {
            crate::http::error_response(StatusCode::NOT_FOUND, "route_not_found", "no such route")
        }
    })
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
