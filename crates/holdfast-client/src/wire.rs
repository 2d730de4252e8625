//! The wire-protocol transport (see [`holdfast_api::wire`]): one TCP connection per
//! [`crate::Client`] (shared by its clones), multiplexed by request id.
//!
//! A caller encodes its frame, writes it under the writer lock and awaits its answer on a
//! oneshot; one reader task per connection routes answers by id. The connection is opened
//! lazily (with the `hello` handshake) and reopened by the next call after it breaks; calls
//! in flight when it breaks fail with `Unreachable`.
//!
//! Dropping a call's future while it waits marks the request *orphaned* and sends `cancel`:
//! the server takes it out of the lock's queue. If the grant won the race, its answer still
//! arrives; the reader then releases what was granted, so an abandoned acquisition never holds
//! a lock until its TTL.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use holdfast_api::wire::{self, Op};
use holdfast_api::{CreateLeaseRequest, ErrorBody, LeaseResponse};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;

use crate::error::ClientError;

/// What to release if an orphaned request turns out to have been granted.
#[derive(Debug, Clone)]
pub(crate) enum Undo {
    /// Nothing (not an acquisition).
    Nothing,
    /// The new lease in the answer.
    Lease,
    /// The new lease in a compact answer.
    CompactLease,
    /// These keys of the lease (added to an existing lease: one release each).
    Locks(String, Vec<String>),
}

/// One answer frame: the whole payload, whose body starts after the header (no copy).
struct Answer {
    status: u16,
    payload: Vec<u8>,
}

impl Answer {
    fn body(&self) -> &[u8] {
        &self.payload[wire::RESPONSE_HEADER_BYTES..]
    }
}

enum Waiter {
    Caller(oneshot::Sender<Answer>, Undo),
    Orphan(Undo),
}

#[derive(Default)]
struct Table {
    waiters: HashMap<u64, Waiter>,
    /// Why the connection is unusable, once it is.
    broken: Option<String>,
}

struct Conn {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    table: Mutex<Table>,
    next_id: AtomicU64,
    addr: String,
    /// The server said at hello that it answers a quiet release with `{}`.
    quiet_release: bool,
    /// The server said at hello that it speaks the compact create and release ops.
    compact_leases: bool,
}

impl Conn {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts and
        // removes), so a poisoned lock is still usable.
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn is_broken(&self) -> bool {
        self.table().broken.is_some()
    }

    /// Mark broken and fail every caller (their senders are dropped).
    fn break_with(&self, why: String) {
        let mut t = self.table();
        if t.broken.is_none() {
            t.broken = Some(why);
        }
        t.waiters.clear();
    }

    async fn write(&self, frame: &[u8]) -> Result<(), ClientError> {
        let mut w = self.writer.lock().await;
        if let Err(e) = w.write_all(frame).await {
            drop(w);
            self.break_with(format!("write failed: {e}"));
            return Err(self.unreachable(&format!("write failed: {e}")));
        }
        Ok(())
    }

    fn unreachable(&self, message: &str) -> ClientError {
        ClientError::Unreachable {
            url: format!("holdfast-wire://{}", self.addr),
            message: message.to_owned(),
        }
    }

