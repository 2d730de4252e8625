//! Engine micro-benchmarks.
//!
//! - `acquire_release/{0,10000,100000}`: an uncontended acquire of one exclusive lock by a
//!   new lease plus the release of that lease, with N other single-lock leases held. Flat
//!   figures across N show the cost does not grow with the number of held locks.
//! - `acquire_release_host_cycle/…`: the same plus what the host does after every call
//!   (`take_events`, `take_changes`, which builds the durable records to write).
//! - Memory: before the timings, the resident-set growth of holding 100 000 single-lock
//!   leases (and 10 000 leases of 10 locks each) is measured from `/proc/self/statm` and
//!   printed as bytes per held lock.
//!
//! Run: `cargo bench -p holdfast-core --bench engine`
//!
//! The allocator is the server's (mimalloc, with transparent huge pages off as `holdfast
//! serve` has them), so the memory figure is what the engine costs inside the server.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion};
use holdfast_core::{
    AcquireOutcome, AcquireRequest, Engine, LeaseId, LeaseTarget, LockKind, LockSpec, NewLease,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TTL_MS: u64 = 30 * 24 * 3_600_000;

fn request(id: u128, holder: &str, keys: &[String]) -> AcquireRequest {
    AcquireRequest {
        target: LeaseTarget::New(NewLease {
            lease_id: LeaseId(id),
            holder: holder.to_owned(),
            ttl_ms: TTL_MS,
            reason: None,
            metadata: None,
            owner: None,
        }),
        locks: keys
            .iter()
            .map(|k| LockSpec {
                key: k.clone(),
                kind: LockKind::Exclusive,
                lock_delay_ms: 0,
            })
            .collect(),
        wait_ms: 0,
        reentrant: true,
    }
}

/// An engine holding `n` single-lock leases (keys like `bench/held/000042`).
fn engine_with(n: usize, locks_per_lease: usize) -> Engine {
    let mut e = Engine::default();
    let mut id = 1u128 << 64;
    for i in 0..n {
        let keys: Vec<String> = (0..locks_per_lease)
            .map(|j| format!("bench/held/{i:06}/{j:02}"))
            .collect();
        id += 1;
        match e.acquire(0, request(id, "worker-7@host-3", &keys)) {
            Ok(AcquireOutcome::Granted(_)) => {}
            other => panic!("setup acquire failed: {other:?}"),
        }
        if i.is_multiple_of(1024) {
            let _ = e.take_events();
            let _ = e.take_changes();
        }
    }
    let _ = e.take_events();
    let _ = e.take_changes();
    e
}

/// Resident set size in bytes, from `/proc/self/statm` (4 KiB pages).
fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Measure one configuration in this (fresh) process and print the result.
fn measure_memory(leases: usize, per_lease: usize) {
    let before = rss_bytes();
    let e = engine_with(leases, per_lease);
    let after = rss_bytes();
    let locks = leases * per_lease;
    assert_eq!(e.stats().active_locks as usize, locks);
    match (before, after) {
        (Some(b), Some(a)) => println!(
            "memory: {leases} leases x {per_lease} lock(s): RSS +{} KiB = {} bytes per held lock \
             (everything: lease, key table entry, expiry timer, strings; keys are {} bytes)",
            a.saturating_sub(b) / 1024,
            a.saturating_sub(b) / locks as u64,
            "bench/held/000000/00".len()
        ),
        _ => println!("memory: /proc/self/statm unavailable"),
    }
}

/// Each configuration runs in a fresh child process so freed memory of one does not
/// flatter the next.
fn memory_report() {
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    for (leases, per_lease) in [(100_000usize, 1usize), (10_000, 10)] {
        let out = std::process::Command::new(&exe)
            .env("HOLDFAST_BENCH_MEMORY", format!("{leases},{per_lease}"))
            .env("MIMALLOC_ALLOW_THP", "0")
            .output();
        match out {
            Ok(o) => print!("{}", String::from_utf8_lossy(&o.stdout)),
            Err(e) => println!("memory: could not run {exe:?}: {e}"),
        }
    }
}

fn bench(c: &mut Criterion) {
    let hot = vec!["bench/hot".to_owned()];
    let mut group = c.benchmark_group("acquire_release");
    for n in [0usize, 10_000, 100_000] {
        let mut e = engine_with(n, 1);
        let mut id = 1u128;
        let mut i = 0u64;
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                id += 1;
                let out = e.acquire(1, request(id, "bench", &hot));
                let _ = black_box(out);
                let _ = black_box(e.release_lease(1, LeaseId(id)));
                // The host drains events after every call and persists changes in batches.
                let _ = e.take_events();
                i += 1;
                if i.is_multiple_of(1024) {
                    let _ = e.take_changes();
                }
            });
        });
    }
    group.finish();

    let mut group = c.benchmark_group("acquire_release_host_cycle");
    for n in [0usize, 100_000] {
        let mut e = engine_with(n, 1);
        let mut id = 1u128;
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                id += 1;
                let _ = black_box(e.acquire(1, request(id, "bench", &hot)));
                let _ = black_box(e.take_events());
                let _ = black_box(e.take_changes());
                let _ = black_box(e.release_lease(1, LeaseId(id)));
                let _ = black_box(e.take_events());
                let _ = black_box(e.take_changes());
            });
        });
    }
    group.finish();
}

fn main() {
    if let Ok(cfg) = std::env::var("HOLDFAST_BENCH_MEMORY") {
        let mut it = cfg.split(',').map(|x| x.parse::<usize>().unwrap_or(1));
        measure_memory(it.next().unwrap_or(1), it.next().unwrap_or(1));
        return;
    }
    memory_report();
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}
