//! The CloudEvents envelope in Kafka binary content mode: the event's attributes travel as `ce_*`
//! headers, its data is the message value (JSON), and the W3C trace context of the request that
//! caused the event rides along in `traceparent`, so a trace runs from HTTP through consumers.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

pub const SPEC_VERSION: &str = "1.0";
pub const CONTENT_TYPE: &str = "application/json";

/// An event's CloudEvents attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub id: Uuid,
    /// The producing service, e.g. `/taskstream/tasks`.
    pub source: String,
    pub event_type: String,
    /// The aggregate's id.
    pub subject: String,
    pub time: OffsetDateTime,
    /// W3C `traceparent` of the request that caused the event.
    pub traceparent: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("header {0} is missing")]
    Missing(&'static str),
    #[error("header {name} is invalid: {value:?}")]
    Invalid { name: &'static str, value: String },
}

impl Envelope {
    /// The message headers carrying this envelope.
    pub fn to_headers(&self) -> OwnedHeaders {
        let time = self.time.format(&Rfc3339).unwrap_or_default();
        let id = self.id.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(8);
        for (key, value) in [
            ("ce_specversion", SPEC_VERSION),
            ("ce_id", id.as_str()),
            ("ce_source", self.source.as_str()),
            ("ce_type", self.event_type.as_str()),
            ("ce_subject", self.subject.as_str()),
            ("ce_time", time.as_str()),
            ("content-type", CONTENT_TYPE),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        if let Some(traceparent) = &self.traceparent {
            headers = headers.insert(Header {
                key: "traceparent",
                value: Some(traceparent.as_str()),
            });
        }
        headers
    }

    /// Reads the envelope back from a message's headers.
    pub fn from_headers(headers: Option<&impl Headers>) -> Result<Self, EnvelopeError> {
        let text = header_map(headers);
        let get = |name: &'static str| text.get(name).cloned().ok_or(EnvelopeError::Missing(name));
        let invalid = |name: &'static str, value: String| EnvelopeError::Invalid { name, value };
        let version = get("ce_specversion")?;
        if version != SPEC_VERSION {
            return Err(invalid("ce_specversion", version));
        }
        let id = get("ce_id")?;
        let time = get("ce_time")?;
        Ok(Self {
            id: id.parse().map_err(|_| invalid("ce_id", id.clone()))?,
            source: get("ce_source")?,
            event_type: get("ce_type")?,
            subject: get("ce_subject")?,
            time: OffsetDateTime::parse(&time, &Rfc3339)
                .map_err(|_| invalid("ce_time", time.clone()))?,
            traceparent: text.get("traceparent").cloned(),
        })
    }
}

/// A message's headers as text (headers that are not UTF-8 are left out).
pub fn header_map(headers: Option<&impl Headers>) -> HashMap<String, String> {
    headers
        .map(|headers| {
            headers
                .iter()
                .filter_map(|header| {
                    let value = std::str::from_utf8(header.value?).ok()?;
                    Some((header.key.to_owned(), value.to_owned()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The W3C `traceparent` of the current span, if it belongs to a trace.
pub fn current_traceparent() -> Option<String> {
    struct Carrier(HashMap<String, String>);
    impl Injector for Carrier {
        fn set(&mut self, key: &str, value: String) {
            self.0.insert(key.to_owned(), value);
        }
    }
    let context = tracing::Span::current().context();
    let mut carrier = Carrier(HashMap::new());
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut carrier)
    });
    carrier.0.remove("traceparent")
}

/// Makes `span` a child of the trace in `traceparent`, so the consumer's work joins the
/// producer's trace.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    struct Carrier<'a>(Option<&'a str>);
    impl Extractor for Carrier<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            (key == "traceparent").then_some(self.0).flatten()
        }
        fn keys(&self) -> Vec<&str> {
            vec!["traceparent"]
        }
    }
    if traceparent.is_none() {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&Carrier(traceparent))
    });
    let _ = span.set_parent(parent);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> Envelope {
        Envelope {
            id: Uuid::now_v7(),
            source: "/taskstream/tasks".into(),
            event_type: "io.taskstream.tasks.task.created.v1".into(),
            subject: Uuid::now_v7().to_string(),
            time: OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap(),
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        }
    }

    #[test]
    fn headers_round_trip() {
        let envelope = envelope();
        let headers = envelope.to_headers();
        let text = header_map(Some(&headers));
        assert_eq!(text["ce_specversion"], "1.0");
        assert_eq!(text["ce_time"], "2027-01-15T08:00:00Z");
        assert_eq!(text["content-type"], "application/json");
        assert_eq!(Envelope::from_headers(Some(&headers)), Ok(envelope));
    }

    #[test]
    fn missing_or_bad_attributes_are_named() {
        let none: Option<&OwnedHeaders> = None;
        assert_eq!(
            Envelope::from_headers(none),
            Err(EnvelopeError::Missing("ce_specversion"))
        );
        let mut bad = envelope();
        bad.traceparent = None;
        let headers = bad.to_headers().insert(Header {
            key: "ce_id",
            value: Some("not-a-uuid"),
        });
        // The later header wins in our map, as with a producer that set it twice.
        assert!(matches!(
            Envelope::from_headers(Some(&headers)),
            Err(EnvelopeError::Invalid { name: "ce_id", .. })
        ));
    }
}
