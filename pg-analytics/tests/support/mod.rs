//! What the store's integration tests share: a migrated store in the
//! test's own database, with tenants registered.
#![allow(dead_code)]

use chrono::{TimeDelta, Utc};
use pg_analytics::{Analytics, EventRules, Plan, Tenant, TenantId};
use testkit::TestDatabase;

/// A store on `db` checking events with `rules`, migrated.
pub(crate) async fn migrated(db: &TestDatabase, rules: EventRules) -> Analytics {
    let pool = pg_kit::pool(db.url(), &pg_kit::PoolConfig::default()).unwrap();
    let store = Analytics::new(pool, time_kit::system()).with_rules(rules);
    store.migrate().await.unwrap();
    store
}

/// A migrated store with partitions for the last 40 days and `tenants`
/// registered, each `(id, plan)`.
pub(crate) async fn with_tenants(db: &TestDatabase, tenants: &[(i64, Plan)]) -> Analytics {
    let store = migrated(db, EventRules::default()).await;
    let today = Utc::now().date_naive();
    store
        .ensure_partitions(today - TimeDelta::days(40), today, 1)
        .await
        .unwrap();
    register(&store, tenants).await;
    store
}

/// Registers each `(id, plan)` as tenant `id` named "tenant {id}".
pub(crate) async fn register(store: &Analytics, tenants: &[(i64, Plan)]) {
    for &(id, plan) in tenants {
        store
            .upsert_tenant(&Tenant {
                id: TenantId(id),
                name: format!("tenant {id}"),
                plan,
            })
            .await
            .unwrap();
    }
}
