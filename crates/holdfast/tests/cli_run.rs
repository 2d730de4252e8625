//! `holdfast run` against a real `holdfast serve` process: seed 000's scenarios (no-wait,
//! retries serialising two imports of the same code type, different types in parallel), exit
//! statuses, signals, environment, crash safety (SIGKILL of the runner), and a lost lock.

mod cli_support;

use cli_support::{Bg, Server, alive, sh_wait_for, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const KEY: &str = "vocab_import/RXNORM";

/// `holdfast run` args for `key` followed by `-- sh -c SCRIPT`.
fn run_sh<'a>(server: &Server, flags: &[&'a str], script: &'a str) -> std::process::Command {
    let mut args = vec!["run"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    server.cmd(&args)
}

#[test]
fn no_wait_second_run_fails_at_once_naming_the_holder() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let started = dir.path().join("started");
    let stop = dir.path().join("stop");
    let script = format!("touch '{}'; {}", started.display(), sh_wait_for(&stop));
    let first = Bg::spawn(run_sh(
        &server,
        &["--lock", KEY, "--holder", "importer@host-1"],
        &script,
    ));
    wait_until("the first import runs", || started.exists());

    let ran = dir.path().join("second-ran");
    let second_script = format!("touch '{}'", ran.display());
    let second = cli_support::finish(run_sh(
        &server,
        &["--lock", KEY, "--no-wait", "--holder", "importer@host-2"],
        &second_script,
    ));
    assert_eq!(second.code(), Some(3), "{second:?}");
    assert!(
        second
            .stderr
            .contains("failed to acquire vocab_import/RXNORM"),
        "{}",
        second.stderr
    );
    assert!(
        second.stderr.contains("held by importer@host-1 since"),
        "{}",
        second.stderr
    );
    assert!(second.stderr.contains("no-wait"), "{}", second.stderr);
    assert!(!ran.exists(), "the second command must not run");

    // --retry-delay 0 is the same no-wait mode (seed 000's --lock-retry-delay=0).
    let third = cli_support::finish(run_sh(
        &server,
        &["--lock", KEY, "--retry-delay", "0"],
        &second_script,
    ));
    assert_eq!(third.code(), Some(3), "{third:?}");
    assert!(!ran.exists());

    std::fs::write(&stop, "").unwrap();
    let first = first.wait();
    assert_eq!(first.code(), Some(0), "{first:?}");
    assert!(server.holders(KEY).is_empty(), "released after the command");
}

#[test]
fn with_retries_runs_on_the_same_key_never_overlap() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let inside = dir.path().join("inside");
    let log = dir.path().join("log");
    let overlap = dir.path().join("OVERLAP");
    // mkdir is atomic: it fails if another run is inside.
    let script = format!(
        "if ! mkdir '{inside}' 2>/dev/null; then touch '{overlap}'; fi; \
         echo \"start $HOLDFAST_FENCING_TOKEN\" >> '{log}'; sleep 0.3; \
         echo \"end $HOLDFAST_FENCING_TOKEN\" >> '{log}'; rmdir '{inside}'",
        inside = inside.display(),
        log = log.display(),
        overlap = overlap.display()
    );
    let runs: Vec<Bg> = (0..3)
        .map(|i| {
            let holder = format!("importer-{i}");
            Bg::spawn(run_sh(
                &server,
                &[
                    "--lock",
                    KEY,
                    "--holder",
                    &holder,
                    "--retry-attempts",
                    "60",
                    "--retry-delay",
                    "100ms",
                ],
                &script,
            ))
        })
        .collect();
    for r in runs {
        let out = r.wait();
        assert_eq!(out.code(), Some(0), "{out:?}");
    }
    assert!(!overlap.exists(), "two runs were inside at once");
    let log = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 6, "{log}");
    let mut last_token = 0u64;
    for pair in lines.chunks(2) {
        let start: u64 = pair[0].strip_prefix("start ").expect(&log).parse().unwrap();
        let end: u64 = pair[1].strip_prefix("end ").expect(&log).parse().unwrap();
        assert_eq!(start, end, "a run ended before the next started: {log}");
        assert!(start > last_token, "fencing tokens increase: {log}");
        last_token = start;
    }
}

