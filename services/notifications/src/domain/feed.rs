//! Each user's change feed: what a change looks like, how pods tell each other about new ones,
//! and when a reconnecting client's `since` can be honoured.
//!
//! Sequence numbers are per user, 1, 2, 3... without gaps, handed out by the consumer as it
//! appends (storage). The feed is trimmed from its oldest end only, so what is kept is one
//! unbroken run that ends at the head: a client that last saw `since` missed nothing it cannot be
//! given exactly when the entry right after `since` is still kept.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::api::to_text;

/// The PostgreSQL channel on which the instance that appended changes tells every instance.
pub const CHANNEL: &str = "live_feed";

/// NOTIFY payloads must stay under 8,000 bytes; changes are sent in chunks below this.
const MAX_PAYLOAD_BYTES: usize = 7_500;

/// A change to append to its user's feed (the sequence number comes with the append).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewChange {
    pub user: Uuid,
    /// `task.created`, `task.updated`, `task.deleted`.
    pub kind: &'static str,
    pub id: Uuid,
    pub version: i64,
    pub at: OffsetDateTime,
}

/// One entry of a user's feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub user: Uuid,
    pub seq: i64,
    #[serde(rename = "type")]
    pub kind: String,
    pub id: Uuid,
    pub version: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// What one instance tells all of them (through [`CHANNEL`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Broadcast {
    /// Changes just appended, in sequence order per user.
    Changes(Vec<Change>),
    /// Close the sockets of a user's session (or of all their sessions).
    Close(CloseOrder),
}

/// Whose sockets close, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseOrder {
    pub user: Uuid,
    /// `None`: every session of the user (the account was deleted).
    pub session: Option<Uuid>,
}

/// `changes` as NOTIFY payloads (`Broadcast::Changes`), each below the size PostgreSQL accepts.
pub fn payloads(changes: &[Change]) -> Vec<String> {
    const HEAD: &str = "{\"changes\":[";
    const TAIL: &str = "]}";
    let mut payloads = Vec::new();
    let mut payload = String::from(HEAD);
    for change in changes {
        let json = to_text(change);
        if payload.len() > HEAD.len()
            && payload.len() + json.len() + 1 + TAIL.len() > MAX_PAYLOAD_BYTES
        {
            payload.push_str(TAIL);
            payloads.push(std::mem::replace(&mut payload, String::from(HEAD)));
        }
        if payload.len() > HEAD.len() {
            payload.push(',');
        }
        payload.push_str(&json);
    }
    if payload.len() > HEAD.len() {
        payload.push_str(TAIL);
        payloads.push(payload);
    }
    payloads
}

/// Whether a client that last saw `since` can be given exactly what it missed, knowing the
/// user's `head` and the first kept entry after `since` (if any).
pub fn can_recover(since: i64, head: i64, first_after_since: Option<i64>) -> bool {
    if since > head || since < 0 {
        // A sequence this feed never handed out (another account's, or a feed that was erased).
        false
    } else if since == head {
        true
    } else {
        first_after_since == Some(since + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(seq: i64) -> Change {
        Change {
            user: Uuid::nil(),
            seq,
            kind: "task.updated".into(),
            id: Uuid::new_v4(),
            version: seq,
            at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn recovery_needs_the_entry_right_after_since() {
        assert!(can_recover(5, 5, None), "nothing missed");
        assert!(can_recover(0, 3, Some(1)), "everything kept");
        assert!(can_recover(40, 90, Some(41)));
        assert!(!can_recover(40, 90, Some(55)), "41..54 were trimmed");
        assert!(
            !can_recover(40, 90, None),
            "everything after 40 was trimmed"
        );
        assert!(!can_recover(91, 90, None), "a sequence never handed out");
        assert!(!can_recover(-1, 90, Some(1)));
    }

    #[test]
    fn payloads_stay_below_the_notify_limit_and_keep_every_change_in_order() {
        let changes: Vec<Change> = (1..=500).map(change).collect();
        let payloads = payloads(&changes);
        assert!(payloads.len() > 1);
        let mut seen = Vec::new();
        for payload in &payloads {
            assert!(payload.len() < 8_000, "{} bytes", payload.len());
            match serde_json::from_str::<Broadcast>(payload).unwrap() {
                Broadcast::Changes(chunk) => seen.extend(chunk),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seen, changes);
    }
}
