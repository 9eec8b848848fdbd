//! `analysis rebuild`: recomputes the read models by replaying the topics from their first retained
//! event into fresh tables, swaps them in, then catches up with what arrived meanwhile.
//!
//! 1. The read-model tables are copied empty (`LIKE … INCLUDING ALL`) into the schema
//!    [`REBUILD_SCHEMA`], and each partition's end offset is noted.
//! 2. Every event up to those ends is applied there by the same code the consumer runs (with
//!    `search_path` pointing at the fresh schema), a transaction per [`BATCH`] events.
//! 3. One short transaction swaps the tables (readers wait for it, nobody sees a half-built model)
//!    and gives the new tables' indexes the names the migrations gave the old ones.
//! 4. The events that arrived since step 1 are applied again to the new tables. The live consumer
//!    may apply some of them too: applying is idempotent by task version, so the order of the two
//!    does not matter.
//!
//! The limit is the topics' retention (7 days for `tasks.task.v1` in the cluster): a task whose
//! events are all gone is gone from the rebuilt models, and one whose creation is gone starts from
//! the first retained update (its earlier history unknown).

use std::collections::HashMap;
use std::time::Duration;

use events::catalog::{AUTH_USER, TASKS_TASK};
use events::consumer::ReceivedEvent;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use service_kit::sqlx::{self, Connection, PgConnection};
use uuid::Uuid;

use super::apply::{apply, Pending};

/// Where the fresh tables are built.
pub const REBUILD_SCHEMA: &str = "analysis_rebuild";
/// Where the replaced tables go until they are dropped.
const RETIRED_SCHEMA: &str = "analysis_retired";
/// The tables a rebuild recomputes (`erased_users` and `revoked_users` are kept as they are).
pub const READ_MODEL_TABLES: [&str; 5] = [
    "task_analysis",
    "user_task_counts",
    "user_days",
    "user_cycle_times",
    "user_as_of",
];
/// Events applied per transaction.
const BATCH: usize = 500;
/// How long to wait for the broker before giving up.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("broker: {0}")]
    Broker(#[from] rdkafka::error::KafkaError),
    #[error("event at {topic}/{partition}@{offset}: {reason}")]
    Event {
        topic: String,
        partition: i32,
        offset: i64,
        reason: String,
    },
    #[error("the broker sent nothing for {0:?} before every partition was read")]
    Stalled(Duration),
    #[error("writing the users' totals: {0}")]
    Totals(String),
}

/// What a rebuild did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RebuildReport {
    /// Events replayed into the fresh tables.
    pub replayed: u64,
    /// Events applied again after the swap (arrived while replaying).
    pub caught_up: u64,
}

/// Each partition's next offset to read up to (exclusive), per topic.
type Ends = HashMap<(String, i32), i64>;

/// Runs a whole rebuild against the primary at `database_url` and the broker.
pub async fn rebuild(
    database_url: &str,
    bootstrap_servers: &str,
) -> Result<RebuildReport, RebuildError> {
    let mut conn = PgConnection::connect(database_url).await?;
    prepare_schema(&mut conn).await?;
    let topics = [TASKS_TASK.name, AUTH_USER.name];
    let starts = partition_offsets(bootstrap_servers, &topics, Edge::Low)?;
    let ends = partition_offsets(bootstrap_servers, &topics, Edge::High)?;
    let replayed = replay(
        &mut conn,
        bootstrap_servers,
        &starts,
        &ends,
        Some(REBUILD_SCHEMA),
    )
    .await?;
    swap(&mut conn).await?;
    // Whatever arrived while replaying: applied again to the new tables, the live consumer
    // possibly doing the same beside it.
    let now = partition_offsets(bootstrap_servers, &topics, Edge::High)?;
    let caught_up = replay(&mut conn, bootstrap_servers, &ends, &now, None).await?;
    let _ = conn.close().await;
    Ok(RebuildReport {
        replayed,
        caught_up,
    })
}

async fn prepare_schema(conn: &mut PgConnection) -> Result<(), RebuildError> {
    let mut tx = conn.begin().await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {REBUILD_SCHEMA} CASCADE"))
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("CREATE SCHEMA {REBUILD_SCHEMA}"))
        .execute(&mut *tx)
        .await?;
    for table in READ_MODEL_TABLES {
        sqlx::query(&format!(
            "CREATE TABLE {REBUILD_SCHEMA}.{table} (LIKE public.{table} INCLUDING ALL)"
        ))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

enum Edge {
    Low,
    High,
}

fn partition_offsets(
    bootstrap_servers: &str,
    topics: &[&str],
    edge: Edge,
) -> Result<Ends, RebuildError> {
    let consumer = replay_consumer(bootstrap_servers)?;
    let mut offsets = Ends::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), BROKER_TIMEOUT)?;
        for found in metadata.topics() {
            for partition in found.partitions() {
                let (low, high) =
                    consumer.fetch_watermarks(topic, partition.id(), BROKER_TIMEOUT)?;
                let offset = match edge {
                    Edge::Low => low,
                    Edge::High => high,
                };
                offsets.insert((topic.to_string(), partition.id()), offset);
            }
        }
    }
    Ok(offsets)
}

