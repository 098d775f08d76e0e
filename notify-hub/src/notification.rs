//! The notification payload, the per-user delivery record, and their checks.

use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// A notification as senders submit it and clients receive it.
///
/// It serializes as
/// `{"id":"…","type":"order.shipped","title":"…","message":"…","data":{…},"timestamp":"2026-11-24T22:00:00Z"}`;
/// `data` is omitted when empty. The hub assigns `id` (a time-ordered
/// UUIDv7) and `timestamp` when the sender leaves them out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notification {
    /// Unique id; assigned by the hub when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    /// What happened, e.g. `order.shipped`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short headline.
    pub title: String,
    /// The body text.
    pub message: String,
    /// Free-form structured data; omitted from JSON when empty.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub data: Map<String, Value>,
    /// When it was created; assigned by the hub when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<DateTime<Utc>>,
}

impl Notification {
    /// A notification with no data, id or timestamp yet.
    pub fn new(
        kind: impl Into<String>,
        title: impl Into<String>,
        message: impl Into<String>,
    ) -> Notification {
        Notification {
            id: None,
            kind: kind.into(),
            title: title.into(),
            message: message.into(),
            data: Map::new(),
            timestamp: None,
        }
    }

    /// Adds one `data` entry.
    pub fn with_data(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.data.insert(key.into(), value.into());
        self
    }

    /// Checks the sizes against `limits`.
    pub fn validate(&self, limits: &Limits) -> Result<(), InvalidNotification> {
        if self.kind.is_empty() || self.kind.len() > limits.max_type_bytes {
            return Err(InvalidNotification::Type(limits.max_type_bytes));
        }
        if self.title.len() > limits.max_title_bytes {
            return Err(InvalidNotification::Title(limits.max_title_bytes));
        }
        if self.message.len() > limits.max_message_bytes {
            return Err(InvalidNotification::Message(limits.max_message_bytes));
        }
        if !self.data.is_empty() {
            let size = serde_json::to_vec(&self.data).map_or(usize::MAX, |v| v.len());
            if size > limits.max_data_bytes {
                return Err(InvalidNotification::Data(limits.max_data_bytes));
            }
        }
        Ok(())
    }

    /// Fills in `id` (a UUIDv7 of `now`) and `timestamp` (`now`) if the
    /// sender left them out. `now` comes from the hub's clock.
    pub(crate) fn stamp(&mut self, now: SystemTime) {
        if self.id.is_none() {
            self.id = Some(uuid_v7_at(now));
        }
        if self.timestamp.is_none() {
            self.timestamp = Some(DateTime::<Utc>::from(now));
        }
    }
}

/// Size limits on a [`Notification`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Limits {
    /// Longest `type`, in bytes. Default 128.
    pub max_type_bytes: usize,
    /// Longest `title`, in bytes. Default 1,024.
    pub max_title_bytes: usize,
    /// Longest `message`, in bytes. Default 16 KiB.
    pub max_message_bytes: usize,
    /// Largest `data`, as serialized JSON. Default 64 KiB.
    pub max_data_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_type_bytes: 128,
            max_title_bytes: 1024,
            max_message_bytes: 16 * 1024,
            max_data_bytes: 64 * 1024,
        }
    }
}

/// Why a notification was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidNotification {
    /// `type` is empty or too long.
    #[error("`type` must be 1 to {0} bytes")]
    Type(usize),
    /// `title` is too long.
    #[error("`title` must be at most {0} bytes")]
    Title(usize),
    /// `message` is too long.
    #[error("`message` must be at most {0} bytes")]
    Message(usize),
    /// `data` is too large.
    #[error("`data` must be at most {0} bytes of JSON")]
    Data(usize),
}

/// One notification in one user's stream, with its per-user sequence number.
#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    /// The user's sequence number: strictly increasing, gap-free per user.
    pub seq: u64,
    /// The notification (shared between the recipients of one send).
    pub notification: Arc<Notification>,
    /// The notification's JSON, serialized once per send for live delivery.
    #[serde(skip)]
    json: Option<Arc<str>>,
    /// Whether it arrived live (from the broker) rather than from the store.
    #[serde(skip)]
    live: bool,
    /// Whether it is a member's copy of a group broadcast (ADR 0026).
    #[serde(skip)]
    via_group: bool,
}

impl PartialEq for Delivery {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq && self.notification == other.notification
    }
}

impl Delivery {
    /// A delivery of `notification` as the user's `seq`-th.
    pub fn new(seq: u64, notification: Arc<Notification>) -> Delivery {
        Delivery {
            seq,
            notification,
            json: None,
            live: false,
            via_group: false,
        }
    }

    /// Marks it as a member's copy of a group broadcast.
    pub(crate) fn via_group(mut self, via_group: bool) -> Delivery {
        self.via_group = via_group;
        self
    }

    /// A delivery that arrived live, with the notification's JSON shared by
    /// every recipient of the send.
    pub(crate) fn live(
        seq: u64,
        notification: Arc<Notification>,
        json: Option<Arc<str>>,
    ) -> Delivery {
        Delivery {
            seq,
            notification,
            json,
            live: true,
            via_group: false,
        }
    }

    /// `true` if it came live from a send just committed, `false` if it was
    /// read back from the store (a replay after `since` or a gap).
    pub fn is_live(&self) -> bool {
        self.live
    }

