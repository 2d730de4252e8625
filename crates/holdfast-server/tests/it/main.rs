//! Integration tests of holdfast-server: real servers started in-process on `127.0.0.1:0`,
//! driven over HTTP with reqwest. Behaviour only: no timing assertions (loops that wait for a
//! state have generous bounds and fail with a message).

mod api;
mod auth;
mod common;
mod durability;
mod fifo;
mod fuzz;
mod history;
mod longpoll;
mod sse;
mod wire;
