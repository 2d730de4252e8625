//! The dashboard in a real browser: headless Chromium loads `/` from a running `holdfast serve`,
//! runs its JavaScript against the JSON API, and the rendered DOM must show the held locks
//! (key, mode, holder, reason, fencing token, waiters) and the live event feed.
//!
//! Needs Debian's `chromium` (`apt-get install chromium`). Without it the test says it skipped;
//! under `CI=true` a missing browser is a failure.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn chromium() -> Option<String> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .map(str::to_owned)
}

/// Renders `url` in headless Chromium and returns the DOM after its scripts ran.
fn render(browser: &str, url: &str) -> anyhow::Result<String> {
    let profile = tempfile::tempdir()?;
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=4000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stderr(Stdio::null())
        .output()?;
    anyhow::ensure!(out.status.success(), "chromium exited with {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn dashboard_shows_locks_and_events_in_a_real_browser() -> anyhow::Result<()> {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "chromium is required under CI=true (apt-get install chromium)"
        );
        eprintln!("skipped: chromium is not installed (apt-get install chromium)");
        return Ok(());
    };
    let mut server = Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(["serve", "--durability", "memory", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = server.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("listening on ") {
                let _ = tx.send(url.trim().to_owned());
            }
        }
    });
    let base = rx.recv_timeout(Duration::from_secs(60))?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let http = reqwest::Client::new();
    rt.block_on(async {
        for (holder, key, reason) in [
            ("dr-green", "clinic/patient/42", "editing chart"),
            ("importer@host-1", "vocab_import/RXNORM", "nightly import"),
        ] {
            let resp = http
                .post(format!("{base}/v1/leases"))
                .json(&serde_json::json!({
                    "holder": holder, "ttl_ms": 600_000, "reason": reason,
                    "locks": [{"key": key}]
                }))
                .send()
                .await?;
            anyhow::ensure!(
                resp.status().is_success(),
                "acquire {key}: {}",
                resp.status()
            );
        }
        anyhow::Ok(())
    })?;

    let dom = render(&browser, &format!("{base}/"));
    let _ = server.kill();
    let _ = server.wait();
    let dom = dom?;

    let locks = dom
        .split("<tbody id=\"locks\">")
        .nth(1)
        .and_then(|rest| rest.split("</tbody>").next())
        .expect("locks table rendered");
    for expected in [
        "clinic/patient/42",
        "dr-green",
        "editing chart",
        "vocab_import/RXNORM",
        "importer@host-1",
        "exclusive",
        "force release",
    ] {
        assert!(
            locks.contains(expected),
            "locks table lacks {expected:?}: {locks}"
        );
    }
    let events = dom
        .split("<ul id=\"events\">")
        .nth(1)
        .and_then(|rest| rest.split("</ul>").next())
        .expect("event feed rendered");
    assert!(
        events.contains("granted") && events.contains("vocab_import/RXNORM"),
        "event feed lacks the grants: {events}"
    );
    assert!(dom.contains(">connected<"), "status line says connected");
    Ok(())
}
