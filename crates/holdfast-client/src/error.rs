//! [`ClientError`]: every way a holdfast call can fail, one variant per server error code plus
//! the transport failures, each carrying what a caller needs to react (who holds the key, how
//! long to back off, which field was wrong).

use std::fmt::Write as _;
use std::time::Duration;

use holdfast_api::{ErrorBody, ErrorCode, HolderInfo};

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The key is held and the request did not wait (no-wait mode), or the policy allowed a
    /// single attempt.
    #[error("{key} is held{}", held_by(holders))]
    Held {
        /// The key refused.
        key: String,
        /// Its current holders.
        holders: Vec<HolderInfo>,
        /// When the key is in lock-delay (after an involuntary loss): until when.
        delayed_until_ms: Option<u64>,
    },
    /// Every attempt of the retry policy failed (or the server-side wait ran out).
    #[error("failed to acquire {key} after {attempts} attempt{} ({} s){}",
        if *attempts == 1 { "" } else { "s" }, waited.as_secs(), held_by(holders))]
    Timeout {
        /// The key that could not be had.
        key: String,
        /// Its holders at the last attempt.
        holders: Vec<HolderInfo>,
        /// Attempts made.
        attempts: u32,
        /// Total time spent, waits and sleeps included.
        waited: Duration,
    },
    /// Waiting would have closed a cycle in the wait-for graph; this request is the victim.
    #[error("deadlock on {}: {}", key.as_deref().unwrap_or("?"), cycle.join(" -> "))]
    Deadlock {
        /// The key whose wait would deadlock.
        key: Option<String>,
        /// Holders in the cycle, starting and ending with the requester.
        cycle: Vec<String>,
    },
    /// The key is in use with another mode or semaphore limit.
    #[error("limit mismatch: {message}")]
    LimitMismatch {
        /// The key.
        key: Option<String>,
        /// Server explanation.
        message: String,
    },
    /// The lease is unknown, released or expired: whatever it held is lost.
    #[error("lease not found (released or expired): {message}")]
    LeaseNotFound {
        /// Server explanation.
        message: String,
    },
    /// The lock guarded by a [`crate::LockGuard`] is gone (see [`crate::LostReason`]).
    #[error("lock lost: {0}")]
    Lost(crate::LostReason),
    /// The lease does not hold the key (or nobody does, for a force release).
    #[error("lock not found: {message}")]
    LockNotFound {
        /// The key.
        key: Option<String>,
        /// Server explanation.
        message: String,
    },
    /// The idempotency key was used with a different fingerprint.
    #[error("idempotency key {key} was used with a different request")]
    FingerprintMismatch {
        /// The idempotency key.
        key: String,
    },
    /// Another execution of the idempotency key is running.
    #[error("idempotency key {key} is being executed by {}", holder.as_deref().unwrap_or("another client"))]
    InProgress {
        /// The idempotency key.
        key: String,
        /// Who executes it.
        holder: Option<String>,
        /// Server's advice.
        retry_after: Option<Duration>,
    },
    /// No such idempotency record (or not in progress under this lease).
    #[error("idempotency record not found: {message}")]
    IdempotencyNotFound {
        /// Server explanation.
        message: String,
    },
    /// Missing or wrong token.
    #[error("unauthorized: {message}")]
    Unauthorized {
        /// Server explanation.
        message: String,
    },
    /// The token may not do this (role or key prefix).
    #[error("forbidden: {message}")]
    Forbidden {
        /// Server explanation.
        message: String,
    },
    /// The request was refused as invalid; `field` names the culprit when the server said.
    #[error("invalid request{}: {message}", field.as_deref().map(|f| format!(" ({f})")).unwrap_or_default())]
    Invalid {
        /// Offending field (`ttl_ms`, `locks[0].key`, ...).
        field: Option<String>,
        /// Server (or client-side) explanation.
        message: String,
    },
    /// The server is at a limit or shutting down; retry after `retry_after`.
    #[error("server overloaded: {message}")]
    Overloaded {
        /// How long the server asked us to wait.
        retry_after: Option<Duration>,
        /// Server explanation.
        message: String,
    },
    /// The server could not be reached or did not answer in time.
    #[error("server unreachable at {url}: {message}")]
    Unreachable {
        /// The URL asked.
        url: String,
        /// What went wrong (connection refused, timed out, ...).
        message: String,
    },
    /// Any other server answer (a `5xx`, an unknown code, an unreadable body).
    #[error("server error (HTTP {status}{}): {message}", code.map(|c| format!(", {}", c.as_str())).unwrap_or_default())]
    Server {
        /// HTTP status.
        status: u16,
        /// Error code, if the body had one.
        code: Option<ErrorCode>,
        /// Server explanation or the raw body.
        message: String,
    },
}

