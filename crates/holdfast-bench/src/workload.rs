//! The workloads, generic over [`LockSystem`]: every system runs exactly the same code.
//!
//! - W1 [`uncontended`]: N clients, each its own connection and key, loop acquire+release.
//! - W2 [`hot_key`]: N clients on one key, each holding it for a fixed time when granted.
//! - W3 [`hold_many`]: acquire a large number of distinct locks and keep them.
//!
//! Times are taken in this process from one monotonic clock. Work done during the warm-up is
//! not counted; a pair or grant counts if it started after the warm-up and (for pairs) finished
//! before the end.

use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::adapter::{LockConn, LockSystem};
use crate::procfs::{MemSample, cpu_seconds, mem_sample, own_cpu_seconds};

/// Longest wait of an acquire in W1 and W3 (uncontended: a refusal is an error).
pub const UNCONTENDED_WAIT: Duration = Duration::from_secs(5);
/// Longest wait of one acquire in W2 (a timed-out waiter simply asks again).
pub const HOT_KEY_WAIT: Duration = Duration::from_secs(30);
/// Largest latency the histograms record (ns).
const HISTOGRAM_MAX_NS: u64 = 120_000_000_000;

/// Warm-up and measured duration.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Timing {
    /// Not counted.
    #[serde(serialize_with = "ser_secs")]
    pub warmup: Duration,
    /// Counted.
    #[serde(serialize_with = "ser_secs")]
    pub duration: Duration,
}

fn ser_secs<S: serde::Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(value.as_secs_f64())
}

pub(crate) fn histogram() -> Histogram<u64> {
    // Bounds are constants within hdrhistogram's rules: 1 ns ..= 120 s, 3 significant digits.
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_NS, 3).unwrap_or_else(|_| unreachable!())
}

pub(crate) fn record(hist: &mut Histogram<u64>, value: Duration) {
    let ns = u64::try_from(value.as_nanos()).unwrap_or(u64::MAX);
    hist.saturating_record(ns.clamp(1, HISTOGRAM_MAX_NS));
}

#[allow(clippy::cast_precision_loss)] // nanoseconds well below 2^52
pub(crate) fn quantile_us(hist: &Histogram<u64>, quantile: f64) -> f64 {
    if hist.is_empty() {
        return 0.0;
    }
    hist.value_at_quantile(quantile) as f64 / 1_000.0
}

/// Opens `count` connections concurrently.
pub async fn connect_all<S: LockSystem>(system: &S, count: usize) -> anyhow::Result<Vec<S::Conn>> {
    futures::future::try_join_all((0..count).map(|_| system.connect())).await
}

/// Result of W1 for one client count.
#[derive(Clone, Debug, Serialize)]
pub struct UncontendedResult {
    /// Concurrent clients.
    pub clients: usize,
    /// Pairs counted.
    pub pairs: u64,
    /// Acquire+release pairs per second, all clients together.
    pub pairs_per_s: f64,
    /// Median latency of one pair.
    pub pair_p50_us: f64,
    /// 99th percentile latency of one pair.
    pub pair_p99_us: f64,
    /// Slowest pair.
    pub pair_max_us: f64,
    /// CPU time the server's process tree spent per pair in the measured window (`None`
    /// when its PID is unknown).
    pub server_cpu_us_per_pair: Option<f64>,
    /// CPU time this benchmark process (the clients; not the servers it started) spent per
    /// pair.
    pub bench_cpu_us_per_pair: Option<f64>,
}

/// CPU seconds of (server tree, this process alone) now.
fn cpu_now(server_pid: Option<u32>) -> (Option<f64>, Option<f64>) {
    (server_pid.and_then(cpu_seconds), own_cpu_seconds())
}

#[allow(clippy::cast_precision_loss)]
fn per_pair_us(before: Option<f64>, after: Option<f64>, pairs: u64) -> Option<f64> {
    match (before, after) {
        (Some(before), Some(after)) if pairs > 0 => Some((after - before) * 1e6 / pairs as f64),
        _ => None,
    }
}

