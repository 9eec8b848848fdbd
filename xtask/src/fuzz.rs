//! `cargo xtask fuzz` (and a step of `cargo xtask test`): schema-based fuzzing of every service's
//! OpenAPI document with schemathesis, through the edge of a running `cargo xtask up`, with a
//! valid access token. Every check is on (`schemathesis.toml` at the root says where the API
//! answers by its state or by rules a JSON Schema cannot state); any failure fails the run.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::check::account_token;
use crate::{prereqs, workspace_root, EDGE_PORT};

/// The services whose documents are fuzzed (`/v1/<service>/openapi.json`).
const DOCUMENTS: [&str; 4] = ["auth", "tasks", "notifications", "analysis"];
/// Cases per operation and phase: enough to walk every rule, bounded in time (~30 s for all four
/// documents here). Raise it by hand with `--max-examples`.
const MAX_EXAMPLES: &str = "50";
/// One seed, so a failure found in CI is found again by the same command.
const SEED: &str = "1";

/// Fuzzes every document; `extra` goes to each schemathesis run (e.g. `--max-examples 500`).
pub async fn run(client: &reqwest::Client, extra: &[String]) -> Result<()> {
    let schemathesis = prereqs::ensure_schemathesis()?;
    let edge = format!("http://127.0.0.1:{EDGE_PORT}");
    let mut summaries = Vec::new();
    for service in DOCUMENTS {
        // An account of its own per document: fuzzing auth's routes may log it out or rate-limit
        // its logins, which must not leave the next document without a valid token.
        let username = format!("fuzz-{service}-{}", std::process::id());
        let token = account_token(client, &username).await?;
        let document = format!("{edge}/v1/{service}/openapi.json");
        let output = Command::new(&schemathesis)
            .current_dir(workspace_root())
            .args(["run", &document, "--url", &edge])
            .args(["--header", &format!("Authorization: Bearer {token}")])
            .args(["--max-examples", MAX_EXAMPLES, "--seed", SEED])
            .args(["--no-color"])
            .args(extra)
            .output()
            .context("running schemathesis")?;
        let text = String::from_utf8_lossy(&output.stdout);
        let summary = text
            .lines()
            .find(|line| line.contains(" generated, "))
            .unwrap_or("no summary")
            .trim()
            .to_owned();
        if !output.status.success() {
            println!("{text}{}", String::from_utf8_lossy(&output.stderr));
            bail!("schemathesis found problems in {document}: {summary}");
        }
        println!("xtask: fuzz {service}: {summary}");
        summaries.push(summary);
    }
    println!(
        "xtask: schemathesis passed on {} OpenAPI documents",
        summaries.len()
    );
    Ok(())
}
