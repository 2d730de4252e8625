//! Seed 003: residency schedule swaps, executed exactly once under concurrent retries and rolled
//! back exactly once.
//!
//! The seed ran several servers with a Redis lock (TTL, owner token, extend) and idempotency keys
//! in Redis. Here:
//! - `POST /swaps` and `POST /swaps/{id}/rollback` require an `Idempotency-Key` header. The
//!   holdfast server's idempotency records make the first request with a key execute and every
//!   retry with that key — concurrent or later, on any clinic instance — wait for it and get its
//!   stored answer replayed (`Idempotent-Replayed: true`). A key reused for a different request
//!   is 422 `fingerprint_mismatch`. A failed execution is aborted, so a retry runs it again.
//! - The execution holds one holdfast lease on both assignments' keys
//!   (`clinic/assignment/{id}`, acquired atomically: no deadlock between opposite swaps), renewed
//!   while it runs, and writes each assignment only if the row's `fence` is older than its lock's
//!   fencing token: a stale holder whose lease expired cannot overwrite its successor's write.
//! - In the database it locks the rows (swap record first, then assignments, ascending) in a
//!   retried transaction, and a rollback checks under that lock that the swap is still
//!   `executed`: two rollbacks with different keys roll back once, the other gets 409.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header as http_header};
use axum::response::Response;
use futures::future::BoxFuture;
use holdfast_client::api::IdempotencyResultBody;
use holdfast_sql::rows::RowLock;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{MySqlConnection, PgConnection, SqliteConnection};

use crate::appointments::checked_text;
use crate::db::RowLocking as _;
use crate::error::AppError;
use crate::{Ctx, HookPoint, Locking, SharedState, header, on_db, run_steps};

/// The idempotency header.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Longest idempotency key accepted.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 200;

/// `POST /assignments` body.
#[derive(Clone, Debug, Deserialize)]
pub struct NewAssignment {
    /// The block (`2030-07-01`).
    pub block_date: String,
    /// The resident assigned.
    pub person: String,
}

/// A schedule assignment.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Assignment {
    /// Id.
    pub id: i64,
    /// The block.
    pub block_date: String,
    /// The resident.
    pub person: String,
    /// Fencing token of the last locked write (0: none).
    pub fence: i64,
}

/// `POST /swaps` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SwapRequest {
    /// One assignment.
    pub source_assignment_id: i64,
    /// The other.
    pub target_assignment_id: i64,
}

/// A swap.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Swap {
    /// Id.
    pub id: i64,
    /// One assignment.
    pub source_assignment_id: i64,
    /// The other.
    pub target_assignment_id: i64,
    /// The source's resident before the swap.
    pub source_person: String,
    /// The target's resident before the swap.
    pub target_person: String,
    /// `executed` or `rolled_back`.
    pub status: String,
}

type SwapRow = (i64, i64, i64, String, String, String);

impl From<SwapRow> for Swap {
    fn from(r: SwapRow) -> Self {
        Self {
            id: r.0,
            source_assignment_id: r.1,
            target_assignment_id: r.2,
            source_person: r.3,
            target_person: r.4,
            status: r.5,
        }
    }
}

/// Input of the database steps: the ids and the fencing tokens of the assignments' locks.
#[derive(Clone, Debug)]
pub(crate) struct Fenced {
    id: i64,
    source: (i64, i64),
    target: (i64, i64),
}

/// The database steps of a swap and of its rollback, for every database's connection type.
pub(crate) trait Steps {
    fn execute_swap<'a>(
        &'a mut self,
        ctx: &'a Ctx,
        req: &'a Fenced,
    ) -> BoxFuture<'a, Result<Swap, AppError>>;
    fn rollback_swap<'a>(
        &'a mut self,
        ctx: &'a Ctx,
        req: &'a Fenced,
    ) -> BoxFuture<'a, Result<Swap, AppError>>;
}

