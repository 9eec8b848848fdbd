//! What a deploy does before the services start, done for the local stacks: every service's
//! migrations run once (as the chart's hook Job does), and auth gets a signing key. Also the
//! environment each service is started with by `cargo xtask up`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use local_postgres::database_url;

use crate::stack::{log_file, StackLayout, SERVICES};
use crate::EDGE_PORT;

/// The key id of the signing key made for the local stack.
pub const LOCAL_KEY_ID: &str = "local-1";

/// The VAPID private key (P-256, 32 bytes base64url) notifications signs pushes with on the
/// local stack. LOCAL DEVELOPMENT ONLY: it is public in this repository, so it must never be
/// used by a cluster (their key comes from a secret, see charts/).
pub const LOCAL_VAPID_PRIVATE_KEY: &str = "i2L6D3LUgWwDx8d-i6zIQ31x467ckHuY3DlmmvF29ZE";

/// Runs `<service> migrate` for every service against the primary on `primary_port`.
pub fn migrate_all(binaries: &Path, primary_port: u16, logs: &Path) -> Result<()> {
    for (service, _) in SERVICES {
        let log = log_file(logs, &format!("{service}-migrate"))?;
        let status = Command::new(binaries.join(service))
            .arg("migrate")
            .env_clear()
            .env("DATABASE_WRITER_URL", database_url(primary_port, service))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .with_context(|| format!("running `{service} migrate`"))?;
        if !status.success() {
            bail!(
                "`{service} migrate` failed ({status}); see {}",
                logs.join(format!("{service}-migrate.log")).display()
            );
        }
    }
    Ok(())
}

/// auth's key folder under `state`, holding one signing key made on first use, so tokens stay
/// valid across restarts of the local stack.
pub fn auth_keys(binaries: &Path, state: &Path) -> Result<PathBuf> {
    let dir = state.join("auth-keys");
    if !dir.join(format!("{LOCAL_KEY_ID}.pem")).exists() {
        let output = Command::new(binaries.join("auth"))
            .arg("keygen")
            .arg(&dir)
            .arg(LOCAL_KEY_ID)
            .output()
            .context("running `auth keygen`")?;
        if !output.status.success() {
            bail!(
                "`auth keygen` failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    Ok(dir)
}

/// The environment `cargo xtask up` starts `service` with.
pub fn service_env(
    service: &str,
    port: u16,
    layout: &StackLayout,
    auth_keys: &Path,
) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("HTTP_HOST", "127.0.0.1".to_owned()),
        ("HTTP_PORT", port.to_string()),
        // The edge (on loopback) appends the client's address, as the gateway does in the
        // cluster; its X-Forwarded-For is believed from loopback only.
        ("HTTP_TRUSTED_PROXIES", "127.0.0.1".to_owned()),
        (
            "DATABASE_WRITER_URL",
            database_url(layout.primary_port, service),
        ),
        (
            "DATABASE_READER_URL",
            database_url(layout.replica_port, service),
        ),
        (
            "KAFKA_BOOTSTRAP_SERVERS",
            format!("127.0.0.1:{}", layout.broker_port),
        ),
    ];
    if service == "notifications" {
        // Pages served from the local edge may open live sockets.
        env.push((
            "LIVE_ALLOWED_ORIGINS",
            format!("http://127.0.0.1:{EDGE_PORT},http://localhost:{EDGE_PORT}"),
        ));
        // Web Push on, towards the local push service (`local-push`, http on loopback).
        env.push(("PUSH_VAPID_PRIVATE_KEY", LOCAL_VAPID_PRIVATE_KEY.to_owned()));
        env.push(("PUSH_VAPID_SUBJECT", "mailto:dev@localhost".to_owned()));
        env.push(("PUSH_ALLOW_HTTP_LOOPBACK", "true".to_owned()));
    }
    if service == "auth" {
        env.push(("AUTH_JWT_KEYS_DIR", auth_keys.display().to_string()));
        env.push(("AUTH_JWT_ACTIVE_KEY_ID", LOCAL_KEY_ID.to_owned()));
        // Every local client (browser, curl, k6, the benches) is 127.0.0.1 to auth: one client
        // address for all of them, so the per-client signup limit is lifted locally.
        env.push(("AUTH_SIGNUP_LIMIT_PER_CLIENT", "1000000".to_owned()));
    } else {
        let auth_port = SERVICES
            .iter()
            .find_map(|(name, port)| (*name == "auth").then_some(*port))
            .unwrap_or(8081);
        env.push((
            "AUTH_JWKS_URL",
            format!("http://127.0.0.1:{auth_port}/v1/auth/jwks"),
        ));
    }
    env
}
