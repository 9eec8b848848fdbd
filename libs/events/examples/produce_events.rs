//! Writes `COUNT` events to `TOPIC` as fast as the broker takes them, for the consumer benchmark
//! (`cargo xtask bench consumer`): CloudEvents headers, a `{"n": …}` payload, keys spread over
//! 1,000 aggregates so every partition gets its share and per-key order means something.
//!
//! Usage: `produce_events BOOTSTRAP_SERVERS TOPIC COUNT`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use events::envelope::Envelope;
use rdkafka::producer::FutureRecord;
use uuid::Uuid;

/// Sends in slices, so librdkafka's local queue (100,000 messages by default) never overflows.
const IN_FLIGHT: usize = 20_000;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bootstrap, topic, count] = args.as_slice() else {
        eprintln!("usage: produce_events BOOTSTRAP_SERVERS TOPIC COUNT");
        return ExitCode::from(2);
    };
    let Ok(count) = count.parse::<usize>() else {
        eprintln!("produce_events: COUNT must be a number, got {count:?}");
        return ExitCode::from(2);
    };
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    match runtime.block_on(produce(bootstrap, topic, count)) {
        Ok(took) => {
            println!(
                "produced {count} events to {topic} in {:.2} s ({:.0}/s)",
                took.as_secs_f64(),
                count as f64 / took.as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("produce_events: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn produce(bootstrap: &str, topic: &str, count: usize) -> Result<Duration, String> {
    let producer = events::kafka::producer(bootstrap).map_err(|err| err.to_string())?;
    let started = Instant::now();
    let aggregates: Vec<String> = (0..1000).map(|_| Uuid::now_v7().to_string()).collect();
    for slice in (0..count).collect::<Vec<_>>().chunks(IN_FLIGHT) {
        let mut deliveries = Vec::with_capacity(slice.len());
        for &n in slice {
            let key = &aggregates[n % aggregates.len()];
            let headers = Envelope {
                id: Uuid::now_v7(),
                source: "/bench".into(),
                event_type: "io.taskstream.bench.produced.v1".into(),
                subject: key.clone(),
                time: time::OffsetDateTime::now_utc(),
                traceparent: None,
            }
            .to_headers();
            let payload = format!("{{\"n\":{n}}}");
            let record = FutureRecord::to(topic)
                .key(key)
                .payload(&payload)
                .headers(headers);
            deliveries.push(
                producer
                    .send_result(record)
                    .map_err(|(err, _)| format!("queueing event {n}: {err}"))?,
            );
        }
        for delivery in deliveries {
            delivery
                .await
                .map_err(|_| "delivery cancelled".to_owned())?
                .map_err(|(err, _)| format!("delivery failed: {err}"))?;
        }
    }
    Ok(started.elapsed())
}
