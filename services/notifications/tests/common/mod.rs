//! What the notifications tests share: a broker and databases of the test's own; auth and tasks
//! publishing to that broker; two notifications instances, each behind an edge of its own (as two
//! pods behind the Gateway); and WebSocket devices that connect through an edge.
#![allow(dead_code)] // each test file uses its own part

use std::time::{Duration, Instant};

use events::catalog::{EventPayload, TaskSnapshot, TaskUpdated};
use events::envelope::Envelope;
use futures_util::{SinkExt, StreamExt};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use reqwest::StatusCode;
use serde_json::{json, Value};
use test_support::auth::{AuthServer, Session};
use test_support::{http1_client, workspace_binary, ServiceProcess, TestStack};
use time::OffsetDateTime;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

pub struct System {
    pub stack: TestStack,
    pub broker: local_broker::LocalBroker,
    pub auth: AuthServer,
    pub tasks: ServiceProcess,
    /// Two instances sharing one database and consumer group.
    pub live: Vec<ServiceProcess>,
    /// `edges[i]` routes to `live[i]` (and to the one auth and tasks).
    pub edges: Vec<ServiceProcess>,
    pub live_env: Vec<(String, String)>,
    pub log_dir: std::path::PathBuf,
    pub client: reqwest::Client,
}

impl System {
    pub async fn start(label: &str) -> Self {
        Self::start_with(label, &[], &[]).await
    }

    /// [`Self::start`] with more settings for notifications and for auth.
    pub async fn start_with(
        label: &str,
        live_extra: &[(&str, &str)],
        auth_extra: &[(&str, &str)],
    ) -> Self {
        let stack = TestStack::from_env();
        let broker = stack.scratch_broker(label);
        let bootstrap = broker.bootstrap_servers();
        stack.create_topics(&bootstrap, &events::catalog::topics_to_create(3));
        let log_dir = stack.scratch_dir(label);
        let on_scratch = |database: Vec<(String, String)>| {
            let mut env = database;
            env.push(("KAFKA_BOOTSTRAP_SERVERS".into(), bootstrap.clone()));
            env
        };
        // auth publishes `session.revoked` through its outbox: its own database and our broker.
        let auth_env = on_scratch(stack.scratch_database("auth"));
        let mut auth_settings: Vec<(&str, &str)> = auth_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        auth_settings.extend_from_slice(auth_extra);
        let auth = AuthServer::start(&stack, &format!("{label}-auth"), &auth_settings).await;
        let jwks = ("AUTH_JWKS_URL".to_owned(), auth.url("/v1/auth/jwks"));

        let mut tasks_env = stack.service_env("tasks");
        tasks_env.extend(on_scratch(stack.scratch_database("tasks")));
        tasks_env.push(jwks.clone());
        let mut tasks = ServiceProcess::spawn(workspace_binary("tasks"), &tasks_env, &log_dir);

        let mut live_env = stack.service_env("notifications");
        live_env.extend(on_scratch(stack.scratch_database("notifications")));
        live_env.push(jwks);
        // Push is on, to the local push service of each test (plain http on loopback).
        let vapid = web_push_native::jwt_simple::algorithms::ES256KeyPair::generate();
        live_env.push((
            "PUSH_VAPID_PRIVATE_KEY".into(),
            base64_url(&vapid.to_bytes()),
        ));
        live_env.push(("PUSH_ALLOW_HTTP_LOOPBACK".into(), "true".into()));
        live_env.extend(
            live_extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let mut live = Vec::new();
        for _ in 0..2 {
            live.push(ServiceProcess::spawn(
                workspace_binary("notifications"),
                &live_env,
                &log_dir,
            ));
        }
        tasks.wait_ready().await;
        let mut edges = Vec::new();
        for instance in &mut live {
            instance.wait_ready().await;
            edges.push(
                ServiceProcess::spawn_edge(
                    &[
                        ("auth", auth.url("")),
                        ("tasks", tasks.url("")),
                        ("notifications", instance.url("")),
                    ],
                    &log_dir,
                )
                .await,
            );
        }
        let system = Self {
            stack,
            broker,
            auth,
            tasks,
            live,
            edges,
            live_env,
            log_dir,
            client: http1_client(),
        };
        system.warm_up().await;
        system
    }

    /// Waits until a change goes all the way to a socket on each instance: the consumer group
    /// has settled (both instances joined, partitions assigned), so tests measure steady state.
    async fn warm_up(&self) {
        let user = self.user("warmup").await;
        let mut devices = Vec::new();
        for instance in 0..self.live.len() {
            let mut device = self.connect(instance, &user, None).await;
            device.ready().await;
            devices.push(device);
        }
        self.create_task(&user, "warm-up").await;
        // Read together: a device that is not read answers no pings, and with a short
        // LIVE_IDLE_TIMEOUT_MS it would be closed as idle while another one waits.
        let firsts = futures_util::future::join_all(
            devices
                .iter_mut()
                .map(|device| device.next_within(Duration::from_secs(60))),
        )
        .await;
        for first in firsts {
            assert_eq!(first["seq"], 1);
        }
    }

    /// A new account, logged in (the access token without `Bearer `).
    pub async fn user(&self, prefix: &str) -> Session {
        self.auth.signup_and_login(&self.client, prefix).await
    }

    /// Another session of `user`'s account.
    pub async fn login_again(&self, user: &Session) -> Session {
        let tokens = self
            .auth
            .login(&self.client, &user.username, &user.password)
            .await;
        Session {
            access_token: tokens["access_token"].as_str().unwrap().to_owned(),
            refresh_token: tokens["refresh_token"].as_str().unwrap().to_owned(),
            ..user.clone()
        }
    }

    /// Rotates `user`'s refresh token: a fresh access token of the same session.
    pub async fn refresh(&self, user: &mut Session) {
        let body = self
            .call(
                reqwest::Method::POST,
                "/v1/auth/refresh",
                None,
                Some(json!({ "refresh_token": user.refresh_token })),
                StatusCode::OK,
            )
            .await;
        user.access_token = body["access_token"].as_str().unwrap().to_owned();
        user.refresh_token = body["refresh_token"].as_str().unwrap().to_owned();
    }

    pub async fn logout(&self, user: &Session) {
        self.call(
            reqwest::Method::POST,
            "/v1/auth/logout",
            None,
            Some(json!({ "refresh_token": user.refresh_token })),
            StatusCode::NO_CONTENT,
        )
        .await;
    }

    /// A call through the first edge; panics unless it answers `expected`.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: Option<(&str, String)>,
        body: Option<Value>,
        expected: StatusCode,
    ) -> Value {
        self.call_via(0, method, path, headers, body, expected)
            .await
    }

