//! Web Push: sending each pending delivery to its device's push service (RFC 8030), encrypted
//! for the device (RFC 8291, aes128gcm, by `web-push-native`) and signed as this application
//! server (VAPID, RFC 8292).
//!
//! Each instance runs a dispatcher and a bounded pool: the dispatcher claims due pending rows
//! (`FOR UPDATE SKIP LOCKED`, with a lease) only as many as the queue has room for
//! (`PUSH_MAX_QUEUE`), and `PUSH_MAX_WORKERS` workers send them. So a burst or a slow push
//! service leaves rows pending in the database, never in memory, and never slows the consumer,
//! which only inserts rows. Each answer settles its row: 2xx sent; 404/410 the subscription is
//! gone and forgotten; 429 and 5xx (and no answer) are retried with exponential backoff, no
//! sooner than the push service's `Retry-After`; other 4xx failed. A worker that dies mid-send
//! leaves a claim that expires and is sent again (`Topic` lets the push service replace a copy
//! it already holds).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::StatusCode;
use serde::Serialize;
use service_kit::db::Database;
use service_kit::workers::StoppableTask;
use time::OffsetDateTime;
use tokio::sync::{mpsc, Notify};
use uuid::Uuid;
use web_push_native::jwt_simple::algorithms::{ECDSAP256KeyPairLike, ES256KeyPair};
use web_push_native::jwt_simple::claims::Claims;
use web_push_native::{p256, Auth};

use super::devices::encode;
use super::settings::PushSettings;
use crate::storage;
use crate::storage::push::ClaimedDelivery;

/// How long a VAPID token is valid (RFC 8292 allows at most 24 h), and how long one is reused
/// for a push service before a fresh one is signed.
const VAPID_VALIDITY: Duration = Duration::from_secs(12 * 3600);
const VAPID_REUSE: Duration = Duration::from_secs(3600);
/// How often the pending backlog is measured.
const BACKLOG_INTERVAL: Duration = Duration::from_secs(5);
const BACKLOG_COUNT_CAP: i64 = 1_000_000;

pub const PUSHES: &str = "notifications_push_deliveries_total";
pub const PUSH_DURATION: &str = "notifications_push_request_duration_seconds";
pub const PUSH_QUEUE_DEPTH: &str = "notifications_push_queue_depth";
pub const PUSH_PENDING: &str = "notifications_push_pending";

/// The application server's identity: its P-256 key, as VAPID signs with it and as clients
/// subscribe with its public half.
pub struct ServerKey {
    key_pair: ES256KeyPair,
    /// Uncompressed public key in base64url: `applicationServerKey` for `pushManager.subscribe`.
    pub public_key: String,
    subject: String,
    /// Signed tokens by push-service origin, reused for a while (signing costs ~100 µs).
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

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Sent(_) => "sent",
            Outcome::Gone(_) => "gone",
            Outcome::Retry { .. } => "retry",
            Outcome::Failed { .. } => "failed",
        }
    }
}

