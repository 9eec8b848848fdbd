//! The wire: the live protocol's JSON frames and close codes (README "Live updates", the OpenAPI
//! description of `GET /v1/live`), and the JSON bodies of the inbox, preferences and devices.

use serde::{Deserialize, Serialize};
use service_kit::input::Text;
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
    /// `task.created`, `task.updated`, `task.deleted`, `notification.created`.
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
    /// 1013: this instance holds the most sockets still waiting for their `auth` frame; connect
    /// again shortly (a token in the handshake does not wait).
    TryAgainLater,
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
    /// 4030: the client sent more frames (or `refresh` frames) than a socket may.
    TooManyFrames,
}

impl CloseReason {
    pub fn code(self) -> u16 {
        match self {
            CloseReason::Restart => 1012,
            CloseReason::FrameTooLarge => 1009,
            CloseReason::Unsupported => 1003,
            CloseReason::Protocol => 1002,
            CloseReason::Internal => 1011,
            CloseReason::TryAgainLater => 1013,
            CloseReason::Unauthorized => 4001,
            CloseReason::Idle => 4002,
            CloseReason::SessionEnded => 4003,
            CloseReason::SlowClient => 4008,
            CloseReason::Resync => 4011,
            CloseReason::TooManyConnections => 4029,
            CloseReason::TooManyFrames => 4030,
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
            CloseReason::TryAgainLater => "try_again_later",
            CloseReason::Unauthorized => "unauthorized",
            CloseReason::Idle => "idle",
            CloseReason::SessionEnded => "session_ended",
            CloseReason::SlowClient => "slow_client",
            CloseReason::Resync => "resync",
            CloseReason::TooManyConnections => "too_many_connections",
            CloseReason::TooManyFrames => "too_many_frames",
        }
    }
}

/// JSON of a frame, or of what instances tell each other.
pub fn to_text<T: Serialize>(frame: &T) -> String {
    // Plain data with string keys: serializing cannot fail.
    serde_json::to_string(frame).unwrap_or_default()
}

// ---- The inbox, preferences and devices (HTTP JSON) ----

/// One notification in the inbox.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NotificationView {
    pub id: Uuid,
    /// `task.due_soon` or `task.overdue`.
    pub kind: String,
    pub task_id: Option<Uuid>,
    /// What a device shows, e.g. `Overdue: Pay rent`.
    pub title: String,
    pub body: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    pub read: bool,
}

/// A page of the inbox, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NotificationPage {
    pub items: Vec<NotificationView>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
    pub unread_count: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UnreadCount {
    pub unread_count: i64,
}

/// The inbox's first page size, and the most a page holds.
pub const PAGE_DEFAULT: i64 = 20;
pub const PAGE_MAX: i64 = 100;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct InboxParams {
    #[param(schema_with = cursor_schema)]
    pub cursor: Option<String>,
    /// 1–100, default 20.
    #[serde(default, deserialize_with = "service_kit::input::query_whole")]
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
    /// Only unread notifications.
    pub unread: Option<bool>,
}

fn cursor_schema() -> utoipa::openapi::Object {
    service_kit::input::uuid_schema("`next_cursor` of the previous page.")
}

/// How a kind of notification reaches the user.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryName {
    /// The inbox and every registered device.
    Push,
    /// The inbox only.
    Inbox,
    Off,
}

/// A daily window of local time during which pushes wait (the inbox does not).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuietHoursBody {
    /// `HH:MM`, local time, e.g. `22:00`.
    #[schema(value_type = String, example = "22:00", pattern = "^([01][0-9]|2[0-3]):[0-5][0-9]$")]
    pub start: Text,
    /// `HH:MM`, local time, not `start`; earlier than `start` means the next morning, e.g.
    /// `07:00`.
    #[schema(value_type = String, example = "07:00", pattern = "^([01][0-9]|2[0-3]):[0-5][0-9]$")]
    pub end: Text,
    /// An IANA time zone, e.g. `Europe/Berlin`.
    #[schema(value_type = String, example = "Europe/Berlin")]
    pub time_zone: Text,
}

/// A user's notification preferences (`PUT` replaces them whole).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PreferencesBody {
    pub due_soon: DeliveryName,
    pub overdue: DeliveryName,
    /// How long before a due date "due soon" fires: 1–10080 minutes (default 60).
    #[serde(deserialize_with = "service_kit::input::whole")]
    #[schema(minimum = 1, maximum = 10080)]
    pub reminder_lead_minutes: u32,
    #[serde(default, deserialize_with = "service_kit::input::optional_object")]
    pub quiet_hours: Option<QuietHoursBody>,
}

/// A Web Push subscription exactly as the browser's `PushSubscription.toJSON()` gives it.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct DeviceBody {
    /// The push service's URL for this device: https, a browser's push service (FCM, Mozilla,
    /// Apple, Windows), the default port; nothing inside the network.
    #[schema(value_type = String, max_length = 2048)]
    pub endpoint: Text,
    #[serde(deserialize_with = "service_kit::input::object")]
    pub keys: DeviceKeys,
    /// Browsers send it (usually `null`); not used.
    #[serde(default, rename = "expirationTime")]
    #[schema(value_type = Option<i64>)]
    pub expiration_time: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceKeys {
    /// The device's P-256 public key, uncompressed, base64url (87 characters; padding and the
    /// standard alphabet are taken too). It must be a point on the curve.
    #[schema(value_type = String, pattern = "^[A-Za-z0-9+/_-]{87}=*$")]
    pub p256dh: Text,
    /// The device's 16-byte authentication secret, base64url (22 characters).
    #[schema(value_type = String, pattern = "^[A-Za-z0-9+/_-]{22}=*$")]
    pub auth: Text,
}

/// A registered device.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeviceView {
    pub id: Uuid,
    pub endpoint: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeviceList {
    pub items: Vec<DeviceView>,
}

/// The application server key to subscribe with.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PushKey {
    /// Pass as `applicationServerKey` to `pushManager.subscribe` (uncompressed P-256 point,
    /// base64url).
    pub public_key: String,
}
