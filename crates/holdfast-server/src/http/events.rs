//! `GET /v1/events?prefix=`: Server-Sent Events. Each event's `id:` is its sequence number
//! and `event:` its kind; `data:` is an [`EventBody`]. Reconnecting with `Last-Event-ID`
//! resumes from the server's buffer (the last [`crate::config::EVENT_BUFFER_MAX`] events); if
//! the buffer no longer has them, the stream starts with an explicit `missed` event
//! ([`EventsMissedBody`]). Keys outside the token's prefixes are never sent.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::Stream;
use holdfast_api::{ErrorBody, EventBody, EventsMissedBody};
use holdfast_core::Event;
use serde::Deserialize;
use tokio::sync::{broadcast, watch};

use super::{ApiQuery, AppState, Shared};
use crate::auth::Principal;
use crate::convert::event_body;
use crate::error::ApiError;
use crate::events::{EventHub, Missed};

/// Filters of `GET /v1/events`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only events whose key starts with this (lease-wide events without a key are skipped
    /// when a prefix is given).
    pub prefix: Option<String>,
}

/// Counts an open stream; released when the stream is dropped.
struct StreamSlot(Arc<AppState>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.event_streams.fetch_sub(1, Ordering::AcqRel);
    }
}

struct StreamState {
    _slot: StreamSlot,
    hub: Arc<EventHub>,
    backlog: VecDeque<Arc<Event>>,
    missed: Option<Missed>,
    live: broadcast::Receiver<Arc<Event>>,
    last_seq: Option<u64>,
    prefix: Option<String>,
    principal: Principal,
    shutdown: watch::Receiver<bool>,
}

impl StreamState {
    fn visible(&self, e: &Event) -> bool {
        match &e.key {
            Some(key) => {
                self.principal.may_access(key)
                    && self.prefix.as_deref().is_none_or(|p| key.starts_with(p))
            }
            None => self.prefix.is_none() && self.principal.prefixes.is_none(),
        }
    }
}

fn sse_event(e: &Event) -> SseEvent {
    let body: EventBody = event_body(e);
    let kind = body.kind.clone();
    SseEvent::default()
        .id(e.seq.to_string())
        .event(kind)
        .json_data(body)
        .unwrap_or_else(|_| SseEvent::default().comment("unserializable event"))
}

fn missed_event(m: Missed) -> SseEvent {
    let body = EventsMissedBody {
        kind: "missed".to_owned(),
        from_seq: m.from_seq,
        to_seq: m.to_seq,
        message: format!(
            "events {}..={} are no longer available (buffer exceeded or server restarted); re-read state with GET /v1/locks",
            m.from_seq, m.to_seq
        ),
    };
    SseEvent::default()
        .id(m.to_seq.to_string())
        .event("missed")
        .json_data(body)
        .unwrap_or_else(|_| SseEvent::default().comment("missed"))
}

fn event_stream(st: StreamState) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    futures::stream::unfold(st, |mut st| async move {
        loop {
            if *st.shutdown.borrow() {
                return None;
            }
            if let Some(m) = st.missed.take() {
                st.last_seq = Some(st.last_seq.unwrap_or(0).max(m.to_seq));
                return Some((Ok(missed_event(m)), st));
            }
            if let Some(e) = st.backlog.pop_front() {
                if st.last_seq.is_some_and(|l| e.seq <= l) {
                    continue;
                }
                st.last_seq = Some(e.seq);
                if !st.visible(&e) {
                    continue;
                }
                return Some((Ok(sse_event(&e)), st));
            }
            tokio::select! {
                changed = st.shutdown.changed() => {
                    if changed.is_err() || *st.shutdown.borrow() {
                        return None;
                    }
                }
                r = st.live.recv() => match r {
                    Ok(e) => st.backlog.push_back(e),
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Fell behind the live channel: resume from the ring buffer.
                        let sub = st.hub.subscribe(st.last_seq);
                        st.backlog = sub.backlog.into();
                        st.missed = sub.missed;
                        st.live = sub.live;
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            }
        }
    })
}

/// Stream events (SSE). Resume with the `Last-Event-ID` header.
#[utoipa::path(
    get, path = "/v1/events", tag = "events",
    params(
        EventsQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "resume after this sequence number"),
    ),
    responses(
        (status = 200, description = "text/event-stream; `event:` is the kind, `id:` the sequence number, `data:` an EventBody (or an EventsMissedBody for `missed`)", body = EventBody, content_type = "text/event-stream"),
        (status = 400, body = ErrorBody),
        (status = 503, description = "overloaded: too many open streams", body = ErrorBody),
    )
)]
pub async fn stream(
    state: Shared,
    principal: Principal,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let state: Arc<AppState> = state.0;
    let after = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::invalid(
                        "Last-Event-ID",
                        "Last-Event-ID must be an event sequence number",
                    )
                })?,
        ),
    };
    let max = state.config.limits.event_streams_max;
    if state.event_streams.fetch_add(1, Ordering::AcqRel) >= max {
        state.event_streams.fetch_sub(1, Ordering::AcqRel);
        return Err(ApiError::overloaded(format!(
            "too many open event streams (limit event_streams_max = {max})"
        )));
    }
    let slot = StreamSlot(Arc::clone(&state));
    let sub = state.hub.subscribe(after);
    let st = StreamState {
        _slot: slot,
        hub: Arc::clone(&state.hub),
        backlog: sub.backlog.into(),
        missed: sub.missed,
        live: sub.live,
        last_seq: after,
        prefix: q.prefix,
        principal,
        shutdown: state.shutdown.clone(),
    };
    Ok(Sse::new(event_stream(st)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
