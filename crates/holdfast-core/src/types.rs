//! The engine's vocabulary: requests that go in, views, outcomes and events that come out, and
//! the durable records the server persists.
//!
//! Times are `u64` milliseconds on the caller's clock (`*_ms` / `*_at_ms`). The server passes a
//! clock that is monotonic within one process run and anchored to the Unix epoch, so durable
//! `expires_at_ms` values survive a restart.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Milliseconds on the caller's clock.
pub type TimeMs = u64;

/// An unguessable lease id: 128 bits drawn by the caller's randomness source.
///
/// It is the capability to renew or release the lease, so it is shown only to its creator and
/// admins. Displayed and parsed as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LeaseId(pub u128);

impl LeaseId {
    /// The id as 32 lowercase hex digits, without going through `fmt` (every answer carries
    /// one; `{:032x}` cost ~700 instructions through the formatting machinery).
    #[must_use]
    pub fn to_hex(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        // 16 bytes into 32 digits: the lengths always match, so this cannot fail.
        let _ = hex::encode_to_slice(self.0.to_be_bytes(), &mut out);
        out
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = self.to_hex();
        f.write_str(std::str::from_utf8(&hex).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseId({self})")
    }
}

/// A lease id string was not 32 hex digits.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("lease id must be 32 hexadecimal digits")]
pub struct ParseLeaseIdError;

impl FromStr for LeaseId {
    type Err = ParseLeaseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Every release and renewal parses one: 16 byte decodes instead of `from_str_radix`'s
        // 32 checked 128-bit multiply-adds.
        let mut bytes = [0u8; 16];
        if s.len() != 32 || hex::decode_to_slice(s, &mut bytes).is_err() {
            return Err(ParseLeaseIdError);
        }
        Ok(LeaseId(u128::from_be_bytes(bytes)))
    }
}

/// Identifies one queued request (a lock waiter or an idempotency waiter) until it is
/// granted, fails, or is cancelled. Assigned by the engine, never reused within a run.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub struct WaiterId(pub u64);

/// How a lock is held.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum LockKind {
    /// One holder at a time.
    Exclusive,
    /// Any number of shared holders, never together with an exclusive holder.
    Shared,
    /// At most `limit` permits held at once; this grant holds `permits` of them.
    /// Every request on a key in use must name the same `limit` (else `LimitMismatch`).
    Semaphore {
        /// Total permits of the key.
        limit: u32,
        /// Permits this grant holds, `1..=limit`.
        permits: u32,
    },
}

impl LockKind {
    /// Short name for listings and events: `exclusive`, `shared` or `semaphore`.
    #[must_use]
    pub fn mode_name(&self) -> &'static str {
        match self {
            LockKind::Exclusive => "exclusive",
            LockKind::Shared => "shared",
            LockKind::Semaphore { .. } => "semaphore",
        }
    }
}

/// One lock named in a request.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct LockSpec {
    /// The resource name (see [`crate::limits::KEY_BYTES_MAX`]); no control characters.
    pub key: String,
    /// Exclusive, shared or semaphore.
    pub kind: LockKind,
    /// After an involuntary loss of this grant (expiry, force release), new grants on the key
    /// are held back this long. 0 (the default) disables it.
    pub lock_delay_ms: u64,
}

/// The lease a new acquisition creates if it does not join an existing one.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct NewLease {
    /// Fresh random id; used only if a new lease is created.
    pub lease_id: LeaseId,
    /// Who holds it (user, process, `importer@host-1`).
    pub holder: String,
    /// Lifetime from the grant (and from every renewal).
    pub ttl_ms: u64,
    /// Why it is held; shown in listings and refusals.
    pub reason: Option<String>,
    /// A JSON object, as compact text.
    pub metadata: Option<String>,
    /// Opaque name of the credential that created the lease (the server's token name), kept so
    /// only that credential (or an admin) can renew or release it, also after a restart.
    pub owner: Option<String>,
}

/// Which lease an acquisition is for.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum LeaseTarget {
    /// Create a lease (or, when reentrant, join the holder's lease that already holds the keys).
    New(NewLease),
    /// Add locks to an existing lease: incremental acquisition, deadlock-checked.
    Existing(LeaseId),
}

