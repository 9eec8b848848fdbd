//! `cargo xtask bench push [--smoke]`: how fast notifications delivers Web Push messages, and
//! what a burst far beyond that costs it.
//!
//! It runs against a fresh `cargo xtask up` (release build; `--smoke`: the debug binaries the
//! tests use, small counts), whose local push service (`local-push`, 127.0.0.1:8085) checks
//! VAPID and decrypts every message like a real one. Users sign up through the edge, each
//! registers 10 devices (the default `PUSH_MAX_DEVICES_PER_USER`) made by
//! `POST {local-push}/subscriptions`, then creates tasks with a due date: each task's "overdue"
//! reminder becomes one notification and one push per device of its owner. The reminder
//! scheduler polls every 100 ms here (`REMINDER_POLL_INTERVAL_MS`, default 1 s) so that a due
//! date shared by thousands of tasks fires within a moment; the push pool keeps its defaults.
//!
//! - **throughput**: tasks due an hour ago (so they fire at once); from the first task created
//!   until `GET {local-push}/messages` lists every push: pushes/s end to end, and the drain rate
//!   from the first push to the last (the local push service's clock), which is taken as the
//!   pool's capacity C;
//! - **overload**: about 10 × C pushes made within about a second (tasks of other users sharing
//!   one due date a few seconds ahead, their "due soon" reminders off); while it drains, every
//!   200 ms: the notifications process's RSS, `notifications_push_pending` and
//!   `notifications_push_queue_depth` from its `/metrics`, and the pending rows counted in
//!   PostgreSQL (the gauge is refreshed every 5 s only).
//!
//! Every push must arrive exactly once (counted by endpoint and notification id, and by endpoint
//! and task); the run fails if one is missing, doubled or unexpected, never on a figure.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use futures_util::StreamExt;
use local_postgres::PgInstall;
use serde_json::{json, Value};

use crate::bench_live::{metric_sum, rss_kib, scrape, service_pid, service_port};
use crate::load::LOAD_SETTINGS;
use crate::stack::{reports_dir, StackLayout};
use crate::up_process::RunningUp;
use crate::{workspace_root, Build, EDGE_PORT, LOCAL_PUSH_PORT};

/// Devices per user: notifications' default limit.
const DEVICES_PER_USER: usize = 10;
/// The overload's size, in multiples of the measured capacity.
const OVERLOAD_FACTOR: f64 = 10.0;
const SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// Task creations in flight.
const IN_FLIGHT: usize = 32;
const REMINDER_POLL_MS: &str = "100";
/// How long after the last expected push the messages are read again, for late duplicates.
const GRACE: Duration = Duration::from_secs(2);
const PENDING_GAUGE: &str = "notifications_push_pending";
const QUEUE_GAUGE: &str = "notifications_push_queue_depth";

/// How big each phase is.
struct Plan {
    users: usize,
    tasks_per_user: usize,
    overload_users: usize,
    /// Bounds of the overload's push count, whatever the capacity.
    overload_min: usize,
    overload_max: usize,
    /// How long a phase may take to deliver everything.
    drain_limit: Duration,
}

impl Plan {
    fn new(smoke: bool) -> Self {
        if smoke {
            Self {
                users: 5,
                tasks_per_user: 2,
                overload_users: 5,
                overload_min: 200,
                overload_max: 1_000,
                drain_limit: Duration::from_secs(30),
            }
        } else {
            Self {
                users: 30,
                tasks_per_user: 10,
                overload_users: 50,
                overload_min: 5_000,
                overload_max: 60_000,
                drain_limit: Duration::from_secs(240),
            }
        }
    }

    fn pushes(&self) -> usize {
        self.users * DEVICES_PER_USER * self.tasks_per_user
    }
}

pub async fn run(smoke: bool) -> Result<()> {
    let plan = Plan::new(smoke);
    let build = Build::for_measurement(smoke);
    let mut settings = LOAD_SETTINGS.to_vec();
    settings.push(("REMINDER_POLL_INTERVAL_MS", REMINDER_POLL_MS));
    let up = RunningUp::start(build, &settings).await?;
    let outcome = measure(&plan).await;
    let stopped = up.stop().await;
    let measured = outcome?;
    stopped?;

    let profile = if build == Build::Release {
        "release"
    } else {
        "debug"
    };
    let report = measured.report(profile, smoke);
    let reports = reports_dir(&workspace_root())?;
    let path = reports.join("push-bench.md");
    std::fs::write(&path, &report)?;
    let samples = reports.join("push-bench-samples.csv");
    std::fs::write(&samples, measured.overload.samples_csv())?;
    print!("{report}");
    println!(
        "xtask: report written to {} (overload samples: {})",
        path.display(),
        samples.display()
    );
    let problems = measured.problems();
    if !problems.is_empty() {
        bail!("pushes went wrong: {}", problems.join("; "));
    }
    Ok(())
}

