//! The `holdfast` command: `serve` runs the lock server; the other subcommands are clients of
//! a running server (see `holdfast --help` and `docs/cli.md`).

mod commands;
mod duration;
mod exec;
mod exit;
mod output;
mod run;

use std::ffi::OsString;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::duration::parse_duration;

/// mimalloc instead of the system allocator: smaller per-allocation overhead for the server's
/// many small records (memory per held lock) and much cheaper bulk frees (restart recovery).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The exit codes, shown by `holdfast --help` (and documented in docs/cli.md).
const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    success
  1    error (anything not listed below)
  2    usage error (bad flags or arguments)
  3    lock not acquired: held by someone else (no-wait), or every retry failed / the wait timed out
  4    lock lost: while `run` was running the command (the command was stopped: SIGTERM, then
       SIGKILL), or `renew` found the lease gone
  5    server unreachable or unavailable (connection refused, no answer in time, 503 overloaded)
  6    unauthorized or forbidden (token missing, wrong, or not allowed for the key)
  `run` otherwise exits with the command's own status (128+N if it was killed by signal N);
  126/127: the command could not be executed / was not found;
  128+N: `run` was stopped by signal N while waiting for the lock.";

/// holdfast: locks, leases and fencing tokens for business applications.
#[derive(Parser, Debug)]
#[command(name = "holdfast", version, about, after_help = EXIT_CODES_HELP)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Options of every client subcommand.
#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Server URL.
    #[arg(long, global = true, env = "HOLDFAST_URL", default_value = holdfast_client::SERVER_URL_DEFAULT)]
    pub server: String,
    /// Bearer token.
    #[arg(long, global = true, env = "HOLDFAST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Machine-readable JSON output on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// Time the server has to answer a request (on top of any wait).
    #[arg(long, global = true, value_parser = parse_duration, default_value = "10s")]
    pub request_timeout: Duration,
}

/// How to ask for locks (shared by `run` and `acquire`).
#[derive(Args, Debug, Clone)]
pub struct LockArgs {
    /// Key to lock; repeat for several keys, acquired atomically (all or none).
    #[arg(long = "lock", value_name = "KEY", required = true)]
    pub keys: Vec<String>,
    /// Take the keys in shared (readers) mode instead of exclusive.
    #[arg(long)]
    pub shared: bool,
    /// Lease TTL: renewed every third of it while `run` runs; how long the lock outlives a
    /// crashed runner (1s..30d; e.g. 500ms, 30s, 5m, 2h).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub ttl: Duration,
    /// Wait this long in the server's FIFO queue per attempt (0 = ask once and get an answer
    /// at once).
    #[arg(long, value_parser = parse_duration, default_value = "0")]
    pub wait: Duration,
    /// Attempts in all (seed 000: --lock-retry-attempts).
    #[arg(long, default_value_t = holdfast_client::retry::RETRY_ATTEMPTS_DEFAULT)]
    pub retry_attempts: u32,
    /// First delay between attempts, doubling with full jitter up to 5m per attempt; 0 =
    /// no-wait mode (seed 000: --lock-retry-delay; a bare number is seconds).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub retry_delay: Duration,
    /// No-wait mode: one attempt, fail at once if the lock is held (same as --retry-delay 0).
    #[arg(long)]
    pub no_wait: bool,
    /// Holder name shown to others [default: user@hostname:pid].
    #[arg(long)]
    pub holder: Option<String>,
    /// Why you hold it (shown to others).
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the lock server (embedded storage in ./holdfast-data, 127.0.0.1:7390, durability sync).
    Serve(holdfast_server::ServeArgs),
    /// Acquire locks, run a command while holding them (renewing the lease), release when it
    /// exits, and exit with its status.
    #[command(after_help = run::RUN_HELP)]
    Run(run::RunArgs),
    /// Acquire locks and print the lease (not renewed: renew or release it by id).
    Acquire(LockArgs),
    /// Release a lease (all its locks), or one of its keys with --key.
    Release {
        /// The lease id.
        lease_id: String,
        /// Release only this key (decrements a reentrant count).
        #[arg(long)]
        key: Option<String>,
    },
    /// Renew a lease (and all its locks).
    Renew {
        /// The lease id.
        lease_id: String,
        /// New TTL from now [default: the lease's TTL].
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    /// List held and awaited keys.
    Locks {
        /// Only keys starting with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Only keys held by this holder.
        #[arg(long)]
        holder: Option<String>,
    },
    /// Show one key: holders, waiters, lock-delay.
    Show {
        /// The key.
        key: String,
    },
    /// Server counters and wait/hold time percentiles.
    Stats,
    /// Follow the event stream (grants, releases, expiries, ...), one line per event.
    Events {
        /// Only keys starting with this.
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Administration (needs an admin token when tokens are configured).
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Internal: exec a command as `run`'s child, dying with its parent (Linux).
    #[command(name = "__exec", hide = true)]
    Exec(exec::ExecArgs),
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Force-release a key from all its holders (recorded with the reason).
    Release {
        /// The key.
        key: String,
        /// Why (required; recorded in the audit log and the event stream).
        #[arg(long)]
        reason: String,
    },
    /// Force-release a whole lease.
    ReleaseLease {
        /// The lease id.
        lease_id: String,
        /// Why (required).
        #[arg(long)]
        reason: String,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Serve(args) => {
            disable_transparent_huge_pages();
            holdfast_server::memory::set_release_hook(release_free_memory);
            match holdfast_server::serve_blocking(args) {
                Ok(()) => 0,
                Err(err) => {
                    eprintln!("holdfast serve: {err}");
                    exit::GENERIC
                }
            }
        }
        Command::Exec(args) => exec::exec(&args),
        command => client_main(&cli.global, command),
    };
    std::process::ExitCode::from(code)
}

/// Keep the server's memory in 4 KiB pages. mimalloc advises huge pages for the regions it
/// maps, and where the kernel grants them on `madvise` (the common default) a server holding
/// 100,000 locks was ~110 bytes per lock larger (W3: 430-480 against 346-359 B), for memory
/// it never wrote; no CPU difference showed in W1. Redis disables THP for itself the same way.
/// Only the server: `holdfast run` must not pass the setting on to its command.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        // A kernel without the flag (before 3.15) keeps huge pages: only memory, not behaviour.
        let _ = nix::sys::prctl::set_thp_disable(true);
    }
}

