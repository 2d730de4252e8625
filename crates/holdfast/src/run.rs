//! `holdfast run`: acquire, run the command while renewing, release, pass its status through.
//!
//! - The command is executed directly (no shell), with `HOLDFAST_LEASE_ID`,
//!   `HOLDFAST_FENCING_TOKEN` (first key) and, for several keys, `HOLDFAST_FENCING_TOKENS`
//!   (comma-separated, in `--lock` order) in its environment.
//! - Signals received while waiting for the lock abort the wait: the in-flight request is
//!   dropped (the server removes the queued request when the connection closes) and `run`
//!   exits with 128+signal.
//! - Signals received while the command runs are forwarded to it (SIGINT/SIGQUIT are not
//!   forwarded when `run` is in the terminal's foreground process group: the terminal already
//!   sent them to the command, which shares the group). `run` exits only after the command.
//! - If the lock is lost, the command gets SIGTERM, then SIGKILL after `--kill-grace`, and
//!   `run` exits with status 4.
//! - On Linux the command is started through `holdfast __exec`, which sets a parent-death
//!   signal: if `run` itself is SIGKILLed, the kernel kills the command too, and the lease
//!   expires after its TTL. Elsewhere the command would keep running until its own end.

use std::ffi::OsString;
use std::io::{IsTerminal as _, Write as _};
use std::os::unix::process::ExitStatusExt as _;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Local;
use holdfast_client::{Client, ClientError, Health, LockBuilder, LockGuard, Phase, Progress};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

use crate::duration::{human, parse_duration};
use crate::output::{Output, describe, holders_text};
use crate::{LockArgs, commands, exit};

/// Extra help of `holdfast run`.
pub const RUN_HELP: &str = "\
Examples (seed 000, the code importer):
  holdfast run --lock vocab_import/RXNORM -- php import.php rxnorm.zip
      10 attempts, 30s doubling with full jitter (cap 5m); fails with exit 3 naming the holder
  holdfast run --lock vocab_import/RXNORM --no-wait -- php import.php rxnorm.zip
      no-wait mode (same as --retry-delay 0): fail at once if another import holds the lock

The command gets HOLDFAST_LEASE_ID and HOLDFAST_FENCING_TOKEN (HOLDFAST_FENCING_TOKENS, comma-
separated in --lock order, for several keys). Exit status: the command's (128+N if killed by
signal N); 3 not acquired; 4 lock lost (command stopped); 5 server unreachable; 6 denied;
126/127 command not executable / not found; 128+N when stopped by signal N while waiting.";

/// Arguments of `holdfast run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub lock: LockArgs,
    /// After a lost lock: time between SIGTERM and SIGKILL of the command.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub kill_grace: Duration,
    /// The command and its arguments (after `--`), executed directly, without a shell.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// Signals `run` handles: they abort a wait, or are forwarded to the command.
const HANDLED: [(Signal, fn() -> SignalKind); 6] = [
    (Signal::SIGTERM, SignalKind::terminate),
    (Signal::SIGINT, SignalKind::interrupt),
    (Signal::SIGHUP, SignalKind::hangup),
    (Signal::SIGQUIT, SignalKind::quit),
    (Signal::SIGUSR1, SignalKind::user_defined1),
    (Signal::SIGUSR2, SignalKind::user_defined2),
];

struct Signals {
    streams: Vec<(Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        let mut streams = Vec::new();
        for (sig, kind) in HANDLED {
            streams.push((sig, signal(kind())?));
        }
        Ok(Self { streams })
    }

    async fn recv(&mut self) -> Signal {
        let futures = self.streams.iter_mut().map(|(sig, stream)| {
            let sig = *sig;
            Box::pin(async move {
                stream.recv().await;
                sig
            })
        });
        futures::future::select_all(futures).await.0
    }
}

/// Shows the wait: one updating line on a terminal, log lines otherwise (stderr).
#[derive(Clone)]
pub struct ProgressReporter {
    state: Arc<Mutex<Option<(Progress, Instant, String)>>>,
    tty: bool,
    drawn: Arc<Mutex<bool>>,
    frame: Arc<std::sync::atomic::AtomicUsize>,
}

impl ProgressReporter {
    /// A reporter for stderr.
    #[must_use]
    pub fn new(_json: bool) -> Self {
        Self {
            state: Arc::new(Mutex::new(None)),
            tty: std::io::stderr().is_terminal(),
            drawn: Arc::new(Mutex::new(false)),
            frame: Arc::default(),
        }
    }

