//! # holdfast-core: the lock engine
//!
//! A pure, deterministic state machine: commands and the current time go in, outcomes,
//! notifications for queued requests, events and durable changes come out. It performs no I/O,
//! reads no clock, spawns nothing and draws no randomness (lease ids are supplied by the caller).
//! The server hosts it behind HTTP and storage; tests drive it directly with explicit time.
//!
//! ## Invariants (checked by [`Engine::check_invariants`] after every step in tests)
//! - An exclusive lock is never held by two leases; shared holders never coexist with an
//!   exclusive holder; a semaphore's held permits never exceed its limit.
//! - Fencing tokens are strictly increasing over all grants, and `fencing_next` is above every
//!   token issued (also across snapshot and restore).
//! - Each key's wait queue is FIFO: a request is granted only if it is compatible with the
//!   holders and with every request queued before it on every key it names (no barging).
//! - Every waiter's key exists in the key table; every held lock belongs to a live lease.
//! - A lease past its `expires_at_ms` holds nothing once time has been advanced past it.
//!
//! ## Driving it
//! Every mutating call takes `now_ms` and first applies everything due by then (expiries,
//! timeouts, lock-delay ends). After calls, the host drains [`Engine::take_notifications`]
//! (answers for queued requests), [`Engine::take_events`] and [`Engine::take_changes`] (what to
//! persist), and wakes at [`Engine::next_deadline_ms`] to call [`Engine::tick`].

pub mod error;
pub mod limits;
pub mod types;

mod deadlock;
mod engine;
mod idempotency;
mod invariants;
mod keys;
mod leases;
mod snapshot;
mod validate;

pub use engine::Engine;
pub use error::{LockError, RestoreError};
pub use limits::Limits;
pub use types::*;
