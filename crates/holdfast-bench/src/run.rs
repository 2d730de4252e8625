//! One benchmark run: every selected system, one after the other (never two at once, so no
//! system's clients compete with another system's), through every selected workload.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

use crate::adapter::{Durability, LockConn as _, LockSystem};
use crate::adapters::mariadb::MariaDbSystem;
use crate::adapters::postgres::PostgresSystem;
use crate::adapters::redis::RedisSystem;
use crate::procfs::{mem_sample, pid_listening_on, port_of};
use crate::report::{Meta, Metrics, PeerInfo, RecoveryResult, Report, Row, Workload};
use crate::server_process::{ServerProcess, ServerSpec, ready_probe, wait_ready};
use crate::workload::{self, Timing};

/// The systems a run can measure.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, clap::ValueEnum)]
pub enum SystemId {
    /// Redis `SET NX PX`.
    Redis,
    /// PostgreSQL advisory locks.
    Postgres,
    /// MariaDB `GET_LOCK`.
    Mariadb,
    /// etcd v3 lock service (needs the `etcd` feature).
    Etcd,
    /// holdfast, `--durability memory`.
    HoldfastMemory,
    /// holdfast, `--durability async`.
    HoldfastAsync,
    /// holdfast, `--durability sync`.
    HoldfastSync,
}

impl SystemId {
    /// Every system, in table order.
    pub const ALL: [SystemId; 7] = [
        SystemId::Redis,
        SystemId::Postgres,
        SystemId::Mariadb,
        SystemId::Etcd,
        SystemId::HoldfastMemory,
        SystemId::HoldfastAsync,
        SystemId::HoldfastSync,
    ];

    /// Name used in tables.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            SystemId::Redis => "redis",
            SystemId::Postgres => "postgres",
            SystemId::Mariadb => "mariadb",
            SystemId::Etcd => "etcd",
            SystemId::HoldfastMemory => "holdfast-memory",
            SystemId::HoldfastAsync => "holdfast-async",
            SystemId::HoldfastSync => "holdfast-sync",
        }
    }

    /// The `--durability` of a holdfast system.
    fn holdfast_mode(self) -> Option<(&'static str, Durability)> {
        match self {
            SystemId::HoldfastMemory => Some(("memory", Durability::MemoryOnly)),
            SystemId::HoldfastAsync => Some(("async", Durability::AsyncFsync)),
            SystemId::HoldfastSync => Some(("sync", Durability::GroupCommit)),
            _ => None,
        }
    }
}

/// How the benchmark talks to holdfast.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum HoldfastTransport {
    /// `holdfast-client` over the wire protocol (`ClientBuilder::wire`): what an application
    /// that wants speed uses.
    Wire,
    /// `holdfast-client` over HTTP only (guards with background renewal).
    Client,
    /// Bare HTTP/JSON requests with reqwest (one request per acquire and per release).
    Http,
}

impl HoldfastTransport {
    /// For the report.
    #[must_use]
    pub fn describe(self) -> &'static str {
        match self {
            HoldfastTransport::Wire => {
                "holdfast-client over the wire protocol (framed TCP; compact create and release where the server offers them, JSON otherwise)"
            }
            HoldfastTransport::Client => "holdfast-client (HTTP/1.1 + JSON)",
            HoldfastTransport::Http => "bare HTTP/1.1 + JSON requests (reqwest)",
        }
    }
}

/// Builds the holdfast adapter for a server: (table name, base URL, wire address, durability).
type MakeHoldfast<S> = fn(&str, &str, Option<&str>, Durability) -> S;

/// Which server the holdfast rows measure.
#[derive(Clone, Debug)]
pub enum HoldfastTarget {
    /// Start `holdfast serve` from this binary, one process per durability (and per W3/W4).
    Spawn(PathBuf),
    /// An already running server (its durability is whatever it was started with; memory
    /// figures need its PID, so W3 reports none, and W4 cannot restart it).
    External {
        /// `http://HOST:PORT`.
        url: String,
        /// Its wire-protocol address, if it has one.
        wire: Option<String>,
    },
}

