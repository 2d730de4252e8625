//! The server's event stream (`GET /v1/events`, Server-Sent Events) as a sequence of
//! [`StreamEvent`]s. The parser is a small line state machine (`id:`, `event:`, `data:`, blank
//! line dispatches; comments and keep-alives are skipped).

use futures::StreamExt;
use futures::stream::BoxStream;
use holdfast_api::{EventBody, EventsMissedBody};

use crate::error::ClientError;

/// One dispatched SSE event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    /// `id:` (the sequence number for holdfast).
    pub id: Option<String>,
    /// `event:` (the kind).
    pub event: Option<String>,
    /// `data:` lines joined with `\n`.
    pub data: String,
}

/// A decoded holdfast event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// A lock event (grant, release, expiry, ...).
    Event(EventBody),
    /// Events the server could no longer deliver on resume.
    Missed(EventsMissedBody),
    /// An event of an unknown shape (newer server): kind and raw data.
    Other {
        /// `event:`.
        kind: Option<String>,
        /// `data:`.
        data: String,
    },
}

/// Incremental SSE parser: feed bytes, take complete events.
#[derive(Debug, Default)]
pub struct SseParser {
    buffer: Vec<u8>,
    id: Option<String>,
    event: Option<String>,
    data: Vec<String>,
}

impl SseParser {
    /// Feed a chunk; returns the events it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<RawEvent> {
        self.buffer.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(pos) = self.buffer.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = self.buffer.drain(..=pos).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            if line.is_empty() {
                if !self.data.is_empty() || self.event.is_some() {
                    out.push(RawEvent {
                        id: self.id.take(),
                        event: self.event.take(),
                        data: self.data.join("\n"),
                    });
                }
                self.data.clear();
                self.id = None;
                self.event = None;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f.to_owned(), v.strip_prefix(' ').unwrap_or(v).to_owned()),
                None => (line.clone(), String::new()),
            };
            match field.as_str() {
                "id" => self.id = Some(value),
                "event" => self.event = Some(value),
                "data" => self.data.push(value),
                _ => {}
            }
        }
        out
    }
}

/// Decode a raw SSE event into a holdfast event.
#[must_use]
pub fn decode_event(raw: &RawEvent) -> StreamEvent {
    if raw.event.as_deref() == Some("missed") {
        if let Ok(m) = serde_json::from_str::<EventsMissedBody>(&raw.data) {
            return StreamEvent::Missed(m);
        }
    } else if let Ok(e) = serde_json::from_str::<EventBody>(&raw.data) {
        return StreamEvent::Event(e);
    }
    StreamEvent::Other {
        kind: raw.event.clone(),
        data: raw.data.clone(),
    }
}

/// A live event stream; [`EventStream::next`] yields events until the server ends it.
pub struct EventStream {
    bytes: BoxStream<'static, reqwest::Result<Vec<u8>>>,
    url: String,
    parser: SseParser,
    pending: std::collections::VecDeque<RawEvent>,
    last_event_id: Option<u64>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("last_event_id", &self.last_event_id)
            .finish_non_exhaustive()
    }
}

impl EventStream {
    pub(crate) fn new(response: reqwest::Response) -> Self {
        let url = response.url().to_string();
        Self {
            bytes: response
                .bytes_stream()
                .map(|r| r.map(|b| b.to_vec()))
                .boxed(),
            url,
            parser: SseParser::default(),
            pending: std::collections::VecDeque::new(),
            last_event_id: None,
        }
    }

    /// The id of the last event returned (pass it to [`crate::Client::events`] to resume).
    #[must_use]
    pub fn last_event_id(&self) -> Option<u64> {
        self.last_event_id
    }

    /// The next event; `Ok(None)` when the server ended the stream.
    ///
    /// # Errors
    /// `Unreachable` when the connection breaks.
    pub async fn next(&mut self) -> Result<Option<StreamEvent>, ClientError> {
        loop {
            if let Some(raw) = self.pending.pop_front() {
                if let Some(id) = raw.id.as_deref().and_then(|i| i.parse().ok()) {
                    self.last_event_id = Some(id);
                }
                return Ok(Some(decode_event(&raw)));
            }
            match self.bytes.next().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(crate::client::transport_error(&self.url, &e)),
                Some(Ok(chunk)) => self.pending.extend(self.parser.push(&chunk)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_split_across_chunks_and_skips_comments() {
        let mut p = SseParser::default();
        assert!(p.push(b": keep-alive\n\nid: 4\nevent: gra").is_empty());
        let evs = p.push(b"nted\ndata: {\"a\":1}\r\n\r\nid: 5\ndata: x\ndata: y\n\n");
        assert_eq!(
            evs,
            vec![
                RawEvent {
                    id: Some("4".into()),
                    event: Some("granted".into()),
                    data: "{\"a\":1}".into()
                },
                RawEvent {
                    id: Some("5".into()),
                    event: None,
                    data: "x\ny".into()
                },
            ]
        );
    }

    #[test]
    fn decodes_holdfast_events_and_missed() {
        let body = EventBody {
            seq: 3,
            kind: "granted".into(),
            at_ms: 1,
            key: Some("k".into()),
            holder: "h".into(),
            mode: None,
            fencing_token: Some(9),
            reason: None,
        };
        let raw = RawEvent {
            id: Some("3".into()),
            event: Some("granted".into()),
            data: serde_json::to_string(&body).unwrap(),
        };
        assert_eq!(decode_event(&raw), StreamEvent::Event(body));
        let missed = EventsMissedBody {
            kind: "missed".into(),
            from_seq: 1,
            to_seq: 2,
            message: "m".into(),
        };
        let raw = RawEvent {
            id: Some("2".into()),
            event: Some("missed".into()),
            data: serde_json::to_string(&missed).unwrap(),
        };
        assert_eq!(decode_event(&raw), StreamEvent::Missed(missed));
        let raw = RawEvent {
            id: None,
            event: Some("new".into()),
            data: "zzz".into(),
        };
        assert!(matches!(decode_event(&raw), StreamEvent::Other { .. }));
    }
}
