//! A fresh PostgreSQL database per test.

use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::{Client, Config, NoTls};

use crate::{run_cleanup, unavailable, unique_name};

/// Environment variable naming the PostgreSQL server (any database on it).
pub const DATABASE_URL_ENV: &str = "DATABASE_URL";

/// A PostgreSQL database created for one test and dropped with it.
///
/// The database lives on the server named by `DATABASE_URL`; the connection
/// in that URL must be allowed to `CREATE DATABASE`. Dropping the value drops
/// the database `WITH (FORCE)`, so connections a test leaked do not keep it
/// alive.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
    admin_url: String,
    config: Config,
}

impl TestDatabase {
    /// Creates a fresh, empty database.
    ///
    /// Returns `None` (after printing why) when `DATABASE_URL` is unset or the
    /// server is unreachable, unless `REQUIRE_SERVICES=1`, in which case it
    /// panics so the test fails.
    pub async fn create() -> Option<TestDatabase> {
        let Ok(admin_url) = std::env::var(DATABASE_URL_ENV) else {
            return unavailable("PostgreSQL", "DATABASE_URL is not set");
        };
        let mut admin_config = match Config::from_str(&admin_url) {
            Ok(c) => c,
            Err(e) => return unavailable("PostgreSQL", &format!("bad DATABASE_URL: {e}")),
        };
        admin_config.connect_timeout(Duration::from_secs(5));
        let admin = match connect(&admin_config).await {
            Ok(c) => c,
            Err(e) => return unavailable("PostgreSQL", &format!("cannot connect: {e}")),
        };
        let name = unique_name("fk_test");
        if let Err(e) = admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
        {
            return unavailable("PostgreSQL", &format!("CREATE DATABASE failed: {e}"));
        }
        let mut config = admin_config.clone();
        config.dbname(&name);
        Some(TestDatabase {
            url: with_database(&admin_url, &name),
            name,
            admin_url,
            config,
        })
    }

    /// The database's name (unique per test).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A connection URL for this database, for code that takes a URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A connection config for this database, for pools such as bb8.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Opens a new connection to this database; its driver task runs on the
    /// current tokio runtime.
    ///
    /// # Panics
    /// If the connection fails: the database was just created, so a failure
    /// here is a broken environment and the test should fail.
    pub async fn connect(&self) -> Client {
        connect(&self.config)
            .await
            .unwrap_or_else(|e| panic!("connect to test database {}: {e}", self.name))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        run_cleanup(async move {
            let result = async {
                let config = Config::from_str(&admin_url)?;
                let admin = connect(&config).await?;
                admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await
            }
            .await;
            if let Err(e) = result {
                eprintln!("testkit: could not drop test database {name}: {e}");
            }
        });
    }
}

async fn connect(config: &Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        // The connection ends when the client is dropped; errors after that
        // (e.g. the database being dropped) are expected.
        let _ = connection.await;
    });
    Ok(client)
}

/// Replaces the database (path) part of a `postgres://` URL.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_or_appends_the_database() {
        assert_eq!(
            with_database("postgres://u@h:5/old", "new"),
            "postgres://u@h:5/new"
        );
        assert_eq!(
            with_database("postgres://u@h:5", "new"),
            "postgres://u@h:5/new"
        );
        assert_eq!(
            with_database("postgresql://u:p@h/old?sslmode=disable", "n"),
            "postgresql://u:p@h/n?sslmode=disable"
        );
    }
}