/// Everything a run needs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Systems, in this order.
    pub systems: Vec<SystemId>,
    /// Workloads to run.
    pub workloads: Vec<Workload>,
    /// W1/W2 warm-up and duration.
    pub timing: Timing,
    /// W1 client counts.
    pub w1_clients: Vec<usize>,
    /// W2 clients.
    pub w2_clients: usize,
    /// W2 hold times.
    pub w2_holds_ms: Vec<u64>,
    /// W3 locks.
    pub w3_locks: usize,
    /// W3 clients.
    pub w3_clients: usize,
    /// W4 locks.
    pub w4_locks: usize,
    /// W4 clients.
    pub w4_clients: usize,
    /// W1 and W2 run this many times (every system once per round, in order); the report
    /// keeps, per configuration, the round with the median throughput. W3 and W4 run once.
    pub rounds: usize,
    /// Redis URL.
    pub redis_url: String,
    /// PostgreSQL URL.
    pub postgres_url: String,
    /// MariaDB URL.
    pub mysql_url: String,
    /// etcd endpoint.
    pub etcd_endpoint: String,
    /// holdfast server.
    pub holdfast: HoldfastTarget,
    /// How holdfast is driven.
    pub holdfast_transport: HoldfastTransport,
    /// The command line, for the report.
    pub command: String,
    /// Remarks to carry into the report (fallbacks found by the caller).
    pub notes: Vec<String>,
}

/// Prints progress on stderr (the tables go to stdout).
macro_rules! progress {
    ($($arg:tt)*) => { eprintln!("holdfast-bench: {}", format!($($arg)*)) };
}

/// A unique key prefix per run, so that leftovers of an earlier run never collide.
fn key_prefix() -> String {
    format!("hfb/{:08x}", rand::random::<u32>())
}

/// Runs W1, W2 and W3 (those selected) on one system and appends the rows.
async fn run_system<S: LockSystem>(
    system: &S,
    server_pid: Option<u32>,
    config: &Config,
    workloads: &[Workload],
    rows: &mut Vec<Row>,
) {
    let prefix = key_prefix();
    let row = |workload, clients, hold_ms, outcome: anyhow::Result<Metrics>| Row {
        workload,
        system: system.name().to_owned(),
        durability: system.durability(),
        clients,
        hold_ms,
        error: outcome.as_ref().err().map(|err| format!("{err:#}")),
        round: None,
        metrics: outcome.ok(),
    };
    if workloads.contains(&Workload::W1) {
        for &clients in &config.w1_clients {
            progress!("{} W1 {clients} clients", system.name());
            let outcome =
                workload::uncontended(system, clients, config.timing, &prefix, server_pid)
                    .await
                    .map(Metrics::Uncontended);
            report_error(system.name(), &outcome);
            rows.push(row(Workload::W1, clients, None, outcome));
        }
    }
    if workloads.contains(&Workload::W2) {
        for &hold_ms in &config.w2_holds_ms {
            progress!(
                "{} W2 {} clients, hold {hold_ms} ms",
                system.name(),
                config.w2_clients
            );
            let hold = Duration::from_millis(hold_ms);
            let outcome =
                workload::hot_key(system, config.w2_clients, hold, config.timing, &prefix)
                    .await
                    .map(Metrics::HotKey);
            report_error(system.name(), &outcome);
            rows.push(row(Workload::W2, config.w2_clients, Some(hold_ms), outcome));
        }
    }
    if workloads.contains(&Workload::W3) {
        progress!(
            "{} W3 {} locks, {} clients",
            system.name(),
            config.w3_locks,
            config.w3_clients
        );
        let outcome = workload::hold_many(
            system,
            config.w3_locks,
            config.w3_clients,
            &prefix,
            server_pid,
        )
        .await
        .map(Metrics::HoldMany);
        report_error(system.name(), &outcome);
        rows.push(row(Workload::W3, config.w3_clients, None, outcome));
    }
}

