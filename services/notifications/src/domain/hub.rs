//! The sockets this instance holds, by user, and fan-out to them.
//!
//! Fan-out never waits: a change is serialized once per user and handed to each of the user's
//! sockets through an unbounded queue whose bytes are counted against the socket's budget. A
//! socket over its budget is told to close (4008) and gets nothing more, so one slow reader costs
//! at most its budget in memory and never delays anyone else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use bytestring::ByteString;
use time::OffsetDateTime;
use tokio::sync::{mpsc, Notify};
use uuid::Uuid;

use super::feed::{Change, CloseOrder};
use crate::api::{to_text, ChangeFrame, CloseReason};

pub const OPEN_CONNECTIONS: &str = "live_connections";
pub const SLOW_CLIENT_CLOSES: &str = "live_slow_client_closes_total";
pub const UNAUTHENTICATED: &str = "live_unauthenticated_connections";

/// A change as every socket of its user sends it.
#[derive(Debug)]
pub struct Frame {
    pub seq: i64,
    pub text: ByteString,
    /// When the change happened: frame latency is measured from here.
    pub at: OffsetDateTime,
}

impl Frame {
    pub fn of(change: &Change) -> Self {
        let text = to_text(&ChangeFrame {
            seq: change.seq,
            kind: &change.kind,
            id: change.id,
            version: change.version,
            at: change.at,
        });
        Self {
            seq: change.seq,
            text: text.into(),
            at: change.at,
        }
    }
}

/// What a socket's task receives from the hub.
#[derive(Debug)]
pub enum Outbound {
    Change(Arc<Frame>),
    /// Changes may have been missed (the instance's listener reconnected): read the feed.
    CatchUp,
}

/// The hub's handle on one socket.
#[derive(Debug)]
pub struct Link {
    id: u64,
    pub user: Uuid,
    session: Mutex<Option<Uuid>>,
    outbound: mpsc::UnboundedSender<Outbound>,
    /// Bytes handed over and not yet written to the socket.
    queued: AtomicUsize,
    close: OnceLock<CloseReason>,
    closing: Notify,
}

impl Link {
    /// Tells the socket to close (the first reason wins).
    pub fn shut(&self, reason: CloseReason) {
        if self.close.set(reason).is_ok() {
            self.closing.notify_one();
        }
    }

    /// Resolves once the socket was told to close, with the reason.
    pub async fn closed(&self) -> CloseReason {
        loop {
            if let Some(reason) = self.close.get() {
                return *reason;
            }
            self.closing.notified().await;
        }
    }

    /// A frame of `bytes` left the queue.
    pub fn sent(&self, bytes: usize) {
        self.queued.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub fn set_session(&self, session: Option<Uuid>) {
        if let Ok(mut held) = self.session.lock() {
            *held = session;
        }
    }

    fn session(&self) -> Option<Uuid> {
        self.session.lock().ok().and_then(|held| *held)
    }

    fn offer(&self, frame: &Arc<Frame>, budget: usize) {
        if self.close.get().is_some() {
            return;
        }
        let bytes = frame.text.len();
        let queued = self.queued.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if queued > budget {
            self.queued.fetch_sub(bytes, Ordering::Relaxed);
            metrics::counter!(SLOW_CLIENT_CLOSES).increment(1);
            tracing::info!(user = %self.user, queued, "slow client: over its send budget");
            self.shut(CloseReason::SlowClient);
            return;
        }
        // The socket's task ended and dropped its receiver: nothing to deliver to.
        let _ = self.outbound.send(Outbound::Change(frame.clone()));
    }
}

/// Why a socket cannot join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinError {
    TooMany,
    Draining,
}

/// Every socket of this instance.
pub struct Hub {
    users: RwLock<HashMap<Uuid, Vec<Arc<Link>>>>,
    next_id: AtomicU64,
    open: AtomicUsize,
    all_left: Notify,
    draining: AtomicBool,
    budget: usize,
    max_per_user: usize,
    /// Sockets upgraded without a token that have not sent their `auth` frame yet.
    unauthenticated: AtomicUsize,
}

