//! `GET /v1/openapi.json`: the OpenAPI document, generated from the handlers' annotations and
//! the wire types, with the table of error codes and statuses (from [`ErrorCode::ALL`]).

use std::sync::OnceLock;

use axum::Json;
use holdfast_api::ErrorCode;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{admin, events, fencing, idempotency, leases, locks, ops};

struct Extras;

impl Modify for Extras {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let mut table = String::from(
            "holdfast lock service API. Every error is JSON `{error, message, ...details}` with a stable code:\n\n| error | HTTP status |\n|---|---|\n",
        );
        for code in ErrorCode::ALL {
            table.push_str(&format!(
                "| `{}` | {} |\n",
                code.as_str(),
                code.http_status()
            ));
        }
        table.push_str(
            "\nAuth: `Authorization: Bearer <token>` (roles admin, client, reader; key prefixes per token). \
             With no tokens configured the server is open (loopback only). \
             Keys are the rest of the path where a route ends in `{key}`: they may contain `/`, and are percent-decoded. \
             Another token's lease is answered `404 lease_not_found`, as an unknown lease. \
             The per-token lease quota answers `503 overloaded`.",
        );
        openapi.info.description = Some(table);
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document's definition.
#[derive(OpenApi)]
#[openapi(
    info(title = "holdfast", version = env!("CARGO_PKG_VERSION")),
    paths(
        leases::create_lease,
        leases::get_lease,
        leases::add_locks,
        leases::renew,
        leases::release_lease,
        leases::release_lock,
        locks::list_locks,
        locks::get_lock,
        admin::force_release_lock,
        admin::force_release_lease,
        idempotency::begin,
        idempotency::complete,
        idempotency::abort,
        idempotency::read,
        fencing::check,
        events::stream,
        ops::stats,
        ops::metrics,
        ops::healthz,
        ops::dashboard,
        ops::readyz,
        document,
    ),
    components(schemas(
        holdfast_api::ErrorCode,
        holdfast_api::ErrorBody,
        holdfast_api::EventBody,
        holdfast_api::EventsMissedBody,
        holdfast_api::LockMode,
    )),
    modifiers(&Extras),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

/// The generated document (built once).
pub fn spec() -> &'static utoipa::openapi::OpenApi {
    static SPEC: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    SPEC.get_or_init(ApiDoc::openapi)
}

/// This document.
#[utoipa::path(
    get, path = "/v1/openapi.json", tag = "ops",
    responses((status = 200, description = "OpenAPI 3.1 document"))
)]
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(spec().clone())
}
