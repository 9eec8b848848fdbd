//! Due-date reminders on a real stack: auth, tasks, a broker, two notifications instances, and
//! the local push service standing in for the browsers' push services.

mod common;

use std::time::{Duration, Instant};

use common::System;
use local_push::LocalPush;
use reqwest::StatusCode;
use serde_json::{json, Value};
use time::OffsetDateTime;

/// Fast enough for tests: claims 1 s ahead, a dead holder's claims taken 2 s after their time.
const FAST_SCHEDULE: &[(&str, &str)] = &[
    ("REMINDER_LOOKAHEAD_MS", "1000"),
    ("REMINDER_CLAIM_LEASE_MS", "2000"),
    ("REMINDER_POLL_INTERVAL_MS", "200"),
    ("PUSH_POLL_INTERVAL_MS", "100"),
];

fn titles(items: &[Value]) -> Vec<String> {
    let mut titles: Vec<String> = items
        .iter()
        .map(|item| item["title"].as_str().unwrap().to_owned())
        .collect();
    titles.sort();
    titles
}

/// Only "overdue", so each test watches one reminder.
fn overdue_only() -> Value {
    json!({ "due_soon": "off", "overdue": "push", "reminder_lead_minutes": 60, "quiet_hours": null })
}

#[tokio::test]
async fn a_task_due_in_seconds_is_reminded_once_in_the_inbox_and_on_the_device() {
    let push = LocalPush::start().await;
    let system = System::start_with("reminders-once", FAST_SCHEDULE, &[]).await;
    let user = system.user("remind").await;
    let subscription = push.subscribe();
    system.register_device(&user, &subscription.json()).await;
    let mut live = system.connect(1, &user, None).await;
    live.ready().await;

    let due = OffsetDateTime::now_utc() + Duration::from_secs(4);
    let task = system.create_task_due(&user, "Pay rent", due).await;
    let task_id = task["id"].as_str().unwrap();

    // "Due soon" at once (the default lead time is an hour), "overdue" at the due time.
    let delivered = push.wait_delivered(2, Duration::from_secs(30)).await;
    let overdue_arrived = OffsetDateTime::now_utc();
    assert!(
        overdue_arrived >= due,
        "overdue pushed before the due time: {overdue_arrived} < {due}"
    );
    let payloads: Vec<Value> = delivered.iter().map(|d| d.payload_json()).collect();
    let mut pushed_titles: Vec<&str> = payloads
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    pushed_titles.sort();
    assert_eq!(pushed_titles, ["Due soon: Pay rent", "Overdue: Pay rent"]);
    for payload in &payloads {
        assert_eq!(payload["task_id"], task_id);
    }
    let overdue = delivered
        .iter()
        .find(|d| d.payload_json()["kind"] == "task.overdue")
        .unwrap();
    assert_eq!(overdue.urgency.as_deref(), Some("high"));
    assert_eq!(overdue.ttl, 86_400);

    let inbox = system.inbox_with(&user, 2, Duration::from_secs(5)).await;
    assert_eq!(titles(&inbox), ["Due soon: Pay rent", "Overdue: Pay rent"]);
    // The push carries the inbox entry's id.
    let pushed_ids: Vec<&Value> = payloads.iter().map(|p| &p["id"]).collect();
    for item in &inbox {
        assert!(pushed_ids.contains(&&item["id"]), "{item} was not pushed");
    }
    // Live frames announce them too (after the task's own frame).
    let mut live_kinds = Vec::new();
    while live_kinds.len() < 3 {
        live_kinds.push(
            live.next_within(Duration::from_secs(5)).await["type"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(
        live_kinds,
        [
            "task.created",
            "notification.created",
            "notification.created"
        ]
    );

    // Each is published on notifications.notification.v1 (through the outbox), keyed by user.
    let records = test_support::kafka::read_topic(
        &system.broker.bootstrap_servers(),
        "notifications.notification.v1",
        Duration::from_secs(20),
        |records| records.len() >= 2,
    )
    .await;
    assert_eq!(records.len(), 2, "{records:?}");
    for record in &records {
        assert_eq!(
            record.headers.get("ce_type").map(String::as_str),
            Some("io.taskstream.notifications.notification.created.v1")
        );
        assert_eq!(record.key.as_deref(), Some(user.user_id.as_str()));
        assert_eq!(record.payload["delivery"], "push");
        assert!(pushed_ids.contains(&&record.payload["notification_id"]));
    }

    // Once: with two instances sharing the schedule, nothing more comes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(push.delivered().len(), 2, "{:?}", push.attempts());
    assert_eq!(
        system.inbox(&user).await["items"].as_array().unwrap().len(),
        2
    );
    assert!(push.attempts().iter().all(|a| a.rejection.is_none()));
}

#[tokio::test]
async fn the_instance_holding_the_claim_is_killed_and_the_other_fires_it_once() {
    let push = LocalPush::start().await;
    let mut system = System::start_with("reminders-kill", FAST_SCHEDULE, &[]).await;
    let user = system.user("killed").await;
    system.set_preferences(&user, overdue_only()).await;
    let subscription = push.subscribe();
    system.register_device(&user, &subscription.json()).await;

    let due = OffsetDateTime::now_utc() + Duration::from_secs(6);
    let task = system.create_task_due(&user, "Renew passport", due).await;
    let task_id: uuid::Uuid = task["id"].as_str().unwrap().parse().unwrap();

    // Wait for a claim (1 s ahead of the due time), then find whose it is.
    let db = system.notifications_db().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let holder: uuid::Uuid = loop {
        let claimed: Option<Option<uuid::Uuid>> = service_kit::sqlx::query_scalar(
            "SELECT claimed_by FROM reminders WHERE task_id = $1 AND kind = 'task.overdue'",
        )
        .bind(task_id)
        .fetch_optional(&db)
        .await
        .unwrap();
        if let Some(Some(holder)) = claimed {
            break holder;
        }
        assert!(Instant::now() < deadline, "the reminder was never claimed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let holder_index = (0..system.live.len())
        .find(|&i| system.live[i].logs().contains(&holder.to_string()))
        .expect("one instance logged the holder's id");
    assert!(
        OffsetDateTime::now_utc() < due,
        "claimed only after the due time"
    );
    system.live[holder_index].kill();
    let survivor = 1 - holder_index;

    let delivered = push.wait_delivered(1, Duration::from_secs(30)).await;
    let fired_at = OffsetDateTime::now_utc();
    assert!(fired_at >= due);
    assert!(
        fired_at - due < time::Duration::seconds(6),
        "the survivor took over {} after the due time",
        fired_at - due
    );
    assert_eq!(
        delivered[0].payload_json()["title"],
        "Overdue: Renew passport"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(push.delivered().len(), 1, "{:?}", push.attempts());
    let inbox = system
        .authorized_via(
            survivor,
            &user,
            reqwest::Method::GET,
            "/v1/notifications",
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(
        titles(inbox["items"].as_array().unwrap()),
        ["Overdue: Renew passport"]
    );
}

#[tokio::test]
async fn a_moved_or_cleared_due_date_never_fires_the_old_reminder() {
    let push = LocalPush::start().await;
    let system = System::start_with("reminders-moved", FAST_SCHEDULE, &[]).await;
    let user = system.user("moved").await;
    system.set_preferences(&user, overdue_only()).await;
    let subscription = push.subscribe();
    system.register_device(&user, &subscription.json()).await;

    let soon = OffsetDateTime::now_utc() + Duration::from_secs(8);
    let moved = system.create_task_due(&user, "Moved", soon).await;
    let cleared = system.create_task_due(&user, "Cleared", soon).await;
    let finished = system.create_task_due(&user, "Finished", soon).await;
    let deleted = system.create_task_due(&user, "Deleted", soon).await;
    let later = OffsetDateTime::now_utc() + Duration::from_secs(16);
    system
        .patch_task(
            &user,
            moved["id"].as_str().unwrap(),
            json!({ "due_at": common::rfc3339(later) }),
        )
        .await;
    system
        .patch_task(
            &user,
            cleared["id"].as_str().unwrap(),
            json!({ "due_at": null }),
        )
        .await;
    system
        .patch_task(
            &user,
            finished["id"].as_str().unwrap(),
            json!({ "status": "done" }),
        )
        .await;
    system
        .delete_task(&user, deleted["id"].as_str().unwrap())
        .await;

    // Past the old time (and a claim's lease): nothing. (Eight seconds leave the four
    // changes time to land first even on a loaded machine.)
    let until_soon = Duration::try_from(soon - OffsetDateTime::now_utc()).unwrap_or_default();
    tokio::time::sleep(until_soon + Duration::from_secs(4)).await;
    assert!(push.delivered().is_empty(), "{:?}", push.delivered());
    assert!(system.inbox(&user).await["items"]
        .as_array()
        .unwrap()
        .is_empty());

    // The moved one fires at its new time, once.
    let delivered = push.wait_delivered(1, Duration::from_secs(20)).await;
    assert!(OffsetDateTime::now_utc() >= later);
    assert_eq!(delivered[0].payload_json()["title"], "Overdue: Moved");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(push.delivered().len(), 1);
}
