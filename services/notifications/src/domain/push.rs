//! Web Push: sending each pending delivery to its device's push service (RFC 8030), encrypted
//! for the device (RFC 8291, aes128gcm, by `web-push-native`) and signed as this application
//! server (VAPID, RFC 8292).
//!
//! Each instance runs a dispatcher: it claims due pending rows (`FOR UPDATE SKIP LOCKED`, with a
//! lease) only as many as its queue has room for (`PUSH_MAX_QUEUE`), and sends them on at most
//! `PUSH_MAX_WORKERS` tasks. So a burst or a slow push service leaves rows pending in the
//! database, never in memory, and never slows the consumer, which only inserts rows. Each answer
//! settles its row: 2xx sent; 404/410 the subscription is gone and forgotten; 429 and 5xx (and no
//! answer) are retried with exponential backoff, no sooner than the push service's `Retry-After`
//! (up to `PUSH_RETRY_AFTER_MAX_MS`); other 4xx and redirects (never followed) failed. A worker
//! that dies mid-send leaves a claim that expires and is sent again (`Topic` lets the push
//! service replace a copy it already holds).
//!
//! Push services are kept apart by origin (`scheme://host:port`), so one that is slow or never
//! answers delays only its own pushes: at most `PUSH_MAX_IN_FLIGHT_PER_ORIGIN` are in flight to
//! it, at most twice that are held for it (the claim skips it meanwhile, so its backlog stays in
//! the table instead of filling the queue), origins take turns for free workers, and an origin
//! that stops answering has its circuit opened ([`Breaker`]): nothing is sent there until a
//! single probe gets an answer.
//!
//! Where a push may go is [`EndpointPolicy`]'s: checked again before each send (rows from before
//! the rule), names resolved by [`PublicOnlyResolver`], which drops addresses inside the network
//! (so DNS rebinding gets nowhere), and redirects never followed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::StatusCode;
use serde::Serialize;
use service_kit::db::Database;
use service_kit::workers::StoppableTask;
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio::task::{Id as TaskId, JoinSet};
use uuid::Uuid;
use web_push_native::jwt_simple::algorithms::{ECDSAP256KeyPairLike, ES256KeyPair};
use web_push_native::jwt_simple::claims::Claims;
use web_push_native::{p256, Auth};

use super::devices::{encode, EndpointPolicy};
use super::settings::PushSettings;
use crate::storage;
use crate::storage::push::ClaimedDelivery;

/// How long a VAPID token is valid (RFC 8292 allows at most 24 h), and how long one is reused
/// for a push service before a fresh one is signed.
const VAPID_VALIDITY: Duration = Duration::from_secs(12 * 3600);
const VAPID_REUSE: Duration = Duration::from_secs(3600);
/// Signed tokens kept (one per push-service origin; browsers use a handful, and the endpoint
/// rules a few more at most): beyond it the stalest goes.
const VAPID_TOKENS_MAX: usize = 1024;
/// How often the pending backlog is measured.
const BACKLOG_INTERVAL: Duration = Duration::from_secs(5);
const BACKLOG_COUNT_CAP: i64 = 1_000_000;
/// An origin whose circuit is open (or half open) and that has had nothing to send for this long
/// is forgotten; one that keeps failing keeps its lengthening cool-down until then.
const FORGET_FAILING_ORIGIN_AFTER: Duration = Duration::from_secs(3600);

pub const PUSHES: &str = "notifications_push_deliveries_total";
pub const PUSH_DURATION: &str = "notifications_push_request_duration_seconds";
pub const PUSH_QUEUE_DEPTH: &str = "notifications_push_queue_depth";
pub const PUSH_PENDING: &str = "notifications_push_pending";
/// Circuits opened, per instance: a push service stopped answering.
pub const PUSH_CIRCUITS_OPENED: &str = "notifications_push_circuits_opened_total";
/// Push-service origins whose circuit is open now, on this instance.
pub const PUSH_ORIGINS_OPEN: &str = "notifications_push_origins_open";

/// The application server's identity: its P-256 key, as VAPID signs with it and as clients
/// subscribe with its public half.
pub struct ServerKey {
    key_pair: ES256KeyPair,
    /// Uncompressed public key in base64url: `applicationServerKey` for `pushManager.subscribe`.
    pub public_key: String,
    subject: String,
    /// Signed tokens by push-service origin, reused for a while (signing costs ~100 µs); at
    /// most [`VAPID_TOKENS_MAX`].
    tokens: Mutex<HashMap<String, (String, Instant)>>,
}

