//! Helpers shared by the http layers' unit tests.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use parking_lot::Mutex;
use serde_json::json;

use crate::audit::{AuditEntry, AuditSink};

/// An audit sink that keeps every entry, for assertions.
#[derive(Default, Clone)]
pub(super) struct Recorder(pub(super) Arc<Mutex<Vec<AuditEntry>>>);

impl AuditSink for Recorder {
    fn record(&self, entry: AuditEntry) {
        self.0.lock().push(entry);
    }
}

/// An HS256 token (kid `k1`) signed with `secret`, valid for 5 minutes.
pub(super) fn token(secret: &[u8], sub: &str, roles: &[&str]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("k1".into());
    encode(
        &header,
        &json!({"sub": sub, "exp": now + 300, "roles": roles}),
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}
