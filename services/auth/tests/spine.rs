//! The auth binary runs the shared spine correctly against the real stack, and refuses to start
//! without usable signing keys.

use std::path::PathBuf;

use test_support::auth::{keygen, KEY_ID};
use test_support::{run_to_exit, spine_checks, TestStack};

const AUTH: &str = env!("CARGO_BIN_EXE_auth");

fn keys_dir(label: &str) -> PathBuf {
    let dir = TestStack::from_env().scratch_dir(label).join("keys");
    keygen(&dir, KEY_ID);
    dir
}

#[tokio::test]
async fn serves_standard_endpoints_over_http1_and_h2c() {
    let keys = keys_dir("auth-spine");
    let keys = keys.to_str().unwrap();
    spine_checks::standard_endpoints(
        AUTH,
        "auth",
        "auth",
        &[
            ("AUTH_JWT_KEYS_DIR", keys),
            ("AUTH_JWT_ACTIVE_KEY_ID", KEY_ID),
        ],
    )
    .await;
}

#[test]
fn rejects_bad_environment_with_one_line() {
    let keys = keys_dir("auth-env");
    spine_checks::rejects_bad_environment(
        AUTH,
        &[
            ("AUTH_JWT_KEYS_DIR", keys.to_str().unwrap()),
            ("AUTH_JWT_ACTIVE_KEY_ID", KEY_ID),
        ],
    );
}

#[test]
fn refuses_to_start_without_usable_signing_keys() {
    let keys = keys_dir("auth-keys");
    let keys = keys.to_str().unwrap();
    let empty = TestStack::from_env().scratch_dir("auth-no-keys");
    let empty = empty.to_str().unwrap();
    let base = [
        ("DATABASE_WRITER_URL", "postgres://x@127.0.0.1:1/x"),
        ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1"),
    ];
    type Vars<'a> = &'a [(&'a str, &'a str)];
    let cases: [(Vars, &str, &str); 4] = [
        (
            &[("AUTH_JWT_ACTIVE_KEY_ID", KEY_ID)],
            "AUTH_JWT_KEYS_DIR is required",
            "no folder",
        ),
        (
            &[
                ("AUTH_JWT_KEYS_DIR", empty),
                ("AUTH_JWT_ACTIVE_KEY_ID", KEY_ID),
            ],
            "holds no <key-id>.pem files",
            "an empty folder",
        ),
        (
            &[
                ("AUTH_JWT_KEYS_DIR", keys),
                ("AUTH_JWT_ACTIVE_KEY_ID", "retired"),
            ],
            "no retired.pem",
            "an active key that is not there",
        ),
        (
            &[
                ("AUTH_JWT_KEYS_DIR", keys),
                ("AUTH_JWT_ACTIVE_KEY_ID", KEY_ID),
                ("AUTH_ACCESS_TOKEN_TTL_SECS", "5"),
            ],
            "AUTH_ACCESS_TOKEN_TTL_SECS=\"5\" is invalid: must be between 30 and 86400",
            "a token lifetime out of range",
        ),
    ];
    for (vars, expected, case) in cases {
        let env: Vec<(&str, &str)> = base.iter().chain(vars).copied().collect();
        let (status, stdout, stderr) = run_to_exit(AUTH, &env);
        assert_eq!(status.code(), Some(2), "{case}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{case}: {stderr}");
        assert!(stderr.contains(expected), "{case}: {stderr}");
        assert!(stdout.is_empty(), "{case}: {stdout}");
    }
}
