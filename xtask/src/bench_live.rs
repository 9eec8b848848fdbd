//! `cargo xtask bench live [--smoke]`: what the live-updates WebSocket (`GET /v1/live` on
//! notifications) costs and delivers, with a Rust client holding thousands of sockets.
//!
//! It runs against a fresh `cargo xtask up` (release build; `--smoke`: the debug binaries the
//! tests use) with at most 1,000 sockets per user. The sockets go straight to notifications
//! (127.0.0.1:8083), not through the edge: the edge would hold a second socket and its own
//! buffers for every one, doubling the file descriptors and the memory on this one machine,
//! and hiding the service's own figures. Writes go through the edge like any client's.
//!
//! Three phases, each reported:
//! - **idle memory**: 10,000 sockets (10 users × 1,000) opened with 200 handshakes in flight;
//!   the notifications process's RSS before and 3 s after every socket got `ready`, per socket
//!   (goal ≤ 8 KiB);
//! - **latency**: beside those, 1,000 more sockets of 100 users (10 each) read while their tasks
//!   are renamed at 200/s for 20 s; latency is from the rename's answer to the frame with its
//!   (task id, version) at one designated socket of the user (goal p99 < 50 ms). The readers
//!   are users of their own because a change reaches every socket of its user: renaming the
//!   tasks of users holding 1,000 sockets each at 200/s would be 200,000 frames/s, the fan-out
//!   phase's job;
//! - **fan-out**: the 10,000 sockets read while their users' tasks are renamed at 60/s for 10 s
//!   (60,000 frames/s offered); frames/s as the clients count them and by the server's
//!   `live_frames_sent_total` (goal ≥ 50,000/s).
//!
//! Every socket checks that its frames come in `seq` order without gaps and that it got its
//! user's last version. The run fails on broken behaviour only (a refused handshake, a socket
//! closed by the server, a lost or out-of-order frame), never on a goal: the figures are
//! measurements on a machine the client shares with the system.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::load::{cpu_seconds, LOAD_SETTINGS};
use crate::stack::{reports_dir, SERVICES};
use crate::up_process::RunningUp;
use crate::{workspace_root, Build, EDGE_PORT};

const GOAL_IDLE_KIB_PER_SOCKET: f64 = 8.0;
const GOAL_LATENCY_P99_MS: f64 = 50.0;
const GOAL_FRAMES_PER_SEC: f64 = 50_000.0;
/// Handshakes in flight while the sockets open.
const HANDSHAKES_IN_FLIGHT: usize = 200;
/// How long the open sockets sit idle before the RSS is read.
const IDLE_SETTLE: Duration = Duration::from_secs(3);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
const PROTOCOL: &str = "taskstream.v1";
/// How long after a write phase is set up its first rename goes out.
const WRITES_START_IN: Duration = Duration::from_millis(50);

/// How big each phase is.
struct Plan {
    smoke: bool,
    bulk_users: usize,
    sockets_per_bulk_user: usize,
    latency_users: usize,
    sockets_per_latency_user: usize,
    latency_rate: f64,
    latency_for: Duration,
    fanout_rate: f64,
    fanout_for: Duration,
    /// How long the sockets may take to get a phase's last frames after its writes end.
    drain_limit: Duration,
}

impl Plan {
    fn new(smoke: bool) -> Self {
        if smoke {
            Self {
                smoke,
                bulk_users: 2,
                sockets_per_bulk_user: 100,
                latency_users: 5,
                sockets_per_latency_user: 10,
                latency_rate: 50.0,
                latency_for: Duration::from_secs(2),
                fanout_rate: 10.0,
                fanout_for: Duration::from_secs(2),
                drain_limit: Duration::from_secs(15),
            }
        } else {
            Self {
                smoke,
                bulk_users: 10,
                sockets_per_bulk_user: 1_000,
                latency_users: 100,
                sockets_per_latency_user: 10,
                latency_rate: 200.0,
                latency_for: Duration::from_secs(20),
                fanout_rate: 60.0,
                fanout_for: Duration::from_secs(10),
                drain_limit: Duration::from_secs(30),
            }
        }
    }

    fn bulk_sockets(&self) -> usize {
        self.bulk_users * self.sockets_per_bulk_user
    }

    fn latency_sockets(&self) -> usize {
        self.latency_users * self.sockets_per_latency_user
    }
}

