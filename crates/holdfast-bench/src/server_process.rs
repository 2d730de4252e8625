//! A `holdfast serve` process started by the benchmark: its own process so that its resident
//! memory can be read from `/proc` and it competes for the CPU the way the peers' servers do.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// How long a server may take to print `listening on` (recovery of a large data dir included).
const START_TIMEOUT: Duration = Duration::from_secs(300);

/// One running `holdfast serve`.
pub struct ServerProcess {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    /// `127.0.0.1:PORT` of the wire protocol, if the server printed one.
    pub wire_addr: Option<String>,
    /// Time from spawn to the `listening on` line.
    pub to_listening: Duration,
    /// When it was spawned.
    pub spawned_at: Instant,
}

/// How to start a server.
#[derive(Clone, Debug)]
pub struct ServerSpec {
    /// The `holdfast` binary.
    pub bin: PathBuf,
    /// `memory`, `async` or `sync`.
    pub durability: String,
    /// `--data-dir`.
    pub data_dir: PathBuf,
    /// Where the server's stderr (its log) goes.
    pub log: PathBuf,
    /// Further flags (limits the workload needs, e.g. `--leases-per-token-max`).
    pub extra_args: Vec<String>,
}

impl ServerProcess {
    /// Starts `holdfast serve --listen 127.0.0.1:0` and waits for its `listening on` line.
    pub fn start(spec: &ServerSpec) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .with_context(|| format!("open {}", spec.log.display()))?;
        let spawned_at = Instant::now();
        let mut child = Command::new(&spec.bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--durability"])
            .arg(&spec.durability)
            .arg("--data-dir")
            .arg(&spec.data_dir)
            .args(&spec.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", spec.bin.display()))?;
        let stdout = child.stdout.take().context("server stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut base_url = None;
            // Keep draining after the first lines so the server never blocks on a full pipe.
            // `listening on URL` is followed at once by `wire protocol on ADDR` when enabled.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.split("listening on ").nth(1) {
                    base_url = Some(url.trim().to_owned());
                } else if let Some(addr) = line.split("wire protocol on ").nth(1)
                    && let Some(url) = base_url.take()
                {
                    let _ = tx.send((url, Some(addr.trim().to_owned())));
                } else if let Some(url) = base_url.take() {
                    let _ = tx.send((url, None));
                }
            }
            if let Some(url) = base_url.take() {
                let _ = tx.send((url, None));
            }
        });
        match rx.recv_timeout(START_TIMEOUT) {
            Ok((base_url, wire_addr)) => Ok(Self {
                child,
                base_url,
                wire_addr,
                to_listening: spawned_at.elapsed(),
                spawned_at,
            }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let tail = std::fs::read_to_string(&spec.log).unwrap_or_default();
                let tail: String = tail.lines().rev().take(20).collect::<Vec<_>>().join("\n");
                anyhow::bail!(
                    "{} serve did not print `listening on` within {START_TIMEOUT:?}; log tail (newest first):\n{tail}",
                    spec.bin.display()
                )
            }
        }
    }

    /// The server's PID.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server with SIGKILL (a crash) and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the server with SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill9();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill9();
        }
    }
}

/// The HTTP client [`wait_ready`] polls with.
///
/// # Errors
/// The client could not be built.
pub fn ready_probe() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .context("reqwest client")
}

/// Waits until `GET {base_url}/readyz` answers 200; returns when it did.
///
/// `http` comes from [`ready_probe`], built before the server is spawned so that its setup is
/// not part of a measured restart.
pub async fn wait_ready(
    http: &reqwest::Client,
    base_url: &str,
    timeout: Duration,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    let url = format!("{base_url}/readyz");
    loop {
        if let Ok(response) = http.get(&url).send().await
            && response.status() == reqwest::StatusCode::OK
        {
            return Ok(Instant::now());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{url} not ready within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The `holdfast` binary next to this executable (`target/release/holdfast` beside
/// `target/release/holdfast-bench`).
#[must_use]
pub fn default_holdfast_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("holdfast")))
        .unwrap_or_else(|| Path::new("holdfast").to_path_buf())
}
