//! The local edge proxy: one port speaking HTTP/1.1 and h2c that routes public paths to the
//! services the way the cluster's Gateway/Ingress does, so clients and load tests use the same
//! URLs locally as in production.
//!
//! Request bodies are buffered (bounded); response bodies stream through. Upstream calls use
//! HTTP/1.1 keep-alive, like ingress controllers do.
//!
//! Like the ingress, the edge bounds what a client may hold without sending anything: a connection
//! that sends no bytes within [`http_listener::FIRST_BYTES_TIMEOUT`] is closed, and a request head
//! must be complete within [`http_listener::CLIENT_REQUEST_TIMEOUT`] (408 after), as the services
//! do themselves: they listen the same way.
//!
//! WebSockets (`GET` + `Upgrade: websocket` over HTTP/1.1) are proxied frame by frame, like the
//! Gateway's WebSocket HTTPRoute: the edge opens the service's socket first, so a refusal (401,
//! 403, 429, …) reaches the client as that HTTP answer, then completes the client's handshake with
//! the subprotocol the service chose and pumps frames both ways, close codes included. Pings and
//! pongs pass through as any other frame and the edge answers none itself, so the service's
//! heartbeat measures the client behind the edge: one that stops answering is closed as idle, as
//! it would be connected directly (or through the Gateway, which tunnels the connection). Each
//! direction sends a frame before it reads the next one, so a slow reader slows its writer instead
//! of filling the edge's memory. WebSockets over HTTP/2 (extended CONNECT, RFC 8441) are not
//! supported: an h2 request never carries `Upgrade` and takes the plain HTTP path.

use std::collections::HashMap;
use std::time::Duration;

use actix_http::ws::{OpCode, Parser};
use actix_http::HttpService;
use actix_service::{fn_service, map_config, IntoServiceFactory, ServiceFactoryExt};
use actix_web::dev::AppConfig;
use actix_web::http::{Method, StatusCode, Version};
use actix_web::web::{Bytes, BytesMut};
use actix_web::{web, App, FromRequest, HttpRequest, HttpResponse};
use actix_ws::{CloseCode, CloseReason, Item, MessageStream, ProtocolError, Session};
use anyhow::{Context, Result};
use futures_util::FutureExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::http::{self, HeaderMap, HeaderName, HeaderValue};

/// Path prefixes and the service that owns them (see charts/ for the cluster's version).
pub const ROUTES: [(&str, &str); 7] = [
    ("/v1/auth/", "auth"),
    ("/v1/users/", "users"),
    ("/v1/tasks", "tasks"),
    ("/v1/notifications", "notifications"),
    // The live-updates WebSocket (the Gateway's WebSocket HTTPRoute).
    ("/v1/live", "notifications"),
    ("/v1/analysis", "analysis"),
    ("/v1/telemetry", "analysis"),
];

/// Largest request body the edge accepts (telemetry batches are the biggest).
const MAX_REQUEST_BODY: usize = 8 << 20;

/// Largest frame a WebSocket client may send; the services' frames are small.
const MAX_CLIENT_FRAME: usize = 64 << 10;

/// Largest frame the edge takes from a service: bounded, but roomier than the client's limit
/// because the services are ours. (Frames pass one by one, so a message is never held whole.)
const MAX_UPSTREAM_FRAME: usize = 1 << 20;

/// Send buffer of an upgraded client socket. The kernel's autotuned buffer can hold megabytes, so
/// a client that stopped reading would look healthy for a long time; a small one makes the edge's
/// writes wait soon, which stops it reading from the service, whose own budget then cuts the
/// client off.
const CLIENT_SEND_BUFFER: usize = 64 << 10;

/// Receive buffer of the edge's socket to the service, for the same reason from the other side:
/// the kernel grows a socket's receive buffer (up to `tcp_rmem`'s maximum, 32 MiB here) while
/// the edge reads quickly, and once the client stops reading, that buffer alone can take
/// megabytes from the service without the service's send budget ever seeing them.
const UPSTREAM_RECEIVE_BUFFER: u32 = 64 << 10;

/// How long the service gets to accept or refuse a WebSocket.
const UPSTREAM_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest answer head the edge reads from a service's WebSocket handshake.
const MAX_UPSTREAM_HEAD: usize = 16 << 10;

/// Largest refusal body (the services' JSON errors) the edge passes on.
const MAX_UPSTREAM_REFUSAL: usize = 64 << 10;

/// How long a drain waits for requests in flight (and WebSockets) before the edge stops.
const SHUTDOWN_TIMEOUT_SECS: u64 = 25;

/// After one side sent a close frame, how long the other gets to answer with its own.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Request headers a WebSocket handshake passes on to the service (besides `X-Forwarded-*`).
/// Only these: the handshake's own headers are the edge's to write.
const WEBSOCKET_FORWARDED: [&str; 6] = [
    "sec-websocket-protocol",
    "origin",
    "authorization",
    "user-agent",
    "traceparent",
    "tracestate",
];