impl ServerKey {
    pub fn new(private_key: &[u8], subject: &str) -> Result<Self, String> {
        let key_pair = ES256KeyPair::from_bytes(private_key)
            .map_err(|err| format!("PUSH_VAPID_PRIVATE_KEY is not a P-256 private key: {err}"))?;
        let public_key = encode(&key_pair.key_pair().public_key().to_bytes_uncompressed());
        Ok(Self {
            key_pair,
            public_key,
            subject: subject.to_owned(),
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// The `Authorization` header for a push service at `origin` (`scheme://host[:port]`, the
    /// JWT's `aud`). web-push-native's own VAPID helper leaves the port out of `aud`, which a
    /// push service on a non-default port rightly refuses, so the token is signed here.
    pub fn authorization(&self, origin: &str) -> Result<String, String> {
        if let Ok(tokens) = self.tokens.lock() {
            if let Some((header, signed)) = tokens.get(origin) {
                if signed.elapsed() < VAPID_REUSE {
                    return Ok(header.clone());
                }
            }
        }
        let claims = Claims::create(VAPID_VALIDITY.into())
            .with_audience(origin)
            .with_subject(&self.subject);
        let token = self
            .key_pair
            .sign(claims)
            .map_err(|err| format!("cannot sign the VAPID token: {err}"))?;
        let header = format!("vapid t={token}, k={}", self.public_key);
        if let Ok(mut tokens) = self.tokens.lock() {
            if tokens.len() >= VAPID_TOKENS_MAX && !tokens.contains_key(origin) {
                tokens.retain(|_, (_, signed)| signed.elapsed() < VAPID_REUSE);
                // Still full of fresh ones: the stalest goes (a scan, at most once per signing).
                if tokens.len() >= VAPID_TOKENS_MAX {
                    let stalest = tokens
                        .iter()
                        .min_by_key(|(_, (_, signed))| *signed)
                        .map(|(origin, _)| origin.clone());
                    if let Some(stalest) = stalest {
                        tokens.remove(&stalest);
                    }
                }
            }
            tokens.insert(origin.to_owned(), (header.clone(), Instant::now()));
        }
        Ok(header)
    }
}

/// What a device receives (decrypted by its service worker).
#[derive(Debug, Serialize)]
pub struct PushMessage<'a> {
    pub id: Uuid,
    pub kind: &'a str,
    pub title: &'a str,
    pub body: &'a str,
    pub task_id: Option<Uuid>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Sent(u16),
    /// 404/410: the subscription expired or was revoked.
    Gone(u16),
    Retry {
        status: Option<u16>,
        error: String,
        /// The push service's `Retry-After`.
        after: Option<Duration>,
    },
    Failed {
        status: Option<u16>,
        error: String,
    },
}

/// What an attempt says about its push service, for its circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// It answered (whatever it said): it is up.
    Answered,
    /// No answer (timeout, refused, reset) or a 5xx.
    Unwell,
    /// Nothing was asked of it (the push failed here, or was not allowed to go).
    Unknown,
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Sent(_) => "sent",
            Outcome::Gone(_) => "gone",
            Outcome::Retry { .. } => "retry",
            Outcome::Failed { .. } => "failed",
        }
    }

    fn health(&self) -> Health {
        match self {
            Outcome::Retry { status: None, .. } => Health::Unwell,
            Outcome::Retry {
                status: Some(status),
                ..
            } if *status >= 500 => Health::Unwell,
            Outcome::Failed { status: None, .. } => Health::Unknown,
            _ => Health::Answered,
        }
    }
}

/// What an answer of a push service means for the delivery.
pub fn classify(status: StatusCode, headers: &HeaderMap) -> Outcome {
    let code = status.as_u16();
    match code {
        200..=299 => Outcome::Sent(code),
        // Redirects are not followed: a push service does not send them, and following one
        // would re-send the message (and reach wherever it points).
        300..=399 => Outcome::Failed {
            status: Some(code),
            error: format!("push service answered {status}, a redirect (not followed)"),
        },
        404 | 410 => Outcome::Gone(code),
        408 | 425 | 429 | 500..=599 => Outcome::Retry {
            status: Some(code),
            error: format!("push service answered {status}"),
            after: headers.get(RETRY_AFTER).and_then(retry_after),
        },
        _ => Outcome::Failed {
            status: Some(code),
            error: format!("push service refused the message: {status}"),
        },
    }
}

/// `Retry-After` as seconds or as an HTTP date.
fn retry_after(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = OffsetDateTime::parse(text, &time::format_description::well_known::Rfc2822).ok()?;
    Duration::try_from(at - OffsetDateTime::now_utc()).ok()
}

/// The wait before attempt `attempts + 1`: `base` doubling per attempt, at most `max`, and never
/// sooner than the push service asked.
pub fn backoff(attempts: i32, base: Duration, max: Duration, asked: Option<Duration>) -> Duration {
    let exponent = u32::try_from(attempts.saturating_sub(1))
        .unwrap_or(0)
        .min(30);
    let doubled = base.saturating_mul(1u32 << exponent).min(max);
    asked.map_or(doubled, |asked| asked.max(doubled))
}

/// The wait before retrying a push after attempt `attempts`, the push service's `Retry-After`
/// honoured up to `PUSH_RETRY_AFTER_MAX_MS` (a wait of years would only fail the update that
/// records it, and the push would be sent again when its claim expired).
pub fn retry_wait(attempts: i32, settings: &PushSettings, asked: Option<Duration>) -> Duration {
    let asked = asked.map(|asked| asked.min(settings.retry_after_max));
    backoff(attempts, settings.retry_base, settings.retry_max, asked)
}

/// Why the push client would not connect: the name resolved only to addresses inside the
/// network (or loopback without `PUSH_ALLOW_HTTP_LOOPBACK`).
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves to no public address (refused: {refused:?})")]
pub struct RefusedAddress {
    host: String,
    refused: Vec<std::net::IpAddr>,
}

/// The push client's resolver: the system's (getaddrinfo, as before), minus every address the
/// endpoint policy refuses. Checked at connect time, on the addresses actually used, so a name
/// that passed at registration and now resolves inside the network (DNS rebinding, a changed
/// record) is not reached. (IP literals are never resolved: [`EndpointPolicy::check`] judges
/// them before each send.)
pub struct PublicOnlyResolver {
    policy: EndpointPolicy,
}

impl PublicOnlyResolver {
    pub fn new(policy: EndpointPolicy) -> Self {
        Self { policy }
    }

    /// The addresses of `host` a push may connect to.
    pub async fn lookup(
        policy: &EndpointPolicy,
        host: &str,
    ) -> Result<Vec<SocketAddr>, Box<dyn std::error::Error + Send + Sync>> {
        let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host, 0)).await?.collect();
        let (admitted, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = resolved
            .into_iter()
            .partition(|address| policy.admits_address(address.ip()));
        if admitted.is_empty() {
            return Err(Box::new(RefusedAddress {
                host: host.to_owned(),
                refused: refused.iter().map(SocketAddr::ip).collect(),
            }));
        }
        Ok(admitted)
    }
}

