//! A local Web Push service: the push-service side of RFC 8030 (HTTP push), RFC 8291 (message
//! encryption) and RFC 8292 (VAPID), served over real HTTP/1.1 on `127.0.0.1`.
//!
//! Browsers hand out subscriptions whose endpoints live at their vendors' push services (FCM,
//! Mozilla autopush, Apple); this machine cannot reach those, so the local stack and the tests
//! point senders here instead. [`LocalPush::subscribe`] plays `pushManager.subscribe`: it makes a
//! P-256 key pair and a 16-byte auth secret, keeps the private half, and returns the
//! `{endpoint, keys: {p256dh, auth}}` a browser would give the application.
//!
//! `POST /push/{id}` is checked the way real push services check it, in this order, so that a
//! sender that passes here will not be turned away out there:
//!
//! 1. the subscription exists (`404`), and was not unsubscribed or expired (`410`);
//! 2. `Authorization: vapid t=<JWT>, k=<key>` is present and well formed (`401`);
//! 3. the JWT is ES256, signed by `k`, its `aud` is the endpoint's origin *with the port*, its
//!    `exp` is in the future and at most 24 hours ahead, and `sub` is a `mailto:` or `https:`
//!    contact (`403`) — strict, because real services reject each of these and a sender that
//!    drops the port or over-long expiry only finds out in production;
//! 4. `k` is the application-server key the subscription was pinned to, if any (`403`);
//! 5. a `TTL` header holds an integer (`400`), `Urgency`/`Topic` are valid if present (`400`);
//! 6. `Content-Encoding: aes128gcm` (`415`), a body of at most 4096 bytes (`413`) that decrypts
//!    with the subscription's private key and auth secret (`400`) — proving the sender encrypted
//!    for *this* subscription.
//!
//! A valid message then gets the next scripted [`Answer`] (see [`LocalPush::answer_next`]) or
//! `201 Created` with a `Location`. Every request is recorded as an [`Attempt`], every accepted one
//! as a [`Delivered`] with its decrypted payload. [`LocalPush::go_down`] and
//! [`LocalPush::come_up`] make the service unreachable and reachable again on the same port.
//!
//! For a person at a terminal the same server answers a small JSON control API:
//! `POST /subscriptions` (a new subscription), `GET /messages` (what was delivered),
//! `GET /attempts` (every push request) and `POST /answers` (`[{"status":429,"retry_after":2}]`).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand_core::{OsRng, RngCore as _};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};
use tokio::task::{JoinHandle, JoinSet};
use web_push_native::jwt_simple::prelude::{
    Audiences, Clock, Duration as JwtDuration, ECDSAP256PublicKeyLike as _, ES256PublicKey,
    NoCustomClaims, Token, VerificationOptions,
};
use web_push_native::p256;
use web_push_native::p256::elliptic_curve::sec1::ToEncodedPoint as _;
use web_push_native::Auth;

/// The largest encrypted body accepted (RFC 8030 §7.2: push services support at least 4096).
pub const MAX_PAYLOAD: usize = 4096;
/// The longest expiry a VAPID JWT may have (RFC 8292 §2).
pub const MAX_JWT_VALIDITY: Duration = Duration::from_secs(24 * 60 * 60);
/// Bodies are read up to this size, so that a too-large one is answered with 413.
const READ_LIMIT: usize = 64 * 1024;

/// A push subscription, as a browser's `pushManager.subscribe` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// `http://127.0.0.1:PORT/push/{id}`.
    pub endpoint: String,
    /// The user agent's public key: a 65-byte uncompressed P-256 point, base64url without padding.
    pub p256dh: String,
    /// The 16-byte auth secret, base64url without padding.
    pub auth: String,
}

impl Subscription {
    /// `{"endpoint":..,"keys":{"p256dh":..,"auth":..}}`, as `PushSubscription.toJSON()` gives it.
    pub fn json(&self) -> Value {
        json!({"endpoint": self.endpoint, "keys": {"p256dh": self.p256dh, "auth": self.auth}})
    }

    fn id(&self) -> Option<&str> {
        self.endpoint.rsplit_once("/push/").map(|(_, id)| id)
    }
}