/// Headers that describe one hop, not the request: never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// Which service serves `path`, if any. `/v1/tasks` matches `/v1/tasks`, `/v1/tasks/…` and
/// `/v1/tasks?…` but not `/v1/tasksfoo`.
pub fn service_for(path: &str) -> Option<&'static str> {
    ROUTES.iter().find_map(|(prefix, service)| {
        let rest = path.strip_prefix(prefix)?;
        let boundary = prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/');
        // `/v1/users/*` is served by auth.
        boundary.then_some(if *service == "users" { "auth" } else { service })
    })
}

struct Edge {
    upstreams: HashMap<String, String>,
    client: reqwest::Client,
}

/// Serves on 127.0.0.1:`port` until SIGTERM/SIGINT. `upstreams` maps service → base URL.
///
/// The listener is `http_listener`'s, as the services': silent connections closed, unreadable
/// requests answered with JSON.
pub async fn run(port: u16, upstreams: HashMap<String, String>) -> Result<()> {
    let client = reqwest::Client::builder()
        .http1_only()
        .connect_timeout(Duration::from_secs(2))
        .read_timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(256)
        .build()?;
    let edge = web::Data::new(Edge { upstreams, client });
    let listener = http_listener::listen(([127, 0, 0, 1], port).into())
        .with_context(|| format!("binding the edge to 127.0.0.1:{port}"))?;
    let local_addr = listener.local_addr()?;
    let builder = actix_web::dev::Server::build().shutdown_timeout(SHUTDOWN_TIMEOUT_SECS);
    let shutting_down = builder.graceful_shutdown_signal();
    builder
        .listen("edge", listener, move || {
            let app = App::new()
                .app_data(edge.clone())
                .app_data(web::PayloadConfig::new(MAX_REQUEST_BODY))
                .route(
                    "/healthz",
                    web::get().to(|| async { HttpResponse::Ok().json(json!({"status": "ok"})) }),
                )
                .default_service(web::to(route));
            let http_service =
                http_listener::configure(HttpService::build(), local_addr, shutting_down.clone())
                    .finish(map_config(
                        app.into_factory()
                            .map_err(|err: actix_web::Error| err.error_response()),
                        |_| AppConfig::default(),
                    ));
            fn_service(http_listener::detect_protocol).and_then(http_service)
        })
        .with_context(|| format!("binding the edge to 127.0.0.1:{port}"))?
        .run()
        .await?;
    Ok(())
}

/// A request path as the Gateway normalises it before routing (RFC 3986): `.` and `..`
/// segments resolved (`%2E` counts as a dot), repeated slashes merged. `None` for a path that
/// climbs above the root or holds an escaped slash (`%2F`), which the Gateway refuses too.
pub fn normalize_path(path: &str) -> Option<String> {
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/').filter(|segment| !segment.is_empty()) {
        let lowered = segment.to_ascii_lowercase();
        if lowered.contains("%2f") || lowered.contains("%5c") {
            return None;
        }
        match lowered.replace("%2e", ".").as_str() {
            "." => {}
            ".." => {
                segments.pop()?;
            }
            _ => segments.push(segment),
        }
    }
    let trailing = path.len() > 1 && path.ends_with('/') && !segments.is_empty();
    Some(format!(
        "/{}{}",
        segments.join("/"),
        if trailing { "/" } else { "" }
    ))
}

/// WebSocket upgrades on a routed path go to [`websocket`]; everything else to [`forward`].
/// Routing sees the normalised path, and the service gets that path.
async fn route(request: HttpRequest, payload: web::Payload, edge: web::Data<Edge>) -> HttpResponse {
    let Some(path) = normalize_path(request.path()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_path",
            "the path climbs above the root or holds an escaped slash".into(),
        );
    };
    if is_websocket_upgrade(&request) {
        if let Some(base) = service_for(&path).and_then(|service| edge.upstreams.get(service)) {
            return websocket(&request, payload, base, &path).await;
        }
    }
    // The same extraction (and `PayloadConfig` limit) as a `web::Bytes` argument would do.
    match web::Bytes::from_request(&request, &mut payload.into_inner()).await {
        Ok(body) => forward(request, &path, body, edge).await,
        Err(err) => HttpResponse::from_error(err),
    }
}

/// An HTTP/1.1 `GET` asking to upgrade to a WebSocket. HTTP/2 has no `Upgrade` (its WebSockets
/// use extended CONNECT, which the edge does not support), so only HTTP/1.1 qualifies.
fn is_websocket_upgrade(request: &HttpRequest) -> bool {
    request.method() == Method::GET
        && request.version() == Version::HTTP_11
        && request
            .headers()
            .get_all("upgrade")
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("websocket"))
}

/// `path` with the request's query string, if it has one.
fn with_query(request: &HttpRequest, path: &str) -> String {
    match request.uri().query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    }
}

