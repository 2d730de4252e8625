//! # The holdfast wire protocol (version 1)
//!
//! A compact framed protocol on one persistent TCP connection, beside the HTTP API, for the
//! calls a lock holder makes on every acquisition: create a lease, add locks, renew, release,
//! read a lease. It exists because HTTP framing (request line, headers, a connection per
//! in-flight request) cost several times the engine's work per call; the bodies stay the
//! HTTP API's JSON, so validation, error codes and messages are exactly the same.
//!
//! ```text
//! frame    = length:u32be payload            (length = payload bytes, ≤ FRAME_BYTES_MAX)
//! request  = id:u64be op:u8 body:JSON        (body may be empty for PING)
//! response = id:u64be status:u16be body:JSON (status 200, or the error code's HTTP status
//!                                             with an ErrorBody)
//! ```
//!
//! - The first request on a connection must be [`Op::Hello`] with a [`Hello`] body (protocol
//!   version and, when the server has tokens, the bearer token); anything else first, a wrong
//!   version or an unknown token is answered with an error and the connection is closed.
//! - Every request gets exactly one response with the same `id`. Responses may come in any
//!   order: a request that waits in a lock's queue does not hold up the others.
//! - A frame longer than the server's body limit is answered `413 payload_too_large` and the
//!   connection is closed (the stream cannot be resynchronised).
//! - [`Op::Cancel`] takes a waiting request out of its lock's queue; the cancelled request is
//!   still answered (with its grant if the grant won the race, which the client releases).
//! - A lease does not belong to the connection: closing it cancels the requests still waiting
//!   on it (they leave the queue) but keeps granted leases, which live until released or
//!   expired, as over HTTP.

use serde::{Deserialize, Serialize};

use crate::{ErrorBody, LockRequest};

pub mod compact;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Bytes of the length prefix.
pub const LENGTH_BYTES: usize = 4;
/// Bytes of a request header after the length: id and op.
pub const REQUEST_HEADER_BYTES: usize = 8 + 1;
/// Bytes of a response header after the length: id and status.
pub const RESPONSE_HEADER_BYTES: usize = 8 + 2;
/// Largest payload either side accepts (a server may set a lower limit for requests).
pub const FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;

/// The operation of a request frame.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u8)]
pub enum Op {
    /// [`Hello`] → [`HelloOk`]; must come first.
    Hello = 0x01,
    /// Empty body → `{}`.
    Ping = 0x02,
    /// [`Cancel`] → `{}`: stop waiting for an earlier request of this connection (it leaves
    /// the lock's queue). That request is still answered: with its grant if the grant came
    /// first (the client must then release it), else with an error.
    Cancel = 0x03,
    /// [`crate::CreateLeaseRequest`] → [`crate::LeaseResponse`] (`POST /v1/leases`).
    CreateLease = 0x10,
    /// [`AddLocks`] → [`crate::LeaseResponse`] (`POST /v1/leases/{id}/locks`).
    AddLocks = 0x11,
    /// [`LeaseRef`] → [`crate::LeaseResponse`] (`GET /v1/leases/{id}`).
    GetLease = 0x12,
    /// [`Renew`] → [`crate::LeaseResponse`] (`POST /v1/leases/{id}/renew`).
    Renew = 0x13,
    /// [`ReleaseLease`] → [`crate::LeaseResponse`], or `{}` when `quiet`
    /// (`DELETE /v1/leases/{id}`).
    ReleaseLease = 0x14,
    /// [`ReleaseLock`] → [`crate::LeaseResponse`] (`DELETE /v1/leases/{id}/locks/{key}`).
    ReleaseLock = 0x15,
    /// [`compact::CreateLease`] → [`compact::Lease`]: [`Op::CreateLease`] with compact bodies
    /// (errors are JSON as for every op). Only for servers that list
    /// [`FEATURE_COMPACT_LEASES`].
    CreateLeaseCompact = 0x20,
    /// The lease id's 32 hex digits as the whole body → an empty body: a quiet
    /// [`Op::ReleaseLease`] without JSON. Only for servers that list
    /// [`FEATURE_COMPACT_LEASES`].
    ReleaseLeaseCompact = 0x21,
}