/// One request to a push endpoint, whatever became of it.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub endpoint: String,
    pub status: u16,
    /// Why it was not accepted (checks or a scripted answer); `None` for 2xx.
    pub rejection: Option<String>,
    pub at: Instant,
    /// The `Retry-After` sent back, in seconds.
    pub retry_after: Option<u64>,
}

/// An accepted push message, decrypted.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub endpoint: String,
    pub payload: Vec<u8>,
    pub ttl: u64,
    pub urgency: Option<String>,
    pub topic: Option<String>,
    pub at: Instant,
}

impl Delivered {
    /// The payload parsed as JSON; `Value::Null` when it is not JSON.
    pub fn payload_json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or(Value::Null)
    }
}

/// A scripted answer to the next valid push request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 201, delivered.
    Created,
    /// 404.
    NotFound,
    /// 410; the subscription is gone from then on.
    Gone,
    /// 429 with `Retry-After`.
    TooManyRequests { retry_after_secs: u64 },
    /// 500.
    ServerError,
    /// 503, with `Retry-After` when given.
    ServiceUnavailable { retry_after_secs: Option<u64> },
}

/// The running service. Dropping it stops the server.
pub struct LocalPush {
    shared: Arc<Shared>,
    server: Mutex<Option<Server>>,
}

struct Server {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

struct Shared {
    port: u16,
    started: Instant,
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Default)]
struct State {
    subscriptions: HashMap<String, Registered>,
    attempts: Vec<Attempt>,
    delivered: Vec<Delivered>,
    answers: VecDeque<Answer>,
    vapid_key: Option<String>,
}

struct Registered {
    secret: p256::SecretKey,
    auth: Auth,
    gone: bool,
}

/// Why a push request was turned away.
struct Reject {
    status: StatusCode,
    reason: String,
}

fn reject(status: StatusCode, reason: impl Into<String>) -> Reject {
    Reject {
        status,
        reason: reason.into(),
    }
}

/// A push request that passed every check.
struct Valid {
    payload: Vec<u8>,
    ttl: u64,
    urgency: Option<String>,
    topic: Option<String>,
}

impl LocalPush {
    /// Starts on a free port of 127.0.0.1. Panics if it cannot bind.
    pub async fn start() -> LocalPush {
        Self::start_on(0).await
    }

    /// Starts on `port` of 127.0.0.1 (0: a free one). Panics if it cannot bind.
    pub async fn start_on(port: u16) -> LocalPush {
        match Self::try_start_on(port).await {
            Ok(push) => push,
            Err(e) => panic!("local push service cannot listen on 127.0.0.1:{port}: {e}"),
        }
    }

