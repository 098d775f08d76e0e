//! Every kind of bad input: a typed error, a counted rejection, and no change
//! to the state.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use metrics_core::{
    Config, Error, Event, EventRef, Field, ManualClock, MetricsProcessor, RejectReason,
};

fn setup() -> (ManualClock, MetricsProcessor) {
    let clock = ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(1_800_000_000) + Duration::from_millis(400),
    );
    let p = MetricsProcessor::new(
        Config::default()
            .with_clock(clock.clone())
            .with_max_event_types(3),
    );
    (clock, p)
}

fn at(clock: &ManualClock, offset_ms: i64) -> DateTime<Utc> {
    let now = clock.now();
    let t = if offset_ms >= 0 {
        now + Duration::from_millis(offset_ms as u64)
    } else {
        now - Duration::from_millis(offset_ms.unsigned_abs())
    };
    t.into()
}

/// Asserts `event` is rejected with an error matching `check`, counted under
/// `reason`, and that the aggregates did not change.
fn assert_rejected(
    p: &MetricsProcessor,
    event: EventRef<'_>,
    reason: RejectReason,
    check: impl Fn(&Error) -> bool,
) {
    let before = p.summary(60).unwrap();
    let types_before = p.event_types();
    let counted_before = p.stats().rejected(reason);
    let err = p.process(event).expect_err("bad input must be rejected");
    assert!(check(&err), "unexpected error for {event:?}: {err:?}");
    assert_eq!(err.reject_reason(), Some(reason));
    assert!(!err.to_string().is_empty());
    assert_eq!(p.stats().rejected(reason), counted_before + 1);
    assert_eq!(
        p.summary(60).unwrap(),
        before,
        "state changed after {reason}"
    );
    assert_eq!(
        p.event_types(),
        types_before,
        "a rejected event registered a type"
    );
}

#[test]
fn each_bad_input_has_its_error_and_leaves_state_untouched() {
    let (clock, p) = setup();
    let good = EventRef {
        timestamp: at(&clock, -1_000),
        user_id: "u1",
        event_type: "click",
        value: 2.5,
    };
    p.process(good).unwrap();
    let long = "x".repeat(129);

    for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        assert_rejected(
            &p,
            EventRef {
                value,
                event_type: "fresh",
                ..good
            },
            RejectReason::NonFiniteValue,
            |e| matches!(e, Error::NonFiniteValue { .. }),
        );
    }
    assert_rejected(
        &p,
        EventRef {
            event_type: "",
            ..good
        },
        RejectReason::InvalidEventType,
        |e| {
            matches!(
                e,
                Error::EmptyField {
                    field: Field::EventType
                }
            )
        },
    );
    assert_rejected(
        &p,
        EventRef {
            event_type: &long,
            ..good
        },
        RejectReason::InvalidEventType,
        |e| {
            matches!(
                e,
                Error::FieldTooLong {
                    field: Field::EventType,
                    len: 129,
                    max: 128
                }
            )
        },
    );
    assert_rejected(
        &p,
        EventRef {
            user_id: "",
            ..good
        },
        RejectReason::InvalidUserId,
        |e| {
            matches!(
                e,
                Error::EmptyField {
                    field: Field::UserId
                }
            )
        },
    );
    assert_rejected(
        &p,
        EventRef {
            user_id: &long,
            event_type: "fresh",
            ..good
        },
        RejectReason::InvalidUserId,
        |e| {
            matches!(
                e,
                Error::FieldTooLong {
                    field: Field::UserId,
                    ..
                }
            )
        },
    );
    assert_rejected(
        &p,
        EventRef {
            event_type: "total",
            ..good
        },
        RejectReason::ReservedEventType,
        |e| matches!(e, Error::ReservedEventType),
    );
    assert_rejected(
        &p,
        EventRef {
            timestamp: at(&clock, 5_001),
            event_type: "fresh",
            ..good
        },
        RejectReason::TimestampInFuture,
        |e| {
            matches!(
                e,
                Error::TimestampInFuture {
                    max_skew_ms: 5_000,
                    ..
                }
            )
        },
    );
    assert_rejected(
        &p,
        EventRef {
            timestamp: at(&clock, -3_600_400),
            event_type: "fresh",
            ..good
        },
        RejectReason::TimestampTooOld,
        |e| {
            matches!(
                e,
                Error::TimestampTooOld {
                    retention_secs: 3_600,
                    ..
                }
            )
        },
    );
    // Extreme timestamps far outside i64 nanoseconds.
    let far_future = DateTime::<Utc>::from_timestamp(253_402_300_000, 0).unwrap();
    let far_past = DateTime::<Utc>::from_timestamp(-62_000_000_000, 0).unwrap();
    assert_rejected(
        &p,
        EventRef {
            timestamp: far_future,
            ..good
        },
        RejectReason::TimestampInFuture,
        |e| matches!(e, Error::TimestampInFuture { .. }),
    );
    assert_rejected(
        &p,
        EventRef {
            timestamp: far_past,
            ..good
        },
        RejectReason::TimestampTooOld,
        |e| matches!(e, Error::TimestampTooOld { .. }),
    );

    // Fill the type registry (cap 3), then a fourth type is refused.
    p.process(EventRef {
        event_type: "view",
        ..good
    })
    .unwrap();
    p.process(EventRef {
        event_type: "buy",
        ..good
    })
    .unwrap();
    assert_rejected(
        &p,
        EventRef {
            event_type: "fourth",
            ..good
        },
        RejectReason::TooManyEventTypes,
        |e| matches!(e, Error::TooManyEventTypes { max: 3 }),
    );
    // Known types still flow.
    p.process(EventRef {
        event_type: "view",
        ..good
    })
    .unwrap();

    let stats = p.stats();
    assert_eq!(stats.accepted, 4);
    assert_eq!(stats.rejected_total(), 13);
    assert_eq!(stats.rejections().count(), RejectReason::ALL.len());
}

