//! Service configuration, read from environment variables and validated once at start-up.
//!
//! Every setting has a variable a platform engineer can set in a chart. A missing or invalid
//! value stops the process before it binds a port, with one line naming the variable and what
//! is wrong with it, so a bad deploy fails fast and says why.

use std::fmt;
use std::net::IpAddr;

pub use ipnet::IpNet;
use std::str::FromStr;
use std::time::Duration;

/// Why the configuration was rejected. Displayed as the single line the process prints.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{name} is required but not set")]
    Missing { name: &'static str },
    #[error("{name}={value:?} is invalid: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: String,
    },
}

/// Everything a service needs to start: HTTP, databases, broker and telemetry settings.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub service_name: &'static str,
    pub http: HttpConfig,
    pub database: DatabaseConfig,
    pub broker: BrokerConfig,
    pub telemetry: TelemetryConfig,
    pub housekeeping: HousekeepingConfig,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// `HTTP_HOST`, default `0.0.0.0` (reachable inside a pod; the local stack sets 127.0.0.1).
    pub host: IpAddr,
    /// `HTTP_PORT`, default per service.
    pub port: u16,
    /// `HTTP_WORKERS`, default: one per CPU core.
    pub workers: usize,
    /// `HTTP_MAX_BODY_BYTES`, default 1 MiB: larger bodies get 413.
    pub max_body_bytes: usize,
    /// `HTTP_MAX_URI_BYTES`, default 8192: a longer request target (path and query) gets 414.
    /// Up to 65,000: beyond ~64 KiB the HTTP layer cannot hold a URI at all.
    pub max_uri_bytes: usize,
    /// `HTTP_REQUEST_TIMEOUT_MS`, default 15 s: a handler that takes longer gets 503.
    pub request_timeout: Duration,
    /// `HTTP_SHUTDOWN_TIMEOUT_SECS`, default 25 s: how long SIGTERM waits for in-flight requests
    /// (below Kubernetes' default 30 s grace period, so the pod exits on its own).
    pub shutdown_timeout: Duration,
    /// `HTTP_TRUSTED_PROXIES`, default none: addresses or CIDR ranges of the proxies in front
    /// (the gateway's pods), comma-separated. A request from one of them is attributed to the
    /// nearest `X-Forwarded-For` entry that is not itself a trusted proxy; any other request to
    /// its TCP peer, whatever its `X-Forwarded-For` says (a client reaching the pod directly
    /// cannot pick its address). Rate limits are keyed by that address.
    pub trusted_proxies: Vec<IpNet>,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// `DATABASE_WRITER_URL` (required): the primary, for writes and read-your-writes reads.
    pub writer_url: DatabaseUrl,
    /// `DATABASE_READER_URL` (optional): a replica (or a `-ro` service); without it reads use the writer.
    pub reader_url: Option<DatabaseUrl>,
    /// `DATABASE_MAX_CONNECTIONS`, default 10, per pool.
    pub max_connections: u32,
    /// `DATABASE_ACQUIRE_TIMEOUT_MS`, default 3 s: waiting longer for a pooled connection is an error.
    pub acquire_timeout: Duration,
    /// `DATABASE_STATEMENT_TIMEOUT_MS`, default 10 s: the server cancels longer statements, so a
    /// runaway query cannot outlive the request that started it (0 turns it off).
    pub statement_timeout: Duration,
    /// `DATABASE_REPLICA_MAX_LAG_MS`, default 5 s: a replica further behind is skipped.
    pub replica_max_lag: Duration,
    /// `DATABASE_REPLICA_CHECK_INTERVAL_MS`, default 250 ms: how often the replica is probed.
    pub replica_check_interval: Duration,
}

/// A PostgreSQL URL, which may carry a password: `Debug` (what a log line or a panic message of
/// a config shows) hides the password; [`DatabaseUrl::expose`] gives the URL to connect with.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL itself, password included: only for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for DatabaseUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({:?})", redact_password(&self.0))
    }
}

