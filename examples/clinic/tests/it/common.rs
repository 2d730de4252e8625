//! Shared test helpers: the databases, an in-process clinic on an ephemeral port, an in-process
//! holdfast server, and hooks that make races deterministic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clinic::{AppState, Config, HookFn, HookPoint, Hooks, Locking, Store};
use holdfast_server::{RunningServer, ServerConfig};
use rand::Rng as _;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::Barrier;

/// How long a barrier in a hook waits before the test is declared stuck.
pub const BARRIER_WAIT_MAX: Duration = Duration::from_secs(30);

/// A database the tests run against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    MariaDb,
}

impl Backend {
    fn url(self, dir: &std::path::Path) -> String {
        match self {
            Self::Sqlite => format!("sqlite://{}?mode=rwc", dir.join("clinic.db").display()),
            Self::Postgres => std::env::var("HOLDFAST_TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned()),
            Self::MariaDb => std::env::var("HOLDFAST_TEST_MYSQL_URL")
                .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned()),
        }
    }
}

/// How to build the app under test.
#[derive(Clone)]
pub struct Options {
    pub locking: Locking,
    pub hooks: Hooks,
    pub holdfast: bool,
    pub config: Config,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            locking: Locking::On,
            hooks: Hooks::default(),
            holdfast: false,
            config: test_config(),
        }
    }
}

impl Options {
    pub fn off(mut self) -> Self {
        self.locking = Locking::Off;
        self
    }
    pub fn hooks(mut self, hooks: Hooks) -> Self {
        self.hooks = hooks;
        self
    }
    pub fn holdfast(mut self) -> Self {
        self.holdfast = true;
        self
    }
}

/// The clinic's defaults with explicit, test-friendly values.
pub fn test_config() -> Config {
    Config {
        import_wait: Duration::from_secs(30),
        lock_ttl: Duration::from_secs(10),
        idempotency_wait: Duration::from_secs(30),
        swap_lock_wait: Duration::from_secs(10),
        instance: "clinic-test".to_owned(),
        ..Config::default()
    }
}

