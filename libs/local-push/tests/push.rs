//! The service over real sockets, with a sender built from web-push-native and reqwest.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use local_push::{Answer, LocalPush, Subscription};
use serde_json::{json, Value};
use web_push_native::jwt_simple::prelude::{
    Claims, Clock, ECDSAP256KeyPairLike as _, ECDSAP256PublicKeyLike as _, ES256KeyPair, JWTClaims,
    NoCustomClaims,
};
use web_push_native::p256::PublicKey;
use web_push_native::{Auth, WebPushBuilder};

const WAIT: Duration = Duration::from_secs(5);
const CONTACT: &str = "mailto:ops@taskstream.test";

fn public_key_b64(key: &ES256KeyPair) -> String {
    URL_SAFE_NO_PAD.encode(key.public_key().public_key().to_bytes_uncompressed())
}

fn authorization(key: &ES256KeyPair, k: &str, claims: JWTClaims<NoCustomClaims>) -> String {
    format!("vapid t={}, k={k}", key.sign(claims).unwrap())
}

/// A VAPID header the way a correct sender makes it: aud is the origin with its port.
fn vapid(key: &ES256KeyPair, push: &LocalPush) -> String {
    let claims = Claims::create(Duration::from_secs(12 * 3600).into())
        .with_audience(push.url())
        .with_subject(CONTACT);
    authorization(key, &public_key_b64(key), claims)
}

fn ua_keys(subscription: &Subscription) -> (PublicKey, Auth) {
    let p256dh = URL_SAFE_NO_PAD.decode(&subscription.p256dh).unwrap();
    let auth = URL_SAFE_NO_PAD.decode(&subscription.auth).unwrap();
    (
        PublicKey::from_sec1_bytes(&p256dh).unwrap(),
        Auth::clone_from_slice(&auth),
    )
}

fn encrypt(subscription: &Subscription, payload: &[u8]) -> Vec<u8> {
    let (public, auth) = ua_keys(subscription);
    web_push_native::encrypt(payload.to_vec(), &public, &auth).unwrap()
}

/// A well-formed push request; tests take things away or change them.
fn push_request(
    client: &reqwest::Client,
    subscription: &Subscription,
    authorization: &str,
    payload: &[u8],
) -> reqwest::RequestBuilder {
    client
        .post(&subscription.endpoint)
        .header("authorization", authorization)
        .header("ttl", "60")
        .header("content-encoding", "aes128gcm")
        .header("content-type", "application/octet-stream")
        .body(encrypt(subscription, payload))
}

/// Replaces a header the request already has (`.header` would add a second one).
fn with(
    request: reqwest::RequestBuilder,
    name: &'static str,
    value: &str,
) -> reqwest::RequestBuilder {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(name, value.parse().unwrap());
    request.headers(headers)
}

async fn status_and_body(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test]
async fn delivers_a_message_built_with_web_push_builder() {
    let push = LocalPush::start().await;
    let subscription = push.subscribe();
    assert!(subscription
        .endpoint
        .starts_with(&format!("{}/push/", push.url())));
    assert_eq!(
        subscription.json(),
        json!({"endpoint": subscription.endpoint, "keys": {"p256dh": subscription.p256dh, "auth": subscription.auth}})
    );
    let p256dh = URL_SAFE_NO_PAD.decode(&subscription.p256dh).unwrap();
    assert_eq!((p256dh.len(), p256dh[0]), (65, 4));
    assert_eq!(
        URL_SAFE_NO_PAD.decode(&subscription.auth).unwrap().len(),
        16
    );

    let key = ES256KeyPair::generate();
    let (public, auth) = ua_keys(&subscription);
    let message = WebPushBuilder::new(subscription.endpoint.parse().unwrap(), public, auth)
        .with_valid_duration(Duration::from_secs(90))
        .build(r#"{"kind":"task.assigned","task":"t-1"}"#)
        .unwrap();
    let client = reqwest::Client::new();
    let response = client
        .post(message.uri().to_string())
        .headers(message.headers().clone())
        .header("authorization", vapid(&key, &push))
        .header("urgency", "high")
        .header("topic", "task-t-1")
        .body(message.body().clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        location.starts_with(&format!("{}/m/", push.url())),
        "{location}"
    );

    let delivered = push.wait_delivered(1, WAIT).await;
    assert_eq!(delivered.len(), 1);
    let message = &delivered[0];
    assert_eq!(message.endpoint, subscription.endpoint);
    assert_eq!(
        message.payload_json(),
        json!({"kind": "task.assigned", "task": "t-1"})
    );
    assert_eq!(message.ttl, 90);
    assert_eq!(message.urgency.as_deref(), Some("high"));
    assert_eq!(message.topic.as_deref(), Some("task-t-1"));
    let attempts = push.attempts();
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        (attempts[0].status, attempts[0].rejection.clone()),
        (201, None)
    );
}