macro_rules! impl_steps {
    ($($conn:ty),*) => {$(
        impl Steps for $conn {
            fn execute_swap<'a>(&'a mut self, ctx: &'a Ctx, req: &'a Fenced) -> BoxFuture<'a, Result<Swap, AppError>> {
                Box::pin(async move {
                    let s = &ctx.store;
                    let (a, b) = (req.source.0, req.target.0);
                    if ctx.lock {
                        self.lock_rows(&RowLock::new(&s.table("assignments"), "id"), vec![a, b]).await?;
                    }
                    let mut persons = Vec::with_capacity(2);
                    for id in [a, b] {
                        let row: Option<(String,)> = sqlx::query_as(s.sql("SELECT person FROM {p}assignments WHERE id = ?"))
                            .bind(id)
                            .fetch_optional(&mut *self)
                            .await?;
                        persons.push(row.ok_or(AppError::NotFound { what: "assignment", id })?.0);
                    }
                    ctx.hooks.at(HookPoint::SwapRead, format!("{a}-{b}")).await;
                    for ((id, token), person) in [(req.source, &persons[1]), (req.target, &persons[0])] {
                        write_assignment(&mut *self, ctx, id, token, person).await?;
                    }
                    let (swap_id,): (i64,) = sqlx::query_as(s.sql(
                        "INSERT INTO {p}swaps (source_id, target_id, source_person, target_person, status) \
                         VALUES (?, ?, ?, ?, 'executed') RETURNING id",
                    ))
                    .bind(a)
                    .bind(b)
                    .bind(&persons[0])
                    .bind(&persons[1])
                    .fetch_one(&mut *self)
                    .await?;
                    sqlx::query(s.sql("INSERT INTO {p}swap_events (swap_id, action) VALUES (?, 'execute')"))
                        .bind(swap_id)
                        .execute(&mut *self)
                        .await?;
                    Ok(Swap {
                        id: swap_id,
                        source_assignment_id: a,
                        target_assignment_id: b,
                        source_person: persons[0].clone(),
                        target_person: persons[1].clone(),
                        status: "executed".to_owned(),
                    })
                })
            }

            fn rollback_swap<'a>(&'a mut self, ctx: &'a Ctx, req: &'a Fenced) -> BoxFuture<'a, Result<Swap, AppError>> {
                Box::pin(async move {
                    let s = &ctx.store;
                    if ctx.lock {
                        self.lock_rows(&RowLock::new(&s.table("swaps"), "id"), vec![req.id]).await?;
                        self.lock_rows(&RowLock::new(&s.table("assignments"), "id"), vec![req.source.0, req.target.0]).await?;
                    }
                    let row: Option<SwapRow> = sqlx::query_as(s.sql(
                        "SELECT id, source_id, target_id, source_person, target_person, status FROM {p}swaps WHERE id = ?",
                    ))
                    .bind(req.id)
                    .fetch_optional(&mut *self)
                    .await?;
                    let mut swap = Swap::from(row.ok_or(AppError::NotFound { what: "swap", id: req.id })?);
                    ctx.hooks.at(HookPoint::RollbackRead, req.id).await;
                    if swap.status != "executed" {
                        return Err(AppError::SwapState { swap_id: swap.id, status: swap.status });
                    }
                    write_assignment(&mut *self, ctx, req.source.0, req.source.1, &swap.source_person).await?;
                    write_assignment(&mut *self, ctx, req.target.0, req.target.1, &swap.target_person).await?;
                    sqlx::query(s.sql("UPDATE {p}swaps SET status = 'rolled_back' WHERE id = ?"))
                        .bind(swap.id)
                        .execute(&mut *self)
                        .await?;
                    sqlx::query(s.sql("INSERT INTO {p}swap_events (swap_id, action) VALUES (?, 'rollback')"))
                        .bind(swap.id)
                        .execute(&mut *self)
                        .await?;
                    swap.status = "rolled_back".to_owned();
                    Ok(swap)
                })
            }
        }

        impl WriteAssignment for $conn {
            fn write<'a>(&'a mut self, ctx: &'a Ctx, id: i64, token: i64, person: &'a str) -> BoxFuture<'a, Result<(), AppError>> {
                Box::pin(async move {
                    let s = &ctx.store;
                    if !ctx.lock {
                        sqlx::query(s.sql("UPDATE {p}assignments SET person = ? WHERE id = ?"))
                            .bind(person)
                            .bind(id)
                            .execute(&mut *self)
                            .await?;
                        return Ok(());
                    }
                    // Fenced write: only a holder with a newer token than the last writer's.
                    let done = sqlx::query(s.sql("UPDATE {p}assignments SET person = ?, fence = ? WHERE id = ? AND fence < ?"))
                        .bind(person)
                        .bind(token)
                        .bind(id)
                        .bind(token)
                        .execute(&mut *self)
                        .await?
                        .rows_affected();
                    if done == 0 {
                        return Err(AppError::StaleFence(format!("assignment {id} was written under a newer lock than token {token}")));
                    }
                    Ok(())
                })
            }
        }
    )*};
}

trait WriteAssignment {
    fn write<'a>(
        &'a mut self,
        ctx: &'a Ctx,
        id: i64,
        token: i64,
        person: &'a str,
    ) -> BoxFuture<'a, Result<(), AppError>>;
}

