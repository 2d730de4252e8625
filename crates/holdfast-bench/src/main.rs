//! `holdfast-bench`: see the crate documentation of `holdfast_bench` and docs/benchmarks.md.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use holdfast_bench::report::Workload;
use holdfast_bench::run::{Config, HoldfastTarget, HoldfastTransport, SystemId};
use holdfast_bench::workload::Timing;

/// mimalloc, as in the `holdfast` binary. With glibc's allocator, the first allocation after
/// W4 dropped its million grants ran `malloc_consolidate` for ~1 s inside the restart being
/// measured (seen with `perf`: the server was idle while the benchmark's readiness probe waited
/// on its own allocator). The allocator serves every system's clients alike.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Side-by-side benchmark of holdfast against Redis, PostgreSQL advisory locks, MariaDB
/// GET_LOCK and etcd v3 locks. Start the peers first: `bash scripts/bench-peers.sh start`.
#[derive(Parser, Debug)]
#[command(name = "holdfast-bench", version, about)]
struct Args {
    /// A few seconds, holdfast only (an in-process memory server unless --holdfast-url):
    /// checks that every workload path works. Used by CI.
    #[arg(long)]
    smoke: bool,
    /// Systems to run, comma-separated, in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = SystemId::ALL.to_vec())]
    systems: Vec<SystemId>,
    /// Workloads to run, comma-separated (w1,w2,w3,w4).
    #[arg(long, value_delimiter = ',', default_value = "w1,w2,w3,w4", value_parser = parse_workload)]
    workloads: Vec<Workload>,
    /// Measured duration of each W1/W2 configuration (e.g. 3s, 500ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Warm-up before each W1/W2 measurement, not counted.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// W1 client counts.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    w1_clients: Vec<usize>,
    /// W2 clients on the hot key.
    #[arg(long, default_value_t = 16)]
    w2_clients: usize,
    /// W2 hold times in milliseconds.
    #[arg(long, value_delimiter = ',', default_value = "0,1")]
    w2_hold_ms: Vec<u64>,
    /// W3 locks held at once.
    #[arg(long, default_value_t = 100_000)]
    w3_locks: usize,
    /// W3 concurrent clients acquiring them.
    #[arg(long, default_value_t = 64)]
    w3_clients: usize,
    /// W4 locks held when the server is killed.
    #[arg(long, default_value_t = 1_000_000)]
    w4_locks: usize,
    /// W4 concurrent clients acquiring them.
    #[arg(long, default_value_t = 64)]
    w4_clients: usize,
    /// Run W1 and W2 this many times, every system once per round, and report per
    /// configuration the round with the median pairs/s or grants/s (every round goes to the
    /// JSON). On a shared machine one round's ratios move by 20–40 %. W3 and W4 run once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=25))]
    rounds: u64,
    /// Redis.
    #[arg(
        long,
        env = "HOLDFAST_BENCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6390"
    )]
    redis_url: String,
    /// PostgreSQL.
    #[arg(
        long,
        env = "HOLDFAST_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5433/test"
    )]
    postgres_url: String,
    /// MariaDB.
    #[arg(
        long,
        env = "HOLDFAST_BENCH_MYSQL_URL",
        default_value = "mysql://root@127.0.0.1:3307/test"
    )]
    mysql_url: String,
    /// etcd client endpoint.
    #[arg(
        long,
        env = "HOLDFAST_BENCH_ETCD_ENDPOINT",
        default_value = "http://127.0.0.1:2389"
    )]
    etcd_endpoint: String,
    /// The `holdfast` binary to start (default: next to this executable).
    #[arg(long)]
    holdfast_bin: Option<PathBuf>,
    /// Measure an already running holdfast server instead of starting one per mode.
    #[arg(long)]
    holdfast_url: Option<String>,
    /// The peers' environment file written by `scripts/bench-peers.sh start`; its values are
    /// used where no flag or environment variable is given.
    #[arg(long, default_value = "/tmp/holdfast-bench-peers/peers.env")]
    peers_env: PathBuf,
    /// How to drive holdfast: `wire` (holdfast-client over the wire protocol, the fast path),
    /// `client` (holdfast-client over HTTP only) or `http` (bare HTTP requests, to see what the
    /// client itself costs).
    #[arg(long, value_enum, default_value = "wire")]
    holdfast_transport: HoldfastTransport,
    /// The wire-protocol address of the server given by --holdfast-url [default: its port + 1].
    #[arg(long)]
    holdfast_wire: Option<String>,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn parse_workload(text: &str) -> Result<Workload, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "w1" => Ok(Workload::W1),
        "w2" => Ok(Workload::W2),
        "w3" => Ok(Workload::W3),
        "w4" => Ok(Workload::W4),
        other => Err(format!("unknown workload {other:?} (w1, w2, w3, w4)")),
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((text, "s"), |at| text.split_at(at));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("bad duration {text:?}"))?;
    let seconds = match unit {
        "ms" => value / 1_000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("bad duration unit in {text:?} (ms, s, m)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|err| format!("{text:?}: {err}"))
}

/// The peers' env file: its `KEY=value` lines, and its `# fallback:` / `# unavailable:`
/// remarks (which go into the report's notes).
fn load_peers_env(path: &std::path::Path) -> (Vec<(String, String)>, Vec<String>) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return (Vec::new(), Vec::new());
    };
    let mut values = Vec::new();
    let mut notes = Vec::new();
    for line in text.lines() {
        if let Some(remark) = line
            .strip_prefix("# fallback:")
            .or_else(|| line.strip_prefix("# unavailable:"))
        {
            notes.push(format!("peers: {}", remark.trim()));
        } else if !line.starts_with('#')
            && let Some((key, value)) = line.split_once('=')
        {
            values.push((key.trim().to_owned(), value.trim().to_owned()));
        }
    }
    (values, notes)
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("holdfast-bench: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<std::process::ExitCode> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    if args.smoke {
        return runtime.block_on(smoke(args));
    }
    runtime.block_on(full(args))
}