#[tokio::test]
async fn vapid_claims_are_checked_strictly() {
    let push = LocalPush::start().await;
    let subscription = push.subscribe();
    let client = reqwest::Client::new();
    let key = ES256KeyPair::generate();
    let k = public_key_b64(&key);
    let valid = || Duration::from_secs(3600).into();

    // aud without the port — what web-push-native's own VapidSignature produces.
    let (public, auth) = ua_keys(&subscription);
    let portless = WebPushBuilder::new(subscription.endpoint.parse().unwrap(), public, auth)
        .with_vapid(&key, CONTACT)
        .build("hi")
        .unwrap();
    let (status, body) = status_and_body(
        client
            .post(&subscription.endpoint)
            .headers(portless.headers().clone())
            .body(portless.body().clone()),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body["message"].as_str().unwrap().contains("aud"), "{body}");

    let cases = [
        (
            "another origin",
            "aud",
            Claims::create(valid())
                .with_audience("http://127.0.0.1:1")
                .with_subject(CONTACT),
        ),
        (
            "https origin",
            "aud",
            Claims::create(valid())
                .with_audience(push.url().replace("http:", "https:"))
                .with_subject(CONTACT),
        ),
        (
            "no aud",
            "aud",
            Claims::create(valid()).with_subject(CONTACT),
        ),
        (
            "no sub",
            "no sub",
            Claims::create(valid()).with_audience(push.url()),
        ),
        (
            "sub not a contact",
            "mailto:",
            Claims::create(valid())
                .with_audience(push.url())
                .with_subject("ops"),
        ),
        (
            "more than 24 h",
            "24 hours",
            Claims::create(Duration::from_secs(25 * 3600).into())
                .with_audience(push.url())
                .with_subject(CONTACT),
        ),
        ("expired", "expired", {
            let mut claims = Claims::create(valid())
                .with_audience(push.url())
                .with_subject(CONTACT);
            claims.expires_at = Some(Clock::now_since_epoch() - Duration::from_secs(60).into());
            claims
        }),
        ("no exp", "no exp", {
            let mut claims = Claims::create(valid())
                .with_audience(push.url())
                .with_subject(CONTACT);
            claims.expires_at = None;
            claims
        }),
    ];
    for (case, reason, claims) in cases {
        let (status, body) = status_and_body(push_request(
            &client,
            &subscription,
            &authorization(&key, &k, claims),
            b"x",
        ))
        .await;
        assert_eq!(status, 403, "{case}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains(reason),
            "{case}: {body}"
        );
    }

    // Signed by one key, naming another.
    let other = ES256KeyPair::generate();
    let claims = Claims::create(valid())
        .with_audience(push.url())
        .with_subject(CONTACT);
    let (status, body) = status_and_body(push_request(
        &client,
        &subscription,
        &authorization(&key, &public_key_b64(&other), claims),
        b"x",
    ))
    .await;
    assert_eq!(status, 403, "{body}");

    // An https: contact is fine, and nothing above was delivered.
    let claims = Claims::create(valid())
        .with_audience(push.url())
        .with_subject("https://taskstream.test/contact");
    let (status, _) = status_and_body(push_request(
        &client,
        &subscription,
        &authorization(&key, &k, claims),
        b"x",
    ))
    .await;
    assert_eq!(status, 201);
    assert_eq!(push.delivered().len(), 1);
    let attempts = push.attempts();
    assert_eq!(attempts.len(), 11);
    assert!(
        attempts[..10]
            .iter()
            .all(|a| a.status == 403 && a.rejection.is_some()),
        "{attempts:#?}"
    );
}

