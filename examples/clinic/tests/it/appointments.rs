//! Seed 001: status transitions by role (422 on an invalid transition), one prescription and one
//! rating per appointment, under concurrency.

use clinic::HookPoint;
use futures::future::join_all;
use serde_json::{Value, json};

use crate::common::{App, Backend, Options, app, barrier_at, per_backend, statuses};

struct Fixture {
    doctor: i64,
    patient: i64,
    appointment: i64,
}

async fn fixture(app: &App) -> Fixture {
    let doctor = app.create("/doctors", json!({"name": "Dr. Green"})).await;
    let patient = app.create("/patients", json!({"name": "Ann"})).await;
    let appointment = app.create("/appointments", json!({"doctor_id": doctor, "patient_id": patient, "scheduled_at": "2030-02-01T09:00:00"})).await;
    Fixture {
        doctor,
        patient,
        appointment,
    }
}

async fn set_status(app: &App, f: &Fixture, status: &str, role: &str) -> crate::common::Reply {
    let actor = if role == "doctor" {
        f.doctor
    } else {
        f.patient
    };
    app.post(
        &format!("/appointments/{}/status", f.appointment),
        json!({"status": status, "actor_role": role, "actor_id": actor}),
    )
    .await
}

/// The transition table, step by step: allowed moves 200, others 422, wrong role 403.
async fn transitions_by_role(backend: Backend) {
    let Some(app) = app(backend, Options::default()).await else {
        return;
    };
    let f = fixture(&app).await;
    let r = set_status(&app, &f, "completed", "doctor").await;
    assert_eq!(
        (r.status.as_u16(), r.body["error"].as_str()),
        (422, Some("invalid_transition")),
        "{:?}",
        r.body
    );
    assert_eq!(
        set_status(&app, &f, "confirmed", "patient").await.status,
        403,
        "only the doctor confirms"
    );
    let other_doctor = app.create("/doctors", json!({"name": "Dr. Brown"})).await;
    let r = app
        .post(
            &format!("/appointments/{}/status", f.appointment),
            json!({"status": "confirmed", "actor_role": "doctor", "actor_id": other_doctor}),
        )
        .await;
    assert_eq!(r.status, 403, "only this appointment's doctor");
    for (status, role) in [
        ("confirmed", "doctor"),
        ("in_progress", "doctor"),
        ("completed", "doctor"),
    ] {
        let r = set_status(&app, &f, status, role).await;
        assert_eq!(r.status, 200, "{status}: {:?}", r.body);
        assert_eq!(r.body["status"], status);
    }
    for status in ["confirmed", "cancelled", "in_progress", "pending"] {
        assert_eq!(
            set_status(&app, &f, status, "doctor").await.status,
            422,
            "completed -> {status}"
        );
    }
    // pending -> rejected; confirmed -> cancelled by the patient.
    let g = fixture_at(&app, &f, "2030-02-01T10:00:00").await;
    assert_eq!(set_status(&app, &g, "rejected", "doctor").await.status, 200);
    let h = fixture_at(&app, &f, "2030-02-01T11:00:00").await;
    assert_eq!(
        set_status(&app, &h, "confirmed", "doctor").await.status,
        200
    );
    assert_eq!(
        set_status(&app, &h, "cancelled", "patient").await.status,
        200
    );
    assert_eq!(
        app.get(&format!("/appointments/{}", h.appointment))
            .await
            .body["status"],
        "cancelled"
    );
    app.finish().await;
}

async fn fixture_at(app: &App, f: &Fixture, slot: &str) -> Fixture {
    let appointment = app
        .create(
            "/appointments",
            json!({"doctor_id": f.doctor, "patient_id": f.patient, "scheduled_at": slot}),
        )
        .await;
    Fixture {
        doctor: f.doctor,
        patient: f.patient,
        appointment,
    }
}

