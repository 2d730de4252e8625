//! The wire protocol, spoken byte by byte by a raw TCP client: framing, hello, every op, the
//! same error codes as HTTP, multiplexing (a waiting request does not block the others),
//! cancel, disconnects, limits and auth.

use std::time::Duration;

use holdfast_api::wire::{self, Op, compact};
use holdfast_api::{CreateLeaseRequest, LeaseResponse, LockRequest};
use holdfast_server::ServerConfig;
use holdfast_server::auth::hash_secret;
use holdfast_server::config::{Role, TokenConfig};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::TestServer;

/// A raw wire connection.
struct Raw {
    stream: TcpStream,
}

/// One answer: id, status, JSON body (`Null` for a compact one: see `raw`).
#[derive(Debug)]
struct Answer {
    id: u64,
    status: u16,
    body: Value,
    raw: Vec<u8>,
}

impl Raw {
    async fn connect(s: &TestServer) -> Self {
        let addr = s
            .server
            .as_ref()
            .and_then(|srv| srv.wire_addr)
            .expect("wire listener enabled");
        let stream = TcpStream::connect(addr).await.expect("connect");
        Self { stream }
    }

    /// Connect and say hello (open mode).
    async fn hello(s: &TestServer) -> Self {
        let mut raw = Self::connect(s).await;
        let a = raw.call(0, Op::Hello, json!({"protocol": 1})).await;
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.body["protocol"], 1);
        raw
    }

    async fn send_bytes(&mut self, id: u64, op: u8, body: &[u8]) {
        self.try_send_bytes(id, op, body).await.expect("write");
    }

    /// Like `send_bytes`, but a connection the server already closed is not a failure.
    async fn try_send_bytes(&mut self, id: u64, op: u8, body: &[u8]) -> std::io::Result<()> {
        let mut frame = Vec::new();
        let len = u32::try_from(wire::REQUEST_HEADER_BYTES + body.len()).unwrap();
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&id.to_be_bytes());
        frame.push(op);
        frame.extend_from_slice(body);
        self.stream.write_all(&frame).await
    }

    async fn send(&mut self, id: u64, op: Op, body: Value) {
        let bytes = serde_json::to_vec(&body).unwrap();
        self.send_bytes(id, op as u8, &bytes).await;
    }

    /// The next answer; `None` once the server closed the connection.
    async fn next(&mut self) -> Option<Answer> {
        let read = async {
            let mut len = [0u8; 4];
            self.stream.read_exact(&mut len).await.ok()?;
            let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
            self.stream.read_exact(&mut payload).await.ok()?;
            let parts = wire::parse_response(&payload).expect("response header");
            Some(Answer {
                id: parts.id,
                status: parts.status,
                body: serde_json::from_slice(parts.body).unwrap_or(Value::Null),
                raw: parts.body.to_vec(),
            })
        };
        tokio::time::timeout(Duration::from_secs(60), read)
            .await
            .expect("an answer or a close within 60 s")
    }

    async fn answer(&mut self) -> Answer {
        self.next()
            .await
            .expect("an answer, not a closed connection")
    }

    async fn call(&mut self, id: u64, op: Op, body: Value) -> Answer {
        self.send(id, op, body).await;
        let a = self.answer().await;
        assert_eq!(a.id, id, "answer to the request asked: {a:?}");
        a
    }

    async fn call_bytes(&mut self, id: u64, op: Op, body: &[u8]) -> Answer {
        self.send_bytes(id, op as u8, body).await;
        let a = self.answer().await;
        assert_eq!(a.id, id, "answer to the request asked: {a:?}");
        a
    }

    /// `create_lease_compact` of `request`.
    async fn create_compact(&mut self, id: u64, request: &CreateLeaseRequest) -> Answer {
        self.call_bytes(id, Op::CreateLeaseCompact, &compact_body(request))
            .await
    }

    async fn assert_closed(&mut self) {
        assert!(self.next().await.is_none(), "connection should be closed");
    }
}

fn create(holder: &str, key: &str, wait_ms: u64) -> Value {
    json!({"holder": holder, "wait_ms": wait_ms, "locks": [{"key": key}]})
}