#[tokio::test]
async fn authorization_header_must_be_vapid() {
    let push = LocalPush::start().await;
    let subscription = push.subscribe();
    let client = reqwest::Client::new();
    let key = ES256KeyPair::generate();

    let missing = client
        .post(&subscription.endpoint)
        .header("ttl", "60")
        .header("content-encoding", "aes128gcm")
        .body(encrypt(&subscription, b"x"));
    assert_eq!(status_and_body(missing).await.0, 401);
    let t = key
        .sign(
            Claims::create(Duration::from_secs(60).into())
                .with_audience(push.url())
                .with_subject(CONTACT),
        )
        .unwrap();
    for header in [
        format!("WebPush {t}"),
        format!("Bearer {t}"),
        format!("vapid t={t}"),
        format!("vapid t={t}, k=not-a-key"),
        format!("vapid t=not-a-jwt, k={}", public_key_b64(&key)),
    ] {
        let (status, body) =
            status_and_body(push_request(&client, &subscription, &header, b"x")).await;
        assert_eq!(status, 401, "{header}: {body}");
    }
    assert!(push.delivered().is_empty());
}

#[tokio::test]
async fn a_pinned_application_server_key_is_enforced() {
    let push = LocalPush::start().await;
    let subscription = push.subscribe();
    let client = reqwest::Client::new();
    let pinned = ES256KeyPair::generate();
    let other = ES256KeyPair::generate();
    push.require_vapid_key(&public_key_b64(&pinned));

    let (status, body) = status_and_body(push_request(
        &client,
        &subscription,
        &vapid(&other, &push),
        b"x",
    ))
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = status_and_body(push_request(
        &client,
        &subscription,
        &vapid(&pinned, &push),
        b"x",
    ))
    .await;
    assert_eq!(status, 201);
}

#[tokio::test]
async fn ttl_encoding_and_encryption_are_checked() {
    let push = LocalPush::start().await;
    let subscription = push.subscribe();
    let stranger = push.subscribe();
    let client = reqwest::Client::new();
    let auth = vapid(&ES256KeyPair::generate(), &push);

    let no_ttl = client
        .post(&subscription.endpoint)
        .header("authorization", &auth)
        .header("content-encoding", "aes128gcm")
        .body(encrypt(&subscription, b"x"));
    assert_eq!(status_and_body(no_ttl).await.0, 400);
    let bad_ttl = with(
        push_request(&client, &subscription, &auth, b"x"),
        "ttl",
        "soon",
    );
    assert_eq!(status_and_body(bad_ttl).await.0, 400);
    let old_encoding = with(
        push_request(&client, &subscription, &auth, b"x"),
        "content-encoding",
        "aesgcm",
    );
    assert_eq!(status_and_body(old_encoding).await.0, 415);
    let bad_urgency = with(
        push_request(&client, &subscription, &auth, b"x"),
        "urgency",
        "asap",
    );
    assert_eq!(status_and_body(bad_urgency).await.0, 400);
    let for_someone_else =
        push_request(&client, &subscription, &auth, b"x").body(encrypt(&stranger, b"x"));
    let (status, body) = status_and_body(for_someone_else).await;
    assert_eq!(status, 400, "{body}");
    let garbage = push_request(&client, &subscription, &auth, b"x").body(vec![7u8; 100]);
    assert_eq!(status_and_body(garbage).await.0, 400);
    let too_large = push_request(&client, &subscription, &auth, &[b'a'; 4100]);
    assert_eq!(status_and_body(too_large).await.0, 413);

    assert!(push.delivered().is_empty());
    assert_eq!(push.attempts().len(), 7);
}

