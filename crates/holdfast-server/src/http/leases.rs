//! Leases: create (with locks, atomically), read, add locks, renew, release a lease or one lock.

use axum::Json;
use holdfast_api::{AddLocksRequest, CreateLeaseRequest, ErrorBody, LeaseResponse, RenewRequest};
use holdfast_core::limits::LEASE_TTL_MS_DEFAULT;
use holdfast_core::{AcquireRequest, LeaseTarget, LeaseView, LockSpec, NewLease};

use super::{ApiJson, ApiPath, AppState, OptionalJson, Shared, new_lease_id, parse_lease_id};
use crate::actor::Command;
use crate::auth::Principal;
use crate::convert::{lease_response, lock_spec};
use crate::error::ApiError;

fn specs(locks: &[holdfast_api::LockRequest]) -> Result<Vec<LockSpec>, ApiError> {
    locks
        .iter()
        .enumerate()
        .map(|(i, l)| lock_spec(l, i))
        .collect()
}

/// Create a lease holding all the requested locks (granted together or not at all).
#[utoipa::path(
    post, path = "/v1/leases", tag = "leases",
    request_body = CreateLeaseRequest,
    responses(
        (status = 200, description = "granted", body = LeaseResponse),
        (status = 400, description = "invalid_request (names the field)", body = ErrorBody),
        (status = 403, description = "forbidden: a key outside the token's prefixes", body = ErrorBody),
        (status = 409, description = "lock_held (no-wait), wait_timeout, limit_mismatch", body = ErrorBody),
        (status = 503, description = "overloaded (waiters per key, leases per token, queue); Retry-After", body = ErrorBody),
    )
)]
pub async fn create_lease(
    state: Shared,
    principal: Principal,
    ApiJson(body): ApiJson<CreateLeaseRequest>,
) -> Result<Json<LeaseResponse>, ApiError> {
    create_lease_op(&state, &principal, body).await.map(Json)
}

/// `create_lease` without the HTTP extraction (shared with the wire protocol).
pub async fn create_lease_op(
    state: &AppState,
    principal: &Principal,
    body: CreateLeaseRequest,
) -> Result<LeaseResponse, ApiError> {
    principal.check_write()?;
    principal.check_keys(body.locks.iter().map(|l| l.key.as_str()))?;
    let locks = specs(&body.locks)?;
    let wait_ms = body.wait_ms.unwrap_or(0);
    let request = AcquireRequest {
        target: LeaseTarget::New(NewLease {
            lease_id: new_lease_id(),
            holder: body.holder,
            ttl_ms: body.ttl_ms.unwrap_or(LEASE_TTL_MS_DEFAULT),
            reason: body.reason,
            metadata: body.metadata.as_ref().map(holdfast_api::metadata_text),
            owner: principal.name.clone(),
        }),
        locks,
        wait_ms,
        reentrant: body.reentrant.unwrap_or(true),
    };
    let grant = state
        .engine
        .call_waiting(wait_ms, |request_id, reply| Command::Acquire {
            request,
            owner_check: None,
            request_id,
            reply,
        })
        .await?;
    Ok(lease_response(grant.lease, state.engine.clock.now_ms()))
}

/// Read a lease (its creator or an admin; anyone else gets `404 lease_not_found`).
#[utoipa::path(
    get, path = "/v1/leases/{id}", tag = "leases",
    params(("id" = String, Path, description = "lease id, 32 hex digits")),
    responses(
        (status = 200, body = LeaseResponse),
        (status = 404, description = "lease_not_found (also for other tokens' leases)", body = ErrorBody),
    )
)]
pub async fn get_lease(
    state: Shared,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<LeaseResponse>, ApiError> {
    get_lease_op(&state, &principal, &id).await.map(Json)
}

/// `get_lease` without the HTTP extraction.
pub async fn get_lease_op(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<LeaseResponse, ApiError> {
    let lease_id = parse_lease_id(id)?;
    let owner_check = principal.owner_filter();
    let lease = state
        .engine
        .call(|reply| Command::GetLease {
            lease_id,
            owner_check,
            reply,
        })
        .await?;
    Ok(lease_response(lease, state.engine.clock.now_ms()))
}

/// Add locks to an existing lease (incremental acquisition; refused with `deadlock` if waiting
/// would close a cycle).
#[utoipa::path(
    post, path = "/v1/leases/{id}/locks", tag = "leases",
    params(("id" = String, Path, description = "lease id")),
    request_body = AddLocksRequest,
    responses(
        (status = 200, description = "granted; the whole lease", body = LeaseResponse),
        (status = 400, body = ErrorBody),
        (status = 404, description = "lease_not_found", body = ErrorBody),
        (status = 409, description = "lock_held, wait_timeout, deadlock, limit_mismatch", body = ErrorBody),
        (status = 503, body = ErrorBody),
    )
)]
pub async fn add_locks(
    state: Shared,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<AddLocksRequest>,
) -> Result<Json<LeaseResponse>, ApiError> {
    add_locks_op(&state, &principal, &id, body).await.map(Json)
}

