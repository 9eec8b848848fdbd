//! `cargo xtask load <scenario> [--smoke]`: runs the k6 script `loadtest/<scenario>.js` against a
//! fresh `cargo xtask up --release` started with load-test settings, writes the report, stops
//! everything. `--smoke` runs it briefly on the debug binaries the tests use, to prove the script
//! still works.

use std::process::Command;

use anyhow::{ensure, Context, Result};

use crate::up_process::RunningUp;
use crate::{prereqs, stack, workspace_root, Build, EDGE_PORT};

/// The scenarios in `loadtest/` (`<name>.js`).
pub const SCENARIOS: [&str; 2] = ["auth", "tasks"];

/// Settings the system runs with under load: login limits out of the way (every virtual user
/// comes from 127.0.0.1 and reuses a few accounts) and only warnings logged.
const LOAD_SETTINGS: [(&str, &str); 3] = [
    ("AUTH_LOGIN_LIMIT_PER_USERNAME", "1000000"),
    ("AUTH_LOGIN_LIMIT_PER_CLIENT", "1000000"),
    ("RUST_LOG", "warn"),
];

pub async fn run(scenario: &str, smoke: bool) -> Result<()> {
    let root = workspace_root();
    let script = root.join("loadtest").join(format!("{scenario}.js"));
    ensure!(
        script.is_file(),
        "no scenario {scenario:?}: expected {}",
        script.display()
    );
    let k6 = prereqs::ensure_k6()?;
    let reports = stack::state_dir(&root).join("loadtest");
    std::fs::create_dir_all(&reports)?;

    let build = if smoke {
        Build::AsTests
    } else {
        Build::Release
    };
    let up = RunningUp::start(build, &LOAD_SETTINGS).await?;
    println!(
        "xtask: k6 run loadtest/{scenario}.js{}",
        if smoke { " (smoke)" } else { "" }
    );
    let k6_run = Command::new(&k6)
        .args(["run", "--quiet"])
        .arg(&script)
        .env("BASE_URL", format!("http://127.0.0.1:{EDGE_PORT}"))
        .env("SMOKE", if smoke { "1" } else { "0" })
        .env("REPORT_DIR", &reports)
        .env("K6_NO_USAGE_REPORT", "true")
        .status()
        .context("running k6");
    let stopped = up.stop().await;
    let status = k6_run?;
    stopped?;
    let report = reports.join(format!("{scenario}.md"));
    ensure!(
        status.success(),
        "k6 failed ({status}): a threshold was crossed or the script broke; report: {}",
        report.display()
    );
    println!("xtask: report written to {}", report.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::SCENARIOS;

    #[test]
    fn every_script_in_loadtest_is_a_known_scenario() {
        let mut scripts: Vec<String> = std::fs::read_dir(crate::workspace_root().join("loadtest"))
            .unwrap()
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(".js").map(str::to_owned)
            })
            .collect();
        scripts.sort();
        assert_eq!(scripts, SCENARIOS);
    }
}
