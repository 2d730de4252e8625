//! holdfast-sql placeholder
#![allow(missing_docs)]
pub mod advisory;
pub mod classify;
pub mod error;
pub mod optimistic;
pub mod retry;
pub mod rows;
pub mod sql;
pub mod transaction;
pub use classify::{Classify, Conflict};
pub use error::{Result, SqlLockError};