/// W1: `clients` clients, each on its own connection and key, acquire and release in a loop.
/// `server_pid` (the root of the server's process tree) lets the CPU time per pair be read.
pub async fn uncontended<S: LockSystem>(
    system: &S,
    clients: usize,
    timing: Timing,
    key_prefix: &str,
    server_pid: Option<u32>,
) -> anyhow::Result<UncontendedResult> {
    let conns = connect_all(system, clients).await?;
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + timing.warmup;
    let end = measure_from + timing.duration;
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(index, mut conn)| {
            let key = format!("{key_prefix}/w1/{clients}/{index}");
            tokio::spawn(async move {
                let mut hist = histogram();
                tokio::time::sleep_until(start.into()).await;
                loop {
                    let began = Instant::now();
                    if began >= end {
                        break;
                    }
                    let token = conn
                        .acquire(&key, Some(UNCONTENDED_WAIT))
                        .await?
                        .ok_or_else(|| anyhow!("uncontended acquire of {key} was refused"))?;
                    conn.release(&key, token).await?;
                    let done = Instant::now();
                    if began >= measure_from && done <= end {
                        record(&mut hist, done - began);
                    }
                }
                anyhow::Ok(hist)
            })
        })
        .collect();
    tokio::time::sleep_until(measure_from.into()).await;
    let (server_before, bench_before) = cpu_now(server_pid);
    tokio::time::sleep_until(end.into()).await;
    let (server_after, bench_after) = cpu_now(server_pid);
    let mut total = histogram();
    for task in tasks {
        let hist = task.await.context("W1 client task")??;
        total.add(&hist).context("merge histograms")?;
    }
    #[allow(clippy::cast_precision_loss)]
    let pairs_per_s = total.len() as f64 / timing.duration.as_secs_f64();
    Ok(UncontendedResult {
        clients,
        pairs: total.len(),
        pairs_per_s,
        pair_p50_us: quantile_us(&total, 0.50),
        pair_p99_us: quantile_us(&total, 0.99),
        pair_max_us: quantile_us(&total, 1.0),
        server_cpu_us_per_pair: per_pair_us(server_before, server_after, total.len()),
        bench_cpu_us_per_pair: per_pair_us(bench_before, bench_after, total.len()),
    })
}

/// One grant in W2, as seen by its client.
#[derive(Clone, Copy, Debug)]
struct Hold {
    client: usize,
    granted: Instant,
    release_called: Instant,
    release_done: Instant,
}

/// Result of W2 for one hold time.
#[derive(Clone, Debug, Serialize)]
pub struct HotKeyResult {
    /// Contending clients.
    pub clients: usize,
    /// Hold time asked for.
    pub hold_ms: u64,
    /// Mean hold time actually observed (the timer's granularity shows here).
    pub hold_mean_us: f64,
    /// Grants counted.
    pub grants: u64,
    /// Grants per second.
    pub grants_per_s: f64,
    /// Handoff gap, median: from the previous holder calling release to the next grant
    /// arriving at its client.
    pub gap_p50_us: f64,
    /// Handoff gap, 99th percentile.
    pub gap_p99_us: f64,
    /// Handoff gap, largest.
    pub gap_max_us: f64,
    /// Gap measured from the previous release's completion instead (can be ≤ 0 when the next
    /// grant arrives before the releaser sees its own acknowledgement; clamped at 0).
    pub gap_after_release_done_p50_us: f64,
    /// As above, 99th percentile.
    pub gap_after_release_done_p99_us: f64,
    /// Fewest grants of one client in the measured window.
    pub grants_min: u64,
    /// Most grants of one client in the measured window.
    pub grants_max: u64,
    /// `grants_max / grants_min` (`None` when some client got none: starvation).
    pub fairness_max_over_min: Option<f64>,
    /// Acquires that timed out after [`HOT_KEY_WAIT`] and asked again.
    pub wait_timeouts: u64,
    /// Grants observed before the previous holder had called release: a mutual-exclusion
    /// violation (must be 0).
    pub overlaps: u64,
}

/// W2: `clients` clients contend for one key; each holds it for `hold` when granted.
pub async fn hot_key<S: LockSystem>(
    system: &S,
    clients: usize,
    hold: Duration,
    timing: Timing,
    key_prefix: &str,
) -> anyhow::Result<HotKeyResult> {
    let conns = connect_all(system, clients).await?;
    let key = format!("{key_prefix}/w2/{}", hold.as_millis());
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + timing.warmup;
    let end = measure_from + timing.duration;
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(client, mut conn)| {
            let key = key.clone();
            tokio::spawn(async move {
                let mut holds = Vec::new();
                let mut timeouts = 0_u64;
                tokio::time::sleep_until(start.into()).await;
                while Instant::now() < end {
                    let Some(token) = conn.acquire(&key, Some(HOT_KEY_WAIT)).await? else {
                        timeouts += 1;
                        continue;
                    };
                    let granted = Instant::now();
                    if !hold.is_zero() {
                        // tokio's timer has a 1 ms granularity and rounds up (a 1 ms sleep
                        // lasts about 2 ms); a thread sleep on the blocking pool is precise to
                        // tens of µs. Only the holder sleeps, so one blocking thread at a time.
                        tokio::task::spawn_blocking(move || std::thread::sleep(hold))
                            .await
                            .context("hold sleep")?;
                    }
                    let release_called = Instant::now();
                    conn.release(&key, token).await?;
                    holds.push(Hold {
                        client,
                        granted,
                        release_called,
                        release_done: Instant::now(),
                    });
                }
                anyhow::Ok((holds, timeouts))
            })
        })
        .collect();
    let mut holds = Vec::new();
    let mut wait_timeouts = 0;
    for task in tasks {
        let (client_holds, timeouts) = task.await.context("W2 client task")??;
        holds.extend(client_holds);
        wait_timeouts += timeouts;
    }
    Ok(summarize_hot_key(
        &holds,
        clients,
        hold,
        measure_from,
        end,
        timing.duration,
        wait_timeouts,
    ))
}

