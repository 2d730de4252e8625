//! Seed 004: FIFO stock consumption. A receipt adds a layer (quantity, unit cost); a sale
//! consumes the oldest layers first.
//!
//! A sale locks the product's open layers with holdfast-sql's row locks — ascending id, which is
//! FIFO order, so two sales always lock in the same order — with `NOWAIT` (the seed's
//! `lock_strategy = nowait`) or waiting; a refused lock is a conflict that the transaction
//! retries with backoff and jitter. Under the locks it re-reads the layers (a locking read, so
//! InnoDB reads the latest rows, not its snapshot), refuses the sale with 409 `shortage` if they
//! hold too little, and otherwise decrements them: no layer can go below zero.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use futures::future::BoxFuture;
use holdfast_sql::rows::{RowLock, RowLockWait};
use serde::{Deserialize, Serialize};
use sqlx::{MySqlConnection, PgConnection, SqliteConnection};

use crate::appointments::checked_text;
use crate::db::RowLocking as _;
use crate::error::AppError;
use crate::{Ctx, HookPoint, SharedState, on_db, run_steps};

/// `POST /products` body.
#[derive(Clone, Debug, Deserialize)]
pub struct NewProduct {
    /// Stock keeping unit.
    pub sku: String,
    /// Name.
    pub name: String,
}

/// A product.
#[derive(Clone, Debug, Serialize)]
pub struct Product {
    /// Id.
    pub id: i64,
    /// SKU.
    pub sku: String,
    /// Name.
    pub name: String,
}

/// `POST /products/{id}/receipts` body.
#[derive(Clone, Debug, Deserialize)]
pub struct Receipt {
    /// Units received (> 0).
    pub qty: i64,
    /// Cost per unit, in cents (≥ 0).
    pub unit_cost: i64,
}

/// A FIFO layer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Layer {
    /// Id (FIFO order).
    pub id: i64,
    /// Units received.
    pub qty: i64,
    /// Units left.
    pub remaining: i64,
    /// Cost per unit, in cents.
    pub unit_cost: i64,
}

/// `POST /products/{id}/sales` body.
#[derive(Clone, Debug, Deserialize)]
pub struct SaleRequest {
    /// Units sold (> 0).
    pub qty: i64,
}

/// One layer's part of a sale.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SaleLine {
    /// The layer.
    pub layer_id: i64,
    /// Units taken from it.
    pub qty: i64,
    /// Its unit cost.
    pub unit_cost: i64,
}

/// A sale.
#[derive(Clone, Debug, Serialize)]
pub struct Sale {
    /// Id.
    pub id: i64,
    /// The product.
    pub product_id: i64,
    /// Units.
    pub qty: i64,
    /// FIFO cost of the units, in cents.
    pub total_cost: i64,
    /// Layers consumed, oldest first.
    pub lines: Vec<SaleLine>,
}

/// Take `qty` units from `layers` (oldest first); `None` if they hold less.
#[must_use]
pub fn plan_fifo(layers: &[(i64, i64, i64)], qty: i64) -> Option<Vec<SaleLine>> {
    let mut left = qty;
    let mut lines = Vec::new();
    for &(layer_id, remaining, unit_cost) in layers {
        if left == 0 {
            break;
        }
        let take = remaining.min(left);
        if take > 0 {
            lines.push(SaleLine {
                layer_id,
                qty: take,
                unit_cost,
            });
            left -= take;
        }
    }
    (left == 0).then_some(lines)
}

/// The steps of a sale, for every database's connection type.
pub(crate) trait Steps {
    fn sell<'a>(
        &'a mut self,
        ctx: &'a Ctx,
        req: &'a (i64, i64, bool),
    ) -> BoxFuture<'a, Result<Sale, AppError>>;
}

