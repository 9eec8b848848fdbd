//! What one client can make the live endpoint do, bounded: frames per socket (refresh frames
//! above all: each is a check on the primary), sockets that have not authenticated yet per
//! instance, and a silent client behind the edge, which must be cut as if it were connected
//! directly.

mod common;

use std::time::{Duration, Instant};

use common::{Device, System};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// How long a flooding client keeps sending.
const FLOOD_WINDOW: Duration = Duration::from_secs(8);

/// What a flooding client saw.
#[derive(Debug, Default)]
struct Flood {
    /// Sockets it opened (more than one when it reconnects after each close).
    sockets: u32,
    sent: u64,
    /// Answers: `refreshed` frames, or pongs.
    answered: u64,
    /// The close codes it was given, in order.
    closes: Vec<u16>,
    /// Handshakes refused with 429 for opening sockets too fast.
    refused: u32,
}

/// Sends `frame` over a socket to `url` as fast as the socket takes it, for `window`, reading
/// the answers meanwhile; with `reconnect`, opens a new socket each time one is closed.
async fn flood(
    url: String,
    token: String,
    frame: Message,
    window: Duration,
    reconnect: bool,
) -> Flood {
    let deadline = Instant::now() + window;
    let mut seen = Flood::default();
    while Instant::now() < deadline {
        let mut device = match Device::connect(&url, Some(&token)).await {
            Ok(device) => device,
            // Opening sockets too fast (an attacker does not wait for Retry-After).
            Err((429, body)) if body.contains("too_many_handshakes") => {
                seen.refused += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            // The user's sockets are capped; a closed one may not have left yet.
            Err((429, _)) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            Err((status, body)) => panic!("handshake refused: {status} {body}"),
        };
        device.ready().await;
        seen.sockets += 1;
        let (mut sink, mut stream) = device.socket.split();
        let frame = frame.clone();
        let writing = tokio::spawn(async move {
            let mut sent = 0u64;
            while Instant::now() < deadline {
                if sink.send(frame.clone()).await.is_err() {
                    break;
                }
                sent += 1;
                // Let the reader (and this test's other tasks) run.
                if sent.is_multiple_of(32) {
                    tokio::task::yield_now().await;
                }
            }
            sent
        });
        let mut close = None;
        let read_until = deadline + Duration::from_secs(2);
        loop {
            let left = read_until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, stream.next()).await {
                Err(_) => break,
                Ok(Some(Ok(Message::Text(text)))) if text.contains("\"refreshed\"") => {
                    seen.answered += 1
                }
                Ok(Some(Ok(Message::Pong(_)))) => seen.answered += 1,
                Ok(Some(Ok(Message::Close(frame)))) => {
                    close = Some(frame.map_or(1005, |frame| u16::from(frame.code)));
                    break;
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_)) | None) => break,
            }
        }
        seen.sent += writing.await.expect("the flooding writer");
        seen.closes.extend(close);
        if !reconnect || close.is_none() {
            break;
        }
    }
    seen
}

/// `user`'s inbox fetched through the first edge, one request after another, for `window`
/// (at most 20,000 requests): how long each took.
async fn inbox_latencies(
    system: &System,
    user: &test_support::auth::Session,
    window: Duration,
) -> Vec<Duration> {
    let until = Instant::now() + window;
    let mut seen = Vec::new();
    while Instant::now() < until && seen.len() < 20_000 {
        let started = Instant::now();
        system.inbox(user).await;
        seen.push(started.elapsed());
    }
    seen
}