impl Op {
    /// Every op, for documentation and tests.
    pub const ALL: [Op; 11] = [
        Op::Hello,
        Op::Ping,
        Op::Cancel,
        Op::CreateLease,
        Op::AddLocks,
        Op::GetLease,
        Op::Renew,
        Op::ReleaseLease,
        Op::ReleaseLock,
        Op::CreateLeaseCompact,
        Op::ReleaseLeaseCompact,
    ];

    /// The op of a byte, if any.
    #[must_use]
    pub fn from_byte(b: u8) -> Option<Op> {
        Op::ALL.into_iter().find(|op| *op as u8 == b)
    }

    /// Name for logs and metrics.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Op::Hello => "hello",
            Op::Ping => "ping",
            Op::Cancel => "cancel",
            Op::CreateLease => "create_lease",
            Op::AddLocks => "add_locks",
            Op::GetLease => "get_lease",
            Op::Renew => "renew",
            Op::ReleaseLease => "release_lease",
            Op::ReleaseLock => "release_lock",
            Op::CreateLeaseCompact => "create_lease_compact",
            Op::ReleaseLeaseCompact => "release_lease_compact",
        }
    }
}

/// Body of [`Op::Hello`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The bearer token's secret (required when the server has tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// Answer to [`Op::Hello`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct HelloOk {
    /// The version the server speaks on this connection.
    pub protocol: u32,
    /// `holdfast x.y.z`.
    pub server: String,
    /// Optional request fields and ops this server accepts (see [`FEATURE_QUIET_RELEASE`],
    /// [`FEATURE_COMPACT_LEASES`]). A client sends such a field or op only to a server that
    /// lists it; a server that predates the list sends none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// [`ReleaseLease::quiet`] is understood: a quiet release is answered `{}`.
pub const FEATURE_QUIET_RELEASE: &str = "quiet_release";

/// [`Op::CreateLeaseCompact`] and [`Op::ReleaseLeaseCompact`] are understood.
pub const FEATURE_COMPACT_LEASES: &str = "compact_leases";

/// Body of [`Op::ReleaseLease`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseLease {
    /// The lease (32 hex digits).
    pub lease_id: String,
    /// Answer `{}` instead of the released lease (a guard only needs to know that the release
    /// succeeded; building and sending the lease was most of the request's cost). Only for
    /// servers whose [`HelloOk::features`] list [`FEATURE_QUIET_RELEASE`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub quiet: bool,
}

/// Body of [`Op::Cancel`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cancel {
    /// The id of the request to stop waiting for.
    pub id: u64,
}

/// Body of [`Op::GetLease`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRef {
    /// The lease (32 hex digits).
    pub lease_id: String,
}

/// Body of [`Op::Renew`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Renew {
    /// The lease.
    pub lease_id: String,
    /// New TTL from now; default: the lease's current TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

/// Body of [`Op::ReleaseLock`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseLock {
    /// The lease.
    pub lease_id: String,
    /// The key to release (not percent-encoded: it is a JSON string).
    pub key: String,
}

/// Body of [`Op::AddLocks`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddLocks {
    /// The lease.
    pub lease_id: String,
    /// 0 (default) = no-wait; up to 60000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
    /// The locks to add.
    pub locks: Vec<LockRequest>,
}

/// Append a request frame (length prefix included) to `out`.
pub fn encode_request(out: &mut Vec<u8>, id: u64, op: Op, body: &[u8]) {
    let len = u32::try_from(REQUEST_HEADER_BYTES + body.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&id.to_be_bytes());
    out.push(op as u8);
    out.extend_from_slice(body);
}

/// Fill in the length prefix and header of a request frame whose body was written in place:
/// `frame` holds `LENGTH_BYTES + REQUEST_HEADER_BYTES` bytes of room, then the body. Lets a
/// client serialize its body straight into the frame (no second buffer, no copy).
///
/// # Panics
/// If `frame` is shorter than the length prefix and header.
pub fn finish_request(frame: &mut [u8], id: u64, op: Op) {
    let len = u32::try_from(frame.len() - LENGTH_BYTES).unwrap_or(u32::MAX);
    frame[..LENGTH_BYTES].copy_from_slice(&len.to_be_bytes());
    frame[LENGTH_BYTES..LENGTH_BYTES + 8].copy_from_slice(&id.to_be_bytes());
    frame[LENGTH_BYTES + 8] = op as u8;
}

/// Append a response frame (length prefix included) to `out`.
pub fn encode_response(out: &mut Vec<u8>, id: u64, status: u16, body: &[u8]) {
    let len = u32::try_from(RESPONSE_HEADER_BYTES + body.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&status.to_be_bytes());
    out.extend_from_slice(body);
}

