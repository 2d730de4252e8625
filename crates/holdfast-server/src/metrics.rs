//! Prometheus metrics (rendered on the server's own `GET /metrics`) and the in-process
//! percentiles of `GET /v1/stats`.
//!
//! The `metrics` recorder is global to the process; it is installed once (several servers in
//! one test process share it, so their series add up there; `/v1/stats` is per server).

use std::sync::OnceLock;

use hdrhistogram::Histogram;
use holdfast_api::Percentiles;
use holdfast_core::{Event, EventKind};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Grants (reentrant joins included).
pub const GRANTS: &str = "holdfast_grants_total";
/// Voluntary releases.
pub const RELEASES: &str = "holdfast_releases_total";
/// Wait timeouts.
pub const TIMEOUTS: &str = "holdfast_wait_timeouts_total";
/// Deadlock refusals.
pub const DEADLOCKS: &str = "holdfast_deadlocks_total";
/// Locks lost by lease expiry.
pub const EXPIRATIONS: &str = "holdfast_expirations_total";
/// Locks force-released by an admin.
pub const FORCE_RELEASES: &str = "holdfast_force_releases_total";
/// Seconds a granted request waited in the queue.
pub const WAIT_SECONDS: &str = "holdfast_wait_seconds";
/// Seconds a lock was held until release, expiry or force release.
pub const HOLD_SECONDS: &str = "holdfast_hold_seconds";
/// Seconds one store commit took (including its fsync in `sync` mode).
pub const COMMIT_SECONDS: &str = "holdfast_store_commit_seconds";
/// Commands applied per batch (one commit).
pub const BATCH_COMMANDS: &str = "holdfast_store_batch_commands";
/// Store commits.
pub const COMMITS: &str = "holdfast_store_commits_total";
/// Durable (fsynced) store commits.
pub const FSYNCS: &str = "holdfast_store_fsyncs_total";
/// HTTP requests by `route` (matched path template) and `status`.
pub const HTTP_REQUESTS: &str = "holdfast_http_requests_total";
/// Keys with holders.
pub const ACTIVE_LOCKS: &str = "holdfast_active_locks";
/// Live leases.
pub const LEASES: &str = "holdfast_leases";
/// Queued requests.
pub const WAITERS: &str = "holdfast_waiters";

/// How often histogram samples are folded into their buckets when nobody scrapes `/metrics`.
pub const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Fold histogram samples into their buckets every [`UPKEEP_EVERY`] until `shutdown` turns
/// true. The exporter keeps every recorded sample until an upkeep (a scrape does one): a
/// server nobody scrapes grew by ≈ 24 bytes per acquire+release pair without this loop
/// (W1 at 64 clients: +27 MB in 20 s).
pub async fn upkeep(mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut every = tokio::time::interval(UPKEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => prometheus().run_upkeep(),
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// The process-wide Prometheus handle (installs the recorder on first use).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let seconds = [
            0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 3600.0,
        ];
        let batch = [
            1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
        ];
        let builder = || {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &seconds)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(BATCH_COMMANDS.to_owned()), &batch)
                })
        };
        match builder() {
            Ok(b) => {
                let recorder = b.build_recorder();
                let handle = recorder.handle();
                if metrics::set_global_recorder(recorder).is_err() {
                    tracing::warn!(
                        "a metrics recorder is already installed; /metrics will be empty"
                    );
                }
                // Register the counters so they are listed (at 0) before their first event.
                for name in [
                    GRANTS,
                    RELEASES,
                    TIMEOUTS,
                    DEADLOCKS,
                    EXPIRATIONS,
                    FORCE_RELEASES,
                    COMMITS,
                    FSYNCS,
                ] {
                    metrics::counter!(name).increment(0);
                }
                handle
            }
            Err(e) => {
                tracing::warn!("metrics setup failed: {e}");
                PrometheusBuilder::new().build_recorder().handle()
            }
        }
    })
}

