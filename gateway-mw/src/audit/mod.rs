//! A tamper-evident audit log: every record carries the SHA-256 of the
//! previous one, so editing, inserting, reordering or deleting a record
//! breaks the chain at that point, and [`verify`] says where.
//!
//! A record's hash is `SHA-256(prev_hash ‖ "\n" ‖ canonical JSON of the
//! record without its hash)`; the first record's `prev_hash` is 64 zeros (or
//! the last hash of a previous file, to chain files). Records are one JSON
//! object per line. Deleting records at the *end* of a log cannot be detected
//! from the log alone: anchor the latest hash elsewhere (the gateway exports
//! it and the record count as metrics) and pass it to [`verify`].
//!
//! Records hold who, what, when, where and the outcome, never a secret or a
//! token: [`AuditEntry`] has no field that could carry one by accident.
//!
//! [`AuditLog`] writes the chain off the request path: a bounded queue, a
//! writer thread that seals entries and writes them in batches (a
//! [`FileWriter`] fsyncs once per batch, a [`StdoutWriter`] suits containers),
//! and counters of written and dropped records for metrics.
//!
//! ```
//! use gateway_mw::audit::{AuditChain, AuditEntry, Outcome, verify};
//!
//! let mut chain = AuditChain::new();
//! let lines: Vec<String> = [
//!     AuditEntry::new("auth.login", Outcome::Success).who("alice").request_id("r-1"),
//!     AuditEntry::new("authz.denied", Outcome::Denied).who("bob").route("POST /v1/orders"),
//! ]
//! .into_iter()
//! .map(|e| chain.seal(e).to_json_line())
//! .collect();
//! assert_eq!(verify(lines.iter().map(String::as_str), None).unwrap().records, 2);
//!
//! let tampered = lines[0].replace("alice", "mallory");
//! assert!(verify([tampered.as_str(), lines[1].as_str()], None).is_err());
//! ```

mod log;

pub use log::{
    AuditError, AuditErrorKind, AuditLog, AuditSink, AuditStats, AuditWriter, FileWriter, NoAudit,
    StdoutWriter,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `prev_hash` of the first record of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// How the audited action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It succeeded.
    Success,
    /// Credentials were missing or invalid.
    Failure,
    /// Authorization or a rate limit refused it.
    Denied,
}

/// What happened, before it is sealed into the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    action: String,
    outcome: Outcome,
    who: Option<String>,
    client_ip: Option<String>,
    route: Option<String>,
    request_id: Option<String>,
    reason: Option<String>,
    target: Option<String>,
}

impl AuditEntry {
    /// An entry for `action` (e.g. `auth.login`, `token.refresh`,
    /// `token.reuse_detected`, `ratelimit.denied`, `admin.config_reload`).
    pub fn new(action: impl Into<String>, outcome: Outcome) -> AuditEntry {
        AuditEntry {
            action: action.into(),
            outcome,
            who: None,
            client_ip: None,
            route: None,
            request_id: None,
            reason: None,
            target: None,
        }
    }

    /// The subject (user id, API key id), never the credential itself.
    pub fn who(mut self, who: impl Into<String>) -> Self {
        self.who = Some(who.into());
        self
    }

    /// The client's address as the gateway determined it.
    pub fn client_ip(mut self, ip: impl Into<String>) -> Self {
        self.client_ip = Some(ip.into());
        self
    }

    /// The route template (not the raw path).
    pub fn route(mut self, route: impl Into<String>) -> Self {
        self.route = Some(route.into());
        self
    }

    /// The request id (`X-Request-Id`).
    pub fn request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = Some(id.into());
        self
    }

    /// A short machine-readable reason (e.g. `expired`, `unknown_kid`).
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Whom or what the action acted on (e.g. the user whose sessions an
    /// administrator revoked).
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }
}

/// A sealed record: an entry with its sequence number, time and hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// Position in the chain, from 0.
    pub seq: u64,
    /// RFC 3339 UTC time of sealing.
    pub time: String,
    /// The action.
    pub action: String,
    /// The outcome.
    pub outcome: Outcome,
    /// The subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub who: Option<String>,
    /// The client address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    /// The route template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// The request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whom or what the action acted on. Absent from records without one,
    /// so chains written before this field existed still verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Hash of the previous record (hex).
    pub prev_hash: String,
    /// Hash of this record (hex).
    pub hash: String,
}