fn report_error<T>(system: &str, outcome: &anyhow::Result<T>) {
    if let Err(err) = outcome {
        progress!("{system}: failed: {err:#}");
    }
}

/// Rows saying why a system did not run.
fn unavailable_rows(
    id: SystemId,
    durability: Durability,
    config: &Config,
    workloads: &[Workload],
    why: &str,
) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut push = |workload, clients, hold_ms| {
        rows.push(Row {
            workload,
            system: id.name().to_owned(),
            durability,
            clients,
            hold_ms,
            metrics: None,
            error: Some(why.to_owned()),
            round: None,
        });
    };
    if workloads.contains(&Workload::W1) {
        for &clients in &config.w1_clients {
            push(Workload::W1, clients, None);
        }
    }
    if workloads.contains(&Workload::W2) {
        for &hold_ms in &config.w2_holds_ms {
            push(Workload::W2, config.w2_clients, Some(hold_ms));
        }
    }
    if workloads.contains(&Workload::W3) {
        push(Workload::W3, config.w3_clients, None);
    }
    rows
}

/// Checks that one connection can be opened; the rows of an unreachable system say why.
async fn reachable<S: LockSystem>(system: &S) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(10), system.connect()).await {
        Ok(Ok(_conn)) => Ok(()),
        Ok(Err(err)) => Err(format!("unreachable: {err:#}")),
        Err(_) => Err("unreachable: connect timed out".to_owned()),
    }
}

/// What Redis persists, from `CONFIG GET` (the adapter's rows carry it).
async fn redis_durability(url: &str) -> anyhow::Result<(Durability, String)> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let appendonly: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendonly")
        .query_async(&mut conn)
        .await?;
    let appendfsync: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendfsync")
        .query_async(&mut conn)
        .await?;
    let save: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("save")
        .query_async(&mut conn)
        .await?;
    let version: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await?;
    let version = version
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_owned();
    let appendonly = appendonly.get(1).map(String::as_str) == Some("yes");
    let appendfsync = appendfsync.get(1).cloned().unwrap_or_default();
    let save = save.get(1).cloned().unwrap_or_default();
    let durability = match (appendonly, appendfsync.as_str()) {
        (true, "always") => Durability::FsyncPerChange,
        (true, _) => Durability::AsyncFsync,
        (false, _) => Durability::MemoryOnly,
    };
    Ok((
        durability,
        format!(
            "redis {version}; appendonly={appendonly} appendfsync={appendfsync} save=\"{save}\""
        ),
    ))
}

async fn sql_version(system: SystemId, url: &str) -> String {
    use sqlx::Connection as _;
    let query = "SELECT version()";
    match system {
        SystemId::Postgres => match sqlx::PgConnection::connect(url).await {
            Ok(mut conn) => {
                let fsync: Option<String> = sqlx::query_scalar("SHOW fsync")
                    .fetch_one(&mut conn)
                    .await
                    .ok();
                let locks: Option<String> = sqlx::query_scalar("SHOW max_locks_per_transaction")
                    .fetch_one(&mut conn)
                    .await
                    .ok();
                let version: Option<String> =
                    sqlx::query_scalar(query).fetch_one(&mut conn).await.ok();
                format!(
                    "{}; fsync={}; max_locks_per_transaction={}",
                    version
                        .unwrap_or_default()
                        .split(" on ")
                        .next()
                        .unwrap_or_default(),
                    fsync.unwrap_or_default(),
                    locks.unwrap_or_default()
                )
            }
            Err(err) => format!("unreachable: {err}"),
        },
        _ => match sqlx::MySqlConnection::connect(url).await {
            Ok(mut conn) => sqlx::query_scalar::<_, String>(query)
                .fetch_one(&mut conn)
                .await
                .map_or_else(|err| err.to_string(), |v| format!("MariaDB {v}")),
            Err(err) => format!("unreachable: {err}"),
        },
    }
}

