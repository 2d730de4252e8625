//! Crash harness: many clients acquire, renew and release against the real `holdfast serve`
//! binary (durability `sync`) while it is killed with SIGKILL and restarted on the same data
//! directory. A checker judges the whole history:
//!
//! - no two clients ever believe they hold the same exclusive key at once (a belief starts when
//!   the grant is acknowledged and ends before the release is sent);
//! - a register guarded by fencing tokens never sees a token smaller than one it already
//!   accepted (so a fenced write is never refused in a correct history);
//! - a grant whose request was sent after another grant was acknowledged carries a larger
//!   token, across restarts;
//! - an acknowledged grant is never lost (renew/release of a live lease never answers
//!   `lease_not_found` before its acknowledged expiry) and an acknowledged release is never
//!   undone (the lease is gone after every later restart);
//! - an acknowledged idempotency result survives a SIGKILL.
//!
//! The schedule is random; the seed is printed so a failure can be replayed with
//! `HOLDFAST_CRASH_SEED=<seed>`. The checker is itself checked: with
//! `HOLDFAST_CRASH_DURABILITY=memory` (the server forgets everything on restart) this test
//! reports lost grants and reused fencing tokens and fails.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use holdfast_api::{CreateLeaseRequest, ErrorBody, ErrorCode, LeaseResponse, LockRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KEYS: [&str; 3] = ["crash/a", "crash/b", "crash/c"];
const CLIENTS: usize = 8;
const LEASE_TTL_MS: u64 = 5_000;
const KILLS: usize = 4;
/// Margin under the acknowledged expiry within which a `lease_not_found` is not judged.
const EXPIRY_MARGIN_MS: u64 = 500;

/// One running `holdfast serve` process.
struct ServerProcess {
    child: Child,
}

impl ServerProcess {
    fn start(data_dir: &Path, port: u16, log: &Path) -> anyhow::Result<Self> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .args(["serve", "--durability"])
            .arg(std::env::var("HOLDFAST_CRASH_DURABILITY").unwrap_or_else(|_| "sync".into()))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            // The clients here speak HTTP; the default wire port (port + 1) might be taken.
            .args(["--wire-listen", "off"])
            .arg("--data-dir")
            .arg(data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut sent = false;
            // Keep draining so the server never blocks on a full pipe.
            while let Some(Ok(line)) = lines.next() {
                if !sent && line.contains("listening on") {
                    let _ = tx.send(line);
                    sent = true;
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(_) => Ok(Self { child }),
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(log).unwrap_or_default();
                anyhow::bail!("server did not report `listening on` within 60 s; log:\n{log}")
            }
        }
    }

