//! Readiness (`GET /readyz`).

use std::time::Duration;

use http::{Response, StatusCode};

use super::{State, json};
use crate::http::GatewayBody;

/// Ready when every upstream accepts a TCP connection within 500 ms.
pub(super) async fn readiness(state: &State) -> Response<GatewayBody> {
    let mut failing = Vec::new();
    for upstream in &state.all_upstreams {
        let authority = upstream
            .base
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let ok = matches!(
            tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(&authority)
            )
            .await,
            Ok(Ok(_))
        );
        if !ok {
            failing.push(upstream.base.clone());
        }
    }
    #[cfg(feature = "redis")]
    if let Some(client) = &state.redis {
        use fred::prelude::ClientLike;
        let pong =
            tokio::time::timeout(Duration::from_millis(500), client.ping::<String>(None)).await;
        if !matches!(pong, Ok(Ok(_))) {
            failing.push("redis".to_owned());
        }
    }
    if failing.is_empty() {
        json(StatusCode::OK, serde_json::json!({"status": "ready"}))
    } else {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "not_ready", "unreachable_upstreams": failing}),
        )
    }
}
