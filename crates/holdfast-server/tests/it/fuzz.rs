//! Malformed input: random and mutated bodies, paths and headers on every route. Every answer
//! is below 500, every error is JSON `{error, message}`, and the server keeps answering.

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use reqwest::Method;
use serde_json::{Value, json};

const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/leases"),
    ("GET", "/v1/leases/{id}"),
    ("DELETE", "/v1/leases/{id}"),
    ("POST", "/v1/leases/{id}/locks"),
    ("DELETE", "/v1/leases/{id}/locks/{key}"),
    ("POST", "/v1/leases/{id}/renew"),
    ("GET", "/v1/locks"),
    ("GET", "/v1/locks/{key}"),
    ("POST", "/v1/admin/locks/{key}/release"),
    ("POST", "/v1/admin/leases/{id}/release"),
    ("POST", "/v1/idempotency/{key}"),
    ("PUT", "/v1/idempotency/{key}"),
    ("DELETE", "/v1/idempotency/{key}"),
    ("GET", "/v1/idempotency/{key}"),
    ("POST", "/v1/fencing/check"),
    ("GET", "/v1/events"),
    ("GET", "/v1/stats"),
    ("GET", "/healthz"),
    ("PATCH", "/v1/leases"),
    ("GET", "/{key}"),
];

pub(crate) fn templates() -> Vec<Value> {
    vec![
        json!({"holder": "h", "ttl_ms": 5000, "wait_ms": 10, "reason": "r", "metadata": {"a": 1}, "reentrant": true,
               "locks": [{"key": "f/a", "mode": "shared"}, {"key": "f/b", "limit": 3, "permits": 2, "lock_delay_ms": 5}]}),
        json!({"wait_ms": 10, "locks": [{"key": "f/c"}]}),
        json!({"ttl_ms": 5000}),
        json!({"reason": "fuzz"}),
        json!({"fingerprint": "fp", "holder": "h", "ttl_ms": 5000, "record_ttl_ms": 10000, "wait_ms": 10}),
        json!({"lease_id": "0123456789abcdef0123456789abcdef", "result": {"status": 200, "headers": [["a", "b"]], "body": "x"}}),
        json!({"lease_id": "0123456789abcdef0123456789abcdef"}),
        json!({"key": "f/a", "fencing_token": 3}),
    ]
}

pub(crate) fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        "[ -~]{0,12}".prop_map(Value::String),
        "\\PC{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,10}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Replace, delete or add a member somewhere in a template.
pub(crate) fn mutate(mut v: Value, path_choice: usize, action: u8, replacement: Value) -> Value {
    fn walk(v: &mut Value, choice: &mut usize, action: u8, replacement: &Value) -> bool {
        match v {
            Value::Object(map) => {
                let keys: Vec<String> = map.keys().cloned().collect();
                for k in keys {
                    if *choice == 0 {
                        match action % 3 {
                            0 => {
                                map.insert(k, replacement.clone());
                            }
                            1 => {
                                map.remove(&k);
                            }
                            _ => {
                                map.insert(format!("{k}_x"), replacement.clone());
                            }
                        }
                        return true;
                    }
                    *choice -= 1;
                    if let Some(child) = map.get_mut(&k)
                        && walk(child, choice, action, replacement)
                    {
                        return true;
                    }
                }
                false
            }
            Value::Array(items) => items
                .iter_mut()
                .any(|c| walk(c, choice, action, replacement)),
            _ => false,
        }
    }
    let mut choice = path_choice;
    if !walk(&mut v, &mut choice, action, &replacement) {
        return replacement;
    }
    v
}

#[derive(Debug, Clone)]
enum Body {
    None,
    Bytes(Vec<u8>),
    Json(Value),
}

