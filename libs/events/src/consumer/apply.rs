//! Applying a partition's batch: decoding, the `processed_events` check and the handler in one
//! transaction, retries by kind of failure, and the dead-letter topic.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use service_kit::db::Database;
use service_kit::sqlx::{self, Connection};
use std::sync::Arc;
use tokio::sync::{watch, Semaphore};
use tracing::Instrument;
use uuid::Uuid;

use super::dispatch::PartitionQueue;
use super::{ConsumerSettings, EventHandler, HandlerError, ReceivedEvent};
use crate::catalog::dead_letter_topic;
use crate::envelope::continue_trace;
use crate::metric_names as names;

/// How far a batch got.
pub(super) struct Applied {
    /// The offset of the last message applied or dead-lettered, in order.
    pub handled_up_to: Option<i64>,
    /// The consumer is stopping and the rest of the batch was left for redelivery.
    pub interrupted: bool,
}

/// Applies batches for every partition of one consumer.
pub(super) struct Applier<H> {
    db: Database,
    handler: Arc<H>,
    dead_letters: FutureProducer,
    settings: ConsumerSettings,
    /// Partitions applying at the same time.
    permits: Semaphore,
}

/// A message and what it decoded to.
struct Incoming {
    message: OwnedMessage,
    event: Result<ReceivedEvent, String>,
}

/// Stopping was asked for while waiting: leave what is in hand for redelivery.
struct Interrupted;

impl<H: EventHandler> Applier<H> {
    pub fn new(
        settings: &ConsumerSettings,
        db: Database,
        handler: Arc<H>,
    ) -> Result<Self, KafkaError> {
        Ok(Self {
            db,
            handler,
            dead_letters: crate::kafka::producer(&settings.bootstrap_servers)?,
            permits: Semaphore::new(settings.concurrency.max(1)),
            settings: settings.clone(),
        })
    }

    /// Applies `batch` (one partition's messages, in order): runs of events in one transaction
    /// each, messages that are not events to the dead-letter topic, in place.
    pub async fn apply(
        &self,
        queue: &PartitionQueue,
        batch: Vec<OwnedMessage>,
        stop: &mut watch::Receiver<bool>,
    ) -> Applied {
        let mut handled_up_to = None;
        let outcome = self
            .apply_in_order(queue, batch, stop, &mut handled_up_to)
            .await;
        Applied {
            handled_up_to,
            interrupted: outcome.is_err(),
        }
    }

    async fn apply_in_order(
        &self,
        queue: &PartitionQueue,
        batch: Vec<OwnedMessage>,
        stop: &mut watch::Receiver<bool>,
        handled_up_to: &mut Option<i64>,
    ) -> Result<(), Interrupted> {
        let mut run: Vec<Incoming> = Vec::with_capacity(batch.len());
        for next in batch.into_iter().map(decode) {
            let Err(reason) = &next.event else {
                run.push(next);
                continue;
            };
            // Not an event: what came before it is applied first, then it is set aside, in place.
            self.apply_run(queue, &mut run, stop, handled_up_to).await?;
            self.dead_letter(&next.message, reason, 0, stop).await?;
            *handled_up_to = Some(next.message.offset());
        }
        self.apply_run(queue, &mut run, stop, handled_up_to).await
    }

    /// Applies `run` (consecutive events) and empties it, moving `handled_up_to` past it.
    async fn apply_run(
        &self,
        queue: &PartitionQueue,
        run: &mut Vec<Incoming>,
        stop: &mut watch::Receiver<bool>,
        handled_up_to: &mut Option<i64>,
    ) -> Result<(), Interrupted> {
        let Some(last) = run.last() else {
            return Ok(());
        };
        let last = last.message.offset();
        self.apply_events_of(queue, run, stop).await?;
        *handled_up_to = Some(last);
        run.clear();
        Ok(())
    }