    /// A call through edge `edge`; panics unless it answers `expected`.
    pub async fn call_via(
        &self,
        edge: usize,
        method: reqwest::Method,
        path: &str,
        headers: Option<(&str, String)>,
        body: Option<Value>,
        expected: StatusCode,
    ) -> Value {
        let mut request = self
            .client
            .request(method.clone(), self.edges[edge].url(path));
        if let Some((name, value)) = headers {
            request = request.header(name, value);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request through the edge");
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, expected, "{method} {path}: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Creates a task of `user` through tasks; returns its id.
    pub async fn create_task(&self, user: &Session, title: &str) -> String {
        let task = self
            .authorized(
                user,
                reqwest::Method::POST,
                "/v1/tasks",
                Some(json!({ "title": title })),
                StatusCode::CREATED,
            )
            .await;
        task["id"].as_str().unwrap().to_owned()
    }

    /// Renames a task that is at `version`.
    pub async fn rename_task(&self, user: &Session, id: &str, version: i64, title: &str) {
        let mut request = self
            .client
            .patch(self.edges[0].url(&format!("/v1/tasks/{id}")))
            .bearer_auth(&user.access_token)
            .header("if-match", format!("\"{version}\""))
            .json(&json!({ "title": title }));
        request = request.header("content-type", "application/json");
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }

    pub async fn delete_task(&self, user: &Session, id: &str) {
        let response = self
            .client
            .delete(self.edges[0].url(&format!("/v1/tasks/{id}")))
            .bearer_auth(&user.access_token)
            .header("if-match", "*")
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{}",
            response.text().await.unwrap()
        );
    }

    pub async fn authorized(
        &self,
        user: &Session,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        expected: StatusCode,
    ) -> Value {
        self.authorized_via(0, user, method, path, body, expected)
            .await
    }

    /// [`Self::authorized`] through edge `edge`.
    pub async fn authorized_via(
        &self,
        edge: usize,
        user: &Session,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        expected: StatusCode,
    ) -> Value {
        self.call_via(
            edge,
            method,
            path,
            Some(("authorization", format!("Bearer {}", user.access_token))),
            body,
            expected,
        )
        .await
    }

    /// Creates a task of `user` due at `due_at` (RFC 3339); returns it.
    pub async fn create_task_due(
        &self,
        user: &Session,
        title: &str,
        due_at: OffsetDateTime,
    ) -> Value {
        self.authorized(
            user,
            reqwest::Method::POST,
            "/v1/tasks",
            Some(json!({ "title": title, "due_at": rfc3339(due_at) })),
            StatusCode::CREATED,
        )
        .await
    }

    /// A task of `user` due a minute ago: its overdue reminder fires at once.
    pub async fn create_overdue_task(&self, user: &Session, title: &str) -> Value {
        self.create_task_due(
            user,
            title,
            OffsetDateTime::now_utc() - std::time::Duration::from_secs(60),
        )
        .await
    }

    /// Changes a task's fields (any version).
    pub async fn patch_task(&self, user: &Session, id: &str, patch: Value) {
        let response = self
            .client
            .patch(self.edges[0].url(&format!("/v1/tasks/{id}")))
            .bearer_auth(&user.access_token)
            .header("if-match", "*")
            .json(&patch)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }

    /// Registers a device of `user` for a subscription of the local push service.
    pub async fn register_device(&self, user: &Session, subscription: &Value) -> Value {
        self.authorized(
            user,
            reqwest::Method::POST,
            "/v1/notifications/devices",
            Some(subscription.clone()),
            StatusCode::CREATED,
        )
        .await
    }

    /// `user`'s registered devices, as `GET /v1/notifications/devices` lists them.
    pub async fn devices(&self, user: &Session) -> Vec<Value> {
        self.authorized(
            user,
            reqwest::Method::GET,
            "/v1/notifications/devices",
            None,
            StatusCode::OK,
        )
        .await["items"]
            .as_array()
            .expect("a list of devices")
            .clone()
    }

    /// Sets `user`'s preferences.
    pub async fn set_preferences(&self, user: &Session, preferences: Value) {
        self.authorized(
            user,
            reqwest::Method::PUT,
            "/v1/notifications/preferences",
            Some(preferences),
            StatusCode::OK,
        )
        .await;
    }

    /// `user`'s inbox (first page).
    pub async fn inbox(&self, user: &Session) -> Value {
        self.authorized(
            user,
            reqwest::Method::GET,
            "/v1/notifications",
            None,
            StatusCode::OK,
        )
        .await
    }

    /// Waits until `user`'s inbox holds at least `count` notifications; returns them.
    pub async fn inbox_with(&self, user: &Session, count: usize, limit: Duration) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let items = self.inbox(user).await["items"].as_array().unwrap().clone();
            if items.len() >= count {
                return items;
            }
            assert!(
                Instant::now() < deadline,
                "the inbox has {} of {count} notifications after {limit:?}: {items:?}",
                items.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A connection to notifications' database (both instances share it).
    pub async fn notifications_db(&self) -> service_kit::sqlx::PgPool {
        // The last setting wins, as in the process's environment (the scratch database).
        let url = self
            .live_env
            .iter()
            .rfind(|(name, _)| name == "DATABASE_WRITER_URL")
            .map(|(_, url)| url.clone())
            .expect("DATABASE_WRITER_URL");
        service_kit::sqlx::PgPool::connect(&url).await.unwrap()
    }

    /// A device of `user` connected through edge `instance`, token in the handshake.
    pub async fn connect(&self, instance: usize, user: &Session, since: Option<i64>) -> Device {
        Device::connect(&self.live_url(instance, since), Some(&user.access_token))
            .await
            .unwrap_or_else(|(status, body)| panic!("handshake refused: {status} {body}"))
    }

    /// `ws://…/v1/live` through edge `instance`.
    pub fn live_url(&self, instance: usize, since: Option<i64>) -> String {
        let query = since
            .map(|since| format!("?since={since}"))
            .unwrap_or_default();
        format!(
            "ws://127.0.0.1:{}/v1/live{query}",
            self.edges[instance].port
        )
    }

    /// `ws://…/v1/live` on instance `instance` itself, not through its edge.
    pub fn direct_live_url(&self, instance: usize) -> String {
        format!("ws://127.0.0.1:{}/v1/live", self.live[instance].port)
    }

    /// Publishes `count` updates of one task of `owner` straight onto the topic, as tasks would.
    pub async fn publish_updates(&self, owner: &str, count: usize) -> Uuid {
        let producer: FutureProducer =
            events::kafka::producer(&self.broker.bootstrap_servers()).unwrap();
        let id = Uuid::now_v7();
        let now = OffsetDateTime::now_utc();
        let sends = (1..=count as i64).map(|version| {
            let event = TaskUpdated {
                task: TaskSnapshot {
                    id,
                    owner_id: owner.parse().unwrap(),
                    title: "flood".into(),
                    description: None,
                    status: "todo".into(),
                    priority: "medium".into(),
                    due_at: None,
                    labels: vec![],
                    version,
                    created_at: now,
                    updated_at: now,
                },
                changes: Default::default(),
                actor_id: owner.parse().unwrap(),
            };
            let producer = &producer;
            async move {
                let envelope = Envelope {
                    id: Uuid::now_v7(),
                    source: "/tests".into(),
                    event_type: TaskUpdated::TYPE.into(),
                    subject: id.to_string(),
                    time: OffsetDateTime::now_utc(),
                    traceparent: None,
                };
                let key = id.to_string();
                let body = serde_json::to_vec(&event).unwrap();
                producer
                    .send(
                        FutureRecord::to(TaskUpdated::TOPIC.name)
                            .key(&key)
                            .payload(&body)
                            .headers(envelope.to_headers()),
                        Timeout::After(Duration::from_secs(30)),
                    )
                    .await
                    .map_err(|(err, _)| err)
                    .expect("publish");
            }
        });
        futures_util::future::join_all(sends).await;
        id
    }
}

pub fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A WebSocket client as a device would hold it.
pub struct Device {
    pub socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Device {
    /// Connects offering `taskstream.v1` (and `bearer.<token>` if given); a refused handshake is
    /// its status and body.
    pub async fn connect(url: &str, token: Option<&str>) -> Result<Self, (u16, String)> {
        Self::connect_with(url, token, &[]).await
    }

    pub async fn connect_with(
        url: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<Self, (u16, String)> {
        let mut request = url.into_client_request().unwrap();
        let protocols = match token {
            Some(token) => format!("taskstream.v1, bearer.{token}"),
            None => "taskstream.v1".to_owned(),
        };
        request
            .headers_mut()
            .insert("sec-websocket-protocol", protocols.parse().unwrap());
        for (name, value) in headers {
            let name =
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes());
            request
                .headers_mut()
                .insert(name.unwrap(), value.parse().unwrap());
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((socket, response)) => {
                assert_eq!(
                    response
                        .headers()
                        .get("sec-websocket-protocol")
                        .and_then(|p| p.to_str().ok()),
                    Some("taskstream.v1"),
                    "the server selects the protocol, never the token"
                );
                Ok(Self { socket })
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let body = response
                    .body()
                    .as_ref()
                    .map(|body| String::from_utf8_lossy(body).into_owned())
                    .unwrap_or_default();
                Err((response.status().as_u16(), body))
            }
            Err(err) => panic!("cannot connect to {url}: {err}"),
        }
    }

    pub async fn send(&mut self, frame: Value) {
        self.socket
            .send(Message::text(frame.to_string()))
            .await
            .expect("send a frame");
    }

    /// The next JSON frame (within `limit`); panics on a close or a timeout.
    pub async fn next_within(&mut self, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = tokio::time::timeout(left, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no frame within {limit:?}"));
            match message {
                Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
                Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => continue,
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }

    pub async fn next(&mut self) -> Value {
        self.next_within(Duration::from_secs(15)).await
    }

    /// The `ready` frame.
    pub async fn ready(&mut self) -> Value {
        let ready = self.next().await;
        assert_eq!(ready["type"], "ready", "{ready}");
        ready
    }

    /// Reads (and drops) frames until the server closes; returns the close code.
    pub async fn close_code(&mut self, limit: Duration) -> u16 {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.socket.next()).await {
                Err(_) => panic!("not closed within {limit:?}"),
                Ok(Some(Ok(Message::Close(Some(frame))))) => return u16::from(frame.code),
                Ok(Some(Ok(Message::Close(None)))) => return u16::from(CloseCode::Status),
                Ok(Some(Ok(_))) => continue,
                Ok(other) => panic!("the connection ended without a close frame: {other:?}"),
            }
        }
    }

    /// Panics if a frame other than a ping arrives within `span`.
    pub async fn quiet_for(&mut self, span: Duration) {
        let deadline = Instant::now() + span;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.socket.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Ping(_)))) | Ok(Some(Ok(Message::Pong(_)))) => continue,
                Ok(other) => panic!("expected nothing, got {other:?}"),
            }
        }
    }
}