fn peer(system: SystemId, url: &str, note: String) -> PeerInfo {
    let pid = port_of(url).and_then(pid_listening_on);
    let private = matches!(port_of(url), Some(6390 | 5433 | 3307 | 2389));
    let origin = if private {
        "private instance (scripts/bench-peers.sh)"
    } else {
        "this machine's service (not the bench script's)"
    };
    PeerInfo {
        system: system.name().to_owned(),
        url: url.to_owned(),
        pid,
        note: format!("{origin}; {note}"),
    }
}

/// The whole run.
pub async fn run(config: Config) -> anyhow::Result<Report> {
    let (nproc, cpu_model) = crate::procfs::machine();
    let load_at_start = crate::procfs::load_average();
    let mut notes = config.notes.clone();
    let mut peers = Vec::new();
    let rounds = config.rounds.max(1);
    let loopback = if config.workloads.contains(&Workload::W2) {
        progress!("loopback floor (round trips between two threads)");
        let timing = config.timing;
        let measured = tokio::task::spawn_blocking(move || {
            crate::floor::measure(timing.warmup, timing.duration)
        })
        .await
        .map_err(anyhow::Error::from)
        .and_then(|floor| floor);
        measured
            .inspect_err(|e| notes.push(format!("loopback floor not measured: {e:#}")))
            .ok()
    } else {
        None
    };
    let mut by_round: Vec<Vec<Row>> = Vec::new();
    for round in 1..=rounds {
        let mut this = config.clone();
        if round > 1 {
            this.workloads
                .retain(|w| matches!(w, Workload::W1 | Workload::W2));
            if this.workloads.is_empty() {
                break;
            }
            progress!("round {round} of {rounds} (W1, W2)");
        }
        let mut rows = Vec::new();
        // The peers are looked up once; later rounds meet the same ones.
        let mut again = Vec::new();
        let round_peers = if round == 1 { &mut peers } else { &mut again };
        run_round(&this, &mut rows, &mut notes, round_peers).await;
        for row in &mut rows {
            row.round = Some(round);
        }
        by_round.push(rows);
    }
    // Later rounds repeat the first round's remarks.
    let mut seen = std::collections::HashSet::new();
    notes.retain(|n| seen.insert(n.clone()));
    let rounds = by_round.len();
    if rounds == 1 {
        for row in by_round.iter_mut().flatten() {
            row.round = None;
        }
    }
    let round_rows: Vec<Row> = if rounds > 1 {
        by_round.iter().flatten().cloned().collect()
    } else {
        Vec::new()
    };
    let rows = median_rows(by_round);
    let mut report = Report {
        meta: Meta {
            date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            nproc,
            cpu_model,
            command: config.command.clone(),
            load_average: (load_at_start, crate::procfs::load_average()),
            timing: config.timing,
            holdfast_transport: config.holdfast_transport.describe().to_owned(),
            rounds,
            peers,
        },
        rows,
        round_rows,
        loopback,
        targets: Vec::new(),
        notes,
    };
    let w1_clients = config.w1_clients.iter().copied().max().unwrap_or(64);
    report.check_targets(w1_clients, config.w2_clients, &config.w2_holds_ms);
    Ok(report)
}

