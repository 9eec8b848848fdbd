//! `cargo xtask bench consumer [--smoke]`: how many events per second one consumer instance
//! applies, on a stack of its own (primary, replica, broker; ports 27432/27433/29092).
//!
//! The topic (6 partitions) is filled first, then the recorder example starts: a real consumer
//! service whose handler writes one row per event, in the consumer library's transactions with
//! the `processed_events` dedup. The rate is counted from the first applied event to the last,
//! so the group join is not part of it. Every event must be applied exactly once. A full run
//! (200,000 events, release build) fails below the goal of 10,000 events/s; `--smoke` (5,000
//! events, the debug binaries the tests use, no goal) proves the benchmark still works.
//!
//! `cargo xtask bench live` (the live-updates WebSocket against a fresh `up`) is in
//! [`crate::bench_live`], `cargo xtask bench push` (Web Push delivery against a fresh `up`) in
//! [`crate::bench_push`], `cargo xtask bench tasks` (tasks' write and read paths) in
//! [`crate::bench_tasks`].

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use local_postgres::{database_url, PgInstall};

use crate::stack::{log_file, reports_dir, state_dir, Infra, StackLayout};
use crate::{target_dir, workspace_root, Build};

/// The benchmarks `cargo xtask bench` knows.
pub const BENCHES: [&str; 4] = ["consumer", "live", "push", "tasks"];

/// Events per second one instance must apply in a full run.
const GOAL_EVENTS_PER_SEC: f64 = 10_000.0;
const TOPIC: &str = "bench.events.v1";
const PARTITIONS: i32 = 6;

pub fn run(bench: &str, smoke: bool) -> Result<()> {
    ensure!(
        BENCHES.contains(&bench),
        "no benchmark {bench:?}; known: {}",
        BENCHES.join(", ")
    );
    if bench == "live" {
        // Called outside the command's runtime (as `consumer` needs): this one gets its own.
        return tokio::runtime::Runtime::new()?.block_on(crate::bench_live::run(smoke));
    }
    if bench == "push" {
        return tokio::runtime::Runtime::new()?.block_on(crate::bench_push::run(smoke));
    }
    if bench == "tasks" {
        return tokio::runtime::Runtime::new()?.block_on(crate::bench_tasks::run(smoke));
    }
    let events: usize = if smoke { 5_000 } else { 200_000 };
    let build = Build::for_measurement(smoke);
    let profile = build.run(
        &["events"],
        &["--example", "recorder", "--example", "produce_events"],
    )?;
    let examples = target_dir()?.join(profile).join("examples");

    let root = workspace_root();
    let infra = Infra::start(StackLayout::bench(&state_dir(&root)))?;
    let outcome = measure(&infra, &examples, events);
    infra.stop();
    let measured = outcome?;

    let verdict = if smoke {
        "smoke run: no goal".to_owned()
    } else if measured.rate >= GOAL_EVENTS_PER_SEC {
        format!("meets the goal of {GOAL_EVENTS_PER_SEC:.0}/s")
    } else {
        format!("BELOW the goal of {GOAL_EVENTS_PER_SEC:.0}/s")
    };
    let report = format!(
        "# Consumer benchmark\n\n\
         One recorder instance (a handler writing one row per event, `processed_events` dedup), \
         {profile} build, {PARTITIONS} partitions, everything on this machine.\n\n\
         | events | applied in | events/s | applied twice | verdict |\n\
         |---|---|---|---|---|\n\
         | {events} | {:.2} s | **{:.0}** | {} | {verdict} |\n",
        measured.took.as_secs_f64(),
        measured.rate,
        measured.applied_twice,
    );
    let reports = reports_dir(&root)?;
    let path = reports.join("consumer.md");
    std::fs::write(&path, &report)?;
    print!("{report}");
    println!("xtask: report written to {}", path.display());
    ensure!(
        measured.applied_twice == 0,
        "{} events applied twice",
        measured.applied_twice
    );
    if !smoke && measured.rate < GOAL_EVENTS_PER_SEC {
        bail!(
            "the consumer applied {:.0} events/s, below the goal of {GOAL_EVENTS_PER_SEC:.0}/s",
            measured.rate
        );
    }
    Ok(())
}

struct Measured {
    took: Duration,
    rate: f64,
    applied_twice: u64,
}

fn measure(infra: &Infra, examples: &std::path::Path, events: usize) -> Result<Measured> {
    let layout = &infra.layout;
    let logs = infra.logs_dir();
    let install = PgInstall::detect().map_err(anyhow::Error::msg)?;
    let database = database_url(layout.primary_port, "postgres");
    let bootstrap = format!("127.0.0.1:{}", layout.broker_port);
    let status = Command::new(examples.join("recorder"))
        .arg("migrate")
        .env("DATABASE_WRITER_URL", &database)
        .stdout(Stdio::null())
        .status()
        .context("running `recorder migrate`")?;
    ensure!(status.success(), "`recorder migrate` failed ({status})");
    infra.create_topic_set(TOPIC, PARTITIONS)?;

    println!("xtask: producing {events} events to {TOPIC}");
    let status = Command::new(examples.join("produce_events"))
        .args([&bootstrap, TOPIC, &events.to_string()])
        .status()
        .context("running produce_events")?;
    ensure!(status.success(), "produce_events failed ({status})");

    println!("xtask: one recorder instance consumes them");
    let log = log_file(&logs, "recorder")?;
    let mut recorder = ChildGuard(
        Command::new(examples.join("recorder"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HTTP_HOST", "127.0.0.1")
            .env("HTTP_PORT", "58098")
            .env("DATABASE_WRITER_URL", &database)
            .env("KAFKA_BOOTSTRAP_SERVERS", &bootstrap)
            .env("RECORDER_TOPIC", TOPIC)
            .env("RECORDER_GROUP", "bench")
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the recorder")?,
    );
    let count = |sql: &str| -> Result<u64> {
        local_postgres::query(&install, layout.primary_port, "postgres", sql)?
            .parse::<u64>()
            .context("a count from psql")
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first: Option<(Instant, u64)> = None;
    let done = loop {
        let applied = count("SELECT count(*) FROM recorded_events")?;
        let now = Instant::now();
        if applied > 0 && first.is_none() {
            first = Some((now, applied));
        }
        if applied as usize >= events {
            break now;
        }
        if let Some(status) = recorder.0.try_wait()? {
            bail!(
                "the recorder exited ({status}); see {}",
                logs.join("recorder.log").display()
            );
        }
        ensure!(
            now < deadline,
            "only {applied} of {events} events applied after 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let (started, at_start) = first.context("no event was applied")?;
    let took = done.duration_since(started);
    let rate = (events as u64 - at_start) as f64 / took.as_secs_f64().max(0.001);
    let applied_twice = count("SELECT count(*) FROM recorded_events WHERE applications <> 1")?;
    Ok(Measured {
        took,
        rate,
        applied_twice,
    })
}

/// A child process killed when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