    /// Report `builder`'s retries here.
    pub fn attach(&self, builder: LockBuilder) -> LockBuilder {
        let this = self.clone();
        builder.on_progress(move |p| {
            // Until when this phase lasts: the queued wait, or the sleep before the next attempt.
            let span = match p.phase {
                Phase::Queued { wait } => wait,
                Phase::Sleeping { next_retry_in } => next_retry_in,
            };
            let until = Instant::now() + span;
            let wall = (Local::now() + chrono::Duration::from_std(span).unwrap_or_default())
                .format("%H:%M:%S")
                .to_string();
            *this
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some((p.clone(), until, wall));
            if this.tty {
                this.draw();
            } else {
                eprintln!("holdfast: {}", this.line().unwrap_or_default());
            }
        })
    }

    fn line(&self) -> Option<String> {
        let state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (p, until, wall) = state.as_ref()?;
        let held = if p.holders.is_empty() {
            "busy".to_owned()
        } else {
            format!("held by {}", holders_text(&p.holders))
        };
        let left = human(until.saturating_duration_since(Instant::now()));
        Some(match p.phase {
            Phase::Queued { .. } => format!(
                "waiting for {}: {held}; attempt {}/{} queued until {wall} (for {left})",
                p.key, p.attempt, p.attempts
            ),
            Phase::Sleeping { .. } => format!(
                "waiting for {}: {held}; attempt {}/{} failed, next attempt at {wall} (in {left})",
                p.key, p.attempt, p.attempts
            ),
        })
    }

    fn draw(&self) {
        if let Some(line) = self.line() {
            const FRAMES: [char; 4] = ['|', '/', '-', '\\'];
            let frame = FRAMES[self
                .frame
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                % FRAMES.len()];
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{frame} {line}");
            let _ = err.flush();
            *self
                .drawn
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        }
    }

    /// Redraw the spinner and countdown on a terminal; never returns.
    pub async fn tick(&self) {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if self.tty {
                self.draw();
            }
        }
    }

    /// Clear the progress line.
    pub fn finish(&self) {
        let mut drawn = self
            .drawn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *drawn {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
            *drawn = false;
        }
    }
}

/// Acquire while redrawing the progress line.
pub async fn acquire_with_progress(
    builder: LockBuilder,
    reporter: &ProgressReporter,
) -> Result<LockGuard, ClientError> {
    let result = tokio::select! {
        r = builder.acquire() => r,
        () = reporter.tick() => unreachable_tick(),
    };
    reporter.finish();
    result
}

fn unreachable_tick() -> Result<LockGuard, ClientError> {
    Err(ClientError::Invalid {
        field: None,
        message: "progress ticker ended".into(),
    })
}

/// The failure message of an acquisition, with seed 000's no-wait wording.
#[must_use]
pub fn not_acquired_message(e: &ClientError, args: &LockArgs) -> String {
    let no_wait = commands::policy(args).is_no_wait() && args.wait.is_zero();
    match e {
        ClientError::Held { .. } if no_wait => format!("{} (no-wait mode)", describe(e)),
        _ => describe(e),
    }
}

/// The exit code of a finished command: its code, or 128+signal.
#[must_use]
pub fn status_code(status: ExitStatus) -> u8 {
    if let Some(code) = status.code() {
        u8::try_from(code & 0xff).unwrap_or(exit::GENERIC)
    } else if let Some(sig) = status.signal() {
        exit::signal_code(sig)
    } else {
        exit::GENERIC
    }
}

fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!(
            "killed by {}",
            Signal::try_from(s)
                .map_or_else(|_| format!("signal {s}"), |sig| sig.as_str().to_owned())
        ),
        _ => "unknown status".into(),
    }
}

/// True when `run` is in the foreground process group of its terminal: then a SIGINT or
/// SIGQUIT typed at the terminal reached the command directly.
fn terminal_foreground() -> bool {
    nix::unistd::tcgetpgrp(std::io::stdin()).is_ok_and(|pg| pg == nix::unistd::getpgrp())
}

