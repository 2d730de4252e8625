//! # holdfast-bench: holdfast side by side with the lock services business applications use
//!
//! The benchmark runs holdfast and its peers — Redis (`SET NX PX`), PostgreSQL advisory locks,
//! MariaDB `GET_LOCK`, etcd v3 locks — one after the other on the same machine and reports
//! ratios between them. Its figures are comparisons within one run, never absolute claims.
//!
//! - [`adapter`]: the one interface every system is driven through ([`adapter::LockSystem`],
//!   [`adapter::LockConn`]) and the durability classes rows are labelled with.
//! - [`adapters`]: one adapter per system.
//! - [`workload`]: W1 uncontended pairs, W2 one hot key, W3 many held locks; the same code for
//!   every system.
//! - [`run`]: a whole run (which systems, which workloads, starting holdfast servers, W4).
//! - [`report`]: rows, markdown tables, target checks, JSON.
//! - [`smoke`]: the short holdfast-only run that CI executes.
//! - [`floor`]: the loopback round trip between two threads, measured in the run: the floor
//!   under any handoff between two client processes.
//!
//! The peers are started by `scripts/bench-peers.sh`, each a private instance on a loopback
//! port with its data in a temporary directory. holdfast servers are started by the benchmark
//! itself from the `holdfast` binary, one process per durability mode, so that their memory can
//! be read from `/proc` and they compete for the CPU like the peers' servers.
//!
//! This crate must not be a dependency of anything: it depends on everything.

pub mod adapter;
pub mod adapters;
pub mod floor;
pub mod procfs;
pub mod report;
pub mod run;
pub mod server_process;
pub mod smoke;
pub mod workload;
