//! Seed 001: appointment booking without double booking, status transitions by role, and one
//! prescription and one rating per appointment.
//!
//! Every write runs in a transaction retried on deadlocks (holdfast-sql's `transaction`), after
//! locking the rows it depends on with holdfast-sql's row locks, always in the same order
//! (doctor, then patient; or the appointment alone), so bookings cannot deadlock each other:
//! - booking locks the doctor's row and then the patient's row, then checks the slot: two
//!   bookings of one doctor queue on the doctor's row, and the second sees the first's
//!   appointment (409 `slot_taken`);
//! - a status change, a prescription and a rating lock the appointment's row, then read its
//!   status (and whether a prescription or rating exists) and write.
//!
//! On SQLite the transaction starts with `BEGIN IMMEDIATE`, which takes the database's single
//! write lock, so the same steps are serialized without row locks.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use futures::future::BoxFuture;
use holdfast_sql::rows::RowLock;
use serde::{Deserialize, Serialize};
use sqlx::{MySqlConnection, PgConnection, SqliteConnection};

use crate::db::RowLocking as _;
use crate::error::AppError;
use crate::{Ctx, HookPoint, SharedState, on_db, run_steps};

/// Statuses of an appointment.
pub const STATUSES: &[&str] = &[
    "pending",
    "confirmed",
    "rejected",
    "in_progress",
    "cancelled",
    "completed",
];

/// Who asks for a status change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The appointment's doctor.
    Doctor,
    /// The appointment's patient.
    Patient,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::Doctor => "doctor",
            Self::Patient => "patient",
        }
    }
}

/// The transition table: who may move an appointment from `from` to `to` (`None`: nobody).
#[must_use]
pub fn allowed_roles(from: &str, to: &str) -> Option<&'static [Role]> {
    match (from, to) {
        ("pending", "confirmed" | "rejected")
        | ("confirmed", "in_progress")
        | ("in_progress", "completed") => Some(&[Role::Doctor]),
        ("confirmed", "cancelled") => Some(&[Role::Doctor, Role::Patient]),
        _ => None,
    }
}

/// `POST /doctors` body.
#[derive(Clone, Debug, Deserialize)]
pub struct NewDoctor {
    /// Name.
    pub name: String,
    /// Accepting appointments [default true].
    #[serde(default = "yes")]
    pub active: bool,
}

fn yes() -> bool {
    true
}

/// A doctor.
#[derive(Clone, Debug, Serialize)]
pub struct Doctor {
    /// Id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// Accepting appointments.
    pub active: bool,
}

/// `POST /appointments` body.
#[derive(Clone, Debug, Deserialize)]
pub struct BookRequest {
    /// The patient.
    pub patient_id: i64,
    /// The doctor.
    pub doctor_id: i64,
    /// The slot: `2030-01-20T10:00:00` or `2030-01-20 10:00:00`.
    pub scheduled_at: String,
    /// Kind of consultation [default `consultation`].
    #[serde(default = "consultation", rename = "type")]
    pub kind: String,
    /// Why.
    #[serde(default)]
    pub reason: Option<String>,
}

fn consultation() -> String {
    "consultation".to_owned()
}

/// An appointment.
#[derive(Clone, Debug, Serialize)]
pub struct Appointment {
    /// Id.
    pub id: i64,
    /// The doctor.
    pub doctor_id: i64,
    /// The patient.
    pub patient_id: i64,
    /// The slot (normalised to `YYYY-MM-DDTHH:MM:SS`).
    pub scheduled_at: String,
    /// Kind.
    #[serde(rename = "type")]
    pub kind: String,
    /// Why.
    pub reason: Option<String>,
    /// Status.
    pub status: String,
}

type AppointmentRow = (i64, i64, i64, String, String, Option<String>, String);

impl From<AppointmentRow> for Appointment {
    fn from(r: AppointmentRow) -> Self {
        Self {
            id: r.0,
            doctor_id: r.1,
            patient_id: r.2,
            scheduled_at: r.3,
            kind: r.4,
            reason: r.5,
            status: r.6,
        }
    }
}

const APPOINTMENT_COLUMNS: &str = "id, doctor_id, patient_id, scheduled_at, kind, reason, status";

/// `POST /appointments/{id}/status` body.
#[derive(Clone, Debug, Deserialize)]
pub struct StatusRequest {
    /// The new status.
    pub status: String,
    /// Who asks.
    pub actor_role: Role,
    /// The doctor's or patient's id.
    pub actor_id: i64,
}

