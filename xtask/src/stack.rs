//! The infrastructure under the services: a PostgreSQL primary, its streaming replica and a
//! Kafka-protocol broker, all on loopback, all children of this process.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use local_broker::LocalBroker;
use local_postgres::{ensure_service_database, RunningCluster};

use crate::prereqs;

/// The services, their default ports and their databases (one per service, same name).
pub const SERVICES: [(&str, u16); 4] = [
    ("auth", 8081),
    ("tasks", 8082),
    ("notifications", 8083),
    ("analysis", 8084),
];

/// Where a stack lives and listens.
pub struct StackLayout {
    /// State folder: database clusters, broker working folder, logs.
    pub root: PathBuf,
    pub primary_port: u16,
    pub replica_port: u16,
    pub broker_port: u16,
    /// Start from empty data instead of reusing the primary's.
    pub fresh: bool,
    /// Trade durability for speed (fsync off): only for throwaway test data.
    pub throwaway: bool,
}

impl StackLayout {
    /// `cargo xtask up`: the documented ports; the primary's data is kept between runs.
    pub fn up(state_dir: &Path) -> Self {
        Self {
            root: state_dir.join("up"),
            primary_port: 55432,
            replica_port: 55433,
            broker_port: 9092,
            fresh: false,
            throwaway: false,
        }
    }

    /// `cargo xtask bench`: ports of its own, so it can run beside `up` and `test`; data thrown
    /// away. Below the kernel's ephemeral range (32768–60999), where no outgoing connection can
    /// happen to hold them.
    pub fn bench(state_dir: &Path) -> Self {
        Self {
            root: state_dir.join("bench"),
            primary_port: 27432,
            replica_port: 27433,
            broker_port: 29092,
            fresh: true,
            throwaway: true,
        }
    }

    /// `cargo xtask test`: ports of its own, so it can run beside `up`; data thrown away. Below
    /// the ephemeral range, like the bench's.
    pub fn test(state_dir: &Path) -> Self {
        Self {
            root: state_dir.join("test"),
            primary_port: 26432,
            replica_port: 26433,
            broker_port: 19092,
            fresh: true,
            throwaway: true,
        }
    }
}

/// The running infrastructure; stopped in reverse order of start.
pub struct Infra {
    pub primary: RunningCluster,
    pub replica: RunningCluster,
    broker: LocalBroker,
    /// The broker binary, for tests that start brokers of their own.
    pub broker_bin: PathBuf,
    pub layout: StackLayout,
}

/// Partitions of each catalog topic on a local broker: enough for consumer groups to share.
const LOCAL_PARTITIONS: i32 = 3;

impl Infra {
    pub fn start(layout: StackLayout) -> Result<Self> {
        let install = prereqs::ensure_postgres()?;
        // Shared by every stack under the same state folder.
        let bin_dir = layout.root.parent().unwrap_or(&layout.root).join("bin");
        let broker_bin = prereqs::ensure_broker(&bin_dir)?;
        for (what, port) in [
            ("PostgreSQL primary", layout.primary_port),
            ("PostgreSQL replica", layout.replica_port),
            ("broker", layout.broker_port),
        ] {
            ensure_port_free(what, port)?;
        }
        if layout.fresh && layout.root.exists() {
            std::fs::remove_dir_all(&layout.root)
                .with_context(|| format!("removing {}", layout.root.display()))?;
        }
        let logs = layout.root.join("logs");
        std::fs::create_dir_all(&logs)?;

        let mut settings = vec![("wal_level", "replica"), ("hot_standby", "on")];
        if layout.throwaway {
            settings.extend([
                ("fsync", "off"),
                ("synchronous_commit", "off"),
                ("full_page_writes", "off"),
            ]);
        }

        let primary_dir = layout.root.join("primary");
        if !primary_dir.join("PG_VERSION").exists() {
            install
                .init_primary(&primary_dir)
                .context("initdb for the primary")?;
        }
        let primary = install
            .start(
                &primary_dir,
                layout.primary_port,
                &settings,
                log_file(&logs, "postgres-primary")?,
            )
            .context("starting the primary")?;
        for (service, _) in SERVICES {
            ensure_service_database(&install, layout.primary_port, service)
                .with_context(|| format!("creating the {service} database"))?;
        }

        // Always a fresh copy: quick (seconds), and it follows whatever the primary holds now.
        let replica_dir = layout.root.join("replica");
        install
            .base_backup(layout.primary_port, &replica_dir)
            .context("pg_basebackup for the replica")?;
        // Rebuilt at every start, the replica has nothing to keep through a crash: it need not
        // fsync. With it, the WAL receiver's flush of every chunk it received took ~0.7 of a
        // core here under ~700 writes/s (on a cluster the replica has its own machine).
        let mut replica_settings = settings.clone();
        if !layout.throwaway {
            replica_settings.push(("fsync", "off"));
        }
        let replica = install
            .start(
                &replica_dir,
                layout.replica_port,
                &replica_settings,
                log_file(&logs, "postgres-replica")?,
            )
            .context("starting the replica")?;
        let in_recovery = replica.query("postgres", "SELECT pg_is_in_recovery()")?;
        if in_recovery != "t" {
            bail!(
                "the replica on port {} is not in recovery",
                layout.replica_port
            );
        }

        let broker = LocalBroker::start(
            &install,
            &broker_bin,
            &layout.root.join("broker"),
            layout.broker_port,
            log_file(&logs, "broker")?,
        )
        .with_context(|| {
            format!(
                "starting the broker; see {}",
                logs.join("broker.log").display()
            )
        })?;
        Ok(Self {
            primary,
            replica,
            broker,
            broker_bin,
            layout,
        })
    }

