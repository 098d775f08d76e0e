//! Tenants, plans and events, and the rules an event must pass before it
//! is written.

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

/// A tenant's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TenantId(pub i64);

impl std::fmt::Display for TenantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A tenant's plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Plan {
    /// The free tier.
    Free,
    /// Paying.
    Pro,
    /// The largest tenants.
    Enterprise,
}

impl Plan {
    /// Every plan.
    pub const ALL: [Plan; 3] = [Plan::Free, Plan::Pro, Plan::Enterprise];

    /// Its stored name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Plan::Free => "free",
            Plan::Pro => "pro",
            Plan::Enterprise => "enterprise",
        }
    }
}

impl std::str::FromStr for Plan {
    type Err = UnknownPlan;

    fn from_str(s: &str) -> Result<Plan, UnknownPlan> {
        match s {
            "free" => Ok(Plan::Free),
            "pro" => Ok(Plan::Pro),
            "enterprise" => Ok(Plan::Enterprise),
            _ => Err(UnknownPlan(s.to_owned())),
        }
    }
}

/// A plan name that is not `free`, `pro` or `enterprise`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown plan {0:?} (expected free, pro or enterprise)")]
pub struct UnknownPlan(pub String);

/// A tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    /// Its id.
    pub id: TenantId,
    /// Its display name.
    pub name: String,
    /// Its plan.
    pub plan: Plan,
}

/// An event as submitted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Whose event.
    pub tenant_id: TenantId,
    /// When it happened (UTC).
    pub created_at: DateTime<Utc>,
    /// What happened (1–64 bytes).
    pub event_type: String,
    /// How long it took to process, in milliseconds (finite, ≥ 0, at most
    /// [`EventRules::max_processing_time_ms`]). Stored in whole
    /// microseconds, rounded to the nearest.
    pub processing_time_ms: f64,
}

/// An event that passed the rules, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidEvent {
    /// Whose event.
    pub tenant_id: TenantId,
    /// When it happened.
    pub created_at: DateTime<Utc>,
    /// What happened.
    pub event_type: String,
    /// Processing time in whole microseconds.
    pub processing_time_us: i64,
}

impl ValidEvent {
    /// The UTC day it counts towards in the rollup.
    pub fn day(&self) -> NaiveDate {
        self.created_at.date_naive()
    }
}

/// Why an event was rejected. Each has a stable code
/// ([`RejectReason::code`]) for the HTTP API.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RejectReason {
    /// No such tenant.
    #[error("unknown tenant {0}")]
    UnknownTenant(TenantId),
    /// The processing time is below zero.
    #[error("negative processing time {0} ms")]
    NegativeProcessingTime(f64),
    /// The processing time is NaN or infinite.
    #[error("processing time is not a finite number")]
    NonFiniteProcessingTime,
    /// The processing time is above the cap.
    #[error("processing time {0} ms is above the cap of {1} ms")]
    ProcessingTimeTooLarge(f64, f64),
    /// The timestamp is further in the future than the allowed skew.
    #[error("created_at {0} is more than {1} s in the future")]
    TooFarInFuture(DateTime<Utc>, i64),
    /// The timestamp is before the archived horizon: its month is in cold
    /// storage.
    #[error("created_at {0} is before the archived horizon {1}")]
    BeforeArchivedHorizon(DateTime<Utc>, DateTime<Utc>),
    /// The event type is empty, too long or has control characters.
    #[error("invalid event_type: {0}")]
    InvalidEventType(String),
    /// The row could not be read at all (bad JSON, a missing field).
    #[error("malformed row: {0}")]
    Malformed(String),
}

impl RejectReason {
    /// The stable code (`unknown_tenant`, `negative_processing_time`, …).
    pub const fn code(&self) -> &'static str {
        match self {
            RejectReason::UnknownTenant(_) => "unknown_tenant",
            RejectReason::NegativeProcessingTime(_) => "negative_processing_time",
            RejectReason::NonFiniteProcessingTime => "non_finite_processing_time",
            RejectReason::ProcessingTimeTooLarge(..) => "processing_time_too_large",
            RejectReason::TooFarInFuture(..) => "too_far_in_future",
            RejectReason::BeforeArchivedHorizon(..) => "before_archived_horizon",
            RejectReason::InvalidEventType(_) => "invalid_event_type",
            RejectReason::Malformed(_) => "malformed_row",
        }
    }

    /// Every code [`RejectReason::code`] returns.
    pub const CODES: [&'static str; 8] = [
        "unknown_tenant",
        "negative_processing_time",
        "non_finite_processing_time",
        "processing_time_too_large",
        "too_far_in_future",
        "before_archived_horizon",
        "invalid_event_type",
        "malformed_row",
    ];

    /// The code spelled `name`, as the `&'static str` [`RejectReason::code`]
    /// returns; `None` if no reason has that code. Codes are stored as text
    /// with a batch (to answer its replays), and read back through this.
    pub fn code_named(name: &str) -> Option<&'static str> {
        RejectReason::CODES.into_iter().find(|code| *code == name)
    }
}

