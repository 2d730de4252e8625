//! Seed 000: vocabulary imports serialized per code type (holdfast lock) and concurrent across
//! types; no-wait mode; the control shows interleaved imports leaving duplicates.

use std::sync::atomic::Ordering;
use std::time::Duration;

use clinic::HookPoint;
use futures::future::join_all;
use serde_json::{Value, json};

use crate::common::{App, Backend, Options, Overlap, app, barrier_at, per_backend, statuses};

fn codes(batch: usize, n: usize) -> Value {
    let codes: Vec<Value> = (0..n).map(|i| json!({"code": format!("{batch}-{i}"), "description": format!("code {i} of import {batch}")})).collect();
    json!({ "codes": codes })
}

async fn codes_of(app: &App, code_type: &str) -> Vec<String> {
    let r = app.get(&format!("/vocabulary/{code_type}")).await;
    r.body
        .as_array()
        .expect("codes")
        .iter()
        .map(|c| c["code"].as_str().expect("code").to_owned())
        .collect()
}

/// Four RXNORM imports at once: all succeed (each waits for the lock), never two inside at once,
/// and the table ends up with exactly one import's codes.
async fn same_type_imports_are_serialized(backend: Backend) {
    let overlap = Overlap::default();
    let hooks = overlap.hooks(
        HookPoint::VocabStarted,
        HookPoint::VocabFinished,
        HookPoint::VocabCleared,
    );
    let Some(app) = app(backend, Options::default().holdfast().hooks(hooks)).await else {
        return;
    };
    let replies =
        join_all((0..4).map(|b| app.post("/vocabulary/RXNORM/imports", codes(b, 20)))).await;
    assert_eq!(
        statuses(&replies).get(&201),
        Some(&4),
        "{:?}",
        replies.iter().find(|r| r.status != 201)
    );
    assert_eq!(
        overlap.max.lock().expect("lock").get("RXNORM"),
        Some(&1),
        "one RXNORM import at a time"
    );
    let found = codes_of(&app, "RXNORM").await;
    assert_eq!(found.len(), 20, "exactly one import's codes");
    let batch = found[0].split('-').next().expect("batch").to_owned();
    assert!(
        found.iter().all(|c| c.starts_with(&format!("{batch}-"))),
        "no mixture of imports"
    );
    let mut tokens: Vec<u64> = replies
        .iter()
        .map(|r| r.body["fencing_token"].as_u64().expect("token"))
        .collect();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(
        tokens.len(),
        4,
        "each import had its own grant (fencing token)"
    );
    app.finish().await;
}

/// An RXNORM and a SNOMED import must both be inside their import at the same moment: each waits
/// at a two-party barrier after clearing its codes, which only completes if they overlap.
async fn different_types_run_concurrently(backend: Backend) {
    let (hooks, stuck) = barrier_at(HookPoint::VocabCleared, 2);
    let Some(app) = app(backend, Options::default().holdfast().hooks(hooks)).await else {
        return;
    };
    let (a, b) = futures::join!(
        app.post("/vocabulary/RXNORM/imports", codes(1, 5)),
        app.post("/vocabulary/SNOMED/imports", codes(2, 5))
    );
    assert_eq!(
        (a.status.as_u16(), b.status.as_u16()),
        (201, 201),
        "{:?} {:?}",
        a.body,
        b.body
    );
    assert!(
        !stuck.load(Ordering::SeqCst),
        "the two imports did not overlap: different code types were serialized"
    );
    assert_eq!(codes_of(&app, "RXNORM").await.len(), 5);
    assert_eq!(codes_of(&app, "SNOMED").await.len(), 5);
    app.finish().await;
}

/// No-wait mode while another importer holds the lock: 409 at once, naming the holder; the
/// import runs once the lock is released.
async fn no_wait_fails_fast_naming_the_holder(backend: Backend) {
    let Some(app) = app(backend, Options::default().holdfast()).await else {
        return;
    };
    let client = app.holdfast_client.clone().expect("client");
    let guard = client
        .lock(clinic::vocab::lock_key("ICD10"))
        .holder("importer@host-1")
        .ttl(Duration::from_secs(30))
        .acquire()
        .await
        .expect("lock");
    let mut body = codes(1, 3);
    body["no_wait"] = json!(true);
    let r = app.post("/vocabulary/ICD10/imports", body.clone()).await;
    assert_eq!(
        (r.status.as_u16(), r.body["error"].as_str()),
        (409, Some("import_in_progress")),
        "{:?}",
        r.body
    );
    assert_eq!(r.body["holders"], json!(["importer@host-1"]));
    guard.release().await.expect("release");
    let r = app.post("/vocabulary/ICD10/imports", body).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(codes_of(&app, "ICD10").await.len(), 3);
    let r = app
        .post("/vocabulary/not-a-type/imports", codes(1, 1))
        .await;
    assert_eq!(r.status, 400);
    app.finish().await;
}

