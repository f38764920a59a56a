//! The shared secret: how a worker presents it and how the coordinator
//! checks it.
//!
//! The token travels in the `authorization` header of every call, not in a
//! message body, so the coordinator checks it before it reads a single byte
//! of the body: a stranger cannot make it buffer a 64 MiB "join request".
//! Comparison is constant-time (over SHA-256 digests, so even the length is
//! not learned from timing), and an empty or malformed token is refused at
//! start-up on both sides rather than silently meaning "no authentication".

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;

/// The header carrying `Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";

/// The header naming the member a Session speaks for (its id from JoinReply).
pub const MEMBER: &str = "gancluster-member";

/// The environment variable both binaries read the token from.
pub const TOKEN_ENV: &str = "GANCLUSTER_TOKEN";

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 256;

/// A token that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Empty or only blanks (an unset Secret key, an empty variable).
    #[error(
        "{TOKEN_ENV} is empty: an empty token would let anyone join; set the same non-empty \
         secret for the coordinator and every worker (e.g. `openssl rand -hex 16`)"
    )]
    Empty,
    /// Too long for a header.
    #[error("{TOKEN_ENV} is {0} bytes long; use at most {MAX_TOKEN_BYTES}")]
    TooLong(usize),
    /// Not printable ASCII, so not a valid header value.
    #[error(
        "{TOKEN_ENV} holds characters other than printable ASCII (at byte {0}): use letters, \
         digits and punctuation only, e.g. `openssl rand -hex 16`"
    )]
    Characters(usize),
}

/// A checked token.
#[derive(Clone)]
pub struct Token {
    header: MetadataValue<Ascii>,
    digest: [u8; 32],
}

impl Token {
    /// Checks `secret`: non-empty, printable ASCII without spaces, at most
    /// [`MAX_TOKEN_BYTES`].
    pub fn new(secret: &str) -> Result<Self, TokenError> {
        if secret.trim().is_empty() {
            return Err(TokenError::Empty);
        }
        if secret.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLong(secret.len()));
        }
        if let Some(at) = secret.bytes().position(|b| !b.is_ascii_graphic()) {
            return Err(TokenError::Characters(at));
        }
        let header = format!("Bearer {secret}")
            .parse()
            .map_err(|_| TokenError::Characters(0))?;
        Ok(Self {
            header,
            digest: Sha256::digest(secret.as_bytes()).into(),
        })
    }

    /// Whether `request` carries this token, compared in constant time.
    pub fn admits<T>(&self, request: &tonic::Request<T>) -> bool {
        let presented = request
            .metadata()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(digest.ct_eq(&self.digest))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

/// The client side: adds `authorization: Bearer <token>` to every call.
#[derive(Clone, Debug)]
pub struct Bearer(pub Token);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert(AUTHORIZATION, self.0.header.clone());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_with(token: &str) -> tonic::Request<()> {
        let mut bearer = Bearer(Token::new(token).unwrap());
        bearer.call(tonic::Request::new(())).unwrap()
    }

    #[test]
    fn the_right_token_is_admitted_and_others_are_not() {
        let token = Token::new("s3cret").unwrap();
        assert!(token.admits(&request_with("s3cret")));
        assert!(!token.admits(&request_with("s3cres")));
        assert!(!token.admits(&request_with("s3cret-and-more")));
        assert!(!token.admits(&tonic::Request::new(())), "no header at all");
    }

    #[test]
    fn empty_blank_long_or_odd_tokens_are_refused() {
        assert_eq!(Token::new("").unwrap_err(), TokenError::Empty);
        assert_eq!(Token::new("  ").unwrap_err(), TokenError::Empty);
        assert_eq!(
            Token::new(&"a".repeat(300)).unwrap_err(),
            TokenError::TooLong(300)
        );
        assert_eq!(Token::new("ab\ncd").unwrap_err(), TokenError::Characters(2));
        assert!(
            Token::new("")
                .unwrap_err()
                .to_string()
                .contains("GANCLUSTER_TOKEN is empty")
        );
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        assert_eq!(format!("{:?}", Token::new("s3cret").unwrap()), "Token(***)");
    }
}