/// `POST /appointments/{id}/prescription` body.
#[derive(Clone, Debug, Deserialize)]
pub struct PrescriptionRequest {
    /// The prescribing doctor (must be the appointment's).
    pub doctor_id: i64,
    /// Medications.
    pub medications: Vec<String>,
}

/// A prescription.
#[derive(Clone, Debug, Serialize)]
pub struct Prescription {
    /// Id.
    pub id: i64,
    /// The appointment.
    pub appointment_id: i64,
    /// The doctor.
    pub doctor_id: i64,
    /// Medications.
    pub medications: Vec<String>,
}

/// `POST /appointments/{id}/rating` body.
#[derive(Clone, Debug, Deserialize)]
pub struct RatingRequest {
    /// The rating patient (must be the appointment's).
    pub patient_id: i64,
    /// 1..=5.
    pub score: i64,
    /// Free text.
    #[serde(default)]
    pub comment: Option<String>,
}

/// A rating.
#[derive(Clone, Debug, Serialize)]
pub struct Rating {
    /// Id.
    pub id: i64,
    /// The appointment.
    pub appointment_id: i64,
    /// The patient.
    pub patient_id: i64,
    /// 1..=5.
    pub score: i64,
    /// Free text.
    pub comment: Option<String>,
}

/// Normalise a slot time to `YYYY-MM-DDTHH:MM:SS`.
fn normalise_slot(raw: &str) -> Result<String, AppError> {
    let raw = raw.trim();
    let parsed = chrono::NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S")
        .or_else(|_| chrono::NaiveDateTime::parse_from_str(raw, "%Y-%m-%d %H:%M:%S"))
        .or_else(|_| chrono::DateTime::parse_from_rfc3339(raw).map(|t| t.naive_utc()))
        .map_err(|_| AppError::Invalid {
            field: "scheduled_at",
            message: "expected YYYY-MM-DDTHH:MM:SS".to_owned(),
        })?;
    Ok(parsed.format("%Y-%m-%dT%H:%M:%S").to_string())
}

/// The steps of each write, for every database's connection type (see [`run_steps!`]).
pub(crate) trait Steps {
    fn book<'a>(
        &'a mut self,
        ctx: &'a Ctx,
        req: &'a BookRequest,
    ) -> BoxFuture<'a, Result<Appointment, AppError>>;
    fn change_status<'a>(
        &'a mut self,
        ctx: &'a Ctx,
        req: &'a (i64, StatusRequest),
    ) -> BoxFuture<'a, Result<Appointment, AppError>>;
    fn prescribe<'a>(
        &'a mut self,
        ctx: &'a Ctx,
        req: &'a (i64, PrescriptionRequest),
    ) -> BoxFuture<'a, Result<Prescription, AppError>>;
    fn rate<'a>(
        &'a mut self,
        ctx: &'a Ctx,
        req: &'a (i64, RatingRequest),
    ) -> BoxFuture<'a, Result<Rating, AppError>>;
}

