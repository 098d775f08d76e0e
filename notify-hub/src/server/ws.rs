//! `GET /v1/ws`: authenticate, upgrade, then run the connection: welcome,
//! replay + live deliveries, acks and resumes, heartbeats, close codes.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_kit::{ConnectionSlot, Query, Shutdown, bearer_token};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use time_kit::SharedClock;

use super::live_socket::{LiveIo, LiveSocket};
use super::session::{
    Reply, SUBPROTOCOL_V1, SUBPROTOCOL_V2, Session, StreamSession, parse_position,
};
use super::{Body, NotifyServer, error};
use crate::auth::AuthError;
use crate::error::report;
use crate::live::LiveWriter;
use crate::subscription::Closed;

/// The WebSocket close codes the server sends.
pub mod close_codes {
    /// The client closed, or the server ended the session normally.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down; reconnect (to another node) with `since`.
    pub const GOING_AWAY: u16 = 1001;
    /// The client kept sending invalid frames, or missed its pongs.
    pub const POLICY: u16 = 1008;
    /// A client message was over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// The server failed (e.g. the store during a replay); reconnect with `since`.
    pub const INTERNAL: u16 = 1011;
    /// Slow consumer: the connection's queue overflowed; reconnect with `since`.
    pub const SLOW_CONSUMER: u16 = 4000;
    /// The token the connection was opened with has expired; reconnect with
    /// a fresh token and `since`.
    pub const TOKEN_EXPIRED: u16 = 4001;
}

/// tungstenite's read buffer per connection. It is allocated at the
/// upgrade and kept, zero-filled, for the connection's life, and clients
/// send only small control frames (`ack`, `resume`: under 100 bytes), so
/// 512 bytes rather than tungstenite's 128 KiB or the 4 KiB used before:
/// an idle connection's largest single allocation. A larger frame (up to
/// `max_client_message`) is still read whole, in more reads.
const READ_BUFFER: usize = 512;

/// The close reason of [`close_codes::TOKEN_EXPIRED`].
const TOKEN_EXPIRED_REASON: &str = "token expired: reconnect with a fresh token";