    /// Applies consecutive events in one transaction, waiting out outages; if the batch fails
    /// otherwise, one by one, so only the culprit is retried and dead-lettered.
    async fn apply_events_of(
        &self,
        queue: &PartitionQueue,
        run: &[Incoming],
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Interrupted> {
        let events: Vec<ReceivedEvent> = run
            .iter()
            .filter_map(|incoming| incoming.event.as_ref().ok().cloned())
            .collect();
        let mut outage = Outage::new(queue, &self.settings);
        let failure = loop {
            match self.apply_events(&events).await {
                Ok(()) => return Ok(()),
                Err(HandlerError::Unavailable(reason)) => outage.wait(&reason, stop).await?,
                Err(failure) => break failure,
            }
        };
        drop(outage);
        if run.len() > 1 {
            tracing::info!(
                topic = queue.topic,
                partition = queue.partition,
                events = run.len(),
                reason = %failure,
                "a batch failed; applying its events one by one"
            );
        }
        for (incoming, event) in run.iter().zip(&events) {
            self.apply_alone(queue, incoming, event, stop).await?;
        }
        Ok(())
    }

    /// One event in a transaction of its own, with its retry budget, then the dead-letter topic.
    async fn apply_alone(
        &self,
        queue: &PartitionQueue,
        incoming: &Incoming,
        event: &ReceivedEvent,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Interrupted> {
        let mut outage = Outage::new(queue, &self.settings);
        let mut attempt = 0;
        loop {
            let failure = match self.apply_events(std::slice::from_ref(event)).await {
                Ok(()) => return Ok(()),
                Err(HandlerError::Unavailable(reason)) => {
                    outage.wait(&reason, stop).await?;
                    continue;
                }
                Err(failure) => failure,
            };
            outage.end();
            attempt += 1;
            match failure {
                HandlerError::Retryable(reason) if attempt < self.settings.max_attempts => {
                    metrics::counter!(names::EVENT_RETRIES, "topic" => event.topic.clone())
                        .increment(1);
                    let wait = backoff(&self.settings, attempt);
                    tracing::warn!(
                        event.id = %event.envelope.id,
                        attempt,
                        reason,
                        "event handler failed; retrying in {wait:?}"
                    );
                    sleep_unless_stopped(wait, stop).await?;
                }
                HandlerError::Retryable(reason)
                | HandlerError::Permanent(reason)
                | HandlerError::Unavailable(reason) => {
                    return self
                        .dead_letter(&incoming.message, &reason, attempt, stop)
                        .await;
                }
            }
        }
    }

    /// One transaction: records the ids, hands the ones not seen before to the handler, commits.
    /// In the event's (or batch's) span: the wait for a connection (`db.acquire`),
    /// `record_event_ids`, the handler's statements, `db.commit`.
    async fn apply_events(&self, events: &[ReceivedEvent]) -> Result<(), HandlerError> {
        let Some(first) = events.first() else {
            return Ok(());
        };
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| HandlerError::Unavailable("consumer closing".into()))?;
        let (span, _event_spans) = handling_spans(events);
        async {
            let mut conn = self.db.writer_connection().await?;
            let mut tx = conn.begin().await?;
            let mut seen_in_batch = HashSet::with_capacity(events.len());
            let ids: Vec<Uuid> = events
                .iter()
                .map(|event| event.envelope.id)
                .filter(|id| seen_in_batch.insert(*id))
                .collect();
            let fresh: HashSet<Uuid> = sqlx::query_scalar(
                "INSERT INTO processed_events (event_id, topic) \
                 SELECT id, $2 FROM unnest($1::uuid[]) AS ids (id) \
                 ON CONFLICT DO NOTHING RETURNING event_id",
            )
            .bind(&ids)
            .bind(&first.topic)
            .fetch_all(&mut *tx)
            .instrument(tracing::info_span!("record_event_ids"))
            .await?
            .into_iter()
            .collect();
            let duplicates = events.len() - fresh.len();
            if !fresh.is_empty() {
                if fresh.len() == events.len() {
                    self.handler.handle_batch(&mut tx, events).await?;
                } else {
                    // First sightings only, in order.
                    let mut first_sightings = fresh.clone();
                    let new: Vec<ReceivedEvent> = events
                        .iter()
                        .filter(|event| first_sightings.remove(&event.envelope.id))
                        .cloned()
                        .collect();
                    self.handler.handle_batch(&mut tx, &new).await?;
                }
                tx.commit()
                    .instrument(tracing::info_span!("db.commit"))
                    .await?;
            }
            metrics::counter!(names::EVENTS_CONSUMED, "topic" => first.topic.clone())
                .increment(fresh.len() as u64);
            if duplicates > 0 {
                metrics::counter!(names::EVENTS_DUPLICATE, "topic" => first.topic.clone())
                    .increment(duplicates as u64);
            }
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Sends the message as it arrived to `<topic>.dlq`, with why, and waits until the broker has
    /// it (the offset is stored after, so a message is never both skipped and lost). Retried
    /// until it works or the consumer stops.
    async fn dead_letter(
        &self,
        message: &OwnedMessage,
        reason: &str,
        attempts: u32,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Interrupted> {
        let topic = dead_letter_topic(message.topic());
        let mut headers = OwnedHeaders::new();
        if let Some(original) = message.headers() {
            for header in original.iter() {
                headers = headers.insert(Header {
                    key: header.key,
                    value: header.value,
                });
            }
        }
        for (key, value) in [
            ("dlq_reason", reason.to_owned()),
            ("dlq_original_topic", message.topic().to_owned()),
            ("dlq_original_partition", message.partition().to_string()),
            ("dlq_original_offset", message.offset().to_string()),
            ("dlq_attempts", attempts.to_string()),
            ("dlq_consumer_group", self.settings.group.clone()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_str()),
            });
        }
        loop {
            let mut record = FutureRecord::to(&topic).headers(headers.clone());
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            if let Some(payload) = message.payload() {
                record = record.payload(payload);
            }
            let sent = tokio::select! {
                biased;
                _ = stop.wait_for(|stop| *stop) => return Err(Interrupted),
                sent = self.dead_letters.send(record, Timeout::Never) => sent,
            };
            match sent {
                Ok(_) => break,
                Err((err, _)) => {
                    tracing::error!(error = %err, topic, "dead-lettering failed; trying again");
                    sleep_unless_stopped(Duration::from_secs(1), stop).await?;
                }
            }
        }
        metrics::counter!(names::EVENTS_DEAD_LETTERED, "topic" => message.topic().to_owned())
            .increment(1);
        tracing::error!(
            reason,
            attempts,
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset(),
            "event dead-lettered"
        );
        Ok(())
    }
}

/// A message as an event, or why it is not one.
fn decode(message: OwnedMessage) -> Incoming {
    let event = ReceivedEvent::from_message(&message).map_err(|err| format!("not an event: {err}"));
    Incoming { message, event }
}

/// The span the handling of `events` runs in, and the spans to keep open while it does. One
/// event: a child of the trace it carries, so the trace runs from the producer's request into
/// this handler. Several: each event gets a span in its own trace, open for the batch's work,
/// and the batch's span links to them all.
fn handling_spans(events: &[ReceivedEvent]) -> (tracing::Span, Vec<tracing::Span>) {
    if let [event] = events {
        return (event_span(event), Vec::new());
    }
    let first = &events[0];
    let batch = tracing::info_span!(
        "consume batch",
        messaging.destination = %first.topic,
        messaging.kafka.partition = first.partition,
        messaging.kafka.offset = first.offset,
        messaging.batch.message_count = events.len(),
    );
    if batch.is_disabled() {
        return (batch, Vec::new());
    }
    let event_spans: Vec<tracing::Span> = events.iter().map(event_span).collect();
    for span in &event_spans {
        batch.follows_from(span.id());
    }
    (batch, event_spans)
}

/// A span for one event, the child of the `traceparent` it carries.
pub(crate) fn event_span(event: &ReceivedEvent) -> tracing::Span {
    let trace_id = event
        .envelope
        .traceparent
        .as_deref()
        .and_then(|traceparent| traceparent.split('-').nth(1))
        .unwrap_or_default();
    let span = tracing::info_span!(
        "event",
        event.id = %event.envelope.id,
        event.r#type = %event.envelope.event_type,
        messaging.destination = %event.topic,
        messaging.kafka.partition = event.partition,
        messaging.kafka.offset = event.offset,
        trace_id,
    );
    continue_trace(&span, event.envelope.traceparent.as_deref());
    span
}

/// The wait before retry number `attempt` (1-based): doubling from `first_backoff`, capped.
fn backoff(settings: &ConsumerSettings, attempt: u32) -> Duration {
    settings
        .first_backoff
        .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
        .min(settings.max_backoff)
}

async fn sleep_unless_stopped(
    wait: Duration,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), Interrupted> {
    tokio::select! {
        biased;
        _ = stop.wait_for(|stop| *stop) => Err(Interrupted),
        _ = tokio::time::sleep(wait) => Ok(()),
    }
}

/// A streak of "unavailable" failures on one partition: logged when it starts and ends,
/// counted, and shown as a stalled partition while it lasts.
struct Outage<'a> {
    queue: &'a PartitionQueue,
    settings: &'a ConsumerSettings,
    started: Option<Instant>,
    failures: u32,
}

impl<'a> Outage<'a> {
    fn new(queue: &'a PartitionQueue, settings: &'a ConsumerSettings) -> Self {
        Self {
            queue,
            settings,
            started: None,
            failures: 0,
        }
    }