impl Resolve for PublicOnlyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let admitted = Self::lookup(&policy, &host).await?;
            Ok(Box::new(admitted.into_iter()) as Addrs)
        })
    }
}

/// The HTTP client pushes are sent with: names resolved by [`PublicOnlyResolver`], no redirect
/// followed, no proxy from the environment (it would resolve names where the policy cannot
/// see), every request bounded by `PUSH_TIMEOUT_MS`.
pub fn push_client(settings: &PushSettings) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(settings.request_timeout)
        .connect_timeout(settings.request_timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(PublicOnlyResolver::new(
            settings.endpoint_policy(),
        )))
        .build()
        .map_err(|err| format!("cannot build the push client: {err}"))
}

/// Whether `err` (a failed request) is the resolver refusing every address.
fn refused_address(err: &reqwest::Error) -> Option<&RefusedAddress> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(err) = source {
        if let Some(refused) = err.downcast_ref::<RefusedAddress>() {
            return Some(refused);
        }
        source = err.source();
    }
    None
}

/// The circuit of one push-service origin, on one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Circuit {
    /// Pushes go out, up to the per-origin bound.
    Closed,
    /// Nothing goes out until `until`.
    Open { until: Instant },
    /// One push at a time probes it (since `since`); an answer closes the circuit, a failure
    /// opens it again for twice as long.
    HalfOpen { since: Instant },
}

/// A circuit breaker for one push service: `threshold` failures in a row open it for a
/// cool-down that starts at `base` and doubles per failed probe up to `max` (the row retries'
/// policy, for the push service as a whole).
#[derive(Debug, Clone)]
pub struct Breaker {
    circuit: Circuit,
    /// Failures in a row while closed.
    failures: u32,
    /// Times opened since it last answered.
    opened: u32,
}

/// The breakers' policy.
#[derive(Debug, Clone, Copy)]
pub struct BreakerPolicy {
    pub threshold: u32,
    pub base: Duration,
    pub max: Duration,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            circuit: Circuit::Closed,
            failures: 0,
            opened: 0,
        }
    }
}

impl Breaker {
    /// How many pushes may be in flight to the origin at `now`, out of `bound`.
    pub fn allowed(&mut self, now: Instant, bound: usize) -> usize {
        if let Circuit::Open { until } = self.circuit {
            if now >= until {
                self.circuit = Circuit::HalfOpen { since: now };
            }
        }
        match self.circuit {
            Circuit::Closed => bound,
            Circuit::HalfOpen { .. } => 1,
            Circuit::Open { .. } => 0,
        }
    }

    /// It answered: whatever came before, it is up.
    pub fn answered(&mut self) {
        *self = Self::default();
    }

    /// A push got no answer or a 5xx. Returns whether that opened the circuit (pushes that
    /// were in flight before it opened and fail after do not count again).
    pub fn failed(&mut self, now: Instant, policy: &BreakerPolicy) -> bool {
        match self.circuit {
            Circuit::Open { .. } => false,
            Circuit::HalfOpen { .. } => {
                self.open(now, policy);
                true
            }
            Circuit::Closed => {
                self.failures += 1;
                if self.failures >= policy.threshold {
                    self.open(now, policy);
                    true
                } else {
                    false
                }
            }
        }
    }

    fn open(&mut self, now: Instant, policy: &BreakerPolicy) {
        self.opened = self.opened.saturating_add(1);
        self.failures = 0;
        let cool_down = backoff(
            i32::try_from(self.opened).unwrap_or(i32::MAX),
            policy.base,
            policy.max,
            None,
        );
        self.circuit = Circuit::Open {
            until: now + cool_down,
        };
    }

    pub fn is_open(&self, now: Instant) -> bool {
        matches!(self.circuit, Circuit::Open { until } if now < until)
    }

    /// Whether an origin with nothing held may be forgotten: it is well, or it has been failing
    /// quietly for long.
    fn forgettable(&self, now: Instant) -> bool {
        match self.circuit {
            // A few failures short of opening are not worth keeping for an idle origin.
            Circuit::Closed => true,
            Circuit::Open { until } => {
                now.saturating_duration_since(until) > FORGET_FAILING_ORIGIN_AFTER
            }
            Circuit::HalfOpen { since } => {
                now.saturating_duration_since(since) > FORGET_FAILING_ORIGIN_AFTER
            }
        }
    }
}

/// What one instance holds for one push-service origin.
#[derive(Debug, Default)]
struct Lane {
    queued: VecDeque<ClaimedDelivery>,
    in_flight: usize,
    breaker: Breaker,
    /// In [`Lanes::turns`].
    has_turn: bool,
}

impl Lane {
    fn held(&self) -> usize {
        self.queued.len() + self.in_flight
    }
}

/// The pushes an instance holds, by origin, and the order the origins take turns in.
struct Lanes {
    lanes: HashMap<String, Lane>,
    /// Origins with queued pushes, in turn order.
    turns: VecDeque<String>,
    queued: usize,
    in_flight: usize,
    /// `PUSH_MAX_IN_FLIGHT_PER_ORIGIN`.
    per_origin: usize,
    breaker: BreakerPolicy,
    /// Origins the last claim skipped or could not take all of: when they drain, claim again.
    hungry: HashSet<String>,
}

/// What a finished push means for the dispatcher.
#[derive(Debug, Default, PartialEq, Eq)]
struct Finished {
    /// Queued pushes to give back (their origin's circuit opened).
    release: Vec<Uuid>,
    /// An origin the last claim skipped has room again.
    claim_again: bool,
}

impl Lanes {
    fn new(per_origin: usize, breaker: BreakerPolicy) -> Self {
        Self {
            lanes: HashMap::new(),
            turns: VecDeque::new(),
            queued: 0,
            in_flight: 0,
            per_origin,
            breaker,
            hungry: HashSet::new(),
        }
    }