pub(crate) async fn upgrade<B>(server: &NotifyServer, mut request: Request<B>) -> Response<Body> {
    let headers = request.headers();
    let is_upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let connection_upgrade = headers
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return error(
            StatusCode::BAD_REQUEST,
            "not_websocket",
            "expected a WebSocket upgrade",
        );
    };
    if !is_upgrade || !connection_upgrade {
        return error(
            StatusCode::BAD_REQUEST,
            "not_websocket",
            "expected a WebSocket upgrade",
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return http_kit::ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported_websocket_version",
            "only WebSocket version 13 is supported",
        )
        .with_header(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        )
        .into_response();
    }
    // Offered subprotocols: `notify.v1` and/or `bearer.<token>`.
    let offered: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .collect();
    let query = Query::parse(request.uri().query());
    let token = bearer_token(headers)
        .map(str::to_owned)
        .or_else(|| query.get("access_token").map(str::to_owned))
        .or_else(|| {
            offered
                .iter()
                .find_map(|p| p.strip_prefix("bearer.").map(str::to_owned))
        });
    let Some(token) = token else {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing_token",
            "send a bearer token",
        );
    };
    let clock = &server.inner.hub.config().clock;
    let identity = match server.inner.auth.authenticate(&token) {
        // A token past its `exp` that the verifier still accepts (its clock
        // skew leeway) is refused here: a connection opened with it would
        // be closed with 4001 at once, so the client learns it at the
        // upgrade, where it can refresh the token first.
        Ok(identity) if identity.expires_at.is_some_and(|exp| expired(exp, clock)) => {
            return refused(&AuthError::expired());
        }
        Ok(identity) => identity,
        Err(e) => return refused(&e),
    };
    // `notify.v2` when offered (the stream protocol), else `notify.v1`.
    let v2 = offered.iter().any(|p| p == SUBPROTOCOL_V2);
    let since = match query.get("since") {
        None => None,
        Some(_) if v2 => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_since",
                "`since` is notify.v1's: with notify.v2, give `position`",
            );
        }
        Some(s) => match s.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_since",
                    "`since` must be a non-negative integer",
                );
            }
        },
    };
    let position = match query.get("position") {
        None => None,
        Some(_) if !v2 => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_position",
                "`position` is notify.v2's: offer that subprotocol",
            );
        }
        Some(text) => match parse_position(text) {
            Ok(position) => Some(position),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_position",
                    &format!(
                        "`position` must be JSON {{\"inbox\": n, \"groups\": {{group: offset}}}}: {e}"
                    ),
                );
            }
        },
    };
    // Without hyper's upgrade handle (a server without upgrades, HTTP/2, or
    // a layer that rebuilt the request) a 101 would be followed by EOF:
    // refuse before touching the hub.
    if request
        .extensions()
        .get::<hyper::upgrade::OnUpgrade>()
        .is_none()
    {
        tracing::error!("WebSocket request without hyper's upgrade handle; serve with upgrades on");
        return http_kit::ApiError::internal().into_response();
    }
    let hub = &server.inner.hub;
    for group in &identity.groups {
        if let Err(e) = hub.join_group(group, &identity.user_id).await {
            return hub_error(&e);
        }
    }
    let mut session = if v2 {
        match hub
            .subscribe_streams(&identity.user_id, position.as_ref())
            .await
        {
            Ok(subscription) => Session::V2(Box::new(StreamSession {
                acked: position.unwrap_or_default(),
                subscription,
                live: None,
            })),
            Err(e) => return hub_error(&e),
        }
    } else {
        match hub.subscribe(&identity.user_id, since).await {
            Ok(s) => Session::V1(s),
            Err(e) => return hub_error(&e),
        }
    };

    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        );
    if v2 {
        response = response.header(header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL_V2);
    } else if offered.iter().any(|p| p == SUBPROTOCOL_V1) {
        response = response.header(header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL_V1);
    }
    let server = server.clone();
    // The socket outlives this request: it keeps the server's drain waiting
    // and its place under the connection cap until it closes.
    let drain_guard = request.extensions().get::<Shutdown>().map(Shutdown::guard);
    let slot = request.extensions().get::<ConnectionSlot>().cloned();
    let on_upgrade = hyper::upgrade::on(&mut request);
    // Only the expiry outlives the upgrade: the task keeps no more of the
    // identity than it needs, for as long as the socket stays open.
    let expires_at = identity.expires_at;
    drop(identity);
    tokio::spawn(async move {
        let _held = (drain_guard, slot);
        match on_upgrade.await {
            Ok(upgraded) => {
                let config = WebSocketConfig::default()
                    .read_buffer_size(READ_BUFFER)
                    .write_buffer_size(0)
                    .max_message_size(Some(server.inner.config.max_client_message))
                    .max_frame_size(Some(server.inner.config.max_client_message));
                let upgraded = match write_through(&server, upgraded, &mut session) {
                    Ok(io) => {
                        let live = Arc::clone(io.socket());
                        let socket =
                            WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
                        run(&server, socket, session, expires_at, Some(live)).await;
                        return;
                    }
                    Err(upgraded) => upgraded,
                };
                let socket = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                run(&server, socket, session, expires_at, None).await;
            }
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });
    response
        .body(http_kit::full(bytes::Bytes::new()))
        .unwrap_or_else(|_| http_kit::ApiError::internal().into_response())
}

/// Takes the TCP socket out of hyper's upgrade for a `notify.v2` session,
/// and has its subscription write live group items through to it (ADR
/// 0027). The upgrade comes back unchanged when write-through is off, for
/// `notify.v1`, and when hyper served something other than a plain TCP
/// socket.
fn write_through(
    server: &NotifyServer,
    upgraded: hyper::upgrade::Upgraded,
    session: &mut Session,
) -> Result<LiveIo, hyper::upgrade::Upgraded> {
    let Session::V2(v2) = session else {
        return Err(upgraded);
    };
    if !server.inner.config.write_through {
        return Err(upgraded);
    }
    let parts = upgraded.downcast::<TokioIo<TcpStream>>()?;
    let live = LiveSocket::new(parts.io.into_inner(), Arc::clone(&server.inner.metrics));
    let writer: Arc<dyn LiveWriter> = live.clone();
    v2.subscription.write_live_through(Arc::clone(&writer));
    v2.live = Some(writer);
    // What the client sent ahead of the 101 is read first: copied, since
    // even an empty slice of hyper's read buffer keeps all of it (8 KiB,
    // more than an idle connection's whole budget) for the connection's life.
    let unread = bytes::Bytes::copy_from_slice(&parts.read_buf);
    Ok(LiveIo::new(live, unread))
}

