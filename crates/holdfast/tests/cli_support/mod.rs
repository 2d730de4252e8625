//! Shared helpers of the CLI tests: a real `holdfast serve` process (memory durability,
//! ephemeral port), `holdfast` client invocations, bounded waits. Nothing here asserts on
//! elapsed time: every wait polls for a state and fails after a generous bound.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// Upper bound of any wait in these tests (generous: the machine is shared).
pub const BOUND: Duration = Duration::from_secs(60);

pub const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

/// A running `holdfast serve` child.
pub struct Server {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Server {
    pub fn start() -> Self {
        Self::start_with_config(None)
    }

    /// A server with this TOML config file (tokens, limits).
    pub fn start_with_config(config: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(BIN);
        cmd.args([
            "serve",
            "--durability",
            "memory",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path());
        if let Some(text) = config {
            let path = dir.path().join("holdfast.toml");
            std::fs::write(&path, text).expect("config file");
            cmd.arg("--config").arg(path);
        }
        let mut child = cmd
            .env("HOLDFAST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn holdfast serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("listening on ").filter(|_| !sent) {
                    let _ = tx.send(url.trim().to_owned());
                    sent = true;
                }
            }
        });
        let url = rx
            .recv_timeout(BOUND)
            .expect("server prints `listening on`");
        Self {
            child,
            url,
            _dir: dir,
        }
    }

    /// SIGKILL the server.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `holdfast ARGS` against this server.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.env("HOLDFAST_URL", &self.url)
            .env_remove("HOLDFAST_TOKEN")
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// Run `holdfast ARGS` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        finish(self.cmd(args))
    }

    /// `holdfast show KEY --json`: the holders' names.
    pub fn holders(&self, key: &str) -> Vec<String> {
        let state = self.state(key);
        state["holders"]
            .as_array()
            .map(|hs| {
                hs.iter()
                    .map(|h| h["holder"].as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `holdfast show KEY --json`.
    pub fn state(&self, key: &str) -> serde_json::Value {
        let out = self.run(&["show", key, "--json"]);
        assert!(out.status.success(), "show {key}: {}", out.stderr);
        serde_json::from_str(&out.stdout).expect("show --json is JSON")
    }

    /// Waiters queued on `key`.
    pub fn waiters(&self, key: &str) -> usize {
        self.state(key)["waiters"].as_array().map_or(0, Vec::len)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A finished process.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// A background process whose output goes to files (so orphans cannot hold a pipe open).
pub struct Bg {
    pub child: Child,
    out: PathBuf,
    err: PathBuf,
    _dir: tempfile::TempDir,
}

impl Bg {
    pub fn spawn(mut cmd: Command) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("stdout");
        let err = dir.path().join("stderr");
        cmd.stdout(std::fs::File::create(&out).expect("stdout file"))
            .stderr(std::fs::File::create(&err).expect("stderr file"));
        let child = cmd.spawn().expect("spawn holdfast");
        Self {
            child,
            out,
            err,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }

    /// Wait (bounded) for the exit.
    pub fn wait(mut self) -> Output {
        let mut status = None;
        poll_until(|| {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        let Some(status) = status else {
            let _ = self.child.kill();
            panic!(
                "process did not exit within {BOUND:?}; stderr: {}",
                std::fs::read_to_string(&self.err).unwrap_or_default()
            );
        };
        Output {
            status,
            stdout: std::fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.err).unwrap_or_default(),
        }
    }

    pub fn stderr_now(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run a command to completion (bounded).
pub fn finish(cmd: Command) -> Output {
    Bg::spawn(cmd).wait()
}

/// Poll interval of [`wait_until`].
const POLL: Duration = Duration::from_millis(20);

/// Poll `check` every [`POLL`] until it holds; panic after about [`BOUND`] of polls (a hang
/// guard, not a speed check).
pub fn wait_until(what: &str, check: impl FnMut() -> bool) {
    assert!(
        poll_until(check),
        "gave up waiting until {what} after {BOUND:?} of polls"
    );
}

/// Poll `check` every [`POLL`] for about [`BOUND`]; false if it never held.
fn poll_until(mut check: impl FnMut() -> bool) -> bool {
    for _ in 0..BOUND.as_millis() / POLL.as_millis() {
        if check() {
            return true;
        }
        std::thread::sleep(POLL);
    }
    false
}

/// A shell snippet that waits (bounded, ~30 s) for `file` to exist, else exits 99.
pub fn sh_wait_for(file: &Path) -> String {
    format!(
        "i=0; while [ ! -e '{f}' ]; do i=$((i+1)); if [ $i -gt 3000 ]; then exit 99; fi; sleep 0.01; done",
        f = file.display()
    )
}

/// True if a process with this pid exists (and is not a zombie we could reap).
pub fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Field 3 is the state; `Z` is a zombie, `X` dead.
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("X");
    !stat.is_empty() && state != "Z" && state != "X"
}
