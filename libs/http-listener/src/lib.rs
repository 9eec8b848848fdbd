//! The one port speaking HTTP/1.1 and h2c that every service (through `service_kit::http`) and
//! the local edge (`xtask edge`) listen on, built the way actix-web's `HttpServer::bind_auto_h2c`
//! builds it, with what that lacks:
//!
//! - a connection that sends nothing within [`FIRST_BYTES_TIMEOUT`] is closed ([`detect_protocol`]
//!   must see the first bytes to tell HTTP/1.1 from h2c; without a bound, silent sockets held
//!   file descriptors forever), and a request head must be complete within
//!   [`CLIENT_REQUEST_TIMEOUT`] (408 after);
//! - requests the HTTP layer refuses before any handler runs get a JSON answer and a lingering
//!   close ([`UnreadableRequests`]);
//! - each request can reach its connection's socket ([`set_send_buffer`]), which actix-web
//!   exposes only at accept time.

mod unreadable;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use actix_http::body::BoxBody;
use actix_http::error::DispatchError;
use actix_http::{HttpServiceBuilder, KeepAlive, Protocol, Request, Response};
use actix_server::GracefulShutdownSignal;
use actix_service::{Service, ServiceFactory};
use actix_web::dev::Extensions;
use actix_web::HttpRequest;
use tokio::net::TcpStream;

pub use unreadable::{UnreadableRequests, LINGER_BYTES, LINGER_TIME};

/// How long a new connection may stay silent before it is closed.
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to send a request head once it started (408 after), as actix's default.
pub const CLIENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing connection gets to shut down cleanly, as actix's default.
const CLIENT_DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pending connections the kernel holds for the listener, as actix's default.
const LISTEN_BACKLOG: i32 = 1024;
/// HTTP/2 with prior knowledge starts with this (a subset of RFC 9113's preface, as actix
/// checks it); anything else is taken for HTTP/1.1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2";

/// An accepted connection, as the HTTP service sees it.
pub type Connection = UnreadableRequests<TcpStream>;

/// A listening socket like actix-web's: address reuse (a restart need not wait for old
/// connections' TIME_WAIT) and its backlog.
pub fn listen(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Which protocol a new connection speaks, from its first bytes; a connection that sends none
/// within [`FIRST_BYTES_TIMEOUT`] is refused with [`DispatchError::SlowRequestTimeout`] (and
/// closed). The first step of the service chain: `fn_service(detect_protocol).and_then(…)`.
pub async fn detect_protocol(
    io: TcpStream,
) -> Result<(Connection, Protocol, Option<SocketAddr>), DispatchError> {
    let mut first = [0; 12];
    match tokio::time::timeout(FIRST_BYTES_TIMEOUT, io.peek(&mut first)).await {
        Err(_) => return Err(DispatchError::SlowRequestTimeout),
        Ok(peeked) => {
            peeked?;
        }
    }
    let protocol = if first == H2_PREFACE {
        Protocol::Http2
    } else {
        Protocol::Http1
    };
    let peer = io.peer_addr().ok();
    let io = UnreadableRequests::new(io, protocol == Protocol::Http1);
    Ok((io, protocol, peer))
}

/// `builder` (from `HttpService::build()`) with the settings every listener here shares: idle
/// keep-alive connections close at once when `shutting_down` fires, the request-head and
/// disconnect timeouts, no Nagle delay, and each connection's socket kept for
/// [`set_send_buffer`].
pub fn configure<S>(
    builder: HttpServiceBuilder<Connection, S>,
    local_addr: SocketAddr,
    shutting_down: GracefulShutdownSignal,
) -> HttpServiceBuilder<Connection, S>
where
    S: ServiceFactory<Request, Config = ()>,
    S::Error: Into<Response<BoxBody>> + 'static,
    S::InitError: std::fmt::Debug,
    <S::Service as Service<Request>>::Future: 'static,
{
    builder
        .graceful_shutdown_signal(move || {
            let signal = shutting_down.clone();
            async move { signal.notified().await }
        })
        .keep_alive(KeepAlive::default())
        .client_request_timeout(CLIENT_REQUEST_TIMEOUT)
        .client_disconnect_timeout(CLIENT_DISCONNECT_TIMEOUT)
        // Answers are written as head and body: without this, Nagle's algorithm holds the body
        // back until the client's delayed ACK (~40 ms) on keep-alive connections.
        .tcp_nodelay(true)
        .local_addr(local_addr)
        .on_connect_ext(remember_socket)
}

/// The accepted socket of a request's connection (see [`set_send_buffer`]).
#[derive(Debug, Clone, Copy)]
struct ConnectionSocket(RawFd);

fn remember_socket(connection: &Connection, extensions: &mut Extensions) {
    extensions.insert(ConnectionSocket(connection.as_raw_fd()));
}

/// Caps the kernel's send buffer of `request`'s connection at `bytes`. For long-lived streams
/// (WebSockets) whose sender counts what a slow reader has not taken: a large, auto-tuned kernel
/// buffer would hide megabytes of backlog from that count.
pub fn set_send_buffer(request: &HttpRequest, bytes: usize) -> std::io::Result<()> {
    let Some(ConnectionSocket(fd)) = request.conn_data::<ConnectionSocket>().copied() else {
        return Ok(());
    };
    // SAFETY: `fd` is the socket of the connection `request` arrived on, which actix keeps open
    // while the request is handled; the borrow ends before this function returns.
    let socket = unsafe { BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&socket).set_send_buffer_size(bytes)
}
