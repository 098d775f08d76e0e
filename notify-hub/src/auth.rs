//! Who a connection belongs to: the [`Authenticator`] trait, and (feature
//! `jwt`) its implementation by the suite's JWT verifier (ferrokeel-jwt), so tokens are
//! checked by one audited implementation, not a second one.
//!
//! The verifier reads its own clock (`JwtVerifier::with_clock`); give it
//! the hub's [`HubConfig::clock`](crate::HubConfig::clock) so both agree on
//! what "expired" means.

/// The identity a verified token carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user id (`sub`).
    pub user_id: String,
    /// Groups the user belongs to (`groups` claim), joined on connect.
    pub groups: Vec<String>,
    /// Roles (`roles` claim), used by the HTTP API for service tokens.
    pub roles: Vec<String>,
    /// When the credential expires (Unix seconds), if it does: a WebSocket
    /// opened with it is closed then (close code 4001).
    pub expires_at: Option<i64>,
}

/// What kind of refusal an [`AuthError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuthErrorKind {
    /// The token's `exp` has passed: get a fresh token.
    Expired,
    /// Anything else: malformed, badly signed, a claim missing or of the
    /// wrong type, an untrusted issuer. Do not retry the same token.
    Invalid,
}

/// Why a token was refused: a short machine-readable [`code`](AuthError::code)
/// (e.g. `expired`, `bad_signature`, `invalid_claim`) for HTTP bodies, logs
/// and close reasons, and the verifier's own error as the
/// [`source`](std::error::Error::source).
#[derive(Debug, thiserror::Error)]
#[error("invalid token")]
pub struct AuthError {
    kind: AuthErrorKind,
    code: &'static str,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl AuthError {
    /// A refusal with `code`, caused by `source` (the verifier's error).
    pub fn new(
        kind: AuthErrorKind,
        code: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> AuthError {
        AuthError {
            kind,
            code,
            source: Some(Box::new(source)),
        }
    }

    /// The refusal of a token whose `exp` has passed (code `expired`).
    pub fn expired() -> AuthError {
        AuthError {
            kind: AuthErrorKind::Expired,
            code: "expired",
            source: Some(Box::new(TokenExpired)),
        }
    }

    /// What kind of refusal this is.
    pub fn kind(&self) -> AuthErrorKind {
        self.kind
    }

    /// A short machine-readable reason, e.g. `expired` or `bad_signature`.
    pub fn code(&self) -> &'static str {
        self.code
    }
}

/// The source of [`AuthError::expired`].
#[derive(Debug, thiserror::Error)]
#[error("token expired")]
struct TokenExpired;

/// The `groups` claim is not an array of strings.
#[derive(Debug, thiserror::Error)]
#[error("`groups` must be an array of strings")]
struct InvalidGroups;

/// Verifies a bearer token and says who it belongs to.
pub trait Authenticator: Send + Sync + 'static {
    /// Verifies `token`.
    fn authenticate(&self, token: &str) -> Result<Identity, AuthError>;
}

/// The machine-readable code of a verifier error.
#[cfg(feature = "jwt")]
fn jwt_code(e: &jwt_kit::JwtError) -> &'static str {
    use jwt_kit::JwtError as E;
    match e {
        E::TooLarge { .. } => "too_large",
        E::Malformed(_) => "malformed",
        E::AlgNone => "alg_none",
        E::UnsupportedAlgorithm(_) => "unsupported_algorithm",
        E::ForbiddenHeader(_) => "forbidden_header",
        E::MissingKid => "missing_kid",
        E::UnknownKid => "unknown_kid",
        E::AlgorithmMismatch { .. } => "algorithm_mismatch",
        E::InvalidSignature => "bad_signature",
        E::MissingClaim(_) => "missing_claim",
        E::InvalidClaimType(_) => "invalid_claim",
        E::Expired => "expired",
        E::NotYetValid => "not_yet_valid",
        E::IssuedInFuture => "issued_in_future",
        E::InvalidIssuer => "invalid_issuer",
        E::InvalidAudience => "invalid_audience",
        _ => "invalid",
    }
}

#[cfg(feature = "jwt")]
impl Authenticator for jwt_kit::JwtVerifier {
    fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        let claims = self.verify(token).map_err(|e| {
            let kind = if matches!(e, jwt_kit::JwtError::Expired) {
                AuthErrorKind::Expired
            } else {
                AuthErrorKind::Invalid
            };
            AuthError::new(kind, jwt_code(&e), e)
        })?;
        let invalid_groups =
            || AuthError::new(AuthErrorKind::Invalid, "invalid_claim", InvalidGroups);
        let groups = match claims.all.get("groups") {
            None => Vec::new(),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .map(|g| g.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(invalid_groups)?,
            Some(_) => return Err(invalid_groups()),
        };
        Ok(Identity {
            user_id: claims.subject,
            groups,
            roles: claims.roles,
            expires_at: Some(claims.expires_at),
        })
    }
}

#[cfg(all(test, feature = "jwt"))]
mod tests {
    use super::*;

    #[test]
    fn the_verifier_error_is_the_source_and_the_code_is_machine_readable() {
        let keys = jwt_kit::KeySet::new()
            .with_key(jwt_kit::VerifyingKey::hs256(
                "k",
                b"a-32-byte-or-longer-shared-secret!",
            ))
            .unwrap()
            .with_default_kid("k");
        let verifier = jwt_kit::JwtVerifier::new(keys, jwt_kit::JwtConfig::default());
        let e = verifier.authenticate("not.a.jwt").unwrap_err();
        assert_eq!((e.kind(), e.code()), (AuthErrorKind::Invalid, "malformed"));
        let source = std::error::Error::source(&e).expect("the JWT error is kept");
        assert!(source.downcast_ref::<jwt_kit::JwtError>().is_some());
        assert_eq!(AuthError::expired().kind(), AuthErrorKind::Expired);
        assert_eq!(
            crate::error::report(&AuthError::expired()),
            "invalid token: token expired"
        );
    }
}
