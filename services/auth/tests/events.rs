//! What auth publishes, read from the real broker: an account's registration and profile changes
//! on `auth.user.v1`, keyed by user id, in order, as CloudEvents of the catalog's types.

use std::time::Duration;

use events::catalog::{UserRegistered, UserUpdated};
use serde_json::json;
use test_support::auth::AuthServer;
use test_support::kafka::{read_topic, Record};
use test_support::{http1_client, TestStack};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_and_profile_changes_are_published_in_order() {
    let stack = TestStack::from_env();
    let auth = AuthServer::start(&stack, "auth-events", &[]).await;
    let client = http1_client();
    let session = auth.signup_and_login(&client, "evented").await;
    let changed = client
        .patch(auth.url("/v1/users/me"))
        .bearer_auth(&session.access_token)
        .json(&json!({ "nickname": "Evented" }))
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), 200);

    let is_mine = |record: &Record| record.key.as_deref() == Some(session.user_id.as_str());
    let records = read_topic(
        &stack.broker,
        "auth.user.v1",
        Duration::from_secs(30),
        |records| records.iter().filter(|record| is_mine(record)).count() >= 2,
    )
    .await;
    let mine: Vec<&Record> = records.iter().filter(|record| is_mine(record)).collect();
    assert_eq!(mine.len(), 2, "{records:?}");
    assert_eq!(
        mine[0].headers["ce_type"],
        "io.taskstream.auth.user.registered.v1"
    );
    assert_eq!(
        mine[1].headers["ce_type"],
        "io.taskstream.auth.user.updated.v1"
    );
    for record in &mine {
        assert_eq!(record.headers["ce_source"], "/taskstream/auth");
        assert_eq!(record.headers["ce_subject"], session.user_id);
    }
    let registered: UserRegistered = serde_json::from_value(mine[0].payload.clone()).unwrap();
    assert_eq!(registered.username, session.username);
    let updated: UserUpdated = serde_json::from_value(mine[1].payload.clone()).unwrap();
    assert_eq!(updated.nickname.as_deref(), Some("Evented"));
    assert!(
        !String::from_utf8_lossy(&mine[0].raw_payload).contains(&session.password),
        "no secret in the event"
    );
}