/// Append an error response whose status is the code's HTTP status.
pub fn encode_error(out: &mut Vec<u8>, id: u64, body: &ErrorBody) {
    let json = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    encode_response(out, id, body.error.http_status(), &json);
}

/// A request payload split into its parts.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestParts<'a> {
    /// Request id (echoed in the response).
    pub id: u64,
    /// The raw op byte (see [`Op::from_byte`]).
    pub op: u8,
    /// JSON body.
    pub body: &'a [u8],
}

/// A response payload split into its parts.
#[derive(Debug, PartialEq, Eq)]
pub struct ResponseParts<'a> {
    /// The request's id.
    pub id: u64,
    /// 200 or the error's HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: &'a [u8],
}

/// Split a request payload (the bytes after the length prefix).
///
/// # Errors
/// A payload shorter than the header (the message says so).
pub fn parse_request(payload: &[u8]) -> Result<RequestParts<'_>, String> {
    if payload.len() < REQUEST_HEADER_BYTES {
        return Err(format!(
            "wire frame of {} bytes is shorter than a request header ({REQUEST_HEADER_BYTES} bytes: id, op)",
            payload.len()
        ));
    }
    let id = u64::from_be_bytes(payload[..8].try_into().unwrap_or_default());
    Ok(RequestParts {
        id,
        op: payload[8],
        body: &payload[REQUEST_HEADER_BYTES..],
    })
}

/// Split a response payload (the bytes after the length prefix).
///
/// # Errors
/// A payload shorter than the header (the message says so).
pub fn parse_response(payload: &[u8]) -> Result<ResponseParts<'_>, String> {
    if payload.len() < RESPONSE_HEADER_BYTES {
        return Err(format!(
            "wire frame of {} bytes is shorter than a response header ({RESPONSE_HEADER_BYTES} bytes)",
            payload.len()
        ));
    }
    let id = u64::from_be_bytes(payload[..8].try_into().unwrap_or_default());
    let status = u16::from_be_bytes(payload[8..10].try_into().unwrap_or_default());
    Ok(ResponseParts {
        id,
        status,
        body: &payload[RESPONSE_HEADER_BYTES..],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    #[test]
    fn request_frames_round_trip() {
        let mut out = Vec::new();
        encode_request(&mut out, 7, Op::Renew, br#"{"lease_id":"x"}"#);
        let len = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
        assert_eq!(len, out.len() - LENGTH_BYTES);
        let parts = parse_request(&out[4..]).unwrap();
        assert_eq!(parts.id, 7);
        assert_eq!(Op::from_byte(parts.op), Some(Op::Renew));
        assert_eq!(parts.body, br#"{"lease_id":"x"}"#);
    }

    #[test]
    fn a_request_finished_in_place_is_the_same_frame_as_an_encoded_one() {
        let body = br#"{"lease_id":"x"}"#;
        let mut encoded = Vec::new();
        encode_request(&mut encoded, 0x0102_0304_0506_0708, Op::ReleaseLease, body);
        let mut in_place = vec![0xff; LENGTH_BYTES + REQUEST_HEADER_BYTES];
        in_place.extend_from_slice(body);
        finish_request(&mut in_place, 0x0102_0304_0506_0708, Op::ReleaseLease);
        assert_eq!(in_place, encoded);
    }

    #[test]
    fn response_frames_round_trip_and_errors_carry_their_status() {
        let mut out = Vec::new();
        encode_error(
            &mut out,
            u64::MAX,
            &ErrorBody::new(ErrorCode::LeaseNotFound, "gone"),
        );
        let parts = parse_response(&out[4..]).unwrap();
        assert_eq!(parts.id, u64::MAX);
        assert_eq!(parts.status, 404);
        let body: ErrorBody = serde_json::from_slice(parts.body).unwrap();
        assert_eq!(body.error, ErrorCode::LeaseNotFound);
    }

    #[test]
    fn short_payloads_and_unknown_ops_are_refused() {
        assert!(parse_request(&[0; 8]).is_err());
        assert!(parse_response(&[0; 9]).is_err());
        assert_eq!(Op::from_byte(0x99), None);
        for op in Op::ALL {
            assert_eq!(Op::from_byte(op as u8), Some(op));
        }
    }
}
