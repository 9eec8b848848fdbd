//! What the analysis tests share: a broker and a database of the test's own, auth for tokens,
//! analysis and the edge in front of it, and a producer of task events with times the test
//! chooses (as tasks would publish them).
#![allow(dead_code)] // each test file uses its own part

use std::time::Duration;

use events::catalog::{
    EventPayload, TaskCreated, TaskDeleted, TaskSnapshot, TaskUpdated, UserDeleted,
};
use events::envelope::Envelope;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use reqwest::Method;
use serde::Serialize;
use service_kit::sqlx::PgPool;
use test_support::auth::{AuthServer, Session};
use test_support::{
    h2c_client, http1_client, poll_until, workspace_binary, Answer, ServiceProcess, TestStack,
};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

pub fn at(text: &str) -> OffsetDateTime {
    OffsetDateTime::parse(text, &Rfc3339).unwrap()
}

/// analysis on a broker and database of its own, auth, and the edge.
pub struct System {
    pub stack: TestStack,
    pub broker: local_broker::LocalBroker,
    pub database: Vec<(String, String)>,
    pub auth: AuthServer,
    pub analysis: ServiceProcess,
    /// analysis's environment, to start it again.
    pub analysis_env: Vec<(String, String)>,
    pub log_dir: std::path::PathBuf,
    pub edge: ServiceProcess,
    pub client: reqwest::Client,
    pub producer: FutureProducer,
}

impl System {
    pub async fn start(label: &str) -> Self {
        Self::start_with(label, &[]).await
    }

    /// [`Self::start`] with more settings for analysis.
    pub async fn start_with(label: &str, extra: &[(&str, &str)]) -> Self {
        let stack = TestStack::from_env();
        let broker = stack.scratch_broker(label);
        let bootstrap = broker.bootstrap_servers();
        stack.create_topics(&bootstrap, &events::catalog::topics_to_create(3));
        let database = stack.scratch_database("analysis");
        let auth = AuthServer::start(&stack, &format!("{label}-auth"), &[]).await;
        let log_dir = stack.scratch_dir(label);
        let mut env = stack.service_env("analysis");
        env.retain(|(name, _)| !name.starts_with("DATABASE_") && name != "KAFKA_BOOTSTRAP_SERVERS");
        env.extend(database.iter().cloned());
        env.push(("KAFKA_BOOTSTRAP_SERVERS".into(), bootstrap.clone()));
        env.push(("AUTH_JWKS_URL".into(), auth.url("/v1/auth/jwks")));
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut analysis = ServiceProcess::spawn(workspace_binary("analysis"), &env, &log_dir);
        analysis.wait_ready().await;
        let edge = ServiceProcess::spawn_edge(
            &[("auth", auth.url("")), ("analysis", analysis.url(""))],
            &log_dir,
        )
        .await;
        let producer = events::kafka::producer(&bootstrap).unwrap();
        Self {
            stack,
            broker,
            database,
            auth,
            analysis,
            analysis_env: env,
            log_dir,
            edge,
            client: h2c_client(),
            producer,
        }
    }

    /// Starts analysis again (after a kill, say) on a new port, not behind the edge.
    pub async fn restart_analysis(&mut self) {
        let mut analysis = ServiceProcess::spawn(
            workspace_binary("analysis"),
            &self.analysis_env,
            &self.log_dir,
        );
        analysis.wait_ready().await;
        self.analysis = analysis;
    }

    pub fn writer_url(&self) -> String {
        self.setting("DATABASE_WRITER_URL")
    }

    pub fn setting(&self, name: &str) -> String {
        self.database
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
            .unwrap()
    }

    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&self.writer_url()).await.unwrap()
    }

    pub async fn user(&self, prefix: &str) -> Session {
        let mut session = self.auth.signup_and_login(&http1_client(), prefix).await;
        session.access_token = format!("Bearer {}", session.access_token);
        session
    }

    /// A GET through the edge over h2c.
    pub async fn get(&self, user: &Session, path: &str) -> Answer {
        let answer = Answer::send(
            self.client
                .request(Method::GET, self.edge.url(path))
                .header("authorization", &user.access_token),
        )
        .await;
        assert_eq!(
            answer.version,
            reqwest::Version::HTTP_2,
            "the edge speaks h2c"
        );
        answer
    }

    /// Polls `path` until `done` holds for its answer (within 30 s).
    pub async fn get_until(
        &self,
        user: &Session,
        path: &str,
        done: impl Fn(&Answer) -> bool,
    ) -> Answer {
        poll_until(Duration::from_secs(30), || self.get(user, path), done).await
    }

    /// Publishes `payload` as tasks would: keyed by the aggregate, with an envelope of `time`.
    pub async fn publish<P: EventPayload + Serialize>(
        &self,
        payload: &P,
        time: OffsetDateTime,
    ) -> Uuid {
        let id = Uuid::now_v7();
        self.publish_with_id(payload, time, id).await;
        id
    }

    pub async fn publish_with_id<P: EventPayload + Serialize>(
        &self,
        payload: &P,
        time: OffsetDateTime,
        id: Uuid,
    ) {
        let envelope = Envelope {
            id,
            source: "/tests".into(),
            event_type: P::TYPE.into(),
            subject: payload.aggregate_id().to_string(),
            time,
            traceparent: None,
        };
        let key = payload.aggregate_id().to_string();
        let body = serde_json::to_vec(payload).unwrap();
        self.producer
            .send(
                FutureRecord::to(P::TOPIC.name)
                    .key(&key)
                    .payload(&body)
                    .headers(envelope.to_headers()),
                Timeout::After(Duration::from_secs(10)),
            )
            .await
            .map_err(|(err, _)| err)
            .expect("publish");
    }
}

/// A task of `owner` as its events carry it.
#[derive(Clone)]
pub struct ScriptedTask {
    pub snapshot: TaskSnapshot,
}

impl ScriptedTask {
    pub fn new(owner: &str, created_at: OffsetDateTime, status: &str) -> Self {
        Self {
            snapshot: TaskSnapshot {
                id: Uuid::now_v7(),
                owner_id: owner.parse().unwrap(),
                title: "scripted".into(),
                description: None,
                status: status.into(),
                priority: "medium".into(),
                due_at: None,
                labels: vec![],
                version: 1,
                created_at,
                updated_at: created_at,
            },
        }
    }

    pub fn id(&self) -> Uuid {
        self.snapshot.id
    }

    pub fn created(&self) -> TaskCreated {
        TaskCreated {
            task: self.snapshot.clone(),
            actor_id: self.snapshot.owner_id,
        }
    }

    /// The next version with `status` at `at`.
    pub fn moved(&mut self, status: &str, at: OffsetDateTime) -> TaskUpdated {
        self.snapshot.status = status.into();
        self.snapshot.version += 1;
        self.snapshot.updated_at = at;
        TaskUpdated {
            task: self.snapshot.clone(),
            changes: Default::default(),
            actor_id: self.snapshot.owner_id,
        }
    }

    pub fn deleted(&self) -> TaskDeleted {
        TaskDeleted {
            task_id: self.snapshot.id,
            owner_id: self.snapshot.owner_id,
            last_version: self.snapshot.version,
            actor_id: self.snapshot.owner_id,
            reason: None,
        }
    }
}

pub fn user_deleted(user: &Session, at: OffsetDateTime) -> UserDeleted {
    UserDeleted {
        user_id: user.user_id.parse().unwrap(),
        deleted_at: at,
        tokens_valid_until: at + time::Duration::hours(1),
    }
}
