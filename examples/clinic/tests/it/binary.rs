//! The real `clinic` binary, as the README runs it: SQLite file, a holdfast server, a booking
//! race and an idempotent swap over HTTP.

use std::process::Stdio;
use std::time::Duration;

use futures::future::join_all;
use holdfast_server::ServerConfig;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn binary_serves_the_scenarios_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let holdfast = holdfast_server::start(ServerConfig::ephemeral_memory())
        .await
        .expect("holdfast");
    let mut child = Command::new(env!("CARGO_BIN_EXE_clinic"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--holdfast-url",
            &holdfast.base_url(),
        ])
        .env(
            "CLINIC_DATABASE_URL",
            format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("clinic.db").display()
            ),
        )
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn clinic");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("clinic started")
        .expect("read")
        .expect("a line");
    let base = line
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_owned();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http");
    let post = |path: String, body: Value, key: Option<&'static str>| {
        let mut req = http.post(format!("{base}{path}")).json(&body);
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        async move {
            let r = req.send().await.expect("send");
            let replayed = r.headers().contains_key("idempotent-replayed");
            (r.status(), replayed, r.json::<Value>().await.expect("json"))
        }
    };
    let (s, _, doctor) = post("/doctors".into(), json!({"name": "Dr. Green"}), None).await;
    assert_eq!(s, StatusCode::CREATED);
    let (_, _, patient) = post("/patients".into(), json!({"name": "Ann"}), None).await;
    let booking = json!({"doctor_id": doctor["id"], "patient_id": patient["id"], "scheduled_at": "2030-01-20 10:00:00"});
    let replies =
        join_all((0..10).map(|_| post("/appointments".into(), booking.clone(), None))).await;
    assert_eq!(
        replies
            .iter()
            .filter(|r| r.0 == StatusCode::CREATED)
            .count(),
        1
    );
    assert_eq!(
        replies
            .iter()
            .filter(|r| r.0 == StatusCode::CONFLICT)
            .count(),
        9
    );

    let (_, _, a) = post(
        "/assignments".into(),
        json!({"block_date": "2030-07-01", "person": "Alice"}),
        None,
    )
    .await;
    let (_, _, b) = post(
        "/assignments".into(),
        json!({"block_date": "2030-07-08", "person": "Bob"}),
        None,
    )
    .await;
    let swap = json!({"source_assignment_id": a["id"], "target_assignment_id": b["id"]});
    let replies =
        join_all((0..4).map(|_| post("/swaps".into(), swap.clone(), Some("swap-42")))).await;
    assert!(
        replies
            .iter()
            .all(|r| r.0 == StatusCode::CREATED && r.2 == replies[0].2)
    );
    assert_eq!(
        replies.iter().filter(|r| r.1).count(),
        3,
        "one execution, three replays"
    );

    child.start_kill().expect("kill");
    let _ = child.wait().await;
    holdfast.shutdown().await;
}
