//! The client subcommands other than `run`.

use std::time::Duration;

use holdfast_client::api::LeaseResponse;
use holdfast_client::{Client, ClientError, LockBuilder, RetryPolicy, StreamEvent};
use serde_json::json;

use crate::LockArgs;
use crate::output::{
    Output, countdown, holders_text, local_datetime, local_time, mode_name, table,
};

/// The retry policy the flags ask for: no-wait with `--no-wait` or `--retry-delay 0`.
#[must_use]
pub fn policy(args: &LockArgs) -> RetryPolicy {
    if args.no_wait || args.retry_delay.is_zero() || args.retry_attempts <= 1 {
        RetryPolicy::no_wait()
    } else {
        RetryPolicy::new(args.retry_attempts, args.retry_delay)
    }
}

/// A lock builder for the flags (not reentrant: two runs with the same `--holder` exclude
/// each other).
pub fn builder(client: &Client, args: &LockArgs) -> LockBuilder {
    let mut keys = args.keys.iter();
    let first = keys.next().cloned().unwrap_or_default();
    let mut b = client.lock(first);
    for k in keys {
        b = b.also(k.clone());
    }
    if args.shared {
        b = b.shared();
    }
    b = b
        .ttl(args.ttl)
        .wait(args.wait)
        .retry(policy(args))
        .reentrant(false);
    if let Some(h) = &args.holder {
        b = b.holder(h.clone());
    }
    if let Some(r) = &args.reason {
        b = b.reason(r.clone());
    }
    b
}

