//! auth's own settings, read from the environment next to the spine's and validated the same
//! way: a bad value (or an unreadable key) stops the process at start with one line.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use service_kit::access_token::TokenRules;
use service_kit::config::{ConfigError, Env};

use crate::keys::SigningKeys;

pub struct AuthSettings {
    /// `AUTH_JWT_KEYS_DIR` + `AUTH_JWT_ACTIVE_KEY_ID`: every key in the folder is published,
    /// the active one signs.
    pub keys: SigningKeys,
    /// `AUTH_JWT_ISSUER` / `AUTH_JWT_AUDIENCE`.
    pub rules: TokenRules,
    /// `AUTH_ACCESS_TOKEN_TTL_SECS`, default 900 (15 min): how long a stolen access token works.
    pub access_token_ttl: Duration,
    /// `AUTH_REFRESH_TOKEN_TTL_SECS`, default 30 days: how long a refresh token works unused
    /// (each refresh issues a new one), within the session's lifetime.
    pub refresh_token_ttl: Duration,
    /// `AUTH_SESSION_MAX_LIFETIME_SECS`, default 90 days: a session (login) ends this long after
    /// it began, however often it was refreshed; then the user logs in again.
    pub session_max_lifetime: Duration,
    /// `AUTH_REFRESH_REUSE_GRACE_SECS`, default 30: a refresh token presented again this soon
    /// after it was exchanged is a retry (the answer was lost, or two tabs refreshed at once)
    /// and gets a new pair; later it is reuse and ends the session.
    pub refresh_reuse_grace: Duration,
    /// `AUTH_PASSWORD_WORKERS`, default: one per CPU core. Threads verifying passwords (login,
    /// account deletion).
    pub password_workers: usize,
    /// `AUTH_PASSWORD_QUEUE`, default 32 per worker: verifications waiting beyond this are
    /// refused (503).
    pub password_queue: usize,
    /// `AUTH_SIGNUP_PASSWORD_WORKERS`, default 1: threads hashing new passwords, apart from the
    /// login ones, so a signup flood cannot take logins' share.
    pub signup_password_workers: usize,
    /// `AUTH_SIGNUP_PASSWORD_QUEUE`, default 8 per worker: signups waiting beyond this get 503.
    pub signup_password_queue: usize,
    /// `AUTH_LOGIN_LIMIT_PER_USERNAME`, default 10: failed logins per minute for one username
    /// from one client address (a correct password costs nothing).
    pub login_limit_per_username: NonZeroU32,
    /// `AUTH_LOGIN_LIMIT_PER_CLIENT`, default 60: failed logins per minute from one client
    /// address, whatever the username.
    pub login_limit_per_client: NonZeroU32,
    /// `AUTH_SIGNUP_LIMIT_PER_CLIENT`, default 10: signups per minute from one client address.
    pub signup_limit_per_client: NonZeroU32,
}

impl AuthSettings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let keys_dir = PathBuf::from(env.required("AUTH_JWT_KEYS_DIR")?);
        let active_key_id = env.required("AUTH_JWT_ACTIVE_KEY_ID")?;
        let keys = SigningKeys::load(&keys_dir, &active_key_id).map_err(|reason| {
            ConfigError::Invalid {
                name: "AUTH_JWT_KEYS_DIR",
                value: keys_dir.display().to_string(),
                reason,
            }
        })?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let password_workers = env.ranged("AUTH_PASSWORD_WORKERS", cores, 1, 256)?;
        let signup_password_workers = env.ranged("AUTH_SIGNUP_PASSWORD_WORKERS", 1, 1, 256)?;
        Ok(Self {
            keys,
            rules: TokenRules::from_env(env),
            access_token_ttl: Duration::from_secs(env.ranged(
                "AUTH_ACCESS_TOKEN_TTL_SECS",
                900,
                30,
                86_400,
            )?),
            refresh_token_ttl: Duration::from_secs(env.ranged(
                "AUTH_REFRESH_TOKEN_TTL_SECS",
                30 * 86_400,
                300,
                365 * 86_400,
            )?),
            session_max_lifetime: Duration::from_secs(env.ranged(
                "AUTH_SESSION_MAX_LIFETIME_SECS",
                90 * 86_400,
                5,
                3 * 365 * 86_400,
            )?),
            refresh_reuse_grace: Duration::from_secs(env.ranged(
                "AUTH_REFRESH_REUSE_GRACE_SECS",
                30,
                0,
                300,
            )?),
            password_workers,
            password_queue: env.ranged("AUTH_PASSWORD_QUEUE", 32 * password_workers, 1, 100_000)?,
            signup_password_workers,
            signup_password_queue: env.ranged(
                "AUTH_SIGNUP_PASSWORD_QUEUE",
                8 * signup_password_workers,
                1,
                100_000,
            )?,
            login_limit_per_username: per_minute(env, "AUTH_LOGIN_LIMIT_PER_USERNAME", 10)?,
            login_limit_per_client: per_minute(env, "AUTH_LOGIN_LIMIT_PER_CLIENT", 60)?,
            signup_limit_per_client: per_minute(env, "AUTH_SIGNUP_LIMIT_PER_CLIENT", 10)?,
        })
    }
}

fn per_minute(env: &Env, name: &'static str, default: u32) -> Result<NonZeroU32, ConfigError> {
    let value = env.ranged(name, default, 1, 1_000_000)?;
    Ok(NonZeroU32::new(value).unwrap_or(NonZeroU32::MIN))
}
