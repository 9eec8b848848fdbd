//! A local trace store: the OTLP/HTTP receiver and trace-by-id query of a Tempo or Jaeger, for
//! the local stack and the tests, on `127.0.0.1`.
//!
//! No trace store can be installed on this workplace's machines (no Jaeger, Tempo or Zipkin in any
//! registry; PyPI's `arize-phoenix` idles at ~450 MB under the Elastic licence, `oteltap` only
//! prints what it receives, and `otelite` builds ~450 crates). The services already build the
//! OTLP message types for their exporter, so this store costs one small crate: it decodes what
//! they send and keeps it in memory.
//!
//! - `POST /v1/traces`: an OTLP `ExportTraceServiceRequest` as protobuf (what the services'
//!   exporter sends, `Content-Type: application/x-protobuf`), answered with an empty
//!   `ExportTraceServiceResponse`. JSON and compressed bodies answer `415`, anything undecodable
//!   `400`.
//! - `GET /api/traces/{trace_id}`: the trace's spans, oldest first, as JSON (`404` when unknown).
//! - `GET /api/traces?service=NAME&limit=N`: the newest traces (optionally those with a span
//!   from `service`), one summary each: root span, services, span count, duration.
//!
//! Memory is bounded: past `max_spans`, the oldest traces are forgotten whole.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::{AnyValue as AnyValueMessage, KeyValue};
use prost::Message as _;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// The largest OTLP request taken (the SDK's batches are far smaller).
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Spans kept by default: a few minutes of a busy local stack, some tens of MB.
pub const DEFAULT_MAX_SPANS: usize = 200_000;

/// One span as stored and answered.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSpan {
    pub trace_id: String,
    pub span_id: String,
    /// `None` for a root span.
    pub parent_span_id: Option<String>,
    pub name: String,
    /// The `service.name` of the resource that sent it.
    pub service: String,
    /// OTLP's span kind: `internal`, `server`, `client`, `producer`, `consumer`.
    pub kind: &'static str,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: Map<String, Value>,
    /// `unset`, `ok` or `error`.
    pub status: &'static str,
    /// Spans this one follows from (OTLP links), as `(trace_id, span_id)`.
    pub links: Vec<(String, String)>,
}

impl StoredSpan {
    pub fn to_json(&self) -> Value {
        json!({
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "name": self.name,
            "service": self.service,
            "kind": self.kind,
            "start_unix_nanos": self.start_unix_nanos,
            "end_unix_nanos": self.end_unix_nanos,
            "duration_ms": self.end_unix_nanos.saturating_sub(self.start_unix_nanos) as f64 / 1e6,
            "attributes": self.attributes,
            "status": self.status,
            "links": self.links.iter()
                .map(|(trace_id, span_id)| json!({"trace_id": trace_id, "span_id": span_id}))
                .collect::<Vec<_>>(),
        })
    }
}

#[derive(Default)]
struct Store {
    traces: HashMap<String, Vec<StoredSpan>>,
    /// Trace ids in the order first seen, for forgetting the oldest.
    order: VecDeque<String>,
    spans: usize,
    max_spans: usize,
}

impl Store {
    fn insert(&mut self, span: StoredSpan) {
        let spans = self.traces.entry(span.trace_id.clone()).or_insert_with(|| {
            self.order.push_back(span.trace_id.clone());
            Vec::new()
        });
        spans.push(span);
        self.spans += 1;
        while self.spans > self.max_spans {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(forgotten) = self.traces.remove(&oldest) {
                self.spans -= forgotten.len();
            }
        }
    }

    fn trace(&self, trace_id: &str) -> Option<Vec<StoredSpan>> {
        let mut spans = self.traces.get(trace_id)?.clone();
        spans.sort_by_key(|span| span.start_unix_nanos);
        Some(spans)
    }
}