macro_rules! impl_steps {
    ($($conn:ty),*) => {$(
        impl Steps for $conn {
            fn book<'a>(&'a mut self, ctx: &'a Ctx, req: &'a BookRequest) -> BoxFuture<'a, Result<Appointment, AppError>> {
                Box::pin(async move {
                    let s = &ctx.store;
                    // Doctor first, then patient: the one order every booking uses.
                    if ctx.lock {
                        self.lock_rows(&RowLock::new(&s.table("doctors"), "id"), vec![req.doctor_id]).await?;
                    }
                    let doctor: Option<(i64,)> = sqlx::query_as(s.sql("SELECT active FROM {p}doctors WHERE id = ?"))
                        .bind(req.doctor_id)
                        .fetch_optional(&mut *self)
                        .await?;
                    match doctor {
                        None => return Err(AppError::NotFound { what: "doctor", id: req.doctor_id }),
                        Some((0,)) => return Err(AppError::DoctorInactive(req.doctor_id)),
                        Some(_) => {}
                    }
                    if ctx.lock {
                        self.lock_rows(&RowLock::new(&s.table("patients"), "id"), vec![req.patient_id]).await?;
                    }
                    let patient: Option<(i64,)> = sqlx::query_as(s.sql("SELECT id FROM {p}patients WHERE id = ?"))
                        .bind(req.patient_id)
                        .fetch_optional(&mut *self)
                        .await?;
                    if patient.is_none() {
                        return Err(AppError::NotFound { what: "patient", id: req.patient_id });
                    }
                    let (taken,): (i64,) = sqlx::query_as(s.sql(
                        "SELECT COUNT(*) FROM {p}appointments WHERE doctor_id = ? AND scheduled_at = ? \
                         AND status NOT IN ('cancelled', 'rejected')",
                    ))
                    .bind(req.doctor_id)
                    .bind(&req.scheduled_at)
                    .fetch_one(&mut *self)
                    .await?;
                    ctx.hooks.at(HookPoint::BookingChecked, req.doctor_id).await;
                    if taken > 0 {
                        return Err(AppError::SlotTaken { doctor_id: req.doctor_id, scheduled_at: req.scheduled_at.clone() });
                    }
                    let (id,): (i64,) = sqlx::query_as(s.sql(
                        "INSERT INTO {p}appointments (doctor_id, patient_id, scheduled_at, kind, reason, status) \
                         VALUES (?, ?, ?, ?, ?, 'pending') RETURNING id",
                    ))
                    .bind(req.doctor_id)
                    .bind(req.patient_id)
                    .bind(&req.scheduled_at)
                    .bind(&req.kind)
                    .bind(&req.reason)
                    .fetch_one(&mut *self)
                    .await?;
                    Ok(Appointment {
                        id,
                        doctor_id: req.doctor_id,
                        patient_id: req.patient_id,
                        scheduled_at: req.scheduled_at.clone(),
                        kind: req.kind.clone(),
                        reason: req.reason.clone(),
                        status: "pending".to_owned(),
                    })
                })
            }

            fn change_status<'a>(&'a mut self, ctx: &'a Ctx, req: &'a (i64, StatusRequest)) -> BoxFuture<'a, Result<Appointment, AppError>> {
                Box::pin(async move {
                    let (id, req) = (req.0, &req.1);
                    let s = &ctx.store;
                    if ctx.lock {
                        self.lock_rows(&RowLock::new(&s.table("appointments"), "id"), vec![id]).await?;
                    }
                    let row: Option<AppointmentRow> = sqlx::query_as(s.sql(&format!("SELECT {APPOINTMENT_COLUMNS} FROM {{p}}appointments WHERE id = ?")))
                        .bind(id)
                        .fetch_optional(&mut *self)
                        .await?;
                    let mut appointment = Appointment::from(row.ok_or(AppError::NotFound { what: "appointment", id })?);
                    ctx.hooks.at(HookPoint::StatusRead, id).await;
                    let invalid = || AppError::InvalidTransition { from: appointment.status.clone(), to: req.status.clone() };
                    let roles = allowed_roles(&appointment.status, &req.status).ok_or_else(invalid)?;
                    let actor_matches = match req.actor_role {
                        Role::Doctor => appointment.doctor_id == req.actor_id,
                        Role::Patient => appointment.patient_id == req.actor_id,
                    };
                    if !roles.contains(&req.actor_role) || !actor_matches {
                        return Err(AppError::Forbidden(format!(
                            "{} {} may not move appointment {id} from {} to {}",
                            req.actor_role.as_str(), req.actor_id, appointment.status, req.status
                        )));
                    }
                    sqlx::query(s.sql("UPDATE {p}appointments SET status = ? WHERE id = ?"))
                        .bind(&req.status)
                        .bind(id)
                        .execute(&mut *self)
                        .await?;
                    sqlx::query(s.sql(
                        "INSERT INTO {p}appointment_events (appointment_id, from_status, to_status, actor_role) VALUES (?, ?, ?, ?)",
                    ))
                    .bind(id)
                    .bind(&appointment.status)
                    .bind(&req.status)
                    .bind(req.actor_role.as_str())
                    .execute(&mut *self)
                    .await?;
                    appointment.status.clone_from(&req.status);
                    Ok(appointment)
                })
            }

            fn prescribe<'a>(&'a mut self, ctx: &'a Ctx, req: &'a (i64, PrescriptionRequest)) -> BoxFuture<'a, Result<Prescription, AppError>> {
                Box::pin(async move {
                    let (id, req) = (req.0, &req.1);
                    let s = &ctx.store;
                    if ctx.lock {
                        self.lock_rows(&RowLock::new(&s.table("appointments"), "id"), vec![id]).await?;
                    }
                    let row: Option<(i64, String)> = sqlx::query_as(s.sql("SELECT doctor_id, status FROM {p}appointments WHERE id = ?"))
                        .bind(id)
                        .fetch_optional(&mut *self)
                        .await?;
                    let (doctor_id, status) = row.ok_or(AppError::NotFound { what: "appointment", id })?;
                    if status != "completed" {
                        return Err(AppError::WrongAppointmentState { appointment_id: id, status, needed: "a prescription needs a completed appointment" });
                    }
                    if doctor_id != req.doctor_id {
                        return Err(AppError::Forbidden(format!("doctor {} is not the doctor of appointment {id}", req.doctor_id)));
                    }
                    let (existing,): (i64,) = sqlx::query_as(s.sql("SELECT COUNT(*) FROM {p}prescriptions WHERE appointment_id = ?"))
                        .bind(id)
                        .fetch_one(&mut *self)
                        .await?;
                    ctx.hooks.at(HookPoint::PrescriptionChecked, id).await;
                    if existing > 0 {
                        return Err(AppError::AlreadyExists { what: "prescription", appointment_id: id });
                    }
                    let medications = serde_json::to_string(&req.medications).unwrap_or_default();
                    let (pid,): (i64,) = sqlx::query_as(s.sql(
                        "INSERT INTO {p}prescriptions (appointment_id, doctor_id, medications) VALUES (?, ?, ?) RETURNING id",
                    ))
                    .bind(id)
                    .bind(doctor_id)
                    .bind(medications)
                    .fetch_one(&mut *self)
                    .await?;
                    Ok(Prescription { id: pid, appointment_id: id, doctor_id, medications: req.medications.clone() })
                })
            }

            fn rate<'a>(&'a mut self, ctx: &'a Ctx, req: &'a (i64, RatingRequest)) -> BoxFuture<'a, Result<Rating, AppError>> {
                Box::pin(async move {
                    let (id, req) = (req.0, &req.1);
                    let s = &ctx.store;
                    if ctx.lock {
                        self.lock_rows(&RowLock::new(&s.table("appointments"), "id"), vec![id]).await?;
                    }
                    let row: Option<(i64, String)> = sqlx::query_as(s.sql("SELECT patient_id, status FROM {p}appointments WHERE id = ?"))
                        .bind(id)
                        .fetch_optional(&mut *self)
                        .await?;
                    let (patient_id, status) = row.ok_or(AppError::NotFound { what: "appointment", id })?;
                    if status != "completed" {
                        return Err(AppError::WrongAppointmentState { appointment_id: id, status, needed: "a rating needs a completed appointment" });
                    }
                    if patient_id != req.patient_id {
                        return Err(AppError::Forbidden(format!("patient {} is not the patient of appointment {id}", req.patient_id)));
                    }
                    let (existing,): (i64,) = sqlx::query_as(s.sql("SELECT COUNT(*) FROM {p}ratings WHERE appointment_id = ?"))
                        .bind(id)
                        .fetch_one(&mut *self)
                        .await?;
                    ctx.hooks.at(HookPoint::RatingChecked, id).await;
                    if existing > 0 {
                        return Err(AppError::AlreadyExists { what: "rating", appointment_id: id });
                    }
                    let (rid,): (i64,) = sqlx::query_as(s.sql(
                        "INSERT INTO {p}ratings (appointment_id, patient_id, score, comment) VALUES (?, ?, ?, ?) RETURNING id",
                    ))
                    .bind(id)
                    .bind(patient_id)
                    .bind(req.score)
                    .bind(&req.comment)
                    .fetch_one(&mut *self)
                    .await?;
                    Ok(Rating { id: rid, appointment_id: id, patient_id, score: req.score, comment: req.comment.clone() })
                })
            }
        }
    )*};
}