fn refused(e: &AuthError) -> Response<Body> {
    tracing::debug!(code = e.code(), "WebSocket token refused");
    error(StatusCode::UNAUTHORIZED, "invalid_token", &report(e))
}

fn hub_error(e: &crate::Error) -> Response<Body> {
    match e {
        crate::Error::InvalidId(_) => error(StatusCode::BAD_REQUEST, "invalid_id", &report(e)),
        _ => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &report(e)),
    }
}

/// Whether the token's `exp` (Unix seconds) has passed by `clock`: JWT's
/// "on or after `exp`, not accepted".
fn expired(exp: i64, clock: &SharedClock) -> bool {
    clock.unix_millis() >= exp.saturating_mul(1000)
}

/// How long until `clock` reaches `exp`, at least zero. `None` when that is
/// too far away to represent as a timer.
fn until(exp: i64, clock: &SharedClock) -> Option<tokio::time::Instant> {
    let left_ms = exp.saturating_mul(1000).saturating_sub(clock.unix_millis());
    tokio::time::Instant::now()
        .checked_add(Duration::from_millis(u64::try_from(left_ms).unwrap_or(0)))
}

/// Sends `message`, giving up after `timeout`. The timer is armed only
/// when the write cannot complete at once (the socket's buffer is full):
/// almost every write completes in its first poll, and a tokio timer armed
/// and dropped per frame showed in the fan-out's profile.
async fn send_bounded<K>(sink: &mut K, message: Message, timeout: Duration) -> bool
where
    K: futures_util::Sink<Message> + Unpin,
{
    let mut sending = std::pin::pin!(sink.send(message));
    let first = std::future::poll_fn(|cx| Poll::Ready(sending.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(result) => result.is_ok(),
        Poll::Pending => matches!(tokio::time::timeout(timeout, sending).await, Ok(Ok(()))),
    }
}

/// [`LiveSocket::tail_waiting`], or never without write-through.
async fn tail_waiting(live: Option<&LiveSocket>) {
    match live {
        Some(live) => live.tail_waiting().await,
        None => std::future::pending().await,
    }
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}

fn error_frame(code: &str, message: &str) -> Message {
    Message::text(
        serde_json::json!({"type": "error", "code": code, "message": message}).to_string(),
    )
}

async fn run<S>(
    server: &NotifyServer,
    socket: WebSocketStream<S>,
    mut session: Session,
    expires_at: Option<i64>,
    live: Option<Arc<LiveSocket>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let config = &server.inner.config;
    let clock = server.inner.hub.config().clock.clone();
    let metrics = Arc::clone(&server.inner.metrics);
    let (mut sink, mut stream) = socket.split();
    // Serialized at once: a `Value` held here would stay in the task's
    // state, on the heap, for as long as the connection lives.
    let welcome = session.welcome();
    // Every write is bounded: a peer that stops reading must not pin the
    // task (and its queue) forever; it is dropped instead.
    let write_timeout = config.write_timeout;
    macro_rules! send {
        ($message:expr) => {
            send_bounded(&mut sink, $message, write_timeout).await
        };
    }
    if !send!(Message::text(welcome)) {
        return;
    }
    let every = config.heartbeat.max(Duration::from_millis(10));
    // The token is checked once, at the upgrade; the connection ends when
    // the hub's clock reaches its `exp`. A timer is set for that moment, and
    // the clock itself decides: when the timer fires (the clock may have
    // been set back, or be a test's manual clock) and at every heartbeat
    // (it may have jumped ahead).
    let token_expired = || expires_at.is_some_and(|exp| expired(exp, &clock));
    // An `exp` too far away to represent never fires the timer.
    let expiry_at = |exp: Option<i64>| exp.and_then(|exp| until(exp, &clock));
    let mut next_ping = tokio::time::Instant::now() + every;
    let mut expiry = expiry_at(expires_at);
    // One timer for both the heartbeat and the expiry, set to whichever
    // comes first: the select below polls its timers every time the task
    // wakes, once per delivery, and two showed in the fan-out's profile.
    let timer = tokio::time::sleep_until(expiry.map_or(next_ping, |at| at.min(next_ping)));
    tokio::pin!(timer);
    let mut missed_pongs = 0u32;
    let mut invalid = 0u32;
    let end: Option<Message> = loop {
        tokio::select! {
            outgoing = session.next() => match outgoing {
                Ok(frame) => {
                    if !send!(Message::text(frame.text)) {
                        break None;
                    }
                    // Live deliveries only: a replay's age is not a latency.
                    metrics.observe_delivery(frame.live_since);
                }
                Err(Closed::Overflow) => break Some(close(close_codes::SLOW_CONSUMER, "slow consumer: resume with since")),
                Err(Closed::ShuttingDown) => break Some(close(close_codes::GOING_AWAY, "server shutting down")),
                Err(Closed::Store(e)) => {
                    tracing::warn!(error = %report(&e), "replay failed");
                    break Some(close(close_codes::INTERNAL, "replay failed: resume with since"));
                }
            },
            message = stream.next() => match message {
                Some(Ok(Message::Text(text))) => match session.client_frame(&text, &server.inner.hub).await {
                    Ok(Reply::Done) => {}
                    Ok(Reply::Refused(code, message)) => {
                        if !send!(error_frame(code, message)) {
                            break None;
                        }
                    }
                    Ok(Reply::Invalid(message)) => {
                        invalid += 1;
                        if invalid > config.max_invalid_frames {
                            break Some(close(close_codes::POLICY, "too many invalid frames"));
                        }
                        if !send!(error_frame("invalid_frame", &message)) {
                            break None;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %report(&e), "resume failed");
                        break Some(close(close_codes::INTERNAL, "replay failed: resume with since"));
                    }
                },
                Some(Ok(Message::Binary(_))) => {
                    invalid += 1;
                    if invalid > config.max_invalid_frames {
                        break Some(close(close_codes::POLICY, "too many invalid frames"));
                    }
                    if !send!(error_frame("invalid_frame", "frames are JSON text")) {
                        break None;
                    }
                }
                Some(Ok(Message::Pong(_))) => missed_pongs = 0,
                Some(Ok(Message::Close(_))) => {
                    // tungstenite queues the close reply; flushing sends it,
                    // so the client sees a clean close, not 1006.
                    let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
                    break None;
                }
                Some(Ok(_)) => {} // pings are answered by tungstenite
                Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(_))) => {
                    break Some(close(close_codes::TOO_BIG, "message too big"));
                }
                Some(Err(_)) | None => break None, // abrupt disconnect
            },
            // A frame written through that the socket took only part of:
            // flushing sends the rest (before anything else is written).
            () = tail_waiting(live.as_deref()) => {
                match tokio::time::timeout(write_timeout, sink.flush()).await {
                    Ok(Ok(())) => {}
                    _ => break None,
                }
            }
            () = &mut timer => {
                let now = tokio::time::Instant::now();
                if expiry.is_some_and(|at| now >= at) {
                    if token_expired() {
                        break Some(close(close_codes::TOKEN_EXPIRED, TOKEN_EXPIRED_REASON));
                    }
                    // The clock is behind the timer: look again when it
                    // should be there (a frozen clock leaves it to the
                    // heartbeat).
                    expiry = expiry_at(expires_at).map(|at| at.max(now + every));
                }
                if now >= next_ping {
                    if token_expired() {
                        break Some(close(close_codes::TOKEN_EXPIRED, TOKEN_EXPIRED_REASON));
                    }
                    if missed_pongs >= config.max_missed_pongs {
                        break Some(close(close_codes::POLICY, "missed pongs"));
                    }
                    missed_pongs += 1;
                    if !send!(Message::Ping(Default::default())) {
                        break None;
                    }
                    // A late heartbeat delays the next rather than
                    // catching up.
                    next_ping = now + every;
                }
                timer.as_mut().reset(expiry.map_or(next_ping, |at| at.min(next_ping)));
            }
        }
    };
    if let Some(frame) = end {
        // Best effort, bounded: a peer that does not read must not hold the task.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = sink.send(frame).await;
            let _ = sink.close().await;
        })
        .await;
    }
}