    /// How many pushes this instance may hold for an origin: what may be in flight to it and
    /// as many waiting (none while its circuit is open, two while it is probed).
    fn hold_limit(lane: &mut Lane, now: Instant, per_origin: usize) -> usize {
        2 * lane.breaker.allowed(now, per_origin)
    }

    /// Origins the next claim must skip: held to their limit, or their circuit open.
    fn full_origins(&mut self, now: Instant) -> Vec<String> {
        let per_origin = self.per_origin;
        self.lanes
            .iter_mut()
            .filter_map(|(origin, lane)| {
                (lane.held() >= Self::hold_limit(lane, now, per_origin)).then(|| origin.clone())
            })
            .collect()
    }

    /// Takes claimed pushes in; returns those beyond their origin's hold limit (to give back).
    /// `skipped` are the origins the claim left out.
    fn admit(
        &mut self,
        claimed: Vec<ClaimedDelivery>,
        skipped: Vec<String>,
        now: Instant,
    ) -> Vec<Uuid> {
        let per_origin = self.per_origin;
        self.hungry = skipped.into_iter().collect();
        let mut overflow = Vec::new();
        for job in claimed {
            let lane = self.lanes.entry(job.origin.clone()).or_default();
            if lane.held() >= Self::hold_limit(lane, now, per_origin) {
                self.hungry.insert(job.origin.clone());
                overflow.push(job.id);
                continue;
            }
            if !lane.has_turn {
                lane.has_turn = true;
                self.turns.push_back(job.origin.clone());
            }
            lane.queued.push_back(job);
            self.queued += 1;
        }
        overflow
    }

    /// The next push to start, origins taking turns: one whose origin has room, if a worker
    /// is free (`workers` in flight at most).
    fn next(&mut self, now: Instant, workers: usize) -> Option<ClaimedDelivery> {
        if self.in_flight >= workers {
            return None;
        }
        let per_origin = self.per_origin;
        for _ in 0..self.turns.len() {
            let origin = self.turns.pop_front()?;
            let Some(lane) = self.lanes.get_mut(&origin) else {
                continue;
            };
            if lane.queued.is_empty() {
                lane.has_turn = false;
                continue;
            }
            let room = lane.in_flight < lane.breaker.allowed(now, per_origin);
            let job = if room { lane.queued.pop_front() } else { None };
            if lane.queued.is_empty() {
                lane.has_turn = false;
            } else {
                self.turns.push_back(origin);
            }
            if let Some(job) = job {
                lane.in_flight += 1;
                self.queued -= 1;
                self.in_flight += 1;
                return Some(job);
            }
        }
        None
    }

    /// A push to `origin` finished with `health`.
    fn finished(&mut self, origin: &str, health: Health, now: Instant) -> Finished {
        let mut done = Finished::default();
        self.in_flight = self.in_flight.saturating_sub(1);
        let per_origin = self.per_origin;
        let Some(lane) = self.lanes.get_mut(origin) else {
            return done;
        };
        lane.in_flight = lane.in_flight.saturating_sub(1);
        match health {
            Health::Answered => lane.breaker.answered(),
            Health::Unwell => {
                if lane.breaker.failed(now, &self.breaker) {
                    metrics::counter!(PUSH_CIRCUITS_OPENED).increment(1);
                    tracing::warn!(
                        origin,
                        held_back = lane.queued.len(),
                        "push service not answering: its circuit is open, its pushes wait"
                    );
                    done.release = lane.queued.drain(..).map(|job| job.id).collect();
                    self.queued -= done.release.len();
                }
            }
            Health::Unknown => {}
        }
        if self.hungry.contains(origin)
            && lane.held() * 2 <= Self::hold_limit(lane, now, per_origin)
        {
            self.hungry.remove(origin);
            done.claim_again = true;
        }
        if lane.held() == 0 && lane.breaker.forgettable(now) {
            self.lanes.remove(origin);
            // Its turn too, or a new lane for it would have two.
            self.turns.retain(|turn| turn != origin);
        }
        done
    }

    /// Everything queued, taken out (the instance is stopping).
    fn drain_queued(&mut self) -> Vec<Uuid> {
        self.turns.clear();
        self.queued = 0;
        self.lanes
            .values_mut()
            .flat_map(|lane| {
                lane.has_turn = false;
                lane.queued.drain(..).map(|job| job.id).collect::<Vec<_>>()
            })
            .collect()
    }

    /// Forgets origins holding nothing that are well or have failed quietly for long.
    fn prune(&mut self, now: Instant) {
        self.lanes
            .retain(|_, lane| lane.held() > 0 || !lane.breaker.forgettable(now));
        let lanes = &self.lanes;
        self.turns.retain(|origin| lanes.contains_key(origin));
    }

    fn open_origins(&self, now: Instant) -> usize {
        self.lanes
            .values()
            .filter(|lane| lane.breaker.is_open(now))
            .count()
    }
}

/// Sends pushes for this instance until stopped.
pub struct Dispatcher {
    pub db: Database,
    pub settings: PushSettings,
    pub key: Arc<ServerKey>,
    /// Woken when this instance queued pushes (they are due now).
    pub wake: Arc<Notify>,
}

impl Dispatcher {
    pub fn spawn(self) -> Result<StoppableTask, String> {
        let sender = Arc::new(Sender {
            db: self.db.clone(),
            settings: self.settings.clone(),
            key: self.key.clone(),
            client: push_client(&self.settings)?,
            policy: self.settings.endpoint_policy(),
        });
        let backlog_db = self.db.clone();
        service_kit::workers::spawn_periodic("push backlog", BACKLOG_INTERVAL, move || {
            let db = backlog_db.clone();
            async move {
                let pending = db
                    .primary(|mut conn| async move {
                        storage::push::pending(&mut conn, BACKLOG_COUNT_CAP).await
                    })
                    .await
                    .map_err(|err| err.to_string())?;
                metrics::gauge!(PUSH_PENDING).set(pending as f64);
                Ok(())
            }
        });
        Ok(StoppableTask::spawn(move |stop| self.run(sender, stop)))
    }