pub async fn run(smoke: bool) -> Result<()> {
    let plan = Plan::new(smoke);
    // Every socket is a file: children (`up` and the services) inherit the raised limit too.
    let open_files = raise_open_files_limit()?;
    let needed = (plan.bulk_sockets() + plan.latency_sockets() + 500) as u64;
    ensure!(
        open_files >= needed,
        "the open files limit is {open_files}; this benchmark needs {needed}"
    );
    let build = Build::for_measurement(smoke);
    let mut settings = LOAD_SETTINGS.to_vec();
    settings.push(("LIVE_MAX_CONNECTIONS_PER_USER", "1000"));
    // A user's 1,000 sockets open at once: all within the handshake burst.
    settings.push(("LIVE_HANDSHAKE_BURST", "1000"));
    let up = RunningUp::start(build, &settings).await?;
    let (stop, stopped) = watch::channel(false);
    let shared = Arc::new(Shared::default());
    let mut readers = Vec::new();
    let outcome = measure(&plan, &shared, &stopped, &mut readers).await;
    // Close every socket (each sends a close frame and waits for the server's), then stop.
    shared.closing.store(true, Ordering::SeqCst);
    let _ = stop.send(true);
    let closed = tokio::time::timeout(Duration::from_secs(60), async {
        for reader in readers {
            let _ = reader.await;
        }
    })
    .await;
    let stopped_up = up.stop().await;
    let measured = outcome?;
    stopped_up?;

    let report = measured.report(&plan, shared.problems());
    let reports = reports_dir(&workspace_root())?;
    let path = reports.join("live-bench.md");
    std::fs::write(&path, &report)?;
    print!("{report}");
    println!("xtask: report written to {}", path.display());
    ensure!(closed.is_ok(), "the sockets did not close within 60 s");
    let problems = shared.problems();
    if !problems.is_empty() {
        bail!("the live sockets misbehaved: {}", problems.join("; "));
    }
    Ok(())
}

/// Raises this process's soft limit of open files to the hard limit; returns the new limit.
fn raise_open_files_limit() -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: both calls only read or write the struct passed, which lives across them.
    unsafe {
        ensure!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0,
            "getrlimit: {}",
            std::io::Error::last_os_error()
        );
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            ensure!(
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0,
                "setrlimit: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(limit.rlim_cur)
}

/// What the three phases measured.
struct Measured {
    profile: &'static str,
    idle: Idle,
    latency: Latency,
    fanout: Fanout,
}

struct Idle {
    sockets: usize,
    opened_in: Duration,
    rss_before_kib: u64,
    rss_after_kib: u64,
    server_connections: f64,
}

struct Latency {
    connected: usize,
    reading: usize,
    writes: Writes,
    /// Milliseconds from the rename's answer to the designated socket's frame, sorted.
    after_answer_ms: Vec<f64>,
    /// Milliseconds from sending the rename to that frame, sorted.
    after_send_ms: Vec<f64>,
    /// Frames that came before the rename's answer (counted as 0 ms above).
    before_answer: usize,
    /// Renames whose frame the designated socket never got.
    unmatched: usize,
    server_event_to_frame: (f64, f64),
}

struct Fanout {
    sockets: usize,
    writes: Writes,
    frames_expected: u64,
    frames_received: u64,
    server_frames: f64,
    /// From the first rename sent to the last frame received.
    elapsed: Duration,
    /// Frames the clients received in each second of the renames.
    per_second: Vec<u64>,
    server_cpu: f64,
    client_cpu: f64,
    server_event_to_frame: (f64, f64),
}

#[derive(Default)]
struct Writes {
    ok: u64,
    failed: u64,
    took: Duration,
    /// Round trips of the successful renames, in milliseconds, sorted.
    round_trip_ms: Vec<f64>,
    first_error: Option<String>,
}

impl Writes {
    fn rate(&self) -> f64 {
        (self.ok + self.failed) as f64 / self.took.as_secs_f64().max(0.001)
    }
}

/// What every reader shares: totals, and what went wrong.
#[derive(Default)]
struct Shared {
    frames: AtomicU64,
    /// When the last frame arrived, in nanoseconds after `started`.
    last_frame_ns: AtomicU64,
    started: std::sync::OnceLock<Instant>,
    closing: AtomicBool,
    /// (task id, version) → when the designated socket of the task's user got its frame.
    arrivals: Mutex<HashMap<(String, i64), Instant>>,
    unexpected_ends: AtomicU64,
    first_unexpected_end: Mutex<Option<String>>,
    refused_handshakes: AtomicU64,
    first_refusal: Mutex<Option<String>>,
    gaps: AtomicU64,
    out_of_order: AtomicU64,
    lost: AtomicU64,
}

impl Shared {
    fn since_start(&self, at: Instant) -> u64 {
        let started = *self.started.get_or_init(Instant::now);
        at.saturating_duration_since(started).as_nanos() as u64
    }

    fn ended(&self, why: String) {
        if self.closing.load(Ordering::SeqCst) {
            return;
        }
        self.unexpected_ends.fetch_add(1, Ordering::Relaxed);
        let mut first = self
            .first_unexpected_end
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        first.get_or_insert(why);
    }

    fn refused(&self, why: String) {
        self.refused_handshakes.fetch_add(1, Ordering::Relaxed);
        let mut first = self
            .first_refusal
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        first.get_or_insert(why);
    }

