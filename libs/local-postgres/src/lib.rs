//! Throwaway PostgreSQL clusters on this machine, from Debian's server binaries, for the local
//! stack (`cargo xtask up`) and the integration tests: a primary, a streaming replica made with
//! `pg_basebackup`, start and stop.
//!
//! PostgreSQL refuses to run as root, so when we are root every server command runs as the
//! `postgres` system user and the data folders are handed to it.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{chown, Gid, Pid, Uid, User};

/// How long a server may take to accept connections after start.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections every cluster allows: four services × two pools, plus tests and tools.
const MAX_CONNECTIONS: u32 = 300;
/// How long a fast shutdown may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// The server binaries and the account that runs them.
#[derive(Debug, Clone)]
pub struct PgInstall {
    bin_dir: PathBuf,
    run_as: Option<(Uid, Gid)>,
}

impl PgInstall {
    /// Finds the newest `/usr/lib/postgresql/<version>/bin` (or `$PG_BIN_DIR`) and, when running
    /// as root, the `postgres` account.
    pub fn detect() -> Result<Self, String> {
        let bin_dir = match std::env::var_os("PG_BIN_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => newest_debian_bin_dir().ok_or_else(|| {
                "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: \
                 install them with `apt-get install postgresql` (or set PG_BIN_DIR)"
                    .to_owned()
            })?,
        };
        if !bin_dir.join("initdb").exists() {
            return Err(format!("{} has no initdb", bin_dir.display()));
        }
        let run_as = if Uid::effective().is_root() {
            let user = User::from_name("postgres")
                .map_err(|err| format!("looking up the postgres user: {err}"))?
                .ok_or(
                    "running as root needs a `postgres` system user to run the servers: \
                        `useradd --system postgres`",
                )?;
            Some((user.uid, user.gid))
        } else {
            None
        };
        Ok(Self { bin_dir, run_as })
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// A command for one of the server binaries, run as the server account.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin_dir.join(program));
        self.run_as_server_account(&mut command);
        command
    }

    /// Makes `command` run as the unprivileged server account when we are root.
    pub fn run_as_server_account(&self, command: &mut Command) {
        if let Some((uid, gid)) = self.run_as {
            use std::os::unix::process::CommandExt;
            command.uid(uid.as_raw()).gid(gid.as_raw());
        }
    }

    /// Creates `dir` (and parents), private (0700, as PostgreSQL demands), owned by the server account.
    pub fn prepare_dir(&self, dir: &Path) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        if let Some((uid, gid)) = self.run_as {
            chown(dir, Some(uid), Some(gid)).map_err(io::Error::from)?;
        }
        Ok(())
    }

    /// `initdb` with trust authentication on loopback (local development only) and superuser
    /// `postgres`. Replication connections from loopback are allowed by initdb's defaults.
    pub fn init_primary(&self, dir: &Path) -> io::Result<()> {
        self.prepare_dir(dir)?;
        run(self
            .command("initdb")
            .args([
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ])
            .arg("--pgdata")
            .arg(dir))
    }

    /// Copies a running primary into `dir` as a streaming replica (`standby.signal` + conninfo).
    pub fn base_backup(&self, primary_port: u16, dir: &Path) -> io::Result<()> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        self.prepare_dir(dir)?;
        run(self
            .command("pg_basebackup")
            .args([
                "--host=127.0.0.1",
                "--username=postgres",
                "--write-recovery-conf",
            ])
            .args(["--wal-method=stream", "--checkpoint=fast", "--no-sync"])
            .arg(format!("--port={primary_port}"))
            .arg("--pgdata")
            .arg(dir))
    }

    /// Starts the server in `dir` on 127.0.0.1:`port` and waits until it accepts queries.
    /// `settings` are extra `-c name=value` options. Output goes to `log`.
    pub fn start(
        &self,
        dir: &Path,
        port: u16,
        settings: &[(&str, &str)],
        log: File,
    ) -> io::Result<RunningCluster> {
        stop_stale_server(dir);
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
            ])
            .args(["-c", &format!("port={port}")])
            // Same on every cluster: a replica refuses to start with fewer than its primary.
            .args(["-c", &format!("max_connections={MAX_CONNECTIONS}")])
            // A primary keeps this much WAL for its replicas (they use no slots: scratch replicas
            // come and go). Without it a checkpoint (each pg_basebackup forces one) can remove a
            // segment a busy replica still needs, and that replica never streams again: seen,
            // "requested WAL segment … has already been removed".
            .args(["-c", "wal_keep_size=1GB"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (name, value) in settings {
            command.args(["-c", &format!("{name}={value}")]);
        }
        supervise(&mut command);
        let child = command.spawn()?;
        let mut cluster = RunningCluster {
            child,
            port,
            install: self.clone(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while cluster.query("postgres", "SELECT 1").is_err() {
            if let Some(status) = cluster.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "postgres on port {port} exited during start-up ({status}); see its log"
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "postgres on port {port} did not start within {START_TIMEOUT:?}"
                )));
            }
            sleep(Duration::from_millis(100));
        }
        Ok(cluster)
    }
}

