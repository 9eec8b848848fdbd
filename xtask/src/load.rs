//! `cargo xtask load <scenario> [--smoke]`: runs the k6 script `loadtest/<scenario>.js` (or, for
//! `telemetry`, wrk with `loadtest/telemetry.lua`) against a fresh `cargo xtask up --release`
//! started with load-test settings, writes the report, stops everything. `--smoke` runs it briefly
//! on the debug binaries the tests use, to prove the script still works.

use std::process::Command;

use anyhow::{ensure, Context, Result};

use crate::up_process::RunningUp;
use crate::{prereqs, stack, workspace_root, Build, EDGE_PORT};

/// The scenarios in `loadtest/` (`<name>.js` for k6, `<name>.lua` for wrk).
pub const SCENARIOS: [&str; 4] = ["auth", "live", "tasks", "telemetry"];

/// Settings the system runs with under load: login and signup limits out of the way (every
/// virtual user comes from 127.0.0.1 and reuses a few accounts) and only warnings logged.
pub(crate) const LOAD_SETTINGS: [(&str, &str); 5] = [
    ("AUTH_LOGIN_LIMIT_PER_USERNAME", "1000000"),
    ("AUTH_LOGIN_LIMIT_PER_CLIENT", "1000000"),
    ("AUTH_SIGNUP_LIMIT_PER_CLIENT", "1000000"),
    ("RUST_LOG", "warn"),
    // No span export or scraping taking part in the figures (see `observability`).
    ("TASKSTREAM_OBSERVABILITY", "off"),
];

pub async fn run(scenario: &str, smoke: bool) -> Result<()> {
    if scenario == "telemetry" {
        return telemetry(smoke).await;
    }
    let root = workspace_root();
    let script = root.join("loadtest").join(format!("{scenario}.js"));
    ensure!(
        script.is_file(),
        "no scenario {scenario:?}: expected {}",
        script.display()
    );
    let k6 = prereqs::ensure_k6()?;
    let reports = stack::reports_dir(&root)?;

    let build = Build::for_measurement(smoke);
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

/// The telemetry ingest under wrk: one-event POSTs for 30 s (3 s in smoke mode) from 64
/// connections through the edge; requests/s, latency percentiles, errors, and the analysis
/// process's CPU time per request. Fails on any error.
async fn telemetry(smoke: bool) -> Result<()> {
    let root = workspace_root();
    let wrk = prereqs::ensure_wrk()?;
    let reports = stack::reports_dir(&root)?;
    let build = Build::for_measurement(smoke);
    let up = RunningUp::start(build, &LOAD_SETTINGS).await?;
    let outcome = async {
        let token = crate::check::account_token(
            &reqwest::Client::new(),
            &format!("load{}", std::process::id()),
        )
        .await?;
        let analysis = pid_of("analysis").context("the analysis process")?;
        let cpu_before = cpu_seconds(analysis)?;
        let (duration, connections) = if smoke { ("3s", "4") } else { ("30s", "64") };
        println!(
            "xtask: wrk telemetry, {connections} connections for {duration}{}",
            if smoke { " (smoke)" } else { "" }
        );
        let output = Command::new(&wrk)
            .args([
                "-t",
                "2",
                "-c",
                connections,
                "-d",
                duration,
                "--latency",
                "-s",
            ])
            .arg(root.join("loadtest/telemetry.lua"))
            .arg(format!("http://127.0.0.1:{EDGE_PORT}/v1/telemetry"))
            .env("TOKEN", token)
            .output()
            .context("running wrk")?;
        let cpu = cpu_seconds(analysis)? - cpu_before;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        ensure!(
            output.status.success(),
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok::<_, anyhow::Error>((text, cpu))
    }
    .await;
    let stopped = up.stop().await;
    let (text, cpu) = outcome?;
    stopped?;
    let report = WrkReport::parse(&text)
        .with_context(|| format!("no REPORT line in wrk's output:\n{text}"))?;
    let seconds = report.duration_us as f64 / 1e6;
    let table = format!(
        "# telemetry load ({})\n\n| figure | value |\n|---|---|\n| requests | {} in {seconds:.1} s |\n| throughput | {:.0} req/s |\n| latency | p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms |\n| errors | {} non-2xx, {} connect, {} read, {} write, {} timeouts |\n| analysis CPU | {:.1} µs per request ({cpu:.2} s in all) |\n",
        if smoke { "smoke" } else { "release" },
        report.requests,
        report.requests as f64 / seconds,
        report.p50_us as f64 / 1e3,
        report.p99_us as f64 / 1e3,
        report.max_us as f64 / 1e3,
        report.status_errors,
        report.connect_errors,
        report.read_errors,
        report.write_errors,
        report.timeouts,
        cpu * 1e6 / report.requests.max(1) as f64,
    );
    let path = reports.join("telemetry.md");
    std::fs::write(&path, &table)?;
    println!("{table}\nxtask: report written to {}", path.display());
    ensure!(report.requests > 0, "wrk sent no request");
    ensure!(report.errors() == 0, "{} requests failed", report.errors());
    Ok(())
}

/// The pid of the running process whose executable is named `name`.
pub(crate) fn pid_of(name: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let exe = std::fs::read_link(entry.path().join("exe")).ok()?;
            (exe.file_name()? == name).then_some(pid)
        })
}

/// User plus system CPU time of `pid` so far, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("a /proc stat line")?
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // Linux reports CPU time in USER_HZ, 100 per second on every architecture it runs on here.
    Ok(ticks / 100.0)
}

/// The `REPORT` line `loadtest/telemetry.lua` prints.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct WrkReport {
    pub(crate) requests: u64,
    pub(crate) duration_us: u64,
    status_errors: u64,
    connect_errors: u64,
    read_errors: u64,
    write_errors: u64,
    timeouts: u64,
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
    max_us: u64,
}

impl WrkReport {
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let line = text.lines().find_map(|line| line.strip_prefix("REPORT "))?;
        let mut report = Self::default();
        for pair in line.split_whitespace() {
            let (key, value) = pair.split_once('=')?;
            let value: u64 = value.parse().ok()?;
            let slot = match key {
                "requests" => &mut report.requests,
                "duration_us" => &mut report.duration_us,
                "status_errors" => &mut report.status_errors,
                "connect_errors" => &mut report.connect_errors,
                "read_errors" => &mut report.read_errors,
                "write_errors" => &mut report.write_errors,
                "timeouts" => &mut report.timeouts,
                "p50_us" => &mut report.p50_us,
                "p99_us" => &mut report.p99_us,
                "max_us" => &mut report.max_us,
                _ => continue,
            };
            *slot = value;
        }
        Some(report)
    }

    pub(crate) fn errors(&self) -> u64 {
        self.status_errors
            + self.connect_errors
            + self.read_errors
            + self.write_errors
            + self.timeouts
    }
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
                name.strip_suffix(".js")
                    .or_else(|| name.strip_suffix(".lua"))
                    .map(str::to_owned)
            })
            .collect();
        scripts.sort();
        assert_eq!(scripts, SCENARIOS);
    }
}
