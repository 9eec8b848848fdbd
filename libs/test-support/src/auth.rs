//! A real auth service for tests: started against the test stack with a signing key of its own,
//! and the steps other tests begin with (sign up, log in).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::{unique_name, workspace_binary, ServiceProcess, TestStack};

/// The key id of the key every [`AuthServer`] starts with.
pub const KEY_ID: &str = "test-key-1";

/// Writes a new Ed25519 key `<dir>/<key_id>.pem` with `auth keygen`.
pub fn keygen(dir: &Path, key_id: &str) -> PathBuf {
    let output = Command::new(workspace_binary("auth"))
        .arg("keygen")
        .arg(dir)
        .arg(key_id)
        .output()
        .expect("run auth keygen");
    assert!(
        output.status.success(),
        "auth keygen: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    dir.join(format!("{key_id}.pem"))
}

/// A running auth process.
pub struct AuthServer {
    pub process: ServiceProcess,
    /// Its `AUTH_JWT_KEYS_DIR`, holding `KEY_ID.pem`.
    pub keys_dir: PathBuf,
}

/// A logged-in account.
#[derive(Debug, Clone)]
pub struct Session {
    pub user_id: String,
    pub username: String,
    pub password: String,
    pub access_token: String,
    pub refresh_token: String,
}

impl AuthServer {
    /// Starts auth (database `auth` on the stack) with a fresh key, plus `extra` variables.
    pub async fn start(stack: &TestStack, label: &str, extra: &[(&str, &str)]) -> Self {
        let scratch = stack.scratch_dir(label);
        let keys_dir = scratch.join("keys");
        keygen(&keys_dir, KEY_ID);
        Self::start_with_keys(stack, &scratch, keys_dir, KEY_ID, extra).await
    }

    /// Starts auth with the keys already in `keys_dir`, signing with `active_key_id`.
    pub async fn start_with_keys(
        stack: &TestStack,
        log_dir: &Path,
        keys_dir: PathBuf,
        active_key_id: &str,
        extra: &[(&str, &str)],
    ) -> Self {
        let mut env = stack.service_env("auth");
        env.push(("AUTH_JWT_KEYS_DIR".into(), keys_dir.display().to_string()));
        env.push(("AUTH_JWT_ACTIVE_KEY_ID".into(), active_key_id.into()));
        // Every test client is 127.0.0.1: tests sign up many accounts from it. A test of the
        // signup limit sets its own (`extra` comes later and wins).
        env.push(("AUTH_SIGNUP_LIMIT_PER_CLIENT".into(), "100000".into()));
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut process = ServiceProcess::spawn(workspace_binary("auth"), &env, log_dir);
        process.wait_ready().await;
        Self { process, keys_dir }
    }

    pub fn url(&self, path: &str) -> String {
        self.process.url(path)
    }

    /// Signs up a new account named `prefix…` and logs it in.
    pub async fn signup_and_login(&self, client: &reqwest::Client, prefix: &str) -> Session {
        let username = unique_name(prefix);
        let password = format!("pw-{username}-secret");
        let signup = client
            .post(self.url("/v1/auth/signup"))
            .json(&json!({ "username": username, "password": password }))
            .send()
            .await
            .expect("POST /v1/auth/signup");
        assert_eq!(signup.status(), 201, "{}", signup.text().await.unwrap());
        let account: Value = signup.json().await.unwrap();
        let tokens = self.login(client, &username, &password).await;
        Session {
            user_id: account["id"].as_str().expect("id").to_owned(),
            username,
            password,
            access_token: tokens["access_token"].as_str().expect("token").to_owned(),
            refresh_token: tokens["refresh_token"].as_str().expect("token").to_owned(),
        }
    }

    /// Logs in and returns the token response; panics unless it is a 200.
    pub async fn login(&self, client: &reqwest::Client, username: &str, password: &str) -> Value {
        let response = client
            .post(self.url("/v1/auth/login"))
            .json(&json!({ "username": username, "password": password }))
            .send()
            .await
            .expect("POST /v1/auth/login");
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
        response.json().await.unwrap()
    }
}
