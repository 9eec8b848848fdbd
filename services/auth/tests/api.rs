//! auth's HTTP API against the real stack: every endpoint and error, token rotation and reuse
//! detection, forged tokens, rate limits, and a login storm beside normal traffic. Each test runs
//! its own auth process (own signing key, own limits) on the shared primary + replica.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use test_support::auth::{keygen, AuthServer, Session, KEY_ID};
use test_support::{
    http1_client, join_spawned, metric_sum, openapi_operations, poll_until, unique_name, Answer,
    TestStack,
};

async fn post(client: &reqwest::Client, url: String, body: Value) -> Answer {
    Answer::read(client.post(url).json(&body).send().await.expect("POST")).await
}

async fn get_me(auth: &AuthServer, client: &reqwest::Client, token: &str) -> Answer {
    Answer::read(
        client
            .get(auth.url("/v1/users/me"))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET /v1/users/me"),
    )
    .await
}

async fn start(label: &str) -> AuthServer {
    AuthServer::start(&TestStack::from_env(), label, &[]).await
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The JSON part of a JWT at `index` (0: header, 1: claims).
fn jwt_part(token: &str, index: usize) -> Value {
    let part = token.split('.').nth(index).expect("JWT part");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("JSON")
}

#[tokio::test]
async fn signup_creates_an_account_that_logs_in_and_reads_its_profile() {
    let auth = start("signup").await;
    let client = http1_client();
    let username = unique_name("Ada_");
    let password = "correct horse battery staple";

    let created = post(
        &client,
        auth.url("/v1/auth/signup"),
        json!({ "username": username, "password": password, "nickname": "Ada" }),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.body["username"], username.to_lowercase());
    assert_eq!(created.body["nickname"], "Ada");
    assert_eq!(created.body["avatar_url"], Value::Null);
    assert!(created.body["id"].as_str().is_some_and(|id| id.len() == 36));
    assert_eq!(created.header("location"), Some("/v1/users/me"));
    assert!(created.header("x-consistency-token").is_some());
    assert!(created.body.get("password_hash").is_none());

    // Usernames are case-insensitive.
    let login = post(
        &client,
        auth.url("/v1/auth/login"),
        json!({ "username": username.to_uppercase(), "password": password }),
    )
    .await;
    assert_eq!(login.status, 200, "{}", login.body);
    assert_eq!(login.body["token_type"], "Bearer");
    assert_eq!(login.body["expires_in"], 900);
    assert_eq!(login.header("cache-control"), Some("no-store"));
    let access = login.body["access_token"].as_str().unwrap();
    let header = jwt_part(access, 0);
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(header["kid"], KEY_ID);
    let claims = jwt_part(access, 1);
    assert_eq!(claims["sub"], created.body["id"]);
    assert_eq!(claims["iss"], "taskstream-auth");
    assert_eq!(claims["aud"], "taskstream");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        900
    );

    let me = get_me(&auth, &client, access).await;
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.body["id"], created.body["id"]);
    assert_eq!(me.body["username"], username.to_lowercase());

    let logs = auth.process.logs();
    assert!(!logs.contains(password), "the password appears in the logs");
}

