//! The wire protocol listener (see [`holdfast_api::wire`] for the format).
//!
//! One task per connection owns both halves of the socket. It parses every complete frame in
//! its read buffer, turns each request into a future that calls the same operation as the
//! HTTP handler (`http::leases::*_op`), and polls those futures itself (no task spawn, no
//! extra thread hop): the engine host's reply wakes this task, which encodes the answer and
//! writes every answer that is ready in one `write`. A request waiting in a lock's queue
//! therefore never blocks the others on its connection.
//!
//! Closing the connection drops the futures still pending; a queued request then leaves the
//! engine's queue (its `CancelOnDrop`), and a grant that can no longer be delivered is undone
//! by the engine host, exactly as for an HTTP client that disconnects.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::FutureExt;
use futures::future::{AbortHandle, Abortable};
use futures::stream::{FuturesUnordered, StreamExt};
use holdfast_api::wire::{self, Op};
use holdfast_api::{AddLocksRequest, CreateLeaseRequest, ErrorCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::http::{AppState, leases};

/// Counter of wire requests, labelled by op and status.
pub const WIRE_REQUESTS: &str = "holdfast_wire_requests_total";
/// Gauge of open wire connections.
pub const WIRE_CONNECTIONS: &str = "holdfast_wire_connections";

/// What a finished request leaves: its id and the encoded answer.
type Answer = (u64, Result<Vec<u8>, ApiError>);
type Pending = Pin<Box<dyn Future<Output = Answer> + Send>>;
/// An operation's work: the encoded answer or the error.
type Work = Pin<Box<dyn Future<Output = Result<Vec<u8>, ApiError>> + Send>>;

/// Accept connections until shutdown; each is served by its own task.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, shutdown: watch::Receiver<bool>) {
    let open = Arc::new(AtomicUsize::new(0));
    let mut stop = shutdown.clone();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            () = stopped(&mut stop) => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "wire accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let max = state.config.limits.wire_connections_max;
                if open.load(Ordering::Relaxed) >= max {
                    connections.spawn(refuse(stream, max));
                    continue;
                }
                open.fetch_add(1, Ordering::Relaxed);
                metrics::gauge!(WIRE_CONNECTIONS).increment(1.0);
                let state = Arc::clone(&state);
                let shutdown = shutdown.clone();
                let open = Arc::clone(&open);
                connections.spawn(async move {
                    if let Err(e) = Connection::new(stream, state, shutdown).run().await {
                        tracing::debug!(%peer, error = %e, "wire connection ended");
                    }
                    open.fetch_sub(1, Ordering::Relaxed);
                    metrics::gauge!(WIRE_CONNECTIONS).decrement(1.0);
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Connections finish their in-flight requests (the engine answers queued waiters at
    // shutdown) and close.
    while connections.join_next().await.is_some() {}
}

/// The counter of successful requests, looked up once (the hot path).
fn ok_counter() -> &'static metrics::Counter {
    static OK: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    OK.get_or_init(|| metrics::counter!(WIRE_REQUESTS, "status" => "200"))
}

/// Resolves once shutdown has begun (or the sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

async fn stopped_owned(mut rx: watch::Receiver<bool>) {
    stopped(&mut rx).await;
}

/// Over the connection limit: say so (id 0) and close.
async fn refuse(mut stream: TcpStream, max: usize) {
    let mut out = Vec::new();
    let err = ApiError::overloaded(format!(
        "too many wire connections (limit wire_connections_max = {max})"
    ));
    wire::encode_error(&mut out, 0, &err.body);
    let _ = stream.write_all(&out).await;
    let _ = stream.shutdown().await;
}

enum Event {
    Read(usize),
    Answer(Answer),
    Shutdown,
}

struct Connection {
    stream: TcpStream,
    state: Arc<AppState>,
    shutdown: watch::Receiver<bool>,
    /// Set by hello; shared by the connection's requests.
    principal: Option<Arc<Principal>>,
    /// Unparsed input; `start` is where the next frame begins.
    input: Vec<u8>,
    start: usize,
    /// Encoded answers not yet written.
    output: Vec<u8>,
    pending: FuturesUnordered<Pending>,
    /// Requests that may wait in a queue, by id, for `cancel`.
    waiting: HashMap<u64, AbortHandle>,
    /// Set once the connection must close after the answers already due are written.
    closing: bool,
}

impl Connection {
    fn new(stream: TcpStream, state: Arc<AppState>, shutdown: watch::Receiver<bool>) -> Self {
        let _ = stream.set_nodelay(true);
        Self {
            stream,
            state,
            shutdown,
            principal: None,
            input: Vec::with_capacity(8 * 1024),
            start: 0,
            output: Vec::with_capacity(8 * 1024),
            pending: FuturesUnordered::new(),
            waiting: HashMap::new(),
            closing: false,
        }
    }

    fn frame_limit(&self) -> usize {
        self.state
            .config
            .limits
            .request_body_bytes_max
            .saturating_add(wire::REQUEST_HEADER_BYTES)
    }

    async fn run(mut self) -> std::io::Result<()> {
        // One shutdown future for the connection's life (a new one per loop turn would
        // register and drop a waiter on the watch channel for every request).
        let mut stop = std::pin::pin!(stopped_owned(self.shutdown.clone()));
        loop {
            self.parse_frames();
            self.collect_ready();
            if !self.output.is_empty() {
                self.stream.write_all(&self.output).await?;
                self.output.clear();
            }
            if self.closing {
                // Finish what was accepted, then close.
                while let Some(answer) = self.pending.next().await {
                    self.encode(answer);
                }
                if !self.output.is_empty() {
                    self.stream.write_all(&self.output).await?;
                }
                let _ = self.stream.shutdown().await;
                return Ok(());
            }
            if self.start > 0 && self.start * 2 >= self.input.len() {
                self.input.drain(..self.start);
                self.start = 0;
            }
            let has_pending = !self.pending.is_empty();
            let event = tokio::select! {
                read = self.stream.read_buf(&mut self.input) => Event::Read(read?),
                Some(answer) = self.pending.next(), if has_pending => Event::Answer(answer),
                () = &mut stop, if !self.closing => Event::Shutdown,
            };
            match event {
                // The peer closed: drop what is pending (queued requests leave their queues;
                // undeliverable grants are undone).
                Event::Read(0) => return Ok(()),
                Event::Read(_) => {}
                Event::Answer(answer) => self.encode(answer),
                Event::Shutdown => self.closing = true,
            }
        }
    }

    /// Encode every answer that is already available without waiting.
    fn collect_ready(&mut self) {
        while let Some(Some(answer)) = self.pending.next().now_or_never() {
            self.encode(answer);
        }
    }

    fn encode(&mut self, (id, result): Answer) {
        if !self.waiting.is_empty() {
            self.waiting.remove(&id);
        }
        self.encode_answer(id, result);
    }

    /// Encode the answer to a request that is not (or no longer) in `waiting`.
    fn encode_answer(&mut self, id: u64, result: Result<Vec<u8>, ApiError>) {
        match result {
            Ok(body) => {
                wire::encode_response(&mut self.output, id, 200, &body);
                ok_counter().increment(1);
            }
            Err(e) => self.encode_error(id, &e),
        }
    }

    fn encode_error(&mut self, id: u64, e: &ApiError) {
        let mut value = serde_json::to_value(&*e.body).unwrap_or_else(|_| serde_json::json!({}));
        if let (Some(extra), Some(obj)) = (&e.extra, value.as_object_mut()) {
            for (k, v) in extra.iter() {
                obj.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        let json = serde_json::to_vec(&value).unwrap_or_else(|_| b"{}".to_vec());
        let status = e.status().as_u16();
        wire::encode_response(&mut self.output, id, status, &json);
        metrics::counter!(WIRE_REQUESTS, "status" => status.to_string()).increment(1);
    }

    /// Take every complete frame out of the input buffer.
    fn parse_frames(&mut self) {
        while !self.closing {
            let available = &self.input[self.start..];
            if available.len() < wire::LENGTH_BYTES {
                return;
            }
            let len = u32::from_be_bytes([available[0], available[1], available[2], available[3]])
                as usize;
            if len > self.frame_limit() {
                let id = if available.len() >= wire::LENGTH_BYTES + 8 {
                    u64::from_be_bytes(available[4..12].try_into().unwrap_or_default())
                } else {
                    0
                };
                let e = ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!(
                        "wire frame of {len} bytes is larger than the limit of {} bytes (request_body_bytes_max + header); closing the connection",
                        self.frame_limit()
                    ),
                );
                self.encode_error(id, &e);
                self.closing = true;
                return;
            }
            if available.len() < wire::LENGTH_BYTES + len {
                // Make room for the whole frame at once.
                self.input
                    .reserve(wire::LENGTH_BYTES + len - available.len());
                return;
            }
            let frame_start = self.start + wire::LENGTH_BYTES;
            let frame_end = frame_start + len;
            self.start = frame_end;
            // Take the buffer out for the duration of the call: `request` needs `&mut self`.
            let input = std::mem::take(&mut self.input);
            self.request(&input[frame_start..frame_end]);
            self.input = input;
        }
    }

    fn request(&mut self, payload: &[u8]) {
        let parts = match wire::parse_request(payload) {
            Ok(p) => p,
            Err(message) => {
                // Cannot even read an id: answer with id 0 and close.
                self.encode_error(0, &ApiError::invalid("", message));
                self.closing = true;
                return;
            }
        };
        let id = parts.id;
        let Some(op) = Op::from_byte(parts.op) else {
            let e = ApiError::invalid(
                "op",
                format!(
                    "unknown wire op 0x{:02x} (protocol {})",
                    parts.op,
                    wire::PROTOCOL_VERSION
                ),
            );
            self.encode_error(id, &e);
            return;
        };
        if op == Op::Hello {
            match self.hello(parts.body) {
                Ok(body) => wire::encode_response(&mut self.output, id, 200, &body),
                Err(e) => {
                    self.encode_error(id, &e);
                    self.closing = true;
                }
            }
            return;
        }
        let Some(principal) = self.principal.clone() else {
            let e = ApiError::invalid(
                "op",
                format!(
                    "the first request on a wire connection must be hello (op 0x01), not {}",
                    op.name()
                ),
            );
            self.encode_error(id, &e);
            self.closing = true;
            return;
        };
        match self.operation(op, parts.body, principal) {
            Ok(Some((mut fut, waits))) => {
                // Most requests are answered on their first poll (memory mode applies them on
                // this thread): encode the answer now rather than queue the future. A future
                // that is not ready re-registers its waker when `pending` polls it.
                if let Some(result) = fut.as_mut().now_or_never() {
                    self.encode_answer(id, result);
                    return;
                }
                if waits {
                    let (handle, registration) = AbortHandle::new_pair();
                    self.waiting.insert(id, handle);
                    self.pending
                        .push(Box::pin(Abortable::new(fut, registration).map(move |r| {
                            (
                                id,
                                r.unwrap_or_else(|_| {
                                    Err(ApiError::new(
                                        ErrorCode::WaitTimeout,
                                        "the wait was cancelled by the client",
                                    ))
                                }),
                            )
                        })));
                } else {
                    self.pending.push(Box::pin(fut.map(move |r| (id, r))));
                }
            }
            // Answered at once (cancel).
            Ok(None) => wire::encode_response(&mut self.output, id, 200, b"{}"),
            Err(e) => self.encode_error(id, &e),
        }
    }

    /// Decode a request and make its future (`true` if it may wait in a queue), or act at once.
    fn operation(
        &mut self,
        op: Op,
        body: &[u8],
        principal: Arc<Principal>,
    ) -> Result<Option<(Work, bool)>, ApiError> {
        let state = Arc::clone(&self.state);
        let work: (Work, bool) = match op {
            // Answered in `request`.
            Op::Hello => return Err(ApiError::invalid("op", "hello may only come first")),
            Op::Ping => (Box::pin(async { Ok(b"{}".to_vec()) }), false),
            Op::Cancel => {
                let req: wire::Cancel = decode_required(body)?;
                // Cancelling an unknown or finished request is not an error: it raced its
                // answer.
                if let Some(handle) = self.waiting.remove(&req.id) {
                    handle.abort();
                }
                return Ok(None);
            }
            Op::CreateLease | Op::CreateLeaseCompact => {
                // The compact op carries the same request and answers the same lease, in
                // postcard instead of JSON.
                let compact = op == Op::CreateLeaseCompact;
                let req: CreateLeaseRequest = if compact {
                    wire::compact::decode::<wire::compact::CreateLease<'_>>(body)
                        .and_then(wire::compact::CreateLease::into_request)
                        .map_err(|e| ApiError::invalid(e.field, e.message))?
                } else {
                    decode_required(body)?
                };
                let waits = req.wait_ms.unwrap_or(0) > 0;
                let fut = async move {
                    let lease = leases::create_lease_op(&state, &principal, req).await?;
                    if compact {
                        wire::compact::encode_into(
                            &wire::compact::Lease::of(&lease),
                            Vec::with_capacity(128),
                        )
                        .map_err(|e| ApiError::internal(format!("cannot encode answer: {e}")))
                    } else {
                        json(&lease)
                    }
                };
                (Box::pin(fut), waits)
            }
            Op::AddLocks => {
                let req: wire::AddLocks = decode_required(body)?;
                let waits = req.wait_ms.unwrap_or(0) > 0;
                let add = AddLocksRequest {
                    wait_ms: req.wait_ms,
                    locks: req.locks,
                };
                let fut = async move {
                    json(&leases::add_locks_op(&state, &principal, &req.lease_id, add).await?)
                };
                (Box::pin(fut), waits)
            }
            Op::GetLease => {
                let req: wire::LeaseRef = decode_required(body)?;
                let fut = async move {
                    json(&leases::get_lease_op(&state, &principal, &req.lease_id).await?)
                };
                (Box::pin(fut), false)
            }
            Op::Renew => {
                let req: wire::Renew = decode_required(body)?;
                let fut = async move {
                    json(&leases::renew_op(&state, &principal, &req.lease_id, req.ttl_ms).await?)
                };
                (Box::pin(fut), false)
            }
            Op::ReleaseLease => {
                let req: wire::ReleaseLease = decode_required(body)?;
                let fut = async move {
                    if req.quiet {
                        leases::release_lease_quiet_op(&state, &principal, &req.lease_id).await?;
                        Ok(b"{}".to_vec())
                    } else {
                        json(&leases::release_lease_op(&state, &principal, &req.lease_id).await?)
                    }
                };
                (Box::pin(fut), false)
            }
            Op::ReleaseLeaseCompact => {
                let lease_id = std::str::from_utf8(body)
                    .map_err(|_| {
                        ApiError::invalid(
                            "lease_id",
                            "the body of release_lease_compact must be the lease id's hex digits",
                        )
                    })?
                    .to_owned();
                let fut = async move {
                    leases::release_lease_quiet_op(&state, &principal, &lease_id).await?;
                    Ok(Vec::new())
                };
                (Box::pin(fut), false)
            }
            Op::ReleaseLock => {
                let req: wire::ReleaseLock = decode_required(body)?;
                let fut = async move {
                    json(
                        &leases::release_lock_op(&state, &principal, &req.lease_id, req.key)
                            .await?,
                    )
                };
                (Box::pin(fut), false)
            }
        };
        Ok(Some(work))
    }

    fn hello(&mut self, body: &[u8]) -> Result<Vec<u8>, ApiError> {
        let hello: wire::Hello = decode_required(body)?;
        if hello.protocol != wire::PROTOCOL_VERSION {
            return Err(ApiError::invalid(
                "protocol",
                format!(
                    "wire protocol version {} is not supported; this server speaks {}",
                    hello.protocol,
                    wire::PROTOCOL_VERSION
                ),
            ));
        }
        let principal = self
            .state
            .auth
            .authenticate_secret(hello.token.as_deref())?;
        self.principal = Some(Arc::new(principal));
        json(&wire::HelloOk {
            protocol: wire::PROTOCOL_VERSION,
            server: format!("holdfast {}", env!("CARGO_PKG_VERSION")),
            features: vec![
                wire::FEATURE_QUIET_RELEASE.to_owned(),
                wire::FEATURE_COMPACT_LEASES.to_owned(),
            ],
        })
    }
}

fn decode_required<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid("", "a JSON body is required"));
    }
    crate::http::decode(body)
}

fn json<T: Serialize>(value: &T) -> Result<Vec<u8>, ApiError> {
    // A lease answer with one lock is ~250 bytes: one allocation instead of doubling from 128.
    let mut out = Vec::with_capacity(512);
    serde_json::to_writer(&mut out, value)
        .map_err(|e| ApiError::internal(format!("cannot encode answer: {e}")))?;
    Ok(out)
}
