//! Group membership and the flow of messages: one task receives everything the group assigns
//! to this instance and queues it per partition; a worker per partition applies its queue in
//! order. A queue past its high-water mark pauses its partition at the broker (librdkafka then
//! drops what it had fetched ahead and resumes from the last message handed over), so a slow or
//! stalled partition neither holds the others back nor grows memory.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use super::apply::Applier;
use super::{ConsumerSettings, EventHandler};
use crate::metric_names as names;

/// How long a stop waits for workers to finish the batch in hand.
const WORKERS_STOP_LIMIT: Duration = Duration::from_secs(2);
/// How long a stop waits for the final commit and for leaving the group (each).
const CLOSE_STEP_LIMIT: Duration = Duration::from_secs(1);

pub(super) type GroupConsumer = StreamConsumer<GroupContext>;

/// One assigned partition's queue of messages not yet applied.
pub(super) struct PartitionQueue {
    pub topic: String,
    pub partition: i32,
    state: Mutex<QueueState>,
    arrived: Notify,
}

#[derive(Default)]
struct QueueState {
    messages: VecDeque<OwnedMessage>,
    /// Taken from this instance by a rebalance: its worker ends.
    revoked: bool,
    /// Paused at the broker because the queue is full.
    paused: bool,
}

impl PartitionQueue {
    fn new(topic: &str, partition: i32) -> Self {
        Self {
            topic: topic.to_owned(),
            partition,
            state: Mutex::default(),
            arrived: Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a message; true when the queue just reached `high_water` and must be paused.
    fn push(&self, message: OwnedMessage, high_water: usize) -> bool {
        let mut state = self.state();
        state.messages.push_back(message);
        let pause = state.messages.len() >= high_water && !state.paused;
        state.paused |= pause;
        drop(state);
        self.arrived.notify_one();
        pause
    }

    /// Waits for messages and takes up to `max` of them; `None` once the partition is revoked.
    /// The flag says the queue has drained while paused, so the partition must be resumed.
    async fn take(&self, max: usize, low_water: usize) -> Option<(Vec<OwnedMessage>, bool)> {
        loop {
            {
                let mut state = self.state();
                if state.revoked {
                    return None;
                }
                if !state.messages.is_empty() {
                    let count = state.messages.len().min(max);
                    let batch: Vec<OwnedMessage> = state.messages.drain(..count).collect();
                    let resume = state.paused && state.messages.len() <= low_water;
                    state.paused &= !resume;
                    return Some((batch, resume));
                }
            }
            self.arrived.notified().await;
        }
    }

    fn revoke(&self) {
        let mut state = self.state();
        state.revoked = true;
        state.messages.clear();
        drop(state);
        self.arrived.notify_one();
    }

    pub fn is_revoked(&self) -> bool {
        self.state().revoked
    }

    fn as_list(&self, offset: Option<i64>) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        match offset {
            Some(offset) => {
                let _ =
                    list.add_partition_offset(&self.topic, self.partition, Offset::Offset(offset));
            }
            None => {
                list.add_partition(&self.topic, self.partition);
            }
        }
        list
    }
}

/// The partitions this instance holds now.
#[derive(Default)]
pub(super) struct Partitions {
    queues: Mutex<HashMap<(String, i32), Arc<PartitionQueue>>>,
}

impl Partitions {
    /// The queue of `topic`/`partition`; true when it was just created (it needs a worker).
    fn get_or_create(&self, topic: &str, partition: i32) -> (Arc<PartitionQueue>, bool) {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(queue) = queues.get(&(topic.to_owned(), partition)) {
            return (queue.clone(), false);
        }
        let queue = Arc::new(PartitionQueue::new(topic, partition));
        queues.insert((topic.to_owned(), partition), queue.clone());
        (queue, true)
    }