#[allow(clippy::cast_precision_loss)]
fn summarize_hot_key(
    holds: &[Hold],
    clients: usize,
    hold: Duration,
    measure_from: Instant,
    end: Instant,
    duration: Duration,
    wait_timeouts: u64,
) -> HotKeyResult {
    let mut holds = holds.to_vec();
    holds.sort_by_key(|hold| hold.granted);
    let mut gaps = histogram();
    let mut gaps_after_done = histogram();
    let mut overlaps = 0;
    let mut per_client = vec![0_u64; clients];
    let mut hold_total = Duration::ZERO;
    for (index, current) in holds.iter().enumerate() {
        if current.granted < measure_from || current.granted >= end {
            continue;
        }
        per_client[current.client] += 1;
        hold_total += current.release_called - current.granted;
        let Some(previous) = index.checked_sub(1).map(|prev| holds[prev]) else {
            continue;
        };
        if current.granted < previous.release_called {
            overlaps += 1;
            continue;
        }
        record(&mut gaps, current.granted - previous.release_called);
        record(
            &mut gaps_after_done,
            current
                .granted
                .saturating_duration_since(previous.release_done),
        );
    }
    let grants: u64 = per_client.iter().sum();
    let grants_min = per_client.iter().copied().min().unwrap_or(0);
    let grants_max = per_client.iter().copied().max().unwrap_or(0);
    HotKeyResult {
        clients,
        hold_ms: u64::try_from(hold.as_millis()).unwrap_or(u64::MAX),
        hold_mean_us: if grants == 0 {
            0.0
        } else {
            hold_total.as_secs_f64() * 1e6 / grants as f64
        },
        grants,
        grants_per_s: grants as f64 / duration.as_secs_f64(),
        gap_p50_us: quantile_us(&gaps, 0.50),
        gap_p99_us: quantile_us(&gaps, 0.99),
        gap_max_us: quantile_us(&gaps, 1.0),
        gap_after_release_done_p50_us: quantile_us(&gaps_after_done, 0.50),
        gap_after_release_done_p99_us: quantile_us(&gaps_after_done, 0.99),
        grants_min,
        grants_max,
        fairness_max_over_min: (grants_min > 0).then(|| grants_max as f64 / grants_min as f64),
        wait_timeouts,
        overlaps,
    }
}

/// Locks held by one connection in W3/W4.
pub struct Held<S: LockSystem> {
    /// The connection that holds them (dropping it may release them: PostgreSQL, MariaDB).
    pub conn: S::Conn,
    /// Key and token of each grant.
    pub grants: Vec<(String, <S::Conn as LockConn>::Token)>,
}

/// Acquires `locks` distinct keys spread over the open connections `conns`, all concurrently,
/// and keeps them. Returns the holders and the time it took.
pub async fn acquire_many<S: LockSystem>(
    conns: Vec<S::Conn>,
    locks: usize,
    key_prefix: &str,
) -> anyhow::Result<(Vec<Held<S>>, Duration)> {
    let clients = conns.len().max(1);
    let began = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(client, mut conn)| {
            let key_prefix = key_prefix.to_owned();
            tokio::spawn(async move {
                let mut grants = Vec::with_capacity(locks / clients + 1);
                for index in (client..locks).step_by(clients) {
                    let key = format!("{key_prefix}/{index}");
                    let token = conn
                        .acquire(&key, Some(UNCONTENDED_WAIT))
                        .await
                        .with_context(|| {
                            format!("acquire of {key} ({} held so far)", grants.len())
                        })?
                        .ok_or_else(|| anyhow!("uncontended acquire of {key} was refused"))?;
                    grants.push((key, token));
                }
                anyhow::Ok(Held::<S> { conn, grants })
            })
        })
        .collect();
    let mut held = Vec::with_capacity(clients);
    for task in tasks {
        held.push(task.await.context("acquire task")??);
    }
    Ok((held, began.elapsed()))
}