    /// Broken behaviour seen so far, one line each.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let refused = self.refused_handshakes.load(Ordering::Relaxed);
        if refused > 0 {
            problems.push(format!(
                "{refused} handshakes failed (first: {})",
                self.first_refusal
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_deref()
                    .unwrap_or("?")
            ));
        }
        let ended = self.unexpected_ends.load(Ordering::Relaxed);
        if ended > 0 {
            problems.push(format!(
                "{ended} sockets ended unexpectedly (first: {})",
                self.first_unexpected_end
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_deref()
                    .unwrap_or("?")
            ));
        }
        for (count, what) in [
            (&self.gaps, "sequence numbers skipped"),
            (&self.out_of_order, "frames out of order or repeated"),
            (&self.lost, "sockets without their user's last version"),
        ] {
            let count = count.load(Ordering::Relaxed);
            if count > 0 {
                problems.push(format!("{count} {what}"));
            }
        }
        problems
    }
}

/// One socket's view, shared with the phase that checks it.
#[derive(Default)]
struct SocketStats {
    last_seq: AtomicI64,
    /// Version of the user's task in the last frame.
    last_version: AtomicI64,
    frames: AtomicU64,
}

/// A user, their task, and the sockets held for them.
struct User {
    token: String,
    task: String,
    /// The task's version as its writer last learnt it.
    version: i64,
    sockets: Vec<Arc<SocketStats>>,
}

type Socket = WebSocketStream<TcpStream>;

async fn measure(
    plan: &Plan,
    shared: &Arc<Shared>,
    stopped: &watch::Receiver<bool>,
    readers: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<Measured> {
    shared.started.get_or_init(Instant::now);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let notifications = service_port("notifications")?;
    let pid = service_pid("notifications", notifications)
        .context("the notifications process `cargo xtask up` started")?;
    let run = format!("{:x}", std::process::id());
    println!(
        "xtask: {} users with {} sockets each, {} with {} each",
        plan.bulk_users,
        plan.sockets_per_bulk_user,
        plan.latency_users,
        plan.sockets_per_latency_user
    );
    let mut bulk = make_users(&client, &format!("livebulk{run}"), plan.bulk_users).await?;
    let mut readers_of_latency =
        make_users(&client, &format!("livelat{run}"), plan.latency_users).await?;

    // Idle memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before_kib = rss_kib(pid)?;
    let opening = Instant::now();
    open_sockets(
        &mut bulk,
        plan.sockets_per_bulk_user,
        false,
        notifications,
        shared,
        stopped,
        readers,
    )
    .await?;
    let opened_in = opening.elapsed();
    println!(
        "xtask: {} sockets open in {:.1} s; idle for {} s",
        plan.bulk_sockets(),
        opened_in.as_secs_f64(),
        IDLE_SETTLE.as_secs()
    );
    tokio::time::sleep(IDLE_SETTLE).await;
    let rss_after_kib = rss_kib(pid)?;
    let metrics = scrape(&client, notifications).await?;
    let idle = Idle {
        sockets: plan.bulk_sockets(),
        opened_in,
        rss_before_kib,
        rss_after_kib,
        server_connections: metric_sum(&metrics, "live_connections"),
    };
    ensure_healthy(shared)?;

    // Latency.
    open_sockets(
        &mut readers_of_latency,
        plan.sockets_per_latency_user,
        true,
        notifications,
        shared,
        stopped,
        readers,
    )
    .await?;
    println!(
        "xtask: latency: {} renames/s for {} s, {} sockets reading, {} connected",
        plan.latency_rate,
        plan.latency_for.as_secs(),
        plan.latency_sockets(),
        plan.bulk_sockets() + plan.latency_sockets()
    );
    let before = scrape(&client, notifications).await?;
    let (writes, log) = write_phase(
        &client,
        &mut readers_of_latency,
        plan.latency_rate,
        plan.latency_for,
    )
    .await;
    await_last_versions(&readers_of_latency, plan.drain_limit, shared).await;
    let after = scrape(&client, notifications).await?;
    let latency = latency_of(
        plan,
        &readers_of_latency,
        writes,
        log,
        shared,
        histogram_delta(&before, &after, "live_event_to_frame_seconds"),
    );
    ensure_healthy(shared)?;

    // Fan-out.
    println!(
        "xtask: fan-out: {} renames/s for {} s to users holding {} sockets each",
        plan.fanout_rate,
        plan.fanout_for.as_secs(),
        plan.sockets_per_bulk_user
    );
    let before = scrape(&client, notifications).await?;
    let server_cpu_before = cpu_seconds(pid)?;
    let client_cpu_before = cpu_seconds(std::process::id())?;
    let frames_before = shared.frames.load(Ordering::SeqCst);
    let first_write = Instant::now() + WRITES_START_IN;
    // Frames received in each whole second while the renames go out.
    let sampler = async {
        let mut per_second = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut last = frames_before;
        for _ in 0..plan.fanout_for.as_secs() {
            tick.tick().await;
            let now = shared.frames.load(Ordering::SeqCst);
            per_second.push(now - last);
            last = now;
        }
        per_second
    };
    let phase = async {
        let (writes, _) = write_phase(&client, &mut bulk, plan.fanout_rate, plan.fanout_for).await;
        await_last_versions(&bulk, plan.drain_limit, shared).await;
        writes
    };
    let (writes, per_second) = tokio::join!(phase, sampler);
    let last_frame = shared.last_frame_ns.load(Ordering::SeqCst);
    let first_write_ns = shared.since_start(first_write);
    let elapsed = Duration::from_nanos(last_frame.saturating_sub(first_write_ns));
    let after = scrape(&client, notifications).await?;
    let fanout = Fanout {
        sockets: plan.bulk_sockets(),
        frames_expected: writes.ok * plan.sockets_per_bulk_user as u64,
        frames_received: shared.frames.load(Ordering::SeqCst) - frames_before,
        server_frames: metric_sum(&after, "live_frames_sent_total")
            - metric_sum(&before, "live_frames_sent_total"),
        writes,
        elapsed,
        per_second,
        server_cpu: cpu_seconds(pid)? - server_cpu_before,
        client_cpu: cpu_seconds(std::process::id())? - client_cpu_before,
        server_event_to_frame: histogram_delta(&before, &after, "live_event_to_frame_seconds"),
    };
    Ok(Measured {
        profile: if plan.smoke { "debug" } else { "release" },
        idle,
        latency,
        fanout,
    })
}

/// Stops the run before the next phase when a socket already misbehaved.
fn ensure_healthy(shared: &Shared) -> Result<()> {
    let problems = shared.problems();
    ensure!(problems.is_empty(), "{}", problems.join("; "));
    Ok(())
}

pub(crate) fn service_port(name: &str) -> Result<u16> {
    SERVICES
        .iter()
        .find_map(|(service, port)| (*service == name).then_some(*port))
        .with_context(|| format!("no service {name}"))
}

/// The pid of the process running the `name` binary on `port` (tests run their own copies of
/// the services on other ports, so the name alone is not enough).
pub(crate) fn service_pid(name: &str, port: u16) -> Option<u32> {
    let wanted = format!("HTTP_PORT={port}");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let exe = std::fs::read_link(entry.path().join("exe")).ok()?;
            if exe.file_name()? != name {
                return None;
            }
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            environ
                .split(|byte| *byte == 0)
                .any(|pair| pair == wanted.as_bytes())
                .then_some(pid)
        })
}

