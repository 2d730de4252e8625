//! The event stream: ids are sequence numbers, `Last-Event-ID` resumes.

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;

use crate::common::TestServer;

/// One parsed SSE event.
#[derive(Debug, Clone)]
struct Sse {
    id: Option<u64>,
    event: String,
    data: Value,
}

struct SseReader {
    stream: futures::stream::BoxStream<'static, reqwest::Result<axum::body::Bytes>>,
    buf: String,
}

impl SseReader {
    async fn open(s: &TestServer, query: &str, last_event_id: Option<u64>) -> Self {
        let mut req = s.client.get(s.url(&format!("/v1/events{query}")));
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        Self {
            stream: resp.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    async fn next(&mut self) -> Sse {
        loop {
            if let Some(pos) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..pos + 2).collect();
                let mut ev = Sse {
                    id: None,
                    event: "message".into(),
                    data: Value::Null,
                };
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        ev.id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        ev.event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // keep-alive comment
                }
                ev.data = serde_json::from_str(&data).unwrap();
                return ev;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.stream.next())
                .await
                .expect("an event within 30 s")
                .expect("stream open")
                .unwrap();
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_have_sequence_ids_and_resume() {
    let s = TestServer::memory().await;
    let mut reader = SseReader::open(&s, "?prefix=sse/", None).await;
    let lease = s.acquire("alice", &["sse/a"]).await;
    s.acquire("other", &["elsewhere/x"]).await;
    let id = lease["lease_id"].as_str().unwrap();
    s.delete(&format!("/v1/leases/{id}")).await;

    let granted = reader.next().await;
    assert_eq!(granted.event, "granted");
    assert_eq!(granted.data["key"], "sse/a");
    assert_eq!(granted.data["holder"], "alice");
    assert!(granted.data.get("lease_id").is_none());
    let g_seq = granted.id.unwrap();
    assert_eq!(granted.data["seq"], g_seq);
    let released = reader.next().await;
    assert_eq!(released.event, "released");
    assert!(released.id.unwrap() > g_seq);
    drop(reader);

    // Resume after the grant: the release comes again, the grant does not.
    let mut resumed = SseReader::open(&s, "?prefix=sse/", Some(g_seq)).await;
    let again = resumed.next().await;
    assert_eq!(again.event, "released");
    assert_eq!(again.id, released.id);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_from_before_a_restart_reports_missed_events() {
    let dir = tempfile::tempdir().unwrap();
    let config = holdfast_server::ServerConfig::ephemeral_sync(dir.path());
    let s = TestServer::start(config.clone()).await;
    for i in 0..3 {
        let l = s.acquire("h", &[&format!("m/{i}")]).await;
        let id = l["lease_id"].as_str().unwrap();
        s.delete(&format!("/v1/leases/{id}")).await;
    }
    s.shutdown().await;
    let s = TestServer::start(config).await;
    let mut reader = SseReader::open(&s, "", Some(0)).await;
    let missed = reader.next().await;
    assert_eq!(missed.event, "missed");
    assert_eq!(missed.data["kind"], "missed");
    assert!(missed.data["to_seq"].as_u64().unwrap() >= missed.data["from_seq"].as_u64().unwrap());
    // Live events follow.
    s.acquire("h", &["m/live"]).await;
    let live = reader.next().await;
    assert_eq!(live.event, "granted");
    assert!(live.id.unwrap() > missed.data["to_seq"].as_u64().unwrap());
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_last_event_id_is_invalid_request() {
    let s = TestServer::memory().await;
    let resp = s
        .client
        .get(s.url("/v1/events"))
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_are_bounded() {
    let mut config = holdfast_server::ServerConfig::ephemeral_memory();
    config.limits.event_streams_max = 1;
    let s = TestServer::start(config).await;
    let first = SseReader::open(&s, "", None).await;
    let resp = s.client.get(s.url("/v1/events")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("retry-after").is_some());
    drop(first);
    // The slot is freed when the stream goes away.
    let mut opened = false;
    for _ in 0..1_000 {
        let resp = s.client.get(s.url("/v1/events")).send().await.unwrap();
        if resp.status() == 200 {
            opened = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(opened, "stream slot never freed");
    s.shutdown().await;
}