    fn revoke(&self, list: &TopicPartitionList) {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        for element in list.elements() {
            if let Some(queue) = queues.remove(&(element.topic().to_owned(), element.partition())) {
                queue.revoke();
            }
        }
    }
}

/// The consumer's view of the group: rebalances reach the partition queues, statistics become
/// the lag metric.
pub(super) struct GroupContext {
    group: String,
    partitions: Arc<Partitions>,
}

impl ClientContext for GroupContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in statistics.topics {
            for (partition, stats) in stats.partitions {
                // -1: unknown (not assigned here, or no position yet).
                if partition >= 0 && stats.consumer_lag >= 0 {
                    metrics::gauge!(names::KAFKA_CONSUMER_LAG,
                        "topic" => topic.clone(),
                        "partition" => partition.to_string(),
                        "group" => self.group.clone())
                    .set(stats.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // What is queued for a revoked partition is left to its next owner, which starts from
        // the committed offset (an event applied here meanwhile is deduplicated there).
        if let Rebalance::Revoke(list) = rebalance {
            self.partitions.revoke(list);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // A partition paused under an earlier assignment starts afresh, unpaused.
        if let Rebalance::Assign(list) = rebalance {
            let _ = consumer.resume(list);
        }
    }
}

/// A group member that stores offsets only when told to and commits them in the background.
pub(super) fn join_group(
    settings: &ConsumerSettings,
    partitions: Arc<Partitions>,
) -> Result<GroupConsumer, KafkaError> {
    crate::kafka::client_config(&settings.bootstrap_servers)
        .set("group.id", &settings.group)
        // Offsets are stored by the workers once an event is applied or dead-lettered...
        .set("enable.auto.offset.store", "false")
        // ...and what is stored is committed every second, on revocation and on close.
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("auto.offset.reset", "earliest")
        // Joins and failover take about half the session timeout.
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("statistics.interval.ms", "5000")
        // What librdkafka fetches ahead, over all partitions: bounded memory.
        .set("queued.max.messages.kbytes", "16384")
        // How long a fetch waits at the broker for data. Kafka answers as soon as data arrives;
        // the local broker (tansu) waits the whole time, which at librdkafka's 500 ms default
        // put ~250 ms into every event's delivery. Idle cost: 20 small fetches a second.
        .set("fetch.wait.max.ms", "50")
        .create_with_context(GroupContext {
            group: settings.group.clone(),
            partitions,
        })
}

/// Receives until told to stop, then lets the workers finish, commits and leaves the group.
pub(super) async fn run<H: EventHandler>(
    consumer: Arc<GroupConsumer>,
    partitions: Arc<Partitions>,
    applier: Arc<Applier<H>>,
    settings: ConsumerSettings,
    mut stop: watch::Receiver<bool>,
) {
    let high_water = settings.batch_size * 4;
    let low_water = settings.batch_size;
    let mut workers = JoinSet::new();
    let mut receive_errors = 0u32;
    loop {
        let received = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => break,
            received = consumer.recv() => received,
        };
        let message = match received {
            Ok(message) => {
                if receive_errors > 0 {
                    tracing::info!(errors = receive_errors, "receiving from the broker again");
                    receive_errors = 0;
                }
                message.detach()
            }
            Err(err) => {
                if receive_errors == 0 {
                    tracing::warn!(error = %err, "receiving from the broker failed; retrying");
                }
                receive_errors += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let (queue, created) = partitions.get_or_create(message.topic(), message.partition());
        if created {
            workers.spawn(work(
                queue.clone(),
                consumer.clone(),
                applier.clone(),
                settings.batch_size,
                low_water,
                stop.clone(),
            ));
        }
        if queue.push(message, high_water) {
            tracing::debug!(
                topic = queue.topic,
                partition = queue.partition,
                "pausing a partition that is behind"
            );
            if let Err(err) = consumer.pause(&queue.as_list(None)) {
                tracing::warn!(error = %err, "pausing a partition failed");
            }
        }
        while workers.try_join_next().is_some() {}
    }
    // Workers see the stop too: they finish the batch in hand and store its offset.
    let finished = tokio::time::timeout(WORKERS_STOP_LIMIT, async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!("a partition's batch was still in hand at stop; it will be delivered again");
        workers.abort_all();
        // Cancelled tasks let go of the consumer here, so it is closed below, off the runtime.
        while workers.join_next().await.is_some() {}
    }
    close(consumer).await;
}

/// Applies one partition's queue in order until the partition is revoked or the consumer stops.
async fn work<H: EventHandler>(
    queue: Arc<PartitionQueue>,
    consumer: Arc<GroupConsumer>,
    applier: Arc<Applier<H>>,
    batch_size: usize,
    low_water: usize,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let taken = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => return,
            taken = queue.take(batch_size, low_water) => taken,
        };
        let Some((batch, resume)) = taken else {
            return;
        };
        if resume {
            if let Err(err) = consumer.resume(&queue.as_list(None)) {
                tracing::warn!(error = %err, "resuming a partition failed");
            }
        }
        let applied = applier.apply(&queue, batch, &mut stop).await;
        if let Some(offset) = applied.handled_up_to {
            store_offset(&consumer, &queue, offset);
        }
        if applied.interrupted {
            return;
        }
    }
}

/// Marks everything up to `offset` of the queue's partition as done, for the next commit.
fn store_offset(consumer: &GroupConsumer, queue: &PartitionQueue, offset: i64) {
    if queue.is_revoked() {
        // No longer ours: its new owner redelivers from the committed offset and deduplicates.
        return;
    }
    if let Err(err) = consumer.store_offsets(&queue.as_list(Some(offset + 1))) {
        tracing::debug!(error = %err, topic = queue.topic, partition = queue.partition, "offset not stored (partition no longer assigned)");
    }
}

/// Commits the stored offsets and leaves the group, each step bounded: closing talks to the
/// broker, which may be away. A plain thread, not a blocking task, so a hung close cannot hold
/// the runtime's shutdown.
async fn close(consumer: Arc<GroupConsumer>) {
    let (done, closed) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("consumer-close".into())
        .spawn(move || {
            if let Err(err) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
                // Nothing stored since the last commit is reported as an error too.
                tracing::debug!(error = %err, "final commit");
            }
            consumer.unsubscribe();
            drop(consumer);
            let _ = done.send(());
        });
    if spawned.is_ok()
        && tokio::time::timeout(CLOSE_STEP_LIMIT * 2, closed)
            .await
            .is_err()
    {
        tracing::warn!("leaving the consumer group took too long; the broker may be away");
    }
}
