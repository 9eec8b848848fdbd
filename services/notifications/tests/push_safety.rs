//! Web Push safety (issue 27, items 2–4), against the real stack: where a push may be sent (no
//! address inside the network, no redirect followed), a dead push service that delays only
//! itself, and devices that move between accounts only with their keys.
//!
//! The push services here are listeners of the test's own on 127.0.0.1 (another port is another
//! origin): the local push service, a tarpit that accepts and never answers, redirectors and a
//! recorder that counts what reaches it.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::System;
use local_push::{Answer, LocalPush, Subscription};
use reqwest::StatusCode;
use serde_json::{json, Value};
use test_support::auth::Session;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reminders and pushes polled quickly, so latencies measure the push path, not the polling.
const QUICK_POLLS: &[(&str, &str)] = &[
    ("REMINDER_POLL_INTERVAL_MS", "200"),
    ("PUSH_POLL_INTERVAL_MS", "100"),
];

/// `subscription`'s keys with another endpoint.
fn with_endpoint(subscription: &Subscription, endpoint: &str) -> Value {
    json!({
        "endpoint": endpoint,
        "keys": { "p256dh": subscription.p256dh, "auth": subscription.auth }
    })
}

/// Registers a device; the status and the body, whatever they are.
async fn try_register(system: &System, user: &Session, body: &Value) -> (StatusCode, Value) {
    let response = system
        .client
        .post(system.edges[0].url("/v1/notifications/devices"))
        .bearer_auth(&user.access_token)
        .json(body)
        .send()
        .await
        .expect("request through the edge");
    let status = response.status();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The push rows of the system (all users): endpoint and state.
async fn deliveries(system: &System) -> Vec<(String, String)> {
    let db = system.notifications_db().await;
    service_kit::sqlx::query_as(
        "SELECT s.endpoint, d.state FROM push_deliveries d \
         JOIN push_subscriptions s ON s.id = d.subscription_id ORDER BY s.endpoint",
    )
    .fetch_all(&db)
    .await
    .unwrap()
}

/// Waits until `count` push rows exist and none is pending; returns them as they are then.
async fn settled_deliveries(
    system: &System,
    count: usize,
    limit: Duration,
) -> Vec<(String, String)> {
    let deadline = Instant::now() + limit;
    loop {
        let rows = deliveries(system).await;
        let settled = rows.len() >= count && rows.iter().all(|(_, state)| state != "pending");
        if settled || Instant::now() >= deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A listener of the test's own on 127.0.0.1 that answers every request with `answer` (a whole
/// HTTP/1.1 response) and counts connections and requests; with `answer` `None` it is a tarpit:
/// it accepts, reads, and never answers (the connections are held open until it is dropped).
struct Listener {
    port: u16,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    async fn start(answer: Option<String>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let connections = connections.clone();
            let requests = requests.clone();
            tokio::spawn(async move {
                let mut held = tokio::task::JoinSet::new();
                while let Ok((stream, _)) = listener.accept().await {
                    connections.fetch_add(1, Ordering::SeqCst);
                    let answer = answer.clone();
                    let requests = requests.clone();
                    held.spawn(serve(stream, answer, requests));
                }
            })
        };
        Self {
            port,
            connections,
            requests,
            task,
        }
    }

    fn tarpit() -> impl std::future::Future<Output = Self> {
        Self::start(None)
    }

    /// Answers every request with a redirect of `status` to `location`.
    fn redirect(status: &str, location: &str) -> impl std::future::Future<Output = Self> {
        Self::start(Some(format!(
            "HTTP/1.1 {status}\r\nlocation: {location}\r\ncontent-length: 0\r\n\r\n"
        )))
    }

    /// Accepts every request with 201, as a push service would.
    fn recorder() -> impl std::future::Future<Output = Self> {
        Self::start(Some(
            "HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n".to_owned(),
        ))
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// The request lines received (`POST /push/x HTTP/1.1`).
    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads requests (head and `content-length` body) off one connection and answers each.
async fn serve(mut stream: TcpStream, answer: Option<String>, requests: Arc<Mutex<Vec<String>>>) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Some(head_end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buffer.len() < head_end + 4 + length {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        buffer.drain(..head_end + 4 + length);
        requests
            .lock()
            .unwrap()
            .push(head.lines().next().unwrap_or_default().to_owned());
        match &answer {
            Some(answer) => {
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
            // The tarpit: hold the connection, never answer.
            None => std::future::pending::<()>().await,
        }
    }
}

#[tokio::test]
async fn endpoints_inside_the_network_are_refused_at_registration() {
    let push = LocalPush::start().await;
    let system = System::start_with("push-ssrf-register", &[], &[]).await;
    let user = system.user("ssrf").await;
    let keys = push.subscribe();
    let port = push.port();

    let inside = [
        "https://169.254.169.254/latest/meta-data/".to_owned(),
        "https://10.1.2.3/push/x".to_owned(),
        "https://172.16.5.4/push/x".to_owned(),
        "https://192.168.0.10/push/x".to_owned(),
        "https://100.64.0.1/push/x".to_owned(),
        "https://[fd12:3456::1]/push/x".to_owned(),
        "https://[fe80::1]/push/x".to_owned(),
        "https://[::]/push/x".to_owned(),
        format!("https://0.0.0.0:{port}/push/x"),
        format!("https://[::ffff:127.0.0.1]:{port}/push/x"),
        format!("http://[::ffff:127.0.0.1]:{port}/push/x"),
        format!("https://127.0.0.1:{port}/push/x"),
        // 127.0.0.1 written as one number.
        format!("https://2130706433:{port}/push/x"),
        format!("https://localhost:{port}/push/x"),
        "https://kafka:9092/push/x".to_owned(),
        "https://notifications.taskstream.svc.cluster.local/push/x".to_owned(),
        "https://metadata.google.internal/computeMetadata/v1/".to_owned(),
        // A public name, but no browser's push service.
        "https://push.attacker.example/x".to_owned(),
    ];
    let mut accepted = Vec::new();
    for endpoint in &inside {
        let (status, body) = try_register(&system, &user, &with_endpoint(&keys, endpoint)).await;
        let named = body["error"]["details"]
            .as_array()
            .is_some_and(|details| details.iter().any(|d| d["field"] == "endpoint"));
        if status != StatusCode::BAD_REQUEST || !named {
            accepted.push(format!("{endpoint} → {status}"));
        }
    }
    assert!(
        accepted.is_empty(),
        "{} of {} endpoints inside the network (or of no push service) were not refused:\n{}",
        accepted.len(),
        inside.len(),
        accepted.join("\n")
    );

    // Browsers' push services, and the local one (PUSH_ALLOW_HTTP_LOOPBACK), still register.
    for endpoint in [
        "https://fcm.googleapis.com/fcm/send/abc:def",
        "https://updates.push.services.mozilla.com/wpush/v2/gAAAAA",
        "https://web.push.apple.com/QGxk",
        "https://wns2-par02p.notify.windows.com/w/?token=BQYAAA",
    ] {
        let (status, body) = try_register(&system, &user, &with_endpoint(&keys, endpoint)).await;
        assert_eq!(status, StatusCode::CREATED, "{endpoint}: {body}");
    }
    system
        .register_device(&user, &push.subscribe().json())
        .await;
}

#[tokio::test]
async fn stored_endpoints_inside_the_network_are_never_sent_to() {
    // Rows written before registration checked them (or a name that resolved to a public
    // address then): without PUSH_ALLOW_HTTP_LOOPBACK nothing on this host may be reached.
    let recorder = Listener::recorder().await;
    let mut settings = QUICK_POLLS.to_vec();
    settings.push(("PUSH_ALLOW_HTTP_LOOPBACK", "false"));
    let system = System::start_with("push-ssrf-send", &settings, &[]).await;
    let user = system.user("ssrf-send").await;
    let push = LocalPush::start().await;
    let keys = push.subscribe();
    let port = recorder.port;
    let endpoints = [
        format!("http://127.0.0.1:{port}/push/literal"),
        format!("http://localhost:{port}/push/name"),
        format!("https://localhost:{port}/push/tls-name"),
        format!("http://[::ffff:127.0.0.1]:{port}/push/mapped"),
        format!("http://0.0.0.0:{port}/push/unspecified"),
    ];
    let db = system.notifications_db().await;
    let decode = |text: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .unwrap()
    };
    for endpoint in &endpoints {
        service_kit::sqlx::query(
            "INSERT INTO push_subscriptions (id, user_id, endpoint, p256dh, auth) \
             VALUES (gen_random_uuid(), $1::uuid, $2, $3, $4)",
        )
        .bind(&user.user_id)
        .bind(endpoint)
        .bind(decode(&keys.p256dh))
        .bind(decode(&keys.auth))
        .execute(&db)
        .await
        .unwrap();
    }
    system.create_overdue_task(&user, "Inside").await;
    system.inbox_with(&user, 1, Duration::from_secs(10)).await;
    let rows = settled_deliveries(&system, endpoints.len(), Duration::from_secs(15)).await;
    assert_eq!(
        (recorder.connections(), recorder.requests()),
        (0, vec![]),
        "connections and requests that reached 127.0.0.1:{port}; deliveries: {rows:?}"
    );
    assert!(
        rows.len() == endpoints.len() && rows.iter().all(|(_, state)| state == "failed"),
        "every push to an address inside the network fails for good: {rows:?}"
    );
}

#[tokio::test]
async fn a_push_service_that_redirects_is_not_followed() {
    let target = Listener::recorder().await;
    let followed = format!("http://127.0.0.1:{}/push/followed", target.port);
    let temporary = Listener::redirect("307 Temporary Redirect", &followed).await;
    let permanent = Listener::redirect("301 Moved Permanently", &followed).await;
    let push = LocalPush::start().await;
    let system = System::start_with("push-redirect", QUICK_POLLS, &[]).await;
    let user = system.user("redirect").await;
    let keys = push.subscribe();
    for listener in [&temporary, &permanent] {
        let endpoint = format!("http://127.0.0.1:{}/push/device", listener.port);
        system
            .register_device(&user, &with_endpoint(&keys, &endpoint))
            .await;
    }
    system.create_overdue_task(&user, "Redirected").await;
    let rows = settled_deliveries(&system, 2, Duration::from_secs(15)).await;
    assert_eq!(temporary.requests().len(), 1, "{rows:?}");
    assert_eq!(permanent.requests().len(), 1, "{rows:?}");
    assert!(
        target.requests().is_empty(),
        "the redirects were followed: {:?} reached the redirect target; deliveries: {rows:?}",
        target.requests()
    );
    assert!(
        rows.iter().all(|(_, state)| state == "failed"),
        "a redirect is not a delivery: {rows:?}"
    );
}

/// From creating an overdue task of `victim` until its push reached `device` (at most `limit`).
async fn push_latency(
    system: &System,
    push: &LocalPush,
    victim: &Session,
    device: &Subscription,
    title: &str,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    system.create_overdue_task(victim, title).await;
    let expected = format!("Overdue: {title}");
    while started.elapsed() < limit {
        let arrived = push
            .delivered()
            .iter()
            .any(|d| d.endpoint == device.endpoint && d.payload_json()["title"] == expected);
        if arrived {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test]
async fn a_push_service_that_never_answers_delays_only_its_own_pushes() {
    // Defaults as in production (64 workers, queue 128, 10 s timeout), quick polling.
    let push = LocalPush::start().await;
    let tarpit = Listener::tarpit().await;
    let system = System::start_with("push-tarpit", QUICK_POLLS, &[]).await;
    let victim = system.user("victim").await;
    let device = push.subscribe();
    system.register_device(&victim, &device.json()).await;
    let limit = Duration::from_secs(90);

    let mut baseline = Vec::new();
    for n in 0..3 {
        let latency = push_latency(
            &system,
            &push,
            &victim,
            &device,
            &format!("calm {n}"),
            limit,
        )
        .await
        .expect("a push without load arrives");
        baseline.push(latency);
    }

    // Another account: 10 devices at an origin that accepts and never answers, 30 overdue tasks.
    let tenant = system.user("tarpit").await;
    let keys = push.subscribe();
    for n in 0..10 {
        let endpoint = format!("http://127.0.0.1:{}/push/{n}", tarpit.port);
        system
            .register_device(&tenant, &with_endpoint(&keys, &endpoint))
            .await;
    }
    let loaded_from = Instant::now();
    let titles: Vec<String> = (0..30).map(|n| format!("Tarpit {n}")).collect();
    futures_util::future::join_all(
        titles
            .iter()
            .map(|title| system.create_overdue_task(&tenant, title)),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while tarpit.connections() < 20 {
        assert!(
            Instant::now() < deadline,
            "only {} pushes reached the tarpit",
            tarpit.connections()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // While the tarpit holds its first requests, then once they timed out (10 s) and were
    // retried.
    let mut loaded = Vec::new();
    for n in 0..6 {
        if n == 3 {
            let timed_out = loaded_from + Duration::from_secs(12);
            tokio::time::sleep_until(timed_out.into()).await;
        }
        let latency = push_latency(
            &system,
            &push,
            &victim,
            &device,
            &format!("loaded {n}"),
            limit,
        )
        .await;
        loaded.push(latency.unwrap_or(limit));
    }
    let calm = *baseline.iter().max().unwrap();
    let worst = *loaded.iter().max().unwrap();
    eprintln!(
        "victim push latency: baseline {baseline:?}, with the tarpit {loaded:?}; tarpit \
         connections {}",
        tarpit.connections()
    );
    // A push that waited for a tarpit request would take its 10 s timeout (PUSH_TIMEOUT_MS) at
    // least; 4 s leaves room for a busy machine.
    let bound = calm + Duration::from_secs(4);
    assert!(
        worst <= bound,
        "another account's dead push service delayed this one: {worst:?} with the tarpit \
         (all: {loaded:?}) against {calm:?} without (all: {baseline:?}); bound {bound:?}"
    );
}

#[tokio::test]
async fn a_device_with_push_history_moves_to_the_account_that_subscribes_with_its_keys() {
    let push = LocalPush::start().await;
    let system = System::start_with("push-move", QUICK_POLLS, &[]).await;
    let first = system.user("first").await;
    let second = system.user("second").await;
    let browser = push.subscribe();
    system.register_device(&first, &browser.json()).await;
    system.create_overdue_task(&first, "Before").await;
    push.wait_delivered(1, Duration::from_secs(20)).await;
    // The push is on record (kept 7 days) when the browser's other account registers it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !deliveries(&system)
        .await
        .iter()
        .any(|(_, state)| state == "sent")
    {
        assert!(Instant::now() < deadline, "the push was not recorded sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (status, body) = try_register(&system, &second, &browser.json()).await;
    assert_eq!(status, StatusCode::CREATED, "moving the device: {body}");
    assert!(system.devices(&first).await.is_empty());
    assert_eq!(system.devices(&second).await.len(), 1);

    system.create_overdue_task(&second, "After").await;
    let delivered = push.wait_delivered(2, Duration::from_secs(20)).await;
    assert_eq!(delivered[1].payload_json()["title"], "Overdue: After");
}

#[tokio::test]
async fn knowing_an_endpoint_is_not_enough_to_take_the_device() {
    let push = LocalPush::start().await;
    let system = System::start_with("push-hijack", QUICK_POLLS, &[]).await;
    let owner = system.user("owner").await;
    let intruder = system.user("intruder").await;
    let phone = push.subscribe();
    system.register_device(&owner, &phone.json()).await;

    // The endpoint URL leaked, the keys did not: the intruder brings keys of its own.
    let own_keys = push.subscribe();
    let (status, body) = try_register(
        &system,
        &intruder,
        &with_endpoint(&own_keys, &phone.endpoint),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("endpoint_in_use")),
        "{body}"
    );
    assert_eq!(system.devices(&owner).await.len(), 1);
    assert!(system.devices(&intruder).await.is_empty());
    system.create_overdue_task(&owner, "Still mine").await;
    let delivered = push.wait_delivered(1, Duration::from_secs(20)).await;
    assert_eq!(delivered[0].endpoint, phone.endpoint);
}

#[tokio::test]
async fn an_endpoint_with_surrounding_spaces_is_the_same_device() {
    let push = LocalPush::start().await;
    let system = System::start_with("push-spaces", &[], &[]).await;
    let user = system.user("spaces").await;
    let phone = push.subscribe();
    let first = system.register_device(&user, &phone.json()).await;
    let (status, again) = try_register(
        &system,
        &user,
        &with_endpoint(&phone, &format!("  {} \t", phone.endpoint)),
    )
    .await;
    assert_eq!(
        (status, again["id"].clone()),
        (StatusCode::OK, first["id"].clone()),
        "the same endpoint with spaces around it: {again}"
    );
    let listed = system.devices(&user).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["endpoint"], phone.endpoint);
}

#[tokio::test]
async fn a_huge_retry_after_waits_at_most_the_cap_and_is_not_sent_again_meanwhile() {
    // Claims expire quickly here, so a push whose outcome was not recorded is soon sent again.
    let mut settings = QUICK_POLLS.to_vec();
    settings.extend([("PUSH_TIMEOUT_MS", "1000"), ("PUSH_CLAIM_LEASE_MS", "5000")]);
    let push = LocalPush::start().await;
    let system = System::start_with("push-retry-after", &settings, &[]).await;
    let user = system.user("patient").await;
    system
        .register_device(&user, &push.subscribe().json())
        .await;
    // ~317,000 years.
    push.answer_next([Answer::TooManyRequests {
        retry_after_secs: 10_000_000_000_000,
    }]);
    system.create_overdue_task(&user, "Later").await;
    push.wait_attempts(1, Duration::from_secs(20)).await;
    // Two claim leases.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let statuses: Vec<u16> = push.attempts().iter().map(|a| a.status).collect();
    assert_eq!(statuses, [429], "sent again while it should wait");

    // It waits as long as the cap (PUSH_RETRY_AFTER_MAX_MS, 1 hour), no longer.
    let db = system.notifications_db().await;
    let (state, wait): (String, f64) = service_kit::sqlx::query_as(
        "SELECT state, extract(epoch FROM next_attempt_at - now())::float8 FROM push_deliveries",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(state, "pending");
    assert!(
        (3000.0..=3600.0).contains(&wait),
        "next attempt in {wait} s"
    );
}
