//! Seed 002: editing a patient record under a pessimistic offline lock.
//!
//! An edit spans several requests (open the form, save, close), so no database transaction can
//! cover it. Instead the editor takes an offline lock — a row in holdfast-sql's offline lock
//! table, keyed by (`Patient`, id), with holder, reason and expiry:
//! - `POST /patients/{id}/lock` (header `X-Clinic-User`) takes it: 200 if the record was free or
//!   already held by the same user (reentrant: the hold count goes up), **412** naming the other
//!   holder otherwise;
//! - `PUT /patients/{id}` re-acquires it for the saving user (412 for anyone else), saves, and
//!   gives back the hold it took, so a save inside an open edit keeps the edit's hold;
//! - `DELETE /patients/{id}/lock` gives back one hold; an administrator can free a record with
//!   `DELETE /admin/patients/{id}/lock`; `GET /record-locks` lists who edits what.
//!
//! Locks expire after [`crate::Config::record_lock_ttl`], so an abandoned edit does not lock a
//! record forever.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use holdfast_sql::SqlLockError;
use holdfast_sql::offline::{OfflineLock, OfflineLocks};
use serde::{Deserialize, Serialize};

use crate::appointments::checked_text;
use crate::db::offline_lock_table;
use crate::error::AppError;
use crate::{Locking, SharedState, header, on_db};

/// The header naming the user (the lock holder).
pub const USER_HEADER: &str = "x-clinic-user";
/// The offline locks' object type.
pub const OBJECT_TYPE: &str = "Patient";

/// `POST /patients` body.
#[derive(Clone, Debug, Deserialize)]
pub struct NewPatient {
    /// Name.
    pub name: String,
    /// Notes [default empty].
    #[serde(default)]
    pub notes: String,
}

/// `PUT /patients/{id}` body (absent fields unchanged).
#[derive(Clone, Debug, Deserialize)]
pub struct PatientUpdate {
    /// New name.
    #[serde(default)]
    pub name: Option<String>,
    /// New notes.
    #[serde(default)]
    pub notes: Option<String>,
}

/// A patient record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Patient {
    /// Id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// Notes.
    pub notes: String,
    /// Who is editing it now, if anyone.
    pub locked_by: Option<RecordLock>,
}

/// An offline lock as shown in responses.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecordLock {
    /// `patient/42`.
    pub object: String,
    /// The editor.
    pub holder: String,
    /// Why.
    pub reason: Option<String>,
    /// Holds taken by the editor and not given back.
    pub hold_count: i64,
    /// Since when (RFC 3339).
    pub acquired_at: Option<String>,
    /// Until when (RFC 3339).
    pub expires_at: Option<String>,
}

impl From<OfflineLock> for RecordLock {
    fn from(l: OfflineLock) -> Self {
        Self {
            object: format!("patient/{}", l.object_id),
            holder: l.holder,
            reason: l.reason,
            hold_count: l.hold_count,
            acquired_at: l.acquired_at.map(|t| t.to_rfc3339()),
            expires_at: l.expires_at.map(|t| t.to_rfc3339()),
        }
    }
}

/// `POST /patients/{id}/lock` body.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct LockRequest {
    /// Why [default `editing`].
    #[serde(default)]
    pub reason: Option<String>,
}

/// `DELETE /patients/{id}/lock` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Unlocked {
    /// Holds the user still has (0: the record is free).
    pub holds_left: i64,
}

fn map_lock_error(e: SqlLockError) -> AppError {
    match e {
        SqlLockError::OfflineLockHeld {
            object_id,
            holder,
            reason,
            expires_at,
            ..
        } => AppError::RecordLocked {
            object: format!("patient/{object_id}"),
            holder,
            reason,
            expires_at: expires_at.map(|t| t.to_rfc3339()),
        },
        SqlLockError::NotHolder {
            object_id, holder, ..
        } => AppError::NotHolder {
            object: format!("patient/{object_id}"),
            holder,
        },
        e => AppError::from(e),
    }
}