/// VmRSS of `pid`, in KiB.
pub(crate) fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
        .context("VmRSS in /proc/<pid>/status")
}

/// `count` accounts (signed up through the edge, or found from an earlier run) with one task
/// each.
async fn make_users(client: &reqwest::Client, prefix: &str, count: usize) -> Result<Vec<User>> {
    let edge = format!("http://127.0.0.1:{EDGE_PORT}");
    let made: Vec<Result<User>> = futures_util::stream::iter(0..count)
        .map(|i| {
            let edge = &edge;
            async move {
                let token = crate::check::account_token(client, &format!("{prefix}u{i}")).await?;
                let task: serde_json::Value = client
                    .post(format!("{edge}/v1/tasks"))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({ "title": format!("live bench {i}") }))
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                Ok(User {
                    token,
                    task: task["id"].as_str().context("task id")?.to_owned(),
                    version: task["version"].as_i64().context("task version")?,
                    sockets: Vec::new(),
                })
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    made.into_iter().collect()
}

/// Opens `per_user` sockets for every user, [`HANDSHAKES_IN_FLIGHT`] at a time; each gets
/// `ready` before it counts, then reads on its own task until told to stop. With `designated`,
/// the first socket of each user records when each (task, version) arrived.
async fn open_sockets(
    users: &mut [User],
    per_user: usize,
    designated: bool,
    port: u16,
    shared: &Arc<Shared>,
    stopped: &watch::Receiver<bool>,
    readers: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<()> {
    let jobs: Vec<(usize, usize, String)> = users
        .iter()
        .enumerate()
        .flat_map(|(u, user)| (0..per_user).map(move |s| (u, s, user.token.clone())))
        .collect();
    let mut opened = futures_util::stream::iter(jobs)
        .map(|(u, s, token)| async move { (u, s, open_socket(port, &token).await) })
        .buffer_unordered(HANDSHAKES_IN_FLIGHT);
    while let Some((u, s, result)) = opened.next().await {
        let (socket, head) = match result {
            Ok(opened) => opened,
            Err(why) => {
                shared.refused(why);
                continue;
            }
        };
        let stats = Arc::new(SocketStats::default());
        stats.last_seq.store(head, Ordering::SeqCst);
        stats.last_version.store(users[u].version, Ordering::SeqCst);
        users[u].sockets.push(stats.clone());
        let task = (designated && s == 0).then(|| users[u].task.clone());
        readers.push(tokio::spawn(read_socket(
            socket,
            stats,
            shared.clone(),
            task,
            stopped.clone(),
        )));
    }
    ensure_healthy(shared)
}

/// One handshake straight to notifications, token in the subprotocol list, up to `ready`;
/// returns the socket and the `seq` `ready` carried.
async fn open_socket(port: u16, token: &str) -> Result<(Socket, i64), String> {
    let opening = async {
        let mut request = format!("ws://127.0.0.1:{port}/v1/live")
            .into_client_request()
            .map_err(|err| err.to_string())?;
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(&format!("{PROTOCOL}, bearer.{token}"))
                .map_err(|err| err.to_string())?,
        );
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|err| format!("connect: {err}"))?;
        tcp.set_nodelay(true).map_err(|err| err.to_string())?;
        // Frames are small: tungstenite's default 128 KiB read buffer per socket is not needed.
        let config = WebSocketConfig::default().read_buffer_size(4096);
        let (mut socket, response) =
            tokio_tungstenite::client_async_with_config(request, tcp, Some(config))
                .await
                .map_err(|err| match err {
                    WsError::Http(refusal) => format!(
                        "handshake refused: {} {}",
                        refusal.status(),
                        String::from_utf8_lossy(refusal.body().as_deref().unwrap_or_default())
                    ),
                    err => format!("handshake: {err}"),
                })?;
        let selected = response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|value| value.to_str().ok());
        if selected != Some(PROTOCOL) {
            return Err(format!("the server selected {selected:?}, not {PROTOCOL}"));
        }
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => {
                    let ready: serde_json::Value =
                        serde_json::from_str(&text).map_err(|err| err.to_string())?;
                    if ready["type"] != "ready" {
                        return Err(format!("first frame is not ready: {text}"));
                    }
                    let seq = ready["seq"].as_i64().ok_or("ready without seq")?;
                    return Ok((socket, seq));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => return Err(format!("before ready: {other:?}")),
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, opening)
        .await
        .unwrap_or_else(|_| Err("no ready within 15 s".into()))
}

/// Reads one socket until told to stop (then closes it) or until it ends, which is unexpected.
/// Pings are answered by tungstenite as the stream is polled.
async fn read_socket(
    mut socket: Socket,
    stats: Arc<SocketStats>,
    shared: Arc<Shared>,
    designated_task: Option<String>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            message = socket.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    frame(&text, &stats, &shared, designated_task.as_deref());
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(close))) => {
                    shared.ended(format!("closed by the server: {close:?}"));
                    return;
                }
                Some(Ok(Message::Binary(_))) => {
                    shared.ended("a binary frame".into());
                    return;
                }
                Some(Err(err)) => {
                    shared.ended(format!("read error: {err}"));
                    return;
                }
                None => {
                    shared.ended("the connection ended without a close frame".into());
                    return;
                }
            }
        }
    }
    // Ours to close: a close frame, then read until the server's answer ends the stream.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = socket.close(None).await;
        while let Some(Ok(_)) = socket.next().await {}
    })
    .await;
}

