//! Refresh-token families in Redis (feature `redis`).
//!
//! Keys (under the configured prefix):
//! - `rt:{hash}`: a hash `family`, `issued`, and once spent `spent`, `next`,
//!   `grace`; expires at the idle lifetime.
//! - `fam:{family}`: a hash `sub`, `roles` (JSON), `created`, `revoked`;
//!   expires at the absolute lifetime.
//! - `subfam:{subject}`: a set of the subject's family ids, for
//!   `revoke_subject`; expires with the newest family.
//!
//! `rotate` and `revoke` are single Lua scripts, so two gateways rotating the
//! same token at the same instant are serialized by Redis: exactly one sees
//! it active. The scripts derive the family key from the token record, so
//! they target a standalone or replicated Redis, not Cluster.

use fred::prelude::Client;
use fred::types::scripts::Script;

use super::{RefreshStore, Rotation, RotationPolicy, StoreError};

/// ARGV: prefix, presented hash, successor hash, now, absolute, idle, grace (ms).
const ROTATE_LUA: &str = r#"
local prefix, presented, successor = ARGV[1], ARGV[2], ARGV[3]
local now, absolute, idle, grace = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local tkey = prefix .. 'rt:' .. presented
local family = redis.call('HGET', tkey, 'family')
if not family then return {'invalid'} end
local fkey = prefix .. 'fam:' .. family
local f = redis.call('HMGET', fkey, 'sub', 'roles', 'created', 'revoked')
if not f[1] then return {'invalid'} end
if f[4] == '1' then return {'revoked'} end
if now > tonumber(f[3]) + absolute then
  redis.call('HSET', fkey, 'revoked', '1')
  return {'expired'}
end
local t = redis.call('HMGET', tkey, 'issued', 'spent', 'next', 'grace')
if now > tonumber(t[1]) + idle then return {'expired'} end
local function mint()
  local nkey = prefix .. 'rt:' .. successor
  redis.call('HSET', nkey, 'family', family, 'issued', now)
  redis.call('PEXPIRE', nkey, idle)
end
if not t[2] then
  redis.call('HSET', tkey, 'spent', now, 'next', successor)
  mint()
  return {'rotated', f[1], f[2], '0'}
end
local next_spent = redis.call('HEXISTS', prefix .. 'rt:' .. t[3], 'spent')
if next_spent == 0 and redis.call('EXISTS', prefix .. 'rt:' .. t[3]) == 1
   and t[4] ~= '1' and now - tonumber(t[2]) < grace then
  redis.call('HSET', tkey, 'grace', '1')
  mint()
  return {'rotated', f[1], f[2], '1'}
end
redis.call('HSET', fkey, 'revoked', '1')
return {'reuse', f[1]}
"#;

/// ARGV: prefix, token hash, family, subject, roles (JSON), now, absolute, idle.
const CREATE_LUA: &str = r#"
local fkey = ARGV[1] .. 'fam:' .. ARGV[3]
local tkey = ARGV[1] .. 'rt:' .. ARGV[2]
redis.call('HSET', fkey, 'sub', ARGV[4], 'roles', ARGV[5], 'created', ARGV[6], 'revoked', '0')
redis.call('PEXPIRE', fkey, ARGV[7])
redis.call('HSET', tkey, 'family', ARGV[3], 'issued', ARGV[6])
redis.call('PEXPIRE', tkey, ARGV[8])
-- The subject's families, for revoking all its sessions at once.
local skey = ARGV[1] .. 'subfam:' .. ARGV[4]
redis.call('SADD', skey, ARGV[3])
redis.call('PEXPIRE', skey, ARGV[7])
return 1
"#;

const REVOKE_SUBJECT_LUA: &str = r#"
local skey = ARGV[1] .. 'subfam:' .. ARGV[2]
local revoked = 0
for _, family in ipairs(redis.call('SMEMBERS', skey)) do
  local fkey = ARGV[1] .. 'fam:' .. family
  local state = redis.call('HGET', fkey, 'revoked')
  if state == '0' then
    redis.call('HSET', fkey, 'revoked', '1')
    revoked = revoked + 1
  end
end
redis.call('DEL', skey)
return revoked
"#;

