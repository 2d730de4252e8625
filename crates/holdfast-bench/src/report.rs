//! Results: rows (one per system × workload × parameter), the markdown tables printed at the
//! end of a run, the target checks (ratios between systems of the same run), and the JSON
//! document (`--json`).

use std::fmt::Write as _;

use serde::Serialize;

use crate::adapter::Durability;
use crate::floor::LoopbackFloor;
use crate::workload::{HoldManyResult, HotKeyResult, Timing, UncontendedResult};

/// The four workloads.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, PartialOrd, Ord)]
pub enum Workload {
    /// Uncontended acquire+release pairs.
    W1,
    /// One hot key.
    W2,
    /// Many held locks.
    W3,
    /// Restart recovery (holdfast only).
    W4,
}

/// Result of W4.
#[derive(Clone, Debug, Serialize)]
pub struct RecoveryResult {
    /// Leases (one lock each) held when the server was killed.
    pub locks: usize,
    /// Clients used to acquire them.
    pub clients: usize,
    /// Time to acquire them.
    pub acquire_s: f64,
    /// Server RSS with all of them held (KiB).
    pub rss_kib_before_kill: Option<u64>,
    /// How the server was stopped before the restart.
    pub stop: String,
    /// Restart: spawn → `listening on`.
    pub restart_to_listening_s: f64,
    /// Restart: spawn → `GET /readyz` 200. The W4 figure.
    pub restart_to_ready_s: f64,
    /// `active_locks` reported by `/v1/stats` after the restart (`None`: not available).
    pub recovered_locks: Option<u64>,
}

/// A row's figures.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Metrics {
    /// W1.
    Uncontended(UncontendedResult),
    /// W2.
    HotKey(HotKeyResult),
    /// W3.
    HoldMany(HoldManyResult),
    /// W4.
    Recovery(RecoveryResult),
}

/// One measured (or failed) configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Which workload.
    pub workload: Workload,
    /// System name.
    pub system: String,
    /// Durability class of the system as run.
    pub durability: Durability,
    /// Concurrent clients.
    pub clients: usize,
    /// W2's hold time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_ms: Option<u64>,
    /// Figures, if it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// Why it did not run or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Which round measured it, when W1/W2 ran in several (`--rounds`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub round: Option<usize>,
}

/// A peer as reached in this run.
#[derive(Clone, Debug, Serialize)]
pub struct PeerInfo {
    /// System name.
    pub system: String,
    /// URL or endpoint.
    pub url: String,
    /// PID of the server (root of its process tree), found from its listening port.
    pub pid: Option<u32>,
    /// Version string the server reported, if known.
    pub note: String,
}

/// Header of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Meta {
    /// UTC date and time of the run.
    pub date: String,
    /// Logical CPUs.
    pub nproc: usize,
    /// CPU model.
    pub cpu_model: String,
    /// The command line.
    pub command: String,
    /// 1-minute load average when the run started and when it ended: the machine is shared,
    /// and a load above `nproc` means other work competed with the systems measured.
    pub load_average: (Option<f64>, Option<f64>),
    /// Warm-up and measured duration of W1/W2.
    pub timing: Timing,
    /// How holdfast was driven (`client` or `http`).
    pub holdfast_transport: String,
    /// Rounds of W1/W2 (the tables show each configuration's median round).
    pub rounds: usize,
    /// The peers.
    pub peers: Vec<PeerInfo>,
}

/// One target of the issue, checked against this run.
#[derive(Clone, Debug, Serialize)]
pub struct TargetCheck {
    /// What is compared.
    pub target: String,
    /// Measured value (a ratio or an absolute figure, see `target`).
    pub measured: Option<f64>,
    /// The bound.
    pub bound: String,
    /// Met, missed, or `None` when a figure is missing.
    pub met: Option<bool>,
}

/// A whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Header.
    pub meta: Meta,
    /// Every row (W1/W2: each configuration's median round when there were several).
    pub rows: Vec<Row>,
    /// With several rounds, every round's W1/W2 rows (and the first round's W3/W4).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub round_rows: Vec<Row>,
    /// The loopback round trip measured in this run (with W2): the floor under any handoff.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loopback: Option<LoopbackFloor>,
    /// Targets, checked.
    pub targets: Vec<TargetCheck>,
    /// Remarks made during the run (fallbacks, skipped systems).
    pub notes: Vec<String>,
}

