//! `holdfast-bench --smoke` in CI: every holdfast workload path of the benchmark, briefly,
//! against an in-process memory server, through `holdfast-client` (wire protocol and HTTP) and
//! through bare HTTP. Also
//! the adapter smoke test (acquire, conflict, handoff, release) for both holdfast adapters.

use std::time::Duration;

use anyhow::Context as _;
use holdfast_bench::adapter::{Durability, LockConn, LockSystem};
use holdfast_bench::run::HoldfastTransport;
use holdfast_server::{ServerConfig, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_run_through_the_client_over_the_wire() -> anyhow::Result<()> {
    let server = start(ServerConfig::ephemeral_memory()).await?;
    let wire = server.wire_addr.map(|a| a.to_string());
    let report = holdfast_bench::smoke::smoke(&server.base_url(), wire.as_deref()).await;
    server.shutdown().await;
    let report = report?;
    let markdown = report.to_markdown();
    assert!(markdown.contains("W1 uncontended"), "{markdown}");
    assert!(markdown.contains("holdfast-memory"), "{markdown}");
    assert!(markdown.contains("wire protocol"), "{markdown}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_run_through_the_client_over_http() -> anyhow::Result<()> {
    let server = start(ServerConfig::ephemeral_memory()).await?;
    let report = holdfast_bench::smoke::smoke(&server.base_url(), None).await;
    server.shutdown().await;
    holdfast_bench::smoke::check(&report?.rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_run_over_bare_http() -> anyhow::Result<()> {
    let server = start(ServerConfig::ephemeral_memory()).await?;
    let mut config = holdfast_bench::smoke::smoke_config(&server.base_url(), None);
    config.holdfast_transport = HoldfastTransport::Http;
    let report = holdfast_bench::run::run(config).await;
    server.shutdown().await;
    holdfast_bench::smoke::check(&report?.rows)
}

async fn exercise<S: LockSystem>(system: &S) -> anyhow::Result<()> {
    let mut first = system.connect().await?;
    let mut second = system.connect().await?;
    let key = "hfb-test/holdfast";
    let token = first
        .acquire(key, None)
        .await?
        .context("first acquire refused")?;
    anyhow::ensure!(
        second.acquire(key, None).await?.is_none(),
        "no-wait conflict granted"
    );
    anyhow::ensure!(
        second
            .acquire(key, Some(Duration::from_millis(200)))
            .await?
            .is_none(),
        "bounded wait on a held key granted"
    );
    let waiter = tokio::spawn(async move {
        let outcome = second.acquire(key, Some(Duration::from_secs(10))).await;
        (second, outcome)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    first.release(key, token).await?;
    let (mut second, outcome) = waiter.await?;
    let token = outcome?.context("waiter not granted after release")?;
    second.release(key, token).await?;
    let token = first
        .acquire(key, None)
        .await?
        .context("acquire after release refused")?;
    first.release(key, token).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holdfast_adapters() -> anyhow::Result<()> {
    let server = start(ServerConfig::ephemeral_memory()).await?;
    let url = server.base_url();
    let wire = server.wire_addr.map(|a| a.to_string());
    let client = holdfast_bench::adapters::holdfast_client::HoldfastClientSystem::new(
        "holdfast-memory",
        &url,
        None,
        Durability::MemoryOnly,
    );
    let wired = holdfast_bench::adapters::holdfast_client::HoldfastClientSystem::with_wire(
        "holdfast-memory",
        &url,
        wire.as_deref(),
        Durability::MemoryOnly,
    );
    let http = holdfast_bench::adapters::holdfast_http::HoldfastHttpSystem::new(
        "holdfast-memory",
        &url,
        None,
        Durability::MemoryOnly,
    );
    let outcome = async {
        exercise(&client).await.context("holdfast-client adapter")?;
        exercise(&wired)
            .await
            .context("holdfast-client wire adapter")?;
        exercise(&http).await.context("bare HTTP adapter")
    }
    .await;
    server.shutdown().await;
    outcome
}
