//! For unit tests: runs code under a tracing subscriber with the OpenTelemetry layer and
//! returns the spans it exported, to check how traces connect.

use std::sync::{Arc, Mutex};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::layer::SubscriberExt;

#[derive(Debug, Clone, Default)]
struct Collected(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collected {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

/// Runs `work` with spans exported as they end; returns its value and the spans.
pub fn capture<T>(work: impl FnOnce() -> T) -> (T, Vec<SpanData>) {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let collected = Collected::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(collected.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let value = tracing::subscriber::with_default(subscriber, work);
    let _ = provider.force_flush();
    let spans = collected.0.lock().unwrap().clone();
    (value, spans)
}
