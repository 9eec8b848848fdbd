//! auth's domain, free of HTTP: accounts and their rules, password hashing, login limits and
//! sessions (refresh-token families). [`Accounts`] is the one entry point handlers call.

pub mod accounts;
pub mod login_limits;
pub mod passwords;
pub mod rules;
pub mod sessions;

use std::time::Duration;

use service_kit::db::DbError;
use service_kit::workers::PoolError;

pub use accounts::{Accounts, NewAccount, ProfileChange, TokenPair, User};

/// Why an account operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the username {0:?} is already taken")]
    UsernameTaken(String),
    /// Unknown user and wrong password alike: the answer must not tell them apart.
    #[error("wrong username or password")]
    InvalidCredentials,
    #[error("too many login attempts; try again in {} s", .0.as_secs().max(1))]
    RateLimited(Duration),
    #[error("the refresh token is invalid, expired or revoked")]
    RefreshTokenInvalid,
    #[error("the refresh token was already used, so the session has been revoked; log in again")]
    RefreshTokenReused,
    #[error("the account no longer exists")]
    AccountGone,
    #[error(transparent)]
    Busy(#[from] PoolError),
    #[error(transparent)]
    Database(#[from] DbError),
    #[error("cannot sign the access token: {0}")]
    Signing(#[from] jsonwebtoken::errors::Error),
    #[error("password hashing failed: {0}")]
    Hashing(String),
}

impl From<service_kit::sqlx::Error> for AuthError {
    fn from(err: service_kit::sqlx::Error) -> Self {
        AuthError::Database(err.into())
    }
}
