//! A private Redis key prefix per test.

use std::time::Duration;

use fred::prelude::{Builder, Client, ClientLike, Config, LuaInterface};

use crate::{run_cleanup, unavailable, unique_name};

/// Environment variable naming the Redis server.
pub const REDIS_URL_ENV: &str = "REDIS_URL";

/// Deletes every key matching `ARGV[1]` with SCAN (never KEYS), in batches.
const DELETE_PREFIX_SCRIPT: &str = r#"
local cursor = "0"
local deleted = 0
repeat
  local reply = redis.call("SCAN", cursor, "MATCH", ARGV[1], "COUNT", 1000)
  cursor = reply[1]
  for _, key in ipairs(reply[2]) do
    deleted = deleted + redis.call("UNLINK", key)
  end
until cursor == "0"
return deleted
"#;

/// A Redis key prefix private to one test, with a connected client.
///
/// Code under test must put every key it writes under [`TestRedis::prefix`]
/// (libraries in this workspace take a prefix in their config for this).
/// Dropping the value deletes every key under the prefix.
pub struct TestRedis {
    url: String,
    prefix: String,
    client: Client,
}

impl std::fmt::Debug for TestRedis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestRedis")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl TestRedis {
    /// Connects to `REDIS_URL` and reserves a fresh key prefix.
    ///
    /// Returns `None` (after printing why) when `REDIS_URL` is unset or the
    /// server is unreachable, unless `REQUIRE_SERVICES=1`, in which case it
    /// panics so the test fails.
    pub async fn create() -> Option<TestRedis> {
        let Ok(url) = std::env::var(REDIS_URL_ENV) else {
            return unavailable("Redis", "REDIS_URL is not set");
        };
        let client = match connect(&url).await {
            Ok(c) => c,
            Err(e) => return unavailable("Redis", &e),
        };
        Some(TestRedis {
            prefix: format!("{}:", unique_name("fk-test")),
            url,
            client,
        })
    }

    /// The server URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The key prefix reserved for this test; it ends with `:`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `name` under this test's prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// A connected client (shared by the test; clone it freely).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Number of keys currently under this test's prefix.
    ///
    /// # Panics
    /// If Redis fails, which in a test is an environment failure.
    pub async fn count_keys(&self) -> usize {
        let script = "return #redis.call('KEYS', ARGV[1])";
        let n: i64 = self
            .client
            .eval(
                script,
                Vec::<String>::new(),
                vec![format!("{}*", escape_glob(&self.prefix))],
            )
            .await
            .expect("count keys under the test prefix");
        usize::try_from(n).unwrap_or(0)
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let url = self.url.clone();
        let pattern = format!("{}*", escape_glob(&self.prefix));
        run_cleanup(async move {
            let result = async {
                let client = connect(&url).await?;
                let _: i64 = client
                    .eval(DELETE_PREFIX_SCRIPT, Vec::<String>::new(), vec![pattern])
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = client.quit().await;
                Ok::<(), String>(())
            }
            .await;
            if let Err(e) = result {
                eprintln!("testkit: could not clean Redis prefix: {e}");
            }
        });
    }
}

async fn connect(url: &str) -> Result<Client, String> {
    let config = Config::from_url(url).map_err(|e| format!("bad REDIS_URL: {e}"))?;
    let client = Builder::from_config(config)
        .with_connection_config(|c| c.connection_timeout = Duration::from_secs(3))
        .build()
        .map_err(|e| format!("cannot build client: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(5), client.init()).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(e)) => Err(format!("cannot connect: {e}")),
        Err(_) => Err("cannot connect: timed out after 5 s".to_owned()),
    }
}

/// Escapes Redis glob metacharacters so a prefix matches only itself.
fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
