//! The HTTP API: sends, group membership and history, for service tokens.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_kit::path::decode_segment;
use http_kit::{ApiError, BoxError, Query, bearer_token};
use serde::Deserialize;

use super::{Body, NotifyServer, error, json};
use crate::error::report;
use crate::store::HistoryItem;
use crate::{Error, Notification};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SendToUsers {
    user_ids: Vec<String>,
    notification: WireNotification,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SendToGroup {
    notification: WireNotification,
}

/// A notification as the API reads it: `id` and `timestamp` are taken as
/// any JSON first, so a bad one is answered `invalid_field` naming it,
/// rather than the `invalid_json` of a body that is not the right shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireNotification {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(rename = "type")]
    kind: String,
    title: String,
    message: String,
    #[serde(default)]
    data: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    timestamp: Option<serde_json::Value>,
}

impl WireNotification {
    /// The notification, or the `invalid_field` message naming the field.
    fn into_notification(self) -> Result<Notification, String> {
        let mut n = Notification::new(self.kind, self.title, self.message);
        n.data = self.data;
        n.id = field(self.id, "notification.id", "a UUID")?;
        n.timestamp = field(
            self.timestamp,
            "notification.timestamp",
            "an RFC 3339 date-time with an offset, e.g. 2026-11-24T22:00:00Z",
        )?;
        Ok(n)
    }
}

/// Decodes an optional field (`null` counts as absent); the error names
/// it when it is not `expected`.
fn field<T: serde::de::DeserializeOwned>(
    value: Option<serde_json::Value>,
    name: &str,
    expected: &str,
) -> Result<Option<T>, String> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v)
            .map(Some)
            .map_err(|_| format!("`{name}` must be {expected}")),
    }
}

fn invalid_field(message: &str) -> Response<Body> {
    error(StatusCode::BAD_REQUEST, "invalid_field", message)
}

pub(crate) async fn handle<B>(
    server: &NotifyServer,
    request: Request<B>,
    segments: &[&str],
) -> Response<Body>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let inner = &server.inner;
    // Route first (404/405 need no token), then authenticate.
    let route = match (request.method(), segments) {
        (&Method::POST, ["v1", "notifications"]) => Route::SendUsers,
        (&Method::POST, ["v1", "groups", g, "notifications"]) => Route::SendGroup(g),
        (&Method::PUT, ["v1", "groups", g, "members", u]) => Route::Join(g, u),
        (&Method::DELETE, ["v1", "groups", g, "members", u]) => Route::Leave(g, u),
        (&Method::GET, ["v1", "users", u, "notifications"]) => Route::History(u, false),
        (&Method::GET, ["v1", "users", u, "streams"]) => Route::History(u, true),
        _ => return error(StatusCode::NOT_FOUND, "not_found", "no such route"),
    };
    let Some(token) = bearer_token(request.headers()) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing_token",
            "send a service bearer token",
        );
    };
    match inner.auth.authenticate(token) {
        Ok(identity)
            if identity
                .roles
                .iter()
                .any(|r| *r == inner.config.service_role) => {}
        Ok(_) => {
            return error(
                StatusCode::FORBIDDEN,
                "forbidden",
                &format!("the token lacks the `{}` role", inner.config.service_role),
            );
        }
        Err(e) => return error(StatusCode::UNAUTHORIZED, "invalid_token", &report(&e)),
    }
    let hub = &inner.hub;
    let decode = |s: &str| decode_segment(s).map(|d| d.into_owned()).ok_or(());
    match route {
        Route::SendUsers => {
            let body: SendToUsers = match read_json(request, inner.config.max_body_bytes).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let notification = match body.notification.into_notification() {
                Ok(n) => n,
                Err(message) => return invalid_field(&message),
            };
            receipt(hub.send_to_users(&body.user_ids, notification).await)
        }
        Route::SendGroup(g) => {
            let Ok(group) = decode(g) else {
                return bad_path();
            };
            let body: SendToGroup = match read_json(request, inner.config.max_body_bytes).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let notification = match body.notification.into_notification() {
                Ok(n) => n,
                Err(message) => return invalid_field(&message),
            };
            receipt(hub.broadcast_to_group(&group, notification).await)
        }
        Route::Join(g, u) | Route::Leave(g, u) => {
            let (Ok(group), Ok(user)) = (decode(g), decode(u)) else {
                return bad_path();
            };
            let joining = matches!(route, Route::Join(..));
            let result = if joining {
                hub.join_group(&group, &user).await
            } else {
                hub.leave_group(&group, &user).await
            };
            match result {
                Ok(changed) => json(
                    StatusCode::OK,
                    &serde_json::json!({"group": group, "user_id": user, "member": joining, "changed": changed}),
                ),
                Err(e) => hub_error(&e),
            }
        }
        Route::History(u, streams) => {
            let Ok(user) = decode(u) else {
                return bad_path();
            };
            let limit = match Query::parse(request.uri().query()).get("limit") {
                None => 50,
                Some(v) => match v.parse::<usize>() {
                    Ok(n) => n,
                    Err(_) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "invalid_limit",
                            "`limit` must be 1 to 1000",
                        );
                    }
                },
            };
            if streams {
                return match hub.stream_history(&user, limit).await {
                    Ok(list) => {
                        let list: Vec<serde_json::Value> = list
                            .iter()
                            .map(|item| match item {
                                HistoryItem::Inbox(d) => serde_json::json!({
                                    "stream": "inbox", "seq": d.seq, "notification": d.notification,
                                }),
                                HistoryItem::Group {
                                    group,
                                    offset,
                                    notification,
                                } => serde_json::json!({
                                    "stream": "group", "group": group, "offset": offset,
                                    "notification": notification,
                                }),
                            })
                            .collect();
                        json(
                            StatusCode::OK,
                            &serde_json::json!({"user_id": user, "notifications": list}),
                        )
                    }
                    Err(e) => hub_error(&e),
                };
            }
            match hub.deliveries(&user, limit).await {
                Ok(list) => json(
                    StatusCode::OK,
                    &serde_json::json!({"user_id": user, "notifications": list}),
                ),
                Err(e) => hub_error(&e),
            }
        }
    }
}