/// ARGV: prefix, presented hash. Returns 1 if a family was revoked.
const REVOKE_LUA: &str = r#"
local family = redis.call('HGET', ARGV[1] .. 'rt:' .. ARGV[2], 'family')
if not family then return 0 end
redis.call('HSET', ARGV[1] .. 'fam:' .. family, 'revoked', '1')
return 1
"#;

/// Refresh-token families in Redis.
pub struct RedisStore {
    client: Client,
    prefix: String,
    create: Script,
    rotate: Script,
    revoke: Script,
    revoke_subject: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store writing under `prefix` (e.g. `gw:tokens:`).
    pub fn new(client: Client, prefix: impl Into<String>) -> RedisStore {
        RedisStore {
            client,
            prefix: prefix.into(),
            create: Script::from_lua(CREATE_LUA),
            rotate: Script::from_lua(ROTATE_LUA),
            revoke: Script::from_lua(REVOKE_LUA),
            revoke_subject: Script::from_lua(REVOKE_SUBJECT_LUA),
        }
    }
}

fn store_error(e: fred::error::Error) -> StoreError {
    StoreError::Redis(e)
}

impl RefreshStore for RedisStore {
    async fn create(
        &self,
        token_hash: &str,
        family: &str,
        subject: &str,
        roles: &[String],
        now_ms: i64,
        policy: &RotationPolicy,
    ) -> Result<(), StoreError> {
        let roles = serde_json::to_string(roles).map_err(StoreError::Encoding)?;
        let args = vec![
            self.prefix.clone(),
            token_hash.to_owned(),
            family.to_owned(),
            subject.to_owned(),
            roles,
            now_ms.to_string(),
            policy.absolute_ms.to_string(),
            policy.idle_ms.to_string(),
        ];
        let _: i64 = self
            .create
            .evalsha_with_reload(&self.client, Vec::<String>::new(), args)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    async fn rotate(
        &self,
        presented: &str,
        successor: &str,
        now_ms: i64,
        policy: &RotationPolicy,
    ) -> Result<Rotation, StoreError> {
        let args = vec![
            self.prefix.clone(),
            presented.to_owned(),
            successor.to_owned(),
            now_ms.to_string(),
            policy.absolute_ms.to_string(),
            policy.idle_ms.to_string(),
            policy.grace_ms.to_string(),
        ];
        let reply: Vec<String> = self
            .rotate
            .evalsha_with_reload(&self.client, Vec::<String>::new(), args)
            .await
            .map_err(store_error)?;
        let bad = || StoreError::UnexpectedReply(format!("rotate: {reply:?}"));
        Ok(match reply.first().map(String::as_str) {
            Some("rotated") => {
                let [_, subject, roles, grace] = reply.as_slice() else {
                    return Err(bad());
                };
                let roles: Vec<String> = serde_json::from_str(roles).map_err(|_| bad())?;
                Rotation::Rotated {
                    subject: subject.clone(),
                    roles,
                    in_grace: grace == "1",
                }
            }
            Some("invalid") => Rotation::Invalid,
            Some("expired") => Rotation::Expired,
            Some("revoked") => Rotation::Revoked,
            Some("reuse") => Rotation::ReuseDetected {
                subject: reply.get(1).cloned().unwrap_or_default(),
            },
            _ => return Err(bad()),
        })
    }

    async fn revoke(&self, presented: &str) -> Result<bool, StoreError> {
        Ok(self.run_prefixed(&self.revoke, presented).await? == 1)
    }

    async fn revoke_subject(&self, subject: &str) -> Result<usize, StoreError> {
        let revoked = self.run_prefixed(&self.revoke_subject, subject).await?;
        Ok(usize::try_from(revoked).unwrap_or(0))
    }
}

impl RedisStore {
    /// Runs a script whose arguments are the key prefix and one value.
    async fn run_prefixed(&self, script: &Script, arg: &str) -> Result<i64, StoreError> {
        script
            .evalsha_with_reload(
                &self.client,
                Vec::<String>::new(),
                vec![self.prefix.clone(), arg.to_owned()],
            )
            .await
            .map_err(store_error)
    }
}