/// ` : held by A since 02:00:03, B since ...` or nothing.
fn held_by(holders: &[HolderInfo]) -> String {
    if holders.is_empty() {
        return String::new();
    }
    let mut out = String::from(": held by ");
    for (i, h) in holders.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{} since {}", h.holder, format_utc_time(h.since_ms));
        if let Some(reason) = &h.reason {
            let _ = write!(out, " ({reason})");
        }
    }
    out
}

/// `HH:MM:SS` (UTC) of an epoch-millisecond time, as the seed's messages show times.
#[must_use]
pub fn format_utc_time(epoch_ms: u64) -> String {
    let secs_of_day = (epoch_ms / 1000) % 86_400;
    format!(
        "{:02}:{:02}:{:02}",
        secs_of_day / 3600,
        (secs_of_day / 60) % 60,
        secs_of_day % 60
    )
}

impl ClientError {
    /// The server's error code, when the failure came from one.
    #[must_use]
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Held { .. } => Some(ErrorCode::LockHeld),
            ClientError::Timeout { .. } => Some(ErrorCode::WaitTimeout),
            ClientError::Deadlock { .. } => Some(ErrorCode::Deadlock),
            ClientError::LimitMismatch { .. } => Some(ErrorCode::LimitMismatch),
            ClientError::LeaseNotFound { .. } | ClientError::Lost(_) => {
                Some(ErrorCode::LeaseNotFound)
            }
            ClientError::LockNotFound { .. } => Some(ErrorCode::LockNotFound),
            ClientError::FingerprintMismatch { .. } => Some(ErrorCode::FingerprintMismatch),
            ClientError::InProgress { .. } => Some(ErrorCode::InProgress),
            ClientError::IdempotencyNotFound { .. } => Some(ErrorCode::IdempotencyNotFound),
            ClientError::Unauthorized { .. } => Some(ErrorCode::Unauthorized),
            ClientError::Forbidden { .. } => Some(ErrorCode::Forbidden),
            ClientError::Invalid { .. } => Some(ErrorCode::InvalidRequest),
            ClientError::Overloaded { .. } => Some(ErrorCode::Overloaded),
            ClientError::Unreachable { .. } => None,
            ClientError::Server { code, .. } => *code,
        }
    }

    /// The current holders, for `Held` and `Timeout`.
    #[must_use]
    pub fn holders(&self) -> &[HolderInfo] {
        match self {
            ClientError::Held { holders, .. } | ClientError::Timeout { holders, .. } => holders,
            _ => &[],
        }
    }

    /// True when the key was busy: another attempt later may succeed (`Held`, `Timeout`,
    /// `Overloaded`).
    #[must_use]
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            ClientError::Held { .. } | ClientError::Timeout { .. } | ClientError::Overloaded { .. }
        )
    }

    /// Map an error answer (status, parsed body, `Retry-After`) to a variant.
    #[must_use]
    pub fn from_response(
        status: u16,
        body: Option<ErrorBody>,
        raw: &str,
        retry_after: Option<Duration>,
    ) -> Self {
        let Some(body) = body else {
            return match status {
                401 => ClientError::Unauthorized {
                    message: raw.to_owned(),
                },
                403 => ClientError::Forbidden {
                    message: raw.to_owned(),
                },
                503 => ClientError::Overloaded {
                    retry_after,
                    message: raw.to_owned(),
                },
                _ => ClientError::Server {
                    status,
                    code: None,
                    message: truncate(raw),
                },
            };
        };
        let retry_after = retry_after.or(body.retry_after_s.map(Duration::from_secs));
        let ErrorBody {
            error,
            message,
            field,
            key,
            holders,
            cycle,
            delayed_until_ms,
            ..
        } = body;
        match error {
            ErrorCode::LockHeld => ClientError::Held {
                key: key.unwrap_or_default(),
                holders,
                delayed_until_ms,
            },
            ErrorCode::WaitTimeout => ClientError::Timeout {
                key: key.unwrap_or_default(),
                holders,
                attempts: 1,
                waited: Duration::ZERO,
            },
            ErrorCode::Deadlock => ClientError::Deadlock { key, cycle },
            ErrorCode::LimitMismatch => ClientError::LimitMismatch { key, message },
            ErrorCode::LeaseNotFound => ClientError::LeaseNotFound { message },
            ErrorCode::LockNotFound => ClientError::LockNotFound { key, message },
            ErrorCode::FingerprintMismatch => ClientError::FingerprintMismatch {
                key: key.unwrap_or_default(),
            },
            ErrorCode::InProgress => ClientError::InProgress {
                key: key.unwrap_or_default(),
                holder: None,
                retry_after,
            },
            ErrorCode::IdempotencyNotFound => ClientError::IdempotencyNotFound { message },
            ErrorCode::InvalidRequest => ClientError::Invalid { field, message },
            ErrorCode::Unauthorized => ClientError::Unauthorized { message },
            ErrorCode::Forbidden => ClientError::Forbidden { message },
            ErrorCode::Overloaded => ClientError::Overloaded {
                retry_after,
                message,
            },
            ErrorCode::PayloadTooLarge => ClientError::Invalid { field, message },
            code @ (ErrorCode::NotFound | ErrorCode::MethodNotAllowed | ErrorCode::Internal) => {
                ClientError::Server {
                    status,
                    code: Some(code),
                    message,
                }
            }
        }
    }
}

