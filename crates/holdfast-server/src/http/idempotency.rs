//! Idempotency records: begin (`POST`), complete (`PUT`), abort (`DELETE`), read (`GET`), all
//! on `/v1/idempotency/{key}` (the key may contain `/`).
//!
//! Begin answers `201` started (with the executor `lease_id`), `409 in_progress` with
//! `Retry-After` (the body is an error body AND carries the `IdempotencyResponse` fields
//! `state`, `holder`, `expires_at_ms`), `200` completed with `Idempotent-Replayed: true` and the
//! stored result, or `422 fingerprint_mismatch`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use holdfast_api::{
    ErrorBody, ErrorCode, IdempotencyAbortRequest, IdempotencyBeginRequest,
    IdempotencyCompleteRequest, IdempotencyResponse, IdempotencyResultBody, IdempotencyStateName,
};
use holdfast_core::limits::{
    IDEMPOTENCY_RESULT_BODY_BYTES_MAX, IDEMPOTENCY_TTL_MS_DEFAULT, LEASE_TTL_MS_DEFAULT,
};
use holdfast_core::{
    IdempotencyBegin, IdempotencyOutcome, IdempotencyResult, IdempotencyState, NewLease,
};

use super::{ApiJson, ApiPath, OptionalJson, Shared, new_lease_id, parse_lease_id};
use crate::actor::Command;
use crate::auth::Principal;
use crate::error::ApiError;

/// Header on a replayed completed result.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

fn result_body(r: IdempotencyResult) -> IdempotencyResultBody {
    IdempotencyResultBody {
        status: r.status,
        headers: r.headers,
        body: r.body,
    }
}

fn in_progress(key: &str, holder: String, expires_at_ms: u64) -> ApiError {
    let mut e = ApiError::new(
        ErrorCode::InProgress,
        format!("idempotency key {key:?} is being executed by {holder}; retry later"),
    )
    .with_key(key);
    e.body.retry_after_s = Some(1);
    let extra = serde_json::json!({
        "state": "in_progress",
        "holder": holder,
        "expires_at_ms": expires_at_ms,
    });
    e.extra = extra.as_object().cloned().map(Box::new);
    e
}

/// Begin an idempotent execution.
#[utoipa::path(
    post, path = "/v1/idempotency/{key}", tag = "idempotency",
    params(("key" = String, Path, description = "idempotency key; may contain `/`")),
    request_body = IdempotencyBeginRequest,
    responses(
        (status = 201, description = "started: the caller executes; complete or abort with lease_id", body = IdempotencyResponse),
        (status = 200, description = "completed: replay `result` (header Idempotent-Replayed: true)", body = IdempotencyResponse),
        (status = 409, description = "in_progress, with Retry-After; also carries state/holder/expires_at_ms", body = ErrorBody),
        (status = 422, description = "fingerprint_mismatch", body = ErrorBody),
    )
)]
pub async fn begin(
    state: Shared,
    principal: Principal,
    ApiPath(key): ApiPath<String>,
    ApiJson(body): ApiJson<IdempotencyBeginRequest>,
) -> Result<Response, ApiError> {
    principal.check_write()?;
    principal.check_keys([key.as_str()])?;
    let wait_ms = body.wait_ms.unwrap_or(0);
    let begin = IdempotencyBegin {
        key: key.clone(),
        fingerprint: body.fingerprint,
        lease: NewLease {
            lease_id: new_lease_id(),
            holder: body.holder,
            ttl_ms: body.ttl_ms.unwrap_or(LEASE_TTL_MS_DEFAULT),
            reason: Some(format!("idempotency {key}")),
            metadata: None,
            owner: principal.name.clone(),
        },
        record_ttl_ms: body.record_ttl_ms.unwrap_or(IDEMPOTENCY_TTL_MS_DEFAULT),
        wait_ms,
    };
    let outcome = state
        .engine
        .call_waiting(wait_ms, |request_id, reply| Command::IdemBegin {
            begin,
            request_id,
            reply,
        })
        .await?;
    match outcome {
        IdempotencyOutcome::Started(lease) => Ok((
            StatusCode::CREATED,
            Json(IdempotencyResponse {
                key,
                state: IdempotencyStateName::Started,
                lease_id: Some(lease.lease_id.to_string()),
                holder: Some(lease.holder),
                expires_at_ms: Some(lease.expires_at_ms),
                result: None,
            }),
        )
            .into_response()),
        IdempotencyOutcome::InProgress {
            holder,
            expires_at_ms,
        } => Err(in_progress(&key, holder, expires_at_ms)),
        IdempotencyOutcome::Completed(result) => {
            let mut response = Json(IdempotencyResponse {
                key,
                state: IdempotencyStateName::Completed,
                lease_id: None,
                holder: None,
                expires_at_ms: None,
                result: Some(result_body(result)),
            })
            .into_response();
            response
                .headers_mut()
                .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
            Ok(response)
        }
        IdempotencyOutcome::FingerprintMismatch => Err(ApiError::new(
            ErrorCode::FingerprintMismatch,
            format!("idempotency key {key:?} was used with a different request (fingerprint)"),
        )
        .with_key(&key)),
        IdempotencyOutcome::Queued(_) => {
            Err(ApiError::internal("queued outcome reached the handler"))
        }
    }
}