#[tokio::test]
async fn signup_rejects_taken_names_and_bad_input_with_the_fields_named() {
    let auth = start("signup-errors").await;
    let client = http1_client();
    let taken = unique_name("taken");
    let ok = post(
        &client,
        auth.url("/v1/auth/signup"),
        json!({ "username": taken, "password": "long enough" }),
    )
    .await;
    assert_eq!(ok.status, 201);
    let again = post(
        &client,
        auth.url("/v1/auth/signup"),
        json!({ "username": taken.to_uppercase(), "password": "long enough" }),
    )
    .await;
    assert_eq!(again.status, 409, "{}", again.body);
    assert_eq!(again.code(), "username_taken");

    let fresh = unique_name("fresh");
    let cases = [
        (
            json!({ "username": "ab", "password": "long enough" }),
            vec!["username"],
        ),
        (
            json!({ "username": "_leading", "password": "long enough" }),
            vec!["username"],
        ),
        (
            json!({ "username": "has space", "password": "long enough" }),
            vec!["username"],
        ),
        (
            json!({ "username": "x".repeat(31), "password": "long enough" }),
            vec!["username"],
        ),
        (
            json!({ "username": fresh, "password": "short" }),
            vec!["password"],
        ),
        (
            json!({ "username": fresh, "password": "p".repeat(129) }),
            vec!["password"],
        ),
        (
            json!({ "username": fresh, "password": "long enough", "nickname": "n".repeat(31) }),
            vec!["nickname"],
        ),
        (
            json!({ "username": fresh, "password": "long enough", "nickname": "  " }),
            vec!["nickname"],
        ),
        (
            json!({ "username": "a", "password": "b" }),
            vec!["password", "username"],
        ),
    ];
    for (body, fields) in cases {
        let answer = post(&client, auth.url("/v1/auth/signup"), body.clone()).await;
        assert_eq!(answer.status, 400, "{body}: {}", answer.body);
        assert_eq!(answer.code(), "invalid_input", "{body}");
        let expected: BTreeSet<String> = fields.iter().map(|f| f.to_string()).collect();
        assert_eq!(answer.invalid_fields(), expected, "{body}: {}", answer.body);
        for field in fields {
            assert!(
                answer.body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains(field),
                "message names {field}: {}",
                answer.body
            );
        }
    }

    // Bodies that are not the documented shape.
    for (body, content_type) in [
        ("not json", "application/json"),
        (r#"{"username": "fine_name"}"#, "application/json"),
        (
            r#"{"username": "fine_name", "password": "long enough", "admin": true}"#,
            "application/json",
        ),
        (
            r#"{"username": 42, "password": "long enough"}"#,
            "application/json",
        ),
    ] {
        let answer = Answer::read(
            client
                .post(auth.url("/v1/auth/signup"))
                .header("content-type", content_type)
                .body(body)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(answer.status, 400, "{body}: {}", answer.body);
        assert_eq!(answer.code(), "invalid_body", "{body}");
    }

    // Nothing was half-written: the rejected name is still free.
    let later = post(
        &client,
        auth.url("/v1/auth/signup"),
        json!({ "username": fresh, "password": "long enough" }),
    )
    .await;
    assert_eq!(later.status, 201, "{}", later.body);
}

#[tokio::test]
async fn simultaneous_signups_for_one_name_create_one_account() {
    let auth = Arc::new(start("signup-race").await);
    let username = unique_name("race");
    let attempts = (0..6).map(|_| {
        let (auth, username) = (auth.clone(), username.clone());
        tokio::spawn(async move {
            post(
                &http1_client(),
                auth.url("/v1/auth/signup"),
                json!({ "username": username, "password": "long enough" }),
            )
            .await
            .status
        })
    });
    let mut statuses: Vec<u16> = join_spawned(attempts).await;
    statuses.sort();
    assert_eq!(statuses, [201, 409, 409, 409, 409, 409]);
}

#[tokio::test]
async fn login_failures_look_the_same_for_unknown_users_and_wrong_passwords() {
    let auth = start("enumeration").await;
    let client = http1_client();
    let session = auth.signup_and_login(&client, "enum").await;

    let mut bodies = BTreeSet::new();
    // Each attempt, known user or not, costs one full password verification (the decoy hash has
    // the same parameters): counted on the password pool rather than timed, so machine load
    // cannot make the check flap.
    for _ in 0..3 {
        for username in [unique_name("nobody"), session.username.clone()] {
            let before = password_jobs(&client, &auth).await;
            let answer = post(
                &client,
                auth.url("/v1/auth/login"),
                json!({ "username": username, "password": "not the password" }),
            )
            .await;
            assert_eq!(answer.status, 401, "{}", answer.body);
            bodies.insert(answer.body.to_string());
            let after = password_jobs(&client, &auth).await;
            assert_eq!(after - before, 1.0, "{username}: one password verification");
        }
    }
    assert_eq!(bodies.len(), 1, "different answers: {bodies:?}");
    assert!(bodies
        .iter()
        .next()
        .unwrap()
        .contains("invalid_credentials"));
}

/// Jobs the password pool has run so far (each verification is one).
async fn password_jobs(client: &reqwest::Client, auth: &AuthServer) -> f64 {
    test_support::metric_sum_where(
        client,
        &auth.url("/metrics"),
        "worker_pool_wait_seconds_count",
        "pool=\"password\"",
    )
    .await
}

#[tokio::test]
async fn refresh_rotates_tokens_and_reuse_revokes_the_whole_session() {
    // No grace: a token presented again at once is reuse (the grace is tested in hardening.rs).
    let auth = AuthServer::start(
        &TestStack::from_env(),
        "refresh",
        &[("AUTH_REFRESH_REUSE_GRACE_SECS", "0")],
    )
    .await;
    let client = http1_client();
    let session = auth.signup_and_login(&client, "rotate").await;

    let first = post(
        &client,
        auth.url("/v1/auth/refresh"),
        json!({ "refresh_token": session.refresh_token }),
    )
    .await;
    assert_eq!(first.status, 200, "{}", first.body);
    let second_refresh = first.body["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(second_refresh, session.refresh_token);
    let new_access = first.body["access_token"].as_str().unwrap();
    assert_eq!(get_me(&auth, &client, new_access).await.status, 200);

    // The rotated-away token is presented again (say, by a thief): the session is revoked...
    let reused = post(
        &client,
        auth.url("/v1/auth/refresh"),
        json!({ "refresh_token": session.refresh_token }),
    )
    .await;
    assert_eq!(reused.status, 401, "{}", reused.body);
    assert_eq!(reused.code(), "refresh_token_reused");
    // ...so the legitimate newer token is dead too.
    let after = post(
        &client,
        auth.url("/v1/auth/refresh"),
        json!({ "refresh_token": second_refresh }),
    )
    .await;
    assert_eq!(after.status, 401, "{}", after.body);
    assert_eq!(after.code(), "invalid_refresh_token");

    // Other sessions of the same user are untouched.
    let other = auth
        .login(&client, &session.username, &session.password)
        .await;
    let other_refresh = post(
        &client,
        auth.url("/v1/auth/refresh"),
        json!({ "refresh_token": other["refresh_token"] }),
    )
    .await;
    assert_eq!(other_refresh.status, 200, "{}", other_refresh.body);

    for token in ["", "garbage", &"A".repeat(43), &"x".repeat(300)] {
        let answer = post(
            &client,
            auth.url("/v1/auth/refresh"),
            json!({ "refresh_token": token }),
        )
        .await;
        let expected = if token.is_empty() || token.len() > 256 {
            400
        } else {
            401
        };
        assert_eq!(answer.status, expected, "{token:?}: {}", answer.body);
    }
}

#[tokio::test]
async fn access_tokens_name_their_session_and_a_refresh_keeps_it() {
    let auth = start("sid").await;
    let client = http1_client();
    let session = auth.signup_and_login(&client, "sid").await;
    let sid = |token: &str| {
        let claims = jwt_part(token, 1);
        let sid = claims["sid"]
            .as_str()
            .unwrap_or_else(|| panic!("no sid in {claims}"));
        uuid::Uuid::parse_str(sid).unwrap_or_else(|_| panic!("sid {sid:?} is no UUID"))
    };
    let first = sid(&session.access_token);

    let refreshed = post(
        &client,
        auth.url("/v1/auth/refresh"),
        json!({ "refresh_token": session.refresh_token }),
    )
    .await;
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    let refreshed_access = refreshed.body["access_token"].as_str().unwrap();
    assert_eq!(
        sid(refreshed_access),
        first,
        "a refresh stays in its session"
    );
    assert_eq!(get_me(&auth, &client, refreshed_access).await.status, 200);

    let other = auth
        .login(&client, &session.username, &session.password)
        .await;
    assert_ne!(
        sid(other["access_token"].as_str().unwrap()),
        first,
        "each login is a session of its own"
    );
}

#[tokio::test]
async fn simultaneous_refreshes_with_one_token_each_get_a_pair_and_keep_the_session() {
    // Four tabs refresh the same token at once: within the reuse grace that is no theft, so
    // nobody is logged out and every new token works.
    let auth = Arc::new(start("refresh-race").await);
    let session = auth.signup_and_login(&http1_client(), "refrace").await;
    let attempts = (0..4).map(|_| {
        let (auth, token) = (auth.clone(), session.refresh_token.clone());
        tokio::spawn(async move {
            post(
                &http1_client(),
                auth.url("/v1/auth/refresh"),
                json!({ "refresh_token": token }),
            )
            .await
        })
    });
    let answers = join_spawned(attempts).await;
    let statuses: Vec<u16> = answers.iter().map(|answer| answer.status).collect();
    assert_eq!(statuses, [200, 200, 200, 200]);
    for answer in &answers {
        let next = post(
            &http1_client(),
            auth.url("/v1/auth/refresh"),
            json!({ "refresh_token": answer.body["refresh_token"] }),
        )
        .await;
        assert_eq!(next.status, 200, "{}", next.body);
    }
}

#[tokio::test]
async fn logout_ends_the_session_and_is_idempotent() {
    let auth = start("logout").await;
    let client = http1_client();
    let session = auth.signup_and_login(&client, "logout").await;
    let body = json!({ "refresh_token": session.refresh_token });

    let out = post(&client, auth.url("/v1/auth/logout"), body.clone()).await;
    assert_eq!(out.status, 204, "{}", out.body);
    let refresh = post(&client, auth.url("/v1/auth/refresh"), body.clone()).await;
    assert_eq!(refresh.status, 401);
    assert_eq!(refresh.code(), "invalid_refresh_token");
    assert_eq!(
        post(&client, auth.url("/v1/auth/logout"), body)
            .await
            .status,
        204
    );
    assert_eq!(
        post(
            &client,
            auth.url("/v1/auth/logout"),
            json!({ "refresh_token": "never issued" })
        )
        .await
        .status,
        204
    );
    let missing = post(&client, auth.url("/v1/auth/logout"), json!({})).await;
    assert_eq!(missing.status, 400);
}

#[tokio::test]
async fn profile_updates_are_validated_and_read_back() {
    let auth = start("profile").await;
    let client = http1_client();
    let session = auth.signup_and_login(&client, "profile").await;
    let patch = |body: Value| {
        let request = client
            .patch(auth.url("/v1/users/me"))
            .bearer_auth(&session.access_token)
            .json(&body);
        async move { Answer::read(request.send().await.unwrap()).await }
    };

    let changed =
        patch(json!({ "nickname": "Grace", "avatar_url": "https://cdn.example.com/g.png" })).await;
    assert_eq!(changed.status, 200, "{}", changed.body);
    assert_eq!(changed.body["nickname"], "Grace");
    assert_eq!(changed.body["avatar_url"], "https://cdn.example.com/g.png");
    let token = changed.header("x-consistency-token").unwrap().to_owned();

    // With the token from the write, the read reflects it whatever the replica has replayed.
    let read = Answer::read(
        client
            .get(auth.url("/v1/users/me"))
            .bearer_auth(&session.access_token)
            .header("x-consistency-token", &token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(read.status, 200);
    assert_eq!(read.body["nickname"], "Grace");

    // Absent fields stay; null clears.
    let cleared = patch(json!({ "avatar_url": null })).await;
    assert_eq!(cleared.status, 200, "{}", cleared.body);
    assert_eq!(cleared.body["nickname"], "Grace");
    assert_eq!(cleared.body["avatar_url"], Value::Null);
    let unchanged = patch(json!({})).await;
    assert_eq!(unchanged.body["nickname"], "Grace");

    for (body, field) in [
        (json!({ "avatar_url": "javascript:alert(1)" }), "avatar_url"),
        (
            json!({ "avatar_url": "ftp://example.com/a.png" }),
            "avatar_url",
        ),
        (
            json!({ "avatar_url": format!("https://example.com/{}", "a".repeat(190)) }),
            "avatar_url",
        ),
        (json!({ "nickname": "n".repeat(31) }), "nickname"),
        (json!({ "nickname": "" }), "nickname"),
        (json!({ "nickname": "bell\u{7}" }), "nickname"),
    ] {
        let answer = patch(body.clone()).await;
        assert_eq!(answer.status, 400, "{body}: {}", answer.body);
        assert_eq!(
            answer.invalid_fields(),
            BTreeSet::from([field.to_owned()]),
            "{body}"
        );
    }
    let unknown = patch(json!({ "username": "new-name" })).await;
    assert_eq!(unknown.status, 400);
    assert_eq!(unknown.code(), "invalid_body");

    let bad_token = Answer::read(
        client
            .get(auth.url("/v1/users/me"))
            .bearer_auth(&session.access_token)
            .header("x-consistency-token", "yesterday")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(bad_token.status, 400);
    assert_eq!(bad_token.code(), "invalid_consistency_token");

    // Rejected changes wrote nothing: read back with the token of the last accepted write.
    let final_state = Answer::read(
        client
            .get(auth.url("/v1/users/me"))
            .bearer_auth(&session.access_token)
            .header(
                "x-consistency-token",
                unchanged.header("x-consistency-token").unwrap(),
            )
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(final_state.body["nickname"], "Grace");
    assert_eq!(final_state.body["avatar_url"], Value::Null);
}

#[tokio::test]
async fn forged_expired_and_malformed_access_tokens_are_rejected() {
    let auth = start("forgery").await;
    let client = http1_client();
    let session = auth.signup_and_login(&client, "victim").await;
    let real_key = EncodingKey::from_ed_pem(
        &std::fs::read(auth.keys_dir.join(format!("{KEY_ID}.pem"))).unwrap(),
    )
    .unwrap();
    let claims = |expires_in: i64, audience: &str| {
        json!({
            "sub": session.user_id, "iss": "taskstream-auth", "aud": audience,
            "iat": now_secs(), "exp": now_secs() + expires_in, "jti": uuid::Uuid::new_v4(),
        })
    };
    let sign = |claims: &Value, key: &EncodingKey, algorithm: Algorithm| {
        let mut header = Header::new(algorithm);
        header.kid = Some(KEY_ID.to_owned());
        jsonwebtoken::encode(&header, claims, key).unwrap()
    };

    // The real key with honest claims works: the failures below are the forgeries'.
    assert_eq!(
        get_me(
            &auth,
            &client,
            &sign(&claims(600, "taskstream"), &real_key, Algorithm::EdDSA)
        )
        .await
        .status,
        200
    );

    let other_dir = TestStack::from_env().scratch_dir("forger").join("keys");
    let forger_key =
        EncodingKey::from_ed_pem(&std::fs::read(keygen(&other_dir, KEY_ID)).unwrap()).unwrap();
    let jwks: Value = client
        .get(auth.url("/v1/auth/jwks"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let public_key = URL_SAFE_NO_PAD
        .decode(jwks["keys"][0]["x"].as_str().unwrap())
        .unwrap();
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(json!({ "alg": "none", "typ": "JWT", "kid": KEY_ID }).to_string()),
        URL_SAFE_NO_PAD.encode(claims(600, "taskstream").to_string())
    );

    let cases = [
        (
            "expired",
            sign(&claims(-120, "taskstream"), &real_key, Algorithm::EdDSA),
            "expired",
        ),
        (
            "another key",
            sign(&claims(600, "taskstream"), &forger_key, Algorithm::EdDSA),
            "bad signature",
        ),
        (
            "wrong audience",
            sign(&claims(600, "elsewhere"), &real_key, Algorithm::EdDSA),
            "wrong audience",
        ),
        ("alg none", unsigned, "malformed"),
        (
            "HS256 keyed with the public key",
            sign(
                &claims(600, "taskstream"),
                &EncodingKey::from_secret(&public_key),
                Algorithm::HS256,
            ),
            "algorithm HS256",
        ),
        ("garbage", "not-a-jwt".to_owned(), "malformed"),
    ];
    for (case, token, reason) in cases {
        let answer = get_me(&auth, &client, &token).await;
        assert_eq!(answer.status, 401, "{case}: {}", answer.body);
        assert_eq!(answer.code(), "invalid_token", "{case}");
        assert!(
            answer.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains(reason),
            "{case}: {}",
            answer.body
        );
        assert!(
            answer
                .header("www-authenticate")
                .is_some_and(|h| h.starts_with("Bearer error=\"invalid_token\"")),
            "{case}: {:?}",
            answer.headers
        );
    }

    let anonymous = Answer::read(client.get(auth.url("/v1/users/me")).send().await.unwrap()).await;
    assert_eq!(anonymous.status, 401);
    assert_eq!(anonymous.code(), "unauthorized");
    assert_eq!(anonymous.header("www-authenticate"), Some("Bearer"));

    let metrics = auth.url("/metrics");
    assert!(metric_sum(&client, &metrics, "access_tokens_rejected_total").await >= 7.0);
}

#[tokio::test]
async fn jwks_publishes_only_public_keys_and_rotation_keeps_earlier_tokens_valid() {
    let stack = TestStack::from_env();
    let client = http1_client();
    let first = start("rotation-1").await;
    let before: Session = first.signup_and_login(&client, "rotation").await;
    let keys_dir = first.keys_dir.clone();
    drop(first);

    // Rotation: a second key joins the folder and becomes the signer.
    keygen(&keys_dir, "test-key-2");
    let rotated = AuthServer::start_with_keys(
        &stack,
        &stack.scratch_dir("rotation-2"),
        keys_dir,
        "test-key-2",
        &[],
    )
    .await;
    let jwks = Answer::read(
        client
            .get(rotated.url("/v1/auth/jwks"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(jwks.status, 200);
    assert!(jwks
        .header("cache-control")
        .is_some_and(|c| c.contains("max-age")));
    let keys = jwks.body["keys"].as_array().unwrap();
    let kids: BTreeSet<&str> = keys.iter().map(|k| k["kid"].as_str().unwrap()).collect();
    assert_eq!(kids, BTreeSet::from([KEY_ID, "test-key-2"]));
    for key in keys {
        assert_eq!(key["kty"], "OKP");
        assert_eq!(key["crv"], "Ed25519");
        assert_eq!(key["alg"], "EdDSA");
        assert_eq!(key["use"], "sig");
        assert!(
            key.get("d").is_none(),
            "private key material published: {key}"
        );
    }

    assert_eq!(
        get_me(&rotated, &client, &before.access_token).await.status,
        200,
        "a token of the previous key still works"
    );
    let after = rotated
        .login(&client, &before.username, &before.password)
        .await;
    let token = after["access_token"].as_str().unwrap();
    assert_eq!(jwt_part(token, 0)["kid"], "test-key-2");
    assert_eq!(get_me(&rotated, &client, token).await.status, 200);
}

#[tokio::test]
async fn wrong_methods_get_a_json_405() {
    let auth = start("methods").await;
    let answer = Answer::read(
        http1_client()
            .get(auth.url("/v1/auth/login"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 405);
    assert_eq!(answer.code(), "method_not_allowed");
}

#[tokio::test]
async fn openapi_describes_every_route() {
    let auth = start("openapi").await;
    let document: Value = http1_client()
        .get(auth.url("/v1/auth/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(document["openapi"].as_str().unwrap().starts_with("3.1"));
    let operations = openapi_operations(&document);
    let expected: BTreeSet<String> = [
        "POST /v1/auth/signup",
        "POST /v1/auth/login",
        "POST /v1/auth/refresh",
        "POST /v1/auth/logout",
        "GET /v1/auth/jwks",
        "GET /v1/users/me",
        "PATCH /v1/users/me",
        "DELETE /v1/users/me",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(operations, expected);
    let schemas = &document["components"]["schemas"];
    for schema in [
        "SignupRequest",
        "TokenResponse",
        "UserProfile",
        "ErrorBody",
        "ProfilePatch",
        "DeleteAccountRequest",
    ] {
        assert!(schemas.get(schema).is_some(), "missing schema {schema}");
    }
    assert_eq!(
        document["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
}

#[tokio::test]
async fn expired_refresh_tokens_are_deleted_in_batches_until_none_is_left() {
    use service_kit::sqlx::{self, Connection, PgConnection};
    let stack = TestStack::from_env();
    let database = stack.scratch_database("auth");
    let mut conn = PgConnection::connect(&database[0].1).await.unwrap();
    // Far more long-expired tokens than one batch, in many old sessions, and one live session.
    const EXPIRED: i32 = 25_000;
    sqlx::query(
        "WITH account AS ( \
           INSERT INTO users (id, username, password_hash) \
           VALUES (gen_random_uuid(), 'swept', 'x') RETURNING id), \
         families AS ( \
           INSERT INTO refresh_token_families (id, user_id, created_at) \
           SELECT gen_random_uuid(), account.id, \
                  CASE WHEN n <= $1 THEN now() - interval '40 days' ELSE now() END \
           FROM account, generate_series(1, $1 + 1) AS n RETURNING id, created_at) \
         INSERT INTO refresh_tokens (token_hash, family_id, issued_at, expires_at) \
         SELECT sha256(id::text::bytea), id, created_at, created_at + interval '30 days' \
         FROM families",
    )
    .bind(EXPIRED)
    .execute(&mut conn)
    .await
    .unwrap();

    let mut settings: Vec<(&str, &str)> = database
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    settings.push(("HOUSEKEEPING_INTERVAL_SECS", "1"));
    let _auth = AuthServer::start(&stack, "auth-housekeeping", &settings).await;
    let pool = sqlx::PgPool::connect(&database[0].1).await.unwrap();
    let remaining = poll_until(
        Duration::from_secs(30),
        || async {
            sqlx::query_as::<_, (i64, i64)>(
                "SELECT (SELECT count(*) FROM refresh_tokens), (SELECT count(*) FROM refresh_token_families)",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        },
        |remaining| *remaining == (1, 1),
    )
    .await;
    assert_eq!(
        remaining,
        (1, 1),
        "(tokens, sessions) left: only the live one"
    );
}

#[tokio::test]
async fn deleting_an_account_needs_the_password_and_ends_everything() {
    let auth = start("delete").await;
    let client = http1_client();
    let session = auth.signup_and_login(&client, "gone").await;
    let delete = |password: &str| {
        client
            .delete(auth.url("/v1/users/me"))
            .bearer_auth(&session.access_token)
            .json(&json!({ "password": password }))
            .send()
    };

    let refused = Answer::read(delete("not my password").await.unwrap()).await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.body["error"]["code"], "invalid_credentials");
    assert_eq!(
        get_me(&auth, &client, &session.access_token).await.status,
        200
    );
    let bad_body = Answer::read(
        client
            .delete(auth.url("/v1/users/me"))
            .bearer_auth(&session.access_token)
            .json(&json!({ "password": "" }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(bad_body.status, 400);

    let deleted = delete(&session.password).await.unwrap();
    assert_eq!(deleted.status(), 204);
    let me = get_me(&auth, &client, &session.access_token).await;
    assert_eq!(
        me.status, 401,
        "the account's access token is refused at once"
    );
    assert_eq!(me.body["error"]["code"], "invalid_token");
    let refreshed = post(
        &client,
        auth.url("/v1/auth/refresh"),
        json!({ "refresh_token": session.refresh_token }),
    )
    .await;
    assert_eq!(refreshed.status, 401, "every session ended");
    let again = post(
        &client,
        auth.url("/v1/auth/login"),
        json!({ "username": session.username, "password": session.password }),
    )
    .await;
    assert_eq!(again.status, 401, "the credentials are gone");

    // The name is free: a new account, with nothing of the old one.
    let reborn = post(
        &client,
        auth.url("/v1/auth/signup"),
        json!({ "username": session.username, "password": "another password" }),
    )
    .await;
    assert_eq!(reborn.status, 201);
    assert_ne!(reborn.body["id"], session.user_id.as_str());
    assert_eq!(reborn.body["nickname"], Value::Null);
}
