//! Throughput of acquire+release pairs with 64 concurrent HTTP clients against an in-process
//! server, in `memory` and `sync` modes, and the store commits (fsyncs) per second that show
//! group commit at work (many requests per fsync).
//!
//! `cargo run --release -p holdfast-server --example pairs [-- SECONDS CLIENTS]`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use holdfast_server::{Durability, ServerConfig};

async fn run(durability: Durability, seconds: u64, clients: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = ServerConfig {
        durability,
        ..ServerConfig::ephemeral_sync(dir.path())
    };
    let server = holdfast_server::start(config).await?;
    let base = server.base_url();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(clients)
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let pairs = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let fsyncs_before = server.counters().fsyncs.load(Ordering::Relaxed);
    let commits_before = server.counters().commits.load(Ordering::Relaxed);
    let started = Instant::now();
    for i in 0..clients {
        let (http, base, stop, pairs) = (
            http.clone(),
            base.clone(),
            Arc::clone(&stop),
            Arc::clone(&pairs),
        );
        tasks.push(tokio::spawn(async move {
            let body = serde_json::json!({"holder": format!("bench-{i}"), "locks": [{"key": format!("bench/{i}")}]});
            while !stop.load(Ordering::Relaxed) {
                let lease: serde_json::Value =
                    http.post(format!("{base}/v1/leases")).json(&body).send().await?.error_for_status()?.json().await?;
                let id = lease["lease_id"].as_str().unwrap_or_default().to_owned();
                http.delete(format!("{base}/v1/leases/{id}")).send().await?.error_for_status()?;
                pairs.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let pairs = pairs.load(Ordering::Relaxed) as f64;
    let fsyncs = (server.counters().fsyncs.load(Ordering::Relaxed) - fsyncs_before) as f64;
    let commits = (server.counters().commits.load(Ordering::Relaxed) - commits_before) as f64;
    println!(
        "{:<6} clients={clients:<3} pairs/s={:>8.0}  requests/s={:>8.0}  commits/s={:>7.0}  fsyncs/s={:>7.0}  requests/fsync={:>5.1}",
        durability.as_str(),
        pairs / elapsed,
        2.0 * pairs / elapsed,
        commits / elapsed,
        fsyncs / elapsed,
        if fsyncs > 0.0 {
            2.0 * pairs / fsyncs
        } else {
            f64::NAN
        },
    );
    server.shutdown().await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let seconds = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let clients = args.next().and_then(|s| s.parse().ok()).unwrap_or(64);
    for durability in [Durability::Memory, Durability::Sync, Durability::Async] {
        run(durability, seconds, clients).await?;
    }
    Ok(())
}