/// `scheme://user:secret@host/db?password=secret` → `scheme://user:***@host/db?password=***`.
fn redact_password(url: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let mut shown = match base.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((credentials, host)) => match credentials.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => base.to_owned(),
            },
            None => base.to_owned(),
        },
        None => base.to_owned(),
    };
    if let Some(query) = query {
        let parameters: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if name.eq_ignore_ascii_case("password") => format!("{name}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        shown.push('?');
        shown.push_str(&parameters.join("&"));
    }
    shown
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// `KAFKA_BOOTSTRAP_SERVERS` (required), e.g. `127.0.0.1:9092`.
    pub bootstrap_servers: String,
    /// `KAFKA_TIMEOUT_MS`, default 2 s: bound on broker calls such as the readiness probe.
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct HousekeepingConfig {
    /// `HOUSEKEEPING_INTERVAL_SECS`, default 60: how often published outbox rows, old event ids
    /// and expired tokens or keys are deleted (each round works through everything due).
    pub interval: Duration,
    /// `OUTBOX_KEEP_PUBLISHED_SECS`, default 3600: how long a published event stays in the
    /// outbox for inspection. Also how long a deleted account's id can outlive the account there.
    pub outbox_keep_published: Duration,
}

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// `RUST_LOG`, default `info`: the log filter (tracing's EnvFilter syntax).
    pub log_filter: String,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (optional): traces are exported over OTLP/HTTP when set.
    pub otlp_endpoint: Option<String>,
}

impl ServiceConfig {
    /// Reads the spine's settings from `env`.
    pub fn from_env(
        env: &Env,
        service_name: &'static str,
        default_port: u16,
    ) -> Result<Self, ConfigError> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Self {
            service_name,
            http: HttpConfig {
                host: env.parsed("HTTP_HOST", IpAddr::from([0, 0, 0, 0]))?,
                port: env.ranged("HTTP_PORT", default_port, 1, u16::MAX)?,
                workers: env.ranged("HTTP_WORKERS", cores, 1, 256)?,
                max_body_bytes: env.ranged("HTTP_MAX_BODY_BYTES", 1 << 20, 1024, 64 << 20)?,
                max_uri_bytes: env.ranged("HTTP_MAX_URI_BYTES", 8192, 256, 65_000)?,
                request_timeout: env.millis("HTTP_REQUEST_TIMEOUT_MS", 15_000, 10, 600_000)?,
                shutdown_timeout: Duration::from_secs(env.ranged(
                    "HTTP_SHUTDOWN_TIMEOUT_SECS",
                    25,
                    0,
                    3600,
                )?),
                trusted_proxies: trusted_proxies(env)?,
            },
            database: DatabaseConfig {
                writer_url: env.postgres_url("DATABASE_WRITER_URL")?,
                reader_url: match env.raw("DATABASE_READER_URL") {
                    Some(_) => Some(env.postgres_url("DATABASE_READER_URL")?),
                    None => None,
                },
                max_connections: env.ranged("DATABASE_MAX_CONNECTIONS", 10, 1, 1000)?,
                acquire_timeout: env.millis("DATABASE_ACQUIRE_TIMEOUT_MS", 3_000, 10, 60_000)?,
                statement_timeout: env.millis(
                    "DATABASE_STATEMENT_TIMEOUT_MS",
                    10_000,
                    0,
                    3_600_000,
                )?,
                replica_max_lag: env.millis("DATABASE_REPLICA_MAX_LAG_MS", 5_000, 0, 3_600_000)?,
                replica_check_interval: env.millis(
                    "DATABASE_REPLICA_CHECK_INTERVAL_MS",
                    250,
                    10,
                    60_000,
                )?,
            },
            broker: BrokerConfig {
                bootstrap_servers: env.required("KAFKA_BOOTSTRAP_SERVERS")?,
                timeout: env.millis("KAFKA_TIMEOUT_MS", 2_000, 10, 60_000)?,
            },
            telemetry: TelemetryConfig {
                log_filter: env.raw("RUST_LOG").unwrap_or_else(|| "info".to_owned()),
                otlp_endpoint: env.raw("OTEL_EXPORTER_OTLP_ENDPOINT"),
            },
            housekeeping: HousekeepingConfig {
                interval: Duration::from_secs(env.ranged(
                    "HOUSEKEEPING_INTERVAL_SECS",
                    60,
                    1,
                    86_400,
                )?),
                outbox_keep_published: Duration::from_secs(env.ranged(
                    "OUTBOX_KEEP_PUBLISHED_SECS",
                    3_600,
                    0,
                    30 * 86_400,
                )?),
            },
        })
    }
}