    async fn run(self, sender: Arc<Sender>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let settings = &self.settings;
        let mut lanes = Lanes::new(
            settings.max_in_flight_per_origin,
            BreakerPolicy {
                threshold: settings.origin_failure_threshold,
                base: settings.retry_base,
                max: settings.retry_max,
            },
        );
        let mut workers: JoinSet<Health> = JoinSet::new();
        let mut origin_of_task: HashMap<TaskId, String> = HashMap::new();
        // Refill once half the queue is free: one claim per batch, not per push.
        let refill_at = (settings.max_queue / 2).max(1);
        let mut claim_now = true;
        // The last claim filled the queue: more may be due once it drains.
        let mut more_due = false;
        let mut next_poll = tokio::time::Instant::now();
        loop {
            let room = settings.max_queue - lanes.queued;
            if claim_now || tokio::time::Instant::now() >= next_poll {
                claim_now = false;
                next_poll = tokio::time::Instant::now() + settings.poll_interval;
                lanes.prune(Instant::now());
                if room > 0 {
                    more_due = self.claim(&mut lanes, room).await;
                    // What went back (over its push service's share) left room, and that push
                    // service is skipped now: the others' due pushes may fill it at once.
                    if more_due && settings.max_queue - lanes.queued >= refill_at {
                        claim_now = true;
                    }
                } else {
                    more_due = true;
                }
            }
            let now = Instant::now();
            while let Some(job) = lanes.next(now, settings.max_workers) {
                let sender = sender.clone();
                let origin = job.origin.clone();
                let task = workers.spawn(async move { sender.deliver(job).await });
                origin_of_task.insert(task.id(), origin);
            }
            metrics::gauge!(PUSH_QUEUE_DEPTH).set(lanes.queued as f64);
            metrics::gauge!(PUSH_ORIGINS_OPEN).set(lanes.open_origins(now) as f64);
            if claim_now {
                continue;
            }
            let joined = tokio::select! {
                Some(joined) = workers.join_next_with_id(), if !workers.is_empty() => joined,
                _ = tokio::time::sleep_until(next_poll) => continue,
                _ = self.wake.notified() => {
                    claim_now = true;
                    continue;
                }
                _ = stop.wait_for(|stop| *stop) => break,
            };
            let (id, health) = match joined {
                Ok((id, health)) => (id, health),
                // A send that panicked tells nothing about its push service.
                Err(err) => (err.id(), Health::Unknown),
            };
            let Some(origin) = origin_of_task.remove(&id) else {
                continue;
            };
            let finished = lanes.finished(&origin, health, Instant::now());
            if !finished.release.is_empty() {
                self.release(&finished.release).await;
            }
            let room = settings.max_queue - lanes.queued;
            if finished.claim_again || (more_due && room >= refill_at) {
                claim_now = true;
            }
        }
        // Claims still queued go back at once (an instance that dies instead leaves them to
        // expire); pushes in flight finish.
        let unsent = lanes.drain_queued();
        if !unsent.is_empty() {
            self.release(&unsent).await;
        }
        while workers.join_next().await.is_some() {}
    }

    /// Claims up to `room` due pushes into `lanes`; returns whether it got as many as asked.
    async fn claim(&self, lanes: &mut Lanes, room: usize) -> bool {
        let lease = self.settings.claim_lease;
        let skipped = lanes.full_origins(Instant::now());
        let claimed = self
            .db
            .primary(|mut conn| {
                let skipped = &skipped;
                async move { storage::push::claim(&mut conn, room as i64, lease, skipped).await }
            })
            .await;
        match claimed {
            Ok(claimed) => {
                let got_all = claimed.len() == room;
                let overflow = lanes.admit(claimed, skipped, Instant::now());
                if !overflow.is_empty() {
                    self.release(&overflow).await;
                }
                got_all
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot claim pushes");
                false
            }
        }
    }

    /// Gives claims back unsent (not an attempt); if that fails they expire with their lease.
    async fn release(&self, ids: &[Uuid]) {
        let released = self
            .db
            .primary(|mut conn| async move { storage::push::release(&mut conn, ids).await })
            .await;
        if let Err(err) = released {
            tracing::warn!(error = %err, "cannot give up queued pushes; they expire");
        }
    }
}

/// One worker's means: the push client and the database.
struct Sender {
    db: Database,
    settings: PushSettings,
    key: Arc<ServerKey>,
    client: reqwest::Client,
    policy: EndpointPolicy,
}

impl Sender {
    async fn deliver(&self, job: ClaimedDelivery) -> Health {
        let started = Instant::now();
        let outcome = self.send(&job).await;
        metrics::histogram!(PUSH_DURATION).record(started.elapsed());
        metrics::counter!(PUSHES, "outcome" => outcome.label()).increment(1);
        let health = outcome.health();
        let settings = &self.settings;
        let settled = self
            .db
            .primary(|mut conn| {
                let outcome = outcome.clone();
                let job = &job;
                async move {
                    match outcome {
                        Outcome::Sent(status) => {
                            storage::push::mark_sent(&mut conn, job.id, status).await
                        }
                        Outcome::Gone(status) => {
                            tracing::info!(
                                subscription = %job.subscription_id, status,
                                "push subscription gone; forgetting the device"
                            );
                            storage::push::forget_subscription(&mut conn, job.subscription_id).await
                        }
                        Outcome::Retry {
                            status,
                            error,
                            after,
                        } if job.attempts < settings.max_attempts => {
                            let delay = retry_wait(job.attempts, settings, after);
                            storage::push::retry_later(&mut conn, job.id, status, &error, delay)
                                .await
                        }
                        Outcome::Retry { status, error, .. }
                        | Outcome::Failed { status, error } => {
                            tracing::warn!(
                                delivery = %job.id, attempts = job.attempts, error,
                                "push failed for good"
                            );
                            storage::push::mark_failed(&mut conn, job.id, status, &error).await
                        }
                    }
                }
            })
            .await;
        if let Err(err) = settled {
            // The claim expires and the push is made again: at least once, never lost.
            tracing::warn!(delivery = %job.id, error = %err, "cannot record a push's outcome");
        }
        health
    }