#[test]
fn boundaries_of_skew_and_retention_are_inclusive_where_documented() {
    let (clock, p) = setup();
    let base = EventRef {
        timestamp: at(&clock, 0),
        user_id: "u",
        event_type: "t",
        value: 1.0,
    };
    // Exactly the skew ahead is allowed.
    p.process(EventRef {
        timestamp: at(&clock, 5_000),
        ..base
    })
    .unwrap();
    // The oldest retained second is now - 3599 s (window (now - 3600 s, now]).
    let now_sec = clock.now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let oldest = DateTime::<Utc>::from_timestamp(now_sec - 3_599, 0).unwrap();
    p.process(EventRef {
        timestamp: oldest,
        ..base
    })
    .unwrap();
    let expired = DateTime::<Utc>::from_timestamp(now_sec - 3_600, 999_999_999).unwrap();
    assert!(matches!(
        p.process(EventRef {
            timestamp: expired,
            ..base
        }),
        Err(Error::TimestampTooOld {
            age_secs: 3_600,
            ..
        })
    ));
    // The future event is not in the window yet; the oldest one is.
    assert_eq!(p.aggregates(60).unwrap()["t.count"], 1.0);
    clock.advance(Duration::from_secs(5));
    assert_eq!(
        p.aggregates(60).unwrap()["t.count"],
        1.0,
        "oldest aged out as the future event arrived"
    );
}

#[test]
fn late_events_within_retention_land_in_their_own_second() {
    let (clock, p) = setup();
    let late = at(&clock, -30 * 60_000);
    p.process(EventRef {
        timestamp: late,
        user_id: "u",
        event_type: "t",
        value: 7.0,
    })
    .unwrap();
    let m5 = p.aggregates(5).unwrap();
    assert!(
        !m5.contains_key("t.count"),
        "a 30-minute-old event is outside the 5-minute window"
    );
    assert_eq!(m5["total.count"], 0.0);
    let m31 = p.aggregates(31).unwrap();
    assert_eq!(m31["t.count"], 1.0);
    assert_eq!(m31["t.p99"], 7.0);
}

#[test]
fn invalid_windows_are_rejected() {
    let (_, p) = setup();
    for minutes in [0, 61, u32::MAX] {
        assert!(matches!(
            p.aggregates(minutes),
            Err(Error::InvalidWindow { max: 60, .. })
        ));
    }
    assert!(p.aggregates(1).is_ok());
    assert!(p.aggregates(60).is_ok());
}

#[test]
fn memory_is_bounded_by_the_type_cap_whatever_arrives() {
    let clock = ManualClock::new(SystemTime::now());
    let p = MetricsProcessor::new(
        Config::default()
            .with_clock(clock.clone())
            .with_max_event_types(50),
    );
    let mut refused = 0;
    for i in 0..5_000 {
        let e = Event {
            timestamp: clock.now().into(),
            user_id: "u".into(),
            event_type: format!("type-{i}"),
            value: 1.0,
        };
        if let Err(Error::TooManyEventTypes { .. }) = p.process_event(e) {
            refused += 1;
        }
    }
    assert_eq!(p.event_types(), 50);
    assert_eq!(refused, 4_950);
    let per_type = p.memory_usage().windows_bytes / 50;
    assert!(per_type < 512 * 1024, "{per_type} bytes per type");
}

#[test]
fn json_round_trips_exactly() {
    let json =
        r#"{"timestamp":"2026-11-24T22:00:00Z","user_id":"u1","event_type":"click","value":1.5}"#;
    let e: Event = serde_json::from_str(json).unwrap();
    assert_eq!(serde_json::to_string(&e).unwrap(), json);
    let offset: Event = serde_json::from_str(r#"{"timestamp":"2026-11-24T17:00:00-05:00","user_id":"u1","event_type":"click","value":1.5}"#).unwrap();
    assert_eq!(offset, e);
    for bad in [
        r#"{"timestamp":"yesterday","user_id":"u1","event_type":"click","value":1.5}"#,
        r#"{"timestamp":"2026-11-24T22:00:00Z","user_id":"u1","event_type":"click"}"#,
        r#"{"timestamp":"2026-11-24T22:00:00Z","user_id":"u1","event_type":"click","value":"1.5"}"#,
    ] {
        assert!(serde_json::from_str::<Event>(bad).is_err(), "{bad}");
    }
}