/// Checks and counts one change frame.
fn frame(text: &str, stats: &SocketStats, shared: &Shared, designated_task: Option<&str>) {
    let arrived = Instant::now();
    let Ok(frame) = serde_json::from_str::<serde_json::Value>(text) else {
        shared.ended(format!("a frame that is not JSON: {text}"));
        return;
    };
    let (Some(seq), Some(version)) = (frame["seq"].as_i64(), frame["version"].as_i64()) else {
        // Not a change (`refreshed` has neither): nothing to count.
        return;
    };
    let last = stats.last_seq.load(Ordering::Relaxed);
    if seq > last + 1 {
        shared
            .gaps
            .fetch_add((seq - last - 1) as u64, Ordering::Relaxed);
    } else if seq <= last {
        shared.out_of_order.fetch_add(1, Ordering::Relaxed);
        return;
    }
    stats.last_seq.store(seq, Ordering::Relaxed);
    stats.last_version.fetch_max(version, Ordering::Relaxed);
    stats.frames.fetch_add(1, Ordering::Relaxed);
    shared.frames.fetch_add(1, Ordering::Relaxed);
    shared
        .last_frame_ns
        .fetch_max(shared.since_start(arrived), Ordering::Relaxed);
    if let Some(task) = designated_task {
        if frame["id"].as_str() == Some(task) {
            shared
                .arrivals
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert((task.to_owned(), version), arrived);
        }
    }
}

/// A successful rename: the version it made, when it was sent and when its answer came.
struct Written {
    user: usize,
    version: i64,
    sent: Instant,
    answered: Instant,
}