/// A request to acquire one or more locks atomically.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct AcquireRequest {
    /// New lease or existing lease.
    pub target: LeaseTarget,
    /// The locks, all granted together or none. At least one.
    pub locks: Vec<LockSpec>,
    /// 0 = no-wait (fail at once with the holders); otherwise wait in the FIFO queue this long.
    pub wait_ms: u64,
    /// When true (the default), a holder that already holds a key joins its grant.
    pub reentrant: bool,
}

/// A lease as its owner sees it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct LeaseView {
    /// The capability id.
    pub lease_id: LeaseId,
    /// Holder name.
    pub holder: String,
    /// TTL applied at the last grant or renewal.
    pub ttl_ms: u64,
    /// When it expires unless renewed.
    pub expires_at_ms: TimeMs,
    /// When it was created.
    pub created_at_ms: TimeMs,
    /// Reason, refreshed by reentrant acquisitions.
    pub reason: Option<String>,
    /// Metadata JSON object text.
    pub metadata: Option<String>,
    /// Credential name that created it.
    pub owner: Option<String>,
    /// Every lock the lease holds, in key order.
    pub locks: Vec<HeldLockView>,
}

/// One lock held by a lease.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct HeldLockView {
    /// The key.
    pub key: String,
    /// How it is held.
    pub kind: LockKind,
    /// The token issued at the first grant; kept by reentrant joins.
    pub fencing_token: u64,
    /// Reentrant hold count (≥ 1).
    pub count: u32,
    /// When it was first granted.
    pub acquired_at_ms: TimeMs,
    /// Lock-delay applied if this grant is lost involuntarily.
    pub lock_delay_ms: u64,
}

/// A successful acquisition.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Grant {
    /// The lease after the grant (all its locks, not only those just granted).
    pub lease: LeaseView,
    /// The keys this grant covered, in request order, with their state after the grant.
    pub granted: Vec<HeldLockView>,
    /// True if a new lease was created by this grant (undoing it releases the lease); false if
    /// it joined an existing lease (undoing it releases each granted key once).
    pub created_lease: bool,
}

/// What `acquire` did.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum AcquireOutcome {
    /// Granted now.
    Granted(Grant),
    /// Queued; the result arrives later as a [`Notification`] for this waiter.
    Queued(WaiterId),
}

/// A holder as shown in refusals and listings (never the lease id).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct HolderSummary {
    /// Holder name.
    pub holder: String,
    /// How it holds the key.
    pub kind: LockKind,
    /// When it acquired the key.
    pub since_ms: TimeMs,
    /// When its lease expires unless renewed.
    pub expires_at_ms: TimeMs,
    /// Its lease's reason.
    pub reason: Option<String>,
    /// Its fencing token for the key.
    pub fencing_token: u64,
    /// Reentrant count.
    pub count: u32,
}

/// A queued request as shown in listings.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct WaiterSummary {
    /// Holder name of the requester.
    pub holder: String,
    /// What it asks for on this key.
    pub kind: LockKind,
    /// When it was queued.
    pub since_ms: TimeMs,
    /// When it gives up.
    pub deadline_ms: TimeMs,
}

/// Everything about one key, for inspection (the server strips lease ids for non-admins).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct LockInfo {
    /// The key.
    pub key: String,
    /// Current holders, in grant order, with their lease ids.
    pub holders: Vec<(LeaseId, HolderSummary)>,
    /// Queued requests in FIFO order.
    pub waiters: Vec<WaiterSummary>,
    /// If the key is in lock-delay, until when.
    pub delayed_until_ms: Option<TimeMs>,
}

/// Filter for listings. Empty fields match everything.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct LockFilter {
    /// Keys starting with this.
    pub prefix: Option<String>,
    /// Keys held by this holder.
    pub holder: Option<String>,
}

/// Answer to a sequencer check.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct FencingCheck {
    /// True if the token is the fencing token of a current grant of the key.
    pub current: bool,
    /// The fencing tokens of the key's current holders.
    pub current_tokens: Vec<u64>,
}