#[tokio::test]
async fn unknown_unsubscribed_and_gone_subscriptions() {
    let push = LocalPush::start().await;
    let client = reqwest::Client::new();
    let auth = vapid(&ES256KeyPair::generate(), &push);

    let real = push.subscribe();
    let unknown = Subscription {
        endpoint: format!("{}/push/nobody", push.url()),
        ..real.clone()
    };
    assert_eq!(
        status_and_body(push_request(&client, &unknown, &auth, b"x"))
            .await
            .0,
        404
    );

    push.unsubscribe(&real);
    assert_eq!(
        status_and_body(push_request(&client, &real, &auth, b"x"))
            .await
            .0,
        410
    );

    let scripted = push.subscribe();
    push.answer_next([Answer::Gone]);
    assert_eq!(
        status_and_body(push_request(&client, &scripted, &auth, b"x"))
            .await
            .0,
        410
    );
    assert_eq!(
        status_and_body(push_request(&client, &scripted, &auth, b"x"))
            .await
            .0,
        410
    );
    assert!(push.delivered().is_empty());
    let attempts = push.attempts();
    assert_eq!(
        attempts.iter().map(|a| a.status).collect::<Vec<_>>(),
        [404, 410, 410, 410]
    );
    assert_eq!(attempts[0].endpoint, unknown.endpoint);
}

#[tokio::test]
async fn scripted_answers_apply_to_valid_requests_in_order() {
    let push = LocalPush::start().await;
    let subscription = push.subscribe();
    let client = reqwest::Client::new();
    let auth = vapid(&ES256KeyPair::generate(), &push);
    push.answer_next([
        Answer::TooManyRequests {
            retry_after_secs: 7,
        },
        Answer::ServiceUnavailable {
            retry_after_secs: Some(3),
        },
        Answer::ServiceUnavailable {
            retry_after_secs: None,
        },
        Answer::ServerError,
        Answer::NotFound,
        Answer::Created,
    ]);

    // An invalid request does not use up a scripted answer.
    let invalid = with(
        push_request(&client, &subscription, &auth, b"x"),
        "ttl",
        "never",
    );
    assert_eq!(status_and_body(invalid).await.0, 400);

    let mut seen = Vec::new();
    for n in 0..7 {
        let response = push_request(
            &client,
            &subscription,
            &auth,
            format!("{{\"n\":{n}}}").as_bytes(),
        )
        .send()
        .await
        .unwrap();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        seen.push((response.status().as_u16(), retry_after));
    }
    let some = |s: &str| Some(s.to_owned());
    assert_eq!(
        seen,
        [
            (429, some("7")),
            (503, some("3")),
            (503, None),
            (500, None),
            (404, None),
            (201, None),
            (201, None)
        ]
    );
    let delivered = push.wait_delivered(2, WAIT).await;
    assert_eq!(
        delivered
            .iter()
            .map(|d| d.payload_json())
            .collect::<Vec<_>>(),
        [json!({"n": 5}), json!({"n": 6})]
    );
    let attempts = push.attempts();
    assert_eq!(attempts[1].retry_after, Some(7));
    assert_eq!(attempts[2].retry_after, Some(3));
    assert!(attempts[1]
        .rejection
        .as_deref()
        .unwrap()
        .contains("scripted"));
}