    /// Send a request nobody awaits (a release of an orphaned grant, a cancel).
    fn send_detached(self: &Arc<Self>, op: Op, body: Vec<u8>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut t = self.table();
            if t.broken.is_some() {
                return;
            }
            t.waiters.insert(id, Waiter::Orphan(Undo::Nothing));
        }
        let mut frame =
            Vec::with_capacity(wire::LENGTH_BYTES + wire::REQUEST_HEADER_BYTES + body.len());
        wire::encode_request(&mut frame, id, op, &body);
        let conn = Arc::clone(self);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = conn.write(&frame).await;
            });
        }
    }

    /// Append the body of a release whose answer nobody reads to `out`, in the cheapest form
    /// the server takes (compact, else quiet where offered, else plain JSON); returns its op.
    fn write_release(&self, lease_id: &str, out: &mut Vec<u8>) -> Result<Op, ClientError> {
        if self.compact_leases {
            out.extend_from_slice(lease_id.as_bytes());
            return Ok(Op::ReleaseLeaseCompact);
        }
        let body = wire::ReleaseLease {
            lease_id: lease_id.to_owned(),
            quiet: self.quiet_release,
        };
        write_json(out, &body)?;
        Ok(Op::ReleaseLease)
    }

    /// Release a lease nobody waits for.
    fn release_detached(self: &Arc<Self>, lease_id: &str) {
        tracing::debug!("releasing the lease of an abandoned acquisition");
        let mut body = Vec::new();
        if let Ok(op) = self.write_release(lease_id, &mut body) {
            self.send_detached(op, body);
        }
    }

    /// An orphaned acquisition was granted: give it back.
    fn release_orphan(self: &Arc<Self>, undo: &Undo, body: &[u8]) {
        match undo {
            Undo::Nothing => {}
            Undo::Lease => {
                if let Ok(lease) = serde_json::from_slice::<LeaseResponse>(body) {
                    self.release_detached(&lease.lease_id);
                }
            }
            Undo::CompactLease => {
                if let Ok(lease) = wire::compact::decode::<wire::compact::Lease<'_>>(body) {
                    self.release_detached(&lease.lease_id);
                }
            }
            Undo::Locks(lease_id, keys) => {
                for key in keys {
                    if let Ok(json) = serde_json::to_vec(&wire::ReleaseLock {
                        lease_id: lease_id.clone(),
                        key: key.clone(),
                    }) {
                        self.send_detached(Op::ReleaseLock, json);
                    }
                }
            }
        }
    }
}

/// Reads answers and routes them to their callers until the connection ends.
async fn read_answers(conn: Arc<Conn>, read: OwnedReadHalf) {
    // Buffered: a whole frame (and often several) in one read system call.
    let mut read = tokio::io::BufReader::with_capacity(16 * 1024, read);
    let why = loop {
        let payload = match read_frame(&mut read).await {
            Ok(p) => p,
            Err(e) => break e,
        };
        let (id, status) = match wire::parse_response(&payload) {
            Ok(p) => (p.id, p.status),
            Err(e) => break e,
        };
        let waiter = conn.table().waiters.remove(&id);
        let answer = Answer { status, payload };
        match waiter {
            Some(Waiter::Caller(tx, undo)) => {
                if let Err(answer) = tx.send(answer)
                    && answer.status == 200
                {
                    conn.release_orphan(&undo, answer.body());
                }
            }
            Some(Waiter::Orphan(undo)) if answer.status == 200 => {
                conn.release_orphan(&undo, answer.body());
            }
            Some(Waiter::Orphan(_)) => {}
            None if id == 0 && answer.status != 200 => {
                // A connection-level refusal (e.g. too many connections).
                let body = serde_json::from_slice::<ErrorBody>(answer.body()).ok();
                break body.map_or_else(
                    || format!("server closed the connection (status {})", answer.status),
                    |b| b.message,
                );
            }
            None => {}
        }
    };
    conn.break_with(why);
}

async fn read_frame<R: AsyncRead + Unpin>(read: &mut R) -> Result<Vec<u8>, String> {
    let mut len = [0u8; wire::LENGTH_BYTES];
    read.read_exact(&mut len)
        .await
        .map_err(|e| format!("connection closed: {e}"))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > wire::FRAME_BYTES_MAX {
        return Err(format!("answer frame of {len} bytes is over the limit"));
    }
    let mut payload = vec![0u8; len];
    read.read_exact(&mut payload)
        .await
        .map_err(|e| format!("connection closed mid-frame: {e}"))?;
    Ok(payload)
}

/// Turns an unanswered call into an orphan (and cancels a wait) if its future is dropped.
struct OrphanOnDrop<'a> {
    conn: &'a Arc<Conn>,
    id: u64,
    cancel: bool,
    armed: bool,
}

impl Drop for OrphanOnDrop<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let was_waiting = {
            let mut t = self.conn.table();
            match t.waiters.remove(&self.id) {
                Some(Waiter::Caller(_, undo)) => {
                    t.waiters.insert(self.id, Waiter::Orphan(undo));
                    true
                }
                other => {
                    if let Some(w) = other {
                        t.waiters.insert(self.id, w);
                    }
                    false
                }
            }
        };
        if was_waiting
            && self.cancel
            && let Ok(json) = serde_json::to_vec(&wire::Cancel { id: self.id })
        {
            self.conn.send_detached(Op::Cancel, json);
        }
    }
}