impl_steps!(SqliteConnection, PgConnection, MySqlConnection);

/// `POST /doctors` → 201 doctor.
///
/// # Errors
/// 400 on an empty name.
pub async fn create_doctor(
    State(state): State<SharedState>,
    Json(req): Json<NewDoctor>,
) -> Result<(StatusCode, Json<Doctor>), AppError> {
    let name = checked_text("name", &req.name, 255)?;
    let s = &state.store;
    let sql = s.sql("INSERT INTO {p}doctors (name, active) VALUES (?, ?) RETURNING id");
    let active = i64::from(req.active);
    let (id,): (i64,) =
        on_db!(&s.db, pool => sqlx::query_as(sql).bind(&name).bind(active).fetch_one(pool).await)?;
    Ok((
        StatusCode::CREATED,
        Json(Doctor {
            id,
            name,
            active: req.active,
        }),
    ))
}

/// `POST /appointments` → 201 appointment; 409 `slot_taken` / `doctor_inactive`; 404.
///
/// # Errors
/// As listed.
pub async fn book(
    State(state): State<SharedState>,
    Json(mut req): Json<BookRequest>,
) -> Result<(StatusCode, Json<Appointment>), AppError> {
    req.scheduled_at = normalise_slot(&req.scheduled_at)?;
    req.kind = checked_text("type", &req.kind, 64)?;
    if let Some(reason) = &req.reason {
        checked_text("reason", reason, 255)?;
    }
    let appointment = run_steps!(&state, book, req)?;
    Ok((StatusCode::CREATED, Json(appointment)))
}

