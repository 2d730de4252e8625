//! # holdfast-client: the Rust client of a holdfast server
//!
//! ```no_run
//! # async fn demo() -> Result<(), holdfast_client::ClientError> {
//! use std::time::Duration;
//! use holdfast_client::{Client, RetryPolicy};
//!
//! let client = Client::builder().base_url("http://127.0.0.1:7390").build()?;
//! let guard = client
//!     .lock("vocab_import/RXNORM")
//!     .holder("importer@host-1")
//!     .ttl(Duration::from_secs(30))
//!     .retry(RetryPolicy::default()) // 10 attempts, 30 s doubling, 5 min cap, full jitter
//!     .acquire()
//!     .await?;
//! let token = guard.fencing_token(); // pass it to the storage you protect
//! # let _ = token;
//! tokio::select! {
//!     reason = guard.lost() => eprintln!("lock lost: {reason}"),
//!     () = async { /* the work */ } => {}
//! }
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! ## What it guarantees
//! - A [`LockGuard`] renews its lease in the background every third of the TTL. It reports
//!   *at risk* while renewals fail and *lost* once the lease is certainly gone: the server said
//!   so, an admin took a key, or the local deadline (the send time of the last successful
//!   renewal plus the TTL the server granted, on the monotonic clock) passed.
//! - [`LockBuilder::with`] / [`Client::with_lock`] release on every exit path (success, error,
//!   panic) and cancel the body if the lock is lost.
//! - Dropping an `acquire()` future while it waits disconnects its request: the server removes
//!   it from the queue, and a grant that can no longer be delivered is released by the server.
//! - Every request has an explicit timeout; waits longer than one server long-poll (60 s) are
//!   split into several requests.
//!
//! ## What it does not do
//! It contains no lock logic: the server decides. It never retries an acquisition that failed
//! for another reason than "busy" (held, wait timed out, overloaded).
//!
//! ## Code map
//! [`client`] (HTTP calls, URL encoding), [`lock`] (builder and acquisition loop), [`guard`]
//! (renewal and the lost signal), [`retry`] (the policy, injectable sleeper and RNG),
//! [`idempotency`], [`events`] (SSE), [`error`].

pub mod client;
pub mod error;
pub mod events;
pub mod guard;
pub mod idempotency;
pub mod lock;
pub mod retry;
mod schedule;
mod wire;

pub use client::{
    Client, ClientBuilder, IdempotencyBegun, SERVER_URL_DEFAULT, default_holder, encode_key,
};
pub use error::ClientError;
pub use events::{EventStream, StreamEvent};
pub use guard::{Health, LeaseStatus, LockContext, LockGuard, LostReason};
pub use holdfast_api as api;
pub use idempotency::{Idempotent, IdempotentOutcome};
pub use lock::{LockBuilder, Phase, Progress};
pub use retry::{Jitter, RetryPolicy, Sleeper, TokioSleeper};
