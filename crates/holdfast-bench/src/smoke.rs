//! `holdfast-bench --smoke`: every holdfast workload path, briefly, against one server, with
//! sanity checks on the figures. It runs in CI (through `tests/smoke.rs`) so the benchmark
//! cannot rot; it measures nothing worth quoting.

use std::time::Duration;

use crate::report::{Metrics, Row, Workload};
use crate::run::{Config, HoldfastTarget, HoldfastTransport, SystemId};
use crate::workload::Timing;

/// The configuration of a smoke run against the server at `base_url` (over the wire protocol
/// when `wire` is given, else over HTTP).
#[must_use]
pub fn smoke_config(base_url: &str, wire: Option<&str>) -> Config {
    Config {
        systems: vec![SystemId::HoldfastMemory],
        workloads: vec![Workload::W1, Workload::W2, Workload::W3],
        timing: Timing {
            warmup: Duration::from_millis(200),
            duration: Duration::from_millis(800),
        },
        w1_clients: vec![1, 4],
        w2_clients: 4,
        w2_holds_ms: vec![0, 1],
        w3_locks: 2_000,
        w3_clients: 8,
        w4_locks: 0,
        w4_clients: 0,
        rounds: 1,
        redis_url: String::new(),
        postgres_url: String::new(),
        mysql_url: String::new(),
        etcd_endpoint: String::new(),
        holdfast: HoldfastTarget::External {
            url: base_url.to_owned(),
            wire: wire.map(str::to_owned),
        },
        holdfast_transport: if wire.is_some() {
            HoldfastTransport::Wire
        } else {
            HoldfastTransport::Client
        },
        command: "holdfast-bench --smoke".to_owned(),
        notes: vec!["smoke run: figures are not benchmarks".to_owned()],
    }
}

/// Runs the smoke workloads against `base_url` and checks that every row ran and is sane.
pub async fn smoke(base_url: &str, wire: Option<&str>) -> anyhow::Result<crate::report::Report> {
    let report = crate::run::run(smoke_config(base_url, wire)).await?;
    check(&report.rows)?;
    Ok(report)
}

/// Every row ran, produced work, and W2 saw no overlap.
pub fn check(rows: &[Row]) -> anyhow::Result<()> {
    anyhow::ensure!(!rows.is_empty(), "smoke run produced no rows");
    for row in rows {
        let Some(metrics) = &row.metrics else {
            anyhow::bail!(
                "{:?} {} failed: {}",
                row.workload,
                row.system,
                row.error.as_deref().unwrap_or("no figures")
            );
        };
        match metrics {
            Metrics::Uncontended(r) => {
                anyhow::ensure!(r.pairs > 0, "W1 {} clients: no pairs", r.clients)
            }
            Metrics::HotKey(r) => {
                anyhow::ensure!(r.grants > 0, "W2 hold {} ms: no grants", r.hold_ms);
                anyhow::ensure!(
                    r.overlaps == 0,
                    "W2 hold {} ms: {} overlapping grants",
                    r.hold_ms,
                    r.overlaps
                );
            }
            Metrics::HoldMany(r) => {
                anyhow::ensure!(r.locks > 0 && r.acquire_s > 0.0, "W3: nothing held")
            }
            Metrics::Recovery(r) => anyhow::ensure!(
                r.recovered_locks.is_none_or(|n| n as usize == r.locks),
                "W4: {} locks held, {:?} after restart",
                r.locks,
                r.recovered_locks
            ),
        }
    }
    Ok(())
}
