//! Shared by the order-saga examples: configuration from the environment,
//! and HS256 tokens verified and minted with the services' one shared secret.
// Each example uses the part it needs.
#![allow(dead_code)]

use std::time::Duration;

use jwt_kit::{JwtConfig, JwtVerifier, KeySet, VerifyingKey};

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

/// The environment variable `name`, unless unset or empty.
pub(crate) fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `url` with any password replaced by `***`, for printing.
pub(crate) fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(unparsed URL)".to_owned();
    };
    match rest.split_once('@') {
        Some((user, host)) => {
            let user = user.split_once(':').map_or(user, |(name, _)| name);
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}
