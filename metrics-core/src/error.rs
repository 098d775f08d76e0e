//! Error types: every rejection is a variant a caller can match on.

use std::path::PathBuf;

/// Why an event was rejected. Each reason has its own counter in
/// [`Stats`](crate::Stats) and a stable snake_case name ([`RejectReason::as_str`])
/// used in HTTP responses and Prometheus labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum RejectReason {
    /// `value` was NaN or infinite.
    NonFiniteValue,
    /// `event_type` was empty or longer than the configured limit.
    InvalidEventType,
    /// `user_id` was empty or longer than the configured limit.
    InvalidUserId,
    /// `event_type` was the reserved name `total`.
    ReservedEventType,
    /// The timestamp was further in the future than the allowed clock skew.
    TimestampInFuture,
    /// The timestamp was older than the retention.
    TimestampTooOld,
    /// A new event type arrived while `max_event_types` types were registered.
    TooManyEventTypes,
    /// The processor was shut down.
    ShutDown,
}

impl RejectReason {
    /// Every reason, in declaration order.
    pub const ALL: [RejectReason; 8] = [
        RejectReason::NonFiniteValue,
        RejectReason::InvalidEventType,
        RejectReason::InvalidUserId,
        RejectReason::ReservedEventType,
        RejectReason::TimestampInFuture,
        RejectReason::TimestampTooOld,
        RejectReason::TooManyEventTypes,
        RejectReason::ShutDown,
    ];

    /// A stable snake_case name, e.g. `"timestamp_too_old"`.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::NonFiniteValue => "non_finite_value",
            RejectReason::InvalidEventType => "invalid_event_type",
            RejectReason::InvalidUserId => "invalid_user_id",
            RejectReason::ReservedEventType => "reserved_event_type",
            RejectReason::TimestampInFuture => "timestamp_in_future",
            RejectReason::TimestampTooOld => "timestamp_too_old",
            RejectReason::TooManyEventTypes => "too_many_event_types",
            RejectReason::ShutDown => "shut_down",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which text field of an event was invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `event_type`
    EventType,
    /// `user_id`
    UserId,
}

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Field::EventType => "event_type",
            Field::UserId => "user_id",
        })
    }
}

/// Errors returned by [`MetricsProcessor`](crate::MetricsProcessor).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The event's value was NaN or infinite.
    #[error("value must be finite, got {value}")]
    NonFiniteValue {
        /// The offending value.
        value: f64,
    },
    /// A text field was empty.
    #[error("{field} must not be empty")]
    EmptyField {
        /// The empty field.
        field: Field,
    },
    /// A text field was longer than allowed.
    #[error("{field} is {len} bytes; at most {max} are allowed")]
    FieldTooLong {
        /// The long field.
        field: Field,
        /// Its length in bytes.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// `total` is reserved for the cross-type aggregates.
    #[error("event_type \"total\" is reserved for the cross-type aggregates")]
    ReservedEventType,
    /// The timestamp is further ahead of the clock than the allowed skew.
    #[error(
        "timestamp is {ahead_ms} ms in the future; at most {max_skew_ms} ms of clock skew is allowed"
    )]
    TimestampInFuture {
        /// How far ahead of the processor's clock the event was.
        ahead_ms: u64,
        /// The configured skew.
        max_skew_ms: u64,
    },
    /// The timestamp is outside the retention.
    #[error("timestamp is {age_secs} s old; the retention is {retention_secs} s")]
    TimestampTooOld {
        /// Age of the event's second relative to the clock's second.
        age_secs: u64,
        /// The configured retention.
        retention_secs: u64,
    },
    /// The event introduced a new type while the registry was full.
    #[error("event type limit reached: {max} types are registered")]
    TooManyEventTypes {
        /// The configured `max_event_types`.
        max: usize,
    },
    /// The processor was shut down; it accepts no more events.
    #[error("the processor has been shut down")]
    ShutDown,
    /// `aggregates` was asked for a window outside `1..=max`.
    #[error("window must be 1..={max} minutes, got {minutes}")]
    InvalidWindow {
        /// The requested window.
        minutes: u32,
        /// The retention in minutes.
        max: u32,
    },
    /// `shutdown` could not drain in-flight calls and write the snapshot in time.
    #[error("shutdown did not complete within {timeout_ms} ms ({stage})")]
    ShutdownTimedOut {
        /// The timeout given to `shutdown`.
        timeout_ms: u64,
        /// What was still running.
        stage: &'static str,
    },
    /// Reading or writing the snapshot failed. The cause is the
    /// [`source`](std::error::Error::source), a [`SnapshotError`].
    #[error("snapshot {path} could not be used ({kind})", kind = .source.kind())]
    Snapshot {
        /// The snapshot file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: SnapshotError,
    },
}

/// What kind of failure an [`Error`] is: a stable, `Copy` value to match on
/// without binding the variants' fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// `process`/`process_event` refused the event, for this reason.
    Rejected(RejectReason),
    /// `aggregates`/`summary` was asked for a window outside the retention.
    InvalidWindow,
    /// `shutdown` did not finish within its timeout.
    ShutdownTimedOut,
    /// Reading, writing or decoding the snapshot failed.
    Snapshot(SnapshotErrorKind),
}