/// `add_locks` without the HTTP extraction.
pub async fn add_locks_op(
    state: &AppState,
    principal: &Principal,
    id: &str,
    body: AddLocksRequest,
) -> Result<LeaseResponse, ApiError> {
    principal.check_write()?;
    let lease_id = parse_lease_id(id)?;
    principal.check_keys(body.locks.iter().map(|l| l.key.as_str()))?;
    let locks = specs(&body.locks)?;
    let wait_ms = body.wait_ms.unwrap_or(0);
    let request = AcquireRequest {
        target: LeaseTarget::Existing(lease_id),
        locks,
        wait_ms,
        reentrant: true,
    };
    let owner_check = principal.owner_filter();
    let grant = state
        .engine
        .call_waiting(wait_ms, |request_id, reply| Command::Acquire {
            request,
            owner_check,
            request_id,
            reply,
        })
        .await?;
    Ok(lease_response(grant.lease, state.engine.clock.now_ms()))
}

/// Renew a lease and all its locks to `now + ttl_ms` (default: its current TTL). An empty body
/// is allowed.
#[utoipa::path(
    post, path = "/v1/leases/{id}/renew", tag = "leases",
    params(("id" = String, Path, description = "lease id")),
    request_body(content = RenewRequest, description = "optional"),
    responses(
        (status = 200, body = LeaseResponse),
        (status = 404, description = "lease_not_found: the lock is lost", body = ErrorBody),
    )
)]
pub async fn renew(
    state: Shared,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
    OptionalJson(body): OptionalJson<RenewRequest>,
) -> Result<Json<LeaseResponse>, ApiError> {
    renew_op(&state, &principal, &id, body.ttl_ms)
        .await
        .map(Json)
}

/// `renew` without the HTTP extraction.
pub async fn renew_op(
    state: &AppState,
    principal: &Principal,
    id: &str,
    ttl_ms: Option<u64>,
) -> Result<LeaseResponse, ApiError> {
    principal.check_write()?;
    let lease_id = parse_lease_id(id)?;
    let owner_check = principal.owner_filter();
    let lease = state
        .engine
        .call(|reply| Command::Renew {
            lease_id,
            ttl_ms,
            owner_check,
            reply,
        })
        .await?;
    Ok(lease_response(lease, state.engine.clock.now_ms()))
}

/// Release a lease and all its locks; answers the lease as it was.
#[utoipa::path(
    delete, path = "/v1/leases/{id}", tag = "leases",
    params(("id" = String, Path, description = "lease id")),
    responses(
        (status = 200, description = "released; the lease as it was", body = LeaseResponse),
        (status = 404, description = "lease_not_found", body = ErrorBody),
    )
)]
pub async fn release_lease(
    state: Shared,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<LeaseResponse>, ApiError> {
    release_lease_op(&state, &principal, &id).await.map(Json)
}

/// `release_lease` without the HTTP extraction.
pub async fn release_lease_op(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<LeaseResponse, ApiError> {
    let lease = release_lease_view(state, principal, id).await?;
    Ok(lease_response(lease, state.engine.clock.now_ms()))
}

/// `release_lease_op` for a caller that does not want the released lease back (a quiet
/// release over the wire): the answer is not built.
pub async fn release_lease_quiet_op(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<(), ApiError> {
    release_lease_view(state, principal, id).await.map(|_| ())
}

async fn release_lease_view(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<LeaseView, ApiError> {
    principal.check_write()?;
    let lease_id = parse_lease_id(id)?;
    let owner_check = principal.owner_filter();
    state
        .engine
        .call(|reply| Command::ReleaseLease {
            lease_id,
            owner_check,
            reply,
        })
        .await
}

/// Release one lock of a lease (decrements a reentrant count; frees the key at zero). The key
/// may contain `/` and percent-encoded characters. Answers the lease after the release.
#[utoipa::path(
    delete, path = "/v1/leases/{id}/locks/{key}", tag = "leases",
    params(
        ("id" = String, Path, description = "lease id"),
        ("key" = String, Path, description = "the key; may contain `/` (rest of the path), percent-decoded"),
    ),
    responses(
        (status = 200, description = "the lease after the release", body = LeaseResponse),
        (status = 404, description = "lease_not_found, lock_not_found", body = ErrorBody),
    )
)]
pub async fn release_lock(
    state: Shared,
    principal: Principal,
    ApiPath((id, key)): ApiPath<(String, String)>,
) -> Result<Json<LeaseResponse>, ApiError> {
    release_lock_op(&state, &principal, &id, key)
        .await
        .map(Json)
}

/// `release_lock` without the HTTP extraction.
pub async fn release_lock_op(
    state: &AppState,
    principal: &Principal,
    id: &str,
    key: String,
) -> Result<LeaseResponse, ApiError> {
    principal.check_write()?;
    let lease_id = parse_lease_id(id)?;
    principal.check_keys([key.as_str()])?;
    let owner_check = principal.owner_filter();
    let lease = state
        .engine
        .call(|reply| Command::ReleaseLock {
            lease_id,
            key,
            owner_check,
            reply,
        })
        .await?;
    Ok(lease_response(lease, state.engine.clock.now_ms()))
}