    /// Starts on `port` of 127.0.0.1 (0: a free one).
    pub async fn try_start_on(port: u16) -> std::io::Result<LocalPush> {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            port,
            started: Instant::now(),
            state: Mutex::new(State::default()),
            changed: Notify::new(),
        });
        let server = Server::spawn(listener, shared.clone());
        Ok(LocalPush {
            shared,
            server: Mutex::new(Some(server)),
        })
    }

    /// `http://127.0.0.1:PORT`, which is also the origin VAPID's `aud` must name.
    pub fn url(&self) -> String {
        self.shared.origin()
    }

    pub fn port(&self) -> u16 {
        self.shared.port
    }

    /// A new subscription, like `pushManager.subscribe`.
    pub fn subscribe(&self) -> Subscription {
        self.shared.subscribe()
    }

    /// Unsubscribes: later pushes to it get 410 Gone.
    pub fn unsubscribe(&self, subscription: &Subscription) {
        let Some(id) = subscription.id() else { return };
        if let Some(registered) = self.shared.lock().subscriptions.get_mut(id) {
            registered.gone = true;
        }
    }

    /// Accepts only VAPID `k` equal to this key (base64url, uncompressed P-256); others get 403.
    pub fn require_vapid_key(&self, public_key_b64url: &str) {
        self.shared.lock().vapid_key = Some(public_key_b64url.trim_end_matches('=').to_owned());
    }

    /// Accepts any VAPID key again (the default).
    pub fn allow_any_vapid_key(&self) {
        self.shared.lock().vapid_key = None;
    }

    /// Queues answers for the next valid push requests, first in first out; once the queue is
    /// empty they get 201 again.
    pub fn answer_next(&self, answers: impl IntoIterator<Item = Answer>) {
        self.shared.lock().answers.extend(answers);
    }

    /// Every push request so far, in arrival order.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.shared.lock().attempts.clone()
    }

    /// Every accepted push message so far, in arrival order.
    pub fn delivered(&self) -> Vec<Delivered> {
        self.shared.lock().delivered.clone()
    }

    /// Waits until at least `count` messages were delivered; panics with what arrived on timeout.
    pub async fn wait_delivered(&self, count: usize, limit: Duration) -> Vec<Delivered> {
        let got = self
            .wait_until(limit, |state| state.delivered.len() >= count)
            .await;
        match got {
            Ok(()) => self.delivered(),
            Err(()) => panic!(
                "waited {limit:?} for {count} delivered push messages, got {}: {:#?}\nattempts: {:#?}",
                self.delivered().len(),
                self.delivered(),
                self.attempts()
            ),
        }
    }

    /// Waits until at least `count` push requests arrived; panics with what arrived on timeout.
    pub async fn wait_attempts(&self, count: usize, limit: Duration) -> Vec<Attempt> {
        let got = self
            .wait_until(limit, |state| state.attempts.len() >= count)
            .await;
        match got {
            Ok(()) => self.attempts(),
            Err(()) => panic!(
                "waited {limit:?} for {count} push requests, got {}: {:#?}",
                self.attempts().len(),
                self.attempts()
            ),
        }
    }

    async fn wait_until(&self, limit: Duration, done: impl Fn(&State) -> bool) -> Result<(), ()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(&self.shared.lock()) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(());
            }
        }
    }

    /// Stops listening and closes every open connection (keep-alive ones too), so clients get
    /// "connection refused" until [`LocalPush::come_up`].
    pub async fn go_down(&self) {
        let server = self.lock_server().take();
        if let Some(server) = server {
            let _ = server.stop.send(());
            let _ = server.task.await;
        }
    }

    /// Listens again on the same port. Panics if the port cannot be bound again.
    pub async fn come_up(&self) {
        if self.lock_server().is_some() {
            return;
        }
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.shared.port));
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                // The old socket may take a moment to be released.
                Err(_) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("local push service cannot listen on {addr} again: {e}"),
            }
        };
        let server = Server::spawn(listener, self.shared.clone());
        let previous = self.lock_server().replace(server);
        if let Some(previous) = previous {
            // A concurrent come_up won the race; keep one server.
            let _ = previous.stop.send(());
        }
    }

    /// Whether the service is listening.
    pub fn is_up(&self) -> bool {
        self.lock_server().is_some()
    }

    fn lock_server(&self) -> MutexGuard<'_, Option<Server>> {
        self.server.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for LocalPush {
    fn drop(&mut self) {
        if let Some(server) = self.lock_server().take() {
            let _ = server.stop.send(());
            server.task.abort();
        }
    }
}

