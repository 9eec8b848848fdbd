//! Web Push deliveries against the local push service: what each answer of a push service
//! leads to, and an outage that loses nothing.

mod common;

use std::time::Duration;

use common::System;
use local_push::{Answer, LocalPush};
use reqwest::StatusCode;
use serde_json::json;
use time::OffsetDateTime;

/// Retries quick enough for a test: 300 ms doubling, at most 2 s apart.
const FAST_PUSH: &[(&str, &str)] = &[
    ("REMINDER_POLL_INTERVAL_MS", "200"),
    ("PUSH_POLL_INTERVAL_MS", "100"),
    ("PUSH_RETRY_BASE_MS", "300"),
    ("PUSH_RETRY_MAX_MS", "2000"),
    ("PUSH_MAX_ATTEMPTS", "40"),
];

#[tokio::test]
async fn gone_forgets_the_device_429_waits_as_asked_and_500_backs_off() {
    let push = LocalPush::start().await;
    let system = System::start_with("push-answers", FAST_PUSH, &[]).await;

    // 410: the subscription is deleted, and not tried again.
    let gone_user = system.user("gone").await;
    let gone = push.subscribe();
    system.register_device(&gone_user, &gone.json()).await;
    push.answer_next([Answer::Gone]);
    system.create_overdue_task(&gone_user, "Gone").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !system.devices(&gone_user).await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "the device was kept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(push.attempts().len(), 1);
    // The notification stays in the inbox.
    system
        .inbox_with(&gone_user, 1, Duration::from_secs(5))
        .await;

    // 429 with Retry-After: 2 → the next attempt no sooner than 2 s later, then delivered once.
    let busy_user = system.user("busy").await;
    let busy = push.subscribe();
    system.register_device(&busy_user, &busy.json()).await;
    push.answer_next([Answer::TooManyRequests {
        retry_after_secs: 2,
    }]);
    system.create_overdue_task(&busy_user, "Busy").await;
    let delivered = push.wait_delivered(1, Duration::from_secs(20)).await;
    let attempts: Vec<_> = push
        .attempts()
        .into_iter()
        .filter(|a| a.endpoint == busy.endpoint)
        .collect();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0].status, 429);
    let waited = attempts[1].at - attempts[0].at;
    assert!(waited >= Duration::from_secs(2), "retried after {waited:?}");
    assert_eq!(delivered[0].payload_json()["title"], "Overdue: Busy");

    // 500 twice → retried with growing waits (300 ms, then 600 ms), then delivered once.
    let failing_user = system.user("failing").await;
    let failing = push.subscribe();
    system.register_device(&failing_user, &failing.json()).await;
    push.answer_next([Answer::ServerError, Answer::ServerError]);
    system.create_overdue_task(&failing_user, "Failing").await;
    push.wait_delivered(2, Duration::from_secs(20)).await;
    let attempts: Vec<_> = push
        .attempts()
        .into_iter()
        .filter(|a| a.endpoint == failing.endpoint)
        .collect();
    assert_eq!(
        attempts.iter().map(|a| a.status).collect::<Vec<_>>(),
        [500, 500, 201]
    );
    let first_wait = attempts[1].at - attempts[0].at;
    let second_wait = attempts[2].at - attempts[1].at;
    assert!(first_wait >= Duration::from_millis(300), "{first_wait:?}");
    assert!(second_wait >= Duration::from_millis(600), "{second_wait:?}");
    assert!(second_wait > first_wait);

    // Nothing was sent twice, and every request passed the push service's checks.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(push.delivered().len(), 2);
    // Every request passed the VAPID, TTL and decryption checks (only the scripted answers
    // refused).
    assert!(
        push.attempts().iter().all(|a| a
            .rejection
            .as_deref()
            .is_none_or(|r| r.starts_with("scripted"))),
        "{:?}",
        push.attempts()
    );
}