#[tokio::test]
async fn going_down_refuses_connections_and_coming_up_serves_again() {
    let push = LocalPush::start().await;
    let port = push.port();
    let subscription = push.subscribe();
    let client = reqwest::Client::new();
    let auth = vapid(&ES256KeyPair::generate(), &push);
    assert_eq!(
        status_and_body(push_request(&client, &subscription, &auth, b"1"))
            .await
            .0,
        201
    );

    push.go_down().await;
    assert!(!push.is_up());
    // The same client (its pooled keep-alive connection was closed) and a fresh one.
    for client in [client.clone(), reqwest::Client::new()] {
        let error = push_request(&client, &subscription, &auth, b"2")
            .send()
            .await
            .unwrap_err();
        assert!(error.is_connect(), "{error:?}");
    }
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());

    push.come_up().await;
    assert_eq!(push.port(), port);
    assert_eq!(
        status_and_body(push_request(&client, &subscription, &auth, b"3"))
            .await
            .0,
        201
    );
    let delivered = push.wait_delivered(2, WAIT).await;
    assert_eq!(
        delivered
            .iter()
            .map(|d| d.payload.clone())
            .collect::<Vec<_>>(),
        [b"1".to_vec(), b"3".to_vec()]
    );
}

#[tokio::test]
async fn the_control_api() {
    let push = LocalPush::start().await;
    let client = reqwest::Client::new();
    let auth = vapid(&ES256KeyPair::generate(), &push);

    let response = client
        .post(format!("{}/subscriptions", push.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let json: Value = response.json().await.unwrap();
    let subscription = Subscription {
        endpoint: json["endpoint"].as_str().unwrap().to_owned(),
        p256dh: json["keys"]["p256dh"].as_str().unwrap().to_owned(),
        auth: json["keys"]["auth"].as_str().unwrap().to_owned(),
    };
    assert_eq!(subscription.json(), json);

    let response = client
        .post(format!("{}/answers", push.url()))
        .json(&json!([{"status": 429, "retry_after": 2}]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = push_request(&client, &subscription, &auth, b"{}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (
            response.status().as_u16(),
            response.headers()["retry-after"].to_str().unwrap()
        ),
        (429, "2")
    );
    let bad = client
        .post(format!("{}/answers", push.url()))
        .json(&json!([{"status": 418}]))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    assert_eq!(
        status_and_body(push_request(
            &client,
            &subscription,
            &auth,
            br#"{"hello":"there"}"#
        ))
        .await
        .0,
        201
    );
    assert_eq!(
        status_and_body(push_request(&client, &subscription, &auth, &[0xff, 0x00]))
            .await
            .0,
        201
    );
    let messages: Value = client
        .get(format!("{}/messages", push.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(messages.as_array().unwrap().len(), 2, "{messages}");
    assert_eq!(messages[0]["endpoint"], json!(subscription.endpoint));
    assert_eq!(messages[0]["payload"], json!({"hello": "there"}));
    assert_eq!(messages[0]["ttl"], json!(60));
    assert_eq!(messages[1]["payload"], json!("/wA="));
    assert!(messages[1]["since_start_secs"].as_f64().unwrap() >= 0.0);

    let attempts: Value = client
        .get(format!("{}/attempts", push.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(attempts.as_array().unwrap().len(), 3, "{attempts}");
    assert_eq!(attempts[0]["status"], json!(429));
}

#[tokio::test]
async fn wait_delivered_panics_with_what_it_has() {
    let push = LocalPush::start().await;
    let outcome = tokio::spawn(async move {
        push.wait_delivered(1, Duration::from_millis(50)).await;
    })
    .await;
    let panic = outcome.unwrap_err().into_panic();
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(message.contains("got 0"), "{message}");
}

#[test]
fn the_binary_prints_its_address_and_stops_on_sigterm() {
    use std::io::{BufRead as _, BufReader};
    use std::process::{Command, Stdio};

    let mut child = Command::new(env!("CARGO_BIN_EXE_local-push"))
        .args(["--port", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("local push service listening on ")
        .unwrap_or_else(|| panic!("{line:?}"))
        .to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let json: Value = runtime.block_on(async {
        reqwest::Client::new()
            .post(format!("{url}/subscriptions"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert!(json["endpoint"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{url}/push/")));

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "local-push did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