/// Comma-separated fencing tokens of `keys`, in their order.
#[must_use]
pub fn tokens_csv(lease: &LeaseResponse, keys: &[String]) -> String {
    keys.iter()
        .map(|k| {
            lease
                .locks
                .iter()
                .find(|l| &l.key == k)
                .map_or(0, |l| l.fencing_token)
                .to_string()
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn print_lease(out: &Output, lease: &LeaseResponse, keys: &[String]) {
    if out.json {
        Output::json_line(lease);
        return;
    }
    println!("HOLDFAST_LEASE_ID={}", lease.lease_id);
    println!(
        "HOLDFAST_FENCING_TOKEN={}",
        tokens_csv(lease, &keys[..keys.len().min(1)])
    );
    if keys.len() > 1 {
        println!("HOLDFAST_FENCING_TOKENS={}", tokens_csv(lease, keys));
    }
    eprintln!(
        "holdfast: {} held by {} until {} (not renewed: `holdfast renew {}` or `holdfast release {}`)",
        keys.join(", "),
        lease.holder,
        local_datetime(lease.expires_at_ms),
        lease.lease_id,
        lease.lease_id
    );
}

/// `holdfast acquire`.
pub async fn acquire(client: &Client, out: &Output, args: &LockArgs) -> u8 {
    let progress = crate::run::ProgressReporter::new(out.json);
    let b = progress.attach(builder(client, args));
    let result = b.acquire().await;
    progress.finish();
    match result {
        Ok(guard) => {
            let lease = guard.detach();
            print_lease(out, &lease, &args.keys);
            0
        }
        Err(e) => out.fail("acquire", &e),
    }
}

/// `holdfast release`.
pub async fn release(client: &Client, out: &Output, lease_id: &str, key: Option<&str>) -> u8 {
    let result = match key {
        Some(k) => client.release_lock(lease_id, k).await,
        None => client.release(lease_id).await,
    };
    match result {
        Ok(lease) => {
            if out.json {
                Output::json_line(&lease);
            } else if let Some(k) = key {
                println!("released {k}");
            } else {
                let keys: Vec<&str> = lease.locks.iter().map(|l| l.key.as_str()).collect();
                println!("released lease ({})", keys.join(", "));
            }
            0
        }
        Err(e) => out.fail("release", &e),
    }
}

/// `holdfast renew`.
pub async fn renew(client: &Client, out: &Output, lease_id: &str, ttl: Option<Duration>) -> u8 {
    match client.renew(lease_id, ttl).await {
        Ok(lease) => {
            if out.json {
                Output::json_line(&lease);
            } else {
                println!(
                    "renewed until {} ({} ms)",
                    local_datetime(lease.expires_at_ms),
                    lease.remaining_ms
                );
            }
            0
        }
        Err(ClientError::LeaseNotFound { message }) => {
            // Renewing a lease that is gone means its locks are lost (exit 4, like `run`).
            let e = ClientError::LeaseNotFound { message };
            out.fail("renew", &e);
            crate::exit::LOST
        }
        Err(e) => out.fail("renew", &e),
    }
}

/// `holdfast locks`.
pub async fn locks(
    client: &Client,
    out: &Output,
    prefix: Option<&str>,
    holder: Option<&str>,
) -> u8 {
    match client.list_locks(prefix, holder).await {
        Ok(list) => {
            if out.json {
                Output::json_line(&list);
                return 0;
            }
            let mut rows = Vec::new();
            for l in &list.locks {
                let waiters = l.waiters.len().to_string();
                if l.holders.is_empty() {
                    let state = l.delayed_until_ms.map_or("-".to_owned(), |u| {
                        format!("lock-delay until {}", local_time(u))
                    });
                    rows.push(vec![
                        l.key.clone(),
                        "-".into(),
                        state,
                        "-".into(),
                        "-".into(),
                        "-".into(),
                        waiters.clone(),
                        String::new(),
                    ]);
                }
                for h in &l.holders {
                    rows.push(vec![
                        l.key.clone(),
                        mode_name(h.mode).to_owned(),
                        h.holder.clone(),
                        local_time(h.since_ms),
                        countdown(h.expires_at_ms),
                        h.fencing_token.to_string(),
                        waiters.clone(),
                        h.reason.clone().unwrap_or_default(),
                    ]);
                }
            }
            if rows.is_empty() {
                println!("no locks");
            } else {
                table(
                    &[
                        "KEY", "MODE", "HOLDER", "SINCE", "EXPIRES", "TOKEN", "WAITERS", "REASON",
                    ],
                    &rows,
                );
            }
            0
        }
        Err(e) => out.fail("locks", &e),
    }
}

/// `holdfast show KEY`.
pub async fn show(client: &Client, out: &Output, key: &str) -> u8 {
    match client.lock_state(key).await {
        Ok(state) => {
            if out.json {
                Output::json_line(&state);
                return 0;
            }
            println!("key: {}", state.key);
            if let Some(limit) = state.limit {
                println!("semaphore limit: {limit}");
            }
            if let Some(until) = state.delayed_until_ms {
                println!("lock-delay until: {}", local_datetime(until));
            }
            if state.holders.is_empty() {
                println!("holders: none (free)");
            } else {
                println!("holders:");
                for h in &state.holders {
                    println!(
                        "  {} ({}) since {}, expires {}, fencing token {}{}{}",
                        h.holder,
                        h.permits.map_or_else(
                            || mode_name(h.mode).to_owned(),
                            |p| format!("{p} permit(s)")
                        ),
                        local_datetime(h.since_ms),
                        countdown(h.expires_at_ms),
                        h.fencing_token,
                        if h.count > 1 {
                            format!(", count {}", h.count)
                        } else {
                            String::new()
                        },
                        h.reason
                            .as_ref()
                            .map(|r| format!(", reason: {r}"))
                            .unwrap_or_default()
                    );
                }
            }
            if !state.waiters.is_empty() {
                println!("waiters (FIFO):");
                for w in &state.waiters {
                    println!(
                        "  {} ({}) since {}, gives up {}",
                        w.holder,
                        mode_name(w.mode),
                        local_time(w.since_ms),
                        countdown(w.deadline_ms)
                    );
                }
            }
            0
        }
        Err(e) => out.fail("show", &e),
    }
}

/// `holdfast stats`.
pub async fn stats(client: &Client, out: &Output) -> u8 {
    match client.stats().await {
        Ok(s) => {
            if out.json {
                Output::json_line(&s);
                return 0;
            }
            println!("active locks:     {}", s.active_locks);
            println!("leases:           {}", s.leases);
            println!("waiters:          {}", s.waiters);
            println!("idempotency:      {}", s.idempotency_records);
            println!("grants:           {}", s.grants_total);
            println!("releases:         {}", s.releases_total);
            println!("timeouts:         {}", s.timeouts_total);
            println!("deadlocks:        {}", s.deadlocks_total);
            println!("expirations:      {}", s.expirations_total);
            println!("force releases:   {}", s.force_releases_total);
            println!(
                "wait ms:          p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}  (n={})",
                s.wait_ms.p50, s.wait_ms.p90, s.wait_ms.p99, s.wait_ms.max, s.wait_ms.count
            );
            println!(
                "hold ms:          p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}  (n={})",
                s.hold_ms.p50, s.hold_ms.p90, s.hold_ms.p99, s.hold_ms.max, s.hold_ms.count
            );
            println!("durability:       {}", s.durability);
            println!("uptime:           {} s", s.uptime_s);
            0
        }
        Err(e) => out.fail("stats", &e),
    }
}

/// Consecutive failed reconnections after which `events` gives up.
const EVENTS_RECONNECT_TRIES: u32 = 10;

/// `holdfast events`: follow the stream, resuming with `Last-Event-ID` after a disconnect.
pub async fn events(client: &Client, out: &Output, prefix: Option<&str>) -> u8 {
    let mut last: Option<u64> = None;
    let mut failures = 0u32;
    loop {
        let mut stream = match client.events(prefix, last).await {
            Ok(s) => {
                failures = 0;
                s
            }
            Err(e)
                if matches!(e, ClientError::Unreachable { .. })
                    && last.is_some()
                    && failures < EVENTS_RECONNECT_TRIES =>
            {
                failures += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return out.fail("events", &e),
        };
        loop {
            match stream.next().await {
                Ok(Some(event)) => print_event(out, &event),
                Ok(None) | Err(_) => break,
            }
            last = stream.last_event_id().or(last);
        }
        last = stream.last_event_id().or(last).or(Some(0));
        eprintln!("holdfast events: stream ended; reconnecting");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn print_event(out: &Output, event: &StreamEvent) {
    match event {
        StreamEvent::Event(e) => {
            if out.json {
                Output::json_line(e);
                return;
            }
            let mut line = format!(
                "{} #{} {} {} by {}",
                local_time(e.at_ms),
                e.seq,
                e.kind,
                e.key.as_deref().unwrap_or("-"),
                e.holder
            );
            if let Some(m) = e.mode {
                line.push_str(&format!(" ({})", mode_name(m)));
            }
            if let Some(t) = e.fencing_token {
                line.push_str(&format!(" token {t}"));
            }
            if let Some(r) = &e.reason {
                line.push_str(&format!(" reason: {r}"));
            }
            println!("{line}");
        }
        StreamEvent::Missed(m) => {
            if out.json {
                Output::json_line(m);
            } else {
                println!("missed events {}..={}: {}", m.from_seq, m.to_seq, m.message);
            }
        }
        StreamEvent::Other { kind, data } => {
            if out.json {
                Output::json_line(&json!({"kind": kind, "data": data}));
            } else {
                println!("{} {data}", kind.as_deref().unwrap_or("message"));
            }
        }
    }
}

/// `holdfast admin release KEY --reason R`.
pub async fn admin_release(client: &Client, out: &Output, key: &str, reason: &str) -> u8 {
    match client.force_release_lock(key, reason).await {
        Ok(r) => {
            if out.json {
                Output::json_line(&r);
            } else {
                println!("force-released {key} from {}", holders_text(&r.released));
            }
            0
        }
        Err(e) => out.fail("admin release", &e),
    }
}

/// `holdfast admin release-lease ID --reason R`.
pub async fn admin_release_lease(
    client: &Client,
    out: &Output,
    lease_id: &str,
    reason: &str,
) -> u8 {
    match client.force_release_lease(lease_id, reason).await {
        Ok(r) => {
            if out.json {
                Output::json_line(&r);
            } else {
                let keys: Vec<String> = r.released.iter().map(|h| h.holder.clone()).collect();
                println!(
                    "force-released lease of {} ({} lock(s))",
                    keys.first().map_or("?", String::as_str),
                    r.released.len()
                );
            }
            0
        }
        Err(e) => out.fail("admin release-lease", &e),
    }
}