fn body() -> impl Strategy<Value = Body> {
    let n = templates().len();
    prop_oneof![
        Just(Body::None),
        prop::collection::vec(any::<u8>(), 0..200).prop_map(Body::Bytes),
        json_value().prop_map(Body::Json),
        (0..n, 0usize..12, any::<u8>(), json_value()).prop_map(|(t, c, a, r)| Body::Json(mutate(
            templates()[t].clone(),
            c,
            a,
            r
        ))),
        (0..n).prop_map(|t| Body::Json(templates()[t].clone())),
    ]
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9a-f]{32}",
        "[a-zA-Z0-9%/._~ -]{0,24}",
        "[ -~]{0,16}",
        Just("%ZZ".to_owned()),
        Just("%00".to_owned()),
        Just("a//b/../c".to_owned()),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    route: usize,
    method_override: Option<&'static str>,
    id: String,
    key: String,
    query: String,
    body: Body,
    content_type: Option<String>,
    authorization: Option<String>,
    last_event_id: Option<String>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        0..ROUTES.len(),
        prop::option::weighted(
            0.15,
            prop::sample::select(vec![
                "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS",
            ]),
        ),
        segment(),
        segment(),
        prop_oneof![
            Just(String::new()),
            "\\?[ -~]{0,20}",
            Just("?prefix=f/&holder=h".to_owned())
        ],
        body(),
        prop::option::of(prop_oneof![
            Just("application/json".to_owned()),
            Just("text/plain".to_owned()),
            "[ -~]{0,20}"
        ]),
        prop::option::of("[ -~]{0,30}"),
        prop::option::of("[ -~]{0,12}"),
    )
        .prop_map(
            |(
                route,
                method_override,
                id,
                key,
                query,
                body,
                content_type,
                authorization,
                last_event_id,
            )| Case {
                route,
                method_override,
                id,
                key,
                query,
                body,
                content_type,
                authorization,
                last_event_id,
            },
        )
}

static STATUS_COUNTS: std::sync::Mutex<std::collections::BTreeMap<u16, u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

async fn run_case(client: &reqwest::Client, base: &str, c: &Case) -> Result<(), String> {
    let (method, template) = ROUTES[c.route];
    let method = c.method_override.unwrap_or(method);
    let path = template.replace("{id}", &c.id).replace("{key}", &c.key);
    let url = format!("{base}{path}{}", c.query);
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Ok(());
    };
    let mut req = client.request(method.clone(), &url);
    if let Some(ct) = &c.content_type {
        req = req.header("content-type", ct.as_str());
    }
    if let Some(a) = &c.authorization {
        req = req.header("authorization", a.as_str());
    }
    if let Some(l) = &c.last_event_id {
        req = req.header("last-event-id", l.as_str());
    }
    req = match &c.body {
        Body::None => req,
        Body::Bytes(b) => req.body(b.clone()),
        Body::Json(v) => req.body(serde_json::to_vec(v).unwrap()),
    };
    let Ok(req) = req.build() else { return Ok(()) }; // not expressible as HTTP: not our input
    let resp = client
        .execute(req)
        .await
        .map_err(|e| format!("{method} {url}: transport error {e}"))?;
    let status = resp.status();
    *STATUS_COUNTS
        .lock()
        .unwrap()
        .entry(status.as_u16())
        .or_default() += 1;
    if status.is_server_error() {
        let text = resp.text().await.unwrap_or_default();
        return Err(format!("{method} {url} {c:?} → {status}: {text}"));
    }
    let is_sse = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if is_sse || method == Method::HEAD {
        return Ok(());
    }
    if status.is_client_error() {
        let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "{method} {url} → {status}: non-JSON error {e}: {:?}",
                String::from_utf8_lossy(&bytes)
            )
        })?;
        if !(v["error"].is_string() && v["message"].is_string()) {
            return Err(format!(
                "{method} {url} → {status}: error body lacks error/message: {v}"
            ));
        }
    }
    Ok(())
}

#[test]
fn malformed_input_never_gets_a_5xx() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut config = holdfast_server::ServerConfig::ephemeral_memory();
    // Short waits keep random valid requests from long-polling.
    config.limits.engine.wait_ms_max = 50;
    let server = rt.block_on(holdfast_server::start(config)).unwrap();
    let base = server.base_url();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let cases: u32 = std::env::var("HOLDFAST_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&case(), |c| {
        rt.block_on(run_case(&client, &base, &c))
            .map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    eprintln!(
        "fuzz: answers by status: {:?}",
        STATUS_COUNTS.lock().unwrap()
    );
    let health = rt.block_on(async {
        client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .map(|r| r.status())
    });
    assert_eq!(
        health.unwrap(),
        200,
        "server still answers after the fuzzing"
    );
    rt.block_on(server.shutdown());
}
