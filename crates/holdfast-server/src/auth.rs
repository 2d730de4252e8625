//! Bearer-token authentication and the authorization rules of the API.
//!
//! Tokens come from the config file with the SHA-256 of their secret; a presented secret is
//! hashed and compared with every configured digest in constant time (`subtle::ct_eq`; every
//! digest is compared, so timing does not reveal which token matched). With no tokens
//! configured the server runs in open mode: every request acts as an anonymous admin.
//!
//! Rules:
//! - `reader`: `GET` only, on keys under its prefixes.
//! - `client`: leases, locks and idempotency records on keys under its prefixes; a lease it
//!   did not create is answered `404 lease_not_found` exactly as an unknown lease would be, so
//!   lease ids of others are neither usable nor confirmable.
//! - `admin`: everything, including force release and other tokens' leases.
//! - Listings and the event stream show only keys under the token's prefixes; lease ids only
//!   to admins and the lease's creator.

use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{Role, TokenConfig};
use crate::error::ApiError;

/// Who is calling.
#[derive(Clone, Debug)]
pub struct Principal {
    /// Token name (`None` in open mode); recorded as the owner of the leases it creates.
    pub name: Option<String>,
    /// Role.
    pub role: Role,
    /// Key prefixes it may touch; `None` = every key.
    pub prefixes: Option<Vec<String>>,
}

impl Principal {
    /// The open-mode principal: anonymous admin.
    #[must_use]
    pub fn open_admin() -> Self {
        Self {
            name: None,
            role: Role::Admin,
            prefixes: None,
        }
    }

    /// True for admins.
    #[must_use]
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// True if the key is under one of the token's prefixes.
    #[must_use]
    pub fn may_access(&self, key: &str) -> bool {
        match &self.prefixes {
            None => true,
            Some(prefixes) => prefixes.iter().any(|p| key.starts_with(p.as_str())),
        }
    }

    /// Refuse unless every key is under the token's prefixes.
    ///
    /// # Errors
    /// `403 forbidden` naming the first key outside.
    pub fn check_keys<'a>(&self, keys: impl IntoIterator<Item = &'a str>) -> Result<(), ApiError> {
        for key in keys {
            if !self.may_access(key) {
                return Err(ApiError::forbidden(format!(
                    "token {} may not touch key {key:?} (outside its prefixes)",
                    self.display_name()
                ))
                .with_key(key));
            }
        }
        Ok(())
    }

    /// Refuse readers (for every mutating route).
    ///
    /// # Errors
    /// `403 forbidden`.
    pub fn check_write(&self) -> Result<(), ApiError> {
        if self.role == Role::Reader {
            return Err(ApiError::forbidden(format!(
                "token {} has role reader: read-only",
                self.display_name()
            )));
        }
        Ok(())
    }

    /// Refuse non-admins.
    ///
    /// # Errors
    /// `403 forbidden`.
    pub fn check_admin(&self) -> Result<(), ApiError> {
        if !self.is_admin() {
            return Err(ApiError::forbidden(format!(
                "token {} is not an admin: only admins may do this",
                self.display_name()
            )));
        }
        Ok(())
    }

    /// The owner check the engine host applies to lease operations: `None` = any lease
    /// (admin), `Some(owner)` = only leases created by that owner.
    #[must_use]
    pub fn owner_filter(&self) -> Option<Option<String>> {
        if self.is_admin() {
            None
        } else {
            Some(self.name.clone())
        }
    }

    fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or("(open mode)")
    }
}

/// The configured tokens.
#[derive(Debug, Clone)]
pub struct Authenticator {
    tokens: Vec<(TokenConfig, [u8; 32])>,
}

impl Authenticator {
    /// From the config (digests already validated by [`crate::ServerConfig::validate`]).
    #[must_use]
    pub fn new(tokens: &[TokenConfig]) -> Self {
        let tokens = tokens
            .iter()
            .map(|t| {
                let mut digest = [0u8; 32];
                if let Ok(bytes) = hex::decode(&t.sha256)
                    && bytes.len() == 32
                {
                    digest.copy_from_slice(&bytes);
                }
                (t.clone(), digest)
            })
            .collect();
        Self { tokens }
    }

    /// True when no tokens are configured (everyone is admin).
    #[must_use]
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Identify the caller from the `Authorization: Bearer` header.
    ///
    /// # Errors
    /// `401 unauthorized` (with `WWW-Authenticate: Bearer`) if missing or unknown.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        if self.is_open() {
            return Ok(Principal::open_admin());
        }
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer token"))?;
        let value = value
            .to_str()
            .map_err(|_| ApiError::unauthorized("Authorization header is not ASCII"))?;
        let secret = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| ApiError::unauthorized("Authorization must be `Bearer <token>`"))?
            .trim();
        self.authenticate_secret(Some(secret))
    }

    /// Identify the caller from a token secret (the wire protocol's `hello`).
    ///
    /// # Errors
    /// `401 unauthorized` if missing or unknown while tokens are configured.
    pub fn authenticate_secret(&self, secret: Option<&str>) -> Result<Principal, ApiError> {
        if self.is_open() {
            return Ok(Principal::open_admin());
        }
        let secret =
            secret.ok_or_else(|| ApiError::unauthorized("missing token in the wire hello"))?;
        let presented: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let mut found: Option<&TokenConfig> = None;
        for (token, digest) in &self.tokens {
            if bool::from(presented.ct_eq(digest)) && found.is_none() {
                found = Some(token);
            }
        }
        let token = found.ok_or_else(|| ApiError::unauthorized("unknown bearer token"))?;
        Ok(Principal {
            name: Some(token.name.clone()),
            role: token.role,
            prefixes: token.prefixes.clone(),
        })
    }
}

/// Hex SHA-256 of a secret, as the config file stores it.
#[must_use]
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn auth() -> Authenticator {
        Authenticator::new(&[TokenConfig {
            name: "c".into(),
            role: Role::Client,
            sha256: hash_secret("s3cret"),
            prefixes: Some(vec!["clinic/".into()]),
        }])
    }

    #[test]
    fn bearer_token_matches_digest() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret"),
        );
        let p = auth().authenticate(&headers).unwrap();
        assert_eq!(p.name.as_deref(), Some("c"));
        assert!(p.may_access("clinic/x"));
        assert!(!p.may_access("other/x"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer wrong"),
        );
        assert!(auth().authenticate(&headers).is_err());
        assert!(auth().authenticate(&HeaderMap::new()).is_err());
    }
}
