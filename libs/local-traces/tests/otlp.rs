//! The store against the real OTLP/HTTP exporter the services use.

use local_traces::{LocalTraces, DEFAULT_MAX_SPANS};
use opentelemetry::trace::{
    Span as _, SpanKind, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;

#[test]
fn a_trace_exported_over_otlp_is_answered_by_id() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let traces = runtime
        .block_on(LocalTraces::start_on(0, DEFAULT_MAX_SPANS))
        .unwrap();

    // Built outside the runtime: the exporter's blocking HTTP client must not live inside one.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{}/v1/traces", traces.url()))
        .build()
        .unwrap();
    let provider = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name("tasks").build())
        .with_simple_exporter(exporter)
        .build();
    let tracer = provider.tracer("test");
    let mut request = tracer
        .span_builder("POST /v1/tasks")
        .with_kind(SpanKind::Server)
        .start(&tracer);
    let trace_id = request.span_context().trace_id().to_string();
    let request_id = request.span_context().span_id().to_string();
    request.set_attribute(KeyValue::new("http.response.status_code", 201));
    let parent = Context::current().with_span(request);
    let mut statement = tracer.start_with_context("insert_task", &parent);
    statement.set_attribute(KeyValue::new("db.system", "postgresql"));
    statement.end();
    parent.span().end();
    provider.force_flush().unwrap();
    provider.shutdown().unwrap();

    let spans = traces.trace(&trace_id);
    assert_eq!(spans.len(), 2, "{spans:?}");
    let request = spans.iter().find(|s| s.name == "POST /v1/tasks").unwrap();
    let statement = spans.iter().find(|s| s.name == "insert_task").unwrap();
    assert_eq!(request.parent_span_id, None);
    assert_eq!(request.span_id, request_id);
    assert_eq!(request.kind, "server");
    assert_eq!(request.service, "tasks");
    assert_eq!(request.attributes["http.response.status_code"], 201);
    assert_eq!(
        statement.parent_span_id.as_deref(),
        Some(request_id.as_str())
    );
    assert_eq!(statement.attributes["db.system"], "postgresql");
    assert!(statement.end_unix_nanos >= statement.start_unix_nanos);

    runtime.block_on(async {
        let client = reqwest::Client::new();
        let answer: serde_json::Value = client
            .get(format!(
                "{}/api/traces/{}",
                traces.url(),
                trace_id.to_uppercase()
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["trace_id"], trace_id);
        let names: Vec<&str> = answer["spans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["POST /v1/tasks", "insert_task"], "oldest first");

        let recent: serde_json::Value = client
            .get(format!("{}/api/traces?service=tasks&limit=5", traces.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(recent["traces"][0]["trace_id"], trace_id);
        assert_eq!(recent["traces"][0]["root"], "POST /v1/tasks");
        assert_eq!(recent["traces"][0]["spans"], 2);

        let unknown = client
            .get(format!("{}/api/traces/{}", traces.url(), "0".repeat(32)))
            .send()
            .await
            .unwrap();
        assert_eq!(unknown.status(), 404);
        let json_body = client
            .post(format!("{}/v1/traces", traces.url()))
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(json_body.status(), 415);
        let garbage = client
            .post(format!("{}/v1/traces", traces.url()))
            .header("content-type", "application/x-protobuf")
            .body(vec![0xff; 7])
            .send()
            .await
            .unwrap();
        assert_eq!(garbage.status(), 400);
        assert!(garbage.text().await.unwrap().contains("not an OTLP"));
    });
    assert_eq!(traces.span_count(), 2, "refused bodies stored nothing");
    runtime.block_on(traces.stop());
}