macro_rules! impl_steps {
    ($($conn:ty),*) => {$(
        impl Steps for $conn {
            fn sell<'a>(&'a mut self, ctx: &'a Ctx, req: &'a (i64, i64, bool)) -> BoxFuture<'a, Result<Sale, AppError>> {
                Box::pin(async move {
                    let (product_id, qty, nowait) = *req;
                    let s = &ctx.store;
                    let product: Option<(i64,)> = sqlx::query_as(s.sql("SELECT id FROM {p}products WHERE id = ?"))
                        .bind(product_id)
                        .fetch_optional(&mut *self)
                        .await?;
                    if product.is_none() {
                        return Err(AppError::NotFound { what: "product", id: product_id });
                    }
                    let layers: Vec<(i64, i64, i64)> = if ctx.lock {
                        let candidates: Vec<(i64,)> = sqlx::query_as(s.sql(
                            "SELECT id FROM {p}layers WHERE product_id = ? AND remaining > 0 ORDER BY id",
                        ))
                        .bind(product_id)
                        .fetch_all(&mut *self)
                        .await?;
                        let Some(&(last,)) = candidates.last() else {
                            return Err(AppError::Shortage { requested: qty, available: 0 });
                        };
                        let wait = if nowait { RowLockWait::NoWait } else { RowLockWait::Wait };
                        let spec = RowLock::new(&s.table("layers"), "id").wait(wait);
                        self.lock_rows(&spec, candidates.iter().map(|c| c.0).collect()).await?;
                        // Every open layer up to `last` is now ours; newer layers are left alone.
                        sqlx::query_as(s.sql(
                            "SELECT id, remaining, unit_cost FROM {p}layers \
                             WHERE product_id = ? AND remaining > 0 AND id <= ? ORDER BY id{for_update}",
                        ))
                        .bind(product_id)
                        .bind(last)
                        .fetch_all(&mut *self)
                        .await?
                    } else {
                        sqlx::query_as(s.sql(
                            "SELECT id, remaining, unit_cost FROM {p}layers WHERE product_id = ? AND remaining > 0 ORDER BY id",
                        ))
                        .bind(product_id)
                        .fetch_all(&mut *self)
                        .await?
                    };
                    ctx.hooks.at(HookPoint::StockRead, product_id).await;
                    let Some(lines) = plan_fifo(&layers, qty) else {
                        let available = layers.iter().map(|l| l.1).sum();
                        return Err(AppError::Shortage { requested: qty, available });
                    };
                    let total_cost = lines.iter().map(|l| l.qty * l.unit_cost).sum();
                    let (sale_id,): (i64,) = sqlx::query_as(s.sql(
                        "INSERT INTO {p}sales (product_id, qty, total_cost) VALUES (?, ?, ?) RETURNING id",
                    ))
                    .bind(product_id)
                    .bind(qty)
                    .bind(total_cost)
                    .fetch_one(&mut *self)
                    .await?;
                    for line in &lines {
                        sqlx::query(s.sql("UPDATE {p}layers SET remaining = remaining - ? WHERE id = ?"))
                            .bind(line.qty)
                            .bind(line.layer_id)
                            .execute(&mut *self)
                            .await?;
                        sqlx::query(s.sql("INSERT INTO {p}sale_lines (sale_id, layer_id, qty, unit_cost) VALUES (?, ?, ?, ?)"))
                            .bind(sale_id)
                            .bind(line.layer_id)
                            .bind(line.qty)
                            .bind(line.unit_cost)
                            .execute(&mut *self)
                            .await?;
                    }
                    Ok(Sale { id: sale_id, product_id, qty, total_cost, lines })
                })
            }
        }
    )*};
}

impl_steps!(SqliteConnection, PgConnection, MySqlConnection);

/// `POST /products` → 201 product.
///
/// # Errors
/// 400 on empty fields.
pub async fn create_product(
    State(state): State<SharedState>,
    Json(req): Json<NewProduct>,
) -> Result<(StatusCode, Json<Product>), AppError> {
    let sku = checked_text("sku", &req.sku, 64)?;
    let name = checked_text("name", &req.name, 255)?;
    let s = &state.store;
    let sql = s.sql("INSERT INTO {p}products (sku, name) VALUES (?, ?) RETURNING id");
    let (id,): (i64,) =
        on_db!(&s.db, pool => sqlx::query_as(sql).bind(&sku).bind(&name).fetch_one(pool).await)?;
    Ok((StatusCode::CREATED, Json(Product { id, sku, name })))
}