async fn write_assignment<C: WriteAssignment + ?Sized>(
    conn: &mut C,
    ctx: &Ctx,
    id: i64,
    token: i64,
    person: &str,
) -> Result<(), AppError> {
    conn.write(ctx, id, token, person).await
}

impl_steps!(SqliteConnection, PgConnection, MySqlConnection);

/// The lock key of an assignment.
#[must_use]
pub fn assignment_key(id: i64) -> String {
    format!("clinic/assignment/{id}")
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, AppError> {
    let key = header(headers, IDEMPOTENCY_KEY_HEADER)
        .ok_or(AppError::MissingHeader("Idempotency-Key"))?;
    if key.len() > IDEMPOTENCY_KEY_BYTES_MAX || key.chars().any(char::is_control) {
        return Err(AppError::Invalid {
            field: "Idempotency-Key",
            message: format!("1..={IDEMPOTENCY_KEY_BYTES_MAX} bytes, no control characters"),
        });
    }
    Ok(key.to_owned())
}

fn fingerprint(parts: &str) -> String {
    hex::encode(Sha256::digest(parts.as_bytes()))
}

fn to_i64(token: u64) -> i64 {
    i64::try_from(token).unwrap_or(i64::MAX)
}

/// Run `op` under both assignments' holdfast locks (one lease, acquired atomically), giving it
/// their fencing tokens.
async fn with_assignment_locks(
    state: &SharedState,
    id: i64,
    source: i64,
    target: i64,
    op: StepsFn,
) -> Result<Swap, AppError> {
    let client = state.lock_service()?;
    let (ka, kb) = (assignment_key(source), assignment_key(target));
    let guard = client
        .lock(ka.clone())
        .also(kb.clone())
        .holder(state.config.instance.clone())
        .ttl(state.config.lock_ttl)
        .wait(state.config.swap_lock_wait)
        .reason("schedule swap")
        .acquire()
        .await?;
    let token_of = |key: &str| {
        guard
            .fencing_tokens()
            .iter()
            .find(|(k, _)| k == key)
            .map_or(guard.fencing_token(), |(_, t)| *t)
    };
    let fenced = Fenced {
        id,
        source: (source, to_i64(token_of(&ka))),
        target: (target, to_i64(token_of(&kb))),
    };
    let lost = guard.lost();
    let outcome = tokio::select! {
        r = run_fenced(state, op, fenced) => r,
        reason = lost => Err(AppError::Busy(format!("assignment locks lost: {reason}"))),
    };
    if let Err(e) = guard.release().await {
        tracing::warn!(error = %e, "releasing the assignment locks failed; they expire after their TTL");
    }
    outcome
}

#[derive(Clone, Copy, Debug)]
enum StepsFn {
    Execute,
    Rollback,
}

async fn run_fenced(state: &SharedState, op: StepsFn, fenced: Fenced) -> Result<Swap, AppError> {
    match op {
        StepsFn::Execute => run_steps!(state, execute_swap, fenced),
        StepsFn::Rollback => run_steps!(state, rollback_swap, fenced),
    }
}

/// Run `op` once per idempotency key and answer with its (possibly replayed) result.
async fn once<F, Fut>(
    state: &SharedState,
    key: String,
    fingerprint: String,
    success: StatusCode,
    op: F,
) -> Result<Response, AppError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Swap, AppError>>,
{
    let client = state.lock_service()?;
    let outcome = client
        .idempotency(key, fingerprint)
        .holder(state.config.instance.clone())
        .wait(state.config.idempotency_wait)
        .ttl(state.config.lock_ttl)
        .run(|| async move {
            let swap = op().await?;
            let body = serde_json::to_string(&swap).map_err(|e| AppError::Invalid {
                field: "swap",
                message: e.to_string(),
            })?;
            Ok::<_, AppError>(IdempotencyResultBody {
                status: success.as_u16(),
                headers: Vec::new(),
                body,
            })
        })
        .await?;
    let status = StatusCode::from_u16(outcome.result.status).unwrap_or(success);
    let mut builder = Response::builder()
        .status(status)
        .header(http_header::CONTENT_TYPE, "application/json");
    if outcome.replayed {
        builder = builder.header("idempotent-replayed", "true");
    }
    builder
        .body(Body::from(outcome.result.body))
        .map_err(|e| AppError::Invalid {
            field: "response",
            message: e.to_string(),
        })
}

fn json_response(status: StatusCode, swap: &Swap) -> Response {
    let mut response = Response::new(Body::from(serde_json::to_string(swap).unwrap_or_default()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http_header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    response
}

/// `POST /swaps` (header `Idempotency-Key`) → 201 swap, executed once per key; replays carry
/// `Idempotent-Replayed: true`; 422 `fingerprint_mismatch`; 409 `in_progress`.
///
/// # Errors
/// As listed; 404; 503 when the lock service is not reachable.
pub async fn execute(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Json(req): Json<SwapRequest>,
) -> Result<Response, AppError> {
    let (source, target) = (req.source_assignment_id, req.target_assignment_id);
    if source == target {
        return Err(AppError::Invalid {
            field: "target_assignment_id",
            message: "must differ from source_assignment_id".to_owned(),
        });
    }
    if state.locking == Locking::Off {
        let swap = run_fenced(
            &state,
            StepsFn::Execute,
            Fenced {
                id: 0,
                source: (source, 0),
                target: (target, 0),
            },
        )
        .await?;
        return Ok(json_response(StatusCode::CREATED, &swap));
    }
    let key = idempotency_key(&headers)?;
    let fp = fingerprint(&format!("execute:{source}:{target}"));
    once(
        &state,
        format!("clinic/swaps/execute/{key}"),
        fp,
        StatusCode::CREATED,
        || with_assignment_locks(&state, 0, source, target, StepsFn::Execute),
    )
    .await
}

/// `POST /swaps/{id}/rollback` (header `Idempotency-Key`) → 200 swap, rolled back once; 409
/// `swap_state` if it already was (under another key).
///
/// # Errors
/// As listed; 404.
pub async fn rollback(
    State(state): State<SharedState>,
    Path(id): Path<i64>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let swap = read_swap(&state, id).await?;
    let (source, target) = (swap.source_assignment_id, swap.target_assignment_id);
    if state.locking == Locking::Off {
        let swap = run_fenced(
            &state,
            StepsFn::Rollback,
            Fenced {
                id,
                source: (source, 0),
                target: (target, 0),
            },
        )
        .await?;
        return Ok(json_response(StatusCode::OK, &swap));
    }
    let key = idempotency_key(&headers)?;
    let fp = fingerprint(&format!("rollback:{id}"));
    once(
        &state,
        format!("clinic/swaps/rollback/{key}"),
        fp,
        StatusCode::OK,
        || with_assignment_locks(&state, id, source, target, StepsFn::Rollback),
    )
    .await
}

async fn read_swap(state: &SharedState, id: i64) -> Result<Swap, AppError> {
    let s = &state.store;
    let sql = s.sql("SELECT id, source_id, target_id, source_person, target_person, status FROM {p}swaps WHERE id = ?");
    let row: Option<SwapRow> =
        on_db!(&s.db, pool => sqlx::query_as(sql).bind(id).fetch_optional(pool).await)?;
    row.map(Swap::from)
        .ok_or(AppError::NotFound { what: "swap", id })
}

/// `GET /swaps/{id}`.
///
/// # Errors
/// 404.
pub async fn get_swap(
    State(state): State<SharedState>,
    Path(id): Path<i64>,
) -> Result<Json<Swap>, AppError> {
    Ok(Json(read_swap(&state, id).await?))
}

/// `POST /assignments` → 201 assignment.
///
/// # Errors
/// 400.
pub async fn create_assignment(
    State(state): State<SharedState>,
    Json(req): Json<NewAssignment>,
) -> Result<(StatusCode, Json<Assignment>), AppError> {
    let block_date = checked_text("block_date", &req.block_date, 32)?;
    let person = checked_text("person", &req.person, 255)?;
    let s = &state.store;
    let sql = s.sql(
        "INSERT INTO {p}assignments (block_date, person, fence) VALUES (?, ?, 0) RETURNING id",
    );
    let (id,): (i64,) = on_db!(&s.db, pool => sqlx::query_as(sql).bind(&block_date).bind(&person).fetch_one(pool).await)?;
    Ok((
        StatusCode::CREATED,
        Json(Assignment {
            id,
            block_date,
            person,
            fence: 0,
        }),
    ))
}

/// `GET /assignments/{id}`.
///
/// # Errors
/// 404.
pub async fn get_assignment(
    State(state): State<SharedState>,
    Path(id): Path<i64>,
) -> Result<Json<Assignment>, AppError> {
    let s = &state.store;
    let sql = s.sql("SELECT id, block_date, person, fence FROM {p}assignments WHERE id = ?");
    let row: Option<(i64, String, String, i64)> =
        on_db!(&s.db, pool => sqlx::query_as(sql).bind(id).fetch_optional(pool).await)?;
    row.map(|(id, block_date, person, fence)| {
        Json(Assignment {
            id,
            block_date,
            person,
            fence,
        })
    })
    .ok_or(AppError::NotFound {
        what: "assignment",
        id,
    })
}
