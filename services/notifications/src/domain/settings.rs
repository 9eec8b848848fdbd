//! The live endpoint's bounds, from the environment (chart values document each).

use std::time::Duration;

use base64::Engine as _;
use service_kit::config::{ConfigError, Env};

use super::devices::{AllowedHosts, EndpointPolicy, BROWSER_PUSH_SERVICES};

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
    /// `LIVE_MAX_UNAUTHENTICATED_SOCKETS`, default 1,000 (per instance): sockets still waiting
    /// for their `auth` frame; one more is closed at once (1013). A client authenticates within
    /// a round trip, so only a burst of connections or someone holding sockets open fills this.
    pub max_unauthenticated: usize,
    /// `LIVE_CLIENT_FRAME_BURST`, default 30, and `LIVE_CLIENT_FRAMES_PER_SECOND`, default 10:
    /// frames of any kind (text, ping, unasked pong) a socket may send at once, and then per
    /// second; beyond that it is closed (4030). Pongs that answer the server's pings are free.
    pub client_frame_burst: u32,
    pub client_frames_per_second: u32,
    /// `LIVE_REFRESH_BURST`, default 5, and `LIVE_REFRESH_INTERVAL_MS`, default 60 s: `refresh`
    /// frames (each checks the session on the primary) a socket may send at once, and then one
    /// per interval; beyond that it is closed (4030). A client refreshes once per token lifetime.
    pub refresh_burst: u32,
    pub refresh_interval: Duration,
    /// `LIVE_HANDSHAKE_BURST`, default 20, and `LIVE_HANDSHAKES_PER_MINUTE`, default 60: sockets
    /// a user may open (or authenticate in-band) on one instance at once, and then per minute;
    /// beyond that 429 with `Retry-After` (4029 for an in-band `auth`). Each checks the session
    /// on the primary, so a client reconnecting after every close is bounded like its frames.
    pub handshake_burst: u32,
    pub handshakes_per_minute: u32,
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
            max_unauthenticated: env.ranged(
                "LIVE_MAX_UNAUTHENTICATED_SOCKETS",
                1_000,
                1,
                1_000_000,
            )?,
            client_frame_burst: env.ranged("LIVE_CLIENT_FRAME_BURST", 30, 1, 100_000)?,
            client_frames_per_second: env.ranged(
                "LIVE_CLIENT_FRAMES_PER_SECOND",
                10,
                1,
                100_000,
            )?,
            refresh_burst: env.ranged("LIVE_REFRESH_BURST", 5, 1, 1_000)?,
            refresh_interval: env.millis("LIVE_REFRESH_INTERVAL_MS", 60_000, 10, 86_400_000)?,
            handshake_burst: env.ranged("LIVE_HANDSHAKE_BURST", 20, 1, 100_000)?,
            handshakes_per_minute: env.ranged("LIVE_HANDSHAKES_PER_MINUTE", 60, 1, 1_000_000)?,
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

/// The reminder schedulers' timing, from the environment.
#[derive(Debug, Clone)]
pub struct ReminderSettings {
    /// `REMINDER_LOOKAHEAD_MS`, default 5 s: an instance claims the reminders due within this
    /// long, then fires each at its time (so firing is on time without polling fast).
    pub lookahead: Duration,
    /// `REMINDER_CLAIM_LEASE_MS`, default 10 s, more than the look-ahead: how long a claim holds
    /// past its fire time; an instance that died is replaced this late at most.
    pub claim_lease: Duration,
    /// `REMINDER_POLL_INTERVAL_MS`, default 1 s: how often each instance looks for new claims.
    pub poll_interval: Duration,
}

impl ReminderSettings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let lookahead = env.millis("REMINDER_LOOKAHEAD_MS", 5_000, 100, 600_000)?;
        let claim_lease = env.millis("REMINDER_CLAIM_LEASE_MS", 10_000, 200, 3_600_000)?;
        if claim_lease <= lookahead {
            return Err(ConfigError::Invalid {
                name: "REMINDER_CLAIM_LEASE_MS",
                value: claim_lease.as_millis().to_string(),
                reason: "must be longer than REMINDER_LOOKAHEAD_MS".to_owned(),
            });
        }
        Ok(Self {
            lookahead,
            claim_lease,
            poll_interval: env.millis("REMINDER_POLL_INTERVAL_MS", 1_000, 50, 60_000)?,
        })
    }
}

