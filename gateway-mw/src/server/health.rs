//! Readiness (`GET /readyz`).
//!
//! The endpoint is unauthenticated, so it says only whether the gateway is
//! ready and how many upstreams it could not reach: never which ones or
//! where they are (the log names them, at `warn`).

use std::time::Duration;

use http::{Response, StatusCode};

use super::{State, json};
use crate::http::GatewayBody;

/// How long each dependency has to answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Ready when every upstream accepts a TCP connection within 500 ms (and
/// Redis, when configured, answers `PING`). The probes run concurrently.
pub(super) async fn readiness(state: &State) -> Response<GatewayBody> {
    let mut probes = tokio::task::JoinSet::new();
    for upstream in &state.all_upstreams {
        let base = upstream.base.clone();
        probes.spawn(async move {
            let authority = base
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or_default()
                .to_owned();
            let connect = tokio::net::TcpStream::connect(authority);
            let ok = matches!(
                tokio::time::timeout(PROBE_TIMEOUT, connect).await,
                Ok(Ok(_))
            );
            if !ok {
                tracing::warn!(upstream = %base, "readiness: upstream unreachable");
            }
            ok
        });
    }
    let total = state.all_upstreams.len();
    let mut unreachable = 0usize;
    while let Some(probe) = probes.join_next().await {
        unreachable += usize::from(!probe.unwrap_or(false));
    }
    #[allow(unused_mut)]
    let mut redis_ok = true;
    #[cfg(feature = "redis")]
    if let Some(client) = &state.redis {
        use fred::prelude::ClientLike;
        let pong = tokio::time::timeout(PROBE_TIMEOUT, client.ping::<String>(None)).await;
        redis_ok = matches!(pong, Ok(Ok(_)));
        if !redis_ok {
            tracing::warn!("readiness: redis unreachable");
        }
    }
    let ready = unreachable == 0 && redis_ok;
    let mut body = serde_json::json!({
        "status": if ready { "ready" } else { "not_ready" },
        "upstreams": {"total": total, "unreachable": unreachable},
    });
    #[cfg(feature = "redis")]
    if state.redis.is_some() {
        body["redis"] = serde_json::json!(if redis_ok { "ok" } else { "unreachable" });
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, body)
}
