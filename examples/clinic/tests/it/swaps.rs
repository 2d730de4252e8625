//! Seed 003: a schedule swap executed exactly once under concurrent retries (idempotency keys on
//! the holdfast server), rolled back exactly once, with fenced writes.

use clinic::HookPoint;
use futures::future::join_all;
use reqwest::Method;
use serde_json::{Value, json};

use crate::common::{
    App, Backend, Options, Reply, app, barrier_at, per_backend, statuses, widen_at,
};

async fn assignments(app: &App) -> (i64, i64) {
    let a = app
        .create(
            "/assignments",
            json!({"block_date": "2030-07-01", "person": "Alice"}),
        )
        .await;
    let b = app
        .create(
            "/assignments",
            json!({"block_date": "2030-07-08", "person": "Bob"}),
        )
        .await;
    (a, b)
}

async fn swap(app: &App, key: &str, a: i64, b: i64) -> Reply {
    app.send(
        Method::POST,
        "/swaps",
        &[("idempotency-key", key)],
        Some(json!({"source_assignment_id": a, "target_assignment_id": b})),
    )
    .await
}

async fn rollback(app: &App, key: &str, id: i64) -> Reply {
    app.send(
        Method::POST,
        &format!("/swaps/{id}/rollback"),
        &[("idempotency-key", key)],
        None,
    )
    .await
}

async fn person(app: &App, id: i64) -> String {
    app.get(&format!("/assignments/{id}")).await.body["person"]
        .as_str()
        .expect("person")
        .to_owned()
}

async fn events(app: &App, action: &str) -> i64 {
    let sql = format!("SELECT COUNT(*) FROM {{p}}swap_events WHERE action = '{action}'");
    app.scalar(&sql, &[]).await
}

/// Eight concurrent retries of one swap request: it executes once; every reply is the same 201
/// swap, seven of them replays; a later retry replays too; the key with another body is 422.
/// Then eight concurrent retries of its rollback: rolled back once, seven replays; a rollback
/// under a new key is 409.
async fn swap_executes_once_and_rolls_back_once(backend: Backend) {
    let Some(app) = app(
        backend,
        Options::default()
            .holdfast()
            .hooks(widen_at(HookPoint::SwapRead)),
    )
    .await
    else {
        return;
    };
    let (a, b) = assignments(&app).await;
    let replies = join_all((0..8).map(|_| swap(&app, "swap-req-1", a, b))).await;
    assert_eq!(
        statuses(&replies).get(&201),
        Some(&8),
        "{:?}",
        replies.iter().find(|r| r.status != 201)
    );
    let bodies: Vec<&Value> = replies.iter().map(|r| &r.body).collect();
    assert!(
        bodies.iter().all(|b| *b == bodies[0]),
        "every retry got the same answer"
    );
    assert_eq!(replies.iter().filter(|r| r.replayed).count(), 7);
    assert_eq!(events(&app, "execute").await, 1, "executed exactly once");
    assert_eq!(app.scalar("SELECT COUNT(*) FROM {p}swaps", &[]).await, 1);
    assert_eq!(
        (person(&app, a).await, person(&app, b).await),
        ("Bob".to_owned(), "Alice".to_owned())
    );
    let fence = app.get(&format!("/assignments/{a}")).await.body["fence"]
        .as_i64()
        .expect("fence");
    assert!(fence > 0, "the write carried the lock's fencing token");
    let later = swap(&app, "swap-req-1", a, b).await;
    assert!(later.replayed && later.body == replies[0].body);
    let mismatch = swap(&app, "swap-req-1", b, a).await;
    assert_eq!(
        (mismatch.status.as_u16(), mismatch.body["error"].as_str()),
        (422, Some("fingerprint_mismatch"))
    );
    assert_eq!(
        app.send(
            Method::POST,
            "/swaps",
            &[],
            Some(json!({"source_assignment_id": a, "target_assignment_id": b}))
        )
        .await
        .status,
        400
    );

    let id = replies[0].body["id"].as_i64().expect("swap id");
    let replies = join_all((0..8).map(|_| rollback(&app, "rollback-req-1", id))).await;
    assert_eq!(
        statuses(&replies).get(&200),
        Some(&8),
        "{:?}",
        replies.iter().find(|r| r.status != 200)
    );
    assert_eq!(replies.iter().filter(|r| r.replayed).count(), 7);
    assert_eq!(replies[0].body["status"], "rolled_back");
    assert_eq!(
        events(&app, "rollback").await,
        1,
        "rolled back exactly once"
    );
    assert_eq!(
        (person(&app, a).await, person(&app, b).await),
        ("Alice".to_owned(), "Bob".to_owned())
    );
    let again = rollback(&app, "rollback-req-2", id).await;
    assert_eq!(
        (again.status.as_u16(), again.body["error"].as_str()),
        (409, Some("swap_state"))
    );
    assert!(
        app.get(&format!("/assignments/{a}")).await.body["fence"]
            .as_i64()
            .expect("fence")
            > fence,
        "fences only grow"
    );
    app.finish().await;
}

