//! Deleting an account while its own writes are still under way, on a broker and databases of the
//! test's own with all four services: each account has a backlog of tasks due already (so
//! reminders fire into its inbox), four writers keep creating and changing its tasks straight at
//! tasks, and writing its preferences, inbox and devices straight at notifications, with the
//! still-valid token, and the account is deleted in the middle. Events of the
//! account then reach notifications and analysis before, beside and after `user.deleted` (other
//! topics, other partitions, writes accepted in the second before tokens were refused), and
//! reminders fire meanwhile. Whatever the order, nothing of the account may be left in any table
//! of any service's database.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use test_support::auth::{AuthServer, Session};
use test_support::{http1_client, poll_until, rows_mentioning, workspace_binary};
use test_support::{ServiceProcess, TestStack};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Accounts deleted side by side, each in its own race.
const ACCOUNTS: usize = 3;
/// Tasks each account holds before the race.
const BACKLOG: usize = 30;
/// Writers per account.
const WRITERS: usize = 4;

struct Services {
    /// The test's own broker, stopped when the test ends.
    _broker: test_support::LocalBroker,
    /// The push service the account's devices subscribe at.
    push: local_push::LocalPush,
    auth: AuthServer,
    tasks: ServiceProcess,
    notifications: ServiceProcess,
    analysis: ServiceProcess,
    /// (service, database URL) of each service's scratch database.
    databases: Vec<(&'static str, String)>,
}

async fn start(stack: &TestStack, label: &str) -> Services {
    let broker = stack.scratch_broker(label);
    let bootstrap = broker.bootstrap_servers();
    stack.create_topics(&bootstrap, &events::catalog::topics_to_create(3));
    let log_dir = stack.scratch_dir(label);
    let mut databases = Vec::new();
    let mut env_of = |service: &'static str| {
        let database = stack.scratch_database(service);
        databases.push((service, database[0].1.clone()));
        let mut env = stack.service_env(service);
        env.extend(database);
        env.extend(
            [
                ("KAFKA_BOOTSTRAP_SERVERS", bootstrap.as_str()),
                ("HOUSEKEEPING_INTERVAL_SECS", "1"),
                // The outboxes' published copies of the account's events go within seconds.
                ("OUTBOX_KEEP_PUBLISHED_SECS", "0"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        env
    };
    let auth_env = env_of("auth");
    let auth_settings: Vec<(&str, &str)> = auth_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let auth = AuthServer::start(stack, &format!("{label}-auth"), &auth_settings).await;
    let jwks = ("AUTH_JWKS_URL".to_owned(), auth.url("/v1/auth/jwks"));
    let push = local_push::LocalPush::start().await;
    let vapid = web_push_native::jwt_simple::algorithms::ES256KeyPair::generate();
    let push_env = [
        (
            "PUSH_VAPID_PRIVATE_KEY".to_owned(),
            base64_url(&vapid.to_bytes()),
        ),
        ("PUSH_ALLOW_HTTP_LOOPBACK".to_owned(), "true".to_owned()),
    ];
    let mut spawn = |service: &'static str| {
        let mut env = env_of(service);
        env.push(jwks.clone());
        if service == "notifications" {
            env.extend(push_env.clone());
        }
        ServiceProcess::spawn(workspace_binary(service), &env, &log_dir)
    };
    let (mut tasks, mut notifications, mut analysis) =
        (spawn("tasks"), spawn("notifications"), spawn("analysis"));
    for service in [&mut tasks, &mut notifications, &mut analysis] {
        service.wait_ready().await;
    }
    Services {
        _broker: broker,
        push,
        auth,
        tasks,
        notifications,
        analysis,
        databases,
    }
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn at(offset: time::Duration) -> String {
    (OffsetDateTime::now_utc() + offset)
        .format(&Rfc3339)
        .unwrap()
}

/// A task of `user` due a minute ago (its "overdue" reminder fires at once); `None` once the
/// token is refused.
async fn create_overdue(
    client: &reqwest::Client,
    services: &Services,
    user: &Session,
    title: &str,
) -> Option<Value> {
    let answer = client
        .post(services.tasks.url("/v1/tasks"))
        .bearer_auth(&user.access_token)
        .json(&json!({ "title": title, "due_at": at(time::Duration::minutes(-1)) }))
        .send()
        .await
        .ok()?;
    match answer.status() {
        StatusCode::CREATED => answer.json().await.ok(),
        StatusCode::UNAUTHORIZED => None,
        other => panic!("creating a task answered {other}"),
    }
}

/// Creates and changes `user`'s tasks, and writes its notification preferences, inbox
/// watermark and devices, until the token is refused (or 20 s have passed).
async fn write_until_refused(services: &Services, user: &Session, writer: usize) -> usize {
    let client = http1_client();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut accepted = 0;
    while Instant::now() < deadline {
        let Some(task) = create_overdue(&client, services, user, &format!("w{writer}")).await
        else {
            return accepted;
        };
        accepted += 1;
        let path = format!("/v1/tasks/{}", task["id"].as_str().unwrap());
        let changed = client
            .patch(services.tasks.url(&path))
            .bearer_auth(&user.access_token)
            .header("if-match", "\"1\"")
            .json(&json!({ "status": "in_progress", "due_at": at(time::Duration::minutes(-2)) }))
            .send()
            .await;
        match changed.map(|answer| answer.status()) {
            Ok(StatusCode::OK) => accepted += 1,
            // Refused, or erased already (the erasure sweeps the tasks made meanwhile).
            Ok(StatusCode::UNAUTHORIZED | StatusCode::NOT_FOUND) => return accepted,
            other => panic!("changing a task answered {other:?}"),
        }
        // Writes of the account's own in notifications: its preferences, its inbox watermark.
        let notifications = [
            client
                .put(services.notifications.url("/v1/notifications/preferences"))
                .json(
                    &json!({ "due_soon": "inbox", "overdue": "push", "reminder_lead_minutes": 30 }),
                ),
            client.post(services.notifications.url("/v1/notifications/read-all")),
        ];
        // And a device (after the tenth, the account's limit answers 409).
        let device = client
            .post(services.notifications.url("/v1/notifications/devices"))
            .json(&services.push.subscribe().json());
        for request in notifications.into_iter().chain([device]) {
            let answer = request.bearer_auth(&user.access_token).send().await;
            match answer.map(|answer| answer.status()) {
                Ok(StatusCode::OK | StatusCode::CREATED) => accepted += 1,
                Ok(StatusCode::CONFLICT) => {}
                Ok(StatusCode::UNAUTHORIZED) => return accepted,
                other => panic!("a notifications write answered {other:?}"),
            }
        }
    }
    accepted
}

/// Every table of every service still holding `user`'s id, as `service.table: rows`.
fn left_of(services: &Services, user: &Session) -> Vec<String> {
    services
        .databases
        .iter()
        .flat_map(|(service, url)| {
            rows_mentioning(url, &user.user_id)
                .into_iter()
                .map(move |(table, rows)| format!("{service}.{table}: {rows}"))
        })
        .collect()
}

/// One race: the account's writers under way, the deletion `delete_after` into it. Returns the
/// writes accepted.
async fn race(services: &Services, user: &Session, delete_after: Duration) -> usize {
    let writers = futures_util::future::join_all(
        (0..WRITERS).map(|writer| write_until_refused(services, user, writer)),
    );
    let delete = async {
        tokio::time::sleep(delete_after).await;
        let deleted = http1_client()
            .delete(services.auth.url("/v1/users/me"))
            .bearer_auth(&user.access_token)
            .json(&json!({ "password": user.password }))
            .send()
            .await
            .unwrap();
        assert_eq!(deleted.status(), 204, "{}", deleted.text().await.unwrap());
    };
    let (accepted, ()) = tokio::join!(writers, delete);
    accepted.into_iter().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_account_deleted_amid_its_own_writes_leaves_nothing_in_any_service() {
    let stack = TestStack::from_env();
    let services = start(&stack, "erasure-race").await;
    let client = http1_client();
    let mut users = Vec::new();
    for _ in 0..ACCOUNTS {
        users.push(services.auth.signup_and_login(&client, "erased").await);
    }
    for user in &users {
        for n in 0..BACKLOG {
            let created = create_overdue(&client, &services, user, &format!("backlog {n}")).await;
            assert!(created.is_some(), "backlog task {n} created");
        }
    }
    // The backlog has reached notifications (reminders fired into the inbox) and analysis, so
    // each erasure has real work to do, not only the racing writes.
    for user in &users {
        let reached = poll_until(
            Duration::from_secs(60),
            || async { left_of(&services, user) },
            |left| {
                ["notifications.notifications", "analysis.task_analysis"]
                    .iter()
                    .all(|table| left.iter().any(|row| row.starts_with(table)))
            },
        )
        .await;
        assert!(
            reached
                .iter()
                .any(|row| row.starts_with("notifications.notifications"))
                && reached
                    .iter()
                    .any(|row| row.starts_with("analysis.task_analysis")),
            "the backlog did not reach notifications and analysis: {reached:?}"
        );
    }

    let races = users
        .iter()
        .enumerate()
        .map(|(n, user)| race(&services, user, Duration::from_millis(300 + 400 * n as u64)));
    let accepted = futures_util::future::join_all(races).await;
    let deleted_at = Instant::now();

    // Tasks erases in batches and keeps sweeping for its grace period (20 s) after the deletion,
    // housekeeping removes the outboxes' published copies every second: well within 90 s.
    let mut left = Vec::new();
    for (n, user) in users.iter().enumerate() {
        let remaining = poll_until(
            Duration::from_secs(90).saturating_sub(deleted_at.elapsed()),
            || async { left_of(&services, user) },
            Vec::is_empty,
        )
        .await;
        left.extend(
            remaining
                .into_iter()
                .map(|row| format!("account {n}: {row}")),
        );
    }
    println!(
        "{ACCOUNTS} accounts deleted amid their writes ({accepted:?} writes accepted in the \
         races); checked until {:?} after: {} tables with rows left",
        deleted_at.elapsed(),
        left.len()
    );
    assert!(
        left.is_empty(),
        "rows still naming a deleted account {:?} after the deletion: {left:?}",
        deleted_at.elapsed()
    );
    // The services are still healthy, the consumers included.
    for service in [&services.tasks, &services.notifications, &services.analysis] {
        let ready = client.get(service.url("/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 200);
    }
}