/// Typed access to variables, shared by the spine and each service's own settings so every
/// variable is checked the same way; an empty value counts as unset.
pub struct Env {
    lookup: Box<Lookup>,
}

type Lookup = dyn Fn(&str) -> Option<String>;

/// `HTTP_TRUSTED_PROXIES`; the retired `HTTP_TRUST_FORWARDED_FOR` is refused with a pointer
/// to it, so a deploy that still sets it does not silently trust nobody (or everybody).
fn trusted_proxies(env: &Env) -> Result<Vec<IpNet>, ConfigError> {
    if let Some(value) = env.raw("HTTP_TRUST_FORWARDED_FOR") {
        return Err(ConfigError::Invalid {
            name: "HTTP_TRUST_FORWARDED_FOR",
            value,
            reason: "is replaced by HTTP_TRUSTED_PROXIES (the proxies' addresses or CIDRs)"
                .to_owned(),
        });
    }
    let Some(value) = env.raw("HTTP_TRUSTED_PROXIES") else {
        return Ok(Vec::new());
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| {
            part.parse::<IpNet>()
                .or_else(|_| part.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| ConfigError::Invalid {
                    name: "HTTP_TRUSTED_PROXIES",
                    value: value.clone(),
                    reason: format!("{part:?} is not an IP address or CIDR range"),
                })
        })
        .collect()
}

