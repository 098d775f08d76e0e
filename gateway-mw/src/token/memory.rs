//! The in-process refresh-token store.

use std::collections::HashMap;

use parking_lot::Mutex;

use super::{RefreshStore, Rotation, RotationPolicy, StoreError};

#[derive(Debug, Clone)]
struct TokenRecord {
    family: String,
    issued_ms: i64,
    /// `Some((spent_at_ms, successor_hash))` once rotated.
    spent: Option<(i64, String)>,
    grace_used: bool,
}

#[derive(Debug, Clone)]
struct Family {
    subject: String,
    roles: Vec<String>,
    created_ms: i64,
    revoked: bool,
}

#[derive(Debug, Default)]
struct State {
    tokens: HashMap<String, TokenRecord>,
    families: HashMap<String, Family>,
}

/// Refresh-token families in memory, behind one mutex (rotation is atomic by
/// construction). For one instance, tests and development; use `RedisStore`
/// to share sessions between gateway instances.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Drops families past their absolute lifetime and tokens past their
    /// idle lifetime; returns the number of tokens dropped.
    pub fn prune(&self, now_ms: i64, policy: &RotationPolicy) -> usize {
        let mut state = self.state.lock();
        let State { tokens, families } = &mut *state;
        families.retain(|_, f| now_ms <= f.created_ms.saturating_add(policy.absolute_ms));
        let before = tokens.len();
        tokens.retain(|_, t| {
            families.contains_key(&t.family) && now_ms <= t.issued_ms.saturating_add(policy.idle_ms)
        });
        before - tokens.len()
    }
}

fn insert_token(state: &mut State, hash: &str, family: &str, now_ms: i64) {
    state.tokens.insert(
        hash.to_owned(),
        TokenRecord {
            family: family.to_owned(),
            issued_ms: now_ms,
            spent: None,
            grace_used: false,
        },
    );
}

/// Marks the family revoked; its tokens stay (until pruned) so presenting
/// one reports `Revoked` rather than `Invalid`.
fn revoke_family(state: &mut State, family: &str) {
    if let Some(f) = state.families.get_mut(family) {
        f.revoked = true;
    }
}

impl RefreshStore for MemoryStore {
    async fn create(
        &self,
        token_hash: &str,
        family: &str,
        subject: &str,
        roles: &[String],
        now_ms: i64,
        _policy: &RotationPolicy,
    ) -> Result<(), StoreError> {
        let mut state = self.state.lock();
        state.families.insert(
            family.to_owned(),
            Family {
                subject: subject.to_owned(),
                roles: roles.to_vec(),
                created_ms: now_ms,
                revoked: false,
            },
        );
        insert_token(&mut state, token_hash, family, now_ms);
        Ok(())
    }

    async fn rotate(
        &self,
        presented: &str,
        successor: &str,
        now_ms: i64,
        policy: &RotationPolicy,
    ) -> Result<Rotation, StoreError> {
        let mut state = self.state.lock();
        let Some(token) = state.tokens.get(presented).cloned() else {
            return Ok(Rotation::Invalid);
        };
        let Some(family) = state.families.get(&token.family).cloned() else {
            return Ok(Rotation::Invalid);
        };
        if family.revoked {
            return Ok(Rotation::Revoked);
        }
        if now_ms > family.created_ms.saturating_add(policy.absolute_ms) {
            revoke_family(&mut state, &token.family);
            return Ok(Rotation::Expired);
        }
        if now_ms > token.issued_ms.saturating_add(policy.idle_ms) {
            return Ok(Rotation::Expired);
        }
        let rotated = |in_grace| Rotation::Rotated {
            subject: family.subject.clone(),
            roles: family.roles.clone(),
            in_grace,
        };
        match &token.spent {
            None => {
                if let Some(t) = state.tokens.get_mut(presented) {
                    t.spent = Some((now_ms, successor.to_owned()));
                }
                insert_token(&mut state, successor, &token.family, now_ms);
                Ok(rotated(false))
            }
            Some((spent_ms, next)) => {
                let next_unused = state.tokens.get(next).is_some_and(|t| t.spent.is_none());
                if next_unused && !token.grace_used && now_ms - spent_ms < policy.grace_ms {
                    if let Some(t) = state.tokens.get_mut(presented) {
                        t.grace_used = true;
                    }
                    insert_token(&mut state, successor, &token.family, now_ms);
                    return Ok(rotated(true));
                }
                revoke_family(&mut state, &token.family);
                Ok(Rotation::ReuseDetected {
                    subject: family.subject,
                })
            }
        }
    }

    async fn revoke(&self, presented: &str) -> Result<bool, StoreError> {
        let mut state = self.state.lock();
        let Some(family) = state.tokens.get(presented).map(|t| t.family.clone()) else {
            return Ok(false);
        };
        revoke_family(&mut state, &family);
        Ok(true)
    }

    async fn revoke_subject(&self, subject: &str) -> Result<usize, StoreError> {
        let mut state = self.state.lock();
        let mut revoked = 0;
        for family in state.families.values_mut() {
            if family.subject == subject && !family.revoked {
                family.revoked = true;
                revoked += 1;
            }
        }
        Ok(revoked)
    }
}
