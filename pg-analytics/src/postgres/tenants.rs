//! Tenants: registering them, and the writer's cache of known ids.

use std::collections::HashSet;

use parking_lot::RwLock;
use pg_kit::Prepared;
use tokio_postgres::types::Type;

use super::{Analytics, AnalyticsError};
use crate::model::{Plan, Tenant, TenantId};

/// The ids of tenants known to exist. Tenants are never deleted, so an id
/// once seen stays valid; an id not in the cache is looked up before its
/// events are refused.
#[derive(Debug, Default)]
pub(super) struct TenantCache {
    known: RwLock<HashSet<i64>>,
}

impl TenantCache {
    /// The ids among `ids` that are not known to exist, after asking the
    /// database about the ones the cache does not hold.
    pub(super) async fn unknown(
        &self,
        store: &Analytics,
        ids: &HashSet<i64>,
    ) -> Result<HashSet<i64>, AnalyticsError> {
        let missing: Vec<i64> = {
            let known = self.known.read();
            ids.iter()
                .filter(|id| !known.contains(id))
                .copied()
                .collect()
        };
        if missing.is_empty() {
            return Ok(HashSet::new());
        }
        let conn = store.pool.get().await.map_err(AnalyticsError::from_pool)?;
        let found: HashSet<i64> = conn
            .query_prepared(
                "SELECT id FROM analytics.tenants WHERE id = ANY($1)",
                &[(&missing, Type::INT8_ARRAY)],
            )
            .await
            .map_err(AnalyticsError::from_query)?
            .iter()
            .map(|row| row.get(0))
            .collect();
        self.known.write().extend(found.iter().copied());
        Ok(missing
            .into_iter()
            .filter(|id| !found.contains(id))
            .collect())
    }
}

impl Analytics {
    /// Registers `tenant`, or updates its name and plan.
    pub async fn upsert_tenant(&self, tenant: &Tenant) -> Result<(), AnalyticsError> {
        let conn = self.pool.get().await.map_err(AnalyticsError::from_pool)?;
        conn.execute_prepared(
            "INSERT INTO analytics.tenants (id, name, plan) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, plan = EXCLUDED.plan",
            &[
                (&tenant.id.0, Type::INT8),
                (&tenant.name.as_str(), Type::TEXT),
                (&tenant.plan.as_str(), Type::TEXT),
            ],
        )
        .await
        .map_err(AnalyticsError::from_query)?;
        self.tenants.known.write().insert(tenant.id.0);
        Ok(())
    }

    /// The ids of the tenants on `plan`.
    pub async fn tenants_on(&self, plan: Plan) -> Result<Vec<TenantId>, AnalyticsError> {
        let conn = self.pool.get().await.map_err(AnalyticsError::from_pool)?;
        Ok(conn
            .query_prepared(
                "SELECT id FROM analytics.tenants WHERE plan = $1 ORDER BY id",
                &[(&plan.as_str(), Type::TEXT)],
            )
            .await
            .map_err(AnalyticsError::from_query)?
            .iter()
            .map(|row| TenantId(row.get(0)))
            .collect())
    }
}
