//! Integration tests of the clinic: every seed scenario under concurrency, against SQLite and
//! (when reachable) PostgreSQL and MariaDB, each with a control run that switches the protection
//! off and shows the anomaly it prevents.

mod appointments;
mod binary;
mod booking;
mod common;
mod patients;
mod stock;
mod swaps;
mod vocab;
