//! One socket's life: authentication, recovery of what the client missed, then live frames,
//! in-band token refresh, heartbeats and the close.
//!
//! What a client can make a socket do is bounded: sockets still waiting for their `auth` frame
//! are capped per instance (1013 beyond), and each socket may send only so many frames, and
//! fewer `refresh` frames (each checks the session on the primary), before it is closed (4030).
//!
//! The socket joins the hub *before* it reads the feed, so a change committed meanwhile is either
//! in what it reads or queued for it (or both: frames at or below the last sequence sent are
//! skipped). A live frame that skips ahead (a lost notification) is filled from the feed first,
//! so the client sees every sequence number once, in order, or is told to resync.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_ws::{Message, MessageStream, ProtocolError, Session};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use service_kit::access_token::{AccessClaims, TokenError, TokenVerifier};
use service_kit::allowance::Allowance;
use service_kit::db::{Database, DbError};
use service_kit::sqlx::pool::PoolConnection;
use service_kit::sqlx::Postgres;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::feed::{can_recover, Change};
use super::hub::{Frame, Hub, JoinError, Link, Outbound};
use super::settings::LiveSettings;
use crate::api::{to_text, ClientFrame, CloseReason, Ready, Refreshed};
use crate::storage;

pub const FRAMES_SENT: &str = "live_frames_sent_total";
pub const FRAME_LATENCY: &str = "live_event_to_frame_seconds";
pub const RECOVERIES: &str = "live_recoveries_total";
pub const CLOSES: &str = "live_closes_total";

/// Entries read from the feed at a time while catching up.
const FEED_PAGE: i64 = 500;
/// How long a close frame may wait behind unsent frames before the connection is dropped.
const CLOSE_FLUSH_LIMIT: Duration = Duration::from_secs(5);
/// Pongs a client may owe (unanswered pings): those answers cost it nothing from its allowance.
const MAX_OWED_PONGS: u32 = 3;

/// What every socket shares.
pub struct Live {
    pub hub: Arc<Hub>,
    pub verifier: Arc<TokenVerifier>,
    pub db: Database,
    pub settings: LiveSettings,
    pub handshakes: HandshakeLimit,
}

/// Sockets each user may open on this instance: a burst, then a steady rate (GCRA, keyed by
/// user). Idle users are forgotten by [`HandshakeLimit::forget_idle`].
pub struct HandshakeLimit {
    limiter: DefaultKeyedRateLimiter<Uuid>,
    clock: DefaultClock,
}