    /// Creates the event catalog's topics and dead-letter topics (Strimzi does it in a cluster).
    pub fn create_topics(&self) -> Result<()> {
        local_broker::create_topics(
            &self.broker_bin,
            &self.broker.bootstrap_servers(),
            &events::catalog::topics_to_create(LOCAL_PARTITIONS),
        )
        .context("creating the catalog's topics")
    }

    /// Creates `topic` with `partitions` and its dead-letter topic, unless they exist.
    pub fn create_topic_set(&self, topic: &str, partitions: i32) -> Result<()> {
        local_broker::create_topics(
            &self.broker_bin,
            &self.broker.bootstrap_servers(),
            &[
                (topic.to_owned(), partitions),
                (events::catalog::dead_letter_topic(topic), 1),
            ],
        )
        .with_context(|| format!("creating {topic}"))
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.layout.root.join("logs")
    }

    /// Stops the broker, then the replica, then the primary.
    pub fn stop(mut self) {
        let _ = self.broker.stop();
        let _ = self.replica.stop();
        let _ = self.primary.stop();
    }
}

/// Where stacks keep their state: `<workspace>/.local` (git-ignored), unless the workspace sits
/// below a folder the unprivileged server account cannot enter (a checkout under `/root`, say);
/// then a folder under `/var/tmp` named after the workspace, so the servers can still reach it.
/// Where load scenarios and benchmarks write their reports (`.local/loadtest/`), created.
pub fn reports_dir(workspace: &Path) -> Result<PathBuf> {
    let reports = state_dir(workspace).join("loadtest");
    std::fs::create_dir_all(&reports).with_context(|| format!("creating {}", reports.display()))?;
    Ok(reports)
}

pub fn state_dir(workspace: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let enterable_by_others = workspace
        .ancestors()
        .all(|dir| std::fs::metadata(dir).is_ok_and(|meta| meta.permissions().mode() & 0o001 != 0));
    if !nix::unistd::Uid::effective().is_root() || enterable_by_others {
        return workspace.join(".local");
    }
    let name: String = workspace
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let fallback = PathBuf::from("/var/tmp/taskstream").join(name);
    println!(
        "xtask: {} is not reachable by the postgres account; state goes to {}",
        workspace.display(),
        fallback.display()
    );
    fallback
}

/// A log file under `logs`, truncated.
pub fn log_file(logs: &Path, name: &str) -> Result<File> {
    let path = logs.join(format!("{name}.log"));
    File::create(&path).with_context(|| format!("creating {}", path.display()))
}

fn ensure_port_free(what: &str, port: u16) -> Result<()> {
    match TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => Ok(()),
        Err(err) => bail!(
            "port {port} for the {what} is taken ({err}): is another `cargo xtask up` or `cargo xtask test` running?"
        ),
    }
}