/// `GET /appointments/{id}`.
///
/// # Errors
/// 404.
pub async fn get_appointment(
    State(state): State<SharedState>,
    Path(id): Path<i64>,
) -> Result<Json<Appointment>, AppError> {
    let s = &state.store;
    let sql = s.sql(&format!(
        "SELECT {APPOINTMENT_COLUMNS} FROM {{p}}appointments WHERE id = ?"
    ));
    let row: Option<AppointmentRow> =
        on_db!(&s.db, pool => sqlx::query_as(sql).bind(id).fetch_optional(pool).await)?;
    row.map(|r| Json(Appointment::from(r)))
        .ok_or(AppError::NotFound {
            what: "appointment",
            id,
        })
}

/// `POST /appointments/{id}/status` → 200 appointment; 422 `invalid_transition`; 403; 404.
///
/// # Errors
/// As listed.
pub async fn change_status(
    State(state): State<SharedState>,
    Path(id): Path<i64>,
    Json(req): Json<StatusRequest>,
) -> Result<Json<Appointment>, AppError> {
    if !STATUSES.contains(&req.status.as_str()) {
        return Err(AppError::Invalid {
            field: "status",
            message: format!("one of {}", STATUSES.join(", ")),
        });
    }
    let appointment = run_steps!(&state, change_status, (id, req))?;
    Ok(Json(appointment))
}

/// `POST /appointments/{id}/prescription` → 201; 409 `already_exists`; 422 not completed.
///
/// # Errors
/// As listed.
pub async fn prescribe(
    State(state): State<SharedState>,
    Path(id): Path<i64>,
    Json(req): Json<PrescriptionRequest>,
) -> Result<(StatusCode, Json<Prescription>), AppError> {
    if req.medications.is_empty()
        || req
            .medications
            .iter()
            .any(|m| m.trim().is_empty() || m.len() > 255)
    {
        return Err(AppError::Invalid {
            field: "medications",
            message: "one or more names of 1..=255 bytes".to_owned(),
        });
    }
    let prescription = run_steps!(&state, prescribe, (id, req))?;
    Ok((StatusCode::CREATED, Json(prescription)))
}

/// `POST /appointments/{id}/rating` → 201; 409 `already_exists`; 422 not completed.
///
/// # Errors
/// As listed.
pub async fn rate(
    State(state): State<SharedState>,
    Path(id): Path<i64>,
    Json(req): Json<RatingRequest>,
) -> Result<(StatusCode, Json<Rating>), AppError> {
    if !(1..=5).contains(&req.score) {
        return Err(AppError::Invalid {
            field: "score",
            message: "1..=5".to_owned(),
        });
    }
    let rating = run_steps!(&state, rate, (id, req))?;
    Ok((StatusCode::CREATED, Json(rating)))
}

/// Trim `value` and check it is 1..=`max` bytes.
pub(crate) fn checked_text(
    field: &'static str,
    value: &str,
    max: usize,
) -> Result<String, AppError> {
    let v = value.trim();
    if v.is_empty() || v.len() > max {
        return Err(AppError::Invalid {
            field,
            message: format!("1..={max} bytes"),
        });
    }
    Ok(v.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_table() {
        assert_eq!(
            allowed_roles("pending", "confirmed"),
            Some(&[Role::Doctor][..])
        );
        assert_eq!(
            allowed_roles("confirmed", "cancelled"),
            Some(&[Role::Doctor, Role::Patient][..])
        );
        assert_eq!(allowed_roles("completed", "confirmed"), None);
        assert_eq!(allowed_roles("pending", "completed"), None);
    }

    #[test]
    fn slots_are_normalised() {
        assert_eq!(
            normalise_slot("2030-01-20 10:00:00").unwrap(),
            "2030-01-20T10:00:00"
        );
        assert_eq!(
            normalise_slot("2030-01-20T10:00:00").unwrap(),
            "2030-01-20T10:00:00"
        );
        assert!(normalise_slot("tomorrow").is_err());
    }
}