impl Server {
    fn spawn(listener: TcpListener, shared: Arc<Shared>) -> Server {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(listener, shared, stopped));
        Server { stop, task }
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    connections.spawn(async move {
                        let service = service_fn(move |request| {
                            let shared = shared.clone();
                            async move { Ok::<_, Infallible>(shared.handle(request).await) }
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                // Out of file descriptors and the like: try again shortly.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn endpoint(&self, id: &str) -> String {
        format!("{}/push/{id}", self.origin())
    }

    fn subscribe(&self) -> Subscription {
        let secret = p256::SecretKey::random(&mut OsRng);
        let mut auth = [0u8; 16];
        OsRng.fill_bytes(&mut auth);
        let id = uuid::Uuid::new_v4().simple().to_string();
        let subscription = Subscription {
            endpoint: self.endpoint(&id),
            p256dh: URL_SAFE_NO_PAD.encode(secret.public_key().to_encoded_point(false).as_bytes()),
            auth: URL_SAFE_NO_PAD.encode(auth),
        };
        self.lock().subscriptions.insert(
            id,
            Registered {
                secret,
                auth: Auth::clone_from_slice(&auth),
                gone: false,
            },
        );
        subscription
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path().to_owned();
        let method = request.method().clone();
        if let Some(id) = path.strip_prefix("/push/") {
            if method != Method::POST {
                let mut response =
                    error(StatusCode::METHOD_NOT_ALLOWED, "push messages are POSTed");
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST"));
                return response;
            }
            return self.push(id, request).await;
        }
        match (method, path.as_str()) {
            (Method::POST, "/subscriptions") => {
                json_response(StatusCode::CREATED, self.subscribe().json())
            }
            (Method::GET, "/messages") => json_response(StatusCode::OK, self.messages_json()),
            (Method::GET, "/attempts") => json_response(StatusCode::OK, self.attempts_json()),
            (Method::POST, "/answers") => self.post_answers(request).await,
            _ => error(StatusCode::NOT_FOUND, "no such resource"),
        }
    }

    async fn push(&self, id: &str, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let endpoint = self.endpoint(id);
        let (parts, body) = request.into_parts();
        let body = Limited::new(body, READ_LIMIT)
            .collect()
            .await
            .map(|collected| collected.to_bytes());
        let outcome = match body {
            Ok(body) => self.check(id, &parts.headers, &body),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body larger than {MAX_PAYLOAD} bytes"),
            )),
            Err(e) => Err(reject(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            )),
        };
        let at = Instant::now();
        let mut state = self.lock();
        let (response, attempt) = match outcome {
            Err(Reject { status, reason }) => {
                let attempt = Attempt {
                    endpoint,
                    status: status.as_u16(),
                    rejection: Some(reason.clone()),
                    at,
                    retry_after: None,
                };
                (error(status, &reason), attempt)
            }
            Ok(valid) => {
                let answer = state.answers.pop_front().unwrap_or(Answer::Created);
                let (status, retry_after, reason) = match answer {
                    Answer::Created => (StatusCode::CREATED, None, None),
                    Answer::NotFound => (StatusCode::NOT_FOUND, None, Some("scripted: not found")),
                    Answer::Gone => {
                        if let Some(registered) = state.subscriptions.get_mut(id) {
                            registered.gone = true;
                        }
                        (StatusCode::GONE, None, Some("scripted: gone"))
                    }
                    Answer::TooManyRequests { retry_after_secs } => (
                        StatusCode::TOO_MANY_REQUESTS,
                        Some(retry_after_secs),
                        Some("scripted: too many requests"),
                    ),
                    Answer::ServerError => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        None,
                        Some("scripted: server error"),
                    ),
                    Answer::ServiceUnavailable { retry_after_secs } => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        retry_after_secs,
                        Some("scripted: service unavailable"),
                    ),
                };
                let mut response = match reason {
                    Some(reason) => error(status, reason),
                    None => {
                        let mut response = Response::new(Full::default());
                        *response.status_mut() = status;
                        let location =
                            format!("{}/m/{}", self.origin(), uuid::Uuid::new_v4().simple());
                        if let Ok(location) = HeaderValue::from_str(&location) {
                            response.headers_mut().insert(header::LOCATION, location);
                        }
                        response
                            .headers_mut()
                            .insert("ttl", HeaderValue::from(valid.ttl));
                        state.delivered.push(Delivered {
                            endpoint: endpoint.clone(),
                            payload: valid.payload,
                            ttl: valid.ttl,
                            urgency: valid.urgency,
                            topic: valid.topic,
                            at,
                        });
                        response
                    }
                };
                if let Some(secs) = retry_after {
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
                let attempt = Attempt {
                    endpoint,
                    status: status.as_u16(),
                    rejection: reason.map(str::to_owned),
                    at,
                    retry_after,
                };
                (response, attempt)
            }
        };
        state.attempts.push(attempt);
        drop(state);
        self.changed.notify_waiters();
        response
    }

