//! auth against what could turn it on its users: input PostgreSQL cannot store, bodies of the
//! wrong JSON type, strangers' password guesses, spoofed client addresses, retried and racing
//! refreshes, sessions that would never end, and a signup flood beside logins.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use test_support::auth::AuthServer;
use test_support::{unique_name, Answer, TestStack};

/// A client whose connections come from `address` (any 127.x address is this machine), so one
/// test can play several clients.
fn client_from(address: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .local_address(address.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn post(client: &reqwest::Client, url: String, body: Value) -> Answer {
    Answer::send(client.post(url).json(&body)).await
}

async fn login(
    auth: &AuthServer,
    client: &reqwest::Client,
    username: &str,
    password: &str,
) -> Answer {
    post(
        client,
        auth.url("/v1/auth/login"),
        json!({ "username": username, "password": password }),
    )
    .await
}

async fn refresh(auth: &AuthServer, client: &reqwest::Client, token: &str) -> Answer {
    post(
        client,
        auth.url("/v1/auth/refresh"),
        json!({ "refresh_token": token }),
    )
    .await
}

#[tokio::test]
async fn text_postgresql_cannot_store_is_refused_naming_the_field() {
    let auth = AuthServer::start(&TestStack::from_env(), "nul-auth", &[]).await;
    let client = client_from("127.0.0.1");
    let session = auth.signup_and_login(&client, "nul").await;

    let answer = login(&auth, &client, "\u{0}", "whatever").await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert_eq!(answer.invalid_fields(), ["username".to_owned()].into());

    let signup = post(
        &client,
        auth.url("/v1/auth/signup"),
        json!({ "username": unique_name("nul"), "password": "long enough", "nickname": "A\u{0}da" }),
    )
    .await;
    assert_eq!(signup.status, 400, "{}", signup.body);
    assert_eq!(signup.invalid_fields(), ["nickname".to_owned()].into());

    let me = auth.url("/v1/users/me");
    let bearer = format!("Bearer {}", session.access_token);
    for (body, field) in [
        (json!({ "avatar_url": "https://a.io/\u{0}" }), "avatar_url"),
        (json!({ "nickname": "\u{0}" }), "nickname"),
    ] {
        let answer = Answer::send(
            client
                .patch(&me)
                .header("authorization", &bearer)
                .json(&body),
        )
        .await;
        assert_eq!(answer.status, 400, "{body}: {}", answer.body);
        assert_eq!(answer.invalid_fields(), [field.to_owned()].into(), "{body}");
    }

    // The avatar URL is stored as parsed, in normal form, not as sent.
    let answer = Answer::send(
        client
            .patch(&me)
            .header("authorization", &bearer)
            .json(&json!({ "avatar_url": "HTTPS://CDN.Example.com:443/a/../ada.png" })),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["avatar_url"], "https://cdn.example.com/ada.png");
}

#[tokio::test]
async fn a_json_array_is_not_an_object_and_changes_nothing() {
    let auth = AuthServer::start(&TestStack::from_env(), "array-auth", &[]).await;
    let client = client_from("127.0.0.1");
    let session = auth.signup_and_login(&client, "array").await;
    let me = auth.url("/v1/users/me");
    let bearer = format!("Bearer {}", session.access_token);
    let set = Answer::send(
        client
            .patch(&me)
            .header("authorization", &bearer)
            .json(&json!({ "nickname": "Ada", "avatar_url": "https://cdn.example.com/ada.png" })),
    )
    .await;
    assert_eq!(set.status, 200, "{}", set.body);

    let answer = Answer::send(
        client
            .patch(&me)
            .header("authorization", &bearer)
            .json(&json!([null, null])),
    )
    .await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert_eq!(answer.code(), "invalid_body");
    // Read as the client would after its own write: with the write's consistency token.
    let written = set
        .header("x-consistency-token")
        .expect("consistency token");
    let profile = Answer::send(
        client
            .get(&me)
            .header("authorization", &bearer)
            .header("x-consistency-token", written),
    )
    .await;
    assert_eq!(
        profile.body["nickname"], "Ada",
        "the profile was not cleared"
    );
    assert_eq!(
        profile.body["avatar_url"],
        "https://cdn.example.com/ada.png"
    );
}

#[tokio::test]
async fn a_strangers_guesses_never_block_the_owners_login_from_elsewhere() {
    let auth = AuthServer::start(
        &TestStack::from_env(),
        "guesses",
        &[
            ("AUTH_LOGIN_LIMIT_PER_USERNAME", "3"),
            ("AUTH_LOGIN_LIMIT_PER_CLIENT", "5"),
        ],
    )
    .await;
    let (owner, stranger) = (client_from("127.0.0.2"), client_from("127.0.0.3"));
    let session = auth.signup_and_login(&owner, "owner").await;

    // The stranger's wrong guesses: three answered 401, then the stranger is refused.
    for _ in 0..3 {
        let answer = login(&auth, &stranger, &session.username, "wrong").await;
        assert_eq!(answer.status, 401, "{}", answer.body);
    }
    let blocked = login(&auth, &stranger, &session.username, "wrong").await;
    assert_eq!(blocked.status, 429, "{}", blocked.body);
    assert_eq!(blocked.code(), "rate_limited");
    let retry_after: u64 = blocked.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    // Even with the right password: the stranger's address is what is blocked for this account.
    let guessed = login(&auth, &stranger, &session.username, &session.password).await;
    assert_eq!(guessed.status, 429, "{}", guessed.body);

    // The owner, from their own address, logs in as often as they like: successes cost nothing.
    for _ in 0..10 {
        let answer = login(&auth, &owner, &session.username, &session.password).await;
        assert_eq!(
            answer.status, 200,
            "the owner was locked out: {}",
            answer.body
        );
    }

    // Per client, across accounts: five failures, then refused for every account.
    let sprayer = client_from("127.0.0.4");
    for _ in 0..5 {
        let answer = login(&auth, &sprayer, &unique_name("spray"), "wrong").await;
        assert_eq!(answer.status, 401, "{}", answer.body);
    }
    let sprayed = login(&auth, &sprayer, &unique_name("spray"), "wrong").await;
    assert_eq!(sprayed.status, 429, "{}", sprayed.body);
}

#[tokio::test]
async fn forwarded_for_counts_only_from_a_trusted_proxy() {
    let auth = AuthServer::start(
        &TestStack::from_env(),
        "forwarded",
        &[
            ("AUTH_LOGIN_LIMIT_PER_CLIENT", "5"),
            ("AUTH_LOGIN_LIMIT_PER_USERNAME", "1000"),
            // The gateway is 127.0.0.9; nobody else's X-Forwarded-For is believed.
            ("HTTP_TRUSTED_PROXIES", "127.0.0.9"),
        ],
    )
    .await;
    // Reaching auth directly with a new X-Forwarded-For each time: all one client.
    let direct = client_from("127.0.0.5");
    let mut statuses = Vec::new();
    for attempt in 0..8 {
        let answer = Answer::send(
            direct
                .post(auth.url("/v1/auth/login"))
                .header("x-forwarded-for", format!("198.51.100.{attempt}"))
                .json(&json!({ "username": unique_name("rotating"), "password": "wrong" })),
        )
        .await;
        statuses.push(answer.status);
    }
    assert_eq!(statuses, [401, 401, 401, 401, 401, 429, 429, 429]);

    // Through the gateway, each address it appended is a client of its own.
    let gateway = client_from("127.0.0.9");
    for attempt in 0..8 {
        let answer = Answer::send(
            gateway
                .post(auth.url("/v1/auth/login"))
                .header("x-forwarded-for", format!("203.0.113.{attempt}"))
                .json(&json!({ "username": unique_name("behind"), "password": "wrong" })),
        )
        .await;
        assert_eq!(answer.status, 401, "{}", answer.body);
    }
}

#[tokio::test]
async fn a_retried_refresh_keeps_the_session_and_late_reuse_ends_it() {
    let auth = AuthServer::start(
        &TestStack::from_env(),
        "refresh-grace",
        &[("AUTH_REFRESH_REUSE_GRACE_SECS", "2")],
    )
    .await;
    let client = client_from("127.0.0.1");
    let session = auth.signup_and_login(&client, "grace").await;

    // The answer to a refresh was lost: the client retries with the same token.
    let first = refresh(&auth, &client, &session.refresh_token).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let retried = refresh(&auth, &client, &session.refresh_token).await;
    assert_eq!(
        retried.status, 200,
        "a retry within the grace: {}",
        retried.body
    );
    // Both new tokens work: the session was not revoked.
    for answer in [&first, &retried] {
        let next = refresh(
            &auth,
            &client,
            answer.body["refresh_token"].as_str().unwrap(),
        )
        .await;
        assert_eq!(next.status, 200, "{}", next.body);
    }

    // (Several tabs refreshing one token at once: api.rs.)

    // Presented again well after the grace: reuse, and the whole session ends.
    let stolen = auth.signup_and_login(&client, "reuse").await;
    let rotated = refresh(&auth, &client, &stolen.refresh_token).await;
    assert_eq!(rotated.status, 200);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let reused = refresh(&auth, &client, &stolen.refresh_token).await;
    assert_eq!(reused.status, 401, "{}", reused.body);
    assert_eq!(reused.code(), "refresh_token_reused");
    let after = refresh(
        &auth,
        &client,
        rotated.body["refresh_token"].as_str().unwrap(),
    )
    .await;
    assert_eq!(after.status, 401, "the session is over: {}", after.body);
}

#[tokio::test]
async fn refreshing_does_not_extend_a_session_past_its_lifetime() {
    let auth = AuthServer::start(
        &TestStack::from_env(),
        "session-lifetime",
        &[("AUTH_SESSION_MAX_LIFETIME_SECS", "6")],
    )
    .await;
    let client = client_from("127.0.0.1");
    let session = auth.signup_and_login(&client, "lifetime").await;
    let started = Instant::now();
    let mut token = session.refresh_token;
    let mut refreshed = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let answer = refresh(&auth, &client, &token).await;
        if answer.status != 200 {
            assert_eq!(answer.status, 401, "{}", answer.body);
            assert_eq!(answer.code(), "invalid_refresh_token");
            break;
        }
        refreshed += 1;
        token = answer.body["refresh_token"].as_str().unwrap().to_owned();
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "refreshing kept the session alive past its 6 s lifetime"
        );
    }
    assert!(
        refreshed >= 3,
        "refreshes worked while it lasted: {refreshed}"
    );
    assert!(started.elapsed() >= Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signup_flood_from_one_client_is_refused_while_another_logs_in() {
    let auth = AuthServer::start(
        &TestStack::from_env(),
        "signup-flood",
        // The default signup limit, on one core's worth of login workers.
        &[
            ("AUTH_SIGNUP_LIMIT_PER_CLIENT", "10"),
            ("AUTH_PASSWORD_WORKERS", "1"),
        ],
    )
    .await;
    let user = client_from("127.0.0.6");
    let session = auth.signup_and_login(&user, "steady").await;

    let flooding = {
        let auth_url = auth.url("/v1/auth/signup");
        tokio::spawn(async move {
            let flooder = client_from("127.0.0.7");
            let started = Instant::now();
            let mut statuses = std::collections::BTreeMap::<u16, u32>::new();
            // Eight at a time, for 20 s.
            while started.elapsed() < Duration::from_secs(20) {
                let batch: Vec<_> = (0..8)
                    .map(|_| {
                        flooder.post(&auth_url).json(&json!({
                            "username": unique_name("flood"),
                            "password": "flood password",
                        }))
                    })
                    .map(|request| tokio::spawn(request.send()))
                    .collect();
                for request in batch {
                    if let Ok(Ok(response)) = request.await {
                        *statuses.entry(response.status().as_u16()).or_default() += 1;
                    }
                }
            }
            statuses
        })
    };
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        let sent = Instant::now();
        let answer = login(&auth, &user, &session.username, &session.password).await;
        latencies.push(sent.elapsed());
        assert_eq!(
            answer.status, 200,
            "a login during the flood: {}",
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let statuses = flooding.await.unwrap();
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    println!(
        "signup flood for 20 s from one client: {statuses:?}; {} logins from another client all 200, p50 {:?}, p99 {p99:?}",
        latencies.len(),
        latencies[latencies.len() / 2]
    );
    assert!(statuses.get(&429).copied().unwrap_or(0) > 0, "{statuses:?}");
    assert!(
        statuses.get(&201).copied().unwrap_or(0) <= 14,
        "one client got more than its signups: {statuses:?}"
    );
}

/// `attempts` requests made by `send` at once (wrong passwords): how many were answered
/// 401 (each a real argon2 verification) and how many were refused without one (429 by the
/// limit, or 503 when the password pool's queue was full).
async fn guesses_at_once(
    attempts: usize,
    send: impl Fn() -> reqwest::RequestBuilder,
) -> (usize, usize) {
    let answers = futures_util::future::join_all((0..attempts).map(|_| Answer::send(send()))).await;
    let verified = answers.iter().filter(|answer| answer.status == 401).count();
    let refused = answers
        .iter()
        .filter(|answer| {
            matches!(answer.status, 429 | 503) && answer.header("retry-after").is_some()
        })
        .count();
    assert_eq!(
        verified + refused,
        attempts,
        "only 401, and 429 or 503 with Retry-After: {:?}",
        answers
            .iter()
            .map(|answer| answer.status)
            .collect::<Vec<_>>()
    );
    (verified, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_guesses_cannot_pass_the_limit_on_login_or_account_deletion() {
    // The default limit: 10 failures per minute for one username from one client.
    let auth = AuthServer::start(&TestStack::from_env(), "parallel-guesses", &[]).await;
    let attacker = client_from("127.0.0.6");
    let owner = client_from("127.0.0.7");
    let session = auth.signup_and_login(&owner, "guessed").await;

    // 80 wrong passwords at once, as many connections: attempts still being verified count.
    let (verified, refused) = guesses_at_once(80, || {
        attacker
            .post(auth.url("/v1/auth/login"))
            .json(&json!({ "username": session.username, "password": "wrong guess" }))
    })
    .await;
    println!("login: 80 parallel guesses, {verified} verified (401), {refused} refused (429/503)");
    assert!(
        verified <= 10,
        "{verified} of 80 parallel guesses were verified; the limit is 10 per minute"
    );
    // The owner from elsewhere is not locked out by it.
    let owners = login(&auth, &owner, &session.username, &session.password).await;
    assert_eq!(owners.status, 200, "{}", owners.body);

    // DELETE /v1/users/me checks the password too: a stolen token guessing it in parallel.
    let thief = client_from("127.0.0.8");
    let (verified, refused) = guesses_at_once(80, || {
        thief
            .delete(auth.url("/v1/users/me"))
            .bearer_auth(&session.access_token)
            .json(&json!({ "password": "wrong guess" }))
    })
    .await;
    println!("delete: 80 parallel guesses, {verified} verified (401), {refused} refused (429/503)");
    assert!(
        verified <= 10,
        "{verified} of 80 parallel deletion guesses were verified; the limit is 10 per minute"
    );
    let me = Answer::send(
        owner
            .get(auth.url("/v1/users/me"))
            .bearer_auth(&session.access_token),
    )
    .await;
    assert_eq!(me.status, 200, "the account is still there: {}", me.body);
}
