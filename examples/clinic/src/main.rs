//! `clinic`: the reference application of holdfast (see the crate's README).

use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use clinic::{AppState, Config, ImportLock, Store};

/// The clinic service: appointment booking, patient records, vocabulary imports, schedule swaps
/// and FIFO stock, each protected by holdfast.
#[derive(Debug, Parser)]
#[command(name = "clinic", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the bound address is printed on stdout
    /// as `listening on http://ADDR`).
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: String,
    /// Database: sqlite://FILE?mode=rwc (embedded default), postgres://…, or mysql://… (MariaDB ≥ 10.5).
    #[arg(
        long,
        env = "CLINIC_DATABASE_URL",
        default_value = "sqlite://clinic.db?mode=rwc"
    )]
    database_url: String,
    /// The holdfast server (vocabulary imports and schedule swaps need it).
    #[arg(
        long,
        env = "CLINIC_HOLDFAST_URL",
        default_value = "http://127.0.0.1:7390"
    )]
    holdfast_url: String,
    /// Bearer token for the holdfast server.
    #[arg(long, env = "CLINIC_HOLDFAST_TOKEN", hide_env_values = true)]
    holdfast_token: Option<String>,
    /// Prefix of the clinic's table names.
    #[arg(long, default_value = "clinic_")]
    table_prefix: String,
    /// FIFO layer locking (seed 004's lock_strategy): `nowait` fails fast and retries the
    /// transaction with backoff; `wait` queues on the row locks.
    #[arg(long, value_parser = ["nowait", "wait"], default_value = "nowait")]
    stock_lock: String,
    /// How long a patient-record edit lock lasts unless released, in seconds.
    #[arg(long, default_value_t = 900)]
    record_lock_ttl_secs: u64,
    /// Where the per-code-type import lock lives: `service` (the holdfast server) or `database`
    /// (PostgreSQL advisory lock / MariaDB GET_LOCK; not on SQLite).
    #[arg(long, value_parser = ["service", "database"], default_value = "service")]
    import_lock: String,
    /// How long a vocabulary import waits for another import of its code type, in seconds.
    #[arg(long, default_value_t = 60)]
    import_wait_secs: u64,
    /// Pooled database connections.
    #[arg(long, default_value_t = clinic::db::POOL_CONNECTIONS_MAX_DEFAULT)]
    db_connections: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let store = Store::connect(&args.database_url, &args.table_prefix, args.db_connections)
        .await
        .with_context(|| format!("opening {}", redact(&args.database_url)))?;
    clinic::migrate(&store)
        .await
        .context("creating the tables")?;
    let holdfast = holdfast_client::Client::builder()
        .base_url(args.holdfast_url.clone())
        .token_opt(args.holdfast_token.clone())
        .request_timeout(std::time::Duration::from_secs(10))
        .connect_timeout(std::time::Duration::from_secs(3))
        .build()
        .context("configuring the holdfast client")?;
    let config = Config {
        stock_nowait: args.stock_lock == "nowait",
        record_lock_ttl: std::time::Duration::from_secs(args.record_lock_ttl_secs),
        import_wait: std::time::Duration::from_secs(args.import_wait_secs),
        import_lock: if args.import_lock == "database" {
            ImportLock::Database
        } else {
            ImportLock::Service
        },
        ..Config::default()
    };
    let state = Arc::new(AppState::new(store, Some(holdfast), config));
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    // On stdout, for scripts and tests that start the clinic on port 0.
    println!("listening on http://{addr}");
    tracing::info!(listen = %addr, database = %redact(&args.database_url), holdfast = %args.holdfast_url, "clinic listening");
    axum::serve(listener, clinic::router(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving")?;
    Ok(())
}

/// The URL without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}