async fn forward(
    request: HttpRequest,
    path: &str,
    body: web::Bytes,
    edge: web::Data<Edge>,
) -> HttpResponse {
    let Some(base) = service_for(path).and_then(|service| edge.upstreams.get(service)) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route for {path}"),
        );
    };
    let target = format!("{base}{}", with_query(&request, path));
    let Ok(method) = reqwest::Method::from_bytes(request.method().as_str().as_bytes()) else {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "unsupported method".into(),
        );
    };
    let mut upstream = edge.client.request(method, &target);
    for (name, value) in request.headers() {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            upstream = upstream.header(name.as_str(), value.as_bytes());
        }
    }
    if let Some(peer) = request.peer_addr() {
        upstream = upstream.header("x-forwarded-for", peer.ip().to_string());
    }
    upstream = upstream
        .header(
            "x-forwarded-proto",
            request.connection_info().scheme().to_owned(),
        )
        .header(
            "x-forwarded-host",
            request.connection_info().host().to_owned(),
        );
    match upstream.body(body).send().await {
        Err(err) => error(
            StatusCode::BAD_GATEWAY,
            "bad_gateway",
            format!("upstream unavailable: {err}"),
        ),
        Ok(response) => {
            let status =
                StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut reply = HttpResponse::build(status);
            for (name, value) in response.headers() {
                if !HOP_BY_HOP.contains(&name.as_str()) && name != "content-length" {
                    reply.append_header((name.as_str(), value.as_bytes()));
                }
            }
            // These answers have no body by definition: streaming an empty one would still write
            // a chunked terminator, which a keep-alive client reads as the next response.
            let bodiless = status.is_informational()
                || status == StatusCode::NO_CONTENT
                || status == StatusCode::NOT_MODIFIED
                || request.method() == actix_web::http::Method::HEAD;
            if bodiless {
                reply.finish()
            } else {
                reply.streaming(response.bytes_stream())
            }
        }
    }
}

/// Proxies one WebSocket: service handshake first, then the client's, then the frame pump.
async fn websocket(
    request: &HttpRequest,
    payload: web::Payload,
    base: &str,
    path: &str,
) -> HttpResponse {
    // A malformed client handshake is answered here, before the service sees a connection.
    if let Err(err) = actix_http::ws::verify_handshake(request.head()) {
        return HttpResponse::from_error(err);
    }
    let upstream_request = match upstream_request(request, base, path) {
        Ok(upstream_request) => upstream_request,
        Err(message) => return error(StatusCode::BAD_GATEWAY, "bad_gateway", message),
    };
    let upstream =
        match tokio::time::timeout(UPSTREAM_HANDSHAKE_TIMEOUT, open_upstream(upstream_request))
            .await
        {
            Ok(Ok(Handshake::Accepted(upstream))) => upstream,
            // The service answered the handshake with an error: the client gets that answer.
            Ok(Ok(Handshake::Refused(refusal))) => return refusal,
            Ok(Err(message)) => return error(StatusCode::BAD_GATEWAY, "bad_gateway", message),
            Err(_) => {
                return error(
                    StatusCode::BAD_GATEWAY,
                    "bad_gateway",
                    "upstream did not answer the WebSocket handshake in time".into(),
                )
            }
        };
    // Exactly the service's choice, which [`open_upstream`] checked the client offered.
    let protocols: Vec<&str> = upstream.protocol.as_deref().into_iter().collect();
    let (reply, session, messages) =
        match actix_ws::handle_with_protocols(request, payload, &protocols) {
            Ok(accepted) => accepted,
            // Verified above, so not expected; dropping `upstream` ends the service's side.
            Err(err) => return HttpResponse::from_error(err),
        };
    // Best effort: without it a slow client is only noticed later.
    let _ = http_listener::set_send_buffer(request, CLIENT_SEND_BUFFER);
    actix_web::rt::spawn(pump(
        session,
        messages.max_frame_size(MAX_CLIENT_FRAME),
        upstream,
    ));
    reply
}

/// A TCP connection to the WebSocket service at `uri`, with its receive buffer fixed at
/// [`UPSTREAM_RECEIVE_BUFFER`] (set before connecting, so the window it advertises agrees).
async fn connect_upstream(uri: &http::Uri) -> std::io::Result<TcpStream> {
    let host = uri.host().unwrap_or("127.0.0.1");
    let port = uri.port_u16().unwrap_or(80);
    let mut last_error = std::io::Error::other(format!("{host}:{port} resolves to nothing"));
    for address in tokio::net::lookup_host((host, port)).await? {
        let socket = if address.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_recv_buffer_size(UPSTREAM_RECEIVE_BUFFER)?;
        // Nagle would hold back the small frames live updates are made of.
        socket.set_nodelay(true)?;
        match socket.connect(address).await {
            Ok(stream) => return Ok(stream),
            Err(err) => last_error = err,
        }
    }
    Err(last_error)
}