/// A running clinic.
pub struct App {
    pub base: String,
    pub http: reqwest::Client,
    pub store: Store,
    pub holdfast: Option<RunningServer>,
    pub holdfast_client: Option<holdfast_client::Client>,
    server: tokio::task::JoinHandle<()>,
    /// Where to drop this run's tables if the test panics before [`App::finish`].
    leftovers: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Drop for App {
    /// A failed assertion skips `finish`: drop the run's tables from a fresh runtime on another
    /// thread (the test's runtime is unwinding), so failed runs leave nothing behind either.
    fn drop(&mut self) {
        let Some((url, prefix)) = self.leftovers.take() else {
            return;
        };
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(store) = Store::connect(&url, &prefix, 1).await {
                    let _ = clinic::db::drop_tables(&store).await;
                    store.close().await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Start a clinic on `backend`, or `None` (with the reason printed) if that database is not
/// reachable outside CI. Under `CI=true` an unreachable database fails the test.
pub async fn app(backend: Backend, options: Options) -> Option<App> {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = backend.url(dir.path());
    let prefix = format!("t{:08x}_", rand::rng().random::<u32>());
    let store = match reachable(backend, &url).await {
        Ok(()) => Store::connect(&url, &prefix, 10)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    let store = match store {
        Ok(s) => s,
        Err(e) => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(
                !ci,
                "CI=true and {backend:?} is not reachable at {url}: {e}"
            );
            eprintln!(
                "SKIP: {backend:?} is not reachable at {url} ({e}); set HOLDFAST_TEST_POSTGRES_URL / HOLDFAST_TEST_MYSQL_URL"
            );
            return None;
        }
    };
    clinic::migrate(&store).await.expect("migrate");
    let (holdfast, holdfast_client) = if options.holdfast {
        let server = holdfast_server::start(ServerConfig::ephemeral_memory())
            .await
            .expect("holdfast server");
        let client = holdfast_client::Client::builder()
            .base_url(server.base_url())
            .request_timeout(Duration::from_secs(10))
            .build()
            .expect("holdfast client");
        (Some(server), Some(client))
    } else {
        (None, None)
    };
    let mut state = AppState::new(store.clone(), holdfast_client.clone(), options.config);
    state.locking = options.locking;
    state.hooks = options.hooks;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = clinic::router(Arc::new(state));
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .connect_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(64)
        .build()
        .expect("http client");
    let leftovers = (backend != Backend::Sqlite).then(|| (url.clone(), prefix.clone()));
    Some(App {
        base: format!("http://{addr}"),
        http,
        store,
        holdfast,
        holdfast_client,
        server,
        leftovers,
        _dir: dir,
    })
}

/// Whether `backend` answers, probed once per test process with a short timeout (an unreachable
/// server would otherwise cost every test the pool's full connect timeout).
async fn reachable(backend: Backend, url: &str) -> Result<(), String> {
    static PROBED: Mutex<Vec<(Backend, Result<(), String>)>> = Mutex::new(Vec::new());
    if backend == Backend::Sqlite {
        return Ok(());
    }
    if let Some((_, r)) = PROBED
        .lock()
        .expect("probe cache")
        .iter()
        .find(|(b, _)| *b == backend)
    {
        return r.clone();
    }
    let probe = match tokio::time::timeout(PROBE_TIMEOUT, Store::connect(url, "", 1)).await {
        Ok(Ok(store)) => {
            store.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no connection within {PROBE_TIMEOUT:?}")),
    };
    PROBED
        .lock()
        .expect("probe cache")
        .push((backend, probe.clone()));
    probe
}

/// How long the reachability probe waits for a database.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A response: status, body, and whether it was a replay.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
    pub replayed: bool,
}

impl App {
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Reply {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let replayed = resp
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true");
        let text = resp.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply {
            status,
            body,
            replayed,
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.send(reqwest::Method::POST, path, &[], Some(body))
            .await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(reqwest::Method::GET, path, &[], None).await
    }

    /// POST expecting 201; the new id.
    pub async fn create(&self, path: &str, body: Value) -> i64 {
        let r = self.post(path, body).await;
        assert_eq!(r.status, StatusCode::CREATED, "{path}: {:?}", r.body);
        r.body["id"].as_i64().expect("id")
    }

    /// One integer from the database (`{p}` is the table prefix).
    pub async fn scalar(&self, sql: &str, args: &[i64]) -> i64 {
        let sql = self.store.sql(sql);
        clinic::on_db!(&self.store.db, pool => {
            let mut q = sqlx::query_as::<_, (i64,)>(sql);
            for a in args {
                q = q.bind(*a);
            }
            q.fetch_one(pool).await.expect("scalar").0
        })
    }

    /// Execute one statement (`{p}` is the table prefix).
    pub async fn exec(&self, sql: &str, args: &[i64]) {
        let sql = self.store.sql(sql);
        clinic::on_db!(&self.store.db, pool => {
            let mut q = sqlx::query(sql);
            for a in args {
                q = q.bind(*a);
            }
            q.execute(pool).await.expect("exec");
        });
    }

    /// Stop the servers and drop this run's tables.
    pub async fn finish(mut self) {
        self.leftovers = None;
        self.server.abort();
        if let Some(h) = self.holdfast.take() {
            h.shutdown().await;
        }
        clinic::db::drop_tables(&self.store)
            .await
            .expect("drop tables");
        self.store.close().await;
    }
}

/// Count the statuses of replies.
pub fn statuses(replies: &[Reply]) -> HashMap<u16, usize> {
    let mut m = HashMap::new();
    for r in replies {
        *m.entry(r.status.as_u16()).or_insert(0) += 1;
    }
    m
}

/// Hooks that make `parties` requests meet at `point` (all have read before any writes), and
/// report whether a barrier ever waited longer than [`BARRIER_WAIT_MAX`].
pub fn barrier_at(point: HookPoint, parties: usize) -> (Hooks, Arc<AtomicBool>) {
    let barrier = Arc::new(Barrier::new(parties));
    let stuck = Arc::new(AtomicBool::new(false));
    let s = stuck.clone();
    let f: HookFn = Arc::new(move |p, _| {
        let barrier = barrier.clone();
        let stuck = s.clone();
        Box::pin(async move {
            if p == point
                && tokio::time::timeout(BARRIER_WAIT_MAX, barrier.wait())
                    .await
                    .is_err()
            {
                stuck.store(true, Ordering::SeqCst);
            }
        })
    });
    (Hooks::new(f), stuck)
}

/// Hooks that yield a few times at `point`, widening the window between read and write so that
/// concurrent requests really overlap there (the protections must hold anyway).
pub fn widen_at(point: HookPoint) -> Hooks {
    let f: HookFn = Arc::new(move |p, _| {
        Box::pin(async move {
            if p == point {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    });
    Hooks::new(f)
}

/// Counts how many requests are between `enter` and `exit` at once, per subject, and the most
/// ever seen.
#[derive(Clone, Default)]
pub struct Overlap {
    inside: Arc<Mutex<HashMap<String, i64>>>,
    pub max: Arc<Mutex<HashMap<String, i64>>>,
    pub total_max: Arc<AtomicI64>,
    total: Arc<AtomicI64>,
}

impl Overlap {
    pub fn hooks(&self, enter: HookPoint, exit: HookPoint, pause: HookPoint) -> Hooks {
        let me = self.clone();
        let f: HookFn = Arc::new(move |p, subject| {
            let me = me.clone();
            Box::pin(async move {
                if p == enter {
                    let now = {
                        let mut inside = me.inside.lock().expect("lock");
                        let n = inside.entry(subject.clone()).or_insert(0);
                        *n += 1;
                        *n
                    };
                    let mut max = me.max.lock().expect("lock");
                    let m = max.entry(subject).or_insert(0);
                    *m = (*m).max(now);
                    let t = me.total.fetch_add(1, Ordering::SeqCst) + 1;
                    me.total_max.fetch_max(t, Ordering::SeqCst);
                } else if p == exit {
                    *me.inside.lock().expect("lock").entry(subject).or_insert(0) -= 1;
                    me.total.fetch_sub(1, Ordering::SeqCst);
                } else if p == pause {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        });
        Hooks::new(f)
    }
}

/// Generate one `#[tokio::test]` per backend for `scenario(backend)`.
macro_rules! per_backend {
    ($scenario:ident: $($backend:ident => $variant:ident),+ $(,)?) => {
        mod $scenario {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $backend() {
                    super::$scenario($crate::common::Backend::$variant).await;
                }
            )+
        }
    };
}
pub(crate) use per_backend;
