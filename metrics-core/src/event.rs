//! The event being aggregated, owned ([`Event`]) and borrowed ([`EventRef`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One observation: a user did something of some type, with a value.
///
/// Serializes exactly as
/// `{"timestamp":"2026-11-24T22:00:00Z","user_id":"u1","event_type":"click","value":1.5}`.
/// The timestamp is RFC 3339; any offset is accepted on input and converted to
/// UTC.
///
/// ```
/// use metrics_core::Event;
///
/// let json = r#"{"timestamp":"2026-11-24T23:00:00+01:00","user_id":"u1","event_type":"click","value":1.5}"#;
/// let event: Event = serde_json::from_str(json).unwrap();
/// assert_eq!(
///     serde_json::to_string(&event).unwrap(),
///     r#"{"timestamp":"2026-11-24T22:00:00Z","user_id":"u1","event_type":"click","value":1.5}"#
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When the event happened.
    pub timestamp: DateTime<Utc>,
    /// Who caused it; counted by `total.unique_users`.
    pub user_id: String,
    /// What kind of event it is; aggregates are grouped by it.
    pub event_type: String,
    /// The measured value (a latency, an amount, or 1 for a plain count).
    pub value: f64,
}

impl Event {
    /// Borrows this event for [`MetricsProcessor::process`](crate::MetricsProcessor::process).
    pub fn as_ref(&self) -> EventRef<'_> {
        EventRef {
            timestamp: self.timestamp,
            user_id: &self.user_id,
            event_type: &self.event_type,
            value: self.value,
        }
    }
}

/// A borrowed event: the allocation-free input of
/// [`MetricsProcessor::process`](crate::MetricsProcessor::process) for callers
/// that already hold the strings (a parsed request buffer, an interned name).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EventRef<'a> {
    /// When the event happened.
    pub timestamp: DateTime<Utc>,
    /// Who caused it.
    pub user_id: &'a str,
    /// What kind of event it is.
    pub event_type: &'a str,
    /// The measured value.
    pub value: f64,
}

impl<'a> From<&'a Event> for EventRef<'a> {
    fn from(e: &'a Event) -> Self {
        e.as_ref()
    }
}

impl EventRef<'_> {
    /// Copies this event into an owned [`Event`].
    pub fn to_owned_event(&self) -> Event {
        Event {
            timestamp: self.timestamp,
            user_id: self.user_id.to_owned(),
            event_type: self.event_type.to_owned(),
            value: self.value,
        }
    }
}