#[test]
fn runs_on_different_keys_run_at_the_same_time() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    // Each waits for the other's file: both can finish only if both run at once.
    let script_a = format!("touch '{}'; {}", a.display(), sh_wait_for(&b));
    let script_b = format!("touch '{}'; {}", b.display(), sh_wait_for(&a));
    let ra = Bg::spawn(run_sh(
        &server,
        &["--lock", "vocab_import/RXNORM", "--no-wait"],
        &script_a,
    ));
    let rb = Bg::spawn(run_sh(
        &server,
        &["--lock", "vocab_import/SNOMED", "--no-wait"],
        &script_b,
    ));
    let (oa, ob) = (ra.wait(), rb.wait());
    assert_eq!(oa.code(), Some(0), "{oa:?}");
    assert_eq!(ob.code(), Some(0), "{ob:?}");
}

#[test]
fn exit_status_and_death_by_signal_pass_through() {
    let server = Server::start();
    let out = server.run(&["run", "--lock", "st/a", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.code(), Some(7), "{out:?}");
    let out = server.run(&["run", "--lock", "st/a", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.code(), Some(128 + 15), "{out:?}");
    let out = server.run(&["run", "--lock", "st/a", "--", "true"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(server.holders("st/a").is_empty());
}

#[test]
fn signals_to_the_runner_are_forwarded_to_the_command() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let got = dir.path().join("got");
    let script = format!(
        "trap 'echo TERM > \"{got}\"; exit 42' TERM; trap 'echo HUP >> \"{got}\"' HUP; touch '{ready}'; \
         i=0; while [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done; exit 99",
        got = got.display(),
        ready = ready.display()
    );
    let runner = Bg::spawn(run_sh(&server, &["--lock", "sig/a"], &script));
    wait_until("the command runs", || ready.exists());
    let pid = Pid::from_raw(runner.pid());
    kill(pid, Signal::SIGHUP).unwrap();
    wait_until("the command got SIGHUP", || {
        std::fs::read_to_string(&got)
            .unwrap_or_default()
            .contains("HUP")
    });
    // Still running and still holding the lock after a forwarded signal it handled.
    assert_eq!(server.holders("sig/a").len(), 1);
    kill(pid, Signal::SIGTERM).unwrap();
    let out = runner.wait();
    assert_eq!(out.code(), Some(42), "{out:?}");
    assert!(std::fs::read_to_string(&got).unwrap().contains("TERM"));
    assert!(server.holders("sig/a").is_empty());
}

#[test]
fn environment_reaches_the_command() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("env");
    let script = format!(
        "echo \"$HOLDFAST_LEASE_ID|$HOLDFAST_FENCING_TOKEN|$HOLDFAST_FENCING_TOKENS|$MY_VAR\" > '{}'",
        env.display()
    );
    let mut cmd = run_sh(&server, &["--lock", "env/a", "--lock", "env/b"], &script);
    cmd.env("MY_VAR", "inherited");
    let out = cli_support::finish(cmd);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let text = std::fs::read_to_string(&env).unwrap();
    let parts: Vec<&str> = text.trim().split('|').collect();
    assert_eq!(parts.len(), 4, "{text}");
    assert_eq!(parts[0].len(), 32, "lease id: {text}");
    assert!(parts[0].chars().all(|c| c.is_ascii_hexdigit()), "{text}");
    let token: u64 = parts[1].parse().expect("fencing token is a number");
    let tokens: Vec<u64> = parts[2].split(',').map(|t| t.parse().unwrap()).collect();
    assert_eq!(tokens.len(), 2, "{text}");
    assert_eq!(tokens[0], token);
    assert_ne!(tokens[0], tokens[1]);
    assert_eq!(parts[3], "inherited");
}

#[test]
fn sigkill_of_the_runner_lets_the_lease_expire_then_another_run_acquires() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let script = format!("echo $$ > '{}'; exec sleep 30", pidfile.display());
    let runner = Bg::spawn(run_sh(
        &server,
        &["--lock", KEY, "--ttl", "1s", "--holder", "crashed"],
        &script,
    ));
    wait_until("the command runs", || {
        std::fs::read_to_string(&pidfile).is_ok_and(|s| s.trim().parse::<i32>().is_ok())
    });
    let child_pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(server.holders(KEY), vec!["crashed"]);
    kill(Pid::from_raw(runner.pid()), Signal::SIGKILL).unwrap();
    drop(runner);
    // The command is not orphaned: the kernel kills it with its parent (Linux).
    if cfg!(target_os = "linux") {
        wait_until("the command dies with the runner", || !alive(child_pid));
    } else {
        let _ = kill(Pid::from_raw(child_pid), Signal::SIGKILL);
    }
    // Nobody released the lease: it expires after its TTL.
    wait_until("the lease expires", || server.holders(KEY).is_empty());
    let stats = server.run(&["stats", "--json"]);
    let stats: serde_json::Value = serde_json::from_str(&stats.stdout).unwrap();
    assert_eq!(stats["releases_total"], 0, "{stats}");
    assert_eq!(stats["expirations_total"], 1, "{stats}");
    let out = server.run(&["run", "--lock", KEY, "--no-wait", "--", "true"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
}

#[test]
fn stopping_the_server_mid_run_reports_a_lost_lock_and_stops_the_command() {
    let mut server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let stopped = dir.path().join("stopped");
    let script = format!(
        "trap 'echo stopped > \"{stopped}\"; exit 0' TERM; touch '{ready}'; \
         i=0; while [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done; exit 99",
        stopped = stopped.display(),
        ready = ready.display()
    );
    let runner = Bg::spawn(run_sh(
        &server,
        &["--lock", KEY, "--ttl", "2s", "--kill-grace", "5s"],
        &script,
    ));
    wait_until("the command runs", || ready.exists());
    server.kill();
    let out = runner.wait();
    assert_eq!(out.code(), Some(4), "{out:?}");
    assert!(
        out.stderr.contains("LOST the lock on vocab_import/RXNORM"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("at risk"), "{}", out.stderr);
    assert!(stopped.exists(), "the command got SIGTERM");
}

#[test]
fn a_command_ignoring_sigterm_is_killed_after_the_grace() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let script = format!(
        "trap '' TERM; touch '{}'; i=0; while [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done; exit 99",
        ready.display()
    );
    let runner = Bg::spawn(run_sh(
        &server,
        &["--lock", "grace/a", "--ttl", "1s", "--kill-grace", "500ms"],
        &script,
    ));
    wait_until("the command runs", || ready.exists());
    // An admin takes the key away: the runner's next renewal sees it.
    let out = server.run(&["admin", "release", "grace/a", "--reason", "test"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let out = runner.wait();
    assert_eq!(out.code(), Some(4), "{out:?}");
    assert!(out.stderr.contains("force-released"), "{}", out.stderr);
    assert!(out.stderr.contains("SIGKILL"), "{}", out.stderr);
}

#[test]
fn a_signal_while_waiting_aborts_the_wait_and_leaves_no_queued_request() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let started = dir.path().join("started");
    let stop = dir.path().join("stop");
    let holder_script = format!("touch '{}'; {}", started.display(), sh_wait_for(&stop));
    let first = Bg::spawn(run_sh(&server, &["--lock", KEY], &holder_script));
    wait_until("the first runs", || started.exists());

    let ran = dir.path().join("ran");
    let script = format!("touch '{}'", ran.display());
    let waiter = Bg::spawn(run_sh(
        &server,
        &["--lock", KEY, "--no-wait", "--wait", "50s"],
        &script,
    ));
    wait_until("the second is queued", || server.waiters(KEY) == 1);
    kill(Pid::from_raw(waiter.pid()), Signal::SIGTERM).unwrap();
    let out = waiter.wait();
    assert_eq!(out.code(), Some(128 + 15), "{out:?}");
    assert!(out.stderr.contains("while waiting"), "{}", out.stderr);
    assert!(
        out.stderr.contains("attempt 1/1 queued until"),
        "{}",
        out.stderr
    );
    wait_until("the queued request is gone", || server.waiters(KEY) == 0);

    std::fs::write(&stop, "").unwrap();
    assert_eq!(first.wait().code(), Some(0));
    assert!(!ran.exists());
    assert!(server.holders(KEY).is_empty(), "no grant was left behind");
}

#[test]
fn an_unknown_command_exits_127_and_releases() {
    let server = Server::start();
    let out = server.run(&[
        "run",
        "--lock",
        "nf/a",
        "--",
        "/nonexistent/holdfast-test-command",
    ]);
    assert_eq!(out.code(), Some(127), "{out:?}");
    assert!(out.stderr.contains("cannot execute"), "{}", out.stderr);
    assert!(server.holders("nf/a").is_empty());
}

#[test]
fn retries_exhausted_name_key_attempts_time_and_holder() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let started = dir.path().join("started");
    let stop = dir.path().join("stop");
    let script = format!("touch '{}'; {}", started.display(), sh_wait_for(&stop));
    let first = Bg::spawn(run_sh(
        &server,
        &["--lock", KEY, "--holder", "importer@host-1"],
        &script,
    ));
    wait_until("the first runs", || started.exists());
    let out = server.run(&[
        "run",
        "--lock",
        KEY,
        "--retry-attempts",
        "3",
        "--retry-delay",
        "50ms",
        "--",
        "true",
    ]);
    assert_eq!(out.code(), Some(3), "{out:?}");
    assert!(
        out.stderr
            .contains("failed to acquire vocab_import/RXNORM after 3 attempts ("),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("s): held by importer@host-1 since "),
        "{}",
        out.stderr
    );
    // Progress lines (not a terminal): attempt number and next retry.
    assert!(
        out.stderr.contains("attempt 1/3 failed, next attempt at"),
        "{}",
        out.stderr
    );
    std::fs::write(&stop, "").unwrap();
    assert_eq!(first.wait().code(), Some(0));
}

#[test]
fn shared_runs_overlap_and_exclude_an_exclusive_run() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let done = dir.path().join("done");
    // Both readers must be inside at once to finish; the second also waits for `done`.
    let script_a = format!("touch '{}'; {}", a.display(), sh_wait_for(&b));
    let script_b = format!(
        "touch '{}'; {}; {}",
        b.display(),
        sh_wait_for(&a),
        sh_wait_for(&done)
    );
    let ra = Bg::spawn(run_sh(
        &server,
        &["--lock", "sh/k", "--shared", "--no-wait"],
        &script_a,
    ));
    let rb = Bg::spawn(run_sh(
        &server,
        &["--lock", "sh/k", "--shared", "--no-wait"],
        &script_b,
    ));
    assert_eq!(ra.wait().code(), Some(0));
    // A writer is refused while a reader holds the key.
    let out = server.run(&["run", "--lock", "sh/k", "--no-wait", "--", "true"]);
    assert_eq!(out.code(), Some(3), "{out:?}");
    std::fs::write(&done, "").unwrap();
    assert_eq!(rb.wait().code(), Some(0));
    let out = server.run(&["run", "--lock", "sh/k", "--no-wait", "--", "true"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
}

#[test]
fn several_keys_are_acquired_all_or_none() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let started = dir.path().join("started");
    let stop = dir.path().join("stop");
    let script = format!("touch '{}'; {}", started.display(), sh_wait_for(&stop));
    let holder = Bg::spawn(run_sh(
        &server,
        &["--lock", "multi/b", "--holder", "b-holder"],
        &script,
    ));
    wait_until("b is held", || started.exists());
    let out = server.run(&[
        "run",
        "--lock",
        "multi/a",
        "--lock",
        "multi/b",
        "--no-wait",
        "--",
        "true",
    ]);
    assert_eq!(out.code(), Some(3), "{out:?}");
    assert!(
        out.stderr.contains("multi/b") && out.stderr.contains("b-holder"),
        "{}",
        out.stderr
    );
    assert!(
        server.holders("multi/a").is_empty(),
        "multi/a was not taken alone"
    );
    std::fs::write(&stop, "").unwrap();
    assert_eq!(holder.wait().code(), Some(0));
    let out = server.run(&[
        "run",
        "--lock",
        "multi/a",
        "--lock",
        "multi/b",
        "--no-wait",
        "--",
        "true",
    ]);
    assert_eq!(out.code(), Some(0), "{out:?}");
}
