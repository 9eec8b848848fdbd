//! The edge proxy over real sockets: HTTP/1.1 and h2c in, routed by path to an upstream, with
//! method, path, query, headers and body intact; JSON errors for unknown paths and dead upstreams.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use reqwest::Version;
use serde_json::{json, Value};
use test_support::{free_port, h2c_client, http1_client};

/// Echoes what it received, as the tasks service would see it behind the edge.
async fn echo(request: HttpRequest, body: web::Bytes) -> HttpResponse {
    if request.method() == actix_web::http::Method::DELETE {
        return HttpResponse::NoContent().finish();
    }
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    HttpResponse::Created()
        .insert_header(("x-upstream", "tasks"))
        .json(json!({
            "method": request.method().as_str(),
            "path": request.path(),
            "query": request.query_string(),
            "authorization": header("authorization"),
            "forwarded_for": header("x-forwarded-for"),
            "body": String::from_utf8_lossy(&body),
        }))
}

/// The echoing upstream on a free port, served from this test's runtime.
fn start_upstream() -> (u16, actix_web::dev::ServerHandle) {
    // Bound to port 0 and asked, rather than a free port picked first: between the pick and the
    // bind another process's outgoing connection can take the port (seen once in CI).
    let bound = HttpServer::new(|| App::new().default_service(web::to(echo)))
        .workers(1)
        .bind(("127.0.0.1", 0))
        .expect("bind upstream");
    let port = bound.addrs()[0].port();
    let upstream = bound.run();
    let handle = upstream.handle();
    actix_web::rt::spawn(upstream);
    (port, handle)
}

struct Edge(Child);

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_edge(upstreams: &[String]) -> (Edge, u16) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("edge")
        .arg(port.to_string())
        .args(upstreams)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn edge");
    let edge = Edge(child);
    let client = http1_client();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "edge did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (edge, port)
}

#[actix_web::test]
async fn routes_by_path_over_http1_and_h2c() {
    let (upstream_port, upstream_handle) = start_upstream();
    let dead_port = free_port();
    let (_edge, port) = start_edge(&[
        format!("tasks=http://127.0.0.1:{upstream_port}"),
        format!("auth=http://127.0.0.1:{dead_port}"),
    ])
    .await;

    for (client, version) in [
        (http1_client(), Version::HTTP_11),
        (h2c_client(), Version::HTTP_2),
    ] {
        let response = client
            .patch(format!("http://127.0.0.1:{port}/v1/tasks/42?fields=title"))
            .header("authorization", "Bearer abc")
            .body(r#"{"title":"new"}"#)
            .send()
            .await
            .expect("request through the edge");
        assert_eq!(response.version(), version);
        assert_eq!(response.status(), 201);
        assert_eq!(response.headers()["x-upstream"], "tasks");
        let echoed: Value = response.json().await.unwrap();
        assert_eq!(echoed["method"], "PATCH");
        assert_eq!(echoed["path"], "/v1/tasks/42");
        assert_eq!(echoed["query"], "fields=title");
        assert_eq!(echoed["authorization"], "Bearer abc");
        assert_eq!(echoed["forwarded_for"], "127.0.0.1");
        assert_eq!(echoed["body"], r#"{"title":"new"}"#);

        let unknown = client
            .get(format!("http://127.0.0.1:{port}/v2/elsewhere"))
            .send()
            .await
            .unwrap();
        assert_eq!(unknown.status(), 404);
        let unknown: Value = unknown.json().await.unwrap();
        assert_eq!(unknown["error"]["code"], "not_found");

        let dead = client
            .get(format!("http://127.0.0.1:{port}/v1/auth/login"))
            .send()
            .await
            .unwrap();
        assert_eq!(dead.status(), 502);
        let dead: Value = dead.json().await.unwrap();
        assert_eq!(dead["error"]["code"], "bad_gateway");
    }
    upstream_handle.stop(true).await;
}

#[actix_web::test]
async fn a_bodiless_answer_leaves_the_keep_alive_connection_usable() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (upstream_port, _upstream) = start_upstream();
    let (_edge, port) = start_edge(&[format!("tasks=http://127.0.0.1:{upstream_port}")]).await;

    // Two requests on one connection, the first answered 204, read byte by byte as sent.
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    socket
        .write_all(b"DELETE /v1/tasks/1 HTTP/1.1\r\nhost: edge\r\n\r\n")
        .await
        .unwrap();
    let first = read_head(&mut socket).await;
    assert!(first.starts_with("HTTP/1.1 204"), "{first}");
    socket
        .write_all(b"GET /v1/tasks/2 HTTP/1.1\r\nhost: edge\r\n\r\n")
        .await
        .unwrap();
    let second = read_head(&mut socket).await;
    assert!(
        second.starts_with("HTTP/1.1 201"),
        "the second answer starts with stray bytes: {second:?}"
    );

    /// Reads up to the end of a response head.
    async fn read_head(socket: &mut tokio::net::TcpStream) -> String {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let read = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut byte))
                .await
                .expect("an answer within 5 s")
                .unwrap();
            assert_eq!(
                read,
                1,
                "connection closed after {:?}",
                String::from_utf8_lossy(&head)
            );
            head.push(byte[0]);
        }
        String::from_utf8_lossy(&head).into_owned()
    }
}