/// Web Push: the VAPID identity, the worker pool and the retry policy, from the environment.
#[derive(Clone)]
pub struct PushSettings {
    /// `PUSH_VAPID_PRIVATE_KEY`: the application server's P-256 private key, 32 bytes in
    /// base64url (browsers are given its public key to subscribe with; every instance must use
    /// the same). Unset: push is off (devices cannot be registered; the inbox works).
    pub vapid_private_key: Option<Vec<u8>>,
    /// `PUSH_VAPID_SUBJECT`, default `mailto:push@taskstream.invalid`: how push services reach
    /// the operator (RFC 8292 `sub`), a `mailto:` or `https:` URL.
    pub vapid_subject: String,
    /// `PUSH_MAX_WORKERS`, default 64: pushes in flight per instance. A push mostly waits on
    /// the push service's answer (tens of milliseconds across the internet), so workers are
    /// tasks, not threads, and many are cheap.
    pub max_workers: usize,
    /// `PUSH_MAX_QUEUE`, default 128: claimed pushes waiting for a worker; the rest stay pending
    /// rows in the database, so a burst costs no memory. A claim must outlast its wait in the
    /// queue: `max(PUSH_MAX_QUEUE / PUSH_MAX_WORKERS + 1, 2) × PUSH_TIMEOUT_MS` must be below
    /// `PUSH_CLAIM_LEASE_MS`, or the service refuses to start (2: a push may wait for one round
    /// of its own push service's requests, see `max_in_flight_per_origin`).
    pub max_queue: usize,
    /// `PUSH_MAX_IN_FLIGHT_PER_ORIGIN`, default ¾ of `PUSH_MAX_WORKERS` (48): pushes in flight
    /// to one push service (`scheme://host:port`) per instance; an instance holds at most twice
    /// that for it, and claims no more of its rows meanwhile. So a push service that is slow or
    /// never answers takes at most this many workers, and the others' pushes go on.
    pub max_in_flight_per_origin: usize,
    /// `PUSH_ORIGIN_FAILURE_THRESHOLD`, default 5: consecutive pushes to one push service that
    /// got no answer (timeout, refused, reset) or a 5xx open its circuit: nothing more is sent
    /// there for `PUSH_RETRY_BASE_MS`, doubling per failed probe up to `PUSH_RETRY_MAX_MS`; then
    /// one push probes it, and any answer closes it. Its rows wait in the table meanwhile, not
    /// counting attempts.
    pub origin_failure_threshold: u32,
    /// `PUSH_POLL_INTERVAL_MS`, default 500 ms: how often an instance looks for due pushes
    /// (a notification fired on this instance wakes it at once).
    pub poll_interval: Duration,
    /// `PUSH_TIMEOUT_MS`, default 10 s, for one request to a push service.
    pub request_timeout: Duration,
    /// `PUSH_TTL_SECONDS`, default 86,400: how long a push service keeps a message for an
    /// offline device (the `TTL` header).
    pub ttl: Duration,
    /// `PUSH_RETRY_BASE_MS`, default 1 s, doubling per attempt up to `PUSH_RETRY_MAX_MS`
    /// (default 5 min); a `Retry-After` from the push service is honoured when longer, up to
    /// `PUSH_RETRY_AFTER_MAX_MS`.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// `PUSH_RETRY_AFTER_MAX_MS`, default 1 hour: the longest `Retry-After` honoured; a longer
    /// one (or a date years ahead) waits this long.
    pub retry_after_max: Duration,
    /// `PUSH_MAX_ATTEMPTS`, default 12: then the delivery is `failed`.
    pub max_attempts: i32,
    /// `PUSH_CLAIM_LEASE_MS`, default 60 s: a claimed push not settled by then (the instance
    /// died mid-send) is sent again.
    pub claim_lease: Duration,
    /// `PUSH_MAX_DEVICES_PER_USER`, default 10.
    pub max_devices_per_user: i64,
    /// `PUSH_ALLOW_HTTP_LOOPBACK`, default false: accept `http://127.0.0.1`, `http://[::1]` and
    /// `http://localhost` endpoints and send to loopback (the local push service of the stack
    /// and the tests). Otherwise nothing on loopback is ever pushed to.
    pub allow_http_loopback: bool,
    /// `PUSH_ALLOWED_HOSTS`, default the browsers' push services
    /// (`fcm.googleapis.com,updates.push.services.mozilla.com,*.push.apple.com,*.notify.windows.com`):
    /// the hosts an endpoint may name, `*.` for any name below one; `*` for any public host.
    /// Addresses inside the network are refused either way.
    pub allowed_hosts: AllowedHosts,
}

impl std::fmt::Debug for PushSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushSettings")
            .field(
                "vapid_private_key",
                &self.vapid_private_key.as_ref().map(|_| "<hidden>"),
            )
            .field("vapid_subject", &self.vapid_subject)
            .field("max_workers", &self.max_workers)
            .field("max_queue", &self.max_queue)
            .field("max_in_flight_per_origin", &self.max_in_flight_per_origin)
            .field("allowed_hosts", &self.allowed_hosts)
            .finish_non_exhaustive()
    }
}

