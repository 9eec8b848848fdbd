//! Refresh tokens: 256 random bits, given to the client once and stored only as a SHA-256.
//!
//! A fast hash is right here (unlike passwords): the token has full entropy, so there is nothing
//! to brute-force, and lookups stay cheap.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand_core::RngCore;
use sha2::{Digest, Sha256};

/// Length of an encoded token: 32 bytes in unpadded base64url.
const TOKEN_LENGTH: usize = 43;

/// Why a session (refresh-token family) ended: stored with it, and published in
/// `session.revoked`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Its owner logged out.
    Logout,
    /// A rotated refresh token of it was presented again: someone else may hold one.
    Reuse,
}

impl EndReason {
    /// As stored and published (the catalog lists these values).
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Logout => "logout",
            EndReason::Reuse => "reuse",
        }
    }
}

pub struct RefreshToken {
    /// What the client gets.
    pub token: String,
    /// What the database keeps.
    pub hash: [u8; 32],
}

impl RefreshToken {
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand_core::OsRng.fill_bytes(&mut bytes);
        let token = URL_SAFE_NO_PAD.encode(bytes);
        let hash = Sha256::digest(token.as_bytes()).into();
        Self { token, hash }
    }
}

/// The stored form of a token a client presented; `None` when it cannot be one of ours, so no
/// lookup is spent on it.
pub fn hash_presented(token: &str) -> Option<[u8; 32]> {
    let plausible = token.len() == TOKEN_LENGTH
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    plausible.then(|| Sha256::digest(token.as_bytes()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_unique_and_recognised() {
        let first = RefreshToken::generate();
        let second = RefreshToken::generate();
        assert_ne!(first.token, second.token);
        assert_eq!(hash_presented(&first.token), Some(first.hash));
        assert_eq!(hash_presented("short"), None);
        assert_eq!(hash_presented(&"!".repeat(TOKEN_LENGTH)), None);
    }
}
