//! What a WebSocket connection speaks: protocol `notify.v1` (one sequence
//! per user) or `notify.v2` (an inbox and a stream per group, ADR 0026).
//! The connection loop in `ws` is the same for both; a [`Session`] turns
//! the subscription's output into frames and the client's frames into
//! acks and resumes. docs/notify-hub/PROTOCOL.md describes both.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use tokio_tungstenite::tungstenite::{Bytes, Utf8Bytes};

use crate::Hub;
use crate::live::LiveWriter;
use crate::notification::Notification;
use crate::subscription::{Closed, Position, StreamEvent, StreamSubscription, Subscription};

/// The subprotocol of the one-sequence protocol.
pub(crate) const SUBPROTOCOL_V1: &str = "notify.v1";

/// The subprotocol of the stream protocol.
pub(crate) const SUBPROTOCOL_V2: &str = "notify.v2";

/// A frame for the client, and the notification's timestamp when it was
/// delivered live (for the latency metric).
pub(crate) struct Outgoing {
    pub(crate) text: Utf8Bytes,
    pub(crate) live_since: Option<chrono::DateTime<chrono::Utc>>,
}

/// What a client frame asks for, once handled.
pub(crate) enum Reply {
    /// Done; nothing to answer.
    Done,
    /// Answer with an `error` frame of this code and message (the frame was
    /// understood but refused, e.g. an ack beyond what was delivered).
    Refused(&'static str, &'static str),
    /// Not a frame of this protocol: counts towards the invalid-frame limit.
    Invalid(String),
}

/// A position as the client writes it: `{"inbox": n, "groups": {g: k}}`,
/// both optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PositionFrame {
    #[serde(default)]
    inbox: u64,
    #[serde(default)]
    groups: BTreeMap<String, u64>,
}

impl From<PositionFrame> for Position {
    fn from(p: PositionFrame) -> Position {
        Position {
            inbox: p.inbox,
            groups: p.groups,
        }
    }
}

/// Parses a position (the `position` query parameter of a v2 connect).
pub(crate) fn parse_position(text: &str) -> Result<Position, serde_json::Error> {
    serde_json::from_str::<PositionFrame>(text).map(Position::from)
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ClientFrameV1 {
    Ack { seq: u64 },
    Resume { since: u64 },
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ClientFrameV2 {
    Ack { position: PositionFrame },
    Resume { position: PositionFrame },
}

/// One connection's subscription, in the protocol it negotiated.
pub(crate) enum Session {
    V1(Subscription),
    /// Boxed: the session lives in every connection's task for the
    /// connection's life, and a v1 connection should not carry the size of
    /// a v2 one.
    V2(Box<StreamSession>),
}

/// A `notify.v2` connection's subscription and what its client acked.
pub(crate) struct StreamSession {
    pub(crate) subscription: StreamSubscription,
    pub(crate) acked: Position,
    /// The connection's write-through (ADR 0027), given to every
    /// subscription the session makes.
    pub(crate) live: Option<Arc<dyn LiveWriter>>,
}

fn position_json(p: &Position) -> serde_json::Value {
    serde_json::json!({"inbox": p.inbox, "groups": p.groups})
}

fn json_of<'a>(notification: &Notification, json: Option<&'a Arc<str>>) -> Cow<'a, str> {
    match json {
        Some(json) => Cow::Borrowed(json),
        None => Cow::Owned(serde_json::to_string(notification).unwrap_or_default()),
    }
}

impl Session {
    /// The first frame: who the connection is for and where it starts.
    pub(crate) fn welcome(&self) -> String {
        match self {
            Session::V1(s) => serde_json::json!({
                "type": "welcome",
                "user_id": s.user_id(),
                "last_seq": s.latest_at_start(),
            })
            .to_string(),
            Session::V2(v2) => serde_json::json!({
                "type": "welcome",
                "user_id": v2.subscription.user_id(),
                "protocol": SUBPROTOCOL_V2,
                "position": position_json(&v2.subscription.position()),
            })
            .to_string(),
        }
    }

