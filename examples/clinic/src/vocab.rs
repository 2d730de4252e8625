//! Seed 000: vocabulary import, serialized per code type and concurrent across types.
//!
//! An import replaces every code of one type (RXNORM, SNOMED, ICD10, …): it deletes them and
//! inserts the new ones, one statement at a time, as the seed's importer does — far too long
//! for one database transaction. Two imports of the same type running together would interleave
//! their deletes and inserts and leave duplicates or a mixture. So an import holds the holdfast
//! lock `clinic/vocab_import/{TYPE}` for its whole run (the seed's `GET_LOCK` per code type):
//! - by default it waits in the lock's FIFO queue for up to [`crate::Config::import_wait`];
//! - with `"no_wait": true` (the seed's `--lock-retry-delay=0`) it fails at once;
//! - either failure is 409 `import_in_progress` naming the holder;
//! - the lease is renewed while the import runs and released when it ends, on every path; if
//!   the importer dies, the lease expires and the next import proceeds;
//! - the import records the lock's fencing token; if the lock is lost while it runs (lease
//!   expired, force-released by an admin), the import stops at once and answers 503 `busy`, since
//!   the next holder may already be importing.
//!
//! Imports of different types take different keys and run concurrently.
//!
//! With [`ImportLock::Database`] the same lock is a database named lock instead (holdfast-sql's
//! advisory locks: PostgreSQL `pg_advisory_lock`, MariaDB `GET_LOCK`, exactly the seed's
//! mechanism), for deployments without a holdfast server; it is freed when its session ends.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use holdfast_client::ClientError;
use holdfast_sql::SqlLockError;
use holdfast_sql::advisory::{self, AdvisoryBackend, AdvisoryOptions};
use serde::{Deserialize, Serialize};

use crate::appointments::checked_text;
use crate::error::AppError;
use crate::patients::USER_HEADER;
use crate::{Db, HookPoint, ImportLock, Locking, SharedState, header, on_db};

/// Most codes one import may carry.
pub const IMPORT_CODES_MAX: usize = 10_000;

/// One code.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Code {
    /// The code.
    pub code: String,
    /// Its description.
    pub description: String,
}

/// `POST /vocabulary/{code_type}/imports` body.
#[derive(Clone, Debug, Deserialize)]
pub struct ImportRequest {
    /// The new codes of this type (they replace the old ones).
    pub codes: Vec<Code>,
    /// Fail at once if another import of this type runs [default false: wait].
    #[serde(default)]
    pub no_wait: bool,
}

/// A finished import.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Import {
    /// Id.
    pub id: i64,
    /// The code type.
    pub code_type: String,
    /// Codes imported.
    pub rows: i64,
    /// The import lock's fencing token (0 in control mode).
    pub fencing_token: u64,
    /// Who ran it.
    pub holder: String,
}

/// The lock key of an import of `code_type`.
#[must_use]
pub fn lock_key(code_type: &str) -> String {
    format!("clinic/vocab_import/{code_type}")
}

fn checked_code_type(raw: &str) -> Result<String, AppError> {
    let ok = !raw.is_empty()
        && raw.len() <= 32
        && raw
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(raw.to_owned())
    } else {
        Err(AppError::Invalid {
            field: "code_type",
            message: "1..=32 of A-Z, 0-9, _ (RXNORM, SNOMED, ICD10, …)".to_owned(),
        })
    }
}

/// `POST /vocabulary/{code_type}/imports` → 201 import; 409 `import_in_progress`.
///
/// # Errors
/// As listed; 503 when the lock service is not reachable.
pub async fn import(
    State(state): State<SharedState>,
    Path(code_type): Path<String>,
    headers: HeaderMap,
    Json(req): Json<ImportRequest>,
) -> Result<(StatusCode, Json<Import>), AppError> {
    let code_type = checked_code_type(&code_type)?;
    if req.codes.len() > IMPORT_CODES_MAX {
        return Err(AppError::Invalid {
            field: "codes",
            message: format!("at most {IMPORT_CODES_MAX}"),
        });
    }
    for c in &req.codes {
        checked_text("codes[].code", &c.code, 64)?;
        checked_text("codes[].description", &c.description, 255)?;
    }
    let holder = match header(&headers, USER_HEADER) {
        Some(u) => format!(
            "{}/{}",
            state.config.instance,
            checked_text("X-Clinic-User", u, 100)?
        ),
        None => state.config.instance.clone(),
    };
    if state.locking == Locking::Off {
        let done = run_import(&state, &code_type, &req.codes, &holder, 0).await?;
        return Ok((StatusCode::CREATED, Json(done)));
    }
    let wait = if req.no_wait {
        Duration::ZERO
    } else {
        state.config.import_wait
    };
    if state.config.import_lock == ImportLock::Database {
        let done = match &state.store.db {
            Db::Postgres(pool) => {
                with_named_lock(&state, pool, &code_type, &req.codes, &holder, wait).await?
            }
            Db::MySql(pool) => {
                with_named_lock(&state, pool, &code_type, &req.codes, &holder, wait).await?
            }
            Db::Sqlite(_) => {
                return Err(AppError::Invalid {
                    field: "import_lock",
                    message: "SQLite has no named locks: run the clinic with the lock service"
                        .to_owned(),
                });
            }
        };
        return Ok((StatusCode::CREATED, Json(done)));
    }
    let client = state.lock_service()?;
    let guard = client
        .lock(lock_key(&code_type))
        .holder(holder.clone())
        .ttl(state.config.lock_ttl)
        .wait(wait)
        .reason("vocabulary import")
        .acquire()
        .await
        .map_err(|e| busy(&code_type, e))?;
    let token = guard.fencing_token();
    let lost = guard.lost();
    // The import runs while the lease is renewed; if the lease is lost, the import stops at
    // once (the next holder may already be importing).
    let outcome = tokio::select! {
        r = run_import(&state, &code_type, &req.codes, &holder, token) => r,
        reason = lost => Err(AppError::Busy(format!("import lock of {code_type} lost: {reason}"))),
    };
    if let Err(e) = guard.release().await {
        tracing::warn!(error = %e, code_type, "releasing the import lock failed; it expires after its TTL");
    }
    Ok((StatusCode::CREATED, Json(outcome?)))
}