/// A socket's place among those waiting for their `auth` frame, given back when dropped.
pub struct AwaitingAuth<'a> {
    hub: &'a Hub,
}

impl Drop for AwaitingAuth<'_> {
    fn drop(&mut self) {
        let waiting = self.hub.unauthenticated.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!(UNAUTHENTICATED).set(waiting as f64);
    }
}

impl Hub {
    pub fn new(budget: usize, max_per_user: usize) -> Arc<Self> {
        Arc::new(Self {
            users: RwLock::default(),
            next_id: AtomicU64::new(1),
            open: AtomicUsize::new(0),
            all_left: Notify::new(),
            draining: AtomicBool::new(false),
            budget,
            max_per_user,
            unauthenticated: AtomicUsize::new(0),
        })
    }

    /// A place for a socket that has yet to send its token, unless `limit` sockets wait already.
    pub fn await_auth(&self, limit: usize) -> Option<AwaitingAuth<'_>> {
        let before = self
            .unauthenticated
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |waiting| {
                (waiting < limit).then_some(waiting + 1)
            })
            .ok()?;
        metrics::gauge!(UNAUTHENTICATED).set((before + 1) as f64);
        Some(AwaitingAuth { hub: self })
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// How many sockets `user` holds here.
    pub fn count(&self, user: Uuid) -> usize {
        self.users
            .read()
            .map_or(0, |users| users.get(&user).map_or(0, Vec::len))
    }

    /// Registers a socket of `user`; changes for the user queue up for it from now on.
    pub fn join(
        &self,
        user: Uuid,
        session: Option<Uuid>,
    ) -> Result<(Arc<Link>, mpsc::UnboundedReceiver<Outbound>), JoinError> {
        let (outbound, receiver) = mpsc::unbounded_channel();
        let link = Arc::new(Link {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            user,
            session: Mutex::new(session),
            outbound,
            queued: AtomicUsize::new(0),
            close: OnceLock::new(),
            closing: Notify::new(),
        });
        let mut users = self.users.write().map_err(|_| JoinError::Draining)?;
        // Checked under the lock, so a drain that began is never missed.
        if self.is_draining() {
            return Err(JoinError::Draining);
        }
        let links = users.entry(user).or_default();
        if links.len() >= self.max_per_user {
            return Err(JoinError::TooMany);
        }
        links.push(link.clone());
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(OPEN_CONNECTIONS).set(open as f64);
        Ok((link, receiver))
    }

    /// Unregisters a socket whose task ended.
    pub fn leave(&self, link: &Link) {
        let Ok(mut users) = self.users.write() else {
            return;
        };
        if let Some(links) = users.get_mut(&link.user) {
            links.retain(|held| held.id != link.id);
            if links.is_empty() {
                users.remove(&link.user);
            }
        }
        let open = self.open.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!(OPEN_CONNECTIONS).set(open as f64);
        if open == 0 {
            self.all_left.notify_waiters();
        }
    }

    /// Hands each change to its user's sockets (changes in sequence order per user).
    pub fn deliver(&self, changes: &[Change]) {
        let Ok(users) = self.users.read() else {
            return;
        };
        for change in changes {
            if let Some(links) = users.get(&change.user) {
                let frame = Arc::new(Frame::of(change));
                for link in links {
                    link.offer(&frame, self.budget);
                }
            }
        }
    }

    /// Closes the sockets `order` names.
    pub fn close(&self, order: &CloseOrder) {
        let Ok(users) = self.users.read() else {
            return;
        };
        for link in users.get(&order.user).into_iter().flatten() {
            if order.session.is_none() || order.session == link.session() {
                link.shut(CloseReason::SessionEnded);
            }
        }
    }

    /// Every socket reads what it may have missed from the feed.
    pub fn catch_up(&self) {
        let Ok(users) = self.users.read() else {
            return;
        };
        for link in users.values().flatten() {
            let _ = link.outbound.send(Outbound::CatchUp);
        }
    }

    /// Refuses new sockets, tells every socket to close with 1012 and waits (up to `limit`)
    /// until all have.
    pub async fn drain(&self, limit: Duration) {
        if let Ok(users) = self.users.write() {
            self.draining.store(true, Ordering::Relaxed);
            for link in users.values().flatten() {
                link.shut(CloseReason::Restart);
            }
        }
        let all_left = async {
            loop {
                let notified = self.all_left.notified();
                if self.open.load(Ordering::Relaxed) == 0 {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(limit, all_left).await.is_err() {
            tracing::warn!(
                open = self.open.load(Ordering::Relaxed),
                "sockets still open after {limit:?}; the server's drain ends them"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(user: Uuid, seq: i64) -> Change {
        Change {
            user,
            seq,
            kind: "task.updated".into(),
            id: Uuid::new_v4(),
            version: seq,
            at: OffsetDateTime::now_utc(),
        }
    }

    #[test]
    fn delivers_to_every_socket_of_the_user_and_no_one_else() {
        let hub = Hub::new(1 << 20, 10);
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let (_a1, mut phone) = hub.join(alice, None).unwrap();
        let (_a2, mut laptop) = hub.join(alice, None).unwrap();
        let (_b, mut other) = hub.join(bob, None).unwrap();
        hub.deliver(&[change(alice, 1), change(alice, 2)]);
        for device in [&mut phone, &mut laptop] {
            for seq in [1, 2] {
                match device.try_recv().unwrap() {
                    Outbound::Change(frame) => assert_eq!(frame.seq, seq),
                    other => panic!("{other:?}"),
                }
            }
        }
        assert!(other.try_recv().is_err());
    }

    #[test]
    fn a_socket_over_its_budget_is_closed_and_others_keep_receiving() {
        let frame_bytes = Frame::of(&change(Uuid::nil(), 1)).text.len();
        let hub = Hub::new(frame_bytes * 3, 10);
        let user = Uuid::new_v4();
        let (slow, _slow_queue) = hub.join(user, None).unwrap();
        let (fast, mut fast_queue) = hub.join(user, None).unwrap();
        for seq in 1..=5 {
            hub.deliver(&[change(user, seq)]);
            while let Ok(Outbound::Change(frame)) = fast_queue.try_recv() {
                fast.sent(frame.text.len());
            }
        }
        assert_eq!(slow.close.get(), Some(&CloseReason::SlowClient));
        assert_eq!(fast.close.get(), None);
    }

    #[test]
    fn bounds_sockets_per_user_and_refuses_joins_once_draining() {
        let hub = Hub::new(1 << 20, 2);
        let user = Uuid::new_v4();
        let (first, _q1) = hub.join(user, None).unwrap();
        let _second = hub.join(user, None).unwrap();
        assert_eq!(hub.join(user, None).unwrap_err(), JoinError::TooMany);
        hub.leave(&first);
        let _third = hub.join(user, None).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(hub.drain(Duration::from_millis(10)));
        assert_eq!(
            hub.join(Uuid::new_v4(), None).unwrap_err(),
            JoinError::Draining
        );
    }

    #[test]
    fn bounds_sockets_awaiting_auth_and_frees_a_place_when_one_is_done() {
        let hub = Hub::new(1 << 20, 10);
        let first = hub.await_auth(2).unwrap();
        let _second = hub.await_auth(2).unwrap();
        assert!(hub.await_auth(2).is_none());
        drop(first);
        assert!(hub.await_auth(2).is_some());
    }

    #[test]
    fn a_session_close_spares_the_users_other_sessions() {
        let hub = Hub::new(1 << 20, 10);
        let (user, ended, kept) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let (on_ended, _q1) = hub.join(user, Some(ended)).unwrap();
        let (on_kept, _q2) = hub.join(user, Some(kept)).unwrap();
        hub.close(&CloseOrder {
            user,
            session: Some(ended),
        });
        assert_eq!(on_ended.close.get(), Some(&CloseReason::SessionEnded));
        assert_eq!(on_kept.close.get(), None);
    }
}