fn num(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

impl Report {
    fn metrics_of(
        &self,
        workload: Workload,
        system: &str,
        clients: usize,
        hold_ms: Option<u64>,
    ) -> Option<&Metrics> {
        self.rows
            .iter()
            .find(|row| {
                row.workload == workload
                    && row.system == system
                    && (workload == Workload::W3
                        || workload == Workload::W4
                        || row.clients == clients)
                    && row.hold_ms == hold_ms
            })
            .and_then(|row| row.metrics.as_ref())
    }

    fn pairs_per_s(&self, system: &str, clients: usize) -> Option<f64> {
        match self.metrics_of(Workload::W1, system, clients, None)? {
            Metrics::Uncontended(result) => Some(result.pairs_per_s),
            _ => None,
        }
    }

    fn hot_key(&self, system: &str, clients: usize, hold_ms: u64) -> Option<&HotKeyResult> {
        match self.metrics_of(Workload::W2, system, clients, Some(hold_ms))? {
            Metrics::HotKey(result) => Some(result),
            _ => None,
        }
    }

    /// Add a note unless an earlier check already made it (targets may be checked again).
    fn note_once(&mut self, note: String) {
        if !self.notes.contains(&note) {
            self.notes.push(note);
        }
    }

    /// Computes the targets from the rows (ratios within this run).
    pub fn check_targets(&mut self, w1_clients: usize, w2_clients: usize, w2_holds_ms: &[u64]) {
        let mut checks = Vec::new();
        let ratio =
            |target: String, numerator: Option<f64>, denominator: Option<f64>, at_least: f64| {
                let measured = match (numerator, denominator) {
                    (Some(n), Some(d)) if d > 0.0 => Some(n / d),
                    _ => None,
                };
                TargetCheck {
                    target,
                    measured,
                    bound: format!("≥ {at_least}×"),
                    met: measured.map(|m| m >= at_least),
                }
            };
        let c = w1_clients;
        checks.push(ratio(
            format!("W1 {c} clients: holdfast-memory / redis pairs/s"),
            self.pairs_per_s("holdfast-memory", c),
            self.pairs_per_s("redis", c),
            1.0,
        ));
        checks.push(ratio(
            format!("W1 {c} clients: holdfast-sync / etcd pairs/s"),
            self.pairs_per_s("holdfast-sync", c),
            self.pairs_per_s("etcd", c),
            5.0,
        ));
        checks.push(ratio(
            format!("W1 {c} clients: holdfast-sync / postgres pairs/s"),
            self.pairs_per_s("holdfast-sync", c),
            self.pairs_per_s("postgres", c),
            1.0,
        ));
        if let (Some(memory), Some(postgres)) = (
            self.pairs_per_s("holdfast-memory", c),
            self.pairs_per_s("postgres", c),
        ) && postgres >= memory
        {
            // A sync pair is a memory-mode pair (same engine, same connection path) plus two
            // durable commits, so sync cannot be faster than memory mode in the same run.
            let note = format!(
                "W1 {c} clients: PostgreSQL's advisory locks ({} pairs/s) ran at or above \
                 holdfast memory ({} pairs/s), which does everything holdfast sync does except \
                 the durable commit: holdfast sync ≥ 1.0× PostgreSQL cannot be met in this run",
                num(postgres),
                num(memory)
            );
            self.note_once(note);
        }
        let holdfast_systems = ["holdfast-memory", "holdfast-async", "holdfast-sync"];
        for &hold_ms in w2_holds_ms {
            for system in holdfast_systems {
                let Some(mine) = self.hot_key(system, w2_clients, hold_ms).cloned() else {
                    continue;
                };
                let postgres = self
                    .hot_key("postgres", w2_clients, hold_ms)
                    .map(|r| r.grants_per_s);
                checks.push(ratio(
                    format!("W2 hold {hold_ms} ms: {system} / postgres grants/s"),
                    Some(mine.grants_per_s),
                    postgres,
                    1.0,
                ));
                let redis_p99 = self
                    .hot_key("redis", w2_clients, hold_ms)
                    .map(|r| r.gap_p99_us);
                checks.push(TargetCheck {
                    target: format!("W2 hold {hold_ms} ms: {system} handoff p99 (µs)"),
                    measured: Some(mine.gap_p99_us),
                    bound: "≤ 1000 µs".to_owned(),
                    met: Some(mine.gap_p99_us <= 1000.0),
                });
                let vs_redis = redis_p99
                    .filter(|p99| *p99 > 0.0)
                    .map(|p99| mine.gap_p99_us / p99);
                checks.push(TargetCheck {
                    target: format!("W2 hold {hold_ms} ms: {system} / redis handoff p99"),
                    measured: vs_redis,
                    bound: "≤ 0.1×".to_owned(),
                    met: vs_redis.map(|r| r <= 0.1),
                });
                if let (Some(floor), Some(p99)) = (&self.loopback, redis_p99) {
                    // The bound is a 99th percentile, so it is held against the floor's: a
                    // handoff needs at least one loopback round trip (release to the server,
                    // grant to the next client), so its p99 cannot be below the round trip's.
                    let bound_us = p99 / 10.0;
                    let note = format!(
                        "W2 hold {hold_ms} ms: the ≤ 0.1× Redis bound on the handoff p99 is {} µs, \
                         below the p99 of this run's loopback round trip between two threads \
                         ({} µs; p50 {} µs): a handoff, which needs at least one such round \
                         trip, cannot meet it on this machine",
                        num(bound_us),
                        num(floor.p99_us),
                        num(floor.p50_us)
                    );
                    if bound_us < floor.p99_us {
                        self.note_once(note);
                    }
                }
                checks.push(TargetCheck {
                    target: format!("W2 hold {hold_ms} ms: {system} fairness max/min grants"),
                    measured: mine.fairness_max_over_min,
                    bound: "≤ 1.25".to_owned(),
                    met: Some(mine.fairness_max_over_min.is_some_and(|f| f <= 1.25)),
                });
            }
        }
        for system in holdfast_systems {
            if let Some(Metrics::HoldMany(result)) = self.metrics_of(Workload::W3, system, 0, None)
            {
                checks.push(TargetCheck {
                    target: format!("W3: {system} server memory per held lock (bytes, RSS)"),
                    measured: result.bytes_per_lock_rss,
                    bound: "≤ 256".to_owned(),
                    met: result.bytes_per_lock_rss.map(|b| b <= 256.0),
                });
            }
        }
        if let Some(Metrics::Recovery(result)) =
            self.metrics_of(Workload::W4, "holdfast-sync", 0, None)
        {
            checks.push(TargetCheck {
                target: format!(
                    "W4: holdfast-sync restart with {} locks → ready (s)",
                    result.locks
                ),
                measured: Some(result.restart_to_ready_s),
                bound: "≤ 2 s (at 1,000,000 locks)".to_owned(),
                met: Some(
                    result.restart_to_ready_s <= 2.0
                        && result
                            .recovered_locks
                            .is_none_or(|n| n as usize == result.locks),
                ),
            });
        }
        self.targets = checks;
    }

    /// The markdown rendering: header, one table per workload, the targets, the notes.
    #[must_use]
    #[allow(clippy::cast_precision_loss)] // KiB → MiB for display
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let meta = &self.meta;
        let _ = writeln!(
            out,
            "Run: {} · nproc {} · {}",
            meta.date, meta.nproc, meta.cpu_model
        );
        let _ = writeln!(out, "Command: `{}`", meta.command);
        let load = |value: Option<f64>| value.map_or_else(|| "?".to_owned(), |v| format!("{v:.2}"));
        let _ = writeln!(
            out,
            "Load average (1 min) at start {} and at end {} on {} CPUs.",
            load(meta.load_average.0),
            load(meta.load_average.1),
            meta.nproc
        );
        let _ = writeln!(
            out,
            "W1/W2: warm-up {:.1} s (not counted), measured {:.1} s; holdfast driven through {}.\n",
            meta.timing.warmup.as_secs_f64(),
            meta.timing.duration.as_secs_f64(),
            meta.holdfast_transport
        );
        if meta.rounds > 1 {
            let _ = writeln!(
                out,
                "W1/W2 ran in {} rounds (every system once per round); each row is the round with the median pairs/s or grants/s, every round is in the JSON (`round_rows`).\n",
                meta.rounds
            );
        }
        if !meta.peers.is_empty() {
            let _ = writeln!(
                out,
                "| peer | reached at | server pid | note |\n|---|---|---|---|"
            );
            for peer in &meta.peers {
                let pid = peer
                    .pid
                    .map_or_else(|| "?".to_owned(), |pid| pid.to_string());
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} |",
                    peer.system, peer.url, pid, peer.note
                );
            }
            out.push('\n');
        }
        self.table(
            &mut out,
            Workload::W1,
            "W1 uncontended: each client its own connection and key; acquire+release pairs",
            "| system | durability | clients | pairs/s | pair p50 µs | pair p99 µs | server CPU µs/pair | bench CPU µs/pair |\n|---|---|---:|---:|---:|---:|---:|---:|",
            |metrics| match metrics {
                Metrics::Uncontended(r) => format!(
                    "{} | {} | {} | {} | {} |",
                    num(r.pairs_per_s),
                    num(r.pair_p50_us),
                    num(r.pair_p99_us),
                    r.server_cpu_us_per_pair.map_or_else(|| "n/a".to_owned(), num),
                    r.bench_cpu_us_per_pair.map_or_else(|| "n/a".to_owned(), num),
                ),
                _ => String::new(),
            },
        );
        self.table(
            &mut out,
            Workload::W2,
            "W2 one hot key: handoff gap = previous holder's release call → next grant at its client",
            "| system | durability | clients | hold ms | grants/s | gap p50 µs | gap p99 µs | grants min–max | max/min |\n|---|---|---:|---:|---:|---:|---:|---:|---:|",
            |metrics| match metrics {
                Metrics::HotKey(r) => format!(
                    "{} | {} | {} | {}–{} | {} |",
                    num(r.grants_per_s),
                    num(r.gap_p50_us),
                    num(r.gap_p99_us),
                    r.grants_min,
                    r.grants_max,
                    r.fairness_max_over_min.map_or_else(|| "∞ (starved)".to_owned(), num),
                ),
                _ => String::new(),
            },
        );
        if let Some(floor) = &self.loopback {
            let _ = writeln!(
                out,
                "Loopback floor: one {}-byte round trip between two threads over loopback TCP \
                 (no runtime, no parsing; {} round trips): p50 {} µs, p99 {} µs. A handoff \
                 between two clients is at least one such round trip.\n",
                floor.message_bytes,
                floor.round_trips,
                num(floor.p50_us),
                num(floor.p99_us)
            );
        }
        self.table(
            &mut out,
            Workload::W3,
            "W3 many held locks: time to acquire them all, server memory growth per lock",
            "| system | durability | clients | locks | acquire s | locks/s | bytes/lock (RSS) | bytes/lock (PSS) |\n|---|---|---:|---:|---:|---:|---:|---:|",
            |metrics| match metrics {
                Metrics::HoldMany(r) => format!(
                    "{} | {} | {} | {} | {} |",
                    r.locks,
                    num(r.acquire_s),
                    num(r.locks_per_s),
                    r.bytes_per_lock_rss.map_or_else(|| "n/a".to_owned(), num),
                    r.bytes_per_lock_pss.map_or_else(|| "n/a".to_owned(), num),
                ),
                _ => String::new(),
            },
        );
        self.table(
            &mut out,
            Workload::W4,
            "W4 restart recovery (holdfast sync): server killed with SIGKILL holding the locks, restarted on the same data",
            "| system | durability | clients | locks | acquire s | RSS MiB held | stop | restart→listening s | restart→ready s | locks after restart |\n|---|---|---:|---:|---:|---:|---|---:|---:|---:|",
            |metrics| match metrics {
                Metrics::Recovery(r) => format!(
                    "{} | {} | {} | {} | {} | {} | {} |",
                    r.locks,
                    num(r.acquire_s),
                    r.rss_kib_before_kill.map_or_else(|| "n/a".to_owned(), |kib| num(kib as f64 / 1024.0)),
                    r.stop,
                    num(r.restart_to_listening_s),
                    num(r.restart_to_ready_s),
                    r.recovered_locks.map_or_else(|| "n/a".to_owned(), |n| n.to_string()),
                ),
                _ => String::new(),
            },
        );
        if !self.targets.is_empty() {
            let _ = writeln!(
                out,
                "Targets (ratios within this run)\n\n| target | measured | bound | |\n|---|---:|---|---|"
            );
            for check in &self.targets {
                let verdict = match check.met {
                    Some(true) => "met",
                    Some(false) => "**missed**",
                    None => "no figure",
                };
                let measured = check.measured.map_or_else(|| "n/a".to_owned(), num);
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} |",
                    check.target, measured, check.bound, verdict
                );
            }
            out.push('\n');
        }
        for note in &self.notes {
            let _ = writeln!(out, "- {note}");
        }
        out
    }

    fn table(
        &self,
        out: &mut String,
        workload: Workload,
        title: &str,
        header: &str,
        cells: impl Fn(&Metrics) -> String,
    ) {
        let rows: Vec<&Row> = self
            .rows
            .iter()
            .filter(|row| row.workload == workload)
            .collect();
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(out, "{title}\n\n{header}");
        let columns = header
            .lines()
            .next()
            .map_or(0, |line| line.matches('|').count() - 1);
        for row in rows {
            let mut line = format!(
                "| {} | {} | {} |",
                row.system,
                row.durability.label(),
                row.clients
            );
            if workload == Workload::W2 {
                let _ = write!(line, " {} |", row.hold_ms.unwrap_or(0));
            }
            match (&row.metrics, &row.error) {
                (Some(metrics), _) => {
                    let _ = write!(line, " {}", cells(metrics));
                }
                (None, error) => {
                    let filled = line.matches('|').count() - 1;
                    let reason = error
                        .as_deref()
                        .unwrap_or("not run")
                        .replace('|', "/")
                        .replace('\n', " ");
                    let _ = write!(line, " not run: {reason} |");
                    for _ in filled + 1..columns {
                        line.push_str(" |");
                    }
                }
            }
            let _ = writeln!(out, "{line}");
        }
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn hot_key_row(system: &str, gap_p99_us: f64) -> Row {
        Row {
            workload: Workload::W2,
            system: system.to_owned(),
            durability: Durability::MemoryOnly,
            clients: 16,
            hold_ms: Some(0),
            metrics: Some(Metrics::HotKey(HotKeyResult {
                clients: 16,
                hold_ms: 0,
                hold_mean_us: 0.0,
                grants: 1_000,
                grants_per_s: 10_000.0,
                gap_p50_us: gap_p99_us / 2.0,
                gap_p99_us,
                gap_max_us: gap_p99_us * 2.0,
                gap_after_release_done_p50_us: 0.0,
                gap_after_release_done_p99_us: 0.0,
                grants_min: 60,
                grants_max: 65,
                fairness_max_over_min: Some(65.0 / 60.0),
                wait_timeouts: 0,
                overlaps: 0,
            })),
            error: None,
            round: None,
        }
    }

    fn report(loopback: Option<LoopbackFloor>) -> Report {
        Report {
            meta: Meta {
                date: "2026-12-06 08:00 UTC".to_owned(),
                nproc: 2,
                cpu_model: "test".to_owned(),
                command: "holdfast-bench".to_owned(),
                load_average: (None, None),
                timing: Timing {
                    warmup: Duration::from_secs(1),
                    duration: Duration::from_secs(3),
                },
                holdfast_transport: "wire".to_owned(),
                rounds: 1,
                peers: Vec::new(),
            },
            rows: vec![
                hot_key_row("redis", 200.0),
                hot_key_row("holdfast-memory", 150.0),
            ],
            round_rows: Vec::new(),
            loopback,
            targets: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn floor(p50_us: f64) -> LoopbackFloor {
        LoopbackFloor {
            round_trips: 10_000,
            message_bytes: 64,
            p50_us,
            p99_us: p50_us * 3.0,
        }
    }

    #[test]
    fn a_handoff_bound_below_the_loopback_floor_is_named_in_the_notes_and_the_floor_is_shown() {
        let mut r = report(Some(floor(40.0)));
        r.check_targets(64, 16, &[0]);
        let vs_redis = r
            .targets
            .iter()
            .find(|t| t.target == "W2 hold 0 ms: holdfast-memory / redis handoff p99")
            .unwrap();
        assert_eq!(vs_redis.met, Some(false));
        assert_eq!(r.notes.len(), 1, "{:?}", r.notes);
        assert!(r.notes[0].contains("is 20.0 µs"), "{}", r.notes[0]);
        assert!(
            r.notes[0].contains("(120 µs; p50 40.0 µs)"),
            "{}",
            r.notes[0]
        );
        // Checking again does not repeat the note.
        r.check_targets(64, 16, &[0]);
        assert_eq!(r.notes.len(), 1);
        let markdown = r.to_markdown();
        assert!(markdown.contains("Loopback floor"), "{markdown}");
        assert!(markdown.contains("p50 40.0 µs, p99 120 µs"), "{markdown}");
    }

    #[test]
    fn the_bound_is_held_against_the_floors_p99() {
        // p50 10 µs is below the 20 µs bound, but the p99 (30 µs) is above it.
        let mut r = report(Some(floor(10.0)));
        r.check_targets(64, 16, &[0]);
        assert_eq!(r.notes.len(), 1, "{:?}", r.notes);
        assert!(
            r.notes[0].contains("(30.0 µs; p50 10.0 µs)"),
            "{}",
            r.notes[0]
        );
    }

    fn uncontended_row(system: &str, pairs_per_s: f64) -> Row {
        Row {
            workload: Workload::W1,
            system: system.to_owned(),
            durability: Durability::MemoryOnly,
            clients: 64,
            hold_ms: None,
            metrics: Some(Metrics::Uncontended(UncontendedResult {
                clients: 64,
                pairs: 1000,
                pairs_per_s,
                pair_p50_us: 100.0,
                pair_p99_us: 200.0,
                pair_max_us: 400.0,
                server_cpu_us_per_pair: None,
                bench_cpu_us_per_pair: None,
            })),
            error: None,
            round: None,
        }
    }

    #[test]
    fn a_postgres_rate_at_or_above_memory_modes_is_named_as_out_of_reach_for_sync() {
        let mut r = report(None);
        r.rows.push(uncontended_row("postgres", 80_000.0));
        r.rows.push(uncontended_row("holdfast-memory", 78_000.0));
        r.rows.push(uncontended_row("holdfast-sync", 40_000.0));
        r.check_targets(64, 16, &[]);
        assert_eq!(r.notes.len(), 1, "{:?}", r.notes);
        assert!(r.notes[0].contains("(80000 pairs/s)"), "{}", r.notes[0]);
        assert!(r.notes[0].contains("cannot be met"), "{}", r.notes[0]);
        r.check_targets(64, 16, &[]);
        assert_eq!(r.notes.len(), 1, "the note is not repeated");

        // Memory mode faster than PostgreSQL: sync's shortfall is its own, no note.
        let mut r = report(None);
        r.rows.push(uncontended_row("postgres", 70_000.0));
        r.rows.push(uncontended_row("holdfast-memory", 78_000.0));
        r.rows.push(uncontended_row("holdfast-sync", 40_000.0));
        r.check_targets(64, 16, &[]);
        assert!(r.notes.is_empty(), "{:?}", r.notes);
    }

    #[test]
    fn no_note_when_the_bound_is_above_the_floor_or_the_floor_was_not_measured() {
        // p99 15 µs, under the 20 µs bound.
        let mut r = report(Some(floor(5.0)));
        r.check_targets(64, 16, &[0]);
        assert!(r.notes.is_empty(), "{:?}", r.notes);
        let mut r = report(None);
        r.check_targets(64, 16, &[0]);
        assert!(r.notes.is_empty(), "{:?}", r.notes);
        assert!(!r.to_markdown().contains("Loopback floor"));
    }
}
