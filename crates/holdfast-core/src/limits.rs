//! Every limit the engine enforces, in one place, with its unit in the name.
//!
//! Front ends (the HTTP server, the CLI) may lower these through [`Limits`], never raise
//! them past what the engine was designed for.

/// Longest key, in bytes of UTF-8.
pub const KEY_BYTES_MAX: usize = 512;
/// Longest holder name, in bytes of UTF-8.
pub const HOLDER_BYTES_MAX: usize = 256;
/// Longest `reason`, in bytes of UTF-8.
pub const REASON_BYTES_MAX: usize = 1024;
/// Largest `metadata` JSON object, in bytes of its compact serialization.
pub const METADATA_BYTES_MAX: usize = 4096;
/// Shortest lease TTL.
pub const LEASE_TTL_MS_MIN: u64 = 1_000;
/// Longest lease TTL (30 days).
pub const LEASE_TTL_MS_MAX: u64 = 30 * 24 * 3_600_000;
/// Lease TTL used when the caller names none.
pub const LEASE_TTL_MS_DEFAULT: u64 = 30_000;
/// Longest single wait in the queue (one long-poll request).
pub const WAIT_MS_MAX: u64 = 60_000;
/// Longest lock-delay after an involuntary loss.
pub const LOCK_DELAY_MS_MAX: u64 = 60_000;
/// Most locks named by one request.
pub const LOCKS_PER_REQUEST_MAX: usize = 64;
/// Most queued requests on one key.
pub const WAITERS_PER_KEY_MAX: usize = 10_000;
/// Largest semaphore limit.
pub const SEMAPHORE_LIMIT_MAX: u32 = 1_000_000;
/// Longest idempotency fingerprint, in bytes.
pub const FINGERPRINT_BYTES_MAX: usize = 256;
/// Largest stored idempotency result body, in bytes.
pub const IDEMPOTENCY_RESULT_BODY_BYTES_MAX: usize = 1024 * 1024;
/// Default lifetime of a completed idempotency record (24 h).
pub const IDEMPOTENCY_TTL_MS_DEFAULT: u64 = 24 * 3_600_000;

/// The limits one engine enforces; defaults are the constants above.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// See [`KEY_BYTES_MAX`].
    pub key_bytes_max: usize,
    /// See [`HOLDER_BYTES_MAX`].
    pub holder_bytes_max: usize,
    /// See [`METADATA_BYTES_MAX`].
    pub metadata_bytes_max: usize,
    /// See [`LOCKS_PER_REQUEST_MAX`].
    pub locks_per_request_max: usize,
    /// See [`WAITERS_PER_KEY_MAX`].
    pub waiters_per_key_max: usize,
    /// See [`WAIT_MS_MAX`].
    pub wait_ms_max: u64,
    /// See [`LEASE_TTL_MS_MAX`].
    pub lease_ttl_ms_max: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            key_bytes_max: KEY_BYTES_MAX,
            holder_bytes_max: HOLDER_BYTES_MAX,
            metadata_bytes_max: METADATA_BYTES_MAX,
            locks_per_request_max: LOCKS_PER_REQUEST_MAX,
            waiters_per_key_max: WAITERS_PER_KEY_MAX,
            wait_ms_max: WAIT_MS_MAX,
            lease_ttl_ms_max: LEASE_TTL_MS_MAX,
        }
    }
}