    /// The next frame to send.
    pub(crate) async fn next(&mut self) -> Result<Outgoing, Closed> {
        match self {
            Session::V1(s) => {
                let d = s.next().await?;
                Ok(Outgoing {
                    text: notification_frame(d.seq, &d.notification_json()).into(),
                    live_since: d.notification.timestamp.filter(|_| d.is_live()),
                })
            }
            Session::V2(v2) => {
                let event = v2.subscription.next().await?;
                Ok(match event {
                    StreamEvent::Inbox(d) => Outgoing {
                        text: format!(
                            r#"{{"type":"notification","stream":"inbox","seq":{},"notification":{}}}"#,
                            d.seq,
                            d.notification_json()
                        )
                        .into(),
                        live_since: d.notification.timestamp.filter(|_| d.is_live()),
                    },
                    StreamEvent::Group {
                        group,
                        offset,
                        notification,
                        json,
                        rendered,
                    } => {
                        let render = || group_frame(&group, offset, &json_of(&notification, json.as_ref()));
                        Outgoing {
                            // A live item's frame is the same for every
                            // member: rendered by the first connection,
                            // shared by the rest.
                            text: match &rendered {
                                Some(shared) => shared_text(shared.get_or_render(render)),
                                None => render().into(),
                            },
                            live_since: notification.timestamp.filter(|_| json.is_some()),
                        }
                    }
                    StreamEvent::Joined {
                        group,
                        joined_after,
                    } => Outgoing {
                        text: serde_json::json!({
                            "type": "joined", "group": &*group, "joined_after": joined_after,
                        })
                        .to_string()
                        .into(),
                        live_since: None,
                    },
                    StreamEvent::Left { group, left_after } => Outgoing {
                        text: serde_json::json!({
                            "type": "left", "group": &*group, "left_after": left_after,
                        })
                        .to_string()
                        .into(),
                        live_since: None,
                    },
                })
            }
        }
    }

    /// Handles a text frame from the client.
    pub(crate) async fn client_frame(&mut self, text: &str, hub: &Hub) -> Result<Reply, Closed> {
        match self {
            Session::V1(s) => match serde_json::from_str::<ClientFrameV1>(text) {
                Ok(ClientFrameV1::Ack { seq }) => Ok(if s.ack(seq) {
                    Reply::Done
                } else {
                    Reply::Refused("invalid_ack", "ack beyond the last delivered seq")
                }),
                Ok(ClientFrameV1::Resume { since }) => {
                    s.resume(since).await?;
                    Ok(Reply::Done)
                }
                Err(e) => Ok(Reply::Invalid(e.to_string())),
            },
            Session::V2(v2) => match serde_json::from_str::<ClientFrameV2>(text) {
                Ok(ClientFrameV2::Ack { position }) => {
                    let delivered = v2.subscription.position();
                    let within = position.inbox <= delivered.inbox
                        && position
                            .groups
                            .iter()
                            .all(|(g, k)| delivered.groups.get(g).is_some_and(|d| k <= d));
                    if !within {
                        return Ok(Reply::Refused(
                            "invalid_ack",
                            "ack beyond what was delivered, or of a group not read",
                        ));
                    }
                    v2.acked.inbox = v2.acked.inbox.max(position.inbox);
                    for (g, k) in position.groups {
                        let at = v2.acked.groups.entry(g).or_default();
                        *at = (*at).max(k);
                    }
                    Ok(Reply::Done)
                }
                Ok(ClientFrameV2::Resume { position }) => {
                    let position = Position::from(position);
                    v2.subscription = hub
                        .subscribe_streams(v2.subscription.user_id(), Some(&position))
                        .await
                        .map_err(|e| match e {
                            crate::Error::Store(e) => Closed::Store(e),
                            _ => Closed::ShuttingDown,
                        })?;
                    if let Some(live) = &v2.live {
                        v2.subscription.write_live_through(Arc::clone(live));
                    }
                    v2.acked = position;
                    Ok(Reply::Done)
                }
                Err(e) => Ok(Reply::Invalid(e.to_string())),
            },
        }
    }
}