impl AuditRecord {
    /// This record as one line of JSON (no trailing newline).
    pub fn to_json_line(&self) -> String {
        // Serializing a struct of strings cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The hash this record should have, given its contents and `prev_hash`.
    fn compute_hash(&self) -> String {
        let mut unsealed = self.clone();
        unsealed.hash = String::new();
        let body = serde_json::to_string(&unsealed).unwrap_or_default();
        let mut hasher = Sha256::new();
        hasher.update(self.prev_hash.as_bytes());
        hasher.update(b"\n");
        hasher.update(body.as_bytes());
        hex::encode(hasher.finalize())
    }
}

/// Seals entries into a chain. Not thread-safe by itself: the audit writer
/// owns one and seals in the order it writes.
#[derive(Debug, Clone)]
pub struct AuditChain {
    next_seq: u64,
    last_hash: String,
}

impl Default for AuditChain {
    fn default() -> Self {
        AuditChain::new()
    }
}

impl AuditChain {
    /// A new chain starting at [`GENESIS`].
    pub fn new() -> AuditChain {
        AuditChain::resume(0, GENESIS.to_owned())
    }

    /// Continues a chain after record `next_seq − 1` whose hash was `last_hash`.
    pub fn resume(next_seq: u64, last_hash: String) -> AuditChain {
        AuditChain {
            next_seq,
            last_hash,
        }
    }

    /// Seals `entry` now.
    pub fn seal(&mut self, entry: AuditEntry) -> AuditRecord {
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        self.seal_at(entry, time)
    }

    /// Seals `entry` with the given RFC 3339 time.
    pub fn seal_at(&mut self, entry: AuditEntry, time: String) -> AuditRecord {
        let mut record = AuditRecord {
            seq: self.next_seq,
            time,
            action: entry.action,
            outcome: entry.outcome,
            who: entry.who,
            client_ip: entry.client_ip,
            route: entry.route,
            request_id: entry.request_id,
            reason: entry.reason,
            target: entry.target,
            prev_hash: self.last_hash.clone(),
            hash: String::new(),
        };
        record.hash = record.compute_hash();
        self.next_seq += 1;
        self.last_hash.clone_from(&record.hash);
        record
    }

    /// The hash of the last sealed record (the anchor to keep elsewhere).
    pub fn last_hash(&self) -> &str {
        &self.last_hash
    }

    /// The sequence number the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

/// Where and how a chain is broken. `line` is 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// The line is not a record.
    #[error("line {line}: not an audit record: {reason}")]
    Malformed {
        /// The line.
        line: usize,
        /// Why.
        reason: String,
    },
    /// The record's contents do not match its hash: it was edited.
    #[error("line {line}: record {seq} was modified (hash mismatch)")]
    Modified {
        /// The line.
        line: usize,
        /// The record's sequence number.
        seq: u64,
    },
    /// The record does not follow the previous one: a record was inserted,
    /// deleted or moved before it.
    #[error("line {line}: chain broken before record {seq} (expected seq {expected_seq})")]
    Broken {
        /// The line.
        line: usize,
        /// The record's sequence number.
        seq: u64,
        /// The sequence number that should be here.
        expected_seq: u64,
    },
    /// The last hash differs from the anchor: records were removed at the end.
    #[error("the log ends at {found}, but the anchor is {anchor}: records were removed at the end")]
    AnchorMismatch {
        /// The log's last hash.
        found: String,
        /// The expected last hash.
        anchor: String,
    },
}

/// A verified chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSummary {
    /// Number of records.
    pub records: u64,
    /// Hash of the last record ([`GENESIS`] when empty).
    pub last_hash: String,
}