/// Renames the users' tasks at `rate` per second in all for `duration`, round robin: one writer
/// per user (so it always knows the task's version for `If-Match`), the writers staggered.
async fn write_phase(
    client: &reqwest::Client,
    users: &mut [User],
    rate: f64,
    duration: Duration,
) -> (Writes, Vec<Written>) {
    let edge = format!("http://127.0.0.1:{EDGE_PORT}");
    let start = tokio::time::Instant::now() + WRITES_START_IN;
    let until = start + duration;
    let period = Duration::from_secs_f64(users.len() as f64 / rate);
    let spacing = Duration::from_secs_f64(1.0 / rate);
    let writers = users.iter_mut().enumerate().map(|(i, user)| {
        let edge = &edge;
        async move {
            let mut writes = Writes::default();
            let mut log = Vec::new();
            let mut tick = tokio::time::interval_at(start + spacing * i as u32, period);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut n = 0u64;
            loop {
                tick.tick().await;
                if tokio::time::Instant::now() >= until {
                    break;
                }
                n += 1;
                let sent = Instant::now();
                match rename(client, edge, user, n).await {
                    Ok((version, answered)) => {
                        user.version = version;
                        writes.ok += 1;
                        writes
                            .round_trip_ms
                            .push((answered - sent).as_secs_f64() * 1e3);
                        log.push(Written {
                            user: i,
                            version,
                            sent,
                            answered,
                        });
                    }
                    Err(err) => {
                        writes.failed += 1;
                        writes.first_error.get_or_insert(format!("{err:#}"));
                        // The rename may have happened all the same: learn the version anew.
                        if let Ok(version) = current_version(client, edge, user).await {
                            user.version = version;
                        }
                    }
                }
            }
            (writes, log)
        }
    });
    let started = Instant::now();
    let done = futures_util::future::join_all(writers).await;
    let mut writes = Writes {
        took: started.elapsed().saturating_sub(WRITES_START_IN),
        ..Writes::default()
    };
    let mut log = Vec::new();
    for (one, written) in done {
        writes.ok += one.ok;
        writes.failed += one.failed;
        writes.round_trip_ms.extend(one.round_trip_ms);
        if writes.first_error.is_none() {
            writes.first_error = one.first_error;
        }
        log.extend(written);
    }
    writes.round_trip_ms.sort_by(f64::total_cmp);
    (writes, log)
}

/// `PATCH /v1/tasks/{id}` with `If-Match`; the new version and when the answer came.
async fn rename(
    client: &reqwest::Client,
    edge: &str,
    user: &User,
    n: u64,
) -> Result<(i64, Instant)> {
    let response = client
        .patch(format!("{edge}/v1/tasks/{}", user.task))
        .bearer_auth(&user.token)
        .header("if-match", format!("\"{}\"", user.version))
        .json(&serde_json::json!({ "title": format!("live bench rename {n}") }))
        .send()
        .await?;
    let answered = Instant::now();
    let status = response.status();
    ensure!(
        status == 200,
        "rename answered {status}: {}",
        response.text().await.unwrap_or_default()
    );
    let task: serde_json::Value = response.json().await?;
    Ok((task["version"].as_i64().context("version")?, answered))
}