impl Error {
    /// What kind of failure this is.
    ///
    /// ```
    /// use metrics_core::{Config, ErrorKind, MetricsProcessor};
    ///
    /// let p = MetricsProcessor::new(Config::default());
    /// assert_eq!(p.aggregates(0).unwrap_err().kind(), ErrorKind::InvalidWindow);
    /// ```
    pub fn kind(&self) -> ErrorKind {
        let reason = match self {
            Error::NonFiniteValue { .. } => RejectReason::NonFiniteValue,
            Error::EmptyField {
                field: Field::EventType,
            }
            | Error::FieldTooLong {
                field: Field::EventType,
                ..
            } => RejectReason::InvalidEventType,
            Error::EmptyField {
                field: Field::UserId,
            }
            | Error::FieldTooLong {
                field: Field::UserId,
                ..
            } => RejectReason::InvalidUserId,
            Error::ReservedEventType => RejectReason::ReservedEventType,
            Error::TimestampInFuture { .. } => RejectReason::TimestampInFuture,
            Error::TimestampTooOld { .. } => RejectReason::TimestampTooOld,
            Error::TooManyEventTypes { .. } => RejectReason::TooManyEventTypes,
            Error::ShutDown => RejectReason::ShutDown,
            Error::InvalidWindow { .. } => return ErrorKind::InvalidWindow,
            Error::ShutdownTimedOut { .. } => return ErrorKind::ShutdownTimedOut,
            Error::Snapshot { source, .. } => return ErrorKind::Snapshot(source.kind()),
        };
        ErrorKind::Rejected(reason)
    }

    /// The rejection reason for errors returned by `process`/`process_event`;
    /// `None` for errors of other operations.
    pub fn reject_reason(&self) -> Option<RejectReason> {
        match self.kind() {
            ErrorKind::Rejected(reason) => Some(reason),
            _ => None,
        }
    }
}

/// What was wrong with a snapshot file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The file could not be read or written; the `io::Error` is the source.
    #[error("snapshot I/O failed")]
    Io(#[from] std::io::Error),
    /// The file does not start with the snapshot magic: it is not a snapshot.
    #[error("not a metrics_core snapshot (bad magic)")]
    NotASnapshot,
    /// The snapshot was written by an unsupported format version.
    #[error("unsupported snapshot format version {found} (this build reads {supported})")]
    UnsupportedVersion {
        /// The file's version.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The file is truncated, its checksum does not match, or its content is
    /// inconsistent: it is corrupt.
    #[error("snapshot is corrupt: {detail}")]
    Corrupt {
        /// What was found wrong (a description, not a cause).
        detail: String,
        /// The decoder's error, when decoding failed.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },
    /// The snapshot is valid but was taken with a configuration this processor
    /// cannot load (e.g. more event types than `max_event_types`).
    #[error("snapshot is incompatible with the configuration: {detail}")]
    Incompatible {
        /// Which setting differs, and how.
        detail: String,
    },
}

/// What kind of failure a [`SnapshotError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SnapshotErrorKind {
    /// [`SnapshotError::Io`].
    Io,
    /// [`SnapshotError::NotASnapshot`].
    NotASnapshot,
    /// [`SnapshotError::UnsupportedVersion`].
    UnsupportedVersion,
    /// [`SnapshotError::Corrupt`].
    Corrupt,
    /// [`SnapshotError::Incompatible`].
    Incompatible,
}

impl std::fmt::Display for SnapshotErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SnapshotErrorKind::Io => "I/O error",
            SnapshotErrorKind::NotASnapshot => "not a snapshot",
            SnapshotErrorKind::UnsupportedVersion => "unsupported version",
            SnapshotErrorKind::Corrupt => "corrupt",
            SnapshotErrorKind::Incompatible => "incompatible",
        })
    }
}

impl SnapshotError {
    /// What kind of failure this is.
    pub fn kind(&self) -> SnapshotErrorKind {
        match self {
            SnapshotError::Io(_) => SnapshotErrorKind::Io,
            SnapshotError::NotASnapshot => SnapshotErrorKind::NotASnapshot,
            SnapshotError::UnsupportedVersion { .. } => SnapshotErrorKind::UnsupportedVersion,
            SnapshotError::Corrupt { .. } => SnapshotErrorKind::Corrupt,
            SnapshotError::Incompatible { .. } => SnapshotErrorKind::Incompatible,
        }
    }

    /// A corrupt file, described by `detail`, with no underlying error.
    pub(crate) fn corrupt(detail: impl Into<String>) -> SnapshotError {
        SnapshotError::Corrupt {
            detail: detail.into(),
            source: None,
        }
    }

    /// An incompatible file, described by `detail`.
    pub(crate) fn incompatible(detail: impl Into<String>) -> SnapshotError {
        SnapshotError::Incompatible {
            detail: detail.into(),
        }
    }
}
