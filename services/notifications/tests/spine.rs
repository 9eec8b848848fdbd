//! The notifications binary runs the shared spine correctly against the real stack.

use test_support::spine_checks;

/// Readiness does not depend on auth: the keys are fetched when the first token arrives.
const JWKS: (&str, &str) = ("AUTH_JWKS_URL", "http://127.0.0.1:9/v1/auth/jwks");

#[tokio::test]
async fn serves_standard_endpoints_over_http1_and_h2c() {
    spine_checks::standard_endpoints(
        env!("CARGO_BIN_EXE_notifications"),
        "notifications",
        "notifications",
        &[JWKS],
    )
    .await;
}

#[test]
fn rejects_bad_environment_with_one_line() {
    spine_checks::rejects_bad_environment(env!("CARGO_BIN_EXE_notifications"), &[JWKS]);
}
