//! Compact bodies for the two calls every acquisition makes: create a lease
//! ([`super::Op::CreateLeaseCompact`]) and release it ([`super::Op::ReleaseLeaseCompact`]).
//!
//! The JSON bodies of the other ops carry field names, escape every string and print every
//! number in decimal; decoding a lease answer was a quarter of a client's user-space
//! instructions per acquire+release pair, and encoding it a tenth of the server's. These
//! bodies are [postcard](https://postcard.jamesmunns.com/wire-format) encodings (varint
//! integers, length-prefixed UTF-8 strings, fields in declaration order, `Option` as a 0/1
//! tag) of the same fields as [`CreateLeaseRequest`] and [`LeaseResponse`], with the
//! metadata object carried as its JSON text. The server converts them to those types and runs
//! exactly the validation, engine call and error answers of the JSON op; an error answer is
//! still a JSON [`crate::ErrorBody`] with the code's HTTP status.
//!
//! A client uses them only with a server whose hello lists [`super::FEATURE_COMPACT_LEASES`].

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::{CreateLeaseRequest, HeldLock, LeaseResponse, LockMode, LockRequest, metadata_text};

/// Body of [`super::Op::CreateLeaseCompact`]: [`CreateLeaseRequest`], field for field.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct CreateLease<'a> {
    /// [`CreateLeaseRequest::holder`].
    #[serde(borrow)]
    pub holder: Cow<'a, str>,
    /// [`CreateLeaseRequest::ttl_ms`].
    pub ttl_ms: Option<u64>,
    /// [`CreateLeaseRequest::wait_ms`].
    pub wait_ms: Option<u64>,
    /// [`CreateLeaseRequest::reason`].
    #[serde(borrow)]
    pub reason: Option<Cow<'a, str>>,
    /// [`CreateLeaseRequest::metadata`] as JSON object text.
    #[serde(borrow)]
    pub metadata: Option<Cow<'a, str>>,
    /// [`CreateLeaseRequest::reentrant`].
    pub reentrant: Option<bool>,
    /// [`CreateLeaseRequest::locks`].
    #[serde(borrow)]
    pub locks: Vec<Lock<'a>>,
}

/// One lock of [`CreateLease`]: [`LockRequest`], field for field.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Lock<'a> {
    /// [`LockRequest::key`].
    #[serde(borrow)]
    pub key: Cow<'a, str>,
    /// [`LockRequest::mode`] (0 exclusive, 1 shared, 2 semaphore).
    pub mode: Option<LockMode>,
    /// [`LockRequest::limit`].
    pub limit: Option<u32>,
    /// [`LockRequest::permits`].
    pub permits: Option<u32>,
    /// [`LockRequest::lock_delay_ms`].
    pub lock_delay_ms: Option<u64>,
}

/// Answer to [`super::Op::CreateLeaseCompact`]: [`LeaseResponse`], field for field.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Lease<'a> {
    /// [`LeaseResponse::lease_id`].
    #[serde(borrow)]
    pub lease_id: Cow<'a, str>,
    /// [`LeaseResponse::holder`].
    #[serde(borrow)]
    pub holder: Cow<'a, str>,
    /// [`LeaseResponse::ttl_ms`].
    pub ttl_ms: u64,
    /// [`LeaseResponse::expires_at_ms`].
    pub expires_at_ms: u64,
    /// [`LeaseResponse::remaining_ms`].
    pub remaining_ms: u64,
    /// [`LeaseResponse::reason`].
    #[serde(borrow)]
    pub reason: Option<Cow<'a, str>>,
    /// [`LeaseResponse::metadata`] as JSON object text.
    #[serde(borrow)]
    pub metadata: Option<Cow<'a, str>>,
    /// [`LeaseResponse::locks`].
    #[serde(borrow)]
    pub locks: Vec<Held<'a>>,
}

/// One lock of [`Lease`]: [`HeldLock`], field for field.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Held<'a> {
    /// [`HeldLock::key`].
    #[serde(borrow)]
    pub key: Cow<'a, str>,
    /// [`HeldLock::mode`].
    pub mode: LockMode,
    /// [`HeldLock::limit`].
    pub limit: Option<u32>,
    /// [`HeldLock::permits`].
    pub permits: Option<u32>,
    /// [`HeldLock::fencing_token`].
    pub fencing_token: u64,
    /// [`HeldLock::count`].
    pub count: u32,
    /// [`HeldLock::acquired_at_ms`].
    pub acquired_at_ms: u64,
}

