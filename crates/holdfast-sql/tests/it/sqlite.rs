//! SQLite: what the database allows (transactions with busy retry, savepoints, optimistic
//! updates, offline locks, idempotency) and what it does not (row locks).