    /// Every check a real push service makes, in order.
    fn check(&self, id: &str, headers: &HeaderMap, body: &[u8]) -> Result<Valid, Reject> {
        let (secret, auth, pinned) = {
            let state = self.lock();
            let Some(registered) = state.subscriptions.get(id) else {
                return Err(reject(StatusCode::NOT_FOUND, "no such subscription"));
            };
            if registered.gone {
                return Err(reject(
                    StatusCode::GONE,
                    "the subscription has expired or was unsubscribed",
                ));
            }
            (
                registered.secret.clone(),
                registered.auth,
                state.vapid_key.clone(),
            )
        };

        let k = self.check_vapid(headers)?;
        if let Some(pinned) = pinned {
            if k.trim_end_matches('=') != pinned {
                return Err(reject(
                    StatusCode::FORBIDDEN,
                    "VAPID k is not the application server key the subscription was made with",
                ));
            }
        }

        let ttl = match header_str(headers, "ttl") {
            None => {
                return Err(reject(
                    StatusCode::BAD_REQUEST,
                    "TTL header required (RFC 8030 §5.2)",
                ))
            }
            Some(ttl) => ttl.trim().parse::<u64>().map_err(|_| {
                reject(
                    StatusCode::BAD_REQUEST,
                    format!("TTL {ttl:?} is not a non-negative integer"),
                )
            })?,
        };
        let urgency = header_str(headers, "urgency").map(str::to_owned);
        if let Some(urgency) = &urgency {
            if !["very-low", "low", "normal", "high"].contains(&urgency.as_str()) {
                return Err(reject(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "Urgency {urgency:?} is not very-low, low, normal or high (RFC 8030 §5.3)"
                    ),
                ));
            }
        }
        let topic = header_str(headers, "topic").map(str::to_owned);
        if let Some(topic) = &topic {
            let base64url = topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if topic.is_empty() || topic.len() > 32 || !base64url {
                return Err(reject(
                    StatusCode::BAD_REQUEST,
                    "Topic must be at most 32 base64url characters (RFC 8030 §5.4)",
                ));
            }
        }