    async fn send(&self, job: &ClaimedDelivery) -> Outcome {
        let failed = |error: String| Outcome::Failed {
            status: None,
            error,
        };
        let Ok(url) = url::Url::parse(&job.endpoint) else {
            return failed("the endpoint is not a URL".to_owned());
        };
        // Rows registered before the endpoint rules (or under other ones) are held to them too.
        if let Err(rule) = self.policy.check(&url) {
            return failed(format!("the endpoint is not allowed: it {rule}"));
        }
        let Ok(device_key) = p256::PublicKey::from_sec1_bytes(&job.p256dh) else {
            return failed("the device's key is not a P-256 point".to_owned());
        };
        if job.auth.len() != 16 {
            return failed("the device's auth secret is not 16 bytes".to_owned());
        }
        let auth = Auth::clone_from_slice(&job.auth);
        let message = PushMessage {
            id: job.notification_id,
            kind: &job.kind,
            title: &job.title,
            body: &job.body,
            task_id: job.task_id,
            created_at: job.created_at,
        };
        let plaintext = match serde_json::to_vec(&message) {
            Ok(plaintext) => plaintext,
            Err(err) => return failed(format!("cannot encode the message: {err}")),
        };
        let body = match web_push_native::encrypt(plaintext, &device_key, &auth) {
            Ok(body) => body,
            Err(err) => return failed(format!("cannot encrypt the message: {err}")),
        };
        let Some(origin) = origin_of(&url) else {
            return failed("the endpoint has no origin".to_owned());
        };
        let authorization = match self.key.authorization(&origin) {
            Ok(header) => header,
            Err(err) => return failed(err),
        };
        let answer = self
            .client
            .post(url)
            .header("TTL", self.settings.ttl.as_secs())
            .header("Urgency", job.urgency.as_str())
            // One message per notification: a resend replaces the copy a push service holds.
            .header("Topic", job.notification_id.simple().to_string())
            .header("Content-Encoding", "aes128gcm")
            .header("Content-Type", "application/octet-stream")
            .header("Authorization", authorization)
            .body(body)
            .send()
            .await;
        match answer {
            Ok(response) => classify(response.status(), response.headers()),
            Err(err) => match refused_address(&err) {
                Some(refused) => failed(format!("the endpoint is not allowed: {refused}")),
                None => Outcome::Retry {
                    status: None,
                    error: format!("push service unreachable: {err}"),
                    after: None,
                },
            },
        }
    }
}

/// `scheme://host[:port]` of a URL (the port only when it is not the scheme's default).
fn origin_of(url: &url::Url) -> Option<String> {
    let origin = url.origin();
    origin.is_tuple().then(|| origin.ascii_serialization())
}

#[cfg(test)]
mod tests {
    use super::*;
    use service_kit::config::Env;

    fn settings(pairs: &[(&str, &str)]) -> PushSettings {
        PushSettings::from_env(&Env::from_pairs(pairs)).unwrap()
    }