/// p50 and p99 in milliseconds, and the count.
fn percentiles(latencies: &[Duration]) -> String {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    let at = |q: f64| {
        let index = ((sorted.len() as f64 * q) as usize).min(sorted.len() - 1);
        sorted[index].as_secs_f64() * 1000.0
    };
    format!(
        "p50 {:.1} ms, p99 {:.1} ms (n={})",
        at(0.50),
        at(0.99),
        sorted.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_flood_is_closed_with_4030_and_spares_another_users_inbox() {
    let system = System::start("live-refresh-flood").await;
    let alice = system.user("alice").await;
    let bob = system.user("bob").await;
    let refresh =
        Message::text(json!({ "type": "refresh", "token": alice.access_token }).to_string());
    // Alice's other device, which refreshes as a client should, keeps working throughout.
    let first_handshake = Instant::now();
    let mut phone = system.connect(0, &alice, None).await;
    phone.ready().await;

    let baseline = inbox_latencies(&system, &bob, Duration::from_secs(4)).await;
    // One socket, straight to the instance Bob's inbox is served by.
    let attack = tokio::spawn(flood(
        system.direct_live_url(0),
        alice.access_token.clone(),
        refresh.clone(),
        FLOOD_WINDOW,
        false,
    ));
    let during = inbox_latencies(&system, &bob, FLOOD_WINDOW).await;
    let one_socket = attack.await.expect("the flood");
    // The same, reconnecting each time it is closed.
    let attack = tokio::spawn(flood(
        system.direct_live_url(0),
        alice.access_token.clone(),
        refresh,
        FLOOD_WINDOW,
        true,
    ));
    let during_reconnecting = inbox_latencies(&system, &bob, FLOOD_WINDOW).await;
    let reconnecting = attack.await.expect("the reconnecting flood");
    let figures = format!(
        "Bob's inbox: baseline {}; during one socket's refresh flood {}; during a flood that \
         reconnects {}.\none socket: {one_socket:?}\nreconnecting: sockets {}, handshakes \
         refused {}, sent {}, answered {}, closes {:?}",
        percentiles(&baseline),
        percentiles(&during),
        percentiles(&during_reconnecting),
        reconnecting.sockets,
        reconnecting.refused,
        reconnecting.sent,
        reconnecting.answered,
        reconnecting.closes.iter().fold(
            std::collections::BTreeMap::<u16, usize>::new(),
            |mut counts, code| {
                *counts.entry(*code).or_default() += 1;
                counts
            }
        ),
    );
    println!("{figures}");

    // The flooding socket gets a few refreshes answered (a small burst), then 4030.
    assert_eq!(one_socket.closes, [4030], "{figures}");
    assert!(one_socket.answered <= 5, "{figures}");
    assert!(
        reconnecting.closes.iter().all(|code| *code == 4030),
        "{figures}"
    );
    // Reconnecting after each close does not get around it: the user's handshakes are bounded
    // too (20 at once, then one a second since the phone's), and the refused ones cost no
    // query.
    // The phone's socket is one of them.
    let allowed = 20 + first_handshake.elapsed().as_secs() as u32;
    assert!(
        reconnecting.sockets + one_socket.sockets <= allowed,
        "more than {allowed} sockets opened: {figures}"
    );
    assert!(reconnecting.refused > 0, "{figures}");
    // A refresh on the well-behaved device is answered as before.
    phone
        .send(json!({ "type": "refresh", "token": alice.access_token }))
        .await;
    assert_eq!(phone.next().await["type"], "refreshed");
    let id = system.create_task(&alice, "still served").await;
    assert_eq!(phone.next().await["id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_and_pong_floods_are_closed_with_4030_and_answering_pings_costs_nothing() {
    let system = System::start_with(
        "live-frame-flood",
        // Pings every 100 ms: a client that answers them sends 10 pongs a second.
        &[("LIVE_PING_INTERVAL_MS", "100")],
        &[],
    )
    .await;
    let alice = system.user("alice").await;
    let mut steady = system.connect(0, &alice, None).await;
    steady.ready().await;

    let url = system.direct_live_url(0);
    let window = Duration::from_secs(4);
    let pings = tokio::spawn(flood(
        url.clone(),
        alice.access_token.clone(),
        Message::Ping(b"flood".to_vec().into()),
        window,
        false,
    ));
    let pongs = tokio::spawn(flood(
        url,
        alice.access_token.clone(),
        Message::Pong(b"unasked".to_vec().into()),
        window,
        false,
    ));
    // Meanwhile the steady device answers some 40 pings (tungstenite does as it reads).
    steady.quiet_for(window).await;
    let (pings, pongs) = (pings.await.unwrap(), pongs.await.unwrap());
    println!("ping flood: {pings:?}\npong flood: {pongs:?}");
    assert_eq!(pings.closes, [4030], "ping flood: {pings:?}");
    assert!(pings.answered <= 100, "ping flood: {pings:?}");
    assert_eq!(pongs.closes, [4030], "pong flood: {pongs:?}");
    let id = system.create_task(&alice, "steady").await;
    assert_eq!(steady.next().await["id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_waiting_to_authenticate_are_capped_per_instance() {
    const CAP: usize = 50;
    const OPENED: usize = 300;
    let system = System::start_with(
        "live-unauthenticated",
        &[
            ("LIVE_MAX_UNAUTHENTICATED_SOCKETS", "50"),
            // Long enough that none of them times out while the test looks.
            ("LIVE_AUTH_TIMEOUT_MS", "20000"),
        ],
        &[],
    )
    .await;
    let alice = system.user("alice").await;
    let url = system.direct_live_url(0);

    // 300 upgrades that never send `auth`.
    let mut silent = Vec::new();
    for _ in 0..OPENED {
        silent.push(Device::connect(&url, None).await.expect("the upgrade"));
    }
    // Which of them the server closed at once, and with what.
    let started = Instant::now();
    let outcomes =
        futures_util::future::join_all(silent.into_iter().map(|mut device| async move {
            match tokio::time::timeout(Duration::from_secs(2), device.socket.next()).await {
                Err(_) => (Some(device), None),
                Ok(Some(Ok(Message::Close(frame)))) => (
                    None,
                    Some(frame.map_or(1005, |frame| u16::from(frame.code))),
                ),
                Ok(other) => panic!("expected nothing or a close, got {other:?}"),
            }
        }))
        .await;
    let looked = started.elapsed();
    let mut held: Vec<Device> = Vec::new();
    let mut refused = std::collections::BTreeMap::<u16, usize>::new();
    for (device, close) in outcomes {
        held.extend(device);
        if let Some(code) = close {
            *refused.entry(code).or_default() += 1;
        }
    }
    let figures = format!(
        "{OPENED} unauthenticated sockets, cap {CAP}: {} held, refused {refused:?} (looked for {looked:?})",
        held.len()
    );
    println!("{figures}");
    assert_eq!(held.len(), CAP, "{figures}");
    assert_eq!(refused.get(&1013), Some(&(OPENED - CAP)), "{figures}");

    // A token in the handshake does not wait for a slot.
    let mut device = system.connect(0, &alice, None).await;
    device.ready().await;
    // One that authenticates frees its slot for the next.
    held[0]
        .send(json!({ "type": "auth", "token": alice.access_token }))
        .await;
    held[0].ready().await;
    let mut next = Device::connect(&url, None).await.unwrap();
    next.quiet_for(Duration::from_secs(1)).await;
    next.send(json!({ "type": "auth", "token": alice.access_token }))
        .await;
    next.ready().await;
}

#[tokio::test]
async fn a_client_behind_the_edge_that_stops_answering_pings_is_closed_as_idle() {
    let system = System::start_with(
        "live-edge-idle",
        &[
            ("LIVE_PING_INTERVAL_MS", "200"),
            ("LIVE_IDLE_TIMEOUT_MS", "1000"),
        ],
        &[],
    )
    .await;
    let alice = system.user("alice").await;
    // Both through the edge. tungstenite answers pings while it is read: this one stays.
    let mut reading = system.connect(0, &alice, None).await;
    reading.ready().await;
    // This one is never read, so it answers nothing.
    let mut idle = system.connect(0, &alice, None).await;
    reading.quiet_for(Duration::from_secs(3)).await;

    let idle_closes = test_support::metric_sum_where(
        &system.client,
        &system.live[0].url("/metrics"),
        "live_closes_total",
        "reason=\"idle\"",
    )
    .await;
    assert_eq!(
        idle_closes,
        1.0,
        "the service closed {} sockets as idle: the edge answered its pings itself",
        idle_closes.abs()
    );
    // And the client finds its connection ended: with the 4002 the edge passed on, or, as when
    // connected directly, with an error when answering the pings it had not read yet meets a
    // connection the other side has closed.
    idle.ready().await;
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match idle.socket.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|frame| u16::from(frame.code)),
                Some(Ok(Message::Ping(_))) => continue,
                Some(Ok(other)) => panic!("expected nothing but pings and a close, got {other:?}"),
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("the idle connection ended");
    assert!(matches!(ended, Some(4002) | None), "{ended:?}");
    let id = system.create_task(&alice, "reading one still open").await;
    assert_eq!(reading.next().await["id"], id.as_str());
}
