//! Durable storage of notifications, per-user sequence numbers and group
//! membership, behind the [`Store`] trait.
//!
//! The hub calls [`Store::append`] from one writer task with a batch of sends
//! (group commit): a store writes the whole batch in one transaction and
//! assigns each recipient the next number of their own sequence.

mod memory;
#[cfg(feature = "postgres")]
mod postgres;

pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::PgStore;

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::notification::{Delivery, Notification};

/// A boxed, `Send` future, so the traits stay object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Who a send goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// These users (deduplicated by the hub).
    Users(Vec<String>),
    /// The members of this group at the moment the batch commits.
    Group(String),
}

/// One send in a batch.
#[derive(Debug, Clone)]
pub struct Append {
    /// The recipients.
    pub audience: Audience,
    /// The stamped notification (with `id` and `timestamp`).
    pub notification: Arc<Notification>,
    /// The most recipients a group send may have; a larger group stores
    /// nothing ([`Appended::TooManyRecipients`]). Checked only when
    /// `fan_out` is set.
    pub max_recipients: usize,
    /// For a group send: also write v1's per-member copy (a seq in each
    /// member's sequence, and its delivery row). Without it, a group send
    /// writes its stream item only, whatever the group's size (ADR 0026).
    pub fan_out: bool,
}

/// A recipient of one send and the sequence number it got.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Recipient {
    /// The user.
    pub user_id: String,
    /// Their new sequence number.
    pub seq: u64,
}

/// What a store did with one send of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Stored for these recipients, with their new sequence numbers.
    Stored(Vec<Recipient>),
    /// A group send, stored: its item in the group's stream got `offset`,
    /// and v1's per-member copies went to `recipients` (the members whose
    /// interval covers that offset).
    Broadcast {
        /// The members, with their new sequence numbers; empty when the
        /// send was not fanned out ([`Append::fan_out`]).
        recipients: Vec<Recipient>,
        /// The item's offset in the group's stream.
        offset: u64,
        /// How many members the group had.
        members: usize,
    },
    /// A notification with this send's `id` is already stored: nothing was
    /// written for it (a retried send is not delivered twice). The rest of
    /// the batch is unaffected.
    DuplicateId,
    /// The group has more members than [`Append::max_recipients`]: nothing
    /// was written for this send.
    TooManyRecipients,
}

/// One item of a group's stream (ADR 0026): a broadcast, or the record of a
/// member leaving, at the group's own offset. Offsets start at 1 and have
/// no holes.
#[derive(Debug, Clone)]
pub struct GroupItem {
    /// The item's offset in its group's stream.
    pub offset: u64,
    /// What it is.
    pub entry: GroupEntry,
}

/// What a [`GroupItem`] holds.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum GroupEntry {
    /// A broadcast to the group.
    Notification(Arc<Notification>),
    /// `user_id` left the group here: their interval ends with this record,
    /// so the last notification they see is before it.
    Left {
        /// Who left.
        user_id: String,
    },
}

/// One entry of a user's history across their streams
/// ([`Store::stream_history`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum HistoryItem {
    /// A direct send, at its seq in the user's sequence.
    Inbox(Delivery),
    /// A group send, at its offset in the group's stream.
    Group {
        /// The group.
        group: String,
        /// Its offset in the group's stream.
        offset: u64,
        /// The notification.
        notification: Arc<Notification>,
    },
}

impl HistoryItem {
    /// The notification.
    pub fn notification(&self) -> &Arc<Notification> {
        match self {
            HistoryItem::Inbox(d) => &d.notification,
            HistoryItem::Group { notification, .. } => notification,
        }
    }
}

/// A user's membership of a group as an interval of the group's offsets:
/// they see the items with `joined_after < offset`, up to `left_after`
/// inclusive once they have left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// The group.
    pub group: String,
    /// The group's offset when the user joined.
    pub joined_after: u64,
    /// The offset of the leave record, `None` while a member.
    pub left_after: Option<u64>,
    /// The group stream's head when this was read, in the same snapshot as
    /// the membership (a leave after it has a larger offset).
    pub head: u64,
}

/// The cause of a [`StoreError`]: the driver's error, shared so the error
/// stays `Clone` (one failed batch answers every sender in it).
pub type StoreErrorSource = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// A storage failure. `Display` names the operation; the driver's error
/// (e.g. tokio-postgres', with PostgreSQL's message below it) is the
/// [`source`](std::error::Error::source). Its `kind()` is
/// [`ErrorKind::Unavailable`](crate::ErrorKind::Unavailable) or
/// [`ErrorKind::Corrupt`](crate::ErrorKind::Corrupt).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be reached or refused the operation
    /// ([`ErrorKind::Unavailable`](crate::ErrorKind::Unavailable)).
    Unavailable {
        /// What the store was doing, e.g. `append` or `history`.
        operation: Cow<'static, str>,
        /// The driver's error, when there is one.
        source: Option<StoreErrorSource>,
    },
    /// The store returned something it should not have
    /// ([`ErrorKind::Corrupt`](crate::ErrorKind::Corrupt)).
    Corrupt {
        /// What was wrong, e.g. `notify_deliveries.seq is negative`.
        what: Cow<'static, str>,
        /// The decoding error, when there is one.
        source: Option<StoreErrorSource>,
    },
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Unavailable { operation, .. } => {
                write!(f, "store unavailable ({operation})")
            }
            StoreError::Corrupt { what, .. } => write!(f, "store data error ({what})"),
        }
    }
}