/// The import under a database named lock (seed 000's `GET_LOCK` per code type, or a PostgreSQL
/// advisory lock), named after the table prefix so that clinics sharing a database server but
/// not their tables do not block each other. One attempt that waits up to `wait` in the database
/// (zero: a try).
async fn with_named_lock<DB: AdvisoryBackend>(
    state: &SharedState,
    pool: &sqlx::Pool<DB>,
    code_type: &str,
    codes: &[Code],
    holder: &str,
    wait: Duration,
) -> Result<Import, AppError> {
    let name = format!("{}vocab_import/{code_type}", state.store.prefix());
    let options = AdvisoryOptions::no_wait().wait(wait);
    let guard = advisory::lock(pool, &name, &options)
        .await
        .map_err(|e| match e {
            SqlLockError::AdvisoryHeld { holder, .. } => AppError::ImportBusy {
                code_type: code_type.to_owned(),
                detail: format!("another import of {code_type} is in progress"),
                holders: holder
                    .map(|h| format!("database session {h}"))
                    .into_iter()
                    .collect(),
            },
            e => AppError::from(e),
        })?;
    let outcome = run_import(state, code_type, codes, holder, 0).await;
    if let Err(e) = guard.release().await {
        tracing::warn!(error = %e, code_type, "releasing the named import lock failed");
    }
    outcome
}

fn busy(code_type: &str, e: ClientError) -> AppError {
    match e {
        ClientError::Held { ref holders, .. } | ClientError::Timeout { ref holders, .. } => {
            AppError::ImportBusy {
                code_type: code_type.to_owned(),
                holders: holders.iter().map(|h| h.holder.clone()).collect(),
                detail: e.to_string(),
            }
        }
        e => AppError::from(e),
    }
}

async fn run_import(
    state: &SharedState,
    code_type: &str,
    codes: &[Code],
    holder: &str,
    token: u64,
) -> Result<Import, AppError> {
    let s = &state.store;
    state.hooks.at(HookPoint::VocabStarted, code_type).await;
    let delete = s.sql("DELETE FROM {p}vocab_codes WHERE code_type = ?");
    on_db!(&s.db, pool => sqlx::query(delete).bind(code_type).execute(pool).await.map(|_| ()))?;
    state.hooks.at(HookPoint::VocabCleared, code_type).await;
    let token_i64 = i64::try_from(token).unwrap_or(i64::MAX);
    let record = s.sql("INSERT INTO {p}vocab_imports (code_type, row_count, fencing_token, holder) VALUES (?, ?, ?, ?) RETURNING id");
    let rows = i64::try_from(codes.len()).unwrap_or(i64::MAX);
    let (id,): (i64,) = on_db!(&s.db, pool => sqlx::query_as(record).bind(code_type).bind(rows).bind(token_i64).bind(holder).fetch_one(pool).await)?;
    for c in codes {
        let insert = s.sql("INSERT INTO {p}vocab_codes (code_type, code, description, import_id) VALUES (?, ?, ?, ?)");
        on_db!(&s.db, pool => sqlx::query(insert).bind(code_type).bind(&c.code).bind(&c.description).bind(id).execute(pool).await.map(|_| ()))?;
    }
    state.hooks.at(HookPoint::VocabFinished, code_type).await;
    Ok(Import {
        id,
        code_type: code_type.to_owned(),
        rows,
        fencing_token: token,
        holder: holder.to_owned(),
    })
}

/// `GET /vocabulary/{code_type}` → the codes of that type.
///
/// # Errors
/// 400 on a bad code type.
pub async fn codes(
    State(state): State<SharedState>,
    Path(code_type): Path<String>,
) -> Result<Json<Vec<Code>>, AppError> {
    let code_type = checked_code_type(&code_type)?;
    let s = &state.store;
    let sql = s.sql("SELECT code, description FROM {p}vocab_codes WHERE code_type = ? ORDER BY id");
    let rows: Vec<(String, String)> =
        on_db!(&s.db, pool => sqlx::query_as(sql).bind(&code_type).fetch_all(pool).await)?;
    Ok(Json(
        rows.into_iter()
            .map(|(code, description)| Code { code, description })
            .collect(),
    ))
}