fn spawn_command(args: &RunArgs, guard: &LockGuard) -> std::io::Result<tokio::process::Child> {
    let configure = |cmd: &mut tokio::process::Command| {
        cmd.env("HOLDFAST_LEASE_ID", guard.lease_id())
            .env("HOLDFAST_FENCING_TOKEN", guard.fencing_token().to_string())
            .kill_on_drop(true);
        if args.lock.keys.len() > 1 {
            cmd.env(
                "HOLDFAST_FENCING_TOKENS",
                commands::tokens_csv(guard.lease(), &args.lock.keys),
            );
        }
    };
    // Linux: through `holdfast __exec`, which dies with us (see the module doc).
    if cfg!(target_os = "linux") {
        match std::env::current_exe() {
            Ok(exe) => {
                let mut cmd = tokio::process::Command::new(exe);
                cmd.arg("__exec")
                    .arg("--parent-pid")
                    .arg(std::process::id().to_string())
                    .arg("--")
                    .args(&args.command);
                configure(&mut cmd);
                match cmd.spawn() {
                    Ok(child) => return Ok(child),
                    Err(e) => eprintln!(
                        "holdfast run: cannot re-execute holdfast to guard the command ({e}); \
                         starting it directly: it would outlive a SIGKILL of holdfast"
                    ),
                }
            }
            Err(e) => eprintln!(
                "holdfast run: cannot find the holdfast executable ({e}); starting the command directly: \
                 it would outlive a SIGKILL of holdfast"
            ),
        }
    }
    let (program, rest) = args
        .command
        .split_first()
        .ok_or_else(|| std::io::Error::other("no command"))?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(rest);
    configure(&mut cmd);
    cmd.spawn()
}