#[tokio::test]
async fn pushes_made_while_the_push_service_is_down_30s_are_all_delivered_once_after() {
    let push = LocalPush::start().await;
    let system = System::start_with("push-outage", FAST_PUSH, &[]).await;
    let user = system.user("outage").await;
    let phone = push.subscribe();
    let laptop = push.subscribe();
    system.register_device(&user, &phone.json()).await;
    system.register_device(&user, &laptop.json()).await;

    push.go_down().await;
    for title in ["One", "Two", "Three"] {
        system.create_overdue_task(&user, title).await;
    }
    system.inbox_with(&user, 3, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(push.delivered().is_empty());
    push.come_up().await;

    // 3 notifications × 2 devices, each exactly once, within the retry cap after it is back.
    let delivered = push.wait_delivered(6, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let delivered_now = push.delivered();
    assert_eq!(delivered_now.len(), 6, "{delivered_now:?}");
    let mut seen: Vec<(String, String)> = delivered
        .iter()
        .map(|d| {
            (
                d.endpoint.clone(),
                d.payload_json()["title"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 6, "a push arrived twice: {seen:?}");
}

#[tokio::test]
async fn devices_are_checked_bounded_and_private_to_their_account() {
    let push = LocalPush::start().await;
    let system =
        System::start_with("push-devices", &[("PUSH_MAX_DEVICES_PER_USER", "2")], &[]).await;
    let user = system.user("devices").await;
    let other = system.user("other").await;

    // The VAPID key is public.
    let key = system
        .call(
            reqwest::Method::GET,
            "/v1/notifications/push-key",
            None,
            None,
            StatusCode::OK,
        )
        .await;
    assert_eq!(key["public_key"].as_str().unwrap().len(), 87);

    // Broken fields are each named.
    let broken = system
        .authorized(
            &user,
            reqwest::Method::POST,
            "/v1/notifications/devices",
            Some(json!({
                "endpoint": "http://push.example.com/x",
                "keys": { "p256dh": "AAAA", "auth": "short" }
            })),
            StatusCode::BAD_REQUEST,
        )
        .await;
    let fields: Vec<&str> = broken["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["endpoint", "keys.p256dh", "keys.auth"]);

    // As browsers hand it out (with `expirationTime`), twice: one device.
    let mut browser = push.subscribe().json();
    browser["expirationTime"] = serde_json::Value::Null;
    let first = system.register_device(&user, &browser).await;
    let again = system
        .authorized(
            &user,
            reqwest::Method::POST,
            "/v1/notifications/devices",
            Some(browser.clone()),
            StatusCode::OK,
        )
        .await;
    assert_eq!(first["id"], again["id"]);
    system
        .register_device(&user, &push.subscribe().json())
        .await;
    let over = system
        .authorized(
            &user,
            reqwest::Method::POST,
            "/v1/notifications/devices",
            Some(push.subscribe().json()),
            StatusCode::CONFLICT,
        )
        .await;
    assert_eq!(over["error"]["code"], "too_many_devices");

    // Another account sees none of them and cannot delete them.
    assert!(system.devices(&other).await.is_empty());
    let path = format!(
        "/v1/notifications/devices/{}",
        first["id"].as_str().unwrap()
    );
    system
        .authorized(
            &other,
            reqwest::Method::DELETE,
            &path,
            None,
            StatusCode::NOT_FOUND,
        )
        .await;
    system
        .authorized(
            &user,
            reqwest::Method::DELETE,
            &path,
            None,
            StatusCode::NO_CONTENT,
        )
        .await;
    assert_eq!(system.devices(&user).await.len(), 1);
}

#[tokio::test]
async fn quiet_hours_hold_the_push_but_not_the_inbox() {
    let push = LocalPush::start().await;
    let system = System::start_with("push-quiet", FAST_PUSH, &[]).await;
    let user = system.user("sleeper").await;
    system
        .register_device(&user, &push.subscribe().json())
        .await;
    // Quiet from an hour ago until two hours from now, in UTC.
    let now = OffsetDateTime::now_utc();
    let hh_mm = |at: OffsetDateTime| format!("{:02}:{:02}", at.hour(), at.minute());
    let end = now + Duration::from_secs(2 * 3600);
    system
        .set_preferences(
            &user,
            json!({
                "due_soon": "push", "overdue": "push", "reminder_lead_minutes": 60,
                "quiet_hours": { "start": hh_mm(now - Duration::from_secs(3600)), "end": hh_mm(end), "time_zone": "UTC" }
            }),
        )
        .await;
    system.create_overdue_task(&user, "At night").await;
    system.inbox_with(&user, 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(push.attempts().is_empty(), "{:?}", push.attempts());

    // The push waits, pending, for the end of the quiet hours.
    let db = system.notifications_db().await;
    let (state, release): (String, OffsetDateTime) =
        service_kit::sqlx::query_as("SELECT state, next_attempt_at FROM push_deliveries")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(state, "pending");
    let expected = end
        .replace_second(0)
        .unwrap()
        .replace_nanosecond(0)
        .unwrap();
    assert_eq!(release, expected);
}