enum Route<'a> {
    SendUsers,
    SendGroup(&'a str),
    Join(&'a str, &'a str),
    Leave(&'a str, &'a str),
    /// A user's history: v1's sequence, or (`true`) across their streams.
    History(&'a str, bool),
}

fn bad_path() -> Response<Body> {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_path",
        "bad percent-encoding in the path",
    )
}

fn receipt(result: Result<crate::Receipt, Error>) -> Response<Body> {
    match result {
        Ok(r) => json(
            StatusCode::CREATED,
            &serde_json::json!({"id": r.id, "timestamp": r.timestamp, "recipients": r.recipients}),
        ),
        Err(e) => hub_error(&e),
    }
}

pub(crate) fn hub_error(e: &Error) -> Response<Body> {
    let (status, code) = match e {
        Error::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
        Error::Broker(_) => (StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable"),
        Error::ShutDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
        Error::InvalidNotification(_) => (StatusCode::BAD_REQUEST, "invalid_notification"),
        Error::InvalidId(_) => (StatusCode::BAD_REQUEST, "invalid_id"),
        Error::NoRecipients | Error::TooManyRecipients { .. } => {
            (StatusCode::BAD_REQUEST, "invalid_recipients")
        }
        Error::InvalidLimit { .. } => (StatusCode::BAD_REQUEST, "invalid_limit"),
        Error::DuplicateId(_) => (StatusCode::CONFLICT, "duplicate_id"),
    };
    error(status, code, &report(e))
}

/// Reads a JSON body of at most `limit` bytes (chunked bodies included):
/// 413 over the limit, 400 for malformed JSON.
async fn read_json<T, B>(request: Request<B>, limit: usize) -> Result<T, Response<Body>>
where
    T: serde::de::DeserializeOwned,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let (parts, body) = request.into_parts();
    let bytes = http_kit::collect_limited(&parts.headers, body, limit)
        .await
        .map_err(|e| ApiError::from(e).into_response())?;
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "invalid_json", &e.to_string()))
}