/// `holdfast run`.
pub async fn run(client: &Client, out: &Output, args: RunArgs) -> u8 {
    let keys = args.lock.keys.join(", ");
    let mut signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("holdfast run: cannot install signal handlers: {e}");
            return exit::GENERIC;
        }
    };
    let reporter = ProgressReporter::new(out.json);
    let builder = reporter.attach(commands::builder(client, &args.lock));
    let acquired = tokio::select! {
        r = acquire_with_progress(builder, &reporter) => r,
        sig = signals.recv() => {
            reporter.finish();
            eprintln!("holdfast run: {} received while waiting for {keys}; gave up waiting", sig.as_str());
            return exit::signal_code(sig as i32);
        }
    };
    let guard = match acquired {
        Ok(g) => g,
        Err(e) => {
            if out.json {
                Output::json_line(&crate::output::error_json(&e));
            }
            eprintln!("holdfast run: {}", not_acquired_message(&e, &args.lock));
            return exit::code_of(&e);
        }
    };
    let mut child = match spawn_command(&args, &guard) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "holdfast run: cannot execute {}: {e}",
                args.command[0].to_string_lossy()
            );
            let _ = guard.release().await;
            return if e.kind() == std::io::ErrorKind::NotFound {
                exit::NOT_FOUND
            } else {
                exit::CANNOT_EXECUTE
            };
        }
    };
    let Some(pid) = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw)
    else {
        let _ = guard.release().await;
        return exit::GENERIC;
    };
    let lost = guard.lost();
    tokio::pin!(lost);
    let mut health = guard.context().watch();
    let mut at_risk_reported = false;
    loop {
        tokio::select! {
            status = child.wait() => {
                let code = match status {
                    Ok(s) => status_code(s),
                    Err(e) => {
                        eprintln!("holdfast run: cannot wait for the command: {e}");
                        exit::GENERIC
                    }
                };
                if let Err(e) = guard.release().await {
                    eprintln!("holdfast run: releasing {keys} after the command ended: {}", describe(&e));
                }
                return code;
            }
            sig = signals.recv() => {
                let from_terminal = matches!(sig, Signal::SIGINT | Signal::SIGQUIT) && terminal_foreground();
                if !from_terminal {
                    let _ = kill(pid, sig);
                }
            }
            reason = &mut lost => {
                eprintln!(
                    "holdfast run: LOST the lock on {keys}: {reason}; stopping the command (SIGTERM, then SIGKILL after {})",
                    human(args.kill_grace)
                );
                let _ = kill(pid, Signal::SIGTERM);
                let status = match tokio::time::timeout(args.kill_grace, child.wait()).await {
                    Ok(s) => s,
                    Err(_) => {
                        eprintln!("holdfast run: the command did not stop within {}; sending SIGKILL", human(args.kill_grace));
                        let _ = child.start_kill();
                        child.wait().await
                    }
                };
                if let Ok(s) = status {
                    eprintln!("holdfast run: command stopped ({}); exiting with status {}", describe_status(s), exit::LOST);
                }
                // If the server is only unreachable, the lease may still exist: free it if we can.
                let lease_id = guard.detach().lease_id;
                let _ = tokio::time::timeout(Duration::from_secs(2), client.release(&lease_id)).await;
                return exit::LOST;
            }
            changed = health.changed() => {
                if changed.is_err() {
                    continue;
                }
                let status = health.borrow_and_update().clone();
                match status.health {
                    Health::AtRisk { last_error, .. } if !at_risk_reported => {
                        at_risk_reported = true;
                        let left = status.deadline.saturating_duration_since(Instant::now());
                        eprintln!(
                            "holdfast run: renewing the lease failed ({last_error}); the lock is at risk, certainly held for {} more",
                            human(left)
                        );
                    }
                    Health::Held if at_risk_reported => {
                        at_risk_reported = false;
                        eprintln!("holdfast run: lease renewed again; the lock is safe");
                    }
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duration::parse_duration;
    use holdfast_client::api::{HolderInfo, LockMode};

    fn lock_args(no_wait: bool, delay: &str) -> LockArgs {
        LockArgs {
            keys: vec!["vocab_import/RXNORM".into()],
            shared: false,
            ttl: Duration::from_secs(30),
            wait: Duration::ZERO,
            retry_attempts: 10,
            retry_delay: parse_duration(delay).unwrap(),
            no_wait,
            holder: None,
            reason: None,
        }
    }

    fn held() -> ClientError {
        ClientError::Held {
            key: "vocab_import/RXNORM".into(),
            holders: vec![HolderInfo {
                holder: "importer@host-1".into(),
                mode: LockMode::Exclusive,
                permits: None,
                since_ms: 0,
                expires_at_ms: 30_000,
                reason: None,
                fencing_token: 1,
                count: 1,
                lease_id: None,
            }],
            delayed_until_ms: None,
        }
    }

    #[test]
    fn no_wait_failures_say_so_in_both_spellings() {
        for args in [lock_args(true, "30s"), lock_args(false, "0")] {
            let m = not_acquired_message(&held(), &args);
            assert!(
                m.starts_with(
                    "failed to acquire vocab_import/RXNORM: held by importer@host-1 since "
                ),
                "{m}"
            );
            assert!(m.ends_with("(no-wait mode)"), "{m}");
        }
        let m = not_acquired_message(&held(), &lock_args(false, "30s"));
        assert!(!m.contains("no-wait"), "{m}");
    }

    #[test]
    fn statuses_map_to_exit_codes() {
        assert_eq!(status_code(ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(status_code(ExitStatus::from_raw(0)), 0);
        // Killed by SIGTERM (15): 128 + 15.
        assert_eq!(status_code(ExitStatus::from_raw(15)), 143);
        assert_eq!(exit::signal_code(2), 130);
    }

    #[test]
    fn client_errors_map_to_documented_exit_codes() {
        assert_eq!(exit::code_of(&held()), exit::NOT_ACQUIRED);
        let timeout = ClientError::Timeout {
            key: "k".into(),
            holders: vec![],
            attempts: 10,
            waited: Duration::from_secs(510),
        };
        assert_eq!(exit::code_of(&timeout), exit::NOT_ACQUIRED);
        assert_eq!(
            exit::code_of(&ClientError::Deadlock {
                key: None,
                cycle: vec![]
            }),
            exit::NOT_ACQUIRED
        );
        assert_eq!(
            exit::code_of(&ClientError::Lost(holdfast_client::LostReason::Expired)),
            exit::LOST
        );
        let unreachable = ClientError::Unreachable {
            url: "u".into(),
            message: "refused".into(),
        };
        assert_eq!(exit::code_of(&unreachable), exit::UNREACHABLE);
        assert_eq!(
            exit::code_of(&ClientError::Unauthorized {
                message: String::new()
            }),
            exit::DENIED
        );
        assert_eq!(
            exit::code_of(&ClientError::Forbidden {
                message: String::new()
            }),
            exit::DENIED
        );
        assert_eq!(
            exit::code_of(&ClientError::LeaseNotFound {
                message: String::new()
            }),
            exit::GENERIC
        );
    }

    #[test]
    fn policy_follows_the_seed_flags() {
        assert!(commands::policy(&lock_args(true, "30s")).is_no_wait());
        assert!(commands::policy(&lock_args(false, "0")).is_no_wait());
        let p = commands::policy(&lock_args(false, "60"));
        assert_eq!((p.attempts, p.initial_delay), (10, Duration::from_secs(60)));
        assert_eq!(p.max_delay, Duration::from_secs(300));
    }
}
