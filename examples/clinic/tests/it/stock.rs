//! Seed 004: 5 concurrent sales of 100 against 300 units: 3 succeed, 2 are short, no layer
//! goes negative.

use clinic::HookPoint;
use futures::future::join_all;
use serde_json::json;

use crate::common::{
    App, Backend, Options, app, barrier_at, per_backend, statuses, test_config, widen_at,
};

async fn setup(app: &App) -> i64 {
    let product = app
        .create(
            "/products",
            json!({"sku": "AMOX-250", "name": "Amoxicillin 250mg"}),
        )
        .await;
    for cost in [10, 20, 30] {
        app.create(
            &format!("/products/{product}/receipts"),
            json!({"qty": 100, "unit_cost": cost}),
        )
        .await;
    }
    product
}

async fn remaining(app: &App, product: i64) -> Vec<i64> {
    let r = app.get(&format!("/products/{product}/layers")).await;
    r.body
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["remaining"].as_i64().expect("remaining"))
        .collect()
}

async fn five_sales(app: &App, product: i64) -> Vec<crate::common::Reply> {
    let path = format!("/products/{product}/sales");
    join_all((0..5).map(|_| app.post(&path, json!({"qty": 100})))).await
}

async fn check_protected(app: &App, product: i64) {
    let replies = five_sales(app, product).await;
    let counts = statuses(&replies);
    assert_eq!(
        counts.get(&201),
        Some(&3),
        "{counts:?} {:?}",
        replies.iter().find(|r| r.status != 201 && r.status != 409)
    );
    assert_eq!(counts.get(&409), Some(&2), "{counts:?}");
    assert!(
        replies
            .iter()
            .filter(|r| r.status == 409)
            .all(|r| r.body["error"] == "shortage")
    );
    assert_eq!(
        remaining(app, product).await,
        vec![0, 0, 0],
        "every layer consumed exactly, none negative"
    );
    let mut costs: Vec<i64> = replies
        .iter()
        .filter(|r| r.status == 201)
        .map(|r| r.body["total_cost"].as_i64().expect("cost"))
        .collect();
    costs.sort_unstable();
    assert_eq!(
        costs,
        vec![1000, 2000, 3000],
        "each sale consumed one whole layer, oldest first"
    );
    assert_eq!(
        app.scalar("SELECT COUNT(*) FROM {p}sale_lines WHERE qty > 0", &[])
            .await,
        3
    );
}

/// NOWAIT + retried transaction (the seed's default strategy).
async fn five_concurrent_sales_nowait(backend: Backend) {
    let Some(app) = app(
        backend,
        Options::default().hooks(widen_at(HookPoint::StockRead)),
    )
    .await
    else {
        return;
    };
    let product = setup(&app).await;
    check_protected(&app, product).await;
    let stats = app.get("/stats").await.body;
    let tx = &stats["transactions"];
    assert_eq!(
        (tx["transactions"].as_u64(), tx["committed"].as_u64()),
        (Some(5), Some(3)),
        "five sales, three committed: {stats}"
    );
    let conflicts: u64 = [
        "deadlocks",
        "serialization_failures",
        "lock_timeouts",
        "lock_not_available",
        "busy",
    ]
    .iter()
    .filter_map(|k| tx[k].as_u64())
    .sum();
    assert_eq!(
        tx["retries"].as_u64(),
        Some(conflicts),
        "every retry was a lock conflict, retried by the transaction: {stats}"
    );
    app.finish().await;
}

/// The seed's `lock_strategy = wait`.
async fn five_concurrent_sales_wait(backend: Backend) {
    let mut options = Options::default().hooks(widen_at(HookPoint::StockRead));
    options.config.stock_nowait = false;
    let Some(app) = app(backend, options).await else {
        return;
    };
    let product = setup(&app).await;
    check_protected(&app, product).await;
    app.finish().await;
}

/// Control: without the locks, all five read the same layers and all five "succeed"; the first
/// layer goes to -400.
async fn control_without_locks_goes_negative(backend: Backend) {
    let (hooks, stuck) = barrier_at(HookPoint::StockRead, 5);
    let Some(app) = app(backend, Options::default().off().hooks(hooks)).await else {
        return;
    };
    let product = setup(&app).await;
    let replies = five_sales(&app, product).await;
    assert!(!stuck.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(
        statuses(&replies).get(&201),
        Some(&5),
        "{:?}",
        statuses(&replies)
    );
    assert_eq!(
        remaining(&app, product).await,
        vec![-400, 100, 100],
        "the anomaly: a negative layer"
    );
    app.finish().await;
}

/// A layer locked by another transaction makes a no-retry sale fail at once with 503 `busy`
/// (NOWAIT refusal, a typed error), and the sale succeeds once the lock is gone.
async fn nowait_refusal_is_busy(backend: Backend) {
    let mut config = test_config();
    config.tx_retry = holdfast_sql::retry::RetryPolicy::no_wait();
    let Some(app) = app(
        backend,
        Options {
            config,
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    let product = setup(&app).await;
    let lock_sql = app
        .store
        .sql("SELECT id FROM {p}layers WHERE product_id = ? ORDER BY id LIMIT 1 FOR UPDATE");
    let begin = app.store.sql("BEGIN");
    let rollback = app.store.sql("ROLLBACK");
    clinic::on_db!(&app.store.db, pool => {
        let mut conn = pool.acquire().await.expect("conn");
        sqlx::query(begin).execute(&mut *conn).await.expect("begin");
        sqlx::query(lock_sql).bind(product).fetch_one(&mut *conn).await.expect("lock");
        let r = app.post(&format!("/products/{product}/sales"), json!({"qty": 10})).await;
        assert_eq!((r.status.as_u16(), r.body["error"].as_str()), (503, Some("busy")), "{:?}", r.body);
        sqlx::query(rollback).execute(&mut *conn).await.expect("rollback");
    });
    let r = app
        .post(&format!("/products/{product}/sales"), json!({"qty": 10}))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    app.finish().await;
}

per_backend!(five_concurrent_sales_nowait: sqlite => Sqlite, postgres => Postgres, mariadb => MariaDb);
per_backend!(five_concurrent_sales_wait: postgres => Postgres, mariadb => MariaDb);
per_backend!(control_without_locks_goes_negative: sqlite => Sqlite, postgres => Postgres, mariadb => MariaDb);
per_backend!(nowait_refusal_is_busy: postgres => Postgres, mariadb => MariaDb);
