//! Human and JSON output: times in local time, holders, tables, and error messages in the
//! spirit of seed 000 ("failed to acquire X after N attempts (T s): held by H since HH:MM:SS").

use std::time::Duration;

use chrono::{Local, TimeZone as _};
use holdfast_client::ClientError;
use holdfast_client::api::{HolderInfo, LockMode};
use serde_json::json;

use crate::duration::human;

/// Where and how to print.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// JSON on stdout instead of text.
    pub json: bool,
}

impl Output {
    /// Print a value as one JSON line on stdout.
    pub fn json_line(value: &impl serde::Serialize) {
        match serde_json::to_string(value) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("holdfast: cannot encode JSON: {e}"),
        }
    }

    /// Report a failed call (stderr text, plus a JSON error object on stdout with `--json`) and
    /// return its exit code.
    pub fn fail(&self, context: &str, e: &ClientError) -> u8 {
        if self.json {
            Self::json_line(&error_json(e));
        }
        eprintln!("holdfast {context}: {}", describe(e));
        crate::exit::code_of(e)
    }
}

/// JSON form of an error: `{error, message, key?, holders?, attempts?, waited_ms?}`.
#[must_use]
pub fn error_json(e: &ClientError) -> serde_json::Value {
    let mut v = json!({
        "error": e.code().map_or("unreachable", holdfast_client::api::ErrorCode::as_str),
        "message": describe(e),
        "exit_code": crate::exit::code_of(e),
    });
    if let ClientError::Held { key, holders, .. } | ClientError::Timeout { key, holders, .. } = e {
        v["key"] = json!(key);
        v["holders"] = json!(holders);
    }
    if let ClientError::Timeout {
        attempts, waited, ..
    } = e
    {
        v["attempts"] = json!(attempts);
        v["waited_ms"] = json!(u64::try_from(waited.as_millis()).unwrap_or(u64::MAX));
    }
    v
}

/// Local `HH:MM:SS` of an epoch-ms time.
#[must_use]
pub fn local_time(epoch_ms: u64) -> String {
    let Ok(ms) = i64::try_from(epoch_ms) else {
        return "?".into();
    };
    match Local.timestamp_millis_opt(ms) {
        chrono::LocalResult::Single(t) | chrono::LocalResult::Ambiguous(t, _) => {
            t.format("%H:%M:%S").to_string()
        }
        chrono::LocalResult::None => "?".into(),
    }
}

/// Local date and time of an epoch-ms time (RFC 3339, seconds).
#[must_use]
pub fn local_datetime(epoch_ms: u64) -> String {
    let Ok(ms) = i64::try_from(epoch_ms) else {
        return "?".into();
    };
    match Local.timestamp_millis_opt(ms) {
        chrono::LocalResult::Single(t) | chrono::LocalResult::Ambiguous(t, _) => {
            t.to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
        }
        chrono::LocalResult::None => "?".into(),
    }
}

/// `importer@host-1 since 02:00:03 (reason)`, comma-separated.
#[must_use]
pub fn holders_text(holders: &[HolderInfo]) -> String {
    holders
        .iter()
        .map(|h| {
            let mut s = format!("{} since {}", h.holder, local_time(h.since_ms));
            if let Some(r) = &h.reason {
                s.push_str(&format!(" ({r})"));
            }
            s
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The user-facing sentence for an error.
#[must_use]
pub fn describe(e: &ClientError) -> String {
    match e {
        ClientError::Held {
            key,
            holders,
            delayed_until_ms,
        } => {
            let mut s = format!("failed to acquire {key}");
            if holders.is_empty() {
                if let Some(until) = delayed_until_ms {
                    s.push_str(&format!(
                        ": in lock-delay until {} after an involuntary release",
                        local_time(*until)
                    ));
                } else {
                    s.push_str(": held");
                }
            } else {
                s.push_str(&format!(": held by {}", holders_text(holders)));
            }
            s
        }
        ClientError::Timeout {
            key,
            holders,
            attempts,
            waited,
        } => {
            let secs = if waited.as_secs() < 10 {
                format!("{:.1}", waited.as_secs_f64())
            } else {
                waited.as_secs().to_string()
            };
            let mut s = format!(
                "failed to acquire {key} after {attempts} attempt{} ({secs} s)",
                if *attempts == 1 { "" } else { "s" },
            );
            if !holders.is_empty() {
                s.push_str(&format!(": held by {}", holders_text(holders)));
            }
            s
        }
        other => other.to_string(),
    }
}

/// `exclusive`, `shared`, `semaphore`.
#[must_use]
pub fn mode_name(mode: LockMode) -> &'static str {
    match mode {
        LockMode::Exclusive => "exclusive",
        LockMode::Shared => "shared",
        LockMode::Semaphore => "semaphore",
    }
}

/// `in 25s` / `expired` relative to now (epoch ms).
#[must_use]
pub fn countdown(until_ms: u64) -> String {
    let now = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
    if until_ms <= now {
        "now".into()
    } else {
        format!("in {}", human(Duration::from_millis(until_ms - now)))
    }
}

/// Print rows as an aligned table.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row.clone());
    }
}