impl HandshakeLimit {
    pub fn new(settings: &LiveSettings) -> Self {
        let per_minute = NonZeroU32::new(settings.handshakes_per_minute).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(settings.handshake_burst).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: RateLimiter::keyed(Quota::per_minute(per_minute).allow_burst(burst)),
            clock: DefaultClock::default(),
        }
    }

    /// Counts a handshake of `user`; `Err` holds how long to wait.
    fn check(&self, user: Uuid) -> Result<(), Duration> {
        self.limiter
            .check_key(&user)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Drops users whose allowance is full again.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// Why a socket ends: the reason to send, or nothing when the client is already gone.
pub enum End {
    Close(CloseReason),
    Gone,
}

impl From<CloseReason> for End {
    fn from(reason: CloseReason) -> Self {
        End::Close(reason)
    }
}

/// Runs a socket until it ends. `claims` are the handshake's, if it carried a token.
pub async fn run(
    live: Arc<Live>,
    mut session: Session,
    stream: MessageStream,
    claims: Option<AccessClaims>,
    since: Option<i64>,
) {
    let mut stream = stream.max_frame_size(live.settings.max_frame_bytes);
    let end = match claims {
        Some(claims) => Ok(claims),
        // Refused at once beyond the cap, so sockets that never authenticate cannot pile up.
        None => match live.hub.await_auth(live.settings.max_unauthenticated) {
            None => Err(CloseReason::TryAgainLater.into()),
            Some(_waiting) => first_frame_auth(&live, &mut stream).await,
        },
    };
    let end = match end {
        Err(end) => end,
        Ok(claims) => match live.hub.join(claims.sub, claims.sid) {
            Err(JoinError::TooMany) => CloseReason::TooManyConnections.into(),
            Err(JoinError::Draining) => CloseReason::Restart.into(),
            Ok((link, outbound)) => {
                let now = Instant::now();
                let settings = &live.settings;
                let mut socket = Socket {
                    live: &live,
                    session: &mut session,
                    link: &link,
                    claims,
                    last_sent: 0,
                    frames: Allowance::new(
                        settings.client_frame_burst,
                        Duration::from_secs(1) / settings.client_frames_per_second,
                        now,
                    ),
                    refreshes: Allowance::new(
                        settings.refresh_burst,
                        settings.refresh_interval,
                        now,
                    ),
                    owed_pongs: 0,
                };
                let end = socket.serve(&mut stream, outbound, since).await;
                live.hub.leave(&link);
                end
            }
        },
    };
    if let End::Close(reason) = end {
        metrics::counter!(CLOSES, "reason" => reason.name()).increment(1);
        let close = actix_ws::CloseReason {
            code: reason.code().into(),
            description: Some(reason.name().to_owned()),
        };
        // A client that does not read may never take the close frame: then the connection is
        // dropped (it sees 1006 and reconnects with `since` all the same).
        let _ = tokio::time::timeout(CLOSE_FLUSH_LIMIT, session.close(Some(close))).await;
    }
}

/// Waits for `{"type":"auth","token":…}` as the first frame.
async fn first_frame_auth(live: &Live, stream: &mut MessageStream) -> Result<AccessClaims, End> {
    let first = tokio::time::timeout(live.settings.auth_timeout, stream.recv()).await;
    let text = match first {
        Err(_) => return Err(CloseReason::Unauthorized.into()),
        Ok(None) => return Err(End::Gone),
        Ok(Some(Ok(Message::Text(text)))) => text,
        Ok(Some(Ok(Message::Close(_)))) => return Err(End::Gone),
        Ok(Some(message)) => return Err(protocol_end(message)),
    };
    match serde_json::from_str::<ClientFrame>(&text) {
        Ok(ClientFrame::Auth { token }) => admit(live, &token).await.map_err(End::from),
        _ => Err(CloseReason::Unauthorized.into()),
    }
}

/// Why a token may not hold a socket.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("the session of this access token has ended")]
    SessionEnded,
    /// The user opened sockets faster than [`HandshakeLimit`] allows; wait this long.
    #[error("too many live sockets opened; wait {} s", .0.as_secs().max(1))]
    TooManyHandshakes(Duration),
    #[error("cannot check the session right now: {0}")]
    Unavailable(DbError),
}

impl From<Refusal> for End {
    fn from(refusal: Refusal) -> Self {
        End::Close(match refusal {
            Refusal::Token(TokenError::KeysUnavailable(_)) | Refusal::Unavailable(_) => {
                CloseReason::Internal
            }
            Refusal::Token(_) => CloseReason::Unauthorized,
            Refusal::SessionEnded => CloseReason::SessionEnded,
            Refusal::TooManyHandshakes(_) => CloseReason::TooManyConnections,
        })
    }
}

/// A token that may open a socket (in the handshake or its first frame): valid, of a session
/// that has not ended, and of a user who has not opened sockets faster than allowed here.
pub async fn admit(live: &Live, token: &str) -> Result<AccessClaims, Refusal> {
    let claims = live.verifier.verify(token).await?;
    // Before the primary is asked anything: a client that reconnects after every close (4030,
    // say) gets 429s that cost nothing.
    live.handshakes
        .check(claims.sub)
        .map_err(Refusal::TooManyHandshakes)?;
    session_open(live, claims).await
}

/// A token that may go on holding a socket (an in-band refresh, bounded per socket): valid, and
/// of a session that has not ended.
async fn still_admitted(live: &Live, token: &str) -> Result<AccessClaims, Refusal> {
    let claims = live.verifier.verify(token).await?;
    session_open(live, claims).await
}

async fn session_open(live: &Live, claims: AccessClaims) -> Result<AccessClaims, Refusal> {
    if let Some(session) = claims.sid {
        let revoked = live
            .db
            .primary(|mut conn| async move { storage::session_revoked(&mut conn, session).await })
            .await
            .map_err(Refusal::Unavailable)?;
        if revoked {
            return Err(Refusal::SessionEnded);
        }
    }
    Ok(claims)
}

