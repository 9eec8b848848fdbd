//! The live endpoint refuses what it must, before and after the upgrade, with documented codes.

mod common;

use std::time::Duration;

use common::{Device, System};
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn refuses_bad_handshakes_and_bad_frames_with_documented_codes() {
    let system = System::start_with(
        "live-protocol",
        &[
            ("LIVE_ALLOWED_ORIGINS", "https://app.example.com"),
            ("LIVE_AUTH_TIMEOUT_MS", "500"),
            ("LIVE_MAX_CONNECTIONS_PER_USER", "2"),
        ],
        &[],
    )
    .await;
    let alice = system.user("alice").await;
    let url = system.live_url(0, None);

    // Before the upgrade: JSON errors.
    let (status, body) = Device::connect(&url, Some("not-a-token"))
        .await
        .err()
        .unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("invalid_token"), "{body}");
    let evil = [("origin", "https://evil.example.net")];
    let (status, body) = Device::connect_with(&url, Some(&alice.access_token), &evil)
        .await
        .err()
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("origin_not_allowed"), "{body}");
    let allowed = [("origin", "https://app.example.com")];
    let mut device = Device::connect_with(&url, Some(&alice.access_token), &allowed)
        .await
        .unwrap();
    device.ready().await;
    let plain = system
        .client
        .get(system.edges[0].url("/v1/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 426);
    let bad_since = system.live_url(0, None) + "?since=-3";
    let (status, _) = Device::connect(&bad_since, Some(&alice.access_token))
        .await
        .err()
        .unwrap();
    assert_eq!(status, 400);
    let _second = system.connect(0, &alice, None).await;
    let (status, body) = Device::connect(&url, Some(&alice.access_token))
        .await
        .err()
        .unwrap();
    assert_eq!(status, 429, "{body}");
    drop(device);
    drop(_second);

    // Token in the first frame instead of the handshake.
    let mut device = Device::connect(&url, None).await.unwrap();
    device
        .send(json!({ "type": "auth", "token": alice.access_token }))
        .await;
    assert_eq!(device.ready().await["seq"], 0);
    // No token in time, a bad first frame: 4001.
    let mut silent = Device::connect(&url, None).await.unwrap();
    assert_eq!(silent.close_code(Duration::from_secs(5)).await, 4001);
    let mut wrong = Device::connect(&url, None).await.unwrap();
    wrong
        .send(json!({ "type": "auth", "token": "forged" }))
        .await;
    assert_eq!(wrong.close_code(Duration::from_secs(5)).await, 4001);

    // After the upgrade: binary → 1003, oversized → 1009, not this protocol → 1002.
    let mut binary = system.connect(0, &alice, None).await;
    binary.ready().await;
    binary
        .socket
        .send(Message::binary(vec![1, 2, 3]))
        .await
        .unwrap();
    assert_eq!(binary.close_code(Duration::from_secs(5)).await, 1003);
    device
        .socket
        .send(Message::text("x".repeat(100_000)))
        .await
        .unwrap();
    assert_eq!(device.close_code(Duration::from_secs(5)).await, 1009);
    let mut garbled = system.connect(0, &alice, None).await;
    garbled.ready().await;
    garbled
        .socket
        .send(Message::text("{\"type\":\"subscribe\"}"))
        .await
        .unwrap();
    assert_eq!(garbled.close_code(Duration::from_secs(5)).await, 1002);
}

#[tokio::test]
async fn idle_clients_are_pinged_and_closed_when_they_stop_answering() {
    let system = System::start_with(
        "live-idle",
        &[
            ("LIVE_PING_INTERVAL_MS", "200"),
            ("LIVE_IDLE_TIMEOUT_MS", "1000"),
        ],
        &[],
    )
    .await;
    let alice = system.user("alice").await;
    // tungstenite answers pings while it is read: this device stays.
    let mut reading = Device::connect(&system.direct_live_url(0), Some(&alice.access_token))
        .await
        .unwrap();
    reading.ready().await;
    reading.quiet_for(Duration::from_secs(2)).await;
    let id = system.create_task(&alice, "still open").await;
    assert_eq!(reading.next().await["id"], id.as_str());
    // One that is not read sends no pongs: 4002 once it reads again. Straight to the instance
    // (live_limits.rs has the same through the edge, which passes pings and pongs through).
    let idle = Device::connect(&system.direct_live_url(0), Some(&alice.access_token))
        .await
        .unwrap();
    // Meanwhile the reading device answers its pings.
    reading.quiet_for(Duration::from_secs(3)).await;
    // The server closed it as idle (the client may not get to read the close frame: answering
    // the pings it has not read yet, it writes to a connection the server has already closed).
    let metrics = test_support::metrics_text(&system.client, &system.live[0].url("/metrics")).await;
    let idle_closes: Vec<&str> = metrics
        .lines()
        .filter(|line| line.starts_with("live_closes_total{") && line.contains("reason=\"idle\""))
        .collect();
    assert_eq!(idle_closes.len(), 1, "{metrics}");
    assert!(
        idle_closes[0].ends_with(" 1"),
        "only the unread one: {idle_closes:?}"
    );
    drop(idle);
    let id = system.create_task(&alice, "reading one still open").await;
    assert_eq!(reading.next().await["id"], id.as_str());
}
