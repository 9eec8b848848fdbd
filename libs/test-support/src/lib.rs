//! Helpers for integration tests that run against the real test stack `cargo xtask test` starts:
//! a PostgreSQL primary with a streaming replica and a Kafka-protocol broker.
//!
//! Tests spawn real service processes on free ports and talk to them over real sockets, with
//! HTTP/1.1 and h2c clients. A test that needs to break the replica makes a scratch replica of
//! its own, so tests running beside it are not disturbed.

mod answer;
pub mod auth;
pub mod fake_postgres;
pub mod kafka;
pub mod spine_checks;
pub mod trace_capture;

pub use answer::{openapi_operations, Answer};

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use local_broker::LocalBroker;
use local_postgres::{PgInstall, RunningCluster};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Addresses of the stack, passed in by `cargo xtask test`.
#[derive(Debug, Clone)]
pub struct TestStack {
    pub primary_port: u16,
    pub replica_port: u16,
    pub broker: String,
    broker_bin: PathBuf,
    scratch: PathBuf,
}

impl TestStack {
    /// Reads the stack's addresses; panics with instructions when run outside `cargo xtask test`.
    pub fn from_env() -> Self {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set: integration tests run against a real stack; use `cargo xtask test`")
            })
        };
        let port = |name: &str| {
            var(name)
                .parse()
                .unwrap_or_else(|_| panic!("{name} is not a port"))
        };
        Self {
            primary_port: port("TASKSTREAM_TEST_PRIMARY_PORT"),
            replica_port: port("TASKSTREAM_TEST_REPLICA_PORT"),
            broker: var("TASKSTREAM_TEST_BROKER"),
            broker_bin: PathBuf::from(var("TASKSTREAM_TEST_BROKER_BIN")),
            scratch: PathBuf::from(var("TASKSTREAM_TEST_SCRATCH")),
        }
    }

    /// Creates `topics` (name, partitions) on the broker at `bootstrap_servers`, unless they exist.
    pub fn create_topics(&self, bootstrap_servers: &str, topics: &[(String, i32)]) {
        local_broker::create_topics(&self.broker_bin, bootstrap_servers, topics)
            .unwrap_or_else(|err| panic!("create topics on {bootstrap_servers}: {err}"));
    }

    /// Environment for a service using `database` (its role has the same name) on the stack.
    pub fn service_env(&self, database: &str) -> Vec<(String, String)> {
        self.service_env_with_reader(database, self.replica_port)
    }

    /// Like [`Self::service_env`], with reads pointed at the replica on `reader_port`.
    pub fn service_env_with_reader(
        &self,
        database: &str,
        reader_port: u16,
    ) -> Vec<(String, String)> {
        [
            ("HTTP_HOST", "127.0.0.1".to_owned()),
            ("HTTP_WORKERS", "2".to_owned()),
            (
                "DATABASE_WRITER_URL",
                local_postgres::database_url(self.primary_port, database),
            ),
            (
                "DATABASE_READER_URL",
                local_postgres::database_url(reader_port, database),
            ),
            ("KAFKA_BOOTSTRAP_SERVERS", self.broker.clone()),
            ("RUST_LOG", "info".to_owned()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect()
    }

    /// A fresh, unique folder under the stack's scratch area.
    pub fn scratch_dir(&self, label: &str) -> PathBuf {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = self.scratch.join(format!(
            "{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        dir
    }

    /// A streaming replica of the stack's primary that only this test uses (and may stop).
    pub fn scratch_replica(&self, label: &str) -> ScratchCluster {
        let install = PgInstall::detect().expect("PostgreSQL binaries");
        let root = self.scratch_dir(label);
        let data = root.join("data");
        install
            .base_backup(self.primary_port, &data)
            .expect("pg_basebackup");
        ScratchCluster::started(install, root, data, &[])
    }

    /// A primary of its own that only this test uses (and may stop, as in an outage): for a
    /// service whose database must go away while the rest of the stack stays up. Connect as the
    /// superuser `postgres` to the `postgres` database ([`ScratchCluster::url`]).
    pub fn scratch_primary(&self, label: &str) -> ScratchCluster {
        let install = PgInstall::detect().expect("PostgreSQL binaries");
        let root = self.scratch_dir(label);
        let data = root.join("data");
        install.init_primary(&data).expect("initdb");
        // Throwaway data, as on the stack's own primary.
        ScratchCluster::started(
            install,
            root,
            data,
            &[("fsync", "off"), ("synchronous_commit", "off")],
        )
    }
}

impl TestStack {
    /// A database of `service`'s own (owned by its role, migrated by `<service> migrate`) that
    /// only this test uses: for tests whose service must not share its database with the other
    /// tests' instances (the outbox relay publishes for whoever shares its database). Returns
    /// the environment pointing the service at it, on the primary and on the replica.
    pub fn scratch_database(&self, service: &str) -> Vec<(String, String)> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{service}_scratch_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let install = PgInstall::detect().expect("PostgreSQL binaries");
        local_postgres::query(
            &install,
            self.primary_port,
            "postgres",
            &format!("CREATE DATABASE {name} OWNER {service}"),
        )
        .unwrap_or_else(|err| panic!("create database {name}: {err}"));
        let url = |port: u16| format!("postgres://{service}@127.0.0.1:{port}/{name}");
        let writer = url(self.primary_port);
        let (status, _, stderr) = run_to_exit_with_args(
            workspace_binary(service),
            &["migrate"],
            &[("DATABASE_WRITER_URL", writer.as_str())],
        );
        assert!(status.success(), "{service} migrate on {name}: {stderr}");
        self.wait_for_replica(&install);
        vec![
            ("DATABASE_WRITER_URL".to_owned(), writer),
            ("DATABASE_READER_URL".to_owned(), url(self.replica_port)),
        ]
    }

    /// Waits (up to 10 s) until the stack's replica has replayed everything the primary holds now:
    /// a database created a moment ago is then there on both, schema included.
    fn wait_for_replica(&self, install: &PgInstall) {
        let lsn = local_postgres::query(
            install,
            self.primary_port,
            "postgres",
            "SELECT pg_current_wal_lsn()",
        )
        .expect("the primary's WAL position");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let replayed = local_postgres::query(
                install,
                self.replica_port,
                "postgres",
                &format!(
                    "SELECT pg_last_wal_replay_lsn() >= '{}'::pg_lsn",
                    lsn.trim()
                ),
            )
            .unwrap_or_default();
            if replayed.trim() == "t" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the replica did not replay up to {lsn} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A broker that only this test uses (and may pause), empty: create the topics it needs.
    pub fn scratch_broker(&self, label: &str) -> LocalBroker {
        let install =
            PgInstall::detect().expect("PostgreSQL binaries (run the broker unprivileged)");
        let root = self.scratch_dir(label);
        let log = File::create(root.join("broker.log")).expect("broker log");
        LocalBroker::start(
            &install,
            &self.broker_bin,
            &root.join("broker"),
            free_port(),
            log,
        )
        .unwrap_or_else(|err| panic!("start a scratch broker: {err}"))
    }
}

/// A PostgreSQL server owned by one test (a replica or a primary of its own).
pub struct ScratchCluster {
    install: PgInstall,
    data: PathBuf,
    log: PathBuf,
    pub port: u16,
    settings: &'static [(&'static str, &'static str)],
    running: Option<RunningCluster>,
}

impl ScratchCluster {
    fn started(
        install: PgInstall,
        root: PathBuf,
        data: PathBuf,
        settings: &'static [(&'static str, &'static str)],
    ) -> Self {
        let mut cluster = Self {
            install,
            data,
            log: root.join("postgres.log"),
            port: free_port(),
            settings,
            running: None,
        };
        cluster.start();
        cluster
    }

    /// The URL of the `postgres` database as the superuser.
    pub fn url(&self) -> String {
        local_postgres::database_url(self.port, "postgres")
    }

    /// Starts (or restarts) the server on the same port and data.
    pub fn start(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("scratch cluster log");
        self.running = Some(
            self.install
                .start(&self.data, self.port, self.settings, log)
                .expect("start the scratch cluster"),
        );
    }

    /// Runs `sql` as the superuser (e.g. `SELECT pg_wal_replay_pause()` on a replica).
    pub fn query(&self, database: &str, sql: &str) -> String {
        local_postgres::query(&self.install, self.port, database, sql)
            .unwrap_or_else(|err| panic!("{sql} on the scratch cluster: {err}"))
    }

    /// Stops the server process (fast shutdown: its connections are cut).
    pub fn stop(&mut self) {
        if let Some(mut running) = self.running.take() {
            running.stop().expect("stop the scratch cluster");
        }
    }
}

/// A binary cargo built into the same profile folder as the running test (`target/debug/<name>`),
/// e.g. `auth`, or `examples/probe_service`. `cargo xtask test` builds them all first.
pub fn workspace_binary(name: &str) -> PathBuf {
    let test_binary = std::env::current_exe().expect("test binary path");
    let path = test_binary
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target profile folder")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo xtask test` does)",
        path.display()
    );
    path
}

/// The resident memory of process `pid` now, in KiB (`VmRSS`; 0 once it is gone): for sampling
/// from a task that cannot hold the [`ServiceProcess`].
pub fn rss_kib_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A name no other test run uses, for usernames and the like: `prefix` + a unique suffix,
/// lower-case letters and digits only.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    format!(
        "{prefix}{:x}{:x}{}",
        std::process::id(),
        nanos,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Every table of the database at `database_url` (a `postgres://role@127.0.0.1:port/name` URL
/// of the test stack) holding rows in which `needle` appears in any column, JSON included, with
/// how many: what "nothing of this user is left" is checked by. Read as the superuser, so
/// tables the service's role could not see are searched too.
pub fn rows_mentioning(database_url: &str, needle: &str) -> Vec<(String, i64)> {
    let (port, database) = database_url
        .rsplit_once('@')
        .and_then(|(_, address)| address.split_once(':'))
        .and_then(|(_, rest)| rest.split_once('/'))
        .and_then(|(port, name)| Some((port.parse::<u16>().ok()?, name.to_owned())))
        .unwrap_or_else(|| panic!("not a test stack database URL: {database_url}"));
    assert!(
        needle
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-'),
        "search for ids, not {needle:?}"
    );
    let install = PgInstall::detect().expect("PostgreSQL binaries");
    // One statement: a count per table, each made by query_to_xml from the table's name.
    let sql = format!(
        "SELECT table_name || '=' || (xpath('/row/n/text()', query_to_xml(format( \
           'SELECT count(*) AS n FROM %I AS t WHERE t::text LIKE %L', table_name, '%{needle}%'), \
           false, true, '')))[1]::text \
         FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY table_name"
    );
    let output = local_postgres::query(&install, port, &database, &sql)
        .unwrap_or_else(|err| panic!("search {database} for {needle}: {err}"));
    output
        .lines()
        .filter_map(|line| line.split_once('='))
        .filter_map(|(table, count)| Some((table.to_owned(), count.trim().parse::<i64>().ok()?)))
        .filter(|(_, count)| *count > 0)
        .collect()
}

/// Asks `probe` every half second until `done` holds for its answer or `limit` has passed;
/// returns the last answer (for the test to assert on, so a timeout shows what was seen).
pub async fn poll_until<T, F, Fut>(limit: Duration, mut probe: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = Instant::now() + limit;
    loop {
        let answer = probe().await;
        if done(&answer) || Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The Prometheus text served at `metrics_url`.
pub async fn metrics_text(client: &reqwest::Client, metrics_url: &str) -> String {
    client
        .get(metrics_url)
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body")
}

/// Sum of every series of the metric `name` in the Prometheus text at `metrics_url`.
pub async fn metric_sum(client: &reqwest::Client, metrics_url: &str, name: &str) -> f64 {
    metric_sum_where(client, metrics_url, name, "").await
}

/// Sum of the series of the metric `name` whose labels contain `label` (`pool="password"`, say)
/// in the Prometheus text at `metrics_url`.
pub async fn metric_sum_where(
    client: &reqwest::Client,
    metrics_url: &str,
    name: &str,
    label: &str,
) -> f64 {
    metrics_text(client, metrics_url)
        .await
        .lines()
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .filter(|line| line.contains(label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits for every spawned task and returns their results in order; a panic in one fails the test.
///
/// `tasks` is collected before anything is awaited: given a lazy `map(|_| tokio::spawn(…))`,
/// awaiting while iterating would spawn each task only after the previous one finished.
pub async fn join_spawned<T>(
    tasks: impl IntoIterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let tasks: Vec<_> = tasks.into_iter().collect();
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.expect("a concurrent task panicked"));
    }
    results
}

/// A port nothing listens on right now, and never handed out before by this process. The kernel
/// may give the same ephemeral port to two `bind(0)`s in a row once the first listener is
/// closed, so two services spawned back to back could get one port (the second then fails with
/// "address in use" while the first answers for both).
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("bind an ephemeral port")
            .port();
        let mut handed_out = HANDED_OUT
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

/// A client that speaks HTTP/1.1 only.
pub fn http1_client() -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http/1.1 client")
}

/// A client that speaks HTTP/2 cleartext with prior knowledge (h2c), like `curl --http2-prior-knowledge`.
pub fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("h2c client")
}

/// A service binary running as a child process on a free port, its output in a log file.
pub struct ServiceProcess {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

impl ServiceProcess {
    /// Starts `binary` with exactly `env` (plus PATH and a free `HTTP_PORT`).
    pub fn spawn(binary: impl AsRef<Path>, env: &[(String, String)], log_dir: &Path) -> Self {
        let binary = binary.as_ref();
        let port = free_port();
        let name = binary
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("service");
        let log = log_dir.join(format!("{name}-{port}.log"));
        let file = File::create(&log).expect("service log");
        let child = Command::new(binary)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("HTTP_PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log handle"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|err| panic!("spawn {}: {err}", binary.display()));
        Self { child, port, log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Its resident memory now, in KiB (`VmRSS`), for tests that check memory stays flat.
    pub fn rss_kib(&self) -> u64 {
        rss_kib_of(self.child.id())
    }

    /// Starts the local edge proxy (`xtask edge`) routing to `upstreams` (service, base URL),
    /// and waits until it answers.
    pub async fn spawn_edge(upstreams: &[(&str, String)], log_dir: &Path) -> Self {
        let port = free_port();
        let log = log_dir.join(format!("edge-{port}.log"));
        let file = File::create(&log).expect("edge log");
        let child = Command::new(workspace_binary("xtask"))
            .arg("edge")
            .arg(port.to_string())
            .args(
                upstreams
                    .iter()
                    .map(|(service, url)| format!("{service}={url}")),
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log handle"))
            .stderr(file)
            .spawn()
            .expect("spawn xtask edge");
        let mut edge = Self { child, port, log };
        edge.wait_for("/healthz").await;
        edge
    }

    /// Waits until `/readyz` answers 200; panics with the service's log if it never does.
    pub async fn wait_ready(&mut self) {
        self.wait_for("/readyz").await;
    }

    /// Waits until `path` answers 200; panics with the process's log if it never does.
    pub async fn wait_for(&mut self, path: &str) {
        let client = http1_client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) = client.get(self.url(path)).send().await {
                if response.status() == 200 {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "service exited during start-up ({status}):\n{}",
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "service not ready within 30 s:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).expect("send SIGTERM");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the process dies at once, as on an OOM kill or a node failure.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit; panics after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll child") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "service still running after {limit:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything the service wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `binary` with exactly `env` to completion (bounded), returning status, stdout, stderr.
pub fn run_to_exit(binary: impl AsRef<Path>, env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    run_to_exit_with_args(binary, &[], env)
}

/// [`run_to_exit`] with command-line arguments (`migrate`, say).
pub fn run_to_exit_with_args(
    binary: impl AsRef<Path>,
    args: &[&str],
    env: &[(&str, &str)],
) -> (ExitStatus, String, String) {
    let mut child = Command::new(binary.as_ref())
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("poll").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("collect output");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_never_handed_out_twice() {
        let ports: Vec<u16> = (0..2_000).map(|_| free_port()).collect();
        let distinct: std::collections::HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
    }
}