impl Env {
    /// The process environment.
    pub fn from_process() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Variables answered by `lookup`, so tests need not touch the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String> + 'static) -> Self {
        Self {
            lookup: Box::new(lookup),
        }
    }

    /// A fixed set of variables (tests).
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        let vars: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        Self::from_lookup(move |name| vars.get(name).cloned())
    }

    pub fn raw(&self, name: &str) -> Option<String> {
        (self.lookup)(name).filter(|value| !value.trim().is_empty())
    }

    pub fn required(&self, name: &'static str) -> Result<String, ConfigError> {
        self.raw(name).ok_or(ConfigError::Missing { name })
    }

    /// `true`/`false` (also `1`/`0`, `yes`/`no`).
    pub fn flag(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.raw(name) {
            None => Ok(default),
            Some(value) => match value.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err(ConfigError::Invalid {
                    name,
                    value,
                    reason: "must be true or false".to_owned(),
                }),
            },
        }
    }

    pub fn parsed<T>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        match self.raw(name) {
            None => Ok(default),
            Some(value) => value
                .trim()
                .parse()
                .map_err(|err: T::Err| ConfigError::Invalid {
                    name,
                    reason: err.to_string(),
                    value,
                }),
        }
    }

    pub fn ranged<T>(
        &self,
        name: &'static str,
        default: T,
        min: T,
        max: T,
    ) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + std::fmt::Display + Copy,
        T::Err: std::fmt::Display,
    {
        let value = self.parsed(name, default)?;
        if value < min || value > max {
            return Err(ConfigError::Invalid {
                name,
                value: value.to_string(),
                reason: format!("must be between {min} and {max}"),
            });
        }
        Ok(value)
    }

    pub fn millis(
        &self,
        name: &'static str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<Duration, ConfigError> {
        self.ranged(name, default, min, max)
            .map(Duration::from_millis)
    }

    pub fn postgres_url(&self, name: &'static str) -> Result<DatabaseUrl, ConfigError> {
        let value = self.required(name)?;
        if value.starts_with("postgres://") || value.starts_with("postgresql://") {
            Ok(DatabaseUrl(value))
        } else {
            Err(ConfigError::Invalid {
                name,
                // Never echo a value that may carry a password.
                value: "<hidden>".to_owned(),
                reason: "must start with postgres:// or postgresql://".to_owned(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(vars: &[(&str, &str)]) -> Result<ServiceConfig, ConfigError> {
        ServiceConfig::from_env(&Env::from_pairs(vars), "tasks", 8082)
    }

    const MINIMAL: [(&str, &str); 2] = [
        ("DATABASE_WRITER_URL", "postgres://tasks@127.0.0.1/tasks"),
        ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
    ];

    #[test]
    fn defaults_apply_when_only_required_values_are_set() {
        let config = load(&MINIMAL).expect("minimal config is valid");
        assert_eq!(config.http.port, 8082);
        assert_eq!(config.http.max_body_bytes, 1 << 20);
        assert_eq!(config.database.reader_url, None);
        assert_eq!(
            config.database.replica_check_interval,
            Duration::from_millis(250)
        );
        assert_eq!(config.telemetry.otlp_endpoint, None);
        assert!(config.http.trusted_proxies.is_empty());
    }

    #[test]
    fn trusted_proxies_are_addresses_or_ranges() {
        let with = |name, value| {
            let mut vars = MINIMAL.to_vec();
            vars.push((name, value));
            load(&vars)
        };
        let config = with("HTTP_TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1").unwrap();
        assert_eq!(
            config.http.trusted_proxies,
            [
                "10.0.0.0/8".parse::<IpNet>().unwrap(),
                "127.0.0.1/32".parse().unwrap()
            ]
        );
        let err = with("HTTP_TRUSTED_PROXIES", "10.0.0.0/8,gateway").unwrap_err();
        assert!(err.to_string().contains("\"gateway\""), "{err}");
        let err = with("HTTP_TRUST_FORWARDED_FOR", "true").unwrap_err();
        assert!(err.to_string().contains("HTTP_TRUSTED_PROXIES"), "{err}");
    }

    #[test]
    fn flags_accept_true_and_false_only() {
        let flag = |value| Env::from_pairs(&[("SOME_FLAG", value)]).flag("SOME_FLAG", false);
        assert!(flag("yes").unwrap());
        assert!(!flag("false").unwrap());
        assert_eq!(
            flag("maybe").unwrap_err().to_string(),
            "SOME_FLAG=\"maybe\" is invalid: must be true or false"
        );
    }

    #[test]
    fn missing_required_variable_is_named() {
        let err = load(&MINIMAL[..1]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "KAFKA_BOOTSTRAP_SERVERS is required but not set"
        );
    }

    #[test]
    fn unparsable_number_names_variable_and_value() {
        let mut vars = MINIMAL.to_vec();
        vars.push(("HTTP_PORT", "eighty"));
        let err = load(&vars).unwrap_err().to_string();
        assert!(err.starts_with("HTTP_PORT=\"eighty\" is invalid"), "{err}");
    }

    #[test]
    fn out_of_range_value_says_the_range() {
        let mut vars = MINIMAL.to_vec();
        vars.push(("DATABASE_MAX_CONNECTIONS", "0"));
        let err = load(&vars).unwrap_err().to_string();
        assert_eq!(
            err,
            "DATABASE_MAX_CONNECTIONS=\"0\" is invalid: must be between 1 and 1000"
        );
    }

    #[test]
    fn passwords_in_database_urls_are_never_shown() {
        let config = load(&[
            (
                "DATABASE_WRITER_URL",
                "postgres://tasks:s3cret@db-rw:5432/tasks",
            ),
            (
                "DATABASE_READER_URL",
                "postgresql://tasks@db-ro/tasks?sslmode=require&password=s3cret",
            ),
            ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        ])
        .unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("postgres://tasks:***@db-rw:5432/tasks"),
            "{shown}"
        );
        assert!(shown.contains("sslmode=require&password=***"), "{shown}");
        assert_eq!(
            config.database.writer_url.expose(),
            "postgres://tasks:s3cret@db-rw:5432/tasks"
        );
    }

    #[test]
    fn database_url_must_be_postgres_and_is_not_echoed() {
        let err = load(&[
            ("DATABASE_WRITER_URL", "mysql://root:secret@db/x"),
            ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("DATABASE_WRITER_URL"), "{err}");
        assert!(!err.contains("secret"), "{err}");
    }
}
