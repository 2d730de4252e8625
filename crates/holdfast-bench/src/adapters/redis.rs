//! Redis: `SET key token NX PX ttl`, released by a compare-and-delete Lua script (the single-
//! instance lock of the Redis documentation). Redis has no queue: a waiting client polls with
//! exponential backoff from [`REDIS_BACKOFF_INITIAL`] doubling to [`REDIS_BACKOFF_MAX`].

use std::time::{Duration, Instant};

use anyhow::Context as _;
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;

use crate::adapter::{
    Durability, LOCK_TTL, LockConn, LockSystem, REDIS_BACKOFF_INITIAL, REDIS_BACKOFF_MAX,
    random_token,
};

/// Deletes the key only if it still holds our token, atomically.
const RELEASE_SCRIPT: &str = r#"
if redis.call("GET", KEYS[1]) == ARGV[1] then
    return redis.call("DEL", KEYS[1])
else
    return 0
end
"#;

/// A Redis server.
pub struct RedisSystem {
    client: redis::Client,
    durability: Durability,
}

impl RedisSystem {
    /// Reaches Redis at `url` (`redis://127.0.0.1:6390`). `durability` is what the server was
    /// started with (the benchmark's instance keeps nothing: `--save "" --appendonly no`).
    pub fn new(url: &str, durability: Durability) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).with_context(|| format!("redis url {url}"))?;
        Ok(Self { client, durability })
    }
}

impl LockSystem for RedisSystem {
    type Conn = RedisConn;

    fn name(&self) -> &str {
        "redis"
    }

    fn durability(&self) -> Durability {
        self.durability
    }

    async fn connect(&self) -> anyhow::Result<RedisConn> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(30)));
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .context("connect to redis")?;
        Ok(RedisConn {
            conn,
            release: redis::Script::new(RELEASE_SCRIPT),
        })
    }
}

/// One Redis connection.
pub struct RedisConn {
    conn: MultiplexedConnection,
    release: redis::Script,
}

impl RedisConn {
    async fn try_set(&mut self, key: &str, token: &str) -> anyhow::Result<bool> {
        let ttl_ms = u64::try_from(LOCK_TTL.as_millis()).unwrap_or(u64::MAX);
        let reply: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut self.conn)
            .await
            .context("redis SET NX PX")?;
        Ok(reply.is_some())
    }
}

impl LockConn for RedisConn {
    type Token = String;

    async fn acquire(
        &mut self,
        key: &str,
        wait: Option<Duration>,
    ) -> anyhow::Result<Option<String>> {
        let token = random_token();
        let deadline = wait.map(|wait| Instant::now() + wait);
        let mut backoff = REDIS_BACKOFF_INITIAL;
        loop {
            if self.try_set(key, &token).await? {
                return Ok(Some(token));
            }
            let Some(deadline) = deadline else {
                return Ok(None);
            };
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(backoff.min(deadline - now)).await;
            backoff = (backoff * 2).min(REDIS_BACKOFF_MAX);
        }
    }

    async fn release(&mut self, key: &str, token: String) -> anyhow::Result<()> {
        let deleted: i64 = self
            .release
            .key(key)
            .arg(token)
            .invoke_async(&mut self.conn)
            .await
            .context("redis release script")?;
        anyhow::ensure!(
            deleted == 1,
            "redis release of {key}: the key no longer held our token"
        );
        Ok(())
    }
}