/// A user with their devices' endpoints and their tasks.
struct PushUser {
    token: String,
    endpoints: Vec<String>,
    tasks: Vec<String>,
}

/// One message the local push service accepted.
struct Message {
    endpoint: String,
    id: String,
    task_id: String,
    kind: String,
    /// Seconds since the local push service started.
    at: f64,
}

/// What arrived for one phase's users.
#[derive(Debug, Default, Clone, Copy)]
struct Delivery {
    expected: usize,
    /// Distinct (endpoint, task) pairs received that were expected.
    received: usize,
    /// The same message twice, or a second message for the same task and device.
    duplicates: usize,
    missing: usize,
    /// Messages for these devices that no task of theirs asked for.
    unexpected: usize,
    first_at: f64,
    last_at: f64,
}

impl Delivery {
    /// Pushes/s from the first push to the last, on the local push service's clock.
    fn drain_rate(&self) -> f64 {
        self.received.saturating_sub(1) as f64 / (self.last_at - self.first_at).max(0.001)
    }

    fn problems(&self, phase: &str) -> Vec<String> {
        let mut problems = Vec::new();
        for (count, what) in [
            (self.missing, "missing"),
            (self.duplicates, "delivered more than once"),
            (self.unexpected, "unexpected"),
        ] {
            if count > 0 {
                problems.push(format!(
                    "{phase}: {count} of {} pushes {what}",
                    self.expected
                ));
            }
        }
        problems
    }
}

struct Throughput {
    users: usize,
    tasks: usize,
    created_in: Duration,
    /// From the first task created until `/messages` listed the first push, and all of them.
    first_seen: Option<Duration>,
    all_seen: Option<Duration>,
    delivery: Delivery,
}

struct Sample {
    /// Since the overload phase began.
    at: Duration,
    rss_kib: Option<u64>,
    pending_gauge: Option<f64>,
    queue_depth: Option<f64>,
    /// Pending rows, all rows and sent rows in `push_deliveries`.
    db: Option<(i64, i64, i64)>,
}

struct Overload {
    capacity: f64,
    /// The overload's bounds (smallest, largest push count).
    bounds: (usize, usize),
    users: usize,
    tasks: usize,
    created_in: Duration,
    /// How long before the shared due date the last task was created (negative: after it).
    created_before_due: f64,
    /// From the phase's start until every push was settled (or the limit passed).
    settled_after: Option<Duration>,
    /// From the database, over the phase's push rows: rows, first to last row made, first row
    /// made to last row finished, rows tried more than once, rows failed.
    rows: i64,
    enqueue_window: f64,
    drain_window: f64,
    retried: i64,
    failed: i64,
    /// Distinct `created_at` of the rows: the transactions that made them.
    transactions: i64,
    rss_before_kib: u64,
    samples: Vec<Sample>,
    baseline_pending: i64,
    delivery: Delivery,
}

struct Measured {
    max_workers: String,
    max_queue: String,
    throughput: Throughput,
    overload: Overload,
}