/// Why a compact body could not be read, and which field it concerns (`body` for the
/// encoding itself).
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[error("{message}")]
pub struct DecodeError {
    /// The field to name in an `invalid_request` answer.
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

/// Encode `value` after the bytes already in `out` (a frame's header, say).
///
/// # Errors
/// Only if `value` cannot be encoded by postcard (not the case for this module's types).
pub fn encode_into<T: Serialize>(value: &T, out: Vec<u8>) -> Result<Vec<u8>, String> {
    postcard::to_extend(value, out).map_err(|e| e.to_string())
}

/// Decode a whole body: trailing bytes are an error, as trailing JSON is.
///
/// # Errors
/// A body that is not a postcard encoding of `T`, or has bytes after it.
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, DecodeError> {
    let (value, rest) = postcard::take_from_bytes(body).map_err(|e| DecodeError {
        field: "body",
        message: format!("the body is not a compact (postcard) encoding of this op's body: {e}"),
    })?;
    if !rest.is_empty() {
        return Err(DecodeError {
            field: "body",
            message: format!(
                "the body has {} bytes after its compact (postcard) encoding",
                rest.len()
            ),
        });
    }
    Ok(value)
}

fn metadata_object(
    text: Option<&str>,
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, DecodeError> {
    text.map(|t| {
        serde_json::from_str(t).map_err(|e| DecodeError {
            field: "metadata",
            message: format!("metadata must be the text of a JSON object: {e}"),
        })
    })
    .transpose()
}

impl<'a> CreateLease<'a> {
    /// The compact form of `request`, borrowing its strings.
    #[must_use]
    pub fn of(request: &'a CreateLeaseRequest) -> Self {
        Self {
            holder: Cow::Borrowed(&request.holder),
            ttl_ms: request.ttl_ms,
            wait_ms: request.wait_ms,
            reason: request.reason.as_deref().map(Cow::Borrowed),
            metadata: request
                .metadata
                .as_ref()
                .map(|m| Cow::Owned(metadata_text(m))),
            reentrant: request.reentrant,
            locks: request
                .locks
                .iter()
                .map(|l| Lock {
                    key: Cow::Borrowed(&l.key),
                    mode: l.mode,
                    limit: l.limit,
                    permits: l.permits,
                    lock_delay_ms: l.lock_delay_ms,
                })
                .collect(),
        }
    }

    /// The request it stands for.
    ///
    /// # Errors
    /// Metadata that is not the text of a JSON object (field `metadata`).
    pub fn into_request(self) -> Result<CreateLeaseRequest, DecodeError> {
        Ok(CreateLeaseRequest {
            metadata: metadata_object(self.metadata.as_deref())?,
            holder: self.holder.into_owned(),
            ttl_ms: self.ttl_ms,
            wait_ms: self.wait_ms,
            reason: self.reason.map(Cow::into_owned),
            reentrant: self.reentrant,
            locks: self
                .locks
                .into_iter()
                .map(|l| LockRequest {
                    key: l.key.into_owned(),
                    mode: l.mode,
                    limit: l.limit,
                    permits: l.permits,
                    lock_delay_ms: l.lock_delay_ms,
                })
                .collect(),
        })
    }
}

impl<'a> Lease<'a> {
    /// The compact form of `lease`, borrowing its strings.
    #[must_use]
    pub fn of(lease: &'a LeaseResponse) -> Self {
        Self {
            lease_id: Cow::Borrowed(&lease.lease_id),
            holder: Cow::Borrowed(&lease.holder),
            ttl_ms: lease.ttl_ms,
            expires_at_ms: lease.expires_at_ms,
            remaining_ms: lease.remaining_ms,
            reason: lease.reason.as_deref().map(Cow::Borrowed),
            metadata: lease
                .metadata
                .as_ref()
                .map(|m| Cow::Owned(metadata_text(m))),
            locks: lease
                .locks
                .iter()
                .map(|l| Held {
                    key: Cow::Borrowed(&l.key),
                    mode: l.mode,
                    limit: l.limit,
                    permits: l.permits,
                    fencing_token: l.fencing_token,
                    count: l.count,
                    acquired_at_ms: l.acquired_at_ms,
                })
                .collect(),
        }
    }

    /// The lease it stands for.
    ///
    /// # Errors
    /// Metadata that is not the text of a JSON object (field `metadata`).
    pub fn into_response(self) -> Result<LeaseResponse, DecodeError> {
        Ok(LeaseResponse {
            metadata: metadata_object(self.metadata.as_deref())?,
            lease_id: self.lease_id.into_owned(),
            holder: self.holder.into_owned(),
            ttl_ms: self.ttl_ms,
            expires_at_ms: self.expires_at_ms,
            remaining_ms: self.remaining_ms,
            reason: self.reason.map(Cow::into_owned),
            locks: self
                .locks
                .into_iter()
                .map(|l| HeldLock {
                    key: l.key.into_owned(),
                    mode: l.mode,
                    limit: l.limit,
                    permits: l.permits,
                    fencing_token: l.fencing_token,
                    count: l.count,
                    acquired_at_ms: l.acquired_at_ms,
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn mode() -> impl Strategy<Value = LockMode> {
        prop_oneof![
            Just(LockMode::Exclusive),
            Just(LockMode::Shared),
            Just(LockMode::Semaphore)
        ]
    }

    fn metadata() -> impl Strategy<Value = Option<serde_json::Map<String, serde_json::Value>>> {
        proptest::option::of(proptest::collection::btree_map(
            "\\PC{0,8}",
            any::<i64>(),
            0..4,
        ))
        .prop_map(|m| {
            m.map(|m| {
                m.into_iter()
                    .map(|(k, v)| (k, serde_json::Value::from(v)))
                    .collect()
            })
        })
    }

    fn create_request() -> impl Strategy<Value = CreateLeaseRequest> {
        let lock = (
            "\\PC{1,40}",
            proptest::option::of(mode()),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(|(key, mode, limit, permits, lock_delay_ms)| LockRequest {
                key,
                mode,
                limit,
                permits,
                lock_delay_ms,
            });
        (
            "\\PC{0,40}",
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
            proptest::option::of("\\PC{0,40}"),
            metadata(),
            proptest::option::of(any::<bool>()),
            proptest::collection::vec(lock, 0..4),
        )
            .prop_map(
                |(holder, ttl_ms, wait_ms, reason, metadata, reentrant, locks)| {
                    CreateLeaseRequest {
                        holder,
                        ttl_ms,
                        wait_ms,
                        reason,
                        metadata,
                        reentrant,
                        locks,
                    }
                },
            )
    }

    fn lease() -> impl Strategy<Value = LeaseResponse> {
        let held = (
            "\\PC{1,40}",
            mode(),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u32>()),
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
        )
            .prop_map(
                |(key, mode, limit, permits, fencing_token, count, acquired_at_ms)| HeldLock {
                    key,
                    mode,
                    limit,
                    permits,
                    fencing_token,
                    count,
                    acquired_at_ms,
                },
            );
        (
            "[0-9a-f]{32}",
            "\\PC{0,40}",
            (any::<u64>(), any::<u64>(), any::<u64>()),
            proptest::option::of("\\PC{0,40}"),
            metadata(),
            proptest::collection::vec(held, 0..4),
        )
            .prop_map(
                |(
                    lease_id,
                    holder,
                    (ttl_ms, expires_at_ms, remaining_ms),
                    reason,
                    metadata,
                    locks,
                )| {
                    LeaseResponse {
                        lease_id,
                        holder,
                        ttl_ms,
                        expires_at_ms,
                        remaining_ms,
                        reason,
                        metadata,
                        locks,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn a_create_request_survives_the_compact_encoding(request in create_request()) {
            let body = encode_into(&CreateLease::of(&request), Vec::new()).unwrap();
            let back = decode::<CreateLease<'_>>(&body).unwrap().into_request().unwrap();
            prop_assert_eq!(back, request);
        }

        #[test]
        fn a_lease_survives_the_compact_encoding(lease in lease()) {
            let body = encode_into(&Lease::of(&lease), Vec::new()).unwrap();
            let back = decode::<Lease<'_>>(&body).unwrap().into_response().unwrap();
            prop_assert_eq!(back, lease);
        }

        #[test]
        fn no_byte_string_makes_the_decoder_panic(body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode::<CreateLease<'_>>(&body).and_then(CreateLease::into_request);
            let _ = decode::<Lease<'_>>(&body).and_then(Lease::into_response);
        }
    }

    #[test]
    fn a_one_lock_lease_is_a_third_of_its_json() {
        let lease = LeaseResponse {
            lease_id: "0123456789abcdef0123456789abcdef".into(),
            holder: "bench-17".into(),
            ttl_ms: 30_000,
            expires_at_ms: 1_765_000_000_000,
            remaining_ms: 30_000,
            reason: None,
            metadata: None,
            locks: vec![HeldLock {
                key: "w1/key-17".into(),
                mode: LockMode::Exclusive,
                limit: None,
                permits: None,
                fencing_token: 123_456,
                count: 1,
                acquired_at_ms: 1_765_000_000_000,
            }],
        };
        let compact = encode_into(&Lease::of(&lease), Vec::new()).unwrap();
        let json = serde_json::to_vec(&lease).unwrap();
        assert!(
            compact.len() * 3 <= json.len(),
            "{} vs {}",
            compact.len(),
            json.len()
        );
    }

    #[test]
    fn truncated_trailing_and_misencoded_bodies_are_refused_with_the_field() {
        let request = CreateLeaseRequest {
            holder: "h".into(),
            ttl_ms: None,
            wait_ms: None,
            reason: None,
            metadata: None,
            reentrant: None,
            locks: vec![LockRequest::exclusive("k")],
        };
        let body = encode_into(&CreateLease::of(&request), Vec::new()).unwrap();
        let truncated = decode::<CreateLease<'_>>(&body[..body.len() - 1]).unwrap_err();
        assert_eq!(truncated.field, "body");
        let mut longer = body.clone();
        longer.push(0);
        let trailing = decode::<CreateLease<'_>>(&longer).unwrap_err();
        assert_eq!(trailing.field, "body");
        assert!(
            trailing.message.contains("1 bytes after"),
            "{}",
            trailing.message
        );
        let mut with_list = CreateLease::of(&request);
        with_list.metadata = Some(Cow::Borrowed("[1, 2]"));
        let body = encode_into(&with_list, Vec::new()).unwrap();
        let err = decode::<CreateLease<'_>>(&body)
            .unwrap()
            .into_request()
            .unwrap_err();
        assert_eq!(err.field, "metadata");
    }
}
