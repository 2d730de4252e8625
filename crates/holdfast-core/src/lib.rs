//! # holdfast-core: the lock engine
//!
//! A pure, deterministic state machine: commands and the current time go in, outcomes,
//! notifications for queued requests, events and durable changes come out. It performs no I/O,
//! reads no clock, spawns nothing and draws no randomness (lease ids are supplied by the caller).
//! The server hosts it behind HTTP and storage; tests drive it directly with explicit time.
//!
//! ## Invariants (checked by [`Engine::check_invariants`] after every step in tests)
//! - An exclusive lock is never held by two leases; shared holders never coexist with an
//!   exclusive holder; a semaphore's held permits never exceed its limit; a key in use is used
//!   either as exclusive/shared or as a semaphore with one limit.
//! - Fencing tokens are strictly increasing over all grants (each new grant of a key to a
//!   lease takes the next one; a reentrant join keeps its token), and `fencing_next` is above
//!   every token issued, also across snapshot and restore.
//! - Each key's wait queue is FIFO: a request is granted only if it is compatible with the
//!   holders and with every request queued before it on every key it names (no barging);
//!   consecutive compatible requests are granted together, in arrival order.
//! - No lost wake-up: once a call returns, no queued request is grantable.
//! - Every waiter's key exists in the key table and lists it; every held lock belongs to a
//!   live lease and is listed by its key; the expiry timers match the leases.
//! - Nothing is past due: once time has been advanced to `now`, no lease has
//!   `expires_at_ms <= now`, no wait has passed its deadline, no lock-delay or completed
//!   idempotency record has passed its end.
//! - A lease has at most one queued lock request, and a request that would wait is refused
//!   with `Deadlock` if waiting would close a cycle in the wait-for graph.
//!
//! ## Driving it
//! Every mutating call takes `now_ms` and first applies everything due by then (expiries,
//! timeouts, lock-delay ends), one timer at a time at its own instant, so the outcome does not
//! depend on how often the host ticks. Time never goes backwards: an earlier `now_ms` counts as
//! the latest seen. After calls, the host drains [`Engine::take_notifications`] (answers for
//! queued requests), [`Engine::take_events`] and [`Engine::take_changes`] (what to persist),
//! and wakes at [`Engine::next_deadline_ms`] to call [`Engine::tick`].
//!
//! ## What it must not depend on
//! No I/O, clock, threads, async or randomness (hash maps are never iterated where order is
//! observable: listings and snapshots are sorted). Only `serde`, `serde_json` (metadata
//! validation) and `thiserror`.

pub mod error;
pub mod limits;
pub mod types;

mod deadlock;
mod engine;
mod idempotency;
mod idhash;
mod invariants;
mod keys;
mod leases;
mod slab;
mod snapshot;
mod textmap;
mod validate;

pub use engine::Engine;
pub use error::{LockError, RestoreError};
pub use limits::Limits;
pub use snapshot::Restorer;
pub use types::*;