struct Shared {
    store: Mutex<Store>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running store; stops when dropped or with [`LocalTraces::stop`].
pub struct LocalTraces {
    port: u16,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl LocalTraces {
    /// Listens on `127.0.0.1:port` (0: a free port), keeping at most `max_spans` spans.
    pub async fn start_on(port: u16, max_spans: usize) -> std::io::Result<LocalTraces> {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                max_spans: max_spans.max(1),
                ..Store::default()
            }),
        });
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(listener, shared.clone(), stopped));
        Ok(LocalTraces {
            port,
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The base URL; OTLP exporters take it as `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The spans of one trace (hex id), oldest first; empty when unknown.
    pub fn trace(&self, trace_id: &str) -> Vec<StoredSpan> {
        self.shared
            .lock()
            .trace(&trace_id.to_ascii_lowercase())
            .unwrap_or_default()
    }

    /// How many spans are held.
    pub fn span_count(&self) -> usize {
        self.shared.lock().spans
    }

    /// Stops listening and closes open connections.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for LocalTraces {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    connections.spawn(async move {
                        let service = service_fn(move |request| {
                            let shared = shared.clone();
                            async move { Ok::<_, Infallible>(handle(&shared, request).await) }
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                // Out of file descriptors and the like: try again shortly.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

async fn handle(shared: &Shared, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();
    match (request.method(), path.as_str()) {
        (&Method::POST, "/v1/traces") => ingest(shared, request).await,
        (&Method::GET, "/api/traces") => recent(shared, &query),
        (&Method::GET, other) if other.starts_with("/api/traces/") => {
            let trace_id = other["/api/traces/".len()..].to_ascii_lowercase();
            match shared.lock().trace(&trace_id) {
                Some(spans) => json_response(
                    StatusCode::OK,
                    &json!({
                        "trace_id": trace_id,
                        "spans": spans.iter().map(StoredSpan::to_json).collect::<Vec<_>>(),
                    }),
                ),
                None => error(StatusCode::NOT_FOUND, &format!("no trace {trace_id}")),
            }
        }
        (_, "/v1/traces" | "/api/traces") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST /v1/traces takes OTLP; GET /api/traces lists traces",
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "routes: POST /v1/traces, GET /api/traces, GET /api/traces/{trace_id}",
        ),
    }
}

async fn ingest(shared: &Shared, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if !content_type.starts_with("application/x-protobuf") {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "OTLP/HTTP protobuf only (Content-Type: application/x-protobuf)",
        );
    }
    if request
        .headers()
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v != "identity")
    {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "compressed OTLP is not taken: leave OTEL_EXPORTER_OTLP_COMPRESSION unset",
        );
    }
    let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "body over 16 MiB"),
    };
    let export = match ExportTraceServiceRequest::decode(body) {
        Ok(export) => export,
        Err(err) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("not an OTLP ExportTraceServiceRequest: {err}"),
            )
        }
    };
    let spans = spans_of(export);
    let mut store = shared.lock();
    for span in spans {
        store.insert(span);
    }
    drop(store);
    let mut response = Response::new(Full::new(Bytes::new()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-protobuf"),
    );
    response
}

/// Flattens an export into stored spans, each with its resource's `service.name`.
fn spans_of(export: ExportTraceServiceRequest) -> Vec<StoredSpan> {
    let mut stored = Vec::new();
    for resource_spans in export.resource_spans {
        let service = resource_spans
            .resource
            .as_ref()
            .and_then(|resource| {
                resource
                    .attributes
                    .iter()
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| kv.value.as_ref())
                    .and_then(|value| match &value.value {
                        Some(AnyValue::StringValue(name)) => Some(name.clone()),
                        _ => None,
                    })
            })
            .unwrap_or_else(|| "unknown".to_owned());
        for scope_spans in resource_spans.scope_spans {
            for span in scope_spans.spans {
                stored.push(StoredSpan {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: (!span.parent_span_id.is_empty())
                        .then(|| hex(&span.parent_span_id)),
                    name: span.name,
                    service: service.clone(),
                    kind: match span.kind {
                        2 => "server",
                        3 => "client",
                        4 => "producer",
                        5 => "consumer",
                        _ => "internal",
                    },
                    start_unix_nanos: span.start_time_unix_nano,
                    end_unix_nanos: span.end_time_unix_nano,
                    attributes: attributes(&span.attributes),
                    status: match span.status.map(|status| status.code) {
                        Some(1) => "ok",
                        Some(2) => "error",
                        _ => "unset",
                    },
                    links: span
                        .links
                        .iter()
                        .map(|link| (hex(&link.trace_id), hex(&link.span_id)))
                        .collect(),
                });
            }
        }
    }
    stored
}

fn attributes(pairs: &[KeyValue]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|kv| (kv.key.clone(), any_value(kv.value.as_ref())))
        .collect()
}

fn any_value(value: Option<&AnyValueMessage>) -> Value {
    match value.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(text)) => text.clone().into(),
        Some(AnyValue::BoolValue(flag)) => (*flag).into(),
        Some(AnyValue::IntValue(number)) => (*number).into(),
        Some(AnyValue::DoubleValue(number)) => (*number).into(),
        Some(AnyValue::ArrayValue(array)) => array
            .values
            .iter()
            .map(|item| any_value(Some(item)))
            .collect(),
        Some(AnyValue::KvlistValue(list)) => Value::Object(attributes(&list.values)),
        Some(AnyValue::BytesValue(bytes)) => hex(bytes).into(),
        _ => Value::Null,
    }
}

fn recent(shared: &Shared, query: &str) -> Response<Full<Bytes>> {
    let mut service = None;
    let mut limit = 20usize;
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        match pair.split_once('=') {
            Some(("service", name)) => service = Some(name.to_owned()),
            Some(("limit", n)) => match n.parse::<usize>() {
                Ok(n @ 1..=1000) => limit = n,
                _ => return error(StatusCode::BAD_REQUEST, "limit must be 1..=1000"),
            },
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("unknown query parameter {pair:?} (service, limit)"),
                )
            }
        }
    }
    let store = shared.lock();
    let summaries: Vec<Value> = store
        .order
        .iter()
        .rev()
        .filter_map(|trace_id| store.traces.get(trace_id).map(|spans| (trace_id, spans)))
        .filter(|(_, spans)| {
            service
                .as_deref()
                .is_none_or(|name| spans.iter().any(|span| span.service == name))
        })
        .take(limit)
        .map(|(trace_id, spans)| {
            let start = spans.iter().map(|s| s.start_unix_nanos).min().unwrap_or(0);
            let end = spans.iter().map(|s| s.end_unix_nanos).max().unwrap_or(0);
            let mut services: Vec<&str> = spans.iter().map(|s| s.service.as_str()).collect();
            services.sort_unstable();
            services.dedup();
            let root = spans
                .iter()
                .find(|s| s.parent_span_id.is_none())
                .map(|s| s.name.as_str());
            json!({
                "trace_id": trace_id,
                "root": root,
                "services": services,
                "spans": spans.len(),
                "start_unix_nanos": start,
                "duration_ms": end.saturating_sub(start) as f64 / 1e6,
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "traces": summaries }))
}

fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json_response(status, &json!({ "error": message }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(trace: &str, id: &str) -> StoredSpan {
        StoredSpan {
            trace_id: trace.into(),
            span_id: id.into(),
            parent_span_id: None,
            name: "x".into(),
            service: "s".into(),
            kind: "internal",
            start_unix_nanos: 0,
            end_unix_nanos: 1,
            attributes: Map::new(),
            status: "unset",
            links: Vec::new(),
        }
    }

    #[test]
    fn the_oldest_traces_are_forgotten_whole_past_the_bound() {
        let mut store = Store {
            max_spans: 3,
            ..Store::default()
        };
        store.insert(span("a", "1"));
        store.insert(span("a", "2"));
        store.insert(span("b", "3"));
        assert_eq!(store.spans, 3);
        store.insert(span("c", "4"));
        assert!(store.trace("a").is_none(), "a went first, both its spans");
        assert_eq!(store.spans, 2);
        assert_eq!(store.trace("b").map(|s| s.len()), Some(1));
        assert_eq!(store.trace("c").map(|s| s.len()), Some(1));
    }

    #[test]
    fn ids_are_lowercase_hex() {
        assert_eq!(hex(&[0x0a, 0xff, 0x00]), "0aff00");
    }
}
