//! `holdfast serve` as a process: prints its address, serves, refuses insecure binds, and
//! refuses a corrupt data directory with a clear message.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn holdfast() -> Command {
    Command::new(env!("CARGO_BIN_EXE_holdfast"))
}

#[test]
fn serve_prints_listening_address_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = holdfast()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .expect("first line names the address")
        .to_owned();
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 200);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let exit = child.wait().unwrap();
    assert!(exit.success(), "graceful shutdown exits 0: {exit}");
    assert!(dir.path().join("data/holdfast.redb").exists());
}

#[test]
fn serve_refuses_open_mode_on_all_interfaces() {
    let out = holdfast()
        .args(["serve", "--durability", "memory", "--listen", "0.0.0.0:0"])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--allow-insecure-bind"), "{stderr}");
}

#[test]
fn serve_refuses_a_corrupt_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("holdfast.redb"), vec![7u8; 64 * 1024]).unwrap();
    let out = holdfast()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("holdfast.redb"), "{stderr}");
}
