//! What the tasks API tests share: auth, tasks and the edge in front of them, started as a
//! client sees the system, and helpers to read answers.
#![allow(dead_code)] // each test file uses its own part

use reqwest::{Method, RequestBuilder};
use serde_json::Value;
use test_support::auth::{AuthServer, Session};
use test_support::{h2c_client, http1_client, workspace_binary, Answer, ServiceProcess, TestStack};

/// auth, tasks and the edge in front of them, as a client sees the system.
pub struct System {
    pub auth: AuthServer,
    pub tasks: ServiceProcess,
    pub edge: ServiceProcess,
    pub client: reqwest::Client,
}

impl System {
    pub async fn start(label: &str) -> Self {
        Self::start_with(label, None, &[]).await
    }

    /// `reader_port`: a replica of the test's own instead of the stack's.
    pub async fn start_with(label: &str, reader_port: Option<u16>, extra: &[(&str, &str)]) -> Self {
        Self::start_with_auth(label, reader_port, &[], extra).await
    }

    /// [`Self::start_with`], with settings of auth's own too (a database, a broker).
    pub async fn start_with_auth(
        label: &str,
        reader_port: Option<u16>,
        auth_extra: &[(&str, &str)],
        extra: &[(&str, &str)],
    ) -> Self {
        let stack = TestStack::from_env();
        let auth = AuthServer::start(&stack, &format!("{label}-auth"), auth_extra).await;
        let log_dir = stack.scratch_dir(label);
        let tasks = start_tasks(&stack, &auth, reader_port, extra, &log_dir).await;
        let edge = ServiceProcess::spawn_edge(
            &[("auth", auth.url("")), ("tasks", tasks.url(""))],
            &log_dir,
        )
        .await;
        Self {
            auth,
            tasks,
            edge,
            client: h2c_client(),
        }
    }

    /// One more tasks instance beside the system's own (not behind the edge), with the same
    /// auth and `extra` settings.
    pub async fn another_tasks(&self, label: &str, extra: &[(&str, &str)]) -> ServiceProcess {
        let stack = TestStack::from_env();
        let log_dir = stack.scratch_dir(label);
        start_tasks(&stack, &self.auth, None, extra, &log_dir).await
    }

    pub async fn user(&self, prefix: &str) -> Session {
        let client = http1_client();
        let mut session = self.auth.signup_and_login(&client, prefix).await;
        session.access_token = format!("Bearer {}", session.access_token);
        session
    }

    pub fn request(&self, user: &Session, method: Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, self.edge.url(path))
            .header("authorization", &user.access_token)
    }

    pub async fn create(&self, user: &Session, body: Value) -> Answer {
        send(self.request(user, Method::POST, "/v1/tasks").json(&body)).await
    }

    pub async fn get(&self, user: &Session, path: &str) -> Answer {
        send(self.request(user, Method::GET, path)).await
    }
}

async fn start_tasks(
    stack: &TestStack,
    auth: &AuthServer,
    reader_port: Option<u16>,
    extra: &[(&str, &str)],
    log_dir: &std::path::Path,
) -> ServiceProcess {
    let mut env = stack.service_env_with_reader("tasks", reader_port.unwrap_or(stack.replica_port));
    env.push(("AUTH_JWKS_URL".into(), auth.url("/v1/auth/jwks")));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut tasks = ServiceProcess::spawn(workspace_binary("tasks"), &env, log_dir);
    tasks.wait_ready().await;
    tasks
}

/// Sends through the edge and checks it answered over HTTP/2.
pub async fn send(request: RequestBuilder) -> Answer {
    let answer = Answer::send(request).await;
    assert_eq!(
        answer.version,
        reqwest::Version::HTTP_2,
        "the edge speaks h2c"
    );
    answer
}

pub fn task_id(answer: &Answer) -> String {
    answer.body["id"].as_str().expect("task id").to_owned()
}

pub fn token(answer: &Answer) -> String {
    answer
        .header("x-consistency-token")
        .expect("consistency token")
        .to_owned()
}
