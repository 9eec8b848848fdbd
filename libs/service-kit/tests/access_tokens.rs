//! The shared access-token verifier as other services use it: the probe service verifies tokens
//! issued by the real auth service against auth's JWKS, fetched over HTTP and cached.
//!
//! The JWKS is served by a small stand-in server that relays real auth JWKS documents and counts
//! fetches, so the test decides when "auth is redeployed with a new key" or "auth is down".

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use test_support::auth::{keygen, AuthServer};
use test_support::{http1_client, ServiceProcess, TestStack};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

mod common;
use common::start_probe;

/// Serves `document` (or 503 while it is `None`) to every request, counting requests.
struct JwksStandIn {
    url: String,
    document: Arc<Mutex<Option<String>>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksStandIn {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/auth/jwks", listener.local_addr().unwrap());
        let document = Arc::new(Mutex::new(None::<String>));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (served, counted) = (document.clone(), fetches.clone());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let (served, counted) = (served.clone(), counted.clone());
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = socket.read(&mut request).await;
                    counted.fetch_add(1, Ordering::SeqCst);
                    let body = served.lock().unwrap().clone();
                    let response = match body {
                        Some(body) => format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        ),
                        None => "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned(),
                    };
                    let _ = socket.write_all(response.as_bytes()).await;
                });
            }
        });
        Self {
            url,
            document,
            fetches,
        }
    }

    fn serve(&self, document: Option<String>) {
        *self.document.lock().unwrap() = document;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

async fn jwks_of(auth: &AuthServer) -> String {
    http1_client()
        .get(auth.url("/v1/auth/jwks"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Status and body of `GET /probe/whoami` with `token`.
async fn whoami(probe: &ServiceProcess, token: &str) -> (u16, Value) {
    let response = http1_client()
        .get(probe.url("/probe/whoami"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifies_auth_tokens_from_cached_keys_and_learns_rotated_keys() {
    let stack = TestStack::from_env();
    let client = http1_client();
    let before = AuthServer::start(&stack, "verifier-auth-1", &[]).await;
    let old_session = before.signup_and_login(&client, "verify").await;

    let jwks = JwksStandIn::start().await;
    jwks.serve(Some(jwks_of(&before).await));
    let probe = start_probe(
        &stack,
        stack.replica_port,
        "verifier-probe",
        &[("AUTH_JWKS_URL", &jwks.url)],
    )
    .await;

    let (status, body) = whoami(&probe, &old_session.access_token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user_id"], old_session.user_id.as_str());
    // The hot path never calls auth: one fetch, however many requests.
    for _ in 0..20 {
        assert_eq!(whoami(&probe, &old_session.access_token).await.0, 200);
    }
    assert_eq!(jwks.fetches(), 1);

    // auth is redeployed with a second key that signs from now on.
    let keys_dir = before.keys_dir.clone();
    drop(before);
    keygen(&keys_dir, "test-key-2");
    let after = AuthServer::start_with_keys(
        &stack,
        &stack.scratch_dir("verifier-auth-2"),
        keys_dir,
        "test-key-2",
        &[],
    )
    .await;
    jwks.serve(Some(jwks_of(&after).await));
    let new_token = after
        .login(&client, &old_session.username, &old_session.password)
        .await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = whoami(&probe, &new_token).await;
    assert_eq!(
        status, 200,
        "a token of a key not yet seen triggers a fetch: {body}"
    );
    assert_eq!(jwks.fetches(), 2);

    // auth's keys endpoint goes down: verification goes on from the cache.
    jwks.serve(None);
    assert_eq!(whoami(&probe, &old_session.access_token).await.0, 200);
    assert_eq!(whoami(&probe, &new_token).await.0, 200);

    // Tokens naming keys nobody published cannot make the service hammer auth.
    let mut header: Value = serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            new_token.split('.').next().unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    header["kid"] = "forged-key".into();
    let mut parts: Vec<String> = new_token.split('.').map(str::to_owned).collect();
    parts[0] = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        header.to_string(),
    );
    let forged = parts.join(".");
    let fetches_before = jwks.fetches();
    for _ in 0..10 {
        let (status, body) = whoami(&probe, &forged).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"]["code"], "invalid_token");
    }
    assert!(
        jwks.fetches() - fetches_before <= 1,
        "{} fetches for 10 forged tokens",
        jwks.fetches() - fetches_before
    );
    assert_eq!(whoami(&probe, "garbage").await.0, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_any_keys_yet_the_answer_is_503_not_401() {
    let stack = TestStack::from_env();
    let auth = AuthServer::start(&stack, "verifier-unreachable-auth", &[]).await;
    let session = auth.signup_and_login(&http1_client(), "nokeys").await;
    let jwks = JwksStandIn::start().await;
    let probe = start_probe(
        &stack,
        stack.replica_port,
        "verifier-unreachable",
        &[("AUTH_JWKS_URL", &jwks.url)],
    )
    .await;

    // The keys cannot be fetched: the client is not at fault, so no 401 that would log it out.
    let (status, body) = whoami(&probe, &session.access_token).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");

    jwks.serve(Some(jwks_of(&auth).await));
    // Right after a failed fetch, requests fail fast rather than each calling auth...
    assert_eq!(whoami(&probe, &session.access_token).await.0, 503);
    assert_eq!(jwks.fetches(), 1);
    // ...and a second later the next one tries again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = whoami(&probe, &session.access_token).await;
    assert_eq!(status, 200, "{body}");
}