/// Counters and gauges.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Keys with at least one holder.
    pub active_locks: u64,
    /// Live leases.
    pub leases: u64,
    /// Queued requests.
    pub waiters: u64,
    /// Idempotency records stored.
    pub idempotency_records: u64,
    /// Grants since start (reentrant joins included).
    pub grants_total: u64,
    /// Voluntary releases since start.
    pub releases_total: u64,
    /// Waits that timed out.
    pub timeouts_total: u64,
    /// Requests refused with `Deadlock`.
    pub deadlocks_total: u64,
    /// Leases that expired.
    pub expirations_total: u64,
    /// Admin force releases.
    pub force_releases_total: u64,
    /// The next fencing token to be issued.
    pub fencing_next: u64,
}

/// A stored idempotency result (replayed to duplicates).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct IdempotencyResult {
    /// HTTP-like status code of the original execution.
    pub status: u16,
    /// A subset of response headers.
    pub headers: Vec<(String, String)>,
    /// Body, at most [`crate::limits::IDEMPOTENCY_RESULT_BODY_BYTES_MAX`] bytes.
    pub body: String,
}

/// A request to begin an idempotent execution.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct IdempotencyBegin {
    /// The idempotency key (same rules as lock keys).
    pub key: String,
    /// Digest of the request; a different fingerprint under the same key is refused.
    pub fingerprint: String,
    /// Lease for the executor if this call starts the execution (its TTL bounds the execution).
    pub lease: NewLease,
    /// How long the completed record is kept.
    pub record_ttl_ms: u64,
    /// 0 = answer `InProgress` at once; otherwise wait (like a lock waiter) for the outcome.
    pub wait_ms: u64,
}

/// What `idempotency_begin` answered.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum IdempotencyOutcome {
    /// The caller owns the execution under this lease; it must `complete` or `abort`.
    Started(LeaseView),
    /// Someone else is executing.
    InProgress {
        /// The executor's holder name.
        holder: String,
        /// When the executor's lease expires unless renewed.
        expires_at_ms: TimeMs,
    },
    /// Already done: replay this.
    Completed(IdempotencyResult),
    /// Same key, different fingerprint.
    FingerprintMismatch,
    /// Queued (`wait_ms > 0` and in progress); the answer arrives as a [`Notification`].
    Queued(WaiterId),
}

/// The state of an idempotency record, for reads and persistence.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum IdempotencyState {
    /// Executing under this lease.
    InProgress {
        /// Executor's lease.
        lease_id: LeaseId,
    },
    /// Done, result stored.
    Completed(IdempotencyResult),
}

/// A durable idempotency record.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    /// The key.
    pub key: String,
    /// The request fingerprint.
    pub fingerprint: String,
    /// In progress or completed.
    pub state: IdempotencyState,
    /// When the record was created.
    pub created_at_ms: TimeMs,
    /// How long the completed record is kept.
    pub record_ttl_ms: u64,
    /// When a completed record is deleted (set at completion).
    pub expires_at_ms: Option<TimeMs>,
}

/// The result of a queued request, delivered by [`crate::Engine::take_notifications`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Notification {
    /// Which waiter.
    pub waiter: WaiterId,
    /// What happened to it.
    pub outcome: WaitOutcome,
}

/// How a wait ended.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum WaitOutcome {
    /// A lock waiter was granted.
    Granted(Grant),
    /// An idempotency waiter got an answer (`Started`, `Completed`; never `Queued`).
    Idempotency(IdempotencyOutcome),
    /// The wait failed (timeout, the lease it was for expired, ...).
    Failed(crate::LockError),
}

/// Kinds of [`Event`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum EventKind {
    /// A lock was granted (or re-entered).
    Granted,
    /// A lock was released voluntarily (count reached zero).
    Released,
    /// A lease expired and lost this lock.
    Expired,
    /// An admin force-released this lock.
    ForceReleased {
        /// The admin's stated reason.
        reason: String,
    },
    /// A waiter on this key timed out.
    TimedOut,
    /// A request on this key was refused as a deadlock victim.
    Deadlock,
    /// A lease was renewed (key is absent; one event per lease).
    Renewed,
}