    #[test]
    fn answers_map_to_what_happens_next() {
        let none = HeaderMap::new();
        assert_eq!(classify(StatusCode::CREATED, &none), Outcome::Sent(201));
        assert_eq!(classify(StatusCode::GONE, &none), Outcome::Gone(410));
        assert_eq!(classify(StatusCode::NOT_FOUND, &none), Outcome::Gone(404));
        let mut asked = HeaderMap::new();
        asked.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        match classify(StatusCode::TOO_MANY_REQUESTS, &asked) {
            Outcome::Retry { after, .. } => assert_eq!(after, Some(Duration::from_secs(2))),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify(StatusCode::INTERNAL_SERVER_ERROR, &none),
            Outcome::Retry { after: None, .. }
        ));
        assert!(matches!(
            classify(StatusCode::PAYLOAD_TOO_LARGE, &none),
            Outcome::Failed { .. }
        ));
        // A redirect is not a delivery, and is not retried.
        for redirect in [
            StatusCode::MOVED_PERMANENTLY,
            StatusCode::TEMPORARY_REDIRECT,
        ] {
            assert!(matches!(
                classify(redirect, &none),
                Outcome::Failed {
                    status: Some(_),
                    ..
                }
            ));
        }
    }

    #[test]
    fn what_an_answer_says_about_the_push_service() {
        let none = HeaderMap::new();
        for (status, health) in [
            (StatusCode::CREATED, Health::Answered),
            (StatusCode::GONE, Health::Answered),
            (StatusCode::TOO_MANY_REQUESTS, Health::Answered),
            (StatusCode::BAD_REQUEST, Health::Answered),
            (StatusCode::SERVICE_UNAVAILABLE, Health::Unwell),
            (StatusCode::BAD_GATEWAY, Health::Unwell),
        ] {
            assert_eq!(classify(status, &none).health(), health, "{status}");
        }
        let no_answer = Outcome::Retry {
            status: None,
            error: "timed out".into(),
            after: None,
        };
        assert_eq!(no_answer.health(), Health::Unwell);
        let local = Outcome::Failed {
            status: None,
            error: "the endpoint is not allowed".into(),
        };
        assert_eq!(local.health(), Health::Unknown);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_honours_retry_after() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        let waits: Vec<u64> = (1..=8)
            .map(|n| backoff(n, base, max, None).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(
            backoff(1, base, max, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        assert_eq!(
            backoff(5, base, max, Some(Duration::from_secs(2))),
            Duration::from_secs(16)
        );
        assert_eq!(backoff(i32::MAX, base, max, None), max);
    }

    #[test]
    fn a_retry_after_is_honoured_up_to_its_cap() {
        let settings = settings(&[]);
        let asked = |secs| retry_wait(1, &settings, Some(Duration::from_secs(secs)));
        assert_eq!(asked(120), Duration::from_secs(120));
        assert_eq!(asked(10_000_000_000_000), Duration::from_secs(3600));
        assert_eq!(asked(u64::MAX), Duration::from_secs(3600));
        // A date years ahead is as long.
        let mut headers = HeaderMap::new();
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Fri, 31 Dec 9999 23:59:59 GMT"),
        );
        let Outcome::Retry { after, .. } = classify(StatusCode::SERVICE_UNAVAILABLE, &headers)
        else {
            panic!("503 is retried")
        };
        assert_eq!(retry_wait(1, &settings, after), Duration::from_secs(3600));
    }

    #[test]
    fn the_vapid_audience_keeps_a_non_default_port() {
        let origin = |endpoint: &str| origin_of(&url::Url::parse(endpoint).unwrap());
        assert_eq!(
            origin("http://127.0.0.1:4567/push/abc").as_deref(),
            Some("http://127.0.0.1:4567")
        );
        assert_eq!(
            origin("https://fcm.googleapis.com:443/fcm/send/x").as_deref(),
            Some("https://fcm.googleapis.com")
        );
    }

    #[test]
    fn the_vapid_token_cache_is_bounded() {
        let key = ServerKey::new(
            &ES256KeyPair::generate().to_bytes(),
            "mailto:ops@example.com",
        )
        .unwrap();
        for n in 0..2000 {
            key.authorization(&format!("https://push{n}.example"))
                .unwrap();
        }
        let tokens = key.tokens.lock().unwrap();
        assert_eq!(tokens.len(), VAPID_TOKENS_MAX);
        // The newest are kept.
        assert!(tokens.contains_key("https://push1999.example"));
        assert!(!tokens.contains_key("https://push0.example"));
    }

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            threshold: 3,
            base: Duration::from_secs(1),
            max: Duration::from_secs(4),
        }
    }

    #[test]
    fn a_breaker_opens_after_failures_in_a_row_and_a_probe_closes_it() {
        let policy = policy();
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut breaker = Breaker::default();
        assert_eq!(breaker.allowed(start, 48), 48);
        assert!(!breaker.failed(start, &policy));
        breaker.answered();
        assert!(!breaker.failed(start, &policy));
        assert!(!breaker.failed(start, &policy));
        assert!(
            breaker.failed(start, &policy),
            "the third in a row opens it"
        );
        assert_eq!(breaker.allowed(start, 48), 0);
        // Pushes already in flight that fail now do not open it again.
        assert!(!breaker.failed(start, &policy));
        // After the cool-down (1 s) one probe; it fails: open for 2 s, then 4 s, then 4 s.
        assert_eq!(breaker.allowed(at(1), 48), 1);
        assert!(breaker.failed(at(1), &policy));
        assert_eq!(breaker.allowed(at(2), 48), 0);
        assert_eq!(breaker.allowed(at(3), 48), 1);
        assert!(breaker.failed(at(3), &policy));
        assert_eq!(breaker.allowed(at(6), 48), 0);
        assert_eq!(breaker.allowed(at(7), 48), 1);
        assert!(breaker.failed(at(7), &policy));
        assert_eq!(breaker.allowed(at(10), 48), 0);
        assert_eq!(breaker.allowed(at(11), 48), 1);
        // It answers: closed, everything forgotten.
        breaker.answered();
        assert_eq!(breaker.allowed(at(11), 48), 48);
        assert!(!breaker.failed(at(11), &policy));
        assert!(!breaker.failed(at(11), &policy));
        assert!(breaker.failed(at(11), &policy));
        assert_eq!(
            breaker.allowed(at(12), 48),
            1,
            "the cool-down starts over at 1 s"
        );
    }

    fn job(origin: &str) -> ClaimedDelivery {
        ClaimedDelivery {
            id: Uuid::now_v7(),
            attempts: 1,
            urgency: "high".into(),
            subscription_id: Uuid::now_v7(),
            endpoint: format!("{origin}/push/x"),
            origin: origin.to_owned(),
            p256dh: vec![],
            auth: vec![],
            notification_id: Uuid::now_v7(),
            kind: "task.overdue".into(),
            task_id: None,
            title: "t".into(),
            body: "b".into(),
            created_at: OffsetDateTime::now_utc(),
        }
    }

    #[test]
    fn one_push_service_holds_at_most_its_share_and_the_others_take_turns() {
        const SLOW: &str = "https://slow.example";
        const FAST: &str = "https://fast.example";
        let now = Instant::now();
        let mut lanes = Lanes::new(2, policy());
        let claimed: Vec<_> = (0..6)
            .map(|_| job(SLOW))
            .chain([job(FAST), job(FAST)])
            .collect();
        // 2 in flight and 2 waiting for the slow one; the other 2 go back.
        let overflow = lanes.admit(claimed, vec![], now);
        assert_eq!(overflow.len(), 2);
        assert_eq!(lanes.queued, 6);
        let started: Vec<String> = std::iter::from_fn(|| lanes.next(now, 10))
            .map(|job| job.origin)
            .collect();
        assert_eq!(started, [SLOW, FAST, SLOW, FAST]);
        // The slow one is full: the next claim skips it, and it is remembered as hungry.
        assert_eq!(lanes.full_origins(now), [SLOW]);
        assert!(lanes.hungry.contains(SLOW));
        // A free worker is not enough for the slow one while two of its pushes are in flight.
        assert!(lanes.next(now, 10).is_none());
        // The global worker bound holds too.
        let mut lanes_small = Lanes::new(4, policy());
        lanes_small.admit(vec![job(SLOW), job(FAST)], vec![], now);
        assert!(lanes_small.next(now, 1).is_some());
        assert!(lanes_small.next(now, 1).is_none());
    }

    #[test]
    fn an_open_circuit_gives_its_queued_pushes_back_and_is_skipped() {
        const DEAD: &str = "https://dead.example";
        let now = Instant::now();
        let mut lanes = Lanes::new(3, policy());
        lanes.admit((0..6).map(|_| job(DEAD)).collect(), vec![], now);
        for _ in 0..3 {
            assert!(lanes.next(now, 10).is_some());
        }
        assert!(lanes.finished(DEAD, Health::Unwell, now).release.is_empty());
        assert!(lanes.finished(DEAD, Health::Unwell, now).release.is_empty());
        let opened = lanes.finished(DEAD, Health::Unwell, now);
        assert_eq!(
            opened.release.len(),
            3,
            "the waiting ones go back to the table"
        );
        assert_eq!(lanes.queued, 0);
        assert_eq!(lanes.full_origins(now), [DEAD]);
        assert_eq!(lanes.open_origins(now), 1);
        // After the cool-down it is no longer skipped: one probe may be held (and one waiting).
        let later = now + Duration::from_secs(1);
        assert!(lanes.full_origins(later).is_empty());
        let overflow = lanes.admit(vec![job(DEAD), job(DEAD), job(DEAD)], vec![], later);
        assert_eq!(overflow.len(), 1);
        assert!(lanes.next(later, 10).is_some());
        assert!(lanes.next(later, 10).is_none());
        // The probe is answered: closed, the rest may go, and what went back may be claimed.
        let answered = lanes.finished(DEAD, Health::Answered, later);
        assert!(answered.release.is_empty() && answered.claim_again);
        assert!(lanes.next(later, 10).is_some());
    }

    #[test]
    fn a_drained_hungry_origin_asks_for_a_claim() {
        const BUSY: &str = "https://busy.example";
        let now = Instant::now();
        let mut lanes = Lanes::new(2, policy());
        lanes.admit(
            (0..4).map(|_| job(BUSY)).collect(),
            vec![BUSY.to_owned()],
            now,
        );
        let _first = lanes.next(now, 10);
        let _second = lanes.next(now, 10);
        // 3 held of 4: not yet.
        assert!(!lanes.finished(BUSY, Health::Answered, now).claim_again);
        assert!(lanes.next(now, 10).is_some());
        // 2 of 4: half drained, claim again.
        assert!(lanes.finished(BUSY, Health::Answered, now).claim_again);
    }

    #[tokio::test]
    async fn names_that_resolve_inside_the_network_are_not_connected_to() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let strict = settings(&[("PUSH_TIMEOUT_MS", "2000")]);
        let refused = PublicOnlyResolver::lookup(&strict.endpoint_policy(), "localhost")
            .await
            .unwrap_err();
        assert!(refused.is::<RefusedAddress>(), "{refused}");
        let local = settings(&[("PUSH_ALLOW_HTTP_LOOPBACK", "true")]);
        let admitted = PublicOnlyResolver::lookup(&local.endpoint_policy(), "localhost")
            .await
            .unwrap();
        assert!(admitted.iter().all(|address| address.ip().is_loopback()));

        // The client pushes are sent with asks this resolver, so `localhost` is never reached.
        let client = push_client(&strict).unwrap();
        let err = client
            .post(format!("http://localhost:{port}/push/x"))
            .send()
            .await
            .unwrap_err();
        assert!(refused_address(&err).is_some(), "{err:?}");
        // A connection made before the error would be waiting in the backlog now.
        let listener = listener.into_std().unwrap();
        listener.set_nonblocking(true).unwrap();
        let waiting = listener.accept();
        assert!(
            waiting
                .as_ref()
                .is_err_and(|err| err.kind() == std::io::ErrorKind::WouldBlock),
            "a connection reached the listener: {waiting:?}"
        );
    }

    /// RFC 8291 Appendix A: the user agent's keys and the message of the example; decrypting it
    /// gives the plaintext, so this crate's aes128gcm is the RFC's.
    #[test]
    fn rfc_8291_appendix_a_decrypts() {
        use base64::Engine as _;
        let b64 = |text: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(text)
                .unwrap()
        };
        let ua_private =
            p256::SecretKey::from_slice(&b64("q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94"))
                .unwrap();
        let auth = Auth::clone_from_slice(&b64("BTBZMqHH6r4Tts7J_aSIgg"));
        let message = b64(
            "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN",
        );
        let plaintext = web_push_native::decrypt(message, &ua_private, &auth).unwrap();
        assert_eq!(plaintext, b"When I grow up, I want to be a watermelon");
        // The user agent's public key of the example is the one its private key makes.
        assert_eq!(
            encode(
                &ua_private
                    .public_key()
                    .to_sec1_bytes()
            ),
            "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4"
        );
    }

    #[test]
    fn what_is_encrypted_for_a_device_only_it_can_read() {
        let device = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
        let auth = Auth::clone_from_slice(&[7u8; 16]);
        let sealed =
            web_push_native::encrypt(b"hello".to_vec(), &device.public_key(), &auth).unwrap();
        // aes128gcm header: 16-byte salt, 4-byte record size, key id length 65, the sender's key.
        assert_eq!(sealed[20], 65);
        assert_eq!(
            web_push_native::decrypt(sealed.clone(), &device, &auth).unwrap(),
            b"hello"
        );
        let stranger = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
        assert!(web_push_native::decrypt(sealed, &stranger, &auth).is_err());
    }
}