/// What an answer of a push service means for the delivery.
pub fn classify(status: StatusCode, headers: &HeaderMap) -> Outcome {
    let code = status.as_u16();
    match code {
        200..=299 => Outcome::Sent(code),
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
        let client = reqwest::Client::builder()
            .timeout(self.settings.request_timeout)
            .connect_timeout(self.settings.request_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|err| format!("cannot build the push client: {err}"))?;
        let sender = Arc::new(Sender {
            db: self.db.clone(),
            settings: self.settings.clone(),
            key: self.key,
            client,
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
        Ok(StoppableTask::spawn(move |mut stop| async move {
            let (queue, jobs) = mpsc::channel::<ClaimedDelivery>(self.settings.max_queue);
            let jobs = Arc::new(tokio::sync::Mutex::new(jobs));
            // Told each time a worker takes a job, so the queue is refilled as it drains.
            let freed = Arc::new(Notify::new());
            let mut workers = tokio::task::JoinSet::new();
            for _ in 0..self.settings.max_workers {
                let jobs = jobs.clone();
                let sender = sender.clone();
                let freed = freed.clone();
                workers.spawn(async move {
                    loop {
                        let job = jobs.lock().await.recv().await;
                        let Some(job) = job else { return };
                        freed.notify_one();
                        sender.deliver(job).await;
                    }
                });
            }
            // Refill once half the queue is free: one claim per batch, not per push.
            let refill_at = (self.settings.max_queue / 2).max(1);
            loop {
                let room = queue.capacity();
                let mut claimed_all = room == 0;
                if room > 0 {
                    let lease = self.settings.claim_lease;
                    match self
                        .db
                        .primary(|mut conn| async move {
                            storage::push::claim(&mut conn, room as i64, lease).await
                        })
                        .await
                    {
                        Ok(claimed) => {
                            claimed_all = claimed.len() == room;
                            for job in claimed {
                                // Room was checked and only this loop sends: never full here.
                                if queue.try_send(job).is_err() {
                                    break;
                                }
                            }
                        }
                        Err(err) => tracing::warn!(error = %err, "cannot claim pushes"),
                    }
                }
                metrics::gauge!(PUSH_QUEUE_DEPTH)
                    .set((self.settings.max_queue - queue.capacity()) as f64);
                if claimed_all {
                    // More may be due: claim again as soon as the workers made room.
                    let made_room = async {
                        while queue.capacity() < refill_at {
                            freed.notified().await;
                        }
                    };
                    tokio::select! {
                        _ = made_room => {}
                        _ = stop.wait_for(|stop| *stop) => break,
                    }
                } else {
                    tokio::select! {
                        _ = tokio::time::sleep(self.settings.poll_interval) => {}
                        _ = self.wake.notified() => {}
                        _ = stop.wait_for(|stop| *stop) => break,
                    }
                }
            }
            // Claims still queued go back at once (an instance that dies instead leaves them
            // to expire); pushes in flight finish.
            drop(queue);
            let mut unsent = Vec::new();
            {
                let mut jobs = jobs.lock().await;
                jobs.close();
                while let Ok(job) = jobs.try_recv() {
                    unsent.push(job.id);
                }
            }
            if !unsent.is_empty() {
                let released = self
                    .db
                    .primary(|mut conn| {
                        let unsent = &unsent;
                        async move { storage::push::release(&mut conn, unsent).await }
                    })
                    .await;
                if let Err(err) = released {
                    tracing::warn!(error = %err, "cannot give up queued pushes; they expire");
                }
            }
            while workers.join_next().await.is_some() {}
        }))
    }
}

/// One worker's means: the push client and the database.
struct Sender {
    db: Database,
    settings: PushSettings,
    key: Arc<ServerKey>,
    client: reqwest::Client,
}

impl Sender {
    async fn deliver(&self, job: ClaimedDelivery) {
        let started = Instant::now();
        let outcome = self.send(&job).await;
        metrics::histogram!(PUSH_DURATION).record(started.elapsed());
        metrics::counter!(PUSHES, "outcome" => outcome.label()).increment(1);
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
                            let delay = backoff(
                                job.attempts,
                                settings.retry_base,
                                settings.retry_max,
                                after,
                            );
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
    }

    async fn send(&self, job: &ClaimedDelivery) -> Outcome {
        let failed = |error: String| Outcome::Failed {
            status: None,
            error,
        };
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
        let Some(origin) = origin_of(&job.endpoint) else {
            return failed("the endpoint is not a URL".to_owned());
        };
        let authorization = match self.key.authorization(&origin) {
            Ok(header) => header,
            Err(err) => return failed(err),
        };
        let answer = self
            .client
            .post(&job.endpoint)
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
            Err(err) => Outcome::Retry {
                status: None,
                error: format!("push service unreachable: {err}"),
                after: None,
            },
        }
    }
}

/// `scheme://host[:port]` of a URL (the port only when it is not the scheme's default).
fn origin_of(endpoint: &str) -> Option<String> {
    let url = url::Url::parse(endpoint).ok()?;
    let origin = url.origin();
    origin.is_tuple().then(|| origin.ascii_serialization())
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_vapid_audience_keeps_a_non_default_port() {
        assert_eq!(
            origin_of("http://127.0.0.1:4567/push/abc").as_deref(),
            Some("http://127.0.0.1:4567")
        );
        assert_eq!(
            origin_of("https://fcm.googleapis.com:443/fcm/send/x").as_deref(),
            Some("https://fcm.googleapis.com")
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