/// The transport of one [`crate::Client`].
pub(crate) struct Wire {
    addr: String,
    token: Option<String>,
    connect_timeout: Duration,
    /// The open connection, read without waiting on every call.
    current: Mutex<Option<Arc<Conn>>>,
    /// Held while (re)connecting, so that concurrent callers open one connection, not many.
    connecting: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wire")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Wire {
    pub(crate) fn new(addr: String, token: Option<String>, connect_timeout: Duration) -> Self {
        Self {
            addr,
            token,
            connect_timeout,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    fn unreachable(&self, message: impl Into<String>) -> ClientError {
        ClientError::Unreachable {
            url: format!("holdfast-wire://{}", self.addr),
            message: message.into(),
        }
    }

    fn usable(&self) -> Option<Arc<Conn>> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .filter(|c| !c.is_broken())
            .cloned()
    }

    async fn connection(&self) -> Result<Arc<Conn>, ClientError> {
        if let Some(c) = self.usable() {
            return Ok(c);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(c) = self.usable() {
            return Ok(c);
        }
        let conn = self.connect().await?;
        *self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::clone(&conn));
        Ok(conn)
    }

    async fn connect(&self) -> Result<Arc<Conn>, ClientError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| self.unreachable("cannot connect: timed out"))?
            .map_err(|e| self.unreachable(format!("cannot connect: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (mut read, mut write) = stream.into_split();
        let hello = serde_json::to_vec(&wire::Hello {
            protocol: wire::PROTOCOL_VERSION,
            token: self.token.clone(),
        })
        .map_err(|e| self.unreachable(e.to_string()))?;
        let mut frame = Vec::new();
        wire::encode_request(&mut frame, 0, Op::Hello, &hello);
        let handshake = async {
            write
                .write_all(&frame)
                .await
                .map_err(|e| self.unreachable(format!("hello failed: {e}")))?;
            let payload = read_frame(&mut read)
                .await
                .map_err(|e| self.unreachable(format!("hello failed: {e}")))?;
            let parts = wire::parse_response(&payload).map_err(|e| self.unreachable(e))?;
            if parts.status != 200 {
                return Err(error_answer(parts.status, parts.body));
            }
            let hello_ok = serde_json::from_slice::<wire::HelloOk>(parts.body)
                .map_err(|e| self.unreachable(format!("unreadable answer to hello: {e}")))?;
            Ok(hello_ok.features)
        };
        let features = tokio::time::timeout(self.connect_timeout, handshake)
            .await
            .map_err(|_| self.unreachable("no answer to hello in time"))??;
        let conn = Arc::new(Conn {
            writer: tokio::sync::Mutex::new(write),
            table: Mutex::new(Table::default()),
            next_id: AtomicU64::new(1),
            addr: self.addr.clone(),
            quiet_release: features.iter().any(|f| f == wire::FEATURE_QUIET_RELEASE),
            compact_leases: features.iter().any(|f| f == wire::FEATURE_COMPACT_LEASES),
        });
        tokio::spawn(read_answers(Arc::clone(&conn), read));
        Ok(conn)
    }

    /// One request: `timeout` bounds the whole call (the caller adds any server-side wait).
    pub(crate) async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        op: Op,
        body: &B,
        undo: Undo,
        waits: bool,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let conn = self.connection().await?;
        self.call_json_on(&conn, op, body, undo, waits, timeout)
            .await
    }

    /// [`Wire::call`] on a connection already in hand.
    async fn call_json_on<B: Serialize, T: DeserializeOwned>(
        &self,
        conn: &Arc<Conn>,
        op: Op,
        body: &B,
        undo: Undo,
        waits: bool,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let mut frame = frame_header_room();
        write_json(&mut frame, body)?;
        let answer = self.call_on(conn, op, frame, undo, waits, timeout).await?;
        serde_json::from_slice(answer.body()).map_err(|e| self.unreadable(answer.status, &e))
    }

    fn unreadable(&self, status: u16, e: &dyn std::fmt::Display) -> ClientError {
        ClientError::Server {
            status,
            code: None,
            message: format!("unreadable answer from holdfast-wire://{}: {e}", self.addr),
        }
    }

    /// Create a lease: with the compact op where the server offers it, else as JSON.
    pub(crate) async fn create_lease(
        &self,
        request: &CreateLeaseRequest,
        timeout: Duration,
    ) -> Result<LeaseResponse, ClientError> {
        let waits = request.wait_ms.unwrap_or(0) > 0;
        let conn = self.connection().await?;
        if !conn.compact_leases {
            return self
                .call_json_on(&conn, Op::CreateLease, request, Undo::Lease, waits, timeout)
                .await;
        }
        let frame = wire::compact::encode_into(
            &wire::compact::CreateLease::of(request),
            frame_header_room(),
        )
        .map_err(|message| ClientError::Invalid {
            field: None,
            message,
        })?;
        let answer = self
            .call_on(
                &conn,
                Op::CreateLeaseCompact,
                frame,
                Undo::CompactLease,
                waits,
                timeout,
            )
            .await?;
        wire::compact::decode::<wire::compact::Lease<'_>>(answer.body())
            .and_then(wire::compact::Lease::into_response)
            .map_err(|e| self.unreadable(answer.status, &e))
    }

    /// Release a lease when only success matters (a guard): quietly where the server allows
    /// it (it then answers `{}` instead of the lease); the answer's body is not parsed either
    /// way.
    pub(crate) async fn release_quietly(
        &self,
        lease_id: &str,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        let conn = self.connection().await?;
        let mut frame = frame_header_room();
        let op = conn.write_release(lease_id, &mut frame)?;
        self.call_on(&conn, op, frame, Undo::Nothing, false, timeout)
            .await
            .map(|_| ())
    }

    /// Send one request on `conn` and wait for its answer; an answer other than 200 is the
    /// error it carries. `frame` is room for the header (see [`frame_header_room`]) and the
    /// body.
    async fn call_on(
        &self,
        conn: &Arc<Conn>,
        op: Op,
        mut frame: Vec<u8>,
        undo: Undo,
        waits: bool,
        timeout: Duration,
    ) -> Result<Answer, ClientError> {
        let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut t = conn.table();
            if let Some(why) = &t.broken {
                return Err(conn.unreachable(why));
            }
            t.waiters.insert(id, Waiter::Caller(tx, undo));
        }
        let mut guard = OrphanOnDrop {
            conn,
            id,
            cancel: waits,
            armed: true,
        };
        wire::finish_request(&mut frame, id, op);
        conn.write(&frame).await?;
        let answer = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => {
                guard.armed = false;
                let why = conn
                    .table()
                    .broken
                    .clone()
                    .unwrap_or_else(|| "connection closed".to_owned());
                return Err(conn.unreachable(&why));
            }
            // The guard orphans the request (and cancels a wait) as it drops.
            Err(_) => return Err(conn.unreachable("no answer in time")),
        };
        guard.armed = false;
        if answer.status != 200 {
            return Err(error_answer(answer.status, answer.body()));
        }
        Ok(answer)
    }
}

