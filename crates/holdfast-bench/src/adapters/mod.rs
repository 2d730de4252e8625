//! One adapter per lock service, each implementing [`crate::adapter::LockSystem`].

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod holdfast_http;
pub mod mariadb;
pub mod postgres;
pub mod redis;

use crate::adapter::Durability;

/// How the holdfast rows reach the server (recorded in every report).
pub const HOLDFAST_TRANSPORT: &str = "HTTP/JSON with reqwest and holdfast-api's wire types";

/// The holdfast adapter the benchmark uses for a server at `base_url`.
#[must_use]
pub fn holdfast_system(
    name: &str,
    base_url: &str,
    durability: Durability,
) -> holdfast_http::HoldfastHttpSystem {
    holdfast_http::HoldfastHttpSystem::new(name, base_url, durability)
}
