//! The crate's error type, [`Error`], and the [`ErrorKind`] every error of
//! the crate reports, so a caller decides what to do (retry, fix the input,
//! go to another node) by matching one small enum.
//!
//! Errors keep their cause: a store or broker failure carries the driver's
//! error as its [`source`](std::error::Error::source), and `Display` shows
//! only this level. Print the whole chain when you log or answer a person.

use uuid::Uuid;

use crate::broker::BrokerError;
use crate::notification::InvalidNotification;
use crate::store::StoreError;

/// What kind of failure an error is: the crate-wide classification behind
/// every `kind()` of this crate ([`Error::kind`], [`StoreError::kind`],
/// [`BrokerError::kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The store or the broker could not be reached or refused the
    /// operation. Retrying later may succeed.
    Unavailable,
    /// The store returned data it should not have (a column of an
    /// unexpected type, a negative sequence number, a body that is not a
    /// notification). Retrying will not help; the data or schema needs
    /// attention.
    Corrupt,
    /// The caller's input was refused: a notification over a size limit,
    /// an invalid id, no or too many recipients, a bad `limit`.
    InvalidInput,
    /// A notification with this id is already stored.
    Duplicate,
    /// The hub is shutting down.
    ShutDown,
    /// The API was used in a way it does not support (e.g. a broker
    /// subscribed twice).
    Misuse,
}

/// Why a hub operation failed: the error of [`Hub`](crate::Hub)'s methods.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The store failed; nothing of this send was stored.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker failed at start or in a readiness check.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The notification breaks a size limit (the limit is the source).
    #[error("invalid notification")]
    InvalidNotification(#[from] InvalidNotification),
    /// A user or group id is empty, longer than 128 bytes, or holds control characters.
    #[error("invalid {0} id")]
    InvalidId(&'static str),
    /// `send_to_users` got an empty list.
    #[error("no recipients")]
    NoRecipients,
    /// `send_to_users` got more recipients than the configured maximum, or
    /// the group of `broadcast_to_group` has more members than its maximum.
    #[error("too many recipients (at most {max})")]
    TooManyRecipients {
        /// The configured maximum.
        max: usize,
    },
    /// A `limit` above the configured maximum.
    #[error("limit must be 1 to {max}")]
    InvalidLimit {
        /// The configured maximum.
        max: usize,
    },
    /// A notification with this id is already stored; this send stored
    /// nothing (it is treated as a retry, not delivered twice).
    #[error("a notification with id {0} already exists")]
    DuplicateId(Uuid),
    /// The hub is shutting down.
    #[error("hub is shut down")]
    ShutDown,
}

impl Error {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Store(e) => e.kind(),
            Error::Broker(e) => e.kind(),
            Error::InvalidNotification(_)
            | Error::InvalidId(_)
            | Error::NoRecipients
            | Error::TooManyRecipients { .. }
            | Error::InvalidLimit { .. } => ErrorKind::InvalidInput,
            Error::DuplicateId(_) => ErrorKind::Duplicate,
            Error::ShutDown => ErrorKind::ShutDown,
        }
    }
}

impl StoreError {
    /// [`ErrorKind::Unavailable`] or [`ErrorKind::Corrupt`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Unavailable { .. } => ErrorKind::Unavailable,
            StoreError::Corrupt { .. } => ErrorKind::Corrupt,
        }
    }
}

impl BrokerError {
    /// [`ErrorKind::Unavailable`] when the broker failed,
    /// [`ErrorKind::Misuse`] for a second `subscribe`.
    pub fn kind(&self) -> ErrorKind {
        match self {
            BrokerError::Unavailable { .. } => ErrorKind::Unavailable,
            BrokerError::AlreadySubscribed => ErrorKind::Misuse,
        }
    }
}

/// `e` and its sources, joined with `": "`, for logs and for the
/// human-readable `message` of the server's error answers. A cause whose
/// text the previous level already ends with is not repeated.
pub(crate) fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_classify_every_variant() {
        let unavailable = StoreError::unavailable("append", std::io::Error::other("refused"));
        assert_eq!(Error::from(unavailable).kind(), ErrorKind::Unavailable);
        let corrupt = StoreError::corrupt("history", None);
        assert_eq!(Error::from(corrupt).kind(), ErrorKind::Corrupt);
        assert_eq!(
            Error::from(BrokerError::AlreadySubscribed).kind(),
            ErrorKind::Misuse
        );
        assert_eq!(Error::NoRecipients.kind(), ErrorKind::InvalidInput);
        assert_eq!(
            Error::from(InvalidNotification::Type(128)).kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(Error::DuplicateId(Uuid::nil()).kind(), ErrorKind::Duplicate);
        assert_eq!(Error::ShutDown.kind(), ErrorKind::ShutDown);
    }

    #[test]
    fn the_source_is_kept_and_the_report_shows_the_chain_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("db error")]
        struct Outer(#[source] Inner);
        #[derive(Debug, thiserror::Error)]
        #[error("ERROR: relation \"notify_deliveries\" does not exist")]
        struct Inner;

        let e = Error::from(StoreError::unavailable("append", Outer(Inner)));
        // Display is this level only; the driver's error is the source.
        assert_eq!(e.to_string(), "store unavailable (append)");
        let source = std::error::Error::source(&e).expect("a source");
        assert_eq!(source.to_string(), "db error");
        assert_eq!(
            report(&e),
            "store unavailable (append): db error: ERROR: relation \"notify_deliveries\" does not exist"
        );
        let invalid = Error::from(InvalidNotification::Type(128));
        assert_eq!(
            report(&invalid),
            "invalid notification: `type` must be 1 to 128 bytes"
        );
    }
}