fn replay_consumer(bootstrap_servers: &str) -> Result<BaseConsumer, RebuildError> {
    Ok(events::kafka::client_config(bootstrap_servers)
        // Never joins a group or commits: it reads partitions it assigns itself.
        .set("group.id", format!("analysis-rebuild-{}", Uuid::now_v7()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()?)
}

/// Applies every event from `starts` up to `ends` (per partition), in `schema` when given.
async fn replay(
    conn: &mut PgConnection,
    bootstrap_servers: &str,
    starts: &Ends,
    ends: &Ends,
    schema: Option<&str>,
) -> Result<u64, RebuildError> {
    let mut assignment = TopicPartitionList::new();
    let mut remaining: HashMap<(String, i32), i64> = HashMap::new();
    for ((topic, partition), &end) in ends {
        let start = starts
            .get(&(topic.clone(), *partition))
            .copied()
            .unwrap_or(0);
        if end > start {
            assignment.add_partition_offset(topic, *partition, Offset::Offset(start))?;
            remaining.insert((topic.clone(), *partition), end);
        }
    }
    if remaining.is_empty() {
        return Ok(0);
    }
    let consumer = replay_consumer(bootstrap_servers)?;
    consumer.assign(&assignment)?;
    let mut applied = 0;
    let mut batch: Vec<ReceivedEvent> = Vec::with_capacity(BATCH);
    while !remaining.is_empty() {
        let message = match consumer.poll(BROKER_TIMEOUT) {
            Some(message) => message?,
            None => return Err(RebuildError::Stalled(BROKER_TIMEOUT)),
        };
        let key = (message.topic().to_owned(), message.partition());
        let Some(&end) = remaining.get(&key) else {
            continue;
        };
        if message.offset() >= end {
            continue;
        }
        if message.offset() + 1 >= end {
            remaining.remove(&key);
        }
        match ReceivedEvent::from_message(&message) {
            Ok(event) => batch.push(event),
            // The live consumer dead-letters these; a rebuild has nothing to apply.
            Err(err) => tracing::warn!(
                topic = message.topic(),
                partition = message.partition(),
                offset = message.offset(),
                "skipping a message that is not an event: {err}"
            ),
        }
        if batch.len() >= BATCH || remaining.is_empty() {
            applied += apply_batch(conn, &batch, schema).await?;
            batch.clear();
        }
    }
    Ok(applied)
}

async fn apply_batch(
    conn: &mut PgConnection,
    batch: &[ReceivedEvent],
    schema: Option<&str>,
) -> Result<u64, RebuildError> {
    let mut tx = conn.begin().await?;
    if let Some(schema) = schema {
        // Unqualified names reach the fresh tables first, the kept ones (erased_users) after.
        sqlx::query(&format!("SET LOCAL search_path TO {schema}, public"))
            .execute(&mut *tx)
            .await?;
    }
    let mut pending = Pending::default();
    for event in batch {
        apply(&mut tx, event, &mut pending)
            .await
            .map_err(|err| RebuildError::Event {
                topic: event.topic.clone(),
                partition: event.partition,
                offset: event.offset,
                reason: err.to_string(),
            })?;
    }
    pending
        .flush(&mut tx)
        .await
        .map_err(|err| RebuildError::Totals(err.to_string()))?;
    tx.commit().await?;
    Ok(batch.len() as u64)
}

/// Swaps the fresh tables in, in one transaction, and names their indexes as the migrations did.
async fn swap(conn: &mut PgConnection) -> Result<(), RebuildError> {
    let mut tx = conn.begin().await?;
    let tables = READ_MODEL_TABLES
        .iter()
        .map(|table| format!("public.{table}"))
        .collect::<Vec<_>>()
        .join(", ");
    sqlx::query(&format!("LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE"))
        .execute(&mut *tx)
        .await?;
    // Each old index and the new one with the same definition, told apart by schema.
    let renames: Vec<(String, String)> = sqlx::query_as(
        "SELECT old.indexname, new.indexname FROM pg_indexes old JOIN pg_indexes new \
         ON new.tablename = old.tablename \
         AND replace(replace(new.indexdef, ' ' || $1 || '.', ' public.'), new.indexname, '') \
             = replace(old.indexdef, old.indexname, '') \
         WHERE old.schemaname = 'public' AND new.schemaname = $1 \
           AND old.tablename = ANY($2) AND old.indexname <> new.indexname",
    )
    .bind(REBUILD_SCHEMA)
    .bind(&READ_MODEL_TABLES[..])
    .fetch_all(&mut *tx)
    .await?;
    for statement in [
        format!("DROP SCHEMA IF EXISTS {RETIRED_SCHEMA} CASCADE"),
        format!("CREATE SCHEMA {RETIRED_SCHEMA}"),
    ] {
        sqlx::query(&statement).execute(&mut *tx).await?;
    }
    for table in READ_MODEL_TABLES {
        sqlx::query(&format!(
            "ALTER TABLE public.{table} SET SCHEMA {RETIRED_SCHEMA}"
        ))
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "ALTER TABLE {REBUILD_SCHEMA}.{table} SET SCHEMA public"
        ))
        .execute(&mut *tx)
        .await?;
    }
    for (old, new) in renames {
        sqlx::query(&format!("ALTER INDEX public.\"{new}\" RENAME TO \"{old}\""))
            .execute(&mut *tx)
            .await?;
    }
    for schema in [RETIRED_SCHEMA, REBUILD_SCHEMA] {
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}
