//! Exit codes (documented in `holdfast --help` and docs/cli.md) and the mapping of client errors.

use holdfast_client::ClientError;

/// Anything not listed below.
pub const GENERIC: u8 = 1;
/// Bad flags or arguments (clap also exits 2).
pub const USAGE: u8 = 2;
/// Lock not acquired: held (no-wait), retries exhausted, wait timed out, deadlock.
pub const NOT_ACQUIRED: u8 = 3;
/// Lock lost while `run` was running the command.
pub const LOST: u8 = 4;
/// Server unreachable.
pub const UNREACHABLE: u8 = 5;
/// Unauthorized or forbidden.
pub const DENIED: u8 = 6;
/// The command could not be executed (shell convention).
pub const CANNOT_EXECUTE: u8 = 126;
/// The command was not found (shell convention).
pub const NOT_FOUND: u8 = 127;

/// The exit code for a failed client call.
#[must_use]
pub fn code_of(e: &ClientError) -> u8 {
    match e {
        ClientError::Held { .. }
        | ClientError::Timeout { .. }
        | ClientError::Deadlock { .. }
        | ClientError::LimitMismatch { .. }
        | ClientError::InProgress { .. } => NOT_ACQUIRED,
        ClientError::Lost(_) => LOST,
        ClientError::Unreachable { .. } | ClientError::Overloaded { .. } => UNREACHABLE,
        ClientError::Unauthorized { .. } | ClientError::Forbidden { .. } => DENIED,
        ClientError::Invalid { .. } => USAGE,
        _ => GENERIC,
    }
}

/// `128 + signal`, as shells report a death by signal.
#[must_use]
pub fn signal_code(signal: i32) -> u8 {
    u8::try_from(128 + signal.clamp(0, 127)).unwrap_or(255)
}
