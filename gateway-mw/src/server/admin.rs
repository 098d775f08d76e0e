//! The gateway's own administrative endpoint,
//! `POST /admin/users/{user}/revoke-sessions`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;

use super::{State, X_REQUEST_ID, json};
use crate::audit::{AuditEntry, Outcome};
use crate::http::{ClientIp, GatewayBody, Principal};

/// The administrative route; its permission comes from `[admin]`.
pub(super) const ADMIN_REVOKE_SESSIONS: &str = "/admin/users/{user}/revoke-sessions";

/// `POST /admin/users/{user}/revoke-sessions`: authorization already ran
/// (the route needs `[admin] permission`); this ends the user's sessions and
/// audits who did it to whom.
pub(super) async fn admin_endpoint(
    state: Arc<State>,
    request: Request<Full<Bytes>>,
) -> Result<Response<GatewayBody>, Infallible> {
    let path = request.uri().path();
    let target = path
        .strip_prefix("/admin/users/")
        .and_then(|rest| rest.strip_suffix("/revoke-sessions"))
        .filter(|user| !user.is_empty() && !user.contains('/'))
        .map(str::to_owned);
    let (Some(target), Some(tokens)) = (target, state.tokens.as_ref()) else {
        return Ok(crate::http::error_response(
            StatusCode::NOT_FOUND,
            "route_not_found",
            "no such route",
        ));
    };
    let entry_for = |outcome| {
        let mut entry = AuditEntry::new("admin.revoke_sessions", outcome)
            .target(target.clone())
            .route(format!("POST {ADMIN_REVOKE_SESSIONS}"));
        if let Some(p) = request.extensions().get::<Principal>() {
            entry = entry.who(p.id.clone());
        }
        if let Some(ClientIp(ip)) = request.extensions().get::<ClientIp>() {
            entry = entry.client_ip(ip.to_string());
        }
        if let Some(id) = request
            .headers()
            .get(&X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
        {
            entry = entry.request_id(id);
        }
        entry
    };
    Ok(match tokens.revoke_subject(&target).await {
        Ok(revoked) => {
            let entry = entry_for(Outcome::Success).reason(format!("revoked={revoked}"));
            crate::audit::AuditSink::record(&*state.audit, entry);
            json(
                StatusCode::OK,
                serde_json::json!({"user": target, "revoked_sessions": revoked}),
            )
        }
        Err(e) => {
            // The store's error (a Redis message) is for the log, not the caller.
            tracing::error!(error = %e, "token store failed while revoking sessions");
            let entry = entry_for(Outcome::Failure).reason("token_store");
            crate::audit::AuditSink::record(&*state.audit, entry);
            crate::http::error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "token_store",
                "the token store is unavailable",
            )
        }
    })
}
