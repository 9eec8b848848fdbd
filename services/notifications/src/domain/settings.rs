//! The live endpoint's bounds, from the environment (chart values document each).

use std::time::Duration;

use service_kit::config::{ConfigError, Env};

#[derive(Debug, Clone)]
pub struct LiveSettings {
    /// `LIVE_ALLOWED_ORIGINS`: comma-separated origins browsers may connect from (e.g.
    /// `https://app.example.com`). Empty (default): only clients that send no `Origin` (apps).
    pub allowed_origins: Vec<String>,
    /// `LIVE_SEND_BUDGET_BYTES`, default 256 KiB: unsent bytes a socket may hold before it is
    /// closed as a slow client (4008).
    pub send_budget_bytes: usize,
    /// `LIVE_SOCKET_SEND_BUFFER_BYTES`, default 64 KiB: the kernel's send buffer of a socket, so
    /// that a client that stops reading shows up in the budget instead of in kernel memory.
    pub socket_send_buffer_bytes: usize,
    /// `LIVE_MAX_CONNECTIONS_PER_USER`, default 10 (per instance).
    pub max_connections_per_user: usize,
    /// `LIVE_MAX_FRAME_BYTES`, default 16 KiB: larger client frames close the socket (1009).
    pub max_frame_bytes: usize,
    /// `LIVE_PING_INTERVAL_MS`, default 20 s.
    pub ping_interval: Duration,
    /// `LIVE_IDLE_TIMEOUT_MS`, default 60 s: nothing heard for this long closes (4002).
    pub idle_timeout: Duration,
    /// `LIVE_AUTH_TIMEOUT_MS`, default 5 s: for the first frame when the handshake had no token.
    pub auth_timeout: Duration,
    /// `LIVE_TOKEN_GRACE_MS`, default 10 s: how long after its token's `exp` a socket may stay
    /// without a refresh (4001 after).
    pub token_grace: Duration,
    /// `LIVE_FEED_MAX_ENTRIES`, default 10,000: entries kept per user.
    pub feed_max_entries: i64,
    /// `LIVE_FEED_RETENTION_HOURS`, default 168 (7 days): older entries are deleted.
    pub feed_retention: Duration,
}

impl LiveSettings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let allowed_origins = env
            .raw("LIVE_ALLOWED_ORIGINS")
            .unwrap_or_default()
            .split(',')
            .map(|origin| origin.trim().trim_end_matches('/').to_owned())
            .filter(|origin| !origin.is_empty())
            .collect();
        Ok(Self {
            allowed_origins,
            send_budget_bytes: env.ranged(
                "LIVE_SEND_BUDGET_BYTES",
                256 << 10,
                4 << 10,
                64 << 20,
            )?,
            socket_send_buffer_bytes: env.ranged(
                "LIVE_SOCKET_SEND_BUFFER_BYTES",
                64 << 10,
                4 << 10,
                16 << 20,
            )?,
            max_connections_per_user: env.ranged("LIVE_MAX_CONNECTIONS_PER_USER", 10, 1, 1000)?,
            max_frame_bytes: env.ranged("LIVE_MAX_FRAME_BYTES", 16 << 10, 1 << 10, 1 << 20)?,
            ping_interval: env.millis("LIVE_PING_INTERVAL_MS", 20_000, 100, 600_000)?,
            idle_timeout: env.millis("LIVE_IDLE_TIMEOUT_MS", 60_000, 300, 3_600_000)?,
            auth_timeout: env.millis("LIVE_AUTH_TIMEOUT_MS", 5_000, 100, 60_000)?,
            token_grace: env.millis("LIVE_TOKEN_GRACE_MS", 10_000, 0, 600_000)?,
            feed_max_entries: env.ranged("LIVE_FEED_MAX_ENTRIES", 10_000, 10, 1_000_000)?,
            feed_retention: Duration::from_secs(
                env.ranged("LIVE_FEED_RETENTION_HOURS", 168, 1, 24 * 90)? * 3600,
            ),
        })
    }

    /// Whether a browser page from `origin` may connect.
    pub fn allows_origin(&self, origin: &str) -> bool {
        let origin = origin.trim_end_matches('/');
        self.allowed_origins
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(origin))
    }
}
