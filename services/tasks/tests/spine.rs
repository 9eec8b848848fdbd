//! The tasks binary runs the shared spine correctly against the real stack, and will not start
//! without knowing where auth's keys are.

use test_support::auth::AuthServer;
use test_support::{run_to_exit, spine_checks, TestStack};

const TASKS: &str = env!("CARGO_BIN_EXE_tasks");
/// Where no auth answers: enough for the checks that stop before serving.
const JWKS: (&str, &str) = ("AUTH_JWKS_URL", "http://127.0.0.1:9/v1/auth/jwks");

#[tokio::test]
async fn serves_standard_endpoints_over_http1_and_h2c() {
    // Ready once it has auth's keys, so a real auth serves them.
    let stack = TestStack::from_env();
    let auth = AuthServer::start(&stack, "tasks-spine-auth", &[]).await;
    let jwks = auth.url("/v1/auth/jwks");
    spine_checks::standard_endpoints(TASKS, "tasks", "tasks", &[("AUTH_JWKS_URL", jwks.as_str())])
        .await;
}

#[tokio::test]
async fn is_not_ready_until_it_has_the_keys_to_verify_tokens() {
    spine_checks::not_ready_without_keys(TASKS, "tasks", &[JWKS]).await;
}

#[test]
fn rejects_bad_environment_with_one_line() {
    spine_checks::rejects_bad_environment(TASKS, &[JWKS]);
}

#[test]
fn refuses_to_start_without_a_usable_jwks_url() {
    let base = [
        ("DATABASE_WRITER_URL", "postgres://x@127.0.0.1:1/x"),
        ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1"),
    ];
    for (extra, expected) in [
        (None, "AUTH_JWKS_URL is required"),
        (
            Some(("AUTH_JWKS_URL", "auth:8081/jwks")),
            "AUTH_JWKS_URL=\"auth:8081/jwks\" is invalid",
        ),
    ] {
        let env: Vec<(&str, &str)> = base.iter().copied().chain(extra).collect();
        let (status, _, stderr) = run_to_exit(TASKS, &env);
        assert_eq!(status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
    }
}
