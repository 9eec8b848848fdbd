//! The notifications binary runs the shared spine correctly against the real stack.

use test_support::auth::AuthServer;
use test_support::{spine_checks, TestStack};

/// Where no auth answers: enough for the checks that stop before serving.
const JWKS: (&str, &str) = ("AUTH_JWKS_URL", "http://127.0.0.1:9/v1/auth/jwks");

#[tokio::test]
async fn serves_standard_endpoints_over_http1_and_h2c() {
    // Ready once it has auth's keys, so a real auth serves them.
    let stack = TestStack::from_env();
    let auth = AuthServer::start(&stack, "notifications-spine-auth", &[]).await;
    let jwks = auth.url("/v1/auth/jwks");
    spine_checks::standard_endpoints(
        env!("CARGO_BIN_EXE_notifications"),
        "notifications",
        "notifications",
        &[("AUTH_JWKS_URL", jwks.as_str())],
    )
    .await;
}

#[tokio::test]
async fn is_not_ready_until_it_has_the_keys_to_verify_tokens() {
    spine_checks::not_ready_without_keys(
        env!("CARGO_BIN_EXE_notifications"),
        "notifications",
        &[JWKS],
    )
    .await;
}

#[test]
fn rejects_bad_environment_with_one_line() {
    spine_checks::rejects_bad_environment(env!("CARGO_BIN_EXE_notifications"), &[JWKS]);
}
