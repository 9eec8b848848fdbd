//! What auth publishes, read from the real broker: an account's registration and profile changes,
//! and the end of each session (logout, a reused refresh token), on `auth.user.v1`, keyed by user
//! id, in order, as CloudEvents of the catalog's types.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use events::catalog::{SessionRevoked, UserRegistered, UserUpdated};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};
use test_support::auth::AuthServer;
use test_support::kafka::{read_topic, read_topic_lingering, Record};
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

const SESSION_REVOKED: &str = "io.taskstream.auth.session.revoked.v1";

/// The session an access token belongs to (its `sid` claim).
fn session_of(access_token: &str) -> String {
    let claims = access_token.split('.').nth(1).expect("a JWT");
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    claims["sid"]
        .as_str()
        .unwrap_or_else(|| panic!("no sid in {claims}"))
        .to_owned()
}

/// How many `session.revoked` events of `user_id` auth's outbox holds: committed with the
/// revocation, so exact as soon as the request was answered.
async fn enqueued_revocations(stack: &TestStack, user_id: &str) -> i64 {
    let (_, url) = stack
        .service_env("auth")
        .into_iter()
        .find(|(name, _)| name == "DATABASE_WRITER_URL")
        .expect("a writer URL");
    let mut conn = PgConnection::connect(&url).await.unwrap();
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE message_key = $1 AND event_type = $2")
        .bind(user_id)
        .bind(SESSION_REVOKED)
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

/// The `session.revoked` events of `user_id` on the topic: read until one is there, then on for a
/// few seconds to catch any that should not be.
async fn published_revocations(stack: &TestStack, user_id: &str) -> Vec<Record> {
    let is_revocation = |record: &Record| {
        record.key.as_deref() == Some(user_id)
            && record.headers.get("ce_type").map(String::as_str) == Some(SESSION_REVOKED)
    };
    read_topic_lingering(
        &stack.broker,
        "auth.user.v1",
        Duration::from_secs(30),
        |records| records.iter().any(is_revocation),
        Duration::from_secs(3),
    )
    .await
    .into_iter()
    .filter(is_revocation)
    .collect()
}

/// One revocation as published: for `user_id`'s session `sid`, for `reason`, its tokens good
/// until the access-token lifetime (900 s) plus the verifiers' leeway (30 s) have passed.
fn assert_revocation(record: &Record, user_id: &str, sid: &str, reason: &str) {
    assert_eq!(record.headers["ce_source"], "/taskstream/auth");
    assert_eq!(record.headers["ce_subject"], user_id);
    let payload = &record.payload;
    assert_eq!(payload["user_id"], user_id, "{payload}");
    assert_eq!(payload["session_id"], sid, "{payload}");
    assert_eq!(payload["reason"], reason, "{payload}");
    let revoked: SessionRevoked = serde_json::from_value(payload.clone()).unwrap();
    assert_eq!(
        revoked.tokens_valid_until - revoked.revoked_at,
        time::Duration::seconds(930),
        "{payload}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_publishes_one_session_revoked_naming_the_session() {
    let stack = TestStack::from_env();
    let auth = AuthServer::start(&stack, "auth-logout-event", &[]).await;
    let client = http1_client();
    let session = auth.signup_and_login(&client, "loggedout").await;
    let sid = session_of(&session.access_token);
    let logout = || {
        client
            .post(auth.url("/v1/auth/logout"))
            .json(&json!({ "refresh_token": session.refresh_token }))
            .send()
    };

    assert_eq!(logout().await.unwrap().status(), 204);
    assert_eq!(enqueued_revocations(&stack, &session.user_id).await, 1);
    // A second logout finds the session ended already: same answer, no event.
    assert_eq!(logout().await.unwrap().status(), 204);
    assert_eq!(enqueued_revocations(&stack, &session.user_id).await, 1);

    let published = published_revocations(&stack, &session.user_id).await;
    assert_eq!(published.len(), 1, "{published:?}");
    assert_revocation(&published[0], &session.user_id, &sid, "logout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_refresh_token_publishes_session_revoked() {
    let stack = TestStack::from_env();
    let auth = AuthServer::start(
        &stack,
        "auth-reuse-event",
        &[("AUTH_REFRESH_REUSE_GRACE_SECS", "0")],
    )
    .await;
    let client = http1_client();
    let session = auth.signup_and_login(&client, "reused").await;
    let sid = session_of(&session.access_token);
    let present = |path: &'static str, token: String| {
        let request = client
            .post(auth.url(path))
            .json(&json!({ "refresh_token": token }));
        async move { request.send().await.unwrap() }
    };

    let rotated = present("/v1/auth/refresh", session.refresh_token.clone()).await;
    assert_eq!(rotated.status(), 200);
    let newest: Value = rotated.json().await.unwrap();
    let newest = newest["refresh_token"].as_str().unwrap().to_owned();
    assert_eq!(enqueued_revocations(&stack, &session.user_id).await, 0);

    let reused = present("/v1/auth/refresh", session.refresh_token.clone()).await;
    assert_eq!(reused.status(), 401);
    assert_eq!(enqueued_revocations(&stack, &session.user_id).await, 1);
    // The session is over: presenting its tokens again, or logging it out, ends nothing more.
    assert_eq!(
        present("/v1/auth/refresh", session.refresh_token.clone())
            .await
            .status(),
        401
    );
    assert_eq!(present("/v1/auth/logout", newest).await.status(), 204);
    assert_eq!(enqueued_revocations(&stack, &session.user_id).await, 1);

    let published = published_revocations(&stack, &session.user_id).await;
    assert_eq!(published.len(), 1, "{published:?}");
    assert_revocation(&published[0], &session.user_id, &sid, "reuse");
}
