//! The non-`run` subcommands against a real server: acquire/renew/release by id, listings,
//! admin force release, stats, events, `--json`, and the documented exit codes.

mod cli_support;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use cli_support::{Server, finish};

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {text:?}"))
}

#[test]
fn acquire_prints_shell_assignments_renew_and_release_by_id() {
    let server = Server::start();
    let out = server.run(&[
        "acquire",
        "--lock",
        "cmd/a",
        "--lock",
        "cmd/b",
        "--holder",
        "ops",
        "--reason",
        "maintenance",
    ]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let vars: std::collections::HashMap<&str, &str> = out
        .stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .collect();
    let lease_id = vars["HOLDFAST_LEASE_ID"].to_owned();
    assert_eq!(lease_id.len(), 32);
    let token: u64 = vars["HOLDFAST_FENCING_TOKEN"].parse().unwrap();
    assert!(vars["HOLDFAST_FENCING_TOKENS"].starts_with(&format!("{token},")));
    assert_eq!(server.holders("cmd/a"), vec!["ops"]);
    // The lease outlives the command (not released on exit).
    let state = server.state("cmd/b");
    assert_eq!(state["holders"][0]["reason"], "maintenance");

    let out = server.run(&["renew", &lease_id, "--ttl", "2m", "--json"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(json(&out.stdout)["ttl_ms"], 120_000);

    let out = server.run(&["release", &lease_id, "--key", "cmd/a"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(server.holders("cmd/a").is_empty());
    assert_eq!(server.holders("cmd/b"), vec!["ops"]);
    let out = server.run(&["release", &lease_id]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(server.holders("cmd/b").is_empty());
    // A second release: the lease is gone.
    let out = server.run(&["release", &lease_id]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("lease not found"), "{}", out.stderr);
    // Renewing it: the lock is lost.
    let out = server.run(&["renew", &lease_id]);
    assert_eq!(out.code(), Some(4), "{out:?}");
}

#[test]
fn acquire_json_and_not_acquired_json() {
    let server = Server::start();
    let out = server.run(&["acquire", "--lock", "j/a", "--holder", "alice", "--json"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let lease = json(&out.stdout);
    assert_eq!(lease["holder"], "alice");
    assert!(lease["locks"][0]["fencing_token"].as_u64().unwrap() > 0);

    let out = server.run(&[
        "acquire",
        "--lock",
        "j/a",
        "--holder",
        "bob",
        "--no-wait",
        "--json",
    ]);
    assert_eq!(out.code(), Some(3), "{out:?}");
    let err = json(&out.stdout);
    assert_eq!(err["error"], "lock_held");
    assert_eq!(err["key"], "j/a");
    assert_eq!(err["holders"][0]["holder"], "alice");
    assert_eq!(err["exit_code"], 3);
}

#[test]
fn locks_table_filters_and_show() {
    let server = Server::start();
    for (key, holder) in [("list/a", "alice"), ("list/b", "bob"), ("other/c", "carol")] {
        assert_eq!(
            server
                .run(&["acquire", "--lock", key, "--holder", holder])
                .code(),
            Some(0)
        );
    }
    let out = server.run(&["locks", "--prefix", "list/"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].starts_with("KEY"), "{}", out.stdout);
    assert_eq!(lines.len(), 3, "{}", out.stdout);
    assert!(lines[1].contains("list/a") && lines[1].contains("alice"));
    let out = server.run(&["locks", "--holder", "carol", "--json"]);
    let list = json(&out.stdout);
    assert_eq!(list["locks"].as_array().unwrap().len(), 1);
    assert_eq!(list["locks"][0]["key"], "other/c");

    let out = server.run(&["show", "list/b"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(
        out.stdout.contains("bob (exclusive) since"),
        "{}",
        out.stdout
    );
    let out = server.run(&["show", "free/key"]);
    assert!(out.stdout.contains("free"), "{}", out.stdout);
}

#[test]
fn admin_release_frees_a_key_and_a_lease() {
    let server = Server::start();
    assert_eq!(
        server
            .run(&["acquire", "--lock", "adm/a", "--holder", "stuck"])
            .code(),
        Some(0)
    );
    let out = server.run(&["admin", "release", "adm/a", "--reason", "importer crashed"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("stuck"), "{}", out.stdout);
    assert!(server.holders("adm/a").is_empty());
    // Nobody holds it now.
    let out = server.run(&["admin", "release", "adm/a", "--reason", "again"]);
    assert_eq!(out.code(), Some(1), "{out:?}");

    let out = server.run(&["acquire", "--lock", "adm/b", "--json"]);
    let lease_id = json(&out.stdout)["lease_id"].as_str().unwrap().to_owned();
    let out = server.run(&["admin", "release-lease", &lease_id, "--reason", "cleanup"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(server.holders("adm/b").is_empty());
    // The reason is required.
    let out = server.run(&["admin", "release", "adm/b"]);
    assert_eq!(out.code(), Some(2), "{out:?}");
}

#[test]
fn stats_counts_grants() {
    let server = Server::start();
    assert_eq!(
        server.run(&["run", "--lock", "s/a", "--", "true"]).code(),
        Some(0)
    );
    let out = server.run(&["stats", "--json"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let stats = json(&out.stdout);
    assert_eq!(stats["grants_total"], 1);
    assert_eq!(stats["releases_total"], 1);
    assert_eq!(stats["durability"], "memory");
    let out = server.run(&["stats"]);
    assert!(out.stdout.contains("grants:"), "{}", out.stdout);
}

#[test]
fn events_follow_the_stream() {
    let server = Server::start();
    let mut events = server.cmd(&["events", "--prefix", "ev/", "--json"]);
    events.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = events.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Events are only sent for changes after the stream starts: retry the run until seen.
    let mut kinds = Vec::new();
    let mut rounds = 0;
    while !(kinds.contains(&"granted".to_owned()) && kinds.contains(&"released".to_owned())) {
        rounds += 1;
        assert!(rounds < 100, "no events seen: {kinds:?}");
        assert_eq!(
            server
                .run(&["run", "--lock", "ev/x", "--holder", "evh", "--", "true"])
                .code(),
            Some(0)
        );
        while let Ok(line) = rx.recv_timeout(std::time::Duration::from_millis(200)) {
            let e = json(&line);
            assert_eq!(e["key"], "ev/x");
            assert_eq!(e["holder"], "evh");
            kinds.push(e["kind"].as_str().unwrap().to_owned());
        }
        let _ = server.run(&["run", "--lock", "other/y", "--", "true"]);
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn unreachable_server_exits_5_and_usage_errors_exit_2() {
    let out = finish({
        let mut c = std::process::Command::new(cli_support::BIN);
        c.args(["--server", "http://127.0.0.1:9", "locks"]);
        c
    });
    assert_eq!(out.code(), Some(5), "{out:?}");
    assert!(out.stderr.contains("unreachable"), "{}", out.stderr);

    let server = Server::start();
    // A server address without a scheme is plain HTTP.
    let bare = server.url.trim_start_matches("http://").to_owned();
    let out = server.run(&["--server", &bare, "stats"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    for args in [
        vec!["run", "--lock", "u/a"],                              // no command
        vec!["run", "--", "true"],                                 // no --lock
        vec!["run", "--lock", "u/a", "--ttl", "5x", "--", "true"], // bad duration
    ] {
        let out = server.run(&args);
        assert_eq!(out.code(), Some(2), "{args:?}: {out:?}");
    }
    // The server refuses a TTL under 1 s: a usage error too, naming the field.
    let out = server.run(&["run", "--lock", "u/a", "--ttl", "10ms", "--", "true"]);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("ttl"), "{}", out.stderr);
}

#[test]
fn help_documents_the_exit_codes() {
    let out = finish({
        let mut c = std::process::Command::new(cli_support::BIN);
        c.arg("--help");
        c
    });
    assert_eq!(out.code(), Some(0));
    for needle in [
        "Exit codes:",
        "3    lock not acquired",
        "4    lock lost",
        "5    server unreachable",
        "6    unauthorized",
    ] {
        assert!(out.stdout.contains(needle), "{needle}: {}", out.stdout);
    }
}

#[test]
fn unauthorized_and_forbidden_exit_6() {
    // Secrets `s3cret` (client on `app/`) and `adm1n` (admin), stored as SHA-256 digests.
    let server = Server::start_with_config(Some(
        r#"
[[tokens]]
name = "app"
role = "client"
sha256 = "1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0"
prefixes = ["app/"]

[[tokens]]
name = "ops"
role = "admin"
sha256 = "8f8145e0f8d63c646e48f5a0377007c2193fce8c87399b5d9a59dec43b4cb45b"
"#,
    ));
    let out = server.run(&["run", "--lock", "app/a", "--", "true"]);
    assert_eq!(out.code(), Some(6), "{out:?}");
    let out = server.run(&["--token", "wrong", "locks"]);
    assert_eq!(out.code(), Some(6), "{out:?}");
    let mut cmd = server.cmd(&["run", "--lock", "other/a", "--", "true"]);
    cmd.env("HOLDFAST_TOKEN", "s3cret");
    let out = finish(cmd);
    assert_eq!(out.code(), Some(6), "{out:?}");
    assert!(out.stderr.contains("forbidden"), "{}", out.stderr);
    let mut cmd = server.cmd(&["run", "--lock", "app/a", "--", "true"]);
    cmd.env("HOLDFAST_TOKEN", "s3cret");
    assert_eq!(finish(cmd).code(), Some(0));
    let out = server.run(&[
        "--token", "s3cret", "admin", "release", "app/a", "--reason", "x",
    ]);
    assert_eq!(out.code(), Some(6), "{out:?}");
}