/// Control: without the lock, two RXNORM imports both clear the table before either inserts, and
/// the table ends with both imports' codes.
async fn control_interleaved_imports_duplicate(backend: Backend) {
    let (hooks, stuck) = barrier_at(HookPoint::VocabCleared, 2);
    let Some(app) = app(backend, Options::default().off().hooks(hooks)).await else {
        return;
    };
    let (a, b) = futures::join!(
        app.post("/vocabulary/RXNORM/imports", codes(1, 20)),
        app.post("/vocabulary/RXNORM/imports", codes(2, 20))
    );
    assert_eq!((a.status.as_u16(), b.status.as_u16()), (201, 201));
    assert!(!stuck.load(Ordering::SeqCst));
    assert_eq!(
        codes_of(&app, "RXNORM").await.len(),
        40,
        "the anomaly: two imports' codes mixed"
    );
    app.finish().await;
}

per_backend!(same_type_imports_are_serialized: sqlite => Sqlite, postgres => Postgres, mariadb => MariaDb);
per_backend!(different_types_run_concurrently: sqlite => Sqlite, postgres => Postgres, mariadb => MariaDb);
per_backend!(no_wait_fails_fast_naming_the_holder: sqlite => Sqlite, postgres => Postgres, mariadb => MariaDb);
per_backend!(control_interleaved_imports_duplicate: sqlite => Sqlite, postgres => Postgres, mariadb => MariaDb);

/// An administrator force-releases the import lock while an import runs: the import notices
/// the loss (at its next renewal), stops, and answers 503 `busy`; the next import proceeds.
async fn import_stops_when_its_lock_is_lost(backend: Backend) {
    let entered = std::sync::Arc::new(tokio::sync::Notify::new());
    let e = entered.clone();
    let hook: clinic::HookFn = std::sync::Arc::new(move |p, _| {
        let e = e.clone();
        Box::pin(async move {
            if p == HookPoint::VocabCleared {
                e.notify_one();
                // Stay inside the import until the lock loss cancels it (bounded).
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        })
    });
    let Some(app) = app(
        backend,
        Options::default()
            .holdfast()
            .hooks(clinic::Hooks::new(hook)),
    )
    .await
    else {
        return;
    };
    let client = app.holdfast_client.clone().expect("client");
    let import = app.post("/vocabulary/SNOMED/imports", codes(1, 3));
    let admin = async {
        entered.notified().await;
        client
            .force_release_lock(&clinic::vocab::lock_key("SNOMED"), "stuck import")
            .await
            .expect("force release");
    };
    let (r, ()) = futures::join!(import, admin);
    assert_eq!(
        (r.status.as_u16(), r.body["error"].as_str()),
        (503, Some("busy")),
        "{:?}",
        r.body
    );
    app.finish().await;
}

fn named_lock_options() -> Options {
    let mut options = Options::default();
    options.config.import_lock = clinic::ImportLock::Database;
    options
}

/// The same serialization with the database's named locks (PostgreSQL advisory locks, MariaDB
/// `GET_LOCK`) instead of the lock service.
async fn named_lock_serializes_same_type(backend: Backend) {
    let overlap = Overlap::default();
    let hooks = overlap.hooks(
        HookPoint::VocabStarted,
        HookPoint::VocabFinished,
        HookPoint::VocabCleared,
    );
    let Some(app) = app(backend, named_lock_options().hooks(hooks)).await else {
        return;
    };
    let replies =
        join_all((0..4).map(|b| app.post("/vocabulary/RXNORM/imports", codes(b, 20)))).await;
    assert_eq!(
        statuses(&replies).get(&201),
        Some(&4),
        "{:?}",
        replies.iter().find(|r| r.status != 201)
    );
    assert_eq!(
        overlap.max.lock().expect("lock").get("RXNORM"),
        Some(&1),
        "one RXNORM import at a time"
    );
    assert_eq!(codes_of(&app, "RXNORM").await.len(), 20);
    app.finish().await;
}

/// No-wait with the named lock held by another session: 409 at once; then the import runs.
async fn named_lock_no_wait(backend: Backend) {
    let Some(app) = app(backend, named_lock_options()).await else {
        return;
    };
    let name = format!("{}vocab_import/ICD10", app.store.prefix());
    let options = holdfast_sql::advisory::AdvisoryOptions::no_wait();
    let mut body = codes(1, 3);
    body["no_wait"] = json!(true);
    let refused = match &app.store.db {
        clinic::Db::Postgres(pool) => {
            let guard = holdfast_sql::advisory::lock(pool, &name, &options)
                .await
                .expect("lock");
            let r = app.post("/vocabulary/ICD10/imports", body.clone()).await;
            guard.release().await.expect("release");
            r
        }
        clinic::Db::MySql(pool) => {
            let guard = holdfast_sql::advisory::lock(pool, &name, &options)
                .await
                .expect("lock");
            let r = app.post("/vocabulary/ICD10/imports", body.clone()).await;
            guard.release().await.expect("release");
            r
        }
        clinic::Db::Sqlite(_) => unreachable!("named locks are tested on PostgreSQL and MariaDB"),
    };
    assert_eq!(
        (refused.status.as_u16(), refused.body["error"].as_str()),
        (409, Some("import_in_progress")),
        "{:?}",
        refused.body
    );
    let r = app.post("/vocabulary/ICD10/imports", body).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    app.finish().await;
}

per_backend!(named_lock_serializes_same_type: postgres => Postgres, mariadb => MariaDb);
per_backend!(named_lock_no_wait: postgres => Postgres, mariadb => MariaDb);
per_backend!(import_stops_when_its_lock_is_lost: sqlite => Sqlite);
