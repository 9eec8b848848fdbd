//! The live protocol on the wire: the JSON frames each side sends and the close codes, as
//! documented in README ("Live updates") and the OpenAPI description of `GET /v1/live`.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// The subprotocol a client offers (and the server selects) in `Sec-WebSocket-Protocol`.
pub const PROTOCOL: &str = "taskstream.v1";
/// Beside [`PROTOCOL`], a client may offer `bearer.<access token>` to authenticate in the
/// handshake; the server never selects (echoes) it.
pub const BEARER_PREFIX: &str = "bearer.";

/// What a client sends: text frames of JSON.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// The first frame when the handshake carried no token.
    Auth { token: String },
    /// A fresh access token of the same user, before the current one expires.
    Refresh { token: String },
}

/// What the server sends first, once the client is authenticated.
#[derive(Debug, Serialize)]
pub struct Ready {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The user's latest sequence number when the socket opened; live frames follow it.
    pub seq: i64,
    /// Only when the client sent `since`: whether every change after it follows (`true`), or
    /// some are gone and the client must fetch its state anew (`false`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    #[serde(with = "time::serde::rfc3339")]
    pub token_expires_at: OffsetDateTime,
}

/// The answer to a refresh.
#[derive(Debug, Serialize)]
pub struct Refreshed {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(with = "time::serde::rfc3339")]
    pub token_expires_at: OffsetDateTime,
}

/// A change to one of the user's entities: the client fetches what it needs.
#[derive(Debug, Serialize)]
pub struct ChangeFrame<'a> {
    pub seq: i64,
    /// `task.created`, `task.updated`, `task.deleted`.
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub id: Uuid,
    pub version: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// Why the server closes a socket: each has its own close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// 1012: the instance is restarting; reconnect (elsewhere) with `since`.
    Restart,
    /// 1009: a client frame was larger than allowed.
    FrameTooLarge,
    /// 1003: a binary or otherwise unsupported frame.
    Unsupported,
    /// 1002: the frame broke the WebSocket protocol, or was not valid JSON of this protocol.
    Protocol,
    /// 1011: the service could not read the feed; reconnect with `since`.
    Internal,
    /// 4001: no valid token in time, or the token expired without a refresh.
    Unauthorized,
    /// 4002: nothing heard from the client (not even a pong) within the idle timeout.
    Idle,
    /// 4003: the session ended (logout, reused refresh token, deleted account), or a refresh
    /// named another user.
    SessionEnded,
    /// 4008: the client did not read fast enough: its unsent frames passed the byte budget.
    SlowClient,
    /// 4011: the feed has a gap this socket cannot fill: reconnect with `since`.
    Resync,
    /// 4029: the user already has the most sockets allowed on this instance.
    TooManyConnections,
}

impl CloseReason {
    pub fn code(self) -> u16 {
        match self {
            CloseReason::Restart => 1012,
            CloseReason::FrameTooLarge => 1009,
            CloseReason::Unsupported => 1003,
            CloseReason::Protocol => 1002,
            CloseReason::Internal => 1011,
            CloseReason::Unauthorized => 4001,
            CloseReason::Idle => 4002,
            CloseReason::SessionEnded => 4003,
            CloseReason::SlowClient => 4008,
            CloseReason::Resync => 4011,
            CloseReason::TooManyConnections => 4029,
        }
    }

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            CloseReason::Restart => "restart",
            CloseReason::FrameTooLarge => "frame_too_large",
            CloseReason::Unsupported => "unsupported",
            CloseReason::Protocol => "protocol",
            CloseReason::Internal => "internal",
            CloseReason::Unauthorized => "unauthorized",
            CloseReason::Idle => "idle",
            CloseReason::SessionEnded => "session_ended",
            CloseReason::SlowClient => "slow_client",
            CloseReason::Resync => "resync",
            CloseReason::TooManyConnections => "too_many_connections",
        }
    }
}

/// JSON of a frame, or of what instances tell each other.
pub fn to_text<T: Serialize>(frame: &T) -> String {
    // Plain data with string keys: serializing cannot fail.
    serde_json::to_string(frame).unwrap_or_default()
}
