//! The HTTP side of `GET /v1/live`: everything that can be refused before the upgrade is
//! refused here, with a JSON error (a browser shows a failed handshake, never its body, but
//! apps and proxies log it); then the socket runs on its own task (domain::connection).

pub mod devices;
pub mod inbox;

use std::sync::Arc;

use serde::Deserialize;
use service_kit::access_token::TokenError;
use service_kit::actix_web::http::{header, StatusCode};
use service_kit::actix_web::{web, HttpRequest, HttpResponse};
use service_kit::error::{ApiError, ErrorBody};
use service_kit::http::set_send_buffer;
use service_kit::input::Query;

use crate::api::{BEARER_PREFIX, PROTOCOL};
use crate::domain::connection::{self, Live, Refusal};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct LiveQuery {
    /// The last `seq` this device received: what it missed since follows `ready`, or `ready`
    /// says `recovered: false`.
    #[param(minimum = 0)]
    pub since: Option<i64>,
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Token(err) => err.into(),
            Refusal::SessionEnded => ApiError::unauthorized("session_ended", refusal.to_string()),
            Refusal::TooManyHandshakes(wait) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_handshakes",
                refusal.to_string(),
            )
            .retry_after(wait.as_secs().max(1)),
            Refusal::Unavailable(err) => {
                tracing::warn!(error = %err, "cannot check whether a session ended");
                ApiError::unavailable("sessions cannot be checked right now; try again")
            }
        }
    }
}

/// Opens a live socket.
#[utoipa::path(
    get,
    path = "/v1/live",
    tag = "live",
    params(LiveQuery),
    description = "Upgrades to a WebSocket (HTTP/1.1 `Upgrade: websocket`) that carries a frame \
        for every change to the user's tasks. Offer the subprotocol `taskstream.v1` in \
        `Sec-WebSocket-Protocol`, and beside it `bearer.<access token>` to authenticate in the \
        handshake; without that, the first frame must be `{\"type\":\"auth\",\"token\":\"…\"}` \
        within 5 s (an instance holds at most `LIVE_MAX_UNAUTHENTICATED_SOCKETS` such sockets \
        at a time and closes one more at once with 1013). A user may open 20 sockets on one \
        instance at once and then one a second; beyond that the handshake is 429 with \
        `Retry-After` (an in-band `auth`: close 4029). Tokens never go in the URL. The \
        server first sends `{\"type\":\"ready\",\"seq\",\"recovered\",\
        \"token_expires_at\"}`, then frames `{\"seq\",\"type\",\"id\",\"version\",\"at\"}` \
        (`type` is `task.created`, `task.updated`, `task.deleted`, or \
        `notification.created` with the notification's `id`; `seq` counts per user without \
        gaps). Before `token_expires_at` send `{\"type\":\"refresh\",\"token\":\"…\"}`; \
        the answer is `{\"type\":\"refreshed\",\"token_expires_at\"}`. A socket may send \
        5 `refresh` frames at once and then one a minute, and 30 frames of any kind at once and \
        then 10 a second (pongs answering the server's pings are free); beyond that it is \
        closed with 4030. Close codes: \
        1012 restart (reconnect with `since`), 1013 try again later (too many sockets waiting \
        for `auth` on this instance), 1009 frame too large, 1003 unsupported frame, \
        1002 protocol error, 1011 internal, 4001 unauthorized or token expired, 4002 idle, \
        4003 session ended, 4008 slow client, 4011 resync, 4029 too many sockets, \
        4030 too many frames.",
    responses(
        (status = 101, description = "Switched to the WebSocket protocol"),
        (status = 400, description = "Not a valid WebSocket handshake, or `taskstream.v1` not offered", body = ErrorBody),
        (status = 401, description = "The handshake's token is invalid, expired or of an ended session", body = ErrorBody),
        (status = 403, description = "The page's `Origin` is not allowed", body = ErrorBody),
        (status = 426, description = "Not an upgrade request", body = ErrorBody),
        (status = 429, description = "The user holds the most sockets allowed on this instance, or opened them faster than allowed (`Retry-After`)", body = ErrorBody),
        (status = 503, description = "The instance is restarting; connect again", body = ErrorBody),
    )
)]
pub async fn live(
    request: HttpRequest,
    body: web::Payload,
    query: Query<LiveQuery>,
    live: web::Data<Live>,
) -> Result<HttpResponse, ApiError> {
    let live = live.into_inner();
    if live.hub.is_draining() {
        return Err(
            ApiError::unavailable("this instance is restarting; connect again").retry_after(1),
        );
    }
    if let Some(since) = query.since.filter(|since| *since < 0) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("since must be 0 or more, not {since}"),
        ));
    }
    if let Some(origin) = request.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        if !live.settings.allows_origin(origin) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                format!("pages from {origin:?} may not open live sockets"),
            ));
        }
    }
    let upgrade = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.eq_ignore_ascii_case("websocket"));
    if !upgrade {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "GET /v1/live is a WebSocket: send Upgrade: websocket over HTTP/1.1",
        )
        .with_header(header::UPGRADE, "websocket"));
    }
    let offered = offered_protocols(&request);
    if !offered.is_empty() && !offered.contains(&PROTOCOL) {
        return Err(ApiError::bad_request(
            "protocol_required",
            format!("offer the subprotocol {PROTOCOL} in Sec-WebSocket-Protocol"),
        ));
    }
    let claims = match offered.iter().find_map(|p| p.strip_prefix(BEARER_PREFIX)) {
        None => None,
        Some("") => return Err(TokenError::Malformed.into()),
        Some(token) => {
            let claims = connection::admit(&live, token).await?;
            if live.hub.count(claims.sub) >= live.settings.max_connections_per_user {
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_connections",
                    format!(
                        "at most {} live sockets per user on one instance",
                        live.settings.max_connections_per_user
                    ),
                ));
            }
            Some(claims)
        }
    };
    let (response, session, stream) = actix_ws::handle_with_protocols(&request, body, &[PROTOCOL])
        .map_err(|err| ApiError::bad_request("bad_handshake", err.to_string()))?;
    if let Err(err) = set_send_buffer(&request, live.settings.socket_send_buffer_bytes) {
        tracing::warn!(error = %err, "cannot bound the socket's send buffer");
    }
    service_kit::actix_web::rt::spawn(connection::run(
        Arc::clone(&live),
        session,
        stream,
        claims,
        query.since,
    ));
    Ok(response)
}

/// The subprotocols the client offered, in its order.
fn offered_protocols(request: &HttpRequest) -> Vec<&str> {
    request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|protocol| !protocol.is_empty())
        .collect()
}