impl PushSettings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let vapid_private_key = match env.raw("PUSH_VAPID_PRIVATE_KEY") {
            None => None,
            Some(encoded) => Some(
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(encoded.trim().trim_end_matches('='))
                    .ok()
                    .filter(|key| key.len() == 32)
                    .ok_or_else(|| ConfigError::Invalid {
                        name: "PUSH_VAPID_PRIVATE_KEY",
                        value: "<hidden>".to_owned(),
                        reason: "must be a P-256 private key: 32 bytes in base64url".to_owned(),
                    })?,
            ),
        };
        let vapid_subject = env
            .raw("PUSH_VAPID_SUBJECT")
            .unwrap_or_else(|| "mailto:push@taskstream.invalid".to_owned());
        if !(vapid_subject.starts_with("mailto:") || vapid_subject.starts_with("https://")) {
            return Err(ConfigError::Invalid {
                name: "PUSH_VAPID_SUBJECT",
                value: vapid_subject,
                reason: "must be a mailto: or https: URL".to_owned(),
            });
        }
        let max_workers: usize = env.ranged("PUSH_MAX_WORKERS", 64, 1, 1024)?;
        let max_queue: usize = env.ranged("PUSH_MAX_QUEUE", 128, 1, 100_000)?;
        let request_timeout = env.millis("PUSH_TIMEOUT_MS", 10_000, 100, 120_000)?;
        let max_in_flight_per_origin: usize = env.ranged(
            "PUSH_MAX_IN_FLIGHT_PER_ORIGIN",
            (max_workers * 3 / 4).max(1),
            1,
            max_workers,
        )?;
        let claim_lease = env.millis("PUSH_CLAIM_LEASE_MS", 60_000, 1_000, 3_600_000)?;
        // A claim queued behind every other one, then sent with the full timeout; or queued
        // behind a full round of its own push service's requests, then sent.
        let rounds = (max_queue / max_workers + 1).max(2);
        let longest_hold = request_timeout * rounds as u32;
        if longest_hold >= claim_lease {
            return Err(ConfigError::Invalid {
                name: "PUSH_CLAIM_LEASE_MS",
                value: claim_lease.as_millis().to_string(),
                reason: format!(
                    "must exceed max(PUSH_MAX_QUEUE / PUSH_MAX_WORKERS + 1, 2) x PUSH_TIMEOUT_MS \
                     = {} ms, or a claim can expire while it waits and be sent twice",
                    longest_hold.as_millis()
                ),
            });
        }
        let allowed_hosts = AllowedHosts::parse(
            &env.raw("PUSH_ALLOWED_HOSTS")
                .unwrap_or_else(|| BROWSER_PUSH_SERVICES.to_owned()),
        )
        .map_err(|reason| ConfigError::Invalid {
            name: "PUSH_ALLOWED_HOSTS",
            value: env.raw("PUSH_ALLOWED_HOSTS").unwrap_or_default(),
            reason,
        })?;
        Ok(Self {
            vapid_private_key,
            vapid_subject,
            max_workers,
            max_queue,
            max_in_flight_per_origin,
            origin_failure_threshold: env.ranged("PUSH_ORIGIN_FAILURE_THRESHOLD", 5, 1, 1000)?,
            poll_interval: env.millis("PUSH_POLL_INTERVAL_MS", 500, 10, 60_000)?,
            request_timeout,
            ttl: Duration::from_secs(env.ranged("PUSH_TTL_SECONDS", 86_400, 0, 2_419_200)?),
            retry_base: env.millis("PUSH_RETRY_BASE_MS", 1_000, 10, 600_000)?,
            retry_max: env.millis("PUSH_RETRY_MAX_MS", 300_000, 10, 86_400_000)?,
            retry_after_max: env.millis("PUSH_RETRY_AFTER_MAX_MS", 3_600_000, 1_000, 86_400_000)?,
            max_attempts: env.ranged("PUSH_MAX_ATTEMPTS", 12, 1, 100)?,
            claim_lease,
            max_devices_per_user: env.ranged("PUSH_MAX_DEVICES_PER_USER", 10, 1, 100)?,
            allow_http_loopback: env.flag("PUSH_ALLOW_HTTP_LOOPBACK", false)?,
            allowed_hosts,
        })
    }

    /// Where pushes may go, as registration and the push client check it.
    pub fn endpoint_policy(&self) -> EndpointPolicy {
        EndpointPolicy {
            allowed_hosts: self.allowed_hosts.clone(),
            allow_http_loopback: self.allow_http_loopback,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_defaults_keep_a_quarter_of_the_workers_from_any_one_push_service() {
        let settings = PushSettings::from_env(&Env::from_pairs(&[])).unwrap();
        assert_eq!(settings.max_in_flight_per_origin, 48);
        assert_eq!(settings.retry_after_max, Duration::from_secs(3600));
        assert!(
            matches!(settings.allowed_hosts, AllowedHosts::Listed(ref hosts) if hosts.len() == 4)
        );
        let small = PushSettings::from_env(&Env::from_pairs(&[
            ("PUSH_MAX_WORKERS", "2"),
            ("PUSH_MAX_QUEUE", "2"),
        ]))
        .unwrap();
        assert_eq!(small.max_in_flight_per_origin, 1);
        let any = PushSettings::from_env(&Env::from_pairs(&[("PUSH_ALLOWED_HOSTS", "*")])).unwrap();
        assert_eq!(any.allowed_hosts, AllowedHosts::Any);
        assert!(
            PushSettings::from_env(&Env::from_pairs(&[("PUSH_ALLOWED_HOSTS", "kafka")])).is_err()
        );
        assert!(PushSettings::from_env(&Env::from_pairs(&[
            ("PUSH_MAX_WORKERS", "8"),
            ("PUSH_MAX_IN_FLIGHT_PER_ORIGIN", "9"),
        ]))
        .is_err());
    }
}