async fn measure(plan: &Plan) -> Result<Measured> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let notifications = service_port("notifications")?;
    let pid = service_pid("notifications", notifications)
        .context("the notifications process `cargo xtask up` started")?;
    let install = PgInstall::detect().map_err(anyhow::Error::msg)?;
    let primary_port = StackLayout::up(std::path::Path::new(".")).primary_port;
    let run = format!("{:x}", std::process::id());

    // Throughput.
    println!(
        "xtask: throughput: {} users × {DEVICES_PER_USER} devices, {} overdue tasks each ({} pushes)",
        plan.users,
        plan.tasks_per_user,
        plan.pushes()
    );
    let mut users = make_users(&client, &format!("push{run}"), plan.users, false).await?;
    let started = Instant::now();
    let past = rfc3339(SystemTime::now() - Duration::from_secs(3600))?;
    create_tasks(&client, &mut users, plan.tasks_per_user, &past, "overdue").await?;
    let created_in = started.elapsed();
    let deadline = started + plan.drain_limit;
    let mut first_seen = None;
    let all_seen = loop {
        let delivery = check(&users, &messages(&client).await?);
        if first_seen.is_none() && delivery.received > 0 {
            first_seen = Some(started.elapsed());
        }
        if delivery.missing == 0 {
            break Some(started.elapsed());
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(GRACE).await;
    let delivery = check(&users, &messages(&client).await?);
    println!(
        "xtask: throughput: {} of {} pushes in {:.2} s; drain {:.0}/s",
        delivery.received,
        delivery.expected,
        all_seen.unwrap_or(plan.drain_limit).as_secs_f64(),
        delivery.drain_rate()
    );
    let throughput = Throughput {
        users: plan.users,
        tasks: plan.users * plan.tasks_per_user,
        created_in,
        first_seen,
        all_seen,
        delivery,
    };
    ensure!(
        delivery.received > 1,
        "the throughput phase delivered {} pushes; see the notifications log",
        delivery.received
    );

    // Overload: ~10 × the capacity, made at one moment.
    let capacity = delivery.drain_rate();
    let target =
        ((OVERLOAD_FACTOR * capacity) as usize).clamp(plan.overload_min, plan.overload_max);
    let tasks_per_user = target.div_ceil(plan.overload_users * DEVICES_PER_USER);
    let tasks = tasks_per_user * plan.overload_users;
    println!(
        "xtask: overload: capacity ≈ {capacity:.0} pushes/s, so {} users × {DEVICES_PER_USER} devices × {tasks_per_user} tasks ({} pushes) due at one moment",
        plan.overload_users,
        tasks * DEVICES_PER_USER
    );
    let mut users = make_users(
        &client,
        &format!("pushload{run}"),
        plan.overload_users,
        true,
    )
    .await?;
    let db = DbCounter {
        install,
        port: primary_port,
    };
    let since =
        db.query("SELECT COALESCE(max(created_at)::text, '-infinity') FROM push_deliveries")?;
    let (baseline_pending, baseline_total, baseline_sent) = db.counts()?;
    let rss_before_kib = rss_kib(pid)?;

    let phase = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = tokio::spawn(sample(
        client.clone(),
        pid,
        notifications,
        db.clone(),
        phase,
        stop.clone(),
        samples.clone(),
    ));
    // The due date leaves time to create every task (at twice the first phase's pace) first.
    let per_task = created_in.as_secs_f64() / throughput.tasks.max(1) as f64;
    let lead = Duration::from_secs_f64((2.0 * per_task * tasks as f64 + 3.0).max(5.0));
    let due = SystemTime::now() + lead;
    create_tasks(&client, &mut users, tasks_per_user, &rfc3339(due)?, "burst").await?;
    let created_in = phase.elapsed();
    let created_before_due = due.duration_since(SystemTime::now()).map_or_else(
        |late| -late.duration().as_secs_f64(),
        |early| early.as_secs_f64(),
    );
    let expected = (tasks * DEVICES_PER_USER) as i64;
    let deadline = Instant::now() + lead + plan.drain_limit;
    let settled_after = loop {
        let latest = samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .rev()
            .find_map(|sample: &Sample| sample.db);
        if let Some((pending, total, sent)) = latest {
            if total - baseline_total >= expected
                && sent - baseline_sent >= expected
                && pending <= baseline_pending
            {
                break Some(phase.elapsed());
            }
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // The local push service counts a message once it answered it: nearly at once.
    let until = Instant::now() + Duration::from_secs(10);
    while check(&users, &messages(&client).await?).missing > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(GRACE).await;
    stop.store(true, Ordering::SeqCst);
    let _ = sampler.await;
    let delivery = check(&users, &messages(&client).await?);
    let stats = db.query(&format!(
        "SELECT count(*), \
                COALESCE(extract(epoch FROM max(created_at) - min(created_at)), 0), \
                COALESCE(extract(epoch FROM max(finished_at) - min(created_at)), 0), \
                count(*) FILTER (WHERE attempts > 1), \
                count(*) FILTER (WHERE state = 'failed'), \
                count(DISTINCT created_at) \
         FROM push_deliveries WHERE created_at > '{since}'::timestamptz"
    ))?;
    let fields: Vec<&str> = stats.split('|').collect();
    ensure!(fields.len() == 6, "unexpected answer from psql: {stats:?}");
    let number = |i: usize| fields[i].trim().parse::<f64>().unwrap_or(f64::NAN);
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(PoisonError::into_inner));
    println!(
        "xtask: overload: {} of {} pushes delivered; {} samples",
        delivery.received,
        delivery.expected,
        samples.len()
    );
    Ok(Measured {
        max_workers: std::env::var("PUSH_MAX_WORKERS").unwrap_or_else(|_| "64".to_owned()),
        max_queue: std::env::var("PUSH_MAX_QUEUE").unwrap_or_else(|_| "128".to_owned()),
        throughput,
        overload: Overload {
            capacity,
            bounds: (plan.overload_min, plan.overload_max),
            users: plan.overload_users,
            tasks,
            created_in,
            created_before_due,
            settled_after,
            rows: number(0) as i64,
            enqueue_window: number(1),
            drain_window: number(2),
            retried: number(3) as i64,
            failed: number(4) as i64,
            transactions: number(5) as i64,
            rss_before_kib,
            samples,
            baseline_pending,
            delivery,
        },
    })
}

/// Signs up `count` users through the edge, each with [`DEVICES_PER_USER`] devices from the
/// local push service; with `overdue_only`, their "due soon" reminders are off.
async fn make_users(
    client: &reqwest::Client,
    prefix: &str,
    count: usize,
    overdue_only: bool,
) -> Result<Vec<PushUser>> {
    let edge = format!("http://127.0.0.1:{EDGE_PORT}");
    let push = format!("http://127.0.0.1:{LOCAL_PUSH_PORT}");
    let made: Vec<Result<PushUser>> = futures_util::stream::iter(0..count)
        .map(|i| {
            let (edge, push) = (&edge, &push);
            async move {
                let token = crate::check::account_token(client, &format!("{prefix}u{i}")).await?;
                if overdue_only {
                    client
                        .put(format!("{edge}/v1/notifications/preferences"))
                        .bearer_auth(&token)
                        .json(&json!({
                            "due_soon": "off",
                            "overdue": "push",
                            "reminder_lead_minutes": 60,
                            "quiet_hours": null,
                        }))
                        .send()
                        .await?
                        .error_for_status()
                        .context("setting preferences")?;
                }
                let mut endpoints = Vec::new();
                for _ in 0..DEVICES_PER_USER {
                    let subscription: Value = client
                        .post(format!("{push}/subscriptions"))
                        .send()
                        .await?
                        .error_for_status()?
                        .json()
                        .await?;
                    let response = client
                        .post(format!("{edge}/v1/notifications/devices"))
                        .bearer_auth(&token)
                        .json(&subscription)
                        .send()
                        .await?;
                    let status = response.status();
                    ensure!(
                        status == 201,
                        "registering a device answered {status}: {}",
                        response.text().await.unwrap_or_default()
                    );
                    endpoints.push(
                        subscription["endpoint"]
                            .as_str()
                            .context("subscription endpoint")?
                            .to_owned(),
                    );
                }
                Ok(PushUser {
                    token,
                    endpoints,
                    tasks: Vec::new(),
                })
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    made.into_iter().collect()
}

/// Creates `per_user` tasks due at `due_at` for every user, [`IN_FLIGHT`] at a time.
async fn create_tasks(
    client: &reqwest::Client,
    users: &mut [PushUser],
    per_user: usize,
    due_at: &str,
    label: &str,
) -> Result<()> {
    let edge = format!("http://127.0.0.1:{EDGE_PORT}");
    let jobs: Vec<(usize, usize)> = (0..per_user)
        .flat_map(|n| (0..users.len()).map(move |user| (user, n)))
        .collect();
    let users_ref = &*users;
    let created: Vec<Result<(usize, String)>> = futures_util::stream::iter(jobs)
        .map(|(user, n)| {
            let edge = &edge;
            async move {
                let response = client
                    .post(format!("{edge}/v1/tasks"))
                    .bearer_auth(&users_ref[user].token)
                    .json(&json!({ "title": format!("push bench {label} {n}"), "due_at": due_at }))
                    .send()
                    .await?;
                let status = response.status();
                ensure!(
                    status == 201,
                    "creating a task answered {status}: {}",
                    response.text().await.unwrap_or_default()
                );
                let task: Value = response.json().await?;
                Ok((user, task["id"].as_str().context("task id")?.to_owned()))
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    for outcome in created {
        let (user, task) = outcome?;
        users[user].tasks.push(task);
    }
    Ok(())
}

/// Every message the local push service accepted so far.
async fn messages(client: &reqwest::Client) -> Result<Vec<Message>> {
    let listed: Vec<Value> = client
        .get(format!("http://127.0.0.1:{LOCAL_PUSH_PORT}/messages"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await
        .context("GET /messages of the local push service")?;
    let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
    Ok(listed
        .iter()
        .map(|message| Message {
            endpoint: text(&message["endpoint"]),
            id: text(&message["payload"]["id"]),
            task_id: text(&message["payload"]["task_id"]),
            kind: text(&message["payload"]["kind"]),
            at: message["since_start_secs"].as_f64().unwrap_or(f64::NAN),
        })
        .collect())
}

/// What of `users`' expected pushes (one per device per task, "overdue") is in `messages`.
fn check(users: &[PushUser], messages: &[Message]) -> Delivery {
    let mut expected: HashSet<(&str, &str)> = HashSet::new();
    for user in users {
        for endpoint in &user.endpoints {
            for task in &user.tasks {
                expected.insert((endpoint, task));
            }
        }
    }
    let endpoints: HashSet<&str> = users
        .iter()
        .flat_map(|user| user.endpoints.iter().map(String::as_str))
        .collect();
    let mut delivery = Delivery {
        expected: expected.len(),
        first_at: f64::INFINITY,
        last_at: f64::NEG_INFINITY,
        ..Delivery::default()
    };
    let mut by_id: HashSet<(&str, &str)> = HashSet::new();
    let mut by_task: HashSet<(&str, &str)> = HashSet::new();
    for message in messages
        .iter()
        .filter(|message| endpoints.contains(message.endpoint.as_str()))
    {
        delivery.first_at = delivery.first_at.min(message.at);
        delivery.last_at = delivery.last_at.max(message.at);
        if !by_id.insert((&message.endpoint, &message.id)) {
            delivery.duplicates += 1;
            continue;
        }
        let pair = (message.endpoint.as_str(), message.task_id.as_str());
        if message.kind != "task.overdue" || !expected.contains(&pair) {
            delivery.unexpected += 1;
            continue;
        }
        if !by_task.insert(pair) {
            delivery.duplicates += 1;
        }
    }
    delivery.received = by_task.len();
    delivery.missing = delivery.expected - by_task.len();
    delivery
}

/// Counts in the notifications database of the `up` stack, through psql.
#[derive(Clone)]
struct DbCounter {
    install: PgInstall,
    port: u16,
}

impl DbCounter {
    fn query(&self, sql: &str) -> Result<String> {
        local_postgres::query(&self.install, self.port, "notifications", sql)
            .context("querying the notifications database")
    }

    /// Pending rows, all rows and sent rows of `push_deliveries`.
    fn counts(&self) -> Result<(i64, i64, i64)> {
        let answer = self.query(
            "SELECT count(*) FILTER (WHERE state = 'pending'), count(*), \
                    count(*) FILTER (WHERE state = 'sent') FROM push_deliveries",
        )?;
        let numbers: Vec<i64> = answer
            .split('|')
            .map(|field| field.trim().parse::<i64>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("counts from psql: {answer:?}"))?;
        match numbers[..] {
            [pending, total, sent] => Ok((pending, total, sent)),
            _ => bail!("counts from psql: {answer:?}"),
        }
    }
}

/// Every [`SAMPLE_EVERY`] until `stop`: the process's RSS, its push gauges, the database's rows.
async fn sample(
    client: reqwest::Client,
    pid: u32,
    port: u16,
    db: DbCounter,
    phase: Instant,
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        let at = phase.elapsed();
        let rss_kib = rss_kib(pid).ok();
        let metrics = scrape(&client, port).await.ok();
        let gauge = |name: &str| {
            metrics
                .as_deref()
                .filter(|text| text.contains(name))
                .map(|text| metric_sum(text, name))
        };
        let counter = db.clone();
        let db = tokio::task::spawn_blocking(move || counter.counts().ok())
            .await
            .ok()
            .flatten();
        samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Sample {
                at,
                rss_kib,
                pending_gauge: gauge(PENDING_GAUGE),
                queue_depth: gauge(QUEUE_GAUGE),
                db,
            });
    }
}

/// `at` as RFC 3339 in UTC, with milliseconds.
fn rfc3339(at: SystemTime) -> Result<String> {
    let format = time::format_description::parse_borrowed::<2>(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z",
    )?;
    Ok(time::OffsetDateTime::from(at).format(&format)?)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn seconds(elapsed: Option<Duration>) -> String {
    elapsed.map_or_else(
        || "never".to_owned(),
        |d| format!("{:.2} s", d.as_secs_f64()),
    )
}

impl Overload {
    /// The samples, one line each: seconds, RSS KiB, gauges, database rows.
    fn samples_csv(&self) -> String {
        let mut out = String::from(
            "seconds,rss_kib,push_pending_gauge,push_queue_depth,db_pending,db_rows,db_sent\n",
        );
        let show = |value: Option<String>| value.unwrap_or_default();
        for sample in &self.samples {
            let _ = writeln!(
                out,
                "{:.3},{},{},{},{},{},{}",
                sample.at.as_secs_f64(),
                show(sample.rss_kib.map(|v| v.to_string())),
                show(sample.pending_gauge.map(|v| v.to_string())),
                show(sample.queue_depth.map(|v| v.to_string())),
                show(sample.db.map(|(pending, _, _)| pending.to_string())),
                show(sample.db.map(|(_, total, _)| total.to_string())),
                show(sample.db.map(|(_, _, sent)| sent.to_string())),
            );
        }
        out
    }
}

impl Measured {
    fn problems(&self) -> Vec<String> {
        let mut problems = self.throughput.delivery.problems("throughput");
        problems.extend(self.overload.delivery.problems("overload"));
        if self.overload.failed > 0 {
            problems.push(format!(
                "overload: {} push rows failed for good",
                self.overload.failed
            ));
        }
        problems
    }

    fn report(&self, profile: &str, smoke: bool) -> String {
        let Measured {
            max_workers,
            max_queue,
            throughput: t,
            overload: o,
        } = self;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Web Push benchmark{}\n\n\
             notifications {profile} build, one instance, push pool at its defaults \
             (`PUSH_MAX_WORKERS` {max_workers}, `PUSH_MAX_QUEUE` {max_queue}), reminders polled \
             every {REMINDER_POLL_MS} ms; the local push service checks VAPID and decrypts every \
             message. Each task's \"overdue\" reminder is one push to each of its owner's \
             {DEVICES_PER_USER} devices. Client, services, push service, PostgreSQL and broker \
             share this machine's cores.\n",
            if smoke { " (smoke run)" } else { "" }
        );

        let d = &t.delivery;
        let end_to_end = t
            .all_seen
            .map_or(0.0, |all| d.received as f64 / all.as_secs_f64().max(0.001));
        let _ = writeln!(
            out,
            "## Throughput\n\n\
             {} users × {DEVICES_PER_USER} devices, {} tasks due an hour ago (created in {:.2} s, \
             {IN_FLIGHT} in flight, through the edge). From the first task created until \
             `GET /messages` of the local push service listed every push (polled every 100 ms); \
             the drain rate is from the first push to the last on the push service's clock.\n\n\
             | pushes | first seen after | all seen after | pushes/s end to end | drain pushes/s | duplicates | missing |\n\
             |---|---|---|---|---|---|---|\n\
             | {} of {} | {} | {} | **{end_to_end:.0}** | **{:.0}** | {} | {} |\n",
            t.users,
            t.tasks,
            t.created_in.as_secs_f64(),
            d.received,
            d.expected,
            seconds(t.first_seen),
            seconds(t.all_seen),
            d.drain_rate(),
            d.duplicates,
            d.missing + d.unexpected,
        );

        let d = &o.delivery;
        let rss: Vec<u64> = o.samples.iter().filter_map(|s| s.rss_kib).collect();
        let rss_min = rss.iter().copied().min().unwrap_or(0);
        let rss_max = rss.iter().copied().max().unwrap_or(0);
        let rss_last = rss.last().copied().unwrap_or(0);
        let peak_db_pending = o
            .samples
            .iter()
            .filter_map(|s| s.db.map(|(pending, _, _)| pending - o.baseline_pending))
            .max()
            .unwrap_or(0);
        let peak = |values: &mut dyn Iterator<Item = f64>| values.fold(f64::NAN, f64::max);
        let peak_gauge = peak(&mut o.samples.iter().filter_map(|s| s.pending_gauge));
        let peak_queue = peak(&mut o.samples.iter().filter_map(|s| s.queue_depth));
        // Rows of one transaction share `created_at`: below 10 ms it was all at once.
        let made_at = if o.enqueue_window < 0.01 {
            "all at once".to_owned()
        } else {
            let arrival = o.rows as f64 / o.enqueue_window;
            format!(
                "{arrival:.0}/s ({:.1} × C)",
                arrival / o.capacity.max(0.001)
            )
        };
        let drain = d.drain_rate();
        let _ = writeln!(
            out,
            "## Overload ({OVERLOAD_FACTOR}×)\n\n\
             Capacity C = the throughput phase's drain rate, {:.0} pushes/s; so {} users × \
             {DEVICES_PER_USER} devices × {} tasks, {} tasks in all, sharing one due date \
             (created in {:.2} s, the last {:.2} s before it): {} pushes (10 × C = {:.0}, \
             kept within {}–{}, rounded up to whole tasks). Sampled every {} ms while it drained ({} samples).\n\n\
             | pushes | made within (rows' `created_at`) | made at | settled in (first row made → last finished) | drain pushes/s | notifications RSS before / min / max / at the end | peak pending rows (PostgreSQL) | peak `{PENDING_GAUGE}` (refreshed every 5 s) | peak `{QUEUE_GAUGE}` | rows retried | rows failed | duplicates | missing |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|\n\
             | {} of {} ({} rows) | {:.2} s, {} transactions | {made_at} | {:.2} s | **{drain:.0}** | {:.1} / **{:.1}** / **{:.1}** / {:.1} MiB | **{peak_db_pending}** | {peak_gauge} | {peak_queue} (bound {max_queue}) | {} | {} | {} | {} |\n",
            o.capacity,
            o.users,
            o.tasks / o.users.max(1),
            o.tasks,
            o.created_in.as_secs_f64(),
            o.created_before_due,
            d.expected,
            OVERLOAD_FACTOR * o.capacity,
            o.bounds.0,
            o.bounds.1,
            SAMPLE_EVERY.as_millis(),
            o.samples.len(),
            d.received,
            d.expected,
            o.rows,
            o.enqueue_window,
            o.transactions,
            o.drain_window,
            mib(o.rss_before_kib),
            mib(rss_min),
            mib(rss_max),
            mib(rss_last),
            o.retried,
            o.failed,
            d.duplicates,
            d.missing + d.unexpected,
        );
        let _ = writeln!(
            out,
            "Every push settled {} after the phase began.\n",
            seconds(o.settled_after)
        );

        let _ = writeln!(out, "## Checks\n");
        let problems = self.problems();
        if problems.is_empty() {
            let _ = writeln!(
                out,
                "- pass: every push arrived exactly once (by endpoint and notification id, and by \
                 endpoint and task), none unexpected, none failed"
            );
        }
        for problem in problems {
            let _ = writeln!(out, "- FAIL: {problem}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::{check, rfc3339, Message, PushUser};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    #[test]
    fn formats_rfc3339_in_utc() {
        let at = |secs: u64, millis: u64| {
            rfc3339(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)).unwrap()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_704_067_199, 999), "2023-12-31T23:59:59.999Z");
        assert!(rfc3339(SystemTime::now()).unwrap().ends_with('Z'));
    }

    #[test]
    fn counts_missing_doubled_and_unexpected_pushes() {
        let users = [PushUser {
            token: String::new(),
            endpoints: vec!["e1".into(), "e2".into()],
            tasks: vec!["t1".into(), "t2".into()],
        }];
        let message = |endpoint: &str, id: &str, task: &str, kind: &str| Message {
            endpoint: endpoint.into(),
            id: id.into(),
            task_id: task.into(),
            kind: kind.into(),
            at: 1.0,
        };
        let messages = [
            message("e1", "n1", "t1", "task.overdue"),
            message("e1", "n1", "t1", "task.overdue"),
            message("e2", "n1", "t1", "task.overdue"),
            message("e2", "n3", "t1", "task.overdue"),
            message("e1", "n2", "t2", "task.due_soon"),
            message("other", "n9", "t9", "task.overdue"),
        ];
        let delivery = check(&users, &messages);
        assert_eq!(delivery.expected, 4);
        assert_eq!(delivery.received, 2);
        assert_eq!(delivery.missing, 2);
        assert_eq!(delivery.duplicates, 2);
        assert_eq!(delivery.unexpected, 1);
    }
}