/// Return mimalloc's free pages to the OS: the server calls this after each checkpoint and
/// after a restart's recovery (`holdfast_server::memory`). Without it, what a checkpoint freed
/// stayed resident: W3 in `sync` mode held 326–332 bytes per lock at 100,000 locks and 292 at
/// 300,000, against 304–307 and 255 with it.
#[allow(unsafe_code)]
fn release_free_memory() {
    // SAFETY: `mi_collect` takes no arguments that could be invalid and may be called from any
    // thread at any time: it walks mimalloc's own free lists and returns empty pages.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Run a client subcommand on a single-threaded runtime (the child of `run` is spawned from
/// this thread, which matters for its parent-death signal).
fn client_main(global: &GlobalArgs, command: Command) -> u8 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("holdfast: cannot start the runtime: {e}");
            return exit::GENERIC;
        }
    };
    // `--server 127.0.0.1:7390` means plain HTTP.
    let server = if global.server.contains("://") {
        global.server.clone()
    } else {
        format!("http://{}", global.server)
    };
    let client = match holdfast_client::Client::builder()
        .base_url(server)
        .token_opt(global.token.clone())
        .request_timeout(global.request_timeout)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("holdfast: {e}");
            return exit::USAGE;
        }
    };
    let out = output::Output { json: global.json };
    runtime.block_on(async move {
        match command {
            Command::Run(args) => run::run(&client, &out, args).await,
            Command::Acquire(args) => commands::acquire(&client, &out, &args).await,
            Command::Release { lease_id, key } => {
                commands::release(&client, &out, &lease_id, key.as_deref()).await
            }
            Command::Renew { lease_id, ttl } => {
                commands::renew(&client, &out, &lease_id, ttl).await
            }
            Command::Locks { prefix, holder } => {
                commands::locks(&client, &out, prefix.as_deref(), holder.as_deref()).await
            }
            Command::Show { key } => commands::show(&client, &out, &key).await,
            Command::Stats => commands::stats(&client, &out).await,
            Command::Events { prefix } => commands::events(&client, &out, prefix.as_deref()).await,
            Command::Admin {
                command: AdminCommand::Release { key, reason },
            } => commands::admin_release(&client, &out, &key, &reason).await,
            Command::Admin {
                command: AdminCommand::ReleaseLease { lease_id, reason },
            } => commands::admin_release_lease(&client, &out, &lease_id, &reason).await,
            Command::Serve(_) | Command::Exec(_) => exit::GENERIC,
        }
    })
}

/// Arguments after `--`, as given.
pub type CommandLine = Vec<OsString>;
