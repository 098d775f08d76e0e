//! The demo token endpoints: `POST /auth/token`, `/auth/refresh` and
//! `/auth/logout`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use argon2::password_hash::SaltString;
use argon2::{Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier, Version};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde::Deserialize;

use super::routes::{Handler, LoginOp, Matched};
use super::{State, json};
use crate::audit::{AuditEntry, Outcome};
use crate::config::{ConfigError, Secret, UserEntry};
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
            match state.users.check(&login.username, login.password).await {
                Some(roles) => match tokens.issue(&login.username, &roles).await {
                    Ok(pair) => {
                        audit(AuditEntry::new("token.issue", Outcome::Success).who(login.username));
                        pair_json(pair)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "token store failed while issuing");
                        crate::http::error_response(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "token_store",
                            "the token store is unavailable",
                        )
                    }
                },
                None => {
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

/// The `[[users]]`, with their Argon2id hashes.
pub(super) struct Users {
    by_name: HashMap<String, (Secret, Vec<String>)>,
    /// The hash of a random password with the first user's parameters:
    /// verified for unknown names, so the response time does not tell
    /// which names exist.
    decoy: Secret,
}

impl Users {
    /// The users of `entries`, whose hashes `GatewayConfig::validate` checked.
    pub(super) fn new(entries: &[UserEntry]) -> Result<Users, ConfigError> {
        let mut by_name = HashMap::with_capacity(entries.len());
        let mut decoy_params = None;
        for user in entries {
            let hash = user.password_hash.clone().ok_or_else(|| {
                ConfigError::invalid(
                    format!("[[users]] {:?} password_hash", user.name),
                    "is required",
                )
            })?;
            let invalid = |source| ConfigError::Password {
                user: user.name.clone(),
                source,
            };
            let parsed = PasswordHash::new(hash.expose()).map_err(invalid)?;
            let params = Params::try_from(&parsed).map_err(invalid)?;
            if params.m_cost() < Params::DEFAULT_M_COST || params.t_cost() < Params::DEFAULT_T_COST
            {
                tracing::warn!(
                    user = %user.name,
                    m_cost = params.m_cost(),
                    t_cost = params.t_cost(),
                    "password hash parameters are below the OWASP minimum (m=19456, t=2)"
                );
            }
            decoy_params.get_or_insert(params);
            by_name.insert(user.name.clone(), (hash, user.roles.clone()));
        }
        let decoy = decoy_hash(decoy_params.unwrap_or_default()).map_err(|source| {
            ConfigError::Password {
                user: "(decoy)".into(),
                source,
            }
        })?;
        Ok(Users { by_name, decoy })
    }

    /// The roles of `name` if `password` is theirs. Argon2 is slow on
    /// purpose, so it runs on the blocking pool, off the request threads.
    pub(super) async fn check(&self, name: &str, password: String) -> Option<Vec<String>> {
        let (hash, roles) = match self.by_name.get(name) {
            Some((hash, roles)) => (hash.clone(), Some(roles.clone())),
            None => (self.decoy.clone(), None),
        };
        let verified = tokio::task::spawn_blocking(move || {
            PasswordHash::new(hash.expose()).is_ok_and(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
        })
        .await
        .unwrap_or(false);
        // A decoy verification never logs anyone in, whatever it returned.
        roles.filter(|_| verified)
    }
}

fn decoy_hash(params: Params) -> Result<Secret, argon2::password_hash::Error> {
    let mut secret = [0u8; 32];
    let mut salt = [0u8; 16];
    // Without randomness the decoy is still a valid hash to spend time on.
    let _ = getrandom::fill(&mut secret);
    let _ = getrandom::fill(&mut salt);
    let salt = SaltString::encode_b64(&salt)?;
    let hash =
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params).hash_password(&secret, &salt)?;
    Ok(Secret::new(hash.to_string()))
}
