//! Admin force release. Routes:
//! - `POST /v1/admin/locks/{key}/release`: the key is everything between `/v1/admin/locks/`
//!   and the final `/release` (so keys with `/`, even keys ending in `/release`, work);
//! - `POST /v1/admin/leases/{id}/release`.
//!
//! Both need `{reason}` (non-empty); both log one line and emit `force_released` events.

use axum::Json;
use holdfast_api::{ErrorBody, ErrorCode, ForceReleaseRequest, ForceReleaseResponse, HolderInfo};
use holdfast_core::LeaseView;

use super::{ApiJson, ApiPath, Shared, parse_lease_id};
use crate::actor::Command;
use crate::auth::Principal;
use crate::convert::mode_of;
use crate::error::ApiError;

fn holders_of(lease: &LeaseView) -> Vec<HolderInfo> {
    lease
        .locks
        .iter()
        .map(|l| {
            let (mode, _, permits) = mode_of(&l.kind);
            HolderInfo {
                holder: lease.holder.clone(),
                mode,
                permits,
                since_ms: l.acquired_at_ms,
                expires_at_ms: lease.expires_at_ms,
                reason: lease.reason.clone(),
                fencing_token: l.fencing_token,
                count: l.count,
                lease_id: Some(lease.lease_id.to_string()),
            }
        })
        .collect()
}

fn reason_of(body: ForceReleaseRequest) -> Result<String, ApiError> {
    if body.reason.trim().is_empty() {
        return Err(ApiError::invalid(
            "reason",
            "a force release needs a non-empty reason",
        ));
    }
    Ok(body.reason)
}

/// Admin: free a key from all its holders (lock-delay applies).
#[utoipa::path(
    post, path = "/v1/admin/locks/{key}/release", tag = "admin",
    params(("key" = String, Path, description = "the key; may contain `/`; the path must end with `/release`")),
    request_body = ForceReleaseRequest,
    responses(
        (status = 200, description = "the holders that lost the key", body = ForceReleaseResponse),
        (status = 400, body = ErrorBody),
        (status = 403, description = "not an admin", body = ErrorBody),
        (status = 404, description = "lock_not_found: nobody holds the key", body = ErrorBody),
    )
)]
pub async fn force_release_lock(
    state: Shared,
    principal: Principal,
    ApiPath(rest): ApiPath<String>,
    ApiJson(body): ApiJson<ForceReleaseRequest>,
) -> Result<Json<ForceReleaseResponse>, ApiError> {
    let Some(key) = rest.strip_suffix("/release").filter(|k| !k.is_empty()) else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            "no route: use POST /v1/admin/locks/{key}/release",
        ));
    };
    principal.check_admin()?;
    let reason = reason_of(body)?;
    let k = key.to_owned();
    let admin = principal.name.clone();
    let lost = state
        .engine
        .call(|reply| Command::ForceReleaseLock {
            key: k,
            reason,
            admin,
            reply,
        })
        .await?;
    Ok(Json(ForceReleaseResponse { released: lost }))
}

/// Admin: release a whole lease involuntarily (lock-delay applies).
#[utoipa::path(
    post, path = "/v1/admin/leases/{id}/release", tag = "admin",
    params(("id" = String, Path, description = "lease id")),
    request_body = ForceReleaseRequest,
    responses(
        (status = 200, description = "the locks the lease lost", body = ForceReleaseResponse),
        (status = 403, description = "not an admin", body = ErrorBody),
        (status = 404, description = "lease_not_found", body = ErrorBody),
    )
)]
pub async fn force_release_lease(
    state: Shared,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<ForceReleaseRequest>,
) -> Result<Json<ForceReleaseResponse>, ApiError> {
    principal.check_admin()?;
    let lease_id = parse_lease_id(&id)?;
    let reason = reason_of(body)?;
    let admin = principal.name.clone();
    let lease = state
        .engine
        .call(|reply| Command::ForceReleaseLease {
            lease_id,
            reason,
            admin,
            reply,
        })
        .await?;
    Ok(Json(ForceReleaseResponse {
        released: holders_of(&lease),
    }))
}