async fn current_version(client: &reqwest::Client, edge: &str, user: &User) -> Result<i64> {
    let task: serde_json::Value = client
        .get(format!("{edge}/v1/tasks/{}", user.task))
        .bearer_auth(&user.token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    task["version"].as_i64().context("version")
}

/// Waits until every socket of every user got the frame of its task's last version (or
/// `limit` passes: each socket still without it counts as lost).
async fn await_last_versions(users: &[User], limit: Duration, shared: &Shared) {
    let deadline = Instant::now() + limit;
    loop {
        let behind = users
            .iter()
            .flat_map(|user| {
                user.sockets
                    .iter()
                    .filter(|socket| socket.last_version.load(Ordering::Relaxed) < user.version)
            })
            .count();
        if behind == 0 {
            return;
        }
        if Instant::now() > deadline {
            shared.lost.fetch_add(behind as u64, Ordering::Relaxed);
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn latency_of(
    plan: &Plan,
    users: &[User],
    writes: Writes,
    log: Vec<Written>,
    shared: &Shared,
    server_event_to_frame: (f64, f64),
) -> Latency {
    let arrivals = shared
        .arrivals
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let mut after_answer_ms = Vec::new();
    let mut after_send_ms = Vec::new();
    let mut before_answer = 0;
    let mut unmatched = 0;
    for written in &log {
        let key = (users[written.user].task.clone(), written.version);
        let Some(arrived) = arrivals.get(&key) else {
            unmatched += 1;
            continue;
        };
        if *arrived < written.answered {
            before_answer += 1;
        }
        after_answer_ms.push(
            arrived
                .saturating_duration_since(written.answered)
                .as_secs_f64()
                * 1e3,
        );
        after_send_ms.push(
            arrived
                .saturating_duration_since(written.sent)
                .as_secs_f64()
                * 1e3,
        );
    }
    after_answer_ms.sort_by(f64::total_cmp);
    after_send_ms.sort_by(f64::total_cmp);
    Latency {
        connected: plan.bulk_sockets() + plan.latency_sockets(),
        reading: plan.latency_sockets(),
        writes,
        after_answer_ms,
        after_send_ms,
        before_answer,
        unmatched,
        server_event_to_frame,
    }
}

pub(crate) async fn scrape(client: &reqwest::Client, port: u16) -> Result<String> {
    Ok(client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}

/// The sum of every series of `name` in a Prometheus text exposition.
pub(crate) fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                return None;
            }
            line.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .sum()
}

/// `name`'s cumulative buckets (upper bound, count), summed over its series.
fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut by_bound: Vec<(f64, f64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let Some(bound) = rest
            .split("le=\"")
            .nth(1)
            .and_then(|after| after.split('"').next())
        else {
            continue;
        };
        let bound = if bound == "+Inf" {
            f64::INFINITY
        } else {
            match bound.parse::<f64>() {
                Ok(bound) => bound,
                Err(_) => continue,
            }
        };
        let Some(count) = line.rsplit(' ').next().and_then(|c| c.parse::<f64>().ok()) else {
            continue;
        };
        match by_bound.iter_mut().find(|(b, _)| *b == bound) {
            Some((_, total)) => *total += count,
            None => by_bound.push((bound, count)),
        }
    }
    by_bound.sort_by(|a, b| a.0.total_cmp(&b.0));
    by_bound
}

/// p50 and p99 of a histogram over the time between two scrapes, as the upper bounds of the
/// buckets they fall in (seconds).
fn histogram_delta(before: &str, after: &str, name: &str) -> (f64, f64) {
    let before = buckets(before, name);
    let delta: Vec<(f64, f64)> = buckets(after, name)
        .into_iter()
        .map(|(bound, count)| {
            let earlier = before
                .iter()
                .find(|(b, _)| *b == bound)
                .map_or(0.0, |(_, c)| *c);
            (bound, count - earlier)
        })
        .collect();
    let total = delta.last().map_or(0.0, |(_, count)| *count);
    let quantile = |q: f64| {
        delta
            .iter()
            .find(|(_, count)| total > 0.0 && *count >= q * total)
            .map_or(f64::NAN, |(bound, _)| *bound)
    };
    (quantile(0.5), quantile(0.99))
}

/// The value at quantile `q` of sorted `values`.
fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

fn bound_ms(seconds: f64) -> String {
    if seconds.is_infinite() {
        "> 10 s".to_owned()
    } else if seconds.is_nan() {
        "-".to_owned()
    } else {
        format!("≤ {} ms", seconds * 1e3)
    }
}

fn verdict(smoke: bool, met: bool) -> &'static str {
    match (smoke, met) {
        (true, _) => "smoke run: no goal",
        (false, true) => "met",
        (false, false) => "NOT met",
    }
}

impl Measured {
    fn report(&self, plan: &Plan, problems: Vec<String>) -> String {
        let Measured {
            profile,
            idle,
            latency,
            fanout,
        } = self;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Live updates benchmark\n\n\
             notifications {profile} build, one instance; the client (this xtask, one process) \
             opens its sockets straight to notifications on 127.0.0.1, not through the edge, \
             which would hold a second socket and its buffers for each and double the file \
             descriptors and memory on this one machine; renames go through the edge. Client, \
             services, PostgreSQL and broker share this machine's cores.\n"
        );

        let per_socket =
            (idle.rss_after_kib as f64 - idle.rss_before_kib as f64) / idle.sockets.max(1) as f64;
        let _ = writeln!(
            out,
            "## Idle sockets\n\n\
             | sockets | users | opened in | notifications RSS before | after, idle {} s | per socket | goal ≤ {GOAL_IDLE_KIB_PER_SOCKET} KiB |\n\
             |---|---|---|---|---|---|---|\n\
             | {} (server: {}) | {} × {} | {:.1} s ({:.0}/s, {HANDSHAKES_IN_FLIGHT} in flight) | {:.1} MiB | {:.1} MiB | **{per_socket:.2} KiB** | {} |\n",
            IDLE_SETTLE.as_secs(),
            idle.sockets,
            idle.server_connections,
            plan.bulk_users,
            plan.sockets_per_bulk_user,
            idle.opened_in.as_secs_f64(),
            idle.sockets as f64 / idle.opened_in.as_secs_f64().max(0.001),
            idle.rss_before_kib as f64 / 1024.0,
            idle.rss_after_kib as f64 / 1024.0,
            verdict(plan.smoke, per_socket <= GOAL_IDLE_KIB_PER_SOCKET),
        );

        let ms = |values: &[f64], q: f64| format!("{:.2} ms", percentile(values, q));
        let p99 = percentile(&latency.after_answer_ms, 0.99);
        let _ = writeln!(
            out,
            "## Latency\n\n\
             {} sockets connected, {} of them ({} users × {}) reading; their tasks renamed at \
             {:.0}/s for {} s (achieved {:.1}/s; {} ok, {} failed{}). Latency: from the rename's \
             answer to the frame of that (task, version) at one designated socket of the user; \
             {} frames came before the answer (counted as 0), {} never came.\n\n\
             | from | frames | p50 | p95 | p99 | max | goal p99 < {GOAL_LATENCY_P99_MS} ms |\n\
             |---|---|---|---|---|---|---|\n\
             | the rename's answer | {} | {} | {} | **{}** | {} | {} |\n\
             | sending the rename | {} | {} | {} | {} | {} | |\n\
             | (rename round trip) | {} | {} | {} | {} | {} | |\n\n\
             Server's `live_event_to_frame_seconds` over the phase (event time to frame sent, bucket \
             bounds): p50 {}, p99 {}.\n",
            latency.connected,
            latency.reading,
            plan.latency_users,
            plan.sockets_per_latency_user,
            plan.latency_rate,
            plan.latency_for.as_secs(),
            latency.writes.rate(),
            latency.writes.ok,
            latency.writes.failed,
            latency
                .writes
                .first_error
                .as_deref()
                .map(|err| format!(", first: {err}"))
                .unwrap_or_default(),
            latency.before_answer,
            latency.unmatched,
            latency.after_answer_ms.len(),
            ms(&latency.after_answer_ms, 0.5),
            ms(&latency.after_answer_ms, 0.95),
            ms(&latency.after_answer_ms, 0.99),
            ms(&latency.after_answer_ms, 1.0),
            verdict(plan.smoke, p99 < GOAL_LATENCY_P99_MS),
            latency.after_send_ms.len(),
            ms(&latency.after_send_ms, 0.5),
            ms(&latency.after_send_ms, 0.95),
            ms(&latency.after_send_ms, 0.99),
            ms(&latency.after_send_ms, 1.0),
            latency.writes.round_trip_ms.len(),
            ms(&latency.writes.round_trip_ms, 0.5),
            ms(&latency.writes.round_trip_ms, 0.95),
            ms(&latency.writes.round_trip_ms, 0.99),
            ms(&latency.writes.round_trip_ms, 1.0),
            bound_ms(latency.server_event_to_frame.0),
            bound_ms(latency.server_event_to_frame.1),
        );

        let seconds = fanout.elapsed.as_secs_f64().max(0.001);
        let client_rate = fanout.frames_received as f64 / seconds;
        let server_rate = fanout.server_frames / seconds;
        let mut per_second = fanout.per_second.clone();
        per_second.sort_unstable();
        let median = per_second.get(per_second.len() / 2).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "## Fan-out\n\n\
             All {} sockets ({} users × {}) reading; their tasks renamed at {:.0}/s for {} s \
             (achieved {:.1}/s; {} ok, {} failed{}), so {:.0} frames/s offered. Rates are over \
             {:.2} s, from the first rename sent to the last frame received.\n\n\
             | frames expected | received by the clients | sent (server) | client frames/s | server frames/s | per second while renaming (clients): min / median / max | goal ≥ {GOAL_FRAMES_PER_SEC:.0}/s |\n\
             |---|---|---|---|---|---|---|\n\
             | {} | {} | {} | **{client_rate:.0}** | **{server_rate:.0}** | {} / {median} / {} | {} |\n\n\
             CPU over the phase: notifications {:.2} s ({:.1} µs per frame), the client {:.2} s. \
             Server's event-to-frame latency: p50 {}, p99 {}.\n",
            fanout.sockets,
            plan.bulk_users,
            plan.sockets_per_bulk_user,
            plan.fanout_rate,
            plan.fanout_for.as_secs(),
            fanout.writes.rate(),
            fanout.writes.ok,
            fanout.writes.failed,
            fanout
                .writes
                .first_error
                .as_deref()
                .map(|err| format!(", first: {err}"))
                .unwrap_or_default(),
            plan.fanout_rate * plan.sockets_per_bulk_user as f64,
            seconds,
            fanout.frames_expected,
            fanout.frames_received,
            fanout.server_frames,
            per_second.first().copied().unwrap_or(0),
            per_second.last().copied().unwrap_or(0),
            verdict(plan.smoke, client_rate >= GOAL_FRAMES_PER_SEC),
            fanout.server_cpu,
            fanout.server_cpu * 1e6 / fanout.server_frames.max(1.0),
            fanout.client_cpu,
            bound_ms(fanout.server_event_to_frame.0),
            bound_ms(fanout.server_event_to_frame.1),
        );

        let _ = writeln!(out, "## Checks\n");
        if problems.is_empty() {
            let _ = writeln!(
                out,
                "- pass: every handshake accepted, no socket closed by the server, every frame in \
                 `seq` order without gaps, every socket got its user's last version"
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
    use super::{histogram_delta, metric_sum, percentile};

    const BEFORE: &str = "\
# TYPE live_frames_sent_total counter
live_frames_sent_total{service=\"notifications\"} 10
live_frames_sent_total_other 99
live_event_to_frame_seconds_bucket{service=\"notifications\",le=\"0.001\"} 5
live_event_to_frame_seconds_bucket{service=\"notifications\",le=\"0.01\"} 10
live_event_to_frame_seconds_bucket{service=\"notifications\",le=\"+Inf\"} 10
";
    const AFTER: &str = "\
live_frames_sent_total{service=\"notifications\"} 110
live_event_to_frame_seconds_bucket{service=\"notifications\",le=\"0.001\"} 5
live_event_to_frame_seconds_bucket{service=\"notifications\",le=\"0.01\"} 100
live_event_to_frame_seconds_bucket{service=\"notifications\",le=\"+Inf\"} 110
";

    #[test]
    fn reads_counters_and_histogram_quantiles_from_the_exposition() {
        assert_eq!(metric_sum(BEFORE, "live_frames_sent_total"), 10.0);
        assert_eq!(metric_sum(AFTER, "live_frames_sent_total"), 110.0);
        // 100 observations between the scrapes: 90 at most 10 ms, 10 above.
        let (p50, p99) = histogram_delta(BEFORE, AFTER, "live_event_to_frame_seconds");
        assert_eq!(p50, 0.01);
        assert!(p99.is_infinite());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&values, 1.0), 100.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
