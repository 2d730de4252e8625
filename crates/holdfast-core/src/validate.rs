//! Input validation. Every front end hands raw requests to the engine, so the engine is the one
//! place that decides what is acceptable; each refusal names the offending field.

use std::collections::HashSet;

use crate::error::LockError;
use crate::limits::{
    FINGERPRINT_BYTES_MAX, IDEMPOTENCY_RESULT_BODY_BYTES_MAX, LEASE_TTL_MS_MAX, LEASE_TTL_MS_MIN,
    LOCK_DELAY_MS_MAX, Limits, REASON_BYTES_MAX, SEMAPHORE_LIMIT_MAX,
};
use crate::types::{IdempotencyBegin, IdempotencyResult, LockKind, LockSpec, NewLease};

pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> LockError {
    LockError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A name (key or holder): `1..=max` bytes, no control characters. `Err` is the reason.
pub(crate) fn name_reason(value: &str, max_bytes: usize) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if value.len() > max_bytes {
        return Err(format!(
            "is {} bytes, at most {max_bytes} allowed",
            value.len()
        ));
    }
    // ASCII fast path; control characters are C0, DEL and C1 (the latter only in UTF-8 as
    // two-byte sequences starting with 0xC2).
    if value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Ok(());
    }
    if value.chars().any(char::is_control) {
        return Err("must not contain control characters".to_owned());
    }
    Ok(())
}

pub(crate) fn name(field: &str, value: &str, max_bytes: usize) -> Result<(), LockError> {
    name_reason(value, max_bytes).map_err(|r| invalid(field, r))
}

pub(crate) fn key(field: &str, value: &str, limits: &Limits) -> Result<(), LockError> {
    name(field, value, limits.key_bytes_max)
}

pub(crate) fn ttl_ms(field: &str, ttl_ms: u64, limits: &Limits) -> Result<(), LockError> {
    let max = limits.lease_ttl_ms_max;
    if !(LEASE_TTL_MS_MIN..=max).contains(&ttl_ms) {
        return Err(invalid(
            field,
            format!("{ttl_ms} ms is outside {LEASE_TTL_MS_MIN}..={max} ms"),
        ));
    }
    Ok(())
}

pub(crate) fn wait_ms(wait_ms: u64, limits: &Limits) -> Result<(), LockError> {
    if wait_ms > limits.wait_ms_max {
        return Err(invalid(
            "wait_ms",
            format!(
                "{wait_ms} ms exceeds the maximum of {} ms",
                limits.wait_ms_max
            ),
        ));
    }
    Ok(())
}

pub(crate) fn reason(field: &str, reason: Option<&str>) -> Result<(), LockError> {
    if let Some(r) = reason
        && r.len() > REASON_BYTES_MAX
    {
        return Err(invalid(
            field,
            format!("is {} bytes, at most {REASON_BYTES_MAX} allowed", r.len()),
        ));
    }
    Ok(())
}

/// An admin's reason for a force release: required.
pub(crate) fn admin_reason(reason: &str) -> Result<(), LockError> {
    if reason.trim().is_empty() {
        return Err(invalid("reason", "a reason is required"));
    }
    self::reason("reason", Some(reason))
}

pub(crate) fn metadata(metadata: Option<&str>, limits: &Limits) -> Result<(), LockError> {
    let Some(m) = metadata else { return Ok(()) };
    if m.len() > limits.metadata_bytes_max {
        return Err(invalid(
            "metadata",
            format!(
                "is {} bytes, at most {} allowed",
                m.len(),
                limits.metadata_bytes_max
            ),
        ));
    }
    match serde_json::from_str::<serde_json::Value>(m) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        Ok(_) => Err(invalid("metadata", "must be a JSON object")),
        Err(e) => Err(invalid("metadata", format!("is not valid JSON: {e}"))),
    }
}

/// The fields of a lease to be created (or joined: the same checks apply).
pub(crate) fn new_lease(lease: &NewLease, limits: &Limits) -> Result<(), LockError> {
    name("holder", &lease.holder, limits.holder_bytes_max)?;
    ttl_ms("ttl_ms", lease.ttl_ms, limits)?;
    reason("reason", lease.reason.as_deref())?;
    metadata(lease.metadata.as_deref(), limits)?;
    Ok(())
}

pub(crate) fn kind(field: &str, kind: LockKind) -> Result<(), LockError> {
    if let LockKind::Semaphore { limit, permits } = kind {
        if !(1..=SEMAPHORE_LIMIT_MAX).contains(&limit) {
            return Err(invalid(
                format!("{field}.limit"),
                format!("{limit} is outside 1..={SEMAPHORE_LIMIT_MAX}"),
            ));
        }
        if !(1..=limit).contains(&permits) {
            return Err(invalid(
                format!("{field}.permits"),
                format!("{permits} is outside 1..={limit} (the limit)"),
            ));
        }
    }
    Ok(())
}