/// Something that happened, for the event stream. Never contains a lease id.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Event {
    /// Strictly increasing sequence number (continues across restarts).
    pub seq: u64,
    /// When it happened.
    pub at_ms: TimeMs,
    /// What happened.
    pub kind: EventKind,
    /// The key concerned (absent for lease-wide events such as `Renewed`). Shared with the
    /// engine's key table: an event costs no copy of the key.
    pub key: Option<Arc<str>>,
    /// Holder concerned (shared with the lease's interned holder name).
    pub holder: Arc<str>,
    /// Lock kind concerned, if any.
    pub lock_kind: Option<LockKind>,
    /// Fencing token concerned, if any.
    pub fencing_token: Option<u64>,
    /// For `Released`/`Expired`/`ForceReleased`: how long the lock was held.
    pub held_ms: Option<u64>,
    /// For `Granted` after a wait: how long the request waited.
    pub waited_ms: Option<u64>,
}

/// A durable lease with its locks.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Id.
    pub lease_id: LeaseId,
    /// Holder.
    pub holder: String,
    /// TTL applied at the last grant or renewal.
    pub ttl_ms: u64,
    /// Expiry.
    pub expires_at_ms: TimeMs,
    /// Creation time.
    pub created_at_ms: TimeMs,
    /// Reason.
    pub reason: Option<String>,
    /// Metadata JSON object text.
    pub metadata: Option<String>,
    /// Creating credential.
    pub owner: Option<String>,
    /// Held locks.
    pub locks: Vec<HeldLockView>,
}

/// Everything the engine must keep across a restart. Waiters are not part of it.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct DurableState {
    /// Next fencing token to issue (greater than every token ever issued).
    pub fencing_next: u64,
    /// Next event sequence number.
    pub event_seq_next: u64,
    /// Live leases.
    pub leases: Vec<LeaseRecord>,
    /// Idempotency records.
    pub idempotency: Vec<IdempotencyRecord>,
    /// Keys in lock-delay and until when.
    pub lock_delays: Vec<(String, TimeMs)>,
}

/// The durable changes since the last [`crate::Engine::take_changes`]: the server writes them in one
/// commit. `None` values mean "delete".
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct ChangeSet {
    /// New value of the fencing counter, if it moved.
    pub fencing_next: Option<u64>,
    /// New value of the event sequence counter, if it moved.
    pub event_seq_next: Option<u64>,
    /// Leases written or deleted, by id.
    pub leases: std::collections::BTreeMap<LeaseId, Option<LeaseRecord>>,
    /// Idempotency records written or deleted, by key.
    pub idempotency: std::collections::BTreeMap<String, Option<IdempotencyRecord>>,
    /// Lock-delays written or deleted, by key.
    pub lock_delays: std::collections::BTreeMap<String, Option<TimeMs>>,
}

impl ChangeSet {
    /// True if there is nothing to write.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.fencing_next.is_none()
            && self.event_seq_next.is_none()
            && self.leases.is_empty()
            && self.idempotency.is_empty()
            && self.lock_delays.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_id_text_is_32_lowercase_hex_digits_and_parses_back() {
        for raw in [
            0,
            1,
            0xab,
            u128::MAX,
            0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
            1 << 127,
        ] {
            let id = LeaseId(raw);
            let text = id.to_string();
            assert_eq!(text, format!("{raw:032x}"));
            assert_eq!(text.parse::<LeaseId>(), Ok(id));
            assert_eq!(text.to_uppercase().parse::<LeaseId>(), Ok(id));
        }
    }

    #[test]
    fn lease_id_text_that_is_not_32_hex_digits_is_refused() {
        let valid = "0123456789abcdef0123456789abcdef";
        assert!(valid.parse::<LeaseId>().is_ok());
        for bad in [
            "",
            "0123456789abcdef0123456789abcde",
            "0123456789abcdef0123456789abcdef0",
            "0123456789abcdef0123456789abcdeg",
            "+123456789abcdef0123456789abcdef",
            " 123456789abcdef0123456789abcdef",
            "0123456789abcdef0123456789abcd\u{e9}",
        ] {
            assert_eq!(bad.parse::<LeaseId>(), Err(ParseLeaseIdError), "{bad:?}");
        }
    }
}
