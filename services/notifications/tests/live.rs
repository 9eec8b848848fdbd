//! Live updates end to end: tasks through the edge, the broker, the feed, two notifications
//! instances, WebSockets through the edges.

mod common;

use std::time::{Duration, Instant};

use common::{Device, System};
use serde_json::{json, Value};

fn frames_of(frames: &[Value]) -> Vec<(i64, String)> {
    frames
        .iter()
        .map(|frame| {
            (
                frame["seq"].as_i64().unwrap(),
                frame["type"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn both_devices_on_two_instances_get_every_change_in_order_and_others_nothing() {
    let system = System::start("live-devices").await;
    let alice = system.user("alice").await;
    let bob = system.user("bob").await;
    let mut phone = system.connect(0, &alice, None).await;
    let mut laptop = system.connect(1, &alice, None).await;
    let mut other = system.connect(0, &bob, None).await;
    for device in [&mut phone, &mut laptop, &mut other] {
        let ready = device.ready().await;
        assert_eq!(ready["seq"], 0, "{ready}");
        assert!(
            ready.get("recovered").is_none(),
            "no since, no recovery: {ready}"
        );
    }

    let id = system.create_task(&alice, "buy milk").await;
    system.rename_task(&alice, &id, 1, "buy oat milk").await;
    system.delete_task(&alice, &id).await;

    for device in [&mut phone, &mut laptop] {
        let frames = vec![
            device.next().await,
            device.next().await,
            device.next().await,
        ];
        assert_eq!(
            frames_of(&frames),
            [
                (1, "task.created".to_owned()),
                (2, "task.updated".to_owned()),
                (3, "task.deleted".to_owned())
            ]
        );
        for (frame, version) in frames.iter().zip([1, 2, 2]) {
            assert_eq!(frame["id"], id.as_str());
            assert_eq!(frame["version"], version, "{frame}");
            assert!(frame["at"].is_string());
            let keys: Vec<&String> = frame.as_object().unwrap().keys().collect();
            assert_eq!(
                keys,
                ["at", "id", "seq", "type", "version"],
                "small frames only"
            );
        }
    }
    other.quiet_for(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_device_that_reconnects_elsewhere_gets_exactly_what_it_missed() {
    let system = System::start_with("live-recovery", &[("LIVE_FEED_MAX_ENTRIES", "60")], &[]).await;
    let alice = system.user("alice").await;
    let mut device = system.connect(0, &alice, None).await;
    device.ready().await;
    let id = system.create_task(&alice, "v1").await;
    assert_eq!(device.next().await["seq"], 1);
    drop(device);

    for version in 1..=50 {
        system
            .rename_task(&alice, &id, version, &format!("v{}", version + 1))
            .await;
    }
    // Back on the other instance, from the last frame it saw.
    let mut device = system.connect(1, &alice, Some(1)).await;
    let ready = device.ready().await;
    assert_eq!(ready["recovered"], true, "{ready}");
    let mut seqs = Vec::new();
    for _ in 0..50 {
        let frame = device.next().await;
        assert_eq!(frame["type"], "task.updated");
        seqs.push(frame["seq"].as_i64().unwrap());
    }
    assert_eq!(
        seqs,
        (2..=51).collect::<Vec<_>>(),
        "exactly the 50 missed, in order"
    );
    system.rename_task(&alice, &id, 51, "live").await;
    let live = device.next().await;
    assert_eq!(
        (live["seq"].as_i64(), live["version"].as_i64()),
        (Some(52), Some(52))
    );
    drop(device);

    // 70 more while away: the feed keeps the newest 60, so 53..62 are gone. Another device
    // shows when all of them are in the feed.
    let mut observer = system.connect(1, &alice, None).await;
    observer.ready().await;
    for version in 52..122 {
        system
            .rename_task(&alice, &id, version, &format!("v{}", version + 1))
            .await;
    }
    for seq in 53..=122 {
        assert_eq!(observer.next().await["seq"], seq);
    }
    let mut device = system.connect(0, &alice, Some(52)).await;
    let ready = device.ready().await;
    assert_eq!(
        ready["recovered"], false,
        "never a false recovered: true: {ready}"
    );
    assert_eq!(ready["seq"], 122, "{ready}");
    // After a failed recovery the client resyncs; live frames go on from the head.
    system.rename_task(&alice, &id, 122, "after").await;
    assert_eq!(device.next().await["seq"], 123);

    // A sequence this feed never handed out is not recovered either.
    let mut device = system.connect(1, &alice, Some(5_000)).await;
    assert_eq!(device.ready().await["recovered"], false);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_while_the_others_keep_their_pace() {
    let system = System::start("live-slow").await;
    let alice = system.user("alice").await;
    let bob = system.user("bob").await;
    let mut slow = system.connect(0, &alice, None).await;
    let mut fast = system.connect(0, &alice, None).await;
    let mut bystander = system.connect(0, &bob, None).await;
    for device in [&mut slow, &mut fast, &mut bystander] {
        device.ready().await;
    }
    let bystander_task = system.create_task(&bob, "pace").await;
    bystander.next().await;

    // Bob's device's latency, quiet and then while 10,000 events flow for Alice.
    let quiet = latencies(&system, &bob, &bystander_task, &mut bystander, 1, 10).await;
    // The fast device reads all along, as a client that keeps its pace does: it takes all
    // 10,000, in order. (Read only after the flood, it would be as far behind as the slow one.)
    let fast_reading = tokio::spawn(async move {
        for seq in 1..=10_000 {
            let frame = fast.next_within(Duration::from_secs(60)).await;
            assert_eq!(frame["seq"], seq);
        }
    });
    let flood = {
        let owner = alice.user_id.clone();
        let system_ref = &system;
        let publishing = async move { system_ref.publish_updates(&owner, 10_000).await };
        let measuring = latencies(&system, &bob, &bystander_task, &mut bystander, 11, 10);
        let (_, flood) = tokio::join!(publishing, measuring);
        flood
    };
    fast_reading
        .await
        .expect("the fast device got every frame in order");
    // The slow one was cut off with 4008 (what it finds once it reads again).
    assert_eq!(slow.close_code(Duration::from_secs(30)).await, 4008);
    let closes = test_support::metric_sum(
        &system.client,
        &system.live[0].url("/metrics"),
        "live_slow_client_closes_total",
    )
    .await;
    assert_eq!(closes, 1.0);
    let (quiet_p50, quiet_max) = summary(&quiet);
    let (flood_p50, flood_max) = summary(&flood);
    println!(
        "bystander write→frame latency: quiet p50 {quiet_p50:?} max {quiet_max:?}; \
         during the flood p50 {flood_p50:?} max {flood_max:?}"
    );
    // Not a speed target: fan-out never waits on the slow socket, so the bystander's frames keep
    // coming at about their quiet pace rather than stalling behind 10,000 undelivered frames.
    assert!(flood_max < Duration::from_secs(5), "{flood:?}");
}

/// Renames `task` `count` times (versions from `from`), each after the previous frame arrived;
/// the time from each write's answer to its frame.
async fn latencies(
    system: &System,
    user: &test_support::auth::Session,
    task: &str,
    device: &mut Device,
    from: i64,
    count: i64,
) -> Vec<Duration> {
    let mut seen = Vec::new();
    for version in from..from + count {
        system
            .rename_task(user, task, version, &format!("v{version}"))
            .await;
        let written = Instant::now();
        let frame = device.next_within(Duration::from_secs(30)).await;
        assert_eq!(frame["version"], version + 1);
        seen.push(written.elapsed());
    }
    seen
}

fn summary(latencies: &[Duration]) -> (Duration, Duration) {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    (sorted[sorted.len() / 2], sorted[sorted.len() - 1])
}

#[tokio::test]
async fn an_expired_token_closes_the_socket_unless_a_fresh_one_came_in_band() {
    let system = System::start_with(
        "live-expiry",
        &[("LIVE_TOKEN_GRACE_MS", "1000")],
        &[("AUTH_ACCESS_TOKEN_TTL_SECS", "30")],
    )
    .await;
    let mut alice = system.user("alice").await;
    let mut lapsing = system.connect(0, &alice, None).await;
    let mut refreshing = system.connect(1, &alice, None).await;
    let expires = lapsing.ready().await["token_expires_at"].clone();
    refreshing.ready().await;

    tokio::time::sleep(Duration::from_secs(20)).await;
    system.refresh(&mut alice).await;
    refreshing
        .send(json!({ "type": "refresh", "token": alice.access_token }))
        .await;
    let refreshed = refreshing.next().await;
    assert_eq!(refreshed["type"], "refreshed");
    assert!(
        refreshed["token_expires_at"].as_str() > expires.as_str(),
        "{refreshed}"
    );

    // 30 s token + 1 s grace: the socket that got no fresh token closes with 4001.
    assert_eq!(lapsing.close_code(Duration::from_secs(20)).await, 4001);
    system.create_task(&alice, "still here").await;
    assert_eq!(refreshing.next().await["type"], "task.created");
}

#[tokio::test]
async fn logout_closes_that_sessions_sockets_within_a_second() {
    let system = System::start("live-logout").await;
    let alice = system.user("alice").await;
    let other_session = system.login_again(&alice).await;
    let mut leaving = system.connect(0, &alice, None).await;
    let mut leaving_elsewhere = system.connect(1, &alice, None).await;
    let mut staying = system.connect(1, &other_session, None).await;
    for device in [&mut leaving, &mut leaving_elsewhere, &mut staying] {
        device.ready().await;
    }

    let logged_out = Instant::now();
    system.logout(&alice).await;
    assert_eq!(leaving.close_code(Duration::from_secs(5)).await, 4003);
    assert_eq!(
        leaving_elsewhere.close_code(Duration::from_secs(5)).await,
        4003
    );
    let took = logged_out.elapsed();
    println!("logout → both sockets of the session closed in {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");

    // The ended session's still-unexpired token opens nothing; the other session lives on.
    let refused = Device::connect(&system.live_url(0, None), Some(&alice.access_token)).await;
    let (status, body) = refused.err().expect("refused");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("session_ended"), "{body}");
    system.create_task(&other_session, "mine").await;
    assert_eq!(staying.next().await["type"], "task.created");

    // Deleting the account closes every socket of every session.
    system
        .authorized(
            &other_session,
            reqwest::Method::DELETE,
            "/v1/users/me",
            Some(json!({ "password": other_session.password })),
            reqwest::StatusCode::NO_CONTENT,
        )
        .await;
    assert_eq!(staying.close_code(Duration::from_secs(5)).await, 4003);
}

#[tokio::test]
async fn sigterm_closes_every_socket_with_1012_and_exits_cleanly() {
    let mut system = System::start("live-sigterm").await;
    let mut devices = Vec::new();
    for n in 0..10 {
        let user = system.user(&format!("u{n}")).await;
        for _ in 0..10 {
            let mut device = system.connect(1, &user, None).await;
            device.ready().await;
            devices.push(device);
        }
    }
    assert_eq!(devices.len(), 100);
    let stopping = Instant::now();
    system.live[1].terminate();
    for device in &mut devices {
        assert_eq!(device.close_code(Duration::from_secs(10)).await, 1012);
    }
    let status = system.live[1].wait_exit(Duration::from_secs(20)).await;
    println!(
        "SIGTERM → 100 sockets closed with 1012, exited in {:?}",
        stopping.elapsed()
    );
    assert!(status.success(), "{status:?}\n{}", system.live[1].logs());
}