/// Releases everything [`acquire_many`] took, concurrently per connection.
pub async fn release_all<S: LockSystem>(held: Vec<Held<S>>) -> anyhow::Result<Duration> {
    let began = Instant::now();
    let tasks: Vec<_> = held
        .into_iter()
        .map(|Held { mut conn, grants }| {
            tokio::spawn(async move {
                for (key, token) in grants {
                    conn.release(&key, token).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await.context("release task")??;
    }
    Ok(began.elapsed())
}

/// Result of W3.
#[derive(Clone, Debug, Serialize)]
pub struct HoldManyResult {
    /// Locks held at the end.
    pub locks: usize,
    /// Concurrent clients used to acquire them.
    pub clients: usize,
    /// Time to acquire them all.
    pub acquire_s: f64,
    /// Locks acquired per second.
    pub locks_per_s: f64,
    /// Server memory before (connections already open).
    pub mem_before: Option<MemSample>,
    /// Server memory with all locks held.
    pub mem_after: Option<MemSample>,
    /// (RSS after − RSS before) / locks.
    pub bytes_per_lock_rss: Option<f64>,
    /// (PSS after − PSS before) / locks: the figure for multi-process servers.
    pub bytes_per_lock_pss: Option<f64>,
    /// Time to release them all again (not a target; shown for completeness).
    pub release_s: f64,
}

/// Memory growth per lock, in bytes.
#[allow(clippy::cast_precision_loss)]
fn per_lock(before: u64, after: u64, locks: usize) -> f64 {
    (after as f64 - before as f64) * 1024.0 / locks.max(1) as f64
}

/// W3: hold `locks` locks at once; measure the time and the server's memory growth.
/// `server_pid` is the root of the server's process tree (`None`: memory not measured).
pub async fn hold_many<S: LockSystem>(
    system: &S,
    locks: usize,
    clients: usize,
    key_prefix: &str,
    server_pid: Option<u32>,
) -> anyhow::Result<HoldManyResult> {
    // Connections are open before the baseline: their memory is not the locks'.
    let conns = connect_all(system, clients).await?;
    let settle = Duration::from_millis(300);
    tokio::time::sleep(settle).await;
    let mem_before = server_pid.and_then(mem_sample);
    let (held, took) = acquire_many::<S>(conns, locks, &format!("{key_prefix}/w3")).await?;
    tokio::time::sleep(settle).await;
    let mem_after = server_pid.and_then(mem_sample);
    let release = release_all(held).await?;
    let (bytes_per_lock_rss, bytes_per_lock_pss) = match (mem_before, mem_after) {
        (Some(before), Some(after)) => (
            Some(per_lock(before.rss_kib, after.rss_kib, locks)),
            Some(per_lock(before.pss_kib, after.pss_kib, locks)),
        ),
        _ => (None, None),
    };
    #[allow(clippy::cast_precision_loss)]
    let locks_per_s = locks as f64 / took.as_secs_f64();
    Ok(HoldManyResult {
        locks,
        clients,
        acquire_s: took.as_secs_f64(),
        locks_per_s,
        mem_before,
        mem_after,
        bytes_per_lock_rss,
        bytes_per_lock_pss,
        release_s: release.as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, us: u64) -> Instant {
        base + Duration::from_micros(us)
    }

    #[test]
    fn gaps_fairness_and_overlaps() {
        let base = Instant::now();
        let holds = vec![
            Hold {
                client: 0,
                granted: at(base, 0),
                release_called: at(base, 100),
                release_done: at(base, 150),
            },
            Hold {
                client: 1,
                granted: at(base, 140),
                release_called: at(base, 200),
                release_done: at(base, 260),
            },
            Hold {
                client: 0,
                granted: at(base, 250),
                release_called: at(base, 300),
                release_done: at(base, 330),
            },
            // Granted before client 0 called release: an overlap.
            Hold {
                client: 1,
                granted: at(base, 290),
                release_called: at(base, 400),
                release_done: at(base, 410),
            },
        ];
        let result = summarize_hot_key(
            &holds,
            2,
            Duration::ZERO,
            base,
            at(base, 1_000),
            Duration::from_secs(1),
            0,
        );
        assert_eq!(result.grants, 4);
        assert_eq!(result.overlaps, 1);
        assert_eq!((result.grants_min, result.grants_max), (2, 2));
        assert_eq!(result.fairness_max_over_min, Some(1.0));
        // Gaps 40 µs and 50 µs from the release calls.
        assert!(
            (result.gap_p50_us - 40.0).abs() < 0.5,
            "{}",
            result.gap_p50_us
        );
        assert!(
            (result.gap_max_us - 50.0).abs() < 0.5,
            "{}",
            result.gap_max_us
        );
    }

    #[test]
    fn starvation_has_no_ratio() {
        let base = Instant::now();
        let holds = vec![Hold {
            client: 0,
            granted: at(base, 10),
            release_called: at(base, 20),
            release_done: at(base, 30),
        }];
        let result = summarize_hot_key(
            &holds,
            3,
            Duration::ZERO,
            base,
            at(base, 1_000),
            Duration::from_secs(1),
            0,
        );
        assert_eq!(result.grants_min, 0);
        assert_eq!(result.fairness_max_over_min, None);
    }
}