/// Per-server wait and hold time histograms (for `/v1/stats` percentiles), and the handles of
/// the Prometheus series every event updates.
pub struct Latencies {
    wait_ms: Histogram<u64>,
    hold_ms: Histogram<u64>,
    series: EventSeries,
}

/// Handles resolved once: `metrics::counter!(NAME)` looks the series up in the registry on
/// every call (a hash and a lock), which showed in the W1 profile at two events per pair.
struct EventSeries {
    grants: metrics::Counter,
    releases: metrics::Counter,
    expirations: metrics::Counter,
    force_releases: metrics::Counter,
    timeouts: metrics::Counter,
    deadlocks: metrics::Counter,
    wait_seconds: metrics::Histogram,
    hold_seconds: metrics::Histogram,
}

impl EventSeries {
    fn new() -> Self {
        // Handles taken before the recorder is installed would be no-ops.
        let _ = prometheus();
        Self {
            grants: metrics::counter!(GRANTS),
            releases: metrics::counter!(RELEASES),
            expirations: metrics::counter!(EXPIRATIONS),
            force_releases: metrics::counter!(FORCE_RELEASES),
            timeouts: metrics::counter!(TIMEOUTS),
            deadlocks: metrics::counter!(DEADLOCKS),
            wait_seconds: metrics::histogram!(WAIT_SECONDS),
            hold_seconds: metrics::histogram!(HOLD_SECONDS),
        }
    }
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    /// Empty histograms.
    #[must_use]
    pub fn new() -> Self {
        // 3 significant digits, auto-resizing: bounded by the value range, not the sample count.
        let make = || {
            let mut h = Histogram::<u64>::new(3).unwrap_or_else(|_| unreachable_histogram());
            h.auto(true);
            h
        };
        Self {
            wait_ms: make(),
            hold_ms: make(),
            series: EventSeries::new(),
        }
    }

    /// Count an event in the Prometheus metrics and the histograms.
    pub fn record(&mut self, e: &Event) {
        #[allow(clippy::cast_precision_loss)]
        let secs = |ms: u64| ms as f64 / 1000.0;
        let series = &self.series;
        match &e.kind {
            EventKind::Granted => series.grants.increment(1),
            EventKind::Released => series.releases.increment(1),
            EventKind::Expired => series.expirations.increment(1),
            EventKind::ForceReleased { .. } => series.force_releases.increment(1),
            EventKind::TimedOut => series.timeouts.increment(1),
            EventKind::Deadlock => series.deadlocks.increment(1),
            EventKind::Renewed => {}
        }
        if let Some(ms) = e.waited_ms {
            series.wait_seconds.record(secs(ms));
            let _ = self.wait_ms.record(ms);
        }
        if let Some(ms) = e.held_ms {
            series.hold_seconds.record(secs(ms));
            let _ = self.hold_ms.record(ms);
        }
    }

    /// Wait time percentiles.
    #[must_use]
    pub fn wait(&self) -> Percentiles {
        percentiles(&self.wait_ms)
    }

    /// Hold time percentiles.
    #[must_use]
    pub fn hold(&self) -> Percentiles {
        percentiles(&self.hold_ms)
    }
}

fn unreachable_histogram() -> Histogram<u64> {
    // `new(3)` only fails for sigfig > 5; keep a valid fallback rather than panic.
    Histogram::<u64>::new_with_bounds(1, u64::MAX / 2, 2).unwrap_or_else(|_| std::process::abort())
}

#[allow(clippy::cast_precision_loss)]
fn percentiles(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        p50: h.value_at_quantile(0.5) as f64,
        p90: h.value_at_quantile(0.9) as f64,
        p99: h.value_at_quantile(0.99) as f64,
        max: h.max() as f64,
        count: h.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn upkeep_runs_until_shutdown_and_then_stops() {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(upkeep(stopped));
        // Several periods pass: the loop keeps running.
        tokio::time::sleep(UPKEEP_EVERY * 3).await;
        assert!(!task.is_finished());
        stop.send_replace(true);
        tokio::time::timeout(UPKEEP_EVERY, task)
            .await
            .expect("upkeep did not stop at shutdown")
            .unwrap();
    }
}