        match header_str(headers, "content-encoding") {
            Some(encoding) if encoding.trim().eq_ignore_ascii_case("aes128gcm") => {}
            other => {
                return Err(reject(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!("Content-Encoding must be aes128gcm (RFC 8291), got {other:?}"),
                ))
            }
        }
        if body.len() > MAX_PAYLOAD {
            return Err(reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body of {} bytes is larger than {MAX_PAYLOAD}", body.len()),
            ));
        }
        let payload = decrypt_payload(body, &secret, &auth).map_err(|e| {
            reject(
                StatusCode::BAD_REQUEST,
                format!("the body does not decrypt with the subscription's keys (RFC 8291): {e}"),
            )
        })?;
        Ok(Valid {
            payload,
            ttl,
            urgency,
            topic,
        })
    }

    /// RFC 8292: returns `k` when the header is valid.
    fn check_vapid(&self, headers: &HeaderMap) -> Result<String, Reject> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(reject(
                StatusCode::UNAUTHORIZED,
                "Authorization: vapid t=<JWT>, k=<key> required (RFC 8292)",
            ));
        };
        let (t, k) = value.to_str().ok().and_then(parse_vapid).ok_or_else(|| {
            reject(
                StatusCode::UNAUTHORIZED,
                "malformed Authorization: expected vapid t=<JWT>, k=<key> (RFC 8292 §3)",
            )
        })?;
        let key_bytes = URL_SAFE_NO_PAD
            .decode(k.trim_end_matches('='))
            .ok()
            .filter(|bytes| bytes.len() == 65 && bytes[0] == 4)
            .ok_or_else(|| {
                reject(
                    StatusCode::UNAUTHORIZED,
                    "VAPID k must be an uncompressed P-256 public key in base64url (RFC 8292 §3.2)",
                )
            })?;
        let key = ES256PublicKey::from_bytes(&key_bytes)
            .map_err(|_| reject(StatusCode::UNAUTHORIZED, "VAPID k is not a point on P-256"))?;
        let metadata = Token::decode_metadata(t)
            .map_err(|_| reject(StatusCode::UNAUTHORIZED, "VAPID t is not a JWT"))?;
        if metadata.algorithm() != "ES256" {
            return Err(reject(
                StatusCode::FORBIDDEN,
                format!("VAPID JWT must be ES256, not {}", metadata.algorithm()),
            ));
        }
        let options = VerificationOptions {
            // Checked strictly below, with reasons; iat/nbf are not part of VAPID.
            time_tolerance: Some(JwtDuration::from_secs(0)),
            accept_future: true,
            ..VerificationOptions::default()
        };
        let claims = key
            .verify_token::<NoCustomClaims>(t, Some(options))
            .map_err(|e| reject(StatusCode::FORBIDDEN, format!("VAPID JWT rejected: {e}")))?;

        let now = Clock::now_since_epoch().as_secs();
        let Some(exp) = claims.expires_at.map(|exp| exp.as_secs()) else {
            return Err(reject(StatusCode::FORBIDDEN, "VAPID JWT has no exp"));
        };
        if exp <= now {
            return Err(reject(StatusCode::FORBIDDEN, "VAPID JWT has expired"));
        }
        if exp > now + MAX_JWT_VALIDITY.as_secs() {
            return Err(reject(
                StatusCode::FORBIDDEN,
                "VAPID JWT exp is more than 24 hours ahead (RFC 8292 §2)",
            ));
        }
        let origin = self.origin();
        let aud_ok = match &claims.audiences {
            Some(Audiences::AsString(aud)) => *aud == origin,
            Some(Audiences::AsSet(auds)) => auds.len() == 1 && auds.contains(&origin),
            None => false,
        };
        if !aud_ok {
            return Err(reject(
                StatusCode::FORBIDDEN,
                format!(
                    "VAPID JWT aud must be the push resource's origin {origin:?}, got {:?}",
                    claims.audiences.as_ref().map(audiences_string)
                ),
            ));
        }
        match &claims.subject {
            Some(sub) if sub.starts_with("mailto:") || sub.starts_with("https:") => {}
            Some(sub) => {
                return Err(reject(
                    StatusCode::FORBIDDEN,
                    format!("VAPID JWT sub must be a mailto: or https: contact, got {sub:?}"),
                ))
            }
            None => return Err(reject(StatusCode::FORBIDDEN, "VAPID JWT has no sub")),
        }
        Ok(k.to_owned())
    }

    fn messages_json(&self) -> Value {
        let state = self.lock();
        let messages: Vec<Value> = state
            .delivered
            .iter()
            .map(|message| {
                let payload = serde_json::from_slice::<Value>(&message.payload)
                    .unwrap_or_else(|_| Value::String(STANDARD.encode(&message.payload)));
                json!({
                    "endpoint": message.endpoint,
                    "payload": payload,
                    "ttl": message.ttl,
                    "urgency": message.urgency,
                    "topic": message.topic,
                    "since_start_secs": message.at.duration_since(self.started).as_secs_f64(),
                })
            })
            .collect();
        Value::Array(messages)
    }

    fn attempts_json(&self) -> Value {
        let state = self.lock();
        let attempts: Vec<Value> = state
            .attempts
            .iter()
            .map(|attempt| {
                json!({
                    "endpoint": attempt.endpoint,
                    "status": attempt.status,
                    "rejection": attempt.rejection,
                    "retry_after": attempt.retry_after,
                    "since_start_secs": attempt.at.duration_since(self.started).as_secs_f64(),
                })
            })
            .collect();
        Value::Array(attempts)
    }

    async fn post_answers(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let body = match Limited::new(request.into_body(), READ_LIMIT)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("cannot read the body: {e}"),
                )
            }
        };
        let answers = match parse_answers(&body) {
            Ok(answers) => answers,
            Err(reason) => return error(StatusCode::BAD_REQUEST, &reason),
        };
        let queued = answers.len();
        let mut state = self.lock();
        state.answers.extend(answers);
        let pending = state.answers.len();
        drop(state);
        json_response(
            StatusCode::OK,
            json!({"queued": queued, "pending": pending}),
        )
    }
}

/// `[{"status":429,"retry_after":2},…]` → answers.
fn parse_answers(body: &[u8]) -> Result<Vec<Answer>, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Array(items) = value else {
        return Err(r#"expected an array like [{"status":429,"retry_after":2}]"#.to_owned());
    };
    items
        .iter()
        .map(|item| {
            let status = item.get("status").and_then(Value::as_u64);
            let retry_after = item.get("retry_after").and_then(Value::as_u64);
            match status {
                Some(201) => Ok(Answer::Created),
                Some(404) => Ok(Answer::NotFound),
                Some(410) => Ok(Answer::Gone),
                Some(429) => Ok(Answer::TooManyRequests {
                    retry_after_secs: retry_after.unwrap_or(0),
                }),
                Some(500) => Ok(Answer::ServerError),
                Some(503) => Ok(Answer::ServiceUnavailable {
                    retry_after_secs: retry_after,
                }),
                _ => Err(format!(
                    "{item}: status must be one of 201, 404, 410, 429, 500, 503"
                )),
            }
        })
        .collect()
}