/// `POST /products/{id}/receipts` → 201 the new layer.
///
/// # Errors
/// 400, 404.
pub async fn receive(
    State(state): State<SharedState>,
    Path(product_id): Path<i64>,
    Json(req): Json<Receipt>,
) -> Result<(StatusCode, Json<Layer>), AppError> {
    if req.qty <= 0 || req.unit_cost < 0 {
        return Err(AppError::Invalid {
            field: "qty",
            message: "qty > 0 and unit_cost >= 0".to_owned(),
        });
    }
    let s = &state.store;
    let exists = s.sql("SELECT id FROM {p}products WHERE id = ?");
    let product: Option<(i64,)> =
        on_db!(&s.db, pool => sqlx::query_as(exists).bind(product_id).fetch_optional(pool).await)?;
    if product.is_none() {
        return Err(AppError::NotFound {
            what: "product",
            id: product_id,
        });
    }
    let sql = s.sql("INSERT INTO {p}layers (product_id, qty, remaining, unit_cost) VALUES (?, ?, ?, ?) RETURNING id");
    let (id,): (i64,) = on_db!(&s.db, pool => sqlx::query_as(sql).bind(product_id).bind(req.qty).bind(req.qty).bind(req.unit_cost).fetch_one(pool).await)?;
    Ok((
        StatusCode::CREATED,
        Json(Layer {
            id,
            qty: req.qty,
            remaining: req.qty,
            unit_cost: req.unit_cost,
        }),
    ))
}

/// `POST /products/{id}/sales` → 201 sale; 409 `shortage`; 503 `busy` if the layers stayed
/// locked through every retry.
///
/// # Errors
/// As listed.
pub async fn sell(
    State(state): State<SharedState>,
    Path(product_id): Path<i64>,
    Json(req): Json<SaleRequest>,
) -> Result<(StatusCode, Json<Sale>), AppError> {
    if req.qty <= 0 {
        return Err(AppError::Invalid {
            field: "qty",
            message: "qty > 0".to_owned(),
        });
    }
    let sale = run_steps!(
        &state,
        sell,
        (product_id, req.qty, state.config.stock_nowait)
    )?;
    Ok((StatusCode::CREATED, Json(sale)))
}

/// `GET /products/{id}/layers` → the layers, oldest first.
///
/// # Errors
/// A database error.
pub async fn layers(
    State(state): State<SharedState>,
    Path(product_id): Path<i64>,
) -> Result<Json<Vec<Layer>>, AppError> {
    let s = &state.store;
    let sql = s.sql(
        "SELECT id, qty, remaining, unit_cost FROM {p}layers WHERE product_id = ? ORDER BY id",
    );
    let rows: Vec<(i64, i64, i64, i64)> =
        on_db!(&s.db, pool => sqlx::query_as(sql).bind(product_id).fetch_all(pool).await)?;
    Ok(Json(
        rows.into_iter()
            .map(|(id, qty, remaining, unit_cost)| Layer {
                id,
                qty,
                remaining,
                unit_cost,
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_plan_takes_oldest_first() {
        let layers = [(1, 50, 10), (2, 100, 20), (3, 100, 30)];
        let lines = plan_fifo(&layers, 120).unwrap();
        assert_eq!(
            lines,
            vec![
                SaleLine {
                    layer_id: 1,
                    qty: 50,
                    unit_cost: 10
                },
                SaleLine {
                    layer_id: 2,
                    qty: 70,
                    unit_cost: 20
                }
            ]
        );
        assert!(plan_fifo(&layers, 251).is_none());
        assert_eq!(plan_fifo(&layers, 250).unwrap().len(), 3);
    }
}