fn truncate(raw: &str) -> String {
    const MAX: usize = 512;
    if raw.len() <= MAX {
        return raw.to_owned();
    }
    let mut end = MAX;
    while !raw.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &raw[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_api::LockMode;

    fn holder(name: &str, since_ms: u64) -> HolderInfo {
        HolderInfo {
            holder: name.to_owned(),
            mode: LockMode::Exclusive,
            permits: None,
            since_ms,
            expires_at_ms: since_ms + 30_000,
            reason: None,
            fencing_token: 7,
            count: 1,
            lease_id: None,
        }
    }

    #[test]
    fn every_server_code_maps_to_a_variant_with_the_same_code() {
        for code in ErrorCode::ALL {
            let body = ErrorBody::new(code, "m");
            let e = ClientError::from_response(code.http_status(), Some(body), "", None);
            let expected = match code {
                ErrorCode::PayloadTooLarge => ErrorCode::InvalidRequest,
                c => c,
            };
            assert_eq!(e.code(), Some(expected), "{code:?} -> {e:?}");
        }
    }

    #[test]
    fn held_names_key_holder_and_time() {
        let mut body = ErrorBody::new(ErrorCode::LockHeld, "held");
        body.key = Some("vocab_import/RXNORM".into());
        // 02:00:03 UTC on some day.
        body.holders = vec![holder(
            "importer@host-1",
            (86_400 * 20_000 + 2 * 3600 + 3) * 1000,
        )];
        let e = ClientError::from_response(409, Some(body), "", None);
        assert_eq!(
            e.to_string(),
            "vocab_import/RXNORM is held: held by importer@host-1 since 02:00:03"
        );
        assert!(e.is_busy());
    }

    #[test]
    fn timeout_message_in_the_seed_style() {
        let e = ClientError::Timeout {
            key: "vocab_import/RXNORM".into(),
            holders: vec![holder("importer@host-1", (2 * 3600 + 3) * 1000)],
            attempts: 10,
            waited: Duration::from_secs(510),
        };
        assert_eq!(
            e.to_string(),
            "failed to acquire vocab_import/RXNORM after 10 attempts (510 s): held by importer@host-1 since 02:00:03"
        );
    }

    #[test]
    fn bodyless_answers_map_by_status() {
        assert!(matches!(
            ClientError::from_response(401, None, "x", None),
            ClientError::Unauthorized { .. }
        ));
        assert!(matches!(
            ClientError::from_response(503, None, "x", Some(Duration::from_secs(2))),
            ClientError::Overloaded { retry_after: Some(d), .. } if d == Duration::from_secs(2)
        ));
        assert!(matches!(
            ClientError::from_response(502, None, "bad gateway", None),
            ClientError::Server { status: 502, .. }
        ));
    }

    #[test]
    fn overloaded_takes_retry_after_from_body_when_header_missing() {
        let mut body = ErrorBody::new(ErrorCode::Overloaded, "busy");
        body.retry_after_s = Some(3);
        let e = ClientError::from_response(503, Some(body), "", None);
        assert!(
            matches!(e, ClientError::Overloaded { retry_after: Some(d), .. } if d == Duration::from_secs(3))
        );
    }
}
