//! One adapter per lock service, each implementing [`crate::adapter::LockSystem`].

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod holdfast_client;
pub mod holdfast_http;
pub mod mariadb;
pub mod postgres;
pub mod redis;
