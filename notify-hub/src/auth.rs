//! Who a connection belongs to: the [`Authenticator`] trait, and (feature
//! `jwt`) its implementation by the suite's JWT verifier (ferrokeel-jwt), so tokens are
//! checked by one audited implementation, not a second one.

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

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid token: {reason}")]
pub struct AuthError {
    /// A short machine-readable reason (e.g. `expired`, `bad_signature`).
    pub reason: String,
}

/// Verifies a bearer token and says who it belongs to.
pub trait Authenticator: Send + Sync + 'static {
    /// Verifies `token`.
    fn authenticate(&self, token: &str) -> Result<Identity, AuthError>;
}

#[cfg(feature = "jwt")]
impl Authenticator for jwt_kit::JwtVerifier {
    fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        let claims = self.verify(token).map_err(|e| AuthError {
            reason: e.to_string(),
        })?;
        let groups = match claims.all.get("groups") {
            None => Vec::new(),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .map(|g| g.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| AuthError {
                    reason: "`groups` must be an array of strings".into(),
                })?,
            Some(_) => {
                return Err(AuthError {
                    reason: "`groups` must be an array of strings".into(),
                });
            }
        };
        Ok(Identity {
            user_id: claims.subject,
            groups,
            roles: claims.roles,
            expires_at: Some(claims.expires_at),
        })
    }
}