#[track_caller]
fn assert_code(a: &Answer, status: u16, code: &str) {
    assert_eq!(a.status, status, "status of {a:?}");
    assert_eq!(a.body["error"], code, "code of {a:?}");
    assert!(
        a.body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "message of {a:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lives_its_whole_life_over_the_wire() {
    let s = TestServer::memory().await;
    let mut c = Raw::hello(&s).await;

    let a = c
        .call(1, Op::CreateLease, create("alice", "wire/a", 0))
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    let lease = a.body["lease_id"].as_str().unwrap().to_owned();
    assert_eq!(a.body["holder"], "alice");
    let token = a.body["locks"][0]["fencing_token"].as_u64().unwrap();
    assert!(token > 0);
    // HTTP sees the same state.
    assert_eq!(s.holders("wire/a").await, 1);

    // A second holder is refused with the same code and details as over HTTP.
    let a = c.call(2, Op::CreateLease, create("bob", "wire/a", 0)).await;
    assert_code(&a, 409, "lock_held");
    assert_eq!(a.body["key"], "wire/a");
    assert_eq!(a.body["holders"][0]["holder"], "alice");

    let a = c
        .call(
            3,
            Op::AddLocks,
            json!({"lease_id": lease, "locks": [{"key": "wire/b"}]}),
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["locks"].as_array().unwrap().len(), 2);

    let a = c
        .call(4, Op::Renew, json!({"lease_id": lease, "ttl_ms": 60_000}))
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["ttl_ms"], 60_000);

    let a = c.call(5, Op::GetLease, json!({"lease_id": lease})).await;
    assert_eq!(a.status, 200, "{a:?}");

    let a = c
        .call(
            6,
            Op::ReleaseLock,
            json!({"lease_id": lease, "key": "wire/b"}),
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(s.holders("wire/b").await, 0);

    let a = c
        .call(7, Op::ReleaseLease, json!({"lease_id": lease}))
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(s.holders("wire/a").await, 0);

    let a = c.call(8, Op::GetLease, json!({"lease_id": lease})).await;
    assert_code(&a, 404, "lease_not_found");
    let a = c.call(9, Op::Ping, json!({})).await;
    assert_eq!(a.status, 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_release_answers_an_empty_object_and_is_offered_at_hello() {
    let s = TestServer::memory().await;
    let mut c = Raw::connect(&s).await;
    let a = c.call(0, Op::Hello, json!({"protocol": 1})).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        a.body["features"],
        json!([wire::FEATURE_QUIET_RELEASE, wire::FEATURE_COMPACT_LEASES])
    );

    let created = c
        .call(1, Op::CreateLease, create("alice", "quiet/a", 0))
        .await;
    let lease = created.body["lease_id"].as_str().unwrap().to_owned();
    let quiet = json!({"lease_id": lease, "quiet": true});
    let a = c.call(2, Op::ReleaseLease, quiet.clone()).await;
    assert_eq!((a.status, &a.body), (200, &json!({})), "{a:?}");
    assert_eq!(s.holders("quiet/a").await, 0);
    // Its errors are a loud release's: the lease is gone now; a bad flag names the field.
    let a = c.call(3, Op::ReleaseLease, quiet).await;
    assert_code(&a, 404, "lease_not_found");
    let a = c
        .call(
            4,
            Op::ReleaseLease,
            json!({"lease_id": lease, "quiet": "yes"}),
        )
        .await;
    assert_code(&a, 400, "invalid_request");
    assert_eq!(a.body["field"], "quiet", "{a:?}");
    // `quiet: false` is a loud release: the lease comes back.
    let created = c
        .call(5, Op::CreateLease, create("alice", "quiet/b", 0))
        .await;
    let lease = created.body["lease_id"].as_str().unwrap().to_owned();
    let a = c
        .call(
            6,
            Op::ReleaseLease,
            json!({"lease_id": lease, "quiet": false}),
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["lease_id"], lease.as_str());
    assert_eq!(a.body["locks"][0]["key"], "quiet/b");
    s.shutdown().await;
}

fn compact_create(holder: &str, key: &str, wait_ms: u64) -> CreateLeaseRequest {
    CreateLeaseRequest {
        holder: holder.to_owned(),
        ttl_ms: Some(20_000),
        wait_ms: Some(wait_ms),
        reason: Some("nightly import".to_owned()),
        metadata: json!({"job": 7}).as_object().cloned(),
        reentrant: None,
        locks: vec![LockRequest::exclusive(key)],
    }
}

fn compact_body(request: &CreateLeaseRequest) -> Vec<u8> {
    compact::encode_into(&compact::CreateLease::of(request), Vec::new()).unwrap()
}

#[track_caller]
fn compact_lease(a: &Answer) -> LeaseResponse {
    assert_eq!(a.status, 200, "{a:?}");
    compact::decode::<compact::Lease<'_>>(&a.raw)
        .and_then(compact::Lease::into_response)
        .expect("a compact lease")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_create_and_release_do_what_their_json_ops_do() {
    let s = TestServer::memory().await;
    let mut c = Raw::hello(&s).await;

    let a = c
        .create_compact(1, &compact_create("alice", "compact/a", 0))
        .await;
    let lease = compact_lease(&a);
    assert_eq!(lease.holder, "alice");
    assert_eq!(lease.ttl_ms, 20_000);
    assert_eq!(lease.reason.as_deref(), Some("nightly import"));
    assert_eq!(lease.metadata, json!({"job": 7}).as_object().cloned());
    assert_eq!(lease.locks.len(), 1);
    assert_eq!(lease.locks[0].key, "compact/a");
    assert!(lease.locks[0].fencing_token > 0);
    // The JSON ops see the same lease.
    let a = c
        .call(2, Op::GetLease, json!({"lease_id": lease.lease_id}))
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        a.body["locks"][0]["fencing_token"],
        lease.locks[0].fencing_token
    );

    // Refusals are the JSON op's, as JSON error bodies.
    let a = c
        .create_compact(3, &compact_create("bob", "compact/a", 0))
        .await;
    assert_code(&a, 409, "lock_held");
    assert_eq!(a.body["key"], "compact/a");
    // So are validation errors, with the field named.
    let a = c
        .create_compact(4, &compact_create("", "compact/b", 0))
        .await;
    assert_code(&a, 400, "invalid_request");
    assert_eq!(a.body["field"], "holder", "{a:?}");
    let bob = compact_create("bob", "compact/b", 0);
    let mut listed = compact::CreateLease::of(&bob);
    listed.metadata = Some("[1]".into());
    let body = compact::encode_into(&listed, Vec::new()).unwrap();
    let a = c.call_bytes(5, Op::CreateLeaseCompact, &body).await;
    assert_code(&a, 400, "invalid_request");
    assert_eq!(a.body["field"], "metadata", "{a:?}");
    // A body that is not the compact encoding (JSON, say) names the body; the connection
    // stays usable.
    let json = serde_json::to_vec(&create("bob", "compact/b", 0)).unwrap();
    let a = c.call_bytes(6, Op::CreateLeaseCompact, &json).await;
    assert_code(&a, 400, "invalid_request");
    assert_eq!(a.body["field"], "body", "{a:?}");
    assert_eq!(s.holders("compact/b").await, 0);

    // A waiting compact create is granted, compactly, when the holder releases compactly.
    let mut waiter = Raw::hello(&s).await;
    waiter
        .send_bytes(
            10,
            Op::CreateLeaseCompact as u8,
            &compact_body(&compact_create("carol", "compact/a", 30_000)),
        )
        .await;
    s.wait_for_waiters("compact/a", 1).await;
    let a = c
        .call_bytes(7, Op::ReleaseLeaseCompact, lease.lease_id.as_bytes())
        .await;
    assert_eq!((a.status, a.raw.len()), (200, 0), "{a:?}");
    let granted = compact_lease(&waiter.answer().await);
    assert_eq!(granted.holder, "carol");
    assert!(granted.locks[0].fencing_token > lease.locks[0].fencing_token);

    // A release's errors are the JSON release's.
    let a = c
        .call_bytes(8, Op::ReleaseLeaseCompact, lease.lease_id.as_bytes())
        .await;
    assert_code(&a, 404, "lease_not_found");
    for bad in [&b"not-a-lease"[..], &[0xff, 0xfe][..]] {
        let a = c.call_bytes(9, Op::ReleaseLeaseCompact, bad).await;
        assert_code(&a, 400, "invalid_request");
        assert_eq!(a.body["field"], "lease_id", "{a:?}");
    }
    let a = waiter
        .call_bytes(11, Op::ReleaseLeaseCompact, granted.lease_id.as_bytes())
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(s.holders("compact/a").await, 0);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_named_errors_and_only_unrecoverable_ones_close() {
    let s = TestServer::memory().await;

    // Anything before hello: refused and closed.
    let mut c = Raw::connect(&s).await;
    let a = c.call(1, Op::Ping, json!({})).await;
    assert_code(&a, 400, "invalid_request");
    assert!(a.body["message"].as_str().unwrap().contains("hello"));
    c.assert_closed().await;

    // A version this server does not speak.
    let mut c = Raw::connect(&s).await;
    let a = c.call(1, Op::Hello, json!({"protocol": 99})).await;
    assert_code(&a, 400, "invalid_request");
    assert_eq!(a.body["field"], "protocol");
    c.assert_closed().await;

    let mut c = Raw::hello(&s).await;
    // Unknown op: named, connection stays usable.
    c.send_bytes(2, 0x7f, b"{}").await;
    let a = c.answer().await;
    assert_eq!(a.id, 2);
    assert_code(&a, 400, "invalid_request");
    assert_eq!(a.body["field"], "op");
    // A body error names the field, like the HTTP API.
    let a = c
        .call(
            3,
            Op::CreateLease,
            json!({"holder": "h", "locks": [{"key": "k", "mode": "sideways"}]}),
        )
        .await;
    assert_code(&a, 400, "invalid_request");
    assert_eq!(a.body["field"], "locks[0].mode", "{a:?}");
    let a = c.call(4, Op::CreateLease, json!({"holder": "h"})).await;
    assert_code(&a, 400, "invalid_request");
    assert_eq!(a.body["field"], "locks", "{a:?}");
    c.send_bytes(5, Op::Renew as u8, b"").await;
    let a = c.answer().await;
    assert_code(&a, 400, "invalid_request");
    c.send_bytes(6, Op::Renew as u8, b"{not json").await;
    let a = c.answer().await;
    assert_code(&a, 400, "invalid_request");
    let a = c.call(7, Op::GetLease, json!({"lease_id": "xyz"})).await;
    assert_code(&a, 400, "invalid_request");
    let a = c.call(8, Op::Ping, json!({})).await;
    assert_eq!(a.status, 200, "still usable: {a:?}");

    // A frame over the body limit: 413 and closed (the stream cannot be resynchronised).
    let huge = vec![b' '; 70 * 1024];
    c.send_bytes(9, Op::Ping as u8, &huge).await;
    let a = c.answer().await;
    assert_eq!(a.id, 9);
    assert_code(&a, 413, "payload_too_large");
    c.assert_closed().await;

    // A frame too short to hold a header.
    let mut c = Raw::hello(&s).await;
    c.stream.write_all(&3u32.to_be_bytes()).await.unwrap();
    c.stream.write_all(&[1, 2, 3]).await.unwrap();
    let a = c.answer().await;
    assert_code(&a, 400, "invalid_request");
    c.assert_closed().await;

    // The server is unharmed.
    let mut c = Raw::hello(&s).await;
    let a = c
        .call(1, Op::CreateLease, create("h", "still/fine", 0))
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_request_does_not_hold_up_the_others_on_its_connection() {
    let s = TestServer::memory().await;
    let mut holder = Raw::hello(&s).await;
    let a = holder.call(1, Op::CreateLease, create("a", "hot", 0)).await;
    let lease = a.body["lease_id"].as_str().unwrap().to_owned();

    let mut c = Raw::hello(&s).await;
    c.send(10, Op::CreateLease, create("b", "hot", 30_000))
        .await;
    s.wait_for_waiters("hot", 1).await;
    // Requests behind the waiting one are answered first.
    for id in 11..16 {
        let a = c
            .call(id, Op::CreateLease, create("b", &format!("free/{id}"), 0))
            .await;
        assert_eq!(a.status, 200, "{a:?}");
    }
    let a = holder
        .call(2, Op::ReleaseLease, json!({"lease_id": lease}))
        .await;
    assert_eq!(a.status, 200);
    let a = c.answer().await;
    assert_eq!(a.id, 10);
    assert_eq!(a.status, 200, "the waiter is granted: {a:?}");
    assert_eq!(a.body["holder"], "b");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_disconnect_take_a_waiter_out_of_the_queue() {
    let s = TestServer::memory().await;
    let mut holder = Raw::hello(&s).await;
    let a = holder.call(1, Op::CreateLease, create("a", "q", 0)).await;
    let lease = a.body["lease_id"].as_str().unwrap().to_owned();

    // Cancel: the cancelled request is answered (no grant), the cancel too.
    let mut c = Raw::hello(&s).await;
    c.send(5, Op::CreateLease, create("b", "q", 30_000)).await;
    s.wait_for_waiters("q", 1).await;
    c.send(6, Op::Cancel, json!({"id": 5})).await;
    let mut answers = [c.answer().await, c.answer().await];
    answers.sort_by_key(|a| a.id);
    assert_eq!(answers[0].id, 5);
    assert_code(&answers[0], 409, "wait_timeout");
    assert_eq!(answers[1].id, 6);
    assert_eq!(answers[1].status, 200);
    s.wait_for_waiters("q", 0).await;
    // Cancelling something unknown or finished is harmless.
    let a = c.call(7, Op::Cancel, json!({"id": 5})).await;
    assert_eq!(a.status, 200);

    // Disconnect: the waiter leaves the queue and is never granted.
    let mut d = Raw::hello(&s).await;
    d.send(1, Op::CreateLease, create("c", "q", 30_000)).await;
    s.wait_for_waiters("q", 1).await;
    drop(d);
    s.wait_for_waiters("q", 0).await;

    let a = holder
        .call(2, Op::ReleaseLease, json!({"lease_id": lease}))
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        s.holders("q").await,
        0,
        "no one was granted the released key"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pipelined_requests_each_get_exactly_one_answer() {
    let s = TestServer::memory().await;
    let mut c = Raw::hello(&s).await;
    let n = 500u64;
    // Write them all before reading anything: the server batches answers.
    for id in 1..=n {
        c.send(
            id,
            Op::CreateLease,
            create(&format!("p{id}"), &format!("pipe/{}", id % 50), 0),
        )
        .await;
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut granted = 0;
    for _ in 0..n {
        let a = c.answer().await;
        assert!(seen.insert(a.id), "answered twice: {}", a.id);
        match a.status {
            200 => granted += 1,
            409 => assert_eq!(a.body["error"], "lock_held"),
            other => panic!("unexpected {other}: {a:?}"),
        }
    }
    assert_eq!(seen.len() as u64, n);
    assert_eq!(granted, 50, "one grant per distinct key");
    s.shutdown().await;
}

fn token(name: &str, role: Role, secret: &str, prefixes: Option<&[&str]>) -> TokenConfig {
    TokenConfig {
        name: name.into(),
        role,
        sha256: hash_secret(secret),
        prefixes: prefixes.map(|p| p.iter().map(|s| (*s).to_owned()).collect()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_at_hello_and_rules_apply_to_every_op() {
    let mut config = ServerConfig::ephemeral_memory();
    config.tokens = vec![
        token("clinic", Role::Client, "clinic-secret", Some(&["clinic/"])),
        token("other", Role::Client, "other-secret", None),
        token("viewer", Role::Reader, "reader-secret", None),
    ];
    let s = TestServer::start(config).await;

    for hello in [
        json!({"protocol": 1}),
        json!({"protocol": 1, "token": "wrong"}),
    ] {
        let mut c = Raw::connect(&s).await;
        let a = c.call(1, Op::Hello, hello).await;
        assert_code(&a, 401, "unauthorized");
        c.assert_closed().await;
    }

    let mut clinic = Raw::connect(&s).await;
    let a = clinic
        .call(
            1,
            Op::Hello,
            json!({"protocol": 1, "token": "clinic-secret"}),
        )
        .await;
    assert_eq!(a.status, 200);
    let a = clinic
        .call(2, Op::CreateLease, create("h", "billing/x", 0))
        .await;
    assert_code(&a, 403, "forbidden");
    // The compact create is held to the same prefixes.
    let a = clinic
        .create_compact(5, &compact_create("h", "billing/z", 0))
        .await;
    assert_code(&a, 403, "forbidden");
    let a = clinic
        .call(3, Op::CreateLease, create("h", "clinic/x", 0))
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    let lease = a.body["lease_id"].as_str().unwrap().to_owned();

    // Another token cannot see, renew or release it.
    let mut other = Raw::connect(&s).await;
    other
        .call(
            1,
            Op::Hello,
            json!({"protocol": 1, "token": "other-secret"}),
        )
        .await;
    for (id, op) in [(2, Op::Renew), (3, Op::ReleaseLease), (4, Op::GetLease)] {
        let a = other.call(id, op, json!({"lease_id": lease})).await;
        assert_code(&a, 404, "lease_not_found");
    }
    let a = other
        .call_bytes(5, Op::ReleaseLeaseCompact, lease.as_bytes())
        .await;
    assert_code(&a, 404, "lease_not_found");
    // A reader cannot write.
    let mut viewer = Raw::connect(&s).await;
    viewer
        .call(
            1,
            Op::Hello,
            json!({"protocol": 1, "token": "reader-secret"}),
        )
        .await;
    let a = viewer
        .call(2, Op::CreateLease, create("h", "clinic/y", 0))
        .await;
    assert_code(&a, 403, "forbidden");
    let a = viewer
        .create_compact(3, &compact_create("h", "clinic/y", 0))
        .await;
    assert_code(&a, 403, "forbidden");
    let a = viewer
        .call_bytes(4, Op::ReleaseLeaseCompact, lease.as_bytes())
        .await;
    assert_code(&a, 403, "forbidden");

    let a = clinic
        .call(4, Op::ReleaseLease, json!({"lease_id": lease}))
        .await;
    assert_eq!(a.status, 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_told_so_and_closed() {
    let mut config = ServerConfig::ephemeral_memory();
    config.limits.wire_connections_max = 2;
    let s = TestServer::start(config).await;
    let _a = Raw::hello(&s).await;
    let _b = Raw::hello(&s).await;
    let mut c = Raw::connect(&s).await;
    let a = c.answer().await;
    assert_eq!(a.id, 0);
    assert_code(&a, 503, "overloaded");
    c.assert_closed().await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_a_waiting_request_before_closing() {
    let s = TestServer::memory().await;
    let mut holder = Raw::hello(&s).await;
    holder.call(1, Op::CreateLease, create("a", "sd", 0)).await;
    let mut c = Raw::hello(&s).await;
    c.send(1, Op::CreateLease, create("b", "sd", 30_000)).await;
    s.wait_for_waiters("sd", 1).await;
    let server = s.handle();
    let stop = tokio::spawn(s.shutdown());
    let a = c.answer().await;
    assert_eq!(a.id, 1);
    assert_code(&a, 503, "overloaded");
    c.assert_closed().await;
    stop.await.unwrap();
    drop(server);
}

/// One fuzzed frame: an op byte (valid or not) and a body (random bytes, random JSON, or a
/// valid body with one member replaced, removed or added).
#[derive(Debug, Clone)]
struct FuzzFrame {
    op: u8,
    body: Vec<u8>,
}

fn fuzz_frame() -> impl proptest::strategy::Strategy<Value = FuzzFrame> {
    use proptest::prelude::*;
    let ops = prop_oneof![
        4 => proptest::sample::select(Op::ALL.iter().map(|op| *op as u8).collect::<Vec<_>>()),
        1 => any::<u8>(),
    ];
    let mut templates = crate::fuzz::templates();
    templates.extend([
        json!({"protocol": 1}),
        json!({"lease_id": "0123456789abcdef0123456789abcdef", "key": "f/a"}),
        json!({"lease_id": "0123456789abcdef0123456789abcdef", "wait_ms": 10, "locks": [{"key": "f/z"}]}),
        json!({"id": 3}),
    ]);
    let n = templates.len();
    let plain: Vec<Vec<u8>> = templates
        .iter()
        .map(|t| serde_json::to_vec(t).unwrap())
        .collect();
    // Compact create bodies (valid, then with one byte changed or cut short) and lease ids,
    // for the compact ops.
    let compact_bodies: Vec<Vec<u8>> = vec![
        compact_body(&compact_create("f", "f/a", 0)),
        compact_body(&compact_create("f", "f/b", 10)),
        b"0123456789abcdef0123456789abcdef".to_vec(),
    ];
    let compact = (
        proptest::sample::select(compact_bodies),
        any::<usize>(),
        any::<u8>(),
        0usize..3,
    )
        .prop_map(|(mut body, at, byte, how)| {
            let at = at % body.len();
            match how {
                0 => {}
                1 => body[at] = byte,
                _ => body.truncate(at),
            }
            body
        });
    let bodies = prop_oneof![
        proptest::sample::select(plain),
        compact,
        proptest::collection::vec(any::<u8>(), 0..120),
        crate::fuzz::json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        (0..n, 0usize..12, any::<u8>(), crate::fuzz::json_value()).prop_map(move |(t, c, a, r)| {
            serde_json::to_vec(&crate::fuzz::mutate(templates[t].clone(), c, a, r)).unwrap()
        }),
    ];
    (ops, bodies).prop_map(|(op, body)| FuzzFrame { op, body })
}

/// Random frame sequences, with and without hello: every answer is a JSON error below 500
/// (503 `overloaded` aside) or a success, each request is answered at most once, and the
/// server keeps serving.
#[test]
fn malformed_wire_frames_never_get_a_5xx() {
    use proptest::test_runner::{Config, TestRunner};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut config = ServerConfig::ephemeral_memory();
    // Short waits keep random valid requests from long-polling.
    config.limits.engine.wait_ms_max = 50;
    let s = rt.block_on(TestServer::start(config));
    let cases: u32 = std::env::var("HOLDFAST_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        proptest::bool::weighted(0.9),
        proptest::collection::vec(fuzz_frame(), 1..8),
    );
    let statuses = std::sync::Mutex::new(std::collections::BTreeMap::<u16, u64>::new());
    runner
        .run(&strategy, |(hello, frames)| {
            let result: Result<(), String> = rt.block_on(async {
                let mut c = if hello {
                    Raw::hello(&s).await
                } else {
                    Raw::connect(&s).await
                };
                for (i, f) in frames.iter().enumerate() {
                    // The server closes after an unrecoverable frame (no hello, bad hello).
                    if c.try_send_bytes(i as u64 + 1, f.op, &f.body).await.is_err() {
                        break;
                    }
                }
                let mut seen = std::collections::BTreeSet::new();
                while seen.len() < frames.len() {
                    let Some(a) = c.next().await else { break };
                    *statuses.lock().unwrap().entry(a.status).or_default() += 1;
                    if a.status >= 500 && a.status != 503 {
                        return Err(format!("{a:?} for {frames:?}"));
                    }
                    if a.status != 200
                        && !(a.body["error"].is_string()
                            && a.body["message"].as_str().is_some_and(|m| !m.is_empty()))
                    {
                        return Err(format!("error without code/message: {a:?}"));
                    }
                    if !seen.insert(a.id) {
                        return Err(format!("request {} answered twice", a.id));
                    }
                }
                Ok(())
            });
            result.map_err(proptest::test_runner::TestCaseError::fail)
        })
        .unwrap();
    let statuses = statuses.into_inner().unwrap();
    // Still serving, and the fuzz reached the operations, not only the frame checks.
    rt.block_on(async {
        let mut c = Raw::hello(&s).await;
        let a = c
            .call(1, Op::CreateLease, create("after", "after/fuzz", 0))
            .await;
        assert_eq!(a.status, 200, "{a:?}");
    });
    assert!(
        statuses.get(&200).is_some_and(|n| *n > 0),
        "no request succeeded: {statuses:?}"
    );
    assert!(
        statuses.keys().any(|s| *s == 404 || *s == 409),
        "no request reached the engine: {statuses:?}"
    );
    rt.block_on(s.shutdown());
}