/// What an event must satisfy (besides its tenant existing).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct EventRules {
    /// How far in the future a timestamp may be. Default 5 minutes.
    pub max_future_skew: TimeDelta,
    /// Events before this instant are refused: their months are archived.
    /// Default none.
    pub archived_before: Option<DateTime<Utc>>,
    /// The largest processing time accepted, in ms. Default one hour.
    pub max_processing_time_ms: f64,
    /// The longest event type, in bytes. Default 64.
    pub max_event_type_len: usize,
}

impl Default for EventRules {
    fn default() -> EventRules {
        EventRules {
            max_future_skew: TimeDelta::minutes(5),
            archived_before: None,
            max_processing_time_ms: 3_600_000.0,
            max_event_type_len: 64,
        }
    }
}

impl EventRules {
    /// Sets [`EventRules::archived_before`].
    pub fn with_archived_before(mut self, horizon: Option<DateTime<Utc>>) -> EventRules {
        self.archived_before = horizon;
        self
    }

    /// Sets [`EventRules::max_future_skew`].
    pub fn with_max_future_skew(mut self, skew: TimeDelta) -> EventRules {
        self.max_future_skew = skew;
        self
    }

    /// Checks `event` at time `now`, without its tenant (the store knows
    /// the tenants).
    pub fn check(&self, event: &Event, now: DateTime<Utc>) -> Result<ValidEvent, RejectReason> {
        let ms = event.processing_time_ms;
        if !ms.is_finite() {
            return Err(RejectReason::NonFiniteProcessingTime);
        }
        if ms < 0.0 {
            return Err(RejectReason::NegativeProcessingTime(ms));
        }
        if ms > self.max_processing_time_ms {
            return Err(RejectReason::ProcessingTimeTooLarge(
                ms,
                self.max_processing_time_ms,
            ));
        }
        if event.created_at > now + self.max_future_skew {
            return Err(RejectReason::TooFarInFuture(
                event.created_at,
                self.max_future_skew.num_seconds(),
            ));
        }
        if let Some(horizon) = self.archived_before
            && event.created_at < horizon
        {
            return Err(RejectReason::BeforeArchivedHorizon(
                event.created_at,
                horizon,
            ));
        }
        let kind = &event.event_type;
        if kind.is_empty() || kind.len() > self.max_event_type_len {
            return Err(RejectReason::InvalidEventType(format!(
                "must be 1 to {} bytes, got {}",
                self.max_event_type_len,
                kind.len()
            )));
        }
        if kind.chars().any(char::is_control) {
            return Err(RejectReason::InvalidEventType(
                "control characters are not allowed".into(),
            ));
        }
        Ok(ValidEvent {
            tenant_id: event.tenant_id,
            created_at: event.created_at,
            event_type: kind.clone(),
            // Finite, ≥ 0 and capped: the product fits an i64.
            processing_time_us: (ms * 1000.0).round() as i64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ms: f64, at: DateTime<Utc>) -> Event {
        Event {
            tenant_id: TenantId(1),
            created_at: at,
            event_type: "login".into(),
            processing_time_ms: ms,
        }
    }

    #[test]
    fn each_rule_refuses_with_its_own_reason() {
        let now = Utc::now();
        let rules = EventRules::default().with_archived_before(Some(now - TimeDelta::days(730)));
        let code = |e: &Event| rules.check(e, now).map(|_| ()).map_err(|r| r.code());
        assert_eq!(code(&event(-1.0, now)), Err("negative_processing_time"));
        assert_eq!(
            code(&event(f64::NAN, now)),
            Err("non_finite_processing_time")
        );
        assert_eq!(
            code(&event(f64::INFINITY, now)),
            Err("non_finite_processing_time")
        );
        assert_eq!(code(&event(4e6, now)), Err("processing_time_too_large"));
        assert_eq!(
            code(&event(1.0, now + TimeDelta::minutes(6))),
            Err("too_far_in_future")
        );
        assert_eq!(
            code(&event(1.0, now - TimeDelta::days(731))),
            Err("before_archived_horizon")
        );
        let mut bad = event(1.0, now);
        bad.event_type = String::new();
        assert_eq!(code(&bad), Err("invalid_event_type"));
        bad.event_type = "a\nb".into();
        assert_eq!(code(&bad), Err("invalid_event_type"));
        assert_eq!(code(&event(1.5, now)), Ok(()));
    }

    #[test]
    fn every_code_is_listed_and_found_by_name() {
        let now = Utc::now();
        let reasons = [
            RejectReason::UnknownTenant(TenantId(1)),
            RejectReason::NegativeProcessingTime(-1.0),
            RejectReason::NonFiniteProcessingTime,
            RejectReason::ProcessingTimeTooLarge(2.0, 1.0),
            RejectReason::TooFarInFuture(now, 300),
            RejectReason::BeforeArchivedHorizon(now, now),
            RejectReason::InvalidEventType(String::new()),
            RejectReason::Malformed(String::new()),
        ];
        let codes: Vec<&str> = reasons.iter().map(RejectReason::code).collect();
        assert_eq!(codes, RejectReason::CODES);
        for code in codes {
            assert_eq!(RejectReason::code_named(code), Some(code));
        }
        assert_eq!(RejectReason::code_named("no_such_code"), None);
    }

    #[test]
    fn processing_time_is_kept_in_whole_microseconds() {
        let now = Utc::now();
        let valid = EventRules::default()
            .check(&event(12.3456, now), now)
            .unwrap();
        assert_eq!(valid.processing_time_us, 12_346);
    }
}