    /// Counts a failure and waits before the next try.
    async fn wait(
        &mut self,
        reason: &str,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Interrupted> {
        let topic = self.queue.topic.clone();
        if self.started.is_none() {
            self.started = Some(Instant::now());
            metrics::gauge!(names::CONSUMER_PARTITIONS_STALLED, "topic" => topic.clone())
                .increment(1.0);
            tracing::warn!(
                topic = self.queue.topic,
                partition = self.queue.partition,
                reason,
                "cannot apply events: a dependency is unavailable; holding this partition and retrying until it is back"
            );
        }
        self.failures += 1;
        metrics::counter!(names::EVENT_UNAVAILABLE_RETRIES, "topic" => topic).increment(1);
        sleep_unless_stopped(backoff(self.settings, self.failures), stop).await
    }

    fn end(&mut self) {
        if let Some(started) = self.started.take() {
            metrics::gauge!(names::CONSUMER_PARTITIONS_STALLED, "topic" => self.queue.topic.clone())
                .decrement(1.0);
            tracing::info!(
                topic = self.queue.topic,
                partition = self.queue.partition,
                failures = self.failures,
                "dependency back after {:?}: applying events again",
                started.elapsed()
            );
            self.failures = 0;
        }
    }
}

impl Drop for Outage<'_> {
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Envelope;
    use opentelemetry::trace::{SpanId, TraceId};
    use opentelemetry_sdk::trace::SpanData;
    use test_support::trace_capture::capture;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";

