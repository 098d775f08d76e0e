//! Shared by the order-saga examples: configuration from the environment,
//! and HS256 tokens verified and minted with the services' one shared secret.
// Each example uses the part it needs.
#![allow(dead_code)]

use std::time::Duration;

use jwt_kit::{JwtConfig, JwtVerifier, KeySet, VerifyingKey};

#[path = "env.rs"]
mod env_support;
// Not every example that includes this file reads the environment.
#[allow(unused_imports)]
pub(crate) use env_support::{env, redacted};

/// A verifier of HS256 tokens signed with `secret` (any `kid`).
pub(crate) fn hs256_verifier(secret: &str) -> Result<JwtVerifier, jwt_kit::KeyError> {
    let keys = KeySet::new()
        .with_key(VerifyingKey::hs256("default", secret.as_bytes()))?
        .with_default_kid("default");
    Ok(JwtVerifier::new(keys, JwtConfig::default()))
}

/// A token for `subject` with `roles`, valid for `ttl`.
pub(crate) fn mint_token(
    secret: &str,
    subject: &str,
    roles: &[&str],
    ttl: Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    let exp = chrono::Utc::now().timestamp() + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": subject, "exp": exp, "roles": roles}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
}
