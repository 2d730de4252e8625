//! Conversions between the wire types of `holdfast-api` and the engine's types.

use holdfast_api::{
    EventBody, HeldLock, HolderInfo, LeaseResponse, LockMode, LockRequest, LockState, WaiterInfo,
};
use holdfast_core::{
    Event, EventKind, HeldLockView, HolderSummary, LeaseId, LeaseView, LockInfo, LockKind, LockSpec,
};

use crate::error::ApiError;

/// Wire mode, semaphore limit and permits of an engine lock kind.
#[must_use]
pub fn mode_of(kind: &LockKind) -> (LockMode, Option<u32>, Option<u32>) {
    match kind {
        LockKind::Exclusive => (LockMode::Exclusive, None, None),
        LockKind::Shared => (LockMode::Shared, None, None),
        LockKind::Semaphore { limit, permits } => {
            (LockMode::Semaphore, Some(*limit), Some(*permits))
        }
    }
}

/// A holder for listings and refusals; `lease_id` only when the viewer may see it.
#[must_use]
pub fn holder_info(h: &HolderSummary, lease_id: Option<LeaseId>) -> HolderInfo {
    let (mode, _, permits) = mode_of(&h.kind);
    HolderInfo {
        holder: h.holder.clone(),
        mode,
        permits,
        since_ms: h.since_ms,
        expires_at_ms: h.expires_at_ms,
        reason: h.reason.clone(),
        fencing_token: h.fencing_token,
        count: h.count,
        lease_id: lease_id.map(|id| id.to_string()),
    }
}

/// One held lock on the wire.
#[must_use]
pub fn held_lock(l: HeldLockView) -> HeldLock {
    let (mode, limit, permits) = mode_of(&l.kind);
    HeldLock {
        key: l.key,
        mode,
        limit,
        permits,
        fencing_token: l.fencing_token,
        count: l.count,
        acquired_at_ms: l.acquired_at_ms,
    }
}

/// A lease for its owner (takes the view: its strings move into the answer).
#[must_use]
pub fn lease_response(v: LeaseView, now_ms: u64) -> LeaseResponse {
    LeaseResponse {
        lease_id: v.lease_id.to_string(),
        holder: v.holder,
        ttl_ms: v.ttl_ms,
        expires_at_ms: v.expires_at_ms,
        remaining_ms: v.expires_at_ms.saturating_sub(now_ms),
        reason: v.reason,
        metadata: v.metadata.as_deref().and_then(|m| {
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(m).ok()
        }),
        locks: v.locks.into_iter().map(held_lock).collect(),
    }
}

/// One key's state; `show_lease` decides per lease whether the viewer sees its id.
pub fn lock_state(info: &LockInfo, show_lease: impl Fn(LeaseId) -> bool) -> LockState {
    let limit = info
        .holders
        .iter()
        .map(|(_, h)| &h.kind)
        .chain(info.waiters.iter().map(|w| &w.kind))
        .find_map(|k| match k {
            LockKind::Semaphore { limit, .. } => Some(*limit),
            _ => None,
        });
    LockState {
        key: info.key.clone(),
        limit,
        holders: info
            .holders
            .iter()
            .map(|(id, h)| holder_info(h, show_lease(*id).then_some(*id)))
            .collect(),
        waiters: info
            .waiters
            .iter()
            .map(|w| WaiterInfo {
                holder: w.holder.clone(),
                mode: mode_of(&w.kind).0,
                since_ms: w.since_ms,
                deadline_ms: w.deadline_ms,
            })
            .collect(),
        delayed_until_ms: info.delayed_until_ms,
    }
}

/// A wire lock request as an engine lock spec; `index` names it in errors (`locks[2].limit`).
///
/// # Errors
/// Inconsistent mode, limit and permits.
pub fn lock_spec(r: &LockRequest, index: usize) -> Result<LockSpec, ApiError> {
    let field = |name: &str| format!("locks[{index}].{name}");
    let semaphore =
        matches!(r.mode, Some(LockMode::Semaphore)) || (r.mode.is_none() && r.limit.is_some());
    let kind = if semaphore {
        let limit = r
            .limit
            .ok_or_else(|| ApiError::invalid(field("limit"), "a semaphore needs `limit`"))?;
        LockKind::Semaphore {
            limit,
            permits: r.permits.unwrap_or(1),
        }
    } else {
        if r.limit.is_some() || r.permits.is_some() {
            return Err(ApiError::invalid(
                field("limit"),
                "`limit` and `permits` apply only to mode `semaphore`",
            ));
        }
        match r.mode {
            Some(LockMode::Shared) => LockKind::Shared,
            _ => LockKind::Exclusive,
        }
    };
    Ok(LockSpec {
        key: r.key.clone(),
        kind,
        lock_delay_ms: r.lock_delay_ms.unwrap_or(0),
    })
}

/// The snake_case name of an event kind.
#[must_use]
pub fn event_kind_name(k: &EventKind) -> &'static str {
    match k {
        EventKind::Granted => "granted",
        EventKind::Released => "released",
        EventKind::Expired => "expired",
        EventKind::ForceReleased { .. } => "force_released",
        EventKind::TimedOut => "timed_out",
        EventKind::Deadlock => "deadlock",
        EventKind::Renewed => "renewed",
    }
}

/// An event on the wire.
#[must_use]
pub fn event_body(e: &Event) -> EventBody {
    EventBody {
        seq: e.seq,
        kind: event_kind_name(&e.kind).to_owned(),
        at_ms: e.at_ms,
        key: e.key.as_deref().map(str::to_owned),
        holder: e.holder.to_string(),
        mode: e.lock_kind.as_ref().map(|k| mode_of(k).0),
        fencing_token: e.fencing_token,
        reason: match &e.kind {
            EventKind::ForceReleased { reason } => Some(reason.clone()),
            _ => None,
        },
    }
}
