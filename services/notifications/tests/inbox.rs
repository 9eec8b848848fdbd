//! The inbox and the preferences through the edge, on a real stack.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::System;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use time::OffsetDateTime;

const FAST: &[(&str, &str)] = &[("REMINDER_POLL_INTERVAL_MS", "100")];

#[tokio::test]
async fn pages_never_overlap_mark_all_read_is_exact_at_once_and_others_see_nothing() {
    let system = System::start_with("inbox-pages", FAST, &[]).await;
    let user = system.user("inbox").await;
    let stranger = system.user("stranger").await;
    let past = OffsetDateTime::now_utc() - Duration::from_secs(3600);
    for n in 0..25 {
        system
            .create_task_due(&user, &format!("Task {n}"), past)
            .await;
    }
    system.inbox_with(&user, 20, Duration::from_secs(20)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let count = system
            .authorized(
                &user,
                Method::GET,
                "/v1/notifications/unread-count",
                None,
                StatusCode::OK,
            )
            .await["unread_count"]
            .as_i64()
            .unwrap();
        if count == 25 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "unread {count} of 25");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Keyset pages of 10: 10 + 10 + 5, newest first, no id twice.
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            None => "/v1/notifications?limit=10".to_owned(),
            Some(cursor) => format!("/v1/notifications?limit=10&cursor={cursor}"),
        };
        let page = system
            .authorized(&user, Method::GET, &path, None, StatusCode::OK)
            .await;
        pages += 1;
        let items = page["items"].as_array().unwrap();
        ids.extend(
            items
                .iter()
                .map(|item| item["id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(ids.len(), 25);
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        25,
        "a page overlapped"
    );
    let mut sorted = ids.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(ids, sorted, "newest first");

    // Mark one read, then all: the count is exact in the answer and in the next read.
    let one = &ids[3];
    let after_one = system
        .authorized(
            &user,
            Method::POST,
            &format!("/v1/notifications/{one}/read"),
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(after_one["unread_count"], 24);
    let after_all = system
        .authorized(
            &user,
            Method::POST,
            "/v1/notifications/read-all",
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(after_all["unread_count"], 0);
    let page = system.inbox(&user).await;
    assert_eq!(page["unread_count"], 0);
    assert!(page["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|item| item["read"] == true));
    let unread_only = system
        .authorized(
            &user,
            Method::GET,
            "/v1/notifications?unread=true",
            None,
            StatusCode::OK,
        )
        .await;
    assert!(unread_only["items"].as_array().unwrap().is_empty());

    // A new notification after that is unread again.
    system.create_task_due(&user, "Later", past).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while system.inbox(&user).await["unread_count"] != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the new notification is not unread"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        system.inbox(&user).await["items"][0]["title"],
        "Overdue: Later"
    );

    // Another account: its inbox is empty, and every route on these ids says 404.
    let theirs = system.inbox(&stranger).await;
    assert!(theirs["items"].as_array().unwrap().is_empty());
    assert_eq!(theirs["unread_count"], 0);
    for (method, path) in [
        (Method::POST, format!("/v1/notifications/{one}/read")),
        (Method::DELETE, format!("/v1/notifications/{one}")),
    ] {
        system
            .authorized(&stranger, method, &path, None, StatusCode::NOT_FOUND)
            .await;
    }
    // Their cursor from our ids shows them nothing of ours.
    let probe = system
        .authorized(
            &stranger,
            Method::GET,
            &format!("/v1/notifications?cursor={}", ids[0]),
            None,
            StatusCode::OK,
        )
        .await;
    assert!(probe["items"].as_array().unwrap().is_empty());

    // Delete: gone from the inbox.
    system
        .authorized(
            &user,
            Method::DELETE,
            &format!("/v1/notifications/{one}"),
            None,
            StatusCode::NO_CONTENT,
        )
        .await;
    system
        .authorized(
            &user,
            Method::DELETE,
            &format!("/v1/notifications/{one}"),
            None,
            StatusCode::NOT_FOUND,
        )
        .await;

    // Bad input: named, never a 500.
    for path in [
        "/v1/notifications?limit=0",
        "/v1/notifications?limit=101",
        "/v1/notifications?cursor=nope",
        "/v1/notifications?colour=red",
    ] {
        let error = system
            .authorized(&user, Method::GET, path, None, StatusCode::BAD_REQUEST)
            .await;
        assert!(error["error"]["message"].is_string(), "{path}: {error}");
    }
    system
        .authorized(
            &user,
            Method::POST,
            "/v1/notifications/not-a-uuid/read",
            None,
            StatusCode::BAD_REQUEST,
        )
        .await;
    system
        .call(
            Method::GET,
            "/v1/notifications",
            None,
            None,
            StatusCode::UNAUTHORIZED,
        )
        .await;
}

#[tokio::test]
async fn preferences_are_checked_and_decide_what_is_notified() {
    let system = System::start_with("inbox-preferences", FAST, &[]).await;
    let user = system.user("prefs").await;
    let defaults = system
        .authorized(
            &user,
            Method::GET,
            "/v1/notifications/preferences",
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(
        defaults,
        json!({ "due_soon": "push", "overdue": "push", "reminder_lead_minutes": 60, "quiet_hours": null })
    );

    let wanted = json!({
        "due_soon": "inbox",
        "overdue": "off",
        "reminder_lead_minutes": 30,
        "quiet_hours": { "start": "22:00", "end": "07:00", "time_zone": "Europe/Berlin" }
    });
    system.set_preferences(&user, wanted.clone()).await;
    let saved = system
        .authorized(
            &user,
            Method::GET,
            "/v1/notifications/preferences",
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(saved, wanted);

    for (body, field) in [
        (
            json!({ "due_soon": "push", "overdue": "push", "reminder_lead_minutes": 0, "quiet_hours": null }),
            "reminder_lead_minutes",
        ),
        (
            json!({ "due_soon": "push", "overdue": "push", "reminder_lead_minutes": 60,
                 "quiet_hours": { "start": "22:00", "end": "22:00", "time_zone": "UTC" } }),
            "quiet_hours",
        ),
        (
            json!({ "due_soon": "push", "overdue": "push", "reminder_lead_minutes": 60,
                 "quiet_hours": { "start": "22:00", "end": "07:00", "time_zone": "Mars/Olympus" } }),
            "quiet_hours",
        ),
        // An array is not the object the document says, even in field order.
        (
            json!({ "due_soon": "push", "overdue": "push", "reminder_lead_minutes": 60,
                 "quiet_hours": ["22:00", "07:00", "UTC"] }),
            "quiet_hours",
        ),
        (
            json!({ "due_soon": "push", "overdue": "push", "reminder_lead_minutes": 60,
                 "quiet_hours": { "start": "22:00", "end": "07:00", "time_zone": "UTC\u{0}" } }),
            "quiet_hours.time_zone",
        ),
    ] {
        let error = system
            .authorized(
                &user,
                Method::PUT,
                "/v1/notifications/preferences",
                Some(body),
                StatusCode::BAD_REQUEST,
            )
            .await;
        assert_eq!(error["error"]["details"][0]["field"], field, "{error}");
    }
    let unknown_kind = system
        .authorized(
            &user,
            Method::PUT,
            "/v1/notifications/preferences",
            Some(json!({ "due_soon": "loud", "overdue": "push", "reminder_lead_minutes": 60, "quiet_hours": null })),
            StatusCode::BAD_REQUEST,
        )
        .await;
    assert_eq!(unknown_kind["error"]["code"], "invalid_body");

    // "overdue" off, "due soon" inbox-only: a task due in 10 minutes (within the 30-minute lead)
    // gives "due soon" at once, and an overdue one gives nothing.
    system
        .create_task_due(
            &user,
            "Soon",
            OffsetDateTime::now_utc() + Duration::from_secs(600),
        )
        .await;
    system
        .create_task_due(
            &user,
            "Late",
            OffsetDateTime::now_utc() - Duration::from_secs(600),
        )
        .await;
    let items = system.inbox_with(&user, 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let items_now: Vec<Value> = system.inbox(&user).await["items"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(items_now.len(), 1, "{items_now:?}");
    assert_eq!(items[0]["title"], "Due soon: Soon");
    assert_eq!(items[0]["kind"], "task.due_soon");
}

#[tokio::test]
async fn a_deleted_account_leaves_no_inbox_schedule_preferences_or_devices() {
    let push = local_push::LocalPush::start().await;
    let system = System::start_with("inbox-erasure", FAST, &[]).await;
    let user = system.user("leaving").await;
    system
        .set_preferences(
            &user,
            json!({ "due_soon": "inbox", "overdue": "push", "reminder_lead_minutes": 15, "quiet_hours": null }),
        )
        .await;
    system
        .register_device(&user, &push.subscribe().json())
        .await;
    let now = OffsetDateTime::now_utc();
    system
        .create_task_due(&user, "Past", now - Duration::from_secs(60))
        .await;
    system
        .create_task_due(&user, "Next week", now + Duration::from_secs(7 * 86_400))
        .await;
    system.inbox_with(&user, 1, Duration::from_secs(10)).await;
    push.wait_delivered(1, Duration::from_secs(10)).await;

    let db = system.notifications_db().await;
    let user_id: uuid::Uuid = user.user_id.parse().unwrap();
    let rows = |db: service_kit::sqlx::PgPool| async move {
        service_kit::sqlx::query_scalar::<_, i64>(
            "SELECT (SELECT count(*) FROM notifications WHERE user_id = $1) \
                  + (SELECT count(*) FROM reminders WHERE user_id = $1) \
                  + (SELECT count(*) FROM notification_preferences WHERE user_id = $1) \
                  + (SELECT count(*) FROM push_subscriptions WHERE user_id = $1)",
        )
        .bind(user_id)
        .fetch_one(&db)
        .await
        .unwrap()
    };
    assert!(
        rows(db.clone()).await >= 5,
        "the account's data is there first"
    );

    system
        .authorized(
            &user,
            Method::DELETE,
            "/v1/users/me",
            Some(json!({ "password": user.password })),
            StatusCode::NO_CONTENT,
        )
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = rows(db.clone()).await;
        if left == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{left} rows of the deleted account remain"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