fn user(headers: &HeaderMap) -> Result<String, AppError> {
    let u = header(headers, USER_HEADER).ok_or(AppError::MissingHeader("X-Clinic-User"))?;
    checked_text("X-Clinic-User", u, 255)
}

async fn acquire(
    state: &SharedState,
    id: i64,
    holder: &str,
    reason: &str,
) -> Result<RecordLock, AppError> {
    let table = offline_lock_table(&state.store);
    let ttl = Some(state.config.record_lock_ttl);
    let object_id = id.to_string();
    let lock = on_db!(&state.store.db, pool => {
        OfflineLocks::new(pool.clone()).with_table(&table)?.acquire(OBJECT_TYPE, &object_id, holder, Some(reason), ttl).await
    })
    .map_err(map_lock_error)?;
    Ok(lock.into())
}

async fn release(state: &SharedState, id: i64, holder: &str) -> Result<i64, AppError> {
    let table = offline_lock_table(&state.store);
    let object_id = id.to_string();
    on_db!(&state.store.db, pool => OfflineLocks::new(pool.clone()).with_table(&table)?.release(OBJECT_TYPE, &object_id, holder).await)
        .map_err(map_lock_error)
}

async fn current_lock(state: &SharedState, id: i64) -> Result<Option<RecordLock>, AppError> {
    let table = offline_lock_table(&state.store);
    let object_id = id.to_string();
    let lock = on_db!(&state.store.db, pool => OfflineLocks::new(pool.clone()).with_table(&table)?.get(OBJECT_TYPE, &object_id).await)
        .map_err(map_lock_error)?;
    Ok(lock.map(RecordLock::from))
}

async fn read_patient(state: &SharedState, id: i64) -> Result<(String, String), AppError> {
    let s = &state.store;
    let sql = s.sql("SELECT name, notes FROM {p}patients WHERE id = ?");
    let row: Option<(String, String)> =
        on_db!(&s.db, pool => sqlx::query_as(sql).bind(id).fetch_optional(pool).await)?;
    row.ok_or(AppError::NotFound {
        what: "patient",
        id,
    })
}

/// `POST /patients` → 201 patient.
///
/// # Errors
/// 400 on an empty name.
pub async fn create_patient(
    State(state): State<SharedState>,
    Json(req): Json<NewPatient>,
) -> Result<(StatusCode, Json<Patient>), AppError> {
    let name = checked_text("name", &req.name, 255)?;
    let s = &state.store;
    let sql = s.sql("INSERT INTO {p}patients (name, notes) VALUES (?, ?) RETURNING id");
    let (id,): (i64,) = on_db!(&s.db, pool => sqlx::query_as(sql).bind(&name).bind(&req.notes).fetch_one(pool).await)?;
    Ok((
        StatusCode::CREATED,
        Json(Patient {
            id,
            name,
            notes: req.notes,
            locked_by: None,
        }),
    ))
}

/// `GET /patients/{id}` → the record and who edits it.
///
/// # Errors
/// 404.
pub async fn get_patient(
    State(state): State<SharedState>,
    Path(id): Path<i64>,
) -> Result<Json<Patient>, AppError> {
    let (name, notes) = read_patient(&state, id).await?;
    let locked_by = current_lock(&state, id).await?;
    Ok(Json(Patient {
        id,
        name,
        notes,
        locked_by,
    }))
}

/// `POST /patients/{id}/lock` → 200 the lock (reentrant for the same user); 412 `record_locked`.
///
/// # Errors
/// As listed; 400 without `X-Clinic-User`; 404.
pub async fn lock_patient(
    State(state): State<SharedState>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    body: Option<Json<LockRequest>>,
) -> Result<Json<RecordLock>, AppError> {
    let holder = user(&headers)?;
    let reason = body
        .and_then(|Json(b)| b.reason)
        .unwrap_or_else(|| "editing".to_owned());
    let reason = checked_text("reason", &reason, 255)?;
    read_patient(&state, id).await?;
    if state.locking == Locking::Off {
        // Control mode: everyone is told the record is theirs.
        return Ok(Json(RecordLock {
            object: format!("patient/{id}"),
            holder,
            reason: Some(reason),
            hold_count: 1,
            acquired_at: None,
            expires_at: None,
        }));
    }
    Ok(Json(acquire(&state, id, &holder, &reason).await?))
}

