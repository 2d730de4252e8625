//! Shared helpers: start a server, send JSON, wait for a state.

use std::time::Duration;

use holdfast_server::{RunningServer, ServerConfig};
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// A server plus a client.
pub struct TestServer {
    pub server: Option<RunningServer>,
    pub base: String,
    pub client: reqwest::Client,
    pub token: Option<String>,
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

impl TestServer {
    pub async fn start(config: ServerConfig) -> Self {
        let server = holdfast_server::start(config).await.expect("server starts");
        let base = server.base_url();
        Self {
            server: Some(server),
            base,
            client: client(),
            token: None,
        }
    }

    pub async fn memory() -> Self {
        Self::start(ServerConfig::ephemeral_memory()).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Same server and token, without owning the server.
    pub fn handle(&self) -> Self {
        Self {
            server: None,
            base: self.base.clone(),
            client: self.client.clone(),
            token: self.token.clone(),
        }
    }

    /// Same server, another bearer token.
    pub fn as_token(&self, token: &str) -> Self {
        Self {
            server: None,
            base: self.base.clone(),
            client: self.client.clone(),
            token: Some(token.to_owned()),
        }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.client.request(method, self.url(path));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        let bytes = resp.bytes().await.expect("body");
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "non-JSON answer {status} to {path}: {e}: {:?}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        (status, value)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.send(Method::DELETE, path, None).await
    }

    /// Create a lease on `keys` (no-wait); panics unless granted.
    pub async fn acquire(&self, holder: &str, keys: &[&str]) -> Value {
        let locks: Vec<Value> = keys.iter().map(|k| serde_json::json!({"key": k})).collect();
        let (status, body) = self
            .post(
                "/v1/leases",
                serde_json::json!({"holder": holder, "locks": locks}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "acquire {keys:?}: {body}");
        body
    }

    /// Number of waiters on a key.
    pub async fn waiters(&self, key: &str) -> usize {
        let (status, body) = self.get(&format!("/v1/locks/{}", enc(key))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["waiters"].as_array().map_or(0, Vec::len)
    }

    /// Number of holders of a key.
    pub async fn holders(&self, key: &str) -> usize {
        let (status, body) = self.get(&format!("/v1/locks/{}", enc(key))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["holders"].as_array().map_or(0, Vec::len)
    }

    /// Wait (bounded) until the key has `n` waiters.
    pub async fn wait_for_waiters(&self, key: &str, n: usize) {
        for _ in 0..6_000 {
            if self.waiters(key).await == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!(
            "key {key} never reached {n} waiters (has {})",
            self.waiters(key).await
        );
    }

    pub async fn shutdown(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}

/// Percent-encode a key for a path, keeping `/`.
pub fn enc(key: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'/')
        .remove(b'-')
        .remove(b'_')
        .remove(b'.');
    percent_encoding::utf8_percent_encode(key, SET).to_string()
}

/// Assert an error answer: status, code, and the `{error, message}` shape.
#[track_caller]
pub fn assert_error(answer: &(StatusCode, Value), status: u16, code: &str) {
    let (s, body) = answer;
    assert_eq!(s.as_u16(), status, "status of {body}");
    assert_eq!(body["error"], code, "code of {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "message of {body}"
    );
}
