//! Sequencer check: is this fencing token a current grant of this key?

use axum::Json;
use holdfast_api::{ErrorBody, FencingCheckRequest, FencingCheckResponse};

use super::{ApiJson, Shared};
use crate::actor::Command;
use crate::auth::Principal;
use crate::error::ApiError;

/// Answer whether `fencing_token` is the token of a current grant of `key` (readers allowed).
#[utoipa::path(
    post, path = "/v1/fencing/check", tag = "fencing",
    request_body = FencingCheckRequest,
    responses((status = 200, body = FencingCheckResponse), (status = 400, body = ErrorBody))
)]
pub async fn check(
    state: Shared,
    principal: Principal,
    ApiJson(body): ApiJson<FencingCheckRequest>,
) -> Result<Json<FencingCheckResponse>, ApiError> {
    principal.check_keys([body.key.as_str()])?;
    let FencingCheckRequest { key, fencing_token } = body;
    let r = state
        .engine
        .call(|reply| Command::Fencing {
            key,
            fencing_token,
            reply,
        })
        .await?;
    Ok(Json(FencingCheckResponse {
        current: r.current,
        current_tokens: r.current_tokens,
    }))
}