/// Verifies a log, one record per line (blank lines ignored), starting from
/// [`GENESIS`]. With `anchor`, the last hash must also equal it.
pub fn verify<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    anchor: Option<&str>,
) -> Result<ChainSummary, ChainError> {
    let mut expected_prev = GENESIS.to_owned();
    let mut expected_seq = 0u64;
    for (index, text) in lines.into_iter().enumerate() {
        let line = index + 1;
        if text.trim().is_empty() {
            continue;
        }
        let record: AuditRecord =
            serde_json::from_str(text).map_err(|e| ChainError::Malformed {
                line,
                reason: e.to_string(),
            })?;
        if record.compute_hash() != record.hash {
            return Err(ChainError::Modified {
                line,
                seq: record.seq,
            });
        }
        if record.prev_hash != expected_prev || record.seq != expected_seq {
            return Err(ChainError::Broken {
                line,
                seq: record.seq,
                expected_seq,
            });
        }
        expected_prev = record.hash;
        expected_seq += 1;
    }
    if let Some(anchor) = anchor
        && anchor != expected_prev
    {
        return Err(ChainError::AnchorMismatch {
            found: expected_prev,
            anchor: anchor.to_owned(),
        });
    }
    Ok(ChainSummary {
        records: expected_seq,
        last_hash: expected_prev,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(n: usize) -> (Vec<String>, String) {
        let mut chain = AuditChain::new();
        let lines = (0..n)
            .map(|i| {
                let entry = AuditEntry::new(
                    "auth.login",
                    if i % 3 == 0 {
                        Outcome::Failure
                    } else {
                        Outcome::Success
                    },
                )
                .who(format!("user-{i}"))
                .client_ip("203.0.113.7")
                .route("POST /auth/token")
                .request_id(format!("req-{i}"));
                chain
                    .seal_at(entry, format!("2026-11-24T22:00:{:02}Z", i % 60))
                    .to_json_line()
            })
            .collect();
        (lines, chain.last_hash().to_owned())
    }

    fn check(lines: &[String], anchor: Option<&str>) -> Result<ChainSummary, ChainError> {
        verify(lines.iter().map(String::as_str), anchor)
    }

    #[test]
    fn an_intact_chain_verifies() {
        let (lines, last) = log(10);
        let summary = check(&lines, Some(&last)).unwrap();
        assert_eq!(summary.records, 10);
        assert_eq!(summary.last_hash, last);
        assert_eq!(check(&[], None).unwrap().last_hash, GENESIS);
    }

    #[test]
    fn an_edit_is_detected_where_it_happened() {
        let (mut lines, _) = log(10);
        lines[4] = lines[4].replace("user-4", "user-x");
        assert_eq!(
            check(&lines, None),
            Err(ChainError::Modified { line: 5, seq: 4 })
        );
        // Re-hashing the edited record does not help: the next link breaks.
        let (mut lines, _) = log(10);
        let mut record: AuditRecord = serde_json::from_str(&lines[4]).unwrap();
        record.outcome = Outcome::Denied;
        record.hash = record.compute_hash();
        lines[4] = record.to_json_line();
        assert!(matches!(
            check(&lines, None),
            Err(ChainError::Broken { line: 6, .. })
        ));
    }

    #[test]
    fn deletion_insertion_and_reordering_are_detected() {
        let (lines, _) = log(10);
        let mut deleted = lines.clone();
        deleted.remove(3);
        assert!(matches!(
            check(&deleted, None),
            Err(ChainError::Broken {
                line: 4,
                seq: 4,
                expected_seq: 3
            })
        ));
        let mut inserted = lines.clone();
        inserted.insert(5, lines[2].clone());
        assert!(matches!(
            check(&inserted, None),
            Err(ChainError::Broken { line: 6, .. })
        ));
        let mut swapped = lines.clone();
        swapped.swap(6, 7);
        assert!(matches!(
            check(&swapped, None),
            Err(ChainError::Broken { line: 7, .. })
        ));
        let mut first_removed = lines.clone();
        first_removed.remove(0);
        assert!(matches!(
            check(&first_removed, None),
            Err(ChainError::Broken { line: 1, .. })
        ));
    }

    #[test]
    fn truncation_is_detected_with_an_anchor() {
        let (lines, last) = log(10);
        assert!(
            check(&lines[..8], None).is_ok(),
            "without an anchor a shorter log looks whole"
        );
        assert!(matches!(
            check(&lines[..8], Some(&last)),
            Err(ChainError::AnchorMismatch { .. })
        ));
    }

    #[test]
    fn garbage_and_unknown_fields_are_malformed() {
        let (mut lines, _) = log(3);
        lines[1] = "not json".into();
        assert!(matches!(
            check(&lines, None),
            Err(ChainError::Malformed { line: 2, .. })
        ));
        let (mut lines, _) = log(3);
        lines[1] = lines[1].replacen('{', r#"{"token":"eyJ...","#, 1);
        assert!(matches!(
            check(&lines, None),
            Err(ChainError::Malformed { line: 2, .. })
        ));
    }

    #[test]
    fn chains_resume_across_files() {
        let (lines, last) = log(5);
        let mut next = AuditChain::resume(5, last.clone());
        let more = next.seal_at(
            AuditEntry::new("admin.reload", Outcome::Success),
            "2026-11-24T23:00:00Z".into(),
        );
        assert_eq!(more.prev_hash, last);
        let mut all = lines.clone();
        all.push(more.to_json_line());
        assert_eq!(check(&all, Some(next.last_hash())).unwrap().records, 6);
    }
}