/// The service's handshake request: `ws://` + the client's path and query, with the client's
/// headers that matter to the service and the `X-Forwarded-*` the HTTP path sends too.
fn upstream_request(
    request: &HttpRequest,
    base: &str,
    path: &str,
) -> std::result::Result<http::Request<()>, String> {
    let authority = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("WebSocket upstream {base} is not http://"))?;
    let path = with_query(request, path);
    let mut upstream = format!("ws://{authority}{path}")
        .into_client_request()
        .map_err(|err| format!("upstream URL: {err}"))?;
    let headers = upstream.headers_mut();
    for name in WEBSOCKET_FORWARDED {
        let name = HeaderName::from_static(name);
        let values: Vec<&[u8]> = request
            .headers()
            .get_all(name.as_str())
            .map(|value| value.as_bytes())
            .collect();
        if name == "sec-websocket-protocol" && values.len() > 1 {
            // tungstenite checks the service's choice against the first header only: one list.
            if let Ok(value) = HeaderValue::from_bytes(&values.join(&b", "[..])) {
                headers.insert(name, value);
            }
            continue;
        }
        for value in values {
            if let Ok(value) = HeaderValue::from_bytes(value) {
                headers.append(name.clone(), value);
            }
        }
    }
    let info = request.connection_info();
    let forwarded = [
        (
            "x-forwarded-for",
            request.peer_addr().map(|peer| peer.ip().to_string()),
        ),
        ("x-forwarded-proto", Some(info.scheme().to_owned())),
        ("x-forwarded-host", Some(info.host().to_owned())),
    ];
    for (name, value) in forwarded {
        if let Some(Ok(value)) = value.map(HeaderValue::try_from) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    Ok(upstream)
}

/// The service's WebSocket once it accepted the handshake: the connection, the bytes read past
/// the answer's head (the first frames may come in the same packet), and the subprotocol it chose.
struct UpstreamSocket {
    stream: TcpStream,
    buffered: BytesMut,
    protocol: Option<String>,
}

/// How the service answered a WebSocket handshake.
enum Handshake {
    Accepted(UpstreamSocket),
    /// Its refusal, as the client's answer.
    Refused(HttpResponse),
}

/// The service's side of a WebSocket: the handshake written and read here, then frames read and
/// written as they are (see [`pump`]). Not a WebSocket client library: they answer pings
/// themselves, so the service would hear a pong from the edge whether the client answers or not.
async fn open_upstream(request: http::Request<()>) -> std::result::Result<Handshake, String> {
    let unavailable = |err: std::io::Error| format!("upstream unavailable: {err}");
    let mut stream = connect_upstream(request.uri()).await.map_err(unavailable)?;
    stream
        .write_all(&request_head(&request))
        .await
        .map_err(unavailable)?;
    let mut buffered = BytesMut::with_capacity(4 << 10);
    let head_length = loop {
        if let Some(end) = buffered.windows(4).position(|window| window == b"\r\n\r\n") {
            break end + 4;
        }
        if buffered.len() > MAX_UPSTREAM_HEAD {
            return Err("upstream's handshake answer has an oversized head".into());
        }
        if stream.read_buf(&mut buffered).await.map_err(unavailable)? == 0 {
            return Err("upstream closed the connection during the WebSocket handshake".into());
        }
    };
    let head = buffered.split_to(head_length);
    let (status, headers) = parse_head(&head)?;
    if status != StatusCode::SWITCHING_PROTOCOLS {
        let body = refusal_body(&mut stream, buffered, &headers)
            .await
            .map_err(unavailable)?;
        return Ok(Handshake::Refused(refused(status, &headers, body)));
    }
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let key = request
        .headers()
        .get("sec-websocket-key")
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    let upgraded = header("upgrade").is_some_and(|value| value.eq_ignore_ascii_case("websocket"));
    if !upgraded || header("sec-websocket-accept") != Some(derive_accept_key(key).as_str()) {
        return Err("upstream's WebSocket handshake answer is not valid".into());
    }
    let protocol = header("sec-websocket-protocol").map(str::to_owned);
    if let Some(chosen) = &protocol {
        let offered = request
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|offered| offered.trim() == chosen);
        if !offered {
            return Err(format!(
                "upstream chose the subprotocol {chosen:?}, never offered"
            ));
        }
    }
    Ok(Handshake::Accepted(UpstreamSocket {
        stream,
        buffered,
        protocol,
    }))
}

/// The body of a refusal, after its head: `Content-Length` bytes (as the services' JSON errors
/// have), or up to the end of the connection when the answer has neither a length nor chunks;
/// a chunked body is not passed on. At most [`MAX_UPSTREAM_REFUSAL`] bytes.
async fn refusal_body(
    stream: &mut TcpStream,
    mut buffered: BytesMut,
    headers: &HeaderMap,
) -> std::io::Result<Bytes> {
    let header = |name| headers.get(name).and_then(|value| value.to_str().ok());
    let length = match header(http::header::CONTENT_LENGTH) {
        Some(length) => length.trim().parse().unwrap_or(0),
        None if header(http::header::TRANSFER_ENCODING).is_some() => 0,
        None => MAX_UPSTREAM_REFUSAL,
    };
    let length = length.min(MAX_UPSTREAM_REFUSAL);
    while buffered.len() < length {
        if stream.read_buf(&mut buffered).await? == 0 {
            break;
        }
    }
    buffered.truncate(length);
    Ok(buffered.freeze())
}