#[actix_web::test]
async fn paths_are_normalised_before_routing_so_dot_segments_reach_no_internal_endpoint() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (upstream_port, _upstream) = start_upstream();
    let (_edge, port) = start_edge(&[format!("tasks=http://127.0.0.1:{upstream_port}")]).await;
    // Raw requests: an HTTP client library would resolve the dot segments itself.
    let send = |path: &'static str| async move {
        let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: edge\r\nconnection: close\r\n\r\n");
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), socket.read_to_string(&mut answer))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        let status: u16 = answer[9..12].parse().unwrap();
        let body = answer
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        (status, body)
    };
    // Under a routed prefix, but climbing out of it: `/metrics`, which no route serves.
    for path in [
        "/v1/tasks/../../metrics",
        "/v1/tasks/%2e%2e/%2E%2E/metrics",
        "/v1/tasks/./../../healthz",
    ] {
        let (status, body) = send(path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(body.contains("not_found"), "{path}: {body}");
    }
    // Dot segments inside a route: the service gets the path they stand for.
    let (status, body) = send("/v1/tasks/./7/../42").await;
    assert_eq!(status, 201, "{body}");
    assert!(body.contains(r#""path":"/v1/tasks/42""#), "{body}");
    // Above the root, or an escaped slash: refused.
    for path in ["/../v1/tasks", "/v1/tasks/..%2F..%2Fmetrics"] {
        let (status, body) = send(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains("invalid_path"), "{path}: {body}");
    }
}

/// How long the edge gives a new connection to send its first bytes, and a request its head.
const SILENT_CONNECTION_LIMIT: Duration = Duration::from_secs(5);

#[actix_web::test]
async fn silent_connections_and_stalled_request_heads_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SILENT: usize = 300;

    let (upstream_port, _upstream) = start_upstream();
    let (_edge, port) = start_edge(&[format!("tasks=http://127.0.0.1:{upstream_port}")]).await;
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    // Half a request head, then nothing (a slow-loris client).
    let mut stalled = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stalled
        .write_all(b"GET /v1/tasks HTTP/1.1\r\nhost: edge\r\n")
        .await
        .unwrap();

    // Each connection: whether the edge closed it before the deadline (reading what it said).
    let deadline = tokio::time::Instant::now() + SILENT_CONNECTION_LIMIT + Duration::from_secs(3);
    let closed_by = |mut socket: tokio::net::TcpStream| async move {
        let mut said = Vec::new();
        let mut buffer = [0u8; 512];
        loop {
            match tokio::time::timeout_at(deadline, socket.read(&mut buffer)).await {
                Err(_) => return (false, said),
                Ok(Ok(0)) | Ok(Err(_)) => return (true, said),
                Ok(Ok(read)) => said.extend_from_slice(&buffer[..read]),
            }
        }
    };
    let started = Instant::now();
    let (silent_closed, stalled_closed) = tokio::join!(
        futures_util::future::join_all(silent.into_iter().map(closed_by)),
        closed_by(stalled),
    );
    let closed = silent_closed.iter().filter(|(closed, _)| *closed).count();
    println!(
        "the edge closed {closed} of {SILENT} silent connections and the stalled head ({}) \
         within {:?}",
        stalled_closed.0,
        started.elapsed()
    );
    assert_eq!(closed, SILENT, "silent connections closed by the edge");
    assert!(
        silent_closed.iter().all(|(_, said)| said.is_empty()),
        "a silent connection is closed without an answer"
    );
    assert!(stalled_closed.0, "the stalled request head was not cut");
    let said = String::from_utf8_lossy(&stalled_closed.1);
    assert!(
        said.is_empty() || said.starts_with("HTTP/1.1 408"),
        "{said}"
    );

    // The edge still serves.
    let answer = http1_client()
        .get(format!("http://127.0.0.1:{port}/v1/tasks/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 201);
}