pub(crate) fn locks(locks: &[LockSpec], limits: &Limits) -> Result<(), LockError> {
    if locks.is_empty() {
        return Err(invalid("locks", "at least one lock is required"));
    }
    if locks.len() > limits.locks_per_request_max {
        return Err(invalid(
            "locks",
            format!(
                "{} locks named, at most {} allowed",
                locks.len(),
                limits.locks_per_request_max
            ),
        ));
    }
    // Small requests (the common case) compare pairwise instead of building a set.
    let mut seen: HashSet<&str> = HashSet::new();
    for (i, spec) in locks.iter().enumerate() {
        name_reason(&spec.key, limits.key_bytes_max)
            .map_err(|r| invalid(format!("locks[{i}].key"), r))?;
        let duplicate = if locks.len() <= 16 {
            locks[..i].iter().any(|o| o.key == spec.key)
        } else {
            !seen.insert(spec.key.as_str())
        };
        if duplicate {
            return Err(invalid(
                format!("locks[{i}].key"),
                format!("key {} is named twice in one request", spec.key),
            ));
        }
        if matches!(spec.kind, LockKind::Semaphore { .. }) {
            kind(&format!("locks[{i}].kind"), spec.kind)?;
        }
        if spec.lock_delay_ms > LOCK_DELAY_MS_MAX {
            return Err(invalid(
                format!("locks[{i}].lock_delay_ms"),
                format!(
                    "{} ms exceeds the maximum of {LOCK_DELAY_MS_MAX} ms",
                    spec.lock_delay_ms
                ),
            ));
        }
    }
    Ok(())
}

pub(crate) fn idempotency_begin(req: &IdempotencyBegin, limits: &Limits) -> Result<(), LockError> {
    key("key", &req.key, limits)?;
    fingerprint(&req.fingerprint)?;
    new_lease(&req.lease, limits)?;
    if !(1..=LEASE_TTL_MS_MAX).contains(&req.record_ttl_ms) {
        return Err(invalid(
            "record_ttl_ms",
            format!(
                "{} ms is outside 1..={LEASE_TTL_MS_MAX} ms",
                req.record_ttl_ms
            ),
        ));
    }
    wait_ms(req.wait_ms, limits)
}

pub(crate) fn fingerprint(fp: &str) -> Result<(), LockError> {
    if fp.is_empty() {
        return Err(invalid("fingerprint", "must not be empty"));
    }
    if fp.len() > FINGERPRINT_BYTES_MAX {
        return Err(invalid(
            "fingerprint",
            format!(
                "is {} bytes, at most {FINGERPRINT_BYTES_MAX} allowed",
                fp.len()
            ),
        ));
    }
    Ok(())
}

pub(crate) fn idempotency_result(result: &IdempotencyResult) -> Result<(), LockError> {
    if !(100..=599).contains(&result.status) {
        return Err(invalid(
            "result.status",
            format!("{} is outside 100..=599", result.status),
        ));
    }
    if result.body.len() > IDEMPOTENCY_RESULT_BODY_BYTES_MAX {
        return Err(invalid(
            "result.body",
            format!(
                "is {} bytes, at most {IDEMPOTENCY_RESULT_BODY_BYTES_MAX} allowed",
                result.body.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(name("key", "a/b", 10).is_ok());
        assert!(name("key", "", 10).is_err());
        assert!(name("key", "a\nb", 10).is_err());
        assert!(name("key", "abcdefghijk", 10).is_err());
    }

    #[test]
    fn metadata_must_be_object() {
        let l = Limits::default();
        assert!(metadata(Some("{\"a\":1}"), &l).is_ok());
        assert!(metadata(Some("[1]"), &l).is_err());
        assert!(metadata(Some("{"), &l).is_err());
        assert!(metadata(None, &l).is_ok());
    }

    #[test]
    fn semaphore_kinds() {
        assert!(
            kind(
                "k",
                LockKind::Semaphore {
                    limit: 3,
                    permits: 3
                }
            )
            .is_ok()
        );
        assert!(
            kind(
                "k",
                LockKind::Semaphore {
                    limit: 3,
                    permits: 4
                }
            )
            .is_err()
        );
        assert!(
            kind(
                "k",
                LockKind::Semaphore {
                    limit: 0,
                    permits: 0
                }
            )
            .is_err()
        );
    }
}
