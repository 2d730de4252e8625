//! Lock listings and one key's state.

use axum::Json;
use holdfast_api::{ErrorBody, LockList, LockState};
use holdfast_core::LockFilter;
use serde::Deserialize;

use super::{ApiPath, ApiQuery, Shared};
use crate::actor::Command;
use crate::auth::Principal;
use crate::error::ApiError;

/// Filters of `GET /v1/locks`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Keys starting with this.
    pub prefix: Option<String>,
    /// Keys held by this holder.
    pub holder: Option<String>,
}

/// Keys with holders or waiters, in key order (only keys under the token's prefixes; lease ids
/// only for admins and the lease's creator).
#[utoipa::path(
    get, path = "/v1/locks", tag = "locks",
    params(ListQuery),
    responses((status = 200, body = LockList), (status = 400, body = ErrorBody))
)]
pub async fn list_locks(
    state: Shared,
    principal: Principal,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<LockList>, ApiError> {
    let filter = LockFilter {
        prefix: q.prefix,
        holder: q.holder,
    };
    let locks = state
        .engine
        .call(|reply| Command::ListLocks {
            filter,
            viewer: principal,
            reply,
        })
        .await?;
    Ok(Json(LockList { locks }))
}

/// One key: holders, waiters in FIFO order, lock-delay. A free key answers `200` with no
/// holders and no waiters. The key is the rest of the path (may contain `/`; percent-decoded).
#[utoipa::path(
    get, path = "/v1/locks/{key}", tag = "locks",
    params(("key" = String, Path, description = "the key; may contain `/`")),
    responses((status = 200, body = LockState), (status = 403, body = ErrorBody))
)]
pub async fn get_lock(
    state: Shared,
    principal: Principal,
    ApiPath(key): ApiPath<String>,
) -> Result<Json<LockState>, ApiError> {
    principal.check_keys([key.as_str()])?;
    let k = key.clone();
    let info = state
        .engine
        .call(|reply| Command::LockInfo {
            key: k,
            viewer: principal,
            reply,
        })
        .await?;
    Ok(Json(info.unwrap_or(LockState {
        key,
        limit: None,
        holders: Vec::new(),
        waiters: Vec::new(),
        delayed_until_ms: None,
    })))
}