/// Store the result of the execution this lease started (body up to 1 MiB); waiting twins get
/// it as `completed`.
#[utoipa::path(
    put, path = "/v1/idempotency/{key}", tag = "idempotency",
    params(("key" = String, Path, description = "idempotency key")),
    request_body = IdempotencyCompleteRequest,
    responses(
        (status = 200, body = IdempotencyResponse),
        (status = 404, description = "idempotency_not_found (not in progress under this lease)", body = ErrorBody),
        (status = 413, description = "payload_too_large: result body over 1 MiB", body = ErrorBody),
    )
)]
pub async fn complete(
    state: Shared,
    principal: Principal,
    ApiPath(key): ApiPath<String>,
    ApiJson(body): ApiJson<IdempotencyCompleteRequest>,
) -> Result<Json<IdempotencyResponse>, ApiError> {
    principal.check_write()?;
    principal.check_keys([key.as_str()])?;
    let lease_id = parse_lease_id(&body.lease_id)?;
    if body.result.body.len() > IDEMPOTENCY_RESULT_BODY_BYTES_MAX {
        let mut e = ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "result.body is {} bytes; at most {IDEMPOTENCY_RESULT_BODY_BYTES_MAX}",
                body.result.body.len()
            ),
        );
        e.body.field = Some("result.body".to_owned());
        return Err(e);
    }
    let result = IdempotencyResult {
        status: body.result.status,
        headers: body.result.headers,
        body: body.result.body,
    };
    let owner_check = principal.owner_filter();
    let k = key.clone();
    let record = state
        .engine
        .call(|reply| Command::IdemComplete {
            key: k,
            lease_id,
            result,
            owner_check,
            reply,
        })
        .await?;
    let result = match record.state {
        IdempotencyState::Completed(r) => Some(result_body(r)),
        IdempotencyState::InProgress { .. } => None,
    };
    Ok(Json(IdempotencyResponse {
        key,
        state: IdempotencyStateName::Completed,
        lease_id: None,
        holder: None,
        expires_at_ms: record.expires_at_ms,
        result,
    }))
}

/// Abandon the execution: the key is free for a retry. Answers `204`.
#[utoipa::path(
    delete, path = "/v1/idempotency/{key}", tag = "idempotency",
    params(("key" = String, Path, description = "idempotency key")),
    request_body = IdempotencyAbortRequest,
    responses(
        (status = 204, description = "aborted"),
        (status = 404, description = "idempotency_not_found", body = ErrorBody),
    )
)]
pub async fn abort(
    state: Shared,
    principal: Principal,
    ApiPath(key): ApiPath<String>,
    OptionalJson(body): OptionalJson<Option<IdempotencyAbortRequest>>,
) -> Result<StatusCode, ApiError> {
    principal.check_write()?;
    principal.check_keys([key.as_str()])?;
    let body =
        body.ok_or_else(|| ApiError::invalid("lease_id", "abort needs {\"lease_id\": ...}"))?;
    let lease_id = parse_lease_id(&body.lease_id)?;
    let owner_check = principal.owner_filter();
    state
        .engine
        .call(|reply| Command::IdemAbort {
            key,
            lease_id,
            owner_check,
            reply,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Read a record: `in_progress` (executor, expiry; `lease_id` only for its creator and
/// admins) or `completed` (the stored result).
#[utoipa::path(
    get, path = "/v1/idempotency/{key}", tag = "idempotency",
    params(("key" = String, Path, description = "idempotency key")),
    responses(
        (status = 200, body = IdempotencyResponse),
        (status = 404, description = "idempotency_not_found", body = ErrorBody),
    )
)]
pub async fn read(
    state: Shared,
    principal: Principal,
    ApiPath(key): ApiPath<String>,
) -> Result<Json<IdempotencyResponse>, ApiError> {
    principal.check_keys([key.as_str()])?;
    let k = key.clone();
    let found = state
        .engine
        .call(|reply| Command::IdemGet { key: k, reply })
        .await?;
    let Some((record, lease)) = found else {
        return Err(ApiError::new(
            ErrorCode::IdempotencyNotFound,
            format!("no idempotency record {key:?}"),
        )
        .with_key(&key));
    };
    Ok(Json(match record.state {
        IdempotencyState::Completed(r) => IdempotencyResponse {
            key,
            state: IdempotencyStateName::Completed,
            lease_id: None,
            holder: None,
            expires_at_ms: record.expires_at_ms,
            result: Some(result_body(r)),
        },
        IdempotencyState::InProgress { lease_id } => {
            let visible = principal.is_admin()
                || lease
                    .as_ref()
                    .is_some_and(|l| l.owner.is_some() && l.owner == principal.name);
            IdempotencyResponse {
                key,
                state: IdempotencyStateName::InProgress,
                lease_id: visible.then(|| lease_id.to_string()),
                holder: lease.as_ref().map(|l| l.holder.clone()),
                expires_at_ms: lease.as_ref().map(|l| l.expires_at_ms),
                result: None,
            }
        }
    }))
}