/// Seed 001 scenario 2: the doctor starts the consultation while the patient cancels. Exactly one
/// wins; the other is refused with 422, and one transition is recorded.
async fn concurrent_transitions_one_wins(backend: Backend) {
    let Some(app) = app(
        backend,
        Options::default().hooks(crate::common::widen_at(HookPoint::StatusRead)),
    )
    .await
    else {
        return;
    };
    let f = fixture(&app).await;
    assert_eq!(
        set_status(&app, &f, "confirmed", "doctor").await.status,
        200
    );
    let replies = join_all((0..10).map(|i| {
        if i % 2 == 0 {
            set_status(&app, &f, "in_progress", "doctor")
        } else {
            set_status(&app, &f, "cancelled", "patient")
        }
    }))
    .await;
    let counts = statuses(&replies);
    assert_eq!(counts.get(&200), Some(&1), "{counts:?}");
    assert_eq!(counts.get(&422), Some(&9), "{counts:?}");
    let from_confirmed = app.scalar("SELECT COUNT(*) FROM {p}appointment_events WHERE appointment_id = ? AND from_status = 'confirmed'", &[f.appointment]).await;
    assert_eq!(from_confirmed, 1);
    app.finish().await;
}

/// Control: without the row lock, both read `confirmed` and both succeed: the appointment is
/// "both started and cancelled".
async fn control_transitions_without_locks(backend: Backend) {
    let (hooks, stuck) = barrier_at(HookPoint::StatusRead, 2);
    let Some(app) = app(backend, Options::default().off().hooks(hooks)).await else {
        return;
    };
    let f = fixture(&app).await;
    // Two sequential transitions pass the barrier pairwise: run them together.
    let (a, b) = futures::join!(
        set_status(&app, &f, "confirmed", "doctor"),
        set_status(&app, &f, "rejected", "doctor")
    );
    assert_eq!(
        (a.status.as_u16(), b.status.as_u16()),
        (200, 200),
        "the anomaly: confirmed and rejected"
    );
    // Get to `confirmed` again for the seed's exact race.
    let g = fixture_at(&app, &f, "2030-02-01T12:00:00").await;
    let (a, b) = futures::join!(
        set_status(&app, &g, "confirmed", "doctor"),
        set_status(&app, &g, "confirmed", "doctor")
    );
    assert_eq!((a.status.as_u16(), b.status.as_u16()), (200, 200));
    let (a, b) = futures::join!(
        set_status(&app, &g, "in_progress", "doctor"),
        set_status(&app, &g, "cancelled", "patient")
    );
    assert!(!stuck.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(
        (a.status.as_u16(), b.status.as_u16()),
        (200, 200),
        "the anomaly: started and cancelled"
    );
    let from_confirmed = app.scalar("SELECT COUNT(*) FROM {p}appointment_events WHERE appointment_id = ? AND from_status = 'confirmed'", &[g.appointment]).await;
    assert_eq!(from_confirmed, 2);
    app.finish().await;
}

async fn complete(app: &App, f: &Fixture) {
    for status in ["confirmed", "in_progress", "completed"] {
        assert_eq!(set_status(app, f, status, "doctor").await.status, 200);
    }
}

fn prescription(f: &Fixture) -> Value {
    json!({"doctor_id": f.doctor, "medications": ["Amoxicillin 250mg"]})
}

fn rating(f: &Fixture) -> Value {
    json!({"patient_id": f.patient, "score": 5, "comment": "thorough"})
}

/// Seed 001 scenario 3: ten concurrent prescriptions (and ratings) of one completed appointment
/// give one 201 and nine 409s; before completion, 422.
async fn one_prescription_and_one_rating(backend: Backend) {
    let Some(app) = app(
        backend,
        Options::default().hooks(crate::common::widen_at(HookPoint::PrescriptionChecked)),
    )
    .await
    else {
        return;
    };
    let f = fixture(&app).await;
    let path = format!("/appointments/{}/prescription", f.appointment);
    let r = app.post(&path, prescription(&f)).await;
    assert_eq!(
        (r.status.as_u16(), r.body["error"].as_str()),
        (422, Some("wrong_appointment_state"))
    );
    complete(&app, &f).await;
    let wrong = app
        .post(
            &path,
            json!({"doctor_id": f.doctor + 1000, "medications": ["x"]}),
        )
        .await;
    assert_eq!(wrong.status, 403);
    let replies = join_all((0..10).map(|_| app.post(&path, prescription(&f)))).await;
    let counts = statuses(&replies);
    assert_eq!(
        (counts.get(&201), counts.get(&409)),
        (Some(&1), Some(&9)),
        "{counts:?}"
    );
    let rpath = format!("/appointments/{}/rating", f.appointment);
    let replies = join_all((0..10).map(|_| app.post(&rpath, rating(&f)))).await;
    let counts = statuses(&replies);
    assert_eq!(
        (counts.get(&201), counts.get(&409)),
        (Some(&1), Some(&9)),
        "{counts:?}"
    );
    assert_eq!(
        app.scalar(
            "SELECT COUNT(*) FROM {p}prescriptions WHERE appointment_id = ?",
            &[f.appointment]
        )
        .await,
        1
    );
    assert_eq!(
        app.scalar(
            "SELECT COUNT(*) FROM {p}ratings WHERE appointment_id = ?",
            &[f.appointment]
        )
        .await,
        1
    );
    assert_eq!(
        app.post(&rpath, json!({"patient_id": f.patient, "score": 9}))
            .await
            .status,
        400
    );
    app.finish().await;
}

/// Control: without the lock, five doctors' sessions that all checked first all create one.
async fn control_duplicate_prescriptions(backend: Backend) {
    let (hooks, stuck) = barrier_at(HookPoint::PrescriptionChecked, 5);
    let Some(app) = app(backend, Options::default().off().hooks(hooks)).await else {
        return;
    };
    let f = fixture(&app).await;
    complete(&app, &f).await;
    let path = format!("/appointments/{}/prescription", f.appointment);
    let replies = join_all((0..5).map(|_| app.post(&path, prescription(&f)))).await;
    assert!(!stuck.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(statuses(&replies).get(&201), Some(&5));
    assert_eq!(
        app.scalar(
            "SELECT COUNT(*) FROM {p}prescriptions WHERE appointment_id = ?",
            &[f.appointment]
        )
        .await,
        5,
        "the anomaly"
    );
    app.finish().await;
}

/// Control for ratings.
async fn control_duplicate_ratings(backend: Backend) {
    let (hooks, stuck) = barrier_at(HookPoint::RatingChecked, 5);
    let Some(app) = app(backend, Options::default().off().hooks(hooks)).await else {
        return;
    };
    let f = fixture(&app).await;
    complete(&app, &f).await;
    let path = format!("/appointments/{}/rating", f.appointment);
    let replies = join_all((0..5).map(|_| app.post(&path, rating(&f)))).await;
    assert!(!stuck.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(statuses(&replies).get(&201), Some(&5));
    assert_eq!(
        app.scalar(
            "SELECT COUNT(*) FROM {p}ratings WHERE appointment_id = ?",
            &[f.appointment]
        )
        .await,
        5,
        "the anomaly"
    );
    app.finish().await;
}

per_backend!(transitions_by_role: sqlite => Sqlite, postgres => Postgres, mariadb => MariaDb);
per_backend!(concurrent_transitions_one_wins: sqlite => Sqlite, postgres => Postgres, mariadb => MariaDb);
per_backend!(control_transitions_without_locks: sqlite => Sqlite, postgres => Postgres, mariadb => MariaDb);
per_backend!(one_prescription_and_one_rating: sqlite => Sqlite, postgres => Postgres, mariadb => MariaDb);
per_backend!(control_duplicate_prescriptions: sqlite => Sqlite, postgres => Postgres, mariadb => MariaDb);
per_backend!(control_duplicate_ratings: sqlite => Sqlite, postgres => Postgres, mariadb => MariaDb);