// By hand rather than derived: the source is the error inside the `Arc`
// (so callers can downcast it to the driver's type), not the `Arc` itself.
impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        let (StoreError::Unavailable { source, .. } | StoreError::Corrupt { source, .. }) = self;
        source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl StoreError {
    /// An [`Unavailable`](StoreError::Unavailable) error during `operation`, caused by `source`.
    pub fn unavailable(
        operation: impl Into<Cow<'static, str>>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> StoreError {
        StoreError::Unavailable {
            operation: operation.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// A [`Corrupt`](StoreError::Corrupt) error: `what` was wrong, with its
    /// decoding error if there is one.
    pub fn corrupt(
        what: impl Into<Cow<'static, str>>,
        source: Option<StoreErrorSource>,
    ) -> StoreError {
        StoreError::Corrupt {
            what: what.into(),
            source,
        }
    }
}

/// Durable notification storage.
///
/// Implementations must make [`append`](Store::append) atomic: either every
/// send of the batch is stored with its sequence numbers, or none is.
pub trait Store: Send + Sync + 'static {
    /// Stores a batch and returns, for each send in order, its recipients
    /// with their new sequence numbers, or [`Appended::DuplicateId`].
    fn append<'a>(
        &'a self,
        batch: &'a [Append],
    ) -> BoxFuture<'a, Result<Vec<Appended>, StoreError>>;

    /// The newest `limit` deliveries of `user`, newest first.
    fn history<'a>(
        &'a self,
        user: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, StoreError>>;

    /// Up to `limit` deliveries of `user` with `seq > after`, oldest first.
    fn since<'a>(
        &'a self,
        user: &'a str,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, StoreError>>;

    /// The user's latest sequence number (0 if they have none).
    fn last_seq<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Adds `user` to `group`. A new member joins at the group stream's
    /// head: the answer is `Some(joined_after)`, that head (they see the
    /// broadcasts after it); `None` if they were a member already.
    fn join_group<'a>(
        &'a self,
        group: &'a str,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>>;

    /// Removes `user` from `group`. The leave is recorded in the group's
    /// stream (a [`GroupEntry::Left`] item) and the membership kept as a
    /// closed interval: the answer is `Some(left_after)`, the record's
    /// offset; `None` if they were not a member.
    fn leave_group<'a>(
        &'a self,
        group: &'a str,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>>;

    /// The head (last offset) of each group's stream, in the order asked;
    /// 0 for a group with no stream yet.
    fn group_heads<'a>(
        &'a self,
        groups: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<u64>, StoreError>>;

    /// Up to `limit` items of `group`'s stream with `offset > after`,
    /// oldest first. A store that trims old items (the memory store keeps
    /// its retention per group) starts at the oldest it kept: a first offset
    /// above `after + 1` means the items between are gone.
    fn group_since<'a>(
        &'a self,
        group: &'a str,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<GroupItem>, StoreError>>;

    /// Every membership of `user`, current and past, by group and then
    /// by `joined_after`, each with its group stream's head, all read at one
    /// moment.
    fn memberships<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Membership>, StoreError>>;

    /// The newest `limit` notifications of `user` across their streams:
    /// direct sends (not v1's copies of group sends) and each group's sends
    /// inside the user's membership intervals, newest first by notification
    /// id (UUIDv7: time order).
    fn stream_history<'a>(
        &'a self,
        user: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<HistoryItem>, StoreError>>;

    /// Checks that the store answers (for readiness probes).
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}

impl<S: Store + ?Sized> Store for Arc<S> {
    fn append<'a>(
        &'a self,
        batch: &'a [Append],
    ) -> BoxFuture<'a, Result<Vec<Appended>, StoreError>> {
        (**self).append(batch)
    }
    fn history<'a>(
        &'a self,
        user: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, StoreError>> {
        (**self).history(user, limit)
    }
    fn since<'a>(
        &'a self,
        user: &'a str,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, StoreError>> {
        (**self).since(user, after, limit)
    }
    fn last_seq<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        (**self).last_seq(user)
    }
    fn join_group<'a>(
        &'a self,
        group: &'a str,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        (**self).join_group(group, user)
    }
    fn leave_group<'a>(
        &'a self,
        group: &'a str,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        (**self).leave_group(group, user)
    }
    fn group_heads<'a>(
        &'a self,
        groups: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<u64>, StoreError>> {
        (**self).group_heads(groups)
    }
    fn group_since<'a>(
        &'a self,
        group: &'a str,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<GroupItem>, StoreError>> {
        (**self).group_since(group, after, limit)
    }
    fn memberships<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Membership>, StoreError>> {
        (**self).memberships(user)
    }
    fn stream_history<'a>(
        &'a self,
        user: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<HistoryItem>, StoreError>> {
        (**self).stream_history(user, limit)
    }
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        (**self).ping()
    }
}