/// `DELETE /patients/{id}/lock` → 200 `{holds_left}`; 409 `not_holder`.
///
/// # Errors
/// As listed.
pub async fn unlock_patient(
    State(state): State<SharedState>,
    Path(id): Path<i64>,
    headers: HeaderMap,
) -> Result<Json<Unlocked>, AppError> {
    let holder = user(&headers)?;
    if state.locking == Locking::Off {
        return Ok(Json(Unlocked { holds_left: 0 }));
    }
    Ok(Json(Unlocked {
        holds_left: release(&state, id, &holder).await?,
    }))
}

/// `DELETE /admin/patients/{id}/lock` → 200 `{released: bool}` whoever holds it.
///
/// # Errors
/// A database error.
pub async fn force_unlock_patient(
    State(state): State<SharedState>,
    Path(id): Path<i64>,
) -> Result<Json<serde_json::Value>, AppError> {
    let table = offline_lock_table(&state.store);
    let object_id = id.to_string();
    let released = on_db!(&state.store.db, pool => OfflineLocks::new(pool.clone()).with_table(&table)?.force_release(OBJECT_TYPE, &object_id).await)
        .map_err(map_lock_error)?;
    tracing::info!(patient = id, released, "record lock force-released");
    Ok(Json(serde_json::json!({ "released": released })))
}

/// `GET /record-locks` → every record lock held now.
///
/// # Errors
/// A database error.
pub async fn list_locks(
    State(state): State<SharedState>,
) -> Result<Json<Vec<RecordLock>>, AppError> {
    let table = offline_lock_table(&state.store);
    let locks = on_db!(&state.store.db, pool => OfflineLocks::new(pool.clone()).with_table(&table)?.list(None).await).map_err(map_lock_error)?;
    Ok(Json(locks.into_iter().map(RecordLock::from).collect()))
}

/// `PUT /patients/{id}` (header `X-Clinic-User`) → 200 the record; 412 `record_locked` when
/// someone else edits it.
///
/// # Errors
/// As listed.
pub async fn update_patient(
    State(state): State<SharedState>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    Json(req): Json<PatientUpdate>,
) -> Result<Json<Patient>, AppError> {
    let holder = user(&headers)?;
    let name = req
        .name
        .as_deref()
        .map(|n| checked_text("name", n, 255))
        .transpose()?;
    read_patient(&state, id).await?;
    let protected = state.locking == Locking::On;
    if protected {
        acquire(&state, id, &holder, "saving").await?;
    }
    let saved = save(&state, id, name.as_deref(), req.notes.as_deref()).await;
    if protected {
        // Give back the hold this request took, whatever the save did.
        release(&state, id, &holder).await?;
    }
    saved?;
    let (name, notes) = read_patient(&state, id).await?;
    let locked_by = current_lock(&state, id).await?;
    Ok(Json(Patient {
        id,
        name,
        notes,
        locked_by,
    }))
}

async fn save(
    state: &SharedState,
    id: i64,
    name: Option<&str>,
    notes: Option<&str>,
) -> Result<(), AppError> {
    let s = &state.store;
    if let Some(name) = name {
        let sql = s.sql("UPDATE {p}patients SET name = ? WHERE id = ?");
        on_db!(&s.db, pool => sqlx::query(sql).bind(name).bind(id).execute(pool).await.map(|_| ()))?;
    }
    if let Some(notes) = notes {
        let sql = s.sql("UPDATE {p}patients SET notes = ? WHERE id = ?");
        on_db!(&s.db, pool => sqlx::query(sql).bind(notes).bind(id).execute(pool).await.map(|_| ()))?;
    }
    Ok(())
}
