//! Smoke test of each peer adapter: acquire, conflict (no-wait and bounded wait), handoff to a
//! waiter on release, release.
//!
//! Each runs when its peer is reachable and otherwise skips with a message saying why. Peers
//! are read from the environment, defaulting to this machine's services:
//! `HOLDFAST_TEST_REDIS_URL` (redis://127.0.0.1:6379), `HOLDFAST_TEST_POSTGRES_URL`
//! (postgres://postgres@127.0.0.1:5432/test), `HOLDFAST_TEST_MYSQL_URL`
//! (mysql://root@127.0.0.1:3306/test), `HOLDFAST_TEST_ETCD_ENDPOINT` (http://127.0.0.1:2389,
//! the bench script's private etcd). Under `CI=true` a missing Redis, PostgreSQL or MariaDB is
//! a failure; a missing etcd is always a skip, since CI machines do not have it installed
//! (`scripts/bench-peers.sh start` installs and starts one), and the etcd adapter is only built
//! with `--features etcd`.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use holdfast_bench::adapter::{LockConn, LockSystem};

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true")
}

/// Connects once; `None` (after printing why) when the peer is absent and that is allowed.
async fn present<S: LockSystem>(system: &S, where_: &str, required_in_ci: bool) -> Option<()> {
    match tokio::time::timeout(Duration::from_secs(10), system.connect()).await {
        Ok(Ok(_)) => Some(()),
        outcome => {
            let why = match outcome {
                Ok(Err(err)) => format!("{err:#}"),
                _ => "connect timed out".to_owned(),
            };
            assert!(
                !(required_in_ci && in_ci()),
                "{} at {where_} is required under CI=true: {why}",
                system.name()
            );
            eprintln!(
                "SKIPPED: {} adapter smoke test: no {} at {where_} ({why})",
                system.name(),
                system.name()
            );
            None
        }
    }
}

/// Acquire, conflict, handoff, release.
async fn exercise<S: LockSystem>(system: &S) -> anyhow::Result<()> {
    let mut first = system.connect().await?;
    let mut second = system.connect().await?;
    let key = format!("hfb-test/{}/{:08x}", system.name(), rand::random::<u32>());

    let token = first
        .acquire(&key, None)
        .await?
        .context("first acquire was refused")?;
    anyhow::ensure!(
        second.acquire(&key, None).await?.is_none(),
        "no-wait acquire of a held key was granted"
    );
    let began = Instant::now();
    anyhow::ensure!(
        second
            .acquire(&key, Some(Duration::from_millis(300)))
            .await?
            .is_none(),
        "waiting acquire of a held key was granted"
    );
    let waited = began.elapsed();
    anyhow::ensure!(
        waited >= Duration::from_millis(250),
        "a 300 ms wait gave up after {waited:?}"
    );

    // A waiter is granted once the holder releases.
    let waiter_key = key.clone();
    let waiter = tokio::spawn(async move {
        let outcome = second
            .acquire(&waiter_key, Some(Duration::from_secs(10)))
            .await;
        (second, outcome)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    first.release(&key, token).await?;
    let (mut second, outcome) = waiter.await?;
    let token = outcome?.context("the waiter was not granted after the release")?;
    anyhow::ensure!(
        first.acquire(&key, None).await?.is_none(),
        "no-wait acquire granted while the waiter holds the key"
    );
    second.release(&key, token).await?;

    // Released: free again.
    let token = first
        .acquire(&key, None)
        .await?
        .context("acquire after release was refused")?;
    first.release(&key, token).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_adapter() -> anyhow::Result<()> {
    let url = env_or("HOLDFAST_TEST_REDIS_URL", "redis://127.0.0.1:6379");
    let system = holdfast_bench::adapters::redis::RedisSystem::new(
        &url,
        holdfast_bench::adapter::Durability::MemoryOnly,
    )?;
    if present(&system, &url, true).await.is_none() {
        return Ok(());
    }
    exercise(&system).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_adapter() -> anyhow::Result<()> {
    let url = env_or(
        "HOLDFAST_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    );
    let system = holdfast_bench::adapters::postgres::PostgresSystem::new(&url);
    if present(&system, &url, true).await.is_none() {
        return Ok(());
    }
    exercise(&system).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_adapter() -> anyhow::Result<()> {
    let url = env_or(
        "HOLDFAST_TEST_MYSQL_URL",
        "mysql://root@127.0.0.1:3306/test",
    );
    let system = holdfast_bench::adapters::mariadb::MariaDbSystem::new(&url);
    if present(&system, &url, true).await.is_none() {
        return Ok(());
    }
    exercise(&system).await
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_adapter() -> anyhow::Result<()> {
    let endpoint = env_or("HOLDFAST_TEST_ETCD_ENDPOINT", "http://127.0.0.1:2389");
    let system = holdfast_bench::adapters::etcd::EtcdSystem::new(&endpoint);
    if present(&system, &endpoint, false).await.is_none() {
        return Ok(());
    }
    exercise(&system).await
}

#[cfg(not(feature = "etcd"))]
#[test]
fn etcd_adapter() {
    eprintln!(
        "SKIPPED: etcd adapter smoke test: holdfast-bench built without the `etcd` feature \
         (it needs protoc); run `cargo test -p holdfast-bench --features etcd` with etcd up"
    );
}