    /// `true` for a member's copy of a group broadcast (a client reading
    /// the group's stream gets the broadcast there), `false` for a direct
    /// send or a delivery written before group streams existed.
    pub fn is_via_group(&self) -> bool {
        self.via_group
    }

    /// The notification as JSON. Live deliveries carry it serialized once
    /// for all recipients of a send; others serialize it here.
    pub fn notification_json(&self) -> std::borrow::Cow<'_, str> {
        match &self.json {
            Some(json) => std::borrow::Cow::Borrowed(json),
            None => std::borrow::Cow::Owned(
                serde_json::to_string(&*self.notification).unwrap_or_default(),
            ),
        }
    }
}

/// One counter for every id this process generates, so ids made within the
/// same millisecond still sort in the order they were made.
static V7_CONTEXT: parking_lot::Mutex<uuid::ContextV7> =
    parking_lot::Mutex::new(uuid::ContextV7::new());

/// A UUIDv7 whose time part is `now` (the hub's clock, not the system's).
fn uuid_v7_at(now: SystemTime) -> Uuid {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let context = V7_CONTEXT.lock();
    Uuid::new_v7(uuid::Timestamp::from_unix(
        &*context,
        since_epoch.as_secs(),
        since_epoch.subsec_nanos(),
    ))
}

/// Checks a user or group id: 1 to 128 bytes, no control characters.
pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && !id.chars().any(char::is_control)
}

/// One live group item's rendering for the wire, shared by every
/// subscription the item reached on this node: the first connection that
/// needs it renders it, the others reuse it. A group's item is the same for
/// every member (group, offset, notification), so a WebSocket server
/// formats a broadcast's frame once instead of once per connection.
#[derive(Clone, Default)]
pub struct SharedRender(Arc<OnceLock<Arc<str>>>);

impl SharedRender {
    /// The rendering, made by `render` if no subscription has made it yet.
    /// Every caller of one item must render the same text.
    pub fn get_or_render(&self, render: impl FnOnce() -> String) -> Arc<str> {
        Arc::clone(self.0.get_or_init(|| Arc::from(render())))
    }
}

impl std::fmt::Debug for SharedRender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRender")
            .field("rendered", &self.0.get().is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_exactly_as_specified() {
        let mut n = Notification::new("order.shipped", "Shipped", "Your order is on its way")
            .with_data("order_id", 42);
        n.id = Some(Uuid::parse_str("0190c1a2-7b3c-7d4e-8f00-0123456789ab").unwrap());
        n.timestamp = Some("2026-11-24T22:00:00Z".parse().unwrap());
        assert_eq!(
            serde_json::to_string(&n).unwrap(),
            r#"{"id":"0190c1a2-7b3c-7d4e-8f00-0123456789ab","type":"order.shipped","title":"Shipped","message":"Your order is on its way","data":{"order_id":42},"timestamp":"2026-11-24T22:00:00Z"}"#
        );
        n.data.clear();
        let json = serde_json::to_string(&n).unwrap();
        assert!(!json.contains("data"), "{json}");
        let back: Notification = serde_json::from_str(&json).unwrap();
        assert_eq!(back, n);
    }

    #[test]
    fn reads_any_offset_and_missing_optional_fields() {
        let n: Notification = serde_json::from_str(
            r#"{"type":"t","title":"a","message":"b","timestamp":"2026-11-24T23:00:00+01:00"}"#,
        )
        .unwrap();
        assert_eq!(
            n.timestamp.unwrap().to_rfc3339(),
            "2026-11-24T22:00:00+00:00"
        );
        assert!(n.id.is_none() && n.data.is_empty());
        assert!(
            serde_json::from_str::<Notification>(r#"{"type":"t","title":"a","message":"b","x":1}"#)
                .is_err()
        );
    }

    #[test]
    fn stamp_fills_only_missing_fields_from_the_given_time() {
        let now = UNIX_EPOCH + std::time::Duration::from_millis(1_800_000_000_123);
        let mut n = Notification::new("t", "a", "b");
        n.stamp(now);
        let (id, ts) = (n.id, n.timestamp);
        assert_eq!(ts.unwrap().to_rfc3339(), "2027-01-15T08:00:00.123+00:00");
        let (secs, nanos) = id.unwrap().get_timestamp().unwrap().to_unix();
        assert_eq!((secs, nanos / 1_000_000), (1_800_000_000, 123));
        n.stamp(now + std::time::Duration::from_secs(5));
        assert_eq!((n.id, n.timestamp), (id, ts));
        // Ids made in the same millisecond still sort in order.
        let a = uuid_v7_at(now);
        let b = uuid_v7_at(now);
        assert!(a < b);
    }

    #[test]
    fn limits_are_enforced() {
        let limits = Limits::default();
        assert!(Notification::new("t", "a", "b").validate(&limits).is_ok());
        assert_eq!(
            Notification::new("", "a", "b").validate(&limits),
            Err(InvalidNotification::Type(128))
        );
        assert!(matches!(
            Notification::new("t", "a", "x".repeat(16 * 1024 + 1)).validate(&limits),
            Err(InvalidNotification::Message(_))
        ));
        assert!(matches!(
            Notification::new("t", "a", "b")
                .with_data("k", "v".repeat(70_000))
                .validate(&limits),
            Err(InvalidNotification::Data(_))
        ));
        assert!(
            valid_id("u1") && !valid_id("") && !valid_id("a\nb") && !valid_id(&"x".repeat(129))
        );
    }
}