    fn kill9(mut self) {
        // std's kill() sends SIGKILL on Unix.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the checker knows about one key.
#[derive(Default)]
struct KeyRegister {
    /// Largest fencing token the register accepted.
    max_token: u64,
    /// Who believes they hold the key now.
    believer: Option<(usize, u64)>,
}

#[derive(Default)]
struct Checker {
    keys: Mutex<HashMap<String, KeyRegister>>,
    violations: Mutex<Vec<String>>,
    /// Largest token of any acknowledged new grant.
    max_acked_token: AtomicU64,
    grants: AtomicU64,
    releases: AtomicU64,
    renewals: AtomicU64,
    released_leases: Mutex<Vec<String>>,
}

impl Checker {
    fn violation(&self, what: String) {
        eprintln!("VIOLATION: {what}");
        self.violations.lock().unwrap().push(what);
    }

    fn begin_belief(&self, client: usize, key: &str, token: u64) {
        let mut keys = self.keys.lock().unwrap();
        let reg = keys.entry(key.to_owned()).or_default();
        if let Some((other, other_token)) = reg.believer {
            self.violation(format!(
                "overlap on {key}: client {client} (token {token}) granted while client {other} (token {other_token}) holds it"
            ));
        }
        reg.believer = Some((client, token));
        // The fenced write: a register that refuses tokens smaller than one it has seen.
        if token < reg.max_token {
            self.violation(format!(
                "stale token on {key}: client {client} wrote {token} after {}",
                reg.max_token
            ));
        }
        reg.max_token = reg.max_token.max(token);
    }

    fn end_belief(&self, client: usize, key: &str) {
        let mut keys = self.keys.lock().unwrap();
        if let Some(reg) = keys.get_mut(key)
            && matches!(reg.believer, Some((c, _)) if c == client)
        {
            reg.believer = None;
        }
    }
}

struct Shared {
    base: String,
    http: reqwest::Client,
    checker: Checker,
    stop: AtomicBool,
}

enum Answer<T> {
    Ok(T),
    Refused(ErrorBody),
    /// No answer: the server is down or the connection broke. The outcome is unknown.
    Unknown,
}

async fn call<T: serde::de::DeserializeOwned>(req: reqwest::RequestBuilder) -> Answer<T> {
    let Ok(resp) = req.send().await else {
        return Answer::Unknown;
    };
    let status = resp.status();
    let Ok(bytes) = resp.bytes().await else {
        return Answer::Unknown;
    };
    if status.is_success() {
        let bytes: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        match serde_json::from_slice(bytes) {
            Ok(v) => Answer::Ok(v),
            Err(e) => panic!("undecodable success body ({status}): {e}: {bytes:?}"),
        }
    } else if status.as_u16() == 503 {
        Answer::Unknown
    } else {
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => {
                assert!(status.as_u16() < 500, "server answered {status}: {body:?}");
                Answer::Refused(body)
            }
            Err(e) => panic!("undecodable error body ({status}): {e}: {bytes:?}"),
        }
    }
}

async fn client_loop(shared: Arc<Shared>, client: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let holder = format!("crash-client-{client}");
    while !shared.stop.load(Ordering::SeqCst) {
        let mut keys: Vec<&str> = vec![KEYS[rng.random_range(0..KEYS.len())]];
        if rng.random_bool(0.25) {
            let other = KEYS[rng.random_range(0..KEYS.len())];
            if other != keys[0] {
                keys.push(other);
            }
        }
        let body = CreateLeaseRequest {
            holder: holder.clone(),
            ttl_ms: Some(LEASE_TTL_MS),
            wait_ms: Some(rng.random_range(0..1_500)),
            reason: Some("crash test".into()),
            metadata: None,
            reentrant: None,
            locks: keys.iter().map(|k| LockRequest::exclusive(*k)).collect(),
        };
        let token_floor = shared.checker.max_acked_token.load(Ordering::SeqCst);
        let sent = Instant::now();
        let lease: LeaseResponse = match call(
            shared
                .http
                .post(format!("{}/v1/leases", shared.base))
                .json(&body),
        )
        .await
        {
            Answer::Ok(lease) => lease,
            Answer::Refused(_) => continue,
            Answer::Unknown => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut acked_expiry = sent + Duration::from_millis(LEASE_TTL_MS);
        // Every lock of the lease must be there (nothing half-applied).
        for key in &keys {
            let Some(held) = lease.locks.iter().find(|l| l.key == *key) else {
                shared
                    .checker
                    .violation(format!("grant of {key} missing from lease {lease:?}"));
                continue;
            };
            if held.count == 1 && held.fencing_token <= token_floor {
                shared.checker.violation(format!(
                    "token {} for {key} not above {token_floor}, acknowledged before the request was sent",
                    held.fencing_token
                ));
            }
        }
        for held in &lease.locks {
            shared
                .checker
                .begin_belief(client, &held.key, held.fencing_token);
            shared
                .checker
                .max_acked_token
                .fetch_max(held.fencing_token, Ordering::SeqCst);
        }
        shared.checker.grants.fetch_add(1, Ordering::SeqCst);

        // Hold, sometimes renewing; keep renewing through a server restart.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..15))).await;
        if rng.random_bool(0.3) {
            loop {
                let sent = Instant::now();
                match call::<LeaseResponse>(
                    shared
                        .http
                        .post(format!(
                            "{}/v1/leases/{}/renew",
                            shared.base, lease.lease_id
                        ))
                        .json(&serde_json::json!({ "ttl_ms": LEASE_TTL_MS })),
                )
                .await
                {
                    Answer::Ok(_) => {
                        acked_expiry = sent + Duration::from_millis(LEASE_TTL_MS);
                        shared.checker.renewals.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                    Answer::Refused(err) => {
                        judge_lost(&shared.checker, client, &lease, &err, acked_expiry);
                        break;
                    }
                    Answer::Unknown => {
                        if Instant::now() + Duration::from_millis(EXPIRY_MARGIN_MS) > acked_expiry {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }

        for held in &lease.locks {
            shared.checker.end_belief(client, &held.key);
        }
        let mut first_attempt = true;
        loop {
            let answer = call::<serde_json::Value>(
                shared
                    .http
                    .delete(format!("{}/v1/leases/{}", shared.base, lease.lease_id)),
            )
            .await;
            if first_attempt && let Answer::Refused(err) = &answer {
                judge_lost(&shared.checker, client, &lease, err, acked_expiry);
            }
            first_attempt = false;
            match answer {
                Answer::Ok(_) => {
                    shared.checker.releases.fetch_add(1, Ordering::SeqCst);
                    shared
                        .checker
                        .released_leases
                        .lock()
                        .unwrap()
                        .push(lease.lease_id.clone());
                    break;
                }
                // An unacknowledged earlier attempt may have released it already.
                Answer::Refused(_) => break,
                Answer::Unknown => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

fn judge_lost(
    checker: &Checker,
    client: usize,
    lease: &LeaseResponse,
    err: &ErrorBody,
    acked_expiry: Instant,
) {
    if err.error == ErrorCode::LeaseNotFound
        && Instant::now() + Duration::from_millis(EXPIRY_MARGIN_MS) < acked_expiry
    {
        checker.violation(format!(
            "client {client}: acknowledged lease {} lost before its expiry",
            lease.lease_id
        ));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[test]
fn sigkill_restart_history_is_safe() -> anyhow::Result<()> {
    let seed: u64 = std::env::var("HOLDFAST_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash harness seed: {seed} (replay with HOLDFAST_CRASH_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);

    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    let log = dir.path().join("server.log");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut server = ServerProcess::start(&data_dir, port, &log)?;

    let shared = Arc::new(Shared {
        base: base.clone(),
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(0)
            .build()?,
        checker: Checker::default(),
        stop: AtomicBool::new(false),
    });

    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            runtime.spawn(client_loop(
                shared.clone(),
                i,
                seed.wrapping_add(i as u64 + 1),
            ))
        })
        .collect();

    for kill in 0..KILLS {
        // Let traffic run, then kill -9 mid-flight and restart on the same data directory.
        let before = shared.checker.grants.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(rng.random_range(400..1_200)));
        // Make sure some grants happened in this epoch so the kill lands on live traffic.
        let wait_until = Instant::now() + Duration::from_secs(20);
        while shared.checker.grants.load(Ordering::SeqCst) < before + 5
            && Instant::now() < wait_until
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "kill {kill}: SIGKILL after {} grants",
            shared.checker.grants.load(Ordering::SeqCst)
        );
        server.kill9();
        std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
        server = ServerProcess::start(&data_dir, port, &log)?;
    }
    std::thread::sleep(Duration::from_millis(800));
    shared.stop.store(true, Ordering::SeqCst);
    runtime.block_on(async {
        for c in clients {
            c.await.expect("client task panicked");
        }
    });

    // Acknowledged releases stay released after every restart.
    let released = shared.checker.released_leases.lock().unwrap().clone();
    runtime.block_on(async {
        for lease_id in released.iter().rev().take(200) {
            let resp = shared
                .http
                .get(format!("{base}/v1/leases/{lease_id}"))
                .send()
                .await
                .expect("server answers");
            if resp.status().as_u16() != 404 {
                shared.checker.violation(format!(
                    "released lease {lease_id} is back: {}",
                    resp.status()
                ));
            }
        }
    });

    // An acknowledged idempotency result survives SIGKILL.
    let idem_key = format!("crash/idem/{seed}");
    runtime.block_on(async {
        let started: serde_json::Value = shared
            .http
            .post(format!("{base}/v1/idempotency/{idem_key}"))
            .json(&serde_json::json!({"fingerprint": "f1", "holder": "crash-idem"}))
            .send()
            .await
            .expect("begin")
            .json()
            .await
            .expect("begin body");
        let lease_id = started["lease_id"].as_str().expect("started lease").to_owned();
        let resp = shared
            .http
            .put(format!("{base}/v1/idempotency/{idem_key}"))
            .json(&serde_json::json!({"lease_id": lease_id, "result": {"status": 201, "body": "booked"}}))
            .send()
            .await
            .expect("complete");
        assert!(resp.status().is_success(), "complete: {}", resp.status());
    });
    server.kill9();
    let server = ServerProcess::start(&data_dir, port, &log)?;
    runtime.block_on(async {
        let resp = shared
            .http
            .post(format!("{base}/v1/idempotency/{idem_key}"))
            .json(&serde_json::json!({"fingerprint": "f1", "holder": "crash-idem-2"}))
            .send()
            .await
            .expect("replay");
        assert_eq!(
            resp.status().as_u16(),
            200,
            "completed record replayed after SIGKILL"
        );
        let body: serde_json::Value = resp.json().await.expect("replay body");
        assert_eq!(body["state"], "completed");
        assert_eq!(body["result"]["body"], "booked");
    });
    server.kill9();

    let grants = shared.checker.grants.load(Ordering::SeqCst);
    let releases = shared.checker.releases.load(Ordering::SeqCst);
    let renewals = shared.checker.renewals.load(Ordering::SeqCst);
    eprintln!(
        "history: {grants} grants, {releases} acknowledged releases, {renewals} renewals, {KILLS} kills"
    );
    let violations = shared.checker.violations.lock().unwrap().clone();
    assert!(
        violations.is_empty(),
        "seed {seed}: {} violations: {violations:#?}",
        violations.len()
    );
    // The history must have exercised the system, or the checks prove nothing.
    assert!(
        grants >= 20 * KILLS as u64,
        "too few grants ({grants}) to judge the history"
    );
    assert!(releases > 0 && renewals > 0);
    Ok(())
}