/// `request` as HTTP/1.1 bytes: its request line and headers (header values cannot hold line
/// breaks, so they go as they are).
fn request_head(request: &http::Request<()>) -> Vec<u8> {
    let target = request
        .uri()
        .path_and_query()
        .map_or("/", |target| target.as_str());
    let mut head = format!("GET {target} HTTP/1.1\r\n").into_bytes();
    for (name, value) in request.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// The status and headers of an HTTP/1.1 answer's head (`head` ends with the empty line).
fn parse_head(head: &[u8]) -> std::result::Result<(StatusCode, HeaderMap), String> {
    let malformed = || "upstream's handshake answer is not HTTP/1.1".to_owned();
    let mut lines = head
        .split(|byte| *byte == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let status_line = lines.next().ok_or_else(malformed)?;
    let status = status_line
        .strip_prefix(b"HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| StatusCode::from_bytes(code).ok())
        .ok_or_else(malformed)?;
    let mut headers = HeaderMap::new();
    for line in lines.filter(|line| !line.is_empty()) {
        let colon = line
            .iter()
            .position(|byte| *byte == b':')
            .ok_or_else(malformed)?;
        let name = HeaderName::from_bytes(line[..colon].trim_ascii()).map_err(|_| malformed())?;
        let value =
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()).map_err(|_| malformed())?;
        headers.append(name, value);
    }
    Ok((status, headers))
}

/// The service's refusal of a handshake, as the client's answer: status, content type and body
/// (the services' JSON errors), and `Retry-After` for a 429 or 503.
fn refused(status: StatusCode, headers: &HeaderMap, body: Bytes) -> HttpResponse {
    let mut reply = HttpResponse::build(status);
    for name in ["content-type", "retry-after"] {
        for value in headers.get_all(name) {
            reply.append_header((name, value.as_bytes()));
        }
    }
    reply.body(body)
}

/// How one direction of the pump ended.
enum End {
    /// A close frame passed through; the other direction carries the answer.
    Closed,
    /// The client went away or broke the protocol; the code is what the client is told, if it
    /// still listens.
    Client(CloseCode),
    /// The service went away without a close frame.
    Upstream,
}

/// Frames as the service sends them.
struct UpstreamReader {
    stream: OwnedReadHalf,
    buffered: BytesMut,
}

impl UpstreamReader {
    /// The next frame (whether it ends its message, its opcode, its payload), or `None` once the
    /// service closed the connection.
    async fn next(&mut self) -> std::result::Result<Option<(bool, OpCode, Bytes)>, ProtocolError> {
        loop {
            // A service's frames are not masked; a masked one is a protocol error.
            let parsed = Parser::parse(&mut self.buffered, false, MAX_UPSTREAM_FRAME)?;
            if let Some((last, opcode, payload)) = parsed {
                return Ok(Some((last, opcode, payload.unwrap_or_default().freeze())));
            }
            self.buffered.reserve(8 << 10);
            if self.stream.read_buf(&mut self.buffered).await? == 0 {
                return Ok(None);
            }
        }
    }
}

/// Frames to the service, masked as a client's must be.
struct UpstreamWriter {
    stream: OwnedWriteHalf,
    buffer: BytesMut,
    /// Whether a close frame went out: nothing may follow it.
    closed: bool,
}

impl UpstreamWriter {
    async fn send(&mut self, payload: &[u8], opcode: OpCode, last: bool) -> std::io::Result<()> {
        self.buffer.clear();
        Parser::write_message(&mut self.buffer, payload, opcode, last, true);
        self.stream.write_all(&self.buffer).await
    }

    /// Sends a close frame, the first time only.
    async fn close(&mut self, reason: Option<CloseReason>) -> std::io::Result<()> {
        if std::mem::replace(&mut self.closed, true) {
            return Ok(());
        }
        self.buffer.clear();
        Parser::write_close(&mut self.buffer, reason, true);
        self.stream.write_all(&self.buffer).await
    }
}

/// Moves frames both ways until either side ends, then closes the other.
async fn pump(client: Session, mut from_client: MessageStream, upstream: UpstreamSocket) {
    let (read, write) = upstream.stream.into_split();
    let mut from_upstream = UpstreamReader {
        stream: read,
        buffered: upstream.buffered,
    };
    let mut to_upstream = UpstreamWriter {
        stream: write,
        buffer: BytesMut::new(),
        closed: false,
    };
    let end = {
        let up = client_to_upstream(&mut from_client, &mut to_upstream);
        let down = upstream_to_client(&mut from_upstream, client.clone());
        tokio::pin!(up, down);
        // Both directions run in this one task; each awaits its send before it reads again.
        let (end, client_side_ended) = tokio::select! {
            end = &mut up => (end, true),
            end = &mut down => (end, false),
        };
        if let End::Closed = end {
            // Let the other side answer the close through the still-running direction.
            let other = if client_side_ended {
                down.left_future()
            } else {
                up.right_future()
            };
            let _ = tokio::time::timeout(CLOSE_GRACE, other).await;
        }
        end
    };
    let (client_close, upstream_close) = match end {
        // A close passed; the other side's answer did too, or did not come in time.
        End::Closed => (None, Some(None)),
        End::Client(code) => (
            Some(code.into()),
            Some(Some(CloseReason {
                code: CloseCode::Away,
                description: Some("client went away".into()),
            })),
        ),
        End::Upstream => (
            Some(CloseReason {
                // 1014: a gateway got a bad answer from its upstream; clients reconnect.
                code: CloseCode::Other(1014),
                description: Some("upstream went away".into()),
            }),
            None,
        ),
    };
    // Where a close already went that way, these send nothing.
    if let Some(reason) = upstream_close {
        let _ = to_upstream.close(reason).await;
    }
    let _ = to_upstream.stream.shutdown().await;
    let _ = client.close(client_close).await;
}

async fn client_to_upstream(client: &mut MessageStream, upstream: &mut UpstreamWriter) -> End {
    while let Some(frame) = client.recv().await {
        let sent = match frame {
            Ok(actix_ws::Message::Text(text)) => {
                upstream.send(text.as_bytes(), OpCode::Text, true).await
            }
            Ok(actix_ws::Message::Binary(data)) => upstream.send(&data, OpCode::Binary, true).await,
            Ok(actix_ws::Message::Ping(data)) => upstream.send(&data, OpCode::Ping, true).await,
            Ok(actix_ws::Message::Pong(data)) => upstream.send(&data, OpCode::Pong, true).await,
            // Fragments pass as they came: reassembling them would buffer whole messages.
            Ok(actix_ws::Message::Continuation(item)) => {
                let (opcode, last, data) = match item {
                    Item::FirstText(data) => (OpCode::Text, false, data),
                    Item::FirstBinary(data) => (OpCode::Binary, false, data),
                    Item::Continue(data) => (OpCode::Continue, false, data),
                    Item::Last(data) => (OpCode::Continue, true, data),
                };
                upstream.send(&data, opcode, last).await
            }
            Ok(actix_ws::Message::Close(reason)) => {
                let _ = upstream.close(reason).await;
                return End::Closed;
            }
            Ok(actix_ws::Message::Nop) => continue,
            Err(ProtocolError::Overflow) => return End::Client(CloseCode::Size),
            Err(ProtocolError::Io(_)) => return End::Client(CloseCode::Away),
            Err(_) => return End::Client(CloseCode::Protocol),
        };
        if sent.is_err() {
            return End::Upstream;
        }
    }
    End::Client(CloseCode::Away)
}

async fn upstream_to_client(upstream: &mut UpstreamReader, mut client: Session) -> End {
    loop {
        let (last, opcode, data) = match upstream.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(_) => return End::Upstream,
        };
        let sent = match (opcode, last) {
            (OpCode::Text, true) => match String::from_utf8(data.to_vec()) {
                Ok(text) => client.text(text).await,
                Err(_) => return End::Upstream,
            },
            (OpCode::Binary, true) => client.binary(data).await,
            (OpCode::Text, false) => client.continuation(Item::FirstText(data)).await,
            (OpCode::Binary, false) => client.continuation(Item::FirstBinary(data)).await,
            (OpCode::Continue, false) => client.continuation(Item::Continue(data)).await,
            (OpCode::Continue, true) => client.continuation(Item::Last(data)).await,
            (OpCode::Ping, _) => client.ping(&data).await,
            (OpCode::Pong, _) => client.pong(&data).await,
            (OpCode::Close, _) => {
                let Ok(reason) = Parser::try_parse_close_payload(&data) else {
                    return End::Upstream;
                };
                let _ = client.close(reason).await;
                return End::Closed;
            }
            (OpCode::Bad, _) => return End::Upstream,
        };
        if sent.is_err() {
            return End::Client(CloseCode::Away);
        }
    }
}

fn error(status: StatusCode, code: &str, message: String) -> HttpResponse {
    HttpResponse::build(status).json(json!({ "error": { "code": code, "message": message } }))
}

#[cfg(test)]
mod tests {
    use super::service_for;

    #[test]
    fn routes_match_the_ingress_table() {
        assert_eq!(service_for("/v1/auth/login"), Some("auth"));
        assert_eq!(service_for("/v1/users/me"), Some("auth"));
        assert_eq!(service_for("/v1/tasks"), Some("tasks"));
        assert_eq!(service_for("/v1/tasks/42/revisions"), Some("tasks"));
        assert_eq!(service_for("/v1/notifications/ws"), Some("notifications"));
        assert_eq!(service_for("/v1/live"), Some("notifications"));
        assert_eq!(service_for("/v1/analysis/tasks/1"), Some("analysis"));
        assert_eq!(service_for("/v1/telemetry"), Some("analysis"));
    }

    #[test]
    fn paths_are_normalised_as_the_gateway_does() {
        use super::normalize_path;
        for (raw, normal) in [
            ("/v1/tasks", "/v1/tasks"),
            ("/v1//tasks/", "/v1/tasks/"),
            ("/v1/auth/../../metrics", "/metrics"),
            ("/v1/auth/%2E%2e/%2e%2E/metrics", "/metrics"),
            ("/v1/tasks/./42", "/v1/tasks/42"),
            ("/", "/"),
        ] {
            assert_eq!(normalize_path(raw).as_deref(), Some(normal), "{raw}");
        }
        for refused in ["/..", "/v1/../../x", "/v1/tasks/a%2Fb", "/v1/tasks/a%5cb"] {
            assert_eq!(normalize_path(refused), None, "{refused}");
        }
    }

    #[test]
    fn unknown_and_lookalike_paths_are_not_routed() {
        assert_eq!(service_for("/v1/tasksfoo"), None);
        assert_eq!(service_for("/v1/livefoo"), None);
        assert_eq!(service_for("/v1/auth"), None);
        assert_eq!(service_for("/metrics"), None);
        assert_eq!(service_for("/"), None);
    }
}

/// The WebSocket path end to end: a real edge in front of a tiny echo service, all on 127.0.0.1.
#[cfg(test)]
mod websocket_tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use futures_util::{SinkExt, StreamExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;
    use tokio::time::timeout;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
    use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::{Error as WsError, Message};

    const LIMIT: Duration = Duration::from_secs(5);
    /// What the echo service pings with.
    const PING: &[u8] = b"are you there?";

    /// What the echo service saw.
    #[derive(Debug)]
    enum Seen {
        Handshake {
            path: String,
            origin: Option<String>,
            protocol: Option<String>,
        },
        Close(Option<u16>),
        Pong(Vec<u8>),
    }

    /// Selects `taskstream.v1` when offered, refuses with 401 + JSON when no subprotocol is
    /// offered, echoes text and binary, answers the text `close-4008` by closing with 4008 and
    /// the text `ping-me` with a ping, and reports the pongs it gets.
    async fn echo_service(seen: mpsc::UnboundedSender<Seen>) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let handshake_seen = seen.clone();
                    // The callback's signature, large error included, is tungstenite's.
                    #[allow(clippy::result_large_err)]
                    let callback = move |request: &Request, mut response: Response| {
                        let header = |name: &str| {
                            request
                                .headers()
                                .get(name)
                                .map(|value| value.to_str().unwrap().to_owned())
                        };
                        let protocol = header("sec-websocket-protocol");
                        let _ = handshake_seen.send(Seen::Handshake {
                            path: request.uri().to_string(),
                            origin: header("origin"),
                            protocol: protocol.clone(),
                        });
                        let offered = protocol
                            .unwrap_or_default()
                            .split(',')
                            .any(|p| p.trim() == "taskstream.v1");
                        if !offered {
                            let refusal: ErrorResponse = Response::builder()
                                .status(StatusCode::UNAUTHORIZED)
                                .header("content-type", "application/json")
                                .body(Some(
                                    r#"{"error":{"code":"unauthorized","message":"no token"}}"#
                                        .to_owned(),
                                ))
                                .unwrap();
                            return Err(refusal);
                        }
                        response.headers_mut().insert(
                            "sec-websocket-protocol",
                            HeaderValue::from_static("taskstream.v1"),
                        );
                        Ok(response)
                    };
                    let Ok(mut socket) =
                        tokio_tungstenite::accept_hdr_async(stream, callback).await
                    else {
                        return;
                    };
                    while let Some(Ok(message)) = socket.next().await {
                        match message {
                            Message::Text(text) if text.as_str() == "close-4008" => {
                                let close = CloseFrame {
                                    code: CloseCode::from(4008),
                                    reason: "token expired".into(),
                                };
                                let _ = socket.send(Message::Close(Some(close))).await;
                            }
                            Message::Text(text) if text.as_str() == "ping-me" => {
                                let _ = socket.send(Message::Ping(PING.to_vec().into())).await;
                            }
                            Message::Pong(data) => {
                                let _ = seen.send(Seen::Pong(data.to_vec()));
                            }
                            Message::Text(_) | Message::Binary(_) => {
                                // A failed send shows up as the next read's end.
                                let _ = socket.send(message).await;
                            }
                            Message::Close(frame) => {
                                let _ = seen.send(Seen::Close(frame.map(|f| f.code.into())));
                            }
                            _ => {}
                        }
                    }
                });
            }
        });
        port
    }

    async fn start_edge(upstream_port: u16) -> u16 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let upstreams = HashMap::from([(
            "notifications".to_owned(),
            format!("http://127.0.0.1:{upstream_port}"),
        )]);
        // `run` is not `Send` (actix builds its app per worker): it gets its own thread, as
        // `cargo xtask edge` gives it its own runtime.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let _ = runtime.block_on(super::run(port, upstreams));
        });
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        port
    }

    fn live_request(edge: u16, protocol: Option<&'static str>) -> Request {
        let mut request = format!("ws://127.0.0.1:{edge}/v1/live?since=7")
            .into_client_request()
            .unwrap();
        let headers = request.headers_mut();
        headers.insert("origin", HeaderValue::from_static("http://app.example"));
        if let Some(protocol) = protocol {
            headers.insert("sec-websocket-protocol", HeaderValue::from_static(protocol));
        }
        request
    }

    async fn next_text_or_close(
        socket: &mut tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    ) -> Message {
        loop {
            match timeout(LIMIT, socket.next()).await.unwrap() {
                Some(Ok(message @ (Message::Text(_) | Message::Close(_)))) => return message,
                Some(Ok(_)) => continue,
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn websockets_pass_through_the_edge_frame_by_frame() {
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let upstream = echo_service(seen_tx).await;
        let edge = timeout(LIMIT, start_edge(upstream)).await.unwrap();

        // (1) The service's subprotocol choice, text echo, and the headers it was given.
        let request = live_request(edge, Some("taskstream.v1, sometoken"));
        let (mut socket, response) = timeout(LIMIT, tokio_tungstenite::connect_async(request))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(
            response.headers().get("sec-websocket-protocol").unwrap(),
            "taskstream.v1"
        );
        match timeout(LIMIT, seen.recv()).await.unwrap().unwrap() {
            Seen::Handshake {
                path,
                origin,
                protocol,
            } => {
                assert_eq!(path, "/v1/live?since=7");
                assert_eq!(origin.as_deref(), Some("http://app.example"));
                assert_eq!(protocol.as_deref(), Some("taskstream.v1, sometoken"));
            }
            other => panic!("expected the handshake, got {other:?}"),
        }
        socket.send(Message::text("hello")).await.unwrap();
        assert_eq!(
            next_text_or_close(&mut socket).await,
            Message::text("hello")
        );

        // A close from the client reaches the service with its code.
        let bye = CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        };
        socket.send(Message::Close(Some(bye))).await.unwrap();
        match timeout(LIMIT, seen.recv()).await.unwrap().unwrap() {
            Seen::Close(code) => assert_eq!(code, Some(1000)),
            other => panic!("expected the client's close, got {other:?}"),
        }

        // (2) A close from the service reaches the client with its code.
        let request = live_request(edge, Some("taskstream.v1"));
        let (mut socket, _) = timeout(LIMIT, tokio_tungstenite::connect_async(request))
            .await
            .unwrap()
            .unwrap();
        let _ = timeout(LIMIT, seen.recv()).await.unwrap();
        socket.send(Message::text("close-4008")).await.unwrap();
        match next_text_or_close(&mut socket).await {
            Message::Close(Some(frame)) => {
                assert_eq!(u16::from(frame.code), 4008);
                assert_eq!(frame.reason.as_str(), "token expired");
            }
            other => panic!("expected close 4008, got {other:?}"),
        }

        // (3) A refused handshake reaches the client as that HTTP answer, never a 101.
        let request = live_request(edge, None);
        match timeout(LIMIT, tokio_tungstenite::connect_async(request))
            .await
            .unwrap()
        {
            Err(WsError::Http(refusal)) => {
                assert_eq!(refusal.status(), StatusCode::UNAUTHORIZED);
                assert_eq!(
                    refusal.headers().get("content-type").unwrap(),
                    "application/json"
                );
                let body: serde_json::Value =
                    serde_json::from_slice(refusal.body().as_deref().unwrap()).unwrap();
                assert_eq!(body["error"]["code"], "unauthorized");
            }
            other => panic!("expected an HTTP 401, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn pings_and_pongs_pass_through_the_edge_end_to_end() {
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let upstream = echo_service(seen_tx).await;
        let edge = timeout(LIMIT, start_edge(upstream)).await.unwrap();
        let request = live_request(edge, Some("taskstream.v1"));
        let (mut socket, _) = timeout(LIMIT, tokio_tungstenite::connect_async(request))
            .await
            .unwrap()
            .unwrap();
        let _handshake = timeout(LIMIT, seen.recv()).await.unwrap();

        // The service pings; the client reads nothing, so nothing may answer.
        socket.send(Message::text("ping-me")).await.unwrap();
        if let Ok(answer) = timeout(Duration::from_secs(1), seen.recv()).await {
            panic!("the service got {answer:?} while its client read nothing: the edge answered");
        }
        // The client reads the ping; its pong (tungstenite's, sent on the next flush) is the
        // one the service gets.
        match timeout(LIMIT, socket.next()).await.unwrap() {
            Some(Ok(Message::Ping(data))) => assert_eq!(&data[..], PING),
            other => panic!("expected the service's ping, got {other:?}"),
        }
        socket.flush().await.unwrap();
        match timeout(LIMIT, seen.recv()).await.unwrap().unwrap() {
            Seen::Pong(data) => assert_eq!(data, PING),
            other => panic!("expected the client's pong, got {other:?}"),
        }

        // The client's ping reaches the service, and the service's pong the client.
        socket
            .send(Message::Ping(b"and you?".to_vec().into()))
            .await
            .unwrap();
        match timeout(LIMIT, socket.next()).await.unwrap() {
            Some(Ok(Message::Pong(data))) => assert_eq!(&data[..], b"and you?"),
            other => panic!("expected the service's pong, got {other:?}"),
        }
    }
}