/// One round: every system in order, the workloads of `config`.
async fn run_round(
    config: &Config,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
    peers: &mut Vec<PeerInfo>,
) {
    let peer_workloads: Vec<Workload> = config
        .workloads
        .iter()
        .copied()
        .filter(|w| *w != Workload::W4)
        .collect();
    for &id in &config.systems {
        match id {
            SystemId::Redis => {
                let (durability, note) = match redis_durability(&config.redis_url).await {
                    Ok(found) => found,
                    Err(err) => (Durability::MemoryOnly, format!("unreachable: {err}")),
                };
                let info = peer(id, &config.redis_url, note);
                let pid = info.pid;
                peers.push(info);
                match RedisSystem::new(&config.redis_url, durability) {
                    Ok(system) => match reachable(&system).await {
                        Ok(()) => run_system(&system, pid, config, &peer_workloads, rows).await,
                        Err(why) => rows.extend(unavailable_rows(
                            id,
                            durability,
                            config,
                            &peer_workloads,
                            &why,
                        )),
                    },
                    Err(err) => rows.extend(unavailable_rows(
                        id,
                        durability,
                        config,
                        &peer_workloads,
                        &format!("{err:#}"),
                    )),
                }
            }
            SystemId::Postgres => {
                let info = peer(
                    id,
                    &config.postgres_url,
                    sql_version(id, &config.postgres_url).await,
                );
                let pid = info.pid;
                peers.push(info);
                let system = PostgresSystem::new(&config.postgres_url);
                match reachable(&system).await {
                    Ok(()) => run_system(&system, pid, config, &peer_workloads, rows).await,
                    Err(why) => rows.extend(unavailable_rows(
                        id,
                        system.durability(),
                        config,
                        &peer_workloads,
                        &why,
                    )),
                }
            }
            SystemId::Mariadb => {
                let info = peer(
                    id,
                    &config.mysql_url,
                    sql_version(id, &config.mysql_url).await,
                );
                let pid = info.pid;
                peers.push(info);
                let system = MariaDbSystem::new(&config.mysql_url);
                match reachable(&system).await {
                    Ok(()) => run_system(&system, pid, config, &peer_workloads, rows).await,
                    Err(why) => rows.extend(unavailable_rows(
                        id,
                        system.durability(),
                        config,
                        &peer_workloads,
                        &why,
                    )),
                }
            }
            SystemId::Etcd => run_etcd(config, &peer_workloads, rows, peers, notes).await,
            SystemId::HoldfastMemory | SystemId::HoldfastAsync | SystemId::HoldfastSync => {
                run_holdfast(id, config, rows, notes).await;
            }
        }
    }
}

#[cfg(feature = "etcd")]
async fn run_etcd(
    config: &Config,
    workloads: &[Workload],
    rows: &mut Vec<Row>,
    peers: &mut Vec<PeerInfo>,
    _notes: &mut Vec<String>,
) {
    let system = crate::adapters::etcd::EtcdSystem::new(&config.etcd_endpoint);
    let info = peer(
        SystemId::Etcd,
        &config.etcd_endpoint,
        "etcd v3 lock API, lease per lock as `etcdctl lock`".to_owned(),
    );
    let pid = info.pid;
    peers.push(info);
    match reachable(&system).await {
        Ok(()) => run_system(&system, pid, config, workloads, rows).await,
        Err(why) => rows.extend(unavailable_rows(
            SystemId::Etcd,
            system.durability(),
            config,
            workloads,
            &why,
        )),
    }
}

#[cfg(not(feature = "etcd"))]
async fn run_etcd(
    config: &Config,
    workloads: &[Workload],
    rows: &mut Vec<Row>,
    _peers: &mut Vec<PeerInfo>,
    notes: &mut Vec<String>,
) {
    let why = "holdfast-bench was built without the `etcd` feature (it needs protoc)";
    notes.push(format!("etcd: {why}; build with `--features etcd`."));
    rows.extend(unavailable_rows(
        SystemId::Etcd,
        Durability::GroupCommit,
        config,
        workloads,
        why,
    ));
}

/// Flags every benchmark server gets beyond listen/durability/data dir: none. The defaults are
/// measured as shipped (`leases_per_token_max` does not apply to a server without tokens, so
/// W3/W4's anonymous leases need no raised limit).
fn holdfast_extra_args(_config: &Config) -> Vec<String> {
    Vec::new()
}

fn spawn_holdfast(
    bin: &std::path::Path,
    mode: &str,
    config: &Config,
) -> anyhow::Result<(ServerProcess, tempfile::TempDir)> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("holdfast-bench-{mode}-"))
        .tempdir()
        .context("temp dir")?;
    let spec = ServerSpec {
        bin: bin.to_path_buf(),
        durability: mode.to_owned(),
        data_dir: dir.path().join("data"),
        log: dir.path().join("server.log"),
        extra_args: holdfast_extra_args(config),
    };
    let server = ServerProcess::start(&spec)?;
    Ok((server, dir))
}

