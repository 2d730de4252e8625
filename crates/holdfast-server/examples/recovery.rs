//! Recovery time of a data directory holding N leases (one exclusive lock each), phase by
//! phase. Fills the directory through the engine and the store (the records the server writes,
//! without the network), then times what a restart does: open + load, restore, and the whole
//! `holdfast_server::start` until it serves.
//!
//! ```sh
//! cargo run --release -p holdfast-server --example recovery -- 1000000 [DIR]
//! ```
//! With DIR, a directory already filled by an earlier run is reused (delete it to refill).

use std::time::Instant;

use holdfast_core::{
    AcquireRequest, Engine, LeaseId, LeaseTarget, Limits, LockKind, LockSpec, NewLease,
};
use holdfast_server::store::Store;
use holdfast_server::{Durability, ServerConfig};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().map_or(Ok(1_000_000), |s| s.parse())?;
    let keep = args.next();
    let tmp = tempfile::tempdir()?;
    let dir = keep.map_or_else(|| tmp.path().join("data"), std::path::PathBuf::from);
    let now = 1_800_000_000_000u64;

    if !dir.join("holdfast.redb").exists() {
        let started = Instant::now();
        let mut store = Store::open(&dir, Durability::Sync)?;
        store.load()?;
        let mut engine = Engine::new(Limits::default());
        let mut rng = 0x9e37_79b9_7f4a_7c15u128;
        for i in 0..n {
            rng = rng.wrapping_mul(0x2545_f491_4f6c_dd1d).wrapping_add(1);
            let request = AcquireRequest {
                target: LeaseTarget::New(NewLease {
                    lease_id: LeaseId(rng | 1),
                    holder: format!("bench-client-{}", i % 64),
                    ttl_ms: 3_600_000,
                    reason: None,
                    metadata: None,
                    owner: None,
                }),
                locks: vec![LockSpec {
                    key: format!("bench/w4/{i:09}"),
                    kind: LockKind::Exclusive,
                    lock_delay_ms: 0,
                }],
                wait_ms: 0,
                reentrant: true,
            };
            engine
                .acquire(now, request)
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            if i % 10_000 == 9_999 || i == n - 1 {
                store.apply(&engine.take_changes())?;
                let _ = engine.take_events();
            }
        }
        drop(store);
        println!("filled {n} leases in {:.2?}", started.elapsed());
    }

    let t = Instant::now();
    let mut store = Store::open(&dir, Durability::Sync)?;
    let opened = t.elapsed();
    let state = store.load()?;
    let loaded = t.elapsed();
    let leases = state.leases.len();
    let engine = Engine::restore(Limits::default(), state, now, 10_000)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let restored = t.elapsed();
    let durable = engine.durable_state();
    let snapshot = t.elapsed();
    drop(durable);
    println!(
        "{leases} leases: open {opened:.2?}, load {:.2?}, restore {:.2?} (durable_state {:.2?})",
        loaded - opened,
        restored - loaded,
        snapshot - restored
    );
    drop(engine);
    drop(store);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let t = Instant::now();
        let server = holdfast_server::start(ServerConfig::ephemeral_sync(&dir)).await?;
        println!("start() until serving: {:.2?}", t.elapsed());
        server.shutdown().await;
        anyhow::Ok(())
    })?;
    Ok(())
}