/// Five rollbacks of one swap under five different keys (five different clients): the row lock
/// and status check let exactly one through; the rest are 409.
async fn rollbacks_under_different_keys_once(backend: Backend) {
    let Some(app) = app(backend, Options::default().holdfast()).await else {
        return;
    };
    let (a, b) = assignments(&app).await;
    let id = swap(&app, "s", a, b).await.body["id"].as_i64().expect("id");
    let replies = join_all((0..5).map(|i| {
        let app = &app;
        async move { rollback(app, &format!("client-{i}"), id).await }
    }))
    .await;
    let counts = statuses(&replies);
    assert_eq!(
        (counts.get(&200), counts.get(&409)),
        (Some(&1), Some(&4)),
        "{counts:?}"
    );
    assert_eq!(events(&app, "rollback").await, 1);
    app.finish().await;
}

/// Control: without idempotency and locks, five concurrent retries of one request (all having
/// read the assignments first) execute five times; five rollbacks roll back five times.
async fn control_retries_execute_many_times(backend: Backend) {
    let (hooks, stuck) = barrier_at(HookPoint::SwapRead, 5);
    let Some(app) = app(backend, Options::default().off().hooks(hooks)).await else {
        return;
    };
    let (a, b) = assignments(&app).await;
    let replies = join_all((0..5).map(|_| swap(&app, "swap-req-1", a, b))).await;
    assert!(!stuck.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(statuses(&replies).get(&201), Some(&5));
    assert_eq!(
        events(&app, "execute").await,
        5,
        "the anomaly: executed five times"
    );
    app.finish().await;
}

async fn control_rollbacks_many_times(backend: Backend) {
    let (hooks, stuck) = barrier_at(HookPoint::RollbackRead, 5);
    let Some(app) = app(backend, Options::default().off().hooks(hooks)).await else {
        return;
    };
    let (a, b) = assignments(&app).await;
    let id = swap(&app, "s", a, b).await.body["id"].as_i64().expect("id");
    let replies = join_all((0..5).map(|_| rollback(&app, "rollback-req-1", id))).await;
    assert!(!stuck.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(statuses(&replies).get(&200), Some(&5));
    assert_eq!(
        events(&app, "rollback").await,
        5,
        "the anomaly: rolled back five times"
    );
    app.finish().await;
}

/// Fencing: an assignment last written under a newer grant than ours (here: a fence far in
/// the future) refuses our write with 409 `stale_lock`, and the whole swap is rolled back.
async fn stale_fencing_token_is_refused(backend: Backend) {
    let Some(app) = app(backend, Options::default().holdfast()).await else {
        return;
    };
    let (a, b) = assignments(&app).await;
    app.exec(
        "UPDATE {p}assignments SET fence = ? WHERE id = ?",
        &[i64::MAX / 2, b],
    )
    .await;
    let r = swap(&app, "k1", a, b).await;
    assert_eq!(
        (r.status.as_u16(), r.body["error"].as_str()),
        (409, Some("stale_lock")),
        "{:?}",
        r.body
    );
    assert_eq!(
        (person(&app, a).await, person(&app, b).await),
        ("Alice".to_owned(), "Bob".to_owned()),
        "nothing written"
    );
    assert_eq!(app.scalar("SELECT COUNT(*) FROM {p}swaps", &[]).await, 0);
    // The failed execution was aborted, not stored: once the row is writable, a retry runs it.
    app.exec("UPDATE {p}assignments SET fence = 0 WHERE id = ?", &[b])
        .await;
    let r = swap(&app, "k1", a, b).await;
    assert_eq!(
        (r.status.as_u16(), r.replayed),
        (201, false),
        "{:?}",
        r.body
    );
    app.finish().await;
}

per_backend!(stale_fencing_token_is_refused: sqlite => Sqlite, postgres => Postgres, mariadb => MariaDb);
per_backend!(swap_executes_once_and_rolls_back_once: sqlite => Sqlite, postgres => Postgres, mariadb => MariaDb);
per_backend!(rollbacks_under_different_keys_once: sqlite => Sqlite, postgres => Postgres, mariadb => MariaDb);
per_backend!(control_retries_execute_many_times: sqlite => Sqlite, postgres => Postgres, mariadb => MariaDb);
per_backend!(control_rollbacks_many_times: sqlite => Sqlite, postgres => Postgres, mariadb => MariaDb);