/// An empty request frame with room for its header, so that the body is written straight
/// after it (no second buffer, no copy).
fn frame_header_room() -> Vec<u8> {
    let mut frame = Vec::with_capacity(256);
    frame.resize(wire::LENGTH_BYTES + wire::REQUEST_HEADER_BYTES, 0);
    frame
}

/// Append `body` as JSON to `out`.
fn write_json<B: Serialize>(out: &mut Vec<u8>, body: &B) -> Result<(), ClientError> {
    serde_json::to_writer(out, body).map_err(|e| ClientError::Invalid {
        field: None,
        message: e.to_string(),
    })
}

fn error_answer(status: u16, body: &[u8]) -> ClientError {
    let raw = String::from_utf8_lossy(body);
    let parsed = serde_json::from_slice::<ErrorBody>(body).ok();
    ClientError::from_response(status, parsed, &raw, None)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use tokio::net::TcpListener;

    use super::*;

    fn lease(id: &str) -> LeaseResponse {
        LeaseResponse {
            lease_id: id.to_owned(),
            holder: "h".to_owned(),
            ttl_ms: 30_000,
            expires_at_ms: 1_000_030_000,
            remaining_ms: 30_000,
            reason: None,
            metadata: None,
            locks: vec![holdfast_api::HeldLock {
                key: "k".to_owned(),
                mode: holdfast_api::LockMode::Exclusive,
                limit: None,
                permits: None,
                fencing_token: 42,
                count: 1,
                acquired_at_ms: 1_000_000_000,
            }],
        }
    }

    /// A one-connection server: answers hello with `features`, then answers a create with
    /// the lease `lease(LEASE)` (compact for the compact op), anything else `200 {}`, and
    /// hands each request's (op, body) to the test.
    async fn fake_server(
        features: Vec<String>,
    ) -> (String, tokio::sync::mpsc::UnboundedReceiver<(u8, Vec<u8>)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            while let Ok(payload) = read_frame(&mut stream).await {
                let request = wire::parse_request(&payload).unwrap();
                let answer = if request.op == Op::Hello as u8 {
                    serde_json::to_vec(&wire::HelloOk {
                        protocol: wire::PROTOCOL_VERSION,
                        server: "fake".to_owned(),
                        features: features.clone(),
                    })
                    .unwrap()
                } else {
                    let _ = tx.send((request.op, request.body.to_vec()));
                    if request.op == Op::CreateLease as u8 {
                        serde_json::to_vec(&lease(LEASE)).unwrap()
                    } else if request.op == Op::CreateLeaseCompact as u8 {
                        let lease = lease(LEASE);
                        wire::compact::encode_into(&wire::compact::Lease::of(&lease), Vec::new())
                            .unwrap()
                    } else {
                        b"{}".to_vec()
                    }
                };
                let mut out = Vec::new();
                wire::encode_response(&mut out, request.id, 200, &answer);
                stream.write_all(&out).await.unwrap();
            }
        });
        (addr, rx)
    }

    const LEASE: &str = "0123456789abcdef0123456789abcdef";

    #[tokio::test]
    async fn a_release_is_quiet_or_compact_only_for_a_server_that_offers_it() {
        let quiet = wire::FEATURE_QUIET_RELEASE.to_owned();
        let compact = wire::FEATURE_COMPACT_LEASES.to_owned();
        let json = |v: Value| serde_json::to_vec(&v).unwrap();
        for (features, expected_op, expected_body) in [
            (vec![], Op::ReleaseLease, json(json!({"lease_id": LEASE}))),
            (
                vec![quiet.clone()],
                Op::ReleaseLease,
                json(json!({"lease_id": LEASE, "quiet": true})),
            ),
            (
                vec![quiet, compact],
                Op::ReleaseLeaseCompact,
                LEASE.as_bytes().to_vec(),
            ),
        ] {
            let (addr, mut requests) = fake_server(features).await;
            let w = Wire::new(addr, None, Duration::from_secs(5));
            w.release_quietly(LEASE, Duration::from_secs(5))
                .await
                .unwrap();
            let (op, body) = requests.recv().await.unwrap();
            assert_eq!(op, expected_op as u8);
            assert_eq!(body, expected_body);
        }
    }

    #[tokio::test]
    async fn a_create_is_compact_only_for_a_server_that_offers_it() {
        let request = CreateLeaseRequest {
            holder: "h".to_owned(),
            ttl_ms: Some(30_000),
            wait_ms: None,
            reason: Some("why".to_owned()),
            metadata: json!({"a": 1}).as_object().cloned(),
            reentrant: Some(false),
            locks: vec![holdfast_api::LockRequest::exclusive("k")],
        };
        for compact in [false, true] {
            let features = if compact {
                vec![wire::FEATURE_COMPACT_LEASES.to_owned()]
            } else {
                vec![]
            };
            let (addr, mut requests) = fake_server(features).await;
            let w = Wire::new(addr, None, Duration::from_secs(5));
            let answer = w
                .create_lease(&request, Duration::from_secs(5))
                .await
                .unwrap();
            // Either way the caller gets the same lease.
            assert_eq!(answer, lease(LEASE));
            let (op, body) = requests.recv().await.unwrap();
            let sent = if compact {
                assert_eq!(op, Op::CreateLeaseCompact as u8);
                wire::compact::decode::<wire::compact::CreateLease<'_>>(&body)
                    .unwrap()
                    .into_request()
                    .unwrap()
            } else {
                assert_eq!(op, Op::CreateLease as u8);
                serde_json::from_slice(&body).unwrap()
            };
            assert_eq!(sent, request);
        }
    }
}