async fn run_holdfast(id: SystemId, config: &Config, rows: &mut Vec<Row>, notes: &mut Vec<String>) {
    use crate::adapters::{
        holdfast_client::HoldfastClientSystem, holdfast_http::HoldfastHttpSystem,
    };
    match config.holdfast_transport {
        HoldfastTransport::Wire => {
            run_holdfast_with::<HoldfastClientSystem>(
                id,
                config,
                rows,
                notes,
                HoldfastClientSystem::with_wire,
            )
            .await;
        }
        HoldfastTransport::Client => {
            run_holdfast_with::<HoldfastClientSystem>(
                id,
                config,
                rows,
                notes,
                HoldfastClientSystem::new,
            )
            .await;
        }
        HoldfastTransport::Http => {
            run_holdfast_with::<HoldfastHttpSystem>(
                id,
                config,
                rows,
                notes,
                HoldfastHttpSystem::new,
            )
            .await;
        }
    }
}

async fn run_holdfast_with<S: LockSystem>(
    id: SystemId,
    config: &Config,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
    make: MakeHoldfast<S>,
) {
    let Some((mode, durability)) = id.holdfast_mode() else {
        return;
    };
    let name = id.name();
    let w12: Vec<Workload> = config
        .workloads
        .iter()
        .copied()
        .filter(|w| matches!(w, Workload::W1 | Workload::W2))
        .collect();
    match &config.holdfast {
        HoldfastTarget::External { url, wire } => {
            notes.push(format!("{name}: measured against the running server at {url} (its durability is whatever it was started with)"));
            let system = make(name, url, wire.as_deref(), durability);
            let workloads: Vec<Workload> = config
                .workloads
                .iter()
                .copied()
                .filter(|w| *w != Workload::W4)
                .collect();
            run_system(&system, None, config, &workloads, rows).await;
        }
        HoldfastTarget::Spawn(bin) => {
            // W1 and W2 on one server; W3 and W4 each on a fresh one, so that memory and
            // recovery start from an empty server.
            if !w12.is_empty() {
                match spawn_holdfast(bin, mode, config) {
                    Ok((mut server, _dir)) => {
                        let system = make(
                            name,
                            &server.base_url,
                            server.wire_addr.as_deref(),
                            durability,
                        );
                        run_system(&system, Some(server.pid()), config, &w12, rows).await;
                        server.stop(Duration::from_secs(10));
                    }
                    Err(err) => rows.extend(unavailable_rows(
                        id,
                        durability,
                        config,
                        &w12,
                        &format!("{err:#}"),
                    )),
                }
            }
            if config.workloads.contains(&Workload::W3) {
                match spawn_holdfast(bin, mode, config) {
                    Ok((mut server, _dir)) => {
                        let system = make(
                            name,
                            &server.base_url,
                            server.wire_addr.as_deref(),
                            durability,
                        );
                        run_system(&system, Some(server.pid()), config, &[Workload::W3], rows)
                            .await;
                        server.stop(Duration::from_secs(10));
                    }
                    Err(err) => rows.extend(unavailable_rows(
                        id,
                        durability,
                        config,
                        &[Workload::W3],
                        &format!("{err:#}"),
                    )),
                }
            }
            if config.workloads.contains(&Workload::W4) && id == SystemId::HoldfastSync {
                progress!(
                    "{name} W4 {} locks, {} clients",
                    config.w4_locks,
                    config.w4_clients
                );
                let outcome = recovery(bin, config, make).await.map(Metrics::Recovery);
                report_error(name, &outcome);
                rows.push(Row {
                    workload: Workload::W4,
                    system: name.to_owned(),
                    durability,
                    clients: config.w4_clients,
                    hold_ms: None,
                    error: outcome.as_ref().err().map(|err| format!("{err:#}")),
                    round: None,
                    metrics: outcome.ok(),
                });
            }
        }
    }
}