    fn received(traceparent: Option<String>) -> ReceivedEvent {
        ReceivedEvent {
            envelope: Envelope {
                id: Uuid::now_v7(),
                source: "/tests".into(),
                event_type: "io.taskstream.tests.traced.v1".into(),
                subject: "s".into(),
                time: time::OffsetDateTime::now_utc(),
                traceparent,
            },
            topic: "t".into(),
            partition: 0,
            offset: 7,
            key: None,
            payload: b"{}".to_vec(),
        }
    }

    #[test]
    fn handling_one_event_continues_the_trace_it_carries() {
        let event = received(Some(format!("00-{TRACE}-{PARENT}-01")));
        let (_, spans) = capture(|| {
            let (span, _) = handling_spans(std::slice::from_ref(&event));
            span.in_scope(|| tracing::info!("applying"));
        });
        assert_eq!(spans.len(), 1, "{spans:?}");
        assert_eq!(spans[0].name, "event");
        assert_eq!(
            spans[0].span_context.trace_id(),
            TraceId::from_hex(TRACE).unwrap()
        );
        assert_eq!(spans[0].parent_span_id, SpanId::from_hex(PARENT).unwrap());
    }

    #[test]
    fn a_batch_links_each_event_in_its_own_trace() {
        let traces = [
            "0af7651916cd43dd8448eb211c80319c",
            "1bf7651916cd43dd8448eb211c80319d",
        ];
        let events: Vec<ReceivedEvent> = traces
            .iter()
            .map(|trace| received(Some(format!("00-{trace}-{PARENT}-01"))))
            .collect();
        let (_, spans) = capture(|| {
            let (span, event_spans) = handling_spans(&events);
            span.in_scope(|| tracing::info!("applying"));
            drop(event_spans);
        });
        let event_spans: Vec<&SpanData> =
            spans.iter().filter(|span| span.name == "event").collect();
        let mut seen: Vec<String> = event_spans
            .iter()
            .map(|span| span.span_context.trace_id().to_string())
            .collect();
        seen.sort();
        assert_eq!(seen, traces, "one span per event, in the event's trace");
        assert!(event_spans
            .iter()
            .all(|span| span.parent_span_id == SpanId::from_hex(PARENT).unwrap()));
        let batch = spans
            .iter()
            .find(|span| span.name == "consume batch")
            .expect("the batch's span");
        assert_eq!(batch.links.links.len(), 2, "linked to both events");
    }

    struct Ignore;

    impl EventHandler for Ignore {
        fn handle<'a>(
            &'a self,
            _: &'a mut sqlx::PgConnection,
            _: &'a ReceivedEvent,
        ) -> futures_util::future::BoxFuture<'a, Result<(), HandlerError>> {
            Box::pin(async { Ok(()) })
        }
    }

    #[test]
    fn applying_an_event_waits_and_records_its_id_below_the_events_span() {
        let event = received(Some(format!("00-{TRACE}-{PARENT}-01")));
        let (_, spans) = capture(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    let settings = ConsumerSettings::new("unused:9092", "group", &["t"]);
                    let applier = Applier::new(
                        &settings,
                        crate::outbox::fake_postgres::database(),
                        Arc::new(Ignore),
                    )
                    .unwrap();
                    // The stand-in database refuses the statement: the spans are there anyway.
                    assert!(applier.apply_events(&[event]).await.is_err());
                })
        });
        let event_span = spans.iter().find(|span| span.name == "event").unwrap();
        for name in ["db.acquire", "record_event_ids"] {
            let span = spans.iter().find(|span| span.name == name).unwrap();
            assert_eq!(
                span.parent_span_id,
                event_span.span_context.span_id(),
                "{name} below the event's span"
            );
        }
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let mut settings = ConsumerSettings::new("unused:9092", "group", &["topic"]);
        settings.first_backoff = Duration::from_millis(200);
        settings.max_backoff = Duration::from_secs(5);
        let waits: Vec<u64> = (1..=8)
            .map(|attempt| backoff(&settings, attempt).as_millis() as u64)
            .collect();
        assert_eq!(waits, [200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        assert_eq!(backoff(&settings, u32::MAX), Duration::from_secs(5));
    }
}
