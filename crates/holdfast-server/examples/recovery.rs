//! Recovery time of a data directory holding N leases (one exclusive lock each), phase by
//! phase. Fills the directory through the engine and the store (the records the server writes,
//! without the network), then times what a restart does: open + load, restore, and the whole
//! `holdfast_server::start` until it serves, and (as the W4 benchmark does) the release binary
//! `target/release/holdfast serve` from spawn until `GET /readyz` answers 200 (`HOLDFAST_BIN`
//! names another binary).
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

/// The allocator of the `holdfast` binary, so the in-process figures match it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    let checked = engine.check_invariants();
    let invariants = t.elapsed();
    checked.map_err(|e| anyhow::anyhow!("invariants: {e}"))?;
    println!(
        "{leases} leases: (a) Store::open {opened:.2?} + load {:.2?}, (b) Engine::restore {:.2?}, \
         (c) full check_invariants {:.2?} (tests only; not run at startup in release builds)",
        loaded - opened,
        restored - loaded,
        invariants - restored
    );
    drop(engine);
    drop(store);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let t = Instant::now();
        let server = holdfast_server::start(ServerConfig::ephemeral_sync(&dir)).await?;
        println!(
            "in process: holdfast_server::start() until serving {:.2?}",
            t.elapsed()
        );
        server.shutdown().await;
        anyhow::Ok(())
    })?;

    let bin = std::env::var_os("HOLDFAST_BIN").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/holdfast"),
        std::path::PathBuf::from,
    );
    if bin.exists() {
        // The first start follows the clean shutdown above; it is killed with SIGKILL, so the
        // second one recovers from a crash (redb repairs its allocator state), as in W4.
        spawn_until_ready(&bin, &dir, n, "after a clean stop")?;
        spawn_until_ready(&bin, &dir, n, "after SIGKILL")?;
    } else {
        println!(
            "{} not built: skipping the spawn → /readyz measurement",
            bin.display()
        );
    }
    Ok(())
}

/// Spawn the release binary on the directory and time spawn → `GET /readyz` 200, as W4 does;
/// then check `/v1/stats` and kill it with SIGKILL.
fn spawn_until_ready(
    bin: &std::path::Path,
    dir: &std::path::Path,
    n: u64,
    what: &str,
) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let t = Instant::now();
    let mut child = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--wire-listen", "off"])
        .args(["--durability", "sync", "--data-dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut addr = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(a) = line.strip_prefix("listening on http://") {
            addr = Some(a.trim().to_owned());
            break;
        }
    }
    let result = (|| {
        let addr = addr.ok_or_else(|| anyhow::anyhow!("server exited before listening"))?;
        let listening = t.elapsed();
        loop {
            if get(&addr, "/readyz").is_ok_and(|(status, _)| status == 200) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let ready = t.elapsed();
        let (_, stats) = get(&addr, "/v1/stats")?;
        let stats: serde_json::Value = serde_json::from_str(&stats)?;
        println!(
            "binary {} ({what}): spawn → listening {listening:.2?}, spawn → /readyz 200 {ready:.2?}; \
             /v1/stats active_locks = {}, leases = {} (expected {n})",
            bin.display(),
            stats["active_locks"],
            stats["leases"]
        );
        anyhow::Ok(())
    })();
    child.kill()?;
    child.wait()?;
    result
}

/// A bare HTTP/1.0 GET: (status, body).
fn get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|x| x.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("bad answer {text:?}"))?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Ok((status, body))
}
