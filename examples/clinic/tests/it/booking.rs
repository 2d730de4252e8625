//! Seed 001: 50 concurrent bookings of one slot give one 201 and 49 409s.

use clinic::HookPoint;
use futures::future::join_all;
use serde_json::json;

use crate::common::{App, Backend, Options, app, barrier_at, per_backend, statuses, widen_at};

const SLOT: &str = "2030-01-20 10:00:00";

async fn setup(app: &App, patients: usize) -> (i64, Vec<i64>) {
    let doctor = app.create("/doctors", json!({"name": "Dr. Green"})).await;
    let mut ids = Vec::new();
    for i in 0..patients {
        ids.push(
            app.create("/patients", json!({"name": format!("patient {i}")}))
                .await,
        );
    }
    (doctor, ids)
}

async fn book_all(app: &App, doctor: i64, patients: &[i64]) -> Vec<crate::common::Reply> {
    join_all(patients.iter().map(|p| {
        app.post(
            "/appointments",
            json!({"doctor_id": doctor, "patient_id": p, "scheduled_at": SLOT}),
        )
    }))
    .await
}

async fn booked(app: &App, doctor: i64) -> i64 {
    app.scalar("SELECT COUNT(*) FROM {p}appointments WHERE doctor_id = ? AND status NOT IN ('cancelled', 'rejected')", &[doctor]).await
}

/// 50 concurrent requests for one slot: exactly one 201, 49 × 409 `slot_taken`, one row.
async fn fifty_concurrent_bookings_one_wins(backend: Backend) {
    let Some(app) = app(
        backend,
        Options::default().hooks(widen_at(HookPoint::BookingChecked)),
    )
    .await
    else {
        return;
    };
    let (doctor, patients) = setup(&app, 50).await;
    let replies = book_all(&app, doctor, &patients).await;
    let counts = statuses(&replies);
    assert_eq!(
        counts.get(&201),
        Some(&1),
        "{counts:?}: {:?}",
        replies.iter().find(|r| r.status != 201 && r.status != 409)
    );
    assert_eq!(counts.get(&409), Some(&49), "{counts:?}");
    assert!(
        replies
            .iter()
            .filter(|r| r.status == 409)
            .all(|r| r.body["error"] == "slot_taken")
    );
    assert_eq!(booked(&app, doctor).await, 1);
    // Another slot of the same doctor is still bookable; a cancelled booking frees its slot.
    let other = app.post("/appointments", json!({"doctor_id": doctor, "patient_id": patients[0], "scheduled_at": "2030-01-20T11:00:00"})).await;
    assert_eq!(other.status, 201, "{:?}", other.body);
    app.finish().await;
}

/// Control: without the locks, 5 requests that all checked the slot before any wrote all win.
async fn control_without_locks_double_books(backend: Backend) {
    let (hooks, stuck) = barrier_at(HookPoint::BookingChecked, 5);
    let Some(app) = app(backend, Options::default().off().hooks(hooks)).await else {
        return;
    };
    let (doctor, patients) = setup(&app, 5).await;
    let replies = book_all(&app, doctor, &patients).await;
    assert!(!stuck.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(
        statuses(&replies).get(&201),
        Some(&5),
        "{:?}",
        statuses(&replies)
    );
    assert_eq!(
        booked(&app, doctor).await,
        5,
        "the anomaly: five appointments in one slot"
    );
    app.finish().await;
}

/// Unknown doctor or patient: 404; inactive doctor: 409; bad slot: 400.
async fn booking_validation(backend: Backend) {
    let Some(app) = app(backend, Options::default()).await else {
        return;
    };
    let (doctor, patients) = setup(&app, 1).await;
    let inactive = app
        .create("/doctors", json!({"name": "Dr. Away", "active": false}))
        .await;
    let r = app
        .post(
            "/appointments",
            json!({"doctor_id": 999_999, "patient_id": patients[0], "scheduled_at": SLOT}),
        )
        .await;
    assert_eq!(r.status, 404);
    let r = app
        .post(
            "/appointments",
            json!({"doctor_id": doctor, "patient_id": 999_999, "scheduled_at": SLOT}),
        )
        .await;
    assert_eq!(r.status, 404);
    let r = app
        .post(
            "/appointments",
            json!({"doctor_id": inactive, "patient_id": patients[0], "scheduled_at": SLOT}),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.body["error"].as_str()),
        (409, Some("doctor_inactive"))
    );
    let r = app
        .post(
            "/appointments",
            json!({"doctor_id": doctor, "patient_id": patients[0], "scheduled_at": "soon"}),
        )
        .await;
    assert_eq!(r.status, 400);
    app.finish().await;
}

per_backend!(fifty_concurrent_bookings_one_wins: sqlite => Sqlite, postgres => Postgres, mariadb => MariaDb);
per_backend!(control_without_locks_double_books: sqlite => Sqlite, postgres => Postgres, mariadb => MariaDb);
per_backend!(booking_validation: sqlite => Sqlite, postgres => Postgres, mariadb => MariaDb);