/// `vapid t=<JWT>, k=<key>` → `(t, k)`.
fn parse_vapid(value: &str) -> Option<(&str, &str)> {
    let (scheme, params) = value.trim().split_once(char::is_whitespace)?;
    if !scheme.eq_ignore_ascii_case("vapid") {
        return None;
    }
    let (mut t, mut k) = (None, None);
    for param in params.split(',') {
        let (name, value) = param.trim().split_once('=')?;
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "t" => t = Some(value),
            "k" => k = Some(value),
            _ => {}
        }
    }
    match (t, k) {
        (Some(t), Some(k)) if !t.is_empty() && !k.is_empty() => Some((t, k)),
        _ => None,
    }
}

fn audiences_string(audiences: &Audiences) -> String {
    match audiences {
        Audiences::AsString(aud) => aud.clone(),
        Audiences::AsSet(auds) => {
            let mut auds: Vec<&String> = auds.iter().collect();
            auds.sort();
            format!("{auds:?}")
        }
    }
}

/// RFC 8291 decryption with the user agent's private key and auth secret.
fn decrypt_payload(
    body: &[u8],
    secret: &p256::SecretKey,
    auth: &Auth,
) -> Result<Vec<u8>, web_push_native::Error> {
    web_push_native::decrypt(body.to_vec(), secret, auth)
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

fn json_response(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// An error body in the shape autopush uses: `{"code","error","message"}`.
fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        json!({
            "code": status.as_u16(),
            "error": status.canonical_reason().unwrap_or(""),
            "message": message,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8291 Appendix A: the example message decrypts with the UA's private key and auth.
    #[test]
    fn rfc8291_appendix_a_decrypts() {
        let ciphertext = URL_SAFE_NO_PAD
            .decode(
                "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN",
            )
            .unwrap();
        let ua_private = p256::SecretKey::from_slice(
            &URL_SAFE_NO_PAD
                .decode("q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94")
                .unwrap(),
        )
        .unwrap();
        let auth =
            Auth::clone_from_slice(&URL_SAFE_NO_PAD.decode("BTBZMqHH6r4Tts7J_aSIgg").unwrap());
        let plaintext = decrypt_payload(&ciphertext, &ua_private, &auth).unwrap();
        assert_eq!(plaintext, b"When I grow up, I want to be a watermelon");
        // The UA public key of the appendix is the private key's.
        assert_eq!(
            URL_SAFE_NO_PAD.encode(ua_private.public_key().to_encoded_point(false).as_bytes()),
            "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4"
        );
        // A different auth secret does not decrypt it.
        let wrong = Auth::clone_from_slice(&[0u8; 16]);
        assert!(decrypt_payload(&ciphertext, &ua_private, &wrong).is_err());
    }

    #[test]
    fn parses_vapid_headers() {
        assert_eq!(
            parse_vapid("vapid t=a.b.c, k=BKEY"),
            Some(("a.b.c", "BKEY"))
        );
        assert_eq!(parse_vapid("Vapid k=BKEY,t=a.b.c"), Some(("a.b.c", "BKEY")));
        assert_eq!(parse_vapid("WebPush a.b.c"), None);
        assert_eq!(parse_vapid("vapid t=a.b.c"), None);
        assert_eq!(parse_vapid("vapid t=, k=BKEY"), None);
        assert_eq!(parse_vapid("Bearer a.b.c"), None);
    }

    #[test]
    fn parses_answers() {
        let answers = parse_answers(
            br#"[{"status":429,"retry_after":2},{"status":503},{"status":410},{"status":201}]"#,
        )
        .unwrap();
        assert_eq!(
            answers,
            vec![
                Answer::TooManyRequests {
                    retry_after_secs: 2
                },
                Answer::ServiceUnavailable {
                    retry_after_secs: None
                },
                Answer::Gone,
                Answer::Created,
            ]
        );
        assert!(parse_answers(br#"[{"status":418}]"#).is_err());
        assert!(parse_answers(br#"{"status":429}"#).is_err());
    }
}