/// W4: a sync server holding `w4_locks` leases is killed with SIGKILL and restarted on the same
/// data; recovery time is spawn → `/readyz` 200.
async fn recovery<S: LockSystem>(
    bin: &std::path::Path,
    config: &Config,
    make: MakeHoldfast<S>,
) -> anyhow::Result<RecoveryResult> {
    let (mut server, dir) = spawn_holdfast(bin, "sync", config)?;
    let system = make(
        "holdfast-sync",
        &server.base_url,
        server.wire_addr.as_deref(),
        Durability::GroupCommit,
    );
    let (held, took) = acquire_with(&system, config.w4_clients, config.w4_locks).await?;
    let rss_kib_before_kill = mem_sample(server.pid()).map(|sample| sample.rss_kib);
    // Kill, then forget the grants without releasing them, and close the dead connections
    // before the restart is spawned: tearing down a million grants and the clients' tasks is
    // the benchmark's own work and must not share the measured window with the restart.
    server.kill9();
    for holder in held {
        holder
            .grants
            .into_iter()
            .for_each(|(_, token)| S::Conn::abandon(token));
        drop(holder.conn);
    }
    drop(system);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let probe = ready_probe()?;
    let spec = ServerSpec {
        bin: bin.to_path_buf(),
        durability: "sync".to_owned(),
        data_dir: dir.path().join("data"),
        log: dir.path().join("server.log"),
        extra_args: holdfast_extra_args(config),
    };
    let mut restarted = ServerProcess::start(&spec)?;
    let ready_at = wait_ready(&probe, &restarted.base_url, Duration::from_secs(600)).await?;
    let restart_to_ready = ready_at - restarted.spawned_at;
    let recovered_locks = active_locks(&restarted.base_url).await.ok();
    restarted.stop(Duration::from_secs(10));
    Ok(RecoveryResult {
        locks: config.w4_locks,
        clients: config.w4_clients,
        acquire_s: took.as_secs_f64(),
        rss_kib_before_kill,
        stop: "SIGKILL".to_owned(),
        restart_to_listening_s: restarted.to_listening.as_secs_f64(),
        restart_to_ready_s: restart_to_ready.as_secs_f64(),
        recovered_locks,
    })
}

async fn acquire_with<S: LockSystem>(
    system: &S,
    clients: usize,
    locks: usize,
) -> anyhow::Result<(Vec<workload::Held<S>>, Duration)> {
    let conns = workload::connect_all(system, clients).await?;
    workload::acquire_many::<S>(conns, locks, &format!("{}/w4", key_prefix())).await
}