/// What ends a socket for a frame this protocol has no use for.
fn protocol_end(message: Result<Message, ProtocolError>) -> End {
    match message {
        Err(ProtocolError::Overflow) => CloseReason::FrameTooLarge.into(),
        Err(_) => CloseReason::Protocol.into(),
        Ok(Message::Binary(_)) | Ok(Message::Continuation(_)) => CloseReason::Unsupported.into(),
        Ok(_) => CloseReason::Protocol.into(),
    }
}

struct Socket<'a> {
    live: &'a Live,
    session: &'a mut Session,
    link: &'a Link,
    claims: AccessClaims,
    /// The last sequence number the client was sent (or, without recovery, the head it was told).
    last_sent: i64,
    /// Frames of any kind the client may still send, and `refresh` frames.
    frames: Allowance,
    refreshes: Allowance,
    /// Pings sent and not answered yet (at most [`MAX_OWED_PONGS`]).
    owed_pongs: u32,
}

impl Socket<'_> {
    async fn serve(
        &mut self,
        stream: &mut MessageStream,
        mut outbound: mpsc::UnboundedReceiver<Outbound>,
        since: Option<i64>,
    ) -> End {
        if let Err(end) = Box::pin(self.open(since)).await {
            return end;
        }
        let settings = &self.live.settings;
        let mut ping = tokio::time::interval(settings.ping_interval);
        ping.tick().await;
        let mut last_heard = Instant::now();
        loop {
            let token_deadline = self.token_deadline();
            tokio::select! {
                biased;
                reason = self.link.closed() => return reason.into(),
                message = stream.recv() => {
                    last_heard = Instant::now();
                    match message {
                        None | Some(Ok(Message::Close(_))) => return End::Gone,
                        Some(Ok(Message::Nop)) => {}
                        // The answer to a ping of ours: what keeps the socket open, never
                        // counted against the client.
                        Some(Ok(Message::Pong(_))) if self.owed_pongs > 0 => self.owed_pongs -= 1,
                        Some(Ok(_)) if !self.frames.take(last_heard) => {
                            return CloseReason::TooManyFrames.into();
                        }
                        Some(Ok(Message::Text(text))) => {
                            if let Err(end) = Box::pin(self.client_frame(&text)).await {
                                return end;
                            }
                        }
                        Some(Ok(Message::Ping(bytes))) => {
                            if self.session.pong(&bytes).await.is_err() {
                                return End::Gone;
                            }
                        }
                        Some(Ok(Message::Pong(_))) => {}
                        Some(other) => return protocol_end(other),
                    }
                }
                next = outbound.recv() => {
                    let result = match next {
                        Some(Outbound::Change(frame)) => self.live_frame(frame).await,
                        Some(Outbound::CatchUp) => Box::pin(self.send_feed(None)).await,
                        None => Err(End::Gone),
                    };
                    if let Err(end) = result {
                        return end;
                    }
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > settings.idle_timeout {
                        return CloseReason::Idle.into();
                    }
                    if self.session.ping(b"").await.is_err() {
                        return End::Gone;
                    }
                    self.owed_pongs = (self.owed_pongs + 1).min(MAX_OWED_PONGS);
                }
                _ = tokio::time::sleep_until(token_deadline.into()) => {
                    return CloseReason::Unauthorized.into();
                }
            }
        }
    }

    /// `ready`, then what the client missed since `since` (if it can be given exactly).
    async fn open(&mut self, since: Option<i64>) -> Result<(), End> {
        let user = self.claims.sub;
        let (head, first_page) = self
            .read_feed(move |mut conn| async move {
                let head = storage::head(&mut conn, user).await?;
                let page = match since {
                    Some(since) if since < head && since >= 0 => {
                        storage::entries_after(&mut conn, user, since, None, FEED_PAGE).await?
                    }
                    _ => Vec::new(),
                };
                Ok((head, page))
            })
            .await?;
        let recovered = since.map(|since| {
            let recovered = can_recover(since, head, first_page.first().map(|c| c.seq))
                && is_run_from(&first_page, since);
            let label = if recovered { "true" } else { "false" };
            metrics::counter!(RECOVERIES, "recovered" => label).increment(1);
            recovered
        });
        let ready = Ready {
            kind: "ready",
            seq: head,
            recovered,
            token_expires_at: self.expires_at(),
        };
        self.send_text(to_text(&ready)).await?;
        match (since, recovered) {
            (Some(since), Some(true)) => {
                self.last_sent = since;
                if self.send_page(&first_page).await? {
                    self.send_feed(None).await?;
                }
            }
            _ => self.last_sent = head,
        }
        Ok(())
    }

    /// A frame the hub handed over: sent after any entries it skipped ahead of.
    async fn live_frame(&mut self, frame: Arc<Frame>) -> Result<(), End> {
        self.link.sent(frame.text.len());
        if frame.seq <= self.last_sent {
            return Ok(());
        }
        if frame.seq > self.last_sent + 1 {
            Box::pin(self.send_feed(Some(frame.seq))).await?;
            if self.last_sent + 1 != frame.seq {
                return Err(CloseReason::Resync.into());
            }
        }
        self.send_change(&frame).await
    }

    /// Sends the feed's entries after the last sent (and before `before`), page by page; an
    /// entry that is not the next number means a gap that cannot be filled.
    async fn send_feed(&mut self, before: Option<i64>) -> Result<(), End> {
        loop {
            let (user, after) = (self.claims.sub, self.last_sent);
            let page = self
                .read_feed(move |mut conn| async move {
                    storage::entries_after(&mut conn, user, after, before, FEED_PAGE).await
                })
                .await?;
            if !self.send_page(&page).await? {
                return Ok(());
            }
        }
    }

    /// Sends a page read from the feed; whether it was full (more may follow).
    async fn send_page(&mut self, page: &[Change]) -> Result<bool, End> {
        for change in page {
            if change.seq != self.last_sent + 1 {
                return Err(CloseReason::Resync.into());
            }
            self.send_change(&Frame::of(change)).await?;
        }
        Ok(page.len() as i64 == FEED_PAGE)
    }

    async fn send_change(&mut self, frame: &Frame) -> Result<(), End> {
        self.send_text(frame.text.clone()).await?;
        self.last_sent = frame.seq;
        metrics::counter!(FRAMES_SENT).increment(1);
        let latency = OffsetDateTime::now_utc() - frame.at;
        metrics::histogram!(FRAME_LATENCY).record(latency.as_seconds_f64().max(0.0));
        Ok(())
    }

    /// Sends one text frame, giving up when the socket is told to close meanwhile (a slow
    /// client's send would otherwise wait for as long as it does not read).
    async fn send_text(&mut self, text: impl Into<bytestring::ByteString>) -> Result<(), End> {
        let text = text.into();
        tokio::select! {
            biased;
            reason = self.link.closed() => Err(reason.into()),
            sent = self.session.text(text) => sent.map_err(|_| End::Gone),
        }
    }

    async fn client_frame(&mut self, text: &str) -> Result<(), End> {
        let Ok(ClientFrame::Refresh { token }) = serde_json::from_str::<ClientFrame>(text) else {
            return Err(CloseReason::Protocol.into());
        };
        if !self.refreshes.take(Instant::now()) {
            return Err(CloseReason::TooManyFrames.into());
        }
        let claims = still_admitted(self.live, &token).await?;
        if claims.sub != self.claims.sub {
            return Err(CloseReason::SessionEnded.into());
        }
        self.link.set_session(claims.sid);
        self.claims = claims;
        let refreshed = Refreshed {
            kind: "refreshed",
            token_expires_at: self.expires_at(),
        };
        self.send_text(to_text(&refreshed)).await
    }

    fn expires_at(&self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(self.claims.exp).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// When the socket closes unless a fresh token arrives: `exp` plus the grace.
    fn token_deadline(&self) -> Instant {
        let left = (self.expires_at() - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
        Instant::now() + left.unsigned_abs() + self.live.settings.token_grace
    }

    /// Feed reads go to the primary: a replica may not have the entries live frames announced.
    async fn read_feed<T, F, Fut>(&self, op: F) -> Result<T, End>
    where
        F: FnOnce(PoolConnection<Postgres>) -> Fut,
        Fut: std::future::Future<Output = Result<T, service_kit::sqlx::Error>>,
    {
        self.live.db.primary(op).await.map_err(|err: DbError| {
            tracing::warn!(error = %err, "cannot read the change feed");
            End::Close(CloseReason::Internal)
        })
    }
}

/// Whether `page` is exactly `since + 1, since + 2, …`.
fn is_run_from(page: &[Change], since: i64) -> bool {
    page.iter()
        .zip(since + 1..)
        .all(|(change, expected)| change.seq == expected)
}