async fn smoke(args: Args) -> anyhow::Result<std::process::ExitCode> {
    let report = if let Some(url) = &args.holdfast_url {
        let wire = args.holdfast_wire.clone().or_else(|| wire_beside(url));
        holdfast_bench::smoke::smoke(url, wire.as_deref()).await?
    } else {
        // An in-process server in memory mode: the smoke run needs no built `holdfast` binary.
        let server = holdfast_server::start(holdfast_server::ServerConfig::ephemeral_memory())
            .await
            .context("start an in-process holdfast server")?;
        let wire = server.wire_addr.map(|a| a.to_string());
        let report = holdfast_bench::smoke::smoke(&server.base_url(), wire.as_deref()).await;
        server.shutdown().await;
        report?
    };
    println!("{}", report.to_markdown());
    write_json(args.json.as_deref(), &report)?;
    println!("smoke: ok");
    Ok(std::process::ExitCode::SUCCESS)
}

async fn full(args: Args) -> anyhow::Result<std::process::ExitCode> {
    let (defaults, notes) = load_peers_env(&args.peers_env);
    // A flag or environment variable wins; otherwise the peers' env file; otherwise the
    // default (the bench script's private ports).
    let from_file = |key: &str, given: String, flag_default: &str| -> String {
        if given != flag_default || std::env::var_os(key).is_some() {
            return given;
        }
        defaults
            .iter()
            .find(|(k, _)| k == key)
            .map_or(given, |(_, value)| value.clone())
    };
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let config = Config {
        systems: args.systems.clone(),
        workloads: args.workloads.clone(),
        timing: Timing {
            warmup: args.warmup,
            duration: args.duration,
        },
        w1_clients: args.w1_clients.clone(),
        w2_clients: args.w2_clients,
        w2_holds_ms: args.w2_hold_ms.clone(),
        w3_locks: args.w3_locks,
        w3_clients: args.w3_clients,
        w4_locks: args.w4_locks,
        w4_clients: args.w4_clients,
        rounds: usize::try_from(args.rounds).unwrap_or(1),
        redis_url: from_file(
            "HOLDFAST_BENCH_REDIS_URL",
            args.redis_url.clone(),
            "redis://127.0.0.1:6390",
        ),
        postgres_url: from_file(
            "HOLDFAST_BENCH_POSTGRES_URL",
            args.postgres_url.clone(),
            "postgres://postgres@127.0.0.1:5433/test",
        ),
        mysql_url: from_file(
            "HOLDFAST_BENCH_MYSQL_URL",
            args.mysql_url.clone(),
            "mysql://root@127.0.0.1:3307/test",
        ),
        etcd_endpoint: from_file(
            "HOLDFAST_BENCH_ETCD_ENDPOINT",
            args.etcd_endpoint.clone(),
            "http://127.0.0.1:2389",
        ),
        holdfast: match &args.holdfast_url {
            Some(url) => HoldfastTarget::External {
                url: url.clone(),
                wire: args.holdfast_wire.clone().or_else(|| wire_beside(url)),
            },
            None => HoldfastTarget::Spawn(
                args.holdfast_bin
                    .clone()
                    .unwrap_or_else(holdfast_bench::server_process::default_holdfast_bin),
            ),
        },
        holdfast_transport: args.holdfast_transport,
        command,
        notes,
    };
    let report = holdfast_bench::run::run(config).await?;
    println!("{}", report.to_markdown());
    write_json(args.json.as_deref(), &report)?;
    Ok(std::process::ExitCode::SUCCESS)
}

fn write_json(
    path: Option<&std::path::Path>,
    report: &holdfast_bench::report::Report,
) -> anyhow::Result<()> {
    if let Some(path) = path {
        let json = serde_json::to_string_pretty(report).context("serialize report")?;
        std::fs::write(path, json).with_context(|| format!("write {}", path.display()))?;
        eprintln!("holdfast-bench: JSON written to {}", path.display());
    }
    Ok(())
}

/// `http://HOST:PORT` → `HOST:PORT+1`, the server's default wire address.
fn wire_beside(url: &str) -> Option<String> {
    let rest = url.split("://").nth(1)?.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    Some(format!("{host}:{}", port.checked_add(1)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_wire_address_is_the_next_port() {
        assert_eq!(
            super::wire_beside("http://127.0.0.1:7390/").as_deref(),
            Some("127.0.0.1:7391")
        );
        assert_eq!(super::wire_beside("127.0.0.1"), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("3h").is_err());
    }
}