/// `active_locks` of `GET /v1/stats`.
async fn active_locks(base_url: &str) -> anyhow::Result<u64> {
    let stats: holdfast_api::StatsResponse = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?
        .get(format!("{base_url}/v1/stats"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(stats.active_locks)
}

/// The rows of the first round (every workload), with each W1 and W2 configuration replaced
/// by its round with the median throughput (pairs/s, grants/s; the lower middle for an even
/// count). A whole row is kept, so its figures stay those of one measurement.
fn median_rows(by_round: Vec<Vec<Row>>) -> Vec<Row> {
    let mut rounds = by_round.into_iter();
    let Some(first) = rounds.next() else {
        return Vec::new();
    };
    let later: Vec<Row> = rounds.flatten().collect();
    first
        .into_iter()
        .map(|row| {
            if !matches!(row.workload, Workload::W1 | Workload::W2) {
                return row;
            }
            let mut measured: Vec<(f64, &Row)> = std::iter::once(&row)
                .chain(later.iter().filter(|r| {
                    r.workload == row.workload
                        && r.system == row.system
                        && r.clients == row.clients
                        && r.hold_ms == row.hold_ms
                }))
                .filter_map(|r| Some((throughput(r)?, r)))
                .collect();
            if measured.is_empty() {
                // Failed in every round: the first round's error stands.
                return row;
            }
            measured.sort_by(|a, b| a.0.total_cmp(&b.0));
            measured[(measured.len() - 1) / 2].1.clone()
        })
        .collect()
}

/// W1's pairs/s or W2's grants/s, if the row has them.
fn throughput(row: &Row) -> Option<f64> {
    match row.metrics.as_ref()? {
        Metrics::Uncontended(r) => Some(r.pairs_per_s),
        Metrics::HotKey(r) => Some(r.grants_per_s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::UncontendedResult;

    /// A W1 row whose p50 carries its round, so a row mixed from two rounds would show.
    fn w1(system: &str, clients: usize, pairs_per_s: f64, round: usize) -> Row {
        Row {
            workload: Workload::W1,
            system: system.to_owned(),
            durability: Durability::MemoryOnly,
            clients,
            hold_ms: None,
            metrics: Some(Metrics::Uncontended(UncontendedResult {
                clients,
                pairs: 1,
                pairs_per_s,
                pair_p50_us: f64::from(u32::try_from(round).unwrap()),
                pair_p99_us: 1.0,
                pair_max_us: 1.0,
                server_cpu_us_per_pair: None,
                bench_cpu_us_per_pair: None,
            })),
            error: None,
            round: Some(round),
        }
    }

    fn failed(system: &str, clients: usize, round: usize) -> Row {
        Row {
            metrics: None,
            error: Some("refused".to_owned()),
            ..w1(system, clients, 0.0, round)
        }
    }

    fn summary(rows: &[Row]) -> Vec<(String, usize, Option<usize>, f64)> {
        rows.iter()
            .map(|r| {
                let p50 = match &r.metrics {
                    Some(Metrics::Uncontended(m)) => m.pair_p50_us,
                    _ => -1.0,
                };
                (r.system.clone(), r.clients, r.round, p50)
            })
            .collect()
    }

    #[test]
    fn each_configuration_keeps_its_median_round_whole_in_the_first_rounds_order() {
        let rows = median_rows(vec![
            vec![
                w1("a", 1, 10.0, 1),
                w1("a", 64, 300.0, 1),
                w1("b", 1, 50.0, 1),
            ],
            vec![
                w1("b", 1, 40.0, 2),
                w1("a", 1, 30.0, 2),
                w1("a", 64, 100.0, 2),
            ],
            vec![
                w1("a", 1, 20.0, 3),
                w1("a", 64, 200.0, 3),
                w1("b", 1, 60.0, 3),
            ],
        ]);
        assert_eq!(
            summary(&rows),
            vec![
                ("a".to_owned(), 1, Some(3), 3.0),
                ("a".to_owned(), 64, Some(3), 3.0),
                ("b".to_owned(), 1, Some(1), 1.0),
            ]
        );
    }

    #[test]
    fn an_even_count_takes_the_lower_middle_and_failed_rounds_are_not_candidates() {
        let rows = median_rows(vec![
            vec![w1("a", 1, 10.0, 1), failed("b", 1, 1)],
            vec![w1("a", 1, 40.0, 2), failed("b", 1, 2)],
            vec![failed("a", 1, 3), w1("b", 1, 5.0, 3)],
        ]);
        // a: rounds 1 and 2 measured (10, 40): the lower middle is round 1. b measured only
        // in round 3: that round.
        assert_eq!(
            summary(&rows),
            vec![
                ("a".to_owned(), 1, Some(1), 1.0),
                ("b".to_owned(), 1, Some(3), 3.0),
            ]
        );
        // Failed in every round: the first round's failure.
        let none = median_rows(vec![vec![failed("a", 1, 1)], vec![failed("a", 1, 2)]]);
        assert_eq!(summary(&none), vec![("a".to_owned(), 1, Some(1), -1.0)]);
        // One round: the rows as they are.
        let one = median_rows(vec![vec![w1("a", 1, 10.0, 1)]]);
        assert_eq!(summary(&one), vec![("a".to_owned(), 1, Some(1), 1.0)]);
    }
}