/// `{"type":"notification","stream":"group","group":…,"offset":…,"notification":…}`,
/// written into one allocation of the right size.
pub(crate) fn group_frame(group: &str, offset: u64, notification_json: &str) -> String {
    use std::fmt::Write as _;
    const HEAD: &str = r#"{"type":"notification","stream":"group","group":"#;
    const OFFSET: &str = r#","offset":"#;
    const MIDDLE: &str = r#","notification":"#;
    // The group escaped as a JSON string; 20 digits: the longest u64.
    let group_json = serde_json::to_string(group).unwrap_or_else(|_| "\"\"".to_owned());
    let mut frame = String::with_capacity(
        HEAD.len()
            + group_json.len()
            + OFFSET.len()
            + 20
            + MIDDLE.len()
            + notification_json.len()
            + 1,
    );
    frame.push_str(HEAD);
    frame.push_str(&group_json);
    frame.push_str(OFFSET);
    let _ = write!(frame, "{offset}"); // Writing to a String cannot fail.
    frame.push_str(MIDDLE);
    frame.push_str(notification_json);
    frame.push('}');
    frame
}

/// A shared rendering as a frame's text, without copying it.
fn shared_text(text: Arc<str>) -> Utf8Bytes {
    /// The owner `Bytes` keeps alive: the shared text.
    struct Owner(Arc<str>);
    impl AsRef<[u8]> for Owner {
        fn as_ref(&self) -> &[u8] {
            self.0.as_bytes()
        }
    }
    // Valid UTF-8 by construction (a `str`); the check cannot fail, and a
    // copy is the answer if it ever did.
    Utf8Bytes::try_from(Bytes::from_owner(Owner(Arc::clone(&text))))
        .unwrap_or_else(|_| Utf8Bytes::from(text.to_string()))
}

/// `{"type":"notification","seq":…,"notification":…}`, written into one
/// allocation of the right size (`format!` grew its string two or three
/// times per frame).
fn notification_frame(seq: u64, notification_json: &str) -> String {
    use std::fmt::Write as _;
    const HEAD: &str = r#"{"type":"notification","seq":"#;
    const MIDDLE: &str = r#","notification":"#;
    // 20 digits: the longest u64.
    let mut frame =
        String::with_capacity(HEAD.len() + 20 + MIDDLE.len() + notification_json.len() + 1);
    frame.push_str(HEAD);
    let _ = write!(frame, "{seq}"); // Writing to a String cannot fail.
    frame.push_str(MIDDLE);
    frame.push_str(notification_json);
    frame.push('}');
    frame
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SharedRender;

    #[test]
    fn a_group_frame_is_the_protocols_json_whatever_the_group_name() {
        for group in ["team", "a\"b", "tab\there", "ünï", "back\\slash", ""] {
            let frame = group_frame(group, 42, r#"{"title":"t"}"#);
            let parsed: serde_json::Value = serde_json::from_str(&frame).unwrap();
            assert_eq!(
                parsed,
                serde_json::json!({
                    "type": "notification", "stream": "group", "group": group,
                    "offset": 42, "notification": {"title": "t"},
                }),
                "{frame}"
            );
        }
    }

    #[test]
    fn a_shared_rendering_is_made_once_and_sent_without_a_copy() {
        let shared = SharedRender::default();
        let mut made = 0;
        let first = shared.get_or_render(|| {
            made += 1;
            group_frame("g", 1, "{}")
        });
        let second = shared.get_or_render(|| {
            made += 1;
            String::from("never used")
        });
        assert_eq!(made, 1);
        assert!(Arc::ptr_eq(&first, &second));
        let text = shared_text(Arc::clone(&first));
        assert_eq!(text.as_str(), &*first);
        assert_eq!(
            text.as_str().as_ptr(),
            first.as_ptr(),
            "the frame's text is the shared rendering itself"
        );
    }
}