/// A server we started; stopped (fast shutdown) when dropped.
pub struct RunningCluster {
    child: Child,
    port: u16,
    install: PgInstall,
}

impl RunningCluster {
    /// Runs `sql` through `psql` as the superuser; returns the unaligned output.
    pub fn query(&self, database: &str, sql: &str) -> io::Result<String> {
        query(&self.install, self.port, database, sql)
    }

    /// Fast shutdown: clients are disconnected, the server exits cleanly.
    pub fn stop(&mut self) -> io::Result<()> {
        stop_child(&mut self.child, Signal::SIGINT, STOP_TIMEOUT).map(drop)
    }
}

impl Drop for RunningCluster {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Puts a child we start under our supervision: in its own process group, so a Ctrl-C in the
/// terminal reaches only the supervisor, which then stops children in order; and sent SIGTERM
/// if the thread that started it dies, so a killed supervisor leaves no orphans behind.
pub fn supervise(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    command.process_group(0);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command
            .pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(io::Error::from));
    }
}

/// Sends `signal` to `child`, waits up to `grace` for it to exit, then kills it.
pub fn stop_child(child: &mut Child, signal: Signal, grace: Duration) -> io::Result<ExitStatus> {
    if child.try_wait()?.is_none() {
        let _ = kill(Pid::from_raw(child.id() as i32), signal);
    }
    wait_or_kill(child, Instant::now() + grace)
}

/// Waits for `child` to exit until `deadline`, then kills it.
pub fn wait_or_kill(child: &mut Child, deadline: Instant) -> io::Result<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            child.kill()?;
            return child.wait();
        }
        sleep(Duration::from_millis(50));
    }
}

/// The URL of `database` on a local cluster, as its own role (see [`ensure_service_database`]).
pub fn database_url(port: u16, database: &str) -> String {
    format!("postgres://{database}@127.0.0.1:{port}/{database}")
}

/// Runs `sql` through `psql` against 127.0.0.1:`port`.
pub fn query(install: &PgInstall, port: u16, database: &str, sql: &str) -> io::Result<String> {
    let output = Command::new(install.bin_dir.join("psql"))
        .args([
            "--host=127.0.0.1",
            "--username=postgres",
            "--no-psqlrc",
            "--tuples-only",
            "--no-align",
        ])
        .args(["--set=ON_ERROR_STOP=1", "--quiet"])
        .arg(format!("--port={port}"))
        .arg(format!("--dbname={database}"))
        .arg("--command")
        .arg(sql)
        .stdin(Stdio::null())
        .output()?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(io::Error::other(format!(
            "psql on port {port}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// Creates a login role and a database it owns, that no other role may connect to.
/// Idempotent, so a reused cluster can run it again.
pub fn ensure_service_database(install: &PgInstall, port: u16, name: &str) -> io::Result<()> {
    if !name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
        return Err(io::Error::other(format!("unsafe database name {name:?}")));
    }
    query(
        install,
        port,
        "postgres",
        &format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') \
             THEN CREATE ROLE {name} LOGIN; END IF; END $$;"
        ),
    )?;
    let exists = query(
        install,
        port,
        "postgres",
        &format!("SELECT 1 FROM pg_database WHERE datname = '{name}'"),
    )?;
    if exists.is_empty() {
        query(
            install,
            port,
            "postgres",
            &format!("CREATE DATABASE {name} OWNER {name}"),
        )?;
    }
    query(
        install,
        port,
        "postgres",
        &format!("REVOKE CONNECT ON DATABASE {name} FROM PUBLIC"),
    )?;
    Ok(())
}

fn run(command: &mut Command) -> io::Result<()> {
    let output = command.stdin(Stdio::null()).output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{:?} failed: {}{}",
            command.get_program(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )))
    }
}

fn newest_debian_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// A server left running by an earlier run that was killed would hold the data folder's lock.
fn stop_stale_server(dir: &Path) {
    let Ok(pid_file) = std::fs::read_to_string(dir.join("postmaster.pid")) else {
        return;
    };
    let Some(pid) = pid_file
        .lines()
        .next()
        .and_then(|line| line.trim().parse::<i32>().ok())
    else {
        return;
    };
    let pid = Pid::from_raw(pid);
    if kill(pid, None).is_err() {
        return;
    }
    let _ = kill(pid, Signal::SIGINT);
    let deadline = Instant::now() + STOP_TIMEOUT;
    while kill(pid, None).is_ok() && Instant::now() < deadline {
        sleep(Duration::from_millis(100));
    }
}
