//! Client integration tests against an in-process server (`holdfast_server::start`, memory
//! durability, ephemeral port). Waits for server-side effects poll the server's state with a
//! bounded number of tries; nothing asserts on elapsed wall time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use holdfast_client::api::{IdempotencyResultBody, LockMode};
use holdfast_client::{Client, ClientError, Health, LostReason, RetryPolicy};
use holdfast_server::{RunningServer, ServerConfig};

async fn server() -> (RunningServer, Client) {
    let server = holdfast_server::start(ServerConfig::ephemeral_memory())
        .await
        .expect("server starts");
    let client = Client::builder()
        .base_url(server.base_url())
        .request_timeout(Duration::from_secs(5))
        .holder("it-default")
        .build()
        .expect("client");
    (server, client)
}

/// Poll `check` every 50 ms, at most `tries` times.
async fn eventually<F, Fut>(tries: u32, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..tries {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn holders(client: &Client, key: &str) -> Vec<String> {
    client
        .lock_state(key)
        .await
        .expect("lock state")
        .holders
        .into_iter()
        .map(|h| h.holder)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_release_and_fencing_tokens_increase() {
    let (_server, client) = server().await;
    let g1 = client.lock("it/a").holder("one").acquire().await.unwrap();
    assert_eq!(holders(&client, "it/a").await, vec!["one"]);
    let t1 = g1.fencing_token();
    g1.release().await.unwrap();
    assert!(holders(&client, "it/a").await.is_empty());
    let g2 = client.lock("it/a").holder("two").acquire().await.unwrap();
    assert!(g2.fencing_token() > t1);
    let check = client
        .check_fencing("it/a", g2.fencing_token())
        .await
        .unwrap();
    assert!(check.current);
    g2.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_wait_refusal_names_the_holder() {
    let (_server, client) = server().await;
    let _g = client
        .lock("vocab_import/RXNORM")
        .holder("importer@host-1")
        .acquire()
        .await
        .unwrap();
    let err = client
        .lock("vocab_import/RXNORM")
        .holder("importer@host-2")
        .acquire()
        .await
        .unwrap_err();
    match &err {
        ClientError::Held { key, holders, .. } => {
            assert_eq!(key, "vocab_import/RXNORM");
            assert_eq!(holders[0].holder, "importer@host-1");
        }
        other => panic!("expected Held, got {other:?}"),
    }
    assert!(
        err.to_string().contains("held by importer@host-1 since"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_holder_is_not_reentrant_by_default_but_can_opt_in() {
    let (_server, client) = server().await;
    let g1 = client.lock("it/re").holder("same").acquire().await.unwrap();
    assert!(matches!(
        client.lock("it/re").holder("same").acquire().await,
        Err(ClientError::Held { .. })
    ));
    let g2 = client
        .lock("it/re")
        .holder("same")
        .reentrant(true)
        .acquire()
        .await
        .unwrap();
    assert_eq!(g2.lease_id(), g1.lease_id());
    assert!(g2.joined());
    // Releasing the joined guard decrements: the first still holds the key.
    g2.release().await.unwrap();
    assert_eq!(holders(&client, "it/re").await, vec!["same"]);
    g1.release().await.unwrap();
    assert!(holders(&client, "it/re").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_joined_guard_releases_only_its_own_count() {
    let (_server, client) = server().await;
    let g1 = client
        .lock("it/re-drop")
        .holder("same")
        .acquire()
        .await
        .unwrap();
    let g2 = client
        .lock("it/re-drop")
        .holder("same")
        .reentrant(true)
        .acquire()
        .await
        .unwrap();
    assert!(g2.joined());
    let count = || async {
        client
            .get_lease(g1.lease_id())
            .await
            .unwrap()
            .locks
            .iter()
            .find(|l| l.key == "it/re-drop")
            .map(|l| l.count)
    };
    assert_eq!(count().await, Some(2));
    // Dropped, not released: the guard releases its one count in the background.
    drop(g2);
    assert!(
        eventually(100, || async { count().await == Some(1) }).await,
        "the dropped joined guard took only its own count"
    );
    assert_eq!(holders(&client, "it/re-drop").await, vec!["same"]);
    g1.release().await.unwrap();
    assert!(holders(&client, "it/re-drop").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_until_the_holder_releases_and_reports_progress() {
    let (_server, client) = server().await;
    let g1 = client
        .lock("it/retry")
        .holder("first")
        .acquire()
        .await
        .unwrap();
    let seen = Arc::new(AtomicU32::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let seen2 = Arc::clone(&seen);
    let c2 = client.clone();
    let second = tokio::spawn(async move {
        c2.lock("it/retry")
            .holder("second")
            .retry(RetryPolicy::new(50, Duration::from_millis(20)))
            .on_progress(move |p| {
                seen2.fetch_add(1, Ordering::SeqCst);
                let _ = tx.send(p.holders.first().map(|h| h.holder.clone()));
            })
            .acquire()
            .await
    });
    // The second reports the holder at least once before the first releases.
    assert_eq!(rx.recv().await.flatten().as_deref(), Some("first"));
    g1.release().await.unwrap();
    let g2 = second
        .await
        .unwrap()
        .expect("second acquires after the release");
    assert!(seen.load(Ordering::SeqCst) >= 1);
    assert_eq!(holders(&client, "it/retry").await, vec!["second"]);
    g2.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_report_attempts_and_holder() {
    let (_server, client) = server().await;
    let _g = client
        .lock("it/busy")
        .holder("owner")
        .acquire()
        .await
        .unwrap();
    let err = client
        .lock("it/busy")
        .retry(RetryPolicy::new(3, Duration::from_millis(5)))
        .acquire()
        .await
        .unwrap_err();
    match &err {
        ClientError::Timeout {
            key,
            attempts,
            holders,
            ..
        } => {
            assert_eq!((key.as_str(), *attempts), ("it/busy", 3));
            assert_eq!(holders[0].holder, "owner");
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(
        err.to_string()
            .starts_with("failed to acquire it/busy after 3 attempts ("),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_wait_is_granted_on_release() {
    let (_server, client) = server().await;
    let g1 = client
        .lock("it/wait")
        .holder("first")
        .acquire()
        .await
        .unwrap();
    let c2 = client.clone();
    let waiter = tokio::spawn(async move {
        c2.lock("it/wait")
            .holder("second")
            .wait(Duration::from_secs(30))
            .acquire()
            .await
    });
    assert!(
        eventually(100, || async {
            !client
                .lock_state("it/wait")
                .await
                .unwrap()
                .waiters
                .is_empty()
        })
        .await
    );
    g1.release().await.unwrap();
    let g2 = waiter.await.unwrap().unwrap();
    assert_eq!(holders(&client, "it/wait").await, vec!["second"]);
    g2.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoning_a_wait_leaves_no_queued_request() {
    let (_server, client) = server().await;
    let g1 = client
        .lock("it/abandon")
        .holder("first")
        .acquire()
        .await
        .unwrap();
    let c2 = client.clone();
    let waiter = tokio::spawn(async move {
        c2.lock("it/abandon")
            .holder("quitter")
            .wait(Duration::from_secs(30))
            .acquire()
            .await
    });
    assert!(
        eventually(100, || async {
            !client
                .lock_state("it/abandon")
                .await
                .unwrap()
                .waiters
                .is_empty()
        })
        .await
    );
    waiter.abort();
    assert!(
        eventually(100, || async {
            client
                .lock_state("it/abandon")
                .await
                .unwrap()
                .waiters
                .is_empty()
        })
        .await
    );
    g1.release().await.unwrap();
    // Nobody got the key behind our back.
    assert!(holders(&client, "it/abandon").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_key_is_atomic_and_shared_mode_admits_readers() {
    let (_server, client) = server().await;
    let g = client
        .lock("it/m1")
        .also("it/m2")
        .holder("both")
        .acquire()
        .await
        .unwrap();
    assert_eq!(g.fencing_tokens().len(), 2);
    assert!(g.fencing_tokens()[0].1 != g.fencing_tokens()[1].1);
    // Asking for m2 and m3 fails as a whole: m3 stays free.
    assert!(
        client
            .lock("it/m3")
            .also("it/m2")
            .holder("other")
            .acquire()
            .await
            .is_err()
    );
    assert!(holders(&client, "it/m3").await.is_empty());
    g.release().await.unwrap();

    let r1 = client
        .lock("it/s")
        .shared()
        .holder("r1")
        .acquire()
        .await
        .unwrap();
    let r2 = client
        .lock("it/s")
        .shared()
        .holder("r2")
        .acquire()
        .await
        .unwrap();
    let state = client.lock_state("it/s").await.unwrap();
    assert_eq!(state.holders.len(), 2);
    assert!(state.holders.iter().all(|h| h.mode == LockMode::Shared));
    assert!(matches!(
        client.lock("it/s").holder("w").acquire().await,
        Err(ClientError::Held { .. })
    ));
    r1.release().await.unwrap();
    r2.release().await.unwrap();

    let s1 = client
        .lock("it/sem")
        .semaphore(2, 1)
        .holder("p1")
        .acquire()
        .await
        .unwrap();
    let s2 = client
        .lock("it/sem")
        .semaphore(2, 1)
        .holder("p2")
        .acquire()
        .await
        .unwrap();
    assert!(
        client
            .lock("it/sem")
            .semaphore(2, 1)
            .holder("p3")
            .acquire()
            .await
            .is_err()
    );
    s1.release().await.unwrap();
    s2.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_with_reserved_characters_round_trip() {
    let (_server, client) = server().await;
    for key in ["it/sp ace/q?x#y", "it/a/../b", "it/%41", "it//double"] {
        let g = client.lock(key).holder("enc").acquire().await.unwrap();
        assert_eq!(holders(&client, key).await, vec!["enc"], "{key}");
        let listed = client.list_locks(Some(key), None).await.unwrap();
        assert!(listed.locks.iter().any(|l| l.key == key), "{key}");
        g.release().await.unwrap();
        assert!(holders(&client, key).await.is_empty(), "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_a_lock_far_past_its_ttl() {
    let (_server, client) = server().await;
    let g = client
        .lock("it/renew")
        .holder("keeper")
        .ttl(Duration::from_secs(1))
        .acquire()
        .await
        .unwrap();
    // Four TTLs later, still held by the same lease, never at risk.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(g.status().health, Health::Held);
    let lease = client.get_lease(g.lease_id()).await.unwrap();
    assert_eq!(lease.locks[0].key, "it/renew");
    assert_eq!(holders(&client, "it/renew").await, vec!["keeper"]);
    g.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_watching_the_guard_sees_its_release() {
    let (_server, client) = server().await;
    for by_drop in [false, true] {
        let g = client.lock("it/watched").acquire().await.unwrap();
        let context = g.context();
        let mut status = context.watch();
        status.borrow_and_update();
        let watcher = tokio::spawn(async move {
            status.changed().await.unwrap();
            status.borrow().health.clone()
        });
        if by_drop {
            drop(g);
        } else {
            g.release().await.unwrap();
        }
        let seen = tokio::time::timeout(Duration::from_secs(10), watcher)
            .await
            .expect("the watcher was never woken")
            .unwrap();
        assert_eq!(seen, Health::Released, "by_drop = {by_drop}");
        assert_eq!(context.status().health, Health::Released);
        assert!(!context.is_lost());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_releases_the_lock() {
    let (_server, client) = server().await;
    {
        let _g = client
            .lock("it/drop")
            .holder("dropper")
            .acquire()
            .await
            .unwrap();
        assert_eq!(holders(&client, "it/drop").await, vec!["dropper"]);
    }
    assert!(
        eventually(100, || async {
            holders(&client, "it/drop").await.is_empty()
        })
        .await
    );
}

#[derive(Debug)]
enum AppError {
    Client(ClientError),
    Failed,
}

impl From<ClientError> for AppError {
    fn from(e: ClientError) -> Self {
        AppError::Client(e)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_lock_releases_on_success_error_and_panic() {
    let (_server, client) = server().await;
    let token = client
        .with_lock("it/with", |ctx| async move {
            Ok::<_, AppError>(ctx.fencing_token())
        })
        .await
        .unwrap();
    assert!(token > 0);
    assert!(holders(&client, "it/with").await.is_empty());

    let c = client.clone();
    let r: Result<(), AppError> = client
        .with_lock("it/with", |_ctx| async move {
            // Held while the body runs.
            assert_eq!(holders(&c, "it/with").await.len(), 1);
            Err(AppError::Failed)
        })
        .await;
    assert!(matches!(r, Err(AppError::Failed)));
    assert!(holders(&client, "it/with").await.is_empty());

    let c = client.clone();
    let panicked = tokio::spawn(async move {
        let _: Result<(), AppError> = c
            .with_lock("it/with", |_ctx| async move { panic!("body panics") })
            .await;
    })
    .await;
    assert!(panicked.unwrap_err().is_panic());
    assert!(holders(&client, "it/with").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_lock_cancels_the_body_when_the_lock_is_lost() {
    let (_server, client) = server().await;
    let admin = client.clone();
    let r: Result<(), AppError> = client
        .lock("it/cancel")
        .ttl(Duration::from_secs(1))
        .with(|ctx| async move {
            admin
                .force_release_lease(ctx.lease_id(), "test")
                .await
                .unwrap();
            std::future::pending::<()>().await;
            Ok(())
        })
        .await;
    assert!(
        matches!(r, Err(AppError::Client(ClientError::Lost(_)))),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_fires_on_admin_release_of_the_lease_and_of_a_key() {
    let (_server, client) = server().await;
    let g = client
        .lock("it/lost1")
        .ttl(Duration::from_secs(1))
        .acquire()
        .await
        .unwrap();
    client
        .force_release_lease(g.lease_id(), "maintenance")
        .await
        .unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(10), g.lost())
        .await
        .expect("lost fires");
    assert_eq!(reason, LostReason::NotFound);
    assert!(matches!(g.release().await, Err(ClientError::Lost(_))));

    let g = client
        .lock("it/lost2")
        .ttl(Duration::from_secs(1))
        .acquire()
        .await
        .unwrap();
    client
        .force_release_lock("it/lost2", "maintenance")
        .await
        .unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(10), g.lost())
        .await
        .expect("lost fires");
    assert_eq!(reason, LostReason::Revoked(vec!["it/lost2".to_owned()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_server_makes_the_guard_at_risk_then_lost() {
    let (server, client) = server().await;
    let g = client
        .lock("it/stop")
        .ttl(Duration::from_secs(2))
        .acquire()
        .await
        .unwrap();
    let mut watch = g.context().watch();
    server.shutdown().await;
    let mut saw_at_risk = false;
    let reason = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match watch.borrow_and_update().health.clone() {
                Health::AtRisk { .. } => saw_at_risk = true,
                Health::Lost(r) => return r,
                _ => {}
            }
            watch.changed().await.unwrap();
        }
    })
    .await
    .expect("lost fires");
    assert!(saw_at_risk, "at risk before lost");
    assert_eq!(reason, LostReason::Expired);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_duplicates_run_the_closure_once_and_share_the_result() {
    let (_server, client) = server().await;
    let runs = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let c = client.clone();
        let runs = Arc::clone(&runs);
        tasks.push(tokio::spawn(async move {
            c.idempotency("it/swap/42", "fp-1")
                .holder(format!("worker-{i}"))
                .run(|| async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    // Long enough for the twins to arrive while this runs.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok::<_, ClientError>(IdempotencyResultBody {
                        status: 201,
                        headers: vec![],
                        body: format!("swap done by run {n}"),
                    })
                })
                .await
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap().unwrap());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(outcomes.iter().filter(|o| !o.replayed).count(), 1);
    assert!(outcomes.iter().all(|o| o.result == outcomes[0].result));
    assert_eq!(outcomes[0].result.body, "swap done by run 1");

    // A different request under the same key is refused.
    let r = client
        .idempotent("it/swap/42", "fp-2", || async {
            Ok::<_, ClientError>(IdempotencyResultBody {
                status: 200,
                headers: vec![],
                body: String::new(),
            })
        })
        .await;
    assert!(
        matches!(r, Err(ClientError::FingerprintMismatch { .. })),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_idempotent_operation_is_aborted_so_a_retry_runs() {
    let (_server, client) = server().await;
    let r = client
        .idempotent("it/idem/fail", "fp", || async {
            Err::<IdempotencyResultBody, _>(AppError::Failed)
        })
        .await;
    assert!(matches!(r, Err(AppError::Failed)));
    let ok = client
        .idempotent("it/idem/fail", "fp", || async {
            Ok::<_, AppError>(IdempotencyResultBody {
                status: 200,
                headers: vec![],
                body: "second try".into(),
            })
        })
        .await
        .unwrap();
    assert!(!ok.replayed);
    assert_eq!(ok.result.body, "second try");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_shows_grants_and_releases() {
    let (_server, client) = server().await;
    let mut events = client.events(Some("it/ev"), None).await.unwrap();
    let g = client.lock("it/ev/1").holder("ev").acquire().await.unwrap();
    g.release().await.unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .unwrap()
            .unwrap()
        {
            Some(holdfast_client::StreamEvent::Event(e)) => kinds.push(e.kind),
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(kinds, vec!["granted", "released"]);
    assert!(events.last_event_id().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_and_listing_filters() {
    let (_server, client) = server().await;
    let _a = client
        .lock("it/list/a")
        .holder("alice")
        .acquire()
        .await
        .unwrap();
    let _b = client
        .lock("it/list/b")
        .holder("bob")
        .acquire()
        .await
        .unwrap();
    let by_bob = client
        .list_locks(Some("it/list/"), Some("bob"))
        .await
        .unwrap();
    assert_eq!(by_bob.locks.len(), 1);
    assert_eq!(by_bob.locks[0].key, "it/list/b");
    let stats = client.stats().await.unwrap();
    assert!(stats.active_locks >= 2);
}

/// SHA-256 of `s3cret` and of `adm1n`.
const CLIENT_SECRET_SHA256: &str =
    "1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0";
const ADMIN_SECRET_SHA256: &str =
    "8f8145e0f8d63c646e48f5a0377007c2193fce8c87399b5d9a59dec43b4cb45b";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_map_to_unauthorized_and_forbidden() {
    let mut config = ServerConfig::ephemeral_memory();
    config.tokens = vec![
        holdfast_server::config::TokenConfig {
            name: "app".into(),
            role: holdfast_server::config::Role::Client,
            sha256: CLIENT_SECRET_SHA256.into(),
            prefixes: Some(vec!["app/".into()]),
        },
        holdfast_server::config::TokenConfig {
            name: "ops".into(),
            role: holdfast_server::config::Role::Admin,
            sha256: ADMIN_SECRET_SHA256.into(),
            prefixes: None,
        },
    ];
    let server = holdfast_server::start(config).await.unwrap();
    let anonymous = Client::new(server.base_url()).unwrap();
    assert!(matches!(
        anonymous.stats().await,
        Err(ClientError::Unauthorized { .. })
    ));
    let wrong = Client::builder()
        .base_url(server.base_url())
        .token("nope")
        .build()
        .unwrap();
    assert!(matches!(
        wrong.lock("app/x").acquire().await,
        Err(ClientError::Unauthorized { .. })
    ));
    let app = Client::builder()
        .base_url(server.base_url())
        .token("s3cret")
        .build()
        .unwrap();
    let g = app
        .lock("app/x")
        .ttl(Duration::from_secs(1))
        .acquire()
        .await
        .unwrap();
    assert!(matches!(
        app.lock("other/x").acquire().await,
        Err(ClientError::Forbidden { .. })
    ));
    assert!(matches!(
        app.force_release_lock("app/x", "no").await,
        Err(ClientError::Forbidden { .. })
    ));
    let admin = Client::builder()
        .base_url(server.base_url())
        .token("adm1n")
        .build()
        .unwrap();
    admin
        .force_release_lock("app/x", "maintenance")
        .await
        .unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(40), g.lost())
        .await
        .expect("lost fires");
    assert_eq!(reason, LostReason::Revoked(vec!["app/x".into()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_longer_than_one_request_are_looped_and_report_the_queue() {
    let server = holdfast_server::start(ServerConfig::ephemeral_memory())
        .await
        .unwrap();
    // Requests may wait 300 ms here (60 s against a real server).
    let client = Client::builder()
        .base_url(server.base_url())
        .server_wait_max(Duration::from_millis(300))
        .build()
        .unwrap();
    let g1 = client
        .lock("it/long")
        .holder("first")
        .acquire()
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let c2 = client.clone();
    let waiter = tokio::spawn(async move {
        c2.lock("it/long")
            .holder("second")
            .wait(Duration::from_secs(50))
            .on_progress(move |p| {
                let _ = tx.send(p.clone());
            })
            .acquire()
            .await
    });
    let p = rx.recv().await.unwrap();
    assert_eq!(
        p.phase,
        holdfast_client::Phase::Queued {
            wait: Duration::from_secs(50)
        }
    );
    assert_eq!(p.holders[0].holder, "first");
    // Several per-request waits ran out on the server, and the client queued again each time.
    assert!(
        eventually(600, || async {
            client.stats().await.unwrap().timeouts_total >= 3
        })
        .await
    );
    assert!(!waiter.is_finished());
    g1.release().await.unwrap();
    let g2 = waiter
        .await
        .unwrap()
        .expect("granted after the per-request waits were looped");
    assert_eq!(holders(&client, "it/long").await, vec!["second"]);
    g2.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_acquisition_detects_deadlock_and_extends_the_guard() {
    let (_server, client) = server().await;
    let a = client.lock("it/dl/1").holder("a").acquire().await.unwrap();
    let b = Arc::new(client.lock("it/dl/2").holder("b").acquire().await.unwrap());
    // a waits for b's key...
    let a_wait = tokio::spawn(async move {
        let token = a.add_key("it/dl/2", Duration::from_secs(30)).await;
        (a, token)
    });
    assert!(
        eventually(100, || async {
            !client
                .lock_state("it/dl/2")
                .await
                .unwrap()
                .waiters
                .is_empty()
        })
        .await
    );
    // ...so b waiting for a's key would close a cycle: b is refused at once.
    let err = b
        .add_key("it/dl/1", Duration::from_secs(30))
        .await
        .unwrap_err();
    match &err {
        ClientError::Deadlock { cycle, .. } => assert!(
            cycle.contains(&"a".to_owned()) && cycle.contains(&"b".to_owned()),
            "{cycle:?}"
        ),
        other => panic!("expected Deadlock, got {other:?}"),
    }
    Arc::into_inner(b).unwrap().release().await.unwrap();
    let (a, token) = a_wait.await.unwrap();
    let token = token.unwrap();
    assert_eq!(a.fencing_tokens().len(), 2);
    assert_eq!(a.fencing_tokens()[1], ("it/dl/2".to_owned(), token));
    a.release().await.unwrap();
    assert!(holders(&client, "it/dl/1").await.is_empty());
    assert!(holders(&client, "it/dl/2").await.is_empty());
}
